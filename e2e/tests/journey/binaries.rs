//! The `raftkv-node` and `raftkv-operator` binaries the simulated backend runs as pods.
//!
//! Cargo exposes binaries only to their own package's tests, so the suite builds them itself,
//! once per test process, into the target directory this test binary was built in (so a fresh
//! `cargo test --workspace` needs nothing else, and an up-to-date build is a no-op).

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use anyhow::{bail, Context};

/// Host paths of the two binaries.
#[derive(Debug, Clone)]
pub struct Binaries {
    /// `raftkv-node`, standing for the image `raftkv/node:*`.
    pub node: PathBuf,
    /// `raftkv-operator`, standing for the image `raftkv/operator:*`.
    pub operator: PathBuf,
}

/// Builds the binaries on first call; later calls return the same paths (or the same error).
pub fn binaries() -> anyhow::Result<Binaries> {
    static BUILT: OnceLock<Result<Binaries, String>> = OnceLock::new();
    BUILT
        .get_or_init(|| build().map_err(|e| format!("{e:#}")))
        .clone()
        .map_err(anyhow::Error::msg)
}

fn build() -> anyhow::Result<Binaries> {
    // This test runs as <target>/<profile>/deps/journey-<hash>.
    let exe = std::env::current_exe().context("locating the test binary")?;
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .context("the test binary is not under <target>/<profile>/deps")?;
    let target_dir = profile_dir.parent().context("no target directory")?;
    // The node is built as its own tests build it (fail points compiled in, inactive without
    // FAILPOINTS): both land on <profile>/raftkv-node, so a build without them here would replace
    // the binary those tests run next in `cargo test --workspace`. Two invocations, because a
    // feature flag names the features of every package one build selects.
    let builds: [&[&str]; 2] = [
        &["-p", "raftkv-node", "--bin", "raftkv-node", "--features", "failpoints"],
        &["-p", "raftkv-operator", "--bin", "raftkv-operator"],
    ];
    for args in builds {
        let mut command = std::process::Command::new(env!("CARGO"));
        command
            .arg("build")
            .args(args)
            .arg("--target-dir")
            .arg(target_dir)
            .current_dir(env!("CARGO_MANIFEST_DIR"));
        match profile_dir.file_name().and_then(|n| n.to_str()) {
            Some("debug") => {}
            Some("release") => {
                command.arg("--release");
            }
            Some(other) => {
                command.args(["--profile", other]);
            }
            None => bail!("unexpected profile directory {}", profile_dir.display()),
        }
        tracing::info!(?command, "building a binary for the journey");
        let status = command.status().context("running cargo build")?;
        if !status.success() {
            bail!("cargo build {} failed: {status}", args.join(" "));
        }
    }
    let binaries = Binaries {
        node: profile_dir.join("raftkv-node"),
        operator: profile_dir.join("raftkv-operator"),
    };
    for path in [&binaries.node, &binaries.operator] {
        if !path.is_file() {
            bail!("{} is missing after the build", path.display());
        }
    }
    Ok(binaries)
}
