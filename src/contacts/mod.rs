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
pub mod links;
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

/// The interface the planes call. `user` is phone digits (`+` optional) or
/// a BSUID; every call acts on the *person*: the id given and the id linked
/// to it (DESIGN §10).
pub trait Contacts: Send + Sync + 'static {
    /// The person's state: both ids' states merged ([`merge`]).
    fn get(&self, phone_number_id: &str, user: &str) -> ContactState;
    fn set_consent(&self, phone_number_id: &str, user: &str, consent: Consent);
    fn set_marketing(&self, phone_number_id: &str, user: &str, marketing: Marketing);
    /// An inbound message from `user`: kept under that id alone (reads
    /// merge the person's ids, the later message winning).
    fn record_inbound(&self, phone_number_id: &str, user: &str, at_ms: u64);
    /// Forgets the person under every id, and their links.
    fn erase(&self, phone_number_id: &str, user: &str);
    /// The person's ids: `user` (without `+`) first, then the linked id.
    fn ids(&self, phone_number_id: &str, user: &str) -> Vec<String>;
    /// Links a phone and a BSUID as one person (see [`links`]); `cause` is
    /// the event they were seen in.
    fn link(
        &self,
        phone_number_id: &str,
        phone: &str,
        bsuid: &str,
        at_ms: u64,
        cause: &str,
    ) -> links::Linked;
    /// Removes `user`'s link; returns the id it was linked to.
    fn unlink(&self, phone_number_id: &str, user: &str) -> Option<String>;
    /// Forgets the state held under this one id (links not followed).
    fn clear(&self, phone_number_id: &str, user: &str);
    /// The state held under this one id (links not followed).
    fn own(&self, phone_number_id: &str, user: &str) -> ContactState;
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

/// The top bit of a packed entry: this id is linked to another (see
/// [`links`]); an id without it never costs a second lookup.
const LINKED: u64 = 1 << 63;

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
        let secs = (self.0 & !LINKED) >> 3;
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

/// One sharded table of packed states: dashmap's default shard count (4 ×
/// cores) is kept: with 256 shards two threads' lookups were slower (190
/// against 155 ns), the lock words then missing the caches more than they
/// bounced.
struct Table<K> {
    map: DashMap<K, Packed, foldhash::fast::RandomState>,
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

impl<K: Eq + std::hash::Hash + Copy> Default for Table<K> {
    fn default() -> Table<K> {
        let map = DashMap::with_hasher(foldhash::fast::RandomState::default());
        let homes = map.shards().iter().map(|_| Home::default()).collect();
        Table { map, homes }
    }
}

impl<K: Eq + std::hash::Hash + Copy> Table<K> {
    #[inline(always)]
    fn hash(&self, key: K) -> (u64, usize) {
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
    #[inline(always)]
    fn read(&self, key: K) -> Option<Packed> {
        let (hash, shard) = self.hash(key);
        self.prefetch_home(hash, shard);
        let table = self.map.shards()[shard].read();
        table.get(hash, |(k, _)| *k == key).map(|(_, v)| *v.get())
    }

    fn prefetch(&self, key: K) {
        let (hash, shard) = self.hash(key);
        self.prefetch_home(hash, shard);
    }

    #[inline(always)]
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
        prefetch(
            end.wrapping_sub((slot + 1) * std::mem::size_of::<(K, dashmap::SharedValue<Packed>)>()),
        );
    }

