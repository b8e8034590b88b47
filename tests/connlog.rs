//! The connection log: one line per connection, with HAProxy's termination codes, each
//! provoked here; the JSON format; turning it off.

mod common;

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::thread;
use std::time::Duration;

use common::*;

/// The log line of the connection whose client side is `local`, once it is written.
fn line_of(lb: &Ringlb, local: SocketAddr) -> String {
    let needle = format!("client={local} ");
    assert!(lb.logged(&needle), "no connection line for {local}:\n{}", lb.log());
    lb.log().lines().find(|l| l.contains(&needle)).unwrap().to_string()
}

fn field<'a>(line: &'a str, key: &str) -> &'a str {
    let start = format!("{key}=");
    line.split_whitespace().find_map(|w| w.strip_prefix(start.as_str())).unwrap_or_else(|| panic!("no {key} in {line}"))
}

/// A listener `test` (with `listener_extra`) to pool `p` of `backends` (with `pool_extra`).
fn config(backends: &[SocketAddr], top: &str, listener_extra: &str, pool_extra: &str) -> String {
    let list: Vec<String> = backends.iter().map(|a| format!("{{ address = \"{a}\" }}")).collect();
    let health = if pool_extra.contains("[pools.p.health]") { "" } else { "[pools.p.health]\nenabled = false\n" };
    format!(
        "workers = 2\n{top}\n[listeners.test]\nbind = \"127.0.0.1:0\"\npool = \"p\"\n{listener_extra}\n\
         [pools.p]\nbackends = [{}]\n{pool_extra}\n{health}",
        list.join(", ")
    )
}

#[test]
fn a_normal_end_is_logged_with_its_times_and_bytes() {
    let backend = Backend::echo();
    let lb = Ringlb::start(&config(&[backend.addr], "", "", ""));
    let mut stream = connect(lb.addr());
    let local = stream.local_addr().unwrap();
    round_trip(&mut stream, b"twenty bytes of data").unwrap();
    stream.shutdown(Shutdown::Write).unwrap();
    let (_, end) = read_until_end(&mut stream);
    end.unwrap();
    let line = line_of(&lb, local);
    assert!(line.contains("] client="), "{line}");
    assert!(line.contains("INFO  ringlb::connection]"), "{line}");
    assert_eq!(field(&line, "termination"), "--", "{line}");
    assert_eq!(field(&line, "listener"), "test");
    assert_eq!(field(&line, "pool"), "p");
    assert_eq!(field(&line, "backend"), backend.addr.to_string());
    assert_eq!(field(&line, "bytes_up"), "20");
    assert_eq!(field(&line, "bytes_down"), "20");
    assert_eq!(field(&line, "attempts"), "1");
    assert_eq!(field(&line, "queued_ms"), "0");
    field(&line, "connect_ms").parse::<u64>().expect("a connect time");
    field(&line, "total_ms").parse::<u64>().expect("a total time");
}

#[test]
fn refused_and_timed_out_connects_are_the_servers() {
    let (_refusing, refused) = refusing_addr();
    let lb = Ringlb::start(&config(&[refused], "", "", ""));
    let mut stream = connect(lb.addr());
    let local = stream.local_addr().unwrap();
    let _ = read_until_end(&mut stream);
    let line = line_of(&lb, local);
    assert_eq!(field(&line, "termination"), "SC", "{line}");
    assert_eq!(field(&line, "backend"), "-", "none was reached: {line}");
    assert_eq!(field(&line, "connect_ms"), "-");

    // A listener with a full accept queue drops SYNs: connecting to it times out.
    let full = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    full.bind(&"127.0.0.1:0".parse::<SocketAddr>().unwrap().into()).unwrap();
    full.listen(0).unwrap();
    let silent = full.local_addr().unwrap().as_socket().unwrap();
    let _fillers: Vec<_> =
        (0..4).filter_map(|_| TcpStream::connect_timeout(&silent, Duration::from_millis(200)).ok()).collect();
    let lb = Ringlb::start(&config(&[silent], "connect_timeout = \"300ms\"", "", ""));
    let mut stream = connect(lb.addr());
    let local = stream.local_addr().unwrap();
    let _ = read_until_end(&mut stream);
    assert_eq!(field(&line_of(&lb, local), "termination"), "sC");
}

