//! How a request ends: one [`Verdict`], one result record (and, for a
//! deferral, one DLQ record), produced until Kafka acknowledges them; then
//! its offset is done.

use super::*;

/// How a request ended. An `Accepted` cannot carry an error, and the DLQ is
/// decided here, once: only a `Deferred` goes there.
#[derive(Debug)]
pub(super) enum Verdict {
    Accepted {
        wamid: String,
        message_status: Option<String>,
        /// The user's ids as Meta's answer named them.
        wa_id: Option<String>,
        user_id: Option<String>,
    },
    Blocked(ResultError),
    Failed(ResultError),
    /// Failed for now, to be retried after `retry_after` (131049): also on
    /// the DLQ, with `retry_after_ms`.
    Deferred {
        error: ResultError,
        retry_after: Duration,
    },
    Expired(ResultError),
    /// Meta's answer was lost: never re-sent.
    Unknown,
}

impl Verdict {
    pub(super) fn outcome(&self) -> Outcome {
        match self {
            Verdict::Accepted { .. } => Outcome::Accepted,
            Verdict::Blocked(_) => Outcome::Blocked,
            Verdict::Failed(_) | Verdict::Deferred { .. } => Outcome::Failed,
            Verdict::Expired(_) => Outcome::Expired,
            Verdict::Unknown => Outcome::Unknown,
        }
    }
}

impl Egress {
    /// Ends `job` with `verdict`.
    pub(super) fn finish(&self, job: Job, verdict: Verdict) {
        let outcome = verdict.outcome();
        // The tier place stays with a send Meta took (or may have taken).
        let tier_counted = match &job.tier {
            Some(_) if matches!(outcome, Outcome::Accepted | Outcome::Unknown) => true,
            Some(t) => {
                if t.new {
                    t.portfolio.release(t.user, t.at_ms);
                }
                false
            }
            None => false,
        };
        let mut ids = (None, None);
        let (wamid, message_status, error, dlq) = match verdict {
            Verdict::Accepted {
                wamid,
                message_status,
                wa_id,
                user_id,
            } => {
                ids = (wa_id, user_id);
                (Some(wamid), message_status, None, None)
            }
            Verdict::Blocked(e) | Verdict::Failed(e) | Verdict::Expired(e) => {
                (None, None, Some(e), None)
            }
            Verdict::Deferred { error, retry_after } => {
                (None, None, Some(error), Some(retry_after))
            }
            Verdict::Unknown => (None, None, None, None),
        };
        let result = SendResult {
            v: 1,
            request_id: job.req.request_id.clone(),
            phone_number_id: job.req.phone_number_id.clone(),
            to: job.req.to.clone(),
            recipient: job.req.recipient.clone(),
            outcome,
            wamid,
            message_status,
            error,
            attempts: job.attempts,
            completed_at_ms: now_ms(),
            tier_counted,
            wa_id: ids.0,
            user_id: ids.1,
            addressed: job.send_to.as_ref().map(|_| "to".to_string()),
        };
        let dlq_record = dlq.map(|d| {
            serde_json::to_vec(&serde_json::json!({
                "v": 1,
                "request": job.req,
                "error": result.error,
                "retry_after_ms": d.as_millis() as u64,
                "redrive": job.redrive,
                "deferred_at_ms": now_ms(),
            }))
            .unwrap_or_default()
        });
        self.finish_raw(
            job.partition,
            job.offset,
            job.redrive,
            result,
            dlq_record,
            job._permit,
        );
    }

    /// Produces the DLQ record (if any) and the result, retrying until Kafka
    /// acknowledges them, then marks the offset done.
    pub(super) fn finish_raw(
        &self,
        partition: i32,
        offset: i64,
        redrive: u32,
        result: SendResult,
        dlq: Option<Vec<u8>>,
        permit: Option<OwnedSemaphorePermit>,
    ) {
        let code = result
            .error
            .as_ref()
            .map(|e| e.code.label())
            .unwrap_or_else(|| "none".into());
        metrics::counter!(m::EGRESS_REQUESTS, "outcome" => result.outcome.label(), "code" => code)
            .increment(1);
        let mut value = serde_json::to_value(&result).unwrap_or_default();
        if redrive > 0 {
            value["redrive"] = redrive.into();
        }
        let bytes = serde_json::to_vec(&value).unwrap_or_default();
        let producer = self.producer.clone();
        let (results, dlq_topic) = (
            self.topics.name(TopicId::OutboundResults).to_string(),
            self.topics.name(TopicId::OutboundDlq).to_string(),
        );
        let key = result.phone_number_id.clone();
        let id = result.request_id.clone();
        let tracker = self.tracker.clone();
        tokio::spawn(async move {
            if let Some(d) = dlq {
                produce_until_acked(&producer, &dlq_topic, &key, &id, Kind::Dlq, &d).await;
            }
            produce_until_acked(&producer, &results, &key, &id, Kind::Result, &bytes).await;
            tracker.lock().unwrap().done(partition, offset);
            drop(permit);
        });
    }
}

pub(super) async fn produce_until_acked(
    producer: &KafkaProducer,
    topic: &str,
    key: &str,
    id: &str,
    kind: Kind<'_>,
    bytes: &[u8],
) {
    let headers = RecordHeaders::new(id, kind, "egress");
    let mut delay = Duration::from_millis(100);
    loop {
        if let Ok(f) = headers.with(|h| producer.send(topic, key.as_bytes(), bytes, h)) {
            if f.await.is_ok() {
                return;
            }
        }
        tracing::warn!(topic, "result not acknowledged by Kafka; retrying");
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_secs(5));
    }
}

/// Jittered exponential backoff: `min_delay · 2^(attempt-1)`, ±20 %, ≤ 5 min.
pub(super) fn backoff(attempt: u32, min_delay: Duration) -> Duration {
    let base = min_delay.saturating_mul(1 << attempt.saturating_sub(1).min(10));
    let base = base.min(Duration::from_secs(300));
    let jitter = rand::random::<f64>() * 0.4 + 0.8;
    base.mul_f64(jitter)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_is_capped() {
        let a = backoff(1, Duration::from_millis(500));
        assert!(a >= Duration::from_millis(400) && a <= Duration::from_millis(600));
        let b = backoff(4, Duration::from_millis(500));
        assert!(b >= Duration::from_millis(3200) && b <= Duration::from_millis(4800));
        assert!(backoff(30, Duration::from_secs(60)) <= Duration::from_secs(360));
    }

    #[test]
    fn only_a_deferral_is_failed_with_a_dlq_and_accepted_has_no_error() {
        let e = || ResultError::gateway(GatewayCode::Expired, "y", None);
        assert_eq!(
            Verdict::Deferred {
                error: e(),
                retry_after: Duration::from_secs(1)
            }
            .outcome(),
            Outcome::Failed
        );
        assert_eq!(Verdict::Failed(e()).outcome(), Outcome::Failed);
        assert_eq!(Verdict::Expired(e()).outcome(), Outcome::Expired);
        assert_eq!(Verdict::Blocked(e()).outcome(), Outcome::Blocked);
        assert_eq!(Verdict::Unknown.outcome(), Outcome::Unknown);
        let a = Verdict::Accepted {
            wamid: "w".into(),
            message_status: None,
            wa_id: None,
            user_id: None,
        };
        assert_eq!(a.outcome(), Outcome::Accepted);
    }
}
