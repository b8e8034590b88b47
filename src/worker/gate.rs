//! The accept gate: this worker's listeners and how many connections each may take now.
//!
//! A connection beyond `max_connections` (the worker's share) or a listener's own
//! `max_connections` must wait in the kernel's accept queue, not be accepted and closed. A
//! multishot accept cannot be told how many to take: once armed it takes the whole queue. So
//! it is armed only while the room left is larger than anything the accept queues can hold.
//! Below that, a listener waits with a poll, which holds no room, and when it is readable the
//! worker accepts with `accept4(2)` itself, as many as fit, until the queue is empty or the room
//! is gone; connections left in the queue are taken as soon as room frees. (Armed one-shot
//! accepts would each hold a place: idle ones on a quiet listener would starve a busy one.)
//! Running out of descriptors pauses every accept for a moment; draining cancels them and
//! closes the listeners once their last completion is in.
//!
//! [`AcceptGate::plan`] decides; the worker submits or carries out what it returns and
//! reports completions back.

use socket2::Socket;

use super::{ListenerSettings, RateLimit, WorkerListener};

/// Connections that may complete their handshake while one wake-up of the worker runs, on top
/// of full accept queues: the margin a multishot accept needs.
const ARRIVAL_MARGIN: usize = 256;

/// What a listener has in flight in the ring.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Armed {
    Nothing,
    Multishot,
    Poll,
    /// A cancel was sent; waiting for the operation's last completion.
    Cancelling,
}

/// A listener as a worker holds it.
#[derive(Debug)]
pub(super) struct Listener {
    pub settings: ListenerSettings,
    /// `None` once closed.
    pub socket: Option<Socket>,
    /// When a reload removed it (worker clock, ms): it accepts no more, and its connections
    /// are closed `drain_timeout` later if still open.
    pub retired_at: Option<u64>,
    /// This worker's open connections that came through this listener, and the most it may
    /// hold (its share of the listener's `max_connections`).
    open: usize,
    cap: usize,
    armed: Armed,
    /// Connections may be waiting in the accept queue: the poll said readable and the last
    /// accept did not find it empty.
    readable: bool,
    /// An accept pass is asked for (see [`AcceptOp::Accept`]).
    accept_asked: bool,
}

impl Listener {
    pub fn new(plan: WorkerListener) -> Listener {
        Listener {
            cap: plan.settings.max_connections.unwrap_or(usize::MAX),
            settings: plan.settings,
            socket: Some(plan.socket),
            retired_at: None,
            open: 0,
            armed: Armed::Nothing,
            readable: false,
            accept_asked: false,
        }
    }

    /// How many more connections this listener may take on this worker.
    pub fn room(&self) -> usize {
        self.cap.saturating_sub(self.open)
    }

    /// New settings from a reload; they apply to connections accepted from now on.
    pub fn update(&mut self, settings: ListenerSettings) {
        self.cap = settings.max_connections.unwrap_or(usize::MAX);
        self.settings = settings;
    }
}

/// What the worker does for the gate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum AcceptOp {
    /// Arm a multishot accept on listener `l`.
    Multishot(usize),
    /// Arm a poll for listener `l` being readable.
    Poll(usize),
    /// Cancel what listener `l` has armed: its poll, or else its multishot accept.
    Cancel { l: usize, poll: bool },
    /// Accept from listener `l` with `accept4(2)` while there is room, once the current batch
    /// of completions is handled (then [`AcceptGate::accepted_all`] or
    /// [`AcceptGate::stopped_accepting`]).
    Accept(usize),
}

#[derive(Debug)]
pub(super) struct AcceptGate {
    pub listeners: Vec<Listener>,
    /// Room above which a multishot accept cannot overshoot: what one accept queue holds
    /// (the listen backlog, capped by the kernel's somaxconn) plus [`ARRIVAL_MARGIN`].
    multishot_above: usize,
    /// Paused after running out of descriptors, until the backoff timer fires.
    pub backed_off: bool,
    pub log: RateLimit,
    /// Scratch space for [`AcceptGate::plan`]'s operations.
    pub ops: Vec<AcceptOp>,
    /// Listeners to accept from once the current batch of completions is handled.
    pub to_accept: Vec<usize>,
}

impl AcceptGate {
    pub fn new(listeners: Vec<Listener>, backlog: usize) -> AcceptGate {
        AcceptGate {
            listeners,
            multishot_above: backlog + ARRIVAL_MARGIN,
            backed_off: false,
            log: RateLimit::new(),
            ops: Vec::new(),
            to_accept: Vec::new(),
        }
    }

