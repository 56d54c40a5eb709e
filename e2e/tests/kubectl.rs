//! The real `kubectl` against the simulated control plane: discovery, CRDs, custom objects with
//! printer columns, the scale subresource, `kubectl wait`, label selectors.

use std::time::Duration;

use anyhow::{ensure, Context};
use kube::api::{Api, ApiResource, DynamicObject, GroupVersionKind, Patch, PatchParams};
use raftkv_e2e::SimCluster;
use serde_json::json;

const CRD: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/raftcluster-crd.yaml");
const LIMIT: Duration = Duration::from_secs(120);

fn raftclusters(client: kube::Client) -> Api<DynamicObject> {
    let gvk = GroupVersionKind::gvk("raftkv.dev", "v1alpha1", "RaftCluster");
    Api::namespaced_with(
        client,
        "default",
        &ApiResource::from_gvk_with_plural(&gvk, "raftclusters"),
    )
}

/// Runs a scenario against a fresh cluster, time-bounded, printing the cluster report on failure.
async fn scenario<F, Fut>(body: F) -> anyhow::Result<()>
where
    F: FnOnce(std::sync::Arc<SimCluster>) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>>,
{
    let cluster = std::sync::Arc::new(SimCluster::builder().start().await?);
    let outcome = tokio::time::timeout(LIMIT, body(cluster.clone()))
        .await
        .unwrap_or_else(|_| Err(anyhow::anyhow!("scenario exceeded {LIMIT:?}")));
    if outcome.is_err() {
        eprintln!("{}", cluster.report());
    }
    outcome
}

