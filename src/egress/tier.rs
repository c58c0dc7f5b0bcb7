//! The messaging tier (DESIGN §6, CLOUD_API §6.3): per business portfolio
//! (a configured group of numbers), the number of distinct users sent a
//! business-initiated message outside their customer service window in a
//! moving 24 hours. Meta documents no error code for going past it, so the
//! gateway counts and blocks (`blocked: tier_limit`) itself.
//!
//! A user counts from their latest such send: while any send to them lies
//! in the last 24 h they use one place, however many they get. A place is
//! taken before the send and given back when Meta refused it (`failed`); an
//! `unknown` send keeps its place (it may have been delivered).

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

/// The moving window.
pub const WINDOW_MS: u64 = 24 * 3600 * 1000;

/// One portfolio's count.
#[derive(Debug)]
pub struct Portfolio {
    pub name: String,
    /// The tier in force (adjustable: Meta's messaging limit, when the
    /// config leaves `limit` at 0); `usize::MAX` while unknown.
    limit: std::sync::atomic::AtomicUsize,
    /// The config set no limit: it follows Meta's messaging limit.
    pub follows_meta: bool,
    inner: Mutex<Counted>,
}

#[derive(Debug, Default)]
struct Counted {
    /// User → time of their latest counted send.
    latest: HashMap<u64, u64>,
    /// (time, user) in time order; stale pairs (the user was sent to again
    /// later) are skipped when they reach the front.
    order: VecDeque<(u64, u64)>,
}

impl Counted {
    fn expire(&mut self, now_ms: u64) {
        while let Some(&(t, user)) = self.order.front() {
            if t + WINDOW_MS > now_ms {
                break;
            }
            self.order.pop_front();
            if self.latest.get(&user) == Some(&t) {
                self.latest.remove(&user);
            }
        }
    }
}

/// What [`Portfolio::admit`] decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admit {
    /// The user already counts in the window: no new place used.
    Counted,
    /// A new place was taken (give it back with [`Portfolio::release`] if
    /// the send is refused).
    New,
    /// The portfolio's limit is reached.
    Full,
}

impl Portfolio {
    /// `limit` 0: follow Meta's messaging limit (none until it is known).
    pub fn new(name: &str, limit: usize) -> Portfolio {
        Portfolio {
            name: name.to_string(),
            limit: std::sync::atomic::AtomicUsize::new(if limit == 0 { usize::MAX } else { limit }),
            follows_meta: limit == 0,
            inner: Mutex::new(Counted::default()),
        }
    }

    /// The tier in force.
    pub fn limit(&self) -> usize {
        self.limit.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Sets the tier from Meta's messaging limit (`usize::MAX`: unlimited
    /// or unknown); ignored when the config set the limit.
    pub fn set_meta_limit(&self, limit: usize) {
        if self.follows_meta {
            self.limit
                .store(limit.max(1), std::sync::atomic::Ordering::Relaxed);
        }
    }

    /// Distinct users counted in the window ending now.
    pub fn used(&self, now_ms: u64) -> usize {
        let mut c = self.inner.lock().unwrap();
        c.expire(now_ms);
        c.latest.len()
    }

    /// Takes (or refreshes) the user's place for a send at `now_ms`.
    pub fn admit(&self, user: u64, now_ms: u64) -> Admit {
        let mut c = self.inner.lock().unwrap();
        c.expire(now_ms);
        let known = c.latest.contains_key(&user);
        if !known && c.latest.len() >= self.limit() {
            return Admit::Full;
        }
        c.latest.insert(user, now_ms);
        c.order.push_back((now_ms, user));
        if known {
            Admit::Counted
        } else {
            Admit::New
        }
    }

    /// Gives back a place taken by [`Admit::New`] at `at_ms`.
    pub fn release(&self, user: u64, at_ms: u64) {
        let mut c = self.inner.lock().unwrap();
        if c.latest.get(&user) == Some(&at_ms) {
            c.latest.remove(&user);
        }
    }

    /// Counts a send found in the results history (on start or after a
    /// rebalance), at its time.
    pub fn restore(&self, user: u64, at_ms: u64, now_ms: u64) {
        if at_ms + WINDOW_MS <= now_ms {
            return;
        }
        let mut c = self.inner.lock().unwrap();
        let newer = c.latest.get(&user).is_none_or(|t| *t < at_ms);
        if newer {
            c.latest.insert(user, at_ms);
            // Keep `order` sorted: history arrives roughly in time order;
            // an older one is inserted in place.
            let pos = c.order.partition_point(|(t, _)| *t <= at_ms);
            c.order.insert(pos, (at_ms, user));
        }
    }
}

/// Portfolios by business number.
#[derive(Debug, Default, Clone)]
pub struct Tiers {
    by_number: HashMap<String, Arc<Portfolio>>,
}

impl Tiers {
    /// `portfolios`: (name, limit, numbers).
    pub fn new<'a>(portfolios: impl IntoIterator<Item = (&'a str, usize, &'a [String])>) -> Tiers {
        let mut by_number = HashMap::new();
        for (name, limit, numbers) in portfolios {
            let p = Arc::new(Portfolio::new(name, limit));
            for n in numbers {
                by_number.insert(n.clone(), p.clone());
            }
        }
        Tiers { by_number }
    }