#[test]
fn resets_during_data_name_the_side_that_reset() {
    // The server resets after the first line.
    let resetting = Backend::start(|stream| {
        let mut reader = std::io::BufReader::new(stream.try_clone().unwrap());
        let mut line = String::new();
        let _ = std::io::BufRead::read_line(&mut reader, &mut line);
        let _ = socket2::SockRef::from(&stream).set_linger(Some(Duration::ZERO));
    });
    let lb = Ringlb::start(&config(&[resetting.addr], "", "", ""));
    let mut stream = connect(lb.addr());
    let local = stream.local_addr().unwrap();
    stream.write_all(b"hello\n").unwrap();
    let mut buf = [0u8; 8];
    assert!(stream.read(&mut buf).is_err() || buf.is_empty());
    assert_eq!(field(&line_of(&lb, local), "termination"), "SD");

    // The client resets.
    let backend = Backend::echo();
    let lb = Ringlb::start(&config(&[backend.addr], "", "", ""));
    let mut stream = connect(lb.addr());
    let local = stream.local_addr().unwrap();
    round_trip(&mut stream, b"before the reset").unwrap();
    socket2::SockRef::from(&stream).set_linger(Some(Duration::ZERO)).unwrap();
    drop(stream);
    assert_eq!(field(&line_of(&lb, local), "termination"), "CD");
}

#[test]
fn an_idle_timeout_names_the_side_that_went_silent() {
    // The echo answered last: the client is silent.
    let backend = Backend::echo();
    let lb = Ringlb::start(&config(&[backend.addr], "idle_timeout = \"300ms\"", "", ""));
    let mut stream = connect(lb.addr());
    let local = stream.local_addr().unwrap();
    round_trip(&mut stream, b"then nothing").unwrap();
    let _ = read_until_end(&mut stream);
    assert_eq!(field(&line_of(&lb, local), "termination"), "cD");

    // A backend that reads and never answers: the server is silent.
    let mute = Backend::start(|mut stream| {
        let mut buf = [0u8; 64];
        while matches!(stream.read(&mut buf), Ok(n) if n > 0) {}
    });
    let lb = Ringlb::start(&config(&[mute.addr], "idle_timeout = \"300ms\"", "", ""));
    let mut stream = connect(lb.addr());
    let local = stream.local_addr().unwrap();
    stream.write_all(b"anyone there?").unwrap();
    let _ = read_until_end(&mut stream);
    assert_eq!(field(&line_of(&lb, local), "termination"), "sD");
}

#[test]
fn a_cut_for_a_backend_marked_down_and_a_refusal_by_the_rules() {
    let backend = Backend::echo();
    let health = "on_down = \"close\"\n[pools.p.health]\ninterval = \"100ms\"\ntimeout = \"300ms\"\nrise = 1\nfall = 1";
    let lb = Ringlb::start(&config(&[backend.addr], "", "", health));
    let mut stream = connect(lb.addr());
    let local = stream.local_addr().unwrap();
    round_trip(&mut stream, b"before the backend goes down").unwrap();
    backend.stop_listening();
    let _ = read_until_end(&mut stream);
    assert_eq!(field(&line_of(&lb, local), "termination"), "DD");

    let other = Backend::echo();
    let lb = Ringlb::start(&config(&[other.addr], "", "deny = [\"127.0.0.0/8\"]", ""));
    let (local, stream) = connect_bound(lb.addr());
    if let Ok(mut stream) = stream {
        let _ = read_until_end(&mut stream);
    }
    let line = line_of(&lb, local);
    assert_eq!(field(&line, "termination"), "PR", "{line}");
    assert_eq!(field(&line, "pool"), "-", "never routed: {line}");
}

#[test]
fn a_client_that_leaves_or_stalls_before_its_proxy_header() {
    let backend = Backend::echo();
    let listener = "accept_proxy = true\nhandshake_timeout = \"300ms\"";
    let lb = Ringlb::start(&config(&[backend.addr], "", listener, ""));
    let stream = connect(lb.addr());
    let local = stream.local_addr().unwrap();
    stream.shutdown(Shutdown::Both).unwrap();
    assert_eq!(field(&line_of(&lb, local), "termination"), "CR");
    let mut stream = connect(lb.addr());
    let local = stream.local_addr().unwrap();
    let _ = read_until_end(&mut stream);
    assert_eq!(field(&line_of(&lb, local), "termination"), "cR");
    // The PROXY header's source is logged beside the peer.
    let mut stream = connect(lb.addr());
    let local = stream.local_addr().unwrap();
    stream.write_all(b"PROXY TCP4 203.0.113.9 10.0.0.1 4000 5432\r\nhi").unwrap();
    let mut back = [0u8; 2];
    stream.read_exact(&mut back).unwrap();
    drop(stream);
    let line = line_of(&lb, local);
    assert_eq!(field(&line, "proxied"), "203.0.113.9:4000", "{line}");
}

