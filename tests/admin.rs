//! The admin API and `ringlb ctl`: draining, maintenance, weights, shutdown-sessions,
//! connections, reload; the socket's permissions; bad requests changing nothing.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::thread;
use std::time::Duration;

use common::*;

/// A config with listener `test` on a free port, pool `p` of `backends`, an admin socket of
/// its own and the metrics port.
fn config(backends: &[SocketAddr], pool_extra: &str) -> String {
    let socket = admin_socket_path();
    config_for(
        backends,
        &format!("admin_socket = \"{}\"\nmetrics_bind = \"127.0.0.1:0\"", socket.display()),
        pool_extra,
    )
}

/// Identity backends named `names`, with their counts of served clients.
fn identities(names: &[&'static str]) -> (Vec<Backend>, Vec<Arc<AtomicUsize>>) {
    let served: Vec<Arc<AtomicUsize>> = names.iter().map(|_| Arc::new(AtomicUsize::new(0))).collect();
    let backends = names.iter().zip(&served).map(|(n, s)| Backend::start(identity(n, Arc::clone(s)))).collect();
    (backends, served)
}

/// Waits until ringlb lists exactly `held` connections: the ones [`connections_on`] closed
/// stay listed until both ends have closed.
fn settle(lb: &Ringlb, held: u64) {
    assert!(
        Ringlb::eventually(Duration::from_secs(10), || lb.admin("GET", "/v1/connections", "").1["count"] == held),
        "ringlb does not list {held} connections: {}",
        lb.admin("GET", "/v1/connections", "").1
    );
}

/// Opens connections until `want` of them are on backend `name`; returns those (the others
/// are closed, see [`settle`]).
fn connections_on(lb: &Ringlb, name: &str, want: usize) -> Vec<TcpStream> {
    let mut on = Vec::new();
    for _ in 0..100 {
        if on.len() == want {
            return on;
        }
        let mut stream = connect(lb.addr());
        if who(&mut stream).unwrap() == name {
            on.push(stream);
        }
    }
    panic!("fewer than {want} connections reached {name}");
}

/// The JSON of backend `address` in pool `p`.
fn backend(lb: &Ringlb, address: SocketAddr) -> serde_json::Value {
    let (status, pool) = lb.admin("GET", "/v1/pools/p", "");
    assert_eq!(status, 200, "{pool}");
    pool["backends"].as_array().unwrap().iter().find(|b| b["address"] == address.to_string()).unwrap().clone()
}

#[test]
fn a_drain_under_load_moves_new_connections_at_once_and_lets_open_ones_finish() {
    let (backends, _) = identities(&["a", "b"]);
    let (a, b) = (backends[0].addr, backends[1].addr);
    let lb = Ringlb::start(&config(&[a, b], ""));
    let addr = lb.addr();
    let mut on_a = connections_on(&lb, "a", 2);

    // Clients that keep connecting (one request each), recording who served them.
    let stop = Arc::new(AtomicBool::new(false));
    let seen = Arc::new(std::sync::Mutex::new(Vec::<(usize, String)>::new()));
    let clients: Vec<_> = (0..2)
        .map(|client| {
            let (stop, seen) = (Arc::clone(&stop), Arc::clone(&seen));
            thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let name = who(&mut connect(addr)).expect("every new connection is served");
                    seen.lock().unwrap().push((client, name));
                }
            })
        })
        .collect();
    let count = || seen.lock().unwrap().len();
    assert!(Ringlb::eventually(Duration::from_secs(20), || count() >= 20));

    let (code, out, err) = lb.ctl(&["drain", "p", &a.to_string()]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains(&format!("backend {a} is drain")), "{out}");
    let drained_at = count();
    assert!(Ringlb::eventually(Duration::from_secs(20), || count() >= drained_at + 50));
    stop.store(true, Ordering::Relaxed);
    clients.into_iter().for_each(|c| c.join().unwrap());
    // Each client's first answer after the drain may be from a connection it opened before;
    // every later one started after the drain was answered, and goes to b.
    let after = seen.lock().unwrap()[drained_at..].to_vec();
    for client in 0..2 {
        let later: Vec<&String> = after.iter().filter(|(c, _)| *c == client).skip(1).map(|(_, n)| n).collect();
        assert!(later.iter().all(|n| *n == "b"), "client {client} reached the drained backend: {later:?}");
    }

    // The open ones carry on, every byte.
    for stream in &mut on_a {
        round_trip(stream, b"still served while draining\n").unwrap();
        assert_eq!(who(stream).unwrap(), "a");
    }
    assert_eq!(backend(&lb, a)["active_connections"], 2);
    assert_eq!(backend(&lb, a)["admin_state"], "drain");

    // `drain --wait` returns once they are gone, and not before.
    let mut waiting = lb.ctl_child(&["drain", "p", &a.to_string(), "--wait", "60s"]);
    round_trip(&mut on_a[0], b"x\n").unwrap();
    assert!(waiting.try_wait().unwrap().is_none(), "drain --wait returned with 2 connections open");
    drop(on_a);
    assert!(Ringlb::eventually(Duration::from_secs(30), || waiting.try_wait().unwrap().is_some()));
    let output = waiting.wait_with_output().unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    assert!(String::from_utf8_lossy(&output.stdout).contains("0 open connections"));

    // Ready again: it takes new connections.
    let (code, out, _) = lb.ctl(&["ready", "p", &a.to_string()]);
    assert_eq!(code, 0, "{out}");
    connections_on(&lb, "a", 1);
}

