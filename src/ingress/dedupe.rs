//! The dedupe set: a bounded, time-windowed set of event ids.
//!
//! An event id is *claimed* by the POST that will produce it (`Pending`), then
//! *committed* once Kafka has acknowledged its record (`Done` until the window
//! ends) or *released* if it was not acknowledged, so that Meta's retry
//! produces it. A POST that finds an id `Pending` in another POST waits for
//! that POST's outcome instead of producing a second record; this is what
//! makes re-batched redeliveries safe while the first delivery is in flight.
//!
//! Architecture invariant: an id is `Done` only after its record was
//! acknowledged by Kafka, so dedupe can never drop an event that was not
//! stored.
//!
//! Memory: ids are kept as 64-bit hashes (SipHash with fixed keys) in sharded
//! maps plus an expiry queue, about 50–70 bytes per id; `max_entries` bounds
//! the total, evicting the oldest committed ids first.

use std::collections::{HashMap, VecDeque};
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use std::sync::atomic::{AtomicU8, Ordering};

use tokio::sync::Notify;

const SHARDS: usize = 64;
/// Pre-sized capacity per shard at most (64 × 65,536 ≈ 4M ids).
const PRESIZE_PER_SHARD_MAX: usize = 1 << 16;

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
    Duplicate,
    /// Another POST is producing it: wait for that POST's outcome.
    InFlight(Arc<Batch>),
}

/// The 64-bit hash an id is kept as.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct IdHash(pub u64);

#[derive(Debug)]
enum Slot {
    Pending(Arc<Batch>),
    /// Expiry, in seconds since the set's epoch.
    Done(u32),
}

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

type IdMap = HashMap<u64, Slot, BuildHasherDefault<IdHasher>>;

#[derive(Default)]
struct Shard {
    map: IdMap,
    /// Committed ids in commit order with their expiry, for eviction.
    order: VecDeque<(u64, u32)>,
}

/// Counters for metrics.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Stats {
    pub entries: usize,
    pub approx_bytes: usize,
}

/// The dedupe set. Cheap to share (`Arc`), safe to use from many tasks.
pub struct Dedupe {
    shards: Box<[Mutex<Shard>]>,
    window_secs: u32,
    max_per_shard: usize,
    epoch: Instant,
    evicted_early: std::sync::atomic::AtomicU64,
}

impl Dedupe {
    pub fn new(window: Duration, max_entries: usize) -> Dedupe {
        let max_per_shard = (max_entries / SHARDS).max(1);
        // Sized for the bound up front (up to 4M ids): the maps never rehash
        // under load. Only the control bytes are touched now; the buckets
        // become resident as they fill.
        let cap = max_per_shard.min(PRESIZE_PER_SHARD_MAX) + 1;
        Dedupe {
            shards: (0..SHARDS)
                .map(|_| {
                    Mutex::new(Shard {
                        map: IdMap::with_capacity_and_hasher(cap, Default::default()),
                        order: VecDeque::with_capacity(cap),
                    })
                })
                .collect(),
            window_secs: window.as_secs().clamp(1, u32::MAX as u64 / 2) as u32,
            max_per_shard,
            epoch: Instant::now(),
            evicted_early: Default::default(),
        }
    }

    fn now_secs(&self) -> u32 {
        self.epoch.elapsed().as_secs() as u32
    }

    /// The hash an id is kept as.
    pub fn hash(id: &str) -> IdHash {
        // DefaultHasher::new() has fixed keys: stable within and across runs.
        let mut h = std::collections::hash_map::DefaultHasher::new();
        h.write(id.as_bytes());
        IdHash(h.finish())
    }

    fn shard(&self, h: IdHash) -> &Mutex<Shard> {
        &self.shards[(h.0 >> 58) as usize % SHARDS]
    }

    /// Claims `id` for `batch`.
    pub fn claim(&self, id: &str, batch: &Arc<Batch>) -> Claim {
        self.claim_at(id, batch, self.now_secs())
    }

    fn claim_at(&self, id: &str, batch: &Arc<Batch>, now: u32) -> Claim {
        let h = Self::hash(id);
        let mut shard = self.shard(h).lock().unwrap();
        match shard.map.get(&h.0) {
            Some(Slot::Done(exp)) if *exp > now => Claim::Duplicate,
            Some(Slot::Pending(b)) if Arc::ptr_eq(b, batch) => Claim::Duplicate,
            Some(Slot::Pending(b)) => Claim::InFlight(b.clone()),
            _ => {
                shard.map.insert(h.0, Slot::Pending(batch.clone()));
                Claim::New(h)
            }
        }
    }

