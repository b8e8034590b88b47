//! Binary upgrade (SIGUSR2): the running process starts the binary from the path it was
//! started with, with the same arguments, and hands it every listening socket (the
//! listeners' and the metrics port's) over a unix socket pair (SCM_RIGHTS). The new process
//! uses them instead of binding, starts its workers, and reports ready; only then does the
//! old process stop accepting, drain its open connections (`drain_timeout`) and exit 0.
//!
//! The sockets themselves move, not copies of their addresses: both processes accept from the
//! same accept queues until the old one stops, so no connection attempt is refused and none
//! waiting in a queue is dropped. Established connections stay with the process that has
//! them. If the new process exits, or is not ready within [`READY_TIMEOUT`], the old one is
//! told why and keeps serving (a new process that is still running then is asked to stop).
//!
//! The new process must have as many workers as the old one: each worker owns one socket of
//! each listener's SO_REUSEPORT group. Listener changes belong to a reload, not to an upgrade:
//! a listener the new config no longer has is closed in the new process.
//!
//! Backends the old process had marked down start down in the new one (and come up when
//! their checks pass), so an upgrade sends no client to a backend known to be failing; what
//! operators set (admin state, weight) carries over too.
//!
//! Messages (SOCK_SEQPACKET, so each keeps its boundary and its descriptors; names last, as
//! they may hold spaces): `listener ADDRESS NAME` with that listener's sockets in worker order
//! (several such messages when there are more than [`sys::FDS_PER_MESSAGE`]), `metrics
//! ADDRESS` with one socket, `admin-socket PATH` with one socket, `down ADDRESS POOL` per
//! backend marked down, `setting ADDRESS STATE WEIGHT POOL` per backend an operator set
//! (WEIGHT `-`: the config's), `end`; then, back, `ready PID`.

use std::ffi::OsString;
use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use socket2::{Domain, Socket, Type};

use crate::control::snapshot::Carried;
use crate::pool::{AdminSetting, AdminState};
use crate::sys;

/// The environment variable that tells a new process the descriptor of its upgrade channel.
pub const CHANNEL_ENV: &str = "RINGLB_UPGRADE_FD";
/// How long the old process waits for the new one to report ready.
pub const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// The longest message on the channel.
const MESSAGE_MAX: usize = 4096;

/// How this process was started, to start the same path with the same arguments.
#[derive(Debug, Clone)]
pub struct Invocation {
    exe: PathBuf,
    args: Vec<OsString>,
}

impl Invocation {
    /// This process's: the binary's path (an upgrade starts whatever file is at that path
    /// then) and its arguments. Call it at start, before anything changes the directory.
    pub fn current() -> io::Result<Invocation> {
        let exe = std::env::current_exe()?;
        // /proc/self/exe of a binary replaced on disk reads "PATH (deleted)".
        let exe = match exe.to_str().and_then(|s| s.strip_suffix(" (deleted)")) {
            Some(path) => PathBuf::from(path),
            None => exe,
        };
        Ok(Invocation { exe, args: std::env::args_os().skip(1).collect() })
    }
}

/// Why an upgrade did not happen (the old process keeps serving).
#[derive(Debug, thiserror::Error)]
pub enum UpgradeError {
    #[error("cannot start {path}: {source}")]
    Spawn { path: String, source: io::Error },
    #[error("cannot hand over the listening sockets: {0}")]
    Channel(io::Error),
    #[error("the new process (pid {pid}) exited before it was ready ({status}); its log says why")]
    Exited { pid: u32, status: String },
    #[error("the new process (pid {pid}) was not ready within {timeout:?}; asked it to stop")]
    Timeout { pid: u32, timeout: Duration },
}

/// A listening socket to hand over: a listener's (one per worker) or the metrics port's.
pub struct Handed {
    pub name: String,
    pub address: SocketAddr,
    pub fds: Vec<RawFd>,
}

/// A new process that was started and given the sockets, not yet ready.
pub struct Started {
    child: Child,
    channel: Socket,
}

