//! Recovery: replaying every segment at open, deciding what damage is a torn tail, and building
//! the [`Recovered`] log the node starts from.
//!
//! # Recovery policy: truncate a torn tail, refuse everything else
//!
//! A crash can only damage what was being written when it happened: the end of the last
//! segment, which was never acknowledged. Scanning the last segment, a record is a **torn tail**
//! when
//! - its header is incomplete at end of file, or its header is whole but its payload runs past
//!   end of file;
//! - its header checksum fails and every byte from there to end of file is zero (a
//!   preallocated or zero-extended tail);
//! - its body checksum fails and it is the last record: it ends exactly at end of file, or only
//!   zeros follow it.
//!
//! The file is cut at the start of that record (`ftruncate` + `fsync`), a warning names the file
//! and offset, and [`Recovered::truncated_tail`] reports it. Anything else — a bad record with
//! data after it, any damage in a segment that is not the last, a missing segment — is
//! [`WalError::Corrupt`] naming the file and offset: those bytes may hold acknowledged writes, so
//! the log refuses to guess.

use std::fs;

use raft::prelude::{Entry, HardState};

use super::file::{truncate_file, Segment};
use super::format::{
    decode_record, MarkerDisposition, Record, FILE_HEADER_LEN, FILE_MAGIC, FORMAT_VERSION, RECORD_HEADER_LEN,
};
use super::{io_error, LogShape, Recovered, Result, WalError};

/// What replaying a log's segments found.
pub(super) struct Recovery {
    /// The effective log, handed to the caller of [`Wal::open`](super::Wal::open).
    pub(super) recovered: Recovered,
    /// The writer's view of the same log.
    pub(super) shape: LogShape,
    /// Length of the last segment once any torn tail is cut (0 without segments).
    pub(super) last_len: u64,
}

/// Replays `segments` (oldest first, as listed) under the policy in the module docs. A torn
/// tail of the last segment is truncated (and logged with file and offset) once the whole log
/// has proved consistent; anything else damaged is [`WalError::Corrupt`] naming file and offset.
pub(super) fn recover(segments: &[Segment]) -> Result<Recovery> {
    let hole_end = segments.first().map_or(0, |s| s.first_index.saturating_sub(1));
    let mut replay = Replay::new(hole_end);
    let mut torn = None;
    let mut active_len = 0;
    for (position, segment) in segments.iter().enumerate() {
        let is_last = position + 1 == segments.len();
        let bytes = fs::read(&segment.path).map_err(io_error("read segment", &segment.path))?;
        let scan = scan_segment(&bytes, is_last).map_err(|e| WalError::Corrupt {
            path: segment.path.clone(),
            offset: e.offset,
            reason: e.reason,
        })?;
        for (offset, record) in scan.records {
            replay.apply(record).map_err(|reason| WalError::Corrupt {
                path: segment.path.clone(),
                offset,
                reason,
            })?;
        }
        active_len = scan.torn_at.unwrap_or(bytes.len() as u64);
        if let Some(offset) = scan.torn_at {
            torn = Some((segment.path.clone(), offset));
        }
    }
    if let Err(reason) = replay.finish() {
        return Err(WalError::Corrupt {
            path: segments[0].path.clone(),
            offset: FILE_HEADER_LEN as u64,
            reason,
        });
    }

    // Only cut the tail once the whole log has proved consistent: a log refused as corrupt
    // is left exactly as found for whoever investigates it.
    if let Some((path, offset)) = &torn {
        truncate_file(path, *offset)?;
        tracing::warn!(
            path = %path.display(),
            offset,
            "truncated torn tail of write-ahead log"
        );
    }

    let shape = replay.shape();
    let recovered = Recovered {
        snapshots: replay.snapshots,
        hard_state: replay.hard_state,
        entries: replay.entries,
        truncated_tail: torn,
    };
    Ok(Recovery {
        recovered,
        shape,
        last_len: active_len,
    })
}

/// The records of one segment, and where its torn tail starts if it has one.
#[derive(Debug)]
pub(super) struct SegmentScan {
    pub(super) records: Vec<(u64, Record)>,
    pub(super) torn_at: Option<u64>,
}

