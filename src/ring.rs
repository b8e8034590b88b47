//! The io_uring instance of one worker: building it, submitting without losing entries when the
//! SQ is full, the `user_data` encoding, and the provided-buffer ring the relay receives into.
//!
//! Only this module and [`crate::sys`] contain `unsafe`. The rule that makes the `unsafe` here
//! sound is the one the worker follows: nothing an operation uses (buffer, fd, slot) is freed
//! before that operation's completion has been reaped.

use std::collections::VecDeque;
use std::io;
use std::os::fd::RawFd;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU16, Ordering};

use io_uring::{IoUring, cqueue, opcode, squeue, types, types::BufRingEntry};

/// Defines [`Kind`] and its list of every kind from one list, so a new kind cannot be left out
/// of decoding.
macro_rules! kinds {
    ($($(#[$doc:meta])* $name:ident = $value:literal,)*) => {
        /// What an operation was for; the low byte of `user_data`.
        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        #[repr(u8)]
        pub enum Kind {
            $($(#[$doc])* $name = $value,)*
        }

        impl Kind {
            const ALL: &'static [Kind] = &[$(Kind::$name,)*];
        }
    };
}

kinds! {
    // Per-connection operations: the slot and generation identify the connection.
    Connect = 1,
    ConnectTimeout = 2,
    RecvPrefix = 3,
    RecvUp = 4,
    RecvDown = 5,
    SendUp = 6,
    SendDown = 7,
    PollUp = 8,
    PollDown = 9,
    PollInUp = 10,
    PollInDown = 11,
    Cancel = 12,
    /// The stop of a multishot receive (a cancel by its user data).
    StopRecv = 13,
    /// The stop of a wait for a connection moving to another worker (a cancel by user data).
    Park = 14,
    /// The watch of a client while its connection waits for a backend.
    Watch = 15,
    /// The stop of that watch.
    StopWatch = 16,
    Close = 17,
    // Per-worker operations: the slot is a listener index or unused.
    Accept = 32,
    /// A poll for a listener being readable (near the connection cap, see worker::gate).
    AcceptPoll = 33,
    AcceptCancel = 34,
    Doorbell = 35,
    Tick = 36,
    AcceptBackoff = 37,
    DrainDeadline = 38,
    CancelAll = 39,
    /// The cancel of a tick whose interval changed (a reload).
    TickCancel = 40,
}

impl Kind {
    /// Decodes a kind byte with one table read (this runs for every completion).
    fn from_u8(value: u8) -> Option<Kind> {
        const TABLE: [Option<Kind>; 256] = {
            let mut table = [None; 256];
            let mut i = 0;
            while i < Kind::ALL.len() {
                table[Kind::ALL[i] as usize] = Some(Kind::ALL[i]);
                i += 1;
            }
            table
        };
        TABLE[value as usize]
    }
}

/// `user_data` layout: kind in bits 0-7, slot in bits 8-39, generation in bits 40-63.
/// The generation lets a completion for a freed and reused slot be recognised.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Token {
    pub kind: Kind,
    pub slot: u32,
    pub generation: u32,
}

/// Generations wrap at 24 bits.
pub const GENERATION_MASK: u32 = 0x00ff_ffff;

impl Token {
    pub fn new(kind: Kind, slot: usize, generation: u32) -> Token {
        debug_assert!(slot <= u32::MAX as usize);
        Token { kind, slot: slot as u32, generation: generation & GENERATION_MASK }
    }

    pub fn encode(self) -> u64 {
        self.kind as u64 | (self.slot as u64) << 8 | (self.generation as u64) << 40
    }

    pub fn decode(user_data: u64) -> Option<Token> {
        Some(Token {
            kind: Kind::from_u8(user_data as u8)?,
            slot: (user_data >> 8) as u32,
            generation: (user_data >> 40) as u32,
        })
    }
}

/// A completion copied out of the CQ, so the CQ is free again before any of them is handled.
#[derive(Debug, Clone, Copy)]
pub struct Completion {
    pub user_data: u64,
    pub result: i32,
    pub flags: u32,
}

impl Completion {
    pub fn more(&self) -> bool {
        cqueue::more(self.flags)
    }

    pub fn buffer(&self) -> Option<u16> {
        cqueue::buffer_select(self.flags)
    }
}

/// A worker's ring plus a queue for entries that did not fit in the SQ.
pub struct Ring {
    ring: IoUring,
    /// Entries that found the SQ full, since last taken.
    sq_full: u64,
    /// Entries waiting for SQ space, each with whether it is linked to the next one (a linked
    /// pair must enter the SQ together).
    overflow: VecDeque<(squeue::Entry, bool)>,
}

impl Ring {
    /// Builds a ring for the calling thread only: SINGLE_ISSUER and DEFER_TASKRUN keep
    /// completion work on this thread, where it runs when we ask for events.
    pub fn new(entries: u32, cq_entries: u32) -> io::Result<Ring> {
        let ring = IoUring::builder()
            .setup_single_issuer()
            .setup_defer_taskrun()
            .setup_submit_all()
            .setup_cqsize(cq_entries.max(entries))
            .build(entries)?;
        if !ring.params().is_feature_nodrop() {
            return Err(io::Error::other("kernel io_uring lacks IORING_FEAT_NODROP (need Linux 5.5 or later)"));
        }
        Ok(Ring { ring, sq_full: 0, overflow: VecDeque::new() })
    }

    /// Queues one entry.
    ///
    /// # Safety
    ///
    /// Everything the entry points at (buffers, addresses, timespecs) must stay valid until its
    /// completion is reaped, or for kernels that copy it at submission (connect addresses,
    /// timespecs), until the next [`Ring::submit_and_wait`] returns.
    pub unsafe fn push(&mut self, entry: squeue::Entry) {
        // SAFETY: the caller upholds the entry's validity as documented.
        if !self.overflow.is_empty() || unsafe { self.ring.submission().push(&entry) }.is_err() {
            self.sq_full += 1;
            self.overflow.push_back((entry, false));
        }
    }

    /// Queues `first` linked to `second` (IO_LINK is set on `first` here): both enter the SQ in
    /// the same submission, or the link would break.
    ///
    /// # Safety
    ///
    /// As for [`Ring::push`], for both entries.
    pub unsafe fn push_linked(&mut self, first: squeue::Entry, second: squeue::Entry) {
        let first = first.flags(squeue::Flags::IO_LINK);
        let pair = [first.clone(), second.clone()];
        // SAFETY: the caller upholds both entries' validity.
        if !self.overflow.is_empty() || unsafe { self.ring.submission().push_multiple(&pair) }.is_err() {
            self.sq_full += 2;
            self.overflow.push_back((first, true));
            self.overflow.push_back((second, false));
        }
    }

    /// Moves queued entries into the SQ as far as they fit.
    fn fill_from_overflow(&mut self) {
        let mut sq = self.ring.submission();
        while let Some((entry, linked)) = self.overflow.front() {
            let needed = if *linked { 2 } else { 1 };
            if sq.capacity() - sq.len() < needed {
                break;
            }
            let (entry, linked) = (entry.clone(), *linked);
            self.overflow.pop_front();
            // SAFETY: the entries were accepted by push/push_linked under the same contract;
            // space was checked above.
            unsafe {
                let _ = sq.push(&entry);
                if linked && let Some((next, _)) = self.overflow.pop_front() {
                    let _ = sq.push(&next);
                }
            }
        }
    }

    /// Submits everything queued and waits for at least `want` completions.
    ///
    /// EINTR is retried; EBUSY/EAGAIN (the kernel has no room for more completions right now)
    /// returns so the caller can reap first.
    pub fn submit_and_wait(&mut self, want: usize) -> io::Result<()> {
        loop {
            self.fill_from_overflow();
            let want_now = if self.overflow.is_empty() { want } else { 0 };
            match self.ring.submit_and_wait(want_now) {
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                Err(e) if matches!(e.raw_os_error(), Some(libc::EBUSY) | Some(libc::EAGAIN)) => return Ok(()),
                Err(e) => return Err(e),
            }
            if self.overflow.is_empty() {
                return Ok(());
            }
            // The SQ was full: it has been submitted; loop to submit the rest, without waiting,
            // unless completions are already there to handle.
            if !self.ring.completion().is_empty() {
                return Ok(());
            }
        }
    }

    /// Whether the kernel ends a multishot receive at a byte limit (Linux 6.17 added it; older
    /// kernels refuse the field with -EINVAL). Asks once, on a fresh ring before anything else
    /// is submitted: a receive limited to 1 byte must end with the first byte it gets (the limit
    /// ends the receive once reached; it does not shorten a receive).
    pub fn limits_multishot_receives(&mut self, bufs: &mut BufRing) -> io::Result<bool> {
        const PROBE: u64 = u64::MAX;
        const STOP: u64 = u64::MAX - 1;
        debug_assert!(self.overflow.is_empty() && self.ring.completion().is_empty());
        let (socket, peer) = std::os::unix::net::UnixStream::pair()?;
        io::Write::write_all(&mut &peer, b"x")?;
        let probe = recv_multishot(std::os::fd::AsRawFd::as_raw_fd(&socket), bufs.group(), 1).user_data(PROBE);
        // SAFETY: the entry points at no memory, and `socket` outlives the receive: this
        // function returns only after its last completion (and that of its stop, if any).
        unsafe { self.push(probe) };
        let (mut limited, mut ended, mut stopping) = (None, false, false);
        let mut completions = Vec::new();
        while !ended || stopping {
            self.submit_and_wait(1)?;
            self.reap(&mut completions);
            for c in completions.drain(..) {
                if c.user_data == STOP {
                    stopping = false;
                    continue;
                }
                if let Some(bid) = c.buffer() {
                    bufs.recycle(bid);
                }
                limited.get_or_insert(c.result > 0 && !c.more());
                if !c.more() {
                    ended = true;
                } else if !stopping {
                    // Not limited after all: stop it before the socket goes.
                    stopping = true;
                    let stop =
                        opcode::AsyncCancel2::new(types::CancelBuilder::user_data(PROBE)).build().user_data(STOP);
                    // SAFETY: a cancel points at no memory.
                    unsafe { self.push(stop) };
                }
            }
        }
        Ok(limited == Some(true))
    }

    /// How many entries found the SQ full since the last call.
    pub fn take_sq_full(&mut self) -> u64 {
        std::mem::take(&mut self.sq_full)
    }

    /// Whether the kernel is holding completions back because the CQ was full (it keeps them,
    /// NODROP, and hands them over as the CQ is reaped).
    pub fn cq_overflowed(&mut self) -> bool {
        self.ring.submission().cq_overflow()
    }

    /// Whether entries are still waiting for SQ space (they were not submitted yet).
    pub fn has_overflow(&self) -> bool {
        !self.overflow.is_empty()
    }

    /// Copies every available completion into `out` and frees the CQ.
    pub fn reap(&mut self, out: &mut Vec<Completion>) {
        let mut cq = self.ring.completion();
        cq.sync();
        out.extend(cq.map(|cqe| Completion { user_data: cqe.user_data(), result: cqe.result(), flags: cqe.flags() }));
    }

    pub fn submitter(&self) -> io_uring::Submitter<'_> {
        self.ring.submitter()
    }
}

/// A provided-buffer ring: `count` buffers of `size` bytes the kernel picks from when a receive
/// has data, so a connection holds a buffer only while its bytes are on the way out.
pub struct BufRing {
    entries: NonNull<BufRingEntry>,
    entries_len: usize,
    memory: NonNull<u8>,
    memory_len: usize,
    count: u16,
    size: u32,
    group: u16,
    /// Our copy of the tail; published to the kernel after each recycle.
    tail: u16,
    registered: bool,
}

fn mmap_anonymous(len: usize) -> io::Result<NonNull<u8>> {
    // SAFETY: an anonymous private mapping aliases nothing; the result is checked.
    let ptr = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    if ptr == libc::MAP_FAILED {
        return Err(io::Error::last_os_error());
    }
    NonNull::new(ptr.cast()).ok_or_else(|| io::Error::other("mmap returned null"))
}

impl BufRing {
    /// Maps and registers a buffer ring of `count` (a power of two, at most 32768) buffers.
    pub fn new(ring: &Ring, group: u16, count: u16, size: u32) -> io::Result<BufRing> {
        if !count.is_power_of_two() || count > 32768 {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "buffer count must be a power of two <= 32768"));
        }
        let entries_len = count as usize * std::mem::size_of::<BufRingEntry>();
        let memory_len = count as usize * size as usize;
        let entries = mmap_anonymous(entries_len)?.cast::<BufRingEntry>();
        let memory = match mmap_anonymous(memory_len) {
            Ok(m) => m,
            Err(e) => {
                // SAFETY: unmapping the mapping made just above, which nothing uses.
                unsafe { libc::munmap(entries.as_ptr().cast(), entries_len) };
                return Err(e);
            }
        };
        let mut bufs =
            BufRing { entries, entries_len, memory, memory_len, count, size, group, tail: 0, registered: false };
        // SAFETY: the entry array is page-aligned (mmap), `count` entries long, and lives until
        // Drop, which unregisters it first.
        unsafe { ring.submitter().register_buf_ring_with_flags(entries.as_ptr() as u64, count, group, 0)? };
        bufs.registered = true;
        for bid in 0..count {
            bufs.recycle(bid);
        }
        Ok(bufs)
    }

    pub fn group(&self) -> u16 {
        self.group
    }

    pub fn count(&self) -> u16 {
        self.count
    }

    pub fn buffer_size(&self) -> u32 {
        self.size
    }

    /// The start of buffer `bid`, for a send of bytes the kernel put there.
    pub fn ptr(&self, bid: u16) -> *const u8 {
        self.ptr_at(bid, 0)
    }

    /// Byte `offset` of buffer `bid`, for the rest of a partly sent buffer.
    pub fn ptr_at(&self, bid: u16, offset: u32) -> *const u8 {
        debug_assert!(bid < self.count && offset < self.size);
        // SAFETY: bid < count and offset < size, so the offset stays inside the mapping.
        unsafe { self.memory.as_ptr().add(bid as usize * self.size as usize + offset as usize) }
    }

    /// Hands buffer `bid` back to the kernel.
    pub fn recycle(&mut self, bid: u16) {
        debug_assert!(bid < self.count);
        let index = (self.tail & (self.count - 1)) as usize;
        // SAFETY: index < count, inside the entry array; the kernel reads entries only between
        // its head and the published tail, and this slot is past the tail until the store below.
        unsafe {
            let entry = &mut *self.entries.as_ptr().add(index);
            entry.set_addr(self.ptr(bid) as u64);
            entry.set_len(self.size);
            entry.set_bid(bid);
        }
        self.tail = self.tail.wrapping_add(1);
        // SAFETY: the tail field lives in entry 0 of our mapping and is shared with the kernel,
        // which reads it atomically; Release orders the entry writes before it.
        unsafe {
            let tail = BufRingEntry::tail(self.entries.as_ptr()) as *const AtomicU16;
            (*tail).store(self.tail, Ordering::Release);
        }
    }

    /// Unregisters the ring from the kernel; call while the io_uring still exists.
    pub fn unregister(&mut self, ring: &Ring) {
        if self.registered {
            let _ = ring.submitter().unregister_buf_ring(self.group);
            self.registered = false;
        }
    }
}

