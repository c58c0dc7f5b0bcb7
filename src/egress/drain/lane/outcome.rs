//! What a lane does with the Graph API's answer: end the request, retry it,
//! or hold the pair, the number or its circuit (`meta::errors::classify`).

use super::*;

impl Lane {
    /// What the Graph API said: the request ends (returned with its
    /// verdict), or goes back to the front of the queue for a retry or
    /// behind a hold (None).
    pub(super) fn on_outcome(
        &mut self,
        eg: &Egress,
        mut job: Job,
        out: GraphOutcome,
    ) -> Option<(Job, Verdict)> {
        let now = Instant::now();
        let (code, title, details) = match out {
            GraphOutcome::Accepted {
                wamid,
                message_status,
                wa_id,
                user_id,
            } => {
                self.pair_backoff.remove(&job.pair);
                if self.circuit.close() {
                    tracing::info!("circuit closed after a successful send");
                }
                return Some((
                    job,
                    Verdict::Accepted {
                        wamid,
                        message_status,
                        wa_id,
                        user_id,
                    },
                ));
            }
            GraphOutcome::Ambiguous { reason } => {
                tracing::warn!(reason = %reason, "send outcome unknown; not re-sending");
                return Some((job, Verdict::Unknown));
            }
            GraphOutcome::NotSent { reason } => {
                if job.attempts >= eg.cfg.max_attempts {
                    let err = ResultError::gateway(
                        GatewayCode::NotSent,
                        "the request could not be sent",
                        Some(reason),
                    );
                    return Some((job, Verdict::Failed(err)));
                }
                job.not_before = now + backoff(job.attempts, Duration::from_millis(200));
                self.queue.push_front(job);
                return None;
            }
            GraphOutcome::MetaError {
                code,
                title,
                details,
                ..
            } => (code, title, details),
        };
        metrics::counter!(m::META_ERRORS, "code" => errors::code_label(code)).increment(1);
        let err = ResultError::meta(code, title, details);
        match errors::classify(code) {
            Action::Retry {
                max_attempts,
                min_delay,
            } => {
                if job.attempts >= max_attempts.min(eg.cfg.max_attempts) {
                    return Some((job, Verdict::Failed(err)));
                }
                job.not_before = now + backoff(job.attempts, min_delay);
            }
            Action::HoldNumber => {
                metrics::counter!(m::EGRESS_THROTTLED, "limit" => "meta_throughput").increment(1);
                self.throughput.cut();
                self.throttle_streak += 1;
                self.last_throttle = now;
                let d = Duration::from_secs(1 << (self.throttle_streak - 1).min(5));
                self.hold_until = Some(now + d);
            }
            Action::HoldPair => {
                metrics::counter!(m::EGRESS_THROTTLED, "limit" => "meta_pair").increment(1);
                let n = self.pair_backoff.entry(job.pair).or_insert(0);
                let d = Duration::from_secs(4u64.pow((*n).min(5)));
                *n += 1;
                job.not_before = now + d;
            }
            Action::HoldLane(d) => {
                metrics::counter!(m::EGRESS_THROTTLED, "limit" => "meta_hold").increment(1);
                self.hold_until = Some(now + d);
            }
            Action::Defer(d) => {
                let mut error = err;
                error.details = Some(format!(
                    "{}; deferred to the DLQ, retry after {} s",
                    error.details.unwrap_or_default(),
                    d.as_secs()
                ));
                return Some((
                    job,
                    Verdict::Deferred {
                        error,
                        retry_after: d,
                    },
                ));
            }
            Action::Fail => {
                if errors::marks_marketing_stopped(code) {
                    eg.publish_marketing_stopped(&job);
                }
                return Some((job, Verdict::Failed(err)));
            }
            Action::Break(scope) => {
                if self.circuit.open(scope) {
                    tracing::error!(
                        scope = scope.label(),
                        code,
                        "circuit opened for a business number; sends held"
                    );
                }
                // Probe again after a while (half-open).
                self.hold_until = Some(now + Duration::from_secs(30).min(eg.cfg.circuit_hold_max));
            }
        }
        job.last_error = Some(err);
        self.queue.push_front(job);
        None
    }
}
