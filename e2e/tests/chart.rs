//! The operator's Helm chart: it ships exactly the generated CRD, Helm lints it clean, and its
//! RBAC grants what the operator's writes need.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, ensure, Context};
use serde::Deserialize;

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

#[test]
fn chart_ships_the_generated_crd_byte_for_byte() -> anyhow::Result<()> {
    let generated = repo_root().join("crds/raftclusters.raftkv.dev.yaml");
    let shipped = repo_root().join("charts/raftkv-operator/crds/raftclusters.raftkv.dev.yaml");
    let generated_bytes = std::fs::read(&generated).with_context(|| format!("reading {}", generated.display()))?;
    let shipped_bytes = std::fs::read(&shipped).with_context(|| format!("reading {}", shipped.display()))?;
    ensure!(
        generated_bytes == shipped_bytes,
        "{} differs from {}: cp crds/raftclusters.raftkv.dev.yaml charts/raftkv-operator/crds/",
        shipped.display(),
        generated.display()
    );
    Ok(())
}

/// Helm's linter (the `helm` binary, or helm-sdkpy through `e2e/helm.py`) finds no error:
/// templates render with the default values and the values satisfy `values.schema.json`.
#[test]
fn chart_passes_helm_lint() -> anyhow::Result<()> {
    let chart = repo_root().join("charts/raftkv-operator");
    let have_helm = Command::new("helm")
        .arg("version")
        .output()
        .is_ok_and(|o| o.status.success());
    let output = if have_helm {
        Command::new("helm").arg("lint").arg(&chart).output()?
    } else {
        Command::new("python3")
            .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("helm.py"))
            .arg("lint")
            .arg(&chart)
            .output()
            .context("running python3 e2e/helm.py")?
    };
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    if output.status.code() == Some(3) && !have_helm {
        if std::env::var_os("CI").is_some() {
            bail!("CI needs Helm: {stderr}");
        }
        eprintln!("SKIPPED helm lint: {}", stderr.trim());
        return Ok(());
    }
    ensure!(output.status.success(), "helm lint failed:\n{stdout}\n{stderr}");
    Ok(())
}

/// One rule of the operator's ClusterRole.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct PolicyRule {
    api_groups: Vec<String>,
    resources: Vec<String>,
    verbs: Vec<String>,
}

/// The rules of the chart's ClusterRole. They are plain YAML in the template (no template
/// directives), so they are read from it directly instead of rendering the chart.
fn cluster_role_rules() -> anyhow::Result<Vec<PolicyRule>> {
    let path = repo_root().join("charts/raftkv-operator/templates/rbac.yaml");
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let document = text
        .split("\n---")
        .find(|d| d.contains("\nkind: ClusterRole\n"))
        .context("rbac.yaml has no ClusterRole")?;
    let (_, rules) = document
        .split_once("\nrules:\n")
        .context("the ClusterRole has no rules")?;
    ensure!(
        !rules.contains("{{"),
        "the ClusterRole's rules contain template directives; read them from a rendered chart instead"
    );
    Ok(serde_saphyr::from_str(rules)?)
}

#[test]
fn the_cluster_role_lets_server_side_apply_create_the_objects_it_owns() -> anyhow::Result<()> {
    let rules = cluster_role_rules()?;
    let allows = |group: &str, resource: &str, verb: &str| {
        rules.iter().any(|r| {
            r.api_groups.iter().any(|g| g == group)
                && r.resources.iter().any(|x| x == resource)
                && r.verbs.iter().any(|v| v == verb)
        })
    };
    // A server-side apply is a PATCH, authorized as `create` when the object is new; each object
    // is read first, to leave alone one that another owner controls.
    for (group, resource) in [
        ("apps", "statefulsets"),
        ("", "services"),
        ("policy", "poddisruptionbudgets"),
    ] {
        for verb in ["get", "create", "patch"] {
            ensure!(allows(group, resource, verb), "no {verb} on {group}/{resource}");
        }
    }
    // Owner references with blockOwnerDeletion need `update` on the owner's finalizers.
    ensure!(
        allows("raftkv.dev", "raftclusters/finalizers", "update"),
        "no update on raftclusters/finalizers"
    );
    // Least privilege: nothing is granted by wildcard.
    for rule in &rules {
        ensure!(
            [&rule.api_groups, &rule.resources, &rule.verbs]
                .iter()
                .all(|list| !list.iter().any(|x| x == "*")),
            "wildcard in {rule:?}"
        );
    }
    Ok(())
}