impl Drop for BufRing {
    fn drop(&mut self) {
        // SAFETY: the worker drops this only after every operation that could use a buffer has
        // completed and after unregistering (or destroying) the ring; the mappings are ours.
        unsafe {
            libc::munmap(self.memory.as_ptr().cast(), self.memory_len);
            libc::munmap(self.entries.as_ptr().cast(), self.entries_len);
        }
    }
}

/// IORING_RECVSEND_POLL_FIRST (uapi io_uring.h): arm the poll before trying to receive. A
/// direction is armed right after its bytes went out, when its source is almost always empty,
/// so the kernel's first non-blocking attempt would only fail.
const RECV_POLL_FIRST: u16 = 1;

/// A multishot receive from `fd` into buffers of group `group` that polls before its first
/// attempt and ends after `limit` bytes (0: no limit). The limit (IORING_RECV_MSHOT_LIM, in
/// `optlen`) came with Linux 6.17; older kernels answer -EINVAL. io-uring 0.7 sets neither field,
/// so they are written into the built entry.
pub fn recv_multishot(fd: RawFd, group: u16, limit: u32) -> squeue::Entry {
    let mut entry = opcode::RecvMulti::new(types::Fd(fd), group).build();
    let raw = (&mut entry as *mut squeue::Entry).cast::<u8>();
    // SAFETY: squeue::Entry is repr(C) around the kernel's 64-byte io_uring_sqe, whose layout is
    // ABI: ioprio is the u16 at offset 2, optlen the u32 at offset 44 (the tests check both
    // against entries the crate builds). Unaligned accesses need no alignment.
    unsafe {
        let ioprio = raw.add(SQE_IOPRIO).cast::<u16>();
        ioprio.write_unaligned(ioprio.read_unaligned() | RECV_POLL_FIRST);
        raw.add(SQE_OPTLEN).cast::<u32>().write_unaligned(limit);
    }
    entry
}

