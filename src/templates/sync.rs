//! Keeping the registry: [`read`] bootstraps it from `wa.templates` (every
//! partition from the beginning, up to the high watermarks seen at start;
//! `/readyz` waits for it) and then tails the topic, on a thread of its own;
//! [`Refresher`] lists every WABA from the Graph API once the bootstrap is
//! done, then every `templates.refresh_secs` (and at once when a WABA is
//! learnt), and writes what changed.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};
use tokio_util::sync::CancellationToken;

use super::graph::{ListError, TemplatesClient};
use super::{Registry, Template};
use crate::config::Secret;
use crate::kafka::{ConnContext, Connection, KafkaProducer, Kind, RecordHeaders};
use crate::metrics as m;

/// Reads `topic` into `reg`: calls `on_caught_up` once every partition is
/// read to its start-time high watermark (and a read came back empty), then
/// tails until `stop`. Blocking.
pub fn read(
    conn: &Connection,
    topic: &str,
    reg: Arc<Registry>,
    on_caught_up: Box<dyn FnOnce() + Send>,
    stop: CancellationToken,
) -> Result<(), rdkafka::error::KafkaError> {
    let started = Instant::now();
    let consumer: BaseConsumer<ConnContext> = conn
        .client_config(|cc| {
            cc.set("group.id", "wagate-templates")
                .set("enable.auto.commit", "false")
                .set("enable.partition.eof", "false")
                // Template changes are rare: a long fetch wait keeps the
                // idle tail to a couple of fetches a second per broker.
                .set("fetch.wait.max.ms", "500");
        })
        .create_with_context(ConnContext(conn.diagnostics().clone()))?;
    let timeout = Duration::from_secs(10);
    let md = consumer.fetch_metadata(Some(topic), timeout)?;
    let parts = md
        .topics()
        .first()
        .map(|t| t.partitions().len())
        .unwrap_or(0) as i32;
    let mut ends: HashMap<i32, i64> = HashMap::new();
    let mut tpl = TopicPartitionList::new();
    for p in 0..parts {
        let (low, high) = consumer.fetch_watermarks(topic, p, timeout)?;
        if high > low {
            ends.insert(p, high);
        }
        tpl.add_partition_offset(topic, p, Offset::Beginning)?;
    }
    consumer.assign(&tpl)?;
    let remaining = |ends: &HashMap<i32, i64>| ends.len() as f64;
    metrics::gauge!(m::TEMPLATES_BOOTSTRAP_REMAINING).set(remaining(&ends));
    let mut on_caught_up = Some(on_caught_up);
    let mut applied = 0u64;
    while !stop.is_cancelled() {
        match consumer.poll(Duration::from_millis(100)) {
            None => {
                // Past the end offsets and idle: caught up (some brokers,
                // Tansu 0.6, report a high watermark inside the last batch).
                if ends.is_empty() {
                    if let Some(f) = on_caught_up.take() {
                        let secs = started.elapsed().as_secs_f64();
                        metrics::gauge!(m::TEMPLATES_BOOTSTRAP_SECONDS).set(secs);
                        tracing::info!(
                            records = applied,
                            templates = reg.len(),
                            elapsed_ms = (secs * 1000.0) as u64,
                            "templates caught up"
                        );
                        f();
                    }
                }
            }
            Some(Err(e)) => tracing::warn!(error = %e, "templates reader: consumer error"),
            Some(Ok(msg)) => {
                let key = msg
                    .key()
                    .and_then(|k| std::str::from_utf8(k).ok())
                    .unwrap_or("");
                if !key.is_empty() {
                    reg.apply(key, msg.payload());
                    applied += 1;
                }
                if ends
                    .get(&msg.partition())
                    .is_some_and(|end| msg.offset() + 1 >= *end)
                {
                    ends.remove(&msg.partition());
                    metrics::gauge!(m::TEMPLATES_BOOTSTRAP_REMAINING).set(remaining(&ends));
                }
            }
        }
    }
    Ok(())
}

/// Lists WABAs from the Graph API into the registry and the topic.
pub struct Refresher {
    pub reg: Arc<Registry>,
    pub client: TemplatesClient,
    pub producer: KafkaProducer,
    /// `wa.templates` with its prefix.
    pub topic: String,
    /// WABA → the access token of one of its configured numbers.
    pub tokens: HashMap<String, Secret>,
    pub default_token: Option<Secret>,
    pub period: Duration,
}

