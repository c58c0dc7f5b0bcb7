//! Kafka: the producer, topic names and creation, and a reader for `tail` and
//! tests.
//!
//! Architecture invariant: this module knows bytes, keys and headers, never
//! Meta's types. Producing is non-blocking: a full librdkafka queue is
//! reported as [`SendError::QueueFull`] (the caller sheds load with 503), never
//! slept through.

use std::sync::Arc;
use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::ClientContext;
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::{BaseRecord, DeliveryResult, Producer, ProducerContext, ThreadedProducer};
use rdkafka::{Offset, TopicPartitionList};
use serde::Serialize;

use crate::config::KafkaConfig;

pub(crate) mod batch;
pub mod headers;
pub mod topics;

pub use headers::{Kind, RecordHeaders};
pub use topics::{TopicId, TopicSpec, Topics, TOPICS};

/// Why a record could not be enqueued.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    #[error("kafka producer queue is full")]
    QueueFull,
    /// Larger than the producer's `message.max.bytes`: no retry helps.
    #[error("the record is larger than kafka.message_max_bytes")]
    TooLarge,
    #[error("kafka producer: {0}")]
    Kafka(#[from] KafkaError),
}

fn send_error(e: KafkaError) -> SendError {
    match e {
        KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull) => SendError::QueueFull,
        KafkaError::MessageProduction(RDKafkaErrorCode::MessageSizeTooLarge) => SendError::TooLarge,
        other => SendError::Kafka(other),
    }
}

/// A record header.
pub type HeaderPair<'a> = (&'a str, &'a [u8]);

/// Receives the verdicts of records sent with [`KafkaProducer::send_tagged`]:
/// one shared object per group of records (an ingress POST), each record
/// identified by its `tag`, so a record costs no closure or lock of its own.
pub trait RecordAck: Send + Sync + 'static {
    /// Called once per record on librdkafka's poll thread (keep it short),
    /// with the `id` and `tag` the record was sent with.
    fn done(&self, id: u64, tag: u32, result: Result<(), &KafkaError>);
}

/// What a record sent with [`KafkaProducer::send_tagged`] is reported as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecordTag {
    pub id: u64,
    pub tag: u32,
}

/// Routes librdkafka's delivery reports to each record's [`Pending`].
pub struct CompletionContext;

impl ClientContext for CompletionContext {}

/// How often librdkafka reports statistics to consumers (for the lag gauge).
pub const STATISTICS_INTERVAL_MS: &str = "2000";

/// Sets `wagate_consumer_lag{topic}` from a consumer's librdkafka statistics:
/// per topic, the sum over the partitions this client is fetching of the high
/// watermark minus the committed offset (or, when nothing is committed, the
/// position of the application). Topics whose partitions are no longer
/// fetched here (after a rebalance) drop to 0.
pub fn record_consumer_lag(stats: &rdkafka::statistics::Statistics) {
    for (name, lag) in consumer_lag_by_topic(stats) {
        metrics::gauge!(crate::metrics::CONSUMER_LAG, "topic" => name.to_string()).set(lag as f64);
    }
}

/// Per topic in a consumer's statistics, the lag over the partitions this
/// client is fetching (see [`record_consumer_lag`]).
pub fn consumer_lag_by_topic(
    stats: &rdkafka::statistics::Statistics,
) -> impl Iterator<Item = (&str, i64)> {
    stats.topics.iter().map(|(name, topic)| {
        let lag: i64 = topic
            .partitions
            .values()
            .filter(|p| p.partition >= 0 && p.fetch_state == "active" && p.hi_offset >= 0)
            .map(|p| {
                if p.consumer_lag >= 0 {
                    p.consumer_lag
                } else if p.app_offset >= 0 {
                    (p.hi_offset - p.app_offset).max(0)
                } else {
                    0
                }
            })
            .sum();
        (name.as_str(), lag)
    })
}

/// Context for consumers that only need the lag gauge.
pub struct LagContext;

impl ClientContext for LagContext {
    fn stats(&self, statistics: rdkafka::statistics::Statistics) {
        record_consumer_lag(&statistics);
    }
}

impl rdkafka::consumer::ConsumerContext for LagContext {}

/// Where one record's delivery report goes (librdkafka's opaque: `Send +
/// Sync`, taken back by value exactly once).
pub enum Pending {
    /// A future waits for it ([`KafkaProducer::send`]).
    Oneshot(tokio::sync::oneshot::Sender<Result<(), KafkaError>>),
    /// A shared [`RecordAck`] with the record's id and tag.
    Tagged(Arc<dyn RecordAck>, u64, u32),
}

