//! The write-ahead log: the only durable home of a member's Raft log entries, hard state and
//! snapshot markers until a snapshot makes them redundant.
//!
//! The log owns one directory of segment files. Callers buffer records with the `append_*`
//! methods and make them durable with [`Wal::sync`], which writes the whole batch with one
//! `write` and one `fdatasync` (group commit). [`Wal::open`] replays every segment and hands back
//! the effective log as [`Recovered`]; [`Wal::release_to`] deletes segments that a snapshot has
//! made redundant.
//!
//! # On-disk format
//!
//! A segment is named `{sequence:016x}-{first_index:016x}.wal`, so a plain sort orders segments
//! oldest first. `first_index` is the index the next entry would have had when the segment was
//! created; [`Wal::release_to`] compares it against the snapshot index. A segment is created as
//! `….wal.tmp`, filled with its file header and preamble, fsynced and only then renamed into
//! place, so a segment under its final name never has a torn beginning.
//!
//! ```text
//! segment  := file_header record*
//! file_header (12 bytes) := FILE_MAGIC (8 bytes) | FORMAT_VERSION (u32 LE)
//! record   := payload_len (u32 LE)
//!           | body_crc    (u32 LE, CRC32C of kind + payload)
//!           | header_crc  (u32 LE, CRC32C of the 8 bytes before it)
//!           | kind        (u8: 1 entry, 2 hard state, 3 snapshot marker)
//!           | payload     (payload_len bytes)
//! entry payload      := raft `Entry` protobuf
//! hard state payload := raft `HardState` protobuf
//! marker payload     := index (u64 LE) | term (u64 LE) | disposition (u8: 0 discard, 1 retain)
//! ```
//!
//! The header has its own checksum so that a damaged length is caught before it is trusted to
//! find the next record. Every segment begins with a preamble: the snapshot marker and hard
//! state in force when it was created (empty for the first segment of a new log), so older
//! segments can be deleted without losing either.
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

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use protobuf::Message;
use raft::prelude::{Entry, HardState};

/// Identifies a raftkv WAL segment; checked before any record is trusted.
pub const FILE_MAGIC: [u8; 8] = *b"RAFTKVWL";
/// Version of the segment layout described in the module docs; bumped on any incompatible change.
pub const FORMAT_VERSION: u32 = 1;
/// Bytes before the first record of a segment: magic, then version.
pub const FILE_HEADER_LEN: usize = FILE_MAGIC.len() + 4;
/// Bytes of a record header: payload length, body checksum, header checksum.
pub const RECORD_HEADER_LEN: usize = 12;
/// Record kind: a raft `Entry`, protobuf-encoded.
pub const RECORD_ENTRY: u8 = 1;
/// Record kind: a raft `HardState`, protobuf-encoded.
pub const RECORD_HARD_STATE: u8 = 2;
/// Record kind: a snapshot marker, [`MARKER_PAYLOAD_LEN`] bytes.
pub const RECORD_SNAPSHOT_MARKER: u8 = 3;
/// Snapshot marker payload: index (u64 LE), term (u64 LE), disposition (u8).
pub const MARKER_PAYLOAD_LEN: usize = 17;
/// Marker disposition: the log did not hold the marker's (index, term), so every entry goes.
pub const MARKER_DISCARDS_LOG: u8 = 0;
/// Marker disposition: the log held the marker's (index, term), so entries after it stay.
pub const MARKER_RETAINS_LATER_ENTRIES: u8 = 1;
/// Extension of a complete segment.
const SEGMENT_EXTENSION: &str = "wal";
/// Extension of a segment still being created; any found at open are leftovers of a crash.
const TEMPORARY_EXTENSION: &str = "wal.tmp";
/// Sequence number of the first segment of a new log.
const FIRST_SEQUENCE: u64 = 1;

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

        let pending = replay.shape();
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

        let recovered = Recovered {
            snapshots: replay.snapshots,
            hard_state: replay.hard_state,
            entries: replay.entries,
            truncated_tail: torn,
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
        // Fault tests: crash before the batch reaches the file, or fail the write as a full disk does.
        fail::fail_point!("wal::before_write", |_| Err(injected_full_disk(
            "write to segment",
            path
        )));
        self.active
            .write_all(&self.buffer)
            .map_err(io_error("write to segment", path))?;
        fail::fail_point!("wal::before_sync", |_| Err(injected_full_disk("fsync segment", path)));
        // Durability point: no record in this batch may be reported persisted (and so no
        // message depending on it sent) before this fdatasync returns.
        self.active.sync_data().map_err(io_error("fsync segment", path))?;
        fail::fail_point!("wal::after_sync");
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

/// One segment file.
#[derive(Debug, Clone)]
struct Segment {
    /// Position in the log; consecutive segments have consecutive sequences.
    sequence: u64,
    /// The index the next entry would have had when the segment was created.
    first_index: u64,
    path: PathBuf,
}

fn segment_file_name(sequence: u64, first_index: u64) -> String {
    format!("{sequence:016x}-{first_index:016x}.{SEGMENT_EXTENSION}")
}

fn parse_segment_file_name(name: &str) -> Option<(u64, u64)> {
    let stem = name.strip_suffix(SEGMENT_EXTENSION)?.strip_suffix('.')?;
    let (sequence, first_index) = stem.split_once('-')?;
    if sequence.len() != 16 || first_index.len() != 16 {
        return None;
    }
    Some((
        u64::from_str_radix(sequence, 16).ok()?,
        u64::from_str_radix(first_index, 16).ok()?,
    ))
}

fn ensure_directory(dir: &Path) -> Result<()> {
    if dir.is_dir() {
        return Ok(());
    }
    fs::create_dir_all(dir).map_err(io_error("create directory", dir))?;
    // The new directory entry lives in the parent; without this a crash could lose the
    // directory and every segment later fsynced inside it.
    if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
        sync_directory(parent)?;
    }
    Ok(())
}

