//! A consumed request to its lane: parsed (else `blocked: invalid_request`),
//! checked against the history, given its number's token and lane.

use super::*;

impl Egress {
    /// The person a request addresses (DESIGN §10): the phone when one is
    /// given or linked to the recipient BSUID, else the BSUID; and the
    /// phone an authentication template by `recipient` goes to instead
    /// (Meta answers 131062 to those by BSUID).
    pub(super) fn person(&self, req: &SendRequest) -> (String, Option<String>) {
        let user = req.user();
        if req.recipient.is_none() {
            return (user, None);
        }
        let phone = self
            .contacts
            .ids(&req.phone_number_id, &user)
            .into_iter()
            .find(|id| !crate::meta::identity::is_bsuid(id));
        let send_to = phone
            .as_ref()
            .filter(|_| req.is_authentication_template())
            .map(|p| format!("+{p}"));
        (phone.unwrap_or(user), send_to)
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn dispatch(
        self: Arc<Self>,
        lanes: &mut HashMap<String, mpsc::UnboundedSender<Job>>,
        partition: i32,
        offset: i64,
        redrive: u32,
        key: &str,
        payload: &[u8],
        permit: Option<OwnedSemaphorePermit>,
    ) {
        let req = match SendRequest::parse(payload) {
            Ok(mut r) => {
                crate::templates::check::fill_category(self.templates.as_deref(), &mut r);
                r
            }
            Err(why) => {
                // Keep what can be read of the request for the result.
                let v: serde_json::Value = serde_json::from_slice(payload).unwrap_or_default();
                let s = |k: &str| v.get(k).and_then(|x| x.as_str()).unwrap_or("").to_string();
                let phone = if s("phone_number_id").is_empty() {
                    key.to_string()
                } else {
                    s("phone_number_id")
                };
                let result = SendResult {
                    v: 1,
                    request_id: s("request_id"),
                    phone_number_id: phone,
                    to: v
                        .get("to")
                        .and_then(serde_json::Value::as_str)
                        .map(str::to_string),
                    recipient: v
                        .get("recipient")
                        .and_then(serde_json::Value::as_str)
                        .map(str::to_string),
                    outcome: Outcome::Blocked,
                    wamid: None,
                    message_status: None,
                    error: Some(ResultError::gateway(
                        GatewayCode::InvalidRequest,
                        "the request is not a valid SendRequest",
                        Some(why),
                    )),
                    attempts: 0,
                    completed_at_ms: now_ms(),
                    tier_counted: false,
                    wa_id: None,
                    user_id: None,
                    addressed: None,
                };
                self.finish_raw(partition, offset, redrive, result, None, permit);
                return;
            }
        };
        let hk = RequestKey::new(&req.request_id, redrive);
        let (completed, attempted) = {
            let h = self.history.lock().unwrap();
            (h.completed.contains(&hk), h.attempted.contains(&hk))
        };
        let (person, send_to) = self.person(&req);
        let pair = PairKey::new(&req.phone_number_id, &person);
        let job = Job {
            req,
            partition,
            offset,
            redrive,
            attempts: 0,
            not_before: Instant::now(),
            enqueued: Instant::now(),
            pair,
            person,
            send_to,
            last_error: None,
            tier: None,
            _permit: permit,
        };
        if completed {
            // Already has a result (seen before a restart): nothing to do.
            self.tracker.lock().unwrap().done(partition, offset);
            return;
        }
        if attempted {
            // It may have reached Meta before a crash: report, never re-send.
            self.finish(job, Verdict::Unknown);
            return;
        }
        let number = job.req.phone_number_id.clone();
        let token = self
            .cfg
            .numbers
            .get(&number)
            .and_then(|n| n.access_token.clone())
            .or_else(|| self.default_token.clone());
        let Some(token) = token else {
            let err = ResultError::gateway(
                GatewayCode::UnknownNumber,
                "no access token is configured for this business number",
                None,
            );
            self.finish(job, Verdict::Blocked(err));
            return;
        };
        let lane = lanes.entry(number.clone()).or_insert_with(|| {
            let (tx, rx) = mpsc::unbounded_channel();
            self.numbers.want(&number);
            let rate = self.numbers.rate(&number, &self.cfg, self.high_throughput);
            let lane = Lane::new(number.clone(), token, rate, &self.cfg);
            tokio::spawn(lane.run(self.clone(), rx));
            tx
        });
        if let Err(e) = lane.send(job) {
            // The lane ended (only at shutdown): the offset stays uncommitted.
            drop(e);
        }
    }
}
