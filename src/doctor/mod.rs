//! `wagate doctor`: what silently breaks webhooks and sends, checked one
//! line at a time (DESIGN §14): the access token, each WABA's
//! `subscribed_apps`, callback overrides at app / WABA / number level, each
//! number's registration, name, quality and throughput, the templates
//! queued requests name (against `wa.templates`), and an end-to-end
//! self-test through the public URL. `--fix` subscribes the app where it
//! is not subscribed and says what it changed.
//!
//! Which apps, WABAs and numbers: every configured one (`[apps.NAME]
//! app_id`, `[egress.numbers."ID"] waba_id`) and every one wagate learnt
//! (`wa.numbers`).
//!
//! The self-test posts a webhook whose only change has the field
//! `wagate_doctor` (value `{"nonce":…,"at_ms":…}`), signed with the
//! default app's secret, to `{server.public_url}/webhook`, and looks for it
//! on `wa.inbound.events`. Its records carry the header
//! `wagate-kind: wagate_doctor` (and `"kind":"wagate_doctor"`): consumers
//! ignore them by that header.

use std::collections::BTreeSet;
use std::time::Duration;

use serde_json::{json, Value};

use crate::config::{Config, Secret};
use crate::numbers::graph::{GraphApi, GraphFailure};
use crate::numbers::{NumberState, GRAPH_FIELDS};

/// The field of the self-test's webhook (and its records' `wagate-kind`).
pub const SELF_TEST_KIND: &str = "wagate_doctor";
/// Permissions a token needs (CLOUD_API §4: messages need the first, every
/// other webhook field and the management calls the second).
pub const PERMISSIONS: [&str; 2] = [
    "whatsapp_business_messaging",
    "whatsapp_business_management",
];
/// A token expiring sooner than this is a warning.
const EXPIRY_WARNING_SECS: u64 = 7 * 24 * 3600;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Ok,
    Warn,
    Fail,
    Skip,
}

impl Status {
    pub fn label(self) -> &'static str {
        match self {
            Status::Ok => "ok",
            Status::Warn => "warn",
            Status::Fail => "fail",
            Status::Skip => "skip",
        }
    }
}

/// One line of the report.
#[derive(Debug, Clone, PartialEq)]
pub struct Check {
    pub status: Status,
    /// `token`, `subscribed_apps 1234`, `number 5678`, …
    pub name: String,
    pub message: String,
    /// What to do about it (none for `ok`).
    pub fix: Option<String>,
}

impl std::fmt::Display for Check {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{:<4} {}: {}",
            self.status.label(),
            self.name,
            self.message
        )?;
        if let Some(fix) = &self.fix {
            write!(f, " — fix: {fix}")?;
        }
        Ok(())
    }
}

fn check(
    status: Status,
    name: impl Into<String>,
    message: impl Into<String>,
    fix: Option<String>,
) -> Check {
    Check {
        status,
        name: name.into(),
        message: message.into(),
        fix,
    }
}

/// What `--fix` and the flags change.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// Subscribe the app to every WABA it is not subscribed to.
    pub fix: bool,
    /// Skip reading `wa.numbers` and the self-test's Kafka read (no broker).
    pub no_kafka: bool,
    /// WABAs to check besides the configured and learnt ones.
    pub extra_wabas: Vec<String>,
}

