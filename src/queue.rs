//! Backend queues: connections that wait for a backend below its `max_conns` (HAProxy's
//! maxconn and queue), first come, first served over all workers.
//!
//! Each worker keeps its own waiting connections of a pool in a [`LocalQueue`], oldest first.
//! What the workers share is a [`PoolQueue`] per pool: how many connections wait anywhere, a
//! ticket counter that orders them, and each worker's oldest ticket. A worker with a freed
//! backend slot serves its own oldest waiter only if no other worker has an older one; if one
//! does, it wakes that worker instead. New connections queue behind any that wait.
//!
//! [`serve`] is the one loop that moves a queue. It takes a backend slot *before* it lets a
//! waiter go (the slot is reserved for that connection), so a served connection never finds the
//! backend full again and never re-enters the queue: each turn of the loop removes a waiter or
//! stops. The worker supplies the pieces that need its state through [`QueueHost`]; the tests
//! below drive the same loop with a model of several workers.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};

/// No waiter: the head a worker publishes when its queue is empty.
const NONE: u64 = u64::MAX;

/// What the workers share about one pool's queue.
#[derive(Debug)]
pub struct PoolQueue {
    /// Connections waiting in any worker.
    waiting: AtomicU64,
    next_ticket: AtomicU64,
    /// Per worker: the ticket of its oldest waiting connection, or [`NONE`].
    heads: Box<[AtomicU64]>,
}

impl PoolQueue {
    pub fn new(workers: usize) -> PoolQueue {
        PoolQueue {
            waiting: AtomicU64::new(0),
            next_ticket: AtomicU64::new(0),
            heads: (0..workers).map(|_| AtomicU64::new(NONE)).collect(),
        }
    }

    /// Connections waiting in any worker.
    pub fn waiting(&self) -> u64 {
        self.waiting.load(Ordering::Acquire)
    }

    /// Counts one more waiting connection and returns its ticket (its place in line).
    pub fn join(&self) -> u64 {
        self.waiting.fetch_add(1, Ordering::AcqRel);
        self.next_ticket.fetch_add(1, Ordering::AcqRel)
    }

    /// A waiting connection left the line (served, given up, or gone).
    pub fn leave(&self) {
        self.waiting.fetch_sub(1, Ordering::AcqRel);
    }

    fn set_head(&self, worker: usize, ticket: Option<u64>) {
        self.heads[worker].store(ticket.unwrap_or(NONE), Ordering::Release);
    }

    /// The worker other than `me` with the oldest waiter, if its ticket is below `before`.
    fn oldest_elsewhere(&self, me: usize, before: u64) -> Option<usize> {
        let (worker, ticket) = self
            .heads
            .iter()
            .enumerate()
            .filter(|(w, _)| *w != me)
            .map(|(w, head)| (w, head.load(Ordering::Acquire)))
            .min_by_key(|(_, ticket)| *ticket)?;
        (ticket < before).then_some(worker)
    }
}

/// One waiting connection, as its worker's queue holds it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Waiter {
    pub slot: usize,
    pub generation: u32,
    pub ticket: u64,
}

/// One worker's waiting connections of one pool, oldest first.
#[derive(Debug, Default)]
pub struct LocalQueue {
    entries: VecDeque<Waiter>,
}

impl LocalQueue {
    /// Adds a waiter that just joined `shared` (its ticket is the newest of this worker's) and,
    /// if it is this worker's only one, says so at once, so no other worker serves a younger
    /// waiter first.
    pub fn push(&mut self, waiter: Waiter, shared: &PoolQueue, me: usize) {
        debug_assert!(self.entries.back().is_none_or(|last| last.ticket < waiter.ticket));
        if self.entries.is_empty() {
            shared.set_head(me, Some(waiter.ticket));
        }
        self.entries.push_back(waiter);
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The waiters, oldest first (when the queue is dissolved: its pool left the config).
    pub fn into_waiters(self) -> Vec<Waiter> {
        self.entries.into()
    }
}

/// The outcome of trying to take a backend slot for a waiter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Taken {
    /// A slot on this backend is now held for the connection.
    Backend(usize),
    /// Every backend the connection may still try is at its `max_conns`.
    Full,
    /// The connection has tried every backend it may: it cannot be served.
    Exhausted,
}

