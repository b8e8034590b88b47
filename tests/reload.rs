//! Changing the config while serving (SIGHUP): reloads under load lose nothing, new
//! connections follow the new config while open ones keep their backend, a config that does
//! not validate changes nothing, listeners come and go, and health carries over.

mod common;

use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::sync::atomic::AtomicUsize;
use std::time::Duration;

use common::*;

/// A config with listener `a` on a free port and pool `p` of `backends`; `extra` is added at
/// the top, `pool_extra` in the pool.
fn config(backends: &[SocketAddr], extra: &str, pool_extra: &str) -> String {
    let list: Vec<String> = backends.iter().map(|a| format!("{{ address = \"{a}\" }}")).collect();
    format!(
        "workers = 2\nmetrics_bind = \"127.0.0.1:0\"\n{extra}\n[listeners.a]\nbind = \"127.0.0.1:0\"\npool = \"p\"\n\
         [pools.p]\nbackends = [{}]\n{pool_extra}\n[pools.p.health]\nenabled = false\n",
        list.join(", ")
    )
}

#[test]
fn twenty_reloads_under_load_refuse_reset_and_lose_nothing() {
    let (a, b) = (Backend::echo(), Backend::echo());
    let both = config(&[a.addr, b.addr], "", "");
    // Every other reload drops a backend, changes the algorithm and adds a listener.
    let other = config(&[a.addr], "idle_timeout = \"10m\"", "algorithm = \"least_conn\"")
        + "[listeners.extra]\nbind = \"127.0.0.1:0\"\npool = \"p\"\n";
    let lb = Ringlb::start(&both);
    let load = Load::start(lb.addr());
    load.wait_for(50);
    for i in 0..20 {
        let outcome = lb.reload(if i % 2 == 0 { &other } else { &both });
        assert!(outcome.contains("] reload: "), "reload {i}: {outcome}");
        load.wait_for(20);
    }
    let errors = load.finish();
    assert!(errors.is_empty(), "{errors:?}");
    let metrics = lb.metrics();
    assert_eq!(metrics["ringlb_reloads_total{result=\"ok\"}"], 20.0);
    assert_eq!(metrics["ringlb_connections_reset_total"], 0.0);
    assert_eq!(metrics["ringlb_connections_no_backend_total"], 0.0);
}

#[test]
fn a_reload_sends_new_connections_to_the_new_backends_and_open_ones_finish_on_theirs() {
    let served: Vec<Arc<AtomicUsize>> = (0..4).map(|_| Arc::new(AtomicUsize::new(0))).collect();
    let backends: Vec<Backend> =
        ["a1", "a2", "b1", "b2"].iter().zip(&served).map(|(n, s)| Backend::start(identity(n, Arc::clone(s)))).collect();
    let addrs: Vec<SocketAddr> = backends.iter().map(|b| b.addr).collect();
    let mut lb = Ringlb::start(&config(&addrs[..2], "", ""));
    let mut open = connect(lb.addr());
    let first = who(&mut open).unwrap();
    assert!(first.starts_with('a'), "{first}");
    // The new set, and on_down = "close": a backend that leaves the config is not down.
    let outcome = lb.reload(&config(&addrs[2..], "", "on_down = \"close\""));
    assert!(outcome.contains("backends added: p/") && outcome.contains("backends removed: p/"), "{outcome}");
    for i in 0..20 {
        let name = who(&mut connect(lb.addr())).unwrap();
        assert!(name.starts_with('b'), "connection {i} after the reload went to {name}");
    }
    assert_eq!(who(&mut open).unwrap(), first, "the open connection keeps its backend");
    round_trip(&mut open, b"still relaying\n").unwrap();
    drop(open);
    let counters = lb.stop();
    assert_eq!(counters["connections_backend_down_closed_total"], 0, "{counters:?}");
    assert_eq!(counters["connections_finished_total"], 21, "{counters:?}");
}

#[test]
fn a_config_that_does_not_validate_changes_nothing() {
    let backend = Backend::echo();
    let good = config(&[backend.addr], "", "");
    let lb = Ringlb::start(&good);
    let loaded = lb.metrics()["ringlb_config_loaded_timestamp_seconds"];
    assert!(loaded > 0.0);
    let bad = good.replace(
        &format!("{{ address = \"{}\" }}", backend.addr),
        &format!("{{ address = \"{}\", weight = 0 }}", backend.addr),
    );
    let outcome = lb.reload(&bad);
    assert!(outcome.contains("reload failed, still serving with the previous config: "), "{outcome}");
    assert!(outcome.contains(":8: pools.p.backends[0].weight: 0 is not a weight; use 1 to 256"), "{outcome}");
    round_trip(&mut connect(lb.addr()), b"still serving").unwrap();
    let metrics = lb.metrics();
    assert_eq!(metrics["ringlb_reloads_total{result=\"failed\"}"], 1.0);
    assert_eq!(metrics["ringlb_reloads_total{result=\"ok\"}"], 0.0);
    assert_eq!(metrics["ringlb_config_loaded_timestamp_seconds"], loaded);
    // A listener that cannot be bound fails the reload too, and changes nothing.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let clash = format!("{good}[listeners.clash]\nbind = \"{}\"\npool = \"p\"\n", taken.local_addr().unwrap());
    let outcome = lb.reload(&clash);
    assert!(outcome.contains("reload failed") && outcome.contains("listener clash: cannot listen on"), "{outcome}");
    round_trip(&mut connect(lb.addr()), b"still serving").unwrap();
}

