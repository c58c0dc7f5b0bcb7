//! The media worker: a consumer group on `wa.inbound.messages` (its own
//! thread, a `BaseConsumer`), a task per media item on the runtime, one
//! `wa.inbound.media` record per item, offsets committed in order once the
//! record of every earlier item of the partition is acknowledged.
//!
//! ```text
//! wa.inbound.messages ──poll (thread)──▶ item? ──no──▶ done at once
//!                                          │yes (not in the history)
//!                                          ▼
//!              task: per-number permit → global permit → lookup → download
//!                    (hash + size while streaming) → object → record → ack
//!                                          ▼
//!                        tracker: partition's lowest pending offset → commit
//! ```

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http_body_util::BodyExt;
use rdkafka::client::ClientContext;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance};
use rdkafka::error::KafkaError;
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};
use sha2::{Digest, Sha256};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use super::fetch::{FetchError, MediaClient, MediaInfo};
use super::metrics as mm;
use super::record::{media_item, record_key, ItemError, MediaItem, MediaRecord, MEDIA_LIFETIME_MS};
use super::store::Store;
use crate::config::{Config, MediaConfig, Secret};
use crate::kafka::{Connection, Diagnostics, KafkaProducer, Kind, RecordHeaders, TopicId, Topics};

/// Offsets per partition: which items are still in flight, and the commit
/// point (the lowest pending offset, else one past the highest seen).
#[derive(Default)]
struct Tracker {
    parts: HashMap<i32, Part>,
    /// Bumped at every revocation: a task of an older epoch no longer
    /// moves a commit point.
    epoch: u64,
    /// Receipt times of pending items (for the lag gauge).
    since: HashMap<(i32, i64), Instant>,
    /// Items being fetched here (by key hash), with the offsets of later
    /// deliveries of the same item (a revocation that timed out, then the
    /// same partitions assigned back): those wait for the one fetch instead
    /// of fetching again.
    inflight: HashMap<u64, Vec<(i32, i64)>>,
}

#[derive(Default)]
struct Part {
    pending: BTreeSet<i64>,
    next: i64,
    committed: i64,
}

impl Tracker {
    fn seen(&mut self, p: i32, o: i64) {
        let part = self.parts.entry(p).or_default();
        part.next = part.next.max(o + 1);
    }
    /// Marks an item pending; false when the same item is already being
    /// fetched here (its offset is then done when that fetch is).
    fn start(&mut self, p: i32, o: i64, key: u64) -> bool {
        self.seen(p, o);
        self.parts.entry(p).or_default().pending.insert(o);
        self.since.insert((p, o), Instant::now());
        match self.inflight.get_mut(&key) {
            Some(extra) => {
                extra.push((p, o));
                false
            }
            None => {
                self.inflight.insert(key, Vec::new());
                true
            }
        }
    }
    fn done(&mut self, p: i32, o: i64) {
        if let Some(part) = self.parts.get_mut(&p) {
            part.pending.remove(&o);
        }
        self.since.remove(&(p, o));
    }
    fn finish(&mut self, p: i32, o: i64, epoch: u64, key: u64) {
        for (ep, eo) in self.inflight.remove(&key).unwrap_or_default() {
            self.done(ep, eo);
        }
        if epoch == self.epoch {
            self.done(p, o);
        }
    }
    fn pending(&self) -> usize {
        self.parts.values().map(|p| p.pending.len()).sum()
    }
    fn pending_in(&self, parts: &[i32]) -> usize {
        parts
            .iter()
            .filter_map(|p| self.parts.get(p))
            .map(|p| p.pending.len())
            .sum()
    }
    fn oldest(&self) -> Option<Duration> {
        self.since.values().min().map(|t| t.elapsed())
    }
    /// Commit points that moved (of `only`, or all).
    fn points(&self, only: Option<&[i32]>) -> Vec<(i32, i64)> {
        self.parts
            .iter()
            .filter(|(p, _)| only.is_none_or(|o| o.contains(p)))
            .filter_map(|(p, part)| {
                let point = part.pending.first().copied().unwrap_or(part.next);
                (point > part.committed).then_some((*p, point))
            })
            .collect()
    }
    fn committed(&mut self, points: &[(i32, i64)]) {
        for (p, o) in points {
            if let Some(part) = self.parts.get_mut(p) {
                part.committed = part.committed.max(*o);
            }
        }
    }
    fn forget(&mut self, parts: &[i32]) {
        for p in parts {
            self.parts.remove(p);
        }
        self.since.retain(|(p, _), _| !parts.contains(p));
        for extra in self.inflight.values_mut() {
            extra.retain(|(p, _)| !parts.contains(p));
        }
        self.epoch += 1;
    }
}

