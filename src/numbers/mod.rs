//! What wagate learns about each business number (DESIGN §14): its WABA,
//! Meta's throughput level, quality rating, messaging limit, name and
//! registration status, and any restriction — kept on the compacted topic
//! `wa.numbers` (key phone_number_id, value a [`NumberState`]) so every
//! instance and the CLI share it.
//!
//! Sources, and which wins:
//! - the config: `[egress.numbers."ID"] throughput` and `waba_id`, and a
//!   portfolio's `limit`, always win over anything Meta says;
//! - the Graph API (`GET /{phone_number_id}?fields=…`, at start and every
//!   `[numbers] refresh_secs`) and the webhooks (`phone_number_quality_update`,
//!   `account_update`, read from `wa.inbound.events`): the newer wins, by
//!   the time wagate received it (`updated_at_ms`); a Graph read replaces
//!   only the fields it returns, so a restriction learnt from a webhook
//!   stays until a webhook lifts it or its `expiration` passes.
//!
//! Effects (applied by egress, see `egress::drain`): a number's throughput
//! is `egress.default_throughput` at `STANDARD` and `numbers.high_throughput`
//! at `HIGH`; a portfolio whose config sets no `limit` follows its numbers'
//! messaging limit; a restricted number holds its lane (`blocked:
//! number_restricted` after `egress.circuit_hold_max_ms`).

pub mod graph;
pub mod sync;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::RwLock;

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// The fields wagate asks the Graph API for (CLOUD_API §6.1, §6.3;
/// `messaging_limit_tier` is the deprecated name of the limit).
pub const GRAPH_FIELDS: &str = "display_phone_number,verified_name,throughput,quality_rating,whatsapp_business_manager_messaging_limit,messaging_limit_tier,name_status,status,code_verification_status";

/// Graph `status` values under which a number cannot send.
const HOLDING_STATUSES: &[&str] = &["BANNED", "RESTRICTED", "DISABLED", "DELETED"];

/// A restriction Meta announced by `account_update`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Restriction {
    /// `ACCOUNT_RESTRICTION`, `DISABLED_UPDATE`.
    pub event: String,
    /// `restriction_info[].restriction_type`, e.g.
    /// `RESTRICTED_BIZ_INITIATED_MESSAGING`.
    #[serde(default)]
    pub types: Vec<String>,
    /// The latest `expiration` (Unix ms); none: until lifted.
    #[serde(default)]
    pub until_ms: Option<u64>,
    pub since_ms: u64,
}

/// One `wa.numbers` value.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct NumberState {
    pub v: u8,
    pub phone_number_id: String,
    #[serde(default)]
    pub waba_id: Option<String>,
    #[serde(default)]
    pub display_phone_number: Option<String>,
    /// Graph `throughput.level`: `STANDARD`, `HIGH` (after `THROUGHPUT_UPGRADE`).
    #[serde(default)]
    pub throughput_level: Option<String>,
    /// `GREEN`, `YELLOW`, `RED`, `UNKNOWN`.
    #[serde(default)]
    pub quality_rating: Option<String>,
    /// `TIER_250`, `TIER_2K`, …, `TIER_UNLIMITED`.
    #[serde(default)]
    pub messaging_limit: Option<String>,
    /// `APPROVED`, `PENDING_REVIEW`, `DECLINED`, …
    #[serde(default)]
    pub name_status: Option<String>,
    /// Graph `status` (registration): `CONNECTED`, `PENDING`, `BANNED`, …
    #[serde(default)]
    pub status: Option<String>,
    #[serde(default)]
    pub restriction: Option<Restriction>,
    /// The last webhook event applied (`THROUGHPUT_UPGRADE`, `ACCOUNT_RESTRICTION`, …).
    #[serde(default)]
    pub last_event: Option<String>,
    /// `graph` or `webhook`: what made this version.
    #[serde(default)]
    pub source: String,
    /// When wagate received the latest webhook applied: an older webhook
    /// (a late or replayed one) changes nothing. Graph reads do not move it.
    #[serde(default)]
    pub webhook_at_ms: u64,
    /// The version: later records replace earlier ones.
    pub updated_at_ms: u64,
}

