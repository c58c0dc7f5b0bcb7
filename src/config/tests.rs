//! Config tests.

use super::*;

fn env(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn required() -> BTreeMap<String, String> {
    env(&[
        ("WAGATE_APP_SECRET", "s3cret"),
        ("WAGATE_VERIFY_TOKEN", "vt"),
        ("WAGATE_API_TOKEN", "api"),
        ("WAGATE_ACCESS_TOKEN", "acc"),
    ])
}

#[test]
fn example_config_with_contract_env_is_complete() {
    let c = load(None, &required(), LoadOptions::default()).unwrap();
    assert_eq!(c.kafka.connection.brokers(), "127.0.0.1:9092");
    assert_eq!(c.kafka.connection.security_protocol(), "plaintext");
    assert_eq!(c.kafka.topic_prefix, "wa.");
    assert_eq!(c.listen.to_string(), "0.0.0.0:8080");
    assert_eq!(c.internal_listen.to_string(), "127.0.0.1:9090");
    assert_eq!(c.app("default").unwrap().secrets[0].expose(), "s3cret");
    assert_eq!(c.app("default").unwrap().verify_token.expose(), "vt");
    assert_eq!(c.tenants[0].token.expose(), "api");
    assert!(c.tenants[0].numbers.is_none());
    assert_eq!(c.graph.access_token.as_ref().unwrap().expose(), "acc");
    assert_eq!(c.graph.base_url, "https://graph.facebook.com/v23.0");
    assert_eq!(c.egress.default_throughput, 80);
    assert_eq!(c.max_body_bytes, 3 * 1024 * 1024);
}

#[test]
fn graph_token_file_replaces_the_default_env_var() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("token");
    std::fs::write(&f, "from-file\n").unwrap();
    let mut e = required();
    e.insert(
        "WAGATE_GRAPH_ACCESS_TOKEN_FILE".into(),
        f.to_str().unwrap().into(),
    );
    let c = load(None, &e, LoadOptions::default()).unwrap();
    assert_eq!(c.graph.access_token.as_ref().unwrap().expose(), "from-file");
    // Another variable named explicitly and a file: ambiguous, refused.
    e.insert("WAGATE_GRAPH_ACCESS_TOKEN_ENV".into(), "OTHER_TOKEN".into());
    let err = load(None, &e, LoadOptions::default())
        .unwrap_err()
        .to_string();
    assert!(err.contains("graph.access_token"), "{err}");
}

#[test]
fn contract_env_overrides() {
    let mut e = required();
    for (k, v) in [
        ("WAGATE_KAFKA_BROKERS", "10.1.1.1:9092,10.1.1.2:9092"),
        ("WAGATE_TOPIC_PREFIX", "acme."),
        ("WAGATE_LISTEN", "127.0.0.1:18080"),
        ("WAGATE_INTERNAL_LISTEN", "127.0.0.1:19090"),
        ("WAGATE_GRAPH_BASE_URL", "http://127.0.0.1:7000/v23.0/"),
        ("WAGATE_DEFAULT_THROUGHPUT", "20"),
        ("WAGATE_INGRESS_RAW_ENABLED", "false"),
    ] {
        e.insert(k.into(), v.into());
    }
    let c = load(None, &e, LoadOptions::default()).unwrap();
    assert_eq!(c.kafka.connection.brokers(), "10.1.1.1:9092,10.1.1.2:9092");
    assert_eq!(c.kafka.topic_prefix, "acme.");
    assert_eq!(c.listen.port(), 18080);
    assert_eq!(c.internal_listen.port(), 19090);
    assert_eq!(c.graph.base_url, "http://127.0.0.1:7000/v23.0");
    assert_eq!(c.egress.default_throughput, 20);
    assert!(!c.ingress.raw_enabled);
}

