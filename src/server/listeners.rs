//! The listeners as the server side keeps them: every listener ringlb has had, at the index
//! every worker knows it by (never reused), with each worker's socket, and each worker's
//! mailbox for reloads.
//!
//! A reload matches listeners by bind address as the config writes it (and name, for port 0,
//! which several listeners may bind on one address): one whose address is unchanged keeps its
//! sockets (and so its accept queue; no connection attempt is refused)
//! and takes the new settings, a new one is bound in every worker, claiming its port as at
//! start, and one that is gone stops accepting and drains. Moving a listener to an address that
//! overlaps one still bound (say 127.0.0.1:8080 to 0.0.0.0:8080) cannot be done in one reload:
//! the new bind finds the port in use, and the reload fails without changing anything.

use std::net::SocketAddr;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::mpsc::{Sender, channel};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use socket2::Socket;

use super::upgrade::{Handed, Inherited};
use super::{BACKLOG, StartError, listener_settings};
use crate::admission::sources::SourceLimit;
use crate::config::{Config, ListenerConfig};
use crate::control::Shared;
use crate::control::reload::{ListenerChanges, Listeners};
use crate::pool::Snapshot;
use crate::sys;
use crate::worker::{WorkerChange, WorkerListener};

/// How long a reload waits for every worker to apply it.
const APPLY_TIMEOUT: Duration = Duration::from_secs(10);

/// One listener ringlb has had.
struct Entry {
    /// The bind address as the config writes it (port 0 stays 0): what a reload matches on.
    bind: SocketAddr,
    /// Where it is bound (the real port).
    address: SocketAddr,
    config: ListenerConfig,
    /// The names of the pools it routes to (a reload compares them: pools may move).
    routes: Vec<String>,
    /// Its per-source limit, shared by every worker and kept across reloads.
    sources: Option<Arc<SourceLimit>>,
    /// Each worker's socket, as a raw fd (the worker owns the socket): for a binary upgrade.
    /// Empty once a reload removed it.
    fds: Vec<RawFd>,
}

impl Entry {
    fn active(&self) -> bool {
        !self.fds.is_empty()
    }
}

/// Every listener, and the way to every worker.
pub struct ListenerTable {
    entries: Vec<Entry>,
    workers: usize,
    mailboxes: Vec<Sender<WorkerChange>>,
    shared: Option<Arc<Shared>>,
}

/// Binds `listener` in every worker: the first socket claims the port (see [`sys::listener`]),
/// the others join it. Returns the address bound (with the real port) and the sockets.
fn bind(listener: &ListenerConfig, workers: usize) -> Result<(SocketAddr, Vec<Socket>), StartError> {
    let mut address = listener.bind;
    let mut sockets = Vec::with_capacity(workers);
    for worker in 0..workers {
        let socket = sys::listener(address, BACKLOG, worker == 0).map_err(|source| StartError::Bind {
            listener: listener.name.clone(),
            address,
            source,
        })?;
        // With port 0 the first bind picks the port; the other workers share it.
        if address.port() == 0
            && let Some(bound) = socket.local_addr().ok().and_then(|a| a.as_socket())
        {
            address = bound;
        }
        sockets.push(socket);
    }
    Ok((address, sockets))
}

fn limit_of(listener: &ListenerConfig) -> Option<Arc<SourceLimit>> {
    listener.max_conns_per_source.map(|n| Arc::new(SourceLimit::new(n.get())))
}

/// Listening sockets systemd passed (socket activation: `LISTEN_FDS`, `LISTEN_PID`), by the
/// address each is bound to. A listener whose `bind` is one of them uses it instead of binding;
/// every worker accepts from that one socket (a duplicate of it each), so the kernel's
/// SO_REUSEPORT spreading is replaced by whichever worker accepts first.
#[derive(Default)]
pub struct Activated(Vec<(SocketAddr, Socket)>);

