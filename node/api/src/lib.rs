//! The wire contract of `raftkv-node`'s HTTP API (client port, and the admin calls forwarded
//! over the peer port): every JSON request and response body, the member views, and the error
//! codes. The node serializes these types; the operator and the end-to-end suite deserialize
//! them, so the two sides cannot drift apart.
//!
//! Field names and enum spellings are the JSON on the wire (`snake_case`). A client built on
//! these types tolerates fields it does not know, so a newer node can add fields.
//!
//! # Layout
//! - [`codes`]: the stable `error` codes of error bodies.
//! - Key-value calls: [`WriteResponse`], [`DeleteResponse`], [`ListResponse`] and [`ListItem`].
//! - Status and health: [`Status`], [`Role`], [`Membership`], [`Health`].
//! - Membership and leadership: [`Members`], [`MemberView`], [`MemberKind`],
//!   [`AddMemberRequest`], [`TransferRequest`], [`TransferResponse`], [`Bootstrapped`].
//! - Backups: [`snapshot`], the headers of `GET /v1/snapshot` and [`snapshot::SnapshotMeta`].
//! - Errors: [`ErrorBody`].

use serde::{Deserialize, Deserializer, Serialize};

pub mod codes;
pub mod snapshot;

/// `200` answer to `PUT /v1/kv/{key}`: the write is committed on a quorum and applied.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WriteResponse {
    /// The revision the write created (the key's new mod revision).
    pub revision: u64,
}

/// `200` answer to `DELETE /v1/kv/{key}`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeleteResponse {
    /// The revision of the delete.
    pub revision: u64,
    /// Whether the key existed.
    pub deleted: bool,
}

/// One key of a [`ListResponse`]. A key or value that is valid UTF-8 is sent as text
/// (`key`, `value`), any other as base64 (`key_base64`, `value_base64`): exactly one of each
/// pair is present.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ListItem {
    /// The key, when it is UTF-8.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    /// The key in base64, when it is not UTF-8.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_base64: Option<String>,
    /// The value, when it is UTF-8.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<String>,
    /// The value in base64, when it is not UTF-8.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value_base64: Option<String>,
    /// The key's mod revision.
    pub revision: u64,
    /// The revision that created the key.
    pub create_revision: u64,
}

/// `200` answer to `GET /v1/kv?prefix=...`: one page of a range listing.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ListResponse {
    /// The keys of this page, in order.
    pub items: Vec<ListItem>,
    /// More keys follow; continue with `start_after` set to the last key.
    pub more: bool,
    /// The revision the page was read at.
    pub revision: u64,
}

/// A member's Raft role, as `GET /v1/status` reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Leads the cluster.
    Leader,
    /// A voter following the leader.
    Follower,
    /// Campaigning.
    Candidate,
    /// Pre-voting.
    PreCandidate,
    /// A non-voting member.
    Learner,
    /// Not part of any cluster yet.
    Uninitialized,
    /// Removed from its cluster.
    Removed,
    /// A role this client does not know (sent by a newer node).
    #[serde(other)]
    Unknown,
}

/// How a member belongs to its cluster's applied membership, as it reports itself.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Membership {
    /// A voting member.
    Voter,
    /// A non-voting member.
    Learner,
    /// Not bootstrapped and not added yet: a fresh volume.
    None,
    /// Removed from the membership; this volume can never rejoin.
    Removed,
}

/// `200` answer to `GET /v1/status`: one member's own view.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Status {
    /// The member id stored on the node's volume.
    pub id: u64,
    /// The Raft cluster id; 0 before the node was bootstrapped or added.
    pub cluster_id: u64,
    /// Its Raft role.
    pub role: Role,
    /// The current Raft term.
    pub term: u64,
    /// The leader this node knows of; 0 when unknown.
    pub leader_id: u64,
    /// Highest log index known committed.
    pub commit_index: u64,
    /// Highest log index applied to the state machine.
    pub applied_index: u64,
    /// Index of the latest snapshot.
    pub snapshot_index: u64,
    /// Whether and how this node belongs to the membership.
    pub membership: Membership,
    /// Whether the applied configuration is a joint one (a change is half-way).
    #[serde(default)]
    pub joint: bool,
    /// The peer URL the node advertises; absent when it has none.
    #[serde(default)]
    pub peer_url: Option<String>,
    /// The node's own readiness (member, knows the leader, caught up), as `/readyz` reports it.
    pub ready: bool,
}

/// `200` answer to `GET /healthz` and `GET /readyz`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Health {
    /// `ok` (healthz) or `ready` (readyz).
    pub status: String,
}

/// Voter or learner, in a [`MemberView`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MemberKind {
    /// Votes and counts towards quorum.
    Voter,
    /// Receives the log but does not vote.
    Learner,
}

