//! What a verified webhook body teaches the registry, read by ingress on
//! the same parse tree as its fan-out (ingress passes it here; `meta` stays
//! free of the registry):
//!
//! - every change whose `value.metadata.phone_number_id` is set names that
//!   number's WABA (`entry[].id`);
//! - template changes, recognised by the shape of `value` whatever `field`
//!   says (Meta's own examples mislabel it): `new_category` (or
//!   `correct_category`) → a category update, `new_quality_score` → a
//!   quality update, `event` with `message_template_name` /
//!   `message_template_id` → a status update. Each becomes the new record
//!   of its template (the registry's entry with the change applied, or a
//!   new entry without components when the registry did not know it).

use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use simd_json::prelude::*;
use simd_json::BorrowedValue;

use super::{key_of, Registry, Template};
use crate::contacts::records::ContactRecord;
use crate::kafka::{Kind, TopicId};

/// What one change of a template says.
#[derive(Debug, Clone, PartialEq)]
pub enum Change {
    Status(String),
    Category(String),
    Quality(String),
}

impl Change {
    /// The webhook field this shape belongs to (the record's `source`).
    pub fn field(&self) -> &'static str {
        match self {
            Change::Status(_) => "message_template_status_update",
            Change::Category(_) => "template_category_update",
            Change::Quality(_) => "message_template_quality_update",
        }
    }
}

fn s<'a>(v: &'a BorrowedValue<'_>, k: &str) -> Option<&'a str> {
    v.get(k).and_then(|x| x.as_str())
}

/// A string or number field as text (`message_template_id` is a number in
/// Meta's examples).
fn id_text(v: &BorrowedValue<'_>, k: &str) -> Option<String> {
    let x = v.get(k)?;
    if let Some(t) = x.as_str() {
        return Some(t.to_string());
    }
    x.as_u64()
        .map(|n| n.to_string())
        .or_else(|| x.as_i64().map(|n| n.to_string()))
}

/// The status a `message_template_status_update` event leaves the template
/// in (None: the event does not change it, e.g. `FLAGGED`).
pub fn status_after(event: &str) -> Option<String> {
    let e = event.to_ascii_uppercase();
    match e.as_str() {
        "APPROVED" | "REINSTATED" | "UNARCHIVED" => Some("APPROVED".into()),
        "FLAGGED" => None,
        "" => None,
        _ => Some(e),
    }
}

/// The template change a `value` carries, by its shape.
pub fn classify(value: &BorrowedValue<'_>) -> Option<Change> {
    if value.get("message_template_id").is_none() && value.get("message_template_name").is_none() {
        return None;
    }
    if let Some(c) = s(value, "new_category").or_else(|| s(value, "correct_category")) {
        return Some(Change::Category(c.to_ascii_uppercase()));
    }
    if let Some(q) = s(value, "new_quality_score") {
        return Some(Change::Quality(q.to_ascii_uppercase()));
    }
    s(value, "event").map(|e| Change::Status(e.to_string()))
}

fn event_id(waba: &str, field: &str, value: &BorrowedValue<'_>) -> String {
    let mut h = Sha256::new();
    h.update(waba.as_bytes());
    h.update([0]);
    h.update(field.as_bytes());
    h.update([0]);
    h.update(value.encode().as_bytes());
    let d = h.finalize();
    let hex: String = d[..12].iter().map(|b| format!("{b:02x}")).collect();
    format!("template:{hex}")
}

/// Learns the numbers of `root` and turns its template changes into
/// records, applied to `reg` at once; `emit` gets each record to produce
/// with the POST's own.
pub fn learn(
    reg: &Registry,
    root: &BorrowedValue<'_>,
    received_at_ms: u64,
    emit: &mut dyn FnMut(ContactRecord),
) {
    let Some(entries) = root.get("entry").and_then(|e| e.as_array()) else {
        return;
    };
    for entry in entries {
        let Some(waba) = id_text(entry, "id") else {
            continue;
        };
        let Some(changes) = entry.get("changes").and_then(|c| c.as_array()) else {
            continue;
        };
        for change in changes {
            let Some(value) = change.get("value") else {
                continue;
            };
            if let Some(n) = value.get("metadata").and_then(|m| s(m, "phone_number_id")) {
                if !n.is_empty() && reg.learn_number(n, &waba) {
                    tracing::info!(waba_id = %waba, "template registry: a number's WABA learnt from a webhook");
                }
                continue;
            }
            let field = change.get("field").and_then(|f| f.as_str()).unwrap_or("");
            if field == "message_template_components_update" {
                // Carries the new text, not Meta's component objects: the
                // WABA is listed again at once.
                reg.request_refresh(&waba);
                continue;
            }
            let Some(c) = classify(value) else { continue };
            if let Some(rec) = record(reg, &waba, value, &c, received_at_ms) {
                emit(rec);
            }
        }
    }
}

