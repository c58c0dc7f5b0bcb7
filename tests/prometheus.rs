//! Operations files against a real Prometheus (Debian's `prometheus`
//! package, which the README's test command installs): a gateway on a real
//! broker and the Graph API sandbox runs a short bounded load while
//! Prometheus scrapes it every second with the alert rules loaded. Then:
//! `promtool check metrics` passes on the exposition, every alert rule
//! evaluates without error, and every panel query of every dashboard (and
//! every dashboard variable) returns data from the live Prometheus. A panel
//! that can never show anything fails this test.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use hyper::StatusCode;
use serde_json::Value;
use wagate::sandbox::{FixedError, SandboxConfig, StatusWebhookConfig};

/// A tool from Debian's prometheus package. Missing means the test command
/// was not used: fail, never skip.
fn tool(name: &str) -> PathBuf {
    std::env::var_os("PATH")
        .and_then(|p| {
            std::env::split_paths(&p)
                .map(|d| d.join(name))
                .find(|f| f.is_file())
        })
        .unwrap_or_else(|| {
            panic!("{name} not found on PATH: run the README's test command (make test), which installs Debian's prometheus package")
        })
}

/// Percent-encodes a query-string value.
fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

async fn prom_get(base: &str, path_and_query: &str) -> Value {
    let r = get(&format!("{base}{path_and_query}")).await;
    assert_eq!(
        r.status,
        StatusCode::OK,
        "{path_and_query}: {}",
        String::from_utf8_lossy(&r.body)
    );
    serde_json::from_slice(&r.body).unwrap()
}

/// A dashboard expression as Grafana would send it: variables set to "all",
/// `$__rate_interval` to four scrape intervals and more.
fn grafana_expr(expr: &str) -> String {
    expr.replace("$__rate_interval", "10s")
        .replace("${instance}", ".*")
        .replace("$instance", ".*")
}

/// (dashboard, panel title, expression) of every panel target and every
/// query variable of every dashboard.
fn dashboard_queries(dir: &Path) -> Vec<(String, String, String)> {
    let mut out = Vec::new();
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .collect();
    files.sort();
    assert!(files.len() >= 3, "dashboards in {}", dir.display());
    for f in files {
        let name = f.file_name().unwrap().to_string_lossy().into_owned();
        let d: Value = serde_json::from_slice(&std::fs::read(&f).unwrap()).unwrap();
        let mut panels: Vec<Value> = d["panels"].as_array().unwrap().clone();
        while let Some(p) = panels.pop() {
            if let Some(inner) = p["panels"].as_array() {
                panels.extend(inner.iter().cloned());
            }
            for t in p["targets"].as_array().into_iter().flatten() {
                let expr = t["expr"].as_str().unwrap_or("").to_string();
                out.push((
                    name.clone(),
                    p["title"].as_str().unwrap_or("").to_string(),
                    expr,
                ));
            }
        }
        for v in d["templating"]["list"].as_array().into_iter().flatten() {
            if v["type"] == "query" {
                let q = v["query"]["query"]
                    .as_str()
                    .or(v["query"].as_str())
                    .unwrap_or("");
                // label_values(metric, label) → the metric must have data.
                let metric = q
                    .trim_start_matches("label_values(")
                    .split(',')
                    .next()
                    .unwrap()
                    .trim()
                    .to_string();
                out.push((name.clone(), format!("variable {}", v["name"]), metric));
            }
        }
    }
    out
}

