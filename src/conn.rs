//! One proxied connection as a state machine that makes no syscalls.
//!
//! The worker feeds it completions ([`Event`]) and commands (start, close, buffers are back);
//! it answers with the operations to submit ([`Op`]). It counts its own operations in flight,
//! so it is the one that knows when its fds may be closed and its slot freed: only after the
//! last completion (STYLE rule 7). Tests drive it without a ring.
//!
//! Before connecting, a connection may read from the client into its own [`Prefix`] buffer
//! (a PROXY protocol header, a TLS ClientHello) so the worker can route it; those bytes, and an
//! outgoing PROXY header, are sent to the backend before relaying starts. A connection may also
//! wait in a queue for a backend below its connection limit.
//!
//! In splice mode a direction instead waits for its source to be readable (a poll in the ring)
//! and the worker splices source -> pipe -> destination on its own thread, telling the
//! connection each result; the pipe is held only while bytes are in it.
//!
//! Data moves in two [`Dir`]ections, each a loop of "receive into a ring buffer, send it all,
//! receive again": a direction never has more than one buffer, and a slow reader stops its
//! writer's receives (backpressure). End of stream in one direction becomes shutdown(SHUT_WR) on
//! the other side while the reverse direction keeps running; a reset on one side becomes a
//! reset on the other.

use std::collections::VecDeque;
use std::os::fd::RawFd;

use crate::admission::proxy_protocol;

/// A buffer id in the worker's provided-buffer ring.
pub type BufId = u16;

/// One end of a proxied connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Client,
    Backend,
}

/// A direction of data: `Up` reads the client and writes the backend, `Down` the reverse.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dir {
    Up,
    Down,
}

impl Dir {
    pub const BOTH: [Dir; 2] = [Dir::Up, Dir::Down];

    pub fn src(self) -> Side {
        match self {
            Dir::Up => Side::Client,
            Dir::Down => Side::Backend,
        }
    }

    pub fn dst(self) -> Side {
        match self {
            Dir::Up => Side::Backend,
            Dir::Down => Side::Client,
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// An operation for the worker to carry out. All but `Recycle`, `WaitForBuffer` and `Free`
/// become submissions whose completions come back as [`Event`]s.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// Open a socket to the next backend and connect it under a linked timeout. Two
    /// completions (connect, timeout), or [`Conn::socket_failed`] if no socket could be made.
    Connect,
    /// Receive from the client `fd` into the free end of the connection's [`Prefix`].
    ReadPrefix { fd: RawFd },
    /// Send the pending bytes of the connection's [`Prefix`] to the backend `fd`.
    SendPrefix { fd: RawFd },
    /// Receive from `fd` into ring buffers, multishot: completions ([`Event::Received`] with
    /// `more`) keep coming, each with a buffer, until one without `more` ends the receive (end
    /// of stream, an error, no buffer left, a stop, or the kernel's byte limit per arm).
    Recv { dir: Dir, fd: RawFd },
    /// Stop the direction's multishot receive (cancel by its user data): its buffers wait to
    /// be sent. One completion ([`Event::Cancelled`]); the receive ends with -ECANCELED.
    StopRecv { dir: Dir },
    /// The connection is moving to another worker: cancel the direction's wait for its source
    /// (by user data), the multishot receive or, with `poll`, the poll of a spliced direction.
    /// One completion ([`Event::Cancelled`]); the wait ends with -ECANCELED unless bytes came.
    Park { dir: Dir, poll: bool },
    /// Send `len` bytes from offset `offset` of buffer `buf` to `fd`.
    Send { dir: Dir, fd: RawFd, buf: BufId, offset: u32, len: u32 },
    /// Wait until `fd` has bytes to read (splice mode).
    PollIn { dir: Dir, fd: RawFd },
    /// Splice from the source `fd` into the direction's pipe (taking a pipe if it has none),
    /// then call [`Conn::spliced_in`]. Done at once by the worker; no completion.
    SpliceIn { dir: Dir, fd: RawFd },
    /// Splice `len` bytes from the direction's pipe to the destination `fd`, then call
    /// [`Conn::spliced_out`]. No completion.
    SpliceOut { dir: Dir, fd: RawFd, len: u32 },
    /// The direction's pipe is empty: give it back to the worker's pool. No completion.
    ReleasePipe(Dir),
    /// Wait until `fd` can take more bytes. Sends carry MSG_DONTWAIT and come back with EAGAIN
    /// when the socket is full: left to itself, the kernel hands a send that finds the socket
    /// full twice to an io-wq thread, where it blocks.
    WaitWritable { dir: Dir, fd: RawFd },
    /// shutdown(SHUT_WR) on `fd`: the other side finished sending. Done by the worker with a
    /// direct syscall, which never blocks (IORING_OP_SHUTDOWN always runs on an io-wq thread);
    /// no completion.
    Shutdown { fd: RawFd },
    /// Wait until the client `fd` fails or hangs up (a reset, or both directions shut): while
    /// the connection is queued or connecting nothing else reads the client, and a client that
    /// left must not hold its slot until a timeout. One completion ([`Event::ClientGone`]).
    /// io_uring also ends the poll when the client only half-closes (POLLRDHUP): that client
    /// may still wait for an answer, so the watch just ends (as HAProxy without
    /// `option abortonclose`).
    WatchClient { fd: RawFd },
    /// Stop the client watch (cancel by its user data): the backend answered. One completion
    /// ([`Event::Cancelled`]); the watch ends with -ECANCELED.
    StopWatch,
    /// Cancel every operation in flight on `fd`.
    Cancel { fd: RawFd },
    /// Close `fd`; with `reset`, SO_LINGER 0 first so the peer sees RST, not FIN.
    Close { fd: RawFd, reset: bool },
    /// Hand a buffer back to the ring; no completion.
    Recycle(BufId),
    /// The ring had no buffer: call [`Conn::buffer_available`] for `dir` when one returns.
    WaitForBuffer(Dir),
    /// Nothing is in flight and every fd is closed: the slot may be freed.
    Free,
}

impl Op {
    /// How many completions the operation will produce.
    fn completions(self) -> u32 {
        match self {
            Op::Connect => 2,
            Op::ReadPrefix { .. }
            | Op::SendPrefix { .. }
            | Op::Recv { .. }
            | Op::Send { .. }
            | Op::WaitWritable { .. }
            | Op::PollIn { .. }
            | Op::StopRecv { .. }
            | Op::Park { .. }
            | Op::WatchClient { .. }
            | Op::StopWatch
            | Op::Cancel { .. }
            | Op::Close { .. } => 1,
            Op::Shutdown { .. }
            | Op::SpliceIn { .. }
            | Op::SpliceOut { .. }
            | Op::ReleasePipe(_)
            | Op::Recycle(_)
            | Op::WaitForBuffer(_)
            | Op::Free => 0,
        }
    }

    /// The side whose socket the operation works on, if a cancel by fd would reach it.
    fn side(self) -> Option<Side> {
        match self {
            Op::Connect | Op::SendPrefix { .. } => Some(Side::Backend),
            Op::ReadPrefix { .. } | Op::WatchClient { .. } => Some(Side::Client),
            Op::Recv { dir, .. } | Op::PollIn { dir, .. } => Some(dir.src()),
            Op::Send { dir, .. } | Op::WaitWritable { dir, .. } => Some(dir.dst()),
            _ => None,
        }
    }
}

/// A completion for this connection, decoded by the worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// The connect finished: 0 or -errno (-ECANCELED when the linked timeout fired).
    Connected(i32),
    /// The connect's linked timeout finished (its result carries no extra information).
    ConnectTimerDone,
    /// A read into the prefix finished: bytes (0 = the client closed) or -errno.
    PrefixRead { result: i32 },
    /// A receive completed: bytes (0 = end of stream) or -errno, and the buffer if one was used;
    /// `full` says the bytes filled the whole buffer (a bulk transfer); `more` says the
    /// multishot receive goes on (this completion does not end it).
    Received { dir: Dir, result: i32, buf: Option<BufId>, full: bool, more: bool },
    /// A send finished: bytes or -errno.
    Sent { dir: Dir, result: i32 },
    /// The destination of `dir` became writable (or failed; the resend will tell).
    Writable { dir: Dir },
    /// The poll of the source of `dir` finished: readable or failed (the splice will tell), or
    /// -ECANCELED.
    Readable { dir: Dir, result: i32 },
    /// The client watch finished: the poll's events (the client failed or hung up), or
    /// -ECANCELED once stopped.
    ClientGone { result: i32 },
    /// A cancel request finished.
    Cancelled,
    /// A close finished.
    Closed,
}

impl Event {
    /// The side whose socket the finished operation worked on (see [`Op::side`]).
    fn side(self) -> Option<Side> {
        match self {
            Event::Connected(_) => Some(Side::Backend),
            Event::PrefixRead { .. } | Event::ClientGone { .. } => Some(Side::Client),
            Event::Received { dir, .. } | Event::Readable { dir, .. } => Some(dir.src()),
            Event::Sent { dir, .. } | Event::Writable { dir } => Some(dir.dst()),
            _ => None,
        }
    }
}

/// Why a connection ended, for counters and logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    /// Both directions finished with end of stream.
    Finished,
    /// One side reset or failed; the reset was passed on to the other side.
    Reset(Side),
    /// No backend could be connected to.
    NoBackend,
    /// No socket could be opened (local resource shortage).
    LocalError,
    /// Closed by the worker: idle timeout, drain deadline.
    Closed,
    /// Cut because the backend was marked down (`on_down = "close"`).
    BackendDown,
    /// Refused by access rules or a connection limit (reset).
    Refused,
    /// No usable PROXY header or ClientHello, or no route for it, or none in time (reset).
    HandshakeFailed,
    /// Waited for a backend below its `max_conns` longer than `queue_timeout` (reset).
    QueueTimeout,
    /// The client reset or hung up while the connection was queued or connecting.
    ClientGone,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Flow {
    /// Not started (still connecting).
    Idle,
    /// The multishot receive is in flight and nothing waits to be sent.
    Receiving,
    /// The ring was out of buffers; waiting for one.
    Starved,
    /// A send of `buf[offset..len]` is in flight (the multishot receive may be too: what it
    /// brings meanwhile waits in the direction's backlog).
    Sending { buf: BufId, offset: u32, len: u32 },
    /// Up only: the prefix is being sent to the backend, before any receive from the client.
    Prefix,
    /// Splice mode: a poll for the source being readable is in flight.
    Polling,
    /// Splice mode: `queued` bytes are in the pipe (worker splices run; nothing in flight);
    /// `rounds` counts pipe fills since the last poll.
    Piping { queued: u32, rounds: u8 },
    /// Splice mode: the destination was full; a poll for it being writable is in flight.
    PipeBlocked { queued: u32, rounds: u8 },
    /// End of stream was passed on (or the direction failed).
    Done,
    /// The connection is moving to another worker and this direction's wait was stopped:
    /// nothing is in flight; the new worker starts it again.
    Parked,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Just accepted, nothing started.
    New,
    /// Reading from the client into the prefix until the worker can route it.
    Handshake,
    /// Waiting for a backend below its connection limit; nothing in flight.
    Queued,
    Connecting,
    Relaying,
    /// Waiting for cancelled operations to complete, then for the closes.
    Closing {
        reset_client: bool,
        reset_backend: bool,
        closes_sent: bool,
    },
}

/// What a completion meant, when the worker has to act on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Notice {
    Connected,
    /// A connect failed with this errno (ETIMEDOUT when the linked timeout fired); another
    /// backend is tried if any is left.
    ConnectFailed(i32),
    /// More client bytes arrived in the prefix: the worker looks whether it can route now.
    PrefixGrew,
    /// Both directions are parked and nothing is in flight: the worker hands the connection to
    /// another worker, which calls [`Conn::arrive`].
    Movable,
}

/// How a connection moves bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Relay {
    /// Receive into ring buffers and send from them.
    Copy,
    /// Splice through pipes.
    Splice,
    /// Copy, and splice a direction once it moves a whole buffer at once (as HAProxy's
    /// splice-auto): small exchanges stay in the ring, bulk transfers skip the copies.
    Auto,
}

impl Relay {
    pub fn name(self) -> &'static str {
        match self {
            Relay::Copy => "copy",
            Relay::Splice => "splice",
            Relay::Auto => "auto",
        }
    }
}

/// Pipe fills a direction may do per readiness before it polls again, so one busy connection
/// does not keep the worker from the others.
const SPLICE_ROUNDS: u8 = 8;

/// With this many buffers of a direction waiting behind its send, its multishot receive is
/// stopped: the destination is slower than the source, and the bytes stay in the source's
/// socket (TCP flow control) instead of in the worker's shared buffers.
pub const BACKLOG_STOP: usize = 4;

/// Room kept in front of the bytes read from the client, for the outgoing PROXY header.
const HEADROOM: usize = proxy_protocol::V1_MAX;

/// Bytes sent to the backend before relaying: an outgoing PROXY header and the client bytes
/// read while routing. Boxed, so its address stays put while the kernel reads or writes it,
/// and freed once sent.
#[derive(Debug)]
pub struct Prefix {
    data: Box<[u8]>,
    /// Start and end of the bytes still to send (after `prepare`), or of the bytes read.
    start: usize,
    end: usize,
}

impl Prefix {
    /// A prefix that can read `capacity` client bytes.
    pub fn new(capacity: usize) -> Box<Prefix> {
        Box::new(Prefix { data: vec![0; HEADROOM + capacity].into_boxed_slice(), start: HEADROOM, end: HEADROOM })
    }

