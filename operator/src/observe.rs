//! Turning Kubernetes objects and node answers into the planner's [`Observed`].
//!
//! Split in three: pure extraction of facts from Pods and claims, the node queries (the only
//! I/O, and only through [`NodeApi`]), and a pure assembly step that matches members to pods.
//! [`observe_and_plan`] runs the last two and the planner, for the reconciler and for the tests
//! that drive the in-memory model or real nodes.

use std::collections::{BTreeMap, BTreeSet};

use futures::future::join_all;
use k8s_openapi::api::core::v1::{PersistentVolumeClaim, Pod};
use k8s_openapi::jiff::Timestamp;
use tracing::debug;

use crate::config::OperatorConfig;
use crate::crd::{BootstrapRecord, MemberStatus};
use crate::names::{ClusterNames, NODE_CONTAINER, REMOVED_MEMBER_ANNOTATION, REVISION_LABEL};
use crate::node_client::{Members, NodeApi, NodeMembership, NodeStatus};
use crate::plan::{plan, Desired, FatalCode, MemberObs, MembershipObs, NodeObs, Observed, PodFailure, PodObs, Step};

/// What the operator needs to know about one of the cluster's pods.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodFacts {
    /// The pod's ordinal.
    pub ordinal: u32,
    /// The pod's name.
    pub name: String,
    /// The `Ready` condition is true.
    pub ready: bool,
    /// The pod has a deletion timestamp.
    pub terminating: bool,
    /// The pod's revision label equals the StatefulSet's update revision.
    pub up_to_date: bool,
    /// `status.podIP`, once assigned.
    pub ip: Option<String>,
    /// Why the node container failed, while it is not running or has not been ready since it
    /// last crashed.
    pub failure: Option<PodFailure>,
    /// Since when the pod has not been ready (its `Ready` condition's last transition, or its
    /// creation); `None` while it is ready.
    pub unready_since: Option<Timestamp>,
}

/// The failure of the node container in `pod`, if it crashed and has not been ready since.
///
/// The termination message of the latest finished instance says why (the node writes its fatal
/// line there); a container that is running and ready again has recovered, whatever its
/// history.
pub fn pod_failure(pod: &Pod, ready: bool) -> Option<PodFailure> {
    let status = pod
        .status
        .as_ref()?
        .container_statuses
        .as_ref()?
        .iter()
        .find(|c| c.name == NODE_CONTAINER)?;
    let state = status.state.as_ref();
    let running = state.is_some_and(|s| s.running.is_some());
    let finished = state
        .and_then(|s| s.terminated.as_ref())
        .or_else(|| status.last_state.as_ref()?.terminated.as_ref())
        .filter(|t| t.exit_code != 0);
    let restarts = status.restart_count.max(0) as u32;
    if ready || finished.is_none() || running && restarts == 0 {
        return None;
    }
    let waiting = state.and_then(|s| s.waiting.as_ref());
    let message = finished
        .and_then(|t| t.message.clone())
        .filter(|m| !m.trim().is_empty())
        .map(|m| m.trim().to_string())
        .or_else(|| {
            let waiting = waiting?;
            Some(format!(
                "{}: {}",
                waiting.reason.as_deref().unwrap_or("Waiting"),
                waiting.message.as_deref().unwrap_or_default()
            ))
        })
        .unwrap_or_else(|| {
            let t = finished.expect("checked above");
            format!(
                "exited with code {}{}",
                t.exit_code,
                t.reason.as_ref().map(|r| format!(" ({r})")).unwrap_or_default()
            )
        });
    Some(PodFailure {
        code: FatalCode::parse(&message),
        message,
        restarts,
    })
}

/// Facts about `pod`, or `None` when it is not one of this cluster's StatefulSet pods.
///
/// Without an update revision (a StatefulSet the controller has not observed yet) every pod
/// counts as up to date: no rollout is started on a guess.
pub fn pod_facts(names: &ClusterNames, pod: &Pod, update_revision: Option<&str>) -> Option<PodFacts> {
    let name = pod.metadata.name.clone()?;
    let ordinal = names.pod_ordinal(&name)?;
    let status = pod.status.as_ref();
    let ready = status
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
    let revision = pod
        .metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(REVISION_LABEL))
        .map(String::as_str);
    let up_to_date = match (update_revision, revision) {
        (Some(wanted), Some(has)) => wanted == has,
        _ => true,
    };
    let unready_since = if ready {
        None
    } else {
        status
            .and_then(|s| s.conditions.as_ref())
            .and_then(|cs| cs.iter().find(|c| c.type_ == "Ready"))
            .and_then(|c| c.last_transition_time.as_ref())
            .or(pod.metadata.creation_timestamp.as_ref())
            .map(|t| t.0)
    };
    Some(PodFacts {
        ordinal,
        name,
        ready,
        terminating: pod.metadata.deletion_timestamp.is_some(),
        up_to_date,
        ip: status.and_then(|s| s.pod_ip.clone()).filter(|ip| !ip.is_empty()),
        failure: pod_failure(pod, ready),
        unready_since,
    })
}