    /// Marks ids as stored: duplicates of them are dropped until the window ends.
    pub fn commit(&self, ids: &[IdHash]) {
        self.commit_at(ids, self.now_secs())
    }

    fn commit_at(&self, ids: &[IdHash], now: u32) {
        let exp = now.saturating_add(self.window_secs);
        for h in ids {
            let mut shard = self.shard(*h).lock().unwrap();
            shard.map.insert(h.0, Slot::Done(exp));
            shard.order.push_back((h.0, exp));
            self.evict(&mut shard, now);
        }
    }

    /// Forgets ids that were claimed but not stored, so a retry produces them.
    pub fn release(&self, ids: &[IdHash]) {
        for h in ids {
            let mut shard = self.shard(*h).lock().unwrap();
            if let Some(Slot::Pending(_)) = shard.map.get(&h.0) {
                shard.map.remove(&h.0);
            }
        }
    }

    fn evict(&self, shard: &mut Shard, now: u32) {
        while let Some(&(h, exp)) = shard.order.front() {
            let over = shard.order.len() > self.max_per_shard;
            if exp > now && !over {
                break;
            }
            shard.order.pop_front();
            // Only drop the map entry if it is still this commit (not re-committed
            // later with a newer expiry, and not pending again).
            if let Some(Slot::Done(e)) = shard.map.get(&h) {
                if *e == exp {
                    shard.map.remove(&h);
                    if exp > now {
                        self.evicted_early
                            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                }
            }
        }
    }

    /// Drops expired ids everywhere (called periodically; commits also evict).
    pub fn sweep(&self) {
        let now = self.now_secs();
        for s in self.shards.iter() {
            let mut shard = s.lock().unwrap();
            self.evict(&mut shard, now);
        }
    }

    /// Ids evicted before their window ended because of `max_entries`.
    pub fn evicted_early(&self) -> u64 {
        self.evicted_early
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Entries and an estimate of the memory they hold.
    pub fn stats(&self) -> Stats {
        let mut st = Stats::default();
        for s in self.shards.iter() {
            let shard = s.lock().unwrap();
            st.entries += shard.map.len();
            // hashbrown: one control byte + (key, value) per bucket; deque: (u64, u32).
            st.approx_bytes += shard.map.capacity() * (1 + std::mem::size_of::<(u64, Slot)>())
                + shard.order.capacity() * std::mem::size_of::<(u64, u32)>();
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

    #[test]
    fn committed_ids_are_duplicates_until_the_window_ends() {
        let d = Dedupe::new(Duration::from_secs(60), 1000);
        let b = Batch::new();
        let h = new_id(d.claim_at("wamid.A", &b, 0));
        d.commit_at(&[h], 0);
        let b2 = Batch::new();
        assert!(matches!(d.claim_at("wamid.A", &b2, 59), Claim::Duplicate));
        assert!(matches!(d.claim_at("wamid.A", &b2, 60), Claim::New(_)));
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
        assert!(matches!(d.claim_at("wamid.A", &b, 0), Claim::Duplicate));
        let other = Batch::new();
        let Claim::InFlight(first) = d.claim_at("wamid.A", &other, 0) else {
            panic!("expected InFlight")
        };
        assert_eq!(first.outcome(), None);
        d.commit_at(&[h], 0);
        b.finish(true);
        assert_eq!(first.outcome(), Some(true));
        assert!(matches!(d.claim_at("wamid.A", &other, 1), Claim::Duplicate));
    }

    #[test]
    fn memory_is_bounded_by_max_entries() {
        let d = Dedupe::new(Duration::from_secs(3600), SHARDS * 10);
        let b = Batch::new();
        for i in 0..100_000 {
            let h = new_id(d.claim_at(&format!("wamid.{i}"), &b, 0));
            d.commit_at(&[h], 0);
        }
        let st = d.stats();
        assert!(st.entries <= SHARDS * 11, "{st:?}");
        assert!(d.evicted_early() >= 100_000 - (SHARDS as u64 * 11));
        // The newest ids are still remembered.
        assert!(matches!(
            d.claim_at("wamid.99999", &Batch::new(), 1),
            Claim::Duplicate
        ));
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
        // A later commit evicts the expired ones in its shard; sweep the rest.
        for s in d.shards.iter() {
            let mut shard = s.lock().unwrap();
            d.evict(&mut shard, 11);
        }
        assert_eq!(d.stats().entries, 0);
    }
}
