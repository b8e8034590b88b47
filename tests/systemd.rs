//! Running under systemd without systemd: the notify protocol on a `NOTIFY_SOCKET` the test
//! listens on, the watchdog, socket activation with `LISTEN_FDS`/`LISTEN_PID`, and dropping
//! root for the config's `user`.

mod common;

use std::net::{SocketAddr, TcpListener};
use std::os::unix::net::UnixDatagram;
use std::os::unix::process::CommandExt;
use std::process::Command;
use std::time::Duration;

use common::*;

const WAIT: Duration = Duration::from_secs(30);

/// A notify socket: the datagrams ringlb sends.
struct NotifySocket {
    socket: UnixDatagram,
    path: std::path::PathBuf,
}

impl NotifySocket {
    fn new() -> NotifySocket {
        let path = std::env::temp_dir().join(format!("ringlb-notify-{}-{}", std::process::id(), rand_suffix()));
        let socket = UnixDatagram::bind(&path).unwrap();
        NotifySocket { socket, path }
    }

    /// The next message, within `timeout`.
    fn next(&self, timeout: Duration) -> Option<String> {
        self.socket.set_read_timeout(Some(timeout)).unwrap();
        let mut buf = [0u8; 4096];
        let n = self.socket.recv(&mut buf).ok()?;
        Some(String::from_utf8_lossy(&buf[..n]).into_owned())
    }

    /// Messages until one contains `needle` (returned), skipping others; panics after WAIT.
    fn until(&self, needle: &str) -> String {
        let deadline = std::time::Instant::now() + WAIT;
        let mut seen = Vec::new();
        while std::time::Instant::now() < deadline {
            match self.next(Duration::from_secs(1)) {
                Some(message) if message.contains(needle) => return message,
                Some(message) => seen.push(message),
                None => {}
            }
        }
        panic!("no message with {needle:?}; saw {seen:?}");
    }
}

impl Drop for NotifySocket {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

fn rand_suffix() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}

fn run(binary: &std::path::Path, config: &std::path::Path) -> Command {
    let mut command = Command::new(binary);
    command.args(["run", "-c"]).arg(config);
    command
}

#[test]
fn ready_reloading_and_stopping_are_told_to_the_notify_socket() {
    let backend = Backend::echo();
    let notify = NotifySocket::new();
    let config = config_for(&[backend.addr], "", "");
    let mut lb = Ringlb::start_command(&config, |binary, path| {
        let mut command = run(binary, path);
        command.env("NOTIFY_SOCKET", &notify.path);
        command
    });
    let ready = notify.until("READY=1");
    assert!(ready.contains("STATUS=0 connections open; 1 of 1 backends up"), "{ready}");
    // Serving by the time READY=1 came.
    round_trip(&mut connect(lb.addr()), b"hello\n").unwrap();

    lb.signal(libc::SIGHUP);
    let reloading = notify.until("RELOADING=1");
    let usec =
        reloading.lines().find_map(|l| l.strip_prefix("MONOTONIC_USEC=")).expect("MONOTONIC_USEC in the same message");
    let mut now = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut now) };
    assert!(usec.parse::<i128>().unwrap() <= now.tv_sec as i128 * 1_000_000 + now.tv_nsec as i128 / 1000);
    let reloaded = notify.until("READY=1");
    assert!(reloaded.contains("STATUS=reloaded;"), "{reloaded}");

    // A config that does not validate: READY=1 all the same, with the error.
    lb.write_config("workers = nope");
    lb.signal(libc::SIGHUP);
    notify.until("RELOADING=1");
    let refused = notify.until("READY=1");
    assert!(refused.contains("STATUS=reload failed"), "{refused}");
    assert!(refused.contains("workers"), "{refused}");

    lb.signal(libc::SIGTERM);
    notify.until("STOPPING=1");
    assert!(lb.wait_exit(WAIT).is_some());
}

