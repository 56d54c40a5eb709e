//! The resource registry: which kinds the simulated server serves, and how.
//!
//! Every served group/version/resource is described by a [`ResourceDef`]: its kind, plural,
//! scope, short names, categories, subresources (`status`, `scale`) and printer columns. The
//! registry starts with the built-in kinds the raftkv journey touches and grows when a
//! `CustomResourceDefinition` is written, one [`ResourceDef`] per served version. Objects are
//! stored per group and plural (see [`ResourceDef::storage_key`]), so every served version of a
//! CRD reads and writes the same objects, as with CRD conversion strategy `None`.

use std::sync::Arc;

use serde_json::Value;

/// Where the `/scale` subresource reads and writes replica counts, as JSON paths like `.spec.replicas`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScalePaths {
    /// Path of the desired replica count (`Scale.spec.replicas`).
    pub spec_replicas: String,
    /// Path of the observed replica count (`Scale.status.replicas`).
    pub status_replicas: String,
    /// Path of the label selector (`Scale.status.selector`): a string, or a `LabelSelector` object.
    pub label_selector: Option<String>,
}

/// A column of the server-side `Table` rendering that `kubectl get` asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PrinterColumn {
    /// Column header.
    pub name: String,
    /// OpenAPI type: `string`, `integer`, `number`, `boolean` or `date`.
    pub type_: String,
    /// Optional OpenAPI format.
    pub format: String,
    /// Column description.
    pub description: String,
    /// 0 for columns shown by default, higher for `-o wide`.
    pub priority: i64,
    /// The simple JSONPath of the value (`.status.replicas`).
    pub json_path: String,
}

/// One served group/version/resource.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResourceDef {
    /// API group, empty for the core group.
    pub group: String,
    /// Version, such as `v1`.
    pub version: String,
    /// Kind, such as `StatefulSet`.
    pub kind: String,
    /// Lower-case plural used in URLs.
    pub plural: String,
    /// Lower-case singular, shown by `kubectl api-resources`.
    pub singular: String,
    /// Whether objects live in namespaces.
    pub namespaced: bool,
    /// Short names (`sts`, `pvc`).
    pub short_names: Vec<String>,
    /// Categories (`all`).
    pub categories: Vec<String>,
    /// Whether a `/status` subresource exists; if so, main-resource writes keep the old status.
    pub status_subresource: bool,
    /// The `/scale` subresource mapping, if any.
    pub scale: Option<ScalePaths>,
    /// Printer columns for `Table` responses after `NAME` (empty: `NAME`, `AGE`).
    pub printer_columns: Vec<PrinterColumn>,
    /// True for kinds defined by a CustomResourceDefinition.
    pub custom: bool,
}

impl ResourceDef {
    /// `group/version`, or `v1` for the core group.
    pub fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.version.clone()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }

    /// The key objects of this resource are stored under, shared by all versions.
    pub fn storage_key(&self) -> String {
        format!("{}/{}", self.group, self.plural)
    }

    /// `plural.group` as kubectl prints it.
    pub fn qualified_name(&self) -> String {
        if self.group.is_empty() {
            self.plural.clone()
        } else {
            format!("{}.{}", self.plural, self.group)
        }
    }
}

/// All resources currently served.
#[derive(Debug, Clone, Default)]
pub struct Registry {
    /// The built-in kinds, fixed for the life of the cluster.
    builtins: Vec<Arc<ResourceDef>>,
    /// The kinds CRDs define, one per served version.
    custom: Vec<Arc<ResourceDef>>,
}

impl Registry {
    /// A registry holding the built-in kinds.
    pub fn with_builtins() -> Self {
        Registry {
            builtins: builtin_resources().into_iter().map(Arc::new).collect(),
            custom: Vec::new(),
        }
    }

    /// Every served resource, built-ins first.
    pub fn all(&self) -> impl Iterator<Item = &Arc<ResourceDef>> {
        self.builtins.iter().chain(self.custom.iter())
    }

    /// The resource served at `group/version/plural`.
    pub fn find(&self, group: &str, version: &str, plural: &str) -> Option<Arc<ResourceDef>> {
        self.all()
            .find(|r| r.group == group && r.version == version && r.plural == plural)
            .cloned()
    }

