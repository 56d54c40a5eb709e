//! Helm, as the user runs it: the `helm` binary when one is on `PATH`, otherwise the real Helm
//! v4 library through PyPI's `helm-sdkpy`, driven by `e2e/helm.py`.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use tokio::process::Command;

/// Exit code of `helm.py` when helm-sdkpy is not installed.
const MISSING_LIBRARY: i32 = 3;

/// Which Helm runs the chart.
#[derive(Debug, Clone)]
pub enum Helm {
    /// A `helm` binary on `PATH`.
    Binary,
    /// `python3 e2e/helm.py`, wrapping helm-sdkpy.
    Sdk {
        /// The script's path.
        script: PathBuf,
    },
}

/// Why there is no Helm to run.
#[derive(Debug)]
pub struct HelmMissing(pub String);

impl Helm {
    /// Finds a Helm: `Ok(Err(..))` when neither a `helm` binary nor helm-sdkpy is installed.
    pub async fn detect() -> anyhow::Result<Result<Helm, HelmMissing>> {
        let binary = Command::new("helm").arg("version").arg("--short").output().await;
        if binary.is_ok_and(|o| o.status.success()) {
            return Ok(Ok(Helm::Binary));
        }
        let probe = Command::new("python3")
            .args(["-c", "import helm_sdkpy"])
            .output()
            .await
            .context("running python3")?;
        if !probe.status.success() {
            return Ok(Err(HelmMissing(format!(
                "no `helm` on PATH and helm-sdkpy is not importable ({}); install it with \
                 `pip install --ignore-requires-python helm-sdkpy`",
                String::from_utf8_lossy(&probe.stderr).trim()
            ))));
        }
        Ok(Ok(Helm::Sdk {
            script: Path::new(env!("CARGO_MANIFEST_DIR")).join("helm.py"),
        }))
    }

    fn command(&self) -> Command {
        match self {
            Helm::Binary => Command::new("helm"),
            Helm::Sdk { script } => {
                let mut command = Command::new("python3");
                command.arg(script);
                command
            }
        }
    }

    /// `helm lint CHART`; fails on any error-severity message.
    pub async fn lint(&self, chart: &Path) -> anyhow::Result<String> {
        let mut command = self.command();
        command.arg("lint").arg(chart);
        run(command, "helm lint").await
    }

    /// `helm install RELEASE CHART --namespace NS --create-namespace --set k=v ...`.
    pub async fn install(
        &self,
        kubeconfig: &Path,
        release: &str,
        namespace: &str,
        chart: &Path,
        values: &[(&str, String)],
    ) -> anyhow::Result<String> {
        let mut command = self.command();
        command.arg("install").arg("--kubeconfig").arg(kubeconfig);
        command.args(["--namespace", namespace]);
        if matches!(self, Helm::Binary) {
            command.arg("--create-namespace");
        }
        command.arg(release).arg(chart);
        for (key, value) in values {
            command.arg("--set").arg(format!("{key}={value}"));
        }
        run(command, "helm install").await
    }

    /// `helm uninstall RELEASE --namespace NS`.
    pub async fn uninstall(&self, kubeconfig: &Path, release: &str, namespace: &str) -> anyhow::Result<String> {
        let mut command = self.command();
        command.arg("uninstall").arg("--kubeconfig").arg(kubeconfig);
        command.args(["--namespace", namespace, release]);
        run(command, "helm uninstall").await
    }
}

async fn run(mut command: Command, what: &str) -> anyhow::Result<String> {
    let output = command
        .kill_on_drop(true)
        .output()
        .await
        .with_context(|| format!("running {what}"))?;
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    if output.status.code() == Some(MISSING_LIBRARY) {
        bail!("{what}: helm-sdkpy is not installed");
    }
    if !output.status.success() {
        bail!(
            "{what} failed ({}):\n{stdout}\n{}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(stdout)
}