async fn api_send(internal: std::net::SocketAddr, body: &Value) -> StatusCode {
    let req = hyper::Request::post(format!("http://{internal}/v1/messages"))
        .header("authorization", "Bearer test-api-token")
        .header("content-type", "application/json")
        .body(http_body_util::Full::new(bytes::Bytes::from(
            serde_json::to_vec(body).unwrap(),
        )))
        .unwrap();
    request(req).await.status
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboards_rules_and_exposition_hold_against_a_live_prometheus() {
    let prometheus = tool("prometheus");
    let promtool = tool("promtool");
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let b = brokers();
    let p = unique_prefix("prom");

    // Meta: one number always fails (131026), one is throttled (130429),
    // one has a broken token (190 → circuit); status webhooks come back.
    let public_port = free_port();
    let fixed = |n: &str, code: i64| FixedError {
        phone_number_id: Some(n.into()),
        to: None,
        code,
    };
    let sb = sandbox_on_own_runtime(SandboxConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        pair_rate: None,
        fixed_errors: vec![
            fixed("100000000000001", 131026),
            fixed("100000000000002", 130429),
            fixed("100000000000003", 190),
        ],
        status_webhook: Some(StatusWebhookConfig {
            url: format!("http://127.0.0.1:{public_port}/webhook"),
            app_secret: SECRET.into(),
            statuses: vec!["sent".into(), "delivered".into()],
            delay: Duration::from_millis(20),
        }),
        ..Default::default()
    })
    .await;
    let listen = format!("127.0.0.1:{public_port}");
    let gw = start_on(
        &b,
        &p,
        &sb,
        &[
            ("WAGATE_LISTEN", &listen),
            ("WAGATE_EGRESS_MAX_ATTEMPTS", "2"),
            ("WAGATE_EGRESS_CIRCUIT_HOLD_MAX_MS", "2000"),
        ],
    )
    .await;
    let (public, internal) = (gw.public_addr, gw.internal_addr);
    let sb = Arc::new(sb);

    // Prometheus, scraping every second, with the alert rules loaded.
    let dir = std::env::temp_dir().join(format!("wagate-prom-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let rules = root.join("grafana/alerts/wagate-rules.yaml");
    std::fs::write(
        dir.join("prometheus.yml"),
        format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files:\n  - {rules:?}\n\
             scrape_configs:\n  - job_name: wagate\n    static_configs:\n      - targets: [\"{internal}\"]\n",
        ),
    )
    .unwrap();
    let prom_port = free_port();
    let _prom = process::KillOnDrop::new(
        Command::new(&prometheus)
            .arg(format!(
                "--config.file={}",
                dir.join("prometheus.yml").display()
            ))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{prom_port}"))
            .arg("--log.level=warn")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("prometheus.log")).unwrap())
            .spawn()
            .unwrap(),
    );
    let base = format!("http://127.0.0.1:{prom_port}");
    let end = Instant::now() + Duration::from_secs(30);
    while std::net::TcpStream::connect(("127.0.0.1", prom_port)).is_err()
        || get(&format!("{base}/-/ready")).await.status != StatusCode::OK
    {
        assert!(
            Instant::now() < end,
            "prometheus not ready: {}",
            std::fs::read_to_string(dir.join("prometheus.log")).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // A bounded load: webhooks (new, duplicate, unparseable, STOP, badly
    // signed) and sends (accepted, failing, throttled, circuit, blocked),
    // until the queries below are done (at most 90 s).
    let stop = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicU64::new(0));
    let load = {
        let (stop, sent, sb) = (stop.clone(), sent.clone(), sb.clone());
        tokio::spawn(async move {
            let t0 = Instant::now();
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) && t0.elapsed() < Duration::from_secs(90) {
                i += 1;
                for k in 0..5 {
                    let id = format!("wamid.PROM-{i}-{k}");
                    let body = text_webhook("109876543210987", &[&id]);
                    assert_eq!(
                        post_signed(public, "/webhook", &body).await.status,
                        StatusCode::OK
                    );
                }
                // A redelivery of the previous round.
                let again = text_webhook(
                    "109876543210987",
                    &[&format!("wamid.PROM-{}-0", i.max(2) - 1)],
                );
                post_signed(public, "/webhook", &again).await;
                // Inbound media: stored, and every third item an id Meta
                // no longer knows (failed), every fifth a 5xx first (retried).
                let (media, id) = sb.inbound_media_body(
                    "109876543210987",
                    &format!("1415556{:04}", i % 10_000),
                    &format!("wamid.PROM-MEDIA-{i}"),
                    "image",
                    vec![i as u8; 2048],
                    "image/jpeg",
                );
                let fault = wagate::sandbox::media::MediaFault {
                    expired: i % 3 == 0,
                    lookup_5xx: u32::from(i % 5 == 0),
                    ..Default::default()
                };
                sb.media().set_fault(&id, fault);
                post_signed(public, "/webhook", &media).await;
                if i % 10 == 0 {
                    post_signed(public, "/webhook", b"{not json").await;
                    post(public, "/webhook", b"{}", Some("sha256=00")).await;
                }
                let n = [
                    "109876543210987",
                    "100000000000001",
                    "100000000000002",
                    "100000000000003",
                ][(i % 4) as usize];
                let s = api_send(
                    internal,
                    &template_request(
                        &format!("prom-{i}"),
                        n,
                        &format!("+1415555{:04}", i % 10_000),
                        "utility",
                    ),
                )
                .await;
                assert_eq!(s, StatusCode::ACCEPTED);
                // Marketing to a user who never opted in: blocked by policy.
                api_send(
                    internal,
                    &template_request(
                        &format!("prom-mkt-{i}"),
                        "109876543210987",
                        "+14155559999",
                        "marketing",
                    ),
                )
                .await;
                sent.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };

    // Let Prometheus collect enough samples for 10 s rates.
    tokio::time::sleep(Duration::from_secs(15)).await;
    assert!(sent.load(Ordering::Relaxed) > 20, "load is running");

    // 1. promtool check metrics on the exposition.
    let exposition = get(&format!("http://{internal}/metrics")).await;
    assert_eq!(exposition.status, StatusCode::OK);
    let mut check = Command::new(&promtool)
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    {
        use std::io::Write;
        check
            .stdin
            .take()
            .unwrap()
            .write_all(&exposition.body)
            .unwrap();
    }
    let out = check.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    // 2. The scrape target is up and every alert rule evaluates cleanly.
    let up = prom_get(&base, "/api/v1/query?query=up").await;
    assert_eq!(up["data"]["result"][0]["value"][1], "1", "{up}");
    let rules = prom_get(&base, "/api/v1/rules").await;
    let mut n_rules = 0;
    for g in rules["data"]["groups"].as_array().unwrap() {
        for r in g["rules"].as_array().unwrap() {
            n_rules += 1;
            assert_eq!(r["health"], "ok", "rule {} : {}", r["name"], r["lastError"]);
        }
    }
    assert!(n_rules >= 10, "alert rules loaded: {rules}");
    // The media alert's condition holds on the live failures (every third
    // item): the rule is pending (it fires after 15 minutes).
    let end = Instant::now() + Duration::from_secs(30);
    loop {
        let q = encode(r#"ALERTS{alertname="WagateMediaFetchesFailing",alertstate="pending"}"#);
        let v = prom_get(&base, &format!("/api/v1/query?query={q}")).await;
        if !v["data"]["result"].as_array().unwrap().is_empty() {
            break;
        }
        assert!(
            Instant::now() < end,
            "WagateMediaFetchesFailing never pending: {v}"
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
    }

    // 3. Every dashboard query returns data.
    let queries = dashboard_queries(&root.join("grafana/dashboards"));
    let mut empty = Vec::new();
    for _attempt in 0..10 {
        empty.clear();
        for (dash, title, expr) in &queries {
            let q = grafana_expr(expr);
            let v = prom_get(&base, &format!("/api/v1/query?query={}", encode(&q))).await;
            assert_eq!(v["status"], "success", "{dash} / {title}: {q}: {v}");
            let result = v["data"]["result"].as_array().unwrap();
            // A series whose value is NaN (a quantile of no observations)
            // shows nothing either.
            if !result.iter().any(|s| s["value"][1] != "NaN") {
                empty.push(format!("{dash} / {title}: {q}"));
            }
        }
        if empty.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    stop.store(true, Ordering::Relaxed);
    load.await.unwrap();
    assert!(
        empty.is_empty(),
        "{} of {} dashboard queries return no data:\n{}",
        empty.len(),
        queries.len(),
        empty.join("\n")
    );
    eprintln!(
        "{} dashboard queries, {n_rules} rules, exposition of {} bytes: all pass",
        queries.len(),
        exposition.body.len()
    );
    gw.shutdown().await;
    let _ = std::fs::remove_dir_all(&dir);
}
