//! A simulated kernel drives a connection with random completions; whatever the order and the
//! results, the connection must keep the rules the worker relies on.
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
    /// The pipe each direction holds, as the worker would track it.
    pipes: [Option<u32>; 2],
    /// The stop of the client watch landed: it ends with ECANCELED next.
    watch_stopped: bool,
}

impl Model {
    /// `handshake`: the connection reads a prefix before it is routed; `proxy`: a prefix
    /// (PROXY header) is sent to the backend first.
    fn new(attempts: u32, handshake: bool, proxy: bool, defer: bool, relay: Relay, seed: u64) -> Model {
        let mut model = Model {
            conn: Conn::new(CLIENT, relay, 0),
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
            pipes: [None; 2],
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
            model.conn.route(attempts, &mut ops);
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
            self.conn.route(self.attempts, &mut ops);
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
                        self.conn.backend_opened(fd);
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
                    assert!(self.pipes[dir as usize].is_none(), "polling while holding a pipe");
                    self.pending.push(Pending::PollIn(dir, fd));
                }
                Op::SpliceIn { dir, fd } => {
                    assert!(self.open_fds.contains(&fd), "splice from a closed fd");
                    assert_eq!(self.piped[dir as usize], 0, "splicing into a pipe that is not empty");
                    if self.pipes[dir as usize].is_none() {
                        self.next_pipe += 1;
                        self.pipes[dir as usize] = Some(self.next_pipe);
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
                        self.pipes[dir as usize] = None;
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
                    assert!(self.pipes[dir as usize].is_some(), "splice out without a pipe");
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
                    assert!(self.pipes[dir as usize].take().is_some(), "releasing a pipe not held");
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
                Pending::Recv(d, _) | Pending::Send(d, ..) | Pending::Poll(d, _) | Pending::PollIn(d, _) => d == dir,
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
                if self.pending.iter().any(|p| matches!(*p, Pending::Recv(d, _) | Pending::PollIn(d, _) if d == dir)) {
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
        assert_eq!(self.pipes, [None; 2], "moved holding a pipe");
        self.moves += 1;
        let mut ops = Vec::new();
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
                model.conn.close(End::Killed, &mut ops);
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
            model.conn.close(End::Killed, &mut ops);
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