#[test]
fn drain_wait_fails_when_time_runs_out_and_usage_errors_exit_2() {
    let (backends, _) = identities(&["a"]);
    let a = backends[0].addr;
    let lb = Ringlb::start(&config(&[a], ""));
    let _open = connections_on(&lb, "a", 1);
    let (code, _, err) = lb.ctl(&["drain", "p", &a.to_string(), "--wait", "300ms"]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("still has 1 open connections"), "{err}");
    // With every backend drained, a new connection is closed, not sent to it.
    // (A reset may come before connect returns.)
    if let Ok(mut refused) = TcpStream::connect(lb.addr()) {
        refused.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        assert!(who(&mut refused).is_err());
    }
    // Unknown pool and backend: refused (1); bad arguments: usage (2).
    assert_eq!(lb.ctl(&["drain", "nope", &a.to_string()]).0, 1);
    assert_eq!(lb.ctl(&["drain", "p", "127.0.0.1:1"]).0, 1);
    assert_eq!(lb.ctl(&["drain", "p", "not-an-address"]).0, 2);
    assert_eq!(lb.ctl(&["weight", "p", &a.to_string(), "999"]).0, 2);
    assert_eq!(lb.ctl(&["frobnicate"]).0, 2);
}

#[test]
fn maintenance_stops_the_checks_and_ready_brings_them_back() {
    let (backends, _) = identities(&["a", "b"]);
    let (a, b) = (&backends[0], &backends[1]);
    let health = "[pools.p.health]\ninterval = \"100ms\"\ntimeout = \"1s\"\nrise = 2\nfall = 2";
    let lb = Ringlb::start(&config(&[a.addr, b.addr], health));
    assert!(Ringlb::eventually(Duration::from_secs(20), || a.accepted() >= 2 && b.accepted() >= 2));
    let (code, out, _) = lb.ctl(&["maint", "p", &a.addr.to_string()]);
    assert_eq!(code, 0, "{out}");
    let view = backend(&lb, a.addr);
    assert_eq!(view["admin_state"], "maint");
    assert_eq!(view["checked"], false);
    // A check already on its way may still land; after b was checked 3 more times, none may.
    let b_then = b.accepted();
    assert!(Ringlb::eventually(Duration::from_secs(20), || b.accepted() >= b_then + 3));
    let a_then = a.accepted();
    let b_then = b.accepted();
    assert!(Ringlb::eventually(Duration::from_secs(20), || b.accepted() >= b_then + 5));
    assert_eq!(a.accepted(), a_then, "a backend in maintenance was checked");
    assert_eq!(lb.backend_metric("ringlb_backend_admin_ready", "p", a.addr), 0.0);

    // Ready: checked again, down until `rise` checks pass, then up and taking connections.
    lb.ctl(&["ready", "p", &a.addr.to_string()]);
    assert_eq!(backend(&lb, a.addr)["checked"], true);
    assert!(Ringlb::eventually(Duration::from_secs(20), || a.accepted() > a_then));
    assert!(Ringlb::eventually(Duration::from_secs(20), || backend(&lb, a.addr)["health"] == "up"));
    connections_on(&lb, "a", 1);
}

#[test]
fn shutdown_sessions_resets_exactly_that_backends_connections() {
    let (backends, _) = identities(&["a", "b"]);
    let (a, b) = (backends[0].addr, backends[1].addr);
    let lb = Ringlb::start(&config(&[a, b], ""));
    let on_a = connections_on(&lb, "a", 3);
    let mut on_b = connections_on(&lb, "b", 2);
    settle(&lb, 5);

    let (code, out, err) = lb.ctl(&["shutdown-sessions", "p", &a.to_string()]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("reset 3 connections"), "{out}");
    for mut stream in on_a {
        let mut buf = [0u8; 8];
        let end = stream.read(&mut buf);
        assert!(matches!(&end, Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset), "{end:?}");
    }
    for stream in &mut on_b {
        assert_eq!(who(stream).unwrap(), "b");
    }
    assert!(lb.logged("termination=KD"), "{}", lb.log());
    // Not drained: new connections still reach it.
    connections_on(&lb, "a", 1);
}

