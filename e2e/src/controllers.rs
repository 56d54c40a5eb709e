//! In-process workload controllers: StatefulSet, Deployment and ReplicaSet.
//!
//! Each pass reads the store, decides, and writes through the same store API the HTTP clients
//! use, so every change gets a resourceVersion and a watch event. A pass runs after any change
//! to pods, PVCs or apps objects, and at least every second.
//!
//! StatefulSets:
//! - pods `<name>-<ordinal>` for ordinals below `spec.replicas`, all at once (every
//!   `podManagementPolicy` behaves as `Parallel`); a deleted pod is recreated with the same name
//!   once the old one is gone; pods above the count are deleted;
//! - PVCs `<template>-<name>-<ordinal>` from `volumeClaimTemplates`, created before their pod
//!   (and again for a pod whose claim is gone), kept on scale-down and on deletion unless
//!   `persistentVolumeClaimRetentionPolicy` says `Delete`; a pod whose claim is being deleted is
//!   not created until the claim is gone;
//! - the revision is `<name>-<hash of spec.template>`, carried by each pod's
//!   `controller-revision-hash` label. `RollingUpdate` replaces outdated pods at or above the
//!   partition one at a time, highest ordinal first, only while every pod is Ready; `OnDelete`
//!   replaces a pod only when someone deletes it. No ControllerRevision objects are written, so a
//!   recreated pod below the partition gets the update revision too.
//!
//! Deployments own one ReplicaSet per template hash (`<name>-<hash>`, label `pod-template-hash`);
//! the newest gets `spec.replicas`, older ones are scaled to zero once it is fully ready
//! (immediately with `Recreate`). ReplicaSets keep `spec.replicas` pods named `<rs>-<suffix>`.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Map, Value};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::object::{deleting, log_failure, name_of, ns_of, uid_of};
use crate::resources::ResourceDef;
use crate::store::{self, now_rfc3339, DeleteOptions, Store, Target};
use crate::volumes::Volumes;

/// Starts the controllers, the storage ones keeping volume directories under `root`; they stop
/// when `shutdown` is cancelled.
pub fn spawn(store: Arc<Store>, root: PathBuf, shutdown: CancellationToken) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut events = store.subscribe();
        let volumes = Volumes::new(store.clone(), root);
        let controllers = Controllers::new(store);
        loop {
            volumes.reconcile();
            controllers.reconcile_all();
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = events.recv() => {
                    while events.try_recv().is_ok() {}
                }
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
        }
    })
}

/// The workload controllers of one cluster and the resources they act on.
struct Controllers {
    /// The cluster's objects, read and written as a client would.
    store: Arc<Store>,
    /// Pods, which every controller creates and deletes.
    pods: Arc<ResourceDef>,
    /// PersistentVolumeClaims, created from StatefulSets' claim templates.
    pvcs: Arc<ResourceDef>,
    /// StatefulSets.
    statefulsets: Arc<ResourceDef>,
    /// Deployments.
    deployments: Arc<ResourceDef>,
    /// ReplicaSets, owned by Deployments and owning pods.
    replicasets: Arc<ResourceDef>,
}

/// A stable hash of a JSON value, independent of map ordering.
pub fn template_hash(value: &Value) -> String {
    fn eat(hash: &mut u64, bytes: &[u8]) {
        for b in bytes {
            *hash = (*hash ^ u64::from(*b)).wrapping_mul(0x100_0000_01b3);
        }
    }
    fn feed(hash: &mut u64, value: &Value) {
        match value {
            Value::Object(map) => {
                let mut keys: Vec<&String> = map.keys().collect();
                keys.sort();
                eat(hash, b"{");
                for k in keys {
                    eat(hash, k.as_bytes());
                    eat(hash, b":");
                    feed(hash, &map[k]);
                }
                eat(hash, b"}");
            }
            Value::Array(items) => {
                eat(hash, b"[");
                for item in items {
                    feed(hash, item);
                }
                eat(hash, b"]");
            }
            other => eat(hash, other.to_string().as_bytes()),
        }
    }
    let mut hash = 0xcbf2_9ce4_8422_2325u64;
    feed(&mut hash, value);
    format!("{:010x}", hash & 0xff_ffff_ffff)
}

fn is_ready(pod: &Value) -> bool {
    pod["status"]["conditions"]
        .as_array()
        .into_iter()
        .flatten()
        .any(|c| c["type"] == "Ready" && c["status"] == "True")
}

