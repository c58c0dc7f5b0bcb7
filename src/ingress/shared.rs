//! The fleet's dedupe (DESIGN §12): every instance writes the ids it stored
//! to `inbound.ids` and reads every other instance's back into its own
//! [`Dedupe`] set, so a redelivery that reaches any instance, or this one
//! after a restart, produces no second record.
//!
//! Writing ([`IdShare`]): a POST whose records are all acknowledged hands
//! their id hashes to the sharer and waits (until its deadline) for them to
//! be acknowledged on `inbound.ids` before it answers 200; so a 200 means
//! the ids are durable, and an instance started after it knows them. The
//! sharer is a group commit: one record carries the ids of every POST that
//! finished while earlier id records were in flight (at most
//! [`MAX_IN_FLIGHT`] of them), so under load the cost is a few records per
//! produce round, not one per POST. Ids are written only after their events
//! are acknowledged: an id on the topic always means its event is stored,
//! and no instance can drop an event that was not (nothing accepted is
//! lost).
//!
//! Record: key = the writing process's instance id (16 hex digits, random
//! per start, so a process skips its own records), value = `0x01` then the
//! 64-bit hashes ([`Dedupe::hash`]) as little-endian words, at most
//! [`MAX_IDS_PER_RECORD`]; time = Kafka's record timestamp, from which each
//! id's window is counted. 8 bytes per id and ~70 bytes per record on the
//! broker.
//!
//! Reading ([`tail`]): a thread with a plain consumer (no group, nothing
//! committed) on every partition of `inbound.ids`, from the offsets of
//! `now − window` (the whole window is read back at start: `/readyz` waits
//! for it, like the contacts bootstrap) and then following, fetching at
//! least every `dedupe_propagation_ms / 10`. An id of another instance that
//! this one also stored (or is storing) is a *late duplicate*: two deliveries
//! closer together than the propagation delay both produced the event;
//! counted in `wagate_dedupe_late_duplicates_total` by every instance that
//! sees it once caught up.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::consumer::Consumer;
use rdkafka::error::KafkaError;
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};
use tokio::sync::{oneshot, Notify, Semaphore};
use tokio_util::sync::CancellationToken;

use super::dedupe::{Dedupe, Learned};
use crate::kafka::{headers, Connection, KafkaProducer, RecordAck, RecordTag};
use crate::metrics as m;

/// Id records in flight at once; POSTs that finish meanwhile share the next.
pub const MAX_IN_FLIGHT: usize = 4;
/// At most this many ids in one record (128 KiB of hashes).
pub const MAX_IDS_PER_RECORD: usize = 16 * 1024;
const VERSION: u8 = 1;

/// This process's id on `inbound.ids`: random per start.
pub fn instance_key() -> [u8; 16] {
    let n: u64 = rand::random();
    let mut out = [0u8; 16];
    hex::encode_to_slice(n.to_be_bytes(), &mut out).expect("16 hex digits");
    out
}

/// The value of an id record.
pub fn encode(ids: &[u64], out: &mut Vec<u8>) {
    out.clear();
    out.reserve(1 + ids.len() * 8);
    out.push(VERSION);
    for h in ids {
        out.extend_from_slice(&h.to_le_bytes());
    }
}

/// The ids of an id record's value; None when it is not one (another
/// version, a truncated value): skipped, never guessed at.
pub fn decode(value: &[u8]) -> Option<impl Iterator<Item = u64> + '_> {
    let (&v, rest) = value.split_first()?;
    if v != VERSION || rest.len() % 8 != 0 {
        return None;
    }
    Some(
        rest.chunks_exact(8)
            .map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes"))),
    )
}

#[derive(Default)]
struct Queue {
    ids: Vec<u64>,
    waiters: Vec<oneshot::Sender<bool>>,
    /// Something was submitted since the last drain.
    pending: bool,
}

/// The writing side: a group commit of id records (see the module's text).
pub struct IdShare {
    producer: KafkaProducer,
    topic: String,
    key: [u8; 16],
    queue: Mutex<Queue>,
    wake: Notify,
    in_flight: Arc<Semaphore>,
    failures: Arc<std::sync::atomic::AtomicU64>,
    records: metrics::Counter,
    ids: metrics::Counter,
}

