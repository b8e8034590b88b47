//! Turns [`RawConfig`] into [`Config`], rejecting anything that cannot work with a message that
//! names the line, the key and what would be valid.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::num::{NonZeroU32, NonZeroUsize};
use std::ops::Range;
use std::path::PathBuf;
use std::time::Duration;

use toml::Spanned;

use super::raw::{RawBackend, RawConfig, RawDns, RawHealth, RawListener, RawPool};
use super::*;
use crate::sys;

const CONNECT_TIMEOUT_ZERO: &str = "a connect timeout of 0 would fail every connection; use e.g. \"3s\"";

const ADDRESS_HINT: &str = "use IP:port, e.g. \"127.0.0.1:9001\" or \"[::1]:9001\"";

/// Where errors point: the file's name and text, to turn byte offsets into lines.
struct Source<'a> {
    path: &'a str,
    text: &'a str,
}

impl Source<'_> {
    fn line_of(&self, span: Range<usize>) -> usize {
        let end = span.start.min(self.text.len());
        self.text.as_bytes()[..end].iter().filter(|&&b| b == b'\n').count() + 1
    }

    /// The text of 1-based `line`, trimmed, for messages that cannot name the key themselves.
    fn line_text(&self, line: usize) -> &str {
        self.text.lines().nth(line.saturating_sub(1)).unwrap_or("").trim()
    }

    /// A warning in the form of an error message: file, line, key, what is wrong.
    fn warning(&self, span: Range<usize>, key: &str, message: &str) -> String {
        format!("{}:{}: {key}: {message}", self.path, self.line_of(span))
    }

    fn invalid(&self, span: Range<usize>, key: &str, message: impl Into<String>) -> ConfigError {
        ConfigError::Invalid {
            path: self.path.to_string(),
            line: self.line_of(span),
            key: key.to_string(),
            message: message.into(),
        }
    }

    fn duration(&self, value: &Option<Spanned<String>>, key: &str, default: Duration) -> Result<Duration, ConfigError> {
        match value {
            None => Ok(default),
            Some(v) => parse_duration(v.get_ref()).map_err(|reason| self.invalid(v.span(), key, reason)),
        }
    }

    /// A duration that, when given, must be more than zero; `why` says so in the error.
    fn positive_duration(
        &self,
        value: &Option<Spanned<String>>,
        key: &str,
        default: Duration,
        why: &str,
    ) -> Result<Duration, ConfigError> {
        let d = self.duration(value, key, default)?;
        match value {
            Some(v) if d.is_zero() => Err(self.invalid(v.span(), key, why)),
            _ => Ok(d),
        }
    }

    /// A whole number in `range`; `what` completes "use {range}" in the error, e.g. "a weight".
    fn integer(
        &self,
        value: &Spanned<i64>,
        key: &str,
        range: std::ops::RangeInclusive<u64>,
        what: &str,
        otherwise: &str,
    ) -> Result<u64, ConfigError> {
        u64::try_from(*value.get_ref()).ok().filter(|n| range.contains(n)).ok_or_else(|| {
            self.invalid(
                value.span(),
                key,
                format!("{} is not {what}; use {} to {}{otherwise}", value.get_ref(), range.start(), range.end()),
            )
        })
    }

    /// One of a fixed set of names.
    fn choice<T: Copy>(&self, value: &Spanned<String>, key: &str, choices: &[(&str, T)]) -> Result<T, ConfigError> {
        choices.iter().find(|(name, _)| name == value.get_ref()).map(|(_, v)| *v).ok_or_else(|| {
            let names: Vec<&str> = choices.iter().map(|(name, _)| *name).collect();
            self.invalid(
                value.span(),
                key,
                format!("{:?} is not valid here; use one of: {}", value.get_ref(), names.join(", ")),
            )
        })
    }

    fn address(&self, value: &Spanned<String>, key: &str) -> Result<SocketAddr, ConfigError> {
        value.get_ref().trim().parse().map_err(|_| {
            self.invalid(value.span(), key, format!("{:?} is not an address; {ADDRESS_HINT}", value.get_ref()))
        })
    }
}

pub fn parse(text: &str, path: &str) -> Result<Config, ConfigError> {
    let src = Source { path, text };
    let raw: RawConfig = toml::from_str(text).map_err(|e| {
        let line = e.span().map_or(1, |s| src.line_of(s));
        // serde's messages name Rust types; say what an operator would write instead.
        let mut message = e.message().trim_end().replace("expected i64", "expected a whole number");
        let context = src.line_text(line);
        if !context.is_empty() {
            message = format!("{message} (in `{context}`)");
        }
        ConfigError::Syntax { path: path.to_string(), line, message }
    })?;
    validate(&src, raw)
}

