//! Weighted Maglev consistent hashing (Eisenbud et al., NSDI 2016, section 3.4; weights as
//! Envoy adds them).
//!
//! Each backend has a permutation of the table's slots, derived from two hashes of its name;
//! backends take turns claiming their next free preferred slot until all are taken. A lookup is
//! one hash and one array read. Removing a backend frees only its own slots, which the others
//! claim, so clients of the other backends stay where they were.
//!
//! The table depends only on the set of (name, weight) pairs: the input is sorted by name and
//! the hashes use fixed seeds, so every worker, process and machine builds the same table.

use super::hash::{SEED_OFFSET, SEED_SKIP, hash64};

/// One backend as the table sees it.
#[derive(Debug, Clone, Copy)]
pub struct Entry<'a> {
    /// Identifies the backend in hashing; its address, e.g. "10.0.0.1:5432".
    pub name: &'a str,
    pub weight: u32,
    /// What lookups return for this backend (its index in the pool).
    pub index: u32,
}

/// A built lookup table of `size` slots, each holding a backend index.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MaglevTable {
    slots: Box<[u32]>,
}

const EMPTY: u32 = u32::MAX;

impl MaglevTable {
    /// Builds a table of `size` slots (a prime) for `backends` (weights at least 1). With no
    /// backends the table is empty and lookups return `None`.
    pub fn build(backends: &[Entry<'_>], size: u32) -> MaglevTable {
        debug_assert!(size > 1);
        if backends.is_empty() {
            return MaglevTable { slots: Box::new([]) };
        }
        let mut sorted: Vec<Entry<'_>> = backends.to_vec();
        sorted.sort_by(|a, b| a.name.cmp(b.name).then(a.index.cmp(&b.index)));
        let m = u64::from(size);
        // Position in each backend's permutation, and its step through it.
        let mut position: Vec<u64> = sorted.iter().map(|b| hash64(SEED_OFFSET, b.name.as_bytes()) % m).collect();
        let skip: Vec<u64> = sorted.iter().map(|b| hash64(SEED_SKIP, b.name.as_bytes()) % (m - 1) + 1).collect();
        let max_weight = u64::from(sorted.iter().map(|b| b.weight.max(1)).max().unwrap_or(1));
        let mut target = vec![0u64; sorted.len()];
        let mut slots = vec![EMPTY; size as usize];
        let mut filled = 0u64;
        'rounds: for round in 0u64.. {
            for (i, backend) in sorted.iter().enumerate() {
                // A backend with half the top weight claims a slot every other round.
                if round * u64::from(backend.weight.max(1)) < target[i] {
                    continue;
                }
                target[i] += max_weight;
                // `skip` is in 1..m and m is prime, so the walk visits every slot.
                loop {
                    let slot = position[i] as usize;
                    position[i] = (position[i] + skip[i]) % m;
                    if slots[slot] == EMPTY {
                        slots[slot] = backend.index;
                        filled += 1;
                        break;
                    }
                }
                if filled == m {
                    break 'rounds;
                }
            }
        }
        MaglevTable { slots: slots.into_boxed_slice() }
    }

    /// The backend for a key hash.
    #[inline]
    pub fn lookup(&self, hash: u64) -> Option<u32> {
        if self.slots.is_empty() { None } else { Some(self.slots[(hash % self.slots.len() as u64) as usize]) }
    }

    pub fn len(&self) -> usize {
        self.slots.len()
    }

    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    /// The backend index in every slot, for tests and diagnostics.
    pub fn slots(&self) -> &[u32] {
        &self.slots
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn names(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("10.0.{}.{}:5432", i / 250, i % 250 + 1)).collect()
    }

