//! The Graph API sandbox over real HTTP on loopback: Meta's success and
//! error shapes, auth, validation, throughput, pair rate, the 24-hour
//! window, fixed and injected errors, signed status webhooks, and users
//! addressed by business-scoped user ID (BSUID) or hidden behind a username.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::{json, Value};
use tokio::net::TcpListener;

use wagate::config::Secret;
use wagate::sandbox::{
    bsuid_of, FixedError, PairRate, Sandbox, SandboxConfig, StatusWebhookConfig, WebhookStats,
};

const TOKEN: &str = "sandbox-test-token";
const NUMBER: &str = "109876543210987";
const OTHER_NUMBER: &str = "109876543210988";

/// `payloads/send_text_request.json`.
fn text_request() -> Value {
    json!({
        "messaging_product": "whatsapp",
        "recipient_type": "individual",
        "to": "+14155550123",
        "type": "text",
        "text": {"preview_url": false, "body": "Your order #4471 left our warehouse. Track it here: https://example.com/t/4471"},
        "biz_opaque_callback_data": "job=8f2c1e7a;attempt=1"
    })
}

/// `payloads/send_template_request.json`.
fn template_request() -> Value {
    json!({
        "messaging_product": "whatsapp",
        "recipient_type": "individual",
        "to": "+5511987654321",
        "type": "template",
        "template": {
            "name": "order_shipped_v3",
            "language": {"code": "pt_BR"},
            "components": [
                {"type": "header", "parameters": [{"type": "image", "image": {"id": "1037543291543636"}}]},
                {"type": "body", "parameters": [
                    {"type": "text", "text": "João"},
                    {"type": "text", "text": "#4471"},
                    {"type": "currency", "currency": {"fallback_value": "R$ 59,90", "code": "BRL", "amount_1000": 59900}}
                ]},
                {"type": "button", "sub_type": "url", "index": "0", "parameters": [{"type": "text", "text": "4471"}]},
                {"type": "button", "sub_type": "quick_reply", "index": "1", "parameters": [{"type": "payload", "payload": "OPT_OUT_MARKETING"}]}
            ]
        },
        "biz_opaque_callback_data": "campaign=jun26;contact=88231"
    })
}

fn text_to(to: &str) -> Value {
    json!({"messaging_product": "whatsapp", "to": to, "type": "text", "text": {"body": "hi"}})
}

fn template_to(to: &str) -> Value {
    json!({"messaging_product": "whatsapp", "to": to, "type": "template",
           "template": {"name": "hello_world", "language": {"code": "en_US"}}})
}

fn config() -> SandboxConfig {
    SandboxConfig {
        access_tokens: vec![TOKEN.into()],
        pair_rate: None,
        ..SandboxConfig::default()
    }
}

async fn start(cfg: SandboxConfig) -> Sandbox {
    Sandbox::start(cfg).await.expect("sandbox starts")
}

struct Answer {
    status: StatusCode,
    raw: Bytes,
    json: Value,
}

type HttpClient = Client<HttpConnector, Full<Bytes>>;

/// A pooled client whose idle connections are dropped well before the
/// sandbox closes them (10 s): reusing a connection the server is closing is
/// the classic keep-alive race, seen here as `IncompleteMessage` on a busy
/// machine.
fn client() -> HttpClient {
    Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(2))
        .build_http()
}

async fn request(
    c: &HttpClient,
    method: &str,
    url: &str,
    token: Option<&str>,
    body: Vec<u8>,
) -> Answer {
    let mut req = Request::builder()
        .method(method)
        .uri(url)
        .header("content-type", "application/json");
    if let Some(t) = token {
        req = req.header("authorization", format!("Bearer {t}"));
    }
    let req = req.body(Full::new(Bytes::from(body))).expect("request");
    let blen = body_len(&req);
    let resp = tokio::time::timeout(Duration::from_secs(20), c.request(req))
        .await
        .expect("answered in time")
        .unwrap_or_else(|e| panic!("HTTP exchange ({method} {url}, {blen} bytes): {e:?}"));
    let status = resp.status();
    let raw = resp.into_body().collect().await.expect("body").to_bytes();
    let json = serde_json::from_slice(&raw).unwrap_or(Value::Null);
    Answer { status, raw, json }
}

/// The body's length, for the failure message.
fn body_len(r: &Request<Full<Bytes>>) -> u64 {
    use hyper::body::Body;
    r.body().size_hint().exact().unwrap_or(0)
}

/// POSTs `body` to `{base}/{number}/messages` with the test token.
async fn send(c: &HttpClient, sb: &Sandbox, number: &str, body: &Value) -> Answer {
    let url = format!("{}/{number}/messages", sb.base_url());
    request(c, "POST", &url, Some(TOKEN), body.to_string().into_bytes()).await
}

