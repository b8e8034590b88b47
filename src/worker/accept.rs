//! Taking connections in: the multishot accept of each listener (paused at `max_connections`
//! and, for a moment, when descriptors run out), then admission (access rules, per-source
//! limits), the handshake that reads a PROXY header or a ClientHello, and routing to a pool.

use std::io;
use std::os::fd::RawFd;

use io_uring::{opcode, types};
use log::warn;

use super::{Mode, Worker, is_resource_shortage};
use crate::admission::Step;
use crate::conn::{Conn, End, Prefix};
use crate::proxy_protocol;
use crate::ring::{Completion, GENERATION_MASK, Kind, Token};
use crate::sys;

impl Worker {
    pub(super) fn on_accept(&mut self, l: usize, c: Completion) {
        if !c.more() {
            self.misc_inflight -= 1;
            self.listeners[l].accept_armed = false;
        }
        if c.result >= 0 {
            let fd = c.result;
            if self.mode == Mode::Running {
                self.open_conn(l, fd);
            } else {
                sys::close(fd);
            }
        } else if c.result != -libc::ECANCELED {
            let errno = -c.result;
            self.stats().accept_errors.add(1);
            if let Some(suppressed) = self.accept_log.allow(self.now) {
                warn!(
                    "worker {}: listener {}: accept failed: {} ({suppressed} more since the last message)",
                    self.index,
                    self.listeners[l].name,
                    io::Error::from_raw_os_error(errno)
                );
            }
            if is_resource_shortage(errno) && !c.more() {
                self.pause_accepts();
                return;
            }
        }
        if !self.listeners[l].accept_armed {
            if self.mode == Mode::Running {
                self.resume_accepts();
            } else {
                self.listeners[l].socket = None;
            }
        }
    }

    /// Whether the listeners should have an accept armed now.
    fn accepting(&self) -> bool {
        self.mode == Mode::Running && !self.accept_backoff_armed && !self.at_capacity
    }

    /// Arms every listener's accept if accepting is wanted and it is not armed yet.
    pub(super) fn resume_accepts(&mut self) {
        if self.accepting() {
            for l in 0..self.listeners.len() {
                self.arm_accept(l);
            }
        }
    }

    /// Cancels every armed accept; new connections wait in the kernel's backlog. The accepts'
    /// last completions come back with ECANCELED and are not re-armed while paused.
    pub(super) fn cancel_accepts(&mut self) {
        for l in 0..self.listeners.len() {
            if self.listeners[l].accept_armed {
                let token = Token::new(Kind::Accept, l, 0).encode();
                self.push_misc(
                    opcode::AsyncCancel2::new(types::CancelBuilder::user_data(token)).build(),
                    Kind::AcceptCancel,
                    l,
                );
            }
        }
    }

    /// Out of descriptors or memory: accepting more would only fail again (and spin), so stop
    /// every accept for a moment; the backoff timer re-arms them.
    pub(super) fn pause_accepts(&mut self) {
        if self.accept_backoff_armed || self.mode != Mode::Running {
            return;
        }
        self.accept_backoff_armed = true;
        self.push_misc(opcode::Timeout::new(&self.timers.backoff).build(), Kind::AcceptBackoff, 0);
        self.cancel_accepts();
    }

    /// Puts the connection `make` builds for the next generation into a slot and counts it
    /// open; at `max_connections` open, stops accepting until one closes.
    pub(super) fn insert_conn(&mut self, make: impl FnOnce(u32) -> Conn) -> usize {
        let generation = self.next_generation;
        self.next_generation = (self.next_generation + 1) & GENERATION_MASK;
        let slot = self.conns.insert(make(generation));
        self.stats().active.add(1);
        if self.conns.len() >= self.max_connections && !self.at_capacity {
            self.at_capacity = true;
            self.cancel_accepts();
        }
        slot
    }

    /// Takes the connection out of its slot and counts it closed here (freed, or handed to
    /// another worker); below `max_connections` again, accepts again.
    pub(super) fn remove_conn(&mut self, slot: usize) -> Conn {
        let conn = self.conns.remove(slot);
        self.stats().active.sub(1);
        if self.at_capacity && self.conns.len() < self.max_connections {
            self.at_capacity = false;
            self.resume_accepts();
        }
        conn
    }

    fn open_conn(&mut self, l: usize, fd: RawFd) {
        if self.conns.len() >= self.max_connections {
            // Accepted in the same batch as the one that reached the cap, before the cancel
            // took effect: over the limit the operator set, so refuse it.
            sys::close(fd);
            self.stats().over_limit.add(1);
            if let Some(suppressed) = self.accept_log.allow(self.now) {
                warn!(
                    "worker {}: listener {}: {} connections open (max_connections); closed a new one ({suppressed} more since the last message)",
                    self.index,
                    self.listeners[l].name,
                    self.conns.len()
                );
            }
            return;
        }
        let (relay, now) = (self.relay, self.now);
        let slot = self.insert_conn(|generation| Conn::new(generation, fd, l as u32, relay, now));
        self.stats().accepted.add(1);
        // Without a PROXY header the connection's own peer is the client: check it at once.
        // With one, the check waits for the address the header carries (see examine).
        if !self.listeners[l].admission.accept_proxy && !self.admit(slot) {
            return;
        }
        let admission = &self.listeners[l].admission;
        if admission.reads_first() {
            let capacity = admission.read_capacity();
            self.step(slot, |conn, ops| {
                conn.prefix = Some(Prefix::new(capacity));
                conn.read_prefix(ops);
            });
        } else {
            let pool = admission.default_pool.unwrap_or(0);
            self.route(slot, pool, 0);
        }
    }