impl ProducerContext for CompletionContext {
    type DeliveryOpaque = Box<Pending>;

    fn delivery(&self, result: &DeliveryResult<'_>, pending: Self::DeliveryOpaque) {
        let result = match result {
            Ok(_) => Ok(()),
            Err((e, _)) => Err(e),
        };
        match *pending {
            Pending::Oneshot(tx) => {
                let _ = tx.send(result.map_err(Clone::clone));
            }
            Pending::Tagged(ack, id, tag) => ack.done(id, tag, result),
        }
    }
}

/// The future of one record's acknowledgement.
pub struct Delivery(tokio::sync::oneshot::Receiver<Result<(), KafkaError>>);

impl std::future::Future for Delivery {
    type Output = Result<(), KafkaError>;
    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        std::pin::Pin::new(&mut self.0)
            .poll(cx)
            .map(|r| r.unwrap_or(Err(KafkaError::Canceled)))
    }
}

/// The shared producer (acks=all, idempotent, murmur2 partitioner). Delivery
/// reports go straight to per-record callbacks on librdkafka's poll thread,
/// so a webhook of N records costs one wake-up, not N.
#[derive(Clone)]
pub struct KafkaProducer {
    inner: ThreadedProducer<CompletionContext>,
}

impl KafkaProducer {
    pub fn new(cfg: &KafkaConfig) -> Result<KafkaProducer, KafkaError> {
        let inner: ThreadedProducer<CompletionContext> = ClientConfig::new()
            .set("bootstrap.servers", &cfg.brokers)
            .set("client.id", &cfg.client_id)
            .set("acks", "all")
            .set("enable.idempotence", "true")
            .set("partitioner", "murmur2_random")
            .set("linger.ms", cfg.linger_ms.to_string())
            .set(
                "queue.buffering.max.messages",
                cfg.queue_max_messages.to_string(),
            )
            .set("queue.buffering.max.kbytes", "1048576")
            .set(
                "message.timeout.ms",
                cfg.message_timeout.as_millis().to_string(),
            )
            .set("compression.type", &cfg.compression)
            .set("socket.keepalive.enable", "true")
            // Every body under server.max_body_bytes is storable (librdkafka's
            // default of 1,000,000 would refuse bodies Meta may send).
            .set("message.max.bytes", cfg.message_max_bytes.to_string())
            .create_with_context(CompletionContext)?;
        Ok(KafkaProducer { inner })
    }