const SQE_IOPRIO: usize = 2;
const SQE_OPTLEN: usize = 44;

#[cfg(test)]
mod tests {
    use super::*;

    /// The bytes of an entry, to check field offsets against what the crate builds.
    fn bytes(entry: &squeue::Entry) -> [u8; 64] {
        assert_eq!(std::mem::size_of::<squeue::Entry>(), 64);
        // SAFETY: an Entry is 64 bytes of plain data (checked above).
        unsafe { std::mem::transmute_copy(entry) }
    }

    fn field(entry: &squeue::Entry, offset: usize, len: usize) -> u64 {
        bytes(entry)[offset..offset + len].iter().rev().fold(0, |v, b| v << 8 | u64::from(*b))
    }

    #[test]
    fn receive_byte_limit_probe_matches_the_kernel_and_gives_its_buffer_back() {
        let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
        let mut numbers = release.split(|c: char| !c.is_ascii_digit()).map(|n| n.parse::<u32>().unwrap_or(0));
        let version = (numbers.next().unwrap_or(0), numbers.next().unwrap_or(0));
        let mut ring = Ring::new(8, 8).unwrap();
        let mut bufs = BufRing::new(&ring, 0, 4, 64).unwrap();
        // More probes than buffers: each must give its buffer back, or one finds none.
        for _ in 0..6 {
            assert_eq!(ring.limits_multishot_receives(&mut bufs).unwrap(), version >= (6, 17), "{release}");
        }
        bufs.unregister(&ring);
    }

