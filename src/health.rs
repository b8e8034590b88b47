//! Backend health: HAProxy's rise/fall counter and the active check itself.
//!
//! The counter ([`HealthState`]) runs from 0 to rise+fall-1 and a backend is up while it is at
//! least `rise`. A failed check takes one off; falling below `rise` snaps it to 0 (down). A
//! passed check adds one; reaching `rise` snaps it to the top (fully up). So an up backend goes
//! down after `fall` failures in a row and a down one comes up after `rise` passes in a row.
//! Backends start fully up, as in HAProxy, so a healthy pool serves from the first second.
//!
//! A check ([`probe`]) connects, optionally sends bytes and expects a reply prefix, all within
//! the timeout, and closes politely: FIN, then it reads until the backend closes too, so no
//! half-open socket is left behind and no RST is sent for a reply it did not read.

use std::fmt;
use std::io;
use std::net::{Shutdown, SocketAddr};
use std::time::Duration;

use tokio::time::{Instant, timeout_at};
use tokio_uring::net::TcpStream;

use crate::config::{HealthConfig, escape_bytes};

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
        }
    }
}

/// An OS error in lower case without the "(os error N)" tail, for log lines.
fn describe(e: &io::Error) -> String {
    let text = e.to_string();
    let text = text.split(" (os error").next().unwrap_or(&text);
    let mut chars = text.chars();
    chars.next().map_or_else(String::new, |first| first.to_lowercase().chain(chars).collect())
}

/// Runs one check of `address`; must run inside a tokio-uring runtime.
pub async fn probe(address: SocketAddr, config: &HealthConfig) -> Result<(), CheckFailure> {
    let deadline = Instant::now() + config.timeout;
    let stream = match timeout_at(deadline, TcpStream::connect(address)).await {
        Err(_) => return Err(CheckFailure::ConnectTimedOut),
        Ok(Err(e)) => return Err(CheckFailure::Connect(e)),
        Ok(Ok(stream)) => stream,
    };
    let outcome = timeout_at(deadline, converse(&stream, config)).await.unwrap_or(Err(CheckFailure::ReplyTimedOut));
    close_politely(stream, deadline.max(Instant::now() + CLOSE_GRACE)).await;
    outcome
}

/// How long a check waits for the backend to close its side after ours, at least.
const CLOSE_GRACE: Duration = Duration::from_millis(200);

async fn converse(stream: &TcpStream, config: &HealthConfig) -> Result<(), CheckFailure> {
    if let Some(send) = &config.send {
        let (result, _) = stream.write_all(send.clone()).await;
        result.map_err(CheckFailure::Send)?;
    }
    let Some(expect) = &config.expect else { return Ok(()) };
    let mut received = Vec::with_capacity(expect.len());
    while received.len() < expect.len() {
        let (result, buf) = stream.read(vec![0u8; expect.len() - received.len()]).await;
        let n = result.map_err(CheckFailure::Receive)?;
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
/// orderly close and no unread byte turns our close into a reset. shutdown(2) is called
/// directly: it never blocks, and the ring's shutdown would run on an io-wq thread.
async fn close_politely(stream: TcpStream, deadline: Instant) {
    if stream.shutdown(Shutdown::Write).is_err() {
        return;
    }
    let drain = async {
        loop {
            let (result, _) = stream.read(vec![0u8; 512]).await;
            if !matches!(result, Ok(n) if n > 0) {
                return;
            }
        }
    };
    if timeout_at(deadline, drain).await.is_err() {
        // The backend keeps its side open: stop waiting. shutdown also ends the pending read,
        // which tokio-uring would otherwise leave in flight holding the socket open.
        let _ = stream.shutdown(Shutdown::Both);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(state: &mut HealthState, results: &str) -> Vec<Option<bool>> {
        results.chars().map(|c| state.record(c == '+')).collect()
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
}
