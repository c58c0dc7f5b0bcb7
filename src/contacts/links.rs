//! Which phone and which BSUID are one person, per business number (DESIGN
//! §10; the rules are in ARCHITECTURE.md, "Identity").
//!
//! A link is learned when one webhook item names a phone and a BSUID
//! together, or from an id change Meta reports. Each id has at most one
//! partner: a newer observation replaces an older one (a phone re-assigned
//! to another person shows up with a new BSUID; a BSUID is never shared by
//! two phones at once), and the replaced partner is unlinked. Links are
//! durable on the compacted `wa.users` topic, keyed `{phone_number_id}:{bsuid}`
//! (see [`super::records::UserRecord`]).

use dashmap::DashMap;

use super::Slot;

/// One direction of a link: the partner id (in full: the API answers with
/// it and sends are re-addressed to it), its cache slot, and when the link
/// was learned (the record's `updated_at_ms`; replaying an older record
/// never undoes a newer one).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Partner {
    id: Box<str>,
    slot: Slot,
    at_ms: u64,
    /// A hash of the event the link was learned from (0: a replayed
    /// record): the same webhook delivered again reports the link as new
    /// once more, so a record lost with a failed delivery is written by
    /// the retry.
    cause: u64,
}

/// The links of every number, both directions (a phone finds its BSUID and
/// a BSUID its phone), keyed by the ids' cache slots (numbers, never
/// strings: a lookup allocates nothing).
#[derive(Default)]
pub struct Links {
    map: DashMap<Slot, Partner, foldhash::fast::RandomState>,
}

/// What [`Links::link`] changed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Linked {
    /// The link did not exist before (or replaced another).
    pub new: bool,
    /// Links replaced by this one, as (phone, BSUID).
    pub dropped: Vec<(String, String)>,
    /// Slots that lost their partner.
    pub(super) unlinked: Vec<Slot>,
}

/// One id of a link: its slot and its text.
#[derive(Debug, Clone, Copy)]
pub(super) struct Id<'a> {
    pub slot: Slot,
    pub text: &'a str,
}

impl Links {
    /// Number of links (people with both ids known).
    pub fn len(&self) -> usize {
        self.map.len() / 2
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// The slot of `slot`'s partner, if linked.
    pub(super) fn partner(&self, slot: Slot) -> Option<Slot> {
        self.map.get(&slot).map(|p| p.slot)
    }

    /// The other id of `slot`'s person, if linked.
    pub(super) fn other(&self, slot: Slot) -> Option<String> {
        self.map.get(&slot).map(|p| p.id.to_string())
    }

    /// Records that `phone` and `bsuid` are one person at `at_ms`. Older
    /// than a link either id already has (a record replayed out of order):
    /// nothing changes.
    pub(super) fn link(&self, phone: Id<'_>, bsuid: Id<'_>, at_ms: u64, cause: u64) -> Linked {
        // The common case, a link seen again: two lookups, nothing copied
        // (each guard is dropped before the next lookup).
        let peek = |slot: Slot| self.map.get(&slot).map(|p| (p.slot, p.at_ms, p.cause));
        let (a, b) = (peek(phone.slot), peek(bsuid.slot));
        if let (Some(a), Some(b)) = (a, b) {
            if a.0 == bsuid.slot && b.0 == phone.slot {
                return Linked {
                    new: cause != 0 && a.2 == cause,
                    ..Linked::default()
                };
            }
        }
        if a.is_some_and(|p| p.1 > at_ms) || b.is_some_and(|p| p.1 > at_ms) {
            return Linked::default();
        }
        let current = |slot: Slot| self.map.get(&slot).map(|p| p.clone());
        let (of_phone, of_bsuid) = (current(phone.slot), current(bsuid.slot));
        let mut out = Linked {
            new: true,
            ..Linked::default()
        };
        if let Some(p) = of_phone.filter(|p| p.slot != bsuid.slot) {
            self.map.remove(&p.slot);
            out.dropped.push((phone.text.to_string(), p.id.to_string()));
            out.unlinked.push(p.slot);
        }
        if let Some(p) = of_bsuid.filter(|p| p.slot != phone.slot) {
            self.map.remove(&p.slot);
            out.dropped.push((p.id.to_string(), bsuid.text.to_string()));
            out.unlinked.push(p.slot);
        }
        self.map.insert(
            phone.slot,
            Partner {
                id: bsuid.text.into(),
                slot: bsuid.slot,
                at_ms,
                cause,
            },
        );
        self.map.insert(
            bsuid.slot,
            Partner {
                id: phone.text.into(),
                slot: phone.slot,
                at_ms,
                cause,
            },
        );
        out
    }

    /// Removes the link of `slot` (either side); returns the partner's slot
    /// and id.
    pub(super) fn forget(&self, slot: Slot) -> Option<(Slot, String)> {
        let (_, p) = self.map.remove(&slot)?;
        self.map.remove(&p.slot);
        Some((p.slot, p.id.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(s: &str) -> Id<'_> {
        let n = s
            .bytes()
            .fold(0u64, |h, b| h.wrapping_mul(131) + u64::from(b));
        Id {
            slot: Slot::Bsuid((1, n, !n)),
            text: s,
        }
    }

    #[test]
    fn links_are_symmetric_and_one_partner_each_newest_wins() {
        let l = Links::default();
        let (p1, p2, a, b) = (id("5511"), id("5522"), id("BR.A"), id("BR.B"));
        assert!(l.link(p1, a, 10, 7).new);
        assert_eq!(l.other(p1.slot).as_deref(), Some("BR.A"));
        assert_eq!(l.other(a.slot).as_deref(), Some("5511"));
        // Seen again: nothing new; the same event delivered again: new
        // again (its record may have been lost with the failed delivery).
        assert_eq!(l.link(p1, a, 20, 8), Linked::default());
        assert!(l.link(p1, a, 20, 7).new);
        assert_eq!(l.link(p1, a, 20, 0), Linked::default());
        // The phone re-assigned to another person (a new BSUID): the old
        // BSUID loses its phone.
        let r = l.link(p1, b, 30, 9);
        assert!(r.new);
        assert_eq!(r.dropped, [("5511".to_string(), "BR.A".to_string())]);
        assert_eq!(r.unlinked, [a.slot]);
        assert_eq!(l.other(a.slot), None);
        assert_eq!(l.other(p1.slot).as_deref(), Some("BR.B"));
        // The BSUID seen with a second phone: the first phone is unlinked.
        let r = l.link(p2, b, 40, 10);
        assert_eq!(r.dropped, [("5511".to_string(), "BR.B".to_string())]);
        assert_eq!(l.other(p1.slot), None);
        assert_eq!(l.len(), 1);
        // An older record replayed late changes nothing.
        assert_eq!(l.link(p1, b, 35, 11), Linked::default());
        assert_eq!(l.other(b.slot).as_deref(), Some("5522"));
        assert_eq!(l.forget(b.slot), Some((p2.slot, "5522".to_string())));
        assert!(l.is_empty());
    }
}
