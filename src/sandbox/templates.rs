//! The sandbox's templates (DESIGN §14): one template library served under
//! every WABA id, `GET /{version}/{waba_id}/message_templates` paged like
//! Meta (`limit`, `after` cursors, `paging.next`, `fields`), template sends
//! refused like Meta when the template is missing (#132001), paused
//! (#132015), disabled (#132016) or otherwise not approved (#132001), or
//! given another number of body parameters than its placeholders (#132000), and
//! controls for tests: change a template's status or category (the sandbox
//! then posts the signed `message_template_status_update` /
//! `template_category_update` webhook to the gateway, as it posts status
//! webhooks), and make the listing fail (HTTP 500, Graph #2).
//!
//! Without `SandboxConfig::templates` (None, the default) the sandbox knows
//! no templates: the listing answers #100 (unsupported) and template sends
//! are not checked, as before.

use std::sync::atomic::Ordering;

use hyper::StatusCode;
use serde_json::{json, Map, Value};

use super::error::GraphError;
use super::{lock, status, Sandbox, State};
use crate::http::{self, Body};

/// One template of the sandbox's library.
#[derive(Debug, Clone, PartialEq)]
pub struct SandboxTemplate {
    pub id: String,
    pub name: String,
    pub language: String,
    /// `APPROVED`, `PAUSED`, `DISABLED`, `REJECTED`, `PENDING`, …
    pub status: String,
    /// `MARKETING`, `UTILITY`, `AUTHENTICATION`.
    pub category: String,
    /// Meta's `components` (`[{"type":"BODY","text":"Hi {{1}}"}]`).
    pub components: Value,
}

impl SandboxTemplate {
    /// An approved template with a body of `text`.
    pub fn approved(name: &str, language: &str, category: &str, body: &str) -> SandboxTemplate {
        SandboxTemplate {
            id: format!(
                "{}",
                1_000_000_000_000u64 + fnv(name, language) % 1_000_000_000_000
            ),
            name: name.into(),
            language: language.into(),
            status: "APPROVED".into(),
            category: category.to_ascii_uppercase(),
            components: json!([{ "type": "BODY", "text": body }]),
        }
    }

    fn object(&self) -> Map<String, Value> {
        let mut o = Map::new();
        o.insert("id".into(), self.id.clone().into());
        o.insert("name".into(), self.name.clone().into());
        o.insert("language".into(), self.language.clone().into());
        o.insert("status".into(), self.status.clone().into());
        o.insert("category".into(), self.category.clone().into());
        o.insert("components".into(), self.components.clone());
        o.insert("quality_score".into(), json!({ "score": "GREEN" }));
        o
    }
}

fn fnv(a: &str, b: &str) -> u64 {
    let mut h: u64 = 0xcbf29ce484222325;
    for byte in a.bytes().chain([0]).chain(b.bytes()) {
        h ^= byte as u64;
        h = h.wrapping_mul(0x100000001b3);
    }
    h
}

/// The templates `wagate serve --dev` serves: the README's quick start
/// sends `order_shipped` in `en_US` and `pt_BR`.
pub fn dev_templates() -> Vec<SandboxTemplate> {
    let mut auth = SandboxTemplate::approved(
        "auth_code",
        "en_US",
        "AUTHENTICATION",
        "{{1}} is your verification code.",
    );
    auth.components = json!([
        {"type": "BODY", "text": "{{1}} is your verification code."},
        {"type": "BUTTONS", "buttons": [{"type": "OTP", "otp_type": "COPY_CODE", "text": "Copy code"}]}
    ]);
    let mut paused = SandboxTemplate::approved(
        "spring_sale_2026",
        "en_US",
        "MARKETING",
        "Spring sale: {{1}} off until {{2}}.",
    );
    paused.status = "PAUSED".into();
    vec![
        SandboxTemplate::approved(
            "order_shipped",
            "en_US",
            "UTILITY",
            "Your order has shipped.",
        ),
        SandboxTemplate::approved(
            "order_shipped",
            "pt_BR",
            "UTILITY",
            "Seu pedido foi enviado.",
        ),
        SandboxTemplate::approved(
            "appointment_reminder",
            "en_US",
            "UTILITY",
            "Hi {{first_name}}, see you on {{slot}}.",
        ),
        auth,
        paused,
    ]
}

