//! The watch history: the retained log of changes to the key space, part of the replicated
//! state, from which watches replay and reads at a past revision are answered.
//!
//! Every put, and every delete of a key that existed, appends one [`Change`] at its revision
//! (the Raft index of its entry), in revision order. The history is bounded by a number of
//! changes and by their bytes ([`HistoryLimits`]); when a new change would exceed either bound
//! the oldest changes are dropped and `compact_revision` rises to the revision of the last one
//! dropped. Every change with a revision above `compact_revision` is retained, so a watch may
//! start at any revision above it and a read may be answered at any revision at or above it.
//!
//! Compaction is a pure function of the applied entries and the limits: members with the same
//! limits retain the same changes. The history lives beside the map in [`crate::kv::KvState`],
//! so it is carried in every snapshot (a restarted member and a member that installs a snapshot
//! keep the changes before the snapshot index) and re-built from the log for entries after it.
//! It is an `imbl::Vector`, so cloning the state for a snapshot stays O(1).

use bytes::Bytes;
use imbl::Vector;

use crate::kv::KvValue;

/// Default bound on the number of retained changes.
pub const DEFAULT_MAX_CHANGES: usize = 100_000;
/// Default bound on the bytes of retained changes (keys, values and previous values).
pub const DEFAULT_MAX_BYTES: usize = 64 << 20;
/// What one change costs beyond its key and values: the vector slot, the revisions and the
/// `Bytes` headers. Counted so that a history of tiny changes is bounded in memory too.
const CHANGE_OVERHEAD: usize = 96;

/// How much history a member retains.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HistoryLimits {
    /// Most changes retained.
    pub max_changes: usize,
    /// Most bytes retained (see [`Change::cost`]).
    pub max_bytes: usize,
}

impl Default for HistoryLimits {
    fn default() -> Self {
        HistoryLimits {
            max_changes: DEFAULT_MAX_CHANGES,
            max_bytes: DEFAULT_MAX_BYTES,
        }
    }
}

/// One change to one key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    /// The revision (Raft index) of the entry that made it.
    pub revision: u64,
    /// The key.
    pub key: Bytes,
    /// The key's value after the change; `None` for a delete.
    pub after: Option<KvValue>,
    /// The key's value before the change; `None` when it did not exist. Kept so that watches
    /// can send `prev_value` and reads at a past revision can undo later changes.
    pub before: Option<KvValue>,
}

impl Change {
    /// The bytes this change counts against [`HistoryLimits::max_bytes`].
    pub fn cost(&self) -> usize {
        let value = |v: &Option<KvValue>| v.as_ref().map_or(0, |v| v.value.len());
        CHANGE_OVERHEAD + self.key.len() + value(&self.after) + value(&self.before)
    }
}

/// The revision asked for is no longer retained.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("revision {asked} is compacted; the history starts after revision {compact_revision}")]
pub struct Compacted {
    /// The revision asked for.
    pub asked: u64,
    /// The history's compact revision at the time.
    pub compact_revision: u64,
}

/// A page of changes read from the history.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Page {
    /// The matching changes, ascending.
    pub changes: Vec<Change>,
    /// Every change up to and including this revision was examined: the next page starts after it.
    pub through: u64,
}

/// The retained changes.
#[derive(Debug, Clone, Default)]
pub struct History {
    changes: Vector<Change>,
    bytes: usize,
    compact_revision: u64,
    limits: HistoryLimits,
}

impl History {
    /// A history that has lost everything up to `compact_revision` (a state restored from a
    /// snapshot format that carried no history).
    pub fn compacted_at(compact_revision: u64) -> Self {
        History {
            compact_revision,
            ..Default::default()
        }
    }

    /// Rebuilds a history from retained changes (read from a snapshot), ascending.
    pub fn from_parts(compact_revision: u64, changes: impl IntoIterator<Item = Change>) -> Self {
        let changes: Vector<Change> = changes.into_iter().collect();
        let bytes = changes.iter().map(Change::cost).sum();
        History {
            changes,
            bytes,
            compact_revision,
            limits: HistoryLimits::default(),
        }
    }

    /// Sets the bounds, compacting at once if the history exceeds them.
    pub fn set_limits(&mut self, limits: HistoryLimits) {
        self.limits = limits;
        self.enforce_limits();
    }

    /// The bounds in force.
    pub fn limits(&self) -> HistoryLimits {
        self.limits
    }

    /// Every change at or below this revision was dropped; every one above it is retained.
    pub fn compact_revision(&self) -> u64 {
        self.compact_revision
    }

    /// How many changes are retained.
    pub fn len(&self) -> usize {
        self.changes.len()
    }

    /// Whether no change is retained.
    pub fn is_empty(&self) -> bool {
        self.changes.is_empty()
    }

    /// The bytes of the retained changes.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// The retained changes, ascending.
    pub fn iter(&self) -> impl DoubleEndedIterator<Item = &Change> + ExactSizeIterator {
        self.changes.iter()
    }

    /// Appends a change; its revision must be above every retained one and above the compact
    /// revision (the state machine applies entries in index order).
    pub fn record(&mut self, change: Change) {
        debug_assert!(change.revision > self.compact_revision);
        debug_assert!(self.changes.last().is_none_or(|c| c.revision < change.revision));
        self.bytes += change.cost();
        self.changes.push_back(change);
        self.enforce_limits();
    }

