//! Meta's limits as seen by one gateway: throughput per business number,
//! the pair rate per (number, user), with governor's GCRA.
//!
//! Throughput limiters have burst 1, so sends are spaced by 1/rate and no
//! one-second window ever holds more than `rate` sends. The pair limiter is
//! one keyed governor limiter (all pairs share Meta's quota: one per 6 s,
//! burst 45) whose memory is bounded by `retain_recent`.

use std::hash::{Hash, Hasher};
use std::num::NonZeroU32;
use std::time::Duration;

use governor::clock::{Clock, DefaultClock, QuantaInstant};
use governor::middleware::NoOpMiddleware;
use governor::state::keyed::DefaultKeyedStateStore;
use governor::state::{InMemoryState, NotKeyed};
use governor::{Quota, RateLimiter};

/// A per-number throughput limiter whose rate can be cut and restored
/// (adaptive backoff on 130429).
pub struct Throughput {
    configured: u32,
    current: u32,
    limiter: RateLimiter<NotKeyed, InMemoryState, DefaultClock, NoOpMiddleware<QuantaInstant>>,
}

fn quota_per_second(rate: u32) -> Quota {
    let rate = NonZeroU32::new(rate.max(1)).expect("max(1) is non-zero");
    Quota::with_period(Duration::from_secs(1) / rate.get())
        .expect("period is non-zero")
        .allow_burst(NonZeroU32::MIN)
}

impl Throughput {
    pub fn new(rate: u32) -> Throughput {
        Throughput {
            configured: rate.max(1),
            current: rate.max(1),
            limiter: RateLimiter::direct(quota_per_second(rate)),
        }
    }

    /// The rate in force now.
    pub fn rate(&self) -> u32 {
        self.current
    }

    /// The configured rate.
    pub fn configured(&self) -> u32 {
        self.configured
    }

    /// `Ok` to send now, else how long to wait.
    pub fn check(&self) -> Result<(), Duration> {
        self.limiter
            .check()
            .map_err(|nu| nu.wait_time_from(DefaultClock::default().now()))
    }

    /// Cuts the rate (130429): halves it, not below 1/s.
    pub fn cut(&mut self) {
        let next = (self.current / 2).max(1);
        self.set(next);
    }

    /// Restores a quarter of the lost rate (called periodically while healthy).
    pub fn recover(&mut self) {
        if self.current < self.configured {
            let step = ((self.configured - self.current) / 4).max(1);
            self.set((self.current + step).min(self.configured));
        }
    }

    fn set(&mut self, rate: u32) {
        if rate != self.current {
            self.current = rate;
            self.limiter = RateLimiter::direct(quota_per_second(rate));
        }
    }
}

/// A compact pair key: hashes of the number id and the user's digits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PairKey(pub u64);

impl PairKey {
    pub fn new(phone_number_id: &str, to_digits: &str) -> PairKey {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        phone_number_id.hash(&mut h);
        to_digits.hash(&mut h);
        PairKey(h.finish())
    }
}

/// Meta's pair rate: one message per `period` with a burst, per pair.
pub struct PairRate {
    limiter: RateLimiter<
        PairKey,
        DefaultKeyedStateStore<PairKey>,
        DefaultClock,
        NoOpMiddleware<QuantaInstant>,
    >,
}

impl PairRate {
    pub fn new(period: Duration, burst: u32) -> PairRate {
        let q = Quota::with_period(period)
            .expect("period is non-zero")
            .allow_burst(NonZeroU32::new(burst.max(1)).expect("max(1)"));
        PairRate {
            limiter: RateLimiter::keyed(q),
        }
    }

    /// Meta's: one per 6 s, burst 45.
    pub fn meta() -> PairRate {
        PairRate::new(Duration::from_secs(6), 45)
    }

    pub fn check(&self, key: PairKey) -> Result<(), Duration> {
        self.limiter
            .check_key(&key)
            .map_err(|nu| nu.wait_time_from(DefaultClock::default().now()))
    }

    /// Drops pairs whose state is back to full burst (bounded memory).
    pub fn retain_recent(&self) {
        self.limiter.retain_recent();
    }

    pub fn len(&self) -> usize {
        self.limiter.len()
    }

    pub fn is_empty(&self) -> bool {
        self.limiter.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn throughput_spaces_sends() {
        let t = Throughput::new(10);
        assert!(t.check().is_ok());
        let wait = t.check().unwrap_err();
        assert!(
            wait <= Duration::from_millis(100) && wait > Duration::from_millis(50),
            "{wait:?}"
        );
    }

    #[test]
    fn cut_and_recover() {
        let mut t = Throughput::new(80);
        t.cut();
        assert_eq!(t.rate(), 40);
        t.cut();
        t.cut();
        assert_eq!(t.rate(), 10);
        for _ in 0..100 {
            t.recover();
        }
        assert_eq!(t.rate(), 80);
        let mut one = Throughput::new(1);
        one.cut();
        assert_eq!(one.rate(), 1);
    }

    #[test]
    fn pair_burst_then_wait() {
        let p = PairRate::new(Duration::from_secs(6), 3);
        let k = PairKey::new("1", "5511");
        for _ in 0..3 {
            assert!(p.check(k).is_ok());
        }
        let wait = p.check(k).unwrap_err();
        assert!(
            wait > Duration::from_secs(5) && wait <= Duration::from_secs(6),
            "{wait:?}"
        );
        // Another user of the same number is unaffected.
        assert!(p.check(PairKey::new("1", "5512")).is_ok());
    }
}
