//! Admission: what the store adds to or checks in an object before it is stored, as a real API
//! server's defaulting and admission plugins do: the objects a new cluster starts with,
//! per-kind defaults (Service cluster IPs, pod phase, the claim-protection finalizer, CRD
//! conditions and more) and CustomResourceDefinition validation.

use serde_json::{json, Value};

use super::{meta, meta_mut, now_rfc3339, Inner, Store, CRDS, NAMESPACES, PODS};
use crate::error::ApiError;
use crate::resources::ResourceDef;
use crate::wellknown;

impl Store {
    pub(super) fn seed(&self) {
        let namespaces = self.builtin("", "namespaces");
        for ns in ["default", "kube-system", "kube-public", "kube-node-lease"] {
            self.create(&namespaces, "", json!({"metadata": {"name": ns}}), false)
                .expect("seeding a namespace into an empty store");
        }
        let node = json!({"metadata": {"name": wellknown::NODE_NAME,
                "labels": {"kubernetes.io/hostname": wellknown::NODE_NAME}},
            "status": {"addresses": [{"type": "InternalIP", "address": "127.0.0.1"}],
                "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady"}]}});
        self.create(&self.builtin("", "nodes"), "", node, false)
            .expect("seeding the node");
        let class = json!({"metadata": {"name": "standard",
                "annotations": {"storageclass.kubernetes.io/is-default-class": "true"}},
            "provisioner": wellknown::PROVISIONER, "reclaimPolicy": "Delete",
            "volumeBindingMode": "Immediate"});
        self.create(&self.builtin("storage.k8s.io", "storageclasses"), "", class, false)
            .expect("seeding the storage class");
    }
}

pub(super) fn validate_crd(crd: &Value, name: &str) -> Result<(), ApiError> {
    let spec = &crd["spec"];
    let plural = spec["names"]["plural"].as_str().unwrap_or_default();
    let group = spec["group"].as_str().unwrap_or_default();
    let invalid = |why: String| {
        Err(ApiError::invalid(
            "apiextensions.k8s.io",
            "customresourcedefinitions",
            name,
            &why,
        ))
    };
    if plural.is_empty() || group.is_empty() || spec["names"]["kind"].as_str().is_none() {
        return invalid("spec.group, spec.names.plural and spec.names.kind are required".into());
    }
    if name != format!("{plural}.{group}") {
        return invalid(format!(
            "metadata.name: Invalid value: \"{name}\": must be spec.names.plural+\".\"+spec.group"
        ));
    }
    let versions = spec["versions"].as_array().map(Vec::len).unwrap_or(0);
    let storage = spec["versions"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|v| v["storage"] == json!(true))
        .count();
    if versions == 0 || storage != 1 {
        return invalid("spec.versions: must have exactly one version marked as storage version".into());
    }
    Ok(())
}

