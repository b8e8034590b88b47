//! Thin, safe wrappers over the few syscalls ringlb makes outside the ring: CPU affinity,
//! file-descriptor limits, signal masks, eventfds and socket options.
//!
//! Every `unsafe` block outside the ring lives here, each with the reason it is sound.

use std::io;
use std::mem;
use std::net::SocketAddr;
use std::num::NonZeroUsize;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use socket2::{Domain, Protocol, SockAddr, Socket, Type};

fn check(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret < 0 { Err(io::Error::last_os_error()) } else { Ok(ret) }
}

/// The CPUs this process may run on (its affinity mask), in ascending order.
pub fn allowed_cpus() -> Vec<usize> {
    // SAFETY: cpu_set_t is plain data; zeroed is a valid empty set, and sched_getaffinity
    // writes at most size_of::<cpu_set_t>() bytes into it.
    let mut set: libc::cpu_set_t = unsafe { mem::zeroed() };
    let ret = unsafe { libc::sched_getaffinity(0, mem::size_of::<libc::cpu_set_t>(), &mut set) };
    if ret != 0 {
        return (0..std::thread::available_parallelism().map_or(1, NonZeroUsize::get)).collect();
    }
    // SAFETY: CPU_ISSET only reads the set, and i stays below CPU_SETSIZE.
    (0..libc::CPU_SETSIZE as usize).filter(|&i| unsafe { libc::CPU_ISSET(i, &set) }).collect()
}

/// How many CPUs this process may run on: the default worker count.
pub fn available_cpus() -> NonZeroUsize {
    NonZeroUsize::new(allowed_cpus().len()).unwrap_or(NonZeroUsize::MIN)
}

/// Pins the calling thread to one CPU.
pub fn pin_current_thread(cpu: usize) -> io::Result<()> {
    // SAFETY: as in allowed_cpus; CPU_SET writes inside the set for cpu < CPU_SETSIZE.
    let mut set: libc::cpu_set_t = unsafe { mem::zeroed() };
    if cpu >= libc::CPU_SETSIZE as usize {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    }
    unsafe { libc::CPU_SET(cpu, &mut set) };
    // SAFETY: the set is initialised and its size is passed.
    check(unsafe { libc::sched_setaffinity(0, mem::size_of::<libc::cpu_set_t>(), &set) }).map(drop)
}

/// Raises the soft RLIMIT_NOFILE to the hard limit and returns the new soft limit.
pub fn raise_nofile_limit() -> io::Result<u64> {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit writes one rlimit into the struct we own.
    check(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) })?;
    if limit.rlim_cur < limit.rlim_max {
        let raised = libc::rlimit { rlim_cur: limit.rlim_max, rlim_max: limit.rlim_max };
        // SAFETY: setrlimit only reads the struct.
        check(unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) })?;
        limit = raised;
    }
    Ok(limit.rlim_cur)
}

/// The signals the main thread handles (with `sigtimedwait`); every other thread keeps them
/// blocked, so none of them can end the process by its default action.
pub const HANDLED_SIGNALS: [libc::c_int; 8] = [
    libc::SIGTERM,
    libc::SIGINT,
    libc::SIGQUIT,
    libc::SIGHUP,
    libc::SIGUSR1,
    libc::SIGUSR2,
    libc::SIGALRM,
    libc::SIGTTIN,
];

/// The set of [`HANDLED_SIGNALS`].
pub fn handled_signals() -> libc::sigset_t {
    // SAFETY: sigemptyset/sigaddset initialise and modify the set we own.
    unsafe {
        let mut set: libc::sigset_t = mem::zeroed();
        libc::sigemptyset(&mut set);
        for signal in HANDLED_SIGNALS {
            libc::sigaddset(&mut set, signal);
        }
        set
    }
}

/// A signal's name, for log lines.
pub fn signal_name(signal: libc::c_int) -> &'static str {
    match signal {
        libc::SIGTERM => "SIGTERM",
        libc::SIGINT => "SIGINT",
        libc::SIGQUIT => "SIGQUIT",
        libc::SIGHUP => "SIGHUP",
        libc::SIGUSR1 => "SIGUSR1",
        libc::SIGUSR2 => "SIGUSR2",
        libc::SIGALRM => "SIGALRM",
        libc::SIGTTIN => "SIGTTIN",
        _ => "a signal",
    }
}

