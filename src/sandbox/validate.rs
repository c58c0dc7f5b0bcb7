//! Validation of send bodies as the Cloud API does it (CLOUD_API.md §5):
//! missing top-level parameters are 131008, malformed values 131009, and
//! missing or over-long fields inside the message object 100 ("Invalid
//! parameter", like `payloads/error_100_invalid_param.json`).

use serde_json::{Map, Value};

use super::error::GraphError;

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
    /// `to` exactly as sent.
    pub to: String,
    /// `to` with everything but digits removed.
    pub wa_id: String,
    pub type_: String,
    pub biz_opaque_callback_data: Option<String>,
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
    let to = match obj.get("to") {
        None => return Err(missing("to")),
        Some(Value::String(s)) => s.clone(),
        Some(_) => return Err(invalid("to", "must be a string")),
    };
    let wa_id = digits(&to);
    let charset_ok = to
        .chars()
        .all(|c| c.is_ascii_digit() || matches!(c, '+' | '-' | '(' | ')' | ' '));
    if !charset_ok || !TO_DIGITS.contains(&wa_id.len()) {
        return Err(invalid(
            "to",
            "is not a valid phone number (digits with an optional +, -, spaces and parentheses; 7 to 15 digits)",
        ));
    }
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
    Ok(Parsed::Send(SendFields {
        to,
        wa_id,
        type_,
        biz_opaque_callback_data,
    }))
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
                type_: "text".into(),
                biz_opaque_callback_data: Some("job=1".into()),
            }))
        );
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
