//! The account side of the sandbox: what the number sync and `wagate
//! doctor` read and change (CLOUD_API §6.1, §6.3, §1; DESIGN §14).
//!
//! - `GET /{version}/{phone_number_id}?fields=…`: `display_phone_number`,
//!   `verified_name`, `throughput{level}`, `quality_rating`,
//!   `whatsapp_business_manager_messaging_limit` (and the deprecated
//!   `messaging_limit_tier`), `name_status`, `status`,
//!   `code_verification_status`, `webhook_configuration` (the callback
//!   URLs in force for the number: `application`, and the WABA's and the
//!   number's overrides when set);
//! - `GET /{version}/{waba_id}/subscribed_apps` (`data[]` of
//!   `{whatsapp_business_api_data{id,name}, override_callback_uri?}`) and
//!   `POST` (subscribes the token's app: the sandbox's `app_id`);
//! - `GET /{version}/{app_id}/subscriptions`: the app's callback config;
//! - `GET /{version}/debug_token?input_token=…`: `data{app_id, is_valid,
//!   expires_at, scopes, …}` of a token the sandbox accepts (`is_valid:
//!   false` for any other);
//! - controls for tests ([`Sandbox::upgrade_throughput`],
//!   [`Sandbox::set_waba_restricted`], …), also over HTTP (with a token the
//!   sandbox accepts): `POST /_sandbox/numbers/{id}/throughput_upgrade`,
//!   `POST /_sandbox/wabas/{waba_id}/restriction` (`{"restricted":true,
//!   "for_secs":…}`), `POST /_sandbox/numbers/{id}` (`{"quality_rating":…,
//!   "throughput_level":…, "messaging_limit":…, "name_status":…, "status":…,
//!   "waba_id":…}`, no webhook); the first two change a number or WABA and
//!   post the matching webhook (`phone_number_quality_update` with
//!   `THROUGHPUT_UPGRADE`, `account_update`) to the status webhook URL,
//!   signed like the status webhooks;
//! - error injection: [`Sandbox::fail_account_requests`] answers every
//!   account request with a bare 5xx; a bad token gets #190 as for sends.
//!
//! A number the sandbox has not seen starts `STANDARD`, `GREEN`,
//! `TIER_2K`, name `APPROVED`, `CONNECTED`, in WABA [`WABA_ID`]; a WABA
//! starts with the sandbox's app subscribed. Sends of a number whose WABA
//! is restricted are answered #131031; a number at `HIGH` accepts
//! `high_throughput` sends per second instead of `default_throughput`.

use std::collections::HashMap;
use std::time::Duration;

use hyper::{Method, Response, StatusCode};
use serde_json::{json, Value};

use super::error::GraphError;
use super::{lock, unix_ms, Sandbox, State};
use crate::http::{self, Body};

/// The WABA of every number the sandbox has not been told otherwise (the
/// one of the payload examples and the status webhooks).
pub const WABA_ID: &str = "102345678901234";
/// The sandbox's app id (`SandboxConfig::app_id` by default).
pub const APP_ID: &str = "100000000000001";

/// One number as the sandbox's Graph API reports it.
#[derive(Debug, Clone, PartialEq)]
pub struct NumberInfo {
    pub waba_id: String,
    pub throughput_level: String,
    pub quality_rating: String,
    pub messaging_limit: String,
    pub name_status: String,
    pub status: String,
    /// The number's own callback override (`webhook_configuration`).
    pub override_callback_uri: Option<String>,
}

impl Default for NumberInfo {
    fn default() -> Self {
        NumberInfo {
            waba_id: WABA_ID.into(),
            throughput_level: "STANDARD".into(),
            quality_rating: "GREEN".into(),
            messaging_limit: "TIER_2K".into(),
            name_status: "APPROVED".into(),
            status: "CONNECTED".into(),
            override_callback_uri: None,
        }
    }
}

/// One WABA.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct WabaInfo {
    /// App ids subscribed to its webhooks.
    pub subscribed: Vec<String>,
    /// The WABA-level callback override.
    pub override_callback_uri: Option<String>,
    /// An `account_update` restriction is in force.
    pub restricted: bool,
}

/// The token `debug_token` describes.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenInfo {
    /// Unix seconds; 0 = never expires.
    pub expires_at: u64,
    pub scopes: Vec<String>,
}

impl Default for TokenInfo {
    fn default() -> Self {
        TokenInfo {
            expires_at: 0,
            scopes: vec![
                "whatsapp_business_messaging".into(),
                "whatsapp_business_management".into(),
            ],
        }
    }
}

