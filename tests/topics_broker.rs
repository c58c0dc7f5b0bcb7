//! `[kafka.topics.NAME]`, `wagate topics check` and the start-time refusal of
//! a compacted topic that is not compacted, against the broker at
//! `WAGATE_TEST_BROKERS`.

mod common;

use std::process::{Command, Output};
use std::time::Duration;

use common::*;
use rdkafka::admin::{
    AdminClient, AdminOptions, NewTopic, OwnedResourceSpecifier, ResourceSpecifier,
    TopicReplication,
};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;

const NINETY_DAYS_MS: i64 = 90 * 24 * 3600 * 1000;

/// The `wagate` binary with the example config, these brokers and prefix, and
/// `extra` appended to the config file.
fn wagate(brokers: &str, prefix: &str, extra: &str, args: &[&str]) -> Output {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("wagate.toml");
    let text = std::fs::read_to_string("config/example.toml").unwrap();
    std::fs::write(&file, format!("{text}\n{extra}")).unwrap();
    let mut c = Command::new(env!("CARGO_BIN_EXE_wagate"));
    c.env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("WAGATE_KAFKA_BROKERS", brokers)
        .env("WAGATE_TOPIC_PREFIX", prefix)
        .env("WAGATE_LOG", "warn");
    for (k, v) in env() {
        c.env(k, v);
    }
    c.args(args)
        .arg("--config")
        .arg(&file)
        .output()
        .expect("wagate runs")
}

fn text(out: &Output) -> String {
    format!(
        "exit {:?}\nstdout:\n{}\nstderr:\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn admin(brokers: &str) -> AdminClient<DefaultClientContext> {
    ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
        .unwrap()
}

/// A topic's config value as the broker describes it.
async fn topic_config(brokers: &str, topic: &str, key: &str) -> Option<String> {
    let a = admin(brokers);
    let res = a
        .describe_configs([&ResourceSpecifier::Topic(topic)], &AdminOptions::new())
        .await
        .unwrap();
    let r = res.into_iter().next()?.ok()?;
    assert!(matches!(&r.specifier, OwnedResourceSpecifier::Topic(t) if t == topic));
    r.get(key).and_then(|e| e.value.clone())
}

fn partitions(brokers: &str, topic: &str) -> usize {
    let a = admin(brokers);
    let m = a
        .inner()
        .fetch_metadata(Some(topic), Duration::from_secs(10))
        .unwrap();
    m.topics()[0].partitions().len()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn topics_create_applies_the_topic_tables_and_check_passes() {
    let b = brokers();
    let p = unique_prefix("tt-create");
    let table = format!(
        "[kafka.topics.inbound_messages]\nretention_ms = {NINETY_DAYS_MS}\npartitions = 3\n"
    );
    // Before anything is created, every topic is missing.
    let out = wagate(&b, &p, &table, &["topics", "check"]);
    assert!(!out.status.success(), "{}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        stdout.matches(": missing").count(),
        wagate::kafka::TOPICS.len(),
        "{}",
        text(&out)
    );

    let out = wagate(&b, &p, &table, &["topics", "create"]);
    assert!(out.status.success(), "{}", text(&out));
    let messages = format!("{p}inbound.messages");
    assert_eq!(
        topic_config(&b, &messages, "retention.ms").await.as_deref(),
        Some(NINETY_DAYS_MS.to_string().as_str())
    );
    assert_eq!(partitions(&b, &messages), 3);
    // Other topics keep the defaults.
    assert_eq!(
        topic_config(&b, &format!("{p}inbound.raw"), "retention.ms")
            .await
            .as_deref(),
        Some("259200000")
    );
    assert_eq!(
        topic_config(&b, &format!("{p}consent"), "cleanup.policy")
            .await
            .as_deref(),
        Some("compact")
    );

    let out = wagate(&b, &p, &table, &["topics", "check"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains(&format!(
            "{} topics checked: 0 errors, 0 warnings",
            wagate::kafka::TOPICS.len()
        )),
        "{}",
        text(&out)
    );
    // Checked against the defaults, the 90-day topic differs: warnings only.
    let out = wagate(&b, &p, "", &["topics", "check"]);
    assert!(out.status.success(), "{}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains(&format!(
            "warning: {messages}: retention.ms is {NINETY_DAYS_MS}"
        )) && stdout.contains(&format!("warning: {messages}: 3 partitions, configured 6")),
        "{}",
        text(&out)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consent_topic_with_a_delete_policy_fails_the_check_and_the_start() {
    let b = brokers();
    let p = unique_prefix("tt-policy");
    let consent = format!("{p}consent");
    let t = NewTopic::new(&consent, 1, TopicReplication::Fixed(1))
        .set("cleanup.policy", "delete")
        .set("retention.ms", "604800000");
    admin(&b)
        .create_topics([&t], &AdminOptions::new())
        .await
        .unwrap();
    // `topics create` leaves the existing topic as it is and makes the rest.
    let out = wagate(&b, &p, "", &["topics", "create"]);
    assert!(out.status.success(), "{}", text(&out));

    let out = wagate(&b, &p, "", &["topics", "check"]);
    assert!(!out.status.success(), "{}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains(&format!(
            "error: {consent}: cleanup.policy is \"delete\", expected \"compact\""
        )),
        "{}",
        text(&out)
    );
    assert!(stdout.contains("1 errors"), "{}", text(&out));

    // `serve` refuses to start, naming the topic and the policy.
    let cfg = config(&b, &p, &[]);
    let err = match wagate::app::Gateway::start(cfg).await {
        Ok(_) => panic!("the gateway started with a consent topic that deletes"),
        Err(e) => e.to_string(),
    };
    assert!(
        err.contains(&consent) && err.contains("cleanup.policy"),
        "{err}"
    );
    // And so does the binary, with a non-zero exit.
    let out = {
        let mut run = gateway_process(&b, &p).log("topics_policy.log").spawn();
        run.wait_for_exit(Duration::from_secs(30))
            .map(|s| (s, run.log_tail(20)))
    };
    let (status, log) = out.expect("serve exits on its own");
    assert!(!status.success(), "{log}");
    assert!(
        log.contains(&consent) && log.contains("cleanup.policy"),
        "{log}"
    );
}
