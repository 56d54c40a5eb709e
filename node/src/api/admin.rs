//! The admin and operations calls: status, health, readiness and metrics of this member, and
//! the membership and leadership calls, which are made on the leader (see [`super::forward`])
//! and answer once the change is applied.

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::Json;
use bytes::Bytes;
use raftkv_api::{
    codes, AddMemberRequest, Bootstrapped, Health, MemberKind, MemberView, Members, Status, TransferRequest,
    TransferResponse,
};
use tokio::sync::oneshot;

use super::error::{ApiError, ApiResult};
use super::forward::{forward_to_leader, on_leader};
use super::request::read_json;
use super::{ApiContext, ApiState, CancelOnDrop};
use crate::inbox::{AdminCommand, AdminError, RaftInput, RaftStatus, Role};
use crate::kv::{MemberRole, Membership};

fn own_peer_url(s: &ApiContext, status: &RaftStatus) -> Option<String> {
    status
        .members
        .peer_urls
        .get(&status.id)
        .cloned()
        .or_else(|| s.advertise_peer_url.clone())
}

pub(super) async fn status(State(s): State<ApiState>) -> Json<Status> {
    let st = s.status.borrow().clone();
    let applied = *s.shared.applied.borrow();
    let ready = readiness(&s, &st, applied).is_ok();
    let (compact_revision, history_changes) = {
        let state = s.shared.state.read();
        (state.history.compact_revision(), state.history.len() as u64)
    };
    Json(Status {
        id: st.id,
        cluster_id: st.cluster_id,
        role: st.role,
        term: st.term,
        leader_id: st.leader_id,
        commit_index: st.commit_index,
        applied_index: applied,
        snapshot_index: st.snapshot_index,
        membership: wire_membership(st.membership),
        joint: st.members.is_joint(),
        peer_url: own_peer_url(&s, &st),
        ready,
        watch: raftkv_api::WatchStatus {
            compact_revision,
            history_changes,
            watchers: s.metrics.watchers.get().max(0) as u64,
        },
    })
}

fn wire_membership(role: MemberRole) -> raftkv_api::Membership {
    match role {
        MemberRole::Voter => raftkv_api::Membership::Voter,
        MemberRole::Learner => raftkv_api::Membership::Learner,
        MemberRole::None => raftkv_api::Membership::None,
        MemberRole::Removed => raftkv_api::Membership::Removed,
    }
}

fn readiness(s: &ApiContext, st: &RaftStatus, applied: u64) -> Result<(), String> {
    if !matches!(st.membership, MemberRole::Voter | MemberRole::Learner) {
        return Err(format!("not a member ({:?})", st.membership).to_lowercase());
    }
    if st.leader_id == 0 {
        return Err("no leader known".into());
    }
    if st.leader_commit == 0 && st.role != Role::Leader {
        return Err("not yet heard from the leader".into());
    }
    let behind = st.leader_commit.saturating_sub(applied);
    if behind > s.limits.max_ready_lag {
        return Err(format!("{behind} entries behind the leader"));
    }
    Ok(())
}

pub(super) async fn healthz(State(s): State<ApiState>) -> ApiResult {
    if s.inbox.is_disconnected() {
        return Err(ApiError::unavailable(
            codes::UNHEALTHY,
            "the consensus loop has stopped",
        ));
    }
    Ok(Json(Health { status: "ok".into() }).into_response())
}

pub(super) async fn readyz(State(s): State<ApiState>) -> ApiResult {
    let st = s.status.borrow().clone();
    let applied = *s.shared.applied.borrow();
    readiness(&s, &st, applied).map_err(|reason| ApiError::unavailable(codes::NOT_READY, reason))?;
    Ok(Json(Health { status: "ready".into() }).into_response())
}

pub(super) async fn metrics(State(s): State<ApiState>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        s.metrics.encode(),
    )
        .into_response()
}

fn members_view(st: &RaftStatus, membership: &Membership) -> Members {
    let members: Vec<MemberView> = membership
        .member_ids()
        .into_iter()
        .map(|id| {
            let progress = st.progress.get(&id);
            MemberView {
                id,
                peer_url: membership.peer_urls.get(&id).cloned(),
                role: match membership.role_of(id) {
                    MemberRole::Voter => MemberKind::Voter,
                    // `member_ids` lists voters and learners only.
                    _ => MemberKind::Learner,
                },
                match_index: progress.map(|p| p.match_index),
                healthy: progress.map(|p| p.recent_active),
            }
        })
        .collect();
    Members {
        cluster_id: st.cluster_id,
        leader_id: st.leader_id,
        members,
    }
}

pub(super) async fn list_members(State(s): State<ApiState>, headers: HeaderMap) -> ApiResult {
    if s.status.borrow().leader_id != 0 {
        if let Ok(Some(resp)) = forward_to_leader(&s, &headers, Method::GET, "/v1/members", Bytes::new()).await {
            return Ok(resp);
        }
    }
    // No leader, or it could not be reached: the applied membership, without progress.
    let st = s.status.borrow().clone();
    let membership = s.shared.state.read().membership.clone();
    Ok(Json(members_view(&st, &membership)).into_response())
}

fn validate_peer_url(url: &str) -> ApiResult<()> {
    let uri: Uri = url
        .parse()
        .map_err(|e| ApiError::bad_request(codes::INVALID_PEER_URL, format!("peer_url {url:?} is not a URL: {e}")))?;
    if !matches!(uri.scheme_str(), Some("http" | "https")) || uri.host().is_none() {
        return Err(ApiError::bad_request(
            codes::INVALID_PEER_URL,
            format!("peer_url {url:?} must be http://host:port or https://host:port"),
        ));
    }
    Ok(())
}