/// Blocks `set` in the calling thread; threads spawned afterwards inherit the mask.
pub fn block_signals(set: &libc::sigset_t) -> io::Result<()> {
    // SAFETY: the set is initialised; the old mask is not requested.
    let ret = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, set, std::ptr::null_mut()) };
    if ret != 0 { Err(io::Error::from_raw_os_error(ret)) } else { Ok(()) }
}

/// Waits up to `timeout` for one of the (blocked) signals in `set`.
pub fn wait_signal_timeout(set: &libc::sigset_t, timeout: std::time::Duration) -> io::Result<Option<libc::c_int>> {
    let ts = libc::timespec { tv_sec: timeout.as_secs() as _, tv_nsec: timeout.subsec_nanos() as _ };
    // SAFETY: the set and timespec are initialised; no siginfo is requested.
    let ret = unsafe { libc::sigtimedwait(set, std::ptr::null_mut(), &ts) };
    if ret >= 0 {
        return Ok(Some(ret));
    }
    match io::Error::last_os_error().raw_os_error() {
        Some(libc::EAGAIN) | Some(libc::EINTR) => Ok(None),
        _ => Err(io::Error::last_os_error()),
    }
}

/// Ignores SIGPIPE: a write to a closed socket must be an error, not the end of the process.
pub fn ignore_sigpipe() {
    // SAFETY: SIG_IGN is a valid disposition for SIGPIPE.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_IGN) };
}

/// A close-on-exec eventfd: the doorbell the control side rings for a worker. It is blocking
/// on purpose: io_uring answers a read of an O_NONBLOCK file with EAGAIN instead of waiting.
pub fn eventfd() -> io::Result<OwnedFd> {
    // SAFETY: eventfd returns a new fd that nobody else owns.
    let fd = check(unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) })?;
    // SAFETY: fd was just created and is owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Adds one to an eventfd's counter, waking whatever reads it.
pub fn eventfd_ring(fd: &OwnedFd) {
    let one: u64 = 1;
    // SAFETY: writes 8 bytes from a live u64 to an fd we hold open. A full counter (EAGAIN)
    // already means a pending wakeup, so the result does not matter.
    unsafe { libc::write(fd.as_raw_fd(), (&one as *const u64).cast(), 8) };
}

/// A listener socket for one worker: SO_REUSEPORT so every worker binds the same address.
///
/// With `first`, this is the listener's first socket, and it claims the port: it binds
/// without SO_REUSEPORT, so the bind fails (EADDRINUSE) if any other socket holds the port,
/// another ringlb's or any program's, instead of quietly joining its group. Only then does it
/// set SO_REUSEPORT, before `listen`, so this process's other workers can join. With port 0
/// the port the kernel picks is free of any other socket for the same reason.
pub fn listener(addr: SocketAddr, backlog: i32, first: bool) -> io::Result<Socket> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM.nonblocking().cloexec(), Some(Protocol::TCP))?;
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    // Lets a restarted ringlb bind while its old connections are in TIME_WAIT; never lets it
    // bind beside another listening socket.
    socket.set_reuse_address(true)?;
    if !first {
        socket.set_reuse_port(true)?;
    }
    // Accepted sockets inherit TCP_NODELAY from the listener.
    socket.set_tcp_nodelay(true)?;
    socket.bind(&addr.into())?;
    if first {
        socket.set_reuse_port(true)?;
    }
    socket.listen(backlog)?;
    Ok(socket)
}

/// Accepts one connection from a non-blocking listener: the new socket (non-blocking,
/// close-on-exec) as a raw fd the ring will own, or the errno (EAGAIN: none waiting).
pub fn accept(listener: RawFd) -> Result<RawFd, i32> {
    // SAFETY: accept4 with null address pointers writes nothing back; the returned fd is new
    // and owned by nobody else.
    let fd = unsafe {
        libc::accept4(listener, std::ptr::null_mut(), std::ptr::null_mut(), libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC)
    };
    if fd < 0 { Err(io::Error::last_os_error().raw_os_error().unwrap_or(libc::EIO)) } else { Ok(fd) }
}

