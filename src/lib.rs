//! ringlb: a layer-4 TCP load balancer on io_uring, one ring per core.
//!
//! How the pieces fit, in the order a connection meets them (docs/ARCHITECTURE.md has the
//! picture, the threads and the measured facts behind them):
//!
//! - [`config`] reads the TOML file and validates it into a typed [`config::Config`] (`raw`
//!   mirrors the file, `validate` types it, `host` checks it against this host); nothing past
//!   startup sees config types, and the domain enums it uses live in their own modules.
//! - [`server`] binds one SO_REUSEPORT listener per worker per configured listener, builds the
//!   first [`pool::Snapshot`], starts the workers and the control thread, and turns signals
//!   into a drain.
//! - [`control`] is what the control side shares with the workers ([`control::Shared`]: the
//!   run state, the current snapshot, per-worker [`stats`], a doorbell per worker) and the
//!   control thread ([`control::thread`]): [`health`] checks (TCP, or a MySQL or PostgreSQL
//!   login), snapshots published when a backend goes up or down, backend names looked up
//!   ([`control::dns`]), reloads ([`control::reload`]), and the HTTP server
//!   ([`control::http`]) of the metrics page ([`control::metrics`]), the status page and the
//!   admin API ([`control::api`]).
//! - [`pool`] is the immutable snapshot the workers read: each pool's backends with their
//!   shared counters, health, Maglev table and backend [`queue`].
//! - [`worker`] is one pinned thread with its own [`ring`]: its accept gate takes in what fits
//!   (`worker::gate`), [`admission`] rules and parsers (access lists, per-source limits, PROXY
//!   protocol, TLS server names) decide where a connection goes, a [`balance`] picker chooses
//!   the backend, and the worker drives every connection by turning completions into events
//!   and the connection's operations into submissions.
//! - [`conn`] is the per-connection state machine (connect with retries, relay both ways,
//!   half-close, reset, close after the last completion). It makes no syscalls.
//! - [`queue`] serves connections waiting for a backend below its `max_conns`, first come,
//!   first served over all workers.
//! - [`spread`] holds everything `spread = "pack"` needs (the default, `even`, uses none of
//!   it): the policy, CPU clocks, the steering program and the hand-over between workers.
//! - [`logger`] writes every log line from one thread, so a slow stderr never stops a worker;
//!   [`connlog`] is the line per connection.
//! - [`stats`] are per-worker counters; [`ring`] and [`sys`] hold the io_uring wrapper and the
//!   few syscalls made outside the ring, and with them almost all the `unsafe` (the rest is
//!   the worker's three submission points, each saying what keeps its memory alive).

pub mod admission;
pub mod balance;
pub mod config;
pub mod conn;
pub mod connlog;
pub mod control;
pub mod ctl;
pub mod health;
pub mod logger;
pub mod pool;
pub mod queue;
pub mod ring;
pub mod server;
pub mod spread;
pub mod stats;
pub mod sys;
pub mod worker;
