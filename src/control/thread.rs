//! The control thread: a tokio-uring runtime that probes every backend of every pool with
//! health checks enabled, counts workers' failed connects as failed checks, publishes a new
//! snapshot when a backend goes up or down, serves the metrics page and, with
//! `spread = "pack"`, sets how many workers are in use.

use std::io;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{SystemTime, UNIX_EPOCH};

use log::{error, info, warn};
use tokio::sync::mpsc::{UnboundedReceiver, unbounded_channel};

use serde_json::json;

use super::admin::AdminStates;
use super::api::{self, Answer, Command, View};
use super::checks::{Checked, Checks};
use super::dns::{self, Looked, Names};
use super::reload::{self, ReloadError, Reloader, Report, Source};
use super::snapshot::{self, Carried};
use super::{ControlEvent, RunState, Shared, http, status};
use crate::config::Config;
use crate::health::CheckFailure;
use crate::spread;

/// What the control thread starts with besides the shared state.
pub struct ControlPlan {
    pub config: Arc<Config>,
    /// An already bound listener for the metrics page and the status page.
    pub metrics: Option<std::net::TcpListener>,
    /// An already bound unix socket for the admin API.
    pub admin: Option<std::os::unix::net::UnixListener>,
    /// Each worker's share of `max_connections`.
    pub per_worker: u64,
    /// What a reload needs of the server side.
    pub reloader: Reloader,
    /// What an upgrade brought from the process before.
    pub carried: Carried,
}

/// Starts the control thread and returns once its runtime is up.
pub fn spawn(
    plan: ControlPlan,
    shared: Arc<Shared>,
    events: UnboundedReceiver<ControlEvent>,
) -> io::Result<JoinHandle<()>> {
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let handle = std::thread::Builder::new().name("ringlb-control".into()).spawn(move || {
        let runtime = match tokio_uring::Runtime::new(&tokio_uring::builder()) {
            Ok(runtime) => runtime,
            Err(e) => {
                let _ = ready_tx.send(Err(e));
                return;
            }
        };
        runtime.block_on(async move {
            let ControlPlan { config, metrics, admin, per_worker, reloader, carried } = plan;
            let listeners = (|| -> io::Result<_> {
                let metrics = metrics
                    .map(|l| l.set_nonblocking(true).and_then(|()| tokio::net::TcpListener::from_std(l)))
                    .transpose()?;
                let admin = admin
                    .map(|l| l.set_nonblocking(true).and_then(|()| tokio::net::UnixListener::from_std(l)))
                    .transpose()?;
                Ok((metrics, admin))
            })();
            let (metrics, admin) = match listeners {
                Ok(listeners) => listeners,
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                    return;
                }
            };
            let mut servers = Vec::new();
            if let Some(listener) = metrics {
                let shared = Arc::clone(&shared);
                servers.push(tokio_uring::spawn(http::serve(listener, "metrics", move |request| {
                    let shared = Arc::clone(&shared);
                    async move { status::answer(shared, request).await }
                })));
            }
            if let Some(listener) = admin {
                let shared = Arc::clone(&shared);
                servers.push(tokio_uring::spawn(http::serve(listener, "admin", move |request| {
                    api::answer(Arc::clone(&shared), request)
                })));
            }
            if shared.pack().is_some() && shared.stats.len() > 1 {
                tokio_uring::spawn(follow_load(Arc::clone(&shared), per_worker));
            }
            let (results, checked) = unbounded_channel();
            let checks = Checks::start(&config, results, &carried);
            let (looked_tx, mut looked) = unbounded_channel();
            let names = Names::start(&config, looked_tx);
            shared.config_loaded();
            let mut control = Control {
                file: Arc::clone(&config),
                config,
                names,
                shared,
                checks,
                admin: carried.admin,
                reloader,
                local_failures: 0,
                servers,
                started: SystemTime::now(),
                last_reload: None,
                history: status::History::default(),
            };
            control.first_answers(&mut looked).await;
            let _ = ready_tx.send(Ok(()));
            control.run(events, checked, looked).await;
        })
    })?;
    match ready_rx.recv() {
        Ok(Ok(())) => Ok(handle),
        Ok(Err(e)) => Err(e),
        Err(_) => Err(io::Error::other("the control thread exited while starting")),
    }
}

/// The control thread's state: the config in effect, every backend's health, what operators
/// set, and what a reload needs.
struct Control {
    /// The config as the file says it.
    file: Arc<Config>,
    /// The config in effect: the file's, with the backends its names resolve to.
    config: Arc<Config>,
    /// The backends' names and their lookups.
    names: Names,
    shared: Arc<Shared>,
    checks: Checks,
    /// What operators set at run time.
    admin: AdminStates,
    reloader: Reloader,
    /// Checks that failed for want of a local descriptor or port, not counted.
    local_failures: u64,
    /// The metrics port's and the admin socket's accept loops, stopped once an upgrade handed
    /// them over.
    servers: Vec<tokio::task::JoinHandle<()>>,
    started: SystemTime,
    /// When the last reload was, and what it said.
    last_reload: Option<(SystemTime, Result<String, String>)>,
    /// Totals sampled for the status page's charts.
    history: status::History,
}

