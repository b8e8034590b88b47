//! Pools of backends as the workers see them: an immutable [`Snapshot`] that the control side
//! builds (from the configuration and the backends' health) and publishes to every worker,
//! which only ever reads it, and the [`picker`] each worker chooses backends with.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use io_uring::types::Timespec;
use socket2::SockAddr;

use crate::admission::proxy_protocol::Version as ProxyVersion;
use crate::balance::maglev::{self, MaglevTable};
use crate::balance::{Algorithm, BackendCounters};
use crate::queue::PoolQueue;

pub mod picker;

pub use picker::Picker;

/// What happens to established connections when their backend is marked down.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnDown {
    /// Leave them; they end when either side ends them.
    Keep,
    /// Close them (with a reset on both sides), as a database failover wants.
    Close,
}

/// What an operator set for a backend at run time (the admin API, `ringlb ctl`), as
/// HAProxy's `set server state`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AdminState {
    /// Takes new connections when its health allows.
    #[default]
    Ready,
    /// Takes no new connections (Maglev leaves it out, so only its clients move); open ones
    /// continue; its checks go on.
    Drain,
    /// As drain, and it is not checked.
    Maint,
}

impl AdminState {
    pub const ALL: [AdminState; 3] = [AdminState::Ready, AdminState::Drain, AdminState::Maint];

    pub fn name(self) -> &'static str {
        match self {
            AdminState::Ready => "ready",
            AdminState::Drain => "drain",
            AdminState::Maint => "maint",
        }
    }

    pub fn parse(name: &str) -> Option<AdminState> {
        AdminState::ALL.into_iter().find(|s| s.name() == name)
    }
}

/// What an operator set for one backend: its admin state and a weight in place of the
/// config's. The default (ready, the config's weight) is what the config says.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct AdminSetting {
    pub state: AdminState,
    /// The weight set at run time, in place of the config's.
    pub weight: Option<u32>,
}

impl AdminSetting {
    /// The weight in effect for a backend configured with `configured`.
    pub fn weight(&self, configured: u32) -> u32 {
        self.weight.unwrap_or(configured)
    }

    /// The state in effect: a weight of 0 set at run time drains, as HAProxy's does.
    pub fn effective(&self) -> AdminState {
        match (self.state, self.weight) {
            (AdminState::Ready, Some(0)) => AdminState::Drain,
            (state, _) => state,
        }
    }
}

/// One backend: where it is, how much traffic it should get, and its counters.
#[derive(Debug)]
pub struct Backend {
    pub address: SocketAddr,
    /// The address as text, the backend's name in hashing and logs.
    pub name: String,
    /// Its weight now: the config's, or what the admin API set (0 takes no new connections).
    pub weight: u32,
    /// Most connections at once, over all workers (`max_conns`).
    pub max_conns: Option<u32>,
    /// Lower serves first (SRV priority; 0 for the others): see [`Pool::usable`].
    pub priority: u16,
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
    pub settings: Settings,
    /// Whether any backend has `max_conns` (and connections may queue).
    pub limited: bool,
    pub backends: Vec<Backend>,
    /// Health: `up[i]` is whether backend i passes its checks.
    pub up: Vec<bool>,
    /// `downs[i]`: how many times backend i has been marked down since the start. A connection
    /// remembers its backend's count when it connects; a higher count now means the backend
    /// went down since, even if it is up again (see [`Pool::cuts`]).
    pub downs: Vec<u32>,
    /// What an operator set for each backend.
    pub admin: Vec<AdminSetting>,
    /// Indices of the backends new connections may go to: of those that are ready (admin
    /// state ready, weight above 0), the up ones of the lowest priority that has any up; when
    /// none is up, the ready ones of the lowest priority (fail open).
    usable: Vec<u32>,
    /// For `maglev` pools, built over the usable backends.
    pub maglev: Option<MaglevTable>,
    /// Connections waiting, in any worker, for a backend below its `max_conns`; carried into
    /// every snapshot that keeps the pool.
    pub queue: Arc<PoolQueue>,
    /// `connect_timeout` in the form a linked timeout takes. The kernel reads it when the
    /// connect is submitted; the worker keeps a replaced snapshot until then.
    pub connect_timespec: Timespec,
}

/// What a pool is configured as, besides its backends.
#[derive(Debug, Clone)]
pub struct Settings {
    pub name: String,
    pub algorithm: Algorithm,
    pub connect_timeout: Duration,
    pub on_down: OnDown,
    pub send_proxy: Option<ProxyVersion>,
    pub queue_timeout: Duration,
}