    /// The portfolio a number belongs to, if any.
    pub fn of(&self, phone_number_id: &str) -> Option<&Arc<Portfolio>> {
        self.by_number.get(phone_number_id)
    }

    pub fn is_empty(&self) -> bool {
        self.by_number.is_empty()
    }

    /// Every portfolio with its numbers (each once).
    pub fn portfolios(&self) -> Vec<(Arc<Portfolio>, Vec<String>)> {
        let mut out: Vec<(Arc<Portfolio>, Vec<String>)> = Vec::new();
        for (n, p) in &self.by_number {
            match out.iter_mut().find(|(q, _)| Arc::ptr_eq(p, q)) {
                Some((_, ns)) => ns.push(n.clone()),
                None => out.push((p.clone(), vec![n.clone()])),
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const H: u64 = 3600 * 1000;

    #[test]
    fn distinct_users_in_a_moving_day() {
        let p = Portfolio::new("acme", 2);
        assert_eq!(p.admit(1, 0), Admit::New);
        assert_eq!(p.admit(1, H), Admit::Counted, "same user: no new place");
        assert_eq!(p.admit(2, 2 * H), Admit::New);
        assert_eq!(p.admit(3, 3 * H), Admit::Full);
        // User 1's latest send was at 1 h: their place frees at 25 h.
        assert_eq!(p.admit(3, 24 * H + 1), Admit::Full);
        assert_eq!(p.admit(3, 25 * H), Admit::New);
        assert_eq!(p.used(25 * H), 2);
        assert_eq!(p.used(27 * H), 1, "user 2 expired at 26 h");
    }

    #[test]
    fn a_refused_send_gives_its_place_back() {
        let p = Portfolio::new("acme", 1);
        assert_eq!(p.admit(7, 10), Admit::New);
        p.release(7, 10);
        assert_eq!(p.admit(8, 20), Admit::New);
        // Releasing with a stale time does not free a newer place.
        p.release(8, 10);
        assert_eq!(p.admit(9, 30), Admit::Full);
    }

    #[test]
    fn history_restores_the_count() {
        let now = 30 * H;
        let p = Portfolio::new("acme", 2);
        p.restore(1, 5 * H, now); // older than 24 h: ignored
        p.restore(2, 20 * H, now);
        p.restore(3, 10 * H, now);
        assert_eq!(p.used(now), 2);
        assert_eq!(p.admit(4, now), Admit::Full);
        // User 3 (10 h) expires at 34 h, user 2 (20 h) at 44 h.
        assert_eq!(p.admit(4, 34 * H), Admit::New);
    }

    #[test]
    fn a_portfolio_without_a_limit_follows_meta() {
        let p = Portfolio::new("acme", 0);
        assert_eq!(p.limit(), usize::MAX, "unknown: never blocks");
        p.set_meta_limit(1);
        assert_eq!(p.admit(1, 0), Admit::New);
        assert_eq!(p.admit(2, 0), Admit::Full);
        let fixed = Portfolio::new("fixed", 5);
        fixed.set_meta_limit(1);
        assert_eq!(fixed.limit(), 5, "the config wins");
    }

    #[test]
    fn numbers_share_their_portfolio() {
        let nums = ["1".to_string(), "2".to_string()];
        let t = Tiers::new([("acme", 1usize, &nums[..])]);
        let (a, b) = (t.of("1").unwrap(), t.of("2").unwrap());
        assert!(Arc::ptr_eq(a, b));
        assert!(t.of("3").is_none());
        assert_eq!(a.admit(5, 0), Admit::New);
        assert_eq!(
            b.admit(6, 0),
            Admit::Full,
            "one number used the portfolio's place"
        );
    }
}
