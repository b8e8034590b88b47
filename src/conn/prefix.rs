//! Bytes that go to the backend before relaying: an outgoing PROXY header and the client bytes
//! read while routing (a PROXY header, which is not passed on, and a TLS ClientHello, which is).

use super::{Conn, Dir, Flow, Op, Phase, Side};
use crate::admission::proxy_protocol;

/// Room kept in front of the bytes read from the client, for the outgoing PROXY header.
const HEADROOM: usize = proxy_protocol::V1_MAX;

/// Bytes sent to the backend before relaying: an outgoing PROXY header and the client bytes
/// read while routing. Boxed, so its address stays put while the kernel reads or writes it,
/// and freed once sent.
#[derive(Debug)]
pub struct Prefix {
    data: Box<[u8]>,
    /// Start and end of the bytes still to send (after `prepare`), or of the bytes read.
    start: usize,
    end: usize,
}

impl Prefix {
    /// A prefix that can read `capacity` client bytes.
    pub fn new(capacity: usize) -> Box<Prefix> {
        Box::new(Prefix { data: vec![0; HEADROOM + capacity].into_boxed_slice(), start: HEADROOM, end: HEADROOM })
    }

    /// The client bytes read so far.
    pub fn received(&self) -> &[u8] {
        &self.data[HEADROOM..self.end]
    }

    /// Whether there is room to read more.
    pub fn has_room(&self) -> bool {
        self.end < self.data.len()
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
