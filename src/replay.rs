//! `wagate replay` (DESIGN §12): re-derives events from the bodies kept on
//! `inbound.raw` with today's fan-out, into the configured prefix (where the
//! fleet's dedupe drops what is already stored) or another one.
//!
//! - Range: bodies received in `[from_ms, to_ms)` by their
//!   `wagate-received-at-ms` header; the raw topic is read from the offsets
//!   of `from_ms` to those of `to_ms` plus a minute (a body is produced a
//!   moment after it is received), or to the high watermarks of the start.
//! - `--app`: only bodies of that Meta app (`wagate-app`).
//! - Bodies that were kept raw (unparseable, over a limit) are counted and
//!   skipped: today's fan-out keeps them raw again.
//! - Records keep the original `received_at_ms` (in the value, from the raw
//!   record's header) and carry `wagate-replay: 1`.
//! - Dedupe: the target prefix's `inbound.ids` window is read back first
//!   and followed while the replay runs, so ids the live gateways stored are
//!   dropped; what the replay stores is written to `inbound.ids` too, and a
//!   body seen twice on the raw topic (Meta's redeliveries) yields its
//!   events once.
//! - Contacts records (consent, windows, links) are derived only with
//!   `--contacts`, against the target prefix's contacts state read back
//!   first.
//! - Memory is bounded: at most [`MAX_BODIES_IN_FLIGHT`] bodies' records
//!   are unacknowledged at once, and the dedupe set by
//!   `ingress.dedupe_max_entries`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use rdkafka::consumer::Consumer;
use rdkafka::message::{Headers, Message};
use rdkafka::{Offset, TopicPartitionList};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::contacts::Contacts;
use crate::ingress::dedupe::{Claim, Dedupe};
use crate::ingress::shared::{self, IdShare};
use crate::kafka::{headers, Kind, RecordHeaders, TopicId, Topics};
use crate::meta::webhook;

/// Header on every record `replay` writes.
pub const REPLAY_HEADER: &str = "wagate-replay";
/// Bodies whose records may be unacknowledged at once.
pub const MAX_BODIES_IN_FLIGHT: usize = 256;
/// Raw records past `to_ms` still read (their receipt time decides).
const TO_SLACK_MS: u64 = 60_000;

#[derive(Debug, Clone, Default)]
pub struct ReplayOptions {
    pub from_ms: Option<u64>,
    pub to_ms: Option<u64>,
    pub app: Option<String>,
    /// Default: the configured prefix.
    pub target_prefix: Option<String>,
    pub dry_run: bool,
    pub contacts: bool,
}

/// What a replay did.
#[derive(Debug, Default)]
pub struct Summary {
    /// Raw records read.
    pub read: AtomicU64,
    /// Of those, in the range and of the app.
    pub selected: AtomicU64,
    /// Selected bodies that were kept raw when received (not exploded).
    pub kept_raw: AtomicU64,
    /// Event records produced and acknowledged (would be, on a dry run).
    pub events: AtomicU64,
    /// Contacts records produced and acknowledged.
    pub contacts: AtomicU64,
    /// Events dropped because they are stored already (or twice in range).
    pub duplicates: AtomicU64,
    /// Records (events, contacts, id records) Kafka did not acknowledge.
    pub failed: AtomicU64,
}

impl Summary {
    fn get(c: &AtomicU64) -> u64 {
        c.load(Ordering::Relaxed)
    }

    pub fn line(&self) -> String {
        format!(
            "read {} bodies, selected {}, kept raw {}; produced {} events and {} contacts records; skipped {} duplicates; {} not acknowledged",
            Self::get(&self.read),
            Self::get(&self.selected),
            Self::get(&self.kept_raw),
            Self::get(&self.events),
            Self::get(&self.contacts),
            Self::get(&self.duplicates),
            Self::get(&self.failed),
        )
    }

    pub fn failed(&self) -> u64 {
        Self::get(&self.failed)
    }

