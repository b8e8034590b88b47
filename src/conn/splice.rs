//! Splice mode: a direction waits for its source to be readable (a poll in the ring), then the
//! worker splices source -> pipe -> destination on its own thread and tells the connection each
//! result. The pipe is held only while bytes are in it.

use std::os::fd::RawFd;

use super::{Conn, Dir, End, Flow, Op, SPLICE_ROUNDS};

impl Conn {
    /// Splice mode: waits for the source `fd` to have bytes.
    pub(super) fn poll_source(&mut self, dir: Dir, fd: RawFd, ops: &mut Vec<Op>) {
        self.flows[dir.index()] = Flow::Polling;
        self.emit(Op::PollIn { dir, fd }, ops);
    }

    /// The worker spliced from the source into the pipe: bytes, 0 (end of stream) or -errno
    /// (-EAGAIN: nothing to read after all; -ENOBUFS: the worker has no pipe to spare, so this
    /// round goes by copy; -EMFILE/-ENFILE: no pipe could be made).
    pub fn spliced_in(&mut self, dir: Dir, result: i32, now: u64, ops: &mut Vec<Op>) {
        let Flow::Piping { rounds, .. } = self.flows[dir.index()] else { return };
        let (Some(src), Some(dst)) = (self.fd(dir.src()), self.fd(dir.dst())) else { return };
        match result {
            n if n > 0 => {
                self.last_active = now;
                self.bytes[dir.index()] += n as u64;
                self.last_dir = Some(dir);
                self.flows[dir.index()] = Flow::Piping { queued: n as u32, rounds };
                ops.push(Op::SpliceOut { dir, fd: dst, len: n as u32 });
            }
            0 => {
                ops.push(Op::ReleasePipe(dir));
                self.finish(dir, ops);
            }
            e if -e == libc::EAGAIN || -e == libc::EINTR => {
                ops.push(Op::ReleasePipe(dir));
                self.poll_source(dir, src, ops);
            }
            e if -e == libc::ENOBUFS => {
                // No pipe to spare: move what is waiting through ring buffers instead (the
                // receive is stopped after its first bytes); the next round tries a pipe again.
                self.receive_copying(dir, src, ops);
            }
            e if -e == libc::EMFILE || -e == libc::ENFILE || -e == libc::ENOMEM => {
                self.flows[dir.index()] = Flow::Done;
                self.begin_close(End::LocalError, false, false, ops);
            }
            _ => {
                ops.push(Op::ReleasePipe(dir));
                self.flows[dir.index()] = Flow::Done;
                self.reset_from(dir.src(), ops);
            }
        }
    }

    /// The worker spliced from the pipe to the destination: bytes or -errno.
    pub fn spliced_out(&mut self, dir: Dir, result: i32, now: u64, ops: &mut Vec<Op>) {
        let Flow::Piping { queued, rounds } = self.flows[dir.index()] else { return };
        let (Some(src), Some(dst)) = (self.fd(dir.src()), self.fd(dir.dst())) else { return };
        match result {
            n if n > 0 => {
                self.last_active = now;
                let left = queued.saturating_sub(n as u32);
                if left > 0 {
                    self.flows[dir.index()] = Flow::Piping { queued: left, rounds };
                    ops.push(Op::SpliceOut { dir, fd: dst, len: left });
                } else if rounds + 1 >= SPLICE_ROUNDS {
                    // Enough for one turn: let the ring say when there is more.
                    ops.push(Op::ReleasePipe(dir));
                    self.poll_source(dir, src, ops);
                } else {
                    self.flows[dir.index()] = Flow::Piping { queued: 0, rounds: rounds + 1 };
                    ops.push(Op::SpliceIn { dir, fd: src });
                }
            }
            e if -e == libc::EAGAIN => {
                self.flows[dir.index()] = Flow::PipeBlocked { queued, rounds };
                self.emit(Op::WaitWritable { dir, fd: dst }, ops);
            }
            e if -e == libc::EINTR => ops.push(Op::SpliceOut { dir, fd: dst, len: queued }),
            _ => {
                // The destination reset or failed; the bytes left in the pipe go with it.
                self.flows[dir.index()] = Flow::Done;
                self.reset_from(dir.dst(), ops);
            }
        }
    }
}
