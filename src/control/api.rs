//! The admin API: HTTP/1.1 with JSON bodies on a unix socket (`admin_socket`), served by the
//! control thread with the same hyper server as the metrics port (see [`super::http`]).
//!
//! | method and path | what it does |
//! |---|---|
//! | `GET /v1/info` | version, pid, uptime, config path, last reload, workers |
//! | `GET /v1/pools`, `GET /v1/pools/{pool}` | every backend: weight, health, last check, admin state, connections, bytes |
//! | `PATCH /v1/pools/{pool}/backends/{address}` | `{"state": "ready"\|"drain"\|"maint"}` and/or `{"weight": N}` |
//! | `GET /v1/connections?pool=&backend=&limit=` | open connections (at most `limit`, default 1000) |
//! | `POST /v1/pools/{pool}/backends/{address}/shutdown-sessions` | reset that backend's connections; says how many |
//! | `POST /v1/reload` | reload the config file, as SIGHUP; says what changed, or why not |
//!
//! Errors are JSON too, `{"error": "..."}`: 400 for a request that cannot be taken (nothing
//! changes), 404 for an unknown path, pool or backend, 405 for a method a path does not take,
//! 413 for a body over 64 KiB. Addresses in paths may be percent-encoded (`%5B::1%5D:5432`).
//!
//! What needs the control thread's state (health, admin states, the config) is asked of the
//! control loop as a [`Command`]; what needs the connections is asked of every worker.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper::{Method, StatusCode};
use serde_json::{Value, json};
use tokio::sync::oneshot;

use std::sync::atomic::Ordering;
use std::time::UNIX_EPOCH;

use super::admin::{AdminStates, ConnFilter, ConnInfo, WorkerRequest};
use super::checks::Checks;
use super::http::{self, Reply, Req};
use super::reload::{ReloadError, Source};
use super::{ControlEvent, Shared};
use crate::config::{Config, MAX_WEIGHT};
use crate::pool::{AdminSetting, AdminState, Snapshot};

/// How long the API waits for the control loop or a worker to answer.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections listed when the request does not say.
pub const DEFAULT_LIMIT: usize = 1000;
/// Most connections one request lists.
pub const MAX_LIMIT: usize = 100_000;

/// What the API asks of the control loop.
#[derive(Debug)]
pub enum Command {
    Info,
    /// Every pool, or the one named.
    Pools(Option<String>),
    /// Sets a backend's admin state and/or weight.
    Set {
        pool: String,
        address: SocketAddr,
        state: Option<AdminState>,
        weight: Option<u32>,
    },
    /// Whether pool `pool` has backend `address` (a 404 if not).
    Backend {
        pool: String,
        address: SocketAddr,
    },
    /// What the status page shows.
    Status,
}

/// The control loop's answer: a status and a JSON body.
#[derive(Debug)]
pub struct Answer {
    pub status: StatusCode,
    pub body: Value,
}

impl Answer {
    pub fn ok(body: Value) -> Answer {
        Answer { status: StatusCode::OK, body }
    }

    pub fn error(status: StatusCode, message: impl Into<String>) -> Answer {
        Answer { status, body: json!({ "error": message.into() }) }
    }

    fn reply(self) -> Reply {
        let mut text = serde_json::to_string_pretty(&self.body).unwrap_or_else(|_| "{}".into());
        text.push('\n');
        http::reply(self.status, "application/json", text)
    }
}

/// Asks the control loop, and waits for its answer.
pub async fn ask(shared: &Shared, command: Command) -> Answer {
    let (reply, answer) = oneshot::channel();
    shared.notify(ControlEvent::Admin { command, reply });
    match tokio::time::timeout(ANSWER_TIMEOUT, answer).await {
        Ok(Ok(answer)) => answer,
        _ => Answer::error(StatusCode::SERVICE_UNAVAILABLE, "ringlb is stopping"),
    }
}

/// Answers one admin request.
pub async fn answer(shared: Arc<Shared>, request: Req) -> Reply {
    route(&shared, request).await.reply()
}

