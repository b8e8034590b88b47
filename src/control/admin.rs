//! What operators set at run time (the admin API, `ringlb ctl`): each backend's admin state
//! and weight, kept by pool name and backend address, so a reload keeps them for the backends
//! that stay and an upgrade hands them to the new process.
//!
//! Also what the control side asks the workers about their connections: each worker answers
//! for its own (see [`WorkerRequest`]).

use std::collections::BTreeMap;
use std::net::SocketAddr;

use tokio::sync::oneshot;

use crate::config::{Config, PoolConfig};
use crate::pool::AdminSetting;
#[cfg(test)]
use crate::pool::AdminState;

/// Every backend's [`AdminSetting`], by pool name and backend address.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AdminStates {
    set: BTreeMap<(String, SocketAddr), AdminSetting>,
}

impl AdminStates {
    pub fn get(&self, pool: &str, address: SocketAddr) -> AdminSetting {
        self.set.get(&(pool.to_string(), address)).copied().unwrap_or_default()
    }

    /// Stores `setting` for backend `address` of `pool`.
    pub fn put(&mut self, pool: &str, address: SocketAddr, setting: AdminSetting) {
        let key = (pool.to_string(), address);
        if setting == AdminSetting::default() {
            self.set.remove(&key);
        } else {
            self.set.insert(key, setting);
        }
    }

    /// Each of `pool`'s backends' settings, in config order.
    pub fn for_pool(&self, pool: &PoolConfig) -> Vec<AdminSetting> {
        pool.backends.iter().map(|b| self.get(&pool.name, b.address)).collect()
    }

    /// Forgets the settings of backends `config` no longer has (after a reload).
    pub fn retain(&mut self, config: &Config) {
        self.set.retain(|(pool, address), _| {
            config.pools.iter().any(|p| p.name == *pool && p.backends.iter().any(|b| b.address == *address))
        });
    }

    /// Every stored setting, as (pool, address, setting).
    pub fn iter(&self) -> impl Iterator<Item = (&str, SocketAddr, AdminSetting)> {
        self.set.iter().map(|((pool, address), setting)| (pool.as_str(), *address, *setting))
    }
}

/// Which connections a request is about: those of a pool, of a backend, or all.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ConnFilter {
    pub pool: Option<String>,
    pub backend: Option<SocketAddr>,
}

/// One open connection as a worker describes it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ConnInfo {
    pub worker: usize,
    /// The client's address (the TCP peer).
    pub client: Option<SocketAddr>,
    /// The source a PROXY header carried, if the listener reads one.
    pub proxied: Option<SocketAddr>,
    pub listener: String,
    pub pool: Option<String>,
    pub backend: Option<SocketAddr>,
    pub sni: Option<String>,
    /// Where it is: handshake, queued, connecting, relaying, closing.
    pub phase: &'static str,
    pub age_ms: u64,
    /// Client to backend, backend to client.
    pub bytes_up: u64,
    pub bytes_down: u64,
}

/// What the control side asks a worker (through [`crate::control::Shared::ask`]).
#[derive(Debug)]
pub enum WorkerRequest {
    /// Its open connections that match, at most `limit`.
    Connections { filter: ConnFilter, limit: usize, reply: oneshot::Sender<Vec<ConnInfo>> },
    /// Reset both sides of every connection to backend `backend` of pool `pool`; answers how
    /// many.
    Kill { pool: String, backend: SocketAddr, reply: oneshot::Sender<usize> },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_stay_for_backends_that_stay_and_a_weight_of_zero_drains() {
        let a: SocketAddr = "10.0.0.1:5432".parse().unwrap();
        let b: SocketAddr = "10.0.0.2:5432".parse().unwrap();
        let mut states = AdminStates::default();
        states.put("db", a, AdminSetting { state: AdminState::Maint, weight: None });
        states.put("db", b, AdminSetting { state: AdminState::Ready, weight: Some(0) });
        assert_eq!(states.get("db", b).effective(), AdminState::Drain);
        assert_eq!(states.get("other", a), AdminSetting::default());

        let text = "[listeners.l]\nbind = \"127.0.0.1:0\"\npool = \"db\"\n[pools.db]\nbackends = [{ address = \"10.0.0.1:5432\" }]\n";
        let config = Config::parse(text, "t.toml").unwrap();
        states.retain(&config);
        assert_eq!(states.for_pool(&config.pools[0]), vec![AdminSetting { state: AdminState::Maint, weight: None }]);
        assert_eq!(states.iter().count(), 1, "b left the config");
        // Back to the defaults: nothing stored.
        states.put("db", a, AdminSetting::default());
        assert_eq!(states.iter().count(), 0);
    }
}
