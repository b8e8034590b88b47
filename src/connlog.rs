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
//! syscall and a lock each: every worker collects its lines in a [`Writer`] and hands them on
//! at most every [`FLUSH_EVERY_MS`] (or once [`FLUSH_AT`] bytes are waiting; a quiet worker
//! hands on what it holds at its next tick, within a second), in the format of the other log
//! lines (`main`'s). `RUST_LOG` is read once, at start.
//!
//! A worker never writes to stderr itself: a stderr that does not keep up (journald busy, a
//! full pipe, a slow disk) would stop every connection of the worker. The `ringlb-log` thread
//! writes the batches, in writes of whole lines of at most [`PIPE_BUF`] bytes (so that a
//! pipe, as journald's, never interleaves them with another thread's). When
//! [`QUEUED_BATCHES`] batches already wait for it, a worker drops its batch and counts the
//! lines (`ringlb_connection_log_dropped_total`); the log thread says how many were dropped
//! once it writes again. This is HAProxy's choice for its logs (a log server that does not
//! keep up loses lines, not connections).

use std::fmt::Write;
use std::io::Write as _;
use std::net::SocketAddr;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError, sync_channel};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Serialize;

/// The log target of connection lines.
pub const TARGET: &str = "ringlb::connection";
/// The most bytes one write to a pipe keeps together.
pub const PIPE_BUF: usize = 4096;
/// A worker writes what it collected once it holds this much.
pub const FLUSH_AT: usize = 16 * 1024;
/// ... or once this long has passed since it last wrote (worker clock, ms).
pub const FLUSH_EVERY_MS: u64 = 50;
/// Batches that may wait for the log thread (each about [`FLUSH_AT`] bytes at most); a worker
/// drops a batch past that rather than wait.
pub const QUEUED_BATCHES: usize = 64;

static ENABLED: AtomicBool = AtomicBool::new(true);
static JSON: AtomicBool = AtomicBool::new(false);
/// Lines dropped since the log thread last said so.
static DROPPED: AtomicU64 = AtomicU64::new(0);

/// What the workers send the log thread.
enum Message {
    Lines(String),
    /// Answered once everything sent before is written.
    Flushed(SyncSender<()>),
}

/// The log thread's queue, started on first use; `None` if the thread could not be started
/// (the lines are then written by the worker, as a last resort).
fn sink() -> Option<&'static SyncSender<Message>> {
    static SINK: OnceLock<Option<SyncSender<Message>>> = OnceLock::new();
    SINK.get_or_init(|| {
        let (tx, rx) = sync_channel(QUEUED_BATCHES);
        std::thread::Builder::new()
            .name("ringlb-log".into())
            .spawn(move || write_batches(&rx, write_stderr))
            .ok()
            .map(|_| tx)
    })
    .as_ref()
}

/// The log thread: writes each batch with `write`, and after one that came once lines were
/// dropped, says how many.
fn write_batches(rx: &Receiver<Message>, write: impl Fn(&str)) {
    let say_dropped = || {
        let dropped = DROPPED.swap(0, Ordering::Relaxed);
        if dropped > 0 {
            write(&dropped_line(dropped));
        }
    };
    for message in rx {
        match message {
            Message::Lines(text) => {
                write(&text);
                say_dropped();
            }
            Message::Flushed(done) => {
                // Lines dropped after the last batch written are counted here, at exit.
                say_dropped();
                let _ = done.send(());
            }
        }
    }
}

/// The warning that `n` lines were dropped, as a log line of `main`'s format.
fn dropped_line(n: u64) -> String {
    let now = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let message = format!("{n} connection log lines dropped: standard error did not keep up");
    if json() {
        format!(
            "{{\"time\":\"{}\",\"level\":\"WARN\",\"target\":\"{TARGET}\",\"message\":\"{message}\"}}\n",
            timestamp(now)
        )
    } else {
        format!("[{} WARN  {TARGET}] {message}\n", timestamp(now))
    }
}

/// Writes whole lines to stderr, in pieces a pipe keeps together.
fn write_stderr(text: &str) {
    let mut out = std::io::stderr().lock();
    for chunk in line_chunks(text, PIPE_BUF) {
        // Nowhere to report a failing stderr; the lines are dropped.
        let _ = out.write_all(chunk.as_bytes());
    }
}

/// Waits up to `timeout` for the log thread to write every batch handed to it (at exit).
///
/// The queue may be full (stderr stuck while connections ended): the flush request then waits
/// for room too, from a thread of its own, so that the wait as a whole keeps to `timeout`.
/// Lines dropped since the last batch written are counted in a last warning.
pub fn finish(timeout: Duration) {
    if let Some(tx) = sink() {
        flush(tx, timeout);
    }
}

/// [`finish`] with the log thread's queue `tx`.
fn flush(tx: &SyncSender<Message>, timeout: Duration) {
    let (done, written) = sync_channel(1);
    let queued = match tx.try_send(Message::Flushed(done)) {
        Ok(()) => true,
        Err(TrySendError::Full(request)) => {
            let tx = tx.clone();
            std::thread::Builder::new().name("ringlb-log-exit".into()).spawn(move || tx.send(request)).is_ok()
        }
        Err(TrySendError::Disconnected(_)) => false,
    };
    if queued {
        // Past the timeout the lines still waiting are lost; nothing is said, as saying it
        // would wait for the same stderr.
        let _ = written.recv_timeout(timeout);
    }
}

