//! ringlb: a layer-4 TCP load balancer on io_uring, one ring per core.
//!
//! How the pieces fit, in the order a connection meets them:
//!
//! - [`config`] reads the TOML file and validates it into a typed [`config::Config`]; nothing
//!   past startup sees config types.
//! - [`server`] binds one SO_REUSEPORT listener per worker per configured listener, builds the
//!   first [`pool::Snapshot`], starts the workers and turns SIGTERM/SIGINT into a drain.
//! - [`control`] is what the control side shares with the workers: the run state, the current
//!   snapshot (swapped whole, never edited), per-worker [`stats`], per-backend counters, and an
//!   eventfd doorbell per worker that says "look at the shared state". Its control thread runs
//!   [`health`] checks (HAProxy's rise/fall), takes workers' failed connects as failed checks,
//!   publishes a new snapshot when a backend goes up or down, and serves [`metrics`].
//! - [`worker`] is one pinned thread with its own [`ring`]: it accepts (multishot), picks a
//!   usable backend with its [`balance`] state (round robin, least connections, random two,
//!   Maglev over the snapshot's table), and drives every [`conn::Conn`] by turning
//!   completions into events and the connection's operations into submissions.
//! - [`spread`] decides how many workers take connections (`spread = "pack"`): the control
//!   thread watches the workers' CPU time, workers steer new connections to the workers in use
//!   and hand open connections to each other.
//! - [`conn`] is the per-connection state machine (connect with retries, relay both ways,
//!   half-close, reset, close after the last completion). It makes no syscalls.
//! - [`ring`] and [`sys`] hold all the `unsafe`: the io_uring wrapper, the provided-buffer ring,
//!   and the few syscalls made outside the ring.

pub mod admission;
pub mod balance;
pub mod config;
pub mod conn;
pub mod control;
pub mod health;
pub mod pool;
pub mod queue;
pub mod ring;
pub mod server;
pub mod spread;
pub mod stats;
pub mod sys;
pub mod worker;