/// Where and why a segment could not be read.
#[derive(Debug, PartialEq)]
pub(super) struct ScanError {
    pub(super) offset: u64,
    reason: String,
}

/// What the bytes at one offset hold.
enum RecordRead {
    /// A whole, checksummed record and its framed length.
    Whole(Record, usize),
    /// Damage a crash mid-write produces: a torn tail if this is the last segment.
    Torn(&'static str),
    /// Damage no crash explains.
    Corrupt(String),
}

fn read_record(rest: &[u8]) -> RecordRead {
    if rest.len() < RECORD_HEADER_LEN {
        return RecordRead::Torn("record header is incomplete at end of file");
    }
    let word = |at: usize| u32::from_le_bytes(rest[at..at + 4].try_into().expect("4 bytes"));
    let (len, body_crc, header_crc) = (word(0), word(4), word(8));
    if crc32c::crc32c(&rest[0..8]) != header_crc {
        return if is_all_zero(rest) {
            RecordRead::Torn("record header is zero-filled to end of file")
        } else {
            RecordRead::Corrupt("record header checksum mismatch".into())
        };
    }
    let framed = RECORD_HEADER_LEN + 1 + len as usize;
    if framed > rest.len() {
        return RecordRead::Torn("record runs past end of file");
    }
    let body = &rest[RECORD_HEADER_LEN..framed];
    if crc32c::crc32c(body) != body_crc {
        return if is_all_zero(&rest[framed..]) {
            RecordRead::Torn("last record's body checksum mismatch")
        } else {
            RecordRead::Corrupt("record body checksum mismatch".into())
        };
    }
    match decode_record(body[0], &body[1..]) {
        Ok(record) => RecordRead::Whole(record, framed),
        Err(reason) => RecordRead::Corrupt(reason),
    }
}

fn is_all_zero(bytes: &[u8]) -> bool {
    bytes.iter().all(|&b| b == 0)
}

/// Reads every record of a segment, applying the torn-tail policy only if `is_last`.
pub(super) fn scan_segment(bytes: &[u8], is_last: bool) -> Result<SegmentScan, ScanError> {
    if bytes.len() < FILE_HEADER_LEN || bytes[..FILE_MAGIC.len()] != FILE_MAGIC {
        return Err(ScanError {
            offset: 0,
            reason: "segment does not start with the WAL magic".into(),
        });
    }
    let version = u32::from_le_bytes(bytes[FILE_MAGIC.len()..FILE_HEADER_LEN].try_into().expect("4 bytes"));
    if version != FORMAT_VERSION {
        return Err(ScanError {
            offset: FILE_MAGIC.len() as u64,
            reason: format!("unsupported format version {version}"),
        });
    }
    let mut records = Vec::new();
    let mut offset = FILE_HEADER_LEN;
    while offset < bytes.len() {
        match read_record(&bytes[offset..]) {
            RecordRead::Whole(record, framed) => {
                records.push((offset as u64, record));
                offset += framed;
            }
            RecordRead::Torn(_) if is_last => {
                return Ok(SegmentScan {
                    records,
                    torn_at: Some(offset as u64),
                });
            }
            RecordRead::Torn(reason) => {
                return Err(ScanError {
                    offset: offset as u64,
                    reason: format!("{reason}, and this is not the last segment"),
                });
            }
            RecordRead::Corrupt(reason) => {
                return Err(ScanError {
                    offset: offset as u64,
                    reason,
                });
            }
        }
    }
    Ok(SegmentScan { records, torn_at: None })
}

/// Recovery's view of the log: records applied in order, with consistency checks that turn a
/// record that cannot follow its predecessors into corruption.
struct Replay {
    snapshot: Option<(u64, u64)>,
    snapshots: Vec<(u64, u64)>,
    hard_state: Option<HardState>,
    /// Indexes in `(snapshot index, hole_end]` may hold entries that lived in released segments.
    /// Records in the first surviving segment can refer to them (a truncation or marker inside
    /// the hole); the log is only whole again once a marker covers the hole, which the release
    /// rule guarantees happened before anything was deleted.
    hole_end: u64,
    /// Contiguous entries starting right after `floor()`.
    entries: Vec<Entry>,
}

impl Replay {
    fn new(hole_end: u64) -> Self {
        Replay {
            snapshot: None,
            snapshots: Vec::new(),
            hard_state: None,
            hole_end,
            entries: Vec::new(),
        }
    }

