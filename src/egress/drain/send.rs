//! The attempt record, the throughput slot and the Graph API call; and the
//! 131050 consent record.

use super::*;

impl Egress {
    /// Writes the attempt record, waits for the number's throughput token,
    /// then calls the Graph API.
    pub(super) async fn send(
        &self,
        job: &Job,
        token: &Secret,
        throughput: &Throughput,
    ) -> GraphOutcome {
        // The throughput slot first: a request still waiting for it when the
        // process dies has no attempt record, so its next owner sends it
        // rather than reporting it `unknown`.
        let mut ticket = match throughput.check() {
            Ok(t) => t,
            Err(_) => {
                metrics::counter!(m::EGRESS_THROTTLED, "limit" => "throughput").increment(1);
                throughput.acquire().await
            }
        };
        let attempt = serde_json::json!({
            "v": 1,
            "request_id": job.req.request_id,
            "redrive": job.redrive,
            "phone_number_id": job.req.phone_number_id,
            "attempt": job.attempts,
            "started_at_ms": now_ms(),
        });
        let bytes = serde_json::to_vec(&attempt).unwrap_or_default();
        let headers = RecordHeaders::new(&job.req.request_id, Kind::Attempt, "egress");
        let acked = match headers.with(|h| {
            self.producer.send(
                self.topics.name(TopicId::OutboundAttempts),
                job.req.phone_number_id.as_bytes(),
                &bytes,
                h,
            )
        }) {
            Ok(f) => f.await.is_ok(),
            Err(_) => false,
        };
        if !acked {
            return GraphOutcome::NotSent {
                reason: "the attempt record was not acknowledged by Kafka".into(),
            };
        }
        let mut body = serde_json::Map::new();
        body.insert("messaging_product".into(), "whatsapp".into());
        body.insert("recipient_type".into(), "individual".into());
        match (&job.send_to, &job.req.to, &job.req.recipient) {
            (Some(to), _, _) | (None, Some(to), _) => body.insert("to".into(), to.clone().into()),
            (None, None, r) => body.insert("recipient".into(), r.clone().into()),
        };
        body.insert(
            "biz_opaque_callback_data".into(),
            job.req.request_id.clone().into(),
        );
        if let Some(obj) = job.req.message.as_object() {
            for (k, v) in obj {
                body.insert(k.clone(), v.clone());
            }
        }
        let bytes = serde_json::to_vec(&body).unwrap_or_default();
        ticket.start_now(throughput.margin());
        let out = self
            .graph
            .send(&job.req.phone_number_id, token.expose(), bytes)
            .await;
        // The slot counts from the completion: the request reached Meta before.
        ticket.done();
        out
    }

    /// 131050: Meta says the user stopped marketing. Cached here at once and
    /// published on `wa.consent` so every instance (and a restart) knows.
    pub(super) fn publish_marketing_stopped(&self, job: &Job) {
        let (number, user) = (&job.req.phone_number_id, job.req.user());
        self.contacts
            .set_marketing(number, &user, Marketing::Stopped);
        let st = self.contacts.get(number, &user);
        for (i, id) in self.contacts.ids(number, &user).iter().enumerate() {
            let cause = if i == 0 {
                job.req.request_id.clone()
            } else {
                format!("{}:{id}", job.req.request_id)
            };
            let ev = crate::contacts::records::consent_event(
                number,
                id,
                &st,
                "meta_131050",
                now_ms(),
                &cause,
            );
            match self.contacts_writer.write(&ev, "egress") {
                Ok(delivery) => {
                    tokio::spawn(async move {
                        if let Err(e) = delivery.await {
                            tracing::warn!(error = %e, "131050: consent record not acknowledged; cached only");
                        }
                    });
                }
                Err(e) => {
                    tracing::warn!(error = %e, "131050: consent record not enqueued; cached only")
                }
            }
        }
    }
}
