//! `wagate topics create`, and the start-time check that the inbound
//! topics take records of `kafka.message_max_bytes`.

use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};

use super::{ConnContext, TopicId, Topics};
use crate::config::KafkaConfig;

/// An admin client on the configured connection.
pub(super) fn admin(cfg: &KafkaConfig) -> Result<AdminClient<ConnContext>, KafkaError> {
    let conn = &cfg.connection;
    conn.client_config(|_| {})
        .create_with_context(ConnContext(conn.diagnostics().clone()))
}

/// Creates every topic of [`TopicId::ALL`] with its cleanup policy and its
/// `[kafka.topics.NAME]` settings; topics that exist already are left as
/// they are (`topics check` says where they differ). Returns (name,
/// created?) pairs.
pub async fn create_topics(cfg: &KafkaConfig) -> Result<Vec<(String, bool)>, KafkaError> {
    let admin = admin(cfg)?;
    let topics = Topics::new(&cfg.topic_prefix);
    let names: Vec<&str> = TopicId::ALL.iter().map(|t| topics.name(*t)).collect();
    let settings: Vec<(String, Option<String>)> = TopicId::ALL
        .iter()
        .map(|t| {
            let s = cfg.topic(*t);
            (
                s.retention_ms.to_string(),
                s.min_insync_replicas.map(|m| m.to_string()),
            )
        })
        .collect();
    let max_message = cfg.message_max_bytes.to_string();
    let new: Vec<NewTopic<'_>> = TopicId::ALL
        .iter()
        .zip(&names)
        .zip(&settings)
        .map(|((t, name), (ret, min_isr))| {
            let s = cfg.topic(*t);
            let nt = NewTopic::new(
                name,
                s.partitions,
                TopicReplication::Fixed(s.replication_factor),
            );
            let mut nt = nt.set("max.message.bytes", &max_message);
            if let Some(m) = min_isr {
                nt = nt.set("min.insync.replicas", m);
            }
            if t.spec().compact {
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
    let admin = admin(cfg)?;
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
