//! How connections spread over the workers.
//!
//! With `spread = "even"` (the default) every worker takes its share of new connections (the
//! kernel's SO_REUSEPORT hash) and keeps them, one ring per core; nothing here runs.
//! `spread = "pack"` is for hosts whose cores also run other work (a balancer beside its
//! database): everything that exists only for it sits behind this module, and the shared state
//! holds it as one optional [`Pack`].
//!
//! A worker that sleeps between completions pays a context switch for every wake-up, and on
//! cores shared with other programs two half-busy workers wake about six times as often per
//! request as one busier worker (README, Performance). So new connections go to as few
//! workers as keep up:
//!
//! - The control thread reads every worker's CPU time ([`cpu`]) each [`INTERVAL`] and [`Packer`] decides
//!   how many workers are in use: more when a worker used [`GROW_AT`] of a CPU for
//!   [`HOT_INTERVALS`] in a row and the work would spread over more workers than are in use
//!   at [`TARGET`] each (one more, or as many as would each stay near [`TARGET`]);
//!   one fewer after [`QUIET_INTERVALS`] in a row in which no worker was that busy and all
//!   workers together used less than [`FELL_TO`] of what they used when that worker came
//!   into use, or less than [`SHRINK_BELOW`] of a CPU per worker that would remain. The first
//!   rule is the hysteresis that keeps a load that needed one more worker from flapping
//!   between the two; the second brings a light load back to fewer workers whatever happened
//!   before. A load that passes both ways all the same (it costs less over more workers)
//!   doubles the quiet spell each time a shrink is undone within [`REGROW_WINDOW`].
//! - Workers steer their listeners' SYNs to the workers in use (a classic BPF program on the
//!   SO_REUSEPORT group, [`steer`]). The program picks sockets by their
//!   place in the group, which is the worker's index because the workers' listeners start
//!   listening in that order. That holds while they all listen: a worker that fails stops
//!   ringlb, and a draining one accepts nothing. Another process listening on the same port
//!   (same user, SO_REUSEPORT) would join the group after ringlb's sockets and get no
//!   connections at all: the program only picks among the first workers.
//! - Open connections follow: a worker out of use hands all of its connections to the workers
//!   in use, and a worker in use holding more than its share ([`excess`]) hands the rest to
//!   the one with the fewest ([`destination`]), through [`handoff`]. So a database pool opened in one burst while
//!   the load was light spreads out once the load grows, and gathers again when it falls.
//!
//! A connection moves only while it waits for bytes in both directions (nothing received and
//! unsent, no pipe held): its waits are cancelled, and if bytes come first the move is given up
//! and it relays on where it is (see `Conn::begin_move`). Sockets move freely between threads
//! of one process; the connection's state goes through the other worker's inbox.

pub mod cpu;
pub mod handoff;
pub mod policy;
pub mod steer;

use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

pub use cpu::CpuShares;
pub use handoff::Handoff;
pub use policy::*;

use crate::sys;

/// How connections spread over the workers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Spread {
    /// New connections go to as few workers as keep up with the load; when one gets busy the
    /// next takes new connections and a share of the open ones, and when the load falls the
    /// connections gather on fewer workers again (see `crate::spread`).
    Pack,
    /// Every worker takes an equal share of new connections (the kernel's SO_REUSEPORT hash),
    /// and a connection stays on the worker that accepted it, as in HAProxy and nginx.
    Even,
}

impl Spread {
    pub fn name(self) -> &'static str {
        match self {
            Spread::Pack => "pack",
            Spread::Even => "even",
        }
    }
}

/// What the control side and the workers share with `spread = "pack"`: how many workers (the
/// first ones) take new connections, each worker's thread (for its CPU clock), and how many
/// connections are on their way to each worker.
#[derive(Debug)]
pub struct Pack {
    in_use: AtomicUsize,
    /// `in_use` was set by [`Pack::hold`]; the control thread leaves it.
    held: AtomicBool,
    /// Per worker: its thread id, once it runs (0 before).
    threads: Box<[AtomicI32]>,
    /// Per worker: connections handed to it and not yet taken in.
    in_transit: Box<[AtomicU64]>,
}

impl Pack {
    /// One worker in use of `workers`.
    pub fn new(workers: usize) -> Pack {
        Pack {
            in_use: AtomicUsize::new(1),
            held: AtomicBool::new(false),
            threads: (0..workers).map(|_| AtomicI32::new(0)).collect(),
            in_transit: (0..workers).map(|_| AtomicU64::new(0)).collect(),
        }
    }

    pub fn workers_in_use(&self) -> usize {
        self.in_use.load(Ordering::Acquire)
    }

    /// Sets the workers in use (1 to all); the caller wakes the workers to follow.
    pub fn set_workers_in_use(&self, count: usize) {
        self.in_use.store(count.clamp(1, self.threads.len()), Ordering::Release);
    }

    /// Sets the workers in use and keeps them so: the control thread no longer changes them
    /// (for tests, and for whoever embeds a server and decides on its own).
    pub fn hold(&self, count: usize) {
        self.held.store(true, Ordering::Release);
        self.set_workers_in_use(count);
    }

    pub fn held(&self) -> bool {
        self.held.load(Ordering::Acquire)
    }

    /// Worker `worker` runs on thread `tid`.
    pub fn register_thread(&self, worker: usize, tid: libc::pid_t) {
        self.threads[worker].store(tid, Ordering::Release);
    }

    /// Each worker's CPU time so far (`None` before its thread runs, or once it has exited).
    pub fn cpu_times(&self) -> impl Iterator<Item = Option<Duration>> + '_ {
        self.threads.iter().map(|tid| match tid.load(Ordering::Acquire) {
            0 => None,
            tid => sys::thread_cpu_time(tid),
        })
    }

    /// Connections on their way to `worker`.
    pub fn in_transit(&self, worker: usize) -> u64 {
        self.in_transit[worker].load(Ordering::Acquire)
    }

    fn arriving(&self, worker: usize, n: u64) {
        self.in_transit[worker].fetch_add(n, Ordering::AcqRel);
    }

    fn arrived(&self, worker: usize, n: u64) {
        self.in_transit[worker].fetch_sub(n, Ordering::AcqRel);
    }
}
