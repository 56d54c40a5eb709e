//! The write-ahead log: the only durable home of a member's Raft log entries, hard state and
//! snapshot markers until a snapshot makes them redundant.
//!
//! The log owns one directory of segment files. Callers buffer records with the `append_*`
//! methods and make them durable with [`Wal::sync`], which writes the whole batch with one
//! `write` and one `fdatasync` (group commit). [`Wal::open`] replays every segment and hands back
//! the effective log as [`Recovered`]; [`Wal::release_to`] deletes segments that a snapshot has
//! made redundant.
//!
//! # Layout
//!
//! - this module: the [`Wal`] writer, its errors and options, and the writer's view of the log
//!   that validates appends and decides what a snapshot marker does;
//! - `format`: the on-disk record format (header and body layout, CRC32C checksums), its
//!   constants, and encoding and decoding of records;
//! - `file`: segment files — names, atomic creation, the durable append, truncation, directory
//!   fsyncs — and the fault suite's fail points;
//! - `replay`: recovery at open — scanning segments, the torn-tail policy, building
//!   [`Recovered`].
//!
//! # Log semantics
//!
//! An entry at index `i` replaces any earlier entry at `i` and drops everything after it (Raft
//! log truncation). A snapshot marker at `(index, term)` follows the Raft paper's
//! InstallSnapshot rule: if the log holds `index` with that `term`, entries after it are kept
//! (local compaction); otherwise the whole log is discarded (a leader's snapshot replacing a
//! divergent or short log). The writer makes that decision when the marker is appended and
//! records it in the marker's disposition byte, so recovery never has to look up a term that
//! may live in a segment that was already released.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::path::{Path, PathBuf};

use protobuf::Message;
use raft::prelude::{Entry, HardState};

mod file;
mod format;
mod replay;
#[cfg(test)]
mod test_support;

use file::{
    append_durably, create_segment, ensure_directory, list_segments, remove_leftover_temporaries, sync_directory,
    Segment, FIRST_SEQUENCE,
};
use format::{encode_marker, encode_record, MarkerDisposition};
pub use format::{
    FILE_HEADER_LEN, FILE_MAGIC, FORMAT_VERSION, MARKER_DISCARDS_LOG, MARKER_PAYLOAD_LEN, MARKER_RETAINS_LATER_ENTRIES,
    RECORD_ENTRY, RECORD_HARD_STATE, RECORD_HEADER_LEN, RECORD_SNAPSHOT_MARKER,
};
use replay::Recovery;

/// Result of WAL operations.
pub type Result<T, E = WalError> = std::result::Result<T, E>;

