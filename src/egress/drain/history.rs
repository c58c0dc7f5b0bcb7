//! What already has a result or an attempt (read from the results and
//! attempts topics at every assignment), so nothing is sent twice.

use super::*;

/// History read at start: what already has a result, what was attempted.
#[derive(Default)]
pub(super) struct History {
    pub(super) completed: HashSet<RequestKey>,
    pub(super) attempted: HashSet<RequestKey>,
    /// Tier-counted sends: (phone_number_id, to, completed_at_ms).
    pub(super) tier: Vec<(String, String, u64)>,
}

/// A request as the history knows it: its id and how often it was
/// redriven (a redriven request is a new send with a result of its own).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(super) struct RequestKey {
    pub(super) request_id: String,
    pub(super) redrive: u32,
}

impl RequestKey {
    pub(super) fn new(request_id: &str, redrive: u32) -> RequestKey {
        RequestKey {
            request_id: request_id.to_string(),
            redrive,
        }
    }
}

impl Egress {
    /// Reads recent results and attempts so that nothing completed is sent
    /// again and nothing that may have reached Meta is re-sent blindly.
    pub(super) async fn load_history(&self) {
        let since = now_ms().saturating_sub(self.cfg.history_window.as_millis() as u64);
        let conn = self.connection.clone();
        let (results, attempts) = (
            self.topics.name(TopicId::OutboundResults).to_string(),
            self.topics.name(TopicId::OutboundAttempts).to_string(),
        );
        let tiers = !self.tiers.is_empty();
        let got = tokio::task::spawn_blocking(move || {
            let mut h = History::default();
            let mut read = |topic: &str, results: bool| {
                kafka::read_since(&conn, topic, since, |_key, payload| {
                    if let Ok(v) = serde_json::from_slice::<serde_json::Value>(payload) {
                        if let Some(id) = v.get("request_id").and_then(|x| x.as_str()) {
                            let redrive =
                                v.get("redrive").and_then(|x| x.as_u64()).unwrap_or(0) as u32;
                            let set = if results {
                                &mut h.completed
                            } else {
                                &mut h.attempted
                            };
                            set.insert(RequestKey::new(id, redrive));
                        }
                        if results && tiers && v["tier_counted"] == true {
                            let s = |k: &str| v[k].as_str().unwrap_or("").to_string();
                            let at = v["completed_at_ms"].as_u64().unwrap_or(0);
                            // The person as the lane counted them: the
                            // phone's digits, else the BSUID.
                            let to: String = s("to").chars().filter(char::is_ascii_digit).collect();
                            let user = if to.is_empty() { s("recipient") } else { to };
                            h.tier.push((s("phone_number_id"), user, at));
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
}
