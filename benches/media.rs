//! Inbound media through the real `wagate` binary (a child process): signed
//! webhooks carrying images go in, the media worker looks each one up and
//! downloads it from the Graph API sandbox (in this process, its own
//! runtime thread, loopback) and stores it; the run ends when every item has
//! its `wa.inbound.media` record. Reported per store (a directory, and the
//! S3 server at `WAGATE_TEST_S3` if set):
//!
//! (1) items/s and MB/s for `ITEMS` images of 256 KiB, and the gateway's CPU
//!     time (utime + stime of `/proc/<pid>/stat`) per MB;
//! (2) one 100 MB document: MB/s, CPU per MB, and the gateway's peak RSS
//!     (`VmHWM`) before and after it: bounded by the part size, not by the
//!     document.
//!
//!   WAGATE_TEST_BROKERS=$(scripts/tansu.sh start target/bench-env) \
//!   WAGATE_TEST_S3=$(scripts/s3.sh start target/bench-env) \
//!     cargo bench --bench media
//!
//! Without `--bench` (as `cargo test --all-targets` runs it) it uses a smoke
//! size: 20 images and a 12 MB document, directory store only.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::Request;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

#[path = "../tests/common/broker.rs"]
mod broker;
#[path = "../tests/common/process.rs"]
mod process;
use broker::{brokers, unique_prefix};

const SECRET: &str = "bench-app-secret";
const NUMBER: &str = "109876543210987";

fn clk_tck() -> f64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .filter(|t: &f64| *t > 0.0)
        .unwrap_or(100.0)
}

/// CPU seconds (utime + stime) of a process.
fn cpu_secs(pid: u32) -> f64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let rest = s.get(s.rfind(')').map_or(0, |i| i + 2)..).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let t = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    (t(11) + t(12)) / clk_tck()
}

/// `VmHWM` (peak RSS) of a process, in MiB.
fn peak_rss_mib(pid: u32) -> f64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    s.lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|k| k.parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0)
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn bytes_of(n: usize, seed: u8) -> Vec<u8> {
    let mut x: u32 = 0x9e37_79b9 ^ seed as u32;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            (x >> 24) as u8
        })
        .collect()
}

async fn http(method: &str, url: &str, body: Vec<u8>, sig: Option<String>) -> (u16, Bytes) {
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let mut b = Request::builder().method(method).uri(url);
    if let Some(s) = sig {
        b = b
            .header("x-hub-signature-256", s)
            .header("content-type", "application/json");
    }
    match client
        .request(b.body(Full::new(Bytes::from(body))).unwrap())
        .await
    {
        Ok(r) => {
            let st = r.status().as_u16();
            (
                st,
                r.into_body()
                    .collect()
                    .await
                    .map(|c| c.to_bytes())
                    .unwrap_or_default(),
            )
        }
        Err(_) => (0, Bytes::new()),
    }
}

/// Records on `{prefix}inbound.media` (read from the beginning).
fn count_records(brokers: &str, prefix: &str) -> usize {
    let conn = wagate::kafka::Connection::plaintext(brokers);
    let opts = wagate::kafka::ReadOptions {
        from_beginning: true,
        max: None,
        idle_timeout: Some(Duration::from_millis(400)),
    };
    let mut n = 0;
    let _ = wagate::kafka::read_topic(&conn, &format!("{prefix}inbound.media"), &opts, |r| {
        if r.value["outcome"] == "stored" {
            n += 1;
        }
    });
    n
}

struct Run {
    items: usize,
    mb: f64,
    secs: f64,
    cpu: f64,
}