    fn snapshot_index(&self) -> u64 {
        self.snapshot.map_or(0, |(index, _)| index)
    }

    /// The index just before the first entry held.
    fn floor(&self) -> u64 {
        self.snapshot_index().max(self.hole_end)
    }

    fn apply(&mut self, record: Record) -> Result<(), String> {
        match record {
            Record::Entry(entry) => self.apply_entry(entry),
            Record::HardState(hs) => {
                self.hard_state = Some(hs);
                Ok(())
            }
            Record::SnapshotMarker {
                index,
                term,
                disposition,
            } => self.apply_marker(index, term, disposition),
        }
    }

    fn apply_entry(&mut self, entry: Entry) -> Result<(), String> {
        let index = entry.index;
        let snapshot_index = self.snapshot_index();
        if index <= snapshot_index {
            return Err(format!(
                "entry {index} is at or below the snapshot marker at {snapshot_index}"
            ));
        }
        if index <= self.hole_end {
            self.hole_end = index - 1;
            self.entries.clear();
            self.entries.push(entry);
            return Ok(());
        }
        let first = self.floor() + 1;
        let next = first + self.entries.len() as u64;
        if index > next {
            return Err(format!("entry {index} leaves a gap after index {}", next - 1));
        }
        self.entries.truncate((index - first) as usize);
        self.entries.push(entry);
        Ok(())
    }

    fn apply_marker(&mut self, index: u64, term: u64, disposition: MarkerDisposition) -> Result<(), String> {
        let snapshot_index = self.snapshot_index();
        if index < snapshot_index {
            return Err(format!(
                "snapshot marker at {index} is behind the one at {snapshot_index}"
            ));
        }
        match disposition {
            MarkerDisposition::DiscardLog => {
                self.entries.clear();
                self.hole_end = 0;
            }
            MarkerDisposition::RetainLaterEntries => {
                if index == snapshot_index && self.snapshot.is_some_and(|(_, t)| t != term) {
                    return Err(format!(
                        "snapshot marker ({index}, {term}) keeps a log whose snapshot has another term"
                    ));
                }
                let floor = self.floor();
                if index > floor {
                    let position = (index - floor - 1) as usize;
                    match self.entries.get(position) {
                        Some(entry) if entry.term == term => {}
                        Some(entry) => {
                            return Err(format!(
                                "snapshot marker ({index}, {term}) keeps a log whose entry {index} has term {}",
                                entry.term
                            ))
                        }
                        None => {
                            return Err(format!(
                                "snapshot marker at {index} keeps a log that ends at {}",
                                floor + self.entries.len() as u64
                            ))
                        }
                    }
                    self.entries.drain(..=position);
                }
                // Otherwise the marker falls inside the hole or on the current snapshot, and
                // every entry held lies above it.
            }
        }
        self.snapshot = Some((index, term));
        if self.snapshots.last() != Some(&(index, term)) {
            self.snapshots.push((index, term));
        }
        Ok(())
    }

    fn finish(&self) -> Result<(), String> {
        if self.hole_end > self.snapshot_index() {
            return Err(format!(
                "entries {}..={} were in released segments and no snapshot marker covers them",
                self.snapshot_index() + 1,
                self.hole_end
            ));
        }
        Ok(())
    }

