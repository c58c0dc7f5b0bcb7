//! Webhook fan-out: one verified POST body → one record per event.
//!
//! Every `entry[] × changes[] × {messages[], statuses[], errors[]}` item, and
//! every change of any other field, becomes exactly one [`Event`] whose value
//! is the record shape of DESIGN §5, carrying Meta's own object unchanged
//! (re-encoded as UTF-8 JSON). Unknown fields, unknown message types and
//! unknown keys pass through: nothing Meta sends is rejected for being new.
//!
//! simd-json rewrites the buffer it parses, so callers hand this module a
//! *copy* of the verified bytes (see `ingress`).

use serde::Serialize;
use sha2::{Digest, Sha256};
use simd_json::prelude::*;
use simd_json::BorrowedValue;

/// Which topic an event goes to (names are resolved with the prefix by the
/// caller).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Topic {
    Messages,
    Statuses,
    Events,
    /// `wa.consent` (compacted), written by the contacts plane.
    Consent,
    /// `wa.windows` (compacted), written by the contacts plane.
    Windows,
}

impl Topic {
    pub fn name(self) -> &'static str {
        match self {
            Topic::Messages => "inbound.messages",
            Topic::Statuses => "inbound.statuses",
            Topic::Events => "inbound.events",
            Topic::Consent => "consent",
            Topic::Windows => "windows",
        }
    }
}

/// One record to produce.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    pub topic: Topic,
    /// phone_number_id, else the WABA id.
    pub key: String,
    /// Dedupe key: the wamid for messages, `wamid:status` for statuses, a
    /// stable hash for everything else.
    pub event_id: String,
    /// `message`, `status`, `error`, or the webhook field name.
    pub kind: String,
    /// The JSON record (DESIGN §5).
    pub value: Vec<u8>,
    /// For inbound messages: the user and the message time (Unix seconds),
    /// which open the 24-hour customer service window.
    pub inbound: Option<(String, i64)>,
    /// For inbound messages: the text a user typed or tapped (text body, or a
    /// quick-reply button's text), for opt-out/opt-in keywords.
    pub text: Option<String>,
    /// For inbound messages: the payload of a tapped button (template
    /// quick reply `button.payload`, interactive `button_reply.id` or
    /// `list_reply.id`), for configured opt-out/opt-in payloads.
    pub payload: Option<String>,
    /// For `user_preferences` changes: (wa_id, marketing stopped?).
    pub preferences: Vec<(String, bool)>,
}

/// The body is not a webhook envelope we can walk.
#[derive(Debug, thiserror::Error)]
pub enum ParseError {
    #[error("body is not valid JSON: {0}")]
    Json(String),
    #[error("body is JSON but not a webhook envelope: {0}")]
    Shape(&'static str),
}

/// Context shared by every record of one POST.
#[derive(Debug, Clone, Copy)]
pub struct Context<'a> {
    pub app: &'a str,
    pub received_at_ms: u64,
}

#[derive(Serialize)]
struct InboundMessage<'a, 'v> {
    v: u8,
    event_id: &'a str,
    kind: &'static str,
    app: &'a str,
    waba_id: &'a str,
    phone_number_id: Option<&'a str>,
    display_phone_number: Option<&'a str>,
    wa_id: Option<&'a str>,
    profile_name: Option<&'a str>,
    timestamp: Option<i64>,
    received_at_ms: u64,
    message: &'a BorrowedValue<'v>,
}

#[derive(Serialize)]
struct StatusEvent<'a, 'v> {
    v: u8,
    event_id: &'a str,
    kind: &'static str,
    app: &'a str,
    waba_id: &'a str,
    phone_number_id: Option<&'a str>,
    recipient_id: Option<&'a str>,
    status: Option<&'a str>,
    rank: u8,
    timestamp: Option<i64>,
    received_at_ms: u64,
    request_id: Option<&'a str>,
    errors: Option<&'a BorrowedValue<'v>>,
    status_object: &'a BorrowedValue<'v>,
}

#[derive(Serialize)]
struct OtherEvent<'a, 'v> {
    v: u8,
    event_id: &'a str,
    kind: &'a str,
    app: &'a str,
    waba_id: &'a str,
    phone_number_id: Option<&'a str>,
    received_at_ms: u64,
    value: &'a BorrowedValue<'v>,
}

