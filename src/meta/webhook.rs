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

use std::borrow::Cow;

use serde::Serialize;
use sha2::{Digest, Sha256};
use simd_json::prelude::*;
use simd_json::BorrowedValue;

use super::identity::{IdChange, User};
use super::scan::ScanError;

/// What an event is: an inbound message, a status, or anything else (an
/// other field's change, a value-level error). The caller maps it to a
/// topic; `meta` names none.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Class {
    Message,
    Status,
    Other,
}

/// One record to produce.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    pub class: Class,
    /// phone_number_id, else the WABA id.
    pub key: String,
    /// Dedupe key: the wamid for messages, `wamid:status` for statuses, a
    /// stable hash for everything else.
    pub event_id: String,
    /// `message`, `status`, `error`, or the webhook field name.
    pub kind: String,
    /// The JSON record (DESIGN §5).
    pub value: Vec<u8>,
    /// For inbound messages: the user (phone, BSUID, or both) and the
    /// message time (Unix seconds), which open the 24-hour customer service
    /// window. System messages are not the user writing: None.
    pub inbound: Option<(User, i64)>,
    /// For inbound messages: the text a user typed or tapped (text body, or a
    /// quick-reply button's text), for opt-out/opt-in keywords.
    pub text: Option<String>,
    /// For inbound messages: the payload of a tapped button (template
    /// quick reply `button.payload`, interactive `button_reply.id` or
    /// `list_reply.id`), for configured opt-out/opt-in payloads.
    pub payload: Option<String>,
    /// For `user_preferences` changes: (the user, marketing stopped?).
    pub preferences: Vec<(User, bool)>,
    /// A status's recipient when Meta names both a phone and a BSUID: the
    /// two are one person (messages carry theirs in `inbound`).
    pub seen: Option<User>,
    /// A change of the user's ids (`user_changed_number`,
    /// `user_changed_user_id`, legacy `user_id_update`).
    pub change: Option<IdChange>,
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
    user_id: Option<&'a str>,
    parent_user_id: Option<&'a str>,
    username: Option<&'a str>,
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
    recipient_user_id: Option<&'a str>,
    recipient_parent_user_id: Option<&'a str>,
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
/// `category: marketing_messages` and `value: stop|resume`, each naming the
/// user by `wa_id`, `user_id` (BSUID), or both.
fn user_preferences(field: &str, value: &BorrowedValue<'_>) -> Vec<(User, bool)> {
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
            let user = User::from_fields(
                str_field(p, "wa_id"),
                str_field(p, "user_id"),
                str_field(p, "parent_user_id"),
            )?;
            match str_field(p, "value")? {
                "stop" => Some((user, true)),
                "resume" => Some((user, false)),
                _ => None,
            }
        })
        .collect()
}

/// The id change a system message (or the legacy `user_id_update` value)
/// reports: the ids before and after.
fn id_change(system: &BorrowedValue<'_>, from: Option<&str>) -> Option<IdChange> {
    let kind = str_field(system, "type")?;
    if kind != "user_changed_number" && kind != "user_changed_user_id" {
        return None;
    }
    let previous = User::from_fields(
        from.filter(|_| kind == "user_changed_number"),
        str_field(system, "previous_user_id"),
        str_field(system, "previous_parent_user_id"),
    )?;
    let current = User::from_fields(
        str_field(system, "wa_id").filter(|_| kind == "user_changed_number"),
        str_field(system, "user_id"),
        str_field(system, "parent_user_id"),
    )?;
    Some(IdChange { previous, current })
}

/// The legacy `user_id_update` field: `user_id: {previous, current}`.
fn user_id_update(field: &str, value: &BorrowedValue<'_>) -> Option<IdChange> {
    if field != "user_id_update" {
        return None;
    }
    let ids = value.get("user_id")?;
    let wa_id = str_field(value, "wa_id");
    Some(IdChange {
        previous: User::from_fields(wa_id, str_field(ids, "previous"), None)?,
        current: User::from_fields(wa_id, str_field(ids, "current"), None)?,
    })
}

fn encode<T: Serialize>(t: &T) -> Vec<u8> {
    // Serializing our own structs of parsed values cannot fail.
    simd_json::to_vec(t).expect("record encoding")
}

/// Why a signed body is not exploded into records. The body is not lost: the
/// caller keeps it byte for byte on the raw topic and answers 200 (a retry
/// would not change it).
#[derive(Debug, thiserror::Error)]
pub enum ParseError {
    /// The parser's message is not used: it can quote bytes of the body.
    #[error("body is not valid JSON (at byte {0})")]
    Json(usize),
    #[error("body is JSON but not a webhook envelope: {0}")]
    Shape(&'static str),
    #[error(transparent)]
    Scan(#[from] ScanError),
    #[error("an id that would become a Kafka key or header is unusable: {0}")]
    BadId(&'static str),
}

impl ParseError {
    /// Every [`ParseError::reason`], for metrics.
    pub const REASONS: &'static [&'static str] =
        &["json", "shape", "too_deep", "lone_surrogate", "bad_id"];

    /// A closed label for metrics and the raw record's header.
    pub fn reason(&self) -> &'static str {
        match self {
            ParseError::Json(_) => "json",
            ParseError::Shape(_) => "shape",
            ParseError::Scan(ScanError::TooDeep(_)) => "too_deep",
            ParseError::Scan(ScanError::LoneSurrogate(_)) => "lone_surrogate",
            ParseError::BadId(_) => "bad_id",
        }
    }
}

/// Bounds on what one POST may become (`ingress.max_json_depth`,
/// `ingress.max_events_per_post`, `ingress.max_record_bytes_factor`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Deepest nesting of `[` / `{` accepted (real webhooks stay under 12).
    pub max_depth: usize,
    /// Most events (messages, statuses, errors, other changes) in one POST.
    pub max_events: usize,
    /// The records of a POST may total at most this many bytes per body
    /// byte, plus [`Limits::RECORD_BYTES_FLOOR`].
    pub record_bytes_factor: usize,
}

impl Limits {
    /// Record bytes every POST may use whatever its size.
    pub const RECORD_BYTES_FLOOR: usize = 1 << 20;

    pub const DEFAULT: Limits = Limits {
        max_depth: 64,
        max_events: 2_000,
        record_bytes_factor: 4,
    };

