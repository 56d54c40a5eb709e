//! Where pod containers' logs live on the host: the kubelet writes them, `pods/log` and the
//! cluster's failure reports read them.

use std::path::{Path, PathBuf};

/// Where a container's stdout and stderr are written.
pub fn log_path(root: &Path, namespace: &str, pod: &str, container: &str) -> PathBuf {
    root.join("logs")
        .join(namespace)
        .join(pod)
        .join(format!("{container}.log"))
}
