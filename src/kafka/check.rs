//! `wagate topics check` and the start-time check of `serve`: the live topics
//! against the expected set — every topic exists with its cleanup policy
//! (errors), and its partitions and retention are as configured (warnings).
//! A compacted topic with a `delete` policy would lose every opt-out, window
//! or identity link at retention time: `serve` refuses to start on one.

use std::sync::Arc;
use std::time::Duration;

use rdkafka::admin::{
    AdminOptions, ConfigResourceResult, OwnedResourceSpecifier, ResourceSpecifier,
};
use rdkafka::error::KafkaError;

use super::{TopicId, Topics};
use crate::config::{topic_key, KafkaConfig};

/// How bad a difference is: an error fails `topics check`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Severity {
    Error,
    Warning,
}

/// What kind of difference, for the caller's policy (`serve` refuses on
/// [`TopicIssue::CompactedNotCompacted`] only).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TopicIssue {
    Missing,
    CompactedNotCompacted,
    WrongPolicy,
    PolicyUnknown,
    Partitions,
    Retention,
}

/// One difference between a live topic and what wagate expects.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicProblem {
    pub topic: String,
    pub issue: TopicIssue,
    pub message: String,
}

impl TopicProblem {
    pub fn severity(&self) -> Severity {
        match self.issue {
            TopicIssue::Missing | TopicIssue::CompactedNotCompacted | TopicIssue::WrongPolicy => {
                Severity::Error
            }
            TopicIssue::PolicyUnknown | TopicIssue::Partitions | TopicIssue::Retention => {
                Severity::Warning
            }
        }
    }
}

impl std::fmt::Display for TopicProblem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.topic, self.message)
    }
}

/// A live topic as the brokers describe it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Live {
    pub partitions: usize,
    pub cleanup_policy: Option<String>,
    pub retention_ms: Option<i64>,
}

/// Compares the live topics of `cfg.topic_prefix` with the expected ones.
/// `Err` when the brokers do not answer within `timeout`.
pub async fn check_topics(
    cfg: &KafkaConfig,
    timeout: Duration,
) -> Result<Vec<TopicProblem>, KafkaError> {
    let admin = Arc::new(super::create::admin(cfg)?);
    let topics = Topics::new(&cfg.topic_prefix);
    // Partition counts from the metadata (a blocking call: off the runtime).
    let meta_admin = admin.clone();
    let partitions: Vec<(String, usize)> = tokio::task::spawn_blocking(move || {
        meta_admin.inner().fetch_metadata(None, timeout).map(|m| {
            m.topics()
                .iter()
                .filter(|t| t.error().is_none())
                .map(|t| (t.name().to_string(), t.partitions().len()))
                .collect()
        })
    })
    .await
    .map_err(|_| KafkaError::Canceled)??;
    let present: Vec<TopicId> = TopicId::ALL
        .into_iter()
        .filter(|t| partitions.iter().any(|(n, _)| n == topics.name(*t)))
        .collect();
    let specs: Vec<ResourceSpecifier<'_>> = present
        .iter()
        .map(|t| ResourceSpecifier::Topic(topics.name(*t)))
        .collect();
    let opts = AdminOptions::new().request_timeout(Some(timeout));
    let described = if specs.is_empty() {
        Vec::new()
    } else {
        match tokio::time::timeout(timeout, admin.describe_configs(specs.iter(), &opts)).await {
            Ok(Ok(a)) => a,
            Ok(Err(e)) => return Err(e),
            Err(_) => return Err(KafkaError::Canceled),
        }
    };
    let mut live: Vec<(String, Live)> = partitions
        .into_iter()
        .map(|(n, p)| {
            (
                n,
                Live {
                    partitions: p,
                    ..Live::default()
                },
            )
        })
        .collect();
    for r in described {
        let r: ConfigResourceResult = r;
        let Ok(res) = r else { continue };
        let OwnedResourceSpecifier::Topic(name) = &res.specifier else {
            continue;
        };
        if let Some((_, l)) = live.iter_mut().find(|(n, _)| n == name) {
            l.cleanup_policy = res.get("cleanup.policy").and_then(|e| e.value.clone());
            l.retention_ms = res
                .get("retention.ms")
                .and_then(|e| e.value.as_deref())
                .and_then(|v| v.parse().ok());
        }
    }
    Ok(compare(cfg, &topics, &live))
}

