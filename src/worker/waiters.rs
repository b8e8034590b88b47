//! Connections waiting for a backend below its `max_conns`: this worker's side of the
//! backend queues ([`crate::queue`]). A connection joins when every backend it may use is
//! full (or others already wait); the queues are served after each batch of completions and
//! on every doorbell, so a freed slot never serves a queue from inside another connection's
//! step.

use std::sync::Arc;

use super::Worker;
use super::slot::Held;
use crate::queue::{self, LocalQueue, QueueHost, Taken, Waiter};

/// This worker's waiting connections, per pool, and the pools to look at.
#[derive(Debug, Default)]
pub(super) struct Queues {
    local: Vec<LocalQueue>,
    /// Pools whose queue may move (a slot freed, a waiter left or joined), each once.
    work: Vec<usize>,
    marked: Vec<bool>,
}

impl Queues {
    pub(super) fn new(pools: usize) -> Queues {
        Queues {
            local: (0..pools).map(|_| LocalQueue::default()).collect(),
            work: Vec::new(),
            marked: vec![false; pools],
        }
    }

    fn mark(&mut self, pool: usize) {
        if !std::mem::replace(&mut self.marked[pool], true) {
            self.work.push(pool);
        }
    }
}

impl Worker {
    /// The connection waits in its pool's queue: nothing is submitted until a slot is reserved
    /// for it (or it times out, or its client goes).
    pub(super) fn enqueue(&mut self, slot: usize) {
        let entry = &mut self.conns[slot];
        let pool = entry.pool as usize;
        entry.conn.defer_connect();
        entry.queued_since = Some(self.now);
        let shared = &self.shared.queues[pool];
        let waiter = Waiter { slot, generation: entry.generation, ticket: shared.join() };
        self.queues.local[pool].push(waiter, shared, self.index);
        self.stats().queued.add(1);
        // A backend may have room all the same (it waited only behind others): look soon.
        self.queues.mark(pool);
    }

    /// Asks for `pool`'s queue to be served once the current batch is handled.
    pub(super) fn queue_work(&mut self, pool: usize) {
        self.queues.mark(pool);
    }

    /// Asks for every pool's queue to be served (the backends' health may have changed).
    pub(super) fn queue_work_all(&mut self) {
        for pool in 0..self.queues.local.len() {
            self.queues.mark(pool);
        }
    }

    /// Serves the queues asked for since the last call.
    pub(super) fn serve_queues(&mut self) {
        while let Some(pool) = self.queues.work.pop() {
            self.queues.marked[pool] = false;
            if self.queues.local[pool].is_empty() && self.shared.queues[pool].waiting() == 0 {
                continue;
            }
            let shared = Arc::clone(&self.shared);
            let mut local = std::mem::take(&mut self.queues.local[pool]);
            queue::serve(&mut local, &shared.queues[pool], self.index, &mut PoolHost { worker: self, pool });
            // Serving only resumes or closes connections; none can join this queue meanwhile.
            debug_assert!(self.queues.local[pool].is_empty());
            self.queues.local[pool] = local;
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
        let pool = &self.worker.snapshot.pools[self.pool];
        let counters = &self.worker.shared.backends[self.pool];
        pool.usable().iter().any(|&b| counters[b as usize].has_room(pool.backends[b as usize].max_conns))
    }

    fn resume(&mut self, waiter: Waiter, backend: usize) {
        let pool = &self.worker.snapshot.pools[self.pool];
        let entry = &mut self.worker.conns[waiter.slot];
        entry.queued_since = None;
        entry.backend = Some(Held { index: backend as u32, downs: pool.downs[backend] });
        self.worker.step(waiter.slot, |conn, ops| conn.resume(ops));
    }

    fn give_up(&mut self, waiter: Waiter) {
        self.worker.conns[waiter.slot].queued_since = None;
        self.worker.step(waiter.slot, |conn, ops| conn.give_up_waiting(ops));
    }

    fn ring(&mut self, worker: usize) {
        self.worker.shared.ring(worker);
    }
}