/// The error a fail point returns in place of a real write: what a full disk reports.
#[cfg(feature = "failpoints")]
fn injected_full_disk(op: &'static str, path: &Path) -> WalError {
    WalError::Io {
        op,
        path: path.to_path_buf(),
        source: io::Error::new(
            io::ErrorKind::StorageFull,
            "no space left on device (injected by a fail point)",
        ),
    }
}

fn sync_directory(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_error("fsync directory", dir))
}

fn remove_leftover_temporaries(dir: &Path) -> Result<()> {
    let mut removed = false;
    for entry in fs::read_dir(dir).map_err(io_error("list directory", dir))? {
        let path = entry.map_err(io_error("list directory", dir))?.path();
        let is_temporary = path
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.ends_with(&format!(".{TEMPORARY_EXTENSION}")));
        if is_temporary {
            // A temporary segment was never renamed into place, so nothing in it was acknowledged.
            fs::remove_file(&path).map_err(io_error("delete unfinished segment", &path))?;
            tracing::warn!(path = %path.display(), "deleted unfinished write-ahead log segment");
            removed = true;
        }
    }
    if removed {
        sync_directory(dir)?;
    }
    Ok(())
}

fn list_segments(dir: &Path) -> Result<Vec<Segment>> {
    let mut segments = Vec::new();
    for entry in fs::read_dir(dir).map_err(io_error("list directory", dir))? {
        let path = entry.map_err(io_error("list directory", dir))?.path();
        let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        if !name.ends_with(&format!(".{SEGMENT_EXTENSION}")) {
            continue;
        }
        let Some((sequence, first_index)) = parse_segment_file_name(name) else {
            return Err(WalError::Corrupt {
                path,
                offset: 0,
                reason: "segment file name is not {sequence:016x}-{first_index:016x}.wal".into(),
            });
        };
        segments.push(Segment {
            sequence,
            first_index,
            path,
        });
    }
    segments.sort_by_key(|s| s.sequence);
    for pair in segments.windows(2) {
        if pair[1].sequence != pair[0].sequence + 1 {
            // Only a prefix is ever released, so a gap means a segment vanished mid-log.
            return Err(WalError::Corrupt {
                path: pair[1].path.clone(),
                offset: 0,
                reason: format!(
                    "segment follows sequence {:#x} but expected {:#x}",
                    pair[0].sequence,
                    pair[0].sequence + 1
                ),
            });
        }
    }
    Ok(segments)
}