/// Posts the webhooks, waits for `want` stored records (at most 10 min).
async fn run_items(
    gw_public: SocketAddr,
    pid: u32,
    bodies: Vec<Vec<u8>>,
    total_bytes: usize,
    b: &str,
    p: &str,
    already: usize,
) -> Run {
    let want = already + bodies.len();
    let items = bodies.len();
    let cpu0 = cpu_secs(pid);
    let t0 = Instant::now();
    for body in bodies {
        let sig = wagate::meta::signature::sign(SECRET.as_bytes(), &body);
        let (st, _) = http(
            "POST",
            &format!("http://{gw_public}/webhook"),
            body,
            Some(sig),
        )
        .await;
        assert_eq!(st, 200, "webhook");
    }
    let end = Instant::now() + Duration::from_secs(600);
    loop {
        let (b2, p2) = (b.to_string(), p.to_string());
        let n = tokio::task::spawn_blocking(move || count_records(&b2, &p2))
            .await
            .unwrap();
        if n >= want {
            break;
        }
        assert!(Instant::now() < end, "only {n} of {want} media records");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The record count is read with a 400 ms idle wait: take it off.
    let secs = (t0.elapsed().as_secs_f64() - 0.4).max(0.001);
    Run {
        items,
        mb: total_bytes as f64 / 1e6,
        secs,
        cpu: cpu_secs(pid) - cpu0,
    }
}

async fn bench_store(
    name: &str,
    store_env: BTreeMap<String, String>,
    sb: &wagate::sandbox::Sandbox,
    images: usize,
    doc_mb: usize,
) {
    let b = brokers();
    let p = unique_prefix(&format!("bench-media-{name}"));
    let public = format!("127.0.0.1:{}", free_port());
    let internal = format!("127.0.0.1:{}", free_port());
    // Topics first (the gateway refuses nothing, but the worker needs them).
    let mut env: BTreeMap<String, String> = [
        ("WAGATE_APP_SECRET", SECRET),
        ("WAGATE_VERIFY_TOKEN", "v"),
        ("WAGATE_API_TOKEN", "t"),
        ("WAGATE_ACCESS_TOKEN", "a"),
        ("WAGATE_KAFKA_BROKERS", b.as_str()),
        ("WAGATE_TOPIC_PREFIX", p.as_str()),
        ("WAGATE_LISTEN", public.as_str()),
        ("WAGATE_INTERNAL_LISTEN", internal.as_str()),
        ("WAGATE_KAFKA_PARTITIONS", "3"),
        ("WAGATE_LOG", "warn"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    env.insert("WAGATE_GRAPH_BASE_URL".into(), sb.base_url());
    env.insert("WAGATE_EGRESS_GROUP_ID".into(), format!("{p}egress"));
    env.insert("WAGATE_MEDIA_GROUP_ID".into(), format!("{p}media"));
    env.extend(store_env);
    if let Ok(level) = std::env::var("WAGATE_BENCH_LOG") {
        env.insert("WAGATE_LOG".into(), level);
    }
    let cfg = wagate::config::load(None, &env, Default::default()).expect("bench config");
    wagate::kafka::create_topics(&cfg.kafka)
        .await
        .expect("topics");
    let log = std::env::temp_dir().join(format!("wagate-bench-media-{name}.log"));
    let gw = process::GatewayProcess::new()
        .envs(&env)
        .log_to(&log)
        .spawn();
    let pid = gw.pid();
    let end = Instant::now() + Duration::from_secs(30);
    while http("GET", &format!("http://{internal}/readyz"), vec![], None)
        .await
        .0
        != 200
    {
        assert!(
            Instant::now() < end,
            "gateway not ready: {}",
            gw.log_tail(30)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The worker gets its partitions a few seconds after readiness.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let public: SocketAddr = public.parse().unwrap();

    // (1) images.
    let size = 256 * 1024;
    let bodies: Vec<Vec<u8>> = (0..images)
        .map(|i| {
            sb.inbound_media_body(
                NUMBER,
                &format!("1415557{:04}", i % 10_000),
                &format!("wamid.bench-{name}-{i}"),
                "image",
                bytes_of(size, i as u8),
                "image/jpeg",
            )
            .0
        })
        .collect();
    let r = run_items(public, pid, bodies, images * size, &b, &p, 0).await;
    println!(
        "media[{name}] {} images of 256 KiB: {:.1} items/s, {:.1} MB/s, gateway CPU {:.2} ms per MB ({:.2} s CPU over {:.2} s)",
        r.items,
        r.items as f64 / r.secs,
        r.mb / r.secs,
        r.cpu * 1000.0 / r.mb,
        r.cpu,
        r.secs
    );

    // (2) one large document.
    let rss0 = peak_rss_mib(pid);
    let n = doc_mb * 1_000_000;
    let (body, _) = sb.inbound_media_body(
        NUMBER,
        "14155558888",
        &format!("wamid.bench-{name}-doc"),
        "document",
        bytes_of(n, 77),
        "application/pdf",
    );
    let r = run_items(public, pid, vec![body], n, &b, &p, images).await;
    let rss1 = peak_rss_mib(pid);
    println!(
        "media[{name}] one {doc_mb} MB document: {:.1} MB/s, gateway CPU {:.2} ms per MB, peak RSS {:.0} MiB before it, {:.0} MiB after",
        r.mb / r.secs,
        r.cpu * 1000.0 / r.mb,
        rss0,
        rss1
    );
    gw.sigterm();
    drop(gw);
}

fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    let (images, doc_mb) = if full { (400, 100) } else { (20, 12) };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    // The sandbox on a runtime of its own (another server, as Meta is).
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let srt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        srt.block_on(async move {
            let cfg = wagate::sandbox::SandboxConfig {
                pair_rate: None,
                ..Default::default()
            };
            tx.send(wagate::sandbox::Sandbox::start(cfg).await.unwrap())
                .unwrap();
            std::future::pending::<()>().await;
        });
    });
    let sb = rx.recv().unwrap();
    rt.block_on(async {
        let dir = std::env::temp_dir().join(format!("wagate-bench-media-{}", std::process::id()));
        let store: BTreeMap<String, String> = [(
            "WAGATE_MEDIA_STORE".to_string(),
            format!("file://{}", dir.display()),
        )]
        .into();
        bench_store("file", store, &sb, images, doc_mb).await;
        let _ = std::fs::remove_dir_all(&dir);
        if let (true, Ok(s3)) = (full, std::env::var("WAGATE_TEST_S3")) {
            let bucket = format!("wagate-bench-{}", std::process::id());
            let (st, body) = http("PUT", &format!("{s3}/{bucket}"), vec![], None).await;
            assert!((200..300).contains(&st), "create bucket: {st} {body:?}");
            let store: BTreeMap<String, String> = [
                ("WAGATE_MEDIA_STORE", format!("s3://{bucket}/media")),
                ("WAGATE_MEDIA_S3_ENDPOINT", s3.clone()),
                ("WAGATE_MEDIA_S3_ALLOW_HTTP", "true".into()),
                ("AWS_ACCESS_KEY_ID", "bench".into()),
                ("AWS_SECRET_ACCESS_KEY", "bench-secret".into()),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect();
            bench_store("s3", store, &sb, images, doc_mb).await;
        }
    });
}