async fn route(shared: &Shared, request: Req) -> Answer {
    let segments: Vec<String> = request.path.trim_matches('/').split('/').map(percent_decode).collect();
    let segments: Vec<&str> = segments.iter().map(String::as_str).collect();
    let method = &request.method;
    let only = |allowed: &Method| {
        (method != allowed && !(allowed == Method::GET && method == Method::HEAD)).then(|| {
            Answer::error(StatusCode::METHOD_NOT_ALLOWED, format!("{} {} takes {allowed}", method, request.path))
        })
    };
    match segments.as_slice() {
        ["v1", "info"] => match only(&Method::GET) {
            Some(refused) => refused,
            None => ask(shared, Command::Info).await,
        },
        ["v1", "pools"] => match only(&Method::GET) {
            Some(refused) => refused,
            None => ask(shared, Command::Pools(None)).await,
        },
        ["v1", "pools", pool] => match only(&Method::GET) {
            Some(refused) => refused,
            None => ask(shared, Command::Pools(Some(pool.to_string()))).await,
        },
        ["v1", "pools", pool, "backends", address] => match only(&Method::PATCH) {
            Some(refused) => refused,
            None => match (parse_address(address), parse_patch(&request.body)) {
                (Err(e), _) | (_, Err(e)) => e,
                (Ok(address), Ok((state, weight))) => {
                    ask(shared, Command::Set { pool: pool.to_string(), address, state, weight }).await
                }
            },
        },
        ["v1", "pools", pool, "backends", address, "shutdown-sessions"] => match only(&Method::POST) {
            Some(refused) => refused,
            None => match parse_address(address) {
                Err(e) => e,
                Ok(address) => shutdown_sessions(shared, pool, address).await,
            },
        },
        ["v1", "connections"] => match only(&Method::GET) {
            Some(refused) => refused,
            None => match parse_connections_query(request.query.as_deref()) {
                Err(e) => e,
                Ok((filter, limit)) => connections(shared, filter, limit).await,
            },
        },
        ["v1", "reload"] => match only(&Method::POST) {
            Some(refused) => refused,
            None => reload(shared).await,
        },
        _ => Answer::error(
            StatusCode::NOT_FOUND,
            format!("no such endpoint: {}; see /v1/info, /v1/pools, /v1/connections, /v1/reload", request.path),
        ),
    }
}

fn parse_address(text: &str) -> Result<SocketAddr, Answer> {
    text.parse().map_err(|_| {
        Answer::error(
            StatusCode::BAD_REQUEST,
            format!("{text:?} is not a backend address; write IP:port, e.g. 10.0.0.5:5432"),
        )
    })
}

/// The body of a PATCH: `{"state": ..., "weight": ...}`, at least one of them.
fn parse_patch(body: &[u8]) -> Result<(Option<AdminState>, Option<u32>), Answer> {
    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Patch {
        state: Option<String>,
        weight: Option<i64>,
    }
    let bad = |message: String| Answer::error(StatusCode::BAD_REQUEST, message);
    let patch: Patch = serde_json::from_slice(body).map_err(|e| {
        bad(format!("the body is not what this takes ({e}); send e.g. {{\"state\": \"drain\"}} or {{\"weight\": 5}}"))
    })?;
    let state = match patch.state {
        None => None,
        Some(name) => Some(
            AdminState::parse(&name)
                .ok_or_else(|| bad(format!("state {name:?} is not one of \"ready\", \"drain\", \"maint\"")))?,
        ),
    };
    let weight = match patch.weight {
        None => None,
        Some(w) if (0..=i64::from(MAX_WEIGHT)).contains(&w) => Some(w as u32),
        Some(w) => return Err(bad(format!("weight {w} is out of range; use 0 to {MAX_WEIGHT} (0 drains)"))),
    };
    if state.is_none() && weight.is_none() {
        return Err(bad("the body sets nothing; send \"state\" and/or \"weight\"".into()));
    }
    Ok((state, weight))
}