fn validate(src: &Source<'_>, raw: RawConfig) -> Result<Config, ConfigError> {
    let workers = match &raw.workers {
        None => crate::sys::available_cpus(),
        Some(w) => nonzero(src.integer(
            w,
            "workers",
            1..=MAX_WORKERS as u64,
            "a worker count",
            ", or leave it out to run one per CPU",
        )?),
    };
    let max_connections = match &raw.max_connections {
        None => None,
        Some(m) => Some(nonzero(src.integer(
            m,
            "max_connections",
            1..=MAX_CONNECTIONS as u64,
            "a connection count",
            ", or leave it out to allow what the file-descriptor limit allows",
        )?)),
    };
    let metrics_bind = raw.metrics_bind.as_ref().map(|m| src.address(m, "metrics_bind")).transpose()?;
    let pipe_size = match &raw.pipe_size {
        None => DEFAULT_PIPE_SIZE,
        Some(p) => {
            let size = src.integer(
                p,
                "pipe_size",
                u64::from(MIN_PIPE_SIZE)..=u64::from(MAX_PIPE_SIZE),
                "a pipe size",
                " bytes",
            )?;
            if !size.is_power_of_two() {
                return Err(src.invalid(
                    p.span(),
                    "pipe_size",
                    format!("{size} is not a power of two; the kernel sizes pipes in powers of two, e.g. 65536"),
                ));
            }
            size as u32
        }
    };
    let relay = match &raw.relay {
        // auto had the lowest CPU per request and near the lowest per GB (README, Performance).
        None => Relay::Auto,
        Some(r) => {
            src.choice(r, "relay", &[("copy", Relay::Copy), ("splice", Relay::Splice), ("auto", Relay::Auto)])?
        }
    };
    if let (Relay::Copy, Some(p)) = (relay, &raw.pipe_size) {
        return Err(src.invalid(p.span(), "pipe_size", "pipe_size only applies to relay = \"splice\" or \"auto\""));
    }
    let spread = match &raw.spread {
        // One ring per core, as the design promises; pack is for cores shared with other work.
        None => Spread::Even,
        Some(s) => src.choice(s, "spread", &[("pack", Spread::Pack), ("even", Spread::Even)])?,
    };
    let admin_socket = match &raw.admin_socket {
        None => None,
        Some(path) => {
            let text = path.get_ref().trim();
            let problem = if text.is_empty() {
                Some("is empty".to_string())
            } else if text.len() > MAX_SOCKET_PATH {
                Some(format!("is {} bytes long; a unix socket path holds at most {MAX_SOCKET_PATH}", text.len()))
            } else if text.ends_with('/') {
                Some("names a directory".to_string())
            } else {
                None
            };
            if let Some(problem) = problem {
                return Err(src.invalid(
                    path.span(),
                    "admin_socket",
                    format!(
                        "{:?} {problem}; give the socket file's path, e.g. \"/run/ringlb/admin.sock\"",
                        path.get_ref()
                    ),
                ));
            }
            Some(PathBuf::from(text))
        }
    };
    let connection_log = raw.connection_log.as_ref().is_none_or(|c| *c.get_ref());
    let dns = validate_dns(src, raw.dns.as_ref())?;
    let run_as = validate_run_as(src, raw.user.as_ref(), raw.group.as_ref())?;
    let log_format = match &raw.log_format {
        None => LogFormat::Text,
        Some(f) => src.choice(f, "log_format", &[("text", LogFormat::Text), ("json", LogFormat::Json)])?,
    };
    let connect_timeout =
        src.positive_duration(&raw.connect_timeout, "connect_timeout", DEFAULT_CONNECT_TIMEOUT, CONNECT_TIMEOUT_ZERO)?;
    let idle_timeout = src.duration(&raw.idle_timeout, "idle_timeout", DEFAULT_IDLE_TIMEOUT)?;
    let drain_timeout = src.duration(&raw.drain_timeout, "drain_timeout", DEFAULT_DRAIN_TIMEOUT)?;

    let mut pools = Vec::with_capacity(raw.pools.len());
    for (name, pool) in &raw.pools {
        pools.push(validate_pool(src, name, pool, connect_timeout)?);
    }
    let pool_index: BTreeMap<&str, usize> = pools.iter().enumerate().map(|(i, p)| (p.name.as_str(), i)).collect();

    if raw.listeners.is_empty() {
        return Err(src.invalid(
            0..0,
            "listeners",
            "no listener is defined; add one, e.g. [listeners.web] with bind = \"127.0.0.1:8080\" and pool = \"web\"",
        ));
    }
    let mut listeners: Vec<(ListenerConfig, Range<usize>)> = Vec::with_capacity(raw.listeners.len());
    for (name, listener) in &raw.listeners {
        let validated = validate_listener(src, name, listener, &pool_index, idle_timeout, max_connections)?;
        let bind_span = listener.get_ref().bind.span();
        if let Some((other, _)) = listeners.iter().find(|(l, _)| binds_overlap(l.bind, validated.bind)) {
            return Err(src.invalid(
                bind_span,
                &format!("listeners.{name}.bind"),
                format!(
                    "{} overlaps the bind {} of listener {:?}; give each listener its own address and port",
                    validated.bind, other.bind, other.name
                ),
            ));
        }
        listeners.push((validated, bind_span));
    }

    if let Some(metrics) = metrics_bind
        && let Some((listener, _)) = listeners.iter().find(|(l, _)| binds_overlap(l.bind, metrics))
    {
        return Err(src.invalid(
            raw.metrics_bind.as_ref().map_or(0..0, |m| m.span()),
            "metrics_bind",
            format!("{metrics} overlaps the bind of listener {:?}; give metrics its own port", listener.name),
        ));
    }

    let mut warnings = Vec::new();
    for (p, (name, raw_pool)) in raw.pools.iter().enumerate() {
        if !listeners.iter().any(|(l, _)| l.pool == Some(p) || l.sni.routes_to(p)) {
            warnings.push(src.warning(
                raw_pool.span(),
                &format!("pools.{name}"),
                "no listener sends connections to this pool (its health checks run all the same)",
            ));
        }
    }
    for ((listener, _), (name, raw_listener)) in listeners.iter().zip(raw.listeners.iter()) {
        if listener.accept_proxy && listener.proxy_from.is_empty() {
            let span = raw_listener.get_ref().accept_proxy.as_ref().map_or(raw_listener.span(), |a| a.span());
            warnings.push(src.warning(
                span,
                &format!("listeners.{name}.accept_proxy"),
                "any client may send a PROXY header and choose the address that allow/deny, max_conns_per_source, \
                 Maglev and logs see; set proxy_from to the balancers in front",
            ));
        }
        for pool in &pools {
            for (i, backend) in pool.backends.iter().enumerate() {
                if loops_back(listener.bind, backend.address) {
                    return Err(ConfigError::Invalid {
                        path: src.path.to_string(),
                        line: backend.line,
                        key: format!("pools.{}.backends[{i}].address", pool.name),
                        message: format!(
                            "{} is ringlb's own listener {:?}: connections would loop back into ringlb; give the backend's address",
                            backend.address, listener.name
                        ),
                    });
                }
            }
        }
    }

    Ok(Config {
        path: src.path.to_string(),
        warnings,
        workers,
        max_connections,
        metrics_bind,
        admin_socket,
        connection_log,
        log_format,
        dns,
        run_as,
        relay,
        pipe_size,
        spread,
        drain_timeout,
        listeners: listeners.into_iter().map(|(l, _)| l).collect(),
        pools,
    })
}

/// Whether nothing can connect to `address` as a backend: the unspecified address (Linux takes
/// it for loopback), a multicast or broadcast address, port 0.
pub fn unconnectable(address: SocketAddr) -> bool {
    let ip = address.ip();
    ip.is_unspecified()
        || ip.is_multicast()
        || matches!(ip, std::net::IpAddr::V4(v4) if v4.is_broadcast())
        || address.port() == 0
}

/// Whether connecting to `backend` reaches the listener bound to `bind` (on any host: the
/// same address, or a wildcard bind and a loopback backend). `host` checks the addresses that
/// are only local on this host.
pub fn loops_back(bind: SocketAddr, backend: SocketAddr) -> bool {
    bind.port() == backend.port()
        && bind.is_ipv4() == backend.is_ipv4()
        && (bind.ip() == backend.ip() || (bind.ip().is_unspecified() && backend.ip().is_loopback()))
}

/// For numbers already checked to be at least 1.
fn nonzero(n: u64) -> NonZeroUsize {
    NonZeroUsize::new(n as usize).unwrap_or(NonZeroUsize::MIN)
}

/// Two binds collide when their ports match (port 0 never collides) and their addresses are
/// equal or one of them is the wildcard of the same family.
fn binds_overlap(a: SocketAddr, b: SocketAddr) -> bool {
    if a.port() == 0 || a.port() != b.port() || a.is_ipv4() != b.is_ipv4() {
        return false;
    }
    a.ip() == b.ip() || a.ip().is_unspecified() || b.ip().is_unspecified()
}