/// A non-blocking TCP socket for a backend connection, with TCP_NODELAY, returned as a raw fd
/// because the ring, not Rust, decides when it is closed.
pub fn backend_socket(addr: &SockAddr) -> io::Result<RawFd> {
    let family = addr.family() as libc::c_int;
    // SAFETY: socket() creates a new fd owned by nobody else.
    let fd = check(unsafe {
        libc::socket(family, libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC, libc::IPPROTO_TCP)
    })?;
    if let Err(err) = set_int_option(fd, libc::IPPROTO_TCP, libc::TCP_NODELAY, 1) {
        close(fd);
        return Err(err);
    }
    Ok(fd)
}

/// setsockopt with `value`, the C type the option takes (c_int, linger, sock_fprog...), which
/// the kernel copies during the call.
fn set_option<T>(fd: RawFd, level: libc::c_int, name: libc::c_int, value: &T) -> io::Result<()> {
    // SAFETY: passes a pointer to a live T and its size; the kernel only reads it.
    check(unsafe { libc::setsockopt(fd, level, name, (value as *const T).cast(), mem::size_of::<T>() as _) }).map(drop)
}

fn set_int_option(fd: RawFd, level: libc::c_int, name: libc::c_int, value: libc::c_int) -> io::Result<()> {
    set_option(fd, level, name, &value)
}

/// Sets SO_LINGER {on, 0}: the next close sends RST instead of FIN.
pub fn set_linger_zero(fd: RawFd) -> io::Result<()> {
    set_option(fd, libc::SOL_SOCKET, libc::SO_LINGER, &libc::linger { l_onoff: 1, l_linger: 0 })
}

/// shutdown(SHUT_WR): sends FIN after whatever is queued; never blocks.
pub fn shutdown_write(fd: RawFd) -> io::Result<()> {
    // SAFETY: shutdown takes an fd and a constant; the fd is open (owned by a connection).
    check(unsafe { libc::shutdown(fd, libc::SHUT_WR) }).map(drop)
}

/// A pipe for splicing: both ends non-blocking and close-on-exec.
#[derive(Debug)]
pub struct Pipe {
    pub read: OwnedFd,
    pub write: OwnedFd,
}

/// Makes a pipe of (at least) `size` bytes. If the kernel refuses the size (over
/// fs.pipe-max-size, or the user's pipe pages used up), the pipe keeps the size it got.
pub fn pipe(size: u32) -> io::Result<Pipe> {
    let mut fds = [0 as libc::c_int; 2];
    // SAFETY: pipe2 writes two fds into the array we own.
    check(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) })?;
    // SAFETY: both fds were just created and are owned by nobody else.
    let pipe = unsafe { Pipe { read: OwnedFd::from_raw_fd(fds[0]), write: OwnedFd::from_raw_fd(fds[1]) } };
    // SAFETY: F_SETPIPE_SZ takes an int argument on an fd we own.
    unsafe { libc::fcntl(pipe.write.as_raw_fd(), libc::F_SETPIPE_SZ, size as libc::c_int) };
    Ok(pipe)
}

/// splice(2) of up to `len` bytes from `from` to `to` without blocking; returns the bytes
/// moved (0 = end of stream) or -errno, as a ring completion would.
pub fn splice(from: RawFd, to: RawFd, len: usize) -> i32 {
    // SAFETY: no offsets are passed (both ends are sockets or pipes); the fds are open.
    let n = unsafe {
        libc::splice(
            from,
            std::ptr::null_mut(),
            to,
            std::ptr::null_mut(),
            len,
            libc::SPLICE_F_NONBLOCK | libc::SPLICE_F_MOVE,
        )
    };
    if n < 0 {
        -io::Error::last_os_error().raw_os_error().unwrap_or(libc::EIO)
    } else {
        n.min(i32::MAX as isize) as i32
    }
}

/// The address of the peer of a connected socket.
pub fn peer_addr(fd: RawFd) -> io::Result<SocketAddr> {
    socket_addr(fd, libc::getpeername)
}

/// The local address of a socket: for an accepted one, the address the client connected to.
pub fn local_addr(fd: RawFd) -> io::Result<SocketAddr> {
    socket_addr(fd, libc::getsockname)
}

type NameCall = unsafe extern "C" fn(libc::c_int, *mut libc::sockaddr, *mut libc::socklen_t) -> libc::c_int;

