//! The record shape of `wa.templates` (compacted), which other readers (the
//! CLI, other engineers' planes) rely on:
//!
//! - key: `{waba_id}:{name}:{language}` (UTF-8; split on the first two `:`,
//!   a template name has no `:`);
//! - value: Meta's template object as `GET /{waba_id}/message_templates`
//!   returned it (`id`, `name`, `language`, `status`, `category`,
//!   `components`, `quality_score`, …, unknown fields kept), plus
//!   `"v": 1`, `"waba_id"`, `"updated_at_ms"` (which record wins),
//!   `"listed_at_ms"` (the last complete listing that included it; absent
//!   for a template only a webhook told of) and `"source"` (`refresh`, or
//!   the webhook field that changed it);
//! - a tombstone (null value): the template is gone from its WABA's listing.

use serde_json::{Map, Value};

use super::check::Params;

/// `{waba_id}:{name}:{language}`.
pub fn key_of(waba: &str, name: &str, language: &str) -> String {
    format!("{waba}:{name}:{language}")
}

/// Fields wagate adds to Meta's object.
const OURS: &[&str] = &["v", "waba_id", "updated_at_ms", "listed_at_ms", "source"];

/// One entry of the registry.
#[derive(Debug, Clone, PartialEq)]
pub struct Template {
    pub waba_id: String,
    pub name: String,
    pub language: String,
    /// Meta's id, when known.
    pub id: Option<String>,
    /// `APPROVED`, `PAUSED`, … as Meta writes it.
    pub status: String,
    /// `MARKETING`, `UTILITY`, `AUTHENTICATION`, when known.
    pub category: Option<String>,
    pub updated_at_ms: u64,
    pub listed_at_ms: Option<u64>,
    /// The placeholders of its components (None: components unknown, or a
    /// shape not checked, such as a carousel).
    pub params: Option<Params>,
    /// The whole record value.
    pub object: Map<String, Value>,
}

fn text(o: &Map<String, Value>, k: &str) -> Option<String> {
    match o.get(k)? {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

impl Template {
    /// From a record value (or a Graph object completed with `waba_id` and
    /// the times).
    pub fn from_record(value: &[u8]) -> Option<Template> {
        let v: Value = serde_json::from_slice(value).ok()?;
        let Value::Object(o) = v else { return None };
        Template::from_object(o)
    }

    pub fn from_object(object: Map<String, Value>) -> Option<Template> {
        let name = text(&object, "name")?;
        let language = text(&object, "language")?;
        let waba_id = text(&object, "waba_id")?;
        if name.contains(':') || name.is_empty() || language.is_empty() {
            return None;
        }
        Some(Template {
            waba_id,
            id: text(&object, "id"),
            status: text(&object, "status").unwrap_or_default(),
            category: text(&object, "category"),
            updated_at_ms: object
                .get("updated_at_ms")
                .and_then(Value::as_u64)
                .unwrap_or(0),
            listed_at_ms: object.get("listed_at_ms").and_then(Value::as_u64),
            params: object.get("components").and_then(Params::of_components),
            name,
            language,
            object,
        })
    }

    /// A Graph listing's object as a record of `waba`, listed at `at_ms`.
    pub fn listed(waba: &str, mut object: Map<String, Value>, at_ms: u64) -> Option<Template> {
        object.insert("v".into(), 1.into());
        object.insert("waba_id".into(), waba.into());
        object.insert("updated_at_ms".into(), at_ms.into());
        object.insert("listed_at_ms".into(), at_ms.into());
        object.insert("source".into(), "refresh".into());
        Template::from_object(object)
    }

    pub fn key(&self) -> String {
        key_of(&self.waba_id, &self.name, &self.language)
    }

    pub fn is_approved(&self) -> bool {
        self.status == "APPROVED"
    }

    /// The record value.
    pub fn to_record(&self) -> Vec<u8> {
        serde_json::to_vec(&self.object).unwrap_or_default()
    }

    /// Meta's part of the record is the same (wagate's fields ignored).
    pub fn same_content(&self, other: &Template) -> bool {
        let strip = |o: &Map<String, Value>| -> Map<String, Value> {
            o.iter()
                .filter(|(k, _)| !OURS.contains(&k.as_str()))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect()
        };
        strip(&self.object) == strip(&other.object)
    }

    /// This entry changed by a webhook at `at_ms`: `set` fields of Meta's
    /// object replaced.
    pub fn changed(&self, set: &[(&str, Value)], source: &str, at_ms: u64) -> Option<Template> {
        let mut o = self.object.clone();
        for (k, v) in set {
            o.insert((*k).to_string(), v.clone());
        }
        o.insert("updated_at_ms".into(), at_ms.into());
        o.insert("source".into(), source.into());
        Template::from_object(o)
    }

    /// A template only a webhook told of (no components known).
    pub fn from_webhook(
        waba: &str,
        name: &str,
        language: &str,
        id: Option<&str>,
        set: &[(&str, Value)],
        source: &str,
        at_ms: u64,
    ) -> Option<Template> {
        let mut o = Map::new();
        o.insert("v".into(), 1.into());
        o.insert("waba_id".into(), waba.into());
        o.insert("name".into(), name.into());
        o.insert("language".into(), language.into());
        if let Some(id) = id {
            o.insert("id".into(), id.into());
        }
        let base = Template::from_object(o)?;
        base.changed(set, source, at_ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_and_compare_without_our_fields() {
        let o: Map<String, Value> = serde_json::from_value(serde_json::json!({
            "id": "1", "name": "order_shipped", "language": "en_US", "status": "APPROVED",
            "category": "UTILITY",
            "components": [{"type": "BODY", "text": "Hi {{1}}, order {{2}}"}]
        }))
        .unwrap();
        let t = Template::listed("77", o.clone(), 10).unwrap();
        assert_eq!(t.key(), "77:order_shipped:en_US");
        assert_eq!(t.params.as_ref().unwrap().body, 2);
        let back = Template::from_record(&t.to_record()).unwrap();
        assert_eq!(back, t);
        let later = Template::listed("77", o, 20).unwrap();
        assert!(later.same_content(&t));
        let paused = t
            .changed(
                &[("status", "PAUSED".into())],
                "message_template_status_update",
                30,
            )
            .unwrap();
        assert!(!paused.same_content(&t));
        assert_eq!(paused.listed_at_ms, Some(10));
        assert!(!paused.is_approved());
        assert!(
            Template::from_record(b"{\"name\":\"a:b\",\"language\":\"x\",\"waba_id\":\"1\"}")
                .is_none()
        );
    }
}
