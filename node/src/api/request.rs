//! Reading requests: bodies within a size limit and the deadline, JSON bodies, query strings
//! whose rejection is a JSON error like any other bad input, and keys decoded strictly to bytes.

use std::time::Duration;

use axum::body::Body;
use axum::extract::Query;
use axum::http::{header, HeaderMap, StatusCode};
use bytes::Bytes;
use http_body_util::{BodyExt, Limited};
use raftkv_api::codes;
use serde::Deserialize;

use super::error::{ApiError, ApiResult};
use super::{ApiContext, MAX_ADMIN_BODY};

/// Reads a body of at most `limit` bytes within the request deadline, refusing early when
/// `Content-Length` announces more; a body that trickles in past the deadline is cut off (408).
///
/// A refusal leaves the rest of the body unread and closes the connection; the server's
/// lingering close (`crate::server::Lingering`) lets a client that is still writing the body
/// read the answer.
pub(crate) async fn read_body(body: Body, headers: &HeaderMap, limit: usize, deadline: Duration) -> ApiResult<Bytes> {
    let too_large = || too_large(limit);
    if content_length(headers)?.is_some_and(|len| len > limit as u64) {
        return Err(too_large());
    }
    let collected = tokio::time::timeout(deadline, Limited::new(body, limit).collect())
        .await
        .map_err(|_| {
            ApiError::new(
                StatusCode::REQUEST_TIMEOUT,
                codes::BODY_TIMEOUT,
                "the request body did not arrive before the deadline",
            )
            .closing()
        })?;
    match collected {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) if e.downcast_ref::<http_body_util::LengthLimitError>().is_some() => Err(too_large()),
        Err(e) => Err(ApiError::bad_request(codes::INVALID_BODY, format!("reading the body failed: {e}")).closing()),
    }
}

/// The `413 too_large` answer for a body over `limit` bytes.
pub(crate) fn too_large(limit: usize) -> ApiError {
    ApiError::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        codes::TOO_LARGE,
        format!("the body exceeds the limit of {limit} bytes"),
    )
    .closing()
}

/// The announced body length, if any; a malformed one is a `400`.
pub(crate) fn content_length(headers: &HeaderMap) -> ApiResult<Option<u64>> {
    headers
        .get(header::CONTENT_LENGTH)
        .map(|len| {
            len.to_str()
                .ok()
                .and_then(|l| l.parse().ok())
                .ok_or_else(|| ApiError::bad_request(codes::INVALID_REQUEST, "malformed Content-Length").closing())
        })
        .transpose()
}

pub(crate) async fn read_json<T: for<'de> Deserialize<'de>>(
    s: &ApiContext,
    body: Body,
    headers: &HeaderMap,
) -> ApiResult<T> {
    let bytes = read_body(body, headers, MAX_ADMIN_BODY, s.limits.body_timeout).await?;
    serde_json::from_slice(&bytes)
        .map_err(|e| ApiError::bad_request(codes::INVALID_JSON, format!("malformed request body: {e}")))
}

/// Query parameters whose rejection is a JSON error like every other bad input (axum's own
/// `Query` rejection is plain text).
pub(crate) struct ClientQuery<T>(pub T);

impl<T: serde::de::DeserializeOwned, S: Send + Sync> axum::extract::FromRequestParts<S> for ClientQuery<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut http::request::Parts, state: &S) -> Result<Self, Self::Rejection> {
        Query::<T>::from_request_parts(parts, state)
            .await
            .map(|Query(q)| ClientQuery(q))
            .map_err(|rejection| ApiError::bad_request(codes::INVALID_QUERY, rejection.body_text()))
    }
}