/// An address of `fd` from getpeername or getsockname.
fn socket_addr(fd: RawFd, call: NameCall) -> io::Result<SocketAddr> {
    // SAFETY: SockAddr::try_init hands the call a storage buffer and its length, which is all
    // getpeername and getsockname write.
    let (_, addr) = unsafe { SockAddr::try_init(|storage, len| check(call(fd, storage.cast(), len)).map(drop)) }?;
    addr.as_socket().ok_or_else(|| io::Error::from_raw_os_error(libc::EAFNOSUPPORT))
}

/// Closes an fd synchronously; for fds that never reached the ring.
pub fn close(fd: RawFd) {
    // SAFETY: callers pass an fd they own and never use again.
    unsafe { libc::close(fd) };
}

/// Counts the calling process's open file descriptors (for tests and diagnostics).
pub fn open_fd_count() -> io::Result<usize> {
    Ok(std::fs::read_dir("/proc/self/fd")?.count().saturating_sub(1))
}

/// A coarse monotonic clock in milliseconds: cheap enough to read once per ring wakeup.
pub fn now_millis() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes one timespec into the struct we own.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &mut ts) };
    ts.tv_sec as u64 * 1000 + ts.tv_nsec as u64 / 1_000_000
}

/// The calling thread's id (as in /proc/self/task).
pub fn thread_id() -> libc::pid_t {
    // SAFETY: gettid takes no arguments and cannot fail.
    unsafe { libc::gettid() }
}

/// CPU time thread `tid` of this process has used (user and system), or `None` once it has
/// exited. Reads the kernel's per-thread CPU clock, as `pthread_getcpuclockid` would, but by
/// thread id, so asking about a thread that has exited is harmless.
pub fn thread_cpu_time(tid: libc::pid_t) -> Option<std::time::Duration> {
    // The clock id of a thread's CPU clock (MAKE_THREAD_CPUCLOCK(tid, CPUCLOCK_SCHED) in the
    // kernel): the inverted id shifted past the 3 flag bits, CPUCLOCK_SCHED (2) and
    // CPUCLOCK_PERTHREAD_MASK (4).
    let clock = (!tid << 3) | 6;
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes one timespec into the struct we own; an id of a thread that
    // is gone is answered with EINVAL.
    let ret = unsafe { libc::clock_gettime(clock, &mut ts) };
    (ret == 0).then(|| std::time::Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32))
}

/// Attaches a classic BPF program to the SO_REUSEPORT group of `listener`
/// (SO_ATTACH_REUSEPORT_CBPF), replacing the group's program if any: the kernel runs it for
/// every incoming SYN and its answer picks the socket (see `crate::spread::steer`).
pub fn attach_reuseport_cbpf(listener: RawFd, program: &[libc::sock_filter]) -> io::Result<()> {
    // From the kernel's uapi headers (the libc crate has it for Android only).
    const SO_ATTACH_REUSEPORT_CBPF: libc::c_int = 51;
    let fprog = libc::sock_fprog { len: program.len() as u16, filter: program.as_ptr().cast_mut() };
    // The kernel copies the program (the instructions at `filter`, alive here) during the call
    // and never writes them.
    set_option(listener, libc::SOL_SOCKET, SO_ATTACH_REUSEPORT_CBPF, &fprog)
}

/// Most descriptors one `sendmsg` carries here (the kernel's limit is 253).
pub const FDS_PER_MESSAGE: usize = 200;