#[test]
fn opt_out_lists_are_configurable_and_checked() {
    let c = load(None, &required(), LoadOptions::default()).unwrap();
    assert!(c.contacts.opt_out_keywords.iter().any(|k| k == "stop"));
    let mut e = required();
    e.insert(
        "WAGATE_CONTACTS_OPT_OUT_KEYWORDS".into(),
        "halt, désabonner".into(),
    );
    e.insert("WAGATE_CONTACTS_OPT_OUT_PAYLOADS".into(), "OPT_OUT".into());
    let c = load(None, &e, LoadOptions::default()).unwrap();
    assert_eq!(c.contacts.opt_out_keywords, ["halt", "désabonner"]);
    let k = c.contacts.keywords();
    assert!(k.detect("DESABONNER").is_some() && k.detect("stop").is_none());
    assert!(k.detect_payload("OPT_OUT").is_some());
    for (key, value) in [
        ("WAGATE_CONTACTS_OPT_IN_KEYWORDS", "Stop!"),
        ("WAGATE_CONTACTS_OPT_OUT_KEYWORDS", "stop,!!"),
        ("WAGATE_CONTACTS_OPT_IN_PAYLOADS", "OPT_OUT"),
    ] {
        let mut e = required();
        e.insert("WAGATE_CONTACTS_OPT_OUT_PAYLOADS".into(), "OPT_OUT".into());
        e.insert(key.into(), value.into());
        let err = load(None, &e, LoadOptions::default()).unwrap_err();
        let named = key.trim_start_matches("WAGATE_").to_ascii_lowercase();
        let named = named.replacen('_', ".", 1);
        assert!(err.to_string().contains(&named), "{key}: {err}");
    }
}

#[test]
fn tenants_never_share_a_token() {
    // a and default share a token, with b between them in key order.
    let text = format!(
        "{EXAMPLE_TOML}\n[tenants.a]\ntoken_env = \"WAGATE_API_TOKEN\"\nnumbers = [\"1\"]\n\
         [tenants.b]\ntoken_env = \"TB\"\nnumbers = [\"2\"]\n"
    );
    let mut e = required();
    e.insert("TB".into(), "token-b".into());
    let err = load_str(&text, "x.toml", &e, LoadOptions::default()).unwrap_err();
    assert!(err.to_string().contains("tenants.default.token"), "{err}");
}

#[test]
fn ingress_linger_defaults_to_20_ms_and_must_leave_room_for_the_ack() {
    let c = load(None, &required(), LoadOptions::default()).unwrap();
    assert_eq!(c.ingress.linger_ms, 20);
    assert_eq!(c.kafka.linger_ms, 5);
    let mut e = required();
    e.insert("WAGATE_INGRESS_LINGER_MS".into(), "5".into());
    let c = load(None, &e, LoadOptions::default()).unwrap();
    assert_eq!(c.ingress.linger_ms, 5);
    e.insert("WAGATE_INGRESS_ACK_TIMEOUT_MS".into(), "9".into());
    let err = load(None, &e, LoadOptions::default()).unwrap_err();
    assert!(err.to_string().contains("ingress.linger_ms"), "{err}");
}

#[test]
fn unknown_key_is_named() {
    let text = format!("{EXAMPLE_TOML}\n[kafka2]\nbrokerz = 1\n");
    let err = load_str(&text, "x.toml", &required(), LoadOptions::default()).unwrap_err();
    assert!(err.to_string().contains("kafka2"), "{err}");
    let text = EXAMPLE_TOML.replace("[kafka]", "[kafka]\nbrokerz = \"a\"");
    let err = load_str(&text, "x.toml", &required(), LoadOptions::default()).unwrap_err();
    assert!(err.to_string().contains("brokerz"), "{err}");
}

