//! Carrying out one planned [`Step`].
//!
//! `execute` is written against two small traits, [`NodeApi`] for the nodes and
//! [`ClusterEffects`] for the few Kubernetes writes a step needs, so the same code runs in the
//! operator, against an in-memory model in property tests, and against real node processes in a
//! test without Kubernetes.

use std::collections::BTreeMap;
use std::future::Future;

use tracing::{info, warn};

use crate::crd::{BootstrapRecord, BootstrapState};
use crate::node_client::{codes, NodeApi};
use crate::plan::{RemovalReason, Step};
use crate::{Error, Result};

/// The Kubernetes side effects of membership steps.
pub trait ClusterEffects: Send + Sync {
    /// Set the StatefulSet's replica count.
    fn scale_statefulset(&self, replicas: u32) -> impl Future<Output = Result<()>> + Send;
    /// Delete the data claim of `ordinal` (absent is fine).
    fn delete_claim(&self, ordinal: u32) -> impl Future<Output = Result<()>> + Send;
    /// Mark the data claim of `ordinal` as holding the volume of `member_id`, which is about to
    /// be removed (absent is fine).
    fn mark_claim_removed(&self, ordinal: u32, member_id: u64) -> impl Future<Output = Result<()>> + Send;
    /// Delete the pod of `ordinal` so the StatefulSet recreates it (absent is fine).
    fn delete_pod(&self, ordinal: u32) -> impl Future<Output = Result<()>> + Send;
    /// Persist the bootstrap record in the cluster's status before the step goes on.
    fn record_bootstrap(&self, record: &BootstrapRecord) -> impl Future<Output = Result<()>> + Send;
    /// Tell humans what happened (a Kubernetes Event on the `RaftCluster`).
    fn publish_event(&self, reason: &str, note: &str, warning: bool) -> impl Future<Output = Result<()>> + Send;
}

/// How a step ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The step was carried out and confirmed.
    Applied,
    /// The step was not carried out for a reason that resolves itself (a learner still lags, a
    /// change is pending, there is no leader this instant); plan again shortly.
    Deferred {
        /// The node's error code, or the operator's own.
        code: String,
        /// Explanation for logs and status.
        message: String,
    },
    /// The step asks for nothing to be done (waiting, blocked, converged).
    Nothing,
}

/// What `execute` reports.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Execution {
    /// How the step ended.
    pub outcome: Outcome,
    /// The bootstrap record after the step, when the step changed it.
    pub bootstrap: Option<BootstrapRecord>,
}

impl Execution {
    fn applied() -> Self {
        Self {
            outcome: Outcome::Applied,
            bootstrap: None,
        }
    }

    fn deferred(code: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            outcome: Outcome::Deferred {
                code: code.into(),
                message: message.into(),
            },
            bootstrap: None,
        }
    }
}

/// A node's refusal that only means "not now": conflicts (pending change, lagging learner,
/// leader to transfer first) and "no leader" answers.
fn deferral(error: &Error) -> Option<Execution> {
    match error {
        Error::NodeRejected {
            status: 409 | 503,
            code,
            message,
            ..
        } => Some(Execution::deferred(code.clone(), message.clone())),
        _ => None,
    }
}

fn endpoint(endpoints: &BTreeMap<u32, String>, ordinal: u32) -> Result<&str, Execution> {
    endpoints
        .get(&ordinal)
        .map(String::as_str)
        .ok_or_else(|| Execution::deferred("no_endpoint", format!("pod ordinal {ordinal} has no IP address yet")))
}

