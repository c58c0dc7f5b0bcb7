//! Hostile inputs against the real server on loopback and a real broker
//! (Tansu): bodies that would crash, starve, bloat or mislead the gateway.
//! Each test reproduces a failure of the hostile-input review (issue 13) on
//! the code before its fix: an abort, a 503 forever, a socket never closed,
//! a 503 while unsigned streams held the permits, records written past any
//! bound, consent acting on the other duplicate, a 200 on junk ids, a
//! refusal counted nowhere.

mod common;

use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{Full, StreamBody};
use hyper::body::Frame;
use hyper::{Request, StatusCode};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use common::*;

const IDLE: Duration = Duration::from_secs(3);

/// `name{labels…}` from the gateway's exposition (every `k="v"` given must
/// be on the line), or 0 when absent.
async fn metric(gw: &wagate::app::Gateway, name: &str, labels: &[(&str, &str)]) -> f64 {
    let text = get(&format!("http://{}/metrics", gw.internal_addr))
        .await
        .body;
    metric_in(&String::from_utf8_lossy(&text), name, labels)
}

/// Does `name{labels}` appear in the exposition at all?
async fn has_series(gw: &wagate::app::Gateway, name: &str, labels: &[(&str, &str)]) -> bool {
    let text = get(&format!("http://{}/metrics", gw.internal_addr))
        .await
        .body;
    String::from_utf8_lossy(&text).lines().any(|l| {
        l.starts_with(&format!("{name}{{"))
            && labels
                .iter()
                .all(|(k, v)| l.contains(&format!("{k}=\"{v}\"")))
    })
}

fn header<'a>(r: &'a wagate::kafka::TailRecord, k: &str) -> Option<&'a str> {
    r.headers.get(k).and_then(|v| v.as_str())
}

