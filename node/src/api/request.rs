//! Reading requests: bodies within a size limit and the deadline, JSON bodies, and query
//! strings whose rejection is a JSON error like any other bad input.

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
