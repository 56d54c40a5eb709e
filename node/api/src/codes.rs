//! The `error` codes of [`crate::ErrorBody`]: stable identifiers a client can act on, each
//! with the HTTP status it comes with.

// Bad input: 400, 404, 405, 412, 413. Nothing reached Raft.

/// 400: the key is empty, too long, or badly percent-encoded.
pub const INVALID_KEY: &str = "invalid_key";
/// 400: `If-Match` / `If-None-Match` is malformed or does not apply to the call.
pub const INVALID_PRECONDITION: &str = "invalid_precondition";
/// 400: a query parameter is malformed.
pub const INVALID_QUERY: &str = "invalid_query";
/// 400: `limit` is out of range.
pub const INVALID_LIMIT: &str = "invalid_limit";
/// 400: the request body could not be read.
pub const INVALID_BODY: &str = "invalid_body";
/// 400: the request body is not the expected JSON.
pub const INVALID_JSON: &str = "invalid_json";
/// 400: a member id in the path is not a positive integer.
pub const INVALID_ID: &str = "invalid_id";
/// 400: a peer URL is not `http://host:port`.
pub const INVALID_PEER_URL: &str = "invalid_peer_url";
/// 400: the request is invalid for the membership (for example a zero id).
pub const INVALID_REQUEST: &str = "invalid_request";
/// 404: no such key, or no such route.
pub const NOT_FOUND: &str = "not_found";
/// 405: the route does not take this method.
pub const METHOD_NOT_ALLOWED: &str = "method_not_allowed";
/// 408: the request body did not arrive in time.
pub const BODY_TIMEOUT: &str = "body_timeout";
/// 412: the compare-and-swap precondition does not hold; see `current_revision`.
pub const PRECONDITION_FAILED: &str = "precondition_failed";
/// 413: the value or body is larger than the member accepts.
pub const TOO_LARGE: &str = "too_large";

// Not now: 503 with Retry-After. Nothing was proposed; retrying is safe.

/// 503: no leader is known.
pub const NO_LEADER: &str = "no_leader";
/// 503: the call needs the leader and this member is not it (forwarding failed or looped).
pub const NOT_LEADER: &str = "not_leader";
/// 503: the leader could not be reached to forward the call.
pub const LEADER_UNREACHABLE: &str = "leader_unreachable";
/// 503: the member is shutting down.
pub const SHUTTING_DOWN: &str = "shutting_down";
/// 503: a linearizable read could not be confirmed before the deadline.
pub const READ_TIMEOUT: &str = "read_timeout";
/// 503 from `/readyz`: not a caught-up member that knows its leader.
pub const NOT_READY: &str = "not_ready";
/// 503 from `/healthz`: the consensus loop has stopped.
pub const UNHEALTHY: &str = "unhealthy";
/// 503 from `GET /v1/snapshot`: as many snapshot streams as the member serves at once are open.
pub const SNAPSHOT_BUSY: &str = "snapshot_busy";

// Unknown outcome: 504 with Retry-After. The write may or may not have been applied.

/// 504: the write was proposed but not confirmed before the deadline.
pub const UNKNOWN_OUTCOME: &str = "unknown_outcome";
/// 504: leadership did not move before the deadline.
pub const TRANSFER_TIMEOUT: &str = "transfer_timeout";

// Membership refusals: 404 and 409. Nothing was proposed.

/// 409: another membership change has not been applied yet.
pub const CHANGE_PENDING: &str = "change_pending";
/// 409: the learner lags the leader too much to be promoted.
pub const LEARNER_LAGGING: &str = "learner_lagging";
/// 409: the change would leave fewer healthy voters than a quorum.
pub const WOULD_LOSE_QUORUM: &str = "would_lose_quorum";
/// 409: the leader cannot remove itself; transfer leadership first.
pub const IS_LEADER: &str = "is_leader";
/// 404: the id is not a member.
pub const NOT_MEMBER: &str = "not_member";
/// 409: the id is already a member in the asked role.
pub const ALREADY_MEMBER: &str = "already_member";
/// 409: the id belonged to a removed member; ids are never reused.
pub const ID_REMOVED: &str = "id_removed";
/// 409: `POST /v1/bootstrap` on a member that already belongs to a cluster.
pub const ALREADY_INITIALIZED: &str = "already_initialized";
/// 409: bootstrap needs the member's advertised peer URL.
pub const NO_PEER_URL: &str = "no_peer_url";
/// 500: an internal failure; the message says what.
pub const INTERNAL: &str = "internal";

// The peer port's refusals of another member's stream.

/// 410: the sender was removed from this cluster.
pub const MEMBER_REMOVED: &str = "member_removed";
/// 403: the sender belongs to another cluster.
pub const CLUSTER_ID_MISMATCH: &str = "cluster_id_mismatch";
/// 400: a message was addressed to another member id.
pub const WRONG_MEMBER: &str = "wrong_member";
/// 400: a stream frame could not be decoded.
pub const BAD_FRAME: &str = "bad_frame";
/// 400: a snapshot upload could not be received.
pub const BAD_SNAPSHOT: &str = "bad_snapshot";
