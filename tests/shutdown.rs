//! Graceful shutdown: SIGTERM in the middle of a webhook load. Every event
//! Meta got a 200 for is in Kafka, the process exits 0 within its deadline,
//! and POSTs after the signal are refused (connection closed) or answered.

mod common;

use std::collections::HashSet;
use std::process::{Command, Stdio};
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
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut child = Command::new(env!("CARGO_BIN_EXE_wagate"))
        .arg("serve")
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("WAGATE_APP_SECRET", SECRET)
        .env("WAGATE_VERIFY_TOKEN", VERIFY)
        .env("WAGATE_API_TOKEN", "t")
        .env("WAGATE_KAFKA_BROKERS", &b)
        .env("WAGATE_TOPIC_PREFIX", &p)
        .env("WAGATE_LISTEN", format!("127.0.0.1:{port}"))
        .env("WAGATE_INTERNAL_LISTEN", "127.0.0.1:0")
        .env("WAGATE_EGRESS_ENABLED", "false")
        .env("WAGATE_SERVER_SHUTDOWN_TIMEOUT_MS", "10000")
        .env("WAGATE_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
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
    assert!(Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap()
        .success());
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
