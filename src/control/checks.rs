//! Every backend's health as the control thread keeps it: a rise/fall state per backend, how
//! many times it was marked down, and the task that checks it. Kept by pool name and backend
//! address, so a reload carries a backend's state (a backend that was down stays down until
//! its checks pass) and its running check over; new backends start as the config says (up),
//! removed ones stop being checked.
//!
//! Check tasks report through one channel, tagged with a number that is never reused, so a
//! result from a task that a reload stopped is recognised and dropped.

use std::collections::HashMap;
use std::net::SocketAddr;

use tokio::sync::mpsc::UnboundedSender;
use tokio::task::JoinHandle;
use tokio::time::{Instant, sleep_until};

use crate::config::{Config, HealthConfig};
use crate::control::snapshot::{Down, starts_down};
use crate::health::{CheckFailure, HealthState, probe};

/// One check's result, from a check task to the control loop.
pub struct Checked {
    pub task: u64,
    pub result: Result<(), CheckFailure>,
}

/// What a recorded result changed.
pub struct Change {
    pub pool: usize,
    pub backend: usize,
    pub up: bool,
    /// Checks in a row with this result.
    pub streak: u32,
}

struct BackendHealth {
    address: SocketAddr,
    state: HealthState,
    up: bool,
    downs: u32,
    task: Option<(u64, JoinHandle<()>)>,
}

struct PoolHealth {
    name: String,
    /// `None`: checks off; every backend counts as up and nothing marks one down.
    check: Option<HealthConfig>,
    backends: Vec<BackendHealth>,
}

/// The health of every pool's backends, indexed like the config's pools.
pub struct Checks {
    pools: Vec<PoolHealth>,
    /// Check task number -> (pool, backend).
    tasks: HashMap<u64, (usize, usize)>,
    next_task: u64,
    results: UnboundedSender<Checked>,
}

impl Checks {
    /// Health for `config`'s pools, every backend up but those in `down` (see
    /// [`starts_down`]), each checked by a task started here (on the control thread's runtime).
    pub fn start(config: &Config, results: UnboundedSender<Checked>, down: &Down) -> Checks {
        let mut checks = Checks { pools: Vec::new(), tasks: HashMap::new(), next_task: 0, results };
        checks.reconfigure(config);
        for (pool, health) in config.pools.iter().zip(&mut checks.pools) {
            let Some(check) = &pool.health else { continue };
            for backend in &mut health.backends {
                if starts_down(down, pool, backend.address) {
                    backend.up = false;
                    backend.state = HealthState::starting(check.rise, check.fall, false);
                }
            }
        }
        checks
    }

    /// Takes `config` into use (a reload): pools and backends that stay (by name and address)
    /// keep their state, and their check if it is configured the same; the others start up,
    /// with a new check.
    pub fn reconfigure(&mut self, config: &Config) {
        let mut old: HashMap<String, PoolHealth> =
            std::mem::take(&mut self.pools).into_iter().map(|p| (p.name.clone(), p)).collect();
        self.tasks.clear();
        for (p, pool) in config.pools.iter().enumerate() {
            let mut kept = old.remove(&pool.name);
            let same_check = kept.as_ref().is_some_and(|k| k.check == pool.health);
            let mut backends = Vec::with_capacity(pool.backends.len());
            for (b, backend) in pool.backends.iter().enumerate() {
                let previous = kept.as_mut().and_then(|k| {
                    let i = k.backends.iter().position(|h| h.address == backend.address)?;
                    Some(k.backends.swap_remove(i))
                });
                let mut health = match (previous, &pool.health) {
                    (Some(mut previous), Some(check)) => {
                        if !same_check {
                            // New rise/fall: the backend keeps being up or down, fully so.
                            previous.state = HealthState::starting(check.rise, check.fall, previous.up);
                            stop(&mut previous.task);
                        }
                        previous
                    }
                    (Some(mut previous), None) => {
                        stop(&mut previous.task);
                        previous.up = true;
                        previous
                    }
                    (None, check) => BackendHealth {
                        address: backend.address,
                        state: check.as_ref().map_or(HealthState::new(1, 1), |c| HealthState::new(c.rise, c.fall)),
                        up: true,
                        downs: 0,
                        task: None,
                    },
                };
                if let Some(check) = &pool.health {
                    let task = match health.task.take() {
                        Some(task) => task,
                        None => {
                            let id = self.next_task;
                            self.next_task += 1;
                            let handle = tokio::task::spawn_local(check_forever(
                                id,
                                backend.address,
                                check.clone(),
                                self.results.clone(),
                            ));
                            (id, handle)
                        }
                    };
                    self.tasks.insert(task.0, (p, b));
                    health.task = Some(task);
                }
                backends.push(health);
            }
            if let Some(kept) = kept.as_mut() {
                for gone in &mut kept.backends {
                    stop(&mut gone.task);
                }
            }
            self.pools.push(PoolHealth { name: pool.name.clone(), check: pool.health.clone(), backends });
        }
        for pool in old.values_mut() {
            for gone in &mut pool.backends {
                stop(&mut gone.task);
            }
        }
    }