    /// Whether a connection from listener `l` fits now (the worker's room is checked apart).
    pub fn fits(&self, l: usize) -> bool {
        self.listeners[l].room() > 0
    }

    /// A connection from listener `l` opened on (or moved to) this worker.
    pub fn opened(&mut self, l: usize) {
        self.listeners[l].open += 1;
    }

    /// A connection from listener `l` closed on (or moved away from) this worker.
    pub fn closed(&mut self, l: usize) {
        self.listeners[l].open -= 1;
    }

    /// A completion of listener `l`'s multishot accept; `more`: it goes on. Returns whether
    /// the listener has nothing in flight any more.
    pub fn accept_completed(&mut self, l: usize, more: bool) -> bool {
        let listener = &mut self.listeners[l];
        if !more {
            listener.armed = Armed::Nothing;
        }
        listener.armed == Armed::Nothing
    }

    /// Listener `l`'s poll completed: readable, unless it was cancelled.
    pub fn poll_completed(&mut self, l: usize, readable: bool) {
        let listener = &mut self.listeners[l];
        listener.armed = Armed::Nothing;
        listener.readable |= readable;
    }

    /// An accept pass found listener `l`'s queue empty.
    pub fn accepted_all(&mut self, l: usize) {
        self.listeners[l].readable = false;
        self.listeners[l].accept_asked = false;
    }

    /// An accept pass of listener `l` stopped with connections possibly left (no room, or an
    /// error); a later plan asks again when there is room.
    pub fn stopped_accepting(&mut self, l: usize) {
        self.listeners[l].accept_asked = false;
    }

    /// Whether the listener has an operation in flight.
    pub fn armed(&self, l: usize) -> bool {
        self.listeners[l].armed != Armed::Nothing
    }

    /// Whether every listener is closed.
    pub fn all_closed(&self) -> bool {
        self.listeners.iter().all(|l| l.socket.is_none())
    }

    /// Closes the listeners with nothing in flight: all of them (when draining), or those a
    /// reload removed.
    pub fn close_idle(&mut self, all: bool) {
        for listener in self.listeners.iter_mut().filter(|l| l.armed == Armed::Nothing) {
            if all || listener.retired_at.is_some() {
                listener.socket = None;
            }
        }
    }

    /// A reload added listener `index` (the next index, the same in every worker).
    pub fn add(&mut self, index: usize, listener: Listener) {
        debug_assert_eq!(index, self.listeners.len(), "listener indices grow the same in every worker");
        self.listeners.push(listener);
    }

    /// A reload removed listener `l`: it accepts no more (the next plan cancels what is armed)
    /// and closes once nothing is in flight.
    pub fn retire(&mut self, l: usize, now: u64) {
        self.listeners[l].retired_at.get_or_insert(now);
    }

