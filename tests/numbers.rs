//! Number state learnt from Meta (DESIGN §14), end to end with a real Tansu
//! broker and the Graph API sandbox: a `THROUGHPUT_UPGRADE` webhook raises
//! the number's rate (measured at the sandbox), a restricted number holds
//! its lane and resumes when Meta lifts the restriction, the state is read
//! back from `wa.numbers` after a restart, the config's throughput wins
//! over Meta's level, and a portfolio without a configured limit follows
//! Meta's messaging limit.

mod common;

use std::collections::HashSet;
use std::time::{Duration, Instant};

use serde_json::Value;
use wagate::app::Gateway;
use wagate::config::{Config, NumberConfig, PortfolioConfig};
use wagate::sandbox::{account, Sandbox};

/// A gateway on a known public port (the sandbox posts its webhooks there).
fn config(brokers: &str, prefix: &str, port: u16, sb: &Sandbox, extra: &[(&str, &str)]) -> Config {
    let listen = format!("127.0.0.1:{port}");
    let url = sb.base_url();
    let mut all = vec![
        ("WAGATE_LISTEN", listen.as_str()),
        ("WAGATE_GRAPH_BASE_URL", url.as_str()),
    ];
    all.extend_from_slice(extra);
    common::config(brokers, prefix, &all)
}

fn number(waba: &str, throughput: Option<u32>) -> NumberConfig {
    NumberConfig {
        throughput,
        access_token: None,
        waba_id: Some(waba.to_string()),
    }
}

async fn start(cfg: Config, create: bool) -> Gateway {
    common::init_logs();
    if create {
        common::create_topics(&cfg.kafka).await;
    }
    let gw = Gateway::start(cfg).await.expect("gateway starts");
    assert!(
        gw.wait_ready(Duration::from_secs(30)).await,
        "gateway never became ready"
    );
    gw
}

async fn sandbox(port: u16) -> Sandbox {
    common::sandbox(|c| {
        c.default_throughput = 10;
        c.high_throughput = 100;
        c.status_webhook = Some(wagate::sandbox::StatusWebhookConfig {
            url: format!("http://127.0.0.1:{port}/webhook"),
            app_secret: common::SECRET.into(),
            statuses: vec![],
            delay: Duration::from_millis(1),
        });
    })
    .await
}

