//! Transitions of the connection state machine, driven without a ring.

use super::*;

const CLIENT: RawFd = 10;
const BACKEND: RawFd = 11;
const BACKEND2: RawFd = 12;

/// The connection's termination state.
fn code(h: &Harness) -> String {
    h.conn.termination().expect("closing").as_str().to_string()
}

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
        let mut h = Harness { conn: Conn::new(CLIENT, relay, 0), ops: Vec::new(), now: 0 };
        h.conn.route(attempts, &mut h.ops);
        assert_eq!(h.take(), vec![Op::WatchClient { fd: CLIENT }, Op::Connect]);
        h
    }

    fn new(attempts: u32) -> Harness {
        let mut h = Harness::routed(Relay::Copy, attempts);
        h.conn.backend_opened(BACKEND);
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
        h.conn.backend_opened(BACKEND);
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
    assert_eq!(code(&h), "--");
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
    assert_eq!(code(&h), "SD");
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
    h.conn.close(End::IdleTimeout, &mut h.ops);
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
    h.conn.close(End::IdleTimeout, &mut h.ops);
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
    h.conn.backend_opened(BACKEND2);
    // Completions of the first attempt's timer and close arrive in any order.
    assert!(h.event(Event::ConnectTimerDone).is_empty());
    assert!(h.event(Event::Closed).is_empty());
    let outcome = h.conn.on_event(Event::Connected(0), 5, &mut h.ops);
    assert_eq!(outcome, Some(Notice::Connected));
    assert_eq!(
        h.take(),
        vec![Op::Recv { dir: Dir::Up, fd: CLIENT }, Op::Recv { dir: Dir::Down, fd: BACKEND2 }, Op::StopWatch]
    );
    assert_eq!(h.conn.backend_fd(), Some(BACKEND2));
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
    assert_eq!(code(&h), "SC");
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
    assert_eq!(code(&h), "RC");
    assert!(h.event(Event::Cancelled).is_empty());
    let ops = h.event(Event::ClientGone { result: -libc::ECANCELED });
    assert_eq!(ops, vec![Op::Close { fd: CLIENT, reset: false }]);
    h.finish_close(1);
}

#[test]
fn close_while_connecting_cancels_connect() {
    let mut h = Harness::new(1);
    h.conn.close(End::IdleTimeout, &mut h.ops);
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
    h.conn.close(End::IdleTimeout, &mut h.ops);
    assert_eq!(h.take(), vec![Op::Cancel { fd: CLIENT }, Op::Cancel { fd: BACKEND }]);
    h.conn.close(End::IdleTimeout, &mut h.ops);
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
    let mut h = Harness { conn: Conn::new(CLIENT, Relay::Copy, 0), ops: Vec::new(), now: 0 };
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
    h.conn.route(1, &mut h.ops);
    assert_eq!(h.take(), vec![Op::WatchClient { fd: CLIENT }, Op::Connect]);
    h.conn.backend_opened(BACKEND);
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
    let mut h = Harness { conn: Conn::new(CLIENT, Relay::Copy, 0), ops: Vec::new(), now: 0 };
    h.conn.prefix = Some(Prefix::new(100));
    h.conn.read_prefix(&mut h.ops);
    h.take();
    let ops = h.event(Event::PrefixRead { result: 0 });
    assert_eq!(ops, vec![Op::Close { fd: CLIENT, reset: false }]);
    assert_eq!(h.conn.end(), Some(End::ClientGone));
    assert_eq!(code(&h), "CR");
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
    h.conn.backend_opened(BACKEND);
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
    h.conn.backend_opened(BACKEND);
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
        vec![Op::Send { dir: Dir::Down, fd: CLIENT, buf: 2, offset: 0, len: 32768 }, Op::StopRecv { dir: Dir::Down }]
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
    // The new worker starts both receives.
    h.conn.arrive(&mut h.ops);
    assert_eq!(h.take(), vec![Op::Recv { dir: Dir::Up, fd: CLIENT }, Op::Recv { dir: Dir::Down, fd: BACKEND }]);
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
    h.conn.close(End::IdleTimeout, &mut h.ops);
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
    h.conn.close(End::IdleTimeout, &mut h.ops);
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

#[test]
fn the_termination_state_names_who_ended_it_and_where() {
    // The client resets after the backend finished: client, last data.
    let mut h = Harness::relaying();
    assert_eq!(h.conn.termination(), None, "not before it closes");
    assert_eq!(h.conn.stage(), Stage::Data);
    h.event(ended(Dir::Down, 0));
    assert_eq!(h.conn.stage(), Stage::LastData);
    h.event(ended(Dir::Up, -libc::ECONNRESET));
    assert_eq!(code(&h), "CL");

    // Idle: the side that went silent. The client spoke last: the server's timeout.
    let mut h = Harness::relaying();
    h.event(data(Dir::Up, 5, 1));
    h.conn.close(End::IdleTimeout, &mut h.ops);
    assert_eq!(code(&h), "sD");
    let mut h = Harness::relaying();
    h.event(data(Dir::Up, 5, 1));
    h.event(Event::Sent { dir: Dir::Up, result: 5 });
    h.event(data(Dir::Down, 5, 2));
    h.conn.close(End::IdleTimeout, &mut h.ops);
    assert_eq!(code(&h), "cD");

    // Killed, cut for a backend marked down.
    let mut h = Harness::relaying();
    h.conn.kill(&mut h.ops);
    assert_eq!(code(&h), "KD");
    let mut h = Harness::relaying();
    h.conn.cut(&mut h.ops);
    assert_eq!(code(&h), "DD");

    // Before a backend: refused, bad handshake, handshake timeout, queue timeout, a client
    // leaving while queued or connecting, connects that timed out.
    for (end, expected) in [(End::Refused, "PR"), (End::HandshakeFailed, "PR"), (End::HandshakeTimeout, "cR")] {
        let mut h = Harness { conn: Conn::new(CLIENT, Relay::Copy, 0), ops: Vec::new(), now: 0 };
        h.conn.reject(end, &mut h.ops);
        assert_eq!(code(&h), expected, "{end:?}");
    }
    let mut h = Harness::routed(Relay::Copy, 1);
    h.conn.defer_connect();
    h.conn.reject(End::QueueTimeout, &mut h.ops);
    assert_eq!(code(&h), "sQ");
    let mut h = Harness::routed(Relay::Copy, 1);
    h.conn.defer_connect();
    h.event(Event::ClientGone { result: libc::POLLHUP as i32 });
    assert_eq!(code(&h), "CQ");
    let mut h = Harness::new(1);
    h.event(Event::ClientGone { result: libc::POLLHUP as i32 });
    assert_eq!(code(&h), "CC");
    let mut h = Harness::new(1);
    h.event(Event::ConnectTimerDone);
    h.event(Event::Connected(-libc::ECANCELED));
    assert_eq!(code(&h), "sC");
}
