//! Carrying out what connections ask for: completions decoded into [`Event`]s, each [`Op`] turned
//! into a ring entry or a direct syscall (shutdown, splice), backend connects under a linked
//! timeout, pipes and buffers handed out and taken back, backend slots and their queues, and
//! freeing a slot once its last completion is in.

use std::io;
use std::os::fd::AsRawFd;
use std::sync::atomic::Ordering;

use io_uring::{opcode, types};
use log::{debug, error};

use super::reload::NO_BACKEND;
use super::slot::Held;
use super::{Worker, is_resource_shortage, warn_limited};
use crate::conn::{Conn, Dir, End, Event, Notice, Op};
use crate::connlog;
use crate::control::ControlEvent;
use crate::queue::Taken;
use crate::ring::{self, Completion, Kind, Token};
use crate::sys;

impl Worker {
    pub(super) fn on_conn_completion(&mut self, token: Token, c: Completion) {
        let slot = token.slot as usize;
        match self.conns.get(slot) {
            Some(entry) if entry.generation == token.generation => {}
            _ => {
                // Cannot happen while slots outlive their operations; recover the buffer anyway.
                error!("worker {}: completion {:?} for a freed connection", self.index, token.kind);
                debug_assert!(false, "completion for a freed slot");
                if let Some(buf) = c.buffer() {
                    self.recycle(buf);
                }
                return;
            }
        }
        let event = match token.kind {
            Kind::Connect => Event::Connected(c.result),
            Kind::ConnectTimeout => Event::ConnectTimerDone,
            Kind::RecvPrefix => Event::PrefixRead { result: c.result },
            Kind::RecvUp | Kind::RecvDown => {
                let dir = if token.kind == Kind::RecvUp { Dir::Up } else { Dir::Down };
                let result = c.result;
                if result == -libc::ENOBUFS {
                    self.stats().buffer_waits.add(1);
                }
                self.count_relayed(dir, result);
                let full = result > 0 && result as u32 == self.bufs.buffer_size();
                Event::Received { dir, result, buf: c.buffer(), full, more: c.more() }
            }
            Kind::SendUp => Event::Sent { dir: Dir::Up, result: c.result },
            Kind::SendDown => Event::Sent { dir: Dir::Down, result: c.result },
            Kind::PollUp => Event::Writable { dir: Dir::Up },
            Kind::PollDown => Event::Writable { dir: Dir::Down },
            Kind::PollInUp => Event::Readable { dir: Dir::Up, result: c.result },
            Kind::PollInDown => Event::Readable { dir: Dir::Down, result: c.result },
            Kind::Watch => Event::ClientGone { result: c.result },
            Kind::Cancel | Kind::Park | Kind::StopWatch => Event::Cancelled,
            Kind::StopRecv => {
                // -ENOENT: the receive had ended on its own meanwhile.
                if c.result == 0 {
                    self.stats().receive_stops.add(1);
                }
                Event::Cancelled
            }
            Kind::Close => Event::Closed,
            _ => unreachable!("worker-level kinds are dispatched before"),
        };
        let now = self.now;
        // Which backend a connect result is about, before the step moves on to the next one.
        let attempt = (token.kind == Kind::Connect).then(|| {
            let entry = &self.conns[slot];
            (entry.pool as usize, entry.backend.as_ref().map_or(0, |held| held.index as usize))
        });
        if let Some((_, backend)) = attempt
            && c.result < 0
        {
            // A failed connect gives its backend slot back, and the retry skips the backend.
            self.conns[slot].failed.push(backend as u32);
            self.release_slot(slot);
        }
        let mut notice = None;
        self.step(slot, |conn, ops| notice = conn.on_event(event, now, ops));
        match notice {
            Some(Notice::ConnectFailed(errno)) => self.connect_failed(attempt, errno),
            Some(Notice::PrefixGrew) => self.examine(slot),
            Some(Notice::Movable) => self.move_away(slot),
            Some(Notice::Connected) => {
                let entry = &mut self.conns[slot];
                entry.connect_ms = entry.connect_started.map(|t| now.saturating_sub(t));
            }
            None => {}
        }
    }

    fn connect_failed(&mut self, failed: Option<(usize, usize)>, errno: i32) {
        self.stats().connect_failed.add(1);
        // A reload may have removed the pool or backend since the connect started.
        let failed =
            failed.filter(|&(pool, backend)| self.snapshot.pools.get(pool).is_some_and(|p| backend < p.backends.len()));
        if let Some((pool, backend)) = failed {
            self.snapshot.pools[pool].backends[backend].counters.failures.fetch_add(1, Ordering::Relaxed);
            // A shortage of local ports says nothing about the backend.
            if errno != libc::EADDRNOTAVAIL {
                let layout = self.snapshot.layout;
                self.shared.notify(ControlEvent::ConnectFailed { layout, pool, backend, errno });
            }
        }
        let (pool, backend) = match failed {
            Some((pool, backend)) => {
                let pool = &self.snapshot.pools[pool];
                (pool.settings.name.as_str(), pool.backends.get(backend).map(|b| b.name.as_str()))
            }
            None => ("?", None),
        };
        warn_limited!(
            self.connect_log,
            self.now,
            "worker {}: pool {pool}: connect to backend {} failed: {}",
            self.index,
            backend.unwrap_or("?"),
            io::Error::from_raw_os_error(errno)
        );
    }

