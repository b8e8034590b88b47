//! The control side: what it shares with the workers, and the control thread ([`thread`])
//! that runs health checks and serves metrics.
//!
//! Shared: the run state (running, draining, closing), the current [`Snapshot`] of the pools,
//! every worker's counters, per-backend counters all workers update, and each worker's
//! doorbell. The control side changes the state or publishes a snapshot, then rings every
//! doorbell (an eventfd the worker keeps a read on in its ring). A worker reads the shared
//! state only when its doorbell rings, so the accept path takes no lock.
//!
//! Workers tell the control thread about failed backend connects through an unbounded channel
//! ([`ControlEvent`]); sending never blocks a worker.

pub mod thread;

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender, unbounded_channel};

use crate::balance::{BackendCounters, client_hash};
use crate::config::HashKey;
use crate::pool::Snapshot;
use crate::stats::WorkerStats;
use crate::sys;

/// What the workers should be doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum RunState {
    /// Accepting and relaying.
    Running = 0,
    /// Not accepting; relaying until connections end or the drain deadline.
    Draining = 1,
    /// Closing every connection now.
    Closing = 2,
}

/// What workers tell the control thread.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ControlEvent {
    /// A connect to backend `backend` of pool `pool` failed with `errno` (a passive check).
    ConnectFailed { pool: usize, backend: usize, errno: i32 },
    /// Stop the control thread.
    Stop,
}

/// State shared by the control side and every worker.
pub struct Shared {
    run_state: AtomicU8,
    snapshot: ArcSwap<Snapshot>,
    pub stats: Box<[WorkerStats]>,
    /// Per pool, per backend: counters every worker updates.
    pub backends: Box<[Box<[BackendCounters]>]>,
    /// Per pool: connections waiting (in any worker) for a backend below its `max_conns`.
    pub queued: Box<[AtomicU64]>,
    /// Per listener: counts for `max_conns_per_source`, if set.
    pub sources: Box<[Option<SourceLimit>]>,
    doorbells: Vec<Arc<OwnedFd>>,
    events: UnboundedSender<ControlEvent>,
}

impl Shared {
    /// Shared state for `workers` workers, with a doorbell each, and the receiving end of the
    /// channel to the control thread.
    pub fn new(
        snapshot: Arc<Snapshot>,
        workers: usize,
        sources: Box<[Option<SourceLimit>]>,
    ) -> std::io::Result<(Shared, UnboundedReceiver<ControlEvent>)> {
        let doorbells = (0..workers).map(|_| sys::eventfd().map(Arc::new)).collect::<Result<_, _>>()?;
        let backends = snapshot
            .pools
            .iter()
            .map(|pool| pool.backends.iter().map(|_| BackendCounters::default()).collect())
            .collect();
        let queued = snapshot.pools.iter().map(|_| AtomicU64::new(0)).collect();
        let (events, receiver) = unbounded_channel();
        let shared = Shared {
            run_state: AtomicU8::new(RunState::Running as u8),
            snapshot: ArcSwap::new(snapshot),
            stats: (0..workers).map(|_| WorkerStats::default()).collect(),
            backends,
            queued,
            sources,
            doorbells,
            events,
        };
        Ok((shared, receiver))
    }

    /// Tells the control thread something; never blocks. Lost only if the control thread is
    /// gone, when nobody needs it.
    pub fn notify(&self, event: ControlEvent) {
        let _ = self.events.send(event);
    }

    pub fn doorbell(&self, worker: usize) -> Arc<OwnedFd> {
        Arc::clone(&self.doorbells[worker])
    }

    pub fn run_state(&self) -> RunState {
        match self.run_state.load(Ordering::Acquire) {
            0 => RunState::Running,
            1 => RunState::Draining,
            _ => RunState::Closing,
        }
    }

    /// Moves the workers on to `state` (never back) and wakes them.
    pub fn advance(&self, state: RunState) {
        self.run_state.fetch_max(state as u8, Ordering::AcqRel);
        self.ring_all();
    }

    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.snapshot.load_full()
    }

    /// Publishes a new snapshot and wakes the workers to pick it up.
    pub fn publish(&self, snapshot: Arc<Snapshot>) {
        self.snapshot.store(snapshot);
        self.ring_all();
    }

    fn ring_all(&self) {
        for doorbell in &self.doorbells {
            sys::eventfd_ring(doorbell);
        }
    }

    /// Wakes every worker but `me` (e.g. to serve its queue after a backend slot freed).
    pub fn ring_others(&self, me: usize) {
        for (i, doorbell) in self.doorbells.iter().enumerate() {
            if i != me {
                sys::eventfd_ring(doorbell);
            }
        }
    }
}

/// Open connections per client address for one listener, over all workers, for
/// `max_conns_per_source`. Sharded by address so workers rarely meet on a lock, and only
/// listeners that set the limit have one (as nginx's `limit_conn` zone and HAProxy's stick
/// tables, this count must be shared, and sharing it exactly takes a lock).
pub struct SourceLimit {
    limit: u32,
    shards: Box<[Mutex<HashMap<IpAddr, u32>>]>,
}

impl SourceLimit {
    const SHARDS: usize = 64;

    pub fn new(limit: u32) -> SourceLimit {
        SourceLimit { limit, shards: (0..Self::SHARDS).map(|_| Mutex::new(HashMap::new())).collect() }
    }

    fn shard(&self, ip: IpAddr) -> &Mutex<HashMap<IpAddr, u32>> {
        let hash = client_hash(SocketAddr::new(ip, 0), HashKey::ClientIp);
        &self.shards[(hash as usize) % Self::SHARDS]
    }

    /// Counts one more connection from `ip`, unless it already has `limit`.
    pub fn try_acquire(&self, ip: IpAddr) -> bool {
        let mut shard = self.shard(ip).lock().unwrap_or_else(|e| e.into_inner());
        let count = shard.entry(ip).or_insert(0);
        if *count >= self.limit {
            return false;
        }
        *count += 1;
        true
    }

    pub fn release(&self, ip: IpAddr) {
        let mut shard = self.shard(ip).lock().unwrap_or_else(|e| e.into_inner());
        if let Some(count) = shard.get_mut(&ip) {
            *count -= 1;
            if *count == 0 {
                shard.remove(&ip);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn source_limit_counts_per_address() {
        let limit = SourceLimit::new(2);
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let b: IpAddr = "2001:db8::1".parse().unwrap();
        assert!(limit.try_acquire(a) && limit.try_acquire(a));
        assert!(!limit.try_acquire(a));
        assert!(limit.try_acquire(b));
        limit.release(a);
        assert!(limit.try_acquire(a));
        limit.release(a);
        limit.release(a);
        limit.release(b);
        assert!(limit.shards.iter().all(|s| s.lock().unwrap().is_empty()), "no entry left behind");
    }
}
