//! Status webhooks for accepted sends (CLOUD_API.md §4.3, §8.4): for each
//! send, after `delay`, one signed POST per configured status, in order,
//! shaped like `payloads/status_*.json` and, for the user ids, like
//! `payloads/identity_status_*.json` (IDENTITY.md §2): a status names the
//! user by `recipient_id` (phone) and `recipient_user_id` (BSUID), except
//! that a send by BSUID to a username user (or to a BSUID whose phone the
//! sandbox does not know) carries no `recipient_id`, and a `failed` status
//! of a send by phone no BSUID. Non-failed statuses carry a `contacts`
//! array beside `statuses`; `profile.username` only on delivered and read.
//! Also the body of an inbound text message, [`inbound_text_body`].
//!
//! Bounded everywhere: the queue from the send handler is bounded (a full
//! queue drops the webhooks and counts them, it never blocks a send
//! response), at most [`MAX_SENDS_IN_FLIGHT`] sends have webhooks in
//! progress, and each POST is tried at most [`MAX_ATTEMPTS`] times.

use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::header::{CONTENT_TYPE, USER_AGENT};
use hyper::{Request, StatusCode, Uri};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::{json, Value};
use tokio::sync::{mpsc, Semaphore};
use tokio::task::JoinSet;

use super::identity::{bsuid_of, profile_name, username_of};
use super::{unix_ms, RecordedSend, SandboxError, StatusWebhookConfig};
use crate::meta::signature;

/// Sends waiting for their webhooks; beyond this they are dropped.
pub const QUEUE: usize = 65_536;
/// Sends whose webhooks are being delivered at once.
pub const MAX_SENDS_IN_FLIGHT: usize = 1024;
/// Tries per webhook POST (the first one included).
pub const MAX_ATTEMPTS: u32 = 4;
const FIRST_BACKOFF: Duration = Duration::from_millis(100);
const POST_TIMEOUT: Duration = Duration::from_secs(5);
/// The WABA id in the envelope (as in the payload examples).
const WABA_ID: &str = "102345678901234";
/// Statuses the sandbox can report.
pub const STATUSES: &[&str] = &["sent", "delivered", "read"];

/// An accepted send waiting for its status webhooks.
#[derive(Debug, Clone)]
pub struct Queued {
    pub send: RecordedSend,
    /// The user is one of `username_users`.
    pub username_user: bool,
}

/// Counters of status webhook delivery.
#[derive(Debug, Default)]
pub struct Counters {
    pub delivered: AtomicU64,
    pub failed: AtomicU64,
    pub dropped: AtomicU64,
}

/// A snapshot of [`Counters`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WebhookStats {
    /// POSTs answered 200.
    pub delivered: u64,
    /// POSTs still not answered 200 after every attempt.
    pub failed: u64,
    /// Webhooks never attempted because the queue was full.
    pub dropped: u64,
}

impl Counters {
    pub fn snapshot(&self) -> WebhookStats {
        WebhookStats {
            delivered: self.delivered.load(Ordering::Relaxed),
            failed: self.failed.load(Ordering::Relaxed),
            dropped: self.dropped.load(Ordering::Relaxed),
        }
    }
}

/// Checks a webhook configuration: an `http://` URL to a loopback host,
/// and only known statuses.
pub fn check_config(cfg: &StatusWebhookConfig) -> Result<Uri, SandboxError> {
    let uri: Uri = cfg
        .url
        .parse()
        .map_err(|_| SandboxError::WebhookUrl(cfg.url.clone()))?;
    if uri.scheme_str() != Some("http") {
        return Err(SandboxError::WebhookUrl(cfg.url.clone()));
    }
    let host = uri.host().unwrap_or("");
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    let loopback = bare == "localhost" || bare.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback());
    if !loopback {
        return Err(SandboxError::NotLoopback(cfg.url.clone()));
    }
    if let Some(s) = cfg
        .statuses
        .iter()
        .find(|s| !STATUSES.contains(&s.as_str()))
    {
        return Err(SandboxError::UnknownStatus(s.clone()));
    }
    Ok(uri)
}