impl NumberState {
    fn new(id: &str) -> NumberState {
        NumberState {
            v: 1,
            phone_number_id: id.to_string(),
            ..NumberState::default()
        }
    }

    /// Why the number cannot send now, if it cannot.
    pub fn held(&self, now_ms: u64) -> Option<String> {
        if let Some(r) = &self.restriction {
            if r.until_ms.is_none_or(|u| now_ms < u) {
                let types = if r.types.is_empty() {
                    String::new()
                } else {
                    format!(" ({})", r.types.join(", "))
                };
                let until = r
                    .until_ms
                    .map(|u| format!(" until {u} (Unix ms)"))
                    .unwrap_or_default();
                return Some(format!("Meta's {}{types}{until}", r.event));
            }
        }
        let status = self.status.as_deref()?;
        HOLDING_STATUSES
            .contains(&status)
            .then(|| format!("the Graph API reports the number's status {status}"))
    }

    /// The same state, ignoring when and by what it was made.
    fn same_facts(&self, other: &NumberState) -> bool {
        let strip = |s: &NumberState| NumberState {
            source: String::new(),
            webhook_at_ms: 0,
            updated_at_ms: 0,
            ..s.clone()
        };
        strip(self) == strip(other)
    }
}

/// A messaging limit as a number of users (`None`: unknown).
pub fn tier_users(limit: &str) -> Option<usize> {
    Some(match limit {
        "TIER_50" => 50,
        "TIER_250" => 250,
        "TIER_1K" => 1_000,
        "TIER_2K" => 2_000,
        "TIER_10K" => 10_000,
        "TIER_100K" => 100_000,
        "TIER_UNLIMITED" => usize::MAX,
        _ => return None,
    })
}

fn str_of(v: &Value, k: &str) -> Option<String> {
    v.get(k).and_then(Value::as_str).map(str::to_string)
}

fn digits(s: &str) -> String {
    s.chars().filter(char::is_ascii_digit).collect()
}

/// Every number's state, in memory, fed by `wa.numbers`, the Graph API and
/// the webhooks; egress reads it. [`Numbers::generation`] changes with
/// every change, so readers can tell cheaply when to look again.
#[derive(Debug, Default)]
pub struct Numbers {
    states: RwLock<HashMap<String, NumberState>>,
    generation: AtomicU64,
    /// `[egress.numbers."ID"] waba_id`.
    config_waba: HashMap<String, String>,
    /// `wa.numbers` was read up to its end once.
    caught_up: std::sync::atomic::AtomicBool,
    /// Numbers egress sends for that the Graph poller should read too.
    wanted: std::sync::Mutex<std::collections::BTreeSet<String>>,
    /// Wakes the Graph poller when a number is first wanted.
    pub(crate) wake: tokio::sync::Notify,
}

impl Numbers {
    pub fn new(cfg: &crate::config::Config) -> Numbers {
        Numbers {
            config_waba: cfg
                .egress
                .numbers
                .iter()
                .filter_map(|(id, n)| Some((id.clone(), n.waba_id.clone()?)))
                .collect(),
            ..Numbers::default()
        }
    }

    /// Egress sends for `id`: read its fields from the Graph API soon if
    /// nothing is known of it (and at every refresh after).
    pub fn want(&self, id: &str) {
        let new = self.wanted.lock().unwrap().insert(id.to_string());
        if new && self.get(id).is_none() {
            self.wake.notify_one();
        }
    }

    /// Numbers egress sends for.
    pub fn wanted(&self) -> Vec<String> {
        self.wanted.lock().unwrap().iter().cloned().collect()
    }

    pub fn is_caught_up(&self) -> bool {
        self.caught_up.load(Ordering::SeqCst)
    }

    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    pub fn get(&self, id: &str) -> Option<NumberState> {
        self.states.read().unwrap().get(id).cloned()
    }