/// The consumer's context: problems to the connection's diagnostics, the
/// lag gauge, and the hand-over at a revocation.
struct MediaContext {
    diagnostics: Diagnostics,
    tracker: Arc<Mutex<Tracker>>,
    assigned: AtomicBool,
    topic: String,
    revoke_wait: Duration,
}

impl ClientContext for MediaContext {
    fn log(&self, level: rdkafka::config::RDKafkaLogLevel, fac: &str, msg: &str) {
        self.diagnostics.on_log(level, fac, msg);
    }
    fn error(&self, error: KafkaError, reason: &str) {
        self.diagnostics.on_error(&error, reason);
    }
    fn stats(&self, statistics: rdkafka::statistics::Statistics) {
        crate::kafka::record_consumer_lag(&statistics);
    }
}

fn tpl_of(topic: &str, points: &[(i32, i64)]) -> TopicPartitionList {
    let mut tpl = TopicPartitionList::new();
    for (p, o) in points {
        let _ = tpl.add_partition_offset(topic, *p, Offset::Offset(*o));
    }
    tpl
}

impl ConsumerContext for MediaContext {
    /// At a revocation: wait (up to `revoke_wait`) for the items in flight
    /// of the revoked partitions to be recorded, commit them, forget them.
    /// The next owner then starts after them: no item fetched twice in the
    /// normal case.
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        let Rebalance::Revoke(tpl) = rebalance else {
            return;
        };
        let parts: Vec<i32> = tpl.elements().iter().map(|e| e.partition()).collect();
        let end = Instant::now() + self.revoke_wait;
        while self.tracker.lock().unwrap().pending_in(&parts) > 0 && Instant::now() < end {
            std::thread::sleep(Duration::from_millis(20));
        }
        let points = self.tracker.lock().unwrap().points(Some(&parts));
        if !points.is_empty() {
            if let Err(e) = consumer.commit(&tpl_of(&self.topic, &points), CommitMode::Sync) {
                tracing::warn!(error = %e, "media: commit at revocation failed");
            }
        }
        self.tracker.lock().unwrap().forget(&parts);
    }

    fn post_rebalance(&self, _c: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Assign(_) = rebalance {
            self.assigned.store(true, Ordering::SeqCst);
        }
    }
}

/// The media plane.
pub struct Media {
    cfg: MediaConfig,
    connection: Connection,
    topics: Topics,
    producer: KafkaProducer,
    store: Store,
    client: MediaClient,
    default_token: Option<Secret>,
    tokens: HashMap<String, Secret>,
    global: Arc<Semaphore>,
    per_number: Mutex<HashMap<String, Arc<Semaphore>>>,
    tracker: Arc<Mutex<Tracker>>,
    /// Hashes of `event_id media_id` recorded on `wa.inbound.media` within
    /// the history window, read at each assignment.
    history: Mutex<HashSet<u64>>,
    /// Items read but not yet recorded, at most this many.
    max_pending: usize,
    /// Partitions were assigned and the history read at least once.
    assigned_once: AtomicBool,
}

fn key_hash(key: &str) -> u64 {
    let d = Sha256::digest(key.as_bytes());
    u64::from_le_bytes(d[..8].try_into().unwrap())
}