    fn shape(&self) -> LogShape {
        LogShape::from_entries(self.snapshot, self.hard_state.clone(), &self.entries)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use proptest::prelude::*;
    use tempfile::TempDir;

    use super::*;
    use crate::wal::format::file_header;
    use crate::wal::test_support::*;
    use crate::wal::WalOptions;

    #[test]
    fn a_segment_without_the_magic_is_corrupt_at_offset_zero() {
        let mut bytes = file_header();
        bytes[0] ^= 1;
        assert_eq!(scan_segment(&bytes, true).unwrap_err().offset, 0);
    }

    #[test]
    fn a_torn_last_record_is_truncated_at_every_byte_offset_and_appending_resumes() {
        let dir = TempDir::new().unwrap();
        let (segment, previous_end, last_end) = {
            let (mut wal, _) = open(dir.path(), WalOptions::default());
            wal.append_entries(&entries(1..=3, 1)).unwrap();
            wal.append_hard_state(&hard_state(1, 1, 3)).unwrap();
            wal.sync().unwrap();
            let segment = segment_paths(dir.path()).pop().unwrap();
            let previous_end = file_len(&segment);
            wal.append_entries(&entries(4..=4, 1)).unwrap();
            wal.sync().unwrap();
            let last_end = file_len(&segment);
            (segment, previous_end, last_end)
        };
        let name = segment.file_name().unwrap();
        for len in previous_end..last_end {
            let copy = copy_dir(dir.path());
            let torn_segment = copy.path().join(name);
            set_len(&torn_segment, len);
            let (mut wal, recovered) = open(copy.path(), WalOptions::default());
            assert_eq!(recovered.entries, entries(1..=3, 1), "cut at {len}");
            assert_eq!(recovered.hard_state, Some(hard_state(1, 1, 3)));
            let expected_tail = (len > previous_end).then(|| (torn_segment.clone(), previous_end));
            assert_eq!(recovered.truncated_tail, expected_tail, "cut at {len}");
            assert_eq!(file_len(&torn_segment), previous_end);

            wal.append_entries(&entries(4..=5, 2)).unwrap();
            wal.sync().unwrap();
            drop(wal);
            let (_, recovered) = open(copy.path(), WalOptions::default());
            let mut expected = entries(1..=3, 1);
            expected.extend(entries(4..=5, 2));
            assert_eq!(recovered.entries, expected, "cut at {len}");
            assert_eq!(recovered.truncated_tail, None);
        }
    }

    #[test]
    fn a_zero_filled_tail_is_treated_as_torn() {
        let dir = TempDir::new().unwrap();
        {
            let (mut wal, _) = open(dir.path(), WalOptions::default());
            wal.append_entries(&entries(1..=3, 1)).unwrap();
            wal.sync().unwrap();
        }
        let segment = segment_paths(dir.path()).pop().unwrap();
        let end = file_len(&segment);
        set_len(&segment, end + 4096);
        let (_, recovered) = open(dir.path(), WalOptions::default());
        assert_eq!(recovered.entries, entries(1..=3, 1));
        assert_eq!(recovered.truncated_tail, Some((segment.clone(), end)));
        assert_eq!(file_len(&segment), end);
    }

    #[test]
    fn a_last_record_with_a_bad_body_and_nothing_after_it_is_torn() {
        let dir = TempDir::new().unwrap();
        {
            let (mut wal, _) = open(dir.path(), WalOptions::default());
            wal.append_entries(&entries(1..=3, 1)).unwrap();
            wal.sync().unwrap();
        }
        let segment = segment_paths(dir.path()).pop().unwrap();
        let last = *record_offsets(&segment).last().unwrap();
        flip_bit(&segment, file_len(&segment) - 1);
        let (_, recovered) = open(dir.path(), WalOptions::default());
        assert_eq!(recovered.entries, entries(1..=2, 1));
        assert_eq!(recovered.truncated_tail, Some((segment, last)));
    }

    #[test]
    fn a_flipped_bit_in_a_middle_record_length_is_reported_as_corrupt() {
        let dir = TempDir::new().unwrap();
        write_twelve_entries(dir.path(), WalOptions::default());
        let segment = segment_paths(dir.path()).pop().unwrap();
        let target = record_offsets(&segment)[5];
        flip_bit(&segment, target);
        let (path, offset, reason) = expect_corrupt(dir.path());
        assert_eq!((path, offset), (segment, target));
        assert!(reason.contains("header checksum"), "{reason}");
    }

    #[test]
    fn a_flipped_bit_in_a_middle_record_payload_is_reported_as_corrupt() {
        let dir = TempDir::new().unwrap();
        write_twelve_entries(dir.path(), WalOptions::default());
        let segment = segment_paths(dir.path()).pop().unwrap();
        let target = record_offsets(&segment)[5];
        flip_bit(&segment, target + RECORD_HEADER_LEN as u64 + 3);
        let (path, offset, reason) = expect_corrupt(dir.path());
        assert_eq!((path, offset), (segment, target));
        assert!(reason.contains("body checksum"), "{reason}");
    }

    #[test]
    fn damage_in_a_segment_that_is_not_the_last_is_reported_as_corrupt() {
        let opts = || WalOptions { segment_size: 150 };
        for (case, byte_in_record) in [("length", 0u64), ("payload", RECORD_HEADER_LEN as u64 + 3)] {
            let dir = TempDir::new().unwrap();
            write_twelve_entries(dir.path(), opts());
            let segments = segment_paths(dir.path());
            assert!(segments.len() >= 3, "{case}: expected rotation");
            let segment = &segments[1];
            let target = *record_offsets(segment).last().unwrap();
            flip_bit(segment, target + byte_in_record);
            let (path, offset, _) = expect_corrupt(dir.path());
            assert_eq!((&path, offset), (segment, target), "{case}");
        }
    }

    #[test]
    fn a_torn_end_in_a_segment_that_is_not_the_last_is_reported_as_corrupt() {
        let dir = TempDir::new().unwrap();
        write_twelve_entries(dir.path(), WalOptions { segment_size: 150 });
        let segments = segment_paths(dir.path());
        let last_record = *record_offsets(&segments[0]).last().unwrap();
        set_len(&segments[0], file_len(&segments[0]) - 1);
        let (path, offset, _) = expect_corrupt(dir.path());
        assert_eq!((path, offset), (segments[0].clone(), last_record));
    }

    #[test]
    fn recovery_after_release_follows_rewrites_below_the_next_segment_start() {
        let dir = TempDir::new().unwrap();
        let (mut wal, _) = open(dir.path(), WalOptions { segment_size: 100 });
        wal.append_entries(&entries(1..=10, 1)).unwrap();
        wal.sync().unwrap();
        // The next sync rotates, so this rewrite of 5.. lands in a segment named for index 11.
        wal.append_entries(&entries(5..=14, 2)).unwrap();
        wal.sync().unwrap();
        assert_eq!(wal.segments[1].first_index, 11);
        wal.append_snapshot_marker(12, 2).unwrap();
        wal.sync().unwrap();
        wal.release_to(12).unwrap();
        assert_eq!(wal.segments[0].first_index, 11);
        drop(wal);
        let (_, recovered) = open(dir.path(), WalOptions::default());
        assert_eq!(recovered.snapshots, vec![(12, 2)]);
        assert_eq!(recovered.entries, entries(13..=14, 2));
    }

    /// The behaviour the log must reproduce, written as plainly as possible.
    #[derive(Clone, Debug, Default)]
    struct Model {
        snapshots: Vec<(u64, u64)>,
        hard_state: Option<HardState>,
        entries: BTreeMap<u64, Entry>,
    }

    impl Model {
        fn snapshot_index(&self) -> u64 {
            self.snapshots.last().map_or(0, |s| s.0)
        }

        fn last_index(&self) -> u64 {
            self.entries
                .keys()
                .next_back()
                .copied()
                .unwrap_or(self.snapshot_index())
        }

        fn term_at(&self, index: u64) -> Option<u64> {
            match self.snapshots.last() {
                Some(&(i, t)) if i == index => Some(t),
                _ => self.entries.get(&index).map(|e| e.term),
            }
        }

        fn max_term(&self) -> u64 {
            let entries = self.entries.values().map(|e| e.term);
            let snapshots = self.snapshots.iter().map(|s| s.1);
            entries.chain(snapshots).max().unwrap_or(0)
        }

        fn append(&mut self, entry: Entry) {
            self.entries.split_off(&entry.index);
            self.entries.insert(entry.index, entry);
        }

        fn mark(&mut self, index: u64, term: u64) {
            if self.term_at(index) == Some(term) {
                self.entries = self.entries.split_off(&(index + 1));
            } else {
                self.entries.clear();
            }
            if self.snapshots.last() != Some(&(index, term)) {
                self.snapshots.push((index, term));
            }
        }
    }

    #[derive(Clone, Debug)]
    enum Op {
        Append { rewind: u64, count: u64, new_term: bool },
        HardState { vote: u64, commit: u64 },
        Compact { pick: usize },
        Install { ahead: u64 },
        Sync,
        Release,
        Reopen,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => (0..4u64, 1..5u64, any::<bool>())
                .prop_map(|(rewind, count, new_term)| Op::Append { rewind, count, new_term }),
            1 => (0..4u64, 0..50u64).prop_map(|(vote, commit)| Op::HardState { vote, commit }),
            1 => any::<usize>().prop_map(|pick| Op::Compact { pick }),
            1 => (0..3u64).prop_map(|ahead| Op::Install { ahead }),
            3 => Just(Op::Sync),
            1 => Just(Op::Release),
            1 => Just(Op::Reopen),
        ]
    }

