//! Shared helpers for integration tests: start the real `ringlb` binary on free ports, run
//! real backend sockets, and look at the process from /proc.
#![allow(dead_code)]

use std::collections::HashMap;
use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::thread;
use std::time::{Duration, Instant};

/// Lets this test process open thousands of sockets.
pub fn raise_fd_limit() {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit);
        limit.rlim_cur = limit.rlim_max;
        libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
    }
}

/// A running `ringlb run` process with its log.
pub struct Ringlb {
    child: Child,
    /// Listener name -> the address it is bound to.
    pub addrs: HashMap<String, SocketAddr>,
    /// Where the metrics page is, when the config has `metrics_bind`.
    pub metrics_addr: Option<SocketAddr>,
    log: Arc<Mutex<String>>,
    /// While true, nothing reads the process's stderr (see [`Ringlb::pause_log`]).
    log_paused: Arc<(Mutex<bool>, std::sync::Condvar)>,
    config_path: std::path::PathBuf,
    /// The admin socket, when the config has `admin_socket`.
    pub admin_socket: Option<std::path::PathBuf>,
}

fn temp_path(suffix: &str) -> std::path::PathBuf {
    static COUNTER: AtomicUsize = AtomicUsize::new(0);
    std::env::temp_dir().join(format!(
        "ringlb-test-{}-{}.{suffix}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    ))
}

/// Copies the executable `from` to `to` (mode 0755) with `cp`, in a process of its own.
///
/// `std::fs::copy` would hold the new file open for writing in this process, and a child that
/// another test thread forks meanwhile inherits that descriptor until it execs: running the
/// copy then fails with ETXTBSY ("Text file busy").
pub fn copy_executable(from: &std::path::Path, to: &std::path::Path) {
    let status = Command::new("cp").arg(from).arg(to).status().expect("run cp");
    assert!(status.success(), "cp {} {} failed", from.display(), to.display());
    std::fs::set_permissions(to, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
}

/// Writes `text` to a fresh temporary file and returns its path.
pub fn write_temp(text: &str, suffix: &str) -> std::path::PathBuf {
    let path = temp_path(suffix);
    std::fs::write(&path, text).unwrap();
    path
}

impl Ringlb {
    /// Starts ringlb with `config` and waits until every listener is up.
    pub fn start(config: &str) -> Ringlb {
        Self::start_with_fd_limit(config, None)
    }

    /// As `start`, with the process's hard RLIMIT_NOFILE lowered to `fd_limit`.
    pub fn start_with_fd_limit(config: &str, fd_limit: Option<u64>) -> Ringlb {
        Self::spawn(std::path::Path::new(env!("CARGO_BIN_EXE_ringlb")), config, fd_limit)
    }

    /// As `start`, running the binary at `binary`.
    pub fn start_binary(binary: &std::path::Path, config: &str) -> Ringlb {
        Self::spawn(binary, config, None)
    }

    /// As `start`, with the command made by `command` from the binary's path and the config
    /// file's (it must run `ringlb run -c CONFIG` in the end: through a shell that sets
    /// LISTEN_PID, with more environment, ...). Standard error is the log, as for `start`.
    pub fn start_command(config: &str, command: impl FnOnce(&std::path::Path, &std::path::Path) -> Command) -> Ringlb {
        let config_path = write_temp(config, "toml");
        let mut command = command(std::path::Path::new(env!("CARGO_BIN_EXE_ringlb")), &config_path);
        command.env("RUST_LOG", "info").stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::piped());
        Self::launch(command, config, config_path)
    }

    fn spawn(binary: &std::path::Path, config: &str, fd_limit: Option<u64>) -> Ringlb {
        let config_path = write_temp(config, "toml");
        let mut command = Command::new(binary);
        command
            .args(["run", "--config"])
            .arg(&config_path)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        if let Some(limit) = fd_limit {
            use std::os::unix::process::CommandExt;
            // SAFETY: setrlimit is async-signal-safe; nothing else runs in the child here.
            unsafe {
                command.pre_exec(move || {
                    let l = libc::rlimit { rlim_cur: limit, rlim_max: limit };
                    if libc::setrlimit(libc::RLIMIT_NOFILE, &l) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        Self::launch(command, config, config_path)
    }

    fn launch(mut command: Command, config: &str, config_path: std::path::PathBuf) -> Ringlb {
        let mut child = command.spawn().expect("start ringlb");
        let stderr = child.stderr.take().unwrap();
        let log = Arc::new(Mutex::new(String::new()));
        let (tx, rx) = mpsc::channel();
        let log_writer = Arc::clone(&log);
        let log_paused = Arc::new((Mutex::new(false), std::sync::Condvar::new()));
        let paused = Arc::clone(&log_paused);
        thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                {
                    let (lock, resumed) = &*paused;
                    let _held = resumed.wait_while(lock.lock().unwrap(), |paused| *paused).unwrap();
                }
                // With log_format = "json", the message of a JSON line.
                let message = if line.starts_with('{') {
                    serde_json::from_str::<serde_json::Value>(&line)
                        .ok()
                        .and_then(|v| v["message"].as_str().map(|m| format!("] {m}")))
                        .unwrap_or_default()
                } else {
                    line.clone()
                };
                // "listener NAME on ADDRESS -> ..." (other lines about a listener, as errors, too
                // start with "listener NAME").
                if let Some(rest) = message.split("] listener ").nth(1) {
                    let words: Vec<&str> = rest.split_whitespace().collect();
                    if let [name, "on", addr, ..] = words[..]
                        && let Ok(addr) = addr.parse::<SocketAddr>()
                    {
                        let _ = tx.send((name.to_string(), addr));
                    }
                }
                if let Some(rest) = message.split("] metrics on http://").nth(1) {
                    let addr: SocketAddr = rest.trim_end_matches("/metrics").parse().unwrap();
                    let _ = tx.send(("metrics on".to_string(), addr));
                }
                let mut log = log_writer.lock().unwrap();
                log.push_str(&line);
                log.push('\n');
            }
        });
        // One log line per listener table ([listeners.NAME], not [listeners.NAME.sni]).
        let listeners = config
            .lines()
            .filter(|l| l.trim().starts_with("[listeners.") && l.trim().matches('.').count() == 1)
            .count();
        let expected = listeners + usize::from(config.contains("metrics_bind"));
        let mut addrs = HashMap::new();
        let deadline = Instant::now() + Duration::from_secs(20);
        while addrs.len() < expected {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok((name, addr)) => {
                    addrs.insert(name, addr);
                }
                Err(_) => {
                    let _ = child.kill();
                    panic!("ringlb did not start; log:\n{}", log.lock().unwrap());
                }
            }
        }
        let metrics_addr = addrs.remove("metrics on");
        let admin_socket = config
            .lines()
            .find_map(|l| l.trim().strip_prefix("admin_socket = "))
            .map(|v| std::path::PathBuf::from(v.trim_matches('"')));
        Ringlb { child, addrs, metrics_addr, log, log_paused, config_path, admin_socket }
    }

    /// Stops reading the process's stderr (after the line being read), so that its pipe fills
    /// and writes to it block, until [`Ringlb::resume_log`].
    pub fn pause_log(&self) {
        *self.log_paused.0.lock().unwrap() = true;
    }

    pub fn resume_log(&self) {
        *self.log_paused.0.lock().unwrap() = false;
        self.log_paused.1.notify_all();
    }

    /// Scrapes the metrics page: series (name with labels) -> value.
    pub fn metrics(&self) -> HashMap<String, f64> {
        let addr = self.metrics_addr.expect("config has no metrics_bind");
        let mut stream = connect(addr);
        stream.write_all(b"GET /metrics HTTP/1.1\r\nHost: ringlb\r\nConnection: close\r\n\r\n").unwrap();
        let (response, end) = read_until_end(&mut stream);
        end.unwrap();
        let text = String::from_utf8(response).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        assert!(head.starts_with("HTTP/1.1 200 OK"), "{head}");
        body.lines()
            .filter(|l| !l.starts_with('#') && !l.is_empty())
            .filter_map(|l| l.rsplit_once(' '))
            .map(|(series, value)| (series.to_string(), value.parse().unwrap()))
            .collect()
    }

    /// One backend's value of a per-backend metric.
    pub fn backend_metric(&self, name: &str, pool: &str, backend: SocketAddr) -> f64 {
        let series = format!("{name}{{pool=\"{pool}\",backend=\"{backend}\"}}");
        *self.metrics().get(&series).unwrap_or_else(|| panic!("no series {series}"))
    }

    /// The address of the only (or the named) listener.
    pub fn addr(&self) -> SocketAddr {
        assert_eq!(self.addrs.len(), 1, "several listeners; use addrs[name]");
        *self.addrs.values().next().unwrap()
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    pub fn signal(&self, signal: i32) {
        unsafe { libc::kill(self.pid(), signal) };
    }

    /// Waits for the process to exit, up to `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return Some(status);
            }
            if Instant::now() > deadline {
                return None;
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Sends SIGTERM, waits for a clean exit and returns the counters of the final log line.
    pub fn stop(&mut self) -> HashMap<String, u64> {
        self.signal(libc::SIGTERM);
        let status = self.wait_exit(Duration::from_secs(40)).expect("ringlb did not stop after SIGTERM");
        assert!(status.success(), "exit status {status}; log:\n{}", self.log());
        // The reader thread may still be appending the last lines.
        Ringlb::eventually(Duration::from_secs(5), || self.log().contains("] stopped: "));
        let log = self.log();
        let line = log.lines().find(|l| l.contains("] stopped: ")).expect("final counters line");
        line.split("] stopped: ")
            .nth(1)
            .unwrap()
            .split_whitespace()
            .filter_map(|kv| kv.split_once('='))
            .map(|(k, v)| (k.to_string(), v.parse().unwrap()))
            .collect()
    }

    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// Rewrites the config file with `config`, sends SIGHUP and waits for the reload's outcome:
    /// its log line (`reload: ...` or `reload failed, ...`).
    ///
    /// The log arrives through a pipe, so the outcome of a reload made another way (the admin
    /// API) may not be in it yet: with an admin socket or a metrics page, this first waits until
    /// the log holds an outcome for every reload ringlb has counted.
    pub fn reload(&self, config: &str) -> String {
        // Outcome lines only: a reload's warnings ("WARN ... reload: ...") come before its outcome.
        let outcomes = |log: &str| {
            log.lines()
                .filter(|l| (l.contains(" INFO ") && l.contains("] reload: ")) || l.contains("] reload failed"))
                .map(str::to_string)
                .collect::<Vec<_>>()
        };
        if let Some(counted) = self.reloads_counted() {
            assert!(
                Ringlb::eventually(Duration::from_secs(20), || outcomes(&self.log()).len() as u64 >= counted),
                "{counted} reloads counted, fewer outcomes logged:\n{}",
                self.log()
            );
        }
        let before = outcomes(&self.log()).len();
        self.write_config(config);
        self.signal(libc::SIGHUP);
        assert!(
            Ringlb::eventually(Duration::from_secs(20), || outcomes(&self.log()).len() > before),
            "no reload outcome logged:\n{}",
            self.log()
        );
        outcomes(&self.log())[before].clone()
    }

    /// Reloads so far (took effect and failed), from the admin API or the metrics page.
    fn reloads_counted(&self) -> Option<u64> {
        if self.admin_socket.is_some() {
            let (_, info) = self.admin("GET", "/v1/info", "");
            return Some(info["reloads"]["ok"].as_u64()? + info["reloads"]["failed"].as_u64()?);
        }
        self.metrics_addr?;
        let metrics = self.metrics();
        let count = |result: &str| metrics.get(&format!("ringlb_reloads_total{{result=\"{result}\"}}")).copied();
        Some((count("ok")? + count("failed")?) as u64)
    }

    /// Runs `ringlb ctl -c CONFIG ARGS...`: its exit code, standard output and error.
    pub fn ctl(&self, args: &[&str]) -> (i32, String, String) {
        let out = Command::new(env!("CARGO_BIN_EXE_ringlb"))
            .arg("ctl")
            .arg("-c")
            .arg(&self.config_path)
            .args(args)
            .output()
            .expect("run ringlb ctl");
        let text = |b: Vec<u8>| String::from_utf8_lossy(&b).into_owned();
        (out.status.code().unwrap_or(-1), text(out.stdout), text(out.stderr))
    }

    /// As [`Ringlb::ctl`], started in the background.
    pub fn ctl_child(&self, args: &[&str]) -> Child {
        Command::new(env!("CARGO_BIN_EXE_ringlb"))
            .arg("ctl")
            .arg("-c")
            .arg(&self.config_path)
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run ringlb ctl")
    }

    /// One admin API request: the HTTP status and the JSON body.
    pub fn admin(&self, method: &str, path: &str, body: &str) -> (u16, serde_json::Value) {
        let socket = self.admin_socket.as_ref().expect("config has admin_socket");
        let request = format!(
            "{method} {path} HTTP/1.1\r\nHost: ringlb\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        let response = unix_exchange(socket, request.as_bytes());
        let text = String::from_utf8(response).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap_or_else(|| panic!("no HTTP head in {text:?}"));
        let status = head.split_whitespace().nth(1).unwrap().parse().unwrap();
        (status, serde_json::from_str(body).unwrap_or_else(|_| serde_json::Value::String(body.to_string())))
    }

    /// The config file it runs with.
    pub fn config_path(&self) -> &std::path::Path {
        &self.config_path
    }

    /// Writes `config` to the config file (a reload or an upgrade reads it).
    pub fn write_config(&self, config: &str) {
        std::fs::write(&self.config_path, config).unwrap();
    }

    /// Sends SIGUSR2 and waits for the outcome: the new process, once the old one says it
    /// serves, or the line that says why not.
    pub fn upgrade(&self) -> Result<Successor, String> {
        let outcomes =
            |log: &str| log.lines().filter(|l| l.contains("] SIGUSR2: ")).map(str::to_string).collect::<Vec<_>>();
        let before = outcomes(&self.log()).len();
        self.signal(libc::SIGUSR2);
        assert!(
            Ringlb::eventually(Duration::from_secs(60), || outcomes(&self.log()).len() > before),
            "no upgrade outcome logged:\n{}",
            self.log()
        );
        let line = outcomes(&self.log())[before].clone();
        match line.split("] SIGUSR2: pid ").nth(1).and_then(|rest| rest.split_whitespace().next()) {
            Some(pid) if line.contains(" serves now") => Ok(Successor { pid: pid.parse().unwrap() }),
            _ => Err(line),
        }
    }

    /// Whether the process is still running.
    pub fn running(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }

    /// The address a listener added by a reload was bound to, from its log line.
    pub fn added_listener(&self, name: &str) -> SocketAddr {
        let needle = format!("] listener {name} on ");
        assert!(self.logged(&needle), "listener {name} not logged:\n{}", self.log());
        let log = self.log();
        let line = log.lines().rev().find(|l| l.contains(&needle)).unwrap();
        line.split(&needle).nth(1).unwrap().split_whitespace().next().unwrap().parse().unwrap()
    }

    /// Whether the log has `needle`, waiting for it a while: ringlb writes a line before the
    /// effect a test sees, but the line reaches the test through a pipe and a reader thread.
    pub fn logged(&self, needle: &str) -> bool {
        Ringlb::eventually(Duration::from_secs(10), || self.log().contains(needle))
    }

    /// Names of the process's threads.
    pub fn thread_names(&self) -> Vec<String> {
        let dir = format!("/proc/{}/task", self.pid());
        std::fs::read_dir(dir)
            .unwrap()
            .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
            .map(|s| s.trim().to_string())
            .collect()
    }

    /// Open file descriptors that are not pipes (a splice worker keeps empty pipes pooled).
    pub fn fd_count_without_pipes(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.pid()))
            .unwrap()
            .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
            .filter(|target| !target.to_string_lossy().starts_with("pipe:"))
            .count()
    }

    /// How many file descriptors the process has open.
    pub fn fd_count(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.pid())).unwrap().count()
    }

    /// Connections waiting in the accept queues of the listeners on `port` (IPv4), from
    /// /proc/net/tcp, where a listening socket's rx_queue is its accept-queue length.
    pub fn accept_queue(port: u16) -> usize {
        let table = std::fs::read_to_string("/proc/net/tcp").unwrap();
        table
            .lines()
            .skip(1)
            .filter_map(|line| {
                let fields: Vec<&str> = line.split_whitespace().collect();
                let local_port = u16::from_str_radix(fields.get(1)?.rsplit(':').next()?, 16).ok()?;
                let listening = *fields.get(3)? == "0A";
                let rx_queue = usize::from_str_radix(fields.get(4)?.split(':').nth(1)?, 16).ok()?;
                (listening && local_port == port).then_some(rx_queue)
            })
            .sum()
    }

    /// Polls until `f` holds or `timeout` passes; returns whether it held.
    pub fn eventually(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if f() {
                return true;
            }
            if Instant::now() > deadline {
                return false;
            }
            thread::sleep(Duration::from_millis(20));
        }
    }
}