/// Proposes a membership change on the leader and waits until it is applied.
async fn membership_change(
    s: &ApiContext,
    build: impl FnOnce(u64, oneshot::Sender<Result<(), AdminError>>) -> AdminCommand,
    applied: impl Fn(&Membership) -> bool,
) -> ApiResult {
    let deadline = s.deadline();
    let (request_id, done) = s.shared.waiters.register();
    let _cancel = CancelOnDrop(&s.shared, request_id);
    let (tx, rx) = oneshot::channel();
    s.send(RaftInput::Admin(build(request_id, tx))).await?;
    rx.await.map_err(|_| ApiError::shutting_down())??;
    // raft-rs silently drops a conf change it cannot take; confirm from the applied configuration.
    let confirmed = matches!(s.bounded(deadline, done).await, Some(Ok(_)));
    let st = s.status.borrow().clone();
    let membership = s.shared.state.read().membership.clone();
    if confirmed || applied(&membership) {
        Ok(Json(members_view(&st, &membership)).into_response())
    } else {
        Err(ApiError::unknown_outcome())
    }
}

pub(super) async fn add_member(State(s): State<ApiState>, headers: HeaderMap, body: Body) -> ApiResult {
    let req: AddMemberRequest = read_json(&s, body, &headers).await?;
    validate_peer_url(&req.peer_url)?;
    let raw = Bytes::from(serde_json::to_vec(&req).expect("serialize request"));
    on_leader(&s, &headers, Method::POST, "/v1/members", raw, || async {
        let (id, learner) = (req.id, req.learner);
        let wanted = if learner {
            MemberRole::Learner
        } else {
            MemberRole::Voter
        };
        membership_change(
            &s,
            |request_id, reply| AdminCommand::AddMember {
                id: req.id,
                peer_url: req.peer_url,
                learner: req.learner,
                request_id,
                reply,
            },
            |m| m.role_of(id) == wanted,
        )
        .await
    })
    .await
}

fn parse_id(raw: &str) -> ApiResult<u64> {
    raw.parse::<u64>()
        .ok()
        .filter(|id| *id > 0)
        .ok_or_else(|| ApiError::bad_request(codes::INVALID_ID, format!("{raw:?} is not a member id")))
}

pub(super) async fn promote_member(
    State(s): State<ApiState>,
    headers: HeaderMap,
    Path(raw): Path<String>,
) -> ApiResult {
    let id = parse_id(&raw)?;
    let path = format!("/v1/members/{id}/promote");
    on_leader(&s, &headers, Method::POST, &path, Bytes::new(), || {
        membership_change(
            &s,
            |request_id, reply| AdminCommand::Promote { id, request_id, reply },
            |m| m.role_of(id) == MemberRole::Voter,
        )
    })
    .await
}

pub(super) async fn remove_member(State(s): State<ApiState>, headers: HeaderMap, Path(raw): Path<String>) -> ApiResult {
    let id = parse_id(&raw)?;
    let path = format!("/v1/members/{id}");
    on_leader(&s, &headers, Method::DELETE, &path, Bytes::new(), || {
        membership_change(
            &s,
            |request_id, reply| AdminCommand::Remove { id, request_id, reply },
            |m| m.role_of(id) == MemberRole::Removed,
        )
    })
    .await
}

pub(super) async fn transfer_leader(State(s): State<ApiState>, headers: HeaderMap, body: Body) -> ApiResult {
    let req: TransferRequest = read_json(&s, body, &headers).await?;
    let raw = Bytes::from(serde_json::to_vec(&req).expect("serialize request"));
    on_leader(&s, &headers, Method::POST, "/v1/leader", raw, || async {
        let deadline = s.deadline();
        let (tx, rx) = oneshot::channel();
        s.send(RaftInput::Admin(AdminCommand::TransferLeader { id: req.id, reply: tx }))
            .await?;
        rx.await.map_err(|_| ApiError::shutting_down())??;
        let mut status = s.status.clone();
        let moved = matches!(
            s.bounded(deadline, status.wait_for(|st| st.leader_id == req.id)).await,
            Some(Ok(_))
        );
        if moved {
            Ok(Json(TransferResponse { leader_id: req.id }).into_response())
        } else {
            Err(ApiError::new(
                StatusCode::GATEWAY_TIMEOUT,
                codes::TRANSFER_TIMEOUT,
                format!("leadership did not move to member {} before the deadline", req.id),
            ))
        }
    })
    .await
}

pub(super) async fn bootstrap(State(s): State<ApiState>) -> ApiResult {
    let deadline = s.deadline();
    let (tx, rx) = oneshot::channel();
    s.send(RaftInput::Admin(AdminCommand::Bootstrap { reply: tx })).await?;
    let cluster_id = rx.await.map_err(|_| ApiError::shutting_down())??;
    let mut status = s.status.clone();
    let id = status.borrow().id;
    let leading = matches!(
        s.bounded(deadline, status.wait_for(|st| st.leader_id == st.id)).await,
        Some(Ok(_))
    );
    if leading {
        Ok(Json(Bootstrapped { cluster_id, id }).into_response())
    } else {
        Err(ApiError::unknown_outcome())
    }
}