/// The new record of the template a change names, applied to `reg`.
fn record(
    reg: &Registry,
    waba: &str,
    value: &BorrowedValue<'_>,
    change: &Change,
    at_ms: u64,
) -> Option<ContactRecord> {
    let id = id_text(value, "message_template_id");
    let named = s(value, "message_template_name").zip(s(value, "message_template_language"));
    let existing = match named {
        Some((name, lang)) => reg.get(&key_of(waba, name, lang)),
        None => id.as_deref().and_then(|i| reg.by_id(waba, i)),
    };
    let mut set: Vec<(&str, Value)> = Vec::new();
    match change {
        Change::Status(event) => {
            if let Some(st) = status_after(event) {
                set.push(("status", st.into()));
            }
            if let Some(c) = s(value, "message_template_category") {
                set.push(("category", c.to_ascii_uppercase().into()));
            }
        }
        Change::Category(c) => set.push(("category", c.clone().into())),
        Change::Quality(q) => set.push(("quality_score", json!({ "score": q }))),
    }
    if set.is_empty() {
        return None;
    }
    let source = change.field();
    let t = match (&existing, named) {
        (Some(old), _) => old.changed(&set, source, at_ms),
        (None, Some((name, lang))) => {
            Template::from_webhook(waba, name, lang, id.as_deref(), &set, source, at_ms)
        }
        (None, None) => None,
    }?;
    let key = t.key();
    let value_bytes = t.to_record();
    reg.insert(std::sync::Arc::new(t));
    Some(ContactRecord {
        topic: TopicId::Templates,
        key,
        event_id: event_id(waba, source, value),
        kind: Kind::Template,
        value: value_bytes,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(field: &str, value: Value) -> Vec<u8> {
        serde_json::to_vec(&json!({
            "object": "whatsapp_business_account",
            "entry": [{"id": "102345678901234", "time": 1, "changes": [{"field": field, "value": value}]}]
        }))
        .unwrap()
    }

    fn learn_from(reg: &Registry, mut b: Vec<u8>) -> Vec<ContactRecord> {
        let root = simd_json::to_borrowed_value(&mut b).unwrap();
        let mut out = Vec::new();
        learn(reg, &root, 1_000, &mut |r| out.push(r));
        out
    }

    #[test]
    fn a_status_update_pauses_a_template_metas_fixture() {
        let reg = Registry::default();
        let recs = learn_from(
            &reg,
            std::fs::read("tests/fixtures/message_template_status_update.json").unwrap(),
        );
        assert_eq!(recs.len(), 1);
        assert_eq!(recs[0].key, "102345678901234:spring_sale_2026:en_US");
        let t = reg.get(&recs[0].key).unwrap();
        assert_eq!(t.status, "PAUSED");
        assert_eq!(t.category.as_deref(), Some("MARKETING"));
        assert_eq!(t.id.as_deref(), Some("1689556908129901"));
        assert!(t.listed_at_ms.is_none());
        // A redelivery has the same event id (deduplicated by ingress).
        let again = learn_from(
            &reg,
            std::fs::read("tests/fixtures/message_template_status_update.json").unwrap(),
        );
        assert_eq!(again[0].event_id, recs[0].event_id);
    }

    #[test]
    fn shapes_win_over_mislabelled_fields() {
        let reg = Registry::default();
        let v = json!({"message_template_id": 5, "message_template_name": "promo",
            "message_template_language": "en_US", "previous_category": "UTILITY", "new_category": "MARKETING"});
        // Labelled as a status update, shaped as a category update.
        let recs = learn_from(&reg, body("message_template_status_update", v));
        assert_eq!(recs.len(), 1);
        let t = reg.get("102345678901234:promo:en_US").unwrap();
        assert_eq!(t.category.as_deref(), Some("MARKETING"));
        assert_eq!(t.status, "");
        let q = json!({"message_template_id": 5, "message_template_name": "promo",
            "message_template_language": "en_US", "previous_quality_score": "GREEN", "new_quality_score": "RED"});
        learn_from(&reg, body("template_category_update", q));
        let t = reg.get("102345678901234:promo:en_US").unwrap();
        assert_eq!(t.object["quality_score"]["score"], "RED");
        assert_eq!(t.category.as_deref(), Some("MARKETING"));
        // By id only.
        let st = json!({"message_template_id": 5, "event": "APPROVED"});
        assert_eq!(
            learn_from(&reg, body("message_template_status_update", st)).len(),
            1
        );
        assert!(reg
            .get("102345678901234:promo:en_US")
            .unwrap()
            .is_approved());
    }

    #[test]
    fn a_components_update_asks_for_a_listing() {
        let reg = Registry::default();
        let v = json!({"message_template_id": 5, "message_template_name": "promo",
            "message_template_language": "en_US", "message_template_element": "New text {{1}}"});
        assert!(learn_from(&reg, body("message_template_components_update", v)).is_empty());
        assert!(reg.take_dirty().contains("102345678901234"));
        assert!(reg.take_dirty().is_empty());
    }

    #[test]
    fn message_webhooks_teach_the_numbers_waba() {
        let reg = Registry::default();
        let recs = learn_from(
            &reg,
            std::fs::read("tests/fixtures/inbound_batched_multi_entry.json").unwrap(),
        );
        assert!(recs.is_empty());
        assert_eq!(
            reg.waba_of("109876543210987").as_deref(),
            Some("102345678901234")
        );
        let configured = Registry::new([("109876543210987", "999")]);
        learn_from(
            &configured,
            std::fs::read("tests/fixtures/inbound_batched_multi_entry.json").unwrap(),
        );
        assert_eq!(
            configured.waba_of("109876543210987").as_deref(),
            Some("999")
        );
    }
}