#[test]
fn bad_env_value_names_the_variable() {
    let mut e = required();
    e.insert("WAGATE_DEFAULT_THROUGHPUT".into(), "fast".into());
    let err = load(None, &e, LoadOptions::default()).unwrap_err();
    assert!(
        err.to_string().contains("WAGATE_DEFAULT_THROUGHPUT"),
        "{err}"
    );
    let mut e = required();
    e.insert("WAGATE_LISTEN".into(), "nowhere".into());
    let err = load(None, &e, LoadOptions::default()).unwrap_err();
    assert!(err.to_string().starts_with("listen:"), "{err}");
}

#[test]
fn missing_secret_is_an_error_naming_the_variable_except_in_dev() {
    let err = load(None, &env(&[]), LoadOptions::default()).unwrap_err();
    assert!(err.to_string().contains("WAGATE_APP_SECRET"), "{err}");
    let c = load(None, &env(&[]), LoadOptions { dev: true }).unwrap();
    assert_eq!(
        c.app("default").unwrap().secrets[0].expose(),
        DEV_APP_SECRET
    );
}

#[test]
fn rotation_and_secret_files() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("prev");
    std::fs::write(&f, "old-secret\n").unwrap();
    let text = EXAMPLE_TOML.replace(
        "secret_env = \"WAGATE_APP_SECRET\"",
        &format!(
            "secret_env = \"WAGATE_APP_SECRET\"\nprevious_secret_file = {:?}",
            f.display().to_string()
        ),
    );
    let c = load_str(&text, "x", &required(), LoadOptions::default()).unwrap();
    let app = c.app("default").unwrap();
    assert_eq!(app.secrets.len(), 2);
    assert_eq!(app.secrets[1].expose(), "old-secret");
}

#[test]
fn secrets_do_not_show_in_debug() {
    let c = load(None, &required(), LoadOptions::default()).unwrap();
    let dbg = format!("{c:?}");
    assert!(!dbg.contains("s3cret"));
    assert!(dbg.contains("***"));
}

#[test]
fn env_names() {
    assert_eq!(env_name_for("kafka.brokers"), "WAGATE_KAFKA_BROKERS");
    assert_eq!(env_name_for("graph.base_url"), "WAGATE_GRAPH_BASE_URL");
    assert_eq!(env_name_for("internal_listen"), "WAGATE_INTERNAL_LISTEN");
}

#[test]
fn topic_tables_set_partitions_retention_and_in_sync_replicas() {
    let text = format!(
        "{EXAMPLE_TOML}\n[kafka.topics.inbound_messages]\nretention_ms = 7776000000\npartitions = 12\n\
         [kafka.topics.consent]\nreplication_factor = 3\nmin_insync_replicas = 2\n"
    );
    let c = load_str(&text, "x.toml", &required(), LoadOptions::default()).unwrap();
    let m = c.kafka.topic(TopicId::InboundMessages);
    assert_eq!((m.partitions, m.retention_ms), (12, 7_776_000_000));
    let consent = c.kafka.topic(TopicId::Consent);
    assert_eq!(
        (
            consent.replication_factor,
            consent.min_insync_replicas,
            consent.retention_ms
        ),
        (3, Some(2), -1)
    );
    // Untouched topics keep the defaults.
    let raw = c.kafka.topic(TopicId::InboundRaw);
    assert_eq!(
        (
            raw.partitions,
            raw.replication_factor,
            raw.retention_ms,
            raw.min_insync_replicas
        ),
        (
            c.kafka.partitions,
            c.kafka.replication_factor,
            3 * 24 * 3600 * 1000,
            None
        )
    );
    // The file's value can be overridden from the environment.
    let mut e = required();
    e.insert(
        "WAGATE_KAFKA_TOPICS_INBOUND_MESSAGES_RETENTION_MS".into(),
        "-1".into(),
    );
    let c = load_str(&text, "x.toml", &e, LoadOptions::default()).unwrap();
    assert_eq!(c.kafka.topic(TopicId::InboundMessages).retention_ms, -1);
}

