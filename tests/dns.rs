//! Backends by DNS name: a DNS server on loopback that each test starts and whose answers it
//! changes, and identity backends on one port at several loopback addresses.

mod common;
#[path = "common/dns.rs"]
mod dns_server;

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener};
use std::sync::Arc;
use std::sync::atomic::AtomicUsize;
use std::time::Duration;

use common::*;
use dns_server::{DnsServer, Reply};

const WAIT: Duration = Duration::from_secs(30);

fn ip(last: u8) -> IpAddr {
    IpAddr::from([127, 0, 0, last])
}

/// Identity backends named `names`, on one port at 127.0.0.`first`, `first + 1`, ...
fn backends_on_one_port(names: &[&'static str], first: u8) -> (Vec<Backend>, u16) {
    let port = loop {
        let probe = TcpListener::bind((ip(first), 0)).unwrap();
        let port = probe.local_addr().unwrap().port();
        let others: Vec<_> = (1..names.len() as u8).map(|i| TcpListener::bind((ip(first + i), port))).collect();
        if others.iter().all(Result::is_ok) {
            break port;
        }
    };
    let backends = names
        .iter()
        .enumerate()
        .map(|(i, name)| {
            Backend::start_on(SocketAddr::new(ip(first + i as u8), port), identity(name, Arc::new(AtomicUsize::new(0))))
        })
        .collect();
    (backends, port)
}

/// A config with the listener `test` on pool `p`, whose backends are `entries`, the admin socket
/// and the metrics page.
fn config(dns: &str, entries: &str, pool_extra: &str) -> String {
    let health = if pool_extra.contains("[pools.p.health]") { "" } else { "\n[pools.p.health]\nenabled = false" };
    format!(
        "workers = 2\nmetrics_bind = \"127.0.0.1:0\"\nadmin_socket = \"{}\"\n{dns}\n[listeners.test]\nbind = \"127.0.0.1:0\"\npool = \"p\"\n\n[pools.p]\nbackends = [{entries}]\n{pool_extra}\n{health}\n",
        admin_socket_path().display()
    )
}

/// Who serves each of `n` new connections (an empty name for a connection not served).
fn served(lb: &Ringlb, n: usize) -> Vec<String> {
    (0..n).map(|_| who(&mut connect(lb.addr())).unwrap_or_default()).collect()
}

/// Pool `p` as the admin API shows it.
fn pool(lb: &Ringlb) -> serde_json::Value {
    let (status, pool) = lb.admin("GET", "/v1/pools/p", "");
    assert_eq!(status, 200, "{pool}");
    pool
}

#[test]
fn a_records_added_and_removed_are_followed_and_open_connections_keep_every_byte() {
    let dns = DnsServer::start();
    let (_backends, port) = backends_on_one_port(&["a", "b"], 11);
    dns.set("db.test", Reply::Addresses(vec![ip(11)], 1));
    let lb = Ringlb::start(&config(&dns.config("1s", "5m"), &format!("{{ address = \"db.test:{port}\" }}"), ""));
    // The first answer is in effect before ringlb serves.
    assert_eq!(served(&lb, 5), vec!["a"; 5]);
    let mut on_a = connect(lb.addr());
    assert_eq!(who(&mut on_a).unwrap(), "a");

    dns.set("db.test", Reply::Addresses(vec![ip(11), ip(12)], 1));
    assert!(Ringlb::eventually(WAIT, || served(&lb, 4).contains(&"b".to_string())), "b never came in:\n{}", lb.log());
    assert!(lb.logged(&format!("backends added: p/127.0.0.12:{port}")), "{}", lb.log());

    dns.set("db.test", Reply::Addresses(vec![ip(12)], 1));
    assert!(Ringlb::eventually(WAIT, || served(&lb, 10) == vec!["b"; 10]), "a never left:\n{}", lb.log());
    assert!(lb.logged(&format!("backends removed: p/127.0.0.11:{port}")), "{}", lb.log());
    // The connection to the address that left goes on, every byte of it.
    let payload: Vec<u8> = random_bytes(256 * 1024, 7).iter().map(|b| b'a' + b % 26).chain([b'\n']).collect();
    let mut writer = on_a.try_clone().unwrap();
    let sent = payload.clone();
    let sender = std::thread::spawn(move || writer.write_all(&sent).unwrap());
    let mut echoed = vec![0u8; payload.len()];
    on_a.read_exact(&mut echoed).unwrap();
    sender.join().unwrap();
    assert!(echoed == payload, "the echo through the removed backend differs");
    assert_eq!(who(&mut on_a).unwrap(), "a");

    // The admin API and the metrics say where the backend came from and how the lookups went.
    let pool = pool(&lb);
    let backend = &pool["backends"][0];
    assert_eq!(backend["address"], format!("127.0.0.12:{port}"));
    assert_eq!(backend["from_name"], format!("db.test:{port}"));
    let name = &pool["names"][0];
    assert_eq!(name["name"], format!("db.test:{port}"));
    assert_eq!(name["addresses"], serde_json::json!([format!("127.0.0.12:{port}")]));
    assert_eq!(name["last_lookup"]["result"], "ok");
    assert!(name["last_lookup"]["at"].as_f64().unwrap() > 0.0);
    let metrics = lb.metrics();
    let labels = format!("pool=\"p\",name=\"db.test:{port}\"");
    assert_eq!(metrics[&format!("ringlb_dns_addresses{{{labels}}}")], 1.0);
    assert_eq!(metrics[&format!("ringlb_dns_backend{{{labels},backend=\"127.0.0.12:{port}\"}}")], 1.0);
    assert!(metrics[&format!("ringlb_dns_lookups_total{{{labels},result=\"ok\"}}")] >= 3.0);
    assert!(metrics[&format!("ringlb_dns_last_lookup_timestamp_seconds{{{labels}}}")] > 0.0);
}

#[test]
fn srv_weights_and_priorities_with_backups_when_the_lowest_priority_is_down() {
    let dns = DnsServer::start();
    let (backends, port) = backends_on_one_port(&["a", "b", "c"], 21);
    for (name, last) in [("a.test", 21), ("b.test", 22), ("c.test", 23)] {
        dns.set(name, Reply::Addresses(vec![ip(last)], 60));
    }
    dns.set(
        "_pg._tcp.db.test",
        Reply::Srv(
            vec![(10, 3, port, "a.test".into()), (10, 1, port, "b.test".into()), (20, 5, port, "c.test".into())],
            60,
        ),
    );
    let health = "[pools.p.health]\ninterval = \"100ms\"\nrise = 1\nfall = 1";
    let lb = Ringlb::start(&config(&dns.config("10s", "5m"), "{ srv = \"_pg._tcp.db.test\" }", health));
    let pool = pool(&lb);
    let weights: Vec<(String, u64, u64)> = pool["backends"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| {
            (b["address"].as_str().unwrap().to_string(), b["weight"].as_u64().unwrap(), b["priority"].as_u64().unwrap())
        })
        .collect();
    assert_eq!(
        weights,
        vec![
            (format!("127.0.0.21:{port}"), 3, 10),
            (format!("127.0.0.22:{port}"), 1, 10),
            (format!("127.0.0.23:{port}"), 5, 20)
        ]
    );
    // The lowest priority serves, by weight; the backup takes nothing.
    let who = served(&lb, 80);
    let count = |n: &str| who.iter().filter(|w| *w == n).count();
    assert_eq!(count("c"), 0, "{who:?}");
    assert_eq!(count("a") + count("b"), 80, "{who:?}");
    assert!(count("a") > 2 * count("b"), "weights 3:1, served {who:?}");
    // Both of the lowest priority down: the backup serves.
    backends[0].stop_listening();
    backends[1].stop_listening();
    assert!(Ringlb::eventually(WAIT, || served(&lb, 5) == vec!["c"; 5]), "the backup never served:\n{}", lb.log());
}

#[test]
fn a_failing_lookup_keeps_the_last_answer_for_hold() {
    let dns = DnsServer::start();
    let (_backends, port) = backends_on_one_port(&["a"], 31);
    dns.set("db.test", Reply::Addresses(vec![ip(31)], 1));
    let lb = Ringlb::start(&config(&dns.config("1s", "5m"), &format!("{{ address = \"db.test:{port}\" }}"), ""));
    assert_eq!(served(&lb, 3), vec!["a"; 3]);
    dns.set("db.test", Reply::ServFail);
    assert!(
        Ringlb::eventually(WAIT, || pool(&lb)["names"][0]["lookups_failed"].as_u64().unwrap() >= 2),
        "no failed lookup:\n{}",
        lb.log()
    );
    let name = &pool(&lb)["names"][0];
    assert_eq!(name["holding"], true, "{name}");
    assert_eq!(name["last_lookup"]["result"], "failed", "{name}");
    assert!(name["last_lookup"]["error"].as_str().unwrap().contains("SERVFAIL"), "{name}");
    assert_eq!(served(&lb, 5), vec!["a"; 5]);
    // Said once, not per lookup.
    let said = lb.log().matches("keeping the last answer").count();
    assert_eq!(said, 1, "{}", lb.log());
    assert_eq!(lb.metrics()[&format!("ringlb_dns_holding{{pool=\"p\",name=\"db.test:{port}\"}}")], 1.0);
}

#[test]
fn after_hold_a_name_that_no_longer_resolves_has_no_backends_until_it_does() {
    let dns = DnsServer::start();
    let (_backends, port) = backends_on_one_port(&["a"], 41);
    dns.set("db.test", Reply::Addresses(vec![ip(41)], 1));
    let lb = Ringlb::start(&config(&dns.config("1s", "1s"), &format!("{{ address = \"db.test:{port}\" }}"), ""));
    assert_eq!(served(&lb, 3), vec!["a"; 3]);
    dns.set("db.test", Reply::NxDomain);
    assert!(
        Ringlb::eventually(WAIT, || pool(&lb)["backends"].as_array().unwrap().is_empty()),
        "the held answer was never dropped:\n{}",
        lb.log()
    );
    assert!(lb.logged("older than hold"), "{}", lb.log());
    let refused = lb.metrics()["ringlb_connections_no_backend_total"];
    assert_eq!(served(&lb, 3), vec![""; 3]);
    assert!(Ringlb::eventually(WAIT, || lb.metrics()["ringlb_connections_no_backend_total"] >= refused + 3.0));
    dns.set("db.test", Reply::Addresses(vec![ip(41)], 1));
    assert!(Ringlb::eventually(WAIT, || served(&lb, 1) == vec!["a"]), "it never came back:\n{}", lb.log());
}

#[test]
fn a_name_that_does_not_resolve_at_start_comes_in_when_it_does() {
    let dns = DnsServer::start();
    let (_backends, port) = backends_on_one_port(&["a"], 51);
    let config = config(&dns.config("10s", "5m"), &format!("{{ address = \"late.test:{port}\" }}"), "");
    // `ringlb check` says so, as a warning.
    let path = write_temp(&config, "toml");
    let check =
        std::process::Command::new(env!("CARGO_BIN_EXE_ringlb")).args(["check", "-c"]).arg(&path).output().unwrap();
    let stderr = String::from_utf8_lossy(&check.stderr);
    assert!(check.status.success(), "{stderr}");
    assert!(stderr.contains(&format!("warning: pools.p: late.test:{port}")), "{stderr}");
    assert!(stderr.contains("NXDOMAIN"), "{stderr}");

    let lb = Ringlb::start(&config);
    assert_eq!(served(&lb, 2), vec![""; 2], "a pool without backends refuses");
    assert!(lb.logged("no backends from it until it resolves"), "{}", lb.log());
    dns.set("late.test", Reply::Addresses(vec![ip(51)], 60));
    // Retried every second, not after refresh.
    assert!(Ringlb::eventually(WAIT, || served(&lb, 1) == vec!["a"]), "never came in:\n{}", lb.log());
}

#[test]
fn the_data_path_never_waits_for_dns() {
    let dns = DnsServer::start();
    let (_backends, port) = backends_on_one_port(&["a"], 61);
    dns.set("db.test", Reply::Addresses(vec![ip(61)], 1));
    let lb = Ringlb::start(&config(&dns.config("1s", "5m"), &format!("{{ address = \"db.test:{port}\" }}"), ""));
    assert_eq!(served(&lb, 2), vec!["a"; 2]);
    // The server stops answering: lookups hang until they time out.
    dns.set("db.test", Reply::Silent);
    let asked = dns.asked("db.test");
    assert!(Ringlb::eventually(WAIT, || dns.asked("db.test") > asked + 1));
    // Meanwhile every connection is served, and the admin API answers.
    assert_eq!(served(&lb, 200), vec!["a"; 200]);
    assert!(Ringlb::eventually(WAIT, || {
        pool(&lb)["names"][0]["last_lookup"]["error"]
            .as_str()
            .is_some_and(|e| e.contains("no answer") || e.contains("timed out"))
    }));
    assert_eq!(served(&lb, 20), vec!["a"; 20]);
}

#[test]
fn an_answer_naming_ringlbs_own_listener_is_left_out() {
    let dns = DnsServer::start();
    let (_backends, port) = loop {
        let (backends, port) = backends_on_one_port(&["a"], 91);
        // The listener takes the same port on 127.0.0.1.
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            break (backends, port);
        }
    };
    dns.set("self.test", Reply::Addresses(vec![ip(1), ip(91)], 60));
    let config = config(&dns.config("10s", "5m"), &format!("{{ address = \"self.test:{port}\" }}"), "")
        .replace("[listeners.test]\nbind = \"127.0.0.1:0\"", &format!("[listeners.test]\nbind = \"127.0.0.1:{port}\""));
    let lb = Ringlb::start(&config);
    assert!(lb.logged(&format!("gives 127.0.0.1:{port}, ringlb's own listener: left out")), "{}", lb.log());
    let backends: Vec<String> =
        pool(&lb)["backends"].as_array().unwrap().iter().map(|b| b["address"].as_str().unwrap().to_string()).collect();
    assert_eq!(backends, vec![format!("127.0.0.91:{port}")]);
    assert_eq!(served(&lb, 5), vec!["a"; 5]);
}

