//! The internal listener: `/metrics`, `/healthz`, `/readyz` and the upstream
//! API (`POST /v1/messages`). Bind it to a private address.

pub mod api;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::{Method, Response, StatusCode};
use metrics_exporter_prometheus::PrometheusHandle;

use crate::http::{self, Body};

/// What `/readyz` reports.
#[derive(Debug, Default)]
pub struct Readiness {
    /// Kafka answered a metadata request recently.
    pub kafka: AtomicBool,
    /// The contacts state has caught up with its topics.
    pub contacts: AtomicBool,
    /// The dedupe window is read back from `inbound.ids` (or not shared).
    pub dedupe: AtomicBool,
    /// The number state has caught up with `wa.numbers`.
    pub numbers: AtomicBool,
    /// The template registry has caught up with `wa.templates`.
    pub templates: AtomicBool,
    /// Shutdown has begun: not ready, whatever else holds.
    pub draining: AtomicBool,
    /// While Kafka does not answer: the connection problem the clients
    /// reported (a TLS or SASL setting to check), if any.
    pub kafka_problem: std::sync::Mutex<Option<crate::kafka::Problem>>,
}

impl Readiness {
    pub fn is_ready(&self) -> bool {
        self.kafka.load(Ordering::Relaxed)
            && self.contacts.load(Ordering::Relaxed)
            && self.dedupe.load(Ordering::Relaxed)
            && self.numbers.load(Ordering::Relaxed)
            && self.templates.load(Ordering::Relaxed)
            && !self.draining.load(Ordering::Relaxed)
    }
}

/// Shared state of the internal listener.
pub struct Admin {
    pub metrics: PrometheusHandle,
    pub ready: Arc<Readiness>,
    pub api: api::Api,
}

impl Admin {
    pub async fn handle(self: Arc<Self>, req: http::Req) -> Response<Body> {
        if let Some(rest) = req.uri().path().strip_prefix("/v1/contacts/") {
            let parts: Vec<String> = rest.split('/').map(str::to_string).collect();
            return match parts.as_slice() {
                [pnid, wa_id] => self.api.contact(req, pnid, wa_id).await,
                _ => not_found("use /v1/contacts/{phone_number_id}/{wa_id}"),
            };
        }
        match (req.method(), req.uri().path()) {
            (&Method::GET, "/metrics") => {
                let mut r = http::text(StatusCode::OK, self.metrics.render());
                r.headers_mut().insert(
                    CONTENT_TYPE,
                    HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
                );
                r
            }
            (&Method::GET, "/healthz") => http::text(StatusCode::OK, "ok"),
            (&Method::GET, "/readyz") => {
                let r = &self.ready;
                if r.is_ready() {
                    http::text(StatusCode::OK, "ready")
                } else {
                    let why: std::borrow::Cow<'_, str> = if r.draining.load(Ordering::Relaxed) {
                        "shutting down".into()
                    } else if !r.kafka.load(Ordering::Relaxed) {
                        match *r.kafka_problem.lock().unwrap() {
                            Some(p) => format!("kafka unreachable: {}", p.hint()).into(),
                            None => "kafka unreachable".into(),
                        }
                    } else if !r.contacts.load(Ordering::Relaxed) {
                        "contacts state catching up".into()
                    } else if !r.dedupe.load(Ordering::Relaxed) {
                        "dedupe window being read back from inbound.ids".into()
                    } else if !r.numbers.load(Ordering::Relaxed) {
                        "number state catching up with numbers".into()
                    } else {
                        "template registry catching up".into()
                    };
                    http::text(StatusCode::SERVICE_UNAVAILABLE, format!("not ready: {why}"))
                }
            }
            (&Method::POST, "/v1/messages") => self.api.post_message(req).await,
            (_, "/v1/messages") => method_not_allowed("use POST"),
            (_, "/metrics" | "/healthz" | "/readyz") => method_not_allowed("use GET"),
            _ => not_found("no such route"),
        }
    }
}

/// 404 on the internal listener, counted.
pub(crate) fn not_found(message: &str) -> Response<Body> {
    crate::metrics::http_error("internal", crate::metrics::HttpError::NotFound);
    http::json_error(StatusCode::NOT_FOUND, "not_found", message)
}

/// 405 on the internal listener, counted.
pub(crate) fn method_not_allowed(message: &str) -> Response<Body> {
    crate::metrics::http_error("internal", crate::metrics::HttpError::MethodNotAllowed);
    http::json_error(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        message,
    )
}
