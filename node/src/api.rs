//! The client and admin HTTP API on the client port (HTTP/1.1 and h2c), as specified in
//! DESIGN.md: key-value calls, status, membership, leadership, bootstrap, health and metrics.
//!
//! Every request is validated before anything reaches Raft and has a deadline. A write whose
//! outcome cannot be confirmed within it answers `504 unknown_outcome`, never success. Admin calls
//! reaching a follower are forwarded to the leader over the peer port.

use std::ops::Bound;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{MatchedPath, Path, Query, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode, Uri};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get, post};
use axum::{Json, Router};
use base64::Engine;
use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio::sync::{oneshot, watch};
use tokio::time::Instant;

use crate::command::{self, Op, Precondition, Proposal};
use crate::consensus::{AdminCommand, AdminError, NotProposed, RaftInput, RaftStatus, Role};
use crate::kv::{ApplyOutcome, MemberRole, Membership};
use crate::metrics::{Metrics, RequestLabels};
use crate::state_machine::Shared;

/// Longest key accepted, in bytes.
pub const MAX_KEY_LEN: usize = 4096;
/// Largest admin request body.
const MAX_ADMIN_BODY: usize = 64 << 10;
/// Default and largest page of a range listing.
const DEFAULT_LIST_LIMIT: usize = 1000;
const MAX_LIST_LIMIT: usize = 10_000;
/// Key and value bytes after which a listing page ends (at least one item is always returned).
const MAX_LIST_BYTES: usize = 4 << 20;
/// Marks a request forwarded by another member, so it is never forwarded twice.
const FORWARDED_HEADER: &str = "x-raftkv-forwarded";

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
        })
    }
}

/// An error answer: status, a stable code, and a sentence for humans.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
    retry_after: Option<u64>,
    extra: Option<(&'static str, serde_json::Value)>,
    /// The request body was not read to its end, so the connection cannot carry another request:
    /// say so, or a client may reuse it and fail.
    close_connection: bool,
}