fn validate_listener(
    src: &Source<'_>,
    name: &str,
    listener: &Spanned<RawListener>,
    pool_index: &BTreeMap<&str, usize>,
    default_idle: Duration,
    global_max: Option<NonZeroUsize>,
) -> Result<ListenerConfig, ConfigError> {
    let raw = listener.get_ref();
    let key = |field: &str| format!("listeners.{name}.{field}");
    let bind = src.address(&raw.bind, &key("bind"))?;
    let lookup_pool = |value: &Spanned<String>, key: &str| -> Result<usize, ConfigError> {
        let pool_name = value.get_ref();
        pool_index.get(pool_name.as_str()).copied().ok_or_else(|| {
            let known: Vec<&str> = pool_index.keys().copied().collect();
            src.invalid(
                value.span(),
                key,
                if known.is_empty() {
                    format!("pool {pool_name:?} is not defined, and no [pools.NAME] table is")
                } else {
                    format!("pool {pool_name:?} is not defined; defined pools: {}", known.join(", "))
                },
            )
        })
    };
    let pool = raw.pool.as_ref().map(|p| lookup_pool(p, &key("pool"))).transpose()?;
    let mut sni = SniRoutes::default();
    if let Some(routes) = &raw.sni {
        for (pattern, target) in routes.get_ref() {
            let route_key = key(&format!("sni.{pattern:?}"));
            let target_pool = lookup_pool(target, &route_key)?;
            sni.add(pattern, target_pool).map_err(|reason| src.invalid(target.span(), &route_key, reason))?;
        }
    }
    if pool.is_none() && sni.is_empty() {
        return Err(src.invalid(
            listener.span(),
            &key("pool"),
            "a listener needs a pool (or, with [listeners.NAME.sni] routes, may leave it out to close connections no route matches)",
        ));
    }
    let idle = src.duration(&raw.idle_timeout, &key("idle_timeout"), default_idle)?;
    let handshake_timeout = src.positive_duration(
        &raw.handshake_timeout,
        &key("handshake_timeout"),
        DEFAULT_HANDSHAKE_TIMEOUT,
        "must be more than 0, e.g. \"5s\"",
    )?;
    let networks = |list: &Option<Spanned<Vec<Spanned<String>>>>, field: &str| -> Result<Vec<Cidr>, ConfigError> {
        let Some(list) = list else { return Ok(Vec::new()) };
        list.get_ref()
            .iter()
            .enumerate()
            .map(|(i, entry)| {
                entry
                    .get_ref()
                    .parse()
                    .map_err(|reason| src.invalid(entry.span(), &key(&format!("{field}[{i}]")), reason))
            })
            .collect()
    };
    let access = AccessRules { allow: networks(&raw.allow, "allow")?, deny: networks(&raw.deny, "deny")? };
    let accept_proxy = raw.accept_proxy.as_ref().is_some_and(|a| *a.get_ref());
    let proxy_from = networks(&raw.proxy_from, "proxy_from")?;
    if let (false, Some(list)) = (accept_proxy, &raw.proxy_from) {
        return Err(src.invalid(
            list.span(),
            &key("proxy_from"),
            "proxy_from says who may send a PROXY header; it needs accept_proxy = true",
        ));
    }
    let max_conns_per_source = raw
        .max_conns_per_source
        .as_ref()
        .map(|m| src.integer(m, &key("max_conns_per_source"), 1..=MAX_CONNS_LIMIT, "a connection count", ""))
        .transpose()?
        .and_then(|n| NonZeroU32::new(n as u32));
    let max_connections = match &raw.max_connections {
        None => None,
        Some(m) => {
            let most = global_max.map_or(MAX_CONNECTIONS, NonZeroUsize::get) as u64;
            let within = if global_max.is_some() { " (the top-level max_connections)" } else { "" };
            Some(nonzero(src.integer(m, &key("max_connections"), 1..=most, "a connection count", within)?))
        }
    };
    Ok(ListenerConfig {
        name: name.to_string(),
        line: src.line_of(raw.bind.span()),
        bind,
        pool,
        idle_timeout: (!idle.is_zero()).then_some(idle),
        accept_proxy,
        proxy_from,
        handshake_timeout,
        access,
        max_conns_per_source,
        max_connections,
        sni,
    })
}

fn validate_pool(
    src: &Source<'_>,
    name: &str,
    pool: &Spanned<RawPool>,
    default_connect: Duration,
) -> Result<PoolConfig, ConfigError> {
    let raw = pool.get_ref();
    let key = |field: &str| format!("pools.{name}.{field}");
    let backend_count = raw.backends.get_ref().len() as u64;
    let algorithm_name = raw.algorithm.as_ref().map_or("round_robin", |a| a.get_ref().as_str());
    let algorithm = match &raw.algorithm {
        None => Algorithm::RoundRobin,
        Some(a) => src.choice(
            a,
            &key("algorithm"),
            &[
                ("round_robin", Algorithm::RoundRobin),
                ("least_conn", Algorithm::LeastConn),
                ("random_two", Algorithm::RandomTwo),
                ("maglev", Algorithm::Maglev { table_size: DEFAULT_TABLE_SIZE, hash_key: HashKey::ClientIp }),
            ],
        )?,
    };
    let algorithm = match algorithm {
        Algorithm::Maglev { .. } => {
            let table_size = match &raw.table_size {
                None => DEFAULT_TABLE_SIZE,
                Some(t) => {
                    let size = src.integer(t, &key("table_size"), 101..=MAX_TABLE_SIZE as u64, "a table size", "")?;
                    if !is_prime(size) {
                        return Err(src.invalid(
                            t.span(),
                            &key("table_size"),
                            format!("{size} is not prime; Maglev needs a prime, e.g. 65537 or {}", next_prime(size)),
                        ));
                    }
                    size as u32
                }
            };
            if u64::from(table_size) <= 100 * backend_count {
                return Err(src.invalid(
                    raw.table_size.as_ref().map_or(raw.backends.span(), |t| t.span()),
                    &key("table_size"),
                    format!(
                        "a table of {table_size} is too small for {backend_count} backends to be balanced within 1%; use a prime above {}, e.g. {}",
                        100 * backend_count,
                        next_prime(100 * backend_count + 1)
                    ),
                ));
            }
            let hash_key = match &raw.hash_key {
                None => HashKey::ClientIp,
                Some(h) => src.choice(
                    h,
                    &key("hash_key"),
                    &[("client_ip", HashKey::ClientIp), ("client_ip_port", HashKey::ClientIpPort)],
                )?,
            };
            Algorithm::Maglev { table_size, hash_key }
        }
        other => {
            for (field, span) in [
                ("table_size", raw.table_size.as_ref().map(|t| t.span())),
                ("hash_key", raw.hash_key.as_ref().map(|h| h.span())),
            ] {
                if let Some(span) = span {
                    return Err(src.invalid(
                        span,
                        &key(field),
                        format!("{field} only applies to algorithm = \"maglev\" (this pool uses {algorithm_name:?})"),
                    ));
                }
            }
            other
        }
    };
    let on_down = match &raw.on_down {
        None => OnDown::Keep,
        Some(o) => src.choice(o, &key("on_down"), &[("keep", OnDown::Keep), ("close", OnDown::Close)])?,
    };
    let health = validate_health(src, name, raw.health.as_ref())?;
    let send_proxy = match &raw.send_proxy {
        None => None,
        Some(v) => Some(src.choice(v, &key("send_proxy"), &[("v1", ProxyVersion::V1), ("v2", ProxyVersion::V2)])?),
    };
    let connect_timeout =
        src.positive_duration(&raw.connect_timeout, &key("connect_timeout"), default_connect, CONNECT_TIMEOUT_ZERO)?;
    // As HAProxy's "timeout queue", it defaults to the connect timeout.
    let queue_timeout = src.duration(&raw.queue_timeout, &key("queue_timeout"), connect_timeout)?;

    if raw.backends.get_ref().is_empty() {
        return Err(src.invalid(
            raw.backends.span(),
            &key("backends"),
            "the pool has no backends; list at least one, e.g. [{ address = \"127.0.0.1:9001\" }]",
        ));
    }
    let mut backends: Vec<BackendConfig> = Vec::with_capacity(raw.backends.get_ref().len());
    let mut names: Vec<NameConfig> = Vec::new();
    for (i, backend) in raw.backends.get_ref().iter().enumerate() {
        let entry_key = format!("pools.{name}.backends[{i}]");
        match validate_backend(src, &entry_key, backend)? {
            Entry::Address(validated) => {
                if backends.iter().any(|b| b.address == validated.address) {
                    return Err(src.invalid(
                        backend.span(),
                        &format!("{entry_key}.address"),
                        format!(
                            "{} is listed twice in this pool; list it once and raise its weight instead",
                            validated.address
                        ),
                    ));
                }
                backends.push(validated);
            }
            Entry::Name(validated) => {
                if names.iter().any(|n| n.kind == validated.kind) {
                    return Err(src.invalid(
                        backend.span(),
                        &entry_key,
                        format!("{} is listed twice in this pool; list it once", validated.label()),
                    ));
                }
                names.push(validated);
            }
        }
    }
    Ok(PoolConfig {
        name: name.to_string(),
        algorithm,
        connect_timeout,
        backends,
        names,
        on_down,
        health,
        send_proxy,
        queue_timeout,
    })
}