/// Runs every check; `each` gets each line as soon as it is known.
pub async fn run(cfg: &Config, opts: &Options, each: &mut dyn FnMut(&Check)) -> Vec<Check> {
    let mut out = Vec::new();
    let mut emit = |c: Check, out: &mut Vec<Check>| {
        each(&c);
        out.push(c);
    };
    let api = GraphApi::new(&cfg.graph.base_url, Duration::from_secs(10));
    let app = cfg.app("default").or_else(|| cfg.apps.first());
    let app_id = app.and_then(|a| a.app_id.clone());
    let app_token = app.and_then(|a| {
        Some(Secret::new(format!(
            "{}|{}",
            a.app_id.as_ref()?,
            a.secrets.first()?.expose()
        )))
    });

    // What wagate learnt.
    let learnt: Vec<NumberState> = if opts.no_kafka {
        Vec::new()
    } else {
        match read_numbers(cfg).await {
            Ok(v) => {
                emit(
                    check(
                        Status::Ok,
                        "wa.numbers",
                        format!("{} numbers known", v.len()),
                        None,
                    ),
                    &mut out,
                );
                v
            }
            Err(e) => {
                emit(
                    check(
                        Status::Warn,
                        "wa.numbers",
                        format!("cannot read what wagate learnt: {e}"),
                        Some("check kafka.brokers, run `wagate topics create`".into()),
                    ),
                    &mut out,
                );
                Vec::new()
            }
        }
    };
    let mut numbers: BTreeSet<String> = cfg.egress.numbers.keys().cloned().collect();
    numbers.extend(learnt.iter().map(|s| s.phone_number_id.clone()));
    let mut wabas: BTreeSet<String> = cfg
        .egress
        .numbers
        .values()
        .filter_map(|n| n.waba_id.clone())
        .collect();
    wabas.extend(learnt.iter().filter_map(|s| s.waba_id.clone()));
    wabas.extend(opts.extra_wabas.iter().cloned());

    // The token(s).
    let mut tokens: Vec<(String, Secret)> = Vec::new();
    if let Some(t) = &cfg.graph.access_token {
        tokens.push(("graph.access_token".into(), t.clone()));
    }
    for (id, n) in &cfg.egress.numbers {
        if let Some(t) = &n.access_token {
            tokens.push((format!("egress.numbers.{id}.access_token"), t.clone()));
        }
    }
    if tokens.is_empty() {
        emit(
            check(
                Status::Fail,
                "token",
                "no Graph API access token is configured: every send is blocked",
                Some(
                    "set WAGATE_ACCESS_TOKEN (graph.access_token_env) to a System User token"
                        .into(),
                ),
            ),
            &mut out,
        );
    }
    let mut token_ok = true;
    for (key, t) in &tokens {
        let c = token_check(&api, key, t, app_token.as_ref()).await;
        token_ok &= c.status != Status::Fail;
        emit(c, &mut out);
    }
    let Some((_, token)) = tokens.first().cloned() else {
        return out;
    };

    // The app's own callback.
    let public = cfg.public_url.clone();
    match (&app_id, &app_token) {
        (Some(id), Some(at)) => {
            let c = match api.get(&format!("{id}/subscriptions"), &[], at.expose()).await {
                Ok(v) => {
                    let waba = v["data"]
                        .as_array()
                        .and_then(|d| d.iter().find(|s| s["object"] == "whatsapp_business_account"))
                        .cloned();
                    match waba {
                        None => check(
                            Status::Fail,
                            format!("app {id} callback"),
                            "the app has no whatsapp_business_account webhook subscription",
                            Some("App Dashboard > WhatsApp > Configuration: set the callback URL and subscribe the fields".into()),
                        ),
                        Some(s) => {
                            let url = s["callback_url"].as_str().unwrap_or("").to_string();
                            url_check(format!("app {id} callback"), "the app's callback URL", &url, public.as_deref(), "App Dashboard > WhatsApp > Configuration: set the callback URL")
                        }
                    }
                }
                Err(e) => graph_failed(format!("app {id} callback"), &e),
            };
            emit(c, &mut out);
        }
        _ => emit(
            check(
                Status::Skip,
                "app callback",
                "no apps.default.app_id: the app's callback URL and the token's permissions cannot be asked",
                Some("set apps.default.app_id (the App Dashboard's app id)".into()),
            ),
            &mut out,
        ),
    }

    // Each WABA: our app subscribed, overrides.
    if wabas.is_empty() {
        emit(
            check(
                Status::Warn,
                "wabas",
                "no WABA known: none configured and none learnt yet",
                Some("set egress.numbers.\"ID\".waba_id for each business number".into()),
            ),
            &mut out,
        );
    }
    for waba in &wabas {
        for c in waba_checks(
            &api,
            waba,
            token.expose(),
            app_id.as_deref(),
            public.as_deref(),
            opts.fix,
        )
        .await
        {
            emit(c, &mut out);
        }
    }

    // Each number.
    for id in &numbers {
        let t = crate::numbers::sync::token_for(cfg, id).unwrap_or_else(|| token.clone());
        for c in number_checks(&api, id, t.expose(), public.as_deref()).await {
            emit(c, &mut out);
        }
    }

    // Templates referenced by queued requests, against the registry.
    let c = if opts.no_kafka {
        check(Status::Skip, "templates", "no Kafka to look in", None)
    } else {
        template_check(cfg, &learnt).await
    };
    emit(c, &mut out);

    // End to end.
    let c = match &public {
        None => check(
            Status::Skip,
            "self-test",
            "no server.public_url: the end-to-end self-test needs the URL Meta calls",
            Some("set server.public_url (e.g. https://wa.example.com)".into()),
        ),
        Some(_) if opts.no_kafka => check(Status::Skip, "self-test", "no Kafka to look in", None),
        Some(url) => self_test(cfg, url, wabas.iter().next().map(String::as_str)).await,
    };
    emit(c, &mut out);
    let _ = token_ok;
    out
}

