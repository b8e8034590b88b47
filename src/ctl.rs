//! `ringlb ctl`: the admin API from the command line. Each command is one or a few requests
//! to the admin socket (see [`crate::control::api`]); the answer is printed as a table for
//! people or, with `--json`, as the API's JSON for scripts.
//!
//! Exit status: 0 done, 1 refused or failed (an HTTP error from ringlb, no ringlb on the
//! socket, `drain --wait` running out of time), 2 a usage error.

use std::fmt::Write;
use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};

/// How long one request may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// How often `drain --wait` looks at the backend's open connections.
const WAIT_POLL: Duration = Duration::from_millis(200);

/// What `ringlb ctl` was asked to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    Info,
    Pools(Option<String>),
    /// Set a backend's state; `wait` (drain only): until it has no open connections, at most
    /// this long (`Some(None)`: no limit).
    State {
        pool: String,
        backend: SocketAddr,
        state: &'static str,
        wait: Option<Option<Duration>>,
    },
    Weight {
        pool: String,
        backend: SocketAddr,
        weight: u32,
    },
    Connections {
        pool: Option<String>,
        backend: Option<SocketAddr>,
        limit: Option<usize>,
    },
    ShutdownSessions {
        pool: String,
        backend: SocketAddr,
    },
    Reload,
}

/// Why a command failed (exit status 1).
#[derive(Debug, thiserror::Error)]
pub enum CtlError {
    #[error("cannot reach ringlb at {path}: {source} (is it running, with admin_socket set to this path?)")]
    Connect { path: String, source: io::Error },
    #[error("{0}")]
    Http(String),
    #[error("{message}")]
    Refused { status: StatusCode, message: String, body: Value },
    #[error("{0}")]
    Timeout(String),
}

/// One request to the admin socket at `socket`: the status and the JSON body.
pub fn request(
    socket: &Path,
    method: Method,
    path: &str,
    body: Option<Value>,
) -> Result<(StatusCode, Value), CtlError> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| CtlError::Http(format!("cannot start a runtime: {e}")))?;
    runtime.block_on(async {
        tokio::time::timeout(REQUEST_TIMEOUT, send(socket, method, path, body))
            .await
            .unwrap_or_else(|_| Err(CtlError::Timeout(format!("ringlb did not answer within {REQUEST_TIMEOUT:?}"))))
    })
}

async fn send(socket: &Path, method: Method, path: &str, body: Option<Value>) -> Result<(StatusCode, Value), CtlError> {
    let stream = tokio::net::UnixStream::connect(socket)
        .await
        .map_err(|source| CtlError::Connect { path: socket.display().to_string(), source })?;
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| CtlError::Http(format!("HTTP handshake: {e}")))?;
    tokio::spawn(connection);
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    let request = Request::builder()
        .method(method)
        .uri(path)
        .header(hyper::header::HOST, "ringlb")
        .header(hyper::header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(body)))
        .map_err(|e| CtlError::Http(format!("request: {e}")))?;
    let response = sender.send_request(request).await.map_err(|e| CtlError::Http(format!("request: {e}")))?;
    let status = response.status();
    let bytes = response
        .into_body()
        .collect()
        .await
        .map_err(|e| CtlError::Http(format!("reading the answer: {e}")))?
        .to_bytes();
    let value = serde_json::from_slice(&bytes).unwrap_or_else(|_| json!({ "error": String::from_utf8_lossy(&bytes) }));
    Ok((status, value))
}

/// A request whose answer must be a success.
fn call(socket: &Path, method: Method, path: &str, body: Option<Value>) -> Result<Value, CtlError> {
    let (status, value) = request(socket, method, path, body)?;
    if status.is_success() {
        Ok(value)
    } else {
        let message = value["error"].as_str().map_or_else(|| value.to_string(), str::to_string);
        Err(CtlError::Refused { status, message, body: value })
    }
}

