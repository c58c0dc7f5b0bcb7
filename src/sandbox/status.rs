//! Status webhooks for accepted sends (CLOUD_API.md §4.3, §8.4): for each
//! send, after `delay`, one signed POST per configured status, in order,
//! shaped like `payloads/status_*.json`.
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
use tokio::sync::{mpsc, watch, Semaphore};
use tokio::task::JoinSet;

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
    mut rx: mpsc::Receiver<RecordedSend>,
    counters: Arc<Counters>,
    mut stop: watch::Receiver<bool>,
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
            _ = stop.wait_for(|s| *s) => break,
            p = slots.clone().acquire_owned() => p,
        };
        let Ok(permit) = permit else { break };
        let send = tokio::select! {
            biased;
            _ = stop.wait_for(|s| *s) => break,
            s = rx.recv() => s,
        };
        let Some(send) = send else { break };
        let (client, cfg, uri, counters) =
            (client.clone(), cfg.clone(), uri.clone(), counters.clone());
        tasks.spawn(async move {
            for status in &cfg.statuses {
                tokio::time::sleep(cfg.delay).await;
                let body = status_body(&send, status);
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

/// POSTs one signed body, retrying anything but a 200 with backoff.
async fn post(
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

/// The webhook body for one status of `send`, compact JSON.
pub fn status_body(send: &RecordedSend, status: &str) -> Vec<u8> {
    let now_s = unix_ms() / 1000;
    let template = send.type_ == "template";
    let mut st = json!({
        "id": send.wamid,
        "status": status,
        "timestamp": now_s.to_string(),
        "recipient_id": send.wa_id,
    });
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
    let body = json!({
        "object": "whatsapp_business_account",
        "entry": [{
            "id": WABA_ID,
            "changes": [{
                "value": {
                    "messaging_product": "whatsapp",
                    "metadata": {
                        "display_phone_number": display_phone_number(&send.phone_number_id),
                        "phone_number_id": send.phone_number_id,
                    },
                    "statuses": [st],
                },
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

    #[test]
    fn display_numbers_and_versions() {
        assert_eq!(display_phone_number("109876543210987"), "15553210987");
        assert_eq!(display_phone_number("12"), "15550000012");
        assert_eq!(major_version("v23.0"), Some(23));
        assert_eq!(major_version("v24.1"), Some(24));
        assert_eq!(major_version("x"), None);
    }
}
