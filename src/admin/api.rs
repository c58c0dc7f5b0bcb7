//! The upstream API on the internal listener: `POST /v1/messages`.
//!
//! Bearer tokens are scoped to a tenant; a tenant may only use its own
//! business numbers (403 otherwise). Bodies are limited and read under a
//! deadline; bad input gets a 400 naming what is wrong.

use std::time::Duration;

use hyper::header::AUTHORIZATION;
use hyper::{Response, StatusCode};
use subtle::ConstantTimeEq;

use crate::config::TenantConfig;
use crate::egress::request::SendRequest;
use crate::http::{self, Body};
use crate::kafka::{KafkaProducer, Kind, RecordHeaders};

/// Largest accepted API body.
pub const MAX_API_BODY: usize = 256 * 1024;

/// State of the API routes.
pub struct Api {
    pub tenants: Vec<TenantConfig>,
    pub contacts: std::sync::Arc<crate::contacts::MemoryContacts>,
    /// Writes `wa.consent` / `wa.windows` (PUT, DELETE).
    pub writer: crate::contacts::writer::ContactsWriter,
    pub producer: KafkaProducer,
    pub requests_topic: String,
    pub ack_timeout: Duration,
    /// Body limits of the API (`MAX_API_BODY`, the server's deadline and rate).
    pub body_limits: http::BodyLimits,
    /// The media plane: DELETE also deletes the person's stored media.
    pub media: Option<std::sync::Arc<crate::media::Media>>,
}

