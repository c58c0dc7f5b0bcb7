//! Contacts: consent, marketing preference and last-inbound time per
//! (business number, user), in a sharded in-memory map (dashmap).
//!
//! Entries are keyed by two integers (the phone_number_id and the user's
//! digits both fit in a `u64`), never by strings, so an entry costs a few
//! dozen bytes. Egress reads it through [`Contacts`]; the Kafka-backed
//! bootstrap and sync (compacted `wa.consent` / `wa.windows`) come with the
//! contacts issue.

pub mod inbound;
pub mod keywords;
pub mod records;
pub mod sync;
pub mod writer;

use std::sync::atomic::{AtomicUsize, Ordering};

use dashmap::DashMap;
use serde::{Deserialize, Serialize};

/// Consent to be messaged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Consent {
    OptedIn,
    OptedOut,
    #[default]
    Unknown,
}

/// The user's marketing preference (`user_preferences` webhooks, 131050).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Marketing {
    #[default]
    Allowed,
    Stopped,
}

/// What wagate knows of a pair.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ContactState {
    pub consent: Consent,
    pub marketing: Marketing,
    /// Last inbound message, Unix ms.
    pub last_inbound_ms: Option<u64>,
}

/// The interface egress calls.
pub trait Contacts: Send + Sync + 'static {
    fn get(&self, phone_number_id: &str, wa_id: &str) -> ContactState;
    fn set_consent(&self, phone_number_id: &str, wa_id: &str, consent: Consent);
    fn set_marketing(&self, phone_number_id: &str, wa_id: &str, marketing: Marketing);
    fn record_inbound(&self, phone_number_id: &str, wa_id: &str, at_ms: u64);
    fn erase(&self, phone_number_id: &str, wa_id: &str);
}

/// A pair as two integers. Ids of 1–16 ASCII digits (every id Meta sends:
/// E.164 numbers have at most 15, phone number ids 15–16) are packed one
/// digit per nibble; anything else is folded into a hash so it still works.
/// The integers live only in memory (never stored or compared across
/// processes), so only their uniqueness matters, not their value.
pub fn pair_key(phone_number_id: &str, wa_id: &str) -> (u64, u64) {
    (digits_or_hash(phone_number_id), digits_or_hash(wa_id))
}

/// The top nibble of every hashed id: never the top nibble of a packed one
/// (a digit, or 0xF after a shorter id), so the two kinds cannot collide.
const HASHED: u64 = 0xE << 60;

fn digits_or_hash(s: &str) -> u64 {
    let d = s.trim_start_matches('+').as_bytes();
    if let Some(n) = pack_digits(d) {
        n
    } else {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        s.hash(&mut h);
        (h.finish() & !(0xF << 60)) | HASHED
    }
}

/// 1–16 ASCII digits packed one per nibble, the first in the lowest, the
/// nibbles past the last digit set to 0xF (not a digit: ids of different
/// lengths stay distinct); else `None`. Eight digits at a time (SWAR) with
/// shifts only: a lookup packs two ids, and parsing them as decimal numbers
/// (multiplies) was a third of a lookup's cost.
fn pack_digits(d: &[u8]) -> Option<u64> {
    const ZEROS: u64 = 0x3030_3030_3030_3030;
    // Digit values of eight ASCII bytes, or None if one is not a digit:
    // neither x - '0' nor x + ('0' + 128 - ':') may set a byte's high bit
    // (a byte that would borrow or carry sets its own high bit first, so
    // the test is exact).
    let values = |x: u64| {
        let below = x.wrapping_sub(ZEROS);
        let above = x.wrapping_add(0x4646_4646_4646_4646);
        ((below | above) & 0x8080_8080_8080_8080 == 0).then_some(below)
    };
    // Eight values (0–9, one per byte) into eight nibbles, in order.
    let pack = |v: u64| {
        let v = (v | (v >> 4)) & 0x00ff_00ff_00ff_00ff;
        let v = (v | (v >> 8)) & 0x0000_ffff_0000_ffff;
        (v | (v >> 16)) & 0xffff_ffff
    };
    let eight = |b: &[u8]| u64::from_le_bytes(b.try_into().expect("8 bytes"));
    let len = d.len();
    match len {
        1..=7 => {
            let mut n = u64::MAX;
            for (i, &b) in d.iter().enumerate() {
                if !b.is_ascii_digit() {
                    return None;
                }
                n = (n & !(0xF << (4 * i))) | (u64::from(b - b'0') << (4 * i));
            }
            Some(n)
        }
        8..=16 => {
            let low = pack(values(eight(&d[..8]))?);
            // The last eight bytes (overlapping the first eight when
            // len < 16): their top len - 8 nibbles are the remaining digits.
            let r = len - 8;
            let last = pack(values(eight(&d[len - 8..]))?);
            let rest = (last >> (4 * (8 - r))) | ((0xffff_ffff << (4 * r)) & 0xffff_ffff);
            Some(low | (rest << 32))
        }
        _ => None,
    }
}