/// A path segment with what would not survive in a path percent-encoded.
fn segment(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for b in text.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~:".contains(&b) {
            out.push(b as char);
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

fn backend_path(pool: &str, backend: SocketAddr) -> String {
    format!("/v1/pools/{}/backends/{}", segment(pool), segment(&backend.to_string()))
}

/// Carries out `action` against the admin socket at `socket`; returns what to print.
pub fn run(socket: &Path, action: &Action, json_out: bool) -> Result<String, CtlError> {
    let value = match action {
        Action::Info => call(socket, Method::GET, "/v1/info", None)?,
        Action::Pools(None) => call(socket, Method::GET, "/v1/pools", None)?,
        Action::Pools(Some(pool)) => call(socket, Method::GET, &format!("/v1/pools/{}", segment(pool)), None)?,
        Action::State { pool, backend, state, wait } => {
            let mut value =
                call(socket, Method::PATCH, &backend_path(pool, *backend), Some(json!({ "state": state })))?;
            if let Some(limit) = wait {
                value = wait_until_empty(socket, pool, *backend, *limit)?;
            }
            value
        }
        Action::Weight { pool, backend, weight } => {
            call(socket, Method::PATCH, &backend_path(pool, *backend), Some(json!({ "weight": weight })))?
        }
        Action::Connections { pool, backend, limit } => {
            let mut query = Vec::new();
            if let Some(pool) = pool {
                query.push(format!("pool={}", segment(pool)));
            }
            if let Some(backend) = backend {
                query.push(format!("backend={}", segment(&backend.to_string())));
            }
            if let Some(limit) = limit {
                query.push(format!("limit={limit}"));
            }
            let path = if query.is_empty() {
                "/v1/connections".to_string()
            } else {
                format!("/v1/connections?{}", query.join("&"))
            };
            call(socket, Method::GET, &path, None)?
        }
        Action::ShutdownSessions { pool, backend } => {
            call(socket, Method::POST, &format!("{}/shutdown-sessions", backend_path(pool, *backend)), None)?
        }
        Action::Reload => call(socket, Method::POST, "/v1/reload", None)?,
    };
    if json_out {
        return Ok(serde_json::to_string_pretty(&value).unwrap_or_default());
    }
    Ok(match action {
        Action::Info => info_text(&value),
        Action::Pools(None) => value["pools"].as_array().map(|pools| pools_text(pools)).unwrap_or_default(),
        Action::Pools(Some(_)) => pools_text(std::slice::from_ref(&value)),
        Action::State { pool, .. } | Action::Weight { pool, .. } => backend_line(pool, &value),
        Action::Connections { .. } => connections_text(&value),
        Action::ShutdownSessions { pool, backend } => {
            format!("pool {pool}: reset {} connections to {backend}", value["killed"])
        }
        Action::Reload => format!("reloaded: {}", value["summary"].as_str().unwrap_or("")),
    })
}

/// Polls the backend until it has no open connections, or `limit` passes.
fn wait_until_empty(
    socket: &Path,
    pool: &str,
    backend: SocketAddr,
    limit: Option<Duration>,
) -> Result<Value, CtlError> {
    let deadline = limit.map(|l| Instant::now() + l);
    loop {
        let value = call(socket, Method::GET, &format!("/v1/pools/{}", segment(pool)), None)?;
        let found = value["backends"]
            .as_array()
            .and_then(|b| b.iter().find(|b| b["address"] == backend.to_string()).cloned())
            .ok_or_else(|| CtlError::Http(format!("pool {pool} no longer has backend {backend}")))?;
        let open = found["active_connections"].as_u64().unwrap_or(0);
        if open == 0 {
            return Ok(found);
        }
        if deadline.is_some_and(|d| Instant::now() >= d) {
            return Err(CtlError::Timeout(format!(
                "pool {pool}: backend {backend} still has {open} open connections after {:?}",
                limit.unwrap_or_default()
            )));
        }
        std::thread::sleep(WAIT_POLL);
    }
}

fn info_text(value: &Value) -> String {
    let mut out = String::new();
    for key in ["version", "pid", "state", "uptime_s", "workers", "config", "config_loaded_at"] {
        let _ = writeln!(out, "{key}: {}", plain(&value[key]));
    }
    let reload = &value["last_reload"];
    if reload.is_null() {
        let _ = writeln!(out, "last_reload: none");
    } else {
        let detail = reload["summary"].as_str().or(reload["error"].as_str()).unwrap_or("");
        let _ = writeln!(out, "last_reload: {} at {} ({detail})", plain(&reload["result"]), plain(&reload["at"]));
    }
    out.trim_end().to_string()
}

fn plain(value: &Value) -> String {
    match value {
        Value::String(s) => s.clone(),
        Value::Null => "-".into(),
        other => other.to_string(),
    }
}

fn backend_line(pool: &str, b: &Value) -> String {
    format!(
        "pool {pool}: backend {} is {} (weight {}, health {}), {} open connections",
        plain(&b["address"]),
        plain(&b["admin_state"]),
        plain(&b["weight"]),
        plain(&b["health"]),
        plain(&b["active_connections"])
    )
}

/// Rows under a header, each column as wide as its widest cell.
fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let mut line = |cells: Vec<&str>| {
        let text: Vec<String> = cells.iter().zip(&widths).map(|(c, w)| format!("{c:<w$}")).collect();
        let _ = writeln!(out, "{}", text.join("  ").trim_end());
    };
    line(header.to_vec());
    for row in rows {
        line(row.iter().map(String::as_str).collect());
    }
    out.trim_end().to_string()
}

