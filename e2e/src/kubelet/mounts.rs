//! Volumes and mounts: the host directory behind each pod volume (claims, `emptyDir`,
//! `hostPath`, `configMap` and `secret` files), rewriting values that name paths under a
//! `mountPath` to those directories, and the per-container termination-message files.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde_json::Value;

use super::environment::secret_data;
use super::{log_path, PodRuntime, Shared};
use crate::error::{Error, Result};
use crate::store::Store;
use crate::volumes;

/// Where a container writes its termination message (Kubernetes' default when unset).
fn termination_message_path(container: &Value) -> String {
    container["terminationMessagePath"]
        .as_str()
        .filter(|p| !p.is_empty())
        .unwrap_or("/dev/termination-log")
        .to_string()
}

/// The host directory of the volume a PersistentVolumeClaim is bound to.
pub fn claim_path(store: &Store, namespace: &str, claim: &str) -> Result<PathBuf> {
    let claims = store.builtin("", "persistentvolumeclaims");
    let bound = store
        .get(&claims, namespace, claim)
        .ok()
        .filter(volumes::is_bound)
        .ok_or_else(|| Error::VolumeNotReady(format!("claim {namespace}/{claim} is not bound")))?;
    let volume_name = bound["spec"]["volumeName"].as_str().unwrap_or_default();
    let volume = store
        .get(&store.builtin("", "persistentvolumes"), "", volume_name)
        .map_err(|_| Error::VolumeNotReady(format!("volume {volume_name} of claim {namespace}/{claim} is missing")))?;
    volume["spec"]["hostPath"]["path"]
        .as_str()
        .map(PathBuf::from)
        .ok_or_else(|| Error::VolumeNotReady(format!("volume {volume_name} has no host path")))
}

/// Why the pod's claims cannot be mounted yet (missing, unbound, or being deleted), or `None`
/// once every one can.
pub(super) fn unmountable_claim(store: &Store, pod: &Value, ns: &str) -> Option<String> {
    let claims = store.builtin("", "persistentvolumeclaims");
    volumes::claims_of(pod)
        .iter()
        .find_map(|claim| volumes::claim_unusable(store.get(&claims, ns, claim).ok().as_ref(), claim))
}

pub(super) fn prepare_volumes(
    shared: &Shared,
    pod: &Value,
    ns: &str,
    scratch: &Path,
) -> Result<BTreeMap<String, PathBuf>> {
    let store = &shared.config.store;
    let mut dirs = BTreeMap::new();
    std::fs::create_dir_all(scratch).map_err(|e| Error::io(format!("creating {}", scratch.display()), e))?;
    for volume in pod["spec"]["volumes"].as_array().into_iter().flatten() {
        let name = volume["name"].as_str().unwrap_or_default().to_string();
        let dir = if let Some(claim) = volume["persistentVolumeClaim"]["claimName"].as_str() {
            claim_path(store, ns, claim)?
        } else if let Some(path) = volume["hostPath"]["path"].as_str() {
            PathBuf::from(path)
        } else {
            scratch.join("volumes").join(&name)
        };
        std::fs::create_dir_all(&dir).map_err(|e| Error::io(format!("creating {}", dir.display()), e))?;
        if let Some(files) = projected_files(store, volume, ns) {
            project(&dir, &files)?;
        }
        dirs.insert(name, dir);
    }
    Ok(dirs)
}

/// The files of a `configMap` or `secret` volume as the store holds them now; `None` for other
/// volumes. A missing object gives no files (see the Known gaps in `e2e/README.md`).
fn projected_files(store: &Store, volume: &Value, ns: &str) -> Option<Vec<(String, Vec<u8>)>> {
    let object = |resource: &str, name: &str| store.get(&store.builtin("", resource), ns, name).ok();
    if let Some(cm) = volume["configMap"]["name"].as_str() {
        return Some(
            object("configmaps", cm)
                .map(|o| {
                    o["data"]
                        .as_object()
                        .into_iter()
                        .flatten()
                        .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().as_bytes().to_vec()))
                        .collect()
                })
                .unwrap_or_default(),
        );
    }
    let secret = volume["secret"]["secretName"].as_str()?;
    Some(object("secrets", secret).map(|o| secret_data(&o)).unwrap_or_default())
}

/// The name of the directory `..data` points to in a projected volume.
const DATA_LINK: &str = "..data";

