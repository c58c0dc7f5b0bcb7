//! `wagate replay` (DESIGN §12, issue 17): the real binary against Tansu
//! re-derives the event topics from `inbound.raw`.
//!
//! - into a fresh prefix: equal to the original topics event for event (ids,
//!   kinds, keys, `received_at_ms`), every record marked `wagate-replay: 1`;
//! - into the live prefix: adds nothing (the fleet's dedupe);
//! - a time range and an app select exactly their bodies;
//! - with Kafka refusing the replay's records (librdkafka's mock cluster):
//!   non-zero, and a second run completes what the first could not.

mod common;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::process::Command;
use std::time::Duration;

use common::*;
use serde_json::Value;

const TOPICS: [&str; 3] = ["inbound.messages", "inbound.statuses", "inbound.events"];

const CONFIG: &str = r#"
[egress]
enabled = false
[apps.default]
secret_env = "WAGATE_APP_SECRET"
verify_token_env = "WAGATE_VERIFY_TOKEN"
[apps.second]
secret_env = "WAGATE_APP_SECRET"
verify_token_env = "WAGATE_VERIFY_TOKEN"
[tenants.default]
token_env = "WAGATE_API_TOKEN"
numbers = ["*"]
"#;

fn config_file() -> std::path::PathBuf {
    let dir = option_env!("CARGO_TARGET_TMPDIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    let path = dir.join(format!("replay-{}.toml", std::process::id()));
    std::fs::write(&path, CONFIG).unwrap();
    path
}

fn free_addr() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], free_port()))
}

/// One event as compared: (topic, event id) → (kind, key, received_at_ms).
type Events = BTreeMap<(String, String), (String, String, u64)>;

async fn events(brokers: &str, prefix: &str, replayed: bool) -> Events {
    let mut out = Events::new();
    for t in TOPICS {
        for r in read_all(brokers, prefix, t, Duration::from_secs(2)).await {
            let id = r.headers["wagate-event-id"].as_str().unwrap().to_string();
            assert_eq!(
                r.headers.get("wagate-replay").and_then(Value::as_str),
                replayed.then_some("1"),
                "{t} {id}: the replay header"
            );
            let kind = r.headers["wagate-kind"].as_str().unwrap().to_string();
            let at = r.value["received_at_ms"].as_u64().expect("received_at_ms");
            let prev = out.insert(
                (t.to_string(), id.clone()),
                (kind, r.key.clone().unwrap_or_default(), at),
            );
            assert!(prev.is_none(), "{t} {id} stored twice");
        }
    }
    out
}

