//! The operator's client for the node's admin API, and the [`NodeApi`] trait it implements.
//!
//! The planner and executor only see the trait, so they run unchanged against real nodes
//! ([`HttpNodeClient`]), against an in-memory model in property tests, or against real node
//! processes started by a test without Kubernetes. Every call names the node it goes to by the
//! base URL of its client port (see [`crate::config::OperatorConfig::node_url`]). The request and
//! response bodies are the node's own types, from the `raftkv-api` crate.

use std::future::Future;
use std::time::Duration;

use raftkv_api::{AddMemberRequest, ErrorBody, TransferRequest, TransferResponse};
use serde::Deserialize;

use crate::{Error, Result};

pub use raftkv_api::{
    Bootstrapped, MemberKind, MemberView as Member, Members, Membership as NodeMembership, Status as NodeStatus,
};

/// Error codes of the admin API the operator reacts to (the node's own, from `raftkv-api`).
pub mod codes {
    pub use raftkv_api::codes::{ALREADY_INITIALIZED, IS_LEADER, LEARNER_LAGGING, WOULD_LOSE_QUORUM};
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
        let request = self
            .http
            .post(&url)
            .timeout(self.timeouts.change)
            .json(&AddMemberRequest {
                id,
                peer_url: peer_url.to_string(),
                learner: true,
            });
        self.call::<Members>(request, url).await.map(|r| r.members)
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
            .json(&TransferRequest { id: to });
        self.call::<TransferResponse>(request, url).await.map(|r| r.leader_id)
    }

    async fn bootstrap(&self, node: &str) -> Result<Bootstrapped> {
        let url = format!("{node}/v1/bootstrap");
        let request = self.http.post(&url).timeout(self.timeouts.change);
        self.call(request, url).await
    }
}