/// Backoff before try `attempt + 1`: 250 ms doubling, at most 30 s, ±25 %.
fn backoff(attempt: u32) -> Duration {
    let base = 250u64.saturating_mul(1 << attempt.min(7)).min(30_000);
    let jitter = rand::random_range(0..=base / 2);
    Duration::from_millis(base - base / 4 + jitter)
}

impl Media {
    pub fn new(cfg: &Config, topics: Topics, producer: KafkaProducer) -> anyhow::Result<Media> {
        super::metrics::describe();
        let store = Store::new(&cfg.media)?;
        Ok(Media {
            connection: cfg.kafka.connection.clone(),
            topics,
            producer,
            store,
            client: MediaClient::new(&cfg.graph.base_url, cfg.media.fetch_timeout),
            default_token: cfg.graph.access_token.clone(),
            tokens: cfg
                .egress
                .numbers
                .iter()
                .filter_map(|(n, c)| Some((n.clone(), c.access_token.clone()?)))
                .collect(),
            global: Arc::new(Semaphore::new(cfg.media.concurrency)),
            per_number: Mutex::new(HashMap::new()),
            tracker: Arc::new(Mutex::new(Tracker::default())),
            history: Mutex::new(HashSet::new()),
            max_pending: (cfg.media.concurrency * 8).max(64),
            assigned_once: AtomicBool::new(false),
            cfg: cfg.media.clone(),
        })
    }

    /// The object store.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// Whether partitions were assigned (and the history read) at least once.
    pub fn assigned(&self) -> bool {
        self.assigned_once.load(Ordering::SeqCst)
    }

    /// Items read and not yet recorded.
    pub fn pending(&self) -> usize {
        self.tracker.lock().unwrap().pending()
    }

    /// Publishes the pending and lag gauges.
    pub fn publish_gauges(&self) {
        let t = self.tracker.lock().unwrap();
        metrics::gauge!(mm::PENDING).set(t.pending() as f64);
        metrics::gauge!(mm::OLDEST_PENDING_SECONDS)
            .set(t.oldest().unwrap_or_default().as_secs_f64());
    }

    fn token_for(&self, number: &str) -> Option<&str> {
        self.tokens
            .get(number)
            .or(self.default_token.as_ref())
            .map(|s| s.expose())
    }

    fn number_permits(&self, number: &str) -> Arc<Semaphore> {
        let mut m = self.per_number.lock().unwrap();
        if m.len() > 10_000 {
            // Forget idle numbers (all permits back).
            let max = self.cfg.concurrency_per_number;
            m.retain(|_, s| s.available_permits() < max);
        }
        m.entry(number.to_string())
            .or_insert_with(|| Arc::new(Semaphore::new(self.cfg.concurrency_per_number)))
            .clone()
    }

    /// Starts the consumer thread; it returns when `stop` is cancelled and
    /// what was recorded is committed.
    pub fn spawn(
        self: Arc<Self>,
        stop: CancellationToken,
    ) -> std::io::Result<std::thread::JoinHandle<()>> {
        let rt = tokio::runtime::Handle::current();
        std::thread::Builder::new()
            .name("media-consumer".into())
            .spawn(move || {
                if let Err(e) = self.consume(rt, stop) {
                    tracing::error!(error = %e, "media worker stopped");
                }
            })
    }

    fn consumer(&self) -> Result<BaseConsumer<MediaContext>, KafkaError> {
        let conn = &self.connection;
        conn.client_config(|cc| {
            cc.set("group.id", &self.cfg.group_id)
                .set("enable.auto.commit", "false")
                .set("enable.auto.offset.store", "false")
                .set("auto.offset.reset", "earliest")
                .set("session.timeout.ms", "10000")
                .set("heartbeat.interval.ms", "1000")
                .set("enable.partition.eof", "false")
                .set("queued.max.messages.kbytes", "4096")
                .set(
                    "statistics.interval.ms",
                    crate::kafka::STATISTICS_INTERVAL_MS,
                );
        })
        .create_with_context(MediaContext {
            diagnostics: conn.diagnostics().clone(),
            tracker: self.tracker.clone(),
            assigned: AtomicBool::new(false),
            topic: self.topics.name(TopicId::InboundMessages).to_string(),
            revoke_wait: self.cfg.fetch_timeout.min(Duration::from_secs(30)),
        })
    }

