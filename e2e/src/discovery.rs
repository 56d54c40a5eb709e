//! Discovery and OpenAPI documents, computed from the [`Registry`].
//!
//! Only the legacy (unaggregated) discovery format is served: clients that ask for aggregated
//! discovery (`as=APIGroupDiscoveryList`) receive `application/json` without that parameter and
//! fall back to `/api`, `/apis` and per-group-version documents, as against an older server.
//!
//! The OpenAPI v3 documents are skeletons: one path per resource whose `patch` operation carries
//! `x-kubernetes-group-version-kind` and the `fieldValidation` query parameter. That is exactly
//! what kubectl and Helm look up to decide that the server validates fields itself, after which
//! they skip client-side schema validation. No schemas are published.

use serde_json::{json, Value};

use crate::resources::{Registry, ResourceDef};

/// The server version reported at `/version`.
pub const KUBERNETES_VERSION: (&str, &str) = ("1", "32");

/// The `/version` document.
pub fn version() -> Value {
    let (major, minor) = KUBERNETES_VERSION;
    json!({
        "major": major, "minor": minor,
        "gitVersion": format!("v{major}.{minor}.0-raftkv-sim"),
        "gitCommit": "0000000000000000000000000000000000000000",
        "gitTreeState": "clean", "buildDate": "2025-01-01T00:00:00Z",
        "goVersion": "go1.24.0", "compiler": "gc", "platform": "linux/amd64",
    })
}

/// The `/api` document.
pub fn core_versions(server_address: &str) -> Value {
    json!({
        "kind": "APIVersions",
        "versions": ["v1"],
        "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": server_address}],
    })
}

fn group_document(name: &str, versions: &[String]) -> Value {
    let entries: Vec<Value> = versions
        .iter()
        .map(|v| json!({"groupVersion": format!("{name}/{v}"), "version": v}))
        .collect();
    json!({
        "name": name,
        "versions": entries,
        "preferredVersion": entries.first().cloned().unwrap_or(Value::Null),
    })
}

/// The `/apis` document: every named group.
pub fn group_list(registry: &Registry) -> Value {
    let groups: Vec<Value> = registry
        .groups()
        .into_iter()
        .filter(|(g, _)| !g.is_empty())
        .map(|(g, versions)| group_document(&g, &versions))
        .collect();
    json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": groups})
}

/// The `/apis/<group>` document.
pub fn group(registry: &Registry, name: &str) -> Option<Value> {
    let (_, versions) = registry.groups().into_iter().find(|(g, _)| g == name)?;
    let mut doc = group_document(name, &versions);
    doc["kind"] = json!("APIGroup");
    doc["apiVersion"] = json!("v1");
    Some(doc)
}

const VERBS: [&str; 8] = [
    "create",
    "delete",
    "deletecollection",
    "get",
    "list",
    "patch",
    "update",
    "watch",
];

fn resource_entries(r: &ResourceDef) -> Vec<Value> {
    let mut main = json!({
        "name": r.plural, "singularName": r.singular, "namespaced": r.namespaced,
        "kind": r.kind, "verbs": VERBS,
    });
    if !r.short_names.is_empty() {
        main["shortNames"] = json!(r.short_names);
    }
    if !r.categories.is_empty() {
        main["categories"] = json!(r.categories);
    }
    let mut entries = vec![main];
    if r.status_subresource {
        entries.push(json!({"name": format!("{}/status", r.plural), "singularName": "",
            "namespaced": r.namespaced, "kind": r.kind, "verbs": ["get", "patch", "update"]}));
    }
    if r.scale.is_some() {
        entries.push(json!({"name": format!("{}/scale", r.plural), "singularName": "",
            "namespaced": r.namespaced, "group": "autoscaling", "version": "v1", "kind": "Scale",
            "verbs": ["get", "patch", "update"]}));
    }
    if r.group.is_empty() && r.plural == "pods" {
        entries.push(json!({"name": "pods/log", "singularName": "", "namespaced": true,
            "kind": "Pod", "verbs": ["get"]}));
        entries.push(json!({"name": "pods/eviction", "singularName": "", "namespaced": true,
            "group": "policy", "version": "v1", "kind": "Eviction", "verbs": ["create"]}));
    }
    entries
}

