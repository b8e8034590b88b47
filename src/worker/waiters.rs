//! What this worker's connections wait for, and serving them once the current batch of
//! completions is handled (never from inside another connection's step):
//!
//! - a backend below its `max_conns`: this worker's side of the backend queues
//!   ([`crate::queue`]); a connection joins when every backend it may use is full (or others
//!   already wait), and the queues are also served on every doorbell;
//! - a ring buffer: a direction whose receive found the buffer ring empty waits, oldest first,
//!   for one of the buffers recycled meanwhile.

use std::collections::VecDeque;
use std::sync::Arc;

use super::Worker;
use super::slot::Held;
use crate::conn::Dir;
use crate::queue::{self, LocalQueue, QueueHost, Taken, Waiter};

/// This worker's waiting connections.
#[derive(Debug, Default)]
pub(super) struct Waiters {
    /// Per pool: connections waiting for a backend slot.
    local: Vec<LocalQueue>,
    /// Pools whose queue may move (a slot freed, a waiter left or joined), each once.
    work: Vec<usize>,
    marked: Vec<bool>,
    /// Directions waiting for a buffer, oldest first, with their connection's generation.
    starved: VecDeque<(usize, u32, Dir)>,
    /// Buffers recycled since starved directions were last served.
    recycled: usize,
}

impl Waiters {
    pub(super) fn new(pools: usize) -> Waiters {
        Waiters {
            local: (0..pools).map(|_| LocalQueue::default()).collect(),
            work: Vec::new(),
            marked: vec![false; pools],
            starved: VecDeque::new(),
            recycled: 0,
        }
    }

    /// The pools moved (a reload): pool `p`'s queue is now pool `moved[p]`'s (`NO_POOL`: gone),
    /// of `pools` in all. Returns the waiters of the pools that are gone, by their old index.
    pub(super) fn relayout(&mut self, moved: &[u32], pools: usize) -> Vec<(usize, Vec<Waiter>)> {
        let mut local: Vec<LocalQueue> = (0..pools).map(|_| LocalQueue::default()).collect();
        let mut gone = Vec::new();
        for (old, queue) in std::mem::take(&mut self.local).into_iter().enumerate() {
            match moved.get(old).and_then(|&p| local.get_mut(p as usize)) {
                Some(slot) => *slot = queue,
                None if !queue.is_empty() => gone.push((old, queue.into_waiters())),
                None => {}
            }
        }
        self.local = local;
        self.work.clear();
        self.marked = vec![false; pools];
        gone
    }

    /// A direction found no buffer: it waits for the next one recycled.
    pub(super) fn starve(&mut self, slot: usize, generation: u32, dir: Dir) {
        self.starved.push_back((slot, generation, dir));
    }

    /// A buffer went back to the ring.
    pub(super) fn recycled(&mut self) {
        self.recycled += 1;
    }

    fn mark(&mut self, pool: usize) {
        if !std::mem::replace(&mut self.marked[pool], true) {
            self.work.push(pool);
        }
    }
}

impl Worker {
    /// Gives each buffer recycled this round to one starved direction, oldest first.
    pub(super) fn serve_starved(&mut self) {
        while self.waiters.recycled > 0
            && let Some((slot, generation, dir)) = self.waiters.starved.pop_front()
        {
            if self.conns.get(slot).is_some_and(|c| c.generation == generation && c.conn.is_starved(dir)) {
                self.waiters.recycled -= 1;
                self.step(slot, |conn, ops| conn.buffer_available(dir, ops));
            }
        }
        self.waiters.recycled = 0;
    }

    /// The connection waits in its pool's queue: nothing is submitted until a slot is reserved
    /// for it (or it times out, or its client goes).
    pub(super) fn enqueue(&mut self, slot: usize) {
        let entry = &mut self.conns[slot];
        let pool = entry.pool as usize;
        entry.conn.defer_connect();
        entry.queued_since = Some(self.now);
        let shared = &self.snapshot.pools[pool].queue;
        let waiter = Waiter { slot, generation: entry.generation, ticket: shared.join() };
        self.waiters.local[pool].push(waiter, shared, self.index);
        self.stats().queued.add(1);
        // A backend may have room all the same (it waited only behind others): look soon.
        self.waiters.mark(pool);
    }

    /// Asks for `pool`'s queue to be served once the current batch is handled.
    pub(super) fn queue_work(&mut self, pool: usize) {
        self.waiters.mark(pool);
    }

    /// Asks for every pool's queue to be served (the backends' health may have changed).
    pub(super) fn queue_work_all(&mut self) {
        for pool in 0..self.waiters.local.len() {
            self.waiters.mark(pool);
        }
    }

    /// Serves the queues asked for since the last call.
    pub(super) fn serve_queues(&mut self) {
        while let Some(pool) = self.waiters.work.pop() {
            self.waiters.marked[pool] = false;
            let shared = Arc::clone(&self.snapshot.pools[pool].queue);
            if self.waiters.local[pool].is_empty() && shared.waiting() == 0 {
                continue;
            }
            let mut local = std::mem::take(&mut self.waiters.local[pool]);
            queue::serve(&mut local, &shared, self.index, &mut PoolHost { worker: self, pool });
            // Serving only resumes or closes connections; none can join this queue meanwhile.
            debug_assert!(self.waiters.local[pool].is_empty());
            self.waiters.local[pool] = local;
        }
    }
}

/// One pool's queue as [`queue::serve`] sees this worker.
struct PoolHost<'a> {
    worker: &'a mut Worker,
    pool: usize,
}

impl QueueHost for PoolHost<'_> {
    fn is_waiting(&self, waiter: &Waiter) -> bool {
        self.worker.conns.get(waiter.slot).is_some_and(|c| c.generation == waiter.generation && c.conn.is_queued())
    }

    fn take_backend(&mut self, waiter: &Waiter) -> Taken {
        self.worker.take_backend(waiter.slot)
    }

    fn has_room(&self) -> bool {
        self.worker.snapshot.pools[self.pool].has_room()
    }

    fn resume(&mut self, waiter: Waiter, backend: usize) {
        let pool = &self.worker.snapshot.pools[self.pool];
        let now = self.worker.now;
        let entry = &mut self.worker.conns[waiter.slot];
        entry.leave_queue(now);
        entry.backend = Some(Held::new(pool, backend));
        self.worker.step(waiter.slot, |conn, ops| conn.resume(ops));
    }

    fn give_up(&mut self, waiter: Waiter) {
        let now = self.worker.now;
        self.worker.conns[waiter.slot].leave_queue(now);
        self.worker.step(waiter.slot, |conn, ops| conn.give_up_waiting(ops));
    }

    fn ring(&mut self, worker: usize) {
        self.worker.shared.ring(worker);
    }
}