impl ApiError {
    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            code,
            message: message.into(),
            retry_after: None,
            extra: None,
            close_connection: false,
        }
    }

    fn closing(self) -> Self {
        ApiError {
            close_connection: true,
            ..self
        }
    }

    fn bad_request(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, code, message)
    }

    fn unavailable(code: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            retry_after: Some(1),
            ..Self::new(StatusCode::SERVICE_UNAVAILABLE, code, message)
        }
    }

    /// A write proposed but not confirmed before the deadline (usually: no leader to commit
    /// it). A 504, not a 503, because the write may yet be applied; `Retry-After` as for 503.
    fn unknown_outcome() -> Self {
        ApiError {
            retry_after: Some(1),
            ..Self::new(
                StatusCode::GATEWAY_TIMEOUT,
                "unknown_outcome",
                "the request was proposed but not confirmed before the deadline; it may or may not have been applied",
            )
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut body = json!({"error": self.code, "message": self.message});
        if let Some((k, v)) = self.extra {
            body[k] = v;
        }
        let mut resp = (self.status, Json(body)).into_response();
        if let Some(secs) = self.retry_after {
            resp.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        if self.close_connection {
            resp.headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        resp
    }
}

/// A JSON error response, for the peer server too.
pub fn json_error(status: StatusCode, code: &'static str, message: impl Into<String>) -> Response {
    ApiError::new(status, code, message).into_response()
}

impl From<AdminError> for ApiError {
    fn from(e: AdminError) -> Self {
        let message = e.to_string();
        match e {
            AdminError::NotLeader { .. } => ApiError::unavailable("not_leader", message),
            AdminError::ChangePending => ApiError::new(StatusCode::CONFLICT, "change_pending", message),
            AdminError::LearnerLagging { .. } => ApiError::new(StatusCode::CONFLICT, "learner_lagging", message),
            AdminError::WouldLoseQuorum { .. } => ApiError::new(StatusCode::CONFLICT, "would_lose_quorum", message),
            AdminError::IsLeader { .. } => ApiError::new(StatusCode::CONFLICT, "is_leader", message),
            AdminError::NotMember { .. } => ApiError::new(StatusCode::NOT_FOUND, "not_member", message),
            AdminError::AlreadyMember { .. } => ApiError::new(StatusCode::CONFLICT, "already_member", message),
            AdminError::IdRemoved { .. } => ApiError::new(StatusCode::CONFLICT, "id_removed", message),
            AdminError::AlreadyInitialized { .. } => {
                ApiError::new(StatusCode::CONFLICT, "already_initialized", message)
            }
            AdminError::NoPeerUrl => ApiError::new(StatusCode::CONFLICT, "no_peer_url", message),
            AdminError::Invalid(_) => ApiError::bad_request("invalid_request", message),
            AdminError::Internal(_) => ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", message),
        }
    }
}

type ApiResult<T = Response> = Result<T, ApiError>;

/// The client port's routes.
pub fn client_router(state: ApiState) -> Router {
    Router::new()
        .route("/v1/kv", get(list))
        .route("/v1/kv/", any(empty_key))
        .route("/v1/kv/{*key}", get(get_key).put(put_key).delete(delete_key))
        .route("/v1/status", get(status))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .merge(admin_routes())
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(middleware::from_fn_with_state(state.clone(), track_requests))
        .with_state(state)
}

/// The admin routes; also served on the peer port, where followers forward them.
pub fn admin_routes() -> Router<ApiState> {
    Router::new()
        .route("/v1/members", get(list_members).post(add_member))
        .route("/v1/members/{id}", axum::routing::delete(remove_member))
        .route("/v1/members/{id}/promote", post(promote_member))
        .route("/v1/leader", post(transfer_leader))
        .route("/v1/bootstrap", post(bootstrap))
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
        "not_found",
        format!("no route for {}", uri.path()),
    )
}

async fn method_not_allowed(method: Method, uri: Uri) -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        format!("{method} is not allowed on {}", uri.path()),
    )
}

async fn empty_key() -> ApiError {
    ApiError::bad_request("invalid_key", "the key is empty; keys are 1 to 4096 bytes")
}

/// Decodes the key from the raw path, strictly: a malformed escape is an error, not a literal.
pub fn parse_key(path: &str) -> Result<Bytes, ApiError> {
    let raw = path.strip_prefix("/v1/kv/").unwrap_or_default().as_bytes();
    let mut key = Vec::with_capacity(raw.len());
    let mut i = 0;
    while i < raw.len() {
        if raw[i] == b'%' {
            let hex = raw.get(i + 1..i + 3).and_then(|h| std::str::from_utf8(h).ok());
            let byte = hex.and_then(|h| u8::from_str_radix(h, 16).ok()).ok_or_else(|| {
                ApiError::bad_request(
                    "invalid_key",
                    format!("malformed percent-encoding at byte {i} of the key"),
                )
            })?;
            key.push(byte);
            i += 3;
        } else {
            key.push(raw[i]);
            i += 1;
        }
    }
    if key.is_empty() || key.len() > MAX_KEY_LEN {
        return Err(ApiError::bad_request(
            "invalid_key",
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
            "invalid_precondition",
            "If-Match and If-None-Match cannot be combined",
        )),
        (None, None) => Ok(Precondition::None),
        (None, Some(v)) => match v.to_str().map(str::trim) {
            Ok("*") => Ok(Precondition::Absent),
            _ => Err(ApiError::bad_request(
                "invalid_precondition",
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
                        "invalid_precondition",
                        format!("If-Match must be a quoted revision like \"42\" or *, got {v:?}"),
                    )
                })
        }
    }
}

