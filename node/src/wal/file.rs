//! Segment files on disk: their names, the directory they live in, and every file-system call
//! the log makes on them — atomic creation, the durable append of a batch, truncation, and the
//! directory fsyncs that make creations and deletions durable. The fault suite's fail points
//! sit here, at the calls they stand in for.
//!
//! A segment is named `{sequence:016x}-{first_index:016x}.wal`, so a plain sort orders segments
//! oldest first. `first_index` is the index the next entry would have had when the segment was
//! created; [`Wal::release_to`](super::Wal::release_to) compares it against the snapshot index.
//! A segment is created as `….wal.tmp`, filled with its file header and preamble, fsynced and
//! only then renamed into place, so a segment under its final name never has a torn beginning.

use std::fs::{self, File, OpenOptions};
#[cfg(feature = "failpoints")]
use std::io;
use std::io::Write;
use std::path::{Path, PathBuf};

use super::format::{encode_preamble, file_header};
use super::{io_error, Checkpoint, Result, WalError};

/// Extension of a complete segment.
pub(super) const SEGMENT_EXTENSION: &str = "wal";
/// Extension of a segment still being created; any found at open are leftovers of a crash.
const TEMPORARY_EXTENSION: &str = "wal.tmp";
/// Sequence number of the first segment of a new log.
pub(super) const FIRST_SEQUENCE: u64 = 1;

/// One segment file.
#[derive(Debug, Clone)]
pub(super) struct Segment {
    /// Position in the log; consecutive segments have consecutive sequences.
    pub(super) sequence: u64,
    /// The index the next entry would have had when the segment was created.
    pub(super) first_index: u64,
    pub(super) path: PathBuf,
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

pub(super) fn ensure_directory(dir: &Path) -> Result<()> {
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

pub(super) fn sync_directory(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_error("fsync directory", dir))
}

pub(super) fn remove_leftover_temporaries(dir: &Path) -> Result<()> {
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

pub(super) fn list_segments(dir: &Path) -> Result<Vec<Segment>> {
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
pub(super) fn create_segment(dir: &Path, sequence: u64, carried: &Checkpoint) -> Result<(Segment, File, u64)> {
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

pub(super) fn truncate_file(path: &Path, len: u64) -> Result<()> {
    let file = OpenOptions::new()
        .write(true)
        .open(path)
        .map_err(io_error("open segment to truncate", path))?;
    file.set_len(len).map_err(io_error("truncate torn tail of", path))?;
    file.sync_all().map_err(io_error("fsync truncated segment", path))
}

/// Appends `batch` to the end of the active segment `file` (at `path`) and fdatasyncs it.
pub(super) fn append_durably(file: &mut File, path: &Path, batch: &[u8]) -> Result<()> {
    // Fault tests: crash before the batch reaches the file, or fail the write as a full disk does.
    fail::fail_point!("wal::before_write", |_| Err(injected_full_disk(
        "write to segment",
        path
    )));
    file.write_all(batch).map_err(io_error("write to segment", path))?;
    fail::fail_point!("wal::before_sync", |_| Err(injected_full_disk("fsync segment", path)));
    // Durability point: no record in this batch may be reported persisted (and so no
    // message depending on it sent) before this fdatasync returns.
    file.sync_data().map_err(io_error("fsync segment", path))?;
    fail::fail_point!("wal::after_sync");
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::fs;

    use tempfile::TempDir;

    use super::*;
    use crate::wal::test_support::{expect_corrupt, open, segment_paths, write_twelve_entries};
    use crate::wal::WalOptions;

    #[test]
    fn segment_names_sort_by_sequence_and_parse_back() {
        let a = segment_file_name(2, 0xffff);
        let b = segment_file_name(10, 1);
        assert!(a < b);
        assert_eq!(parse_segment_file_name(&b), Some((10, 1)));
        assert_eq!(parse_segment_file_name("00-01.wal"), None);
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
}
