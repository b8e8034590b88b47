//! Balancing and health end to end: Maglev affinity, least_conn counts shared by workers,
//! health checks taking backends out and bringing them back, and on_down = "close".

mod common;

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::thread;
use std::time::Duration;

use common::*;

/// Three identity backends named a, b, c with their served counters.
fn trio() -> (Vec<Backend>, Vec<Arc<AtomicUsize>>) {
    let served: Vec<Arc<AtomicUsize>> = (0..3).map(|_| Arc::new(AtomicUsize::new(0))).collect();
    let backends =
        ["a", "b", "c"].iter().zip(&served).map(|(name, s)| Backend::start(identity(name, Arc::clone(s)))).collect();
    (backends, served)
}

/// Two workers on the default spread (each takes its share), so the counts least_conn and the
/// health checks share between workers are what is tested.
fn pool_config(algorithm: &str, backends: &[SocketAddr], pool_extra: &str, health: &str) -> String {
    let list: Vec<String> = backends.iter().map(|a| format!("{{ address = \"{a}\" }}")).collect();
    format!(
        "workers = 2\nmetrics_bind = \"127.0.0.1:0\"\n[listeners.test]\nbind = \"127.0.0.1:0\"\npool = \"p\"\n\n\
         [pools.p]\nalgorithm = \"{algorithm}\"\n{pool_extra}\nbackends = [{}]\n\n[pools.p.health]\n{health}\n",
        list.join(", ")
    )
}

const NO_HEALTH: &str = "enabled = false";
/// Fast checks so tests take seconds: down after 2 failures, up after 2 passes, 200 ms apart.
const FAST_HEALTH: &str = "interval = \"200ms\"\ntimeout = \"200ms\"\nrise = 2\nfall = 2";

#[test]
fn maglev_keeps_each_client_ip_on_one_backend() {
    let (backends, _) = trio();
    let addrs: Vec<SocketAddr> = backends.iter().map(|b| b.addr).collect();
    let lb = Ringlb::start(&pool_config("maglev", &addrs, "hash_key = \"client_ip\"", NO_HEALTH));
    let mut used = HashMap::new();
    for host in 1..=24u8 {
        let source = IpAddr::V4(Ipv4Addr::new(127, 0, 1, host));
        let first = who(&mut connect_from(source, lb.addr())).unwrap();
        for _ in 0..4 {
            // New connections from new ports, possibly on the other worker: same backend.
            assert_eq!(who(&mut connect_from(source, lb.addr())).unwrap(), first, "client {source} moved");
        }
        *used.entry(first).or_insert(0) += 1;
    }
    assert!(used.len() >= 2, "24 client addresses all hashed to one backend: {used:?}");
}

#[test]
fn least_conn_balances_long_lived_connections_exactly() {
    let (backends, _) = trio();
    let addrs: Vec<SocketAddr> = backends.iter().map(|b| b.addr).collect();
    let lb = Ringlb::start(&pool_config("least_conn", &addrs, "", NO_HEALTH));
    // 30 connections opened one after another, across both workers.
    let mut open: Vec<(String, TcpStream)> = (0..30)
        .map(|_| {
            let mut stream = connect(lb.addr());
            (who(&mut stream).unwrap(), stream)
        })
        .collect();
    let tally = |open: &[(String, TcpStream)]| {
        let mut t: HashMap<String, usize> = HashMap::new();
        for (name, _) in open {
            *t.entry(name.clone()).or_default() += 1;
        }
        t
    };
    assert_eq!(tally(&open), HashMap::from([("a".into(), 10), ("b".into(), 10), ("c".into(), 10)]));

    // Close five of a's; the next five go to a.
    let mut closed = 0;
    open.retain(|(name, _)| {
        let close = name == "a" && closed < 5;
        closed += usize::from(close);
        !close
    });
    let addr = backends[0].addr;
    assert!(
        Ringlb::eventually(Duration::from_secs(10), || lb.backend_metric(
            "ringlb_backend_active_connections",
            "p",
            addr
        ) == 5.0),
        "a's closed connections are still counted"
    );
    for _ in 0..5 {
        let mut stream = connect(lb.addr());
        let name = who(&mut stream).unwrap();
        assert_eq!(name, "a", "a new connection went to {name}, not to the backend with fewest");
        open.push((name, stream));
    }
    assert_eq!(tally(&open), HashMap::from([("a".into(), 10), ("b".into(), 10), ("c".into(), 10)]));
}

