//! A member's identity on its volume: the member id (created once, never derived from the pod
//! name), the cluster id once known, and the tombstone left when the member is removed.
//!
//! Identity lives in the data directory so that a pod rescheduled with its volume is the same
//! member, and a pod that lost its volume is a new one.

use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Error, IoContext, Result};

const MEMBER_FILE: &str = "member.json";
const REMOVED_FILE: &str = "removed.json";

/// Ids are kept below 2^53 so that every JSON client, JavaScript included, reads them exactly.
pub const MAX_MEMBER_ID: u64 = (1 << 53) - 1;

/// The persistent identity of this member.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Identity {
    /// This member's Raft id.
    pub id: u64,
    /// The cluster this member belongs to; 0 until it is bootstrapped or joins one.
    pub cluster_id: u64,
}

/// Written when this member applies its own removal: restarting on this volume is then refused.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct Tombstone {
    /// The removed member.
    pub id: u64,
    /// The cluster it was removed from.
    pub cluster_id: u64,
    /// The Raft index of the removal entry.
    pub index: u64,
}

/// A random member or cluster id in `1..=MAX_MEMBER_ID`.
pub fn random_id() -> u64 {
    rand::random_range(1..=MAX_MEMBER_ID)
}

/// Loads the identity, creating it with `requested_id` (or a random id) on first start.
///
/// A requested id that differs from the stored one is an error: the volume belongs to another
/// member and silently changing identity would corrupt the cluster.
pub fn load_or_create(dir: &Path, requested_id: Option<u64>) -> Result<Identity> {
    fs::create_dir_all(dir).io_context(|| format!("create data directory {}", dir.display()))?;
    if let Some(t) = read_tombstone(dir)? {
        return Err(Error::Removed {
            id: t.id,
            cluster_id: t.cluster_id,
            index: t.index,
            dir: dir.to_path_buf(),
        });
    }
    let path = dir.join(MEMBER_FILE);
    if path.exists() {
        let raw = fs::read(&path).io_context(|| format!("read {}", path.display()))?;
        let identity: Identity = serde_json::from_slice(&raw)
            .map_err(|e| Error::Config(format!("{} is not a valid identity file: {e}", path.display())))?;
        if let Some(id) = requested_id {
            if id != identity.id {
                return Err(Error::Config(format!(
                    "--id {id} does not match member id {} stored in {}",
                    identity.id,
                    path.display()
                )));
            }
        }
        return Ok(identity);
    }
    let identity = Identity {
        id: requested_id.unwrap_or_else(random_id),
        cluster_id: 0,
    };
    store(dir, &identity)?;
    Ok(identity)
}

/// The stored identity, without creating one: `None` on a volume that never held a member.
pub fn peek(dir: &Path) -> Result<Option<Identity>> {
    let path = dir.join(MEMBER_FILE);
    if !path.exists() {
        return Ok(None);
    }
    let raw = fs::read(&path).io_context(|| format!("read {}", path.display()))?;
    serde_json::from_slice(&raw)
        .map(Some)
        .map_err(|e| Error::Config(format!("{} is not a valid identity file: {e}", path.display())))
}

/// Durably replaces the identity file (write temp, fsync, rename, fsync directory).
pub fn store(dir: &Path, identity: &Identity) -> Result<()> {
    let body = serde_json::to_vec_pretty(identity).map_err(|e| Error::Codec(e.to_string()))?;
    write_atomically(&dir.join(MEMBER_FILE), &body)
}

/// Durably records that this member was removed.
pub fn store_tombstone(dir: &Path, tombstone: &Tombstone) -> Result<()> {
    let body = serde_json::to_vec_pretty(tombstone).map_err(|e| Error::Codec(e.to_string()))?;
    write_atomically(&dir.join(REMOVED_FILE), &body)
}

/// The tombstone, if this member was removed.
pub fn read_tombstone(dir: &Path) -> Result<Option<Tombstone>> {
    let path = dir.join(REMOVED_FILE);
    if !path.exists() {
        return Ok(None);
    }
    let raw = fs::read(&path).io_context(|| format!("read {}", path.display()))?;
    let t = serde_json::from_slice(&raw)
        .map_err(|e| Error::Config(format!("{} is not a valid tombstone: {e}", path.display())))?;
    Ok(Some(t))
}

/// Writes `body` to `path` so that a crash leaves either the old or the new content, never a mix.
pub fn write_atomically(path: &Path, body: &[u8]) -> Result<()> {
    let tmp = tmp_path(path);
    {
        let mut f = File::create(&tmp).io_context(|| format!("create {}", tmp.display()))?;
        f.write_all(body).io_context(|| format!("write {}", tmp.display()))?;
        f.sync_all().io_context(|| format!("fsync {}", tmp.display()))?;
    }
    fs::rename(&tmp, path).io_context(|| format!("rename {} to {}", tmp.display(), path.display()))?;
    sync_dir(parent_dir(path))
}

/// The directory holding `path`. A bare file name's parent is "", which cannot be opened: it is
/// the current directory.
pub fn parent_dir(path: &Path) -> &Path {
    path.parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
}

/// Fsyncs a directory so that a rename or file creation inside it survives a crash.
pub fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .io_context(|| format!("fsync directory {}", dir.display()))
}

fn tmp_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".tmp");
    path.with_file_name(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bare_file_name_is_synced_through_the_current_directory() {
        assert_eq!(parent_dir(Path::new("addr.json")), Path::new("."));
        assert_eq!(parent_dir(Path::new("run/addr.json")), Path::new("run"));
        assert_eq!(parent_dir(Path::new("/addr.json")), Path::new("/"));
        assert!(sync_dir(parent_dir(Path::new("addr.json"))).is_ok());
    }

    #[test]
    fn identity_is_created_once_and_then_reloaded() {
        let dir = tempfile::tempdir().unwrap();
        let a = load_or_create(dir.path(), None).unwrap();
        assert!(a.id >= 1 && a.id <= MAX_MEMBER_ID);
        let b = load_or_create(dir.path(), None).unwrap();
        assert_eq!(a, b);
    }

    #[test]
    fn a_requested_id_must_match_the_stored_one() {
        let dir = tempfile::tempdir().unwrap();
        load_or_create(dir.path(), Some(7)).unwrap();
        assert!(load_or_create(dir.path(), Some(7)).is_ok());
        let err = load_or_create(dir.path(), Some(8)).unwrap_err();
        assert!(err.to_string().contains("does not match"), "{err}");
    }

    #[test]
    fn removed_member_refuses_to_load_its_identity() {
        let dir = tempfile::tempdir().unwrap();
        load_or_create(dir.path(), Some(3)).unwrap();
        store_tombstone(
            dir.path(),
            &Tombstone {
                id: 3,
                cluster_id: 9,
                index: 42,
            },
        )
        .unwrap();
        let err = load_or_create(dir.path(), Some(3)).unwrap_err();
        assert!(
            matches!(
                err,
                Error::Removed {
                    id: 3,
                    cluster_id: 9,
                    index: 42,
                    ..
                }
            ),
            "{err}"
        );
    }
}
