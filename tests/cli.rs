//! The `wagate` binary as a user runs it: check-config, sign, topics create,
//! tail, and `serve` refusing bad config before binding a port.

mod common;

use std::io::Write;
use std::process::{Command, Stdio};

fn wagate() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_wagate"));
    c.env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("HOME", std::env::var("HOME").unwrap_or_default());
    c
}

fn with_secrets(c: &mut Command) -> &mut Command {
    c.env("WAGATE_APP_SECRET", "s")
        .env("WAGATE_VERIFY_TOKEN", "v")
        .env("WAGATE_API_TOKEN", "a")
        .env("WAGATE_ACCESS_TOKEN", "t")
}

#[test]
fn check_config_accepts_the_example_with_the_contract_env() {
    let out = with_secrets(&mut wagate())
        .args(["check-config", "--config", "config/example.toml"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("config OK"));
}

#[test]
fn check_config_names_the_bad_key_and_exits_non_zero() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("bad.toml");
    let text = std::fs::read_to_string("config/example.toml")
        .unwrap()
        .replace("[kafka]", "[kafka]\nlinger_msec = 3");
    std::fs::write(&f, text).unwrap();
    let out = with_secrets(&mut wagate())
        .args(["check-config", "--config", f.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("linger_msec"), "{err}");

    // A missing secret names the variable.
    let out = wagate()
        .args(["check-config", "--config", "config/example.toml"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("WAGATE_APP_SECRET"));
}

#[test]
fn serve_with_bad_config_exits_before_binding() {
    let out = with_secrets(&mut wagate())
        .env("WAGATE_LISTEN", "not-an-address")
        .args(["serve"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("listen"));
}

#[test]
fn sign_prints_metas_header_for_the_vector() {
    let v: serde_json::Value = serde_json::from_slice(
        &std::fs::read("tests/fixtures/signature_test_vector.json").unwrap(),
    )
    .unwrap();
    let mut child = wagate()
        .env("MY_SECRET", v["app_secret"].as_str().unwrap())
        .args(["sign", "--secret-env", "MY_SECRET"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(v["raw_body"].as_str().unwrap().as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        v["expected_X-Hub-Signature-256"].as_str().unwrap()
    );
    let out = wagate()
        .args(["sign", "--secret-env", "UNSET_VAR"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("UNSET_VAR"));
}

#[test]
fn topics_create_then_tail_against_the_broker() {
    let brokers = common::brokers();
    let prefix = common::unique_prefix("cli");
    let run = |args: &[&str]| {
        wagate()
            .env("WAGATE_KAFKA_BROKERS", &brokers)
            .env("WAGATE_TOPIC_PREFIX", &prefix)
            .args(args)
            .output()
            .unwrap()
    };
    let out = run(&["topics", "create"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    for t in wagate::kafka::TOPICS {
        assert!(
            text.contains(&format!("{prefix}{}\tcreated", t.name)),
            "{text}"
        );
    }
    // Idempotent: the second run finds them all.
    let out = run(&["topics", "create"]);
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stdout)
            .matches("\texists")
            .count(),
        wagate::kafka::TOPICS.len()
    );

    // Produce one record through the library, read it back with the CLI.
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let cfg = common::config(&brokers, &prefix, &[]);
        let p = wagate::kafka::KafkaProducer::new(&cfg.kafka).unwrap();
        let f = p
            .send(
                &format!("{prefix}inbound.events"),
                b"k1",
                br#"{"v":1,"x":"y"}"#,
                &[("wagate-kind", b"test")],
            )
            .unwrap();
        f.await.unwrap();
    });
    let out = run(&[
        "tail",
        "inbound.events",
        "--from-beginning",
        "--max",
        "1",
        "--idle-exit-secs",
        "10",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let line: serde_json::Value =
        serde_json::from_slice(out.stdout.split(|b| *b == b'\n').next().unwrap()).unwrap();
    assert_eq!(line["key"], "k1");
    assert_eq!(line["headers"]["wagate-kind"], "test");
    assert_eq!(line["value"]["x"], "y");
    assert_eq!(line["topic"], format!("{prefix}inbound.events"));
}