/// The `/api/v1` or `/apis/<group>/<version>` document.
pub fn resource_list(registry: &Registry, group: &str, version: &str) -> Option<Value> {
    let resources: Vec<Value> = registry
        .all()
        .filter(|r| r.group == group && r.version == version)
        .flat_map(|r| resource_entries(r))
        .collect();
    if resources.is_empty() {
        return None;
    }
    let group_version = if group.is_empty() {
        version.to_string()
    } else {
        format!("{group}/{version}")
    };
    Some(json!({"kind": "APIResourceList", "apiVersion": "v1",
        "groupVersion": group_version, "resources": resources}))
}

fn gv_path(group: &str, version: &str) -> String {
    if group.is_empty() {
        format!("api/{version}")
    } else {
        format!("apis/{group}/{version}")
    }
}

/// The `/openapi/v3` index; `generation` changes whenever the registry does, so clients refetch.
pub fn openapi_v3_index(registry: &Registry, generation: u64) -> Value {
    let mut paths = serde_json::Map::new();
    for (group, versions) in registry.groups() {
        for version in versions {
            let path = gv_path(&group, &version);
            paths.insert(
                path.clone(),
                json!({"serverRelativeURL": format!("/openapi/v3/{path}?hash={generation:016X}")}),
            );
        }
    }
    json!({"paths": paths})
}

/// The `/openapi/v3/<api|apis/group>/<version>` document.
pub fn openapi_v3_group_version(registry: &Registry, path: &str) -> Option<Value> {
    let (group, version) = match path.split('/').collect::<Vec<_>>().as_slice() {
        ["api", v] => (String::new(), v.to_string()),
        ["apis", g, v] => (g.to_string(), v.to_string()),
        _ => return None,
    };
    let mut paths = serde_json::Map::new();
    for r in registry.all().filter(|r| r.group == group && r.version == version) {
        let prefix = format!("/{}", gv_path(&group, &version));
        let item = if r.namespaced {
            format!("{prefix}/namespaces/{{namespace}}/{}/{{name}}", r.plural)
        } else {
            format!("{prefix}/{}/{{name}}", r.plural)
        };
        let gvk = json!({"group": r.group, "version": r.version, "kind": r.kind});
        let operation = |id: &str| {
            json!({
                "operationId": format!("{id}{}", r.kind),
                "x-kubernetes-action": id,
                "x-kubernetes-group-version-kind": gvk,
                "parameters": [
                    {"name": "dryRun", "in": "query", "schema": {"type": "string"}},
                    {"name": "fieldManager", "in": "query", "schema": {"type": "string"}},
                    {"name": "fieldValidation", "in": "query", "schema": {"type": "string"}},
                ],
                "responses": {"200": {"description": "OK"}},
            })
        };
        paths.insert(
            item,
            json!({"get": operation("get"), "put": operation("put"),
                   "patch": operation("patch"), "delete": operation("delete")}),
        );
    }
    if paths.is_empty() {
        return None;
    }
    let (major, minor) = KUBERNETES_VERSION;
    Some(json!({
        "openapi": "3.0.0",
        "info": {"title": "Kubernetes (raftkv simulated control plane)", "version": format!("v{major}.{minor}.0")},
        "paths": paths,
        "components": {"schemas": {}},
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statefulsets_advertise_their_scale_subresource_as_autoscaling_scale() {
        let registry = Registry::with_builtins();
        let doc = resource_list(&registry, "apps", "v1").unwrap();
        let scale = doc["resources"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["name"] == "statefulsets/scale")
            .unwrap();
        assert_eq!(scale["group"], "autoscaling");
        assert_eq!(scale["kind"], "Scale");
    }

    #[test]
    fn openapi_documents_every_patchable_kind_with_field_validation() {
        let registry = Registry::with_builtins();
        let doc = openapi_v3_group_version(&registry, "apis/apps/v1").unwrap();
        let patch = &doc["paths"]["/apis/apps/v1/namespaces/{namespace}/statefulsets/{name}"]["patch"];
        assert_eq!(patch["x-kubernetes-group-version-kind"]["kind"], "StatefulSet");
        assert!(patch["parameters"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["name"] == "fieldValidation"));
    }
}