impl Started {
    /// Starts the new process and sends it `listeners`, `metrics` and `carried`; the
    /// descriptors are copied into the channel here, so they only need to stay open during
    /// this call.
    pub fn start(
        invocation: &Invocation,
        listeners: &[Handed],
        metrics: Option<&Handed>,
        admin: Option<(&Path, RawFd)>,
        carried: &Carried,
    ) -> Result<Started, UpgradeError> {
        let (ours, theirs) =
            Socket::pair(Domain::UNIX, Type::SEQPACKET.cloexec(), None).map_err(UpgradeError::Channel)?;
        let inherited = theirs.as_raw_fd();
        let mut command = Command::new(&invocation.exe);
        command.args(&invocation.args).env(CHANNEL_ENV, inherited.to_string());
        // systemd's watchdog is for the main process, which the new one becomes: without the
        // old pid in WATCHDOG_PID it takes WATCHDOG_USEC as its own. LISTEN_PID names the old
        // process, so the new one ignores LISTEN_FDS and takes the sockets handed to it.
        command.env_remove("WATCHDOG_PID");
        // SAFETY: the hook only calls fcntl (async-signal-safe) on a descriptor the child has:
        // the channel's end stays close-on-exec in this process, so no other child gets it.
        unsafe { command.pre_exec(move || sys::set_cloexec(inherited, false)) };
        let child = command
            .spawn()
            .map_err(|source| UpgradeError::Spawn { path: invocation.exe.display().to_string(), source })?;
        drop(theirs);
        let started = Started { child, channel: ours };
        if let Err(e) = send(started.channel.as_raw_fd(), listeners, metrics, admin, carried) {
            return Err(started.give_up(UpgradeError::Channel(e)));
        }
        Ok(started)
    }

    /// The new process's pid.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits until the new process reports ready (its pid), or fails.
    pub fn wait_ready(self) -> Result<u32, UpgradeError> {
        let pid = self.child.id();
        if let Err(e) = self.channel.set_read_timeout(Some(READY_TIMEOUT)) {
            return Err(self.give_up(UpgradeError::Channel(e)));
        }
        let mut buf = [0u8; 64];
        match sys::recv_fds(self.channel.as_raw_fd(), &mut buf) {
            Ok((n, _)) if buf[..n].starts_with(b"ready ") => Ok(pid),
            Ok(_) => Err(self.exited()),
            Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {
                Err(self.give_up(UpgradeError::Timeout { pid, timeout: READY_TIMEOUT }))
            }
            Err(e) => Err(self.give_up(UpgradeError::Channel(e))),
        }
    }

    /// The new process closed the channel without reporting ready: how it ended.
    fn exited(mut self) -> UpgradeError {
        let pid = self.child.id();
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            match self.child.try_wait() {
                Ok(Some(status)) => return UpgradeError::Exited { pid, status: status.to_string() },
                // Closing the channel and exiting are two steps: give it a moment to finish.
                Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
                _ => return self.give_up(UpgradeError::Exited { pid, status: "it closed the channel".into() }),
            }
        }
    }

    /// Asks a new process that will not take over to stop (gracefully: it may have accepted
    /// connections on the shared sockets), and passes `why` on. It is not waited for.
    fn give_up(mut self, why: UpgradeError) -> UpgradeError {
        if let Ok(None) = self.child.try_wait() {
            // SAFETY: kill takes a pid and a signal; the pid is our child's, not yet reaped.
            unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM) };
        }
        why
    }
}

/// Sends the sockets and what is carried over `channel`, then `end`.
fn send(
    channel: RawFd,
    listeners: &[Handed],
    metrics: Option<&Handed>,
    admin: Option<(&Path, RawFd)>,
    carried: &Carried,
) -> io::Result<()> {
    for listener in listeners {
        for fds in listener.fds.chunks(sys::FDS_PER_MESSAGE) {
            sys::send_fds(channel, format!("listener {} {}", listener.address, listener.name).as_bytes(), fds)?;
        }
    }
    if let Some(metrics) = metrics {
        sys::send_fds(channel, format!("metrics {}", metrics.address).as_bytes(), &metrics.fds)?;
    }
    if let Some((path, fd)) = admin {
        let line = format!("admin-socket {}", path.display());
        sys::send_fds(channel, line.as_bytes(), &[fd])?;
    }
    for (pool, address) in &carried.down {
        sys::send_fds(channel, format!("down {address} {pool}").as_bytes(), &[])?;
    }
    for (pool, address, setting) in carried.admin.iter() {
        let weight = setting.weight.map_or_else(|| "-".to_string(), |w| w.to_string());
        let line = format!("setting {address} {} {weight} {pool}", setting.state.name());
        sys::send_fds(channel, line.as_bytes(), &[])?;
    }
    sys::send_fds(channel, b"end", &[])
}

/// What a new process received from the one it replaces.
pub struct Inherited {
    channel: Socket,
    /// Per listener name: the address and the sockets, in worker order.
    listeners: Vec<(String, SocketAddr, Vec<Socket>)>,
    metrics: Option<(SocketAddr, std::net::TcpListener)>,
    admin: Option<(PathBuf, UnixListener)>,
    /// The backends the old process had marked down, and what operators set.
    pub carried: Carried,
}

