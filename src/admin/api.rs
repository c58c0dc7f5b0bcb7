//! The upstream API on the internal listener: `POST /v1/messages`.
//!
//! Bearer tokens are scoped to a tenant; a tenant may only use its own
//! business numbers (403 otherwise). Bodies are limited and read under a
//! deadline; bad input gets a 400 naming what is wrong.

use std::time::Duration;

use hyper::body::Incoming;
use hyper::header::AUTHORIZATION;
use hyper::{Request, Response, StatusCode};
use subtle::ConstantTimeEq;

use crate::config::TenantConfig;
use crate::egress::request::SendRequest;
use crate::http::{self, Body};
use crate::kafka::KafkaProducer;

/// Largest accepted API body.
pub const MAX_API_BODY: usize = 256 * 1024;

/// State of the API routes.
pub struct Api {
    pub tenants: Vec<TenantConfig>,
    pub producer: KafkaProducer,
    pub requests_topic: String,
    pub ack_timeout: Duration,
    pub body_timeout: Duration,
}

impl Api {
    /// The tenant whose token is presented (compared in constant time against all).
    pub fn authenticate(&self, req: &Request<Incoming>) -> Option<&TenantConfig> {
        let h = req.headers().get(AUTHORIZATION)?.as_bytes();
        let token = h.strip_prefix(b"Bearer ")?;
        let mut found = None;
        for t in &self.tenants {
            if bool::from(t.token.expose().as_bytes().ct_eq(token)) {
                found = Some(t);
            }
        }
        found
    }

    pub async fn post_message(&self, req: Request<Incoming>) -> Response<Body> {
        let Some(tenant) = self.authenticate(&req) else {
            return http::json_error(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "a valid Bearer token is required",
            );
        };
        let body = match http::read_body(req, MAX_API_BODY, self.body_timeout).await {
            Ok(b) => b,
            Err(e) => return e.response(MAX_API_BODY),
        };
        let send = match SendRequest::parse(&body) {
            Ok(r) => r,
            Err(why) => return http::json_error(StatusCode::BAD_REQUEST, "invalid_request", &why),
        };
        if let Some(nums) = &tenant.numbers {
            if !nums.contains(&send.phone_number_id) {
                return http::json_error(
                    StatusCode::FORBIDDEN,
                    "forbidden",
                    "this token may not use that phone_number_id",
                );
            }
        }
        // Re-encode what was validated (drops unknown fields' whitespace, keeps fields).
        let bytes = serde_json::to_vec(&send).unwrap_or_default();
        let headers: [(&str, &[u8]); 3] = [
            ("wagate-event-id", send.request_id.as_bytes()),
            ("wagate-kind", b"request"),
            ("wagate-app", tenant.name.as_bytes()),
        ];
        let fut = match self.producer.send(
            &self.requests_topic,
            send.phone_number_id.as_bytes(),
            &bytes,
            &headers,
        ) {
            Ok(f) => f,
            Err(_) => return http::unavailable(2, "kafka cannot take the request now"),
        };
        match tokio::time::timeout(self.ack_timeout, fut).await {
            Ok(Ok(())) => {
                let body = serde_json::json!({ "request_id": send.request_id });
                http::json(
                    StatusCode::ACCEPTED,
                    serde_json::to_vec(&body).unwrap_or_default(),
                )
            }
            _ => http::unavailable(
                2,
                "kafka did not acknowledge the request in time; retry with the same request_id",
            ),
        }
    }
}