#[test]
fn topic_tables_refuse_unknown_names_and_settings_that_cannot_hold() {
    let bad = [
        (
            "[kafka.topics.inbound_mesages]\npartitions = 1\n",
            "kafka.topics.inbound_mesages",
            "inbound_messages",
        ),
        (
            "[kafka.topics.consent]\nretention_ms = 86400000\n",
            "kafka.topics.consent.retention_ms",
            "compacted",
        ),
        (
            "[kafka.topics.inbound_raw]\nretention_ms = 5\n",
            "kafka.topics.inbound_raw.retention_ms",
            "one hour",
        ),
        (
            "[kafka.topics.users]\nmin_insync_replicas = 2\n",
            "kafka.topics.users.min_insync_replicas",
            "replication factor",
        ),
        (
            "[kafka.topics.windows]\npartitions = 0\n",
            "kafka.topics.windows.partitions",
            "greater than 0",
        ),
        (
            "[kafka.topics.windows]\npartition = 3\n",
            "partition",
            "unknown field",
        ),
    ];
    for (table, key, why) in bad {
        let text = format!("{EXAMPLE_TOML}\n{table}");
        let err = load_str(&text, "x.toml", &required(), LoadOptions::default())
            .unwrap_err()
            .to_string();
        assert!(err.contains(key) && err.contains(why), "{table}: {err}");
    }
}

#[test]
fn listener_tls_is_off_by_default_and_set_by_the_environment() {
    let c = load(None, &required(), LoadOptions::default()).unwrap();
    assert!(c.tls.is_none() && c.internal_tls.is_none());

    let dir = tempfile::tempdir().unwrap();
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
    let (cf, kf) = (dir.path().join("c.pem"), dir.path().join("k.pem"));
    std::fs::write(&cf, cert.cert.pem()).unwrap();
    std::fs::write(&kf, cert.signing_key.serialize_pem()).unwrap();
    let path = |p: &std::path::Path| p.to_str().unwrap().to_string();
    let mut e = required();
    e.insert("WAGATE_SERVER_TLS_CERT_FILE".into(), path(&cf));
    e.insert("WAGATE_SERVER_TLS_KEY_FILE".into(), path(&kf));
    e.insert("WAGATE_INTERNAL_TLS_CERT_FILE".into(), path(&cf));
    e.insert("WAGATE_INTERNAL_TLS_KEY_FILE".into(), path(&kf));
    e.insert("WAGATE_INTERNAL_TLS_CLIENT_CA_FILE".into(), path(&cf));
    let c = load(None, &e, LoadOptions::default()).unwrap();
    let t = c.tls.unwrap();
    assert_eq!((t.cert_file, t.key_file), (cf.clone(), kf.clone()));
    assert!(t.client_ca_file.is_none());
    assert_eq!(c.internal_tls.unwrap().client_ca_file, Some(cf.clone()));

    // One file without the other, or a client CA without a certificate.
    let mut half = required();
    half.insert("WAGATE_SERVER_TLS_CERT_FILE".into(), path(&cf));
    let err = load(None, &half, LoadOptions::default()).unwrap_err();
    assert!(err.to_string().starts_with("server.tls.key_file:"), "{err}");
    let mut ca_only = required();
    ca_only.insert("WAGATE_INTERNAL_TLS_CLIENT_CA_FILE".into(), path(&cf));
    let err = load(None, &ca_only, LoadOptions::default()).unwrap_err();
    assert!(
        err.to_string().starts_with("internal_tls.client_ca_file:"),
        "{err}"
    );
    // A client CA on the public listener is an unknown key.
    let err = load_str(
        "[server.tls]\nclient_ca_file = \"x\"\n",
        "t.toml",
        &required(),
        LoadOptions::default(),
    )
    .unwrap_err();
    assert!(err.to_string().contains("client_ca_file"), "{err}");
    // A file that does not exist: named by its key.
    let mut gone = e.clone();
    gone.insert(
        "WAGATE_INTERNAL_TLS_KEY_FILE".into(),
        "/nonexistent/k.pem".into(),
    );
    let err = load(None, &gone, LoadOptions::default()).unwrap_err();
    assert!(
        err.to_string()
            .starts_with("internal_tls.key_file: cannot read"),
        "{err}"
    );
}