/// The library and its switches.
#[derive(Debug, Default)]
pub(super) struct Store {
    pub list: Option<Vec<SandboxTemplate>>,
    /// The listing answers HTTP 500 (#2) while set.
    pub failing: bool,
    pub listings: usize,
}

/// `/{version}/{waba_id}/message_templates` → (version, waba_id).
pub(super) fn route(path: &str) -> Option<(&str, &str)> {
    let mut parts = path.strip_prefix('/')?.split('/');
    let (version, waba, leaf) = (parts.next()?, parts.next()?, parts.next()?);
    (parts.next().is_none()
        && leaf == "message_templates"
        && super::is_version(version)
        && !waba.is_empty()
        && waba.len() <= 32
        && waba.bytes().all(|b| b.is_ascii_digit()))
    .then_some((version, waba))
}

/// An opaque-looking cursor for position `i`.
fn cursor(i: usize) -> String {
    format!("QVFIUtpl{i:x}")
}

fn from_cursor(c: &str) -> Option<usize> {
    usize::from_str_radix(c.strip_prefix("QVFIUtpl")?, 16).ok()
}

/// Answers a listing.
pub(super) fn serve(
    st: &State,
    version: &str,
    waba: &str,
    query: Option<&str>,
    host: &str,
) -> hyper::Response<Body> {
    let params: Vec<(String, String)> = form_urlencoded::parse(query.unwrap_or("").as_bytes())
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect();
    let param = |k: &str| params.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
    let mut store = lock(&st.templates);
    store.listings += 1;
    if store.failing {
        return GraphError::new(2, "Service temporarily unavailable")
            .with_status(StatusCode::INTERNAL_SERVER_ERROR)
            .response();
    }
    let Some(list) = &store.list else {
        return GraphError::new(
            100,
            "The sandbox serves no templates (SandboxConfig::templates is None).",
        )
        .with_status(StatusCode::BAD_REQUEST)
        .response();
    };
    let max = st.cfg.templates_page_max.max(1);
    let limit = match param("limit") {
        None => 25.min(max),
        Some(l) => match l.parse::<usize>() {
            Ok(n) if n > 0 => n.min(max),
            _ => return GraphError::new(100, "Param limit must be a positive integer").response(),
        },
    };
    let start = match param("after") {
        None => 0,
        Some(c) => match from_cursor(c) {
            Some(i) => i,
            None => return GraphError::new(100, "Invalid cursor for after").response(),
        },
    };
    let fields: Option<Vec<&str>> = param("fields").map(|f| f.split(',').map(str::trim).collect());
    let end = (start + limit).min(list.len());
    let data: Vec<Value> = list[start.min(end)..end]
        .iter()
        .map(|t| {
            let mut o = t.object();
            if let Some(f) = &fields {
                o.retain(|k, _| k == "id" || f.contains(&k.as_str()));
            }
            Value::Object(o)
        })
        .collect();
    let mut paging = json!({ "cursors": { "before": cursor(start), "after": cursor(end) } });
    if end < list.len() {
        let mut next = format!(
            "http://{host}/{version}/{waba}/message_templates?limit={limit}&after={}",
            cursor(end)
        );
        if let Some(f) = param("fields") {
            next.push_str("&fields=");
            next.extend(form_urlencoded::byte_serialize(f.as_bytes()));
        }
        paging["next"] = next.into();
    }
    let body = json!({ "data": data, "paging": paging });
    http::json(
        StatusCode::OK,
        serde_json::to_vec(&body).unwrap_or_default(),
    )
}

/// Meta's error for a template send the library refuses (None: the send
/// goes on; also when the sandbox has no library).
pub(super) fn send_error(st: &State, body: &Value) -> Option<i64> {
    let t = body.get("template")?;
    let name = t.get("name")?.as_str()?;
    let lang = t.get("language")?.get("code")?.as_str()?;
    let store = lock(&st.templates);
    let list = store.list.as_ref()?;
    let Some(found) = list.iter().find(|x| x.name == name && x.language == lang) else {
        return Some(132001);
    };
    match found.status.as_str() {
        "APPROVED" => (body_params(t) != body_placeholders(&found.components)).then_some(132000),
        "PAUSED" => Some(132015),
        "DISABLED" => Some(132016),
        _ => Some(132001),
    }
}

