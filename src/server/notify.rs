//! systemd's notify protocol (`Type=notify`), through the sd-notify crate: `READY=1` once every
//! listener is bound and every worker runs; on SIGHUP `RELOADING=1` with `MONOTONIC_USEC` in
//! one message, then `READY=1` with the outcome in `STATUS=`; `STOPPING=1` when draining
//! starts; `STATUS=` with open connections and backends up; with `WatchdogSec=`, `WATCHDOG=1`
//! only while every worker has ticked since the last one (a hung worker gets the service
//! restarted); after a binary upgrade `MAINPID=` of the new process.
//!
//! Without `NOTIFY_SOCKET` (not started by systemd) nothing is sent and nothing changes.

use std::time::{Duration, Instant};

use log::{info, warn};
use sd_notify::NotifyState;

use crate::control::Shared;

/// How often `STATUS=` is refreshed at most.
const STATUS_EVERY: Duration = Duration::from_secs(5);

/// The service manager's side of this process.
pub struct Notifier {
    enabled: bool,
    /// `WATCHDOG_USEC` (for this process): a ping is due every half of it.
    watchdog: Option<Duration>,
    last_ping: Option<Instant>,
    /// Each worker's tick count at the last ping.
    ticks: Vec<u64>,
    /// Whether the last check found a worker that had not ticked (logged once per spell).
    stalled: bool,
    last_status: Option<(Instant, String)>,
}

impl Notifier {
    /// From the environment systemd sets (`NOTIFY_SOCKET`, `WATCHDOG_USEC`, `WATCHDOG_PID`).
    pub fn from_env() -> Notifier {
        let enabled = std::env::var_os("NOTIFY_SOCKET").is_some();
        let watchdog = if enabled { sd_notify::watchdog_enabled() } else { None };
        if let Some(interval) = watchdog {
            info!("systemd watchdog: every worker must tick within {interval:?}");
            if interval < Duration::from_secs(4) {
                warn!("WatchdogSec below 4s: a worker ticks once a second at least, so a busy host may miss a ping");
            }
        }
        Notifier { enabled, watchdog, last_ping: None, ticks: Vec::new(), stalled: false, last_status: None }
    }

    pub fn enabled(&self) -> bool {
        self.enabled
    }

    fn send(&self, states: &[NotifyState]) {
        if !self.enabled {
            return;
        }
        if let Err(e) = sd_notify::notify(states) {
            warn!("systemd notify: {e}");
        }
    }

    /// Serving: every listener bound, every worker running.
    pub fn ready(&mut self, shared: &Shared) {
        let status = status(shared);
        self.send(&[NotifyState::Ready, NotifyState::Status(&status)]);
        self.last_status = Some((Instant::now(), status));
    }

    /// A reload starts.
    pub fn reloading(&self) {
        match NotifyState::monotonic_usec_now() {
            Ok(now) => self.send(&[NotifyState::Reloading, now]),
            Err(e) => warn!("systemd notify: no monotonic clock: {e}"),
        }
    }

    /// A reload ended: took effect, or `error` says why not (ringlb serves on).
    pub fn reloaded(&mut self, shared: &Shared, error: Option<&str>) {
        let status = match error {
            None => format!("reloaded; {}", status(shared)),
            Some(e) => format!("reload failed, serving with the previous config: {e}"),
        };
        self.send(&[NotifyState::Ready, NotifyState::Status(&status)]);
        self.last_status = Some((Instant::now(), status));
    }

    /// Draining starts (a stop signal, or after an upgrade handed over).
    pub fn stopping(&self) {
        self.send(&[
            NotifyState::Stopping,
            NotifyState::Status("draining: not accepting, open connections may finish"),
        ]);
    }

    /// An upgrade handed the sockets to `pid`, which serves from now on: systemd follows it,
    /// and this process (no longer the main one) says nothing more.
    pub fn main_pid(&mut self, pid: u32) {
        self.send(&[NotifyState::MainPid(pid), NotifyState::Status(&format!("upgraded: pid {pid} serves"))]);
        self.enabled = false;
    }

    /// Called from the main loop a few times a second: the watchdog ping when it is due and
    /// every worker has ticked since the last one, and `STATUS=` now and then.
    pub fn tick(&mut self, shared: &Shared) {
        if !self.enabled {
            return;
        }
        if self.last_status.as_ref().is_none_or(|(at, _)| at.elapsed() >= STATUS_EVERY) {
            let now = status(shared);
            if self.last_status.as_ref().is_none_or(|(_, was)| *was != now) {
                self.send(&[NotifyState::Status(&now)]);
            }
            self.last_status = Some((Instant::now(), now));
        }
        let Some(interval) = self.watchdog else { return };
        if self.last_ping.is_some_and(|at| at.elapsed() < interval / 2) {
            return;
        }
        let ticks: Vec<u64> = shared.stats.iter().map(|s| s.ticks.get()).collect();
        let stuck: Vec<usize> =
            (0..ticks.len()).filter(|&w| self.ticks.get(w).is_some_and(|&before| ticks[w] == before)).collect();
        if stuck.is_empty() {
            self.send(&[NotifyState::Watchdog]);
            self.ticks = ticks;
            self.last_ping = Some(Instant::now());
            if self.stalled {
                info!("systemd watchdog: every worker ticks again; pings resume");
                self.stalled = false;
            }
        } else if !self.stalled {
            self.stalled = true;
            log::error!(
                "systemd watchdog: worker(s) {stuck:?} did not tick in {:?}; no ping, so systemd restarts the service",
                interval / 2
            );
        }
    }
}

/// `STATUS=`: open connections and backends up.
fn status(shared: &Shared) -> String {
    let snapshot = shared.snapshot();
    let (up, backends) = snapshot
        .pools
        .iter()
        .fold((0, 0), |(up, all), pool| (up + pool.up.iter().filter(|&&u| u).count(), all + pool.backends.len()));
    let open: u64 = shared.stats.iter().map(|s| s.active.get()).sum();
    format!("{open} connections open; {up} of {backends} backends up")
}
