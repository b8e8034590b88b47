//! A reload as one worker applies it, in one step: the listeners a reload added start
//! accepting, those it removed stop (their connections drain, closed `drain_timeout` later if
//! still open), those it kept take their new settings for new connections, and the new pool
//! snapshot comes into use. Pools and backends may have moved: every connection is re-pointed
//! by pool name and backend address; one whose backend (or pool) left the config keeps
//! relaying, and gives its backend slot back to the counters it holds. Connections waiting for
//! a pool the reload removed are closed.

use std::sync::Arc;
use std::sync::mpsc::Sender;
use std::time::Duration;

use io_uring::{opcode, types};

use super::gate::Listener;
use super::{Kind, Mode, Token, Worker, WorkerListener, picker_seed, tick_interval, timespec};
use crate::pool::{Picker, Snapshot};

/// A slot's pool index once its pool left the config.
pub(super) const NO_POOL: u32 = u32::MAX;
/// A held backend's index once it left the config (it matches no backend, so it is never
/// cut).
pub(super) const NO_BACKEND: u32 = u32::MAX;

/// What a reload changes in one worker. Listener indices are the same in every worker.
#[derive(Debug)]
pub struct WorkerChange {
    /// The snapshot of the new config's pools (a new layout).
    pub snapshot: Arc<Snapshot>,
    /// New listeners, each with this worker's socket.
    pub added: Vec<WorkerListener>,
    /// Kept listeners (their sockets too) with their new settings.
    pub updated: Vec<(usize, super::ListenerSettings)>,
    /// Listeners to stop accepting on and drain.
    pub removed: Vec<usize>,
    pub drain_timeout: Duration,
    /// Told this worker's index once the change is applied.
    pub applied: Sender<usize>,
}

impl Worker {
    /// Applies the reloads posted to this worker, oldest first.
    pub(super) fn take_changes(&mut self) {
        while let Ok(change) = self.changes.try_recv() {
            self.apply_change(change);
        }
    }

    fn apply_change(&mut self, change: WorkerChange) {
        self.drain_timeout = change.drain_timeout;
        self.timers.drain = timespec(change.drain_timeout);
        for l in change.removed {
            self.gate.retire(l, self.now);
        }
        for (l, settings) in change.updated {
            self.gate.listeners[l].update(settings);
        }
        for listener in change.added {
            self.gate.add(listener.index, Listener::new(listener));
        }
        if self.mode == Mode::Draining {
            // Stopping anyway: a listener added meanwhile takes nothing.
            self.gate.close_idle(true);
        } else if self.shared.pack().is_some() {
            self.steer(self.shared.workers_in_use());
        }
        self.relayout(change.snapshot);
        self.regate();
        self.gate.close_idle(false);
        self.arm_tick();
        let _ = change.applied.send(self.index);
    }

    /// Takes a snapshot of a new layout into use (see the module comment).
    fn relayout(&mut self, snapshot: Arc<Snapshot>) {
        let old = std::mem::replace(&mut self.snapshot, snapshot);
        let moved: Vec<u32> = old
            .pools
            .iter()
            .map(|p| self.snapshot.pool_index(&p.settings.name).map_or(NO_POOL, |i| i as u32))
            .collect();
        for (_, entry) in self.conns.iter_mut() {
            let Some(&pool) = moved.get(entry.pool as usize) else { continue };
            if let Some(held) = entry.backend.as_mut() {
                let address = old.pools[entry.pool as usize].backends.get(held.index as usize).map(|b| b.address);
                held.index = self
                    .snapshot
                    .pools
                    .get(pool as usize)
                    .and_then(|p| p.backends.iter().position(|b| Some(b.address) == address))
                    .map_or(NO_BACKEND, |i| i as u32);
            }
            // The backends it failed to reach are numbered differently now.
            entry.failed.clear();
            entry.pool = pool;
            entry.layout = self.snapshot.layout;
        }
        self.pickers = self
            .snapshot
            .pools
            .iter()
            .enumerate()
            .map(|(p, pool)| Picker::new(pool, picker_seed(self.index, p)))
            .collect();
        // Waiters follow their pool; those of a pool that is gone are closed.
        for (old_pool, waiters) in self.waiters.relayout(&moved, self.snapshot.pools.len()) {
            for waiter in waiters {
                let waiting = self.conns.get(waiter.slot).is_some_and(|c| c.generation == waiter.generation);
                let now = self.now;
                if waiting && self.conns[waiter.slot].leave_queue(now) {
                    old.pools[old_pool].queue.leave();
                    self.step(waiter.slot, |conn, ops| conn.give_up_waiting(ops));
                }
            }
        }
        self.retired.push(old);
    }

    /// Points a connection that arrived from another worker at this worker's layout: a reload
    /// may have renumbered pools and backends while it was on its way. (Only a relaying
    /// connection moves, and it holds its backend's counters, which every layout keeps.)
    pub(super) fn relocate(&mut self, slot: usize) {
        let layout = self.snapshot.layout;
        let entry = &mut self.conns[slot];
        if entry.layout == layout {
            return;
        }
        entry.layout = layout;
        entry.failed.clear();
        let Some(held) = entry.backend.as_mut() else { return };
        let found = self.snapshot.pools.iter().enumerate().find_map(|(p, pool)| {
            let b = pool.backends.iter().position(|b| Arc::ptr_eq(&b.counters, &held.counters))?;
            Some((p as u32, b as u32))
        });
        (entry.pool, held.index) = found.unwrap_or((NO_POOL, NO_BACKEND));
    }

    /// Arms the tick that closes idle connections and slow handshakes, or re-arms it when the
    /// interval the listeners and pools need changed.
    pub(super) fn arm_tick(&mut self) {
        let shortest = self
            .gate
            .listeners
            .iter()
            .filter(|l| l.retired_at.is_none())
            .map(|l| &l.settings)
            .flat_map(|l| [l.idle_timeout, l.admission.reads_first().then_some(l.handshake_timeout)])
            .chain(self.snapshot.pools.iter().map(|p| p.limited.then_some(p.settings.queue_timeout)))
            .chain(std::iter::once(
                self.gate.listeners.iter().any(|l| l.retired_at.is_some()).then_some(self.drain_timeout),
            ))
            .flatten()
            .min();
        let interval = tick_interval(shortest);
        if self.tick == Some(interval) || self.cancel_all_sent {
            return;
        }
        if self.tick.is_some() {
            let token = Token::new(Kind::Tick, self.tick_generation as usize, 0).encode();
            self.push_misc(
                opcode::AsyncCancel2::new(types::CancelBuilder::user_data(token)).build(),
                Kind::TickCancel,
                0,
            );
        }
        self.tick = Some(interval);
        self.tick_generation = self.tick_generation.wrapping_add(1);
        self.timers.tick = timespec(interval);
        self.push_misc(
            opcode::Timeout::new(&self.timers.tick).count(0).flags(types::TimeoutFlags::MULTISHOT).build(),
            Kind::Tick,
            self.tick_generation as usize,
        );
    }
}
