//! Validation of send bodies as the Cloud API does it (CLOUD_API.md §5):
//! missing top-level parameters are 131008, malformed values 131009, and
//! missing or over-long fields inside the message object 100 ("Invalid
//! parameter", like `payloads/error_100_invalid_param.json`).
//!
//! A send is addressed by `to` (a phone number) or by `recipient` (a BSUID
//! or parent BSUID, IDENTITY.md §4); when both are present `to` wins and
//! `recipient` is ignored, as Meta does.

use serde_json::{Map, Value};

use super::error::GraphError;
use super::identity::is_bsuid;

/// Longest `text.body` Meta accepts, in characters.
pub const MAX_TEXT_BODY_CHARS: usize = 4096;
/// Longest `biz_opaque_callback_data`, in characters.
pub const MAX_OPAQUE_CHARS: usize = 512;
/// Digits in a valid recipient number (E.164 allows up to 15).
const TO_DIGITS: std::ops::RangeInclusive<usize> = 7..=15;

/// Message types the send endpoint accepts.
const TYPES: &[&str] = &[
    "text",
    "template",
    "image",
    "video",
    "audio",
    "document",
    "sticker",
    "interactive",
    "reaction",
    "location",
    "contacts",
];

/// A body the send endpoint accepted for processing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Parsed {
    /// `{"status":"read","message_id":…}`: answered `{"success":true}`.
    MarkRead,
    Send(SendFields),
}

/// The fields of a valid send that the sandbox acts on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SendFields {
    /// `to` exactly as sent; `""` when the send is addressed by `recipient`.
    pub to: String,
    /// `to` with everything but digits removed; `""` when the send is
    /// addressed by `recipient`.
    pub wa_id: String,
    /// `recipient` (a BSUID or parent BSUID) exactly as sent, when the send
    /// is addressed by it; `None` when it has a `to` (which wins).
    pub recipient: Option<String>,
    pub type_: String,
    /// `template.name` of a template send.
    pub template_name: Option<String>,
    pub biz_opaque_callback_data: Option<String>,
}

impl SendFields {
    /// The user the send addresses, as addressed: the phone digits, or the
    /// BSUID.
    pub fn user(&self) -> &str {
        self.recipient.as_deref().unwrap_or(&self.wa_id)
    }
}

fn missing(param: &str) -> GraphError {
    GraphError::new(131008, format!("Param {param} is required."))
}

fn invalid(param: &str, why: &str) -> GraphError {
    GraphError::new(131009, format!("Param {param} {why}."))
}

fn bad(details: String) -> GraphError {
    GraphError::new(100, details)
}

/// Digits of a phone number.
pub fn digits(s: &str) -> String {
    s.chars().filter(char::is_ascii_digit).collect()
}

/// Validates a request body (already parsed as JSON).
pub fn parse(v: &Value) -> Result<Parsed, GraphError> {
    let Some(obj) = v.as_object() else {
        return Err(bad("The request body must be a JSON object.".into()));
    };
    match obj.get("messaging_product") {
        None => return Err(missing("messaging_product")),
        Some(Value::String(s)) if s == "whatsapp" => {}
        Some(other) => {
            return Err(bad(format!(
                "Param messaging_product must be one of {{WHATSAPP}} - got {other}."
            )))
        }
    }
    if obj.contains_key("status") {
        return mark_read(obj);
    }
    if let Some(rt) = obj.get("recipient_type") {
        match rt.as_str() {
            Some("individual") => {}
            Some("group") => {
                return Err(bad(
                    "Group sends (recipient_type \"group\") are not supported by the sandbox."
                        .into(),
                ))
            }
            _ => {
                return Err(bad(format!(
                    "Param recipient_type must be one of {{INDIVIDUAL, GROUP}} - got {rt}."
                )))
            }
        }
    }
    let (to, wa_id, recipient) = match (obj.get("to"), obj.get("recipient")) {
        (None, None) => return Err(missing("to or recipient")),
        // `to` wins: `recipient` is ignored, valid or not.
        (Some(to), _) => {
            let (to, wa_id) = phone(to)?;
            (to, wa_id, None)
        }
        (None, Some(r)) => (String::new(), String::new(), Some(bsuid(r)?)),
    };
    let type_ = match obj.get("type") {
        None => return Err(missing("type")),
        Some(Value::String(s)) if TYPES.contains(&s.as_str()) => s.clone(),
        Some(other) => {
            return Err(bad(format!(
                "Param type must be one of {{{}}} - got {other}.",
                TYPES.join(", ")
            )))
        }
    };
    let biz_opaque_callback_data = match obj.get("biz_opaque_callback_data") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) if s.chars().count() <= MAX_OPAQUE_CHARS => Some(s.clone()),
        Some(Value::String(_)) => {
            return Err(bad(format!(
                "Param biz_opaque_callback_data must be at most {MAX_OPAQUE_CHARS} characters long."
            )))
        }
        Some(_) => {
            return Err(bad(
                "Param biz_opaque_callback_data must be a string.".into()
            ))
        }
    };
    if let Some(ctx) = obj.get("context") {
        if !ctx.get("message_id").is_some_and(Value::is_string) {
            return Err(bad("Param context['message_id'] is required.".into()));
        }
    }
    let Some(msg) = obj.get(&type_) else {
        return Err(missing(&type_));
    };
    if type_ == "contacts" {
        // `contacts` is an array of cards, not an object.
        if msg.as_array().is_none_or(|a| a.is_empty()) {
            return Err(bad("Param contacts must be a non-empty array.".into()));
        }
    } else {
        message_object(&type_, msg)?;
    }
    let template_name = (type_ == "template")
        .then(|| msg.get("name").and_then(Value::as_str).map(str::to_string))
        .flatten();
    Ok(Parsed::Send(SendFields {
        to,
        wa_id,
        recipient,
        type_,
        template_name,
        biz_opaque_callback_data,
    }))
}

