//! Keeping [`Numbers`] in step with Kafka, the webhooks and the Graph API:
//!
//! - `numbers-sync` (a thread): reads `wa.numbers` from the beginning up to
//!   the high watermarks seen at start, then says ready (`/readyz` waits for
//!   it, like the contacts), then tails it for good, so a change one
//!   instance learns reaches every instance;
//! - `numbers-events` (a thread, once caught up): the consumer group
//!   `{egress.group_id}-numbers` on `wa.inbound.events` — each event is
//!   applied by one instance of the fleet, which writes the new state to
//!   `wa.numbers`; offsets are committed as it goes, so an event that
//!   arrived while every instance was down is applied at the next start
//!   (a new group starts at the oldest event; events older than what is
//!   known change nothing);
//! - the Graph poller (a task, once caught up): reads every configured and
//!   every known number's fields at start and every `[numbers]
//!   refresh_secs`, writing what changed.
//!
//! Why the events topic and not the ingress path: ingress answers Meta as
//! soon as the POST's records are stored and stays free of state merges;
//! the events topic already holds every `phone_number_quality_update` and
//! `account_update` durably, in order per partition, so consuming it loses
//! nothing a 200 was given for, and every instance converges through
//! `wa.numbers`.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};
use serde_json::Value;
use tokio_util::sync::CancellationToken;

use super::graph::GraphApi;
use super::{NumberState, Numbers, GRAPH_FIELDS};
use crate::kafka::{ConnContext, Connection, KafkaProducer};

/// Writes a number's state to `wa.numbers` (its acknowledgement is not
/// awaited: a lost write is repaired by the next Graph read or webhook).
pub fn write(producer: &KafkaProducer, topic: &str, s: &NumberState) {
    let Ok(v) = serde_json::to_vec(s) else { return };
    if let Err(e) = producer.send(topic, s.phone_number_id.as_bytes(), &v, &[]) {
        tracing::warn!(error = ?e, topic, "cannot write a number's state");
    }
}

/// Reads `wa.numbers` into `numbers`; calls `on_caught_up` once caught
/// up, then tails until `stop`. Blocking.
pub fn tail(
    conn: &Connection,
    topic: &str,
    numbers: &Numbers,
    on_caught_up: Box<dyn FnOnce() + Send>,
    stop: &CancellationToken,
) -> Result<(), rdkafka::error::KafkaError> {
    let mut on_caught_up = Some(on_caught_up);
    let consumer = crate::kafka::reader(conn, "wagate-numbers-tail", |_| {})?;
    let timeout = Duration::from_secs(10);
    let mut ends = std::collections::HashMap::new();
    let mut tpl = TopicPartitionList::new();
    // A missing topic reads as empty, as before (`topics check` names it).
    let ranges = match crate::kafka::ranges(&consumer, topic, None, None, timeout) {
        Err(rdkafka::error::KafkaError::MetadataFetch(
            rdkafka::error::RDKafkaErrorCode::UnknownTopicOrPartition,
        )) => Vec::new(),
        r => r?,
    };
    for r in ranges {
        if r.end > r.start {
            ends.insert(r.partition, r.end);
        }
        tpl.add_partition_offset(topic, r.partition, Offset::Beginning)?;
    }
    consumer.assign(&tpl)?;
    let started = std::time::Instant::now();
    let mut applied = 0u64;
    // Past the high watermarks, read on until idle (Tansu may report a high
    // watermark inside the last batch; see kafka::read_since).
    let mut idle = 0;
    let mut caught_up = false;
    while !stop.is_cancelled() {
        match consumer.poll(Duration::from_millis(100)) {
            None => {
                if !caught_up && ends.is_empty() {
                    idle += 1;
                    if idle >= 2 {
                        caught_up = true;
                        numbers.caught_up.store(true, Ordering::SeqCst);
                        if let Some(f) = on_caught_up.take() {
                            f();
                        }
                        tracing::info!(
                            records = applied,
                            numbers = numbers.all().len(),
                            elapsed_ms = started.elapsed().as_millis() as u64,
                            "numbers caught up"
                        );
                    }
                }
            }
            Some(Err(e)) => {
                tracing::warn!(error = %e, "numbers reader");
                std::thread::sleep(Duration::from_millis(200));
            }
            Some(Ok(m)) => {
                idle = 0;
                applied += 1;
                if let Some(key) = m.key().and_then(|k| std::str::from_utf8(k).ok()) {
                    numbers.apply_record(key, m.payload());
                }
                if ends
                    .get(&m.partition())
                    .is_some_and(|end| m.offset() + 1 >= *end)
                {
                    ends.remove(&m.partition());
                }
            }
        }
    }
    Ok(())
}