/// Short connections in a loop, each asking who served it; any error is a client error.
struct Traffic {
    stop: Arc<AtomicBool>,
    done: Arc<AtomicUsize>,
    handle: thread::JoinHandle<Vec<String>>,
}

impl Traffic {
    fn start(addr: SocketAddr) -> Traffic {
        let stop = Arc::new(AtomicBool::new(false));
        let done = Arc::new(AtomicUsize::new(0));
        let (stop2, done2) = (Arc::clone(&stop), Arc::clone(&done));
        let handle = thread::spawn(move || {
            let mut served = Vec::new();
            while !stop2.load(Ordering::SeqCst) {
                let mut stream = connect(addr);
                served.push(who(&mut stream).unwrap_or_else(|e| panic!("client error: {e}")));
                done2.fetch_add(1, Ordering::SeqCst);
                thread::sleep(Duration::from_millis(5));
            }
            served
        });
        Traffic { stop, done, handle }
    }

    fn stop(self) -> Vec<String> {
        self.stop.store(true, Ordering::SeqCst);
        self.handle.join().expect("a client saw an error")
    }
}

#[test]
fn killed_backend_causes_no_client_error_and_returns_after_rise() {
    let (backends, served) = trio();
    let addrs: Vec<SocketAddr> = backends.iter().map(|b| b.addr).collect();
    let lb = Ringlb::start(&pool_config("round_robin", &addrs, "", FAST_HEALTH));
    let served_by = |i: usize| served[i].load(Ordering::SeqCst);

    let before = Traffic::start(lb.addr()).stop_after(30);
    assert!(before.iter().any(|n| n == "b"));

    // Kill b between requests (a connection caught in its backlog would be reset, and no
    // proxy can replay bytes a client already sent).
    backends[1].stop_listening();
    let traffic = Traffic::start(lb.addr());
    assert!(
        Ringlb::eventually(Duration::from_secs(10), || lb.log().contains(&format!("backend {} DOWN after", addrs[1]))),
        "b was not marked down:\n{}",
        lb.log()
    );
    // Once down it gets no traffic at all, not even connect attempts: over the next 50
    // requests (after 10 that may have been under way when it went down).
    traffic.wait_for(10);
    let attempts = lb.backend_metric("ringlb_backend_connections_total", "p", addrs[1]);
    traffic.wait_for(50);
    assert_eq!(lb.backend_metric("ringlb_backend_connections_total", "p", addrs[1]), attempts, "b still tried");
    assert_eq!(lb.backend_metric("ringlb_backend_up", "p", addrs[1]), 0.0);

    // Bring b back on its port: after rise x interval it is up and served again.
    let b_served_before = served_by(1);
    let _revived = Backend::start_on(addrs[1], identity("b", Arc::clone(&served[1])));
    assert!(
        Ringlb::eventually(Duration::from_secs(10), || lb
            .log()
            .contains(&format!("backend {} UP after 2 passed checks", addrs[1]))),
        "b did not come back:\n{}",
        lb.log()
    );
    assert!(Ringlb::eventually(Duration::from_secs(10), || served_by(1) > b_served_before + 3), "b gets no traffic");
    let during = traffic.stop();
    assert!(during.len() > 50, "only {} requests", during.len());
    assert!(lb.logged("connection refused"), "the reason is logged:\n{}", lb.log());
}

impl Traffic {
    /// Waits until `n` more requests were answered.
    fn wait_for(&self, n: usize) {
        let start = self.done.load(Ordering::SeqCst);
        assert!(
            Ringlb::eventually(Duration::from_secs(30), || self.done.load(Ordering::SeqCst) >= start + n),
            "traffic stalled"
        );
    }