    fn entries<'a>(names: &'a [String], weights: &[u32]) -> Vec<Entry<'a>> {
        names
            .iter()
            .zip(weights)
            .enumerate()
            .map(|(i, (name, &weight))| Entry { name, weight, index: i as u32 })
            .collect()
    }

    fn counts(table: &MaglevTable, n: usize) -> Vec<usize> {
        let mut counts = vec![0; n];
        for &slot in table.slots() {
            counts[slot as usize] += 1;
        }
        counts
    }

    /// FNV-1a over the table, to pin it in a golden test.
    fn fingerprint(table: &MaglevTable) -> u64 {
        table.slots().iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &s| (h ^ u64::from(s)).wrapping_mul(0x100_0000_01b3))
    }

    #[test]
    fn golden_table() {
        // Pins the table for a known backend set: a change here moves clients between backends
        // on upgrade, and must be deliberate.
        let names = names(5);
        let table = MaglevTable::build(&entries(&names, &[1, 1, 1, 1, 1]), 65_537);
        assert_eq!(&table.slots()[..12], &GOLDEN_FIRST_SLOTS);
        assert_eq!(fingerprint(&table), GOLDEN_FINGERPRINT);
        let weighted = MaglevTable::build(&entries(&names, &[1, 2, 3, 4, 5]), 65_537);
        assert_eq!(fingerprint(&weighted), GOLDEN_WEIGHTED_FINGERPRINT);
    }

    // Computed by this implementation when the table format was fixed (2026-11-29).
    const GOLDEN_FIRST_SLOTS: [u32; 12] = [2, 1, 3, 4, 4, 1, 1, 2, 4, 2, 1, 2];
    const GOLDEN_FINGERPRINT: u64 = 0x905a_286c_632d_6106;
    const GOLDEN_WEIGHTED_FINGERPRINT: u64 = 0x2c02_5f66_ed73_9fbc;

    #[test]
    fn input_order_does_not_matter() {
        let names = names(7);
        let forward = entries(&names, &[1, 2, 1, 3, 1, 1, 2]);
        let mut reversed = forward.clone();
        reversed.reverse();
        assert_eq!(MaglevTable::build(&forward, 1009), MaglevTable::build(&reversed, 1009));
    }

    #[test]
    fn empty_and_single() {
        assert_eq!(MaglevTable::build(&[], 101).lookup(5), None);
        let names = names(1);
        let table = MaglevTable::build(&entries(&names, &[3]), 101);
        assert!(table.slots().iter().all(|&s| s == 0));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(40))]

        /// Every backend's share is within 1% of M/N (M = 65537, N <= 100).
        #[test]
        fn balanced(n in 1usize..=100) {
            let names = names(n);
            let table = MaglevTable::build(&entries(&names, &vec![1; n]), 65_537);
            let ideal = 65_537.0 / n as f64;
            for (i, count) in counts(&table, n).into_iter().enumerate() {
                prop_assert!((count as f64 - ideal).abs() <= ideal * 0.01, "backend {i}: {count} slots, ideal {ideal:.1}");
            }
        }

        /// Shares follow weights within 1% of each backend's ideal share.
        #[test]
        fn weighted_shares(weights in proptest::collection::vec(1u32..=10, 1..=40)) {
            let n = weights.len();
            let names = names(n);
            let table = MaglevTable::build(&entries(&names, &weights), 65_537);
            let total: u32 = weights.iter().sum();
            for (i, count) in counts(&table, n).into_iter().enumerate() {
                let ideal = 65_537.0 * f64::from(weights[i]) / f64::from(total);
                prop_assert!((count as f64 - ideal).abs() <= (ideal * 0.01).max(1.0), "backend {i} weight {}: {count} slots, ideal {ideal:.1}", weights[i]);
            }
        }

        /// Removing one of N backends moves at most 1/N + 1% of the keys, and at most 1% of them
        /// away from backends that stay.
        #[test]
        fn minimal_disruption(n in 2usize..=100, removed_seed in any::<usize>()) {
            let names = names(n);
            let all = entries(&names, &vec![1; n]);
            let removed = removed_seed % n;
            let remaining: Vec<Entry<'_>> = all.iter().copied().filter(|e| e.index as usize != removed).collect();
            let before = MaglevTable::build(&all, 65_537);
            let after = MaglevTable::build(&remaining, 65_537);
            let m = before.len() as f64;
            let moved = before.slots().iter().zip(after.slots()).filter(|(a, b)| a != b).count() as f64;
            let moved_from_survivors = before
                .slots()
                .iter()
                .zip(after.slots())
                .filter(|(a, b)| a != b && **a as usize != removed)
                .count() as f64;
            prop_assert!(moved / m <= 1.0 / n as f64 + 0.01, "moved {:.4} of keys, limit {:.4}", moved / m, 1.0 / n as f64 + 0.01);
            prop_assert!(moved_from_survivors / m <= 0.01, "moved {:.4} of keys away from surviving backends", moved_from_survivors / m);
        }
    }
}
