//! The `wa.inbound.media` record (DESIGN §13) and the media items of an
//! InboundMessage record.

use serde::Serialize;
use serde_json::Value;

/// Message types that carry a media object.
pub const MEDIA_TYPES: [&str; 5] = ["image", "audio", "video", "document", "sticker"];

/// Meta keeps inbound media ids downloadable for 7 days.
pub const MEDIA_LIFETIME_MS: u64 = 7 * 24 * 3600 * 1000;

/// One media item to fetch, from one InboundMessage record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MediaItem {
    pub event_id: String,
    pub media_id: String,
    /// `image`, `audio`, …
    pub kind: String,
    pub phone_number_id: String,
    pub wa_id: Option<String>,
    pub user_id: Option<String>,
    /// Meta's `timestamp` of the message, in ms.
    pub sent_at_ms: u64,
    /// The webhook's `mime_type`, used when the lookup cannot be made.
    pub mime_type: Option<String>,
}

impl MediaItem {
    /// The `{user}` of the object path: the phone when known, else the BSUID.
    pub fn user(&self) -> &str {
        self.wa_id
            .as_deref()
            .or(self.user_id.as_deref())
            .unwrap_or("unknown")
    }

    /// `event_id media_id`: what a record is recognised by.
    pub fn key(&self) -> String {
        format!("{} {}", self.event_id, self.media_id)
    }
}

/// The media item of an InboundMessage record, if it has one (`None` for
/// text, reactions, …, and for records that are not InboundMessages).
pub fn media_item(record: &[u8]) -> Option<MediaItem> {
    let v: Value = serde_json::from_slice(record).ok()?;
    if v.get("kind").and_then(Value::as_str) != Some("message") {
        return None;
    }
    let msg = v.get("message")?;
    let kind = msg.get("type").and_then(Value::as_str)?;
    if !MEDIA_TYPES.contains(&kind) {
        return None;
    }
    let media = msg.get(kind)?;
    let media_id = media.get("id").and_then(Value::as_str)?;
    let s = |k: &str| v.get(k).and_then(Value::as_str).map(str::to_string);
    let sent_at_ms = v
        .get("timestamp")
        .and_then(|t| t.as_u64().or_else(|| t.as_str()?.parse().ok()))
        .map(|t| t.saturating_mul(1000))
        .or_else(|| v.get("received_at_ms").and_then(Value::as_u64))
        .unwrap_or(0);
    Some(MediaItem {
        event_id: s("event_id")?,
        media_id: media_id.to_string(),
        kind: kind.to_string(),
        phone_number_id: s("phone_number_id")?,
        wa_id: s("wa_id"),
        user_id: s("user_id"),
        sent_at_ms,
        mime_type: media
            .get("mime_type")
            .and_then(Value::as_str)
            .map(str::to_string),
    })
}

/// An item's error, shaped as SendResult's: `{"source":"meta"|"gateway",
/// "code":…,"title":…,"details":…}`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ItemError {
    pub source: &'static str,
    /// Meta's number, or the gateway's code (`expired`,
    /// `checksum_mismatch`, `too_large`, `size_mismatch`,
    /// `retries_exhausted`, `store_failed`, …).
    pub code: Value,
    pub title: String,
    pub details: Option<String>,
}

impl ItemError {
    pub fn gateway(code: &'static str, details: impl Into<String>) -> ItemError {
        ItemError {
            source: "gateway",
            code: code.into(),
            title: code.replace('_', " "),
            details: Some(details.into()),
        }
    }
    pub fn meta(code: i64, title: String) -> ItemError {
        ItemError {
            source: "meta",
            code: code.into(),
            title,
            details: None,
        }
    }
    /// The `reason` label of `wagate_media_fetches_total` (closed set).
    pub fn reason(&self) -> &'static str {
        match (self.source, self.code.as_str(), self.code.as_i64()) {
            ("meta", _, Some(100)) => "not_found",
            ("meta", _, _) => "meta_error",
            (_, Some("expired"), _) => "expired",
            (_, Some("checksum_mismatch"), _) => "checksum_mismatch",
            (_, Some("too_large"), _) => "too_large",
            (_, Some("size_mismatch"), _) => "size_mismatch",
            (_, Some("retries_exhausted"), _) => "retries_exhausted",
            (_, Some("store_failed"), _) => "store_failed",
            _ => "other",
        }
    }
}

