//! The record shapes and keys of the compacted contacts topics (DESIGN §4,
//! §5, §10): `wa.consent` (a ConsentState) and `wa.windows`
//! (`{"v":1,"last_inbound_ms":…}`), keyed `{phone_number_id}:{user}` where
//! `{user}` is phone digits or a BSUID (readers split on the first `:`);
//! `wa.users` (a [`UserRecord`]), keyed `{phone_number_id}:{bsuid}`.

use serde::{Deserialize, Serialize};

use crate::contacts::{Consent, ContactState, Marketing};
use crate::kafka::{Kind, RecordHeaders, TopicId};

/// One record of a compacted contacts topic, ready to produce: what
/// ingress sends with a webhook's own records, what the API and egress
/// write through [`super::writer::ContactsWriter`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContactRecord {
    /// `Consent`, `Windows` or `Users`.
    pub topic: TopicId,
    pub key: String,
    /// `wagate-event-id`: stable for a record caused by a webhook (so a
    /// redelivery is deduplicated), else unique.
    pub event_id: String,
    /// `wagate-kind`: `consent`, `window` or `user`.
    pub kind: Kind<'static>,
    pub value: Vec<u8>,
}

impl ContactRecord {
    /// The record's headers, written by `origin` (the Meta app, the API
    /// tenant, `egress`).
    pub fn headers<'a>(&'a self, origin: &'a str) -> RecordHeaders<'a> {
        RecordHeaders::new(&self.event_id, self.kind, origin)
    }
}

/// A `wa.consent` value (DESIGN §5).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConsentRecord {
    pub v: u32,
    pub consent: Consent,
    pub marketing: Marketing,
    pub updated_at_ms: u64,
    /// `keyword`, `quick_reply`, `user_preferences`, `api`, `meta_131050` or `import`.
    pub source: String,
}

/// A `wa.windows` value.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WindowRecord {
    pub v: u32,
    pub last_inbound_ms: u64,
}

/// A `wa.users` value: the phone a BSUID is linked to, or `wa_id: null`
/// when the link was dropped (the phone now belongs to another BSUID).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserRecord {
    pub v: u32,
    pub wa_id: Option<String>,
    pub user_id: String,
    pub updated_at_ms: u64,
    /// `webhook` (both ids seen together), `user_changed_number`,
    /// `user_changed_user_id`, `user_id_update`.
    pub source: String,
}

/// The `wa.users` record linking `bsuid` to `phone` (or unlinking it).
pub fn user_event(
    phone_number_id: &str,
    bsuid: &str,
    phone: Option<&str>,
    source: &str,
    now_ms: u64,
    event_id: String,
) -> ContactRecord {
    let rec = UserRecord {
        v: 1,
        wa_id: phone.map(str::to_string),
        user_id: bsuid.to_string(),
        updated_at_ms: now_ms,
        source: source.to_string(),
    };
    ContactRecord {
        topic: TopicId::Users,
        key: key(phone_number_id, bsuid),
        event_id,
        kind: Kind::User,
        value: serde_json::to_vec(&rec).unwrap_or_default(),
    }
}

/// The compacted topics' key for a pair.
pub fn key(phone_number_id: &str, wa_id: &str) -> String {
    format!("{phone_number_id}:{}", wa_id.trim_start_matches('+'))
}

/// The `wa.consent` record for a pair's state.
pub fn consent_event(
    phone_number_id: &str,
    wa_id: &str,
    st: &ContactState,
    source: &str,
    now_ms: u64,
    cause: &str,
) -> ContactRecord {
    let rec = ConsentRecord {
        v: 1,
        consent: st.consent,
        marketing: st.marketing,
        updated_at_ms: now_ms,
        source: source.to_string(),
    };
    ContactRecord {
        topic: TopicId::Consent,
        key: key(phone_number_id, wa_id),
        event_id: format!("consent:{cause}"),
        kind: Kind::Consent,
        value: serde_json::to_vec(&rec).unwrap_or_default(),
    }
}

/// The `wa.windows` record for a pair's last inbound message.
pub fn window_event(
    phone_number_id: &str,
    wa_id: &str,
    last_inbound_ms: u64,
    cause: &str,
) -> ContactRecord {
    let rec = WindowRecord {
        v: 1,
        last_inbound_ms,
    };
    ContactRecord {
        topic: TopicId::Windows,
        key: key(phone_number_id, wa_id),
        event_id: format!("window:{cause}"),
        kind: Kind::Window,
        value: serde_json::to_vec(&rec).unwrap_or_default(),
    }
}