fn parse_connections_query(query: Option<&str>) -> Result<(ConnFilter, usize), Answer> {
    let mut filter = ConnFilter::default();
    let mut limit = DEFAULT_LIMIT;
    let bad = |message: String| Answer::error(StatusCode::BAD_REQUEST, message);
    for (key, value) in query.unwrap_or("").split('&').filter(|p| !p.is_empty()).map(|pair| {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        (percent_decode(key), percent_decode(value))
    }) {
        match key.as_str() {
            "pool" if !value.is_empty() => filter.pool = Some(value),
            "backend" if !value.is_empty() => filter.backend = Some(parse_address(&value)?),
            "pool" | "backend" => {}
            "limit" => {
                limit = value
                    .parse()
                    .ok()
                    .filter(|n| (1..=MAX_LIMIT).contains(n))
                    .ok_or_else(|| bad(format!("limit {value:?} is not a number from 1 to {MAX_LIMIT}")))?;
            }
            other => return Err(bad(format!("unknown parameter {other:?}; this takes pool, backend and limit"))),
        }
    }
    Ok((filter, limit))
}

/// Asks every worker, each answering through its own channel; a worker that does not answer
/// in time is left out.
async fn ask_workers<T>(shared: &Shared, request: impl Fn(oneshot::Sender<T>) -> WorkerRequest) -> Vec<T> {
    let mut answers = Vec::with_capacity(shared.stats.len());
    for worker in 0..shared.stats.len() {
        let (reply, answer) = oneshot::channel();
        shared.ask(worker, request(reply));
        answers.push(answer);
    }
    let mut out = Vec::with_capacity(answers.len());
    for answer in answers {
        if let Ok(Ok(value)) = tokio::time::timeout(ANSWER_TIMEOUT, answer).await {
            out.push(value);
        }
    }
    out
}

async fn connections(shared: &Shared, filter: ConnFilter, limit: usize) -> Answer {
    if let Some(pool) = &filter.pool {
        let known = ask(shared, Command::Pools(Some(pool.clone()))).await;
        if known.status != StatusCode::OK {
            return known;
        }
    }
    let workers = shared.stats.len();
    // One more than the limit from each worker: a worker holding more than `limit` alone must
    // still make the answer say it was truncated.
    let ask_for = limit.saturating_add(1);
    let lists =
        ask_workers(shared, |reply| WorkerRequest::Connections { filter: filter.clone(), limit: ask_for, reply }).await;
    let answered = lists.len();
    let mut all: Vec<ConnInfo> = lists.into_iter().flatten().collect();
    all.sort_by_key(|c| std::cmp::Reverse(c.age_ms));
    let truncated = all.len() > limit;
    all.truncate(limit);
    let mut body = json!({ "count": all.len(), "truncated": truncated, "connections": all });
    if answered < workers {
        body["workers_not_answering"] = json!(workers - answered);
    }
    Answer::ok(body)
}

async fn shutdown_sessions(shared: &Shared, pool: &str, address: SocketAddr) -> Answer {
    let known = ask(shared, Command::Backend { pool: pool.to_string(), address }).await;
    if known.status != StatusCode::OK {
        return known;
    }
    let counts =
        ask_workers(shared, |reply| WorkerRequest::Kill { pool: pool.to_string(), backend: address, reply }).await;
    Answer::ok(json!({ "pool": pool, "backend": address.to_string(), "killed": counts.iter().sum::<usize>() }))
}

async fn reload(shared: &Shared) -> Answer {
    let (reply, outcome) = oneshot::channel();
    shared.notify(ControlEvent::Reload { source: Source::File, reply: Some(reply) });
    match tokio::time::timeout(ANSWER_TIMEOUT * 3, outcome).await {
        Ok(Ok(Ok(report))) => Answer::ok(json!({
            "result": "ok",
            "summary": report.to_string(),
            "pools_added": report.pools_added,
            "pools_removed": report.pools_removed,
            "pools_changed": report.pools_changed,
            "backends_added": report.backends_added.iter().map(|(p, a)| format!("{p}/{a}")).collect::<Vec<_>>(),
            "backends_removed": report.backends_removed.iter().map(|(p, a)| format!("{p}/{a}")).collect::<Vec<_>>(),
            "listeners_added": report.listeners.added.iter().map(|(n, a)| json!({"name": n, "address": a.to_string()})).collect::<Vec<_>>(),
            "listeners_removed": report.listeners.removed,
            "listeners_changed": report.listeners.changed,
            "not_applied": report.not_applied,
        })),
        Ok(Ok(Err(error))) => {
            let status = match error {
                ReloadError::Config(_) => StatusCode::BAD_REQUEST,
                ReloadError::Listeners(_) => StatusCode::INTERNAL_SERVER_ERROR,
                _ => StatusCode::CONFLICT,
            };
            let mut body = json!({ "result": "failed", "error": error.to_string() });
            if let ReloadError::Config(config) = &error {
                body["line"] = json!(config.line());
                body["key"] = json!(config.key());
            }
            Answer { status, body }
        }
        _ => Answer::error(StatusCode::SERVICE_UNAVAILABLE, "ringlb is stopping"),
    }
}

