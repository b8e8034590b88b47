//! Taking connections in: the multishot accept of each listener (paused at `max_connections`
//! and, for a moment, when descriptors run out), then admission (access rules, per-source
//! limits), the handshake that reads a PROXY header or a ClientHello, and routing to a pool.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;

use io_uring::{opcode, types};

use super::gate::AcceptOp;
use super::slot::Slot;
use super::warn_limited;
use super::{Mode, Worker, is_resource_shortage};
use crate::admission::proxy_protocol;
use crate::admission::{Reason, Step};
use crate::conn::{Conn, End};
use crate::connlog;
use crate::ring::{Completion, GENERATION_MASK, Kind, Token};
use crate::sys;

impl Worker {
    pub(super) fn on_accept(&mut self, l: usize, c: Completion) {
        if !c.more() {
            self.misc_inflight -= 1;
        }
        self.gate.accept_completed(l, c.more());
        if c.result >= 0 {
            let fd = c.result;
            // One accepted before a drain cancelled the accept is served too: its client
            // completed the handshake and waits (with an upgrade, a new process serves those
            // still queued).
            if !self.closing_all {
                self.open_conn(l, fd);
            } else {
                sys::close(fd);
            }
        } else if c.result != -libc::ECANCELED {
            self.accept_failed(l, -c.result);
        }
        self.listener_settled(l);
    }

    /// Listener `l`'s readiness poll completed.
    pub(super) fn on_accept_poll(&mut self, l: usize, c: Completion) {
        self.misc_inflight -= 1;
        self.gate.poll_completed(l, c.result > 0);
        self.listener_settled(l);
    }

    /// After a listener's operation completed: close it if it is to stop (draining, or a
    /// reload removed it) and nothing is left in flight on it, else arm what it needs now.
    fn listener_settled(&mut self, l: usize) {
        let stopping = self.mode == Mode::Draining || self.gate.listeners[l].retired_at.is_some();
        if stopping && !self.gate.armed(l) {
            // Closing a listener does not end its operations: close it only now.
            self.gate.listeners[l].socket = None;
        }
        self.regate();
    }

    fn accept_failed(&mut self, l: usize, errno: i32) {
        self.stats().accept_errors.add(1);
        warn_limited!(
            self.gate.log,
            self.now,
            "worker {}: listener {}: accept failed: {}",
            self.index,
            self.gate.listeners[l].settings.name,
            io::Error::from_raw_os_error(errno)
        );
        if is_resource_shortage(errno) {
            self.pause_accepts();
        }
    }

    /// Arms and cancels accepts so that no listener takes more connections than fit: the
    /// worker's share of `max_connections` and each listener's own share (see [`AcceptGate`]).
    pub(super) fn regate(&mut self) {
        let room = self.max_connections.saturating_sub(self.conns.len());
        let mut ops = std::mem::take(&mut self.gate.ops);
        self.gate.plan(room, self.mode == Mode::Running, &mut ops);
        for op in ops.drain(..) {
            let (l, entry, kind) = match op {
                AcceptOp::Accept(l) => {
                    self.gate.to_accept.push(l);
                    continue;
                }
                AcceptOp::Cancel { l, poll } => {
                    let target = if poll { Kind::AcceptPoll } else { Kind::Accept };
                    let token = Token::new(target, l, 0).encode();
                    (l, opcode::AsyncCancel2::new(types::CancelBuilder::user_data(token)).build(), Kind::AcceptCancel)
                }
                AcceptOp::Multishot(l) | AcceptOp::Poll(l) => {
                    let Some(fd) = self.gate.listeners[l].socket.as_ref().map(|s| types::Fd(s.as_raw_fd())) else {
                        continue;
                    };
                    match op {
                        AcceptOp::Multishot(_) => (
                            l,
                            opcode::AcceptMulti::new(fd).flags(libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK).build(),
                            Kind::Accept,
                        ),
                        _ => (l, opcode::PollAdd::new(fd, libc::POLLIN as u32).build(), Kind::AcceptPoll),
                    }
                }
            };
            self.push_misc(entry, kind, l);
        }
        self.gate.ops = ops;
    }

    /// Accepts, with `accept4(2)`, from the listeners the gate asked for, while there is room;
    /// run once a batch of completions is handled.
    pub(super) fn accept_pending(&mut self) {
        while let Some(l) = self.gate.to_accept.pop() {
            loop {
                let room = self.max_connections.saturating_sub(self.conns.len());
                let fd = self.gate.listeners[l].socket.as_ref().map(AsRawFd::as_raw_fd);
                let Some(fd) = fd.filter(|_| room > 0 && self.gate.fits(l) && self.accepting()) else {
                    self.gate.stopped_accepting(l);
                    break;
                };
                match sys::accept(fd) {
                    Ok(client) => self.open_conn(l, client),
                    Err(errno) if errno == libc::EAGAIN => {
                        self.gate.accepted_all(l);
                        break;
                    }
                    // The client reset before it was accepted; the next may be there.
                    Err(errno) if errno == libc::ECONNABORTED || errno == libc::EINTR => {}
                    Err(errno) => {
                        self.gate.stopped_accepting(l);
                        self.accept_failed(l, errno);
                        break;
                    }
                }
            }
        }
        self.regate();
    }

