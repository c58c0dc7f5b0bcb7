//! The dedupe set: a bounded, time-windowed set of event ids.
//!
//! An event id is *claimed* by the POST that will produce it (pending), then
//! *committed* once Kafka has acknowledged its record (held until the window
//! ends) or *released* if it was not acknowledged, so that Meta's retry
//! produces it. A POST that finds an id pending in another POST waits for
//! that POST's outcome instead of producing a second record; this is what
//! makes re-batched redeliveries safe while the first delivery is in flight.
//! Ids other instances stored are *learned* from the shared id topic
//! ([`super::shared`]) and held like committed ones, marked as learned.
//!
//! Architecture invariant: an id is held only after its record was
//! acknowledged by Kafka (here, or at the instance it was learned from), so
//! dedupe can never drop an event that was not stored.
//!
//! Memory: a held id is a 64-bit hash (SipHash-1-3 with fixed keys, the
//! same on every instance and version) and a 32-bit expiry in one hash-map
//! entry: 16 bytes plus a control byte per bucket, about 20–40 bytes per id
//! by the map's fill (BENCHMARKS.md measures it at 10M ids). Expired ids
//! are swept a shard at a time; `max_entries` bounds the total, evicting
//! the ids closest to expiry first.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Notify;

pub const SHARDS: usize = 64;

/// Expiries are seconds since 2020-01-01 (31 bits: until 2088); the top bit
/// of a held value marks an id learned from another instance.
const EPOCH_SECS: u64 = 1_577_836_800;
const LEARNED: u32 = 1 << 31;
const EXPIRY: u32 = LEARNED - 1;

/// The outcome of one POST's produce, shared with POSTs waiting on its ids:
/// pending while in flight, then `true` when everything it claimed was
/// acknowledged, `false` otherwise (waiters then re-claim). Waiters are rare
/// (a redelivery racing its first delivery), so it is an atomic and a
/// `Notify`, not a channel.
#[derive(Debug, Default)]
pub struct Batch {
    /// 0 pending, 1 acknowledged, 2 failed.
    state: AtomicU8,
    done: Notify,
}

impl Batch {
    pub fn new() -> Arc<Batch> {
        Arc::new(Batch::default())
    }

    /// Publishes the outcome to every waiter.
    pub fn finish(&self, all_acknowledged: bool) {
        self.state
            .store(if all_acknowledged { 1 } else { 2 }, Ordering::Release);
        self.done.notify_waiters();
    }

    /// The outcome, once finished.
    pub fn outcome(&self) -> Option<bool> {
        match self.state.load(Ordering::Acquire) {
            0 => None,
            s => Some(s == 1),
        }
    }

    /// Waits until the batch is finished and returns its outcome.
    pub async fn wait(&self) -> bool {
        loop {
            let notified = self.done.notified();
            tokio::pin!(notified);
            // Registered before the check, so a finish in between still wakes us.
            notified.as_mut().enable();
            if let Some(ok) = self.outcome() {
                return ok;
            }
            notified.await;
        }
    }
}

/// What `claim` found.
#[derive(Debug)]
pub enum Claim {
    /// Not seen: the caller must produce it, then commit or release `IdHash`.
    New(IdHash),
    /// Already stored (or claimed earlier by the same POST): skip it.
    /// `learned`: stored by another instance (the shared dedupe's hit).
    Duplicate { learned: bool },
    /// Another POST is producing it: wait for that POST's outcome.
    InFlight(Arc<Batch>),
}

/// What `learn` found for an id another instance stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Learned {
    /// Not held here: held from now on.
    New,
    /// Held or being produced here too: two records of the event exist (a
    /// late duplicate, when the id came from another instance).
    AlreadyHeld,
    /// Its window had already ended.
    Expired,
}

/// The 64-bit hash an id is kept as.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct IdHash(pub u64);

/// Keys are already hashes: do not hash them again.
#[derive(Default)]
struct IdHasher(u64);

impl Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(*b);
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

type IdMap<V> = HashMap<u64, V, BuildHasherDefault<IdHasher>>;

#[derive(Default)]
struct Shard {
    /// Held ids: expiry (seconds since [`EPOCH_SECS`]) | [`LEARNED`].
    held: IdMap<u32>,
    /// Ids claimed by a POST whose records are not acknowledged yet.
    pending: IdMap<Arc<Batch>>,
}

/// Counters for metrics.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Stats {
    /// Ids held or pending.
    pub entries: usize,
    /// Of `entries`, learned from other instances.
    pub learned: usize,
    pub approx_bytes: usize,
}