    /// The preferred version of `group/plural` (any version if several).
    pub fn find_any_version(&self, group: &str, plural: &str) -> Option<Arc<ResourceDef>> {
        let mut candidates: Vec<_> = self
            .all()
            .filter(|r| r.group == group && r.plural == plural)
            .cloned()
            .collect();
        candidates.sort_by_key(|r| std::cmp::Reverse(version_priority(&r.version)));
        candidates.into_iter().next()
    }

    /// Replaces the resources defined by CRDs with those of `crds` (CRD objects as stored).
    pub fn set_custom_resources<'a>(&mut self, crds: impl Iterator<Item = &'a Value>) {
        self.custom = crds
            .filter(|crd| crd["metadata"]["deletionTimestamp"].is_null())
            .flat_map(resources_of_crd)
            .map(Arc::new)
            .collect();
    }

    /// Groups in discovery order (core first as `""`), each with its versions, preferred first.
    pub fn groups(&self) -> Vec<(String, Vec<String>)> {
        let mut groups: Vec<(String, Vec<String>)> = Vec::new();
        for r in self.all() {
            match groups.iter_mut().find(|(g, _)| *g == r.group) {
                Some((_, versions)) => {
                    if !versions.contains(&r.version) {
                        versions.push(r.version.clone());
                    }
                }
                None => groups.push((r.group.clone(), vec![r.version.clone()])),
            }
        }
        for (_, versions) in &mut groups {
            versions.sort_by_key(|v| std::cmp::Reverse(version_priority(v)));
        }
        groups
    }
}

/// Kubernetes version ordering: GA over beta over alpha, then by number.
pub fn version_priority(version: &str) -> (u8, u32, u32) {
    let Some(rest) = version.strip_prefix('v') else {
        return (0, 0, 0);
    };
    let digits: String = rest.chars().take_while(|c| c.is_ascii_digit()).collect();
    let Ok(major) = digits.parse::<u32>() else {
        return (0, 0, 0);
    };
    let suffix = &rest[digits.len()..];
    let (stage, minor) = if suffix.is_empty() {
        (3, 0)
    } else if let Some(n) = suffix.strip_prefix("beta") {
        (2, n.parse().unwrap_or(0))
    } else if let Some(n) = suffix.strip_prefix("alpha") {
        (1, n.parse().unwrap_or(0))
    } else {
        return (0, 0, 0);
    };
    (stage, major, minor)
}

/// The resources a CRD object defines: one per served version.
pub fn resources_of_crd(crd: &Value) -> Vec<ResourceDef> {
    let spec = &crd["spec"];
    let names = &spec["names"];
    let strings = |v: &Value| -> Vec<String> {
        v.as_array()
            .map(|a| a.iter().filter_map(|s| s.as_str().map(str::to_string)).collect())
            .unwrap_or_default()
    };
    let text = |v: &Value| v.as_str().unwrap_or_default().to_string();
    let kind = text(&names["kind"]);
    let plural = text(&names["plural"]);
    let singular = match names["singular"].as_str() {
        Some(s) if !s.is_empty() => s.to_string(),
        _ => kind.to_lowercase(),
    };
    let mut defs = Vec::new();
    for version in spec["versions"].as_array().into_iter().flatten() {
        if version["served"] == Value::Bool(false) {
            continue;
        }
        let subresources = &version["subresources"];
        let scale = subresources.get("scale").map(|s| ScalePaths {
            spec_replicas: text(&s["specReplicasPath"]),
            status_replicas: text(&s["statusReplicasPath"]),
            label_selector: s["labelSelectorPath"].as_str().map(str::to_string),
        });
        let printer_columns = version["additionalPrinterColumns"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|c| PrinterColumn {
                name: text(&c["name"]),
                type_: text(&c["type"]),
                format: text(&c["format"]),
                description: text(&c["description"]),
                priority: c["priority"].as_i64().unwrap_or(0),
                json_path: text(&c["jsonPath"]),
            })
            .collect();
        defs.push(ResourceDef {
            group: text(&spec["group"]),
            version: text(&version["name"]),
            kind: kind.clone(),
            plural: plural.clone(),
            singular: singular.clone(),
            namespaced: spec["scope"].as_str() != Some("Cluster"),
            short_names: strings(&names["shortNames"]),
            categories: strings(&names["categories"]),
            status_subresource: subresources.get("status").is_some(),
            scale,
            printer_columns,
            custom: true,
        });
    }
    defs
}

