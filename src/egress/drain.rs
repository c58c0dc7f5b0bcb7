//! The drain: a consumer group on `wa.outbound.requests`, one *lane* per
//! business number, one result per request, offsets committed in order.
//!
//! ```text
//! consumer ──dispatch──▶ lane(number) ──send task──▶ Graph API
//!    ▲  pause/resume         │ policy, throughput (GCRA), pair rate,
//!    │  (max_buffered)       │ holds, circuits, retries
//!    └── commit ◀── tracker ◀── finish: result (and DLQ) acknowledged by Kafka
//! ```
//!
//! Architecture invariants:
//! - a lane never waits on another lane: each is its own task, and a held
//!   pair or lane only delays its own requests;
//! - at most one request per (number, user) pair is in flight, and a pair's
//!   requests are sent in offset order;
//! - an offset is committed only when it and every earlier offset of its
//!   partition has a result acknowledged by Kafka;
//! - an attempt record is acknowledged before each HTTP call, so after a
//!   crash a request that may have reached Meta is reported `unknown`, never
//!   re-sent.

use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rdkafka::client::ClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{
    BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer,
};
use rdkafka::message::{Headers, Message};
use rdkafka::{Offset, TopicPartitionList};
use tokio::sync::{mpsc, watch, OwnedSemaphorePermit, Semaphore};

use crate::config::{Config, EgressConfig, Secret};
use crate::contacts::{Contacts, Marketing};
use crate::egress::graph::{GraphClient, GraphOutcome};
use crate::egress::policy;
use crate::egress::request::{Outcome, ResultError, SendRequest, SendResult};
use crate::kafka::{self, KafkaProducer, TopicNames};
use crate::meta::errors::{self, Action};
use crate::metrics as m;
use crate::ratelimit::{PairKey, PairRate, Throughput};

