//! Metrics in the Prometheus text format, served by the control thread on `metrics_bind`:
//! the workers' counters summed, and per backend its health and connection counts.

use std::fmt::Write;
use std::sync::atomic::Ordering;

use super::{RunState, Shared};
use crate::balance::BackendCounters;
use crate::pool::{AdminState, Pool};
use crate::stats;

/// Metric names that are not in [`stats::WorkerStats`], in one place.
pub const BACKEND_UP: &str = "ringlb_backend_up";
pub const BACKEND_ACTIVE: &str = "ringlb_backend_active_connections";
pub const BACKEND_CONNECTIONS: &str = "ringlb_backend_connections_total";
pub const BACKEND_FAILURES: &str = "ringlb_backend_connect_failures_total";
pub const BACKEND_READY: &str = "ringlb_backend_admin_ready";
pub const BACKEND_WEIGHT: &str = "ringlb_backend_weight";
pub const BACKEND_BYTES_UP: &str = "ringlb_backend_bytes_client_to_backend_total";
pub const BACKEND_BYTES_DOWN: &str = "ringlb_backend_bytes_backend_to_client_total";
pub const DRAINING: &str = "ringlb_draining";
pub const WORKERS_IN_USE: &str = "ringlb_workers_in_use";
pub const RELOADS: &str = "ringlb_reloads_total";
pub const CONFIG_LOADED: &str = "ringlb_config_loaded_timestamp_seconds";
pub const DNS_ADDRESSES: &str = "ringlb_dns_addresses";
pub const DNS_LOOKUPS: &str = "ringlb_dns_lookups_total";
pub const DNS_LAST_LOOKUP: &str = "ringlb_dns_last_lookup_timestamp_seconds";
pub const DNS_HOLDING: &str = "ringlb_dns_holding";
pub const DNS_BACKEND: &str = "ringlb_dns_backend";