    /// The summary as Prometheus text (for a node exporter's textfile
    /// collector: `--metrics-file`).
    pub fn prometheus(&self) -> String {
        let mut out = String::new();
        for (name, help, v) in [
            (
                "wagate_replay_bodies_read_total",
                "Raw records read by the last replay.",
                &self.read,
            ),
            (
                "wagate_replay_bodies_selected_total",
                "Bodies in the replay's range and app.",
                &self.selected,
            ),
            (
                "wagate_replay_bodies_kept_raw_total",
                "Selected bodies kept raw when received (not re-derived).",
                &self.kept_raw,
            ),
            (
                "wagate_replay_events_total",
                "Event records the replay produced.",
                &self.events,
            ),
            (
                "wagate_replay_contacts_records_total",
                "Contacts records the replay produced.",
                &self.contacts,
            ),
            (
                "wagate_replay_duplicates_total",
                "Events the replay skipped as already stored.",
                &self.duplicates,
            ),
            (
                "wagate_replay_failed_total",
                "Records the replay's Kafka did not acknowledge.",
                &self.failed,
            ),
        ] {
            out.push_str(&format!(
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {}\n",
                Self::get(v)
            ));
        }
        out
    }
}

/// Runs a replay to its end; `progress` is called about once a second.
pub async fn run(
    cfg: &Config,
    opts: &ReplayOptions,
    mut progress: impl FnMut(&Summary),
) -> anyhow::Result<Arc<Summary>> {
    if let (Some(f), Some(t)) = (opts.from_ms, opts.to_ms) {
        anyhow::ensure!(f < t, "--from-ms must be before --to-ms");
    }
    if let Some(app) = &opts.app {
        anyhow::ensure!(
            cfg.apps.iter().any(|a| &a.name == app),
            "--app {app}: no Meta app of that name is configured"
        );
    }
    let source = Topics::new(&cfg.kafka.topic_prefix);
    let target_prefix = opts
        .target_prefix
        .clone()
        .unwrap_or_else(|| cfg.kafka.topic_prefix.clone());
    let target = Topics::new(&target_prefix);
    let conn = cfg.kafka.connection.clone();
    let mut kcfg = cfg.kafka.clone();
    kcfg.topic_prefix = target_prefix.clone();
    let names: Vec<String> = TopicId::ALL
        .iter()
        .map(|t| target.name(*t).to_string())
        .collect();
    let c = conn.clone();
    let missing = tokio::task::spawn_blocking(move || missing_topics(&c, &names)).await??;
    // A dry run into a prefix without topics starts from an empty window.
    let ids_missing = missing
        .iter()
        .any(|n| n == target.name(TopicId::InboundIds));
    if !missing.is_empty() && !opts.dry_run {
        anyhow::ensure!(
            target_prefix != cfg.kafka.topic_prefix,
            "topics of the configured prefix are missing ({}): run `wagate topics create`",
            missing.join(", ")
        );
        crate::kafka::create_topics(&kcfg)
            .await
            .with_context(|| format!("creating the topics of prefix {target_prefix:?}"))?;
    }
    let stop = CancellationToken::new();
    let _stop_guard = stop.clone().drop_guard();

    // The target's dedupe window, followed while the replay runs.
    let dedupe = Arc::new(Dedupe::new(
        cfg.ingress.dedupe_window,
        cfg.ingress.dedupe_max_entries,
    ));
    let key = shared::instance_key();
    let ids_topic = target.name(TopicId::InboundIds).to_string();
    let (tx, rx) = tokio::sync::oneshot::channel();
    let skip_tail = opts.dry_run && ids_missing;
    let tail = {
        let (conn, dedupe, stop) = (conn.clone(), dedupe.clone(), stop.clone());
        let o = shared::TailOptions {
            topic: ids_topic.clone(),
            own_key: key,
            propagation: cfg.ingress.dedupe_propagation,
        };
        std::thread::spawn(move || {
            if skip_tail {
                let _ = tx.send(());
                return Ok(());
            }
            shared::tail(
                &conn,
                &o,
                &dedupe,
                Box::new(move || {
                    let _ = tx.send(());
                }),
                &stop,
            )
        })
    };
    if rx.await.is_err() {
        let e = tail
            .join()
            .map_err(|_| anyhow::anyhow!("the reader panicked"))?;
        return Err(anyhow::anyhow!(
            "reading {ids_topic} back: {}",
            e.err().map(|e| e.to_string()).unwrap_or_default()
        ));
    }

    // Contacts state of the target, for --contacts.
    let contacts = if opts.contacts {
        let cache = Arc::new(crate::contacts::MemoryContacts::new());
        let (tx, rx) = tokio::sync::oneshot::channel();
        let tx = std::sync::Mutex::new(Some(tx));
        let (conn, c, stop, t) = (conn.clone(), cache.clone(), stop.clone(), target.clone());
        std::thread::spawn(move || {
            let _ = crate::contacts::sync::run(
                &conn,
                t.name(TopicId::Consent),
                t.name(TopicId::Windows),
                t.name(TopicId::Users),
                c,
                Box::new(move || {
                    if let Some(tx) = tx.lock().unwrap().take() {
                        let _ = tx.send(());
                    }
                }),
                stop,
            );
        });
        rx.await
            .map_err(|_| anyhow::anyhow!("reading the target's contacts topics failed"))?;
        Some(cache)
    } else {
        None
    };

    let producer = crate::kafka::KafkaProducer::new(&kcfg)?;
    let share = (!opts.dry_run).then(|| IdShare::new(producer.clone(), ids_topic.clone(), key));
    let sharer = share
        .clone()
        .map(|s| tokio::spawn(s.run(stop.child_token())));
    let summary = Arc::new(Summary::default());
    let in_flight = Arc::new(Semaphore::new(MAX_BODIES_IN_FLIGHT));

    // The raw topic, range by time, on a blocking thread feeding bodies.
    let (body_tx, mut body_rx) = tokio::sync::mpsc::channel::<RawBody>(64);
    let reader = {
        let (conn, topic, summary) = (
            conn.clone(),
            source.name(TopicId::InboundRaw).to_string(),
            summary.clone(),
        );
        let (from, to) = (opts.from_ms, opts.to_ms);
        let app = opts.app.clone();
        let stop = stop.clone();
        std::thread::spawn(move || {
            read_raw(
                &conn,
                &topic,
                from,
                to,
                app.as_deref(),
                &summary,
                &body_tx,
                &stop,
            )
        })
    };
    let keywords = cfg.contacts.keywords();
    let limits = cfg.ingress.limits;
    let mut last = Instant::now();
    let mut id_waits = Vec::new();
    while let Some(raw) = body_rx.recv().await {
        if last.elapsed() >= Duration::from_secs(1) {
            progress(&summary);
            last = Instant::now();
        }
        if raw.kept_raw {
            summary.kept_raw.fetch_add(1, Ordering::Relaxed);
            continue;
        }
        let permit = in_flight.clone().acquire_owned().await?;
        let mut copy = raw.body.clone();
        let ctx = webhook::Context {
            app: &raw.app,
            received_at_ms: raw.received_at_ms,
        };
        let Ok(root) = webhook::parse(&mut copy, limits.max_depth) else {
            summary.kept_raw.fetch_add(1, Ordering::Relaxed);
            continue;
        };
        if !matches!(
            webhook::plan(&root, ctx, raw.body.len(), &limits),
            Ok(Ok(_))
        ) {
            summary.kept_raw.fetch_add(1, Ordering::Relaxed);
            continue;
        }
        let batch = crate::ingress::dedupe::Batch::new();
        let mut sends = Vec::new();
        let mut enqueue_failed = 0u64;
        let mut offer = |event_id: &str,
                         topic: TopicId,
                         key: &[u8],
                         value: &[u8],
                         kind: Kind<'_>,
                         is_event: bool| {
            match dedupe.claim(event_id, &batch) {
                Claim::New(h) => {
                    if opts.dry_run {
                        dedupe.commit(&[h]);
                        let c = if is_event {
                            &summary.events
                        } else {
                            &summary.contacts
                        };
                        c.fetch_add(1, Ordering::Relaxed);
                        return;
                    }
                    let extra: [(&str, &[u8]); 1] = [(REPLAY_HEADER, b"1")];
                    let hs = RecordHeaders {
                        extra: &extra,
                        ..RecordHeaders::new(event_id, kind, &raw.app)
                    };
                    let sent = hs.with(|hs| producer.send(target.name(topic), key, value, hs));
                    match sent {
                        Ok(d) => sends.push((h, is_event, d)),
                        Err(_) => {
                            dedupe.release(&[h]);
                            enqueue_failed += 1;
                        }
                    }
                }
                // Stored already, or twice in this body.
                Claim::Duplicate { .. } => {
                    if is_event {
                        summary.duplicates.fetch_add(1, Ordering::Relaxed);
                    }
                }
                // Only this replay claims ids in its own set: unreachable,
                // and a duplicate either way.
                Claim::InFlight(_) => {
                    summary.duplicates.fetch_add(1, Ordering::Relaxed);
                }
            }
        };
        let walked = webhook::for_each_event(&root, ctx, &mut |ev| {
            if let Some(c) = &contacts {
                crate::contacts::inbound::signals(
                    c.as_ref() as &dyn Contacts,
                    &keywords,
                    &ev,
                    raw.received_at_ms,
                    &mut |rec| {
                        offer(
                            &rec.event_id,
                            rec.topic,
                            rec.key.as_bytes(),
                            &rec.value,
                            rec.kind,
                            false,
                        )
                    },
                );
            }
            let topic = match ev.class {
                webhook::Class::Message => TopicId::InboundMessages,
                webhook::Class::Status => TopicId::InboundStatuses,
                webhook::Class::Other => TopicId::InboundEvents,
            };
            offer(
                &ev.event_id,
                topic,
                ev.key.as_bytes(),
                &ev.value,
                Kind::Webhook(&ev.kind),
                true,
            );
            true
        });
        if walked.is_err() {
            summary.kept_raw.fetch_add(1, Ordering::Relaxed);
        }
        summary.failed.fetch_add(enqueue_failed, Ordering::Relaxed);
        if sends.is_empty() {
            continue;
        }
        // Acknowledgements on a task of their own: the next body is read
        // meanwhile (the permit bounds how many are outstanding).
        let (dedupe, summary, share) = (dedupe.clone(), summary.clone(), share.clone());
        let (wtx, wrx) = tokio::sync::oneshot::channel();
        id_waits.push(wrx);
        tokio::spawn(async move {
            let mut stored = Vec::with_capacity(sends.len());
            for (h, is_event, d) in sends {
                match d.await {
                    Ok(()) => {
                        dedupe.commit(&[h]);
                        stored.push(h.0);
                        let c = if is_event {
                            &summary.events
                        } else {
                            &summary.contacts
                        };
                        c.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(_) => {
                        dedupe.release(&[h]);
                        summary.failed.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            match (&share, stored.is_empty()) {
                (Some(s), false) => s.submit(&stored, Some(wtx)),
                _ => {
                    let _ = wtx.send(true);
                }
            }
            drop(permit);
        });
        // Keep the list of waits short: drop those already answered.
        if id_waits.len() > 4 * MAX_BODIES_IN_FLIGHT {
            let mut open = Vec::with_capacity(id_waits.len());
            for mut w in id_waits {
                if w.try_recv().is_err() {
                    open.push(w);
                }
            }
            id_waits = open;
        }
    }
    let read = reader
        .join()
        .map_err(|_| anyhow::anyhow!("the raw topic's reader panicked"))?;
    for w in id_waits {
        // A closed channel is an answered wait that was dropped early.
        let _ = tokio::time::timeout(Duration::from_secs(60), w).await;
    }
    // Every record acknowledged or failed: nothing left in the producer.
    let p = producer.clone();
    let flushed = tokio::task::spawn_blocking(move || p.flush(Duration::from_secs(30)))
        .await
        .map(|r| r.is_ok())
        .unwrap_or(false);
    if !flushed {
        summary.failed.fetch_add(1, Ordering::Relaxed);
    }
    if let Some(s) = &share {
        summary.failed.fetch_add(s.failures(), Ordering::Relaxed);
    }
    stop.cancel();
    if let Some(s) = sharer {
        let _ = tokio::time::timeout(Duration::from_secs(5), s).await;
    }
    let _ = tail.join();
    read.with_context(|| format!("reading {}", source.name(TopicId::InboundRaw)))?;
    Ok(summary)
}

/// Which of `names` the cluster does not have.
fn missing_topics(
    conn: &crate::kafka::Connection,
    names: &[String],
) -> anyhow::Result<Vec<String>> {
    let consumer = crate::kafka::reader(conn, "wagate-replay", |_| {})?;
    let md = consumer.fetch_metadata(None, Duration::from_secs(10))?;
    let have: std::collections::HashSet<&str> = md
        .topics()
        .iter()
        .filter(|t| t.error().is_none() && !t.partitions().is_empty())
        .map(|t| t.name())
        .collect();
    Ok(names
        .iter()
        .filter(|n| !have.contains(n.as_str()))
        .cloned()
        .collect())
}

/// One raw record to re-derive.
struct RawBody {
    body: Vec<u8>,
    app: String,
    received_at_ms: u64,
    kept_raw: bool,
}

#[allow(clippy::too_many_arguments)]
fn read_raw(
    conn: &crate::kafka::Connection,
    topic: &str,
    from_ms: Option<u64>,
    to_ms: Option<u64>,
    app: Option<&str>,
    summary: &Summary,
    out: &tokio::sync::mpsc::Sender<RawBody>,
    stop: &CancellationToken,
) -> anyhow::Result<()> {
    let consumer = crate::kafka::reader(conn, "wagate-replay", |cc| {
        cc.set("fetch.wait.max.ms", "50");
    })?;
    let timeout = Duration::from_secs(10);
    let mut assign = TopicPartitionList::new();
    let mut remaining = std::collections::HashMap::new();
    let until = to_ms.map(|t| t.saturating_add(TO_SLACK_MS));
    for r in crate::kafka::ranges(&consumer, topic, from_ms, until, timeout)? {
        tracing::debug!(
            partition = r.partition,
            start = r.start,
            end = r.end,
            "replay: raw range"
        );
        if r.end > r.start {
            remaining.insert(r.partition, r.end);
            assign.add_partition_offset(topic, r.partition, Offset::Offset(r.start))?;
        }
    }
    if remaining.is_empty() {
        return Ok(());
    }
    consumer.assign(&assign)?;
    let mut idle_since = Instant::now();
    while !remaining.is_empty() && !stop.is_cancelled() {
        let msg = match consumer.poll(Duration::from_millis(200)) {
            None => {
                // A partition whose end is past what the broker holds now
                // (records deleted meanwhile): give up on it after a while.
                anyhow::ensure!(
                    idle_since.elapsed() < Duration::from_secs(30),
                    "{topic}: no record for 30 s with {} partitions not read to their end",
                    remaining.len()
                );
                continue;
            }
            Some(Err(e)) => return Err(e.into()),
            Some(Ok(m)) => m,
        };
        idle_since = Instant::now();
        let p = msg.partition();
        let Some(end) = remaining.get(&p).copied() else {
            continue;
        };
        if msg.offset() >= end {
            remaining.remove(&p);
            continue;
        }
        if msg.offset() + 1 >= end {
            remaining.remove(&p);
        }
        summary.read.fetch_add(1, Ordering::Relaxed);
        let mut rec_app = None;
        let mut received = None;
        let mut kept_raw = false;
        if let Some(hs) = msg.headers() {
            for h in hs.iter() {
                let v = h.value.unwrap_or_default();
                match h.key {
                    headers::APP => rec_app = std::str::from_utf8(v).ok().map(str::to_string),
                    headers::RECEIVED_AT_MS => {
                        received = std::str::from_utf8(v)
                            .ok()
                            .and_then(|s| s.parse::<u64>().ok())
                    }
                    headers::UNPARSEABLE | headers::OVER_LIMIT => kept_raw = true,
                    _ => {}
                }
            }
        }
        let received_at_ms = received
            .or_else(|| msg.timestamp().to_millis().map(|t| t as u64))
            .unwrap_or(0);
        if from_ms.is_some_and(|f| received_at_ms < f) || to_ms.is_some_and(|t| received_at_ms >= t)
        {
            continue;
        }
        let Some(rec_app) = rec_app else { continue };
        if app.is_some_and(|a| a != rec_app) {
            continue;
        }
        summary.selected.fetch_add(1, Ordering::Relaxed);
        let body = RawBody {
            body: msg.payload().unwrap_or_default().to_vec(),
            app: rec_app,
            received_at_ms,
            kept_raw,
        };
        if out.blocking_send(body).is_err() {
            break;
        }
    }
    Ok(())
}