    /// Runs one step of a connection and carries out the operations it returns (which may
    /// feed more steps, e.g. when no socket can be opened).
    /// Counts bytes a receive or splice moved in `dir` (`result` > 0) in the live metrics.
    fn count_relayed(&self, dir: Dir, result: i32) {
        if result > 0 {
            let stats = self.stats();
            match dir {
                Dir::Up => stats.bytes_up.add(result as u64),
                Dir::Down => stats.bytes_down.add(result as u64),
            }
        }
    }

    pub(super) fn step(&mut self, slot: usize, f: impl FnOnce(&mut Conn, &mut Vec<Op>)) {
        let mut ops = std::mem::take(&mut self.ops);
        f(&mut self.conns[slot].conn, &mut ops);
        let mut i = 0;
        while i < ops.len() {
            let op = ops[i];
            i += 1;
            self.execute(slot, op, &mut ops);
        }
        ops.clear();
        self.ops = ops;
    }

    fn execute(&mut self, slot: usize, op: Op, ops: &mut Vec<Op>) {
        let generation = self.conns[slot].generation;
        let token = |kind: Kind| Token::new(kind, slot, generation).encode();
        // A cancel of this connection's operation of kind `target`, completing as `kind`.
        let cancel = |target: Kind, kind: Kind| {
            opcode::AsyncCancel2::new(types::CancelBuilder::user_data(token(target))).build().user_data(token(kind))
        };
        let entry = match op {
            Op::Connect => return self.connect(slot, ops),
            Op::ReadPrefix { fd } => {
                let prefix = self.conns[slot].conn.prefix_mut().expect("read_prefix sets a prefix");
                let (ptr, len) = prefix.free_space();
                opcode::Recv::new(types::Fd(fd), ptr, len).build().user_data(token(Kind::RecvPrefix))
            }
            Op::SendPrefix { fd } => {
                let pending = self.conns[slot].conn.prefix().expect("a prefix to send").pending();
                opcode::Send::new(types::Fd(fd), pending.as_ptr(), pending.len() as u32)
                    .flags(libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT)
                    .build()
                    .user_data(token(Kind::SendUp))
            }
            Op::Recv { dir, fd } => ring::recv_multishot(fd, self.bufs.group(), self.recv_limit)
                .user_data(token(by_dir(dir, Kind::RecvUp, Kind::RecvDown))),
            Op::StopRecv { dir } => cancel(by_dir(dir, Kind::RecvUp, Kind::RecvDown), Kind::StopRecv),
            Op::Park { dir, poll: false } => cancel(by_dir(dir, Kind::RecvUp, Kind::RecvDown), Kind::Park),
            Op::Park { dir, poll: true } => cancel(by_dir(dir, Kind::PollInUp, Kind::PollInDown), Kind::Park),
            Op::Send { dir, fd, buf, offset, len } => {
                let ptr = self.bufs.ptr_at(buf, offset);
                // MSG_DONTWAIT: a full socket answers EAGAIN (then WaitWritable) instead of
                // the kernel moving the send to an io-wq thread.
                opcode::Send::new(types::Fd(fd), ptr, len - offset)
                    .flags(libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT)
                    .build()
                    .user_data(token(by_dir(dir, Kind::SendUp, Kind::SendDown)))
            }
            Op::WaitWritable { dir, fd } => opcode::PollAdd::new(types::Fd(fd), libc::POLLOUT as u32)
                .build()
                .user_data(token(by_dir(dir, Kind::PollUp, Kind::PollDown))),
            Op::PollIn { dir, fd } => opcode::PollAdd::new(types::Fd(fd), libc::POLLIN as u32)
                .build()
                .user_data(token(by_dir(dir, Kind::PollInUp, Kind::PollInDown))),
            Op::SpliceIn { dir, fd } => {
                let held = &mut self.conns[slot].pipes[dir as usize];
                let result = match self.pipes.take(*held) {
                    Ok((index, pipe, size)) => {
                        *held = Some(index);
                        sys::splice(fd, pipe.write.as_raw_fd(), size as usize)
                    }
                    Err(errno) => -errno,
                };
                if result == -libc::ENOBUFS {
                    self.stats().pipe_shortages.add(1);
                }
                self.count_relayed(dir, result);
                let now = self.now;
                return self.conns[slot].conn.spliced_in(dir, result, now, ops);
            }
            Op::SpliceOut { dir, fd, len } => {
                let result = match self.conns[slot].pipes[dir as usize].and_then(|p| self.pipes.get(p)) {
                    Some(pipe) => sys::splice(pipe.read.as_raw_fd(), fd, len as usize),
                    None => -libc::EBADF,
                };
                let now = self.now;
                return self.conns[slot].conn.spliced_out(dir, result, now, ops);
            }
            Op::ReleasePipe(dir) => {
                if let Some(index) = self.conns[slot].pipes[dir as usize].take() {
                    self.pipes.give_back(index);
                }
                return;
            }
            Op::Shutdown { fd } => {
                if let Err(e) = sys::shutdown_write(fd) {
                    // The peer is already gone; the other direction will see it.
                    debug!("worker {}: shutdown of fd {fd}: {e}", self.index);
                }
                return;
            }
            Op::WatchClient { fd } => opcode::PollAdd::new(types::Fd(fd), (libc::POLLERR | libc::POLLHUP) as u32)
                .build()
                .user_data(token(Kind::Watch)),
            Op::StopWatch => cancel(Kind::Watch, Kind::StopWatch),
            Op::Cancel { fd } => opcode::AsyncCancel2::new(types::CancelBuilder::fd(types::Fd(fd)).all())
                .build()
                .user_data(token(Kind::Cancel)),
            Op::Close { fd, reset } => {
                if reset && let Err(e) = sys::set_linger_zero(fd) {
                    debug!("worker {}: SO_LINGER on fd {fd}: {e}", self.index);
                }
                opcode::Close::new(types::Fd(fd)).build().user_data(token(Kind::Close))
            }
            Op::Recycle(buf) => return self.recycle(buf),
            Op::WaitForBuffer(dir) => {
                return self.waiters.starve(slot, generation, dir);
            }
            Op::Free => return self.free(slot),
        };
        // SAFETY: the entry points into a ring buffer held by this connection's direction
        // until the send completes, into the connection's boxed prefix, which it frees only
        // after the operation's completion, or at nothing at all.
        unsafe { self.ring.push(entry) };
    }

