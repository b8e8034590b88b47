//! The connection log: one line per connection when it ends, at `info` under the target
//! `ringlb::connection` (`connection_log = false` turns it off), as `key=value` pairs or, with
//! `log_format = "json"`, as the fields of the line's JSON object.
//!
//! ```text
//! client=10.0.0.5:51234 listener=db pool=replicas backend=10.0.1.7:5432 queued_ms=0 connect_ms=1 total_ms=8213 bytes_up=1830 bytes_down=90211 attempts=1 termination=SD
//! ```
//!
//! `proxied` (the source a PROXY header carried) and `sni` (the TLS server name read) appear
//! when known; `pool`, `backend` and `connect_ms` are `-` when none was reached. The
//! termination state is HAProxy's (see [`crate::conn::Termination`] and the README).

use std::fmt::Write;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};

use serde::Serialize;

/// The log target of connection lines.
pub const TARGET: &str = "ringlb::connection";

static ENABLED: AtomicBool = AtomicBool::new(true);
static JSON: AtomicBool = AtomicBool::new(false);

/// Turns the connection log on or off and sets the format (at start and on every reload).
pub fn configure(enabled: bool, json: bool) {
    ENABLED.store(enabled, Ordering::Relaxed);
    JSON.store(json, Ordering::Relaxed);
}

/// Whether connection lines are wanted (configured on and `info` enabled for the target).
pub fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed) && log::log_enabled!(target: TARGET, log::Level::Info)
}

/// Whether lines are written as JSON.
pub fn json() -> bool {
    JSON.load(Ordering::Relaxed)
}

/// One ended connection.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Record<'a> {
    /// The TCP peer.
    pub client: Option<SocketAddr>,
    /// The source its PROXY header carried, if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub proxied: Option<SocketAddr>,
    pub listener: &'a str,
    pub pool: Option<&'a str>,
    pub backend: Option<SocketAddr>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sni: Option<&'a str>,
    /// Time spent waiting in a backend queue.
    pub queued_ms: u64,
    /// From the first connect to the connect that succeeded.
    pub connect_ms: Option<u64>,
    /// From the accept to the close.
    pub total_ms: u64,
    /// Client to backend, backend to client.
    pub bytes_up: u64,
    pub bytes_down: u64,
    /// Backends a connect was started to.
    pub attempts: u32,
    pub termination: &'a str,
}

impl Record<'_> {
    /// The line, in the configured format.
    pub fn line(&self) -> String {
        if json() { self.json() } else { self.text() }
    }

    /// As `key=value` pairs; a value that is not plain printable ASCII without spaces (a name
    /// from the config, a server name from a client) is quoted and escaped.
    pub fn text(&self) -> String {
        let mut out = String::with_capacity(256);
        let dash = |a: Option<SocketAddr>| a.map_or_else(|| "-".to_string(), |a| a.to_string());
        let _ = write!(out, "client={}", dash(self.client));
        if let Some(proxied) = self.proxied {
            let _ = write!(out, " proxied={proxied}");
        }
        let _ = write!(out, " listener={}", Plain(self.listener));
        let _ = write!(out, " pool={}", Plain(self.pool.unwrap_or("-")));
        let _ = write!(out, " backend={}", dash(self.backend));
        if let Some(sni) = self.sni {
            let _ = write!(out, " sni={}", Plain(sni));
        }
        let connect = self.connect_ms.map_or_else(|| "-".to_string(), |ms| ms.to_string());
        let _ = write!(
            out,
            " queued_ms={} connect_ms={connect} total_ms={} bytes_up={} bytes_down={} attempts={} termination={}",
            self.queued_ms, self.total_ms, self.bytes_up, self.bytes_down, self.attempts, self.termination
        );
        out
    }

    /// As one JSON object.
    pub fn json(&self) -> String {
        serde_json::to_string(self).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"))
    }
}

/// A value written bare if it is plain (printable ASCII, no space, quote or `=`), else quoted.
struct Plain<'a>(&'a str);

impl std::fmt::Display for Plain<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let plain = !self.0.is_empty() && self.0.bytes().all(|b| b.is_ascii_graphic() && !matches!(b, b'"' | b'='));
        if plain { f.write_str(self.0) } else { write!(f, "{:?}", self.0) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record<'a>(sni: Option<&'a str>, listener: &'a str) -> Record<'a> {
        Record {
            client: Some("10.0.0.5:51234".parse().unwrap()),
            proxied: None,
            listener,
            pool: Some("replicas"),
            backend: Some("10.0.1.7:5432".parse().unwrap()),
            sni,
            queued_ms: 0,
            connect_ms: Some(1),
            total_ms: 8213,
            bytes_up: 1830,
            bytes_down: 90211,
            attempts: 1,
            termination: "SD",
        }
    }

    #[test]
    fn a_text_line_has_every_field_and_escapes_what_a_client_sent() {
        assert_eq!(
            record(None, "db").text(),
            "client=10.0.0.5:51234 listener=db pool=replicas backend=10.0.1.7:5432 queued_ms=0 connect_ms=1 \
             total_ms=8213 bytes_up=1830 bytes_down=90211 attempts=1 termination=SD"
        );
        // A server name with a line feed cannot start a line of its own.
        let line = record(Some("evil\nclient=1.2.3.4"), "my db").text();
        assert!(line.contains(r#"sni="evil\nclient=1.2.3.4""#), "{line}");
        assert!(line.contains(r#"listener="my db""#), "{line}");
        assert!(!line.contains('\n'));
        let none = Record { pool: None, backend: None, connect_ms: None, ..record(None, "db") };
        assert!(none.text().contains("pool=- backend=- queued_ms=0 connect_ms=-"), "{}", none.text());
    }

    #[test]
    fn a_json_line_is_one_object_with_the_same_fields() {
        let value: serde_json::Value = serde_json::from_str(&record(Some("db.example.com"), "db").json()).unwrap();
        assert_eq!(value["client"], "10.0.0.5:51234");
        assert_eq!(value["sni"], "db.example.com");
        assert_eq!(value["termination"], "SD");
        assert_eq!(value["bytes_down"], 90211);
        assert!(value.get("proxied").is_none(), "absent when not carried");
    }
}