    fn accepting(&self) -> bool {
        self.mode == Mode::Running && !self.gate.backed_off
    }

    /// Out of descriptors or memory: accepting more would only fail again (and spin), so stop
    /// every accept for a moment; the backoff timer re-arms them.
    pub(super) fn pause_accepts(&mut self) {
        if self.gate.backed_off || self.mode != Mode::Running {
            return;
        }
        self.gate.backed_off = true;
        self.stats().accept_backoffs.add(1);
        self.push_misc(opcode::Timeout::new(&self.timers.backoff).build(), Kind::AcceptBackoff, 0);
        self.regate();
    }

    /// Puts a connection into a slot under the next generation and counts it open here; the
    /// accepts follow the room left.
    pub(super) fn insert_conn(&mut self, mut entry: Slot) -> usize {
        entry.generation = self.next_generation;
        self.next_generation = (self.next_generation + 1) & GENERATION_MASK;
        self.gate.opened(entry.listener as usize);
        let slot = self.conns.insert(entry);
        self.stats().active.add(1);
        self.regate();
        slot
    }

    /// Takes the connection out of its slot and counts it closed here (freed, or handed to
    /// another worker); the accepts follow the room left.
    pub(super) fn remove_conn(&mut self, slot: usize) -> Slot {
        let entry = self.conns.remove(slot);
        self.gate.closed(entry.listener as usize);
        self.stats().active.sub(1);
        self.regate();
        entry
    }

    fn open_conn(&mut self, l: usize, fd: RawFd) {
        if self.conns.len() >= self.max_connections || !self.gate.fits(l) {
            // The gate arms no more accepts than fit; only a flood larger than the accept
            // queue during one wake-up of a multishot accept gets here. Over the limit the
            // operator set: refuse it.
            sys::close(fd);
            self.stats().over_limit.add(1);
            warn_limited!(
                self.gate.log,
                self.now,
                "worker {}: listener {}: at max_connections; closed a new connection",
                self.index,
                self.gate.listeners[l].settings.name,
            );
            return;
        }
        let settings = &self.gate.listeners[l].settings;
        let mut entry = Slot::new(
            Conn::new(fd, self.relay, self.now),
            l as u32,
            self.now,
            settings.idle_timeout.map(|d| d.as_millis() as u64),
            settings.handshake_timeout.as_millis() as u64,
        );
        if connlog::enabled() {
            // The connection log names the client even when it never reaches a backend.
            let peer = sys::peer_addr(fd).ok();
            if settings.admission.accept_proxy {
                entry.peer = peer;
            } else {
                entry.client = peer;
            }
        }
        let slot = self.insert_conn(entry);
        self.stats().accepted.add(1);
        // Without a PROXY header the connection's own peer is the client: check it at once.
        // With one, the check waits for the address the header carries (see examine), and
        // only the balancers in proxy_from may send one.
        let listener = &self.gate.listeners[l];
        if !listener.settings.admission.accept_proxy {
            if !self.admit(slot) {
                return;
            }
        } else if !listener.settings.proxy_from.is_empty() && !self.sent_by_trusted_proxy(slot) {
            return;
        }
        let admission = &self.gate.listeners[l].settings.admission;
        if admission.reads_first() {
            let capacity = admission.read_capacity();
            self.step(slot, |conn, ops| conn.start_handshake(capacity, ops));
        } else {
            let pool = admission.default_pool.unwrap_or(0);
            self.route(slot, pool, 0);
        }
    }

    /// Applies the listener's access rules and per-source limit to the client's address (the
    /// connection's own peer, or the one its PROXY header carried); rejects the connection and
    /// returns false if it may not go on.
    fn admit(&mut self, slot: usize) -> bool {
        let entry = &mut self.conns[slot];
        let l = entry.listener as usize;
        let limited = self.gate.listeners[l].settings.sources.is_some();
        if self.gate.listeners[l].settings.access.is_empty() && !limited {
            return true;
        }
        if entry.client.is_none() {
            entry.client = sys::peer_addr(entry.conn.client_fd()).ok();
        }
        let Some(client) = entry.client else { return true };
        let refusal = if !self.gate.listeners[l].settings.access.permits(client.ip()) {
            self.stats().refused_access.add(1);
            Some("not allowed by the listener's allow/deny rules")
        } else if let Some(limit) = &self.gate.listeners[l].settings.sources {
            if limit.try_acquire(client.ip()) {
                entry.source = Some(Arc::clone(limit));
                None
            } else {
                self.stats().refused_source_limit.add(1);
                Some("over max_conns_per_source")
            }
        } else {
            None
        };
        let Some(why) = refusal else { return true };
        self.refuse(slot, client.ip(), why);
        false
    }

