//! Storage as a real cluster's control plane runs it: the PersistentVolume controller (dynamic
//! provisioning, binding, reclaiming) and the `kubernetes.io/pvc-protection` controller.
//!
//! - **Provisioning.** A claim that is not bound gets a volume of its own: an `Available`
//!   PersistentVolume pre-bound to it (`spec.claimRef` naming the claim, or the claim's
//!   `spec.volumeName` naming the volume) when there is one, otherwise a new volume
//!   `pvc-<claim uid>` from the claim's StorageClass (or the default class), with the class's
//!   `reclaimPolicy`. Each volume is its own empty host directory, [`volume_path`]; a new claim
//!   under an old name gets a new, empty volume.
//! - **Reclaiming.** A bound volume whose claim is gone (or is another claim of the same name)
//!   is `Released`: with `Delete` its directory and object are removed, with `Retain` both stay
//!   and the volume is never bound again, unless someone edits its `claimRef`.
//! - **Protection.** Claims are created with the `kubernetes.io/pvc-protection` finalizer (the
//!   admission plugin's job, done by the store). A deleted claim keeps it, and so stays
//!   `Terminating`, while a scheduled pod that has not terminated refers to it; then the
//!   finalizer goes and the claim is removed.
//!
//! Every pass reads the store and writes through the same store API clients use, so each change
//! has a resourceVersion and a watch event, as with a real controller.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde_json::{json, Value};

use crate::object::{deleting, log_failure, name_of, ns_of, uid_of};
use crate::resources::ResourceDef;
use crate::store::{self, Store, Target};

pub use crate::wellknown::{PROVISIONER, PVC_PROTECTION};

/// The host directory of a PersistentVolume.
pub fn volume_path(root: &Path, volume: &str) -> PathBuf {
    root.join("volumes").join("pv").join(volume)
}

/// Whether `claim` is bound to a volume and usable by a pod.
pub fn is_bound(claim: &Value) -> bool {
    claim["status"]["phase"] == "Bound" && claim["spec"]["volumeName"].as_str().is_some_and(|v| !v.is_empty())
}

/// Why a pod cannot mount `claim_name` yet, as the kubelet reports it, or `None` when the claim
/// is bound and not being deleted.
pub fn claim_unusable(claim: Option<&Value>, claim_name: &str) -> Option<String> {
    match claim {
        None => Some(format!("persistentvolumeclaim \"{claim_name}\" not found")),
        Some(c) if deleting(c) => Some(format!("persistentvolumeclaim \"{claim_name}\" is being deleted")),
        Some(c) if !is_bound(c) => Some(format!("persistentvolumeclaim \"{claim_name}\" is not bound")),
        Some(_) => None,
    }
}

/// The claims a pod's volumes name.
pub fn claims_of(pod: &Value) -> Vec<String> {
    pod["spec"]["volumes"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|v| v["persistentVolumeClaim"]["claimName"].as_str())
        .map(str::to_string)
        .collect()
}

/// The storage controllers of one cluster.
pub struct Volumes {
    /// The cluster's objects, read and written as a client would.
    store: Arc<Store>,
    /// The cluster root, under which each volume has its host directory.
    root: PathBuf,
    /// PersistentVolumeClaims.
    claims: Arc<ResourceDef>,
    /// PersistentVolumes.
    volumes: Arc<ResourceDef>,
    /// StorageClasses.
    classes: Arc<ResourceDef>,
}

impl Volumes {
    /// Controllers for `store`, keeping volume directories under `root`.
    pub fn new(store: Arc<Store>, root: PathBuf) -> Self {
        Volumes {
            claims: store.builtin("", "persistentvolumeclaims"),
            volumes: store.builtin("", "persistentvolumes"),
            classes: store.builtin("storage.k8s.io", "storageclasses"),
            store,
            root,
        }
    }

    /// One pass: release unused deleted claims, bind and provision, reclaim.
    pub fn reconcile(&self) {
        self.release_unused_claims();
        self.make_available();
        for claim in self.store.objects_of(&self.claims.storage_key()) {
            if !deleting(&claim) && !is_bound(&claim) {
                self.bind(&claim);
            }
        }
        self.reclaim();
    }

