//! The relay with a deliberately tiny ring and buffer pool, so that the paths normal sizes
//! rarely reach run all the time: the submission queue full, completions held back by a full
//! completion queue, and receives finding no buffer. No byte may be lost on any of them.

mod common;

use std::sync::Arc;
use std::thread;

use common::*;
use ringlb::config::Config;
use ringlb::server::Server;
use ringlb::stats;
use ringlb::worker::RingSizes;

#[test]
fn tiny_ring_and_buffer_pool_lose_nothing() {
    raise_fd_limit();
    let backend = Backend::echo();
    // The copy relay: this test is about ring buffers.
    let config = Config::parse(&config_for(&[backend.addr], "relay = \"copy\"", ""), "test").unwrap();
    let sizes = RingSizes { entries: 4, cq_entries: 4, buffers: 2, buffer_size: 1024, pipes: None };
    let server = Server::start_with(&config, sizes).expect("start");
    let addr = server.listen_addrs[0].1;

    let clients: Vec<_> = (0..128u64)
        .map(|i| {
            thread::spawn(move || {
                let data = Arc::new(random_bytes(256 * 1024 + i as usize, i));
                let received = send_and_read_all(connect(addr), Arc::clone(&data)).expect("relay");
                assert!(received == *data, "connection {i}: {} of {} bytes, or corrupted", received.len(), data.len());
            })
        })
        .collect();
    for client in clients {
        client.join().unwrap();
    }

    let shared = Arc::clone(server.shared());
    server.drain();
    server.join().expect("workers stop cleanly");
    let totals: std::collections::HashMap<_, _> =
        stats::totals(&shared.stats).into_iter().map(|(name, _, value)| (name, value)).collect();
    assert_eq!(totals["ringlb_connections_finished_total"], 128, "{totals:?}");
    assert!(totals["ringlb_ring_sq_full_total"] > 0, "the SQ never filled: {totals:?}");
    assert!(totals["ringlb_ring_cq_overflow_total"] > 0, "the CQ never overflowed: {totals:?}");
    assert!(totals["ringlb_buffer_waits_total"] > 0, "buffers never ran out: {totals:?}");
}

#[test]
fn splice_with_no_pipe_to_spare_relays_every_round_by_copy() {
    raise_fd_limit();
    let backend = Backend::echo();
    let config = Config::parse(&config_for(&[backend.addr], "relay = \"splice\"", ""), "test").unwrap();
    let sizes = RingSizes { pipes: Some(0), ..RingSizes::default() };
    let server = Server::start_with(&config, sizes).expect("start");
    let addr = server.listen_addrs[0].1;
    let clients: Vec<_> = (0..16u64)
        .map(|i| {
            thread::spawn(move || {
                let data = Arc::new(random_bytes(1 << 20, i + 7));
                let received = send_and_read_all(connect(addr), Arc::clone(&data)).expect("relay");
                assert!(received == *data, "connection {i}: bytes differ");
            })
        })
        .collect();
    for client in clients {
        client.join().unwrap();
    }
    let shared = Arc::clone(server.shared());
    server.drain();
    server.join().expect("workers stop cleanly");
    let totals: std::collections::HashMap<_, _> =
        stats::totals(&shared.stats).into_iter().map(|(name, _, value)| (name, value)).collect();
    assert_eq!(totals["ringlb_connections_finished_total"], 16, "{totals:?}");
    assert!(totals["ringlb_splice_pipe_shortages_total"] > 0, "{totals:?}");
}