/// Ordinals of the cluster's data claims (deleted claims excluded: they are already going).
pub fn claim_ordinals(names: &ClusterNames, claims: &[PersistentVolumeClaim]) -> BTreeSet<u32> {
    claims
        .iter()
        .filter(|c| c.metadata.deletion_timestamp.is_none())
        .filter_map(|c| names.pvc_ordinal(c.metadata.name.as_deref()?))
        .collect()
}

/// The member id each claim was marked with before a scale-down removed that member, by
/// ordinal (see [`REMOVED_MEMBER_ANNOTATION`]). A mark that does not parse is ignored: the
/// planner then knows as much as it would without marks.
pub fn removed_member_claims(names: &ClusterNames, claims: &[PersistentVolumeClaim]) -> BTreeMap<u32, u64> {
    claims
        .iter()
        .filter(|c| c.metadata.deletion_timestamp.is_none())
        .filter_map(|c| {
            let ordinal = names.pvc_ordinal(c.metadata.name.as_deref()?)?;
            let id = c.metadata.annotations.as_ref()?.get(REMOVED_MEMBER_ANNOTATION)?;
            Some((ordinal, id.parse().ok()?))
        })
        .collect()
}

/// The base URL of every pod that has an IP, by ordinal.
pub fn endpoints(config: &OperatorConfig, pods: &[PodFacts]) -> BTreeMap<u32, String> {
    pods.iter()
        .filter_map(|p| Some((p.ordinal, config.node_url(p.ip.as_deref()?))))
        .collect()
}

/// What the nodes said.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeReports {
    /// `GET /v1/status` of every pod that answered, by ordinal.
    pub statuses: BTreeMap<u32, NodeStatus>,
    /// `GET /v1/members` from the first member that answered.
    pub members: Option<Members>,
}

/// Asks every pod for its status (concurrently), then one member for the membership, trying
/// the pod that says it leads first, then the other members.
pub async fn query_nodes<N: NodeApi>(api: &N, endpoints: &BTreeMap<u32, String>) -> NodeReports {
    let calls = endpoints.iter().map(|(ordinal, url)| async move {
        match api.status(url).await {
            Ok(status) => Some((*ordinal, status)),
            Err(error) => {
                debug!(ordinal, %error, "node did not report its status");
                None
            }
        }
    });
    let statuses: BTreeMap<u32, NodeStatus> = join_all(calls).await.into_iter().flatten().collect();

    let mut candidates: Vec<(&u32, &NodeStatus)> = statuses
        .iter()
        .filter(|(_, s)| matches!(s.membership, NodeMembership::Voter | NodeMembership::Learner))
        .collect();
    candidates.sort_by_key(|(ordinal, s)| (s.id != s.leader_id, **ordinal));
    let mut members = None;
    for (ordinal, _) in candidates {
        match api.members(&endpoints[ordinal]).await {
            Ok(m) => {
                members = Some(m);
                break;
            }
            Err(error) => debug!(ordinal, %error, "member did not report the membership"),
        }
    }
    NodeReports { statuses, members }
}

/// Joins pods, claims and node reports into the planner's view.
pub fn assemble(
    names: &ClusterNames,
    statefulset_replicas: u32,
    pods: &[PodFacts],
    claims: BTreeSet<u32>,
    removed_member_claims: BTreeMap<u32, u64>,
    reports: &NodeReports,
    bootstrap: Option<BootstrapRecord>,
) -> Observed {
    let pods_obs: BTreeMap<u32, PodObs> = pods
        .iter()
        .map(|p| {
            let node = reports.statuses.get(&p.ordinal).map(|s| NodeObs {
                id: s.id,
                cluster_id: s.cluster_id,
                membership: s.membership,
                commit_index: s.commit_index,
                peer_url: s.peer_url.clone().unwrap_or_default(),
            });
            let obs = PodObs {
                ordinal: p.ordinal,
                ready: p.ready,
                terminating: p.terminating,
                up_to_date: p.up_to_date,
                node,
                failure: p.failure.clone(),
                unready_since: p.unready_since,
            };
            (p.ordinal, obs)
        })
        .collect();
    let membership = reports.members.as_ref().map(|m| MembershipObs {
        leader_id: m.leader_id,
        members: m
            .members
            .iter()
            .map(|member| MemberObs {
                id: member.id,
                ordinal: member_ordinal(names, reports, member.id, member.peer_url.as_deref()),
                kind: member.role,
                match_index: member.match_index,
                healthy: member.healthy,
            })
            .collect(),
    });
    Observed {
        statefulset_replicas,
        pods: pods_obs,
        claims,
        removed_member_claims,
        membership,
        bootstrap,
    }
}

