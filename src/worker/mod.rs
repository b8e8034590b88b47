//! A worker: one thread, pinned to one core, owning one ring, its own SO_REUSEPORT listeners
//! and a slab of connections ([`Slot`]s, each a [`Conn`](crate::conn::Conn) and the worker's bookkeeping). It turns completions into connection events and the connections'
//! [`Op`]s into submissions; this is the only place that touches the ring.
//!
//! Lifecycle: accept until the control side asks to drain (cancel the accepts, then close the
//! listeners), relay until the connections end or the drain deadline closes them, cancel the
//! worker's own timers and doorbell read, and return once every completion is in.
//!
//! This file holds the loop, the run states (running, draining), the tick and snapshot updates;
//! `accept.rs` takes connections in (accept, admission, handshake, routing) and `relay.rs`
//! carries out what the connections ask for (completions to events, operations to entries,
//! connects, buffers, pipes, backend slots, freeing).

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::Arc;
use std::sync::mpsc::Receiver;
use std::time::Duration;

use io_uring::{opcode, squeue, types};
use log::{debug, error, info, warn};
use slab::Slab;
use socket2::Socket;

use crate::admission::Admission;
use crate::admission::acl::AccessRules;
use crate::admission::sources::SourceLimit;
use crate::conn::{self, End, Op, Relay};
use crate::connlog;
use crate::control::{RunState, Shared};
use crate::pool::OnDown;
use crate::pool::Picker;
use crate::pool::Snapshot;
use crate::ring::{BufRing, Completion, Kind, Ring, Token};
use crate::spread::Handoff;
use crate::stats::WorkerStats;
use crate::sys;
pub use slot::Slot;

mod accept;
mod admin;
mod gate;
mod moving;
mod pipes;
mod relay;
mod reload;
mod slot;
mod waiters;

use gate::{AcceptGate, Listener};
use pipes::PipePool;
pub use reload::WorkerChange;
use waiters::Waiters;

/// Sizes of a worker's ring and buffers.
#[derive(Debug, Clone, Copy)]
pub struct RingSizes {
    /// Submission queue entries.
    pub entries: u32,
    /// Completion queue entries (at least `entries`); completions beyond it are held back by
    /// the kernel until reaped, not lost.
    pub cq_entries: u32,
    /// Buffers in the provided-buffer ring (a power of two).
    pub buffers: u16,
    /// Bytes per buffer: the most one receive moves.
    pub buffer_size: u32,
    /// Pipes a splicing worker may hold at once; `None`: from the file-descriptor budget.
    pub pipes: Option<usize>,
    /// Buffers' worth of bytes one multishot receive takes before it ends and is armed again
    /// (0: no limit, as on kernels before 6.17). It bounds what one busy connection takes from
    /// the shared buffer ring in one go: without it the kernel keeps filling buffers as long as
    /// the socket has bytes, until the backlog stop lands.
    pub recv_limit_buffers: u32,
}

impl Default for RingSizes {
    fn default() -> RingSizes {
        RingSizes {
            entries: 1024,
            cq_entries: 4096,
            buffers: 512,
            buffer_size: 32 * 1024,
            pipes: None,
            recv_limit_buffers: conn::BACKLOG_STOP as u32,
        }
    }
}

/// What a listener is configured as, in the form a worker uses it (the same in every worker).
#[derive(Debug, Clone)]
pub struct ListenerSettings {
    pub name: String,
    /// What a connection must send before it can be routed, and where it goes.
    pub admission: Admission,
    pub access: AccessRules,
    /// With `accept_proxy`: who may send the PROXY header (empty: anyone).
    pub proxy_from: Vec<crate::admission::acl::Cidr>,
    /// `max_conns_per_source`, counted over all workers (one per listener, shared).
    pub sources: Option<Arc<SourceLimit>>,
    pub idle_timeout: Option<Duration>,
    pub handshake_timeout: Duration,
    /// This worker's share of the listener's `max_connections`, if it has one.
    pub max_connections: Option<usize>,
}

/// A listener as a worker is given it: its socket and settings, at the index every worker
/// knows it by.
#[derive(Debug)]
pub struct WorkerListener {
    pub index: usize,
    pub socket: Socket,
    pub settings: ListenerSettings,
}