/// The problems of `live` (name → description) against the expected topics.
pub fn compare(cfg: &KafkaConfig, topics: &Topics, live: &[(String, Live)]) -> Vec<TopicProblem> {
    let mut out = Vec::new();
    for t in TopicId::ALL {
        let name = topics.name(t);
        let want = cfg.topic(t);
        let problem = |issue, message: String| TopicProblem {
            topic: name.to_string(),
            issue,
            message,
        };
        let Some((_, l)) = live.iter().find(|(n, _)| n == name) else {
            out.push(problem(
                TopicIssue::Missing,
                "missing: run `wagate topics create`".into(),
            ));
            continue;
        };
        let compact = t.spec().compact;
        match l.cleanup_policy.as_deref() {
            None => out.push(problem(
                TopicIssue::PolicyUnknown,
                "the brokers did not say its cleanup.policy".into(),
            )),
            Some(p) if compact && p.trim() != "compact" => out.push(problem(
                TopicIssue::CompactedNotCompacted,
                format!(
                    "cleanup.policy is {p:?}, expected \"compact\": records would be deleted at retention time \
                     (for {} that loses what must be kept until replaced); fix it with \
                     kafka-configs --alter --add-config cleanup.policy=compact",
                    t.name()
                ),
            )),
            Some(p) if !compact && p.trim() != "delete" => out.push(problem(
                TopicIssue::WrongPolicy,
                format!("cleanup.policy is {p:?}, expected \"delete\" (retention would never apply)"),
            )),
            Some(_) => {}
        }
        if l.partitions != want.partitions as usize {
            out.push(problem(
                TopicIssue::Partitions,
                format!(
                    "{} partitions, configured {} (kafka.topics.{}.partitions or kafka.partitions)",
                    l.partitions,
                    want.partitions,
                    topic_key(t)
                ),
            ));
        }
        if !compact {
            if let Some(ms) = l.retention_ms.filter(|ms| *ms != want.retention_ms) {
                out.push(problem(
                    TopicIssue::Retention,
                    format!(
                        "retention.ms is {ms}, configured {} (kafka.topics.{}.retention_ms)",
                        want.retention_ms,
                        topic_key(t)
                    ),
                ));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{load, LoadOptions};

    /// The default config with `inbound.messages` at 3 partitions, 90 days.
    fn cfg() -> KafkaConfig {
        let env = std::collections::BTreeMap::<String, String>::new();
        let mut k = load(None, &env, LoadOptions { dev: true }).unwrap().kafka;
        let m = &mut k.topics[TopicId::InboundMessages as usize];
        m.partitions = 3;
        m.retention_ms = 7_776_000_000;
        k
    }

    fn all_live(cfg: &KafkaConfig, topics: &Topics) -> Vec<(String, Live)> {
        TopicId::ALL
            .iter()
            .map(|t| {
                let s = cfg.topic(*t);
                (
                    topics.name(*t).to_string(),
                    Live {
                        partitions: s.partitions as usize,
                        cleanup_policy: Some(
                            if t.spec().compact {
                                "compact"
                            } else {
                                "delete"
                            }
                            .into(),
                        ),
                        retention_ms: Some(s.retention_ms),
                    },
                )
            })
            .collect()
    }

    #[test]
    fn matching_topics_have_no_problem_and_each_difference_is_named() {
        let c = cfg();
        let topics = Topics::new(&c.topic_prefix);
        let mut live = all_live(&c, &topics);
        assert_eq!(compare(&c, &topics, &live), Vec::new());

        live.retain(|(n, _)| n != "wa.inbound.raw");
        for (n, l) in live.iter_mut() {
            match n.as_str() {
                "wa.consent" => l.cleanup_policy = Some("delete".into()),
                "wa.users" => l.cleanup_policy = Some("compact,delete".into()),
                "wa.outbound.dlq" => l.cleanup_policy = Some("compact".into()),
                "wa.windows" => l.cleanup_policy = None,
                "wa.inbound.messages" => {
                    l.partitions = 6;
                    l.retention_ms = Some(604_800_000);
                }
                _ => {}
            }
        }
        let got: Vec<(String, TopicIssue, Severity)> = compare(&c, &topics, &live)
            .into_iter()
            .map(|p| (p.topic.clone(), p.issue, p.severity()))
            .collect();
        let want = [
            (
                "wa.inbound.messages",
                TopicIssue::Partitions,
                Severity::Warning,
            ),
            (
                "wa.inbound.messages",
                TopicIssue::Retention,
                Severity::Warning,
            ),
            ("wa.inbound.raw", TopicIssue::Missing, Severity::Error),
            ("wa.outbound.dlq", TopicIssue::WrongPolicy, Severity::Error),
            (
                "wa.consent",
                TopicIssue::CompactedNotCompacted,
                Severity::Error,
            ),
            ("wa.windows", TopicIssue::PolicyUnknown, Severity::Warning),
            (
                "wa.users",
                TopicIssue::CompactedNotCompacted,
                Severity::Error,
            ),
        ];
        let want: Vec<(String, TopicIssue, Severity)> = want
            .iter()
            .map(|(n, i, s)| (n.to_string(), *i, *s))
            .collect();
        assert_eq!(got, want);
    }
}
