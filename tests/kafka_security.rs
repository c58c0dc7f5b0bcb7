//! Kafka over TLS and SASL with real components: each test starts its own
//! broker (Tansu behind stunnel as the TLS endpoint, SCRAM users in Tansu;
//! see `common::secure_broker`), runs wagate against it, and reads the
//! records back with a separate TLS (and SASL) consumer made here. The
//! failure cases check what an operator sees: `/readyz` 503 naming the
//! setting, webhooks 503 (nothing acknowledged that is not stored), and a
//! log line naming the setting.

mod common;

use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, StatusCode};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::{ClientConfig, Offset, TopicPartitionList};

use common::secure_broker::{SecureBroker, SecureOptions, TestCa};
use common::{free_port, post_signed, text_webhook, try_request, unique_prefix};

const NUMBER: &str = "109876543210987";

/// The event ids on `topic`, read by a consumer the test builds itself
/// (librdkafka with only `props`, none of wagate's code), until idle.
fn read_back(brokers: &str, props: &[(&str, &str)], topic: &str) -> Result<Vec<String>, String> {
    let mut cc = ClientConfig::new();
    cc.set("bootstrap.servers", brokers)
        .set("group.id", "kafka-security-test")
        .set("enable.auto.commit", "false");
    for (k, v) in props {
        cc.set(*k, *v);
    }
    let consumer: BaseConsumer = cc.create().expect("test consumer");
    // A broker that just saw another client's failed logins may drop the
    // first connection: ask up to three times.
    let mut md = consumer.fetch_metadata(Some(topic), Duration::from_secs(10));
    for _ in 0..2 {
        if md.is_ok() {
            break;
        }
        eprintln!("metadata of {topic}: {:?}; asking again", md.as_ref().err());
        md = consumer.fetch_metadata(Some(topic), Duration::from_secs(10));
    }
    let md = md.map_err(|e| format!("metadata of {topic}: {e}"))?;
    let parts = md.topics()[0].partitions().len() as i32;
    assert!(parts > 0, "{topic} has no partitions");
    let mut tpl = TopicPartitionList::new();
    for p in 0..parts {
        tpl.add_partition_offset(topic, p, Offset::Beginning)
            .unwrap();
    }
    consumer.assign(&tpl).unwrap();
    let mut ids = Vec::new();
    let mut last = Instant::now();
    while last.elapsed() < Duration::from_secs(3) {
        if let Some(Ok(m)) = consumer.poll(Duration::from_millis(100)) {
            last = Instant::now();
            let v: serde_json::Value =
                serde_json::from_slice(m.payload().unwrap_or_default()).unwrap_or_default();
            if let Some(id) = v["event_id"].as_str() {
                ids.push(id.to_string());
            }
        }
    }
    Ok(ids)
}

