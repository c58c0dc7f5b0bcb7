//! Meta's Graph error responses (CLOUD_API.md §5, §6.5): the body shape
//! `{"error":{"message":"(#code) Title","type":"OAuthException","code",
//! "error_data":{"messaging_product":"whatsapp","details"},"error_subcode"?,
//! "fbtrace_id"}}` and the HTTP status Meta used for each code.

use std::borrow::Cow;

use hyper::header::{HeaderValue, WWW_AUTHENTICATE};
use hyper::{Response, StatusCode};
use rand::distr::{Alphanumeric, SampleString};
use serde_json::{json, Value};

use crate::http::{self, Body};

/// One Graph API error, ready to be answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GraphError {
    pub status: StatusCode,
    pub code: i64,
    pub title: Cow<'static, str>,
    pub details: String,
    pub subcode: Option<i64>,
}

impl GraphError {
    /// `code` with Meta's title, HTTP status, subcode and usual details.
    pub fn of(code: i64) -> GraphError {
        GraphError::new(code, default_details(code))
    }

    /// `code` with Meta's title, HTTP status and subcode, and `details`.
    pub fn new(code: i64, details: impl Into<String>) -> GraphError {
        GraphError {
            status: http_status(code),
            code,
            title: Cow::Borrowed(title(code)),
            details: details.into(),
            subcode: default_subcode(code),
        }
    }

    pub fn with_status(mut self, status: StatusCode) -> GraphError {
        self.status = status;
        self
    }

    pub fn with_title(mut self, title: impl Into<Cow<'static, str>>) -> GraphError {
        self.title = title.into();
        self
    }

    pub fn with_subcode(mut self, subcode: Option<i64>) -> GraphError {
        self.subcode = subcode;
        self
    }

    /// The JSON body, with a fresh `fbtrace_id`.
    pub fn to_json(&self) -> Value {
        let mut error = json!({
            "message": format!("(#{}) {}", self.code, self.title),
            "type": "OAuthException",
            "code": self.code,
            "error_data": {
                "messaging_product": "whatsapp",
                "details": self.details,
            },
            "fbtrace_id": fbtrace_id(),
        });
        if let Some(sub) = self.subcode {
            error["error_subcode"] = sub.into();
        }
        json!({ "error": error })
    }

    /// The HTTP response Meta would send.
    pub fn response(&self) -> Response<Body> {
        let body = serde_json::to_vec(&self.to_json()).unwrap_or_default();
        let mut r = http::json(self.status, body);
        if self.status == StatusCode::UNAUTHORIZED {
            r.headers_mut().insert(
                WWW_AUTHENTICATE,
                HeaderValue::from_static("OAuth \"Facebook Platform\" \"invalid_token\""),
            );
        }
        r
    }
}

/// A trace id in Meta's style: `A` and 22 letters or digits.
pub fn fbtrace_id() -> String {
    let mut s = String::with_capacity(23);
    s.push('A');
    Alphanumeric.append_string(&mut rand::rng(), &mut s, 22);
    s
}

/// The HTTP status Meta answered with for `code` (CLOUD_API.md §5): 401 for
/// 0/190; 403 for permission and account blocks; 404 for 132001; 500 for
/// server-side failures; 503 for overload; 400 for the rest, throttling
/// included.
pub fn http_status(code: i64) -> StatusCode {
    match code {
        0 | 190 => StatusCode::UNAUTHORIZED,
        10 | 200..=299 | 368 | 131005 | 131031 => StatusCode::FORBIDDEN,
        132001 => StatusCode::NOT_FOUND,
        3 | 131000 | 131016 | 131045 | 131057 | 133000 => StatusCode::INTERNAL_SERVER_ERROR,
        2 | 133004 => StatusCode::SERVICE_UNAVAILABLE,
        _ => StatusCode::BAD_REQUEST,
    }
}

/// Meta's title for `code`, as it appears in `error.message`.
pub fn title(code: i64) -> &'static str {
    match code {
        0 => "AuthException",
        1 => "API Unknown",
        2 => "API Service",
        3 => "API Method",
        4 => "API Too Many Calls",
        10 => "Permission Denied",
        100 => "Invalid parameter",
        190 => "Access token has expired",
        200..=299 => "API Permission",
        368 => "Temporarily blocked for policies violations",
        80007 => "Rate limit issues",
        130403 => "Recipient blocked by the business",
        130429 => "Rate limit hit",
        130472 => "User's number is part of an experiment",
        130497 => "Business account is restricted from messaging users in this country",
        131000 => "Something went wrong",
        131005 => "Access denied",
        131008 => "Required parameter is missing",
        131009 => "Parameter value is not valid",
        131016 => "Service unavailable",
        131021 => "Recipient cannot be sender",
        131026 => "Message undeliverable",
        131030 => "Recipient phone number not in allowed list",
        131031 => "Business Account locked",
        131037 => "WhatsApp provided number needs display name approval before message can be sent",
        131042 => "Business eligibility payment issue",
        131045 => "Incorrect certificate",
        131047 => "Re-engagement message",
        131048 => "Spam rate limit hit",
        131049 => "This message was not delivered to maintain healthy ecosystem engagement.",
        131050 => "Unable to deliver the marketing message: the user stopped marketing messages",
        131051 => "Unsupported message type",
        131052 => "Media download error",
        131053 => "Media upload error",
        131056 => "(Business Account, Consumer Account) pair rate limit hit",
        131057 => "Account in maintenance mode",
        131062 => "BSUID recipients are not supported for this message.",
        131063 => "Marketing templates disabled for Cloud API",
        131064 => "Messaging limit reached due to template classification violations",
        132000 => "Number of parameters does not match the expected number of params",
        132001 => "Template name does not exist in the translation",
        132005 => "Translated text too long",
        132007 => "Template Format Character Policy Violated",
        132012 => "Parameter format does not match format in the created template",
        132015 => "Template is Paused",
        132016 => "Template is Disabled",
        132018 => "There was an issue with the parameters in your template.",
        133000 => "Incomplete deregistration",
        133004 => "Server temporarily unavailable",
        133010 => "Phone number Not Registered",
        134100 => "Only marketing templates are supported on this endpoint",
        134101 => "Template is still being synced",
        134102 => "Template is not eligible for this endpoint",
        135000 => "Generic user error",
        137000 => "Identity key hash mismatch",
        _ => "Error",
    }
}

