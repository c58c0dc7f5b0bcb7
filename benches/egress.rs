//! Egress limiter costs: the pair-rate decision with 1M tracked pairs, the
//! per-number throughput decision, and the memory a tracked pair costs.
//!
//! Run: `cargo bench --bench egress`

use std::time::Duration;

use criterion::{black_box, criterion_group, criterion_main, Criterion};
use wagate::ratelimit::{PairKey, PairRate, Throughput};

#[path = "../tests/common/measure.rs"]
mod measure;
use measure::rss_bytes;

fn bench_pairs(c: &mut Criterion) {
    const N: u64 = 1_000_000;
    let before = rss_bytes();
    let p = PairRate::new(Duration::from_secs(6), 45);
    for i in 0..N {
        let _ = p.check(PairKey::new("109876543210987", &format!("55119{i:08}")));
    }
    let after = rss_bytes();
    eprintln!(
        "pair limiter: {} pairs tracked, resident memory grew {:.1} MiB = {:.0} bytes per pair",
        p.len(),
        (after - before) as f64 / (1 << 20) as f64,
        (after - before) as f64 / N as f64
    );
    let keys: Vec<PairKey> = (0..1024u64)
        .map(|i| PairKey::new("109876543210987", &format!("55119{:08}", i * 977 % N)))
        .collect();
    let mut i = 0usize;
    c.bench_function("pair_check_1M_tracked", |b| {
        b.iter(|| {
            i = (i + 1) & 1023;
            black_box(p.check(keys[i]).is_ok())
        })
    });
    c.bench_function("pair_key_hash", |b| {
        b.iter(|| PairKey::new(black_box("109876543210987"), black_box("5511987654321")))
    });
}

fn bench_throughput(c: &mut Criterion) {
    // A fast limiter so most decisions grant (the slot log is exercised).
    let t = Throughput::new(1_000_000);
    c.bench_function("throughput_check", |b| {
        b.iter(|| {
            if let Ok(ticket) = t.check() {
                ticket.done();
            }
        })
    });
}

criterion_group!(benches, bench_pairs, bench_throughput);
criterion_main!(benches);