/// What [`serve`] needs from the worker that owns the queue.
pub trait QueueHost {
    /// Whether the connection is still waiting (it may have left: closed, timed out).
    fn is_waiting(&self, waiter: &Waiter) -> bool;
    /// Tries to take a backend slot for the waiter.
    fn take_backend(&mut self, waiter: &Waiter) -> Taken;
    /// Whether any backend of the pool has room now (to decide whether waking a worker helps).
    fn has_room(&self) -> bool;
    /// The waiter got `backend`'s slot: start its connect. It left the line.
    fn resume(&mut self, waiter: Waiter, backend: usize);
    /// The waiter can reach no backend: close it. It left the line.
    fn give_up(&mut self, waiter: Waiter);
    /// Wakes `worker` to serve its queue.
    fn ring(&mut self, worker: usize);
}

/// Serves worker `me`'s queue of one pool while a backend has room and its oldest waiter is the
/// oldest of all workers'; wakes the worker with an older one instead. Call it whenever a slot
/// of the pool frees, a waiter leaves, a connection joins, or the pool's backends change.
pub fn serve(queue: &mut LocalQueue, shared: &PoolQueue, me: usize, host: &mut impl QueueHost) {
    loop {
        while queue.entries.front().is_some_and(|w| !host.is_waiting(w)) {
            queue.entries.pop_front();
        }
        let front = queue.entries.front().copied();
        shared.set_head(me, front.map(|w| w.ticket));
        let Some(waiter) = front else {
            // Nothing waits here; if something waits elsewhere and there is room, say so.
            if shared.waiting() > 0
                && host.has_room()
                && let Some(other) = shared.oldest_elsewhere(me, NONE)
            {
                host.ring(other);
            }
            return;
        };
        if let Some(other) = shared.oldest_elsewhere(me, waiter.ticket) {
            if host.has_room() {
                host.ring(other);
            }
            return;
        }
        match host.take_backend(&waiter) {
            Taken::Full => return,
            Taken::Backend(backend) => {
                queue.entries.pop_front();
                shared.leave();
                host.resume(waiter, backend);
            }
            Taken::Exhausted => {
                queue.entries.pop_front();
                shared.leave();
                host.give_up(waiter);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};

    use proptest::prelude::*;

    use super::*;

    /// Several workers sharing backends with `max_conns`, driven by random arrivals, departures
    /// of served connections, waiters leaving (timeouts, clients gone) and doorbells.
    struct Model {
        workers: Vec<LocalQueue>,
        shared: PoolQueue,
        /// Per backend: open connections and the limit.
        backends: Vec<(u32, u32)>,
        /// Connections by id: the worker they are on, and their ticket while waiting.
        waiting: BTreeMap<usize, (usize, u64)>,
        /// Served connections and their backend.
        served: BTreeMap<usize, usize>,
        /// Served tickets, in the order they were served.
        order: Vec<u64>,
        /// Workers whose doorbell rang.
        rung: BTreeSet<usize>,
        next_id: usize,
        /// Calls of `take_backend` in the current `serve`: bounds the loop.
        turns: usize,
    }

    /// The host, as one worker sees the model.
    struct Host<'a> {
        me: usize,
        backends: &'a mut Vec<(u32, u32)>,
        waiting: &'a mut BTreeMap<usize, (usize, u64)>,
        served: &'a mut BTreeMap<usize, usize>,
        order: &'a mut Vec<u64>,
        rung: &'a mut BTreeSet<usize>,
        turns: &'a mut usize,
    }

    impl QueueHost for Host<'_> {
        fn is_waiting(&self, waiter: &Waiter) -> bool {
            self.waiting.get(&waiter.slot).is_some_and(|&(w, t)| w == self.me && t == waiter.ticket)
        }

        fn take_backend(&mut self, _: &Waiter) -> Taken {
            *self.turns += 1;
            assert!(*self.turns < 10_000, "serve does not stop");
            match self.backends.iter().position(|(open, max)| open < max) {
                Some(b) => {
                    self.backends[b].0 += 1;
                    Taken::Backend(b)
                }
                None => Taken::Full,
            }
        }

        fn has_room(&self) -> bool {
            self.backends.iter().any(|(open, max)| open < max)
        }

        fn resume(&mut self, waiter: Waiter, backend: usize) {
            let (_, ticket) = self.waiting.remove(&waiter.slot).expect("a waiting connection");
            // First come, first served: nobody still waiting came before it.
            assert!(self.waiting.values().all(|&(_, t)| t > ticket), "served {ticket} before an older waiter");
            self.order.push(ticket);
            self.served.insert(waiter.slot, backend);
        }

        fn give_up(&mut self, _: Waiter) {
            unreachable!("every waiter may use every backend here");
        }

        fn ring(&mut self, worker: usize) {
            self.rung.insert(worker);
        }
    }

    impl Model {
        fn new(workers: usize, limits: &[u32]) -> Model {
            Model {
                workers: (0..workers).map(|_| LocalQueue::default()).collect(),
                shared: PoolQueue::new(workers),
                backends: limits.iter().map(|&max| (0, max)).collect(),
                waiting: BTreeMap::new(),
                served: BTreeMap::new(),
                order: Vec::new(),
                rung: BTreeSet::new(),
                next_id: 0,
                turns: 0,
            }
        }

        fn serve(&mut self, me: usize) {
            self.turns = 0;
            let mut host = Host {
                me,
                backends: &mut self.backends,
                waiting: &mut self.waiting,
                served: &mut self.served,
                order: &mut self.order,
                rung: &mut self.rung,
                turns: &mut self.turns,
            };
            serve(&mut self.workers[me], &self.shared, me, &mut host);
        }

        /// A new connection on worker `w`, as the worker's connect does it: straight to a
        /// backend if nobody waits and one has room, else into the queue.
        fn arrive(&mut self, w: usize) {
            let id = self.next_id;
            self.next_id += 1;
            if self.shared.waiting() == 0
                && let Some(b) = self.backends.iter().position(|(open, max)| open < max)
            {
                self.backends[b].0 += 1;
                self.served.insert(id, b);
                return;
            }
            let ticket = self.shared.join();
            self.waiting.insert(id, (w, ticket));
            self.workers[w].push(Waiter { slot: id, generation: 0, ticket }, &self.shared, w);
            // The worker serves its queues once it has handled the batch it is in.
            self.rung.insert(w);
        }

        /// A served connection closes on its worker: its slot frees and that worker serves.
        fn depart(&mut self, pick: usize, w: usize) {
            let Some(&id) = self.served.keys().nth(pick % self.served.len().max(1)) else { return };
            let b = self.served.remove(&id).unwrap();
            self.backends[b].0 -= 1;
            self.rung.insert(w);
        }

        /// A waiting connection leaves (queue timeout, client gone); its worker serves.
        fn leave(&mut self, pick: usize) {
            let Some(&id) = self.waiting.keys().nth(pick % self.waiting.len().max(1)) else { return };
            let (w, _) = self.waiting.remove(&id).unwrap();
            self.shared.leave();
            self.rung.insert(w);
        }

        /// Workers answer their doorbells, in an order `seed` picks, until none rings.
        fn settle(&mut self, mut seed: u64) {
            let mut rounds = 0;
            while !self.rung.is_empty() {
                seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                let w = *self.rung.iter().nth((seed >> 33) as usize % self.rung.len()).unwrap();
                self.rung.remove(&w);
                self.serve(w);
                rounds += 1;
                assert!(rounds < 1000, "workers keep waking each other");
            }
        }

        /// Nobody waits while a backend has room.
        fn assert_progress(&self) {
            let room = self.backends.iter().any(|(open, max)| open < max);
            assert!(!room || self.waiting.is_empty(), "{} wait while a backend has room", self.waiting.len());
            assert_eq!(self.shared.waiting(), self.waiting.len() as u64);
        }
    }

    #[derive(Debug, Clone, Copy)]
    enum Action {
        Arrive(usize),
        Depart(usize, usize),
        Leave(usize),
    }

    fn action(workers: usize) -> impl Strategy<Value = Action> {
        prop_oneof![
            4 => (0..workers).prop_map(Action::Arrive),
            3 => (any::<usize>(), 0..workers).prop_map(|(p, w)| Action::Depart(p, w)),
            1 => any::<usize>().prop_map(Action::Leave),
        ]
    }

    #[test]
    fn two_waiters_and_a_freed_slot_serve_the_first_and_stop() {
        // The defect this module replaced: max_conns = 1, c1 served, c2 and c3 waiting, c1
        // closes. The worker used to requeue c2 behind c3 and loop forever.
        let mut model = Model::new(1, &[1]);
        for _ in 0..3 {
            model.arrive(0);
            model.settle(0);
        }
        assert_eq!((model.served.len(), model.waiting.len()), (1, 2));
        model.depart(0, 0);
        model.settle(0);
        assert_eq!(model.order, vec![0], "c2 (ticket 0) is served");
        assert_eq!(model.waiting.len(), 1, "c3 still waits");
        model.depart(0, 0);
        model.settle(0);
        assert_eq!(model.order, vec![0, 1]);
        model.assert_progress();
    }

    #[test]
    fn a_slot_freed_in_one_worker_goes_to_the_older_waiter_in_another() {
        let mut model = Model::new(2, &[1]);
        model.arrive(0); // served on worker 0
        model.arrive(1); // ticket 0, waits on worker 1
        model.arrive(0); // ticket 1, waits on worker 0
        model.settle(0);
        model.depart(0, 0);
        model.rung.clear();
        model.serve(0);
        // Worker 0 does not take the slot for its own (younger) waiter; it wakes worker 1.
        assert!(model.order.is_empty() && model.rung.contains(&1));
        model.settle(0);
        assert_eq!(model.order, vec![0]);
        model.assert_progress();
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(500))]

        /// Whatever arrives, departs and leaves, in any worker: once the doorbells are answered
        /// nobody waits while a backend has room, waiters are served in ticket order, and no
        /// call of `serve` loops.
        #[test]
        fn queue_makes_progress_first_come_first_served(
            workers in 1usize..4,
            limits in proptest::collection::vec(1u32..4, 1..4),
            steps in proptest::collection::vec((action(3), any::<u64>()), 1..300),
        ) {
            let mut model = Model::new(workers, &limits);
            for (action, seed) in steps {
                match action {
                    Action::Arrive(w) => model.arrive(w % workers),
                    Action::Depart(p, w) => model.depart(p, w % workers),
                    Action::Leave(p) => model.leave(p),
                }
                // Sometimes two things happen before the workers look.
                if seed % 3 != 0 {
                    model.settle(seed);
                    model.assert_progress();
                }
            }
            model.settle(1);
            model.assert_progress();
            let mut sorted = model.order.clone();
            sorted.sort_unstable();
            prop_assert_eq!(&sorted, &model.order, "served out of order");
            // Drain: every served connection closes; every waiter gets its turn.
            while !model.served.is_empty() {
                model.depart(0, 0);
                model.settle(7);
                model.assert_progress();
            }
            prop_assert!(model.waiting.is_empty());
        }
    }
}