/// Sends `bytes` and the descriptors `fds` (at most [`FDS_PER_MESSAGE`]) over a unix stream
/// socket in one `sendmsg` (SCM_RIGHTS); the receiver gets its own copies of them.
pub fn send_fds(socket: RawFd, bytes: &[u8], fds: &[RawFd]) -> io::Result<()> {
    assert!(!bytes.is_empty() && fds.len() <= FDS_PER_MESSAGE);
    let mut iov = libc::iovec { iov_base: bytes.as_ptr() as *mut libc::c_void, iov_len: bytes.len() };
    // SAFETY: CMSG_SPACE is a pure computation on a length.
    let space = unsafe { libc::CMSG_SPACE(mem::size_of_val(fds) as u32) } as usize;
    let mut control = vec![0u8; space.max(1)];
    // SAFETY: msghdr is plain data; zeroed is a valid empty header, filled in below.
    let mut message: libc::msghdr = unsafe { mem::zeroed() };
    message.msg_iov = &mut iov;
    message.msg_iovlen = 1;
    if !fds.is_empty() {
        message.msg_control = control.as_mut_ptr().cast();
        message.msg_controllen = space as _;
        // SAFETY: the control buffer is CMSG_SPACE(len) bytes, room for one header and `fds`;
        // CMSG_FIRSTHDR/CMSG_DATA point inside it.
        unsafe {
            let header = libc::CMSG_FIRSTHDR(&message);
            (*header).cmsg_level = libc::SOL_SOCKET;
            (*header).cmsg_type = libc::SCM_RIGHTS;
            (*header).cmsg_len = libc::CMSG_LEN(mem::size_of_val(fds) as u32) as _;
            std::ptr::copy_nonoverlapping(fds.as_ptr(), libc::CMSG_DATA(header).cast::<RawFd>(), fds.len());
        }
    }
    // SAFETY: the header points at the iovec (over `bytes`) and the control buffer, both alive
    // for the call; the kernel only reads them.
    let sent = unsafe { libc::sendmsg(socket, &message, libc::MSG_NOSIGNAL) };
    if sent < 0 {
        return Err(io::Error::last_os_error());
    }
    if (sent as usize) < bytes.len() {
        return Err(io::Error::other("short sendmsg"));
    }
    Ok(())
}

/// Receives up to `buf.len()` bytes and the descriptors sent with them (at most
/// [`FDS_PER_MESSAGE`]); returns the byte count (0: the sender closed) and the descriptors,
/// owned, close-on-exec.
pub fn recv_fds(socket: RawFd, buf: &mut [u8]) -> io::Result<(usize, Vec<OwnedFd>)> {
    let mut iov = libc::iovec { iov_base: buf.as_mut_ptr().cast(), iov_len: buf.len() };
    // SAFETY: CMSG_SPACE is a pure computation on a length.
    let space = unsafe { libc::CMSG_SPACE((FDS_PER_MESSAGE * mem::size_of::<RawFd>()) as u32) } as usize;
    let mut control = vec![0u8; space];
    // SAFETY: as in send_fds.
    let mut message: libc::msghdr = unsafe { mem::zeroed() };
    message.msg_iov = &mut iov;
    message.msg_iovlen = 1;
    message.msg_control = control.as_mut_ptr().cast();
    message.msg_controllen = space as _;
    // SAFETY: the kernel writes at most iov_len bytes into `buf` and msg_controllen into
    // `control`, both ours and alive for the call.
    let received = unsafe { libc::recvmsg(socket, &mut message, libc::MSG_CMSG_CLOEXEC) };
    if received < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut fds = Vec::new();
    // SAFETY: the CMSG_* macros walk the control buffer the kernel filled (msg_controllen was
    // updated to what it wrote); SCM_RIGHTS data is an array of fds that are now ours.
    unsafe {
        let mut header = libc::CMSG_FIRSTHDR(&message);
        while !header.is_null() {
            if (*header).cmsg_level == libc::SOL_SOCKET && (*header).cmsg_type == libc::SCM_RIGHTS {
                let data = libc::CMSG_DATA(header).cast::<RawFd>();
                let count = ((*header).cmsg_len as usize - libc::CMSG_LEN(0) as usize) / mem::size_of::<RawFd>();
                for i in 0..count {
                    fds.push(OwnedFd::from_raw_fd(data.add(i).read_unaligned()));
                }
            }
            header = libc::CMSG_NXTHDR(&message, header);
        }
    }
    if message.msg_flags & libc::MSG_CTRUNC != 0 {
        return Err(io::Error::other("descriptors were cut off (MSG_CTRUNC)"));
    }
    if message.msg_flags & libc::MSG_TRUNC != 0 {
        return Err(io::Error::other("a message longer than the buffer was cut off (MSG_TRUNC)"));
    }
    Ok((received as usize, fds))
}

