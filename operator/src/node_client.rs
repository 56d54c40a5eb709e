//! The operator's client for the node's admin API, and the [`NodeApi`] trait it implements.
//!
//! The planner and executor only see the trait, so they run unchanged against real nodes
//! ([`HttpNodeClient`]), against an in-memory model in property tests, or against real node
//! processes started by a test without Kubernetes. Every call names the node it goes to by the
//! base URL of its client port (see [`crate::config::OperatorConfig::node_url`]). The request and
//! response bodies are the node's own types, from the `raftkv-api` crate.
//!
//! A TLS cluster's nodes are named by their pod's stable DNS name
//! (`https://<pod>.<peer service>.<namespace>.svc:<port>`), which is what their certificate
//! names, and reached at their pod IP: [`NodeApi::use_tls`] hands the client the cluster's CA,
//! the operator's certificate and the pods' addresses, and the client's resolver answers those
//! names from that table. So the certificate is checked against the name the operator means,
//! not against an IP that a restarted pod may hand to another.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use raftkv_api::{AddMemberRequest, ErrorBody, TransferRequest, TransferResponse};
use serde::Deserialize;

use crate::tls::NodeTls;
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

    /// Prepares calls to a TLS cluster whose nodes are named under `domain`
    /// (`<peer service>.<namespace>.svc`): trust `tls.ca_pem`, authenticate with the operator's
    /// certificate, and reach each pod name of `pods` at its IP. Clients that only speak to
    /// plaintext nodes (the in-memory models of the tests) ignore it.
    fn use_tls(&self, domain: &str, tls: &NodeTls, pods: &BTreeMap<String, IpAddr>) -> Result<()> {
        let _ = (domain, tls, pods);
        Ok(())
    }

    /// An HTTP client that reaches the node at `url` as these calls do (its TLS cluster's CA,
    /// the operator's certificate and the pods' addresses), for streams such as backups.
    fn http_for(&self, url: &str) -> reqwest::Client {
        let _ = url;
        reqwest::Client::new()
    }
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

/// The pod addresses of TLS clusters, by pod DNS name: the resolver of the TLS clients.
#[derive(Debug, Default)]
struct PodAddresses {
    by_name: RwLock<HashMap<String, IpAddr>>,
}

impl reqwest::dns::Resolve for PodAddresses {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let found = self
            .by_name
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(name.as_str())
            .copied();
        let name = name.as_str().to_string();
        Box::pin(async move {
            // Only names the operator registered are dialled: a name it does not know is a pod it
            // has not seen, and cluster DNS may not even exist (a simulated control plane).
            let ip = found.ok_or_else(|| format!("no pod address known for {name}"))?;
            let addrs: reqwest::dns::Addrs = Box::new(std::iter::once(SocketAddr::new(ip, 0)));
            Ok(addrs)
        })
    }
}

/// The TLS client of one cluster, and the material it was built from.
#[derive(Debug)]
struct TlsClient {
    /// What the client trusts and presents; a change (a renewed operator certificate) builds a
    /// new client.
    material: NodeTls,
    http: reqwest::Client,
}

/// [`NodeApi`] over HTTP/1.1 with JSON bodies, plaintext or TLS.
#[derive(Clone, Debug)]
pub struct HttpNodeClient {
    /// The client of plaintext clusters.
    http: reqwest::Client,
    timeouts: NodeClientTimeouts,
    /// Pod addresses of TLS clusters, shared with every TLS client's resolver.
    addresses: Arc<PodAddresses>,
    /// One client per TLS cluster, by the domain its pods are named under.
    tls: Arc<RwLock<HashMap<String, TlsClient>>>,
}

fn build_error(source: reqwest::Error) -> Error {
    Error::NodeTransport {
        url: String::new(),
        source: source.into(),
    }
}

impl HttpNodeClient {
    /// A client with the given timeouts.
    pub fn new(timeouts: NodeClientTimeouts) -> Result<Self> {
        let http = reqwest::Client::builder()
            .connect_timeout(timeouts.connect)
            // Pod IPs are reached directly; a proxy from the environment would not know them.
            .no_proxy()
            .build()
            .map_err(build_error)?;
        Ok(Self {
            http,
            timeouts,
            addresses: Arc::default(),
            tls: Arc::default(),
        })
    }

