//! A worker: one thread, pinned to one core, owning one ring, its own SO_REUSEPORT listeners
//! and a slab of [`Conn`]s. It turns completions into connection events and the connections'
//! [`Op`]s into submissions; this is the only place that touches the ring.
//!
//! Lifecycle: accept until the control side asks to drain (cancel the accepts, then close the
//! listeners), relay until the connections end or the drain deadline closes them, cancel the
//! worker's own timers and doorbell read, and return once every completion is in.

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use io_uring::{opcode, squeue, types};
use log::{debug, error, info, warn};
use slab::Slab;
use socket2::Socket;

use crate::acl::AccessRules;
use crate::admission::{Admission, Step};
use crate::balance::Picker;
use crate::config::OnDown;
use crate::conn::{self, Conn, Dir, End, Event, Notice, Op, Prefix, Relay};
use crate::control::{ControlEvent, RunState, Shared};
use crate::pool::Snapshot;
use crate::proxy_protocol;
use crate::ring::{self, BufRing, Completion, GENERATION_MASK, Kind, Ring, Token};
use crate::stats::WorkerStats;
use crate::sys;

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

/// A listener as a worker sees it.
#[derive(Debug)]
pub struct WorkerListener {
    pub name: String,
    pub socket: Socket,
    /// What a connection must send before it can be routed, and where it goes.
    pub admission: Admission,
    pub access: AccessRules,
    pub idle_timeout: Option<Duration>,
    pub handshake_timeout: Duration,
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
}

struct ListenerState {
    name: String,
    /// `None` once closed.
    socket: Option<Socket>,
    admission: Admission,
    access: AccessRules,
    idle_timeout_ms: Option<u64>,
    handshake_timeout_ms: u64,
    accept_armed: bool,
}

/// Logs a message at most once per interval and counts what it held back.
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
    connect: Vec<types::Timespec>,
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
}

/// Empty pipes a worker keeps for the next transfer; more are closed.
const IDLE_PIPES: usize = 64;

/// How long accepting pauses after the process ran out of file descriptors.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

