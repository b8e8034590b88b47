//! Micro-benchmarks of the connection log: formatting one line as text and as JSON (what a
//! worker does per connection when it ends, with `connection_log` on). Run with
//! `cargo bench --bench connlog`.

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use ringlb::connlog::Record;
use ringlb::logger::timestamp;

fn record() -> Record<'static> {
    Record {
        client: Some("10.0.0.5:51234".parse().unwrap()),
        proxied: None,
        listener: "db",
        pool: Some("replicas"),
        backend: Some("10.0.1.7:5432".parse().unwrap()),
        sni: None,
        queued_ms: 0,
        connect_ms: Some(1),
        total_ms: 8213,
        bytes_up: 1830,
        bytes_down: 90211,
        attempts: 1,
        termination: "--",
    }
}

fn lines(c: &mut Criterion) {
    let record = record();
    c.bench_function("connlog_text", |b| b.iter(|| black_box(&record).text()));
    c.bench_function("connlog_json", |b| b.iter(|| black_box(&record).json()));
    c.bench_function("connlog_timestamp", |b| b.iter(|| timestamp(black_box(1_796_233_404))));
}

criterion_group!(benches, lines);
criterion_main!(benches);
