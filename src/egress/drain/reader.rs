//! Partition readers: one task per assigned partition, a buffer permit per
//! record, each record handed to its lane; and the offset commit.

use super::*;

impl Egress {
    /// A reader task for each newly split partition queue (a new epoch of
    /// the assignment; a partition's previous reader is aborted).
    pub(super) fn start_readers(
        self: &Arc<Self>,
        queues: Vec<(i32, PartitionQueue)>,
        readers: &Arc<Mutex<Readers>>,
        lanes: &Arc<Mutex<Lanes>>,
    ) {
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

    /// Reads one partition's queue in offset order, one buffer permit per
    /// record: when the buffer is full the reader waits (the semaphore is
    /// fair, so partitions take turns) and librdkafka stops fetching for
    /// this partition once `queued.min.messages` are waiting; the other
    /// partitions go on.
    pub(super) async fn read_partition(
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
    pub(super) fn take(
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

    pub(super) fn commit(&self, consumer: &StreamConsumer<DrainContext>) {
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
}
