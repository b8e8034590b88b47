//! The process's log: every line, from every thread, is written to stderr by one thread,
//! `ringlb-log`, so that a stderr that does not keep up (journald busy, a full pipe, a slow
//! disk) never stops a worker and with it every connection the worker holds.
//!
//! Lines are formatted where they are logged (`[TIME LEVEL target] message`, or a JSON object
//! with `log_format = "json"`) and handed to the log thread's queue. A worker never waits for
//! room: when [`QUEUED_BATCHES`] batches already wait, its line (or its batch of connection
//! lines, see [`crate::connlog`]) is dropped and counted, and the log thread says how many
//! once it writes again. This is HAProxy's choice for its logs (a log server that does not
//! keep up loses lines, not connections). Other threads (main, control) wait for room, up to
//! [`WAIT_FOR_ROOM`] (see [`send`]), so their lines are not lost to a slow stderr, and a
//! stopped one does not stop them. `RUST_LOG` filters as env_logger does (default `info`).
//!
//! The log thread writes whole lines, in writes of at most [`PIPE_BUF`] bytes, so that a pipe
//! (as journald's) never interleaves them with another writer's. [`finish`] at exit waits for
//! what is queued to be written.

use std::cell::Cell;
use std::fmt::Write as _;
use std::io::Write as _;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TryRecvError, TrySendError, sync_channel};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// The log thread's name.
const THREAD: &str = "ringlb-log";
/// The target of the log thread's own warning.
const TARGET: &str = "ringlb::log";
/// The most bytes one write to a pipe keeps together.
pub const PIPE_BUF: usize = 4096;
/// Batches that may wait for the log thread; a worker drops its lines past that rather than
/// wait.
pub const QUEUED_BATCHES: usize = 64;
/// Places in the queue past [`QUEUED_BATCHES`] that only threads other than workers use, so
/// that a busy connection log does not keep their lines waiting.
pub const RESERVED: usize = 16;
/// Longest another thread waits for room in the queue (see [`send`]).
pub const WAIT_FOR_ROOM: Duration = Duration::from_secs(5);

static JSON: AtomicBool = AtomicBool::new(false);
/// Lines dropped since the log thread last said so.
static DROPPED: AtomicU64 = AtomicU64::new(0);
/// Set when a line waited [`WAIT_FOR_ROOM`] in vain; cleared once the log thread has written
/// everything queued.
static STUCK: AtomicBool = AtomicBool::new(false);
/// Batches in the queue.
static QUEUED: AtomicUsize = AtomicUsize::new(0);
/// The log thread's queue, once [`start`]ed; `None` inside if it could not be started. Without
/// it, lines are written by the thread that logs them.
static SINK: OnceLock<Option<SyncSender<Message>>> = OnceLock::new();

thread_local! {
    /// Whether this thread drops a line rather than wait for room in the queue.
    static NEVER_WAITS: Cell<bool> = const { Cell::new(false) };
}

/// What the log thread is sent: lines to write, or (with `flushed`) a request to answer once
/// everything sent before is written.
struct Message {
    text: String,
    flushed: Option<SyncSender<()>>,
}

impl Message {
    fn lines(text: String) -> Message {
        Message { text, flushed: None }
    }
}

/// Installs the logger for the `log` macros: `RUST_LOG` (default `info`) decides what is
/// logged. A panic first lets the log thread write what it holds (up to half a second), so
/// the lines before it are not lost (release builds abort on a panic); if stderr does not take
/// them, the panic message is queued rather than written.
pub fn init() {
    let filter = env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).build();
    let max = filter.filter();
    if log::set_boxed_logger(Box::new(Logger { filter })).is_ok() {
        log::set_max_level(max);
    }
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let on_log_thread = std::thread::current().name() == Some(THREAD);
        if on_log_thread || (finish(Duration::from_millis(500)) && !STUCK.load(Ordering::Relaxed)) {
            previous(info);
        } else {
            // stderr does not take lines: the default hook's write could wait forever (and a
            // release build would never abort). Queue the message instead, if there is room.
            let where_ = std::thread::current().name().unwrap_or("a thread").to_string();
            send(line(log::Level::Error, TARGET, &format!("{where_} panicked: {info}")));
        }
    }));
}

