//! The Graph API client: `POST {base}/{phone_number_id}/messages` over a
//! pooled hyper-util client (rustls; HTTP/2 when the server offers it), with
//! a deadline, classifying the answer.
//!
//! A timeout or a lost connection after the request may have been written is
//! *ambiguous*: Meta may have accepted it. Such a send is never blindly
//! re-sent (DESIGN §6). Known not to have been sent, and so retried: a
//! connect failure, a request hyper canceled before writing it (its pooled
//! connection was found closed), and an HTTP/2 stream the server refused
//! (REFUSED_STREAM: RFC 9113 §8.7, not processed).
//!
//! Idle pooled connections are dropped after [`POOL_IDLE`], below the
//! keep-alive of the servers in front of the API (and of the sandbox, 10 s),
//! so a send rarely goes out on a connection the server is closing — the race
//! that would turn a send that never left into an `unknown` result.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::header::{AUTHORIZATION, CONTENT_TYPE};
use hyper::Request;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::Value;

/// What the Graph API said.
#[derive(Debug, Clone, PartialEq)]
pub enum GraphOutcome {
    /// 200 with a wamid.
    Accepted {
        wamid: String,
        message_status: Option<String>,
        /// `contacts[0].wa_id` / `contacts[0].user_id` of Meta's answer.
        wa_id: Option<String>,
        user_id: Option<String>,
    },
    /// Meta rejected the request with an error code.
    MetaError {
        http_status: u16,
        code: i64,
        title: String,
        details: Option<String>,
    },
    /// Not sent at all (connect failed): safe to retry.
    NotSent { reason: String },
    /// May or may not have reached Meta: never re-send blindly.
    Ambiguous { reason: String },
}

type Https = hyper_rustls::HttpsConnector<HttpConnector>;

/// How long an idle pooled connection is kept: shorter than any server's
/// keep-alive we expect (the sandbox closes idle connections after 10 s,
/// common proxies after 15–75 s).
pub const POOL_IDLE: Duration = Duration::from_secs(5);

/// Whether a failed exchange certainly never reached the server's
/// application.
fn never_sent(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur = Some(e);
    while let Some(err) = cur {
        if err
            .downcast_ref::<hyper::Error>()
            .is_some_and(|h| h.is_canceled())
        {
            return true;
        }
        if err
            .downcast_ref::<h2::Error>()
            .is_some_and(|h| h.reason() == Some(h2::Reason::REFUSED_STREAM))
        {
            return true;
        }
        cur = err.source();
    }
    false
}

/// A pooled Graph API client.
#[derive(Clone)]
pub struct GraphClient {
    client: Client<Https, Full<Bytes>>,
    base_url: String,
    timeout: Duration,
}

impl GraphClient {
    pub fn new(base_url: &str, timeout: Duration) -> GraphClient {
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_nodelay(true);
        http.set_connect_timeout(Some(Duration::from_secs(5)));
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_webpki_roots()
            .https_or_http()
            .enable_http1()
            .enable_http2()
            .wrap_connector(http);
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(POOL_IDLE)
            .pool_max_idle_per_host(256)
            .build(https);
        GraphClient {
            client,
            base_url: base_url.trim_end_matches('/').to_string(),
            timeout,
        }
    }

    /// Sends one message body (already complete: messaging_product, to, …).
    pub async fn send(&self, phone_number_id: &str, token: &str, body: Vec<u8>) -> GraphOutcome {
        let url = format!("{}/{}/messages", self.base_url, phone_number_id);
        let req = match Request::post(&url)
            .header(AUTHORIZATION, format!("Bearer {token}"))
            .header(CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(body)))
        {
            Ok(r) => r,
            Err(e) => {
                return GraphOutcome::NotSent {
                    reason: format!("bad request URL: {e}"),
                }
            }
        };
        let fut = async {
            let resp = self.client.request(req).await?;
            let status = resp.status().as_u16();
            let body = Limited::new(resp.into_body(), 1 << 20)
                .collect()
                .await
                .map(|c| c.to_bytes())
                .ok();
            Ok::<_, hyper_util::client::legacy::Error>((status, body))
        };
        match tokio::time::timeout(self.timeout, fut).await {
            Err(_) => GraphOutcome::Ambiguous {
                reason: format!("no answer within {} ms", self.timeout.as_millis()),
            },
            Ok(Err(e)) if e.is_connect() => GraphOutcome::NotSent {
                reason: format!("connect failed: {e}"),
            },
            Ok(Err(e)) if never_sent(&e) => GraphOutcome::NotSent {
                reason: format!("not sent: {e}"),
            },
            Ok(Err(e)) => GraphOutcome::Ambiguous {
                reason: format!("connection lost: {e}"),
            },
            Ok(Ok((status, None))) => GraphOutcome::Ambiguous {
                reason: format!("HTTP {status} with an unreadable body"),
            },
            Ok(Ok((status, Some(body)))) => classify_response(status, &body),
        }
    }
}

