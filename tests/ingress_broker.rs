//! Ingress against a real Kafka-protocol broker (Tansu, started by the
//! README's test command): real HTTP over loopback in, a real consumer out.

mod common;

use std::time::Duration;

use common::*;
use hyper::StatusCode;
use serde_json::Value;

const IDLE: Duration = Duration::from_millis(1500);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn single_message_lands_once_with_key_headers_and_raw_copy() {
    let b = brokers();
    let p = unique_prefix("single");
    let gw = start(&b, &p, &[]).await;
    let body = fixture("inbound_text.json");
    let r = post_signed(gw.public_addr, "/webhook", &body).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(&r.body[..], b"OK");

    let msgs = read_all(&b, &p, "inbound.messages", IDLE).await;
    assert_eq!(msgs.len(), 1);
    let m = &msgs[0];
    assert_eq!(m.key.as_deref(), Some("109876543210987"));
    assert_eq!(m.headers["wagate-kind"], "message");
    assert_eq!(m.headers["wagate-app"], "default");
    assert_eq!(
        m.headers["wagate-event-id"],
        "wamid.HBgLMTQxNTU1NTAxMjMVAgASGBQzRUIwQTdDMkY1RDk4QjE0NkU3NgA="
    );
    assert_eq!(m.value["v"], 1);
    assert_eq!(m.value["kind"], "message");
    assert_eq!(m.value["wa_id"], "14155550123");
    assert_eq!(m.value["profile_name"], "Ana Souza");
    assert_eq!(
        m.value["message"]["text"]["body"],
        "Olá! Is order #4471 shipped? Preço: R$ 59,90 🙂"
    );

    // The raw topic keeps the verified body byte for byte, with its signature.
    let raw = read_all(&b, &p, "inbound.raw", IDLE).await;
    assert_eq!(raw.len(), 1);
    assert_eq!(raw[0].key.as_deref(), Some("default"));
    assert_eq!(raw[0].payload.as_deref(), Some(&body[..]));
    assert_eq!(raw[0].headers["wagate-signature"], sign(&body).as_str());
    assert!(raw[0].headers["wagate-received-at-ms"]
        .as_str()
        .unwrap()
        .parse::<u64>()
        .is_ok());
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batched_multi_entry_every_event_once_right_topic_right_key() {
    let b = brokers();
    let p = unique_prefix("batch");
    let gw = start(&b, &p, &[]).await;
    let r = post_signed(
        gw.public_addr,
        "/webhook",
        &fixture("inbound_batched_multi_entry.json"),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK);
    let msgs = read_all(&b, &p, "inbound.messages", IDLE).await;
    let sts = read_all(&b, &p, "inbound.statuses", IDLE).await;
    let mut ids = event_ids(&msgs);
    ids.sort();
    assert_eq!(
        ids,
        vec![
            "wamid.HBgLMTQxNTU1NTAxMjMVAgASGBQzRUIwMDAwMDAwMDAwMDAwMDAxAA==",
            "wamid.HBgLMTQxNTU1NTAxMjMVAgASGBQzRUIwMDAwMDAwMDAwMDAwMDAyAA=="
        ]
    );
    assert!(msgs
        .iter()
        .all(|m| m.key.as_deref() == Some("109876543210987")));
    assert_eq!(sts.len(), 2);
    let by_status: std::collections::HashMap<String, &wagate::kafka::TailRecord> = sts
        .iter()
        .map(|s| (s.value["status"].as_str().unwrap().to_string(), s))
        .collect();
    assert_eq!(by_status["read"].key.as_deref(), Some("109876543210987"));
    assert_eq!(
        by_status["delivered"].key.as_deref(),
        Some("110022334455667")
    );
    assert_eq!(by_status["delivered"].value["waba_id"], "109988776655443");
    assert!(
        read_all(&b, &p, "inbound.events", Duration::from_millis(500))
            .await
            .is_empty()
    );
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn statuses_carry_rank_and_request_id() {
    let b = brokers();
    let p = unique_prefix("status");
    let gw = start(&b, &p, &[]).await;
    for f in [
        "status_sent.json",
        "status_delivered.json",
        "status_read.json",
        "status_failed_131047.json",
    ] {
        assert_eq!(
            post_signed(gw.public_addr, "/webhook", &fixture(f))
                .await
                .status,
            StatusCode::OK,
            "{f}"
        );
    }
    let sts = read_all(&b, &p, "inbound.statuses", IDLE).await;
    assert_eq!(sts.len(), 4);
    let get = |s: &str| {
        sts.iter()
            .find(|r| r.value["status"] == s)
            .unwrap_or_else(|| panic!("{s}"))
    };
    assert_eq!(get("sent").value["rank"], 1);
    assert_eq!(get("sent").value["request_id"], "job=8f2c1e7a;attempt=1");
    assert_eq!(get("delivered").value["rank"], 2);
    assert_eq!(get("read").value["rank"], 3);
    assert_eq!(get("failed").value["rank"], 9);
    assert_eq!(get("failed").value["errors"][0]["code"], 131047);
    assert!(get("failed").headers["wagate-event-id"]
        .as_str()
        .unwrap()
        .ends_with(":failed"));
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn other_fields_go_to_events_keyed_by_waba() {
    let b = brokers();
    let p = unique_prefix("other");
    let gw = start(&b, &p, &[]).await;
    for f in [
        "message_template_status_update.json",
        "phone_number_quality_update.json",
        "account_update_restriction.json",
    ] {
        assert_eq!(
            post_signed(gw.public_addr, "/webhook", &fixture(f))
                .await
                .status,
            StatusCode::OK,
            "{f}"
        );
    }
    let evs = read_all(&b, &p, "inbound.events", IDLE).await;
    let mut kinds: Vec<&str> = evs
        .iter()
        .map(|e| e.headers["wagate-kind"].as_str().unwrap())
        .collect();
    kinds.sort();
    assert_eq!(
        kinds,
        vec![
            "account_update",
            "message_template_status_update",
            "phone_number_quality_update"
        ]
    );
    assert!(evs
        .iter()
        .all(|e| e.key.as_deref() == Some("102345678901234")));
    let paused = evs
        .iter()
        .find(|e| e.value["kind"] == "message_template_status_update")
        .unwrap();
    assert_eq!(paused.value["value"]["event"], "PAUSED");
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicate_and_rebatched_deliveries_produce_no_second_record() {
    let b = brokers();
    let p = unique_prefix("dup");
    let gw = start(&b, &p, &[]).await;
    let first = text_webhook("109876543210987", &["wamid.DUP1"]);
    assert_eq!(
        post_signed(gw.public_addr, "/webhook", &first).await.status,
        StatusCode::OK
    );
    // Exactly the same delivery again.
    assert_eq!(
        post_signed(gw.public_addr, "/webhook", &first).await.status,
        StatusCode::OK
    );
    // Meta re-batches the same event with a new one.
    let rebatched = text_webhook("109876543210987", &["wamid.DUP2", "wamid.DUP1"]);
    webhook_ok(gw.public_addr, &rebatched).await;
    let msgs = read_all(&b, &p, "inbound.messages", IDLE).await;
    let mut ids = event_ids(&msgs);
    ids.sort();
    assert_eq!(ids, vec!["wamid.DUP1", "wamid.DUP2"]);
    // Every verified body is kept on the raw topic, duplicates included.
    assert_eq!(read_all(&b, &p, "inbound.raw", IDLE).await.len(), 3);
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_redeliveries_of_one_batch_land_once() {
    let b = brokers();
    let p = unique_prefix("conc");
    let gw = start(&b, &p, &[]).await;
    let ids: Vec<String> = (0..20).map(|i| format!("wamid.CONC{i}")).collect();
    let refs: Vec<&str> = ids.iter().map(|s| s.as_str()).collect();
    let body = text_webhook("109876543210987", &refs);
    let mut tasks = Vec::new();
    for _ in 0..16 {
        let body = body.clone();
        let addr = gw.public_addr;
        tasks.push(tokio::spawn(async move {
            post_signed(addr, "/webhook", &body).await.status
        }));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap(), StatusCode::OK);
    }
    let msgs = read_all(&b, &p, "inbound.messages", IDLE).await;
    let mut got = event_ids(&msgs);
    got.sort();
    let mut want = ids.clone();
    want.sort();
    assert_eq!(got, want);
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rejected_bodies_produce_nothing() {
    let b = brokers();
    let p = unique_prefix("reject");
    let gw = start(&b, &p, &[("WAGATE_SERVER_MAX_BODY_BYTES", "4096")]).await;
    let body = fixture("inbound_text.json");
    // Bad, missing and malformed signatures: 401.
    let wrong = wagate::meta::signature::sign(b"not-the-secret", &body);
    for sig in [Some(wrong.as_str()), None, Some("sha256=xyz")] {
        let r = post(gw.public_addr, "/webhook", &body, sig).await;
        assert_eq!(r.status, StatusCode::UNAUTHORIZED, "{sig:?}");
        let v: Value = serde_json::from_slice(&r.body).unwrap();
        assert!(v["error"].as_str().unwrap().starts_with("signature_"));
    }
    // Unknown app: 404.
    assert_eq!(
        post_signed(gw.public_addr, "/webhook/nosuchapp", &body)
            .await
            .status,
        StatusCode::NOT_FOUND
    );
    // Over the limit: 413 (declared length, signed or not).
    let big = text_webhook("1", &[&"x".repeat(5000)]);
    assert_eq!(
        post_signed(gw.public_addr, "/webhook", &big).await.status,
        StatusCode::PAYLOAD_TOO_LARGE
    );
    assert!(
        read_all(&b, &p, "inbound.messages", Duration::from_millis(800))
            .await
            .is_empty()
    );
    assert!(read_all(&b, &p, "inbound.raw", Duration::from_millis(800))
        .await
        .is_empty());
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signed_but_unparseable_is_kept_raw_and_acknowledged() {
    let b = brokers();
    let p = unique_prefix("unparse");
    // Raw topic off: an unparseable body is still kept there.
    let gw = start(&b, &p, &[("WAGATE_INGRESS_RAW_ENABLED", "false")]).await;
    let body = b"{\"object\":\"whatsapp_business_account\",\"entry\":[{\"id\":".to_vec();
    let r = post_signed(gw.public_addr, "/webhook", &body).await;
    assert_eq!(r.status, StatusCode::OK);
    let raw = read_all(&b, &p, "inbound.raw", IDLE).await;
    assert_eq!(raw.len(), 1);
    assert_eq!(raw[0].payload.as_deref(), Some(&body[..]));
    assert!(
        read_all(&b, &p, "inbound.messages", Duration::from_millis(500))
            .await
            .is_empty()
    );
    // A parseable body with raw off: events only.
    webhook_ok(gw.public_addr, &fixture("inbound_text.json")).await;
    assert_eq!(read_all(&b, &p, "inbound.messages", IDLE).await.len(), 1);
    assert_eq!(read_all(&b, &p, "inbound.raw", IDLE).await.len(), 1);
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handshake_health_and_metrics() {
    let b = brokers();
    let p = unique_prefix("hs");
    let gw = start(&b, &p, &[]).await;
    let base = format!("http://{}", gw.public_addr);
    let ok = get(&format!(
        "{base}/webhook?hub.mode=subscribe&hub.verify_token={VERIFY}&hub.challenge=1158201444"
    ))
    .await;
    assert_eq!(ok.status, StatusCode::OK);
    assert_eq!(&ok.body[..], b"1158201444");
    assert!(ok.headers["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/plain"));
    let odd = get(&format!("{base}/webhook/default?hub.mode=subscribe&hub.verify_token={VERIFY}&hub.challenge=a%20b%2Bc")).await;
    assert_eq!(&odd.body[..], b"a b+c");
    for bad in [
        format!("{base}/webhook?hub.mode=subscribe&hub.verify_token=wrong&hub.challenge=1"),
        format!("{base}/webhook?hub.mode=unsubscribe&hub.verify_token={VERIFY}&hub.challenge=1"),
        format!("{base}/webhook?hub.challenge=1"),
    ] {
        assert_eq!(get(&bad).await.status, StatusCode::FORBIDDEN, "{bad}");
    }
    let internal = format!("http://{}", gw.internal_addr);
    assert_eq!(
        get(&format!("{internal}/healthz")).await.status,
        StatusCode::OK
    );
    assert_eq!(
        get(&format!("{internal}/readyz")).await.status,
        StatusCode::OK
    );
    webhook_ok(gw.public_addr, &fixture("inbound_text.json")).await;
    let text = String::from_utf8(get(&format!("{internal}/metrics")).await.body.to_vec()).unwrap();
    for name in [
        "wagate_webhook_requests_total",
        "wagate_webhook_events_total",
        "wagate_webhook_ack_seconds_bucket",
        "wagate_kafka_produce_seconds_bucket",
    ] {
        assert!(text.contains(name), "{name} missing from /metrics");
    }
    assert!(
        !text.contains("14155550123"),
        "a phone number leaked into metrics"
    );
    // A POST with few others in flight goes to the quiet (short-linger)
    // producer. (The recorder is shared by the gateways of this binary:
    // at least this one POST.)
    let quiet = text
        .lines()
        .find_map(|l| l.strip_prefix("wagate_ingress_produce_rounds_total{producer=\"quiet\"} "))
        .and_then(|v| v.trim().parse::<f64>().ok());
    assert!(quiet.is_some_and(|n| n >= 1.0), "quiet rounds: {quiet:?}");
    gw.shutdown().await;
}