    pub fn all(&self) -> Vec<NumberState> {
        let mut v: Vec<NumberState> = self.states.read().unwrap().values().cloned().collect();
        v.sort_by(|a, b| a.phone_number_id.cmp(&b.phone_number_id));
        v
    }

    /// The number's WABA: the config's, else the learnt one.
    pub fn waba_of(&self, id: &str) -> Option<String> {
        self.config_waba
            .get(id)
            .cloned()
            .or_else(|| self.get(id)?.waba_id)
    }

    /// Why the number cannot send now, if it cannot.
    pub fn held(&self, id: &str, now_ms: u64) -> Option<String> {
        self.states.read().unwrap().get(id)?.held(now_ms)
    }

    /// The number's messages/s: the config's, else from Meta's level.
    pub fn rate(&self, id: &str, egress: &crate::config::EgressConfig, high: u32) -> u32 {
        if let Some(r) = egress.numbers.get(id).and_then(|n| n.throughput) {
            return r;
        }
        match self.get(id).and_then(|s| s.throughput_level).as_deref() {
            Some("HIGH") => high,
            _ => egress.default_throughput,
        }
    }

    /// The largest messaging limit Meta reports for any of `numbers`
    /// (the limit is the portfolio's; its numbers agree, or some lag).
    pub fn messaging_limit(&self, numbers: &[String]) -> Option<usize> {
        let states = self.states.read().unwrap();
        numbers
            .iter()
            .filter_map(|n| tier_users(states.get(n)?.messaging_limit.as_deref()?))
            .max()
    }

    fn bump(&self) {
        self.generation.fetch_add(1, Ordering::AcqRel);
    }

    /// A `wa.numbers` record (`None`: tombstone): taken when it is not older
    /// than what is known.
    pub fn apply_record(&self, key: &str, value: Option<&[u8]>) {
        let mut states = self.states.write().unwrap();
        let Some(v) = value else {
            if states.remove(key).is_some() {
                self.bump();
            }
            return;
        };
        let Ok(rec) = serde_json::from_slice::<NumberState>(v) else {
            return;
        };
        if rec.phone_number_id != key {
            return;
        }
        let newer = states
            .get(key)
            .is_none_or(|s| rec.updated_at_ms >= s.updated_at_ms && !s.same_facts(&rec));
        if newer {
            states.insert(key.to_string(), rec);
            self.bump();
        }
    }

    /// Stores `next` if it says something new; returns it to be written to
    /// `wa.numbers` then.
    fn store(
        &self,
        states: &mut HashMap<String, NumberState>,
        next: NumberState,
    ) -> Option<NumberState> {
        if states
            .get(&next.phone_number_id)
            .is_some_and(|s| s.same_facts(&next))
        {
            return None;
        }
        states.insert(next.phone_number_id.clone(), next.clone());
        self.bump();
        Some(next)
    }

    /// A Graph API answer for number `id`, read at `now_ms`.
    pub fn apply_graph(&self, id: &str, v: &Value, now_ms: u64) -> Option<NumberState> {
        let mut states = self.states.write().unwrap();
        let mut s = states
            .get(id)
            .cloned()
            .unwrap_or_else(|| NumberState::new(id));
        if let Some(w) = self.config_waba.get(id) {
            s.waba_id = Some(w.clone());
        }
        if let Some(d) = str_of(v, "display_phone_number") {
            s.display_phone_number = Some(digits(&d));
        }
        if let Some(l) = v
            .get("throughput")
            .and_then(|t| t.get("level"))
            .and_then(Value::as_str)
        {
            s.throughput_level = Some(l.to_string());
        }
        if let Some(q) = str_of(v, "quality_rating") {
            s.quality_rating = Some(q);
        }
        let limit = v
            .get("whatsapp_business_manager_messaging_limit")
            .and_then(|l| {
                l.as_str()
                    .map(str::to_string)
                    .or_else(|| str_of(l, "current_limit"))
            })
            .or_else(|| str_of(v, "messaging_limit_tier"));
        if let Some(l) = limit {
            s.messaging_limit = Some(l);
        }
        if let Some(n) = str_of(v, "name_status") {
            s.name_status = Some(n);
        }
        if let Some(st) = str_of(v, "status") {
            s.status = Some(st);
        }
        s.source = "graph".into();
        s.updated_at_ms = now_ms.max(s.updated_at_ms + 1);
        self.store(&mut states, s)
    }