/// Everything that can go wrong in the write-ahead log.
#[derive(Debug, thiserror::Error)]
pub enum WalError {
    /// A file-system call failed; `op` says what the log was doing to `path`.
    #[error("write-ahead log could not {op} {}", path.display())]
    Io {
        /// What was being done, e.g. "fsync segment".
        op: &'static str,
        /// The file or directory involved.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// Damage that is not a torn tail: the bytes at `offset` of `path` cannot be trusted, and
    /// skipping them could lose acknowledged writes.
    #[error("write-ahead log segment {} is corrupt at offset {offset}: {reason}", path.display())]
    Corrupt {
        /// The damaged segment.
        path: PathBuf,
        /// Byte offset of the first record (or header) that failed.
        offset: u64,
        /// What check failed.
        reason: String,
    },
    /// The caller asked to record something the log cannot represent: entries that leave a gap
    /// or fall below the snapshot, a snapshot marker that goes backwards, an oversized record.
    /// Nothing from the rejected call was buffered.
    #[error("write-ahead log refused an append: {reason}")]
    InvalidAppend {
        /// Why the append was refused.
        reason: String,
    },
    /// An earlier write or fsync failed. After a failed fsync the kernel may have dropped dirty
    /// pages, so what is on disk is unknown; the only safe way on is to reopen and recover.
    #[error("write-ahead log is unusable after an earlier write or fsync failure; reopen it")]
    Poisoned,
}

/// What recovery found: the effective log state.
#[derive(Debug, Default)]
pub struct Recovered {
    /// Every snapshot marker (index, term) recorded in the log, oldest first. A marker equal to
    /// the one before it adds nothing and is listed once; markers in released segments are gone.
    pub snapshots: Vec<(u64, u64)>,
    /// The last hard state recorded, if any.
    pub hard_state: Option<HardState>,
    /// The effective entries after the newest snapshot marker, contiguous and ascending by index: a later
    /// entry at index i replaces the earlier entry at i and drops everything after it (Raft log truncation).
    pub entries: Vec<Entry>,
    /// Whether a torn tail was truncated (and at which file/offset, for logging).
    pub truncated_tail: Option<(PathBuf, u64)>,
}

/// Tuning for [`Wal`].
#[derive(Clone, Debug)]
pub struct WalOptions {
    /// A new segment is started at the first sync after the active one grows beyond this many
    /// bytes; a segment therefore exceeds it by at most one batch.
    pub segment_size: u64,
}

impl Default for WalOptions {
    fn default() -> Self {
        WalOptions {
            segment_size: 64 * 1024 * 1024,
        }
    }
}

/// An open write-ahead log. See the module docs for the format and recovery policy.
pub struct Wal {
    /// The directory holding every segment.
    dir: PathBuf,
    /// When to rotate.
    opts: WalOptions,
    /// Segments on disk, oldest first; the last is the one being appended to.
    segments: Vec<Segment>,
    /// The active (last) segment, positioned at its end.
    active: File,
    /// Length of the active segment on disk, to decide when to rotate.
    active_len: u64,
    /// Encoded records waiting for the next sync, so a batch costs one write and one fsync.
    buffer: Vec<u8>,
    /// The log as it will be once the buffer is synced: validates appends and decides markers.
    pending: LogShape,
    /// What is known to be on disk: the preamble of a new segment and the bound on
    /// `release_to` come from here, never from unsynced state.
    durable: Checkpoint,
    /// Set when a write or fsync fails; see [`WalError::Poisoned`].
    poisoned: bool,
}

impl std::fmt::Debug for Wal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The buffer can be megabytes of encoded records; its size is what matters in a log line.
        f.debug_struct("Wal")
            .field("dir", &self.dir)
            .field("segments", &self.segments.len())
            .field("active_len", &self.active_len)
            .field("buffered_bytes", &self.buffer.len())
            .field("durable", &self.durable)
            .field("poisoned", &self.poisoned)
            .finish()
    }
}

impl Wal {
    /// Opens (creating the directory if missing, fsyncing its parent) and recovers. A torn tail of the LAST segment is truncated (and logged via tracing::warn with file and offset); anything else damaged is `WalError::Corrupt` naming file and offset.
    pub fn open(dir: &Path, opts: WalOptions) -> Result<(Wal, Recovered)> {
        ensure_directory(dir)?;
        remove_leftover_temporaries(dir)?;
        let mut segments = list_segments(dir)?;
        let Recovery {
            recovered,
            shape: pending,
            last_len: mut active_len,
        } = replay::recover(&segments)?;

        let durable = pending.checkpoint();
        let active = match segments.last() {
            Some(segment) => OpenOptions::new()
                .append(true)
                .open(&segment.path)
                .map_err(io_error("open segment for append", &segment.path))?,
            None => {
                let (segment, file, len) = create_segment(dir, FIRST_SEQUENCE, &durable)?;
                segments.push(segment);
                active_len = len;
                file
            }
        };

        let wal = Wal {
            dir: dir.to_path_buf(),
            opts,
            segments,
            active,
            active_len,
            buffer: Vec::new(),
            pending,
            durable,
            poisoned: false,
        };
        Ok((wal, recovered))
    }

    /// Buffers entries (in order) to append. Not durable until `sync`.
    ///
    /// The first entry may overwrite any index after the snapshot marker up to one past the
    /// last entry; each later entry must follow within the same bounds. A call that breaks this
    /// buffers nothing and returns [`WalError::InvalidAppend`].
    pub fn append_entries(&mut self, entries: &[Entry]) -> Result<()> {
        self.ensure_usable()?;
        let mut shape = self.pending.clone();
        let mut encoded = Vec::new();
        for entry in entries {
            shape
                .push_entry(entry.index, entry.term)
                .map_err(|reason| WalError::InvalidAppend { reason })?;
            let payload = entry
                .write_to_bytes()
                .map_err(|e| invalid(format!("entry {} cannot be encoded: {e}", entry.index)))?;
            encode_record(&mut encoded, RECORD_ENTRY, &payload)?;
        }
        self.pending = shape;
        self.buffer.extend_from_slice(&encoded);
        Ok(())
    }