/// Sends `request` on a new connection to the unix socket at `path`, closes the sending side
/// and returns everything that comes back.
pub fn unix_exchange(path: &std::path::Path, request: &[u8]) -> Vec<u8> {
    let mut stream = std::os::unix::net::UnixStream::connect(path).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    stream.write_all(request).unwrap();
    let _ = stream.shutdown(Shutdown::Write);
    let mut response = Vec::new();
    let _ = stream.read_to_end(&mut response);
    response
}

/// A path for an admin socket in a directory of its own (which does not exist yet).
pub fn admin_socket_path() -> std::path::PathBuf {
    temp_path("admin").join("admin.sock")
}

/// Makes this test process adopt orphaned descendants (PR_SET_CHILD_SUBREAPER): the process
/// an upgrade starts outlives its parent, ringlb, and is then this process's to wait for.
pub fn adopt_orphans() {
    // SAFETY: prctl with these arguments only sets a flag on this process.
    assert_eq!(unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) }, 0);
}

/// The process a binary upgrade started (see [`Ringlb::upgrade`]); killed when dropped.
pub struct Successor {
    pub pid: i32,
}

impl Successor {
    pub fn signal(&self, signal: i32) {
        // SAFETY: kill takes a pid and a signal.
        unsafe { libc::kill(self.pid, signal) };
    }

