//! `wagate doctor`, the real binary as a process, against the Graph API
//! sandbox, a real Tansu broker and a gateway behind the public URL (for
//! the end-to-end self-test): all good exits 0; an unsubscribed WABA fails
//! and `--fix` subscribes it (the next run is ok); overrides pointing
//! elsewhere are reported; a bad token fails; a Graph API answering 5xx fails.

mod common;

use std::process::Command;
use std::time::Duration;

use wagate::app::Gateway;
use wagate::sandbox::{account, Sandbox};

const TOKEN: &str = "test-access-token";
const NUMBER: &str = "41000000001";
const WABA: &str = "410000000000009";

struct Setup {
    sb: Sandbox,
    gw: Gateway,
    config: tempfile::NamedTempFile,
    /// `server.public_url`.
    public: String,
    brokers: String,
    prefix: String,
}

async fn setup(tag: &str) -> Setup {
    setup_with(tag, &[]).await
}

async fn setup_with(tag: &str, extra: &[(&str, &str)]) -> Setup {
    let brokers = common::brokers();
    let prefix = common::unique_prefix(tag);
    let port = common::free_port();
    let sb = common::sandbox(|c| {
        c.access_tokens = vec![TOKEN.into()];
        c.status_webhook = Some(wagate::sandbox::StatusWebhookConfig {
            url: format!("http://127.0.0.1:{port}/webhook"),
            app_secret: common::SECRET.into(),
            statuses: vec![],
            delay: Duration::from_millis(1),
        });
    })
    .await;
    sb.update_number(NUMBER, |n| n.waba_id = WABA.into());
    let listen = format!("127.0.0.1:{port}");
    let url = sb.base_url();
    let mut env = vec![
        ("WAGATE_LISTEN", listen.as_str()),
        ("WAGATE_GRAPH_BASE_URL", url.as_str()),
    ];
    env.extend_from_slice(extra);
    let gw = common::start(&brokers, &prefix, &env).await;
    let toml = format!(
        r#"
listen = "127.0.0.1:0"
internal_listen = "127.0.0.1:0"
[server]
public_url = "http://127.0.0.1:{port}"
[kafka]
brokers = "{brokers}"
topic_prefix = "{prefix}"
[graph]
base_url = "{url}"
[apps.default]
secret_env = "WAGATE_APP_SECRET"
verify_token_env = "WAGATE_VERIFY_TOKEN"
app_id = "{app}"
[egress.numbers."{NUMBER}"]
waba_id = "{WABA}"
"#,
        app = account::APP_ID
    );
    let mut config = tempfile::NamedTempFile::new().unwrap();
    std::io::Write::write_all(&mut config, toml.as_bytes()).unwrap();
    Setup {
        sb,
        gw,
        config,
        public: format!("http://127.0.0.1:{port}"),
        brokers,
        prefix,
    }
}

struct Run {
    code: i32,
    out: String,
}

impl Run {
    fn line(&self, start: &str) -> &str {
        self.out
            .lines()
            .find(|l| l.starts_with(start))
            .unwrap_or_else(|| panic!("no line starting {start:?} in:\n{}", self.out))
    }
}