#[test]
fn json_lines_and_no_lines() {
    let backend = Backend::echo();
    let lb = Ringlb::start(&config(&[backend.addr], "log_format = \"json\"", "", ""));
    let mut stream = connect(lb.addr());
    let local = stream.local_addr().unwrap();
    round_trip(&mut stream, b"json please").unwrap();
    drop(stream);
    let needle = format!("\"client\":\"{local}\"");
    assert!(lb.logged(&needle), "{}", lb.log());
    let log = lb.log();
    let line = log.lines().find(|l| l.contains(&needle)).unwrap();
    let value: serde_json::Value = serde_json::from_str(line).unwrap();
    assert_eq!(value["target"], "ringlb::connection");
    assert_eq!(value["level"], "INFO");
    assert_eq!(value["termination"], "--");
    assert_eq!(value["bytes_up"], 11);
    // Every other line is JSON too.
    for line in log.lines().filter(|l| !l.is_empty()) {
        let value: serde_json::Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
        assert!(value["time"].is_string(), "{line}");
    }

    let lb = Ringlb::start(&config(&[backend.addr], "connection_log = false", "", ""));
    let mut stream = connect(lb.addr());
    round_trip(&mut stream, b"quietly").unwrap();
    drop(stream);
    let mut lb = lb;
    let counters = lb.stop();
    assert_eq!(counters["connections_finished_total"], 1);
    assert!(!lb.log().contains("ringlb::connection"), "{}", lb.log());
}

/// 8,000 connections (lines of about 200 bytes: more than the pipe, 64 KiB, and the log
/// thread's queue, 64 batches of at most 16 KiB, hold), each of which must be served: a worker
/// that waited for a stuck stderr would stop and a connection would time out.
fn eight_thousand_connections(addr: SocketAddr) {
    let clients: Vec<_> = (0..4)
        .map(|_| {
            thread::spawn(move || {
                for _ in 0..2_000 {
                    let mut stream = connect(addr);
                    round_trip(&mut stream, b"ping").expect("a connection while stderr is stuck");
                }
            })
        })
        .collect();
    for client in clients {
        client.join().unwrap();
    }
}

#[test]
fn a_stderr_that_does_not_keep_up_loses_lines_not_connections() {
    let backend = Backend::echo();
    // Every second connection first tries a backend that refuses, and each worker warns about
    // it (once a second): a warning, too, must not wait for stderr.
    let (_refusing, refused) = refusing_addr();
    let lb = Ringlb::start(&config(&[refused, backend.addr], "metrics_bind = \"127.0.0.1:0\"", "", ""));
    lb.pause_log();
    eight_thousand_connections(lb.addr());
    lb.resume_log();
    assert!(lb.logged("log lines dropped: standard error did not keep up"), "{}", lb.log());
    let dropped = lb.metrics()["ringlb_connection_log_dropped_total"];
    assert!(dropped > 0.0, "no line dropped");
    let logged = lb.log().matches("INFO  ringlb::connection] client=").count();
    assert!(logged < 8_000, "every line was logged ({logged}), though {dropped} were dropped");
    assert!(lb.logged("failed: Connection refused"), "{}", lb.log());
}

#[test]
fn a_stop_drains_and_exits_while_stderr_stays_stuck() {
    let backend = Backend::echo();
    let mut lb = Ringlb::start(&config(&[backend.addr], "", "", ""));
    lb.pause_log();
    eight_thousand_connections(lb.addr());
    // stderr takes nothing, and the log thread's queue is full: the main thread's lines about
    // the drain wait a while, then are dropped, and the drain goes on.
    lb.signal(libc::SIGTERM);
    let status = lb.wait_exit(Duration::from_secs(60));
    lb.resume_log();
    assert!(status.is_some_and(|s| s.success()), "ringlb did not exit while stderr was stuck: {status:?}");
}
