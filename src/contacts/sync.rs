//! The contacts cache backed by the compacted topics `wa.consent`,
//! `wa.windows` (key `{phone_number_id}:{user}`, the user phone digits or a
//! BSUID) and `wa.users` (key `{phone_number_id}:{bsuid}`: the links).
//!
//! - Writers produce full states (ConsentState, `{"v":1,"last_inbound_ms":…}`)
//!   or tombstones; ingress sends its records with the webhook's own, so the
//!   200 means they are durable.
//! - At start, both topics are read up to the high watermarks seen then
//!   before `/readyz` says ready; afterwards they are tailed for good, so
//!   records written by another instance or an upstream import take effect
//!   here. Tombstones erase.

use std::collections::HashMap;
use std::sync::atomic::Ordering;

use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};
use serde::Deserialize;

#[cfg(test)]
use crate::contacts::Contacts;
use crate::contacts::{Consent, Marketing, MemoryContacts};
use crate::kafka::batch::{BatchRead, RawMessage};
use crate::metrics as m;

pub use super::records::{consent_event, key, window_event, ConsentRecord, WindowRecord};

/// What the cache takes of a `wa.consent` value (the rest is not read).
#[derive(Deserialize)]
struct ConsentFields {
    consent: Consent,
    marketing: Marketing,
}

/// One of the three contacts topics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Which {
    Windows = 0,
    Consent = 1,
    Users = 2,
}