/// Delivers status webhooks for the sends arriving on `rx` until `stop`
/// turns true; webhooks still pending then are abandoned.
pub async fn run(
    cfg: StatusWebhookConfig,
    uri: Uri,
    mut rx: mpsc::Receiver<Queued>,
    counters: Arc<Counters>,
    stop: tokio_util::sync::CancellationToken,
) {
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    connector.set_connect_timeout(Some(Duration::from_secs(2)));
    let client: Client<HttpConnector, Full<Bytes>> = Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(30))
        .pool_max_idle_per_host(64)
        .build(connector);
    let cfg = Arc::new(cfg);
    let slots = Arc::new(Semaphore::new(MAX_SENDS_IN_FLIGHT));
    let mut tasks = JoinSet::new();
    loop {
        // Reap finished tasks so the set stays small.
        while tasks.try_join_next().is_some() {}
        let permit = tokio::select! {
            biased;
            _ = stop.cancelled() => break,
            p = slots.clone().acquire_owned() => p,
        };
        let Ok(permit) = permit else { break };
        let send = tokio::select! {
            biased;
            _ = stop.cancelled() => break,
            s = rx.recv() => s,
        };
        let Some(Queued {
            send,
            username_user,
        }) = send
        else {
            break;
        };
        let (client, cfg, uri, counters) =
            (client.clone(), cfg.clone(), uri.clone(), counters.clone());
        tasks.spawn(async move {
            for status in &cfg.statuses {
                tokio::time::sleep(cfg.delay).await;
                let body = status_body(&send, status, username_user);
                let ok = post(&client, &uri, &cfg.app_secret, body).await;
                let c = if ok {
                    &counters.delivered
                } else {
                    &counters.failed
                };
                c.fetch_add(1, Ordering::Relaxed);
            }
            drop(permit);
        });
    }
    tasks.shutdown().await;
}

/// POSTs one signed body on a client of its own (the template webhooks of
/// the sandbox's controls), retrying like [`post`].
pub(crate) async fn post_once(uri: &Uri, secret: &str, body: Vec<u8>) -> bool {
    let mut connector = HttpConnector::new();
    connector.set_connect_timeout(Some(Duration::from_secs(2)));
    let client: Client<HttpConnector, Full<Bytes>> =
        Client::builder(TokioExecutor::new()).build(connector);
    post(&client, uri, secret, body).await
}

/// POSTs one signed body, retrying anything but a 200 with backoff.
pub(super) async fn post(
    client: &Client<HttpConnector, Full<Bytes>>,
    uri: &Uri,
    secret: &str,
    body: Vec<u8>,
) -> bool {
    let body = Bytes::from(body);
    let sig = signature::sign(secret.as_bytes(), &body);
    let mut backoff = FIRST_BACKOFF;
    for attempt in 1..=MAX_ATTEMPTS {
        let req = Request::post(uri.clone())
            .header(CONTENT_TYPE, "application/json")
            .header(USER_AGENT, "facebookexternalua")
            .header("x-hub-signature-256", &sig)
            .body(Full::new(body.clone()));
        let Ok(req) = req else { return false };
        let answer = tokio::time::timeout(POST_TIMEOUT, async {
            let resp = client.request(req).await?;
            let status = resp.status();
            // Read (a bounded amount of) the body so the connection is reused.
            let _ = Limited::new(resp.into_body(), 64 * 1024).collect().await;
            Ok::<_, hyper_util::client::legacy::Error>(status)
        })
        .await;
        match answer {
            Ok(Ok(StatusCode::OK)) => return true,
            Ok(Ok(status)) => {
                tracing::debug!(%uri, %status, attempt, "status webhook not accepted")
            }
            Ok(Err(e)) => tracing::debug!(%uri, error = %e, attempt, "status webhook failed"),
            Err(_) => tracing::debug!(%uri, attempt, "status webhook timed out"),
        }
        if attempt < MAX_ATTEMPTS {
            tokio::time::sleep(backoff).await;
            backoff *= 2;
        }
    }
    tracing::warn!(%uri, "status webhook not delivered after {MAX_ATTEMPTS} attempts");
    false
}