    /// Read-modify-write of one entry under its shard's write lock. An
    /// entry left with nothing known (after tombstones) is removed, and none
    /// is created for it.
    fn update(&self, key: K, f: impl FnOnce(&mut ContactState)) {
        let (hash, shard) = self.hash(key);
        let mut table = self.map.shards()[shard].write();
        let eq = |(k, _): &(K, dashmap::SharedValue<Packed>)| *k == key;
        if let Some((_, v)) = table.get_mut(hash, eq) {
            let v = v.get_mut();
            let mut s = v.unpack();
            f(&mut s);
            *v = Packed(Packed::pack(s).0 | (v.0 & LINKED));
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

    /// Sets or clears the [`LINKED`] bit of an entry (creating it, or
    /// removing it when nothing else is left).
    fn mark(&self, key: K, linked: bool) {
        let (hash, shard) = self.hash(key);
        let mut table = self.map.shards()[shard].write();
        let eq = |(k, _): &(K, dashmap::SharedValue<Packed>)| *k == key;
        if let Some((_, v)) = table.get_mut(hash, eq) {
            let v = v.get_mut();
            v.0 = if linked { v.0 | LINKED } else { v.0 & !LINKED };
            if v.0 == 0 {
                table.remove_entry(hash, eq);
            }
        } else if linked {
            let hasher = self.map.hasher();
            table.insert(
                hash,
                (key, dashmap::SharedValue::new(Packed(LINKED))),
                |(k, _)| std::hash::BuildHasher::hash_one(hasher, *k),
            );
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
}

/// Where one id's state lives: phones (and any other non-BSUID string) in
/// the table of two packed integers, BSUIDs in the table keyed by a
/// 128-bit hash of the id (see [`MemoryContacts`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Slot {
    Phone((u64, u64)),
    /// (number, the BSUID's 128-bit hash as two halves: three `u64`s, so a
    /// slot is 32 bytes, not the 48 a `u128` key's alignment would make it).
    Bsuid((u64, u64, u64)),
}

/// The in-memory cache: one entry per (business number, id), and the links
/// that make a phone and a BSUID one person.
///
/// Phone users cost what they always did: two packed integers and 8 bytes
/// of state. A BSUID (up to 131 characters) is keyed by a 128-bit hash,
/// two 64-bit foldhash hashes under independent per-process random seeds:
/// two different BSUIDs of one number share an entry with probability
/// about n² / 2¹²⁹, 1.5 × 10⁻²⁵ at n = 10 M pairs per number. The full
/// BSUID is kept only in the links (for the API's `ids` and re-addressing).
pub struct MemoryContacts {
    phones: Table<(u64, u64)>,
    bsuids: Table<(u64, u64, u64)>,
    seeds: (foldhash::fast::FixedState, foldhash::fast::FixedState),
    links: links::Links,
}

impl Default for MemoryContacts {
    fn default() -> MemoryContacts {
        let r = foldhash::fast::RandomState::default();
        use std::hash::BuildHasher;
        let (a, b) = (r.hash_one(1u8), r.hash_one(2u8));
        MemoryContacts {
            phones: Table::default(),
            bsuids: Table::default(),
            seeds: (
                foldhash::fast::FixedState::with_seed(a),
                foldhash::fast::FixedState::with_seed(b),
            ),
            links: links::Links::default(),
        }
    }
}

impl MemoryContacts {
    pub fn new() -> MemoryContacts {
        MemoryContacts::default()
    }

    /// Number of (business number, id) entries held.
    pub fn len(&self) -> usize {
        self.phones.map.len() + self.bsuids.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Number of links (people known by both a phone and a BSUID).
    pub fn links_len(&self) -> usize {
        self.links.len()
    }

    /// The 128-bit key of a BSUID.
    fn bsuid_hash(&self, bsuid: &str) -> (u64, u64) {
        use std::hash::BuildHasher;
        (self.seeds.0.hash_one(bsuid), self.seeds.1.hash_one(bsuid))
    }

    /// Where an id lives. Ids reach the cache checked (webhook fan-out,
    /// the API, SendRequest validation), so the shape of a BSUID's first
    /// three bytes (`CC.`, which no phone has) decides: one comparison, not
    /// a scan of up to 131 bytes on every lookup.
    #[inline(always)]
    fn slot(&self, phone_number_id: &str, user: &str) -> Slot {
        let b = user.as_bytes();
        if b.len() >= 4 && b[0].is_ascii_uppercase() && b[1].is_ascii_uppercase() && b[2] == b'.' {
            let (h1, h2) = self.bsuid_hash(user);
            Slot::Bsuid((digits_or_hash(phone_number_id), h1, h2))
        } else {
            Slot::Phone(pair_key(phone_number_id, user))
        }
    }

    #[inline(always)]
    fn read_slot(&self, slot: Slot) -> Option<Packed> {
        match slot {
            Slot::Phone(k) => self.phones.read(k),
            Slot::Bsuid(k) => self.bsuids.read(k),
        }
    }

    fn update_id(&self, phone_number_id: &str, user: &str, f: impl FnOnce(&mut ContactState)) {
        match self.slot(phone_number_id, user) {
            Slot::Phone(k) => self.phones.update(k, f),
            Slot::Bsuid(k) => self.bsuids.update(k, f),
        }
    }

    /// The state held under this one id (phone or BSUID), or `None` when
    /// nothing is known of it; links are not followed.
    pub fn lookup(&self, phone_number_id: &str, user: &str) -> Option<ContactState> {
        self.read_slot(self.slot(phone_number_id, user))
            .map(Packed::unpack)
    }

    /// Starts loading the two cache lines a lookup or update of this id
    /// touches first (see `Table::read`). A reader applying a batch of
    /// records calls it a few records ahead, so the misses of several
    /// records overlap instead of coming one after the other.
    pub fn prefetch_pair(&self, phone_number_id: &str, user: &str) {
        match self.slot(phone_number_id, user) {
            Slot::Phone(k) => self.phones.prefetch(k),
            Slot::Bsuid(k) => self.bsuids.prefetch(k),
        }
    }

    /// Sets consent and marketing of one id (a `wa.consent` record).
    pub fn set_preferences(
        &self,
        phone_number_id: &str,
        user: &str,
        consent: Consent,
        marketing: Marketing,
    ) {
        self.update_id(phone_number_id, user, |s| {
            s.consent = consent;
            s.marketing = marketing;
        });
    }

    /// Forgets consent and marketing preference of one id (a `wa.consent`
    /// tombstone).
    pub fn clear_consent(&self, phone_number_id: &str, user: &str) {
        self.update_id(phone_number_id, user, |s| {
            s.consent = Consent::Unknown;
            s.marketing = Marketing::Allowed;
        });
    }

    /// The last inbound time of one id (a `wa.windows` record).
    pub fn set_window(&self, phone_number_id: &str, user: &str, at_ms: u64) {
        self.update_id(phone_number_id, user, |s| {
            if s.last_inbound_ms.is_none_or(|t| t < at_ms) {
                s.last_inbound_ms = Some(at_ms);
            }
        });
    }

    /// Forgets the last inbound time of one id (a `wa.windows` tombstone).
    pub fn clear_window(&self, phone_number_id: &str, user: &str) {
        self.update_id(phone_number_id, user, |s| s.last_inbound_ms = None);
    }

    fn mark(&self, slot: Slot, linked: bool) {
        match slot {
            Slot::Phone(k) => self.phones.mark(k, linked),
            Slot::Bsuid(k) => self.bsuids.mark(k, linked),
        }
    }

    /// The state held under one slot and, when it is linked, the partner's
    /// id.
    fn entry(&self, slot: Slot) -> (ContactState, Option<String>) {
        match self.read_slot(slot) {
            None => (ContactState::default(), None),
            Some(p) => {
                let other = (p.0 & LINKED != 0)
                    .then(|| self.links.other(slot))
                    .flatten();
                (p.unpack(), other)
            }
        }
    }

    /// The ids of the person `user` is, this id first (a `+` dropped).
    fn person<'a>(&self, phone_number_id: &str, user: &'a str) -> Person<'a> {
        let user = user.strip_prefix('+').unwrap_or(user);
        let (_, other) = self.entry(self.slot(phone_number_id, user));
        Person { user, other }
    }

    /// Links a phone and a BSUID of one number as one person (a webhook
    /// that shows both, a `wa.users` record, an id change). What it replaced
    /// is returned (the caller writes tombstones for dropped links).
    /// `cause` is the event the link was seen in ("" for a replayed record).
    pub fn link(
        &self,
        phone_number_id: &str,
        phone: &str,
        bsuid: &str,
        at_ms: u64,
        cause: &str,
    ) -> links::Linked {
        let phone = phone.strip_prefix('+').unwrap_or(phone);
        let p = links::Id {
            slot: self.slot(phone_number_id, phone),
            text: phone,
        };
        let b = links::Id {
            slot: self.slot(phone_number_id, bsuid),
            text: bsuid,
        };
        let cause = if cause.is_empty() {
            0
        } else {
            use std::hash::BuildHasher;
            self.seeds.0.hash_one(cause) | 1
        };
        let r = self.links.link(p, b, at_ms, cause);
        if r.new {
            for s in &r.unlinked {
                self.mark(*s, false);
            }
            self.mark(p.slot, true);
            self.mark(b.slot, true);
        }
        r
    }

    /// Removes the link of `user` (either side); returns the partner id.
    pub fn unlink(&self, phone_number_id: &str, user: &str) -> Option<String> {
        let user = user.strip_prefix('+').unwrap_or(user);
        let slot = self.slot(phone_number_id, user);
        let (other, id) = self.links.forget(slot)?;
        self.mark(slot, false);
        self.mark(other, false);
        Some(id)
    }

    /// The person's state read as egress reads it; `None` when nothing is
    /// known under any of their ids.
    pub fn lookup_person(&self, phone_number_id: &str, user: &str) -> Option<ContactState> {
        let p = self.person(phone_number_id, user);
        let states: Vec<ContactState> = p
            .ids()
            .filter_map(|id| self.lookup(phone_number_id, id))
            .collect();
        states.into_iter().reduce(merge)
    }
}

/// One person's ids at one business number.
struct Person<'a> {
    user: &'a str,
    other: Option<String>,
}

impl Person<'_> {
    fn ids(&self) -> impl Iterator<Item = &str> {
        std::iter::once(self.user).chain(self.other.as_deref())
    }
}

/// Two ids' states as one person's: an opt-out or a marketing stop under
/// either wins (a STOP is never lost to the id it was not sent under),
/// else an opt-in under either; the later inbound message.
pub fn merge(a: ContactState, b: ContactState) -> ContactState {
    let consent = match (a.consent, b.consent) {
        (Consent::OptedOut, _) | (_, Consent::OptedOut) => Consent::OptedOut,
        (Consent::OptedIn, _) | (_, Consent::OptedIn) => Consent::OptedIn,
        _ => Consent::Unknown,
    };
    let marketing = if a.marketing == Marketing::Stopped || b.marketing == Marketing::Stopped {
        Marketing::Stopped
    } else {
        Marketing::Allowed
    };
    ContactState {
        consent,
        marketing,
        last_inbound_ms: a.last_inbound_ms.max(b.last_inbound_ms),
    }
}

impl Contacts for MemoryContacts {
    #[inline]
    fn get(&self, phone_number_id: &str, user: &str) -> ContactState {
        // A phone (digits, or `+` first) is never a BSUID (a capital
        // first): one table, one lookup, as before BSUIDs.
        let slot = match user.as_bytes().first() {
            Some(b'0'..=b'9' | b'+') => Slot::Phone(pair_key(phone_number_id, user)),
            _ => self.slot(phone_number_id, user),
        };
        let Some(p) = self.read_slot(slot) else {
            return ContactState::default();
        };
        if p.0 & LINKED == 0 {
            return p.unpack();
        }
        // Linked: the partner's state, by its slot (nothing allocated).
        match self.links.partner(slot).and_then(|s| self.read_slot(s)) {
            Some(q) => merge(p.unpack(), q.unpack()),
            None => p.unpack(),
        }
    }
    fn set_consent(&self, phone_number_id: &str, user: &str, consent: Consent) {
        for id in self.person(phone_number_id, user).ids() {
            self.update_id(phone_number_id, id, |s| s.consent = consent);
        }
    }
    fn set_marketing(&self, phone_number_id: &str, user: &str, marketing: Marketing) {
        for id in self.person(phone_number_id, user).ids() {
            self.update_id(phone_number_id, id, |s| s.marketing = marketing);
        }
    }
    fn record_inbound(&self, phone_number_id: &str, user: &str, at_ms: u64) {
        // Under the id it came from only: a read merges the person's ids
        // (the later inbound wins), so the window is open for both.
        let user = user.strip_prefix('+').unwrap_or(user);
        self.set_window(phone_number_id, user, at_ms);
    }
    fn erase(&self, phone_number_id: &str, user: &str) {
        let p = self.person(phone_number_id, user);
        self.unlink(phone_number_id, user);
        for id in p.ids() {
            match self.slot(phone_number_id, id) {
                Slot::Phone(k) => drop(self.phones.map.remove(&k)),
                Slot::Bsuid(k) => drop(self.bsuids.map.remove(&k)),
            }
        }
    }
    fn ids(&self, phone_number_id: &str, user: &str) -> Vec<String> {
        self.person(phone_number_id, user)
            .ids()
            .map(str::to_string)
            .collect()
    }
    fn link(
        &self,
        phone_number_id: &str,
        phone: &str,
        bsuid: &str,
        at_ms: u64,
        cause: &str,
    ) -> links::Linked {
        MemoryContacts::link(self, phone_number_id, phone, bsuid, at_ms, cause)
    }
    fn unlink(&self, phone_number_id: &str, user: &str) -> Option<String> {
        MemoryContacts::unlink(self, phone_number_id, user)
    }
    fn own(&self, phone_number_id: &str, user: &str) -> ContactState {
        let user = user.strip_prefix('+').unwrap_or(user);
        self.lookup(phone_number_id, user).unwrap_or_default()
    }
    fn clear(&self, phone_number_id: &str, user: &str) {
        let user = user.strip_prefix('+').unwrap_or(user);
        self.clear_consent(phone_number_id, user);
        self.clear_window(phone_number_id, user);
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

    #[test]
    fn bsuids_have_entries_of_their_own_and_links_make_one_person() {
        let c = MemoryContacts::new();
        c.set_consent("1", "BR.5511", Consent::OptedOut);
        assert_eq!(c.lookup("1", "BR.5511").unwrap().consent, Consent::OptedOut);
        // A BSUID is never read as the phone its digits spell.
        assert_eq!(c.lookup("1", "5511"), None);
        assert_eq!(c.lookup("1", "BR.5512"), None);
        assert_eq!(c.lookup("2", "BR.5511"), None);
        c.record_inbound("1", "5511", 5_000_000);
        assert_eq!(c.get("1", "5511").consent, Consent::Unknown);
        assert!(c.link("1", "+5511", "BR.5511", 1, "wamid.1").new);
        for id in ["5511", "+5511", "BR.5511"] {
            let st = c.get("1", id);
            assert_eq!(st.consent, Consent::OptedOut, "{id}");
            assert_eq!(st.last_inbound_ms, Some(5_000_000), "{id}");
        }
        assert_eq!(c.ids("1", "+5511"), ["5511", "BR.5511"]);
        // A START under one id after the link reaches both.
        c.set_consent("1", "5511", Consent::OptedIn);
        assert_eq!(c.own("1", "BR.5511").consent, Consent::OptedIn);
        // The link bit never leaks into the state.
        assert_eq!(c.own("1", "5511").last_inbound_ms, Some(5_000_000));
        assert_eq!(c.unlink("1", "BR.5511").as_deref(), Some("5511"));
        assert_eq!(c.ids("1", "5511"), ["5511"]);
        // Unlinked, each id has only what was written under it.
        assert_eq!(c.get("1", "BR.5511").last_inbound_ms, None);
        assert_eq!(c.get("1", "5511").last_inbound_ms, Some(5_000_000));
        c.link("1", "5511", "BR.5511", 2, "wamid.2");
        Contacts::erase(&c, "1", "BR.5511");
        assert!(c.is_empty(), "erasing the person removes both ids");
        assert_eq!(c.links_len(), 0);
        // Phone users cost what they did: 16 bytes of key, 8 of state;
        // BSUID users 24 and 8.
        assert_eq!(
            std::mem::size_of::<((u64, u64), dashmap::SharedValue<Packed>)>(),
            24
        );
        assert_eq!(
            std::mem::size_of::<((u64, u64, u64), dashmap::SharedValue<Packed>)>(),
            32
        );
    }

    #[test]
    fn merge_keeps_every_stop() {
        let st = |consent, marketing, t| ContactState {
            consent,
            marketing,
            last_inbound_ms: t,
        };
        let a = st(Consent::OptedOut, Marketing::Allowed, Some(1));
        let b = st(Consent::OptedIn, Marketing::Stopped, Some(2));
        assert_eq!(
            merge(a, b),
            st(Consent::OptedOut, Marketing::Stopped, Some(2))
        );
        assert_eq!(merge(b, a), merge(a, b));
        let u = ContactState::default();
        assert_eq!(merge(u, b), b);
        assert_eq!(merge(u, u), u);
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