/// Marks the calling thread as one that must never wait for stderr (a worker): its lines are
/// dropped and counted when the queue is full.
pub fn never_wait() {
    NEVER_WAITS.with(|never| never.set(true));
}

/// Sets the format of every line (at start and on every reload).
pub fn set_json(json: bool) {
    JSON.store(json, Ordering::Relaxed);
}

/// Whether lines are written as JSON.
pub fn json() -> bool {
    JSON.load(Ordering::Relaxed)
}

struct Logger {
    filter: env_logger::Logger,
}

impl log::Log for Logger {
    fn enabled(&self, metadata: &log::Metadata<'_>) -> bool {
        self.filter.enabled(metadata)
    }

    fn log(&self, record: &log::Record<'_>) {
        if self.filter.matches(record) {
            send(line(record.level(), record.target(), &record.args().to_string()));
        }
    }

    fn flush(&self) {}
}

/// One log line, newline included.
fn line(level: log::Level, target: &str, message: &str) -> String {
    let time = timestamp(SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs()));
    let json = json();
    let mut out = String::with_capacity(64 + message.len());
    write_head(&mut out, json, &time, level, target);
    if json {
        let _ = write!(out, "\"message\":{}}}", serde_json::Value::String(message.to_string()));
    } else {
        out.push_str(message);
    }
    out.push('\n');
    out
}

/// The start of every line, the connection log's too: `[TIME LEVEL target] `, or with `json`
/// the opening of a JSON object with `time`, `level` and `target` and a comma, for the line's
/// own fields to follow.
pub fn write_head(out: &mut String, json: bool, time: &str, level: log::Level, target: &str) {
    let _ = if json {
        write!(out, "{{\"time\":\"{time}\",\"level\":\"{level}\",\"target\":\"{target}\",")
    } else {
        write!(out, "[{time} {level:<5} {target}] ")
    };
}

/// Hands `text` (whole lines) to the log thread; the number of lines dropped is returned (and
/// said later by the log thread).
///
/// A thread marked with [`never_wait`] drops the lines when [`QUEUED_BATCHES`] wait already;
/// the [`RESERVED`] places past that are for the other threads. They wait up to
/// [`WAIT_FOR_ROOM`] when the queue is full; a line that still finds no room marks stderr as
/// stuck, and until the log thread has caught up they too drop what finds the queue full: a
/// stderr that stopped costs the main and control threads one wait, not their work.
pub fn send(text: String) -> u64 {
    let Some(tx) = sink() else {
        write_stderr(&text);
        return 0;
    };
    send_to(tx, &QUEUED, text, !NEVER_WAITS.with(Cell::get))
}

/// [`send`] to the queue `tx` holding `queued` batches, from a thread that `waits` or not.
fn send_to(tx: &SyncSender<Message>, queued: &AtomicUsize, mut text: String, waits: bool) -> u64 {
    if waits {
        let deadline = Instant::now() + WAIT_FOR_ROOM;
        loop {
            text = match queue(tx, queued, text) {
                Ok(()) => return 0,
                Err(TrySendError::Full(back)) => back,
                Err(TrySendError::Disconnected(back)) => {
                    // The log thread is gone: write it here.
                    write_stderr(&back);
                    return 0;
                }
            };
            if STUCK.load(Ordering::Relaxed) {
                break;
            }
            if Instant::now() >= deadline {
                STUCK.store(true, Ordering::Relaxed);
                break;
            }
            // Rare (the queue holds 80 batches): a short nap rather than a second channel.
            std::thread::sleep(Duration::from_millis(1));
        }
    } else if queued.load(Ordering::Relaxed) < QUEUED_BATCHES {
        text = match queue(tx, queued, text) {
            Ok(()) => return 0,
            Err(TrySendError::Full(back) | TrySendError::Disconnected(back)) => back,
        };
    }
    let lines = text.matches('\n').count() as u64;
    DROPPED.fetch_add(lines, Ordering::Relaxed);
    lines
}

