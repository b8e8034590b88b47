//! Backend health: HAProxy's rise/fall counter and the active check itself.
//!
//! The counter ([`HealthState`]) runs from 0 to rise+fall-1 and a backend is up while it is at
//! least `rise`. A failed check takes one off; falling below `rise` snaps it to 0 (down). A
//! passed check adds one; reaching `rise` snaps it to the top (fully up). So an up backend goes
//! down after `fall` failures in a row and a down one comes up after `rise` passes in a row.
//! Backends start fully up, as in HAProxy, so a healthy pool serves from the first second.
//!
//! A check ([`probe`]) connects (to the traffic port, or the check's own `port`), optionally
//! sends bytes and expects a reply prefix, or speaks MySQL's or PostgreSQL's login
//! ([`mysql`], [`postgres`]), all within the timeout, and closes politely: FIN, then it reads until the backend closes too, so no
//! half-open socket is left behind and no RST is sent for a reply it did not read. It uses
//! tokio's sockets: a check that times out drops its socket, which closes it at once (a
//! tokio-uring socket stays open while a connect or read is in flight, and a backend that drops
//! SYNs would leave one behind per check). A check that fails for want of a local descriptor
//! or port says nothing about the backend and is not counted ([`CheckFailure::is_local`]).

use std::fmt;
use std::io;
use std::net::{Shutdown, SocketAddr};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::{Instant, timeout_at};

use crate::config::{CheckProtocol, HealthConfig, escape_bytes};

pub mod mysql;
pub mod postgres;

/// One backend's rise/fall counter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthState {
    health: u32,
    rise: u32,
    fall: u32,
    /// The last result and how many times in a row it came, for log messages.
    last: Option<bool>,
    streak: u32,
}

impl HealthState {
    /// A backend that starts fully up.
    pub fn new(rise: u32, fall: u32) -> HealthState {
        debug_assert!(rise >= 1 && fall >= 1);
        HealthState { health: rise + fall - 1, rise, fall, last: None, streak: 0 }
    }

    /// A backend that starts fully up or fully down (a reload that changed rise or fall).
    pub fn starting(rise: u32, fall: u32, up: bool) -> HealthState {
        let mut state = HealthState::new(rise, fall);
        if !up {
            state.health = 0;
        }
        state
    }

    pub fn is_up(&self) -> bool {
        self.health >= self.rise
    }

    /// How many checks in a row had the last result.
    pub fn streak(&self) -> u32 {
        self.streak
    }

    /// Records one check result; returns the new state when the backend went up or down.
    pub fn record(&mut self, passed: bool) -> Option<bool> {
        let was_up = self.is_up();
        let top = self.rise + self.fall - 1;
        if passed {
            self.health = if self.health + 1 >= self.rise { top } else { self.health + 1 };
        } else if self.health > 0 {
            self.health -= 1;
            if self.health < self.rise {
                self.health = 0;
            }
        }
        self.streak = if self.last == Some(passed) { self.streak + 1 } else { 1 };
        self.last = Some(passed);
        (self.is_up() != was_up).then_some(self.is_up())
    }
}

/// Why a check failed, as the state-change log line says it.
#[derive(Debug)]
pub enum CheckFailure {
    Connect(io::Error),
    ConnectTimedOut,
    Send(io::Error),
    Receive(io::Error),
    ReplyTimedOut,
    /// The backend closed before the expected reply was complete.
    Closed {
        received: Vec<u8>,
    },
    /// The reply did not start with what was expected.
    Unexpected {
        received: Vec<u8>,
    },
    /// A worker's connect failed (passive check), with its errno.
    Passive(i32),
    /// A database check got something it does not understand.
    Protocol(String),
    /// A database check was refused by the server, with what it said.
    Refused(String),
}

impl CheckFailure {
    /// Whether the check failed for a reason of this host's (no descriptor, memory or local
    /// port for the socket), which says nothing about the backend.
    pub fn is_local(&self) -> bool {
        let errno = match self {
            CheckFailure::Connect(e) => e.raw_os_error(),
            CheckFailure::Passive(errno) => Some(*errno),
            _ => None,
        };
        errno.is_some_and(|e| {
            matches!(e, libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM | libc::EADDRNOTAVAIL)
        })
    }
}