/// Whether `url` is ours: under the public URL.
fn url_check(name: String, what: &str, url: &str, public: Option<&str>, fix: &str) -> Check {
    match public {
        None => check(
            Status::Warn,
            name,
            format!("{what} is {url:?}; cannot compare without server.public_url"),
            Some("set server.public_url".into()),
        ),
        Some(p) if url == p || url.starts_with(&format!("{p}/")) => {
            check(Status::Ok, name, format!("{what} is {url}"), None)
        }
        Some(p) => check(
            Status::Fail,
            name,
            format!("{what} is {url:?}, not under {p}: Meta sends those webhooks elsewhere"),
            Some(fix.into()),
        ),
    }
}

fn graph_failed(name: String, e: &GraphFailure) -> Check {
    let fix = match e {
        GraphFailure::Meta { code: 190, .. } => {
            "the token is invalid or expired: issue a new System User token"
        }
        GraphFailure::Meta {
            code: 10 | 200..=299,
            ..
        } => "the token lacks a permission: grant whatsapp_business_management to the System User",
        GraphFailure::Meta { code: 100, .. } => "check the id (config or wa.numbers)",
        _ => "check graph.base_url and the network, then run again",
    };
    check(Status::Fail, name, e.to_string(), Some(fix.into()))
}

async fn token_check(
    api: &GraphApi,
    key: &str,
    token: &Secret,
    app_token: Option<&Secret>,
) -> Check {
    let name = format!("token {key}");
    let Some(at) = app_token else {
        // Without an app token: a cheap call proves the token works.
        return check(
            Status::Skip,
            name,
            "no apps.default.app_id: expiry and permissions (debug_token) not checked; the number checks below prove the token works",
            Some("set apps.default.app_id".into()),
        );
    };
    let v = match api
        .get(
            "debug_token",
            &[("input_token", token.expose())],
            at.expose(),
        )
        .await
    {
        Ok(v) => v,
        Err(e) => return graph_failed(name, &e),
    };
    let d = &v["data"];
    if d["is_valid"] != true {
        let why = d["error"]["message"]
            .as_str()
            .unwrap_or("Meta says it is not valid");
        return check(
            Status::Fail,
            name,
            format!("the token is not valid: {why}"),
            Some(
                "issue a new System User token (Business Settings > System users) and set it"
                    .into(),
            ),
        );
    }
    let scopes: Vec<&str> = d["scopes"]
        .as_array()
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    let missing: Vec<&str> = PERMISSIONS
        .iter()
        .copied()
        .filter(|p| !scopes.contains(p))
        .collect();
    if !missing.is_empty() {
        return check(
            Status::Fail,
            name,
            format!("the token lacks {}", missing.join(", ")),
            Some("grant the permissions to the System User and issue a new token".into()),
        );
    }
    let expires = d["expires_at"].as_u64().unwrap_or(0);
    let now = crate::clock::now_ms() / 1000;
    if expires != 0 && expires <= now {
        return check(
            Status::Fail,
            name,
            "the token has expired",
            Some("issue a new token".into()),
        );
    }
    if expires != 0 && expires - now < EXPIRY_WARNING_SECS {
        return check(
            Status::Warn,
            name,
            format!("valid, but expires in {} min", (expires - now) / 60),
            Some("use a System User token that never expires".into()),
        );
    }
    let when = if expires == 0 {
        "never expires".to_string()
    } else {
        format!("expires in {} days", (expires - now) / 86_400)
    };
    check(
        Status::Ok,
        name,
        format!("valid, {when}, has {}", PERMISSIONS.join(" + ")),
        None,
    )
}

