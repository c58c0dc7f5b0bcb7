//! Guarantee 2 across a fleet and across restarts (DESIGN §12, issue 17):
//! real `wagate` processes on one Tansu broker, real HTTP over loopback.
//!
//! - A body stored by A and redelivered to B a second later, a re-batched
//!   redelivery with a new event, and 60 events each redelivered to the
//!   other instance: each event stored once.
//! - SIGTERM and a restart, kill -9 right after the 200 and a restart, and a
//!   third instance started later: redeliveries store nothing.
//! - Two deliveries at once to two instances: at most one extra record per
//!   event, and exactly those are counted as late duplicates; then the
//!   delay from A's 200 to B's delivery at which duplicates stop, printed.

mod common;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::*;

struct Instance {
    public: SocketAddr,
    internal: SocketAddr,
    proc: process::Running,
}

fn free_addr() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], free_port()))
}

async fn spawn(brokers: &str, prefix: &str, name: &str) -> Instance {
    let (public, internal) = (free_addr(), free_addr());
    let proc = gateway_process(brokers, prefix)
        .env("WAGATE_LISTEN", public)
        .env("WAGATE_INTERNAL_LISTEN", internal)
        .env("WAGATE_EGRESS_ENABLED", "false")
        .log(&format!("fleet_dedupe_{name}.log"))
        .spawn();
    let inst = Instance {
        public,
        internal,
        proc,
    };
    let url = format!("http://{}/readyz", inst.internal);
    let end = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(r) = try_get(&url).await {
            if r.status == hyper::StatusCode::OK {
                break;
            }
        }
        assert!(
            Instant::now() < end,
            "{name} never became ready; its log:\n{}",
            inst.proc.log_tail(30)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    inst
}

async fn try_get(url: &str) -> Result<Resp, String> {
    let req = hyper::Request::get(url)
        .body(http_body_util::Full::new(bytes::Bytes::new()))
        .unwrap();
    try_request(req).await
}

async fn metrics_of(i: &Instance) -> String {
    let r = get(&format!("http://{}/metrics", i.internal)).await;
    String::from_utf8_lossy(&r.body).into_owned()
}

async fn metric(i: &Instance, name: &str) -> f64 {
    metric_in(&metrics_of(i).await, name, &[])
}

const PN: &str = "106540352242922";

/// Event ids on `inbound.messages` and how often each is there.
async fn stored(brokers: &str, prefix: &str) -> HashMap<String, usize> {
    stored_on(brokers, prefix, &["inbound.messages"]).await
}

/// The same over several topics (record ids are unique across them).
async fn stored_on(brokers: &str, prefix: &str, topics: &[&str]) -> HashMap<String, usize> {
    let mut by = HashMap::new();
    for t in topics {
        let recs = read_all(brokers, prefix, t, Duration::from_secs(3)).await;
        for id in event_ids(&recs) {
            *by.entry(id).or_insert(0) += 1;
        }
    }
    by
}

async fn setup(prefix: &str) -> String {
    let b = brokers();
    let cfg = config(&b, prefix, &[]);
    create_topics(&cfg.kafka).await;
    b
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redeliveries_to_another_instance_or_after_a_restart_store_nothing_twice() {
    let prefix = unique_prefix("fleet");
    let b = setup(&prefix).await;
    let a = spawn(&b, &prefix, "a").await;
    let bb = spawn(&b, &prefix, "b").await;

    // Stored by A, redelivered to B a second later; then re-batched with a
    // new event.
    let x1 = text_webhook(PN, &["wamid.X1"]);
    webhook_ok(a.public, &x1).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    webhook_ok(bb.public, &x1).await;
    webhook_ok(bb.public, &text_webhook(PN, &["wamid.X1", "wamid.X2"])).await;
    assert!(
        metric(&bb, "wagate_dedupe_shared_hits_total").await >= 2.0,
        "B dropped X1 twice because A stored it"
    );

    // 60 events, half first to A, half first to B, each then redelivered to
    // the other instance.
    let bodies: Vec<Vec<u8>> = (0..60)
        .map(|i| text_webhook(PN, &[&format!("wamid.F{i}")]))
        .collect();
    let first = |i: usize| if i % 2 == 0 { &a } else { &bb };
    let second = |i: usize| if i % 2 == 0 { &bb } else { &a };
    futures_util::future::join_all(
        bodies
            .iter()
            .enumerate()
            .map(|(i, body)| webhook_ok(first(i).public, body)),
    )
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    futures_util::future::join_all(
        bodies
            .iter()
            .enumerate()
            .map(|(i, body)| webhook_ok(second(i).public, body)),
    )
    .await;
    let hits_a = metric(&a, "wagate_dedupe_shared_hits_total").await;
    let hits_b = metric(&bb, "wagate_dedupe_shared_hits_total").await;
    assert!(
        hits_a >= 30.0 && hits_b >= 32.0,
        "hits: A {hits_a} B {hits_b}"
    );

    // SIGTERM A and start it again: the new process reads the window back.
    let mut a = a;
    a.proc.sigterm();
    assert!(
        a.proc.wait_for_exit(Duration::from_secs(30)).is_some(),
        "A did not stop"
    );
    let a2 = spawn(&b, &prefix, "a2").await;
    assert!(metric(&a2, "wagate_dedupe_learned_total").await >= 62.0);
    webhook_ok(a2.public, &x1).await;
    for body in &bodies[..10] {
        webhook_ok(a2.public, body).await;
    }

    // Stored by B, which is killed right after the 200; a new instance gets
    // the redelivery.
    let y1 = text_webhook(PN, &["wamid.Y1"]);
    let mut bb = bb;
    webhook_ok(bb.public, &y1).await;
    bb.proc.kill9();
    let c = spawn(&b, &prefix, "c").await;
    webhook_ok(c.public, &y1).await;

    // A third instance started later knows the whole window.
    let d = spawn(&b, &prefix, "d").await;
    assert!(metric(&d, "wagate_dedupe_learned_total").await >= 63.0);
    for body in bodies.iter().chain([&x1, &y1]) {
        webhook_ok(d.public, body).await;
    }
    assert!(metric(&d, "wagate_dedupe_bootstrap_remaining").await == 0.0);

    let by = stored(&b, &prefix).await;
    let twice: Vec<_> = by.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "stored more than once: {twice:?}");
    assert_eq!(by.len(), 63, "X1, X2, F0..F59, Y1");
    for i in [&a2, &c, &d] {
        assert_eq!(metric(i, "wagate_dedupe_late_duplicates_total").await, 0.0);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deliveries_at_once_to_two_instances_store_at_most_one_extra_record_and_count_it() {
    let prefix = unique_prefix("race");
    let b = setup(&prefix).await;
    let a = spawn(&b, &prefix, "race_a").await;
    let bb = spawn(&b, &prefix, "race_b").await;

    // The same body to both at the same moment.
    let n = 30;
    for i in 0..n {
        let body = text_webhook(PN, &[&format!("wamid.R{i}")]);
        tokio::join!(webhook_ok(a.public, &body), webhook_ok(bb.public, &body));
    }
    // Then with a delay from A's 200 to B's delivery.
    let delays = [0u64, 10, 25, 50, 100, 250, 500];
    for d in delays {
        for i in 0..10 {
            let body = text_webhook(PN, &[&format!("wamid.D{d}.{i}")]);
            webhook_ok(a.public, &body).await;
            tokio::time::sleep(Duration::from_millis(d)).await;
            webhook_ok(bb.public, &body).await;
        }
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let by = stored(&b, &prefix).await;
    assert!(by.values().all(|n| *n <= 2), "{by:?}");
    let message_dups = by.values().filter(|n| **n == 2).count();
    let race_dups = (0..n)
        .filter(|i| by.get(&format!("wamid.R{i}")) == Some(&2))
        .count();
    assert_eq!(by.len(), n + 10 * delays.len(), "every event stored");
    // Every duplicate record (the events and the contacts records they
    // caused) is seen after the fact by both instances.
    let all = stored_on(
        &b,
        &prefix,
        &["inbound.messages", "windows", "users", "consent"],
    )
    .await;
    let dups = all.values().filter(|n| **n == 2).count() as f64;
    let late_a = metric(&a, "wagate_dedupe_late_duplicates_total").await;
    let late_b = metric(&bb, "wagate_dedupe_late_duplicates_total").await;
    assert_eq!((late_a, late_b), (dups, dups), "late duplicates counted");
    println!("simultaneous deliveries to two instances: {race_dups} of {n} stored twice ({message_dups} messages and {dups} records in all)");
    for d in delays {
        let twice = (0..10)
            .filter(|i| by.get(&format!("wamid.D{d}.{i}")) == Some(&2))
            .count();
        println!("B's delivery {d:>3} ms after A's 200: {twice} of 10 stored twice");
    }
    let text = metrics_of(&bb).await;
    for line in text
        .lines()
        .filter(|l| l.starts_with("wagate_dedupe_propagation_seconds"))
    {
        println!("{line}");
    }
}
