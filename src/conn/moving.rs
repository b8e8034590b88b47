//! Moving a connection to another worker (`spread = "pack"`): only while both directions wait
//! for bytes; both waits are stopped, and bytes or an end of stream arriving first give the
//! move up, so nothing is held up or reordered.

use super::{Conn, Dir, Event, Flow, Op, Phase};

impl Conn {
    /// Whether the connection can move to another worker now: relaying, every byte received
    /// sent, and each direction only waiting for its source (a multishot receive, or a poll
    /// when spliced, with no pipe held). Other connections are at work and stay; a later pass
    /// finds most of them waiting.
    pub fn can_move(&self) -> bool {
        self.phase == Phase::Relaying
            && !self.moving
            && self.prefix.is_none()
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
    /// an event returns [`Notice::Movable`](super::Notice::Movable); if bytes or an end of stream come first, the move
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

    /// The connection arrived in another worker's ring (or stays, if it had nowhere to go):
    /// starts both directions' waits again.
    pub fn arrive(&mut self, ops: &mut Vec<Op>) {
        debug_assert!(self.moving && self.inflight == 0 && self.flows == [Flow::Parked; 2]);
        self.resume_parked(ops);
    }

    /// Ends a move (given up, or arrived): waits again where a direction was parked.
    pub(super) fn resume_parked(&mut self, ops: &mut Vec<Op>) {
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
    pub(super) fn settle_while_moving(&mut self, event: Event, ops: &mut Vec<Op>) -> bool {
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
}
