//! Starting and stopping ringlb: binds every worker's listeners (or takes them over from the
//! process it upgrades), starts the pinned workers, and turns signals into what they ask for:
//! a stop (SIGTERM, SIGINT, SIGQUIT) into a drain and, on a second request or at the drain
//! deadline, a close of what is left; SIGHUP into a reload; SIGUSR2 into a binary upgrade
//! (see [`upgrade`]).

use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use log::{error, info};

use crate::admission::Admission;
use crate::admission::sources::SourceLimit;
use crate::config::{Config, ListenerConfig, LogFormat};
use crate::conn::Relay;
use crate::control::reload::{ReloadError, Reloader, Report, Source};
use crate::control::snapshot::{Carried, first_snapshot};
use crate::control::thread::ControlPlan;
use crate::control::{ControlEvent, RunState, Shared, http};
use crate::spread::Handoff;
use crate::stats;
use crate::sys;
use crate::worker::{ListenerSettings, RingSizes, Worker, WorkerPlan};
use admin_socket::AdminSocket;
pub use listeners::Activated;
use listeners::{ListenerTable, SharedTable};
pub use notify::Notifier;
use tokio::sync::oneshot;
use upgrade::{Handed, Started};
pub use upgrade::{Inherited, Invocation, UpgradeError};

mod admin_socket;
mod listeners;
pub mod notify;
pub mod upgrade;

/// The listen backlog of every listener.
const BACKLOG: i32 = 4096;
/// Most pipes one worker holds at once, when it splices.
const MAX_PIPES_PER_WORKER: u64 = 1024;
/// Descriptors kept aside beyond those open at startup (log output, /proc reads, the odd
/// accept that slips past the cap).
const SPARE_FDS: u64 = 16;
/// Control-plane servers (the metrics port, the admin socket), each holding at most
/// [`http::MAX_CONNECTIONS`]: their descriptors are kept out of the data path's budget.
const CONTROL_SERVERS: u64 = 2;

/// Why ringlb could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("listener {listener}: cannot listen on {address}: {source}")]
    Bind { listener: String, address: SocketAddr, source: io::Error },
    #[error(
        "worker {worker}: cannot set up io_uring: {source} (ringlb needs Linux 6.1 or later with io_uring enabled)"
    )]
    Ring { worker: usize, source: io::Error },
    #[error("cannot start a worker thread: {0}")]
    Thread(io::Error),
    #[error("cannot create the workers' doorbells: {0}")]
    Doorbell(io::Error),
    #[error("admin_socket {path}: {message}")]
    AdminSocket { path: String, message: String },
    #[error(
        "listener {listener}: the running process has {handed} workers and this config says {workers}; an upgrade keeps the number of workers (restart ringlb to change it)"
    )]
    Workers { listener: String, handed: usize, workers: usize },
    #[error("user = {user:?} (line {line}): {message}")]
    RunAs { user: String, line: usize, message: String },
}

/// A running ringlb: its workers and the state they share.
pub struct Server {
    shared: Arc<Shared>,
    workers: Vec<JoinHandle<io::Result<()>>>,
    control: Option<JoinHandle<()>>,
    /// Every listener's sockets, which reloads change and an upgrade hands over.
    table: Arc<Mutex<ListenerTable>>,
    /// The metrics port's socket (the control thread owns it): for an upgrade.
    metrics_fd: Option<RawFd>,
    /// The admin socket's file and listening socket (the control thread owns it).
    admin: Option<(AdminSocket, RawFd)>,
    /// Set once an upgrade handed the sockets over: the admin socket file is the new
    /// process's then, and stays at exit.
    handed_over: std::sync::atomic::AtomicBool,
    /// Where the metrics page is served, if it is.
    pub metrics_addr: Option<SocketAddr>,
    /// The address each listener is bound to (with the real port when the config said 0), in
    /// config order.
    pub listen_addrs: Vec<(String, SocketAddr)>,
    /// How many connections the workers accept at most, together.
    pub max_connections: usize,
}

impl Server {
    /// Binds the listeners and starts the workers; returns once every worker's ring is up.
    pub fn start(config: &Config) -> Result<Server, StartError> {
        Self::start_with(config, RingSizes::default())
    }