/// The account state of one sandbox.
#[derive(Debug, Default)]
pub struct Accounts {
    numbers: HashMap<String, NumberInfo>,
    wabas: HashMap<String, WabaInfo>,
    /// The app's callback URL (`/{app_id}/subscriptions`); None: the
    /// status webhook URL.
    app_callback: Option<String>,
    token: TokenInfo,
    /// Answer every account request with this bare HTTP status.
    fail_with: Option<u16>,
}

impl Accounts {
    fn number(&mut self, id: &str) -> &mut NumberInfo {
        self.numbers.entry(id.to_string()).or_default()
    }

    fn waba(&mut self, id: &str, app_id: &str) -> &mut WabaInfo {
        self.wabas
            .entry(id.to_string())
            .or_insert_with(|| WabaInfo {
                subscribed: vec![app_id.to_string()],
                ..WabaInfo::default()
            })
    }
}

fn is_id(s: &str) -> bool {
    !s.is_empty() && s.len() <= 32 && s.bytes().all(|b| b.is_ascii_digit())
}

impl State {
    /// The callback URL of the app: the configured one, else the status
    /// webhook URL (where the sandbox posts).
    fn app_callback(&self, acc: &Accounts) -> Option<String> {
        acc.app_callback
            .clone()
            .or_else(|| self.cfg.status_webhook.as_ref().map(|w| w.url.clone()))
    }

    /// The rate of a number at its level (its override first).
    pub(super) fn quota_of(&self, number: &str) -> u32 {
        if let Some(q) = self.cfg.throughput_overrides.get(number) {
            return *q;
        }
        let high = lock(&self.accounts)
            .numbers
            .get(number)
            .is_some_and(|n| n.throughput_level == "HIGH");
        if high {
            self.cfg.high_throughput
        } else {
            self.cfg.default_throughput
        }
    }

    /// A send of a number whose WABA is restricted: #131031.
    pub(super) fn restricted(&self, number: &str) -> bool {
        let acc = lock(&self.accounts);
        let waba = acc
            .numbers
            .get(number)
            .map_or(WABA_ID, |n| n.waba_id.as_str());
        acc.wabas.get(waba).is_some_and(|w| w.restricted)
    }
}

