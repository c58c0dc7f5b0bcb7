//! One business number's lane: a FIFO of its requests, the pairs in flight,
//! the pair backoffs, the number's hold and circuit, all owned by one
//! [`Lane`] on its own task. [`Lane::pick`] says what the lane does next;
//! [`Lane::on_outcome`] takes what the Graph API said.

use super::*;

mod outcome;

/// What the lane does next.
enum Pick {
    /// Send this request now.
    Send(Job),
    /// This request ends here, with this verdict.
    End(Job, Verdict),
    /// Something changed (a request was put back or handed over): look again.
    Again,
    /// Nothing can go before this instant (or a new request or completion).
    WaitUntil(Instant),
}

/// A completed Graph API call: the job, the answer, how long it took.
type Done = (Job, GraphOutcome, Duration);

pub(super) struct Lane {
    number: String,
    token: Secret,
    queue: VecDeque<Job>,
    throughput: Arc<Throughput>,
    /// Pairs with a request at Meta now (at most one each).
    in_flight: HashSet<PairKey>,
    /// 131056 repeats per pair, for its growing backoff.
    pair_backoff: HashMap<PairKey, u32>,
    /// The whole number waits until then (130429, 131057, a circuit probe).
    hold_until: Option<Instant>,
    throttle_streak: u32,
    last_throttle: Instant,
    circuit: Circuit,
    /// The dispatcher dropped its sender: finish what is queued, then end.
    closed: bool,
    /// The revocation generation last applied to the queue.
    revoked_seen: u64,
    /// The `numbers` generation last applied (rate, restriction).
    numbers_seen: u64,
    /// Why Meta does not let the number send now (a restriction): the lane
    /// holds its requests.
    held: Option<String>,
}

impl Lane {
    pub(super) fn new(number: String, token: Secret, rate: u32, cfg: &EgressConfig) -> Lane {
        Lane {
            number,
            token,
            queue: VecDeque::new(),
            throughput: Arc::new(Throughput::with_margin(rate, cfg.arrival_margin)),
            in_flight: HashSet::new(),
            pair_backoff: HashMap::new(),
            hold_until: None,
            throttle_streak: 0,
            last_throttle: Instant::now(),
            circuit: Circuit::default(),
            closed: false,
            revoked_seen: 0,
            numbers_seen: u64::MAX,
            held: None,
        }
    }

    /// Applies what `numbers` says of this number: Meta's throughput level
    /// (at once, e.g. after `THROUGHPUT_UPGRADE`) and a restriction (looked
    /// at on every turn while held: it may expire).
    fn follow_numbers(&mut self, eg: &Egress) {
        let g = eg.numbers.generation();
        if g == self.numbers_seen && self.held.is_none() {
            return;
        }
        if g != self.numbers_seen {
            self.numbers_seen = g;
            let rate = eg.numbers.rate(&self.number, &eg.cfg, eg.high_throughput);
            if rate != self.throughput.configured() {
                tracing::info!(phone_number_id = %self.number, rate, "number throughput changed");
                self.throughput.set_configured(rate);
            }
        }
        let held = eg.numbers.held(&self.number, now_ms());
        if held.is_some() != self.held.is_some() {
            match &held {
                Some(why) => {
                    tracing::warn!(phone_number_id = %self.number, why = %why, "number restricted: its lane holds")
                }
                None => {
                    tracing::info!(phone_number_id = %self.number, "number restriction lifted: its lane resumes")
                }
            }
        }
        self.held = held;
        let mut h = eg.restricted_held.lock().unwrap();
        if self.held.is_some() {
            h.insert(self.number.clone(), self.queue.len());
        } else {
            h.remove(&self.number);
        }
    }

    /// While the number is restricted: nothing is sent; a request ends
    /// when it expires, or `blocked: number_restricted` once it waited
    /// `egress.circuit_hold_max_ms`.
    fn pick_held(&mut self, eg: &Egress, why: &str) -> Pick {
        let now = Instant::now();
        let now_ms = now_ms();
        let hold_max = eg.cfg.circuit_hold_max;
        let ends = |j: &Job| {
            j.req.expires_at_ms.is_some_and(|e| now_ms >= e) || j.enqueued.elapsed() >= hold_max
        };
        if let Some(i) = self.queue.iter().position(ends) {
            let job = self.queue.remove(i).expect("index from the scan");
            if job.req.expires_at_ms.is_some_and(|e| now_ms >= e) {
                let err = job.last_error.clone().unwrap_or_else(|| {
                    ResultError::gateway(GatewayCode::Expired, policy::Block::Expired.title(), None)
                });
                return Pick::End(job, Verdict::Expired(err));
            }
            metrics::counter!(m::EGRESS_BLOCKED, "reason" => "number_restricted").increment(1);
            let err = ResultError::gateway(
                GatewayCode::NumberRestricted,
                "Meta restricted the business number: wagate held the send instead of failing it at Meta",
                Some(why.to_string()),
            );
            return Pick::End(job, Verdict::Blocked(err));
        }
        let next = self
            .queue
            .iter()
            .map(|j| j.enqueued + hold_max)
            .min()
            .unwrap_or(now + Duration::from_secs(1));
        Pick::WaitUntil(next.min(now + Duration::from_secs(1)))
    }

