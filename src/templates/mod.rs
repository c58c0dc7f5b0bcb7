//! The template registry (DESIGN §14): every template of every WABA wagate
//! serves, as Meta lists it (`GET /{version}/{waba_id}/message_templates`)
//! and as the template webhooks change it, kept on the compacted topic
//! `wa.templates` (key `{waba_id}:{name}:{language}`) and in memory here.
//!
//! - `records.rs`: the record shape of `wa.templates` (what other readers
//!   rely on), its key, and how two records of one key are ordered.
//! - `check.rs`: a template send against its registry entry (pure).
//! - `webhook.rs`: what a webhook body teaches (number → WABA, template
//!   changes, routed by payload shape), turned into records by ingress.
//! - `graph.rs`: the paged listing from the Graph API.
//! - `sync.rs`: the topic's bootstrap and tail (its own thread), and the
//!   periodic refresh (a tokio task).
//!
//! Which source wins: for one key, the record with the larger
//! `updated_at_ms` (a webhook: its receipt time; a refresh: the time the
//! listing *started*, so a webhook that arrives while a listing is under way
//! is not overwritten by it). A template absent from a complete listing is
//! removed (tombstone) unless a newer record exists.

pub mod check;
pub mod graph;
pub mod records;
pub mod sync;
pub mod webhook;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, RwLock};

use crate::metrics as m;
pub use check::{Checked, TemplateBlock};
pub use records::{key_of, Template};

/// How long a template counts as "in use" after a send checked it
/// (`wagate_templates_used_not_approved`).
pub const IN_USE_MS: u64 = 3600 * 1000;

/// What the registry knows of one template of one number.
#[derive(Debug, Clone)]
pub enum Lookup {
    /// The number's WABA is not known, or that WABA was never listed
    /// completely: nothing can be said (the send goes on as before).
    Unavailable,
    /// The WABA was listed and has no template of that name and language.
    Unknown,
    Found(Arc<Template>),
}

/// The registry: templates by key, the WABA of each number, and the WABAs
/// listed completely at least once (by any instance: a record that carries
/// `listed_at_ms`).
#[derive(Default)]
pub struct Registry {
    templates: RwLock<HashMap<String, Arc<Template>>>,
    /// phone_number_id → WABA id (config first, then webhooks).
    numbers: RwLock<HashMap<String, String>>,
    /// Numbers whose WABA the config names (webhooks do not change those).
    configured: HashSet<String>,
    listed: RwLock<HashSet<String>>,
    /// Every WABA to refresh (configured, learnt, or seen on the topic).
    wabas: RwLock<HashSet<String>>,
    /// Templates checked by a send: key → last use (ms).
    used: Mutex<HashMap<String, u64>>,
    /// WABAs to list again at once (a components update).
    dirty: Mutex<HashSet<String>>,
    /// A WABA was learnt, or one is dirty: refresh now.
    pub new_waba: tokio::sync::Notify,
}

