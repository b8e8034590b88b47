//! Configuration: the TOML file, checked once and turned into typed values.
//!
//! Three steps, each in its own place: `raw` mirrors the file with serde (unknown keys are
//! rejected there), `validate` turns it into [`Config`] with `SocketAddr`s, `Duration`s and
//! non-zero numbers, and [`ConfigError`] names the file, the line, the key and what would be
//! valid. `ringlb check` and `ringlb run` go through exactly this path.

mod duration;
mod escape;
mod host;
mod raw;
mod validate;

pub use host::reaches_listener;
pub use validate::{loops_back, unconnectable};

use std::net::SocketAddr;
use std::num::{NonZeroU32, NonZeroUsize};
use std::path::{Path, PathBuf};
use std::time::Duration;

pub use crate::admission::acl::{AccessRules, Cidr};
pub use crate::admission::proxy_protocol::Version as ProxyVersion;
pub use crate::admission::tls::SniRoutes;
pub use crate::balance::{Algorithm, HashKey};
pub use crate::conn::Relay;
pub use crate::pool::OnDown;
pub use crate::spread::Spread;
pub use duration::{format_duration, parse_duration};
pub use escape::{escape_bytes, parse_escapes};

/// Defaults, in one place so the README and `--help` can quote them.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(3600);
pub const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(30);
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// Upper bound on `max_conns` and `max_conns_per_source`.
pub const MAX_CONNS_LIMIT: u64 = 10_000_000;
/// Upper bound on `weight`, as HAProxy's.
pub const MAX_WEIGHT: u32 = 256;
/// Upper bound on `max_connections`.
pub const MAX_CONNECTIONS: usize = 100_000_000;
/// Upper bound on `workers`; more threads than this is a typo, not a machine.
pub const MAX_WORKERS: usize = 1024;
/// Largest config file read: a real one is a few KiB, and `/dev/zero` must not exhaust memory.
pub const MAX_CONFIG_BYTES: u64 = 4 << 20;

/// A validated configuration. Listeners and pools are sorted by name; a listener refers to its
/// pool by index.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// The file it was read from, as its errors and warnings name it.
    pub path: String,
    pub workers: NonZeroUsize,
    /// Most client connections open at once, split evenly across workers; `None` = as many as
    /// the file-descriptor limit allows.
    pub max_connections: Option<NonZeroUsize>,
    /// How long SIGTERM waits for open connections before closing them.
    pub drain_timeout: Duration,
    pub listeners: Vec<ListenerConfig>,
    pub pools: Vec<PoolConfig>,
    /// Where the Prometheus metrics endpoint (and the status page) listens, if anywhere.
    pub metrics_bind: Option<SocketAddr>,
    /// The unix socket the admin API listens on, if any.
    pub admin_socket: Option<PathBuf>,
    /// Whether every connection is logged when it ends (default: yes).
    pub connection_log: bool,
    /// How log lines are written (default: text).
    pub log_format: LogFormat,
    /// How backend names are resolved.
    pub dns: DnsConfig,
    /// The user and group to run as once the sockets are bound (started as root).
    pub run_as: Option<RunAs>,
    /// How bytes move between client and backend (default: auto).
    pub relay: Relay,
    /// The size of the splice pipes, when the relay splices (`splice`, `auto`).
    pub pipe_size: u32,
    /// How connections spread over the workers (default: pack).
    pub spread: Spread,
    /// Things that work but are likely mistakes, each naming the file, the line and the key;
    /// `ringlb check` prints them and `ringlb run` logs them.
    pub warnings: Vec<String>,
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogFormat {
    /// `[time LEVEL target] message`, connection lines as `key=value` pairs.
    #[default]
    Text,
    /// One JSON object per line; a connection line's fields are its keys.
    Json,
}

impl LogFormat {
    pub fn name(self) -> &'static str {
        match self {
            LogFormat::Text => "text",
            LogFormat::Json => "json",
        }
    }
}

/// Longest unix socket path (`sun_path` holds 108 bytes with the final NUL).
pub const MAX_SOCKET_PATH: usize = 107;

/// Default and bounds of `pipe_size`: a pipe's default size, and what an unprivileged
/// process may ask for (fs.pipe-max-size).
pub const DEFAULT_PIPE_SIZE: u32 = 64 * 1024;
pub const MIN_PIPE_SIZE: u32 = 4096;
pub const MAX_PIPE_SIZE: u32 = 1024 * 1024;

