//! The operator's one error type.
//!
//! Every fallible function in the crate returns [`Result`]. The variants separate what the
//! reconciler must treat differently: Kubernetes API failures (retried with backoff), a node that
//! answered with a refusal (often a reason to wait rather than fail), and an invalid spec (reported
//! in status and never retried until the object changes).

use std::time::Duration;

/// Errors raised while reconciling a `RaftCluster`.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A call to the Kubernetes API server failed.
    #[error("kubernetes api: {0}")]
    Kube(#[from] kube::Error),

    /// The HTTP request to a node's admin API failed before a response arrived (connection
    /// refused, timeout, protocol error).
    #[error("node {url}: request failed: {source}")]
    NodeTransport {
        /// The URL that was called.
        url: String,
        /// The underlying transport error.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },

    /// A node answered with an error status and the JSON error body of the admin API.
    #[error("node {url}: {status} {code}: {message}")]
    NodeRejected {
        /// The URL that was called.
        url: String,
        /// The HTTP status code.
        status: u16,
        /// The machine-readable error code (`learner_lagging`, `is_leader`, ...).
        code: String,
        /// The human-readable explanation from the node.
        message: String,
        /// The node's `Retry-After`, when it sent one (503: no leader yet).
        retry_after: Option<Duration>,
    },

    /// A node answered 2xx with a body that does not match the admin API contract.
    #[error("node {url}: unexpected response body: {source}")]
    NodeDecode {
        /// The URL that was called.
        url: String,
        /// The JSON decoding error.
        #[source]
        source: serde_json::Error,
    },

    /// The `RaftCluster` spec cannot be turned into objects; the message is shown in status.
    #[error("invalid spec: {0}")]
    InvalidSpec(String),

    /// An object the operator needs lacks a field the API server always sets (name, namespace,
    /// uid), so it was not read from the API server.
    #[error("object is missing {0}")]
    MissingObjectKey(&'static str),

    /// Serialising an object for a patch failed.
    #[error("serialising {what}: {source}")]
    Serialize {
        /// What was being serialised.
        what: &'static str,
        /// The JSON error.
        #[source]
        source: serde_json::Error,
    },

    /// The metrics or health endpoint could not be served.
    #[error("http server: {0}")]
    Server(#[source] std::io::Error),

    /// The operator's own settings contradict each other (for example leader-election timings).
    #[error("invalid operator configuration: {0}")]
    Config(String),

    /// A call gave no answer in time. kube's client has no read timeout of its own, so calls
    /// whose delay would be unsafe (a Lease renewal) are bounded by the caller.
    #[error("{0} timed out")]
    Timeout(&'static str),

    /// A certificate could not be issued, or a TLS Secret lacks what the node needs.
    #[error("certificates: {0}")]
    Certificate(String),
}

impl Error {
    /// The node's error code when this is a refusal from a node's admin API.
    pub fn node_code(&self) -> Option<&str> {
        match self {
            Error::NodeRejected { code, .. } => Some(code),
            _ => None,
        }
    }

    /// A short, stable label for metrics (never contains object names or messages).
    pub fn metric_label(&self) -> &'static str {
        match self {
            Error::Kube(_) => "kube",
            Error::NodeTransport { .. } => "node_transport",
            Error::NodeRejected { .. } => "node_rejected",
            Error::NodeDecode { .. } => "node_decode",
            Error::InvalidSpec(_) => "invalid_spec",
            Error::MissingObjectKey(_) => "missing_object_key",
            Error::Serialize { .. } => "serialize",
            Error::Server(_) => "server",
            Error::Config(_) => "config",
            Error::Timeout(_) => "timeout",
            Error::Certificate(_) => "certificate",
        }
    }
}

/// The crate's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;
