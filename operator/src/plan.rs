//! The membership planner: from what the operator wants and what it observed, the ONE next step.
//!
//! `plan` is a pure function. It never performs I/O and never proposes more than one change, so
//! the reconcile loop can call it again after every step with fresh observations; an operator
//! that crashed half-way through a step simply observes the half-done state and the planner
//! proposes the remaining half. The rules, in priority order:
//!
//! 1. Bootstrap exactly once: only when no node anywhere belongs to a cluster and the status holds
//!    no completed bootstrap record; a node found already in a cluster is adopted instead.
//! 2. Without a leader nothing changes.
//! 3. A member whose pod came back with a new member id (its volume was lost) is replaced: the
//!    new member joins as a learner and is promoted, then the old id is removed.
//! 4. Scale-up raises the StatefulSet first; pods below the target join as learners one at a time
//!    and are promoted once caught up.
//! 5. Scale-down removes learners, then followers from the highest ordinal down, then the leader
//!    after moving leadership away; only then shrinks the StatefulSet and deletes the claims.
//!    Each removed member's claim is marked with its id first: should the scale-down be undone
//!    before the claim is deleted, a pod restarted on that volume does not even start (the node
//!    refuses a removed member's volume), and the mark is what tells the planner to reset it.
//! 6. Rollouts restart one outdated pod at a time, the leader's last after a transfer, and only
//!    while every voter is healthy.
//!
//! Every voter removal, promotion and pod restart is checked against quorum: the step is refused
//! (and reported as [`Step::Blocked`]) when it would leave fewer healthy voters than a majority.
//! The one exception is a rollout restart in a cluster of one or two voters, which tolerates no
//! failure at all: there every restart is an outage, accepted so the pods can be updated at all.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use k8s_openapi::jiff::Timestamp;

use crate::crd::{BootstrapRecord, BootstrapState};
pub use crate::failure::{FatalCode, PodFailure};
use crate::node_client::{MemberKind, NodeMembership};

/// What the user asked for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Desired {
    /// Number of voters.
    pub replicas: u32,
    /// How many entries a learner may trail the leader's commit index and still be promoted.
    pub max_lag: u64,
}

/// A node's own report, from `GET /v1/status` on its pod.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeObs {
    /// The member id on the pod's volume.
    pub id: u64,
    /// The cluster the node belongs to; 0 for none.
    pub cluster_id: u64,
    /// How the node believes it belongs to the membership.
    pub membership: NodeMembership,
    /// The node's commit index (used from the leader's pod to judge learners).
    pub commit_index: u64,
    /// The peer URL the node advertises, used when adding it.
    pub peer_url: String,
}

/// One pod of the StatefulSet.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodObs {
    /// The pod's ordinal.
    pub ordinal: u32,
    /// The pod's `Ready` condition (for a member: caught up and knows the leader).
    pub ready: bool,
    /// The pod has a deletion timestamp.
    pub terminating: bool,
    /// The pod runs the StatefulSet's current template revision.
    pub up_to_date: bool,
    /// The node's status, when the pod answered.
    pub node: Option<NodeObs>,
    /// Why the pod's node stopped, while it has not run again (see [`crate::observe::pod_failure`]).
    pub failure: Option<PodFailure>,
    /// Since when the pod has not been ready; `None` while it is.
    pub unready_since: Option<Timestamp>,
}

/// One member of the applied membership, as the leader sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MemberObs {
    /// The member id.
    pub id: u64,
    /// The ordinal of the pod the member's peer URL names, when it is one of ours.
    pub ordinal: Option<u32>,
    /// Voter or learner.
    pub kind: MemberKind,
    /// The leader's match index for the member.
    pub match_index: Option<u64>,
    /// The leader's view of the member's health.
    pub healthy: Option<bool>,
}

/// The applied membership.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MembershipObs {
    /// The leader; 0 when none is known.
    pub leader_id: u64,
    /// Voters and learners.
    pub members: Vec<MemberObs>,
}