    fn stop_after(self, n: usize) -> Vec<String> {
        self.wait_for(n);
        self.stop()
    }
}

#[test]
fn hung_backend_is_taken_out_by_send_expect_check() {
    let (backends, _) = trio();
    // Accepts, reads, never answers; counts the probe connections that ringlb closed.
    let closed_by_peer = Arc::new(AtomicUsize::new(0));
    let closed = Arc::clone(&closed_by_peer);
    let hung = Backend::start(move |mut stream| {
        let mut buf = [0u8; 64];
        while matches!(stream.read(&mut buf), Ok(n) if n > 0) {}
        closed.fetch_add(1, Ordering::SeqCst);
    });
    let addrs = vec![backends[0].addr, hung.addr, backends[2].addr];
    // 1 s for a reply: the healthy backends answer from a thread of this (busy) test process.
    let fast = FAST_HEALTH.replace("timeout = \"200ms\"", "timeout = \"1s\"");
    let health = format!("{fast}\nsend = \"PING\\r\\n\"\nexpect = \"+PONG\"");
    let lb = Ringlb::start(&pool_config("round_robin", &addrs, "", &health));
    assert!(
        Ringlb::eventually(Duration::from_secs(10), || lb
            .log()
            .contains(&format!("backend {} DOWN after 2 failed checks (timed out waiting for the reply)", hung.addr))),
        "the hung backend was not marked down:\n{}",
        lb.log()
    );
    // Every new connection reaches a healthy backend.
    for _ in 0..20 {
        let name = who(&mut connect(lb.addr())).unwrap();
        assert!(name == "a" || name == "c", "{name}");
    }
    // The others passed their checks all along.
    assert_eq!(lb.backend_metric("ringlb_backend_up", "p", backends[0].addr), 1.0);
    assert_eq!(lb.backend_metric("ringlb_backend_up", "p", backends[2].addr), 1.0);
    // Checks close politely: the hung backend saw FIN on the probe connections (none left
    // half-open), though it never answered.
    let probes = hung.accepted();
    assert!(probes >= 2);
    assert!(
        Ringlb::eventually(Duration::from_secs(5), || closed_by_peer.load(Ordering::SeqCst) + 1 >= hung.accepted()),
        "{} of {} probe connections were closed",
        closed_by_peer.load(Ordering::SeqCst),
        hung.accepted()
    );
}

#[test]
fn on_down_close_cuts_sessions_of_a_backend_marked_down() {
    let (backends, _) = trio();
    let addrs: Vec<SocketAddr> = backends[..2].iter().map(|b| b.addr).collect();
    let lb = Ringlb::start(&pool_config("round_robin", &addrs, "on_down = \"close\"", FAST_HEALTH));
    let mut sessions: Vec<(String, TcpStream)> = (0..6)
        .map(|_| {
            let mut s = connect(lb.addr());
            (who(&mut s).unwrap(), s)
        })
        .collect();
    assert!(sessions.iter().any(|(n, _)| n == "a") && sessions.iter().any(|(n, _)| n == "b"));
    // a stops accepting (its checks fail) while its sessions are still open on its side.
    backends[0].stop_listening();
    assert!(Ringlb::eventually(Duration::from_secs(10), || lb.log().contains("DOWN after")), "{}", lb.log());
    for (name, stream) in sessions.iter_mut() {
        stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        if name == "a" {
            let mut buf = [0u8; 1];
            match stream.read(&mut buf) {
                Ok(0) => {}
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
                other => panic!("a session to the down backend is still open: {other:?}"),
            }
        } else {
            round_trip(stream, b"still fine\n").expect("sessions of the healthy backend stay");
        }
    }
    assert!(lb.logged("cutting"), "{}", lb.log());
    let metrics = lb.metrics();
    let cut = metrics["ringlb_connections_backend_down_closed_total"];
    let on_a = sessions.iter().filter(|(n, _)| n == "a").count() as f64;
    assert_eq!(cut, on_a, "{metrics:?}");
}

