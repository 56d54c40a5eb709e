//! Pure computation of the `RaftCluster` status from what was observed and done.
//!
//! Conditions follow the Kubernetes convention: `Available` (a leader and a healthy quorum),
//! `Progressing` (the operator is moving the cluster towards the spec) and `Degraded` (something
//! needs attention), each with a CamelCase reason and a message. A condition keeps its
//! `lastTransitionTime` while its status does not change.
//!
//! Messages carry only what changes with the cluster's state (ids, counts of healthy voters),
//! never figures that change on every attempt (a learner's lag): a status that differs on every
//! reconcile is written on every reconcile, and each write triggers the next reconcile.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

use crate::build::ValidCluster;
use crate::crd::{BootstrapState, MemberRole, MemberStatus, Phase, RaftClusterStatus};
use crate::execute::{Execution, Outcome};
use crate::names::ClusterNames;
use crate::node_client::MemberKind;
use crate::plan::{quorum, FatalCode, Observed, PodObs, Step, TransferReason};

/// Condition type: the cluster serves reads and writes.
pub const AVAILABLE: &str = "Available";
/// Condition type: the operator is changing the cluster.
pub const PROGRESSING: &str = "Progressing";
/// Condition type: something needs attention.
pub const DEGRADED: &str = "Degraded";

fn condition(
    type_: &str,
    status: bool,
    reason: &str,
    message: String,
    generation: Option<i64>,
    previous: &[Condition],
    now: &Time,
) -> Condition {
    let status = if status { "True" } else { "False" };
    let last_transition_time = previous
        .iter()
        .find(|c| c.type_ == type_ && c.status == status)
        .map_or_else(|| now.clone(), |c| c.last_transition_time.clone());
    Condition {
        type_: type_.into(),
        status: status.into(),
        reason: reason.into(),
        message,
        observed_generation: generation,
        last_transition_time,
    }
}

/// Warnings about a spec that works but is probably not what the user wants.
pub fn spec_warnings(replicas: i32) -> Vec<String> {
    if replicas > 0 && replicas % 2 == 0 {
        vec![format!(
            "replicas is {replicas}: an even number of voters tolerates no more failures than {} and needs one more acknowledgement per write",
            replicas - 1
        )]
    } else {
        Vec::new()
    }
}

/// A part of the spec the operator cannot carry out while it still runs the cluster.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SpecIssue {
    /// The `Degraded` condition's reason, such as `StorageImmutable`.
    pub reason: &'static str,
    /// What differs and what to do about it.
    pub message: String,
}

