//! Lists a WABA's templates: `GET {base}/{waba_id}/message_templates` with
//! `fields` and `limit`, following `paging.cursors.after` while Meta gives a
//! `paging.next` (the next URL itself is not followed: the request stays on
//! the configured base URL, so the token goes nowhere else).

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Limited};
use hyper::header::AUTHORIZATION;
use hyper::Request;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::{Map, Value};

/// The fields asked for.
pub const FIELDS: &str = "id,name,language,status,category,components,quality_score";
/// Templates per page asked for.
pub const PAGE_LIMIT: usize = 100;
/// At most this many pages per listing (100,000 templates at 100 a page).
pub const MAX_PAGES: usize = 1000;
/// Largest page body read.
const MAX_PAGE_BYTES: usize = 16 << 20;

type Https = hyper_rustls::HttpsConnector<HttpConnector>;

/// Why a listing failed (the registry keeps what it had).
#[derive(Debug, thiserror::Error)]
pub enum ListError {
    #[error("GET message_templates: {0}")]
    Http(String),
    #[error("GET message_templates: HTTP {status}: Meta error {code}: {message}")]
    Meta {
        status: u16,
        code: i64,
        message: String,
    },
    #[error("GET message_templates: HTTP {0} without a Graph error")]
    Status(u16),
    #[error("GET message_templates: the answer is not a page of templates")]
    Shape,
    #[error("GET message_templates: more than {MAX_PAGES} pages")]
    TooManyPages,
}

/// A Graph API client for listings.
#[derive(Clone)]
pub struct TemplatesClient {
    client: Client<Https, Empty<Bytes>>,
    base_url: String,
    timeout: Duration,
}

impl TemplatesClient {
    pub fn new(base_url: &str, timeout: Duration) -> TemplatesClient {
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_connect_timeout(Some(Duration::from_secs(5)));
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_webpki_roots()
            .https_or_http()
            .enable_http1()
            .enable_http2()
            .wrap_connector(http);
        TemplatesClient {
            client: Client::builder(TokioExecutor::new())
                .pool_idle_timeout(crate::egress::graph::POOL_IDLE)
                .build(https),
            base_url: base_url.trim_end_matches('/').to_string(),
            timeout,
        }
    }

    /// Every template of `waba`, all pages.
    pub async fn list(
        &self,
        waba: &str,
        token: &str,
    ) -> Result<Vec<Map<String, Value>>, ListError> {
        let mut out = Vec::new();
        let mut after: Option<String> = None;
        for _ in 0..MAX_PAGES {
            let mut url = format!(
                "{}/{}/message_templates?fields={}&limit={PAGE_LIMIT}",
                self.base_url, waba, FIELDS
            );
            if let Some(a) = &after {
                url.push_str("&after=");
                url.extend(form_urlencoded::byte_serialize(a.as_bytes()));
            }
            let page = self.get(&url, token).await?;
            let data = page
                .get("data")
                .and_then(Value::as_array)
                .ok_or(ListError::Shape)?;
            for t in data {
                if let Value::Object(o) = t {
                    out.push(o.clone());
                }
            }
            let paging = page.get("paging");
            let next = paging.and_then(|p| p.get("next")).is_some();
            let cursor = paging
                .and_then(|p| p.get("cursors"))
                .and_then(|c| c.get("after"))
                .and_then(Value::as_str);
            match (next, cursor) {
                (true, Some(c)) if !data.is_empty() => after = Some(c.to_string()),
                _ => return Ok(out),
            }
        }
        Err(ListError::TooManyPages)
    }

    async fn get(&self, url: &str, token: &str) -> Result<Value, ListError> {
        let req = Request::get(url)
            .header(AUTHORIZATION, format!("Bearer {token}"))
            .body(Empty::new())
            .map_err(|e| ListError::Http(e.to_string()))?;
        let fut = async {
            let resp = self.client.request(req).await?;
            let status = resp.status().as_u16();
            let body = Limited::new(resp.into_body(), MAX_PAGE_BYTES)
                .collect()
                .await
                .map(|c| c.to_bytes())
                .ok();
            Ok::<_, hyper_util::client::legacy::Error>((status, body))
        };
        let (status, body) = tokio::time::timeout(self.timeout, fut)
            .await
            .map_err(|_| {
                ListError::Http(format!("no answer within {} ms", self.timeout.as_millis()))
            })?
            .map_err(|e| ListError::Http(e.to_string()))?;
        let v: Option<Value> = body.and_then(|b| serde_json::from_slice(&b).ok());
        if let Some(err) = v.as_ref().and_then(|v| v.get("error")) {
            return Err(ListError::Meta {
                status,
                code: err.get("code").and_then(Value::as_i64).unwrap_or(0),
                message: err
                    .get("message")
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .to_string(),
            });
        }
        if status != 200 {
            return Err(ListError::Status(status));
        }
        v.ok_or(ListError::Shape)
    }
}