    fn connect(&mut self, slot: usize, ops: &mut Vec<Op>) {
        let entry = &self.conns[slot];
        let pool_index = entry.pool as usize;
        if pool_index >= self.snapshot.pools.len() {
            // A reload removed its pool while it was connecting.
            return self.conns[slot].conn.no_backend_left(ops);
        }
        let backend_index = if let Some(held) = entry.backend.as_ref().filter(|held| held.index != NO_BACKEND) {
            // Reserved for it when it left the queue.
            held.index as usize
        } else {
            let pool = &self.snapshot.pools[pool_index];
            // A new connection queues behind those already waiting (in any worker).
            let behind = pool.limited && entry.failed.is_empty() && pool.queue.waiting() > 0;
            match if behind { Taken::Full } else { self.take_backend(slot) } {
                Taken::Backend(backend) => backend,
                Taken::Full => return self.enqueue(slot),
                Taken::Exhausted => return self.conns[slot].conn.no_backend_left(ops),
            }
        };
        let pool = &self.snapshot.pools[pool_index];
        let entry = &mut self.conns[slot];
        let backend = &pool.backends[backend_index];
        entry.backend = Some(Held::new(pool, backend_index));
        entry.connect_started.get_or_insert(self.now);
        match sys::backend_socket(&backend.sockaddr) {
            Ok(fd) => {
                backend.counters.connections.fetch_add(1, Ordering::Relaxed);
                entry.conn.backend_opened(fd);
                let token = |kind| Token::new(kind, slot, entry.generation).encode();
                let connect =
                    opcode::Connect::new(types::Fd(fd), backend.sockaddr.as_ptr().cast(), backend.sockaddr.len())
                        .build()
                        .user_data(token(Kind::Connect));
                let timeout =
                    opcode::LinkTimeout::new(&pool.connect_timespec).build().user_data(token(Kind::ConnectTimeout));
                // SAFETY: the address and the timespec live in the snapshot, kept (in
                // `retired` if replaced) until this submission, when the kernel copies them.
                unsafe { self.ring.push_linked(connect, timeout) };
            }
            Err(e) => {
                warn_limited!(
                    self.connect_log,
                    self.now,
                    "worker {}: cannot open a socket for pool {}: {e}",
                    self.index,
                    pool.settings.name
                );
                self.release_slot(slot);
                self.conns[slot].conn.socket_failed(ops);
                if e.raw_os_error().is_some_and(is_resource_shortage) {
                    self.pause_accepts();
                }
            }
        }
    }

