//! Every backend's health as the control thread keeps it: a rise/fall state per backend, how
//! many times it was marked down, its last check, and the task that checks it. Kept by pool
//! name and backend address, so a reload carries a backend's state (a backend that was down
//! stays down until its checks pass) and its running check over; new backends start as the
//! config says (up), removed ones stop being checked. A backend an operator put in `maint` is
//! not checked; when it leaves `maint` it is down until its checks pass (`rise` of them).
//!
//! Check tasks report through one channel, tagged with a number that is never reused, so a
//! result from a task that a reload stopped is recognised and dropped.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::SystemTime;

use tokio::sync::mpsc::UnboundedSender;
use tokio::task::JoinHandle;
use tokio::time::{Instant, sleep_until};

use super::admin::AdminStates;
use super::snapshot::Carried;
use crate::config::{Config, HealthConfig};
use crate::health::{CheckFailure, HealthState, probe};
use crate::pool::{AdminState, Health};

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

/// The last result recorded for a backend (an active check or a worker's failed connect).
#[derive(Debug, Clone)]
pub struct LastCheck {
    pub passed: bool,
    /// Why it failed; empty when it passed.
    pub detail: String,
    pub at: SystemTime,
}

struct BackendHealth {
    address: SocketAddr,
    state: HealthState,
    up: bool,
    downs: u32,
    last: Option<LastCheck>,
    /// Put in `maint` by an operator: not checked.
    maint: bool,
    task: Option<(u64, JoinHandle<()>)>,
}

/// One backend's health as the admin API shows it.
pub struct BackendView<'a> {
    pub up: bool,
    /// Whether it is being checked (the pool has checks and it is not in `maint`).
    pub checked: bool,
    pub downs: u32,
    pub last: Option<&'a LastCheck>,
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
    /// Health for `config`'s pools, every backend up but those `carried` says are down (see
    /// [`Carried::starts_down`]), each checked by a task started here (on the control thread's
    /// runtime) unless it is in `maint`.
    pub fn start(config: &Config, results: UnboundedSender<Checked>, carried: &Carried) -> Checks {
        let mut checks = Checks { pools: Vec::new(), tasks: HashMap::new(), next_task: 0, results };
        checks.reconfigure(config, &carried.admin);
        for (pool, health) in config.pools.iter().zip(&mut checks.pools) {
            let Some(check) = &pool.health else { continue };
            for backend in &mut health.backends {
                if carried.starts_down(pool, backend.address) {
                    backend.up = false;
                    backend.state = HealthState::starting(check.rise, check.fall, false);
                }
            }
        }
        checks
    }

    /// Takes `config` and `admin` into use (a reload, or an operator's change): pools and
    /// backends that stay (by name and address) keep their state, and their check if it is
    /// configured the same; the others start up, with a new check. Backends in `maint` are not
    /// checked; one that leaves it is down until its checks pass.
    pub fn reconfigure(&mut self, config: &Config, admin: &AdminStates) {
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
                        last: None,
                        maint: false,
                        task: None,
                    },
                };
                let maint = admin.get(&pool.name, backend.address).state == AdminState::Maint;
                if maint {
                    stop(&mut health.task);
                } else if health.maint
                    && let Some(check) = &pool.health
                {
                    // Back from maintenance: proven by its checks before it takes clients.
                    health.up = false;
                    health.state = HealthState::starting(check.rise, check.fall, false);
                }
                health.maint = maint;
                if let Some(check) = pool.health.as_ref().filter(|_| !maint) {
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
    /// backend address (new backends up, never marked down), without changing anything.
    pub fn carried(&self, config: &Config) -> Vec<Health> {
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
            .map(|(up, downs)| Health { up, downs })
            .collect()
    }

    /// Where a check task's results go, if it still runs.
    pub fn task(&self, task: u64) -> Option<(usize, usize)> {
        self.tasks.get(&task).copied()
    }

    /// Records one result for backend `backend` of pool `pool` (an active check, or a failed
    /// connect a worker saw); returns what changed, if the backend went up or down. Nothing
    /// changes for a backend in `maint`.
    pub fn record(&mut self, pool: usize, backend: usize, result: &Result<(), CheckFailure>) -> Option<Change> {
        let health = self.pools.get_mut(pool)?;
        health.check.as_ref()?;
        let backend_health = health.backends.get_mut(backend)?;
        if backend_health.maint {
            return None;
        }
        let passed = result.is_ok();
        let detail = result.as_ref().err().map_or_else(String::new, ToString::to_string);
        backend_health.last = Some(LastCheck { passed, detail, at: SystemTime::now() });
        let up = backend_health.state.record(passed)?;
        backend_health.up = up;
        if !up {
            backend_health.downs += 1;
        }
        Some(Change { pool, backend, up, streak: backend_health.state.streak() })
    }

    /// Pool `pool`'s backends: whether each is up, and how many times each was marked down.
    pub fn health(&self, pool: usize) -> Health {
        let backends = &self.pools[pool].backends;
        Health { up: backends.iter().map(|b| b.up).collect(), downs: backends.iter().map(|b| b.downs).collect() }
    }

    /// Backend `backend` of pool `pool`, as the admin API shows it.
    pub fn view(&self, pool: usize, backend: usize) -> Option<BackendView<'_>> {
        let health = self.pools.get(pool)?;
        let b = health.backends.get(backend)?;
        Some(BackendView {
            up: b.up,
            checked: health.check.is_some() && !b.maint,
            downs: b.downs,
            last: b.last.as_ref(),
        })
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