fn column(name: &str, type_: &str, json_path: &str, priority: i64) -> PrinterColumn {
    PrinterColumn {
        name: name.to_string(),
        type_: type_.to_string(),
        format: String::new(),
        description: String::new(),
        priority,
        json_path: json_path.to_string(),
    }
}

struct Builtin {
    group: &'static str,
    version: &'static str,
    kind: &'static str,
    plural: &'static str,
    namespaced: bool,
    short_names: &'static [&'static str],
    status: bool,
    scale: bool,
    in_all: bool,
}

const fn b(
    group: &'static str,
    version: &'static str,
    kind: &'static str,
    plural: &'static str,
    namespaced: bool,
    short_names: &'static [&'static str],
) -> Builtin {
    Builtin {
        group,
        version,
        kind,
        plural,
        namespaced,
        short_names,
        status: false,
        scale: false,
        in_all: false,
    }
}

impl Builtin {
    const fn status(mut self) -> Self {
        self.status = true;
        self
    }
    const fn scale(mut self) -> Self {
        self.scale = true;
        self
    }
    const fn in_all(mut self) -> Self {
        self.in_all = true;
        self
    }
}

const BUILTINS: &[Builtin] = &[
    b("", "v1", "Namespace", "namespaces", false, &["ns"]).status(),
    b("", "v1", "Node", "nodes", false, &["no"]).status(),
    b("", "v1", "Pod", "pods", true, &["po"]).status().in_all(),
    b("", "v1", "Service", "services", true, &["svc"]).status().in_all(),
    b("", "v1", "Endpoints", "endpoints", true, &["ep"]),
    b("", "v1", "ConfigMap", "configmaps", true, &["cm"]),
    b("", "v1", "Secret", "secrets", true, &[]),
    b("", "v1", "ServiceAccount", "serviceaccounts", true, &["sa"]),
    b("", "v1", "Event", "events", true, &["ev"]),
    b(
        "",
        "v1",
        "PersistentVolumeClaim",
        "persistentvolumeclaims",
        true,
        &["pvc"],
    )
    .status(),
    b("", "v1", "PersistentVolume", "persistentvolumes", false, &["pv"]).status(),
    b("apps", "v1", "StatefulSet", "statefulsets", true, &["sts"])
        .status()
        .scale()
        .in_all(),
    b("apps", "v1", "Deployment", "deployments", true, &["deploy"])
        .status()
        .scale()
        .in_all(),
    b("apps", "v1", "ReplicaSet", "replicasets", true, &["rs"])
        .status()
        .scale()
        .in_all(),
    b("apps", "v1", "ControllerRevision", "controllerrevisions", true, &[]),
    b("batch", "v1", "Job", "jobs", true, &[]).status().in_all(),
    b(
        "policy",
        "v1",
        "PodDisruptionBudget",
        "poddisruptionbudgets",
        true,
        &["pdb"],
    )
    .status(),
    b(
        "networking.k8s.io",
        "v1",
        "NetworkPolicy",
        "networkpolicies",
        true,
        &["netpol"],
    ),
    b("coordination.k8s.io", "v1", "Lease", "leases", true, &[]),
    b("events.k8s.io", "v1", "Event", "events", true, &["ev"]),
    b("discovery.k8s.io", "v1", "EndpointSlice", "endpointslices", true, &[]),
    b("storage.k8s.io", "v1", "StorageClass", "storageclasses", false, &["sc"]),
    b("rbac.authorization.k8s.io", "v1", "Role", "roles", true, &[]),
    b(
        "rbac.authorization.k8s.io",
        "v1",
        "ClusterRole",
        "clusterroles",
        false,
        &[],
    ),
    b(
        "rbac.authorization.k8s.io",
        "v1",
        "RoleBinding",
        "rolebindings",
        true,
        &[],
    ),
    b(
        "rbac.authorization.k8s.io",
        "v1",
        "ClusterRoleBinding",
        "clusterrolebindings",
        false,
        &[],
    ),
    b(
        "apiextensions.k8s.io",
        "v1",
        "CustomResourceDefinition",
        "customresourcedefinitions",
        false,
        &["crd", "crds"],
    )
    .status(),
];