/// The dedupe set. Cheap to share (`Arc`), safe to use from many tasks.
pub struct Dedupe {
    shards: Box<[Mutex<Shard>]>,
    window_secs: u32,
    max_per_shard: usize,
    evicted_early: AtomicU64,
    learned: std::sync::atomic::AtomicUsize,
}

/// Seconds since [`EPOCH_SECS`] of a wall-clock time in milliseconds.
fn secs_of(ms: u64) -> u32 {
    ((ms / 1000).saturating_sub(EPOCH_SECS)).min(EXPIRY as u64) as u32
}

fn now_secs() -> u32 {
    secs_of(crate::clock::now_ms())
}

impl Dedupe {
    pub fn new(window: Duration, max_entries: usize) -> Dedupe {
        let max_per_shard = (max_entries / SHARDS).max(1);
        Dedupe {
            shards: (0..SHARDS).map(|_| Mutex::new(Shard::default())).collect(),
            window_secs: window.as_secs().clamp(1, EXPIRY as u64 / 2) as u32,
            max_per_shard,
            evicted_early: Default::default(),
            learned: Default::default(),
        }
    }

    /// The window, in seconds.
    pub fn window_secs(&self) -> u32 {
        self.window_secs
    }

    /// The hash an id is kept as: SipHash-1-3 with zero keys, spelt out (not
    /// `std`'s `DefaultHasher`, whose algorithm may change between Rust
    /// releases) because instances of different builds share these hashes.
    pub fn hash(id: &str) -> IdHash {
        let mut h = siphasher::sip::SipHasher13::new_with_keys(0, 0);
        h.write(id.as_bytes());
        IdHash(h.finish())
    }

    fn shard(&self, h: u64) -> &Mutex<Shard> {
        &self.shards[(h >> 58) as usize % SHARDS]
    }

    /// Claims `id` for `batch`.
    pub fn claim(&self, id: &str, batch: &Arc<Batch>) -> Claim {
        self.claim_at(id, batch, now_secs())
    }

    fn claim_at(&self, id: &str, batch: &Arc<Batch>, now: u32) -> Claim {
        let h = Self::hash(id);
        let mut shard = self.shard(h.0).lock().unwrap();
        if let Some(v) = shard.held.get(&h.0) {
            if v & EXPIRY > now {
                return Claim::Duplicate {
                    learned: v & LEARNED != 0,
                };
            }
        }
        match shard.pending.get(&h.0) {
            Some(b) if Arc::ptr_eq(b, batch) => Claim::Duplicate { learned: false },
            Some(b) => Claim::InFlight(b.clone()),
            None => {
                shard.pending.insert(h.0, batch.clone());
                Claim::New(h)
            }
        }
    }

    /// Marks ids as stored: duplicates of them are dropped until the window ends.
    pub fn commit(&self, ids: &[IdHash]) {
        self.commit_at(ids, now_secs())
    }

    fn commit_at(&self, ids: &[IdHash], now: u32) {
        let exp = now.saturating_add(self.window_secs).min(EXPIRY);
        for h in ids {
            let mut shard = self.shard(h.0).lock().unwrap();
            shard.pending.remove(&h.0);
            if let Some(old) = shard.held.insert(h.0, exp) {
                if old & LEARNED != 0 {
                    self.learned.fetch_sub(1, Ordering::Relaxed);
                }
            }
            if shard.held.len() > self.max_per_shard {
                self.evict(&mut shard, now);
            }
        }
    }

    /// Forgets ids that were claimed but not stored, so a retry produces them.
    pub fn release(&self, ids: &[IdHash]) {
        for h in ids {
            self.shard(h.0).lock().unwrap().pending.remove(&h.0);
        }
    }

    /// Holds an id another instance stored at `stored_at_ms` (its record's
    /// time) until the window that began then ends.
    pub fn learn(&self, h: u64, stored_at_ms: u64) -> Learned {
        self.learn_at(h, secs_of(stored_at_ms), now_secs())
    }

    fn learn_at(&self, h: u64, stored_at: u32, now: u32) -> Learned {
        let exp = stored_at.saturating_add(self.window_secs).min(EXPIRY);
        if exp <= now {
            return Learned::Expired;
        }
        let mut shard = self.shard(h).lock().unwrap();
        let pending = shard.pending.contains_key(&h);
        match shard.held.get_mut(&h) {
            Some(v) if *v & EXPIRY > now => {
                // Keep the later expiry, and "ours" over "learned".
                if exp > *v & EXPIRY {
                    *v = (*v & LEARNED) | exp;
                }
                Learned::AlreadyHeld
            }
            _ => {
                let was_learned = shard
                    .held
                    .insert(h, exp | LEARNED)
                    .is_some_and(|old| old & LEARNED != 0);
                if !was_learned {
                    self.learned.fetch_add(1, Ordering::Relaxed);
                }
                if shard.held.len() > self.max_per_shard {
                    self.evict(&mut shard, now);
                }
                if pending {
                    Learned::AlreadyHeld
                } else {
                    Learned::New
                }
            }
        }
    }

