//! Meta's limits as seen by one gateway: throughput per business number,
//! the pair rate per (number, user), with governor's GCRA.
//!
//! Throughput limiters are a GCRA (spacing 1/rate, a small burst so a late
//! send can catch up instead of losing its slot) combined with a log of the
//! last `rate` sends, which is the hard rule: a send may start only one
//! second after the send `rate` places before it reached Meta. When it
//! reached Meta is bounded by when it completed (strict, the default: no
//! one-second window at Meta ever holds more than `rate` sends, whatever the
//! jitter; a round trip of L costs a fraction L/1 s of throughput), or, with
//! `egress.arrival_margin_ms` set, also by its start plus that margin (a slow
//! round trip then costs nothing, and the rule holds while the jitter of the
//! one-way latency stays under the margin). The pair limiter is
//! one keyed governor limiter (all pairs share Meta's quota: one per 6 s,
//! burst 45) whose memory is bounded by `retain_recent`.

use std::hash::{Hash, Hasher};
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::{Duration, Instant};

use governor::clock::{Clock, DefaultClock, QuantaInstant};
use governor::middleware::NoOpMiddleware;
use governor::state::keyed::DefaultKeyedStateStore;
use governor::state::{InMemoryState, NotKeyed};
use governor::{Quota, RateLimiter};

/// A per-number throughput limiter whose rate can be cut and restored
/// (adaptive backoff on 130429). Shared by a lane's send tasks: each waits
/// for its token right before writing the HTTP request, so that the spacing
/// Meta sees is the spacing the limiter enforces.
pub struct Throughput {
    /// The rate the number may use (adjustable at run time: Meta's
    /// throughput level, see `numbers`).
    configured: std::sync::atomic::AtomicU32,
    margin: Option<Duration>,
    inner: std::sync::Mutex<Inner>,
}

type Direct = RateLimiter<NotKeyed, InMemoryState, DefaultClock, NoOpMiddleware<QuantaInstant>>;

struct Inner {
    current: u32,
    limiter: Arc<Direct>,
    /// Completion times of the last `current` sends (pending until done).
    log: std::collections::VecDeque<Slot>,
    epoch: Instant,
}

/// The window of the hard rule.
pub const WINDOW: Duration = Duration::from_secs(1);

/// Nanoseconds since the limiter's epoch at which a send completed; 0 while
/// it is in flight.
type Slot = Arc<std::sync::atomic::AtomicU64>;

/// A granted send. Call [`Ticket::done`] when the request has completed
/// (answered, failed or timed out); dropping it does the same.
#[derive(Debug)]
pub struct Ticket {
    slot: Slot,
    epoch: Instant,
    /// The latest the request can have reached Meta, if a margin is set.
    latest_arrival: Option<Instant>,
}

impl Ticket {
    pub fn done(self) {}

    /// The request leaves now (the ticket was taken a little earlier, e.g.
    /// before the attempt record was written): its latest arrival at Meta
    /// counts from now.
    pub fn start_now(&mut self, margin: Option<Duration>) {
        if let Some(m) = margin {
            self.latest_arrival = Some(Instant::now() + m);
        }
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let now = Instant::now();
        let at = self.latest_arrival.map_or(now, |l| now.min(l));
        let ns = (at.saturating_duration_since(self.epoch).as_nanos() as u64).max(1);
        self.slot.store(ns, std::sync::atomic::Ordering::Release);
    }
}

fn quota_per_second(rate: u32) -> Quota {
    let rate = NonZeroU32::new(rate.max(1)).expect("max(1) is non-zero");
    // A burst lets a late send catch up; the window log keeps the hard rule.
    let burst =
        NonZeroU32::new((rate.get() / 10).clamp(3, 100).min(rate.get())).expect("at least 1");
    Quota::with_period(Duration::from_secs(1) / rate.get())
        .expect("period is non-zero")
        .allow_burst(burst)
}

impl Throughput {
    pub fn new(rate: u32) -> Throughput {
        Throughput::with_margin(rate, None)
    }

    /// `margin`: how much later than its start a request may reach Meta
    /// (`None`: only its completion bounds that; strict whatever the jitter).
    pub fn with_margin(rate: u32, margin: Option<Duration>) -> Throughput {
        Throughput {
            configured: std::sync::atomic::AtomicU32::new(rate.max(1)),
            margin,
            inner: std::sync::Mutex::new(Inner {
                current: rate.max(1),
                limiter: Arc::new(RateLimiter::direct(quota_per_second(rate))),
                log: std::collections::VecDeque::with_capacity(rate.clamp(1, 100_000) as usize),
                epoch: Instant::now(),
            }),
        }
    }

    /// The rate in force now.
    pub fn rate(&self) -> u32 {
        self.inner.lock().unwrap().current
    }

    /// How much later than its start a request may reach Meta.
    pub fn margin(&self) -> Option<Duration> {
        self.margin
    }

