//! `raftkv-node restore`: seeds an empty data directory from a backup (the body of
//! `GET /v1/snapshot`) as the single voter of a NEW cluster.
//!
//! The rules, in the order they are enforced:
//! - the data directory must be empty (a `lost+found` of a fresh filesystem aside): restoring
//!   over a member's data would mix two histories. A directory an interrupted restore left
//!   (it still holds [`IN_PROGRESS_FILE`]) is cleared and restored again, and the node refuses
//!   to start on it meanwhile;
//! - the backup is read and verified completely (format version, every record, the trailing
//!   checksum) before the first byte is written, so a damaged, truncated or unknown file leaves
//!   the directory as it was;
//! - the restored member belongs to a new cluster: a fresh random cluster id, so the members of
//!   the old cluster and the restored one refuse each other's peer traffic (the transport checks
//!   the cluster id), and a membership of this one voter, bootstrapped here once and never again
//!   (DESIGN.md's single-bootstrap rule: the other members join it as learners);
//! - revisions continue: the new log starts at the backup's index and term, so the first write
//!   after the restore gets a revision above every revision in the backup.
//!
//! Running the same restore again on a directory it completed is a no-op that succeeds (an init
//! container restarted after the restore), recognised by [`RESTORED_FILE`]: the same backup
//! (source cluster, revision, checksum) finds nothing to do; any other backup is refused.

use std::fs::{self, File};
use std::io::{BufReader, Read};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::consensus;
use crate::error::{Error, IoContext, Result};
use crate::identity::{self, sync_dir, Identity, MAX_MEMBER_ID};
use crate::kv::{KvState, Membership};
use crate::snapshot::SnapshotStore;
use crate::wal::{Wal, WalOptions};

/// Present while a restore writes the directory; the node refuses to start on it.
pub const IN_PROGRESS_FILE: &str = "restore-in-progress";
/// Written by a completed restore: which backup the directory was seeded from.
pub const RESTORED_FILE: &str = "restored-from.json";
/// What a restore writes into the data directory, and so what an interrupted one may clear.
const WRITTEN: &[&str] = &[
    "wal",
    "snap",
    "member.json",
    "member.json.tmp",
    RESTORED_FILE,
    "restored-from.json.tmp",
];
/// Created by `mkfs` on a fresh volume; not data.
const LOST_AND_FOUND: &str = "lost+found";

/// `raftkv-node restore`: seed a new single-member cluster from a backup.
#[derive(clap::Args, Debug, Clone)]
pub struct RestoreArgs {
    /// The backup file (the body of `GET /v1/snapshot`), or `-` for standard input.
    #[arg(long)]
    pub from: String,
    /// The data directory to create the member in; it must be empty.
    #[arg(long, env = "RAFTKV_DATA_DIR")]
    pub data_dir: PathBuf,
    /// The member id of the restored member (default: a random id, as a node creates on an
    /// empty volume).
    #[arg(long, env = "RAFTKV_ID", value_parser = clap::value_parser!(u64).range(1..=MAX_MEMBER_ID))]
    pub id: Option<u64>,
    /// The URL other members reach the restored member's peer port at, recorded in the new
    /// membership (the node's `--advertise-peer-url`). Without it the membership has no URL for
    /// the member until peers learn it from its own connections.
    #[arg(long, env = "RAFTKV_ADVERTISE_PEER_URL", value_parser = parse_peer_url)]
    pub peer_url: Option<String>,
}

/// What a restore did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Restored {
    /// The cluster the backup was taken from.
    pub source_cluster_id: u64,
    /// The backup's revision (its Raft index); the restored log continues after it.
    pub revision: u64,
    /// The backup's trailing crc32c, which with the two above identifies the backup.
    pub checksum: u32,
    /// Keys restored.
    pub keys: u64,
    /// The new cluster's id.
    pub cluster_id: u64,
    /// The restored member's id.
    pub id: u64,
}

