//! Turns [`RawConfig`] into [`Config`], rejecting anything that cannot work with a message that
//! names the line, the key and what would be valid.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::num::{NonZeroU32, NonZeroUsize};
use std::ops::Range;
use std::time::Duration;

use toml::Spanned;

use super::raw::{RawBackend, RawConfig, RawListener, RawPool};
use super::{
    Algorithm, BackendConfig, Config, ConfigError, DEFAULT_CONNECT_TIMEOUT, DEFAULT_DRAIN_TIMEOUT,
    DEFAULT_IDLE_TIMEOUT, ListenerConfig, MAX_CONNECTIONS, MAX_WEIGHT, MAX_WORKERS, PoolConfig, parse_duration,
};

const ADDRESS_HINT: &str = "use IP:port, e.g. \"127.0.0.1:9001\" or \"[::1]:9001\" (host names are not resolved)";

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
        Some(w) => usize::try_from(*w.get_ref())
            .ok()
            .filter(|n| (1..=MAX_WORKERS).contains(n))
            .and_then(NonZeroUsize::new)
            .ok_or_else(|| {
                src.invalid(
                    w.span(),
                    "workers",
                    format!(
                        "{} is not a worker count; use 1 to {MAX_WORKERS}, or leave it out to run one per CPU",
                        w.get_ref()
                    ),
                )
            })?,
    };
    let max_connections = match &raw.max_connections {
        None => None,
        Some(m) => Some(
            usize::try_from(*m.get_ref())
                .ok()
                .filter(|n| (1..=MAX_CONNECTIONS).contains(n))
                .and_then(NonZeroUsize::new)
                .ok_or_else(|| {
                    src.invalid(
                        m.span(),
                        "max_connections",
                        format!(
                            "{} is not a connection count; use 1 to {MAX_CONNECTIONS}, or leave it out to allow what the file-descriptor limit allows",
                            m.get_ref()
                        ),
                    )
                })?,
        ),
    };
    let connect_timeout = src.duration(&raw.connect_timeout, "connect_timeout", DEFAULT_CONNECT_TIMEOUT)?;
    let idle_timeout = src.duration(&raw.idle_timeout, "idle_timeout", DEFAULT_IDLE_TIMEOUT)?;
    let drain_timeout = src.duration(&raw.drain_timeout, "drain_timeout", DEFAULT_DRAIN_TIMEOUT)?;
    nonzero_connect_timeout(src, &raw.connect_timeout, "connect_timeout", connect_timeout)?;

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
        let validated = validate_listener(src, name, listener, &pool_index, idle_timeout)?;
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

    Ok(Config {
        workers,
        max_connections,
        drain_timeout,
        listeners: listeners.into_iter().map(|(l, _)| l).collect(),
        pools,
    })
}

fn nonzero_connect_timeout(
    src: &Source<'_>,
    value: &Option<Spanned<String>>,
    key: &str,
    parsed: Duration,
) -> Result<(), ConfigError> {
    match value {
        Some(v) if parsed.is_zero() => {
            Err(src.invalid(v.span(), key, "a connect timeout of 0 would fail every connection; use e.g. \"3s\""))
        }
        _ => Ok(()),
    }
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
) -> Result<ListenerConfig, ConfigError> {
    let raw = listener.get_ref();
    let key = |field: &str| format!("listeners.{name}.{field}");
    let bind = src.address(&raw.bind, &key("bind"))?;
    let pool_name = raw.pool.get_ref();
    let pool = *pool_index.get(pool_name.as_str()).ok_or_else(|| {
        let known: Vec<&str> = pool_index.keys().copied().collect();
        src.invalid(
            raw.pool.span(),
            &key("pool"),
            if known.is_empty() {
                format!("pool {pool_name:?} is not defined, and no [pools.NAME] table is")
            } else {
                format!("pool {pool_name:?} is not defined; defined pools: {}", known.join(", "))
            },
        )
    })?;
    let idle = src.duration(&raw.idle_timeout, &key("idle_timeout"), default_idle)?;
    Ok(ListenerConfig { name: name.to_string(), bind, pool, idle_timeout: (!idle.is_zero()).then_some(idle) })
}

fn validate_pool(
    src: &Source<'_>,
    name: &str,
    pool: &Spanned<RawPool>,
    default_connect: Duration,
) -> Result<PoolConfig, ConfigError> {
    let raw = pool.get_ref();
    let key = |field: &str| format!("pools.{name}.{field}");
    let algorithm = match &raw.algorithm {
        None => Algorithm::RoundRobin,
        Some(a) => Algorithm::from_name(a.get_ref()).ok_or_else(|| {
            src.invalid(
                a.span(),
                &key("algorithm"),
                format!("{:?} is not an algorithm; use one of: {}", a.get_ref(), Algorithm::NAMES.join(", ")),
            )
        })?,
    };
    let connect_timeout = src.duration(&raw.connect_timeout, &key("connect_timeout"), default_connect)?;
    nonzero_connect_timeout(src, &raw.connect_timeout, &key("connect_timeout"), connect_timeout)?;

    if raw.backends.get_ref().is_empty() {
        return Err(src.invalid(
            raw.backends.span(),
            &key("backends"),
            "the pool has no backends; list at least one, e.g. [{ address = \"127.0.0.1:9001\" }]",
        ));
    }
    let mut backends: Vec<BackendConfig> = Vec::with_capacity(raw.backends.get_ref().len());
    for (i, backend) in raw.backends.get_ref().iter().enumerate() {
        let validated = validate_backend(src, &format!("pools.{name}.backends[{i}]"), backend.get_ref())?;
        if backends.iter().any(|b| b.address == validated.address) {
            return Err(src.invalid(
                backend.span(),
                &format!("pools.{name}.backends[{i}].address"),
                format!(
                    "{} is listed twice in this pool; list it once and raise its weight instead",
                    validated.address
                ),
            ));
        }
        backends.push(validated);
    }
    Ok(PoolConfig { name: name.to_string(), algorithm, connect_timeout, backends })
}

fn validate_backend(src: &Source<'_>, key: &str, raw: &RawBackend) -> Result<BackendConfig, ConfigError> {
    let address = src.address(&raw.address, &format!("{key}.address"))?;
    if address.port() == 0 || address.ip().is_unspecified() {
        return Err(src.invalid(
            raw.address.span(),
            &format!("{key}.address"),
            format!("{address} cannot be connected to; give the backend's own IP and port"),
        ));
    }
    let weight = match &raw.weight {
        None => NonZeroU32::MIN,
        Some(w) => u32::try_from(*w.get_ref()).ok().filter(|w| *w <= MAX_WEIGHT).and_then(NonZeroU32::new).ok_or_else(
            || {
                src.invalid(
                    w.span(),
                    &format!("{key}.weight"),
                    format!("{} is not a weight; use 1 to {MAX_WEIGHT}", w.get_ref()),
                )
            },
        )?,
    };
    Ok(BackendConfig { address, weight })
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
        let pool = &config.pools[config.listeners[1].pool];
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

    #[test]
    fn bad_algorithm() {
        assert_error(
            &GOOD.replace("\"round_robin\"", "\"fastest\""),
            15,
            &["pools.web.algorithm", "\"fastest\"", "round_robin"],
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
