//! `max_conns_per_source`: open connections per client address for one listener, counted
//! over all workers.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, Ordering};

use crate::balance::{HashKey, client_hash};

/// Open connections per client address for one listener, over all workers, for
/// `max_conns_per_source`. Sharded by address so workers rarely meet on a lock, and only
/// listeners that set the limit have one (as nginx's `limit_conn` zone and HAProxy's stick
/// tables, this count must be shared, and sharing it exactly takes a lock).
#[derive(Debug)]
pub struct SourceLimit {
    /// A reload may change it; connections counted stay counted.
    limit: AtomicU32,
    shards: Box<[Mutex<HashMap<IpAddr, u32>>]>,
}

impl SourceLimit {
    const SHARDS: usize = 64;

    pub fn new(limit: u32) -> SourceLimit {
        SourceLimit {
            limit: AtomicU32::new(limit),
            shards: (0..Self::SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
        }
    }

    /// A new limit from a reload, for connections from now on.
    pub fn set_limit(&self, limit: u32) {
        self.limit.store(limit, Ordering::Relaxed);
    }

    fn shard(&self, ip: IpAddr) -> &Mutex<HashMap<IpAddr, u32>> {
        let hash = client_hash(SocketAddr::new(ip, 0), HashKey::ClientIp);
        &self.shards[(hash as usize) % Self::SHARDS]
    }

    /// Counts one more connection from `ip`, unless it already has `limit`.
    pub fn try_acquire(&self, ip: IpAddr) -> bool {
        let mut shard = self.shard(ip).lock().unwrap_or_else(|e| e.into_inner());
        let count = shard.entry(ip).or_insert(0);
        if *count >= self.limit.load(Ordering::Relaxed) {
            return false;
        }
        *count += 1;
        true
    }

    pub fn release(&self, ip: IpAddr) {
        let mut shard = self.shard(ip).lock().unwrap_or_else(|e| e.into_inner());
        if let Some(count) = shard.get_mut(&ip) {
            *count -= 1;
            if *count == 0 {
                shard.remove(&ip);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn source_limit_counts_per_address() {
        let limit = SourceLimit::new(2);
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let b: IpAddr = "2001:db8::1".parse().unwrap();
        assert!(limit.try_acquire(a) && limit.try_acquire(a));
        assert!(!limit.try_acquire(a));
        assert!(limit.try_acquire(b));
        limit.release(a);
        assert!(limit.try_acquire(a));
        limit.release(a);
        limit.release(a);
        limit.release(b);
        assert!(limit.shards.iter().all(|s| s.lock().unwrap().is_empty()), "no entry left behind");
    }
}