/// Whether the directory was written now or already held this restore.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The directory was seeded now.
    Written(Restored),
    /// The directory already held a completed restore of the same backup; nothing was written.
    AlreadyRestored(Restored),
}

fn parse_peer_url(url: &str) -> std::result::Result<String, String> {
    let uri: http::Uri = url.parse().map_err(|e| format!("{url:?} is not a URL: {e}"))?;
    if uri.scheme_str() != Some("http") || uri.host().is_none() {
        return Err(format!("{url:?} must be http://host:port"));
    }
    Ok(url.to_string())
}

/// Runs a restore. Blocking (it reads and writes files): call it off the async workers.
pub fn restore(args: &RestoreArgs) -> Result<Outcome> {
    let dir = &args.data_dir;
    let previous = inspect(dir)?;
    let source = if args.from == "-" {
        "standard input".to_string()
    } else {
        args.from.clone()
    };
    let bad_backup = |reason: String| Error::BadBackup {
        from: source.clone(),
        reason,
    };
    // DURABILITY: nothing is written before the whole backup has been read and its checksum
    // checked: a damaged or truncated file must leave the directory untouched.
    let (mut state, checksum) = if args.from == "-" {
        read_backup(std::io::stdin().lock())
    } else {
        let file = File::open(&args.from).map_err(|e| bad_backup(format!("cannot open: {e}")))?;
        read_backup(file)
    }
    .map_err(bad_backup)?;
    if state.applied_index == 0 || state.applied_term == 0 {
        // Every member's state is at index 1 or later from its bootstrap on; a log cannot
        // start at index 0.
        return Err(bad_backup(format!(
            "holds index {} of term {}, which no member's state machine is at",
            state.applied_index, state.applied_term
        )));
    }
    let keys = state.data.len() as u64;
    match previous {
        DirState::Empty | DirState::Interrupted => {}
        DirState::Restored(done) => {
            let same = done.source_cluster_id == state.cluster_id
                && done.revision == state.applied_index
                && done.checksum == checksum;
            return if same {
                Ok(Outcome::AlreadyRestored(done))
            } else {
                Err(Error::NotEmpty {
                    dir: dir.clone(),
                    holds: format!(
                        "a restore of another backup (cluster {}, revision {})",
                        done.source_cluster_id, done.revision
                    ),
                })
            };
        }
    }
    let id = args.id.unwrap_or_else(identity::random_id);
    let cluster_id = loop {
        let candidate = identity::random_id();
        if candidate != state.cluster_id {
            break candidate;
        }
    };
    let restored = Restored {
        source_cluster_id: state.cluster_id,
        revision: state.applied_index,
        checksum,
        keys,
        cluster_id,
        id,
    };
    state.cluster_id = cluster_id;
    state.membership = Membership::default();
    state.membership.voters.insert(id);
    if let Some(url) = &args.peer_url {
        state.membership.peer_urls.insert(id, url.clone());
    }

    fs::create_dir_all(dir).io_context(|| format!("create data directory {}", dir.display()))?;
    // A directory created just now exists after a crash only once its parent is synced (the
    // current directory for a bare `--data-dir d`).
    sync_dir(identity::parent_dir(dir))?;
    clear_interrupted(dir)?;
    // DURABILITY: the marker is on disk before anything else, so a crash mid-way leaves a
    // directory the node refuses and the next restore recognises as its own to clear.
    identity::write_atomically(&dir.join(IN_PROGRESS_FILE), b"")?;
    identity::store(dir, &Identity { id, cluster_id })?;
    let snapshots = SnapshotStore::open(&dir.join("snap"))?;
    let (mut wal, _) = Wal::open(&dir.join("wal"), WalOptions::default())?;
    consensus::seed_log(&snapshots, &mut wal, &state)?;
    drop(wal);
    let record = serde_json::to_vec_pretty(&restored).map_err(|e| Error::Codec(e.to_string()))?;
    identity::write_atomically(&dir.join(RESTORED_FILE), &record)?;
    // DURABILITY: the directory is a member only once the marker's removal is on disk.
    let marker = dir.join(IN_PROGRESS_FILE);
    fs::remove_file(&marker).io_context(|| format!("remove {}", marker.display()))?;
    sync_dir(dir)?;
    tracing::info!(
        member_id = id,
        cluster_id,
        source_cluster_id = restored.source_cluster_id,
        revision = restored.revision,
        keys,
        dir = %dir.display(),
        "restored a backup as a new single-member cluster"
    );
    Ok(Outcome::Written(restored))
}

