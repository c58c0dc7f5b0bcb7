//! Readers without a consumer group: `wagate tail`, the egress history, tests.

use std::time::Duration;

use super::{ConnContext, Connection};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Headers, Message};
use rdkafka::{Offset, TopicPartitionList};
use serde::Serialize;

/// One consumed record, as `tail` prints it.
#[derive(Debug, Clone, Serialize)]
pub struct TailRecord {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub timestamp_ms: Option<i64>,
    pub key: Option<String>,
    pub headers: serde_json::Map<String, serde_json::Value>,
    /// The value as JSON when it parses, else as a string (lossy UTF-8);
    /// `null` for a tombstone.
    pub value: serde_json::Value,
    /// The value's exact bytes (not printed).
    #[serde(skip)]
    pub payload: Option<Vec<u8>>,
}

/// Options for [`read_topic`].
#[derive(Debug, Clone)]
pub struct ReadOptions {
    pub from_beginning: bool,
    /// Stop after this many records.
    pub max: Option<usize>,
    /// Stop when no record arrived for this long (None: follow forever).
    pub idle_timeout: Option<Duration>,
}

/// Reads a topic's partitions directly (no consumer group, nothing committed),
/// calling `each` per record. Blocking: run it on a blocking thread.
pub fn read_topic(
    conn: &Connection,
    topic: &str,
    opts: &ReadOptions,
    mut each: impl FnMut(TailRecord),
) -> Result<usize, KafkaError> {
    let consumer: BaseConsumer<ConnContext> = conn
        .client_config(|cc| {
            cc.set("group.id", "wagate-tail")
                .set("enable.auto.commit", "false")
                .set("enable.partition.eof", "false");
        })
        .create_with_context(ConnContext(conn.diagnostics().clone()))?;
    let md = consumer.fetch_metadata(Some(topic), Duration::from_secs(10))?;
    let parts = md
        .topics()
        .first()
        .map(|t| t.partitions().len())
        .unwrap_or(0);
    if parts == 0 {
        return Err(KafkaError::MetadataFetch(
            RDKafkaErrorCode::UnknownTopicOrPartition,
        ));
    }
    let mut tpl = TopicPartitionList::new();
    for p in 0..parts as i32 {
        let off = if opts.from_beginning {
            Offset::Beginning
        } else {
            Offset::End
        };
        tpl.add_partition_offset(topic, p, off)?;
    }
    consumer.assign(&tpl)?;
    let mut n = 0usize;
    let mut last = std::time::Instant::now();
    loop {
        if opts.max.is_some_and(|m| n >= m) {
            break;
        }
        if opts.idle_timeout.is_some_and(|t| last.elapsed() >= t) {
            break;
        }
        match consumer.poll(Duration::from_millis(100)) {
            None => continue,
            Some(Err(e)) => return Err(e),
            Some(Ok(m)) => {
                last = std::time::Instant::now();
                n += 1;
                each(to_tail_record(&m));
            }
        }
    }
    Ok(n)
}

/// A consumer that reads partitions it is assigned, without a group's
/// offsets (nothing committed, no end-of-partition events), with `extra`
/// settings on top.
pub fn reader(
    conn: &Connection,
    group_id: &str,
    extra: impl FnOnce(&mut rdkafka::ClientConfig),
) -> Result<BaseConsumer<ConnContext>, KafkaError> {
    conn.client_config(|cc| {
        cc.set("group.id", group_id)
            .set("enable.auto.commit", "false")
            .set("enable.partition.eof", "false");
        extra(cc);
    })
    .create_with_context(ConnContext(conn.diagnostics().clone()))
}

/// What to read of one partition: `[start, end)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Range {
    pub partition: i32,
    pub start: i64,
    pub end: i64,
}