/// What one listing changed.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Refreshed {
    pub listed: usize,
    pub written: usize,
    pub removed: usize,
}

impl Refresher {
    /// Waits for `caught_up`, then refreshes every WABA every period (and
    /// at once when one is learnt) until `stop`.
    pub async fn run(
        self,
        mut caught_up: tokio::sync::watch::Receiver<bool>,
        stop: CancellationToken,
    ) {
        tokio::select! {
            _ = stop.cancelled() => return,
            r = caught_up.wait_for(|c| *c) => if r.is_err() { return },
        }
        let mut done: HashSet<String> = HashSet::new();
        let mut next_all = Instant::now();
        loop {
            let all = Instant::now() >= next_all;
            if all {
                next_all = Instant::now() + self.period;
            }
            let dirty = self.reg.take_dirty();
            for waba in self.reg.wabas() {
                if !all && done.contains(&waba) && !dirty.contains(&waba) {
                    continue;
                }
                done.insert(waba.clone());
                match self.refresh(&waba).await {
                    Ok(r) => {
                        tracing::debug!(waba_id = %waba, listed = r.listed, written = r.written, removed = r.removed, "templates refreshed")
                    }
                    Err(e) => {
                        tracing::warn!(waba_id = %waba, error = %e, "templates: listing failed; the registry keeps what it had")
                    }
                }
            }
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep_until(next_all.into()) => {}
                _ = self.reg.new_waba.notified() => {}
            }
        }
    }

    fn token(&self, waba: &str) -> Option<&Secret> {
        self.tokens.get(waba).or(self.default_token.as_ref())
    }

    /// Lists `waba` and writes every template that changed (and a tombstone
    /// for every one that is gone), unless a newer record of it exists.
    pub async fn refresh(&self, waba: &str) -> Result<Refreshed, ListError> {
        let Some(token) = self.token(waba) else {
            return Err(ListError::Http("no access token configured".into()));
        };
        let started_ms = crate::clock::now_ms();
        let listed = match self.client.list(waba, token.expose()).await {
            Ok(l) => {
                metrics::counter!(m::TEMPLATES_REFRESH, "result" => "ok").increment(1);
                l
            }
            Err(e) => {
                metrics::counter!(m::TEMPLATES_REFRESH, "result" => "error").increment(1);
                return Err(e);
            }
        };
        let mut out = Refreshed {
            listed: listed.len(),
            ..Default::default()
        };
        let mut seen = HashSet::new();
        let mut acks = Vec::new();
        for object in listed {
            let Some(t) = Template::listed(waba, object, started_ms) else {
                continue;
            };
            let key = t.key();
            seen.insert(key.clone());
            if let Some(old) = self.reg.get(&key) {
                if old.updated_at_ms > started_ms
                    || (old.same_content(&t) && old.listed_at_ms.is_some())
                {
                    continue;
                }
            }
            let value = t.to_record();
            self.reg.insert(Arc::new(t));
            let id = format!("template-refresh:{started_ms}:{key}");
            let h = RecordHeaders::new(&id, Kind::Template, "templates");
            match h.with(|h| self.producer.send(&self.topic, key.as_bytes(), &value, h)) {
                Ok(d) => acks.push(d),
                Err(e) => tracing::warn!(error = %e, "templates: record not produced"),
            }
            out.written += 1;
        }
        for old in self.reg.of_waba(waba) {
            let key = old.key();
            if seen.contains(&key) || !self.reg.remove_older(&key, started_ms) {
                continue;
            }
            let id = format!("template-gone:{started_ms}:{key}");
            let h = RecordHeaders::new(&id, Kind::Template, "templates");
            match h.with(|h| self.producer.send_tombstone(&self.topic, key.as_bytes(), h)) {
                Ok(d) => acks.push(d),
                Err(e) => tracing::warn!(error = %e, "templates: tombstone not produced"),
            }
            out.removed += 1;
        }
        self.reg.mark_listed(waba);
        for a in acks {
            if let Ok(Err(e)) = tokio::time::timeout(Duration::from_secs(30), a).await {
                tracing::warn!(error = %e, "templates: record not acknowledged");
            }
        }
        Ok(out)
    }
}
