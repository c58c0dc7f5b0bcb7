//! The contacts cache backed by the compacted topics `wa.consent` and
//! `wa.windows` (key `{phone_number_id}:{wa_id}`).
//!
//! - Writers produce full states (ConsentState, `{"v":1,"last_inbound_ms":…}`)
//!   or tombstones; ingress sends its records with the webhook's own, so the
//!   200 means they are durable.
//! - At start, both topics are read up to the high watermarks seen then
//!   before `/readyz` says ready; afterwards they are tailed for good, so
//!   records written by another instance or an upstream import take effect
//!   here. Tombstones erase.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};
use serde::{Deserialize, Serialize};

use crate::contacts::{Consent, ContactState, Contacts, Marketing, MemoryContacts};
use crate::kafka::LagContext;
use crate::meta::webhook::{Event, Topic};
use crate::metrics as m;

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

/// The compacted topics' key for a pair.
pub fn key(phone_number_id: &str, wa_id: &str) -> String {
    format!("{phone_number_id}:{}", wa_id.trim_start_matches('+'))
}

/// The `wa.consent` record for a pair's state, as an event ingress produces.
pub fn consent_event(
    phone_number_id: &str,
    wa_id: &str,
    st: &ContactState,
    source: &str,
    now_ms: u64,
    cause: &str,
) -> Event {
    let rec = ConsentRecord {
        v: 1,
        consent: st.consent,
        marketing: st.marketing,
        updated_at_ms: now_ms,
        source: source.to_string(),
    };
    Event {
        topic: Topic::Consent,
        key: key(phone_number_id, wa_id),
        event_id: format!("consent:{cause}"),
        kind: "consent".into(),
        value: serde_json::to_vec(&rec).unwrap_or_default(),
        inbound: None,
        text: None,
        payload: None,
        preferences: Vec::new(),
    }
}

/// The `wa.windows` record for a pair's last inbound message.
pub fn window_event(
    phone_number_id: &str,
    wa_id: &str,
    last_inbound_ms: u64,
    cause: &str,
) -> Event {
    let rec = WindowRecord {
        v: 1,
        last_inbound_ms,
    };
    Event {
        topic: Topic::Windows,
        key: key(phone_number_id, wa_id),
        event_id: format!("window:{cause}"),
        kind: "window".into(),
        value: serde_json::to_vec(&rec).unwrap_or_default(),
        inbound: None,
        text: None,
        payload: None,
        preferences: Vec::new(),
    }
}

/// What the cache takes of a `wa.consent` value (the rest is not read).
#[derive(Deserialize)]
struct ConsentFields {
    consent: Consent,
    marketing: Marketing,
}

/// Applies one record of either topic to the cache (`None` = tombstone).
pub fn apply(cache: &MemoryContacts, consent_topic: bool, key: &str, value: Option<&[u8]>) {
    let Some((pnid, wa_id)) = key.split_once(':') else {
        return;
    };
    match (consent_topic, value) {
        (true, Some(v)) => {
            if let Ok(r) = serde_json::from_slice::<ConsentFields>(v) {
                cache.set_preferences(pnid, wa_id, r.consent, r.marketing);
            }
        }
        (true, None) => cache.clear_consent(pnid, wa_id),
        (false, Some(v)) => {
            if let Ok(r) = serde_json::from_slice::<WindowRecord>(v) {
                cache.record_inbound(pnid, wa_id, r.last_inbound_ms);
            }
        }
        (false, None) => cache.clear_window(pnid, wa_id),
    }
}