impl Activated {
    /// The sockets passed to this process (none without socket activation). Each must be a
    /// listening TCP socket.
    pub fn from_env() -> std::io::Result<Activated> {
        let mut sockets = Vec::new();
        for fd in sd_notify::listen_fds()? {
            // SAFETY: systemd passed this descriptor to this process (LISTEN_PID is ours);
            // nothing else owns it.
            let socket = unsafe { <Socket as std::os::fd::FromRawFd>::from_raw_fd(fd) };
            let address = socket.local_addr().ok().and_then(|a| a.as_socket());
            let listening = socket.is_listener().unwrap_or(false);
            match address {
                Some(address) if listening && socket.r#type().is_ok_and(|t| t == socket2::Type::STREAM) => {
                    socket.set_nonblocking(true)?;
                    // Accepted sockets inherit TCP_NODELAY from the listener.
                    socket.set_tcp_nodelay(true)?;
                    sockets.push((address, socket));
                }
                _ => {
                    return Err(std::io::Error::other(format!(
                        "descriptor {fd} passed by systemd is not a listening TCP socket; use ListenStream= in the .socket unit"
                    )));
                }
            }
        }
        Ok(Activated(sockets))
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The passed socket bound to `bind`, and a duplicate of it for every other worker.
    fn take(&mut self, bind: SocketAddr, workers: usize) -> Option<std::io::Result<Vec<Socket>>> {
        let i = self.0.iter().position(|(address, _)| *address == bind)?;
        let (_, socket) = self.0.swap_remove(i);
        let mut sockets = Vec::with_capacity(workers);
        for _ in 1..workers {
            match socket.try_clone() {
                Ok(copy) => sockets.push(copy),
                Err(e) => return Some(Err(e)),
            }
        }
        sockets.insert(0, socket);
        Some(Ok(sockets))
    }

    /// Addresses of passed sockets no listener took.
    pub fn unused(&self) -> Vec<SocketAddr> {
        self.0.iter().map(|(address, _)| *address).collect()
    }
}

impl ListenerTable {
    /// Binds `config`'s listeners for `workers` workers, or takes the sockets `inherited`
    /// has for them (see [`Inherited::take_listener`]): the table, and each worker's
    /// listeners.
    pub fn bind(
        config: &Config,
        workers: usize,
        mut inherited: Option<&mut Inherited>,
        mut activated: Option<&mut Activated>,
    ) -> Result<(ListenerTable, Vec<Vec<WorkerListener>>), StartError> {
        let mut table = ListenerTable { entries: Vec::new(), workers, mailboxes: Vec::new(), shared: None };
        let mut by_worker: Vec<Vec<WorkerListener>> = (0..workers).map(|_| Vec::new()).collect();
        for listener in &config.listeners {
            let (address, sockets) = match inherited
                .as_deref_mut()
                .and_then(|i| i.take_listener(&listener.name, listener.bind))
            {
                Some((address, sockets)) if sockets.len() == workers => (address, sockets),
                Some((_, sockets)) => {
                    return Err(StartError::Workers {
                        listener: listener.name.clone(),
                        handed: sockets.len(),
                        workers,
                    });
                }
                None => match activated.as_deref_mut().and_then(|a| a.take(listener.bind, workers)) {
                    Some(Ok(sockets)) => {
                        log::info!("listener {}: using the socket systemd passed for {}", listener.name, listener.bind);
                        (listener.bind, sockets)
                    }
                    Some(Err(source)) => {
                        return Err(StartError::Bind {
                            listener: listener.name.clone(),
                            address: listener.bind,
                            source,
                        });
                    }
                    None => bind(listener, workers)?,
                },
            };
            for (w, socket) in sockets.into_iter().enumerate() {
                by_worker[w].push(table.add(listener, config, address, socket, w));
            }
        }
        Ok((table, by_worker))
    }

    /// Records `socket` as worker `worker`'s of `listener` (a new entry for worker 0) and
    /// returns what the worker is given.
    fn add(
        &mut self,
        listener: &ListenerConfig,
        config: &Config,
        address: SocketAddr,
        socket: Socket,
        worker: usize,
    ) -> WorkerListener {
        if worker == 0 {
            self.entries.push(Entry {
                bind: listener.bind,
                address,
                config: listener.clone(),
                routes: routes(listener, config),
                sources: limit_of(listener),
                fds: Vec::with_capacity(self.workers),
            });
        }
        let index = self.entries.len() - 1;
        let entry = &mut self.entries[index];
        entry.fds.push(socket.as_raw_fd());
        WorkerListener { index, socket, settings: listener_settings(listener, self.workers, entry.sources.clone()) }
    }

    /// Connects the table to the running workers: their shared state (to ring their
    /// doorbells) and their mailboxes.
    pub fn connect(&mut self, shared: Arc<Shared>, mailboxes: Vec<Sender<WorkerChange>>) {
        self.shared = Some(shared);
        self.mailboxes = mailboxes;
    }

    /// Every active listener's sockets, for a binary upgrade. They stay open while the table
    /// is held: a reload that removes a listener clears its entry before its workers close it.
    pub fn sockets(&self) -> Vec<Handed> {
        self.entries
            .iter()
            .filter(|e| e.active())
            .map(|e| Handed { name: e.config.name.clone(), address: e.address, fds: e.fds.clone() })
            .collect()
    }

    /// Each listener's name and the address it is bound to, in config order at start.
    pub fn addresses(&self) -> Vec<(String, SocketAddr)> {
        self.entries.iter().filter(|e| e.active()).map(|e| (e.config.name.clone(), e.address)).collect()
    }
}