/// Turns the connection log on or off and sets the format (at start and on every reload);
/// off too when `RUST_LOG` leaves out `info` for [`TARGET`].
pub fn configure(enabled: bool, json: bool) {
    let wanted = enabled && log::log_enabled!(target: TARGET, log::Level::Info);
    ENABLED.store(wanted, Ordering::Relaxed);
    JSON.store(json, Ordering::Relaxed);
}

/// Whether connection lines are wanted.
pub fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
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
    /// Adds the line of `record`, as `main` formats log lines: `[TIME INFO  TARGET] FIELDS`,
    /// or a JSON object with the record's fields beside `time`, `level` and `target`.
    pub fn push(&mut self, record: &Record<'_>) {
        let now = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
        if now != self.second || self.stamp.is_empty() {
            self.second = now;
            self.stamp = timestamp(now);
        }
        if json() {
            let fields = record.json();
            let _ = writeln!(
                self.buf,
                "{{\"time\":\"{}\",\"level\":\"INFO\",\"target\":\"{TARGET}\",{}",
                self.stamp,
                fields.strip_prefix('{').unwrap_or(&fields)
            );
        } else {
            let _ = write!(self.buf, "[{} INFO  {TARGET}] ", self.stamp);
            record.write_text(&mut self.buf);
            self.buf.push('\n');
        }
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

    /// Hands what was collected to the log thread; the number of lines dropped because it has
    /// [`QUEUED_BATCHES`] waiting already.
    pub fn flush(&mut self) -> u64 {
        if self.buf.is_empty() {
            return 0;
        }
        let text = std::mem::take(&mut self.buf);
        let Some(tx) = sink() else {
            write_stderr(&text);
            return 0;
        };
        match tx.try_send(Message::Lines(text)) {
            Ok(()) => 0,
            Err(TrySendError::Full(message) | TrySendError::Disconnected(message)) => {
                let lines = match &message {
                    Message::Lines(text) => text.matches('\n').count() as u64,
                    Message::Flushed(_) => 0,
                };
                DROPPED.fetch_add(lines, Ordering::Relaxed);
                lines
            }
        }
    }
}

/// `text` (whole lines) cut into pieces of at most `max` bytes each that end at a line's end
/// (a longer line is a piece of its own).
fn line_chunks(text: &str, max: usize) -> impl Iterator<Item = &str> {
    let mut rest = text;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let window = &rest.as_bytes()[..rest.len().min(max)];
        let end = match window.iter().rposition(|&b| b == b'\n') {
            Some(i) if rest.len() > max => i + 1,
            _ if rest.len() <= max => rest.len(),
            // One line longer than `max`: up to its end.
            _ => rest.find('\n').map_or(rest.len(), |i| i + 1),
        };
        let (chunk, tail) = rest.split_at(end);
        rest = tail;
        Some(chunk)
    })
}

/// `secs` since the Unix epoch as RFC 3339 in UTC, to the second (as env_logger writes it).
pub fn timestamp(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z", rem / 3600, rem % 3600 / 60, rem % 60)
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
    fn at_exit_a_full_queue_is_written_before_finish_returns() {
        use std::sync::{Arc, Condvar, Mutex};
        // A stderr that takes nothing until the gate opens, and says when it holds a batch.
        let gate = Arc::new((Mutex::new(false), Condvar::new()));
        let written = Arc::new(Mutex::new(String::new()));
        let (holding, held) = sync_channel(1);
        let (tx, rx) = sync_channel(QUEUED_BATCHES);
        let (stderr_gate, stderr_text) = (Arc::clone(&gate), Arc::clone(&written));
        std::thread::spawn(move || {
            write_batches(&rx, |text| {
                let _ = holding.try_send(());
                let (open, opened) = &*stderr_gate;
                drop(opened.wait_while(open.lock().unwrap(), |open| !*open).unwrap());
                stderr_text.lock().unwrap().push_str(text);
            })
        });
        tx.send(Message::Lines("line 0\n".into())).unwrap();
        held.recv().unwrap();
        // The log thread holds line 0; fill its queue.
        let mut sent = 1;
        while tx.try_send(Message::Lines(format!("line {sent}\n"))).is_ok() {
            sent += 1;
        }
        assert_eq!(sent, 1 + QUEUED_BATCHES);
        let finishing = std::thread::spawn(move || {
            flush(&tx, Duration::from_secs(60));
            written.lock().unwrap().lines().filter(|l| l.starts_with("line ")).count()
        });
        *gate.0.lock().unwrap() = true;
        gate.1.notify_all();
        assert_eq!(finishing.join().unwrap(), sent, "finish returned before every queued batch was written");
    }

    #[test]
    fn timestamps_are_rfc3339_in_utc() {
        assert_eq!(timestamp(0), "1970-01-01T00:00:00Z");
        assert_eq!(timestamp(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(timestamp(1_796_233_404), "2026-12-02T17:43:24Z");
    }

    #[test]
    fn lines_are_written_whole_in_pieces_that_a_pipe_keeps_together() {
        let line = "x".repeat(99) + "\n";
        let text = line.repeat(100);
        let chunks: Vec<&str> = line_chunks(&text, PIPE_BUF).collect();
        assert_eq!(chunks.concat(), text);
        assert!(
            chunks.iter().all(|c| c.len() <= PIPE_BUF && c.ends_with('\n')),
            "{:?}",
            chunks.iter().map(|c| c.len()).collect::<Vec<_>>()
        );
        assert_eq!(chunks.len(), 3);
        let long = "y".repeat(5000) + "\n" + "z\n";
        let chunks: Vec<&str> = line_chunks(&long, PIPE_BUF).collect();
        assert_eq!(chunks, vec![&long[..5001], "z\n"]);
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