/// `user` and `group`: both must exist here (the group defaults to the user's own).
fn validate_run_as(
    src: &Source<'_>,
    user: Option<&Spanned<String>>,
    group: Option<&Spanned<String>>,
) -> Result<Option<RunAs>, ConfigError> {
    let Some(user) = user else {
        if let Some(group) = group {
            return Err(src.invalid(
                group.span(),
                "group",
                "group needs user; add user = \"ringlb\" (or leave group out)",
            ));
        }
        return Ok(None);
    };
    let name = user.get_ref().trim();
    let Some((uid, primary)) = sys::user_by_name(name) else {
        return Err(src.invalid(
            user.span(),
            "user",
            format!("there is no user {name:?} here; create it (e.g. adduser --system {name}) or leave user out"),
        ));
    };
    let gid = match group {
        None => primary,
        Some(group) => {
            let group_name = group.get_ref().trim();
            sys::group_by_name(group_name).ok_or_else(|| {
                src.invalid(
                    group.span(),
                    "group",
                    format!("there is no group {group_name:?} here; name an existing group"),
                )
            })?
        }
    };
    Ok(Some(RunAs {
        user: name.to_string(),
        uid,
        gid,
        group: group.map(|g| g.get_ref().trim().to_string()),
        line: src.line_of(user.span()),
    }))
}

fn validate_dns(src: &Source<'_>, raw: Option<&Spanned<RawDns>>) -> Result<DnsConfig, ConfigError> {
    let Some(raw) = raw.map(Spanned::get_ref) else { return Ok(DnsConfig::default()) };
    let mut servers = Vec::new();
    if let Some(list) = &raw.servers {
        for server in list.get_ref() {
            // A bare IP means port 53.
            let text = server.get_ref().trim();
            let parsed = text
                .parse::<SocketAddr>()
                .ok()
                .or_else(|| text.parse::<std::net::IpAddr>().ok().map(|ip| SocketAddr::new(ip, 53)));
            match parsed {
                Some(address) if !unconnectable(address) => servers.push(address),
                Some(_) => {
                    return Err(src.invalid(
                        server.span(),
                        "dns.servers",
                        format!("{text:?} cannot be queried (an unspecified, multicast or broadcast address, or port 0); write a name server's address, e.g. \"10.0.0.2\" or \"127.0.0.1:5353\""),
                    ));
                }
                None => {
                    return Err(src.invalid(
                        server.span(),
                        "dns.servers",
                        format!("{text:?} is not a name server address; write IP or IP:port, e.g. \"10.0.0.2\" or \"127.0.0.1:5353\""),
                    ));
                }
            }
        }
        if servers.is_empty() {
            return Err(src.invalid(
                list.span(),
                "dns.servers",
                "is empty; list a server, or leave servers out to use /etc/resolv.conf",
            ));
        }
    }
    let refresh =
        src.positive_duration(&raw.refresh, "dns.refresh", DEFAULT_DNS_REFRESH, "must be at least 1s, e.g. \"10s\"")?;
    if refresh < MIN_DNS_REFRESH {
        let span = raw.refresh.as_ref().map_or(0..0, |r| r.span());
        return Err(src.invalid(span, "dns.refresh", "must be at least 1s, e.g. \"10s\""));
    }
    let hold = src.duration(&raw.hold, "dns.hold", DEFAULT_DNS_HOLD)?;
    Ok(DnsConfig { servers, refresh, hold })
}

fn validate_health(
    src: &Source<'_>,
    pool: &str,
    raw: Option<&Spanned<RawHealth>>,
) -> Result<Option<HealthConfig>, ConfigError> {
    let Some(raw) = raw.map(Spanned::get_ref) else {
        return Ok(Some(HealthConfig::default()));
    };
    let key = |field: &str| format!("pools.{pool}.health.{field}");
    if raw.enabled.as_ref().is_some_and(|e| !*e.get_ref()) {
        return Ok(None);
    }
    let positive = |value: &Option<Spanned<String>>, field: &str, default: Duration| {
        src.positive_duration(value, &key(field), default, "must be more than 0, e.g. \"2s\"")
    };
    let count = |value: &Option<Spanned<i64>>, field: &str, default: u32| -> Result<u32, ConfigError> {
        match value {
            None => Ok(default),
            Some(v) => Ok(src.integer(v, &key(field), 1..=1000, "a check count", "")? as u32),
        }
    };
    let bytes = |value: &Option<Spanned<String>>, field: &str| -> Result<Option<Vec<u8>>, ConfigError> {
        let Some(v) = value else { return Ok(None) };
        let parsed = parse_escapes(v.get_ref()).map_err(|reason| src.invalid(v.span(), &key(field), reason))?;
        if parsed.is_empty() || parsed.len() > MAX_CHECK_BYTES {
            return Err(src.invalid(v.span(), &key(field), format!("must be 1 to {MAX_CHECK_BYTES} bytes long")));
        }
        Ok(Some(parsed))
    };
    let port = raw.port.as_ref().map(|p| src.integer(p, &key("port"), 1..=65535, "a port", "")).transpose()?;
    let name = |value: &Option<Spanned<String>>, field: &str| -> Result<Option<String>, ConfigError> {
        let Some(v) = value else { return Ok(None) };
        let text = v.get_ref();
        if text.is_empty() || text.len() > 63 || text.contains('\0') {
            return Err(src.invalid(v.span(), &key(field), "must be 1 to 63 bytes, without NUL"));
        }
        Ok(Some(text.clone()))
    };
    let user = name(&raw.user, "user")?;
    let database = name(&raw.database, "database")?;
    let protocol = match &raw.protocol {
        None => CheckProtocol::Tcp,
        Some(p) => {
            let choice = src.choice(p, &key("protocol"), &[("tcp", 0), ("mysql", 1), ("postgres", 2)])?;
            let needs_user = || {
                user.clone().ok_or_else(|| {
                    src.invalid(
                        p.span(),
                        &key("user"),
                        format!(
                            "protocol = {:?} logs in: give the user it logs in as, e.g. user = \"ringlb\" (a user without a password that may connect)",
                            p.get_ref()
                        ),
                    )
                })
            };
            match choice {
                1 => CheckProtocol::Mysql { user: needs_user()? },
                2 => {
                    let user = needs_user()?;
                    CheckProtocol::Postgres { database: database.clone().unwrap_or_else(|| "postgres".into()), user }
                }
                _ => CheckProtocol::Tcp,
            }
        }
    };
    if protocol != CheckProtocol::Tcp {
        for (field, span) in
            [("send", raw.send.as_ref().map(|v| v.span())), ("expect", raw.expect.as_ref().map(|v| v.span()))]
        {
            if let Some(span) = span {
                return Err(src.invalid(
                    span,
                    &key(field),
                    format!(
                        "{field} does not go with protocol = {:?}, which speaks the protocol itself",
                        protocol.name()
                    ),
                ));
            }
        }
    }
    let only_with = |value: Option<&Range<usize>>, field: &str, with: &str| match value {
        Some(span) => Err(src.invalid(span.clone(), &key(field), format!("{field} only applies to protocol = {with}"))),
        None => Ok(()),
    };
    if protocol == CheckProtocol::Tcp {
        only_with(raw.user.as_ref().map(|u| u.span()).as_ref(), "user", "\"mysql\" or \"postgres\"")?;
    }
    if !matches!(protocol, CheckProtocol::Postgres { .. }) {
        only_with(raw.database.as_ref().map(|d| d.span()).as_ref(), "database", "\"postgres\"")?;
    }
    Ok(Some(HealthConfig {
        interval: positive(&raw.interval, "interval", DEFAULT_HEALTH_INTERVAL)?,
        timeout: positive(&raw.timeout, "timeout", DEFAULT_HEALTH_TIMEOUT)?,
        rise: count(&raw.rise, "rise", DEFAULT_RISE)?,
        fall: count(&raw.fall, "fall", DEFAULT_FALL)?,
        send: bytes(&raw.send, "send")?,
        expect: bytes(&raw.expect, "expect")?,
        port: port.map(|p| p as u16),
        protocol,
    }))
}

fn is_prime(n: u64) -> bool {
    n >= 2 && (2..).take_while(|d| d * d <= n).all(|d| !n.is_multiple_of(d))
}

fn next_prime(n: u64) -> u64 {
    (n..).find(|&c| is_prime(c)).unwrap_or(n)
}

