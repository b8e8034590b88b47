//! Reloading the config while serving (SIGHUP, and the admin API): what the control side
//! does, and what it reports.
//!
//! The file is read and checked exactly as `ringlb check` does; if it does not validate,
//! nothing changes. Otherwise the control thread builds the new pools (each kept pool takes
//! over its queue, each kept backend its counters and health, by pool name and backend
//! address), hands the new snapshot and the new listeners to the server side
//! ([`Listeners`]), which binds the listeners that are new, keeps the sockets of those whose
//! bind address is unchanged, and has every worker apply it all in one step; only then is the
//! snapshot published and the health checks reconfigured. A listener that cannot be bound
//! fails the reload, and nothing changes.
//!
//! Settings that only take effect at start (`workers`, `max_connections`, ...) are not
//! silently ignored: the report names each one that changed.

use std::collections::BTreeSet;
use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use crate::config::{Config, ConfigError, PoolConfig};
use crate::pool::Snapshot;

/// What the server side did with a reload's listeners.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ListenerChanges {
    /// New listeners and the address each is bound to.
    pub added: Vec<(String, SocketAddr)>,
    pub removed: Vec<String>,
    /// Kept listeners whose settings changed (they apply to new connections).
    pub changed: Vec<String>,
}

/// The server side of a reload: the listeners, and every worker's part in it.
pub trait Listeners: Send {
    /// Puts `config`'s listeners into effect together with `snapshot` (the new pools) in every
    /// worker, and returns once every worker has applied both. A new listener that cannot be
    /// bound fails it, and nothing changes.
    fn apply(&mut self, config: &Config, snapshot: &Arc<Snapshot>) -> Result<ListenerChanges, String>;
}

/// Where a reload's config comes from.
#[derive(Debug)]
pub enum Source {
    /// The file ringlb was started with.
    File,
    /// A config built in code (tests, embedding).
    Given(Box<Config>),
}

/// Why a reload changed nothing.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error("{0}")]
    Config(#[from] ConfigError),
    #[error("this ringlb was started without a config file, so there is none to read again")]
    NoFile,
    #[error("{0}")]
    Listeners(String),
    #[error("ringlb is stopping")]
    Stopping,
}

/// What a reload changed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Report {
    pub pools_added: Vec<String>,
    pub pools_removed: Vec<String>,
    /// Pools whose settings (algorithm, timeouts, health, ...) changed.
    pub pools_changed: Vec<String>,
    /// Per pool that stays: backends added and removed.
    pub backends_added: Vec<(String, SocketAddr)>,
    pub backends_removed: Vec<(String, SocketAddr)>,
    pub listeners: ListenerChanges,
    /// Settings that changed in the file but take effect only at the next start:
    /// `key: old -> new`.
    pub not_applied: Vec<String>,
}

impl Report {
    pub fn is_empty(&self) -> bool {
        *self == Report::default()
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut parts = Vec::new();
        let list = |items: &[String]| items.join(", ");
        let pairs = |items: &[(String, SocketAddr)]| {
            items.iter().map(|(p, a)| format!("{p}/{a}")).collect::<Vec<_>>().join(", ")
        };
        for (what, items) in [
            ("pools added", &self.pools_added),
            ("pools removed", &self.pools_removed),
            ("pools changed", &self.pools_changed),
            ("listeners removed", &self.listeners.removed),
            ("listeners changed", &self.listeners.changed),
        ] {
            if !items.is_empty() {
                parts.push(format!("{what}: {}", list(items)));
            }
        }
        for (what, items) in [
            ("backends added", &self.backends_added),
            ("backends removed", &self.backends_removed),
            ("listeners added", &self.listeners.added),
        ] {
            if !items.is_empty() {
                parts.push(format!("{what}: {}", pairs(items)));
            }
        }
        if parts.is_empty() {
            parts.push("nothing changed".into());
        }
        write!(f, "{}", parts.join("; "))?;
        if !self.not_applied.is_empty() {
            write!(f, "; not applied until restart: {}", self.not_applied.join(", "))?;
        }
        Ok(())
    }
}