impl Control {
    async fn run(
        mut self,
        mut events: UnboundedReceiver<ControlEvent>,
        mut checked: UnboundedReceiver<Checked>,
        mut looked: UnboundedReceiver<Looked>,
    ) {
        let mut sampling = tokio::time::interval(status::SAMPLE_INTERVAL);
        sampling.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = sampling.tick() => self.history.sample(&self.shared),
                Some(answer) = looked.recv() => self.looked_up(answer),
                Some(c) = checked.recv() => {
                    if let Some((pool, backend)) = self.checks.task(c.task) {
                        self.record(pool, backend, c.result);
                    }
                }
                event = events.recv() => match event {
                    Some(ControlEvent::ConnectFailed { layout, pool, backend, errno }) => {
                        // A worker's failed connect counts as a failed check, unless a reload
                        // has numbered the backends differently since.
                        if layout == self.shared.snapshot().layout {
                            self.record(pool, backend, Err(CheckFailure::Passive(errno)));
                        }
                    }
                    Some(ControlEvent::Reload { source, reply }) => {
                        let outcome = self.reload(source);
                        if let Some(reply) = reply {
                            let _ = reply.send(outcome);
                        }
                    }
                    Some(ControlEvent::Admin { command, reply }) => {
                        let _ = reply.send(self.command(command));
                    }
                    Some(ControlEvent::HandedOver) => {
                        // The new process serves the metrics port and the admin socket from
                        // now on (a client already connected here is answered); scrapes see
                        // one process's counters, and operators reach the process that serves.
                        for server in self.servers.drain(..) {
                            server.abort();
                        }
                    }
                    Some(ControlEvent::Stop) | None => return,
                },
            }
        }
    }

    /// Records one check result (or failed connect) and publishes a new snapshot if the
    /// backend went up or down.
    fn record(&mut self, pool: usize, backend: usize, result: Result<(), CheckFailure>) {
        let Some(pool_config) = self.config.pools.get(pool) else { return };
        let Some(address) = pool_config.backends.get(backend).map(|b| b.address) else { return };
        if let Err(why) = &result
            && why.is_local()
        {
            // Out of descriptors or local ports: the backend is not to blame. Said once per
            // 100, as a worker's refusals are.
            self.local_failures += 1;
            if self.local_failures % 100 == 1 {
                warn!(
                    "pool {}: cannot check backend {address}: {why} (not counted against it; {} such checks so far)",
                    pool_config.name, self.local_failures
                );
            }
            return;
        }
        // No health checks for a pool: nothing could bring a backend back, so a worker's
        // failed connect does not mark it down either (record says nothing changed).
        let Some(change) = self.checks.record(pool, backend, &result) else { return };
        let name = &pool_config.name;
        let health = self.checks.health(pool);
        let was_all_down = self.shared.snapshot().pools[pool].all_down();
        let all_down = !health.up.iter().any(|&u| u);
        // The workers get the change before it is logged: a log line may wait for stderr.
        self.rebuild(pool);
        match &result {
            Ok(()) => info!("pool {name}: backend {address} UP after {} passed checks", change.streak),
            Err(why) => warn!("pool {name}: backend {address} DOWN after {} failed checks ({why})", change.streak),
        }
        if all_down && !was_all_down {
            error!("pool {name}: every backend is down; sending connections to all of them (fail open)");
        } else if was_all_down && !all_down {
            info!("pool {name}: a backend is up again; no longer failing open");
        }
    }

    /// Publishes a snapshot with pool `pool` rebuilt from its health and admin settings now.
    fn rebuild(&self, pool: usize) {
        let pool_config = &self.config.pools[pool];
        let current = self.shared.snapshot();
        let workers = self.shared.stats.len();
        let rebuilt = snapshot::pool_from_config(
            pool_config,
            self.checks.health(pool),
            &self.admin.for_pool(pool_config),
            Some(&current.pools[pool]),
            workers,
        );
        self.shared.publish(current.with_pool(pool, rebuilt));
    }

    /// Waits (up to [`dns::FIRST_ANSWERS`]) for the first lookup of every name and puts what
    /// they found into effect, so that pools given by name have their backends before the
    /// first connection.
    async fn first_answers(&mut self, looked: &mut UnboundedReceiver<Looked>) {
        if !Names::any(&self.file) {
            return;
        }
        let deadline = tokio::time::Instant::now() + dns::FIRST_ANSWERS;
        let mut changed = false;
        while !self.names.all_looked_up() {
            match tokio::time::timeout_at(deadline, looked.recv()).await {
                Ok(Some(answer)) => changed |= self.names.record(answer),
                Ok(None) | Err(_) => break,
            }
        }
        if changed {
            self.follow_names();
        }
        self.publish_names();
    }

    /// What the metrics page shows of the names' lookups.
    fn publish_names(&self) {
        self.shared.set_names(self.names.status(&self.file));
    }

    /// Takes in one lookup; a change in a name's addresses is put into effect.
    fn looked_up(&mut self, answer: Looked) {
        if self.names.record(answer) {
            self.follow_names();
        }
        self.publish_names();
    }

    /// Puts the file's config with the addresses its names resolve to now into effect, as a
    /// reload does (without counting it as one).
    fn follow_names(&mut self) {
        let config = Arc::new(self.names.expand(&self.file));
        match self.apply(config) {
            Ok(report) if report.is_empty() => {}
            Ok(report) => info!("dns: {report}"),
            // Draining: no new connection will pick a backend.
            Err(ReloadError::Stopping) => {}
            Err(e) => error!("dns: the new addresses could not be put into effect: {e}"),
        }
    }

    /// Applies a new config (see [`reload`]); logs and counts the outcome.
    fn reload(&mut self, source: Source) -> Result<Report, ReloadError> {
        let outcome = self.try_reload(source);
        let said = outcome.as_ref().map(ToString::to_string).map_err(ToString::to_string);
        self.last_reload = Some((SystemTime::now(), said));
        match &outcome {
            Ok(report) => {
                self.shared.reloaded(true);
                info!("reload: {report}");
                if !report.not_applied.is_empty() {
                    warn!(
                        "reload: some settings take effect only at the next start: {}",
                        report.not_applied.join(", ")
                    );
                }
                for (name, address) in &report.listeners.added {
                    let listener = self.config.listeners.iter().find(|l| &l.name == name);
                    let pools = listener.map(|l| l.pools(&self.config)).unwrap_or_default();
                    let pools: Vec<&str> = pools.iter().map(|&p| self.config.pools[p].name.as_str()).collect();
                    info!("listener {name} on {address} -> pool {}", pools.join(", "));
                }
            }
            Err(e) => {
                self.shared.reloaded(false);
                error!("reload failed, still serving with the previous config: {e}");
            }
        }
        outcome
    }

    fn try_reload(&mut self, source: Source) -> Result<Report, ReloadError> {
        let file = Arc::new(self.reloader.load(source)?);
        for warning in &file.warnings {
            warn!("reload: {warning}");
        }
        // Names that stay keep their addresses; new ones come in with their first answer.
        let report = self.apply(Arc::new(self.names.expand(&file)))?;
        self.names.reconfigure(&file);
        self.file = file;
        self.shared.config_loaded();
        self.publish_names();
        Ok(report)
    }

    /// Puts `config` into effect: new pools (kept backends keep their health, counters and
    /// admin settings), listeners, checks. Refused once ringlb is draining: the workers may be
    /// gone.
    fn apply(&mut self, config: Arc<Config>) -> Result<Report, ReloadError> {
        if self.shared.run_state() != RunState::Running {
            return Err(ReloadError::Stopping);
        }
        let mut report = reload::compare(&self.config, &config);
        let current = self.shared.snapshot();
        let workers = self.shared.stats.len();
        let pools = config
            .pools
            .iter()
            .zip(self.checks.carried(&config))
            .map(|(pool, health)| {
                let replaces = current.pool_index(&pool.name).map(|p| current.pools[p].as_ref());
                snapshot::pool_from_config(pool, health, &self.admin.for_pool(pool), replaces, workers)
            })
            .collect();
        let relaid = current.relaid(pools);
        report.listeners = self.reloader.listeners.apply(&config, &relaid).map_err(ReloadError::Listeners)?;
        self.shared.publish(relaid);
        self.admin.retain(&config);
        self.checks.reconfigure(&config, &self.admin);
        crate::connlog::configure(config.connection_log, config.log_format == crate::config::LogFormat::Json);
        self.config = config;
        Ok(report)
    }
}