fn load_kafka(toml_kafka: &str, extra_env: &[(&str, &str)]) -> Result<Config, ConfigError> {
    let mut e = required();
    for (k, v) in extra_env {
        e.insert(k.to_string(), v.to_string());
    }
    load_str(
        &format!(
            "[kafka]\n{toml_kafka}\n[apps.default]\nsecret_env = \"WAGATE_APP_SECRET\"\n\
             verify_token_env = \"WAGATE_VERIFY_TOKEN\"\n"
        ),
        "test.toml",
        &e,
        LoadOptions::default(),
    )
}

fn kafka_err(toml_kafka: &str, extra_env: &[(&str, &str)]) -> String {
    load_kafka(toml_kafka, extra_env).unwrap_err().to_string()
}

#[test]
fn kafka_security_defaults_to_plaintext_without_passthrough() {
    let c = load(None, &required(), LoadOptions::default()).unwrap();
    assert_eq!(c.kafka.connection.security_protocol(), "plaintext");
    let cc = c.kafka.connection.client_config(|_| {});
    assert_eq!(cc.get("security.protocol"), None);
    assert_eq!(cc.get("bootstrap.servers"), Some("127.0.0.1:9092"));
}

#[test]
fn kafka_security_errors_name_the_key() {
    let e = kafka_err("security_protocol = \"tls\"", &[]);
    assert!(e.starts_with("kafka.security_protocol:"), "{e}");
    // SASL without a mechanism, a mechanism without SASL.
    let e = kafka_err("security_protocol = \"sasl_ssl\"", &[]);
    assert!(e.starts_with("kafka.sasl_mechanism:"), "{e}");
    let e = kafka_err("sasl_mechanism = \"PLAIN\"", &[]);
    assert!(e.starts_with("kafka.sasl_mechanism:"), "{e}");
    let e = kafka_err(
        "security_protocol = \"sasl_ssl\"\nsasl_mechanism = \"GSSAPI\"",
        &[],
    );
    assert!(e.starts_with("kafka.sasl_mechanism:"), "{e}");
    // Credentials only from the environment or a file.
    let e = kafka_err(
        "security_protocol = \"sasl_ssl\"\nsasl_mechanism = \"SCRAM-SHA-512\"",
        &[("WAGATE_KAFKA_SASL_USERNAME", "alice")],
    );
    assert!(
        e.starts_with("kafka.sasl_password:") && e.contains("WAGATE_KAFKA_SASL_PASSWORD"),
        "{e}"
    );
    // Files must exist at start.
    let e = kafka_err(
        "security_protocol = \"ssl\"\nssl_ca_file = \"/nonexistent/ca.pem\"",
        &[],
    );
    assert!(
        e.starts_with("kafka.ssl_ca_file:") && e.contains("/nonexistent/ca.pem"),
        "{e}"
    );
    // A TLS setting without TLS.
    let e = kafka_err("ssl_ca_file = \"/etc/hostname\"", &[]);
    assert!(e.starts_with("kafka.ssl_ca_file:"), "{e}");
    // A certificate without its key.
    let e = kafka_err(
        "security_protocol = \"ssl\"\nssl_certificate_file = \"/etc/hostname\"",
        &[],
    );
    assert!(e.starts_with("kafka.ssl_key_file:"), "{e}");
    // OAUTHBEARER needs the OIDC endpoint, client id and secret.
    let e = kafka_err(
        "security_protocol = \"sasl_ssl\"\nsasl_mechanism = \"OAUTHBEARER\"",
        &[],
    );
    assert!(
        e.starts_with("kafka.sasl_oauthbearer_token_endpoint_url:"),
        "{e}"
    );
    let e = kafka_err(
        "security_protocol = \"sasl_ssl\"\nsasl_mechanism = \"OAUTHBEARER\"\n\
         sasl_oauthbearer_token_endpoint_url = \"https://idp.example/token\"\n\
         sasl_oauthbearer_client_id = \"wagate\"",
        &[],
    );
    assert!(
        e.starts_with("kafka.sasl_oauthbearer_client_secret:"),
        "{e}"
    );
}