    /// Over the bound: drops expired ids, then the tenth of the shard's ids
    /// that expire first (counted in `evicted_early`).
    fn evict(&self, shard: &mut Shard, now: u32) {
        self.drop_expired(shard, now);
        if shard.held.len() <= self.max_per_shard {
            return;
        }
        let keep = self.max_per_shard - self.max_per_shard / 10;
        let mut exps: Vec<u32> = shard.held.values().map(|v| v & EXPIRY).collect();
        let cut = exps.len() - keep;
        let (_, threshold, _) = exps.select_nth_unstable(cut - 1);
        let threshold = *threshold;
        let before = shard.held.len();
        let mut learned_gone = 0usize;
        shard.held.retain(|_, v| {
            let keep = *v & EXPIRY > threshold;
            if !keep && *v & LEARNED != 0 {
                learned_gone += 1;
            }
            keep
        });
        self.learned.fetch_sub(learned_gone, Ordering::Relaxed);
        self.evicted_early
            .fetch_add((before - shard.held.len()) as u64, Ordering::Relaxed);
    }

    fn drop_expired(&self, shard: &mut Shard, now: u32) {
        let mut learned_gone = 0usize;
        shard.held.retain(|_, v| {
            let keep = *v & EXPIRY > now;
            if !keep && *v & LEARNED != 0 {
                learned_gone += 1;
            }
            keep
        });
        self.learned.fetch_sub(learned_gone, Ordering::Relaxed);
    }

    /// Drops expired ids from one shard (`n` modulo the shard count): called
    /// every second, so each shard is swept about once a minute and no sweep
    /// holds a lock for long.
    pub fn sweep_one(&self, n: usize) {
        let mut shard = self.shards[n % SHARDS].lock().unwrap();
        self.drop_expired(&mut shard, now_secs());
    }

    /// Drops expired ids everywhere.
    pub fn sweep(&self) {
        for n in 0..SHARDS {
            self.sweep_one(n);
        }
    }

    /// Ids evicted before their window ended because of `max_entries`.
    pub fn evicted_early(&self) -> u64 {
        self.evicted_early.load(Ordering::Relaxed)
    }