/// Creates a segment atomically: written and fsynced under a temporary name, renamed, and the
/// directory fsynced, so the preamble is durable before any older segment may rely on it.
fn create_segment(dir: &Path, sequence: u64, carried: &Checkpoint) -> Result<(Segment, File, u64)> {
    let path = dir.join(segment_file_name(sequence, carried.last_index + 1));
    let temporary = path.with_extension(TEMPORARY_EXTENSION);
    let mut contents = file_header();
    encode_preamble(&mut contents, carried)?;
    let mut file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(&temporary)
        .map_err(io_error("create segment", &temporary))?;
    file.write_all(&contents)
        .map_err(io_error("write segment preamble", &temporary))?;
    file.sync_data().map_err(io_error("fsync new segment", &temporary))?;
    fs::rename(&temporary, &path).map_err(io_error("rename new segment", &temporary))?;
    sync_directory(dir)?;
    let segment = Segment {
        sequence,
        first_index: carried.last_index + 1,
        path,
    };
    Ok((segment, file, contents.len() as u64))
}

fn truncate_file(path: &Path, len: u64) -> Result<()> {
    let file = OpenOptions::new()
        .write(true)
        .open(path)
        .map_err(io_error("open segment to truncate", path))?;
    file.set_len(len).map_err(io_error("truncate torn tail of", path))?;
    file.sync_all().map_err(io_error("fsync truncated segment", path))
}

// ---------------------------------------------------------------------------------------------
// Encoding and decoding: pure functions over bytes.
// ---------------------------------------------------------------------------------------------

fn file_header() -> Vec<u8> {
    let mut header = Vec::with_capacity(FILE_HEADER_LEN);
    header.extend_from_slice(&FILE_MAGIC);
    header.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    header
}

/// Appends one framed record to `out`.
fn encode_record(out: &mut Vec<u8>, kind: u8, payload: &[u8]) -> Result<()> {
    let len =
        u32::try_from(payload.len()).map_err(|_| invalid(format!("record of {} bytes is too large", payload.len())))?;
    let body_crc = crc32c::crc32c_append(crc32c::crc32c(&[kind]), payload);
    let mut header = [0u8; RECORD_HEADER_LEN];
    header[0..4].copy_from_slice(&len.to_le_bytes());
    header[4..8].copy_from_slice(&body_crc.to_le_bytes());
    let header_crc = crc32c::crc32c(&header[0..8]);
    header[8..12].copy_from_slice(&header_crc.to_le_bytes());
    out.reserve(RECORD_HEADER_LEN + 1 + payload.len());
    out.extend_from_slice(&header);
    out.push(kind);
    out.extend_from_slice(payload);
    Ok(())
}

fn encode_marker(index: u64, term: u64, disposition: MarkerDisposition) -> [u8; MARKER_PAYLOAD_LEN] {
    let mut payload = [0u8; MARKER_PAYLOAD_LEN];
    payload[0..8].copy_from_slice(&index.to_le_bytes());
    payload[8..16].copy_from_slice(&term.to_le_bytes());
    payload[16] = match disposition {
        MarkerDisposition::DiscardLog => MARKER_DISCARDS_LOG,
        MarkerDisposition::RetainLaterEntries => MARKER_RETAINS_LATER_ENTRIES,
    };
    payload
}

/// The records a new segment starts with, so that every older segment can be released.
fn encode_preamble(out: &mut Vec<u8>, carried: &Checkpoint) -> Result<()> {
    if let Some((index, term)) = carried.snapshot {
        // The marker is already in force, so re-applying it must keep whatever follows it.
        let payload = encode_marker(index, term, MarkerDisposition::RetainLaterEntries);
        encode_record(out, RECORD_SNAPSHOT_MARKER, &payload)?;
    }
    if let Some(hs) = &carried.hard_state {
        let payload = hs
            .write_to_bytes()
            .map_err(|e| invalid(format!("hard state cannot be encoded: {e}")))?;
        encode_record(out, RECORD_HARD_STATE, &payload)?;
    }
    Ok(())
}

/// A decoded record.
#[derive(Debug, Clone, PartialEq)]
enum Record {
    Entry(Entry),
    HardState(HardState),
    SnapshotMarker {
        index: u64,
        term: u64,
        disposition: MarkerDisposition,
    },
}