/// The body parameters a send gives (`components[type=body].parameters`).
fn body_params(template: &Value) -> usize {
    template
        .get("components")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter(|c| {
            c.get("type")
                .and_then(Value::as_str)
                .is_some_and(|t| t.eq_ignore_ascii_case("body"))
        })
        .filter_map(|c| c.get("parameters").and_then(Value::as_array))
        .map(Vec::len)
        .sum()
}

/// The distinct `{{…}}` placeholders of a template's BODY text: Meta
/// answers #132000 when a send gives another number of body parameters
/// (the sandbox checks the body only).
fn body_placeholders(components: &Value) -> usize {
    let text = components
        .as_array()
        .into_iter()
        .flatten()
        .find(|c| c.get("type").and_then(Value::as_str) == Some("BODY"))
        .and_then(|c| c.get("text").and_then(Value::as_str))
        .unwrap_or("");
    let mut names: Vec<&str> = text
        .split("{{")
        .skip(1)
        .filter_map(|part| part.split_once("}}").map(|(name, _)| name.trim()))
        .filter(|name| !name.is_empty())
        .collect();
    names.sort_unstable();
    names.dedup();
    names.len()
}

impl Sandbox {
    /// Replaces the library (None: no templates, nothing checked).
    pub fn set_templates(&self, list: Option<Vec<SandboxTemplate>>) {
        lock(&self.state.templates).list = list;
    }

    /// The library now.
    pub fn templates(&self) -> Vec<SandboxTemplate> {
        lock(&self.state.templates).list.clone().unwrap_or_default()
    }

    /// Makes the listing answer HTTP 500 (#2) while `on`.
    pub fn set_templates_failing(&self, on: bool) {
        lock(&self.state.templates).failing = on;
    }

    /// Listings served (or refused) so far.
    pub fn template_listings(&self) -> usize {
        lock(&self.state.templates).listings
    }

    /// Sets a template's status, then posts the signed
    /// `message_template_status_update` (event = `status`) for `waba` to the
    /// status webhook URL. True once the gateway answered 200; false when
    /// the template is not in the library, no webhook URL is configured,
    /// or the webhook was not accepted.
    pub async fn set_template_status(
        &self,
        waba: &str,
        name: &str,
        language: &str,
        status: &str,
    ) -> bool {
        self.state
            .set_template_status(waba, name, language, status)
            .await
    }

    /// Sets a template's category, then posts `template_category_update`.
    pub async fn set_template_category(
        &self,
        waba: &str,
        name: &str,
        language: &str,
        category: &str,
    ) -> bool {
        self.state
            .set_template_category(waba, name, language, category)
            .await
    }
}

/// `POST /_sandbox/wabas/{waba_id}/templates/{name}/{language}` with
/// `{"status":"APPROVED"}` and/or `{"category":"MARKETING"}`: the control
/// `--dev` users and scripts drive over HTTP (the tests call the methods).
/// Each change is made, then its webhook posted (status first). Answers
/// `{"success":true,"webhook_delivered":…}`; an unknown template is #100
/// (404), a body without either field #100 (400). `Err` gives the request
/// back when the path is not this control's.
pub(super) async fn control(
    st: &State,
    req: http::Req,
) -> Result<hyper::Response<Body>, http::Req> {
    let path = req.uri().path().to_string();
    let parts: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let (waba, name, language) = match parts.as_slice() {
        ["_sandbox", "wabas", waba, "templates", name, language]
            if req.method() == hyper::Method::POST
                && !waba.is_empty()
                && waba.bytes().all(|b| b.is_ascii_digit()) =>
        {
            (waba.to_string(), name.to_string(), language.to_string())
        }
        _ => return Err(req),
    };
    if let Err(e) = st.authorize(req.headers(), req.uri().query()) {
        return Ok(e.response());
    }
    let body: Value = match super::read_body(req).await {
        Ok(b) => serde_json::from_slice(&b).unwrap_or(Value::Null),
        Err(e) => return Ok(e.response()),
    };
    let field = |k: &str| body.get(k).and_then(Value::as_str).map(str::to_string);
    let (status, category) = (field("status"), field("category"));
    if status.is_none() && category.is_none() {
        return Ok(GraphError::new(
            100,
            "The body must be a JSON object with \"status\" and/or \"category\" strings.",
        )
        .response());
    }
    if st.change_template(&name, &language, |_| {}).is_none() {
        return Ok(GraphError::new(
            100,
            format!("No template {name} ({language}) in the sandbox's library."),
        )
        .with_status(StatusCode::NOT_FOUND)
        .response());
    }
    let mut delivered = true;
    if let Some(s) = status {
        delivered &= st
            .set_template_status(&waba, &name, &language, &s.to_ascii_uppercase())
            .await;
    }
    if let Some(c) = category {
        delivered &= st.set_template_category(&waba, &name, &language, &c).await;
    }
    Ok(http::json(
        StatusCode::OK,
        serde_json::to_vec(&json!({"success": true, "webhook_delivered": delivered}))
            .unwrap_or_default(),
    ))
}

