//! The consumer context: partition assignment and revocation hand-over.

use super::*;

impl Egress {
    /// The requests topic's consumer: manual commits, a small prefetch per
    /// partition, and the context that hands partitions over on rebalance.
    pub(super) fn consumer(
        &self,
        assigned: Arc<std::sync::atomic::AtomicBool>,
        readers: Arc<Mutex<Readers>>,
    ) -> Result<StreamConsumer<DrainContext>, rdkafka::error::KafkaError> {
        let conn = &self.connection;
        conn.client_config(|cc| {
            if let Some(id) = &self.cfg.instance_id {
                cc.set("group.instance.id", id);
            }
            cc.set("group.id", &self.cfg.group_id)
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
                );
        })
        .create_with_context(DrainContext {
            diagnostics: conn.diagnostics().clone(),
            assigned,
            revoked: self.revoked.clone(),
            splitter: std::sync::OnceLock::new(),
            readers,
            tracker: self.tracker.clone(),
            topic: self.topics.name(TopicId::OutboundRequests).to_string(),
            revoke_wait: self.cfg.send_timeout + Duration::from_secs(5),
        })
    }
}

pub(super) struct Splitter {
    pub(super) consumer: std::sync::Weak<StreamConsumer<DrainContext>>,
    pub(super) tx: mpsc::UnboundedSender<Vec<(i32, PartitionQueue)>>,
}

/// The reader task of each partition, with the assignment it belongs to.
/// A reader dispatches only while it is the current one of its partition
/// and the partition is not revoked (checked under this lock, which a
/// revocation takes too), so nothing of a revoked partition is dispatched
/// after the revocation started.
#[derive(Default)]
pub(super) struct Readers {
    pub(super) epoch: u64,
    pub(super) tasks: HashMap<i32, (u64, tokio::task::AbortHandle)>,
}

/// Partitions taken away by a rebalance: their requests must not be sent
/// by this instance any more (the next owner will consume them).
#[derive(Default)]
pub(super) struct Revoked {
    pub(super) parts: Mutex<HashSet<i32>>,
    /// Bumped on every revocation, so lanes rescan their queues only then.
    pub(super) generation: std::sync::atomic::AtomicU64,
    /// Set at shutdown: the drain commits on its own, nothing to wait for.
    pub(super) closing: std::sync::atomic::AtomicBool,
}

impl Revoked {
    pub(super) fn contains(&self, p: i32) -> bool {
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
pub(super) struct DrainContext {
    /// Where connection problems (TLS, SASL) are reported.
    pub(super) diagnostics: crate::kafka::Diagnostics,
    pub(super) assigned: Arc<std::sync::atomic::AtomicBool>,
    pub(super) revoked: Arc<Revoked>,
    /// Splits each assigned partition into its own queue (set once the
    /// consumer exists) and hands the queues to the drain loop.
    pub(super) splitter: std::sync::OnceLock<Splitter>,
    /// The task reading each partition's queue.
    pub(super) readers: Arc<Mutex<Readers>>,
    pub(super) tracker: Arc<Mutex<Tracker>>,
    pub(super) topic: String,
    /// How long a revocation waits for requests at Meta to finish.
    pub(super) revoke_wait: Duration,
}

impl DrainContext {
    pub(super) fn revoke(&self, consumer: &BaseConsumer<Self>, tpl: &TopicPartitionList) {
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
    fn log(&self, level: rdkafka::config::RDKafkaLogLevel, fac: &str, msg: &str) {
        self.diagnostics.on_log(level, fac, msg);
    }
    fn error(&self, error: rdkafka::error::KafkaError, reason: &str) {
        self.diagnostics.on_error(&error, reason);
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
