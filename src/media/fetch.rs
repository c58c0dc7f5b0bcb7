//! Meta's two media calls (CLOUD_API.md §8.1): the lookup `GET
//! {graph base}/{media_id}` (→ `url`, `mime_type`, `sha256`, `file_size`)
//! and the download `GET url`, both with the number's bearer token, over a
//! pooled hyper-util + rustls client (the same connector setup as
//! `egress::graph`). The download's body is handed back as a stream: the
//! worker hashes and stores it chunk by chunk.
//!
//! Classification: a 5xx, a 429, a timeout, a connection error, Graph codes
//! 1, 2, 4, 80007, 131000, 131057 or 190 (a token being rotated) →
//! [`FetchError::Retry`]; a download answered 401/403/404/410 → `Retry` with
//! a fresh lookup (the URL expired); code 100 (the id unknown or past
//! Meta's 7 days) or any other Graph error → [`FetchError::Permanent`].

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Limited};
use hyper::body::Incoming;
use hyper::header::AUTHORIZATION;
use hyper::Request;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::Value;

use super::record::ItemError;

type Https = hyper_rustls::HttpsConnector<HttpConnector>;

/// What Meta says of one media id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MediaInfo {
    pub url: String,
    pub mime_type: String,
    /// The SHA-256 Meta announces (given as hex or base64).
    pub sha256: [u8; 32],
    pub file_size: u64,
}

/// Why a call did not give what was asked.
#[derive(Debug, Clone, PartialEq)]
pub enum FetchError {
    /// Worth another try after a backoff; `reason` is a metric label
    /// (`http_5xx`, `timeout`, `connect`, `url_expired`, `auth`, `rate`).
    Retry {
        reason: &'static str,
        detail: String,
    },
    /// No retry helps.
    Permanent(ItemError),
}

/// The media client.
#[derive(Clone)]
pub struct MediaClient {
    client: Client<Https, Empty<Bytes>>,
    base_url: String,
    timeout: Duration,
}

impl MediaClient {
    /// `base_url`: the Graph API base with its version
    /// (`https://graph.facebook.com/v23.0`); `timeout`: per call (the
    /// download's headers; the body has the worker's own deadline).
    pub fn new(base_url: &str, timeout: Duration) -> MediaClient {
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
            .pool_idle_timeout(crate::egress::graph::POOL_IDLE)
            .pool_max_idle_per_host(64)
            .build(https);
        MediaClient {
            client,
            base_url: base_url.trim_end_matches('/').to_string(),
            timeout,
        }
    }

    async fn get(&self, url: &str, token: &str) -> Result<hyper::Response<Incoming>, FetchError> {
        let req = Request::get(url)
            .header(AUTHORIZATION, format!("Bearer {token}"))
            .body(Empty::new())
            .map_err(|e| {
                FetchError::Permanent(ItemError::gateway("bad_url", format!("bad URL: {e}")))
            })?;
        match tokio::time::timeout(self.timeout, self.client.request(req)).await {
            Err(_) => Err(FetchError::Retry {
                reason: "timeout",
                detail: format!("no answer within {} ms", self.timeout.as_millis()),
            }),
            Ok(Err(e)) if e.is_connect() => Err(FetchError::Retry {
                reason: "connect",
                detail: format!("connect failed: {e}"),
            }),
            Ok(Err(e)) => Err(FetchError::Retry {
                reason: "connect",
                detail: format!("connection lost: {e}"),
            }),
            Ok(Ok(r)) => Ok(r),
        }
    }

    /// `GET {base}/{media_id}`.
    pub async fn lookup(&self, media_id: &str, token: &str) -> Result<MediaInfo, FetchError> {
        let url = format!("{}/{}", self.base_url, media_id);
        let resp = self.get(&url, token).await?;
        let status = resp.status().as_u16();
        let body = tokio::time::timeout(
            self.timeout,
            Limited::new(resp.into_body(), 64 * 1024).collect(),
        )
        .await;
        let body = match body {
            Ok(Ok(c)) => c.to_bytes(),
            Ok(Err(e)) => {
                return Err(FetchError::Retry {
                    reason: "connect",
                    detail: format!("lookup body unreadable: {e}"),
                })
            }
            Err(_) => {
                return Err(FetchError::Retry {
                    reason: "timeout",
                    detail: "lookup body not received in time".into(),
                })
            }
        };
        classify_lookup(status, &body)
    }