    /// Reads `wa.inbound.media` over the history window: the items already
    /// recorded (a crash after a record was acknowledged, before its offset
    /// was committed) are not fetched again.
    fn load_history(&self) {
        let since =
            crate::clock::now_ms().saturating_sub(self.cfg.history_window.as_millis() as u64);
        let mut seen = HashSet::new();
        let topic = self.topics.name(TopicId::InboundMedia);
        match crate::kafka::read_since(&self.connection, topic, since, |_, v| {
            if let Some(k) = record_key(v) {
                seen.insert(key_hash(&k));
            }
        }) {
            Ok(n) => tracing::info!(records = n, "media: history read"),
            Err(e) => {
                tracing::warn!(error = %e, "media: history not read; items recorded just before a crash may be recorded twice")
            }
        }
        *self.history.lock().unwrap() = seen;
        self.assigned_once.store(true, Ordering::SeqCst);
    }

    fn consume(
        self: Arc<Self>,
        rt: tokio::runtime::Handle,
        stop: CancellationToken,
    ) -> anyhow::Result<()> {
        let consumer = self.consumer()?;
        let topic = self.topics.name(TopicId::InboundMessages).to_string();
        consumer.subscribe(&[&topic])?;
        tracing::info!(topic = %topic, group = %self.cfg.group_id, store = %self.store.describe(), "media worker consuming");
        let jobs_stop = CancellationToken::new();
        let mut last_commit = Instant::now();
        let mut paused = false;
        while !stop.is_cancelled() {
            let pending = self.pending();
            if !paused && pending >= self.max_pending {
                if let Ok(a) = consumer.assignment() {
                    paused = consumer.pause(&a).is_ok();
                }
            } else if paused && pending < self.max_pending / 2 {
                if let Ok(a) = consumer.assignment() {
                    paused = consumer.resume(&a).is_err();
                }
            }
            let msg = consumer.poll(Duration::from_millis(100));
            if consumer.context().assigned.swap(false, Ordering::SeqCst) {
                paused = false;
                self.load_history();
            }
            match msg {
                None => {}
                Some(Err(e)) => {
                    tracing::warn!(error = %e, "media consumer error");
                    std::thread::sleep(Duration::from_millis(200));
                }
                Some(Ok(m)) => {
                    let (p, o) = (m.partition(), m.offset());
                    let item = m.payload().and_then(media_item);
                    tracing::debug!(
                        partition = p,
                        offset = o,
                        media = item.is_some(),
                        "media: message read"
                    );
                    match item {
                        None => self.tracker.lock().unwrap().seen(p, o),
                        Some(item)
                            if self
                                .history
                                .lock()
                                .unwrap()
                                .contains(&key_hash(&item.key())) =>
                        {
                            metrics::counter!(mm::SKIPPED).increment(1);
                            self.tracker.lock().unwrap().seen(p, o);
                        }
                        Some(item) => {
                            let key = key_hash(&item.key());
                            let (fetch, epoch) = {
                                let mut t = self.tracker.lock().unwrap();
                                (t.start(p, o, key), t.epoch)
                            };
                            if fetch {
                                let me = self.clone();
                                let jobs_stop = jobs_stop.clone();
                                rt.spawn(async move {
                                    let recorded = me.run_item(item, &jobs_stop).await;
                                    let mut t = me.tracker.lock().unwrap();
                                    if recorded {
                                        t.finish(p, o, epoch, key);
                                    } else {
                                        // Cancelled at shutdown: nothing done.
                                        t.inflight.remove(&key);
                                    }
                                });
                            } else {
                                metrics::counter!(mm::SKIPPED).increment(1);
                            }
                        }
                    }
                }
            }
            if last_commit.elapsed() >= Duration::from_millis(200) {
                last_commit = Instant::now();
                self.commit(&consumer, &topic, CommitMode::Async);
            }
        }
        // Wind down: items in flight get a few seconds, then are cancelled
        // (their messages are redelivered to the next owner).
        let end = Instant::now() + Duration::from_secs(5);
        while self.pending() > 0 && Instant::now() < end {
            std::thread::sleep(Duration::from_millis(20));
        }
        jobs_stop.cancel();
        self.commit(&consumer, &topic, CommitMode::Sync);
        Ok(())
    }