    /// Takes a slot for the connection in `slot` on a backend of its pool: the one its picker
    /// chooses (after a failed connect: the next usable one) or, when that one is at its
    /// `max_conns`, the next usable one with room; never one this connection failed to reach.
    pub(super) fn take_backend(&mut self, slot: usize) -> Taken {
        let entry = &self.conns[slot];
        let pool_index = entry.pool as usize;
        let pool = &self.snapshot.pools[pool_index];
        if pool.usable().is_empty() {
            // An operator took every backend out.
            return Taken::Exhausted;
        }
        let picker = &mut self.pickers[pool_index];
        let mut candidate = match entry.failed.last() {
            None => picker.pick(pool, entry.client),
            Some(&failed) => picker.next_after(pool, failed as usize),
        };
        let mut untried = false;
        for _ in 0..pool.usable().len() {
            if !entry.failed.contains(&(candidate as u32)) {
                untried = true;
                let backend = &pool.backends[candidate];
                if backend.counters.acquire(backend.max_conns) {
                    return Taken::Backend(candidate);
                }
            }
            candidate = picker.next_after(pool, candidate);
        }
        if untried { Taken::Full } else { Taken::Exhausted }
    }

    /// Gives back the backend slot a connection holds; a queued connection may have it.
    fn release_slot(&mut self, slot: usize) {
        let entry = &mut self.conns[slot];
        let Some(held) = entry.backend.take() else { return };
        held.counters.release();
        let pool = entry.pool as usize;
        if self.snapshot.pools.get(pool).is_some_and(|p| p.limited && p.queue.waiting() > 0) {
            self.queue_work(pool);
        }
    }

    fn recycle(&mut self, buf: u16) {
        self.bufs.recycle(buf);
        self.waiters.recycled();
    }

    fn free(&mut self, slot: usize) {
        self.conns[slot].report_bytes();
        if connlog::enabled() {
            self.log_connection(slot);
        }
        self.release_slot(slot);
        let entry = self.remove_conn(slot);
        let pool = entry.pool as usize;
        // A pipe still held has bytes in it that will never be sent: close it, do not reuse it.
        for index in entry.pipes.into_iter().flatten() {
            self.pipes.discard(index);
        }
        if entry.queued_since.is_some() {
            // It left the line without being served: its worker's oldest ticket may change.
            // (Waiters of a pool a reload removed were let go then.)
            self.snapshot.pools[pool].queue.leave();
            self.queue_work(pool);
        }
        if let (Some(limit), Some(client)) = (&entry.source, entry.client) {
            limit.release(client.ip());
        }
        let stats = &self.shared.stats[self.index];
        let conn = &entry.conn;
        match conn.end() {
            Some(End::Finished) => stats.finished.add(1),
            Some(End::Reset(_)) => stats.reset.add(1),
            Some(End::NoBackend) => stats.no_backend.add(1),
            Some(End::LocalError) => stats.local_error.add(1),
            Some(End::ClientGone) => stats.client_gone.add(1),
            // Counted where they are decided (idle, drain, cut, refused, handshake, queue).
            Some(
                End::IdleTimeout
                | End::Killed
                | End::BackendDown
                | End::Refused
                | End::HandshakeFailed
                | End::HandshakeTimeout
                | End::QueueTimeout,
            )
            | None => {}
        }
    }

    /// Adds the connection log line of the connection in `slot`, which has ended.
    fn log_connection(&mut self, slot: usize) {
        let entry = &self.conns[slot];
        let conn = &entry.conn;
        let Some(termination) = conn.termination() else { return };
        let listener = self.gate.listeners.get(entry.listener as usize).map_or("?", |l| l.settings.name.as_str());
        // A reload may have removed its pool (or renumbered the pools, for one that never
        // relayed and was not relocated).
        let pool = (entry.routed && entry.layout == self.snapshot.layout)
            .then(|| self.snapshot.pools.get(entry.pool as usize))
            .flatten()
            .map(|p| p.settings.name.as_str());
        let (client, proxied) = match entry.peer {
            Some(peer) => (Some(peer), entry.client),
            None => (entry.client, None),
        };
        let bytes = conn.bytes();
        let record = connlog::Record {
            client,
            proxied,
            listener,
            pool,
            backend: entry.backend.as_ref().filter(|_| entry.connect_ms.is_some()).map(|held| held.address),
            sni: entry.sni.as_deref(),
            queued_ms: entry.queued_ms,
            connect_ms: entry.connect_ms,
            total_ms: self.now.saturating_sub(entry.accepted_at),
            bytes_up: bytes[0],
            bytes_down: bytes[1],
            attempts: conn.tried(),
            termination: termination.as_str(),
        };
        self.connlog.push(&record);
    }
}

/// The kind of a per-direction operation.
fn by_dir(dir: Dir, up: Kind, down: Kind) -> Kind {
    match dir {
        Dir::Up => up,
        Dir::Down => down,
    }
}