/// Runs `wagate replay ARGS` and returns (success, stdout, stderr).
fn replay(brokers: &str, prefix: &str, args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_wagate"))
        .arg("replay")
        .arg("--config")
        .arg(config_file())
        .args(args)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("WAGATE_KAFKA_BROKERS", brokers)
        .env("WAGATE_TOPIC_PREFIX", prefix)
        .output()
        .expect("run wagate replay");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_rebuilds_the_event_topics_and_selects_by_range_and_app() {
    let b = brokers();
    let prefix = unique_prefix("replay");
    create_topics(&config(&b, &prefix, &[]).kafka).await;
    let (public, internal) = (free_addr(), free_addr());
    let _gw = gateway_process(&b, &prefix)
        .arg("--config")
        .arg(config_file().display())
        .env("WAGATE_LISTEN", public)
        .env("WAGATE_INTERNAL_LISTEN", internal)
        .log("replay_gateway.log")
        .spawn();
    let url = format!("http://{internal}/readyz");
    let end = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let req = hyper::Request::get(&url)
            .body(http_body_util::Full::new(bytes::Bytes::new()))
            .unwrap();
        if try_request(req)
            .await
            .is_ok_and(|r| r.status == hyper::StatusCode::OK)
        {
            break;
        }
        assert!(std::time::Instant::now() < end, "gateway never ready");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // First batch, app default: messages and statuses, a template event, a
    // redelivery (kept twice on the raw topic), a body that is kept raw.
    webhook_ok(public, &fixture("inbound_batched_multi_entry.json")).await;
    webhook_ok(public, &fixture("message_template_status_update.json")).await;
    let m1 = text_webhook("106540352242922", &["wamid.RP1", "wamid.RP2"]);
    webhook_ok(public, &m1).await;
    webhook_ok(public, &m1).await;
    let r = post_signed(public, "/webhook", b"{not json").await;
    assert_eq!(r.status, hyper::StatusCode::OK);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mid = wagate::clock::now_ms();
    tokio::time::sleep(Duration::from_millis(200)).await;
    // Second batch: app default and app second.
    webhook_ok(public, &text_webhook("106540352242922", &["wamid.RP3"])).await;
    let s = post_signed(
        public,
        "/webhook/second",
        &text_webhook("106540352242922", &["wamid.RS1", "wamid.RS2"]),
    )
    .await;
    assert_eq!(s.status, hyper::StatusCode::OK);
    let end = wagate::clock::now_ms() + 1;

    let original = events(&b, &prefix, false).await;
    assert!(original.len() >= 8, "{original:?}");

    // Into a fresh prefix: the same events.
    let fresh = format!("{prefix}fresh.");
    let (ok, out, err) = replay(&b, &prefix, &["--target-prefix", &fresh]);
    assert!(ok, "replay failed: {out}\n{err}");
    assert!(out.contains("kept raw 1"), "{out}");
    assert!(out.contains("0 not acknowledged"), "{out}");
    assert_eq!(events(&b, &fresh, true).await, original);

    // Into the live prefix: nothing new.
    let (ok, out, err) = replay(&b, &prefix, &[]);
    assert!(ok, "replay failed: {out}\n{err}");
    assert!(out.contains("produced 0 events"), "{out}");
    assert_eq!(events(&b, &prefix, false).await, original);

    // A range: the second batch only; an app: its bodies only.
    let ranged = format!("{prefix}ranged.");
    let (ok, out, err) = replay(
        &b,
        &prefix,
        &[
            "--target-prefix",
            &ranged,
            "--from-ms",
            &mid.to_string(),
            "--to-ms",
            &end.to_string(),
        ],
    );
    assert!(ok, "{out}\n{err}");
    let got: Vec<String> = events(&b, &ranged, true)
        .await
        .into_keys()
        .map(|(_, id)| id)
        .collect();
    assert_eq!(got, ["wamid.RP3", "wamid.RS1", "wamid.RS2"]);
    let by_app = format!("{prefix}app.");
    let (ok, out, err) = replay(
        &b,
        &prefix,
        &["--target-prefix", &by_app, "--app", "second"],
    );
    assert!(ok, "{out}\n{err}");
    let got: Vec<String> = events(&b, &by_app, true)
        .await
        .into_keys()
        .map(|(_, id)| id)
        .collect();
    assert_eq!(got, ["wamid.RS1", "wamid.RS2"]);
    // Contacts records only when asked: none in the fresh prefix, the
    // windows the messages opened with --contacts.
    let windows = |p: String| {
        let b = b.clone();
        async move {
            read_all(&b, &p, "windows", Duration::from_secs(2))
                .await
                .len()
        }
    };
    assert_eq!(windows(fresh.clone()).await, 0);
    let with = format!("{prefix}contacts.");
    let (ok, out, err) = replay(&b, &prefix, &["--target-prefix", &with, "--contacts"]);
    assert!(ok, "{out}\n{err}");
    assert!(!out.contains("and 0 contacts records"), "{out}");
    assert!(windows(with).await > 0);
    // A dry run writes nothing, and an unknown app is refused.
    let (ok, out, _) = replay(
        &b,
        &prefix,
        &["--target-prefix", &format!("{prefix}dry."), "--dry-run"],
    );
    assert!(ok && out.contains("(dry run)"), "{out}");
    let (ok, _, err) = replay(&b, &prefix, &["--app", "nope"]);
    assert!(!ok && err.contains("--app nope"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_whose_records_kafka_refuses_fails_and_a_second_run_completes_it() {
    use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
    let p = unique_prefix("replay-fault");
    let mock = wagate::kafka::mock::start(&p, 3).unwrap();
    let bs = mock.bootstrap_servers();
    let cfg = config(&bs, &p, &[("WAGATE_KAFKA_LINGER_MS", "0")]);
    let gw = wagate::app::Gateway::start(cfg).await.unwrap();
    assert!(gw.wait_ready(Duration::from_secs(10)).await);
    let ids: Vec<String> = (0..20).map(|i| format!("wamid.RF{i}")).collect();
    for chunk in ids.chunks(4) {
        let refs: Vec<&str> = chunk.iter().map(String::as_str).collect();
        webhook_ok(gw.public_addr, &text_webhook("109876543210987", &refs)).await;
    }

    // Produce requests fail for longer than the replay's message timeout
    // (a request a retry, backing off up to a second).
    let rcfg = config(
        &bs,
        &p,
        &[
            ("WAGATE_KAFKA_MESSAGE_TIMEOUT_MS", "1500"),
            ("WAGATE_KAFKA_LINGER_MS", "0"),
        ],
    );
    let opts = wagate::replay::ReplayOptions {
        target_prefix: Some(format!("{p}again.")),
        ..Default::default()
    };
    // The target's topics first (the mock does not answer CreateTopics;
    // replay creates only missing ones), then the errors.
    let target = wagate::kafka::Topics::new(&format!("{p}again."));
    for t in wagate::kafka::TopicId::ALL {
        mock.create_topic(target.name(t), 3, 1).unwrap();
    }
    // A dry run first: it would produce every event, and writes nothing.
    let dry = wagate::replay::ReplayOptions {
        dry_run: true,
        ..opts.clone()
    };
    let pre = wagate::replay::run(&rcfg, &dry, |_| {}).await.unwrap();
    assert!(pre.line().contains("produced 20 events"), "{}", pre.line());
    mock.request_errors(
        RDKafkaApiKey::Produce,
        &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_NOT_ENOUGH_REPLICAS; 12],
    );
    let s = wagate::replay::run(&rcfg, &opts, |_| {}).await.unwrap();
    assert!(s.failed() > 0, "{}", s.line());
    // What is left of the injected errors is used up by the runs below.
    let mut again = wagate::replay::run(&rcfg, &opts, |_| {}).await.unwrap();
    for _ in 0..10 {
        if again.failed() == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
        again = wagate::replay::run(&rcfg, &opts, |_| {}).await.unwrap();
        eprintln!("again: {}", again.line());
    }
    assert_eq!(again.failed(), 0, "{}", again.line());
    let recs = read_all(
        &bs,
        &format!("{p}again."),
        "inbound.messages",
        Duration::from_secs(2),
    )
    .await;
    let mut got = event_ids(&recs);
    got.sort();
    let mut want = ids.clone();
    want.sort();
    assert_eq!(got, want, "each event once after the second run");
    gw.shutdown().await;
}