/// `to`: a phone number → (as sent, digits).
fn phone(to: &Value) -> Result<(String, String), GraphError> {
    let Value::String(to) = to else {
        return Err(invalid("to", "must be a string"));
    };
    let wa_id = digits(to);
    let charset_ok = to
        .chars()
        .all(|c| c.is_ascii_digit() || matches!(c, '+' | '-' | '(' | ')' | ' '));
    if !charset_ok || !TO_DIGITS.contains(&wa_id.len()) {
        return Err(invalid(
            "to",
            "is not a valid phone number (digits with an optional +, -, spaces and parentheses; 7 to 15 digits)",
        ));
    }
    Ok((to.clone(), wa_id))
}

/// `recipient`: a BSUID or parent BSUID, kept byte for byte.
fn bsuid(r: &Value) -> Result<String, GraphError> {
    match r {
        Value::String(s) if is_bsuid(s) => Ok(s.clone()),
        Value::String(_) => Err(invalid(
            "recipient",
            "is not a valid WhatsApp business-scoped user ID (a country code, a dot, an optional ENT., then 1 to 128 letters or digits, e.g. BR.8821736450019923)",
        )),
        _ => Err(invalid("recipient", "must be a string")),
    }
}

fn mark_read(obj: &Map<String, Value>) -> Result<Parsed, GraphError> {
    if obj.get("status").and_then(Value::as_str) != Some("read") {
        return Err(bad(
            "Param status must be one of {READ} - got a different value.".into(),
        ));
    }
    match obj.get("message_id") {
        None => Err(missing("message_id")),
        Some(Value::String(s)) if s.starts_with("wamid.") => Ok(Parsed::MarkRead),
        Some(_) => Err(invalid("message_id", "must be a wamid")),
    }
}