/// Reads a body of at most `limit` bytes within the request deadline, refusing early when
/// `Content-Length` announces more; a body that trickles in past the deadline is cut off (408).
async fn read_body(body: Body, headers: &HeaderMap, limit: usize, deadline: Duration) -> ApiResult<Bytes> {
    let too_large = || {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "too_large",
            format!("the body exceeds the limit of {limit} bytes"),
        )
        .closing()
    };
    if let Some(len) = headers.get(header::CONTENT_LENGTH) {
        let len: u64 = len
            .to_str()
            .ok()
            .and_then(|l| l.parse().ok())
            .ok_or_else(|| ApiError::bad_request("invalid_request", "malformed Content-Length").closing())?;
        if len > limit as u64 {
            return Err(too_large());
        }
    }
    let collected = tokio::time::timeout(deadline, Limited::new(body, limit).collect())
        .await
        .map_err(|_| {
            ApiError::new(
                StatusCode::REQUEST_TIMEOUT,
                "body_timeout",
                "the request body did not arrive before the deadline",
            )
            .closing()
        })?;
    match collected {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) if e.downcast_ref::<http_body_util::LengthLimitError>().is_some() => Err(too_large()),
        Err(e) => Err(ApiError::bad_request("invalid_body", format!("reading the body failed: {e}")).closing()),
    }
}

async fn read_json<T: for<'de> Deserialize<'de>>(s: &ApiContext, body: Body, headers: &HeaderMap) -> ApiResult<T> {
    let bytes = read_body(body, headers, MAX_ADMIN_BODY, s.limits.request_timeout).await?;
    serde_json::from_slice(&bytes)
        .map_err(|e| ApiError::bad_request("invalid_json", format!("malformed request body: {e}")))
}

impl ApiContext {
    fn deadline(&self) -> Instant {
        Instant::now() + self.limits.request_timeout
    }

    /// Awaits `fut` until `deadline`; `None` on timeout or shutdown.
    async fn bounded<F: std::future::Future>(&self, deadline: Instant, fut: F) -> Option<F::Output> {
        tokio::select! {
            r = tokio::time::timeout_at(deadline, fut) => r.ok(),
            _ = self.shutdown.cancelled() => None,
        }
    }

    async fn wait_for_leader(&self, deadline: Instant) -> ApiResult<()> {
        let mut status = self.status.clone();
        let known = matches!(
            tokio::time::timeout_at(deadline, status.wait_for(|s| s.leader_id != 0)).await,
            Ok(Ok(_))
        );
        if known {
            Ok(())
        } else {
            Err(ApiError::unavailable(
                "no_leader",
                "no leader was elected before the deadline; retry later",
            ))
        }
    }

