//! The Raft log as raft-rs reads it: the in-memory tail of the write-ahead log after the latest
//! snapshot, the hard state, and the latest snapshot's metadata.
//!
//! This is the read side only. Durability is the write-ahead log's job: the consensus loop writes
//! entries and hard state to the WAL and fsyncs before it updates this store and before any message
//! that depends on them leaves the node. The store is owned by the one thread that owns the
//! `RawNode`, so it needs no locking.

use std::cell::Cell;

use raft::prelude::{ConfState, Entry, HardState, Snapshot, SnapshotMetadata};
use raft::{GetEntriesContext, RaftState, Storage, StorageError};

/// Raft's view of the log.
#[derive(Debug, Default)]
pub struct LogStore {
    hard_state: HardState,
    /// The configuration Raft starts from: the one in the latest snapshot, because entries after it
    /// are re-applied on restart and re-applying a conf change must start from the state before it.
    conf_state: ConfState,
    /// The latest durable snapshot; what a lagging follower is sent.
    snapshot: SnapshotMetadata,
    /// (index, term) of the entry just before `entries[0]`.
    offset: (u64, u64),
    /// Entries after `offset`, contiguous.
    entries: Vec<Entry>,
    /// Set when Raft asked for a snapshot newer than `snapshot` (a new learner that the latest
    /// snapshot does not include, or a request index past it): the consensus loop then makes one.
    snapshot_wanted: Cell<bool>,
}

impl LogStore {
    /// A store that starts after `snapshot`, with `hard_state` and the recovered `entries`
    /// (all after the snapshot).
    pub fn new(snapshot: SnapshotMetadata, hard_state: HardState, entries: Vec<Entry>) -> Self {
        let mut store = LogStore {
            conf_state: snapshot.get_conf_state().clone(),
            offset: (snapshot.index, snapshot.term),
            snapshot,
            hard_state,
            entries: Vec::new(),
            snapshot_wanted: Cell::new(false),
        };
        store.append(&entries);
        if store.hard_state.commit < store.snapshot.index {
            store.hard_state.commit = store.snapshot.index;
        }
        store
    }

    /// The hard state as last set.
    pub fn hard_state(&self) -> &HardState {
        &self.hard_state
    }

    /// Replaces the hard state (after it is durable).
    pub fn set_hard_state(&mut self, hs: HardState) {
        self.hard_state = hs;
    }

    /// Records a newer commit index (Raft reports it after `advance`).
    pub fn set_commit(&mut self, commit: u64) {
        self.hard_state.commit = commit;
    }

    /// The latest snapshot's metadata.
    pub fn snapshot_metadata(&self) -> &SnapshotMetadata {
        &self.snapshot
    }

    /// Appends entries (after they are durable), replacing any existing suffix they conflict with.
    pub fn append(&mut self, entries: &[Entry]) {
        let Some(first) = entries.first() else { return };
        let first_index = first.index;
        assert!(
            first_index > self.offset.0,
            "append at {first_index} before the log start {}",
            self.offset.0 + 1
        );
        let keep = (first_index - self.offset.0 - 1) as usize;
        assert!(keep <= self.entries.len(), "append at {first_index} leaves a gap");
        self.entries.truncate(keep);
        self.entries.extend_from_slice(entries);
    }

    /// Replaces the whole log with a snapshot received from the leader (after it is durable).
    pub fn apply_snapshot(&mut self, meta: SnapshotMetadata) {
        self.entries.clear();
        self.offset = (meta.index, meta.term);
        if self.hard_state.commit < meta.index {
            self.hard_state.commit = meta.index;
        }
        if self.hard_state.term < meta.term {
            self.hard_state.term = meta.term;
        }
        self.conf_state = meta.get_conf_state().clone();
        self.snapshot = meta;
    }

    /// Records a locally created snapshot (after it is durable); the log is unchanged.
    pub fn set_snapshot(&mut self, meta: SnapshotMetadata) {
        if meta.index > self.snapshot.index {
            self.snapshot = meta;
        }
    }