pub struct Worker {
    // Declared first so it is dropped before the buffer memory the kernel may write to.
    ring: Ring,
    bufs: BufRing,
    index: usize,
    shared: Arc<Shared>,
    doorbell: Arc<OwnedFd>,
    doorbell_value: Box<u64>,
    listeners: Vec<ListenerState>,
    snapshot: Arc<Snapshot>,
    /// Snapshots replaced since the last submission: kept until then because a queued connect
    /// points at their addresses.
    retired: Vec<Arc<Snapshot>>,
    pickers: Vec<Picker>,
    timers: Box<Timers>,
    conns: Slab<Conn>,
    /// Splice mode: pipes held by connections' directions (by index), and empty ones kept for
    /// the next transfer.
    pipes: Slab<sys::Pipe>,
    idle_pipes: Vec<sys::Pipe>,
    relay: Relay,
    pipe_size: u32,
    pipe_limit: usize,
    /// Per pool: connections (slot, generation) waiting for a backend below `max_conns`,
    /// oldest first.
    queues: Vec<VecDeque<(usize, u32)>>,
    next_generation: u32,
    /// Scratch space reused for every connection step and every batch of completions.
    ops: Vec<Op>,
    completions: Vec<Completion>,
    scratch_slots: Vec<usize>,
    /// Directions waiting for a buffer, oldest first, with their connection's generation.
    starved: VecDeque<(usize, u32, Dir)>,
    /// Buffers recycled since starved directions were last served.
    recycled: usize,
    /// Worker-level operations in flight (accepts, doorbell, timers, cancels).
    misc_inflight: u32,
    mode: Mode,
    closing_all: bool,
    /// Accepting is paused after running out of descriptors, until the backoff timer fires.
    accept_backoff_armed: bool,
    /// Accepting is paused because `max_connections` are open.
    at_capacity: bool,
    max_connections: usize,
    cancel_all_sent: bool,
    drain_timeout: Duration,
    now: u64,
    accept_log: RateLimit,
    connect_log: RateLimit,
    /// Bytes a multishot receive takes before it ends (0: no limit, when the kernel has none).
    recv_limit: u32,
    refuse_log: RateLimit,
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
        let queues = (0..snapshot.pools.len()).map(|_| VecDeque::new()).collect();
        let pickers =
            snapshot.pools.iter().enumerate().map(|(p, pool)| Picker::new(pool, picker_seed(plan.index, p))).collect();
        // The tick finds idle connections, slow handshakes and connections queued too long.
        let shortest = plan
            .listeners
            .iter()
            .flat_map(|l| [l.idle_timeout, l.admission.reads_first().then_some(l.handshake_timeout)])
            .chain(snapshot.pools.iter().map(|p| p.limited.then_some(p.queue_timeout)))
            .flatten()
            .min();
        let timers = Box::new(Timers {
            connect: snapshot.pools.iter().map(|p| timespec(p.connect_timeout)).collect(),
            tick: timespec(tick_interval(shortest)),
            backoff: timespec(ACCEPT_BACKOFF),
            drain: timespec(plan.drain_timeout),
        });
        let listeners = plan
            .listeners
            .into_iter()
            .map(|l| ListenerState {
                name: l.name,
                socket: Some(l.socket),
                admission: l.admission,
                access: l.access,
                idle_timeout_ms: l.idle_timeout.map(|d| d.as_millis() as u64),
                handshake_timeout_ms: l.handshake_timeout.as_millis() as u64,
                accept_armed: false,
            })
            .collect();
        Ok(Worker {
            ring,
            bufs,
            index: plan.index,
            shared,
            doorbell: plan.doorbell,
            doorbell_value: Box::new(0),
            listeners,
            snapshot,
            retired: Vec::new(),
            pickers,
            timers,
            queues,
            conns: Slab::with_capacity(1024),
            pipes: Slab::new(),
            idle_pipes: Vec::new(),
            relay: plan.relay,
            pipe_size: plan.pipe_size,
            pipe_limit: plan.pipe_limit,
            next_generation: 0,
            ops: Vec::with_capacity(16),
            completions: Vec::with_capacity(256),
            scratch_slots: Vec::new(),
            starved: VecDeque::new(),
            recycled: 0,
            misc_inflight: 0,
            mode: Mode::Running,
            closing_all: false,
            accept_backoff_armed: false,
            at_capacity: false,
            max_connections: plan.max_connections.max(1),
            cancel_all_sent: false,
            drain_timeout: plan.drain_timeout,
            now: sys::now_millis(),
            accept_log: RateLimit::new(),
            connect_log: RateLimit::new(),
            recv_limit,
            refuse_log: RateLimit::new(),
        })
    }

    fn stats(&self) -> &WorkerStats {
        &self.shared.stats[self.index]
    }

    /// Runs until drained and every completion is in.
    pub fn run(mut self) -> io::Result<()> {
        self.arm_doorbell();
        self.resume_accepts();
        let queues = self.snapshot.pools.iter().any(|p| p.limited);
        if queues || self.listeners.iter().any(|l| l.idle_timeout_ms.is_some() || l.admission.reads_first()) {
            self.push_misc(
                opcode::Timeout::new(&self.timers.tick).count(0).flags(types::TimeoutFlags::MULTISHOT).build(),
                Kind::Tick,
                0,
            );
        }
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
            for completion in completions.drain(..) {
                self.dispatch(completion);
            }
            self.completions = completions;
            self.serve_starved();
            let sq_full = self.ring.take_sq_full();
            if sq_full > 0 {
                self.stats().sq_full.add(sq_full);
            }
            if self.finished() {
                break;
            }
        }
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

    fn arm_accept(&mut self, l: usize) {
        let listener = &mut self.listeners[l];
        let Some(socket) = &listener.socket else { return };
        if listener.accept_armed {
            return;
        }
        listener.accept_armed = true;
        let fd = socket.as_raw_fd();
        self.push_misc(
            opcode::AcceptMulti::new(types::Fd(fd)).flags(libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK).build(),
            Kind::Accept,
            l,
        );
    }

    fn dispatch(&mut self, c: Completion) {
        let Some(token) = Token::decode(c.user_data) else {
            error!("worker {}: completion with unknown user_data {:#x}", self.index, c.user_data);
            return;
        };
        match token.kind {
            Kind::Accept => self.on_accept(token.slot as usize, c),
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
                    self.close_overdue();
                }
            }
            Kind::AcceptBackoff => {
                self.misc_inflight -= 1;
                self.accept_backoff_armed = false;
                self.resume_accepts();
            }
            Kind::DrainDeadline => {
                self.misc_inflight -= 1;
                if c.result == -libc::ETIME {
                    self.close_all("drain deadline");
                }
            }
            Kind::AcceptCancel | Kind::CancelAll => self.misc_inflight -= 1,
            _ => self.on_conn_completion(token, c),
        }
    }

    /// Acts on what the control side asked for.
    fn check_run_state(&mut self) {
        let current = self.shared.snapshot();
        if current.generation != self.snapshot.generation {
            self.install(current);
        }
        for pool in 0..self.queues.len() {
            self.serve_queue(pool);
        }
        match self.shared.run_state() {
            RunState::Running => {}
            RunState::Draining => self.start_drain(),
            RunState::Closing => {
                self.start_drain();
                self.close_all("second stop signal");
            }
        }
    }

    /// Takes a new snapshot into use: pools that changed get fresh balancing state, and
    /// with `on_down = "close"` the connections of backends that went down are cut.
    fn install(&mut self, snapshot: Arc<Snapshot>) {
        let old = std::mem::replace(&mut self.snapshot, snapshot);
        for p in 0..self.snapshot.pools.len() {
            let (before, after) = (&old.pools[p], &self.snapshot.pools[p]);
            if Arc::ptr_eq(before, after) {
                continue;
            }
            self.pickers[p] = Picker::new(after, picker_seed(self.index, p));
            if after.on_down == OnDown::Close {
                let went_down: Vec<bool> = before.up.iter().zip(&after.up).map(|(&b, &a)| b && !a).collect();
                if went_down.iter().any(|&d| d) {
                    self.cut_connections(p, &went_down);
                }
            }
        }
        self.retired.push(old);
    }

    /// Cuts the connections of pool `pool` to backends marked in `went_down`.
    fn cut_connections(&mut self, pool: usize, went_down: &[bool]) {
        let picked = self.for_each_conn(
            |_, c| {
                c.pool as usize == pool
                    && c.holds_slot
                    && !c.is_closing()
                    && went_down.get(c.backend_index as usize).copied().unwrap_or(false)
            },
            |worker, slot| {
                worker.stats().backend_down_closed.add(1);
                worker.step(slot, |conn, ops| conn.cut(ops));
            },
        );
        if picked > 0 {
            info!(
                "worker {}: pool {}: cutting {picked} connections to backends marked down",
                self.index, self.snapshot.pools[pool].name
            );
        }
    }

    /// Picks the connections `pick` accepts, then runs `act` on each (picking first, because
    /// acting may free slots); returns how many were picked.
    fn for_each_conn(&mut self, pick: impl Fn(&Self, &Conn) -> bool, mut act: impl FnMut(&mut Self, usize)) -> usize {
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
        // Closing a listener does not end its multishot accept: cancel it, and close the
        // listener when the accept's last completion arrives (see on_accept).
        self.cancel_accepts();
        for listener in self.listeners.iter_mut().filter(|l| !l.accept_armed) {
            listener.socket = None;
        }
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
            |_, c| !c.is_closing(),
            |worker, slot| {
                worker.stats().drain_closed.add(1);
                worker.step(slot, |conn, ops| conn.close(ops));
            },
        );
    }

    /// What, if anything, is overdue for a connection at `now`.
    fn overdue(&self, conn: &Conn, now: u64) -> Option<Overdue> {
        let listener = &self.listeners[conn.listener as usize];
        let since = |t: u64| now.saturating_sub(t);
        if conn.is_relaying() {
            listener.idle_timeout_ms.filter(|&limit| since(conn.last_active) >= limit).map(|_| Overdue::Idle)
        } else if conn.in_handshake() {
            (since(conn.last_active) >= listener.handshake_timeout_ms).then_some(Overdue::Handshake)
        } else if conn.is_queued() {
            let limit = self.snapshot.pools[conn.pool as usize].queue_timeout.as_millis() as u64;
            conn.queued_since.filter(|&t| since(t) >= limit).map(|_| Overdue::Queue)
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
                    worker.step(slot, |conn, ops| conn.close(ops));
                }
                Some(Overdue::Handshake) => {
                    let timeout = worker.listeners[worker.conns[slot].listener as usize].handshake_timeout_ms;
                    worker.reject_handshake(slot, format_args!("no complete handshake within {timeout} ms"));
                }
                Some(Overdue::Queue) => {
                    worker.stats().queue_timeout.add(1);
                    if let Some(suppressed) = worker.refuse_log.allow(worker.now) {
                        let pool = &worker.snapshot.pools[worker.conns[slot].pool as usize];
                        warn!(
                            "worker {}: pool {}: closed a connection that waited {} ms for a backend below max_conns ({suppressed} more refusals since the last message)",
                            worker.index,
                            pool.name,
                            pool.queue_timeout.as_millis()
                        );
                    }
                    worker.step(slot, |conn, ops| conn.reject(End::QueueTimeout, ops));
                }
                None => {}
            },
        );
    }

    fn finished(&mut self) -> bool {
        if self.mode != Mode::Draining || !self.conns.is_empty() || self.listeners.iter().any(|l| l.socket.is_some()) {
            return false;
        }
        if !self.cancel_all_sent {
            // Only the worker's own timers and doorbell read are left: cancel them all.
            self.cancel_all_sent = true;
            self.push_misc(opcode::AsyncCancel2::new(types::CancelBuilder::any()).build(), Kind::CancelAll, 0);
            return false;
        }
        self.misc_inflight == 0
    }

    fn on_accept(&mut self, l: usize, c: Completion) {
        if !c.more() {
            self.misc_inflight -= 1;
            self.listeners[l].accept_armed = false;
        }
        if c.result >= 0 {
            let fd = c.result;
            if self.mode == Mode::Running {
                self.open_conn(l, fd);
            } else {
                sys::close(fd);
            }
        } else if c.result != -libc::ECANCELED {
            let errno = -c.result;
            self.stats().accept_errors.add(1);
            if let Some(suppressed) = self.accept_log.allow(self.now) {
                warn!(
                    "worker {}: listener {}: accept failed: {} ({suppressed} more since the last message)",
                    self.index,
                    self.listeners[l].name,
                    io::Error::from_raw_os_error(errno)
                );
            }
            if is_resource_shortage(errno) && !c.more() {
                self.pause_accepts();
                return;
            }
        }
        if !self.listeners[l].accept_armed {
            if self.mode == Mode::Running {
                self.resume_accepts();
            } else {
                self.listeners[l].socket = None;
            }
        }
    }

    /// Whether the listeners should have an accept armed now.
    fn accepting(&self) -> bool {
        self.mode == Mode::Running && !self.accept_backoff_armed && !self.at_capacity
    }

    /// Arms every listener's accept if accepting is wanted and it is not armed yet.
    fn resume_accepts(&mut self) {
        if self.accepting() {
            for l in 0..self.listeners.len() {
                self.arm_accept(l);
            }
        }
    }

    /// Cancels every armed accept; new connections wait in the kernel's backlog. The accepts'
    /// last completions come back with ECANCELED and are not re-armed while paused.
    fn cancel_accepts(&mut self) {
        for l in 0..self.listeners.len() {
            if self.listeners[l].accept_armed {
                let token = Token::new(Kind::Accept, l, 0).encode();
                self.push_misc(
                    opcode::AsyncCancel2::new(types::CancelBuilder::user_data(token)).build(),
                    Kind::AcceptCancel,
                    l,
                );
            }
        }
    }

    /// Out of descriptors or memory: accepting more would only fail again (and spin), so stop
    /// every accept for a moment; the backoff timer re-arms them.
    fn pause_accepts(&mut self) {
        if self.accept_backoff_armed || self.mode != Mode::Running {
            return;
        }
        self.accept_backoff_armed = true;
        self.push_misc(opcode::Timeout::new(&self.timers.backoff).build(), Kind::AcceptBackoff, 0);
        self.cancel_accepts();
    }

    fn open_conn(&mut self, l: usize, fd: RawFd) {
        if self.conns.len() >= self.max_connections {
            // Accepted in the same batch as the one that reached the cap, before the cancel
            // took effect: over the limit the operator set, so refuse it.
            sys::close(fd);
            self.stats().over_limit.add(1);
            if let Some(suppressed) = self.accept_log.allow(self.now) {
                warn!(
                    "worker {}: listener {}: {} connections open (max_connections); closed a new one ({suppressed} more since the last message)",
                    self.index,
                    self.listeners[l].name,
                    self.conns.len()
                );
            }
            return;
        }
        let generation = self.next_generation;
        self.next_generation = (self.next_generation + 1) & GENERATION_MASK;
        let slot = self.conns.insert(Conn::new(generation, fd, l as u32, self.relay, self.now));
        let stats = self.stats();
        stats.accepted.add(1);
        stats.active.add(1);
        if self.conns.len() >= self.max_connections && !self.at_capacity {
            self.at_capacity = true;
            self.cancel_accepts();
        }
        // Without a PROXY header the connection's own peer is the client: check it at once.
        // With one, the check waits for the address the header carries (see examine).
        if !self.listeners[l].admission.accept_proxy && !self.admit(slot) {
            return;
        }
        let admission = &self.listeners[l].admission;
        if admission.reads_first() {
            let capacity = admission.read_capacity();
            self.step(slot, |conn, ops| {
                conn.prefix = Some(Prefix::new(capacity));
                conn.read_prefix(ops);
            });
        } else {
            let pool = admission.default_pool.unwrap_or(0);
            self.route(slot, pool, 0);
        }
    }

    /// Applies the listener's access rules and per-source limit to the client's address (the
    /// connection's own peer, or the one its PROXY header carried); rejects the connection and
    /// returns false if it may not go on.
    fn admit(&mut self, slot: usize) -> bool {
        let conn = &mut self.conns[slot];
        let l = conn.listener as usize;
        let limited = self.shared.sources[l].is_some();
        if self.listeners[l].access.is_empty() && !limited {
            return true;
        }
        if conn.client_addr.is_none() {
            conn.client_addr = sys::peer_addr(conn.client).ok();
        }
        let Some(client) = conn.client_addr else { return true };
        let refusal = if !self.listeners[l].access.permits(client.ip()) {
            self.stats().refused_access.add(1);
            Some("not allowed by the listener's allow/deny rules")
        } else if let Some(limit) = &self.shared.sources[l] {
            if limit.try_acquire(client.ip()) {
                conn.source_counted = true;
                None
            } else {
                self.stats().refused_source_limit.add(1);
                Some("over max_conns_per_source")
            }
        } else {
            None
        };
        let Some(why) = refusal else { return true };
        if let Some(suppressed) = self.refuse_log.allow(self.now) {
            warn!(
                "worker {}: listener {}: refused {}: {why} ({suppressed} more refusals since the last message)",
                self.index,
                self.listeners[l].name,
                client.ip()
            );
        }
        self.step(slot, |conn, ops| conn.reject(End::Refused, ops));
        false
    }

    /// The connection's prefix grew: route it if its PROXY header and ClientHello say enough.
    fn examine(&mut self, slot: usize) {
        let conn = &self.conns[slot];
        let l = conn.listener as usize;
        let Some(prefix) = conn.prefix.as_ref() else { return };
        match self.listeners[l].admission.examine(prefix.received(), !prefix.has_room()) {
            Step::NeedMore => self.step(slot, |conn, ops| conn.read_prefix(ops)),
            Step::Reject(reason) => self.reject_handshake(slot, reason),
            Step::Route { pool, skip, carried } => {
                if let Some((client, local)) = carried {
                    let conn = &mut self.conns[slot];
                    conn.client_addr = Some(client);
                    conn.local_addr = Some(local);
                }
                if self.listeners[l].admission.accept_proxy && !self.admit(slot) {
                    return;
                }
                self.route(slot, pool, skip);
            }
        }
    }

    fn reject_handshake(&mut self, slot: usize, why: impl std::fmt::Display) {
        self.stats().handshake_failed.add(1);
        if let Some(suppressed) = self.refuse_log.allow(self.now) {
            let conn = &self.conns[slot];
            let peer = conn.client_addr.or_else(|| sys::peer_addr(conn.client).ok());
            warn!(
                "worker {}: listener {}: closed a connection from {}: {why} ({suppressed} more refusals since the last message)",
                self.index,
                self.listeners[conn.listener as usize].name,
                peer.map_or_else(|| "?".to_string(), |p| p.to_string()),
            );
        }
        self.step(slot, |conn, ops| conn.reject(End::HandshakeFailed, ops));
    }

    /// Sends the connection on to `pool`: sets what goes to the backend first (an outgoing
    /// PROXY header; the client bytes read, less the `skip` bytes of incoming header) and
    /// starts connecting.
    fn route(&mut self, slot: usize, pool_index: usize, skip: usize) {
        let pool = &self.snapshot.pools[pool_index];
        let attempts = pool.usable().len() as u32;
        let send_proxy = pool.send_proxy;
        let needs_client = self.pickers[pool_index].needs_client() || send_proxy.is_some();
        let conn = &mut self.conns[slot];
        if needs_client && conn.client_addr.is_none() {
            conn.client_addr = sys::peer_addr(conn.client).ok();
        }
        if let Some(version) = send_proxy {
            if conn.local_addr.is_none() {
                conn.local_addr = sys::local_addr(conn.client).ok();
            }
            if let (Some(client), Some(local)) = (conn.client_addr, conn.local_addr) {
                let header = proxy_protocol::encode(version, client, local);
                conn.prefix.get_or_insert_with(|| Prefix::new(0)).prepare(skip, header.as_bytes());
            }
        } else if let Some(prefix) = conn.prefix.as_mut() {
            prefix.prepare(skip, &[]);
        }
        self.step(slot, |conn, ops| conn.route(pool_index as u32, attempts, ops));
    }

    fn on_conn_completion(&mut self, token: Token, c: Completion) {
        let slot = token.slot as usize;
        match self.conns.get(slot) {
            Some(conn) if conn.generation == token.generation => {}
            _ => {
                // Cannot happen while slots outlive their operations; recover the buffer anyway.
                error!("worker {}: completion {:?} for a freed connection", self.index, token.kind);
                debug_assert!(false, "completion for a freed slot");
                if let Some(buf) = c.buffer() {
                    self.recycle(buf);
                }
                return;
            }
        }
        let event = match token.kind {
            Kind::Connect => Event::Connected(c.result),
            Kind::ConnectTimeout => Event::ConnectTimerDone,
            Kind::RecvPrefix => Event::PrefixRead { result: c.result },
            Kind::RecvUp | Kind::RecvDown => {
                let dir = if token.kind == Kind::RecvUp { Dir::Up } else { Dir::Down };
                let result = c.result;
                if result == -libc::ENOBUFS {
                    self.stats().buffer_waits.add(1);
                }
                if c.result > 0 {
                    let stats = self.stats();
                    match dir {
                        Dir::Up => stats.bytes_up.add(c.result as u64),
                        Dir::Down => stats.bytes_down.add(c.result as u64),
                    }
                }
                let full = result > 0 && result as u32 == self.bufs.buffer_size();
                Event::Received { dir, result, buf: c.buffer(), full, more: c.more() }
            }
            Kind::SendUp => Event::Sent { dir: Dir::Up, result: c.result },
            Kind::SendDown => Event::Sent { dir: Dir::Down, result: c.result },
            Kind::PollUp => Event::Writable { dir: Dir::Up },
            Kind::PollDown => Event::Writable { dir: Dir::Down },
            Kind::PollInUp => Event::Readable { dir: Dir::Up },
            Kind::PollInDown => Event::Readable { dir: Dir::Down },
            Kind::Cancel => Event::Cancelled,
            Kind::StopRecv => {
                // -ENOENT: the receive had ended on its own meanwhile.
                if c.result == 0 {
                    self.stats().receive_stops.add(1);
                }
                Event::Cancelled
            }
            Kind::Close => Event::Closed,
            _ => unreachable!("worker-level kinds are dispatched before"),
        };
        let now = self.now;
        // Which backend a connect result is about, before the step moves on to the next one.
        let attempt = (token.kind == Kind::Connect).then(|| {
            let conn = &self.conns[slot];
            (conn.pool as usize, conn.backend_index as usize)
        });
        if attempt.is_some() && c.result < 0 {
            // A failed connect gives its backend slot back before the next attempt.
            self.release_slot(slot);
        }
        let mut notice = None;
        self.step(slot, |conn, ops| notice = conn.on_event(event, now, ops));
        match notice {
            Some(Notice::ConnectFailed(errno)) => self.connect_failed(attempt, errno),
            Some(Notice::PrefixGrew) => self.examine(slot),
            Some(Notice::Connected) | None => {}
        }
    }

    fn connect_failed(&mut self, failed: Option<(usize, usize)>, errno: i32) {
        self.stats().connect_failed.add(1);
        if let Some((pool, backend)) = failed {
            self.shared.backends[pool][backend].failures.fetch_add(1, Ordering::Relaxed);
            // A shortage of local ports says nothing about the backend.
            if errno != libc::EADDRNOTAVAIL {
                self.shared.notify(ControlEvent::ConnectFailed { pool, backend, errno });
            }
        }
        let Some(suppressed) = self.connect_log.allow(self.now) else { return };
        let (pool, backend) = match failed {
            Some((pool, backend)) => {
                let pool = &self.snapshot.pools[pool];
                (pool.name.as_str(), pool.backends.get(backend).map(|b| b.name.as_str()))
            }
            None => ("?", None),
        };
        warn!(
            "worker {}: pool {pool}: connect to backend {} failed: {} ({suppressed} more since the last message)",
            self.index,
            backend.unwrap_or("?"),
            io::Error::from_raw_os_error(errno)
        );
    }

    /// Runs one step of a connection and carries out the operations it returns (which may
    /// feed more steps, e.g. when no socket can be opened).
    fn step(&mut self, slot: usize, f: impl FnOnce(&mut Conn, &mut Vec<Op>)) {
        let mut ops = std::mem::take(&mut self.ops);
        f(&mut self.conns[slot], &mut ops);
        let mut i = 0;
        while i < ops.len() {
            let op = ops[i];
            i += 1;
            self.execute(slot, op, &mut ops);
        }
        ops.clear();
        self.ops = ops;
    }

    fn execute(&mut self, slot: usize, op: Op, ops: &mut Vec<Op>) {
        let generation = self.conns[slot].generation;
        let token = |kind: Kind| Token::new(kind, slot, generation).encode();
        let entry = match op {
            Op::Connect => return self.connect(slot, ops),
            Op::ReadPrefix { fd } => {
                let prefix = self.conns[slot].prefix.as_mut().expect("read_prefix sets a prefix");
                let (ptr, len) = prefix.free_space();
                opcode::Recv::new(types::Fd(fd), ptr, len).build().user_data(token(Kind::RecvPrefix))
            }
            Op::SendPrefix { fd } => {
                let pending = self.conns[slot].prefix.as_ref().expect("a prefix to send").pending();
                opcode::Send::new(types::Fd(fd), pending.as_ptr(), pending.len() as u32)
                    .flags(libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT)
                    .build()
                    .user_data(token(Kind::SendUp))
            }
            Op::Recv { dir, fd } => ring::recv_multishot(fd, self.bufs.group(), self.recv_limit)
                .user_data(token(if dir == Dir::Up { Kind::RecvUp } else { Kind::RecvDown })),
            Op::StopRecv { dir } => {
                let recv = token(if dir == Dir::Up { Kind::RecvUp } else { Kind::RecvDown });
                opcode::AsyncCancel2::new(types::CancelBuilder::user_data(recv))
                    .build()
                    .user_data(token(Kind::StopRecv))
            }
            Op::Send { dir, fd, buf, offset, len } => {
                // SAFETY: offset < len <= buffer size, so the pointer stays in buffer `buf`.
                let ptr = unsafe { self.bufs.ptr(buf).add(offset as usize) };
                // MSG_DONTWAIT: a full socket answers EAGAIN (then WaitWritable) instead of
                // the kernel moving the send to an io-wq thread.
                opcode::Send::new(types::Fd(fd), ptr, len - offset)
                    .flags(libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT)
                    .build()
                    .user_data(token(if dir == Dir::Up { Kind::SendUp } else { Kind::SendDown }))
            }
            Op::WaitWritable { dir, fd } => opcode::PollAdd::new(types::Fd(fd), libc::POLLOUT as u32)
                .build()
                .user_data(token(if dir == Dir::Up { Kind::PollUp } else { Kind::PollDown })),
            Op::PollIn { dir, fd } => opcode::PollAdd::new(types::Fd(fd), libc::POLLIN as u32)
                .build()
                .user_data(token(if dir == Dir::Up { Kind::PollInUp } else { Kind::PollInDown })),
            Op::SpliceIn { dir, fd } => {
                let result = match self.pipe_for(slot, dir) {
                    Ok((pipe, size)) => sys::splice(fd, pipe.write.as_raw_fd(), size as usize),
                    Err(errno) => -errno,
                };
                if result == -libc::ENOBUFS {
                    self.stats().pipe_shortages.add(1);
                }
                if result > 0 {
                    let stats = &self.shared.stats[self.index];
                    match dir {
                        Dir::Up => stats.bytes_up.add(result as u64),
                        Dir::Down => stats.bytes_down.add(result as u64),
                    }
                }
                let now = self.now;
                return self.conns[slot].spliced_in(dir, result, now, ops);
            }
            Op::SpliceOut { dir, fd, len } => {
                let result = match self.conns[slot].pipes[dir as usize].and_then(|p| self.pipes.get(p as usize)) {
                    Some(pipe) => sys::splice(pipe.read.as_raw_fd(), fd, len as usize),
                    None => -libc::EBADF,
                };
                let now = self.now;
                return self.conns[slot].spliced_out(dir, result, now, ops);
            }
            Op::ReleasePipe(dir) => {
                if let Some(index) = self.conns[slot].pipes[dir as usize].take() {
                    let pipe = self.pipes.remove(index as usize);
                    if self.idle_pipes.len() < IDLE_PIPES {
                        self.idle_pipes.push(pipe);
                    }
                }
                return;
            }
            Op::Shutdown { fd } => {
                if let Err(e) = sys::shutdown_write(fd) {
                    // The peer is already gone; the other direction will see it.
                    debug!("worker {}: shutdown of fd {fd}: {e}", self.index);
                }
                return;
            }
            Op::Cancel { fd } => opcode::AsyncCancel2::new(types::CancelBuilder::fd(types::Fd(fd)).all())
                .build()
                .user_data(token(Kind::Cancel)),
            Op::Close { fd, reset } => {
                if reset && let Err(e) = sys::set_linger_zero(fd) {
                    debug!("worker {}: SO_LINGER on fd {fd}: {e}", self.index);
                }
                opcode::Close::new(types::Fd(fd)).build().user_data(token(Kind::Close))
            }
            Op::Recycle(buf) => return self.recycle(buf),
            Op::WaitForBuffer(dir) => {
                return self.starved.push_back((slot, generation, dir));
            }
            Op::Free => return self.free(slot),
        };
        // SAFETY: the entry points into a ring buffer held by this connection's direction
        // until the send completes, into the connection's boxed prefix, which it frees only
        // after the operation's completion, or at nothing at all.
        unsafe { self.ring.push(entry) };
    }

    fn connect(&mut self, slot: usize, ops: &mut Vec<Op>) {
        let conn = &mut self.conns[slot];
        let pool_index = conn.pool as usize;
        let pool = &self.snapshot.pools[pool_index];
        let counters = &self.shared.backends[pool_index];
        let picker = &mut self.pickers[pool_index];
        let first = if conn.tried() == 0 {
            picker.pick(pool, counters, conn.client_addr)
        } else {
            picker.next_after(pool, conn.backend_index as usize)
        };
        // Take a slot on the chosen backend or, when it is at max_conns, on the next usable one
        // with room. New connections queue behind ones already waiting.
        let waiting = pool.limited && conn.tried() == 0 && self.shared.queued[pool_index].load(Ordering::Acquire) > 0;
        let mut chosen = None;
        if !waiting {
            let mut candidate = first;
            for _ in 0..pool.usable().len() {
                if counters[candidate].acquire(pool.backends[candidate].max_conns) {
                    chosen = Some(candidate);
                    break;
                }
                candidate = picker.next_after(pool, candidate);
            }
        }
        let Some(backend_index) = chosen else {
            conn.defer_connect();
            conn.queued_since = Some(self.now);
            self.shared.queued[pool_index].fetch_add(1, Ordering::AcqRel);
            self.queues[pool_index].push_back((slot, conn.generation));
            self.stats().queued.add(1);
            return;
        };
        conn.holds_slot = true;
        let backend = &pool.backends[backend_index];
        match sys::backend_socket(&backend.sockaddr) {
            Ok(fd) => {
                counters[backend_index].connections.fetch_add(1, Ordering::Relaxed);
                conn.backend_opened(fd, backend_index as u32);
                let token = |kind| Token::new(kind, slot, conn.generation).encode();
                let connect =
                    opcode::Connect::new(types::Fd(fd), backend.sockaddr.as_ptr().cast(), backend.sockaddr.len())
                        .build()
                        .user_data(token(Kind::Connect));
                let timeout = opcode::LinkTimeout::new(&self.timers.connect[pool_index])
                    .build()
                    .user_data(token(Kind::ConnectTimeout));
                // SAFETY: the address lives in the snapshot, kept (in `retired` if replaced)
                // until this submission, when the kernel copies it; the timespec lives in
                // `self.timers`, likewise copied at submission.
                unsafe { self.ring.push_linked(connect, timeout) };
            }
            Err(e) => {
                if let Some(suppressed) = self.connect_log.allow(self.now) {
                    warn!(
                        "worker {}: cannot open a socket for pool {}: {e} ({suppressed} more since the last message)",
                        self.index, pool.name
                    );
                }
                conn.backend_index = backend_index as u32;
                self.release_slot(slot);
                self.conns[slot].socket_failed(ops);
                if e.raw_os_error().is_some_and(is_resource_shortage) {
                    self.pause_accepts();
                }
            }
        }
    }

    /// The pipe a direction splices through, taken from the idle ones or made, and its size;
    /// ENOBUFS when the worker holds as many as it may.
    fn pipe_for(&mut self, slot: usize, dir: Dir) -> Result<(&sys::Pipe, u32), i32> {
        let size = self.pipe_size;
        let index = match self.conns[slot].pipes[dir as usize] {
            Some(index) => index as usize,
            None if self.pipes.len() >= self.pipe_limit => return Err(libc::ENOBUFS),
            None => {
                let pipe = match self.idle_pipes.pop() {
                    Some(pipe) => pipe,
                    None => sys::pipe(size).map_err(|e| e.raw_os_error().unwrap_or(libc::ENFILE))?,
                };
                let index = self.pipes.insert(pipe);
                self.conns[slot].pipes[dir as usize] = Some(index as u32);
                index
            }
        };
        Ok((&self.pipes[index], size))
    }

    /// Gives back the backend slot a connection holds, and lets a queued connection have it.
    fn release_slot(&mut self, slot: usize) {
        let conn = &mut self.conns[slot];
        if !std::mem::take(&mut conn.holds_slot) {
            return;
        }
        let (pool, backend) = (conn.pool as usize, conn.backend_index as usize);
        self.shared.backends[pool][backend].release();
        if self.snapshot.pools[pool].limited && self.shared.queued[pool].load(Ordering::Acquire) > 0 {
            self.serve_queue(pool);
            // Connections may wait in other workers too.
            self.shared.ring_others(self.index);
        }
    }

    /// Resumes queued connections of `pool`, oldest first, while a backend has room.
    fn serve_queue(&mut self, pool_index: usize) {
        while let Some(&(slot, generation)) = self.queues[pool_index].front() {
            let Some(conn) = self.conns.get_mut(slot).filter(|c| c.generation == generation && c.is_queued()) else {
                self.queues[pool_index].pop_front();
                continue;
            };
            let pool = &self.snapshot.pools[pool_index];
            let counters = &self.shared.backends[pool_index];
            let room = pool.usable().iter().any(|&b| {
                pool.backends[b as usize].max_conns.is_none_or(|max| counters[b as usize].active() < u64::from(max))
            });
            if !room {
                return;
            }
            self.queues[pool_index].pop_front();
            conn.queued_since = None;
            self.shared.queued[pool_index].fetch_sub(1, Ordering::AcqRel);
            self.step(slot, |conn, ops| conn.resume(ops));
        }
    }

    fn recycle(&mut self, buf: u16) {
        self.bufs.recycle(buf);
        self.recycled += 1;
    }

    /// Gives each buffer recycled this round to one starved direction, oldest first.
    fn serve_starved(&mut self) {
        while self.recycled > 0
            && let Some((slot, generation, dir)) = self.starved.pop_front()
        {
            if self.conns.get(slot).is_some_and(|c| c.generation == generation && c.is_starved(dir)) {
                self.recycled -= 1;
                self.step(slot, |conn, ops| conn.buffer_available(dir, ops));
            }
        }
        self.recycled = 0;
    }

    fn free(&mut self, slot: usize) {
        self.release_slot(slot);
        let conn = self.conns.remove(slot);
        let pool = conn.pool as usize;
        // A pipe still held has bytes in it that will never be sent: close it, do not reuse it.
        for index in conn.pipes.into_iter().flatten() {
            drop(self.pipes.remove(index as usize));
        }
        if conn.queued_since.is_some() {
            self.shared.queued[pool].fetch_sub(1, Ordering::AcqRel);
        }
        if conn.source_counted
            && let (Some(limit), Some(client)) = (&self.shared.sources[conn.listener as usize], conn.client_addr)
        {
            limit.release(client.ip());
        }
        if self.at_capacity && self.conns.len() < self.max_connections {
            self.at_capacity = false;
            self.resume_accepts();
        }
        let stats = &self.shared.stats[self.index];
        stats.active.sub(1);
        match conn.end() {
            Some(End::Finished) => stats.finished.add(1),
            Some(End::Reset(_)) => stats.reset.add(1),
            Some(End::NoBackend) => stats.no_backend.add(1),
            Some(End::LocalError) => stats.local_error.add(1),
            Some(End::Closed | End::BackendDown | End::Refused | End::HandshakeFailed | End::QueueTimeout) | None => {}
        }
        debug!(
            "worker {}: connection closed ({:?}), {} bytes up, {} down",
            self.index,
            conn.end(),
            conn.bytes[0],
            conn.bytes[1]
        );
    }
}

/// Seeds a worker's random choices for one pool, different for every worker and pool.
fn picker_seed(worker: usize, pool: usize) -> u64 {
    (worker as u64) << 32 | pool as u64
}

fn is_resource_shortage(errno: i32) -> bool {
    matches!(errno, libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
}

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
