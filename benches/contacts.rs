//! Contacts cache: resident memory per pair and lookup cost with 10 million
//! pairs, single-threaded (criterion) and with two threads at once.
//!
//! Run: `cargo bench --bench contacts` (phone users), and with
//! `WAGATE_BENCH_USERS=bsuid` (users known only by a 19-character BSUID)
//! or `WAGATE_BENCH_USERS=linked` (every user known by phone and BSUID,
//! linked; lookups by the BSUID, which follow the link to the phone) — one
//! kind per process, so resident memory measures that kind alone.

use std::sync::Arc;
use std::time::Instant;

use criterion::{black_box, criterion_group, criterion_main, Criterion};
use wagate::contacts::{Consent, Contacts, MemoryContacts};

// The allocator the `wagate` binary uses.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// 10 million under `cargo bench`; a small smoke size when `cargo test
/// --all-targets` runs the bench once as a test.
fn pairs() -> u64 {
    if std::env::args().any(|a| a == "--bench") {
        10_000_000
    } else {
        100_000
    }
}

/// Which users fill the cache (`WAGATE_BENCH_USERS`).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Users {
    Phone,
    Bsuid,
    Linked,
}

fn users() -> Users {
    match std::env::var("WAGATE_BENCH_USERS").as_deref() {
        Ok("bsuid") => Users::Bsuid,
        Ok("linked") => Users::Linked,
        _ => Users::Phone,
    }
}

impl Users {
    fn label(self) -> &'static str {
        match self {
            Users::Phone => "",
            Users::Bsuid => "_bsuid",
            Users::Linked => "_linked",
        }
    }

    /// The id user `i` is looked up by.
    fn id(self, i: u64) -> String {
        match self {
            Users::Phone => format!("55119{i:08}"),
            Users::Bsuid | Users::Linked => format!("BR.LT55119{i:08}"),
        }
    }
}

#[path = "../tests/common/measure.rs"]
mod measure;
use measure::rss_bytes;

fn bench_contacts(c: &mut Criterion) {
    let total = pairs();
    let kind = users();
    let before = rss_bytes();
    let cache = Arc::new(MemoryContacts::new());
    let t0 = Instant::now();
    for i in 0..total {
        let number = format!("1098765432{:05}", i % 1000);
        if kind == Users::Linked {
            let phone = Users::Phone.id(i);
            cache.link(&number, &phone, &kind.id(i), 1, "");
            cache.set_consent(&number, &phone, Consent::OptedIn);
        } else {
            cache.set_consent(&number, &kind.id(i), Consent::OptedIn);
        }
    }
    let after = rss_bytes();
    eprintln!(
        "contacts{}: {} people ({} entries, {} links) in {:.1} s; resident memory grew {:.0} MiB = {:.1} bytes per person",
        kind.label(),
        total,
        cache.len(),
        cache.links_len(),
        t0.elapsed().as_secs_f64(),
        (after - before) as f64 / (1 << 20) as f64,
        (after - before) as f64 / total as f64
    );
    let keys: Vec<(String, String)> = (0..4096u64)
        .map(|i| {
            let j = i * 2_654_435_761 % total;
            (format!("1098765432{:05}", j % 1000), kind.id(j))
        })
        .collect();
    // Every key is known, with the state set above (the bench reads the
    // right entries, through the link for `linked`).
    assert!(keys
        .iter()
        .all(|(n, u)| cache.get(n, u).consent == Consent::OptedIn));
    let mut i = 0usize;
    c.bench_function(&format!("contacts_get_10M{}", kind.label()), |b| {
        b.iter(|| {
            i = (i + 1) & 4095;
            let (n, u) = &keys[i];
            black_box(cache.get(n, u))
        })
    });
    // The key alone: both ids parsed into integers (part of every lookup).
    let mut k = 0usize;
    c.bench_function("contacts_pair_key", |b| {
        b.iter(|| {
            k = (k + 1) & 4095;
            let (n, u) = &keys[k];
            black_box(wagate::contacts::pair_key(black_box(n), black_box(u)))
        })
    });
    // A hot set (64 pairs, all in cache): the CPU cost alone.
    let mut h = 0usize;
    c.bench_function(&format!("contacts_get_10M{}_hot64", kind.label()), |b| {
        b.iter(|| {
            h = (h + 1) & 63;
            let (n, u) = &keys[h];
            black_box(cache.get(n, u))
        })
    });
    // Two threads looking up at once. Each thread times 2,000 samples of
    // 1,000 lookups; the median and p99 of the per-lookup time of those
    // samples are reported per thread.
    let keys = Arc::new(keys);
    let (samples, per_sample) = (2_000usize, 1_000usize);
    let start = Arc::new(std::sync::Barrier::new(2));
    let handles: Vec<_> = (0..2)
        .map(|t| {
            let (cache, keys, start) = (cache.clone(), keys.clone(), start.clone());
            std::thread::spawn(move || {
                let mut ns = Vec::with_capacity(samples);
                let mut k = t * 2048;
                start.wait();
                for _ in 0..samples {
                    let t0 = Instant::now();
                    for _ in 0..per_sample {
                        k = (k + 1) & 4095;
                        let (a, b) = &keys[k];
                        black_box(cache.get(a, b));
                    }
                    ns.push(t0.elapsed().as_nanos() as f64 / per_sample as f64);
                }
                ns.sort_by(f64::total_cmp);
                (ns[samples / 2], ns[samples * 99 / 100])
            })
        })
        .collect();
    let per: Vec<(f64, f64)> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    eprintln!(
        "contacts{}: 2 threads at once, ns per lookup: thread 1 p50 {:.1} p99 {:.1}; thread 2 p50 {:.1} p99 {:.1}",
        kind.label(), per[0].0, per[0].1, per[1].0, per[1].1
    );
}

criterion_group!(benches, bench_contacts);
criterion_main!(benches);