async fn waba_checks(
    api: &GraphApi,
    waba: &str,
    token: &str,
    app_id: Option<&str>,
    public: Option<&str>,
    fix: bool,
) -> Vec<Check> {
    let name = format!("waba {waba} subscribed_apps");
    let path = format!("{waba}/subscribed_apps");
    let data = match api.get(&path, &[], token).await {
        Ok(v) => v["data"].as_array().cloned().unwrap_or_default(),
        Err(e) => return vec![graph_failed(name, &e)],
    };
    let ours = |d: &[Value]| -> Option<Value> {
        d.iter()
            .find(|e| match app_id {
                Some(id) => e["whatsapp_business_api_data"]["id"] == id,
                None => true,
            })
            .cloned()
    };
    let mut out = Vec::new();
    let entry = match ours(&data) {
        Some(e) => {
            out.push(check(
                Status::Ok,
                name,
                format!("app {} is subscribed", app_id.unwrap_or("(any)")),
                None,
            ));
            Some(e)
        }
        None if fix => match api.post(&path, None, token).await {
            Ok(_) => {
                let again = api
                    .get(&path, &[], token)
                    .await
                    .ok()
                    .and_then(|v| ours(v["data"].as_array().map(Vec::as_slice).unwrap_or(&[])));
                match again {
                    Some(e) => {
                        out.push(check(
                            Status::Ok,
                            name,
                            format!(
                                "fixed: subscribed app {} to WABA {waba} (POST /{path})",
                                app_id.unwrap_or("(the token's)")
                            ),
                            None,
                        ));
                        Some(e)
                    }
                    None => {
                        out.push(check(
                            Status::Fail,
                            name,
                            "POST subscribed_apps succeeded but the app is still not listed",
                            Some("subscribe it in WhatsApp Manager".into()),
                        ));
                        None
                    }
                }
            }
            Err(e) => {
                out.push(graph_failed(name, &e));
                None
            }
        },
        None => {
            out.push(check(
                Status::Fail,
                name,
                format!(
                    "app {} is not subscribed to WABA {waba}: webhooks of its numbers never arrive",
                    app_id.unwrap_or("(no app at all)")
                ),
                Some(format!("run `wagate doctor --fix` (POST /{path})")),
            ));
            None
        }
    };
    if let Some(e) = entry {
        let c = match e["override_callback_uri"].as_str() {
            None => check(Status::Ok, format!("waba {waba} override"), "no WABA-level callback override", None),
            Some(url) => url_check(
                format!("waba {waba} override"),
                "the WABA's callback override",
                url,
                public,
                &format!("POST /{path} with override_callback_uri set to your public URL, or remove the override"),
            ),
        };
        out.push(c);
    }
    out
}

async fn number_checks(api: &GraphApi, id: &str, token: &str, public: Option<&str>) -> Vec<Check> {
    let fields = format!("{GRAPH_FIELDS},webhook_configuration");
    let v = match api.get(id, &[("fields", &fields)], token).await {
        Ok(v) => v,
        Err(e) => return vec![graph_failed(format!("number {id}"), &e)],
    };
    let s = |k: &str| v[k].as_str().unwrap_or("").to_string();
    let mut out = Vec::new();
    let status = s("status");
    out.push(match status.as_str() {
        "CONNECTED" => check(Status::Ok, format!("number {id} registration"), "CONNECTED", None),
        "" => check(Status::Warn, format!("number {id} registration"), "the Graph API gave no status", None),
        other => check(
            Status::Fail,
            format!("number {id} registration"),
            format!("status {other}: the number cannot send"),
            Some(format!("register it (POST /{id}/register) or resolve the {other} state in WhatsApp Manager")),
        ),
    });
    let name_status = s("name_status");
    out.push(match name_status.as_str() {
        "APPROVED" | "AVAILABLE_WITHOUT_REVIEW" => {
            check(Status::Ok, format!("number {id} name"), name_status, None)
        }
        "" => check(
            Status::Warn,
            format!("number {id} name"),
            "no name_status",
            None,
        ),
        other => check(
            Status::Warn,
            format!("number {id} name"),
            format!("display name {other}"),
            Some("see the display name in WhatsApp Manager".into()),
        ),
    });
    let quality = s("quality_rating");
    let level = v["throughput"]["level"]
        .as_str()
        .unwrap_or("unknown")
        .to_string();
    let limit = v["whatsapp_business_manager_messaging_limit"]
        .as_str()
        .or(v["messaging_limit_tier"].as_str())
        .unwrap_or("unknown")
        .to_string();
    let msg = format!("quality {quality}, throughput {level}, messaging limit {limit}");
    out.push(match quality.as_str() {
        "GREEN" => check(Status::Ok, format!("number {id} quality"), msg, None),
        "RED" => check(
            Status::Warn,
            format!("number {id} quality"),
            msg,
            Some("quality is low: pause campaigns and review what users block or report".into()),
        ),
        _ => check(Status::Warn, format!("number {id} quality"), msg, None),
    });
    let wc = &v["webhook_configuration"];
    let c = match wc["phone_number"].as_str() {
        None => check(Status::Ok, format!("number {id} override"), "no number-level callback override", None),
        Some(url) => url_check(
            format!("number {id} override"),
            "the number's callback override",
            url,
            public,
            &format!("POST /{id} with webhook_configuration.override_callback_uri set to your public URL, or remove it"),
        ),
    };
    out.push(c);
    out
}