    /// The record bytes a body of `body_len` bytes may become.
    pub fn max_record_bytes(&self, body_len: usize) -> usize {
        body_len
            .saturating_mul(self.record_bytes_factor)
            .saturating_add(Self::RECORD_BYTES_FLOOR)
    }
}

/// A POST past one of the [`Limits`]: kept raw, answered 200, counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OverLimit {
    Events,
    RecordBytes,
}

impl OverLimit {
    pub const ALL: [OverLimit; 2] = [OverLimit::Events, OverLimit::RecordBytes];

    pub fn label(self) -> &'static str {
        match self {
            OverLimit::Events => "events",
            OverLimit::RecordBytes => "record_bytes",
        }
    }
}

/// Scans `buf` (see [`scan`](super::scan)) and parses it in place. `buf` is a
/// copy of the body: simd-json rewrites it.
pub fn parse(buf: &mut [u8], max_depth: usize) -> Result<BorrowedValue<'_>, ParseError> {
    super::scan::scan(buf, max_depth)?;
    simd_json::to_borrowed_value(buf).map_err(|e| ParseError::Json(e.index()))
}

/// Checks a parsed body's envelope and ids and measures what it would become,
/// without encoding a record: `Ok(Ok(events))`, or `Ok(Err(limit))` when it
/// is past a limit.
pub fn plan(
    root: &BorrowedValue<'_>,
    ctx: Context<'_>,
    body_len: usize,
    limits: &Limits,
) -> Result<Result<usize, OverLimit>, ParseError> {
    // A count from array lengths first: it costs one step per change, so a
    // body of a million tiny events is refused before any is looked at.
    let mut events = 0usize;
    for change in changes(entries(root)?) {
        events += match (change.field, change.value) {
            (_, None) => 0,
            ("messages", Some(v)) => {
                let n = ["messages", "statuses", "errors"]
                    .iter()
                    .filter_map(|k| v.get(*k).and_then(|a| a.as_array()))
                    .map(|a| a.len())
                    .sum::<usize>();
                n.max(1)
            }
            (_, Some(_)) => 1,
        };
        if events > limits.max_events {
            return Ok(Err(OverLimit::Events));
        }
    }
    let mut bytes = body_len;
    walk(root, ctx, &mut |rec| {
        bytes = bytes.saturating_add(rec.envelope_len());
        true
    })?;
    if bytes > limits.max_record_bytes(body_len) {
        return Ok(Err(OverLimit::RecordBytes));
    }
    Ok(Ok(events))
}

/// Calls `each` with every event of a parsed body, in body order, encoding
/// one record at a time (the caller can produce it and drop it before the
/// next is made); `each` returns false to stop.
pub fn for_each_event(
    root: &BorrowedValue<'_>,
    ctx: Context<'_>,
    each: &mut dyn FnMut(Event) -> bool,
) -> Result<(), ParseError> {
    walk(root, ctx, &mut |rec| each(rec.into_event()))
}

/// Parses `buf` (a copy of the body; it is modified in place) and returns
/// every event of the POST, in body order, under the default depth limit
/// and without the size limits (tests and benches).
pub fn fan_out(buf: &mut [u8], ctx: Context<'_>) -> Result<Vec<Event>, ParseError> {
    let root = parse(buf, Limits::DEFAULT.max_depth)?;
    fan_out_value(&root, ctx)
}

/// As [`fan_out`], over an already parsed body.
pub fn fan_out_value(root: &BorrowedValue<'_>, ctx: Context<'_>) -> Result<Vec<Event>, ParseError> {
    let mut out = Vec::new();
    for_each_event(root, ctx, &mut |e| {
        out.push(e);
        true
    })?;
    Ok(out)
}

/// The `entry` array of a webhook envelope.
fn entries<'a, 'v>(root: &'a BorrowedValue<'v>) -> Result<&'a [BorrowedValue<'v>], ParseError> {
    if !root.is_object() {
        return Err(ParseError::Shape("top level is not an object"));
    }
    // Another product's webhook (a Page, Instagram) on the same callback URL
    // is not exploded as if it were WhatsApp's.
    if let Some(o) = root.get("object") {
        if o.as_str() != Some("whatsapp_business_account") {
            return Err(ParseError::Shape("object is not whatsapp_business_account"));
        }
    }
    root.get("entry")
        .and_then(|e| e.as_array())
        .map(|a| a.as_slice())
        .ok_or(ParseError::Shape("no entry array"))
}

struct Change<'a, 'v> {
    entry: &'a BorrowedValue<'v>,
    field: &'a str,
    value: Option<&'a BorrowedValue<'v>>,
}

fn changes<'a, 'v>(entries: &'a [BorrowedValue<'v>]) -> impl Iterator<Item = Change<'a, 'v>> {
    entries.iter().flat_map(|entry| {
        entry
            .get("changes")
            .and_then(|c| c.as_array())
            .map(|a| a.as_slice())
            .unwrap_or_default()
            .iter()
            .map(move |change| Change {
                entry,
                field: str_field(change, "field").unwrap_or("unknown"),
                value: change.get("value"),
            })
    })
}

/// Longest id wagate puts in a Kafka key or header.
const MAX_ID_BYTES: usize = 256;

/// An id that becomes (part of) a Kafka key or header: a string, or a whole
/// number written as one. Empty counts as absent; control characters or
/// more than [`MAX_ID_BYTES`] bytes make the body unusable.
fn id_field<'a>(
    v: &'a BorrowedValue<'_>,
    key: &str,
    what: &'static str,
) -> Result<Option<Cow<'a, str>>, ParseError> {
    let Some(x) = v.get(key) else {
        return Ok(None);
    };
    let s: Cow<'a, str> = if let Some(s) = x.as_str() {
        Cow::Borrowed(s)
    } else if let Some(n) = x.as_u64() {
        Cow::Owned(n.to_string())
    } else {
        return Ok(None);
    };
    if s.is_empty() {
        return Ok(None);
    }
    if s.len() > MAX_ID_BYTES || s.bytes().any(|b| b < 0x20 || b == 0x7f) {
        return Err(ParseError::BadId(what));
    }
    Ok(Some(s))
}