/// Checks the object named by `type`.
fn message_object(ty: &str, msg: &Value) -> Result<(), GraphError> {
    let Some(m) = msg.as_object() else {
        return Err(bad(format!("Param {ty} must be a JSON object.")));
    };
    let need = |field: &str| -> Result<&Value, GraphError> {
        m.get(field)
            .ok_or_else(|| bad(format!("Param {ty}['{field}'] is required.")))
    };
    let need_str = |field: &str| -> Result<&str, GraphError> {
        need(field)?
            .as_str()
            .ok_or_else(|| bad(format!("Param {ty}['{field}'] must be a string.")))
    };
    match ty {
        "text" => {
            let body = need_str("body")?;
            if body.chars().count() > MAX_TEXT_BODY_CHARS {
                return Err(bad(format!(
                    "Param text['body'] must be at most {MAX_TEXT_BODY_CHARS} characters long."
                )));
            }
            if m.get("preview_url").is_some_and(|p| !p.is_boolean()) {
                return Err(bad("Param text['preview_url'] must be a boolean.".into()));
            }
        }
        "template" => {
            if need_str("name")?.is_empty() {
                return Err(bad("Param template['name'] must not be empty.".into()));
            }
            if !need("language")?.get("code").is_some_and(Value::is_string) {
                return Err(bad("Param template['language']['code'] is required.".into()));
            }
            if let Some(c) = m.get("components") {
                let Some(list) = c.as_array() else {
                    return Err(bad("Param template['components'] must be an array.".into()));
                };
                for (i, comp) in list.iter().enumerate() {
                    if !comp.get("type").is_some_and(Value::is_string) {
                        return Err(bad(format!(
                            "Param template['components'][{i}]['type'] is required."
                        )));
                    }
                }
            }
        }
        "image" | "video" | "audio" | "document" | "sticker" => {
            let id = m.get("id").and_then(Value::as_str);
            let link = m.get("link").and_then(Value::as_str);
            match (id, link) {
                (None, None) => {
                    return Err(bad(format!(
                        "Param {ty}['id'] or {ty}['link'] is required."
                    )))
                }
                (_, Some(l)) if !(l.starts_with("https://") || l.starts_with("http://")) => {
                    return Err(invalid(&format!("{ty}['link']"), "must be an http(s) URL"))
                }
                _ => {}
            }
            if matches!(ty, "audio" | "sticker") && m.contains_key("caption") {
                return Err(bad(format!("Param {ty}['caption'] is not allowed.")));
            }
        }
        "interactive" => {
            need_str("type")?;
            if !need("action")?.is_object() {
                return Err(bad(
                    "Param interactive['action'] must be a JSON object.".into()
                ));
            }
        }
        "reaction" => {
            need_str("message_id")?;
            if m.get("emoji").is_some_and(|e| !e.is_string()) {
                return Err(bad("Param reaction['emoji'] must be a string.".into()));
            }
        }
        "location" => {
            need("latitude")?;
            need("longitude")?;
        }
        _ => {}
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn code(v: Value) -> i64 {
        match parse(&v) {
            Ok(p) => panic!("accepted: {p:?}"),
            Err(e) => e.code,
        }
    }

    #[test]
    fn a_text_send_is_accepted() {
        let text = json!({"messaging_product":"whatsapp","recipient_type":"individual","to":"+14155550123","type":"text","text":{"preview_url":false,"body":"hi"},"biz_opaque_callback_data":"job=1"});
        assert_eq!(
            parse(&text),
            Ok(Parsed::Send(SendFields {
                to: "+14155550123".into(),
                wa_id: "14155550123".into(),
                recipient: None,
                type_: "text".into(),
                template_name: None,
                biz_opaque_callback_data: Some("job=1".into()),
            }))
        );
    }

    #[test]
    fn a_send_by_recipient_is_accepted() {
        let v = json!({"messaging_product":"whatsapp","recipient_type":"individual","recipient":"BR.8821736450019923","type":"template","template":{"name":"otp","language":{"code":"pt_BR"}}});
        let Ok(Parsed::Send(f)) = parse(&v) else {
            panic!("refused")
        };
        assert_eq!(f.recipient.as_deref(), Some("BR.8821736450019923"));
        assert_eq!((f.to.as_str(), f.wa_id.as_str()), ("", ""));
        assert_eq!(f.user(), "BR.8821736450019923");
        assert_eq!(f.template_name.as_deref(), Some("otp"));
        let mut parent = v.clone();
        parent["recipient"] = "BR.ENT.90017736450011".into();
        assert!(parse(&parent).is_ok());
    }

    #[test]
    fn to_wins_over_recipient() {
        // Even an invalid recipient is ignored next to a `to`.
        for r in [json!("BR.8821736450019923"), json!("not a bsuid"), json!(7)] {
            let v = json!({"messaging_product":"whatsapp","to":"+14155550123","recipient":r,"type":"text","text":{"body":"x"}});
            let Ok(Parsed::Send(f)) = parse(&v) else {
                panic!("refused with recipient {r}")
            };
            assert_eq!(f.recipient, None);
            assert_eq!(f.user(), "14155550123");
        }
        // A bad `to` is not rescued by a good recipient.
        let v = json!({"messaging_product":"whatsapp","to":"x","recipient":"BR.1","type":"text","text":{"body":"x"}});
        assert_eq!(code(v), 131009);
    }

    #[test]
    fn bad_recipients_are_131009() {
        for r in [
            json!("br.8821736450019923"),
            json!("+14155550123"),
            json!("BR.8821 7364"),
            json!("BR."),
            json!(""),
            json!(123),
            json!(null),
        ] {
            let v = json!({"messaging_product":"whatsapp","recipient":r,"type":"text","text":{"body":"x"}});
            let e = parse(&v).expect_err("refused");
            assert_eq!(e.code, 131009, "{r}");
            assert!(e.details.contains("recipient"), "{}", e.details);
        }
        let none = json!({"messaging_product":"whatsapp","type":"text","text":{"body":"x"}});
        let e = parse(&none).expect_err("refused");
        assert_eq!(e.code, 131008);
        assert_eq!(e.details, "Param to or recipient is required.");
    }

    #[test]
    fn missing_and_invalid_fields() {
        let ok = json!({"messaging_product":"whatsapp","to":"+1 (415) 555-0123","type":"text","text":{"body":"x"}});
        assert!(parse(&ok).is_ok());
        let mut v = ok.clone();
        v.as_object_mut().map(|o| o.remove("to"));
        assert_eq!(code(v), 131008);
        let mut v = ok.clone();
        v["to"] = "+1415abc0123".into();
        assert_eq!(code(v), 131009);
        let mut v = ok.clone();
        v["messaging_product"] = "sms".into();
        assert_eq!(code(v), 100);
        let mut v = ok.clone();
        v["text"]["body"] = "é".repeat(4097).into();
        assert_eq!(code(v), 100);
        let mut v = ok.clone();
        v["biz_opaque_callback_data"] = "x".repeat(513).into();
        assert_eq!(code(v), 100);
        let mut v = ok;
        v["type"] = "hologram".into();
        assert_eq!(code(v), 100);
    }
}
