//! The committed CRD is exactly what `crdgen` prints, and it carries the API surface users and
//! tools rely on (scale and status subresources, printer columns, validation).

use std::path::Path;

use kube::CustomResourceExt;
use raftkv_operator::crd::{crd_yaml, RaftCluster};

#[test]
fn committed_crd_matches_the_generated_one() -> anyhow::Result<()> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../crds/raftclusters.raftkv.dev.yaml");
    let committed = std::fs::read_to_string(&path)?;
    let generated = crd_yaml()?;
    assert!(
        committed == generated,
        "{} is stale; regenerate it with `cargo run -p raftkv-operator --bin crdgen > crds/raftclusters.raftkv.dev.yaml`",
        path.display()
    );
    Ok(())
}

#[test]
fn the_crd_has_scale_and_status_subresources_and_printer_columns() -> anyhow::Result<()> {
    let crd = serde_json::to_value(RaftCluster::crd())?;
    let version = &crd["spec"]["versions"][0];
    assert_eq!(crd["spec"]["names"]["shortNames"], serde_json::json!(["rkv"]));
    let scale = &version["subresources"]["scale"];
    assert_eq!(scale["specReplicasPath"], ".spec.replicas");
    assert_eq!(scale["statusReplicasPath"], ".status.replicas");
    assert_eq!(scale["labelSelectorPath"], ".status.selector");
    assert!(version["subresources"]["status"].is_object());
    let columns: Vec<&str> = version["additionalPrinterColumns"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert_eq!(columns, ["Replicas", "Ready", "Leader", "Phase", "Age"]);
    let replicas = &version["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]["replicas"];
    assert_eq!(replicas["minimum"], 1.0);
    assert_eq!(replicas["maximum"], 9.0);
    assert!(replicas["x-kubernetes-validations"][0]["message"]
        .as_str()
        .unwrap()
        .contains("between 1 and 9"));
    Ok(())
}

#[test]
fn the_crd_refuses_cluster_names_that_would_take_another_clusters_peer_service() -> anyhow::Result<()> {
    let crd = serde_json::to_value(RaftCluster::crd())?;
    let root = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"];
    let rules = root["x-kubernetes-validations"]
        .as_array()
        .expect("root validation rules");
    let rule = rules
        .iter()
        .find(|r| r["rule"] == "!self.metadata.name.endsWith('-peer')")
        .expect("a rule on the name's -peer suffix");
    assert!(rule["message"].as_str().unwrap().contains("-peer"));
    Ok(())
}

#[test]
fn the_crd_refuses_storage_changes_that_the_statefulset_could_not_follow() -> anyhow::Result<()> {
    let crd = serde_json::to_value(RaftCluster::crd())?;
    let storage =
        &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]["storage"];
    let rule = &storage["x-kubernetes-validations"][0];
    assert_eq!(rule["rule"], "self == oldSelf");
    assert!(rule["message"].as_str().unwrap().contains("immutable"));
    Ok(())
}

#[test]
fn the_crd_refuses_a_restore_added_to_or_changed_on_an_existing_cluster() -> anyhow::Result<()> {
    let crd = serde_json::to_value(RaftCluster::crd())?;
    let root = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"];
    let rule = root["x-kubernetes-validations"]
        .as_array()
        .expect("root validation rules")
        .iter()
        .find(|r| r["rule"].as_str().unwrap_or_default().contains("oldSelf.spec.restore"))
        .expect("a transition rule on spec.restore");
    assert!(rule["message"]
        .as_str()
        .unwrap()
        .contains("only be set when the RaftCluster is created"));
    let spec = &root["properties"]["spec"]["properties"];
    for field in [
        "schedule",
        "destination",
        "credentialsSecret",
        "endpoint",
        "region",
        "allowHttp",
        "retention",
    ] {
        assert!(spec["backup"]["properties"][field].is_object(), "spec.backup.{field}");
    }
    assert_eq!(
        spec["backup"]["required"],
        serde_json::json!(["destination", "schedule"])
    );
    assert!(spec["restore"]["properties"]["from"].is_object());
    let status = &root["properties"]["status"]["properties"]["backup"]["properties"];
    for field in ["lastSuccess", "lastFailure", "consecutiveFailures"] {
        assert!(status[field].is_object(), "status.backup.{field}");
    }
    Ok(())
}

#[test]
fn a_minimal_cluster_takes_the_documented_defaults() -> anyhow::Result<()> {
    let cluster: RaftCluster = serde_saphyr::from_str(
        "apiVersion: raftkv.dev/v1alpha1\nkind: RaftCluster\nmetadata: {name: demo}\nspec: {}\n",
    )?;
    assert_eq!(cluster.spec.replicas, 3);
    assert_eq!(cluster.spec.storage.size.0, "1Gi");
    assert_eq!(cluster.spec.image, None);
    Ok(())
}