/// Everything a worker is started with.
#[derive(Debug)]
pub struct WorkerPlan {
    pub index: usize,
    pub cpu: Option<usize>,
    pub listeners: Vec<WorkerListener>,
    pub drain_timeout: Duration,
    /// Connections this worker holds at most; at the cap it stops accepting.
    pub max_connections: usize,
    /// How connections move bytes.
    pub relay: Relay,
    /// Size of the splice pipes, and how many this worker may hold at once (their descriptors
    /// are set aside from the fd budget; past it, a direction relays by copy for a round).
    pub pipe_size: u32,
    pub pipe_limit: usize,
    pub sizes: RingSizes,
    pub doorbell: Arc<OwnedFd>,
    /// With `spread = "pack"`: every worker's inbox for connections handed over.
    pub handoff: Option<Arc<Handoff<Slot>>>,
    /// How many connections one listener's accept queue holds (the listen backlog, capped by
    /// the kernel's somaxconn).
    pub accept_backlog: usize,
    /// Where reloads are posted for this worker.
    pub changes: Receiver<WorkerChange>,
}

/// Logs a warning through a [`RateLimit`]: at most one line a second, which says how many like
/// it were held back. The message is only formatted when it is logged.
macro_rules! warn_limited {
    ($limit:expr, $now:expr, $($message:tt)+) => {
        if let Some(suppressed) = $limit.allow($now) {
            log::warn!("{} ({suppressed} more like it since the last message)", format_args!($($message)+));
        }
    };
}
pub(crate) use warn_limited;

/// Logs a message at most once per interval and counts what it held back.
#[derive(Debug)]
struct RateLimit {
    next_ms: u64,
    suppressed: u64,
}

impl RateLimit {
    const INTERVAL_MS: u64 = 1000;

    fn new() -> RateLimit {
        RateLimit { next_ms: 0, suppressed: 0 }
    }