fn builtin_columns(group: &str, plural: &str) -> Vec<PrinterColumn> {
    match (group, plural) {
        ("", "pods") => vec![
            column("Ready", "string", "", 0),
            column("Status", "string", ".status.phase", 0),
            column("Restarts", "integer", "", 0),
            column("Age", "date", ".metadata.creationTimestamp", 0),
            column("IP", "string", ".status.podIP", 1),
            column("Node", "string", ".spec.nodeName", 1),
        ],
        ("apps", "statefulsets") => vec![
            column("Ready", "string", "", 0),
            column("Age", "date", ".metadata.creationTimestamp", 0),
        ],
        ("apps", "deployments") => vec![
            column("Ready", "string", "", 0),
            column("Up-to-date", "integer", ".status.updatedReplicas", 0),
            column("Available", "integer", ".status.availableReplicas", 0),
            column("Age", "date", ".metadata.creationTimestamp", 0),
        ],
        ("", "persistentvolumeclaims") => vec![
            column("Status", "string", ".status.phase", 0),
            column("Volume", "string", ".spec.volumeName", 0),
            column("Age", "date", ".metadata.creationTimestamp", 0),
        ],
        ("", "services") => vec![
            column("Type", "string", ".spec.type", 0),
            column("Cluster-IP", "string", ".spec.clusterIP", 0),
            column("Age", "date", ".metadata.creationTimestamp", 0),
        ],
        ("", "namespaces") => vec![
            column("Status", "string", ".status.phase", 0),
            column("Age", "date", ".metadata.creationTimestamp", 0),
        ],
        _ => Vec::new(),
    }
}

fn builtin_resources() -> Vec<ResourceDef> {
    BUILTINS
        .iter()
        .map(|b| ResourceDef {
            group: b.group.to_string(),
            version: b.version.to_string(),
            kind: b.kind.to_string(),
            plural: b.plural.to_string(),
            singular: b.kind.to_lowercase(),
            namespaced: b.namespaced,
            short_names: b.short_names.iter().map(|s| s.to_string()).collect(),
            categories: if b.in_all { vec!["all".to_string()] } else { Vec::new() },
            status_subresource: b.status,
            scale: b.scale.then(|| ScalePaths {
                spec_replicas: ".spec.replicas".to_string(),
                status_replicas: ".status.replicas".to_string(),
                label_selector: Some(".spec.selector".to_string()),
            }),
            printer_columns: builtin_columns(b.group, b.plural),
            custom: false,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn versions_sort_ga_then_beta_then_alpha() {
        let mut v = vec!["v1alpha1", "v2", "v1beta2", "v1", "v1beta1"];
        v.sort_by_key(|v| std::cmp::Reverse(version_priority(v)));
        assert_eq!(v, ["v2", "v1", "v1beta2", "v1beta1", "v1alpha1"]);
    }

    #[test]
    fn crd_defines_one_resource_per_served_version() {
        let crd = json!({"spec": {"group": "raftkv.dev", "scope": "Namespaced",
            "names": {"kind": "RaftCluster", "plural": "raftclusters", "shortNames": ["rc"]},
            "versions": [
                {"name": "v1alpha1", "served": true, "storage": true,
                 "subresources": {"status": {}, "scale": {"specReplicasPath": ".spec.replicas",
                    "statusReplicasPath": ".status.replicas", "labelSelectorPath": ".status.selector"}}},
                {"name": "v1alpha0", "served": false}]}});
        let defs = resources_of_crd(&crd);
        assert_eq!(defs.len(), 1);
        assert_eq!(defs[0].singular, "raftcluster");
        assert!(defs[0].status_subresource);
        assert_eq!(defs[0].scale.as_ref().unwrap().spec_replicas, ".spec.replicas");
    }
}
