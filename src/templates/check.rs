//! A template send checked against the registry before Meta is called
//! (DESIGN §14). Pure but for the registry lookup: unknown name or language
//! → `template_unknown`; a status other than `APPROVED` →
//! `template_not_approved`; a header, body or button whose parameter count
//! differs from the template's placeholders → `invalid_request` naming the
//! component; the registry's category replaces the request's (counted when
//! they differ). Without knowledge (no WABA known for the number, the WABA
//! never listed) the send goes on as before.

use serde_json::Value;

use super::{Lookup, Registry};
use crate::egress::request::{Category, GatewayCode, SendRequest};
use crate::metrics as m;

/// The parameters a template's components take.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Params {
    pub header: usize,
    pub body: usize,
    /// (button index, parameters) of the buttons that take one: a URL with
    /// a placeholder, a copy-code button, an OTP button.
    pub buttons: Vec<(usize, usize)>,
}

/// Distinct `{{…}}` placeholders of a text (`{{1}}`, `{{first_name}}`).
fn placeholders(text: &str) -> usize {
    let mut seen: Vec<&str> = Vec::new();
    let mut rest = text;
    while let Some(start) = rest.find("{{") {
        let after = &rest[start + 2..];
        let Some(end) = after.find("}}") else { break };
        let name = after[..end].trim();
        if !name.is_empty() && !seen.contains(&name) {
            seen.push(name);
        }
        rest = &after[end + 2..];
    }
    seen.len()
}

fn upper(v: &Value, k: &str) -> String {
    v.get(k)
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_ascii_uppercase()
}

impl Params {
    /// From Meta's `components` of a template object; None for shapes not
    /// checked (carousels, limited-time offers, anything new).
    pub fn of_components(components: &Value) -> Option<Params> {
        let mut p = Params::default();
        for c in components.as_array()? {
            let text = c.get("text").and_then(Value::as_str).unwrap_or("");
            match upper(c, "type").as_str() {
                "HEADER" => {
                    p.header = match upper(c, "format").as_str() {
                        "" | "TEXT" => placeholders(text),
                        "IMAGE" | "VIDEO" | "DOCUMENT" | "LOCATION" | "GIF" => 1,
                        _ => return None,
                    }
                }
                "BODY" => p.body = placeholders(text),
                "FOOTER" => {}
                "BUTTONS" => {
                    for (i, b) in c.get("buttons")?.as_array()?.iter().enumerate() {
                        let url = b.get("url").and_then(Value::as_str).unwrap_or("");
                        let n = match upper(b, "type").as_str() {
                            "URL" => placeholders(url),
                            "COPY_CODE" | "OTP" => 1,
                            _ => 0,
                        };
                        if n > 0 {
                            p.buttons.push((i, n));
                        }
                    }
                }
                _ => return None,
            }
        }
        Some(p)
    }
}

/// Why a template send is blocked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TemplateBlock {
    Unknown {
        name: String,
        language: String,
    },
    NotApproved {
        name: String,
        language: String,
        status: String,
    },
    Params {
        component: String,
        expected: usize,
        got: usize,
    },
    /// No category in the request, and the registry does not know the template.
    NoCategory,
}

impl TemplateBlock {
    /// The `reason` label values of `wagate_egress_template_blocked_total`.
    pub const REASONS: &'static [&'static str] = &[
        "template_unknown",
        "template_not_approved",
        "parameters",
        "category_missing",
    ];

    pub fn reason(&self) -> &'static str {
        match self {
            TemplateBlock::Unknown { .. } => "template_unknown",
            TemplateBlock::NotApproved { .. } => "template_not_approved",
            TemplateBlock::Params { .. } => "parameters",
            TemplateBlock::NoCategory => "category_missing",
        }
    }

    /// The result's code, title and details.
    pub fn error(&self) -> (GatewayCode, &'static str, String) {
        match self {
            TemplateBlock::Unknown { name, language } => (
                GatewayCode::TemplateUnknown,
                "the template is not in the registry for this number's WABA (name or language)",
                format!("template {name} ({language}) is not among the WABA's templates"),
            ),
            TemplateBlock::NotApproved { name, language, status } => (
                GatewayCode::TemplateNotApproved,
                "the template is not approved; Meta would refuse it",
                format!("template {name} ({language}) has status {status}"),
            ),
            TemplateBlock::Params { component, expected, got } => (
                GatewayCode::InvalidRequest,
                "the template's parameters do not match its placeholders",
                format!("message.template.components {component}: the template takes {expected} parameter(s), the request gives {got}"),
            ),
            TemplateBlock::NoCategory => (
                GatewayCode::InvalidRequest,
                "category: required for a template the registry does not know",
                "name the template's category (marketing, utility or authentication)".to_string(),
            ),
        }
    }
}

