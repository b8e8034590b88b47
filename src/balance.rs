//! Choosing a backend for a new connection.
//!
//! A [`Picker`] is a worker's own balancing state for one pool: it needs no lock because no
//! other thread touches it. Retries after a failed connect walk the pool in order from the
//! backend that failed, so every backend is tried at most once per connection.

use crate::config::Algorithm;
use crate::pool::Pool;

/// Weighted smooth round robin, as nginx does it: every pick adds each backend's weight to its
/// running score, takes the highest (the first on ties) and subtracts the total weight from it.
/// Weights 5, 1, 1 give a, a, b, a, c, a, a: heavy backends are spread out, not bunched.
#[derive(Debug, Clone)]
pub struct SmoothRoundRobin {
    current: Vec<i64>,
}

impl SmoothRoundRobin {
    pub fn new(backends: usize) -> SmoothRoundRobin {
        SmoothRoundRobin { current: vec![0; backends] }
    }

    /// Picks the next backend for `weights`; `weights` must have the length given to `new`.
    pub fn pick(&mut self, weights: impl ExactSizeIterator<Item = u32>) -> usize {
        debug_assert_eq!(weights.len(), self.current.len());
        let mut total = 0;
        let mut best = 0;
        for (i, weight) in weights.enumerate() {
            total += i64::from(weight);
            self.current[i] += i64::from(weight);
            if self.current[i] > self.current[best] {
                best = i;
            }
        }
        self.current[best] -= total;
        best
    }
}

/// A worker's balancing state for one pool.
#[derive(Debug, Clone)]
pub enum Picker {
    RoundRobin(SmoothRoundRobin),
}

impl Picker {
    pub fn new(pool: &Pool) -> Picker {
        match pool.algorithm {
            Algorithm::RoundRobin => Picker::RoundRobin(SmoothRoundRobin::new(pool.backends.len())),
        }
    }

    /// The backend for a new connection.
    pub fn pick(&mut self, pool: &Pool) -> usize {
        match self {
            Picker::RoundRobin(rr) => rr.pick(pool.backends.iter().map(|b| b.weight)),
        }
    }

    /// The backend to try after `failed` could not be reached.
    pub fn next_after(&self, pool: &Pool, failed: usize) -> usize {
        (failed + 1) % pool.backends.len().max(1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sequence(weights: &[u32], n: usize) -> Vec<usize> {
        let mut rr = SmoothRoundRobin::new(weights.len());
        (0..n).map(|_| rr.pick(weights.iter().copied())).collect()
    }

    #[test]
    fn matches_nginx_sequence() {
        // nginx's documented example for weights a=5, b=1, c=1: a a b a c a a.
        assert_eq!(sequence(&[5, 1, 1], 7), vec![0, 0, 1, 0, 2, 0, 0]);
        // Equal weights rotate in order.
        assert_eq!(sequence(&[1, 1, 1], 6), vec![0, 1, 2, 0, 1, 2]);
        assert_eq!(sequence(&[1, 2], 6), vec![1, 0, 1, 1, 0, 1]);
    }

    #[test]
    fn shares_follow_weights_exactly_per_cycle() {
        let weights = [3, 1, 4, 1, 5];
        let total: u32 = weights.iter().sum();
        let picks = sequence(&weights, total as usize * 10);
        for (i, w) in weights.iter().enumerate() {
            assert_eq!(picks.iter().filter(|&&p| p == i).count(), *w as usize * 10);
        }
    }

    #[test]
    fn single_backend() {
        assert_eq!(sequence(&[7], 3), vec![0, 0, 0]);
    }
}
