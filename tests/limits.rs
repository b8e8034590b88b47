//! Limits and the waits they cause: backend `max_conns` queues, `max_connections`, and what
//! a client that leaves while it waits costs.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use common::*;

/// Sends `message` and expects it echoed within `within`.
fn echoed(stream: &mut TcpStream, message: &[u8], within: Duration) -> std::io::Result<()> {
    stream.write_all(message)?;
    stream.set_read_timeout(Some(within))?;
    let mut back = vec![0u8; message.len()];
    stream.read_exact(&mut back)?;
    assert_eq!(back, message);
    Ok(())
}

/// Whether `stream` has been answered: reads what is there without waiting long. A `false`
/// only says nothing came yet.
fn answered(stream: &mut TcpStream) -> bool {
    stream.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
    let mut byte = [0u8; 1];
    matches!(stream.peek(&mut byte), Ok(n) if n > 0)
}

#[test]
fn waiters_behind_a_full_backend_are_served_in_order_and_the_worker_stays_responsive() {
    // One worker, one backend with max_conns = 1: c1 is served, c2 and c3 wait. When c1
    // closes, c2 must be served (this once sent the worker into an endless loop), then c3.
    let limited = Backend::echo();
    let other = Backend::echo();
    let config = format!(
        "workers = 1\nmetrics_bind = \"127.0.0.1:0\"\n\
         [listeners.limited]\nbind = \"127.0.0.1:0\"\npool = \"limited\"\n\
         [listeners.other]\nbind = \"127.0.0.1:0\"\npool = \"other\"\n\
         [pools.limited]\nqueue_timeout = \"20s\"\nbackends = [{{ address = \"{}\", max_conns = 1 }}]\n\
         [pools.limited.health]\nenabled = false\n\
         [pools.other]\nbackends = [{{ address = \"{}\" }}]\n[pools.other.health]\nenabled = false\n",
        limited.addr, other.addr
    );
    let mut lb = Ringlb::start(&config);
    let addr = lb.addrs["limited"];
    let mut c1 = connect(addr);
    echoed(&mut c1, b"c1", Duration::from_secs(10)).unwrap();
    let mut c2 = connect(addr);
    c2.write_all(b"c2").unwrap();
    let mut c3 = connect(addr);
    c3.write_all(b"c3").unwrap();
    assert!(Ringlb::eventually(Duration::from_secs(10), || lb.metrics()["ringlb_connections_queued_total"] == 2.0));
    assert!(!answered(&mut c2) && !answered(&mut c3), "served past max_conns");

    drop(c1);
    let mut back = [0u8; 2];
    c2.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    c2.read_exact(&mut back).expect("c2 is served once c1's slot frees");
    assert_eq!(&back, b"c2");
    // The worker is not stuck: another pool's connection is served at once.
    echoed(&mut connect(lb.addrs["other"]), b"other pool", Duration::from_secs(10)).unwrap();
    assert!(!answered(&mut c3), "c3 served while c2 holds the only slot");

    drop(c2);
    c3.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    c3.read_exact(&mut back).expect("c3 is served once c2's slot frees");
    assert_eq!(&back, b"c3");
    drop(c3);
    let counters = lb.stop();
    assert_eq!(counters["connections_queued_total"], 2, "{counters:?}");
    assert_eq!(counters["connections_queue_timeout_total"], 0, "{counters:?}");
}

#[test]
fn a_refusing_backend_sends_the_client_to_the_queue_of_the_full_one() {
    // Pool [A (max_conns = 1), B (refuses)], no health checks: a second client tries B, is
    // refused, and waits for A instead of being closed.
    let a = Backend::echo();
    let (_hold, b) = refusing_addr();
    let config = format!(
        "workers = 1\nmetrics_bind = \"127.0.0.1:0\"\n[listeners.test]\nbind = \"127.0.0.1:0\"\npool = \"p\"\n\
         [pools.p]\nqueue_timeout = \"20s\"\nbackends = [{{ address = \"{}\", max_conns = 1 }}, {{ address = \"{b}\" }}]\n\
         [pools.p.health]\nenabled = false\n",
        a.addr
    );
    let mut lb = Ringlb::start(&config);
    let mut first = connect(lb.addr());
    echoed(&mut first, b"first", Duration::from_secs(10)).unwrap();
    let mut second = connect(lb.addr());
    second.write_all(b"second").unwrap();
    assert!(Ringlb::eventually(Duration::from_secs(10), || lb.metrics()["ringlb_connections_queued_total"] == 1.0));
    assert!(!answered(&mut second), "served past max_conns");
    drop(first);
    let mut back = [0u8; 6];
    second.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    second.read_exact(&mut back).expect("the second client waits for A, then is served");
    assert_eq!(&back, b"second");
    drop(second);
    let counters = lb.stop();
    assert_eq!(counters["connections_no_backend_total"], 0, "{counters:?}");
    assert!(counters["backend_connect_failures_total"] >= 1, "{counters:?}");
}

