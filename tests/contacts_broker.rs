//! Contacts backed by the compacted topics, against a real broker (Tansu):
//! a STOP seen by one instance is enforced by another that only learns of it
//! through `wa.consent`; a restart rebuilds the state; DELETE erases the pair
//! and leaves tombstones.

mod common;

use std::time::Duration;

use common::*;
use hyper::StatusCode;
use serde_json::{json, Value};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consent_travels_through_the_topics_survives_restarts_and_can_be_erased() {
    let b = brokers();
    let p = unique_prefix("contacts");
    let off = [("WAGATE_EGRESS_ENABLED", "false")];
    let a = start(&b, &p, &off).await;
    let other = start(&b, &p, &off).await;
    let pnid = "109876543210987";
    let stop = serde_json::to_vec(&json!({"object":"whatsapp_business_account","entry":[{"id":"1","changes":[{"field":"messages","value":{
        "messaging_product":"whatsapp","metadata":{"display_phone_number":"1","phone_number_id":pnid},
        "contacts":[{"profile":{"name":"Ana"},"wa_id":"14155550123"}],
        "messages":[{"from":"14155550123","id":"wamid.CSTOP","timestamp":"1781600500","type":"text","text":{"body":"ARRÊT"}}]}}]}]}))
    .unwrap();
    assert_eq!(
        post_signed(a.public_addr, "/webhook", &stop).await.status,
        StatusCode::OK
    );
    // The instance that received it knows at once.
    let url_a = format!("http://{}/v1/contacts/{pnid}/14155550123", a.internal_addr);
    let r = api("GET", &url_a, None).await;
    assert_eq!(r.status, StatusCode::OK);
    let v: Value = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(v["consent"], "opted_out");
    assert!(v["last_inbound_ms"].as_u64().is_some());
    // The other instance learns it from wa.consent / wa.windows.
    let url_o = format!(
        "http://{}/v1/contacts/{pnid}/14155550123",
        other.internal_addr
    );
    // The two topics are read independently: wait until both arrived.
    let r = wait_for(&url_o, |r| {
        r.status == StatusCode::OK && {
            let v = serde_json::from_slice::<Value>(&r.body).unwrap();
            v["consent"] == "opted_out" && v["last_inbound_ms"].as_u64().is_some()
        }
    })
    .await;
    let v: Value = serde_json::from_slice(&r.body).unwrap();
    assert!(
        v["last_inbound_ms"].as_u64().is_some(),
        "window synced too: {v}"
    );

    // PUT through the API on one instance, seen by the other.
    let url_a2 = format!("http://{}/v1/contacts/{pnid}/14155550999", a.internal_addr);
    let r = api(
        "PUT",
        &url_a2,
        Some(json!({"consent":"opted_in","marketing":"stopped"})),
    )
    .await;
    assert_eq!(
        r.status,
        StatusCode::OK,
        "{}",
        String::from_utf8_lossy(&r.body)
    );
    let bad = api("PUT", &url_a2, Some(json!({"consent":"maybe"}))).await;
    assert_eq!(bad.status, StatusCode::BAD_REQUEST);
    let url_o2 = format!(
        "http://{}/v1/contacts/{pnid}/14155550999",
        other.internal_addr
    );
    wait_for(&url_o2, |r| {
        r.status == StatusCode::OK
            && serde_json::from_slice::<Value>(&r.body).unwrap()["marketing"] == "stopped"
    })
    .await;
    assert_eq!(
        api(
            "GET",
            &format!("http://{}/v1/contacts/{pnid}/1999", a.internal_addr),
            None
        )
        .await
        .status,
        StatusCode::NOT_FOUND
    );
    a.shutdown().await;
    other.shutdown().await;

    // A new instance rebuilds the state from the topics before it is ready.
    let c = start(&b, &p, &off).await;
    let url_c = format!("http://{}/v1/contacts/{pnid}/14155550123", c.internal_addr);
    let r = api("GET", &url_c, None).await;
    assert_eq!(
        r.status,
        StatusCode::OK,
        "state rebuilt by the time /readyz is 200"
    );
    assert_eq!(
        serde_json::from_slice::<Value>(&r.body).unwrap()["consent"],
        "opted_out"
    );

    // Erasure: gone from memory, tombstones on both compacted topics.
    assert_eq!(
        api("DELETE", &url_c, None).await.status,
        StatusCode::NO_CONTENT
    );
    assert_eq!(api("GET", &url_c, None).await.status, StatusCode::NOT_FOUND);
    for topic in ["consent", "windows"] {
        let recs = read_all(&b, &p, topic, Duration::from_millis(1000)).await;
        let last = recs
            .iter()
            .rfind(|r| r.key.as_deref() == Some("109876543210987:14155550123"))
            .unwrap_or_else(|| panic!("no {topic} record for the pair"));
        assert!(
            last.payload.is_none(),
            "{topic}: the last record for the pair is not a tombstone"
        );
    }
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_configured_quick_reply_payload_opts_the_user_out() {
    let b = brokers();
    let p = unique_prefix("contacts-qr");
    let gw = start(
        &b,
        &p,
        &[
            ("WAGATE_EGRESS_ENABLED", "false"),
            ("WAGATE_CONTACTS_OPT_OUT_PAYLOADS", "OPT_OUT_MARKETING"),
        ],
    )
    .await;
    // Meta's template quick reply: text "Stop promotions" (not a keyword),
    // payload OPT_OUT_MARKETING (configured).
    let body = fixture("inbound_button_template_quick_reply.json");
    let v: Value = serde_json::from_slice(&body).unwrap();
    let value = &v["entry"][0]["changes"][0]["value"];
    let pnid = value["metadata"]["phone_number_id"].as_str().unwrap();
    let from = value["messages"][0]["from"].as_str().unwrap();
    assert_eq!(
        post_signed(gw.public_addr, "/webhook", &body).await.status,
        StatusCode::OK
    );
    let url = format!("http://{}/v1/contacts/{pnid}/{from}", gw.internal_addr);
    let r = api("GET", &url, None).await;
    assert_eq!(r.status, StatusCode::OK);
    let st: Value = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(st["consent"], "opted_out", "{st}");
    let consent = read_all(&b, &p, "consent", Duration::from_millis(800)).await;
    assert_eq!(consent.len(), 1, "{consent:?}");
    assert_eq!(
        consent[0].key.as_deref(),
        Some(format!("{pnid}:{from}").as_str())
    );
    assert_eq!(consent[0].value["consent"], "opted_out");
    assert_eq!(consent[0].value["source"], "quick_reply");
    gw.shutdown().await;
}
