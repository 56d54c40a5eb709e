//! Admin calls are made on the leader: a member that is not the leader forwards the call to the
//! leader's peer port (over mutual TLS when peer TLS is on) and relays the answer; a forwarded
//! call is never forwarded again.

use std::future::Future;
use std::time::Duration;

use axum::body::Body;
use axum::http::{header, HeaderMap, Method, StatusCode};
use axum::response::Response;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use raftkv_api::codes;

use super::error::{ApiError, ApiResult};
use super::ApiContext;
use crate::inbox::Role;

/// Marks a request forwarded by another member, so it is never forwarded twice.
const FORWARDED_HEADER: &str = "x-raftkv-forwarded";

/// Answers an admin call on the leader: relays the leader's answer when this member is not the
/// leader, and runs `here` when it is (or when it belongs to no cluster yet, where the call is
/// its own to refuse). `path` and `body` are what the leader is sent.
pub(super) async fn on_leader<F, Fut>(
    s: &ApiContext,
    headers: &HeaderMap,
    method: Method,
    path: &str,
    body: Bytes,
    here: F,
) -> ApiResult
where
    F: FnOnce() -> Fut,
    Fut: Future<Output = ApiResult>,
{
    match forward_to_leader(s, headers, method, path, body).await? {
        Some(answer) => Ok(answer),
        None => here().await,
    }
}

/// Sends an admin call to the leader's peer port when this member is not the leader.
/// Returns `None` when this member should handle it.
pub(super) async fn forward_to_leader(
    s: &ApiContext,
    headers: &HeaderMap,
    method: Method,
    path: &str,
    body: Bytes,
) -> ApiResult<Option<Response>> {
    let st = s.status.borrow().clone();
    if st.role == Role::Leader || st.role == Role::Uninitialized {
        return Ok(None);
    }
    if headers.contains_key(FORWARDED_HEADER) {
        return Err(ApiError::unavailable(
            codes::NOT_LEADER,
            "the member this call was forwarded to is no longer the leader; retry",
        ));
    }
    if st.leader_id == 0 {
        s.wait_for_leader(s.deadline()).await?;
    }
    let st = s.status.borrow().clone();
    if st.leader_id == st.id {
        return Ok(None);
    }
    let Some(url) = st.members.peer_urls.get(&st.leader_id) else {
        return Err(ApiError::unavailable(
            codes::NO_LEADER,
            "the leader's address is not known yet; retry",
        ));
    };
    let mut req = hyper::Request::builder()
        .method(method)
        .uri(format!("{}{path}", url.trim_end_matches('/')))
        .header(FORWARDED_HEADER, "1")
        .header(header::CONTENT_TYPE, "application/json");
    // Without peer TLS the leader's peer port checks the caller's token itself; with it, the
    // verified peer certificate vouches for this member, which checked the caller already.
    if let Some(auth) = headers.get(header::AUTHORIZATION) {
        req = req.header(header::AUTHORIZATION, auth);
    }
    let req = req
        .body(Full::new(body))
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, codes::INTERNAL, e.to_string()))?;
    // The leader answers within its own deadline; a second more covers the hop.
    let deadline = s.deadline() + Duration::from_secs(1);
    let resp = s
        .bounded(deadline, s.forwarder.request(req))
        .await
        .ok_or_else(ApiError::unknown_outcome)?
        .map_err(|e| {
            ApiError::unavailable(
                codes::LEADER_UNREACHABLE,
                format!("forwarding to the leader failed: {e}"),
            )
        })?;
    let (parts, body) = resp.into_parts();
    let body = body
        .collect()
        .await
        .map_err(|e| {
            ApiError::unavailable(
                codes::LEADER_UNREACHABLE,
                format!("reading the leader's answer failed: {e}"),
            )
        })?
        .to_bytes();
    Ok(Some(Response::from_parts(parts, Body::from(body))))
}