/// A BSUID field: absent or empty is None; present, it must have a BSUID's
/// shape (a malformed one is not passed on as an id, and the body is kept
/// raw like any other bad id).
fn bsuid_field<'a>(
    v: &'a BorrowedValue<'_>,
    key: &'static str,
) -> Result<Option<&'a str>, ParseError> {
    match v.get(key) {
        None => Ok(None),
        Some(x) => match x.as_str() {
            Some("") => Ok(None),
            Some(s) if super::identity::is_bsuid(s) => Ok(Some(s)),
            _ => Err(ParseError::BadId(key)),
        },
    }
}

/// The contact of a message's sender (matched by phone, else by BSUID),
/// else the first (system messages have none). Long contact lists are
/// indexed once per change, so a body of many messages and many contacts
/// costs no more than its size.
struct ContactIndex<'a, 'v> {
    list: &'a [BorrowedValue<'v>],
    by_id: Option<std::collections::HashMap<&'a str, &'a BorrowedValue<'v>>>,
}

impl<'a, 'v> ContactIndex<'a, 'v> {
    fn new(value: &'a BorrowedValue<'v>) -> Self {
        let list = value
            .get("contacts")
            .and_then(|c| c.as_array())
            .map(|a| a.as_slice())
            .unwrap_or_default();
        let by_id = (list.len() > 16).then(|| {
            let mut m = std::collections::HashMap::with_capacity(list.len());
            for c in list {
                // Phones are digits and BSUIDs start with letters: one map
                // holds both without ambiguity.
                for k in ["wa_id", "user_id"] {
                    if let Some(w) = str_field(c, k) {
                        m.entry(w).or_insert(c);
                    }
                }
            }
            m
        });
        ContactIndex { list, by_id }
    }

    /// The sender's contact and whether it is theirs for sure (matched by
    /// an id, or the only contact of a message that names no id): only then
    /// are its ids the sender's.
    fn find(
        &self,
        from: Option<&str>,
        from_user_id: Option<&str>,
    ) -> Option<(&'a BorrowedValue<'v>, bool)> {
        let by = |id: Option<&str>, key: &str| {
            id.and_then(|f| match &self.by_id {
                Some(m) => m.get(f).copied().filter(|c| str_field(c, key) == Some(f)),
                None => self.list.iter().find(|c| str_field(c, key) == Some(f)),
            })
        };
        if let Some(c) = by(from, "wa_id").or_else(|| by(from_user_id, "user_id")) {
            return Some((c, true));
        }
        let named = from.is_some() || from_user_id.is_some();
        self.list
            .first()
            .map(|c| (c, !named && self.list.len() == 1))
    }
}

/// One event of a body, its fields borrowed: measured by [`plan`], encoded by
/// [`for_each_event`].
struct Rec<'a, 'v> {
    ctx: Context<'a>,
    waba_id: &'a str,
    phone_number_id: Option<&'a str>,
    /// phone_number_id, else the WABA id.
    key: &'a str,
    item: Item<'a, 'v>,
}

enum Item<'a, 'v> {
    Message {
        msg: &'a BorrowedValue<'v>,
        id: Option<Cow<'a, str>>,
        wa_id: Option<Cow<'a, str>>,
        user_id: Option<&'a str>,
        parent_user_id: Option<&'a str>,
        username: Option<&'a str>,
        display: Option<&'a str>,
        profile_name: Option<&'a str>,
    },
    Status {
        st: &'a BorrowedValue<'v>,
        id: Option<Cow<'a, str>>,
        status: Option<Cow<'a, str>>,
    },
    Error {
        err: &'a BorrowedValue<'v>,
    },
    Other {
        field: &'a str,
        value: &'a BorrowedValue<'v>,
    },
}

/// Bytes of a record's envelope besides Meta's object (field names, ids,
/// times): an upper estimate.
const ENVELOPE_BYTES: usize = 256;

impl<'a, 'v> Rec<'a, 'v> {
    /// What this record adds to the body's own bytes: its envelope, with
    /// every string that it repeats from elsewhere in the body.
    fn envelope_len(&self) -> usize {
        let common = ENVELOPE_BYTES
            + self.ctx.app.len()
            + self.waba_id.len()
            + self.phone_number_id.map_or(0, str::len)
            + self.key.len();
        common
            + match &self.item {
                Item::Message {
                    id,
                    wa_id,
                    user_id,
                    parent_user_id,
                    username,
                    display,
                    profile_name,
                    ..
                } => {
                    id.as_deref().map_or(32, str::len)
                        + wa_id.as_deref().map_or(0, str::len)
                        + user_id.map_or(0, str::len)
                        + parent_user_id.map_or(0, str::len)
                        + username.map_or(0, str::len)
                        + display.map_or(0, str::len)
                        + profile_name.map_or(0, str::len)
                }
                Item::Status { id, status, st } => {
                    id.as_deref().map_or(32, str::len)
                        + status.as_deref().map_or(0, str::len)
                        + str_field(st, "recipient_id").map_or(0, str::len)
                        + str_field(st, "recipient_user_id").map_or(0, str::len)
                        + str_field(st, "recipient_parent_user_id").map_or(0, str::len)
                        + str_field(st, "biz_opaque_callback_data").map_or(0, str::len)
                }
                Item::Error { .. } => 32,
                Item::Other { field, .. } => 32 + field.len(),
            }
    }

    fn into_event(self) -> Event {
        let Rec {
            ctx,
            waba_id,
            phone_number_id,
            key,
            item,
        } = self;
        match item {
            Item::Message {
                msg,
                id,
                wa_id,
                user_id,
                parent_user_id,
                username,
                display,
                profile_name,
            } => {
                let event_id = match id {
                    Some(id) => id.into_owned(),
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
                    wa_id: wa_id.as_deref(),
                    user_id,
                    parent_user_id,
                    username,
                    profile_name,
                    timestamp: timestamp(msg),
                    received_at_ms: ctx.received_at_ms,
                    message: msg,
                };
                let value = encode(&rec);
                let system = msg.get("system");
                let user = User::from_fields(wa_id.as_deref(), user_id, parent_user_id);
                let change = system.and_then(|s| id_change(s, wa_id.as_deref()));
                let inbound = match system {
                    Some(_) => None,
                    None => user.zip(timestamp(msg)),
                };
                Event {
                    class: Class::Message,
                    key: key.to_string(),
                    value,
                    event_id,
                    kind: "message".into(),
                    inbound,
                    text: reply_text(msg),
                    payload: reply_payload(msg),
                    preferences: Vec::new(),
                    seen: None,
                    change,
                }
            }
            Item::Status { st, id, status } => {
                status_event(ctx, waba_id, phone_number_id, key, st, id, status)
            }
            Item::Error { err } => other_event(ctx, waba_id, phone_number_id, key, "error", err),
            Item::Other { field, value } => {
                let mut ev = other_event(ctx, waba_id, phone_number_id, key, field, value);
                ev.preferences = user_preferences(field, value);
                ev.change = user_id_update(field, value);
                ev
            }
        }
    }
}

