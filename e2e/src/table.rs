//! Server-side printing: the `meta.k8s.io/v1 Table` that `kubectl get` asks for.
//!
//! Columns come from the resource's printer columns (CRD `additionalPrinterColumns`, or a few
//! built-in sets for pods, StatefulSets, Deployments, PVCs, Services and namespaces), after the
//! `Name` column. A resource without printer columns shows `Name` and `Age`, as the real server's
//! default table convertor does.

use serde_json::{json, Value};

use crate::jsonpath;
use crate::resources::{PrinterColumn, ResourceDef};

/// Formats the time since an RFC 3339 timestamp the way kubectl shows ages (`42s`, `5m12s`, `3h`, `2d`).
pub fn human_age(timestamp: &str) -> String {
    let Ok(then) = timestamp.parse::<jiff::Timestamp>() else {
        return "<unknown>".to_string();
    };
    let seconds = (jiff::Timestamp::now().as_second() - then.as_second()).max(0);
    match seconds {
        s if s < 120 => format!("{s}s"),
        s if s < 600 => format!("{}m{}s", s / 60, s % 60),
        s if s < 3 * 3600 => format!("{}m", s / 60),
        s if s < 8 * 3600 => format!("{}h{}m", s / 3600, (s % 3600) / 60),
        s if s < 48 * 3600 => format!("{}h", s / 3600),
        s => format!("{}d", s / 86400),
    }
}

fn columns(res: &ResourceDef) -> Vec<PrinterColumn> {
    if res.printer_columns.is_empty() {
        vec![PrinterColumn {
            name: "Age".into(),
            type_: "date".into(),
            format: String::new(),
            description: "CreationTimestamp is a timestamp representing the server time when this object was created."
                .into(),
            priority: 0,
            json_path: ".metadata.creationTimestamp".into(),
        }]
    } else {
        res.printer_columns.clone()
    }
}

fn computed_cell(res: &ResourceDef, column: &str, object: &Value) -> Value {
    let count = |v: &Value| v.as_i64().unwrap_or(0);
    match (res.plural.as_str(), column) {
        ("pods", "Ready") => {
            let statuses = object["status"]["containerStatuses"].as_array();
            let ready = statuses
                .map(|s| s.iter().filter(|c| c["ready"] == json!(true)).count())
                .unwrap_or(0);
            let total = object["spec"]["containers"].as_array().map(Vec::len).unwrap_or(0);
            json!(format!("{ready}/{total}"))
        }
        ("pods", "Restarts") => json!(object["status"]["containerStatuses"]
            .as_array()
            .map(|s| s.iter().map(|c| count(&c["restartCount"])).sum::<i64>())
            .unwrap_or(0)),
        ("statefulsets" | "deployments", "Ready") => json!(format!(
            "{}/{}",
            count(&object["status"]["readyReplicas"]),
            count(&object["spec"]["replicas"])
        )),
        _ => Value::Null,
    }
}

fn pod_status(object: &Value) -> Value {
    if !object["metadata"]["deletionTimestamp"].is_null() {
        return json!("Terminating");
    }
    let waiting = object["status"]["containerStatuses"]
        .as_array()
        .into_iter()
        .flatten()
        .find_map(|c| c["state"]["waiting"]["reason"].as_str());
    match waiting {
        Some(reason) => json!(reason),
        None => object["status"]["phase"].clone(),
    }
}

fn cell(res: &ResourceDef, column: &PrinterColumn, object: &Value) -> Value {
    if column.json_path.is_empty() {
        return computed_cell(res, &column.name, object);
    }
    if res.plural == "pods" && !res.custom && column.name == "Status" {
        return pod_status(object);
    }
    match jsonpath::get(object, &column.json_path) {
        None | Some(Value::Null) => Value::Null,
        Some(Value::String(s)) if column.type_ == "date" => json!(human_age(s)),
        Some(v) => match column.type_.as_str() {
            "integer" | "number" | "boolean" => v.clone(),
            _ => json!(jsonpath::display(v)),
        },
    }
}

/// A row's `object`, as asked by `includeObject` (`Metadata` by default, `Object`, or `None`).
fn row_object(object: &Value, include_object: &str) -> Value {
    match include_object {
        "None" => Value::Null,
        "Object" => object.clone(),
        _ => json!({"kind": "PartialObjectMetadata", "apiVersion": "meta.k8s.io/v1",
                    "metadata": object["metadata"]}),
    }
}

/// Renders objects as a Table.
pub fn table(res: &ResourceDef, objects: &[Value], list_metadata: Value, include_object: &str) -> Value {
    let columns = columns(res);
    let mut definitions = vec![json!({"name": "Name", "type": "string", "format": "name",
        "description": "Name must be unique within a namespace.", "priority": 0})];
    definitions.extend(columns.iter().map(|c| {
        json!({"name": c.name, "type": if c.type_ == "date" { "string" } else { c.type_.as_str() },
               "format": c.format, "description": c.description, "priority": c.priority})
    }));
    let rows: Vec<Value> = objects
        .iter()
        .map(|o| {
            let mut cells = vec![o["metadata"]["name"].clone()];
            cells.extend(columns.iter().map(|c| cell(res, c, o)));
            json!({"cells": cells, "object": row_object(o, include_object)})
        })
        .collect();
    json!({"kind": "Table", "apiVersion": "meta.k8s.io/v1", "metadata": list_metadata,
           "columnDefinitions": definitions, "rows": rows})
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resources::Registry;

    #[test]
    fn pod_rows_show_ready_containers_and_restarts() {
        let registry = Registry::with_builtins();
        let pods = registry.find("", "v1", "pods").unwrap();
        let pod = json!({"metadata": {"name": "p", "creationTimestamp": "2020-01-01T00:00:00Z"},
            "spec": {"containers": [{"name": "a"}, {"name": "b"}]},
            "status": {"phase": "Running", "containerStatuses": [
                {"ready": true, "restartCount": 2}, {"ready": false, "restartCount": 1}]}});
        let t = table(&pods, &[pod], json!({}), "Metadata");
        assert_eq!(t["rows"][0]["cells"][0], "p");
        assert_eq!(t["rows"][0]["cells"][1], "1/2");
        assert_eq!(t["rows"][0]["cells"][2], "Running");
        assert_eq!(t["rows"][0]["cells"][3], 3);
    }

    #[test]
    fn ages_read_like_kubectl() {
        let ten_minutes_ago = jiff::Timestamp::now() - jiff::SignedDuration::from_secs(3 * 60 + 5);
        assert_eq!(human_age(&ten_minutes_ago.to_string()), "3m5s");
    }
}