/// Reads and verifies a whole backup; returns the state and its trailing checksum.
fn read_backup(from: impl Read) -> std::result::Result<(KvState, u32), String> {
    let mut tail = TailReader {
        inner: BufReader::with_capacity(1 << 20, from),
        last: [0; 4],
    };
    let state = KvState::read_snapshot(&mut tail)?;
    Ok((state, u32::from_le_bytes(tail.last)))
}

/// Remembers the last four bytes read (a snapshot's checksum trailer).
struct TailReader<R> {
    inner: R,
    last: [u8; 4],
}

impl<R: Read> Read for TailReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        for &b in &buf[..n] {
            self.last.rotate_left(1);
            self.last[3] = b;
        }
        Ok(n)
    }
}

/// What a data directory holds, as far as a restore cares.
enum DirState {
    /// Nothing (or it does not exist yet).
    Empty,
    /// A restore that did not finish: its files may be cleared.
    Interrupted,
    /// A completed restore.
    Restored(Restored),
}

fn inspect(dir: &Path) -> Result<DirState> {
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(DirState::Empty),
        Err(e) => {
            return Err(Error::Io {
                context: format!("list data directory {}", dir.display()),
                source: e,
            })
        }
    };
    let mut names = Vec::new();
    for entry in entries {
        let entry = entry.io_context(|| format!("list data directory {}", dir.display()))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if name != LOST_AND_FOUND {
            names.push(name);
        }
    }
    names.sort();
    if names.is_empty() {
        return Ok(DirState::Empty);
    }
    if names.iter().any(|n| n == IN_PROGRESS_FILE) {
        if let Some(other) = names
            .iter()
            .find(|n| *n != IN_PROGRESS_FILE && !WRITTEN.contains(&n.as_str()))
        {
            return Err(Error::NotEmpty {
                dir: dir.to_path_buf(),
                holds: format!("an interrupted restore and {other:?}, which a restore does not write"),
            });
        }
        return Ok(DirState::Interrupted);
    }
    let record = dir.join(RESTORED_FILE);
    if record.exists() {
        let raw = fs::read(&record).io_context(|| format!("read {}", record.display()))?;
        let done: Restored = serde_json::from_slice(&raw)
            .map_err(|e| Error::Config(format!("{} is not a restore record: {e}", record.display())))?;
        return Ok(DirState::Restored(done));
    }
    Err(Error::NotEmpty {
        dir: dir.to_path_buf(),
        holds: names.join(", "),
    })
}

/// Removes what an interrupted restore wrote (only names a restore writes).
fn clear_interrupted(dir: &Path) -> Result<()> {
    for name in WRITTEN {
        let path = dir.join(name);
        let removed = if path.is_dir() {
            fs::remove_dir_all(&path)
        } else {
            fs::remove_file(&path)
        };
        match removed {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(Error::Io {
                    context: format!("clear {} left by an interrupted restore", path.display()),
                    source: e,
                })
            }
            _ => {}
        }
    }
    sync_dir(dir)
}