/// Everything the planner looks at.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Observed {
    /// The StatefulSet's replica count as the operator last set it.
    pub statefulset_replicas: u32,
    /// Pods by ordinal.
    pub pods: BTreeMap<u32, PodObs>,
    /// Ordinals that have a data claim.
    pub claims: BTreeSet<u32>,
    /// Claims marked, before a scale-down removed their member, with that member's id, by
    /// ordinal. A node refuses to start on a removed member's volume and so never answers; the
    /// mark is how the planner still knows what such a pod's volume holds.
    pub removed_member_claims: BTreeMap<u32, u64>,
    /// The membership, when a member answered.
    pub membership: Option<MembershipObs>,
    /// The bootstrap record from status.
    pub bootstrap: Option<BootstrapRecord>,
}

/// Why a member is removed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RemovalReason {
    /// Scale-down: its ordinal is at or above the desired replica count.
    ScaleDown,
    /// Its pod came back with a different member id (the volume was replaced).
    Replaced,
}

/// Why leadership moves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TransferReason {
    /// The leader is about to be removed by a scale-down.
    ScaleDown,
    /// The leader's pod is about to be restarted by a rollout.
    Rollout,
}

/// Why the planner waits; nothing is wrong, the cluster is on its way.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WaitReason {
    /// A pod that must take part in the next step does not answer yet.
    PodNotAnswering(u32),
    /// A learner is still catching up with the leader's log.
    LearnerCatchingUp(u64),
    /// A voter is not healthy yet (for example after its pod restarted).
    MemberNotHealthy(u64),
    /// A pod is being deleted.
    PodTerminating(u32),
    /// A pod is not ready yet.
    PodNotReady(u32),
    /// A pod above the StatefulSet's replica count is still there; the StatefulSet controller
    /// deletes it.
    PodAboveStatefulSet(u32),
}

/// Why the planner refuses to act; a person may need to look.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BlockReason {
    /// No member answered with a leader.
    NoLeader,
    /// The leader's peer URL does not name one of this cluster's pods.
    LeaderNotOurs(u64),
    /// The next step would leave fewer healthy voters than a majority.
    WouldLoseQuorum {
        /// The step that was refused.
        step: Box<Step>,
        /// Healthy voters the step would leave.
        healthy_after: usize,
        /// Voters the step would leave.
        voters_after: usize,
    },
    /// The status says a bootstrap of `member_id` started, but that member's pod now reports
    /// another id and no node belongs to a cluster: the first member's volume was lost before it
    /// was recorded as done. Bootstrapping again could split the data, so a person decides.
    BootstrapInterrupted {
        /// The member the operator started to bootstrap.
        member_id: u64,
    },
    /// The cluster was bootstrapped, yet no member is left in the membership view.
    NoMembers,
}

/// The one step the executor performs next.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Step {
    /// Make the node at `ordinal` the first voter of a new cluster.
    Bootstrap {
        /// The pod to bootstrap (always 0).
        ordinal: u32,
        /// Its member id, recorded in status before the call.
        member_id: u64,
    },
    /// Record a bootstrap that already happened (an interrupted step, or an existing cluster
    /// found on the volumes).
    RecordBootstrap {
        /// The first member.
        member_id: u64,
        /// The cluster id found on the nodes.
        cluster_id: u64,
    },
    /// Set the StatefulSet's replica count.
    ScaleStatefulSet {
        /// The current count.
        from: u32,
        /// The new count.
        to: u32,
    },
    /// Add the node at `ordinal` as a learner.
    AddLearner {
        /// The pod.
        ordinal: u32,
        /// Its member id.
        member_id: u64,
        /// Its advertised peer URL.
        peer_url: String,
        /// The pod the call goes to (the leader's).
        via: u32,
    },
    /// Promote a caught-up learner to voter.
    Promote {
        /// The learner.
        member_id: u64,
        /// The pod the call goes to (the leader's).
        via: u32,
    },
    /// Remove a member. For a scale-down, its claim is first marked with its id (see
    /// [`Observed::removed_member_claims`]).
    RemoveMember {
        /// The member.
        member_id: u64,
        /// Its pod, when it has one of ours.
        ordinal: Option<u32>,
        /// Why it goes.
        reason: RemovalReason,
        /// The pod the call goes to (the leader's).
        via: u32,
    },
    /// Move leadership to another voter.
    TransferLeadership {
        /// The current leader.
        from: u64,
        /// The voter to lead next.
        to: u64,
        /// Why.
        reason: TransferReason,
        /// The pod the call goes to (the leader's).
        via: u32,
    },
    /// Delete the data claim of a removed member whose pod is gone from the StatefulSet
    /// (after a shrink, or before a growth would start a pod on it again).
    DeleteClaim {
        /// The ordinal whose claim goes.
        ordinal: u32,
    },
    /// Give the pod at `ordinal` a fresh volume: its node's member was removed, and a removed
    /// member's volume refuses to rejoin (a node restarted on it does not even start), so the
    /// claim is deleted and the pod recreated.
    ResetVolume {
        /// The pod.
        ordinal: u32,
    },
    /// Delete an outdated pod so the StatefulSet recreates it from the current template.
    RestartPod {
        /// The pod.
        ordinal: u32,
    },
    /// Nothing to do until something changes.
    Wait(WaitReason),
    /// Refused; see the reason.
    Blocked(BlockReason),
    /// The cluster matches the spec.
    Converged,
}