#[derive(Debug, Clone, PartialEq)]
pub struct ListenerConfig {
    pub name: String,
    /// The line of its `bind`, for errors found after validation (see `host`).
    pub line: usize,
    /// Port 0 asks the kernel for a free port, shared by every worker's listener.
    pub bind: SocketAddr,
    /// The pool connections go to (index into [`Config::pools`]); with SNI routes, the pool
    /// for names no route matches, for no server name and for non-TLS clients. `None` (only
    /// with routes): close those instead.
    pub pool: Option<usize>,
    /// A connection with no byte in either direction for this long is closed; `None` = never.
    pub idle_timeout: Option<Duration>,
    /// Clients must start with a PROXY protocol header (v1 or v2); its address is the client's.
    pub accept_proxy: bool,
    /// With `accept_proxy`: the addresses a PROXY header is taken from (the balancers in
    /// front); a connection from elsewhere is refused. Empty: from anyone.
    pub proxy_from: Vec<Cidr>,
    /// How long a client may take to send its PROXY header and TLS ClientHello.
    pub handshake_timeout: Duration,
    pub access: AccessRules,
    /// Most connections open at once from one client address, over all workers.
    pub max_conns_per_source: Option<NonZeroU32>,
    /// Most connections open at once through this listener (within the global
    /// `max_connections`), split evenly across workers as that one is.
    pub max_connections: Option<NonZeroUsize>,
    /// TLS server name routes to pools; empty = no SNI routing.
    pub sni: SniRoutes,
}

impl ListenerConfig {
    /// Every pool this listener may send connections to.
    pub fn pools(&self, config: &Config) -> Vec<usize> {
        let mut pools: Vec<usize> = (0..config.pools.len()).filter(|p| self.sni.routes_to(*p)).collect();
        pools.extend(self.pool);
        pools.sort_unstable();
        pools.dedup();
        pools
    }
}

/// `user` and `group`: who ringlb runs as once its listeners and admin socket are bound.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunAs {
    pub user: String,
    pub uid: u32,
    /// `group`'s, or the user's primary group.
    pub gid: u32,
    pub group: Option<String>,
    /// The line of `user`.
    pub line: usize,
}

/// The `[dns]` table: how backend names are resolved (on the control thread).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DnsConfig {
    /// Name servers; empty: those of /etc/resolv.conf.
    pub servers: Vec<SocketAddr>,
    /// A name is resolved again this often at most (sooner if its TTL is shorter, never
    /// under a second).
    pub refresh: Duration,
    /// How long the last good answer is kept when lookups fail.
    pub hold: Duration,
}

pub const DEFAULT_DNS_REFRESH: Duration = Duration::from_secs(10);
pub const DEFAULT_DNS_HOLD: Duration = Duration::from_secs(300);
/// The shortest time between two lookups of a name.
pub const MIN_DNS_REFRESH: Duration = Duration::from_secs(1);

impl Default for DnsConfig {
    fn default() -> DnsConfig {
        DnsConfig { servers: Vec::new(), refresh: DEFAULT_DNS_REFRESH, hold: DEFAULT_DNS_HOLD }
    }
}

/// A backend entry given by name: each address the name resolves to is a backend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NameConfig {
    pub kind: NameKind,
    /// The line of its entry.
    pub line: usize,
    /// The weight of each address (A/AAAA); SRV records carry their own.
    pub weight: NonZeroU32,
    pub max_conns: Option<NonZeroU32>,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum NameKind {
    /// `address = "host:port"`: every A and AAAA answer, on `port`.
    Host { host: String, port: u16 },
    /// `srv = "_service._proto.name"`: every SRV target's addresses, on its port, with its
    /// weight; the lowest priority serves, the others only when all of it are down.
    Srv { name: String },
}

impl NameKind {
    /// The name as logs, metrics and the admin API show it.
    pub fn label(&self) -> String {
        match self {
            NameKind::Host { host, port } => format!("{host}:{port}"),
            NameKind::Srv { name } => format!("srv {name}"),
        }
    }
}

