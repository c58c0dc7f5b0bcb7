//! The drain: a consumer group on `wa.outbound.requests`, one *lane* per
//! business number, one result per request, offsets committed in order.
//!
//! ```text
//! partition queue ──reader──▶ lane(number) ──send task──▶ Graph API
//!    ▲  one reader per        │ policy, throughput (GCRA), pair rate,
//!    │  partition, waits for  │ holds, circuits, retries
//!    │  a buffer permit (max_buffered, fair between partitions)
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
use std::time::{Duration, Instant};

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
use crate::egress::tier;
use crate::kafka::{self, KafkaProducer, Kind, RecordHeaders, TopicId, Topics};
use crate::meta::errors::{self, Action};
use crate::metrics as m;
use crate::ratelimit::{PairKey, PairRate, Throughput};

/// Wall clock in Unix milliseconds.
pub fn now_ms_pub() -> u64 {
    now_ms()
}

fn now_ms() -> u64 {
    crate::clock::now_ms()
}

/// A lane's circuit and its share of `wagate_circuit_open{scope}`: the
/// gauge follows the lane's state through scope changes, and a lane that
/// ends with its circuit open (revocation, shutdown) gives its count back.
#[derive(Default)]
struct Circuit(Option<errors::Scope>);

impl Circuit {
    fn is_some(&self) -> bool {
        self.0.is_some()
    }

    /// Opens (or moves) the circuit; true if it was closed.
    fn open(&mut self, scope: errors::Scope) -> bool {
        let was = self.0.replace(scope);
        if was != Some(scope) {
            if let Some(old) = was {
                metrics::gauge!(m::CIRCUIT_OPEN, "scope" => old.label()).decrement(1.0);
            }
            metrics::gauge!(m::CIRCUIT_OPEN, "scope" => scope.label()).increment(1.0);
        }
        was.is_none()
    }

    /// Closes the circuit; true if it was open.
    fn close(&mut self) -> bool {
        match self.0.take() {
            Some(scope) => {
                metrics::gauge!(m::CIRCUIT_OPEN, "scope" => scope.label()).decrement(1.0);
                true
            }
            None => false,
        }
    }
}

impl Drop for Circuit {
    fn drop(&mut self) {
        self.close();
    }
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
    /// The messaging-tier place this request holds, if it is a
    /// business-initiated send outside the user's window.
    tier: Option<TierPlace>,
    _permit: Option<OwnedSemaphorePermit>,
}