/// The pod a member lives on: the pod whose node reports that id; else the pod that advertises
/// the member's peer URL (a pod that came back with a new id under the old address); else the
/// ordinal named in the URL's DNS form.
fn member_ordinal(names: &ClusterNames, reports: &NodeReports, id: u64, peer_url: Option<&str>) -> Option<u32> {
    let by_id = reports.statuses.iter().find(|(_, s)| s.id == id);
    let by_url = || {
        let url = peer_url?;
        reports
            .statuses
            .iter()
            .find(|(_, s)| s.peer_url.as_deref() == Some(url))
    };
    by_id
        .or_else(by_url)
        .map(|(ordinal, _)| *ordinal)
        .or_else(|| names.ordinal_from_peer_url(peer_url?))
}

/// Gives members that no answering pod claims, and whose peer URL names no pod, the pod the
/// last written status placed them on.
///
/// Without cluster DNS (`--peer-addressing pod-ip`) a peer URL is an IP address and names no
/// ordinal, so while a member's pod restarts (a rollout step, a deleted pod) nothing else ties
/// the member to its ordinal; the planner would take it for a member beyond the target and
/// remove it as a scale-down, throwing away a healthy member and its volume.
pub fn recall_member_pods(names: &ClusterNames, observed: &mut Observed, previous: &[MemberStatus]) {
    let Some(membership) = observed.membership.as_mut() else {
        return;
    };
    for member in membership.members.iter_mut().filter(|m| m.ordinal.is_none()) {
        member.ordinal = previous
            .iter()
            .find(|p| p.id == member.id)
            .and_then(|p| p.pod.as_deref())
            .and_then(|pod| names.pod_ordinal(pod));
    }
}

/// What a reconcile has read about a cluster before asking its nodes: the input of
/// [`observe_and_plan`].
#[derive(Clone, Copy, Debug)]
pub struct Inputs<'a> {
    /// Names of the cluster's objects.
    pub names: &'a ClusterNames,
    /// The StatefulSet's replica count, or the count a missing one is recreated with.
    pub statefulset_replicas: u32,
    /// The cluster's pods.
    pub pods: &'a [PodFacts],
    /// The base URL of every pod's admin API, by ordinal (see [`endpoints`]).
    pub endpoints: &'a BTreeMap<u32, String>,
    /// Ordinals of the live data claims (see [`claim_ordinals`]).
    pub claims: &'a BTreeSet<u32>,
    /// The removed-member marks on the claims (see [`removed_member_claims`]).
    pub removed_member_claims: &'a BTreeMap<u32, u64>,
    /// The bootstrap record of the last written status.
    pub bootstrap: Option<&'a BootstrapRecord>,
    /// The members of the last written status, for [`recall_member_pods`].
    pub previous_members: &'a [MemberStatus],
}

/// What [`observe_and_plan`] saw and decided.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Planned {
    /// The planner's view of the cluster, for the status.
    pub observed: Observed,
    /// The one next step.
    pub step: Step,
}

