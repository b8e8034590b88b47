//! Following `spread = "pack"` (see [`crate::spread`]): steering the listeners' new
//! connections to the workers in use, handing open connections to other workers, and taking
//! in the ones handed to this worker.

use std::os::fd::AsRawFd;
use std::sync::Arc;

use log::warn;

use super::slot::Slot;
use super::{Mode, Worker};
use crate::conn::End;
use crate::spread;

/// Connection moves one worker starts in one pass, so a pass never takes long.
const MOVES_PER_PASS: u64 = 256;

impl Worker {
    /// On the doorbell: takes in connections handed over, steers the listeners if the workers
    /// in use changed, and starts handing on connections beyond this worker's share.
    pub(super) fn follow_spread(&mut self) {
        if self.handoff.is_none() {
            return;
        }
        for conn in self.take_handed_over(false) {
            self.adopt(conn);
        }
        let in_use = self.shared.workers_in_use();
        if in_use != self.steered {
            self.steer(in_use);
        }
        if self.mode == Mode::Running {
            self.hand_on_excess(in_use);
        }
    }

    /// Points every open listener's SO_REUSEPORT group at the first `in_use` workers. Every
    /// worker does this for its own listeners (one is enough per group; the programs are
    /// the same), so the steering holds while any worker's listener is open.
    pub(super) fn steer(&mut self, in_use: usize) {
        self.steered = in_use;
        for listener in &self.gate.listeners {
            let Some(socket) = &listener.socket else { continue };
            if let Err(e) = spread::steer::steer(socket.as_raw_fd(), in_use as u32) {
                warn!(
                    "worker {}: listener {}: cannot steer new connections to the workers in use: {e}",
                    self.index, listener.settings.name
                );
            }
        }
    }

    /// Starts moving this worker's connections beyond its share (all of them when it is out
    /// of use), those that are only waiting for bytes; the rest get their turn on a later pass.
    fn hand_on_excess(&mut self, in_use: usize) {
        let counts = self.shared.open_connections();
        let excess = spread::to_hand_on(self.index, in_use, &counts, self.max_connections as u64);
        if excess == 0 {
            return;
        }
        let moving = self.conns.iter().filter(|(_, c)| c.conn.is_moving()).count() as u64;
        let wanted = excess.saturating_sub(moving).min(MOVES_PER_PASS) as usize;
        // A pass runs at most a few times a second: a small list beats threading a limit
        // through for_each_conn.
        let slots: Vec<usize> =
            self.conns.iter().filter(|(_, c)| c.conn.can_move()).map(|(slot, _)| slot).take(wanted).collect();
        for slot in slots {
            self.step(slot, |conn, ops| {
                conn.begin_move(ops);
            });
        }
    }

    /// A connection's waits are stopped: hand it to the worker in use with the fewest
    /// connections, or, if there is none with room any more (or this worker is draining),
    /// let it relay on here.
    pub(super) fn move_away(&mut self, slot: usize) {
        let counts = self.shared.open_connections();
        let to = match self.mode {
            Mode::Running => {
                spread::destination(self.index, self.shared.workers_in_use(), &counts, self.max_connections as u64)
            }
            Mode::Draining => None,
        };
        let Some(to) = to else {
            return self.step(slot, |conn, ops| conn.arrive(ops));
        };
        let Some(handoff) = self.handoff.clone() else { return };
        let shared = Arc::clone(&self.shared);
        let Some(pack) = shared.pack() else { return };
        let conn = self.remove_conn(slot);
        match handoff.hand_over(to, conn, pack) {
            Ok(()) => {
                self.shared.ring(to);
                self.stats().moved.add(1);
            }
            // That worker has finished: the connection stays here.
            Err(conn) => self.adopt(conn),
        }
    }

    /// The connections handed to this worker since it last looked; with `close`, it takes no
    /// more after these (it is finishing).
    pub(super) fn take_handed_over(&self, close: bool) -> Vec<Slot> {
        match (&self.handoff, self.shared.pack()) {
            (Some(handoff), Some(pack)) => handoff.take(self.index, close, pack),
            _ => Vec::new(),
        }
    }

    /// Takes in a connection another worker handed over and starts its waits in this ring.
    /// What happened while it was on its way applies to it now: the drain deadline passed, or
    /// its backend was marked down since it connected, in a pool that cuts such connections
    /// (this worker cut its own when it installed that snapshot, before it looked at its inbox;
    /// a backend that went down and came back up meanwhile counts as down).
    pub(super) fn adopt(&mut self, entry: Slot) {
        let slot = self.insert_conn(entry);
        self.step(slot, |conn, ops| conn.arrive(ops));
        self.relocate(slot);
        let entry = &self.conns[slot];
        let pool = self.snapshot.pools.get(entry.pool as usize);
        if self.closing_all {
            self.stats().drain_closed.add(1);
            self.step(slot, |conn, ops| conn.close(End::Killed, ops));
        } else if let (Some(pool), Some(held)) = (pool, entry.backend.as_ref())
            && pool.cuts(held.index, held.downs)
        {
            self.stats().backend_down_closed.add(1);
            self.step(slot, |conn, ops| conn.cut(ops));
        }
    }
}
