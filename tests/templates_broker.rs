//! The template registry against a real broker (Tansu) and the Graph API
//! sandbox on loopback: paged sync, each block rule, a template approved by
//! webhook sendable at once, a category correction, sends proceeding when
//! the registry knows nothing, and a restart that reads the registry back
//! from `wa.templates` before `/readyz`.

mod common;

use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};
use wagate::app::Gateway;
use wagate::config::NumberConfig;
use wagate::sandbox::{SandboxTemplate, StatusWebhookConfig};

const WABA: &str = "102345678901234";
const NUMBER: &str = "109876543210987";

static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn library() -> Vec<SandboxTemplate> {
    let mut promo = SandboxTemplate::approved("promo", "en_US", "UTILITY", "Deal: {{1}}");
    promo.status = "PAUSED".into();
    vec![
        SandboxTemplate::approved("order_shipped", "en_US", "UTILITY", "Hi {{1}}, shipped."),
        SandboxTemplate::approved("order_shipped", "pt_BR", "UTILITY", "Oi {{1}}, enviado."),
        promo,
        SandboxTemplate::approved("welcome", "en_US", "UTILITY", "Welcome."),
        SandboxTemplate::approved(
            "auth_code",
            "en_US",
            "AUTHENTICATION",
            "{{1}} is your code.",
        ),
    ]
}

/// A template send; `params` body parameters.
fn tpl(
    id: &str,
    number: &str,
    name: &str,
    lang: &str,
    category: Option<&str>,
    params: usize,
) -> Value {
    let ps: Vec<Value> = (0..params)
        .map(|i| json!({"type": "text", "text": format!("p{i}")}))
        .collect();
    let mut template = json!({"name": name, "language": {"code": lang}});
    if params > 0 {
        template["components"] = json!([{"type": "body", "parameters": ps}]);
    }
    let mut r = json!({"v": 1, "request_id": id, "phone_number_id": number, "to": "+14155550123",
        "message": {"type": "template", "template": template}});
    if let Some(c) = category {
        r["category"] = c.into();
    }
    r
}

/// A gateway on `port` whose numbers name their WABAs.
async fn gateway(
    b: &str,
    p: &str,
    sb: &wagate::sandbox::Sandbox,
    port: u16,
    wabas: &[(&str, &str)],
) -> Gateway {
    init_logs();
    let listen = format!("127.0.0.1:{port}");
    let url = sb.base_url();
    let mut cfg = config(
        b,
        p,
        &[
            ("WAGATE_GRAPH_BASE_URL", url.as_str()),
            ("WAGATE_LISTEN", listen.as_str()),
        ],
    );
    for (n, w) in wabas {
        cfg.egress.numbers.insert(
            n.to_string(),
            NumberConfig {
                throughput: None,
                access_token: None,
                waba_id: Some(w.to_string()),
            },
        );
    }
    create_topics(&cfg.kafka).await;
    let gw = Gateway::start(cfg).await.expect("gateway starts");
    assert!(
        gw.wait_ready(Duration::from_secs(30)).await,
        "gateway never became ready"
    );
    gw
}

async fn sandbox_with(
    port: u16,
    templates: Option<Vec<SandboxTemplate>>,
    page_max: usize,
) -> wagate::sandbox::Sandbox {
    sandbox(|c| {
        c.status_webhook = Some(StatusWebhookConfig {
            url: format!("http://127.0.0.1:{port}/webhook"),
            app_secret: SECRET.into(),
            statuses: vec![],
            delay: Duration::from_millis(10),
        });
        c.templates = templates;
        c.templates_page_max = page_max;
    })
    .await
}

/// The last record of every key of `wa.templates` (None: a tombstone).
async fn registry_topic(b: &str, p: &str) -> std::collections::HashMap<String, Value> {
    let mut out = std::collections::HashMap::new();
    for r in read_all(b, p, "templates", Duration::from_millis(800)).await {
        out.insert(r.key.clone().unwrap_or_default(), r.value);
    }
    out
}

