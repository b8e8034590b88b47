//! Pools of backends as the workers see them: an immutable [`Snapshot`] that the control side
//! builds (from the configuration and the backends' health) and publishes to every worker,
//! which only ever reads it.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use socket2::SockAddr;

use crate::admission::proxy_protocol::Version as ProxyVersion;
use crate::balance::maglev::{self, MaglevTable};
use crate::balance::{Algorithm, BackendCounters};
use crate::config::{Config, PoolConfig};
use crate::queue::PoolQueue;

/// What happens to established connections when their backend is marked down.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnDown {
    /// Leave them; they end when either side ends them.
    Keep,
    /// Close them (with a reset on both sides), as a database failover wants.
    Close,
}

/// One backend: where it is, how much traffic it should get, and its counters.
#[derive(Debug)]
pub struct Backend {
    pub address: SocketAddr,
    /// The address as text, the backend's name in hashing and logs.
    pub name: String,
    pub weight: u32,
    /// Most connections at once, over all workers (`max_conns`).
    pub max_conns: Option<u32>,
    /// The address in the form `connect` takes, built once.
    pub sockaddr: SockAddr,
    /// What every worker counts for it (open and total connections, failures), carried into
    /// every snapshot that keeps the backend: a connection holding a slot releases it here
    /// even after the backend left the config.
    pub counters: Arc<BackendCounters>,
}

/// One pool of backends with their health at the time the snapshot was built.
#[derive(Debug)]
pub struct Pool {
    pub name: String,
    pub algorithm: Algorithm,
    pub connect_timeout: Duration,
    pub on_down: OnDown,
    pub send_proxy: Option<ProxyVersion>,
    pub queue_timeout: Duration,
    /// Whether any backend has `max_conns` (and connections may queue).
    pub limited: bool,
    pub backends: Vec<Backend>,
    /// Health: `up[i]` is whether backend i passes its checks.
    pub up: Vec<bool>,
    /// `downs[i]`: how many times backend i has been marked down since the start. A connection
    /// remembers its backend's count when it connects; a higher count now means the backend
    /// went down since, even if it is up again (see [`Pool::cuts`]).
    pub downs: Vec<u32>,
    /// Indices of the backends new connections may go to: the up ones, or all when none is up.
    usable: Vec<u32>,
    /// For `maglev` pools, built over the usable backends.
    pub maglev: Option<MaglevTable>,
    /// Connections waiting, in any worker, for a backend below its `max_conns`; carried into
    /// every snapshot that keeps the pool.
    pub queue: Arc<PoolQueue>,
}

impl Pool {
    /// Builds a pool for `config` with the given health (`up[i]` for backend i, which has been
    /// marked down `downs[i]` times). It takes over the queue of the pool it replaces and the
    /// counters of the backends that pool had (by address); without one, they start afresh,
    /// the queue for `workers` workers.
    pub fn build(config: &PoolConfig, up: &[bool], downs: &[u32], replaces: Option<&Pool>, workers: usize) -> Pool {
        debug_assert_eq!(up.len(), config.backends.len());
        debug_assert_eq!(downs.len(), config.backends.len());
        let counters = |address: SocketAddr| {
            replaces
                .and_then(|old| old.backends.iter().find(|b| b.address == address))
                .map_or_else(Arc::default, |b| Arc::clone(&b.counters))
        };
        let backends: Vec<Backend> = config
            .backends
            .iter()
            .map(|b| Backend {
                address: b.address,
                name: b.address.to_string(),
                weight: b.weight.get(),
                max_conns: b.max_conns.map(|m| m.get()),
                sockaddr: SockAddr::from(b.address),
                counters: counters(b.address),
            })
            .collect();
        let mut usable: Vec<u32> = (0..backends.len() as u32).filter(|&i| up[i as usize]).collect();
        if usable.is_empty() {
            // Fail open: with every backend down, trying them all beats refusing everyone.
            usable = (0..backends.len() as u32).collect();
        }
        let maglev = match config.algorithm {
            Algorithm::Maglev { table_size, .. } => {
                let entries: Vec<maglev::Entry<'_>> = usable
                    .iter()
                    .map(|&i| maglev::Entry {
                        name: &backends[i as usize].name,
                        weight: backends[i as usize].weight,
                        index: i,
                    })
                    .collect();
                Some(MaglevTable::build(&entries, table_size))
            }
            _ => None,
        };
        Pool {
            name: config.name.clone(),
            algorithm: config.algorithm,
            connect_timeout: config.connect_timeout,
            on_down: config.on_down,
            send_proxy: config.send_proxy,
            queue_timeout: config.queue_timeout,
            limited: config.backends.iter().any(|b| b.max_conns.is_some()),
            backends,
            up: up.to_vec(),
            downs: downs.to_vec(),
            usable,
            maglev,
            queue: replaces.map_or_else(|| Arc::new(PoolQueue::new(workers)), |old| Arc::clone(&old.queue)),
        }
    }