    /// Buffers a hard state record.
    pub fn append_hard_state(&mut self, hs: &HardState) -> Result<()> {
        self.ensure_usable()?;
        let payload = hs
            .write_to_bytes()
            .map_err(|e| invalid(format!("hard state cannot be encoded: {e}")))?;
        encode_record(&mut self.buffer, RECORD_HARD_STATE, &payload)?;
        self.pending.hard_state = Some(hs.clone());
        Ok(())
    }

    /// Buffers a snapshot marker: the log's content before `index` is now covered by a snapshot at (index, term).
    ///
    /// If the log holds `index` with `term`, later entries are kept; otherwise the whole log is
    /// discarded (see the module docs). `index` must be non-zero and not below the current
    /// marker.
    pub fn append_snapshot_marker(&mut self, index: u64, term: u64) -> Result<()> {
        self.ensure_usable()?;
        let mut shape = self.pending.clone();
        let disposition = shape
            .record_marker(index, term)
            .map_err(|reason| WalError::InvalidAppend { reason })?;
        encode_record(
            &mut self.buffer,
            RECORD_SNAPSHOT_MARKER,
            &encode_marker(index, term, disposition),
        )?;
        self.pending = shape;
        Ok(())
    }

    /// Writes everything buffered and fdatasyncs the active segment (one fsync for the whole batch: this is group commit). Returns the number of bytes written.
    ///
    /// The count is the batch's own bytes; a segment preamble written on rotation is not
    /// included. With nothing buffered this does no I/O and returns 0. If this fails the log is
    /// [poisoned](WalError::Poisoned).
    pub fn sync(&mut self) -> Result<u64> {
        self.ensure_usable()?;
        if self.buffer.is_empty() {
            return Ok(0);
        }
        let result = self.write_batch();
        if result.is_err() {
            self.poisoned = true;
        }
        result
    }

    /// Deletes whole segments that hold nothing needed once a snapshot at `index` exists: a segment can go when the NEXT segment starts at or below `index` (its first entry index <= index) -- never the active segment. Fsyncs the directory.
    ///
    /// `index` is capped at the newest snapshot marker already synced: without a durable marker
    /// the deleted entries would not be covered by anything after a crash.
    pub fn release_to(&mut self, index: u64) -> Result<()> {
        let index = index.min(self.durable.snapshot.map_or(0, |(i, _)| i));
        let releasable = self
            .segments
            .windows(2)
            .take_while(|pair| pair[1].first_index <= index)
            .count();
        if releasable == 0 {
            return Ok(());
        }
        // Oldest first, so a crash part-way leaves a contiguous run of segments.
        let mut removed = 0;
        let mut outcome = Ok(());
        for segment in &self.segments[..releasable] {
            if let Err(e) = fs::remove_file(&segment.path) {
                outcome = Err(io_error("delete released segment", &segment.path)(e));
                break;
            }
            removed += 1;
        }
        self.segments.drain(..removed);
        outcome?;
        sync_directory(&self.dir)?;
        tracing::debug!(index, released = removed, "released write-ahead log segments");
        Ok(())
    }

    /// The directory holding the segments.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// How many segment files exist, including the active one.
    pub fn segment_count(&self) -> usize {
        self.segments.len()
    }

    fn ensure_usable(&self) -> Result<()> {
        if self.poisoned {
            Err(WalError::Poisoned)
        } else {
            Ok(())
        }
    }

    fn write_batch(&mut self) -> Result<u64> {
        // Rotating before the write (rather than after the previous one) means a failure to
        // create the segment fails this batch, which has not been acknowledged, instead of
        // reporting an error for a batch that is already durable.
        if self.active_len > self.opts.segment_size {
            self.rotate()?;
        }
        let path = &self.segments.last().expect("an open log has a segment").path;
        append_durably(&mut self.active, path, &self.buffer)?;
        let written = self.buffer.len() as u64;
        self.active_len += written;
        self.buffer.clear();
        self.durable = self.pending.checkpoint();
        Ok(written)
    }

