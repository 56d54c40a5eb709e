//! The client and admin HTTP API on the client port (HTTP/1.1 and h2c): key-value calls,
//! status, membership, leadership, bootstrap, health and metrics. The bodies are the types of
//! the `raftkv-api` crate, which the operator and the end-to-end suite read.
//!
//! Every request is validated before anything reaches Raft and has a deadline. A write whose
//! outcome cannot be confirmed within it answers `504 unknown_outcome`, never success. Admin
//! calls reaching a follower are forwarded to the leader over the peer port.
//!
//! # Layout
//! - this module: the routes, the state every handler shares ([`ApiContext`]), and the waits
//!   every call goes through (proposals, read barriers, the leader), all bounded by the
//!   request's deadline and by shutdown;
//! - [`kv`]: the key-value handlers;
//! - [`admin`]: status, health, metrics, membership and leadership handlers;
//! - [`backup`]: the consistent snapshot stream of `GET /v1/snapshot`;
//! - [`forward`]: forwarding admin calls to the leader;
//! - [`request`]: reading bodies and query strings;
//! - [`error`]: error answers.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{MatchedPath, Request, State};
use axum::http::{Method, StatusCode, Uri};
use axum::middleware::{self, Next};
use axum::response::Response;
use axum::routing::{any, get, post};
use axum::Router;
use bytes::Bytes;
use http_body_util::Full;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use raftkv_api::codes;
use tokio::sync::{oneshot, watch};
use tokio::time::Instant;

use crate::command::{self, Op, Proposal};
use crate::inbox::{NotProposed, RaftInput, RaftStatus};
use crate::kv::{ApplyOutcome, MemberRole};
use crate::metrics::{Metrics, RequestLabels};
use crate::state_machine::Shared;

mod admin;
mod backup;
pub mod error;
mod forward;
mod kv;
mod request;

use error::ApiResult;
pub use error::{json_error, ApiError};
pub use kv::{parse_key, parse_precondition};

/// Longest key accepted, in bytes.
pub const MAX_KEY_LEN: usize = 4096;
/// Largest admin request body.
pub(crate) const MAX_ADMIN_BODY: usize = 64 << 10;
/// Default and largest page of a range listing.
pub(crate) const DEFAULT_LIST_LIMIT: usize = 1000;
pub(crate) const MAX_LIST_LIMIT: usize = 10_000;
/// Key and value bytes after which a listing page ends (at least one item is always returned).
pub(crate) const MAX_LIST_BYTES: usize = 4 << 20;

/// Request limits.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Largest value accepted.
    pub max_value_size: usize,
    /// Deadline of every request.
    pub request_timeout: Duration,
    /// How far behind the leader's commit a member may be and still report ready.
    pub max_ready_lag: u64,
}

/// Everything a handler needs.
pub struct ApiContext {
    /// The replicated state.
    pub shared: Arc<Shared>,
    /// The consensus inbox.
    pub inbox: flume::Sender<RaftInput>,
    /// Consensus status, updated every loop iteration.
    pub status: watch::Receiver<RaftStatus>,
    /// Exported figures.
    pub metrics: Arc<Metrics>,
    /// Request limits.
    pub limits: Limits,
    /// This member's advertised peer URL.
    pub advertise_peer_url: Option<String>,
    /// Forwards admin calls to the leader's peer port.
    pub forwarder: Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>,
    /// Cancelled on shutdown: waiting requests answer at once instead of holding shutdown up
    /// until their deadline.
    pub shutdown: tokio_util::sync::CancellationToken,
    /// Set once this process has applied up to a commit index confirmed by a leader: until then
    /// the local copy may be older than what this member served before a restart.
    caught_up: std::sync::atomic::AtomicBool,
    /// Bounds the `GET /v1/snapshot` streams served at once.
    snapshot_streams: Arc<tokio::sync::Semaphore>,
}

/// Shared handler state.
pub type ApiState = Arc<ApiContext>;