    fn enforce_limits(&mut self) {
        while self.changes.len() > self.limits.max_changes
            || (self.bytes > self.limits.max_bytes && !self.changes.is_empty())
        {
            let dropped = self.changes.pop_front().expect("checked non-empty");
            self.bytes -= dropped.cost();
            self.compact_revision = dropped.revision;
        }
    }

    /// Position of the first retained change at or above `revision`.
    fn position(&self, revision: u64) -> usize {
        match self.changes.binary_search_by(|c| c.revision.cmp(&revision)) {
            Ok(i) | Err(i) => i,
        }
    }

    /// Checks that every change from `revision` on is retained.
    pub fn check_retained(&self, revision: u64) -> Result<(), Compacted> {
        if revision <= self.compact_revision {
            Err(Compacted {
                asked: revision,
                compact_revision: self.compact_revision,
            })
        } else {
            Ok(())
        }
    }

    /// The changes from revision `from` on (inclusive) whose key `matches`, at most `max` of
    /// them; `applied` is the state's applied index, which the page reaches when it is not cut
    /// short. Errors when changes from `from` on may have been dropped.
    pub fn read(
        &self,
        from: u64,
        applied: u64,
        matches: impl Fn(&[u8]) -> bool,
        max: usize,
    ) -> Result<Page, Compacted> {
        self.check_retained(from)?;
        let mut changes = Vec::new();
        for c in self.changes.iter().skip(self.position(from)) {
            if changes.len() == max {
                // Every change before `c` was examined.
                return Ok(Page {
                    through: c.revision - 1,
                    changes,
                });
            }
            if matches(&c.key) {
                changes.push(c.clone());
            }
        }
        Ok(Page {
            changes,
            through: applied.max(from.saturating_sub(1)),
        })
    }

    /// The retained changes with a revision above `revision`, ascending.
    pub fn after(&self, revision: u64) -> impl DoubleEndedIterator<Item = &Change> {
        self.changes.iter().skip(self.position(revision.saturating_add(1)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put(revision: u64, key: &str, value: &str, before: Option<KvValue>) -> Change {
        Change {
            revision,
            key: Bytes::copy_from_slice(key.as_bytes()),
            after: Some(KvValue {
                value: Bytes::copy_from_slice(value.as_bytes()),
                create_revision: before.as_ref().map_or(revision, |b| b.create_revision),
                mod_revision: revision,
            }),
            before,
        }
    }

    #[test]
    fn a_history_over_its_count_drops_the_oldest_and_raises_the_compact_revision() {
        let mut h = History::default();
        h.set_limits(HistoryLimits {
            max_changes: 3,
            max_bytes: usize::MAX,
        });
        for r in [2, 4, 5, 9] {
            h.record(put(r, "k", "v", None));
        }
        assert_eq!(h.len(), 3);
        assert_eq!(h.compact_revision(), 2);
        assert_eq!(h.iter().map(|c| c.revision).collect::<Vec<_>>(), vec![4, 5, 9]);
        assert!(h.check_retained(2).is_err());
        assert!(h.check_retained(3).is_ok(), "nothing happened at revision 3");
    }

    #[test]
    fn a_history_over_its_bytes_drops_the_oldest_until_it_fits() {
        let mut h = History::default();
        let one = put(1, "key", &"x".repeat(100), None).cost();
        h.set_limits(HistoryLimits {
            max_changes: usize::MAX,
            max_bytes: one * 2,
        });
        for r in 1..=5 {
            h.record(put(r, "key", &"x".repeat(100), None));
        }
        assert_eq!(h.len(), 2);
        assert_eq!(h.bytes(), one * 2);
        assert_eq!(h.compact_revision(), 3);
        // One change larger than the whole bound is still dropped, never kept over the bound.
        h.record(put(6, "key", &"x".repeat(one * 3), None));
        assert!(h.is_empty());
        assert_eq!((h.compact_revision(), h.bytes()), (6, 0));
    }

    #[test]
    fn reading_pages_examines_every_change_once_and_reaches_the_applied_index() {
        let mut h = History::default();
        for r in 1..=10 {
            h.record(put(r, if r.is_multiple_of(2) { "a/x" } else { "b/x" }, "v", None));
        }
        let matches = |k: &[u8]| k.starts_with(b"a/");
        let first = h.read(1, 12, matches, 2).unwrap();
        assert_eq!(first.changes.iter().map(|c| c.revision).collect::<Vec<_>>(), vec![2, 4]);
        assert_eq!(first.through, 4);
        let second = h.read(first.through + 1, 12, matches, 2).unwrap();
        assert_eq!(
            second.changes.iter().map(|c| c.revision).collect::<Vec<_>>(),
            vec![6, 8]
        );
        let third = h.read(second.through + 1, 12, matches, 2).unwrap();
        assert_eq!(third.changes.iter().map(|c| c.revision).collect::<Vec<_>>(), vec![10]);
        assert_eq!(third.through, 12);
        // A start beyond the applied index examines nothing and does not move backwards.
        assert_eq!(h.read(20, 12, matches, 2).unwrap().through, 19);
    }

    #[test]
    fn reading_from_a_compacted_revision_is_refused() {
        let mut h = History::default();
        h.set_limits(HistoryLimits {
            max_changes: 1,
            max_bytes: usize::MAX,
        });
        h.record(put(3, "k", "v", None));
        h.record(put(7, "k", "w", None));
        assert_eq!(
            h.read(3, 7, |_| true, 10).unwrap_err(),
            Compacted {
                asked: 3,
                compact_revision: 3
            }
        );
        assert_eq!(h.read(4, 7, |_| true, 10).unwrap().changes.len(), 1);
    }
}