impl fmt::Display for CheckFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CheckFailure::Connect(e) => write!(f, "{}", describe(e)),
            CheckFailure::ConnectTimedOut => write!(f, "connect timed out"),
            CheckFailure::Send(e) => write!(f, "send failed: {}", describe(e)),
            CheckFailure::Receive(e) => write!(f, "receive failed: {}", describe(e)),
            CheckFailure::ReplyTimedOut => write!(f, "timed out waiting for the reply"),
            CheckFailure::Closed { received } if received.is_empty() => write!(f, "closed without replying"),
            CheckFailure::Closed { received } => write!(f, "closed after \"{}\"", escape_bytes(received)),
            CheckFailure::Unexpected { received } => write!(f, "unexpected reply \"{}\"", escape_bytes(received)),
            CheckFailure::Passive(errno) => {
                write!(f, "{}, seen by a worker", describe(&io::Error::from_raw_os_error(*errno)))
            }
            CheckFailure::Protocol(what) | CheckFailure::Refused(what) => write!(f, "{what}"),
        }
    }
}

/// The most characters of a backend's own text (a database's error message) a log line shows.
const MAX_SHOWN: usize = 200;

/// Text a backend sent, for a log line: control characters escaped (it cannot start a line of
/// its own) and cut to [`MAX_SHOWN`] characters.
fn shown(bytes: &[u8]) -> String {
    let text = String::from_utf8_lossy(bytes);
    let mut chars = text.chars();
    let mut out = String::new();
    for c in chars.by_ref().take(MAX_SHOWN) {
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    if chars.next().is_some() {
        out.push_str("...");
    }
    out
}

/// An OS error in lower case without the "(os error N)" tail, for log lines.
fn describe(e: &io::Error) -> String {
    let text = e.to_string();
    let text = text.split(" (os error").next().unwrap_or(&text);
    let mut chars = text.chars();
    chars.next().map_or_else(String::new, |first| first.to_lowercase().chain(chars).collect())
}

/// Runs one check of the backend at `address` (on the check's own `port`, if it has one);
/// must run inside a tokio runtime (the control thread's).
pub async fn probe(address: SocketAddr, config: &HealthConfig) -> Result<(), CheckFailure> {
    let address = config.port.map_or(address, |port| SocketAddr::new(address.ip(), port));
    let deadline = Instant::now() + config.timeout;
    let stream = match timeout_at(deadline, TcpStream::connect(address)).await {
        Err(_) => return Err(CheckFailure::ConnectTimedOut),
        Ok(Err(e)) => return Err(CheckFailure::Connect(e)),
        Ok(Ok(stream)) => stream,
    };
    let mut stream = stream;
    let outcome = timeout_at(deadline, converse(&mut stream, config)).await.unwrap_or(Err(CheckFailure::ReplyTimedOut));
    close_politely(stream, deadline.max(Instant::now() + CLOSE_GRACE)).await;
    outcome
}

/// How long a check waits for the backend to close its side after ours, at least.
const CLOSE_GRACE: Duration = Duration::from_millis(200);

async fn converse(stream: &mut TcpStream, config: &HealthConfig) -> Result<(), CheckFailure> {
    match &config.protocol {
        CheckProtocol::Tcp => {}
        CheckProtocol::Mysql { user } => return mysql::check(stream, user).await,
        CheckProtocol::Postgres { user, database } => return postgres::check(stream, user, database).await,
    }
    if let Some(send) = &config.send {
        stream.write_all(send).await.map_err(CheckFailure::Send)?;
    }
    let Some(expect) = &config.expect else { return Ok(()) };
    let mut received = Vec::with_capacity(expect.len());
    let mut buf = [0u8; 512];
    while received.len() < expect.len() {
        let want = (expect.len() - received.len()).min(buf.len());
        let n = stream.read(&mut buf[..want]).await.map_err(CheckFailure::Receive)?;
        if n == 0 {
            return Err(CheckFailure::Closed { received });
        }
        received.extend_from_slice(&buf[..n]);
        if !expect.starts_with(&received) {
            return Err(CheckFailure::Unexpected { received });
        }
    }
    Ok(())
}

/// Sends FIN and reads until the backend closes too (or `deadline`), so the backend sees an
/// orderly close and no unread byte turns our close into a reset. Dropping the stream then
/// closes the socket.
async fn close_politely(mut stream: TcpStream, deadline: Instant) {
    if socket2::SockRef::from(&stream).shutdown(Shutdown::Write).is_err() {
        return;
    }
    let drain = async {
        let mut buf = [0u8; 512];
        while matches!(stream.read(&mut buf).await, Ok(n) if n > 0) {}
    };
    let _ = timeout_at(deadline, drain).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(state: &mut HealthState, results: &str) -> Vec<Option<bool>> {
        results.chars().map(|c| state.record(c == '+')).collect()
    }

    #[test]
    fn a_backends_text_is_shown_on_one_line_and_cut_short() {
        assert_eq!(shown("l'ecriture échoue".as_bytes()), "l'ecriture échoue");
        assert_eq!(
            shown(b"x\n[2025-01-01T00:00:00Z ERROR ringlb] forged\r\x1b[0m"),
            "x\\n[2025-01-01T00:00:00Z ERROR ringlb] forged\\r\\u{1b}[0m"
        );
        let long = "y".repeat(MAX_SHOWN + 1);
        assert_eq!(shown(long.as_bytes()), format!("{}...", &long[..MAX_SHOWN]));
        assert_eq!(shown(&long.as_bytes()[..MAX_SHOWN]), &long[..MAX_SHOWN]);
    }

    #[test]
    fn up_backend_goes_down_after_fall_failures_in_a_row() {
        let mut state = HealthState::new(2, 3);
        assert!(state.is_up());
        assert_eq!(run(&mut state, "--"), vec![None, None]);
        // A pass in between resets the count.
        assert_eq!(run(&mut state, "+"), vec![None]);
        assert_eq!(run(&mut state, "---"), vec![None, None, Some(false)]);
        assert!(!state.is_up());
        assert_eq!(state.streak(), 3);
    }

    #[test]
    fn down_backend_comes_up_after_rise_passes_in_a_row() {
        let mut state = HealthState::new(2, 3);
        run(&mut state, "---");
        assert_eq!(run(&mut state, "+-+"), vec![None, None, None], "a failure resets the rise count");
        assert_eq!(run(&mut state, "+"), vec![Some(true)]);
        // Snapped to fully up: it takes `fall` failures again.
        assert_eq!(run(&mut state, "--"), vec![None, None]);
        assert_eq!(run(&mut state, "-"), vec![Some(false)]);
    }

    #[test]
    fn rise_and_fall_of_one() {
        let mut state = HealthState::new(1, 1);
        assert_eq!(run(&mut state, "-+-+"), vec![Some(false), Some(true), Some(false), Some(true)]);
    }

    #[test]
    fn haproxy_sequence() {
        // rise 3, fall 2: health runs 0..=4, up at >= 3.
        let mut state = HealthState::new(3, 2);
        let changes = run(&mut state, "--++-+++--");
        assert_eq!(
            changes,
            // A failure while down (the fifth check) snaps the count back to 0, so the rise
            // starts over and completes on the eighth check.
            vec![None, Some(false), None, None, None, None, None, Some(true), None, Some(false)]
        );
    }

    #[test]
    fn failures_read_well() {
        let refused = CheckFailure::Connect(io::Error::from_raw_os_error(libc::ECONNREFUSED));
        assert_eq!(refused.to_string(), "connection refused");
        assert_eq!(
            CheckFailure::Unexpected { received: b"-ERR\r\n".to_vec() }.to_string(),
            "unexpected reply \"-ERR\\r\\n\""
        );
        assert_eq!(CheckFailure::Passive(libc::ECONNREFUSED).to_string(), "connection refused, seen by a worker");
    }

    #[test]
    fn a_shortage_of_local_descriptors_is_not_the_backends_fault() {
        assert!(CheckFailure::Connect(io::Error::from_raw_os_error(libc::EMFILE)).is_local());
        assert!(CheckFailure::Passive(libc::EADDRNOTAVAIL).is_local());
        assert!(!CheckFailure::Connect(io::Error::from_raw_os_error(libc::ECONNREFUSED)).is_local());
        assert!(!CheckFailure::ConnectTimedOut.is_local());
    }
}
