//! Snapshot files on the data directory: naming, atomic creation, streaming reception from a
//! leader, retention, and every read and write of a snapshot's contents (the whole state, or
//! just its header).
//!
//! A snapshot is named `{term:016x}-{index:016x}.snap`. Files are written to a `.tmp` name, fsynced,
//! renamed, and the directory fsynced, so a crash leaves either no snapshot or a whole one. Which
//! snapshot is current is decided by the write-ahead log's snapshot markers, not by the newest
//! file: a snapshot received from a leader that Raft then rejected never becomes current.

use std::fs::{self, File};
use std::io::{BufReader, BufWriter};
use std::path::{Path, PathBuf};

use raft::prelude::SnapshotMetadata;

use crate::error::{Error, IoContext, Result};
use crate::identity::sync_dir;
use crate::kv::{KvState, SnapshotHeader};

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

    /// Writes `state` as the durable snapshot at its applied index (temporary file, fsync,
    /// rename, directory fsync) and returns its metadata. Blocking: call it off the async
    /// workers.
    pub fn write(&self, state: &KvState) -> Result<SnapshotMetadata> {
        let started = std::time::Instant::now();
        let (index, term) = (state.applied_index, state.applied_term);
        let pending = self.create(index, term)?;
        let tmp = pending.tmp_path.clone();
        let written = (|| {
            // Fault tests: the write fails as it does on a full disk.
            fail::fail_point!("snapshot::write", |_| Err(Error::Io {
                context: format!("write snapshot {}", tmp.display()),
                source: std::io::Error::new(
                    std::io::ErrorKind::StorageFull,
                    "no space left on device (injected by a fail point)"
                ),
            }));
            let writer = state
                .write_snapshot(pending.writer)
                .io_context(|| format!("write snapshot {}", tmp.display()))?;
            fail::fail_point!("snapshot::before_save");
            self.commit(PendingSnapshot { writer, ..pending })
        })();
        let path = match written {
            Ok(path) => path,
            Err(e) => {
                // A partial file on a full disk would keep it full: give its space back now.
                let _ = fs::remove_file(&tmp);
                return Err(e);
            }
        };
        fail::fail_point!("snapshot::after_save");
        tracing::info!(index, term, keys = state.data.len(), path = %path.display(), elapsed_ms = started.elapsed().as_millis() as u64, "snapshot written");
        Ok(metadata_of(state))
    }

    /// Reads the whole snapshot at `(index, term)`, checking its checksum and that it holds
    /// that index. Blocking: call it off the async workers.
    pub fn load(&self, index: u64, term: u64) -> Result<KvState> {
        let path = self.path(index, term);
        let file = File::open(&path).io_context(|| format!("open snapshot {}", path.display()))?;
        let state = KvState::read_snapshot(BufReader::with_capacity(1 << 20, file))
            .map_err(|reason| self.corrupt(index, term, reason))?;
        if state.applied_index != index {
            return Err(self.corrupt(index, term, format!("holds index {}", state.applied_index)));
        }
        Ok(state)
    }

    /// Reads only the header of the snapshot at `(index, term)`: its cluster and membership.
    pub fn load_header(&self, index: u64, term: u64) -> Result<SnapshotHeader> {
        let path = self.path(index, term);
        File::open(&path)
            .map_err(|e| e.to_string())
            .and_then(|f| KvState::read_snapshot_header(BufReader::new(f)))
            .map_err(|reason| self.corrupt(index, term, reason))
    }
}

/// The Raft metadata of a snapshot of `state`: its applied index and term, and its configuration.
pub fn metadata_of(state: &KvState) -> SnapshotMetadata {
    let mut meta = SnapshotMetadata::default();
    meta.index = state.applied_index;
    meta.term = state.applied_term;
    meta.set_conf_state(state.membership.conf_state());
    meta
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
