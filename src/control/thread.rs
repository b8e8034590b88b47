//! The control thread: a tokio-uring runtime that probes every backend of every pool with
//! health checks enabled, counts workers' failed connects as failed checks, publishes a new
//! snapshot when a backend goes up or down, serves the metrics page and, with
//! `spread = "pack"`, sets how many workers are in use.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::thread::JoinHandle;

use log::{error, info, warn};
use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender, unbounded_channel};
use tokio::time::{Instant, sleep_until};

use super::{ControlEvent, RunState, Shared, http, metrics, snapshot};
use crate::config::{Config, HealthConfig};
use crate::health::{CheckFailure, HealthState, probe};
use crate::spread;

/// One check's result, from a probe task to the control loop.
struct Checked {
    pool: usize,
    backend: usize,
    result: Result<(), CheckFailure>,
}

/// Health of every backend of one pool, kept by the control thread.
struct PoolHealth {
    states: Vec<HealthState>,
    up: Vec<bool>,
    /// Times each backend was marked down (see [`Pool::downs`]).
    downs: Vec<u32>,
}

/// Starts the control thread and returns once its runtime is up. `metrics` is an already
/// bound listener for the metrics page; `per_worker` is each worker's share of
/// `max_connections`.
pub fn spawn(
    config: Arc<Config>,
    shared: Arc<Shared>,
    events: UnboundedReceiver<ControlEvent>,
    metrics: Option<std::net::TcpListener>,
    per_worker: u64,
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
            if let Some(listener) = metrics {
                let listener =
                    match listener.set_nonblocking(true).and_then(|()| tokio::net::TcpListener::from_std(listener)) {
                        Ok(listener) => listener,
                        Err(e) => {
                            let _ = ready_tx.send(Err(e));
                            return;
                        }
                    };
                let shared = Arc::clone(&shared);
                tokio_uring::spawn(http::serve(listener, "metrics", move |request| {
                    let shared = Arc::clone(&shared);
                    async move { metrics_reply(&shared, &request) }
                }));
            }
            if shared.pack().is_some() && shared.stats.len() > 1 {
                tokio_uring::spawn(follow_load(Arc::clone(&shared), per_worker));
            }
            let _ = ready_tx.send(Ok(()));
            control_loop(&config, &shared, events).await;
        })
    })?;
    match ready_rx.recv() {
        Ok(Ok(())) => Ok(handle),
        Ok(Err(e)) => Err(e),
        Err(_) => Err(io::Error::other("the control thread exited while starting")),
    }
}

async fn control_loop(config: &Config, shared: &Shared, mut events: UnboundedReceiver<ControlEvent>) {
    let (checked_tx, mut checked) = unbounded_channel();
    let mut health: Vec<Option<PoolHealth>> = Vec::with_capacity(config.pools.len());
    for (p, pool) in config.pools.iter().enumerate() {
        let Some(check) = &pool.health else {
            health.push(None);
            continue;
        };
        for (b, backend) in pool.backends.iter().enumerate() {
            tokio_uring::spawn(check_forever(p, b, backend.address, check.clone(), checked_tx.clone()));
        }
        health.push(Some(PoolHealth {
            states: pool.backends.iter().map(|_| HealthState::new(check.rise, check.fall)).collect(),
            up: vec![true; pool.backends.len()],
            downs: vec![0; pool.backends.len()],
        }));
    }
    drop(checked_tx);

    let mut local_failures = 0u64;
    loop {
        let (pool, backend, result) = tokio::select! {
            Some(c) = checked.recv() => (c.pool, c.backend, c.result),
            event = events.recv() => match event {
                Some(ControlEvent::ConnectFailed { pool, backend, errno }) => (pool, backend, Err(CheckFailure::Passive(errno))),
                Some(ControlEvent::Stop) | None => return,
            },
        };
        if let Err(why) = &result
            && why.is_local()
        {
            // Out of descriptors or local ports: the backend is not to blame. Said once per
            // 100, as a worker's refusals are.
            local_failures += 1;
            if local_failures % 100 == 1 {
                let pool_config = &config.pools[pool];
                warn!(
                    "pool {}: cannot check backend {}: {why} (not counted against it; {local_failures} such checks so far)",
                    pool_config.name, pool_config.backends[backend].address
                );
            }
            continue;
        }
        let Some(pool_health) = health.get_mut(pool).and_then(Option::as_mut) else {
            // No health checks for this pool: nothing could bring a backend back, so a
            // worker's failed connect does not mark it down.
            continue;
        };
        let state = &mut pool_health.states[backend];
        let Some(now_up) = state.record(result.is_ok()) else { continue };
        let pool_config = &config.pools[pool];
        let name = &pool_config.name;
        let address = pool_config.backends[backend].address;
        let streak = state.streak();
        match &result {
            Ok(()) => info!("pool {name}: backend {address} UP after {streak} passed checks"),
            Err(why) => warn!("pool {name}: backend {address} DOWN after {streak} failed checks ({why})"),
        }
        let was_all_down = !pool_health.up.iter().any(|&u| u);
        pool_health.up[backend] = now_up;
        if !now_up {
            pool_health.downs[backend] += 1;
        }
        let all_down = !pool_health.up.iter().any(|&u| u);
        if all_down && !was_all_down {
            error!("pool {name}: every backend is down; sending connections to all of them (fail open)");
        } else if was_all_down && !all_down {
            info!("pool {name}: a backend is up again; no longer failing open");
        }
        let current = shared.snapshot();
        let workers = shared.stats.len();
        let rebuilt = snapshot::pool_from_config(
            pool_config,
            &pool_health.up,
            &pool_health.downs,
            Some(&current.pools[pool]),
            workers,
        );
        shared.publish(current.with_pool(pool, rebuilt));
    }
}

/// Checks one backend every `interval` (start to start) until the control loop is gone.
async fn check_forever(
    pool: usize,
    backend: usize,
    address: SocketAddr,
    check: HealthConfig,
    results: UnboundedSender<Checked>,
) {
    loop {
        let started = Instant::now();
        let result = probe(address, &check).await;
        if results.send(Checked { pool, backend, result }).is_err() {
            return;
        }
        sleep_until(started + check.interval).await;
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

/// Answers the metrics port: the Prometheus page at `GET /metrics` (and `/`).
fn metrics_reply(shared: &Shared, request: &http::Req) -> http::Reply {
    use hyper::{Method, StatusCode};
    let get = request.method == Method::GET || request.method == Method::HEAD;
    match request.path.as_str() {
        "/metrics" | "/" if get => http::reply(StatusCode::OK, "text/plain; version=0.0.4", metrics::render(shared)),
        "/metrics" | "/" => http::reply(StatusCode::METHOD_NOT_ALLOWED, "text/plain", "use GET\n"),
        _ => http::reply(StatusCode::NOT_FOUND, "text/plain", "ringlb serves GET /metrics\n"),
    }
}