/// Every `reason` of a failed fetch.
pub const FAIL_REASONS: [&str; 9] = [
    "not_found",
    "meta_error",
    "expired",
    "checksum_mismatch",
    "too_large",
    "size_mismatch",
    "retries_exhausted",
    "store_failed",
    "other",
];

/// One `wa.inbound.media` record.
#[derive(Debug, Clone, Serialize)]
pub struct MediaRecord {
    pub v: u8,
    pub event_id: String,
    pub media_id: String,
    /// The message type (`image`, …); an addition to DESIGN §13's shape.
    #[serde(rename = "type")]
    pub kind: String,
    pub phone_number_id: String,
    pub wa_id: Option<String>,
    pub user_id: Option<String>,
    pub outcome: &'static str,
    pub mime_type: Option<String>,
    /// Hex.
    pub sha256: Option<String>,
    pub bytes: Option<u64>,
    pub location: Option<String>,
    pub error: Option<ItemError>,
    pub stored_at_ms: u64,
}

impl MediaRecord {
    pub fn stored(
        item: &MediaItem,
        mime_type: String,
        sha256: &[u8; 32],
        bytes: u64,
        location: String,
    ) -> MediaRecord {
        MediaRecord {
            outcome: "stored",
            mime_type: Some(mime_type),
            sha256: Some(hex::encode(sha256)),
            bytes: Some(bytes),
            location: Some(location),
            error: None,
            ..MediaRecord::base(item)
        }
    }

    pub fn failed(item: &MediaItem, error: ItemError) -> MediaRecord {
        MediaRecord {
            outcome: "failed",
            mime_type: item.mime_type.clone(),
            error: Some(error),
            ..MediaRecord::base(item)
        }
    }

    fn base(item: &MediaItem) -> MediaRecord {
        MediaRecord {
            v: 1,
            event_id: item.event_id.clone(),
            media_id: item.media_id.clone(),
            kind: item.kind.clone(),
            phone_number_id: item.phone_number_id.clone(),
            wa_id: item.wa_id.clone(),
            user_id: item.user_id.clone(),
            outcome: "failed",
            mime_type: None,
            sha256: None,
            bytes: None,
            location: None,
            error: None,
            stored_at_ms: crate::clock::now_ms(),
        }
    }
}

/// `event_id media_id` of a `wa.inbound.media` record (for the history).
pub fn record_key(value: &[u8]) -> Option<String> {
    let v: Value = serde_json::from_slice(value).ok()?;
    Some(format!(
        "{} {}",
        v.get("event_id")?.as_str()?,
        v.get("media_id")?.as_str()?
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn items_of_inbound_records() {
        let rec = br#"{"v":1,"event_id":"wamid.A","kind":"message","phone_number_id":"1","wa_id":"155","user_id":"US.1","timestamp":1781600160,"message":{"type":"image","image":{"id":"77","mime_type":"image/jpeg"}}}"#;
        let it = media_item(rec).unwrap();
        assert_eq!(it.media_id, "77");
        assert_eq!(it.user(), "155");
        assert_eq!(it.sent_at_ms, 1_781_600_160_000);
        assert_eq!(it.key(), "wamid.A 77");
        let text = br#"{"v":1,"event_id":"wamid.B","kind":"message","phone_number_id":"1","message":{"type":"text","text":{"body":"hi"}}}"#;
        assert!(media_item(text).is_none());
        let r = MediaRecord::failed(&it, ItemError::gateway("expired", "older than 7 days"));
        let j = serde_json::to_value(&r).unwrap();
        assert_eq!(j["outcome"], "failed");
        assert_eq!(j["error"]["code"], "expired");
        assert_eq!(j["location"], Value::Null);
        assert_eq!(
            record_key(&serde_json::to_vec(&r).unwrap()).unwrap(),
            "wamid.A 77"
        );
        assert_eq!(r.error.unwrap().reason(), "expired");
    }
}
