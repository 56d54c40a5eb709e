//! Decoding the Kubernetes protobuf encoding for the few kinds typed Go clients write.
//!
//! kubectl's typed clients (imperative `kubectl create configmap|secret|namespace`, and Helm's
//! release storage in Secrets) send request bodies as `application/vnd.kubernetes.protobuf`:
//! the magic `k8s\0`, then a `runtime.Unknown` envelope (`typeMeta`, `raw`) whose `raw` bytes
//! are the object in the field numbering of Kubernetes' `generated.proto` files. Protobuf is
//! not self-describing, so each supported kind has a field table below; unknown fields are
//! skipped. Responses are always JSON, which those clients also accept.

use base64::Engine;
use serde_json::{json, Map, Value};

use crate::error::ApiError;

/// The protobuf content type of Kubernetes.
pub const CONTENT_TYPE: &str = "application/vnd.kubernetes.protobuf";

#[derive(Clone, Copy)]
enum Kind {
    Str,
    Bytes,
    Int,
    Bool,
    Time,
    Message(&'static [Field]),
    MapStrings,
    MapBytes,
    RepeatedStrings,
    RepeatedMessages(&'static [Field]),
}

#[derive(Clone, Copy)]
struct Field(u64, &'static str, Kind);

const OWNER_REFERENCE: &[Field] = &[
    Field(1, "kind", Kind::Str),
    Field(3, "name", Kind::Str),
    Field(4, "uid", Kind::Str),
    Field(5, "apiVersion", Kind::Str),
    Field(6, "controller", Kind::Bool),
    Field(7, "blockOwnerDeletion", Kind::Bool),
];

const OBJECT_META: &[Field] = &[
    Field(1, "name", Kind::Str),
    Field(2, "generateName", Kind::Str),
    Field(3, "namespace", Kind::Str),
    Field(5, "uid", Kind::Str),
    Field(6, "resourceVersion", Kind::Str),
    Field(7, "generation", Kind::Int),
    Field(8, "creationTimestamp", Kind::Time),
    Field(9, "deletionTimestamp", Kind::Time),
    Field(10, "deletionGracePeriodSeconds", Kind::Int),
    Field(11, "labels", Kind::MapStrings),
    Field(12, "annotations", Kind::MapStrings),
    Field(13, "ownerReferences", Kind::RepeatedMessages(OWNER_REFERENCE)),
    Field(14, "finalizers", Kind::RepeatedStrings),
];

const CONFIG_MAP: &[Field] = &[
    Field(1, "metadata", Kind::Message(OBJECT_META)),
    Field(2, "data", Kind::MapStrings),
    Field(3, "binaryData", Kind::MapBytes),
    Field(4, "immutable", Kind::Bool),
];

const SECRET: &[Field] = &[
    Field(1, "metadata", Kind::Message(OBJECT_META)),
    Field(2, "data", Kind::MapBytes),
    Field(3, "type", Kind::Str),
    Field(4, "stringData", Kind::MapStrings),
    Field(5, "immutable", Kind::Bool),
];

const NAMESPACE: &[Field] = &[
    Field(1, "metadata", Kind::Message(OBJECT_META)),
    Field(
        2,
        "spec",
        Kind::Message(&[Field(1, "finalizers", Kind::RepeatedStrings)]),
    ),
    Field(3, "status", Kind::Message(&[Field(1, "phase", Kind::Str)])),
];

const SERVICE_ACCOUNT: &[Field] = &[
    Field(1, "metadata", Kind::Message(OBJECT_META)),
    Field(4, "automountServiceAccountToken", Kind::Bool),
];

const DELETE_OPTIONS: &[Field] = &[
    Field(1, "gracePeriodSeconds", Kind::Int),
    Field(
        2,
        "preconditions",
        Kind::Message(&[Field(1, "uid", Kind::Str), Field(2, "resourceVersion", Kind::Str)]),
    ),
    Field(3, "orphanDependents", Kind::Bool),
    Field(4, "propagationPolicy", Kind::Str),
    Field(5, "dryRun", Kind::RepeatedStrings),
];

const UNKNOWN: &[Field] = &[
    Field(
        1,
        "typeMeta",
        Kind::Message(&[Field(1, "apiVersion", Kind::Str), Field(2, "kind", Kind::Str)]),
    ),
    Field(2, "raw", Kind::Bytes),
];

fn malformed() -> ApiError {
    ApiError::bad_request("malformed protobuf body")
}

struct Reader<'a> {
    bytes: &'a [u8],
}

impl<'a> Reader<'a> {
    fn varint(&mut self) -> Result<u64, ApiError> {
        let mut value = 0u64;
        for shift in (0..64).step_by(7) {
            let (&byte, rest) = self.bytes.split_first().ok_or_else(malformed)?;
            self.bytes = rest;
            value |= u64::from(byte & 0x7f) << shift;
            if byte & 0x80 == 0 {
                return Ok(value);
            }
        }
        Err(malformed())
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], ApiError> {
        if n > self.bytes.len() {
            return Err(malformed());
        }
        let (head, rest) = self.bytes.split_at(n);
        self.bytes = rest;
        Ok(head)
    }

    fn length_delimited(&mut self) -> Result<&'a [u8], ApiError> {
        let n = usize::try_from(self.varint()?).map_err(|_| malformed())?;
        self.take(n)
    }
}

fn text(bytes: &[u8]) -> Result<String, ApiError> {
    String::from_utf8(bytes.to_vec()).map_err(|_| malformed())
}

fn time(bytes: &[u8]) -> Result<Value, ApiError> {
    let message = decode_message(bytes, &[Field(1, "seconds", Kind::Int)])?;
    let seconds = message["seconds"].as_i64().unwrap_or(0);
    Ok(jiff::Timestamp::from_second(seconds)
        .map(|t| json!(t.to_string()))
        .unwrap_or(Value::Null))
}

fn map_entry(bytes: &[u8], value_kind: Kind) -> Result<(String, Value), ApiError> {
    let entry = decode_message(bytes, &[Field(1, "key", Kind::Str), Field(2, "value", value_kind)])?;
    let key = entry["key"].as_str().unwrap_or_default().to_string();
    let value = match (&entry["value"], value_kind) {
        (Value::Null, Kind::Bytes) | (Value::Null, Kind::Str) => json!(""),
        (v, _) => v.clone(),
    };
    Ok((key, value))
}

fn decode_message(bytes: &[u8], fields: &[Field]) -> Result<Value, ApiError> {
    let mut reader = Reader { bytes };
    let mut out = Map::new();
    let base64 = base64::engine::general_purpose::STANDARD;
    while !reader.bytes.is_empty() {
        let tag = reader.varint()?;
        let (number, wire) = (tag >> 3, tag & 7);
        let field = fields.iter().find(|f| f.0 == number);
        let payload = match wire {
            0 => {
                let v = reader.varint()?;
                match field {
                    Some(Field(_, name, Kind::Int)) => {
                        out.insert(name.to_string(), json!(v as i64));
                    }
                    Some(Field(_, name, Kind::Bool)) => {
                        out.insert(name.to_string(), json!(v != 0));
                    }
                    _ => {}
                }
                continue;
            }
            1 => {
                reader.take(8)?;
                continue;
            }
            5 => {
                reader.take(4)?;
                continue;
            }
            2 => reader.length_delimited()?,
            _ => return Err(malformed()),
        };
        let Some(Field(_, name, kind)) = field else {
            continue;
        };
        let name = name.to_string();
        match *kind {
            Kind::Str => {
                out.insert(name, json!(text(payload)?));
            }
            Kind::Bytes => {
                out.insert(name, json!(base64.encode(payload)));
            }
            Kind::Time => {
                out.insert(name, time(payload)?);
            }
            Kind::Message(schema) => {
                out.insert(name, decode_message(payload, schema)?);
            }
            Kind::MapStrings | Kind::MapBytes => {
                let value_kind = if matches!(kind, Kind::MapBytes) {
                    Kind::Bytes
                } else {
                    Kind::Str
                };
                let (key, value) = map_entry(payload, value_kind)?;
                let map = out.entry(name).or_insert_with(|| json!({}));
                map[key] = value;
            }
            Kind::RepeatedStrings => {
                let list = out.entry(name).or_insert_with(|| json!([]));
                if let Some(items) = list.as_array_mut() {
                    items.push(json!(text(payload)?));
                }
            }
            Kind::RepeatedMessages(schema) => {
                let item = decode_message(payload, schema)?;
                let list = out.entry(name).or_insert_with(|| json!([]));
                if let Some(items) = list.as_array_mut() {
                    items.push(item);
                }
            }
            Kind::Int | Kind::Bool => {}
        }
    }
    Ok(Value::Object(out))
}

/// Decodes a `k8s\0`-framed protobuf body into the JSON form of the object.
pub fn decode(body: &[u8]) -> Result<Value, ApiError> {
    let framed = body.strip_prefix(b"k8s\0").ok_or_else(malformed)?;
    let envelope = decode_message(framed, UNKNOWN)?;
    let api_version = envelope["typeMeta"]["apiVersion"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let kind = envelope["typeMeta"]["kind"].as_str().unwrap_or_default().to_string();
    let raw = base64::engine::general_purpose::STANDARD
        .decode(envelope["raw"].as_str().unwrap_or_default())
        .map_err(|_| malformed())?;
    let schema = match kind.as_str() {
        "ConfigMap" => CONFIG_MAP,
        "Secret" => SECRET,
        "Namespace" => NAMESPACE,
        "ServiceAccount" => SERVICE_ACCOUNT,
        "DeleteOptions" => DELETE_OPTIONS,
        other => {
            return Err(ApiError::unsupported_media_type(&format!(
                "{CONTENT_TYPE} for kind {other:?} (send JSON instead)"
            )))
        }
    };
    let mut object = decode_message(&raw, schema)?;
    object["apiVersion"] = json!(api_version);
    object["kind"] = json!(kind);
    Ok(object)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn field(number: u64, payload: &[u8]) -> Vec<u8> {
        let mut out = vec![(number << 3 | 2) as u8, payload.len() as u8];
        out.extend_from_slice(payload);
        out
    }

    #[test]
    fn decodes_a_secret_as_kubectl_sends_it() {
        let meta = [
            field(1, b"release"),
            field(3, b"default"),
            field(11, &[field(1, b"owner"), field(2, b"helm")].concat()),
        ]
        .concat();
        let secret = [
            field(1, &meta),
            field(2, &[field(1, b"release"), field(2, b"\x01\x02")].concat()),
            field(3, b"helm.sh/release.v1"),
        ]
        .concat();
        let envelope = [
            field(1, &[field(1, b"v1"), field(2, b"Secret")].concat()),
            field(2, &secret),
        ]
        .concat();
        let body = [b"k8s\0".as_slice(), &envelope].concat();
        let object = decode(&body).unwrap();
        assert_eq!(object["kind"], "Secret");
        assert_eq!(object["metadata"]["name"], "release");
        assert_eq!(object["metadata"]["labels"]["owner"], "helm");
        assert_eq!(object["data"]["release"], "AQI=");
        assert_eq!(object["type"], "helm.sh/release.v1");
    }
}
