//! The operator's client for the node's admin API, and the [`NodeApi`] trait it implements.
//!
//! The planner and executor only see the trait, so they run unchanged against real nodes
//! ([`HttpNodeClient`]), against an in-memory model in property tests, or against real node
//! processes started by a test without Kubernetes. Every call names the node it goes to by the
//! base URL of its client port (see [`crate::config::OperatorConfig::node_url`]).

use std::future::Future;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// A node's own view, from `GET /v1/status`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeStatus {
    /// The member id stored on the node's volume.
    pub id: u64,
    /// The Raft cluster id; 0 before the node was bootstrapped or added.
    pub cluster_id: u64,
    /// `leader`, `follower`, `candidate`, `pre_candidate`, `learner`, `uninitialized` or `removed`.
    pub role: String,
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
    pub membership: NodeMembership,
    /// The peer URL the node advertises.
    pub peer_url: String,
    /// The node's own readiness (member, knows the leader, caught up).
    pub ready: bool,
}

/// How a node belongs to the membership, as the node itself reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NodeMembership {
    /// A voting member.
    Voter,
    /// A non-voting member.
    Learner,
    /// Not bootstrapped and not added yet: a fresh volume.
    None,
    /// Removed from the membership; this volume can never rejoin.
    Removed,
}

/// The membership as applied, from `GET /v1/members` (answered by the leader).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Members {
    /// The Raft cluster id.
    pub cluster_id: u64,
    /// The leader; 0 when unknown.
    pub leader_id: u64,
    /// Every voter and learner.
    pub members: Vec<Member>,
}

/// One member in [`Members`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    /// The member id.
    pub id: u64,
    /// The URL peers reach it at.
    pub peer_url: String,
    /// Voter or learner.
    pub role: MemberKind,
    /// The leader's view of how far this member's log matches; absent off the leader.
    #[serde(default)]
    pub match_index: Option<u64>,
    /// The leader's view of whether the member responds; absent off the leader.
    #[serde(default)]
    pub healthy: Option<bool>,
}

/// Voter or learner, in [`Member`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MemberKind {
    /// Votes and counts towards quorum.
    Voter,
    /// Receives the log but does not vote.
    Learner,
}

/// The answer to `POST /v1/bootstrap`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Bootstrapped {
    /// The new cluster's id.
    pub cluster_id: u64,
    /// The member id of the first voter.
    pub id: u64,
}

/// Error codes of the admin API the operator reacts to.
pub mod codes {
    /// `POST /v1/bootstrap` on a node that already belongs to a cluster.
    pub const ALREADY_INITIALIZED: &str = "already_initialized";
    /// `POST /v1/members/{id}/promote` while the learner lags.
    pub const LEARNER_LAGGING: &str = "learner_lagging";
    /// `DELETE /v1/members/{id}` that would leave too few healthy voters.
    pub const WOULD_LOSE_QUORUM: &str = "would_lose_quorum";
    /// `DELETE /v1/members/{id}` of the leader itself.
    pub const IS_LEADER: &str = "is_leader";
}

/// The admin API of one raftkv node, addressed by the base URL of its client port.
///
/// Membership calls return only once the change is applied; a refusal comes back as
/// [`Error::NodeRejected`] with the node's error code.
pub trait NodeApi: Send + Sync {
    /// `GET /v1/status`.
    fn status(&self, node: &str) -> impl Future<Output = Result<NodeStatus>> + Send;
    /// `GET /v1/members`.
    fn members(&self, node: &str) -> impl Future<Output = Result<Members>> + Send;
    /// `POST /v1/members` with `learner: true`; returns the membership with the learner.
    fn add_learner(&self, node: &str, id: u64, peer_url: &str) -> impl Future<Output = Result<Vec<Member>>> + Send;
    /// `POST /v1/members/{id}/promote`.
    fn promote(&self, node: &str, id: u64) -> impl Future<Output = Result<()>> + Send;
    /// `DELETE /v1/members/{id}`.
    fn remove_member(&self, node: &str, id: u64) -> impl Future<Output = Result<()>> + Send;
    /// `POST /v1/leader`; returns the new leader's id.
    fn transfer_leader(&self, node: &str, to: u64) -> impl Future<Output = Result<u64>> + Send;
    /// `POST /v1/bootstrap`.
    fn bootstrap(&self, node: &str) -> impl Future<Output = Result<Bootstrapped>> + Send;
}

/// Timeouts of [`HttpNodeClient`].
#[derive(Clone, Copy, Debug)]
pub struct NodeClientTimeouts {
    /// Connecting to a pod; short, because an unreachable pod should not stall a reconcile.
    pub connect: Duration,
    /// Read-only calls (`status`, `members`).
    pub read: Duration,
    /// Membership calls, which wait until the change is applied (a learner add may first ship
    /// a snapshot).
    pub change: Duration,
}

