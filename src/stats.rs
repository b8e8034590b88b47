//! Counters each worker keeps about its connections, readable from any thread.
//!
//! Each worker is the only writer of its own [`WorkerStats`], so an increment is a plain load
//! and store (no locked instruction on the hot path); readers sum over workers. Each worker's
//! block sits on its own cache lines.

use std::sync::atomic::{AtomicU64, Ordering};

/// A counter written by one thread and read by any.
#[derive(Debug, Default)]
pub struct Counter(AtomicU64);

impl Counter {
    /// Adds `n`; only the owning worker calls this.
    #[inline]
    pub fn add(&self, n: u64) {
        self.0.store(self.0.load(Ordering::Relaxed).wrapping_add(n), Ordering::Relaxed);
    }

    #[inline]
    pub fn sub(&self, n: u64) {
        self.0.store(self.0.load(Ordering::Relaxed).wrapping_sub(n), Ordering::Relaxed);
    }

    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

macro_rules! worker_stats {
    ($($field:ident: $name:literal, $help:literal;)*) => {
        /// One worker's counters.
        #[derive(Debug, Default)]
        #[repr(align(128))]
        pub struct WorkerStats {
            $(#[doc = $help] pub $field: Counter,)*
        }

        impl WorkerStats {
            /// (metric name, help, value) for every counter, for logs and metrics output.
            pub fn values(&self) -> Vec<(&'static str, &'static str, u64)> {
                vec![$(($name, $help, self.$field.get()),)*]
            }
        }
    };
}

worker_stats! {
    accepted: "ringlb_connections_accepted_total", "Client connections accepted.";
    active: "ringlb_connections_active", "Client connections open now.";
    finished: "ringlb_connections_finished_total", "Connections both sides closed normally.";
    reset: "ringlb_connections_reset_total", "Connections ended by a reset or error on one side, passed on to the other.";
    no_backend: "ringlb_connections_no_backend_total", "Connections closed because no backend could be connected to.";
    local_error: "ringlb_connections_local_error_total", "Connections closed because no socket could be opened.";
    idle_closed: "ringlb_connections_idle_closed_total", "Connections closed by the idle timeout.";
    drain_closed: "ringlb_connections_drain_closed_total", "Connections closed at the drain deadline.";
    killed: "ringlb_connections_killed_total", "Connections reset by an operator's shutdown-sessions.";
    backend_down_closed: "ringlb_connections_backend_down_closed_total", "Connections cut because their backend was marked down (on_down = close).";
    connect_failed: "ringlb_backend_connect_failures_total", "Backend connect attempts that failed or timed out.";
    accept_errors: "ringlb_accept_errors_total", "Accept failures (including file-descriptor exhaustion).";
    ticks: "ringlb_worker_ticks_total", "Worker ticks (each worker ticks at least once a second; the systemd watchdog checks that every one does).";
    accept_backoffs: "ringlb_accept_backoffs_total", "Times accepting paused for 100 ms after running out of descriptors or memory.";
    over_limit: "ringlb_connections_over_limit_total", "Connections closed at accept because max_connections were open.";
    refused_access: "ringlb_connections_refused_access_total", "Connections refused by a listener's allow/deny rules.";
    refused_source_limit: "ringlb_connections_refused_source_limit_total", "Connections refused by max_conns_per_source.";
    refused_proxy_source: "ringlb_connections_refused_proxy_source_total", "Connections refused because they came from outside a listener's proxy_from (accept_proxy).";
    handshake_failed: "ringlb_connections_handshake_failed_total", "Connections closed for a missing, malformed or late PROXY header or ClientHello, or no route for it.";
    queued: "ringlb_connections_queued_total", "Connections that waited for a backend below its max_conns.";
    queue_timeout: "ringlb_connections_queue_timeout_total", "Connections closed after waiting queue_timeout for a backend.";
    client_gone: "ringlb_connections_client_gone_total", "Connections whose client reset or hung up before a backend answered (in its handshake, queued or connecting).";
    bytes_up: "ringlb_bytes_client_to_backend_total", "Bytes relayed from clients to backends.";
    bytes_down: "ringlb_bytes_backend_to_client_total", "Bytes relayed from backends to clients.";
    buffer_waits: "ringlb_buffer_waits_total", "Receives ended because the buffer ring was empty (they resume when buffers return).";
    moved: "ringlb_connections_moved_total", "Connections handed to another worker (spread = \"pack\").";
    receive_stops: "ringlb_receive_stops_total", "Receives stopped because 4 buffers waited behind a slower destination (backpressure).";
    connection_log_dropped: "ringlb_connection_log_dropped_total", "Connection log lines dropped because standard error did not keep up (a worker never waits for it).";
    pipe_shortages: "ringlb_splice_pipe_shortages_total", "Splice rounds that found no pipe to spare and went through a ring buffer.";
    sq_full: "ringlb_ring_sq_full_total", "Submissions that found the submission queue full and waited for the next submit.";
    cq_overflow: "ringlb_ring_cq_overflow_total", "Completions the kernel held back because the completion queue was full.";
}

/// Sums the counters of several workers, by metric name.
pub fn totals(workers: &[WorkerStats]) -> Vec<(&'static str, &'static str, u64)> {
    let mut sums = WorkerStats::default().values();
    for worker in workers {
        for (sum, (_, _, value)) in sums.iter_mut().zip(worker.values()) {
            sum.2 += value;
        }
    }
    sums
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn totals_sum_workers() {
        let workers = [WorkerStats::default(), WorkerStats::default()];
        workers[0].accepted.add(2);
        workers[1].accepted.add(3);
        workers[1].active.add(2);
        workers[1].active.sub(1);
        let sums = totals(&workers);
        assert!(sums.contains(&("ringlb_connections_accepted_total", "Client connections accepted.", 5)));
        assert_eq!(sums.iter().find(|(n, _, _)| *n == "ringlb_connections_active").unwrap().2, 1);
    }
}