async fn doctor(s: &Setup, token: &str, args: &[&str]) -> Run {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_wagate"));
    cmd.arg("doctor")
        .arg("--config")
        .arg(s.config.path())
        .args(args)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("WAGATE_APP_SECRET", common::SECRET)
        .env("WAGATE_VERIFY_TOKEN", common::VERIFY)
        .env("WAGATE_ACCESS_TOKEN", token)
        .env("WAGATE_LOG", "warn");
    let out = tokio::task::spawn_blocking(move || cmd.output().expect("run wagate doctor"))
        .await
        .unwrap();
    let run = Run {
        code: out.status.code().unwrap_or(-1),
        out: String::from_utf8_lossy(&out.stdout).into_owned(),
    };
    println!(
        "--- wagate doctor {args:?} (exit {}):\n{}",
        run.code, run.out
    );
    run
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn all_good_exits_0() {
    let s = setup("doc-ok").await;
    let r = doctor(&s, TOKEN, &[]).await;
    assert_eq!(r.code, 0, "{}", r.out);
    assert!(!r.out.lines().any(|l| l.starts_with("fail")), "{}", r.out);
    assert!(r
        .line("ok   token graph.access_token")
        .contains("never expires"));
    assert!(r
        .line(&format!("ok   waba {WABA} subscribed_apps"))
        .contains(account::APP_ID));
    assert!(r
        .line(&format!("ok   number {NUMBER} registration"))
        .contains("CONNECTED"));
    assert!(r
        .line(&format!("ok   number {NUMBER} quality"))
        .contains("throughput STANDARD"));
    assert!(r
        .line("ok   app ")
        .contains("callback URL is http://127.0.0.1:"));
    assert!(r.line("ok   self-test").contains("inbound.events"));
    s.gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_unsubscribed_waba_fails_and_fix_subscribes_it() {
    let s = setup("doc-fix").await;
    s.sb.set_subscribed(WABA, false);
    let r = doctor(&s, TOKEN, &[]).await;
    assert_eq!(r.code, 1);
    let l = r.line(&format!("fail waba {WABA} subscribed_apps"));
    assert!(l.contains("not subscribed") && l.contains("--fix"), "{l}");
    assert!(
        !s.sb.is_subscribed(WABA),
        "a run without --fix changes nothing"
    );

    let r = doctor(&s, TOKEN, &["--fix"]).await;
    assert_eq!(r.code, 0, "{}", r.out);
    let l = r.line(&format!("ok   waba {WABA} subscribed_apps"));
    assert!(l.contains("fixed: subscribed app"), "{l}");
    assert!(s.sb.is_subscribed(WABA));

    let r = doctor(&s, TOKEN, &[]).await;
    assert_eq!(r.code, 0, "{}", r.out);
    assert!(!r
        .line(&format!("ok   waba {WABA} subscribed_apps"))
        .contains("fixed"));
    s.gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn overrides_pointing_elsewhere_are_reported() {
    let s = setup("doc-over").await;
    s.sb.set_app_callback(Some("https://old-host.example/webhook"));
    s.sb.set_waba_override(WABA, Some("https://elsewhere.example/hook"));
    s.sb.set_number_override(NUMBER, Some("https://number-host.example/hook"));
    let r = doctor(&s, TOKEN, &[]).await;
    assert_eq!(r.code, 1);
    assert!(r.line("fail app ").contains("old-host.example"));
    assert!(r
        .line(&format!("fail waba {WABA} override"))
        .contains("elsewhere.example"));
    assert!(r
        .line(&format!("fail number {NUMBER} override"))
        .contains("number-host.example"));
    // Overrides to our own URL are fine.
    let own = format!("{}/webhook", s.public);
    s.sb.set_app_callback(None);
    s.sb.set_waba_override(WABA, Some(&own));
    s.sb.set_number_override(NUMBER, None);
    let r = doctor(&s, TOKEN, &[]).await;
    assert_eq!(r.code, 0, "{}", r.out);
    assert!(r.line(&format!("ok   waba {WABA} override")).contains(&own));
    s.gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_bad_token_and_a_failing_graph_api_fail() {
    let s = setup("doc-bad").await;
    let r = doctor(&s, "not-a-valid-token", &[]).await;
    assert_eq!(r.code, 1);
    let l = r.line("fail token graph.access_token");
    assert!(l.contains("not valid"), "{l}");
    let l = r.line(&format!("fail waba {WABA} subscribed_apps"));
    assert!(l.contains("190"), "{l}");
    // Expiring soon and missing a permission.
    s.sb.set_token_info(account::TokenInfo {
        expires_at: wagate::clock::now_ms() / 1000 + 3600,
        scopes: vec!["whatsapp_business_messaging".into()],
    });
    let r = doctor(&s, TOKEN, &[]).await;
    assert_eq!(r.code, 1);
    assert!(r
        .line("fail token graph.access_token")
        .contains("lacks whatsapp_business_management"));
    s.sb.set_token_info(account::TokenInfo {
        expires_at: wagate::clock::now_ms() / 1000 + 3600,
        ..Default::default()
    });
    let r = doctor(&s, TOKEN, &[]).await;
    assert_eq!(r.code, 0, "{}", r.out);
    assert!(r
        .line("warn token graph.access_token")
        .contains("expires in"));
    // The Graph API answers 5xx.
    s.sb.fail_account_requests(Some(500));
    let r = doctor(&s, TOKEN, &[]).await;
    assert_eq!(r.code, 1);
    assert!(r
        .line(&format!("fail number {NUMBER}"))
        .contains("HTTP 500"));
    s.gw.shutdown().await;
}

/// Writes a template to `{prefix}templates` in the registry's documented
/// format (key `{waba_id}:{name}:{language}`, Meta's object + `updated_at_ms`),
/// creating the topic if this build does not.
async fn put_template(s: &Setup, name: &str, lang: &str, status: &str) {
    use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
    use rdkafka::client::DefaultClientContext;
    let topic = format!("{}templates", s.prefix);
    let admin: AdminClient<DefaultClientContext> = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", &s.brokers)
        .create()
        .unwrap();
    let _ = admin
        .create_topics(
            &[NewTopic::new(&topic, 1, TopicReplication::Fixed(1))
                .set("cleanup.policy", "compact")],
            &AdminOptions::new(),
        )
        .await;
    let cfg = common::config(&s.brokers, &s.prefix, &[]);
    let p = wagate::kafka::KafkaProducer::new(&cfg.kafka).unwrap();
    let v = serde_json::json!({"name": name, "language": lang, "status": status,
        "category": "UTILITY", "id": "1", "updated_at_ms": wagate::clock::now_ms()});
    p.send(
        &topic,
        format!("{WABA}:{name}:{lang}").as_bytes(),
        &serde_json::to_vec(&v).unwrap(),
        &[],
    )
    .unwrap()
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn templates_of_queued_requests_are_checked_against_the_registry() {
    // Egress off: the requests stay queued.
    let s = setup_with("doc-tpl", &[("WAGATE_EGRESS_ENABLED", "false")]).await;
    let r = doctor(&s, TOKEN, &[]).await;
    assert!(r.line("skip templates").contains("no template registry"));
    put_template(&s, "order_shipped", "en_US", "PAUSED").await;
    common::produce_requests(
        &s.brokers,
        &s.prefix,
        &[
            common::template("q1", NUMBER, "+5511900000001"),
            common::template("q2", NUMBER, "+5511900000002"),
        ],
    )
    .await;
    let r = doctor(&s, TOKEN, &[]).await;
    assert_eq!(r.code, 1);
    let l = r.line("fail templates");
    assert!(
        l.contains("order_shipped (en_US)") && l.contains("PAUSED (2 queued)"),
        "{l}"
    );
    put_template(&s, "order_shipped", "en_US", "APPROVED").await;
    let r = doctor(&s, TOKEN, &[]).await;
    assert_eq!(r.code, 0, "{}", r.out);
    assert!(r
        .line("ok   templates")
        .contains("2 queued template requests use 1 templates"));
    s.gw.shutdown().await;
}
