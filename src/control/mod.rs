//! The control side: what it shares with the workers, and the control thread ([`thread`])
//! that runs health checks and serves metrics.
//!
//! Shared: the run state (running, draining, closing), the current [`Snapshot`] of the pools
//! (which carries what all workers count per backend and per pool queue), every worker's
//! counters, and each worker's doorbell. The control side changes the state or publishes a snapshot, then rings every
//! doorbell (an eventfd the worker keeps a read on in its ring). A worker reads the shared
//! state only when its doorbell rings, so the accept path takes no lock.
//!
//! Workers tell the control thread about failed backend connects through an unbounded channel
//! ([`ControlEvent`]); sending never blocks a worker.
//!
//! With `spread = "pack"` the shared state also holds [`Pack`]: how many workers are in use
//! (the control thread sets it) and how many connections are on their way between workers.

pub mod admin;
pub mod api;
pub mod checks;
pub mod dns;
pub mod http;
pub mod metrics;
pub mod reload;
pub mod snapshot;
pub mod status;
pub mod thread;

use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwap;
use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender, unbounded_channel};
use tokio::sync::oneshot;

use crate::pool::Snapshot;
use crate::spread::{Pack, Spread};
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

/// What the workers and the server tell the control thread.
#[derive(Debug)]
pub enum ControlEvent {
    /// A connect to backend `backend` of pool `pool` failed with `errno` (a passive check);
    /// the indices are those of the snapshot layout `layout`.
    ConnectFailed { layout: u64, pool: usize, backend: usize, errno: i32 },
    /// Reload the config; the outcome goes to `reply`, if given.
    Reload { source: reload::Source, reply: Option<oneshot::Sender<Result<reload::Report, reload::ReloadError>>> },
    /// An admin API request that needs the control thread's state; the answer goes to
    /// `reply`.
    Admin { command: api::Command, reply: oneshot::Sender<api::Answer> },
    /// A binary upgrade handed the listening sockets to a new process: stop serving the
    /// metrics port and the admin socket (this process drains).
    HandedOver,
    /// Stop the control thread.
    Stop,
}

/// State shared by the control side and every worker.
pub struct Shared {
    run_state: AtomicU8,
    snapshot: ArcSwap<Snapshot>,
    /// The generation of the snapshot published last: a worker compares it with its own
    /// before each batch of completions (one atomic load), so a change an operator made is
    /// in effect for every connection accepted after the change was answered.
    published: AtomicU64,
    pub stats: Box<[WorkerStats]>,
    doorbells: Vec<Arc<OwnedFd>>,
    events: UnboundedSender<ControlEvent>,
    /// With `spread = "pack"`: the workers in use and what feeds that choice.
    pack: Option<Pack>,
    /// Reloads that took effect and that failed, and when the config in effect was loaded
    /// (seconds since the Unix epoch).
    reloads: [AtomicU64; 2],
    loaded_at: AtomicU64,
    /// What the admin API asks each worker, taken when its doorbell rings.
    requests: Vec<Mutex<Vec<admin::WorkerRequest>>>,
    /// Each backend name's lookups, for the metrics page.
    names: Mutex<Arc<Vec<dns::NameStatus>>>,
}