/// A hint to bring the cache line at address `addr` into L1; a no-op where
/// the architecture has no such hint here.
#[inline(always)]
#[allow(unsafe_code)]
fn prefetch(addr: usize) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: a prefetch is a hint: it never faults, whatever the address,
    // and reads nothing into the program.
    unsafe {
        std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(
            std::ptr::without_provenance::<i8>(addr),
        );
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = addr;
}

/// As [`prefetch`], asking for the line in a state this core may write
/// (PREFETCHW): for a lock word the next instruction will update. Written
/// as the instruction itself: `_mm_prefetch` with a write hint becomes a
/// plain read prefetch unless the whole build targets `prfchw`, and CPUs
/// without PREFETCHW execute its encoding as a no-op.
#[inline(always)]
#[allow(unsafe_code)]
fn prefetch_for_write(addr: usize) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: a prefetch is a hint: it never faults, whatever the address,
    // reads nothing into the program and writes nothing.
    unsafe {
        std::arch::asm!(
            "prefetchw [{0}]",
            in(reg) addr,
            options(nostack, preserves_flags, readonly)
        );
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = addr;
}

#[derive(Debug, Clone, Copy, Default)]
struct Packed(u64);

impl Packed {
    fn unpack(self) -> ContactState {
        let consent = match self.0 & 0b11 {
            1 => Consent::OptedIn,
            2 => Consent::OptedOut,
            _ => Consent::Unknown,
        };
        let marketing = if self.0 & 0b100 != 0 {
            Marketing::Stopped
        } else {
            Marketing::Allowed
        };
        let secs = self.0 >> 3;
        ContactState {
            consent,
            marketing,
            last_inbound_ms: (secs != 0).then_some(secs * 1000),
        }
    }
    fn pack(s: ContactState) -> Packed {
        let c = match s.consent {
            Consent::OptedIn => 1,
            Consent::OptedOut => 2,
            Consent::Unknown => 0,
        };
        let m = if s.marketing == Marketing::Stopped {
            0b100
        } else {
            0
        };
        let secs = s.last_inbound_ms.map(|ms| ms / 1000).unwrap_or(0);
        Packed(c | m | (secs << 3))
    }
}

/// The in-memory cache. dashmap's default shard count (4 × cores) is kept:
/// with 256 shards two threads' lookups were slower (190 against 155 ns),
/// the lock words then missing the caches more than they bounced.
pub struct MemoryContacts {
    map: DashMap<(u64, u64), Packed, foldhash::fast::RandomState>,
    /// Per shard, where its table was at the last insert: the address of
    /// the end of its buckets (= start of its control bytes) and its bucket
    /// mask. Readers use it to prefetch before they take the shard's lock;
    /// a stale value only makes a prefetch useless, never wrong.
    homes: Box<[Home]>,
}

#[derive(Default)]
struct Home {
    data_end: AtomicUsize,
    mask: AtomicUsize,
}

/// What a shard's table holds per pair.
type Slot = ((u64, u64), dashmap::SharedValue<Packed>);