/// Answers the account routes; any other request is handed back.
pub(super) async fn handle(st: &State, req: http::Req) -> Result<Response<Body>, http::Req> {
    let path = req.uri().path().to_string();
    let parts: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let method = req.method().clone();
    let versioned = parts.first().is_some_and(|v| super::is_version(v));
    let rest: Vec<&str> = if versioned {
        parts[1..].to_vec()
    } else {
        parts.clone()
    };
    let query: HashMap<String, String> =
        form_urlencoded::parse(req.uri().query().unwrap_or("").as_bytes())
            .into_owned()
            .collect();
    let route = match (method.clone(), rest.as_slice()) {
        (Method::GET, ["debug_token"]) => Route::DebugToken,
        (Method::GET, [id]) if versioned && is_id(id) => Route::Number(id.to_string()),
        (Method::GET, [id, "subscribed_apps"]) if versioned && is_id(id) => {
            Route::SubscribedApps(id.to_string())
        }
        (Method::POST, [id, "subscribed_apps"]) if versioned && is_id(id) => {
            Route::Subscribe(id.to_string())
        }
        (Method::DELETE, [id, "subscribed_apps"]) if versioned && is_id(id) => {
            Route::Unsubscribe(id.to_string())
        }
        (Method::GET, [id, "subscriptions"]) if versioned && is_id(id) => {
            Route::AppSubscriptions(id.to_string())
        }
        (Method::POST, ["_sandbox", "numbers", id, "throughput_upgrade"]) if is_id(id) => {
            Route::ControlUpgrade(id.to_string())
        }
        (Method::POST, ["_sandbox", "numbers", id]) if is_id(id) => {
            Route::ControlNumber(id.to_string())
        }
        (Method::POST, ["_sandbox", "wabas", id, "restriction"]) if is_id(id) => {
            Route::ControlRestriction(id.to_string())
        }
        _ => return Err(req),
    };
    if let Some(code) = lock(&st.accounts).fail_with {
        let status = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        return Ok(http::text(status, "Internal Server Error"));
    }
    let app_call = matches!(route, Route::DebugToken | Route::AppSubscriptions(_));
    if app_call && is_app_token(st, req.headers()) {
        // An app token (`{app_id}|{app_secret}`) authorises app calls.
    } else if let Err(e) = st.authorize(req.headers(), req.uri().query()) {
        return Ok(e.response());
    }
    match &route {
        Route::ControlUpgrade(id) => {
            let delivered = st.upgrade_throughput(id).await;
            return Ok(control_answer(delivered));
        }
        Route::ControlNumber(_) | Route::ControlRestriction(_) => {
            let body: Value = match super::read_body(req).await {
                Ok(b) => serde_json::from_slice(&b).unwrap_or(Value::Null),
                Err(e) => return Ok(e.response()),
            };
            if !body.is_object() {
                return Ok(GraphError::new(100, "The body must be a JSON object.").response());
            }
            if let Route::ControlRestriction(waba) = &route {
                let restricted = body["restricted"].as_bool().unwrap_or(true);
                let for_secs = body["for_secs"].as_u64().unwrap_or(3 * 86_400);
                let delivered = st.set_waba_restricted(waba, restricted, for_secs).await;
                return Ok(control_answer(delivered));
            }
            if let Route::ControlNumber(id) = &route {
                let mut acc = lock(&st.accounts);
                let n = acc.number(id);
                let s = |k: &str| body[k].as_str().map(str::to_string);
                for (k, slot) in [
                    ("throughput_level", &mut n.throughput_level),
                    ("quality_rating", &mut n.quality_rating),
                    ("messaging_limit", &mut n.messaging_limit),
                    ("name_status", &mut n.name_status),
                    ("status", &mut n.status),
                    ("waba_id", &mut n.waba_id),
                ] {
                    if let Some(v) = s(k) {
                        *slot = v;
                    }
                }
            }
            return Ok(control_answer(true));
        }
        _ => {}
    }
    if let Route::DebugToken = route {
        // `input_token` is the token described.
        let input = query.get("input_token").cloned().unwrap_or_default();
        return Ok(debug_token(st, &input));
    }
    let app_id = st.cfg.app_id.clone();
    let mut acc = lock(&st.accounts);
    let answer = match route {
        Route::DebugToken
        | Route::ControlUpgrade(_)
        | Route::ControlNumber(_)
        | Route::ControlRestriction(_) => unreachable!("answered above"),
        Route::Number(id) => {
            let callback = st.app_callback(&acc);
            let n = acc.number(&id).clone();
            let waba_override = acc
                .wabas
                .get(&n.waba_id)
                .and_then(|w| w.override_callback_uri.clone());
            let mut webhook = json!({});
            if let Some(c) = callback {
                webhook["application"] = c.into();
            }
            if let Some(w) = waba_override {
                webhook["whatsapp_business_account"] = w.into();
            }
            if let Some(p) = &n.override_callback_uri {
                webhook["phone_number"] = p.clone().into();
            }
            let all = json!({
                "id": id,
                "display_phone_number": super::status::display_phone_number(&id),
                "verified_name": "wagate sandbox",
                "throughput": {"level": n.throughput_level},
                "quality_rating": n.quality_rating,
                "whatsapp_business_manager_messaging_limit": n.messaging_limit,
                "messaging_limit_tier": n.messaging_limit,
                "name_status": n.name_status,
                "status": n.status,
                "code_verification_status": "VERIFIED",
                "webhook_configuration": webhook,
            });
            match query.get("fields") {
                None => {
                    json!({"id": id, "display_phone_number": all["display_phone_number"], "verified_name": all["verified_name"]})
                }
                Some(f) => {
                    let mut out = json!({"id": id});
                    for field in f.split(',').map(str::trim).filter(|f| !f.is_empty()) {
                        if let Some(v) = all.get(field) {
                            out[field] = v.clone();
                        }
                    }
                    out
                }
            }
        }
        Route::SubscribedApps(waba) => {
            let w = acc.waba(&waba, &app_id).clone();
            let data: Vec<Value> = w
                .subscribed
                .iter()
                .map(|a| {
                    let mut e = json!({"whatsapp_business_api_data": {"id": a, "name": "wagate sandbox app", "link": ""}});
                    if let Some(o) = &w.override_callback_uri {
                        e["override_callback_uri"] = o.clone().into();
                    }
                    e
                })
                .collect();
            json!({ "data": data })
        }
        Route::Subscribe(waba) => {
            let w = acc.waba(&waba, &app_id);
            if !w.subscribed.contains(&app_id) {
                w.subscribed.push(app_id.clone());
            }
            json!({"success": true})
        }
        Route::Unsubscribe(waba) => {
            acc.waba(&waba, &app_id).subscribed.retain(|a| *a != app_id);
            json!({"success": true})
        }
        Route::AppSubscriptions(app) => {
            if app != app_id {
                return Ok(GraphError::new(
                    100,
                    format!("Unsupported get request. Object with ID '{app}' does not exist"),
                )
                .with_subcode(Some(33))
                .response());
            }
            let callback = st.app_callback(&acc).unwrap_or_default();
            json!({"data": [{
                "object": "whatsapp_business_account",
                "callback_url": callback,
                "active": true,
                "fields": [
                    {"name": "messages", "version": "v23.0"},
                    {"name": "account_update", "version": "v23.0"},
                    {"name": "phone_number_quality_update", "version": "v23.0"},
                    {"name": "message_template_status_update", "version": "v23.0"},
                ],
            }]})
        }
    };
    Ok(http::json(
        StatusCode::OK,
        serde_json::to_vec(&answer).unwrap_or_default(),
    ))
}

