//! Bytes that go to the backend before relaying: an outgoing PROXY header and the client bytes
//! read while routing (a PROXY header, which is not passed on, and a TLS ClientHello, which is).

use super::{Conn, Dir, Flow, Op, Phase, Side};
use crate::admission::proxy_protocol;

/// Room kept in front of the bytes read from the client, for the outgoing PROXY header.
const HEADROOM: usize = proxy_protocol::V1_MAX;
/// Client bytes a new prefix has room for: most PROXY headers and many ClientHellos fit; it
/// doubles (up to what routing may need) only when a connection sends more, so connections
/// that send nothing hold little.
const FIRST_ROOM: usize = 1024;

/// Bytes sent to the backend before relaying: an outgoing PROXY header and the client bytes
/// read while routing. Boxed, so its address stays put while the kernel reads or writes it
/// (its buffer grows only between reads), and freed once sent.
#[derive(Debug)]
pub struct Prefix {
    data: Box<[u8]>,
    /// Start and end of the bytes still to send (after `prepare`), or of the bytes read.
    start: usize,
    end: usize,
    /// The most client bytes it may read.
    capacity: usize,
}

impl Prefix {
    /// A prefix that can read up to `capacity` client bytes (with room for the first
    /// [`FIRST_ROOM`] of them to begin with).
    pub fn new(capacity: usize) -> Box<Prefix> {
        let room = capacity.min(FIRST_ROOM);
        Box::new(Prefix { data: vec![0; HEADROOM + room].into_boxed_slice(), start: HEADROOM, end: HEADROOM, capacity })
    }

    /// Makes room for the next read if the buffer is full but may still grow (twice the size,
    /// up to the capacity). Only between reads: the kernel writes into the buffer while one
    /// is in flight.
    fn make_room(&mut self) {
        let room = self.data.len() - HEADROOM;
        if self.end == self.data.len() && room < self.capacity {
            let mut bigger = vec![0; HEADROOM + (2 * room).min(self.capacity)].into_boxed_slice();
            bigger[..self.end].copy_from_slice(&self.data[..self.end]);
            self.data = bigger;
        }
    }

    /// The client bytes read so far.
    pub fn received(&self) -> &[u8] {
        &self.data[HEADROOM..self.end]
    }

    /// Whether it may read more.
    pub fn has_room(&self) -> bool {
        self.end < HEADROOM + self.capacity
    }

    /// Where the next read goes and how much it may take.
    pub fn free_space(&mut self) -> (*mut u8, u32) {
        let free = &mut self.data[self.end..];
        (free.as_mut_ptr(), free.len() as u32)
    }

    /// `n` more bytes were read into the free space.
    pub(super) fn filled(&mut self, n: usize) {
        self.end = (self.end + n).min(self.data.len());
    }

    /// Sets what is sent: `header`, then the client bytes read after the first `skip` (an
    /// incoming PROXY header, which is not passed on).
    pub fn prepare(&mut self, skip: usize, header: &[u8]) {
        let first = (HEADROOM + skip).min(self.end);
        debug_assert!(header.len() <= first);
        self.start = first - header.len();
        self.data[self.start..first].copy_from_slice(header);
    }

    /// The bytes still to send.
    pub fn pending(&self) -> &[u8] {
        &self.data[self.start..self.end]
    }

    fn advance(&mut self, sent: usize) {
        self.start = (self.start + sent).min(self.end);
    }
}

impl Conn {
    /// Starts reading the client's first bytes, up to `capacity`, before it can be routed.
    pub fn start_handshake(&mut self, capacity: usize, ops: &mut Vec<Op>) {
        self.prefix = Some(Prefix::new(capacity));
        self.read_prefix(ops);
    }

    /// The bytes read before routing, and those to send before relaying.
    pub fn prefix(&self) -> Option<&Prefix> {
        self.prefix.as_deref()
    }

    pub fn prefix_mut(&mut self) -> Option<&mut Prefix> {
        self.prefix.as_deref_mut()
    }

