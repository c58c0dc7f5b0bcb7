//! SendRequest (what upstream apps produce) and SendResult (one per request),
//! DESIGN §5, with validation that names what is wrong.

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// A message category; templates must name theirs, free-form is `service`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Category {
    Marketing,
    Utility,
    Authentication,
    Service,
}

impl Category {
    pub fn label(self) -> &'static str {
        match self {
            Category::Marketing => "marketing",
            Category::Utility => "utility",
            Category::Authentication => "authentication",
            Category::Service => "service",
        }
    }
}

/// A send request as produced to `wa.outbound.requests`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SendRequest {
    pub v: u32,
    pub request_id: String,
    pub phone_number_id: String,
    /// The user's phone (E.164, `+` first); exactly one of `to` and
    /// `recipient` (DESIGN §10).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to: Option<String>,
    /// The user's BSUID or parent BSUID, byte for byte.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recipient: Option<String>,
    /// Required for free-form (`service`); optional for templates, whose
    /// category the template registry knows (it wins over the request's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub category: Option<Category>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at_ms: Option<u64>,
    /// The Graph API message body without messaging_product / recipient_type / to.
    pub message: Value,
}

/// Message types that are not templates (free-form, need an open window).
const FREE_FORM: &[&str] = &[
    "text",
    "image",
    "video",
    "audio",
    "document",
    "sticker",
    "location",
    "contacts",
    "interactive",
    "reaction",
];

impl SendRequest {
    /// Parses and validates a request. The error names the field at fault.
    pub fn parse(bytes: &[u8]) -> Result<SendRequest, String> {
        let req: SendRequest =
            serde_json::from_slice(bytes).map_err(|e| format!("not a SendRequest: {e}"))?;
        req.validate()?;
        Ok(req)
    }

    /// The message type (`text`, `template`, …).
    pub fn message_type(&self) -> &str {
        self.message
            .get("type")
            .and_then(Value::as_str)
            .unwrap_or("")
    }

    pub fn is_template(&self) -> bool {
        self.message_type() == "template"
    }

    /// The category the policy applies: the request's (corrected from the
    /// template registry before the policy runs). Validation requires it for
    /// free-form messages; a template whose category nobody named would be
    /// treated as marketing (the strictest), but egress blocks such a
    /// request as `invalid_request` before the policy runs.
    pub fn category(&self) -> Category {
        self.category.unwrap_or(if self.is_template() {
            Category::Marketing
        } else {
            Category::Service
        })
    }

    /// `message.template.name` and `.language.code` of a template send.
    pub fn template_name_language(&self) -> Option<(&str, &str)> {
        let t = self.message.get("template")?;
        let name = t.get("name")?.as_str()?;
        let lang = t.get("language")?.get("code")?.as_str()?;
        Some((name, lang))
    }

    /// The user as the contacts plane keys them: the digits of `to`, or
    /// the `recipient` BSUID.
    pub fn user(&self) -> String {
        match (&self.to, &self.recipient) {
            (Some(to), _) => to.chars().filter(|c| c.is_ascii_digit()).collect(),
            (None, Some(r)) => r.clone(),
            (None, None) => String::new(),
        }
    }

    /// An authentication template (the one kind of send Meta refuses to a
    /// BSUID: 131062).
    pub fn is_authentication_template(&self) -> bool {
        self.is_template() && self.category == Some(Category::Authentication)
    }