    /// Enqueues one record; `ack.done(id, tag, ..)` is called when Kafka
    /// acknowledges it (or librdkafka gives up after `message.timeout.ms`).
    /// On an enqueue error it is not called.
    pub fn send_tagged(
        &self,
        topic: &str,
        key: &[u8],
        payload: &[u8],
        headers: &[HeaderPair<'_>],
        ack: Arc<dyn RecordAck>,
        tag: RecordTag,
    ) -> Result<(), SendError> {
        let pending = Pending::Tagged(ack, tag.id, tag.tag);
        self.send_pending(topic, key, payload, headers, pending)
    }

    fn send_pending(
        &self,
        topic: &str,
        key: &[u8],
        payload: &[u8],
        headers: &[HeaderPair<'_>],
        pending: Pending,
    ) -> Result<(), SendError> {
        let mut hs = OwnedHeaders::new_with_capacity(headers.len());
        for (k, v) in headers {
            hs = hs.insert(Header {
                key: k,
                value: Some(*v),
            });
        }
        let rec = BaseRecord::with_opaque_to(topic, Box::new(pending))
            .key(key)
            .payload(payload)
            .headers(hs);
        self.inner.send(rec).map_err(|(e, _)| send_error(e))
    }

    /// Produces a tombstone (null value) for `key` and returns the future of
    /// its acknowledgement.
    pub fn send_tombstone(
        &self,
        topic: &str,
        key: &[u8],
        headers: &[HeaderPair<'_>],
    ) -> Result<Delivery, SendError> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let mut hs = OwnedHeaders::new_with_capacity(headers.len());
        for (k, v) in headers {
            hs = hs.insert(Header {
                key: k,
                value: Some(*v),
            });
        }
        let rec: BaseRecord<'_, [u8], [u8], Box<Pending>> =
            BaseRecord::with_opaque_to(topic, Box::new(Pending::Oneshot(tx)))
                .key(key)
                .headers(hs);
        self.inner.send(rec).map_err(|(e, _)| send_error(e))?;
        Ok(Delivery(rx))
    }

    /// Enqueues one record and returns the future of its acknowledgement.
    pub fn send(
        &self,
        topic: &str,
        key: &[u8],
        payload: &[u8],
        headers: &[HeaderPair<'_>],
    ) -> Result<Delivery, SendError> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.send_pending(topic, key, payload, headers, Pending::Oneshot(tx))?;
        Ok(Delivery(rx))
    }

    /// Records enqueued but not yet acknowledged.
    pub fn queue_depth(&self) -> i32 {
        self.inner.in_flight_count()
    }

    /// Waits (blocking) until every enqueued record is acknowledged or `timeout`.
    pub fn flush(&self, timeout: Duration) -> Result<(), KafkaError> {
        self.inner.flush(timeout)
    }

    /// Asks a broker for cluster metadata (blocking): is Kafka reachable?
    pub fn ping(&self, timeout: Duration) -> Result<(), KafkaError> {
        self.inner
            .client()
            .fetch_metadata(None, timeout)
            .map(|_| ())
    }
}

/// Creates every topic of [`TOPICS`] with its cleanup policy; topics that
/// exist already are left as they are. Returns (name, created?) pairs.
pub async fn create_topics(cfg: &KafkaConfig) -> Result<Vec<(String, bool)>, KafkaError> {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", &cfg.brokers)
        .set("client.id", &cfg.client_id)
        .create()?;
    let topics = Topics::new(&cfg.topic_prefix);
    let names: Vec<&str> = TopicId::ALL.iter().map(|t| topics.name(*t)).collect();
    let retention: Vec<String> = TOPICS.iter().map(|t| t.retention_ms.to_string()).collect();
    let max_message = cfg.message_max_bytes.to_string();
    let new: Vec<NewTopic<'_>> = TOPICS
        .iter()
        .zip(&names)
        .zip(&retention)
        .map(|((t, name), ret)| {
            let nt = NewTopic::new(
                name,
                cfg.partitions,
                TopicReplication::Fixed(cfg.replication_factor),
            );
            let nt = nt.set("max.message.bytes", &max_message);
            if t.compact {
                nt.set("cleanup.policy", "compact")
            } else {
                nt.set("cleanup.policy", "delete").set("retention.ms", ret)
            }
        })
        .collect();
    let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
    let results = admin.create_topics(new.iter(), &opts).await?;
    let mut out = Vec::new();
    for r in results {
        match r {
            Ok(name) => out.push((name, true)),
            Err((name, RDKafkaErrorCode::TopicAlreadyExists)) => out.push((name, false)),
            Err((name, code)) => {
                tracing::error!(topic = %name, error = %code, "create topic failed");
                return Err(KafkaError::AdminOp(code));
            }
        }
    }
    Ok(out)
}

/// The topics ingress writes a body's records to: each must take a record of
/// `kafka.message_max_bytes`.
pub const INGRESS_TOPICS: [TopicId; 4] = [
    TopicId::InboundRaw,
    TopicId::InboundMessages,
    TopicId::InboundStatuses,
    TopicId::InboundEvents,
];

/// A topic whose `max.message.bytes` is below what ingress may write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordLimitTooSmall {
    pub topic: String,
    pub limit: usize,
    pub needed: usize,
}

impl std::fmt::Display for RecordLimitTooSmall {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "topic {} takes records of at most {} bytes (max.message.bytes), but server.max_body_bytes needs {} \
             (the body plus {} bytes of headers): raise the topic's max.message.bytes to at least {}, \
             or lower server.max_body_bytes to at most {}",
            self.topic,
            self.limit,
            self.needed,
            crate::config::RECORD_OVERHEAD_BYTES,
            self.needed,
            self.limit.saturating_sub(crate::config::RECORD_OVERHEAD_BYTES)
        )
    }
}

