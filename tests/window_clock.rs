//! The 24-hour customer service window on a fake clock, end to end: a real
//! broker (Tansu), the gateway and the Graph API sandbox on loopback.
//!
//! An inbound message opens the window; a free-form reply is sent just
//! before it closes and blocked (`outside_window`) just after, while a
//! template to the same user is still sent. The clock is moved with
//! `wagate::clock::advance`, which is process-wide: this file is its own
//! test binary and holds one test, so no other test sees the moved clock.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::*;
use hyper::StatusCode;
use serde_json::{json, Value};
use wagate::sandbox::SandboxConfig;

const NUMBER: &str = "109876543210987";
const USER: &str = "14155550123";

fn text(id: &str) -> Value {
    json!({"v":1,"request_id":id,"phone_number_id":NUMBER,"to":format!("+{USER}"),"category":"service",
           "message":{"type":"text","text":{"body":"thanks, on its way"}}})
}

fn template(id: &str) -> Value {
    common::template(id, NUMBER, &format!("+{USER}"))
}

async fn produce(brokers: &str, prefix: &str, reqs: &[Value]) {
    let cfg = config(brokers, prefix, &[]);
    let p = wagate::kafka::KafkaProducer::new(&cfg.kafka).unwrap();
    let topic = format!("{prefix}outbound.requests");
    for r in reqs {
        p.send(
            &topic,
            NUMBER.as_bytes(),
            &serde_json::to_vec(r).unwrap(),
            &[],
        )
        .unwrap()
        .await
        .unwrap();
    }
}

/// Waits for a result of each of `ids`; returns every result per id.
async fn results_for(brokers: &str, prefix: &str, ids: &[&str]) -> HashMap<String, Vec<Value>> {
    let done = |by: &HashMap<String, Vec<Value>>| ids.iter().all(|id| by.contains_key(*id));
    let by = results_until(brokers, prefix, Duration::from_secs(30), done).await;
    assert!(done(&by), "no result yet for some of {ids:?}: {by:?}");
    by
}

fn outcome(by: &HashMap<String, Vec<Value>>, id: &str) -> (String, String) {
    let v = &by[id];
    assert_eq!(v.len(), 1, "{id}: {} results", v.len());
    (
        v[0]["outcome"].as_str().unwrap_or("").to_string(),
        v[0]["error"]["code"]
            .as_str()
            .map(str::to_string)
            .unwrap_or_default(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn free_form_is_sent_inside_the_window_and_blocked_after_24_hours_templates_still_go() {
    let b = brokers();
    let p = unique_prefix("window-clock");
    // The sandbox enforces the window too (131047), on the same clock.
    let sb = sandbox_on_own_runtime(SandboxConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        pair_rate: None,
        enforce_window: true,
        ..Default::default()
    })
    .await;
    let gw = start_on(&b, &p, &sb, &[]).await;

    // The user writes: the webhook opens the window (Meta's timestamp is
    // the message's time; tell the sandbox the same).
    let now_ms = wagate::clock::now_ms();
    let body = String::from_utf8(text_webhook(NUMBER, &["wamid.CLOCK1"]))
        .unwrap()
        .replace("1781600500", &(now_ms / 1000).to_string())
        .into_bytes();
    assert_eq!(
        post_signed(gw.public_addr, "/webhook", &body).await.status,
        StatusCode::OK
    );
    sb.record_inbound(NUMBER, USER, now_ms / 1000 * 1000);

    // Right after: free-form goes.
    produce(&b, &p, &[text("t0")]).await;
    let by = results_for(&b, &p, &["t0"]).await;
    assert_eq!(outcome(&by, "t0").0, "accepted", "{:?}", by["t0"]);

    // 23 h 58 min later: still inside.
    wagate::clock::advance(Duration::from_secs(23 * 3600 + 58 * 60));
    produce(&b, &p, &[text("t1")]).await;
    let by = results_for(&b, &p, &["t1"]).await;
    assert_eq!(outcome(&by, "t1").0, "accepted", "{:?}", by["t1"]);

    // 24 h 1 min after the message: free-form is blocked by the gateway
    // (never reaches Meta), a template to the same user still goes.
    wagate::clock::advance(Duration::from_secs(3 * 60));
    produce(&b, &p, &[text("t2"), template("tpl")]).await;
    let by = results_for(&b, &p, &["t2", "tpl"]).await;
    assert_eq!(
        outcome(&by, "t2"),
        ("blocked".to_string(), "outside_window".to_string()),
        "{:?}",
        by["t2"]
    );
    assert_eq!(outcome(&by, "tpl").0, "accepted", "{:?}", by["tpl"]);

    // The sandbox saw exactly t0, t1 and the template.
    let sends = sb.sends();
    assert_eq!(sends.len(), 3, "sends at Meta: {}", sends.len());

    // A new message from the user opens a new window at the moved clock.
    let now_ms = wagate::clock::now_ms();
    let body = String::from_utf8(text_webhook(NUMBER, &["wamid.CLOCK2"]))
        .unwrap()
        .replace("1781600500", &(now_ms / 1000).to_string())
        .into_bytes();
    assert_eq!(
        post_signed(gw.public_addr, "/webhook", &body).await.status,
        StatusCode::OK
    );
    sb.record_inbound(NUMBER, USER, now_ms / 1000 * 1000);
    produce(&b, &p, &[text("t3")]).await;
    let by = results_for(&b, &p, &["t3"]).await;
    assert_eq!(outcome(&by, "t3").0, "accepted", "{:?}", by["t3"]);

    gw.shutdown().await;
    sb.shutdown().await;
}