    /// The configured rate.
    pub fn configured(&self) -> u32 {
        self.configured.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Changes the configured rate at once (a throughput upgrade, or a
    /// downgrade); a rate cut by 130429 below the new rate recovers from
    /// there as usual. No-op when unchanged.
    pub fn set_configured(&self, rate: u32) {
        let rate = rate.max(1);
        let old = self
            .configured
            .swap(rate, std::sync::atomic::Ordering::Relaxed);
        if old == rate {
            return;
        }
        let current = self.rate();
        if current == old || current > rate {
            self.set(rate);
        }
    }

    /// A ticket to send now, else how long to wait.
    pub fn check(&self) -> Result<Ticket, Duration> {
        use std::sync::atomic::Ordering::Acquire;
        let mut inner = self.inner.lock().unwrap();
        let cap = inner.current as usize;
        while inner.log.len() > cap {
            inner.log.pop_front();
        }
        if inner.log.len() == cap {
            let done_ns = inner.log[0].load(Acquire);
            if done_ns == 0 {
                // The send `rate` places back is still in flight.
                return Err(Duration::from_millis(2));
            }
            let done_at = inner.epoch + Duration::from_nanos(done_ns);
            let since = Instant::now().saturating_duration_since(done_at);
            if since < WINDOW {
                return Err(WINDOW - since);
            }
        }
        // The limiter's own clock: building a new one calibrates (slow).
        let limiter = &inner.limiter;
        limiter
            .check()
            .map_err(|nu| nu.wait_time_from(limiter.clock().now()))?;
        if inner.log.len() == cap {
            inner.log.pop_front();
        }
        let slot: Slot = Arc::new(std::sync::atomic::AtomicU64::new(0));
        inner.log.push_back(slot.clone());
        Ok(Ticket {
            slot,
            epoch: inner.epoch,
            latest_arrival: self.margin.map(|m| Instant::now() + m),
        })
    }

    /// Waits for a ticket.
    pub async fn acquire(&self) -> Ticket {
        loop {
            match self.check() {
                Ok(t) => return t,
                Err(wait) => tokio::time::sleep(wait).await,
            }
        }
    }

    /// Cuts the rate (130429): halves it, not below 1/s.
    pub fn cut(&self) {
        let next = (self.rate() / 2).max(1);
        self.set(next);
    }

    /// Restores a quarter of the lost rate (called periodically while healthy).
    pub fn recover(&self) {
        let current = self.rate();
        let configured = self.configured();
        if current < configured {
            let step = ((configured - current) / 4).max(1);
            self.set((current + step).min(configured));
        }
    }

    fn set(&self, rate: u32) {
        let mut inner = self.inner.lock().unwrap();
        if rate != inner.current {
            inner.current = rate;
            inner.limiter = Arc::new(RateLimiter::direct(quota_per_second(rate)));
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
            .map_err(|nu| nu.wait_time_from(self.limiter.clock().now()))
    }

    /// Drops pairs whose state is back to full burst (bounded memory).
    pub fn retain_recent(&self) {
        self.limiter.retain_recent();
        self.limiter.shrink_to_fit();
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
        // A burst of 3 (catch-up), then one every 100 ms.
        for _ in 0..3 {
            assert!(t.check().is_ok());
        }
        let wait = t.check().unwrap_err();
        assert!(
            wait <= Duration::from_millis(100) && wait > Duration::from_millis(50),
            "{wait:?}"
        );
    }

    #[test]
    fn no_window_ever_holds_more_than_the_rate() {
        // Drive a 50/s limiter flat out for 2.5 s, then check every window.
        let t = Throughput::new(50);
        let mut sent = Vec::new();
        let end = Instant::now() + Duration::from_millis(2500);
        while Instant::now() < end {
            match t.check() {
                Ok(ticket) => {
                    sent.push(Instant::now());
                    ticket.done();
                }
                Err(w) => std::thread::sleep(w.min(Duration::from_millis(2))),
            }
        }
        let mut j = 0;
        for i in 0..sent.len() {
            while sent[i] - sent[j] >= Duration::from_secs(1) {
                j += 1;
            }
            assert!(i - j < 50, "{} sends in one second", i - j + 1);
        }
        // And it is nearly reached: at least 95 % of 50/s over the run.
        let rate = (sent.len() - 1) as f64 / (sent[sent.len() - 1] - sent[0]).as_secs_f64();
        assert!(rate >= 47.5, "{rate}");
    }

    #[test]
    fn cut_and_recover() {
        let t = Throughput::new(80);
        t.cut();
        assert_eq!(t.rate(), 40);
        t.cut();
        t.cut();
        assert_eq!(t.rate(), 10);
        for _ in 0..100 {
            t.recover();
        }
        assert_eq!(t.rate(), 80);
        let one = Throughput::new(1);
        one.cut();
        assert_eq!(one.rate(), 1);
    }

    #[test]
    fn the_configured_rate_changes_at_run_time() {
        let t = Throughput::new(80);
        t.set_configured(1000);
        assert_eq!((t.rate(), t.configured()), (1000, 1000));
        t.cut();
        t.set_configured(2000);
        assert_eq!(t.rate(), 500, "a cut rate recovers from where it is");
        t.set_configured(80);
        assert_eq!((t.rate(), t.configured()), (80, 80));
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

    #[test]
    fn idle_pairs_are_forgotten() {
        let p = PairRate::new(Duration::from_millis(10), 1);
        for u in 0..1000 {
            assert!(p.check(PairKey::new("1", &format!("55{u}"))).is_ok());
        }
        assert_eq!(p.len(), 1000);
        p.retain_recent();
        assert!(!p.is_empty(), "pairs still inside their period are kept");
        std::thread::sleep(Duration::from_millis(30));
        p.retain_recent();
        assert_eq!(p.len(), 0, "pairs back at full burst are dropped");
    }
}