fn controlled_by(object: &Value, owner_uid: &str) -> bool {
    object["metadata"]["ownerReferences"]
        .as_array()
        .into_iter()
        .flatten()
        .any(|r| r["uid"] == owner_uid && r["controller"] == json!(true))
}

fn owner_reference(owner: &Value, kind: &str, controller: bool) -> Value {
    json!({"apiVersion": "apps/v1", "kind": kind, "name": name_of(owner), "uid": uid_of(owner),
           "controller": controller, "blockOwnerDeletion": true})
}

fn labels_of(object: &Value) -> Map<String, Value> {
    object["metadata"]["labels"].as_object().cloned().unwrap_or_default()
}

/// A pod from a workload's template.
fn pod_from_template(
    template: &Value,
    name: Option<&str>,
    generate_name: Option<&str>,
    extra_labels: Map<String, Value>,
    owner: Value,
) -> Value {
    let mut pod = json!({"metadata": {}, "spec": template["spec"].clone()});
    let mut labels = labels_of(template);
    labels.extend(extra_labels);
    pod["metadata"]["labels"] = Value::Object(labels);
    if let Some(annotations) = template["metadata"].get("annotations") {
        pod["metadata"]["annotations"] = annotations.clone();
    }
    if let Some(name) = name {
        pod["metadata"]["name"] = json!(name);
    }
    if let Some(prefix) = generate_name {
        pod["metadata"]["generateName"] = json!(prefix);
    }
    pod["metadata"]["ownerReferences"] = json!([owner]);
    pod
}

impl Controllers {
    fn new(store: Arc<Store>) -> Self {
        Controllers {
            pods: store.builtin("", "pods"),
            pvcs: store.builtin("", "persistentvolumeclaims"),
            statefulsets: store.builtin("apps", "statefulsets"),
            deployments: store.builtin("apps", "deployments"),
            replicasets: store.builtin("apps", "replicasets"),
            store,
        }
    }

    fn reconcile_all(&self) {
        for sts in self.store.objects_of(&self.statefulsets.storage_key()) {
            self.reconcile_statefulset(&sts);
        }
        for deployment in self.store.objects_of(&self.deployments.storage_key()) {
            self.reconcile_deployment(&deployment);
        }
        for rs in self.store.objects_of(&self.replicasets.storage_key()) {
            self.reconcile_replicaset(&rs);
        }
    }

    fn owned_pods(&self, owner: &Value) -> Vec<Value> {
        let ns = ns_of(owner);
        self.store
            .objects_of(store::PODS)
            .into_iter()
            .filter(|p| ns_of(p) == ns && controlled_by(p, uid_of(owner)))
            .collect()
    }

    fn write_status(&self, res: &ResourceDef, object: &Value, status: Value) {
        let mut updated = object.clone();
        updated["status"] = status;
        if let Some(m) = updated["metadata"].as_object_mut() {
            m.remove("resourceVersion");
        }
        log_failure(
            "writing workload status",
            name_of(object),
            self.store
                .update(res, ns_of(object), name_of(object), updated, Target::Status, false),
        );
    }

    fn delete_pod(&self, pod: &Value) {
        log_failure(
            "deleting pod",
            name_of(pod),
            self.store
                .delete(&self.pods, ns_of(pod), name_of(pod), &DeleteOptions::default(), false),
        );
    }