/// The `error_data.details` Meta sends for `code` when nothing more specific
/// applies (texts from the payload examples where there is one).
pub fn default_details(code: i64) -> &'static str {
    match code {
        0 | 190 => "Error validating access token: Session has expired.",
        130429 => "Cloud API message throughput has been reached.",
        131000 => "Something went wrong. Please try again later.",
        131016 => "A service is temporarily unavailable.",
        131026 => "Message Undeliverable.",
        131047 => "Message failed to send because more than 24 hours have passed since the customer last replied to this number.",
        131048 => "Message failed to send because there are restrictions on how many messages can be sent from this phone number. This may be because too many previous messages were blocked or flagged as spam.",
        131049 => "In order to maintain a healthy ecosystem engagement, the message failed to be delivered.",
        131056 => "Message failed to send because there were too many messages sent from this phone number to the same phone number in a short period of time.",
        131057 => "Business Account is in maintenance mode. This can happen while the phone number's throughput is being upgraded; try again in about a minute.",
        131062 => "Authentication templates with one-tap, zero-tap or copy-code buttons need a phone number recipient.",
        131063 => "Marketing template messages are disabled for Cloud API on this WhatsApp Business Account; send them with the Marketing Messages API.",
        132018 => "One or more template parameters are invalid.",
        134100 => "Only marketing templates can be sent with the Marketing Messages API.",
        134101 => "The template is still being synced to the Marketing Messages API; try again in about 10 minutes.",
        134102 => "The template is not eligible to be sent with the Marketing Messages API.",
        137000 => "Message failed to send because the recipient's identity key hash does not match the one provided.",
        132001 => "template name does not exist in the translation",
        133004 => "Server is temporarily unavailable.",
        _ => title(code),
    }
}

/// The `error_subcode` Meta's examples carry for `code`.
fn default_subcode(code: i64) -> Option<i64> {
    match code {
        130429 => Some(2494055),
        190 => Some(463),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shape_matches_the_130429_example() {
        let v = GraphError::of(130429).to_json();
        let e = &v["error"];
        assert_eq!(e["message"], "(#130429) Rate limit hit");
        assert_eq!(e["type"], "OAuthException");
        assert_eq!(e["code"], 130429);
        assert_eq!(e["error_subcode"], 2494055);
        assert_eq!(e["error_data"]["messaging_product"], "whatsapp");
        assert_eq!(
            e["error_data"]["details"],
            "Cloud API message throughput has been reached."
        );
        let trace = e["fbtrace_id"].as_str().unwrap_or_default();
        assert_eq!(trace.len(), 23);
        assert!(trace.chars().all(|c| c.is_ascii_alphanumeric()));
    }

    #[test]
    fn statuses_follow_the_table() {
        assert_eq!(http_status(190), StatusCode::UNAUTHORIZED);
        assert_eq!(http_status(0), StatusCode::UNAUTHORIZED);
        assert_eq!(http_status(250), StatusCode::FORBIDDEN);
        assert_eq!(http_status(131031), StatusCode::FORBIDDEN);
        assert_eq!(http_status(132001), StatusCode::NOT_FOUND);
        assert_eq!(http_status(131000), StatusCode::INTERNAL_SERVER_ERROR);
        assert_eq!(http_status(133004), StatusCode::SERVICE_UNAVAILABLE);
        for throttle in [4, 80007, 130429, 131048, 131056] {
            assert_eq!(http_status(throttle), StatusCode::BAD_REQUEST);
        }
    }

    #[test]
    fn the_identity_and_2026_codes_are_known() {
        assert_eq!(http_status(131057), StatusCode::INTERNAL_SERVER_ERROR);
        for code in [131062, 131063, 132018, 134100, 134101, 134102, 137000] {
            assert_eq!(http_status(code), StatusCode::BAD_REQUEST, "{code}");
        }
        for code in [
            131057, 131062, 131063, 132018, 134100, 134101, 134102, 137000,
        ] {
            assert_ne!(title(code), "Error", "{code}");
            assert_ne!(default_details(code), title(code), "{code}");
        }
    }

    #[test]
    fn shape_matches_the_131062_example() {
        // payloads/identity_error_131062.json
        let v = GraphError::of(131062).to_json();
        let e = &v["error"];
        assert_eq!(
            e["message"],
            "(#131062) BSUID recipients are not supported for this message."
        );
        assert_eq!(e["code"], 131062);
        assert_eq!(e["type"], "OAuthException");
        assert_eq!(e["error_data"]["messaging_product"], "whatsapp");
        assert_eq!(
            e["error_data"]["details"],
            "Authentication templates with one-tap, zero-tap or copy-code buttons need a phone number recipient."
        );
        assert!(e.get("error_subcode").is_none());
        assert_eq!(GraphError::of(131062).status, StatusCode::BAD_REQUEST);
    }
}