async fn wait_registry(b: &str, p: &str, n: usize) -> std::collections::HashMap<String, Value> {
    let end = Instant::now() + Duration::from_secs(30);
    loop {
        let t = registry_topic(b, p).await;
        if t.values().filter(|v| !v.is_null()).count() >= n || Instant::now() > end {
            return t;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn code(r: &Value) -> Value {
    r["error"]["code"].clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paged_sync_block_rules_webhook_approval_and_category_correction() {
    let _serial = SERIAL.lock().await;
    let b = brokers();
    let p = unique_prefix("tpl-rules");
    let port = free_port();
    let sb = sandbox_with(port, Some(library()), 2).await;
    let gw = gateway(&b, &p, &sb, port, &[(NUMBER, WABA)]).await;

    // Five templates, two per page: three listings at least.
    let reg = wait_registry(&b, &p, 5).await;
    assert_eq!(reg.len(), 5, "{reg:?}");
    assert!(sb.template_listings() >= 3, "{}", sb.template_listings());
    let shipped = &reg[&format!("{WABA}:order_shipped:en_US")];
    assert_eq!(shipped["status"], "APPROVED");
    assert_eq!(shipped["category"], "UTILITY");
    assert_eq!(shipped["waba_id"], WABA);
    assert_eq!(shipped["source"], "refresh");
    assert!(shipped["updated_at_ms"].as_u64().unwrap() > 0);
    assert!(shipped["components"].is_array());
    assert_eq!(reg[&format!("{WABA}:promo:en_US")]["status"], "PAUSED");

    // Counters are per process (the other test's gateway counts too): deltas.
    let before = gw.metrics.render();
    produce_requests(
        &b,
        &p,
        &[
            tpl("ok", NUMBER, "order_shipped", "en_US", Some("utility"), 1),
            tpl("unknown-name", NUMBER, "nope", "en_US", Some("utility"), 0),
            tpl(
                "unknown-lang",
                NUMBER,
                "order_shipped",
                "fr_FR",
                Some("utility"),
                1,
            ),
            tpl("paused", NUMBER, "promo", "en_US", Some("utility"), 1),
            tpl(
                "params",
                NUMBER,
                "order_shipped",
                "en_US",
                Some("utility"),
                0,
            ),
            // Marketing without opt-in would be blocked no_opt_in: the
            // registry's UTILITY replaces it.
            tpl(
                "corrected",
                NUMBER,
                "welcome",
                "en_US",
                Some("marketing"),
                0,
            ),
            tpl("no-category", NUMBER, "welcome", "en_US", None, 0),
        ],
    )
    .await;
    let by = results(&b, &p, 7, Duration::from_secs(30)).await;
    assert_eq!(one(&by, "ok")["outcome"], "accepted", "{:?}", by.get("ok"));
    for id in ["unknown-name", "unknown-lang"] {
        let r = one(&by, id);
        assert_eq!(r["outcome"], "blocked", "{r}");
        assert_eq!(code(r), "template_unknown", "{r}");
    }
    let r = one(&by, "paused");
    assert_eq!(
        (r["outcome"].as_str(), code(r)),
        (Some("blocked"), json!("template_not_approved")),
        "{r}"
    );
    assert!(
        r["error"]["details"].as_str().unwrap().contains("PAUSED"),
        "{r}"
    );
    let r = one(&by, "params");
    assert_eq!(
        (r["outcome"].as_str(), code(r)),
        (Some("blocked"), json!("invalid_request")),
        "{r}"
    );
    assert!(
        r["error"]["details"].as_str().unwrap().contains("body"),
        "{r}"
    );
    assert_eq!(
        one(&by, "corrected")["outcome"],
        "accepted",
        "{}",
        one(&by, "corrected")
    );
    assert_eq!(
        one(&by, "no-category")["outcome"],
        "accepted",
        "{}",
        one(&by, "no-category")
    );
    // Only the three accepted reached the sandbox.
    assert_eq!(sb.sends().len(), 3);

    // Approved by webhook: sendable at once (no refresh in between: the
    // period is 300 s).
    assert!(
        sb.set_template_status(WABA, "promo", "en_US", "APPROVED")
            .await
    );
    produce_requests(
        &b,
        &p,
        &[tpl(
            "approved",
            NUMBER,
            "promo",
            "en_US",
            Some("utility"),
            1,
        )],
    )
    .await;
    let by = results(&b, &p, 8, Duration::from_secs(30)).await;
    assert_eq!(
        one(&by, "approved")["outcome"],
        "accepted",
        "{}",
        one(&by, "approved")
    );
    let promo = &registry_topic(&b, &p).await[&format!("{WABA}:promo:en_US")];
    assert_eq!(promo["status"], "APPROVED");
    assert_eq!(promo["source"], "message_template_status_update");
    assert!(
        promo["components"].is_array(),
        "the webhook keeps the listed components: {promo}"
    );

    // Paused again by webhook: blocked at once, and the template used in
    // the last hour counts as used but not approved.
    assert!(
        sb.set_template_status(WABA, "promo", "en_US", "PAUSED")
            .await
    );
    produce_requests(
        &b,
        &p,
        &[tpl(
            "paused-again",
            NUMBER,
            "promo",
            "en_US",
            Some("utility"),
            1,
        )],
    )
    .await;
    let by = results(&b, &p, 9, Duration::from_secs(30)).await;
    assert_eq!(code(one(&by, "paused-again")), "template_not_approved");

    // A category change by webhook.
    assert!(
        sb.set_template_category(WABA, "welcome", "en_US", "MARKETING")
            .await
    );
    let welcome = &registry_topic(&b, &p).await[&format!("{WABA}:welcome:en_US")];
    assert_eq!(welcome["category"], "MARKETING");

    // Metrics.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let text = gw.metrics.render();
    let delta = |name: &str, labels: &[(&str, &str)]| {
        metric_in(&text, name, labels) - metric_in(&before, name, labels)
    };
    let blocked = |reason: &str| {
        delta(
            "wagate_egress_template_blocked_total",
            &[("reason", reason)],
        )
    };
    assert_eq!(blocked("template_unknown"), 2.0);
    assert_eq!(blocked("template_not_approved"), 2.0);
    assert_eq!(blocked("parameters"), 1.0);
    assert_eq!(
        delta("wagate_egress_template_category_corrections_total", &[]),
        1.0
    );
    assert_eq!(
        metric_in(&text, "wagate_templates", &[("status", "approved")]),
        4.0
    );
    assert_eq!(
        metric_in(&text, "wagate_templates", &[("status", "paused")]),
        1.0
    );
    assert_eq!(
        metric_in(&text, "wagate_templates_used_not_approved", &[]),
        1.0
    );
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_knowledge_sends_proceed_and_a_restart_reads_the_registry_back() {
    let _serial = SERIAL.lock().await;
    let b = brokers();
    let p = unique_prefix("tpl-down");
    let port = free_port();
    let sb = sandbox_with(port, Some(library()), 100).await;
    let gw = gateway(&b, &p, &sb, port, &[(NUMBER, WABA)]).await;
    wait_registry(&b, &p, 5).await;
    assert!(gw.shutdown().await);

    // Graph down from now on; a second number's WABA is configured but was
    // never listed; a third number has no known WABA at all.
    sb.set_templates_failing(true);
    let listings = sb.template_listings();
    let gw = gateway(
        &b,
        &p,
        &sb,
        port,
        &[(NUMBER, WABA), ("109876543210988", "555000111")],
    )
    .await;
    // Ready: the registry came back from wa.templates, not from Graph.
    produce_requests(
        &b,
        &p,
        &[
            tpl(
                "paused-after-restart",
                NUMBER,
                "promo",
                "en_US",
                Some("utility"),
                1,
            ),
            tpl(
                "unknown-after-restart",
                NUMBER,
                "nope",
                "en_US",
                Some("utility"),
                0,
            ),
            tpl(
                "never-listed",
                "109876543210988",
                "nope",
                "en_US",
                Some("utility"),
                0,
            ),
            tpl(
                "no-waba",
                "109876543210989",
                "nope",
                "en_US",
                Some("utility"),
                0,
            ),
            tpl(
                "no-waba-no-category",
                "109876543210989",
                "order_shipped",
                "en_US",
                None,
                1,
            ),
            tpl(
                "no-waba-wrong-params",
                "109876543210989",
                "order_shipped",
                "en_US",
                Some("utility"),
                3,
            ),
        ],
    )
    .await;
    let by = results(&b, &p, 6, Duration::from_secs(30)).await;
    assert_eq!(
        code(one(&by, "paused-after-restart")),
        "template_not_approved"
    );
    assert_eq!(code(one(&by, "unknown-after-restart")), "template_unknown");
    // No knowledge: sent, and Meta (the sandbox) answers 132001.
    for id in ["never-listed", "no-waba"] {
        let r = one(&by, id);
        assert_eq!(r["outcome"], "failed", "{r}");
        assert_eq!(code(r), 132001, "{r}");
    }
    // Wrong parameter count, no knowledge: sent, and Meta answers 132000.
    let r = one(&by, "no-waba-wrong-params");
    assert_eq!(r["outcome"], "failed", "{r}");
    assert_eq!(code(r), 132000, "{r}");
    let r = one(&by, "no-waba-no-category");
    assert_eq!(
        (r["outcome"].as_str(), code(r)),
        (Some("blocked"), json!("invalid_request")),
        "{r}"
    );
    assert!(
        r["error"]["title"].as_str().unwrap().contains("category"),
        "{r}"
    );
    assert!(
        sb.template_listings() > listings,
        "the restarted gateway tried to list"
    );
    let text = gw.metrics.render();
    assert!(
        metric_in(
            &text,
            "wagate_templates_refresh_total",
            &[("result", "error")]
        ) >= 1.0
    );

    // Graph back: the next listing (a learnt WABA triggers one; here the
    // restart already tried) is not needed for sends of known templates.
    sb.set_templates_failing(false);
    produce_requests(
        &b,
        &p,
        &[tpl(
            "known-ok",
            NUMBER,
            "order_shipped",
            "en_US",
            Some("utility"),
            1,
        )],
    )
    .await;
    let by = results(&b, &p, 7, Duration::from_secs(30)).await;
    assert_eq!(one(&by, "known-ok")["outcome"], "accepted");
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_webhook_received_by_one_instance_reaches_the_other() {
    let _serial = SERIAL.lock().await;
    let b = brokers();
    let p = unique_prefix("tpl-fleet");
    let port = free_port();
    let sb = sandbox_with(port, Some(library()), 100).await;
    // The sandbox's webhooks go to `a`; `b` learns only from wa.templates.
    let a = gateway(&b, &p, &sb, port, &[(NUMBER, WABA)]).await;
    let other = gateway(&b, &p, &sb, free_port(), &[(NUMBER, WABA)]).await;
    let key = format!("{WABA}:order_shipped:pt_BR");
    let end = Instant::now() + Duration::from_secs(20);
    while other.templates.get(&key).is_none() && Instant::now() < end {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(other.templates.get(&key).unwrap().is_approved());
    assert!(
        sb.set_template_status(WABA, "order_shipped", "pt_BR", "DISABLED")
            .await
    );
    // `a` applied it before answering the webhook.
    assert_eq!(a.templates.get(&key).unwrap().status, "DISABLED");
    let end = Instant::now() + Duration::from_secs(20);
    while other.templates.get(&key).unwrap().status != "DISABLED" && Instant::now() < end {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(other.templates.get(&key).unwrap().status, "DISABLED");
    // A webhook naming a template no listing had yet: known at once, without components.
    let mut new = SandboxTemplate::approved("brand_new", "es_ES", "MARKETING", "Hola {{1}}");
    new.status = "PENDING".into();
    let mut lib = sb.templates();
    lib.push(new);
    sb.set_templates(Some(lib));
    assert!(
        sb.set_template_status(WABA, "brand_new", "es_ES", "APPROVED")
            .await
    );
    let t = a.templates.get(&format!("{WABA}:brand_new:es_ES")).unwrap();
    assert!(t.is_approved());
    assert_eq!(t.category.as_deref(), Some("MARKETING"));
    assert!(t.params.is_none(), "no components known from a webhook");
    other.shutdown().await;
    a.shutdown().await;
}
