//! End to end, through the binary: `baseline` on 127.0.0.1:0, then a short
//! `run` against it, which must see only 200s. Also the refusals.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_wagate-loadgen");

/// Kills the child when dropped, so a failing test leaves nothing behind.
struct Guard(Child);

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_baseline() -> (Guard, String) {
    let mut child = Command::new(BIN)
        .args(["baseline", "--listen", "127.0.0.1:0", "--max-secs", "60"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start baseline");
    let stdout = child.stdout.take().unwrap();
    let guard = Guard(child);
    let mut line = String::new();
    BufReader::new(stdout)
        .read_line(&mut line)
        .expect("read the first line");
    let addr = line
        .trim()
        .strip_prefix("listening on ")
        .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
        .to_string();
    (guard, addr)
}

#[test]
fn run_against_baseline_sees_only_200s() {
    let (_baseline, addr) = start_baseline();
    let t0 = Instant::now();
    let out = Command::new(BIN)
        .args([
            "run",
            "--url",
            &format!("http://{addr}/webhook"),
            "--connections",
            "4",
            "--duration-secs",
            "2",
            "--warmup-secs",
            "0",
            "--json",
        ])
        .env("WAGATE_APP_SECRET", "smoke-secret")
        .output()
        .expect("run");
    let took = t0.elapsed();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "exit {:?}\n{stdout}\n{stderr}",
        out.status
    );
    assert!(took < Duration::from_secs(20), "took {took:?}");
    let r: serde_json::Value = serde_json::from_str(stdout.trim()).expect("one JSON object");
    let requests = r["requests"].as_u64().unwrap();
    assert!(requests > 0, "{r}");
    let responses = r["responses"].as_object().unwrap();
    assert_eq!(responses.len(), 1, "only 200s expected: {r}");
    assert_eq!(responses["200"].as_u64().unwrap(), requests, "{r}");
    assert_eq!(r["non_200"], 0, "{r}");
    assert_eq!(r["transport_errors"], 0, "{r}");
    assert!(r["events"].as_u64().unwrap() >= requests, "{r}");
    let secs = r["duration_secs"].as_f64().unwrap();
    assert!((1.5..=2.5).contains(&secs), "{r}");
    assert!(r["latency_ms"]["max"].as_f64().unwrap() > 0.0, "{r}");
    eprintln!("smoke: {stdout}");
}

#[test]
fn max_requests_bounds_the_run() {
    let (_baseline, addr) = start_baseline();
    let out = Command::new(BIN)
        .args([
            "run",
            "--url",
            &format!("http://localhost:{}/", addr.rsplit_once(':').unwrap().1),
            "--connections",
            "2",
            "--duration-secs",
            "30",
            "--warmup-secs",
            "0",
            "--max-requests",
            "50",
            "--mix",
            "batch=100",
            "--batch-events",
            "3",
            "--json",
        ])
        .env("LOADGEN_SECRET", "s")
        .args(["--secret-env", "LOADGEN_SECRET"])
        .output()
        .expect("run");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    let r: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(r["requests"], 50, "{r}");
    assert_eq!(r["events"], 150, "{r}");
    assert_eq!(r["stopped_by"], "max_requests", "{r}");
}

fn refused(args: &[&str], env: &[(&str, &str)]) -> (i32, String) {
    let mut cmd = Command::new(BIN);
    cmd.args(args).env_remove("WAGATE_APP_SECRET");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("run");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn refuses_non_loopback_targets_and_bad_usage() {
    let secret = [("WAGATE_APP_SECRET", "x")];
    for url in [
        "http://10.0.0.1/webhook",
        "http://example.com/",
        "https://10.0.0.1/",
    ] {
        let (code, err) = refused(&["run", "--url", url, "--duration-secs", "1"], &secret);
        assert_eq!(code, 2, "{url}: {err}");
        assert!(err.contains("refusing --url"), "{url}: {err}");
    }
    // https:// on loopback needs the CA to trust; --tls-ca needs https://.
    let (code, err) = refused(
        &[
            "run",
            "--url",
            "https://127.0.0.1:9/",
            "--duration-secs",
            "1",
        ],
        &secret,
    );
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("--tls-ca"), "{err}");
    let (code, err) = refused(
        &[
            "run",
            "--url",
            "http://127.0.0.1:9/",
            "--tls-ca",
            "/nonexistent",
            "--duration-secs",
            "1",
        ],
        &secret,
    );
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("--tls-ca"), "{err}");
    let (code, err) = refused(&["run", "--url", "http://127.0.0.1:9/"], &[]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("WAGATE_APP_SECRET"), "{err}");
    for bad in [
        &["run", "--duration-secs", "601"][..],
        &["run", "--max-requests", "50000001"],
        &["run", "--connections", "0"],
        &["run", "--mix", "messages=50"],
    ] {
        let (code, err) = refused(bad, &secret);
        assert_eq!(code, 2, "{bad:?}: {err}");
    }
}

#[test]
fn no_server_means_exit_1() {
    // Bind and drop to get a loopback port that (most likely) nobody serves.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let out = Command::new(BIN)
        .args([
            "run",
            "--url",
            &format!("http://127.0.0.1:{port}/webhook"),
            "--connections",
            "1",
            "--duration-secs",
            "1",
            "--warmup-secs",
            "0",
            "--json",
        ])
        .env("WAGATE_APP_SECRET", "x")
        .output()
        .expect("run");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    let r: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(r["requests"], 0);
    assert!(
        r["transport_error_kinds"]["connect"].as_u64().unwrap() > 0,
        "{r}"
    );
}

#[test]
fn open_loop_keeps_to_the_rate() {
    let (_baseline, addr) = start_baseline();
    let out = Command::new(BIN)
        .args([
            "run",
            "--url",
            &format!("http://{addr}/webhook"),
            "--connections",
            "4",
            "--duration-secs",
            "2",
            "--warmup-secs",
            "0",
            "--rate",
            "200",
            "--json",
        ])
        .env("WAGATE_APP_SECRET", "x")
        .output()
        .expect("run");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    let r: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(r["mode"], "open", "{r}");
    // 200/s for 2 s: about 400 requests, never many more.
    let n = r["requests"].as_u64().unwrap();
    assert!((300..=404).contains(&n), "{r}");
    assert_eq!(r["responses"]["200"].as_u64().unwrap(), n, "{r}");
}
