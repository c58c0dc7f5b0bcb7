//! HTTPS listeners (DESIGN §11, issue 16 part 4) with real TLS clients:
//! certificates made here by rcgen, hyper-util over hyper-rustls trusting
//! the test CA, a bare tokio-rustls connection to see the certificate a
//! server presents, and curl when installed. A signed webhook over HTTPS
//! lands in a real broker (Tansu, `WAGATE_TEST_BROKERS`); the other tests
//! need no broker of their own and run on librdkafka's mock cluster.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{Full, StreamBody};
use hyper::body::Frame;
use hyper::{Request, StatusCode, Version};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use common::tls::{self as t, Pki};
use common::*;

const CHALLENGE_PATH: &str = "/webhook?hub.mode=subscribe&hub.challenge=4711&hub.verify_token=";

fn handshake_path() -> String {
    format!("{CHALLENGE_PATH}{VERIFY}")
}

fn get_req(url: &str) -> Request<Full<Bytes>> {
    Request::get(url).body(Full::new(Bytes::new())).unwrap()
}

fn signed_post(url: &str, body: &[u8]) -> Request<Full<Bytes>> {
    Request::post(url)
        .header("content-type", "application/json")
        .header("x-hub-signature-256", sign(body))
        .body(Full::new(Bytes::copy_from_slice(body)))
        .unwrap()
}

/// A gateway on the mock cluster with `overrides` (no broker needed).
async fn start_mock(
    tag: &str,
    overrides: &[(&str, String)],
) -> (wagate::kafka::mock::Cluster, wagate::app::Gateway) {
    init_logs();
    let p = unique_prefix(tag);
    let mock = wagate::kafka::mock::start(&p, 3).unwrap();
    let o: Vec<(&str, &str)> = overrides.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let mut cfg = config(&mock.bootstrap_servers(), &p, &o);
    cfg.kafka.check_record_limit = false;
    cfg.egress.enabled = false;
    let gw = wagate::app::Gateway::start(cfg)
        .await
        .expect("gateway starts");
    assert!(gw.wait_ready(Duration::from_secs(20)).await, "never ready");
    (mock, gw)
}

fn public_tls(cert: &std::path::Path, key: &std::path::Path) -> Vec<(&'static str, String)> {
    vec![
        ("WAGATE_SERVER_TLS_CERT_FILE", cert.display().to_string()),
        ("WAGATE_SERVER_TLS_KEY_FILE", key.display().to_string()),
    ]
}