    /// Drops entries up to and including `index`, never past the latest snapshot.
    pub fn compact(&mut self, index: u64) {
        let index = index.min(self.snapshot.index).min(self.last_index());
        if index <= self.offset.0 {
            return;
        }
        let drop = (index - self.offset.0) as usize;
        let term = self.entries[drop - 1].term;
        self.entries.drain(..drop);
        self.offset = (index, term);
    }

    /// The lowest index `compact` may drop up to so that the entries kept after it hold at
    /// most `max_bytes` of data, counting back from `index` (inclusive of nothing after it).
    pub fn compact_index_within(&self, index: u64, max_bytes: u64) -> u64 {
        let index = index.min(self.last_index());
        let mut kept = 0u64;
        let mut first_kept = index + 1;
        while first_kept > self.offset.0 + 1 {
            let e = &self.entries[(first_kept - 1 - self.offset.0 - 1) as usize];
            kept += e.data.len() as u64;
            if kept > max_bytes {
                break;
            }
            first_kept -= 1;
        }
        first_kept - 1
    }

    /// Whether Raft asked for a newer snapshot since the last call.
    pub fn take_snapshot_wanted(&self) -> bool {
        self.snapshot_wanted.replace(false)
    }

    /// Number of entries held in memory.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether no entries are held.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    fn first_index(&self) -> u64 {
        self.offset.0 + 1
    }

    fn last_index(&self) -> u64 {
        self.offset.0 + self.entries.len() as u64
    }
}

impl Storage for LogStore {
    fn initial_state(&self) -> raft::Result<RaftState> {
        Ok(RaftState::new(self.hard_state.clone(), self.conf_state.clone()))
    }

    fn entries(
        &self,
        low: u64,
        high: u64,
        max_size: impl Into<Option<u64>>,
        _context: GetEntriesContext,
    ) -> raft::Result<Vec<Entry>> {
        if low < self.first_index() {
            return Err(raft::Error::Store(StorageError::Compacted));
        }
        if high > self.last_index() + 1 {
            return Err(raft::Error::Store(StorageError::Unavailable));
        }
        let lo = (low - self.first_index()) as usize;
        let hi = (high - self.first_index()) as usize;
        let mut out = self.entries[lo..hi].to_vec();
        raft::util::limit_size(&mut out, max_size.into());
        Ok(out)
    }

    fn term(&self, idx: u64) -> raft::Result<u64> {
        if idx == self.offset.0 {
            return Ok(self.offset.1);
        }
        if idx < self.offset.0 {
            return Err(raft::Error::Store(StorageError::Compacted));
        }
        if idx > self.last_index() {
            return Err(raft::Error::Store(StorageError::Unavailable));
        }
        Ok(self.entries[(idx - self.first_index()) as usize].term)
    }

    fn first_index(&self) -> raft::Result<u64> {
        Ok(LogStore::first_index(self))
    }

    fn last_index(&self) -> raft::Result<u64> {
        Ok(LogStore::last_index(self))
    }