    /// Runs the lane until its sender is dropped and everything queued or
    /// in flight has ended.
    pub(super) async fn run(mut self, eg: Arc<Egress>, mut rx: mpsc::UnboundedReceiver<Job>) {
        let (done_tx, mut done_rx) = mpsc::unbounded_channel::<Done>();
        loop {
            self.apply_revocations(&eg);
            self.follow_numbers(&eg);
            while let Ok(done) = done_rx.try_recv() {
                self.completed(&eg, done);
            }
            if self.last_throttle.elapsed() > Duration::from_secs(10)
                && self.throughput.rate() < self.throughput.configured()
            {
                self.throughput.recover();
                self.last_throttle = Instant::now();
                self.throttle_streak = 0;
            }
            eg.publish_oldest(&self.number, &self.queue);
            if self.closed && self.queue.is_empty() && self.in_flight.is_empty() {
                eg.oldest.lock().unwrap().remove(&self.number);
                eg.restricted_held.lock().unwrap().remove(&self.number);
                return;
            }
            let wake = match self.pick(&eg) {
                Pick::Send(job) => {
                    self.spawn_send(&eg, job, &done_tx);
                    continue;
                }
                Pick::End(job, verdict) => {
                    eg.finish(job, verdict);
                    continue;
                }
                Pick::Again => continue,
                Pick::WaitUntil(t) => t,
            };
            tokio::select! {
                j = rx.recv(), if !self.closed => match j {
                    Some(j) if eg.revoked.contains(j.partition) => {
                        eg.tracker.lock().unwrap().abandon(j.partition, j.offset);
                    }
                    Some(j) => self.queue.push_back(j),
                    None => self.closed = true,
                },
                Some(done) = done_rx.recv() => self.completed(&eg, done),
                _ = tokio::time::sleep_until(wake.into()) => {}
            }
        }
    }

    /// Revoked partitions: requests not at Meta now are left to the
    /// partition's next owner.
    fn apply_revocations(&mut self, eg: &Egress) {
        let generation = eg
            .revoked
            .generation
            .load(std::sync::atomic::Ordering::SeqCst);
        if generation == self.revoked_seen {
            return;
        }
        self.revoked_seen = generation;
        self.queue.retain(|job| {
            if eg.revoked.contains(job.partition) {
                eg.tracker
                    .lock()
                    .unwrap()
                    .abandon(job.partition, job.offset);
                false
            } else {
                true
            }
        });
    }

    fn completed(&mut self, eg: &Egress, (job, out, took): Done) {
        self.in_flight.remove(&job.pair);
        metrics::histogram!(m::META_API_SECONDS).record(took.as_secs_f64());
        if let Some((job, verdict)) = self.on_outcome(eg, job, out) {
            eg.finish(job, verdict);
        }
        self.drop_front_if_revoked(eg);
    }

    fn spawn_send(&mut self, eg: &Arc<Egress>, mut job: Job, done: &mpsc::UnboundedSender<Done>) {
        job.attempts += 1;
        self.in_flight.insert(job.pair);
        let (eg, token, tx, throughput) = (
            eg.clone(),
            self.token.clone(),
            done.clone(),
            self.throughput.clone(),
        );
        tokio::spawn(async move {
            let t0 = Instant::now();
            let out = eg.send(&job, &token, &throughput).await;
            let _ = tx.send((job, out, t0.elapsed()));
        });
    }

    /// The index of the first request that may go now: the first of its
    /// pair, its pair not in flight, not held, not waiting for a retry time.
    /// Requests that can no longer be sent (expired, held behind an open
    /// circuit too long) are picked even while held, to end them.
    fn first_runnable(&self, eg: &Egress, now: Instant, wake: &mut Instant) -> Option<usize> {
        if self.in_flight.len() >= eg.cfg.lane_max_in_flight {
            return None;
        }
        let held = self.hold_until.is_some_and(|t| t > now);
        let mut seen: HashSet<PairKey> = HashSet::new();
        for (i, job) in self.queue.iter().enumerate() {
            if !seen.insert(job.pair) || self.in_flight.contains(&job.pair) {
                continue;
            }
            let expired = job.req.expires_at_ms.is_some_and(|e| now_ms() >= e);
            let circuit_timeout =
                self.circuit.is_some() && job.enqueued.elapsed() >= eg.cfg.circuit_hold_max;
            if expired || circuit_timeout {
                return Some(i);
            }
            if held {
                continue;
            }
            if job.not_before > now {
                *wake = (*wake).min(job.not_before);
                continue;
            }
            return Some(i);
        }
        None
    }