/// Writes `files` into the projected volume `dir` the way a kubelet's atomic writer does: the
/// files go into a fresh hidden directory `..<stamp>`, the symlink `..data` is swapped to it by
/// one `rename`, and each key is a symlink `key -> ..data/key`. A reader therefore sees either
/// the old set of files or the new one, never a mix (a certificate of one and the key of the
/// other). Returns whether anything changed; unchanged content writes nothing.
pub(super) fn project(dir: &Path, files: &[(String, Vec<u8>)]) -> Result<bool> {
    let io = |what: String| move |e| Error::io(what, e);
    let current: BTreeMap<String, Vec<u8>> = std::fs::read_dir(dir.join(DATA_LINK))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let name = entry.file_name().into_string().ok()?;
            Some((name, std::fs::read(entry.path()).ok()?))
        })
        .collect();
    let wanted: BTreeMap<String, Vec<u8>> = files.iter().cloned().collect();
    if dir.join(DATA_LINK).exists() && current == wanted {
        return Ok(false);
    }
    let previous = std::fs::read_link(dir.join(DATA_LINK)).ok();
    let stamp = format!(
        "..{}",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos()
    );
    let fresh = dir.join(&stamp);
    std::fs::create_dir_all(&fresh).map_err(io(format!("creating {}", fresh.display())))?;
    for (file, bytes) in &wanted {
        let path = fresh.join(file);
        std::fs::write(&path, bytes).map_err(io(format!("writing {}", path.display())))?;
    }
    let staged = dir.join("..data_tmp");
    let _ = std::fs::remove_file(&staged);
    std::os::unix::fs::symlink(&stamp, &staged).map_err(io(format!("linking {}", staged.display())))?;
    // The one atomic step: every key resolves through `..data`.
    std::fs::rename(&staged, dir.join(DATA_LINK)).map_err(io(format!("swapping {}", dir.display())))?;
    for file in wanted.keys() {
        let link = dir.join(file);
        let is_link = std::fs::symlink_metadata(&link).is_ok_and(|m| m.file_type().is_symlink());
        if !is_link {
            let _ = std::fs::remove_file(&link);
            std::os::unix::fs::symlink(Path::new(DATA_LINK).join(file), &link)
                .map_err(io(format!("linking {}", link.display())))?;
        }
    }
    for file in current.keys().filter(|k| !wanted.contains_key(*k)) {
        let _ = std::fs::remove_file(dir.join(file));
    }
    if let Some(previous) = previous {
        let _ = std::fs::remove_dir_all(dir.join(previous));
    }
    Ok(true)
}

/// Brings every `configMap` and `secret` volume of `pod` up to date with the store, as a
/// kubelet's periodic sync does; returns the names of the volumes that changed.
pub(super) fn sync_projected_volumes(
    store: &Store,
    pod: &Value,
    ns: &str,
    dirs: &BTreeMap<String, PathBuf>,
) -> Vec<String> {
    let mut changed = Vec::new();
    for volume in pod["spec"]["volumes"].as_array().into_iter().flatten() {
        let name = volume["name"].as_str().unwrap_or_default();
        let (Some(dir), Some(files)) = (dirs.get(name), projected_files(store, volume, ns)) else {
            continue;
        };
        match project(dir, &files) {
            Ok(true) => changed.push(name.to_string()),
            Ok(false) => {}
            Err(e) => tracing::warn!(volume = name, error = %e, "updating a projected volume"),
        }
    }
    changed
}

/// Rewrites a value naming a path under a mount to the host directory behind it.
pub(super) fn rewrite_mounts(value: &str, mounts: &[(String, PathBuf)]) -> String {
    let rewrite_path = |v: &str| -> Option<String> {
        mounts.iter().find_map(|(mount, host)| {
            let rest = v.strip_prefix(mount.as_str())?;
            (rest.is_empty() || rest.starts_with('/')).then(|| format!("{}{rest}", host.display()))
        })
    };
    if let Some(rewritten) = rewrite_path(value) {
        return rewritten;
    }
    if let Some((flag, v)) = value.split_once('=') {
        if let Some(rewritten) = rewrite_path(v) {
            return format!("{flag}={rewritten}");
        }
    }
    value.to_string()
}

impl PodRuntime {
    pub(super) fn mounts(&self, container: &Value) -> Vec<(String, PathBuf)> {
        let mut mounts: Vec<(String, PathBuf)> = container["volumeMounts"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|m| {
                let dir = self.volumes.get(m["name"].as_str()?)?;
                let dir = match m["subPath"].as_str().filter(|s| !s.is_empty()) {
                    Some(sub) => dir.join(sub),
                    None => dir.clone(),
                };
                let _ = std::fs::create_dir_all(&dir);
                Some((m["mountPath"].as_str()?.trim_end_matches('/').to_string(), dir))
            })
            .collect();
        let path = termination_message_path(container);
        mounts.push((path, self.termination_log(container)));
        mounts.sort_by_key(|(m, _)| std::cmp::Reverse(m.len()));
        mounts
    }