impl ApiContext {
    /// Builds the context.
    pub fn new(
        shared: Arc<Shared>,
        inbox: flume::Sender<RaftInput>,
        status: watch::Receiver<RaftStatus>,
        metrics: Arc<Metrics>,
        limits: Limits,
        advertise_peer_url: Option<String>,
        shutdown: tokio_util::sync::CancellationToken,
    ) -> ApiState {
        Arc::new(ApiContext {
            shared,
            inbox,
            status,
            metrics,
            limits,
            advertise_peer_url,
            forwarder: Client::builder(TokioExecutor::new()).build_http(),
            shutdown,
            caught_up: Default::default(),
            snapshot_streams: backup::stream_limit(),
        })
    }
}

/// The client port's routes.
pub fn client_router(state: ApiState) -> Router {
    Router::new()
        .route("/v1/kv", get(kv::list))
        .route("/v1/kv/", any(kv::empty_key))
        .route(
            "/v1/kv/{*key}",
            get(kv::get_key).put(kv::put_key).delete(kv::delete_key),
        )
        .route("/v1/status", get(admin::status))
        .route("/healthz", get(admin::healthz))
        .route("/readyz", get(admin::readyz))
        .route("/metrics", get(admin::metrics))
        .merge(admin_routes())
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(middleware::from_fn_with_state(state.clone(), track_requests))
        .with_state(state)
}

/// The admin routes; also served on the peer port, where followers forward them.
pub fn admin_routes() -> Router<ApiState> {
    Router::new()
        .route("/v1/members", get(admin::list_members).post(admin::add_member))
        .route("/v1/members/{id}", axum::routing::delete(admin::remove_member))
        .route("/v1/members/{id}/promote", post(admin::promote_member))
        .route("/v1/leader", post(admin::transfer_leader))
        .route("/v1/bootstrap", post(admin::bootstrap))
        .route("/v1/snapshot", get(backup::snapshot))
}

async fn track_requests(State(s): State<ApiState>, req: Request, next: Next) -> Response {
    let started = std::time::Instant::now();
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_string(), |p| p.as_str().to_string());
    // Clients may send any method name; only the standard ones become label values, so the
    // number of series stays bounded.
    let method = match *req.method() {
        Method::GET | Method::PUT | Method::POST | Method::DELETE | Method::HEAD | Method::OPTIONS | Method::PATCH => {
            req.method().as_str().to_string()
        }
        _ => "other".to_string(),
    };
    let resp = next.run(req).await;
    s.metrics
        .requests
        .get_or_create(&RequestLabels {
            route,
            method,
            code: resp.status().as_u16(),
        })
        .observe(started.elapsed().as_secs_f64());
    resp
}

async fn not_found(uri: Uri) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        codes::NOT_FOUND,
        format!("no route for {}", uri.path()),
    )
}

async fn method_not_allowed(method: Method, uri: Uri) -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        codes::METHOD_NOT_ALLOWED,
        format!("{method} is not allowed on {}", uri.path()),
    )
}

impl ApiContext {
    /// When a request that starts now must be answered.
    pub(crate) fn deadline(&self) -> Instant {
        Instant::now() + self.limits.request_timeout
    }

    /// Awaits `fut` until `deadline`; `None` on timeout or shutdown. Every wait of a request
    /// goes through here, so shutdown answers waiting requests at once.
    pub(crate) async fn bounded<F: std::future::Future>(&self, deadline: Instant, fut: F) -> Option<F::Output> {
        tokio::select! {
            r = tokio::time::timeout_at(deadline, fut) => r.ok(),
            _ = self.shutdown.cancelled() => None,
        }
    }

    /// Waits until a leader is known, or answers `503 no_leader`.
    pub(crate) async fn wait_for_leader(&self, deadline: Instant) -> ApiResult<()> {
        let mut status = self.status.clone();
        let known = matches!(
            self.bounded(deadline, status.wait_for(|s| s.leader_id != 0)).await,
            Some(Ok(_))
        );
        if known {
            Ok(())
        } else {
            Err(ApiError::unavailable(
                codes::NO_LEADER,
                "no leader was elected before the deadline; retry later",
            ))
        }
    }