/// The status after a reconcile that planned `step` and ended with `execution`; `issue` is a
/// part of the spec that was not carried out.
pub fn cluster_status(
    cluster: &ValidCluster,
    observed: &Observed,
    step: &Step,
    execution: &Execution,
    issue: Option<&SpecIssue>,
    previous: Option<&RaftClusterStatus>,
    now: &Time,
) -> RaftClusterStatus {
    let names = &cluster.names;
    let generation = cluster.generation;
    let previous_conditions = previous.map_or(&[][..], |p| &p.conditions[..]);
    let bootstrap = execution.bootstrap.clone().or_else(|| observed.bootstrap.clone());
    let bootstrapped = bootstrap.as_ref().is_some_and(|b| b.state == BootstrapState::Done);

    let members = member_statuses(names, observed);
    let voters = members.iter().filter(|m| m.role != MemberRole::Learner).count();
    let healthy_voters = members
        .iter()
        .filter(|m| m.role != MemberRole::Learner && m.healthy == Some(true))
        .count();
    let ready_voters = members
        .iter()
        .filter(|m| m.role != MemberRole::Learner)
        .filter(|m| pod_ready(names, observed, m.pod.as_deref()))
        .count();
    let leader = observed.membership.as_ref().and_then(|m| {
        let id = m.leader_id;
        m.members
            .iter()
            .find(|x| x.id == id)
            .and_then(|x| x.ordinal)
            .map(|o| names.pod(o))
    });

    let (available, available_reason, available_message) = if !bootstrapped {
        (
            false,
            "NotBootstrapped",
            "the cluster is not bootstrapped yet".to_string(),
        )
    } else if leader.is_none() {
        (false, "NoLeader", "no member reports a leader".to_string())
    } else if healthy_voters >= quorum(voters) {
        (
            true,
            "QuorumHealthy",
            format!("{healthy_voters} of {voters} voters healthy"),
        )
    } else {
        (
            false,
            "QuorumLost",
            format!(
                "{healthy_voters} of {voters} voters healthy, quorum is {}",
                quorum(voters)
            ),
        )
    };

    // Only the node's stable error code goes into the condition, not its message: a message
    // such as "lags the leader by 4711 entries" changes on every attempt, and every status change
    // triggers another reconcile. The message is in the operator's log.
    let deferred = match &execution.outcome {
        Outcome::Deferred { code, .. } => Some(format!("{step} deferred: {code}")),
        _ => None,
    };
    let (progressing, progressing_reason, progressing_message) = match step {
        Step::Converged if issue.is_some() => (
            false,
            "Reconciled",
            "the membership matches the spec; see the Degraded condition for the rest".to_string(),
        ),
        Step::Converged => (false, "Reconciled", "the cluster matches the spec".to_string()),
        Step::Blocked(reason) => (false, reason.reason(), reason.to_string()),
        Step::Wait(reason) => (true, "Waiting", reason.to_string()),
        other => (
            true,
            other.kind(),
            deferred.clone().unwrap_or_else(|| other.to_string()),
        ),
    };

    let unhealthy: Vec<u64> = members
        .iter()
        .filter(|m| m.role != MemberRole::Learner && m.healthy == Some(false))
        .map(|m| m.id)
        .collect();
    let pod_problem = pod_problem(names, cluster.replicas(), observed, now);
    // A refused step first: it is what stops the cluster from reaching the spec.
    let (degraded, degraded_reason, degraded_message) = match (step, issue, &pod_problem) {
        (Step::Blocked(reason), _, _) => (true, reason.reason(), reason.to_string()),
        (_, Some(issue), _) => (true, issue.reason, issue.message.clone()),
        (_, _, Some((reason, message))) => (true, *reason, message.clone()),
        _ if !unhealthy.is_empty() => (true, "MemberUnhealthy", format!("voters not healthy: {unhealthy:?}")),
        _ => (false, "AsExpected", "nothing needs attention".to_string()),
    };

    let phase = if !bootstrapped {
        match step {
            Step::Blocked(_) => Phase::Degraded,
            _ => Phase::Creating,
        }
    } else if degraded && (matches!(step, Step::Blocked(_)) || pod_problem.is_some()) || !available {
        Phase::Degraded
    } else {
        match step {
            Step::Converged => Phase::Running,
            Step::RestartPod { .. }
            | Step::TransferLeadership {
                reason: TransferReason::Rollout,
                ..
            } => Phase::Updating,
            Step::Wait(_) if observed.pods.values().any(|p| !p.up_to_date) => Phase::Updating,
            _ => Phase::Scaling,
        }
    };

    RaftClusterStatus {
        replicas: voters as i32,
        ready_replicas: ready_voters as i32,
        selector: names.selector_string(),
        leader,
        members,
        phase: Some(phase),
        conditions: vec![
            condition(
                AVAILABLE,
                available,
                available_reason,
                available_message,
                generation,
                previous_conditions,
                now,
            ),
            condition(
                PROGRESSING,
                progressing,
                progressing_reason,
                progressing_message,
                generation,
                previous_conditions,
                now,
            ),
            condition(
                DEGRADED,
                degraded,
                degraded_reason,
                degraded_message,
                generation,
                previous_conditions,
                now,
            ),
        ],
        warnings: spec_warnings(cluster.spec.replicas),
        observed_generation: generation,
        // Backups and the restore are advanced by the reconciler after this computation
        // (`crate::backup`); until then they stay as they were.
        backup: previous.and_then(|p| p.backup.clone()),
        restore: previous.and_then(|p| p.restore.clone()),
        bootstrap,
    }
}

/// Why the operator touches nothing of a cluster.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// The spec cannot be turned into objects.
    InvalidSpec,
    /// An object with one of the cluster's names belongs to another owner.
    NameConflict,
    /// A TLS cluster's certificate Secrets are missing or incomplete (a user-provided Secret
    /// not written yet, a `kubernetes.io/tls` Secret without `ca.crt`).
    CertificatesUnavailable,
}

impl Refusal {
    /// The condition reason.
    pub fn reason(self) -> &'static str {
        match self {
            Refusal::InvalidSpec => "InvalidSpec",
            Refusal::NameConflict => "NameConflict",
            Refusal::CertificatesUnavailable => "CertificatesUnavailable",
        }
    }

    fn phase(self) -> Phase {
        match self {
            Refusal::InvalidSpec => Phase::Invalid,
            Refusal::NameConflict | Refusal::CertificatesUnavailable => Phase::Degraded,
        }
    }
}

