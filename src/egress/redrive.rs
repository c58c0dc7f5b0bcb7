//! `wagate dlq redrive`: re-publishes DLQ records to the requests topic.
//!
//! Every redriven record gets a marker on the DLQ itself (header
//! `wagate-kind: redriven`), so a later run skips it; the republished request
//! carries `wagate-redrive: n+1`, which keeps its result apart from the
//! first one's.

use std::collections::HashSet;
use std::time::Duration;

use serde_json::Value;

use crate::kafka::{self, KafkaProducer, Kind, RecordHeaders};

/// Which DLQ records to redrive.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    /// Only records whose error code equals this (e.g. `131049`).
    pub code: Option<String>,
    /// Only records deferred at least this long ago.
    pub min_age: Option<Duration>,
    /// Only records whose `retry_after_ms` has passed.
    pub ready_only: bool,
    /// At most this many.
    pub max: Option<usize>,
}

/// What a run did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Report {
    pub scanned: usize,
    pub matched: usize,
    pub redriven: usize,
}

fn id_of(v: &Value) -> Option<(String, u64)> {
    let id = v
        .get("request")
        .and_then(|r| r.get("request_id"))
        .or_else(|| v.get("request_id"))?;
    Some((
        id.as_str()?.to_string(),
        v.get("redrive").and_then(Value::as_u64).unwrap_or(0),
    ))
}

fn matches(v: &Value, f: &Filter, now_ms: u64) -> bool {
    let deferred = v.get("deferred_at_ms").and_then(Value::as_u64).unwrap_or(0);
    let after = v.get("retry_after_ms").and_then(Value::as_u64).unwrap_or(0);
    if f.ready_only && deferred + after > now_ms {
        return false;
    }
    if f.min_age
        .is_some_and(|a| deferred + a.as_millis() as u64 > now_ms)
    {
        return false;
    }
    if let Some(code) = &f.code {
        let c = v.get("error").and_then(|e| e.get("code"));
        let s = match c {
            Some(Value::String(s)) => s.clone(),
            Some(other) => other.to_string(),
            None => String::new(),
        };
        if &s != code {
            return false;
        }
    }
    true
}

/// Runs a redrive. Blocking reads; produces through `producer`.
pub async fn redrive(
    conn: &kafka::Connection,
    prefix: &str,
    producer: &KafkaProducer,
    filter: &Filter,
    dry_run: bool,
) -> anyhow::Result<Report> {
    let topics = kafka::Topics::new(prefix);
    let dlq = topics.name(kafka::TopicId::OutboundDlq).to_string();
    let requests = topics.name(kafka::TopicId::OutboundRequests);
    let (c, t) = (conn.clone(), dlq.clone());
    let records = tokio::task::spawn_blocking(move || {
        let mut out: Vec<(Option<String>, Value)> = Vec::new();
        kafka::read_since(&c, &t, 0, |_k, payload| {
            if let Ok(v) = serde_json::from_slice::<Value>(payload) {
                out.push((v.get("kind").and_then(Value::as_str).map(str::to_string), v));
            }
        })
        .map(|_| out)
    })
    .await??;
    let now = crate::clock::now_ms();
    let done: HashSet<(String, u64)> = records
        .iter()
        .filter(|(k, _)| k.as_deref() == Some("redriven"))
        .filter_map(|(_, v)| id_of(v))
        .collect();
    let mut report = Report::default();
    for (kind, v) in &records {
        if kind.is_some() {
            continue;
        }
        report.scanned += 1;
        let Some(id) = id_of(v) else { continue };
        if done.contains(&id) || !matches(v, filter, now) {
            continue;
        }
        if filter.max.is_some_and(|m| report.matched >= m) {
            break;
        }
        report.matched += 1;
        if dry_run {
            continue;
        }
        let req = &v["request"];
        let number = req
            .get("phone_number_id")
            .and_then(Value::as_str)
            .unwrap_or("");
        let body = serde_json::to_vec(req)?;
        let next = (id.1 + 1).to_string();
        let headers = RecordHeaders {
            redrive: Some(next.as_bytes()),
            ..RecordHeaders::new(&id.0, Kind::Request, "redrive")
        };
        headers
            .with(|h| producer.send(requests, number.as_bytes(), &body, h))?
            .await?;
        let marker = serde_json::to_vec(&serde_json::json!({
            "v": 1, "kind": "redriven", "request_id": id.0, "redrive": id.1, "redriven_at_ms": now,
        }))?;
        RecordHeaders::new(&id.0, Kind::Redriven, "redrive")
            .with(|h| producer.send(&dlq, number.as_bytes(), &marker, h))?
            .await?;
        report.redriven += 1;
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters() {
        let v = serde_json::json!({"request":{"request_id":"r"},"error":{"code":131049},"retry_after_ms":1000,"deferred_at_ms":5000});
        assert!(matches(&v, &Filter::default(), 0));
        assert!(!matches(
            &v,
            &Filter {
                ready_only: true,
                ..Default::default()
            },
            5999
        ));
        assert!(matches(
            &v,
            &Filter {
                ready_only: true,
                ..Default::default()
            },
            6000
        ));
        assert!(matches(
            &v,
            &Filter {
                code: Some("131049".into()),
                ..Default::default()
            },
            0
        ));
        assert!(!matches(
            &v,
            &Filter {
                code: Some("131050".into()),
                ..Default::default()
            },
            0
        ));
        assert!(!matches(
            &v,
            &Filter {
                min_age: Some(Duration::from_secs(2)),
                ..Default::default()
            },
            6000
        ));
        assert_eq!(id_of(&v), Some(("r".into(), 0)));
    }
}
