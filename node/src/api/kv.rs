//! The key-value calls: `GET`, `PUT` and `DELETE /v1/kv/{key}` and range listings
//! (`GET /v1/kv?prefix=...`), with strict decoding of keys and preconditions. Reads and
//! listings take `revision=N` to see the keys as they were at a revision the watch history
//! still covers (`410 compacted` below it).

use std::ops::Bound;

use axum::body::Body;
use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::Json;
use base64::Engine;
use bytes::Bytes;
use raftkv_api::{codes, DeleteResponse, ListItem, ListResponse, WriteResponse};
use serde::Deserialize;

use super::error::{ApiError, ApiResult};
use super::request::{content_length, percent_decode_strict, read_body, too_large, ClientQuery, KeyParams};
use super::{ApiState, DEFAULT_LIST_LIMIT, MAX_KEY_LEN, MAX_LIST_BYTES, MAX_LIST_LIMIT};
use crate::command::{Op, Precondition};
use crate::kv::ApplyOutcome;

pub(super) async fn empty_key() -> ApiError {
    ApiError::bad_request(codes::INVALID_KEY, "the key is empty; keys are 1 to 4096 bytes")
}

/// Decodes the key from the raw path, strictly: a malformed escape is an error, not a literal.
pub fn parse_key(path: &str) -> Result<Bytes, ApiError> {
    let raw = path.strip_prefix("/v1/kv/").unwrap_or_default().as_bytes();
    let key = percent_decode_strict(raw, false).map_err(|at| {
        ApiError::bad_request(
            codes::INVALID_KEY,
            format!("malformed percent-encoding at byte {at} of the key"),
        )
    })?;
    if key.is_empty() || key.len() > MAX_KEY_LEN {
        return Err(ApiError::bad_request(
            codes::INVALID_KEY,
            format!("the key is {} bytes; keys are 1 to {MAX_KEY_LEN} bytes", key.len()),
        ));
    }
    Ok(Bytes::from(key))
}

/// Reads `If-Match` / `If-None-Match` into a precondition.
pub fn parse_precondition(headers: &HeaderMap) -> Result<Precondition, ApiError> {
    let if_match = headers.get(header::IF_MATCH);
    let if_none = headers.get(header::IF_NONE_MATCH);
    match (if_match, if_none) {
        (Some(_), Some(_)) => Err(ApiError::bad_request(
            codes::INVALID_PRECONDITION,
            "If-Match and If-None-Match cannot be combined",
        )),
        (None, None) => Ok(Precondition::None),
        (None, Some(v)) => match v.to_str().map(str::trim) {
            Ok("*") => Ok(Precondition::Absent),
            _ => Err(ApiError::bad_request(
                codes::INVALID_PRECONDITION,
                "If-None-Match accepts only *",
            )),
        },
        (Some(v), None) => {
            let v = v.to_str().map(str::trim).unwrap_or_default();
            if v == "*" {
                return Ok(Precondition::Exists);
            }
            v.strip_prefix('"')
                .and_then(|v| v.strip_suffix('"'))
                .and_then(|v| v.parse::<u64>().ok())
                .map(Precondition::ModRevision)
                .ok_or_else(|| {
                    ApiError::bad_request(
                        codes::INVALID_PRECONDITION,
                        format!("If-Match must be a quoted revision like \"42\" or *, got {v:?}"),
                    )
                })
        }
    }
}

#[derive(Deserialize)]
pub(super) struct ReadParams {
    #[serde(default)]
    stale: bool,
    /// Read the key as it was at this revision (within the retained history).
    revision: Option<u64>,
}