    /// Waits, up to `timeout`, for it to exit and returns its exit code (it is this process's
    /// to wait for once its parent has exited; see [`adopt_orphans`]).
    pub fn wait_exit(&self, timeout: Duration) -> Option<i32> {
        let mut code = None;
        Ringlb::eventually(timeout, || {
            let mut status = 0;
            // SAFETY: waitpid writes the status into a local.
            if unsafe { libc::waitpid(self.pid, &mut status, libc::WNOHANG) } == self.pid {
                code = Some(if libc::WIFEXITED(status) { libc::WEXITSTATUS(status) } else { -1 });
            }
            code.is_some()
        });
        code
    }

    /// Sends SIGTERM and returns its exit code once it exited.
    pub fn stop(&self) -> Option<i32> {
        self.signal(libc::SIGTERM);
        self.wait_exit(Duration::from_secs(40))
    }
}

impl Drop for Successor {
    fn drop(&mut self) {
        self.signal(libc::SIGKILL);
        let mut status = 0;
        // SAFETY: as in wait_exit; a pid that is not our child returns ECHILD at once.
        unsafe { libc::waitpid(self.pid, &mut status, 0) };
    }
}

impl Drop for Ringlb {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.config_path);
    }
}

/// A config with one listener on a free port and one pool `p` with `backends`. Health checks
/// are off unless `extra_pool` has a `[pools.p.health]` table: their probe connections would
/// show in backend accept counts and fd counts.
pub fn config_for(backends: &[SocketAddr], extra_top: &str, extra_pool: &str) -> String {
    let list: Vec<String> = backends.iter().map(|a| format!("{{ address = \"{a}\" }}")).collect();
    let workers = if extra_top.contains("workers") { "" } else { "workers = 2" };
    let health = if extra_pool.contains("[pools.p.health]") { "" } else { "\n[pools.p.health]\nenabled = false" };
    format!(
        "{workers}\n{extra_top}\n[listeners.test]\nbind = \"127.0.0.1:0\"\npool = \"p\"\n\n[pools.p]\nbackends = [{}]\n{extra_pool}\n{health}\n",
        list.join(", ")
    )
}