    /// What to arm, cancel or accept so that no listener takes more than fits: `room` is how
    /// many more connections the worker may hold; `accepting` is false while draining (then
    /// everything armed is cancelled, as while backed off).
    pub fn plan(&mut self, room: usize, accepting: bool, out: &mut Vec<AcceptOp>) {
        let accepting = accepting && !self.backed_off;
        let multishot_room = room > self.multishot_above.saturating_mul(self.listeners.len());
        for (l, listener) in self.listeners.iter_mut().enumerate() {
            if listener.socket.is_none() || listener.armed == Armed::Cancelling {
                continue;
            }
            let accepting = accepting && listener.retired_at.is_none();
            let multishot = multishot_room && listener.room() > self.multishot_above;
            let keep = match listener.armed {
                Armed::Multishot => accepting && multishot,
                Armed::Poll => accepting && !multishot,
                Armed::Nothing | Armed::Cancelling => true,
            };
            if !keep {
                out.push(AcceptOp::Cancel { l, poll: listener.armed == Armed::Poll });
                listener.armed = Armed::Cancelling;
                continue;
            }
            if !accepting || listener.armed != Armed::Nothing {
                continue;
            }
            if multishot {
                listener.armed = Armed::Multishot;
                out.push(AcceptOp::Multishot(l));
            } else if !listener.readable {
                listener.armed = Armed::Poll;
                out.push(AcceptOp::Poll(l));
            } else if room > 0 && listener.room() > 0 && !listener.accept_asked {
                listener.accept_asked = true;
                out.push(AcceptOp::Accept(l));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::admission::Admission;
    use crate::admission::acl::AccessRules;

    fn gate(caps: &[Option<usize>], backlog: usize) -> AcceptGate {
        let listeners = caps
            .iter()
            .enumerate()
            .map(|(i, &cap)| {
                let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
                let admission = Admission { accept_proxy: false, sni: Default::default(), default_pool: Some(0) };
                Listener::new(WorkerListener {
                    index: i,
                    socket,
                    settings: ListenerSettings {
                        name: format!("l{i}"),
                        admission,
                        access: AccessRules::default(),
                        proxy_from: Vec::new(),
                        sources: None,
                        idle_timeout: None,
                        handshake_timeout: Duration::ZERO,
                        max_connections: cap,
                    },
                })
            })
            .collect();
        AcceptGate::new(listeners, backlog)
    }

    fn plan(gate: &mut AcceptGate, room: usize) -> Vec<AcceptOp> {
        let mut out = Vec::new();
        gate.plan(room, true, &mut out);
        out
    }

    #[test]
    fn lots_of_room_arms_one_multishot_per_listener() {
        let mut g = gate(&[None, None], 100);
        assert_eq!(plan(&mut g, 10_000), vec![AcceptOp::Multishot(0), AcceptOp::Multishot(1)]);
        assert!(plan(&mut g, 10_000).is_empty(), "armed once");
    }

    #[test]
    fn near_the_cap_a_poll_waits_and_accepts_follow_readiness_and_room() {
        let mut g = gate(&[None, None], 100);
        assert_eq!(plan(&mut g, 5), vec![AcceptOp::Poll(0), AcceptOp::Poll(1)]);
        assert!(plan(&mut g, 5).is_empty());
        g.poll_completed(0, true);
        assert_eq!(plan(&mut g, 5), vec![AcceptOp::Accept(0)]);
        assert!(plan(&mut g, 5).is_empty(), "one pass asked at a time");
        // The pass filled the room with connections left in the queue: nothing until room frees.
        g.stopped_accepting(0);
        assert!(plan(&mut g, 0).is_empty(), "no poll while connections wait and no room");
        assert_eq!(plan(&mut g, 1), vec![AcceptOp::Accept(0)], "room freed: accept again, no poll needed");
        g.accepted_all(0);
        assert_eq!(plan(&mut g, 1), vec![AcceptOp::Poll(0)], "queue empty: wait for the next one");
    }

    #[test]
    fn a_multishot_is_cancelled_when_the_room_shrinks_and_a_poll_follows_its_end() {
        let mut g = gate(&[None], 100);
        assert_eq!(plan(&mut g, 1000), vec![AcceptOp::Multishot(0)]);
        for _ in 0..700 {
            g.opened(0);
            assert!(!g.accept_completed(0, true));
        }
        assert_eq!(plan(&mut g, 300), vec![AcceptOp::Cancel { l: 0, poll: false }]);
        assert!(plan(&mut g, 300).is_empty(), "one cancel, and nothing armed before the accept ends");
        assert!(g.accept_completed(0, false), "the cancelled accept's last completion");
        assert_eq!(plan(&mut g, 300), vec![AcceptOp::Poll(0)]);
        // Room grows again: the poll gives way to a multishot.
        assert_eq!(plan(&mut g, 5000), vec![AcceptOp::Cancel { l: 0, poll: true }]);
        g.poll_completed(0, false);
        assert_eq!(plan(&mut g, 5000), vec![AcceptOp::Multishot(0)]);
    }

    #[test]
    fn a_listener_at_its_cap_waits_while_another_takes_the_room() {
        let mut g = gate(&[Some(2), None], 100);
        assert_eq!(plan(&mut g, 10), vec![AcceptOp::Poll(0), AcceptOp::Poll(1)]);
        g.opened(0);
        g.opened(0);
        g.poll_completed(0, true);
        g.poll_completed(1, true);
        assert_eq!(plan(&mut g, 8), vec![AcceptOp::Accept(1)], "listener 0 is full; 1 is not");
        assert!(!g.fits(0) && g.fits(1));
        g.closed(0);
        assert_eq!(plan(&mut g, 9), vec![AcceptOp::Accept(0)]);
    }

    #[test]
    fn not_accepting_cancels_what_is_armed() {
        let mut g = gate(&[None, None], 100);
        plan(&mut g, 10_000);
        let mut out = Vec::new();
        g.backed_off = true;
        g.plan(10_000, true, &mut out);
        assert_eq!(out, vec![AcceptOp::Cancel { l: 0, poll: false }, AcceptOp::Cancel { l: 1, poll: false }]);
        g.accept_completed(0, false);
        g.accept_completed(1, false);
        g.backed_off = false;
        assert_eq!(plan(&mut g, 10_000).len(), 2, "armed again after the backoff");
    }
}