/// Sets or clears close-on-exec on `fd`. Async-signal-safe (a `pre_exec` hook may call it).
pub fn set_cloexec(fd: RawFd, on: bool) -> io::Result<()> {
    // SAFETY: F_GETFD/F_SETFD take and return flags for an fd we hold.
    let flags = check(unsafe { libc::fcntl(fd, libc::F_GETFD) })?;
    let flags = if on { flags | libc::FD_CLOEXEC } else { flags & !libc::FD_CLOEXEC };
    // SAFETY: as above.
    check(unsafe { libc::fcntl(fd, libc::F_SETFD, flags) }).map(drop)
}

/// The uid and primary gid of user `name`, from the passwd database.
pub fn user_by_name(name: &str) -> Option<(u32, u32)> {
    let name = std::ffi::CString::new(name).ok()?;
    let mut buf = vec![0u8; 16 * 1024];
    // SAFETY: getpwnam_r writes into `entry` and `buf` (of the length given) only.
    unsafe {
        let mut entry: libc::passwd = mem::zeroed();
        let mut found: *mut libc::passwd = std::ptr::null_mut();
        let rc = libc::getpwnam_r(name.as_ptr(), &mut entry, buf.as_mut_ptr().cast(), buf.len(), &mut found);
        (rc == 0 && !found.is_null()).then_some((entry.pw_uid, entry.pw_gid))
    }
}

/// The gid of group `name`, from the group database.
pub fn group_by_name(name: &str) -> Option<u32> {
    let name = std::ffi::CString::new(name).ok()?;
    let mut buf = vec![0u8; 64 * 1024];
    // SAFETY: getgrnam_r writes into `entry` and `buf` (of the length given) only.
    unsafe {
        let mut entry: libc::group = mem::zeroed();
        let mut found: *mut libc::group = std::ptr::null_mut();
        let rc = libc::getgrnam_r(name.as_ptr(), &mut entry, buf.as_mut_ptr().cast(), buf.len(), &mut found);
        (rc == 0 && !found.is_null()).then_some(entry.gr_gid)
    }
}

/// Becomes `uid`:`gid` (real, effective and saved; `gid` the only group). Leaving uid 0 clears
/// every capability (permitted, effective, ambient). Call it before any thread starts: the
/// syscalls here change the calling thread only.
pub fn become_user(uid: u32, gid: u32) -> io::Result<()> {
    let check = |rc: libc::c_long| if rc == 0 { Ok(()) } else { Err(io::Error::last_os_error()) };
    // SAFETY: raw syscalls with plain integer arguments and a pointer to one gid.
    unsafe {
        check(libc::syscall(libc::SYS_setgroups, 1, &gid as *const u32))?;
        check(libc::syscall(libc::SYS_setresgid, gid, gid, gid))?;
        check(libc::syscall(libc::SYS_setresuid, uid, uid, uid))?;
    }
    Ok(())
}