/// Queues `text` if there is room, counted in `queued` (before it is sent, so the log thread
/// never takes it off first); what did not go is handed back.
fn queue(tx: &SyncSender<Message>, queued: &AtomicUsize, text: String) -> Result<(), TrySendError<String>> {
    queued.fetch_add(1, Ordering::Relaxed);
    tx.try_send(Message::lines(text)).map_err(|e| {
        queued.fetch_sub(1, Ordering::Relaxed);
        match e {
            TrySendError::Full(message) => TrySendError::Full(message.text),
            TrySendError::Disconnected(message) => TrySendError::Disconnected(message.text),
        }
    })
}

/// Starts the log thread (once; later calls do nothing). The server calls it after it left
/// root, which changes only the calling thread: no thread may start before.
pub fn start() {
    SINK.get_or_init(|| {
        let (tx, rx) = sync_channel(QUEUED_BATCHES + RESERVED);
        std::thread::Builder::new()
            .name(THREAD.into())
            .spawn(move || write_batches(&rx, &QUEUED, write_stderr))
            .ok()
            .map(|_| tx)
    });
}

/// The log thread's queue, if it runs.
fn sink() -> Option<&'static SyncSender<Message>> {
    SINK.get().and_then(Option::as_ref)
}

/// The log thread: writes each batch with `write` (and takes it off `queued`), and after one
/// that came once lines were dropped, says how many. Once it has written everything queued,
/// stderr no longer counts as stuck.
fn write_batches(rx: &Receiver<Message>, queued: &AtomicUsize, write: impl Fn(&str)) {
    let say_dropped = || {
        let dropped = DROPPED.swap(0, Ordering::Relaxed);
        let wanted = log::logger().enabled(&log::Metadata::builder().level(log::Level::Warn).target(TARGET).build());
        if dropped > 0 && wanted {
            let message = format!("{dropped} log lines dropped: standard error did not keep up");
            write(&line(log::Level::Warn, TARGET, &message));
        }
    };
    loop {
        let message = match rx.try_recv() {
            Ok(message) => message,
            Err(TryRecvError::Empty) => {
                STUCK.store(false, Ordering::Relaxed);
                match rx.recv() {
                    Ok(message) => message,
                    Err(_) => return,
                }
            }
            Err(TryRecvError::Disconnected) => return,
        };
        match message.flushed {
            None => {
                queued.fetch_sub(1, Ordering::Relaxed);
                write(&message.text);
                say_dropped();
            }
            Some(done) => {
                // Lines dropped after the last batch written are counted here, at exit.
                say_dropped();
                let _ = done.send(());
            }
        }
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

/// Waits up to `timeout` for the log thread to write every line handed to it (at exit); whether
/// it did (true without a log thread).
///
/// The queue may be full (stderr stuck while connections ended): the flush request then waits
/// for room too, from a thread of its own, so that the wait as a whole keeps to `timeout`.
/// Lines dropped since the last batch written are counted in a last warning.
pub fn finish(timeout: Duration) -> bool {
    sink().is_none_or(|tx| flush(tx, timeout))
}

/// [`finish`] with the log thread's queue `tx`: whether everything was written in time.
fn flush(tx: &SyncSender<Message>, timeout: Duration) -> bool {
    let (done, written) = sync_channel(1);
    let queued = match tx.try_send(Message { text: String::new(), flushed: Some(done) }) {
        Ok(()) => true,
        Err(TrySendError::Full(request)) => {
            let tx = tx.clone();
            std::thread::Builder::new().name("ringlb-log-exit".into()).spawn(move || tx.send(request)).is_ok()
        }
        Err(TrySendError::Disconnected(_)) => false,
    };
    // Past the timeout the lines still waiting are lost; nothing is said, as saying it would
    // wait for the same stderr.
    queued && written.recv_timeout(timeout).is_ok()
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

/// `secs` since the Unix epoch as RFC 3339 in UTC, to the second.
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

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Condvar, Mutex};

    use super::*;

    /// A log thread over a stderr that takes nothing until the gate opens: its queue, the gate,
    /// what it wrote, and a signal that it holds a batch.
    #[allow(clippy::type_complexity)]
    fn stuck_log_thread()
    -> (SyncSender<Message>, Arc<AtomicUsize>, Arc<(Mutex<bool>, Condvar)>, Arc<Mutex<String>>, Receiver<()>) {
        let gate = Arc::new((Mutex::new(false), Condvar::new()));
        let written = Arc::new(Mutex::new(String::new()));
        let (holding, held) = sync_channel(1);
        let (tx, rx) = sync_channel(QUEUED_BATCHES + RESERVED);
        let queued = Arc::new(AtomicUsize::new(0));
        let (stderr_gate, stderr_text, taken) = (Arc::clone(&gate), Arc::clone(&written), Arc::clone(&queued));
        std::thread::spawn(move || {
            write_batches(&rx, &taken, |text| {
                let _ = holding.try_send(());
                let (open, opened) = &*stderr_gate;
                drop(opened.wait_while(open.lock().unwrap(), |open| !*open).unwrap());
                stderr_text.lock().unwrap().push_str(text);
            })
        });
        (tx, queued, gate, written, held)
    }

    #[test]
    fn a_busy_connection_log_leaves_room_for_the_other_threads() {
        let (tx, queued, gate, written, held) = stuck_log_thread();
        assert_eq!(send_to(&tx, &queued, "worker 0\n".into(), false), 0);
        held.recv().unwrap();
        // The log thread holds the first batch; workers may queue QUEUED_BATCHES more.
        for n in 1..=QUEUED_BATCHES {
            assert_eq!(send_to(&tx, &queued, format!("worker {n}\n"), false), 0, "batch {n}");
        }
        assert_eq!(send_to(&tx, &queued, "worker dropped\n".into(), false), 1, "a worker past the limit drops");
        // A waiting thread finds room at once (else it would wait 5 s and drop it, returning 1).
        for n in 0..RESERVED {
            assert_eq!(send_to(&tx, &queued, format!("control {n}\n"), true), 0, "control line {n}");
        }
        *gate.0.lock().unwrap() = true;
        gate.1.notify_all();
        flush(&tx, Duration::from_secs(60));
        let text = written.lock().unwrap().clone();
        assert_eq!(text.lines().filter(|l| l.starts_with("worker ")).count(), 1 + QUEUED_BATCHES, "{text}");
        assert_eq!(text.lines().filter(|l| l.starts_with("control ")).count(), RESERVED, "{text}");
        assert_eq!(queued.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn at_exit_a_full_queue_is_written_before_finish_returns() {
        let (tx, _, gate, written, held) = stuck_log_thread();
        tx.send(Message::lines("line 0\n".into())).unwrap();
        held.recv().unwrap();
        // The log thread holds line 0; fill its queue.
        let mut sent = 1;
        while tx.try_send(Message::lines(format!("line {sent}\n"))).is_ok() {
            sent += 1;
        }
        assert_eq!(sent, 1 + QUEUED_BATCHES + RESERVED);
        let finishing = std::thread::spawn(move || {
            flush(&tx, Duration::from_secs(60));
            written.lock().unwrap().lines().filter(|l| l.starts_with("line ")).count()
        });
        *gate.0.lock().unwrap() = true;
        gate.1.notify_all();
        assert_eq!(finishing.join().unwrap(), sent, "finish returned before every queued batch was written");
    }

    #[test]
    fn a_line_has_the_time_level_and_target() {
        let text = line(log::Level::Warn, "ringlb::worker", "a \"quoted\" word");
        let (stamp, rest) = text.strip_prefix('[').unwrap().split_once(' ').unwrap();
        assert_eq!(stamp.len(), "2026-12-02T17:43:24Z".len(), "{text}");
        assert_eq!(rest, "WARN  ringlb::worker] a \"quoted\" word\n");
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
}