#[test]
fn kafka_security_from_the_environment_and_files() {
    let dir = tempfile::tempdir().unwrap();
    let pw = dir.path().join("password");
    std::fs::write(&pw, "from-file\n").unwrap();
    let c = load_kafka(
        "",
        &[
            ("WAGATE_KAFKA_SECURITY_PROTOCOL", "sasl_plaintext"),
            ("WAGATE_KAFKA_SASL_MECHANISM", "SCRAM-SHA-256"),
            ("WAGATE_KAFKA_SASL_USERNAME", "alice"),
            ("WAGATE_KAFKA_SASL_PASSWORD_FILE", pw.to_str().unwrap()),
        ],
    )
    .unwrap();
    let cc = c.kafka.connection.client_config(|_| {});
    assert_eq!(cc.get("security.protocol"), Some("sasl_plaintext"));
    assert_eq!(cc.get("sasl.mechanism"), Some("SCRAM-SHA-256"));
    assert_eq!(cc.get("sasl.username"), Some("alice"));
    assert_eq!(cc.get("sasl.password"), Some("from-file"));
    // Never printed.
    let shown = format!("{:?}", c.kafka);
    assert!(!shown.contains("from-file"), "{shown}");
    let c = load_kafka(
        "security_protocol = \"sasl_ssl\"\nsasl_mechanism = \"OAUTHBEARER\"\n\
         sasl_oauthbearer_token_endpoint_url = \"https://idp.example/token\"\n\
         sasl_oauthbearer_client_id = \"wagate\"\nsasl_oauthbearer_scope = \"kafka\"",
        &[("WAGATE_KAFKA_SASL_OAUTHBEARER_CLIENT_SECRET", "cs")],
    )
    .unwrap();
    let cc = c.kafka.connection.client_config(|_| {});
    assert_eq!(cc.get("sasl.oauthbearer.method"), Some("oidc"));
    assert_eq!(cc.get("sasl.oauthbearer.client.secret"), Some("cs"));
    assert_eq!(cc.get("sasl.oauthbearer.scope"), Some("kafka"));
}

#[test]
fn librdkafka_passthrough_is_checked_and_applied() {
    let c = load_kafka(
        "[kafka.librdkafka]\n\"socket.keepalive.enable\" = \"true\"\n\"reconnect.backoff.max.ms\" = \"2000\"",
        &[],
    )
    .unwrap();
    let cc = c.kafka.connection.client_config(|_| {});
    assert_eq!(cc.get("reconnect.backoff.max.ms"), Some("2000"));
    let e = kafka_err(
        "[kafka.librdkafka]\n\"enable.idempotence\" = \"false\"",
        &[],
    );
    assert!(
        e.starts_with("kafka.librdkafka.\"enable.idempotence\": refused:"),
        "{e}"
    );
    let e = kafka_err(
        "[kafka.librdkafka]\n\"reconnect.backoff.max.mz\" = \"1\"",
        &[],
    );
    assert!(
        e.starts_with("kafka.librdkafka.\"reconnect.backoff.max.mz\": librdkafka rejects it"),
        "{e}"
    );
}

