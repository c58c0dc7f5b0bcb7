//! Graceful shutdown: SIGTERM in the middle of a webhook load. Every event
//! Meta got a 200 for is in Kafka, the process exits 0 within its deadline,
//! and POSTs after the signal are refused (connection closed) or answered.

mod common;

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use hyper::StatusCode;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_under_load_loses_nothing_acknowledged() {
    let b = brokers();
    let p = unique_prefix("shutdown");
    let cfg = config(&b, &p, &[]);
    create_topics(&cfg.kafka).await;
    let port = free_port();
    let child = gateway_process(&b, &p)
        .without("WAGATE_ACCESS_TOKEN")
        .env("WAGATE_LISTEN", format!("127.0.0.1:{port}"))
        .env("WAGATE_EGRESS_ENABLED", "false")
        .env("WAGATE_SERVER_SHUTDOWN_TIMEOUT_MS", "10000")
        .env("WAGATE_LOG", "warn")
        .spawn();
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    // Wait until it answers.
    let end = Instant::now() + Duration::from_secs(20);
    loop {
        let warm = text_webhook("109876543210987", &["wamid.SD-WARM"]);
        if tokio::time::timeout(Duration::from_secs(2), post_signed_raw(addr, &warm))
            .await
            .ok()
            .flatten()
            == Some(StatusCode::OK)
        {
            break;
        }
        assert!(Instant::now() < end, "gateway did not start");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // 16 senders, each posting unique events until the gateway goes away.
    let acked: Arc<Mutex<HashSet<String>>> = Arc::default();
    let stop_at = Instant::now() + Duration::from_secs(30);
    let mut tasks = Vec::new();
    for t in 0..16 {
        let acked = acked.clone();
        tasks.push(tokio::spawn(async move {
            let mut refused = 0;
            for i in 0..100_000 {
                if Instant::now() > stop_at || refused > 20 {
                    break;
                }
                let id = format!("wamid.SD{t}x{i}");
                let body = text_webhook("109876543210987", &[&id]);
                match tokio::time::timeout(Duration::from_secs(15), post_signed_raw(addr, &body))
                    .await
                {
                    Ok(Some(StatusCode::OK)) => {
                        acked.lock().unwrap().insert(id);
                    }
                    Ok(Some(_)) => {}
                    _ => {
                        refused += 1;
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let before = acked.lock().unwrap().len();
    assert!(before > 0, "no webhook was acknowledged before the signal");
    let sent_at = Instant::now();
    child.sigterm();
    let mut child = child.into_child();
    let status = tokio::task::spawn_blocking(move || child.wait())
        .await
        .unwrap()
        .unwrap();
    let took = sent_at.elapsed();
    for t in tasks {
        let _ = t.await;
    }
    assert!(
        status.success(),
        "exit status {status:?}: the drain did not complete"
    );
    assert!(took < Duration::from_secs(12), "shutdown took {took:?}");

    let acked = acked.lock().unwrap().clone();
    let recs = read_all(&b, &p, "inbound.messages", Duration::from_millis(1500)).await;
    let stored: HashSet<String> = event_ids(&recs).into_iter().collect();
    let lost: Vec<&String> = acked.iter().filter(|id| !stored.contains(*id)).collect();
    assert!(
        lost.is_empty(),
        "{} acknowledged events are not in Kafka, e.g. {:?}",
        lost.len(),
        lost.first()
    );
    assert!(acked.len() >= before);
}

/// POSTs on a fresh connection; None when the connection fails (refused or
/// closed during shutdown).
async fn post_signed_raw(addr: std::net::SocketAddr, body: &[u8]) -> Option<StatusCode> {
    use http_body_util::{BodyExt, Full};
    let stream = tokio::net::TcpStream::connect(addr).await.ok()?;
    let (mut snd, conn) = hyper::client::conn::http1::handshake::<_, Full<bytes::Bytes>>(
        hyper_util::rt::TokioIo::new(stream),
    )
    .await
    .ok()?;
    tokio::spawn(conn);
    let req = hyper::Request::post("/webhook")
        .header("host", addr.to_string())
        .header("content-type", "application/json")
        .header("x-hub-signature-256", sign(body))
        .body(Full::new(bytes::Bytes::copy_from_slice(body)))
        .ok()?;
    let resp = snd.send_request(req).await.ok()?;
    let status = resp.status();
    resp.into_body().collect().await.ok()?;
    Some(status)
}

fn spawn_egress(b: &str, p: &str, graph: &str, internal_port: u16, log: &str) -> process::Running {
    gateway_process(b, p)
        .env(
            "WAGATE_INTERNAL_LISTEN",
            format!("127.0.0.1:{internal_port}"),
        )
        .env("WAGATE_GRAPH_BASE_URL", graph)
        .env("WAGATE_DEFAULT_THROUGHPUT", "5")
        .env("WAGATE_SERVER_SHUTDOWN_TIMEOUT_MS", "15000")
        .env("WAGATE_SERVER_SHUTDOWN_GRACE_MS", "1000")
        .log(log)
        .spawn()
}

/// SIGTERM while egress drains: readiness goes false while the instance
/// still answers, the process exits 0, and after the next start every
/// request has exactly one result and none reached Meta twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_mid_drain_then_restart_one_result_each() {
    use rdkafka::producer::{FutureProducer, FutureRecord};
    let b = brokers();
    let p = unique_prefix("shutdown-eg");
    create_topics(&config(&b, &p, &[]).kafka).await;
    let sb = sandbox_on_own_runtime(wagate::sandbox::SandboxConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        default_throughput: 0,
        pair_rate: None,
        error_rates: wagate::sandbox::ErrorInjection {
            slow: 1.0,
            slow_delay: Duration::from_millis(150),
            ..Default::default()
        },
        ..Default::default()
    })
    .await;
    // One record per batch: Tansu 0.6 cannot fetch from inside a batch, and
    // the next start resumes from a committed offset anywhere.
    let producer: FutureProducer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", &b)
        .set("partitioner", "murmur2_random")
        .set("batch.num.messages", "1")
        .set("linger.ms", "0")
        .create()
        .unwrap();
    let mut ids = Vec::new();
    for n in 0..4 {
        let number = format!("43000000000000{n}");
        for i in 0..100 {
            let id = format!("term-{n}-{i}");
            let r = serde_json::json!({"v":1,"request_id":id,"phone_number_id":number,"to":format!("+1418{i:07}"),
                "category":"utility","message":{"type":"template","template":{"name":"t","language":{"code":"en"}}}});
            let payload = serde_json::to_vec(&r).unwrap();
            producer
                .send(
                    FutureRecord::to(&format!("{p}outbound.requests"))
                        .key(&number)
                        .payload(&payload),
                    Duration::from_secs(10),
                )
                .await
                .unwrap();
            ids.push(id);
        }
    }
    let port = free_port();
    let child = spawn_egress(&b, &p, &sb.base_url(), port, "shutdown_egress_1.log");
    let end = Instant::now() + Duration::from_secs(60);
    while sb.accepted() < 20 {
        assert!(Instant::now() < end, "the gateway never started sending");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    child.sigterm();
    // During the grace period: still answering, but not ready.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let r = get(&format!("http://127.0.0.1:{port}/readyz")).await;
    assert_eq!(
        r.status,
        StatusCode::SERVICE_UNAVAILABLE,
        "readiness goes false first"
    );
    let mut child = child.into_child();
    let status = tokio::task::spawn_blocking(move || child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(
        status.success(),
        "exit status {status:?}: the drain did not complete"
    );
    assert!(
        sb.accepted() < ids.len() as u64,
        "stopped too late: everything was sent"
    );

    let port2 = free_port();
    let mut child = spawn_egress(&b, &p, &sb.base_url(), port2, "shutdown_egress_2.log");
    let by = results(&b, &p, ids.len(), Duration::from_secs(120)).await;
    child.kill9();
    assert_one_result_none_sent_twice(&by, &ids, &sends_by_request(&sb));
}
