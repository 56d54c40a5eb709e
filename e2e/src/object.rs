//! Reading the metadata of stored objects (kept as JSON), and reporting a controller's failed
//! write, for the in-process controllers.

use serde_json::Value;

use crate::error::ApiError;

/// `metadata.name`, empty when missing.
pub fn name_of(object: &Value) -> &str {
    object["metadata"]["name"].as_str().unwrap_or_default()
}

/// `metadata.namespace`, empty for cluster-scoped objects.
pub fn ns_of(object: &Value) -> &str {
    object["metadata"]["namespace"].as_str().unwrap_or_default()
}

/// `metadata.uid`.
pub fn uid_of(object: &Value) -> &str {
    object["metadata"]["uid"].as_str().unwrap_or_default()
}

/// Whether the object has a deletion timestamp.
pub fn deleting(object: &Value) -> bool {
    !object["metadata"]["deletionTimestamp"].is_null()
}

/// Logs a controller's failed write; conflicts and missing objects are a controller's daily
/// weather (the next pass reads the store again) and are not logged.
pub fn log_failure(what: &str, object: &str, result: Result<Value, ApiError>) {
    if let Err(e) = result {
        if e.code != 409 && e.code != 404 {
            tracing::warn!(object, error = %e, "{what}");
        }
    }
}