/// Percent-decodes `raw` to bytes, strictly: a malformed escape (`%zz`, a trailing `%2`) is an
/// error carrying its byte offset, never a literal, so that a key means one thing only. With
/// `plus_is_space`, `+` decodes to a space as in a form-encoded query string.
///
/// Hand-written rather than `percent_encoding::percent_decode`, which passes a malformed escape
/// through as literal bytes.
pub(crate) fn percent_decode_strict(raw: &[u8], plus_is_space: bool) -> Result<Vec<u8>, usize> {
    let mut out = Vec::with_capacity(raw.len());
    let mut i = 0;
    while i < raw.len() {
        match raw[i] {
            b'%' => {
                // Two hex digits exactly: `u8::from_str_radix` alone would take `%+f` as 0x0F,
                // a second spelling of the same byte.
                let hex = raw.get(i + 1..i + 3).filter(|h| h.iter().all(u8::is_ascii_hexdigit));
                let byte = hex.and_then(|h| u8::from_str_radix(std::str::from_utf8(h).ok()?, 16).ok());
                out.push(byte.ok_or(i)?);
                i += 3;
            }
            b'+' if plus_is_space => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    Ok(out)
}

/// The query parameters that name keys (`prefix`, `start_after`, `key`), decoded to the bytes
/// they escape.
///
/// They are read from the raw query rather than through [`ClientQuery`]: serde_urlencoded
/// decodes to UTF-8 lossily (`%ff` becomes U+FFFD) and keeps a malformed escape as literal
/// text, so a binary prefix or a typo would silently match nothing instead of what it names.
pub(crate) struct KeyParams(Vec<(Vec<u8>, Bytes)>);

impl<S: Send + Sync> axum::extract::FromRequestParts<S> for KeyParams {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut http::request::Parts, _state: &S) -> Result<Self, Self::Rejection> {
        KeyParams::parse(parts.uri.query().unwrap_or_default())
    }
}

impl KeyParams {
    /// Decodes the key parameters of a raw query string (`a=1&prefix=x`); a parameter given
    /// twice or a malformed escape in one is a `400 invalid_query`.
    pub(crate) fn parse(query: &str) -> ApiResult<KeyParams> {
        let mut pairs = Vec::new();
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
            // Only the names that carry keys are decoded here; the others are `ClientQuery`'s.
            let Ok(name) = percent_decode_strict(name.as_bytes(), true) else {
                continue;
            };
            if !KEY_PARAMS.contains(&name.as_slice()) {
                continue;
            }
            let value = percent_decode_strict(value.as_bytes(), true).map_err(|at| {
                ApiError::bad_request(
                    codes::INVALID_QUERY,
                    format!(
                        "{}=: malformed percent-encoding at byte {at} of the value (a % must be followed by two \
                         hex digits; write a literal % as %25)",
                        String::from_utf8_lossy(&name)
                    ),
                )
            })?;
            if pairs.iter().any(|(n, _)| *n == name) {
                return Err(ApiError::bad_request(
                    codes::INVALID_QUERY,
                    format!("{}= is given more than once", String::from_utf8_lossy(&name)),
                ));
            }
            pairs.push((name, Bytes::from(value)));
        }
        Ok(KeyParams(pairs))
    }

    /// The bytes of the parameter `name`, if it was given.
    pub(crate) fn get(&self, name: &str) -> Option<Bytes> {
        debug_assert!(KEY_PARAMS.contains(&name.as_bytes()), "{name} is not a key parameter");
        self.0
            .iter()
            .find(|(n, _)| n == name.as_bytes())
            .map(|(_, v)| v.clone())
    }
}

/// The query parameters that [`KeyParams`] decodes.
const KEY_PARAMS: [&[u8]; 3] = [b"prefix", b"start_after", b"key"];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_parameters_decode_to_bytes_strictly() {
        let q = KeyParams::parse("prefix=%ff%00a+b&limit=5&start_after=%2B%26").unwrap();
        assert_eq!(q.get("prefix").unwrap(), Bytes::from_static(b"\xff\x00a b"));
        assert_eq!(q.get("start_after").unwrap(), Bytes::from_static(b"+&"));
        assert_eq!(q.get("key"), None);
        assert_eq!(KeyParams::parse("prefix").unwrap().get("prefix").unwrap(), Bytes::new());
        assert_eq!(KeyParams::parse("").unwrap().get("prefix"), None);
        for bad in [
            "prefix=%zz",
            "prefix=a%2",
            "key=%",
            "prefix=%+f",
            "prefix=%-1",
            "prefix=a&prefix=b",
        ] {
            assert!(KeyParams::parse(bad).is_err(), "{bad} accepted");
        }
        // A malformed escape outside the key parameters is left to the typed query.
        assert!(KeyParams::parse("limit=%zz&prefix=a").is_ok());
    }
}