    fn commit(&self, consumer: &BaseConsumer<MediaContext>, topic: &str, mode: CommitMode) {
        let points = self.tracker.lock().unwrap().points(None);
        if points.is_empty() {
            return;
        }
        match consumer.commit(&tpl_of(topic, &points), mode) {
            Ok(()) => self.tracker.lock().unwrap().committed(&points),
            Err(e) => tracing::warn!(error = %e, "media: offset commit failed"),
        }
    }

    /// Fetches one item and records its outcome; true once the record is
    /// acknowledged (false: cancelled by the shutdown before that).
    async fn run_item(&self, item: MediaItem, stop: &CancellationToken) -> bool {
        let started = Instant::now();
        let rec = tokio::select! {
            r = self.fetch(&item) => r,
            _ = stop.cancelled() => return false,
        };
        let reason = rec.error.as_ref().map(|e| e.reason()).unwrap_or("none");
        metrics::counter!(mm::FETCHES, "outcome" => rec.outcome, "reason" => reason).increment(1);
        metrics::histogram!(mm::FETCH_SECONDS).record(started.elapsed().as_secs_f64());
        if rec.outcome == "failed" {
            tracing::warn!(media_id = %item.media_id, reason, "media item failed");
        }
        self.produce(&rec, stop).await
    }

    /// Produces the record until Kafka acknowledges it (or shutdown).
    async fn produce(&self, rec: &MediaRecord, stop: &CancellationToken) -> bool {
        let payload = serde_json::to_vec(rec).unwrap_or_default();
        let event_id = format!("{}:{}", rec.event_id, rec.media_id);
        let topic = self.topics.name(TopicId::InboundMedia);
        let mut attempt = 0;
        loop {
            let sent = RecordHeaders::new(&event_id, Kind::Media, "media").with(|h| {
                self.producer
                    .send(topic, rec.phone_number_id.as_bytes(), &payload, h)
            });
            let err = match sent {
                Ok(d) => match d.await {
                    Ok(()) => return true,
                    Err(e) => e.to_string(),
                },
                Err(e) => e.to_string(),
            };
            attempt += 1;
            tracing::warn!(error = %err, "media: record not acknowledged; retrying");
            tokio::select! {
                _ = tokio::time::sleep(backoff(attempt)) => {}
                _ = stop.cancelled() => return false,
            }
        }
    }

    /// The outcome of one item: permits, then tries with backoff.
    pub async fn fetch(&self, item: &MediaItem) -> MediaRecord {
        let now = crate::clock::now_ms();
        if item.sent_at_ms > 0 && now.saturating_sub(item.sent_at_ms) > MEDIA_LIFETIME_MS {
            return MediaRecord::failed(
                item,
                ItemError::gateway(
                    "expired",
                    "the message is older than Meta's 7 days of media retention; not fetched",
                ),
            );
        }
        let Some(token) = self.token_for(&item.phone_number_id).map(str::to_string) else {
            return MediaRecord::failed(
                item,
                ItemError::gateway(
                    "no_token",
                    "no access token for this number (graph.access_token_env or egress.numbers.ID.access_token_env)",
                ),
            );
        };
        let number = self.number_permits(&item.phone_number_id);
        let _n = number.acquire_owned().await;
        let _g = self.global.clone().acquire_owned().await;
        let mut attempt = 0u32;
        loop {
            attempt += 1;
            match self.try_fetch(item, &token).await {
                Ok(rec) => return rec,
                Err(FetchError::Permanent(e)) => return MediaRecord::failed(item, e),
                Err(FetchError::Retry { reason, detail }) => {
                    metrics::counter!(mm::RETRIES, "reason" => reason).increment(1);
                    if attempt >= self.cfg.max_attempts {
                        return MediaRecord::failed(
                            item,
                            ItemError::gateway(
                                "retries_exhausted",
                                format!("{attempt} tries; last: {detail}"),
                            ),
                        );
                    }
                    tracing::debug!(reason, %detail, attempt, "media: retrying");
                    tokio::time::sleep(backoff(attempt)).await;
                }
            }
        }
    }

