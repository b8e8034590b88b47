//! Binary upgrade (SIGUSR2): the running process starts the binary again and hands it its
//! listening sockets; no connection attempt is refused, open connections finish with the old
//! process, and an upgrade that fails leaves the old process serving.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::*;

/// A config with listener `test` on a free port, pool `p` of `backends` and the metrics port.
fn config(backends: &[SocketAddr], pool_extra: &str) -> String {
    config_for(backends, "metrics_bind = \"127.0.0.1:0\"", pool_extra)
}

#[test]
fn an_upgrade_under_load_refuses_nothing_and_keeps_open_connections() {
    adopt_orphans();
    let backend = Backend::echo();
    let mut lb = Ringlb::start(&config(&[backend.addr], ""));
    let addr = lb.addr();
    let mut held = connect(addr);
    round_trip(&mut held, b"before\n").unwrap();
    // Keep-alive clients stay with the old process; a client opening a connection per request
    // meets the old process, then the new one.
    let load = Load::start(addr);
    load.wait_for(50);

    let new = lb.upgrade().expect("upgrade");
    // A draining process does not upgrade again.
    let again = lb.upgrade().err().expect("a second upgrade from the old process");
    assert!(again.contains("SIGUSR2: ignored"), "{again}");
    load.wait_for(200);
    // The old process drains: it still relays what it has open and exits once that closed.
    round_trip(&mut held, b"while draining\n").unwrap();
    assert!(lb.running(), "the old process left before its connections closed");
    assert_eq!(load.finish(), Vec::<String>::new(), "log:\n{}", lb.log());
    drop(held);
    let status = lb.wait_exit(Duration::from_secs(40)).expect("the old process exits once drained");
    assert!(status.success(), "old process: {status}; log:\n{}", lb.log());

    // Only the new process is left: it serves the listener and the metrics port.
    let mut stream = connect(addr);
    round_trip(&mut stream, b"after\n").unwrap();
    drop(stream);
    let accepted = lb.metrics()["ringlb_connections_accepted_total"];
    assert!(accepted >= 1.0, "{accepted}");
    assert_eq!(new.stop(), Some(0), "new process; log:\n{}", lb.log());
}

#[test]
fn a_failed_upgrade_leaves_the_old_process_serving() {
    adopt_orphans();
    let backend = Backend::echo();
    let good = config(&[backend.addr], "");
    let mut lb = Ringlb::start(&good);
    let addr = lb.addr();
    let mut held = connect(addr);

    // A config the new process cannot load.
    lb.write_config("workers = \"many\"\n");
    let why = lb.upgrade().err().expect("an upgrade with a bad config fails");
    assert!(why.contains("exited before it was ready"), "{why}");
    assert!(lb.log().contains("workers"), "the new process says why:\n{}", lb.log());

    // A config with another number of workers: each worker owns one socket per listener.
    lb.write_config(&good.replace("workers = 2", "workers = 3"));
    let why = lb.upgrade().err().expect("an upgrade to another number of workers fails");
    assert!(why.contains("exited before it was ready"), "{why}");
    assert!(lb.logged("an upgrade keeps the number of workers"), "{}", lb.log());

    // Still serving, the open connection and new ones.
    assert!(lb.running());
    round_trip(&mut held, b"still here\n").unwrap();
    round_trip(&mut connect(addr), b"new\n").unwrap();

    // With the config fixed, and a listener added, it upgrades.
    lb.write_config(&(good.clone() + "[listeners.extra]\nbind = \"127.0.0.1:0\"\npool = \"p\"\n"));
    let new = lb.upgrade().expect("upgrade");
    let extra = lb.added_listener("extra");
    round_trip(&mut held, b"old process\n").unwrap();
    drop(held);
    assert!(lb.wait_exit(Duration::from_secs(40)).expect("old process exits").success());
    round_trip(&mut connect(addr), b"new process\n").unwrap();
    round_trip(&mut connect(extra), b"its new listener\n").unwrap();
    assert_eq!(new.stop(), Some(0), "log:\n{}", lb.log());
}