/// Wall clock in Unix milliseconds.
pub fn now_ms_pub() -> u64 {
    now_ms()
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// One request on its way through a lane.
struct Job {
    req: SendRequest,
    partition: i32,
    offset: i64,
    /// How often this request was redriven from the DLQ (header `wagate-redrive`).
    redrive: u32,
    attempts: u32,
    not_before: Instant,
    enqueued: Instant,
    pair: PairKey,
    last_error: Option<ResultError>,
    _permit: Option<OwnedSemaphorePermit>,
}

/// Offsets in progress and done, per partition. Also recognises a request
/// consumed again after a rebalance while it is still in progress (or done
/// but not yet committed), so it is not sent twice.
#[derive(Default)]
struct Tracker {
    parts: HashMap<i32, Part>,
}

#[derive(Default)]
struct Part {
    pending: BTreeSet<i64>,
    done: BTreeSet<i64>,
    next: i64,
    committed: i64,
}

impl Tracker {
    /// Registers an offset; false if it is already known (redelivered).
    fn add(&mut self, p: i32, o: i64) -> bool {
        let part = self.parts.entry(p).or_default();
        if o < part.committed || part.pending.contains(&o) || part.done.contains(&o) {
            return false;
        }
        part.pending.insert(o);
        part.next = part.next.max(o + 1);
        true
    }
    fn done(&mut self, p: i32, o: i64) {
        if let Some(part) = self.parts.get_mut(&p) {
            if part.pending.remove(&o) {
                part.done.insert(o);
            }
        }
    }
    /// Offsets safe to commit (first pending, or one past the last seen) that
    /// moved since the last call.
    fn take_commits(&mut self) -> Vec<(i32, i64)> {
        let mut out = Vec::new();
        for (p, part) in self.parts.iter_mut() {
            let upto = part.pending.first().copied().unwrap_or(part.next);
            if upto > part.committed {
                part.committed = upto;
                part.done = part.done.split_off(&upto);
                out.push((*p, upto));
            }
        }
        out
    }
}

/// History read at start: what already has a result, what was attempted.
#[derive(Default)]
struct History {
    completed: HashSet<String>,
    attempted: HashSet<String>,
}

fn history_key(request_id: &str, redrive: u32) -> String {
    format!("{request_id}#{redrive}")
}

/// Notes partition assignments: after one, the history of results and
/// attempts is read again before any request is dispatched, so requests that
/// the previous owner attempted are reported `unknown`, not sent again.
struct DrainContext {
    assigned: Arc<std::sync::atomic::AtomicBool>,
}

impl ClientContext for DrainContext {
    fn stats(&self, statistics: rdkafka::statistics::Statistics) {
        crate::kafka::record_consumer_lag(&statistics);
    }
}

impl ConsumerContext for DrainContext {
    fn post_rebalance(&self, _c: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Assign(tpl) = rebalance {
            if tpl.count() > 0 {
                self.assigned
                    .store(true, std::sync::atomic::Ordering::SeqCst);
            }
        }
    }
}

/// The egress plane.
pub struct Egress {
    cfg: EgressConfig,
    brokers: String,
    topics: Topics,
    producer: KafkaProducer,
    graph: GraphClient,
    contacts: Arc<dyn Contacts>,
    pair: PairRate,
    default_token: Option<Secret>,
    tracker: Arc<Mutex<Tracker>>,
    history: Mutex<History>,
    oldest: Mutex<HashMap<String, Instant>>,
    buffered: Arc<Semaphore>,
}

struct Topics {
    requests: String,
    results: String,
    dlq: String,
    attempts: String,
    consent: String,
}

impl Egress {
    pub fn new(cfg: &Config, producer: KafkaProducer, contacts: Arc<dyn Contacts>) -> Egress {
        let names = TopicNames::new(&cfg.kafka.topic_prefix);
        Egress {
            cfg: cfg.egress.clone(),
            brokers: cfg.kafka.brokers.clone(),
            topics: Topics {
                requests: names.full("outbound.requests"),
                results: names.full("outbound.results"),
                dlq: names.full("outbound.dlq"),
                attempts: names.full("outbound.attempts"),
                consent: names.full("consent"),
            },
            producer,
            graph: GraphClient::new(&cfg.graph.base_url, cfg.egress.send_timeout),
            contacts,
            pair: PairRate::meta(),
            default_token: cfg.graph.access_token.clone(),
            tracker: Arc::new(Mutex::new(Tracker::default())),
            history: Mutex::new(History::default()),
            oldest: Mutex::new(HashMap::new()),
            buffered: Arc::new(Semaphore::new(cfg.egress.max_buffered)),
        }
    }

    /// Requests held in memory now.
    pub fn backlog(&self) -> usize {
        self.cfg.max_buffered - self.buffered.available_permits()
    }

    /// Age of the oldest request held by any lane.
    pub fn oldest_age(&self) -> Duration {
        self.oldest
            .lock()
            .unwrap()
            .values()
            .min()
            .map(|t| t.elapsed())
            .unwrap_or_default()
    }

    /// Runs the drain until `stop` turns true, then commits what is done.
    pub async fn run(self: Arc<Self>, mut stop: watch::Receiver<bool>) -> anyhow::Result<()> {
        // History is (re)loaded on every partition assignment, the first included.
        let mut cc = ClientConfig::new();
        if let Some(id) = &self.cfg.instance_id {
            cc.set("group.instance.id", id);
        }
        let assigned = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let consumer: StreamConsumer<DrainContext> = cc
            .set("bootstrap.servers", &self.brokers)
            .set("group.id", &self.cfg.group_id)
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("auto.offset.reset", "earliest")
            .set("session.timeout.ms", "10000")
            .set("heartbeat.interval.ms", "1000")
            .set("enable.partition.eof", "false")
            .set(
                "statistics.interval.ms",
                crate::kafka::STATISTICS_INTERVAL_MS,
            )
            .create_with_context(DrainContext {
                assigned: assigned.clone(),
            })?;
        consumer.subscribe(&[&self.topics.requests])?;
        let consumer = Arc::new(consumer);
        let mut lanes: HashMap<String, mpsc::UnboundedSender<Job>> = HashMap::new();
        let mut commit_tick = tokio::time::interval(Duration::from_millis(200));
        let mut paused = false;
        tracing::info!(topic = %self.topics.requests, group = %self.cfg.group_id, "egress draining");
        loop {
            tokio::select! {
                _ = stop.changed() => break,
                _ = commit_tick.tick() => {
                    self.commit(&consumer);
                    if paused && self.buffered.available_permits() > 0 {
                        if let Ok(a) = consumer.assignment() { let _ = consumer.resume(&a); }
                        paused = false;
                    }
                }
                msg = consumer.recv() => {
                    let msg = match msg {
                        Ok(m) => m,
                        Err(e) => {
                            tracing::warn!(error = %e, "egress consumer error");
                            tokio::time::sleep(Duration::from_millis(200)).await;
                            continue;
                        }
                    };
                    if assigned.swap(false, std::sync::atomic::Ordering::SeqCst) {
                        // New partitions: learn what their previous owner did first.
                        self.load_history().await;
                    }
                    let permit = self.buffered.clone().try_acquire_owned().ok();
                    if permit.is_none() || self.buffered.available_permits() == 0 {
                        // Backpressure: stop fetching until lanes drain.
                        if let Ok(a) = consumer.assignment() { let _ = consumer.pause(&a); }
                        paused = true;
                    }
                    let redrive = msg
                        .headers()
                        .and_then(|h| h.iter().find(|h| h.key == "wagate-redrive").and_then(|h| h.value))
                        .and_then(|v| std::str::from_utf8(v).ok()?.parse().ok())
                        .unwrap_or(0);
                    let key = msg.key().map(|k| String::from_utf8_lossy(k).into_owned()).unwrap_or_default();
                    let payload = msg.payload().unwrap_or_default().to_vec();
                    let (p, o) = (msg.partition(), msg.offset());
                    if !self.tracker.lock().unwrap().add(p, o) {
                        // Consumed again after a rebalance: already in progress or done.
                        continue;
                    }
                    self.clone().dispatch(&mut lanes, p, o, redrive, &key, &payload, permit);
                }
            }
        }
        // Stop taking requests; let lanes finish what they hold briefly, then commit.
        drop(lanes);
        let end = Instant::now() + Duration::from_secs(5);
        while self.backlog() > 0 && Instant::now() < end {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        self.commit(&consumer);
        Ok(())
    }

    fn commit(&self, consumer: &StreamConsumer<DrainContext>) {
        let offsets = self.tracker.lock().unwrap().take_commits();
        if offsets.is_empty() {
            return;
        }
        let mut tpl = TopicPartitionList::new();
        for (p, o) in offsets {
            let _ = tpl.add_partition_offset(&self.topics.requests, p, Offset::Offset(o));
        }
        if let Err(e) = consumer.commit(&tpl, CommitMode::Async) {
            tracing::warn!(error = %e, "offset commit failed");
        }
    }

    /// Reads recent results and attempts so that nothing completed is sent
    /// again and nothing that may have reached Meta is re-sent blindly.
    async fn load_history(&self) {
        let since = now_ms().saturating_sub(self.cfg.history_window.as_millis() as u64);
        let brokers = self.brokers.clone();
        let (results, attempts) = (self.topics.results.clone(), self.topics.attempts.clone());
        let got = tokio::task::spawn_blocking(move || {
            let mut h = History::default();
            let read = |topic: &str, set: &mut HashSet<String>| {
                kafka::read_since(&brokers, topic, since, |_key, payload| {
                    if let Ok(v) = serde_json::from_slice::<serde_json::Value>(payload) {
                        if let Some(id) = v.get("request_id").and_then(|x| x.as_str()) {
                            let redrive =
                                v.get("redrive").and_then(|x| x.as_u64()).unwrap_or(0) as u32;
                            set.insert(history_key(id, redrive));
                        }
                    }
                })
            };
            let r1 = read(&results, &mut h.completed);
            let r2 = read(&attempts, &mut h.attempted);
            (h, r1.and(r2))
        })
        .await;
        match got {
            Ok((h, res)) => {
                if let Err(e) = res {
                    tracing::warn!(error = %e, "egress history incomplete");
                }
                tracing::info!(
                    completed = h.completed.len(),
                    attempted = h.attempted.len(),
                    "egress history loaded"
                );
                *self.history.lock().unwrap() = h;
            }
            Err(e) => tracing::warn!(error = %e, "egress history not loaded"),
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn dispatch(
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
            Ok(r) => r,
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
                    to: s("to"),
                    outcome: Outcome::Blocked,
                    wamid: None,
                    message_status: None,
                    error: Some(ResultError::gateway(
                        "invalid_request",
                        "the request is not a valid SendRequest",
                        Some(why),
                    )),
                    attempts: 0,
                    completed_at_ms: now_ms(),
                };
                self.finish_raw(partition, offset, redrive, result, None, permit);
                return;
            }
        };
        let hk = history_key(&req.request_id, redrive);
        let (completed, attempted) = {
            let h = self.history.lock().unwrap();
            (h.completed.contains(&hk), h.attempted.contains(&hk))
        };
        let pair = PairKey::new(&req.phone_number_id, &req.to_digits());
        let job = Job {
            req,
            partition,
            offset,
            redrive,
            attempts: 0,
            not_before: Instant::now(),
            enqueued: Instant::now(),
            pair,
            last_error: None,
            _permit: permit,
        };
        if completed {
            // Already has a result (seen before a restart): nothing to do.
            self.tracker.lock().unwrap().done(partition, offset);
            return;
        }
        if attempted {
            // It may have reached Meta before a crash: report, never re-send.
            self.finish(job, Outcome::Unknown, None, None, None);
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
                "unknown_number",
                "no access token is configured for this business number",
                None,
            );
            self.finish(job, Outcome::Blocked, None, None, Some(err));
            return;
        };
        let lane = lanes.entry(number.clone()).or_insert_with(|| {
            let (tx, rx) = mpsc::unbounded_channel();
            let rate = self
                .cfg
                .numbers
                .get(&number)
                .and_then(|n| n.throughput)
                .unwrap_or(self.cfg.default_throughput);
            tokio::spawn(self.clone().lane(number.clone(), token, rate, rx));
            tx
        });
        if let Err(e) = lane.send(job) {
            // The lane ended (only at shutdown): the offset stays uncommitted.
            drop(e);
        }
    }

    /// One business number's FIFO.
    async fn lane(
        self: Arc<Self>,
        number: String,
        token: Secret,
        rate: u32,
        mut rx: mpsc::UnboundedReceiver<Job>,
    ) {
        let mut queue: VecDeque<Job> = VecDeque::new();
        let throughput = Arc::new(Throughput::with_margin(rate, self.cfg.arrival_margin));
        let (done_tx, mut done_rx) = mpsc::unbounded_channel::<(Job, GraphOutcome, Duration)>();
        let mut in_flight: HashSet<PairKey> = HashSet::new();
        let mut pair_backoff: HashMap<PairKey, u32> = HashMap::new();
        let mut hold_until: Option<Instant> = None;
        let mut throttle_streak = 0u32;
        let mut last_throttle = Instant::now();
        let mut circuit: Option<errors::Scope> = None;
        let mut closed = false;
        loop {
            // Completions.
            while let Ok((job, out, took)) = done_rx.try_recv() {
                in_flight.remove(&job.pair);
                metrics::histogram!(m::META_API_SECONDS).record(took.as_secs_f64());
                self.handle_outcome(
                    job,
                    out,
                    &mut queue,
                    &throughput,
                    &mut pair_backoff,
                    &mut hold_until,
                    &mut throttle_streak,
                    &mut last_throttle,
                    &mut circuit,
                );
            }
            if last_throttle.elapsed() > Duration::from_secs(10)
                && throughput.rate() < throughput.configured()
            {
                throughput.recover();
                last_throttle = Instant::now();
                throttle_streak = 0;
            }
            self.publish_oldest(&number, &queue);
            if closed && queue.is_empty() && in_flight.is_empty() {
                self.oldest.lock().unwrap().remove(&number);
                return;
            }

            // Pick the first runnable request.
            let now = Instant::now();
            let mut wake = now + Duration::from_secs(1);
            let mut pick = None;
            let held = hold_until.is_some_and(|t| t > now);
            if let Some(t) = hold_until.filter(|t| *t > now) {
                wake = wake.min(t);
            }
            if in_flight.len() < self.cfg.lane_max_in_flight {
                let mut seen: HashSet<PairKey> = HashSet::new();
                for (i, job) in queue.iter().enumerate() {
                    if !seen.insert(job.pair) || in_flight.contains(&job.pair) {
                        continue;
                    }
                    // Requests that can no longer be sent end even while held.
                    let expired = job.req.expires_at_ms.is_some_and(|e| now_ms() >= e);
                    let circuit_timeout =
                        circuit.is_some() && job.enqueued.elapsed() >= self.cfg.circuit_hold_max;
                    if expired || circuit_timeout {
                        pick = Some(i);
                        break;
                    }
                    if held {
                        continue;
                    }
                    if job.not_before > now {
                        wake = wake.min(job.not_before);
                        continue;
                    }
                    pick = Some(i);
                    break;
                }
            }
            if let Some(i) = pick {
                let now_ms = now_ms();
                let job = &queue[i];
                if job.req.expires_at_ms.is_some_and(|e| now_ms >= e) {
                    let job = queue.remove(i).expect("index from the scan");
                    let err = job.last_error.clone().or_else(|| {
                        Some(ResultError::gateway(
                            "expired",
                            policy::Block::Expired.title(),
                            None,
                        ))
                    });
                    self.finish(job, Outcome::Expired, None, None, err);
                    continue;
                }
                if circuit.is_some() && job.enqueued.elapsed() >= self.cfg.circuit_hold_max {
                    let job = queue.remove(i).expect("index from the scan");
                    let err = ResultError::gateway(
                        "circuit_open",
                        "the number's circuit is open (token, account or registration problem); see wagate_circuit_open",
                        job.last_error.as_ref().map(|e| format!("last Meta error: {} {}", e.code, e.title)),
                    );
                    self.finish(job, Outcome::Blocked, None, None, Some(err));
                    continue;
                }
                let state = self
                    .contacts
                    .get(&job.req.phone_number_id, &job.req.to_digits());
                if let Err(block) =
                    policy::check(&job.req, &state, now_ms, self.cfg.marketing_requires_opt_in)
                {
                    let job = queue.remove(i).expect("index from the scan");
                    metrics::counter!(m::CONSENT_BLOCKED, "reason" => block.code()).increment(1);
                    let outcome = if block == policy::Block::Expired {
                        Outcome::Expired
                    } else {
                        Outcome::Blocked
                    };
                    self.finish(
                        job,
                        outcome,
                        None,
                        None,
                        Some(ResultError::gateway(block.code(), block.title(), None)),
                    );
                    continue;
                }
                if let Err(wait) = self.pair.check(job.pair) {
                    metrics::counter!(m::EGRESS_THROTTLED, "limit" => "pair").increment(1);
                    queue[i].not_before = now + wait;
                    continue;
                } else {
                    let mut job = queue.remove(i).expect("index from the scan");
                    job.attempts += 1;
                    in_flight.insert(job.pair);
                    let this = self.clone();
                    let token = token.clone();
                    let tx = done_tx.clone();
                    let throughput = throughput.clone();
                    tokio::spawn(async move {
                        let t0 = Instant::now();
                        let out = this.send(&job, &token, &throughput).await;
                        let _ = tx.send((job, out, t0.elapsed()));
                    });
                    continue;
                }
            }

            tokio::select! {
                j = rx.recv(), if !closed => match j {
                    Some(j) => queue.push_back(j),
                    None => closed = true,
                },
                Some((job, out, took)) = done_rx.recv() => {
                    in_flight.remove(&job.pair);
                    metrics::histogram!(m::META_API_SECONDS).record(took.as_secs_f64());
                    self.handle_outcome(job, out, &mut queue, &throughput, &mut pair_backoff, &mut hold_until, &mut throttle_streak, &mut last_throttle, &mut circuit);
                }
                _ = tokio::time::sleep_until(wake.into()) => {}
            }
        }
    }

    fn publish_oldest(&self, number: &str, queue: &VecDeque<Job>) {
        let oldest = queue.iter().map(|j| j.enqueued).min();
        let mut o = self.oldest.lock().unwrap();
        match oldest {
            Some(t) => {
                o.insert(number.to_string(), t);
            }
            None => {
                o.remove(number);
            }
        }
    }

    /// Writes the attempt record, waits for the number's throughput token,
    /// then calls the Graph API.
    async fn send(&self, job: &Job, token: &Secret, throughput: &Throughput) -> GraphOutcome {
        let attempt = serde_json::json!({
            "v": 1,
            "request_id": job.req.request_id,
            "redrive": job.redrive,
            "phone_number_id": job.req.phone_number_id,
            "attempt": job.attempts,
            "started_at_ms": now_ms(),
        });
        let bytes = serde_json::to_vec(&attempt).unwrap_or_default();
        let headers: [(&str, &[u8]); 2] = [
            ("wagate-event-id", job.req.request_id.as_bytes()),
            ("wagate-kind", b"attempt"),
        ];
        let acked = match self.producer.send(
            &self.topics.attempts,
            job.req.phone_number_id.as_bytes(),
            &bytes,
            &headers,
        ) {
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
        body.insert("to".into(), job.req.to.clone().into());
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
        let ticket = match throughput.check() {
            Ok(t) => t,
            Err(_) => {
                metrics::counter!(m::EGRESS_THROTTLED, "limit" => "throughput").increment(1);
                throughput.acquire().await
            }
        };
        let out = self
            .graph
            .send(&job.req.phone_number_id, token.expose(), bytes)
            .await;
        // The slot counts from the completion: the request reached Meta before.
        ticket.done();
        out
    }

    #[allow(clippy::too_many_arguments)]
    fn handle_outcome(
        &self,
        mut job: Job,
        out: GraphOutcome,
        queue: &mut VecDeque<Job>,
        throughput: &Throughput,
        pair_backoff: &mut HashMap<PairKey, u32>,
        hold_until: &mut Option<Instant>,
        throttle_streak: &mut u32,
        last_throttle: &mut Instant,
        circuit: &mut Option<errors::Scope>,
    ) {
        let now = Instant::now();
        match out {
            GraphOutcome::Accepted {
                wamid,
                message_status,
            } => {
                pair_backoff.remove(&job.pair);
                if let Some(scope) = circuit.take() {
                    metrics::gauge!(m::CIRCUIT_OPEN, "scope" => scope.label()).decrement(1.0);
                    tracing::info!("circuit closed after a successful send");
                }
                self.finish(job, Outcome::Accepted, Some(wamid), message_status, None);
            }
            GraphOutcome::Ambiguous { reason } => {
                tracing::warn!(reason = %reason, "send outcome unknown; not re-sending");
                self.finish(job, Outcome::Unknown, None, None, None);
            }
            GraphOutcome::NotSent { reason } => {
                if job.attempts >= self.cfg.max_attempts {
                    let err = ResultError::gateway(
                        "not_sent",
                        "the request could not be sent",
                        Some(reason),
                    );
                    self.finish(job, Outcome::Failed, None, None, Some(err));
                } else {
                    job.not_before = now + backoff(job.attempts, Duration::from_millis(200));
                    queue.push_front(job);
                }
            }
            GraphOutcome::MetaError {
                code,
                title,
                details,
                ..
            } => {
                metrics::counter!(m::META_ERRORS, "code" => code.to_string()).increment(1);
                let err = ResultError::meta(code, title, details);
                let action = errors::classify(code);
                match action {
                    Action::Retry {
                        max_attempts,
                        min_delay,
                    } => {
                        if job.attempts >= max_attempts.min(self.cfg.max_attempts) {
                            self.finish(job, Outcome::Failed, None, None, Some(err));
                        } else {
                            job.last_error = Some(err);
                            job.not_before = now + backoff(job.attempts, min_delay);
                            queue.push_front(job);
                        }
                    }
                    Action::HoldNumber => {
                        metrics::counter!(m::EGRESS_THROTTLED, "limit" => "meta_throughput")
                            .increment(1);
                        throughput.cut();
                        *throttle_streak += 1;
                        *last_throttle = now;
                        let d = Duration::from_secs(1 << (*throttle_streak - 1).min(5));
                        *hold_until = Some(now + d);
                        job.last_error = Some(err);
                        queue.push_front(job);
                    }
                    Action::HoldPair => {
                        metrics::counter!(m::EGRESS_THROTTLED, "limit" => "meta_pair").increment(1);
                        let n = pair_backoff.entry(job.pair).or_insert(0);
                        let d = Duration::from_secs(4u64.pow((*n).min(5)));
                        *n += 1;
                        job.not_before = now + d;
                        job.last_error = Some(err);
                        queue.push_front(job);
                    }
                    Action::HoldLane(d) => {
                        metrics::counter!(m::EGRESS_THROTTLED, "limit" => "meta_hold").increment(1);
                        *hold_until = Some(now + d);
                        job.last_error = Some(err);
                        queue.push_front(job);
                    }
                    Action::Defer(d) => {
                        let mut e = err;
                        e.details = Some(format!(
                            "{}; deferred to the DLQ, retry after {} s",
                            e.details.unwrap_or_default(),
                            d.as_secs()
                        ));
                        self.finish(job, Outcome::Failed, None, None, Some(e));
                    }
                    Action::Fail => {
                        if errors::marks_marketing_stopped(code) {
                            self.publish_marketing_stopped(&job);
                        }
                        self.finish(job, Outcome::Failed, None, None, Some(err));
                    }
                    Action::Break(scope) => {
                        if circuit.is_none() {
                            metrics::gauge!(m::CIRCUIT_OPEN, "scope" => scope.label())
                                .increment(1.0);
                            tracing::error!(
                                scope = scope.label(),
                                code,
                                "circuit opened for a business number; sends held"
                            );
                        }
                        *circuit = Some(scope);
                        // Probe again after a while (half-open).
                        *hold_until =
                            Some(now + Duration::from_secs(30).min(self.cfg.circuit_hold_max));
                        job.last_error = Some(err);
                        queue.push_front(job);
                    }
                }
            }
        }
    }

    /// 131050: Meta says the user stopped marketing. Cached here at once and
    /// published on `wa.consent` so every instance (and a restart) knows.
    fn publish_marketing_stopped(&self, job: &Job) {
        let (number, user) = (&job.req.phone_number_id, job.req.to_digits());
        self.contacts
            .set_marketing(number, &user, Marketing::Stopped);
        let st = self.contacts.get(number, &user);
        let ev = crate::contacts::sync::consent_event(
            number,
            &user,
            &st,
            "meta_131050",
            now_ms(),
            &job.req.request_id,
        );
        let headers: [(&str, &[u8]); 1] = [("wagate-kind", b"consent")];
        match self
            .producer
            .send(&self.topics.consent, ev.key.as_bytes(), &ev.value, &headers)
        {
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

    fn finish(
        &self,
        job: Job,
        outcome: Outcome,
        wamid: Option<String>,
        message_status: Option<String>,
        error: Option<ResultError>,
    ) {
        // Deferred errors (131049) also go to the DLQ with retry_after_ms.
        let dlq = match (
            outcome,
            error
                .as_ref()
                .and_then(|e| e.code.as_i64())
                .map(errors::classify),
        ) {
            (Outcome::Failed, Some(Action::Defer(d))) => Some(d),
            _ => None,
        };
        let result = SendResult {
            v: 1,
            request_id: job.req.request_id.clone(),
            phone_number_id: job.req.phone_number_id.clone(),
            to: job.req.to.clone(),
            outcome,
            wamid,
            message_status,
            error,
            attempts: job.attempts,
            completed_at_ms: now_ms(),
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
    fn finish_raw(
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
            .map(|e| match &e.code {
                serde_json::Value::String(s) => s.clone(),
                other => other.to_string(),
            })
            .unwrap_or_else(|| "none".into());
        metrics::counter!(m::EGRESS_REQUESTS, "outcome" => result.outcome.label(), "code" => code)
            .increment(1);
        let mut value = serde_json::to_value(&result).unwrap_or_default();
        if redrive > 0 {
            value["redrive"] = redrive.into();
        }
        let bytes = serde_json::to_vec(&value).unwrap_or_default();
        let producer = self.producer.clone();
        let (results, dlq_topic) = (self.topics.results.clone(), self.topics.dlq.clone());
        let key = result.phone_number_id.clone();
        let id = result.request_id.clone();
        let tracker = self.tracker.clone();
        tokio::spawn(async move {
            if let Some(d) = dlq {
                produce_until_acked(&producer, &dlq_topic, &key, &id, "dlq", &d).await;
            }
            produce_until_acked(&producer, &results, &key, &id, "result", &bytes).await;
            tracker.lock().unwrap().done(partition, offset);
            drop(permit);
        });
    }
}

async fn produce_until_acked(
    producer: &KafkaProducer,
    topic: &str,
    key: &str,
    id: &str,
    kind: &str,
    bytes: &[u8],
) {
    let headers: [(&str, &[u8]); 3] = [
        ("wagate-event-id", id.as_bytes()),
        ("wagate-kind", kind.as_bytes()),
        ("wagate-app", b"egress"),
    ];
    let mut delay = Duration::from_millis(100);
    loop {
        if let Ok(f) = producer.send(topic, key.as_bytes(), bytes, &headers) {
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
fn backoff(attempt: u32, min_delay: Duration) -> Duration {
    let base = min_delay.saturating_mul(1 << attempt.saturating_sub(1).min(10));
    let base = base.min(Duration::from_secs(300));
    let jitter = rand::random::<f64>() * 0.4 + 0.8;
    base.mul_f64(jitter)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tracker_commits_contiguous_prefix_only() {
        let mut t = Tracker::default();
        for o in 10..15 {
            t.add(0, o);
        }
        t.done(0, 11);
        t.done(0, 12);
        assert_eq!(t.take_commits(), vec![(0, 10)]);
        t.done(0, 10);
        assert_eq!(t.take_commits(), vec![(0, 13)]);
        assert_eq!(t.take_commits(), vec![]);
        t.done(0, 13);
        // Redelivered after a rebalance: in progress, done, or committed.
        assert!(!t.add(0, 14));
        assert!(!t.add(0, 13));
        assert!(!t.add(0, 10));
        t.done(0, 14);
        assert_eq!(t.take_commits(), vec![(0, 15)]);
        assert!(t.add(0, 15));
    }

    #[test]
    fn backoff_grows_and_is_capped() {
        let a = backoff(1, Duration::from_millis(500));
        assert!(a >= Duration::from_millis(400) && a <= Duration::from_millis(600));
        let b = backoff(4, Duration::from_millis(500));
        assert!(b >= Duration::from_millis(3200) && b <= Duration::from_millis(4800));
        assert!(backoff(30, Duration::from_secs(60)) <= Duration::from_secs(360));
    }
}