#[test]
fn listeners_added_and_removed_by_a_reload() {
    let backend = Backend::echo();
    let two = config(&[backend.addr], "", "") + "[listeners.b]\nbind = \"127.0.0.1:0\"\npool = \"p\"\n";
    let lb = Ringlb::start(&two);
    let (a, b) = (lb.addrs["a"], lb.addrs["b"]);
    let mut on_b = connect(b);
    round_trip(&mut on_b, b"before").unwrap();
    // b goes, c comes; a (same bind) keeps its sockets. Connections on b drain for 10 s (time
    // enough for the checks below on a loaded machine).
    let next = config(&[backend.addr], "drain_timeout = \"10s\"", "")
        + "[listeners.c]\nbind = \"127.0.0.1:0\"\npool = \"p\"\n";
    let outcome = lb.reload(&next);
    assert!(outcome.contains("listeners removed: b") && outcome.contains("listeners added: c/"), "{outcome}");
    let c = lb.added_listener("c");
    round_trip(&mut connect(c), b"on the new listener").unwrap();
    round_trip(&mut connect(a), b"on the kept listener").unwrap();
    assert!(
        Ringlb::eventually(Duration::from_secs(10), || TcpStream::connect(b).is_err()),
        "the removed listener still accepts"
    );
    // Its open connection goes on, then is closed (FIN) at the drain deadline.
    round_trip(&mut on_b, b"after the reload").unwrap();
    on_b.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let (rest, end) = read_until_end(&mut on_b);
    assert!(rest.is_empty());
    end.expect("closed with FIN at the drain deadline");
}

#[test]
fn a_backend_marked_down_stays_down_across_a_reload() {
    let (up, down) = (Backend::echo(), Backend::echo());
    let health = "[pools.p.health]\ninterval = \"200ms\"\ntimeout = \"1s\"\nfall = 1\nrise = 100";
    let text = config(&[up.addr, down.addr], "", "").replace("[pools.p.health]\nenabled = false", health);
    let lb = Ringlb::start(&text);
    down.stop_listening();
    assert!(lb.logged(&format!("backend {} DOWN after", down.addr)), "{}", lb.log());
    // A reload that changes something else: the down backend does not start over as up.
    let outcome = lb.reload(&text.replace("[listeners.a]", "idle_timeout = \"20m\"\n[listeners.a]"));
    assert!(outcome.contains("] reload: "), "{outcome}");
    assert_eq!(lb.backend_metric("ringlb_backend_up", "p", down.addr), 0.0);
    assert_eq!(lb.backend_metric("ringlb_backend_up", "p", up.addr), 1.0);
    for _ in 0..10 {
        round_trip(&mut connect(lb.addr()), b"to the up one").unwrap();
    }
    assert_eq!(lb.backend_metric("ringlb_backend_connections_total", "p", down.addr), 0.0);
}

#[test]
fn settings_that_need_a_restart_are_named() {
    let backend = Backend::echo();
    let text = config(&[backend.addr], "", "");
    let lb = Ringlb::start(&text);
    let outcome = lb.reload(&text.replace("workers = 2", "workers = 3\nrelay = \"copy\""));
    assert!(outcome.contains("not applied until restart: workers: 2 -> 3, relay: auto -> copy"), "{outcome}");
    assert!(lb.logged("some settings take effect only at the next start"), "{}", lb.log());
}

#[test]
fn a_pool_removed_by_a_reload_leaves_its_open_connections_relaying() {
    let (old, new) = (Backend::echo(), Backend::echo());
    let text = format!(
        "workers = 1\n[listeners.a]\nbind = \"127.0.0.1:0\"\npool = \"old\"\n\
         [pools.old]\nbackends = [{{ address = \"{}\" }}]\n[pools.old.health]\nenabled = false\n",
        old.addr
    );
    let mut lb = Ringlb::start(&text);
    let mut open = connect(lb.addr());
    round_trip(&mut open, b"on the old pool").unwrap();
    let renamed = text
        .replace("pool = \"old\"", "pool = \"new\"")
        .replace("[pools.old", "[pools.new")
        .replace(&old.addr.to_string(), &new.addr.to_string());
    let outcome = lb.reload(&renamed);
    assert!(outcome.contains("pools added: new; pools removed: old"), "{outcome}");
    round_trip(&mut open, b"its pool is gone, not its connection").unwrap();
    round_trip(&mut connect(lb.addr()), b"new ones use the new pool").unwrap();
    assert_eq!(new.accepted(), 1);
    drop(open);
    let counters = lb.stop();
    assert_eq!(counters["connections_finished_total"], 2, "{counters:?}");
}