/// `Authorization: Bearer {app_id}|…`: an app access token of the sandbox's app.
fn is_app_token(st: &State, headers: &hyper::HeaderMap) -> bool {
    headers
        .get(hyper::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().strip_prefix("Bearer "))
        .and_then(|t| t.split_once('|'))
        .is_some_and(|(app, secret)| app == st.cfg.app_id && !secret.is_empty())
}

enum Route {
    DebugToken,
    Number(String),
    SubscribedApps(String),
    Subscribe(String),
    Unsubscribe(String),
    AppSubscriptions(String),
    ControlUpgrade(String),
    ControlNumber(String),
    ControlRestriction(String),
}

/// A control's answer: whether the webhook it posted was answered 200.
fn control_answer(delivered: bool) -> Response<Body> {
    http::json(
        StatusCode::OK,
        serde_json::to_vec(&json!({"success": true, "webhook_delivered": delivered}))
            .unwrap_or_default(),
    )
}

fn debug_token(st: &State, input: &str) -> Response<Body> {
    let valid = !input.is_empty() && st.token_known(input);
    let acc = lock(&st.accounts);
    let data = if valid {
        json!({
            "app_id": st.cfg.app_id,
            "type": "SYSTEM_USER",
            "application": "wagate sandbox app",
            "is_valid": true,
            "expires_at": acc.token.expires_at,
            "data_access_expires_at": 0,
            "scopes": acc.token.scopes,
        })
    } else {
        json!({
            "is_valid": false,
            "error": {"code": 190, "message": "Invalid OAuth access token."},
            "scopes": [],
        })
    };
    http::json(
        StatusCode::OK,
        serde_json::to_vec(&json!({ "data": data })).unwrap_or_default(),
    )
}

/// `{"object":"whatsapp_business_account","entry":[{"id":waba,"time":…,"changes":[{"value":…,"field":…}]}]}`.
fn management_body(waba: &str, field: &str, value: Value) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "object": "whatsapp_business_account",
        "entry": [{
            "id": waba,
            "time": unix_ms() / 1000,
            "changes": [{"value": value, "field": field}],
        }],
    }))
    .unwrap_or_default()
}

impl State {
    /// Meta's throughput upgrade: the number goes `HIGH` (the sandbox takes
    /// `high_throughput` sends per second from it at once) and a
    /// `phone_number_quality_update` with `THROUGHPUT_UPGRADE` is posted.
    /// Returns whether the webhook was answered 200.
    pub async fn upgrade_throughput(&self, id: &str) -> bool {
        let (waba, limit) = {
            let mut acc = lock(&self.accounts);
            let n = acc.number(id);
            n.throughput_level = "HIGH".into();
            n.messaging_limit = "TIER_UNLIMITED".into();
            (n.waba_id.clone(), n.messaging_limit.clone())
        };
        let value = json!({
            "display_phone_number": super::status::display_phone_number(id),
            "event": "THROUGHPUT_UPGRADE",
            "max_daily_conversations_per_business": limit,
        });
        self.post_webhook(management_body(&waba, "phone_number_quality_update", value))
            .await
    }