/// A backend listening on a free port; each connection is handed to `handler` on its own thread.
pub struct Backend {
    pub addr: SocketAddr,
    pub accepted: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
}

impl Backend {
    pub fn start(handler: impl Fn(TcpStream) + Send + Sync + 'static) -> Backend {
        Backend::start_on("127.0.0.1:0".parse().unwrap(), handler)
    }

    /// A backend on a given address, e.g. to bring one back on the port it had.
    pub fn start_on(addr: SocketAddr, handler: impl Fn(TcpStream) + Send + Sync + 'static) -> Backend {
        // std's listen backlog is 128; tests open a thousand connections at once.
        let socket = socket2::Socket::new(socket2::Domain::for_address(addr), socket2::Type::STREAM, None).unwrap();
        socket.set_reuse_address(true).unwrap();
        socket.bind(&addr.into()).unwrap();
        socket.listen(4096).unwrap();
        let listener: TcpListener = socket.into();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let handler = Arc::new(handler);
        let (accepted2, stop2) = (Arc::clone(&accepted), Arc::clone(&stop));
        thread::spawn(move || {
            for stream in listener.incoming() {
                if stop2.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(stream) = stream else { continue };
                accepted2.fetch_add(1, Ordering::SeqCst);
                let handler = Arc::clone(&handler);
                thread::Builder::new().stack_size(128 * 1024).spawn(move || handler(stream)).unwrap();
            }
        });
        Backend { addr, accepted, stop }
    }