/// What a check did besides passing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Checked {
    /// The request named another category than the registry's: (given, registry's).
    pub corrected: Option<(Category, Category)>,
    /// The registry knew the template.
    pub known: bool,
}

/// Meta's category → the request's.
pub fn category_of(meta: &str) -> Option<Category> {
    match meta.to_ascii_uppercase().as_str() {
        "MARKETING" => Some(Category::Marketing),
        "UTILITY" => Some(Category::Utility),
        "AUTHENTICATION" => Some(Category::Authentication),
        _ => None,
    }
}

/// Parameters a request gives per component: (header, body, buttons by index).
fn given(template: &Value) -> (usize, usize, Vec<(usize, usize)>) {
    let (mut header, mut body, mut buttons) = (0, 0, Vec::new());
    let Some(list) = template.get("components").and_then(Value::as_array) else {
        return (header, body, buttons);
    };
    for c in list {
        let n = c
            .get("parameters")
            .and_then(Value::as_array)
            .map_or(0, Vec::len);
        match upper(c, "type").as_str() {
            "HEADER" => header += n,
            "BODY" => body += n,
            "BUTTON" => {
                let index = match c.get("index") {
                    Some(Value::String(s)) => s.trim().parse::<usize>().ok(),
                    Some(Value::Number(x)) => x.as_u64().map(|x| x as usize),
                    _ => None,
                };
                if let Some(i) = index {
                    buttons.push((i, n));
                }
            }
            _ => {}
        }
    }
    (header, body, buttons)
}

/// The parameter counts of `template` (the request's `message.template`)
/// against `p`.
pub fn check_params(p: &Params, template: &Value) -> Result<(), TemplateBlock> {
    let (header, body, buttons) = given(template);
    let mismatch = |component: String, expected: usize, got: usize| {
        (expected != got).then_some(TemplateBlock::Params {
            component,
            expected,
            got,
        })
    };
    if let Some(b) = mismatch("header".into(), p.header, header) {
        return Err(b);
    }
    if let Some(b) = mismatch("body".into(), p.body, body) {
        return Err(b);
    }
    for (i, expected) in &p.buttons {
        let got = buttons.iter().filter(|(j, _)| j == i).map(|(_, n)| n).sum();
        if let Some(b) = mismatch(format!("button {i}"), *expected, got) {
            return Err(b);
        }
    }
    Ok(())
}

/// Fills a template request's missing category from the registry (no
/// metrics, no blocking: the consumer's first look, before the lane).
pub fn fill_category(reg: Option<&Registry>, req: &mut SendRequest) {
    if req.category.is_some() || !req.is_template() {
        return;
    }
    let Some(reg) = reg else { return };
    let Some((name, lang)) = req.template_name_language() else {
        return;
    };
    if let Lookup::Found(t) = reg.lookup(&req.phone_number_id, name, lang) {
        req.category = t.category.as_deref().and_then(category_of);
    }
}

/// Checks a template send against the registry at `now_ms`, correcting its
/// category; blocked sends and corrections are counted.
pub fn check_send(
    reg: Option<&Registry>,
    req: &mut SendRequest,
    now_ms: u64,
) -> Result<Checked, TemplateBlock> {
    let out = check_inner(reg, req, now_ms);
    match &out {
        Err(b) => {
            metrics::counter!(m::EGRESS_TEMPLATE_BLOCKED, "reason" => b.reason()).increment(1)
        }
        Ok(Checked {
            corrected: Some((from, to)),
            ..
        }) => {
            metrics::counter!(m::TEMPLATE_CORRECTED).increment(1);
            tracing::info!(
                request_id = %req.request_id,
                from = from.label(),
                to = to.label(),
                "template category corrected from the registry"
            );
        }
        Ok(_) => {}
    }
    out
}

