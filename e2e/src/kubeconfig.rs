//! Kubeconfig files for the simulated API server: the administrator's, written when a cluster
//! starts, and each service account's, which the kubelet hands to the account's pods.

use std::path::Path;

use crate::error::{Error, Result};

/// Writes a kubeconfig for `server`: the administrator's (no credentials: every request is
/// allowed) or, with `token`, a service account's (its requests are checked by [`crate::rbac`]).
pub(crate) fn write_kubeconfig(path: &Path, server: &str, token: Option<&str>) -> Result<()> {
    let user = match token {
        Some(token) => format!("\n    token: {token}"),
        None => " {}".to_string(),
    };
    let text = format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: raftkv-sim\n  cluster:\n    server: {server}\n\
         users:\n- name: raftkv-sim\n  user:{user}\ncontexts:\n- name: raftkv-sim\n  context:\n    \
         cluster: raftkv-sim\n    user: raftkv-sim\n    namespace: default\ncurrent-context: raftkv-sim\n"
    );
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(format!("creating {}", dir.display()), e))?;
    }
    std::fs::write(path, text).map_err(|e| Error::io(format!("writing {}", path.display()), e))
}