/// Asks the brokers for the `max.message.bytes` of every topic ingress writes
/// and returns those below `kafka.message_max_bytes`. `Ok(None)` when the
/// broker could not say (unreachable in `timeout`, or it does not answer
/// DescribeConfigs): the caller warns and goes on.
pub async fn check_record_limit(
    cfg: &KafkaConfig,
    timeout: Duration,
) -> Result<Option<Vec<RecordLimitTooSmall>>, KafkaError> {
    use rdkafka::admin::{ConfigResourceResult, OwnedResourceSpecifier, ResourceSpecifier};
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", &cfg.brokers)
        .set("client.id", &cfg.client_id)
        .create()?;
    let topics = Topics::new(&cfg.topic_prefix);
    let specs: Vec<ResourceSpecifier<'_>> = INGRESS_TOPICS
        .iter()
        .map(|t| ResourceSpecifier::Topic(topics.name(*t)))
        .collect();
    let opts = AdminOptions::new().request_timeout(Some(timeout));
    let answer =
        match tokio::time::timeout(timeout, admin.describe_configs(specs.iter(), &opts)).await {
            Ok(Ok(a)) => a,
            Ok(Err(_)) | Err(_) => return Ok(None),
        };
    let mut small = Vec::new();
    for r in answer {
        let r: ConfigResourceResult = r;
        let Ok(res) = r else {
            // Unknown topic (not created yet) or not answered: nothing to say.
            continue;
        };
        let OwnedResourceSpecifier::Topic(topic) = &res.specifier else {
            continue;
        };
        let limit = res
            .get("max.message.bytes")
            .and_then(|e| e.value.as_deref())
            .and_then(|v| v.parse::<usize>().ok());
        if let Some(limit) = limit {
            if limit < cfg.message_max_bytes {
                small.push(RecordLimitTooSmall {
                    topic: topic.clone(),
                    limit,
                    needed: cfg.message_max_bytes,
                });
            }
        }
    }
    Ok(Some(small))
}

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
    brokers: &str,
    topic: &str,
    opts: &ReadOptions,
    mut each: impl FnMut(TailRecord),
) -> Result<usize, KafkaError> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", "wagate-tail")
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "false")
        .create()?;
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

/// Reads every record of `topic` written since `since_ms` up to the high
/// watermarks at the time of the call, calling `each(key, payload)`.
/// Blocking: run it on a blocking thread.
pub fn read_since(
    brokers: &str,
    topic: &str,
    since_ms: u64,
    mut each: impl FnMut(Option<&[u8]>, &[u8]),
) -> Result<usize, KafkaError> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", "wagate-history")
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "false")
        .set("fetch.wait.max.ms", "50")
        .set("fetch.queue.backoff.ms", "10")
        .create()?;
    let timeout = Duration::from_secs(10);
    let md = consumer.fetch_metadata(Some(topic), timeout)?;
    let parts = md
        .topics()
        .first()
        .map(|t| t.partitions().len())
        .unwrap_or(0) as i32;
    let mut ends = std::collections::HashMap::new();
    let mut tpl = TopicPartitionList::new();
    for p in 0..parts {
        let (low, high) = consumer.fetch_watermarks(topic, p, timeout)?;
        if high > low {
            ends.insert(p, high);
            tpl.add_partition_offset(topic, p, Offset::Offset(since_ms as i64))?;
        }
    }
    if ends.is_empty() {
        return Ok(0);
    }
    // Where each partition's records since `since_ms` start. A broker that
    // cannot look offsets up by time (librdkafka's mock cluster answers -1)
    // gets read from its low watermark, filtered by timestamp below.
    let found = consumer.offsets_for_times(tpl, timeout).ok();
    let mut tpl = TopicPartitionList::new();
    let parts_with_data: Vec<(i32, i64)> = ends.iter().map(|(p, h)| (*p, *h)).collect();
    for (p, high) in parts_with_data {
        let low = consumer.fetch_watermarks(topic, p, timeout)?.0;
        let start = found
            .as_ref()
            .and_then(|f| f.find_partition(topic, p))
            .and_then(|e| match e.offset() {
                Offset::Offset(o) if o >= low => Some(o),
                _ => None,
            })
            .unwrap_or(low);
        if start >= high {
            ends.remove(&p);
            continue;
        }
        tpl.add_partition_offset(topic, p, Offset::Offset(start))?;
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

/// librdkafka's in-process mock cluster, for `--dev` and fault-injection
/// tests. It listens on loopback, so other Kafka clients can attach.
pub mod mock {
    use rdkafka::mocking::MockCluster;
    use rdkafka::producer::DefaultProducerContext;

    use super::{TopicId, Topics};

    pub type Cluster = MockCluster<'static, DefaultProducerContext>;

    /// Starts a one-broker mock cluster with every topic created.
    pub fn start(prefix: &str, partitions: i32) -> Result<Cluster, rdkafka::error::KafkaError> {
        let cluster = MockCluster::new(1)?;
        let topics = Topics::new(prefix);
        for t in TopicId::ALL {
            cluster.create_topic(topics.name(t), partitions, 1)?;
        }
        Ok(cluster)
    }
}