/// GET `/readyz` until `pred(status, body)` holds (30 s at most); returns
/// the last answer.
async fn readyz_until(
    internal: &str,
    pred: impl Fn(StatusCode, &str) -> bool,
) -> (StatusCode, String) {
    let end = Instant::now() + Duration::from_secs(30);
    let mut last = (StatusCode::IM_A_TEAPOT, String::from("no answer"));
    while Instant::now() < end {
        let req = Request::get(format!("http://{internal}/readyz"))
            .body(Full::new(Bytes::new()))
            .unwrap();
        if let Ok(r) = try_request(req).await {
            last = (r.status, String::from_utf8_lossy(&r.body).into_owned());
            if pred(last.0, &last.1) {
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    last
}

/// A webhook to an in-process gateway on `brokers` with `security` (env
/// overrides), then the record read back with `consumer_props`.
async fn webhook_round_trip(
    brokers: &str,
    security: &[(&str, &str)],
    consumer_props: &[(&str, &str)],
    tag: &str,
) {
    let prefix = unique_prefix(tag);
    let gw = common::start(brokers, &prefix, security).await;
    let wamid = format!("wamid.{tag}-1");
    let r = post_signed(gw.public_addr, "/webhook", &text_webhook(NUMBER, &[&wamid])).await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    let topic = format!("{prefix}inbound.messages");
    let (b, props, t) = (
        brokers.to_string(),
        consumer_props
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect::<Vec<_>>(),
        topic.clone(),
    );
    let ids = tokio::task::spawn_blocking(move || {
        let props: Vec<(&str, &str)> = props
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        read_back(&b, &props, &t)
    })
    .await
    .unwrap()
    .expect("read back");
    assert_eq!(ids, vec![wamid], "records on {topic}");
    assert!(gw.shutdown().await, "gateway drained");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tls_end_to_end_and_tail_over_tls() {
    let b = SecureBroker::start(SecureOptions::default());
    let ca = b.ca_file.display().to_string();
    webhook_round_trip(
        &b.tls_addr,
        &[
            ("WAGATE_KAFKA_SECURITY_PROTOCOL", "ssl"),
            ("WAGATE_KAFKA_SSL_CA_FILE", &ca),
        ],
        &[("security.protocol", "ssl"), ("ssl.ca.location", &ca)],
        "ksec-tls",
    )
    .await;
    // `wagate tail` reads over the same settings.
    let prefix = unique_prefix("ksec-tail");
    let gw = common::start(
        &b.tls_addr,
        &prefix,
        &[
            ("WAGATE_KAFKA_SECURITY_PROTOCOL", "ssl"),
            ("WAGATE_KAFKA_SSL_CA_FILE", &ca),
        ],
    )
    .await;
    let r = post_signed(
        gw.public_addr,
        "/webhook",
        &text_webhook(NUMBER, &["wamid.ksec-tail-1"]),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK);
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_wagate"))
        .args([
            "tail",
            "inbound.messages",
            "--from-beginning",
            "--idle-exit-secs",
            "3",
        ])
        .env_clear()
        .env("WAGATE_KAFKA_BROKERS", &b.tls_addr)
        .env("WAGATE_TOPIC_PREFIX", &prefix)
        .env("WAGATE_KAFKA_SECURITY_PROTOCOL", "ssl")
        .env("WAGATE_KAFKA_SSL_CA_FILE", &ca)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("wamid.ksec-tail-1"),
        "tail: {} {stdout} {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(gw.shutdown().await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn scram_over_tls_end_to_end() {
    let b = SecureBroker::start(SecureOptions {
        scram_users: vec![
            ("alice".into(), "alice-pw".into(), "scram256".into()),
            ("bob".into(), "bob-pw".into(), "scram512".into()),
        ],
        ..Default::default()
    });
    let ca = b.ca_file.display().to_string();
    for (user, pw, mech, tag) in [
        ("alice", "alice-pw", "SCRAM-SHA-256", "ksec-s256"),
        ("bob", "bob-pw", "SCRAM-SHA-512", "ksec-s512"),
    ] {
        // The password from a file, the username from the environment.
        let pw_file = b.write(&format!("{user}.password"), &format!("{pw}\n"));
        let pw_file = pw_file.display().to_string();
        webhook_round_trip(
            &b.tls_addr,
            &[
                ("WAGATE_KAFKA_SECURITY_PROTOCOL", "sasl_ssl"),
                ("WAGATE_KAFKA_SSL_CA_FILE", &ca),
                ("WAGATE_KAFKA_SASL_MECHANISM", mech),
                ("WAGATE_KAFKA_SASL_USERNAME", user),
                ("WAGATE_KAFKA_SASL_PASSWORD_FILE", &pw_file),
            ],
            &[
                ("security.protocol", "sasl_ssl"),
                ("ssl.ca.location", &ca),
                ("sasl.mechanism", mech),
                ("sasl.username", user),
                ("sasl.password", pw),
            ],
            tag,
        )
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn mutual_tls_end_to_end() {
    let clients = TestCa::new("wagate test client CA");
    let b = SecureBroker::start(SecureOptions {
        client_ca_pem: Some(clients.pem.clone()),
        ..Default::default()
    });
    let (cert, key) = clients.leaf("wagate", 1, 30);
    let cert = b.write("client.pem", &cert).display().to_string();
    let key = b.write("client.key", &key).display().to_string();
    let ca = b.ca_file.display().to_string();
    webhook_round_trip(
        &b.tls_addr,
        &[
            ("WAGATE_KAFKA_SECURITY_PROTOCOL", "ssl"),
            ("WAGATE_KAFKA_SSL_CA_FILE", &ca),
            ("WAGATE_KAFKA_SSL_CERTIFICATE_FILE", &cert),
            ("WAGATE_KAFKA_SSL_KEY_FILE", &key),
        ],
        &[
            ("security.protocol", "ssl"),
            ("ssl.ca.location", &ca),
            ("ssl.certificate.location", &cert),
            ("ssl.key.location", &key),
        ],
        "ksec-mtls",
    )
    .await;
}

/// Starts `wagate serve` on `brokers` with `security`, after creating the
/// topics with `good` settings; checks `/readyz` 503 naming `setting`, a
/// webhook 503, a log line naming `setting`, and that nothing was stored.
async fn refused(
    b: &SecureBroker,
    good: &[(&str, &str)],
    security: &[(&str, &str)],
    setting: &str,
    tag: &str,
    read_back_after: bool,
) {
    let prefix = unique_prefix(tag);
    let good_cfg = common::config(&b.tls_addr, &prefix, good);
    common::create_topics(&good_cfg.kafka).await;
    let (public, internal) = (free_port(), free_port());
    let log = b.dir.path().join(format!("{tag}.log"));
    let gw = common::gateway_process(&b.tls_addr, &prefix)
        .env("WAGATE_LISTEN", format!("127.0.0.1:{public}"))
        .env("WAGATE_INTERNAL_LISTEN", format!("127.0.0.1:{internal}"))
        .env("WAGATE_INGRESS_ACK_TIMEOUT_MS", "2000")
        .envs(security.iter().copied())
        .log_to(&log)
        .spawn();
    let internal = format!("127.0.0.1:{internal}");
    let (status, body) = readyz_until(&internal, |s, b| {
        s == StatusCode::SERVICE_UNAVAILABLE && b.contains(setting)
    })
    .await;
    assert!(
        status == StatusCode::SERVICE_UNAVAILABLE && body.contains(setting),
        "/readyz: {status} {body}\nlog:\n{}\n{}",
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .lines()
            .filter(|l| !l.contains("AllBrokersDown"))
            .take(30)
            .collect::<Vec<_>>()
            .join("\n"),
        b.logs()
    );
    let wamid = format!("wamid.{tag}-1");
    let addr: std::net::SocketAddr = format!("127.0.0.1:{public}").parse().unwrap();
    let r = post_signed(addr, "/webhook", &text_webhook(NUMBER, &[&wamid])).await;
    assert_eq!(
        r.status,
        StatusCode::SERVICE_UNAVAILABLE,
        "a webhook that cannot be stored is not acknowledged: {:?}",
        r.body
    );
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    let line = text
        .lines()
        .find(|l| l.contains("ERROR") && l.contains(setting))
        .unwrap_or_else(|| panic!("no error line naming {setting} in the log:\n{text}"));
    assert!(line.contains("kafka: "), "{line}");
    drop(gw);
    if !read_back_after {
        return;
    }
    // Nothing of it reached the topic.
    let topic = format!("{prefix}inbound.messages");
    let cc = good_cfg.kafka.connection.client_config(|_| {});
    let props: Vec<(String, String)> = cc
        .config_map()
        .into_iter()
        .filter(|(k, _)| {
            k.starts_with("ssl.") || k.starts_with("sasl.") || *k == "security.protocol"
        })
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let brokers = b.tls_addr.clone();
    let ids = tokio::task::spawn_blocking(move || {
        let props: Vec<(&str, &str)> = props
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        read_back(&brokers, &props, &topic)
    })
    .await
    .unwrap()
    .unwrap_or_else(|e| panic!("{e}\n{}", b.logs()));
    assert!(ids.is_empty(), "stored although refused: {ids:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_untrusted_broker_certificate_is_named() {
    let b = SecureBroker::start(SecureOptions::default());
    let ca = b.ca_file.display().to_string();
    let other = b.write("other-ca.pem", &TestCa::new("some other CA").pem);
    let other = other.display().to_string();
    refused(
        &b,
        &[
            ("WAGATE_KAFKA_SECURITY_PROTOCOL", "ssl"),
            ("WAGATE_KAFKA_SSL_CA_FILE", &ca),
        ],
        &[
            ("WAGATE_KAFKA_SECURITY_PROTOCOL", "ssl"),
            ("WAGATE_KAFKA_SSL_CA_FILE", &other),
        ],
        "kafka.ssl_ca_file",
        "ksec-untrusted",
        true,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn plaintext_against_a_tls_listener_is_named() {
    let b = SecureBroker::start(SecureOptions::default());
    let ca = b.ca_file.display().to_string();
    refused(
        &b,
        &[
            ("WAGATE_KAFKA_SECURITY_PROTOCOL", "ssl"),
            ("WAGATE_KAFKA_SSL_CA_FILE", &ca),
        ],
        &[],
        "kafka.security_protocol",
        "ksec-plain",
        true,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_rejected_sasl_password_is_named() {
    let b = SecureBroker::start(SecureOptions {
        scram_users: vec![("alice".into(), "alice-pw".into(), "scram256".into())],
        ..Default::default()
    });
    let ca = b.ca_file.display().to_string();
    let base = [
        ("WAGATE_KAFKA_SECURITY_PROTOCOL", "sasl_ssl"),
        ("WAGATE_KAFKA_SSL_CA_FILE", ca.as_str()),
        ("WAGATE_KAFKA_SASL_MECHANISM", "SCRAM-SHA-256"),
        ("WAGATE_KAFKA_SASL_USERNAME", "alice"),
    ];
    let mut good = base.to_vec();
    good.push(("WAGATE_KAFKA_SASL_PASSWORD", "alice-pw"));
    let mut bad = base.to_vec();
    bad.push(("WAGATE_KAFKA_SASL_PASSWORD", "not-alice-pw"));
    // No read-back afterwards: after a few seconds of failed SCRAM logins
    // through stunnel, Tansu 0.6 refuses every later login, right
    // passwords and other users included, until it restarts. A gateway
    // that never logged in cannot have written anything anyway.
    refused(&b, &good, &bad, "kafka.sasl_password", "ksec-badpw", false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_client_certificate_the_broker_refuses_is_named() {
    let clients = TestCa::new("wagate test client CA");
    let b = SecureBroker::start(SecureOptions {
        client_ca_pem: Some(clients.pem.clone()),
        ..Default::default()
    });
    let ca = b.ca_file.display().to_string();
    let (cert, key) = clients.leaf("wagate", 1, 30);
    let good_cert = b.write("good.pem", &cert).display().to_string();
    let good_key = b.write("good.key", &key).display().to_string();
    // Expired yesterday.
    let (cert, key) = clients.leaf("wagate", 10, 9);
    let old_cert = b.write("expired.pem", &cert).display().to_string();
    let old_key = b.write("expired.key", &key).display().to_string();
    refused(
        &b,
        &[
            ("WAGATE_KAFKA_SECURITY_PROTOCOL", "ssl"),
            ("WAGATE_KAFKA_SSL_CA_FILE", &ca),
            ("WAGATE_KAFKA_SSL_CERTIFICATE_FILE", &good_cert),
            ("WAGATE_KAFKA_SSL_KEY_FILE", &good_key),
        ],
        &[
            ("WAGATE_KAFKA_SECURITY_PROTOCOL", "ssl"),
            ("WAGATE_KAFKA_SSL_CA_FILE", &ca),
            ("WAGATE_KAFKA_SSL_CERTIFICATE_FILE", &old_cert),
            ("WAGATE_KAFKA_SSL_KEY_FILE", &old_key),
        ],
        "kafka.ssl_certificate_file",
        "ksec-expired",
        true,
    )
    .await;
}

#[test]
fn a_passthrough_property_librdkafka_rejects_exits_2_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    for (table, named) in [
        (
            "\"no.such.property\" = \"1\"",
            "kafka.librdkafka.\"no.such.property\"",
        ),
        ("\"acks\" = \"1\"", "kafka.librdkafka.\"acks\""),
    ] {
        let f = dir.path().join("wagate.toml");
        std::fs::write(
            &f,
            format!(
                "{}\n[kafka.librdkafka]\n{table}\n",
                wagate::config::EXAMPLE_TOML
            ),
        )
        .unwrap();
        for cmd in ["check-config", "serve"] {
            let out = std::process::Command::new(env!("CARGO_BIN_EXE_wagate"))
                .args([cmd, "--config"])
                .arg(&f)
                .env_clear()
                .env("WAGATE_APP_SECRET", "s")
                .env("WAGATE_VERIFY_TOKEN", "v")
                .env("WAGATE_API_TOKEN", "t")
                .env("WAGATE_LISTEN", "127.0.0.1:0")
                .env("WAGATE_INTERNAL_LISTEN", "127.0.0.1:0")
                .output()
                .unwrap();
            let err = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(2), "{cmd}: {err}");
            assert!(err.contains(named), "{cmd}: {err}");
        }
    }
}