impl Default for MemoryContacts {
    fn default() -> MemoryContacts {
        let map = DashMap::with_hasher(foldhash::fast::RandomState::default());
        let homes = map.shards().iter().map(|_| Home::default()).collect();
        MemoryContacts { map, homes }
    }
}

impl MemoryContacts {
    pub fn new() -> MemoryContacts {
        MemoryContacts::default()
    }

    /// Number of (business number, user) pairs held.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// The state of a pair, or `None` when nothing is known about it.
    pub fn lookup(&self, phone_number_id: &str, wa_id: &str) -> Option<ContactState> {
        self.read(pair_key(phone_number_id, wa_id))
            .map(Packed::unpack)
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    fn hash(&self, key: (u64, u64)) -> (u64, usize) {
        use std::hash::BuildHasher;
        let hash = self.map.hasher().hash_one(key);
        (hash, self.map.determine_shard(hash as usize))
    }

    /// The read path: dashmap's own lookup (same hash, same shard, same
    /// probe), with the two cache lines it will touch prefetched together
    /// before the shard's lock is taken: the control-byte group at the
    /// key's home slot and the home bucket. hashbrown loads them one after
    /// the other (the bucket's address depends on the control byte that
    /// matched), so in a table far larger than the caches a lookup would
    /// otherwise pay two misses in series, after the lock. Most keys sit in
    /// or next to their home bucket.
    fn read(&self, key: (u64, u64)) -> Option<Packed> {
        let (hash, shard) = self.hash(key);
        self.prefetch_home(hash, shard);
        let table = self.map.shards()[shard].read();
        table.get(hash, |(k, _)| *k == key).map(|(_, v)| *v.get())
    }

    /// Starts loading the two cache lines a lookup or update of this pair
    /// touches first (see `read`). A reader applying a batch of records
    /// calls it a few records ahead, so the misses of several records
    /// overlap instead of coming one after the other.
    pub fn prefetch_pair(&self, phone_number_id: &str, wa_id: &str) {
        let (hash, shard) = self.hash(pair_key(phone_number_id, wa_id));
        self.prefetch_home(hash, shard);
    }

    #[inline]
    fn prefetch_home(&self, hash: u64, shard: usize) {
        // The shard's lock word (and the table's header beside it): taking
        // the read lock writes it, and under two threads its line is often
        // in the other core's cache; fetched for writing, its transfer
        // overlaps the table's misses.
        prefetch_for_write(std::ptr::from_ref(&self.map.shards()[shard]) as usize);
        let home = &self.homes[shard];
        let (end, mask) = (
            home.data_end.load(Ordering::Relaxed),
            home.mask.load(Ordering::Relaxed),
        );
        let slot = hash as usize & mask;
        // Bucket i ends at data_end - i * size (buckets are laid out
        // downwards); the control bytes start at data_end. Plain integer
        // arithmetic: the address may be stale, and a prefetch never faults.
        prefetch(end.wrapping_add(slot));
        prefetch(end.wrapping_sub((slot + 1) * std::mem::size_of::<Slot>()));
    }

    /// Read-modify-write of one pair under its shard's write lock. An entry
    /// left with nothing known (after tombstones) is removed, and none is
    /// created for it.
    fn update(&self, phone_number_id: &str, wa_id: &str, f: impl FnOnce(&mut ContactState)) {
        let key = pair_key(phone_number_id, wa_id);
        let (hash, shard) = self.hash(key);
        let mut table = self.map.shards()[shard].write();
        let eq = |(k, _): &Slot| *k == key;
        if let Some((_, v)) = table.get_mut(hash, eq) {
            let v = v.get_mut();
            let mut s = v.unpack();
            f(&mut s);
            *v = Packed::pack(s);
            if v.0 == 0 {
                table.remove_entry(hash, eq);
            }
            return;
        }
        let mut s = ContactState::default();
        f(&mut s);
        let v = Packed::pack(s);
        if v.0 != 0 {
            let hasher = self.map.hasher();
            table.insert(hash, (key, dashmap::SharedValue::new(v)), |(k, _)| {
                std::hash::BuildHasher::hash_one(hasher, *k)
            });
            self.note_home(
                shard,
                table.data_end().as_ptr() as usize,
                table.buckets() - 1,
            );
        }
    }

    /// Records where a shard's table is, after an insert that may have
    /// moved it (the stores are skipped when nothing changed, so readers'
    /// cached copies stay valid).
    fn note_home(&self, shard: usize, end: usize, mask: usize) {
        let home = &self.homes[shard];
        if home.data_end.load(Ordering::Relaxed) != end {
            home.data_end.store(end, Ordering::Relaxed);
        }
        if home.mask.load(Ordering::Relaxed) != mask {
            home.mask.store(mask, Ordering::Relaxed);
        }
    }

    pub fn set_preferences(
        &self,
        phone_number_id: &str,
        wa_id: &str,
        consent: Consent,
        marketing: Marketing,
    ) {
        self.update(phone_number_id, wa_id, |s| {
            s.consent = consent;
            s.marketing = marketing;
        });
    }

    /// Forgets consent and marketing preference (a `wa.consent` tombstone).
    pub fn clear_consent(&self, phone_number_id: &str, wa_id: &str) {
        self.update(phone_number_id, wa_id, |s| {
            s.consent = Consent::Unknown;
            s.marketing = Marketing::Allowed;
        });
    }

    /// Forgets the last inbound time (a `wa.windows` tombstone).
    pub fn clear_window(&self, phone_number_id: &str, wa_id: &str) {
        self.update(phone_number_id, wa_id, |s| s.last_inbound_ms = None);
    }
}

impl Contacts for MemoryContacts {
    fn get(&self, phone_number_id: &str, wa_id: &str) -> ContactState {
        self.read(pair_key(phone_number_id, wa_id))
            .map(Packed::unpack)
            .unwrap_or_default()
    }
    fn set_consent(&self, phone_number_id: &str, wa_id: &str, consent: Consent) {
        self.update(phone_number_id, wa_id, |s| s.consent = consent);
    }
    fn set_marketing(&self, phone_number_id: &str, wa_id: &str, marketing: Marketing) {
        self.update(phone_number_id, wa_id, |s| s.marketing = marketing);
    }
    fn record_inbound(&self, phone_number_id: &str, wa_id: &str, at_ms: u64) {
        self.update(phone_number_id, wa_id, |s| {
            if s.last_inbound_ms.is_none_or(|t| t < at_ms) {
                s.last_inbound_ms = Some(at_ms);
            }
        });
    }
    fn erase(&self, phone_number_id: &str, wa_id: &str) {
        self.map.remove(&pair_key(phone_number_id, wa_id));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_erases() {
        let c = MemoryContacts::new();
        assert_eq!(c.get("1", "+5511"), ContactState::default());
        c.set_consent("1", "5511", Consent::OptedOut);
        c.set_marketing("1", "5511", Marketing::Stopped);
        c.record_inbound("1", "5511", 1_781_600_000_000);
        c.record_inbound("1", "5511", 1_700_000_000_000); // older: ignored
        let s = c.get("1", "+5511");
        assert_eq!(s.consent, Consent::OptedOut);
        assert_eq!(s.marketing, Marketing::Stopped);
        assert_eq!(s.last_inbound_ms, Some(1_781_600_000_000));
        assert_eq!(c.get("2", "5511"), ContactState::default());
        c.erase("1", "5511");
        assert!(c.is_empty());
    }

    /// The raw read and write paths (prefetch, own insert and removal)
    /// against a std HashMap model, through many table growths, with
    /// entries emptied and removed on the way.
    #[test]
    fn matches_a_model_through_growth_and_removal() {
        use std::collections::HashMap;
        let c = MemoryContacts::new();
        let mut model: HashMap<(String, String), ContactState> = HashMap::new();
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        for i in 0..200_000u64 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let (n, u) = (format!("10{}", x % 7), format!("55{}", (x >> 8) % 60_000));
            let e = model.entry((n.clone(), u.clone())).or_default();
            match (x >> 40) % 5 {
                0 => {
                    c.set_consent(&n, &u, Consent::OptedOut);
                    e.consent = Consent::OptedOut;
                }
                1 => {
                    c.set_marketing(&n, &u, Marketing::Stopped);
                    e.marketing = Marketing::Stopped;
                }
                2 => {
                    c.record_inbound(&n, &u, 1_000 * i + 1_000);
                    e.last_inbound_ms = Some(1_000 * i + 1_000);
                }
                3 => {
                    c.clear_consent(&n, &u);
                    e.consent = Consent::Unknown;
                    e.marketing = Marketing::Allowed;
                }
                _ => {
                    c.clear_window(&n, &u);
                    e.last_inbound_ms = None;
                }
            }
            if *e == ContactState::default() {
                model.remove(&(n, u));
            }
        }
        assert_eq!(c.len(), model.len());
        for ((n, u), want) in &model {
            assert_eq!(c.lookup(n, u), Some(*want), "{n} {u}");
        }
        // Pairs never written, and pairs emptied by tombstones: nothing.
        assert_eq!(c.lookup("11", "55"), None);
        for k in 0..60_000u64 {
            let (n, u) = ("100".to_string(), format!("55{k}"));
            assert_eq!(
                c.lookup(&n, &u),
                model.get(&(n.clone(), u.clone())).copied()
            );
        }
    }