/// A text-message webhook whose `text` object is given as raw JSON.
fn text_body(wamid: &str, text_json: &str) -> Vec<u8> {
    format!(r#"{{"object":"whatsapp_business_account","entry":[{{"id":"102345678901234","changes":[{{"field":"messages","value":{{"messaging_product":"whatsapp","metadata":{{"display_phone_number":"15550199999","phone_number_id":"109876543210987"}},"contacts":[{{"profile":{{"name":"Ana"}},"wa_id":"14155550123"}}],"messages":[{{"from":"14155550123","id":"{wamid}","timestamp":"1781600500","type":"text","text":{text_json}}}]}}}}]}}]}}"#).into_bytes()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deep_nesting_is_kept_raw_and_the_process_lives() {
    let b = brokers();
    let p = unique_prefix("deep");
    let gw = start(&b, &p, &[]).await;
    // 10,000 levels at the top, and 8,600 inside a message.
    let top = format!("{}{}", "[".repeat(10_000), "]".repeat(10_000)).into_bytes();
    let inner = format!("{}1{}", "[".repeat(8_600), "]".repeat(8_600));
    let in_msg = text_body("wamid.DEEP", &format!(r#"{{"body":"x","d":{inner}}}"#));
    for body in [&top, &in_msg] {
        let r = post_signed(gw.public_addr, "/webhook", body).await;
        assert_eq!(
            r.status,
            StatusCode::OK,
            "{}",
            String::from_utf8_lossy(&r.body)
        );
    }
    // Still serving, and an ordinary webhook lands.
    let ok = post_signed(gw.public_addr, "/webhook", &fixture("inbound_text.json")).await;
    assert_eq!(ok.status, StatusCode::OK);
    let raw = read_all(&b, &p, "inbound.raw", IDLE).await;
    assert_eq!(raw.len(), 3);
    assert_eq!(raw[0].payload.as_deref(), Some(&top[..]));
    assert_eq!(header(&raw[0], "wagate-unparseable"), Some("too_deep"));
    assert_eq!(header(&raw[1], "wagate-unparseable"), Some("too_deep"));
    assert_eq!(header(&raw[2], "wagate-unparseable"), None);
    let msgs = read_all(&b, &p, "inbound.messages", IDLE).await;
    assert_eq!(msgs.len(), 1, "only the ordinary webhook is exploded");
    assert_eq!(
        metric(
            &gw,
            "wagate_webhook_unparseable_total",
            &[("reason", "too_deep")]
        )
        .await,
        2.0
    );
    gw.shutdown().await;
}

/// The deep body is refused by the API's parser as well (serde_json's
/// recursion limit), with a 400 rather than a crash.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deep_api_bodies_are_400() {
    let b = brokers();
    let p = unique_prefix("deepapi");
    let gw = start(&b, &p, &[]).await;
    let deep = format!(
        r#"{{"v":1,"request_id":"d1","phone_number_id":"1","to":"+1555","category":"service","message":{}{}}}"#,
        "[".repeat(20_000),
        "]".repeat(20_000)
    );
    for path in ["/v1/messages", "/v1/contacts/1/2"] {
        let method = if path == "/v1/messages" {
            "POST"
        } else {
            "PUT"
        };
        let req = Request::builder()
            .method(method)
            .uri(format!("http://{}{path}", gw.internal_addr))
            .header("authorization", "Bearer test-api-token")
            .body(Full::new(Bytes::from(deep.clone())))
            .unwrap();
        let r = request(req).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{path}");
        assert!(r.body.len() < 1_000, "{path}: {} bytes", r.body.len());
    }
    assert_eq!(
        get(&format!("http://{}/healthz", gw.internal_addr))
            .await
            .status,
        StatusCode::OK
    );
    gw.shutdown().await;
}

/// A webhook of `size` bytes with one text message (the text fills it).
fn big_text_webhook(wamid: &str, size: usize) -> Vec<u8> {
    let shell = text_body(wamid, r#"{"body":""}"#).len();
    text_body(
        wamid,
        &format!(r#"{{"body":"{}"}}"#, "a".repeat(size - shell)),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_up_to_the_limit_are_stored() {
    let b = brokers();
    let p = unique_prefix("big");
    // The minimum-rate rule has its own test (below) and is off here: twice
    // in fresh-clone CI (a debug build sharing two cores with twelve other
    // gateways) the server closed a 3 MiB POST while the client was still
    // writing it (a broken pipe), most likely a 408 from the rule's
    // one-second grace passing before the first frame was read. What this
    // test checks is that bodies up to the limit are stored; should it fail
    // that way again, it prints the server's webhook outcomes.
    let gw = start(&b, &p, &[("WAGATE_SERVER_MIN_BODY_BYTES_PER_SEC", "0")]).await;
    let limit = 3 * 1024 * 1024;
    let sizes = [999_715, 1_500_000, limit];
    for (i, size) in sizes.iter().enumerate() {
        let body = big_text_webhook(&format!("wamid.BIG{i}"), *size);
        assert_eq!(body.len(), *size);
        let req = hyper::Request::post(format!("http://{}/webhook", gw.public_addr))
            .header("content-type", "application/json")
            .header("x-hub-signature-256", sign(&body))
            .body(http_body_util::Full::new(bytes::Bytes::from(body)))
            .unwrap();
        let r = match try_request(req).await {
            Ok(r) => r,
            Err(e) => {
                let m = get(&format!("http://{}/metrics", gw.internal_addr)).await;
                let outcomes: Vec<String> = String::from_utf8_lossy(&m.body)
                    .lines()
                    .filter(|l| {
                        l.starts_with("wagate_webhook_requests_total") && !l.ends_with(" 0")
                    })
                    .map(str::to_string)
                    .collect();
                panic!("{size}: {e}; the server counted {outcomes:?}");
            }
        };
        assert_eq!(
            r.status,
            StatusCode::OK,
            "{size}: {}",
            String::from_utf8_lossy(&r.body)
        );
        // A body read to its end keeps the connection.
        assert!(r.headers.get("connection").is_none(), "{size}");
    }
    let raw = read_all(&b, &p, "inbound.raw", IDLE).await;
    assert_eq!(raw.len(), 3);
    for (r, size) in raw.iter().zip(sizes) {
        assert_eq!(r.payload.as_ref().map(|p| p.len()), Some(size));
    }
    let msgs = read_all(&b, &p, "inbound.messages", IDLE).await;
    assert_eq!(msgs.len(), 3);
    // One byte over: 413, nothing produced, and the client is told the
    // connection closes (its body was not read: hyper closes it, and a
    // client not told would reuse it — the keep-alive race).
    let over = big_text_webhook("wamid.OVER", limit + 1);
    let r = post_signed(gw.public_addr, "/webhook", &over).await;
    assert_eq!(r.status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(
        r.headers.get("connection").map(|v| v.as_bytes()),
        Some(&b"close"[..])
    );
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_topic_that_takes_smaller_records_stops_the_start() {
    use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
    use rdkafka::client::DefaultClientContext;
    use rdkafka::config::ClientConfig;
    let b = brokers();
    let p = unique_prefix("small");
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", &b)
        .create()
        .unwrap();
    let name = format!("{p}inbound.raw");
    let t = NewTopic::new(&name, 1, TopicReplication::Fixed(1)).set("max.message.bytes", "1000000");
    admin
        .create_topics([&t], &AdminOptions::new())
        .await
        .unwrap();
    let cfg = config(&b, &p, &[]);
    let small = wagate::kafka::check_record_limit(&cfg.kafka, Duration::from_secs(5))
        .await
        .unwrap();
    let Some(small) = small else {
        panic!("the broker did not answer DescribeConfigs");
    };
    assert_eq!(small.len(), 1, "{small:?}");
    assert_eq!(small[0].topic, name);
    assert_eq!(small[0].limit, 1_000_000);
    let err = match wagate::app::Gateway::start(cfg).await {
        Ok(_) => panic!("the gateway started with a topic that cannot take its bodies"),
        Err(e) => e.to_string(),
    };
    assert!(
        err.contains("max.message.bytes") && err.contains(&name),
        "{err}"
    );
    assert!(err.contains("server.max_body_bytes"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_connections_are_closed_after_the_header_timeout() {
    let b = brokers();
    let p = unique_prefix("silent");
    let gw = start(&b, &p, &[("WAGATE_SERVER_HEADER_READ_TIMEOUT_MS", "1000")]).await;
    let addr = gw.public_addr;
    let mut socks = Vec::new();
    for first in [
        &b""[..],
        b"P",
        b"PRI * HTTP/2.0\r\n",
        b"POST /webhook HTTP/1.1\r\nHost: x\r\n",
    ] {
        for _ in 0..10 {
            let mut s = TcpStream::connect(addr).await.unwrap();
            s.write_all(first).await.unwrap();
            socks.push(s);
        }
    }
    let t0 = Instant::now();
    for mut s in socks {
        let mut buf = [0u8; 512];
        // Closed (EOF, a reset, or hyper's 408 then EOF) well before 10 s.
        let closed = tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                match s.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(_) => continue,
                }
            }
        })
        .await;
        assert!(
            closed.is_ok(),
            "a silent connection was still open after {:?}",
            t0.elapsed()
        );
    }
    // The gateway still answers.
    let ok = post_signed(addr, "/webhook", &fixture("inbound_text.json")).await;
    assert_eq!(ok.status, StatusCode::OK);
    assert!(
        metric(
            &gw,
            "wagate_http_errors_total",
            &[("listener", "public"), ("reason", "header_timeout")]
        )
        .await
            >= 30.0
    );
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_over_its_connection_cap_is_refused() {
    let b = brokers();
    let p = unique_prefix("peer");
    let gw = start(&b, &p, &[("WAGATE_SERVER_MAX_CONNECTIONS_PER_PEER", "3")]).await;
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(TcpStream::connect(gw.public_addr).await.unwrap());
    }
    // The fourth is closed at once.
    let mut s = TcpStream::connect(gw.public_addr).await.unwrap();
    let mut buf = [0u8; 16];
    let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
        .await
        .expect("closed at once");
    assert!(matches!(n, Ok(0) | Err(_)));
    drop(held);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let ok = post_signed(gw.public_addr, "/webhook", &fixture("inbound_text.json")).await;
    assert_eq!(ok.status, StatusCode::OK);
    assert!(
        metric(
            &gw,
            "wagate_http_errors_total",
            &[("listener", "public"), ("reason", "peer_limit")]
        )
        .await
            >= 1.0
    );
    gw.shutdown().await;
}

/// An h2c connection with `n` POSTs that send headers (a fake signature and
/// a declared body) and never a body byte.
async fn h2c_stalled_posts(
    addr: std::net::SocketAddr,
    n: usize,
) -> Vec<tokio::task::JoinHandle<Option<StatusCode>>> {
    let io = hyper_util::rt::TokioIo::new(TcpStream::connect(addr).await.unwrap());
    type Stalled =
        StreamBody<futures_util::stream::Pending<Result<Frame<Bytes>, std::convert::Infallible>>>;
    let (send, conn) = hyper::client::conn::http2::handshake::<_, _, Stalled>(
        hyper_util::rt::TokioExecutor::new(),
        io,
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    let mut out = Vec::new();
    for _ in 0..n {
        let mut send = send.clone();
        out.push(tokio::spawn(async move {
            let req = Request::post(format!("http://{addr}/webhook"))
                .header("x-hub-signature-256", format!("sha256={}", "0".repeat(64)))
                .header("content-length", "1000")
                .body(StreamBody::new(futures_util::stream::pending()))
                .unwrap();
            send.ready().await.ok()?;
            send.send_request(req).await.ok().map(|r| r.status())
        }));
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsigned_requests_hold_no_in_flight_permits() {
    let b = brokers();
    let p = unique_prefix("permits");
    let gw = start(
        &b,
        &p,
        &[
            ("WAGATE_INGRESS_MAX_IN_FLIGHT", "4"),
            ("WAGATE_SERVER_BODY_READ_TIMEOUT_MS", "30000"),
            ("WAGATE_SERVER_MIN_BODY_BYTES_PER_SEC", "0"),
        ],
    )
    .await;
    // 3 h2c connections × 16 stalled POSTs with a fake signature.
    let mut stalled = Vec::new();
    for _ in 0..3 {
        stalled.extend(h2c_stalled_posts(gw.public_addr, 16).await);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    // A genuine webhook gets its permit.
    let ok = post_signed(gw.public_addr, "/webhook", &fixture("inbound_text.json")).await;
    assert_eq!(
        ok.status,
        StatusCode::OK,
        "{}",
        String::from_utf8_lossy(&ok.body)
    );
    for h in stalled {
        h.abort();
    }
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_slower_than_the_minimum_rate_is_408_early() {
    let b = brokers();
    let p = unique_prefix("slow");
    let gw = start(
        &b,
        &p,
        &[
            ("WAGATE_SERVER_BODY_READ_TIMEOUT_MS", "60000"),
            ("WAGATE_SERVER_MIN_BODY_BYTES_PER_SEC", "1000"),
        ],
    )
    .await;
    let t0 = Instant::now();
    let mut s = TcpStream::connect(gw.public_addr).await.unwrap();
    s.write_all(b"POST /webhook HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\nX-Hub-Signature-256: sha256=00\r\n\r\n{\"a\":")
        .await
        .unwrap();
    // Ten bytes a second: far below the minimum.
    let mut answer = Vec::new();
    let mut buf = [0u8; 1024];
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        let _ = s.write_all(b"1111111111").await;
        if let Ok(Ok(n)) = tokio::time::timeout(Duration::from_secs(1), s.read(&mut buf)).await {
            if n == 0 {
                break;
            }
            answer.extend_from_slice(&buf[..n]);
            if answer.windows(4).any(|w| w == b"\r\n\r\n") {
                break;
            }
        }
    }
    let text = String::from_utf8_lossy(&answer);
    assert!(text.starts_with("HTTP/1.1 408"), "{text}");
    assert!(t0.elapsed() < Duration::from_secs(20));
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_per_post_are_bounded_by_the_body() {
    let b = brokers();
    let p = unique_prefix("bloat");
    let gw = start(&b, &p, &[]).await;
    // A 300 KB contact name repeated into 2,000 message records.
    let msgs: Vec<String> = (0..2_000)
        .map(|i| format!(r#"{{"from":"14155550123","id":"wamid.B{i}","timestamp":"1","type":"text","text":{{"body":"m"}}}}"#))
        .collect();
    let bloat = format!(r#"{{"object":"whatsapp_business_account","entry":[{{"id":"1","changes":[{{"field":"messages","value":{{"metadata":{{"phone_number_id":"5"}},"contacts":[{{"profile":{{"name":"{}"}},"wa_id":"14155550123"}}],"messages":[{}]}}}}]}}]}}"#, "n".repeat(300_000), msgs.join(",")).into_bytes();
    // A 3 MiB body of a million empty messages.
    let changes: Vec<String> = (0..1_000)
        .map(|_| {
            format!(
                r#"{{"field":"messages","value":{{"messages":[{}]}}}}"#,
                vec!["{}"; 1_000].join(",")
            )
        })
        .collect();
    let empty = format!(
        r#"{{"entry":[{{"id":"1","changes":[{}]}}]}}"#,
        changes.join(",")
    )
    .into_bytes();
    assert!(empty.len() < 3 * 1024 * 1024);
    for body in [&bloat, &empty] {
        let r = post_signed(gw.public_addr, "/webhook", body).await;
        assert_eq!(r.status, StatusCode::OK);
    }
    let raw = read_all(&b, &p, "inbound.raw", IDLE).await;
    assert_eq!(raw.len(), 2);
    assert_eq!(header(&raw[0], "wagate-over-limit"), Some("record_bytes"));
    assert_eq!(header(&raw[1], "wagate-over-limit"), Some("events"));
    assert_eq!(raw[0].payload.as_deref(), Some(&bloat[..]));
    assert!(
        read_all(&b, &p, "inbound.messages", Duration::from_millis(1500))
            .await
            .is_empty()
    );
    assert_eq!(
        metric(
            &gw,
            "wagate_webhook_requests_total",
            &[("app", "default"), ("outcome", "over_limit")]
        )
        .await,
        2.0
    );
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicate_keys_mean_what_consumers_read() {
    let b = brokers();
    let p = unique_prefix("dupkeys");
    let gw = start(&b, &p, &[]).await;
    let contact = format!(
        "http://{}/v1/contacts/109876543210987/14155550123",
        gw.internal_addr
    );
    let get_contact = || async {
        let req = Request::get(&contact)
            .header("authorization", "Bearer test-api-token")
            .body(Full::new(Bytes::new()))
            .unwrap();
        request(req).await
    };
    // "hello" then "STOP": consumers read STOP, and so does the consent plane.
    let r = post_signed(
        gw.public_addr,
        "/webhook",
        &text_body("wamid.D1", r#"{"body":"hello","body":"STOP"}"#),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK);
    let st: serde_json::Value = serde_json::from_slice(&get_contact().await.body).unwrap();
    assert_eq!(st["consent"], "opted_out", "{st}");
    // "START" then "hello": consumers read hello; consent stays opted out.
    let r = post_signed(
        gw.public_addr,
        "/webhook",
        &text_body("wamid.D2", r#"{"body":"START","body":"hello"}"#),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK);
    let st: serde_json::Value = serde_json::from_slice(&get_contact().await.body).unwrap();
    assert_eq!(st["consent"], "opted_out", "{st}");
    let msgs = read_all(&b, &p, "inbound.messages", IDLE).await;
    let bodies: Vec<&str> = msgs
        .iter()
        .map(|m| m.value["message"]["text"]["body"].as_str().unwrap())
        .collect();
    assert_eq!(bodies, ["STOP", "hello"]);
    for m in &msgs {
        assert_eq!(
            m.payload
                .as_ref()
                .map(|p| String::from_utf8_lossy(p).matches("\"body\"").count()),
            Some(1)
        );
    }
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lone_surrogates_and_two_signatures() {
    let b = brokers();
    let p = unique_prefix("surrogate");
    let gw = start(&b, &p, &[]).await;
    let body = text_body("wamid.S1", r#"{"body":"a\ud800b"}"#);
    assert_eq!(
        post_signed(gw.public_addr, "/webhook", &body).await.status,
        StatusCode::OK
    );
    let raw = read_all(&b, &p, "inbound.raw", IDLE).await;
    assert_eq!(raw.len(), 1);
    // Kept as Meta sent it, byte for byte; no record with altered text.
    assert_eq!(raw[0].payload.as_deref(), Some(&body[..]));
    assert_eq!(
        header(&raw[0], "wagate-unparseable"),
        Some("lone_surrogate")
    );
    assert!(
        read_all(&b, &p, "inbound.messages", Duration::from_millis(1500))
            .await
            .is_empty()
    );
    // A timestamp at i64::MAX neither panics nor wraps: the window opens at
    // receipt, not in the far past or future.
    let t0 = wagate::clock::now_ms();
    let huge = String::from_utf8(text_body("wamid.T1", r#"{"body":"hi"}"#))
        .unwrap()
        .replace("1781600500", "9223372036854775807");
    let r = post_signed(gw.public_addr, "/webhook", huge.as_bytes()).await;
    assert_eq!(r.status, StatusCode::OK);
    let req = Request::get(format!(
        "http://{}/v1/contacts/109876543210987/14155550123",
        gw.internal_addr
    ))
    .header("authorization", "Bearer test-api-token")
    .body(Full::new(Bytes::new()))
    .unwrap();
    let st: serde_json::Value = serde_json::from_slice(&request(req).await.body).unwrap();
    let at = st["last_inbound_ms"].as_u64().unwrap();
    // (The cache keeps whole seconds.)
    assert!(
        at >= t0 / 1000 * 1000 && at <= wagate::clock::now_ms(),
        "{st}"
    );
    // Two signature headers, one of them right: refused.
    let good = fixture("inbound_text.json");
    let req = Request::post(format!("http://{}/webhook", gw.public_addr))
        .header("x-hub-signature-256", sign(&good))
        .header("x-hub-signature-256", format!("sha256={}", "0".repeat(64)))
        .body(Full::new(Bytes::from(good.clone())))
        .unwrap();
    assert_eq!(request(req).await.status, StatusCode::UNAUTHORIZED);
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn contacts_api_ids_are_strict_and_erasure_covers_old_keys() {
    let b = brokers();
    let p = unique_prefix("ids");
    // A record an earlier version wrote under a `+`-prefixed number id.
    let cfg = config(&b, &p, &[]);
    create_topics(&cfg.kafka).await;
    let producer = wagate::kafka::KafkaProducer::new(&cfg.kafka).unwrap();
    let old =
        br#"{"v":1,"consent":"opted_in","marketing":"allowed","updated_at_ms":1,"source":"api"}"#;
    producer
        .send(
            &format!("{p}consent"),
            b"+109876543210987:14155550123",
            old,
            &[],
        )
        .unwrap()
        .await
        .unwrap();
    let gw = start(&b, &p, &[]).await;
    let call = |method: &'static str, path: String, body: Vec<u8>| {
        let url = format!("http://{}{path}", gw.internal_addr);
        async move {
            let req = Request::builder()
                .method(method)
                .uri(url)
                .header("authorization", "Bearer test-api-token")
                .body(Full::new(Bytes::from(body)))
                .unwrap();
            request(req).await
        }
    };
    let pair = "/v1/contacts/109876543210987/14155550123".to_string();
    assert_eq!(
        call("GET", pair.clone(), vec![]).await.status,
        StatusCode::OK,
        "the old record is read"
    );
    for bad in [
        "/v1/contacts/+/+",
        "/v1/contacts/+109876543210987/14155550123",
        "/v1/contacts/1/++1",
        "/v1/contacts/1x/1",
    ] {
        let r = call(
            "PUT",
            bad.to_string(),
            br#"{"consent":"opted_in"}"#.to_vec(),
        )
        .await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{bad}");
    }
    // A 200 KB value is not echoed back.
    let huge = format!(r#"{{"consent":"{}"}}"#, "x".repeat(200_000));
    let r = call("PUT", pair.clone(), huge.into_bytes()).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert!(r.body.len() < 1_000, "{} bytes", r.body.len());
    // `+` on the user is normalised: one key on the topic.
    let r = call(
        "PUT",
        "/v1/contacts/109876543210987/+14155550123".into(),
        br#"{"marketing":"stopped"}"#.to_vec(),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK);
    let recs = read_all(&b, &p, "consent", IDLE).await;
    assert_eq!(
        recs.last().unwrap().key.as_deref(),
        Some("109876543210987:14155550123")
    );
    // Erasure tombstones every form, so a new instance finds nothing.
    assert_eq!(
        call("DELETE", pair.clone(), vec![]).await.status,
        StatusCode::NO_CONTENT
    );
    let gw2 = start(&b, &p, &[("WAGATE_EGRESS_ENABLED", "false")]).await;
    let req = Request::get(format!("http://{}{pair}", gw2.internal_addr))
        .header("authorization", "Bearer test-api-token")
        .body(Full::new(Bytes::new()))
        .unwrap();
    assert_eq!(
        request(req).await.status,
        StatusCode::NOT_FOUND,
        "erased consent came back"
    );
    gw2.shutdown().await;
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_before_the_handler_are_counted() {
    let b = brokers();
    let p = unique_prefix("counted");
    let gw = start(&b, &p, &[]).await;
    let addr = gw.public_addr;
    // Known outcomes are there from the start, at 0.
    for outcome in [
        "bad_request",
        "body_timeout",
        "over_limit",
        "method_not_allowed",
    ] {
        assert!(
            has_series(
                &gw,
                "wagate_webhook_requests_total",
                &[("app", "default"), ("outcome", outcome)]
            )
            .await,
            "{outcome}"
        );
    }
    assert_eq!(
        get(&format!("http://{addr}/nope")).await.status,
        StatusCode::NOT_FOUND
    );
    let put = Request::put(format!("http://{addr}/webhook"))
        .body(Full::new(Bytes::new()))
        .unwrap();
    assert_eq!(request(put).await.status, StatusCode::METHOD_NOT_ALLOWED);
    // Raw requests hyper refuses itself: 431, 414, 400.
    let raw = |req: Vec<u8>| async move {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(&req).await.unwrap();
        let mut out = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out)).await;
        String::from_utf8_lossy(&out).into_owned()
    };
    let big_header = format!(
        "GET /webhook HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n",
        "a".repeat(1 << 20)
    );
    assert!(raw(big_header.into_bytes())
        .await
        .starts_with("HTTP/1.1 431"));
    let long_uri = format!("GET /{} HTTP/1.1\r\nHost: x\r\n\r\n", "a".repeat(70_000));
    assert!(raw(long_uri.into_bytes()).await.starts_with("HTTP/1.1 414"));
    assert!(raw(b"GARBAGE\r\n\r\n".to_vec())
        .await
        .starts_with("HTTP/1.1 400"));
    // An HTTP/2 preface, SETTINGS, then DATA on stream 0: GOAWAY (PROTOCOL_ERROR).
    let mut h2 = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    h2.extend_from_slice(&[0, 0, 0, 4, 0, 0, 0, 0, 0]);
    h2.extend_from_slice(&[0, 0, 1, 0, 0, 0, 0, 0, 0, b'A']);
    let _ = raw(h2).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let l = |r| [("listener", "public"), ("reason", r)];
    assert_eq!(
        metric(&gw, "wagate_http_errors_total", &l("not_found")).await,
        1.0
    );
    assert_eq!(
        metric(
            &gw,
            "wagate_webhook_requests_total",
            &[("app", "default"), ("outcome", "method_not_allowed")]
        )
        .await,
        1.0
    );
    assert_eq!(
        metric(&gw, "wagate_http_errors_total", &l("headers_too_large")).await,
        1.0
    );
    assert_eq!(
        metric(&gw, "wagate_http_errors_total", &l("uri_too_long")).await,
        1.0
    );
    assert_eq!(
        metric(&gw, "wagate_http_errors_total", &l("bad_request")).await,
        1.0
    );
    assert_eq!(
        metric(&gw, "wagate_http_errors_total", &l("h2_error")).await,
        1.0
    );
    // The internal listener counts its own.
    assert_eq!(
        get(&format!("http://{}/nope", gw.internal_addr))
            .await
            .status,
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        metric(
            &gw,
            "wagate_http_errors_total",
            &[("listener", "internal"), ("reason", "not_found")]
        )
        .await,
        1.0
    );
    gw.shutdown().await;
}
