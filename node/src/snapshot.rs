//! Snapshot files on the data directory: naming, atomic creation, streaming reception from a
//! leader, and retention.
//!
//! A snapshot is named `{term:016x}-{index:016x}.snap`. Files are written to a `.tmp` name, fsynced,
//! renamed, and the directory fsynced, so a crash leaves either no snapshot or a whole one. Which
//! snapshot is current is decided by the write-ahead log's snapshot markers, not by the newest
//! file: a snapshot received from a leader that Raft then rejected never becomes current.

use std::fs::{self, File};
use std::io::BufWriter;
use std::path::{Path, PathBuf};

use crate::error::{Error, IoContext, Result};
use crate::identity::sync_dir;

const SUFFIX: &str = ".snap";
const TMP_SUFFIX: &str = ".snap.tmp";

/// The snapshot directory.
#[derive(Debug, Clone)]
pub struct SnapshotStore {
    dir: PathBuf,
}

/// A snapshot being written; becomes visible only through [`SnapshotStore::commit`].
pub struct PendingSnapshot {
    /// Where the bytes go until commit.
    pub tmp_path: PathBuf,
    /// The file handle, buffered.
    pub writer: BufWriter<File>,
    /// The snapshot's index.
    pub index: u64,
    /// The snapshot's term.
    pub term: u64,
}

impl SnapshotStore {
    /// Opens (creating) the directory and removes partial files left by a crash.
    pub fn open(dir: &Path) -> Result<Self> {
        fs::create_dir_all(dir).io_context(|| format!("create snapshot directory {}", dir.display()))?;
        let store = SnapshotStore { dir: dir.to_path_buf() };
        for entry in fs::read_dir(dir).io_context(|| format!("list {}", dir.display()))? {
            let path = entry.io_context(|| format!("list {}", dir.display()))?.path();
            if path.to_string_lossy().ends_with(TMP_SUFFIX) {
                tracing::info!(path = %path.display(), "removing partial snapshot left by a crash");
                fs::remove_file(&path).io_context(|| format!("remove {}", path.display()))?;
            }
        }
        Ok(store)
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The path of the snapshot at (index, term).
    pub fn path(&self, index: u64, term: u64) -> PathBuf {
        self.dir.join(format!("{term:016x}-{index:016x}{SUFFIX}"))
    }

    /// Starts writing the snapshot at (index, term).
    pub fn create(&self, index: u64, term: u64) -> Result<PendingSnapshot> {
        let tmp_path = self.temp_path(index, term);
        let file = File::create(&tmp_path).io_context(|| format!("create {}", tmp_path.display()))?;
        Ok(PendingSnapshot {
            tmp_path,
            writer: BufWriter::with_capacity(1 << 20, file),
            index,
            term,
        })
    }

    /// Makes a pending snapshot durable and visible under its final name.
    pub fn commit(&self, pending: PendingSnapshot) -> Result<PathBuf> {
        let PendingSnapshot {
            tmp_path,
            writer,
            index,
            term,
        } = pending;
        writer
            .into_inner()
            .map_err(|e| e.into_error())
            .io_context(|| format!("flush {}", tmp_path.display()))?;
        // The snapshot must be on disk before its name is, or a crash could leave a named but empty file.
        self.install(&tmp_path, index, term)
    }

    /// A fresh temporary path for a snapshot being received.
    pub fn temp_path(&self, index: u64, term: u64) -> PathBuf {
        self.dir.join(format!(
            "{term:016x}-{index:016x}-{:x}{TMP_SUFFIX}",
            rand::random::<u32>()
        ))
    }

    /// Makes a fully written temporary file durable and visible as the snapshot at (index, term).
    pub fn install(&self, tmp: &Path, index: u64, term: u64) -> Result<PathBuf> {
        File::open(tmp)
            .and_then(|f| f.sync_all())
            .io_context(|| format!("fsync {}", tmp.display()))?;
        let path = self.path(index, term);
        fs::rename(tmp, &path).io_context(|| format!("rename {} to {}", tmp.display(), path.display()))?;
        sync_dir(&self.dir)?;
        Ok(path)
    }

    /// Every complete snapshot as (index, term), oldest first.
    pub fn list(&self) -> Result<Vec<(u64, u64)>> {
        let mut out = Vec::new();
        for entry in fs::read_dir(&self.dir).io_context(|| format!("list {}", self.dir.display()))? {
            let name = entry.io_context(|| format!("list {}", self.dir.display()))?.file_name();
            let name = name.to_string_lossy();
            if let Some(stem) = name.strip_suffix(SUFFIX) {
                if let Some((t, i)) = stem.split_once('-') {
                    if let (Ok(term), Ok(index)) = (u64::from_str_radix(t, 16), u64::from_str_radix(i, 16)) {
                        out.push((index, term));
                    }
                }
            }
        }
        out.sort_unstable();
        Ok(out)
    }

    /// Deletes all but the newest `keep` snapshots, never `current`.
    pub fn retain(&self, keep: usize, current: (u64, u64)) -> Result<()> {
        let all = self.list()?;
        let excess = all.len().saturating_sub(keep);
        for &(index, term) in all.iter().take(excess) {
            if (index, term) == current {
                continue;
            }
            let path = self.path(index, term);
            fs::remove_file(&path).io_context(|| format!("remove old snapshot {}", path.display()))?;
        }
        Ok(())
    }

    /// Errors naming the snapshot file.
    pub fn corrupt(&self, index: u64, term: u64, reason: impl Into<String>) -> Error {
        Error::Snapshot {
            path: self.path(index, term),
            reason: reason.into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn snapshots_appear_only_once_committed_and_old_ones_are_pruned() {
        let dir = tempfile::tempdir().unwrap();
        let store = SnapshotStore::open(dir.path()).unwrap();
        let mut p = store.create(10, 2).unwrap();
        p.writer.write_all(b"hello").unwrap();
        assert!(store.list().unwrap().is_empty(), "a pending snapshot is invisible");
        let path = store.commit(p).unwrap();
        assert_eq!(fs::read(path).unwrap(), b"hello");
        for (i, t) in [(20, 2), (30, 3)] {
            let p = store.create(i, t).unwrap();
            store.commit(p).unwrap();
        }
        assert_eq!(store.list().unwrap(), vec![(10, 2), (20, 2), (30, 3)]);
        store.retain(2, (30, 3)).unwrap();
        assert_eq!(store.list().unwrap(), vec![(20, 2), (30, 3)]);
    }

    #[test]
    fn partial_files_are_removed_on_open() {
        let dir = tempfile::tempdir().unwrap();
        let store = SnapshotStore::open(dir.path()).unwrap();
        let p = store.create(5, 1).unwrap();
        let tmp = p.tmp_path.clone();
        drop(p);
        assert!(tmp.exists());
        SnapshotStore::open(dir.path()).unwrap();
        assert!(!tmp.exists());
    }
}