    /// Returns how many messages were suppressed since the last one, if this one may be logged.
    fn allow(&mut self, now: u64) -> Option<u64> {
        if now >= self.next_ms {
            self.next_ms = now + Self::INTERVAL_MS;
            Some(std::mem::take(&mut self.suppressed))
        } else {
            self.suppressed += 1;
            None
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Running,
    Draining,
}

/// Slots for timespecs the kernel reads at submission; boxed so their addresses are stable.
struct Timers {
    tick: types::Timespec,
    backoff: types::Timespec,
    drain: types::Timespec,
}

fn timespec(d: Duration) -> types::Timespec {
    types::Timespec::new().sec(d.as_secs()).nsec(d.subsec_nanos())
}

/// Why the tick closes a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Overdue {
    /// No byte either way for the listener's idle_timeout.
    Idle,
    /// No complete PROXY header / ClientHello within handshake_timeout.
    Handshake,
    /// Waited queue_timeout for a backend below max_conns.
    Queue,
    /// Its listener was removed by a reload `drain_timeout` ago.
    Drained,
}

/// How long accepting pauses after the process ran out of file descriptors.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

pub struct Worker {
    // Declared first so it is dropped before the buffer memory the kernel may write to.
    ring: Ring,
    bufs: BufRing,
    index: usize,
    shared: Arc<Shared>,
    doorbell: Arc<OwnedFd>,
    handoff: Option<Arc<Handoff<Slot>>>,
    doorbell_value: Box<u64>,
    gate: AcceptGate,
    snapshot: Arc<Snapshot>,
    /// Snapshots replaced since the last submission: kept until then because a queued connect
    /// points at their addresses.
    retired: Vec<Arc<Snapshot>>,
    pickers: Vec<Picker>,
    timers: Box<Timers>,
    conns: Slab<Slot>,
    /// Splice mode: pipes held by connections' directions.
    pipes: PipePool,
    relay: Relay,
    /// Connections waiting for a backend slot, directions waiting for a buffer.
    waiters: Waiters,
    next_generation: u32,
    /// Scratch space reused for every connection step and every batch of completions.
    ops: Vec<Op>,
    completions: Vec<Completion>,
    scratch_slots: Vec<usize>,
    /// Worker-level operations in flight (accepts, doorbell, timers, cancels).
    misc_inflight: u32,
    mode: Mode,
    closing_all: bool,
    max_connections: usize,
    cancel_all_sent: bool,
    drain_timeout: Duration,
    now: u64,
    connect_log: RateLimit,
    /// Bytes a multishot receive takes before it ends (0: no limit, when the kernel has none).
    recv_limit: u32,
    refuse_log: RateLimit,
    /// The workers in use the listeners were last steered to (0: not yet).
    steered: usize,
    /// Reloads posted for this worker.
    changes: Receiver<WorkerChange>,
    /// The interval of the tick armed (None before the first), and the tick's number, which
    /// tells its completions from those of one it replaced.
    tick: Option<Duration>,
    tick_generation: u32,
    /// When open connections last reported their bytes to their backends (worker clock).
    bytes_reported_at: u64,
    /// Connection log lines, written once per batch.
    connlog: connlog::Writer,
    /// Test hook (worker 0 only, from `RINGLB_TEST_STALL_FILE`): once this file exists, the
    /// worker stops at its next tick and never comes back, as a worker stuck in a bug would;
    /// the tests of the systemd watchdog use it.
    stall_when: Option<std::path::PathBuf>,
}

impl Worker {
    /// Builds the worker's ring and buffers; call on the worker's own thread (the ring is
    /// SINGLE_ISSUER).
    pub fn new(plan: WorkerPlan, shared: Arc<Shared>) -> io::Result<Worker> {
        if let Some(cpu) = plan.cpu
            && let Err(e) = sys::pin_current_thread(cpu)
        {
            warn!("worker {}: cannot pin to CPU {cpu}: {e}", plan.index);
        }
        let mut ring = Ring::new(plan.sizes.entries, plan.sizes.cq_entries)?;
        let mut bufs = BufRing::new(&ring, 0, plan.sizes.buffers, plan.sizes.buffer_size)?;
        let recv_limit = if plan.sizes.recv_limit_buffers == 0 {
            0
        } else if ring.limits_multishot_receives(&mut bufs)? {
            plan.sizes.recv_limit_buffers * plan.sizes.buffer_size
        } else {
            if plan.index == 0 {
                warn!(
                    "this kernel has no byte limit for multishot receives (Linux 6.17 added it); receiving without one"
                );
            }
            0
        };
        let snapshot = shared.snapshot();
        let waiters = Waiters::new(snapshot.pools.len());
        let pickers =
            snapshot.pools.iter().enumerate().map(|(p, pool)| Picker::new(pool, picker_seed(plan.index, p))).collect();
        let timers = Box::new(Timers {
            tick: timespec(tick_interval(None)),
            backoff: timespec(ACCEPT_BACKOFF),
            drain: timespec(plan.drain_timeout),
        });
        let listeners = plan.listeners.into_iter().map(Listener::new).collect();
        let mut worker = Worker {
            ring,
            bufs,
            index: plan.index,
            shared,
            doorbell: plan.doorbell,
            handoff: plan.handoff,
            doorbell_value: Box::new(0),
            gate: AcceptGate::new(listeners, plan.accept_backlog),
            snapshot,
            retired: Vec::new(),
            pickers,
            timers,
            waiters,
            conns: Slab::with_capacity(1024),
            pipes: PipePool::new(plan.pipe_size, plan.pipe_limit),
            relay: plan.relay,
            next_generation: 0,
            ops: Vec::with_capacity(16),
            completions: Vec::with_capacity(256),
            scratch_slots: Vec::new(),
            misc_inflight: 0,
            mode: Mode::Running,
            closing_all: false,
            max_connections: plan.max_connections.max(1),
            cancel_all_sent: false,
            drain_timeout: plan.drain_timeout,
            now: sys::now_millis(),
            connect_log: RateLimit::new(),
            recv_limit,
            refuse_log: RateLimit::new(),
            steered: 0,
            changes: plan.changes,
            tick: None,
            tick_generation: 0,
            bytes_reported_at: 0,
            connlog: connlog::Writer::default(),
            stall_when: (plan.index == 0).then(|| std::env::var_os(STALL_ENV).map(Into::into)).flatten(),
        };
        // Steer before the server reports this worker ready, so that no connection accepted
        // after the start is spread by the kernel's hash alone.
        if worker.shared.pack().is_some() {
            worker.steer(worker.shared.workers_in_use());
        }
        Ok(worker)
    }

    fn stats(&self) -> &WorkerStats {
        &self.shared.stats[self.index]
    }