impl Inherited {
    /// The sockets handed to this process, if it was started by an upgrade.
    pub fn from_env() -> Option<io::Result<Inherited>> {
        let fd: RawFd = std::env::var(CHANNEL_ENV).ok()?.parse().ok()?;
        // Not for processes this one starts.
        // SAFETY: only the main thread runs yet; nothing reads the environment concurrently.
        unsafe { std::env::remove_var(CHANNEL_ENV) };
        Some(Inherited::receive(fd))
    }

    fn receive(fd: RawFd) -> io::Result<Inherited> {
        // SAFETY: the old process passed this descriptor (its end of the pair) to us; nothing
        // else in this process owns it.
        let channel = Socket::from(unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) });
        sys::set_cloexec(channel.as_raw_fd(), true)?;
        let mut inherited =
            Inherited { channel, listeners: Vec::new(), metrics: None, admin: None, carried: Carried::default() };
        let bad = |what: &str| io::Error::new(io::ErrorKind::InvalidData, format!("upgrade channel: {what}"));
        let mut buf = vec![0u8; MESSAGE_MAX];
        loop {
            let (n, fds) = sys::recv_fds(inherited.channel.as_raw_fd(), &mut buf)?;
            if n == 0 {
                return Err(bad("the old process closed it before the end"));
            }
            let line = std::str::from_utf8(&buf[..n]).map_err(|_| bad("a message is not text"))?;
            let (kind, rest) = line.split_once(' ').unwrap_or((line, ""));
            if kind == "admin-socket" {
                let socket = fds.into_iter().next().ok_or_else(|| bad("admin-socket without a socket"))?;
                inherited.admin = Some((PathBuf::from(rest), UnixListener::from(socket)));
                continue;
            }
            let (address, name) = rest.split_once(' ').unwrap_or((rest, ""));
            let address = || address.parse::<SocketAddr>().map_err(|_| bad(line));
            match kind {
                "end" => return Ok(inherited),
                "listener" => {
                    let address = address()?;
                    let sockets = fds.into_iter().map(Socket::from);
                    match inherited.listeners.iter_mut().find(|(n, a, _)| n == name && *a == address) {
                        Some((_, _, existing)) => existing.extend(sockets),
                        None => inherited.listeners.push((name.to_string(), address, sockets.collect())),
                    }
                }
                "metrics" => {
                    let address = address()?;
                    let socket = fds.into_iter().next().ok_or_else(|| bad("metrics without a socket"))?;
                    inherited.metrics = Some((address, std::net::TcpListener::from(socket)));
                }
                "down" => inherited.carried.down.push((name.to_string(), address()?)),
                "setting" => {
                    // "setting ADDRESS STATE WEIGHT POOL": `name` holds "STATE WEIGHT POOL".
                    let mut rest = name.splitn(3, ' ');
                    let (state, weight, pool) = (rest.next(), rest.next(), rest.next());
                    let state = state.and_then(AdminState::parse).ok_or_else(|| bad(line))?;
                    let weight = match weight {
                        Some("-") => None,
                        Some(w) => Some(w.parse().map_err(|_| bad(line))?),
                        None => return Err(bad(line)),
                    };
                    let pool = pool.ok_or_else(|| bad(line))?;
                    inherited.carried.admin.put(pool, address()?, AdminSetting { state, weight });
                }
                _ => return Err(bad(line)),
            }
        }
    }

    /// The sockets of the listener called `name` if it was bound to what `bind` asks for
    /// (port 0: any port), else of one under another name bound to `bind` (a renamed
    /// listener; not for port 0).
    pub fn take_listener(&mut self, name: &str, bind: SocketAddr) -> Option<(SocketAddr, Vec<Socket>)> {
        let i = (self.listeners.iter().position(|(n, a, _)| n == name && matches(bind, *a)))
            .or_else(|| self.listeners.iter().position(|(_, a, _)| bind.port() != 0 && matches(bind, *a)))?;
        let (_, address, sockets) = self.listeners.swap_remove(i);
        Some((address, sockets))
    }

    /// The metrics port's socket, if it was bound to what `bind` asks for.
    pub fn take_metrics(&mut self, bind: SocketAddr) -> Option<std::net::TcpListener> {
        match self.metrics.take() {
            Some((address, socket)) if matches(bind, address) => Some(socket),
            _ => None,
        }
    }

    /// The admin socket, if it was at `path`.
    pub fn take_admin(&mut self, path: &Path) -> Option<UnixListener> {
        match self.admin.take() {
            Some((at, socket)) if at == path => Some(socket),
            other => {
                self.admin = other;
                None
            }
        }
    }

    /// How many listening sockets came, in all.
    pub fn count(&self) -> usize {
        self.listeners.iter().map(|(_, _, s)| s.len()).sum::<usize>()
            + usize::from(self.metrics.is_some())
            + usize::from(self.admin.is_some())
    }

    /// Tells the old process this one is serving: it stops accepting and drains.
    pub fn ready(self) -> io::Result<()> {
        sys::send_fds(self.channel.as_raw_fd(), format!("ready {}", std::process::id()).as_bytes(), &[])
    }
}