impl Control {
    /// Answers an admin API command.
    fn command(&mut self, command: Command) -> Answer {
        let snapshot = self.shared.snapshot();
        let names = self.shared.names();
        let view =
            View { config: &self.config, snapshot: &snapshot, checks: &self.checks, admin: &self.admin, names: &names };
        match command {
            Command::Info => Answer::ok(self.info()),
            Command::Pools(only) => view.pools(only.as_deref()),
            Command::Backend { pool, address } => match view.find(&pool, address) {
                Ok((p, b)) => Answer::ok(view.backend(p, b)),
                Err(missing) => missing,
            },
            Command::Status => Answer::ok(status::view(&view, &self.history, &self.shared, self.info())),
            Command::Set { pool, address, state, weight } => {
                let (p, b) = match view.find(&pool, address) {
                    Ok(found) => found,
                    Err(missing) => return missing,
                };
                self.set(p, b, state, weight)
            }
        }
    }

    /// Sets backend `b` of pool `p`'s admin state and/or weight, and puts it into effect.
    fn set(&mut self, p: usize, b: usize, state: Option<crate::pool::AdminState>, weight: Option<u32>) -> Answer {
        let pool = &self.config.pools[p];
        let address = pool.backends[b].address;
        let before = self.admin.get(&pool.name, address);
        let mut after = before;
        if let Some(state) = state {
            after.state = state;
        }
        if let Some(weight) = weight {
            // The config's weight again is no longer a run-time setting.
            after.weight = (weight != pool.backends[b].weight.get()).then_some(weight);
        }
        self.admin.put(&pool.name, address, after);
        if after != before {
            let weight = after.weight(pool.backends[b].weight.get());
            info!(
                "admin: pool {}: backend {address} is now {} with weight {weight} (was {}, weight {})",
                pool.name,
                after.effective().name(),
                before.effective().name(),
                before.weight(pool.backends[b].weight.get())
            );
            if (after.state == crate::pool::AdminState::Maint) != (before.state == crate::pool::AdminState::Maint) {
                self.checks.reconfigure(&self.config, &self.admin);
            }
            self.rebuild(p);
        }
        let snapshot = self.shared.snapshot();
        let names = self.shared.names();
        let view =
            View { config: &self.config, snapshot: &snapshot, checks: &self.checks, admin: &self.admin, names: &names };
        Answer::ok(view.backend(p, b))
    }