impl Which {
    const LABELS: [&'static str; 3] = ["windows", "consent", "users"];
}

/// Applies one record of any of the three topics to the cache (`None` =
/// tombstone).
pub fn apply_to(cache: &MemoryContacts, which: Which, key: &str, value: Option<&[u8]>) {
    match which {
        Which::Users => apply_user(cache, key, value),
        Which::Consent => apply(cache, true, key, value),
        Which::Windows => apply(cache, false, key, value),
    }
}

/// A `wa.users` record: the BSUID of the key is linked to its `wa_id`, or
/// unlinked (`wa_id: null`, or a tombstone).
fn apply_user(cache: &MemoryContacts, key: &str, value: Option<&[u8]>) {
    let Some((pnid, bsuid)) = key.split_once(':') else {
        return;
    };
    if !crate::meta::identity::is_bsuid(bsuid) {
        return;
    }
    let Some(v) = value else {
        cache.unlink(pnid, bsuid);
        return;
    };
    // Not a record of ours: skipped like a bad key.
    let Ok(rec) = serde_json::from_slice::<super::records::UserRecord>(v) else {
        return;
    };
    match rec
        .wa_id
        .as_deref()
        .map(crate::meta::identity::UserId::parse)
    {
        Some(Ok(crate::meta::identity::UserId::Phone(phone))) => {
            cache.link(pnid, phone, bsuid, rec.updated_at_ms, "");
        }
        _ => {
            cache.unlink(pnid, bsuid);
        }
    }
}

/// Applies one record of `wa.consent` or `wa.windows` to the cache (`None`
/// = tombstone).
pub fn apply(cache: &MemoryContacts, consent_topic: bool, key: &str, value: Option<&[u8]>) {
    let Some((pnid, wa_id)) = key.split_once(':') else {
        return;
    };
    match (consent_topic, value) {
        (true, Some(v)) => {
            if let Some((consent, marketing)) = consent_fields(v) {
                cache.set_preferences(pnid, wa_id, consent, marketing);
            }
        }
        (true, None) => cache.clear_consent(pnid, wa_id),
        (false, Some(v)) => {
            if let Some(ms) = window_field(v) {
                cache.set_window(pnid, wa_id, ms);
            }
        }
        (false, None) => cache.clear_window(pnid, wa_id),
    }
}

/// Prefetches what applying a record with this key will touch first (see
/// [`MemoryContacts::prefetch_pair`]); call it a few records ahead.
pub fn prefetch(cache: &MemoryContacts, key: &[u8]) {
    if let Some((pnid, wa_id)) = std::str::from_utf8(key)
        .ok()
        .and_then(|k| k.split_once(':'))
    {
        cache.prefetch_pair(pnid, wa_id);
    }
}

/// How many records ahead of the one applied a reader prefetches.
pub const PREFETCH_AHEAD: usize = 8;

/// `consent` and `marketing` of a `wa.consent` value. Values in the exact
/// form this module writes (`{"v":1,"consent":"…","marketing":"…",…`) are
/// read by matching that prefix; anything else (another field order,
/// whitespace, an import's own encoder) goes through serde.
fn consent_fields(v: &[u8]) -> Option<(Consent, Marketing)> {
    let fast = || {
        let rest = v.strip_prefix(br#"{"v":1,"consent":""#)?;
        let (consent, rest) = if let Some(r) = rest.strip_prefix(br#"opted_in""#) {
            (Consent::OptedIn, r)
        } else if let Some(r) = rest.strip_prefix(br#"opted_out""#) {
            (Consent::OptedOut, r)
        } else {
            (Consent::Unknown, rest.strip_prefix(br#"unknown""#)?)
        };
        let rest = rest.strip_prefix(br#","marketing":""#)?;
        let (marketing, rest) = if let Some(r) = rest.strip_prefix(br#"allowed""#) {
            (Marketing::Allowed, r)
        } else {
            (Marketing::Stopped, rest.strip_prefix(br#"stopped""#)?)
        };
        // The next byte ends the pair: another field or the object's end.
        matches!(rest.first(), Some(b',' | b'}')).then_some((consent, marketing))
    };
    fast().or_else(|| {
        serde_json::from_slice::<ConsentFields>(v)
            .ok()
            .map(|r| (r.consent, r.marketing))
    })
}

/// `last_inbound_ms` of a `wa.windows` value; the form this module writes
/// (`{"v":1,"last_inbound_ms":N}`) by its prefix, anything else via serde.
fn window_field(v: &[u8]) -> Option<u64> {
    let fast = || {
        let digits = v
            .strip_prefix(br#"{"v":1,"last_inbound_ms":"#)?
            .strip_suffix(b"}")?;
        // 1..=19 digits (no sign, no exponent): always fits a u64.
        if digits.is_empty() || digits.len() > 19 || !digits.iter().all(u8::is_ascii_digit) {
            return None;
        }
        Some(
            digits
                .iter()
                .fold(0u64, |n, d| n * 10 + u64::from(d - b'0')),
        )
    };
    fast().or_else(|| {
        serde_json::from_slice::<WindowRecord>(v)
            .ok()
            .map(|r| r.last_inbound_ms)
    })
}

/// The contacts consumer's librdkafka settings (the bench's bare consumer
/// uses them too, so its numbers compare).
pub fn consumer_config(conn: &crate::kafka::Connection) -> ClientConfig {
    conn.client_config(|cc| {
        cc.set("group.id", "wagate-contacts")
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
            .set("fetch.queue.backoff.ms", "10");
    })
}

/// How many readers split the topics' partitions between them: one per
/// core, at most two (the broker thread librdkafka runs per reader, the
/// gateway and the broker need the rest).
fn readers() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get().min(2))
}

/// Bootstraps the cache from both topics, calls `on_caught_up` once caught
/// up, then tails them until `stop`. Blocking: run it on its own thread.
///
/// The partitions of both topics are dealt round-robin to [`readers`]
/// consumers (partition `p` of either topic to reader `p % readers`), each
/// reading and applying on its own thread; records of one partition stay in
/// order, and the two topics touch different fields of a pair (under the
/// shard's lock), so the final state does not depend on how the readers
/// interleave. Caught up = every reader has read its partitions up to the
/// high watermarks it saw at start, then gone idle.
pub fn run(
    conn: &crate::kafka::Connection,
    consent_topic: &str,
    windows_topic: &str,
    users_topic: &str,
    cache: Arc<MemoryContacts>,
    on_caught_up: Box<dyn Fn() + Send>,
    stop: CancellationToken,
) -> Result<(), rdkafka::error::KafkaError> {
    let readers = readers();
    let lags = Arc::new(SplitLag::default());
    let consumers = (0..readers)
        .map(|slot| {
            consumer_config(conn).create_with_context(ReaderContext {
                slot,
                lags: lags.clone(),
                diagnostics: conn.diagnostics().clone(),
            })
        })
        .collect::<Result<Vec<BaseConsumer<ReaderContext>>, _>>()?;
    let timeout = Duration::from_secs(10);
    let mut assignments: Vec<Vec<(Which, &str, i32)>> = vec![Vec::new(); readers];
    for (which, topic) in [
        (Which::Consent, consent_topic),
        (Which::Windows, windows_topic),
        (Which::Users, users_topic),
    ] {
        let md = consumers[0].fetch_metadata(Some(topic), timeout)?;
        let parts = md
            .topics()
            .first()
            .map(|t| t.partitions().len())
            .unwrap_or(0) as i32;
        for p in 0..parts {
            assignments[p as usize % readers].push((which, topic, p));
        }
    }
    let shared = Shared {
        cache,
        stop,
        started: std::time::Instant::now(),
        pending: std::sync::atomic::AtomicUsize::new(readers),
        applied: std::sync::atomic::AtomicU64::new(0),
        remaining: (0..readers).map(|_| Default::default()).collect(),
        on_caught_up: std::sync::Mutex::new(on_caught_up),
    };
    std::thread::scope(|s| {
        let handles: Vec<_> = consumers
            .into_iter()
            .zip(assignments)
            .enumerate()
            .map(|(slot, (consumer, parts))| {
                let shared = &shared;
                std::thread::Builder::new()
                    .name(format!("contacts-sync-{slot}"))
                    .spawn_scoped(s, move || read(slot, &consumer, &parts, shared))
                    .expect("spawn a contacts reader")
            })
            .collect();
        let mut result = Ok(());
        for h in handles {
            let r = h.join().expect("contacts reader panicked");
            if result.is_ok() {
                if r.is_err() {
                    // One reader gone: stop the others, report the error.
                    shared.stop.cancel();
                }
                result = r;
            }
        }
        result
    })
}

/// What the readers of one [`run`] share.
struct Shared {
    cache: Arc<MemoryContacts>,
    stop: CancellationToken,
    started: std::time::Instant,
    /// Readers not caught up yet.
    pending: std::sync::atomic::AtomicUsize,
    /// Records applied by readers that are caught up (for the log line).
    applied: std::sync::atomic::AtomicU64,
    /// Per reader, records still to read before it is caught up.
    remaining: Vec<std::sync::atomic::AtomicI64>,
    on_caught_up: std::sync::Mutex<Box<dyn Fn() + Send>>,
}

impl Shared {
    fn set_remaining(&self, slot: usize, n: i64) {
        self.remaining[slot].store(n, Ordering::Relaxed);
        let total: i64 = self
            .remaining
            .iter()
            .map(|r| r.load(Ordering::Relaxed))
            .sum();
        metrics::gauge!(m::CONTACTS_BOOTSTRAP_REMAINING).set(total.max(0) as f64);
    }

    /// A reader is caught up; the last one makes the cache ready.
    fn caught_up(&self, slot: usize, applied: u64) {
        self.set_remaining(slot, 0);
        let applied = self.applied.fetch_add(applied, Ordering::Relaxed) + applied;
        if self.pending.fetch_sub(1, Ordering::AcqRel) == 1 {
            let elapsed = self.started.elapsed();
            metrics::gauge!(m::CONTACTS_BOOTSTRAP_SECONDS).set(elapsed.as_secs_f64());
            tracing::info!(
                records = applied,
                pairs = self.cache.len(),
                elapsed_ms = elapsed.as_millis() as u64,
                "contacts caught up"
            );
            (self.on_caught_up.lock().unwrap_or_else(|e| e.into_inner()))();
        }
    }
}

/// Records applied are counted locally and added to the counters every
/// this many records, and whenever the reader goes idle or catches up.
const COUNT_EVERY: u64 = 1024;

/// Messages taken per batch read during the bootstrap.
const BATCH: usize = 1024;

/// One reader's progress: records applied, where it stands against the
/// high watermarks it must reach before it is caught up.
struct Progress<'a> {
    slot: usize,
    shared: &'a Shared,
    /// Where "caught up" is: the high watermark of each partition at start,
    /// keyed by (topic, partition). Emptied as reached.
    behind: HashMap<(Which, i32), i64>,
    /// Where each of those partitions is read up to (refreshed in steps).
    position: HashMap<(Which, i32), i64>,
    applied: u64,
    /// The end offsets are reached: caught up at the next idle read (some
    /// brokers, Tansu 0.6, report a high watermark inside the last batch).
    reached: bool,
    /// Counter handles taken once (windows, consent, users); counts added
    /// in steps of COUNT_EVERY.
    counters: [metrics::Counter; 3],
    uncounted: [u64; 3],
}

impl Progress<'_> {
    fn remaining(&self) -> i64 {
        self.behind
            .iter()
            .map(|(k, end)| end - self.position.get(k).copied().unwrap_or(0))
            .sum::<i64>()
            .max(0)
    }

    fn flush(&mut self) {
        for (c, n) in self.counters.iter().zip(self.uncounted.iter_mut()) {
            if *n > 0 {
                c.increment(std::mem::take(n));
            }
        }
    }

    /// Applies one record (keys are ASCII `{phone_number_id}:{wa_id}`;
    /// anything else is not ours and is skipped by `apply`).
    #[inline]
    fn record(
        &mut self,
        which: Which,
        partition: i32,
        offset: i64,
        key: Option<&[u8]>,
        value: Option<&[u8]>,
    ) {
        let key = key.and_then(|k| std::str::from_utf8(k).ok()).unwrap_or("");
        apply_to(&self.shared.cache, which, key, value);
        self.applied += 1;
        let n = &mut self.uncounted[which as usize];
        *n += 1;
        if *n >= COUNT_EVERY {
            self.flush();
        }
        if !self.behind.is_empty() {
            let k = (which, partition);
            if self.behind.get(&k).is_some_and(|end| offset + 1 >= *end) {
                self.behind.remove(&k);
                if self.behind.is_empty() {
                    self.reached = true;
                    self.flush();
                }
            } else if self.applied % 4096 == 0 {
                self.position.insert(k, offset + 1);
                self.shared.set_remaining(self.slot, self.remaining());
            }
        }
    }

    /// Nothing came in a read: counts go out, and a reader past its end
    /// offsets is caught up. True once caught up.
    fn idle(&mut self) -> bool {
        self.flush();
        if self.reached {
            self.reached = false;
            self.shared.caught_up(self.slot, self.applied);
            return true;
        }
        false
    }
}

/// One reader: assigns `parts` (is consent, topic, partition) from the
/// beginning, applies every record, reports when caught up, tails until
/// `stop`. The bootstrap reads in batches ([`BatchRead`]); the tail polls.
fn read(
    slot: usize,
    consumer: &BaseConsumer<ReaderContext>,
    parts: &[(Which, &str, i32)],
    shared: &Shared,
) -> Result<(), rdkafka::error::KafkaError> {
    let timeout = Duration::from_secs(10);
    let mut tpl = TopicPartitionList::new();
    let mut progress = Progress {
        slot,
        shared,
        behind: HashMap::new(),
        position: HashMap::new(),
        applied: 0,
        reached: false,
        counters: Which::LABELS.map(|t| metrics::counter!(m::CONTACTS_APPLIED, "topic" => t)),
        uncounted: [0; 3],
    };
    for &(which, topic, p) in parts {
        let (low, high) = consumer.fetch_watermarks(topic, p, timeout)?;
        if high > low {
            progress.behind.insert((which, p), high);
            progress.position.insert((which, p), low);
        }
        tpl.add_partition_offset(topic, p, Offset::Beginning)?;
    }
    consumer.assign(&tpl)?;
    shared.set_remaining(slot, progress.remaining());
    let names = TopicNames::of(parts);
    if progress.behind.is_empty() {
        shared.caught_up(slot, 0);
    } else {
        bootstrap(consumer, &names, &mut progress);
    }
    while !shared.stop.is_cancelled() {
        match consumer.poll(Duration::from_millis(100)) {
            None => {
                progress.idle();
            }
            Some(Err(e)) => {
                tracing::warn!(error = %e, "contacts sync: consumer error");
                std::thread::sleep(Duration::from_millis(200));
            }
            Some(Ok(m)) => {
                let which = names.which(m.topic().as_bytes());
                progress.record(which, m.partition(), m.offset(), m.key(), m.payload());
            }
        }
    }
    progress.flush();
    Ok(())
}

/// The consent and users topics' names of one reader's parts (anything
/// else it reads is the windows topic).
struct TopicNames<'a> {
    consent: Option<&'a str>,
    users: Option<&'a str>,
}

impl<'a> TopicNames<'a> {
    fn of(parts: &[(Which, &'a str, i32)]) -> TopicNames<'a> {
        let find = |w| parts.iter().find(|p| p.0 == w).map(|p| p.1);
        TopicNames {
            consent: find(Which::Consent),
            users: find(Which::Users),
        }
    }

    fn which(&self, name: &[u8]) -> Which {
        if self.consent.map(str::as_bytes) == Some(name) {
            Which::Consent
        } else if self.users.map(str::as_bytes) == Some(name) {
            Which::Users
        } else {
            Which::Windows
        }
    }
}

/// Reads in batches until caught up (or `stop`).
fn bootstrap(
    consumer: &BaseConsumer<ReaderContext>,
    names: &TopicNames<'_>,
    progress: &mut Progress<'_>,
) {
    let Some(mut batch) = BatchRead::new(consumer, BATCH) else {
        return; // no consumer queue: the poll loop reads it all
    };
    // The topic of the last message seen, by handle: one name comparison
    // per change of topic, not per message.
    let mut last_topic: (usize, Which) = (0, Which::Windows);
    while !progress.shared.stop.is_cancelled() {
        let n = batch.read(Duration::from_millis(100));
        if n == 0 {
            if progress.idle() {
                return;
            }
            continue;
        }
        let cache = &*progress.shared.cache;
        let messages: Vec<RawMessage<'_>> = batch.messages().collect();
        for (i, m) in messages.iter().enumerate() {
            if let Some(key) = messages.get(i + PREFETCH_AHEAD).and_then(|m| m.key()) {
                prefetch(cache, key);
            }
            if let Some(code) = m.error() {
                tracing::warn!(error = %code, "contacts sync: consumer error");
                continue;
            }
            if m.topic_handle() != last_topic.0 {
                last_topic = (m.topic_handle(), names.which(m.topic_name()));
            }
            progress.record(last_topic.1, m.partition, m.offset, m.key(), m.value());
        }
    }
}

/// Each reader's share of `wagate_consumer_lag{topic}`: a reader's
/// statistics cover only its partitions, so the gauge is the sum over the
/// readers of what each last reported.
#[derive(Default)]
struct SplitLag {
    by_topic: std::sync::Mutex<HashMap<String, Vec<i64>>>,
}

struct ReaderContext {
    slot: usize,
    lags: Arc<SplitLag>,
    diagnostics: crate::kafka::Diagnostics,
}

impl rdkafka::ClientContext for ReaderContext {
    fn stats(&self, statistics: rdkafka::statistics::Statistics) {
        let mut by_topic = self.lags.by_topic.lock().unwrap_or_else(|e| e.into_inner());
        for (topic, lag) in crate::kafka::consumer_lag_by_topic(&statistics) {
            let slots = by_topic.entry(topic.to_string()).or_default();
            if slots.len() <= self.slot {
                slots.resize(self.slot + 1, 0);
            }
            slots[self.slot] = lag;
            let total: i64 = slots.iter().sum();
            metrics::gauge!(m::CONSUMER_LAG, "topic" => topic.to_string()).set(total as f64);
        }
    }
    fn log(&self, level: rdkafka::config::RDKafkaLogLevel, fac: &str, msg: &str) {
        self.diagnostics.on_log(level, fac, msg);
    }
    fn error(&self, error: rdkafka::error::KafkaError, reason: &str) {
        self.diagnostics.on_error(&error, reason);
    }
}

impl rdkafka::consumer::ConsumerContext for ReaderContext {}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::contacts::ContactState;

    /// The prefix fast paths agree with serde on everything this module
    /// writes, and other encodings of the same values still parse.
    #[test]
    fn value_fast_paths_match_serde() {
        for consent in [Consent::OptedIn, Consent::OptedOut, Consent::Unknown] {
            for marketing in [Marketing::Allowed, Marketing::Stopped] {
                let st = ContactState {
                    consent,
                    marketing,
                    last_inbound_ms: None,
                };
                let e = consent_event("1", "2", &st, "import", 1_781_600_000_000, "x");
                assert_eq!(consent_fields(&e.value), Some((consent, marketing)));
                let other = serde_json::json!({
                    "marketing": marketing, "source": "import", "consent": consent,
                    "v": 1, "updated_at_ms": 5
                });
                let pretty = serde_json::to_vec_pretty(&other).unwrap();
                assert_eq!(consent_fields(&pretty), Some((consent, marketing)));
            }
        }
        for ms in [0u64, 1, 1_781_600_000_000, u64::MAX] {
            let w = window_event("1", "2", ms, "x");
            assert_eq!(window_field(&w.value), Some(ms));
            let other = format!(r#"{{ "last_inbound_ms": {ms}, "v": 1 }}"#);
            assert_eq!(window_field(other.as_bytes()), Some(ms));
        }
        // Not values of ours: nothing, from either path.
        for bad in [
            &br#"{"v":1,"consent":"opted_inx","marketing":"allowed"}"#[..],
            br#"{"v":1,"consent":"opted_in","marketing":"allowedx"}"#,
            br#"{"v":1,"consent":"maybe","marketing":"allowed"}"#,
            br#"{"v":1,"consent":"opted_in""#,
            b"",
        ] {
            assert_eq!(
                consent_fields(bad),
                None,
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
        for bad in [
            &br#"{"v":1,"last_inbound_ms":}"#[..],
            br#"{"v":1,"last_inbound_ms":-5}"#,
            br#"{"v":1,"last_inbound_ms":99999999999999999999}"#,
            br#"{"v":1,"last_inbound_ms":12"#,
        ] {
            assert_eq!(window_field(bad), None, "{}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn user_records_link_and_unlink_and_older_ones_lose() {
        use crate::contacts::records::user_event;
        let c = MemoryContacts::new();
        let e = user_event("1", "BR.A", Some("5511"), "webhook", 10, "x".into());
        assert_eq!(e.key, "1:BR.A");
        apply_to(&c, Which::Users, &e.key, Some(&e.value));
        assert_eq!(c.ids("1", "5511"), ["5511", "BR.A"]);
        // An older record of another BSUID for the same phone (another
        // partition, read late): the newer link stands.
        let old = user_event("1", "BR.B", Some("5511"), "webhook", 5, "y".into());
        apply_to(&c, Which::Users, &old.key, Some(&old.value));
        assert_eq!(c.ids("1", "5511"), ["5511", "BR.A"]);
        let un = user_event("1", "BR.A", None, "webhook", 20, "z".into());
        apply_to(&c, Which::Users, &un.key, Some(&un.value));
        assert_eq!(c.ids("1", "5511"), ["5511"]);
        apply_to(&c, Which::Users, &e.key, Some(&e.value));
        apply_to(&c, Which::Users, "1:BR.A", None);
        assert_eq!(c.ids("1", "BR.A"), ["BR.A"], "a tombstone unlinks");
        // Keys and values that are not ours change nothing.
        apply_to(&c, Which::Users, "1:5511", Some(&e.value));
        apply_to(&c, Which::Users, "1:BR.A", Some(b"{not json"));
        assert!(c.is_empty());
        // BSUID-keyed consent records land on the BSUID.
        let st = ContactState {
            consent: Consent::OptedOut,
            ..ContactState::default()
        };
        let ce = consent_event("1", "BR.A", &st, "keyword", 5, "w");
        apply_to(&c, Which::Consent, &ce.key, Some(&ce.value));
        assert_eq!(c.get("1", "BR.A").consent, Consent::OptedOut);
        assert_eq!(c.get("1", "5511").consent, Consent::Unknown);
    }

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