    /// Restricts a WABA (`account_update` `ACCOUNT_RESTRICTION` with a
    /// `restriction_info` expiring in `for_secs`) or lifts it (the same
    /// event with an empty `restriction_info`); its numbers' sends are
    /// answered #131031 meanwhile. Returns whether the webhook was answered 200.
    pub async fn set_waba_restricted(&self, waba: &str, restricted: bool, for_secs: u64) -> bool {
        let app_id = self.cfg.app_id.clone();
        lock(&self.accounts).waba(waba, &app_id).restricted = restricted;
        let info = if restricted {
            json!([{
                "restriction_type": "RESTRICTED_BIZ_INITIATED_MESSAGING",
                "expiration": unix_ms() / 1000 + for_secs,
                "remediation": "Review your messaging practices and ensure compliance with WhatsApp policies.",
            }])
        } else {
            json!([])
        };
        let value = json!({"event": "ACCOUNT_RESTRICTION", "restriction_info": info});
        self.post_webhook(management_body(waba, "account_update", value))
            .await
    }

    /// Posts one signed management webhook to the status webhook URL.
    async fn post_webhook(&self, body: Vec<u8>) -> bool {
        let Some(w) = self.cfg.status_webhook.clone() else {
            tracing::warn!("sandbox: no webhook URL configured; account webhook not sent");
            return false;
        };
        let Ok(uri) = super::status::check_config(&w) else {
            return false;
        };
        let mut connector = hyper_util::client::legacy::connect::HttpConnector::new();
        connector.set_connect_timeout(Some(Duration::from_secs(2)));
        let client =
            hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                .build(connector);
        super::status::post(&client, &uri, &w.app_secret, body).await
    }
}

impl Sandbox {
    fn accounts(&self) -> std::sync::MutexGuard<'_, Accounts> {
        lock(&self.state.accounts)
    }

    /// A number as the sandbox reports it now.
    pub fn number_info(&self, id: &str) -> NumberInfo {
        self.accounts().number(id).clone()
    }

    /// Changes a number (level, quality, …) without a webhook.
    pub fn update_number(&self, id: &str, f: impl FnOnce(&mut NumberInfo)) {
        f(self.accounts().number(id));
    }

    /// Meta's throughput upgrade: the number goes `HIGH` (the sandbox takes
    /// `high_throughput` sends per second from it at once) and a
    /// `phone_number_quality_update` with `THROUGHPUT_UPGRADE` is posted.
    /// Returns whether the webhook was answered 200.
    pub async fn upgrade_throughput(&self, id: &str) -> bool {
        self.state.upgrade_throughput(id).await
    }

    /// Restricts a WABA (`account_update` `ACCOUNT_RESTRICTION` with a
    /// `restriction_info` expiring in `for_secs`) or lifts it (the same
    /// event with an empty `restriction_info`); its numbers' sends are
    /// answered #131031 meanwhile. Returns whether the webhook was answered 200.
    pub async fn set_waba_restricted(&self, waba: &str, restricted: bool, for_secs: u64) -> bool {
        self.state
            .set_waba_restricted(waba, restricted, for_secs)
            .await
    }

    /// Subscribes or unsubscribes the sandbox's app to a WABA's webhooks.
    pub fn set_subscribed(&self, waba: &str, subscribed: bool) {
        let app_id = self.state.cfg.app_id.clone();
        let mut acc = self.accounts();
        let w = acc.waba(waba, &app_id);
        w.subscribed.retain(|a| *a != app_id);
        if subscribed {
            w.subscribed.push(app_id);
        }
    }

    /// Whether the sandbox's app is subscribed to `waba`.
    pub fn is_subscribed(&self, waba: &str) -> bool {
        let app_id = self.state.cfg.app_id.clone();
        self.accounts()
            .waba(waba, &app_id)
            .subscribed
            .contains(&app_id)
    }

    /// Sets the callback overrides: the app's callback URL, a WABA's and a
    /// number's (`None` clears).
    pub fn set_app_callback(&self, url: Option<&str>) {
        self.accounts().app_callback = url.map(str::to_string);
    }

    pub fn set_waba_override(&self, waba: &str, url: Option<&str>) {
        let app_id = self.state.cfg.app_id.clone();
        self.accounts().waba(waba, &app_id).override_callback_uri = url.map(str::to_string);
    }

    pub fn set_number_override(&self, id: &str, url: Option<&str>) {
        self.accounts().number(id).override_callback_uri = url.map(str::to_string);
    }

    /// What `debug_token` says of a valid token.
    pub fn set_token_info(&self, info: TokenInfo) {
        self.accounts().token = info;
    }

    /// Error injection: every account request answered with this bare
    /// HTTP status (`None`: normal answers).
    pub fn fail_account_requests(&self, status: Option<u16>) {
        self.accounts().fail_with = status;
    }
}