impl Step {
    /// Whether the step changes the Raft membership.
    pub fn is_membership_change(&self) -> bool {
        matches!(
            self,
            Step::Bootstrap { .. } | Step::AddLearner { .. } | Step::Promote { .. } | Step::RemoveMember { .. }
        )
    }

    /// A short, stable name for metrics, events and condition reasons.
    pub fn kind(&self) -> &'static str {
        match self {
            Step::Bootstrap { .. } => "Bootstrap",
            Step::RecordBootstrap { .. } => "RecordBootstrap",
            Step::ScaleStatefulSet { .. } => "ScaleStatefulSet",
            Step::AddLearner { .. } => "AddLearner",
            Step::Promote { .. } => "PromoteLearner",
            Step::RemoveMember { .. } => "RemoveMember",
            Step::TransferLeadership { .. } => "TransferLeadership",
            Step::DeleteClaim { .. } => "DeleteClaim",
            Step::ResetVolume { .. } => "ResetVolume",
            Step::RestartPod { .. } => "RestartPod",
            Step::Wait(_) => "Wait",
            Step::Blocked(_) => "Blocked",
            Step::Converged => "Converged",
        }
    }
}

impl fmt::Display for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Step::Bootstrap { ordinal, member_id } => {
                write!(f, "bootstrap member {member_id} on pod ordinal {ordinal}")
            }
            Step::RecordBootstrap { member_id, cluster_id } => {
                write!(f, "record the bootstrap of member {member_id} (cluster {cluster_id})")
            }
            Step::ScaleStatefulSet { from, to } => {
                write!(f, "scale the StatefulSet from {from} to {to} pods")
            }
            Step::AddLearner { ordinal, member_id, .. } => {
                write!(f, "add member {member_id} (ordinal {ordinal}) as a learner")
            }
            Step::Promote { member_id, .. } => write!(f, "promote learner {member_id} to voter"),
            Step::RemoveMember { member_id, reason, .. } => {
                let why = match reason {
                    RemovalReason::ScaleDown => "scale-down",
                    RemovalReason::Replaced => "its pod came back with a new member id",
                };
                write!(f, "remove member {member_id} ({why})")
            }
            Step::TransferLeadership { from, to, .. } => {
                write!(f, "transfer leadership from {from} to {to}")
            }
            Step::DeleteClaim { ordinal } => {
                write!(f, "delete the data claim of ordinal {ordinal}")
            }
            Step::ResetVolume { ordinal } => {
                write!(f, "give ordinal {ordinal} a fresh volume (its member was removed)")
            }
            Step::RestartPod { ordinal } => {
                write!(f, "restart pod ordinal {ordinal} onto the current template")
            }
            Step::Wait(reason) => write!(f, "wait: {reason}"),
            Step::Blocked(reason) => write!(f, "blocked: {reason}"),
            Step::Converged => write!(f, "converged"),
        }
    }
}