/// A template send still waiting for its result.
struct Queued {
    number: String,
    name: String,
    language: String,
}

/// Template sends on `wa.outbound.requests` within `egress.history_window`
/// that have no result on `wa.outbound.results` yet.
fn queued_templates(cfg: &Config) -> Result<Vec<Queued>, String> {
    let conn = &cfg.kafka.connection;
    let p = &cfg.kafka.topic_prefix;
    let since = crate::clock::now_ms().saturating_sub(cfg.egress.history_window.as_millis() as u64);
    let mut done = std::collections::HashSet::new();
    crate::kafka::read_since(conn, &format!("{p}outbound.results"), since, |_, v| {
        if let Ok(r) = serde_json::from_slice::<Value>(v) {
            if let Some(id) = r["request_id"].as_str() {
                done.insert(id.to_string());
            }
        }
    })
    .map_err(|e| e.to_string())?;
    let mut out = Vec::new();
    crate::kafka::read_since(conn, &format!("{p}outbound.requests"), since, |_, v| {
        let Ok(r) = serde_json::from_slice::<Value>(v) else {
            return;
        };
        let t = &r["message"]["template"];
        let (Some(id), Some(number), Some(name)) = (
            r["request_id"].as_str(),
            r["phone_number_id"].as_str(),
            t["name"].as_str(),
        ) else {
            return;
        };
        if r["message"]["type"] != "template" || done.contains(id) {
            return;
        }
        out.push(Queued {
            number: number.to_string(),
            name: name.to_string(),
            language: t["language"]["code"].as_str().unwrap_or("").to_string(),
        });
    })
    .map_err(|e| e.to_string())?;
    Ok(out)
}

