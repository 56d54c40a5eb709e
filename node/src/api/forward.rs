//! Admin calls are made on the leader: a member that is not the leader forwards the call to the
//! leader's peer port (over mutual TLS when peer TLS is on) and relays the answer; a forwarded
//! call is never forwarded again. A call that never reached the leader is `503
//! leader_unreachable`; one that changes something, was sent, and lost its answer is `504
//! unknown_outcome`, since the leader may have applied it before it went away.

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
    let changes = method != Method::GET;
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
    let unreachable = |why: String| {
        ApiError::unavailable(
            codes::LEADER_UNREACHABLE,
            format!("forwarding to the leader failed: {why}"),
        )
    };
    // Once the call is on its way, a call that changes something and gets no answer has an
    // unknown outcome: the leader may have applied it before the connection broke.
    let lost = |why: String| {
        if changes {
            ApiError::unknown_outcome_because(format!(
                "the call was sent to the leader but its answer was lost ({why}); it may or may not have been applied"
            ))
        } else {
            unreachable(why)
        }
    };
    // The leader answers within its own deadline; a second more covers the hop.
    let deadline = s.deadline() + Duration::from_secs(1);
    // Until the connection is open nothing has reached the leader: a failure is a plain 503.
    // `bounded` ends a wait at the deadline or when this member shuts down.
    let mut sender = s
        .bounded(deadline, s.forwarder.connect(url))
        .await
        .ok_or_else(|| unreachable("no connection before the deadline or shutdown".into()))?
        .map_err(unreachable)?;
    let resp = match s.bounded(deadline, sender.try_send_request(req)).await {
        None => return Err(lost("no answer before the deadline or shutdown".into())),
        Some(Ok(resp)) => resp,
        // The call came back unwritten (the connection closed first): it never left.
        Some(Err(e)) if e.message().is_some() => return Err(unreachable(e.into_error().to_string())),
        Some(Err(e)) => return Err(lost(e.into_error().to_string())),
    };
    let (parts, body) = resp.into_parts();
    let body = s
        .bounded(deadline, body.collect())
        .await
        .ok_or_else(|| lost("the answer did not arrive before the deadline or shutdown".into()))?
        .map_err(|e| lost(format!("reading the answer: {e}")))?
        .to_bytes();
    Ok(Some(Response::from_parts(parts, Body::from(body))))
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::sync::Arc;

    use axum::response::IntoResponse;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    use super::*;
    use crate::api::{ApiState, Limits, PeerSide};
    use crate::inbox::RaftStatus;
    use crate::kv::{KvState, MemberRole, Membership};
    use crate::metrics::Metrics;
    use crate::state_machine::Shared;
    use crate::tls::PeerClient;

    /// A follower whose leader (member 2) is reached at `leader_url`.
    fn follower_of(leader_url: &str) -> (ApiState, tokio::sync::watch::Sender<RaftStatus>) {
        let members = Membership {
            voters: [1, 2].into(),
            peer_urls: [(2, leader_url.to_string())].into(),
            ..Default::default()
        };
        let (status_tx, status) = tokio::sync::watch::channel(RaftStatus {
            id: 1,
            cluster_id: 7,
            role: Role::Follower,
            membership: MemberRole::Voter,
            term: 1,
            leader_id: 2,
            commit_index: 0,
            leader_commit: 0,
            last_index: 0,
            snapshot_index: 0,
            progress: HashMap::new(),
            members,
        });
        let limits = Limits {
            max_value_size: 1 << 20,
            request_timeout: Duration::from_secs(2),
            body_timeout: Duration::from_secs(2),
            max_pending_writes: 10,
            max_pending_write_bytes: 1 << 20,
            max_pending_reads: 10,
            max_concurrent_lists: 1,
            max_ready_lag: 10,
            watch_progress: Duration::from_secs(5),
        };
        let state = crate::api::ApiContext::new(
            Shared::new(KvState::default()),
            flume::unbounded().0,
            status,
            Arc::new(Metrics::new()),
            limits,
            PeerSide {
                advertise_url: None,
                client: PeerClient::new(None),
            },
            Default::default(),
        );
        (state, status_tx)
    }

    /// A leader that reads each call's head, writes `answer` (nothing, or a response cut short)
    /// and closes the connection.
    async fn leader_answering(answer: &'static [u8]) -> String {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move {
            while let Ok((mut conn, _)) = listener.accept().await {
                let mut request = Vec::new();
                let mut buf = [0; 1024];
                while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                    match conn.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => request.extend_from_slice(&buf[..n]),
                    }
                }
                let _ = conn.write_all(answer).await;
            }
        });
        url
    }

    async fn forward(s: &ApiState, method: Method) -> (StatusCode, String) {
        let answer = forward_to_leader(s, &HeaderMap::new(), method, "/v1/members", Bytes::from_static(b"{}")).await;
        let resp = answer.expect_err("the call cannot succeed").into_response();
        let status = resp.status();
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        let code = serde_json::from_slice::<serde_json::Value>(&body).unwrap()["error"]
            .as_str()
            .unwrap()
            .to_string();
        (status, code)
    }

    #[tokio::test]
    async fn a_call_sent_to_a_leader_that_vanishes_has_an_unknown_outcome() {
        let (s, _status) = follower_of(&leader_answering(b"").await);
        assert_eq!(
            forward(&s, Method::POST).await,
            (StatusCode::GATEWAY_TIMEOUT, codes::UNKNOWN_OUTCOME.to_string())
        );
        assert_eq!(
            forward(&s, Method::DELETE).await,
            (StatusCode::GATEWAY_TIMEOUT, codes::UNKNOWN_OUTCOME.to_string())
        );
        // A read changes nothing: it is only unavailable.
        assert_eq!(
            forward(&s, Method::GET).await,
            (StatusCode::SERVICE_UNAVAILABLE, codes::LEADER_UNREACHABLE.to_string())
        );
    }

    #[tokio::test]
    async fn an_answer_broken_off_after_its_head_leaves_the_outcome_unknown() {
        let (s, _status) =
            follower_of(&leader_answering(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\n{\"members\"").await);
        assert_eq!(
            forward(&s, Method::POST).await,
            (StatusCode::GATEWAY_TIMEOUT, codes::UNKNOWN_OUTCOME.to_string())
        );
    }

    #[tokio::test]
    async fn a_call_that_never_reached_the_leader_is_unavailable() {
        let closed = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", closed.local_addr().unwrap());
        drop(closed);
        let (s, _status) = follower_of(&url);
        assert_eq!(
            forward(&s, Method::POST).await,
            (StatusCode::SERVICE_UNAVAILABLE, codes::LEADER_UNREACHABLE.to_string())
        );
    }
}