/// The status of a `RaftCluster` the operator refuses to act on. Everything observed earlier is
/// kept; only the phase and conditions say why nothing happens.
pub fn refused_status(
    names: &ClusterNames,
    generation: Option<i64>,
    refusal: Refusal,
    message: &str,
    previous: Option<&RaftClusterStatus>,
    now: &Time,
) -> RaftClusterStatus {
    let mut status = previous.cloned().unwrap_or_default();
    let previous_conditions = previous.map_or(&[][..], |p| &p.conditions[..]);
    let available = previous_conditions
        .iter()
        .find(|c| c.type_ == AVAILABLE)
        .cloned()
        .unwrap_or_else(|| {
            condition(
                AVAILABLE,
                false,
                "NotBootstrapped",
                "the cluster is not bootstrapped yet".into(),
                generation,
                previous_conditions,
                now,
            )
        });
    status.selector = names.selector_string();
    status.phase = Some(refusal.phase());
    status.observed_generation = generation;
    status.conditions = vec![
        available,
        condition(
            PROGRESSING,
            false,
            refusal.reason(),
            message.to_string(),
            generation,
            previous_conditions,
            now,
        ),
        condition(
            DEGRADED,
            true,
            refusal.reason(),
            message.to_string(),
            generation,
            previous_conditions,
            now,
        ),
    ];
    status
}

/// A Warning Event about the cluster becoming degraded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DegradedWarning {
    /// The `Degraded` condition's reason.
    pub reason: String,
    /// Its message, cut to the length an Event's note may have.
    pub note: String,
}

/// The most an Event's note may hold, in bytes (events.k8s.io/v1).
const EVENT_NOTE_LIMIT: usize = 1024;

/// The warning to publish when `next` is degraded and `previous` was not, or for another
/// reason; `None` while nothing changed, so a cluster that stays degraded warns once.
pub fn degraded_warning(previous: Option<&RaftClusterStatus>, next: &RaftClusterStatus) -> Option<DegradedWarning> {
    let degraded = |status: &RaftClusterStatus| {
        status
            .conditions
            .iter()
            .find(|c| c.type_ == DEGRADED && c.status == "True")
            .map(|c| (c.reason.clone(), c.message.clone()))
    };
    let (reason, message) = degraded(next)?;
    if previous.and_then(degraded).is_some_and(|(was, _)| was == reason) {
        return None;
    }
    let mut note = message;
    if note.len() > EVENT_NOTE_LIMIT {
        let mut end = EVENT_NOTE_LIMIT - 3;
        while !note.is_char_boundary(end) {
            end -= 1;
        }
        note.truncate(end);
        note.push_str("...");
    }
    Some(DegradedWarning { reason, note })
}

/// How long a pod may be unready, or crash without saying why, before the cluster is reported
/// degraded: longer than a member takes to start and catch up on a loaded node, short enough
/// that a stuck pod is noticed while someone still remembers what changed.
pub const POD_UNREADY_GRACE: std::time::Duration = std::time::Duration::from_secs(120);