impl IdShare {
    pub fn new(producer: KafkaProducer, topic: String, key: [u8; 16]) -> Arc<IdShare> {
        Arc::new(IdShare {
            producer,
            topic,
            key,
            queue: Mutex::new(Queue::default()),
            wake: Notify::new(),
            in_flight: Arc::new(Semaphore::new(MAX_IN_FLIGHT)),
            failures: Default::default(),
            records: {
                // Published at 0: a dashboard and an alert can rate it.
                metrics::counter!(m::DEDUPE_SHARE_FAILURES).absolute(0);
                metrics::counter!(m::DEDUPE_SHARED_RECORDS)
            },
            ids: metrics::counter!(m::DEDUPE_SHARED_IDS),
        })
    }

    pub fn key(&self) -> &[u8; 16] {
        &self.key
    }

    /// Id records not acknowledged (or not enqueued) so far.
    pub fn failures(&self) -> u64 {
        self.failures.load(Ordering::Relaxed)
    }

    /// Queues stored ids; `waiter` gets `true` once their record was
    /// acknowledged, or was not (counted in
    /// `wagate_dedupe_share_failures_total`: the events are stored either
    /// way, so the POST still gets its 200). Called on librdkafka's delivery
    /// thread: a lock and a wake-up.
    pub fn submit(&self, ids: &[u64], waiter: Option<oneshot::Sender<bool>>) {
        {
            let mut q = self.queue.lock().unwrap_or_else(|e| e.into_inner());
            q.ids.extend_from_slice(ids);
            q.waiters.extend(waiter);
            q.pending = true;
        }
        self.wake.notify_one();
    }

    /// The sharer's loop: one record per drain of the queue, at most
    /// [`MAX_IN_FLIGHT`] in flight. Ends when `stop` is cancelled and the
    /// queue is empty.
    pub async fn run(self: Arc<Self>, stop: CancellationToken) {
        let mut value = Vec::new();
        loop {
            // Wait for something to share, then for a free slot: what
            // arrives meanwhile joins the same record.
            let pending = self.queue.lock().unwrap_or_else(|e| e.into_inner()).pending;
            if !pending {
                tokio::select! {
                    _ = self.wake.notified() => continue,
                    _ = stop.cancelled() => return,
                }
            }
            let Ok(permit) = self.in_flight.clone().acquire_owned().await else {
                return;
            };
            let batch = {
                let mut q = self.queue.lock().unwrap_or_else(|e| e.into_inner());
                if q.ids.len() <= MAX_IDS_PER_RECORD {
                    std::mem::take(&mut *q)
                } else {
                    // A record at most MAX_IDS_PER_RECORD ids; the waiters
                    // are answered with the last record of the drain.
                    let ids: Vec<u64> = q.ids.drain(..MAX_IDS_PER_RECORD).collect();
                    Queue {
                        ids,
                        ..Queue::default()
                    }
                }
            };
            if batch.ids.is_empty() {
                for w in batch.waiters {
                    let _ = w.send(true);
                }
                continue;
            }
            encode(&batch.ids, &mut value);
            let ack = Arc::new(ShareAck {
                failures: self.failures.clone(),
                waiters: Mutex::new(batch.waiters),
                _permit: Mutex::new(Some(permit)),
            });
            let sent = self.producer.send_tagged(
                &self.topic,
                &self.key,
                &value,
                &[(headers::KIND, b"ids")],
                ack.clone(),
                RecordTag { id: 0, tag: 0 },
            );
            match sent {
                Ok(()) => {
                    self.records.increment(1);
                    self.ids.increment(batch.ids.len() as u64);
                }
                Err(e) => {
                    tracing::warn!(error = ?e, "an id record was not enqueued");
                    self.failures.fetch_add(1, Ordering::Relaxed);
                    metrics::counter!(m::DEDUPE_SHARE_FAILURES).increment(1);
                    ack.finish(false);
                }
            }
        }
    }
}