    /// Proposes a write and waits until it is applied here.
    async fn propose(&self, op: Op) -> ApiResult<ApplyOutcome> {
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
                Ok(Err(NotProposed::NotMember)) => return Err(not_member()),
                Ok(Err(NotProposed::NoLeader)) => self.wait_for_leader(deadline).await?,
                Ok(Err(NotProposed::Dropped)) | Err(_) => {
                    // Nothing was appended; retry shortly (a leadership transfer is the usual cause).
                    if Instant::now() + Duration::from_millis(25) >= deadline {
                        return Err(ApiError::unavailable(
                            "no_leader",
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
    async fn read_barrier(&self) -> ApiResult<()> {
        let deadline = self.deadline();
        let timeout = || {
            ApiError::unavailable(
                "read_timeout",
                "the read could not be confirmed with the leader before the deadline",
            )
        };
        loop {
            let (tx, rx) = oneshot::channel();
            self.send(RaftInput::ReadIndex { reply: tx }).await?;
            match self.bounded(deadline, rx).await {
                None => return Err(timeout()),
                Some(Err(_)) => return Err(ApiError::unavailable("shutting_down", "the member is shutting down")),
                Some(Ok(Err(NotProposed::NotMember))) => return Err(not_member()),
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
    async fn stale_read_barrier(&self) -> ApiResult<()> {
        use std::sync::atomic::Ordering;
        if !self.caught_up.load(Ordering::Relaxed) {
            self.read_barrier().await?;
            self.caught_up.store(true, Ordering::Relaxed);
        }
        Ok(())
    }

    async fn send(&self, input: RaftInput) -> ApiResult<()> {
        self.inbox
            .send_async(input)
            .await
            .map_err(|_| ApiError::unavailable("shutting_down", "the member is shutting down"))
    }

    fn ensure_member(&self) -> ApiResult<()> {
        match self.status.borrow().membership {
            MemberRole::Voter | MemberRole::Learner => Ok(()),
            _ => Err(not_member()),
        }
    }
}

fn not_member() -> ApiError {
    ApiError::unavailable(
        "not_member",
        "this node is not a member of a cluster (not bootstrapped, not yet added, or removed)",
    )
}

struct CancelOnDrop<'a>(&'a Shared, u64);

impl Drop for CancelOnDrop<'_> {
    fn drop(&mut self) {
        self.0.waiters.cancel(self.1);
    }
}

/// Query parameters whose rejection is a JSON error like every other bad input (axum's own
/// `Query` rejection is plain text).
struct ClientQuery<T>(T);

impl<T: serde::de::DeserializeOwned, S: Send + Sync> axum::extract::FromRequestParts<S> for ClientQuery<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut http::request::Parts, state: &S) -> Result<Self, Self::Rejection> {
        Query::<T>::from_request_parts(parts, state)
            .await
            .map(|Query(q)| ClientQuery(q))
            .map_err(|rejection| ApiError::bad_request("invalid_query", rejection.body_text()))
    }
}

#[derive(Deserialize)]
struct ReadParams {
    #[serde(default)]
    stale: bool,
}

async fn get_key(State(s): State<ApiState>, uri: Uri, ClientQuery(q): ClientQuery<ReadParams>) -> ApiResult {
    let key = parse_key(uri.path())?;
    s.ensure_member()?;
    if q.stale {
        s.stale_read_barrier().await?;
    } else {
        s.read_barrier().await?;
    }
    let state = s.shared.state.read();
    let Some(v) = state.data.get(&key) else {
        return Err(ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such key"));
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
    h.insert("x-raftkv-revision", HeaderValue::from(state.applied_index));
    Ok(resp)
}

async fn put_key(State(s): State<ApiState>, uri: Uri, headers: HeaderMap, body: Body) -> ApiResult {
    let key = parse_key(uri.path())?;
    let precondition = parse_precondition(&headers)?;
    let value = read_body(body, &headers, s.limits.max_value_size, s.limits.request_timeout).await?;
    s.ensure_member()?;
    let outcome = s
        .propose(Op::Put {
            key,
            value,
            precondition,
        })
        .await?;
    write_response(outcome)
}

async fn delete_key(State(s): State<ApiState>, uri: Uri, headers: HeaderMap) -> ApiResult {
    let key = parse_key(uri.path())?;
    let precondition = parse_precondition(&headers)?;
    if precondition == Precondition::Absent {
        return Err(ApiError::bad_request(
            "invalid_precondition",
            "If-None-Match does not apply to DELETE",
        ));
    }
    s.ensure_member()?;
    let outcome = s.propose(Op::Delete { key, precondition }).await?;
    write_response(outcome)
}

fn write_response(outcome: ApplyOutcome) -> ApiResult {
    match outcome {
        ApplyOutcome::Put { revision } => Ok(Json(json!({ "revision": revision })).into_response()),
        ApplyOutcome::Delete { revision, deleted } => {
            Ok(Json(json!({ "revision": revision, "deleted": deleted })).into_response())
        }
        ApplyOutcome::PreconditionFailed { current } => Err(ApiError {
            extra: Some(("current_revision", json!(current))),
            ..ApiError::new(
                StatusCode::PRECONDITION_FAILED,
                "precondition_failed",
                match current {
                    Some(r) => format!("the key's revision is {r}"),
                    None => "the key does not exist".to_string(),
                },
            )
        }),
        ApplyOutcome::Membership | ApplyOutcome::Rejected(_) => Err(ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "the write was applied as something else",
        )),
    }
}

#[derive(Deserialize)]
struct ListParams {
    #[serde(default)]
    prefix: String,
    limit: Option<usize>,
    start_after: Option<String>,
    #[serde(default)]
    stale: bool,
}

#[derive(Serialize)]
struct ListItem {
    #[serde(skip_serializing_if = "Option::is_none")]
    key: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    key_base64: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    value: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    value_base64: Option<String>,
    revision: u64,
    create_revision: u64,
}

fn text_or_base64(bytes: &[u8]) -> (Option<String>, Option<String>) {
    match std::str::from_utf8(bytes) {
        Ok(s) => (Some(s.to_string()), None),
        Err(_) => (None, Some(base64::engine::general_purpose::STANDARD.encode(bytes))),
    }
}

async fn list(State(s): State<ApiState>, ClientQuery(q): ClientQuery<ListParams>) -> ApiResult {
    let limit = q.limit.unwrap_or(DEFAULT_LIST_LIMIT);
    if limit == 0 || limit > MAX_LIST_LIMIT {
        return Err(ApiError::bad_request(
            "invalid_limit",
            format!("limit must be 1 to {MAX_LIST_LIMIT}"),
        ));
    }
    s.ensure_member()?;
    if q.stale {
        s.stale_read_barrier().await?;
    } else {
        s.read_barrier().await?;
    }
    let prefix = Bytes::from(q.prefix.into_bytes());
    // An O(1) clone of the persistent map: the page is built and encoded without holding the
    // lock the apply loop needs.
    let (data, revision) = {
        let state = s.shared.state.read();
        (state.data.clone(), state.applied_index)
    };
    let lower = match q.start_after {
        Some(after) if after.as_bytes() >= prefix.as_ref() => Bound::Excluded(Bytes::from(after.into_bytes())),
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
    Ok(Json(json!({"items": items, "more": more, "revision": revision})).into_response())
}

fn own_peer_url(s: &ApiContext, status: &RaftStatus) -> Option<String> {
    status
        .members
        .peer_urls
        .get(&status.id)
        .cloned()
        .or_else(|| s.advertise_peer_url.clone())
}

async fn status(State(s): State<ApiState>) -> Json<serde_json::Value> {
    let st = s.status.borrow().clone();
    let applied = *s.shared.applied.borrow();
    let ready = readiness(&s, &st, applied).is_ok();
    Json(json!({
        "id": st.id,
        "cluster_id": st.cluster_id,
        "role": st.role,
        "term": st.term,
        "leader_id": st.leader_id,
        "commit_index": st.commit_index,
        "applied_index": applied,
        "snapshot_index": st.snapshot_index,
        "membership": st.membership,
        "joint": st.members.is_joint(),
        "peer_url": own_peer_url(&s, &st),
        "ready": ready,
    }))
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

async fn healthz(State(s): State<ApiState>) -> ApiResult {
    if s.inbox.is_disconnected() {
        return Err(ApiError::unavailable("unhealthy", "the consensus loop has stopped"));
    }
    Ok(Json(json!({"status": "ok"})).into_response())
}

async fn readyz(State(s): State<ApiState>) -> ApiResult {
    let st = s.status.borrow().clone();
    let applied = *s.shared.applied.borrow();
    readiness(&s, &st, applied).map_err(|reason| ApiError::unavailable("not_ready", reason))?;
    Ok(Json(json!({"status": "ready"})).into_response())
}

async fn metrics(State(s): State<ApiState>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        s.metrics.encode(),
    )
        .into_response()
}

/// Sends an admin call to the leader's peer port when this member is not the leader.
/// Returns `None` when this member should handle it.
async fn forward_to_leader(
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
            "not_leader",
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
            "no_leader",
            "the leader's address is not known yet; retry",
        ));
    };
    let req = hyper::Request::builder()
        .method(method)
        .uri(format!("{}{path}", url.trim_end_matches('/')))
        .header(FORWARDED_HEADER, "1")
        .header(header::CONTENT_TYPE, "application/json")
        .body(Full::new(body))
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()))?;
    let resp = tokio::time::timeout(
        s.limits.request_timeout + Duration::from_secs(1),
        s.forwarder.request(req),
    )
    .await
    .map_err(|_| ApiError::unknown_outcome())?
    .map_err(|e| ApiError::unavailable("leader_unreachable", format!("forwarding to the leader failed: {e}")))?;
    let (parts, body) = resp.into_parts();
    let body = body
        .collect()
        .await
        .map_err(|e| ApiError::unavailable("leader_unreachable", format!("reading the leader's answer failed: {e}")))?
        .to_bytes();
    Ok(Some(Response::from_parts(parts, Body::from(body))))
}

#[derive(Serialize)]
struct MemberView {
    id: u64,
    peer_url: Option<String>,
    role: MemberRole,
    match_index: Option<u64>,
    healthy: Option<bool>,
}

fn members_json(st: &RaftStatus, membership: &Membership) -> serde_json::Value {
    let members: Vec<MemberView> = membership
        .member_ids()
        .into_iter()
        .map(|id| {
            let progress = st.progress.get(&id);
            MemberView {
                id,
                peer_url: membership.peer_urls.get(&id).cloned(),
                role: membership.role_of(id),
                match_index: progress.map(|p| p.match_index),
                healthy: progress.map(|p| p.recent_active),
            }
        })
        .collect();
    json!({"cluster_id": st.cluster_id, "leader_id": st.leader_id, "members": members})
}

async fn list_members(State(s): State<ApiState>, headers: HeaderMap) -> ApiResult {
    if s.status.borrow().leader_id != 0 {
        if let Ok(Some(resp)) = forward_to_leader(&s, &headers, Method::GET, "/v1/members", Bytes::new()).await {
            return Ok(resp);
        }
    }
    // No leader, or it could not be reached: the applied membership, without progress.
    let st = s.status.borrow().clone();
    let membership = s.shared.state.read().membership.clone();
    Ok(Json(members_json(&st, &membership)).into_response())
}

#[derive(Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct AddMemberRequest {
    id: u64,
    peer_url: String,
    #[serde(default = "default_true")]
    learner: bool,
}