    /// Echoes everything back and passes end of stream on.
    pub fn echo() -> Backend {
        Backend::start(echo)
    }

    pub fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }

    /// Closes the listening socket (new connections are refused); connections already
    /// accepted keep being served, as when a server stops accepting.
    pub fn stop_listening(&self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(self.addr);
        // The accept thread drops the listener when it sees the flag.
        assert!(
            Ringlb::eventually(Duration::from_secs(5), || TcpStream::connect(self.addr).is_err()),
            "backend {} still accepting",
            self.addr
        );
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(self.addr);
    }
}

pub fn echo(mut stream: TcpStream) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => {
                let _ = stream.shutdown(Shutdown::Write);
                return;
            }
            Ok(n) => {
                if stream.write_all(&buf[..n]).is_err() {
                    return;
                }
            }
        }
    }
}

/// A backend that answers "WHO\n" with "NAME\n" and "PING\r\n" with "+PONG\r\n", and echoes
/// anything else; `served` counts connections that sent a WHO (clients, not health checks).
pub fn identity(name: &'static str, served: Arc<AtomicUsize>) -> impl Fn(TcpStream) + Send + Sync + 'static {
    move |stream| {
        let mut reader = BufReader::new(stream.try_clone().unwrap());
        let mut writer = stream;
        let mut line = String::new();
        loop {
            line.clear();
            match reader.read_line(&mut line) {
                Ok(0) | Err(_) => {
                    let _ = writer.shutdown(Shutdown::Write);
                    return;
                }
                Ok(_) => {}
            }
            let reply = match line.as_str() {
                "WHO\n" => {
                    served.fetch_add(1, Ordering::SeqCst);
                    format!("{name}\n")
                }
                "PING\r\n" => "+PONG\r\n".to_string(),
                other => other.to_string(),
            };
            if writer.write_all(reply.as_bytes()).is_err() {
                return;
            }
        }
    }
}

/// Asks an identity backend (through ringlb) who it is.
pub fn who(stream: &mut TcpStream) -> std::io::Result<String> {
    stream.write_all(b"WHO\n")?;
    let mut name = Vec::new();
    let mut byte = [0u8; 1];
    while byte[0] != b'\n' {
        if stream.read(&mut byte)? == 0 {
            return Err(std::io::Error::new(ErrorKind::UnexpectedEof, "closed before answering"));
        }
        name.push(byte[0]);
    }
    name.pop();
    Ok(String::from_utf8(name).unwrap())
}

/// Connects to `addr` from source address `source` (any 127.0.0.0/8 address works here).
pub fn connect_from(source: std::net::IpAddr, addr: SocketAddr) -> TcpStream {
    try_connect_from(source, addr).unwrap()
}

/// As [`connect_from`], returning the error: a connection ringlb resets at once may already be
/// reset when `connect` returns (ECONNRESET from connect itself).
pub fn try_connect_from(source: std::net::IpAddr, addr: SocketAddr) -> std::io::Result<TcpStream> {
    let socket = socket2::Socket::new(socket2::Domain::for_address(addr), socket2::Type::STREAM, None)?;
    socket.bind(&SocketAddr::new(source, 0).into())?;
    socket.connect(&addr.into())?;
    let stream: TcpStream = socket.into();
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    Ok(stream)
}

/// A connection to `addr` whose local address is known even if `connect` fails: ringlb may
/// reset a refused connection before `connect` returns (ECONNRESET).
pub fn connect_bound(addr: SocketAddr) -> (SocketAddr, std::io::Result<TcpStream>) {
    let socket = socket2::Socket::new(socket2::Domain::for_address(addr), socket2::Type::STREAM, None).unwrap();
    let any: SocketAddr = if addr.is_ipv4() { "127.0.0.1:0".parse().unwrap() } else { "[::1]:0".parse().unwrap() };
    socket.bind(&any.into()).unwrap();
    let local = socket.local_addr().unwrap().as_socket().unwrap();
    let stream = socket.connect(&addr.into()).map(|()| TcpStream::from(socket));
    if let Ok(stream) = &stream {
        stream.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    }
    (local, stream)
}

/// Whether a connection from `source` to `addr` is closed or reset by ringlb without an
/// answer (before or after `connect` returns).
pub fn refused_from(source: std::net::IpAddr, addr: SocketAddr) -> bool {
    match try_connect_from(source, addr) {
        Err(e) => e.kind() == ErrorKind::ConnectionReset,
        Ok(mut stream) => {
            let mut buf = [0u8; 16];
            match stream.read(&mut buf) {
                Ok(0) => true,
                Err(e) => e.kind() == ErrorKind::ConnectionReset,
                Ok(_) => false,
            }
        }
    }
}

/// An address whose port is held but not listening: connecting to it is refused.
pub fn refusing_addr() -> (socket2::Socket, SocketAddr) {
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    socket.bind(&"127.0.0.1:0".parse::<SocketAddr>().unwrap().into()).unwrap();
    let addr = socket.local_addr().unwrap().as_socket().unwrap();
    (socket, addr)
}

/// Deterministic pseudo-random bytes (xorshift64*), different for each seed.
pub fn random_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        out.extend_from_slice(&state.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes());
    }
    out.truncate(len);
    out
}