fn decode_record(kind: u8, payload: &[u8]) -> Result<Record, String> {
    match kind {
        RECORD_ENTRY => Entry::parse_from_bytes(payload)
            .map(Record::Entry)
            .map_err(|e| format!("entry record does not decode: {e}")),
        RECORD_HARD_STATE => HardState::parse_from_bytes(payload)
            .map(Record::HardState)
            .map_err(|e| format!("hard state record does not decode: {e}")),
        RECORD_SNAPSHOT_MARKER => {
            if payload.len() != MARKER_PAYLOAD_LEN {
                return Err(format!(
                    "snapshot marker payload is {} bytes, expected {MARKER_PAYLOAD_LEN}",
                    payload.len()
                ));
            }
            let index = u64::from_le_bytes(payload[0..8].try_into().expect("8 bytes"));
            let term = u64::from_le_bytes(payload[8..16].try_into().expect("8 bytes"));
            let disposition = match payload[16] {
                MARKER_DISCARDS_LOG => MarkerDisposition::DiscardLog,
                MARKER_RETAINS_LATER_ENTRIES => MarkerDisposition::RetainLaterEntries,
                other => return Err(format!("unknown snapshot marker disposition {other}")),
            };
            Ok(Record::SnapshotMarker {
                index,
                term,
                disposition,
            })
        }
        other => Err(format!("unknown record kind {other}")),
    }
}

/// The records of one segment, and where its torn tail starts if it has one.
#[derive(Debug)]
struct SegmentScan {
    records: Vec<(u64, Record)>,
    torn_at: Option<u64>,
}

