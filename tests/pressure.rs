//! The relay in-process with deliberately small resources, so that the paths normal sizes
//! rarely reach run all the time: the submission queue full, completions held back by a full
//! completion queue, receives finding no buffer, and splicing with no pipe to spare. No byte
//! may be lost on any of them.

mod common;

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::Shutdown;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use common::*;
use ringlb::config::Config;
use ringlb::server::Server;
use ringlb::stats;
use ringlb::worker::RingSizes;

/// Starts ringlb in-process with `config` and `sizes`, echoes `clients` x `bytes` through it
/// (checking every byte), stops it and returns its counters.
fn relay_in_process(config: &str, sizes: RingSizes, clients: u64, bytes: usize) -> HashMap<&'static str, u64> {
    raise_fd_limit();
    let config = Config::parse(config, "test").unwrap();
    let server = Server::start_with(&config, sizes).expect("start");
    let addr = server.listen_addrs[0].1;
    let threads: Vec<_> = (0..clients)
        .map(|i| {
            thread::spawn(move || {
                let data = Arc::new(random_bytes(bytes + i as usize, i));
                let received = send_and_read_all(connect(addr), Arc::clone(&data)).expect("relay");
                assert!(received == *data, "connection {i}: {} of {} bytes, or corrupted", received.len(), data.len());
            })
        })
        .collect();
    for thread in threads {
        thread.join().unwrap();
    }
    stop_and_count(server)
}

#[test]
fn tiny_ring_and_buffer_pool_lose_nothing() {
    let backend = Backend::echo();
    // The copy relay: this test is about ring buffers.
    let config = config_for(&[backend.addr], "relay = \"copy\"", "");
    let sizes = RingSizes { entries: 4, cq_entries: 4, buffers: 2, buffer_size: 1024, ..RingSizes::default() };
    let totals = relay_in_process(&config, sizes, 128, 256 * 1024);
    assert_eq!(totals["ringlb_connections_finished_total"], 128, "{totals:?}");
    assert!(totals["ringlb_ring_sq_full_total"] > 0, "the SQ never filled: {totals:?}");
    assert!(totals["ringlb_ring_cq_overflow_total"] > 0, "the CQ never overflowed: {totals:?}");
    assert!(totals["ringlb_buffer_waits_total"] > 0, "buffers never ran out: {totals:?}");
}

#[test]
fn splice_with_no_pipe_to_spare_relays_every_round_by_copy() {
    let backend = Backend::echo();
    let config = config_for(&[backend.addr], "relay = \"splice\"", "");
    let totals = relay_in_process(&config, RingSizes { pipes: Some(0), ..RingSizes::default() }, 16, 1 << 20);
    assert_eq!(totals["ringlb_connections_finished_total"], 16, "{totals:?}");
    assert!(totals["ringlb_splice_pipe_shortages_total"] > 0, "{totals:?}");
}

/// A backend that sends `data` (all at once, or `paced`: 16 KiB a millisecond) and closes, and
/// a client with a small receive buffer that starts reading only once the backend wrote 6 MiB
/// (more than ringlb's socket toward the client can hold: net.ipv4.tcp_wmem allows 4 MiB), or a
/// receive was stopped, or (unpaced, where the byte limit ends receives) the backend's writes
/// stalled: its bytes pile up behind ringlb's sends to the client. Returns ringlb's counters.
fn slow_reader(data: &Arc<Vec<u8>>, sizes: RingSizes, paced: bool) -> HashMap<&'static str, u64> {
    raise_fd_limit();
    let sent = Arc::clone(data);
    let written = Arc::new(AtomicUsize::new(0));
    let progress = Arc::clone(&written);
    let backend = Backend::start(move |mut stream| {
        let chunk = if paced { 16 * 1024 } else { 256 * 1024 };
        for part in sent.chunks(chunk) {
            if stream.write_all(part).is_err() {
                return;
            }
            progress.fetch_add(part.len(), Ordering::Relaxed);
            if paced {
                thread::sleep(Duration::from_millis(1));
            }
        }
        let _ = stream.shutdown(Shutdown::Write);
        let _ = std::io::copy(&mut stream, &mut std::io::sink());
    });
    let config = Config::parse(&config_for(&[backend.addr], "relay = \"copy\"", ""), "test").unwrap();
    let server = Server::start_with(&config, sizes).expect("start");
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    socket.connect(&server.listen_addrs[0].1.into()).unwrap();
    let mut stream: std::net::TcpStream = socket.into();
    stream.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    stream.shutdown(Shutdown::Write).unwrap();
    let (start, mut last, mut last_change) = (Instant::now(), 0, Instant::now());
    while start.elapsed() < Duration::from_secs(20) {
        thread::sleep(Duration::from_millis(20));
        let now = written.load(Ordering::Relaxed);
        let stalled = !paced && now == last && last_change.elapsed() > Duration::from_millis(300);
        let stopped = stats::totals(&server.shared().stats)
            .iter()
            .any(|(name, _, value)| *name == "ringlb_receive_stops_total" && *value > 0);
        if now >= 6 << 20 || now == data.len() || stalled || stopped {
            break;
        }
        if now != last {
            (last, last_change) = (now, Instant::now());
        }
    }
    let mut received = Vec::new();
    stream.read_to_end(&mut received).unwrap();
    assert!(received == **data, "{} of {} bytes, or reordered", received.len(), data.len());
    stop_and_count(server)
}

#[test]
fn slow_reader_takes_no_more_than_its_share_of_buffers() {
    let mut ring = ringlb::ring::Ring::new(8, 8).unwrap();
    let mut bufs = ringlb::ring::BufRing::new(&ring, 0, 2, 64).unwrap();
    let limited = ring.limits_multishot_receives(&mut bufs).unwrap();
    bufs.unregister(&ring);
    if !limited {
        eprintln!("skipped: this kernel has no byte limit for multishot receives (Linux 6.17 added it)");
        return;
    }
    let data = Arc::new(random_bytes(8 << 20, 7));
    // Each receive ends after 4 buffers' worth and is armed again only once they are sent:
    // one connection never runs a 64-buffer ring dry.
    let totals = slow_reader(&data, RingSizes { buffers: 64, ..RingSizes::default() }, false);
    assert_eq!(totals["ringlb_buffer_waits_total"], 0, "{totals:?}");
    assert_eq!(totals["ringlb_connections_finished_total"], 1, "{totals:?}");
}

#[test]
fn without_a_byte_limit_a_slow_reader_stops_the_receive_and_loses_nothing() {
    let data = Arc::new(random_bytes(8 << 20, 8));
    // As on kernels before 6.17: only the backlog stop (a cancel) ends a receive that keeps
    // finding bytes; it must find its receive, and no byte may be lost or reordered. Paced, so
    // the receive is armed and waiting when the stop lands (an unpaced flood can run the ring
    // dry and end the receive first).
    let sizes = RingSizes { buffers: 64, recv_limit_buffers: 0, ..RingSizes::default() };
    let totals = slow_reader(&data, sizes, true);
    assert!(totals["ringlb_receive_stops_total"] > 0, "no receive was ever stopped: {totals:?}");
    assert_eq!(totals["ringlb_connections_finished_total"], 1, "{totals:?}");
}