fn pools_text(pools: &[Value]) -> String {
    let mut rows = Vec::new();
    for pool in pools {
        for b in pool["backends"].as_array().into_iter().flatten() {
            let last = match &b["last_check"] {
                Value::Null if b["checked"] == true => "not yet".to_string(),
                Value::Null => "not checked".to_string(),
                last if last["passed"] == true => "passed".to_string(),
                last => format!("failed: {}", plain(&last["detail"])),
            };
            let admin = plain(&b["admin_state"]) + if b["set_at_run_time"] == true { "*" } else { "" };
            rows.push(vec![
                plain(&pool["name"]),
                plain(&b["address"]),
                plain(&b["health"]),
                admin,
                plain(&b["weight"]),
                plain(&b["active_connections"]),
                plain(&b["connections_total"]),
                plain(&b["connect_failures_total"]),
                last,
            ]);
        }
    }
    let header = ["POOL", "BACKEND", "HEALTH", "ADMIN", "WEIGHT", "OPEN", "TOTAL", "FAILED", "LAST CHECK"];
    table(&header, &rows) + "\n(* set at run time)"
}

fn connections_text(value: &Value) -> String {
    let rows: Vec<Vec<String>> = value["connections"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|c| {
            let client = match (&c["client"], &c["proxied"]) {
                (client, Value::Null) => plain(client),
                (client, proxied) => format!("{} (for {})", plain(client), plain(proxied)),
            };
            vec![
                client,
                plain(&c["listener"]),
                plain(&c["pool"]),
                plain(&c["backend"]),
                plain(&c["sni"]),
                plain(&c["phase"]),
                format!("{:.1}", c["age_ms"].as_u64().unwrap_or(0) as f64 / 1000.0),
                plain(&c["bytes_up"]),
                plain(&c["bytes_down"]),
            ]
        })
        .collect();
    let header = ["CLIENT", "LISTENER", "POOL", "BACKEND", "SNI", "PHASE", "AGE_S", "BYTES_UP", "BYTES_DOWN"];
    let mut out = table(&header, &rows);
    let _ = write!(out, "\n{} connections", value["count"]);
    if value["truncated"] == true {
        out.push_str(" (more not shown; raise --limit)");
    }
    out
}

/// The admin socket to use: `--socket`, or the one the config file at `config` names.
pub fn socket_path(socket: Option<PathBuf>, config: Option<&Path>) -> Result<PathBuf, String> {
    if let Some(socket) = socket {
        return Ok(socket);
    }
    let Some(path) = config else {
        return Err("give the admin socket with --socket PATH, or the config that names it with -c FILE".into());
    };
    let config = crate::config::Config::load(path).map_err(|e| e.to_string())?;
    config.admin_socket.ok_or_else(|| {
        format!("{} has no admin_socket; set one, e.g. admin_socket = \"/run/ringlb/admin.sock\"", path.display())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_line_up_and_paths_are_escaped() {
        let text = table(&["A", "LONGER"], &[vec!["xyz".into(), "1".into()], vec!["q".into(), "22".into()]]);
        assert_eq!(text, "A    LONGER\nxyz  1\nq    22");
        assert_eq!(segment("my pool/x"), "my%20pool%2Fx");
        assert_eq!(backend_path("db", "[::1]:5432".parse().unwrap()), "/v1/pools/db/backends/%5B::1%5D:5432");
    }
}