    async fn try_fetch(&self, item: &MediaItem, token: &str) -> Result<MediaRecord, FetchError> {
        let info = self.client.lookup(&item.media_id, token).await?;
        if info.file_size > self.cfg.max_bytes {
            return Err(FetchError::Permanent(ItemError::gateway(
                "too_large",
                format!(
                    "{} bytes announced; media.max_bytes is {}",
                    info.file_size, self.cfg.max_bytes
                ),
            )));
        }
        let path = self
            .store
            .object_path(&item.phone_number_id, item.user(), &item.media_id);
        let stored = |info: &MediaInfo| {
            MediaRecord::stored(
                item,
                info.mime_type.clone(),
                &info.sha256,
                info.file_size,
                self.store.uri(&path),
            )
        };
        // Stored already (a crash after the object, before the record)?
        match self.store.size_of(&path).await {
            Ok(Some(n)) if n == info.file_size => {
                if let Ok((sha, _)) = self.store.sha256_of(&path).await {
                    if sha == info.sha256 {
                        metrics::counter!(mm::REUSED).increment(1);
                        return Ok(stored(&info));
                    }
                }
            }
            Ok(_) => {}
            Err(e) => return Err(store_retry(e)),
        }
        let resp = self.client.download(&info.url, token).await?;
        let mut body = resp.into_body();
        let mut writer = self
            .store
            .writer(path.clone(), &info.mime_type, info.file_size)
            .await
            .map_err(store_retry)?;
        let mut hasher = Sha256::new();
        let mut n = 0u64;
        let deadline = tokio::time::Instant::now() + self.cfg.fetch_timeout;
        let failure = loop {
            let frame = match tokio::time::timeout_at(deadline, body.frame()).await {
                Err(_) => {
                    break FetchError::Retry {
                        reason: "timeout",
                        detail: format!(
                            "download not complete within {} ms",
                            self.cfg.fetch_timeout.as_millis()
                        ),
                    }
                }
                Ok(None) => {
                    if n != info.file_size {
                        break FetchError::Retry {
                            reason: "truncated",
                            detail: format!("{n} of {} bytes received", info.file_size),
                        };
                    }
                    let sha: [u8; 32] = hasher.finalize().into();
                    if sha != info.sha256 {
                        writer.abort().await;
                        return Err(FetchError::Permanent(ItemError::gateway(
                            "checksum_mismatch",
                            format!(
                                "SHA-256 of the {n} bytes received is {}, Meta announced {}; nothing stored",
                                hex::encode(sha),
                                hex::encode(info.sha256)
                            ),
                        )));
                    }
                    writer.finish().await.map_err(store_retry)?;
                    return Ok(stored(&info));
                }
                Ok(Some(Err(e))) => {
                    break FetchError::Retry {
                        reason: "connect",
                        detail: format!("download interrupted: {e}"),
                    }
                }
                Ok(Some(Ok(f))) => f,
            };
            let Ok(data) = frame.into_data() else {
                continue;
            };
            n += data.len() as u64;
            if n > info.file_size {
                break FetchError::Permanent(ItemError::gateway(
                    "size_mismatch",
                    format!("more than the {} bytes announced", info.file_size),
                ));
            }
            metrics::counter!(mm::BYTES).increment(data.len() as u64);
            hasher.update(&data);
            if let Err(e) = writer.write(&data).await {
                break store_retry(e);
            }
        };
        writer.abort().await;
        Err(failure)
    }