/// Monotonic rank of a status, so consumers can merge out-of-order statuses:
/// sent 1, delivered 2, read 3, played 4, failed 9; anything new is 0.
pub fn status_rank(status: &str) -> u8 {
    match status {
        "sent" => 1,
        "delivered" => 2,
        "read" => 3,
        "played" => 4,
        "failed" => 9,
        _ => 0,
    }
}

fn str_field<'a>(v: &'a BorrowedValue<'_>, key: &str) -> Option<&'a str> {
    v.get(key).and_then(|x| x.as_str())
}

/// Meta sends timestamps as strings of Unix seconds; accept numbers too.
fn timestamp(v: &BorrowedValue<'_>) -> Option<i64> {
    let t = v.get("timestamp")?;
    t.as_i64()
        .or_else(|| t.as_str().and_then(|s| s.parse().ok()))
}

/// A stable id for an event that has no id of its own: SHA-256 over the
/// WABA id, the kind and the value's canonical encoding, as 32 hex digits.
fn stable_hash(waba_id: &str, kind: &str, value: &BorrowedValue<'_>) -> String {
    let mut h = Sha256::new();
    h.update(waba_id.as_bytes());
    h.update([0]);
    h.update(kind.as_bytes());
    h.update([0]);
    h.update(simd_json::to_vec(value).unwrap_or_default());
    let d = h.finalize();
    hex::encode(&d[..16])
}

/// `user_preferences` changes: `value.user_preferences[]` items with
/// `category: marketing_messages` and `value: stop|resume`.
fn user_preferences(field: &str, value: &BorrowedValue<'_>) -> Vec<(String, bool)> {
    if field != "user_preferences" {
        return Vec::new();
    }
    let Some(items) = value.get("user_preferences").and_then(|v| v.as_array()) else {
        return Vec::new();
    };
    items
        .iter()
        .filter(|p| str_field(p, "category").is_none_or(|c| c == "marketing_messages"))
        .filter_map(|p| {
            let wa_id = str_field(p, "wa_id")?;
            match str_field(p, "value")? {
                "stop" => Some((wa_id.to_string(), true)),
                "resume" => Some((wa_id.to_string(), false)),
                _ => None,
            }
        })
        .collect()
}

fn encode<T: Serialize>(t: &T) -> Vec<u8> {
    // Serializing our own structs of parsed values cannot fail.
    simd_json::to_vec(t).expect("record encoding")
}

/// Parses `buf` (a copy of the body; it is modified in place) and returns
/// every event of the POST, in body order.
pub fn fan_out(buf: &mut [u8], ctx: Context<'_>) -> Result<Vec<Event>, ParseError> {
    let root = simd_json::to_borrowed_value(buf).map_err(|e| ParseError::Json(e.to_string()))?;
    fan_out_value(&root, ctx)
}

/// As [`fan_out`], over an already parsed body.
pub fn fan_out_value(root: &BorrowedValue<'_>, ctx: Context<'_>) -> Result<Vec<Event>, ParseError> {
    if !root.is_object() {
        return Err(ParseError::Shape("top level is not an object"));
    }
    let entries = root
        .get("entry")
        .and_then(|e| e.as_array())
        .ok_or(ParseError::Shape("no entry array"))?;
    let mut out = Vec::new();
    for entry in entries {
        let waba_id = str_field(entry, "id").unwrap_or("");
        let Some(changes) = entry.get("changes").and_then(|c| c.as_array()) else {
            continue;
        };
        for change in changes {
            let field = str_field(change, "field").unwrap_or("unknown");
            let Some(value) = change.get("value") else {
                continue;
            };
            fan_out_change(&mut out, ctx, waba_id, field, value);
        }
    }
    Ok(out)
}