impl Backend {
    /// A backend at `address`; `counters` are the ones it keeps from snapshot to snapshot.
    pub fn new(address: SocketAddr, weight: u32, max_conns: Option<u32>, counters: Arc<BackendCounters>) -> Backend {
        Backend {
            address,
            name: address.to_string(),
            weight,
            max_conns,
            priority: 0,
            sockaddr: SockAddr::from(address),
            counters,
        }
    }

    /// The same backend, of priority `priority`.
    pub fn with_priority(mut self, priority: u16) -> Backend {
        self.priority = priority;
        self
    }
}

impl Pool {
    /// A pool of `backends` with their health (`up[i]` for backend i, which has been marked
    /// down `downs[i]` times), their admin states and its queue; which backends are usable and
    /// the Maglev table follow from them. (The control side builds pools from the config: see
    /// `control::snapshot`.)
    pub fn new(
        settings: Settings,
        backends: Vec<Backend>,
        health: Health,
        admin: Vec<AdminSetting>,
        queue: Arc<PoolQueue>,
    ) -> Pool {
        let Health { up, downs } = health;
        debug_assert_eq!(up.len(), backends.len());
        debug_assert_eq!(downs.len(), backends.len());
        debug_assert_eq!(admin.len(), backends.len());
        let ready: Vec<u32> = (0..backends.len() as u32)
            .filter(|&i| admin[i as usize].effective() == AdminState::Ready && backends[i as usize].weight > 0)
            .collect();
        let up_ready: Vec<u32> = ready.iter().copied().filter(|&i| up[i as usize]).collect();
        // Fail open: with every ready backend down, trying them beats refusing everyone. An
        // operator's drain is kept: with none ready, none is usable.
        let candidates = if up_ready.is_empty() { ready } else { up_ready };
        let first = candidates.iter().map(|&i| backends[i as usize].priority).min();
        let usable: Vec<u32> =
            candidates.into_iter().filter(|&i| Some(backends[i as usize].priority) == first).collect();
        let maglev = match settings.algorithm {
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
            connect_timespec: Timespec::new()
                .sec(settings.connect_timeout.as_secs())
                .nsec(settings.connect_timeout.subsec_nanos()),
            settings,
            limited: backends.iter().any(|b| b.max_conns.is_some()),
            backends,
            up,
            downs,
            admin,
            usable,
            maglev,
            queue,
        }
    }

    /// Whether any usable backend has room below its `max_conns`.
    pub fn has_room(&self) -> bool {
        self.usable.iter().any(|&b| self.backends[b as usize].counters.has_room(self.backends[b as usize].max_conns))
    }

    /// The backends a new connection may go to; empty only when an operator took every
    /// backend out (drain, maint, weight 0).
    pub fn usable(&self) -> &[u32] {
        &self.usable
    }

    /// Whether a connection to `backend`, made when that backend had been marked down `downs`
    /// times, is to be cut: the pool cuts (`on_down = "close"`) and the backend was marked down
    /// since. Comparing counts, not up flags, catches a backend that went down and came back
    /// between two snapshots a worker installed, or while the connection moved between workers.
    /// A count below the connection's is an older snapshot than the one it connected under.
    pub fn cuts(&self, backend: u32, downs: u32) -> bool {
        self.settings.on_down == OnDown::Close && self.downs.get(backend as usize).is_some_and(|&now| now > downs)
    }

    /// Whether every backend is down (and traffic goes to all of them: fail open). A pool
    /// without backends (its names resolve to nothing yet) is not.
    pub fn all_down(&self) -> bool {
        !self.up.is_empty() && !self.up.iter().any(|&u| u)
    }
}

/// Each backend's health: whether it is up, and how many times it was marked down.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Health {
    pub up: Vec<bool>,
    pub downs: Vec<u32>,
}

impl Health {
    /// `n` backends, all up, never marked down.
    pub fn all_up(n: usize) -> Health {
        Health { up: vec![true; n], downs: vec![0; n] }
    }
}

/// Everything a worker needs to choose and reach a backend. Replaced as a whole, never
/// modified: a worker holding an `Arc<Snapshot>` sees a consistent view.
#[derive(Debug)]
pub struct Snapshot {
    /// Increases with every snapshot published.
    pub generation: u64,
    /// Increases with every reload: pools (and their backends) keep their indices from one
    /// snapshot to the next within a layout, and may move across layouts.
    pub layout: u64,
    /// Indexed like [`Config::pools`].
    pub pools: Vec<Arc<Pool>>,
}

impl Snapshot {
    /// The first snapshot of these pools.
    pub fn new(pools: Vec<Pool>) -> Arc<Snapshot> {
        Arc::new(Snapshot { generation: 1, layout: 1, pools: pools.into_iter().map(Arc::new).collect() })
    }

