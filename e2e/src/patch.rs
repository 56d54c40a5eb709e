//! The four PATCH flavours Kubernetes clients send, applied to JSON objects.
//!
//! - JSON merge patch (RFC 7386) and JSON patch (RFC 6902) are exact, via the `json-patch` crate.
//! - Strategic merge patch is approximated: maps merge recursively, `null` deletes, and lists
//!   whose items carry a well-known merge key (`containers` and `env` by `name`, `volumeMounts`
//!   by `mountPath`, `ports` by `containerPort` or `port`, `conditions` by `type`, ...) merge
//!   item by item, honouring `$patch: delete`; other lists are replaced, and the other `$`
//!   directives are dropped.
//! - Server-side apply merges the applied configuration the same way for built-in kinds and
//!   replaces lists wholesale for custom resources (their lists are atomic unless the schema says
//!   otherwise). There is no field ownership: nothing the applier omitted is ever removed.

use serde_json::{Map, Value};

use crate::error::ApiError;

/// The patch flavour, from the request's `Content-Type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PatchType {
    /// `application/merge-patch+json`.
    Merge,
    /// `application/json-patch+json`.
    Json,
    /// `application/strategic-merge-patch+json`.
    StrategicMerge,
    /// `application/apply-patch+yaml` (server-side apply).
    Apply,
}

impl PatchType {
    /// Recognises a `Content-Type` header value, ignoring parameters like `charset`.
    pub fn from_content_type(content_type: &str) -> Option<Self> {
        match content_type.split(';').next().unwrap_or_default().trim() {
            "application/merge-patch+json" => Some(PatchType::Merge),
            "application/json-patch+json" => Some(PatchType::Json),
            "application/strategic-merge-patch+json" => Some(PatchType::StrategicMerge),
            "application/apply-patch+yaml" | "application/apply-patch+json" => Some(PatchType::Apply),
            _ => None,
        }
    }
}

/// Decodes a request body that may be JSON or YAML (server-side apply bodies may be either).
pub fn decode_body(body: &[u8]) -> Result<Value, ApiError> {
    if let Ok(value) = serde_json::from_slice::<Value>(body) {
        return Ok(value);
    }
    let text =
        std::str::from_utf8(body).map_err(|_| ApiError::bad_request("request body is neither JSON nor UTF-8 YAML"))?;
    serde_saphyr::from_str::<Value>(text).map_err(|e| ApiError::bad_request(format!("decoding request body: {e}")))
}

/// Applies a patch of type `patch_type` to `target`; `custom` is true for custom resources.
pub fn apply(target: &mut Value, patch_type: PatchType, patch: &Value, custom: bool) -> Result<(), ApiError> {
    match patch_type {
        PatchType::Merge => {
            json_patch::merge(target, patch);
            Ok(())
        }
        PatchType::Json => {
            let ops: json_patch::Patch = serde_json::from_value(patch.clone())
                .map_err(|e| ApiError::bad_request(format!("invalid JSON patch: {e}")))?;
            json_patch::patch(target, &ops)
                .map_err(|e| ApiError::invalid("", "", "", &format!("JSON patch failed: {e}")))
        }
        PatchType::StrategicMerge if custom => Err(ApiError::unsupported_media_type(
            "application/strategic-merge-patch+json (not supported for custom resources)",
        )),
        PatchType::StrategicMerge => {
            strategic_merge(target, patch, true);
            Ok(())
        }
        PatchType::Apply => {
            strategic_merge(target, patch, !custom);
            Ok(())
        }
    }
}

/// The key list items of field `field` merge by, given one of the items.
fn merge_key(field: &str, sample: &Value) -> Option<&'static str> {
    match field {
        "containers"
        | "initContainers"
        | "ephemeralContainers"
        | "env"
        | "volumes"
        | "imagePullSecrets"
        | "hostAliases" => Some("name"),
        "volumeMounts" | "volumeDevices" => Some("mountPath"),
        "ports" if sample.get("containerPort").is_some() => Some("containerPort"),
        "ports" if sample.get("port").is_some() => Some("port"),
        "conditions" => Some("type"),
        "ownerReferences" => Some("uid"),
        _ => None,
    }
}