/// A backend name: what its lookups found, and the last one's result and time.
fn name(status: &super::dns::NameStatus) -> Value {
    let last = status.last.as_ref().map(|(at, outcome)| {
        let mut last = json!({
            "at": at.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs_f64(),
            "ago_ms": at.elapsed().unwrap_or_default().as_millis() as u64,
        });
        match outcome {
            Ok(n) => {
                last["result"] = json!("ok");
                last["addresses"] = json!(n);
            }
            Err(why) => {
                last["result"] = json!("failed");
                last["error"] = json!(why);
            }
        }
        last
    });
    json!({
        "name": status.name,
        "addresses": status.addresses.iter().map(ToString::to_string).collect::<Vec<_>>(),
        "holding": status.holding,
        "last_lookup": last,
        "lookups_ok": status.lookups_ok,
        "lookups_failed": status.lookups_failed,
    })
}

/// What the control loop shows of its state.
pub(super) struct View<'a> {
    pub config: &'a Config,
    pub snapshot: &'a Snapshot,
    pub checks: &'a Checks,
    pub admin: &'a AdminStates,
    /// Each backend name's lookups.
    pub names: &'a [super::dns::NameStatus],
}

impl View<'_> {
    /// Every pool, or the one named (404 if there is none).
    pub fn pools(&self, only: Option<&str>) -> Answer {
        let mut pools = Vec::new();
        for (p, pool) in self.config.pools.iter().enumerate() {
            if only.is_some_and(|name| name != pool.name) {
                continue;
            }
            pools.push(self.pool(p));
        }
        match only {
            Some(name) if pools.is_empty() => Answer::error(StatusCode::NOT_FOUND, format!("no pool {name:?}")),
            Some(_) => Answer::ok(pools.remove(0)),
            None => Answer::ok(json!({ "pools": pools })),
        }
    }

    /// Pool `p` and its backends.
    pub fn pool(&self, p: usize) -> Value {
        let config = &self.config.pools[p];
        let live = self.snapshot.pool_index(&config.name).map(|i| &self.snapshot.pools[i]);
        json!({
            "name": config.name,
            "algorithm": config.algorithm.name(),
            "usable_backends": live.map_or(0, |l| l.usable().len()),
            "queued": live.map_or(0, |l| l.queue.waiting()),
            "backends": (0..config.backends.len()).map(|b| self.backend(p, b)).collect::<Vec<_>>(),
            "names": self.names.iter().filter(|n| n.pool == config.name).map(name).collect::<Vec<_>>(),
        })
    }

    /// Backend `b` of pool `p`.
    pub fn backend(&self, p: usize, b: usize) -> Value {
        let pool = &self.config.pools[p];
        let backend = &pool.backends[b];
        let setting = self.admin.get(&pool.name, backend.address);
        let live = self
            .snapshot
            .pool_index(&pool.name)
            .map(|i| &self.snapshot.pools[i])
            .and_then(|l| l.backends.iter().position(|x| x.address == backend.address).map(|i| (l, i)));
        let view = self.checks.view(p, b);
        let last = view.as_ref().and_then(|v| v.last).map(|last| {
            let at = last.at.duration_since(UNIX_EPOCH).unwrap_or_default();
            json!({
                "passed": last.passed,
                "detail": last.detail,
                "at": at.as_secs_f64(),
                "ago_ms": last.at.elapsed().unwrap_or_default().as_millis() as u64,
            })
        });
        let counters = live.map(|(l, i)| &l.backends[i].counters);
        let bytes = counters.map_or([0, 0], |c| c.bytes());
        json!({
            "address": backend.address.to_string(),
            "from_name": backend.origin.and_then(|i| pool.names.get(usize::from(i))).map(|n| n.label()),
            "priority": backend.priority,
            "weight": setting.weight(backend.weight.get()),
            "config_weight": backend.weight.get(),
            "admin_state": setting.effective().name(),
            "set_at_run_time": setting != AdminSetting::default(),
            "health": if view.as_ref().is_none_or(|v| v.up) { "up" } else { "down" },
            "checked": view.as_ref().is_some_and(|v| v.checked),
            "marked_down": view.as_ref().map_or(0, |v| v.downs),
            "last_check": last,
            "usable": live.is_some_and(|(l, i)| l.usable().contains(&(i as u32))),
            "max_conns": backend.max_conns.map(|m| m.get()),
            "active_connections": counters.map_or(0, |c| c.active()),
            "connections_total": counters.map_or(0, |c| c.connections.load(Ordering::Relaxed)),
            "connect_failures_total": counters.map_or(0, |c| c.failures.load(Ordering::Relaxed)),
            "bytes_up": bytes[0],
            "bytes_down": bytes[1],
        })
    }

    /// Indices of pool `pool` and its backend `address`, or a 404 saying which is missing.
    pub fn find(&self, pool: &str, address: SocketAddr) -> Result<(usize, usize), Answer> {
        let p = self
            .config
            .pools
            .iter()
            .position(|p| p.name == pool)
            .ok_or_else(|| Answer::error(StatusCode::NOT_FOUND, format!("no pool {pool:?}")))?;
        let b =
            self.config.pools[p].backends.iter().position(|b| b.address == address).ok_or_else(|| {
                Answer::error(StatusCode::NOT_FOUND, format!("pool {pool:?} has no backend {address}"))
            })?;
        Ok((p, b))
    }
}