    /// The client bytes read so far.
    pub fn received(&self) -> &[u8] {
        &self.data[HEADROOM..self.end]
    }

    /// Whether there is room to read more.
    pub fn has_room(&self) -> bool {
        self.end < self.data.len()
    }

    /// Where the next read goes and how much it may take.
    pub fn free_space(&mut self) -> (*mut u8, u32) {
        let len = self.data.len() - self.end;
        // SAFETY: end <= data.len(), so the pointer is in (or one past) the allocation.
        (unsafe { self.data.as_mut_ptr().add(self.end) }, len as u32)
    }

    /// Sets what is sent: `header`, then the client bytes read after the first `skip` (an
    /// incoming PROXY header, which is not passed on).
    pub fn prepare(&mut self, skip: usize, header: &[u8]) {
        let first = (HEADROOM + skip).min(self.end);
        debug_assert!(header.len() <= first);
        self.start = first - header.len();
        self.data[self.start..first].copy_from_slice(header);
    }

    /// The bytes still to send.
    pub fn pending(&self) -> &[u8] {
        &self.data[self.start..self.end]
    }

    fn advance(&mut self, sent: usize) {
        self.start = (self.start + sent).min(self.end);
    }
}

/// The state of one proxied connection.
#[derive(Debug)]
pub struct Conn {
    pub generation: u32,
    pub client: RawFd,
    pub backend: Option<RawFd>,
    /// Index of the listener that accepted the connection.
    pub listener: u32,
    /// The client's address, when something needs it (access rules, Maglev, PROXY headers);
    /// with `accept_proxy`, the address the header carried.
    pub client_addr: Option<std::net::SocketAddr>,
    /// The address the client connected to (for outgoing PROXY headers).
    pub local_addr: Option<std::net::SocketAddr>,
    /// Whether the connection holds a count in its listener's per-source limit.
    pub source_counted: bool,
    /// Whether the connection holds a slot (an active count) on `backend_index`.
    pub holds_slot: bool,
    /// When the connection started waiting in its pool's queue, if it is waiting.
    pub queued_since: Option<u64>,
    /// Index of the pool the connection was routed to.
    pub pool: u32,
    /// Index of the backend (in the pool) being connected to or relayed to.
    pub backend_index: u32,
    /// Backends this connection could not reach, in the order tried: a retry skips them.
    /// Empty (no allocation) unless a connect failed.
    pub failed_backends: Vec<u32>,
    /// How many times that backend had been marked down when the connect started, by the
    /// worker's snapshot ([`crate::pool::Pool::cuts`]).
    pub backend_downs: u32,
    /// Bytes to read before routing and to send before relaying; `None` when there are none.
    pub prefix: Option<Box<Prefix>>,
    relay: Relay,
    /// Whether each direction relays by splice (always in splice mode; in auto mode once it
    /// moved a full buffer at once).
    spliced: [bool; 2],
    /// Splice mode: the worker's pipe each direction holds, by index (worker-managed).
    pub pipes: [Option<u32>; 2],
    /// Connect attempts still allowed, counting the one in flight.
    attempts_left: u32,
    /// Backends a socket was opened for so far.
    tried: u32,
    phase: Phase,
    flows: [Flow; 2],
    /// Whether each direction's multishot receive is in flight (until its last completion).
    armed: [bool; 2],
    /// Whether a stop of each direction's multishot receive was asked for.
    stopping: [bool; 2],
    /// Buffers received but not yet sent, oldest first, behind the send in flight; at most
    /// [`BACKLOG_STOP`] before the receive is stopped, plus what comes before the stop lands.
    backlog: [VecDeque<(BufId, u32)>; 2],
    /// End of stream seen while bytes were still to be sent: shut down once they are.
    eof: [bool; 2],
    inflight: u32,
    /// Whether the connection is on its way to another worker (its waits being stopped).
    moving: bool,
    /// Whether the client watch is in flight (see [`Op::WatchClient`]).
    watching: bool,
    /// Operations in flight on each side's socket (indexed by `Side as usize`): what a close
    /// must cancel first.
    busy: [u16; 2],
    /// Milliseconds (worker clock) of the last byte moved, or of the accept.
    pub last_active: u64,
    pub bytes: [u64; 2],
    end: Option<End>,
}

impl Conn {
    /// A connection just accepted on `client`, relayed the `relay` way.
    pub fn new(generation: u32, client: RawFd, listener: u32, relay: Relay, now: u64) -> Conn {
        Conn {
            generation,
            client,
            backend: None,
            listener,
            client_addr: None,
            local_addr: None,
            source_counted: false,
            holds_slot: false,
            queued_since: None,
            pool: 0,
            backend_index: 0,
            failed_backends: Vec::new(),
            backend_downs: 0,
            prefix: None,
            relay,
            spliced: [relay == Relay::Splice; 2],
            pipes: [None; 2],
            attempts_left: 1,
            tried: 0,
            phase: Phase::New,
            flows: [Flow::Idle; 2],
            armed: [false; 2],
            stopping: [false; 2],
            backlog: [VecDeque::new(), VecDeque::new()],
            eof: [false; 2],
            inflight: 0,
            moving: false,
            watching: false,
            busy: [0; 2],
            last_active: now,
            bytes: [0; 2],
            end: None,
        }
    }

    /// Why the connection ended, once it is closing.
    pub fn end(&self) -> Option<End> {
        self.end
    }

    pub fn is_relaying(&self) -> bool {
        self.phase == Phase::Relaying
    }

    /// Whether the connection is still reading what routes it.
    pub fn in_handshake(&self) -> bool {
        self.phase == Phase::Handshake
    }

    pub fn is_queued(&self) -> bool {
        self.phase == Phase::Queued
    }

    pub fn is_closing(&self) -> bool {
        matches!(self.phase, Phase::Closing { .. })
    }

    /// Operations in flight for this connection.
    pub fn inflight(&self) -> u32 {
        self.inflight
    }

    pub fn is_moving(&self) -> bool {
        self.moving
    }

    /// Whether the connection can move to another worker now: relaying, every byte received
    /// sent, and each direction only waiting for its source (a multishot receive, or a poll
    /// when spliced, with no pipe held). Other connections are at work and stay; a later pass
    /// finds most of them waiting.
    pub fn can_move(&self) -> bool {
        self.phase == Phase::Relaying
            && !self.moving
            && self.prefix.is_none()
            && self.pipes == [None; 2]
            && Dir::BOTH.iter().all(|dir| {
                let d = dir.index();
                match self.flows[d] {
                    Flow::Receiving => self.armed[d] && !self.stopping[d] && self.backlog[d].is_empty() && !self.eof[d],
                    Flow::Polling => true,
                    _ => false,
                }
            })
    }

    /// Starts moving to another worker: stops both directions' waits. When both are stopped,
    /// an event returns [`Notice::Movable`]; if bytes or an end of stream come first, the move
    /// is given up and the connection relays on here. Returns whether the move started.
    pub fn begin_move(&mut self, ops: &mut Vec<Op>) -> bool {
        if !self.can_move() {
            return false;
        }
        self.moving = true;
        for dir in Dir::BOTH {
            let poll = self.flows[dir.index()] == Flow::Polling;
            // A stopped receive is not stopped again for backpressure.
            self.stopping[dir.index()] = !poll;
            self.emit(Op::Park { dir, poll }, ops);
        }
        true
    }

    /// The connection under the generation of its new slot in another worker.
    pub fn with_generation(mut self, generation: u32) -> Conn {
        self.generation = generation;
        self
    }

    /// The connection arrived in another worker's ring (or stays, if it had nowhere to go):
    /// starts both directions' waits again.
    pub fn arrive(&mut self, ops: &mut Vec<Op>) {
        debug_assert!(self.moving && self.inflight == 0 && self.flows == [Flow::Parked; 2]);
        self.resume_parked(ops);
    }

    /// Ends a move (given up, or arrived): waits again where a direction was parked.
    fn resume_parked(&mut self, ops: &mut Vec<Op>) {
        self.moving = false;
        for dir in Dir::BOTH {
            if self.flows[dir.index()] == Flow::Parked {
                self.receive(dir, ops);
            }
        }
    }

    /// While moving: parks a direction whose wait ended by the stop. Anything else (bytes, an
    /// end of stream, an error) gives the move up before the event is handled as usual.
    /// Returns whether the event is settled.
    fn settle_while_moving(&mut self, event: Event, ops: &mut Vec<Op>) -> bool {
        let stopped = -libc::ECANCELED;
        let dir = match event {
            // The watch's end, and the stop of it, may still come after the connect.
            Event::Cancelled | Event::ClientGone { .. } => return true,
            Event::Received { dir, result, buf: None, more: false, .. }
                if result == stopped && self.flows[dir.index()] == Flow::Receiving =>
            {
                dir
            }
            Event::Readable { dir, result } if result == stopped && self.flows[dir.index()] == Flow::Polling => dir,
            _ => {
                self.resume_parked(ops);
                return false;
            }
        };
        self.armed[dir.index()] = false;
        self.flows[dir.index()] = Flow::Parked;
        true
    }

    fn emit(&mut self, op: Op, ops: &mut Vec<Op>) {
        self.inflight += op.completions();
        if let Some(side) = op.side() {
            self.busy[side as usize] += 1;
        }
        ops.push(op);
    }

    /// Reads (more) client bytes into the prefix, before the connection can be routed.
    pub fn read_prefix(&mut self, ops: &mut Vec<Op>) {
        debug_assert!(matches!(self.phase, Phase::New | Phase::Handshake));
        debug_assert!(self.prefix.as_ref().is_some_and(|p| p.has_room()));
        self.phase = Phase::Handshake;
        let fd = self.client;
        self.emit(Op::ReadPrefix { fd }, ops);
    }

    /// Routes the connection to pool `pool`, where `attempts` backends may be tried, and
    /// starts the first connect.
    pub fn route(&mut self, pool: u32, attempts: u32, ops: &mut Vec<Op>) {
        debug_assert!(matches!(self.phase, Phase::New | Phase::Handshake));
        self.pool = pool;
        self.attempts_left = attempts.max(1);
        self.phase = Phase::Connecting;
        self.watching = true;
        let client = self.client;
        self.emit(Op::WatchClient { fd: client }, ops);
        self.emit(Op::Connect, ops);
    }

    /// The worker found no backend with room for the connect it was asked for: nothing was
    /// submitted; the connection waits until [`Conn::resume`].
    pub fn defer_connect(&mut self) {
        self.inflight -= Op::Connect.completions();
        self.busy[Side::Backend as usize] -= 1;
        self.phase = Phase::Queued;
    }

    /// A backend has room again: connect.
    pub fn resume(&mut self, ops: &mut Vec<Op>) {
        if self.phase == Phase::Queued {
            self.phase = Phase::Connecting;
            self.emit(Op::Connect, ops);
        }
    }

    /// The worker opened `fd` for the connect it was asked for, to backend `index`, which had
    /// been marked down `downs` times.
    pub fn backend_opened(&mut self, fd: RawFd, index: u32, downs: u32) {
        self.backend = Some(fd);
        self.backend_index = index;
        self.backend_downs = downs;
        self.tried += 1;
    }

    /// How many backends a connect was started to (0 before the first).
    pub fn tried(&self) -> u32 {
        self.tried
    }

    /// The worker could not open a socket for [`Op::Connect`]: no completion will come.
    pub fn socket_failed(&mut self, ops: &mut Vec<Op>) {
        self.connect_not_started(End::LocalError, ops);
    }

    /// The worker found no backend left to try for [`Op::Connect`] (every usable one failed
    /// this connection): nothing was submitted.
    pub fn no_backend_left(&mut self, ops: &mut Vec<Op>) {
        self.connect_not_started(End::NoBackend, ops);
    }

    fn connect_not_started(&mut self, end: End, ops: &mut Vec<Op>) {
        self.inflight -= Op::Connect.completions();
        self.busy[Side::Backend as usize] -= 1;
        self.begin_close(end, false, false, ops);
    }

    /// A queued connection can reach no backend any more (every usable one failed it).
    pub fn give_up_waiting(&mut self, ops: &mut Vec<Op>) {
        debug_assert!(self.is_queued());
        self.begin_close(End::NoBackend, false, false, ops);
    }

    /// Closes the connection from the worker's side (idle timeout, drain deadline): FIN both ways.
    pub fn close(&mut self, ops: &mut Vec<Op>) {
        self.begin_close(End::Closed, false, false, ops);
    }

    /// Cuts the connection because its backend was marked down: both sides get a reset, so
    /// the client knows at once that the session is gone (a database client then reconnects
    /// and lands on a healthy backend).
    pub fn cut(&mut self, ops: &mut Vec<Op>) {
        self.begin_close(End::BackendDown, true, true, ops);
    }

    /// Ends the connection for `end` (refused, handshake failed, queue timeout) with a reset
    /// to the client, before any backend saw it.
    pub fn reject(&mut self, end: End, ops: &mut Vec<Op>) {
        self.begin_close(end, true, false, ops);
    }

    /// A buffer came back to the ring; a starved direction may receive again.
    pub fn buffer_available(&mut self, dir: Dir, ops: &mut Vec<Op>) {
        if self.phase == Phase::Relaying && self.flows[dir.index()] == Flow::Starved {
            self.receive(dir, ops);
        }
    }