    /// The host file behind a container's `terminationMessagePath`.
    fn termination_log(&self, container: &Value) -> PathBuf {
        let name = container["name"].as_str().unwrap_or_default();
        self.scratch.join("termination").join(name)
    }

    /// Empties the container's termination message file before a start, as a real kubelet
    /// gives every container instance a fresh one.
    pub(super) fn reset_termination_log(&self, container: &Value) {
        let path = self.termination_log(container);
        if let Some(dir) = path.parent() {
            let _ = std::fs::create_dir_all(dir);
        }
        if let Err(e) = std::fs::write(&path, b"") {
            tracing::warn!(pod = %self.name, error = %e, "resetting the termination message file");
        }
    }

    /// The termination message of a container instance that ended with `exit_code`: what it
    /// wrote to its `terminationMessagePath` (at most 4096 bytes), or with
    /// `terminationMessagePolicy: FallbackToLogsOnError` and a failure, the last 80 lines (at
    /// most 2048 bytes) of its log.
    pub(super) fn termination_message(&self, container: &Value, exit_code: Option<i32>) -> Option<String> {
        let mut written = std::fs::read(self.termination_log(container)).unwrap_or_default();
        written.truncate(4096);
        if !written.is_empty() {
            return Some(String::from_utf8_lossy(&written).into_owned());
        }
        if container["terminationMessagePolicy"] != "FallbackToLogsOnError" || exit_code == Some(0) {
            return None;
        }
        let name = container["name"].as_str().unwrap_or_default();
        let log = std::fs::read(log_path(&self.shared.config.root, &self.ns, &self.name, name)).ok()?;
        let text = String::from_utf8_lossy(&log);
        let lines: Vec<&str> = text.lines().collect();
        let mut tail = lines[lines.len().saturating_sub(80)..].join("\n");
        if tail.len() > 2048 {
            let mut cut = tail.len() - 2048;
            while !tail.is_char_boundary(cut) {
                cut += 1;
            }
            tail = tail[cut..].to_string();
        }
        (!tail.is_empty()).then_some(tail)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn files(pairs: &[(&str, &str)]) -> Vec<(String, Vec<u8>)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.as_bytes().to_vec()))
            .collect()
    }

    #[test]
    fn a_projected_volume_is_swapped_whole_through_its_data_link() {
        let dir = tempfile::tempdir().unwrap();
        assert!(project(dir.path(), &files(&[("tls.crt", "cert 1"), ("tls.key", "key 1")])).unwrap());
        assert_eq!(std::fs::read_to_string(dir.path().join("tls.crt")).unwrap(), "cert 1");
        let first = std::fs::read_link(dir.path().join(DATA_LINK)).unwrap();
        assert!(
            std::fs::symlink_metadata(dir.path().join("tls.key"))
                .unwrap()
                .file_type()
                .is_symlink(),
            "keys resolve through ..data"
        );
        assert!(!project(dir.path(), &files(&[("tls.crt", "cert 1"), ("tls.key", "key 1")])).unwrap());
        assert_eq!(
            std::fs::read_link(dir.path().join(DATA_LINK)).unwrap(),
            first,
            "nothing rewritten"
        );

        assert!(project(dir.path(), &files(&[("tls.crt", "cert 2"), ("ca.crt", "ca")])).unwrap());
        assert_eq!(std::fs::read_to_string(dir.path().join("tls.crt")).unwrap(), "cert 2");
        assert_eq!(std::fs::read_to_string(dir.path().join("ca.crt")).unwrap(), "ca");
        assert!(!dir.path().join("tls.key").exists(), "a removed key is gone");
        assert!(!dir.path().join(&first).exists(), "the previous payload is cleaned up");
    }

    #[test]
    fn rewrites_paths_under_mounts() {
        let mounts = vec![("/var/lib/raftkv".to_string(), PathBuf::from("/tmp/pvc/data-0"))];
        assert_eq!(rewrite_mounts("/var/lib/raftkv", &mounts), "/tmp/pvc/data-0");
        assert_eq!(rewrite_mounts("/var/lib/raftkv/wal", &mounts), "/tmp/pvc/data-0/wal");
        assert_eq!(
            rewrite_mounts("--data-dir=/var/lib/raftkv", &mounts),
            "--data-dir=/tmp/pvc/data-0"
        );
        assert_eq!(rewrite_mounts("/var/lib/raftkvx", &mounts), "/var/lib/raftkvx");
    }
}