    /// As [`Server::start`], for a config read from `path`: a reload (SIGHUP) reads it again.
    /// With `inherited` (this process is an upgrade), its sockets are used instead of binding
    /// where the config asks for the same, and its down backends start down.
    /// With `activated` (socket activation), listeners bound to a passed socket's address use
    /// it.
    pub fn start_from_file(
        config: &Config,
        path: &Path,
        inherited: Option<&mut Inherited>,
        activated: Option<&mut Activated>,
    ) -> Result<Server, StartError> {
        Self::start_inner(config, RingSizes::default(), Some(path.to_path_buf()), inherited, activated)
    }

    pub fn start_with(config: &Config, sizes: RingSizes) -> Result<Server, StartError> {
        Self::start_inner(config, sizes, None, None, None)
    }

    fn start_inner(
        config: &Config,
        sizes: RingSizes,
        path: Option<PathBuf>,
        mut inherited: Option<&mut Inherited>,
        activated: Option<&mut Activated>,
    ) -> Result<Server, StartError> {
        let fd_limit = match sys::raise_nofile_limit() {
            Ok(limit) => limit,
            Err(e) => {
                log::warn!("cannot raise the file-descriptor limit: {e}");
                1024
            }
        };
        let workers = config.workers.get();
        let cpus = sys::allowed_cpus();
        crate::connlog::configure(config.connection_log, config.log_format == LogFormat::Json);

        // Bind every worker's listener here, so a bad address fails the start, not a thread.
        let (mut table, listeners_by_worker) =
            ListenerTable::bind(config, workers, inherited.as_deref_mut(), activated)?;
        let listen_addrs = table.addresses();

        let metrics = match config.metrics_bind {
            Some(address) => match inherited.as_deref_mut().and_then(|i| i.take_metrics(address)) {
                Some(socket) => Some(socket),
                None => Some(std::net::TcpListener::bind(address).map_err(|source| StartError::Bind {
                    listener: "metrics".into(),
                    address,
                    source,
                })?),
            },
            None => None,
        };
        let metrics_addr = metrics.as_ref().and_then(|m| m.local_addr().ok());
        let metrics_fd = metrics.as_ref().map(|m| m.as_raw_fd());
        let (admin_listener, admin) = match &config.admin_socket {
            Some(path) => {
                let inherited = inherited.as_deref_mut().and_then(|i| i.take_admin(path));
                let owner = config.run_as.as_ref().map(|r| (r.uid, r.gid));
                let (listener, socket) = AdminSocket::bind(path, inherited, owner)?;
                let fd = listener.as_raw_fd();
                (Some(listener), Some((socket, fd)))
            }
            None => (None, None),
        };

        // Every socket is bound: leave root before any thread starts or a connection comes.
        if let Some(run_as) = &config.run_as {
            become_run_as(run_as)?;
        }
        // The first thread: log lines go through it from here on.
        crate::logger::start();

        let carried = inherited.map(|i| i.carried.clone()).unwrap_or_default();
        let snapshot = first_snapshot(config, &carried);
        let (shared, events) = Shared::new(snapshot, workers, config.spread).map_err(StartError::Doorbell)?;
        let shared = Arc::new(shared);
        let handoff = shared.pack().map(|_| Arc::new(Handoff::new(workers)));

        // Every connection holds two descriptors. Splicing workers may also hold up to
        // `pipe_limit` pipes of two each (a quarter of the budget at most, 1024 per worker at
        // most), set aside here; the rings (one each) are not open yet.
        let open_now = sys::open_fd_count().map_or(64, |n| n as u64);
        // What the control thread may hold at once: its servers' connections and one health
        // check per backend.
        let checked: usize = config.pools.iter().filter(|p| p.health.is_some()).map(|p| p.backends.len()).sum();
        let control = CONTROL_SERVERS * http::MAX_CONNECTIONS as u64 + checked as u64;
        let budget = fd_limit.saturating_sub(open_now + workers as u64 + SPARE_FDS + control);
        let pipe_limit = match (config.relay, sizes.pipes) {
            (Relay::Copy, _) => 0,
            (_, Some(pipes)) => pipes as u64,
            _ => (budget / 4 / (2 * workers as u64)).clamp(1, MAX_PIPES_PER_WORKER),
        };
        let connection_capacity = budget.saturating_sub(2 * pipe_limit * workers as u64) / 2;
        let max_connections = match config.max_connections {
            Some(max) => {
                if max.get() as u64 > connection_capacity {
                    log::warn!(
                        "max_connections {max} is more than the file-descriptor limit ({fd_limit}) allows (about {connection_capacity}); past that, accepting backs off"
                    );
                }
                max.get()
            }
            None => connection_capacity as usize,
        };
        let per_worker = (max_connections / workers).max(1);
        let (mailboxes, changes): (Vec<_>, Vec<_>) = (0..workers).map(|_| mpsc::channel()).unzip();
        table.connect(Arc::clone(&shared), mailboxes);
        let table = Arc::new(Mutex::new(table));
        let (ready_tx, ready_rx) = mpsc::channel();
        let mut handles = Vec::with_capacity(workers);
        for (index, (listeners, changes)) in listeners_by_worker.into_iter().zip(changes).enumerate() {
            let plan = WorkerPlan {
                index,
                cpu: (!cpus.is_empty()).then(|| cpus[index % cpus.len()]),
                listeners,
                drain_timeout: config.drain_timeout,
                max_connections: per_worker,
                relay: config.relay,
                pipe_size: config.pipe_size,
                pipe_limit: pipe_limit as usize,
                sizes,
                doorbell: shared.doorbell(index),
                handoff: handoff.clone(),
                accept_backlog: accept_backlog(),
                changes,
            };
            let shared = Arc::clone(&shared);
            let ready = ready_tx.clone();
            let handle = std::thread::Builder::new()
                .name(format!("ringlb-w{index}"))
                .spawn(move || match Worker::new(plan, shared) {
                    Ok(worker) => {
                        let _ = ready.send((index, None));
                        worker.run()
                    }
                    Err(e) => {
                        let message = e.to_string();
                        let _ = ready.send((index, Some(e)));
                        Err(io::Error::other(message))
                    }
                })
                .map_err(StartError::Thread)?;
            handles.push(handle);
        }
        drop(ready_tx);

        let mut failure = None;
        for _ in 0..workers {
            match ready_rx.recv() {
                Ok((_, None)) => {}
                Ok((worker, Some(source))) => {
                    failure.get_or_insert(StartError::Ring { worker, source });
                }
                Err(_) => {
                    failure.get_or_insert(StartError::Thread(io::Error::other("a worker exited while starting")));
                }
            }
        }
        let control = match failure {
            None => crate::control::thread::spawn(
                ControlPlan {
                    config: Arc::new(config.clone()),
                    metrics,
                    admin: admin_listener,
                    per_worker: per_worker as u64,
                    reloader: Reloader { path, listeners: Box::new(SharedTable(Arc::clone(&table))) },
                    carried,
                },
                Arc::clone(&shared),
                events,
            )
            .map(Some)
            .map_err(StartError::Thread),
            Some(failure) => Err(failure),
        };
        let (control, failure) = match control {
            Ok(control) => (control, None),
            Err(failure) => (None, Some(failure)),
        };
        let server = Server {
            shared,
            workers: handles,
            control,
            table,
            metrics_fd,
            admin,
            handed_over: Default::default(),
            listen_addrs,
            metrics_addr,
            max_connections: per_worker * workers,
        };
        if let Some(failure) = failure {
            server.shared.advance(RunState::Closing);
            let _ = server.join();
            return Err(failure);
        }
        info!(
            "{workers} workers running, up to {} connections ({per_worker} per worker); the file-descriptor limit ({fd_limit}) allows about {connection_capacity} (2 descriptors each){}",
            server.max_connections,
            if pipe_limit > 0 { format!(", with {pipe_limit} pipes per worker for splicing") } else { String::new() }
        );
        Ok(server)
    }

