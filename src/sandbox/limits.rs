//! The sandbox's rate limits (CLOUD_API.md §6.1, §6.2).
//!
//! * Throughput per phone number: a sliding log of accepted arrival times,
//!   so that no one-second window ever holds more than the quota (strict
//!   enough to be checked from the recorded arrival times).
//! * Pair rate per (number, recipient): GCRA with emission interval `per`
//!   and a burst, one theoretical-arrival time per pair.
//!
//! Both are check-then-commit: a send rejected by a later check does not
//! use up quota. Tables are bounded: expired entries are pruned (at most
//! once a second) when a table is full, and a key that still does not fit
//! is not limited.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

const WINDOW: Duration = Duration::from_secs(1);
/// Phone numbers tracked for throughput.
pub const MAX_NUMBERS: usize = 10_000;
/// (number, recipient) pairs tracked for the pair rate.
pub const MAX_PAIRS: usize = 200_000;
const PRUNE_EVERY: Duration = Duration::from_secs(1);

/// At most `quota` accepted sends per number in any one-second window.
#[derive(Debug, Default)]
pub struct Throughput {
    logs: HashMap<String, VecDeque<Instant>>,
    last_prune: Option<Instant>,
}

/// What a throughput check found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Room {
    Yes,
    No,
    /// The table is full of active numbers: not limited, not recorded.
    Untracked,
}

impl Throughput {
    /// Whether a send for `number` at `now` keeps every window within
    /// `quota`. `now` must not go backwards between calls.
    pub fn has_room(&mut self, number: &str, quota: u32, now: Instant) -> Room {
        if let Some(log) = self.logs.get_mut(number) {
            while log
                .front()
                .is_some_and(|t| now.saturating_duration_since(*t) >= WINDOW)
            {
                log.pop_front();
            }
            return if log.len() < quota as usize {
                Room::Yes
            } else {
                Room::No
            };
        }
        if self.logs.len() >= MAX_NUMBERS {
            self.prune(now);
            if self.logs.len() >= MAX_NUMBERS {
                return Room::Untracked;
            }
        }
        if quota == 0 {
            Room::No
        } else {
            Room::Yes
        }
    }

    /// Records an accepted send (after `has_room` said `Yes`).
    pub fn commit(&mut self, number: &str, quota: u32, now: Instant) {
        let log = self
            .logs
            .entry(number.to_string())
            .or_insert_with(|| VecDeque::with_capacity((quota as usize).min(1024)));
        log.push_back(now);
        // Never longer than the quota, whatever the caller did.
        while log.len() > quota as usize {
            log.pop_front();
        }
    }

    fn prune(&mut self, now: Instant) {
        if self
            .last_prune
            .is_some_and(|t| now.saturating_duration_since(t) < PRUNE_EVERY)
        {
            return;
        }
        self.last_prune = Some(now);
        self.logs.retain(|_, log| {
            log.back()
                .is_some_and(|t| now.saturating_duration_since(*t) < WINDOW)
        });
    }
}

/// GCRA per (number, recipient): one send per `per`, bursts up to `burst`.
#[derive(Debug)]
pub struct PairGcra {
    per: Duration,
    /// `per × (burst − 1)`: how far ahead of `now` the TAT may run.
    tolerance: Duration,
    /// Theoretical arrival time per `number:wa_id`.
    tat: HashMap<String, Instant>,
    last_prune: Option<Instant>,
}

/// A pair-rate decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PairDecision {
    /// Allowed; commit with this new theoretical arrival time.
    Allow(Instant),
    Deny,
    /// The table is full of active pairs: not limited, not recorded.
    Untracked,
}

impl PairGcra {
    pub fn new(per: Duration, burst: u32) -> PairGcra {
        PairGcra {
            per,
            tolerance: per.saturating_mul(burst.max(1) - 1),
            tat: HashMap::new(),
            last_prune: None,
        }
    }

    pub fn check(&mut self, number: &str, wa_id: &str, now: Instant) -> PairDecision {
        let tat = match self.tat.get(&pair_key(number, wa_id)).copied() {
            Some(t) => t.max(now),
            None => {
                if self.tat.len() >= MAX_PAIRS {
                    self.prune(now);
                    if self.tat.len() >= MAX_PAIRS {
                        return PairDecision::Untracked;
                    }
                }
                now
            }
        };
        // Allowed while the TAT is at most `tolerance` ahead of now.
        if tat.saturating_duration_since(now) > self.tolerance {
            PairDecision::Deny
        } else {
            PairDecision::Allow(tat + self.per)
        }
    }

    pub fn commit(&mut self, number: &str, wa_id: &str, new_tat: Instant) {
        self.tat.insert(pair_key(number, wa_id), new_tat);
    }

    fn prune(&mut self, now: Instant) {
        if self
            .last_prune
            .is_some_and(|t| now.saturating_duration_since(t) < PRUNE_EVERY)
        {
            return;
        }
        self.last_prune = Some(now);
        // A TAT in the past is the same as no entry.
        self.tat.retain(|_, tat| *tat > now);
    }
}

fn pair_key(number: &str, wa_id: &str) -> String {
    format!("{number}:{wa_id}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn throughput_is_a_strict_sliding_window() {
        let mut t = Throughput::default();
        let t0 = Instant::now();
        for i in 0..5 {
            let now = t0 + Duration::from_millis(i * 10);
            assert_eq!(t.has_room("n", 5, now), Room::Yes);
            t.commit("n", 5, now);
        }
        assert_eq!(
            t.has_room("n", 5, t0 + Duration::from_millis(999)),
            Room::No
        );
        // The first entry leaves the window exactly one second after it arrived.
        assert_eq!(t.has_room("n", 5, t0 + Duration::from_secs(1)), Room::Yes);
        assert_eq!(t.has_room("other", 5, t0), Room::Yes);
        assert_eq!(t.has_room("zero", 0, t0), Room::No);
    }

    #[test]
    fn gcra_allows_the_burst_then_one_per_period() {
        let mut g = PairGcra::new(Duration::from_secs(6), 3);
        let t0 = Instant::now();
        for _ in 0..3 {
            match g.check("n", "u", t0) {
                PairDecision::Allow(tat) => g.commit("n", "u", tat),
                d => panic!("{d:?}"),
            }
        }
        assert_eq!(g.check("n", "u", t0), PairDecision::Deny);
        assert!(matches!(g.check("n", "v", t0), PairDecision::Allow(_)));
        assert_eq!(
            g.check("n", "u", t0 + Duration::from_secs(5)),
            PairDecision::Deny
        );
        assert!(matches!(
            g.check("n", "u", t0 + Duration::from_secs(6)),
            PairDecision::Allow(_)
        ));
    }
}