    /// Proposes a write and waits until it is applied here.
    pub(crate) async fn propose(&self, op: Op) -> ApiResult<ApplyOutcome> {
        let deadline = self.deadline();
        let (request_id, applied) = self.shared.waiters.register();
        let _cancel = CancelOnDrop(&self.shared, request_id);
        let data = command::encode(&Proposal { request_id, op });
        loop {
            let (tx, rx) = oneshot::channel();
            self.send(RaftInput::Propose {
                data: data.clone(),
                reply: tx,
            })
            .await?;
            match rx.await {
                Ok(Ok(())) => break,
                Ok(Err(NotProposed::NotMember)) => return Err(ApiError::not_member()),
                Ok(Err(NotProposed::NoLeader)) => self.wait_for_leader(deadline).await?,
                Ok(Err(NotProposed::Dropped)) | Err(_) => {
                    // Nothing was appended; retry shortly (a leadership transfer is the usual cause).
                    if Instant::now() + Duration::from_millis(25) >= deadline {
                        return Err(ApiError::unavailable(
                            codes::NO_LEADER,
                            "the leader refused the write; retry later",
                        ));
                    }
                    tokio::time::sleep(Duration::from_millis(25)).await;
                }
            }
        }
        // From here on the entry may be in the log: any failure to confirm is an unknown outcome.
        match self.bounded(deadline, applied).await {
            Some(Ok(outcome)) => Ok(outcome),
            _ => Err(ApiError::unknown_outcome()),
        }
    }

    /// Waits until this member has applied everything committed when the read began (ReadIndex).
    pub(crate) async fn read_barrier(&self) -> ApiResult<()> {
        let deadline = self.deadline();
        let timeout = || {
            ApiError::unavailable(
                codes::READ_TIMEOUT,
                "the read could not be confirmed with the leader before the deadline",
            )
        };
        loop {
            let (tx, rx) = oneshot::channel();
            self.send(RaftInput::ReadIndex { reply: tx }).await?;
            match self.bounded(deadline, rx).await {
                None => return Err(timeout()),
                Some(Err(_)) => return Err(ApiError::shutting_down()),
                Some(Ok(Err(NotProposed::NotMember))) => return Err(ApiError::not_member()),
                Some(Ok(Err(_))) => self.wait_for_leader(deadline).await?,
                Some(Ok(Ok(index))) => {
                    let mut applied = self.shared.applied.subscribe();
                    let caught_up = matches!(
                        self.bounded(deadline, applied.wait_for(|a| *a >= index)).await,
                        Some(Ok(_))
                    );
                    return if caught_up { Ok(()) } else { Err(timeout()) };
                }
            }
        }
    }

    /// Before the first stale read of this process: one read-index round. A restarted member
    /// recovers its snapshot and the commit index last written, which can lie below what it had
    /// applied and served before the crash; stale reads must not go backwards, so they are served
    /// once this process has applied up to a commit index the leader confirmed.
    pub(crate) async fn stale_read_barrier(&self) -> ApiResult<()> {
        use std::sync::atomic::Ordering;
        if !self.caught_up.load(Ordering::Relaxed) {
            self.read_barrier().await?;
            self.caught_up.store(true, Ordering::Relaxed);
        }
        Ok(())
    }

    /// Hands `input` to the consensus thread.
    pub(crate) async fn send(&self, input: RaftInput) -> ApiResult<()> {
        self.inbox
            .send_async(input)
            .await
            .map_err(|_| ApiError::shutting_down())
    }

    /// Refuses a call that needs this member to belong to a cluster.
    pub(crate) fn ensure_member(&self) -> ApiResult<()> {
        match self.status.borrow().membership {
            MemberRole::Voter | MemberRole::Learner => Ok(()),
            _ => Err(ApiError::not_member()),
        }
    }
}

/// Forgets a request's waiter when its handler ends, however it ends.
pub(crate) struct CancelOnDrop<'a>(&'a Shared, u64);

impl Drop for CancelOnDrop<'_> {
    fn drop(&mut self) {
        self.0.waiters.cancel(self.1);
    }
}
