//! Error answers: a status, a stable code from [`raftkv_api::codes`], a sentence, and the
//! headers that go with them (`Retry-After` on 429, 503 and 504, `Connection: close` when the request
//! body was left unread). The peer port answers its refusals the same way.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use raftkv_api::{codes, ErrorBody};

use crate::inbox::AdminError;

/// An error answer: status, a stable code, and a sentence for humans.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
    retry_after: Option<u64>,
    /// With `precondition_failed`: the key's current revision, `None` when it does not exist.
    current_revision: Option<Option<u64>>,
    /// With `compacted`: the history's compact revision.
    compact_revision: Option<u64>,
    /// The request body was not read to its end, so the connection cannot carry another request:
    /// say so, or a client may reuse it and fail.
    close_connection: bool,
}

impl ApiError {
    pub(crate) fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            code,
            message: message.into(),
            retry_after: None,
            current_revision: None,
            compact_revision: None,
            close_connection: false,
        }
    }

    pub(crate) fn closing(self) -> Self {
        ApiError {
            close_connection: true,
            ..self
        }
    }

    pub(crate) fn bad_request(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, code, message)
    }

    pub(crate) fn unavailable(code: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            retry_after: Some(1),
            ..Self::new(StatusCode::SERVICE_UNAVAILABLE, code, message)
        }
    }

    /// Too much of this kind of request is waiting in the member: `429` with `Retry-After`.
    /// Nothing was proposed.
    pub(crate) fn overloaded(message: impl Into<String>) -> Self {
        ApiError {
            retry_after: Some(1),
            ..Self::new(StatusCode::TOO_MANY_REQUESTS, codes::OVERLOADED, message)
        }
    }

    /// A write proposed but not confirmed before the deadline (usually: no leader to commit
    /// it). A 504, not a 503, because the write may yet be applied; `Retry-After` as for 503.
    pub(crate) fn unknown_outcome() -> Self {
        Self::unknown_outcome_because(
            "the request was proposed but not confirmed before the deadline; it may or may not have been applied",
        )
    }

    /// A `504 unknown_outcome` saying why the outcome is unknown.
    pub(crate) fn unknown_outcome_because(message: impl Into<String>) -> Self {
        ApiError {
            retry_after: Some(1),
            ..Self::new(StatusCode::GATEWAY_TIMEOUT, codes::UNKNOWN_OUTCOME, message)
        }
    }
}

impl ApiError {
    /// A compare-and-swap whose precondition does not hold; `current` is the key's revision,
    /// `None` when the key does not exist.
    pub(crate) fn precondition_failed(current: Option<u64>) -> Self {
        ApiError {
            current_revision: Some(current),
            ..ApiError::new(
                StatusCode::PRECONDITION_FAILED,
                codes::PRECONDITION_FAILED,
                match current {
                    Some(r) => format!("the key's revision is {r}"),
                    None => "the key does not exist".to_string(),
                },
            )
        }
    }

    /// The member is not (or no longer) part of a cluster.
    pub(crate) fn not_member() -> Self {
        ApiError::unavailable(
            codes::NOT_MEMBER,
            "this node is not a member of a cluster (not bootstrapped, not yet added, or removed)",
        )
    }

    /// The member is shutting down (its consensus loop or a reply channel is gone).
    pub(crate) fn shutting_down() -> Self {
        ApiError::unavailable(codes::SHUTTING_DOWN, "the member is shutting down")
    }
}

impl ApiError {
    /// A revision older than the retained history.
    pub(crate) fn compacted(c: crate::history::Compacted) -> Self {
        ApiError {
            compact_revision: Some(c.compact_revision),
            ..ApiError::new(StatusCode::GONE, codes::COMPACTED, c.to_string())
        }
    }

    /// A read at a revision that cannot be served.
    pub(crate) fn revision(e: crate::kv::RevisionError) -> Self {
        match e {
            crate::kv::RevisionError::Compacted(c) => ApiError::compacted(c),
            e @ crate::kv::RevisionError::Future { .. } => ApiError::bad_request(codes::FUTURE_REVISION, e.to_string()),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = ErrorBody {
            current_revision: self.current_revision,
            compact_revision: self.compact_revision,
            ..ErrorBody::new(self.code, self.message)
        };
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
            AdminError::NotLeader { .. } => ApiError::unavailable(codes::NOT_LEADER, message),
            AdminError::ChangePending => ApiError::new(StatusCode::CONFLICT, codes::CHANGE_PENDING, message),
            AdminError::LearnerLagging { .. } => ApiError::new(StatusCode::CONFLICT, codes::LEARNER_LAGGING, message),
            AdminError::WouldLoseQuorum { .. } => {
                ApiError::new(StatusCode::CONFLICT, codes::WOULD_LOSE_QUORUM, message)
            }
            AdminError::IsLeader { .. } => ApiError::new(StatusCode::CONFLICT, codes::IS_LEADER, message),
            AdminError::NotMember { .. } => ApiError::new(StatusCode::NOT_FOUND, codes::NOT_MEMBER, message),
            AdminError::AlreadyMember { .. } => ApiError::new(StatusCode::CONFLICT, codes::ALREADY_MEMBER, message),
            AdminError::IdRemoved { .. } => ApiError::new(StatusCode::CONFLICT, codes::ID_REMOVED, message),
            AdminError::AlreadyInitialized { .. } => {
                ApiError::new(StatusCode::CONFLICT, codes::ALREADY_INITIALIZED, message)
            }
            AdminError::NoPeerUrl => ApiError::new(StatusCode::CONFLICT, codes::NO_PEER_URL, message),
            AdminError::Invalid(_) => ApiError::bad_request(codes::INVALID_REQUEST, message),
            AdminError::Internal(_) => ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, codes::INTERNAL, message),
        }
    }
}

/// What a handler returns.
pub(crate) type ApiResult<T = Response> = Result<T, ApiError>;