    pub fn validate(&self) -> Result<(), String> {
        if self.v != 1 {
            return Err(format!("v: unsupported version {}", self.v));
        }
        if self.request_id.is_empty() || self.request_id.len() > 128 {
            return Err("request_id: must be 1 to 128 characters".into());
        }
        if self.request_id.chars().any(|c| c.is_control()) {
            return Err("request_id: must not contain control characters".into());
        }
        if self.phone_number_id.is_empty()
            || self.phone_number_id.len() > 32
            || !self.phone_number_id.bytes().all(|b| b.is_ascii_digit())
        {
            return Err("phone_number_id: must be the business number's id (digits)".into());
        }
        match (&self.to, &self.recipient) {
            (Some(_), Some(_)) => {
                return Err("to, recipient: give exactly one (to: a phone number, recipient: a BSUID)".into())
            }
            (None, None) => {
                return Err("to: required (a phone number such as +5511987654321), or recipient (a BSUID such as BR.8821736450019923)".into())
            }
            (Some(to), None) => {
                let digits = self.user();
                if !to.starts_with('+') {
                    return Err("to: must start with + and the country code (without it Meta may reach the wrong person)".into());
                }
                if !(7..=15).contains(&digits.len())
                    || !to[1..]
                        .chars()
                        .all(|c| c.is_ascii_digit() || matches!(c, ' ' | '-' | '(' | ')'))
                {
                    return Err("to: must be an E.164 phone number such as +5511987654321".into());
                }
            }
            (None, Some(r)) => {
                if !crate::meta::identity::is_bsuid(r) {
                    return Err("recipient: must be a BSUID such as BR.8821736450019923 (two capital letters, a dot, optionally ENT., then 1 to 128 letters or digits), sent byte for byte".into());
                }
            }
        }
        let obj = self
            .message
            .as_object()
            .ok_or("message: must be a JSON object")?;
        for forbidden in [
            "messaging_product",
            "to",
            "recipient",
            "recipient_type",
            "biz_opaque_callback_data",
        ] {
            if obj.contains_key(forbidden) {
                return Err(format!("message.{forbidden}: set by wagate; leave it out"));
            }
        }
        let ty = self.message_type();
        if ty.is_empty() {
            return Err("message.type: required (text, template, image, …)".into());
        }
        if !obj.get(ty).is_some_and(Value::is_object) && ty != "contacts" {
            return Err(format!(
                "message.{ty}: the object named by message.type is missing"
            ));
        }
        if ty == "template" {
            let t = &obj["template"];
            if !t.get("name").is_some_and(Value::is_string) {
                return Err("message.template.name: required".into());
            }
            if !t
                .get("language")
                .and_then(|l| l.get("code"))
                .is_some_and(Value::is_string)
            {
                return Err("message.template.language.code: required".into());
            }
            if self.category == Some(Category::Service) {
                return Err("category: a template send must name its template's category (marketing, utility or authentication)".into());
            }
        } else if FREE_FORM.contains(&ty) {
            if self.category.is_none() {
                return Err(format!(
                    "category: required (free-form messages ({ty}) are category service)"
                ));
            }
            if self.category.is_some_and(|c| c != Category::Service) {
                return Err(format!(
                    "category: free-form messages ({ty}) are category service"
                ));
            }
        } else {
            return Err(format!("message.type: unsupported type {ty:?}"));
        }
        if ty == "text" {
            let body = obj["text"]
                .get("body")
                .and_then(Value::as_str)
                .ok_or("message.text.body: required")?;
            if body.chars().count() > 4096 {
                return Err("message.text.body: at most 4096 characters".into());
            }
        }
        Ok(())
    }
}

/// The outcome of a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    Accepted,
    Blocked,
    Failed,
    Expired,
    Unknown,
}

impl Outcome {
    pub fn label(self) -> &'static str {
        match self {
            Outcome::Accepted => "accepted",
            Outcome::Blocked => "blocked",
            Outcome::Failed => "failed",
            Outcome::Expired => "expired",
            Outcome::Unknown => "unknown",
        }
    }
}

/// Who said no.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ErrorSource {
    Meta,
    Gateway,
}

/// A gateway code of a result's error (DESIGN §5).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GatewayCode {
    OptedOut,
    MarketingStopped,
    NoOptIn,
    OutsideWindow,
    TierLimit,
    CircuitOpen,
    InvalidRequest,
    UnknownNumber,
    Expired,
    NotSent,
    /// Meta restricted the number (`account_update`): held, not sent.
    NumberRestricted,
    TemplateUnknown,
    TemplateNotApproved,
}

impl GatewayCode {
    pub fn as_str(self) -> &'static str {
        match self {
            GatewayCode::OptedOut => "opted_out",
            GatewayCode::MarketingStopped => "marketing_stopped",
            GatewayCode::NoOptIn => "no_opt_in",
            GatewayCode::OutsideWindow => "outside_window",
            GatewayCode::TierLimit => "tier_limit",
            GatewayCode::CircuitOpen => "circuit_open",
            GatewayCode::InvalidRequest => "invalid_request",
            GatewayCode::UnknownNumber => "unknown_number",
            GatewayCode::Expired => "expired",
            GatewayCode::NotSent => "not_sent",
            GatewayCode::NumberRestricted => "number_restricted",
            GatewayCode::TemplateUnknown => "template_unknown",
            GatewayCode::TemplateNotApproved => "template_not_approved",
        }
    }
}

/// The code of a result's error: Meta's number, or one of the gateway's
/// (written as a JSON number or string, DESIGN §5). A string wagate does
/// not know (a newer version's) is kept as it is.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum ErrorCode {
    Meta(i64),
    Gateway(GatewayCode),
    Other(String),
}