    /// Runs until drained and every completion is in.
    pub fn run(mut self) -> io::Result<()> {
        // A stderr that does not keep up costs this worker log lines, never its connections.
        crate::logger::never_wait();
        if let Some(pack) = self.shared.pack() {
            pack.register_thread(self.index, sys::thread_id());
        }
        self.arm_doorbell();
        self.regate();
        self.arm_tick();
        // The state may have changed before the doorbell read was armed.
        self.check_run_state();
        loop {
            self.ring.submit_and_wait(1)?;
            if !self.ring.has_overflow() {
                self.retired.clear();
            }
            self.now = sys::now_millis();
            let mut completions = std::mem::take(&mut self.completions);
            if self.ring.cq_overflowed() {
                self.stats().cq_overflow.add(1);
            }
            self.ring.reap(&mut completions);
            if self.shared.published() > self.snapshot.generation {
                // Before any accept of this batch is routed (its doorbell may come later in
                // the batch than the accept).
                self.install_current();
            }
            for completion in completions.drain(..) {
                self.dispatch(completion);
            }
            self.completions = completions;
            self.serve_starved();
            self.serve_queues();
            self.accept_pending();
            let sq_full = self.ring.take_sq_full();
            if sq_full > 0 {
                self.stats().sq_full.add(sq_full);
            }
            let dropped = self.connlog.flush_due(self.now);
            if dropped > 0 {
                self.stats().connection_log_dropped.add(dropped);
            }
            if self.finished() {
                break;
            }
        }
        let dropped = self.connlog.flush();
        self.stats().connection_log_dropped.add(dropped);
        self.bufs.unregister(&self.ring);
        debug!("worker {}: stopped", self.index);
        Ok(())
    }

    /// Queues a worker-level operation.
    fn push_misc(&mut self, entry: squeue::Entry, kind: Kind, slot: usize) {
        self.misc_inflight += 1;
        // SAFETY: worker-level entries point only at fields of `self` (timers, doorbell value)
        // that live until `run` returns, which is after every completion is in.
        unsafe { self.ring.push(entry.user_data(Token::new(kind, slot, 0).encode())) };
    }

    fn arm_doorbell(&mut self) {
        let fd = self.doorbell.as_raw_fd();
        let buf = (&mut *self.doorbell_value as *mut u64).cast::<u8>();
        self.push_misc(opcode::Read::new(types::Fd(fd), buf, 8).build(), Kind::Doorbell, 0);
    }

    fn dispatch(&mut self, c: Completion) {
        let Some(token) = Token::decode(c.user_data) else {
            error!("worker {}: completion with unknown user_data {:#x}", self.index, c.user_data);
            return;
        };
        match token.kind {
            Kind::Accept => self.on_accept(token.slot as usize, c),
            Kind::AcceptPoll => self.on_accept_poll(token.slot as usize, c),
            Kind::Doorbell => {
                self.misc_inflight -= 1;
                self.check_run_state();
                if !self.cancel_all_sent {
                    self.arm_doorbell();
                }
            }
            Kind::Tick => {
                if !c.more() {
                    self.misc_inflight -= 1;
                }
                if c.result == -libc::ETIME {
                    self.stats().ticks.add(1);
                    if self.stall_when.as_ref().is_some_and(|path| path.exists()) {
                        log::warn!("worker {}: stalled on purpose ({STALL_ENV}); it never comes back", self.index);
                        loop {
                            std::thread::park();
                        }
                    }
                    self.close_overdue();
                    if self.now.saturating_sub(self.bytes_reported_at) >= BYTES_REPORT_MS {
                        self.bytes_reported_at = self.now;
                        self.conns.iter_mut().for_each(|(_, entry)| entry.report_bytes());
                    }
                }
            }
            Kind::AcceptBackoff => {
                self.misc_inflight -= 1;
                self.gate.backed_off = false;
                self.regate();
            }
            Kind::DrainDeadline => {
                self.misc_inflight -= 1;
                if c.result == -libc::ETIME {
                    self.close_all("drain deadline");
                }
            }
            Kind::AcceptCancel | Kind::CancelAll | Kind::TickCancel => self.misc_inflight -= 1,
            _ => self.on_conn_completion(token, c),
        }
    }

    /// Acts on what the control side asked for.
    fn check_run_state(&mut self) {
        // A reload first: it brings a snapshot of a new layout and the listeners that go
        // with it. Later snapshots of that layout (health changes) are installed as usual.
        self.take_changes();
        self.answer_requests();
        self.install_current();
        self.queue_work_all();
        self.serve_queues();
        self.follow_spread();
        match self.shared.run_state() {
            RunState::Running => {}
            RunState::Draining => self.start_drain(),
            RunState::Closing => {
                self.start_drain();
                self.close_all("second stop signal");
            }
        }
    }

