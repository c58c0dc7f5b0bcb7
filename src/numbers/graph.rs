//! A small Graph API client for reads and management calls (number fields,
//! `subscribed_apps`, `debug_token`, overrides): JSON in, JSON out, bounded
//! in time and size. Sends go through `egress::graph`, not here.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::header::{AUTHORIZATION, CONTENT_TYPE};
use hyper::{Method, Request};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::Value;

type Https = hyper_rustls::HttpsConnector<HttpConnector>;

/// Largest answer read.
const MAX_ANSWER: usize = 4 << 20;

/// A Graph API error or a transport failure, said for an operator.
#[derive(Debug, Clone, PartialEq)]
pub enum GraphFailure {
    /// Meta answered an error (`error.code`, `error.message`).
    Meta {
        http_status: u16,
        code: i64,
        message: String,
    },
    /// No usable answer (connect failed, timed out, not JSON).
    Transport(String),
}

impl std::fmt::Display for GraphFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            GraphFailure::Meta {
                http_status,
                code,
                message,
            } => write!(f, "Graph API error {code} (HTTP {http_status}): {message}"),
            GraphFailure::Transport(why) => write!(f, "Graph API call failed: {why}"),
        }
    }
}

#[derive(Clone)]
pub struct GraphApi {
    client: Client<Https, Full<Bytes>>,
    /// `https://graph.facebook.com/v23.0`.
    base_url: String,
    timeout: Duration,
}

impl GraphApi {
    pub fn new(base_url: &str, timeout: Duration) -> GraphApi {
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_connect_timeout(Some(Duration::from_secs(5)));
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_webpki_roots()
            .https_or_http()
            .enable_http1()
            .enable_http2()
            .wrap_connector(http);
        GraphApi {
            client: Client::builder(TokioExecutor::new())
                .pool_idle_timeout(Duration::from_secs(5))
                .build(https),
            base_url: base_url.trim_end_matches('/').to_string(),
            timeout,
        }
    }

    pub fn base_url(&self) -> &str {
        &self.base_url
    }

    /// `GET {base}/{path}?{query}` with the bearer token.
    pub async fn get(
        &self,
        path: &str,
        query: &[(&str, &str)],
        token: &str,
    ) -> Result<Value, GraphFailure> {
        self.call(Method::GET, path, query, token, None).await
    }

    /// `POST {base}/{path}` with a JSON body (or none).
    pub async fn post(
        &self,
        path: &str,
        body: Option<Value>,
        token: &str,
    ) -> Result<Value, GraphFailure> {
        self.call(Method::POST, path, &[], token, body).await
    }

    async fn call(
        &self,
        method: Method,
        path: &str,
        query: &[(&str, &str)],
        token: &str,
        body: Option<Value>,
    ) -> Result<Value, GraphFailure> {
        let mut url = format!("{}/{}", self.base_url, path.trim_start_matches('/'));
        if !query.is_empty() {
            let q: String = form_urlencoded::Serializer::new(String::new())
                .extend_pairs(query)
                .finish();
            url.push('?');
            url.push_str(&q);
        }
        let body = body.map(|b| b.to_string()).unwrap_or_default();
        let req = Request::builder()
            .method(method)
            .uri(&url)
            .header(AUTHORIZATION, format!("Bearer {token}"))
            .header(CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| GraphFailure::Transport(format!("bad URL {url:?}: {e}")))?;
        let fut = async {
            let resp = self.client.request(req).await.map_err(|e| e.to_string())?;
            let status = resp.status().as_u16();
            let bytes = Limited::new(resp.into_body(), MAX_ANSWER)
                .collect()
                .await
                .map_err(|e| e.to_string())?
                .to_bytes();
            Ok::<_, String>((status, bytes))
        };
        let (status, bytes) = tokio::time::timeout(self.timeout, fut)
            .await
            .map_err(|_| {
                GraphFailure::Transport(format!("no answer within {} ms", self.timeout.as_millis()))
            })?
            .map_err(GraphFailure::Transport)?;
        let v: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        if let Some(e) = v.get("error") {
            return Err(GraphFailure::Meta {
                http_status: status,
                code: e.get("code").and_then(Value::as_i64).unwrap_or(0),
                message: e
                    .get("message")
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .to_string(),
            });
        }
        if !(200..300).contains(&status) || v.is_null() {
            return Err(GraphFailure::Transport(format!(
                "HTTP {status} without a JSON answer"
            )));
        }
        Ok(v)
    }
}