/// One member in [`Members`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberView {
    /// The member id.
    pub id: u64,
    /// The URL peers reach it at; absent while not known.
    #[serde(default)]
    pub peer_url: Option<String>,
    /// Voter or learner.
    pub role: MemberKind,
    /// The leader's view of how far this member's log matches; absent off the leader.
    #[serde(default)]
    pub match_index: Option<u64>,
    /// The leader's view of whether the member responds; absent off the leader.
    #[serde(default)]
    pub healthy: Option<bool>,
}

/// `200` answer to `GET /v1/members` (from the leader, with progress, when there is one) and to
/// every membership call once its change is applied.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Members {
    /// The Raft cluster id.
    pub cluster_id: u64,
    /// The leader; 0 when unknown.
    pub leader_id: u64,
    /// Every voter and learner.
    pub members: Vec<MemberView>,
}

fn default_learner() -> bool {
    true
}

/// Body of `POST /v1/members`: add a member, a learner unless `learner` is false.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AddMemberRequest {
    /// The new member's id (from its volume).
    pub id: u64,
    /// The URL peers reach it at, `http://host:port`.
    pub peer_url: String,
    /// Add as a learner (the default, and the safe way: promote once caught up).
    #[serde(default = "default_learner")]
    pub learner: bool,
}

/// Body of `POST /v1/leader`: move leadership to a voter.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TransferRequest {
    /// The voter to lead next.
    pub id: u64,
}

/// `200` answer to `POST /v1/leader`, once leadership moved.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TransferResponse {
    /// The new leader.
    pub leader_id: u64,
}

/// `200` answer to `POST /v1/bootstrap`, once this member leads the new cluster.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Bootstrapped {
    /// The new cluster's id.
    pub cluster_id: u64,
    /// The member id of the first voter.
    pub id: u64,
}

/// The body of every error answer: `{"error":"<code>","message":"..."}`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    /// A stable code from [`codes`].
    pub error: String,
    /// A sentence for people.
    pub message: String,
    /// With [`codes::PRECONDITION_FAILED`]: the key's current mod revision, `null` when the
    /// key does not exist. Absent on every other error.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "present_or_null"
    )]
    pub current_revision: Option<Option<u64>>,
}

impl ErrorBody {
    /// An error body with `code` and `message`.
    pub fn new(code: &str, message: impl Into<String>) -> Self {
        ErrorBody {
            error: code.to_string(),
            message: message.into(),
            current_revision: None,
        }
    }
}

/// A field that is present, even as `null`, is `Some`: `"current_revision": null` says the
/// key does not exist, which an absent field does not.
fn present_or_null<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<Option<u64>>, D::Error> {
    Option::<u64>::deserialize(deserializer).map(Some)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_precondition_failure_tells_a_missing_key_from_a_field_left_out() {
        let missing = ErrorBody {
            current_revision: Some(None),
            ..ErrorBody::new(codes::PRECONDITION_FAILED, "the key does not exist")
        };
        let wire = serde_json::to_value(&missing).unwrap();
        assert_eq!(
            wire,
            json!({"error": "precondition_failed", "message": "the key does not exist", "current_revision": null})
        );
        assert_eq!(serde_json::from_value::<ErrorBody>(wire).unwrap(), missing);
        let plain: ErrorBody = serde_json::from_value(json!({"error": "not_found", "message": "x"})).unwrap();
        assert_eq!(plain.current_revision, None);
        assert_eq!(
            serde_json::to_value(&plain).unwrap(),
            json!({"error": "not_found", "message": "x"}),
            "no current_revision on other errors"
        );
    }

    #[test]
    fn status_reads_what_older_and_newer_nodes_send() {
        let status: Status = serde_json::from_value(json!({
            "id": 1, "cluster_id": 2, "role": "observer", "term": 3, "leader_id": 1, "commit_index": 9,
            "applied_index": 9, "snapshot_index": 0, "membership": "voter", "ready": true, "extra": 1,
        }))
        .unwrap();
        assert_eq!(status.role, Role::Unknown, "an unknown role is not an error");
        assert_eq!((status.peer_url, status.joint), (None, false));
    }

    #[test]
    fn an_add_member_request_is_a_learner_unless_it_says_otherwise_and_refuses_unknown_fields() {
        let add: AddMemberRequest = serde_json::from_value(json!({"id": 4, "peer_url": "http://h:8081"})).unwrap();
        assert!(add.learner);
        assert!(serde_json::from_value::<AddMemberRequest>(json!({"id": 4, "peer_url": "u", "voter": true})).is_err());
    }

    #[test]
    fn list_items_carry_exactly_the_fields_that_are_set() {
        let item = ListItem {
            key: Some("a".into()),
            key_base64: None,
            value: None,
            value_base64: Some("/w==".into()),
            revision: 5,
            create_revision: 4,
        };
        assert_eq!(
            serde_json::to_value(&item).unwrap(),
            json!({"key": "a", "value_base64": "/w==", "revision": 5, "create_revision": 4})
        );
    }
}