    /// Installs the snapshot published last, if it is newer and of this worker's layout (one of
    /// a new layout comes with its reload, through the mailbox).
    fn install_current(&mut self) {
        let current = self.shared.snapshot();
        if current.layout == self.snapshot.layout && current.generation > self.snapshot.generation {
            self.install(current);
        }
    }

    /// Takes a new snapshot into use: pools that changed get fresh balancing state, and
    /// with `on_down = "close"` the connections of backends marked down since they connected
    /// are cut.
    fn install(&mut self, snapshot: Arc<Snapshot>) {
        let old = std::mem::replace(&mut self.snapshot, snapshot);
        for p in 0..self.snapshot.pools.len() {
            let (before, after) = (&old.pools[p], &self.snapshot.pools[p]);
            if Arc::ptr_eq(before, after) {
                continue;
            }
            self.pickers[p] = Picker::new(after, picker_seed(self.index, p));
            if after.settings.on_down == OnDown::Close && before.downs != after.downs {
                self.cut_connections(p);
            }
        }
        self.retired.push(old);
    }

    /// Cuts the connections of pool `pool` whose backend was marked down since they connected.
    fn cut_connections(&mut self, pool: usize) {
        let picked = self.for_each_conn(
            |worker, c| {
                c.pool as usize == pool
                    && !c.conn.is_closing()
                    && c.backend.as_ref().is_some_and(|held| worker.snapshot.pools[pool].cuts(held.index, held.downs))
            },
            |worker, slot| {
                worker.stats().backend_down_closed.add(1);
                worker.step(slot, |conn, ops| conn.cut(ops));
            },
        );
        if picked > 0 {
            info!(
                "worker {}: pool {}: cutting {picked} connections to backends marked down",
                self.index, self.snapshot.pools[pool].settings.name
            );
        }
    }

    /// Picks the connections `pick` accepts, then runs `act` on each (picking first, because
    /// acting may free slots); returns how many were picked.
    fn for_each_conn(&mut self, pick: impl Fn(&Self, &Slot) -> bool, mut act: impl FnMut(&mut Self, usize)) -> usize {
        let mut slots = std::mem::take(&mut self.scratch_slots);
        slots.clear();
        slots.extend(self.conns.iter().filter(|(_, c)| pick(self, c)).map(|(slot, _)| slot));
        for &slot in &slots {
            act(self, slot);
        }
        let picked = slots.len();
        self.scratch_slots = slots;
        picked
    }

    fn start_drain(&mut self) {
        if self.mode == Mode::Draining {
            return;
        }
        self.mode = Mode::Draining;
        // Closing a listener does not end its accepts: cancel them, and close the listener
        // when their last completion arrives (see on_accept).
        self.regate();
        self.gate.close_idle(true);
        if !self.drain_timeout.is_zero() {
            self.push_misc(opcode::Timeout::new(&self.timers.drain).build(), Kind::DrainDeadline, 0);
        } else {
            self.close_all("drain_timeout 0");
        }
    }

    fn close_all(&mut self, why: &str) {
        if self.closing_all {
            return;
        }
        self.closing_all = true;
        let open = self.conns.len();
        if open > 0 {
            info!("worker {}: closing {open} connections ({why})", self.index);
        }
        self.for_each_conn(
            |_, c| !c.conn.is_closing(),
            |worker, slot| {
                worker.stats().drain_closed.add(1);
                worker.step(slot, |conn, ops| conn.close(End::Killed, ops));
            },
        );
    }

    /// What, if anything, is overdue for a connection at `now`.
    fn overdue(&self, entry: &Slot, now: u64) -> Option<Overdue> {
        let conn = &entry.conn;
        let since = |t: u64| now.saturating_sub(t);
        let drain_ms = self.drain_timeout.as_millis() as u64;
        let retired = self.gate.listeners[entry.listener as usize].retired_at;
        if retired.is_some_and(|at| since(at) >= drain_ms) && !conn.is_closing() {
            // Its listener was removed by a reload: drained as on SIGTERM.
            Some(Overdue::Drained)
        } else if conn.is_relaying() {
            entry.idle_timeout_ms.filter(|&limit| since(conn.last_active()) >= limit).map(|_| Overdue::Idle)
        } else if conn.in_handshake() {
            (since(conn.last_active()) >= entry.handshake_timeout_ms).then_some(Overdue::Handshake)
        } else if conn.is_queued() {
            let limit = self.snapshot.pools[entry.pool as usize].settings.queue_timeout.as_millis() as u64;
            entry.queued_since.filter(|&t| since(t) >= limit).map(|_| Overdue::Queue)
        } else {
            None
        }
    }