/// The first pod that needs a person's attention, as a `Degraded` reason and message.
///
/// A node that stopped with a fatal error it names is reported at once: damaged data, a volume
/// of a removed member the operator may not replace, any other fatal error. A pod that crashes
/// without a fatal line, or is just not ready, is reported once it has been so for
/// [`POD_UNREADY_GRACE`]. A pod whose node answers for another cluster holds data that is not
/// this cluster's. A removed member's volume that the planner replaces is its own step, not a
/// problem, and so are pods at or above `replicas`, which a scale-down retires. Nothing here is
/// ever deleted: the messages say so.
fn pod_problem(names: &ClusterNames, replicas: u32, observed: &Observed, now: &Time) -> Option<(&'static str, String)> {
    let ours = observed.bootstrap.as_ref().and_then(|b| b.cluster_id);
    let members: Vec<u64> = observed
        .membership
        .as_ref()
        .map(|m| m.members.iter().map(|m| m.id).collect())
        .unwrap_or_default();
    let overdue = |pod: &PodObs| {
        pod.unready_since
            .is_some_and(|since| now.0.as_second() - since.as_second() >= POD_UNREADY_GRACE.as_secs() as i64)
    };
    // Pods at or above the target are on their way out with their members.
    let current = observed
        .pods
        .values()
        .filter(|p| !p.terminating && p.ordinal < replicas);
    current.into_iter().find_map(|pod| {
        let name = names.pod(pod.ordinal);
        if let Some(failure) = &pod.failure {
            let line = &failure.message;
            match &failure.code {
                Some(FatalCode::RemovedMember { member, cluster })
                    if Some(*cluster) == ours && !members.contains(member) =>
                {
                    return None;
                }
                Some(FatalCode::RemovedMember { member, cluster }) => {
                    return Some((
                        "VolumeRefused",
                        format!(
                            "pod {name} refuses its volume, which holds removed member {member} of cluster {cluster}; it is not replaced automatically and nothing was deleted: {line}"
                        ),
                    ))
                }
                Some(FatalCode::WalDamaged | FatalCode::SnapshotDamaged) => {
                    return Some((
                        "VolumeDamaged",
                        format!(
                            "pod {name} stopped on damaged data; nothing was deleted, as its volume may still be needed: {line}"
                        ),
                    ))
                }
                Some(FatalCode::Other(_)) => {
                    return Some(("PodFailing", format!("pod {name} stopped: {line}")));
                }
                None if overdue(pod) => {
                    return Some(("PodCrashLooping", format!("pod {name} keeps crashing: {line}")));
                }
                None => {}
            }
        }
        if let (Some(node), Some(ours)) = (&pod.node, ours) {
            if node.cluster_id != 0 && node.cluster_id != ours {
                return Some((
                    "ForeignVolume",
                    format!(
                        "pod {name} holds member {} of cluster {}, not of this cluster ({ours}); nothing was deleted",
                        node.id, node.cluster_id
                    ),
                ));
            }
        }
        if overdue(pod) {
            let since = pod.unready_since.map(|t| t.to_string()).unwrap_or_default();
            return Some(("PodNotReady", format!("pod {name} has not been ready since {since}")));
        }
        None
    })
}

fn pod_ready(names: &ClusterNames, observed: &Observed, pod: Option<&str>) -> bool {
    pod.and_then(|p| names.pod_ordinal(p))
        .and_then(|o| observed.pods.get(&o))
        .is_some_and(|p| p.ready)
}

