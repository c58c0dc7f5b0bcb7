//! Fault injection with librdkafka's in-process mock cluster: when Kafka does
//! not acknowledge a POST's records, the POST gets 503 + Retry-After; when
//! Meta retries later, every event lands exactly once.

mod common;

use std::time::{Duration, Instant};

use common::*;
use hyper::StatusCode;
use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};

const IDLE: Duration = Duration::from_millis(1500);

/// Retries like Meta would until the gateway answers 200.
async fn retry_until_ok(addr: std::net::SocketAddr, body: &[u8]) -> u32 {
    let end = Instant::now() + Duration::from_secs(40);
    let mut tries = 0;
    loop {
        tries += 1;
        let r = post_signed(addr, "/webhook", body).await;
        if r.status == StatusCode::OK {
            return tries;
        }
        assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
        assert!(Instant::now() < end, "never acknowledged");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn produce_errors_give_503_and_the_retry_lands_exactly_once() {
    let p = unique_prefix("fault-errors");
    let mock = wagate::kafka::mock::start(&p, 3).unwrap();
    let bs = mock.bootstrap_servers();
    let cfg = config(
        &bs,
        &p,
        &[
            ("WAGATE_INGRESS_ACK_TIMEOUT_MS", "300"),
            ("WAGATE_KAFKA_LINGER_MS", "0"),
        ],
    );
    let gw = wagate::app::Gateway::start(cfg).await.unwrap();
    assert!(gw.wait_ready(Duration::from_secs(10)).await);

    // Every produce request fails (retriably) for a while.
    mock.request_errors(
        RDKafkaApiKey::Produce,
        &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_NOT_ENOUGH_REPLICAS; 40],
    );
    let ids: Vec<String> = (0..5).map(|i| format!("wamid.FAULT{i}")).collect();
    let refs: Vec<&str> = ids.iter().map(|s| s.as_str()).collect();
    let body = text_webhook("109876543210987", &refs);
    let r = post_signed(gw.public_addr, "/webhook", &body).await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(r.headers.get("retry-after").is_some());

    // Meta retries until it gets 200.
    let tries = retry_until_ok(gw.public_addr, &body).await;
    assert!(tries >= 1);
    let msgs = read_all(&bs, &p, "inbound.messages", IDLE).await;
    let mut got = event_ids(&msgs);
    got.sort();
    assert_eq!(got, ids, "every event exactly once");
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_down_past_the_message_timeout_then_retry_lands_exactly_once() {
    let p = unique_prefix("fault-down");
    let mock = wagate::kafka::mock::start(&p, 3).unwrap();
    let bs = mock.bootstrap_servers();
    let cfg = config(
        &bs,
        &p,
        &[
            ("WAGATE_INGRESS_ACK_TIMEOUT_MS", "500"),
            ("WAGATE_KAFKA_MESSAGE_TIMEOUT_MS", "1500"),
            ("WAGATE_KAFKA_LINGER_MS", "0"),
        ],
    );
    let gw = wagate::app::Gateway::start(cfg).await.unwrap();
    assert!(gw.wait_ready(Duration::from_secs(10)).await);
    // Warm the producer up so the broker going down hits in-flight records.
    let warm = text_webhook("109876543210987", &["wamid.WARM"]);
    // The first produce also sets up the idempotent producer: allow retries.
    retry_until_ok(gw.public_addr, &warm).await;

    mock.broker_down(1).unwrap();
    // Wait until the gateway itself sees the outage (/readyz turns 503).
    let end = Instant::now() + Duration::from_secs(20);
    while get(&format!("http://{}/readyz", gw.internal_addr))
        .await
        .status
        == StatusCode::OK
    {
        assert!(Instant::now() < end, "the outage was never noticed");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let ids: Vec<String> = (0..4).map(|i| format!("wamid.DOWN{i}")).collect();
    let refs: Vec<&str> = ids.iter().map(|s| s.as_str()).collect();
    let body = text_webhook("109876543210987", &refs);
    let r = post_signed(gw.public_addr, "/webhook", &body).await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
    // Let librdkafka give up on those records (message timeout), then recover.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    mock.broker_up(1).unwrap();
    retry_until_ok(gw.public_addr, &body).await;

    let msgs = read_all(&bs, &p, "inbound.messages", IDLE).await;
    let mut got = event_ids(&msgs);
    got.sort();
    let mut want = ids.clone();
    want.push("wamid.WARM".into());
    want.sort();
    assert_eq!(got, want, "every event exactly once");
    gw.shutdown().await;
}