impl fmt::Display for WaitReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            WaitReason::PodNotAnswering(o) => write!(f, "pod ordinal {o} does not answer yet"),
            WaitReason::LearnerCatchingUp(id) => write!(f, "learner {id} is catching up"),
            WaitReason::MemberNotHealthy(id) => write!(f, "member {id} is not healthy"),
            WaitReason::PodTerminating(o) => write!(f, "pod ordinal {o} is terminating"),
            WaitReason::PodNotReady(o) => write!(f, "pod ordinal {o} is not ready"),
            WaitReason::PodAboveStatefulSet(o) => {
                write!(
                    f,
                    "pod ordinal {o} is above the StatefulSet's replica count and has yet to go"
                )
            }
        }
    }
}

impl fmt::Display for BlockReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BlockReason::NoLeader => write!(f, "no member reports a leader"),
            BlockReason::LeaderNotOurs(id) => {
                write!(f, "leader {id} is not one of this cluster's pods")
            }
            BlockReason::WouldLoseQuorum {
                step,
                healthy_after,
                voters_after,
            } => write!(
                f,
                "refusing to {step}: it would leave {healthy_after} healthy of {voters_after} voters, fewer than a quorum of {}",
                quorum(*voters_after)
            ),
            BlockReason::BootstrapInterrupted { member_id } => write!(
                f,
                "the bootstrap of member {member_id} was interrupted and its pod now has another member id; clear status.bootstrap to bootstrap again"
            ),
            BlockReason::NoMembers => write!(f, "the membership is empty"),
        }
    }
}

impl BlockReason {
    /// A CamelCase reason for conditions and events.
    pub fn reason(&self) -> &'static str {
        match self {
            BlockReason::NoLeader => "NoLeader",
            BlockReason::LeaderNotOurs(_) => "LeaderNotOurs",
            BlockReason::WouldLoseQuorum { .. } => "WouldLoseQuorum",
            BlockReason::BootstrapInterrupted { .. } => "BootstrapInterrupted",
            BlockReason::NoMembers => "NoMembers",
        }
    }
}

/// The replica count of a StatefulSet that does not exist (yet).
///
/// A new cluster starts at the desired count: it has no membership to keep in step. A
/// bootstrapped cluster whose StatefulSet is gone (deleted by hand, or with orphaned pods) still
/// has members and volumes, possibly at ordinals the spec no longer wants; recreated at the
/// desired count, the StatefulSet would delete those members' pods without their Raft removal.
/// So it comes back large enough for the highest member (as last recorded in status) and the
/// highest claim, and any scale-down then goes through the membership steps.
pub fn recreated_statefulset_replicas(
    desired: u32,
    bootstrapped: bool,
    member_ordinals: impl IntoIterator<Item = u32>,
    claim_ordinals: &BTreeSet<u32>,
) -> u32 {
    if !bootstrapped {
        return desired;
    }
    let highest = member_ordinals.into_iter().chain(claim_ordinals.iter().copied()).max();
    highest.map_or(desired, |o| desired.max(o.saturating_add(1)))
}

/// Votes needed for a majority of `voters`.
pub fn quorum(voters: usize) -> usize {
    voters / 2 + 1
}

/// Computes the next step.
pub fn plan(desired: &Desired, observed: &Observed) -> Step {
    match &observed.bootstrap {
        Some(record) if record.state == BootstrapState::Done => {}
        record => return plan_bootstrap(observed, record.as_ref()),
    }
    let Some(membership) = &observed.membership else {
        return Step::Blocked(BlockReason::NoLeader);
    };
    if membership.members.is_empty() {
        return Step::Blocked(BlockReason::NoMembers);
    }
    if membership.leader_id == 0 {
        return Step::Blocked(BlockReason::NoLeader);
    }
    let Some(leader) = membership.members.iter().find(|m| m.id == membership.leader_id) else {
        return Step::Blocked(BlockReason::NoLeader);
    };
    let Some(via) = leader.ordinal else {
        return Step::Blocked(BlockReason::LeaderNotOurs(leader.id));
    };
    Planner {
        desired,
        observed,
        membership,
        leader_id: leader.id,
        via,
    }
    .next()
}

