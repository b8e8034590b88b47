//! A worker's balancing state for one pool: it picks the backend for a new connection from the
//! pool's usable backends (round robin, least connections, random two, Maglev), and the next
//! one to try after a failed connect. Load is read from the backends' shared counters.

use std::net::SocketAddr;

use super::Pool;
use crate::balance::{Algorithm, HashKey, Rng, SmoothRoundRobin, client_hash};

/// A worker's balancing state for one pool.
#[derive(Debug, Clone)]
pub enum Picker {
    RoundRobin(SmoothRoundRobin),
    /// Ties go to the first candidate from a rotating start, so they spread evenly.
    LeastConn {
        rotation: usize,
    },
    RandomTwo(Rng),
    Maglev(HashKey),
}

impl Picker {
    /// `seed` differs per worker, so random choices do not line up across workers.
    pub fn new(pool: &Pool, seed: u64) -> Picker {
        match pool.settings.algorithm {
            Algorithm::RoundRobin => Picker::RoundRobin(SmoothRoundRobin::new(pool.backends.len())),
            Algorithm::LeastConn => Picker::LeastConn { rotation: seed as usize },
            Algorithm::RandomTwo => Picker::RandomTwo(Rng::new(seed)),
            Algorithm::Maglev { hash_key, .. } => Picker::Maglev(hash_key),
        }
    }

    /// Whether [`Picker::pick`] needs the client's address.
    pub fn needs_client(&self) -> bool {
        matches!(self, Picker::Maglev(_))
    }

    /// The backend for a new connection from `client`.
    pub fn pick(&mut self, pool: &Pool, client: Option<SocketAddr>) -> usize {
        let usable = pool.usable();
        debug_assert!(!usable.is_empty());
        let weight = |i: usize| pool.backends[i].weight;
        // Whether backend a carries less load per unit of weight than backend b.
        let lighter = |a: usize, b: usize| {
            u128::from(pool.backends[a].counters.active()) * u128::from(weight(b))
                < u128::from(pool.backends[b].counters.active()) * u128::from(weight(a))
        };
        match self {
            Picker::RoundRobin(rr) => rr.pick(usable, weight),
            Picker::LeastConn { rotation } => {
                *rotation = rotation.wrapping_add(1);
                let start = *rotation % usable.len();
                let mut best = usable[start] as usize;
                for k in 1..usable.len() {
                    let candidate = usable[(start + k) % usable.len()] as usize;
                    if lighter(candidate, best) {
                        best = candidate;
                    }
                }
                best
            }
            Picker::RandomTwo(rng) => {
                let first = rng.below(usable.len());
                if usable.len() == 1 {
                    return usable[0] as usize;
                }
                let second = (first + 1 + rng.below(usable.len() - 1)) % usable.len();
                let (a, b) = (usable[first] as usize, usable[second] as usize);
                if lighter(b, a) { b } else { a }
            }
            Picker::Maglev(key) => {
                let hash = client.map_or(0, |c| client_hash(c, *key));
                pool.maglev.as_ref().and_then(|t| t.lookup(hash)).map_or(usable[0] as usize, |i| i as usize)
            }
        }
    }