/// A place in a portfolio's tier count.
struct TierPlace {
    portfolio: Arc<tier::Portfolio>,
    user: u64,
    at_ms: u64,
    /// A new user (given back if Meta refuses the send).
    new: bool,
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
    /// Dropped unsent when the partition was revoked: never committed past.
    abandoned: BTreeSet<i64>,
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
    /// A request of a revoked partition dropped before it was sent: its
    /// offset is left for the partition's next owner.
    fn abandon(&mut self, p: i32, o: i64) {
        if let Some(part) = self.parts.get_mut(&p) {
            if part.pending.remove(&o) {
                part.abandoned.insert(o);
            }
        }
    }
    /// Requests of partition `p` still being worked on.
    fn pending(&self, p: i32) -> usize {
        self.parts.get(&p).map_or(0, |part| part.pending.len())
    }
    /// The offset to commit for a revoked partition, and forgets it.
    fn release(&mut self, p: i32) -> Option<i64> {
        let part = self.parts.remove(&p)?;
        let upto = [part.pending.first(), part.abandoned.first()]
            .into_iter()
            .flatten()
            .min()
            .copied()
            .unwrap_or(part.next);
        (upto > part.committed).then_some(upto)
    }
    /// Offsets safe to commit (first pending, or one past the last seen) that
    /// moved since the last call.
    fn take_commits(&mut self) -> Vec<(i32, i64)> {
        let mut out = Vec::new();
        for (p, part) in self.parts.iter_mut() {
            let upto = [part.pending.first(), part.abandoned.first()]
                .into_iter()
                .flatten()
                .min()
                .copied()
                .unwrap_or(part.next);
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
    /// Tier-counted sends: (phone_number_id, to, completed_at_ms).
    tier: Vec<(String, String, u64)>,
}

fn history_key(request_id: &str, redrive: u32) -> String {
    format!("{request_id}#{redrive}")
}

type PartitionQueue = rdkafka::consumer::stream_consumer::StreamPartitionQueue<DrainContext>;
type Lanes = HashMap<String, mpsc::UnboundedSender<Job>>;

struct Splitter {
    consumer: std::sync::Weak<StreamConsumer<DrainContext>>,
    tx: mpsc::UnboundedSender<Vec<(i32, PartitionQueue)>>,
}

/// The reader task of each partition, with the assignment it belongs to.
/// A reader dispatches only while it is the current one of its partition
/// and the partition is not revoked (checked under this lock, which a
/// revocation takes too), so nothing of a revoked partition is dispatched
/// after the revocation started.
#[derive(Default)]
struct Readers {
    epoch: u64,
    tasks: HashMap<i32, (u64, tokio::task::AbortHandle)>,
}

/// Partitions taken away by a rebalance: their requests must not be sent
/// by this instance any more (the next owner will consume them).
#[derive(Default)]
struct Revoked {
    parts: Mutex<HashSet<i32>>,
    /// Bumped on every revocation, so lanes rescan their queues only then.
    generation: std::sync::atomic::AtomicU64,
    /// Set at shutdown: the drain commits on its own, nothing to wait for.
    closing: std::sync::atomic::AtomicBool,
}

impl Revoked {
    fn contains(&self, p: i32) -> bool {
        self.parts.lock().unwrap().contains(&p)
    }
}

/// Notes partition assignments: after one, the history of results and
/// attempts is read again before any request is dispatched, so requests that
/// the previous owner attempted are reported `unknown`, not sent again.
///
/// On a revocation, before the partitions go to another instance: lanes
/// drop the partitions' requests that are not being sent, requests already
/// at Meta finish and get their result, and the offsets are committed up to
/// the first request not completed. Only then does the rebalance proceed, so
/// two instances never hold the same request.
struct DrainContext {
    assigned: Arc<std::sync::atomic::AtomicBool>,
    revoked: Arc<Revoked>,
    /// Splits each assigned partition into its own queue (set once the
    /// consumer exists) and hands the queues to the drain loop.
    splitter: std::sync::OnceLock<Splitter>,
    /// The task reading each partition's queue.
    readers: Arc<Mutex<Readers>>,
    tracker: Arc<Mutex<Tracker>>,
    topic: String,
    /// How long a revocation waits for requests at Meta to finish.
    revoke_wait: Duration,
}

impl DrainContext {
    fn revoke(&self, consumer: &BaseConsumer<Self>, tpl: &TopicPartitionList) {
        let parts: Vec<i32> = tpl
            .elements()
            .iter()
            .filter(|e| e.topic() == self.topic)
            .map(|e| e.partition())
            .collect();
        if parts.is_empty()
            || self
                .revoked
                .closing
                .load(std::sync::atomic::Ordering::SeqCst)
        {
            return;
        }
        {
            let mut readers = self.readers.lock().unwrap();
            for p in &parts {
                if let Some((_, task)) = readers.tasks.remove(p) {
                    task.abort();
                }
            }
            self.revoked
                .parts
                .lock()
                .unwrap()
                .extend(parts.iter().copied());
        }
        self.revoked
            .generation
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let wait = || {
            let end = Instant::now() + self.revoke_wait;
            while Instant::now() < end {
                let left: usize = {
                    let t = self.tracker.lock().unwrap();
                    parts.iter().map(|p| t.pending(*p)).sum()
                };
                if left == 0 {
                    return 0;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            let t = self.tracker.lock().unwrap();
            parts.iter().map(|p| t.pending(*p)).sum::<usize>()
        };
        // Called from inside the consumer's poll on a runtime worker: let
        // the runtime move its other tasks (the lanes) elsewhere meanwhile.
        let left = match tokio::runtime::Handle::try_current() {
            Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
                tokio::task::block_in_place(wait)
            }
            _ => wait(),
        };
        if left > 0 {
            tracing::warn!(
                requests = left,
                "partitions revoked while requests were still at Meta; their next owner reports them unknown"
            );
        }
        let mut commit = TopicPartitionList::new();
        {
            let mut t = self.tracker.lock().unwrap();
            for p in &parts {
                if let Some(o) = t.release(*p) {
                    let _ = commit.add_partition_offset(&self.topic, *p, Offset::Offset(o));
                }
            }
        }
        if commit.count() > 0 {
            if let Err(e) = consumer.commit(&commit, CommitMode::Sync) {
                tracing::warn!(error = %e, "offset commit on revocation failed");
            }
        }
        tracing::info!(
            partitions = ?parts,
            committed = ?commit.elements().iter().map(|e| (e.partition(), e.offset())).collect::<Vec<_>>(),
            "egress partitions revoked and handed over"
        );
    }
}

impl ClientContext for DrainContext {
    fn stats(&self, statistics: rdkafka::statistics::Statistics) {
        crate::kafka::record_consumer_lag(&statistics);
    }
}

impl ConsumerContext for DrainContext {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Revoke(tpl) = rebalance {
            self.revoke(consumer, tpl);
        }
    }

    fn post_rebalance(&self, _c: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Error(e) = rebalance {
            tracing::warn!(error = %e, "egress rebalance error");
        }
        if let Rebalance::Assign(tpl) = rebalance {
            tracing::info!(
                partitions = ?tpl.elements().iter().map(|e| e.partition()).collect::<Vec<_>>(),
                "egress partitions assigned"
            );
            {
                let mut revoked = self.revoked.parts.lock().unwrap();
                for e in tpl.elements() {
                    revoked.remove(&e.partition());
                }
            }
            if tpl.count() > 0 {
                self.assigned
                    .store(true, std::sync::atomic::Ordering::SeqCst);
                // Each partition gets its own queue, split right after the
                // assignment and before anything is fetched: a reader that
                // stops taking records (the buffer is full) stops fetching
                // for that partition only, without pause/seek.
                if let Some(sp) = self.splitter.get() {
                    if let Some(consumer) = sp.consumer.upgrade() {
                        let queues: Vec<(i32, PartitionQueue)> = tpl
                            .elements()
                            .iter()
                            .filter(|e| e.topic() == self.topic)
                            .filter_map(|e| {
                                consumer
                                    .split_partition_queue(&self.topic, e.partition())
                                    .map(|q| (e.partition(), q))
                            })
                            .collect();
                        let _ = sp.tx.send(queues);
                    }
                }
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
    tiers: tier::Tiers,
    default_token: Option<Secret>,
    tracker: Arc<Mutex<Tracker>>,
    revoked: Arc<Revoked>,
    history: Mutex<History>,
    oldest: Mutex<HashMap<String, Instant>>,
    buffered: Arc<Semaphore>,
}

impl Egress {
    pub fn new(
        cfg: &Config,
        topics: Topics,
        producer: KafkaProducer,
        contacts: Arc<dyn Contacts>,
    ) -> Egress {
        Egress {
            cfg: cfg.egress.clone(),
            brokers: cfg.kafka.brokers.clone(),
            topics,
            producer,
            graph: GraphClient::new(&cfg.graph.base_url, cfg.egress.send_timeout),
            contacts,
            pair: PairRate::meta(),
            tiers: tier::Tiers::new(
                cfg.egress
                    .portfolios
                    .iter()
                    .map(|p| (p.name.as_str(), p.limit, p.numbers.as_slice())),
            ),
            default_token: cfg.graph.access_token.clone(),
            tracker: Arc::new(Mutex::new(Tracker::default())),
            revoked: Arc::new(Revoked::default()),
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
        let readers = Arc::new(Mutex::new(Readers::default()));
        let consumer: StreamConsumer<DrainContext> = cc
            .set("bootstrap.servers", &self.brokers)
            .set("group.id", &self.cfg.group_id)
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("auto.offset.reset", "earliest")
            .set("session.timeout.ms", "10000")
            .set("heartbeat.interval.ms", "1000")
            .set("enable.partition.eof", "false")
            // Prefetch per partition: a reader that waits for buffer room
            // leaves at most this much fetched ahead of it.
            .set("queued.min.messages", "2000")
            .set("queued.max.messages.kbytes", "4096")
            .set(
                "statistics.interval.ms",
                crate::kafka::STATISTICS_INTERVAL_MS,
            )
            .create_with_context(DrainContext {
                assigned: assigned.clone(),
                revoked: self.revoked.clone(),
                splitter: std::sync::OnceLock::new(),
                readers: readers.clone(),
                tracker: self.tracker.clone(),
                topic: self.topics.name(TopicId::OutboundRequests).to_string(),
                revoke_wait: self.cfg.send_timeout + Duration::from_secs(5),
            })?;
        let consumer = Arc::new(consumer);
        let (split_tx, mut split_rx) = mpsc::unbounded_channel();
        let _ = consumer.context().splitter.set(Splitter {
            consumer: Arc::downgrade(&consumer),
            tx: split_tx,
        });
        consumer.subscribe(&[self.topics.name(TopicId::OutboundRequests)])?;
        let lanes: Arc<Mutex<Lanes>> = Arc::new(Mutex::new(HashMap::new()));
        let mut commit_tick = tokio::time::interval(Duration::from_millis(200));
        // Pairs whose pair-rate state is back to full burst are forgotten
        // once a minute, so the limiter's memory follows the active pairs.
        let mut prune_tick = tokio::time::interval(Duration::from_secs(60));
        prune_tick.tick().await;
        tracing::info!(topic = %self.topics.name(TopicId::OutboundRequests), group = %self.cfg.group_id, "egress draining");
        loop {
            tokio::select! {
                _ = stop.changed() => break,
                _ = commit_tick.tick() => self.commit(&consumer),
                _ = prune_tick.tick() => {
                    let me = self.clone();
                    tokio::task::spawn_blocking(move || me.pair.retain_recent());
                }
                Some(queues) = split_rx.recv() => {
                    // New partitions: learn what their previous owner did
                    // before reading them.
                    if assigned.swap(false, std::sync::atomic::Ordering::SeqCst) {
                        self.load_history().await;
                    }
                    let mut r = readers.lock().unwrap();
                    r.epoch += 1;
                    let epoch = r.epoch;
                    for (p, queue) in queues {
                        if self.revoked.contains(p) {
                            continue;
                        }
                        let task = tokio::spawn(self.clone().read_partition(
                            p,
                            epoch,
                            queue,
                            readers.clone(),
                            lanes.clone(),
                        ));
                        if let Some((_, old)) = r.tasks.insert(p, (epoch, task.abort_handle())) {
                            old.abort();
                        }
                    }
                }
                // Records fetched before their partition was split (rare):
                // taken as they come, over the buffer bound if need be.
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
                        self.load_history().await;
                    }
                    let permit = self.buffered.clone().try_acquire_owned().ok();
                    let _r = readers.lock().unwrap();
                    if !self.revoked.contains(msg.partition()) {
                        self.clone().take(&msg, &mut lanes.lock().unwrap(), permit);
                    }
                }
            }
        }
        {
            let mut r = readers.lock().unwrap();
            for (_, (_, task)) in r.tasks.drain() {
                task.abort();
            }
        }
        let lanes = std::mem::take(&mut *lanes.lock().unwrap());
        // Stop taking requests; let lanes finish what they hold briefly, then commit.
        self.revoked
            .closing
            .store(true, std::sync::atomic::Ordering::SeqCst);
        drop(lanes);
        let end = Instant::now() + Duration::from_secs(5);
        while self.backlog() > 0 && Instant::now() < end {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        self.commit(&consumer);
        Ok(())
    }

    /// Reads one partition's queue in offset order, one buffer permit per
    /// record: when the buffer is full the reader waits (the semaphore is
    /// fair, so partitions take turns) and librdkafka stops fetching for
    /// this partition once `queued.min.messages` are waiting; the other
    /// partitions go on.
    async fn read_partition(
        self: Arc<Self>,
        p: i32,
        epoch: u64,
        queue: PartitionQueue,
        readers: Arc<Mutex<Readers>>,
        lanes: Arc<Mutex<Lanes>>,
    ) {
        loop {
            let Ok(permit) = self.buffered.clone().acquire_owned().await else {
                return;
            };
            let msg = match queue.recv().await {
                Ok(m) => m,
                Err(e) => {
                    tracing::warn!(error = %e, partition = p, "egress partition read error");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                }
            };
            let r = readers.lock().unwrap();
            if r.tasks.get(&p).is_none_or(|(e, _)| *e != epoch) || self.revoked.contains(p) {
                // Revoked or replaced meanwhile: the record is not ours.
                return;
            }
            self.clone()
                .take(&msg, &mut lanes.lock().unwrap(), Some(permit));
            drop(r);
        }
    }

    /// Registers a consumed record and hands it to its lane.
    fn take(
        self: Arc<Self>,
        msg: &rdkafka::message::BorrowedMessage<'_>,
        lanes: &mut Lanes,
        permit: Option<OwnedSemaphorePermit>,
    ) {
        tracing::trace!(
            partition = msg.partition(),
            offset = msg.offset(),
            "egress request consumed"
        );
        let redrive = msg
            .headers()
            .and_then(|h| {
                h.iter()
                    .find(|h| h.key == "wagate-redrive")
                    .and_then(|h| h.value)
            })
            .and_then(|v| std::str::from_utf8(v).ok()?.parse().ok())
            .unwrap_or(0);
        let key = msg
            .key()
            .map(|k| String::from_utf8_lossy(k).into_owned())
            .unwrap_or_default();
        let (p, o) = (msg.partition(), msg.offset());
        if !self.tracker.lock().unwrap().add(p, o) {
            // Consumed again after a rebalance: already in progress or done.
            return;
        }
        let payload = msg.payload().unwrap_or_default();
        self.dispatch(lanes, p, o, redrive, &key, payload, permit);
    }

    fn commit(&self, consumer: &StreamConsumer<DrainContext>) {
        let offsets = self.tracker.lock().unwrap().take_commits();
        if offsets.is_empty() {
            return;
        }
        let mut tpl = TopicPartitionList::new();
        for (p, o) in offsets {
            let _ = tpl.add_partition_offset(
                self.topics.name(TopicId::OutboundRequests),
                p,
                Offset::Offset(o),
            );
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
        let (results, attempts) = (
            self.topics.name(TopicId::OutboundResults).to_string(),
            self.topics.name(TopicId::OutboundAttempts).to_string(),
        );
        let tiers = !self.tiers.is_empty();
        let got = tokio::task::spawn_blocking(move || {
            let mut h = History::default();
            let mut read = |topic: &str, results: bool| {
                kafka::read_since(&brokers, topic, since, |_key, payload| {
                    if let Ok(v) = serde_json::from_slice::<serde_json::Value>(payload) {
                        if let Some(id) = v.get("request_id").and_then(|x| x.as_str()) {
                            let redrive =
                                v.get("redrive").and_then(|x| x.as_u64()).unwrap_or(0) as u32;
                            let set = if results {
                                &mut h.completed
                            } else {
                                &mut h.attempted
                            };
                            set.insert(history_key(id, redrive));
                        }
                        if results && tiers && v["tier_counted"] == true {
                            let s = |k: &str| v[k].as_str().unwrap_or("").to_string();
                            let at = v["completed_at_ms"].as_u64().unwrap_or(0);
                            h.tier.push((s("phone_number_id"), s("to"), at));
                        }
                    }
                })
            };
            let r1 = read(&results, true);
            let r2 = read(&attempts, false);
            (h, r1.and(r2))
        })
        .await;
        match got {
            Ok((h, res)) => {
                if let Err(e) = res {
                    tracing::warn!(error = %e, "egress history incomplete");
                }
                let now = now_ms();
                for (number, to, at) in &h.tier {
                    if let Some(p) = self.tiers.of(number) {
                        p.restore(crate::contacts::pair_key("", to).1, *at, now);
                    }
                }
                tracing::info!(
                    completed = h.completed.len(),
                    attempted = h.attempted.len(),
                    tier_counted = h.tier.len(),
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
                    tier_counted: false,
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
        let mut circuit = Circuit::default();
        let mut closed = false;
        let mut revoked_seen = 0u64;
        loop {
            // Revoked partitions: requests not at Meta now are left to the
            // partition's next owner.
            let generation = self
                .revoked
                .generation
                .load(std::sync::atomic::Ordering::SeqCst);
            if generation != revoked_seen {
                revoked_seen = generation;
                queue.retain(|job| {
                    if self.revoked.contains(job.partition) {
                        self.tracker
                            .lock()
                            .unwrap()
                            .abandon(job.partition, job.offset);
                        false
                    } else {
                        true
                    }
                });
            }
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
                self.drop_front_if_revoked(&mut queue);
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
                if job.tier.is_none()
                    && job.req.is_template()
                    && !policy::window_open(&state, now_ms)
                {
                    if let Some(portfolio) = self.tiers.of(&job.req.phone_number_id) {
                        let user = crate::contacts::pair_key("", &job.req.to_digits()).1;
                        let admit = portfolio.admit(user, now_ms);
                        if admit == tier::Admit::Full {
                            let job = queue.remove(i).expect("index from the scan");
                            metrics::counter!(m::CONSENT_BLOCKED, "reason" => "tier_limit")
                                .increment(1);
                            let details = format!(
                                "portfolio {} reached {} users in 24 h",
                                portfolio.name, portfolio.limit
                            );
                            self.finish(
                                job,
                                Outcome::Blocked,
                                None,
                                None,
                                Some(ResultError::gateway(
                                    "tier_limit",
                                    "the portfolio's messaging tier is used up: no more business-initiated conversations with new users for now",
                                    Some(details),
                                )),
                            );
                            continue;
                        }
                        queue[i].tier = Some(TierPlace {
                            portfolio: portfolio.clone(),
                            user,
                            at_ms: now_ms,
                            new: admit == tier::Admit::New,
                        });
                    }
                }
                let job = &queue[i];
                if let Err(wait) = self.pair.check(job.pair) {
                    metrics::counter!(m::EGRESS_THROTTLED, "limit" => "pair").increment(1);
                    queue[i].not_before = now + wait;
                    continue;
                } else {
                    let mut job = queue.remove(i).expect("index from the scan");
                    if self.revoked.contains(job.partition) {
                        // Its partition has another owner now.
                        self.tracker
                            .lock()
                            .unwrap()
                            .abandon(job.partition, job.offset);
                        continue;
                    }
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
                    Some(j) if self.revoked.contains(j.partition) => {
                        self.tracker.lock().unwrap().abandon(j.partition, j.offset);
                    }
                    Some(j) => queue.push_back(j),
                    None => closed = true,
                },
                Some((job, out, took)) = done_rx.recv() => {
                    in_flight.remove(&job.pair);
                    metrics::histogram!(m::META_API_SECONDS).record(took.as_secs_f64());
                    self.handle_outcome(job, out, &mut queue, &throughput, &mut pair_backoff, &mut hold_until, &mut throttle_streak, &mut last_throttle, &mut circuit);
                    self.drop_front_if_revoked(&mut queue);
                }
                _ = tokio::time::sleep_until(wake.into()) => {}
            }
        }
    }

    /// A request put back for a retry or a hold (always at the front) whose
    /// partition was revoked meanwhile goes to the partition's next owner.
    fn drop_front_if_revoked(&self, queue: &mut VecDeque<Job>) {
        if queue
            .front()
            .is_some_and(|j| self.revoked.contains(j.partition))
        {
            let j = queue.pop_front().expect("front exists");
            self.tracker.lock().unwrap().abandon(j.partition, j.offset);
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
        ticket.start_now(throughput.margin());
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
        circuit: &mut Circuit,
    ) {
        let now = Instant::now();
        match out {
            GraphOutcome::Accepted {
                wamid,
                message_status,
            } => {
                pair_backoff.remove(&job.pair);
                if circuit.close() {
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
                        if circuit.open(scope) {
                            tracing::error!(
                                scope = scope.label(),
                                code,
                                "circuit opened for a business number; sends held"
                            );
                        }
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
        let headers = RecordHeaders::new(&ev.event_id, Kind::Consent, "egress");
        match headers.with(|h| {
            self.producer.send(
                self.topics.name(TopicId::Consent),
                ev.key.as_bytes(),
                &ev.value,
                h,
            )
        }) {
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
            tier_counted,
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

async fn produce_until_acked(
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
    fn a_revoked_partition_commits_before_its_first_unsent_request() {
        let mut t = Tracker::default();
        for o in 0..6 {
            t.add(1, o);
        }
        t.done(1, 0);
        t.done(1, 1);
        t.abandon(1, 2); // dropped unsent: the next owner sends it
        t.done(1, 3);
        assert_eq!(t.pending(1), 2);
        t.done(1, 4);
        t.abandon(1, 5);
        assert_eq!(t.pending(1), 0);
        // Never past the abandoned offset 2, though 3 and 4 are done.
        assert_eq!(t.take_commits(), vec![(1, 2)]);
        assert_eq!(t.release(1), None, "already committed up to 2");
        // Forgotten: consumed again later, it is new to this instance.
        assert!(t.add(1, 2));
        t.abandon(1, 2);
        assert_eq!(t.release(1), Some(2));
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

#[cfg(test)]
mod circuit_tests {
    use super::*;

    fn gauge(text: &str, scope: &str) -> f64 {
        text.lines()
            .find(|l| l.starts_with(&format!("wagate_circuit_open{{scope=\"{scope}\"}}")))
            .and_then(|l| l.rsplit(' ').next()?.parse().ok())
            .unwrap_or(0.0)
    }

    #[test]
    fn the_gauge_follows_scope_changes_and_lanes_that_end_open() {
        let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
        let handle = recorder.handle();
        metrics::with_local_recorder(&recorder, || {
            let (a, b) = (errors::Scope::Token, errors::Scope::Number);
            let mut c = Circuit::default();
            assert!(c.open(a));
            assert!(!c.open(a), "already open");
            assert!(!c.open(b), "moved, not newly opened");
            let t = handle.render();
            assert_eq!(
                (gauge(&t, a.label()), gauge(&t, b.label())),
                (0.0, 1.0),
                "{t}"
            );
            let mut other = Circuit::default();
            other.open(b);
            assert_eq!(gauge(&handle.render(), b.label()), 2.0);
            drop(other); // a lane ending with its circuit open
            assert_eq!(gauge(&handle.render(), b.label()), 1.0);
            assert!(c.close());
            assert!(!c.close());
            let t = handle.render();
            assert_eq!(
                (gauge(&t, a.label()), gauge(&t, b.label())),
                (0.0, 0.0),
                "{t}"
            );
        });
    }
}