/// The waiters of one id record, answered by its delivery report.
struct ShareAck {
    failures: Arc<std::sync::atomic::AtomicU64>,
    waiters: Mutex<Vec<oneshot::Sender<bool>>>,
    /// Released with the report: the next record may go.
    _permit: Mutex<Option<tokio::sync::OwnedSemaphorePermit>>,
}

impl ShareAck {
    fn finish(&self, _ok: bool) {
        let waiters = std::mem::take(&mut *self.waiters.lock().unwrap_or_else(|e| e.into_inner()));
        // The POSTs' records are stored either way: they answer 200.
        for w in waiters {
            let _ = w.send(true);
        }
        self._permit
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
    }
}

impl RecordAck for ShareAck {
    fn done(&self, _id: u64, _tag: u32, result: Result<(), &KafkaError>) {
        if let Err(e) = result {
            self.failures.fetch_add(1, Ordering::Relaxed);
            metrics::counter!(m::DEDUPE_SHARE_FAILURES).increment(1);
            tracing::warn!(error = %e, "an id record was not acknowledged: its ids are known to this instance only");
        }
        self.finish(result.is_ok());
    }
}

/// What [`tail`] reports on.
pub struct TailOptions {
    pub topic: String,
    /// This process's key: its own records are skipped.
    pub own_key: [u8; 16],
    /// How stale an id may be when it reaches another instance (sets the
    /// fetch wait).
    pub propagation: Duration,
}