fn check_inner(
    reg: Option<&Registry>,
    req: &mut SendRequest,
    now_ms: u64,
) -> Result<Checked, TemplateBlock> {
    if !req.is_template() {
        return Ok(Checked::default());
    }
    let found = match (reg, req.template_name_language()) {
        (Some(reg), Some((name, lang))) => match reg.lookup(&req.phone_number_id, name, lang) {
            Lookup::Unavailable => None,
            Lookup::Unknown => {
                return Err(TemplateBlock::Unknown {
                    name: name.to_string(),
                    language: lang.to_string(),
                })
            }
            Lookup::Found(t) => {
                reg.note_use(&t.key(), now_ms);
                Some(t)
            }
        },
        _ => None,
    };
    let Some(t) = found else {
        if req.category.is_none() {
            return Err(TemplateBlock::NoCategory);
        }
        return Ok(Checked::default());
    };
    if !t.is_approved() {
        return Err(TemplateBlock::NotApproved {
            name: t.name.clone(),
            language: t.language.clone(),
            status: t.status.clone(),
        });
    }
    if let (Some(p), Some(msg)) = (&t.params, req.message.get("template")) {
        check_params(p, msg)?;
    }
    let mut checked = Checked {
        corrected: None,
        known: true,
    };
    if let Some(registry) = t.category.as_deref().and_then(category_of) {
        match req.category {
            Some(given) if given != registry => {
                checked.corrected = Some((given, registry));
                req.category = Some(registry);
            }
            None => req.category = Some(registry),
            _ => {}
        }
    } else if req.category.is_none() {
        return Err(TemplateBlock::NoCategory);
    }
    Ok(checked)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn comps() -> Value {
        json!([
            {"type": "HEADER", "format": "IMAGE"},
            {"type": "BODY", "text": "Olá {{1}}, pedido {{2}} de {{3}}; {{1}}"},
            {"type": "FOOTER", "text": "x"},
            {"type": "BUTTONS", "buttons": [
                {"type": "URL", "text": "Track", "url": "https://x.example/t/{{1}}"},
                {"type": "QUICK_REPLY", "text": "Stop"}
            ]}
        ])
    }

    #[test]
    fn placeholders_are_distinct_names() {
        assert_eq!(placeholders("{{1}} {{2}} {{1}}"), 2);
        assert_eq!(placeholders("Hi {{first_name}}, at {{ slot }}"), 2);
        assert_eq!(placeholders("no params {{"), 0);
    }

    #[test]
    fn the_metas_example_request_matches_its_template() {
        let p = Params::of_components(&comps()).unwrap();
        assert_eq!(
            p,
            Params {
                header: 1,
                body: 3,
                buttons: vec![(0, 1)]
            }
        );
        let req: Value = serde_json::from_slice(
            &std::fs::read("tests/fixtures/send_template_request.json").unwrap(),
        )
        .unwrap();
        assert_eq!(check_params(&p, &req["template"]), Ok(()));
        let mut fewer = req["template"].clone();
        fewer["components"][1]["parameters"]
            .as_array_mut()
            .unwrap()
            .pop();
        assert_eq!(
            check_params(&p, &fewer),
            Err(TemplateBlock::Params {
                component: "body".into(),
                expected: 3,
                got: 2
            })
        );
        let mut no_button = req["template"].clone();
        no_button["components"].as_array_mut().unwrap().remove(2);
        assert!(matches!(
            check_params(&p, &no_button),
            Err(TemplateBlock::Params { component, .. }) if component == "button 0"
        ));
        let mut no_header = req["template"].clone();
        no_header["components"].as_array_mut().unwrap().remove(0);
        assert!(matches!(
            check_params(&p, &no_header),
            Err(TemplateBlock::Params { component, .. }) if component == "header"
        ));
        assert!(Params::of_components(&json!([{"type": "CAROUSEL", "cards": []}])).is_none());
    }
}