impl Api {
    /// The tenant whose token is presented (compared in constant time against all).
    pub fn authenticate(&self, req: &http::Req) -> Option<&TenantConfig> {
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

    pub async fn post_message(&self, req: http::Req) -> Response<Body> {
        let Some(tenant) = self.authenticate(&req) else {
            return http::json_error(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "a valid Bearer token is required",
            );
        };
        let body = match http::read_body(req, &self.body_limits).await {
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
        let headers = RecordHeaders::new(&send.request_id, Kind::Request, &tenant.name);
        let fut = match headers.with(|h| {
            self.producer.send(
                &self.requests_topic,
                send.phone_number_id.as_bytes(),
                &bytes,
                h,
            )
        }) {
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

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct ContactUpdate {
    consent: Option<crate::contacts::Consent>,
    marketing: Option<crate::contacts::Marketing>,
}

impl Api {
    /// `GET / PUT / DELETE /v1/contacts/{phone_number_id}/{user}`, the user
    /// phone digits or a BSUID (DESIGN §10): each acts on the person, under
    /// every id linked to the one given.
    pub async fn contact(
        &self,
        req: http::Req,
        phone_number_id: &str,
        user: &str,
    ) -> Response<Body> {
        let Some(tenant) = self.authenticate(&req) else {
            return http::json_error(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "a valid Bearer token is required",
            );
        };
        let decoded = percent_decoded(user);
        let Some((phone_number_id, wa_id)) = decoded
            .as_deref()
            .and_then(|u| contact_ids(phone_number_id, u))
        else {
            return http::json_error(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                "phone_number_id is 1-20 digits; the user is a phone number (1-20 digits, optionally after one '+') or a BSUID such as BR.8821736450019923",
            );
        };
        if tenant
            .numbers
            .as_ref()
            .is_some_and(|n| !n.iter().any(|x| x == phone_number_id))
        {
            return http::json_error(
                StatusCode::FORBIDDEN,
                "forbidden",
                "this token may not use that phone_number_id",
            );
        }
        match *req.method() {
            hyper::Method::GET => {
                use crate::contacts::Contacts;
                let ids = self.contacts.ids(phone_number_id, wa_id);
                match self.contacts.lookup_person(phone_number_id, wa_id) {
                    None if ids.len() < 2 => http::json_error(
                        StatusCode::NOT_FOUND,
                        "not_found",
                        "nothing is known of this user at this number",
                    ),
                    st => http::json(StatusCode::OK, state_json(&st.unwrap_or_default(), &ids)),
                }
            }
            hyper::Method::PUT => {
                let body = match http::read_body(req, &self.body_limits).await {
                    Ok(b) => b,
                    Err(e) => return e.response(MAX_API_BODY),
                };
                self.put_contact(&tenant.name, phone_number_id, wa_id, &body)
                    .await
            }
            hyper::Method::DELETE => {
                self.erase_contact(&tenant.name, phone_number_id, wa_id)
                    .await
            }
            _ => super::method_not_allowed("use GET, PUT or DELETE"),
        }
    }

    /// PUT: the change in the cache at once, 200 once `wa.consent` has it.
    async fn put_contact(
        &self,
        tenant: &str,
        phone_number_id: &str,
        wa_id: &str,
        body: &[u8],
    ) -> Response<Body> {
        use crate::contacts::{Consent, Contacts};
        let upd: ContactUpdate = match serde_json::from_slice(body) {
            Ok(u) => u,
            // serde's message can quote the bad value: name only where.
            Err(e) => return http::json_error(StatusCode::BAD_REQUEST, "invalid_request", &format!("expected {{\"consent\": \"opted_in\"|\"opted_out\", \"marketing\": \"allowed\"|\"stopped\"}} (error at line {}, column {})", e.line(), e.column())),
        };
        if upd.consent.is_none() && upd.marketing.is_none() {
            return http::json_error(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                "set consent, marketing or both",
            );
        }
        if upd.consent == Some(Consent::Unknown) {
            return http::json_error(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                "consent is opted_in or opted_out (DELETE forgets a pair)",
            );
        }
        if let Some(c) = upd.consent {
            self.contacts.set_consent(phone_number_id, wa_id, c);
        }
        if let Some(m) = upd.marketing {
            self.contacts.set_marketing(phone_number_id, wa_id, m);
        }
        let st = self.contacts.get(phone_number_id, wa_id);
        let now = crate::clock::now_ms();
        let ids = self.contacts.ids(phone_number_id, wa_id);
        let mut acks = Vec::with_capacity(ids.len());
        for id in &ids {
            let ev = crate::contacts::records::consent_event(
                phone_number_id,
                id,
                &st,
                "api",
                now,
                &format!("api:{now}:{id}"),
            );
            match self.writer.write(&ev, tenant) {
                Ok(f) => acks.push(f),
                Err(_) => return http::unavailable(2, "kafka cannot take the change now; retry"),
            }
        }
        let all = futures_util::future::join_all(acks);
        match tokio::time::timeout(self.ack_timeout, all).await {
            Ok(done) if done.iter().all(|r| r.is_ok()) => {
                http::json(StatusCode::OK, state_json(&st, &ids))
            }
            _ => http::unavailable(2, "kafka did not acknowledge the change in time; retry"),
        }
    }

    /// DELETE: the person under every linked id, and the link itself:
    /// tombstones on the three compacted topics for every key they may have
    /// been written under (the normal form, and the `+`-prefixed number id
    /// that earlier versions accepted on this API), 204 once Kafka has them
    /// all.
    async fn erase_contact(
        &self,
        tenant: &str,
        phone_number_id: &str,
        wa_id: &str,
    ) -> Response<Body> {
        use crate::contacts::Contacts;
        let mut ids = self.contacts.ids(phone_number_id, wa_id);
        if !ids.iter().any(|i| i == wa_id) {
            ids.push(wa_id.to_string());
        }
        // The person's stored media first, under every linked id: a 204
        // means it is gone too (a failure is a 503, and DELETE is repeatable).
        if let Some(media) = &self.media {
            if let Err(e) = media.erase(phone_number_id, &ids).await {
                tracing::warn!(error = %e, "media objects not deleted");
                return http::unavailable(
                    2,
                    "the media store cannot delete the person's media now; retry",
                );
            }
        }
        self.contacts.erase(phone_number_id, wa_id);
        let event_id = format!("erase:{}", crate::clock::now_ms());
        let keys: Vec<String> = ids
            .iter()
            .flat_map(|id| erase_keys(phone_number_id, id))
            .collect();
        let acks = match self.writer.erase(&keys, &event_id, tenant) {
            Ok(a) => a,
            Err(_) => return http::unavailable(2, "kafka cannot take the erasure now; retry"),
        };
        let all = futures_util::future::join_all(acks);
        match tokio::time::timeout(self.ack_timeout, all).await {
            Ok(done) if done.iter().all(|r| r.is_ok()) => {
                let mut r = http::text(StatusCode::NO_CONTENT, "");
                r.headers_mut().remove(hyper::header::CONTENT_TYPE);
                r
            }
            _ => http::unavailable(2, "kafka did not acknowledge the erasure in time; retry"),
        }
    }
}

/// A person's state as the API shows it, with their ids.
fn state_json(st: &crate::contacts::ContactState, ids: &[String]) -> Vec<u8> {
    let is_bsuid = |s: &&String| crate::meta::identity::is_bsuid(s);
    let wa_id = ids.iter().find(|s| !is_bsuid(s));
    let user_id = ids.iter().find(is_bsuid);
    serde_json::to_vec(&serde_json::json!({
        "v": 1, "consent": st.consent, "marketing": st.marketing, "last_inbound_ms": st.last_inbound_ms,
        "ids": {"wa_id": wa_id, "user_id": user_id},
    }))
    .unwrap_or_default()
}

/// A path segment with its `%XX` escapes decoded (a BSUID's `.` may come
/// as `%2E`); `None` when an escape is broken or decodes to a byte that is
/// no id's.
fn percent_decoded(s: &str) -> Option<std::borrow::Cow<'_, str>> {
    if !s.contains('%') {
        return Some(std::borrow::Cow::Borrowed(s));
    }
    let b = s.as_bytes();
    let mut out = String::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = b.get(i + 1..i + 3)?;
            let v = u8::from_str_radix(std::str::from_utf8(hex).ok()?, 16).ok()?;
            if !(v.is_ascii_alphanumeric() || v == b'.' || v == b'+') {
                return None;
            }
            out.push(char::from(v));
            i += 3;
        } else {
            out.push(char::from(b[i]));
            i += 1;
        }
    }
    Some(std::borrow::Cow::Owned(out))
}

/// Longest id accepted on the contacts API (Meta's are 15-16 digits).
const MAX_ID_DIGITS: usize = 20;

/// Validates and normalises the two ids of a contacts path: the number id is
/// digits only; the user is phone digits, which may be written with one
/// leading `+` (dropped, so that the cache, the compacted topics' keys and
/// erasure all see one form), or a BSUID, kept byte for byte.
pub fn contact_ids<'a>(phone_number_id: &'a str, user: &'a str) -> Option<(&'a str, &'a str)> {
    let digits = |s: &str| {
        !s.is_empty() && s.len() <= MAX_ID_DIGITS && s.bytes().all(|b| b.is_ascii_digit())
    };
    if crate::meta::identity::is_bsuid(user) {
        return digits(phone_number_id).then_some((phone_number_id, user));
    }
    let wa_id = user.strip_prefix('+').unwrap_or(user);
    (digits(phone_number_id) && digits(wa_id)).then_some((phone_number_id, wa_id))
}

/// Every key a pair may have been written under on the compacted topics.
pub fn erase_keys(phone_number_id: &str, wa_id: &str) -> [String; 2] {
    [
        crate::contacts::records::key(phone_number_id, wa_id),
        crate::contacts::records::key(&format!("+{phone_number_id}"), wa_id),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn contact_ids_are_strict_and_normalised() {
        assert_eq!(
            contact_ids("109876543210987", "+14155550123"),
            Some(("109876543210987", "14155550123"))
        );
        assert_eq!(
            contact_ids("109876543210987", "14155550123"),
            Some(("109876543210987", "14155550123"))
        );
        for (p, w) in [
            ("+", "+"),
            ("+109876543210987", "14155550123"),
            ("109876543210987", "++14155550123"),
            ("109876543210987", "+"),
            ("", "1"),
            ("1", ""),
            ("1x", "1"),
            ("1", "1 2"),
            ("123456789012345678901", "1"),
            ("1", "%2B1"),
            ("1", "br.1"),
            ("1", "BR.1.2"),
        ] {
            assert_eq!(contact_ids(p, w), None, "{p:?} {w:?}");
        }
        assert_eq!(
            contact_ids("1", "BR.8821736450019923"),
            Some(("1", "BR.8821736450019923"))
        );
    }

    #[test]
    fn user_segments_are_percent_decoded_to_id_bytes_only() {
        assert_eq!(percent_decoded("BR%2E1").as_deref(), Some("BR.1"));
        assert_eq!(percent_decoded("%2B5511").as_deref(), Some("+5511"));
        assert_eq!(percent_decoded("BR.1").as_deref(), Some("BR.1"));
        for bad in ["%", "%2", "%zz", "BR%3A1", "%00", "%2F"] {
            assert_eq!(percent_decoded(bad), None, "{bad}");
        }
    }

    #[test]
    fn erasure_covers_the_old_plus_form() {
        let keys = erase_keys("109876543210987", "14155550123");
        assert_eq!(keys[0], "109876543210987:14155550123");
        assert_eq!(keys[1], "+109876543210987:14155550123");
    }
}
