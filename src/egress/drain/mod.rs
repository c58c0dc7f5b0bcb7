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
use rdkafka::consumer::{
    BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer,
};
use rdkafka::message::{Headers, Message};
use rdkafka::{Offset, TopicPartitionList};
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;

use crate::config::{Config, EgressConfig, Secret};
use crate::contacts::{Contacts, Marketing};
use crate::egress::graph::{GraphClient, GraphOutcome};
use crate::egress::policy;
use crate::egress::request::{GatewayCode, Outcome, ResultError, SendRequest, SendResult};
use crate::egress::tier;
use crate::kafka::{self, KafkaProducer, Kind, RecordHeaders, TopicId, Topics};
use crate::meta::errors::{self, Action};
use crate::metrics as m;
use crate::ratelimit::{PairKey, PairRate, Throughput};

fn now_ms() -> u64 {
    crate::clock::now_ms()
}

mod circuit;
mod dispatch;
mod finish;
mod history;
mod lane;
mod reader;
mod rebalance;
mod send;
mod tracker;

use circuit::Circuit;
use finish::{backoff, Verdict};
use history::{History, RequestKey};
use lane::Lane;
use rebalance::{DrainContext, Readers, Revoked, Splitter};
use tracker::Tracker;

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
    /// The person the request addresses, as pair limits and tiers count
    /// them: the phone digits when known (given, or linked to the
    /// recipient BSUID), else the BSUID.
    person: String,
    /// The phone (`+digits`) an authentication template addressed by
    /// `recipient` is sent to instead (DESIGN §10).
    send_to: Option<String>,
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

type PartitionQueue = rdkafka::consumer::stream_consumer::StreamPartitionQueue<DrainContext>;
type Lanes = HashMap<String, mpsc::UnboundedSender<Job>>;

/// The egress plane.
pub struct Egress {
    cfg: EgressConfig,
    connection: crate::kafka::Connection,
    topics: Topics,
    producer: KafkaProducer,
    graph: GraphClient,
    contacts: Arc<dyn Contacts>,
    /// Writes the 131050 consent record.
    contacts_writer: crate::contacts::writer::ContactsWriter,
    pair: PairRate,
    tiers: tier::Tiers,
    default_token: Option<Secret>,
    tracker: Arc<Mutex<Tracker>>,
    revoked: Arc<Revoked>,
    history: Mutex<History>,
    oldest: Mutex<HashMap<String, Instant>>,
    buffered: Arc<Semaphore>,
    /// Number state learnt from Meta: throughput level, restrictions, limits.
    numbers: Arc<crate::numbers::Numbers>,
    high_throughput: u32,
    /// Requests held per restricted number.
    restricted_held: Mutex<HashMap<String, usize>>,
    /// The template registry a template send is checked against.
    templates: Option<Arc<crate::templates::Registry>>,
}

impl Egress {
    /// Checks template sends against `reg` (DESIGN §14).
    pub fn with_templates(mut self, reg: Arc<crate::templates::Registry>) -> Egress {
        self.templates = Some(reg);
        self
    }

    pub fn new(
        cfg: &Config,
        topics: Topics,
        producer: KafkaProducer,
        contacts: Arc<dyn Contacts>,
    ) -> Egress {
        Egress {
            cfg: cfg.egress.clone(),
            connection: cfg.kafka.connection.clone(),
            contacts_writer: crate::contacts::writer::ContactsWriter::new(
                producer.clone(),
                &topics,
            ),
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
            numbers: Arc::new(crate::numbers::Numbers::default()),
            high_throughput: cfg.numbers.high_throughput,
            restricted_held: Mutex::new(HashMap::new()),
            templates: None,
        }
    }

    /// Follows this number state (see `numbers`): lanes' throughput,
    /// restrictions and the portfolios' tiers.
    pub fn with_numbers(mut self, numbers: Arc<crate::numbers::Numbers>) -> Egress {
        self.numbers = numbers;
        self
    }

    /// Requests held now in the lanes of restricted numbers.
    pub fn restricted_held(&self) -> usize {
        self.restricted_held.lock().unwrap().values().sum()
    }

    /// Portfolios without a configured limit take Meta's messaging limit.
    fn follow_tiers(&self, seen: &mut u64) {
        let g = self.numbers.generation();
        if g == *seen {
            return;
        }
        *seen = g;
        for (p, numbers) in self.tiers.portfolios() {
            if p.follows_meta {
                if let Some(limit) = self.numbers.messaging_limit(&numbers) {
                    p.set_meta_limit(limit);
                }
            }
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

    /// Runs the drain until `stop` is cancelled, then commits what is done.
    pub async fn run(self: Arc<Self>, stop: CancellationToken) -> anyhow::Result<()> {
        // History is (re)loaded on every partition assignment, the first included.
        let assigned = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let readers = Arc::new(Mutex::new(Readers::default()));
        let consumer = Arc::new(self.consumer(assigned.clone(), readers.clone())?);
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
        let mut tiers_seen = u64::MAX;
        loop {
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = commit_tick.tick() => {
                    self.commit(&consumer);
                    self.follow_tiers(&mut tiers_seen);
                }
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
                    // The history load can hold this loop for seconds, past
                    // commit ticks: tiers learnt meanwhile apply before the
                    // first record is read.
                    self.follow_tiers(&mut tiers_seen);
                    self.start_readers(queues, &readers, &lanes);
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
                        self.follow_tiers(&mut tiers_seen);
                    }
                    let permit = self.buffered.clone().try_acquire_owned().ok();
                    let _r = readers.lock().unwrap();
                    if !self.revoked.contains(msg.partition()) {
                        self.clone().take(&msg, &mut lanes.lock().unwrap(), permit);
                    }
                }
            }
        }
        self.wind_down(&consumer, &readers, &lanes).await;
        Ok(())
    }

    /// At shutdown: stop the readers and take no more requests, let lanes
    /// finish what they hold for a few seconds, then commit.
    async fn wind_down(
        &self,
        consumer: &StreamConsumer<DrainContext>,
        readers: &Mutex<Readers>,
        lanes: &Mutex<Lanes>,
    ) {
        for (_, (_, task)) in readers.lock().unwrap().tasks.drain() {
            task.abort();
        }
        let lanes = std::mem::take(&mut *lanes.lock().unwrap());
        self.revoked
            .closing
            .store(true, std::sync::atomic::Ordering::SeqCst);
        drop(lanes);
        let end = Instant::now() + Duration::from_secs(5);
        while self.backlog() > 0 && Instant::now() < end {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        self.commit(consumer);
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
}