/// The names of the pools `listener` routes to.
fn routes(listener: &ListenerConfig, config: &Config) -> Vec<String> {
    listener.pools(config).into_iter().map(|p| config.pools[p].name.clone()).collect()
}

/// Whether a kept listener's settings changed, routes compared by pool name (pools may have
/// moved).
fn changed(old: &Entry, new: &ListenerConfig, new_config: &Config) -> bool {
    let (routes_before, old) = (&old.routes, &old.config);
    old.name != new.name
        || old.idle_timeout != new.idle_timeout
        || old.accept_proxy != new.accept_proxy
        || old.proxy_from != new.proxy_from
        || old.handshake_timeout != new.handshake_timeout
        || old.access != new.access
        || old.max_conns_per_source != new.max_conns_per_source
        || old.max_connections != new.max_connections
        || old.sni != new.sni
        || *routes_before != routes(new, new_config)
}

impl ListenerTable {
    fn apply_change(&mut self, config: &Config, snapshot: &Arc<Snapshot>) -> Result<ListenerChanges, String> {
        // Match by bind address (and, first, by name too: several listeners may bind port 0
        // on one address, and only the name tells them apart); bind what is new before
        // anything changes.
        let mut taken = vec![false; self.entries.len()];
        let mut kept = Vec::new();
        let mut fresh = Vec::new();
        for listener in &config.listeners {
            let free = |i: &usize| !taken[*i] && self.entries[*i].active() && self.entries[*i].bind == listener.bind;
            let same = (0..self.entries.len())
                .filter(free)
                .find(|&i| self.entries[i].config.name == listener.name)
                .or_else(|| (0..self.entries.len()).filter(free).find(|_| listener.bind.port() != 0));
            match same {
                Some(i) => {
                    taken[i] = true;
                    kept.push((i, listener));
                }
                None => {
                    let (address, sockets) = bind(listener, self.workers).map_err(|e| e.to_string())?;
                    fresh.push((listener, address, sockets));
                }
            }
        }
        let removed: Vec<usize> = (0..self.entries.len()).filter(|&i| self.entries[i].active() && !taken[i]).collect();

        let mut changes = ListenerChanges::default();
        let mut updated = Vec::new();
        for &(i, listener) in &kept {
            let entry = &mut self.entries[i];
            if changed(entry, listener, config) {
                changes.changed.push(listener.name.clone());
            }
            entry.sources = match (entry.sources.take(), listener.max_conns_per_source) {
                (Some(limit), Some(n)) => {
                    limit.set_limit(n.get());
                    Some(limit)
                }
                (_, Some(_)) => limit_of(listener),
                (_, None) => None,
            };
            entry.config = listener.clone();
            entry.routes = routes(listener, config);
            updated.push((i, listener_settings(listener, self.workers, entry.sources.clone())));
        }
        for &i in &removed {
            changes.removed.push(self.entries[i].config.name.clone());
            self.entries[i].fds.clear();
        }
        let mut added: Vec<Vec<WorkerListener>> = (0..self.workers).map(|_| Vec::new()).collect();
        for (listener, address, sockets) in fresh {
            changes.added.push((listener.name.clone(), address));
            for (w, socket) in sockets.into_iter().enumerate() {
                added[w].push(self.add(listener, config, address, socket, w));
            }
        }

        // Every worker applies it all in one step; wait until each has.
        let (applied, done) = channel();
        for (w, (mailbox, added)) in self.mailboxes.iter().zip(added).enumerate() {
            let change = WorkerChange {
                snapshot: Arc::clone(snapshot),
                added,
                updated: updated.clone(),
                removed: removed.clone(),
                drain_timeout: config.drain_timeout,
                applied: applied.clone(),
            };
            if mailbox.send(change).is_ok()
                && let Some(shared) = &self.shared
            {
                shared.ring(w);
            }
        }
        drop(applied);
        let deadline = std::time::Instant::now() + APPLY_TIMEOUT;
        for _ in 0..self.mailboxes.len() {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if done.recv_timeout(left).is_err() {
                log::warn!("reload: a worker did not apply the change within {APPLY_TIMEOUT:?}; it will when it wakes");
                break;
            }
        }
        Ok(changes)
    }
}

/// The table as the control thread reaches it (the main thread reads it for an upgrade).
pub struct SharedTable(pub Arc<Mutex<ListenerTable>>);

impl Listeners for SharedTable {
    fn apply(&mut self, config: &Config, snapshot: &Arc<Snapshot>) -> Result<ListenerChanges, String> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).apply_change(config, snapshot)
    }
}