    fn reconcile_statefulset(&self, sts: &Value) {
        if deleting(sts) {
            return;
        }
        let (ns, name) = (ns_of(sts), name_of(sts));
        let spec = &sts["spec"];
        let replicas = spec["replicas"].as_i64().unwrap_or(1).max(0);
        let template = &spec["template"];
        let revision = format!("{name}-{}", template_hash(template));
        let claims: Vec<Value> = spec["volumeClaimTemplates"].as_array().cloned().unwrap_or_default();
        let retention = &spec["persistentVolumeClaimRetentionPolicy"];
        let delete_claims_with_set = retention["whenDeleted"] == "Delete";
        let delete_claims_on_scale = retention["whenScaled"] == "Delete";
        let selector_labels = spec["selector"]["matchLabels"].as_object().cloned().unwrap_or_default();

        let pods = self.owned_pods(sts);
        let ordinal_of =
            |pod: &Value| -> Option<i64> { name_of(pod).strip_prefix(name)?.strip_prefix('-')?.parse().ok() };
        let pod_at = |ordinal: i64| pods.iter().find(|p| ordinal_of(p) == Some(ordinal));
        let claim_name = |template: &Value, ordinal: i64| format!("{}-{name}-{ordinal}", name_of(template));

        for ordinal in 0..replicas {
            // A pod whose claim is being deleted is not created until the claim is gone and a
            // new one exists: it would otherwise start on the old volume, or wait for it forever.
            let mut claims_terminating = false;
            for claim in &claims {
                let claim_name = claim_name(claim, ordinal);
                if let Ok(existing) = self.store.get(&self.pvcs, ns, &claim_name) {
                    claims_terminating |= deleting(&existing);
                    continue;
                }
                let mut labels = labels_of(claim);
                labels.extend(selector_labels.clone());
                let mut pvc = json!({"metadata": {"name": claim_name, "labels": labels}, "spec": claim["spec"]});
                if let Some(annotations) = claim["metadata"].get("annotations") {
                    pvc["metadata"]["annotations"] = annotations.clone();
                }
                if delete_claims_with_set {
                    pvc["metadata"]["ownerReferences"] = json!([owner_reference(sts, "StatefulSet", false)]);
                }
                log_failure(
                    "creating PVC",
                    &claim_name,
                    self.store.create(&self.pvcs, ns, pvc, false),
                );
            }
            if pod_at(ordinal).is_none() && claims_terminating {
                tracing::debug!(
                    statefulset = name,
                    ordinal,
                    "a claim of the pod is being deleted; not creating it yet"
                );
            } else if pod_at(ordinal).is_none() {
                let pod_name = format!("{name}-{ordinal}");
                let mut extra = Map::new();
                extra.insert("statefulset.kubernetes.io/pod-name".into(), json!(pod_name));
                extra.insert("controller-revision-hash".into(), json!(revision));
                extra.insert("apps.kubernetes.io/pod-index".into(), json!(ordinal.to_string()));
                let mut pod = pod_from_template(
                    template,
                    Some(&pod_name),
                    None,
                    extra,
                    owner_reference(sts, "StatefulSet", true),
                );
                pod["spec"]["hostname"] = json!(pod_name);
                if let Some(service) = spec["serviceName"].as_str().filter(|s| !s.is_empty()) {
                    pod["spec"]["subdomain"] = json!(service);
                }
                if !pod["spec"]["volumes"].is_array() {
                    pod["spec"]["volumes"] = json!([]);
                }
                let volumes = pod["spec"]["volumes"].as_array_mut().expect("made an array");
                for claim in &claims {
                    let volume_name = name_of(claim);
                    if !volumes.iter().any(|v| v["name"] == volume_name) {
                        volumes.push(json!({"name": volume_name,
                            "persistentVolumeClaim": {"claimName": claim_name(claim, ordinal)}}));
                    }
                }
                tracing::info!(statefulset = name, pod = %pod_name, "creating pod");
                log_failure("creating pod", &pod_name, self.store.create(&self.pods, ns, pod, false));
            }
        }
        for pod in &pods {
            match ordinal_of(pod) {
                Some(ordinal) if ordinal < replicas => {}
                _ if deleting(pod) => {}
                _ => {
                    tracing::info!(statefulset = name, pod = name_of(pod), "scaling down: deleting pod");
                    self.delete_pod(pod);
                }
            }
        }
        if delete_claims_on_scale {
            for pvc in self.store.objects_of(&self.pvcs.storage_key()) {
                if ns_of(&pvc) != ns {
                    continue;
                }
                let stale = claims.iter().any(|claim| {
                    name_of(&pvc)
                        .strip_prefix(&format!("{}-{name}-", name_of(claim)))
                        .and_then(|o| o.parse::<i64>().ok())
                        .is_some_and(|o| o >= replicas && pod_at(o).is_none())
                });
                if stale {
                    log_failure(
                        "deleting PVC",
                        name_of(&pvc),
                        self.store
                            .delete(&self.pvcs, ns, name_of(&pvc), &DeleteOptions::default(), false),
                    );
                }
            }
        }
        let revision_of = |pod: &Value| {
            pod["metadata"]["labels"]["controller-revision-hash"]
                .as_str()
                .map(str::to_string)
        };
        let strategy = &spec["updateStrategy"];
        if strategy["type"].as_str().unwrap_or("RollingUpdate") == "RollingUpdate" {
            let partition = strategy["rollingUpdate"]["partition"].as_i64().unwrap_or(0);
            let settled = (0..replicas).all(|o| pod_at(o).is_some_and(|p| !deleting(p) && is_ready(p)));
            if settled {
                let outdated = pods
                    .iter()
                    .filter(|p| ordinal_of(p).is_some_and(|o| o >= partition && o < replicas))
                    .filter(|p| revision_of(p).as_deref() != Some(revision.as_str()))
                    .max_by_key(|p| ordinal_of(p));
                if let Some(pod) = outdated {
                    tracing::info!(statefulset = name, pod = name_of(pod), %revision, "rolling update: replacing pod");
                    self.delete_pod(pod);
                }
            }
        }
        let active: Vec<&Value> = pods.iter().filter(|p| !deleting(p)).collect();
        let ready = active.iter().filter(|p| is_ready(p)).count();
        let updated = active
            .iter()
            .filter(|p| revision_of(p).as_deref() == Some(revision.as_str()))
            .count();
        let previous_current = sts["status"]["currentRevision"]
            .as_str()
            .unwrap_or(&revision)
            .to_string();
        let current_revision = if updated as i64 == replicas && active.len() as i64 == replicas {
            revision.clone()
        } else {
            previous_current
        };
        let current = active
            .iter()
            .filter(|p| revision_of(p).as_deref() == Some(current_revision.as_str()))
            .count();
        let status = json!({
            "observedGeneration": sts["metadata"]["generation"],
            "replicas": pods.len(),
            "readyReplicas": ready,
            "availableReplicas": ready,
            "currentReplicas": current,
            "updatedReplicas": updated,
            "currentRevision": current_revision,
            "updateRevision": revision,
            "collisionCount": 0,
        });
        self.write_status(&self.statefulsets, sts, status);
    }