/// Refuses to start a member on a directory an interrupted restore left.
pub fn refuse_interrupted(dir: &Path) -> Result<()> {
    if dir.join(IN_PROGRESS_FILE).exists() {
        return Err(Error::RestoreInterrupted { dir: dir.to_path_buf() });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kv::KvValue;
    use bytes::Bytes;

    fn backup_bytes(keys: u64) -> Vec<u8> {
        let mut state = KvState {
            applied_index: 500,
            applied_term: 4,
            cluster_id: 99,
            ..Default::default()
        };
        state.membership.voters.extend([1, 2, 3]);
        state.membership.removed.insert(7);
        for i in 0..keys {
            state.data.insert(
                Bytes::from(format!("k{i}")),
                KvValue {
                    value: Bytes::from(vec![1; i as usize]),
                    create_revision: i + 1,
                    mod_revision: i + 2,
                },
            );
        }
        state.write_snapshot(Vec::new()).unwrap()
    }

    fn args(from: &Path, dir: &Path) -> RestoreArgs {
        RestoreArgs {
            from: from.to_string_lossy().into_owned(),
            data_dir: dir.to_path_buf(),
            id: Some(5),
            peer_url: Some("http://m5:8081".into()),
        }
    }

    #[test]
    fn a_restored_directory_recovers_as_the_single_voter_of_a_new_cluster_at_the_backup_index() {
        let tmp = tempfile::tempdir().unwrap();
        let file = tmp.path().join("b.snap");
        let bytes = backup_bytes(40);
        fs::write(&file, &bytes).unwrap();
        let dir = tmp.path().join("data");
        let Outcome::Written(done) = restore(&args(&file, &dir)).unwrap() else {
            panic!("expected a restore");
        };
        assert_eq!(
            (done.source_cluster_id, done.revision, done.keys, done.id),
            (99, 500, 40, 5)
        );
        assert_eq!(done.checksum.to_le_bytes(), bytes[bytes.len() - 4..]);
        assert_ne!(done.cluster_id, 99);
        let identity = identity::peek(&dir).unwrap().unwrap();
        assert_eq!((identity.id, identity.cluster_id), (5, done.cluster_id));
        let (_, log) = Wal::open(&dir.join("wal"), WalOptions::default()).unwrap();
        assert_eq!(log.snapshots.last(), Some(&(500, 4)));
        let hs = log.hard_state.unwrap();
        assert_eq!((hs.term, hs.commit), (4, 500));
        let state = SnapshotStore::open(&dir.join("snap")).unwrap().load(500, 4).unwrap();
        assert_eq!(state.data.len(), 40);
        assert_eq!(state.cluster_id, done.cluster_id);
        let voters: Vec<u64> = state.membership.voters.iter().copied().collect();
        assert_eq!(voters, vec![5], "membership is reset to the restored member");
        assert!(state.membership.removed.is_empty() && state.membership.learners.is_empty());
        assert_eq!(state.membership.peer_urls[&5], "http://m5:8081");
        assert!(!dir.join(IN_PROGRESS_FILE).exists());
        refuse_interrupted(&dir).unwrap();
    }

    #[test]
    fn a_backup_at_index_zero_is_refused_before_anything_is_written() {
        let tmp = tempfile::tempdir().unwrap();
        let file = tmp.path().join("b.snap");
        fs::write(&file, KvState::default().write_snapshot(Vec::new()).unwrap()).unwrap();
        let dir = tmp.path().join("data");
        let err = restore(&args(&file, &dir)).unwrap_err();
        assert!(err.to_string().contains("index 0"), "{err}");
        assert!(!dir.exists());
    }

    #[test]
    fn a_restore_refused_for_its_backup_leaves_no_directory_behind() {
        let tmp = tempfile::tempdir().unwrap();
        let file = tmp.path().join("b.snap");
        let mut bytes = backup_bytes(10);
        let last = bytes.len() - 1;
        bytes[last] ^= 1;
        fs::write(&file, &bytes).unwrap();
        let dir = tmp.path().join("data");
        let err = restore(&args(&file, &dir)).unwrap_err();
        assert!(
            matches!(&err, Error::BadBackup { reason, .. } if reason.contains("checksum")),
            "{err}"
        );
        assert_eq!(err.code(), "bad_backup");
        assert!(!dir.exists());
    }
}
