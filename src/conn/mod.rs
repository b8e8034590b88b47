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

#[cfg(test)]
mod model;
mod moving;
mod ops;
mod prefix;
mod splice;
#[cfg(test)]
mod tests;

pub use ops::*;
pub use prefix::Prefix;

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

/// Pipe fills a direction may do per readiness before it polls again, so one busy connection
/// does not keep the worker from the others.
const SPLICE_ROUNDS: u8 = 8;

/// With this many buffers of a direction waiting behind its send, its multishot receive is
/// stopped: the destination is slower than the source, and the bytes stay in the source's
/// socket (TCP flow control) instead of in the worker's shared buffers.
pub const BACKLOG_STOP: usize = 4;

/// The state of one proxied connection. What the worker keeps about it besides (its slot's
/// generation, listener, addresses, backend slot, pipes) is the worker's own.
#[derive(Debug)]
pub struct Conn {
    client: RawFd,
    backend: Option<RawFd>,
    /// Bytes to read before routing and to send before relaying; `None` when there are none.
    prefix: Option<Box<Prefix>>,
    relay: Relay,
    /// Whether each direction relays by splice (always in splice mode; in auto mode once it
    /// moved a full buffer at once).
    spliced: [bool; 2],
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
    last_active: u64,
    bytes: [u64; 2],
    /// The direction that last received bytes: with an idle timeout, the other side is the
    /// one that went silent.
    last_dir: Option<Dir>,
    /// The errno of the last failed connect, 0 if none failed.
    connect_error: i32,
    end: Option<End>,
    /// Where it was when it began closing.
    stage: Stage,
}

impl Conn {
    /// A connection just accepted on `client`, relayed the `relay` way.
    pub fn new(client: RawFd, relay: Relay, now: u64) -> Conn {
        Conn {
            client,
            backend: None,
            prefix: None,
            relay,
            spliced: [relay == Relay::Splice; 2],
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
            last_dir: None,
            connect_error: 0,
            end: None,
            stage: Stage::Request,
        }
    }

    /// How it ended, as HAProxy's termination state (see [`Termination`]); `None` until it
    /// begins closing.
    pub fn termination(&self) -> Option<Termination> {
        let end = self.end?;
        let who = match end {
            End::Finished => return Some(Termination(*b"--")),
            End::Reset(Side::Client) | End::ClientGone => b'C',
            End::Reset(Side::Backend) => b'S',
            End::NoBackend if self.connect_error == libc::ETIMEDOUT => b's',
            End::NoBackend => b'S',
            End::LocalError => b'R',
            // The side that went silent: the server's if the client spoke last.
            End::IdleTimeout if self.last_dir == Some(Dir::Up) => b's',
            End::IdleTimeout | End::HandshakeTimeout => b'c',
            End::Killed => b'K',
            End::BackendDown => b'D',
            End::Refused | End::HandshakeFailed => b'P',
            End::QueueTimeout => b's',
        };
        let stage = match self.stage {
            Stage::Request => b'R',
            Stage::Queue => b'Q',
            Stage::Connect => b'C',
            Stage::Data => b'D',
            Stage::LastData => b'L',
        };
        Some(Termination([who, stage]))
    }

    /// Where it is now (or was when it began closing).
    pub fn stage(&self) -> Stage {
        match self.phase {
            Phase::Closing { .. } => self.stage,
            Phase::New | Phase::Handshake => Stage::Request,
            Phase::Queued => Stage::Queue,
            Phase::Connecting => Stage::Connect,
            Phase::Relaying if self.flows.contains(&Flow::Done) || self.eof.contains(&true) => Stage::LastData,
            Phase::Relaying => Stage::Data,
        }
    }

    /// Why the connection ended, once it is closing.
    pub fn end(&self) -> Option<End> {
        self.end
    }

    /// The client's socket.
    pub fn client_fd(&self) -> RawFd {
        self.client
    }

    /// The backend's socket, once a connect started.
    pub fn backend_fd(&self) -> Option<RawFd> {
        self.backend
    }

    /// Milliseconds (worker clock) of the last byte moved, or of the accept.
    pub fn last_active(&self) -> u64 {
        self.last_active
    }

    /// Bytes relayed: client to backend, backend to client.
    pub fn bytes(&self) -> [u64; 2] {
        self.bytes
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

    fn emit(&mut self, op: Op, ops: &mut Vec<Op>) {
        self.inflight += op.completions();
        if let Some(side) = op.side() {
            self.busy[side as usize] += 1;
        }
        ops.push(op);
    }

    /// The worker routed the connection to a pool where `attempts` backends may be tried:
    /// watch the client and start the first connect.
    pub fn route(&mut self, attempts: u32, ops: &mut Vec<Op>) {
        debug_assert!(matches!(self.phase, Phase::New | Phase::Handshake));
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

    /// The worker opened `fd` for the connect it was asked for.
    pub fn backend_opened(&mut self, fd: RawFd) {
        self.backend = Some(fd);
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

    /// Closes the connection from the worker's side (`IdleTimeout`, or `Killed` at the drain
    /// deadline): FIN both ways.
    pub fn close(&mut self, end: End, ops: &mut Vec<Op>) {
        self.begin_close(end, false, false, ops);
    }

    /// Kills the connection (an operator's shutdown-sessions): a reset to both sides.
    pub fn kill(&mut self, ops: &mut Vec<Op>) {
        self.begin_close(End::Killed, true, true, ops);
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

    /// Arms the direction's multishot receive into ring buffers.
    fn receive_copying(&mut self, dir: Dir, fd: RawFd, ops: &mut Vec<Op>) {
        self.flows[dir.index()] = Flow::Receiving;
        self.armed[dir.index()] = true;
        self.stopping[dir.index()] = false;
        self.emit(Op::Recv { dir, fd }, ops);
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
                    prefix.filled(result as usize);
                    return Some(Notice::PrefixGrew);
                }
                if -result == libc::EINTR || -result == libc::EAGAIN {
                    self.read_prefix(ops);
                } else {
                    // The client left (or failed) before it could be routed.
                    self.begin_close(End::ClientGone, result != 0, false, ops);
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
        self.connect_error = errno;
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
                self.last_dir = Some(dir);
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
        self.stage = self.stage();
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