fn metric(gw: &wagate::app::Gateway, name: &str, labels: &[(&str, &str)]) -> f64 {
    common::metric_in(&gw.metrics.render(), name, labels)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_signed_webhook_over_https_is_stored_in_kafka() {
    let b = brokers();
    let p = unique_prefix("https-webhook");
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new("wagate test CA");
    let (cert, key) = t::write_pair(dir.path(), "public", &pki.server("gateway", 1));
    let (cert, key) = (cert.display().to_string(), key.display().to_string());
    let gw = start(
        &b,
        &p,
        &[
            ("WAGATE_SERVER_TLS_CERT_FILE", &cert),
            ("WAGATE_SERVER_TLS_KEY_FILE", &key),
        ],
    )
    .await;
    let client = t::https_client(&pki.ca_pem(), None);
    let body = text_webhook("109876543210987", &["wamid.HTTPS-1"]);
    let url = format!("https://{}/webhook", gw.public_addr);
    let r = try_request_on(&client, signed_post(&url, &body))
        .await
        .unwrap();
    assert_eq!(
        r.status,
        StatusCode::OK,
        "{}",
        String::from_utf8_lossy(&r.body)
    );
    assert_eq!(&r.body[..], b"OK");
    // A bad signature over HTTPS is refused as over HTTP.
    let mut bad = signed_post(&url, &body);
    bad.headers_mut()
        .insert("x-hub-signature-256", "sha256=00".parse().unwrap());
    let r = try_request_on(&client, bad).await.unwrap();
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    // Plain HTTP to the HTTPS port gets no answer.
    let plain = try_request(signed_post(
        &format!("http://{}/webhook", gw.public_addr),
        &body,
    ))
    .await;
    assert!(
        plain.is_err(),
        "plain HTTP answered: {:?}",
        plain.map(|r| r.status)
    );

    let recs = read_all(&b, &p, "inbound.messages", Duration::from_secs(3)).await;
    assert_eq!(event_ids(&recs), vec!["wamid.HTTPS-1".to_string()]);
    assert_eq!(recs[0].value["kind"], "message");
    assert!(gw.shutdown().await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alpn_chooses_h2_or_http1_and_curl_speaks_both() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new("alpn CA");
    let (cert, key) = t::write_pair(dir.path(), "public", &pki.server("gateway", 1));
    let (_mock, gw) = start_mock("https-alpn", &public_tls(&cert, &key)).await;
    let url = format!("https://{}{}", gw.public_addr, handshake_path());

    // ALPN offers h2 and http/1.1: the server picks h2.
    let r = try_request_on(&t::https_client(&pki.ca_pem(), None), get_req(&url))
        .await
        .unwrap();
    assert_eq!((r.status, &r.body[..]), (StatusCode::OK, &b"4711"[..]));
    assert_eq!(r.version, Version::HTTP_2);

    // TLS 1.3 by default, TLS 1.2 for a client that offers only that.
    for (versions, want) in [
        (rustls::DEFAULT_VERSIONS, rustls::ProtocolVersion::TLSv1_3),
        (
            &[&rustls::version::TLS12][..],
            rustls::ProtocolVersion::TLSv1_2,
        ),
    ] {
        let s = t::handshake(
            gw.public_addr,
            t::client_config_with(&pki.ca_pem(), None, versions),
        )
        .await
        .unwrap();
        assert_eq!(s.get_ref().1.protocol_version(), Some(want));
    }

    // A client that offers only http/1.1 gets HTTP/1.1.
    let h1 = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build(
            hyper_rustls::HttpsConnectorBuilder::new()
                .with_tls_config(t::client_config(&pki.ca_pem(), None))
                .https_only()
                .enable_http1()
                .build(),
        );
    let r = try_request_on(&h1, get_req(&url)).await.unwrap();
    assert_eq!((r.status, &r.body[..]), (StatusCode::OK, &b"4711"[..]));
    assert_eq!(r.version, Version::HTTP_11);

    // curl, trusting the CA file, both ways.
    if std::process::Command::new("curl")
        .arg("--version")
        .output()
        .is_err()
    {
        eprintln!("curl not installed: its part of this test is skipped");
    } else {
        let ca = dir.path().join("ca.pem");
        std::fs::write(&ca, pki.ca_pem()).unwrap();
        for (flag, want) in [("--http2", "2"), ("--http1.1", "1.1")] {
            let url = url.clone();
            let ca = ca.clone();
            let out = tokio::task::spawn_blocking(move || {
                std::process::Command::new("curl")
                    .args(["-sS", "--max-time", "10", flag, "--cacert"])
                    .arg(&ca)
                    .args(["-w", "\n%{http_version} %{http_code}", &url])
                    .output()
                    .unwrap()
            })
            .await
            .unwrap();
            let text = String::from_utf8_lossy(&out.stdout).to_string();
            assert!(
                out.status.success(),
                "curl {flag}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            assert_eq!(text, format!("4711\n{want} 200"), "curl {flag}");
        }
        // Without the CA, curl refuses the certificate.
        let u = url.clone();
        let out = tokio::task::spawn_blocking(move || {
            std::process::Command::new("curl")
                .args(["-sS", "--max-time", "10", &u])
                .output()
                .unwrap()
        })
        .await
        .unwrap();
        assert!(
            !out.status.success(),
            "curl trusted a certificate of an unknown CA"
        );
    }
    assert!(gw.shutdown().await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_rotate_under_load_without_a_failed_request() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new("rotation CA");
    let first = pki.server("gateway-1", 1);
    let second = pki.server("gateway-2", 2);
    let (cert, key) = t::write_pair(dir.path(), "public", &first);
    let (_mock, gw) = start_mock("https-rotate", &public_tls(&cert, &key)).await;
    let addr = gw.public_addr;
    let ca = pki.ca_pem();
    assert_eq!(t::presented_leaf(addr, &ca).await, first.der);
    let reloads = |r| {
        metric(
            &gw,
            "wagate_tls_cert_reloads_total",
            &[("listener", "public"), ("result", r)],
        )
    };
    let (ok0, err0) = (reloads("ok"), reloads("error"));

    // Two clients: one keeps its (h2) connection across the rotation, the
    // other opens a new connection, and handshake, per request. Bounded by
    // count and by time.
    let url = format!("https://{addr}{}", handshake_path());
    let done = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for pooled in [true, false] {
        let client = t::https_client_with(&ca, None, pooled);
        let url = url.clone();
        let done = done.clone();
        tasks.push(tokio::spawn(async move {
            let end = Instant::now() + Duration::from_secs(20);
            let mut failures = Vec::new();
            for _ in 0..300 {
                if Instant::now() > end {
                    break;
                }
                match try_request_on(&client, get_req(&url)).await {
                    Ok(r) if r.status == StatusCode::OK && &r.body[..] == b"4711" => {
                        done.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(r) => {
                        failures.push(format!("{} {}", r.status, String::from_utf8_lossy(&r.body)))
                    }
                    Err(e) => failures.push(e),
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            failures
        }));
    }
    // Rotate once the load runs: new handshakes must see the second
    // certificate within a few watch intervals.
    while done.load(Ordering::Relaxed) < 20 {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    t::write_pair(dir.path(), "public", &second);
    let end = Instant::now() + Duration::from_secs(10);
    while t::presented_leaf(addr, &ca).await != second.der {
        assert!(
            Instant::now() < end,
            "new connections still get the first certificate"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut failures = Vec::new();
    for task in tasks {
        failures.extend(task.await.unwrap());
    }
    let n = done.load(Ordering::Relaxed);
    assert!(
        failures.is_empty(),
        "{} of {} requests failed: {:?}",
        failures.len(),
        n + failures.len(),
        &failures[..failures.len().min(5)]
    );
    assert!(n >= 100, "only {n} requests ran");
    assert!(reloads("ok") > ok0, "the reload was not counted");

    // A broken new certificate is counted and the second stays in use.
    t::replace_file(
        &cert,
        b"-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydA==\n-----END CERTIFICATE-----\n",
    );
    let end = Instant::now() + Duration::from_secs(10);
    while reloads("error") <= err0 {
        assert!(Instant::now() < end, "the failed reload was not counted");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(t::presented_leaf(addr, &ca).await, second.der);
    let r = try_request_on(&t::https_client(&ca, None), get_req(&url))
        .await
        .unwrap();
    assert_eq!(r.status, StatusCode::OK);
    assert!(gw.shutdown().await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_internal_listener_requires_a_client_certificate_from_its_ca() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new("internal CA");
    let clients = Pki::new("client CA");
    let other = Pki::new("some other CA");
    let (cert, key) = t::write_pair(dir.path(), "internal", &pki.server("gateway-internal", 1));
    let client_ca = dir.path().join("clients.pem");
    std::fs::write(&client_ca, clients.ca_pem()).unwrap();
    let (_mock, gw) = start_mock(
        "https-mtls",
        &[
            ("WAGATE_INTERNAL_TLS_CERT_FILE", cert.display().to_string()),
            ("WAGATE_INTERNAL_TLS_KEY_FILE", key.display().to_string()),
            (
                "WAGATE_INTERNAL_TLS_CLIENT_CA_FILE",
                client_ca.display().to_string(),
            ),
        ],
    )
    .await;
    let url = format!("https://{}/healthz", gw.internal_addr);
    let failures = || {
        metric(
            &gw,
            "wagate_tls_handshake_failures_total",
            &[("listener", "internal")],
        )
    };
    let before = failures();

    // No client certificate: refused.
    let r = try_request_on(&t::https_client(&pki.ca_pem(), None), get_req(&url)).await;
    assert!(
        r.is_err(),
        "answered without a client certificate: {:?}",
        r.map(|r| r.status)
    );
    // A certificate from another CA: refused.
    let stranger = other.client("stranger");
    let r = try_request_on(
        &t::https_client(&pki.ca_pem(), Some(&stranger)),
        get_req(&url),
    )
    .await;
    assert!(
        r.is_err(),
        "answered a certificate of another CA: {:?}",
        r.map(|r| r.status)
    );
    // Plain HTTP: no answer.
    let r = try_request(get_req(&format!("http://{}/healthz", gw.internal_addr))).await;
    assert!(r.is_err(), "plain HTTP answered: {:?}", r.map(|r| r.status));

    // A certificate of the client CA: served, over h2.
    let sre = clients.client("sre");
    let client = t::https_client(&pki.ca_pem(), Some(&sre));
    let r = try_request_on(&client, get_req(&url)).await.unwrap();
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.version, Version::HTTP_2);
    let r = try_request_on(
        &client,
        get_req(&format!("https://{}/metrics", gw.internal_addr)),
    )
    .await
    .unwrap();
    assert_eq!(r.status, StatusCode::OK);
    assert!(
        failures() >= before + 3.0,
        "refused handshakes not counted: {} → {}",
        before,
        failures()
    );
    // The public listener stays plain HTTP.
    let r = get(&format!("http://{}{}", gw.public_addr, handshake_path())).await;
    assert_eq!(r.status, StatusCode::OK);
    assert!(gw.shutdown().await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_and_silent_handshakes_are_counted_and_the_listener_keeps_serving() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new("garbage CA");
    let (cert, key) = t::write_pair(dir.path(), "public", &pki.server("gateway", 1));
    let mut o = public_tls(&cert, &key);
    o.push(("WAGATE_SERVER_HEADER_READ_TIMEOUT_MS", "500".into()));
    let (_mock, gw) = start_mock("https-garbage", &o).await;
    let failures = || {
        metric(
            &gw,
            "wagate_tls_handshake_failures_total",
            &[("listener", "public")],
        )
    };
    let before = failures();

    // Plain HTTP to the HTTPS port: the connection is closed, never answered
    // with HTTP.
    let mut s = TcpStream::connect(gw.public_addr).await.unwrap();
    s.write_all(b"GET /webhook HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf))
        .await
        .expect("closed in time");
    assert!(!buf.starts_with(b"HTTP/"), "answered in plain HTTP");
    // A silent socket: closed after the header-read timeout, counted too.
    let mut silent = TcpStream::connect(gw.public_addr).await.unwrap();
    let t0 = Instant::now();
    let n = tokio::time::timeout(Duration::from_secs(5), silent.read(&mut [0u8; 16]))
        .await
        .expect("a silent handshake was never closed");
    assert!(matches!(n, Ok(0) | Err(_)), "{n:?}");
    assert!(
        t0.elapsed() >= Duration::from_millis(400),
        "closed too soon"
    );
    // Random bytes that look like nothing.
    let mut s = TcpStream::connect(gw.public_addr).await.unwrap();
    s.write_all(&[0x16, 0x03, 0x01, 0xff, 0xff, 1, 2, 3, 4, 5])
        .await
        .unwrap();
    drop(s);

    let end = Instant::now() + Duration::from_secs(5);
    while failures() < before + 3.0 {
        assert!(
            Instant::now() < end,
            "failed handshakes not counted: {before} → {}",
            failures()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // And the listener still serves.
    let url = format!("https://{}{}", gw.public_addr, handshake_path());
    let r = try_request_on(&t::https_client(&pki.ca_pem(), None), get_req(&url))
        .await
        .unwrap();
    assert_eq!((r.status, &r.body[..]), (StatusCode::OK, &b"4711"[..]));
    assert!(gw.shutdown().await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn body_limits_minimum_rate_and_peer_limit_hold_over_tls() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new("limits CA");
    let (cert, key) = t::write_pair(dir.path(), "public", &pki.server("gateway", 1));
    let mut o = public_tls(&cert, &key);
    o.push(("WAGATE_SERVER_MAX_BODY_BYTES", "65536".into()));
    o.push(("WAGATE_SERVER_MIN_BODY_BYTES_PER_SEC", "10000".into()));
    o.push(("WAGATE_SERVER_MAX_CONNECTIONS_PER_PEER", "2".into()));
    let (_mock, gw) = start_mock("https-limits", &o).await;
    let ca = pki.ca_pem();
    let url = format!("https://{}/webhook", gw.public_addr);
    let client = t::https_client(&ca, None);

    // The peer limit counts TCP peers: a third connection from 127.0.0.1
    // is closed before any handshake while two are held.
    let connector = tokio_rustls::TlsConnector::from(Arc::new(t::client_config(&ca, None)));
    let name = rustls::pki_types::ServerName::IpAddress(gw.public_addr.ip().into());
    let mut held = Vec::new();
    let end = Instant::now() + Duration::from_secs(5);
    while held.len() < 2 {
        let tcp = TcpStream::connect(gw.public_addr).await.unwrap();
        match connector.connect(name.clone(), tcp).await {
            Ok(s) => held.push(s),
            Err(e) => panic!("handshake: {e}"),
        }
        assert!(Instant::now() < end, "could not hold two connections");
    }
    let before = metric(
        &gw,
        "wagate_http_errors_total",
        &[("listener", "public"), ("reason", "peer_limit")],
    );
    let tcp = TcpStream::connect(gw.public_addr).await.unwrap();
    let third =
        tokio::time::timeout(Duration::from_secs(5), connector.connect(name.clone(), tcp)).await;
    assert!(matches!(third, Ok(Err(_))), "a third connection was served");
    assert!(
        metric(
            &gw,
            "wagate_http_errors_total",
            &[("listener", "public"), ("reason", "peer_limit")]
        ) > before
    );
    drop(held);
    // The two are closed: room again (the server sees them end at once).
    tokio::time::sleep(Duration::from_millis(200)).await;

    // Over the body limit: 413, as over HTTP.
    let big = vec![b' '; 70_000];
    let r = try_request_on(&client, signed_post(&url, &big))
        .await
        .unwrap();
    assert_eq!(r.status, StatusCode::PAYLOAD_TOO_LARGE);

    // A body that trickles: 408 once the minimum rate applies.
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, std::convert::Infallible>>(4);
    let slow = Request::post(&url)
        .header("content-type", "application/json")
        .header("x-hub-signature-256", sign(b"{}"))
        .body(StreamBody::new(tokio_stream_from(rx)))
        .unwrap();
    let slow_client =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new()).build(
            hyper_rustls::HttpsConnectorBuilder::new()
                .with_tls_config(t::client_config(&ca, None))
                .https_only()
                .enable_http1()
                .enable_http2()
                .build(),
        );
    let feeder = tokio::spawn(async move {
        for _ in 0..40 {
            if tx
                .send(Ok(Frame::data(Bytes::from_static(b" "))))
                .await
                .is_err()
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    let t0 = Instant::now();
    let r = tokio::time::timeout(Duration::from_secs(10), slow_client.request(slow))
        .await
        .expect("no answer to a trickling body")
        .expect("answered");
    assert_eq!(r.status(), StatusCode::REQUEST_TIMEOUT);
    assert!(t0.elapsed() < Duration::from_secs(4), "{:?}", t0.elapsed());
    feeder.abort();

    assert!(gw.shutdown().await);
}

/// A stream of the frames `rx` receives.
fn tokio_stream_from<T: Send + 'static>(
    mut rx: tokio::sync::mpsc::Receiver<T>,
) -> impl futures_util::Stream<Item = T> + Send + 'static {
    futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_that_does_not_match_stops_the_start_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new("mismatch CA");
    let a = pki.server("a", 1);
    let b = pki.server("b", 2);
    let cert = dir.path().join("a.crt");
    let key = dir.path().join("b.key");
    std::fs::write(&cert, &a.cert_pem).unwrap();
    std::fs::write(&key, &b.key_pem).unwrap();
    let log = dir.path().join("wagate.log");
    let mut child = gateway_process("127.0.0.1:1", &unique_prefix("https-mismatch"))
        .env("WAGATE_SERVER_TLS_CERT_FILE", cert.display())
        .env("WAGATE_SERVER_TLS_KEY_FILE", key.display())
        .log_to(&log)
        .spawn();
    let status = tokio::task::spawn_blocking(move || {
        let s = child.wait_for_exit(Duration::from_secs(20));
        (s, child)
    })
    .await
    .unwrap();
    let (status, child) = status;
    assert_eq!(
        status.and_then(|s| s.code()),
        Some(2),
        "{}",
        child.log_tail(5)
    );
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("server.tls.key_file"), "{text}");
    assert!(text.contains("does not match"), "{text}");
    // No key material in the message.
    assert!(!text.contains("PRIVATE KEY"), "{text}");
}
