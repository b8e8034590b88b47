//! The relay in-process with deliberately small resources, so that the paths normal sizes
//! rarely reach run all the time: the submission queue full, completions held back by a full
//! completion queue, receives finding no buffer, and splicing with no pipe to spare. No byte
//! may be lost on any of them.

mod common;

use std::collections::HashMap;
use std::sync::Arc;
use std::thread;

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
    let shared = Arc::clone(server.shared());
    server.drain();
    server.join().expect("workers stop cleanly");
    stats::totals(&shared.stats).into_iter().map(|(name, _, value)| (name, value)).collect()
}

#[test]
fn tiny_ring_and_buffer_pool_lose_nothing() {
    let backend = Backend::echo();
    // The copy relay: this test is about ring buffers.
    let config = config_for(&[backend.addr], "relay = \"copy\"", "");
    let sizes = RingSizes { entries: 4, cq_entries: 4, buffers: 2, buffer_size: 1024, pipes: None };
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