/// Connects, with a read timeout so a broken relay fails the test instead of hanging it.
pub fn connect(addr: SocketAddr) -> TcpStream {
    let stream = TcpStream::connect(addr).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    stream
}

/// Sends `data` on a second thread while reading everything back until EOF.
pub fn send_and_read_all(stream: TcpStream, data: Arc<Vec<u8>>) -> std::io::Result<Vec<u8>> {
    let mut writer = stream.try_clone()?;
    let sender = thread::spawn(move || -> std::io::Result<()> {
        for chunk in data.chunks(256 * 1024) {
            writer.write_all(chunk)?;
        }
        writer.shutdown(Shutdown::Write)
    });
    let mut received = Vec::new();
    let mut reader = stream;
    reader.read_to_end(&mut received)?;
    sender.join().unwrap()?;
    Ok(received)
}

/// Reads until EOF or error, returning what came and how it ended.
pub fn read_until_end(stream: &mut TcpStream) -> (Vec<u8>, std::io::Result<()>) {
    let mut data = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => return (data, Ok(())),
            Ok(n) => data.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return (data, Err(e)),
        }
    }
}

/// One request/response round trip on an echoing connection.
pub fn round_trip(stream: &mut TcpStream, message: &[u8]) -> std::io::Result<()> {
    stream.write_all(message)?;
    let mut back = vec![0u8; message.len()];
    stream.read_exact(&mut back)?;
    assert_eq!(back, message);
    Ok(())
}