/// A backend entry: an address, or a name resolved at run time.
enum Entry {
    Address(BackendConfig),
    Name(NameConfig),
}

fn validate_backend(src: &Source<'_>, key: &str, entry: &Spanned<RawBackend>) -> Result<Entry, ConfigError> {
    let raw = entry.get_ref();
    let weight = match &raw.weight {
        None => NonZeroU32::MIN,
        Some(w) => {
            NonZeroU32::new(src.integer(w, &format!("{key}.weight"), 1..=u64::from(MAX_WEIGHT), "a weight", "")? as u32)
                .unwrap_or(NonZeroU32::MIN)
        }
    };
    let max_conns = raw
        .max_conns
        .as_ref()
        .map(|m| src.integer(m, &format!("{key}.max_conns"), 1..=MAX_CONNS_LIMIT, "a connection count", ""))
        .transpose()?
        .and_then(|n| NonZeroU32::new(n as u32));
    let address = match (&raw.address, &raw.srv) {
        (Some(_), Some(srv)) => {
            return Err(src.invalid(srv.span(), &format!("{key}.srv"), "give either address or srv, not both"));
        }
        (None, None) => {
            return Err(src.invalid(
                entry.span(),
                key,
                "a backend needs an address (\"10.0.0.5:5432\" or \"db.example:5432\") or an srv name (\"_postgresql._tcp.db.example\")",
            ));
        }
        (None, Some(srv)) => {
            if let Some(w) = &raw.weight {
                return Err(src.invalid(
                    w.span(),
                    &format!("{key}.weight"),
                    "SRV records carry their own weights; leave weight out",
                ));
            }
            let name = srv.get_ref().trim().trim_end_matches('.');
            if !is_host_name(name) || !name.starts_with('_') {
                return Err(src.invalid(
                    srv.span(),
                    &format!("{key}.srv"),
                    format!("{:?} is not an SRV name; write e.g. \"_postgresql._tcp.db.example\"", srv.get_ref()),
                ));
            }
            let kind = NameKind::Srv { name: name.to_string() };
            return Ok(Entry::Name(NameConfig { kind, line: src.line_of(srv.span()), weight, max_conns }));
        }
        (Some(address), None) => address,
    };
    let field = format!("{key}.address");
    let text = address.get_ref().trim();
    let line = src.line_of(address.span());
    if let Ok(parsed) = text.parse::<SocketAddr>() {
        if unconnectable(parsed) {
            return Err(src.invalid(
                address.span(),
                &field,
                format!("{parsed} cannot be connected to; give the backend's own IP and port"),
            ));
        }
        return Ok(Entry::Address(BackendConfig {
            address: parsed,
            line,
            weight,
            max_conns,
            origin: None,
            priority: 0,
        }));
    }
    let hint = "use IP:port or host:port, e.g. \"10.0.0.5:5432\", \"[::1]:5432\" or \"db.example:5432\"";
    let (host, port) = text
        .rsplit_once(':')
        .filter(|(host, _)| is_host_name(host.trim_end_matches('.')))
        .ok_or_else(|| src.invalid(address.span(), &field, format!("{text:?} is not an address; {hint}")))?;
    let port = port
        .parse::<u16>()
        .ok()
        .filter(|p| *p > 0)
        .ok_or_else(|| src.invalid(address.span(), &field, format!("{port:?} is not a port (1-65535); {hint}")))?;
    let kind = NameKind::Host { host: host.trim_end_matches('.').to_string(), port };
    Ok(Entry::Name(NameConfig { kind, line, weight, max_conns }))
}