    /// Whether `dir` waits for a buffer.
    pub fn is_starved(&self, dir: Dir) -> bool {
        self.flows[dir.index()] == Flow::Starved
    }

    fn fd(&self, side: Side) -> Option<RawFd> {
        match side {
            Side::Client => Some(self.client),
            Side::Backend => self.backend,
        }
    }

    fn receive(&mut self, dir: Dir, ops: &mut Vec<Op>) {
        match self.fd(dir.src()) {
            Some(fd) if self.spliced[dir.index()] => self.poll_source(dir, fd, ops),
            Some(fd) => self.receive_copying(dir, fd, ops),
            None => debug_assert!(false, "receive without a socket"),
        }
    }

    /// Splice mode: waits for the source `fd` to have bytes.
    fn poll_source(&mut self, dir: Dir, fd: RawFd, ops: &mut Vec<Op>) {
        self.flows[dir.index()] = Flow::Polling;
        self.emit(Op::PollIn { dir, fd }, ops);
    }

    /// Arms the direction's multishot receive into ring buffers.
    fn receive_copying(&mut self, dir: Dir, fd: RawFd, ops: &mut Vec<Op>) {
        self.flows[dir.index()] = Flow::Receiving;
        self.armed[dir.index()] = true;
        self.stopping[dir.index()] = false;
        self.emit(Op::Recv { dir, fd }, ops);
    }

    /// The worker spliced from the source into the pipe: bytes, 0 (end of stream) or -errno
    /// (-EAGAIN: nothing to read after all; -ENOBUFS: the worker has no pipe to spare, so this
    /// round goes by copy; -EMFILE/-ENFILE: no pipe could be made).
    pub fn spliced_in(&mut self, dir: Dir, result: i32, now: u64, ops: &mut Vec<Op>) {
        let Flow::Piping { rounds, .. } = self.flows[dir.index()] else { return };
        let (Some(src), Some(dst)) = (self.fd(dir.src()), self.fd(dir.dst())) else { return };
        match result {
            n if n > 0 => {
                self.last_active = now;
                self.bytes[dir.index()] += n as u64;
                self.flows[dir.index()] = Flow::Piping { queued: n as u32, rounds };
                ops.push(Op::SpliceOut { dir, fd: dst, len: n as u32 });
            }
            0 => {
                ops.push(Op::ReleasePipe(dir));
                self.finish(dir, ops);
            }
            e if -e == libc::EAGAIN || -e == libc::EINTR => {
                ops.push(Op::ReleasePipe(dir));
                self.poll_source(dir, src, ops);
            }
            e if -e == libc::ENOBUFS => {
                // No pipe to spare: move what is waiting through ring buffers instead (the
                // receive is stopped after its first bytes); the next round tries a pipe again.
                self.receive_copying(dir, src, ops);
            }
            e if -e == libc::EMFILE || -e == libc::ENFILE || -e == libc::ENOMEM => {
                self.flows[dir.index()] = Flow::Done;
                self.begin_close(End::LocalError, false, false, ops);
            }
            _ => {
                ops.push(Op::ReleasePipe(dir));
                self.flows[dir.index()] = Flow::Done;
                self.reset_from(dir.src(), ops);
            }
        }
    }

    /// The worker spliced from the pipe to the destination: bytes or -errno.
    pub fn spliced_out(&mut self, dir: Dir, result: i32, now: u64, ops: &mut Vec<Op>) {
        let Flow::Piping { queued, rounds } = self.flows[dir.index()] else { return };
        let (Some(src), Some(dst)) = (self.fd(dir.src()), self.fd(dir.dst())) else { return };
        match result {
            n if n > 0 => {
                self.last_active = now;
                let left = queued.saturating_sub(n as u32);
                if left > 0 {
                    self.flows[dir.index()] = Flow::Piping { queued: left, rounds };
                    ops.push(Op::SpliceOut { dir, fd: dst, len: left });
                } else if rounds + 1 >= SPLICE_ROUNDS {
                    // Enough for one turn: let the ring say when there is more.
                    ops.push(Op::ReleasePipe(dir));
                    self.poll_source(dir, src, ops);
                } else {
                    self.flows[dir.index()] = Flow::Piping { queued: 0, rounds: rounds + 1 };
                    ops.push(Op::SpliceIn { dir, fd: src });
                }
            }
            e if -e == libc::EAGAIN => {
                self.flows[dir.index()] = Flow::PipeBlocked { queued, rounds };
                self.emit(Op::WaitWritable { dir, fd: dst }, ops);
            }
            e if -e == libc::EINTR => ops.push(Op::SpliceOut { dir, fd: dst, len: queued }),
            _ => {
                // The destination reset or failed; the bytes left in the pipe go with it.
                self.flows[dir.index()] = Flow::Done;
                self.reset_from(dir.dst(), ops);
            }
        }
    }

    fn send(&mut self, dir: Dir, buf: BufId, offset: u32, len: u32, ops: &mut Vec<Op>) {
        match self.fd(dir.dst()) {
            Some(fd) => {
                self.flows[dir.index()] = Flow::Sending { buf, offset, len };
                self.emit(Op::Send { dir, fd, buf, offset, len }, ops);
            }
            None => debug_assert!(false, "send without a socket"),
        }
    }

    /// Handles one completion. Returns the connect outcome when the event settles an attempt.
    pub fn on_event(&mut self, event: Event, now: u64, ops: &mut Vec<Op>) -> Option<Notice> {
        debug_assert!(self.inflight > 0, "completion with nothing in flight: {event:?}");
        // A multishot receive's completions with `more` leave it in flight.
        if !matches!(event, Event::Received { more: true, .. }) {
            self.inflight = self.inflight.saturating_sub(1);
            if let Some(side) = event.side() {
                self.busy[side as usize] = self.busy[side as usize].saturating_sub(1);
            }
        }
        let settled = self.moving && self.phase == Phase::Relaying && self.settle_while_moving(event, ops);
        let outcome = match self.phase {
            _ if settled => (self.inflight == 0).then_some(Notice::Movable),
            Phase::Closing { .. } => {
                self.settle_while_closing(event, ops);
                None
            }
            Phase::New | Phase::Handshake | Phase::Queued | Phase::Connecting | Phase::Relaying => {
                self.handle(event, now, ops)
            }
        };
        self.advance_close(ops);
        outcome
    }

    fn handle(&mut self, event: Event, now: u64, ops: &mut Vec<Op>) -> Option<Notice> {
        match event {
            Event::Connected(result) => return Some(self.connected(result, now, ops)),
            Event::PrefixRead { result } => {
                if result > 0
                    && let Some(prefix) = self.prefix.as_mut()
                {
                    prefix.end = (prefix.end + result as usize).min(prefix.data.len());
                    return Some(Notice::PrefixGrew);
                }
                if -result == libc::EINTR || -result == libc::EAGAIN {
                    self.read_prefix(ops);
                } else {
                    // The client left (or failed) before it could be routed.
                    self.begin_close(End::HandshakeFailed, result != 0, false, ops);
                }
            }
            Event::ConnectTimerDone | Event::Cancelled | Event::Closed => {}
            Event::ClientGone { result } => {
                self.watching = false;
                let gone = result > 0 && result & (libc::POLLERR | libc::POLLHUP) as i32 != 0;
                if gone && matches!(self.phase, Phase::Queued | Phase::Connecting) {
                    // The client reset or hung up before a backend answered: nothing to relay.
                    self.begin_close(End::ClientGone, false, false, ops);
                }
                // Relaying already (the stop crossed it): the client's receive will tell.
            }
            Event::Received { dir, result, buf, full, more } => {
                if full && self.relay == Relay::Auto {
                    // A bulk transfer: once what was received is sent, splice this direction.
                    self.spliced[dir.index()] = true;
                }
                self.received(dir, result, buf, more, now, ops);
                if self.spliced[dir.index()] {
                    self.stop_receiving(dir, ops);
                }
            }
            Event::Sent { dir, result } => self.sent(dir, result, now, ops),
            Event::Writable { dir } => match self.flows[dir.index()] {
                Flow::Sending { buf, offset, len } => self.send(dir, buf, offset, len, ops),
                Flow::Prefix => self.send_prefix(ops),
                Flow::PipeBlocked { queued, rounds } => {
                    self.flows[dir.index()] = Flow::Piping { queued, rounds };
                    if let Some(fd) = self.fd(dir.dst()) {
                        ops.push(Op::SpliceOut { dir, fd, len: queued });
                    }
                }
                _ => {}
            },
            Event::Readable { dir, result } => {
                if self.flows[dir.index()] == Flow::Polling
                    && let Some(fd) = self.fd(dir.src())
                {
                    if result == -libc::ECANCELED {
                        // The stop of a move that was given up: wait again.
                        self.emit(Op::PollIn { dir, fd }, ops);
                    } else {
                        self.flows[dir.index()] = Flow::Piping { queued: 0, rounds: 0 };
                        ops.push(Op::SpliceIn { dir, fd });
                    }
                }
            }
        }
        None
    }

    fn connected(&mut self, result: i32, now: u64, ops: &mut Vec<Op>) -> Notice {
        debug_assert_eq!(self.phase, Phase::Connecting);
        if result >= 0 {
            self.phase = Phase::Relaying;
            self.last_active = now;
            if self.prefix.as_ref().is_some_and(|p| !p.pending().is_empty()) {
                // The prefix goes first; the client is read only after it.
                self.flows[Dir::Up.index()] = Flow::Prefix;
                self.send_prefix(ops);
            } else {
                self.prefix = None;
                self.receive(Dir::Up, ops);
            }
            self.receive(Dir::Down, ops);
            if self.watching {
                self.emit(Op::StopWatch, ops);
            }
            return Notice::Connected;
        }
        // The linked timeout cancels the connect: report it as a timeout.
        let errno = if -result == libc::ECANCELED { libc::ETIMEDOUT } else { -result };
        if let Some(fd) = self.backend.take() {
            self.emit(Op::Close { fd, reset: false }, ops);
        }
        self.attempts_left -= 1;
        if self.attempts_left > 0 {
            self.emit(Op::Connect, ops);
        } else {
            self.begin_close(End::NoBackend, false, false, ops);
        }
        Notice::ConnectFailed(errno)
    }

    fn send_prefix(&mut self, ops: &mut Vec<Op>) {
        match self.backend {
            Some(fd) => self.emit(Op::SendPrefix { fd }, ops),
            None => debug_assert!(false, "prefix without a backend"),
        }
    }

    fn sent_prefix(&mut self, result: i32, ops: &mut Vec<Op>) {
        if result > 0 {
            let prefix = self.prefix.as_mut().expect("a prefix is being sent");
            prefix.advance(result as usize);
            if prefix.pending().is_empty() {
                self.prefix = None;
                self.receive(Dir::Up, ops);
            } else {
                self.send_prefix(ops);
            }
        } else if -result == libc::EAGAIN
            && let Some(fd) = self.backend
        {
            self.emit(Op::WaitWritable { dir: Dir::Up, fd }, ops);
        } else if -result == libc::EINTR {
            self.send_prefix(ops);
        } else {
            self.flows[Dir::Up.index()] = Flow::Done;
            self.reset_from(Side::Backend, ops);
        }
    }

    fn received(&mut self, dir: Dir, result: i32, buf: Option<BufId>, more: bool, now: u64, ops: &mut Vec<Op>) {
        let d = dir.index();
        debug_assert!(result > 0 || !more, "a receive going on after {result}");
        if !more {
            self.armed[d] = false;
        }
        match (result, buf) {
            (n, Some(buf)) if n > 0 => {
                self.last_active = now;
                self.bytes[d] += n as u64;
                match self.flows[d] {
                    Flow::Receiving => self.send(dir, buf, 0, n as u32, ops),
                    Flow::Sending { .. } => {
                        self.backlog[d].push_back((buf, n as u32));
                        if self.backlog[d].len() >= BACKLOG_STOP {
                            self.stop_receiving(dir, ops);
                        }
                    }
                    _ => {
                        debug_assert!(false, "bytes received in {:?}", self.flows[d]);
                        ops.push(Op::Recycle(buf));
                    }
                }
            }
            (0, buf) => {
                if let Some(buf) = buf {
                    ops.push(Op::Recycle(buf));
                }
                if matches!(self.flows[d], Flow::Sending { .. }) {
                    // Send what came before the end of stream first.
                    self.eof[d] = true;
                } else {
                    self.finish(dir, ops);
                }
            }
            (err, buf) => {
                if let Some(buf) = buf {
                    ops.push(Op::Recycle(buf));
                }
                let idle = self.flows[d] == Flow::Receiving;
                match -err {
                    // While sending, the receive is armed again once the backlog is sent.
                    libc::ENOBUFS if idle => {
                        self.flows[d] = Flow::Starved;
                        ops.push(Op::WaitForBuffer(dir));
                    }
                    libc::ECANCELED | libc::EINTR | libc::EAGAIN if idle => self.receive(dir, ops),
                    libc::ENOBUFS | libc::ECANCELED | libc::EINTR | libc::EAGAIN => {}
                    // The source reset or failed (or a positive count came without a buffer,
                    // which the kernel never does): pass the reset on to the destination.
                    _ => self.reset_from(dir.src(), ops),
                }
            }
        }
    }

