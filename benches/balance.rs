//! Micro-benchmarks of backend choice: building Maglev tables (what the control thread does
//! when a backend goes up or down), looking one up, and each algorithm's pick (what a worker
//! does per new connection). Run with `cargo bench --bench balance`.

use std::hint::black_box;
use std::net::SocketAddr;

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use ringlb::balance::client_hash;
use ringlb::balance::maglev::{Entry, MaglevTable};
use ringlb::config::{Algorithm, BackendConfig, HashKey, PoolConfig};
use ringlb::control::snapshot::pool_from_config;
use ringlb::pool::{Health, Picker, Pool};

fn names(n: usize) -> Vec<String> {
    (0..n).map(|i| format!("10.{}.{}.{}:5432", i / 65536, (i / 256) % 256, i % 256)).collect()
}

/// The smallest table the config accepts for `n` backends, or the default.
fn table_size(n: usize) -> u32 {
    if n * 100 < 65_537 { 65_537 } else { 100_003 }
}

fn maglev_build(c: &mut Criterion) {
    let mut group = c.benchmark_group("maglev_build");
    for n in [10usize, 100, 1000] {
        let names = names(n);
        let entries: Vec<Entry<'_>> = names
            .iter()
            .enumerate()
            .map(|(i, name)| Entry { name, weight: 1 + (i % 3) as u32, index: i as u32 })
            .collect();
        group.bench_with_input(BenchmarkId::from_parameter(n), &entries, |b, entries| {
            b.iter(|| MaglevTable::build(black_box(entries), table_size(n)))
        });
    }
    group.finish();
}

fn maglev_lookup(c: &mut Criterion) {
    let names = names(100);
    let entries: Vec<Entry<'_>> =
        names.iter().enumerate().map(|(i, name)| Entry { name, weight: 1, index: i as u32 }).collect();
    let table = MaglevTable::build(&entries, 65_537);
    let client: SocketAddr = "192.0.2.7:40123".parse().unwrap();
    c.bench_function("maglev_lookup_client_ip", |b| {
        b.iter(|| table.lookup(client_hash(black_box(client), HashKey::ClientIp)))
    });
}

fn pool(algorithm: Algorithm, n: usize) -> Pool {
    let backends = names(n)
        .iter()
        .enumerate()
        .map(|(i, name)| BackendConfig::new(name.parse().unwrap(), 1 + (i % 3) as u32))
        .collect();
    pool_from_config(&PoolConfig::new("bench", algorithm, backends), Health::all_up(n), &[], None, 1)
}

fn picks(c: &mut Criterion) {
    let mut group = c.benchmark_group("pick");
    let algorithms = [
        ("round_robin", Algorithm::RoundRobin),
        ("least_conn", Algorithm::LeastConn),
        ("random_two", Algorithm::RandomTwo),
        ("maglev", Algorithm::Maglev { table_size: 65_537, hash_key: HashKey::ClientIp }),
    ];
    for n in [3usize, 30] {
        for (name, algorithm) in algorithms {
            let pool = pool(algorithm, n);
            for (i, backend) in pool.backends.iter().enumerate() {
                backend.counters.active.store((i * 7 % 11) as u64, std::sync::atomic::Ordering::Relaxed);
            }
            let mut picker = Picker::new(&pool, 1);
            let mut port = 0u16;
            group.bench_function(BenchmarkId::new(name, n), |b| {
                b.iter(|| {
                    port = port.wrapping_add(1);
                    let client = SocketAddr::from(([198, 51, 100, (port % 200) as u8], port));
                    picker.pick(black_box(&pool), Some(client))
                })
            });
        }
    }
    group.finish();
}

criterion_group!(benches, maglev_build, maglev_lookup, picks);
criterion_main!(benches);