/// Opens `n` connections to `addr` that each send `tag` and the index; returns them in order.
fn open_sending(addr: std::net::SocketAddr, n: usize, tag: &str) -> Vec<(TcpStream, Vec<u8>)> {
    (0..n)
        .map(|i| {
            let mut stream = connect(addr);
            let message = format!("{tag}{i:04}").into_bytes();
            stream.write_all(&message).unwrap();
            (stream, message)
        })
        .collect()
}

/// Reads each stream's echo; panics with the index of the first that is reset or closed.
fn expect_echoes(streams: &mut [(TcpStream, Vec<u8>)]) {
    for (i, (stream, message)) in streams.iter_mut().enumerate() {
        stream.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let mut back = vec![0u8; message.len()];
        stream.read_exact(&mut back).unwrap_or_else(|e| panic!("connection {i}: {e}"));
        assert_eq!(&back, message);
    }
}

#[test]
fn connections_beyond_max_connections_wait_in_the_backlog_and_none_is_reset() {
    let backend = Backend::echo();
    let config = config_for(&[backend.addr], "workers = 1\nmax_connections = 100\nmetrics_bind = \"127.0.0.1:0\"", "");
    let mut lb = Ringlb::start(&config);
    let addr = lb.addr();
    let mut held = open_sending(addr, 100, "held");
    expect_echoes(&mut held);
    let mut waiting = open_sending(addr, 50, "wait");
    assert!(
        Ringlb::eventually(Duration::from_secs(10), || Ringlb::accept_queue(addr.port()) == 50),
        "the 50 beyond max_connections wait in the accept queue ({} there)",
        Ringlb::accept_queue(addr.port())
    );
    // Free a few slots at a time: each must take exactly that many from the queue.
    for round in 0..10 {
        held.drain(..5);
        assert!(
            Ringlb::eventually(Duration::from_secs(10), || Ringlb::accept_queue(addr.port()) == 45 - 5 * round),
            "round {round}: {} still queued",
            Ringlb::accept_queue(addr.port())
        );
    }
    expect_echoes(&mut waiting);
    drop((held, waiting));
    let counters = lb.stop();
    assert_eq!(counters["connections_over_limit_total"], 0, "{counters:?}");
    assert_eq!(counters["connections_accepted_total"], 150, "{counters:?}");
    assert_eq!(counters["connections_finished_total"], 150, "{counters:?}");
}

#[test]
fn a_listener_at_its_own_max_connections_leaves_the_others_room() {
    let small = Backend::echo();
    let big = Backend::echo();
    let config = format!(
        "workers = 1\nmax_connections = 20\n\
         [listeners.small]\nbind = \"127.0.0.1:0\"\npool = \"small\"\nmax_connections = 2\n\
         [listeners.big]\nbind = \"127.0.0.1:0\"\npool = \"big\"\n\
         [pools.small]\nbackends = [{{ address = \"{}\" }}]\n[pools.small.health]\nenabled = false\n\
         [pools.big]\nbackends = [{{ address = \"{}\" }}]\n[pools.big.health]\nenabled = false\n",
        small.addr, big.addr
    );
    let mut lb = Ringlb::start(&config);
    let (small_addr, big_addr) = (lb.addrs["small"], lb.addrs["big"]);
    let mut held = open_sending(small_addr, 2, "small");
    expect_echoes(&mut held);
    let mut third = open_sending(small_addr, 1, "third");
    assert!(Ringlb::eventually(Duration::from_secs(10), || Ringlb::accept_queue(small_addr.port()) == 1));
    // A flood on the small listener takes none of the big one's room.
    let mut others = open_sending(big_addr, 15, "big");
    expect_echoes(&mut others);
    assert!(!answered(&mut third[0].0));
    held.pop();
    expect_echoes(&mut third);
    drop((held, third, others));
    let counters = lb.stop();
    assert_eq!(counters["connections_over_limit_total"], 0, "{counters:?}");
}

#[test]
fn a_burst_under_spread_pack_waits_instead_of_being_reset() {
    // Packed, the first worker takes every new connection until the control thread brings
    // the second into use; past its share of max_connections the rest must wait, not be reset.
    let backend = Backend::echo();
    let config = config_for(&[backend.addr], "workers = 2\nspread = \"pack\"\nmax_connections = 200", "")
        .replace("workers = 2\n\n", "");
    let mut lb = Ringlb::start(&config);
    let mut burst = open_sending(lb.addr(), 150, "burst");
    // The first hundred are served whichever worker took them; the rest as slots free.
    let rest = burst.split_off(100);
    let mut first = burst;
    expect_echoes(&mut first);
    drop(first);
    let mut rest = rest;
    expect_echoes(&mut rest);
    drop(rest);
    let counters = lb.stop();
    assert_eq!(counters["connections_over_limit_total"], 0, "{counters:?}");
    assert_eq!(counters["connections_accepted_total"], 150, "{counters:?}");
}

