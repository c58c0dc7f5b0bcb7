//! Kafka: the connection every client is made from (security, passthrough,
//! diagnostics), the producer, topic names and creation, and a reader for
//! `tail` and tests.
//!
//! Architecture invariant: this module knows bytes, keys and headers, never
//! Meta's types. Producing is non-blocking: a full librdkafka queue is
//! reported as [`SendError::QueueFull`] (the caller sheds load with 503), never
//! slept through.

pub(crate) mod batch;
mod check;
pub mod connection;
mod create;
pub mod diagnose;
pub mod headers;
mod producer;
mod read;
mod stats;
pub mod topics;

pub use check::{
    check_topics, compare as compare_topics, Live, Severity, TopicIssue, TopicProblem,
};
pub use connection::{
    Connection, ConnectionError, Sasl, SaslMechanism, Security, SecurityProtocol,
};
pub use create::{check_record_limit, create_topics, RecordLimitTooSmall, INGRESS_TOPICS};
pub use diagnose::{ConnContext, Diagnostics, Problem};
pub use headers::{Kind, RecordHeaders};
pub use producer::{
    CompletionContext, Delivery, HeaderPair, KafkaProducer, Pending, RecordAck, RecordTag,
    SendError,
};
pub use read::{ranges, read_since, read_topic, reader, Range, ReadOptions, TailRecord};
pub use stats::{consumer_lag_by_topic, record_consumer_lag, LagContext, STATISTICS_INTERVAL_MS};
pub use topics::{TopicId, TopicSpec, Topics, TOPICS};

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