/// Classifies an answer on `error.code`, never on the HTTP status alone.
pub fn classify_response(status: u16, body: &[u8]) -> GraphOutcome {
    let v: Option<Value> = serde_json::from_slice(body).ok();
    if let Some(err) = v.as_ref().and_then(|v| v.get("error")) {
        if let Some(code) = err.get("code").and_then(Value::as_i64) {
            let title = err
                .get("error_user_title")
                .or_else(|| err.get("message"))
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_string();
            let details = err
                .get("error_data")
                .and_then(|d| d.get("details"))
                .and_then(Value::as_str)
                .map(str::to_string);
            return GraphOutcome::MetaError {
                http_status: status,
                code,
                title,
                details,
            };
        }
    }
    if status == 200 {
        if let Some(m) = v
            .as_ref()
            .and_then(|v| v.get("messages"))
            .and_then(|m| m.get(0))
        {
            if let Some(id) = m.get("id").and_then(Value::as_str) {
                let contact = v
                    .as_ref()
                    .and_then(|v| v.get("contacts"))
                    .and_then(|c| c.get(0));
                let field = |k: &str| {
                    contact
                        .and_then(|c| c.get(k))
                        .and_then(Value::as_str)
                        .map(str::to_string)
                };
                return GraphOutcome::Accepted {
                    wamid: id.to_string(),
                    message_status: m
                        .get("message_status")
                        .and_then(Value::as_str)
                        .map(str::to_string),
                    wa_id: field("wa_id"),
                    user_id: field("user_id"),
                };
            }
        }
    }
    // A bare 5xx (or a 200 without a wamid): Meta may have taken it.
    GraphOutcome::Ambiguous {
        reason: format!("HTTP {status} without a Graph API answer"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_meta_shapes() {
        let ok = br#"{"messaging_product":"whatsapp","contacts":[{"input":"+1","wa_id":"1"}],"messages":[{"id":"wamid.X","message_status":"accepted"}]}"#;
        assert_eq!(
            classify_response(200, ok),
            GraphOutcome::Accepted {
                wamid: "wamid.X".into(),
                message_status: Some("accepted".into()),
                wa_id: Some("1".into()),
                user_id: None,
            }
        );
        let by_bsuid = br#"{"messaging_product":"whatsapp","contacts":[{"input":"BR.1","user_id":"BR.1"}],"messages":[{"id":"wamid.Y"}]}"#;
        assert_eq!(
            classify_response(200, by_bsuid),
            GraphOutcome::Accepted {
                wamid: "wamid.Y".into(),
                message_status: None,
                wa_id: None,
                user_id: Some("BR.1".into()),
            }
        );
        let e = br#"{"error":{"message":"(#130429) Rate limit hit","type":"OAuthException","code":130429,"error_data":{"messaging_product":"whatsapp","details":"Cloud API message throughput has been reached."},"fbtrace_id":"A"}}"#;
        match classify_response(400, e) {
            GraphOutcome::MetaError { code, details, .. } => {
                assert_eq!(code, 130429);
                assert_eq!(
                    details.as_deref(),
                    Some("Cloud API message throughput has been reached.")
                );
            }
            other => panic!("{other:?}"),
        }
        // Classified on the code even under a 5xx.
        let e = br#"{"error":{"message":"(#131000) Something went wrong","code":131000}}"#;
        assert!(matches!(
            classify_response(500, e),
            GraphOutcome::MetaError { code: 131000, .. }
        ));
        assert!(matches!(
            classify_response(502, b"<html>bad gateway</html>"),
            GraphOutcome::Ambiguous { .. }
        ));
        assert!(matches!(
            classify_response(200, b"{}"),
            GraphOutcome::Ambiguous { .. }
        ));
    }
}