/// Connects to `addr` and resets the connection at once (SO_LINGER 0, then close).
fn connect_and_reset(addr: std::net::SocketAddr) {
    let stream = connect(addr);
    socket2::SockRef::from(&stream).set_linger(Some(Duration::ZERO)).unwrap();
    drop(stream);
}

/// A backend that never answers a SYN: a listener with a full accept queue (backlog 0, one
/// connection in it) drops further SYNs, so connects to it hang until their timeout.
fn syn_dropping_backend() -> (socket2::Socket, Vec<TcpStream>, std::net::SocketAddr) {
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    socket.bind(&"127.0.0.1:0".parse::<std::net::SocketAddr>().unwrap().into()).unwrap();
    socket.listen(0).unwrap();
    let addr = socket.local_addr().unwrap().as_socket().unwrap();
    // Fill the queue; a further connect would hang, so stop once one does not complete at once.
    let mut fillers = Vec::new();
    while let Ok(stream) = TcpStream::connect_timeout(&addr, Duration::from_millis(300)) {
        fillers.push(stream);
        assert!(fillers.len() < 8, "the accept queue does not fill");
    }
    (socket, fillers, addr)
}

#[test]
fn clients_that_reset_while_queued_or_connecting_free_their_slots_at_once() {
    // Against a full pool (max_conns = 1, held) and against a backend that drops SYNs, with
    // timeouts far away: 50 clients that connect and reset must not stay counted open.
    let full = Backend::echo();
    let (_listener, _fillers, silent) = syn_dropping_backend();
    let config = format!(
        "workers = 2\nmetrics_bind = \"127.0.0.1:0\"\n\
         [listeners.full]\nbind = \"127.0.0.1:0\"\npool = \"full\"\n\
         [listeners.silent]\nbind = \"127.0.0.1:0\"\npool = \"silent\"\n\
         [pools.full]\nqueue_timeout = \"10m\"\nbackends = [{{ address = \"{}\", max_conns = 1 }}]\n\
         [pools.full.health]\nenabled = false\n\
         [pools.silent]\nconnect_timeout = \"10m\"\nbackends = [{{ address = \"{silent}\" }}]\n\
         [pools.silent.health]\nenabled = false\n",
        full.addr
    );
    let mut lb = Ringlb::start(&config);
    let mut holder = connect(lb.addrs["full"]);
    echoed(&mut holder, b"hold", Duration::from_secs(10)).unwrap();
    let metric = |name: &str| lb.metrics()[name];
    for _ in 0..50 {
        connect_and_reset(lb.addrs["full"]);
        connect_and_reset(lb.addrs["silent"]);
    }
    assert!(
        Ringlb::eventually(Duration::from_secs(20), || metric("ringlb_connections_client_gone_total") == 100.0),
        "client_gone {}",
        metric("ringlb_connections_client_gone_total")
    );
    assert!(
        Ringlb::eventually(Duration::from_secs(10), || metric("ringlb_connections_active") == 1.0),
        "{} still counted open",
        metric("ringlb_connections_active")
    );
    // The held connection is untouched, and the queue serves the next client.
    echoed(&mut holder, b"still here", Duration::from_secs(10)).unwrap();
    drop(holder);
    echoed(&mut connect(lb.addrs["full"]), b"next", Duration::from_secs(10)).unwrap();
    lb.stop();
}

#[test]
fn a_client_that_half_closes_while_queued_is_still_served() {
    // `printf 'request' | nc` style: the request and FIN arrive while the pool is full. The
    // FIN is not a client leaving (HAProxy without abortonclose agrees): it gets its answer.
    let backend = Backend::echo();
    let config = config_for(&[backend.addr], "workers = 1\nmetrics_bind = \"127.0.0.1:0\"", "queue_timeout = \"20s\"")
        .replace(
            &format!("{{ address = \"{}\" }}", backend.addr),
            &format!("{{ address = \"{}\", max_conns = 1 }}", backend.addr),
        );
    let mut lb = Ringlb::start(&config);
    let mut holder = connect(lb.addr());
    echoed(&mut holder, b"hold", Duration::from_secs(10)).unwrap();
    let mut client = connect(lb.addr());
    client.write_all(b"request").unwrap();
    client.shutdown(std::net::Shutdown::Write).unwrap();
    assert!(Ringlb::eventually(Duration::from_secs(10), || lb.metrics()["ringlb_connections_queued_total"] == 1.0));
    drop(holder);
    let (answer, end) = read_until_end(&mut client);
    end.expect("a clean end");
    assert_eq!(answer, b"request");
    let counters = lb.stop();
    assert_eq!(counters["connections_client_gone_total"], 0, "{counters:?}");
}