#[test]
fn metrics_page_and_unknown_paths() {
    let backend = Backend::echo();
    let lb = Ringlb::start(&pool_config("random_two", &[backend.addr], "", NO_HEALTH));
    round_trip(&mut connect(lb.addr()), b"x").unwrap();
    let metrics = lb.metrics();
    assert!(metrics["ringlb_connections_accepted_total"] >= 1.0);
    assert_eq!(lb.backend_metric("ringlb_backend_connections_total", "p", backend.addr), 1.0);
    let mut other = connect(lb.metrics_addr.unwrap());
    other.write_all(b"GET /secrets HTTP/1.0\r\n\r\n").unwrap();
    let (response, _) = read_until_end(&mut other);
    let response = String::from_utf8_lossy(&response);
    assert!(response.starts_with("HTTP/1.0 404 Not Found"), "{response}");
}

#[test]
fn failed_connects_take_a_backend_down_before_the_next_check() {
    let (backends, _) = trio();
    let addrs: Vec<SocketAddr> = backends.iter().map(|b| b.addr).collect();
    // The first check runs at start; the next not for a minute.
    let lb = Ringlb::start(&pool_config("round_robin", &addrs, "", "interval = \"60s\"\nfall = 3"));
    // Its first check (at start) is in: the failures below are all the workers'.
    assert!(Ringlb::eventually(Duration::from_secs(10), || backends[2].accepted() >= 1));
    backends[2].stop_listening();
    // Each refused connect is retried on another backend; three of them take c down. (Which
    // worker, and so which round-robin turn, a connection gets is the kernel's choice.)
    let down = format!("backend {} DOWN after 3 failed checks (connection refused, seen by a worker)", addrs[2]);
    for _ in 0..60 {
        let name = who(&mut connect(lb.addr())).unwrap();
        assert_ne!(name, "c");
        if lb.log().contains(&down) {
            break;
        }
    }
    assert!(Ringlb::eventually(Duration::from_secs(5), || lb.log().contains(&down)), "{}", lb.log());
    let attempts = lb.backend_metric("ringlb_backend_connections_total", "p", addrs[2]);
    for _ in 0..10 {
        who(&mut connect(lb.addr())).unwrap();
    }
    assert_eq!(lb.backend_metric("ringlb_backend_connections_total", "p", addrs[2]), attempts, "c still tried");
}

#[test]
fn all_backends_down_fails_open_and_says_so_once() {
    let (backends, served) = trio();
    let addrs: Vec<SocketAddr> = backends[..2].iter().map(|b| b.addr).collect();
    // Both answer clients but fail a check that expects the wrong reply.
    let health = format!("{FAST_HEALTH}\nsend = \"PING\\r\\n\"\nexpect = \"+NOPE\"");
    let lb = Ringlb::start(&pool_config("round_robin", &addrs, "", &health));
    assert!(Ringlb::eventually(Duration::from_secs(10), || lb.log().contains("fail open")), "{}", lb.log());
    assert!(lb.logged("unexpected reply \"+PONG\""), "{}", lb.log());
    for _ in 0..10 {
        who(&mut connect(lb.addr())).expect("served while every backend is down");
    }
    assert!(served[0].load(Ordering::SeqCst) >= 3 && served[1].load(Ordering::SeqCst) >= 3, "both still used");
    // Five more failed checks of each: still said once.
    let checks = [backends[0].accepted(), backends[1].accepted()];
    assert!(Ringlb::eventually(Duration::from_secs(20), || backends[0].accepted() >= checks[0] + 5
        && backends[1].accepted() >= checks[1] + 5));
    assert_eq!(lb.log().matches("fail open").count(), 1, "{}", lb.log());
    let names = lb.thread_names();
    assert!(!names.iter().any(|n| n.starts_with("iou-wrk")), "health checks use io-wq threads: {names:?}");
}