/// A status item's record and its signals (the recipient seen by Meta).
fn status_event(
    ctx: Context<'_>,
    waba_id: &str,
    phone_number_id: Option<&str>,
    key: &str,
    st: &BorrowedValue<'_>,
    id: Option<Cow<'_, str>>,
    status: Option<Cow<'_, str>>,
) -> Event {
    let status = status.as_deref();
    let event_id = match id {
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
        recipient_user_id: str_field(st, "recipient_user_id"),
        recipient_parent_user_id: str_field(st, "recipient_parent_user_id"),
        status,
        rank: status.map(status_rank).unwrap_or(0),
        timestamp: timestamp(st),
        received_at_ms: ctx.received_at_ms,
        request_id: str_field(st, "biz_opaque_callback_data"),
        errors: st.get("errors"),
        status_object: st,
    };
    Event {
        class: Class::Status,
        key: key.to_string(),
        value: encode(&rec),
        event_id,
        kind: "status".into(),
        inbound: None,
        text: None,
        payload: None,
        preferences: Vec::new(),
        seen: User::from_fields(
            str_field(st, "recipient_id"),
            str_field(st, "recipient_user_id"),
            str_field(st, "recipient_parent_user_id"),
        )
        .filter(|u| u.pair().is_some()),
        change: None,
    }
}

/// The text a message carries for keyword matching (a text body or a
/// quick-reply button's label).
fn reply_text(msg: &BorrowedValue<'_>) -> Option<String> {
    msg.get("text")
        .and_then(|t| str_field(t, "body"))
        .or_else(|| msg.get("button").and_then(|b| str_field(b, "text")))
        .map(str::to_string)
}

/// The payload of a button or interactive reply, for payload matching.
fn reply_payload(msg: &BorrowedValue<'_>) -> Option<String> {
    msg.get("button")
        .and_then(|b| str_field(b, "payload"))
        .or_else(|| {
            msg.get("interactive").and_then(|i| {
                ["button_reply", "list_reply"]
                    .iter()
                    .find_map(|k| i.get(*k).and_then(|r| str_field(r, "id")))
            })
        })
        .map(str::to_string)
}

fn other_event(
    ctx: Context<'_>,
    waba_id: &str,
    phone_number_id: Option<&str>,
    key: &str,
    kind: &str,
    value: &BorrowedValue<'_>,
) -> Event {
    let event_id = stable_hash(waba_id, kind, value);
    let rec = OtherEvent {
        v: 1,
        event_id: &event_id,
        kind,
        app: ctx.app,
        waba_id,
        phone_number_id,
        received_at_ms: ctx.received_at_ms,
        value,
    };
    Event {
        class: Class::Other,
        key: key.to_string(),
        value: encode(&rec),
        event_id,
        kind: kind.to_string(),
        inbound: None,
        text: None,
        payload: None,
        preferences: Vec::new(),
        seen: None,
        change: None,
    }
}

/// Walks every event of the body in order. Every `entry[] × changes[] ×
/// {messages[], statuses[], errors[]}` item, and every change of any other
/// field (or a `messages` change with none of the three arrays), is one
/// event. Stops when `each` returns false.
/// A message item: the sender's ids from the message, else from their own
/// contact entry (never another user's).
fn message_item<'a, 'v>(
    msg: &'a BorrowedValue<'v>,
    contacts: &ContactIndex<'a, 'v>,
    display: Option<&'a str>,
) -> Result<Item<'a, 'v>, ParseError> {
    let from = id_field(msg, "from", "messages.from")?;
    let from_user = bsuid_field(msg, "from_user_id")?;
    let found = contacts.find(from.as_deref(), from_user);
    // A contact's ids are the sender's only when it is
    // theirs for sure.
    let own = found.filter(|(_, sure)| *sure).map(|(c, _)| c);
    let contact = found.map(|(c, _)| c);
    let wa_id = match from {
        Some(f) => Some(f),
        None => match own {
            Some(c) => id_field(c, "wa_id", "contacts.wa_id")?,
            None => None,
        },
    };
    let user_id = match from_user {
        Some(u) => Some(u),
        None => own
            .map(|c| bsuid_field(c, "user_id"))
            .transpose()?
            .flatten(),
    };
    let parent_user_id = match bsuid_field(msg, "from_parent_user_id")? {
        Some(u) => Some(u),
        None => own
            .map(|c| bsuid_field(c, "parent_user_id"))
            .transpose()?
            .flatten(),
    };
    let profile = contact.and_then(|c| c.get("profile"));
    let profile_name = profile.and_then(|p| str_field(p, "name"));
    let username = own
        .and_then(|c| c.get("profile"))
        .and_then(|p| str_field(p, "username"));
    Ok(Item::Message {
        msg,
        id: id_field(msg, "id", "messages.id")?,
        wa_id,
        user_id,
        parent_user_id,
        username,
        display,
        profile_name,
    })
}