impl State {
    /// Sets a template's status, then posts the signed
    /// `message_template_status_update` (event = `status`) for `waba` to the
    /// status webhook URL. True once the gateway answered 200; false when
    /// the template is not in the library, no webhook URL is configured,
    /// or the webhook was not accepted.
    pub(super) async fn set_template_status(
        &self,
        waba: &str,
        name: &str,
        language: &str,
        status: &str,
    ) -> bool {
        let Some(t) = self.change_template(name, language, |t| t.status = status.to_string())
        else {
            return false;
        };
        let value = json!({
            "event": status,
            "message_template_id": t.id.parse::<u64>().map(Value::from).unwrap_or_else(|_| t.id.clone().into()),
            "message_template_name": t.name,
            "message_template_language": t.language,
            "reason": "NONE",
            "message_template_category": t.category,
        });
        self.post_template_webhook(waba, "message_template_status_update", value)
            .await
    }

    /// Sets a template's category, then posts `template_category_update`.
    pub(super) async fn set_template_category(
        &self,
        waba: &str,
        name: &str,
        language: &str,
        category: &str,
    ) -> bool {
        let mut previous = String::new();
        let Some(t) = self.change_template(name, language, |t| {
            previous = std::mem::replace(&mut t.category, category.to_ascii_uppercase())
        }) else {
            return false;
        };
        let value = json!({
            "message_template_id": t.id.parse::<u64>().map(Value::from).unwrap_or_else(|_| t.id.clone().into()),
            "message_template_name": t.name,
            "message_template_language": t.language,
            "previous_category": previous,
            "new_category": t.category,
        });
        self.post_template_webhook(waba, "template_category_update", value)
            .await
    }

    pub(super) fn change_template(
        &self,
        name: &str,
        language: &str,
        f: impl FnOnce(&mut SandboxTemplate),
    ) -> Option<SandboxTemplate> {
        let mut store = lock(&self.templates);
        let t = store
            .list
            .as_mut()?
            .iter_mut()
            .find(|t| t.name == name && t.language == language)?;
        f(t);
        Some(t.clone())
    }

    async fn post_template_webhook(&self, waba: &str, field: &str, value: Value) -> bool {
        let Some(cfg) = &self.cfg.status_webhook else {
            return false;
        };
        let Ok(uri) = status::check_config(cfg) else {
            return false;
        };
        let body = json!({
            "object": "whatsapp_business_account",
            "entry": [{
                "id": waba,
                "time": super::unix_ms() / 1000,
                "changes": [{ "field": field, "value": value }],
            }],
        });
        let ok = status::post_once(
            &uri,
            &cfg.app_secret,
            serde_json::to_vec(&body).unwrap_or_default(),
        )
        .await;
        let c = &self.webhook_counters;
        if ok {
            c.delivered.fetch_add(1, Ordering::Relaxed);
        } else {
            c.failed.fetch_add(1, Ordering::Relaxed);
        }
        ok
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_and_cursors() {
        assert_eq!(
            route("/v23.0/102345678901234/message_templates"),
            Some(("v23.0", "102345678901234"))
        );
        assert_eq!(route("/v23.0/abc/message_templates"), None);
        assert_eq!(route("/v23.0/1/messages"), None);
        assert_eq!(from_cursor(&cursor(7)), Some(7));
        assert_eq!(from_cursor("nope"), None);
        let dev = dev_templates();
        assert!(dev
            .iter()
            .any(|t| t.name == "order_shipped" && t.language == "pt_BR"));
        assert_ne!(dev[0].id, dev[1].id);
    }
}