impl NameConfig {
    /// The name as the config writes it.
    pub fn label(&self) -> String {
        self.kind.label()
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct PoolConfig {
    pub name: String,
    pub algorithm: Algorithm,
    pub connect_timeout: Duration,
    /// The backends: those given by address, then (at run time) those names resolved to.
    pub backends: Vec<BackendConfig>,
    /// Backend entries given by name, resolved at run time.
    pub names: Vec<NameConfig>,
    /// What happens to relayed connections when their backend is marked down.
    pub on_down: OnDown,
    /// Active health checks (and passive marking from connect failures); `None` = off, every
    /// backend is always up.
    pub health: Option<HealthConfig>,
    /// Send a PROXY protocol header to backends before the client's bytes.
    pub send_proxy: Option<ProxyVersion>,
    /// How long a connection may wait for a backend below its `max_conns`.
    pub queue_timeout: Duration,
}

impl PoolConfig {
    /// A pool with the defaults a config file gets when it only names the algorithm and the
    /// backends; for building pools in code (benches, tests, embedding).
    pub fn new(name: &str, algorithm: Algorithm, backends: Vec<BackendConfig>) -> PoolConfig {
        PoolConfig {
            name: name.to_string(),
            algorithm,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            backends,
            names: Vec::new(),
            on_down: OnDown::Keep,
            health: Some(HealthConfig::default()),
            send_proxy: None,
            queue_timeout: DEFAULT_CONNECT_TIMEOUT,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BackendConfig {
    pub address: SocketAddr,
    /// The line of its entry, for errors found after validation (0 when built in code).
    pub line: usize,
    pub weight: NonZeroU32,
    /// Most connections open to this backend at once, over all workers; more wait in the
    /// pool's queue for up to `queue_timeout` (HAProxy's maxconn and queue).
    pub max_conns: Option<NonZeroU32>,
    /// The name entry (index into [`PoolConfig::names`]) it was resolved from; `None` for an
    /// address written in the config.
    pub origin: Option<u16>,
    /// Lower serves first: backends of a higher priority take connections only when every
    /// one of the lowest is down (SRV priorities; 0 for the others).
    pub priority: u16,
}

impl BackendConfig {
    /// A backend of weight `weight` (0 is taken as 1) and no connection limit.
    pub fn new(address: SocketAddr, weight: u32) -> BackendConfig {
        BackendConfig {
            address,
            line: 0,
            weight: NonZeroU32::new(weight).unwrap_or(NonZeroU32::MIN),
            max_conns: None,
            origin: None,
            priority: 0,
        }
    }
}

/// Default Maglev lookup table size: a prime, good for up to 655 backends.
pub const DEFAULT_TABLE_SIZE: u32 = 65_537;
/// Largest Maglev table accepted (a table is 4 bytes per entry, per pool, shared by workers).
pub const MAX_TABLE_SIZE: u32 = 16_777_259;

/// Active health checking of a pool's backends, with HAProxy's rise/fall semantics.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthConfig {
    /// Time from the start of one check to the start of the next.
    pub interval: Duration,
    /// Connect plus reply must finish within this.
    pub timeout: Duration,
    /// Consecutive passed checks that bring a down backend up.
    pub rise: u32,
    /// Consecutive failed checks (or failed connects seen by workers) that take an up backend down.
    pub fall: u32,
    /// Bytes sent after connecting, if any.
    pub send: Option<Vec<u8>>,
    /// The reply must start with these bytes, if set.
    pub expect: Option<Vec<u8>>,
    /// Check this port of the backend's address instead of its traffic port.
    pub port: Option<u16>,
    /// What the check speaks after connecting.
    pub protocol: CheckProtocol,
}

/// What a health check speaks.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum CheckProtocol {
    /// Connect, then `send` and `expect` if set.
    #[default]
    Tcp,
    /// A MySQL/MariaDB login as `user` (no password) and a clean quit: passes when the server
    /// accepts the login.
    Mysql { user: String },
    /// A PostgreSQL startup as `user` to `database` (default `postgres`): passes on a password
    /// request (the server is up and accepting) or on AuthenticationOk once the session starts.
    Postgres { user: String, database: String },
}

impl CheckProtocol {
    pub fn name(&self) -> &'static str {
        match self {
            CheckProtocol::Tcp => "tcp",
            CheckProtocol::Mysql { .. } => "mysql",
            CheckProtocol::Postgres { .. } => "postgres",
        }
    }
}

pub const DEFAULT_HEALTH_INTERVAL: Duration = Duration::from_secs(2);
pub const DEFAULT_HEALTH_TIMEOUT: Duration = Duration::from_secs(1);
pub const DEFAULT_RISE: u32 = 2;
pub const DEFAULT_FALL: u32 = 3;
/// Largest `send` or `expect`, in bytes.
pub const MAX_CHECK_BYTES: usize = 4096;

impl Default for HealthConfig {
    fn default() -> HealthConfig {
        HealthConfig {
            interval: DEFAULT_HEALTH_INTERVAL,
            timeout: DEFAULT_HEALTH_TIMEOUT,
            rise: DEFAULT_RISE,
            fall: DEFAULT_FALL,
            send: None,
            expect: None,
            port: None,
            protocol: CheckProtocol::Tcp,
        }
    }
}

/// A configuration that could not be used, with where and why.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: cannot read: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("{path}: larger than {} MiB; a ringlb config is a few KiB (is this the right file?)", MAX_CONFIG_BYTES >> 20)]
    TooLarge { path: String },
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
            ConfigError::Read { .. } | ConfigError::TooLarge { .. } => 0,
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
    /// Reads and validates a configuration file, then checks it against this host (binds
    /// that cannot work here, backends that are ringlb's own listeners): the path `ringlb
    /// check` and `ringlb run` share.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        use std::io::Read;
        let shown = path.display().to_string();
        let read_error = |source| ConfigError::Read { path: shown.clone(), source };
        let mut text = String::new();
        std::fs::File::open(path)
            .and_then(|file| file.take(MAX_CONFIG_BYTES + 1).read_to_string(&mut text))
            .map_err(read_error)?;
        if text.len() as u64 > MAX_CONFIG_BYTES {
            return Err(ConfigError::TooLarge { path: shown });
        }
        let config = Config::parse(&text, &shown)?;
        host::check(&config)?;
        Ok(config)
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
            "{} workers (spread {}), max_connections {}, {} listeners, {} pools, {} backends, drain_timeout {}",
            self.workers,
            self.spread.name(),
            self.max_connections.map_or_else(|| "from the file-descriptor limit".to_string(), |n| n.to_string()),
            self.listeners.len(),
            self.pools.len(),
            backends,
            format_duration(self.drain_timeout)
        );
        if let Some(metrics) = self.metrics_bind {
            let _ = write!(out, "\n  metrics on http://{metrics}/metrics, status page on http://{metrics}/");
        }
        if let Some(socket) = &self.admin_socket {
            let _ = write!(out, "\n  admin API on {} (ringlb ctl)", socket.display());
        }
        let _ = write!(
            out,
            "\n  log: {}, connection log {}",
            self.log_format.name(),
            if self.connection_log { "on" } else { "off" }
        );
        let _ = match self.relay {
            Relay::Copy => write!(out, "\n  relay: copy (ring buffers)"),
            relay => write!(out, "\n  relay: {} (pipes of {} bytes)", relay.name(), self.pipe_size),
        };
        for listener in &self.listeners {
            let _ = match listener.pool.map(|p| &self.pools[p]) {
                Some(pool) => write!(
                    out,
                    "\n  listener {} on {} -> pool {} ({}, {} backends, connect_timeout {}, idle_timeout {})",
                    listener.name,
                    listener.bind,
                    pool.name,
                    pool.algorithm.name(),
                    pool.backends.len(),
                    format_duration(pool.connect_timeout),
                    listener.idle_timeout.map_or_else(|| "none".to_string(), format_duration),
                ),
                None => write!(out, "\n  listener {} on {} -> pools by server name only", listener.name, listener.bind),
            };
            let mut extras = Vec::new();
            if !listener.sni.is_empty() {
                extras.push("routes by TLS server name".to_string());
            }
            if listener.accept_proxy && listener.proxy_from.is_empty() {
                extras.push("requires a PROXY header".to_string());
            } else if listener.accept_proxy {
                extras.push(format!("requires a PROXY header from {} networks", listener.proxy_from.len()));
            }
            if !listener.access.is_empty() {
                extras.push(format!(
                    "{} allow / {} deny rules",
                    listener.access.allow.len(),
                    listener.access.deny.len()
                ));
            }
            if let Some(n) = listener.max_conns_per_source {
                extras.push(format!("at most {n} connections per source"));
            }
            if let Some(n) = listener.max_connections {
                extras.push(format!("at most {n} connections"));
            }
            if !extras.is_empty() {
                let _ = write!(out, "\n    {}", extras.join(", "));
            }
        }
        for pool in &self.pools {
            let backends: Vec<String> = pool
                .backends
                .iter()
                .map(|b| match b.weight.get() {
                    1 => b.address.to_string(),
                    weight => format!("{} (weight {weight})", b.address),
                })
                .collect();
            let _ = write!(out, "\n  pool {} backends: {}", pool.name, backends.join(", "));
            let on_down = if pool.on_down == OnDown::Close { "close" } else { "keep" };
            let _ = match &pool.health {
                None => write!(out, "\n  pool {}: health checks off, on_down {on_down}", pool.name),
                Some(h) => write!(
                    out,
                    "\n  pool {}: {} check every {}, timeout {}, rise {}, fall {}, on_down {on_down}{}",
                    pool.name,
                    if h.send.is_some() || h.expect.is_some() { "send/expect" } else { "TCP connect" },
                    format_duration(h.interval),
                    format_duration(h.timeout),
                    h.rise,
                    h.fall,
                    match pool.send_proxy {
                        Some(ProxyVersion::V1) => ", sends PROXY v1",
                        Some(ProxyVersion::V2) => ", sends PROXY v2",
                        None => "",
                    },
                ),
            };
        }
        out
    }
}