    /// `GET url` with the token: the response, once its status is 200.
    pub async fn download(
        &self,
        url: &str,
        token: &str,
    ) -> Result<hyper::Response<Incoming>, FetchError> {
        let resp = self.get(url, token).await?;
        let status = resp.status().as_u16();
        match status {
            200 => Ok(resp),
            401 | 403 | 404 | 410 => Err(FetchError::Retry {
                reason: "url_expired",
                detail: format!("download answered HTTP {status}: a fresh URL is looked up"),
            }),
            429 => Err(FetchError::Retry {
                reason: "rate",
                detail: "download answered HTTP 429".into(),
            }),
            s if s >= 500 => Err(FetchError::Retry {
                reason: "http_5xx",
                detail: format!("download answered HTTP {s}"),
            }),
            s => Err(FetchError::Permanent(ItemError::gateway(
                "download_refused",
                format!("download answered HTTP {s}"),
            ))),
        }
    }
}

/// Decodes Meta's `sha256`: 64 hex digits or base64 of 32 bytes.
pub fn parse_sha256(s: &str) -> Option<[u8; 32]> {
    let s = s.trim();
    if s.len() == 64 {
        if let Ok(v) = hex::decode(s) {
            return v.try_into().ok();
        }
    }
    base64_decode(s).and_then(|v| v.try_into().ok())
}

fn base64_decode(s: &str) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(s.len() * 3 / 4);
    let (mut acc, mut bits) = (0u32, 0u32);
    for c in s.bytes() {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' | b'-' => 62,
            b'/' | b'_' => 63,
            b'=' => break,
            _ => return None,
        } as u32;
        acc = (acc << 6) | v;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    Some(out)
}

/// The lookup's answer → its fields, or why not.
pub fn classify_lookup(status: u16, body: &[u8]) -> Result<MediaInfo, FetchError> {
    let v: Option<Value> = serde_json::from_slice(body).ok();
    if let Some(err) = v.as_ref().and_then(|v| v.get("error")) {
        let code = err.get("code").and_then(Value::as_i64).unwrap_or(0);
        let message = err
            .get("message")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string();
        return Err(match code {
            1 | 2 | 4 | 80007 | 131000 | 131057 | 190 => FetchError::Retry {
                reason: if code == 190 {
                    "auth"
                } else {
                    "meta_transient"
                },
                detail: format!("lookup: Graph error {code}"),
            },
            _ if status >= 500 => FetchError::Retry {
                reason: "http_5xx",
                detail: format!("lookup: HTTP {status}, Graph error {code}"),
            },
            _ => FetchError::Permanent(ItemError::meta(code, message)),
        });
    }
    if status >= 500 || status == 429 {
        return Err(FetchError::Retry {
            reason: if status == 429 { "rate" } else { "http_5xx" },
            detail: format!("lookup answered HTTP {status}"),
        });
    }
    let field = |k: &str| v.as_ref().and_then(|v| v.get(k));
    let (Some(url), Some(sha), Some(size)) = (
        field("url").and_then(Value::as_str),
        field("sha256").and_then(Value::as_str),
        field("file_size").and_then(|s| s.as_u64().or_else(|| s.as_str()?.parse().ok())),
    ) else {
        return Err(if status == 200 {
            FetchError::Retry {
                reason: "http_5xx",
                detail: "lookup: 200 without url, sha256 and file_size".into(),
            }
        } else {
            FetchError::Permanent(ItemError::gateway(
                "lookup_refused",
                format!("lookup answered HTTP {status}"),
            ))
        });
    };
    let Some(sha256) = parse_sha256(sha) else {
        return Err(FetchError::Permanent(ItemError::gateway(
            "bad_checksum",
            "lookup: sha256 is neither hex nor base64 of 32 bytes",
        )));
    };
    Ok(MediaInfo {
        url: url.to_string(),
        mime_type: field("mime_type")
            .and_then(Value::as_str)
            .unwrap_or("application/octet-stream")
            .to_string(),
        sha256,
        file_size: size,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lookups_are_classified() {
        let hex = "a".repeat(64);
        let ok = format!(
            r#"{{"messaging_product":"whatsapp","url":"http://x/y","mime_type":"image/jpeg","sha256":"{hex}","file_size":12,"id":"1"}}"#
        );
        let info = classify_lookup(200, ok.as_bytes()).unwrap();
        assert_eq!(info.file_size, 12);
        assert_eq!(info.sha256, [0xaa; 32]);
        let gone = br#"{"error":{"message":"Unsupported get request.","type":"GraphMethodException","code":100,"error_subcode":33}}"#;
        assert!(matches!(
            classify_lookup(400, gone),
            Err(FetchError::Permanent(e)) if e.code == serde_json::json!(100)
        ));
        assert!(matches!(
            classify_lookup(500, b"Internal Server Error"),
            Err(FetchError::Retry {
                reason: "http_5xx",
                ..
            })
        ));
        let b64 = "k3Jq0xY2cH8pW9uVb6nR1tLm4sA7eZ5dF0gQ2hJ8iKo=";
        assert!(parse_sha256(b64).is_some());
        assert!(parse_sha256("zz").is_none());
    }
}
