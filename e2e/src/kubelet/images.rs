//! Images: which host program stands for a container image, and how a container's `command`
//! and `args` become the program and arguments the kubelet starts.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// How the kubelet runs an image: the host program standing for its entrypoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageMapping {
    /// The host program standing for the image's entrypoint.
    pub(super) program: PathBuf,
    /// Arguments that belong to the entrypoint.
    pub(super) entrypoint_args: Vec<String>,
    /// The image's default arguments, used when the container sets no `args`.
    pub(super) default_args: Vec<String>,
    /// Paths inside the image, as `command` may name them, to host programs.
    binaries: BTreeMap<String, PathBuf>,
    /// Environment variables the image defines.
    pub(super) env: Vec<(String, String)>,
}

impl ImageMapping {
    /// An image whose entrypoint is `program` (a path, or a name looked up in `PATH`).
    pub fn new(program: impl Into<PathBuf>) -> Self {
        ImageMapping {
            program: program.into(),
            entrypoint_args: Vec::new(),
            default_args: Vec::new(),
            binaries: BTreeMap::new(),
            env: Vec::new(),
        }
    }

    /// Arguments that are part of the entrypoint (kept when only `args` is set).
    pub fn entrypoint_args<S: Into<String>>(mut self, args: impl IntoIterator<Item = S>) -> Self {
        self.entrypoint_args = args.into_iter().map(Into::into).collect();
        self
    }

    /// The image's default arguments (its `CMD`), used when the container sets no `args`.
    pub fn default_args<S: Into<String>>(mut self, args: impl IntoIterator<Item = S>) -> Self {
        self.default_args = args.into_iter().map(Into::into).collect();
        self
    }

    /// Maps a path inside the image, as a container `command` may name it, to a host program.
    pub fn binary(mut self, in_image: impl Into<String>, host: impl Into<PathBuf>) -> Self {
        self.binaries.insert(in_image.into(), host.into());
        self
    }

    /// An environment variable the image defines.
    pub fn env(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.env.push((name.into(), value.into()));
        self
    }

    /// The host program for `command[0]`: a mapped binary, the entrypoint when the basenames
    /// match, or the name itself (resolved in the host `PATH`).
    pub(super) fn resolve_command(&self, command: &str) -> PathBuf {
        if let Some(host) = self.binaries.get(command) {
            return host.clone();
        }
        let base = |p: &Path| p.file_name().map(|f| f.to_os_string());
        if base(Path::new(command)) == base(&self.program) {
            return self.program.clone();
        }
        PathBuf::from(command)
    }
}

/// Image references to [`ImageMapping`]s.
#[derive(Debug, Clone, Default)]
pub struct ImageTable {
    /// Patterns (exact references, or prefixes ending in `*`) and their mappings.
    entries: Vec<(String, ImageMapping)>,
}

impl ImageTable {
    /// Maps `pattern` (an exact image reference, or a prefix ending in `*` like `raftkv/node:*`).
    pub fn insert(&mut self, pattern: impl Into<String>, mapping: ImageMapping) {
        let pattern = pattern.into();
        self.entries.retain(|(p, _)| *p != pattern);
        self.entries.push((pattern, mapping));
    }

    /// The mapping of an image: an exact match first, then the longest matching prefix.
    pub fn resolve(&self, image: &str) -> Option<&ImageMapping> {
        if let Some((_, m)) = self.entries.iter().find(|(p, _)| p == image) {
            return Some(m);
        }
        self.entries
            .iter()
            .filter_map(|(p, m)| p.strip_suffix('*').map(|prefix| (prefix, m)))
            .filter(|(prefix, _)| image.starts_with(prefix))
            .max_by_key(|(prefix, _)| prefix.len())
            .map(|(_, m)| m)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_patterns_prefer_exact_then_longest_prefix() {
        let mut table = ImageTable::default();
        table.insert("raftkv/*", ImageMapping::new("/bin/any"));
        table.insert("raftkv/node:*", ImageMapping::new("/bin/node"));
        table.insert("raftkv/node:dev", ImageMapping::new("/bin/dev"));
        assert_eq!(
            table.resolve("raftkv/node:1.0").unwrap().program,
            PathBuf::from("/bin/node")
        );
        assert_eq!(
            table.resolve("raftkv/node:dev").unwrap().program,
            PathBuf::from("/bin/dev")
        );
        assert_eq!(
            table.resolve("raftkv/operator:1").unwrap().program,
            PathBuf::from("/bin/any")
        );
        assert!(table.resolve("nginx").is_none());
    }

    #[test]
    fn commands_naming_the_entrypoint_map_to_the_host_binary() {
        let mapping = ImageMapping::new("/build/raftkv-node").binary("/usr/local/bin/helper", "/build/helper");
        assert_eq!(
            mapping.resolve_command("/usr/bin/raftkv-node"),
            PathBuf::from("/build/raftkv-node")
        );
        assert_eq!(
            mapping.resolve_command("/usr/local/bin/helper"),
            PathBuf::from("/build/helper")
        );
        assert_eq!(mapping.resolve_command("python3"), PathBuf::from("python3"));
    }
}