/// This process's effective uid.
pub fn effective_uid() -> u32 {
    // SAFETY: geteuid cannot fail.
    unsafe { libc::geteuid() }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thread_cpu_time_grows_and_ends_with_the_thread() {
        let tid = thread_id();
        let before = thread_cpu_time(tid).expect("this thread's CPU time");
        let mut x = 0u64;
        while thread_cpu_time(tid).unwrap() < before + std::time::Duration::from_millis(5) {
            x = std::hint::black_box(x.wrapping_add(1));
        }
        let other = std::thread::spawn(thread_id).join().unwrap();
        // join returns once the thread's id is cleared; the kernel reaps the task just after.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while thread_cpu_time(other).is_some() && std::time::Instant::now() < deadline {
            std::thread::yield_now();
        }
        assert_eq!(thread_cpu_time(other), None, "a thread that exited has no clock");
    }

    #[test]
    fn descriptors_travel_over_a_unix_socket() {
        use std::io::{Read, Write};
        let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
        let server = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = server.local_addr().unwrap();
        send_fds(a.as_raw_fd(), b"listener", &[server.as_raw_fd()]).unwrap();
        let mut buf = [0u8; 64];
        let (n, fds) = recv_fds(b.as_raw_fd(), &mut buf).unwrap();
        assert_eq!(&buf[..n], b"listener");
        assert_eq!(fds.len(), 1);
        // The copy is the same listening socket: a client of the original is accepted on it.
        drop(server);
        let copy = std::net::TcpListener::from(fds.into_iter().next().unwrap());
        let mut client = std::net::TcpStream::connect(addr).unwrap();
        client.write_all(b"x").unwrap();
        let (mut accepted, _) = copy.accept().unwrap();
        let mut byte = [0u8; 1];
        accepted.read_exact(&mut byte).unwrap();
        assert_eq!(&byte, b"x");
        drop(a);
        assert_eq!(recv_fds(b.as_raw_fd(), &mut buf).unwrap().0, 0, "closed");
    }

    #[test]
    fn allowed_cpus_is_not_empty() {
        assert!(!allowed_cpus().is_empty());
        assert_eq!(available_cpus().get(), allowed_cpus().len());
    }

    #[test]
    fn nofile_soft_limit_reaches_hard() {
        let soft = raise_nofile_limit().unwrap();
        let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
        unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) };
        assert_eq!(soft, limit.rlim_max);
        assert_eq!(limit.rlim_cur, limit.rlim_max);
    }

    #[test]
    fn listeners_share_a_port_that_nobody_else_may_take() {
        let first = listener("127.0.0.1:0".parse().unwrap(), 16, true).unwrap();
        let addr = first.local_addr().unwrap().as_socket().unwrap();
        let second = listener(addr, 16, false).unwrap();
        assert_eq!(second.local_addr().unwrap().as_socket(), Some(addr));
        // A second process claiming the port, or a plain socket, is refused.
        let again = listener(addr, 16, true).unwrap_err();
        assert_eq!(again.raw_os_error(), Some(libc::EADDRINUSE), "{again}");
        assert!(std::net::TcpListener::bind(addr).is_err());
        // A port someone else listens on cannot be claimed, with or without SO_REUSEPORT there.
        let theirs = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let taken = listener(theirs.local_addr().unwrap(), 16, true).unwrap_err();
        assert_eq!(taken.raw_os_error(), Some(libc::EADDRINUSE));
        let other_group = listener("127.0.0.1:0".parse().unwrap(), 16, true).unwrap();
        let taken = listener(other_group.local_addr().unwrap().as_socket().unwrap(), 16, true).unwrap_err();
        assert_eq!(taken.raw_os_error(), Some(libc::EADDRINUSE));
    }

    #[test]
    fn splice_through_a_pipe() {
        use std::io::{Read, Write};
        let server = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let mut client = std::net::TcpStream::connect(server.local_addr().unwrap()).unwrap();
        let (accepted, _) = server.accept().unwrap();
        accepted.set_nonblocking(true).unwrap();
        let pipe = pipe(65536).unwrap();
        assert_eq!(splice(accepted.as_raw_fd(), pipe.write.as_raw_fd(), 65536), -libc::EAGAIN, "nothing to read yet");
        client.write_all(b"spliced").unwrap();
        readable(accepted.as_raw_fd());
        assert_eq!(splice(accepted.as_raw_fd(), pipe.write.as_raw_fd(), 65536), 7);
        assert_eq!(splice(pipe.read.as_raw_fd(), accepted.as_raw_fd(), 7), 7, "echo it back");
        let mut back = [0u8; 7];
        client.read_exact(&mut back).unwrap();
        assert_eq!(&back, b"spliced");
        drop(client);
        readable(accepted.as_raw_fd());
        assert_eq!(splice(accepted.as_raw_fd(), pipe.write.as_raw_fd(), 65536), 0, "end of stream");
    }

    /// Waits (up to 10 s) until `fd` has bytes or an end of stream to read.
    fn readable(fd: RawFd) {
        let mut poll = libc::pollfd { fd, events: libc::POLLIN, revents: 0 };
        // SAFETY: one pollfd, alive for the call.
        let ready = unsafe { libc::poll(&mut poll, 1, 10_000) };
        assert_eq!(ready, 1, "fd {fd} did not become readable");
    }

    #[test]
    fn backend_socket_and_peer_addr() {
        let server = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let client = std::net::TcpStream::connect(server.local_addr().unwrap()).unwrap();
        let (accepted, _) = server.accept().unwrap();
        assert_eq!(peer_addr(accepted.as_raw_fd()).unwrap(), client.local_addr().unwrap());
        let fd = backend_socket(&SockAddr::from(server.local_addr().unwrap())).unwrap();
        set_linger_zero(fd).unwrap();
        close(fd);
    }
}