    /// What the lane does next: the first runnable request is ended
    /// (expired, circuit, policy, tier), delayed (pair rate), handed over
    /// (revoked) or sent.
    fn pick(&mut self, eg: &Egress) -> Pick {
        if let Some(why) = self.held.clone() {
            return self.pick_held(eg, &why);
        }
        let now = Instant::now();
        let mut wake = now + Duration::from_secs(1);
        if let Some(t) = self.hold_until.filter(|t| *t > now) {
            wake = wake.min(t);
        }
        let Some(i) = self.first_runnable(eg, now, &mut wake) else {
            return Pick::WaitUntil(wake);
        };
        let now_ms = now_ms();
        let job = &self.queue[i];
        if job.req.expires_at_ms.is_some_and(|e| now_ms >= e) {
            let job = self.queue.remove(i).expect("index from the scan");
            let err = job.last_error.clone().unwrap_or_else(|| {
                ResultError::gateway(GatewayCode::Expired, policy::Block::Expired.title(), None)
            });
            return Pick::End(job, Verdict::Expired(err));
        }
        if self.circuit.is_some() && job.enqueued.elapsed() >= eg.cfg.circuit_hold_max {
            let job = self.queue.remove(i).expect("index from the scan");
            let err = ResultError::gateway(
                GatewayCode::CircuitOpen,
                "the number's circuit is open (token, account or registration problem); see wagate_circuit_open",
                job.last_error.as_ref().map(|e| format!("last Meta error: {} {}", e.code, e.title)),
            );
            return Pick::End(job, Verdict::Blocked(err));
        }
        if job.req.is_template() {
            let checked = crate::templates::check::check_send(
                eg.templates.as_deref(),
                &mut self.queue[i].req,
                now_ms,
            );
            if let Err(block) = checked {
                let job = self.queue.remove(i).expect("index from the scan");
                let (code, title, details) = block.error();
                let err = ResultError::gateway(code, title, Some(details));
                return Pick::End(job, Verdict::Blocked(err));
            }
        }
        let job = &self.queue[i];
        let state = eg.contacts.get(&job.req.phone_number_id, &job.req.user());
        if let Err(block) =
            policy::check(&job.req, &state, now_ms, eg.cfg.marketing_requires_opt_in)
        {
            let job = self.queue.remove(i).expect("index from the scan");
            let counter = if block.is_consent() {
                m::CONSENT_BLOCKED
            } else {
                m::EGRESS_BLOCKED
            };
            metrics::counter!(counter, "reason" => block.code()).increment(1);
            let err = ResultError::gateway(block.gateway_code(), block.title(), None);
            let verdict = if block == policy::Block::Expired {
                Verdict::Expired(err)
            } else {
                Verdict::Blocked(err)
            };
            return Pick::End(job, verdict);
        }
        if job.tier.is_none() && job.req.is_template() && !policy::window_open(&state, now_ms) {
            if let Some(end) = self.take_tier_place(eg, i, now_ms) {
                return end;
            }
        }
        if let Err(wait) = eg.pair.check(self.queue[i].pair) {
            metrics::counter!(m::EGRESS_THROTTLED, "limit" => "pair").increment(1);
            self.queue[i].not_before = now + wait;
            return Pick::Again;
        }
        let job = self.queue.remove(i).expect("index from the scan");
        if eg.revoked.contains(job.partition) {
            // Its partition has another owner now.
            eg.tracker
                .lock()
                .unwrap()
                .abandon(job.partition, job.offset);
            return Pick::Again;
        }
        Pick::Send(job)
    }

    /// A business-initiated send outside the user's window takes a place in
    /// its portfolio's tier, or ends `blocked: tier_limit`.
    fn take_tier_place(&mut self, eg: &Egress, i: usize, now_ms: u64) -> Option<Pick> {
        let job = &self.queue[i];
        let portfolio = eg.tiers.of(&job.req.phone_number_id)?;
        let user = crate::contacts::pair_key("", &job.person).1;
        let admit = portfolio.admit(user, now_ms);
        if admit == tier::Admit::Full {
            let job = self.queue.remove(i).expect("index from the scan");
            metrics::counter!(m::EGRESS_BLOCKED, "reason" => "tier_limit").increment(1);
            let details = format!(
                "portfolio {} reached {} users in 24 h",
                portfolio.name,
                portfolio.limit()
            );
            let err = ResultError::gateway(
                GatewayCode::TierLimit,
                "the portfolio's messaging tier is used up: no more business-initiated conversations with new users for now",
                Some(details),
            );
            return Some(Pick::End(job, Verdict::Blocked(err)));
        }
        self.queue[i].tier = Some(TierPlace {
            portfolio: portfolio.clone(),
            user,
            at_ms: now_ms,
            new: admit == tier::Admit::New,
        });
        None
    }

    /// A request put back for a retry or a hold (always at the front) whose
    /// partition was revoked meanwhile goes to the partition's next owner.
    fn drop_front_if_revoked(&mut self, eg: &Egress) {
        if self
            .queue
            .front()
            .is_some_and(|j| eg.revoked.contains(j.partition))
        {
            let j = self.queue.pop_front().expect("front exists");
            eg.tracker.lock().unwrap().abandon(j.partition, j.offset);
        }
    }
}