#[test]
fn connections_are_listed_by_pool_and_backend() {
    let (backends, _) = identities(&["a", "b"]);
    let (a, b) = (backends[0].addr, backends[1].addr);
    let lb = Ringlb::start(&config(&[a, b], ""));
    let mut on_a = connections_on(&lb, "a", 2);
    let _on_b = connections_on(&lb, "b", 1);
    settle(&lb, 3);
    round_trip(&mut on_a[0], b"twelve bytes\n").unwrap();
    let (status, all) = lb.admin("GET", &format!("/v1/connections?backend={a}"), "");
    assert_eq!(status, 200, "{all}");
    assert_eq!(all["count"], 2);
    let listed = &all["connections"].as_array().unwrap();
    let local: Vec<String> = on_a.iter().map(|s| s.local_addr().unwrap().to_string()).collect();
    for c in listed.iter() {
        assert!(local.contains(&c["client"].as_str().unwrap().to_string()), "{c}");
        assert_eq!(c["listener"], "test");
        assert_eq!(c["pool"], "p");
        assert_eq!(c["phase"], "relaying");
    }
    assert!(listed.iter().any(|c| c["bytes_up"].as_u64().unwrap() >= 17), "{all}");
    let (_, limited) = lb.admin("GET", "/v1/connections?limit=1", "");
    assert_eq!(limited["count"], 1);
    assert_eq!(limited["truncated"], true);
    let (code, out, _) = lb.ctl(&["connections", "--pool", "p"]);
    assert_eq!(code, 0);
    assert!(out.contains("3 connections"), "{out}");
    assert_eq!(lb.admin("GET", "/v1/connections?pool=nope", "").0, 404);
}

#[test]
fn a_limit_says_truncated_also_when_one_worker_holds_every_connection() {
    let backend_ = Backend::echo();
    let top = format!("workers = 1\nadmin_socket = \"{}\"", admin_socket_path().display());
    let lb = Ringlb::start(&config_for(&[backend_.addr], &top, ""));
    let _streams: Vec<TcpStream> = (0..3)
        .map(|_| {
            let mut stream = connect(lb.addr());
            round_trip(&mut stream, b"x\n").unwrap();
            stream
        })
        .collect();
    let (_, limited) = lb.admin("GET", "/v1/connections?limit=2", "");
    assert_eq!(limited["count"], 2, "{limited}");
    assert_eq!(limited["truncated"], true, "{limited}");
    let (_, all) = lb.admin("GET", "/v1/connections?limit=3", "");
    assert_eq!(all["count"], 3, "{all}");
    assert_eq!(all["truncated"], false, "{all}");
}

#[test]
fn run_time_settings_survive_a_reload_and_go_with_their_backend() {
    let (backends, _) = identities(&["a", "b", "c"]);
    let (a, b, c) = (backends[0].addr, backends[1].addr, backends[2].addr);
    let lb = Ringlb::start(&config(&[a, b], ""));
    lb.ctl(&["drain", "p", &a.to_string()]);
    lb.ctl(&["weight", "p", &b.to_string(), "7"]);
    // The same pool with a backend added: a stays drained, b keeps its weight.
    let text = std::fs::read_to_string(lb.config_path()).unwrap();
    let with_c =
        text.replace(&format!("{{ address = \"{b}\" }}"), &format!("{{ address = \"{b}\" }}, {{ address = \"{c}\" }}"));
    assert!(lb.reload(&with_c).contains("] reload: "));
    assert_eq!(backend(&lb, a)["admin_state"], "drain");
    assert_eq!(backend(&lb, a)["set_at_run_time"], true);
    assert_eq!(backend(&lb, b)["weight"], 7);
    assert_eq!(backend(&lb, c)["admin_state"], "ready");
    for _ in 0..20 {
        assert_ne!(who(&mut connect(lb.addr())).unwrap(), "a");
    }
    // Through the API: the reload answers what changed.
    let (status, reloaded) = lb.admin("POST", "/v1/reload", "");
    assert_eq!(status, 200, "{reloaded}");
    assert_eq!(reloaded["result"], "ok");
    // A backend that leaves the config takes its setting with it.
    let without_a = with_c.replace(&format!("{{ address = \"{a}\" }}, "), "");
    assert!(lb.reload(&without_a).contains("] reload: "));
    let out = lb.reload(&with_c);
    assert!(out.contains("] reload: "), "{out}\n{}", lb.log());
    assert_eq!(backend(&lb, a)["admin_state"], "ready");
    // An invalid file: 400 with the line and key, nothing changes.
    lb.write_config(&with_c.replace("pool = \"p\"", "pool = \"nope\""));
    let (status, failed) = lb.admin("POST", "/v1/reload", "");
    assert_eq!(status, 400, "{failed}");
    assert!(failed["key"].as_str().unwrap().contains("pool"), "{failed}");
    assert!(failed["line"].as_u64().unwrap() > 0, "{failed}");
    assert_eq!(backend(&lb, b)["weight"], 7);
}