/// Applies `wa.inbound.events` (consumer group `group`) to `numbers`,
/// writing changes to `numbers_topic`, until `stop`. Waits until
/// `numbers` caught up first. Blocking.
#[allow(clippy::too_many_arguments)]
pub fn events(
    conn: &Connection,
    events_topic: &str,
    group: &str,
    numbers: &Numbers,
    producer: &KafkaProducer,
    numbers_topic: &str,
    stop: &CancellationToken,
) -> Result<(), rdkafka::error::KafkaError> {
    while !numbers.is_caught_up() {
        if stop.is_cancelled() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let consumer: BaseConsumer<ConnContext> = conn
        .client_config(|cc| {
            cc.set("group.id", group)
                .set("enable.auto.commit", "true")
                .set("auto.commit.interval.ms", "1000")
                .set("auto.offset.reset", "earliest")
                .set("enable.partition.eof", "false");
        })
        .create_with_context(ConnContext(conn.diagnostics().clone()))?;
    consumer.subscribe(&[events_topic])?;
    while !stop.is_cancelled() {
        match consumer.poll(Duration::from_millis(100)) {
            None => {}
            Some(Err(e)) => {
                tracing::warn!(error = %e, "numbers events reader");
                std::thread::sleep(Duration::from_millis(200));
            }
            Some(Ok(m)) => {
                let Some(rec) = m
                    .payload()
                    .and_then(|p| serde_json::from_slice::<Value>(p).ok())
                else {
                    continue;
                };
                for s in numbers.apply_event(&rec) {
                    tracing::info!(
                        phone_number_id = %s.phone_number_id,
                        event = s.last_event.as_deref().unwrap_or(""),
                        level = s.throughput_level.as_deref().unwrap_or(""),
                        restricted = s.held(crate::clock::now_ms()).is_some(),
                        "number state changed by a webhook"
                    );
                    write(producer, numbers_topic, &s);
                }
            }
        }
    }
    let _ = consumer.commit_consumer_state(rdkafka::consumer::CommitMode::Sync);
    Ok(())
}

/// The token for a number's Graph calls: its own, else the default.
pub fn token_for(cfg: &crate::config::Config, id: &str) -> Option<crate::config::Secret> {
    cfg.egress
        .numbers
        .get(id)
        .and_then(|n| n.access_token.clone())
        .or_else(|| cfg.graph.access_token.clone())
}

/// Reads one number's fields from the Graph API.
pub async fn read_number(api: &GraphApi, id: &str, token: &str) -> Result<Value, String> {
    api.get(id, &[("fields", GRAPH_FIELDS)], token)
        .await
        .map_err(|e| e.to_string())
}

/// Reads every configured and known number at start and every `refresh`,
/// once `ready`; writes what changed. Runs until `stop`.
pub async fn poll_graph(
    cfg: Arc<crate::config::Config>,
    numbers: Arc<Numbers>,
    producer: KafkaProducer,
    topic: String,
    stop: CancellationToken,
) {
    let Some(refresh) = cfg.numbers.refresh else {
        return;
    };
    while !numbers.is_caught_up() {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_millis(50)) => {}
        }
    }
    let api = GraphApi::new(&cfg.graph.base_url, Duration::from_secs(10));
    let mut next_full = tokio::time::Instant::now();
    loop {
        // Every number at start and each refresh; between them only the
        // numbers egress began to send for that nothing is known of.
        let full = tokio::time::Instant::now() >= next_full;
        let mut ids: std::collections::BTreeSet<String> = numbers
            .wanted()
            .into_iter()
            .filter(|id| full || numbers.get(id).is_none())
            .collect();
        if full {
            ids.extend(cfg.egress.numbers.keys().cloned());
            ids.extend(numbers.all().into_iter().map(|s| s.phone_number_id));
            next_full = tokio::time::Instant::now() + refresh;
        }
        for id in ids {
            let Some(token) = token_for(&cfg, &id) else {
                continue;
            };
            match read_number(&api, &id, token.expose()).await {
                Ok(v) => {
                    if let Some(s) = numbers.apply_graph(&id, &v, crate::clock::now_ms()) {
                        tracing::info!(
                            phone_number_id = %id,
                            level = s.throughput_level.as_deref().unwrap_or(""),
                            quality = s.quality_rating.as_deref().unwrap_or(""),
                            "number state read from the Graph API"
                        );
                        write(&producer, &topic, &s);
                    }
                }
                Err(e) => {
                    tracing::warn!(phone_number_id = %id, error = %e, "cannot read a number's fields");
                }
            }
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep_until(next_full) => {}
            // A number egress just began to send for: read it (with the
            // others that start meanwhile) now.
            _ = numbers.wake.notified() => {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
}

/// Publishes the numbers gauges every second until `stop`: numbers by
/// quality and throughput level (no number ids as labels), restricted
/// numbers, and requests held for them.
pub async fn gauges(
    numbers: Arc<Numbers>,
    egress: Option<Arc<crate::egress::drain::Egress>>,
    stop: CancellationToken,
) {
    use crate::metrics as m;
    let mut published: std::collections::BTreeSet<(String, String)> = Default::default();
    loop {
        let now = crate::clock::now_ms();
        let mut counts: std::collections::BTreeMap<(String, String), u64> = Default::default();
        let mut restricted = 0;
        for s in numbers.all() {
            let q = s.quality_rating.clone().unwrap_or_else(|| "unknown".into());
            let l = s
                .throughput_level
                .clone()
                .unwrap_or_else(|| "unknown".into());
            *counts.entry((label(&q), label(&l))).or_default() += 1;
            restricted += u64::from(s.held(now).is_some());
        }
        for k in published.iter() {
            if !counts.contains_key(k) {
                metrics::gauge!(m::NUMBERS, "quality" => k.0.clone(), "throughput_level" => k.1.clone()).set(0.0);
            }
        }
        for (k, n) in &counts {
            metrics::gauge!(m::NUMBERS, "quality" => k.0.clone(), "throughput_level" => k.1.clone()).set(*n as f64);
            published.insert(k.clone());
        }
        metrics::gauge!(m::NUMBERS_RESTRICTED).set(restricted as f64);
        if let Some(e) = &egress {
            metrics::gauge!(m::EGRESS_RESTRICTED_HELD).set(e.restricted_held() as f64);
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
}

/// A label value from Meta's closed sets; anything else is `other`.
fn label(v: &str) -> String {
    const KNOWN: &[&str] = &[
        "GREEN", "YELLOW", "RED", "UNKNOWN", "NA", "STANDARD", "HIGH", "unknown",
    ];
    if KNOWN.contains(&v) {
        v.to_ascii_lowercase()
    } else {
        "other".into()
    }
}

/// The threads and tasks [`spawn`] started.
pub type Started = (
    Vec<std::thread::JoinHandle<()>>,
    Vec<tokio::task::JoinHandle<()>>,
);

/// Starts the numbers threads and tasks of one gateway: the `wa.numbers`
/// reader (calls `on_caught_up`), the events consumer, the Graph poller
/// and the gauges. Threads stop with `stop_threads`, tasks with `stop_tasks`.
#[allow(clippy::too_many_arguments)]
pub fn spawn(
    cfg: &crate::config::Config,
    topics: &crate::kafka::Topics,
    producer: KafkaProducer,
    numbers: Arc<Numbers>,
    egress: Option<Arc<crate::egress::drain::Egress>>,
    on_caught_up: Box<dyn FnOnce() + Send>,
    stop_threads: CancellationToken,
    stop_tasks: CancellationToken,
) -> std::io::Result<Started> {
    use crate::kafka::TopicId;
    let numbers_topic = topics.name(TopicId::Numbers).to_string();
    let events_topic = topics.name(TopicId::InboundEvents).to_string();
    let group = format!("{}-numbers", cfg.egress.group_id);
    let conn = cfg.kafka.connection.clone();
    let mut threads = Vec::new();
    {
        let (conn, topic, numbers, stop) = (
            conn.clone(),
            numbers_topic.clone(),
            numbers.clone(),
            stop_threads.clone(),
        );
        threads.push(
            std::thread::Builder::new()
                .name("numbers-sync".into())
                .spawn(move || {
                    if let Err(e) = tail(&conn, &topic, &numbers, on_caught_up, &stop) {
                        tracing::error!(error = %e, "numbers reader stopped; /readyz stays 503");
                    }
                })?,
        );
    }
    {
        let (numbers, producer, topic, stop) = (
            numbers.clone(),
            producer.clone(),
            numbers_topic.clone(),
            stop_threads,
        );
        threads.push(
            std::thread::Builder::new()
                .name("numbers-events".into())
                .spawn(move || {
                    if let Err(e) = events(
                        &conn,
                        &events_topic,
                        &group,
                        &numbers,
                        &producer,
                        &topic,
                        &stop,
                    ) {
                        tracing::error!(error = %e, "numbers events reader stopped");
                    }
                })?,
        );
    }
    let tasks = vec![
        tokio::spawn(poll_graph(
            Arc::new(cfg.clone()),
            numbers.clone(),
            producer,
            numbers_topic,
            stop_tasks.clone(),
        )),
        tokio::spawn(gauges(numbers, egress, stop_tasks)),
    ];
    Ok((threads, tasks))
}