    /// What `config`'s pools would start with, carried from this health by pool name and
    /// backend address (new backends up, never marked down), without changing anything:
    /// per pool, whether each backend is up and how many times it was marked down.
    pub fn carried(&self, config: &Config) -> Vec<(Vec<bool>, Vec<u32>)> {
        config
            .pools
            .iter()
            .map(|pool| {
                let kept = self.pools.iter().find(|p| p.name == pool.name);
                pool.backends
                    .iter()
                    .map(|b| {
                        let old = kept.and_then(|k| k.backends.iter().find(|h| h.address == b.address));
                        match (old, &pool.health) {
                            (Some(old), Some(_)) => (old.up, old.downs),
                            (Some(old), None) => (true, old.downs),
                            (None, _) => (true, 0),
                        }
                    })
                    .unzip()
            })
            .collect()
    }

    /// Where a check task's results go, if it still runs.
    pub fn task(&self, task: u64) -> Option<(usize, usize)> {
        self.tasks.get(&task).copied()
    }

    /// Records one result for backend `backend` of pool `pool` (an active check, or a failed
    /// connect a worker saw); returns what changed, if the backend went up or down.
    pub fn record(&mut self, pool: usize, backend: usize, passed: bool) -> Option<Change> {
        let health = self.pools.get_mut(pool)?;
        health.check.as_ref()?;
        let backend_health = health.backends.get_mut(backend)?;
        let up = backend_health.state.record(passed)?;
        backend_health.up = up;
        if !up {
            backend_health.downs += 1;
        }
        Some(Change { pool, backend, up, streak: backend_health.state.streak() })
    }

    /// Pool `pool`'s backends: whether each is up, and how many times each was marked down.
    pub fn health(&self, pool: usize) -> (Vec<bool>, Vec<u32>) {
        let backends = &self.pools[pool].backends;
        (backends.iter().map(|b| b.up).collect(), backends.iter().map(|b| b.downs).collect())
    }
}

impl Drop for Checks {
    fn drop(&mut self) {
        for pool in &mut self.pools {
            for backend in &mut pool.backends {
                stop(&mut backend.task);
            }
        }
    }
}

fn stop(task: &mut Option<(u64, JoinHandle<()>)>) {
    if let Some((_, handle)) = task.take() {
        handle.abort();
    }
}

/// Checks one backend every `interval` (start to start) until stopped or the control loop is
/// gone.
async fn check_forever(task: u64, address: SocketAddr, check: HealthConfig, results: UnboundedSender<Checked>) {
    loop {
        let started = Instant::now();
        let result = probe(address, &check).await;
        if results.send(Checked { task, result }).is_err() {
            return;
        }
        sleep_until(started + check.interval).await;
    }
}
