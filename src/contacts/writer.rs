//! The one writer of the compacted contacts topics: every plane that writes
//! `wa.consent` or `wa.windows` (ingress with a webhook's records, the
//! contacts API, egress on a 131050) uses its headers and topics, so a
//! record's kind, origin and event id are the same whoever wrote it.

use crate::contacts::records::ContactRecord;
use crate::kafka::{Delivery, KafkaProducer, Kind, RecordHeaders, SendError, TopicId, Topics};

/// Writes contacts records and tombstones; each call returns the futures of
/// Kafka's acknowledgements, which the caller awaits (the API, before its
/// answer) or watches (egress, in the background).
#[derive(Clone)]
pub struct ContactsWriter {
    producer: KafkaProducer,
    consent: String,
    windows: String,
    users: String,
}

impl ContactsWriter {
    pub fn new(producer: KafkaProducer, topics: &Topics) -> ContactsWriter {
        ContactsWriter {
            producer,
            consent: topics.name(TopicId::Consent).to_string(),
            windows: topics.name(TopicId::Windows).to_string(),
            users: topics.name(TopicId::Users).to_string(),
        }
    }

    /// A consent, window or user record (from [`crate::contacts::records`]).
    pub fn write(&self, rec: &ContactRecord, origin: &str) -> Result<Delivery, SendError> {
        let topic = match rec.topic {
            TopicId::Windows => &self.windows,
            TopicId::Users => &self.users,
            _ => &self.consent,
        };
        rec.headers(origin)
            .with(|h| self.producer.send(topic, rec.key.as_bytes(), &rec.value, h))
    }

    /// Tombstones for every key in `keys` on the three contacts topics (an
    /// erasure: consent, window, and the link of a BSUID key).
    pub fn erase(
        &self,
        keys: &[String],
        event_id: &str,
        origin: &str,
    ) -> Result<Vec<Delivery>, SendError> {
        let h = RecordHeaders::new(event_id, Kind::Erase, origin);
        let mut acks = Vec::with_capacity(keys.len() * 2);
        for k in keys {
            for topic in [&self.consent, &self.windows, &self.users] {
                acks.push(h.with(|h| self.producer.send_tombstone(topic, k.as_bytes(), h))?);
            }
        }
        Ok(acks)
    }
}
