//! The metrics port: `GET /metrics` (Prometheus text), `GET /` (the status page: one
//! self-contained HTML page, no external assets, that refreshes itself every 5 s) and
//! `GET /status.json` (what the page shows: listeners, pools, each backend's health, admin
//! state, weight and connections, and rates over the last 10 minutes). All read-only.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use hyper::{Method, StatusCode};
use serde_json::{Value, json};

use super::api::{self, Command, View};
use super::http::{self, Reply, Req};
use super::{Shared, metrics};
use crate::stats;

/// How often the totals are sampled for the charts.
pub const SAMPLE_INTERVAL: Duration = Duration::from_secs(5);
/// Samples kept: 10 minutes.
const SAMPLES: usize = 121;

/// The page, with its script and styles inline.
const PAGE: &str = include_str!("status.html");

/// Answers the metrics port.
pub async fn answer(shared: Arc<Shared>, request: Req) -> Reply {
    let get = request.method == Method::GET || request.method == Method::HEAD;
    match request.path.as_str() {
        _ if !get => {
            http::reply(StatusCode::METHOD_NOT_ALLOWED, "text/plain", "the metrics port is read-only; use GET\n")
        }
        "/metrics" => http::reply(StatusCode::OK, "text/plain; version=0.0.4", metrics::render(&shared)),
        "/" => http::reply(StatusCode::OK, "text/html; charset=utf-8", PAGE),
        "/status.json" => {
            let answer = api::ask(&shared, Command::Status).await;
            let text = serde_json::to_string(&answer.body).unwrap_or_else(|_| "{}".into());
            http::reply(answer.status, "application/json", text)
        }
        _ => http::reply(StatusCode::NOT_FOUND, "text/plain", "ringlb serves GET /metrics, / and /status.json here\n"),
    }
}

#[derive(Debug, Clone, Copy)]
struct Sample {
    /// Unix time, seconds.
    at: f64,
    accepted: u64,
    bytes_up: u64,
    bytes_down: u64,
    active: u64,
}

/// The totals every [`SAMPLE_INTERVAL`], for the last 10 minutes.
#[derive(Debug, Default)]
pub struct History {
    samples: VecDeque<Sample>,
}

impl History {
    /// Takes a sample of the workers' totals now.
    pub fn sample(&mut self, shared: &Shared) {
        let totals = stats::totals(&shared.stats);
        let total = |name: &str| totals.iter().find(|(n, _, _)| *n == name).map_or(0, |(_, _, v)| *v);
        let at = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_secs_f64();
        if self.samples.len() == SAMPLES {
            self.samples.pop_front();
        }
        self.samples.push_back(Sample {
            at,
            accepted: total("ringlb_connections_accepted_total"),
            bytes_up: total("ringlb_bytes_client_to_backend_total"),
            bytes_down: total("ringlb_bytes_backend_to_client_total"),
            active: total("ringlb_connections_active"),
        });
    }

    /// Rates between consecutive samples: `[time, connections/s, bytes/s up, bytes/s down,
    /// open connections]`, oldest first.
    pub fn rates(&self) -> Vec<[f64; 5]> {
        self.samples
            .iter()
            .zip(self.samples.iter().skip(1))
            .map(|(a, b)| {
                let seconds = (b.at - a.at).max(0.001);
                let rate = |x: u64, y: u64| y.saturating_sub(x) as f64 / seconds;
                [
                    b.at,
                    rate(a.accepted, b.accepted),
                    rate(a.bytes_up, b.bytes_up),
                    rate(a.bytes_down, b.bytes_down),
                    b.active as f64,
                ]
            })
            .collect()
    }
}

/// What the status page shows.
pub(super) fn view(view: &View<'_>, history: &History, shared: &Shared, info: Value) -> Value {
    let listeners: Vec<Value> = view
        .config
        .listeners
        .iter()
        .map(|l| {
            let pools: Vec<&str> =
                l.pools(view.config).into_iter().map(|p| view.config.pools[p].name.as_str()).collect();
            json!({ "name": l.name, "bind": l.bind.to_string(), "pools": pools })
        })
        .collect();
    let totals: serde_json::Map<String, Value> =
        stats::totals(&shared.stats).into_iter().map(|(name, _, value)| (name.to_string(), json!(value))).collect();
    json!({
        "info": info,
        "listeners": listeners,
        "pools": view.pools(None).body["pools"],
        "totals": totals,
        "rates": history.rates(),
        "sample_interval_s": SAMPLE_INTERVAL.as_secs(),
    })
}
