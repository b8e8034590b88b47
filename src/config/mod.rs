//! Configuration: the TOML file, checked once and turned into typed values.
//!
//! Three steps, each in its own place: [`raw`] mirrors the file with serde (unknown keys are
//! rejected there), [`validate`] turns it into [`Config`] with `SocketAddr`s, `Duration`s and
//! non-zero numbers, and [`ConfigError`] names the file, the line, the key and what would be
//! valid. `ringlb check` and `ringlb run` go through exactly this path.

mod duration;
mod raw;
mod validate;

use std::net::SocketAddr;
use std::num::{NonZeroU32, NonZeroUsize};
use std::path::Path;
use std::time::Duration;

pub use duration::parse_duration;

/// Defaults, in one place so the README and `--help` can quote them.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(3600);
pub const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(30);
/// Upper bound on `weight`, as HAProxy's.
pub const MAX_WEIGHT: u32 = 256;
/// Upper bound on `max_connections`.
pub const MAX_CONNECTIONS: usize = 100_000_000;
/// Upper bound on `workers`; more threads than this is a typo, not a machine.
pub const MAX_WORKERS: usize = 1024;

/// A validated configuration. Listeners and pools are sorted by name; a listener refers to its
/// pool by index.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub workers: NonZeroUsize,
    /// Most client connections open at once, split evenly across workers; `None` = as many as
    /// the file-descriptor limit allows.
    pub max_connections: Option<NonZeroUsize>,
    /// How long SIGTERM waits for open connections before closing them.
    pub drain_timeout: Duration,
    pub listeners: Vec<ListenerConfig>,
    pub pools: Vec<PoolConfig>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ListenerConfig {
    pub name: String,
    /// Port 0 asks the kernel for a free port, shared by every worker's listener.
    pub bind: SocketAddr,
    /// Index into [`Config::pools`].
    pub pool: usize,
    /// A connection with no byte in either direction for this long is closed; `None` = never.
    pub idle_timeout: Option<Duration>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct PoolConfig {
    pub name: String,
    pub algorithm: Algorithm,
    pub connect_timeout: Duration,
    pub backends: Vec<BackendConfig>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BackendConfig {
    pub address: SocketAddr,
    pub weight: NonZeroU32,
}

/// How a pool picks a backend for a new connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Algorithm {
    /// Weighted smooth round robin, the sequence nginx produces.
    RoundRobin,
}

impl Algorithm {
    pub const NAMES: &'static [&'static str] = &["round_robin"];

    pub fn name(self) -> &'static str {
        match self {
            Algorithm::RoundRobin => "round_robin",
        }
    }

    fn from_name(name: &str) -> Option<Self> {
        match name {
            "round_robin" => Some(Algorithm::RoundRobin),
            _ => None,
        }
    }
}

/// A configuration that could not be used, with where and why.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: cannot read: {source}")]
    Read { path: String, source: std::io::Error },
    /// The file is not valid TOML or does not have the expected shape.
    #[error("{path}:{line}: {message}")]
    Syntax { path: String, line: usize, message: String },
    /// The shape is right but a value is not usable.
    #[error("{path}:{line}: {key}: {message}")]
    Invalid { path: String, line: usize, key: String, message: String },
}

impl ConfigError {
    /// The 1-based line the error points at (0 when the file could not be read).
    pub fn line(&self) -> usize {
        match self {
            ConfigError::Read { .. } => 0,
            ConfigError::Syntax { line, .. } | ConfigError::Invalid { line, .. } => *line,
        }
    }

    /// The dotted key the error is about, if it is about one.
    pub fn key(&self) -> Option<&str> {
        match self {
            ConfigError::Invalid { key, .. } => Some(key),
            _ => None,
        }
    }
}

impl Config {
    /// Reads and validates a configuration file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let shown = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: shown.clone(), source })?;
        Config::parse(&text, &shown)
    }

    /// Validates configuration text; `path` only labels error messages.
    pub fn parse(text: &str, path: &str) -> Result<Config, ConfigError> {
        validate::parse(text, path)
    }

    /// A few lines for `ringlb check` and the startup log.
    pub fn summary(&self) -> String {
        use std::fmt::Write;
        let backends: usize = self.pools.iter().map(|p| p.backends.len()).sum();
        let mut out = format!(
            "{} workers, max_connections {}, {} listeners, {} pools, {} backends, drain_timeout {:?}",
            self.workers,
            self.max_connections.map_or_else(|| "from the file-descriptor limit".to_string(), |n| n.to_string()),
            self.listeners.len(),
            self.pools.len(),
            backends,
            self.drain_timeout
        );
        for listener in &self.listeners {
            let pool = &self.pools[listener.pool];
            let _ = write!(
                out,
                "\n  listener {} on {} -> pool {} ({}, {} backends, connect_timeout {:?}, idle_timeout {})",
                listener.name,
                listener.bind,
                pool.name,
                pool.algorithm.name(),
                pool.backends.len(),
                pool.connect_timeout,
                listener.idle_timeout.map_or_else(|| "none".to_string(), |d| format!("{d:?}")),
            );
        }
        out
    }
}