    /// Whether any usable backend has room below its `max_conns`.
    pub fn has_room(&self) -> bool {
        self.usable.iter().any(|&b| self.backends[b as usize].counters.has_room(self.backends[b as usize].max_conns))
    }

    /// The backends a new connection may go to; never empty.
    pub fn usable(&self) -> &[u32] {
        &self.usable
    }

    /// Whether a connection to `backend`, made when that backend had been marked down `downs`
    /// times, is to be cut: the pool cuts (`on_down = "close"`) and the backend was marked down
    /// since. Comparing counts, not up flags, catches a backend that went down and came back
    /// between two snapshots a worker installed, or while the connection moved between workers.
    /// A count below the connection's is an older snapshot than the one it connected under.
    pub fn cuts(&self, backend: u32, downs: u32) -> bool {
        self.on_down == OnDown::Close && self.downs.get(backend as usize).is_some_and(|&now| now > downs)
    }

    /// Whether every backend is down (and traffic goes to all of them: fail open).
    pub fn all_down(&self) -> bool {
        !self.up.iter().any(|&u| u)
    }
}

/// Everything a worker needs to choose and reach a backend. Replaced as a whole, never
/// modified: a worker holding an `Arc<Snapshot>` sees a consistent view.
#[derive(Debug)]
pub struct Snapshot {
    /// Increases with every snapshot published.
    pub generation: u64,
    /// Indexed like [`Config::pools`].
    pub pools: Vec<Arc<Pool>>,
}

impl Snapshot {
    /// The first snapshot: every backend up.
    pub fn from_config(config: &Config) -> Arc<Snapshot> {
        let workers = config.workers.get();
        let pools = config
            .pools
            .iter()
            .map(|p| Arc::new(Pool::build(p, &vec![true; p.backends.len()], &vec![0; p.backends.len()], None, workers)))
            .collect();
        Arc::new(Snapshot { generation: 1, pools })
    }

    /// The next snapshot, with pool `index` replaced and the others shared.
    pub fn with_pool(&self, index: usize, pool: Pool) -> Arc<Snapshot> {
        let mut pools = self.pools.clone();
        pools[index] = Arc::new(pool);
        Arc::new(Snapshot { generation: self.generation + 1, pools })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Algorithm, BackendConfig};

    fn pool(on_down: OnDown, downs: &[u32]) -> Pool {
        let backends =
            (0..downs.len()).map(|i| BackendConfig::new(format!("10.0.0.{}:80", i + 1).parse().unwrap(), 1)).collect();
        let mut config = PoolConfig::new("p", Algorithm::RoundRobin, backends);
        config.on_down = on_down;
        Pool::build(&config, &vec![true; downs.len()], downs, None, 1)
    }

    #[test]
    fn a_rebuilt_pool_keeps_the_counters_of_the_backends_it_keeps_and_its_queue() {
        let config = |addresses: &[&str]| {
            let backends = addresses.iter().map(|a| BackendConfig::new(a.parse().unwrap(), 1)).collect();
            PoolConfig::new("p", Algorithm::RoundRobin, backends)
        };
        let old = Pool::build(&config(&["10.0.0.1:80", "10.0.0.2:80"]), &[true; 2], &[0; 2], None, 2);
        old.backends[1].counters.acquire(None);
        old.queue.join();
        // 10.0.0.2 stays (now first), 10.0.0.1 leaves, 10.0.0.3 is new.
        let new = Pool::build(&config(&["10.0.0.2:80", "10.0.0.3:80"]), &[true; 2], &[0; 2], Some(&old), 2);
        assert!(Arc::ptr_eq(&new.backends[0].counters, &old.backends[1].counters));
        assert_eq!(new.backends[0].counters.active(), 1);
        assert_eq!(new.backends[1].counters.active(), 0);
        assert!(Arc::ptr_eq(&new.queue, &old.queue));
        assert_eq!(new.queue.waiting(), 1);
    }

    #[test]
    fn a_connection_is_cut_if_its_backend_went_down_since_it_connected_even_if_up_again() {
        // Backend 0 went down once and is up again; backend 1 never went down.
        let now = pool(OnDown::Close, &[1, 0]);
        assert!(now.up.iter().all(|&u| u));
        assert!(now.cuts(0, 0), "connected before the down");
        assert!(!now.cuts(0, 1), "connected after it came back");
        assert!(!now.cuts(1, 0));
        // A connection from a worker with a newer snapshot (a count above this one's) stays.
        assert!(!now.cuts(0, 2));
        assert!(!now.cuts(7, 0), "no such backend");
        assert!(!pool(OnDown::Keep, &[1, 0]).cuts(0, 0), "on_down = keep cuts nothing");
    }
}
