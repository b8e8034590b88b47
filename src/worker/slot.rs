//! A connection as its worker holds it: the state machine ([`Conn`], which makes no syscalls
//! and knows nothing of pools, listeners or pipes) and the worker's own bookkeeping for it. A
//! slot moves whole when a connection is handed to another worker.

use std::net::SocketAddr;
use std::sync::Arc;

use crate::admission::sources::SourceLimit;
use crate::balance::BackendCounters;
use crate::conn::Conn;
use crate::pool::Pool;

/// A backend slot a connection holds (an active count on that backend): for its connect, and
/// while it relays.
#[derive(Debug, Clone)]
pub(super) struct Held {
    /// The backend's index in its pool.
    pub index: u32,
    /// How many times that backend had been marked down when the connection took the slot
    /// ([`crate::pool::Pool::cuts`]).
    pub downs: u32,
    /// The backend's counters, where the slot is given back (also after the backend left the
    /// config).
    pub counters: Arc<BackendCounters>,
    /// Its address, for logs and the admin API (also after it left the config).
    pub address: SocketAddr,
}

impl Held {
    /// A slot on backend `index` of `pool`.
    pub fn new(pool: &Pool, index: usize) -> Held {
        let backend = &pool.backends[index];
        Held {
            index: index as u32,
            downs: pool.downs[index],
            counters: Arc::clone(&backend.counters),
            address: backend.address,
        }
    }
}

/// One connection in a worker's slab.
#[derive(Debug)]
pub struct Slot {
    pub(super) conn: Conn,
    /// Tags its operations' `user_data`: a new one for every slot it takes (see
    /// [`crate::ring::Token`]).
    pub(super) generation: u32,
    /// Index of the listener that accepted it.
    pub(super) listener: u32,
    /// The client's address, when something needs it (access rules, Maglev, PROXY headers,
    /// the connection log); with `accept_proxy`, the address the header carried.
    pub(super) client: Option<SocketAddr>,
    /// The TCP peer, when the connection log needs it and it differs from `client` (a PROXY
    /// header carried another).
    pub(super) peer: Option<SocketAddr>,
    /// The TLS server name its ClientHello carried, when a listener routes by it.
    pub(super) sni: Option<Box<str>>,
    /// Worker clock (ms): when it was accepted, and when its first connect started.
    pub(super) accepted_at: u64,
    pub(super) connect_started: Option<u64>,
    /// Time from the first connect to the one that succeeded, once connected.
    pub(super) connect_ms: Option<u64>,
    /// Time spent in backend queues so far.
    pub(super) queued_ms: u64,
    /// Bytes each way already added to its backend's counters.
    pub(super) reported: [u64; 2],
    /// The address the client connected to (for outgoing PROXY headers).
    pub(super) local: Option<SocketAddr>,
    /// The per-source limit it holds a count in, if any (its listener's when it was admitted).
    pub(super) source: Option<Arc<SourceLimit>>,
    /// Its listener's timeouts when it was accepted (a reload changes them for new ones only):
    /// no byte either way for this long closes it; its PROXY header and ClientHello must be in
    /// within the other.
    pub(super) idle_timeout_ms: Option<u64>,
    pub(super) handshake_timeout_ms: u64,
    /// When it started waiting in its pool's queue, if it waits.
    pub(super) queued_since: Option<u64>,
    /// Whether it was routed to a pool (`pool`).
    pub(super) routed: bool,
    /// Index of the pool it was routed to, in snapshot layout `layout` (a reload renumbers).
    pub(super) pool: u32,
    pub(super) layout: u64,
    /// The backend slot it holds, if any.
    pub(super) backend: Option<Held>,
    /// Backends it could not reach, in the order tried: a retry skips them. Empty (no
    /// allocation) unless a connect failed.
    pub(super) failed: Vec<u32>,
    /// Splice mode: the worker's pipe each direction holds, by index.
    pub(super) pipes: [Option<u32>; 2],
}

impl Slot {
    /// A connection just accepted (at `now`) through listener `listener`, with its timeouts.
    pub(super) fn new(
        conn: Conn,
        listener: u32,
        now: u64,
        idle_timeout_ms: Option<u64>,
        handshake_timeout_ms: u64,
    ) -> Slot {
        Slot {
            conn,
            generation: 0,
            listener,
            client: None,
            peer: None,
            sni: None,
            accepted_at: now,
            connect_started: None,
            connect_ms: None,
            queued_ms: 0,
            reported: [0; 2],
            local: None,
            source: None,
            idle_timeout_ms,
            handshake_timeout_ms,
            queued_since: None,
            routed: false,
            pool: 0,
            layout: 0,
            backend: None,
            failed: Vec::new(),
            pipes: [None; 2],
        }
    }

    /// It leaves its pool's queue at `now` (served, given up or closed); returns whether it
    /// was waiting.
    pub(super) fn leave_queue(&mut self, now: u64) -> bool {
        match self.queued_since.take() {
            Some(since) => {
                self.queued_ms += now.saturating_sub(since);
                true
            }
            None => false,
        }
    }

    /// Adds the bytes relayed since the last report to its backend's counters.
    pub(super) fn report_bytes(&mut self) {
        let bytes = self.conn.bytes();
        if let Some(held) = &self.backend
            && bytes != self.reported
        {
            held.counters.add_bytes(bytes[0] - self.reported[0], bytes[1] - self.reported[1]);
            self.reported = bytes;
        }
    }
}