/// Asserts Meta's error shape and returns the error object.
fn assert_meta_error(a: &Answer, status: StatusCode, code: i64) -> Value {
    assert_eq!(a.status, status, "{}", String::from_utf8_lossy(&a.raw));
    let e = a.json["error"].clone();
    assert_eq!(e["code"], code, "{e}");
    assert_eq!(e["type"], "OAuthException", "{e}");
    let message = e["message"].as_str().expect("error.message");
    assert!(message.starts_with(&format!("(#{code}) ")), "{message}");
    assert!(message.len() > format!("(#{code}) ").len(), "{message}");
    assert_eq!(e["error_data"]["messaging_product"], "whatsapp", "{e}");
    let details = e["error_data"]["details"].as_str().expect("details");
    assert!(!details.is_empty());
    let trace = e["fbtrace_id"].as_str().expect("fbtrace_id");
    assert!(trace.len() >= 10 && trace.chars().all(|c| c.is_ascii_alphanumeric()));
    e
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn text_and_template_answers_have_metas_success_shape() {
    let sb = start(config()).await;
    let c = client();
    let a = send(&c, &sb, NUMBER, &text_request()).await;
    assert_eq!(
        a.status,
        StatusCode::OK,
        "{}",
        String::from_utf8_lossy(&a.raw)
    );
    assert_eq!(a.json["messaging_product"], "whatsapp");
    assert_eq!(
        a.json["contacts"],
        json!([{"input": "+14155550123", "wa_id": "14155550123"}])
    );
    let msgs = a.json["messages"].as_array().expect("messages");
    assert_eq!(msgs.len(), 1);
    let text_wamid = msgs[0]["id"].as_str().expect("id").to_string();
    assert!(text_wamid.starts_with("wamid.HBgL"), "{text_wamid}");
    assert!(
        msgs[0].get("message_status").is_none(),
        "only templates carry message_status"
    );
    assert_eq!(msgs[0].as_object().map(|o| o.len()), Some(1));

    let a = send(&c, &sb, NUMBER, &template_request()).await;
    assert_eq!(
        a.status,
        StatusCode::OK,
        "{}",
        String::from_utf8_lossy(&a.raw)
    );
    assert_eq!(
        a.json["contacts"],
        json!([{"input": "+5511987654321", "wa_id": "5511987654321"}])
    );
    assert_eq!(a.json["messages"][0]["message_status"], "accepted");
    let template_wamid = a.json["messages"][0]["id"]
        .as_str()
        .expect("id")
        .to_string();
    assert_ne!(template_wamid, text_wamid);

    // `to` is echoed exactly as sent; wa_id keeps the digits only.
    let a = send(&c, &sb, NUMBER, &text_to("+1 (415) 555-0199")).await;
    assert_eq!(a.status, StatusCode::OK);
    assert_eq!(a.json["contacts"][0]["input"], "+1 (415) 555-0199");
    assert_eq!(a.json["contacts"][0]["wa_id"], "14155550199");

    // Any /vNN.N/ prefix is accepted and recorded.
    let url = format!("http://{}/v21.0/{NUMBER}/messages", sb.addr());
    let a = request(
        &c,
        "POST",
        &url,
        Some(TOKEN),
        text_to("+14155550100").to_string().into_bytes(),
    )
    .await;
    assert_eq!(a.status, StatusCode::OK);

    // Mark-as-read is answered but is not a send.
    let read = json!({"messaging_product": "whatsapp", "status": "read",
        "message_id": "wamid.HBgLMTQxNTU1NTAxMjMVAgASGBQzRUIwQTdDMkY1RDk4QjE0NkU3NgA=",
        "typing_indicator": {"type": "text"}});
    let a = send(&c, &sb, NUMBER, &read).await;
    assert_eq!(a.status, StatusCode::OK);
    assert_eq!(a.json, json!({"success": true}));

    let sends = sb.sends();
    assert_eq!(sends.len(), 4);
    assert_eq!(sb.attempts(), 5);
    assert_eq!(sb.accepted(), 4);
    assert_eq!(sends[0].wamid, text_wamid);
    assert_eq!(sends[0].type_, "text");
    assert_eq!(sends[0].phone_number_id, NUMBER);
    assert_eq!(sends[0].to, "+14155550123");
    assert_eq!(sends[0].wa_id, "14155550123");
    assert_eq!(
        sends[0].biz_opaque_callback_data.as_deref(),
        Some("job=8f2c1e7a;attempt=1")
    );
    assert_eq!(sends[0].body, text_request());
    assert_eq!(sends[0].api_version, "v23.0");
    assert_eq!(sends[1].wamid, template_wamid);
    assert_eq!(sends[1].type_, "template");
    assert_eq!(sends[3].api_version, "v21.0");
    assert!(sends[0].arrived_at <= sends[1].arrived_at);
    assert!(sends[0].arrived_unix_ms > 1_700_000_000_000);
    sb.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_or_unknown_token_is_401_190() {
    let sb = start(config()).await;
    let c = client();
    let url = format!("{}/{NUMBER}/messages", sb.base_url());
    let body = text_request().to_string().into_bytes();
    for token in [None, Some("not-the-token"), Some("")] {
        let a = request(&c, "POST", &url, token, body.clone()).await;
        let e = assert_meta_error(&a, StatusCode::UNAUTHORIZED, 190);
        assert!(e["error_subcode"].is_i64(), "{e}");
    }
    assert!(sb.sends().is_empty());
    assert_eq!(sb.attempts(), 3);

    // Empty `access_tokens` accepts any non-empty token, but not none.
    let open = start(SandboxConfig {
        access_tokens: Vec::new(),
        ..config()
    })
    .await;
    let url = format!("{}/{NUMBER}/messages", open.base_url());
    let a = request(&c, "POST", &url, Some("anything"), body.clone()).await;
    assert_eq!(a.status, StatusCode::OK);
    let a = request(&c, "POST", &url, None, body).await;
    assert_meta_error(&a, StatusCode::UNAUTHORIZED, 190);
    sb.shutdown().await;
    open.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_bodies_are_400_with_details() {
    let sb = start(config()).await;
    let c = client();

    let mut no_to = text_request();
    no_to.as_object_mut().map(|o| o.remove("to"));
    let a = send(&c, &sb, NUMBER, &no_to).await;
    let e = assert_meta_error(&a, StatusCode::BAD_REQUEST, 131008);
    assert!(e["error_data"]["details"]
        .as_str()
        .unwrap_or("")
        .contains("to"));

    let mut no_name = template_request();
    no_name["template"]
        .as_object_mut()
        .map(|o| o.remove("name"));
    let a = send(&c, &sb, NUMBER, &no_name).await;
    let e = assert_meta_error(&a, StatusCode::BAD_REQUEST, 100);
    assert_eq!(e["message"], "(#100) Invalid parameter");
    assert!(e["error_data"]["details"]
        .as_str()
        .unwrap_or("")
        .contains("template['name']"));

    let mut no_language = template_request();
    no_language["template"]["language"] = json!({});
    let a = send(&c, &sb, NUMBER, &no_language).await;
    assert_meta_error(&a, StatusCode::BAD_REQUEST, 100);

    let mut sms = text_request();
    sms["messaging_product"] = "sms".into();
    let a = send(&c, &sb, NUMBER, &sms).await;
    let e = assert_meta_error(&a, StatusCode::BAD_REQUEST, 100);
    assert!(e["error_data"]["details"]
        .as_str()
        .unwrap_or("")
        .contains("messaging_product"));

    let mut no_body = text_request();
    no_body["text"].as_object_mut().map(|o| o.remove("body"));
    let a = send(&c, &sb, NUMBER, &no_body).await;
    let e = assert_meta_error(&a, StatusCode::BAD_REQUEST, 100);
    assert_eq!(
        e["error_data"]["details"],
        "Param text['body'] is required."
    );

    let mut long = text_request();
    long["text"]["body"] = "x".repeat(4097).into();
    assert_meta_error(
        &send(&c, &sb, NUMBER, &long).await,
        StatusCode::BAD_REQUEST,
        100,
    );
    long["text"]["body"] = "é".repeat(4096).into();
    assert_eq!(send(&c, &sb, NUMBER, &long).await.status, StatusCode::OK);

    let mut opaque = text_request();
    opaque["biz_opaque_callback_data"] = "x".repeat(513).into();
    assert_meta_error(
        &send(&c, &sb, NUMBER, &opaque).await,
        StatusCode::BAD_REQUEST,
        100,
    );

    let mut bad_to = text_request();
    bad_to["to"] = "+1415abc0123".into();
    assert_meta_error(
        &send(&c, &sb, NUMBER, &bad_to).await,
        StatusCode::BAD_REQUEST,
        131009,
    );

    let no_object = json!({"messaging_product": "whatsapp", "to": "+14155550123", "type": "image"});
    assert_meta_error(
        &send(&c, &sb, NUMBER, &no_object).await,
        StatusCode::BAD_REQUEST,
        131008,
    );
    let media = json!({"messaging_product": "whatsapp", "to": "+14155550123", "type": "image", "image": {"caption": "x"}});
    assert_meta_error(
        &send(&c, &sb, NUMBER, &media).await,
        StatusCode::BAD_REQUEST,
        100,
    );
    let interactive = json!({"messaging_product": "whatsapp", "to": "+14155550123", "type": "interactive", "interactive": {"type": "button"}});
    assert_meta_error(
        &send(&c, &sb, NUMBER, &interactive).await,
        StatusCode::BAD_REQUEST,
        100,
    );
    let reaction = json!({"messaging_product": "whatsapp", "to": "+14155550123", "type": "reaction", "reaction": {"emoji": "👍"}});
    assert_meta_error(
        &send(&c, &sb, NUMBER, &reaction).await,
        StatusCode::BAD_REQUEST,
        100,
    );

    let url = format!("{}/{NUMBER}/messages", sb.base_url());
    let a = request(&c, "POST", &url, Some(TOKEN), b"{not json".to_vec()).await;
    assert_meta_error(&a, StatusCode::BAD_REQUEST, 100);
    let a = request(&c, "POST", &url, Some(TOKEN), vec![b' '; (1 << 20) + 1]).await;
    assert_meta_error(&a, StatusCode::PAYLOAD_TOO_LARGE, 100);

    // Unknown routes are 404 with Meta's shape; a non-numeric id is 400 #100.
    let base = format!("http://{}", sb.addr());
    for (method, path) in [
        ("POST", "/v23.0/109876543210987/media"),
        ("GET", "/v23.0/109876543210987/messages"),
        ("POST", "/messages"),
    ] {
        let a = request(
            &c,
            method,
            &format!("{base}{path}"),
            Some(TOKEN),
            Vec::new(),
        )
        .await;
        assert_eq!(a.status, StatusCode::NOT_FOUND, "{method} {path}");
        assert!(a.json["error"]["code"].is_i64(), "{method} {path}");
        assert!(a.json["error"]["fbtrace_id"].is_string());
    }
    let a = send(&c, &sb, "not-a-number", &text_request()).await;
    assert_meta_error(&a, StatusCode::BAD_REQUEST, 100);

    // Only the one valid 4096-character text was accepted.
    assert_eq!(sb.sends().len(), 1);
    sb.shutdown().await;
}

/// The largest number of arrivals in any half-open one-second window.
fn max_per_second(mut t: Vec<Instant>) -> usize {
    t.sort();
    let (mut j, mut best) = (0, 0);
    for i in 0..t.len() {
        while t[i] - t[j] >= Duration::from_secs(1) {
            j += 1;
        }
        best = best.max(i - j + 1);
    }
    best
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn throughput_over_quota_is_130429_and_never_exceeded() {
    let mut cfg = config();
    cfg.throughput_overrides.insert(NUMBER.into(), 5);
    let sb = start(cfg).await;
    let c = client();

    let t0 = Instant::now();
    let mut ok = 0;
    for i in 0..20 {
        let a = send(&c, &sb, NUMBER, &text_to(&format!("+1415555{i:04}"))).await;
        if a.status == StatusCode::OK {
            ok += 1;
        } else {
            let e = assert_meta_error(&a, StatusCode::BAD_REQUEST, 130429);
            assert_eq!(e["message"], "(#130429) Rate limit hit");
            assert_eq!(e["error_subcode"], 2494055);
            assert_eq!(
                e["error_data"]["details"],
                "Cloud API message throughput has been reached."
            );
        }
    }
    let elapsed = t0.elapsed();
    assert!(ok <= 5, "{ok} accepted in {elapsed:?}");
    if elapsed < Duration::from_secs(1) {
        assert_eq!(ok, 5, "the quota is reachable");
    }
    // Another number has the default quota and is unaffected.
    let a = send(&c, &sb, OTHER_NUMBER, &text_to("+14155550000")).await;
    assert_eq!(a.status, StatusCode::OK);

    // Keep pushing for a while: the quota refills, but no one-second
    // window ever holds more than 5 accepted sends.
    let until = Instant::now() + Duration::from_millis(2300);
    let mut i = 100;
    while Instant::now() < until {
        send(&c, &sb, NUMBER, &text_to(&format!("+1415555{i:04}"))).await;
        i += 1;
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let times: Vec<Instant> = sb
        .sends()
        .iter()
        .filter(|s| s.phone_number_id == NUMBER)
        .map(|s| s.arrived_at)
        .collect();
    assert!(times.len() >= 10, "only {} accepted in ~2.5 s", times.len());
    assert!(max_per_second(times.clone()) <= 5, "{:?}", times);
    assert!(sb.attempts() > sb.sends().len());
    sb.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pair_rate_beyond_the_burst_is_131056() {
    let sb = start(SandboxConfig {
        pair_rate: Some(PairRate {
            per: Duration::from_secs(6),
            burst: 3,
        }),
        ..config()
    })
    .await;
    let c = client();
    for _ in 0..3 {
        let a = send(&c, &sb, NUMBER, &text_to("+14155550123")).await;
        assert_eq!(a.status, StatusCode::OK);
    }
    for _ in 0..2 {
        let a = send(&c, &sb, NUMBER, &text_to("+1 415 555 0123")).await;
        let e = assert_meta_error(&a, StatusCode::BAD_REQUEST, 131056);
        assert_eq!(
            e["message"],
            "(#131056) (Business Account, Consumer Account) pair rate limit hit"
        );
        assert_eq!(e["error_data"]["details"], "Message failed to send because there were too many messages sent from this phone number to the same phone number in a short period of time.");
    }
    // Other recipients, and the same recipient from another number, are unaffected.
    assert_eq!(
        send(&c, &sb, NUMBER, &text_to("+14155550124")).await.status,
        StatusCode::OK
    );
    assert_eq!(
        send(&c, &sb, OTHER_NUMBER, &text_to("+14155550123"))
            .await
            .status,
        StatusCode::OK
    );
    assert_eq!(sb.sends().len(), 5);
    sb.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn free_form_outside_the_window_is_131047() {
    let sb = start(SandboxConfig {
        enforce_window: true,
        ..config()
    })
    .await;
    let c = client();
    let a = send(&c, &sb, NUMBER, &text_to("+14155550123")).await;
    let e = assert_meta_error(&a, StatusCode::BAD_REQUEST, 131047);
    assert_eq!(e["message"], "(#131047) Re-engagement message");

    // Templates need no window.
    let a = send(&c, &sb, NUMBER, &template_to("+14155550123")).await;
    assert_eq!(a.status, StatusCode::OK);

    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_millis() as u64;
    sb.record_inbound(NUMBER, "14155550123", now_ms - 60_000);
    let a = send(&c, &sb, NUMBER, &text_to("+14155550123")).await;
    assert_eq!(a.status, StatusCode::OK);
    // The window is per (number, user).
    let a = send(&c, &sb, OTHER_NUMBER, &text_to("+14155550123")).await;
    assert_meta_error(&a, StatusCode::BAD_REQUEST, 131047);
    // An inbound message more than 24 h old does not open it.
    sb.record_inbound(NUMBER, "+14155550124", now_ms - 25 * 3600 * 1000);
    let a = send(&c, &sb, NUMBER, &text_to("+14155550124")).await;
    assert_meta_error(&a, StatusCode::BAD_REQUEST, 131047);

    let types: Vec<String> = sb.sends().iter().map(|s| s.type_.clone()).collect();
    assert_eq!(types, ["template", "text"]);
    sb.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fixed_errors_hit_only_matching_sends() {
    let sb = start(SandboxConfig {
        fixed_errors: vec![FixedError {
            phone_number_id: Some(NUMBER.into()),
            to: None,
            code: 131026,
        }],
        ..config()
    })
    .await;
    let c = client();
    let a = send(&c, &sb, NUMBER, &text_to("+14155550123")).await;
    let e = assert_meta_error(&a, StatusCode::BAD_REQUEST, 131026);
    assert_eq!(e["message"], "(#131026) Message undeliverable");
    let a = send(&c, &sb, OTHER_NUMBER, &text_to("+14155550123")).await;
    assert_eq!(a.status, StatusCode::OK);

    // Changed at runtime: a recipient filter, and codes with their own HTTP status.
    sb.set_fixed_errors(vec![
        FixedError {
            phone_number_id: None,
            to: Some("+14155550999".into()),
            code: 131000,
        },
        FixedError {
            phone_number_id: Some(OTHER_NUMBER.into()),
            to: None,
            code: 190,
        },
    ]);
    let a = send(&c, &sb, NUMBER, &text_to("+1 415 555 0999")).await;
    assert_meta_error(&a, StatusCode::INTERNAL_SERVER_ERROR, 131000);
    let a = send(&c, &sb, OTHER_NUMBER, &text_to("+14155550123")).await;
    assert_meta_error(&a, StatusCode::UNAUTHORIZED, 190);
    let a = send(&c, &sb, NUMBER, &text_to("+14155550123")).await;
    assert_eq!(a.status, StatusCode::OK);
    assert_eq!(sb.sends().len(), 2);
    sb.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn injected_errors() {
    let c = client();
    let mut cfg = config();
    cfg.error_rates.http_5xx = 1.0;
    let sb = start(cfg).await;
    let a = send(&c, &sb, NUMBER, &text_to("+14155550123")).await;
    assert_eq!(a.status, StatusCode::INTERNAL_SERVER_ERROR);
    assert!(
        a.json.get("error").is_none(),
        "a bare 5xx has no Graph error"
    );
    sb.shutdown().await;

    let mut cfg = config();
    cfg.error_rates.code_131000 = 1.0;
    let sb = start(cfg).await;
    let a = send(&c, &sb, NUMBER, &text_to("+14155550123")).await;
    assert_meta_error(&a, StatusCode::INTERNAL_SERVER_ERROR, 131000);
    assert!(sb.sends().is_empty());
    sb.shutdown().await;

    let mut cfg = config();
    cfg.error_rates.timeout = 1.0;
    cfg.error_rates.timeout_hold = Duration::from_secs(60);
    let sb = start(cfg).await;
    let url = format!("{}/{NUMBER}/messages", sb.base_url());
    let req = Request::post(url)
        .header("authorization", format!("Bearer {TOKEN}"))
        .body(Full::new(Bytes::from(text_to("+14155550123").to_string())))
        .expect("request");
    let held = tokio::time::timeout(Duration::from_millis(500), c.request(req)).await;
    assert!(held.is_err(), "a timed-out request is not answered");
    assert_eq!(sb.attempts(), 1);
    assert!(sb.sends().is_empty());
    let t = Instant::now();
    sb.shutdown().await;
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "shutdown ends the hold"
    );

    let mut cfg = config();
    cfg.error_rates.slow = 1.0;
    cfg.error_rates.slow_delay = Duration::from_millis(300);
    let sb = start(cfg).await;
    let t = Instant::now();
    let a = send(&c, &sb, NUMBER, &text_to("+14155550123")).await;
    assert_eq!(a.status, StatusCode::OK);
    assert!(t.elapsed() >= Duration::from_millis(300));
    assert_eq!(sb.sends().len(), 1);
    sb.shutdown().await;

    let mut cfg = config();
    cfg.error_rates.slow = 2.0;
    assert!(Sandbox::start(cfg).await.is_err());
}

/// A bare webhook receiver: verifies `X-Hub-Signature-256` over the raw
/// bytes, records verified bodies, answers 500 to the first `fail_first`.
struct Receiver {
    addr: SocketAddr,
    bodies: Arc<Mutex<Vec<Value>>>,
    raw: Arc<Mutex<Vec<Bytes>>>,
    bad_signatures: Arc<Mutex<usize>>,
    posts: Arc<Mutex<usize>>,
    task: tokio::task::JoinHandle<()>,
}

impl Receiver {
    async fn start(secret: &'static str, fail_first: usize) -> Receiver {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let bodies = Arc::new(Mutex::new(Vec::new()));
        let raw = Arc::new(Mutex::new(Vec::new()));
        let bad = Arc::new(Mutex::new(0usize));
        let posts = Arc::new(Mutex::new(0usize));
        let (b, r, bd, p) = (bodies.clone(), raw.clone(), bad.clone(), posts.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let (b, r, bd, p) = (b.clone(), r.clone(), bd.clone(), p.clone());
                let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                    let (b, r, bd, p) = (b.clone(), r.clone(), bd.clone(), p.clone());
                    async move {
                        let sig = req
                            .headers()
                            .get("x-hub-signature-256")
                            .map(|v| v.as_bytes().to_vec());
                        let body = req
                            .into_body()
                            .collect()
                            .await
                            .map(|c| c.to_bytes())
                            .unwrap_or_default();
                        let n = {
                            let mut p = p.lock().expect("lock");
                            *p += 1;
                            *p
                        };
                        if n <= fail_first {
                            return Ok::<_, Infallible>(status(StatusCode::INTERNAL_SERVER_ERROR));
                        }
                        let secrets = [Secret::new(secret)];
                        if wagate::meta::signature::verify(sig.as_deref(), &body, &secrets).is_err()
                        {
                            *bd.lock().expect("lock") += 1;
                            return Ok(status(StatusCode::UNAUTHORIZED));
                        }
                        let v: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
                        b.lock().expect("lock").push(v);
                        r.lock().expect("lock").push(body);
                        Ok(status(StatusCode::OK))
                    }
                });
                tokio::spawn(async move {
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        Receiver {
            addr,
            bodies,
            raw,
            bad_signatures: bad,
            posts,
            task,
        }
    }

    fn bodies(&self) -> Vec<Value> {
        self.bodies.lock().expect("lock").clone()
    }

    async fn wait_for(&self, n: usize, within: Duration) -> Vec<Value> {
        let end = Instant::now() + within;
        loop {
            let b = self.bodies();
            if b.len() >= n || Instant::now() > end {
                return b;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// The sandbox's webhook counters once `delivered` reached `n` (or after
/// 5 s): a body reaches the receiver just before the sandbox reads the 200
/// and counts it.
async fn settled_stats(sb: &Sandbox, n: u64) -> WebhookStats {
    let end = Instant::now() + Duration::from_secs(5);
    loop {
        let s = sb.webhook_stats();
        if s.delivered >= n || Instant::now() > end {
            return s;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn status(s: StatusCode) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::new()));
    *r.status_mut() = s;
    r
}

/// The single status of a status webhook body.
fn the_status(body: &Value) -> &Value {
    assert_eq!(body["object"], "whatsapp_business_account");
    let change = &body["entry"][0]["changes"][0];
    assert_eq!(change["field"], "messages");
    let statuses = change["value"]["statuses"].as_array().expect("statuses");
    assert_eq!(statuses.len(), 1);
    &statuses[0]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_webhooks_arrive_signed_in_order_with_the_opaque_data() {
    const SECRET: &str = "sandbox-webhook-secret";
    // The first POST fails: the sandbox retries it.
    let rx = Receiver::start(SECRET, 1).await;
    let sb = start(SandboxConfig {
        status_webhook: Some(StatusWebhookConfig {
            url: format!("http://{}/webhook", rx.addr),
            app_secret: SECRET.into(),
            statuses: vec!["sent".into(), "delivered".into(), "read".into()],
            delay: Duration::from_millis(20),
        }),
        ..config()
    })
    .await;
    let c = client();
    let t = Instant::now();
    let a = send(&c, &sb, NUMBER, &text_request()).await;
    assert_eq!(a.status, StatusCode::OK);
    assert!(
        t.elapsed() < Duration::from_millis(500),
        "the answer does not wait for webhooks"
    );
    let wamid = a.json["messages"][0]["id"]
        .as_str()
        .expect("wamid")
        .to_string();

    let bodies = rx.wait_for(3, Duration::from_secs(10)).await;
    assert_eq!(bodies.len(), 3, "{bodies:?}");
    assert_eq!(*rx.bad_signatures.lock().expect("lock"), 0);
    assert_eq!(*rx.posts.lock().expect("lock"), 4, "one retry");
    let order: Vec<&str> = bodies
        .iter()
        .map(|b| the_status(b)["status"].as_str().unwrap_or(""))
        .collect();
    assert_eq!(order, ["sent", "delivered", "read"]);
    for b in &bodies {
        let st = the_status(b);
        assert_eq!(st["id"], wamid.as_str());
        assert_eq!(st["recipient_id"], "14155550123");
        assert_eq!(st["biz_opaque_callback_data"], "job=8f2c1e7a;attempt=1");
        let ts = st["timestamp"].as_str().expect("timestamp is a string");
        assert!(
            ts.len() == 10 && ts.bytes().all(|c| c.is_ascii_digit()),
            "{ts}"
        );
        let value = &b["entry"][0]["changes"][0]["value"];
        assert_eq!(value["messaging_product"], "whatsapp");
        assert_eq!(value["metadata"]["phone_number_id"], NUMBER);
        assert!(value["metadata"]["display_phone_number"].is_string());
    }
    // Compact JSON, signed over the exact bytes.
    for raw in rx.raw.lock().expect("lock").iter() {
        assert!(!raw.contains(&b'\n'));
        let v: Value = serde_json::from_slice(raw).expect("json");
        assert_eq!(serde_json::to_vec(&v).expect("json"), raw.to_vec());
    }

    // Without opaque data the field is absent.
    let a = send(&c, &sb, NUMBER, &template_to("+5511987654321")).await;
    assert_eq!(a.status, StatusCode::OK);
    let bodies = rx.wait_for(6, Duration::from_secs(10)).await;
    assert_eq!(bodies.len(), 6);
    for b in &bodies[3..] {
        let st = the_status(b);
        assert_eq!(st["recipient_id"], "5511987654321");
        assert!(st.get("biz_opaque_callback_data").is_none(), "{st}");
    }
    assert_eq!(
        settled_stats(&sb, 6).await,
        WebhookStats {
            delivered: 6,
            failed: 0,
            dropped: 0
        }
    );
    sb.shutdown().await;
    rx.task.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhooks_only_go_to_loopback() {
    for url in [
        "http://192.0.2.1:8080/webhook",
        "https://127.0.0.1/webhook",
        "http://example.com/webhook",
    ] {
        let cfg = SandboxConfig {
            status_webhook: Some(StatusWebhookConfig {
                url: url.into(),
                app_secret: "s".into(),
                statuses: vec!["sent".into()],
                delay: Duration::ZERO,
            }),
            ..config()
        };
        assert!(Sandbox::start(cfg).await.is_err(), "{url}");
    }
    let dev = wagate::sandbox::sandbox_config_for_dev("http://127.0.0.1:9/webhook", "s");
    let sb = start(dev).await;
    assert!(sb.base_url().starts_with("http://127.0.0.1:"));
    assert!(sb.base_url().ends_with("/v23.0"));
    sb.shutdown().await;
}

// ---- Users by BSUID (IDENTITY.md, DESIGN.md §10) ----

/// `payloads/identity_send_request_to_bsuid.json`'s BSUID.
const BSUID: &str = "BR.8821736450019923";
/// A username user's phone (its BSUID is `bsuid_of(USERNAME_PHONE)`).
const USERNAME_PHONE: &str = "5511987650001";

fn text_by_recipient(recipient: &str) -> Value {
    json!({"messaging_product": "whatsapp", "recipient_type": "individual",
           "recipient": recipient, "type": "text", "text": {"body": "Temos em azul, sim."}})
}

fn template_by_recipient(recipient: &str, name: &str) -> Value {
    json!({"messaging_product": "whatsapp", "recipient_type": "individual",
           "recipient": recipient, "type": "template",
           "template": {"name": name, "language": {"code": "pt_BR"},
                        "components": [{"type": "button", "sub_type": "url", "index": "0",
                                        "parameters": [{"type": "text", "text": "348121"}]}]}})
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_millis() as u64
}

fn ok(a: &Answer) {
    assert_eq!(
        a.status,
        StatusCode::OK,
        "{}",
        String::from_utf8_lossy(&a.raw)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_send_by_recipient_is_answered_with_the_user_id() {
    let sb = start(config()).await;
    let c = client();
    // payloads/identity_send_response_to_bsuid.json
    let a = send(&c, &sb, NUMBER, &text_by_recipient(BSUID)).await;
    ok(&a);
    assert_eq!(a.json["messaging_product"], "whatsapp");
    assert_eq!(
        a.json["contacts"],
        json!([{"input": BSUID, "user_id": BSUID}])
    );
    let wamid = a.json["messages"][0]["id"].as_str().expect("wamid");
    assert!(wamid.starts_with("wamid."), "{wamid}");
    // A parent BSUID is accepted too, echoed byte for byte.
    let a = send(&c, &sb, NUMBER, &text_by_recipient("BR.ENT.90017736450011")).await;
    ok(&a);
    assert_eq!(a.json["contacts"][0]["user_id"], "BR.ENT.90017736450011");

    // The BSUID of a phone the sandbox has seen resolves to that phone.
    ok(&send(&c, &sb, NUMBER, &text_to("+14155550123")).await);
    let known = bsuid_of("+1 415 555 0123");
    let a = send(&c, &sb, NUMBER, &text_by_recipient(&known)).await;
    ok(&a);
    assert_eq!(
        a.json["contacts"],
        json!([{"input": known, "user_id": known}])
    );

    let sends = sb.sends();
    assert_eq!(sends.len(), 4);
    assert_eq!(sends[0].recipient.as_deref(), Some(BSUID));
    assert_eq!((sends[0].to.as_str(), sends[0].wa_id.as_str()), ("", ""));
    assert_eq!(sends[0].wamid, wamid);
    assert_eq!(sends[0].body, text_by_recipient(BSUID));
    assert_eq!(sends[2].recipient, None);
    assert_eq!(sends[2].wa_id, "14155550123");
    assert_eq!(sends[3].recipient.as_deref(), Some(known.as_str()));
    assert_eq!(sends[3].to, "");
    assert_eq!(sends[3].wa_id, "14155550123");
    sb.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn to_wins_over_recipient() {
    let sb = start(config()).await;
    let c = client();
    let mut both = text_request();
    both["recipient"] = BSUID.into();
    let a = send(&c, &sb, NUMBER, &both).await;
    ok(&a);
    assert_eq!(
        a.json["contacts"],
        json!([{"input": "+14155550123", "wa_id": "14155550123"}])
    );
    // Ignored means not even checked.
    both["recipient"] = "not a bsuid".into();
    ok(&send(&c, &sb, NUMBER, &both).await);
    let sends = sb.sends();
    assert_eq!(sends.len(), 2);
    for s in &sends {
        assert_eq!(s.recipient, None);
        assert_eq!(
            (s.to.as_str(), s.wa_id.as_str()),
            ("+14155550123", "14155550123")
        );
    }
    sb.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_recipient_is_131009_and_neither_is_131008() {
    let sb = start(config()).await;
    let c = client();
    for bad in [
        json!("br.8821736450019923"),
        json!("+5511987650001"),
        json!("BR.8821-7364"),
        json!("BR."),
        json!(format!("BR.{}", "1".repeat(129))),
        json!(""),
        json!(8821736450019923u64),
    ] {
        let mut body = text_by_recipient(BSUID);
        body["recipient"] = bad.clone();
        let a = send(&c, &sb, NUMBER, &body).await;
        let e = assert_meta_error(&a, StatusCode::BAD_REQUEST, 131009);
        let details = e["error_data"]["details"].as_str().unwrap_or("");
        assert!(details.starts_with("Param recipient "), "{bad}: {details}");
    }
    let mut neither = text_by_recipient(BSUID);
    neither.as_object_mut().map(|o| o.remove("recipient"));
    let a = send(&c, &sb, NUMBER, &neither).await;
    let e = assert_meta_error(&a, StatusCode::BAD_REQUEST, 131008);
    let details = e["error_data"]["details"].as_str().unwrap_or("");
    assert!(
        details.contains("to") && details.contains("recipient"),
        "{details}"
    );
    assert!(sb.sends().is_empty());
    sb.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_authentication_template_by_recipient_is_131062() {
    let sb = start(config()).await;
    let c = client();
    for name in ["otp", "auth_code"] {
        let a = send(&c, &sb, NUMBER, &template_by_recipient(BSUID, name)).await;
        // payloads/identity_error_131062.json
        let e = assert_meta_error(&a, StatusCode::BAD_REQUEST, 131062);
        assert_eq!(
            e["message"],
            "(#131062) BSUID recipients are not supported for this message."
        );
        assert_eq!(
            e["error_data"]["details"],
            "Authentication templates with one-tap, zero-tap or copy-code buttons need a phone number recipient."
        );
    }
    // Known phone or not, by recipient it is refused.
    ok(&send(&c, &sb, NUMBER, &text_to("+14155550123")).await);
    let a = send(
        &c,
        &sb,
        NUMBER,
        &template_by_recipient(&bsuid_of("14155550123"), "otp"),
    )
    .await;
    assert_meta_error(&a, StatusCode::BAD_REQUEST, 131062);
    assert_eq!(sb.sends().len(), 1);

    // By phone it is accepted, also when a recipient rides along.
    let mut by_phone = template_by_recipient(BSUID, "otp");
    by_phone.as_object_mut().map(|o| o.remove("recipient"));
    by_phone["to"] = "+14155550123".into();
    let a = send(&c, &sb, NUMBER, &by_phone).await;
    ok(&a);
    assert_eq!(a.json["messages"][0]["message_status"], "accepted");
    by_phone["recipient"] = BSUID.into();
    ok(&send(&c, &sb, NUMBER, &by_phone).await);
    // Other templates by recipient are accepted.
    let a = send(
        &c,
        &sb,
        NUMBER,
        &template_by_recipient(BSUID, "order_shipped_v3"),
    )
    .await;
    ok(&a);
    assert_eq!(a.json["contacts"][0]["user_id"], BSUID);
    assert_eq!(sb.sends().len(), 4);
    sb.shutdown().await;

    // The list is configurable.
    let sb = start(SandboxConfig {
        authentication_templates: vec!["login_code".into()],
        ..config()
    })
    .await;
    let a = send(&c, &sb, NUMBER, &template_by_recipient(BSUID, "login_code")).await;
    assert_meta_error(&a, StatusCode::BAD_REQUEST, 131062);
    ok(&send(&c, &sb, NUMBER, &template_by_recipient(BSUID, "otp")).await);
    sb.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn statuses_of_a_username_user_carry_the_bsuid_only() {
    const SECRET: &str = "sandbox-webhook-secret";
    let rx = Receiver::start(SECRET, 0).await;
    let sb = start(SandboxConfig {
        status_webhook: Some(StatusWebhookConfig {
            url: format!("http://{}/webhook", rx.addr),
            app_secret: SECRET.into(),
            statuses: vec!["sent".into(), "delivered".into(), "read".into()],
            delay: Duration::from_millis(10),
        }),
        username_users: vec![format!("+{USERNAME_PHONE}")],
        ..config()
    })
    .await;
    let c = client();
    let user = bsuid_of(USERNAME_PHONE);

    // By BSUID to the username user: no phone anywhere.
    let a = send(&c, &sb, NUMBER, &text_by_recipient(&user)).await;
    ok(&a);
    let wamid = a.json["messages"][0]["id"]
        .as_str()
        .expect("wamid")
        .to_string();
    let bodies = rx.wait_for(3, Duration::from_secs(10)).await;
    assert_eq!(bodies.len(), 3, "{bodies:?}");
    for b in &bodies {
        let st = the_status(b);
        assert_eq!(st["id"], wamid.as_str());
        assert!(st.get("recipient_id").is_none(), "{st}");
        assert_eq!(st["recipient_user_id"], user.as_str());
        let contacts = &b["entry"][0]["changes"][0]["value"]["contacts"];
        assert_eq!(contacts.as_array().map(Vec::len), Some(1), "{b}");
        assert_eq!(contacts[0]["user_id"], user.as_str());
        assert!(contacts[0].get("wa_id").is_none(), "{contacts}");
        let username = &contacts[0]["profile"]["username"];
        if st["status"] == "sent" {
            assert!(username.is_null(), "{contacts}");
        } else {
            assert_eq!(username, "@user0001", "{contacts}");
        }
    }
    for raw in rx.raw.lock().expect("lock").iter() {
        let text = String::from_utf8_lossy(raw);
        assert!(!text.contains(USERNAME_PHONE), "{text}");
    }

    // By phone to another user: both ids, in the status and in contacts.
    let a = send(&c, &sb, NUMBER, &text_to("+14155550123")).await;
    ok(&a);
    let bodies = rx.wait_for(6, Duration::from_secs(10)).await;
    assert_eq!(bodies.len(), 6);
    let other = bsuid_of("14155550123");
    for b in &bodies[3..] {
        let st = the_status(b);
        assert_eq!(st["recipient_id"], "14155550123");
        assert_eq!(st["recipient_user_id"], other.as_str());
        let contact = &b["entry"][0]["changes"][0]["value"]["contacts"][0];
        assert_eq!(contact["wa_id"], "14155550123");
        assert_eq!(contact["user_id"], other.as_str());
        assert!(contact["profile"]["name"].is_string());
        assert!(contact["profile"].get("username").is_none());
    }
    // By BSUID to that (now known) user: both ids as well.
    ok(&send(&c, &sb, NUMBER, &text_by_recipient(&other)).await);
    let bodies = rx.wait_for(9, Duration::from_secs(10)).await;
    assert_eq!(bodies.len(), 9);
    for b in &bodies[6..] {
        let st = the_status(b);
        assert_eq!(st["recipient_id"], "14155550123");
        assert_eq!(st["recipient_user_id"], other.as_str());
    }
    assert_eq!(settled_stats(&sb, 9).await.delivered, 9);
    sb.shutdown().await;
    rx.task.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inbound_body_opens_the_window_for_sends_by_recipient() {
    let sb = start(SandboxConfig {
        enforce_window: true,
        username_users: vec![USERNAME_PHONE.into()],
        ..config()
    })
    .await;
    let c = client();
    let phone = "14155550123";
    let user = bsuid_of(phone);
    let a = send(&c, &sb, NUMBER, &text_by_recipient(&user)).await;
    assert_meta_error(&a, StatusCode::BAD_REQUEST, 131047);

    // payloads/identity_inbound_phone_and_bsuid.json
    let body = sb.inbound_body(NUMBER, &format!("+{phone}"), "wamid.IN1", "oi");
    let v: Value = serde_json::from_slice(&body).expect("json");
    assert_eq!(serde_json::to_vec(&v).expect("json"), body, "compact JSON");
    let value = &v["entry"][0]["changes"][0]["value"];
    assert_eq!(v["entry"][0]["changes"][0]["field"], "messages");
    assert_eq!(value["metadata"]["phone_number_id"], NUMBER);
    let m = &value["messages"][0];
    assert_eq!(m["from"], phone);
    assert_eq!(m["from_user_id"], user.as_str());
    assert_eq!(m["id"], "wamid.IN1");
    assert_eq!(m["type"], "text");
    assert_eq!(m["text"]["body"], "oi");
    let ts: u64 = m["timestamp"]
        .as_str()
        .expect("timestamp")
        .parse()
        .expect("secs");
    assert!(ts.abs_diff(now_ms() / 1000) < 60);
    assert_eq!(value["contacts"][0]["wa_id"], phone);
    assert_eq!(value["contacts"][0]["user_id"], user.as_str());
    assert!(value["contacts"][0]["profile"]["name"].is_string());

    // The window is open for the user however the send addresses them.
    ok(&send(&c, &sb, NUMBER, &text_by_recipient(&user)).await);
    ok(&send(&c, &sb, NUMBER, &text_to("+14155550123")).await);
    // Still per number, and per user.
    let a = send(&c, &sb, OTHER_NUMBER, &text_by_recipient(&user)).await;
    assert_meta_error(&a, StatusCode::BAD_REQUEST, 131047);
    let a = send(&c, &sb, NUMBER, &text_by_recipient(BSUID)).await;
    assert_meta_error(&a, StatusCode::BAD_REQUEST, 131047);

    // payloads/identity_inbound_username_only.json: BSUID only.
    let uname = bsuid_of(USERNAME_PHONE);
    let body = sb.inbound_body(NUMBER, USERNAME_PHONE, "wamid.IN2", "Tem em azul?");
    assert!(!String::from_utf8_lossy(&body).contains(USERNAME_PHONE));
    let v: Value = serde_json::from_slice(&body).expect("json");
    let value = &v["entry"][0]["changes"][0]["value"];
    let m = &value["messages"][0];
    assert!(m.get("from").is_none(), "{m}");
    assert_eq!(m["from_user_id"], uname.as_str());
    let contact = &value["contacts"][0];
    assert!(contact.get("wa_id").is_none(), "{contact}");
    assert_eq!(contact["user_id"], uname.as_str());
    assert_eq!(contact["profile"]["username"], "@user0001");
    ok(&send(&c, &sb, NUMBER, &text_by_recipient(&uname)).await);
    ok(&send(&c, &sb, NUMBER, &text_to(USERNAME_PHONE)).await);

    // record_inbound takes a BSUID too.
    sb.record_inbound(NUMBER, BSUID, now_ms());
    ok(&send(&c, &sb, NUMBER, &text_by_recipient(BSUID)).await);
    assert_eq!(sb.sends().len(), 5);
    sb.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pair_limit_counts_phone_and_bsuid_of_one_user_together() {
    let sb = start(SandboxConfig {
        pair_rate: Some(PairRate {
            per: Duration::from_secs(6),
            burst: 3,
        }),
        ..config()
    })
    .await;
    let c = client();
    let user = bsuid_of("14155550123");
    ok(&send(&c, &sb, NUMBER, &text_to("+14155550123")).await);
    ok(&send(&c, &sb, NUMBER, &text_by_recipient(&user)).await);
    ok(&send(&c, &sb, NUMBER, &text_to("14155550123")).await);
    for body in [text_by_recipient(&user), text_to("+1 415 555 0123")] {
        let a = send(&c, &sb, NUMBER, &body).await;
        assert_meta_error(&a, StatusCode::BAD_REQUEST, 131056);
    }
    // A BSUID the sandbox cannot resolve is a user of its own.
    for _ in 0..3 {
        ok(&send(&c, &sb, NUMBER, &text_by_recipient(BSUID)).await);
    }
    let a = send(&c, &sb, NUMBER, &text_by_recipient(BSUID)).await;
    assert_meta_error(&a, StatusCode::BAD_REQUEST, 131056);
    // Before its phone is seen, a BSUID is counted on its own.
    let fresh = bsuid_of("14155550124");
    for _ in 0..3 {
        ok(&send(&c, &sb, NUMBER, &text_by_recipient(&fresh)).await);
    }
    ok(&send(&c, &sb, NUMBER, &text_to("+14155550124")).await);
    assert_eq!(sb.sends().len(), 10);
    sb.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fixed_errors_follow_the_user_and_know_the_new_codes() {
    let sb = start(SandboxConfig {
        fixed_errors: vec![
            FixedError {
                phone_number_id: None,
                to: Some("+14155550123".into()),
                code: 137000,
            },
            FixedError {
                phone_number_id: None,
                to: Some(BSUID.into()),
                code: 131057,
            },
        ],
        ..config()
    })
    .await;
    let c = client();
    let user = bsuid_of("14155550123");
    // Not yet seen: its BSUID is not the phone.
    ok(&send(&c, &sb, NUMBER, &text_by_recipient(&user)).await);
    let a = send(&c, &sb, NUMBER, &text_to("+14155550123")).await;
    let e = assert_meta_error(&a, StatusCode::BAD_REQUEST, 137000);
    assert_eq!(e["message"], "(#137000) Identity key hash mismatch");
    // Seen now (the refused send counts): the BSUID is the phone.
    let a = send(&c, &sb, NUMBER, &text_by_recipient(&user)).await;
    assert_meta_error(&a, StatusCode::BAD_REQUEST, 137000);
    let a = send(&c, &sb, NUMBER, &text_by_recipient(BSUID)).await;
    assert_meta_error(&a, StatusCode::INTERNAL_SERVER_ERROR, 131057);

    // A BSUID filter matches sends to its phone as well.
    let mut codes = Vec::new();
    for code in [131063, 132018, 134100, 134101, 134102] {
        sb.set_fixed_errors(vec![FixedError {
            phone_number_id: Some(NUMBER.into()),
            to: Some(bsuid_of("14155550199")),
            code,
        }]);
        let a = send(&c, &sb, NUMBER, &template_to("+14155550199")).await;
        let e = assert_meta_error(&a, StatusCode::BAD_REQUEST, code);
        codes.push(e["message"].as_str().unwrap_or("").to_string());
    }
    assert!(
        codes.iter().all(|m| !m.ends_with(") Error")),
        "every new code has its title: {codes:?}"
    );
    assert_eq!(sb.sends().len(), 1);
    sb.shutdown().await;
}

/// The account endpoints (src/sandbox/account.rs) over HTTP: number fields,
/// `subscribed_apps`, app subscriptions, `debug_token`, the HTTP controls,
/// a restricted WABA's sends answered 131031, the rate following the level,
/// and 5xx injection.
#[tokio::test]
async fn account_endpoints_and_controls() {
    use wagate::sandbox::account::{APP_ID, WABA_ID};
    let mut cfg = config();
    cfg.default_throughput = 5;
    cfg.high_throughput = 50;
    let sb = start(cfg).await;
    let c = client();
    let base = sb.base_url();
    let get = |path: String, token: Option<&'static str>| {
        let c = c.clone();
        async move { request(&c, "GET", &path, token, Vec::new()).await }
    };
    let a = get(
        format!("{base}/{NUMBER}?fields=throughput,quality_rating,whatsapp_business_manager_messaging_limit,name_status,status,display_phone_number,webhook_configuration"),
        Some(TOKEN),
    )
    .await;
    assert_eq!(
        a.status,
        StatusCode::OK,
        "{}",
        String::from_utf8_lossy(&a.raw)
    );
    assert_eq!(a.json["throughput"]["level"], "STANDARD");
    assert_eq!(a.json["quality_rating"], "GREEN");
    assert_eq!(
        a.json["whatsapp_business_manager_messaging_limit"],
        "TIER_2K"
    );
    assert_eq!(a.json["name_status"], "APPROVED");
    assert_eq!(a.json["status"], "CONNECTED");
    assert!(
        a.json.get("verified_name").is_none(),
        "only the fields asked"
    );
    assert_meta_error(
        &get(format!("{base}/{NUMBER}?fields=status"), None).await,
        StatusCode::UNAUTHORIZED,
        190,
    );

    // subscribed_apps: subscribed by default; DELETE, GET, POST.
    let path = format!("{base}/{WABA_ID}/subscribed_apps");
    let a = get(path.clone(), Some(TOKEN)).await;
    assert_eq!(
        a.json["data"][0]["whatsapp_business_api_data"]["id"],
        APP_ID
    );
    request(&c, "DELETE", &path, Some(TOKEN), Vec::new()).await;
    assert_eq!(get(path.clone(), Some(TOKEN)).await.json["data"], json!([]));
    let a = request(&c, "POST", &path, Some(TOKEN), Vec::new()).await;
    assert_eq!(a.json["success"], true);
    assert!(sb.is_subscribed(WABA_ID));

    // debug_token with the app token; app subscriptions.
    let app_token: &'static str = Box::leak(format!("{APP_ID}|secret").into_boxed_str());
    let a = get(
        format!("{base}/debug_token?input_token={TOKEN}"),
        Some(app_token),
    )
    .await;
    assert_eq!(a.json["data"]["is_valid"], true, "{}", a.json);
    assert_eq!(a.json["data"]["scopes"][1], "whatsapp_business_management");
    let a = get(
        format!("{base}/debug_token?input_token=nope"),
        Some(app_token),
    )
    .await;
    assert_eq!(a.json["data"]["is_valid"], false);
    let a = get(format!("{base}/{APP_ID}/subscriptions"), Some(app_token)).await;
    assert_eq!(a.json["data"][0]["object"], "whatsapp_business_account");

    // STANDARD: 5/s; the HTTP control upgrades the number: 50/s.
    let burst = |n: usize| {
        let c = c.clone();
        let sb = &sb;
        async move {
            let mut limited = 0;
            for i in 0..n {
                let a = send(&c, sb, NUMBER, &template_to(&format!("+55119{i:07}"))).await;
                limited += usize::from(a.status != StatusCode::OK);
            }
            limited
        }
    };
    assert!(burst(20).await >= 10, "over 5/s: 130429");
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let a = request(
        &c,
        "POST",
        &format!(
            "http://{}/_sandbox/numbers/{NUMBER}/throughput_upgrade",
            sb.addr()
        ),
        Some(TOKEN),
        Vec::new(),
    )
    .await;
    assert_eq!(a.json["success"], true, "{}", a.json);
    assert_eq!(
        a.json["webhook_delivered"], false,
        "no webhook URL configured"
    );
    assert_eq!(sb.number_info(NUMBER).throughput_level, "HIGH");
    assert_eq!(burst(20).await, 0, "20 in a second fit 50/s");

    // A restricted WABA: 131031 until lifted.
    let ctl = format!("http://{}/_sandbox/wabas/{WABA_ID}/restriction", sb.addr());
    request(
        &c,
        "POST",
        &ctl,
        Some(TOKEN),
        br#"{"restricted":true}"#.to_vec(),
    )
    .await;
    assert_meta_error(
        &send(&c, &sb, NUMBER, &template_to("+5511911111111")).await,
        StatusCode::FORBIDDEN,
        131031,
    );
    request(
        &c,
        "POST",
        &ctl,
        Some(TOKEN),
        br#"{"restricted":false}"#.to_vec(),
    )
    .await;
    assert_eq!(
        send(&c, &sb, NUMBER, &template_to("+5511911111112"))
            .await
            .status,
        StatusCode::OK
    );

    // 5xx injection on the account endpoints only.
    sb.fail_account_requests(Some(503));
    let a = get(format!("{base}/{NUMBER}?fields=status"), Some(TOKEN)).await;
    assert_eq!(a.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(
        send(&c, &sb, NUMBER, &template_to("+5511911111113"))
            .await
            .status,
        StatusCode::OK
    );
    sb.shutdown().await;
}

/// The HTTP template control: a paused template refused with #132015, then
/// approved over HTTP (the signed `message_template_status_update` posted)
/// and sendable; a wrong body parameter count is #132000; a category change posts `template_category_update`; an
/// unknown template is 404 #100, a body naming neither field 400 #100, and
/// a call without a token 401 #190.
#[tokio::test]
async fn templates_change_over_http_and_post_their_webhooks() {
    use wagate::sandbox::account::WABA_ID;
    const SECRET: &str = "sandbox-template-secret";
    let rx = Receiver::start(SECRET, 0).await;
    let sb = start(SandboxConfig {
        status_webhook: Some(StatusWebhookConfig {
            url: format!("http://{}/webhook", rx.addr),
            app_secret: SECRET.into(),
            // No status webhooks: only the template webhooks arrive.
            statuses: vec![],
            delay: Duration::from_millis(1),
        }),
        templates: Some(wagate::sandbox::dev_templates()),
        ..config()
    })
    .await;
    let c = client();
    let paused = |to: &str| {
        json!({"messaging_product": "whatsapp", "to": to, "type": "template",
               "template": {"name": "spring_sale_2026", "language": {"code": "en_US"},
                            "components": [{"type": "body", "parameters": [
                                {"type": "text", "text": "20%"}, {"type": "text", "text": "Sunday"}]}]}})
    };
    assert_meta_error(
        &send(&c, &sb, NUMBER, &paused("+14155550123")).await,
        StatusCode::BAD_REQUEST,
        132015,
    );
    let ctl = |name: &str, lang: &str| {
        format!(
            "http://{}/_sandbox/wabas/{WABA_ID}/templates/{name}/{lang}",
            sb.addr()
        )
    };
    let a = request(
        &c,
        "POST",
        &ctl("spring_sale_2026", "en_US"),
        Some(TOKEN),
        br#"{"status":"approved"}"#.to_vec(),
    )
    .await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.json);
    assert_eq!(a.json["webhook_delivered"], true, "{}", a.json);
    let t = sb
        .templates()
        .into_iter()
        .find(|t| t.name == "spring_sale_2026")
        .expect("in the library");
    assert_eq!(t.status, "APPROVED");
    // The webhook: signed, the WABA's entry, Meta's field and event.
    let bodies = rx.wait_for(1, Duration::from_secs(10)).await;
    assert_eq!(*rx.bad_signatures.lock().expect("lock"), 0);
    let change = &bodies[0]["entry"][0]["changes"][0];
    assert_eq!(bodies[0]["entry"][0]["id"], WABA_ID);
    assert_eq!(change["field"], "message_template_status_update");
    assert_eq!(change["value"]["event"], "APPROVED");
    assert_eq!(change["value"]["message_template_name"], "spring_sale_2026");
    assert_eq!(change["value"]["message_template_language"], "en_US");
    let a = send(&c, &sb, NUMBER, &paused("+14155550124")).await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.json);

    // Another number of body parameters than placeholders: #132000.
    let reminder = |params: &[&str]| {
        let ps: Vec<Value> = params
            .iter()
            .map(|p| json!({"type": "text", "text": p}))
            .collect();
        json!({"messaging_product": "whatsapp", "to": "+14155550125", "type": "template",
               "template": {"name": "appointment_reminder", "language": {"code": "en_US"},
                            "components": [{"type": "body", "parameters": ps}]}})
    };
    assert_meta_error(
        &send(&c, &sb, NUMBER, &reminder(&["Ana"])).await,
        StatusCode::BAD_REQUEST,
        132000,
    );
    let a = send(&c, &sb, NUMBER, &reminder(&["Ana", "Monday 10:00"])).await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.json);

    // A category change.
    let a = request(
        &c,
        "POST",
        &ctl("order_shipped", "pt_BR"),
        Some(TOKEN),
        br#"{"category":"marketing"}"#.to_vec(),
    )
    .await;
    assert_eq!(a.json["webhook_delivered"], true, "{}", a.json);
    let bodies = rx.wait_for(2, Duration::from_secs(10)).await;
    let change = &bodies
        .iter()
        .find(|b| b["entry"][0]["changes"][0]["field"] == "template_category_update")
        .expect("a category webhook")["entry"][0]["changes"][0];
    assert_eq!(change["value"]["new_category"], "MARKETING");
    assert_eq!(change["value"]["previous_category"], "UTILITY");

    // Refusals.
    let a = request(
        &c,
        "POST",
        &ctl("no_such_template", "en_US"),
        Some(TOKEN),
        br#"{"status":"PAUSED"}"#.to_vec(),
    )
    .await;
    assert_meta_error(&a, StatusCode::NOT_FOUND, 100);
    let a = request(
        &c,
        "POST",
        &ctl("order_shipped", "en_US"),
        Some(TOKEN),
        br#"{"paused":true}"#.to_vec(),
    )
    .await;
    assert_meta_error(&a, StatusCode::BAD_REQUEST, 100);
    let a = request(
        &c,
        "POST",
        &ctl("order_shipped", "en_US"),
        None,
        br#"{"status":"PAUSED"}"#.to_vec(),
    )
    .await;
    assert_meta_error(&a, StatusCode::UNAUTHORIZED, 190);
    assert_eq!(rx.bodies().len(), 2, "refused calls post nothing");
    sb.shutdown().await;
}