impl ErrorCode {
    /// The metric label: a gateway code, Meta's code when it is one of the
    /// table's, else `other`.
    pub fn label(&self) -> String {
        match self {
            ErrorCode::Meta(c) => crate::meta::errors::code_label(*c),
            ErrorCode::Gateway(g) => g.as_str().to_string(),
            ErrorCode::Other(_) => "other".to_string(),
        }
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ErrorCode::Meta(c) => write!(f, "{c}"),
            ErrorCode::Gateway(g) => f.write_str(g.as_str()),
            ErrorCode::Other(s) => f.write_str(s),
        }
    }
}

/// The error of a result: Meta's numeric code or a gateway code.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ResultError {
    pub source: ErrorSource,
    pub code: ErrorCode,
    pub title: String,
    #[serde(default)]
    pub details: Option<String>,
}

impl ResultError {
    pub fn gateway(
        code: GatewayCode,
        title: impl Into<String>,
        details: Option<String>,
    ) -> ResultError {
        ResultError {
            source: ErrorSource::Gateway,
            code: ErrorCode::Gateway(code),
            title: title.into(),
            details,
        }
    }
    pub fn meta(code: i64, title: impl Into<String>, details: Option<String>) -> ResultError {
        ResultError {
            source: ErrorSource::Meta,
            code: ErrorCode::Meta(code),
            title: title.into(),
            details,
        }
    }
}