async fn apply_demo(cluster: &SimCluster) -> anyhow::Result<()> {
    cluster.kubectl_output(&["apply", "-f", CRD]).await?;
    let manifest = cluster.root().join("demo.yaml");
    std::fs::write(
        &manifest,
        "apiVersion: raftkv.dev/v1alpha1\nkind: RaftCluster\nmetadata: {name: demo}\nspec: {replicas: 3}\n",
    )?;
    cluster
        .kubectl_output(&["apply", "-f", manifest.to_str().context("utf-8 path")?])
        .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_discovers_builtin_kinds_and_applied_crds() -> anyhow::Result<()> {
    scenario(|cluster| async move {
        let before = cluster.kubectl_output(&["api-resources"]).await?;
        for kind in [
            "StatefulSet",
            "PodDisruptionBudget",
            "Lease",
            "ClusterRoleBinding",
            "CustomResourceDefinition",
        ] {
            ensure!(before.contains(kind), "api-resources lacks {kind}:\n{before}");
        }
        cluster.kubectl_output(&["apply", "-f", CRD]).await?;
        let after = cluster
            .kubectl_output(&["api-resources", "--api-group=raftkv.dev"])
            .await?;
        let line = after
            .lines()
            .find(|l| l.starts_with("raftclusters"))
            .context("raftclusters listed")?;
        ensure!(
            line.contains("rc") && line.contains("raftkv.dev/v1alpha1") && line.contains("RaftCluster"),
            "{line}"
        );
        let raw = cluster
            .kubectl_output(&["get", "--raw", "/apis/raftkv.dev/v1alpha1"])
            .await?;
        ensure!(
            raw.contains("raftclusters/scale") && raw.contains("raftclusters/status"),
            "{raw}"
        );
        let established = cluster
            .kubectl_output(&[
                "wait",
                "crd/raftclusters.raftkv.dev",
                "--for=condition=Established",
                "--timeout=30s",
            ])
            .await?;
        ensure!(established.contains("condition met"), "{established}");
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_get_prints_the_crd_printer_columns() -> anyhow::Result<()> {
    scenario(|cluster| async move {
        apply_demo(&cluster).await?;
        let table = cluster.kubectl_output(&["get", "rc"]).await?;
        let mut lines = table.lines();
        let header: Vec<&str> = lines.next().context("header")?.split_whitespace().collect();
        ensure!(header == ["NAME", "REPLICAS", "READY", "PHASE", "AGE"], "{table}");
        let row: Vec<&str> = lines.next().context("row")?.split_whitespace().collect();
        ensure!(row[..2] == ["demo", "3"], "{table}");
        let all = cluster.kubectl_output(&["get", "all", "-A"]).await?;
        ensure!(all.contains("raftcluster.raftkv.dev/demo"), "{all}");
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_scale_writes_through_the_scale_subresource() -> anyhow::Result<()> {
    scenario(|cluster| async move {
        apply_demo(&cluster).await?;
        let api = raftclusters(cluster.kube_client().await?);
        let before = api.get("demo").await?;
        cluster
            .kubectl_output(&["scale", "raftcluster", "demo", "--replicas=5"])
            .await?;
        let after = api.get("demo").await?;
        ensure!(after.data["spec"]["replicas"] == json!(5), "{:?}", after.data);
        ensure!(after.metadata.generation == before.metadata.generation.map(|g| g + 1));
        let scale = api.get_scale("demo").await?;
        ensure!(scale.spec.and_then(|s| s.replicas) == Some(5));
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_wait_sees_conditions_and_jsonpath_set_later() -> anyhow::Result<()> {
    scenario(|cluster| async move {
        apply_demo(&cluster).await?;
        let condition = cluster.kubectl_output(&["wait", "rc/demo", "--for=condition=Available", "--timeout=60s"]);
        let phase = cluster.kubectl_output(&[
            "wait",
            "rc/demo",
            "--for=jsonpath={.status.phase}=Running",
            "--timeout=60s",
        ]);
        let api = raftclusters(cluster.kube_client().await?);
        let writer = async {
            // kubectl wait succeeds whether the status lands before or after its watch starts; one
            // more round trip first gives the waits a head start, so usually the watch path is what passes.
            cluster.kubectl_output(&["get", "rc", "demo"]).await?;
            let status = json!({"apiVersion": "raftkv.dev/v1alpha1", "kind": "RaftCluster",
                "status": {"phase": "Running", "conditions": [{"type": "Available", "status": "True",
                    "reason": "Quorum", "message": "", "lastTransitionTime": "2025-01-01T00:00:00Z"}]}});
            api.patch_status("demo", &PatchParams::apply("e2e").force(), &Patch::Apply(status))
                .await?;
            anyhow::Ok(())
        };
        let (condition, phase, written) = tokio::join!(condition, phase, writer);
        written?;
        ensure!(condition?.contains("condition met"));
        ensure!(phase?.contains("condition met"));
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_selects_objects_by_label() -> anyhow::Result<()> {
    scenario(|cluster| async move {
        for (name, tier) in [("a", "db"), ("b", "web"), ("c", "cache")] {
            cluster
                .kubectl_output(&["create", "configmap", name, "--from-literal=k=v"])
                .await?;
            cluster
                .kubectl_output(&["label", "configmap", name, &format!("tier={tier}")])
                .await?;
        }
        let names = |out: String| {
            let mut v: Vec<String> = out
                .lines()
                .map(|l| l.trim_start_matches("configmap/").to_string())
                .collect();
            v.sort();
            v
        };
        let selected = names(
            cluster
                .kubectl_output(&["get", "cm", "-l", "tier in (db,web)", "-o", "name"])
                .await?,
        );
        ensure!(selected == ["a", "b"], "{selected:?}");
        let selected = names(
            cluster
                .kubectl_output(&["get", "cm", "-l", "tier,tier!=db", "-o", "name"])
                .await?,
        );
        ensure!(selected == ["b", "c"], "{selected:?}");
        let selected = names(
            cluster
                .kubectl_output(&["get", "cm", "--field-selector", "metadata.name=c", "-o", "name"])
                .await?,
        );
        ensure!(selected == ["c"], "{selected:?}");
        Ok(())
    })
    .await
}