    /// The next snapshot, with pool `index` replaced and the others shared.
    pub fn with_pool(&self, index: usize, pool: Pool) -> Arc<Snapshot> {
        let mut pools = self.pools.clone();
        pools[index] = Arc::new(pool);
        Arc::new(Snapshot { generation: self.generation + 1, layout: self.layout, pools })
    }

    /// The snapshot after a reload: new pools, in a new layout.
    pub fn relaid(&self, pools: Vec<Pool>) -> Arc<Snapshot> {
        Arc::new(Snapshot {
            generation: self.generation + 1,
            layout: self.layout + 1,
            pools: pools.into_iter().map(Arc::new).collect(),
        })
    }

    /// The index of the pool named `name`, if the snapshot has it.
    pub fn pool_index(&self, name: &str) -> Option<usize> {
        self.pools.iter().position(|p| p.settings.name == name)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A pool of backends 10.0.0.1:80, 10.0.0.2:80, ... with these weights and health.
    pub(crate) fn pool(algorithm: Algorithm, weights: &[u32], up: &[bool]) -> Pool {
        build(algorithm, OnDown::Keep, weights, up.to_vec(), vec![0; up.len()])
    }

    fn build(algorithm: Algorithm, on_down: OnDown, weights: &[u32], up: Vec<bool>, downs: Vec<u32>) -> Pool {
        let settings = Settings {
            name: "p".into(),
            algorithm,
            connect_timeout: Duration::from_secs(3),
            on_down,
            send_proxy: None,
            queue_timeout: Duration::from_secs(3),
        };
        let backends = weights
            .iter()
            .enumerate()
            .map(|(i, &w)| Backend::new(format!("10.0.0.{}:80", i + 1).parse().unwrap(), w, None, Arc::default()))
            .collect();
        let admin = vec![AdminSetting::default(); up.len()];
        Pool::new(settings, backends, Health { up, downs }, admin, Arc::new(PoolQueue::new(1)))
    }

    fn cutting(on_down: OnDown, downs: &[u32]) -> Pool {
        build(Algorithm::RoundRobin, on_down, &vec![1; downs.len()], vec![true; downs.len()], downs.to_vec())
    }

    #[test]
    fn the_lowest_priority_with_a_backend_up_serves_and_drained_ones_never() {
        let priorities = [0u16, 0, 10, 10];
        let pool = |up: &[bool], admin: &[AdminState]| {
            let backends = (0..4)
                .map(|i| {
                    Backend::new(format!("10.0.0.{}:80", i + 1).parse().unwrap(), 1, None, Arc::default())
                        .with_priority(priorities[i])
                })
                .collect();
            let admin = admin.iter().map(|&state| AdminSetting { state, weight: None }).collect();
            let settings = Settings {
                name: "p".into(),
                algorithm: Algorithm::RoundRobin,
                connect_timeout: Duration::from_secs(3),
                on_down: OnDown::Keep,
                send_proxy: None,
                queue_timeout: Duration::from_secs(3),
            };
            Pool::new(
                settings,
                backends,
                Health { up: up.to_vec(), downs: vec![0; 4] },
                admin,
                Arc::new(PoolQueue::new(1)),
            )
        };
        let ready = [AdminState::Ready; 4];
        assert_eq!(pool(&[true; 4], &ready).usable(), &[0, 1]);
        assert_eq!(pool(&[false, true, true, true], &ready).usable(), &[1]);
        // Every backend of priority 0 down: the backups serve.
        assert_eq!(pool(&[false, false, true, true], &ready).usable(), &[2, 3]);
        // All down: fail open to the lowest priority.
        assert_eq!(pool(&[false; 4], &ready).usable(), &[0, 1]);
        // Drained ones are out, whatever their priority.
        let drained = [AdminState::Drain, AdminState::Maint, AdminState::Ready, AdminState::Ready];
        assert_eq!(pool(&[true; 4], &drained).usable(), &[2, 3]);
        assert!(pool(&[true; 4], &[AdminState::Drain; 4]).usable().is_empty());
    }

    #[test]
    fn a_connection_is_cut_if_its_backend_went_down_since_it_connected_even_if_up_again() {
        // Backend 0 went down once and is up again; backend 1 never went down.
        let now = cutting(OnDown::Close, &[1, 0]);
        assert!(now.up.iter().all(|&u| u));
        assert!(now.cuts(0, 0), "connected before the down");
        assert!(!now.cuts(0, 1), "connected after it came back");
        assert!(!now.cuts(1, 0));
        // A connection from a worker with a newer snapshot (a count above this one's) stays.
        assert!(!now.cuts(0, 2));
        assert!(!now.cuts(7, 0), "no such backend");
        assert!(!cutting(OnDown::Keep, &[1, 0]).cuts(0, 0), "on_down = keep cuts nothing");
    }
}
