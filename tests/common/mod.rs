//! Shared test harness: a real gateway on loopback, a real HTTP client, and a
//! real Kafka reader. Broker tests need a Kafka-protocol broker at
//! `WAGATE_TEST_BROKERS` (the README's test command starts Tansu and sets it).
#![allow(dead_code)]

pub mod broker;
pub mod measure;
pub mod process;
pub mod requests;
pub mod secure_broker;
pub mod tls;

#[allow(unused_imports)]
pub use broker::{brokers, unique_prefix};
#[allow(unused_imports)]
pub use requests::{template, template_request};

use std::collections::{BTreeMap, HashMap};
use std::time::Instant;

use serde_json::Value;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Request, StatusCode};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

use wagate::app::Gateway;
use wagate::config::{self, KafkaConfig, LoadOptions};
use wagate::kafka::{self, TailRecord};

pub const SECRET: &str = "test-app-secret";
pub const VERIFY: &str = "test-verify-token";

pub fn env() -> BTreeMap<String, String> {
    [
        ("WAGATE_APP_SECRET", SECRET),
        ("WAGATE_VERIFY_TOKEN", VERIFY),
        ("WAGATE_API_TOKEN", "test-api-token"),
        ("WAGATE_ACCESS_TOKEN", "test-access-token"),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect()
}

/// A config for a gateway on free loopback ports. `extra` is TOML appended
/// to the example config's sections via environment overrides.
pub fn config(brokers: &str, prefix: &str, overrides: &[(&str, &str)]) -> config::Config {
    let mut e = env();
    e.insert("WAGATE_KAFKA_BROKERS".into(), brokers.into());
    e.insert("WAGATE_TOPIC_PREFIX".into(), prefix.into());
    e.insert("WAGATE_LISTEN".into(), "127.0.0.1:0".into());
    e.insert("WAGATE_INTERNAL_LISTEN".into(), "127.0.0.1:0".into());
    e.insert("WAGATE_KAFKA_PARTITIONS".into(), "3".into());
    // A consumer group per test: groups are shared across topics, so one
    // test's members must not take part in another's rebalances.
    e.insert("WAGATE_EGRESS_GROUP_ID".into(), format!("{prefix}egress"));
    e.insert("WAGATE_MEDIA_GROUP_ID".into(), format!("{prefix}media"));
    e.insert("WAGATE_MEDIA_STORE".into(), media_store_for(prefix));
    for (k, v) in overrides {
        e.insert(k.to_string(), v.to_string());
    }
    config::load(None, &e, LoadOptions::default()).expect("test config")
}

/// A media folder of the test's own (`file://…/media-{prefix}` in the
/// scratch directory).
pub fn media_store_for(prefix: &str) -> String {
    let dir = option_env!("CARGO_TARGET_TMPDIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    format!(
        "file://{}/media-{}",
        dir.display(),
        prefix.trim_end_matches('.')
    )
}

pub async fn create_topics(cfg: &KafkaConfig) {
    let created = kafka::create_topics(cfg).await.expect("create topics");
    assert_eq!(created.len(), kafka::TOPICS.len());
}

/// Logs to the test's output when `WAGATE_TEST_LOG` is set (e.g. `info`).
pub fn init_logs() {
    if let Ok(level) = std::env::var("WAGATE_TEST_LOG") {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new(level))
            .with_test_writer()
            .try_init();
    }
}

/// A `wagate serve` process with the test secrets (API token `t`, Graph
/// token `a`), the broker and a prefix, both listeners on free loopback
/// ports and an egress group of its own; override any variable after.
pub fn gateway_process(brokers: &str, prefix: &str) -> process::GatewayProcess {
    process::GatewayProcess::new()
        .env("WAGATE_APP_SECRET", SECRET)
        .env("WAGATE_VERIFY_TOKEN", VERIFY)
        .env("WAGATE_API_TOKEN", "t")
        .env("WAGATE_ACCESS_TOKEN", "a")
        .env("WAGATE_KAFKA_BROKERS", brokers)
        .env("WAGATE_TOPIC_PREFIX", prefix)
        .env("WAGATE_LISTEN", "127.0.0.1:0")
        .env("WAGATE_INTERNAL_LISTEN", "127.0.0.1:0")
        .env("WAGATE_EGRESS_GROUP_ID", format!("{prefix}egress"))
        .env("WAGATE_MEDIA_GROUP_ID", format!("{prefix}media"))
        .env("WAGATE_MEDIA_STORE", media_store_for(prefix))
        .env("WAGATE_LOG", "info")
}