pub(super) async fn get_key(State(s): State<ApiState>, uri: Uri, ClientQuery(q): ClientQuery<ReadParams>) -> ApiResult {
    let key = parse_key(uri.path())?;
    s.ensure_member()?;
    if q.stale {
        s.stale_read_barrier().await?;
    } else {
        s.read_barrier().await?;
    }
    let (found, revision) = match q.revision {
        Some(r) => {
            // An O(1) clone: the history is searched without holding the lock apply needs.
            let state = s.shared.state.read().clone();
            (state.get_at(&key, r).map_err(ApiError::revision)?, r)
        }
        None => {
            let state = s.shared.state.read();
            (state.data.get(&key).cloned(), state.applied_index)
        }
    };
    let Some(v) = found else {
        return Err(ApiError::new(StatusCode::NOT_FOUND, codes::NOT_FOUND, "no such key"));
    };
    let mut resp = Response::new(Body::from(v.value.clone()));
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    h.insert(
        header::ETAG,
        HeaderValue::from_str(&format!("\"{}\"", v.mod_revision)).expect("digits are a valid header"),
    );
    h.insert("x-raftkv-create-revision", HeaderValue::from(v.create_revision));
    h.insert("x-raftkv-revision", HeaderValue::from(revision));
    Ok(resp)
}

pub(super) async fn put_key(State(s): State<ApiState>, uri: Uri, headers: HeaderMap, body: Body) -> ApiResult {
    let key = parse_key(uri.path())?;
    let precondition = parse_precondition(&headers)?;
    // Room in the write budget is taken before the body is read, for what Content-Length
    // announces (or the largest value when it does not), so that a flood of large writes is
    // refused before it is buffered.
    let announced = match content_length(&headers)? {
        Some(len) if len > s.limits.max_value_size as u64 => return Err(too_large(s.limits.max_value_size)),
        Some(len) => len,
        None => s.limits.max_value_size as u64,
    };
    s.ensure_member()?;
    // Refused with its body unread: the connection cannot carry another request.
    let _admitted = s
        .admit_write(key.len() as u64 + announced)
        .map_err(|e| if announced > 0 { e.closing() } else { e })?;
    let value = read_body(body, &headers, s.limits.max_value_size, s.limits.body_timeout).await?;
    let outcome = s
        .propose(Op::Put {
            key,
            value,
            precondition,
        })
        .await?;
    write_response(outcome)
}

pub(super) async fn delete_key(State(s): State<ApiState>, uri: Uri, headers: HeaderMap) -> ApiResult {
    let key = parse_key(uri.path())?;
    let precondition = parse_precondition(&headers)?;
    if precondition == Precondition::Absent {
        return Err(ApiError::bad_request(
            codes::INVALID_PRECONDITION,
            "If-None-Match does not apply to DELETE",
        ));
    }
    s.ensure_member()?;
    let _admitted = s.admit_write(key.len() as u64)?;
    let outcome = s.propose(Op::Delete { key, precondition }).await?;
    write_response(outcome)
}

fn write_response(outcome: ApplyOutcome) -> ApiResult {
    match outcome {
        ApplyOutcome::Put { revision } => Ok(Json(WriteResponse { revision }).into_response()),
        ApplyOutcome::Delete { revision, deleted } => Ok(Json(DeleteResponse { revision, deleted }).into_response()),
        ApplyOutcome::PreconditionFailed { current } => Err(ApiError::precondition_failed(current)),
        ApplyOutcome::Membership | ApplyOutcome::Rejected(_) => Err(ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            codes::INTERNAL,
            "the write was applied as something else",
        )),
    }
}

/// The listing's typed parameters; `prefix` and `start_after` are [`KeyParams`].
#[derive(Deserialize)]
pub(super) struct ListParams {
    limit: Option<usize>,
    #[serde(default)]
    stale: bool,
    /// List the keys as they were at this revision (within the retained history).
    revision: Option<u64>,
}

pub(super) fn text_or_base64(bytes: &[u8]) -> (Option<String>, Option<String>) {
    match std::str::from_utf8(bytes) {
        Ok(s) => (Some(s.to_string()), None),
        Err(_) => (None, Some(base64::engine::general_purpose::STANDARD.encode(bytes))),
    }
}