impl Default for NodeClientTimeouts {
    fn default() -> Self {
        Self {
            connect: Duration::from_secs(2),
            read: Duration::from_secs(5),
            change: Duration::from_secs(30),
        }
    }
}

/// [`NodeApi`] over HTTP/1.1 with JSON bodies.
#[derive(Clone, Debug)]
pub struct HttpNodeClient {
    http: reqwest::Client,
    timeouts: NodeClientTimeouts,
}

#[derive(Deserialize)]
struct ErrorBody {
    error: String,
    #[serde(default)]
    message: String,
}

#[derive(Serialize)]
struct AddMemberBody<'a> {
    id: u64,
    peer_url: &'a str,
    learner: bool,
}

#[derive(Serialize)]
struct TransferBody {
    id: u64,
}

#[derive(Deserialize)]
struct MembersChanged {
    members: Vec<Member>,
}

#[derive(Deserialize)]
struct TransferResponse {
    leader_id: u64,
}

impl HttpNodeClient {
    /// A client with the given timeouts.
    pub fn new(timeouts: NodeClientTimeouts) -> Result<Self> {
        let http = reqwest::Client::builder()
            .connect_timeout(timeouts.connect)
            // Pod IPs are reached directly; a proxy from the environment would not know them.
            .no_proxy()
            .build()
            .map_err(|source| Error::NodeTransport {
                url: String::new(),
                source: source.into(),
            })?;
        Ok(Self { http, timeouts })
    }

    async fn call<T: serde::de::DeserializeOwned>(&self, request: reqwest::RequestBuilder, url: String) -> Result<T> {
        let response = request.send().await.map_err(|source| Error::NodeTransport {
            url: url.clone(),
            source: source.into(),
        })?;
        let status = response.status();
        let retry_after = response
            .headers()
            .get(http::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(Duration::from_secs);
        let body = response.bytes().await.map_err(|source| Error::NodeTransport {
            url: url.clone(),
            source: source.into(),
        })?;
        if !status.is_success() {
            let (code, message) = match serde_json::from_slice::<ErrorBody>(&body) {
                Ok(e) => (e.error, e.message),
                Err(_) => (
                    format!("http_{}", status.as_u16()),
                    String::from_utf8_lossy(&body).into_owned(),
                ),
            };
            return Err(Error::NodeRejected {
                url,
                status: status.as_u16(),
                code,
                message,
                retry_after,
            });
        }
        // An empty success body stands for "no payload" (`()`), which JSON spells `null`.
        let body: &[u8] = if body.is_empty() { b"null" } else { &body };
        serde_json::from_slice(body).map_err(|source| Error::NodeDecode { url, source })
    }
}

/// A success body whose content does not matter.
struct Unit;

impl<'de> Deserialize<'de> for Unit {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        serde::de::IgnoredAny::deserialize(d).map(|_| Unit)
    }
}

impl NodeApi for HttpNodeClient {
    async fn status(&self, node: &str) -> Result<NodeStatus> {
        let url = format!("{node}/v1/status");
        let request = self.http.get(&url).timeout(self.timeouts.read);
        self.call(request, url).await
    }

    async fn members(&self, node: &str) -> Result<Members> {
        let url = format!("{node}/v1/members");
        let request = self.http.get(&url).timeout(self.timeouts.read);
        self.call(request, url).await
    }

    async fn add_learner(&self, node: &str, id: u64, peer_url: &str) -> Result<Vec<Member>> {
        let url = format!("{node}/v1/members");
        let request = self.http.post(&url).timeout(self.timeouts.change).json(&AddMemberBody {
            id,
            peer_url,
            learner: true,
        });
        self.call::<MembersChanged>(request, url).await.map(|r| r.members)
    }

    async fn promote(&self, node: &str, id: u64) -> Result<()> {
        let url = format!("{node}/v1/members/{id}/promote");
        let request = self.http.post(&url).timeout(self.timeouts.change);
        self.call::<Unit>(request, url).await.map(|_| ())
    }

    async fn remove_member(&self, node: &str, id: u64) -> Result<()> {
        let url = format!("{node}/v1/members/{id}");
        let request = self.http.delete(&url).timeout(self.timeouts.change);
        self.call::<Unit>(request, url).await.map(|_| ())
    }

    async fn transfer_leader(&self, node: &str, to: u64) -> Result<u64> {
        let url = format!("{node}/v1/leader");
        let request = self
            .http
            .post(&url)
            .timeout(self.timeouts.change)
            .json(&TransferBody { id: to });
        self.call::<TransferResponse>(request, url).await.map(|r| r.leader_id)
    }

    async fn bootstrap(&self, node: &str) -> Result<Bootstrapped> {
        let url = format!("{node}/v1/bootstrap");
        let request = self.http.post(&url).timeout(self.timeouts.change);
        self.call(request, url).await
    }
}