    /// Deletes the objects of one person of one number, under each of their
    /// ids (phone digits, BSUID); returns how many.
    pub async fn erase(&self, phone_number_id: &str, ids: &[String]) -> anyhow::Result<usize> {
        let mut n = 0;
        for id in ids {
            n += self.store.delete_user(phone_number_id, id).await?;
        }
        metrics::counter!(mm::DELETED, "reason" => "erasure").increment(n as u64);
        Ok(n)
    }

    /// One retention sweep: objects older than `retention_days`.
    pub async fn sweep_once(&self) -> anyhow::Result<usize> {
        let Some(keep) = self.cfg.retention else {
            return Ok(0);
        };
        let cutoff = std::time::SystemTime::now() - keep;
        let n = self.store.sweep(cutoff).await?;
        metrics::counter!(mm::DELETED, "reason" => "retention").increment(n as u64);
        Ok(n)
    }

    /// A directory store's staging files older than [`STAGING_MAX_AGE`]:
    /// uploads a crash cut (no upload runs that long: a fetch is bounded by
    /// `media.fetch_timeout_ms`).
    pub async fn sweep_staging_once(&self) -> std::io::Result<usize> {
        let cutoff = std::time::SystemTime::now() - STAGING_MAX_AGE;
        let n = self.store.sweep_staging(cutoff).await?;
        metrics::counter!(mm::DELETED, "reason" => "staging").increment(n as u64);
        Ok(n)
    }

    /// The sweeps, every `sweep_interval` until `stop`: retention (when
    /// `retention_days` is set) and a directory store's staging files.
    pub async fn sweep_loop(self: Arc<Self>, stop: CancellationToken) {
        let mut tick = tokio::time::interval(self.cfg.sweep_interval);
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tick.tick() => {}
            }
            match self.sweep_once().await {
                Ok(0) => {}
                Ok(n) => tracing::info!(deleted = n, "media: retention sweep"),
                Err(e) => tracing::warn!(error = %e, "media: retention sweep failed"),
            }
            match self.sweep_staging_once().await {
                Ok(0) => {}
                Ok(n) => tracing::info!(deleted = n, "media: staging files of cut uploads removed"),
                Err(e) => tracing::warn!(error = %e, "media: staging sweep failed"),
            }
        }
    }
}

/// Age after which a directory store's staging file is an upload a crash
/// cut, and is removed by the sweep.
pub const STAGING_MAX_AGE: std::time::Duration = std::time::Duration::from_secs(86_400);

fn store_retry(e: object_store::Error) -> FetchError {
    FetchError::Retry {
        reason: "store",
        detail: format!("object store: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commit_points_wait_for_the_lowest_pending_offset() {
        let mut t = Tracker::default();
        t.seen(0, 0);
        assert!(t.start(0, 1, 11));
        assert!(t.start(0, 2, 12));
        t.seen(0, 3);
        assert_eq!(t.points(None), vec![(0, 1)]);
        t.finish(0, 2, 0, 12);
        assert_eq!(t.points(None), vec![(0, 1)]);
        t.finish(0, 1, 0, 11);
        assert_eq!(t.points(None), vec![(0, 4)]);
        t.committed(&[(0, 4)]);
        assert!(t.points(None).is_empty());
        // Revoked while in flight, assigned back, delivered again: the
        // second delivery waits for the first fetch.
        assert!(t.start(0, 4, 14));
        t.forget(&[0]);
        assert!(!t.start(0, 4, 14));
        assert_eq!(t.pending(), 1);
        t.finish(0, 4, 0, 14);
        assert_eq!(t.pending(), 0);
        assert!(
            t.start(0, 5, 14),
            "a later delivery after the fetch fetches"
        );
        assert!(backoff(1) >= Duration::from_millis(300));
        assert!(backoff(30) <= Duration::from_millis(45_000));
    }
}