#[test]
fn number_state_keys_and_their_errors() {
    let c = load(None, &required(), LoadOptions::default()).unwrap();
    assert_eq!(c.numbers.refresh, Some(Duration::from_secs(900)));
    assert_eq!(c.numbers.high_throughput, 1000);
    assert_eq!(c.public_url, None);
    assert_eq!(c.app("default").unwrap().app_id, None);
    let mut e = required();
    e.insert("WAGATE_NUMBERS_REFRESH_SECS".into(), "0".into());
    e.insert("WAGATE_NUMBERS_HIGH_THROUGHPUT".into(), "500".into());
    e.insert(
        "WAGATE_SERVER_PUBLIC_URL".into(),
        "https://wa.example.com/".into(),
    );
    let c = load(None, &e, LoadOptions::default()).unwrap();
    assert_eq!(c.numbers.refresh, None);
    assert_eq!(c.numbers.high_throughput, 500);
    assert_eq!(c.public_url.as_deref(), Some("https://wa.example.com"));
    e.insert("WAGATE_SERVER_PUBLIC_URL".into(), "wa.example.com".into());
    let err = load(None, &e, LoadOptions::default()).unwrap_err();
    assert!(err.to_string().contains("server.public_url"), "{err}");

    let text = format!(
        "{EXAMPLE_TOML}\n[egress.numbers.\"111\"]\nwaba_id = \"222\"\n[egress.portfolios.acme]\nnumbers = [\"111\"]\n"
    )
    .replace(
        "verify_token_env = \"WAGATE_VERIFY_TOKEN\"",
        "verify_token_env = \"WAGATE_VERIFY_TOKEN\"\napp_id = \"333\"",
    );
    let c = load_str(&text, "x.toml", &required(), LoadOptions::default()).unwrap();
    assert_eq!(c.egress.numbers["111"].waba_id.as_deref(), Some("222"));
    assert_eq!(c.egress.portfolios[0].limit, 0, "no limit: follow Meta's");
    assert_eq!(c.app("default").unwrap().app_id.as_deref(), Some("333"));
    let bad = text.replace("waba_id = \"222\"", "waba_id = \"x22\"");
    let err = load_str(&bad, "x.toml", &required(), LoadOptions::default()).unwrap_err();
    assert!(
        err.to_string().contains("egress.numbers.111.waba_id"),
        "{err}"
    );
    let bad = text.replace("app_id = \"333\"", "app_id = \"app\"");
    let err = load_str(&bad, "x.toml", &required(), LoadOptions::default()).unwrap_err();
    assert!(err.to_string().contains("apps.default.app_id"), "{err}");
}

#[test]
fn templates_refresh_and_number_wabas() {
    let c = load(None, &required(), LoadOptions::default()).unwrap();
    assert_eq!(c.templates.refresh, Duration::from_secs(300));
    let mut e = required();
    e.insert("WAGATE_TEMPLATES_REFRESH_SECS".into(), "60".into());
    let text = format!("{EXAMPLE_TOML}\n[egress.numbers.\"109876543210987\"]\nwaba_id = \"102345678901234\"\n[egress.numbers.\"1\"]\n");
    let c = load_str(&text, "x.toml", &e, LoadOptions::default()).unwrap();
    assert_eq!(c.templates.refresh, Duration::from_secs(60));
    assert_eq!(
        c.egress.numbers["109876543210987"].waba_id.as_deref(),
        Some("102345678901234")
    );
    assert_eq!(c.egress.numbers["1"].waba_id, None);
    let bad = format!("{EXAMPLE_TOML}\n[egress.numbers.\"1\"]\nwaba_id = \"acme\"\n");
    let err = load_str(&bad, "x.toml", &required(), LoadOptions::default()).unwrap_err();
    assert!(
        err.to_string().contains("egress.numbers.1.waba_id"),
        "{err}"
    );
    e.insert("WAGATE_TEMPLATES_REFRESH_SECS".into(), "0".into());
    let err = load(None, &e, LoadOptions::default()).unwrap_err();
    assert!(err.to_string().contains("templates.refresh_secs"), "{err}");
}