/// Asks the nodes, joins their answers with what was read, and plans the next step: the one
/// pipeline from observation to decision, whoever drives it.
pub async fn observe_and_plan<N: NodeApi>(inputs: Inputs<'_>, desired: &Desired, nodes: &N) -> Planned {
    let reports = query_nodes(nodes, inputs.endpoints).await;
    let mut observed = assemble(
        inputs.names,
        inputs.statefulset_replicas,
        inputs.pods,
        inputs.claims.clone(),
        inputs.removed_member_claims.clone(),
        &reports,
        inputs.bootstrap.cloned(),
    );
    recall_member_pods(inputs.names, &mut observed, inputs.previous_members);
    let step = plan(desired, &observed);
    Planned { observed, step }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::MemberRole;
    use crate::node_client::MemberKind;

    fn member(id: u64, ordinal: Option<u32>) -> MemberObs {
        MemberObs {
            id,
            ordinal,
            kind: MemberKind::Voter,
            match_index: Some(10),
            healthy: Some(true),
        }
    }

    #[test]
    fn claim_marks_are_read_from_live_claims_of_this_cluster_only() {
        let names = ClusterNames::new("demo", "ns");
        let claim = |name: &str, mark: Option<&str>, deleted: bool| {
            let mut claim = PersistentVolumeClaim::default();
            claim.metadata.name = Some(name.into());
            claim.metadata.annotations = mark
                .map(|m| std::collections::BTreeMap::from([(REMOVED_MEMBER_ANNOTATION.to_string(), m.to_string())]));
            if deleted {
                claim.metadata.deletion_timestamp = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                    k8s_openapi::jiff::Timestamp::UNIX_EPOCH,
                ));
            }
            claim
        };
        let claims = [
            claim("data-demo-0", None, false),
            claim("data-demo-1", Some("105"), false),
            claim("data-demo-2", Some("not-an-id"), false),
            claim("data-demo-3", Some("107"), true),
            claim("data-other-4", Some("108"), false),
        ];
        assert_eq!(removed_member_claims(&names, &claims), BTreeMap::from([(1, 105)]));
    }

    #[test]
    fn a_crash_looping_node_is_read_from_its_container_status() {
        let pod = |state: serde_json::Value, ready: bool| -> Pod {
            serde_json::from_value(serde_json::json!({
                "metadata": {"name": "demo-1"},
                "status": {
                    "conditions": [{"type": "Ready", "status": if ready { "True" } else { "False" },
                        "lastTransitionTime": "2026-12-01T10:00:00Z"}],
                    "containerStatuses": [{"name": NODE_CONTAINER, "image": "x", "imageID": "", "ready": ready,
                        "restartCount": 2, "state": state,
                        "lastState": {"terminated": {"exitCode": 1, "reason": "Error",
                            "message": "raftkv-node: fatal [wal_damaged]: write-ahead log segment x is corrupt at offset 9\n"}}}],
                },
            }))
            .unwrap()
        };
        let names = ClusterNames::new("demo", "ns");
        let waiting = serde_json::json!({"waiting": {"reason": "CrashLoopBackOff", "message": "back-off 20s"}});
        let facts = pod_facts(&names, &pod(waiting, false), None).unwrap();
        let failure = facts.failure.expect("a failure");
        assert_eq!(failure.code, Some(FatalCode::WalDamaged));
        assert_eq!(failure.restarts, 2);
        assert_eq!(
            failure.message,
            "raftkv-node: fatal [wal_damaged]: write-ahead log segment x is corrupt at offset 9"
        );
        assert_eq!(
            facts.unready_since.map(|t| t.to_string()).as_deref(),
            Some("2026-12-01T10:00:00Z")
        );

        let running = serde_json::json!({"running": {"startedAt": "2026-12-01T10:01:00Z"}});
        let recovered = pod_facts(&names, &pod(running.clone(), true), None).unwrap();
        assert_eq!(
            (recovered.failure, recovered.unready_since),
            (None, None),
            "ready again: recovered"
        );
        let restarted = pod_facts(&names, &pod(running, false), None).unwrap();
        assert!(
            restarted.failure.is_some(),
            "running again but not ready since the crash"
        );
    }

    #[test]
    fn a_restarting_pods_member_keeps_the_ordinal_status_recorded() {
        let names = ClusterNames::new("demo", "ns");
        let mut observed = Observed {
            statefulset_replicas: 3,
            pods: BTreeMap::new(),
            claims: BTreeSet::new(),
            removed_member_claims: BTreeMap::new(),
            membership: Some(MembershipObs {
                leader_id: 1,
                members: vec![member(1, Some(0)), member(2, Some(1)), member(3, None), member(4, None)],
            }),
            bootstrap: None,
        };
        let previous = vec![
            MemberStatus {
                id: 3,
                pod: Some("demo-2".into()),
                role: MemberRole::Voter,
                healthy: Some(true),
            },
            MemberStatus {
                id: 1,
                pod: Some("demo-5".into()),
                role: MemberRole::Leader,
                healthy: Some(true),
            },
        ];
        recall_member_pods(&names, &mut observed, &previous);
        let ordinals: Vec<_> = observed.membership.unwrap().members.iter().map(|m| m.ordinal).collect();
        // Known ordinals stay; a member status never placed stays unknown.
        assert_eq!(ordinals, vec![Some(0), Some(1), Some(2), None]);
    }
}
