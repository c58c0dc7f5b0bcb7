//! The producer: non-blocking sends with per-record delivery reports.

use std::sync::Arc;
use std::time::Duration;

use rdkafka::client::ClientContext;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{BaseRecord, DeliveryResult, Producer, ProducerContext, ThreadedProducer};

use super::Diagnostics;
use crate::config::KafkaConfig;

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

/// Routes librdkafka's delivery reports to each record's [`Pending`], and
/// connection problems to the connection's [`Diagnostics`].
pub struct CompletionContext(Diagnostics);

impl ClientContext for CompletionContext {
    fn log(&self, level: rdkafka::config::RDKafkaLogLevel, fac: &str, msg: &str) {
        self.0.on_log(level, fac, msg);
    }
    fn error(&self, error: KafkaError, reason: &str) {
        self.0.on_error(&error, reason);
    }
}

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
        let conn = &cfg.connection;
        let inner: ThreadedProducer<CompletionContext> = conn
            .client_config(|cc| {
                cc.set("client.id", &cfg.client_id)
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
                    // Every body under server.max_body_bytes is storable
                    // (librdkafka's default of 1,000,000 would refuse
                    // bodies Meta may send).
                    .set("message.max.bytes", cfg.message_max_bytes.to_string());
            })
            .create_with_context(CompletionContext(conn.diagnostics().clone()))?;
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