pub(super) fn apply_defaults(inner: &mut Inner, res: &ResourceDef, object: &mut Value, existing: Option<&Value>) {
    fn default(object: &mut Value, path: &[&str], value: Value) {
        let mut current = object;
        for (i, field) in path.iter().enumerate() {
            if !current.is_object() {
                *current = json!({});
            }
            let map = current.as_object_mut().expect("made an object");
            if i + 1 == path.len() {
                if map.get(*field).is_none_or(Value::is_null) {
                    map.insert(field.to_string(), value);
                }
                return;
            }
            current = map.entry(field.to_string()).or_insert(json!({}));
        }
    }
    match res.storage_key().as_str() {
        NAMESPACES => {
            let name = meta(object, "name");
            default(object, &["status", "phase"], json!("Active"));
            default(
                object,
                &["metadata", "labels", "kubernetes.io/metadata.name"],
                json!(name),
            );
        }
        PODS => {
            default(object, &["spec", "restartPolicy"], json!("Always"));
            default(object, &["spec", "terminationGracePeriodSeconds"], json!(30));
            default(object, &["spec", "serviceAccountName"], json!("default"));
            default(object, &["spec", "schedulerName"], json!("default-scheduler"));
            default(object, &["status", "phase"], json!("Pending"));
        }
        "/services" => {
            default(object, &["spec", "type"], json!("ClusterIP"));
            default(object, &["spec", "sessionAffinity"], json!("None"));
            if let Some(ip) = existing.and_then(|e| e["spec"].get("clusterIP")) {
                default(object, &["spec", "clusterIP"], ip.clone());
            }
            if object["spec"]["clusterIP"].as_str().is_none_or(str::is_empty) {
                let n = inner.next_cluster_ip;
                inner.next_cluster_ip += 1;
                object["spec"]["clusterIP"] = json!(format!("10.96.{}.{}", n / 250, n % 250 + 1));
            }
            let ip = object["spec"]["clusterIP"].clone();
            default(object, &["spec", "clusterIPs"], json!([ip]));
            if let Some(ports) = object["spec"]["ports"].as_array_mut() {
                for port in ports {
                    default(port, &["protocol"], json!("TCP"));
                    let number = port["port"].clone();
                    default(port, &["targetPort"], number);
                }
            }
        }
        "/persistentvolumeclaims" => {
            default(object, &["spec", "volumeMode"], json!("Filesystem"));
            default(object, &["status", "phase"], json!("Pending"));
            if existing.is_none() {
                // The DefaultStorageClass admission plugin.
                default(object, &["spec", "storageClassName"], json!("standard"));
                // The admission plugin of the same name: a claim in use is not removed until
                // no pod uses it (see `volumes`).
                let finalizers = meta_mut(object).entry("finalizers").or_insert_with(|| json!([]));
                if let Some(list) = finalizers.as_array_mut() {
                    if !list.iter().any(|f| f == wellknown::PVC_PROTECTION) {
                        list.push(json!(wellknown::PVC_PROTECTION));
                    }
                }
            }
        }
        "apps/statefulsets" => {
            default(object, &["spec", "replicas"], json!(1));
            default(object, &["spec", "podManagementPolicy"], json!("OrderedReady"));
            default(object, &["spec", "updateStrategy", "type"], json!("RollingUpdate"));
            if object["spec"]["updateStrategy"]["type"] == json!("RollingUpdate") {
                default(
                    object,
                    &["spec", "updateStrategy", "rollingUpdate", "partition"],
                    json!(0),
                );
            }
            default(object, &["spec", "revisionHistoryLimit"], json!(10));
            default(
                object,
                &["spec", "persistentVolumeClaimRetentionPolicy", "whenDeleted"],
                json!("Retain"),
            );
            default(
                object,
                &["spec", "persistentVolumeClaimRetentionPolicy", "whenScaled"],
                json!("Retain"),
            );
        }
        "apps/deployments" => {
            default(object, &["spec", "replicas"], json!(1));
            default(object, &["spec", "strategy", "type"], json!("RollingUpdate"));
            default(object, &["spec", "revisionHistoryLimit"], json!(10));
            default(object, &["spec", "progressDeadlineSeconds"], json!(600));
        }
        "apps/replicasets" => default(object, &["spec", "replicas"], json!(1)),
        CRDS if existing.is_none() => {
            let names = object["spec"]["names"].clone();
            let mut accepted = names.clone();
            let kind = names["kind"].as_str().unwrap_or_default().to_string();
            default(&mut accepted, &["singular"], json!(kind.to_lowercase()));
            default(&mut accepted, &["listKind"], json!(format!("{kind}List")));
            let stored: Vec<Value> = object["spec"]["versions"]
                .as_array()
                .into_iter()
                .flatten()
                .filter(|v| v["storage"] == json!(true))
                .map(|v| v["name"].clone())
                .collect();
            let now = now_rfc3339();
            object["status"] = json!({
                "acceptedNames": accepted,
                "storedVersions": stored,
                "conditions": [
                    {"type": "NamesAccepted", "status": "True", "reason": "NoConflicts",
                     "message": "no conflicts found", "lastTransitionTime": now},
                    {"type": "Established", "status": "True", "reason": "InitialNamesAccepted",
                     "message": "the initial names have been accepted", "lastTransitionTime": now},
                ],
            });
        }
        _ => {}
    }
}