pub(super) async fn list(
    State(s): State<ApiState>,
    ClientQuery(q): ClientQuery<ListParams>,
    keys: KeyParams,
) -> ApiResult {
    let limit = q.limit.unwrap_or(DEFAULT_LIST_LIMIT);
    if limit == 0 || limit > MAX_LIST_LIMIT {
        return Err(ApiError::bad_request(
            codes::INVALID_LIMIT,
            format!("limit must be 1 to {MAX_LIST_LIMIT}"),
        ));
    }
    s.ensure_member()?;
    let _building = s.admit_list()?;
    if q.stale {
        s.stale_read_barrier().await?;
    } else {
        s.read_barrier().await?;
    }
    let prefix = keys.get("prefix").unwrap_or_default();
    // An O(1) clone of the persistent map: the page is built and encoded without holding the
    // lock the apply loop needs.
    let (data, revision) = match q.revision {
        // Undoes the later changes under the prefix on a clone, which costs the changes since
        // `r`, outside the lock; keys outside the prefix are not listed, so need not be undone.
        Some(r) => {
            let state = s.shared.state.read().clone();
            (state.data_at(r, &prefix).map_err(ApiError::revision)?, r)
        }
        None => {
            let state = s.shared.state.read();
            (state.data.clone(), state.applied_index)
        }
    };
    let lower = match keys.get("start_after") {
        Some(after) if after >= prefix => Bound::Excluded(after),
        _ => Bound::Included(prefix.clone()),
    };
    let mut items = Vec::new();
    let mut bytes = 0;
    let mut more = false;
    for (key, v) in data.range((lower, Bound::Unbounded)) {
        if !key.starts_with(&prefix) {
            break;
        }
        // A page ends at `limit` items or once it holds `MAX_LIST_BYTES` of keys and values,
        // whichever comes first; the client continues with `start_after`.
        if items.len() == limit || bytes >= MAX_LIST_BYTES {
            more = true;
            break;
        }
        bytes += key.len() + v.value.len();
        let (key_text, key_b64) = text_or_base64(key);
        let (value, value_base64) = text_or_base64(&v.value);
        items.push(ListItem {
            key: key_text,
            key_base64: key_b64,
            value,
            value_base64,
            revision: v.mod_revision,
            create_revision: v.create_revision,
        });
    }
    Ok(Json(ListResponse { items, more, revision }).into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_strictly_percent_decoded_and_bounded() {
        assert_eq!(parse_key("/v1/kv/a%2Fb").unwrap(), Bytes::from_static(b"a/b"));
        assert_eq!(parse_key("/v1/kv/x/y").unwrap(), Bytes::from_static(b"x/y"));
        assert_eq!(parse_key("/v1/kv/%ff%00").unwrap(), Bytes::from_static(b"\xff\x00"));
        assert!(parse_key("/v1/kv/%zz").is_err());
        assert!(parse_key("/v1/kv/%+f").is_err());
        assert_eq!(parse_key("/v1/kv/a+b").unwrap(), Bytes::from_static(b"a+b"));
        assert!(parse_key("/v1/kv/abc%2").is_err());
        assert!(parse_key("/v1/kv/").is_err());
        assert!(parse_key(&format!("/v1/kv/{}", "k".repeat(MAX_KEY_LEN))).is_ok());
        assert!(parse_key(&format!("/v1/kv/{}", "k".repeat(MAX_KEY_LEN + 1))).is_err());
    }

    #[test]
    fn preconditions_parse_from_headers() {
        let mut h = HeaderMap::new();
        assert_eq!(parse_precondition(&h).unwrap(), Precondition::None);
        h.insert(header::IF_MATCH, HeaderValue::from_static("\"17\""));
        assert_eq!(parse_precondition(&h).unwrap(), Precondition::ModRevision(17));
        h.insert(header::IF_MATCH, HeaderValue::from_static("*"));
        assert_eq!(parse_precondition(&h).unwrap(), Precondition::Exists);
        for bad in ["17", "\"x\"", "\"-1\"", "W/\"1\""] {
            h.insert(header::IF_MATCH, HeaderValue::from_static(bad));
            assert!(parse_precondition(&h).is_err(), "{bad} accepted");
        }
        let mut h = HeaderMap::new();
        h.insert(header::IF_NONE_MATCH, HeaderValue::from_static("*"));
        assert_eq!(parse_precondition(&h).unwrap(), Precondition::Absent);
        h.insert(header::IF_NONE_MATCH, HeaderValue::from_static("\"3\""));
        assert!(parse_precondition(&h).is_err());
        h.insert(header::IF_MATCH, HeaderValue::from_static("\"3\""));
        assert!(parse_precondition(&h).is_err());
    }
}