/// Creates the topics and starts a gateway, waiting until it is ready.
pub async fn start(brokers: &str, prefix: &str, overrides: &[(&str, &str)]) -> Gateway {
    init_logs();
    let cfg = config(brokers, prefix, overrides);
    create_topics(&cfg.kafka).await;
    let gw = Gateway::start(cfg).await.expect("gateway starts");
    assert!(
        gw.wait_ready(Duration::from_secs(20)).await,
        "gateway never became ready"
    );
    gw
}

/// [`start`] with the gateway's Graph API pointed at the sandbox `sb`.
pub async fn start_on(
    brokers: &str,
    prefix: &str,
    sb: &wagate::sandbox::Sandbox,
    overrides: &[(&str, &str)],
) -> Gateway {
    let url = sb.base_url();
    let mut all = vec![("WAGATE_GRAPH_BASE_URL", url.as_str())];
    all.extend_from_slice(overrides);
    start(brokers, prefix, &all).await
}

pub fn sign(body: &[u8]) -> String {
    wagate::meta::signature::sign(SECRET.as_bytes(), body)
}

pub struct Resp {
    pub status: StatusCode,
    pub version: hyper::Version,
    pub headers: hyper::HeaderMap,
    pub body: Bytes,
}

pub async fn request(req: Request<Full<Bytes>>) -> Resp {
    try_request(req)
        .await
        .unwrap_or_else(|e| panic!("request: {e}"))
}

/// As [`request`], with a transport error (or no answer in 30 s) returned.
pub async fn try_request(req: Request<Full<Bytes>>) -> Result<Resp, String> {
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    try_request_on(&client, req).await
}

/// As [`try_request`], on a client of the caller's (HTTPS, pooled or not).
pub async fn try_request_on<C>(
    client: &Client<C, Full<Bytes>>,
    req: Request<Full<Bytes>>,
) -> Result<Resp, String>
where
    C: hyper_util::client::legacy::connect::Connect + Clone + Send + Sync + 'static,
{
    let resp = tokio::time::timeout(Duration::from_secs(30), client.request(req))
        .await
        .map_err(|_| "no response within 30s".to_string())?
        .map_err(|e| format!("{e:?}"))?;
    let status = resp.status();
    let version = resp.version();
    let headers = resp.headers().clone();
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| format!("body: {e:?}"))?
        .to_bytes();
    Ok(Resp {
        status,
        version,
        headers,
        body,
    })
}

/// POSTs a body signed with the test secret.
pub async fn post_signed(addr: SocketAddr, path: &str, body: &[u8]) -> Resp {
    post(addr, path, body, Some(&sign(body))).await
}

pub async fn post(addr: SocketAddr, path: &str, body: &[u8], sig: Option<&str>) -> Resp {
    let mut b =
        Request::post(format!("http://{addr}{path}")).header("content-type", "application/json");
    if let Some(s) = sig {
        b = b.header("x-hub-signature-256", s);
    }
    request(b.body(Full::new(Bytes::copy_from_slice(body))).unwrap()).await
}

pub async fn get(url: &str) -> Resp {
    request(Request::get(url).body(Full::new(Bytes::new())).unwrap()).await
}

/// Reads every record of `prefix` + `name` until none arrived for `idle`.
pub async fn read_all(brokers: &str, prefix: &str, name: &str, idle: Duration) -> Vec<TailRecord> {
    let conn = kafka::Connection::plaintext(brokers);
    let topic = format!("{prefix}{name}");
    tokio::task::spawn_blocking(move || {
        let mut out = Vec::new();
        let opts = kafka::ReadOptions {
            from_beginning: true,
            max: None,
            idle_timeout: Some(idle),
        };
        kafka::read_topic(&conn, &topic, &opts, |r| out.push(r)).expect("read topic");
        out
    })
    .await
    .unwrap()
}

