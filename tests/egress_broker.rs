//! Egress against a real broker (Tansu) and the Graph API sandbox on loopback.

mod common;

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use common::*;
use hyper::StatusCode;
use serde_json::{json, Value};
use wagate::sandbox::FixedError;

/// These tests measure timing (throughput windows): run them one at a time
/// so they do not compete for the two cores.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Like [`produce_requests`], one record per batch: Tansu 0.6 answers a fetch
/// from an offset inside a record batch with nothing, so a consumer group
/// that hands a partition over at a mid-batch committed offset stalls there
/// (Kafka returns the batch and the client skips). Tests of hand-overs
/// while requests are in progress write one record per batch.
async fn produce_requests_unbatched(brokers: &str, prefix: &str, reqs: &[Value]) {
    use rdkafka::producer::{FutureProducer, FutureRecord};
    let p: FutureProducer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("partitioner", "murmur2_random")
        .set("batch.num.messages", "1")
        .set("linger.ms", "0")
        .create()
        .unwrap();
    let topic = format!("{prefix}outbound.requests");
    for r in reqs {
        let key = r["phone_number_id"].as_str().unwrap_or("").to_string();
        let payload = serde_json::to_vec(r).unwrap();
        p.send(
            FutureRecord::to(&topic).key(&key).payload(&payload),
            Duration::from_secs(10),
        )
        .await
        .unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_send_is_accepted_and_status_webhooks_come_back() {
    let _serial = SERIAL.lock().await;
    let b = brokers();
    let p = unique_prefix("eg-api");
    // The sandbox posts status webhooks to the gateway's public port.
    let port = free_port();
    let sb = sandbox(|c| {
        c.status_webhook = Some(wagate::sandbox::StatusWebhookConfig {
            url: format!("http://127.0.0.1:{port}/webhook"),
            app_secret: SECRET.into(),
            statuses: vec!["sent".into(), "delivered".into()],
            delay: Duration::from_millis(20),
        });
    })
    .await;
    let listen = format!("127.0.0.1:{port}");
    let gw = start_on(&b, &p, &sb, &[("WAGATE_LISTEN", &listen)]).await;
    let internal = gw.internal_addr;
    let body = serde_json::to_vec(&template("api-1", "109876543210987", "+14155550123")).unwrap();
    let post = |token: &str, body: Vec<u8>| {
        let req = hyper::Request::post(format!("http://{internal}/v1/messages"))
            .header("authorization", format!("Bearer {token}"))
            .header("content-type", "application/json")
            .body(http_body_util::Full::new(bytes::Bytes::from(body)))
            .unwrap();
        request(req)
    };
    assert_eq!(
        post("wrong", body.clone()).await.status,
        StatusCode::UNAUTHORIZED
    );
    let bad = post("test-api-token", b"{\"v\":1}".to_vec()).await;
    assert_eq!(bad.status, StatusCode::BAD_REQUEST);
    assert!(String::from_utf8_lossy(&bad.body).contains("invalid_request"));
    let ok = post("test-api-token", body).await;
    assert_eq!(ok.status, StatusCode::ACCEPTED);
    let v: Value = serde_json::from_slice(&ok.body).unwrap();
    assert_eq!(v["request_id"], "api-1");

    let by = results(&b, &p, 1, Duration::from_secs(30)).await;
    let r = one(&by, "api-1");
    assert_eq!(r["outcome"], "accepted", "{r}");
    assert!(r["wamid"].as_str().unwrap().starts_with("wamid."));
    assert_eq!(r["message_status"], "accepted");
    assert_eq!(r["attempts"], 1);
    let sends = sb.sends();
    assert_eq!(sends.len(), 1);
    assert_eq!(sends[0].biz_opaque_callback_data.as_deref(), Some("api-1"));
    assert_eq!(sends[0].body["messaging_product"], "whatsapp");
    assert_eq!(sends[0].body["to"], "+14155550123");

    // The sandbox's signed status webhooks land on wa.inbound.statuses with the request id.
    let end = Instant::now() + Duration::from_secs(20);
    loop {
        let sts = read_all(&b, &p, "inbound.statuses", Duration::from_millis(800)).await;
        let mine: Vec<_> = sts
            .iter()
            .filter(|s| s.value["request_id"] == "api-1")
            .collect();
        if mine.len() >= 2 {
            assert!(mine.iter().any(|s| s.value["status"] == "sent"));
            assert!(mine.iter().any(|s| s.value["status"] == "delivered"));
            break;
        }
        assert!(Instant::now() < end, "status webhooks did not arrive");
    }
    gw.shutdown().await;
    sb.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_result_per_request_for_every_action_class() {
    let _serial = SERIAL.lock().await;
    let b = brokers();
    let p = unique_prefix("eg-actions");
    let fixed = |n: &str, code: i64| FixedError {
        phone_number_id: Some(n.into()),
        to: None,
        code,
    };
    let sb = sandbox(|c| {
        c.fixed_errors = vec![
            fixed("100000000000001", 131000), // retry, then fail
            fixed("100000000000002", 131026), // fail
            fixed("100000000000003", 131049), // defer to DLQ
            fixed("100000000000004", 190),    // circuit
            fixed("100000000000005", 130429), // hold the lane
            fixed("100000000000008", 131050), // fail, marketing stopped
        ];
    })
    .await;
    let gw = start_on(
        &b,
        &p,
        &sb,
        &[
            ("WAGATE_EGRESS_MAX_ATTEMPTS", "3"),
            ("WAGATE_EGRESS_CIRCUIT_HOLD_MAX_MS", "1500"),
            // The 131050 case sends marketing to a user of unknown consent.
            ("WAGATE_EGRESS_MARKETING_REQUIRES_OPT_IN", "false"),
        ],
    )
    .await;
    let now = wagate::clock::now_ms();
    let mut reqs = vec![
        template("retry", "100000000000001", "+14155550001"),
        template("fail", "100000000000002", "+14155550002"),
        template("defer", "100000000000003", "+14155550003"),
        template("circuit", "100000000000004", "+14155550004"),
        {
            let mut r = template("held", "100000000000005", "+14155550005");
            r["expires_at_ms"] = (now + 10_000).into();
            r
        },
        {
            let mut r = template("expired", "100000000000006", "+14155550006");
            r["expires_at_ms"] = (now - 1).into();
            r
        },
        json!({"v":1,"request_id":"invalid","phone_number_id":"100000000000006","to":"5511","category":"service","message":{"type":"text","text":{"body":"x"}}}),
        json!({"v":1,"request_id":"free-form","phone_number_id":"100000000000006","to":"+14155550007","category":"service","message":{"type":"text","text":{"body":"x"}}}),
    ];
    reqs.push({
        let mut r = template("mkt-stopped", "100000000000008", "+14155550008");
        r["category"] = "marketing".into();
        r
    });
    // Other numbers finish while number 5 is held.
    for i in 0..5 {
        reqs.push(template(
            &format!("ok{i}"),
            "100000000000007",
            &format!("+1415555010{i}"),
        ));
    }
    produce_requests(&b, &p, &reqs).await;
    let by = results(&b, &p, reqs.len(), Duration::from_secs(60)).await;

    let retry = one(&by, "retry");
    assert_eq!(retry["outcome"], "failed");
    assert_eq!(retry["error"]["code"], 131000);
    assert_eq!(retry["attempts"], 3, "retried up to max_attempts");
    let fail = one(&by, "fail");
    assert_eq!(
        (fail["outcome"].as_str(), fail["attempts"].as_u64()),
        (Some("failed"), Some(1))
    );
    assert_eq!(fail["error"]["source"], "meta");
    let defer = one(&by, "defer");
    assert_eq!(defer["outcome"], "failed");
    assert_eq!(defer["error"]["code"], 131049);
    let circuit = one(&by, "circuit");
    assert_eq!(circuit["outcome"], "blocked");
    assert_eq!(circuit["error"]["code"], "circuit_open");
    let held = one(&by, "held");
    assert_eq!(
        held["outcome"], "expired",
        "a held lane ends at the request's expiry: {held}"
    );
    assert_eq!(held["error"]["code"], 130429);
    let expired = one(&by, "expired");
    assert_eq!(
        (expired["outcome"].as_str(), expired["attempts"].as_u64()),
        (Some("expired"), Some(0))
    );
    let invalid = one(&by, "invalid");
    assert_eq!(invalid["outcome"], "blocked");
    assert_eq!(invalid["error"]["code"], "invalid_request");
    let ff = one(&by, "free-form");
    assert_eq!(ff["error"]["code"], "outside_window");
    for i in 0..5 {
        assert_eq!(one(&by, &format!("ok{i}"))["outcome"], "accepted");
    }
    // 131050: failed, and the pair's marketing stop is published on
    // wa.consent for every instance.
    assert_eq!(one(&by, "mkt-stopped")["error"]["code"], 131050);
    let consent = read_all(&b, &p, "consent", Duration::from_millis(800)).await;
    let stop: Vec<_> = consent
        .iter()
        .filter(|r| r.key.as_deref() == Some("100000000000008:14155550008"))
        .collect();
    assert_eq!(
        stop.len(),
        1,
        "one consent record for the 131050 pair: {consent:?}"
    );
    assert_eq!(stop[0].value["marketing"], "stopped");
    assert_eq!(stop[0].value["source"], "meta_131050");
    // Every record wagate writes carries the three headers (DESIGN §4).
    let attempts = read_all(&b, &p, "outbound.attempts", Duration::from_millis(800)).await;
    let dlq_all = read_all(&b, &p, "outbound.dlq", Duration::from_millis(800)).await;
    let results_all = read_all(&b, &p, "outbound.results", Duration::from_millis(800)).await;
    assert!(!attempts.is_empty());
    for r in stop
        .iter()
        .copied()
        .chain(&attempts)
        .chain(&dlq_all)
        .chain(&results_all)
    {
        for h in ["wagate-event-id", "wagate-kind", "wagate-app"] {
            assert!(
                r.headers
                    .get(h)
                    .is_some_and(|v| v.as_str().is_some_and(|s| !s.is_empty())),
                "{} record without {h}: {:?}",
                r.topic,
                r.headers
            );
        }
    }
    // The deferred request is on the DLQ with retry_after_ms ≥ 24 h.
    let dlq = read_all(&b, &p, "outbound.dlq", Duration::from_millis(800)).await;
    assert_eq!(dlq.len(), 1);
    assert_eq!(dlq[0].value["request"]["request_id"], "defer");
    assert!(dlq[0].value["retry_after_ms"].as_u64().unwrap() >= 24 * 3600 * 1000);
    // Nothing blocked or expired reached the sandbox.
    assert!(sb
        .sends()
        .iter()
        .all(|s| !["expired", "invalid", "free-form"]
            .contains(&s.biz_opaque_callback_data.as_deref().unwrap_or(""))));
    gw.shutdown().await;
    sb.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_number_throughput_is_never_exceeded_and_nearly_reached() {
    let _serial = SERIAL.lock().await;
    let b = brokers();
    let p = unique_prefix("eg-rate");
    // 50 numbers with different quotas (3–15 sends/s, 444/s in all),
    // 20,000 requests shared in proportion: every number is busy for the
    // same ≈45 s.
    const TOTAL: u32 = 20_000;
    let quotas: Vec<(String, u32)> = (0..50)
        .map(|i| (format!("2000000000000{i:02}"), 3 + (i * 7 % 13) as u32))
        .collect();
    let sum: u32 = quotas.iter().map(|(_, q)| q).sum();
    let mut counts: Vec<u32> = quotas.iter().map(|(_, q)| q * TOTAL / sum).collect();
    let short = TOTAL - counts.iter().sum::<u32>();
    for c in counts.iter_mut().take(short as usize) {
        *c += 1;
    }
    let sb = sandbox(|c| c.default_throughput = 0).await;
    // Strict windows: a send counts until it completes, whatever the jitter.
    let mut env: Vec<(String, String)> = vec![
        ("WAGATE_GRAPH_BASE_URL".into(), sb.base_url()),
        ("WAGATE_EGRESS_ARRIVAL_MARGIN_MS".into(), "0".into()),
    ];
    // Per-number quotas through a config file.
    let dir = tempfile::tempdir().unwrap();
    let mut toml = wagate::config::EXAMPLE_TOML.to_string();
    for (n, q) in &quotas {
        toml.push_str(&format!("\n[egress.numbers.\"{n}\"]\nthroughput = {q}\n"));
    }
    let file = dir.path().join("wagate.toml");
    std::fs::write(&file, toml).unwrap();
    let mut e = common::env();
    e.insert("WAGATE_KAFKA_BROKERS".into(), b.clone());
    e.insert("WAGATE_TOPIC_PREFIX".into(), p.clone());
    e.insert("WAGATE_LISTEN".into(), "127.0.0.1:0".into());
    e.insert("WAGATE_INTERNAL_LISTEN".into(), "127.0.0.1:0".into());
    for (k, v) in env.drain(..) {
        e.insert(k, v);
    }
    let cfg = wagate::config::load(Some(&file), &e, Default::default()).unwrap();
    create_topics(&cfg.kafka).await;
    let mut reqs = Vec::new();
    for ((n, _), count) in quotas.iter().zip(&counts) {
        for i in 0..*count {
            reqs.push(template(&format!("{n}-{i}"), n, &format!("+1415{:07}", i)));
        }
    }
    produce_requests(&b, &p, &reqs).await;
    let gw = wagate::app::Gateway::start(cfg).await.unwrap();
    assert_eq!(reqs.len(), TOTAL as usize);
    let by = results(&b, &p, reqs.len(), Duration::from_secs(180)).await;
    assert_eq!(by.len(), reqs.len());
    assert!(by
        .values()
        .all(|v| v.len() == 1 && v[0]["outcome"] == "accepted"));

    let sends = sb.sends();
    let mut worst = f64::MAX;
    for ((n, q), count) in quotas.iter().zip(&counts) {
        let mut t: Vec<Instant> = sends
            .iter()
            .filter(|s| &s.phone_number_id == n)
            .map(|s| s.arrived_at)
            .collect();
        t.sort();
        assert_eq!(t.len() as u32, *count);
        // No 1-second window holds more than the quota.
        let mut j = 0;
        for i in 0..t.len() {
            while t[i] - t[j] >= Duration::from_secs(1) {
                j += 1;
            }
            assert!(
                (i - j + 1) as u32 <= *q,
                "number {n}: {} sends in one second, quota {q}",
                i - j + 1
            );
        }
        // And it is nearly reached: over the whole run (first to last send)
        // within 5 % of the quota, and so is the median full second.
        let secs = ((t[t.len() - 1] - t[0]).as_secs_f64()).floor() as usize;
        let mut per_sec = vec![0u32; secs];
        for x in &t {
            let k = (*x - t[0]).as_secs() as usize;
            if k < secs {
                per_sec[k] += 1;
            }
        }
        per_sec.sort();
        let median = per_sec[per_sec.len() / 2];
        let span = (t[t.len() - 1] - t[0]).as_secs_f64();
        let rate = (t.len() - 1) as f64 / span;
        let gaps: Vec<u128> = t.windows(2).map(|w| (w[1] - w[0]).as_millis()).collect();
        let max_gap = gaps.iter().max().copied().unwrap_or(0);
        worst = worst.min(rate / *q as f64);
        assert!(
            median as f64 >= 0.95 * *q as f64 && rate >= 0.95 * *q as f64,
            "number {n}: median {median}/s, overall {rate:.2}/s for quota {q} (longest gap {max_gap} ms)"
        );
    }
    println!(
        "throughput: {} requests, {} numbers, quotas sum {sum}/s: no 1 s window over quota; worst number at {worst:.3} of its quota (first → last send)",
        reqs.len(),
        quotas.len()
    );
    gw.shutdown().await;
    sb.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn free_form_reply_is_sent_inside_the_window_opened_by_an_inbound_message() {
    let _serial = SERIAL.lock().await;
    let b = brokers();
    let p = unique_prefix("eg-window");
    let sb = sandbox(|_| {}).await;
    let gw = start_on(&b, &p, &sb, &[]).await;
    let text = |id: &str, to: &str| {
        json!({"v":1,"request_id":id,"phone_number_id":"109876543210987","to":to,"category":"service",
               "message":{"type":"text","text":{"body":"thanks, on its way"}}})
    };
    // The user writes first: the webhook opens the 24-hour window.
    let mut inbound = text_webhook("109876543210987", &["wamid.WINDOW1"]);
    // text_webhook's sender is 14155550123, with a current timestamp.
    let now_s = wagate::clock::now_ms() / 1000;
    inbound = String::from_utf8(inbound)
        .unwrap()
        .replace("1781600500", &now_s.to_string())
        .into_bytes();
    webhook_ok(gw.public_addr, &inbound).await;
    produce_requests(
        &b,
        &p,
        &[text("reply", "+14155550123"), text("cold", "+14155550999")],
    )
    .await;
    let by = results(&b, &p, 2, Duration::from_secs(30)).await;
    assert_eq!(
        one(&by, "reply")["outcome"],
        "accepted",
        "{:?}",
        by.get("reply")
    );
    let cold = one(&by, "cold");
    assert_eq!(cold["outcome"], "blocked");
    assert_eq!(cold["error"]["code"], "outside_window");
    assert_eq!(sb.sends().len(), 1);
    gw.shutdown().await;
    sb.shutdown().await;
}

/// A gateway calling the sandbox under its own API version, so the
/// sandbox's log tells which instance sent what.
async fn start_as(b: &str, p: &str, base: &str, version: &str) -> wagate::app::Gateway {
    start(
        b,
        p,
        &[
            ("WAGATE_GRAPH_BASE_URL", &format!("{base}/{version}")),
            ("WAGATE_DEFAULT_THROUGHPUT", "20"),
        ],
    )
    .await
}

/// From the sandbox's log: every request reached it exactly once, and each
/// number was sent by one instance at a time (at most one switch). Returns
/// the API versions (instances) that sent anything.
fn assert_sent_once_one_instance_at_a_time(
    sends: &[wagate::sandbox::RecordedSend],
    numbers: &[String],
    total: Option<usize>,
) -> HashSet<String> {
    let mut per_id: HashMap<String, usize> = HashMap::new();
    for s in sends {
        *per_id
            .entry(s.biz_opaque_callback_data.clone().unwrap())
            .or_default() += 1;
    }
    let twice: Vec<_> = per_id.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "sent more than once: {twice:?}");
    if let Some(total) = total {
        assert_eq!(per_id.len(), total, "every request reached the sandbox");
    }
    for n in numbers {
        let mine: Vec<&wagate::sandbox::RecordedSend> =
            sends.iter().filter(|s| &s.phone_number_id == n).collect();
        let switches = mine
            .windows(2)
            .filter(|w| w[0].api_version != w[1].api_version)
            .count();
        assert!(
            switches <= 1,
            "number {n}: {switches} switches between instances"
        );
    }
    sends.iter().map(|s| s.api_version.clone()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_share_the_numbers_and_one_takes_over_when_the_other_stops() {
    let _serial = SERIAL.lock().await;
    let b = brokers();
    let p = unique_prefix("eg-two");
    // Each instance calls the sandbox under its own API version, so the
    // sandbox's log tells which instance sent what.
    let sb = sandbox(|c| c.default_throughput = 0).await;
    let base = format!("http://{}", sb.addr());
    let a = start_as(&b, &p, &base, "v23.0").await;
    let bb = start_as(&b, &p, &base, "v22.0").await;
    // Let both join the group before the work arrives.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let numbers: Vec<String> = (0..6).map(|i| format!("40000000000000{i}")).collect();
    let mut reqs = Vec::new();
    for n in &numbers {
        for i in 0..60 {
            reqs.push(template(&format!("{n}-{i}"), n, &format!("+1415{i:07}")));
        }
    }
    produce_requests_unbatched(&b, &p, &reqs).await;
    // 60 requests per number at 20/s: about 3 s of work; stop A midway.
    let end = Instant::now() + Duration::from_secs(30);
    while sb.sends().len() < reqs.len() / 3 {
        assert!(Instant::now() < end, "no progress");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    a.shutdown().await;
    let by = results(&b, &p, reqs.len(), Duration::from_secs(90)).await;
    assert_eq!(
        by.len(),
        reqs.len(),
        "every request has a result after the takeover"
    );
    for (id, rs) in &by {
        assert_eq!(rs.len(), 1, "{id}: {} results", rs.len());
        assert!(
            ["accepted", "unknown"].contains(&rs[0]["outcome"].as_str().unwrap()),
            "{id}: {}",
            rs[0]
        );
    }
    // `unknown` requests (in flight when A stopped) may not have reached it.
    let senders = assert_sent_once_one_instance_at_a_time(&sb.sends(), &numbers, None);
    let used_b = senders.contains("v22.0");
    assert!(used_b, "the second instance never sent anything");
    bb.shutdown().await;
    sb.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_and_user_preferences_webhooks_are_enforced_for_later_sends() {
    let _serial = SERIAL.lock().await;
    let b = brokers();
    let p = unique_prefix("eg-stop");
    let sb = sandbox(|_| {}).await;
    let gw = start_on(
        &b,
        &p,
        &sb,
        &[("WAGATE_EGRESS_MARKETING_REQUIRES_OPT_IN", "false")],
    )
    .await;
    let number = "109876543210987";
    let says = |id: &str, text: &str| {
        let v = json!({"object":"whatsapp_business_account","entry":[{"id":"1","changes":[{"field":"messages","value":{
            "messaging_product":"whatsapp","metadata":{"display_phone_number":"1","phone_number_id":number},
            "contacts":[{"profile":{"name":"Ana"},"wa_id":"14155550123"}],
            "messages":[{"from":"14155550123","id":id,"timestamp":"1781600500","type":"text","text":{"body":text}}]}}]}]});
        serde_json::to_vec(&v).unwrap()
    };
    let prefs = |value: &str| {
        let v = json!({"object":"whatsapp_business_account","entry":[{"id":"1","changes":[{"field":"user_preferences","value":{
            "messaging_product":"whatsapp","metadata":{"display_phone_number":"1","phone_number_id":number},
            "user_preferences":[{"wa_id":"14155550124","detail":"x","category":"marketing_messages","value":value,"timestamp":1781600000}]}}]}]});
        serde_json::to_vec(&v).unwrap()
    };
    let tpl = |id: &str, to: &str, category: &str| {
        json!({"v":1,"request_id":id,"phone_number_id":number,"to":to,"category":category,
               "message":{"type":"template","template":{"name":"promo","language":{"code":"en"}}}})
    };
    // STOP (user 0123), then a send consumed after the webhook's 200.
    webhook_ok(gw.public_addr, &says("wamid.S1", " Stop! ")).await;
    // Marketing stop from Meta's user_preferences (user 0124).
    webhook_ok(gw.public_addr, &prefs("stop")).await;
    produce_requests(
        &b,
        &p,
        &[
            tpl("after-stop", "+14155550123", "utility"),
            tpl("mkt-stopped", "+14155550124", "marketing"),
            tpl("utility-ok", "+14155550124", "utility"),
        ],
    )
    .await;
    let by = results(&b, &p, 3, Duration::from_secs(30)).await;
    assert_eq!(one(&by, "after-stop")["error"]["code"], "opted_out");
    assert_eq!(
        one(&by, "mkt-stopped")["error"]["code"],
        "marketing_stopped"
    );
    assert_eq!(one(&by, "utility-ok")["outcome"], "accepted");
    // START and resume: allowed again.
    webhook_ok(gw.public_addr, &says("wamid.S2", "START")).await;
    webhook_ok(gw.public_addr, &prefs("resume")).await;
    produce_requests(
        &b,
        &p,
        &[
            tpl("after-start", "+14155550123", "utility"),
            tpl("mkt-resumed", "+14155550124", "marketing"),
        ],
    )
    .await;
    let by = results(&b, &p, 5, Duration::from_secs(30)).await;
    assert_eq!(one(&by, "after-start")["outcome"], "accepted");
    assert_eq!(one(&by, "mkt-resumed")["outcome"], "accepted");
    // A sentence that merely contains "stop" changes nothing.
    assert_eq!(
        post_signed(
            gw.public_addr,
            "/webhook",
            &says("wamid.S3", "please don't stop the delivery")
        )
        .await
        .status,
        StatusCode::OK
    );
    produce_requests(&b, &p, &[tpl("sentence", "+14155550123", "utility")]).await;
    let by = results(&b, &p, 6, Duration::from_secs(30)).await;
    assert_eq!(one(&by, "sentence")["outcome"], "accepted");
    gw.shutdown().await;
    sb.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_joining_mid_drain_takes_over_partitions_without_double_sends() {
    let _serial = SERIAL.lock().await;
    let b = brokers();
    let p = unique_prefix("eg-join");
    let sb = sandbox(|c| c.default_throughput = 0).await;
    let base = format!("http://{}", sb.addr());
    let a = start_as(&b, &p, &base, "v23.0").await;
    let numbers: Vec<String> = (0..6).map(|i| format!("41000000000000{i}")).collect();
    let mut reqs = Vec::new();
    for n in &numbers {
        for i in 0..100 {
            reqs.push(template(&format!("{n}-{i}"), n, &format!("+1416{i:07}")));
        }
    }
    produce_requests_unbatched(&b, &p, &reqs).await;
    // A holds every partition's backlog (100 per number at 20/s: ~5 s of
    // work); B joins a quarter of the way through, forcing a rebalance
    // while A's lanes are full.
    let end = Instant::now() + Duration::from_secs(30);
    while sb.sends().len() < reqs.len() / 4 {
        assert!(Instant::now() < end, "no progress");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let bb = start_as(&b, &p, &base, "v22.0").await;
    let by = results(&b, &p, reqs.len(), Duration::from_secs(90)).await;
    assert_eq!(by.len(), reqs.len(), "every request has a result");
    for (id, rs) in &by {
        assert_eq!(rs.len(), 1, "{id}: {} results: {rs:?}", rs.len());
        assert_eq!(rs[0]["outcome"], "accepted", "{id}: {}", rs[0]);
    }
    // Per number: A's sends, then (for the numbers that moved) B's; never
    // both at once.
    assert_sent_once_one_instance_at_a_time(&sb.sends(), &numbers, Some(reqs.len()));
    a.shutdown().await;
    bb.shutdown().await;
    sb.shutdown().await;
}

/// A gateway whose config file puts two numbers in one portfolio with a
/// messaging tier of `limit` users per 24 h.
async fn start_with_portfolio(b: &str, p: &str, graph: &str, limit: u32) -> wagate::app::Gateway {
    let dir = tempfile::tempdir().unwrap();
    let toml = format!(
        "{}\n[egress.portfolios.acme]\nlimit = {limit}\nnumbers = [\"420000000000001\", \"420000000000002\"]\n",
        wagate::config::EXAMPLE_TOML
    );
    let file = dir.path().join("wagate.toml");
    std::fs::write(&file, toml).unwrap();
    let mut e = common::env();
    for (k, v) in [
        ("WAGATE_KAFKA_BROKERS", b),
        ("WAGATE_TOPIC_PREFIX", p),
        ("WAGATE_LISTEN", "127.0.0.1:0"),
        ("WAGATE_INTERNAL_LISTEN", "127.0.0.1:0"),
        ("WAGATE_KAFKA_PARTITIONS", "3"),
        ("WAGATE_EGRESS_GROUP_ID", &format!("{p}egress")),
        ("WAGATE_GRAPH_BASE_URL", graph),
    ] {
        e.insert(k.into(), v.into());
    }
    let cfg = wagate::config::load(Some(&file), &e, Default::default()).unwrap();
    create_topics(&cfg.kafka).await;
    let gw = wagate::app::Gateway::start(cfg).await.unwrap();
    assert!(gw.wait_ready(Duration::from_secs(20)).await);
    gw
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_portfolio_messaging_tier_blocks_new_users_and_survives_a_restart() {
    let _serial = SERIAL.lock().await;
    let b = brokers();
    let p = unique_prefix("eg-tier");
    let sb = sandbox(|c| {
        c.fixed_errors = vec![FixedError {
            phone_number_id: None,
            to: Some("+14170000009".into()),
            code: 131026,
        }];
    })
    .await;
    let gw = start_with_portfolio(&b, &p, &sb.base_url(), 2).await;
    let (n1, n2) = ("420000000000001", "420000000000002");
    // A user inside their window does not count: they wrote first.
    let now_s = wagate::clock::now_ms() / 1000;
    let inbound = String::from_utf8(text_webhook(n1, &["wamid.TIER-IN"]))
        .unwrap()
        .replace("1781600500", &now_s.to_string());
    webhook_ok(gw.public_addr, inbound.as_bytes()).await;
    // One at a time, in this order (results are waited for in between).
    let steps = [
        ("u1", n1, "+14170000001", "accepted"),
        ("refused", n1, "+14170000009", "failed"), // Meta refuses: place given back
        ("u2", n2, "+14170000002", "accepted"),    // the other number, same portfolio
        ("u1-again", n2, "+14170000001", "accepted"), // already counted
        ("u3", n1, "+14170000003", "blocked"),     // a third user: tier used up
        ("in-window", n1, "+14155550123", "accepted"), // inside the window: not counted
    ];
    for (i, (id, n, to, outcome)) in steps.iter().enumerate() {
        produce_requests(&b, &p, &[template(id, n, to)]).await;
        let by = results(&b, &p, i + 1, Duration::from_secs(30)).await;
        let r = one(&by, id);
        assert_eq!(r["outcome"], *outcome, "{id}: {r}");
        if *outcome == "blocked" {
            assert_eq!(r["error"]["code"], "tier_limit", "{r}");
        }
    }
    gw.shutdown().await;
    // A new instance rebuilds the count from the results: still full.
    let gw = start_with_portfolio(&b, &p, &sb.base_url(), 2).await;
    produce_requests(
        &b,
        &p,
        &[
            template("u4", n2, "+14170000004"),
            template("u2-again", n2, "+14170000002"),
        ],
    )
    .await;
    let by = results(&b, &p, steps.len() + 2, Duration::from_secs(30)).await;
    assert_eq!(
        one(&by, "u4")["error"]["code"],
        "tier_limit",
        "{:?}",
        by.get("u4")
    );
    assert_eq!(one(&by, "u2-again")["outcome"], "accepted");
    // Nothing blocked reached Meta.
    assert!(sb
        .sends()
        .iter()
        .all(|s| !["u3", "u4"].contains(&s.biz_opaque_callback_data.as_deref().unwrap_or(""))));
    gw.shutdown().await;
    sb.shutdown().await;
}

/// `wagate dlq redrive` as an operator runs it (the binary, on the same
/// broker): requests deferred to the DLQ by 131049 are redriven once, sent,
/// and get their own second result; a second run redrives nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deferred_requests_are_redriven_once_by_the_cli_and_then_sent() {
    let _serial = SERIAL.lock().await;
    let b = brokers();
    let p = unique_prefix("eg-redrive");
    let number = "100000000000033";
    let sb = sandbox(|c| {
        c.fixed_errors = vec![FixedError {
            phone_number_id: Some(number.into()),
            to: None,
            code: 131049,
        }];
    })
    .await;
    let gw = start_on(&b, &p, &sb, &[]).await;
    produce_requests(
        &b,
        &p,
        &[
            template("dl1", number, "+14155550301"),
            template("dl2", number, "+14155550302"),
        ],
    )
    .await;
    let by = results(&b, &p, 2, Duration::from_secs(30)).await;
    for id in ["dl1", "dl2"] {
        let r = one(&by, id);
        assert_eq!(
            (r["outcome"].as_str(), r["error"]["code"].as_i64()),
            (Some("failed"), Some(131049)),
            "{r}"
        );
    }
    let dlq = read_all(&b, &p, "outbound.dlq", Duration::from_millis(1500)).await;
    assert_eq!(dlq.len(), 2, "two deferred requests on the DLQ");
    assert!(dlq
        .iter()
        .all(|r| r.value["retry_after_ms"].as_u64().unwrap_or(0) >= 3_600_000));
    // Meta accepts this number again.
    sb.set_fixed_errors(Vec::new());

    let cli = |args: &[&str]| {
        let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_wagate"));
        c.env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("WAGATE_KAFKA_BROKERS", &b)
            .env("WAGATE_TOPIC_PREFIX", &p);
        for (k, v) in common::env() {
            c.env(k, v);
        }
        let out = c.arg("dlq").arg("redrive").args(args).output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "wagate dlq redrive {args:?}: {} {}",
            text,
            String::from_utf8_lossy(&out.stderr)
        );
        text
    };
    // Not ready yet (131049 defers for hours): nothing matches.
    assert!(cli(&["--ready"]).contains("matched 0 redriven 0"));
    // A dry run counts and changes nothing.
    assert!(cli(&["--code", "131049", "--max", "1", "--dry-run"]).contains("matched 1 redriven 0"));
    assert!(cli(&["--code", "131050"]).contains("matched 0 redriven 0"));
    assert!(cli(&["--code", "131049"]).contains("matched 2 redriven 2"));
    // Each request gets a second result, accepted, marked as the redrive.
    let end = Instant::now() + Duration::from_secs(30);
    let by = loop {
        let by = results(&b, &p, 2, Duration::from_secs(5)).await;
        if by.values().map(Vec::len).sum::<usize>() >= 4 || Instant::now() > end {
            break by;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    for id in ["dl1", "dl2"] {
        let rs = &by[id];
        assert_eq!(rs.len(), 2, "{id}: {rs:?}");
        let second = rs.iter().find(|r| r["redrive"] == 1).expect("redrive 1");
        assert_eq!(second["outcome"], "accepted", "{second}");
        assert!(second["wamid"].as_str().is_some());
    }
    assert_eq!(sb.sends().len(), 2, "each sent once after the redrive");
    // A second run finds them already redriven.
    assert!(cli(&["--code", "131049"]).contains("matched 0 redriven 0"));
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(sb.sends().len(), 2);
    gw.shutdown().await;
    sb.shutdown().await;
}

/// Lanes: a number Meta throttles (130429) and a pair it rate-limits
/// (131056) hold only themselves. The other numbers — some on the same
/// partition as the throttled one — and the pair's number's other users
/// are all sent within a few seconds, while the held requests wait until
/// they expire.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_throttled_number_or_pair_holds_only_itself() {
    let _serial = SERIAL.lock().await;
    let b = brokers();
    let p = unique_prefix("eg-lanes");
    let throttled = "100000000000050";
    let paired = "100000000000051";
    let free: Vec<String> = (52..60).map(|i| format!("1000000000000{i}")).collect();
    let sb = sandbox(|c| {
        c.fixed_errors = vec![
            FixedError {
                phone_number_id: Some(throttled.into()),
                to: None,
                code: 130429,
            },
            FixedError {
                phone_number_id: Some(paired.into()),
                to: Some("+14155550500".into()),
                code: 131056,
            },
        ];
    })
    .await;
    let gw = start_on(&b, &p, &sb, &[]).await;
    let expires = wagate::clock::now_ms() + 12_000;
    let held = |id: String, number: &str, to: &str| {
        let mut r = template(&id, number, to);
        r["expires_at_ms"] = expires.into();
        r
    };
    // Interleaved as an upstream app would write them: the held requests
    // come first in every partition they share.
    let mut reqs = Vec::new();
    for i in 0..5 {
        reqs.push(held(
            format!("thr{i}"),
            throttled,
            &format!("+1415555040{i}"),
        ));
        reqs.push(held(format!("pair{i}"), paired, "+14155550500"));
    }
    for i in 0..5 {
        reqs.push(template(
            &format!("other{i}"),
            paired,
            &format!("+1415555060{i}"),
        ));
    }
    for n in &free {
        for i in 0..20 {
            reqs.push(template(
                &format!("{n}-{i}"),
                n,
                &format!("+14155507{i:03}"),
            ));
        }
    }
    let t0 = Instant::now();
    produce_requests(&b, &p, &reqs).await;
    // The throttled number shares a partition with some free numbers.
    let on_topic = read_all(&b, &p, "outbound.requests", Duration::from_millis(1500)).await;
    let part_of = |n: &str| {
        on_topic
            .iter()
            .find(|r| r.key.as_deref() == Some(n))
            .map(|r| r.partition)
            .unwrap()
    };
    let shared: Vec<&String> = free
        .iter()
        .filter(|n| part_of(n) == part_of(throttled))
        .collect();
    assert!(
        !shared.is_empty(),
        "no free number on the throttled number's partition"
    );

    // Every free request and the paired number's other users: sent, soon.
    let want: HashSet<String> = free
        .iter()
        .flat_map(|n| (0..20).map(move |i| format!("{n}-{i}")))
        .chain((0..5).map(|i| format!("other{i}")))
        .collect();
    let end = Instant::now() + Duration::from_secs(30);
    loop {
        let sent: HashSet<String> = sb
            .sends()
            .iter()
            .filter_map(|s| s.biz_opaque_callback_data.clone())
            .collect();
        if want.is_subset(&sent) {
            break;
        }
        assert!(
            Instant::now() < end,
            "{} of {} free requests sent",
            want.intersection(&sent).count(),
            want.len()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let free_done = t0.elapsed();
    // While the held ones are still held (they expire 12 s after start).
    assert!(
        free_done < Duration::from_secs(10),
        "free requests took {free_done:?}: the held lane/pair delayed them"
    );
    let by = results(&b, &p, reqs.len(), Duration::from_secs(40)).await;
    for i in 0..5 {
        let thr = one(&by, &format!("thr{i}"));
        assert_eq!(thr["outcome"], "expired", "{thr}");
        assert_eq!(thr["error"]["code"], 130429, "{thr}");
        let pair = one(&by, &format!("pair{i}"));
        assert_eq!(pair["outcome"], "expired", "{pair}");
        assert_eq!(one(&by, &format!("other{i}"))["outcome"], "accepted");
    }
    for id in &want {
        assert_eq!(one(&by, id)["outcome"], "accepted", "{id}");
    }
    gw.shutdown().await;
    sb.shutdown().await;
}