    /// A `wa.inbound.events` record: the changes it makes (to write to
    /// `wa.numbers`).
    pub fn apply_event(&self, rec: &Value) -> Vec<NumberState> {
        let kind = rec.get("kind").and_then(Value::as_str).unwrap_or("");
        let waba = str_of(rec, "waba_id").filter(|w| !w.is_empty());
        let at = rec
            .get("received_at_ms")
            .and_then(Value::as_u64)
            .unwrap_or(0);
        let value = rec.get("value").cloned().unwrap_or(Value::Null);
        let named = str_of(rec, "phone_number_id").filter(|p| !p.is_empty());
        let mut out = Vec::new();
        let mut states = self.states.write().unwrap();
        match kind {
            "phone_number_quality_update" => {
                let display = str_of(&value, "display_phone_number").map(|d| digits(&d));
                let id = named.or_else(|| self.find(&states, display.as_deref(), waba.as_deref()));
                let Some(id) = id else {
                    tracing::info!(
                        kind,
                        "a quality update names a number wagate does not know yet (its display number is learnt from the Graph API)"
                    );
                    return out;
                };
                let mut s = states
                    .get(&id)
                    .cloned()
                    .unwrap_or_else(|| NumberState::new(&id));
                if at < s.webhook_at_ms {
                    return out;
                }
                let event = str_of(&value, "event");
                if event.as_deref() == Some("THROUGHPUT_UPGRADE") {
                    s.throughput_level = Some("HIGH".into());
                }
                let limit = str_of(&value, "max_daily_conversations_per_business")
                    .or_else(|| str_of(&value, "current_limit"));
                if let Some(l) = limit {
                    s.messaging_limit = Some(l);
                }
                if s.display_phone_number.is_none() {
                    s.display_phone_number = display;
                }
                if s.waba_id.is_none() {
                    s.waba_id = waba;
                }
                s.last_event = event;
                s.source = "webhook".into();
                s.webhook_at_ms = at;
                s.updated_at_ms = at.max(s.updated_at_ms + 1);
                out.extend(self.store(&mut states, s));
            }
            "account_update" => {
                let Some(waba) = waba else { return out };
                let event = str_of(&value, "event").unwrap_or_default();
                let change: Option<Option<Restriction>> = match event.as_str() {
                    "ACCOUNT_RESTRICTION" => {
                        let info = value
                            .get("restriction_info")
                            .and_then(Value::as_array)
                            .cloned()
                            .unwrap_or_default();
                        if info.is_empty() {
                            Some(None)
                        } else {
                            Some(Some(Restriction {
                                event: event.clone(),
                                types: info
                                    .iter()
                                    .filter_map(|i| str_of(i, "restriction_type"))
                                    .collect(),
                                until_ms: info
                                    .iter()
                                    .filter_map(|i| i.get("expiration").and_then(Value::as_u64))
                                    .max()
                                    .map(|s| s.saturating_mul(1000)),
                                since_ms: at,
                            }))
                        }
                    }
                    "DISABLED_UPDATE" => {
                        let state = value
                            .get("ban_info")
                            .and_then(|b| str_of(b, "waba_ban_state"))
                            .unwrap_or_default();
                        match state.as_str() {
                            "DISABLE" => Some(Some(Restriction {
                                event: event.clone(),
                                types: vec![state],
                                until_ms: None,
                                since_ms: at,
                            })),
                            "REINSTATE" => Some(None),
                            _ => None,
                        }
                    }
                    "ACCOUNT_RECONNECTED" => Some(None),
                    _ => None,
                };
                let ids: Vec<String> = states
                    .values()
                    .filter(|s| {
                        self.config_waba
                            .get(&s.phone_number_id)
                            .or(s.waba_id.as_ref())
                            == Some(&waba)
                    })
                    .map(|s| s.phone_number_id.clone())
                    .chain(
                        self.config_waba
                            .iter()
                            .filter(|(_, w)| **w == waba)
                            .map(|(id, _)| id.clone()),
                    )
                    .collect::<std::collections::BTreeSet<_>>()
                    .into_iter()
                    .collect();
                for id in ids {
                    let mut s = states
                        .get(&id)
                        .cloned()
                        .unwrap_or_else(|| NumberState::new(&id));
                    if at < s.webhook_at_ms {
                        continue;
                    }
                    if let Some(r) = &change {
                        s.restriction = r.clone();
                    }
                    s.waba_id = Some(waba.clone());
                    s.last_event = Some(event.clone());
                    s.source = "webhook".into();
                    s.webhook_at_ms = at;
                    s.updated_at_ms = at.max(s.updated_at_ms + 1);
                    out.extend(self.store(&mut states, s));
                }
            }
            "business_capability_update" => {
                // The portfolio's messaging limit changed (CLOUD_API §4.5):
                // every known number of the WABA takes it.
                let (Some(waba), Some(limit)) =
                    (waba, str_of(&value, "max_daily_conversations_per_business"))
                else {
                    return out;
                };
                let ids: Vec<String> = states
                    .values()
                    .filter(|s| {
                        self.config_waba
                            .get(&s.phone_number_id)
                            .or(s.waba_id.as_ref())
                            == Some(&waba)
                    })
                    .map(|s| s.phone_number_id.clone())
                    .collect();
                for id in ids {
                    let mut s = states[&id].clone();
                    if at < s.webhook_at_ms {
                        continue;
                    }
                    s.messaging_limit = Some(limit.clone());
                    s.last_event = Some(kind.to_string());
                    s.source = "webhook".into();
                    s.webhook_at_ms = at;
                    s.updated_at_ms = at.max(s.updated_at_ms + 1);
                    out.extend(self.store(&mut states, s));
                }
            }
            _ => {
                // Any other event naming a number teaches its WABA.
                if let (Some(id), Some(waba)) = (named, waba) {
                    if let Some(s) = states.get(&id).filter(|s| s.waba_id.is_none()) {
                        let mut s = s.clone();
                        s.waba_id = Some(waba);
                        s.updated_at_ms = s.updated_at_ms.max(at);
                        out.extend(self.store(&mut states, s));
                    }
                }
            }
        }
        out
    }