/// A fixture from tests/fixtures, minified to Meta's compact wire form.
pub fn fixture(name: &str) -> Vec<u8> {
    let path = format!("{}/tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"));
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    serde_json::to_vec(&v).unwrap()
}

/// A text-message webhook with the given wamids, one entry.
pub fn text_webhook(phone_number_id: &str, wamids: &[&str]) -> Vec<u8> {
    let msgs: Vec<serde_json::Value> = wamids
        .iter()
        .map(|id| serde_json::json!({"from":"14155550123","id":id,"timestamp":"1781600500","type":"text","text":{"body":format!("hello {id}")}}))
        .collect();
    serde_json::to_vec(&serde_json::json!({
        "object":"whatsapp_business_account",
        "entry":[{"id":"102345678901234","changes":[{"field":"messages","value":{
            "messaging_product":"whatsapp",
            "metadata":{"display_phone_number":"15550199999","phone_number_id":phone_number_id},
            "contacts":[{"profile":{"name":"Ana"},"wa_id":"14155550123"}],
            "messages":msgs}}]}]
    }))
    .unwrap()
}

/// Every record on `outbound.results` until none arrived for `idle`, by
/// request id, in topic order.
pub async fn results_by_id(
    brokers: &str,
    prefix: &str,
    idle: Duration,
) -> std::collections::HashMap<String, Vec<TailRecord>> {
    let mut by: std::collections::HashMap<String, Vec<TailRecord>> = Default::default();
    for r in read_all(brokers, prefix, "outbound.results", idle).await {
        by.entry(r.value["request_id"].as_str().unwrap_or("").to_string())
            .or_default()
            .push(r);
    }
    by
}

pub fn event_ids(recs: &[TailRecord]) -> Vec<String> {
    recs.iter()
        .map(|r| r.headers["wagate-event-id"].as_str().unwrap().to_string())
        .collect()
}

/// Starts a Graph API sandbox on its own runtime (its own thread): like
/// Meta, it is another server, so its arrival times do not wait behind the
/// gateway's tasks.
pub async fn sandbox_on_own_runtime(
    cfg: wagate::sandbox::SandboxConfig,
) -> wagate::sandbox::Sandbox {
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let _ = tx.send(wagate::sandbox::Sandbox::start(cfg).await.unwrap());
            std::future::pending::<()>().await;
        });
    });
    rx.await.unwrap()
}

/// Produces requests straight to the requests topic, as upstream apps do.
pub async fn produce_requests(brokers: &str, prefix: &str, reqs: &[Value]) {
    let cfg = config(brokers, prefix, &[]);
    let p = wagate::kafka::KafkaProducer::new(&cfg.kafka).unwrap();
    let topic = format!("{prefix}outbound.requests");
    let mut futs = Vec::new();
    for r in reqs {
        let key = r["phone_number_id"].as_str().unwrap_or("").to_string();
        futs.push(
            p.send(&topic, key.as_bytes(), &serde_json::to_vec(r).unwrap(), &[])
                .unwrap(),
        );
    }
    for f in futs {
        f.await.unwrap();
    }
}

/// Reads results until `n` distinct request ids have one, or the deadline.
pub async fn results(
    brokers: &str,
    prefix: &str,
    n: usize,
    within: Duration,
) -> HashMap<String, Vec<Value>> {
    results_until(brokers, prefix, within, |by| by.len() >= n).await
}