fn plan_bootstrap(observed: &Observed, record: Option<&BootstrapRecord>) -> Step {
    // A node already in a cluster means a bootstrap happened: either ours, interrupted before
    // it was recorded as done, or a previous RaftCluster's whose volumes were kept. Adopt it.
    let initialised = observed
        .pods
        .values()
        .filter_map(|p| p.node.as_ref())
        .find(|n| n.cluster_id != 0);
    if let Some(node) = initialised {
        return Step::RecordBootstrap {
            member_id: record.map_or(node.id, |r| r.member_id),
            cluster_id: node.cluster_id,
        };
    }
    // Every existing pod must answer: one that does not could hold an initialised volume.
    if let Some(silent) = observed.pods.values().find(|p| p.node.is_none()) {
        return Step::Wait(WaitReason::PodNotAnswering(silent.ordinal));
    }
    let Some(first) = observed.pods.get(&0).and_then(|p| p.node.as_ref()) else {
        return Step::Wait(WaitReason::PodNotAnswering(0));
    };
    match first.membership {
        NodeMembership::None => {}
        // A removed member's volume never bootstraps nor joins; it needs a fresh one.
        NodeMembership::Removed => return Step::ResetVolume { ordinal: 0 },
        NodeMembership::Voter | NodeMembership::Learner => return Step::Wait(WaitReason::PodNotReady(0)),
    }
    match record {
        Some(r) if r.member_id != first.id => {
            Step::Blocked(BlockReason::BootstrapInterrupted { member_id: r.member_id })
        }
        // Retrying the bootstrap of the recorded member is safe: the node refuses a second
        // bootstrap with `already_initialized`, and the executor treats that as success.
        _ => Step::Bootstrap {
            ordinal: 0,
            member_id: first.id,
        },
    }
}

/// One planning pass over a cluster with a leader on one of its pods.
struct Planner<'a> {
    /// What the user asked for.
    desired: &'a Desired,
    /// What was observed.
    observed: &'a Observed,
    /// The observed membership (present: without one there is nothing to plan from).
    membership: &'a MembershipObs,
    /// The leader's member id.
    leader_id: u64,
    /// The leader's pod ordinal: membership calls go through it.
    via: u32,
}