    /// Reloads the config (see [`crate::control::reload`]) and waits for the outcome, which
    /// the control thread also logs and counts.
    pub fn reload(&self, source: Source) -> Result<Report, ReloadError> {
        let (reply, outcome) = oneshot::channel();
        self.shared.notify(ControlEvent::Reload { source, reply: Some(reply) });
        outcome.blocking_recv().unwrap_or(Err(ReloadError::Stopping))
    }

    /// Starts the binary again as `invocation` says and hands it this process's listening
    /// sockets and down backends (see [`upgrade`]); returns the new process's pid once it
    /// serves. This process then stops serving the metrics port and should drain.
    pub fn upgrade(&self, invocation: &Invocation) -> Result<u32, UpgradeError> {
        let started = {
            // Held while the sockets are sent, so that no reload closes one meanwhile.
            let table = self.table.lock().unwrap_or_else(|e| e.into_inner());
            let metrics = self.metrics_fd.zip(self.metrics_addr).map(|(fd, address)| Handed {
                name: "metrics".into(),
                address,
                fds: vec![fd],
            });
            let admin = self.admin.as_ref().map(|(socket, fd)| (socket.path.as_path(), *fd));
            Started::start(invocation, &table.sockets(), metrics.as_ref(), admin, &self.carried())?
        };
        info!("upgrade: started pid {}; waiting until it serves", started.pid());
        let pid = started.wait_ready()?;
        self.handed_over.store(true, std::sync::atomic::Ordering::Relaxed);
        self.shared.notify(ControlEvent::HandedOver);
        Ok(pid)
    }