/// Decodes `%XX` escapes (and leaves a malformed one as it is).
fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        match (bytes[i], bytes.get(i + 1).copied().and_then(hex), bytes.get(i + 2).copied().and_then(hex)) {
            (b'%', Some(high), Some(low)) => {
                out.push((high * 16 + low) as u8);
                i += 3;
            }
            (byte, _, _) => {
                out.push(byte);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_patch_sets_a_state_or_a_weight_and_nothing_else() {
        assert_eq!(parse_patch(br#"{"state": "drain"}"#).unwrap(), (Some(AdminState::Drain), None));
        assert_eq!(parse_patch(br#"{"weight": 0}"#).unwrap(), (None, Some(0)));
        assert_eq!(parse_patch(br#"{"state": "maint", "weight": 7}"#).unwrap(), (Some(AdminState::Maint), Some(7)));
        for (body, says) in [
            (&br#"{"state": "off"}"#[..], "is not one of"),
            (br#"{"weight": 257}"#, "out of range"),
            (br#"{"weight": -1}"#, "out of range"),
            (br#"{}"#, "sets nothing"),
            (br#"{"colour": "red"}"#, "not what this takes"),
            (b"not json", "not what this takes"),
        ] {
            let error = parse_patch(body).err().unwrap();
            assert_eq!(error.status, StatusCode::BAD_REQUEST);
            assert!(error.body["error"].as_str().unwrap().contains(says), "{:?}", error.body);
        }
    }

    #[test]
    fn connection_queries_and_escaped_addresses() {
        let (filter, limit) = parse_connections_query(Some("pool=db&backend=%5B%3A%3A1%5D%3A5432&limit=5")).unwrap();
        assert_eq!(filter.pool.as_deref(), Some("db"));
        assert_eq!(filter.backend, Some("[::1]:5432".parse().unwrap()));
        assert_eq!(limit, 5);
        assert_eq!(parse_connections_query(None).unwrap().1, DEFAULT_LIMIT);
        for query in ["limit=0", "limit=x", "backend=nowhere", "colour=red"] {
            assert_eq!(parse_connections_query(Some(query)).err().unwrap().status, StatusCode::BAD_REQUEST, "{query}");
        }
        assert_eq!(percent_decode("a%20b%zz%4"), "a b%zz%4");
    }
}