fn walk(
    root: &BorrowedValue<'_>,
    ctx: Context<'_>,
    each: &mut dyn FnMut(Rec<'_, '_>) -> bool,
) -> Result<(), ParseError> {
    for change in changes(entries(root)?) {
        let Some(value) = change.value else {
            continue;
        };
        let waba = id_field(change.entry, "id", "entry.id")?;
        let waba_id = waba.as_deref().unwrap_or("");
        let field = change.field;
        if field.bytes().any(|b| b < 0x20 || b == 0x7f) || field.len() > MAX_ID_BYTES {
            return Err(ParseError::BadId("changes.field"));
        }
        let metadata = value.get("metadata");
        let pnid = match metadata {
            Some(m) => id_field(m, "phone_number_id", "metadata.phone_number_id")?,
            None => None,
        };
        let phone_number_id = pnid.as_deref();
        let display = metadata.and_then(|m| str_field(m, "display_phone_number"));
        let key = phone_number_id.unwrap_or(waba_id);
        let rec = |item| Rec {
            ctx,
            waba_id,
            phone_number_id,
            key,
            item,
        };
        let mut produced = false;
        if field == "messages" {
            if let Some(messages) = value.get("messages").and_then(|m| m.as_array()) {
                let contacts = ContactIndex::new(value);
                for msg in messages {
                    produced = true;
                    if !each(rec(message_item(msg, &contacts, display)?)) {
                        return Ok(());
                    }
                }
            }
            if let Some(statuses) = value.get("statuses").and_then(|s| s.as_array()) {
                for st in statuses {
                    produced = true;
                    if !each(rec(Item::Status {
                        st,
                        id: id_field(st, "id", "statuses.id")?,
                        status: id_field(st, "status", "statuses.status")?,
                    })) {
                        return Ok(());
                    }
                }
            }
            if let Some(errors) = value.get("errors").and_then(|e| e.as_array()) {
                for err in errors {
                    produced = true;
                    if !each(rec(Item::Error { err })) {
                        return Ok(());
                    }
                }
            }
        }
        if !produced {
            // Any other field (templates, quality, account, user_preferences,
            // and fields Meta adds tomorrow): one record for the whole change.
            if field == "user_preferences" {
                for p in value
                    .get("user_preferences")
                    .and_then(|v| v.as_array())
                    .map(|a| a.as_slice())
                    .unwrap_or_default()
                {
                    id_field(p, "wa_id", "user_preferences.wa_id")?;
                    bsuid_field(p, "user_id")?;
                }
            }
            if !each(rec(Item::Other { field, value })) {
                return Ok(());
            }
        }
    }
    Ok(())
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
            assert_eq!(e.class, Class::Message, "{name}");
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
            // A system message is not the user writing: no window.
            let want = (msg["type"] != "system")
                .then(|| (Some(msg["from"].as_str().unwrap().to_string()), ts));
            assert_eq!(
                e.inbound.as_ref().map(|(u, t)| (u.wa_id.clone(), *t)),
                want,
                "{name}"
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
            assert_eq!(e.class, Class::Status);
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
        let got: Vec<(Class, &str, &str)> = recs
            .iter()
            .map(|(e, _)| (e.class, e.key.as_str(), e.event_id.as_str()))
            .collect();
        assert_eq!(
            got,
            vec![
                (
                    Class::Message,
                    "109876543210987",
                    "wamid.HBgLMTQxNTU1NTAxMjMVAgASGBQzRUIwMDAwMDAwMDAwMDAwMDAxAA=="
                ),
                (
                    Class::Message,
                    "109876543210987",
                    "wamid.HBgLMTQxNTU1NTAxMjMVAgASGBQzRUIwMDAwMDAwMDAwMDAwMDAyAA=="
                ),
                (
                    Class::Status,
                    "109876543210987",
                    "wamid.HBgLMTQxNTU1NTAxMjMVAgARGBJBMDk0RDNFNzI2QzhGMTVCMjEA:read"
                ),
                (
                    Class::Status,
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
            assert_eq!(e.class, Class::Other);
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
        let user = User::from_fields(Some("14155550123"), None, None).unwrap();
        assert_eq!(evs[2].preferences, vec![(user, true)]);
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

    fn text_body(wamid_json: &str, text_json: &str) -> Vec<u8> {
        format!(r#"{{"object":"whatsapp_business_account","entry":[{{"id":"102345678901234","changes":[{{"field":"messages","value":{{"messaging_product":"whatsapp","metadata":{{"display_phone_number":"15550199999","phone_number_id":"109876543210987"}},"contacts":[{{"profile":{{"name":"Ana"}},"wa_id":"14155550123"}}],"messages":[{{"from":"14155550123",{wamid_json},"timestamp":"1781600500","type":"text","text":{text_json}}}]}}}}]}}]}}"#).into_bytes()
    }

    /// What a consumer's parser (last key wins) reads from a record.
    fn consumer_view(e: &Event) -> Value {
        serde_json::from_slice(&e.value).unwrap()
    }

    #[test]
    fn duplicate_keys_are_read_last_wins_in_the_record_and_by_wagate() {
        for (text, want) in [
            (r#"{"body":"hello","body":"STOP"}"#, "STOP"),
            (r#"{"body":"STOP","body":"hello"}"#, "hello"),
        ] {
            let mut b = text_body(r#""id":"wamid.A""#, text);
            let evs = fan_out(&mut b, CTX).unwrap();
            assert_eq!(evs.len(), 1);
            assert_eq!(evs[0].text.as_deref(), Some(want), "wagate acts on {text}");
            let v = consumer_view(&evs[0]);
            assert_eq!(v["message"]["text"]["body"], want);
            // The record carries one key, not both.
            let raw = String::from_utf8(evs[0].value.clone()).unwrap();
            assert_eq!(raw.matches("\"body\"").count(), 1, "{raw}");
        }
        // A duplicated message id: the event id is the one consumers see.
        let mut b = text_body(r#""id":"wamid.FIRST","id":"wamid.LAST""#, r#"{"body":"x"}"#);
        let evs = fan_out(&mut b, CTX).unwrap();
        assert_eq!(evs[0].event_id, "wamid.LAST");
        assert_eq!(consumer_view(&evs[0])["message"]["id"], "wamid.LAST");
        // A duplicated `entry`: only the last one is exploded, as consumers read it.
        let mut b = br#"{"entry":[{"id":"1","changes":[{"field":"account_update","value":{"event":"A"}}]}],"entry":[{"id":"2","changes":[{"field":"account_update","value":{"event":"B"}}]}]}"#.to_vec();
        let evs = fan_out(&mut b, CTX).unwrap();
        assert_eq!(evs.len(), 1);
        assert_eq!(evs[0].key, "2");
        assert_eq!(consumer_view(&evs[0])["value"]["event"], "B");
    }

    #[test]
    fn deep_bodies_are_refused_before_parsing() {
        let deep = format!("{}{}", "[".repeat(10_000), "]".repeat(10_000));
        let err = fan_out(&mut deep.into_bytes(), CTX).unwrap_err();
        assert_eq!(err.reason(), "too_deep");
        // Deep inside a message.
        let inner = format!("{}1{}", "[".repeat(9_000), "]".repeat(9_000));
        let mut b = text_body(
            r#""id":"wamid.A""#,
            &format!(r#"{{"body":"x","deep":{inner}}}"#),
        );
        assert_eq!(fan_out(&mut b, CTX).unwrap_err().reason(), "too_deep");
        // Real webhooks are far below the limit.
        for name in ["inbound_order.json", "inbound_batched_multi_entry.json"] {
            assert!(fan_out(&mut fixture(name), CTX).is_ok(), "{name}");
        }
    }

    #[test]
    fn lone_surrogates_are_refused_not_altered() {
        let mut b = text_body(r#""id":"wamid.A""#, r#"{"body":"a\ud800b"}"#);
        assert_eq!(fan_out(&mut b, CTX).unwrap_err().reason(), "lone_surrogate");
        // A pair is text like any other.
        let mut b = text_body(r#""id":"wamid.A""#, r#"{"body":"a\ud83d\ude00b"}"#);
        let evs = fan_out(&mut b, CTX).unwrap();
        assert_eq!(evs[0].text.as_deref(), Some("a😀b"));
    }

    #[test]
    fn parse_errors_never_quote_the_body() {
        let mut b = b"{\"entry\":[\"secret-\xff-bytes\"".to_vec();
        let e = fan_out(&mut b, CTX).unwrap_err();
        let text = e.to_string();
        assert_eq!(e.reason(), "json");
        assert!(!text.contains("secret"), "{text}");
    }

    #[test]
    fn other_objects_and_bad_ids_are_not_exploded() {
        let mut b =
            br#"{"object":"page","entry":[{"id":"1","changes":[{"field":"feed","value":{}}]}]}"#
                .to_vec();
        assert_eq!(fan_out(&mut b, CTX).unwrap_err().reason(), "shape");
        let mut b = br#"{"object":7,"entry":[]}"#.to_vec();
        assert_eq!(fan_out(&mut b, CTX).unwrap_err().reason(), "shape");
        for id in [r#""id":"wamid.\u0000x""#, r#""id":"wamid.\nx""#] {
            let mut b = text_body(id, r#"{"body":"x"}"#);
            assert_eq!(fan_out(&mut b, CTX).unwrap_err().reason(), "bad_id", "{id}");
        }
        let long = format!(r#""id":"{}""#, "w".repeat(300));
        let mut b = text_body(&long, r#"{"body":"x"}"#);
        assert_eq!(fan_out(&mut b, CTX).unwrap_err().reason(), "bad_id");
        let mut b =
            br#"{"entry":[{"id":"1","changes":[{"field":"acc\u0000ount","value":{}}]}]}"#.to_vec();
        assert_eq!(fan_out(&mut b, CTX).unwrap_err().reason(), "bad_id");
    }

    #[test]
    fn a_numeric_phone_number_id_keys_the_record() {
        let mut b = br#"{"entry":[{"id":"9","changes":[{"field":"messages","value":{"metadata":{"phone_number_id":109876543210987},"statuses":[{"id":"wamid.S","status":"sent","recipient_id":"1"}]}}]}]}"#.to_vec();
        let evs = fan_out(&mut b, CTX).unwrap();
        assert_eq!(evs[0].key, "109876543210987");
        assert_eq!(consumer_view(&evs[0])["phone_number_id"], "109876543210987");
    }

    fn many_messages(n: usize, name_len: usize) -> Vec<u8> {
        let msgs: Vec<String> = (0..n)
            .map(|i| format!(r#"{{"from":"14155550123","id":"wamid.{i}","timestamp":"1","type":"text","text":{{"body":"m"}}}}"#))
            .collect();
        format!(r#"{{"entry":[{{"id":"1","changes":[{{"field":"messages","value":{{"metadata":{{"phone_number_id":"5"}},"contacts":[{{"profile":{{"name":"{}"}},"wa_id":"14155550123"}}],"messages":[{}]}}}}]}}]}}"#, "n".repeat(name_len), msgs.join(",")).into_bytes()
    }

    fn plan_of(body: &[u8], limits: &Limits) -> Result<Result<usize, OverLimit>, ParseError> {
        let mut copy = body.to_vec();
        let root = parse(&mut copy, limits.max_depth)?;
        plan(&root, CTX, body.len(), limits)
    }

    #[test]
    fn plan_bounds_events_and_record_bytes_per_post() {
        let l = Limits::DEFAULT;
        // An ordinary batch passes with its count.
        assert_eq!(
            plan_of(&fixture("inbound_batched_multi_entry.json"), &l).unwrap(),
            Ok(4)
        );
        assert_eq!(plan_of(&many_messages(1_000, 10), &l).unwrap(), Ok(1_000));
        // Too many events.
        assert_eq!(
            plan_of(&many_messages(2_001, 10), &l).unwrap(),
            Err(OverLimit::Events)
        );
        // A 300 KB name repeated into 2,000 records.
        assert_eq!(
            plan_of(&many_messages(2_000, 300_000), &l).unwrap(),
            Err(OverLimit::RecordBytes)
        );
        // A million empty messages in a 3 MiB body: refused by count, at once.
        let empty = format!(
            r#"{{"entry":[{{"id":"1","changes":[{{"field":"messages","value":{{"messages":[{}]}}}}]}}]}}"#,
            vec!["{}"; 1_000_000].join(",")
        );
        assert_eq!(
            plan_of(empty.as_bytes(), &l).unwrap(),
            Err(OverLimit::Events)
        );
        // The estimate holds what the records really are.
        let body = many_messages(500, 2_000);
        assert_eq!(plan_of(&body, &l).unwrap(), Ok(500));
        let total: usize = fan_out(&mut body.clone(), CTX)
            .unwrap()
            .iter()
            .map(|e| e.value.len())
            .sum();
        assert!(total <= l.max_record_bytes(body.len()), "{total}");
    }

    fn user(wa_id: Option<&str>, user_id: Option<&str>, parent: Option<&str>) -> User {
        User::from_fields(wa_id, user_id, parent).unwrap()
    }

    const ANA: &str = "BR.8821736450019923";
    const ANA_NEW: &str = "BR.4410098877665544";

    #[test]
    fn identity_messages_carry_every_id_and_null_for_what_meta_withheld() {
        let only = run("identity_inbound_username_only.json");
        assert_eq!(only.len(), 1);
        let (e, v) = &only[0];
        assert_eq!(v["wa_id"], Value::Null);
        assert_eq!(v["user_id"], ANA);
        assert_eq!(v["parent_user_id"], "BR.ENT.90017736450011");
        assert_eq!(v["username"], "@ana.r");
        assert_eq!(v["profile_name"], "Ana Ribeiro");
        let orig = original("identity_inbound_username_only.json");
        assert_eq!(
            v["message"],
            orig["entry"][0]["changes"][0]["value"]["messages"][0]
        );
        assert_eq!(
            e.inbound,
            Some((
                user(None, Some(ANA), Some("BR.ENT.90017736450011")),
                1_782_000_000
            ))
        );
        let both = run("identity_inbound_phone_and_bsuid.json");
        let (e, v) = &both[0];
        assert_eq!(v["wa_id"], "5511987650001");
        assert_eq!(v["user_id"], ANA);
        assert_eq!(v["parent_user_id"], Value::Null);
        assert_eq!(v["username"], Value::Null);
        let (u, _) = e.inbound.as_ref().unwrap();
        assert_eq!(u.pair(), Some(("5511987650001", ANA)));
        let stop = run("identity_stop_username_only.json");
        assert_eq!(stop[0].0.text.as_deref(), Some("PARAR"));
        assert_eq!(
            stop[0].0.inbound.as_ref().unwrap().0,
            user(None, Some(ANA), None)
        );
        // Existing records keep their shape: the new fields are null.
        let old = run("inbound_text.json");
        assert_eq!(old[0].1["user_id"], Value::Null);
        assert_eq!(old[0].1["username"], Value::Null);
    }

    #[test]
    fn identity_statuses_carry_recipient_ids_and_link_only_when_both_appear() {
        let d = run("identity_status_delivered_to_bsuid.json");
        let (e, v) = &d[0];
        assert_eq!(v["recipient_id"], Value::Null);
        assert_eq!(v["recipient_user_id"], ANA);
        assert_eq!(v["recipient_parent_user_id"], Value::Null);
        assert_eq!(v["request_id"], "req-7");
        assert_eq!(e.seen, None, "a BSUID alone links nothing");
        let f = run("identity_status_failed_to_phone.json");
        assert_eq!(f[0].1["recipient_id"], "5511987650001");
        assert_eq!(f[0].1["recipient_user_id"], Value::Null);
        let both = br#"{"entry":[{"id":"1","changes":[{"field":"messages","value":{"metadata":{"phone_number_id":"5"},"statuses":[{"id":"wamid.S","status":"read","timestamp":"1","recipient_id":"5511","recipient_user_id":"BR.1"}]}}]}]}"#;
        let e = fan_out(&mut both.to_vec(), CTX).unwrap().remove(0);
        assert_eq!(e.seen, Some(user(Some("5511"), Some("BR.1"), None)));
    }

    #[test]
    fn id_changes_from_system_messages_and_the_legacy_field() {
        let n = run("identity_system_user_changed_number.json");
        let (e, v) = &n[0];
        assert_eq!(e.inbound, None, "a system message opens no window");
        assert_eq!(v["wa_id"], "5511987650001");
        assert_eq!(
            e.change,
            Some(IdChange {
                previous: user(Some("5511987650001"), Some(ANA), None),
                current: user(Some("5511987650002"), Some(ANA_NEW), None),
            })
        );
        let u = run("identity_system_user_changed_user_id.json");
        assert_eq!(
            u[0].0.change,
            Some(IdChange {
                previous: user(None, Some(ANA), None),
                current: user(None, Some(ANA_NEW), None),
            })
        );
        let legacy = br#"{"entry":[{"id":"1","changes":[{"field":"user_id_update","value":{"metadata":{"phone_number_id":"5"},"wa_id":"5511","user_id":{"previous":"BR.1","current":"BR.2"}}}]}]}"#;
        let e = fan_out(&mut legacy.to_vec(), CTX).unwrap().remove(0);
        assert_eq!(e.kind, "user_id_update");
        assert_eq!(
            e.change,
            Some(IdChange {
                previous: user(Some("5511"), Some("BR.1"), None),
                current: user(Some("5511"), Some("BR.2"), None),
            })
        );
        let p = run("identity_user_preferences_bsuid.json");
        assert_eq!(
            p[0].0.preferences,
            vec![(user(None, Some(ANA), None), true)]
        );
    }

    #[test]
    fn reactions_edits_and_group_messages_of_bsuid_users_carry_their_ids() {
        let body = br#"{"entry":[{"id":"1","changes":[{"field":"messages","value":{"metadata":{"phone_number_id":"5"},
            "contacts":[{"profile":{"name":"A","username":"@a"},"user_id":"BR.R1"},{"profile":{"name":"G"},"wa_id":"5522","user_id":"BR.G2"}],
            "messages":[
              {"from_user_id":"BR.R1","id":"wamid.R","timestamp":"10","type":"reaction","reaction":{"message_id":"wamid.O","emoji":"+"}},
              {"from_user_id":"BR.R1","id":"wamid.E","timestamp":"11","type":"edit","edit":{"original_message_id":"wamid.O","message":{"type":"text","text":{"body":"x"}}}},
              {"from":"5522","from_user_id":"BR.G2","group_id":"G.1","id":"wamid.G","timestamp":"12","type":"text","text":{"body":"hi all"}}]}}]}]}"#;
        let evs = fan_out(&mut body.to_vec(), CTX).unwrap();
        assert_eq!(evs.len(), 3);
        let v = |i: usize| serde_json::from_slice::<Value>(&evs[i].value).unwrap();
        for i in [0, 1] {
            assert_eq!(v(i)["user_id"], "BR.R1");
            assert_eq!(v(i)["wa_id"], Value::Null);
            assert_eq!(v(i)["username"], "@a");
            assert_eq!(
                evs[i].inbound.as_ref().unwrap().0,
                user(None, Some("BR.R1"), None)
            );
        }
        assert_eq!(v(1)["message"]["type"], "edit");
        assert_eq!(v(2)["wa_id"], "5522");
        assert_eq!(v(2)["user_id"], "BR.G2");
        assert_eq!(v(2)["message"]["group_id"], "G.1");
        assert_eq!(v(2)["profile_name"], "G");
    }

    #[test]
    fn malformed_bsuids_are_bad_ids_and_other_contacts_lend_no_ids() {
        let bad = br#"{"entry":[{"id":"1","changes":[{"field":"messages","value":{"metadata":{"phone_number_id":"5"},"messages":[{"from_user_id":"5511987650001","id":"wamid.B","timestamp":"1","type":"text","text":{"body":"x"}}]}}]}]}"#;
        assert!(matches!(
            fan_out(&mut bad.to_vec(), CTX),
            Err(ParseError::BadId("from_user_id"))
        ));
        // A message from a phone whose contact is not in the list: the first
        // contact's BSUID is someone else's and must not be linked to it.
        let other = br#"{"entry":[{"id":"1","changes":[{"field":"messages","value":{"metadata":{"phone_number_id":"5"},"contacts":[{"profile":{"name":"B"},"wa_id":"5599","user_id":"BR.OTHER"}],"messages":[{"from":"5511","id":"wamid.C","timestamp":"1","type":"text","text":{"body":"x"}}]}}]}]}"#;
        let e = fan_out(&mut other.to_vec(), CTX).unwrap().remove(0);
        assert_eq!(e.inbound.unwrap().0, user(Some("5511"), None, None));
    }

    #[test]
    fn many_contacts_are_indexed_not_scanned() {
        let contacts: Vec<String> = (0..5_000)
            .map(|i| format!(r#"{{"profile":{{"name":"P{i}"}},"wa_id":"{i}"}}"#))
            .collect();
        let msgs: Vec<String> = (0..1_000)
            .map(|i| format!(r#"{{"from":"{}","id":"wamid.{i}","timestamp":"1","type":"text","text":{{"body":"m"}}}}"#, i * 5))
            .collect();
        let mut b = format!(r#"{{"entry":[{{"id":"1","changes":[{{"field":"messages","value":{{"metadata":{{"phone_number_id":"5"}},"contacts":[{}],"messages":[{}]}}}}]}}]}}"#, contacts.join(","), msgs.join(",")).into_bytes();
        let evs = fan_out(&mut b, CTX).unwrap();
        assert_eq!(evs.len(), 1_000);
        let v = consumer_view(&evs[7]);
        assert_eq!(v["profile_name"], "P35");
    }

    mod fuzz {
        //! Generated bodies: nested, with duplicate keys, truncated or with
        //! bytes flipped. The fan-out never panics, never recurses without
        //! bound, and what it acts on is what a last-wins consumer reads.
        use super::*;
        use proptest::prelude::*;

        /// 256 in the test command; `make fuzz` sets `WAGATE_FUZZ_CASES`.
        fn fuzz_cases() -> u32 {
            std::env::var("WAGATE_FUZZ_CASES")
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(256)
        }

        fn junk() -> impl Strategy<Value = String> {
            let leaf = prop_oneof![
                Just("null".to_string()),
                any::<i32>().prop_map(|n| n.to_string()),
                "[a-zA-Z0-9 \u{e9}\u{1f600}]{0,6}".prop_map(|s| format!("{s:?}")),
            ];
            leaf.prop_recursive(12, 64, 3, |inner| {
                prop_oneof![
                    prop::collection::vec(inner.clone(), 0..3)
                        .prop_map(|v| format!("[{}]", v.join(","))),
                    // Keys drawn from a tiny set, so duplicates are common.
                    prop::collection::vec(("[ab]", inner), 0..4).prop_map(|kv| {
                        let parts: Vec<String> =
                            kv.into_iter().map(|(k, v)| format!("{k:?}:{v}")).collect();
                        format!("{{{}}}", parts.join(","))
                    }),
                ]
            })
        }

        fn bodies() -> impl Strategy<Value = (Vec<u8>, usize)> {
            (
                prop::collection::vec(("[a-z]{1,5}", "[a-z]{1,5}", junk()), 1..6),
                0usize..40,
            )
                .prop_map(|(msgs, depth)| {
                    let items: Vec<String> = msgs
                        .iter()
                        .enumerate()
                        .map(|(i, (b1, b2, extra))| {
                            format!(r#"{{"from":"1415555{i}","id":"wamid.{i}","id":"wamid.L{i}","timestamp":"1","type":"text","text":{{"body":{b1:?},"body":{b2:?}}},"x":{}{extra}{}}}"#, "[".repeat(depth), "]".repeat(depth))
                        })
                        .collect();
                    let body = format!(r#"{{"object":"whatsapp_business_account","entry":[{{"id":"1","changes":[{{"field":"messages","value":{{"metadata":{{"phone_number_id":"5"}},"messages":[{}]}}}}]}}]}}"#, items.join(","));
                    (body.into_bytes(), msgs.len())
                })
        }

        proptest! {
            #![proptest_config(ProptestConfig { cases: fuzz_cases(), ..ProptestConfig::default() })]

            #[test]
            fn fan_out_agrees_with_a_last_wins_reader((body, n) in bodies()) {
                let source: Value = serde_json::from_slice(&body).unwrap();
                let evs = fan_out(&mut body.clone(), CTX);
                let Ok(evs) = evs else {
                    // Only nesting can refuse these bodies.
                    prop_assert_eq!(evs.unwrap_err().reason(), "too_deep");
                    return Ok(());
                };
                prop_assert_eq!(evs.len(), n);
                let msgs = &source["entry"][0]["changes"][0]["value"]["messages"];
                for (i, e) in evs.iter().enumerate() {
                    let want = &msgs[i];
                    prop_assert_eq!(e.event_id.as_str(), want["id"].as_str().unwrap());
                    prop_assert_eq!(e.text.as_deref(), want["text"]["body"].as_str());
                    let rec: Value = serde_json::from_slice(&e.value).unwrap();
                    prop_assert_eq!(&rec["message"], want);
                }
            }

            #[test]
            fn damaged_bodies_never_panic(
                (body, _) in bodies(),
                cut in any::<prop::sample::Index>(),
                flips in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..4),
            ) {
                let mut b = body.clone();
                for (at, byte) in flips {
                    let i = at.index(b.len());
                    b[i] = byte;
                }
                b.truncate(cut.index(b.len() + 1));
                let mut copy = b.clone();
                let parsed = parse(&mut copy, Limits::DEFAULT.max_depth);
                if let Ok(root) = &parsed {
                    let _ = plan(root, CTX, b.len(), &Limits::DEFAULT);
                    let _ = fan_out_value(root, CTX);
                }
                drop(parsed);
            }
        }
    }
}
