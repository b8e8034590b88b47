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
//!
//! A line per connection at tens of thousands of connections a second must not cost a
//! syscall and a lock each: every worker collects its lines in a [`Writer`] and hands them to
//! the log thread ([`crate::logger`]) at most every [`FLUSH_EVERY_MS`] (or once [`FLUSH_AT`]
//! bytes are waiting; a quiet worker hands on what it holds at its next tick, within a
//! second), in the format of the other log lines. A batch that finds the log thread's queue
//! full is dropped and its lines counted (`ringlb_connection_log_dropped_total`). `RUST_LOG`
//! is read once, at start.

use std::fmt::Write;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::Serialize;

use crate::logger;

/// The log target of connection lines.
pub const TARGET: &str = "ringlb::connection";
/// A worker writes what it collected once it holds this much.
pub const FLUSH_AT: usize = 16 * 1024;
/// ... or once this long has passed since it last wrote (worker clock, ms).
pub const FLUSH_EVERY_MS: u64 = 50;

static ENABLED: AtomicBool = AtomicBool::new(true);

/// Turns the connection log on or off and sets the format (at start and on every reload);
/// off too when `RUST_LOG` leaves out `info` for [`TARGET`].
pub fn configure(enabled: bool, json: bool) {
    let wanted = enabled && log::log_enabled!(target: TARGET, log::Level::Info);
    ENABLED.store(wanted, Ordering::Relaxed);
    logger::set_json(json);
}

/// Whether connection lines are wanted.
pub fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
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
    /// As `key=value` pairs; a value that is not plain printable ASCII without spaces (a name
    /// from the config, a server name from a client) is quoted and escaped.
    pub fn text(&self) -> String {
        let mut out = String::with_capacity(256);
        self.write_text(&mut out);
        out
    }

    /// As [`Record::text`], appended to `out`.
    pub fn write_text(&self, out: &mut String) {
        out.push_str("client=");
        dash(out, self.client);
        if let Some(proxied) = self.proxied {
            let _ = write!(out, " proxied={proxied}");
        }
        let _ = write!(out, " listener={} pool={} backend=", Plain(self.listener), Plain(self.pool.unwrap_or("-")));
        dash(out, self.backend);
        if let Some(sni) = self.sni {
            let _ = write!(out, " sni={}", Plain(sni));
        }
        let _ = write!(out, " queued_ms={} connect_ms=", self.queued_ms);
        match self.connect_ms {
            Some(ms) => {
                let _ = write!(out, "{ms}");
            }
            None => out.push('-'),
        }
        let _ = write!(
            out,
            " total_ms={} bytes_up={} bytes_down={} attempts={} termination={}",
            self.total_ms, self.bytes_up, self.bytes_down, self.attempts, self.termination
        );
    }

    /// As one JSON object.
    pub fn json(&self) -> String {
        serde_json::to_string(self).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"))
    }
}

/// An address, or `-`.
fn dash(out: &mut String, address: Option<SocketAddr>) {
    match address {
        Some(address) => {
            let _ = write!(out, "{address}");
        }
        None => out.push('-'),
    }
}

/// One worker's connection lines, written to stderr a batch at a time.
#[derive(Debug, Default)]
pub struct Writer {
    buf: String,
    /// When it last wrote (worker clock, ms).
    flushed_at: u64,
    /// The second the cached timestamp is of, and the timestamp.
    second: u64,
    stamp: String,
}

impl Writer {
    /// Adds the line of `record`, as [`logger`] formats log lines: `[TIME INFO  TARGET] FIELDS`,
    /// or a JSON object with the record's fields beside `time`, `level` and `target`.
    pub fn push(&mut self, record: &Record<'_>) {
        let now = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
        if now != self.second || self.stamp.is_empty() {
            self.second = now;
            self.stamp = logger::timestamp(now);
        }
        let json = logger::json();
        logger::write_head(&mut self.buf, json, &self.stamp, log::Level::Info, TARGET);
        if json {
            let fields = record.json();
            self.buf.push_str(fields.strip_prefix('{').unwrap_or(&fields));
        } else {
            record.write_text(&mut self.buf);
        }
        self.buf.push('\n');
    }

    /// Writes what was collected if it is [`FLUSH_AT`] bytes or more, or was last written
    /// [`FLUSH_EVERY_MS`] or more before `now` (worker clock, ms).
    /// Returns the number of lines dropped, as [`Writer::flush`].
    pub fn flush_due(&mut self, now: u64) -> u64 {
        if !self.buf.is_empty() && (self.buf.len() >= FLUSH_AT || now.saturating_sub(self.flushed_at) >= FLUSH_EVERY_MS)
        {
            self.flushed_at = now;
            return self.flush();
        }
        0
    }

    /// Hands what was collected to the log thread; the number of lines dropped because its
    /// queue was full.
    pub fn flush(&mut self) -> u64 {
        if self.buf.is_empty() {
            return 0;
        }
        logger::send(std::mem::take(&mut self.buf))
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
