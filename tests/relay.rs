//! The relay end to end: the real binary between real client and backend sockets.

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use common::*;

/// The top of the config for `relay` ("copy", "splice" or "auto") plus `extra`.
fn top(relay: &str, extra: &str) -> String {
    format!("relay = \"{relay}\"\n{extra}")
}

/// Every relay test runs once per relay mode: both must pass the same tests.
macro_rules! in_both_relay_modes {
    ($($name:ident),* $(,)?) => {
        mod copy {
            $(#[test] fn $name() { super::$name("copy") })*
        }
        mod splice {
            $(#[test] fn $name() { super::$name("splice") })*
        }
        mod auto {
            $(#[test] fn $name() { super::$name("auto") })*
        }
    };
}

in_both_relay_modes!(
    sixteen_connections_of_8_mib_echo_intact,
    no_io_wq_thread_during_bulk_transfer,
    half_close_delivers_the_whole_echo_then_eof,
    backend_reset_reaches_client,
    client_reset_reaches_backend,
    refused_backend_is_retried_on_another_without_client_error,
    timed_out_connect_is_retried_on_another_backend,
    all_backends_down_closes_client_promptly,
    idle_connection_is_closed_but_busy_one_is_not,
    thousand_concurrent_connections,
    fd_count_returns_to_baseline,
);

fn sixteen_connections_of_8_mib_echo_intact(relay: &str) {
    let backend = Backend::echo();
    let lb = Ringlb::start(&config_for(&[backend.addr], &top(relay, ""), ""));
    let addr = lb.addr();
    let clients: Vec<_> = (0..16u64)
        .map(|i| {
            thread::spawn(move || {
                let data = Arc::new(random_bytes(8 << 20, i + 1));
                let received = send_and_read_all(connect(addr), Arc::clone(&data)).expect("relay");
                assert_eq!(received.len(), data.len(), "connection {i}: length");
                assert!(received == *data, "connection {i}: bytes differ");
            })
        })
        .collect();
    for client in clients {
        client.join().unwrap();
    }
    assert_eq!(backend.accepted(), 16);
}

fn no_io_wq_thread_during_bulk_transfer(relay: &str) {
    let backend = Backend::echo();
    let lb = Ringlb::start(&config_for(&[backend.addr], &top(relay, ""), ""));
    let addr = lb.addr();
    let transfers: Vec<_> = (0..4u64)
        .map(|i| {
            thread::spawn(move || send_and_read_all(connect(addr), Arc::new(random_bytes(32 << 20, i))).unwrap().len())
        })
        .collect();
    let mut samples = 0;
    while !transfers.iter().all(|t| t.is_finished()) {
        let names = lb.thread_names();
        assert!(!names.iter().any(|n| n.starts_with("iou-wrk")), "io-wq worker threads: {names:?}");
        samples += 1;
        thread::sleep(Duration::from_millis(5));
    }
    for t in transfers {
        assert_eq!(t.join().unwrap(), 32 << 20);
    }
    assert!(samples > 0);
    let names = lb.thread_names();
    assert!(!names.iter().any(|n| n.starts_with("iou-wrk")), "io-wq worker threads after transfer: {names:?}");
}

fn half_close_delivers_the_whole_echo_then_eof(relay: &str) {
    // The backend reads everything until the client's FIN, and only then echoes it back.
    let backend = Backend::start(|mut stream| {
        let mut all = Vec::new();
        stream.read_to_end(&mut all).unwrap();
        stream.write_all(&all).unwrap();
        stream.shutdown(Shutdown::Write).unwrap();
    });
    let lb = Ringlb::start(&config_for(&[backend.addr], &top(relay, ""), ""));
    let mut stream = connect(lb.addr());
    let data = random_bytes(3 << 20, 7);
    stream.write_all(&data).unwrap();
    stream.shutdown(Shutdown::Write).unwrap();
    let (received, end) = read_until_end(&mut stream);
    end.expect("clean EOF after the echo");
    assert!(received == data, "got {} of {} bytes", received.len(), data.len());
}

fn backend_reset_reaches_client(relay: &str) {
    let backend = Backend::start(|mut stream| {
        let mut buf = [0u8; 5];
        stream.read_exact(&mut buf).unwrap();
        stream.write_all(b"bye").unwrap();
        socket2::SockRef::from(&stream).set_linger(Some(Duration::ZERO)).unwrap();
        drop(stream);
    });
    let lb = Ringlb::start(&config_for(&[backend.addr], &top(relay, ""), ""));
    let mut stream = connect(lb.addr());
    stream.write_all(b"hello").unwrap();
    let (_, end) = read_until_end(&mut stream);
    let err = end.expect_err("the client should see the backend's reset, not EOF");
    assert_eq!(err.kind(), ErrorKind::ConnectionReset, "{err}");
}

fn client_reset_reaches_backend(relay: &str) {
    let (tx, rx) = std::sync::mpsc::channel();
    let (got_tx, got_rx) = std::sync::mpsc::channel();
    let backend = Backend::start(move |mut stream| {
        let mut buf = [0u8; 5];
        stream.read_exact(&mut buf).unwrap();
        let _ = got_tx.send(());
        stream.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let (_, end) = read_until_end(&mut stream);
        let _ = tx.send(end.map_err(|e| e.kind()));
    });
    let lb = Ringlb::start(&config_for(&[backend.addr], &top(relay, ""), ""));
    let stream = connect(lb.addr());
    (&stream).write_all(b"hello").unwrap();
    // Reset only once the backend has the bytes: the connection is relaying.
    got_rx.recv_timeout(Duration::from_secs(20)).expect("the backend got the bytes");
    socket2::SockRef::from(&stream).set_linger(Some(Duration::ZERO)).unwrap();
    drop(stream);
    let end = rx.recv_timeout(Duration::from_secs(20)).expect("backend saw nothing");
    assert_eq!(end, Err(ErrorKind::ConnectionReset));
}

fn refused_backend_is_retried_on_another_without_client_error(relay: &str) {
    let (_held, refusing) = refusing_addr();
    let backend = Backend::echo();
    let lb = Ringlb::start(&config_for(&[refusing, backend.addr], &top(relay, ""), ""));
    for i in 0..20 {
        let mut stream = connect(lb.addr());
        round_trip(&mut stream, format!("request {i}").as_bytes()).expect("no client error");
    }
    assert_eq!(backend.accepted(), 20);
    assert!(lb.logged("connect to backend"), "the refusal should be logged:\n{}", lb.log());
}

fn timed_out_connect_is_retried_on_another_backend(relay: &str) {
    // A listener with a full accept queue drops SYNs, so connecting to it times out.
    let full = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    full.bind(&"127.0.0.1:0".parse::<std::net::SocketAddr>().unwrap().into()).unwrap();
    full.listen(0).unwrap();
    let silent = full.local_addr().unwrap().as_socket().unwrap();
    let _fillers: Vec<_> =
        (0..4).filter_map(|_| TcpStream::connect_timeout(&silent, Duration::from_millis(200)).ok()).collect();
    let backend = Backend::echo();
    let lb = Ringlb::start(&config_for(&[silent, backend.addr], &top(relay, "connect_timeout = \"300ms\""), ""));
    for i in 0..4 {
        let mut stream = connect(lb.addr());
        round_trip(&mut stream, format!("request {i}").as_bytes()).expect("no client error");
    }
    assert!(lb.logged("timed out"), "the timeout should be logged:\n{}", lb.log());
}

fn all_backends_down_closes_client_promptly(relay: &str) {
    let (_a, down1) = refusing_addr();
    let (_b, down2) = refusing_addr();
    let lb = Ringlb::start(&config_for(&[down1, down2], &top(relay, ""), ""));
    let mut stream = connect(lb.addr());
    stream.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let (data, end) = read_until_end(&mut stream);
    assert!(data.is_empty());
    if let Err(e) = end {
        assert!(e.kind() != ErrorKind::WouldBlock && e.kind() != ErrorKind::TimedOut, "client was not closed: {e}");
    }
    let mut lb = lb;
    let counters = lb.stop();
    assert_eq!(counters["connections_no_backend_total"], 1, "{counters:?}");
    assert_eq!(counters["backend_connect_failures_total"], 2, "each backend tried once: {counters:?}");
}

fn idle_connection_is_closed_but_busy_one_is_not(relay: &str) {
    let backend = Backend::echo();
    let lb = Ringlb::start(&config_for(&[backend.addr], &top(relay, "idle_timeout = \"2s\""), ""));
    // Busy: a round trip every 100 ms for twice the idle timeout; a pause of the test thread
    // would have to last 1.9 s to look idle.
    let mut busy = connect(lb.addr());
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(4) {
        round_trip(&mut busy, b"still here").expect("a busy connection must stay open");
        thread::sleep(Duration::from_millis(100));
    }
    // Idle: after one round trip, nothing; ringlb must close it.
    let mut idle = busy;
    idle.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let (data, end) = read_until_end(&mut idle);
    assert!(data.is_empty());
    end.expect("idle close is a FIN, not a reset or a read timeout");
    let mut lb = lb;
    let counters = lb.stop();
    assert_eq!(counters["connections_idle_closed_total"], 1, "{counters:?}");
}

fn thousand_concurrent_connections(relay: &str) {
    raise_fd_limit();
    let backend = Backend::echo();
    let lb = Ringlb::start(&config_for(&[backend.addr], &top(relay, ""), ""));
    let mut streams: Vec<TcpStream> = (0..1000).map(|_| connect(lb.addr())).collect();
    for (i, stream) in streams.iter_mut().enumerate() {
        stream.write_all(format!("{i:>8}").as_bytes()).unwrap();
    }
    for (i, stream) in streams.iter_mut().enumerate() {
        let mut back = [0u8; 8];
        stream.read_exact(&mut back).unwrap();
        assert_eq!(&back, format!("{i:>8}").as_bytes());
    }
    assert_eq!(backend.accepted(), 1000, "all 1000 held open at once");
    // A second round trip on every connection, all still open.
    for stream in streams.iter_mut() {
        round_trip(stream, b"again").unwrap();
    }
}

fn fd_count_returns_to_baseline(relay: &str) {
    let backend = Backend::echo();
    let lb = Ringlb::start(&config_for(&[backend.addr], &top(relay, ""), ""));
    let baseline = lb.fd_count_without_pipes();
    let mut streams: Vec<TcpStream> = (0..50).map(|_| connect(lb.addr())).collect();
    for stream in streams.iter_mut() {
        round_trip(stream, b"x").unwrap();
    }
    assert!(lb.fd_count_without_pipes() >= baseline + 100, "two fds per connection while open");
    // Close half with FIN and half with RST.
    for (i, stream) in streams.into_iter().enumerate() {
        if i % 2 == 0 {
            socket2::SockRef::from(&stream).set_linger(Some(Duration::ZERO)).unwrap();
        }
        drop(stream);
    }
    assert!(
        Ringlb::eventually(Duration::from_secs(10), || lb.fd_count_without_pipes() == baseline),
        "fd count {} did not return to baseline {baseline}",
        lb.fd_count_without_pipes()
    );
    // Splice mode keeps some empty pipes for the next transfers: at most 64 per worker.
    assert!(lb.fd_count() - baseline <= 2 * 64 * 2, "{} pipe fds kept", lb.fd_count() - baseline);
}