    fn rotate(&mut self) -> Result<()> {
        let sequence = self.segments.last().map_or(FIRST_SEQUENCE, |s| s.sequence + 1);
        let (segment, file, len) = create_segment(&self.dir, sequence, &self.durable)?;
        tracing::debug!(path = %segment.path.display(), "started write-ahead log segment");
        self.segments.push(segment);
        self.active = file;
        self.active_len = len;
        Ok(())
    }
}

fn invalid(reason: String) -> WalError {
    WalError::InvalidAppend { reason }
}

fn io_error(op: &'static str, path: &Path) -> impl FnOnce(io::Error) -> WalError {
    let path = path.to_path_buf();
    move |source| WalError::Io { op, path, source }
}

/// What must survive into a new segment's preamble, and where the next entry would go.
#[derive(Debug, Clone, Default)]
struct Checkpoint {
    snapshot: Option<(u64, u64)>,
    hard_state: Option<HardState>,
    last_index: u64,
}

/// A run of consecutive entries sharing a term, so the writer can answer "what term is at
/// index i" without holding entries in memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct TermRun {
    first_index: u64,
    term: u64,
}

/// The writer's view of the log: enough to validate appends and decide markers.
#[derive(Debug, Clone, Default)]
struct LogShape {
    snapshot: Option<(u64, u64)>,
    hard_state: Option<HardState>,
    /// Index of the last entry, or of the snapshot when there are none.
    last_index: u64,
    /// Terms of the entries after the snapshot, ascending by first index.
    term_runs: Vec<TermRun>,
}

impl LogShape {
    fn from_entries(snapshot: Option<(u64, u64)>, hard_state: Option<HardState>, entries: &[Entry]) -> Self {
        let mut shape = LogShape {
            snapshot,
            hard_state,
            last_index: snapshot.map_or(0, |(index, _)| index),
            term_runs: Vec::new(),
        };
        for entry in entries {
            shape
                .push_entry(entry.index, entry.term)
                .expect("recovered entries are contiguous after the snapshot");
        }
        shape
    }

    fn snapshot_index(&self) -> u64 {
        self.snapshot.map_or(0, |(index, _)| index)
    }

    fn term_at(&self, index: u64) -> Option<u64> {
        match self.snapshot {
            Some((snapshot_index, term)) if snapshot_index == index => return Some(term),
            _ => {}
        }
        if index <= self.snapshot_index() || index > self.last_index {
            return None;
        }
        let run = self.term_runs.partition_point(|r| r.first_index <= index);
        Some(self.term_runs[run - 1].term)
    }

    fn push_entry(&mut self, index: u64, term: u64) -> Result<(), String> {
        let snapshot_index = self.snapshot_index();
        if index <= snapshot_index {
            return Err(format!(
                "entry {index} is at or below the snapshot marker at {snapshot_index}"
            ));
        }
        if index > self.last_index + 1 {
            return Err(format!(
                "entry {index} would leave a gap after the last index {}",
                self.last_index
            ));
        }
        let keep = self.term_runs.partition_point(|r| r.first_index < index);
        self.term_runs.truncate(keep);
        if self.term_runs.last().is_none_or(|r| r.term != term) {
            self.term_runs.push(TermRun {
                first_index: index,
                term,
            });
        }
        self.last_index = index;
        Ok(())
    }

    fn record_marker(&mut self, index: u64, term: u64) -> Result<MarkerDisposition, String> {
        if index == 0 {
            return Err("a snapshot marker at index 0 covers nothing".into());
        }
        if let Some((current_index, current_term)) = self.snapshot {
            if index < current_index {
                return Err(format!(
                    "snapshot marker at {index} is behind the current one at {current_index}"
                ));
            }
            if index == current_index && term != current_term {
                return Err(format!(
                    "snapshot marker ({index}, {term}) contradicts the current one ({current_index}, {current_term})"
                ));
            }
        }
        let disposition = if self.term_at(index) == Some(term) {
            let following = (index < self.last_index).then(|| self.term_at(index + 1)).flatten();
            self.term_runs.retain(|r| r.first_index > index + 1);
            if let Some(term) = following {
                self.term_runs.insert(
                    0,
                    TermRun {
                        first_index: index + 1,
                        term,
                    },
                );
            }
            MarkerDisposition::RetainLaterEntries
        } else {
            self.term_runs.clear();
            self.last_index = index;
            MarkerDisposition::DiscardLog
        };
        self.snapshot = Some((index, term));
        Ok(disposition)
    }