fn member_statuses(names: &ClusterNames, observed: &Observed) -> Vec<MemberStatus> {
    let Some(membership) = &observed.membership else {
        return Vec::new();
    };
    let mut members: Vec<MemberStatus> = membership
        .members
        .iter()
        .map(|m| MemberStatus {
            id: m.id,
            pod: m.ordinal.map(|o| names.pod(o)),
            role: match m.kind {
                MemberKind::Learner => MemberRole::Learner,
                MemberKind::Voter if m.id == membership.leader_id => MemberRole::Leader,
                MemberKind::Voter => MemberRole::Voter,
            },
            healthy: m
                .healthy
                .or_else(|| m.ordinal.and_then(|o| observed.pods.get(&o)).map(|p| p.ready)),
        })
        .collect();
    members.sort_by(|a, b| a.pod.cmp(&b.pod).then(a.id.cmp(&b.id)));
    members
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};

    use k8s_openapi::jiff::Timestamp;

    use super::*;
    use crate::build::validate;
    use crate::config::OperatorConfig;
    use crate::crd::{BootstrapRecord, BootstrapState};
    use crate::fixtures::raft_cluster;
    use crate::plan::{MemberObs, MembershipObs, PodObs, WaitReason};

    #[test]
    fn missing_certificates_are_a_degraded_refusal_with_their_reason() {
        let now = Time(Timestamp::now());
        let message = "Secret demo-peer-cert does not exist";
        let status = refused_status(
            &valid().names,
            Some(3),
            Refusal::CertificatesUnavailable,
            message,
            None,
            &now,
        );
        assert_eq!(status.phase, Some(Phase::Degraded));
        let degraded = status.conditions.iter().find(|c| c.type_ == DEGRADED).unwrap();
        assert_eq!(
            (
                degraded.status.as_str(),
                degraded.reason.as_str(),
                degraded.message.as_str()
            ),
            ("True", "CertificatesUnavailable", message)
        );
    }

    fn valid() -> ValidCluster {
        validate(&raft_cluster(4, Some("raftkv/node:test")), &OperatorConfig::default()).unwrap()
    }

    /// Three healthy voters on pods 0..3, led by the first, and a learner on pod 3.
    fn observed() -> Observed {
        let member = |id: u64, ordinal: u32, kind: MemberKind| MemberObs {
            id,
            ordinal: Some(ordinal),
            kind,
            match_index: Some(10),
            healthy: Some(true),
        };
        Observed {
            statefulset_replicas: 4,
            pods: (0..4)
                .map(|o| {
                    let pod = PodObs {
                        ordinal: o,
                        ready: o < 3,
                        terminating: false,
                        up_to_date: true,
                        node: None,
                        failure: None,
                        unready_since: None,
                    };
                    (o, pod)
                })
                .collect(),
            claims: BTreeSet::from([0, 1, 2, 3]),
            removed_member_claims: BTreeMap::new(),
            membership: Some(MembershipObs {
                leader_id: 1,
                members: vec![
                    member(1, 0, MemberKind::Voter),
                    member(2, 1, MemberKind::Voter),
                    member(3, 2, MemberKind::Voter),
                    member(4, 3, MemberKind::Learner),
                ],
            }),
            bootstrap: Some(BootstrapRecord {
                member_id: 1,
                state: BootstrapState::Done,
                cluster_id: Some(7),
            }),
        }
    }

    fn at(seconds: i64) -> Time {
        Time(Timestamp::from_second(seconds).unwrap())
    }

    fn deferred(message: &str) -> Execution {
        Execution {
            outcome: Outcome::Deferred {
                code: "learner_lagging".into(),
                message: message.into(),
            },
            bootstrap: None,
        }
    }

    #[test]
    fn a_deferred_steps_conditions_leave_out_the_nodes_changing_message() {
        let step = Step::Promote { member_id: 4, via: 0 };
        let first = cluster_status(
            &valid(),
            &observed(),
            &step,
            &deferred("learner 4 lags the leader by 120 entries"),
            None,
            None,
            &at(100),
        );
        let second = cluster_status(
            &valid(),
            &observed(),
            &step,
            &deferred("learner 4 lags the leader by 37 entries"),
            None,
            Some(&first),
            &at(105),
        );
        assert_eq!(first, second, "nothing worth a write changed");
        let progressing = second.conditions.iter().find(|c| c.type_ == PROGRESSING).unwrap();
        assert_eq!(
            progressing.message,
            "promote learner 4 to voter deferred: learner_lagging"
        );
    }

    fn degraded(reason: &str, message: &str) -> RaftClusterStatus {
        let nothing = Execution {
            outcome: Outcome::Nothing,
            bootstrap: None,
        };
        let mut status = cluster_status(&valid(), &observed(), &Step::Converged, &nothing, None, None, &at(1));
        let condition = status.conditions.iter_mut().find(|c| c.type_ == DEGRADED).unwrap();
        if !reason.is_empty() {
            condition.status = "True".into();
            condition.reason = reason.into();
            condition.message = message.into();
        }
        status
    }

    #[test]
    fn a_warning_is_due_when_the_degraded_reason_changes_and_only_then() {
        let healthy = degraded("", "");
        let no_leader = degraded("NoLeader", "no member reports a leader");
        let quorum = degraded("WouldLoseQuorum", "refusing to remove member 3: ...");
        let warning = |before: Option<&RaftClusterStatus>, after: &RaftClusterStatus| {
            degraded_warning(before, after).map(|w| w.reason)
        };
        assert_eq!(warning(None, &no_leader).as_deref(), Some("NoLeader"));
        assert_eq!(warning(Some(&healthy), &no_leader).as_deref(), Some("NoLeader"));
        assert_eq!(warning(Some(&no_leader), &no_leader), None, "still the same reason");
        assert_eq!(warning(Some(&no_leader), &quorum).as_deref(), Some("WouldLoseQuorum"));
        assert_eq!(warning(Some(&quorum), &healthy), None, "recovering is no warning");
        assert_eq!(warning(None, &healthy), None);
    }

    #[test]
    fn a_warning_note_fits_an_events_limit() {
        let long = degraded("StorageImmutable", &"é".repeat(EVENT_NOTE_LIMIT));
        let warning = degraded_warning(None, &long).unwrap();
        assert!(warning.note.len() <= EVENT_NOTE_LIMIT);
        assert!(warning.note.ends_with("..."));
    }

    fn degraded_condition(observed: &Observed, now: i64) -> (String, String, Option<Phase>) {
        let nothing = Execution {
            outcome: Outcome::Nothing,
            bootstrap: None,
        };
        let step = Step::Wait(WaitReason::MemberNotHealthy(2));
        let status = cluster_status(&valid(), observed, &step, &nothing, None, None, &at(now));
        let c = status.conditions.iter().find(|c| c.type_ == DEGRADED).unwrap();
        (c.status.clone(), format!("{}: {}", c.reason, c.message), status.phase)
    }

    fn failure(line: &str) -> Option<crate::plan::PodFailure> {
        Some(crate::plan::PodFailure {
            message: line.into(),
            code: FatalCode::parse(line),
            restarts: 3,
        })
    }

    #[test]
    fn a_pod_stopped_on_damaged_data_degrades_the_cluster_at_once_and_by_name() {
        let mut obs = observed();
        let line = "raftkv-node: fatal [wal_damaged]: write-ahead log segment wal/1.log is corrupt at offset 40";
        let pod = obs.pods.get_mut(&1).unwrap();
        pod.ready = false;
        pod.failure = failure(line);
        pod.unready_since = Some(at(99).0);
        let (status, text, phase) = degraded_condition(&obs, 100);
        assert_eq!(status, "True");
        assert!(
            text.starts_with("VolumeDamaged: pod demo-1 stopped on damaged data"),
            "{text}"
        );
        assert!(text.contains("nothing was deleted") && text.ends_with(line), "{text}");
        assert_eq!(phase, Some(Phase::Degraded));
    }

    #[test]
    fn a_pod_that_is_unready_or_crashes_without_a_reason_degrades_the_cluster_after_the_grace() {
        let mut obs = observed();
        let pod = obs.pods.get_mut(&2).unwrap();
        pod.ready = false;
        pod.unready_since = Some(at(1000).0);
        let grace = POD_UNREADY_GRACE.as_secs() as i64;
        assert_eq!(
            degraded_condition(&obs, 1000 + grace - 1).0,
            "False",
            "within the grace"
        );
        let (status, text, _) = degraded_condition(&obs, 1000 + grace);
        assert_eq!(status, "True");
        assert_eq!(
            text,
            "PodNotReady: pod demo-2 has not been ready since 1970-01-01T00:16:40Z"
        );

        obs.pods.get_mut(&2).unwrap().failure = failure("CrashLoopBackOff: back-off 40s restarting failed container");
        let (_, text, _) = degraded_condition(&obs, 1000 + grace);
        assert!(
            text.starts_with("PodCrashLooping: pod demo-2 keeps crashing: CrashLoopBackOff"),
            "{text}"
        );
    }

    #[test]
    fn a_removed_members_volume_being_replaced_is_not_a_problem_but_a_listed_members_is() {
        let mut obs = observed();
        let pod = obs.pods.get_mut(&2).unwrap();
        pod.ready = false;
        pod.failure = failure("raftkv-node: fatal [removed_member member=55 cluster=7]: ...");
        assert_eq!(degraded_condition(&obs, 100).0, "False", "the planner replaces it");
        obs.pods.get_mut(&2).unwrap().failure = failure("raftkv-node: fatal [removed_member member=3 cluster=7]: ...");
        let (status, text, _) = degraded_condition(&obs, 100);
        assert_eq!(status, "True", "member 3 is still listed");
        assert!(text.starts_with("VolumeRefused: pod demo-2"), "{text}");
        obs.pods.get_mut(&2).unwrap().failure = failure("raftkv-node: fatal [removed_member member=55 cluster=8]: ...");
        assert_eq!(degraded_condition(&obs, 100).0, "True", "another cluster's member");
    }

    #[test]
    fn a_pod_holding_another_clusters_member_is_reported_and_left_alone() {
        let mut obs = observed();
        obs.pods.get_mut(&1).unwrap().node = Some(crate::plan::NodeObs {
            id: 900,
            cluster_id: 8,
            membership: crate::node_client::NodeMembership::Voter,
            commit_index: 10,
            peer_url: "http://demo-1:8081".into(),
        });
        let (status, text, phase) = degraded_condition(&obs, 100);
        assert_eq!(status, "True");
        assert_eq!(
            text,
            "ForeignVolume: pod demo-1 holds member 900 of cluster 8, not of this cluster (7); nothing was deleted"
        );
        assert_eq!(phase, Some(Phase::Degraded));
    }

    #[test]
    fn an_unchanged_cluster_gets_an_identical_status_later() {
        let step = Step::Wait(WaitReason::LearnerCatchingUp(4));
        let nothing = Execution {
            outcome: Outcome::Nothing,
            bootstrap: None,
        };
        let first = cluster_status(&valid(), &observed(), &step, &nothing, None, None, &at(100));
        let later = cluster_status(&valid(), &observed(), &step, &nothing, None, Some(&first), &at(160));
        assert_eq!(first, later);
    }
}