impl Shared {
    /// Shared state for `workers` workers, with a doorbell each, and the receiving end of the
    /// channel to the control thread.
    pub fn new(
        snapshot: Arc<Snapshot>,
        workers: usize,
        spread: Spread,
    ) -> std::io::Result<(Shared, UnboundedReceiver<ControlEvent>)> {
        let doorbells = (0..workers).map(|_| sys::eventfd().map(Arc::new)).collect::<Result<_, _>>()?;
        let (events, receiver) = unbounded_channel();
        let shared = Shared {
            run_state: AtomicU8::new(RunState::Running as u8),
            published: AtomicU64::new(snapshot.generation),
            snapshot: ArcSwap::new(snapshot),
            stats: (0..workers).map(|_| WorkerStats::default()).collect(),
            doorbells,
            events,
            pack: (spread == Spread::Pack).then(|| Pack::new(workers)),
            reloads: [AtomicU64::new(0), AtomicU64::new(0)],
            loaded_at: AtomicU64::new(0),
            requests: (0..workers).map(|_| Mutex::new(Vec::new())).collect(),
            names: Mutex::new(Arc::new(Vec::new())),
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
        let generation = snapshot.generation;
        self.snapshot.store(snapshot);
        self.published.store(generation, Ordering::Release);
        self.ring_all();
    }

    /// The generation of the snapshot published last.
    pub fn published(&self) -> u64 {
        self.published.load(Ordering::Acquire)
    }

    fn ring_all(&self) {
        (0..self.doorbells.len()).for_each(|worker| self.ring(worker));
    }

    /// Wakes worker `worker`.
    pub fn ring(&self, worker: usize) {
        sys::eventfd_ring(&self.doorbells[worker]);
    }

    /// How connections spread over the workers.
    pub fn spread(&self) -> Spread {
        if self.pack.is_some() { Spread::Pack } else { Spread::Even }
    }

    /// With `spread = "pack"`, what the workers and the control thread share about it.
    pub fn pack(&self) -> Option<&Pack> {
        self.pack.as_ref()
    }

    /// How many workers (the first ones) take new connections: all of them unless packing.
    pub fn workers_in_use(&self) -> usize {
        self.pack.as_ref().map_or(self.doorbells.len(), Pack::workers_in_use)
    }

    /// Sets the workers in use (the control thread's choice, with `spread = "pack"`) and wakes
    /// the workers to follow.
    pub fn set_workers_in_use(&self, count: usize) {
        if let Some(pack) = &self.pack {
            pack.set_workers_in_use(count);
            self.ring_all();
        }
    }

    /// Sets the workers in use and keeps them so: the control thread no longer changes them
    /// (for tests, and for whoever embeds a server and decides on its own).
    pub fn hold_workers_in_use(&self, count: usize) {
        if let Some(pack) = &self.pack {
            pack.hold(count);
            self.ring_all();
        }
    }

    pub fn workers_in_use_held(&self) -> bool {
        self.pack.as_ref().is_some_and(Pack::held)
    }

    /// Every worker's open connections, counting those on their way to it (no longer counted
    /// by the worker that handed them over, not yet by this one): without them, a worker
    /// looking while its connections are in transit would hand on too many.
    pub fn open_connections(&self) -> Vec<u64> {
        (0..self.stats.len())
            .map(|w| self.stats[w].active.get() + self.pack.as_ref().map_or(0, |pack| pack.in_transit(w)))
            .collect()
    }

    /// Counts a reload that took effect (`ok`) or failed.
    pub fn reloaded(&self, ok: bool) {
        self.reloads[usize::from(!ok)].fetch_add(1, Ordering::Relaxed);
    }

    /// Reloads so far: (took effect, failed).
    pub fn reloads(&self) -> (u64, u64) {
        (self.reloads[0].load(Ordering::Relaxed), self.reloads[1].load(Ordering::Relaxed))
    }

    /// The config in effect was loaded just now.
    /// Every backend name's lookups now (the control thread sets them).
    pub fn set_names(&self, names: Vec<dns::NameStatus>) {
        *self.names.lock().unwrap_or_else(|e| e.into_inner()) = Arc::new(names);
    }

    pub fn names(&self) -> Arc<Vec<dns::NameStatus>> {
        Arc::clone(&self.names.lock().unwrap_or_else(|e| e.into_inner()))
    }

    pub fn config_loaded(&self) {
        let now = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
        self.loaded_at.store(now, Ordering::Relaxed);
    }

    /// When the config in effect was loaded, in seconds since the Unix epoch.
    pub fn config_loaded_at(&self) -> u64 {
        self.loaded_at.load(Ordering::Relaxed)
    }

    /// Asks worker `worker` something (it answers through the request's reply channel).
    pub fn ask(&self, worker: usize, request: admin::WorkerRequest) {
        self.requests[worker].lock().unwrap_or_else(|e| e.into_inner()).push(request);
        self.ring(worker);
    }

    /// What the admin API asked worker `worker` since it last looked.
    pub fn take_requests(&self, worker: usize) -> Vec<admin::WorkerRequest> {
        std::mem::take(&mut *self.requests[worker].lock().unwrap_or_else(|e| e.into_inner()))
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