    /// Removes the protection finalizer from deleted claims no running pod refers to.
    fn release_unused_claims(&self) {
        let pods = self.store.objects_of(store::PODS);
        for claim in self.store.objects_of(&self.claims.storage_key()) {
            let finalizers: Vec<Value> = claim["metadata"]["finalizers"].as_array().cloned().unwrap_or_default();
            if !deleting(&claim) || !finalizers.iter().any(|f| f == PVC_PROTECTION) {
                continue;
            }
            let in_use = pods.iter().any(|pod| {
                let scheduled = pod["spec"]["nodeName"].as_str().is_some_and(|n| !n.is_empty());
                let phase = pod["status"]["phase"].as_str().unwrap_or_default();
                let terminal = phase == "Succeeded" || phase == "Failed";
                ns_of(pod) == ns_of(&claim)
                    && scheduled
                    && !terminal
                    && claims_of(pod).iter().any(|c| c == name_of(&claim))
            });
            if in_use {
                continue;
            }
            let mut released = claim.clone();
            released["metadata"]["finalizers"] = json!(finalizers
                .into_iter()
                .filter(|f| f != PVC_PROTECTION)
                .collect::<Vec<_>>());
            if let Some(m) = released["metadata"].as_object_mut() {
                m.remove("resourceVersion");
            }
            tracing::info!(
                claim = name_of(&claim),
                namespace = ns_of(&claim),
                "claim no longer in use: removing it"
            );
            log_failure(
                "releasing a deleted claim",
                name_of(&claim),
                self.store.update(
                    &self.claims,
                    ns_of(&claim),
                    name_of(&claim),
                    released,
                    Target::Main,
                    false,
                ),
            );
        }
    }

    /// Binds `claim` to a volume pre-bound to it, or to a newly provisioned one.
    fn bind(&self, claim: &Value) {
        let (ns, name, uid) = (ns_of(claim), name_of(claim), uid_of(claim));
        let wanted_volume = claim["spec"]["volumeName"].as_str().filter(|v| !v.is_empty());
        let class = self.class_of(claim);
        let names_claim = |pv: &Value| {
            let claim_ref = &pv["spec"]["claimRef"];
            claim_ref["namespace"] == ns
                && claim_ref["name"] == name
                && claim_ref["uid"].as_str().is_none_or(|u| u.is_empty() || u == uid)
        };
        let candidates: Vec<Value> = self
            .store
            .objects_of(&self.volumes.storage_key())
            .into_iter()
            .filter(|pv| !deleting(pv) && pv["status"]["phase"] == "Available")
            .filter(|pv| pv["spec"]["claimRef"].is_null() || names_claim(pv))
            .filter(|pv| match wanted_volume {
                Some(v) => name_of(pv) == v,
                None => class
                    .as_ref()
                    .is_some_and(|c| pv["spec"]["storageClassName"].as_str() == Some(name_of(c))),
            })
            .collect();
        let available = candidates
            .iter()
            .find(|pv| names_claim(pv))
            .or(candidates.first())
            .cloned();
        let volume = match available {
            Some(pv) => pv,
            None if wanted_volume.is_some() => return, // waits for that volume, as a real binder does
            None => match self.provision(claim) {
                Some(pv) => pv,
                None => return,
            },
        };
        let volume_name = name_of(&volume).to_string();
        let mut bound_volume = volume.clone();
        bound_volume["spec"]["claimRef"] = json!({"kind": "PersistentVolumeClaim", "apiVersion": "v1",
            "namespace": ns, "name": name, "uid": uid});
        if let Some(m) = bound_volume["metadata"].as_object_mut() {
            m.remove("resourceVersion");
        }
        log_failure(
            "binding a volume",
            &volume_name,
            self.store
                .update(&self.volumes, "", &volume_name, bound_volume, Target::Main, false),
        );
        if let Ok(mut current) = self.store.get(&self.volumes, "", &volume_name) {
            current["status"] = json!({"phase": "Bound"});
            log_failure(
                "marking a volume bound",
                &volume_name,
                self.store
                    .update(&self.volumes, "", &volume_name, current, Target::Status, false),
            );
        }
        let mut bound_claim = claim.clone();
        bound_claim["spec"]["volumeName"] = json!(volume_name);
        let annotations = bound_claim["metadata"]["annotations"]
            .as_object()
            .cloned()
            .unwrap_or_default();
        let mut annotations = annotations;
        annotations.insert("pv.kubernetes.io/bind-completed".into(), json!("yes"));
        bound_claim["metadata"]["annotations"] = Value::Object(annotations);
        if let Some(m) = bound_claim["metadata"].as_object_mut() {
            m.remove("resourceVersion");
        }
        log_failure(
            "binding a claim",
            name,
            self.store
                .update(&self.claims, ns, name, bound_claim, Target::Main, false),
        );
        if let Ok(mut current) = self.store.get(&self.claims, ns, name) {
            current["status"] = json!({
                "phase": "Bound",
                "accessModes": volume["spec"]["accessModes"],
                "capacity": volume["spec"]["capacity"],
            });
            log_failure(
                "marking a claim bound",
                name,
                self.store
                    .update(&self.claims, ns, name, current, Target::Status, false),
            );
        }
        tracing::info!(claim = name, namespace = ns, volume = %volume_name, "claim bound");
    }