    fn reconcile_replicaset(&self, rs: &Value) {
        if deleting(rs) {
            return;
        }
        let (ns, name) = (ns_of(rs), name_of(rs));
        let replicas = rs["spec"]["replicas"].as_i64().unwrap_or(1).max(0) as usize;
        let pods = self.owned_pods(rs);
        let mut active: Vec<&Value> = pods.iter().filter(|p| !deleting(p)).collect();
        for _ in active.len()..replicas {
            let pod = pod_from_template(
                &rs["spec"]["template"],
                None,
                Some(&format!("{name}-")),
                Map::new(),
                owner_reference(rs, "ReplicaSet", true),
            );
            log_failure("creating pod", name, self.store.create(&self.pods, ns, pod, false));
        }
        if active.len() > replicas {
            active.sort_by_key(|p| {
                (
                    is_ready(p),
                    std::cmp::Reverse(
                        p["metadata"]["creationTimestamp"]
                            .as_str()
                            .unwrap_or_default()
                            .to_string(),
                    ),
                )
            });
            for pod in &active[..active.len() - replicas] {
                self.delete_pod(pod);
            }
        }
        let active: Vec<&Value> = pods.iter().filter(|p| !deleting(p)).collect();
        let ready = active.iter().filter(|p| is_ready(p)).count();
        let status = json!({
            "observedGeneration": rs["metadata"]["generation"],
            "replicas": active.len(),
            "fullyLabeledReplicas": active.len(),
            "readyReplicas": ready,
            "availableReplicas": ready,
        });
        self.write_status(&self.replicasets, rs, status);
    }

