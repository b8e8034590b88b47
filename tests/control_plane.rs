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