/// A plausible display number for a phone number id (the sandbox has no
/// directory): `1555` and the id's last seven digits.
pub fn display_phone_number(phone_number_id: &str) -> String {
    let d = super::validate::digits(phone_number_id);
    let tail = &d[d.len().saturating_sub(7)..];
    format!("1555{tail:0>7}")
}

/// The webhook body for one status (`sent`, `delivered`, `read` or
/// `failed`) of `send`, compact JSON; `username_user`: the user hides their
/// phone behind a username.
pub fn status_body(send: &RecordedSend, status: &str, username_user: bool) -> Vec<u8> {
    let now_s = unix_ms() / 1000;
    let template = send.type_ == "template";
    let failed = status == "failed";
    let phone = (!send.wa_id.is_empty()).then_some(send.wa_id.as_str());
    // The phone is withheld from a send by BSUID to a username user, and
    // unknown for a BSUID the sandbox cannot resolve.
    let shown_phone = match &send.recipient {
        Some(_) if username_user => None,
        _ => phone,
    };
    // A failed status of a send by phone carries no BSUID.
    let user_id = match (&send.recipient, phone) {
        (Some(r), _) => Some(r.clone()),
        (None, Some(p)) if !failed => Some(bsuid_of(p)),
        (None, _) => None,
    };
    let mut st = json!({
        "id": send.wamid,
        "status": status,
        "timestamp": now_s.to_string(),
    });
    if let Some(p) = shown_phone {
        st["recipient_id"] = p.into();
    }
    if let Some(u) = &user_id {
        st["recipient_user_id"] = u.as_str().into();
    }
    if let Some(b) = &send.biz_opaque_callback_data {
        st["biz_opaque_callback_data"] = Value::String(b.clone());
    }
    // Conversation: on `sent` only, and gone from v24.0 (§4.3).
    if status == "sent" && major_version(&send.api_version).is_some_and(|v| v < 24) {
        st["conversation"] = json!({
            "id": hex::encode(rand::random::<[u8; 16]>()),
            "expiration_timestamp": (now_s + 24 * 3600).to_string(),
            "origin": {"type": if template { "utility" } else { "service" }},
        });
    }
    // Pricing: on `sent` and on `delivered`.
    if status == "sent" || status == "delivered" {
        st["pricing"] = if template {
            json!({"billable": true, "pricing_model": "PMP", "type": "regular", "category": "utility"})
        } else {
            json!({"billable": false, "pricing_model": "PMP", "type": "free_customer_service", "category": "service"})
        };
    }
    let mut value = json!({
        "messaging_product": "whatsapp",
        "metadata": {
            "display_phone_number": display_phone_number(&send.phone_number_id),
            "phone_number_id": send.phone_number_id,
        },
        "statuses": [st],
    });
    if !failed {
        let name_of = phone.or(user_id.as_deref()).unwrap_or("");
        let mut profile = json!({ "name": profile_name(name_of) });
        if username_user && matches!(status, "delivered" | "read") {
            if let Some(p) = phone {
                profile["username"] = username_of(p).into();
            }
        }
        let mut contact = json!({ "profile": profile });
        if let Some(p) = shown_phone {
            contact["wa_id"] = p.into();
        }
        if let Some(u) = user_id {
            contact["user_id"] = u.into();
        }
        value["contacts"] = json!([contact]);
    }
    envelope(value)
}

/// One inbound text message from the user with phone `wa_id` (digits) to
/// `phone_number_id`, received at `at_unix_ms`, compact JSON: a username
/// user by BSUID only (`from_user_id`, `contacts[].user_id`,
/// `profile.username`), any other user by phone and BSUID.
pub fn inbound_text_body(
    phone_number_id: &str,
    wa_id: &str,
    username_user: bool,
    wamid: &str,
    text: &str,
    at_unix_ms: u64,
) -> Vec<u8> {
    let user_id = bsuid_of(wa_id);
    let mut profile = json!({ "name": profile_name(wa_id) });
    let mut contact = json!({});
    let mut message = json!({});
    if username_user {
        profile["username"] = username_of(wa_id).into();
    } else {
        contact["wa_id"] = wa_id.into();
        message["from"] = wa_id.into();
    }
    contact["profile"] = profile;
    contact["user_id"] = user_id.as_str().into();
    message["from_user_id"] = user_id.into();
    message["id"] = wamid.into();
    message["timestamp"] = (at_unix_ms / 1000).to_string().into();
    message["type"] = "text".into();
    message["text"] = json!({ "body": text });
    envelope(json!({
        "messaging_product": "whatsapp",
        "metadata": {
            "display_phone_number": display_phone_number(phone_number_id),
            "phone_number_id": phone_number_id,
        },
        "contacts": [contact],
        "messages": [message],
    }))
}