/// Reads results (every result per request id) until `done` holds for them,
/// or the deadline; returns what it read last.
pub async fn results_until(
    brokers: &str,
    prefix: &str,
    within: Duration,
    done: impl Fn(&HashMap<String, Vec<Value>>) -> bool,
) -> HashMap<String, Vec<Value>> {
    let end = Instant::now() + within;
    loop {
        let by: HashMap<String, Vec<Value>> =
            results_by_id(brokers, prefix, Duration::from_millis(800))
                .await
                .into_iter()
                .map(|(id, recs)| (id, recs.into_iter().map(|r| r.value).collect()))
                .collect();
        if done(&by) || Instant::now() > end {
            return by;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// How many times the sandbox received each request id (by
/// `biz_opaque_callback_data`).
pub fn sends_by_request(sb: &wagate::sandbox::Sandbox) -> HashMap<String, usize> {
    let mut sends: HashMap<String, usize> = HashMap::new();
    for s in sb.sends() {
        *sends
            .entry(s.biz_opaque_callback_data.clone().unwrap_or_default())
            .or_default() += 1;
    }
    sends
}

/// After a crash: each of `ids` has exactly one result, was sent at most
/// once, and is `accepted` (then sent exactly once) or `unknown`. Returns how
/// many are `unknown`.
pub fn assert_one_result_none_sent_twice(
    by: &HashMap<String, Vec<Value>>,
    ids: &[String],
    sends: &HashMap<String, usize>,
) -> usize {
    let mut unknown = 0;
    for id in ids {
        let rs = by.get(id).unwrap_or_else(|| panic!("{id}: no result"));
        assert_eq!(rs.len(), 1, "{id}: {} results", rs.len());
        let sent = sends.get(id).copied().unwrap_or(0);
        assert!(sent <= 1, "{id} was sent {sent} times");
        match rs[0]["outcome"].as_str().unwrap() {
            "accepted" => assert_eq!(sent, 1, "{id}: accepted but not in the sandbox's log"),
            "unknown" => unknown += 1,
            other => panic!("{id}: unexpected outcome {other}"),
        }
    }
    unknown
}

/// Posts a signed webhook and asserts the 200 (showing the body if not).
pub async fn webhook_ok(addr: SocketAddr, body: &[u8]) {
    let r = post_signed(addr, "/webhook", body).await;
    assert_eq!(
        r.status,
        StatusCode::OK,
        "{}",
        String::from_utf8_lossy(&r.body)
    );
}

pub fn one<'a>(by: &'a HashMap<String, Vec<Value>>, id: &str) -> &'a Value {
    let v = by.get(id).unwrap_or_else(|| panic!("no result for {id}"));
    assert_eq!(v.len(), 1, "{id} has {} results", v.len());
    &v[0]
}

/// A Graph API sandbox on loopback on its own runtime, without Meta's pair
/// rate unless `cfg` sets one.
pub async fn sandbox(
    cfg: impl FnOnce(&mut wagate::sandbox::SandboxConfig),
) -> wagate::sandbox::Sandbox {
    let mut c = wagate::sandbox::SandboxConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        pair_rate: None,
        ..Default::default()
    };
    cfg(&mut c);
    sandbox_on_own_runtime(c).await
}

/// A call of the internal API with the test tenant's token.
pub async fn api(method: &str, url: &str, body: Option<Value>) -> Resp {
    let b = hyper::Request::builder()
        .method(method)
        .uri(url)
        .header("authorization", "Bearer test-api-token")
        .header("content-type", "application/json");
    let body = body
        .map(|v| serde_json::to_vec(&v).unwrap())
        .unwrap_or_default();
    request(b.body(Full::new(Bytes::from(body))).unwrap()).await
}

/// Polls `GET url` on the internal API until `pred` holds (20 s at most).
pub async fn wait_for(url: &str, pred: impl Fn(&Resp) -> bool) -> Resp {
    let end = Instant::now() + Duration::from_secs(20);
    loop {
        let r = api("GET", url, None).await;
        if pred(&r) {
            return r;
        }
        assert!(
            Instant::now() < end,
            "{url}: last answer {} {}",
            r.status,
            String::from_utf8_lossy(&r.body)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// `name{labels…}` in a Prometheus exposition (every `k="v"` given must be
/// on the line), or 0 when absent.
pub fn metric_in(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(&format!("{name}{{")) || l.starts_with(&format!("{name} ")))
        .find(|l| {
            labels
                .iter()
                .all(|(k, v)| l.contains(&format!("{k}=\"{v}\"")))
        })
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

/// A free loopback port (free when asked; bind it soon). Never the same
/// port twice in one test process: the kernel may hand a just-released port
/// out again, and two calls in a row once gave one port for `listen` and
/// `internal_listen`.
pub fn free_port() -> u16 {
    static GIVEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    let mut given = GIVEN.lock().unwrap_or_else(|e| e.into_inner());
    loop {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        if !given.contains(&port) {
            given.push(port);
            return port;
        }
    }
}