    fn snapshot(&self, request_index: u64, to: u64) -> raft::Result<Snapshot> {
        let cs = self.snapshot.get_conf_state();
        let includes_peer = cs.get_voters().contains(&to) || cs.get_learners().contains(&to);
        // raft-rs refuses a snapshot whose configuration does not contain the receiver, so a new
        // learner needs a snapshot taken after it was added.
        if self.snapshot.index == 0 || self.snapshot.index < request_index || !includes_peer {
            self.snapshot_wanted.set(true);
            return Err(raft::Error::Store(StorageError::SnapshotTemporarilyUnavailable));
        }
        // The data stays on disk: the transport streams the file named by (term, index).
        let mut snap = Snapshot::default();
        snap.set_metadata(self.snapshot.clone());
        Ok(snap)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(index: u64, term: u64) -> Entry {
        let mut e = Entry::default();
        e.index = index;
        e.term = term;
        e
    }

    fn meta(index: u64, term: u64, voters: Vec<u64>) -> SnapshotMetadata {
        let mut m = SnapshotMetadata::default();
        m.index = index;
        m.term = term;
        let mut cs = ConfState::default();
        cs.set_voters(voters);
        m.set_conf_state(cs);
        m
    }

    #[test]
    fn appending_a_conflicting_suffix_replaces_it() {
        let mut s = LogStore::new(meta(1, 1, vec![1]), HardState::default(), vec![]);
        s.append(&(2..=10).map(|i| entry(i, 1)).collect::<Vec<_>>());
        s.append(&[entry(6, 2), entry(7, 2)]);
        assert_eq!(Storage::last_index(&s).unwrap(), 7);
        assert_eq!(s.term(6).unwrap(), 2);
        assert_eq!(s.term(5).unwrap(), 1);
        assert_eq!(s.term(1).unwrap(), 1);
        assert!(s.term(0).is_err());
        assert!(s.term(8).is_err());
    }

    #[test]
    fn compaction_within_a_byte_bound_keeps_the_newest_entries_that_fit() {
        let entries: Vec<Entry> = (1..=10)
            .map(|i| {
                let mut e = Entry::default();
                e.index = i;
                e.term = 1;
                e.data = vec![0u8; 100].into();
                e
            })
            .collect();
        let s = LogStore::new(SnapshotMetadata::default(), HardState::default(), entries);
        // Up to index 8, keeping at most 250 bytes: entries 7 and 8 (200 bytes) stay.
        assert_eq!(s.compact_index_within(8, 250), 6);
        assert_eq!(s.compact_index_within(8, 10_000), 0, "everything fits");
        assert_eq!(s.compact_index_within(8, 0), 8, "nothing is kept");
    }

    #[test]
    fn compaction_keeps_the_term_of_the_last_dropped_entry() {
        let mut s = LogStore::new(meta(1, 1, vec![1]), HardState::default(), vec![]);
        s.append(&(2..=10).map(|i| entry(i, i / 3 + 1)).collect::<Vec<_>>());
        s.set_snapshot(meta(8, 3, vec![1]));
        s.compact(6);
        assert_eq!(Storage::first_index(&s).unwrap(), 7);
        assert_eq!(s.term(6).unwrap(), 3);
        let got = s.entries(7, 11, None, GetEntriesContext::empty(false)).unwrap();
        assert_eq!(got.iter().map(|e| e.index).collect::<Vec<_>>(), vec![7, 8, 9, 10]);
        assert!(s.entries(6, 8, None, GetEntriesContext::empty(false)).is_err());
        s.compact(100);
        assert_eq!(
            Storage::first_index(&s).unwrap(),
            9,
            "compaction never passes the snapshot"
        );
    }

    #[test]
    fn a_snapshot_without_the_receiver_is_requested_anew() {
        let s = LogStore::new(meta(5, 1, vec![1, 2]), HardState::default(), vec![]);
        assert!(s.snapshot(0, 2).is_ok());
        assert!(!s.take_snapshot_wanted());
        assert!(s.snapshot(0, 3).is_err());
        assert!(s.take_snapshot_wanted());
        assert!(
            s.snapshot(6, 2).is_err(),
            "a request index past the snapshot needs a newer one"
        );
    }

    #[test]
    fn applying_a_received_snapshot_replaces_the_log() {
        let mut s = LogStore::new(meta(1, 1, vec![1]), HardState::default(), vec![]);
        s.append(&(2..=5).map(|i| entry(i, 1)).collect::<Vec<_>>());
        s.apply_snapshot(meta(20, 4, vec![1, 2]));
        assert_eq!(Storage::first_index(&s).unwrap(), 21);
        assert_eq!(Storage::last_index(&s).unwrap(), 20);
        assert_eq!(s.hard_state().commit, 20);
        assert_eq!(s.initial_state().unwrap().conf_state.get_voters(), &[1, 2]);
    }
}