    /// A new volume for `claim` from its StorageClass, or `None` when the class does not exist
    /// or is not this simulation's (the claim then stays `Pending`, as on a real cluster).
    fn provision(&self, claim: &Value) -> Option<Value> {
        let class = self.class_of(claim)?;
        if class["provisioner"] != PROVISIONER {
            return None;
        }
        let volume_name = format!("pvc-{}", uid_of(claim));
        let dir = volume_path(&self.root, &volume_name);
        if let Err(e) = std::fs::create_dir_all(&dir) {
            tracing::warn!(volume = %volume_name, error = %e, "provisioning a volume directory");
            return None;
        }
        let volume = json!({
            "metadata": {"name": volume_name,
                "annotations": {"pv.kubernetes.io/provisioned-by": PROVISIONER}},
            "spec": {
                "capacity": claim["spec"]["resources"]["requests"],
                "accessModes": claim["spec"]["accessModes"],
                "persistentVolumeReclaimPolicy": class["reclaimPolicy"].as_str().unwrap_or("Delete"),
                "storageClassName": name_of(&class),
                "volumeMode": "Filesystem",
                "hostPath": {"path": dir.to_string_lossy()},
                // Provisioned for this claim: no other claim may take it, even if binding
                // has to be retried.
                "claimRef": {"kind": "PersistentVolumeClaim", "apiVersion": "v1",
                    "namespace": ns_of(claim), "name": name_of(claim), "uid": uid_of(claim)},
            },
        });
        match self.store.create(&self.volumes, "", volume, false) {
            Ok(pv) => {
                tracing::info!(volume = %volume_name, claim = name_of(claim), "volume provisioned");
                Some(pv)
            }
            Err(e) if e.code == 409 => self.store.get(&self.volumes, "", &volume_name).ok(),
            Err(e) => {
                tracing::warn!(volume = %volume_name, error = %e, "creating a volume");
                None
            }
        }
    }

    /// The StorageClass a claim asks for, or the default class when it names none.
    fn class_of(&self, claim: &Value) -> Option<Value> {
        let classes = self.store.objects_of(&self.classes.storage_key());
        match claim["spec"]["storageClassName"].as_str() {
            Some(name) => classes.into_iter().find(|c| name_of(c) == name),
            None => classes
                .into_iter()
                .find(|c| c["metadata"]["annotations"]["storageclass.kubernetes.io/is-default-class"] == "true"),
        }
    }

    /// Volumes nobody holds become `Available`: a new volume object without a status, and a
    /// retained volume whose `claimRef` an administrator removed or pointed at a claim by name.
    fn make_available(&self) {
        for volume in self.store.objects_of(&self.volumes.storage_key()) {
            let phase = volume["status"]["phase"].as_str().unwrap_or_default();
            let held = volume["spec"]["claimRef"]["uid"]
                .as_str()
                .is_some_and(|u| !u.is_empty());
            let becomes_available = match phase {
                "" | "Pending" => !held,
                "Released" => !held,
                _ => false,
            };
            if deleting(&volume) || !becomes_available {
                continue;
            }
            let mut available = volume.clone();
            available["status"] = json!({"phase": "Available"});
            log_failure(
                "making a volume available",
                name_of(&volume),
                self.store
                    .update(&self.volumes, "", name_of(&volume), available, Target::Status, false),
            );
        }
    }

    /// Releases volumes whose claim is gone, deleting those whose policy says `Delete`.
    fn reclaim(&self) {
        let claims = self.store.objects_of(&self.claims.storage_key());
        for volume in self.store.objects_of(&self.volumes.storage_key()) {
            let claim_ref = &volume["spec"]["claimRef"];
            let Some(bound_uid) = claim_ref["uid"].as_str().filter(|u| !u.is_empty()) else {
                continue;
            };
            let claim_alive = claims.iter().any(|c| uid_of(c) == bound_uid);
            if claim_alive || volume["status"]["phase"] == "Released" {
                continue;
            }
            let name = name_of(&volume).to_string();
            if volume["spec"]["persistentVolumeReclaimPolicy"] == "Delete" {
                if let Some(path) = volume["spec"]["hostPath"]["path"].as_str() {
                    if let Err(e) = std::fs::remove_dir_all(path) {
                        if e.kind() != std::io::ErrorKind::NotFound {
                            tracing::warn!(volume = %name, error = %e, "deleting a released volume's data");
                            continue;
                        }
                    }
                }
                tracing::info!(volume = %name, "claim gone: volume and its data deleted");
                log_failure(
                    "deleting a released volume",
                    &name,
                    self.store
                        .delete(&self.volumes, "", &name, &store::DeleteOptions::default(), false),
                );
            } else {
                tracing::info!(volume = %name, "claim gone: volume released and retained");
                let mut released = volume.clone();
                released["status"] = json!({"phase": "Released"});
                log_failure(
                    "releasing a volume",
                    &name,
                    self.store
                        .update(&self.volumes, "", &name, released, Target::Status, false),
                );
            }
        }
    }
}