    /// Entries and an estimate of the memory they hold.
    pub fn stats(&self) -> Stats {
        let mut st = Stats {
            learned: self.learned.load(Ordering::Relaxed),
            ..Stats::default()
        };
        for s in self.shards.iter() {
            let shard = s.lock().unwrap();
            st.entries += shard.held.len() + shard.pending.len();
            // hashbrown: one control byte + (key, value) per bucket.
            st.approx_bytes += shard.held.capacity() * (1 + std::mem::size_of::<(u64, u32)>())
                + shard.pending.capacity() * (1 + std::mem::size_of::<(u64, Arc<Batch>)>());
        }
        st
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn new_id(c: Claim) -> IdHash {
        match c {
            Claim::New(h) => h,
            other => panic!("expected New, got {other:?}"),
        }
    }

    fn dup(c: Claim) -> bool {
        match c {
            Claim::Duplicate { learned } => learned,
            other => panic!("expected Duplicate, got {other:?}"),
        }
    }

    #[test]
    fn the_hash_is_siphash13_with_zero_keys_as_before() {
        // The value std's DefaultHasher gave for this id when the set was
        // per process: unchanged, and now fixed by the algorithm's spec.
        let mut std = std::collections::hash_map::DefaultHasher::new();
        std.write(b"wamid.HBgLMTU1NTAwMDAwMDEVAgASGBQzQUVCQTc4MjU3RTkwQjFDNzU5RAA=");
        assert_eq!(
            Dedupe::hash("wamid.HBgLMTU1NTAwMDAwMDEVAgASGBQzQUVCQTc4MjU3RTkwQjFDNzU5RAA=").0,
            std.finish()
        );
        assert_ne!(Dedupe::hash("a"), Dedupe::hash("b"));
    }

    #[test]
    fn committed_ids_are_duplicates_until_the_window_ends() {
        let d = Dedupe::new(Duration::from_secs(60), 1000);
        let b = Batch::new();
        let h = new_id(d.claim_at("wamid.A", &b, 100));
        d.commit_at(&[h], 100);
        let b2 = Batch::new();
        assert!(!dup(d.claim_at("wamid.A", &b2, 159)));
        assert!(matches!(d.claim_at("wamid.A", &b2, 160), Claim::New(_)));
    }

    #[test]
    fn released_ids_can_be_produced_again() {
        let d = Dedupe::new(Duration::from_secs(60), 1000);
        let b = Batch::new();
        let h = new_id(d.claim_at("wamid.A", &b, 0));
        d.release(&[h]);
        b.finish(false);
        assert!(matches!(
            d.claim_at("wamid.A", &Batch::new(), 1),
            Claim::New(_)
        ));
    }

    #[tokio::test]
    async fn batch_wait_wakes_on_finish_and_returns_at_once_after() {
        let b = Batch::new();
        let waiter = tokio::spawn({
            let b = b.clone();
            async move { b.wait().await }
        });
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        b.finish(false);
        let got = tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .expect("waiter woken")
            .unwrap();
        assert!(!got);
        assert!(!b.wait().await);
        let ok = Batch::new();
        ok.finish(true);
        assert!(ok.wait().await);
    }

    #[test]
    fn same_batch_repeat_is_duplicate_other_batch_waits() {
        let d = Dedupe::new(Duration::from_secs(60), 1000);
        let b = Batch::new();
        let h = new_id(d.claim_at("wamid.A", &b, 0));
        assert!(!dup(d.claim_at("wamid.A", &b, 0)));
        let other = Batch::new();
        let Claim::InFlight(first) = d.claim_at("wamid.A", &other, 0) else {
            panic!("expected InFlight")
        };
        assert_eq!(first.outcome(), None);
        d.commit_at(&[h], 0);
        b.finish(true);
        assert_eq!(first.outcome(), Some(true));
        assert!(!dup(d.claim_at("wamid.A", &other, 1)));
    }

    #[test]
    fn learned_ids_are_duplicates_marked_learned_for_their_own_window() {
        let d = Dedupe::new(Duration::from_secs(60), 1000);
        let h = Dedupe::hash("wamid.B").0;
        // Stored elsewhere at 100: held until 160, whenever it is learned.
        assert_eq!(d.learn_at(h, 100, 130), Learned::New);
        assert!(dup(d.claim_at("wamid.B", &Batch::new(), 159)));
        assert!(matches!(
            d.claim_at("wamid.B", &Batch::new(), 160),
            Claim::New(_)
        ));
        // Learned too late: nothing held.
        assert_eq!(
            d.learn_at(Dedupe::hash("wamid.C").0, 100, 160),
            Learned::Expired
        );
        assert_eq!(d.stats().learned, 1);
    }

    #[test]
    fn an_id_stored_here_and_learned_from_elsewhere_is_a_late_duplicate() {
        let d = Dedupe::new(Duration::from_secs(60), 1000);
        let b = Batch::new();
        let h = new_id(d.claim_at("wamid.D", &b, 10));
        // Still being produced here when the other instance's record arrives.
        assert_eq!(d.learn_at(h.0, 10, 10), Learned::AlreadyHeld);
        d.commit_at(&[h], 10);
        // Committed here, learned again: still a duplicate, still ours.
        assert_eq!(d.learn_at(h.0, 11, 11), Learned::AlreadyHeld);
        assert!(!dup(d.claim_at("wamid.D", &Batch::new(), 12)));
        assert_eq!(d.stats().learned, 0);
    }

    #[test]
    fn memory_is_bounded_by_max_entries_and_the_newest_ids_stay() {
        let d = Dedupe::new(Duration::from_secs(3600), SHARDS * 10);
        let b = Batch::new();
        for i in 0..100_000u32 {
            // One id a second: later ids expire later.
            let h = new_id(d.claim_at(&format!("wamid.{i}"), &b, i));
            d.commit_at(&[h], i);
        }
        let st = d.stats();
        assert!(st.entries <= SHARDS * 10, "{st:?}");
        assert!(d.evicted_early() >= 100_000 - (SHARDS as u64 * 10));
        assert!(!dup(d.claim_at("wamid.99999", &Batch::new(), 100_000)));
    }

    #[test]
    fn expired_entries_are_swept() {
        let d = Dedupe::new(Duration::from_secs(10), 1000);
        let b = Batch::new();
        for i in 0..100 {
            let h = new_id(d.claim_at(&format!("x{i}"), &b, 0));
            d.commit_at(&[h], 0);
        }
        assert_eq!(d.stats().entries, 100);
        for s in d.shards.iter() {
            d.drop_expired(&mut s.lock().unwrap(), 11);
        }
        assert_eq!(d.stats().entries, 0);
    }
}