#[test]
fn an_srv_target_that_does_not_resolve_is_left_out_and_the_others_serve() {
    let dns = DnsServer::start();
    let (_backends, port) = backends_on_one_port(&["a"], 101);
    dns.set("a.test", Reply::Addresses(vec![ip(101)], 60));
    dns.set("gone.test", Reply::NxDomain);
    dns.set("slow.test", Reply::Silent);
    dns.set(
        "_pg._tcp.db.test",
        Reply::Srv(
            vec![(10, 1, port, "gone.test".into()), (10, 1, port, "slow.test".into()), (10, 1, port, "a.test".into())],
            60,
        ),
    );
    let lb = Ringlb::start(&config(&dns.config("10s", "5m"), "{ srv = \"_pg._tcp.db.test\" }", ""));
    let addresses = |lb: &Ringlb| -> Vec<String> {
        pool(lb)["backends"].as_array().unwrap().iter().map(|b| b["address"].as_str().unwrap().to_string()).collect()
    };
    assert!(
        Ringlb::eventually(WAIT, || addresses(&lb) == vec![format!("127.0.0.101:{port}")]),
        "backends {:?}\n{}",
        addresses(&lb),
        lb.log()
    );
    assert_eq!(served(&lb, 5), vec!["a"; 5]);
    assert!(
        lb.logged("an SRV target that does not resolve, gone.test: NXDOMAIN (no such name): left out"),
        "{}",
        lb.log()
    );
    assert!(lb.logged("an SRV target that does not resolve, slow.test: "), "{}", lb.log());
    // Said once, not at every lookup.
    assert_eq!(lb.log().matches("gone.test: NXDOMAIN").count(), 1, "{}", lb.log());
}

#[test]
fn a_reload_adds_and_drops_names() {
    let dns = DnsServer::start();
    let (_backends, port) = backends_on_one_port(&["a", "b"], 71);
    dns.set("a.test", Reply::Addresses(vec![ip(71)], 60));
    dns.set("b.test", Reply::Addresses(vec![ip(72)], 60));
    let only_a = config(&dns.config("10s", "5m"), &format!("{{ address = \"a.test:{port}\" }}"), "");
    let lb = Ringlb::start(&only_a);
    assert_eq!(served(&lb, 3), vec!["a"; 3]);
    let only_b = only_a.replace("a.test", "b.test");
    assert!(lb.reload(&only_b).contains("] reload: "));
    assert!(Ringlb::eventually(WAIT, || served(&lb, 4) == vec!["b"; 4]), "{}", lb.log());
    assert_eq!(pool(&lb)["names"].as_array().unwrap().len(), 1);
    assert_eq!(pool(&lb)["names"][0]["name"], format!("b.test:{port}"));
}