fn strategic_merge(target: &mut Value, patch: &Value, merge_lists: bool) {
    let Value::Object(patch_map) = patch else {
        *target = strip_directives(patch);
        return;
    };
    if patch_map.get("$patch").and_then(Value::as_str) == Some("replace") {
        *target = strip_directives(patch);
        return;
    }
    if !target.is_object() {
        *target = Value::Object(Map::new());
    }
    let target_map = target.as_object_mut().expect("target was made an object");
    for (key, value) in patch_map {
        if key.starts_with('$') {
            continue;
        }
        match value {
            Value::Null => {
                target_map.remove(key);
            }
            Value::Object(_) => {
                let slot = target_map.entry(key.clone()).or_insert(Value::Null);
                strategic_merge(slot, value, merge_lists);
            }
            Value::Array(items) => {
                let merge_by = items
                    .first()
                    .and_then(|first| merge_key(key, first))
                    .filter(|_| merge_lists);
                match (merge_by, target_map.get_mut(key)) {
                    (Some(merge_by), Some(Value::Array(existing))) => {
                        merge_list(existing, items, merge_by, merge_lists)
                    }
                    _ => {
                        let kept: Vec<Value> = items
                            .iter()
                            .filter(|i| i.get("$patch").and_then(Value::as_str) != Some("delete"))
                            .map(strip_directives)
                            .collect();
                        target_map.insert(key.clone(), Value::Array(kept));
                    }
                }
            }
            scalar => {
                target_map.insert(key.clone(), scalar.clone());
            }
        }
    }
}

fn merge_list(existing: &mut Vec<Value>, patch_items: &[Value], key: &str, merge_lists: bool) {
    for item in patch_items {
        let id = item.get(key);
        let position = existing.iter().position(|e| id.is_some() && e.get(key) == id);
        let delete = item.get("$patch").and_then(Value::as_str) == Some("delete");
        match (position, delete) {
            (Some(i), true) => {
                existing.remove(i);
            }
            (None, true) => {}
            (Some(i), false) => strategic_merge(&mut existing[i], item, merge_lists),
            (None, false) => existing.push(strip_directives(item)),
        }
    }
}

fn strip_directives(value: &Value) -> Value {
    match value {
        Value::Object(map) => Value::Object(
            map.iter()
                .filter(|(k, _)| !k.starts_with('$'))
                .map(|(k, v)| (k.clone(), strip_directives(v)))
                .collect(),
        ),
        Value::Array(items) => Value::Array(items.iter().map(strip_directives).collect()),
        other => other.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn strategic_merge_merges_containers_by_name() {
        let mut pod = json!({"spec": {"containers": [
            {"name": "a", "image": "x:1", "env": [{"name": "A", "value": "1"}]},
            {"name": "b", "image": "y:1"}]}});
        let patch = json!({"spec": {"containers": [
            {"name": "a", "image": "x:2", "env": [{"name": "B", "value": "2"}]},
            {"name": "b", "$patch": "delete"}],
            "$setElementOrder/containers": [{"name": "a"}]}});
        apply(&mut pod, PatchType::StrategicMerge, &patch, false).unwrap();
        assert_eq!(
            pod,
            json!({"spec": {"containers": [{"name": "a", "image": "x:2",
            "env": [{"name": "A", "value": "1"}, {"name": "B", "value": "2"}]}]}})
        );
    }

    #[test]
    fn apply_on_custom_resources_replaces_lists_and_keeps_other_fields() {
        let mut obj = json!({"spec": {"replicas": 3, "image": "a"}, "status": {"conditions": [{"type": "A"}]}});
        let applied = json!({"spec": {"replicas": 5}, "status": {"conditions": [{"type": "B"}]}});
        apply(&mut obj, PatchType::Apply, &applied, true).unwrap();
        assert_eq!(
            obj,
            json!({"spec": {"replicas": 5, "image": "a"}, "status": {"conditions": [{"type": "B"}]}})
        );
    }

    #[test]
    fn strategic_merge_is_refused_for_custom_resources() {
        let err = apply(&mut json!({}), PatchType::StrategicMerge, &json!({}), true).unwrap_err();
        assert_eq!(err.code, 415);
    }

    #[test]
    fn yaml_bodies_decode() {
        assert_eq!(decode_body(b"a: 1\nb: [x]\n").unwrap(), json!({"a": 1, "b": ["x"]}));
    }
}