    /// The packing, one digit at a time.
    fn slow(d: &[u8]) -> Option<u64> {
        ((1..=16).contains(&d.len()) && d.iter().all(u8::is_ascii_digit)).then(|| {
            d.iter().enumerate().fold(u64::MAX, |n, (i, b)| {
                (n & !(0xF << (4 * i))) | (u64::from(b - b'0') << (4 * i))
            })
        })
    }

    #[test]
    fn digit_packing_edges() {
        for s in [
            "0",
            "9",
            "1234567",
            "12345678",
            "123456789",
            "1234567890123456",
            "14155550123",
            "109876543210987",
            "9999999999999999",
            "99999999999999999",
            "",
            "1234567/",
            "1234567:",
            "12345678a",
            "123456789012345/",
            "/0000000",
            "\u{ff}1234567",
        ] {
            assert_eq!(pack_digits(s.as_bytes()), slow(s.as_bytes()), "{s:?}");
        }
        assert_eq!(pack_digits(b"1"), Some(0xFFFF_FFFF_FFFF_FFF1));
        assert_eq!(
            pack_digits(b"1234567890123456"),
            Some(0x6543_2109_8765_4321)
        );
        assert_ne!(pair_key("", "0"), pair_key("", "00"));
        assert_eq!(pair_key("+14155550123", "1"), pair_key("14155550123", "1"));
        assert_eq!(digits_or_hash("12345678901234567") >> 60, 0xE);
        assert_eq!(digits_or_hash("abc") >> 60, 0xE);
    }

    proptest::proptest! {
        #[test]
        fn digit_packing_matches_the_byte_loop(d in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..24),
                                               digits in "[0-9]{1,21}") {
            proptest::prop_assert_eq!(pack_digits(&d), slow(&d));
            proptest::prop_assert_eq!(pack_digits(digits.as_bytes()), slow(digits.as_bytes()));
        }

        #[test]
        fn distinct_ids_get_distinct_keys(a in "[0-9]{1,16}", b in "[0-9]{1,16}", other in "[0-9]{17,20}|.*[^0-9+].*") {
            let (ka, kb) = (digits_or_hash(&a), digits_or_hash(&b));
            proptest::prop_assert_eq!(ka == kb, a == b);
            // Packed ids never land in the hashed ids' range.
            proptest::prop_assert_ne!(ka >> 60, 0xE);
            proptest::prop_assert_eq!(digits_or_hash(&other) >> 60, 0xE);
        }
    }
}