    /// Stops the direction's multishot receive, unless it is already ending.
    fn stop_receiving(&mut self, dir: Dir, ops: &mut Vec<Op>) {
        let d = dir.index();
        if self.armed[d] && !self.stopping[d] && !self.is_closing() {
            self.stopping[d] = true;
            self.emit(Op::StopRecv { dir }, ops);
        }
    }

    /// The direction's send finished: send the next buffer, or pass on the end of stream, or
    /// go back to receiving.
    fn next_send(&mut self, dir: Dir, ops: &mut Vec<Op>) {
        let d = dir.index();
        if let Some((buf, len)) = self.backlog[d].pop_front() {
            self.send(dir, buf, 0, len, ops);
        } else if self.eof[d] {
            self.finish(dir, ops);
        } else if self.armed[d] {
            self.flows[d] = Flow::Receiving;
        } else {
            self.receive(dir, ops);
        }
    }

    /// The source of `dir` finished and everything it sent was passed on: shut down the
    /// destination for writing; once both directions are done, close.
    fn finish(&mut self, dir: Dir, ops: &mut Vec<Op>) {
        if let Some(fd) = self.fd(dir.dst()) {
            self.emit(Op::Shutdown { fd }, ops);
        }
        self.flows[dir.index()] = Flow::Done;
        if self.flows.iter().all(|f| *f == Flow::Done) {
            self.begin_close(End::Finished, false, false, ops);
        }
    }

    fn sent(&mut self, dir: Dir, result: i32, now: u64, ops: &mut Vec<Op>) {
        if self.flows[dir.index()] == Flow::Prefix {
            return self.sent_prefix(result, ops);
        }
        let Flow::Sending { buf, offset, len } = self.flows[dir.index()] else {
            debug_assert!(false, "send completion while not sending");
            return;
        };
        if result > 0 {
            self.last_active = now;
            let offset = offset + result as u32;
            if offset < len {
                self.send(dir, buf, offset, len, ops);
            } else {
                ops.push(Op::Recycle(buf));
                self.next_send(dir, ops);
            }
        } else if -result == libc::EAGAIN
            && let Some(fd) = self.fd(dir.dst())
        {
            self.emit(Op::WaitWritable { dir, fd }, ops);
        } else if -result == libc::EINTR {
            self.send(dir, buf, offset, len, ops);
        } else {
            // The destination reset (EPIPE, ECONNRESET) or failed: pass it on to the source.
            ops.push(Op::Recycle(buf));
            self.flows[dir.index()] = Flow::Done;
            self.reset_from(dir.dst(), ops);
        }
    }

    /// `side` reset or failed: close both, resetting the other side so its peer learns of it.
    fn reset_from(&mut self, side: Side, ops: &mut Vec<Op>) {
        let (reset_client, reset_backend) = match side {
            Side::Client => (false, true),
            Side::Backend => (true, false),
        };
        self.begin_close(End::Reset(side), reset_client, reset_backend, ops);
    }

    fn begin_close(&mut self, end: End, reset_client: bool, reset_backend: bool, ops: &mut Vec<Op>) {
        if self.is_closing() {
            return;
        }
        self.end = Some(end);
        self.moving = false;
        self.phase = Phase::Closing { reset_client, reset_backend, closes_sent: false };
        for backlog in &mut self.backlog {
            ops.extend(backlog.drain(..).map(|(buf, _)| Op::Recycle(buf)));
        }
        // Closing an fd does not stop operations on it: cancel them, and close only after
        // their completions are in (see advance_close).
        for side in [Side::Client, Side::Backend] {
            if self.busy[side as usize] > 0
                && let Some(fd) = self.fd(side)
            {
                self.emit(Op::Cancel { fd }, ops);
            }
        }
        self.advance_close(ops);
    }

    /// While closing, completions only give back what they held.
    fn settle_while_closing(&mut self, event: Event, ops: &mut Vec<Op>) {
        match event {
            Event::Received { buf: Some(buf), .. } => ops.push(Op::Recycle(buf)),
            Event::Sent { dir, .. } | Event::Writable { dir } => match self.flows[dir.index()] {
                Flow::Sending { buf, .. } => {
                    ops.push(Op::Recycle(buf));
                    self.flows[dir.index()] = Flow::Done;
                }
                Flow::Prefix | Flow::PipeBlocked { .. } => self.flows[dir.index()] = Flow::Done,
                _ => {}
            },
            Event::Readable { dir, .. } => self.flows[dir.index()] = Flow::Done,
            _ => {}
        }
    }