fn fan_out_change(
    out: &mut Vec<Event>,
    ctx: Context<'_>,
    waba_id: &str,
    field: &str,
    value: &BorrowedValue<'_>,
) {
    let metadata = value.get("metadata");
    let phone_number_id = metadata.and_then(|m| str_field(m, "phone_number_id"));
    let display = metadata.and_then(|m| str_field(m, "display_phone_number"));
    let key = phone_number_id.unwrap_or(waba_id).to_string();
    let mut produced = false;

    if field == "messages" {
        let contacts = value.get("contacts").and_then(|c| c.as_array());
        if let Some(messages) = value.get("messages").and_then(|m| m.as_array()) {
            for msg in messages {
                produced = true;
                let from = str_field(msg, "from");
                // The contact for this sender, else the first (system messages have none).
                let contact = contacts.and_then(|cs| {
                    cs.iter()
                        .find(|c| from.is_some() && str_field(c, "wa_id") == from)
                        .or_else(|| cs.first())
                });
                let wa_id = from.or_else(|| contact.and_then(|c| str_field(c, "wa_id")));
                let profile_name = contact
                    .and_then(|c| c.get("profile"))
                    .and_then(|p| str_field(p, "name"));
                let event_id = match str_field(msg, "id") {
                    Some(id) => id.to_string(),
                    None => stable_hash(waba_id, "message", msg),
                };
                let rec = InboundMessage {
                    v: 1,
                    event_id: &event_id,
                    kind: "message",
                    app: ctx.app,
                    waba_id,
                    phone_number_id,
                    display_phone_number: display,
                    wa_id,
                    profile_name,
                    timestamp: timestamp(msg),
                    received_at_ms: ctx.received_at_ms,
                    message: msg,
                };
                let inbound = wa_id.zip(timestamp(msg)).map(|(w, t)| (w.to_string(), t));
                let text = msg
                    .get("text")
                    .and_then(|t| str_field(t, "body"))
                    .or_else(|| msg.get("button").and_then(|b| str_field(b, "text")))
                    .map(str::to_string);
                let payload = msg
                    .get("button")
                    .and_then(|b| str_field(b, "payload"))
                    .or_else(|| {
                        msg.get("interactive").and_then(|i| {
                            ["button_reply", "list_reply"]
                                .iter()
                                .find_map(|k| i.get(*k).and_then(|r| str_field(r, "id")))
                        })
                    })
                    .map(str::to_string);
                out.push(Event {
                    topic: Topic::Messages,
                    key: key.clone(),
                    value: encode(&rec),
                    event_id,
                    kind: "message".into(),
                    inbound,
                    text,
                    payload,
                    preferences: Vec::new(),
                });
            }
        }
        if let Some(statuses) = value.get("statuses").and_then(|s| s.as_array()) {
            for st in statuses {
                produced = true;
                let status = str_field(st, "status");
                let event_id = match str_field(st, "id") {
                    Some(id) => format!("{id}:{}", status.unwrap_or("")),
                    None => stable_hash(waba_id, "status", st),
                };
                let rec = StatusEvent {
                    v: 1,
                    event_id: &event_id,
                    kind: "status",
                    app: ctx.app,
                    waba_id,
                    phone_number_id,
                    recipient_id: str_field(st, "recipient_id"),
                    status,
                    rank: status.map(status_rank).unwrap_or(0),
                    timestamp: timestamp(st),
                    received_at_ms: ctx.received_at_ms,
                    request_id: str_field(st, "biz_opaque_callback_data"),
                    errors: st.get("errors"),
                    status_object: st,
                };
                out.push(Event {
                    topic: Topic::Statuses,
                    key: key.clone(),
                    value: encode(&rec),
                    event_id,
                    kind: "status".into(),
                    inbound: None,
                    text: None,
                    payload: None,
                    preferences: Vec::new(),
                });
            }
        }
        if let Some(errors) = value.get("errors").and_then(|e| e.as_array()) {
            for err in errors {
                produced = true;
                let event_id = stable_hash(waba_id, "error", err);
                let rec = OtherEvent {
                    v: 1,
                    event_id: &event_id,
                    kind: "error",
                    app: ctx.app,
                    waba_id,
                    phone_number_id,
                    received_at_ms: ctx.received_at_ms,
                    value: err,
                };
                out.push(Event {
                    topic: Topic::Events,
                    key: key.clone(),
                    value: encode(&rec),
                    event_id,
                    kind: "error".into(),
                    inbound: None,
                    text: None,
                    payload: None,
                    preferences: Vec::new(),
                });
            }
        }
    }

    if !produced {
        // Any other field (templates, quality, account, user_preferences, and
        // fields Meta adds tomorrow), or a `messages` change with none of the
        // three arrays: one record for the whole change.
        let event_id = stable_hash(waba_id, field, value);
        let rec = OtherEvent {
            v: 1,
            event_id: &event_id,
            kind: field,
            app: ctx.app,
            waba_id,
            phone_number_id,
            received_at_ms: ctx.received_at_ms,
            value,
        };
        out.push(Event {
            topic: Topic::Events,
            key,
            value: encode(&rec),
            event_id,
            kind: field.to_string(),
            inbound: None,
            text: None,
            payload: None,
            preferences: user_preferences(field, value),
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    const CTX: Context<'static> = Context {
        app: "default",
        received_at_ms: 1_781_600_999_000,
    };

    fn fixture(name: &str) -> Vec<u8> {
        let path = format!("{}/tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"));
        std::fs::read(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
    }

    fn run(name: &str) -> Vec<(Event, Value)> {
        let mut buf = fixture(name);
        fan_out(&mut buf, CTX)
            .unwrap()
            .into_iter()
            .map(|e| {
                let v: Value = serde_json::from_slice(&e.value).unwrap();
                assert_eq!(v["v"], 1);
                assert_eq!(v["event_id"], e.event_id.as_str());
                assert_eq!(v["kind"], e.kind.as_str());
                assert_eq!(v["app"], "default");
                assert_eq!(v["received_at_ms"], 1_781_600_999_000u64);
                (e, v)
            })
            .collect()
    }

    fn original(name: &str) -> Value {
        serde_json::from_slice(&fixture(name)).unwrap()
    }

    #[test]
    fn every_inbound_message_kind_is_one_record_with_the_object_unchanged() {
        for name in [
            "inbound_text.json",
            "inbound_image.json",
            "inbound_audio_voice.json",
            "inbound_interactive_button_reply.json",
            "inbound_interactive_list_reply.json",
            "inbound_button_template_quick_reply.json",
            "inbound_reaction.json",
            "inbound_location.json",
            "inbound_order.json",
            "inbound_system_user_changed_number.json",
            "inbound_unsupported_131051.json",
        ] {
            let recs = run(name);
            assert_eq!(recs.len(), 1, "{name}");
            let (e, v) = &recs[0];
            let orig = original(name);
            let value = &orig["entry"][0]["changes"][0]["value"];
            let msg = &value["messages"][0];
            assert_eq!(e.topic, Topic::Messages, "{name}");
            assert_eq!(e.kind, "message");
            assert_eq!(e.event_id, msg["id"].as_str().unwrap());
            assert_eq!(
                e.key,
                value["metadata"]["phone_number_id"].as_str().unwrap()
            );
            assert_eq!(
                &v["message"], msg,
                "{name}: message object must be unchanged"
            );
            assert_eq!(v["waba_id"], orig["entry"][0]["id"]);
            assert_eq!(v["phone_number_id"], value["metadata"]["phone_number_id"]);
            assert_eq!(
                v["display_phone_number"],
                value["metadata"]["display_phone_number"]
            );
            assert_eq!(v["wa_id"], msg["from"]);
            let ts: i64 = msg["timestamp"].as_str().unwrap().parse().unwrap();
            assert_eq!(v["timestamp"], ts);
            assert_eq!(
                e.inbound,
                Some((msg["from"].as_str().unwrap().to_string(), ts))
            );
            if value.get("contacts").is_some() {
                assert_eq!(
                    v["profile_name"], value["contacts"][0]["profile"]["name"],
                    "{name}"
                );
            } else {
                assert_eq!(v["profile_name"], Value::Null, "{name}");
            }
        }
    }

    #[test]
    fn text_survives_unicode() {
        let recs = run("inbound_text.json");
        assert_eq!(
            recs[0].0.text.as_deref(),
            Some("Olá! Is order #4471 shipped? Preço: R$ 59,90 🙂")
        );
        let quick = run("inbound_button_template_quick_reply.json");
        assert_eq!(quick[0].0.text.as_deref(), Some("Stop promotions"));
        assert_eq!(quick[0].0.payload.as_deref(), Some("OPT_OUT_MARKETING"));
        let button = run("inbound_interactive_button_reply.json");
        assert_eq!(
            button[0].0.payload.as_deref(),
            Some("confirm_delivery_4471")
        );
        let list = run("inbound_interactive_list_reply.json");
        assert_eq!(list[0].0.payload.as_deref(), Some("slot_2026_06_18_1400"));
        assert_eq!(recs[0].0.payload, None);
        assert_eq!(
            recs[0].1["message"]["text"]["body"],
            "Olá! Is order #4471 shipped? Preço: R$ 59,90 🙂"
        );
    }

    #[test]
    fn statuses_have_rank_request_id_and_object() {
        for (name, status, rank) in [
            ("status_sent.json", "sent", 1),
            ("status_delivered.json", "delivered", 2),
            ("status_read.json", "read", 3),
            ("status_failed_131047.json", "failed", 9),
            ("status_failed_131049.json", "failed", 9),
        ] {
            let recs = run(name);
            assert_eq!(recs.len(), 1, "{name}");
            let (e, v) = &recs[0];
            let orig = original(name);
            let st = &orig["entry"][0]["changes"][0]["value"]["statuses"][0];
            assert_eq!(e.topic, Topic::Statuses);
            assert_eq!(
                e.event_id,
                format!("{}:{status}", st["id"].as_str().unwrap())
            );
            assert_eq!(v["status"], status);
            assert_eq!(v["rank"], rank, "{name}");
            assert_eq!(v["recipient_id"], st["recipient_id"]);
            assert_eq!(&v["status_object"], st);
            assert_eq!(
                v["request_id"],
                st.get("biz_opaque_callback_data")
                    .cloned()
                    .unwrap_or(Value::Null),
                "{name}"
            );
            if status == "failed" {
                assert_eq!(v["errors"], st["errors"]);
                assert!(v["errors"][0]["code"].is_number());
            } else {
                assert_eq!(v["errors"], Value::Null);
            }
        }
        let recs = run("status_sent.json");
        assert_eq!(recs[0].1["request_id"], "job=8f2c1e7a;attempt=1");
    }

    #[test]
    fn batched_multi_entry_fans_out_every_event_with_right_topic_and_key() {
        let recs = run("inbound_batched_multi_entry.json");
        let got: Vec<(Topic, &str, &str)> = recs
            .iter()
            .map(|(e, _)| (e.topic, e.key.as_str(), e.event_id.as_str()))
            .collect();
        assert_eq!(
            got,
            vec![
                (
                    Topic::Messages,
                    "109876543210987",
                    "wamid.HBgLMTQxNTU1NTAxMjMVAgASGBQzRUIwMDAwMDAwMDAwMDAwMDAxAA=="
                ),
                (
                    Topic::Messages,
                    "109876543210987",
                    "wamid.HBgLMTQxNTU1NTAxMjMVAgASGBQzRUIwMDAwMDAwMDAwMDAwMDAyAA=="
                ),
                (
                    Topic::Statuses,
                    "109876543210987",
                    "wamid.HBgLMTQxNTU1NTAxMjMVAgARGBJBMDk0RDNFNzI2QzhGMTVCMjEA:read"
                ),
                (
                    Topic::Statuses,
                    "110022334455667",
                    "wamid.HBgLMTQxNTU1NTAxNTUVAgARGBJDQzExMjIzMzQ0NTU2Njc3ODgA:delivered"
                ),
            ]
        );
        assert_eq!(recs[3].1["waba_id"], "109988776655443");
        assert_eq!(recs[0].1["message"]["text"]["body"], "first");
        assert_eq!(recs[1].1["message"]["text"]["body"], "second");
    }

    #[test]
    fn other_fields_are_one_event_each_with_value_unchanged() {
        for (name, field) in [
            (
                "message_template_status_update.json",
                "message_template_status_update",
            ),
            (
                "phone_number_quality_update.json",
                "phone_number_quality_update",
            ),
            ("account_update_restriction.json", "account_update"),
        ] {
            let recs = run(name);
            assert_eq!(recs.len(), 1, "{name}");
            let (e, v) = &recs[0];
            let orig = original(name);
            assert_eq!(e.topic, Topic::Events);
            assert_eq!(e.kind, field);
            assert_eq!(
                e.key,
                orig["entry"][0]["id"].as_str().unwrap(),
                "keyed by WABA id"
            );
            assert_eq!(v["value"], orig["entry"][0]["changes"][0]["value"]);
            assert_eq!(e.event_id.len(), 32);
        }
    }

    #[test]
    fn value_level_errors_and_user_preferences() {
        let body = br#"{"object":"whatsapp_business_account","entry":[{"id":"1","changes":[{"field":"messages","value":{"messaging_product":"whatsapp","metadata":{"display_phone_number":"1","phone_number_id":"109876543210987"},"errors":[{"code":130429,"title":"Rate limit hit","message":"Rate limit hit","error_data":{"details":"x"}},{"code":131000,"title":"x"}]}},{"field":"user_preferences","value":{"messaging_product":"whatsapp","metadata":{"display_phone_number":"1","phone_number_id":"109876543210987"},"user_preferences":[{"wa_id":"14155550123","detail":"d","category":"marketing_messages","value":"stop","timestamp":1781600000}]}}]}]}"#;
        let mut buf = body.to_vec();
        let evs = fan_out(&mut buf, CTX).unwrap();
        assert_eq!(evs.len(), 3);
        assert_eq!(evs[0].kind, "error");
        assert_eq!(evs[1].kind, "error");
        assert_ne!(evs[0].event_id, evs[1].event_id);
        assert_eq!(evs[2].kind, "user_preferences");
        assert_eq!(evs[2].key, "109876543210987");
        assert_eq!(evs[2].preferences, vec![("14155550123".to_string(), true)]);
        let v: Value = serde_json::from_slice(&evs[0].value).unwrap();
        assert_eq!(v["value"]["code"], 130429);
        assert_eq!(v["phone_number_id"], "109876543210987");
    }

    #[test]
    fn unknown_types_and_fields_pass_through() {
        let body = br#"{"object":"whatsapp_business_account","entry":[{"id":"9","changes":[{"field":"messages","value":{"metadata":{"phone_number_id":"5"},"messages":[{"from":"1","id":"wamid.X","timestamp":"1","type":"hologram","hologram":{"depth":3},"brand_new_key":[1,2]}]}},{"field":"calls_2027","value":{"anything":{"goes":true}}}]}]}"#;
        let mut buf = body.to_vec();
        let evs = fan_out(&mut buf, CTX).unwrap();
        assert_eq!(evs.len(), 2);
        let v: Value = serde_json::from_slice(&evs[0].value).unwrap();
        assert_eq!(v["message"]["hologram"]["depth"], 3);
        assert_eq!(v["message"]["brand_new_key"][1], 2);
        assert_eq!(evs[1].kind, "calls_2027");
        assert_eq!(evs[1].key, "9");
    }

    #[test]
    fn stable_ids_do_not_depend_on_batching_or_receipt_time() {
        let a = br#"{"entry":[{"id":"9","changes":[{"field":"account_update","value":{"event":"X"}}]}]}"#;
        let b = br#"{"entry":[{"id":"7","changes":[{"field":"messages","value":{"metadata":{"phone_number_id":"5"},"messages":[{"id":"wamid.Q","from":"1"}]}}]},{"id":"9","changes":[{"field":"account_update","value":{"event":"X"}}]}]}"#;
        let ea = fan_out(&mut a.to_vec(), CTX).unwrap();
        let later = Context {
            app: "default",
            received_at_ms: 5,
        };
        let eb = fan_out(&mut b.to_vec(), later).unwrap();
        assert_eq!(ea[0].event_id, eb[1].event_id);
        let c = br#"{"entry":[{"id":"9","changes":[{"field":"account_update","value":{"event":"Y"}}]}]}"#;
        assert_ne!(
            ea[0].event_id,
            fan_out(&mut c.to_vec(), CTX).unwrap()[0].event_id
        );
    }

    #[test]
    fn bad_bodies_are_parse_errors() {
        for b in [
            &b"not json"[..],
            b"[1,2]",
            b"{\"object\":\"x\"}",
            b"{\"entry\":5}",
            b"",
        ] {
            assert!(
                fan_out(&mut b.to_vec(), CTX).is_err(),
                "{:?}",
                String::from_utf8_lossy(b)
            );
        }
        // An envelope with no events is valid and yields nothing.
        assert!(fan_out(&mut b"{\"entry\":[]}".to_vec(), CTX)
            .unwrap()
            .is_empty());
    }

    #[test]
    fn signature_vector_body_fans_out() {
        let v: Value = serde_json::from_slice(&fixture("signature_test_vector.json")).unwrap();
        let mut body = v["raw_body"].as_str().unwrap().as_bytes().to_vec();
        let evs = fan_out(&mut body, CTX).unwrap();
        assert_eq!(evs.len(), 1);
        let r: Value = serde_json::from_slice(&evs[0].value).unwrap();
        assert_eq!(r["message"]["text"]["body"], "café 😀 https://example.com");
        assert_eq!(r["profile_name"], "João Pereira");
    }
}
