//! Offsets in progress and done per partition, and the commit point.

use super::*;

/// Offsets in progress and done, per partition. Also recognises a request
/// consumed again after a rebalance while it is still in progress (or done
/// but not yet committed), so it is not sent twice.
#[derive(Default)]
pub(super) struct Tracker {
    parts: HashMap<i32, Part>,
}

#[derive(Default)]
struct Part {
    pending: BTreeSet<i64>,
    done: BTreeSet<i64>,
    /// Dropped unsent when the partition was revoked: never committed past.
    abandoned: BTreeSet<i64>,
    next: i64,
    committed: i64,
}

impl Tracker {
    /// Registers an offset; false if it is already known (redelivered).
    pub(super) fn add(&mut self, p: i32, o: i64) -> bool {
        let part = self.parts.entry(p).or_default();
        if o < part.committed || part.pending.contains(&o) || part.done.contains(&o) {
            return false;
        }
        part.pending.insert(o);
        part.next = part.next.max(o + 1);
        true
    }
    pub(super) fn done(&mut self, p: i32, o: i64) {
        if let Some(part) = self.parts.get_mut(&p) {
            if part.pending.remove(&o) {
                part.done.insert(o);
            }
        }
    }
    /// A request of a revoked partition dropped before it was sent: its
    /// offset is left for the partition's next owner.
    pub(super) fn abandon(&mut self, p: i32, o: i64) {
        if let Some(part) = self.parts.get_mut(&p) {
            if part.pending.remove(&o) {
                part.abandoned.insert(o);
            }
        }
    }
    /// Requests of partition `p` still being worked on.
    pub(super) fn pending(&self, p: i32) -> usize {
        self.parts.get(&p).map_or(0, |part| part.pending.len())
    }
    /// The offset to commit for a revoked partition, and forgets it.
    pub(super) fn release(&mut self, p: i32) -> Option<i64> {
        let part = self.parts.remove(&p)?;
        let upto = [part.pending.first(), part.abandoned.first()]
            .into_iter()
            .flatten()
            .min()
            .copied()
            .unwrap_or(part.next);
        (upto > part.committed).then_some(upto)
    }
    /// Offsets safe to commit (first pending, or one past the last seen) that
    /// moved since the last call.
    pub(super) fn take_commits(&mut self) -> Vec<(i32, i64)> {
        let mut out = Vec::new();
        for (p, part) in self.parts.iter_mut() {
            let upto = [part.pending.first(), part.abandoned.first()]
                .into_iter()
                .flatten()
                .min()
                .copied()
                .unwrap_or(part.next);
            if upto > part.committed {
                part.committed = upto;
                part.done = part.done.split_off(&upto);
                out.push((*p, upto));
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tracker_commits_contiguous_prefix_only() {
        let mut t = Tracker::default();
        for o in 10..15 {
            t.add(0, o);
        }
        t.done(0, 11);
        t.done(0, 12);
        assert_eq!(t.take_commits(), vec![(0, 10)]);
        t.done(0, 10);
        assert_eq!(t.take_commits(), vec![(0, 13)]);
        assert_eq!(t.take_commits(), vec![]);
        t.done(0, 13);
        // Redelivered after a rebalance: in progress, done, or committed.
        assert!(!t.add(0, 14));
        assert!(!t.add(0, 13));
        assert!(!t.add(0, 10));
        t.done(0, 14);
        assert_eq!(t.take_commits(), vec![(0, 15)]);
        assert!(t.add(0, 15));
    }

    #[test]
    fn a_revoked_partition_commits_before_its_first_unsent_request() {
        let mut t = Tracker::default();
        for o in 0..6 {
            t.add(1, o);
        }
        t.done(1, 0);
        t.done(1, 1);
        t.abandon(1, 2); // dropped unsent: the next owner sends it
        t.done(1, 3);
        assert_eq!(t.pending(1), 2);
        t.done(1, 4);
        t.abandon(1, 5);
        assert_eq!(t.pending(1), 0);
        // Never past the abandoned offset 2, though 3 and 4 are done.
        assert_eq!(t.take_commits(), vec![(1, 2)]);
        assert_eq!(t.release(1), None, "already committed up to 2");
        // Forgotten: consumed again later, it is new to this instance.
        assert!(t.add(1, 2));
        t.abandon(1, 2);
        assert_eq!(t.release(1), Some(2));
    }
}