    /// Once nothing is in flight: close the fds, then (when those closes are in) free the slot.
    fn advance_close(&mut self, ops: &mut Vec<Op>) {
        let Phase::Closing { reset_client, reset_backend, closes_sent } = self.phase else {
            return;
        };
        if self.inflight > 0 {
            return;
        }
        if !closes_sent {
            self.phase = Phase::Closing { reset_client, reset_backend, closes_sent: true };
            let client = self.client;
            self.emit(Op::Close { fd: client, reset: reset_client }, ops);
            if let Some(fd) = self.backend.take() {
                self.emit(Op::Close { fd, reset: reset_backend }, ops);
            }
        } else {
            ops.push(Op::Free);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CLIENT: RawFd = 10;
    const BACKEND: RawFd = 11;
    const BACKEND2: RawFd = 12;

    /// A connection with its ops log, driven like the worker drives it.
    struct Harness {
        conn: Conn,
        ops: Vec<Op>,
        now: u64,
    }

    /// `n` bytes in buffer `buf`; the multishot receive goes on.
    fn data(dir: Dir, n: i32, buf: BufId) -> Event {
        Event::Received { dir, result: n, buf: Some(buf), full: false, more: true }
    }

    /// The multishot receive ends with `result` (0: end of stream).
    fn ended(dir: Dir, result: i32) -> Event {
        Event::Received { dir, result, buf: None, full: false, more: false }
    }

    impl Harness {
        /// A routed connection: its client watched and a connect asked for.
        fn routed(relay: Relay, attempts: u32) -> Harness {
            let mut h = Harness { conn: Conn::new(1, CLIENT, 0, relay, 0), ops: Vec::new(), now: 0 };
            h.conn.route(0, attempts, &mut h.ops);
            assert_eq!(h.take(), vec![Op::WatchClient { fd: CLIENT }, Op::Connect]);
            h
        }

        fn new(attempts: u32) -> Harness {
            let mut h = Harness::routed(Relay::Copy, attempts);
            h.conn.backend_opened(BACKEND, 0, 0);
            h
        }

        /// The client watch's stop and end come in, after the connect succeeded.
        fn watch_stopped(&mut self) {
            assert!(self.event(Event::Cancelled).is_empty());
            assert!(self.event(Event::ClientGone { result: -libc::ECANCELED }).is_empty());
        }

        /// A connection relayed the `relay` way, connected, its first operations taken.
        fn connected(relay: Relay) -> Harness {
            let mut h = Harness::routed(relay, 1);
            h.conn.backend_opened(BACKEND, 0, 0);
            h.event(Event::ConnectTimerDone);
            h.event(Event::Connected(0));
            h.watch_stopped();
            h
        }

        fn relaying() -> Harness {
            let mut h = Harness::new(1);
            h.event(Event::ConnectTimerDone);
            let outcome = h.conn.on_event(Event::Connected(0), h.now, &mut h.ops);
            assert_eq!(outcome, Some(Notice::Connected));
            assert_eq!(
                h.take(),
                vec![Op::Recv { dir: Dir::Up, fd: CLIENT }, Op::Recv { dir: Dir::Down, fd: BACKEND }, Op::StopWatch]
            );
            h.watch_stopped();
            assert!(h.conn.is_relaying());
            h
        }

        fn event(&mut self, event: Event) -> Vec<Op> {
            self.now += 1;
            self.conn.on_event(event, self.now, &mut self.ops);
            self.take()
        }

        fn take(&mut self) -> Vec<Op> {
            std::mem::take(&mut self.ops)
        }

        /// Completes the closes and checks the slot is freed only then.
        fn finish_close(&mut self, closes: usize) {
            for i in 0..closes {
                let ops = self.event(Event::Closed);
                if i + 1 < closes {
                    assert!(ops.is_empty(), "freed before the last close: {ops:?}");
                } else {
                    assert_eq!(ops, vec![Op::Free]);
                }
            }
            assert_eq!(self.conn.inflight(), 0);
        }
    }

    #[test]
    fn relays_and_recycles() {
        let mut h = Harness::relaying();
        let ops = h.event(data(Dir::Up, 100, 3));
        assert_eq!(ops, vec![Op::Send { dir: Dir::Up, fd: BACKEND, buf: 3, offset: 0, len: 100 }]);
        assert_eq!(h.conn.last_active, h.now);
        // A short send resends the rest from the same buffer.
        let ops = h.event(Event::Sent { dir: Dir::Up, result: 60 });
        assert_eq!(ops, vec![Op::Send { dir: Dir::Up, fd: BACKEND, buf: 3, offset: 60, len: 100 }]);
        // Sent: the buffer goes back; the multishot receive is still armed.
        let ops = h.event(Event::Sent { dir: Dir::Up, result: 40 });
        assert_eq!(ops, vec![Op::Recycle(3)]);
        assert_eq!(h.conn.bytes, [100, 0]);
        assert_eq!(h.conn.inflight(), 2, "one receive per direction");
        let ops = h.event(data(Dir::Up, 7, 4));
        assert_eq!(ops, vec![Op::Send { dir: Dir::Up, fd: BACKEND, buf: 4, offset: 0, len: 7 }]);
    }

    #[test]
    fn bytes_received_while_sending_wait_their_turn_and_precede_the_fin() {
        let mut h = Harness::relaying();
        h.event(data(Dir::Up, 10, 1));
        assert!(h.event(data(Dir::Up, 20, 2)).is_empty());
        assert!(h.event(data(Dir::Up, 30, 3)).is_empty());
        // The end of stream waits behind them.
        assert!(h.event(ended(Dir::Up, 0)).is_empty());
        let ops = h.event(Event::Sent { dir: Dir::Up, result: 10 });
        assert_eq!(ops, vec![Op::Recycle(1), Op::Send { dir: Dir::Up, fd: BACKEND, buf: 2, offset: 0, len: 20 }]);
        let ops = h.event(Event::Sent { dir: Dir::Up, result: 20 });
        assert_eq!(ops, vec![Op::Recycle(2), Op::Send { dir: Dir::Up, fd: BACKEND, buf: 3, offset: 0, len: 30 }]);
        let ops = h.event(Event::Sent { dir: Dir::Up, result: 30 });
        assert_eq!(ops, vec![Op::Recycle(3), Op::Shutdown { fd: BACKEND }]);
        assert_eq!(h.conn.bytes, [60, 0]);
    }

    #[test]
    fn a_slow_destination_stops_the_receive_until_the_backlog_is_sent() {
        let mut h = Harness::relaying();
        h.event(data(Dir::Down, 10, 1));
        for buf in 2..BACKLOG_STOP as BufId + 1 {
            assert!(h.event(data(Dir::Down, 1, buf)).is_empty());
        }
        assert_eq!(h.event(data(Dir::Down, 1, 9)), vec![Op::StopRecv { dir: Dir::Down }]);
        // More may land before the stop does; the receive then ends.
        assert!(h.event(data(Dir::Down, 1, 10)).is_empty());
        assert!(h.event(Event::Cancelled).is_empty());
        assert!(h.event(ended(Dir::Down, -libc::ECANCELED)).is_empty());
        let mut sent = vec![1];
        let mut next = h.event(Event::Sent { dir: Dir::Down, result: 10 });
        while let [Op::Recycle(done), Op::Send { buf, .. }] = next[..] {
            assert_eq!(done, *sent.last().unwrap());
            sent.push(buf);
            next = h.event(Event::Sent { dir: Dir::Down, result: 1 });
        }
        assert_eq!(sent, [1, 2, 3, 4, 9, 10], "in the order received");
        // All sent: receive again.
        assert_eq!(next, vec![Op::Recycle(10), Op::Recv { dir: Dir::Down, fd: BACKEND }]);
    }

    #[test]
    fn a_receive_ended_by_its_byte_limit_is_armed_again_after_its_bytes() {
        let mut h = Harness::relaying();
        let last = Event::Received { dir: Dir::Up, result: 100, buf: Some(1), full: false, more: false };
        assert_eq!(h.event(last), vec![Op::Send { dir: Dir::Up, fd: BACKEND, buf: 1, offset: 0, len: 100 }]);
        let ops = h.event(Event::Sent { dir: Dir::Up, result: 100 });
        assert_eq!(ops, vec![Op::Recycle(1), Op::Recv { dir: Dir::Up, fd: CLIENT }]);
        // Out of buffers while sending: armed again once sent, and then starved.
        h.event(data(Dir::Down, 5, 2));
        assert!(h.event(ended(Dir::Down, -libc::ENOBUFS)).is_empty());
        let ops = h.event(Event::Sent { dir: Dir::Down, result: 5 });
        assert_eq!(ops, vec![Op::Recycle(2), Op::Recv { dir: Dir::Down, fd: BACKEND }]);
        assert_eq!(h.event(ended(Dir::Down, -libc::ENOBUFS)), vec![Op::WaitForBuffer(Dir::Down)]);
    }

    #[test]
    fn half_close_keeps_reverse_direction() {
        let mut h = Harness::relaying();
        // Client sends FIN: shut down writing to the backend, keep relaying the other way.
        let ops = h.event(ended(Dir::Up, 0));
        assert_eq!(ops, vec![Op::Shutdown { fd: BACKEND }]);
        let ops = h.event(data(Dir::Down, 5, 1));
        assert_eq!(ops, vec![Op::Send { dir: Dir::Down, fd: CLIENT, buf: 1, offset: 0, len: 5 }]);
        let ops = h.event(Event::Sent { dir: Dir::Down, result: 5 });
        assert_eq!(ops, vec![Op::Recycle(1)]);
        // Backend finishes too: shutdown the client, then close both with FIN.
        let ops = h.event(ended(Dir::Down, 0));
        assert_eq!(
            ops,
            vec![
                Op::Shutdown { fd: CLIENT },
                Op::Close { fd: CLIENT, reset: false },
                Op::Close { fd: BACKEND, reset: false }
            ]
        );
        assert_eq!(h.conn.end(), Some(End::Finished));
        h.finish_close(2);
    }

    #[test]
    fn eof_with_a_buffer_recycles_it() {
        let mut h = Harness::relaying();
        let ops = h.event(Event::Received { dir: Dir::Down, result: 0, buf: Some(9), full: false, more: false });
        assert_eq!(ops, vec![Op::Recycle(9), Op::Shutdown { fd: CLIENT }]);
    }

    #[test]
    fn backend_reset_resets_client_after_cancelling() {
        let mut h = Harness::relaying();
        let ops = h.event(ended(Dir::Down, -libc::ECONNRESET));
        // The client's receive is still in flight: cancel it before closing.
        assert_eq!(ops, vec![Op::Cancel { fd: CLIENT }]);
        assert_eq!(h.conn.end(), Some(End::Reset(Side::Backend)));
        assert!(h.event(Event::Cancelled).is_empty());
        let ops = h.event(ended(Dir::Up, -libc::ECANCELED));
        assert_eq!(ops, vec![Op::Close { fd: CLIENT, reset: true }, Op::Close { fd: BACKEND, reset: false }]);
        h.finish_close(2);
    }

    #[test]
    fn client_reset_resets_backend() {
        let mut h = Harness::relaying();
        let ops = h.event(ended(Dir::Up, -libc::ECONNRESET));
        assert_eq!(ops, vec![Op::Cancel { fd: BACKEND }]);
        h.event(Event::Cancelled);
        let ops = h.event(ended(Dir::Down, -libc::ECANCELED));
        assert_eq!(ops, vec![Op::Close { fd: CLIENT, reset: false }, Op::Close { fd: BACKEND, reset: true }]);
    }

    #[test]
    fn failed_send_resets_the_source_and_returns_the_buffer() {
        let mut h = Harness::relaying();
        h.event(data(Dir::Down, 10, 4));
        let ops = h.event(Event::Sent { dir: Dir::Down, result: -libc::EPIPE });
        // Both receives are still armed.
        assert_eq!(ops, vec![Op::Recycle(4), Op::Cancel { fd: CLIENT }, Op::Cancel { fd: BACKEND }]);
        assert_eq!(h.conn.end(), Some(End::Reset(Side::Client)));
        h.event(Event::Cancelled);
        h.event(Event::Cancelled);
        h.event(ended(Dir::Down, -libc::ECANCELED));
        let ops = h.event(ended(Dir::Up, -libc::ECANCELED));
        assert_eq!(ops, vec![Op::Close { fd: CLIENT, reset: false }, Op::Close { fd: BACKEND, reset: true }]);
    }

    #[test]
    fn buffer_held_by_cancelled_send_is_recycled_on_its_completion() {
        let mut h = Harness::relaying();
        h.event(data(Dir::Up, 10, 2));
        h.event(data(Dir::Up, 10, 3));
        h.conn.close(&mut h.ops);
        // The buffer waiting behind the send goes back at once; the up receive is on the
        // client's socket, the up send and the down receive on the backend's.
        assert_eq!(h.take(), vec![Op::Recycle(3), Op::Cancel { fd: CLIENT }, Op::Cancel { fd: BACKEND }]);
        assert_eq!(h.event(Event::Sent { dir: Dir::Up, result: -libc::ECANCELED }), vec![Op::Recycle(2)]);
        // A receive's bytes that land while closing go back too.
        assert_eq!(h.event(data(Dir::Down, 10, 4)), vec![Op::Recycle(4)]);
        h.event(Event::Cancelled);
        h.event(Event::Cancelled);
        h.event(ended(Dir::Up, -libc::ECANCELED));
        let ops = h.event(ended(Dir::Down, -libc::ECANCELED));
        assert_eq!(ops, vec![Op::Close { fd: CLIENT, reset: false }, Op::Close { fd: BACKEND, reset: false }]);
        h.finish_close(2);
    }

    #[test]
    fn no_buffers_waits_then_resumes() {
        let mut h = Harness::relaying();
        let ops = h.event(ended(Dir::Up, -libc::ENOBUFS));
        assert_eq!(ops, vec![Op::WaitForBuffer(Dir::Up)]);
        assert!(h.conn.is_starved(Dir::Up));
        h.conn.buffer_available(Dir::Up, &mut h.ops);
        assert_eq!(h.take(), vec![Op::Recv { dir: Dir::Up, fd: CLIENT }]);
        // A second notice for a direction no longer starved does nothing.
        h.conn.buffer_available(Dir::Up, &mut h.ops);
        assert!(h.take().is_empty());
    }

    #[test]
    fn starved_connection_closes_without_waiting_for_a_buffer() {
        let mut h = Harness::relaying();
        h.event(ended(Dir::Up, -libc::ENOBUFS));
        h.conn.close(&mut h.ops);
        // The down receive is in flight; the starved up direction has nothing in flight.
        assert_eq!(h.take(), vec![Op::Cancel { fd: BACKEND }]);
        h.event(ended(Dir::Down, -libc::ECANCELED));
        let ops = h.event(Event::Cancelled);
        assert_eq!(ops.len(), 2);
        h.conn.buffer_available(Dir::Up, &mut h.ops);
        assert!(h.take().is_empty(), "no receive after close began");
    }

    #[test]
    fn refused_connect_tries_next_backend() {
        let mut h = Harness::new(2);
        let outcome = h.conn.on_event(Event::Connected(-libc::ECONNREFUSED), 1, &mut h.ops);
        assert_eq!(outcome, Some(Notice::ConnectFailed(libc::ECONNREFUSED)));
        assert_eq!(h.take(), vec![Op::Close { fd: BACKEND, reset: false }, Op::Connect]);
        assert_eq!(h.conn.backend, None);
        h.conn.backend_opened(BACKEND2, 1, 0);
        // Completions of the first attempt's timer and close arrive in any order.
        assert!(h.event(Event::ConnectTimerDone).is_empty());
        assert!(h.event(Event::Closed).is_empty());
        let outcome = h.conn.on_event(Event::Connected(0), 5, &mut h.ops);
        assert_eq!(outcome, Some(Notice::Connected));
        assert_eq!(
            h.take(),
            vec![Op::Recv { dir: Dir::Up, fd: CLIENT }, Op::Recv { dir: Dir::Down, fd: BACKEND2 }, Op::StopWatch]
        );
        assert_eq!(h.conn.backend_index, 1);
    }

    #[test]
    fn timed_out_connect_is_reported_as_timeout() {
        let mut h = Harness::new(2);
        assert!(h.event(Event::ConnectTimerDone).is_empty());
        let outcome = h.conn.on_event(Event::Connected(-libc::ECANCELED), 1, &mut h.ops);
        assert_eq!(outcome, Some(Notice::ConnectFailed(libc::ETIMEDOUT)));
        assert_eq!(h.take(), vec![Op::Close { fd: BACKEND, reset: false }, Op::Connect]);
    }

    #[test]
    fn all_backends_failing_closes_client_once_everything_completed() {
        let mut h = Harness::new(1);
        h.conn.on_event(Event::Connected(-libc::ECONNREFUSED), 1, &mut h.ops);
        // The backend's socket closes; the client's watch is cancelled before the client closes.
        assert_eq!(h.take(), vec![Op::Close { fd: BACKEND, reset: false }, Op::Cancel { fd: CLIENT }]);
        assert_eq!(h.conn.end(), Some(End::NoBackend));
        // The client is closed only after the timer, the backend close and the watch are in.
        assert_eq!(h.conn.inflight(), 4);
        assert!(h.event(Event::ConnectTimerDone).is_empty());
        assert!(h.event(Event::Closed).is_empty());
        assert!(h.event(Event::Cancelled).is_empty());
        let ops = h.event(Event::ClientGone { result: -libc::ECANCELED });
        assert_eq!(ops, vec![Op::Close { fd: CLIENT, reset: false }]);
        h.finish_close(1);
    }

    #[test]
    fn socket_failure_closes_client() {
        let mut h = Harness::routed(Relay::Copy, 3);
        h.conn.socket_failed(&mut h.ops);
        assert_eq!(h.take(), vec![Op::Cancel { fd: CLIENT }], "the watch goes first");
        assert_eq!(h.conn.end(), Some(End::LocalError));
        assert!(h.event(Event::Cancelled).is_empty());
        let ops = h.event(Event::ClientGone { result: -libc::ECANCELED });
        assert_eq!(ops, vec![Op::Close { fd: CLIENT, reset: false }]);
        h.finish_close(1);
    }

    #[test]
    fn close_while_connecting_cancels_connect() {
        let mut h = Harness::new(1);
        h.conn.close(&mut h.ops);
        assert_eq!(h.take(), vec![Op::Cancel { fd: CLIENT }, Op::Cancel { fd: BACKEND }], "the watch and the connect");
        h.event(Event::Cancelled);
        h.event(Event::Cancelled);
        assert!(h.event(Event::ClientGone { result: -libc::ECANCELED }).is_empty());
        assert!(h.event(Event::Connected(-libc::ECANCELED)).is_empty());
        let ops = h.event(Event::ConnectTimerDone);
        assert_eq!(ops, vec![Op::Close { fd: CLIENT, reset: false }, Op::Close { fd: BACKEND, reset: false }]);
        h.finish_close(2);
    }

    #[test]
    fn close_is_idempotent() {
        let mut h = Harness::relaying();
        h.conn.close(&mut h.ops);
        assert_eq!(h.take(), vec![Op::Cancel { fd: CLIENT }, Op::Cancel { fd: BACKEND }]);
        h.conn.close(&mut h.ops);
        assert!(h.take().is_empty());
    }

    #[test]
    fn interrupted_operations_are_retried() {
        let mut h = Harness::relaying();
        assert_eq!(h.event(ended(Dir::Up, -libc::EINTR)), vec![Op::Recv { dir: Dir::Up, fd: CLIENT }]);
        h.event(data(Dir::Up, 7, 0));
        assert_eq!(
            h.event(Event::Sent { dir: Dir::Up, result: -libc::EINTR }),
            vec![Op::Send { dir: Dir::Up, fd: BACKEND, buf: 0, offset: 0, len: 7 }]
        );
    }

    #[test]
    fn handshake_reads_then_prefix_goes_first() {
        let mut h = Harness { conn: Conn::new(1, CLIENT, 0, Relay::Copy, 0), ops: Vec::new(), now: 0 };
        h.conn.prefix = Some(Prefix::new(100));
        h.conn.read_prefix(&mut h.ops);
        assert_eq!(h.take(), vec![Op::ReadPrefix { fd: CLIENT }]);
        assert!(h.conn.in_handshake());
        // 10 bytes arrive; the worker is told to look at them.
        h.now += 1;
        let notice = h.conn.on_event(Event::PrefixRead { result: 10 }, h.now, &mut h.ops);
        assert_eq!(notice, Some(Notice::PrefixGrew));
        assert_eq!(h.conn.prefix.as_ref().unwrap().received().len(), 10);
        // It routes: the first 4 were an incoming header, replaced by a 3-byte outgoing one.
        h.conn.prefix.as_mut().unwrap().prepare(4, b"HDR");
        assert_eq!(h.conn.prefix.as_ref().unwrap().pending().len(), 3 + 6);
        h.conn.route(0, 1, &mut h.ops);
        assert_eq!(h.take(), vec![Op::WatchClient { fd: CLIENT }, Op::Connect]);
        h.conn.backend_opened(BACKEND, 0, 0);
        h.event(Event::ConnectTimerDone);
        // Connected: the prefix goes to the backend before the client is read.
        let ops = h.event(Event::Connected(0));
        assert_eq!(ops, vec![Op::SendPrefix { fd: BACKEND }, Op::Recv { dir: Dir::Down, fd: BACKEND }, Op::StopWatch]);
        h.watch_stopped();
        assert_eq!(h.event(Event::Sent { dir: Dir::Up, result: 5 }), vec![Op::SendPrefix { fd: BACKEND }]);
        assert_eq!(
            h.event(Event::Sent { dir: Dir::Up, result: -libc::EAGAIN }),
            vec![Op::WaitWritable { dir: Dir::Up, fd: BACKEND }]
        );
        assert_eq!(h.event(Event::Writable { dir: Dir::Up }), vec![Op::SendPrefix { fd: BACKEND }]);
        assert_eq!(h.conn.prefix.as_ref().unwrap().pending().len(), 4);
        assert_eq!(h.event(Event::Sent { dir: Dir::Up, result: 4 }), vec![Op::Recv { dir: Dir::Up, fd: CLIENT }]);
        assert!(h.conn.prefix.is_none(), "freed once sent");
    }

    #[test]
    fn client_leaving_during_handshake_ends_it() {
        let mut h = Harness { conn: Conn::new(1, CLIENT, 0, Relay::Copy, 0), ops: Vec::new(), now: 0 };
        h.conn.prefix = Some(Prefix::new(100));
        h.conn.read_prefix(&mut h.ops);
        h.take();
        let ops = h.event(Event::PrefixRead { result: 0 });
        assert_eq!(ops, vec![Op::Close { fd: CLIENT, reset: false }]);
        assert_eq!(h.conn.end(), Some(End::HandshakeFailed));
        h.finish_close(1);
    }

    #[test]
    fn queued_connection_resumes_or_closes_at_once() {
        let mut h = Harness::routed(Relay::Copy, 2);
        h.conn.defer_connect();
        assert!(h.conn.is_queued());
        assert_eq!(h.conn.inflight(), 1, "only the client watch");
        h.conn.resume(&mut h.ops);
        assert_eq!(h.take(), vec![Op::Connect]);
        h.conn.defer_connect();
        // A queue timeout: the watch is cancelled, then the client is reset.
        h.conn.reject(End::QueueTimeout, &mut h.ops);
        assert_eq!(h.take(), vec![Op::Cancel { fd: CLIENT }]);
        h.conn.resume(&mut h.ops);
        assert!(h.take().is_empty(), "no connect after closing began");
        assert!(h.event(Event::Cancelled).is_empty());
        let ops = h.event(Event::ClientGone { result: -libc::ECANCELED });
        assert_eq!(ops, vec![Op::Close { fd: CLIENT, reset: true }]);
        h.finish_close(1);
    }

    #[test]
    fn a_client_that_leaves_while_queued_or_connecting_ends_the_connection() {
        // Queued: the watch fires, nothing else is in flight: the client is closed at once.
        let mut h = Harness::routed(Relay::Copy, 1);
        h.conn.defer_connect();
        let ops = h.event(Event::ClientGone { result: (libc::POLLERR | libc::POLLHUP) as i32 });
        assert_eq!(ops, vec![Op::Close { fd: CLIENT, reset: false }]);
        assert_eq!(h.conn.end(), Some(End::ClientGone));
        h.finish_close(1);
        // Connecting: the connect is cancelled first, then both sockets close.
        let mut h = Harness::new(1);
        let ops = h.event(Event::ClientGone { result: libc::POLLHUP as i32 });
        assert_eq!(ops, vec![Op::Cancel { fd: BACKEND }]);
        assert_eq!(h.conn.end(), Some(End::ClientGone));
        h.event(Event::Cancelled);
        h.event(Event::Connected(-libc::ECANCELED));
        let ops = h.event(Event::ConnectTimerDone);
        assert_eq!(ops, vec![Op::Close { fd: CLIENT, reset: false }, Op::Close { fd: BACKEND, reset: false }]);
        h.finish_close(2);
    }

    #[test]
    fn a_client_that_only_half_closes_while_connecting_is_still_served() {
        let mut h = Harness::new(1);
        assert!(h.event(Event::ClientGone { result: (libc::POLLIN | libc::POLLRDHUP) as i32 }).is_empty());
        h.event(Event::ConnectTimerDone);
        assert_eq!(
            h.event(Event::Connected(0)),
            vec![Op::Recv { dir: Dir::Up, fd: CLIENT }, Op::Recv { dir: Dir::Down, fd: BACKEND }],
            "relays, with no watch left to stop"
        );
    }

    #[test]
    fn a_watch_that_fires_after_the_connect_leaves_the_relay_to_notice() {
        let mut h = Harness::new(1);
        h.event(Event::ConnectTimerDone);
        h.event(Event::Connected(0));
        // The client reset just as the backend answered: the watch's end crosses its stop.
        assert!(h.event(Event::ClientGone { result: libc::POLLERR as i32 }).is_empty());
        assert!(h.event(Event::Cancelled).is_empty());
        assert!(h.conn.is_relaying());
        assert_eq!(
            h.event(ended(Dir::Up, -libc::ECONNRESET)),
            vec![Op::Cancel { fd: BACKEND }],
            "the client's receive tells"
        );
    }

    #[test]
    fn splice_polls_then_pipes_source_to_destination() {
        let mut h = Harness::routed(Relay::Splice, 1);
        h.conn.backend_opened(BACKEND, 0, 0);
        h.event(Event::ConnectTimerDone);
        assert_eq!(
            h.event(Event::Connected(0)),
            vec![Op::PollIn { dir: Dir::Up, fd: CLIENT }, Op::PollIn { dir: Dir::Down, fd: BACKEND }, Op::StopWatch]
        );
        h.watch_stopped();
        assert_eq!(
            h.event(Event::Readable { dir: Dir::Down, result: 1 }),
            vec![Op::SpliceIn { dir: Dir::Down, fd: BACKEND }]
        );
        h.conn.spliced_in(Dir::Down, 5000, 9, &mut h.ops);
        assert_eq!(h.take(), vec![Op::SpliceOut { dir: Dir::Down, fd: CLIENT, len: 5000 }]);
        assert_eq!(h.conn.bytes[1], 5000);
        // The client takes part, then is full: wait for it, then the rest.
        h.conn.spliced_out(Dir::Down, 3000, 10, &mut h.ops);
        assert_eq!(h.take(), vec![Op::SpliceOut { dir: Dir::Down, fd: CLIENT, len: 2000 }]);
        h.conn.spliced_out(Dir::Down, -libc::EAGAIN, 10, &mut h.ops);
        assert_eq!(h.take(), vec![Op::WaitWritable { dir: Dir::Down, fd: CLIENT }]);
        assert_eq!(
            h.event(Event::Writable { dir: Dir::Down }),
            vec![Op::SpliceOut { dir: Dir::Down, fd: CLIENT, len: 2000 }]
        );
        // Pipe empty: read more at once; nothing there: give the pipe back and poll.
        h.conn.spliced_out(Dir::Down, 2000, 11, &mut h.ops);
        assert_eq!(h.take(), vec![Op::SpliceIn { dir: Dir::Down, fd: BACKEND }]);
        h.conn.spliced_in(Dir::Down, -libc::EAGAIN, 12, &mut h.ops);
        assert_eq!(h.take(), vec![Op::ReleasePipe(Dir::Down), Op::PollIn { dir: Dir::Down, fd: BACKEND }]);
        // End of stream: the pipe goes back and the client gets FIN.
        h.event(Event::Readable { dir: Dir::Down, result: 1 });
        h.conn.spliced_in(Dir::Down, 0, 13, &mut h.ops);
        assert_eq!(h.take(), vec![Op::ReleasePipe(Dir::Down), Op::Shutdown { fd: CLIENT }]);
    }

    #[test]
    fn splice_yields_after_a_few_pipe_fills() {
        let mut h = Harness::connected(Relay::Splice);
        h.event(Event::Readable { dir: Dir::Up, result: 1 });
        for _ in 0..SPLICE_ROUNDS - 1 {
            h.conn.spliced_in(Dir::Up, 100, 1, &mut h.ops);
            h.conn.spliced_out(Dir::Up, 100, 1, &mut h.ops);
            assert_eq!(h.take().last(), Some(&Op::SpliceIn { dir: Dir::Up, fd: CLIENT }));
        }
        h.conn.spliced_in(Dir::Up, 100, 1, &mut h.ops);
        h.conn.spliced_out(Dir::Up, 100, 1, &mut h.ops);
        assert_eq!(h.take()[1..], [Op::ReleasePipe(Dir::Up), Op::PollIn { dir: Dir::Up, fd: CLIENT }]);
    }

    #[test]
    fn auto_relay_splices_a_direction_after_a_full_buffer() {
        let mut h = Harness::routed(Relay::Auto, 1);
        h.conn.backend_opened(BACKEND, 0, 0);
        h.event(Event::ConnectTimerDone);
        // Both directions start with the copy relay.
        assert_eq!(
            h.event(Event::Connected(0)),
            vec![Op::Recv { dir: Dir::Up, fd: CLIENT }, Op::Recv { dir: Dir::Down, fd: BACKEND }, Op::StopWatch]
        );
        h.watch_stopped();
        // A small request stays on copy.
        h.event(data(Dir::Up, 100, 1));
        assert_eq!(h.event(Event::Sent { dir: Dir::Up, result: 100 }), vec![Op::Recycle(1)]);
        // A full buffer down stops the receive; once what it brought is sent, the direction
        // splices.
        let full = Event::Received { dir: Dir::Down, result: 32768, buf: Some(2), full: true, more: true };
        assert_eq!(
            h.event(full),
            vec![
                Op::Send { dir: Dir::Down, fd: CLIENT, buf: 2, offset: 0, len: 32768 },
                Op::StopRecv { dir: Dir::Down }
            ]
        );
        assert!(h.event(data(Dir::Down, 500, 3)).is_empty());
        h.event(Event::Cancelled);
        assert!(h.event(ended(Dir::Down, -libc::ECANCELED)).is_empty());
        let ops = h.event(Event::Sent { dir: Dir::Down, result: 32768 });
        assert_eq!(ops, vec![Op::Recycle(2), Op::Send { dir: Dir::Down, fd: CLIENT, buf: 3, offset: 0, len: 500 }]);
        assert_eq!(
            h.event(Event::Sent { dir: Dir::Down, result: 500 }),
            vec![Op::Recycle(3), Op::PollIn { dir: Dir::Down, fd: BACKEND }]
        );
        // No pipe to spare: this round goes through a ring buffer, the next tries a pipe again.
        assert_eq!(
            h.event(Event::Readable { dir: Dir::Down, result: 1 }),
            vec![Op::SpliceIn { dir: Dir::Down, fd: BACKEND }]
        );
        h.conn.spliced_in(Dir::Down, -libc::ENOBUFS, 5, &mut h.ops);
        assert_eq!(h.take(), vec![Op::Recv { dir: Dir::Down, fd: BACKEND }]);
        assert_eq!(
            h.event(data(Dir::Down, 10, 4)),
            vec![Op::Send { dir: Dir::Down, fd: CLIENT, buf: 4, offset: 0, len: 10 }, Op::StopRecv { dir: Dir::Down }]
        );
        h.event(Event::Cancelled);
        h.event(ended(Dir::Down, -libc::ECANCELED));
        assert_eq!(
            h.event(Event::Sent { dir: Dir::Down, result: 10 }),
            vec![Op::Recycle(4), Op::PollIn { dir: Dir::Down, fd: BACKEND }]
        );
    }

    /// Starts a move of an idle relaying connection and checks both waits are stopped.
    fn begin_move(h: &mut Harness) {
        assert!(h.conn.can_move());
        assert!(h.conn.begin_move(&mut h.ops));
        assert_eq!(h.take(), vec![Op::Park { dir: Dir::Up, poll: false }, Op::Park { dir: Dir::Down, poll: false }]);
        assert!(!h.conn.can_move(), "one move at a time");
    }

    #[test]
    fn idle_connection_moves_once_both_waits_are_stopped() {
        let mut h = Harness::relaying();
        begin_move(&mut h);
        assert_eq!(h.conn.on_event(ended(Dir::Up, -libc::ECANCELED), 1, &mut h.ops), None);
        assert_eq!(h.conn.on_event(Event::Cancelled, 1, &mut h.ops), None);
        assert_eq!(h.conn.on_event(Event::Cancelled, 1, &mut h.ops), None);
        assert_eq!(h.conn.on_event(ended(Dir::Down, -libc::ECANCELED), 1, &mut h.ops), Some(Notice::Movable));
        assert!(h.take().is_empty(), "nothing re-armed in the old ring");
        assert_eq!(h.conn.inflight(), 0);
        // The new worker starts both receives, under the new generation.
        h.conn.generation = 7;
        h.conn.arrive(&mut h.ops);
        assert_eq!(h.take(), vec![Op::Recv { dir: Dir::Up, fd: CLIENT }, Op::Recv { dir: Dir::Down, fd: BACKEND }]);
        assert_eq!(h.conn.generation, 7);
        assert!(!h.conn.is_moving());
        h.event(data(Dir::Up, 10, 1));
        assert!(!h.conn.can_move(), "bytes on their way");
        assert_eq!(h.event(Event::Sent { dir: Dir::Up, result: 10 }), vec![Op::Recycle(1)]);
        assert!(h.conn.can_move());
    }

    #[test]
    fn bytes_during_a_move_give_it_up_and_lose_nothing() {
        let mut h = Harness::relaying();
        begin_move(&mut h);
        // Down is parked, then bytes come up before Up's stop lands.
        h.event(Event::Cancelled);
        assert!(h.event(ended(Dir::Down, -libc::ECANCELED)).is_empty());
        let ops = h.event(data(Dir::Up, 10, 3));
        assert_eq!(
            ops,
            vec![
                Op::Recv { dir: Dir::Down, fd: BACKEND },
                Op::Send { dir: Dir::Up, fd: BACKEND, buf: 3, offset: 0, len: 10 }
            ],
            "the parked direction waits again and the bytes go on"
        );
        assert!(!h.conn.is_moving());
        // Up's stop lands while it sends; once sent, Up receives again.
        h.event(Event::Cancelled);
        assert!(h.event(ended(Dir::Up, -libc::ECANCELED)).is_empty());
        assert_eq!(
            h.event(Event::Sent { dir: Dir::Up, result: 10 }),
            vec![Op::Recycle(3), Op::Recv { dir: Dir::Up, fd: CLIENT }]
        );
        assert!(h.conn.can_move());
    }

    #[test]
    fn end_of_stream_during_a_move_is_passed_on() {
        let mut h = Harness::relaying();
        begin_move(&mut h);
        h.event(Event::Cancelled);
        h.event(ended(Dir::Up, -libc::ECANCELED));
        assert_eq!(
            h.event(ended(Dir::Down, 0)),
            vec![Op::Recv { dir: Dir::Up, fd: CLIENT }, Op::Shutdown { fd: CLIENT }],
            "the client is read again and gets the FIN"
        );
        assert!(!h.conn.is_moving() && !h.conn.can_move());
    }

    #[test]
    fn close_during_a_move_closes() {
        let mut h = Harness::relaying();
        begin_move(&mut h);
        h.conn.close(&mut h.ops);
        assert_eq!(h.take(), vec![Op::Cancel { fd: CLIENT }, Op::Cancel { fd: BACKEND }]);
        // Two stops and two cancels by fd complete, and both receives end.
        for event in
            [Event::Cancelled, Event::Cancelled, ended(Dir::Up, -libc::ECANCELED), Event::Cancelled, Event::Cancelled]
        {
            assert!(h.event(event).is_empty());
        }
        assert_eq!(
            h.conn.on_event(ended(Dir::Down, -libc::ECANCELED), 1, &mut h.ops),
            None,
            "a closing connection does not move"
        );
        assert_eq!(h.take(), vec![Op::Close { fd: CLIENT, reset: false }, Op::Close { fd: BACKEND, reset: false }]);
    }

    #[test]
    fn spliced_direction_moves_by_stopping_its_poll() {
        let mut h = Harness::connected(Relay::Splice);
        assert!(h.conn.begin_move(&mut h.ops));
        assert_eq!(h.take(), vec![Op::Park { dir: Dir::Up, poll: true }, Op::Park { dir: Dir::Down, poll: true }]);
        h.event(Event::Cancelled);
        h.event(Event::Cancelled);
        h.event(Event::Readable { dir: Dir::Up, result: -libc::ECANCELED });
        let last = h.conn.on_event(Event::Readable { dir: Dir::Down, result: -libc::ECANCELED }, 1, &mut h.ops);
        assert_eq!(last, Some(Notice::Movable));
        h.conn.arrive(&mut h.ops);
        assert_eq!(h.take(), vec![Op::PollIn { dir: Dir::Up, fd: CLIENT }, Op::PollIn { dir: Dir::Down, fd: BACKEND }]);
    }

    #[test]
    fn busy_connections_do_not_move() {
        let mut h = Harness::relaying();
        h.event(data(Dir::Down, 100, 5));
        assert!(!h.conn.begin_move(&mut h.ops), "a send in flight");
        assert!(h.take().is_empty());
        h.event(Event::Sent { dir: Dir::Down, result: 100 });
        h.event(ended(Dir::Up, 0));
        assert!(!h.conn.can_move(), "half closed");
    }

    #[test]
    fn full_socket_waits_for_writable_then_resends_the_rest() {
        let mut h = Harness::relaying();
        h.event(data(Dir::Down, 100, 5));
        h.event(Event::Sent { dir: Dir::Down, result: 30 });
        assert_eq!(
            h.event(Event::Sent { dir: Dir::Down, result: -libc::EAGAIN }),
            vec![Op::WaitWritable { dir: Dir::Down, fd: CLIENT }]
        );
        assert_eq!(
            h.event(Event::Writable { dir: Dir::Down }),
            vec![Op::Send { dir: Dir::Down, fd: CLIENT, buf: 5, offset: 30, len: 100 }]
        );
    }

    #[test]
    fn close_while_waiting_for_writable_recycles_the_buffer() {
        let mut h = Harness::relaying();
        h.event(data(Dir::Down, 100, 5));
        h.event(Event::Sent { dir: Dir::Down, result: -libc::EAGAIN });
        h.conn.close(&mut h.ops);
        // The up receive and the poll are on the client's socket, the down receive on the
        // backend's.
        assert_eq!(h.take(), vec![Op::Cancel { fd: CLIENT }, Op::Cancel { fd: BACKEND }]);
        assert_eq!(h.event(Event::Writable { dir: Dir::Down }), vec![Op::Recycle(5)]);
        h.event(ended(Dir::Up, -libc::ECANCELED));
        h.event(ended(Dir::Down, -libc::ECANCELED));
        h.event(Event::Cancelled);
        let ops = h.event(Event::Cancelled);
        assert_eq!(ops, vec![Op::Close { fd: CLIENT, reset: false }, Op::Close { fd: BACKEND, reset: false }]);
    }
}

/// A simulated kernel drives a connection with random completions; whatever the order and the
/// results, the connection must keep the rules the worker relies on.
#[cfg(test)]
mod model {
    use std::collections::BTreeSet;

    use proptest::prelude::*;

    use super::*;

    const CLIENT: RawFd = 100;
    const BACKENDS: [RawFd; 3] = [101, 102, 103];

    /// An operation the simulated kernel holds.
    #[derive(Debug, Clone, Copy)]
    enum Pending {
        ReadPrefix,
        SendPrefix(u32),
        Connect(RawFd),
        ConnectTimer,
        Recv(Dir, RawFd),
        StopRecv(Dir),
        Park(Dir),
        Send(Dir, RawFd, BufId, u32),
        Poll(Dir, RawFd),
        PollIn(Dir, RawFd),
        Watch,
        StopWatch,
        Cancel,
        Close,
    }

    /// One choice of the test: which pending operation completes and how.
    #[derive(Debug, Clone, Copy)]
    struct Choice {
        pick: usize,
        outcome: u8,
        size: u16,
    }

    fn choice() -> impl Strategy<Value = Choice> {
        (any::<usize>(), any::<u8>(), 1u16..2000).prop_map(|(pick, outcome, size)| Choice { pick, outcome, size })
    }

    struct Model {
        conn: Conn,
        pending: Vec<Pending>,
        open_fds: BTreeSet<RawFd>,
        closed_fds: BTreeSet<RawFd>,
        held_buffers: BTreeSet<BufId>,
        next_buffer: BufId,
        next_backend: usize,
        attempts: u32,
        freed: bool,
        steps: usize,
        /// The next connect is deferred to the queue (as when every backend is full).
        defer_next: bool,
        queued: bool,
        /// Splice mode: results of the worker's synchronous splices come from here.
        rng: u64,
        /// Bytes in each direction's pipe, as the simulated kernel sees them.
        piped: [u32; 2],
        next_pipe: u32,
        /// Each direction's buffers received and not yet fully sent, oldest first, with the
        /// bytes still to send: sends must go in this order, and only a closing connection
        /// may drop bytes.
        unsent: [std::collections::VecDeque<(BufId, u32)>; 2],
        /// A stop of the direction's receive (or poll) landed: it ends with ECANCELED next.
        stopped: [bool; 2],
        /// Moves to another worker that completed.
        moves: u32,
        /// The stop of the client watch landed: it ends with ECANCELED next.
        watch_stopped: bool,
    }

    impl Model {
        /// `handshake`: the connection reads a prefix before it is routed; `proxy`: a prefix
        /// (PROXY header) is sent to the backend first.
        fn new(attempts: u32, handshake: bool, proxy: bool, defer: bool, relay: Relay, seed: u64) -> Model {
            let mut model = Model {
                conn: Conn::new(1, CLIENT, 0, relay, 0),
                pending: Vec::new(),
                open_fds: BTreeSet::from([CLIENT]),
                closed_fds: BTreeSet::new(),
                held_buffers: BTreeSet::new(),
                next_buffer: 0,
                next_backend: 0,
                attempts: 0,
                freed: false,
                steps: 0,
                defer_next: defer,
                queued: false,
                rng: seed | 1,
                piped: [0; 2],
                next_pipe: 0,
                unsent: Default::default(),
                stopped: [false; 2],
                moves: 0,
                watch_stopped: false,
            };
            let mut ops = Vec::new();
            if handshake {
                model.conn.prefix = Some(Prefix::new(64));
                model.conn.read_prefix(&mut ops);
            } else {
                if proxy {
                    let mut prefix = Prefix::new(0);
                    prefix.prepare(0, b"PROXY UNKNOWN\r\n");
                    model.conn.prefix = Some(prefix);
                }
                model.conn.route(0, attempts, &mut ops);
            }
            model.attempts = attempts;
            model.apply(ops, false);
            model
        }

        fn dir_of(pending: Pending) -> usize {
            match pending {
                Pending::Recv(dir, _) => dir as usize,
                _ => unreachable!(),
            }
        }

        fn random(&mut self) -> u64 {
            self.rng ^= self.rng << 13;
            self.rng ^= self.rng >> 7;
            self.rng ^= self.rng << 17;
            self.rng
        }

        /// What the worker does when the prefix grew: route once 20 bytes are in (or it is
        /// full), else read more.
        fn routed_or_read_more(&mut self) {
            let mut ops = Vec::new();
            let prefix = self.conn.prefix.as_mut().unwrap();
            if prefix.received().len() >= 20 || !prefix.has_room() {
                prefix.prepare(3, b"HDR");
                self.conn.route(0, self.attempts, &mut ops);
            } else {
                self.conn.read_prefix(&mut ops);
            }
            self.apply(ops, false);
        }

        /// Carries out the connection's operations as the worker would.
        fn apply(&mut self, ops: Vec<Op>, socket_fails: bool) {
            let mut queue = std::collections::VecDeque::from(ops);
            while let Some(op) = queue.pop_front() {
                assert!(!self.freed, "operation after Free: {op:?}");
                match op {
                    Op::ReadPrefix { fd } => {
                        assert_eq!(fd, CLIENT);
                        assert!(self.conn.prefix.as_ref().is_some_and(|p| p.has_room()), "read without room");
                        self.pending.push(Pending::ReadPrefix);
                    }
                    Op::SendPrefix { fd } => {
                        assert!(self.open_fds.contains(&fd), "prefix sent on a closed fd");
                        let pending = self.conn.prefix.as_ref().expect("a prefix to send").pending().len();
                        assert!(pending > 0, "empty prefix send");
                        self.pending.push(Pending::SendPrefix(pending as u32));
                    }
                    Op::Connect if self.defer_next => {
                        self.defer_next = false;
                        self.conn.defer_connect();
                        self.queued = true;
                    }
                    Op::Connect => {
                        if socket_fails || self.next_backend == BACKENDS.len() {
                            let mut more = Vec::new();
                            self.conn.socket_failed(&mut more);
                            queue.extend(more);
                        } else {
                            let fd = BACKENDS[self.next_backend];
                            self.next_backend += 1;
                            self.open_fds.insert(fd);
                            self.conn.backend_opened(fd, self.next_backend as u32 - 1, 0);
                            self.pending.push(Pending::Connect(fd));
                            self.pending.push(Pending::ConnectTimer);
                        }
                    }
                    Op::Recv { dir, fd } => {
                        assert!(self.open_fds.contains(&fd), "recv on a closed fd");
                        if dir == Dir::Up {
                            assert!(self.conn.prefix.is_none(), "client read before the prefix was sent");
                        }
                        assert!(
                            !self.pending.iter().any(|p| matches!(*p, Pending::Recv(d, _) if d == dir)),
                            "a second receive armed in one direction"
                        );
                        self.stopped[dir as usize] = false;
                        self.pending.push(Pending::Recv(dir, fd));
                    }
                    Op::StopRecv { dir } => self.pending.push(Pending::StopRecv(dir)),
                    Op::WatchClient { fd } => {
                        assert_eq!(fd, CLIENT);
                        assert!(!self.pending.iter().any(|p| matches!(p, Pending::Watch)), "two client watches");
                        self.watch_stopped = false;
                        self.pending.push(Pending::Watch);
                    }
                    Op::StopWatch => {
                        assert!(self.pending.iter().any(|p| matches!(p, Pending::Watch)), "stop of no watch");
                        self.pending.push(Pending::StopWatch);
                    }
                    Op::Park { dir, poll } => {
                        assert!(self.conn.is_moving(), "park while not moving");
                        let waiting = self.pending.iter().any(|p| match *p {
                            Pending::Recv(d, _) => d == dir && !poll,
                            Pending::PollIn(d, _) => d == dir && poll,
                            _ => false,
                        });
                        assert!(waiting, "park of {dir:?} (poll {poll}) with no such wait: {:?}", self.pending);
                        self.pending.push(Pending::Park(dir));
                    }
                    Op::Send { dir, fd, buf, offset, len } => {
                        assert!(self.open_fds.contains(&fd), "send on a closed fd");
                        assert!(self.held_buffers.contains(&buf), "send from a buffer not held");
                        assert!(offset < len);
                        assert_eq!(
                            self.unsent[dir as usize].front(),
                            Some(&(buf, len - offset)),
                            "not sending the oldest unsent bytes"
                        );
                        self.pending.push(Pending::Send(dir, fd, buf, len - offset));
                    }
                    Op::PollIn { dir, fd } => {
                        assert!(self.open_fds.contains(&fd), "poll on a closed fd");
                        self.stopped[dir as usize] = false;
                        assert!(self.conn.pipes[dir as usize].is_none(), "polling while holding a pipe");
                        self.pending.push(Pending::PollIn(dir, fd));
                    }
                    Op::SpliceIn { dir, fd } => {
                        assert!(self.open_fds.contains(&fd), "splice from a closed fd");
                        assert_eq!(self.piped[dir as usize], 0, "splicing into a pipe that is not empty");
                        if self.conn.pipes[dir as usize].is_none() {
                            self.next_pipe += 1;
                            self.conn.pipes[dir as usize] = Some(self.next_pipe);
                        }
                        let result = match self.random() % 9 {
                            0 => 0,
                            1 => -libc::EAGAIN,
                            2 => -libc::ECONNRESET,
                            3 => -libc::EMFILE,
                            4 => -libc::ENOBUFS,
                            r => (r * 1000) as i32,
                        };
                        if result == -libc::ENOBUFS {
                            // The worker had no pipe to give.
                            self.conn.pipes[dir as usize] = None;
                        }
                        if result > 0 {
                            self.piped[dir as usize] = result as u32;
                        }
                        let mut more = Vec::new();
                        self.conn.spliced_in(dir, result, self.steps as u64, &mut more);
                        queue.extend(more);
                    }
                    Op::SpliceOut { dir, fd, len } => {
                        assert!(self.open_fds.contains(&fd), "splice to a closed fd");
                        assert!(self.conn.pipes[dir as usize].is_some(), "splice out without a pipe");
                        assert_eq!(len, self.piped[dir as usize], "splicing out other than what is in the pipe");
                        let result = match self.random() % 6 {
                            0 => -libc::EAGAIN,
                            1 => -libc::EPIPE,
                            2 => (len / 2).max(1) as i32,
                            _ => len as i32,
                        };
                        if result > 0 {
                            self.piped[dir as usize] -= result as u32;
                        }
                        let mut more = Vec::new();
                        self.conn.spliced_out(dir, result, self.steps as u64, &mut more);
                        queue.extend(more);
                    }
                    Op::ReleasePipe(dir) => {
                        assert!(self.conn.pipes[dir as usize].take().is_some(), "releasing a pipe not held");
                        assert_eq!(self.piped[dir as usize], 0, "released a pipe with bytes in it");
                    }
                    Op::WaitWritable { dir, fd } => {
                        assert!(self.open_fds.contains(&fd), "poll on a closed fd");
                        self.pending.push(Pending::Poll(dir, fd));
                    }
                    Op::Shutdown { fd } => {
                        assert!(self.open_fds.contains(&fd), "shutdown of a closed fd");
                        let dir = if fd == CLIENT { Dir::Down } else { Dir::Up };
                        assert!(self.unsent[dir as usize].is_empty(), "FIN passed on before the bytes");
                    }
                    Op::Cancel { fd } => {
                        // Once closing, every completion below comes back ECANCELED.
                        assert!(self.open_fds.contains(&fd), "cancel on a closed fd");
                        self.pending.push(Pending::Cancel);
                    }
                    Op::Close { fd, .. } => {
                        let in_use = self.pending.iter().any(|p| {
                            matches!(*p, Pending::Connect(f) | Pending::Recv(_, f) | Pending::Send(_, f, ..)
                                | Pending::Poll(_, f) | Pending::PollIn(_, f) if f == fd)
                                || (matches!(p, Pending::Watch | Pending::ReadPrefix) && fd == CLIENT)
                        });
                        assert!(!in_use, "close of fd {fd} with an operation in flight on it");
                        assert!(self.open_fds.remove(&fd), "close of fd {fd} twice");
                        self.closed_fds.insert(fd);
                        self.pending.push(Pending::Close);
                    }
                    Op::Recycle(buf) => {
                        assert!(self.held_buffers.remove(&buf), "buffer {buf} recycled twice");
                        let sent = self.unsent.iter().position(|u| u.front() == Some(&(buf, 0)));
                        if let Some(dir) = sent {
                            self.unsent[dir].pop_front();
                        } else {
                            assert!(self.conn.is_closing(), "bytes of buffer {buf} dropped while relaying");
                            for unsent in &mut self.unsent {
                                unsent.retain(|(b, _)| *b != buf);
                            }
                        }
                    }
                    Op::WaitForBuffer(dir) => {
                        // The worker calls back when a buffer returns: do it at once.
                        let mut more = Vec::new();
                        self.conn.buffer_available(dir, &mut more);
                        queue.extend(more);
                    }
                    Op::Free => {
                        assert!(self.pending.is_empty(), "freed with operations in flight: {:?}", self.pending);
                        assert!(self.open_fds.is_empty(), "freed with fds open: {:?}", self.open_fds);
                        assert!(self.held_buffers.is_empty(), "freed holding buffers {:?}", self.held_buffers);
                        self.freed = true;
                    }
                }
            }
            assert_eq!(self.conn.inflight() as usize, self.pending.len(), "inflight count drifted");
            self.assert_progress();
        }

        /// While relaying, every direction not done has an operation in flight that will move
        /// it on (buffer waits are answered at once here): nothing stalls.
        fn assert_progress(&self) {
            if !self.conn.is_relaying() || self.freed {
                return;
            }
            for dir in [Dir::Up, Dir::Down] {
                if self.conn.flows[dir.index()] == Flow::Done {
                    continue;
                }
                let moving = self.pending.iter().any(|p| match *p {
                    Pending::Recv(d, _) | Pending::Send(d, ..) | Pending::Poll(d, _) | Pending::PollIn(d, _) => {
                        d == dir
                    }
                    Pending::SendPrefix(_) => dir == Dir::Up,
                    _ => false,
                }) || (self.conn.is_moving() && self.conn.flows[dir.index()] == Flow::Parked);
                assert!(moving, "{dir:?} stalled in {:?}: {:?}", self.conn.flows[dir.index()], self.pending);
            }
        }

        /// Completes one pending operation as `choice` says.
        fn complete(&mut self, choice: Choice) {
            self.steps += 1;
            let index = choice.pick % self.pending.len();
            let pending = self.pending.swap_remove(index);
            let closing = self.conn.is_closing();
            // Bytes, and the multishot receive goes on (also while its cancel is on the way).
            let goes_on = if closing { 3..=5 } else { 3..=8 };
            if matches!(pending, Pending::Recv(..))
                && goes_on.contains(&(choice.outcome % 10))
                && !self.stopped[Self::dir_of(pending)]
            {
                self.pending.push(pending);
            }
            let event = match pending {
                Pending::ReadPrefix => Event::PrefixRead {
                    result: match choice.outcome % 6 {
                        _ if closing => -libc::ECANCELED,
                        0 => 0,
                        1 => -libc::ECONNRESET,
                        _ => {
                            let room = self.conn.prefix.as_mut().unwrap().free_space().1;
                            i32::from(choice.size).min(room as i32).max(1)
                        }
                    },
                },
                Pending::SendPrefix(len) => Event::Sent {
                    dir: Dir::Up,
                    result: match choice.outcome % 5 {
                        _ if closing => -libc::ECANCELED,
                        0 => -libc::EPIPE,
                        1 => -libc::EAGAIN,
                        2 => (len / 2).max(1) as i32,
                        _ => len as i32,
                    },
                },
                Pending::Connect(_) => Event::Connected(match choice.outcome % 4 {
                    _ if closing => -libc::ECANCELED,
                    0 => -libc::ECONNREFUSED,
                    1 => -libc::ECANCELED,
                    _ => 0,
                }),
                Pending::ConnectTimer => Event::ConnectTimerDone,
                Pending::Recv(dir, _) => {
                    let more = self.pending.iter().any(|p| matches!(*p, Pending::Recv(d, _) if d == dir));
                    let result = match choice.outcome % 10 {
                        _ if more => i32::from(choice.size),
                        _ if closing || self.stopped[dir as usize] => -libc::ECANCELED,
                        0 => 0,
                        1 => -libc::ECONNRESET,
                        2 if choice.size.is_multiple_of(2) => -libc::ENOBUFS,
                        2 => -libc::EAGAIN,
                        // Bytes up to the receive's byte limit, which ends it.
                        _ => i32::from(choice.size),
                    };
                    let buf = (result > 0).then(|| {
                        let buf = self.next_buffer;
                        self.next_buffer = self.next_buffer.wrapping_add(1);
                        assert!(self.held_buffers.insert(buf));
                        self.unsent[dir as usize].push_back((buf, result as u32));
                        buf
                    });
                    let full = result > 0 && choice.outcome.is_multiple_of(3);
                    Event::Received { dir, result, buf, full, more }
                }
                Pending::StopRecv(dir) | Pending::Park(dir) => {
                    if self
                        .pending
                        .iter()
                        .any(|p| matches!(*p, Pending::Recv(d, _) | Pending::PollIn(d, _) if d == dir))
                    {
                        self.stopped[dir as usize] = true;
                    }
                    Event::Cancelled
                }
                Pending::Send(dir, _, buf, len) => {
                    let result = match choice.outcome % 6 {
                        _ if closing => -libc::ECANCELED,
                        0 => -libc::EPIPE,
                        1 => -libc::EAGAIN,
                        2 => (len / 2).max(1) as i32,
                        _ => len as i32,
                    };
                    if result > 0 {
                        let front = self.unsent[dir as usize].front_mut().expect("a send of unsent bytes");
                        assert_eq!(front.0, buf);
                        front.1 -= result as u32;
                    }
                    Event::Sent { dir, result }
                }
                Pending::Poll(dir, _) => Event::Writable { dir },
                Pending::PollIn(dir, _) => Event::Readable {
                    dir,
                    result: if self.stopped[dir as usize] { -libc::ECANCELED } else { libc::POLLIN as i32 },
                },
                Pending::Watch => Event::ClientGone {
                    result: if closing || self.watch_stopped {
                        -libc::ECANCELED
                    } else if choice.outcome.is_multiple_of(8) {
                        (libc::POLLERR | libc::POLLHUP) as i32
                    } else if choice.outcome % 8 == 1 {
                        // Half-closed: the watch ends, the connection goes on.
                        (libc::POLLIN | libc::POLLRDHUP) as i32
                    } else {
                        // A poll ends only when the client goes: not this time.
                        self.pending.push(pending);
                        return;
                    },
                },
                Pending::StopWatch => {
                    self.watch_stopped |= self.pending.iter().any(|p| matches!(p, Pending::Watch));
                    Event::Cancelled
                }
                Pending::Cancel => Event::Cancelled,
                Pending::Close => Event::Closed,
            };
            let mut ops = Vec::new();
            let notice = self.conn.on_event(event, self.steps as u64, &mut ops);
            self.apply(ops, choice.outcome == 255);
            match notice {
                Some(Notice::PrefixGrew) => self.routed_or_read_more(),
                Some(Notice::Movable) => self.arrive(),
                _ => {}
            }
        }

        /// The worker starts moving the connection, if it can move now.
        fn begin_move(&mut self) {
            let mut ops = Vec::new();
            let can = self.conn.can_move();
            assert_eq!(self.conn.begin_move(&mut ops), can);
            self.apply(ops, false);
        }

        /// The connection is handed to another worker: it must hold nothing of this one.
        fn arrive(&mut self) {
            assert!(self.pending.is_empty(), "moved with operations in flight: {:?}", self.pending);
            assert!(self.held_buffers.is_empty(), "moved holding buffers {:?}", self.held_buffers);
            assert_eq!(self.conn.pipes, [None; 2], "moved holding a pipe");
            self.moves += 1;
            let mut ops = Vec::new();
            self.conn.generation = self.moves + 1;
            self.conn.arrive(&mut ops);
            self.apply(ops, false);
            assert_eq!(self.pending.len(), 2, "both directions wait again after the move");
        }

        /// The queue moves (as when a backend slot frees).
        fn resume(&mut self) {
            if self.queued && self.conn.is_queued() {
                self.queued = false;
                let mut ops = Vec::new();
                self.conn.resume(&mut ops);
                self.apply(ops, false);
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        /// Any order and any results: the slot is freed only after its last completion, with
        /// every fd closed once and every buffer returned once, and it always gets there.
        #[test]
        fn connection_always_ends_cleanly(
            attempts in 1u32..=3,
            handshake in any::<bool>(),
            proxy in any::<bool>(),
            defer in any::<bool>(),
            relay in prop_oneof![Just(Relay::Copy), Just(Relay::Splice), Just(Relay::Auto)],
            seed in any::<u64>(),
            close_at in proptest::option::of(0usize..60),
            choices in proptest::collection::vec(choice(), 1..400),
        ) {
            let mut model = Model::new(attempts, handshake, proxy, defer, relay, seed);
            for (i, choice) in choices.iter().enumerate() {
                if model.freed {
                    break;
                }
                if close_at == Some(i) {
                    let mut ops = Vec::new();
                    model.conn.close(&mut ops);
                    model.apply(ops, false);
                }
                if model.queued && (model.pending.is_empty() || choice.outcome % 4 == 0) {
                    model.resume();
                }
                if choice.size % 5 == 0 {
                    model.begin_move();
                }
                if model.pending.is_empty() {
                    break;
                }
                model.complete(*choice);
            }
            // Whatever state it reached, closing it and completing everything frees it.
            if !model.freed {
                let mut ops = Vec::new();
                model.conn.close(&mut ops);
                model.apply(ops, false);
                let mut n = 0usize;
                while !model.freed {
                    prop_assert!(!model.pending.is_empty(), "stuck: nothing in flight and not freed");
                    model.complete(Choice { pick: n, outcome: 7, size: 1 });
                    n += 1;
                    prop_assert!(n < 1000, "does not converge");
                }
            }
            prop_assert!(model.open_fds.is_empty());
            prop_assert!(model.closed_fds.contains(&CLIENT));
        }
    }
}
