//! Choosing a backend for a new connection.
//!
//! A picker ([`crate::pool::picker`]) is one worker's balancing state for one pool; no other
//! thread touches it, so it needs no lock. What all workers must agree on lives elsewhere: the Maglev table is in the
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
    /// Bytes relayed client to backend and back (added as connections report them: at least
    /// every second, and when they end).
    pub bytes: [AtomicU64; 2],
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

    pub fn add_bytes(&self, up: u64, down: u64) {
        self.bytes[0].fetch_add(up, Ordering::Relaxed);
        self.bytes[1].fetch_add(down, Ordering::Relaxed);
    }

    /// Bytes relayed so far: client to backend, backend to client.
    pub fn bytes(&self) -> [u64; 2] {
        [self.bytes[0].load(Ordering::Relaxed), self.bytes[1].load(Ordering::Relaxed)]
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

#[cfg(test)]
mod tests {
    use super::*;

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