    /// What an upgrade carries, as the current snapshot has it: the backends marked down now
    /// and what operators set.
    fn carried(&self) -> Carried {
        let snapshot = self.shared.snapshot();
        let mut carried = Carried::default();
        for pool in &snapshot.pools {
            let name = &pool.settings.name;
            for (i, backend) in pool.backends.iter().enumerate() {
                if !pool.up[i] {
                    carried.down.push((name.clone(), backend.address));
                }
                carried.admin.put(name, backend.address, pool.admin[i]);
            }
        }
        carried
    }

    /// Stops accepting and lets open connections finish (until the drain deadline).
    pub fn drain(&self) {
        self.shared.advance(RunState::Draining);
    }

    /// Closes every connection now.
    pub fn close_now(&self) {
        self.shared.advance(RunState::Closing);
    }

    /// Whether any worker has exited (all do, after a drain; one alone means it failed).
    pub fn any_worker_exited(&self) -> bool {
        self.workers.iter().any(|w| w.is_finished())
    }

    pub fn all_workers_exited(&self) -> bool {
        self.workers.iter().all(|w| w.is_finished())
    }

    pub fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    /// Waits for every worker, then stops the control thread; the first worker error, if any,
    /// is returned.
    pub fn join(self) -> io::Result<()> {
        let mut result = Ok(());
        for (index, handle) in self.workers.into_iter().enumerate() {
            let outcome = handle.join().unwrap_or_else(|_| Err(io::Error::other("worker panicked")));
            if let Err(e) = outcome {
                error!("worker {index} failed: {e}");
                if result.is_ok() {
                    result = Err(e);
                }
            }
        }
        self.shared.notify(ControlEvent::Stop);
        if let Some(control) = self.control
            && control.join().is_err()
        {
            error!("the control thread panicked");
        }
        if let Some((socket, _)) = &self.admin
            && !self.handed_over.load(std::sync::atomic::Ordering::Relaxed)
        {
            socket.remove();
        }
        result
    }