/// Drains and stops the in-process ringlb, and returns its counters by metric name.
pub fn stop_and_count(server: ringlb::server::Server) -> HashMap<&'static str, u64> {
    let shared = Arc::clone(server.shared());
    server.drain();
    server.join().expect("workers stop cleanly");
    ringlb::stats::totals(&shared.stats).into_iter().map(|(name, _, value)| (name, value)).collect()
}

/// Clients that keep exchanging messages on open connections, and one that opens a
/// connection per request, all checking every byte, until stopped.
pub struct Load {
    stop: Arc<AtomicBool>,
    exchanges: Arc<AtomicUsize>,
    threads: Vec<thread::JoinHandle<Result<(), String>>>,
}

impl Load {
    pub fn start(addr: SocketAddr) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let exchanges = Arc::new(AtomicUsize::new(0));
        let mut threads = Vec::new();
        for i in 0..6 {
            let (stop, exchanges) = (Arc::clone(&stop), Arc::clone(&exchanges));
            threads.push(thread::spawn(move || {
                let mut stream = TcpStream::connect(addr).map_err(|e| format!("connect: {e}"))?;
                stream.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    n += 1;
                    let message = random_bytes(1 + (n as usize * 7919 + i * 104_729) % 20_000, n ^ i as u64);
                    round_trip(&mut stream, &message)
                        .map_err(|e| format!("keep-alive client {i}, exchange {n}: {e}"))?;
                    exchanges.fetch_add(1, Ordering::Relaxed);
                }
                Ok(())
            }));
        }
        let (stop2, exchanges2) = (Arc::clone(&stop), Arc::clone(&exchanges));
        threads.push(thread::spawn(move || {
            let mut n = 0u64;
            while !stop2.load(Ordering::Relaxed) {
                n += 1;
                let mut stream = TcpStream::connect(addr).map_err(|e| format!("connection {n}: connect: {e}"))?;
                stream.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
                round_trip(&mut stream, format!("request {n}").as_bytes())
                    .map_err(|e| format!("connection {n}: {e}"))?;
                exchanges2.fetch_add(1, Ordering::Relaxed);
            }
            Ok(())
        }));
        Load { stop, exchanges, threads }
    }

    /// Waits until `n` more exchanges were done.
    pub fn wait_for(&self, n: usize) {
        let start = self.exchanges.load(Ordering::Relaxed);
        assert!(
            Ringlb::eventually(Duration::from_secs(30), || self.exchanges.load(Ordering::Relaxed) >= start + n),
            "the load stalled"
        );
    }

    /// Stops the clients; what went wrong, one line per client that failed.
    pub fn finish(self) -> Vec<String> {
        self.stop.store(true, Ordering::Relaxed);
        self.threads.into_iter().filter_map(|t| t.join().unwrap().err()).collect()
    }
}
