//! Errors of the simulated control plane.
//!
//! [`ApiError`] is what a Kubernetes API server answers with: an HTTP code plus a `Status`
//! object carrying a machine-readable `reason`. [`Error`] is the library's error type for
//! everything else (binding sockets, spawning pod processes, writing files).

use serde_json::{json, Value};

/// Result of the library's fallible operations.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// A failure of the simulated cluster outside the API request path.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An API operation was refused; carries the status the server would answer with.
    #[error(transparent)]
    Api(#[from] ApiError),
    /// Host I/O failed: binding the listener, creating pod directories, writing logs.
    #[error("{context}: {source}")]
    Io {
        /// What was being done when the error happened.
        context: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// A pod asked for an image that the image table does not map to a host binary.
    #[error("no host binary is mapped for image {0:?}")]
    UnmappedImage(String),
    /// A pod's claim has no usable volume yet (missing, unbound, or its volume is gone).
    #[error("volume not ready: {0}")]
    VolumeNotReady(String),
    /// Encoding or decoding JSON failed.
    #[error(transparent)]
    Json(#[from] serde_json::Error),
    /// A kubectl invocation failed.
    #[error("kubectl {args} failed ({status}): {stderr}")]
    Kubectl {
        /// The arguments, joined by spaces.
        args: String,
        /// The exit status.
        status: String,
        /// What kubectl wrote to stderr.
        stderr: String,
    },
    /// A condition awaited with [`crate::eventually`] did not hold in time.
    #[error("timed out after {0:?} waiting for {1}")]
    Timeout(std::time::Duration, String),
    /// Building a kube-rs client for the simulated server failed.
    #[error("building a kube client: {0}")]
    Kube(String),
}

impl Error {
    /// Wraps an I/O error with a description of what was being attempted.
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Error::Io {
            context: context.into(),
            source,
        }
    }
}

/// An API error, rendered to clients as a `meta/v1 Status` object.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{code} {reason}: {message}")]
pub struct ApiError {
    /// HTTP status code (404, 409, 410, 422, ...).
    pub code: u16,
    /// The `Status.reason` Kubernetes uses for this failure (`NotFound`, `Conflict`, ...).
    pub reason: &'static str,
    /// Human-readable message, in the wording kubectl users know.
    pub message: String,
    /// `Status.details`: the name and kind (resource plural) concerned, when known.
    pub details: Option<(String, String, String)>,
}

impl ApiError {
    fn new(code: u16, reason: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            code,
            reason,
            message: message.into(),
            details: None,
        }
    }

    fn with_details(mut self, group: &str, resource: &str, name: &str) -> Self {
        self.details = Some((group.to_string(), resource.to_string(), name.to_string()));
        self
    }

    /// 404: the object does not exist.
    pub fn not_found(group: &str, resource: &str, name: &str) -> Self {
        Self::new(
            404,
            "NotFound",
            format!("{} \"{name}\" not found", qualified(group, resource)),
        )
        .with_details(group, resource, name)
    }

    /// 404: the URL names no resource this server knows.
    pub fn no_route(path: &str) -> Self {
        Self::new(
            404,
            "NotFound",
            format!("the server could not find the requested resource ({path})"),
        )
    }

    /// 409: a create found an object with the same name.
    pub fn already_exists(group: &str, resource: &str, name: &str) -> Self {
        Self::new(
            409,
            "AlreadyExists",
            format!("{} \"{name}\" already exists", qualified(group, resource)),
        )
        .with_details(group, resource, name)
    }

    /// 409: an update carried a stale `resourceVersion` or failed a precondition.
    pub fn conflict(group: &str, resource: &str, name: &str, why: &str) -> Self {
        Self::new(
            409,
            "Conflict",
            format!(
                "Operation cannot be fulfilled on {} \"{name}\": {why}",
                qualified(group, resource)
            ),
        )
        .with_details(group, resource, name)
    }

    /// 410: a watch or list asked for a resourceVersion older than the retained history.
    pub fn gone(rv: u64, oldest: u64) -> Self {
        Self::new(410, "Expired", format!("too old resource version: {rv} ({oldest})"))
    }

    /// 400: the request is malformed.
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(400, "BadRequest", message)
    }

    /// 422: the object is invalid.
    pub fn invalid(group: &str, resource: &str, name: &str, why: &str) -> Self {
        Self::new(
            422,
            "Invalid",
            format!("{} \"{name}\" is invalid: {why}", qualified(group, resource)),
        )
        .with_details(group, resource, name)
    }

    /// 405: the verb is not supported on this path.
    pub fn method_not_allowed(message: impl Into<String>) -> Self {
        Self::new(405, "MethodNotAllowed", message)
    }

    /// 415: the patch content type is not supported for this resource.
    pub fn unsupported_media_type(content_type: &str) -> Self {
        Self::new(
            415,
            "UnsupportedMediaType",
            format!("the body of the request was in an unknown format - accepted media types include: application/json-patch+json, application/merge-patch+json, application/apply-patch+yaml (got {content_type:?})"),
        )
    }

    /// 403: the namespace is being deleted and refuses new objects, or RBAC denies the request.
    pub fn forbidden(message: impl Into<String>) -> Self {
        Self::new(403, "Forbidden", message)
    }

    /// The `Status` object sent to clients.
    pub fn to_status(&self) -> Value {
        let mut status = json!({
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "code": self.code,
        });
        if let Some((group, kind, name)) = &self.details {
            status["details"] = json!({"name": name, "group": group, "kind": kind});
        }
        status
    }
}

fn qualified(group: &str, resource: &str) -> String {
    if group.is_empty() {
        resource.to_string()
    } else {
        format!("{resource}.{group}")
    }
}
