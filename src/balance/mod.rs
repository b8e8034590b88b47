//! Choosing a backend for a new connection.
//!
//! A [`Picker`] is one worker's balancing state for one pool; no other thread touches it, so it
//! needs no lock. What all workers must agree on lives elsewhere: the Maglev table is in the
//! pool snapshot (built once by the control thread), and active-connection counts are shared
//! atomics ([`BackendCounters`]), because least-connections on per-worker counts balances each
//! worker's share, not the backends.
//!
//! Only usable backends are picked: the healthy ones, or every one when none is (fail open).
//! A retry after a failed connect takes the next usable backend in pool order, so each is tried
//! at most once per connection.

pub mod hash;
pub mod maglev;

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::pool::Pool;

/// How a pool picks a backend for a new connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Algorithm {
    /// Weighted smooth round robin, the sequence nginx produces.
    RoundRobin,
    /// Fewest active connections (counted across all workers) per unit of weight.
    LeastConn,
    /// Two random backends; the one with fewer active connections per unit of weight.
    RandomTwo,
    /// Weighted Maglev consistent hashing of the client address.
    Maglev { table_size: u32, hash_key: HashKey },
}

impl Algorithm {
    pub const NAMES: &'static [&'static str] = &["round_robin", "least_conn", "random_two", "maglev"];

    pub fn name(self) -> &'static str {
        match self {
            Algorithm::RoundRobin => "round_robin",
            Algorithm::LeastConn => "least_conn",
            Algorithm::RandomTwo => "random_two",
            Algorithm::Maglev { .. } => "maglev",
        }
    }
}

/// What Maglev hashes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HashKey {
    /// The client's IP address: the same client reaches the same backend (affinity).
    ClientIp,
    /// The client's IP address and port: spreads one client's connections.
    ClientIpPort,
}

impl HashKey {
    pub const NAMES: &'static [&'static str] = &["client_ip", "client_ip_port"];

    pub fn name(self) -> &'static str {
        match self {
            HashKey::ClientIp => "client_ip",
            HashKey::ClientIpPort => "client_ip_port",
        }
    }
}

/// Counters for one backend that every worker updates, each on its own cache lines.
#[derive(Debug, Default)]
#[repr(align(128))]
pub struct BackendCounters {
    /// Connections open to the backend now (connecting or relaying).
    pub active: AtomicU64,
    /// Connections ever started to the backend.
    pub connections: AtomicU64,
    /// Connects to the backend that failed or timed out.
    pub failures: AtomicU64,
}

impl BackendCounters {
    pub fn active(&self) -> u64 {
        self.active.load(Ordering::Relaxed)
    }

    /// Whether an [`acquire`](Self::acquire) with `max_conns` would succeed now.
    pub fn has_room(&self, max_conns: Option<u32>) -> bool {
        max_conns.is_none_or(|max| self.active() < u64::from(max))
    }

    /// Takes a connection slot: always without a limit, only below it with one (exact across
    /// workers: the check and the increment are one atomic step).
    pub fn acquire(&self, max_conns: Option<u32>) -> bool {
        match max_conns {
            None => {
                self.active.fetch_add(1, Ordering::Relaxed);
                true
            }
            Some(max) => self
                .active
                .fetch_update(Ordering::AcqRel, Ordering::Relaxed, |a| (a < u64::from(max)).then_some(a + 1))
                .is_ok(),
        }
    }

    pub fn release(&self) {
        self.active.fetch_sub(1, Ordering::AcqRel);
    }
}

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

    /// Picks among `candidates` (indices into `weights`); `candidates` must not be empty.
    pub fn pick(&mut self, candidates: &[u32], weights: impl Fn(usize) -> u32) -> usize {
        let mut total = 0;
        let mut best = candidates[0] as usize;
        for &c in candidates {
            let c = c as usize;
            let weight = i64::from(weights(c));
            total += weight;
            self.current[c] += weight;
            if self.current[c] > self.current[best] {
                best = c;
            }
        }
        self.current[best] -= total;
        best
    }
}

/// A small fast random generator (xorshift64*), one per worker: random_two needs speed and
/// independence between workers, not cryptographic quality.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(hash::hash64(hash::SEED_KEY, &seed.to_le_bytes()) | 1)
    }

    pub fn below(&mut self, n: usize) -> usize {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        (((self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 32) * n as u64) >> 32) as usize
    }
}

/// The hash of a client address that Maglev looks up.
pub fn client_hash(client: SocketAddr, key: HashKey) -> u64 {
    let mut bytes = [0u8; 18];
    let len = match client.ip() {
        IpAddr::V4(ip) => {
            bytes[..4].copy_from_slice(&ip.octets());
            4
        }
        IpAddr::V6(ip) => {
            bytes[..16].copy_from_slice(&ip.octets());
            16
        }
    };
    let len = match key {
        HashKey::ClientIp => len,
        HashKey::ClientIpPort => {
            bytes[len..len + 2].copy_from_slice(&client.port().to_be_bytes());
            len + 2
        }
    };
    hash::hash64(hash::SEED_KEY, &bytes[..len])
}

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
        match pool.algorithm {
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
    use super::*;
    use crate::config::{BackendConfig, PoolConfig};

    fn pool(algorithm: Algorithm, weights: &[u32], up: &[bool]) -> Pool {
        let backends = weights
            .iter()
            .enumerate()
            .map(|(i, &w)| BackendConfig::new(format!("10.0.0.{}:80", i + 1).parse().unwrap(), w))
            .collect();
        Pool::build(&PoolConfig::new("p", algorithm, backends), up, &vec![0; up.len()], None, 1)
    }

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

    #[test]
    fn acquire_respects_max_conns() {
        let c = BackendCounters::default();
        assert!(c.acquire(Some(2)) && c.acquire(Some(2)));
        assert!(!c.acquire(Some(2)));
        assert_eq!(c.active(), 2);
        c.release();
        assert!(c.acquire(Some(2)));
        assert!(c.acquire(None), "no limit");
        assert_eq!(c.active(), 3);
    }

    #[test]
    fn rng_stays_in_range() {
        let mut rng = Rng::new(1);
        for n in 1..50 {
            for _ in 0..100 {
                assert!(rng.below(n) < n);
            }
        }
    }
}