fn default_true() -> bool {
    true
}

fn validate_peer_url(url: &str) -> ApiResult<()> {
    let uri: Uri = url
        .parse()
        .map_err(|e| ApiError::bad_request("invalid_peer_url", format!("peer_url {url:?} is not a URL: {e}")))?;
    if uri.scheme_str() != Some("http") || uri.host().is_none() {
        return Err(ApiError::bad_request(
            "invalid_peer_url",
            format!("peer_url {url:?} must be http://host:port"),
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
    rx.await
        .map_err(|_| ApiError::unavailable("shutting_down", "the member is shutting down"))??;
    // raft-rs silently drops a conf change it cannot take; confirm from the applied configuration.
    let confirmed = matches!(s.bounded(deadline, done).await, Some(Ok(_)));
    let st = s.status.borrow().clone();
    let membership = s.shared.state.read().membership.clone();
    if confirmed || applied(&membership) {
        Ok(Json(members_json(&st, &membership)).into_response())
    } else {
        Err(ApiError::unknown_outcome())
    }
}

async fn add_member(State(s): State<ApiState>, headers: HeaderMap, body: Body) -> ApiResult {
    let req: AddMemberRequest = read_json(&s, body, &headers).await?;
    validate_peer_url(&req.peer_url)?;
    let raw = Bytes::from(serde_json::to_vec(&req).expect("serialize request"));
    if let Some(resp) = forward_to_leader(&s, &headers, Method::POST, "/v1/members", raw).await? {
        return Ok(resp);
    }
    let (id, learner) = (req.id, req.learner);
    membership_change(
        &s,
        |request_id, reply| AdminCommand::AddMember {
            id: req.id,
            peer_url: req.peer_url,
            learner: req.learner,
            request_id,
            reply,
        },
        |m| {
            m.role_of(id)
                == if learner {
                    MemberRole::Learner
                } else {
                    MemberRole::Voter
                }
        },
    )
    .await
}

fn parse_id(raw: &str) -> ApiResult<u64> {
    raw.parse::<u64>()
        .ok()
        .filter(|id| *id > 0)
        .ok_or_else(|| ApiError::bad_request("invalid_id", format!("{raw:?} is not a member id")))
}

async fn promote_member(State(s): State<ApiState>, headers: HeaderMap, Path(raw): Path<String>) -> ApiResult {
    let id = parse_id(&raw)?;
    if let Some(resp) = forward_to_leader(
        &s,
        &headers,
        Method::POST,
        &format!("/v1/members/{id}/promote"),
        Bytes::new(),
    )
    .await?
    {
        return Ok(resp);
    }
    membership_change(
        &s,
        |request_id, reply| AdminCommand::Promote { id, request_id, reply },
        |m| m.role_of(id) == MemberRole::Voter,
    )
    .await
}

async fn remove_member(State(s): State<ApiState>, headers: HeaderMap, Path(raw): Path<String>) -> ApiResult {
    let id = parse_id(&raw)?;
    if let Some(resp) =
        forward_to_leader(&s, &headers, Method::DELETE, &format!("/v1/members/{id}"), Bytes::new()).await?
    {
        return Ok(resp);
    }
    membership_change(
        &s,
        |request_id, reply| AdminCommand::Remove { id, request_id, reply },
        |m| m.role_of(id) == MemberRole::Removed,
    )
    .await
}

#[derive(Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct TransferRequest {
    id: u64,
}

async fn transfer_leader(State(s): State<ApiState>, headers: HeaderMap, body: Body) -> ApiResult {
    let req: TransferRequest = read_json(&s, body, &headers).await?;
    let raw = Bytes::from(serde_json::to_vec(&req).expect("serialize request"));
    if let Some(resp) = forward_to_leader(&s, &headers, Method::POST, "/v1/leader", raw).await? {
        return Ok(resp);
    }
    let deadline = s.deadline();
    let (tx, rx) = oneshot::channel();
    s.send(RaftInput::Admin(AdminCommand::TransferLeader { id: req.id, reply: tx }))
        .await?;
    rx.await
        .map_err(|_| ApiError::unavailable("shutting_down", "the member is shutting down"))??;
    let mut status = s.status.clone();
    let moved = matches!(
        tokio::time::timeout_at(deadline, status.wait_for(|st| st.leader_id == req.id)).await,
        Ok(Ok(_))
    );
    match moved {
        true => Ok(Json(json!({"leader_id": req.id})).into_response()),
        false => Err(ApiError::new(
            StatusCode::GATEWAY_TIMEOUT,
            "transfer_timeout",
            format!("leadership did not move to member {} before the deadline", req.id),
        )),
    }
}

async fn bootstrap(State(s): State<ApiState>) -> ApiResult {
    let deadline = s.deadline();
    let (tx, rx) = oneshot::channel();
    s.send(RaftInput::Admin(AdminCommand::Bootstrap { reply: tx })).await?;
    let cluster_id = rx
        .await
        .map_err(|_| ApiError::unavailable("shutting_down", "the member is shutting down"))??;
    let mut status = s.status.clone();
    let id = status.borrow().id;
    let leading = matches!(
        tokio::time::timeout_at(deadline, status.wait_for(|st| st.leader_id == st.id)).await,
        Ok(Ok(_))
    );
    if leading {
        Ok(Json(json!({"cluster_id": cluster_id, "id": id})).into_response())
    } else {
        Err(ApiError::unknown_outcome())
    }
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