fn header(out: &mut String, name: &str, help: &str) {
    let kind = if name.ends_with("_total") { "counter" } else { "gauge" };
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

/// Label values escaped as the text format requires.
fn label(value: &str) -> String {
    value.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

/// The whole metrics page.
pub fn render(shared: &Shared) -> String {
    let mut out = String::with_capacity(4096);
    for (name, help, value) in stats::totals(&shared.stats) {
        header(&mut out, name, help);
        let _ = writeln!(out, "{name} {value}");
    }
    header(&mut out, DRAINING, "1 once a stop signal arrived and ringlb is draining.");
    let _ = writeln!(out, "{DRAINING} {}", u8::from(shared.run_state() != RunState::Running));
    header(
        &mut out,
        WORKERS_IN_USE,
        "Workers that take new connections (spread = \"pack\" packs them into as few as keep up).",
    );
    let _ = writeln!(out, "{WORKERS_IN_USE} {}", shared.workers_in_use());
    header(&mut out, RELOADS, "Config reloads (SIGHUP), by whether they took effect.");
    let (ok, failed) = shared.reloads();
    let _ = writeln!(out, "{RELOADS}{{result=\"ok\"}} {ok}\n{RELOADS}{{result=\"failed\"}} {failed}");
    header(&mut out, CONFIG_LOADED, "When the config in effect was loaded (Unix time).");
    let _ = writeln!(out, "{CONFIG_LOADED} {}", shared.config_loaded_at());

    let snapshot = shared.snapshot();
    type Value = fn(&Pool, usize, &BackendCounters) -> u64;
    let families: [(&str, &str, Value); 8] = [
        (BACKEND_UP, "Whether the backend is up (passes its health checks).", |pool, i, _| u64::from(pool.up[i])),
        (BACKEND_ACTIVE, "Connections open to the backend now, over all workers.", |_, _, c| c.active()),
        (BACKEND_CONNECTIONS, "Connections started to the backend.", |_, _, c| c.connections.load(Ordering::Relaxed)),
        (BACKEND_FAILURES, "Connects to the backend that failed or timed out.", |_, _, c| {
            c.failures.load(Ordering::Relaxed)
        }),
        (BACKEND_READY, "1 unless an operator set the backend to drain or maint (or weight 0).", |pool, i, _| {
            u64::from(pool.admin[i].effective() == AdminState::Ready)
        }),
        (BACKEND_WEIGHT, "The backend's weight now (the config's, or what an operator set).", |pool, i, _| {
            u64::from(pool.backends[i].weight)
        }),
        (
            BACKEND_BYTES_UP,
            "Bytes relayed from clients to the backend (open connections report each second).",
            |_, _, c| c.bytes()[0],
        ),
        (
            BACKEND_BYTES_DOWN,
            "Bytes relayed from the backend to clients (open connections report each second).",
            |_, _, c| c.bytes()[1],
        ),
    ];
    for (name, help, value) in families {
        header(&mut out, name, help);
        for pool in &snapshot.pools {
            for (i, backend) in pool.backends.iter().enumerate() {
                let _ = writeln!(
                    out,
                    "{name}{{pool=\"{}\",backend=\"{}\"}} {}",
                    label(&pool.settings.name),
                    label(&backend.name),
                    value(pool, i, &backend.counters)
                );
            }
        }
    }
    names(&mut out, &shared.names());
    out
}

/// Each backend name's lookups, and which backends came from it.
fn names(out: &mut String, names: &[super::dns::NameStatus]) {
    if names.is_empty() {
        return;
    }
    let labels = |n: &super::dns::NameStatus| format!("pool=\"{}\",name=\"{}\"", label(&n.pool), label(&n.name));
    header(out, DNS_ADDRESSES, "Addresses the backend name gives now (each one a backend).");
    for n in names {
        let _ = writeln!(out, "{DNS_ADDRESSES}{{{}}} {}", labels(n), n.addresses.len());
    }
    header(out, DNS_LOOKUPS, "Lookups of the backend name, by whether they got an answer.");
    for n in names {
        let l = labels(n);
        let _ = writeln!(out, "{DNS_LOOKUPS}{{{l},result=\"ok\"}} {}", n.lookups_ok);
        let _ = writeln!(out, "{DNS_LOOKUPS}{{{l},result=\"failed\"}} {}", n.lookups_failed);
    }
    header(out, DNS_LAST_LOOKUP, "When the backend name was last looked up (Unix time; 0: not yet).");
    for n in names {
        let at = n
            .last
            .as_ref()
            .map_or(0.0, |(at, _)| at.duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_secs_f64());
        let _ = writeln!(out, "{DNS_LAST_LOOKUP}{{{}}} {at:.3}", labels(n));
    }
    header(out, DNS_HOLDING, "1 while lookups of the name fail and its last good answer is kept (dns.hold).");
    for n in names {
        let _ = writeln!(out, "{DNS_HOLDING}{{{}}} {}", labels(n), u8::from(n.holding));
    }
    header(out, DNS_BACKEND, "1 for each backend a backend name gave.");
    for n in names {
        for address in &n.addresses {
            let _ = writeln!(out, "{DNS_BACKEND}{{{},backend=\"{address}\"}} 1", labels(n));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::control::snapshot::first_snapshot;

    #[test]
    fn renders_counters_and_backends() {
        let config = Config::parse(
            "[listeners.a]\nbind = \"127.0.0.1:1\"\npool = \"p\"\n[pools.p]\nbackends = [{ address = \"127.0.0.1:2\" }, { address = \"127.0.0.1:3\" }]\n",
            "t",
        )
        .unwrap();
        let (shared, _events) = Shared::new(first_snapshot(&config, &Default::default()), 2, config.spread).unwrap();
        shared.stats[0].accepted.add(3);
        shared.stats[1].accepted.add(4);
        shared.snapshot().pools[0].backends[1].counters.active.store(5, std::sync::atomic::Ordering::Relaxed);
        let page = render(&shared);
        assert!(
            page.contains("# TYPE ringlb_connections_accepted_total counter\nringlb_connections_accepted_total 7\n"),
            "{page}"
        );
        assert!(page.contains("ringlb_backend_up{pool=\"p\",backend=\"127.0.0.1:2\"} 1\n"), "{page}");
        assert!(page.contains("ringlb_backend_active_connections{pool=\"p\",backend=\"127.0.0.1:3\"} 5\n"), "{page}");
        assert!(page.contains("# TYPE ringlb_connections_active gauge\n"), "{page}");
        assert!(page.contains("ringlb_draining 0\n"));
    }

    #[test]
    fn label_escaping() {
        assert_eq!(label("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }
}