/// Whether `name` is a DNS name ringlb resolves: dot-separated labels of letters, digits,
/// `-` and `_` (SRV labels), at most 253 bytes, not all digits (an IP is not a name).
fn is_host_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
                && !label.starts_with('-')
                && !label.ends_with('-')
        })
        && !name.split('.').all(|label| label.bytes().all(|b| b.is_ascii_digit()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
workers = 2
drain_timeout = "5s"

[listeners.web]
bind = "127.0.0.1:8080"
pool = "web"
idle_timeout = "500ms"

[listeners.db]
bind = "[::1]:5432"
pool = "web"

[pools.web]
algorithm = "round_robin"
connect_timeout = "250ms"
backends = [{ address = "127.0.0.1:9001" }, { address = "127.0.0.1:9002", weight = 2 }]
"#;

    fn error(text: &str) -> ConfigError {
        Config::parse(text, "test.toml").expect_err("config should be rejected")
    }

    /// Asserts the error points at `line` and mentions each of `needles`.
    fn assert_error(text: &str, line: usize, needles: &[&str]) {
        let err = error(text);
        let shown = err.to_string();
        assert_eq!(err.line(), line, "wrong line in: {shown}");
        assert!(shown.starts_with("test.toml:"), "no file name in: {shown}");
        for needle in needles {
            assert!(shown.contains(needle), "{needle:?} missing from: {shown}");
        }
    }

    #[test]
    fn good_config_is_typed() {
        let config = Config::parse(GOOD, "test.toml").unwrap();
        assert_eq!(config.workers.get(), 2);
        assert_eq!(config.drain_timeout, Duration::from_secs(5));
        assert_eq!(config.listeners.len(), 2);
        // Sorted by name: db, then web.
        assert_eq!(config.listeners[0].name, "db");
        assert_eq!(config.listeners[0].bind, "[::1]:5432".parse().unwrap());
        assert_eq!(config.listeners[0].idle_timeout, Some(DEFAULT_IDLE_TIMEOUT));
        assert_eq!(config.listeners[1].idle_timeout, Some(Duration::from_millis(500)));
        let pool = &config.pools[config.listeners[1].pool.unwrap()];
        assert_eq!(pool.name, "web");
        assert_eq!(pool.algorithm, Algorithm::RoundRobin);
        assert_eq!(pool.connect_timeout, Duration::from_millis(250));
        assert_eq!(pool.backends[1].weight.get(), 2);
        assert_eq!(pool.backends[0].weight.get(), 1);
    }

    #[test]
    fn defaults_apply() {
        let config = Config::parse(
            "[listeners.a]\nbind = \"127.0.0.1:1\"\npool = \"p\"\n[pools.p]\nbackends = [{ address = \"127.0.0.1:2\" }]\n",
            "t",
        )
        .unwrap();
        assert_eq!(config.workers, crate::sys::available_cpus());
        assert_eq!(config.drain_timeout, DEFAULT_DRAIN_TIMEOUT);
        assert_eq!(config.pools[0].connect_timeout, DEFAULT_CONNECT_TIMEOUT);
        assert_eq!(config.listeners[0].idle_timeout, Some(DEFAULT_IDLE_TIMEOUT));
    }

    #[test]
    fn top_level_timeouts_are_defaults_that_sections_override() {
        let text = "connect_timeout = \"1s\"\nidle_timeout = \"0s\"\n[listeners.a]\nbind = \"127.0.0.1:1\"\npool = \"p\"\n[pools.p]\nbackends = [{ address = \"127.0.0.1:2\" }]\n";
        let config = Config::parse(text, "t").unwrap();
        assert_eq!(config.pools[0].connect_timeout, Duration::from_secs(1));
        assert_eq!(config.listeners[0].idle_timeout, None, "\"0s\" means no idle timeout");
    }

    #[test]
    fn unknown_keys_are_rejected_everywhere() {
        assert_error(&GOOD.replace("workers = 2", "wrokers = 2"), 2, &["wrokers", "workers"]);
        assert_error(&GOOD.replace("pool = \"web\"\nidle", "pool = \"web\"\nport = 1\nidle"), 8, &["port", "bind"]);
        assert_error(
            &GOOD.replace("connect_timeout = \"250ms\"", "timeout = \"1s\""),
            16,
            &["timeout", "connect_timeout"],
        );
        assert_error(&GOOD.replace("weight = 2", "wieght = 2"), 17, &["wieght", "weight"]);
    }

    #[test]
    fn toml_syntax_error_names_line() {
        assert_error(&GOOD.replace("workers = 2", "workers = "), 2, &[]);
    }

    #[test]
    fn wrong_type_names_line() {
        assert_error(&GOOD.replace("workers = 2", "workers = \"two\""), 2, &["workers = \"two\"", "whole number"]);
    }

    #[test]
    fn unknown_pool() {
        assert_error(
            &GOOD.replace("pool = \"web\"\nidle", "pool = \"wbe\"\nidle"),
            7,
            &["listeners.web.pool", "\"wbe\"", "defined pools: web"],
        );
    }

    #[test]
    fn no_backends() {
        assert_error(
            &GOOD.replace(
                r#"backends = [{ address = "127.0.0.1:9001" }, { address = "127.0.0.1:9002", weight = 2 }]"#,
                "backends = []",
            ),
            17,
            &["pools.web.backends", "no backends"],
        );
    }

    #[test]
    fn missing_backends_key() {
        let text = "[listeners.a]\nbind = \"127.0.0.1:1\"\npool = \"p\"\n[pools.p]\nalgorithm = \"round_robin\"\n";
        let shown = error(text).to_string();
        assert!(shown.contains("backends"), "{shown}");
    }

    #[test]
    fn duplicate_bind() {
        assert_error(&GOOD.replace("[::1]:5432", "127.0.0.1:8080"), 6, &["listeners.web.bind", "overlaps", "\"db\""]);
        // A wildcard on the same port collides with a specific address too.
        assert_error(&GOOD.replace("[::1]:5432", "0.0.0.0:8080"), 6, &["listeners.web.bind", "overlaps"]);
        // Different families or port 0 do not collide.
        Config::parse(&GOOD.replace("[::1]:5432", "[::]:8080"), "t").unwrap();
        Config::parse(&GOOD.replace("[::1]:5432", "127.0.0.1:0").replace("127.0.0.1:8080", "127.0.0.1:0"), "t")
            .unwrap();
    }

    #[test]
    fn bad_addresses() {
        assert_error(
            &GOOD.replace("127.0.0.1:8080", "localhost:8080"),
            6,
            &["listeners.web.bind", "\"localhost:8080\"", "IP:port"],
        );
        assert_error(&GOOD.replace("127.0.0.1:8080", "127.0.0.1"), 6, &["listeners.web.bind", "IP:port"]);
        assert_error(
            &GOOD.replace("127.0.0.1:9002", "127.0.0.1:99999"),
            17,
            &["pools.web.backends[1].address", "IP:port"],
        );
        assert_error(
            &GOOD.replace("127.0.0.1:9002", "0.0.0.0:9002"),
            17,
            &["pools.web.backends[1].address", "cannot be connected"],
        );
        assert_error(&GOOD.replace("127.0.0.1:9002", "127.0.0.1:0"), 17, &["pools.web.backends[1].address"]);
        for unconnectable in ["224.0.0.1:9002", "255.255.255.255:9002", "[ff02::1]:9002"] {
            assert_error(
                &GOOD.replace("127.0.0.1:9002", unconnectable),
                17,
                &["pools.web.backends[1].address", "cannot be connected"],
            );
        }
    }

    #[test]
    fn duplicate_backend() {
        assert_error(
            &GOOD.replace("127.0.0.1:9002", "127.0.0.1:9001"),
            17,
            &["pools.web.backends[1].address", "twice"],
        );
    }

    #[test]
    fn bad_weights() {
        for bad in ["0", "-1", "257", "4294967297"] {
            assert_error(
                &GOOD.replace("weight = 2", &format!("weight = {bad}")),
                17,
                &["pools.web.backends[1].weight", "1 to 256"],
            );
        }
    }

    #[test]
    fn bad_workers() {
        for bad in ["0", "-2", "1025"] {
            assert_error(&GOOD.replace("workers = 2", &format!("workers = {bad}")), 2, &["workers", "1 to 1024"]);
        }
    }

    #[test]
    fn max_connections() {
        let config = Config::parse(&GOOD.replace("workers = 2", "workers = 2\nmax_connections = 500"), "t").unwrap();
        assert_eq!(config.max_connections.map(NonZeroUsize::get), Some(500));
        assert_eq!(Config::parse(GOOD, "t").unwrap().max_connections, None);
        for bad in ["0", "-5", "100000001"] {
            assert_error(
                &GOOD.replace("workers = 2", &format!("workers = 2\nmax_connections = {bad}")),
                3,
                &["max_connections", "1 to 100000000"],
            );
        }
    }

    /// GOOD with its pool section replaced by `pool` (the listener lines stay the same).
    fn with_pool(pool: &str) -> String {
        let head = &GOOD[..GOOD.find("[pools.web]").unwrap()];
        format!(
            "{head}[pools.web]\n{pool}\nbackends = [{{ address = \"127.0.0.1:9001\" }}, {{ address = \"127.0.0.1:9002\" }}]\n"
        )
    }

    #[test]
    fn algorithms() {
        for (name, expected) in [
            ("round_robin", Algorithm::RoundRobin),
            ("least_conn", Algorithm::LeastConn),
            ("random_two", Algorithm::RandomTwo),
            ("maglev", Algorithm::Maglev { table_size: 65_537, hash_key: HashKey::ClientIp }),
        ] {
            let config = Config::parse(&with_pool(&format!("algorithm = \"{name}\"")), "t").unwrap();
            assert_eq!(config.pools[0].algorithm, expected);
            assert_eq!(config.pools[0].algorithm.name(), name);
        }
        let config =
            Config::parse(&with_pool("algorithm = \"maglev\"\ntable_size = 1009\nhash_key = \"client_ip_port\""), "t")
                .unwrap();
        assert_eq!(config.pools[0].algorithm, Algorithm::Maglev { table_size: 1009, hash_key: HashKey::ClientIpPort });
    }

    #[test]
    fn maglev_options() {
        // Line 15 is the first line of the pool section in `with_pool`.
        assert_error(
            &with_pool("algorithm = \"maglev\"\ntable_size = 1000"),
            16,
            &["pools.web.table_size", "not prime", "1009"],
        );
        assert_error(
            &with_pool("algorithm = \"maglev\"\ntable_size = 101"),
            16,
            &["pools.web.table_size", "too small for 2 backends", "above 200", "211"],
        );
        assert_error(&with_pool("algorithm = \"maglev\"\ntable_size = 7"), 16, &["pools.web.table_size", "101 to"]);
        assert_error(
            &with_pool("algorithm = \"maglev\"\nhash_key = \"source\""),
            16,
            &["pools.web.hash_key", "client_ip, client_ip_port"],
        );
        assert_error(
            &with_pool("table_size = 1009"),
            15,
            &["pools.web.table_size", "only applies to algorithm = \"maglev\"", "\"round_robin\""],
        );
        assert_error(
            &with_pool("algorithm = \"least_conn\"\nhash_key = \"client_ip\""),
            16,
            &["pools.web.hash_key", "only applies"],
        );
    }

    #[test]
    fn on_down() {
        assert_eq!(Config::parse(&with_pool(""), "t").unwrap().pools[0].on_down, OnDown::Keep);
        assert_eq!(Config::parse(&with_pool("on_down = \"close\""), "t").unwrap().pools[0].on_down, OnDown::Close);
        assert_error(&with_pool("on_down = \"kill\""), 15, &["pools.web.on_down", "keep, close"]);
    }

    #[test]
    fn health_defaults_and_options() {
        let config = Config::parse(&with_pool(""), "t").unwrap();
        assert_eq!(config.pools[0].health, Some(HealthConfig::default()), "checks are on by default");
        let text = format!(
            "{}[pools.web.health]\ninterval = \"500ms\"\ntimeout = \"200ms\"\nrise = 1\nfall = 5\nsend = \"PING\\r\\n\"\nexpect = \"+PONG\"\n",
            with_pool("")
        );
        let health = Config::parse(&text, "t").unwrap().pools[0].health.clone().unwrap();
        assert_eq!(health.interval, Duration::from_millis(500));
        assert_eq!(health.timeout, Duration::from_millis(200));
        assert_eq!((health.rise, health.fall), (1, 5));
        assert_eq!(health.send.as_deref(), Some(&b"PING\r\n"[..]));
        assert_eq!(health.expect.as_deref(), Some(&b"+PONG"[..]));
        let off = format!("{}[pools.web.health]\nenabled = false\n", with_pool(""));
        assert_eq!(Config::parse(&off, "t").unwrap().pools[0].health, None);
    }

    #[test]
    fn bad_health() {
        let base = with_pool("");
        let line = base.lines().count() + 2;
        for (setting, needles) in [
            ("interval = \"0s\"", &["pools.web.health.interval", "more than 0"][..]),
            ("timeout = \"soon\"", &["pools.web.health.timeout"][..]),
            ("rise = 0", &["pools.web.health.rise", "1 to 1000"][..]),
            ("fall = 1001", &["pools.web.health.fall", "1 to 1000"][..]),
            ("send = \"\\\\q\"", &["pools.web.health.send", "not an escape"][..]),
            ("expect = \"\"", &["pools.web.health.expect", "1 to 4096 bytes"][..]),
            ("port = 0", &["pools.web.health.port", "1 to 65535"][..]),
            ("protocol = \"redis\"", &["pools.web.health.protocol", "tcp, mysql, postgres"][..]),
            ("protocol = \"mysql\"", &["pools.web.health.user", "logs in"][..]),
            ("user = \"ringlb\"", &["pools.web.health.user", "only applies"][..]),
        ] {
            assert_error(&format!("{base}[pools.web.health]\n{setting}\n"), line, needles);
        }
    }

    #[test]
    fn backends_by_name_and_srv_and_the_dns_table() {
        let text = GOOD.replace(
            "backends = [{ address = \"127.0.0.1:9001\" }, { address = \"127.0.0.1:9002\", weight = 2 }]",
            "backends = [{ address = \"primary.db.example.:5432\", weight = 3, max_conns = 10 }, { srv = \"_postgresql._tcp.replicas.db.example\" }]",
        );
        let config = Config::parse(
            &format!("{text}\n[dns]\nservers = [\"127.0.0.1:5353\", \"10.0.0.2\"]\nrefresh = \"5s\"\nhold = \"1m\"\n"),
            "t",
        )
        .unwrap();
        assert_eq!(config.dns.servers, vec!["127.0.0.1:5353".parse().unwrap(), "10.0.0.2:53".parse().unwrap()]);
        assert_eq!(config.dns.refresh, Duration::from_secs(5));
        assert_eq!(config.dns.hold, Duration::from_secs(60));
        let pool = &config.pools[0];
        assert!(pool.backends.is_empty());
        assert_eq!(pool.names[0].kind, NameKind::Host { host: "primary.db.example".into(), port: 5432 });
        assert_eq!(pool.names[0].weight.get(), 3);
        assert_eq!(pool.names[0].max_conns.map(|m| m.get()), Some(10));
        assert_eq!(pool.names[1].kind, NameKind::Srv { name: "_postgresql._tcp.replicas.db.example".into() });
        assert_eq!(Config::parse(GOOD, "t").unwrap().dns, DnsConfig::default());

        let pool_line = |entry: &str| {
            GOOD.replace(
                "backends = [{ address = \"127.0.0.1:9001\" }, { address = \"127.0.0.1:9002\", weight = 2 }]",
                &format!("backends = [{entry}]"),
            )
        };
        let line = GOOD.lines().position(|l| l.starts_with("backends")).unwrap() + 1;
        for (entry, needles) in [
            ("{ address = \"db.example\" }", &["backends[0].address", "host:port"][..]),
            ("{ address = \"db.example:0\" }", &["backends[0].address", "not a port"][..]),
            ("{ address = \"bad name!:5432\" }", &["backends[0].address", "not an address"][..]),
            ("{ srv = \"db.example\" }", &["backends[0].srv", "_postgresql._tcp"][..]),
            ("{ srv = \"_pg._tcp.db\", weight = 2 }", &["backends[0].weight", "own weights"][..]),
            ("{ srv = \"_pg._tcp.db\", address = \"a.b:1\" }", &["backends[0].srv", "not both"][..]),
            ("{ weight = 2 }", &["backends[0]", "an address", "srv"][..]),
            ("{ address = \"a.example:1\" }, { address = \"a.example:1\" }", &["backends[1]", "twice"][..]),
        ] {
            assert_error(&pool_line(entry), line, needles);
        }
        let after = GOOD.lines().count() + 3;
        assert_error(&format!("{GOOD}\n[dns]\nservers = [\"resolver\"]\n"), after, &["dns.servers", "IP:port"]);
        for unusable in ["0.0.0.0", "224.0.0.251:5353", "255.255.255.255", "[ff02::fb]:5353", "10.0.0.2:0"] {
            assert_error(
                &format!("{GOOD}\n[dns]\nservers = [\"{unusable}\"]\n"),
                after,
                &["dns.servers", unusable, "cannot be queried"],
            );
        }
        assert_error(&format!("{GOOD}\n[dns]\nrefresh = \"500ms\"\n"), after, &["dns.refresh", "at least 1s"]);
    }

    #[test]
    fn database_checks_and_their_conflicts() {
        let base = with_pool("");
        let config = Config::parse(
            &format!("{base}[pools.web.health]\nprotocol = \"postgres\"\nuser = \"ringlb\"\nport = 8008\n"),
            "t",
        )
        .unwrap();
        let health = config.pools[0].health.clone().unwrap();
        assert_eq!(health.protocol, CheckProtocol::Postgres { user: "ringlb".into(), database: "postgres".into() });
        assert_eq!(health.port, Some(8008));
        let line = base.lines().count() + 4;
        assert_error(
            &format!("{base}[pools.web.health]\nprotocol = \"mysql\"\nuser = \"u\"\nsend = \"x\"\n"),
            line,
            &["pools.web.health.send", "protocol = \"mysql\""],
        );
        assert_error(
            &format!("{base}[pools.web.health]\nprotocol = \"mysql\"\nuser = \"u\"\ndatabase = \"d\"\n"),
            line,
            &["pools.web.health.database", "postgres"],
        );
    }

    #[test]
    fn metrics_bind() {
        let config = Config::parse(&format!("metrics_bind = \"127.0.0.1:9100\"\n{GOOD}"), "t").unwrap();
        assert_eq!(config.metrics_bind, Some("127.0.0.1:9100".parse().unwrap()));
        assert_error(
            &format!("metrics_bind = \"127.0.0.1:8080\"\n{GOOD}"),
            1,
            &["metrics_bind", "overlaps", "\"web\""],
        );
        assert_error(&format!("metrics_bind = \"localhost\"\n{GOOD}"), 1, &["metrics_bind", "IP:port"]);
    }

    #[test]
    fn listener_identity_and_access_keys() {
        let text = GOOD.replace(
            "idle_timeout = \"500ms\"",
            "idle_timeout = \"500ms\"\naccept_proxy = true\nhandshake_timeout = \"2s\"\nallow = [\"10.0.0.0/8\", \"::1\"]\ndeny = [\"10.1.0.0/16\"]\nmax_conns_per_source = 20",
        );
        let config = Config::parse(&text, "t").unwrap();
        let web = &config.listeners[1];
        assert!(web.accept_proxy);
        assert_eq!(web.handshake_timeout, Duration::from_secs(2));
        assert_eq!(web.access.allow.len(), 2);
        assert!(!web.access.permits("10.1.2.3".parse().unwrap()));
        assert_eq!(web.max_conns_per_source.map(|n| n.get()), Some(20));
        let db = &config.listeners[0];
        assert!(!db.accept_proxy && db.access.is_empty() && db.max_conns_per_source.is_none());
        assert_eq!(db.handshake_timeout, DEFAULT_HANDSHAKE_TIMEOUT);
    }

    #[test]
    fn bad_listener_identity_and_access_keys() {
        let with =
            |extra: &str| GOOD.replace("idle_timeout = \"500ms\"", &format!("idle_timeout = \"500ms\"\n{extra}"));
        assert_error(
            &with("allow = [\"10.0.0.0/8\", \"10.0.0.1/8\"]"),
            9,
            &["listeners.web.allow[1]", "did you mean \"10.0.0.0/8\""],
        );
        assert_error(&with("deny = [\"example.com\"]"), 9, &["listeners.web.deny[0]", "not an address"]);
        assert_error(&with("max_conns_per_source = 0"), 9, &["listeners.web.max_conns_per_source", "1 to 10000000"]);
        assert_error(&with("handshake_timeout = \"0s\""), 9, &["listeners.web.handshake_timeout", "more than 0"]);
        assert_error(&with("accept_proxy = \"yes\""), 9, &["accept_proxy = \"yes\"", "bool"]);
    }

    #[test]
    fn sni_routes() {
        let text = GOOD.replace(
            "[listeners.db]",
            "[listeners.web.sni]\n\"db.example.com\" = \"web\"\n\"*.Example.com\" = \"web\"\n\n[listeners.db]",
        );
        let config = Config::parse(&text, "t").unwrap();
        let web = &config.listeners[1];
        assert_eq!(web.sni.route("db.example.com"), Some(0));
        assert_eq!(web.sni.route("a.example.com"), Some(0));
        assert_eq!(web.pools(&config), vec![0]);
        // With routes, the default pool may be left out; without, it may not.
        let no_default = text.replace("pool = \"web\"\nidle_timeout = \"500ms\"", "idle_timeout = \"500ms\"");
        assert_eq!(Config::parse(&no_default, "t").unwrap().listeners[1].pool, None);
        assert_error(
            &GOOD.replace("[::1]:5432\"\npool = \"web\"", "[::1]:5432\""),
            10,
            &["listeners.db.pool", "needs a pool"],
        );
        let bad =
            |route: &str| GOOD.replace("[listeners.db]", &format!("[listeners.web.sni]\n{route}\n\n[listeners.db]"));
        assert_error(
            &bad("\"db.example.com\" = \"nope\""),
            11,
            &["listeners.web.sni.\"db.example.com\"", "pool \"nope\" is not defined"],
        );
        assert_error(&bad("\"*.*.example.com\" = \"web\""), 11, &["not a server name", "*.example.com"]);
        assert_error(&bad("\"a.example.com\" = \"web\"\n\"A.example.com\" = \"web\""), 11, &["listed twice"]);
    }

    #[test]
    fn pool_proxy_and_queue_keys() {
        let config = Config::parse(&with_pool("send_proxy = \"v2\"\nconnect_timeout = \"2s\""), "t").unwrap();
        assert_eq!(config.pools[0].send_proxy, Some(ProxyVersion::V2));
        assert_eq!(config.pools[0].queue_timeout, Duration::from_secs(2), "defaults to the connect timeout");
        let config = Config::parse(&with_pool("send_proxy = \"v1\"\nqueue_timeout = \"5s\""), "t").unwrap();
        assert_eq!(config.pools[0].send_proxy, Some(ProxyVersion::V1));
        assert_eq!(config.pools[0].queue_timeout, Duration::from_secs(5));
        assert_error(&with_pool("send_proxy = \"v3\""), 15, &["pools.web.send_proxy", "v1, v2"]);
        let limited = GOOD.replace("weight = 2 }", "weight = 2, max_conns = 50 }");
        let config = Config::parse(&limited, "t").unwrap();
        assert_eq!(config.pools[0].backends[1].max_conns.map(|n| n.get()), Some(50));
        assert_eq!(config.pools[0].backends[0].max_conns, None);
        assert_error(
            &GOOD.replace("weight = 2 }", "weight = 2, max_conns = 0 }"),
            17,
            &["pools.web.backends[1].max_conns", "1 to"],
        );
    }

    #[test]
    fn relay_modes() {
        let default = Config::parse(GOOD, "t").unwrap();
        assert_eq!((default.relay, default.pipe_size), (Relay::Auto, DEFAULT_PIPE_SIZE));
        assert_eq!(Config::parse(&format!("relay = \"copy\"\n{GOOD}"), "t").unwrap().relay, Relay::Copy);
        let splice = Config::parse(&format!("relay = \"splice\"\n{GOOD}"), "t").unwrap();
        assert_eq!((splice.relay, splice.pipe_size), (Relay::Splice, DEFAULT_PIPE_SIZE));
        let sized = Config::parse(&format!("relay = \"splice\"\npipe_size = 262144\n{GOOD}"), "t").unwrap();
        assert_eq!((sized.relay, sized.pipe_size), (Relay::Splice, 262_144));
        assert_eq!(Config::parse(&format!("relay = \"auto\"\n{GOOD}"), "t").unwrap().relay, Relay::Auto);
        assert_error(&format!("relay = \"zero-copy\"\n{GOOD}"), 1, &["relay", "copy, splice, auto"]);
        assert_eq!(Config::parse(GOOD, "t").unwrap().spread, Spread::Even);
        assert_eq!(Config::parse(&format!("spread = \"pack\"\n{GOOD}"), "t").unwrap().spread, Spread::Pack);
        assert_error(&format!("spread = \"round_robin\"\n{GOOD}"), 1, &["spread", "pack, even"]);
        assert_error(&format!("relay = \"splice\"\npipe_size = 100000\n{GOOD}"), 2, &["pipe_size", "power of two"]);
        assert_error(&format!("relay = \"splice\"\npipe_size = 2097152\n{GOOD}"), 2, &["pipe_size", "4096 to 1048576"]);
        assert_error(
            &format!("relay = \"copy\"\npipe_size = 65536\n{GOOD}"),
            2,
            &["pipe_size", "only applies to relay = \"splice\" or \"auto\""],
        );
        let sized_default = Config::parse(&format!("pipe_size = 131072\n{GOOD}"), "t").unwrap();
        assert_eq!(
            (sized_default.relay, sized_default.pipe_size),
            (Relay::Auto, 131_072),
            "pipe_size applies to the default"
        );
    }

    #[test]
    fn bad_algorithm() {
        assert_error(
            &GOOD.replace("\"round_robin\"", "\"fastest\""),
            15,
            &["pools.web.algorithm", "\"fastest\"", "round_robin, least_conn, random_two, maglev"],
        );
    }

    #[test]
    fn bad_durations() {
        assert_error(&GOOD.replace("\"5s\"", "\"5\""), 3, &["drain_timeout", "ms, s, m, h"]);
        assert_error(&GOOD.replace("\"500ms\"", "\"half a second\""), 8, &["listeners.web.idle_timeout"]);
        assert_error(&GOOD.replace("\"250ms\"", "\"1.5s\""), 16, &["pools.web.connect_timeout"]);
        assert_error(&GOOD.replace("\"250ms\"", "\"0s\""), 16, &["pools.web.connect_timeout", "fail every connection"]);
        assert_error(&format!("connect_timeout = \"0ms\"\n{GOOD}"), 1, &["connect_timeout"]);
    }

    #[test]
    fn no_listeners() {
        let text = "[pools.p]\nbackends = [{ address = \"127.0.0.1:2\" }]\n";
        let err = error(text);
        assert_eq!(err.key(), Some("listeners"));
        assert!(err.to_string().contains("[listeners.web]"));
    }

    #[test]
    fn unreadable_file_is_an_error_not_a_panic() {
        let err = Config::load(std::path::Path::new("/nonexistent/ringlb.toml")).unwrap_err();
        assert!(err.to_string().contains("/nonexistent/ringlb.toml"));
    }
}