/// Where and why a segment could not be read.
#[derive(Debug, PartialEq)]
struct ScanError {
    offset: u64,
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
fn scan_segment(bytes: &[u8], is_last: bool) -> Result<SegmentScan, ScanError> {
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

// ---------------------------------------------------------------------------------------------
// Log semantics: what a sequence of records means.
// ---------------------------------------------------------------------------------------------

/// What a snapshot marker does to the entries already in the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum MarkerDisposition {
    /// The log did not hold the marker's (index, term): nothing in it is trustworthy.
    DiscardLog,
    /// The log held the marker's (index, term): entries after it remain valid.
    RetainLaterEntries,
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
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeMap;
    use tempfile::TempDir;

    fn entry(index: u64, term: u64) -> Entry {
        Entry {
            index,
            term,
            data: format!("payload {index}/{term}").into_bytes().into(),
            ..Default::default()
        }
    }

    fn entries(range: std::ops::RangeInclusive<u64>, term: u64) -> Vec<Entry> {
        range.map(|i| entry(i, term)).collect()
    }

    fn hard_state(term: u64, vote: u64, commit: u64) -> HardState {
        HardState {
            term,
            vote,
            commit,
            ..Default::default()
        }
    }

    fn small() -> WalOptions {
        WalOptions { segment_size: 256 }
    }

    fn open(dir: &Path, opts: WalOptions) -> (Wal, Recovered) {
        Wal::open(dir, opts).expect("open")
    }

    fn segment_paths(dir: &Path) -> Vec<PathBuf> {
        let mut paths: Vec<_> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|x| x == SEGMENT_EXTENSION))
            .collect();
        paths.sort();
        paths
    }

    fn file_len(path: &Path) -> u64 {
        fs::metadata(path).unwrap().len()
    }

    fn set_len(path: &Path, len: u64) {
        OpenOptions::new().write(true).open(path).unwrap().set_len(len).unwrap();
    }

    fn flip_bit(path: &Path, offset: u64) {
        let mut bytes = fs::read(path).unwrap();
        bytes[offset as usize] ^= 0x10;
        fs::write(path, bytes).unwrap();
    }

    fn copy_dir(from: &Path) -> TempDir {
        let to = TempDir::new().unwrap();
        for path in segment_paths(from) {
            fs::copy(&path, to.path().join(path.file_name().unwrap())).unwrap();
        }
        to
    }

    /// Offsets of every record in a segment, from a clean scan.
    fn record_offsets(path: &Path) -> Vec<u64> {
        let scan = scan_segment(&fs::read(path).unwrap(), false).unwrap();
        scan.records.iter().map(|(offset, _)| *offset).collect()
    }

    fn expect_corrupt(dir: &Path) -> (PathBuf, u64, String) {
        match Wal::open(dir, small()) {
            Err(WalError::Corrupt { path, offset, reason }) => (path, offset, reason),
            Err(other) => panic!("expected Corrupt, got {other}"),
            Ok((_, recovered)) => panic!("expected Corrupt, recovered {recovered:?}"),
        }
    }

    #[test]
    fn record_framing_round_trips_every_kind() {
        let records = [
            Record::Entry(entry(7, 3)),
            Record::HardState(hard_state(3, 2, 6)),
            Record::SnapshotMarker {
                index: 5,
                term: 2,
                disposition: MarkerDisposition::RetainLaterEntries,
            },
            Record::SnapshotMarker {
                index: 9,
                term: 4,
                disposition: MarkerDisposition::DiscardLog,
            },
        ];
        let mut bytes = file_header();
        for record in &records {
            match record {
                Record::Entry(e) => encode_record(&mut bytes, RECORD_ENTRY, &e.write_to_bytes().unwrap()),
                Record::HardState(hs) => encode_record(&mut bytes, RECORD_HARD_STATE, &hs.write_to_bytes().unwrap()),
                Record::SnapshotMarker {
                    index,
                    term,
                    disposition,
                } => encode_record(
                    &mut bytes,
                    RECORD_SNAPSHOT_MARKER,
                    &encode_marker(*index, *term, *disposition),
                ),
            }
            .unwrap();
        }
        let scan = scan_segment(&bytes, false).unwrap();
        let decoded: Vec<_> = scan.records.into_iter().map(|(_, r)| r).collect();
        assert_eq!(decoded, records);
        assert_eq!(scan.torn_at, None);
    }

    #[test]
    fn a_segment_without_the_magic_is_corrupt_at_offset_zero() {
        let mut bytes = file_header();
        bytes[0] ^= 1;
        assert_eq!(scan_segment(&bytes, true).unwrap_err().offset, 0);
    }

    #[test]
    fn segment_names_sort_by_sequence_and_parse_back() {
        let a = segment_file_name(2, 0xffff);
        let b = segment_file_name(10, 1);
        assert!(a < b);
        assert_eq!(parse_segment_file_name(&b), Some((10, 1)));
        assert_eq!(parse_segment_file_name("00-01.wal"), None);
    }

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

    /// Writes entries 1..=12 with syncs between, so every segment holds several records.
    fn write_twelve_entries(dir: &Path, opts: WalOptions) {
        let (mut wal, _) = open(dir, opts);
        for i in 1..=12 {
            wal.append_entries(&entries(i..=i, 1)).unwrap();
            wal.sync().unwrap();
        }
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
    fn a_missing_middle_segment_is_reported_as_corrupt() {
        let dir = TempDir::new().unwrap();
        write_twelve_entries(dir.path(), WalOptions { segment_size: 150 });
        let segments = segment_paths(dir.path());
        fs::remove_file(&segments[1]).unwrap();
        let (path, offset, _) = expect_corrupt(dir.path());
        assert_eq!((path, offset), (segments[2].clone(), 0));
    }

    #[test]
    fn a_leftover_temporary_segment_is_removed_on_open() {
        let dir = TempDir::new().unwrap();
        write_twelve_entries(dir.path(), WalOptions::default());
        let leftover = dir.path().join(format!("{}.tmp", segment_file_name(2, 13)));
        fs::write(&leftover, b"half a header").unwrap();
        let (_, recovered) = open(dir.path(), WalOptions::default());
        assert_eq!(recovered.entries.len(), 12);
        assert!(!leftover.exists());
    }

    #[test]
    fn open_creates_a_missing_directory() {
        let parent = TempDir::new().unwrap();
        let dir = parent.path().join("a").join("wal");
        let (wal, _) = open(&dir, WalOptions::default());
        assert_eq!(wal.dir(), dir);
        assert_eq!(wal.segment_count(), 1);
        assert_eq!(segment_paths(&dir).len(), 1);
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