    fn info(&self) -> serde_json::Value {
        let unix = |t: SystemTime| t.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs_f64();
        let reload = self.last_reload.as_ref().map(|(at, outcome)| match outcome {
            Ok(summary) => json!({ "at": unix(*at), "result": "ok", "summary": summary }),
            Err(error) => json!({ "at": unix(*at), "result": "failed", "error": error }),
        });
        json!({
            "version": env!("CARGO_PKG_VERSION"),
            "pid": std::process::id(),
            "started_at": unix(self.started),
            "uptime_s": self.started.elapsed().unwrap_or_default().as_secs(),
            "config": self.reloader.path.as_ref().map(|p| p.display().to_string()),
            "config_loaded_at": self.shared.config_loaded_at(),
            "last_reload": reload,
            "reloads": { "ok": self.shared.reloads().0, "failed": self.shared.reloads().1 },
            "workers": self.shared.stats.len(),
            "state": match self.shared.run_state() {
                RunState::Running => "running",
                RunState::Draining => "draining",
                RunState::Closing => "closing",
            },
        })
    }
}

/// With `spread = "pack"`: every [`spread::INTERVAL`], measures each worker's share of a CPU
/// and sets the workers in use (unless they are held), then wakes the workers that hold more
/// than their share of connections so they hand some on.
async fn follow_load(shared: Arc<Shared>, per_worker: u64) {
    let workers = shared.stats.len();
    let mut packer = spread::Packer::new(workers);
    let mut cpu = spread::CpuShares::new(workers, std::time::Instant::now());
    let mut asked: Vec<spread::Asking> = (0..workers).map(|_| spread::Asking::default()).collect();
    let mut ticks = tokio::time::interval(spread::INTERVAL);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    while shared.run_state() == RunState::Running {
        ticks.tick().await;
        let Some(pack) = shared.pack() else { return };
        let busy = cpu.update(std::time::Instant::now(), pack.cpu_times());
        let counts = shared.open_connections();
        let in_use = shared.workers_in_use();
        if !shared.workers_in_use_held() {
            let wanted = packer.update(&busy, &counts, per_worker);
            if wanted != in_use {
                info!(
                    "spread: new connections go to {wanted} of {workers} workers (CPU per worker: {}; open connections: {})",
                    busy.iter().map(|b| format!("{:.0}%", b * 100.0)).collect::<Vec<_>>().join(" "),
                    counts.iter().map(u64::to_string).collect::<Vec<_>>().join(" ")
                );
                shared.set_workers_in_use(wanted);
                asked.iter_mut().for_each(|a| *a = spread::Asking::default());
                continue;
            }
        }
        for worker in 0..workers {
            let wanted = spread::to_hand_on(worker, in_use, &counts, per_worker);
            if asked[worker].should_ask(wanted, counts[worker]) {
                shared.ring(worker);
            }
        }
    }
}