    /// The number a quality update means: by its display number, else the
    /// only number known of its WABA.
    fn find(
        &self,
        states: &HashMap<String, NumberState>,
        display: Option<&str>,
        waba: Option<&str>,
    ) -> Option<String> {
        if let Some(d) = display {
            if let Some(s) = states
                .values()
                .find(|s| s.display_phone_number.as_deref() == Some(d))
            {
                return Some(s.phone_number_id.clone());
            }
        }
        let waba = waba?;
        let mut of_waba = states
            .values()
            .filter(|s| s.waba_id.as_deref() == Some(waba))
            .map(|s| s.phone_number_id.clone());
        let first = of_waba.next()?;
        of_waba.next().is_none().then_some(first)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn numbers() -> Numbers {
        let mut n = Numbers::default();
        n.config_waba.insert("111".into(), "900".into());
        n
    }

    #[test]
    fn graph_then_upgrade_webhook_then_restriction_and_lift() {
        let n = numbers();
        let g = json!({"display_phone_number":"+1 555 0199999","throughput":{"level":"STANDARD"},
            "quality_rating":"GREEN","whatsapp_business_manager_messaging_limit":"TIER_2K",
            "name_status":"APPROVED","status":"CONNECTED"});
        let s = n.apply_graph("111", &g, 1000).expect("new");
        assert_eq!(s.display_phone_number.as_deref(), Some("15550199999"));
        assert_eq!(s.waba_id.as_deref(), Some("900"));
        assert!(n.apply_graph("111", &g, 2000).is_none(), "nothing new");
        assert_eq!(n.messaging_limit(&["111".into()]), Some(2000));
        let up = json!({"kind":"phone_number_quality_update","waba_id":"900","received_at_ms":3000,
            "value":{"display_phone_number":"15550199999","event":"THROUGHPUT_UPGRADE",
            "max_daily_conversations_per_business":"TIER_UNLIMITED"}});
        let ch = n.apply_event(&up);
        assert_eq!(ch.len(), 1);
        assert_eq!(ch[0].throughput_level.as_deref(), Some("HIGH"));
        assert_eq!(n.messaging_limit(&["111".into()]), Some(usize::MAX));
        let restrict = json!({"kind":"account_update","waba_id":"900","received_at_ms":4000,
            "value":{"event":"ACCOUNT_RESTRICTION","restriction_info":[
                {"restriction_type":"RESTRICTED_BIZ_INITIATED_MESSAGING","expiration":10}]}});
        assert_eq!(n.apply_event(&restrict).len(), 1);
        assert!(n.held("111", 5000).is_some());
        assert!(n.held("111", 10_000).is_none(), "expired");
        // An old event (a replay) changes nothing.
        let old = json!({"kind":"account_update","waba_id":"900","received_at_ms":10,
            "value":{"event":"ACCOUNT_RESTRICTION","restriction_info":[]}});
        assert!(n.apply_event(&old).is_empty());
        let lift = json!({"kind":"account_update","waba_id":"900","received_at_ms":5000,
            "value":{"event":"ACCOUNT_RESTRICTION","restriction_info":[]}});
        assert_eq!(n.apply_event(&lift).len(), 1);
        assert!(n.held("111", 5000).is_none());
        let cap = json!({"kind":"business_capability_update","waba_id":"900","received_at_ms":5500,
            "value":{"max_daily_conversations_per_business":"TIER_10K"}});
        assert_eq!(n.apply_event(&cap).len(), 1);
        assert_eq!(n.messaging_limit(&["111".into()]), Some(10_000));
        // A Graph read keeps the level Meta reports (and no restriction).
        let g2 = json!({"throughput":{"level":"HIGH"},"status":"BANNED"});
        n.apply_graph("111", &g2, 6000).unwrap();
        assert!(n.held("111", 6000).unwrap().contains("BANNED"));
    }

    #[test]
    fn records_apply_newest_first_and_tombstones_erase() {
        let n = Numbers::default();
        let mut s = NumberState::new("5");
        s.throughput_level = Some("HIGH".into());
        s.updated_at_ms = 10;
        n.apply_record("5", Some(&serde_json::to_vec(&s).unwrap()));
        let mut older = s.clone();
        older.throughput_level = Some("STANDARD".into());
        older.updated_at_ms = 5;
        n.apply_record("5", Some(&serde_json::to_vec(&older).unwrap()));
        assert_eq!(
            n.get("5").unwrap().throughput_level.as_deref(),
            Some("HIGH")
        );
        n.apply_record("6", Some(&serde_json::to_vec(&s).unwrap()));
        assert!(n.get("6").is_none(), "key and id differ: not ours");
        n.apply_record("5", Some(b"not json"));
        n.apply_record("5", None);
        assert!(n.get("5").is_none());
    }

    #[test]
    fn an_unknown_display_number_of_a_single_number_waba_is_that_number() {
        let n = Numbers::default();
        n.apply_graph("7", &json!({"status":"CONNECTED"}), 1);
        let mut s = n.get("7").unwrap();
        s.waba_id = Some("42".into());
        s.updated_at_ms = 2;
        n.apply_record("7", Some(&serde_json::to_vec(&s).unwrap()));
        let up = json!({"kind":"phone_number_quality_update","waba_id":"42","received_at_ms":3,
            "value":{"display_phone_number":"1555","event":"THROUGHPUT_UPGRADE"}});
        assert_eq!(n.apply_event(&up).len(), 1);
        assert_eq!(
            n.get("7").unwrap().throughput_level.as_deref(),
            Some("HIGH")
        );
    }
}