/// `{"object":"whatsapp_business_account","entry":[{"id":…,"changes":[{"value":…,"field":"messages"}]}]}`.
fn envelope(value: Value) -> Vec<u8> {
    let body = json!({
        "object": "whatsapp_business_account",
        "entry": [{
            "id": WABA_ID,
            "changes": [{
                "value": value,
                "field": "messages",
            }],
        }],
    });
    serde_json::to_vec(&body).unwrap_or_default()
}

/// `v23.0` → 23.
fn major_version(v: &str) -> Option<u32> {
    v.strip_prefix('v')?.split('.').next()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(url: &str) -> StatusWebhookConfig {
        StatusWebhookConfig {
            url: url.into(),
            app_secret: "s".into(),
            statuses: vec!["sent".into()],
            delay: Duration::ZERO,
        }
    }

    #[test]
    fn only_loopback_http_targets() {
        for ok in [
            "http://127.0.0.1:8080/webhook",
            "http://localhost:1/webhook",
            "http://[::1]:9/x",
            "http://127.0.0.2/",
        ] {
            assert!(check_config(&cfg(ok)).is_ok(), "{ok}");
        }
        for bad in [
            "https://127.0.0.1/webhook",
            "http://10.0.0.1/webhook",
            "http://example.com/webhook",
            "http://127.0.0.1.example.com/webhook",
            "not a url",
        ] {
            assert!(check_config(&cfg(bad)).is_err(), "{bad}");
        }
        let mut c = cfg("http://127.0.0.1/");
        c.statuses = vec!["failed".into()];
        assert!(matches!(
            check_config(&c),
            Err(SandboxError::UnknownStatus(_))
        ));
    }

    fn send(to: &str, wa_id: &str, recipient: Option<&str>) -> RecordedSend {
        RecordedSend {
            phone_number_id: "109876543210987".into(),
            to: to.into(),
            wa_id: wa_id.into(),
            recipient: recipient.map(str::to_string),
            wamid: "wamid.X".into(),
            type_: "template".into(),
            biz_opaque_callback_data: Some("req-7".into()),
            arrived_at: std::time::Instant::now(),
            arrived_unix_ms: 0,
            api_version: "v24.0".into(),
            body: Value::Null,
        }
    }

    /// (the status, the contacts array or Null).
    fn parts(body: &[u8]) -> (Value, Value) {
        let v: Value = serde_json::from_slice(body).expect("json");
        assert_eq!(v["object"], "whatsapp_business_account");
        let value = &v["entry"][0]["changes"][0]["value"];
        assert_eq!(value["statuses"].as_array().map(Vec::len), Some(1));
        (value["statuses"][0].clone(), value["contacts"].clone())
    }

    #[test]
    fn a_send_by_phone_names_phone_and_bsuid() {
        let b = bsuid_of("14155550123");
        let s = send("+14155550123", "14155550123", None);
        for status in ["sent", "delivered", "read"] {
            let (st, contacts) = parts(&status_body(&s, status, false));
            assert_eq!(st["recipient_id"], "14155550123");
            assert_eq!(st["recipient_user_id"], b.as_str());
            assert_eq!(
                contacts,
                json!([{"profile": {"name": "Sandbox User 0123"}, "wa_id": "14155550123", "user_id": b}])
            );
        }
        // payloads/identity_status_failed_to_phone.json: no BSUID, no contacts.
        let (st, contacts) = parts(&status_body(&s, "failed", false));
        assert_eq!(st["recipient_id"], "14155550123");
        assert!(st.get("recipient_user_id").is_none(), "{st}");
        assert!(contacts.is_null());
    }

    #[test]
    fn a_send_by_bsuid_to_a_username_user_hides_the_phone() {
        let b = bsuid_of("5511987650001");
        let s = send("", "5511987650001", Some(&b));
        for status in ["sent", "delivered", "read", "failed"] {
            let (st, contacts) = parts(&status_body(&s, status, true));
            assert!(st.get("recipient_id").is_none(), "{st}");
            assert_eq!(st["recipient_user_id"], b.as_str());
            assert_eq!(st["biz_opaque_callback_data"], "req-7");
            match status {
                "failed" => assert!(contacts.is_null()),
                "sent" => assert_eq!(
                    contacts,
                    json!([{"profile": {"name": "Sandbox User 0001"}, "user_id": b}])
                ),
                _ => assert_eq!(
                    contacts,
                    json!([{"profile": {"name": "Sandbox User 0001", "username": "@user0001"}, "user_id": b}])
                ),
            }
        }
        assert!(!String::from_utf8_lossy(&status_body(&s, "read", true)).contains("5511987650001"));
    }

    #[test]
    fn a_send_by_bsuid_to_other_users() {
        // Phone known: both ids.
        let b = bsuid_of("14155550123");
        let s = send("", "14155550123", Some(&b));
        let (st, contacts) = parts(&status_body(&s, "delivered", false));
        assert_eq!(st["recipient_id"], "14155550123");
        assert_eq!(st["recipient_user_id"], b.as_str());
        assert_eq!(contacts[0]["wa_id"], "14155550123");
        assert_eq!(contacts[0]["user_id"], b.as_str());
        assert!(contacts[0]["profile"].get("username").is_none());
        // Phone unknown: the BSUID only.
        let s = send("", "", Some("BR.8821736450019923"));
        let (st, contacts) = parts(&status_body(&s, "delivered", false));
        assert!(st.get("recipient_id").is_none(), "{st}");
        assert_eq!(st["recipient_user_id"], "BR.8821736450019923");
        assert_eq!(
            contacts,
            json!([{"profile": {"name": "Sandbox User 9923"}, "user_id": "BR.8821736450019923"}])
        );
    }

    #[test]
    fn inbound_bodies_have_metas_shapes() {
        let b = bsuid_of("5511987650001");
        let v: Value = serde_json::from_slice(&inbound_text_body(
            "118877665544332",
            "5511987650001",
            true,
            "wamid.I1",
            "PARAR",
            1_782_000_000_123,
        ))
        .expect("json");
        let value = &v["entry"][0]["changes"][0]["value"];
        assert_eq!(v["entry"][0]["changes"][0]["field"], "messages");
        assert_eq!(value["metadata"]["phone_number_id"], "118877665544332");
        assert_eq!(
            value["contacts"],
            json!([{"profile": {"name": "Sandbox User 0001", "username": "@user0001"}, "user_id": b}])
        );
        assert_eq!(
            value["messages"],
            json!([{"from_user_id": b, "id": "wamid.I1", "timestamp": "1782000000", "type": "text", "text": {"body": "PARAR"}}])
        );

        let v: Value = serde_json::from_slice(&inbound_text_body(
            "118877665544332",
            "5511987650001",
            false,
            "wamid.I2",
            "oi",
            1_782_000_100_000,
        ))
        .expect("json");
        let value = &v["entry"][0]["changes"][0]["value"];
        assert_eq!(
            value["contacts"],
            json!([{"profile": {"name": "Sandbox User 0001"}, "wa_id": "5511987650001", "user_id": b}])
        );
        assert_eq!(
            value["messages"],
            json!([{"from": "5511987650001", "from_user_id": b, "id": "wamid.I2", "timestamp": "1782000100", "type": "text", "text": {"body": "oi"}}])
        );
    }

    #[test]
    fn display_numbers_and_versions() {
        assert_eq!(display_phone_number("109876543210987"), "15553210987");
        assert_eq!(display_phone_number("12"), "15550000012");
        assert_eq!(major_version("v23.0"), Some(23));
        assert_eq!(major_version("v24.1"), Some(24));
        assert_eq!(major_version("x"), None);
    }
}