impl Registry {
    /// A registry knowing the WABA of each configured number.
    pub fn new<'a>(numbers: impl IntoIterator<Item = (&'a str, &'a str)>) -> Registry {
        let map: HashMap<String, String> = numbers
            .into_iter()
            .map(|(n, w)| (n.to_string(), w.to_string()))
            .collect();
        Registry {
            configured: map.keys().cloned().collect(),
            wabas: RwLock::new(map.values().cloned().collect()),
            numbers: RwLock::new(map),
            ..Default::default()
        }
    }

    /// The WABA of a number, if known.
    pub fn waba_of(&self, number: &str) -> Option<String> {
        self.numbers.read().unwrap().get(number).cloned()
    }

    /// A webhook named `number` under `waba` (its `entry[].id`). True when
    /// that is new (a WABA not seen before is refreshed at once).
    pub fn learn_number(&self, number: &str, waba: &str) -> bool {
        if self.numbers.read().unwrap().get(number).map(String::as_str) == Some(waba)
            || self.configured.contains(number)
        {
            return false;
        }
        self.numbers
            .write()
            .unwrap()
            .insert(number.to_string(), waba.to_string());
        self.add_waba(waba);
        true
    }

    fn add_waba(&self, waba: &str) {
        if self.wabas.read().unwrap().contains(waba) {
            return;
        }
        self.wabas.write().unwrap().insert(waba.to_string());
        self.new_waba.notify_one();
    }

    /// Asks for `waba` to be listed again now (a change the webhooks do not
    /// carry in full, such as `message_template_components_update`).
    pub fn request_refresh(&self, waba: &str) {
        self.add_waba(waba);
        self.dirty.lock().unwrap().insert(waba.to_string());
        self.new_waba.notify_one();
    }

    /// The WABAs asked for since the last call.
    pub fn take_dirty(&self) -> HashSet<String> {
        std::mem::take(&mut *self.dirty.lock().unwrap())
    }

    /// Every WABA to list, sorted.
    pub fn wabas(&self) -> Vec<String> {
        let mut v: Vec<String> = self.wabas.read().unwrap().iter().cloned().collect();
        v.sort();
        v
    }

    /// Whether `waba` was ever listed completely.
    pub fn is_listed(&self, waba: &str) -> bool {
        self.listed.read().unwrap().contains(waba)
    }

    pub fn mark_listed(&self, waba: &str) {
        if !self.is_listed(waba) {
            self.listed.write().unwrap().insert(waba.to_string());
        }
    }

    /// The entry of `key`, if any.
    pub fn get(&self, key: &str) -> Option<Arc<Template>> {
        self.templates.read().unwrap().get(key).cloned()
    }

    /// The template `name`/`language` of the number's WABA.
    pub fn lookup(&self, number: &str, name: &str, language: &str) -> Lookup {
        let Some(waba) = self.waba_of(number) else {
            return Lookup::Unavailable;
        };
        let key = key_of(&waba, name, language);
        if let Some(t) = self.get(&key) {
            return Lookup::Found(t);
        }
        if self.is_listed(&waba) {
            Lookup::Unknown
        } else {
            Lookup::Unavailable
        }
    }

    /// A template of `waba` by Meta's id (webhooks without a name).
    pub fn by_id(&self, waba: &str, id: &str) -> Option<Arc<Template>> {
        self.templates
            .read()
            .unwrap()
            .values()
            .find(|t| t.waba_id == waba && t.id.as_deref() == Some(id))
            .cloned()
    }

    /// Every entry of `waba`.
    pub fn of_waba(&self, waba: &str) -> Vec<Arc<Template>> {
        self.templates
            .read()
            .unwrap()
            .values()
            .filter(|t| t.waba_id == waba)
            .cloned()
            .collect()
    }

    /// Applies a record (or a tombstone) read from `wa.templates` or made
    /// here: the newer `updated_at_ms` wins; a tombstone removes. Returns
    /// whether it changed the entry.
    pub fn apply(&self, key: &str, value: Option<&[u8]>) -> bool {
        let Some(value) = value else {
            return self.templates.write().unwrap().remove(key).is_some();
        };
        let Some(t) = Template::from_record(value) else {
            tracing::warn!(
                key,
                "wa.templates: a record that is not a template; skipped"
            );
            return false;
        };
        self.insert(Arc::new(t))
    }

    /// Puts `t` in unless a newer entry of its key is there.
    pub fn insert(&self, t: Arc<Template>) -> bool {
        if t.listed_at_ms.is_some() {
            self.mark_listed(&t.waba_id);
        }
        self.add_waba(&t.waba_id);
        let key = t.key();
        let mut map = self.templates.write().unwrap();
        match map.get(&key) {
            Some(old) if old.updated_at_ms > t.updated_at_ms => false,
            _ => {
                map.insert(key, t);
                true
            }
        }
    }

    /// Removes `key` if its entry is older than `before_ms`.
    pub fn remove_older(&self, key: &str, before_ms: u64) -> bool {
        let mut map = self.templates.write().unwrap();
        if map.get(key).is_some_and(|t| t.updated_at_ms < before_ms) {
            map.remove(key);
            return true;
        }
        false
    }

    /// A send checked `key` at `now_ms`.
    pub fn note_use(&self, key: &str, now_ms: u64) {
        let mut used = self.used.lock().unwrap();
        match used.get_mut(key) {
            Some(t) => *t = now_ms,
            None => {
                used.insert(key.to_string(), now_ms);
            }
        }
    }

    /// Sets the gauges: templates by status, and templates used in the
    /// last hour whose status is not APPROVED now.
    pub fn publish_gauges(&self, now_ms: u64) {
        let mut by_status: HashMap<&'static str, u64> =
            STATUS_LABELS.iter().map(|s| (*s, 0)).collect();
        let map = self.templates.read().unwrap();
        for t in map.values() {
            *by_status.entry(status_label(&t.status)).or_default() += 1;
        }
        for (s, n) in by_status {
            metrics::gauge!(m::TEMPLATES, "status" => s).set(n as f64);
        }
        let mut used = self.used.lock().unwrap();
        used.retain(|_, at| now_ms.saturating_sub(*at) < IN_USE_MS);
        let bad = used
            .keys()
            .filter(|k| map.get(*k).is_some_and(|t| !t.is_approved()))
            .count();
        metrics::gauge!(m::TEMPLATES_USED_NOT_APPROVED).set(bad as f64);
    }

    /// How many entries there are.
    pub fn len(&self) -> usize {
        self.templates.read().unwrap().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The `status` label values of `wagate_templates` (Meta's statuses,
/// lowercase; anything new is `other`).
pub const STATUS_LABELS: &[&str] = &[
    "approved",
    "pending",
    "rejected",
    "paused",
    "disabled",
    "in_appeal",
    "pending_deletion",
    "deleted",
    "limit_exceeded",
    "archived",
    "locked",
    "other",
];

/// The label of a Meta status.
pub fn status_label(status: &str) -> &'static str {
    let lower = status.to_ascii_lowercase();
    STATUS_LABELS
        .iter()
        .find(|s| **s == lower)
        .copied()
        .unwrap_or("other")
}

/// Publishes the registry's counters and gauges at 0.
pub fn zero_metrics() {
    for s in STATUS_LABELS {
        metrics::gauge!(m::TEMPLATES, "status" => *s).set(0.0);
    }
    metrics::gauge!(m::TEMPLATES_USED_NOT_APPROVED).set(0.0);
    for r in TemplateBlock::REASONS {
        metrics::counter!(m::EGRESS_TEMPLATE_BLOCKED, "reason" => *r).absolute(0);
    }
    metrics::counter!(m::TEMPLATE_CORRECTED).absolute(0);
    for r in ["ok", "error"] {
        metrics::counter!(m::TEMPLATES_REFRESH, "result" => r).absolute(0);
    }
}

impl Registry {
    /// A registry knowing the WABAs the config names (`[egress.numbers."ID"] waba_id`).
    pub fn from_config(cfg: &crate::config::Config) -> Registry {
        Registry::new(
            cfg.egress
                .numbers
                .iter()
                .filter_map(|(n, c)| c.waba_id.as_deref().map(|w| (n.as_str(), w))),
        )
    }
}

/// The registry's background work, started by `app.rs`: the topic reader
/// (its own thread; sets `ready.templates` once caught up, stops with
/// `reader_stop`), the refresher and the gauges (tokio tasks, stop with
/// `stop`).
pub fn spawn(
    cfg: &crate::config::Config,
    topics: &crate::kafka::Topics,
    reg: Arc<Registry>,
    producer: crate::kafka::KafkaProducer,
    ready: Arc<crate::admin::Readiness>,
    reader_stop: tokio_util::sync::CancellationToken,
    stop: tokio_util::sync::CancellationToken,
) -> std::io::Result<Vec<tokio::task::JoinHandle<()>>> {
    zero_metrics();
    let topic = topics.name(crate::kafka::TopicId::Templates).to_string();
    let (tx, rx) = tokio::sync::watch::channel(false);
    {
        let (conn, topic, reg) = (cfg.kafka.connection.clone(), topic.clone(), reg.clone());
        std::thread::Builder::new()
            .name("templates-sync".into())
            .spawn(move || {
                let on_ready = Box::new(move || {
                    ready
                        .templates
                        .store(true, std::sync::atomic::Ordering::SeqCst);
                    let _ = tx.send(true);
                });
                if let Err(e) = sync::read(&conn, &topic, reg, on_ready, reader_stop) {
                    tracing::error!(error = %e, "templates reader stopped; /readyz stays 503");
                }
            })?;
    }
    let mut tokens = HashMap::new();
    for c in cfg.egress.numbers.values() {
        if let (Some(w), Some(t)) = (&c.waba_id, &c.access_token) {
            tokens.entry(w.clone()).or_insert_with(|| t.clone());
        }
    }
    let refresher = sync::Refresher {
        reg: reg.clone(),
        client: graph::TemplatesClient::new(&cfg.graph.base_url, cfg.egress.send_timeout),
        producer,
        topic,
        tokens,
        default_token: cfg.graph.access_token.clone(),
        period: cfg.templates.refresh,
    };
    let gauges = {
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tick.tick() => reg.publish_gauges(crate::clock::now_ms()),
                }
            }
        })
    };
    Ok(vec![tokio::spawn(refresher.run(rx, stop)), gauges])
}