    fn checkpoint(&self) -> Checkpoint {
        Checkpoint {
            snapshot: self.snapshot,
            hard_state: self.hard_state.clone(),
            last_index: self.last_index,
        }
    }
}

#[cfg(test)]
mod tests {
    use tempfile::TempDir;

    use super::*;
    use crate::wal::test_support::*;

    #[test]
    fn entries_hard_states_and_markers_round_trip_across_segments() {
        let dir = TempDir::new().unwrap();
        {
            let (mut wal, recovered) = open(dir.path(), small());
            assert!(recovered.entries.is_empty() && recovered.hard_state.is_none());
            for batch in 0..10u64 {
                let first = batch * 3 + 1;
                wal.append_entries(&entries(first..=first + 2, 1 + batch / 4)).unwrap();
                wal.append_hard_state(&hard_state(1 + batch / 4, 1, first)).unwrap();
                if batch == 5 {
                    wal.append_snapshot_marker(10, 1).unwrap();
                }
                wal.sync().unwrap();
            }
            assert!(wal.segment_count() > 3, "small segments should rotate");
        }
        let (_, recovered) = open(dir.path(), small());
        assert_eq!(recovered.snapshots, vec![(10, 1)]);
        assert_eq!(recovered.hard_state, Some(hard_state(3, 1, 28)));
        let expected: Vec<_> = (11..=30).map(|i| entry(i, 1 + (i - 1) / 12)).collect();
        assert_eq!(recovered.entries, expected);
        assert_eq!(recovered.truncated_tail, None);
    }

    #[test]
    fn a_later_entry_replaces_its_index_and_drops_everything_after_it() {
        let dir = TempDir::new().unwrap();
        {
            let (mut wal, _) = open(dir.path(), small());
            wal.append_entries(&entries(1..=10, 1)).unwrap();
            wal.sync().unwrap();
            wal.append_entries(&entries(6..=7, 2)).unwrap();
            wal.sync().unwrap();
        }
        let (_, recovered) = open(dir.path(), small());
        let mut expected = entries(1..=5, 1);
        expected.extend(entries(6..=7, 2));
        assert_eq!(recovered.entries, expected);
    }

    #[test]
    fn a_marker_the_log_matches_keeps_later_entries_and_one_it_contradicts_discards_the_log() {
        let dir = TempDir::new().unwrap();
        {
            let (mut wal, _) = open(dir.path(), WalOptions::default());
            wal.append_entries(&entries(1..=10, 1)).unwrap();
            wal.append_snapshot_marker(4, 1).unwrap();
            wal.sync().unwrap();
        }
        let (mut wal, recovered) = open(dir.path(), WalOptions::default());
        assert_eq!(recovered.entries, entries(5..=10, 1));
        wal.append_snapshot_marker(8, 5).unwrap();
        wal.sync().unwrap();
        drop(wal);
        let (mut wal, recovered) = open(dir.path(), WalOptions::default());
        assert_eq!(recovered.snapshots, vec![(4, 1), (8, 5)]);
        assert!(recovered.entries.is_empty());
        wal.append_entries(&entries(9..=9, 5)).unwrap();
        wal.sync().unwrap();
        drop(wal);
        let (_, recovered) = open(dir.path(), WalOptions::default());
        assert_eq!(recovered.entries, entries(9..=9, 5));
    }