/// Reads `inbound.ids` back from `now − window` into `dedupe`, calls
/// `on_caught_up` once at the high watermarks of the start, then follows
/// until `stop`. Blocking: run it on its own thread.
pub fn tail(
    conn: &Connection,
    opts: &TailOptions,
    dedupe: &Dedupe,
    on_caught_up: Box<dyn FnOnce() + Send>,
    stop: &CancellationToken,
) -> Result<(), KafkaError> {
    let wait_ms = (opts.propagation.as_millis() as u64 / 10).clamp(5, 100);
    let consumer = crate::kafka::reader(conn, "wagate-dedupe", |cc| {
        cc.set("fetch.wait.max.ms", wait_ms.to_string())
            .set("fetch.queue.backoff.ms", "5");
    })?;
    let timeout = Duration::from_secs(10);
    let topic = opts.topic.as_str();
    let since_ms = crate::clock::now_ms().saturating_sub(u64::from(dedupe.window_secs()) * 1000);
    let started = Instant::now();
    // Where the window starts in each partition, and where "caught up" is
    // (without a time index, from the oldest record: ids older than the
    // window are then skipped by `learn`).
    let mut assign = TopicPartitionList::new();
    let mut behind: HashMap<i32, i64> = HashMap::new();
    for r in crate::kafka::ranges(&consumer, topic, Some(since_ms), None, timeout)? {
        if r.end > r.start {
            behind.insert(r.partition, r.end);
        }
        assign.add_partition_offset(topic, r.partition, Offset::Offset(r.start))?;
    }
    consumer.assign(&assign)?;
    let remaining = |behind: &HashMap<i32, i64>, at: &HashMap<i32, i64>| -> i64 {
        behind
            .iter()
            .map(|(p, end)| end - at.get(p).copied().unwrap_or(0))
            .sum::<i64>()
            .max(0)
    };
    let mut at: HashMap<i32, i64> = assign
        .elements()
        .iter()
        .filter_map(|e| match e.offset() {
            Offset::Offset(o) => Some((e.partition(), o)),
            _ => None,
        })
        .collect();
    let gauge_remaining = metrics::gauge!(m::DEDUPE_BOOTSTRAP_REMAINING);
    gauge_remaining.set(remaining(&behind, &at) as f64);
    let learned_c = metrics::counter!(m::DEDUPE_LEARNED);
    let late_c = metrics::counter!(m::DEDUPE_LATE_DUPLICATES);
    // From other instances (the bound that matters) and this one's own
    // records coming back (the topic's round trip, seen with one instance).
    let propagation = [
        metrics::histogram!(m::DEDUPE_PROPAGATION_SECONDS, "from" => "other"),
        metrics::histogram!(m::DEDUPE_PROPAGATION_SECONDS, "from" => "self"),
    ];
    let mut on_caught_up = Some(on_caught_up);
    let caught_up = AtomicBool::new(false);
    let mut reached = behind.is_empty();
    let (mut records, mut ids) = (0u64, 0u64);
    while !stop.is_cancelled() {
        match consumer.poll(Duration::from_millis(100)) {
            None => {
                if reached && !caught_up.load(Ordering::Relaxed) {
                    caught_up.store(true, Ordering::Relaxed);
                    gauge_remaining.set(0.0);
                    let secs = started.elapsed().as_secs_f64();
                    metrics::gauge!(m::DEDUPE_BOOTSTRAP_SECONDS).set(secs);
                    tracing::info!(
                        records,
                        ids,
                        held = dedupe.stats().entries,
                        elapsed_ms = (secs * 1000.0) as u64,
                        "dedupe window read back"
                    );
                    if let Some(f) = on_caught_up.take() {
                        f();
                    }
                }
            }
            Some(Err(e)) => {
                tracing::warn!(error = %e, "reading inbound.ids");
                std::thread::sleep(Duration::from_millis(100));
            }
            Some(Ok(msg)) => {
                let p = msg.partition();
                let offset = msg.offset();
                at.insert(p, offset + 1);
                if !reached {
                    if behind.get(&p).is_some_and(|end| offset + 1 >= *end) {
                        behind.remove(&p);
                    }
                    reached = behind.is_empty();
                    if records % 256 == 0 || reached {
                        gauge_remaining.set(remaining(&behind, &at) as f64);
                    }
                }
                records += 1;
                if msg.key() == Some(&opts.own_key[..]) {
                    if caught_up.load(Ordering::Relaxed) {
                        if let Some(t) = msg.timestamp().to_millis().filter(|t| *t > 0) {
                            let now = crate::clock::now_ms();
                            propagation[1].record(now.saturating_sub(t as u64) as f64 / 1000.0);
                        }
                    }
                    continue;
                }
                let Some(payload) = msg.payload() else {
                    continue;
                };
                let Some(hashes) = decode(payload) else {
                    tracing::warn!(
                        partition = p,
                        offset,
                        "a record on inbound.ids is not an id record; skipped"
                    );
                    continue;
                };
                let now = crate::clock::now_ms();
                let stored_at = msg
                    .timestamp()
                    .to_millis()
                    .filter(|t| *t > 0)
                    .map_or(now, |t| t as u64);
                let live = caught_up.load(Ordering::Relaxed);
                if live {
                    propagation[0].record(now.saturating_sub(stored_at) as f64 / 1000.0);
                }
                let (mut new, mut late) = (0u64, 0u64);
                for h in hashes {
                    match dedupe.learn(h, stored_at) {
                        Learned::New => new += 1,
                        Learned::AlreadyHeld => late += 1,
                        Learned::Expired => {}
                    }
                }
                ids += new;
                learned_c.increment(new);
                if live && late > 0 {
                    late_c.increment(late);
                    tracing::warn!(
                        events = late,
                        "late duplicates: events this instance stored were also stored by another instance (deliveries closer together than the propagation delay)"
                    );
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
    fn id_records_round_trip_and_foreign_values_are_refused() {
        let mut v = Vec::new();
        encode(&[1, u64::MAX, 0x0102_0304_0506_0708], &mut v);
        assert_eq!(v.len(), 1 + 24);
        assert_eq!(
            decode(&v).unwrap().collect::<Vec<_>>(),
            vec![1, u64::MAX, 0x0102_0304_0506_0708]
        );
        assert!(decode(&[]).is_none());
        assert!(decode(&[2, 0, 0, 0, 0, 0, 0, 0, 0]).is_none());
        assert!(decode(&v[..v.len() - 1]).is_none());
        assert_eq!(decode(&[1]).unwrap().count(), 0);
        let k = instance_key();
        assert!(k.iter().all(u8::is_ascii_hexdigit));
        assert_ne!(instance_key(), k);
    }
}