/// Templates referenced by queued requests that the registry
/// (`wa.templates`, key `{waba_id}:{name}:{language}`, value Meta's
/// template object) does not know or that are not `APPROVED`.
async fn template_check(cfg: &Config, learnt: &[NumberState]) -> Check {
    let name = "templates";
    let registry = {
        let conn = cfg.kafka.connection.clone();
        let topic = format!("{}templates", cfg.kafka.topic_prefix);
        tokio::task::spawn_blocking(move || {
            let mut by: std::collections::HashMap<String, Value> = Default::default();
            let opts = crate::kafka::ReadOptions {
                from_beginning: true,
                max: Some(1_000_000),
                idle_timeout: Some(Duration::from_secs(2)),
            };
            crate::kafka::read_topic(&conn, &topic, &opts, |r| {
                let Some(k) = r.key.clone() else { return };
                match r.payload.as_deref().map(serde_json::from_slice::<Value>) {
                    Some(Ok(v)) => {
                        by.insert(k, v);
                    }
                    None => {
                        by.remove(&k);
                    }
                    Some(Err(_)) => {}
                }
            })
            .map(|_| by)
        })
        .await
    };
    let registry = match registry {
        Ok(Ok(r)) if !r.is_empty() => r,
        _ => {
            return check(
                Status::Skip,
                name,
                format!(
                    "no template registry to compare with ({}templates is missing or empty)",
                    cfg.kafka.topic_prefix
                ),
                None,
            )
        }
    };
    let c = cfg.clone();
    let queued = match tokio::task::spawn_blocking(move || queued_templates(&c)).await {
        Ok(Ok(q)) => q,
        Ok(Err(e)) => {
            return check(
                Status::Warn,
                name,
                format!("cannot read the queued requests: {e}"),
                None,
            )
        }
        Err(e) => return check(Status::Warn, name, e.to_string(), None),
    };
    let waba_of = |n: &str| {
        cfg.egress
            .numbers
            .get(n)
            .and_then(|c| c.waba_id.clone())
            .or_else(|| {
                learnt
                    .iter()
                    .find(|s| s.phone_number_id == n)?
                    .waba_id
                    .clone()
            })
    };
    let mut counts: std::collections::BTreeMap<(String, String, String), usize> =
        Default::default();
    let mut no_waba = 0;
    for q in &queued {
        match waba_of(&q.number) {
            Some(w) => {
                *counts
                    .entry((w, q.name.clone(), q.language.clone()))
                    .or_default() += 1
            }
            None => no_waba += 1,
        }
    }
    let mut bad = Vec::new();
    for ((waba, tname, lang), n) in &counts {
        match registry.get(&format!("{waba}:{tname}:{lang}")) {
            None => bad.push(format!(
                "{tname} ({lang}) of WABA {waba} is unknown ({n} queued)"
            )),
            Some(t) => {
                let status = t["status"].as_str().unwrap_or("");
                if status != "APPROVED" {
                    bad.push(format!(
                        "{tname} ({lang}) of WABA {waba} is {status} ({n} queued)"
                    ));
                }
            }
        }
    }
    if !bad.is_empty() {
        return check(
            Status::Fail,
            name,
            format!("queued requests use templates Meta will refuse: {}", bad.join("; ")),
            Some("fix or replace the templates in WhatsApp Manager, or expire the requests (expires_at_ms)".into()),
        );
    }
    let unknown = if no_waba > 0 {
        format!(", {no_waba} of numbers whose WABA is unknown (not checked)")
    } else {
        String::new()
    };
    check(
        if no_waba > 0 {
            Status::Warn
        } else {
            Status::Ok
        },
        name,
        format!(
            "{} queued template requests use {} templates, all APPROVED{unknown}",
            queued.len() - no_waba,
            counts.len()
        ),
        None,
    )
}

/// Reads `wa.numbers` (bounded).
async fn read_numbers(cfg: &Config) -> Result<Vec<NumberState>, String> {
    let conn = cfg.kafka.connection.clone();
    let topic = format!("{}numbers", cfg.kafka.topic_prefix);
    let read = tokio::task::spawn_blocking(move || {
        let mut by: std::collections::BTreeMap<String, NumberState> = Default::default();
        let opts = crate::kafka::ReadOptions {
            from_beginning: true,
            max: Some(1_000_000),
            idle_timeout: Some(Duration::from_secs(2)),
        };
        crate::kafka::read_topic(&conn, &topic, &opts, |r| {
            let Some(k) = r.key.clone() else { return };
            match r
                .payload
                .as_deref()
                .map(serde_json::from_slice::<NumberState>)
            {
                Some(Ok(s)) => {
                    by.insert(k, s);
                }
                None => {
                    by.remove(&k);
                }
                Some(Err(_)) => {}
            }
        })
        .map_err(|e| e.to_string())?;
        Ok::<_, String>(by.into_values().collect())
    });
    match tokio::time::timeout(Duration::from_secs(30), read).await {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("no answer from Kafka within 30 s".into()),
    }
}

