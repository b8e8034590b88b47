//! What the control side and the workers share: the run state (running, draining, closing),
//! the current [`Snapshot`] of the pools, every worker's counters, and each worker's doorbell.
//!
//! The control side changes the state or publishes a snapshot, then rings every doorbell (an
//! eventfd the worker keeps a read on in its ring). A worker reads the shared state only when
//! its doorbell rings, so the accept path takes no lock and touches no shared cache line.

use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};

use arc_swap::ArcSwap;

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

/// State shared by the control side and every worker.
pub struct Shared {
    run_state: AtomicU8,
    snapshot: ArcSwap<Snapshot>,
    pub stats: Box<[WorkerStats]>,
    doorbells: Vec<Arc<OwnedFd>>,
}

impl Shared {
    /// Shared state for `workers` workers, with a doorbell each.
    pub fn new(snapshot: Arc<Snapshot>, workers: usize) -> std::io::Result<Shared> {
        let doorbells = (0..workers).map(|_| sys::eventfd().map(Arc::new)).collect::<Result<_, _>>()?;
        Ok(Shared {
            run_state: AtomicU8::new(RunState::Running as u8),
            snapshot: ArcSwap::new(snapshot),
            stats: (0..workers).map(|_| WorkerStats::default()).collect(),
            doorbells,
        })
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
}