    /// Sets what goes to the backend first: `header` (an outgoing PROXY header), if any, then
    /// the client bytes read while routing after the first `skip` (an incoming PROXY header).
    pub fn prepare_prefix(&mut self, skip: usize, header: Option<&[u8]>) {
        match header {
            Some(header) => self.prefix.get_or_insert_with(|| Prefix::new(0)).prepare(skip, header),
            None => {
                if let Some(prefix) = self.prefix.as_mut() {
                    prefix.prepare(skip, &[]);
                }
            }
        }
    }

    /// Reads (more) client bytes into the prefix, before the connection can be routed.
    pub fn read_prefix(&mut self, ops: &mut Vec<Op>) {
        debug_assert!(matches!(self.phase, Phase::New | Phase::Handshake));
        debug_assert!(self.prefix.as_ref().is_some_and(|p| p.has_room()));
        self.phase = Phase::Handshake;
        if let Some(prefix) = self.prefix.as_mut() {
            prefix.make_room();
        }
        let fd = self.client;
        self.emit(Op::ReadPrefix { fd }, ops);
    }

    pub(super) fn send_prefix(&mut self, ops: &mut Vec<Op>) {
        match self.backend {
            Some(fd) => self.emit(Op::SendPrefix { fd }, ops),
            None => debug_assert!(false, "prefix without a backend"),
        }
    }

    pub(super) fn sent_prefix(&mut self, result: i32, ops: &mut Vec<Op>) {
        if result > 0 {
            let prefix = self.prefix.as_mut().expect("a prefix is being sent");
            prefix.advance(result as usize);
            if prefix.pending().is_empty() {
                self.prefix = None;
                self.receive(Dir::Up, ops);
            } else {
                self.send_prefix(ops);
            }
        } else if -result == libc::EAGAIN
            && let Some(fd) = self.backend
        {
            self.emit(Op::WaitWritable { dir: Dir::Up, fd }, ops);
        } else if -result == libc::EINTR {
            self.send_prefix(ops);
        } else {
            self.flows[Dir::Up.index()] = Flow::Done;
            self.reset_from(Side::Backend, ops);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Reads `bytes` into `prefix` as the kernel would, as far as they fit in one read.
    fn read(prefix: &mut Prefix, bytes: &[u8]) -> usize {
        prefix.make_room();
        let (at, room) = prefix.free_space();
        let n = bytes.len().min(room as usize);
        // SAFETY: `at` points at `room` writable bytes of the prefix's buffer.
        unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), at, n) };
        prefix.filled(n);
        n
    }

    #[test]
    fn a_prefix_starts_small_and_grows_between_reads_up_to_its_capacity() {
        let capacity = 18_000;
        let mut prefix = Prefix::new(capacity);
        assert_eq!(prefix.data.len(), HEADROOM + FIRST_ROOM, "a connection that sends nothing holds little");
        let sent: Vec<u8> = (0..capacity + 500).map(|i| i as u8).collect();
        let mut taken = 0;
        let mut reads = 0;
        while prefix.has_room() {
            taken += read(&mut prefix, &sent[taken..]);
            reads += 1;
            assert_eq!(prefix.received(), &sent[..taken], "the bytes read stay as they came");
        }
        assert_eq!(taken, capacity, "never more than the capacity");
        assert_eq!(prefix.data.len(), HEADROOM + capacity);
        assert_eq!(reads, 6, "1 KiB, then doubling: 1, 2, 4, 8, 16, 18 KiB");
        // What is sent: an outgoing header in the headroom, then the bytes after `skip`.
        prefix.prepare(16, b"PROXY UNKNOWN\r\n");
        assert_eq!(&prefix.pending()[..15], b"PROXY UNKNOWN\r\n");
        assert_eq!(&prefix.pending()[15..], &sent[16..capacity]);
    }

    #[test]
    fn a_small_capacity_is_allocated_whole_and_a_header_alone_needs_no_room() {
        let mut prefix = Prefix::new(107);
        assert_eq!(prefix.data.len(), HEADROOM + 107);
        assert_eq!(read(&mut prefix, &[b'x'; 200]), 107);
        assert!(!prefix.has_room());
        let mut header_only = Prefix::new(0);
        assert!(!header_only.has_room());
        header_only.make_room();
        header_only.prepare(0, b"PROXY UNKNOWN\r\n");
        assert_eq!(header_only.pending(), b"PROXY UNKNOWN\r\n");
    }
}
