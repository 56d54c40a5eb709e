//! What the log's unit tests share: building entries and hard states, opening a log, and
//! inspecting or damaging its segment files.

use std::fs::{self, OpenOptions};
use std::path::{Path, PathBuf};

use raft::prelude::{Entry, HardState};
use tempfile::TempDir;

use super::file::SEGMENT_EXTENSION;
use super::replay::scan_segment;
use super::{Recovered, Wal, WalError, WalOptions};

pub(super) fn entry(index: u64, term: u64) -> Entry {
    Entry {
        index,
        term,
        data: format!("payload {index}/{term}").into_bytes().into(),
        ..Default::default()
    }
}

pub(super) fn entries(range: std::ops::RangeInclusive<u64>, term: u64) -> Vec<Entry> {
    range.map(|i| entry(i, term)).collect()
}

pub(super) fn hard_state(term: u64, vote: u64, commit: u64) -> HardState {
    HardState {
        term,
        vote,
        commit,
        ..Default::default()
    }
}

pub(super) fn small() -> WalOptions {
    WalOptions { segment_size: 256 }
}

pub(super) fn open(dir: &Path, opts: WalOptions) -> (Wal, Recovered) {
    Wal::open(dir, opts).expect("open")
}

pub(super) fn segment_paths(dir: &Path) -> Vec<PathBuf> {
    let mut paths: Vec<_> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == SEGMENT_EXTENSION))
        .collect();
    paths.sort();
    paths
}

pub(super) fn file_len(path: &Path) -> u64 {
    fs::metadata(path).unwrap().len()
}

pub(super) fn set_len(path: &Path, len: u64) {
    OpenOptions::new().write(true).open(path).unwrap().set_len(len).unwrap();
}

pub(super) fn flip_bit(path: &Path, offset: u64) {
    let mut bytes = fs::read(path).unwrap();
    bytes[offset as usize] ^= 0x10;
    fs::write(path, bytes).unwrap();
}

pub(super) fn copy_dir(from: &Path) -> TempDir {
    let to = TempDir::new().unwrap();
    for path in segment_paths(from) {
        fs::copy(&path, to.path().join(path.file_name().unwrap())).unwrap();
    }
    to
}

/// Offsets of every record in a segment, from a clean scan.
pub(super) fn record_offsets(path: &Path) -> Vec<u64> {
    let scan = scan_segment(&fs::read(path).unwrap(), false).unwrap();
    scan.records.iter().map(|(offset, _)| *offset).collect()
}

pub(super) fn expect_corrupt(dir: &Path) -> (PathBuf, u64, String) {
    match Wal::open(dir, small()) {
        Err(WalError::Corrupt { path, offset, reason }) => (path, offset, reason),
        Err(other) => panic!("expected Corrupt, got {other}"),
        Ok((_, recovered)) => panic!("expected Corrupt, recovered {recovered:?}"),
    }
}

/// Writes entries 1..=12 with syncs between, so every segment holds several records.
pub(super) fn write_twelve_entries(dir: &Path, opts: WalOptions) {
    let (mut wal, _) = open(dir, opts);
    for i in 1..=12 {
        wal.append_entries(&entries(i..=i, 1)).unwrap();
        wal.sync().unwrap();
    }
}