    /// On the tick: one pass over the connections closes the idle ones, and those whose
    /// handshake or wait in a queue took too long.
    fn close_overdue(&mut self) {
        let now = self.now;
        self.for_each_conn(
            |worker, c| worker.overdue(c, now).is_some(),
            |worker, slot| match worker.overdue(&worker.conns[slot], now) {
                Some(Overdue::Idle) => {
                    worker.stats().idle_closed.add(1);
                    worker.step(slot, |conn, ops| conn.close(End::IdleTimeout, ops));
                }
                Some(Overdue::Drained) => {
                    worker.stats().drain_closed.add(1);
                    worker.step(slot, |conn, ops| conn.close(End::Killed, ops));
                }
                Some(Overdue::Handshake) => {
                    let timeout = worker.conns[slot].handshake_timeout_ms;
                    let why = format_args!("no complete handshake within {timeout} ms");
                    worker.reject_handshake(slot, End::HandshakeTimeout, why);
                }
                Some(Overdue::Queue) => {
                    worker.stats().queue_timeout.add(1);
                    let pool = &worker.snapshot.pools[worker.conns[slot].pool as usize];
                    warn_limited!(
                        worker.refuse_log,
                        worker.now,
                        "worker {}: pool {}: closed a connection that waited {} ms for a backend below max_conns",
                        worker.index,
                        pool.settings.name,
                        pool.settings.queue_timeout.as_millis()
                    );
                    worker.step(slot, |conn, ops| conn.reject(End::QueueTimeout, ops));
                }
                None => {}
            },
        );
    }

    fn finished(&mut self) -> bool {
        if self.mode != Mode::Draining || !self.conns.is_empty() || !self.gate.all_closed() {
            return false;
        }
        if !self.cancel_all_sent {
            // Connections handed over meanwhile are still this worker's to drain; after this,
            // other workers keep what they would hand over.
            let arrived = self.take_handed_over(true);
            if !arrived.is_empty() {
                for conn in arrived {
                    self.adopt(conn);
                }
                return false;
            }
            // Only the worker's own timers and doorbell read are left: cancel them all.
            self.cancel_all_sent = true;
            self.push_misc(opcode::AsyncCancel2::new(types::CancelBuilder::any()).build(), Kind::CancelAll, 0);
            return false;
        }
        self.misc_inflight == 0
    }
}

/// How often open connections add what they relayed to their backends' byte counters.
const BYTES_REPORT_MS: u64 = 1000;

/// Seeds a worker's random choices for one pool, different for every worker and pool.
fn picker_seed(worker: usize, pool: usize) -> u64 {
    (worker as u64) << 32 | pool as u64
}

fn is_resource_shortage(errno: i32) -> bool {
    matches!(errno, libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
}

/// The test hook's variable (see `Worker::stall_when`).
pub const STALL_ENV: &str = "RINGLB_TEST_STALL_FILE";

/// How often the tick looks for connections past a timeout: a tenth of the shortest one,
/// between 10 ms and 1 s, so a timeout fires at most 10% late.
fn tick_interval(shortest: Option<Duration>) -> Duration {
    shortest.map_or(Duration::from_secs(1), |d| (d / 10).clamp(Duration::from_millis(10), Duration::from_secs(1)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tick_interval_bounds() {
        assert_eq!(tick_interval(None), Duration::from_secs(1));
        assert_eq!(tick_interval(Some(Duration::from_secs(3600))), Duration::from_secs(1));
        assert_eq!(tick_interval(Some(Duration::from_millis(500))), Duration::from_millis(50));
        assert_eq!(tick_interval(Some(Duration::from_millis(20))), Duration::from_millis(10));
    }

    #[test]
    fn rate_limit_allows_one_per_interval_and_counts_the_rest() {
        let mut limit = RateLimit::new();
        assert_eq!(limit.allow(5000), Some(0));
        assert_eq!(limit.allow(5001), None);
        assert_eq!(limit.allow(5999), None);
        assert_eq!(limit.allow(6000), Some(2));
    }
}