/// What changed between `old` and `new`, pools and restart-only settings (the listeners are
/// the server side's to compare, with their sockets).
pub fn compare(old: &Config, new: &Config) -> Report {
    let mut report = Report::default();
    let names = |c: &Config| -> BTreeSet<String> { c.pools.iter().map(|p| p.name.clone()).collect() };
    let (before, after) = (names(old), names(new));
    report.pools_added = after.difference(&before).cloned().collect();
    report.pools_removed = before.difference(&after).cloned().collect();
    for pool in &new.pools {
        let Some(previous) = old.pools.iter().find(|p| p.name == pool.name) else { continue };
        let addresses = |p: &PoolConfig| -> BTreeSet<SocketAddr> { p.backends.iter().map(|b| b.address).collect() };
        let (was, is) = (addresses(previous), addresses(pool));
        report.backends_added.extend(is.difference(&was).map(|a| (pool.name.clone(), *a)));
        report.backends_removed.extend(was.difference(&is).map(|a| (pool.name.clone(), *a)));
        let settings_changed = previous.algorithm != pool.algorithm
            || previous.connect_timeout != pool.connect_timeout
            || previous.on_down != pool.on_down
            || previous.health != pool.health
            || previous.send_proxy != pool.send_proxy
            || previous.queue_timeout != pool.queue_timeout
            || previous.backends.iter().any(|b| {
                pool.backends.iter().any(|n| {
                    n.address == b.address && (n.weight, n.max_conns, n.priority) != (b.weight, b.max_conns, b.priority)
                })
            });
        if settings_changed {
            report.pools_changed.push(pool.name.clone());
        }
    }
    let mut restart = |key: &str, was: String, is: String| {
        if was != is {
            report.not_applied.push(format!("{key}: {was} -> {is}"));
        }
    };
    restart("workers", old.workers.to_string(), new.workers.to_string());
    let show = |n: Option<std::num::NonZeroUsize>| n.map_or_else(|| "from the fd limit".into(), |n| n.to_string());
    restart("max_connections", show(old.max_connections), show(new.max_connections));
    restart("relay", old.relay.name().into(), new.relay.name().into());
    restart("pipe_size", old.pipe_size.to_string(), new.pipe_size.to_string());
    restart("spread", old.spread.name().into(), new.spread.name().into());
    let metrics = |c: &Config| c.metrics_bind.map_or_else(|| "none".into(), |a| a.to_string());
    restart("metrics_bind", metrics(old), metrics(new));
    let socket = |c: &Config| c.admin_socket.as_ref().map_or_else(|| "none".to_string(), |p| p.display().to_string());
    restart("admin_socket", socket(old), socket(new));
    report
}

/// What a reload needs beyond the control thread's own state.
pub struct Reloader {
    /// The file to read again; `None` for a server started from a config built in code.
    pub path: Option<PathBuf>,
    pub listeners: Box<dyn Listeners>,
}

impl Reloader {
    /// The config a reload from `source` brings, checked as `ringlb check` checks it.
    pub fn load(&self, source: Source) -> Result<Config, ReloadError> {
        match source {
            Source::Given(config) => Ok(*config),
            Source::File => {
                let path = self.path.as_ref().ok_or(ReloadError::NoFile)?;
                Ok(Config::load(path)?)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Config {
        Config::parse(text, "t").unwrap()
    }

    const BASE: &str = "workers = 2\n[listeners.a]\nbind = \"127.0.0.1:1\"\npool = \"p\"\n\
        [pools.p]\nbackends = [{ address = \"10.0.0.1:80\" }, { address = \"10.0.0.2:80\" }]\n\
        [pools.q]\nbackends = [{ address = \"10.0.0.9:80\" }]\n";

    #[test]
    fn compare_names_pools_backends_and_restart_only_settings() {
        let new = parse(
            &BASE
                .replace("workers = 2", "workers = 3\nspread = \"pack\"")
                .replace("10.0.0.2:80\" }", "10.0.0.3:80\", weight = 2 }")
                .replace("[pools.q]", "[pools.r]"),
        );
        let report = compare(&parse(BASE), &new);
        assert_eq!(report.pools_added, ["r"]);
        assert_eq!(report.pools_removed, ["q"]);
        assert_eq!(report.backends_added, [("p".to_string(), "10.0.0.3:80".parse().unwrap())]);
        assert_eq!(report.backends_removed, [("p".to_string(), "10.0.0.2:80".parse().unwrap())]);
        assert!(report.pools_changed.is_empty(), "a new backend is not a changed setting");
        assert_eq!(report.not_applied, ["workers: 2 -> 3", "spread: even -> pack"]);
        let text = report.to_string();
        assert!(text.contains("pools added: r; pools removed: q"), "{text}");
        assert!(text.contains("backends added: p/10.0.0.3:80"), "{text}");
        assert!(text.ends_with("not applied until restart: workers: 2 -> 3, spread: even -> pack"), "{text}");
    }

    #[test]
    fn changed_pool_settings_are_named() {
        let new = parse(
            &BASE
                .replace("[pools.q]", "[pools.q]\non_down = \"close\"")
                .replace("{ address = \"10.0.0.1:80\" }", "{ address = \"10.0.0.1:80\", weight = 5 }"),
        );
        let report = compare(&parse(BASE), &new);
        assert_eq!(report.pools_changed, ["p", "q"]);
        assert!(compare(&parse(BASE), &parse(BASE)).is_empty(), "nothing changed");
        assert_eq!(compare(&parse(BASE), &parse(BASE)).to_string(), "nothing changed");
    }
}