/// Posts a signed synthetic webhook to the public URL and looks for it on
/// `wa.inbound.events`.
async fn self_test(cfg: &Config, public: &str, waba: Option<&str>) -> Check {
    let name = "self-test";
    let Some(app) = cfg.app("default") else {
        return check(Status::Skip, name, "no default app to sign with", None);
    };
    let nonce = format!("{:016x}", rand::random::<u64>());
    let since = crate::clock::now_ms().saturating_sub(1000);
    let body = json!({
        "object": "whatsapp_business_account",
        "entry": [{
            "id": waba.unwrap_or("0"),
            "time": since / 1000,
            "changes": [{"field": SELF_TEST_KIND, "value": {"nonce": nonce, "at_ms": since}}],
        }],
    })
    .to_string();
    let sig = crate::meta::signature::sign(app.secrets[0].expose().as_bytes(), body.as_bytes());
    let url = format!("{public}/webhook");
    let status =
        match post_signed(&url, &sig, body).await {
            Ok(s) => s,
            Err(e) => return check(
                Status::Fail,
                name,
                format!("POST {url} failed: {e}"),
                Some(
                    "check server.public_url, DNS, TLS and the load balancer in front of wagate"
                        .into(),
                ),
            ),
        };
    if status != 200 {
        return check(
            Status::Fail,
            name,
            format!("POST {url} answered {status}"),
            Some("401: the default app's secret differs from the one the gateway behind the URL uses; 404: the URL does not reach /webhook".into()),
        );
    }
    let conn = cfg.kafka.connection.clone();
    let topic = format!("{}inbound.events", cfg.kafka.topic_prefix);
    let want = nonce.clone();
    let found = tokio::task::spawn_blocking(move || {
        let end = std::time::Instant::now() + Duration::from_secs(15);
        while std::time::Instant::now() < end {
            let mut hit = false;
            let r = crate::kafka::read_since(&conn, &topic, since, |_, v| {
                if let Ok(rec) = serde_json::from_slice::<Value>(v) {
                    hit |= rec["kind"] == SELF_TEST_KIND && rec["value"]["nonce"] == want.as_str();
                }
            });
            if r.is_err() || hit {
                return r.map(|_| hit).map_err(|e| e.to_string());
            }
            std::thread::sleep(Duration::from_millis(300));
        }
        Ok(false)
    })
    .await
    .unwrap_or_else(|e| Err(e.to_string()));
    match found {
        Ok(true) => check(
            Status::Ok,
            name,
            format!("a signed webhook through {url} reached {}inbound.events (marked wagate-kind: {SELF_TEST_KIND})", cfg.kafka.topic_prefix),
            None,
        ),
        Ok(false) => check(
            Status::Fail,
            name,
            format!("{url} answered 200 but the event is not on {}inbound.events", cfg.kafka.topic_prefix),
            Some("the URL reaches a gateway with another kafka.brokers or topic prefix".into()),
        ),
        Err(e) => check(Status::Fail, name, format!("cannot read inbound.events: {e}"), Some("check kafka.brokers".into())),
    }
}

async fn post_signed(url: &str, sig: &str, body: String) -> Result<u16, String> {
    use http_body_util::{BodyExt, Full};
    let mut http = hyper_util::client::legacy::connect::HttpConnector::new();
    http.enforce_http(false);
    http.set_connect_timeout(Some(Duration::from_secs(5)));
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_webpki_roots()
        .https_or_http()
        .enable_http1()
        .wrap_connector(http);
    let client: hyper_util::client::legacy::Client<_, Full<bytes::Bytes>> =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .build(https);
    let req = hyper::Request::post(url)
        .header("content-type", "application/json")
        .header("x-hub-signature-256", sig)
        .header("user-agent", "wagate-doctor")
        .body(Full::new(bytes::Bytes::from(body)))
        .map_err(|e| e.to_string())?;
    let fut = async {
        let resp = client.request(req).await.map_err(|e| e.to_string())?;
        let status = resp.status().as_u16();
        let _ = http_body_util::Limited::new(resp.into_body(), 64 * 1024)
            .collect()
            .await;
        Ok::<_, String>(status)
    };
    tokio::time::timeout(Duration::from_secs(15), fut)
        .await
        .map_err(|_| "no answer within 15 s".to_string())?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_and_urls() {
        let c = check(
            Status::Fail,
            "waba 1 subscribed_apps",
            "not subscribed",
            Some("run --fix".into()),
        );
        assert_eq!(
            c.to_string(),
            "fail waba 1 subscribed_apps: not subscribed — fix: run --fix"
        );
        let ok = url_check(
            "x".into(),
            "the URL",
            "https://a.example/webhook",
            Some("https://a.example"),
            "f",
        );
        assert_eq!(ok.status, Status::Ok);
        let lookalike = url_check(
            "x".into(),
            "u",
            "https://a.example.evil/webhook",
            Some("https://a.example"),
            "f",
        );
        assert_eq!(lookalike.status, Status::Fail);
        let away = url_check(
            "x".into(),
            "the URL",
            "https://b.example/hook",
            Some("https://a.example"),
            "f",
        );
        assert_eq!(away.status, Status::Fail);
        assert_eq!(
            url_check("x".into(), "u", "h", None, "f").status,
            Status::Warn
        );
    }
}