/// Whether a socket bound to `address` is what a config's `bind` asks for.
fn matches(bind: SocketAddr, address: SocketAddr) -> bool {
    bind.ip() == address.ip() && (bind.port() == 0 || bind.port() == address.port())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::IntoRawFd;

    fn listening(address: &str) -> std::net::TcpListener {
        std::net::TcpListener::bind(address).unwrap()
    }

    #[test]
    fn sockets_and_down_backends_arrive_by_name_and_address() {
        let (ours, theirs) = Socket::pair(Domain::UNIX, Type::SEQPACKET.cloexec(), None).unwrap();
        // More sockets than one message carries, so they come in two and are joined again.
        let workers: Vec<_> = (0..sys::FDS_PER_MESSAGE + 3).map(|_| listening("127.0.0.1:0")).collect();
        let address = workers[0].local_addr().unwrap();
        let other = listening("127.0.0.1:0");
        let metrics = listening("127.0.0.1:0");
        let handed = [
            Handed { name: "main db".into(), address, fds: workers.iter().map(|w| w.as_raw_fd()).collect() },
            Handed { name: "old".into(), address: other.local_addr().unwrap(), fds: vec![other.as_raw_fd()] },
        ];
        let metrics_handed =
            Handed { name: "metrics".into(), address: metrics.local_addr().unwrap(), fds: vec![metrics.as_raw_fd()] };
        let mut carried =
            Carried { down: vec![("replicas eu".to_string(), "10.0.0.7:5432".parse().unwrap())], ..Default::default() };
        carried.admin.put(
            "replicas eu",
            "10.0.0.8:5432".parse().unwrap(),
            AdminSetting { state: AdminState::Drain, weight: None },
        );
        carried.admin.put(
            "db",
            "10.0.0.9:5432".parse().unwrap(),
            AdminSetting { state: AdminState::Ready, weight: Some(7) },
        );
        // The channel holds it all before anyone reads (as the new process may start slowly).
        let admin_path = std::env::temp_dir().join(format!("ringlb-upgrade-test-{}.sock", std::process::id()));
        let _ = std::fs::remove_file(&admin_path);
        let admin = UnixListener::bind(&admin_path).unwrap();
        send(ours.as_raw_fd(), &handed, Some(&metrics_handed), Some((&admin_path, admin.as_raw_fd())), &carried)
            .unwrap();

        let mut inherited = Inherited::receive(theirs.into_raw_fd()).unwrap();
        assert_eq!(inherited.count(), workers.len() + 3);
        assert!(inherited.take_admin(Path::new("/elsewhere.sock")).is_none());
        assert!(inherited.take_admin(&admin_path).is_some());
        std::fs::remove_file(&admin_path).unwrap();
        assert_eq!(inherited.carried, carried);
        let any_port = SocketAddr::new(address.ip(), 0);
        assert!(inherited.take_listener("main", any_port).is_none(), "port 0 matches by name only");
        let (got, sockets) = inherited.take_listener("main db", any_port).unwrap();
        assert_eq!(got, address);
        assert_eq!(sockets.len(), workers.len());
        // The same sockets (same kernel socket, a new descriptor), in worker order.
        for (socket, worker) in sockets.iter().zip(&workers) {
            assert_eq!(socket.local_addr().unwrap().as_socket(), worker.local_addr().ok());
        }
        // A renamed listener on a fixed port is found by its address.
        assert!(inherited.take_listener("renamed", other.local_addr().unwrap()).is_some());
        assert!(inherited.take_metrics("127.0.0.2:9".parse().unwrap()).is_none(), "another address");
    }

    #[test]
    fn a_channel_closed_early_or_garbled_is_an_error() {
        let (ours, theirs) = Socket::pair(Domain::UNIX, Type::SEQPACKET.cloexec(), None).unwrap();
        sys::send_fds(ours.as_raw_fd(), b"listener nonsense x", &[]).unwrap();
        let error = Inherited::receive(theirs.into_raw_fd()).err().unwrap();
        assert!(error.to_string().contains("listener nonsense x"), "{error}");

        let (ours, theirs) = Socket::pair(Domain::UNIX, Type::SEQPACKET.cloexec(), None).unwrap();
        drop(ours);
        let error = Inherited::receive(theirs.into_raw_fd()).err().unwrap();
        assert!(error.to_string().contains("before the end"), "{error}");
    }
}
