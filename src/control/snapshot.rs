//! Building pool snapshots from the config: the first one at start, and each one after a
//! backend's health (or, with a reload, the config) changes. A rebuilt pool takes over the queue
//! of the pool it replaces and the counters of the backends it keeps, by address, so what the
//! workers count carries across snapshots.

use std::net::SocketAddr;
use std::sync::Arc;

use super::admin::AdminStates;
use crate::config::{Config, PoolConfig};
use crate::pool::{AdminSetting, Backend, Health, Pool, Settings, Snapshot};
use crate::queue::PoolQueue;

/// A pool for `config` with the given health and what operators set for its backends
/// (`admin[i]` for backend i), taking over what `replaces` carries; without it, counters and
/// queue start afresh, the queue for `workers` workers.
pub fn pool_from_config(
    config: &PoolConfig,
    health: Health,
    admin: &[AdminSetting],
    replaces: Option<&Pool>,
    workers: usize,
) -> Pool {
    let counters = |address: SocketAddr| {
        replaces
            .and_then(|old| old.backends.iter().find(|b| b.address == address))
            .map_or_else(Arc::default, |b| Arc::clone(&b.counters))
    };
    let setting = |i: usize| admin.get(i).copied().unwrap_or_default();
    let backends = config
        .backends
        .iter()
        .enumerate()
        .map(|(i, b)| {
            let weight = setting(i).weight(b.weight.get());
            Backend::new(b.address, weight, b.max_conns.map(|m| m.get()), counters(b.address)).with_priority(b.priority)
        })
        .collect();
    let states = (0..config.backends.len()).map(setting).collect();
    let settings = Settings {
        name: config.name.clone(),
        algorithm: config.algorithm,
        connect_timeout: config.connect_timeout,
        on_down: config.on_down,
        send_proxy: config.send_proxy,
        queue_timeout: config.queue_timeout,
    };
    let queue = replaces.map_or_else(|| Arc::new(PoolQueue::new(workers)), |old| Arc::clone(&old.queue));
    Pool::new(settings, backends, health, states, queue)
}

/// What a binary upgrade carries from the old process to the new one: the backends marked
/// down, as (pool name, address), and what operators set.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Carried {
    pub down: Vec<(String, SocketAddr)>,
    pub admin: AdminStates,
}

impl Carried {
    /// Whether backend `address` of `pool` starts down: it was down and the pool is checked
    /// (in a pool without checks, nothing would ever mark it up again).
    pub fn starts_down(&self, pool: &PoolConfig, address: SocketAddr) -> bool {
        pool.health.is_some() && self.down.iter().any(|(name, a)| *name == pool.name && *a == address)
    }
}

/// The first snapshot: every backend up but those `carried` says are down, nothing counted.
pub fn first_snapshot(config: &Config, carried: &Carried) -> Arc<Snapshot> {
    let workers = config.workers.get();
    Snapshot::new(
        config
            .pools
            .iter()
            .map(|p| {
                let up = p.backends.iter().map(|b| !carried.starts_down(p, b.address)).collect();
                let health = Health { up, downs: vec![0; p.backends.len()] };
                pool_from_config(p, health, &carried.admin.for_pool(p), None, workers)
            })
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::balance::Algorithm;
    use crate::config::BackendConfig;

    #[test]
    fn a_rebuilt_pool_keeps_the_counters_of_the_backends_it_keeps_and_its_queue() {
        let config = |addresses: &[&str]| {
            let backends = addresses.iter().map(|a| BackendConfig::new(a.parse().unwrap(), 1)).collect();
            PoolConfig::new("p", Algorithm::RoundRobin, backends)
        };
        let old = pool_from_config(&config(&["10.0.0.1:80", "10.0.0.2:80"]), Health::all_up(2), &[], None, 2);
        old.backends[1].counters.acquire(None);
        old.queue.join();
        // 10.0.0.2 stays (now first), 10.0.0.1 leaves, 10.0.0.3 is new.
        let new = pool_from_config(&config(&["10.0.0.2:80", "10.0.0.3:80"]), Health::all_up(2), &[], Some(&old), 2);
        assert!(Arc::ptr_eq(&new.backends[0].counters, &old.backends[1].counters));
        assert_eq!(new.backends[0].counters.active(), 1);
        assert_eq!(new.backends[1].counters.active(), 0);
        assert!(Arc::ptr_eq(&new.queue, &old.queue));
        assert_eq!(new.queue.waiting(), 1);
    }
}