    /// With `proxy_from`: the connection's own peer must be one of the balancers allowed to
    /// send a PROXY header; rejects it and returns false otherwise.
    fn sent_by_trusted_proxy(&mut self, slot: usize) -> bool {
        let entry = &self.conns[slot];
        let listener = &self.gate.listeners[entry.listener as usize];
        let peer = sys::peer_addr(entry.conn.client_fd()).ok();
        if peer.is_some_and(|peer| listener.settings.proxy_from.iter().any(|net| net.contains(peer.ip()))) {
            return true;
        }
        self.stats().refused_proxy_source.add(1);
        let ip = peer.map_or(std::net::IpAddr::from([0, 0, 0, 0]), |p| p.ip());
        self.refuse(slot, ip, "may not send a PROXY header (not in the listener's proxy_from)");
        false
    }

    /// Resets a connection refused before any byte was read from it, and says so (at most once
    /// a second per worker).
    fn refuse(&mut self, slot: usize, ip: std::net::IpAddr, why: &str) {
        warn_limited!(
            self.refuse_log,
            self.now,
            "worker {}: listener {}: refused {ip}: {why}",
            self.index,
            self.gate.listeners[self.conns[slot].listener as usize].settings.name,
        );
        self.step(slot, |conn, ops| conn.reject(End::Refused, ops));
    }

    /// The connection's prefix grew: route it if its PROXY header and ClientHello say enough.
    pub(super) fn examine(&mut self, slot: usize) {
        let entry = &self.conns[slot];
        let l = entry.listener as usize;
        let Some(prefix) = entry.conn.prefix() else { return };
        match self.gate.listeners[l].settings.admission.examine(prefix.received(), !prefix.has_room()) {
            Step::NeedMore => self.step(slot, |conn, ops| conn.read_prefix(ops)),
            Step::Reject(reason) => {
                if let Reason::NoRoute(name) = &reason {
                    self.conns[slot].sni = Some(name.as_str().into());
                }
                self.reject_handshake(slot, End::HandshakeFailed, reason)
            }
            Step::Route { pool, skip, carried, server_name } => {
                let entry = &mut self.conns[slot];
                if let Some((client, local)) = carried {
                    entry.client = Some(client);
                    entry.local = Some(local);
                }
                entry.sni = server_name.map(String::into_boxed_str);
                if self.gate.listeners[l].settings.admission.accept_proxy && !self.admit(slot) {
                    return;
                }
                self.route(slot, pool, skip);
            }
        }
    }

    /// Ends a connection whose handshake failed (`end`: `HandshakeFailed` or
    /// `HandshakeTimeout`), saying why.
    pub(super) fn reject_handshake(&mut self, slot: usize, end: End, why: impl std::fmt::Display) {
        self.stats().handshake_failed.add(1);
        let entry = &self.conns[slot];
        warn_limited!(
            self.refuse_log,
            self.now,
            "worker {}: listener {}: closed a connection from {}: {why}",
            self.index,
            self.gate.listeners[entry.listener as usize].settings.name,
            entry
                .client
                .or_else(|| sys::peer_addr(entry.conn.client_fd()).ok())
                .map_or_else(|| "?".to_string(), |p| p.to_string()),
        );
        self.step(slot, |conn, ops| conn.reject(end, ops));
    }

    /// Sends the connection on to `pool`: sets what goes to the backend first (an outgoing
    /// PROXY header; the client bytes read, less the `skip` bytes of incoming header) and
    /// starts connecting.
    fn route(&mut self, slot: usize, pool_index: usize, skip: usize) {
        let pool = &self.snapshot.pools[pool_index];
        let attempts = pool.usable().len() as u32;
        let send_proxy = pool.settings.send_proxy;
        let needs_client = self.pickers[pool_index].needs_client() || send_proxy.is_some();
        let entry = &mut self.conns[slot];
        entry.routed = true;
        entry.pool = pool_index as u32;
        entry.layout = self.snapshot.layout;
        let fd = entry.conn.client_fd();
        if needs_client && entry.client.is_none() {
            entry.client = sys::peer_addr(fd).ok();
        }
        if let Some(version) = send_proxy {
            if entry.local.is_none() {
                entry.local = sys::local_addr(fd).ok();
            }
            let (Some(client), Some(local)) = (entry.client, entry.local) else {
                // Neither address can be had only when the client is gone already: without
                // them there is no header to send, and the backend must not get the client's
                // own (incoming) header in its place.
                self.step(slot, |conn, ops| conn.reject(End::ClientGone, ops));
                return;
            };
            let header = proxy_protocol::encode(version, client, local);
            entry.conn.prepare_prefix(skip, Some(header.as_bytes()));
        } else {
            entry.conn.prepare_prefix(skip, None);
        }
        self.step(slot, |conn, ops| conn.route(attempts, ops));
    }
}