    fn reconcile_deployment(&self, deployment: &Value) {
        if deleting(deployment) {
            return;
        }
        let (ns, name) = (ns_of(deployment), name_of(deployment));
        let spec = &deployment["spec"];
        let replicas = spec["replicas"].as_i64().unwrap_or(1).max(0);
        let hash = template_hash(&spec["template"]);
        let rs_name = format!("{name}-{hash}");
        let owned: Vec<Value> = self
            .store
            .objects_of(&self.replicasets.storage_key())
            .into_iter()
            .filter(|rs| ns_of(rs) == ns && controlled_by(rs, uid_of(deployment)))
            .collect();
        let revision = owned
            .iter()
            .filter_map(|rs| {
                rs["metadata"]["annotations"]["deployment.kubernetes.io/revision"]
                    .as_str()?
                    .parse::<i64>()
                    .ok()
            })
            .max()
            .unwrap_or(0);
        let new_rs = owned.iter().find(|rs| name_of(rs) == rs_name);
        match new_rs {
            None => {
                let mut template = spec["template"].clone();
                template["metadata"]["labels"]["pod-template-hash"] = json!(hash);
                let mut selector = spec["selector"].clone();
                selector["matchLabels"]["pod-template-hash"] = json!(hash);
                let mut labels = labels_of(&spec["template"]);
                labels.insert("pod-template-hash".into(), json!(hash));
                let rs = json!({
                    "metadata": {"name": rs_name, "labels": labels,
                        "annotations": {"deployment.kubernetes.io/revision": (revision + 1).to_string()},
                        "ownerReferences": [owner_reference(deployment, "Deployment", true)]},
                    "spec": {"replicas": replicas, "selector": selector, "template": template},
                });
                log_failure(
                    "creating ReplicaSet",
                    &rs_name,
                    self.store.create(&self.replicasets, ns, rs, false),
                );
            }
            Some(rs) if rs["spec"]["replicas"].as_i64() != Some(replicas) => {
                log_failure(
                    "scaling ReplicaSet",
                    &rs_name,
                    self.store.patch(
                        &self.replicasets,
                        ns,
                        &rs_name,
                        crate::patch::PatchType::Merge,
                        &json!({"spec": {"replicas": replicas}}),
                        Target::Main,
                        false,
                    ),
                );
            }
            Some(_) => {}
        }
        let new_ready = new_rs
            .map(|rs| rs["status"]["readyReplicas"].as_i64().unwrap_or(0))
            .unwrap_or(0);
        let recreate = spec["strategy"]["type"] == "Recreate";
        for old in owned.iter().filter(|rs| name_of(rs) != rs_name) {
            if (recreate || new_ready >= replicas) && old["spec"]["replicas"].as_i64() != Some(0) {
                log_failure(
                    "scaling down old ReplicaSet",
                    name_of(old),
                    self.store.patch(
                        &self.replicasets,
                        ns,
                        name_of(old),
                        crate::patch::PatchType::Merge,
                        &json!({"spec": {"replicas": 0}}),
                        Target::Main,
                        false,
                    ),
                );
            }
        }
        let sum = |field: &str| {
            owned
                .iter()
                .map(|rs| rs["status"][field].as_i64().unwrap_or(0))
                .sum::<i64>()
        };
        let total = sum("replicas");
        let available = sum("availableReplicas");
        let updated = new_rs
            .map(|rs| rs["status"]["replicas"].as_i64().unwrap_or(0))
            .unwrap_or(0);
        let complete = updated == replicas && total == replicas && available >= replicas;
        let existing_conditions = deployment["status"]["conditions"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        let condition = |kind: &str, ok: bool, reason: &str, message: String| {
            let status = if ok { "True" } else { "False" };
            let previous = existing_conditions.iter().find(|c| c["type"] == kind);
            let unchanged = previous.is_some_and(|c| c["status"] == status && c["reason"] == reason);
            let (transition, update) = match previous {
                Some(c) if unchanged => (c["lastTransitionTime"].clone(), c["lastUpdateTime"].clone()),
                _ => (json!(now_rfc3339()), json!(now_rfc3339())),
            };
            json!({"type": kind, "status": status, "reason": reason, "message": message,
                   "lastTransitionTime": transition, "lastUpdateTime": update})
        };
        let status = json!({
            "observedGeneration": deployment["metadata"]["generation"],
            "replicas": total,
            "updatedReplicas": updated,
            "readyReplicas": sum("readyReplicas"),
            "availableReplicas": available,
            "unavailableReplicas": (total - available).max(0),
            "conditions": [
                condition("Available", available >= replicas,
                    if available >= replicas { "MinimumReplicasAvailable" } else { "MinimumReplicasUnavailable" },
                    "Deployment availability".to_string()),
                condition("Progressing", true,
                    if complete { "NewReplicaSetAvailable" } else { "ReplicaSetUpdated" },
                    format!("ReplicaSet \"{rs_name}\" is progressing.")),
            ],
        });
        self.write_status(&self.deployments, deployment, status);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::selector::LabelSelector;

    #[test]
    fn template_hash_ignores_key_order() {
        let a: Value = serde_json::from_str(r#"{"a": 1, "b": {"c": [1, 2]}}"#).unwrap();
        let b: Value = serde_json::from_str(r#"{"b": {"c": [1, 2]}, "a": 1}"#).unwrap();
        assert_eq!(template_hash(&a), template_hash(&b));
        assert_ne!(template_hash(&a), template_hash(&json!({"a": 2})));
    }

    #[test]
    fn label_selectors_from_statefulsets_render_for_scale() {
        let sel = LabelSelector::from_object(&json!({"matchLabels": {"app": "web"}}));
        assert_eq!(sel.to_string(), "app=web");
    }
}