/// Each partition of `topic` from the first record at or after `since_ms`
/// (None: the oldest) to the first at or after `until_ms` (None, or a time
/// not yet past: the high watermark now). A broker that cannot look offsets
/// up by time (librdkafka's mock cluster answers -1), or answers an end
/// before the start (Tansu 0.6 answers 0 for a time after its last record),
/// gets the watermarks: callers filter by time when it matters. An unknown
/// topic is an error.
pub fn ranges<C: rdkafka::consumer::ConsumerContext>(
    consumer: &BaseConsumer<C>,
    topic: &str,
    since_ms: Option<u64>,
    until_ms: Option<u64>,
    timeout: Duration,
) -> Result<Vec<Range>, KafkaError> {
    let md = consumer.fetch_metadata(Some(topic), timeout)?;
    let parts = md
        .topics()
        .first()
        .map(|t| t.partitions().len())
        .unwrap_or(0) as i32;
    if parts == 0 {
        return Err(KafkaError::MetadataFetch(
            RDKafkaErrorCode::UnknownTopicOrPartition,
        ));
    }
    let lookup = |ms: u64| -> Option<TopicPartitionList> {
        let mut tpl = TopicPartitionList::new();
        for p in 0..parts {
            tpl.add_partition_offset(topic, p, Offset::Offset(ms as i64))
                .ok()?;
        }
        consumer.offsets_for_times(tpl, timeout).ok()
    };
    let starts = since_ms.and_then(lookup);
    let ends = until_ms
        .filter(|t| *t < crate::clock::now_ms())
        .and_then(lookup);
    let found = |tpl: &Option<TopicPartitionList>, p: i32, low: i64, high: i64| {
        tpl.as_ref()
            .and_then(|f| f.find_partition(topic, p))
            .and_then(|e| match e.offset() {
                Offset::Offset(o) if o >= low => Some(o.min(high)),
                _ => None,
            })
    };
    let mut out = Vec::with_capacity(parts as usize);
    for p in 0..parts {
        let (low, high) = consumer.fetch_watermarks(topic, p, timeout)?;
        let start = found(&starts, p, low, high).unwrap_or(low);
        let end = found(&ends, p, low, high)
            .filter(|e| *e > start)
            .unwrap_or(high);
        out.push(Range {
            partition: p,
            start,
            end,
        });
    }
    Ok(out)
}

/// Reads every record of `topic` written since `since_ms` up to the high
/// watermarks at the time of the call, calling `each(key, payload)`.
/// Blocking: run it on a blocking thread.
pub fn read_since(
    conn: &Connection,
    topic: &str,
    since_ms: u64,
    mut each: impl FnMut(Option<&[u8]>, &[u8]),
) -> Result<usize, KafkaError> {
    let consumer = reader(conn, "wagate-history", |cc| {
        cc.set("fetch.wait.max.ms", "50")
            .set("fetch.queue.backoff.ms", "10");
    })?;
    let timeout = Duration::from_secs(10);
    let mut ends = std::collections::HashMap::new();
    let mut tpl = TopicPartitionList::new();
    for r in ranges(&consumer, topic, Some(since_ms), None, timeout)? {
        if r.end > r.start {
            ends.insert(r.partition, r.end);
            tpl.add_partition_offset(topic, r.partition, Offset::Offset(r.start))?;
        }
    }
    if ends.is_empty() {
        return Ok(0);
    }
    consumer.assign(&tpl)?;
    let mut n = 0;
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    // Past the high watermarks, read on until the partitions are idle: some
    // brokers (Tansu 0.6) report a high watermark inside the last record
    // batch, and stopping there would miss the batch's later records.
    let mut idle = 0;
    while idle < 2 && std::time::Instant::now() < deadline {
        match consumer.poll(Duration::from_millis(100)) {
            None => {
                if ends.is_empty() {
                    idle += 1;
                }
            }
            Some(Err(e)) => return Err(e),
            Some(Ok(m)) => {
                idle = 0;
                n += 1;
                each(m.key(), m.payload().unwrap_or_default());
                if ends
                    .get(&m.partition())
                    .is_some_and(|end| m.offset() + 1 >= *end)
                {
                    ends.remove(&m.partition());
                }
            }
        }
    }
    Ok(n)
}

fn to_tail_record<M: Message>(m: &M) -> TailRecord {
    let mut headers = serde_json::Map::new();
    if let Some(hs) = m.headers() {
        for h in hs.iter() {
            let v = h
                .value
                .map(|v| serde_json::Value::String(String::from_utf8_lossy(v).into_owned()))
                .unwrap_or(serde_json::Value::Null);
            headers.insert(h.key.to_string(), v);
        }
    }
    let value = match m.payload() {
        None => serde_json::Value::Null,
        Some(p) => serde_json::from_slice(p)
            .unwrap_or_else(|_| serde_json::Value::String(String::from_utf8_lossy(p).into_owned())),
    };
    TailRecord {
        topic: m.topic().to_string(),
        partition: m.partition(),
        offset: m.offset(),
        timestamp_ms: m.timestamp().to_millis(),
        key: m.key().map(|k| String::from_utf8_lossy(k).into_owned()),
        headers,
        value,
        payload: m.payload().map(|p| p.to_vec()),
    }
}
