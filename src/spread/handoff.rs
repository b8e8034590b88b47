//! Handing open connections from one worker to another (`spread = "pack"`): one inbox per
//! worker, which the receiving worker empties when its doorbell rings. Generic over what is
//! handed over, so the control side, which counts what is in transit, never sees a connection.

use std::sync::Mutex;

use super::Pack;

/// One inbox per worker.
#[derive(Debug)]
pub struct Handoff<T> {
    inboxes: Box<[Mutex<Inbox<T>>]>,
}

#[derive(Debug)]
struct Inbox<T> {
    items: Vec<T>,
    /// The worker has finished: it takes no more.
    closed: bool,
}

impl<T> Handoff<T> {
    pub fn new(workers: usize) -> Handoff<T> {
        Handoff { inboxes: (0..workers).map(|_| Mutex::new(Inbox { items: Vec::new(), closed: false })).collect() }
    }

    /// Puts `item` in worker `to`'s inbox and counts it in transit there (the caller then
    /// wakes `to`); gives it back if that worker has finished.
    pub fn hand_over(&self, to: usize, item: T, pack: &Pack) -> Result<(), T> {
        let mut inbox = self.inboxes[to].lock().unwrap_or_else(|e| e.into_inner());
        if inbox.closed {
            return Err(item);
        }
        inbox.items.push(item);
        pack.arriving(to, 1);
        Ok(())
    }

    /// What was handed to `worker` since it last looked; with `close`, it takes no more after
    /// these (a worker that is finishing).
    pub fn take(&self, worker: usize, close: bool, pack: &Pack) -> Vec<T> {
        let mut inbox = self.inboxes[worker].lock().unwrap_or_else(|e| e.into_inner());
        inbox.closed |= close;
        let items = std::mem::take(&mut inbox.items);
        pack.arrived(worker, items.len() as u64);
        items
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn items_wait_counted_in_transit_until_taken() {
        let pack = Pack::new(2);
        let handoff = Handoff::new(2);
        assert!(handoff.hand_over(1, "a", &pack).is_ok());
        assert!(handoff.hand_over(1, "b", &pack).is_ok());
        assert_eq!(pack.in_transit(1), 2);
        assert_eq!(handoff.take(1, false, &pack), ["a", "b"]);
        assert_eq!(pack.in_transit(1), 0);
        assert!(handoff.take(1, false, &pack).is_empty());
    }

    #[test]
    fn a_worker_that_is_finishing_hands_back_what_comes_later() {
        let pack = Pack::new(2);
        let handoff = Handoff::new(2);
        assert!(handoff.hand_over(0, 1, &pack).is_ok());
        // Finishing: it takes what came, and nothing after.
        assert_eq!(handoff.take(0, true, &pack), [1]);
        assert_eq!(handoff.hand_over(0, 2, &pack), Err(2), "the sender keeps it");
        assert_eq!(pack.in_transit(0), 0, "nothing counted for a refused hand-over");
    }
}
