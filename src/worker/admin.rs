//! What the admin API asks a worker about its own connections: a list of them, and resetting
//! those of one backend (shutdown-sessions). Asked through [`Shared::ask`] and answered when
//! the worker's doorbell rings, between two batches of completions.
//!
//! [`Shared::ask`]: crate::control::Shared::ask

use std::net::SocketAddr;

use log::info;

use super::Worker;
use super::slot::Slot;
use crate::conn::Stage;
use crate::control::admin::{ConnFilter, ConnInfo, WorkerRequest};
use crate::sys;

impl Worker {
    /// Answers what the admin API asked since the doorbell last rang.
    pub(super) fn answer_requests(&mut self) {
        for request in self.shared.take_requests(self.index) {
            match request {
                WorkerRequest::Connections { filter, limit, reply } => {
                    let list: Vec<ConnInfo> = self
                        .conns
                        .iter()
                        .filter(|(_, entry)| !entry.conn.is_closing() && self.matches(entry, &filter))
                        .take(limit)
                        .map(|(_, entry)| self.describe(entry))
                        .collect();
                    let _ = reply.send(list);
                }
                WorkerRequest::Kill { pool, backend, reply } => {
                    let filter = ConnFilter { pool: Some(pool.clone()), backend: Some(backend) };
                    let killed = self.for_each_conn(
                        |worker, entry| !entry.conn.is_closing() && worker.matches(entry, &filter),
                        |worker, slot| {
                            worker.stats().killed.add(1);
                            worker.step(slot, |conn, ops| conn.kill(ops));
                        },
                    );
                    if killed > 0 {
                        info!(
                            "worker {}: pool {pool}: reset {killed} connections to {backend} (shutdown-sessions)",
                            self.index
                        );
                    }
                    let _ = reply.send(killed);
                }
            }
        }
    }

    /// The name of the pool a connection was routed to, if any (and if this worker's snapshot
    /// still numbers the pools as the connection does).
    fn pool_name(&self, entry: &Slot) -> Option<&str> {
        if !entry.routed || entry.layout != self.snapshot.layout {
            return None;
        }
        self.snapshot.pools.get(entry.pool as usize).map(|p| p.settings.name.as_str())
    }

    /// The backend a connection holds a slot on, if any.
    fn backend_of(entry: &Slot) -> Option<SocketAddr> {
        entry.backend.as_ref().map(|held| held.address)
    }

    fn matches(&self, entry: &Slot, filter: &ConnFilter) -> bool {
        filter.pool.as_deref().is_none_or(|pool| self.pool_name(entry) == Some(pool))
            && filter.backend.is_none_or(|backend| Self::backend_of(entry) == Some(backend))
    }

    fn describe(&self, entry: &Slot) -> ConnInfo {
        let listener = self.gate.listeners.get(entry.listener as usize).map_or("?", |l| l.settings.name.as_str());
        let proxied =
            self.gate.listeners.get(entry.listener as usize).is_some_and(|l| l.settings.admission.accept_proxy);
        let peer = entry.peer.or(if proxied { None } else { entry.client });
        let client = peer.or_else(|| sys::peer_addr(entry.conn.client_fd()).ok());
        let bytes = entry.conn.bytes();
        ConnInfo {
            worker: self.index,
            client,
            proxied: if proxied { entry.client } else { None },
            listener: listener.to_string(),
            pool: self.pool_name(entry).map(str::to_string),
            backend: Self::backend_of(entry).filter(|_| entry.connect_ms.is_some() || entry.conn.is_relaying()),
            sni: entry.sni.as_deref().map(str::to_string),
            phase: match entry.conn.stage() {
                Stage::Request => "handshake",
                Stage::Queue => "queued",
                Stage::Connect => "connecting",
                Stage::Data | Stage::LastData => "relaying",
            },
            age_ms: self.now.saturating_sub(entry.accepted_at),
            bytes_up: bytes[0],
            bytes_down: bytes[1],
        }
    }
}