/// One result per request, on `wa.outbound.results`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SendResult {
    pub v: u32,
    pub request_id: String,
    pub phone_number_id: String,
    /// `to` and `recipient` as the request gave them (one of them null).
    pub to: Option<String>,
    #[serde(default)]
    pub recipient: Option<String>,
    pub outcome: Outcome,
    pub wamid: Option<String>,
    pub message_status: Option<String>,
    pub error: Option<ResultError>,
    pub attempts: u32,
    pub completed_at_ms: u64,
    /// The send used its portfolio's messaging tier (a business-initiated
    /// message outside the user's window, accepted or possibly delivered):
    /// read back to rebuild the tier count after a restart or rebalance.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub tier_counted: bool,
    /// The user's phone as Meta's answer named it (`contacts[0].wa_id`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wa_id: Option<String>,
    /// The user's BSUID as Meta's answer named it (`contacts[0].user_id`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_id: Option<String>,
    /// `"to"` when a request addressed by `recipient` was sent to the
    /// person's known phone instead (an authentication template: Meta
    /// refuses those to BSUIDs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub addressed: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(v: serde_json::Value) -> Result<SendRequest, String> {
        SendRequest::parse(&serde_json::to_vec(&v).unwrap())
    }

    fn text() -> serde_json::Value {
        serde_json::json!({"v":1,"request_id":"r1","phone_number_id":"109876543210987","to":"+5511987654321","category":"service","message":{"type":"text","text":{"body":"hi"}}})
    }

    #[test]
    fn category_is_optional_for_templates_only() {
        let t = serde_json::json!({"v":1,"request_id":"r","phone_number_id":"1","to":"+14155550123",
            "message":{"type":"template","template":{"name":"order_shipped","language":{"code":"en_US"}}}});
        let r = req(t).unwrap();
        assert_eq!(r.category, None);
        assert_eq!(r.category(), Category::Marketing);
        assert_eq!(r.template_name_language(), Some(("order_shipped", "en_US")));
        assert!(!serde_json::to_string(&r).unwrap().contains("category"));
        let mut f = text();
        f.as_object_mut().unwrap().remove("category");
        assert!(req(f).unwrap_err().starts_with("category: required"));
    }

    #[test]
    fn valid_text_and_template() {
        let r = req(text()).unwrap();
        assert_eq!(r.message_type(), "text");
        assert_eq!(r.user(), "5511987654321");
        let t = serde_json::json!({"v":1,"request_id":"r2","phone_number_id":"1","to":"+1 (415) 555-0123","category":"utility","expires_at_ms":5,
            "message":{"type":"template","template":{"name":"order_shipped","language":{"code":"en_US"}}}});
        let r = req(t).unwrap();
        assert!(r.is_template());
        assert_eq!(r.expires_at_ms, Some(5));
    }

    #[test]
    fn exactly_one_of_to_and_recipient_and_a_bsuid_is_kept_byte_for_byte() {
        let mut v = text();
        v.as_object_mut().unwrap().remove("to");
        v["recipient"] = "BR.8821736450019923".into();
        let r = req(v.clone()).unwrap();
        assert_eq!(r.user(), "BR.8821736450019923");
        assert_eq!(r.to, None);
        let back = serde_json::to_value(&r).unwrap();
        assert_eq!(back["recipient"], "BR.8821736450019923");
        assert!(back.get("to").is_none());
        let mut both = v.clone();
        both["to"] = "+5511987654321".into();
        assert!(req(both).unwrap_err().contains("exactly one"));
        let mut neither = v.clone();
        neither.as_object_mut().unwrap().remove("recipient");
        assert!(req(neither).unwrap_err().starts_with("to: required"));
        for bad in [
            "br.1",
            "BR.",
            "BR.1.2",
            "5511987654321",
            "BR.ENT.",
            "BR.a-b",
        ] {
            let mut b = v.clone();
            b["recipient"] = bad.into();
            assert!(req(b).unwrap_err().starts_with("recipient:"), "{bad}");
        }
        let mut inner = text();
        inner["message"]["recipient"] = "BR.1".into();
        assert!(req(inner).unwrap_err().contains("message.recipient"));
    }

    #[test]
    fn error_codes_are_written_as_numbers_or_strings_as_before() {
        let m = serde_json::to_value(ResultError::meta(131047, "t", None)).unwrap();
        assert_eq!(m["code"], 131047);
        let g =
            serde_json::to_value(ResultError::gateway(GatewayCode::NoOptIn, "t", None)).unwrap();
        assert_eq!(g["code"], "no_opt_in");
        let back: ResultError = serde_json::from_value(g).unwrap();
        assert_eq!(back.code, ErrorCode::Gateway(GatewayCode::NoOptIn));
        let new: ResultError =
            serde_json::from_str(r#"{"source":"gateway","code":"brand_new","title":"t"}"#).unwrap();
        assert_eq!(new.code, ErrorCode::Other("brand_new".into()));
        assert_eq!(new.code.label(), "other");
        assert_eq!(ErrorCode::Meta(999_999).label(), "other");
        assert_eq!(ErrorCode::Meta(131047).to_string(), "131047");
    }

    #[test]
    fn invalid_requests_name_the_field() {
        let cases: Vec<(serde_json::Value, &str)> = vec![
            (serde_json::json!({"v":1}), "not a SendRequest"),
            (
                {
                    let mut v = text();
                    v["to"] = "5511987654321".into();
                    v
                },
                "to:",
            ),
            (
                {
                    let mut v = text();
                    v["to"] = "+55abc".into();
                    v
                },
                "to:",
            ),
            (
                {
                    let mut v = text();
                    v["request_id"] = "".into();
                    v
                },
                "request_id",
            ),
            (
                {
                    let mut v = text();
                    v["request_id"] = "x".repeat(129).into();
                    v
                },
                "request_id",
            ),
            (
                {
                    let mut v = text();
                    v["phone_number_id"] = "+1".into();
                    v
                },
                "phone_number_id",
            ),
            (
                {
                    let mut v = text();
                    v["category"] = "marketing".into();
                    v
                },
                "category",
            ),
            (
                {
                    let mut v = text();
                    v["category"] = "spam".into();
                    v
                },
                "not a SendRequest",
            ),
            (
                {
                    let mut v = text();
                    v["message"] = serde_json::json!({"type":"text"});
                    v
                },
                "message.text",
            ),
            (
                {
                    let mut v = text();
                    v["message"]["to"] = "+1".into();
                    v
                },
                "message.to",
            ),
            (
                {
                    let mut v = text();
                    v["message"] = serde_json::json!({"type":"hologram","hologram":{}});
                    v
                },
                "message.type",
            ),
            (
                {
                    let mut v = text();
                    v["message"]["text"]["body"] = "x".repeat(4097).into();
                    v
                },
                "message.text.body",
            ),
            (
                serde_json::json!({"v":1,"request_id":"r","phone_number_id":"1","to":"+15550100","category":"service","message":{"type":"template","template":{"name":"x","language":{"code":"en"}}}}),
                "category",
            ),
            (
                serde_json::json!({"v":1,"request_id":"r","phone_number_id":"1","to":"+15550100","category":"marketing","message":{"type":"template","template":{"language":{"code":"en"}}}}),
                "template.name",
            ),
            (
                {
                    let mut v = text();
                    v["v"] = 2.into();
                    v
                },
                "v:",
            ),
        ];
        for (v, want) in cases {
            let err = req(v.clone()).unwrap_err();
            assert!(err.contains(want), "{v}: {err}");
        }
    }
}