/// Bootstraps the cache from both topics, sets `ready` once caught up, then
/// tails them until `stop`. Blocking: run it on its own thread.
pub fn run(
    brokers: &str,
    consent_topic: &str,
    windows_topic: &str,
    cache: Arc<MemoryContacts>,
    on_caught_up: Box<dyn Fn() + Send>,
    stop: Arc<AtomicBool>,
) -> Result<(), rdkafka::error::KafkaError> {
    let consumer: BaseConsumer<LagContext> = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", "wagate-contacts")
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "false")
        .set(
            "statistics.interval.ms",
            crate::kafka::STATISTICS_INTERVAL_MS,
        )
        // Short fetch waits: a STOP written by another instance is applied
        // here within tens of milliseconds, and the bootstrap does not stall
        // between large fetch responses (see BENCHMARKS.md).
        .set("fetch.wait.max.ms", "20")
        .set("fetch.queue.backoff.ms", "10")
        .create_with_context(LagContext)?;
    let timeout = Duration::from_secs(10);
    let mut tpl = TopicPartitionList::new();
    // Where "caught up" is: the high watermark of each partition now,
    // keyed by (is the consent topic, partition).
    let mut behind: HashMap<(bool, i32), i64> = HashMap::new();
    // Progress: where each of those partitions is read up to.
    let mut position: HashMap<(bool, i32), i64> = HashMap::new();
    for topic in [consent_topic, windows_topic] {
        let md = consumer.fetch_metadata(Some(topic), timeout)?;
        let parts = md
            .topics()
            .first()
            .map(|t| t.partitions().len())
            .unwrap_or(0) as i32;
        for p in 0..parts {
            let (low, high) = consumer.fetch_watermarks(topic, p, timeout)?;
            if high > low {
                behind.insert((topic == consent_topic, p), high);
                position.insert((topic == consent_topic, p), low);
            }
            tpl.add_partition_offset(topic, p, Offset::Beginning)?;
        }
    }
    consumer.assign(&tpl)?;
    let mut applied = 0u64;
    let started = std::time::Instant::now();
    let remaining = |position: &HashMap<(bool, i32), i64>, behind: &HashMap<(bool, i32), i64>| {
        behind
            .iter()
            .map(|(k, end)| end - position.get(k).copied().unwrap_or(0))
            .sum::<i64>()
            .max(0) as f64
    };
    metrics::gauge!(m::CONTACTS_BOOTSTRAP_REMAINING).set(remaining(&position, &behind));
    let caught_up = |applied: u64| {
        metrics::gauge!(m::CONTACTS_BOOTSTRAP_REMAINING).set(0.0);
        metrics::gauge!(m::CONTACTS_BOOTSTRAP_SECONDS).set(started.elapsed().as_secs_f64());
        tracing::info!(
            records = applied,
            pairs = cache.len(),
            elapsed_ms = started.elapsed().as_millis() as u64,
            "contacts caught up"
        );
    };
    if behind.is_empty() {
        caught_up(0);
        on_caught_up();
    }
    // The end offsets are reached: ready at the next idle poll (some brokers,
    // Tansu 0.6, report a high watermark inside the last record batch).
    let mut reached = false;
    // Counter handles taken once: the loop runs per record.
    let applied_consent = metrics::counter!(m::CONTACTS_APPLIED, "topic" => "consent");
    let applied_windows = metrics::counter!(m::CONTACTS_APPLIED, "topic" => "windows");
    while !stop.load(Ordering::Relaxed) {
        match consumer.poll(Duration::from_millis(100)) {
            None => {
                if reached {
                    reached = false;
                    caught_up(applied);
                    on_caught_up();
                }
            }
            Some(Err(e)) => {
                tracing::warn!(error = %e, "contacts sync: consumer error");
                std::thread::sleep(Duration::from_millis(200));
            }
            Some(Ok(m)) => {
                let consent = m.topic() == consent_topic;
                // Keys are ASCII `{phone_number_id}:{wa_id}`; anything else
                // is not ours and is skipped by `apply`.
                let key = m
                    .key()
                    .and_then(|k| std::str::from_utf8(k).ok())
                    .unwrap_or("");
                apply(&cache, consent, key, m.payload());
                applied += 1;
                if consent {
                    applied_consent.increment(1);
                } else {
                    applied_windows.increment(1);
                }
                if !behind.is_empty() {
                    let k = (consent, m.partition());
                    if behind.get(&k).is_some_and(|end| m.offset() + 1 >= *end) {
                        behind.remove(&k);
                        reached = behind.is_empty();
                    } else if applied % 4096 == 0 {
                        position.insert(k, m.offset() + 1);
                        metrics::gauge!(m::CONTACTS_BOOTSTRAP_REMAINING)
                            .set(remaining(&position, &behind));
                    }
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_through_the_cache() {
        let c = MemoryContacts::new();
        let st = ContactState {
            consent: Consent::OptedOut,
            marketing: Marketing::Stopped,
            last_inbound_ms: None,
        };
        let e = consent_event("1", "+5511", &st, "keyword", 5, "wamid.X");
        assert_eq!(e.key, "1:5511");
        apply(&c, true, &e.key, Some(&e.value));
        let w = window_event("1", "5511", 1_781_600_000_000, "wamid.X");
        apply(&c, false, &w.key, Some(&w.value));
        let got = c.get("1", "5511");
        assert_eq!(got.consent, Consent::OptedOut);
        assert_eq!(got.marketing, Marketing::Stopped);
        assert_eq!(got.last_inbound_ms, Some(1_781_600_000_000));
        apply(&c, true, "1:5511", None);
        assert_eq!(c.get("1", "5511").consent, Consent::Unknown);
        assert_eq!(c.get("1", "5511").last_inbound_ms, Some(1_781_600_000_000));
        apply(&c, false, "1:5511", None);
        assert!(c.is_empty(), "both tombstones erase the pair");
    }
}