    fn assert_matches_model(recovered: &Recovered, model: &Model) {
        assert!(
            model.snapshots.ends_with(&recovered.snapshots),
            "recovered markers {:?} are not the newest of {:?}",
            recovered.snapshots,
            model.snapshots
        );
        assert_eq!(recovered.snapshots.last(), model.snapshots.last());
        assert_eq!(recovered.hard_state, model.hard_state);
        let expected: Vec<Entry> = model.entries.values().cloned().collect();
        assert_eq!(recovered.entries, expected);
        assert_eq!(recovered.truncated_tail, None);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        #[test]
        fn recovery_matches_an_in_memory_model(ops in proptest::collection::vec(op(), 1..60)) {
            let dir = TempDir::new().unwrap();
            let opts = || WalOptions { segment_size: 200 };
            let (mut wal, _) = open(dir.path(), opts());
            let mut model = Model::default();
            let mut durable = Model::default();
            for op in ops {
                match op {
                    Op::Append { rewind, count, new_term } => {
                        let term = model.max_term().max(1) + u64::from(new_term);
                        let first = (model.last_index() + 1)
                            .saturating_sub(rewind)
                            .max(model.snapshot_index() + 1);
                        let batch = entries(first..=first + count - 1, term);
                        wal.append_entries(&batch).unwrap();
                        batch.into_iter().for_each(|e| model.append(e));
                    }
                    Op::HardState { vote, commit } => {
                        let hs = hard_state(model.max_term(), vote, commit);
                        wal.append_hard_state(&hs).unwrap();
                        model.hard_state = Some(hs);
                    }
                    Op::Compact { pick } => {
                        if let Some(index) = model.entries.keys().nth(pick % model.entries.len().max(1)).copied() {
                            let term = model.term_at(index).unwrap();
                            wal.append_snapshot_marker(index, term).unwrap();
                            model.mark(index, term);
                        }
                    }
                    Op::Install { ahead } => {
                        let index = model.last_index().max(model.snapshot_index() + 1) + ahead;
                        let term = model.max_term() + 1;
                        wal.append_snapshot_marker(index, term).unwrap();
                        model.mark(index, term);
                    }
                    Op::Sync => {
                        wal.sync().unwrap();
                        durable = model.clone();
                    }
                    Op::Release => wal.release_to(u64::MAX).unwrap(),
                    Op::Reopen => {
                        drop(wal);
                        let (reopened, recovered) = open(dir.path(), opts());
                        assert_matches_model(&recovered, &durable);
                        wal = reopened;
                        model = durable.clone();
                    }
                }
            }
            drop(wal);
            let (_, recovered) = open(dir.path(), opts());
            assert_matches_model(&recovered, &durable);
        }
    }
}