#[test]
fn without_a_notify_socket_nothing_is_sent() {
    let backend = Backend::echo();
    let lb = Ringlb::start(&config_for(&[backend.addr], "", ""));
    round_trip(&mut connect(lb.addr()), b"x\n").unwrap();
    assert!(!lb.logged("systemd"), "{}", lb.log());
}

#[test]
fn the_watchdog_is_fed_while_every_worker_ticks_and_starves_when_one_hangs() {
    let backend = Backend::echo();
    let notify = NotifySocket::new();
    let stall = std::env::temp_dir().join(format!("ringlb-stall-{}-{}", std::process::id(), rand_suffix()));
    let config = config_for(&[backend.addr], "", "");
    let lb = Ringlb::start_command(&config, |binary, path| {
        let mut command = run(binary, path);
        command
            .env("NOTIFY_SOCKET", &notify.path)
            .env("WATCHDOG_USEC", "4000000")
            .env("RINGLB_TEST_STALL_FILE", &stall);
        command
    });
    notify.until("READY=1");
    notify.until("WATCHDOG=1");
    notify.until("WATCHDOG=1");
    std::fs::write(&stall, "").unwrap();
    assert!(Ringlb::eventually(WAIT, || lb.logged("did not tick")), "the stalled worker went unnoticed:\n{}", lb.log());
    assert!(lb.logged("worker 0: stalled on purpose"), "{}", lb.log());
    // Pings sent before the stall was noticed are already queued (a datagram is delivered when
    // it is sent, before the log line reaches this test): drop them.
    while notify.next(Duration::from_millis(1)).is_some() {}
    // No ping after that: two ping intervals pass without one.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while let Some(message) =
        notify.next(deadline.saturating_duration_since(std::time::Instant::now()).max(Duration::from_millis(1)))
    {
        assert!(!message.contains("WATCHDOG=1"), "a ping while a worker hangs: {message}");
        if std::time::Instant::now() >= deadline {
            break;
        }
    }
    let _ = std::fs::remove_file(&stall);
}

#[test]
fn an_upgrade_hands_systemd_the_new_main_pid() {
    adopt_orphans();
    let backend = Backend::echo();
    let notify = NotifySocket::new();
    let config = config_for(&[backend.addr], "", "");
    let lb = Ringlb::start_command(&config, |binary, path| {
        let mut command = run(binary, path);
        command.env("NOTIFY_SOCKET", &notify.path);
        command
    });
    notify.until("READY=1");
    let successor = lb.upgrade().expect("upgrade");
    let handed = notify.until("MAINPID=");
    assert!(handed.contains(&format!("MAINPID={}", successor.pid)), "{handed}");
    round_trip(&mut connect(lb.addr()), b"after\n").unwrap();
    successor.stop();
}