    /// The backend to try after `failed` could not be reached: the next usable one in order.
    pub fn next_after(&self, pool: &Pool, failed: usize) -> usize {
        let usable = pool.usable();
        usable.iter().map(|&i| i as usize).find(|&i| i > failed).unwrap_or(usable[0] as usize)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering;

    use super::*;
    use crate::balance::HashKey;
    use crate::pool::tests::pool;

    /// Sets the backends' open connections (over all workers).
    fn counters<'a>(pool: &'a Pool, active: &[u64]) -> &'a Pool {
        for (backend, &a) in pool.backends.iter().zip(active) {
            backend.counters.active.store(a, Ordering::Relaxed);
        }
        pool
    }

    fn picks(picker: &mut Picker, pool: &Pool, n: usize) -> Vec<usize> {
        (0..n).map(|_| picker.pick(pool, None)).collect()
    }

    #[test]
    fn round_robin_matches_nginx_sequence() {
        let p = pool(Algorithm::RoundRobin, &[5, 1, 1], &[true; 3]);
        let mut picker = Picker::new(&p, 0);
        // nginx's documented sequence for weights a=5, b=1, c=1.
        assert_eq!(picks(&mut picker, counters(&p, &[0; 3]), 7), vec![0, 0, 1, 0, 2, 0, 0]);
        let p = pool(Algorithm::RoundRobin, &[1, 2], &[true; 2]);
        let mut picker = Picker::new(&p, 0);
        assert_eq!(picks(&mut picker, counters(&p, &[0; 2]), 6), vec![1, 0, 1, 1, 0, 1]);
    }

    #[test]
    fn round_robin_shares_follow_weights_and_skip_down_backends() {
        let p = pool(Algorithm::RoundRobin, &[3, 1, 4, 1, 5], &[true, true, false, true, true]);
        let mut picker = Picker::new(&p, 0);
        let got = picks(&mut picker, counters(&p, &[0; 5]), 100);
        for (i, expected) in [(0, 30), (1, 10), (2, 0), (3, 10), (4, 50)] {
            assert_eq!(got.iter().filter(|&&g| g == i).count(), expected, "backend {i}");
        }
    }

    #[test]
    fn all_down_fails_open() {
        let p = pool(Algorithm::RoundRobin, &[1, 1, 1], &[false; 3]);
        assert!(p.all_down());
        let mut picker = Picker::new(&p, 0);
        assert_eq!(picks(&mut picker, counters(&p, &[0; 3]), 3), vec![0, 1, 2]);
    }

    #[test]
    fn least_conn_takes_fewest_per_weight_and_spreads_ties() {
        let p = pool(Algorithm::LeastConn, &[1, 1, 1], &[true; 3]);
        let mut picker = Picker::new(&p, 0);
        assert_eq!(picks(&mut picker, counters(&p, &[5, 2, 9]), 3), vec![1, 1, 1]);
        // Ties rotate over every tied backend.
        let mut seen = picks(&mut picker, counters(&p, &[4, 4, 4]), 3);
        seen.sort();
        assert_eq!(seen, vec![0, 1, 2]);
        // Per weight: 6 connections on weight 3 is lighter than 3 on weight 1.
        let p = pool(Algorithm::LeastConn, &[3, 1], &[true; 2]);
        let mut picker = Picker::new(&p, 0);
        assert_eq!(picker.pick(counters(&p, &[6, 3]), None), 0);
        assert_eq!(picker.pick(counters(&p, &[7, 2]), None), 1);
        // A down backend is never picked, however idle.
        let p = pool(Algorithm::LeastConn, &[1, 1], &[false, true]);
        let mut picker = Picker::new(&p, 0);
        assert_eq!(picks(&mut picker, counters(&p, &[0, 100]), 4), vec![1; 4]);
    }

    #[test]
    fn random_two_prefers_the_lighter_and_uses_all() {
        let p = pool(Algorithm::RandomTwo, &[1, 1, 1, 1], &[true; 4]);
        let mut picker = Picker::new(&p, 7);
        // With one backend far more loaded, it is picked only when both draws miss the others,
        // which cannot happen: two distinct draws always include a lighter one.
        let got = picks(&mut picker, counters(&p, &[100, 0, 0, 0]), 1000);
        assert!(!got.contains(&0));
        for i in 1..4 {
            let share = got.iter().filter(|&&g| g == i).count();
            assert!((250..420).contains(&share), "backend {i}: {share} of 1000");
        }
        let p = pool(Algorithm::RandomTwo, &[1, 1], &[true, false]);
        let mut picker = Picker::new(&p, 7);
        assert_eq!(picks(&mut picker, counters(&p, &[9, 0]), 5), vec![0; 5]);
    }

    #[test]
    fn maglev_is_sticky_per_client_ip_and_spreads_clients() {
        let algorithm = Algorithm::Maglev { table_size: 1009, hash_key: HashKey::ClientIp };
        let p = pool(algorithm, &[1, 1, 1], &[true; 3]);
        let mut picker = Picker::new(&p, 0);
        let mut used = [0usize; 3];
        for host in 1..=60u8 {
            let first = picker.pick(&p, Some(SocketAddr::from(([127, 0, 1, host], 40000))));
            for port in [40001, 50000, 60000] {
                assert_eq!(picker.pick(&p, Some(SocketAddr::from(([127, 0, 1, host], port)))), first);
            }
            used[first] += 1;
        }
        assert!(used.iter().all(|&u| u >= 10), "60 clients over 3 backends: {used:?}");
        // With the port in the key, one client's connections spread.
        let algorithm = Algorithm::Maglev { table_size: 1009, hash_key: HashKey::ClientIpPort };
        let p = pool(algorithm, &[1, 1, 1], &[true; 3]);
        let mut picker = Picker::new(&p, 0);
        let spread: std::collections::BTreeSet<usize> =
            (0..30u16).map(|port| picker.pick(&p, Some(SocketAddr::from(([127, 0, 1, 1], 40000 + port))))).collect();
        assert_eq!(spread.len(), 3);
    }

    #[test]
    fn maglev_moves_only_the_down_backends_clients() {
        let algorithm = Algorithm::Maglev { table_size: 65_537, hash_key: HashKey::ClientIp };
        let up = pool(algorithm, &[1, 1, 1], &[true; 3]);
        let one_down = pool(algorithm, &[1, 1, 1], &[true, false, true]);
        let back_up = pool(algorithm, &[1, 1, 1], &[true; 3]);
        let mut picker = Picker::new(&up, 0);
        let (mut on_survivors, mut moved) = (0, 0);
        for i in 0..3000u32 {
            let client = Some(SocketAddr::from((std::net::Ipv4Addr::from(0x0a01_0000 + i), 1)));
            let before = picker.pick(&up, client);
            let after = picker.pick(&one_down, client);
            assert_ne!(after, 1);
            assert_eq!(picker.pick(&back_up, client), before, "clients return when the backend comes back");
            if before != 1 {
                on_survivors += 1;
                moved += usize::from(before != after);
            }
        }
        // Maglev keeps almost every client of a healthy backend where it was (<= 1% move).
        assert!(moved * 100 <= on_survivors, "{moved} of {on_survivors} clients of healthy backends moved");
    }

    #[test]
    fn retry_walks_the_usable_backends_in_order() {
        let p = pool(Algorithm::RoundRobin, &[1, 1, 1, 1], &[true, false, true, true]);
        let picker = Picker::new(&p, 0);
        assert_eq!(picker.next_after(&p, 0), 2);
        assert_eq!(picker.next_after(&p, 2), 3);
        assert_eq!(picker.next_after(&p, 3), 0);
    }
}