    #[test]
    fn multishot_receive_fields_sit_where_the_kernel_reads_them() {
        // Reference entries from the crate: Recv's ioprio and Splice's fd_in (same union as optlen).
        let recv = opcode::Recv::new(types::Fd(3), std::ptr::null_mut(), 0).ioprio(0x1234).build();
        assert_eq!(field(&recv, SQE_IOPRIO, 2), 0x1234);
        let splice = opcode::Splice::new(types::Fd(0x0abc_def1), -1, types::Fd(4), -1, 9).build();
        assert_eq!(field(&splice, SQE_OPTLEN, 4), 0x0abc_def1);

        let entry = recv_multishot(7, 5, 131_072);
        let plain = opcode::RecvMulti::new(types::Fd(7), 5).build();
        let multishot = field(&plain, SQE_IOPRIO, 2);
        assert_ne!(multishot, 0, "RecvMulti sets IORING_RECV_MULTISHOT");
        assert_eq!(field(&entry, SQE_IOPRIO, 2), multishot | u64::from(RECV_POLL_FIRST));
        assert_eq!(field(&entry, SQE_OPTLEN, 4), 131_072);
        // Nothing else moved.
        let (a, b) = (bytes(&entry), bytes(&plain));
        let differs: Vec<usize> = (0..64).filter(|i| a[*i] != b[*i]).collect();
        assert!(differs.iter().all(|i| (2..4).contains(i) || (44..48).contains(i)), "{differs:?}");
    }

    #[test]
    fn token_round_trips() {
        for &kind in Kind::ALL {
            for (slot, generation) in [(0, 0), (1, 7), (u32::MAX as usize, GENERATION_MASK)] {
                let token = Token::new(kind, slot, generation);
                assert_eq!(Token::decode(token.encode()), Some(token));
            }
        }
        assert_eq!(Token::new(Kind::Tick, 3, GENERATION_MASK + 2).generation, 1, "generations wrap");
        assert_eq!(Token::decode(0), None, "kind 0 is never used");
    }
}