#[test]
fn a_listener_takes_the_socket_systemd_passed() {
    let backend = Backend::echo();
    // The socket systemd would have bound (ringlb.socket's ListenStream=).
    let passed = TcpListener::bind("127.0.0.1:0").unwrap();
    let address = passed.local_addr().unwrap();
    let fd = std::os::fd::AsRawFd::as_raw_fd(&passed);
    let config =
        config_for(&[backend.addr], "", "").replace("bind = \"127.0.0.1:0\"", &format!("bind = \"{address}\""));
    let lb = Ringlb::start_command(&config, |binary, path| {
        // LISTEN_PID must be ringlb's own pid: a shell sets it and execs ringlb.
        let mut command = Command::new("sh");
        command.arg("-c").arg("LISTEN_PID=$$ exec \"$0\" run -c \"$1\"").arg(binary).arg(path).env("LISTEN_FDS", "1");
        // SAFETY: dup2 is async-signal-safe; the descriptor becomes fd 3, as systemd passes it.
        unsafe {
            command.pre_exec(move || {
                if libc::dup2(fd, 3) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        command
    });
    assert_eq!(lb.addr(), address);
    assert!(lb.logged(&format!("using the socket systemd passed for {address}")), "{}", lb.log());
    // The test's own copy goes; the passed one serves.
    drop(passed);
    for _ in 0..20 {
        round_trip(&mut connect(address), b"activated\n").unwrap();
    }
}

#[test]
fn started_as_root_it_becomes_the_configured_user_with_no_capabilities() {
    let backend = Backend::echo();
    // A port below 1024, which only root (or CAP_NET_BIND_SERVICE) may bind.
    let port = (900..1000).find(|&p| TcpListener::bind(("127.0.0.1", p)).is_ok()).expect("a free port below 1000");
    let address: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let socket = admin_socket_path();
    let top = format!("user = \"nobody\"\nadmin_socket = \"{}\"", socket.display());
    let config =
        config_for(&[backend.addr], &top, "").replace("bind = \"127.0.0.1:0\"", &format!("bind = \"{address}\""));
    let mut lb = Ringlb::start(&config);
    assert!(lb.logged("running as user nobody (uid 65534, gid 65534)"), "{}", lb.log());
    let status = std::fs::read_to_string(format!("/proc/{}/status", lb.pid())).unwrap();
    let field =
        |name: &str| status.lines().find_map(|l| l.strip_prefix(name)).unwrap().split_whitespace().collect::<Vec<_>>();
    assert_eq!(field("Uid:"), vec!["65534"; 4], "{status}");
    assert_eq!(field("Gid:"), vec!["65534"; 4], "{status}");
    assert_eq!(field("Groups:"), vec!["65534"], "{status}");
    for caps in ["CapInh:", "CapPrm:", "CapEff:", "CapAmb:"] {
        assert_eq!(field(caps), vec!["0000000000000000"], "{caps} {status}");
    }
    // Every thread, not only the main one.
    for task in std::fs::read_dir(format!("/proc/{}/task", lb.pid())).unwrap() {
        let status = std::fs::read_to_string(task.unwrap().path().join("status")).unwrap();
        assert!(status.contains("CapEff:\t0000000000000000"), "{status}");
        assert!(status.contains("Uid:\t65534\t65534\t65534\t65534"), "{status}");
    }
    round_trip(&mut connect(address), b"low port\n").unwrap();
    let (code, out, _) = lb.ctl(&["info"]);
    assert_eq!(code, 0, "{out}");
    lb.stop();
    assert!(!socket.exists(), "the admin socket is left behind after dropping root");
}

#[test]
fn a_config_with_user_started_as_another_user_than_root_or_that_one_is_refused() {
    let backend = Backend::echo();
    let path = write_temp(&config_for(&[backend.addr], "user = \"root\"", ""), "toml");
    // nobody may not reach the build's binary (the checkout may sit in a private directory):
    // run a copy from the temporary directory.
    let binary = std::env::temp_dir().join(format!("ringlb-as-nobody-{}", std::process::id()));
    copy_executable(std::path::Path::new(env!("CARGO_BIN_EXE_ringlb")), &binary);
    let mut command = Command::new(&binary);
    command.args(["run", "-c"]).arg(&path);
    // SAFETY: setgid and setuid are async-signal-safe; the child runs as nobody from here.
    unsafe {
        command.pre_exec(|| {
            if libc::setgid(65534) != 0 || libc::setuid(65534) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let out = command.output();
    let _ = std::fs::remove_file(&binary);
    let out = out.unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("user = \"root\" (line 2): ringlb runs as uid 65534, not root"), "{stderr}");
}

#[test]
fn a_user_that_does_not_exist_is_a_config_error() {
    let path = write_temp(
        "user = \"no-such-user-here\"\n[listeners.a]\nbind = \"127.0.0.1:0\"\npool = \"p\"\n[pools.p]\nbackends = [{ address = \"127.0.0.1:9\" }]\n",
        "toml",
    );
    let out = Command::new(env!("CARGO_BIN_EXE_ringlb")).args(["check", "-c"]).arg(&path).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains(":1: user: there is no user \"no-such-user-here\""), "{stderr}");
}