    #[test]
    fn appends_that_break_the_log_are_refused_without_buffering_anything() {
        let dir = TempDir::new().unwrap();
        let (mut wal, _) = open(dir.path(), WalOptions::default());
        wal.append_entries(&entries(1..=3, 1)).unwrap();
        let gap = [entry(4, 1), entry(6, 1)];
        assert!(matches!(wal.append_entries(&gap), Err(WalError::InvalidAppend { .. })));
        wal.append_snapshot_marker(2, 1).unwrap();
        assert!(matches!(
            wal.append_entries(&entries(2..=2, 1)),
            Err(WalError::InvalidAppend { .. })
        ));
        assert!(matches!(
            wal.append_snapshot_marker(1, 1),
            Err(WalError::InvalidAppend { .. })
        ));
        assert!(matches!(
            wal.append_snapshot_marker(0, 0),
            Err(WalError::InvalidAppend { .. })
        ));
        wal.append_entries(&entries(4..=4, 1)).unwrap();
        wal.sync().unwrap();
        drop(wal);
        let (_, recovered) = open(dir.path(), WalOptions::default());
        assert_eq!(recovered.entries, entries(3..=4, 1));
    }

    #[test]
    fn unsynced_records_are_not_recovered_and_an_empty_sync_writes_nothing() {
        let dir = TempDir::new().unwrap();
        {
            let (mut wal, _) = open(dir.path(), WalOptions::default());
            wal.append_entries(&entries(1..=2, 1)).unwrap();
            assert!(wal.sync().unwrap() > 0);
            assert_eq!(wal.sync().unwrap(), 0);
            wal.append_entries(&entries(3..=4, 1)).unwrap();
            wal.append_hard_state(&hard_state(1, 1, 2)).unwrap();
        }
        let (_, recovered) = open(dir.path(), WalOptions::default());
        assert_eq!(recovered.entries, entries(1..=2, 1));
        assert_eq!(recovered.hard_state, None);
    }

    #[test]
    fn release_to_deletes_only_fully_covered_segments_and_keeps_marker_and_hard_state() {
        let dir = TempDir::new().unwrap();
        let opts = || WalOptions { segment_size: 150 };
        let (mut wal, _) = open(dir.path(), opts());
        wal.append_hard_state(&hard_state(1, 2, 0)).unwrap();
        for i in 1..=20 {
            wal.append_entries(&entries(i..=i, 1)).unwrap();
            wal.sync().unwrap();
        }
        let before: Vec<(u64, u64)> = wal.segments.iter().map(|s| (s.sequence, s.first_index)).collect();
        wal.append_snapshot_marker(12, 1).unwrap();
        wal.sync().unwrap();
        wal.release_to(12).unwrap();

        let survivors: Vec<(u64, u64)> = wal.segments.iter().map(|s| (s.sequence, s.first_index)).collect();
        let first_kept = before.iter().rposition(|&(_, first)| first <= 12).unwrap();
        assert_eq!(
            survivors[0], before[first_kept],
            "the segment holding entry 12 onwards stays"
        );
        assert!(first_kept > 0, "something must have been released");
        assert_eq!(segment_paths(dir.path()).len(), wal.segment_count());
        drop(wal);

        let (_, recovered) = open(dir.path(), opts());
        assert_eq!(recovered.snapshots, vec![(12, 1)]);
        assert_eq!(recovered.hard_state, Some(hard_state(1, 2, 0)));
        assert_eq!(recovered.entries, entries(13..=20, 1));
    }

    #[test]
    fn release_to_never_passes_the_synced_snapshot_marker_nor_deletes_the_active_segment() {
        let dir = TempDir::new().unwrap();
        let (mut wal, _) = open(dir.path(), WalOptions { segment_size: 150 });
        for i in 1..=20 {
            wal.append_entries(&entries(i..=i, 1)).unwrap();
            wal.sync().unwrap();
        }
        let count = wal.segment_count();
        wal.release_to(u64::MAX).unwrap();
        assert_eq!(wal.segment_count(), count, "no marker, nothing covered");
        wal.append_snapshot_marker(20, 1).unwrap();
        wal.release_to(u64::MAX).unwrap();
        assert_eq!(wal.segment_count(), count, "the marker is not synced yet");
        wal.sync().unwrap();
        wal.release_to(u64::MAX).unwrap();
        assert!(wal.segment_count() < count);
        assert!(
            wal.segments[1..].iter().all(|s| s.first_index > 20),
            "exactly the segments followed by one starting at or below 20 went"
        );
        drop(wal);
        let (_, recovered) = open(dir.path(), WalOptions::default());
        assert_eq!(recovered.snapshots, vec![(20, 1)]);
        assert!(recovered.entries.is_empty());
    }
}