    /// Applies the listener's access rules and per-source limit to the client's address (the
    /// connection's own peer, or the one its PROXY header carried); rejects the connection and
    /// returns false if it may not go on.
    fn admit(&mut self, slot: usize) -> bool {
        let conn = &mut self.conns[slot];
        let l = conn.listener as usize;
        let limited = self.shared.sources[l].is_some();
        if self.listeners[l].access.is_empty() && !limited {
            return true;
        }
        if conn.client_addr.is_none() {
            conn.client_addr = sys::peer_addr(conn.client).ok();
        }
        let Some(client) = conn.client_addr else { return true };
        let refusal = if !self.listeners[l].access.permits(client.ip()) {
            self.stats().refused_access.add(1);
            Some("not allowed by the listener's allow/deny rules")
        } else if let Some(limit) = &self.shared.sources[l] {
            if limit.try_acquire(client.ip()) {
                conn.source_counted = true;
                None
            } else {
                self.stats().refused_source_limit.add(1);
                Some("over max_conns_per_source")
            }
        } else {
            None
        };
        let Some(why) = refusal else { return true };
        if let Some(suppressed) = self.refuse_log.allow(self.now) {
            warn!(
                "worker {}: listener {}: refused {}: {why} ({suppressed} more refusals since the last message)",
                self.index,
                self.listeners[l].name,
                client.ip()
            );
        }
        self.step(slot, |conn, ops| conn.reject(End::Refused, ops));
        false
    }

    /// The connection's prefix grew: route it if its PROXY header and ClientHello say enough.
    pub(super) fn examine(&mut self, slot: usize) {
        let conn = &self.conns[slot];
        let l = conn.listener as usize;
        let Some(prefix) = conn.prefix.as_ref() else { return };
        match self.listeners[l].admission.examine(prefix.received(), !prefix.has_room()) {
            Step::NeedMore => self.step(slot, |conn, ops| conn.read_prefix(ops)),
            Step::Reject(reason) => self.reject_handshake(slot, reason),
            Step::Route { pool, skip, carried } => {
                if let Some((client, local)) = carried {
                    let conn = &mut self.conns[slot];
                    conn.client_addr = Some(client);
                    conn.local_addr = Some(local);
                }
                if self.listeners[l].admission.accept_proxy && !self.admit(slot) {
                    return;
                }
                self.route(slot, pool, skip);
            }
        }
    }

    pub(super) fn reject_handshake(&mut self, slot: usize, why: impl std::fmt::Display) {
        self.stats().handshake_failed.add(1);
        if let Some(suppressed) = self.refuse_log.allow(self.now) {
            let conn = &self.conns[slot];
            let peer = conn.client_addr.or_else(|| sys::peer_addr(conn.client).ok());
            warn!(
                "worker {}: listener {}: closed a connection from {}: {why} ({suppressed} more refusals since the last message)",
                self.index,
                self.listeners[conn.listener as usize].name,
                peer.map_or_else(|| "?".to_string(), |p| p.to_string()),
            );
        }
        self.step(slot, |conn, ops| conn.reject(End::HandshakeFailed, ops));
    }

    /// Sends the connection on to `pool`: sets what goes to the backend first (an outgoing
    /// PROXY header; the client bytes read, less the `skip` bytes of incoming header) and
    /// starts connecting.
    fn route(&mut self, slot: usize, pool_index: usize, skip: usize) {
        let pool = &self.snapshot.pools[pool_index];
        let attempts = pool.usable().len() as u32;
        let send_proxy = pool.send_proxy;
        let needs_client = self.pickers[pool_index].needs_client() || send_proxy.is_some();
        let conn = &mut self.conns[slot];
        if needs_client && conn.client_addr.is_none() {
            conn.client_addr = sys::peer_addr(conn.client).ok();
        }
        if let Some(version) = send_proxy {
            if conn.local_addr.is_none() {
                conn.local_addr = sys::local_addr(conn.client).ok();
            }
            if let (Some(client), Some(local)) = (conn.client_addr, conn.local_addr) {
                let header = proxy_protocol::encode(version, client, local);
                conn.prefix.get_or_insert_with(|| Prefix::new(0)).prepare(skip, header.as_bytes());
            }
        } else if let Some(prefix) = conn.prefix.as_mut() {
            prefix.prepare(skip, &[]);
        }
        self.step(slot, |conn, ops| conn.route(pool_index as u32, attempts, ops));
    }
}
