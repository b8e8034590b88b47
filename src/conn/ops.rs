//! What a worker and a connection say to each other: the operations a connection asks for
//! ([`Op`]), the completions it is fed ([`Event`]), what it tells the worker back
//! ([`Notice`]) and why it ended ([`End`]).

use std::os::fd::RawFd;

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

    pub(super) fn index(self) -> usize {
        self as usize
    }
}

/// An operation for the worker to carry out. All but `Recycle`, `WaitForBuffer` and `Free`
/// become submissions whose completions come back as [`Event`]s.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// Open a socket to the next backend and connect it under a linked timeout. Two
    /// completions (connect, timeout), or [`Conn::socket_failed`](crate::conn::Conn::socket_failed) if no socket could be made.
    Connect,
    /// Receive from the client `fd` into the free end of the connection's [`Prefix`](crate::conn::Prefix).
    ReadPrefix { fd: RawFd },
    /// Send the pending bytes of the connection's [`Prefix`](crate::conn::Prefix) to the backend `fd`.
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
    /// then call [`Conn::spliced_in`](crate::conn::Conn::spliced_in). Done at once by the worker; no completion.
    SpliceIn { dir: Dir, fd: RawFd },
    /// Splice `len` bytes from the direction's pipe to the destination `fd`, then call
    /// [`Conn::spliced_out`](crate::conn::Conn::spliced_out). No completion.
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
    /// The ring had no buffer: call [`Conn::buffer_available`](crate::conn::Conn::buffer_available) for `dir` when one returns.
    WaitForBuffer(Dir),
    /// Nothing is in flight and every fd is closed: the slot may be freed.
    Free,
}

impl Op {
    /// How many completions the operation will produce.
    pub(super) fn completions(self) -> u32 {
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
    pub(super) fn side(self) -> Option<Side> {
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
    pub(super) fn side(self) -> Option<Side> {
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
    /// No socket or pipe could be had (local resource shortage).
    LocalError,
    /// No byte in either direction for `idle_timeout`.
    IdleTimeout,
    /// Closed by ringlb on purpose: the drain deadline (after a stop, an upgrade, or a reload
    /// that removed its listener) or an operator's shutdown-sessions.
    Killed,
    /// Cut because the backend was marked down (`on_down = "close"`).
    BackendDown,
    /// Refused by access rules or a connection limit (reset).
    Refused,
    /// No usable PROXY header or ClientHello, or no route for it (reset).
    HandshakeFailed,
    /// The PROXY header or ClientHello did not come within `handshake_timeout` (reset).
    HandshakeTimeout,
    /// Waited for a backend below its `max_conns` longer than `queue_timeout` (reset).
    QueueTimeout,
    /// The client reset or hung up before a backend answered (during its handshake, in the
    /// queue or while connecting).
    ClientGone,
}

/// Where a connection was when it ended: HAProxy's phases, the second letter of its
/// termination code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// Before routing: accepted, reading the PROXY header or the ClientHello (`R`).
    Request,
    /// Waiting in a backend queue (`Q`).
    Queue,
    /// Connecting to a backend (`C`).
    Connect,
    /// Relaying both ways (`D`).
    Data,
    /// Relaying one way; the other had ended (`L`).
    LastData,
}

/// How a connection ended, as HAProxy's two-letter termination state: who or what ended it
/// (`C` client, `S` server, `P` proxy, `R` resource, `D` backend marked down, `K` killed on
/// purpose, `c`/`s` a client/server side timeout) and in which [`Stage`]; `--` for a normal
/// end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Termination(pub [u8; 2]);

impl Termination {
    pub fn as_str(&self) -> &str {
        std::str::from_utf8(&self.0).unwrap_or("??")
    }
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
    /// another worker, which calls [`Conn::arrive`](crate::conn::Conn::arrive).
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