/// Carries out `step`. `endpoints` maps pod ordinals to node base URLs.
pub async fn execute<N: NodeApi, K: ClusterEffects>(
    step: &Step,
    endpoints: &BTreeMap<u32, String>,
    nodes: &N,
    cluster: &K,
) -> Result<Execution> {
    let result = match step {
        Step::Wait(_) | Step::Blocked(_) | Step::Converged => {
            return Ok(Execution {
                outcome: Outcome::Nothing,
                bootstrap: None,
            })
        }
        Step::Bootstrap { ordinal, member_id } => {
            let url = match endpoint(endpoints, *ordinal) {
                Ok(url) => url,
                Err(deferred) => return Ok(deferred),
            };
            bootstrap(url, *member_id, nodes, cluster).await
        }
        Step::RecordBootstrap { member_id, cluster_id } => {
            let record = BootstrapRecord {
                member_id: *member_id,
                state: BootstrapState::Done,
                cluster_id: Some(*cluster_id),
            };
            cluster.record_bootstrap(&record).await?;
            Ok(Execution {
                outcome: Outcome::Applied,
                bootstrap: Some(record),
            })
        }
        Step::ScaleStatefulSet { to, .. } => cluster.scale_statefulset(*to).await.map(|()| Execution::applied()),
        Step::AddLearner {
            member_id,
            peer_url,
            via,
            ..
        } => match endpoint(endpoints, *via) {
            Ok(url) => nodes
                .add_learner(url, *member_id, peer_url)
                .await
                .map(|_| Execution::applied()),
            Err(deferred) => return Ok(deferred),
        },
        Step::Promote { member_id, via } => match endpoint(endpoints, *via) {
            Ok(url) => nodes.promote(url, *member_id).await.map(|()| Execution::applied()),
            Err(deferred) => return Ok(deferred),
        },
        Step::RemoveMember {
            member_id,
            ordinal,
            reason,
            via,
        } => match endpoint(endpoints, *via) {
            Ok(url) => {
                // The mark goes first: once the removal is applied, a restart of the member's pod
                // leaves a node that refuses to start and so can no longer say what it was. A
                // replaced member's claim already holds its successor's volume.
                if let (RemovalReason::ScaleDown, Some(ordinal)) = (reason, ordinal) {
                    cluster.mark_claim_removed(*ordinal, *member_id).await?;
                }
                nodes
                    .remove_member(url, *member_id)
                    .await
                    .map(|()| Execution::applied())
            }
            Err(deferred) => return Ok(deferred),
        },
        Step::TransferLeadership { to, via, .. } => match endpoint(endpoints, *via) {
            Ok(url) => nodes.transfer_leader(url, *to).await.map(|_| Execution::applied()),
            Err(deferred) => return Ok(deferred),
        },
        Step::DeleteClaim { ordinal } => cluster.delete_claim(*ordinal).await.map(|()| Execution::applied()),
        Step::ResetVolume { ordinal } => {
            // The claim first: deleting the pod first would let the StatefulSet recreate it on
            // the same (removed) volume before the claim is gone.
            cluster.delete_claim(*ordinal).await?;
            cluster.delete_pod(*ordinal).await.map(|()| Execution::applied())
        }
        Step::RestartPod { ordinal } => cluster.delete_pod(*ordinal).await.map(|()| Execution::applied()),
    };
    let execution = match result {
        Ok(execution) => execution,
        Err(error) => match deferral(&error) {
            Some(deferred) => deferred,
            None => return Err(error),
        },
    };
    match &execution.outcome {
        Outcome::Applied => {
            info!(step = step.kind(), detail = %step, "membership step applied");
            // The step is done; an Event that cannot be written (missing RBAC, API hiccup) must
            // not turn it into a failed reconcile that is retried with backoff.
            if let Err(error) = cluster.publish_event(step.kind(), &step.to_string(), false).await {
                warn!(step = step.kind(), %error, "could not publish the event");
            }
        }
        Outcome::Deferred { code, message } => {
            warn!(step = step.kind(), detail = %step, code, message, "membership step deferred");
        }
        Outcome::Nothing => {}
    }
    Ok(execution)
}

/// Bootstraps the first member, with the record written before the call and after it: an
/// operator that dies in between finds `Started` and finishes the step (see
/// [`crate::plan::plan`]) instead of bootstrapping another member.
async fn bootstrap<N: NodeApi, K: ClusterEffects>(
    url: &str,
    member_id: u64,
    nodes: &N,
    cluster: &K,
) -> Result<Execution> {
    let started = BootstrapRecord {
        member_id,
        state: BootstrapState::Started,
        cluster_id: None,
    };
    cluster.record_bootstrap(&started).await?;
    let cluster_id = match nodes.bootstrap(url).await {
        Ok(done) => done.cluster_id,
        Err(error) if error.node_code() == Some(codes::ALREADY_INITIALIZED) => nodes.status(url).await?.cluster_id,
        Err(error) => return Err(error),
    };
    let done = BootstrapRecord {
        member_id,
        state: BootstrapState::Done,
        cluster_id: Some(cluster_id),
    };
    cluster.record_bootstrap(&done).await?;
    Ok(Execution {
        outcome: Outcome::Applied,
        bootstrap: Some(done),
    })
}