    /// Serves until SIGTERM, SIGINT or SIGQUIT, then drains: a second one closes what is left
    /// at once. SIGHUP reloads the config; SIGUSR2 upgrades to the binary `invocation` starts
    /// and, once the new process serves, drains (if the upgrade fails, this process keeps
    /// serving). Other handled signals are logged and change nothing. Returns when every
    /// worker has stopped. The signals must already be blocked in every thread (see
    /// [`sys::block_signals`]), which `main` does before starting.
    pub fn serve_until_stopped(
        self,
        signals: &libc::sigset_t,
        invocation: Option<&Invocation>,
        notifier: &mut Notifier,
    ) -> io::Result<()> {
        let mut stopping = false;
        loop {
            notifier.tick(&self.shared);
            match sys::wait_signal_timeout(signals, Duration::from_millis(200))? {
                Some(signal @ (libc::SIGTERM | libc::SIGINT | libc::SIGQUIT)) if !stopping => {
                    stopping = true;
                    // Acted on before it is logged: a log line may wait for stderr.
                    self.drain();
                    notifier.stopping();
                    info!("{}: draining; stop accepting, open connections may finish", sys::signal_name(signal));
                }
                Some(signal @ (libc::SIGTERM | libc::SIGINT | libc::SIGQUIT)) => {
                    self.close_now();
                    info!("{}: closing remaining connections now", sys::signal_name(signal));
                }
                Some(libc::SIGHUP) if !stopping => {
                    info!("SIGHUP: reloading the config");
                    notifier.reloading();
                    // The control thread logs and counts the outcome.
                    let outcome = self.reload(Source::File);
                    notifier.reloaded(&self.shared, outcome.as_ref().err().map(ToString::to_string).as_deref());
                }
                Some(libc::SIGUSR2) if !stopping => match invocation.map(|i| self.upgrade(i)) {
                    Some(Ok(pid)) => {
                        info!(
                            "SIGUSR2: pid {pid} serves now; pid {} stops accepting and drains its open connections",
                            std::process::id()
                        );
                        stopping = true;
                        // The new process is systemd's main process from here on.
                        notifier.main_pid(pid);
                        self.drain();
                    }
                    Some(Err(e)) => error!("SIGUSR2: upgrade failed, this process keeps serving: {e}"),
                    None => error!("SIGUSR2: cannot upgrade: the path of this binary is not known"),
                },
                Some(signal) => info!("{}: ignored; {}", sys::signal_name(signal), ignored_because(signal)),
                None => {}
            }
            if !stopping && self.any_worker_exited() {
                error!("a worker stopped unexpectedly; stopping the others");
                self.close_now();
                break;
            }
            if stopping && self.all_workers_exited() {
                break;
            }
        }
        let shared = Arc::clone(&self.shared);
        let result = self.join();
        let totals = stats::totals(&shared.stats);
        let summary: Vec<String> = totals
            .iter()
            .filter(|(name, _, _)| !name.ends_with("_active"))
            .map(|(name, _, value)| format!("{}={value}", name.trim_start_matches("ringlb_")))
            .collect();
        info!("stopped: {}", summary.join(" "));
        result
    }
}

/// Runs as `run_as` from now on: as root, becomes that user and group (and so drops every
/// capability); already that user (the new process of an upgrade, or started so), nothing to
/// do; as anyone else, an error.
fn become_run_as(run_as: &crate::config::RunAs) -> Result<(), StartError> {
    let error = |message: String| StartError::RunAs { user: run_as.user.clone(), line: run_as.line, message };
    match sys::effective_uid() {
        uid if uid == run_as.uid => Ok(()),
        0 => {
            sys::become_user(run_as.uid, run_as.gid)
                .map_err(|e| error(format!("cannot become uid {}: {e}", run_as.uid)))?;
            info!("running as user {} (uid {}, gid {}) from here on", run_as.user, run_as.uid, run_as.gid);
            Ok(())
        }
        uid => Err(error(format!(
            "ringlb runs as uid {uid}, not root, so it cannot become uid {}; start it as root, or as that user, or leave user out",
            run_as.uid
        ))),
    }
}

/// What a worker uses of a listener's config; `sources` is its per-source limit, shared by
/// every worker.
pub(crate) fn listener_settings(
    listener: &ListenerConfig,
    workers: usize,
    sources: Option<Arc<SourceLimit>>,
) -> ListenerSettings {
    ListenerSettings {
        name: listener.name.clone(),
        admission: Admission {
            accept_proxy: listener.accept_proxy,
            sni: listener.sni.clone(),
            default_pool: listener.pool,
        },
        access: listener.access.clone(),
        proxy_from: listener.proxy_from.clone(),
        sources,
        idle_timeout: listener.idle_timeout,
        handshake_timeout: listener.handshake_timeout,
        max_connections: listener.max_connections.map(|n| (n.get() / workers).max(1)),
    }
}

/// How many connections one listener's accept queue holds: the backlog ringlb asks for,
/// capped by the kernel's net.core.somaxconn.
fn accept_backlog() -> usize {
    let somaxconn = std::fs::read_to_string("/proc/sys/net/core/somaxconn").ok().and_then(|s| s.trim().parse().ok());
    somaxconn.map_or(BACKLOG as usize, |max: usize| max.min(BACKLOG as usize))
}

/// Why a handled signal that stops nothing is ignored, for the log line.
fn ignored_because(signal: libc::c_int) -> &'static str {
    match signal {
        libc::SIGUSR1 => "ringlb logs to stderr, so there is no log file to reopen",
        libc::SIGHUP => "ringlb is stopping, so it does not reload",
        libc::SIGUSR2 => "ringlb is stopping (or has upgraded), so it does not upgrade",
        _ => "it has no meaning for ringlb",
    }
}