/// Waits (bounded) until the gateway's state of `id` satisfies `pred`.
async fn wait_state(
    gw: &Gateway,
    id: &str,
    what: &str,
    pred: impl Fn(&wagate::numbers::NumberState) -> bool,
) {
    let end = Instant::now() + Duration::from_secs(30);
    loop {
        if gw.numbers.get(id).is_some_and(|s| pred(&s)) {
            return;
        }
        assert!(
            Instant::now() < end,
            "{id}: never {what}; state {:?}",
            gw.numbers.get(id)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn templates(tag: &str, number: &str, n: usize) -> Vec<Value> {
    (0..n)
        .map(|i| common::template(&format!("{tag}-{i}"), number, &format!("+5511{:08}", i)))
        .collect()
}

/// Sends per second the sandbox accepted for these request ids: (count - 1)
/// over the span from the first to the last arrival.
fn measured_rate(sb: &Sandbox, ids: &HashSet<String>) -> (usize, f64) {
    let mut at: Vec<Instant> = sb
        .sends()
        .into_iter()
        .filter(|s| {
            s.biz_opaque_callback_data
                .as_ref()
                .is_some_and(|id| ids.contains(id))
        })
        .map(|s| s.arrived_at)
        .collect();
    at.sort();
    if at.len() < 2 {
        return (at.len(), 0.0);
    }
    let span = (at[at.len() - 1] - at[0]).as_secs_f64().max(0.001);
    (at.len(), (at.len() - 1) as f64 / span)
}

fn ids(reqs: &[Value]) -> HashSet<String> {
    reqs.iter()
        .map(|r| r["request_id"].as_str().unwrap().to_string())
        .collect()
}

async fn all_accepted(brokers: &str, prefix: &str, reqs: &[Value], within: Duration) {
    let want = ids(reqs);
    let by = common::results_until(brokers, prefix, within, |by| {
        want.iter().all(|id| by.contains_key(id))
    })
    .await;
    for id in &want {
        let r = common::one(&by, id);
        assert_eq!(r["outcome"], "accepted", "{id}: {r}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_throughput_upgrade_raises_the_rate_at_once_and_the_state_survives_a_restart() {
    let brokers = common::brokers();
    let prefix = common::unique_prefix("num-up");
    let port = common::free_port();
    let sb = sandbox(port).await;
    let n = "31000000001";
    let mut cfg = config(
        &brokers,
        &prefix,
        port,
        &sb,
        &[
            ("WAGATE_EGRESS_DEFAULT_THROUGHPUT", "10"),
            ("WAGATE_NUMBERS_HIGH_THROUGHPUT", "100"),
        ],
    );
    cfg.egress
        .numbers
        .insert(n.into(), number(account::WABA_ID, None));
    let gw = start(cfg.clone(), true).await;
    wait_state(&gw, n, "read from the Graph API", |s| {
        s.throughput_level.as_deref() == Some("STANDARD")
    })
    .await;

    // Before: STANDARD, 10/s (the sandbox enforces the same).
    let before = templates("before", n, 30);
    common::produce_requests(&brokers, &prefix, &before).await;
    all_accepted(&brokers, &prefix, &before, Duration::from_secs(40)).await;
    let (count, rate_before) = measured_rate(&sb, &ids(&before));
    assert_eq!(count, 30);

    // Meta upgrades the number: the webhook reaches the gateway, which
    // follows at once (the sandbox takes 100/s from now on too).
    assert!(
        sb.upgrade_throughput(n).await,
        "the gateway took the webhook"
    );
    wait_state(&gw, n, "HIGH", |s| {
        s.throughput_level.as_deref() == Some("HIGH")
    })
    .await;
    let after = templates("after", n, 300);
    common::produce_requests(&brokers, &prefix, &after).await;
    all_accepted(&brokers, &prefix, &after, Duration::from_secs(60)).await;
    let (count, rate_after) = measured_rate(&sb, &ids(&after));
    assert_eq!(count, 300);
    println!("measured at the sandbox: {rate_before:.1} sends/s before THROUGHPUT_UPGRADE, {rate_after:.1} after");
    assert!(
        rate_before < 20.0,
        "before the upgrade the number sends at 10/s: {rate_before:.1}"
    );
    assert!(
        rate_after > 3.0 * rate_before,
        "after the upgrade: {rate_after:.1}/s, before: {rate_before:.1}/s"
    );
    let none_refused = sb.sends().iter().filter(|s| s.phone_number_id == n).count();
    assert_eq!(none_refused, 330, "every send accepted, none at 130429");
    gw.shutdown().await;

    // A new instance with the Graph API down reads the state from wa.numbers.
    sb.fail_account_requests(Some(503));
    let gw = start(cfg, false).await;
    let s = gw.numbers.get(n).expect("state read back from wa.numbers");
    assert_eq!(s.throughput_level.as_deref(), Some("HIGH"));
    assert_eq!(s.waba_id.as_deref(), Some(account::WABA_ID));
    assert_eq!(s.messaging_limit.as_deref(), Some("TIER_UNLIMITED"));
    assert_eq!(s.last_event.as_deref(), Some("THROUGHPUT_UPGRADE"));
    let recs = common::read_all(&brokers, &prefix, "numbers", Duration::from_secs(2)).await;
    assert!(recs.iter().any(|r| r.key.as_deref() == Some(n)
        && r.value["throughput_level"] == "HIGH"
        && r.value["v"] == 1));
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_restricted_number_holds_its_lane_and_resumes_when_lifted() {
    let brokers = common::brokers();
    let prefix = common::unique_prefix("num-hold");
    let port = common::free_port();
    let sb = sandbox(port).await;
    let (n, waba) = ("32000000001", "320000000000009");
    sb.update_number(n, |i| i.waba_id = waba.into());
    let mut cfg = config(
        &brokers,
        &prefix,
        port,
        &sb,
        &[("WAGATE_EGRESS_CIRCUIT_HOLD_MAX_MS", "3000")],
    );
    cfg.egress.numbers.insert(n.into(), number(waba, None));
    let gw = start(cfg, true).await;
    wait_state(&gw, n, "read", |s| s.status.as_deref() == Some("CONNECTED")).await;

    assert!(sb.set_waba_restricted(waba, true, 3600).await);
    wait_state(&gw, n, "restricted", |s| {
        s.held(wagate::clock::now_ms()).is_some()
    })
    .await;
    let attempts = sb.attempts();
    // Held, then ended with a clear code once it waited circuit_hold_max.
    let first = templates("held", n, 1);
    common::produce_requests(&brokers, &prefix, &first).await;
    let by = common::results(&brokers, &prefix, 1, Duration::from_secs(30)).await;
    let r = common::one(&by, "held-0");
    assert_eq!(r["outcome"], "blocked", "{r}");
    assert_eq!(r["error"]["code"], "number_restricted", "{r}");
    assert!(
        r["error"]["details"]
            .as_str()
            .is_some_and(|d| d.contains("ACCOUNT_RESTRICTION")),
        "{r}"
    );
    assert_eq!(sb.attempts(), attempts, "nothing was sent to Meta");

    // Another request waits; Meta lifts the restriction; it goes.
    let second = templates("resumed", n, 1);
    common::produce_requests(&brokers, &prefix, &second).await;
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert_eq!(sb.attempts(), attempts, "still held");
    assert!(sb.set_waba_restricted(waba, false, 0).await);
    all_accepted(&brokers, &prefix, &second, Duration::from_secs(30)).await;
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_configured_throughput_wins_over_metas_level() {
    let brokers = common::brokers();
    let prefix = common::unique_prefix("num-cfg");
    let port = common::free_port();
    let sb = sandbox(port).await;
    let n = "33000000001";
    sb.update_number(n, |i| i.throughput_level = "HIGH".into());
    let mut cfg = config(
        &brokers,
        &prefix,
        port,
        &sb,
        &[("WAGATE_NUMBERS_HIGH_THROUGHPUT", "100")],
    );
    cfg.egress
        .numbers
        .insert(n.into(), number(account::WABA_ID, Some(10)));
    let gw = start(cfg, true).await;
    wait_state(&gw, n, "HIGH", |s| {
        s.throughput_level.as_deref() == Some("HIGH")
    })
    .await;
    let reqs = templates("cfg", n, 30);
    common::produce_requests(&brokers, &prefix, &reqs).await;
    all_accepted(&brokers, &prefix, &reqs, Duration::from_secs(40)).await;
    let (count, rate) = measured_rate(&sb, &ids(&reqs));
    assert_eq!(count, 30);
    println!("config throughput 10/s, Meta's level HIGH: measured {rate:.1} sends/s");
    // The limiter lets at most 10 into any one second: 30 sends span ≥ 2 s.
    assert!(rate < 16.0, "the config's 10/s is the rate: {rate:.1}");
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_portfolio_without_a_limit_follows_metas_messaging_limit() {
    let brokers = common::brokers();
    let prefix = common::unique_prefix("num-tier");
    let port = common::free_port();
    let sb = sandbox(port).await;
    let n = "34000000001";
    sb.update_number(n, |i| i.messaging_limit = "TIER_50".into());
    let mut cfg = config(
        &brokers,
        &prefix,
        port,
        &sb,
        &[("WAGATE_EGRESS_DEFAULT_THROUGHPUT", "80")],
    );
    cfg.egress
        .numbers
        .insert(n.into(), number(account::WABA_ID, None));
    cfg.egress.portfolios.push(PortfolioConfig {
        name: "acme".into(),
        limit: 0,
        numbers: vec![n.into()],
    });
    let gw = start(cfg, true).await;
    wait_state(&gw, n, "read", |s| {
        s.messaging_limit.as_deref() == Some("TIER_50")
    })
    .await;
    // The tier follows within one commit tick (200 ms).
    tokio::time::sleep(Duration::from_millis(600)).await;
    let reqs = templates("tier", n, 52);
    common::produce_requests(&brokers, &prefix, &reqs).await;
    let by = common::results(&brokers, &prefix, 52, Duration::from_secs(90)).await;
    assert_eq!(by.len(), 52, "a result for every request within 90 s");
    let blocked: Vec<&Value> = by
        .values()
        .map(|v| &v[0])
        .filter(|r| r["outcome"] == "blocked")
        .collect();
    assert_eq!(blocked.len(), 2, "50 users fit TIER_50, 2 do not");
    assert!(blocked.iter().all(|r| r["error"]["code"] == "tier_limit"));
    gw.shutdown().await;
}
