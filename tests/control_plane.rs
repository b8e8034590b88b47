//! The control plane as clients and operators meet it: the metrics port under abuse.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use common::*;

fn metrics_config(backend: std::net::SocketAddr) -> String {
    config_for(&[backend], "metrics_bind = \"127.0.0.1:0\"", "")
}

#[test]
fn silent_clients_of_the_metrics_port_are_closed_and_take_no_more_than_their_share() {
    let backend = Backend::echo();
    let lb = Ringlb::start(&metrics_config(backend.addr));
    let metrics = lb.metrics_addr.unwrap();
    let baseline = lb.fd_count();
    // More silent clients than the metrics port serves at once: the rest wait in its backlog.
    let mut silent: Vec<TcpStream> = (0..40).map(|_| connect(metrics)).collect();
    assert!(
        Ringlb::eventually(Duration::from_secs(10), || lb.fd_count() >= baseline + 32),
        "the first 32 are accepted"
    );
    assert!(lb.fd_count() <= baseline + 32, "{} descriptors over the baseline", lb.fd_count() - baseline);
    // The data path is untouched meanwhile.
    round_trip(&mut connect(lb.addr()), b"still serving").unwrap();
    // A scrape waits behind them and is answered once their request timeout closed them.
    assert!(lb.metrics()["ringlb_connections_accepted_total"] >= 1.0);
    for (i, stream) in silent.iter_mut().enumerate() {
        stream.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let mut buf = [0u8; 256];
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => {}
            Ok(n) => panic!("silent client {i} got {n} bytes"),
        }
    }
    drop(silent);
    assert!(
        Ringlb::eventually(Duration::from_secs(10), || lb.fd_count() == baseline),
        "{} descriptors left over the baseline",
        lb.fd_count() as i64 - baseline as i64
    );
}

#[test]
fn a_request_ending_in_bare_line_feeds_is_answered() {
    let backend = Backend::echo();
    let lb = Ringlb::start(&metrics_config(backend.addr));
    let mut stream = connect(lb.metrics_addr.unwrap());
    stream.write_all(b"GET /metrics HTTP/1.1\nHost: x\nConnection: close\n\n").unwrap();
    let (response, end) = read_until_end(&mut stream);
    end.unwrap();
    let response = String::from_utf8_lossy(&response);
    assert!(response.starts_with("HTTP/1.1 200 OK"), "{response}");
    assert!(response.contains("ringlb_connections_accepted_total"), "{response}");
}

/// Reads one response of a kept-alive connection: its head (lower-cased) and body.
fn read_response(stream: &mut TcpStream) -> (String, Vec<u8>) {
    let mut data = Vec::new();
    let mut buf = [0u8; 16 * 1024];
    let head_end = loop {
        if let Some(i) = data.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let n = stream.read(&mut buf).expect("read a response");
        assert!(n > 0, "the connection closed before a response: {}", String::from_utf8_lossy(&data));
        data.extend_from_slice(&buf[..n]);
    };
    let head = String::from_utf8_lossy(&data[..head_end]).to_lowercase();
    let length: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .map(|v| v.trim().parse().unwrap())
        .expect("a content-length");
    while data.len() < head_end + length {
        let n = stream.read(&mut buf).expect("read a body");
        assert!(n > 0, "the connection closed in a body");
        data.extend_from_slice(&buf[..n]);
    }
    (head, data[head_end..].to_vec())
}

#[test]
fn a_full_metrics_port_closes_connections_after_their_response_so_clients_take_turns() {
    let backend = Backend::echo();
    let lb = Ringlb::start(&metrics_config(backend.addr));
    let metrics = lb.metrics_addr.unwrap();
    let baseline = lb.fd_count();
    // Kept-alive connections close themselves after HEADER_TIMEOUT (5 s) idle, which frees
    // slots: a run that took that long proves nothing about fullness and is made again, once
    // ringlb has closed the connections of the last.
    for _attempt in 0..5 {
        assert!(Ringlb::eventually(Duration::from_secs(20), || lb.fd_count() == baseline));
        let started = std::time::Instant::now();
        let mut kept = Vec::new();
        let closing = loop {
            let mut stream = connect(metrics);
            stream.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
            let (head, body) = read_response(&mut stream);
            assert!(head.starts_with("http/1.1 200"), "{head}");
            assert!(String::from_utf8_lossy(&body).contains("ringlb_connections_accepted_total"));
            if head.contains("connection: close") {
                break stream;
            }
            kept.push(stream);
            assert!(kept.len() <= 32, "33 connections kept alive on a port that holds 32");
        };
        if started.elapsed() >= Duration::from_secs(4) {
            continue;
        }
        // The 32nd connection fills the port.
        assert_eq!(kept.len(), 31, "a response closed its connection with {} others open", kept.len());
        let mut closing = closing;
        let (rest, end) = read_until_end(&mut closing);
        assert!(rest.is_empty() && end.is_ok(), "the closing connection ended cleanly: {rest:?} {end:?}");
        return;
    }
    panic!("five runs each took over 4 s");
}