impl Planner<'_> {
    fn next(&self) -> Step {
        let target = self.desired.replicas;
        if let Some(step) = self.replace_stale_member() {
            return step;
        }
        if self.observed.statefulset_replicas < target {
            if let Some(step) = self.clear_retired_claims() {
                return step;
            }
            return Step::ScaleStatefulSet {
                from: self.observed.statefulset_replicas,
                to: target,
            };
        }
        if let Some(step) = self.settle_learners() {
            return step;
        }
        // Pods below the target join before members above it leave: the leader may sit above
        // the target and need a successor below it, and a replaced member's pod is part of
        // the final membership either way. Learners never change the quorum.
        if let Some(step) = self.add_learner() {
            return step;
        }
        if let Some(step) = self.scale_down() {
            return step;
        }
        if self.observed.statefulset_replicas > target {
            return Step::ScaleStatefulSet {
                from: self.observed.statefulset_replicas,
                to: target,
            };
        }
        if let Some(step) = self.delete_orphaned_claim() {
            return step;
        }
        self.roll_out()
    }

    fn voters(&self) -> impl Iterator<Item = &MemberObs> {
        self.membership.members.iter().filter(|m| m.kind == MemberKind::Voter)
    }

    fn learners(&self) -> impl Iterator<Item = &MemberObs> {
        self.membership.members.iter().filter(|m| m.kind == MemberKind::Learner)
    }

    fn pod_node(&self, ordinal: u32) -> Option<&NodeObs> {
        self.observed.pods.get(&ordinal)?.node.as_ref()
    }

    /// The leader's view when it gave one; otherwise the pod's readiness, which for a member
    /// means it knows the leader and has caught up.
    fn is_healthy(&self, member: &MemberObs) -> bool {
        member.healthy.unwrap_or_else(|| {
            member
                .ordinal
                .and_then(|o| self.observed.pods.get(&o))
                .is_some_and(|p| p.ready && !p.terminating)
        })
    }

    fn is_caught_up(&self, member: &MemberObs) -> bool {
        let leader_commit = self.pod_node(self.via).map_or(0, |n| n.commit_index);
        member
            .match_index
            .is_some_and(|m| m.saturating_add(self.desired.max_lag) >= leader_commit)
    }

    /// Checks that the voter set `after` keeps a healthy quorum, and that the current set has
    /// one (a change needs a quorum to commit at all). `extra_unhealthy` is a voter that will be
    /// down during the step (a restarting pod).
    fn check_quorum(&self, step: Step, after: &[&MemberObs], extra_unhealthy: Option<u64>) -> Step {
        let healthy_now = self.voters().filter(|m| self.is_healthy(m)).count();
        let voters_now = self.voters().count();
        let healthy_after = after
            .iter()
            .filter(|m| Some(m.id) != extra_unhealthy && self.is_healthy(m))
            .count();
        if healthy_now < quorum(voters_now) || healthy_after < quorum(after.len()) {
            return Step::Blocked(BlockReason::WouldLoseQuorum {
                step: Box::new(step),
                healthy_after,
                voters_after: after.len(),
            });
        }
        step
    }

    fn remove(&self, member: &MemberObs, reason: RemovalReason) -> Step {
        let step = Step::RemoveMember {
            member_id: member.id,
            ordinal: member.ordinal,
            reason,
            via: self.via,
        };
        if member.kind == MemberKind::Learner {
            return step;
        }
        let after: Vec<&MemberObs> = self.voters().filter(|m| m.id != member.id).collect();
        self.check_quorum(step, &after, None)
    }

    /// A member whose pod answers with another member id lost its volume. Its successor (the
    /// pod's new member) joins first, as a learner that is then promoted, and only then is the
    /// old id removed: the cluster never has fewer voters than before the loss, so it keeps
    /// tolerating a failure while the replacement catches up. A stale learner holds no vote and
    /// goes at once.
    fn replace_stale_member(&self) -> Option<Step> {
        let stale = self.membership.members.iter().find(|m| {
            let successor = m.ordinal.and_then(|o| self.pod_node(o)).filter(|n| n.id != m.id);
            let successor_votes = successor.is_some_and(|n| {
                self.membership
                    .members
                    .iter()
                    .any(|s| s.id == n.id && s.kind == MemberKind::Voter)
            });
            m.id != self.leader_id && successor.is_some() && (m.kind == MemberKind::Learner || successor_votes)
        })?;
        Some(self.remove(stale, RemovalReason::Replaced))
    }

    fn settle_learners(&self) -> Option<Step> {
        let target = self.desired.replicas;
        let mut learners: Vec<&MemberObs> = self.learners().collect();
        learners.sort_by_key(|m| std::cmp::Reverse(m.ordinal));
        // Learners that scale-down will retire go first: removing one never touches quorum.
        if let Some(extra) = learners.iter().find(|m| m.ordinal.is_none_or(|o| o >= target)) {
            return Some(self.remove(extra, RemovalReason::ScaleDown));
        }
        let learner = learners.last()?;
        if !(self.is_healthy(learner) && self.is_caught_up(learner)) {
            return Some(Step::Wait(WaitReason::LearnerCatchingUp(learner.id)));
        }
        let step = Step::Promote {
            member_id: learner.id,
            via: self.via,
        };
        let mut after: Vec<&MemberObs> = self.voters().collect();
        after.push(learner);
        Some(self.check_quorum(step, &after, None))
    }

    fn scale_down(&self) -> Option<Step> {
        let target = self.desired.replicas;
        let mut retiring: Vec<&MemberObs> = self
            .voters()
            .filter(|m| m.ordinal.is_none_or(|o| o >= target))
            .collect();
        if retiring.is_empty() {
            return None;
        }
        // Followers go from the highest ordinal down, so the StatefulSet can shrink behind them;
        // unhealthy ones first, as removing them cannot cost a healthy vote.
        retiring.sort_by_key(|m| (m.id == self.leader_id, self.is_healthy(m), std::cmp::Reverse(m.ordinal)));
        let next = retiring[0];
        if next.id != self.leader_id {
            return Some(self.remove(next, RemovalReason::ScaleDown));
        }
        let then = Step::RemoveMember {
            member_id: self.leader_id,
            ordinal: next.ordinal,
            reason: RemovalReason::ScaleDown,
            via: self.via,
        };
        Some(self.transfer_from_leader(TransferReason::ScaleDown, then, |m| {
            m.ordinal.is_some_and(|o| o < target)
        }))
    }

    /// Moves leadership to the healthiest, most caught-up voter that `eligible` accepts, ahead
    /// of `then`, the step that needs the leader gone; refuses `then` when no voter qualifies.
    fn transfer_from_leader(&self, reason: TransferReason, then: Step, eligible: impl Fn(&MemberObs) -> bool) -> Step {
        let successor = self
            .voters()
            .filter(|m| m.id != self.leader_id && eligible(m) && self.is_healthy(m))
            .max_by_key(|m| (m.match_index.unwrap_or(0), std::cmp::Reverse(m.ordinal)));
        match successor {
            Some(to) => Step::TransferLeadership {
                from: self.leader_id,
                to: to.id,
                reason,
                via: self.via,
            },
            None => {
                let after: Vec<&MemberObs> = self.voters().filter(|m| m.id != self.leader_id).collect();
                let healthy_after = after.iter().filter(|m| self.is_healthy(m)).count();
                Step::Blocked(BlockReason::WouldLoseQuorum {
                    step: Box::new(then),
                    healthy_after,
                    voters_after: after.len(),
                })
            }
        }
    }

    fn add_learner(&self) -> Option<Step> {
        let limit = self.desired.replicas.min(self.observed.statefulset_replicas);
        let members: BTreeSet<u64> = self.membership.members.iter().map(|m| m.id).collect();
        for ordinal in 0..limit {
            let Some(pod) = self.observed.pods.get(&ordinal) else {
                continue;
            };
            if pod.terminating {
                continue;
            }
            let Some(node) = &pod.node else {
                // A pod on a removed member's volume never answers: its node refuses to start
                // on the tombstone. Its termination message says so, and the claim's mark says
                // so before the pod has even crashed once.
                if self.holds_removed_member(ordinal) || self.refuses_removed_volume(pod) {
                    return Some(Step::ResetVolume { ordinal });
                }
                continue;
            };
            if members.contains(&node.id) {
                continue;
            }
            match node.membership {
                // A node that does not advertise a peer URL cannot be reached by its peers; it
                // is added once it does.
                NodeMembership::None if node.peer_url.is_empty() => {}
                NodeMembership::None => {
                    return Some(Step::AddLearner {
                        ordinal,
                        member_id: node.id,
                        peer_url: node.peer_url.clone(),
                        via: self.via,
                    })
                }
                NodeMembership::Removed => return Some(Step::ResetVolume { ordinal }),
                // A node that believes it is a member but is not in the membership has not
                // applied its own removal yet; look again later.
                NodeMembership::Voter | NodeMembership::Learner => {}
            }
        }
        None
    }

    /// Whether no member can own the claim of `ordinal`: none lives on that ordinal, and every
    /// member's pod is known, so none can live there unseen. Only such a claim may be deleted
    /// without a member's own evidence (a node answering `removed`).
    fn claim_is_memberless(&self, ordinal: u32) -> bool {
        self.membership
            .members
            .iter()
            .all(|m| m.ordinal.is_some_and(|o| o != ordinal))
    }

    /// Whether the claim of `ordinal` holds the volume of a member that a scale-down removed: it
    /// was marked with that member before the removal, the member is gone, and the pod on it,
    /// if it answers at all, still reports that member (a pod that answers with another id runs
    /// on a newer volume under the same claim name).
    fn holds_removed_member(&self, ordinal: u32) -> bool {
        let Some(removed) = self.observed.removed_member_claims.get(&ordinal) else {
            return false;
        };
        self.claim_is_memberless(ordinal)
            && self.membership.members.iter().all(|m| m.id != *removed)
            && self.pod_node(ordinal).is_none_or(|n| n.id == *removed)
    }

    /// Whether the pod's node stopped because its volume holds a member of this cluster that is
    /// no longer in the membership: that data can never serve again, so the volume may go. A
    /// removed member that is somehow still listed, or one of another cluster, is left alone
    /// (and reported): its data may still be needed.
    fn refuses_removed_volume(&self, pod: &PodObs) -> bool {
        let Some(FatalCode::RemovedMember { member, cluster }) = pod.failure.as_ref().and_then(|f| f.code.as_ref())
        else {
            return false;
        };
        let ours = self
            .observed
            .bootstrap
            .as_ref()
            .and_then(|b| b.cluster_id)
            .is_some_and(|id| id == *cluster);
        ours && self.membership.members.iter().all(|m| m.id != *member)
    }

    /// Before the StatefulSet grows, the claims it would reuse that belong to no member: they
    /// are what a scale-down left behind when the scale-up came before the claim's deletion.
    /// Such a volume holds its removed member's tombstone, and a node refuses to start on it:
    /// its pod would crash-loop forever, never answering, so no later step could reset it.
    ///
    /// A claim whose pod still exists waits for the pod to go (the StatefulSet deletes it after
    /// a shrink): deleting the claim under a running pod only marks it for deletion. When some
    /// member's pod is unknown, no claim is provably free of a member's data, so none is
    /// deleted and the StatefulSet grows onto them as before.
    fn clear_retired_claims(&self) -> Option<Step> {
        let ordinal = self
            .observed
            .claims
            .range(self.observed.statefulset_replicas..self.desired.replicas)
            .find(|o| self.claim_is_memberless(**o))?;
        if let Some(pod) = self.observed.pods.get(ordinal) {
            return Some(Step::Wait(if pod.terminating {
                WaitReason::PodTerminating(*ordinal)
            } else {
                WaitReason::PodAboveStatefulSet(*ordinal)
            }));
        }
        Some(Step::DeleteClaim { ordinal: *ordinal })
    }

    fn delete_orphaned_claim(&self) -> Option<Step> {
        let floor = self.desired.replicas.max(self.observed.statefulset_replicas);
        let member_ordinals: BTreeSet<u32> = self.membership.members.iter().filter_map(|m| m.ordinal).collect();
        let ordinal = self
            .observed
            .claims
            .iter()
            .rev()
            .find(|o| **o >= floor && !member_ordinals.contains(o))?;
        Some(Step::DeleteClaim { ordinal: *ordinal })
    }

    fn roll_out(&self) -> Step {
        let target = self.desired.replicas;
        // Only a settled cluster is rolled: every voter healthy, every pod ready. This is also
        // what paces the rollout: the pod restarted last must be back and caught up first.
        if let Some(sick) = self.voters().find(|m| !self.is_healthy(m)) {
            return Step::Wait(WaitReason::MemberNotHealthy(sick.id));
        }
        for ordinal in 0..target {
            match self.observed.pods.get(&ordinal) {
                None => return Step::Wait(WaitReason::PodNotAnswering(ordinal)),
                Some(p) if p.terminating => return Step::Wait(WaitReason::PodTerminating(ordinal)),
                Some(p) if !p.ready => return Step::Wait(WaitReason::PodNotReady(ordinal)),
                Some(_) => {}
            }
        }
        let outdated: Vec<u32> = (0..target)
            .rev()
            .filter(|o| self.observed.pods.get(o).is_some_and(|p| !p.up_to_date))
            .collect();
        let Some(&first) = outdated.iter().find(|o| **o != self.via).or(outdated.first()) else {
            return Step::Converged;
        };
        let voters: Vec<&MemberObs> = self.voters().collect();
        if first == self.via && voters.len() > 1 {
            let then = Step::RestartPod { ordinal: first };
            return self.transfer_from_leader(TransferReason::Rollout, then, |m| {
                m.ordinal
                    .and_then(|o| self.observed.pods.get(&o))
                    .is_some_and(|p| p.up_to_date)
            });
        }
        let step = Step::RestartPod { ordinal: first };
        if voters.len() - quorum(voters.len()) == 0 {
            // One or two voters tolerate no failure at all: any restart is an outage, and
            // refusing would mean the cluster never gets a new template. The outage is accepted
            // (status warns about such replica counts).
            return step;
        }
        let restarting = voters.iter().find(|m| m.ordinal == Some(first)).map(|m| m.id);
        self.check_quorum(step, &voters, restarting)
    }
}

#[cfg(test)]
#[path = "plan_tests.rs"]
mod tests;