#[test]
fn backends_marked_down_stay_down_across_an_upgrade() {
    adopt_orphans();
    let alive = Backend::echo();
    let (_refusing, dead) = refusing_addr();
    // Checks far apart: the new process's first check alone (one failure of fall = 2) would not
    // mark the dead backend down, and nothing else would before it routes clients to it.
    let health = "[pools.p.health]\ninterval = \"1h\"\ntimeout = \"1s\"\nrise = 1\nfall = 2";
    let mut lb = Ringlb::start(&config(&[alive.addr, dead], health));
    let addr = lb.addr();
    // The first check fails once; connects that fail count too (clients are retried on the
    // other backend).
    assert!(
        Ringlb::eventually(Duration::from_secs(20), || {
            round_trip(&mut connect(addr), b"x\n").unwrap();
            lb.backend_metric("ringlb_backend_up", "p", dead) == 0.0
        }),
        "the dead backend was never marked down:\n{}",
        lb.log()
    );

    let new = lb.upgrade().expect("upgrade");
    assert!(lb.wait_exit(Duration::from_secs(40)).expect("old process exits").success());
    // Only the new process answers now: it started with the backend down, so no client was
    // sent to it.
    assert_eq!(lb.backend_metric("ringlb_backend_up", "p", dead), 0.0);
    assert_eq!(lb.backend_metric("ringlb_backend_up", "p", alive.addr), 1.0);
    for _ in 0..10 {
        round_trip(&mut connect(addr), b"y\n").unwrap();
    }
    assert_eq!(lb.backend_metric("ringlb_backend_connect_failures_total", "p", dead), 0.0);
    assert_eq!(lb.backend_metric("ringlb_backend_connections_total", "p", alive.addr), 10.0);
    assert_eq!(new.stop(), Some(0), "log:\n{}", lb.log());
}

#[test]
fn an_upgrade_runs_the_binary_that_replaced_the_old_one_at_its_path() {
    adopt_orphans();
    let backend = Backend::echo();
    let dir = std::env::temp_dir().join(format!("ringlb-upgrade-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let binary = dir.join("ringlb");
    copy_executable(std::path::Path::new(env!("CARGO_BIN_EXE_ringlb")), &binary);
    let mut lb = Ringlb::start_binary(&binary, &config(&[backend.addr], ""));
    let addr = lb.addr();

    // As a package manager replaces it: a new file renamed over the path.
    let fresh = dir.join("ringlb.new");
    copy_executable(std::path::Path::new(env!("CARGO_BIN_EXE_ringlb")), &fresh);
    std::fs::rename(&fresh, &binary).unwrap();
    let running = std::fs::read_link(format!("/proc/{}/exe", lb.pid())).unwrap();
    assert!(running.to_string_lossy().ends_with(" (deleted)"), "{running:?}");

    let new = lb.upgrade().expect("upgrade");
    assert_eq!(std::fs::read_link(format!("/proc/{}/exe", new.pid)).unwrap(), binary);
    assert!(lb.wait_exit(Duration::from_secs(40)).expect("old process exits").success());
    round_trip(&mut connect(addr), b"served by the new binary\n").unwrap();
    assert_eq!(new.stop(), Some(0), "log:\n{}", lb.log());
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn an_upgrade_keeps_the_admin_socket_and_what_operators_set() {
    adopt_orphans();
    let (a, b) = (Backend::echo(), Backend::echo());
    let socket = admin_socket_path();
    let top = format!("metrics_bind = \"127.0.0.1:0\"\nadmin_socket = \"{}\"", socket.display());
    let mut lb = Ringlb::start(&config_for(&[a.addr, b.addr], &top, ""));
    let (code, out, err) = lb.ctl(&["drain", "p", &a.addr.to_string()]);
    assert_eq!(code, 0, "{out}{err}");
    lb.ctl(&["weight", "p", &b.addr.to_string(), "9"]);

    let new = lb.upgrade().expect("upgrade");
    assert!(lb.wait_exit(Duration::from_secs(40)).expect("old process exits").success());
    // The same socket file, now served by the new process, which kept the settings.
    assert!(socket.exists(), "the old process removed the socket it handed over");
    let (code, info, _) = lb.ctl(&["info"]);
    assert_eq!(code, 0);
    assert!(info.contains(&format!("pid: {}", new.pid)), "{info}");
    let (_, pools) = lb.admin("GET", "/v1/pools/p", "");
    let backends = pools["backends"].as_array().unwrap();
    assert_eq!(backends[0]["admin_state"], "drain", "{pools}");
    assert_eq!(backends[1]["weight"], 9, "{pools}");
    for _ in 0..10 {
        round_trip(&mut connect(lb.addr()), b"to b only").unwrap();
    }
    assert_eq!(a.accepted(), 0, "the drained backend got connections after the upgrade");
    assert_eq!(new.stop(), Some(0), "log:\n{}", lb.log());
    assert!(!socket.exists(), "the new process leaves its socket behind");
}
