//! The fleet's dedupe window (issue 17, DESIGN §12):
//!
//! (a) memory per id: the dedupe set filled with N committed ids (default
//!     10,000,000 with `--bench`), its own estimate and the process's RSS
//!     growth per id; the cost of a claim (new id, duplicate) at that size;
//! (b) bootstrap rate: N ids written to a fresh prefix's `inbound.ids` in
//!     records of `MAX_IDS_PER_RECORD`, then read back by
//!     `ingress::shared::tail` (as a starting instance does) until caught up:
//!     ids/s and records/s.
//!
//!   WAGATE_TEST_BROKERS=$(scripts/tansu.sh start target/bench-env) \
//!     cargo bench --bench dedupe_window
//!   scripts/tansu.sh stop target/bench-env
//!
//! `WAGATE_BENCH_IDS=N` sets N. Without `--bench` (as `cargo test
//! --all-targets` runs it) N is 100,000. Both need `WAGATE_TEST_BROKERS`
//! (the README's test command sets it).

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;
use wagate::ingress::dedupe::{Batch, Claim, Dedupe};
use wagate::ingress::shared::{self, MAX_IDS_PER_RECORD};
use wagate::kafka::{self, KafkaProducer, TopicId, Topics};

// The allocator the `wagate` binary uses.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn rss_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    pages * 4096
}

fn memory(n: u64) {
    // Bound well above n: the per-shard share of the bound is not reached.
    let d = Dedupe::new(Duration::from_secs(7 * 24 * 3600), 2 * n as usize);
    let before = rss_bytes();
    let b = Batch::new();
    let start = Instant::now();
    let mut id = String::with_capacity(64);
    for i in 0..n {
        id.clear();
        use std::fmt::Write;
        let _ = write!(id, "wamid.HBgLMTQxNTU1NTAxMjMVAgASGBQz{i:020}");
        if let Claim::New(h) = d.claim(&id, &b) {
            d.commit(&[h]);
        }
    }
    let fill = start.elapsed();
    let after = rss_bytes();
    let st = d.stats();
    println!(
        "dedupe set, {n} ids: estimate {:.1} B/id ({} MiB), RSS growth {:.1} B/id ({} MiB), fill {:.0} ns/id",
        st.approx_bytes as f64 / n as f64,
        st.approx_bytes >> 20,
        after.saturating_sub(before) as f64 / n as f64,
        after.saturating_sub(before) >> 20,
        fill.as_nanos() as f64 / n as f64
    );
    let probes = 200_000u64.min(n);
    let t = Instant::now();
    let mut dups = 0;
    for i in 0..probes {
        id.clear();
        use std::fmt::Write;
        let _ = write!(
            id,
            "wamid.HBgLMTQxNTU1NTAxMjMVAgASGBQz{:020}",
            (i * 7919) % n
        );
        dups += matches!(d.claim(&id, &b), Claim::Duplicate { .. }) as u64;
    }
    let dup_ns = t.elapsed().as_nanos() as f64 / probes as f64;
    assert_eq!(dups, probes, "every probe is a duplicate");
    let t = Instant::now();
    for i in 0..probes {
        id.clear();
        use std::fmt::Write;
        let _ = write!(id, "wamid.new{i}");
        if let Claim::New(h) = d.claim(&id, &b) {
            d.release(&[h]);
        }
    }
    let new_ns = t.elapsed().as_nanos() as f64 / probes as f64;
    println!("  claim at {n} ids: duplicate {dup_ns:.0} ns, new id {new_ns:.0} ns (incl. formatting the id)");
}

async fn bootstrap(brokers: &str, n: u64) {
    let prefix = format!(
        "bench{}.",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis()
    );
    let env: std::collections::BTreeMap<String, String> = [
        ("WAGATE_KAFKA_BROKERS", brokers),
        ("WAGATE_TOPIC_PREFIX", prefix.as_str()),
        ("WAGATE_KAFKA_PARTITIONS", "1"),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    let cfg = wagate::config::load(None, &env, wagate::config::LoadOptions { dev: true }).unwrap();
    kafka::create_topics(&cfg.kafka).await.unwrap();
    let topic = Topics::new(&prefix).name(TopicId::InboundIds).to_string();
    let producer = KafkaProducer::new(&cfg.kafka).unwrap();
    let writer_key = shared::instance_key();
    let mut value = Vec::new();
    let mut ids = Vec::with_capacity(MAX_IDS_PER_RECORD);
    let mut pending = Vec::new();
    let t = Instant::now();
    let mut records = 0u64;
    for i in 0..n {
        ids.push(Dedupe::hash(&format!("wamid.boot{i}")).0);
        if ids.len() == MAX_IDS_PER_RECORD || i + 1 == n {
            shared::encode(&ids, &mut value);
            ids.clear();
            loop {
                match producer.send(&topic, &writer_key, &value, &[]) {
                    Ok(d) => {
                        pending.push(d);
                        break;
                    }
                    Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
                }
            }
            records += 1;
        }
    }
    for d in pending {
        d.await.expect("id record acknowledged");
    }
    let wrote = t.elapsed();
    println!(
        "inbound.ids: {n} ids in {records} records written in {:.2} s",
        wrote.as_secs_f64()
    );
    let dedupe = Arc::new(Dedupe::new(Duration::from_secs(24 * 3600), 2 * n as usize));
    let stop = CancellationToken::new();
    let (tx, rx) = std::sync::mpsc::channel();
    let opts = shared::TailOptions {
        topic,
        own_key: shared::instance_key(),
        propagation: Duration::from_millis(250),
    };
    let conn = cfg.kafka.connection.clone();
    let t = Instant::now();
    let reader = {
        let (dedupe, stop) = (dedupe.clone(), stop.clone());
        std::thread::spawn(move || {
            shared::tail(
                &conn,
                &opts,
                &dedupe,
                Box::new(move || {
                    let _ = tx.send(());
                }),
                &stop,
            )
        })
    };
    rx.recv_timeout(Duration::from_secs(600))
        .expect("the window was read back");
    let took = t.elapsed();
    stop.cancel();
    reader.join().unwrap().unwrap();
    let held = dedupe.stats().learned;
    assert_eq!(held as u64, n, "every id learned");
    println!(
        "  read back by a starting instance in {:.2} s: {:.0} ids/s, {:.0} records/s (caught up, {held} ids held)",
        took.as_secs_f64(),
        n as f64 / took.as_secs_f64(),
        records as f64 / took.as_secs_f64()
    );
}

fn main() {
    let bench = std::env::args().any(|a| a == "--bench");
    let n: u64 = std::env::var("WAGATE_BENCH_IDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(if bench { 10_000_000 } else { 100_000 });
    memory(n);
    let b = std::env::var("WAGATE_TEST_BROKERS").unwrap_or_else(|_| {
        panic!("WAGATE_TEST_BROKERS is not set: start Tansu with scripts/tansu.sh (see the top of this file)")
    });
    tokio::runtime::Runtime::new()
        .unwrap()
        .block_on(bootstrap(&b, n));
}