#[test]
fn the_socket_is_private_and_removed_at_exit() {
    let backend_ = Backend::echo();
    let mut lb = Ringlb::start(&config(&[backend_.addr], ""));
    let socket = lb.admin_socket.clone().unwrap();
    let mode = std::fs::metadata(&socket).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
    let (code, out, _) = lb.ctl(&["info"]);
    assert_eq!(code, 0);
    assert!(out.contains(&format!("pid: {}", lb.pid())), "{out}");
    lb.stop();
    assert!(!socket.exists(), "the socket file is left behind");
}

#[test]
fn bad_requests_change_nothing() {
    let (backends, _) = identities(&["a"]);
    let a = backends[0].addr;
    let lb = Ringlb::start(&config(&[a], ""));
    let socket = lb.admin_socket.clone().unwrap();
    let path = format!("/v1/pools/p/backends/{a}");
    for (method, target, body, status) in [
        ("GET", "/v2/everything", "", 404),
        ("DELETE", "/v1/pools", "", 405),
        ("GET", path.as_str(), "", 405),
        ("PATCH", path.as_str(), "{\"state\": \"off\"}", 400),
        ("PATCH", path.as_str(), "{\"weight\": 1000}", 400),
        ("PATCH", path.as_str(), "{not json", 400),
        ("PATCH", path.as_str(), "{}", 400),
        ("PATCH", "/v1/pools/p/backends/127.0.0.1:1", "{\"state\": \"drain\"}", 404),
        ("PATCH", "/v1/pools/nope/backends/127.0.0.1:1", "{\"state\": \"drain\"}", 404),
        ("PATCH", "/v1/pools/p/backends/banana", "{\"state\": \"drain\"}", 400),
        ("POST", "/v1/pools/p/backends/127.0.0.1:1/shutdown-sessions", "", 404),
        ("GET", "/v1/connections?limit=0", "", 400),
    ] {
        let (got, body) = lb.admin(method, target, body);
        assert_eq!(got, status, "{method} {target}: {body}");
        assert!(body["error"].is_string(), "{method} {target}: {body}");
    }
    // A body over 64 KiB.
    let big = format!("{{\"state\": \"drain\", \"pad\": \"{}\"}}", "x".repeat(70_000));
    assert_eq!(lb.admin("PATCH", &path, &big).0, 413);
    // Not HTTP at all, and a bare line feed request.
    let answer = unix_exchange(&socket, b"\x16\x03\x01 hello there\r\n\r\n");
    assert!(answer.starts_with(b"HTTP/1.1 400"), "{}", String::from_utf8_lossy(&answer));
    let answer = unix_exchange(&socket, b"GET /v1/info HTTP/1.1\nHost: x\n\n");
    assert!(answer.starts_with(b"HTTP/1.1 200"), "{}", String::from_utf8_lossy(&answer));
    // An idle client is closed (after the header timeout).
    let mut idle = std::os::unix::net::UnixStream::connect(&socket).unwrap();
    idle.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let mut buf = [0u8; 64];
    assert!(idle.read(&mut buf).is_ok(), "closed by ringlb, not timed out on our side");
    // Nothing changed.
    let view = backend(&lb, a);
    assert_eq!(view["admin_state"], "ready");
    assert_eq!(view["set_at_run_time"], false);
    connections_on(&lb, "a", 1);
}

#[test]
fn a_hundred_admin_clients_at_once_are_all_answered_while_data_flows() {
    let backend_ = Backend::echo();
    let lb = Arc::new(Ringlb::start(&config(&[backend_.addr], "")));
    let mut data = connect(lb.addr());
    let clients: Vec<_> = (0..100)
        .map(|_| {
            let lb = Arc::clone(&lb);
            thread::spawn(move || lb.admin("GET", "/v1/pools", "").0)
        })
        .collect();
    for i in 0..50 {
        round_trip(&mut data, format!("exchange {i} while the admin socket is busy").as_bytes()).unwrap();
    }
    for client in clients {
        assert_eq!(client.join().unwrap(), 200);
    }
    data.write_all(b"done").unwrap();
}