    fn tls_client(&self, material: &NodeTls) -> Result<reqwest::Client> {
        let ca = reqwest::Certificate::from_pem(material.ca_pem.as_bytes())
            .map_err(|e| Error::Certificate(format!("the cluster's CA: {e}")))?;
        let identity = reqwest::Identity::from_pem(material.identity_pem.as_bytes())
            .map_err(|e| Error::Certificate(format!("the operator's client certificate: {e}")))?;
        reqwest::Client::builder()
            .use_rustls_tls()
            .connect_timeout(self.timeouts.connect)
            .no_proxy()
            // Only the cluster's own CA: a certificate from a public CA naming the pod is not one
            // of the cluster's nodes.
            .tls_built_in_root_certs(false)
            .add_root_certificate(ca)
            .identity(identity)
            .https_only(true)
            .dns_resolver(self.addresses.clone())
            .build()
            .map_err(build_error)
    }

    /// The client for `url`: its TLS cluster's, or the plaintext one.
    fn client_for(&self, url: &str) -> reqwest::Client {
        let domain = url
            .strip_prefix("https://")
            .and_then(|rest| rest.split([':', '/']).next())
            .and_then(|host| host.split_once('.'))
            .map(|(_, domain)| domain);
        domain
            .and_then(|domain| {
                let clients = self.tls.read().unwrap_or_else(|e| e.into_inner());
                clients.get(domain).map(|c| c.http.clone())
            })
            .unwrap_or_else(|| self.http.clone())
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
        let request = self.client_for(&url).get(&url).timeout(self.timeouts.read);
        self.call(request, url).await
    }

    async fn members(&self, node: &str) -> Result<Members> {
        let url = format!("{node}/v1/members");
        let request = self.client_for(&url).get(&url).timeout(self.timeouts.read);
        self.call(request, url).await
    }

    async fn add_learner(&self, node: &str, id: u64, peer_url: &str) -> Result<Vec<Member>> {
        let url = format!("{node}/v1/members");
        let request = self
            .client_for(&url)
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
        let request = self.client_for(&url).post(&url).timeout(self.timeouts.change);
        self.call::<Unit>(request, url).await.map(|_| ())
    }

    async fn remove_member(&self, node: &str, id: u64) -> Result<()> {
        let url = format!("{node}/v1/members/{id}");
        let request = self.client_for(&url).delete(&url).timeout(self.timeouts.change);
        self.call::<Unit>(request, url).await.map(|_| ())
    }

    async fn transfer_leader(&self, node: &str, to: u64) -> Result<u64> {
        let url = format!("{node}/v1/leader");
        let request = self
            .client_for(&url)
            .post(&url)
            .timeout(self.timeouts.change)
            .json(&TransferRequest { id: to });
        self.call::<TransferResponse>(request, url).await.map(|r| r.leader_id)
    }

    async fn bootstrap(&self, node: &str) -> Result<Bootstrapped> {
        let url = format!("{node}/v1/bootstrap");
        let request = self.client_for(&url).post(&url).timeout(self.timeouts.change);
        self.call(request, url).await
    }

    fn http_for(&self, url: &str) -> reqwest::Client {
        self.client_for(url)
    }

    fn use_tls(&self, domain: &str, tls: &NodeTls, pods: &BTreeMap<String, IpAddr>) -> Result<()> {
        {
            let mut addresses = self.addresses.by_name.write().unwrap_or_else(|e| e.into_inner());
            // The cluster's table is replaced whole: a pod that is gone has no address left.
            addresses.retain(|name, _| !name.ends_with(&format!(".{domain}")));
            addresses.extend(pods.iter().map(|(name, ip)| (name.clone(), *ip)));
        }
        let current = self
            .tls
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(domain)
            .is_some_and(|c| &c.material == tls);
        if !current {
            let http = self.tls_client(tls)?;
            self.tls.write().unwrap_or_else(|e| e.into_inner()).insert(
                domain.to_string(),
                TlsClient {
                    material: tls.clone(),
                    http,
                },
            );
        }
        Ok(())
    }
}
