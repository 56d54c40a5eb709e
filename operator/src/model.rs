//! An in-memory model of a raftkv cluster under a StatefulSet, for tests.
//!
//! It implements [`NodeApi`] with the admin API's contract (membership calls apply at once or
//! answer 409 with the node's error codes) and [`ClusterEffects`] with the StatefulSet's
//! behaviour (pods come back on their claims, a pod without a claim gets a fresh volume and so a
//! fresh member id). Like a real node, a pod started on the volume of a removed member finds the
//! removal tombstone and exits: it crash-loops and never answers, until its claim is deleted.
//! It also records every action that would have been unsafe on a real cluster in `violations`,
//! so property tests can assert that the operator never attempts one.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex, MutexGuard};

use futures::executor::block_on;

use crate::config::OperatorConfig;
use crate::crd::BootstrapRecord;
use crate::execute::{execute, ClusterEffects};
use crate::names::ClusterNames;
use crate::node_client::{codes, Bootstrapped, Member, MemberKind, Members, NodeApi, NodeMembership, NodeStatus};
use crate::observe::{endpoints, observe_and_plan, Inputs, PodFacts};
use crate::plan::{quorum, Desired, FatalCode, PodFailure, Step};
use crate::{Error, Result};
use raftkv_api::Role;

/// Entries the model's leader commits per tick; larger than [`MAX_LAG`], so a new learner is
/// not caught up before one tick has passed.
pub const COMMITS_PER_TICK: u64 = 10;
/// The lag under which a learner counts as caught up.
pub const MAX_LAG: u64 = 5;

/// A running pod.
#[derive(Clone, Debug)]
pub struct ModelPod {
    /// The member id read from the volume when the pod started.
    pub member_id: u64,
    /// The template revision the pod runs.
    pub revision: u32,
    /// The process answers on its admin API; false while it crash-loops on a removed member's
    /// volume.
    pub up: bool,
}

/// A Raft member.
#[derive(Clone, Debug)]
pub struct ModelMember {
    /// The ordinal its peer URL names.
    pub ordinal: u32,
    /// Voter (true) or learner.
    pub voter: bool,
    /// How much of the log it holds.
    pub match_index: u64,
}

/// The whole modelled world.
#[derive(Debug)]
pub struct World {
    /// Names of the cluster's objects.
    pub names: ClusterNames,
    /// The StatefulSet's replica count.
    pub statefulset_replicas: u32,
    /// The StatefulSet's current template revision.
    pub template_revision: u32,
    /// Pods by ordinal.
    pub pods: BTreeMap<u32, ModelPod>,
    /// Data claims by ordinal, holding the member id written on first start.
    pub claims: BTreeMap<u32, u64>,
    /// The removed-member marks on claims, by ordinal; they go with their claim.
    pub claim_marks: BTreeMap<u32, u64>,
    /// The applied membership.
    pub members: BTreeMap<u64, ModelMember>,
    /// Ids removed from the membership; they can never rejoin.
    pub removed: BTreeSet<u64>,
    /// The leader, 0 for none.
    pub leader: u64,
    /// The cluster id, 0 before the bootstrap.
    pub cluster_id: u64,
    /// The leader's commit index.
    pub commit: u64,
    /// Source of fresh member ids.
    pub next_id: u64,
    /// The bootstrap record in the `RaftCluster`'s status.
    pub bootstrap: Option<BootstrapRecord>,
    /// Events published.
    pub events: Vec<String>,
    /// Unsafe actions the operator attempted.
    pub violations: Vec<String>,
    /// Kubernetes writes to fail before the next one succeeds (an operator crash mid-step).
    pub fail_kube_writes: u32,
}

/// Shared handle to a [`World`]; implements both traits.
#[derive(Clone, Debug)]
pub struct Model(pub Arc<Mutex<World>>);

impl Model {
    /// An empty world: no StatefulSet pods yet.
    pub fn new(names: ClusterNames) -> Self {
        Model(Arc::new(Mutex::new(World {
            names,
            statefulset_replicas: 0,
            template_revision: 1,
            pods: BTreeMap::new(),
            claims: BTreeMap::new(),
            claim_marks: BTreeMap::new(),
            members: BTreeMap::new(),
            removed: BTreeSet::new(),
            leader: 0,
            cluster_id: 0,
            commit: 0,
            next_id: 100,
            bootstrap: None,
            events: Vec::new(),
            violations: Vec::new(),
            fail_kube_writes: 0,
        })))
    }

    /// Locks the world.
    pub fn world(&self) -> MutexGuard<'_, World> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The pod IP the model gives ordinal `o`.
pub fn pod_ip(ordinal: u32) -> String {
    format!("10.0.0.{ordinal}")
}

fn ordinal_of(url: &str) -> u32 {
    url.trim_start_matches("http://10.0.0.")
        .split(':')
        .next()
        .and_then(|o| o.parse().ok())
        .unwrap_or(u32::MAX)
}

fn peer_url(ordinal: u32) -> String {
    format!("http://10.0.0.{ordinal}:8081")
}

fn unreachable(url: &str) -> Error {
    Error::NodeTransport {
        url: url.into(),
        source: Box::new(std::io::Error::new(
            std::io::ErrorKind::ConnectionRefused,
            "connection refused",
        )),
    }
}

fn rejected(url: &str, status: u16, code: &str) -> Error {
    Error::NodeRejected {
        url: url.into(),
        status,
        code: code.into(),
        message: format!("model refused: {code}"),
        retry_after: None,
    }
}

impl World {
    /// A member is healthy when its pod runs the member's own volume.
    pub fn healthy(&self, id: u64) -> bool {
        self.members
            .get(&id)
            .is_some_and(|m| self.pods.get(&m.ordinal).is_some_and(|p| p.up && p.member_id == id))
    }

    /// Healthy voters among `voters`.
    fn healthy_count<'a>(&self, voters: impl Iterator<Item = &'a u64>) -> usize {
        voters.filter(|id| self.healthy(**id)).count()
    }

    fn voter_ids(&self) -> Vec<u64> {
        self.members
            .iter()
            .filter(|(_, m)| m.voter)
            .map(|(id, _)| *id)
            .collect()
    }

    /// Healthy voters and all voters.
    pub fn voter_health(&self) -> (usize, usize) {
        let voters = self.voter_ids();
        (self.healthy_count(voters.iter()), voters.len())
    }

    fn node_status(&self, ordinal: u32) -> Option<NodeStatus> {
        let pod = self.pods.get(&ordinal).filter(|p| p.up)?;
        let id = pod.member_id;
        let (membership, cluster_id) = match self.members.get(&id) {
            Some(m) if m.voter => (NodeMembership::Voter, self.cluster_id),
            Some(_) => (NodeMembership::Learner, self.cluster_id),
            None if self.removed.contains(&id) => (NodeMembership::Removed, self.cluster_id),
            None => (NodeMembership::None, 0),
        };
        let ready = self.ready(ordinal);
        Some(NodeStatus {
            id,
            cluster_id,
            role: if self.leader == id {
                Role::Leader
            } else {
                Role::Follower
            },
            term: 1,
            leader_id: if self.members.contains_key(&id) { self.leader } else { 0 },
            commit_index: self.commit,
            applied_index: self.members.get(&id).map_or(0, |m| m.match_index),
            snapshot_index: 0,
            membership,
            peer_url: Some(peer_url(ordinal)),
            joint: false,
            ready,
            watch: Default::default(),
        })
    }

    /// The pod's readiness: a member that knows the leader and has caught up.
    pub fn ready(&self, ordinal: u32) -> bool {
        let Some(pod) = self.pods.get(&ordinal).filter(|p| p.up) else {
            return false;
        };
        self.leader != 0
            && self
                .members
                .get(&pod.member_id)
                .is_some_and(|m| m.match_index + MAX_LAG >= self.commit)
    }

    /// The pods as the operator's observer extracts them from Pod objects.
    pub fn pod_facts(&self) -> Vec<PodFacts> {
        self.pods
            .iter()
            .map(|(o, p)| PodFacts {
                ordinal: *o,
                name: self.names.pod(*o),
                ready: self.ready(*o),
                terminating: false,
                up_to_date: p.revision == self.template_revision,
                ip: Some(pod_ip(*o)),
                // What the kubelet reports for a node that refused its volume.
                failure: (!p.up).then(|| {
                    let message = format!(
                        "raftkv-node: fatal [removed_member member={} cluster={}]: the volume cannot rejoin",
                        p.member_id, self.cluster_id
                    );
                    PodFailure {
                        code: FatalCode::parse(&message),
                        message,
                        restarts: 1,
                    }
                }),
                unready_since: None,
            })
            .collect()
    }

    /// Claims by ordinal.
    pub fn claim_ordinals(&self) -> BTreeSet<u32> {
        self.claims.keys().copied().collect()
    }

    /// Time passes: the StatefulSet creates and deletes pods, a leader is elected where a
    /// quorum allows, the log grows and healthy members catch up.
    pub fn tick(&mut self) {
        for ordinal in 0..self.statefulset_replicas {
            if !self.pods.contains_key(&ordinal) {
                let next_id = &mut self.next_id;
                let member_id = *self.claims.entry(ordinal).or_insert_with(|| {
                    *next_id += 1;
                    *next_id
                });
                // A removed member's volume holds its tombstone: the node refuses to start on
                // it (node/src/identity.rs), so the pod crash-loops without ever answering.
                let up = !self.removed.contains(&member_id);
                self.pods.insert(
                    ordinal,
                    ModelPod {
                        member_id,
                        revision: self.template_revision,
                        up,
                    },
                );
            }
        }
        let limit = self.statefulset_replicas;
        self.pods.retain(|o, _| *o < limit);
        let voters = self.voter_ids();
        let leader_ok = voters.contains(&self.leader) && self.healthy(self.leader);
        let has_quorum = self.healthy_count(voters.iter()) >= quorum(voters.len());
        if !leader_ok || !has_quorum {
            self.leader = if has_quorum && !voters.is_empty() {
                voters.iter().copied().find(|id| self.healthy(*id)).unwrap_or(0)
            } else {
                0
            };
        }
        if self.leader != 0 {
            self.commit += COMMITS_PER_TICK;
            let commit = self.commit;
            let healthy: Vec<u64> = self.members.keys().copied().filter(|id| self.healthy(*id)).collect();
            for id in healthy {
                if let Some(m) = self.members.get_mut(&id) {
                    m.match_index = commit;
                }
            }
        }
    }

    fn kube_write(&mut self) -> Result<()> {
        if self.fail_kube_writes > 0 {
            self.fail_kube_writes -= 1;
            return Err(Error::Kube(kube::Error::Api(Box::new(
                kube::core::Status::failure("injected failure", "InternalError").with_code(500),
            ))));
        }
        Ok(())
    }

    /// Checks a membership call's target: a member that knows a leader (calls are forwarded).
    fn via_member(&self, url: &str) -> Result<()> {
        let status = self.node_status(ordinal_of(url)).ok_or_else(|| unreachable(url))?;
        if !matches!(status.membership, NodeMembership::Voter | NodeMembership::Learner) {
            return Err(rejected(url, 409, "not_a_member"));
        }
        if self.leader == 0 {
            return Err(rejected(url, 503, "no_leader"));
        }
        Ok(())
    }

    fn members_view(&self) -> Vec<Member> {
        self.members
            .iter()
            .map(|(id, m)| Member {
                id: *id,
                peer_url: Some(peer_url(m.ordinal)),
                role: if m.voter {
                    MemberKind::Voter
                } else {
                    MemberKind::Learner
                },
                match_index: Some(m.match_index),
                healthy: Some(self.healthy(*id)),
            })
            .collect()
    }
}

impl NodeApi for Model {
    async fn status(&self, node: &str) -> Result<NodeStatus> {
        self.world()
            .node_status(ordinal_of(node))
            .ok_or_else(|| unreachable(node))
    }

    async fn members(&self, node: &str) -> Result<Members> {
        let world = self.world();
        world.via_member(node)?;
        Ok(Members {
            cluster_id: world.cluster_id,
            leader_id: world.leader,
            members: world.members_view(),
        })
    }

    async fn add_learner(&self, node: &str, id: u64, peer: &str) -> Result<Vec<Member>> {
        let mut world = self.world();
        world.via_member(node)?;
        if world.removed.contains(&id) || world.members.contains_key(&id) {
            return Err(rejected(node, 409, "already_member_or_removed"));
        }
        if world.members.values().any(|m| !m.voter) {
            world
                .violations
                .push(format!("added learner {id} while another learner was in flight"));
        }
        let ordinal = ordinal_of(peer);
        world.members.insert(
            id,
            ModelMember {
                ordinal,
                voter: false,
                match_index: 0,
            },
        );
        Ok(world.members_view())
    }

    async fn promote(&self, node: &str, id: u64) -> Result<()> {
        let mut world = self.world();
        world.via_member(node)?;
        let commit = world.commit;
        let healthy = world.healthy(id);
        let Some(member) = world.members.get_mut(&id) else {
            return Err(rejected(node, 404, "not_found"));
        };
        if member.voter {
            return Ok(());
        }
        if !healthy || member.match_index + MAX_LAG < commit {
            return Err(rejected(node, 409, codes::LEARNER_LAGGING));
        }
        member.voter = true;
        Ok(())
    }

    async fn remove_member(&self, node: &str, id: u64) -> Result<()> {
        let mut world = self.world();
        world.via_member(node)?;
        let Some(member) = world.members.get(&id).cloned() else {
            return Err(rejected(node, 404, "not_found"));
        };
        if id == world.leader {
            world
                .violations
                .push(format!("asked to remove leader {id} without a transfer"));
            return Err(rejected(node, 409, codes::IS_LEADER));
        }
        if member.voter {
            let after: Vec<u64> = world.voter_ids().into_iter().filter(|v| *v != id).collect();
            if world.healthy_count(after.iter()) < quorum(after.len()) {
                world.violations.push(format!("removing voter {id} would lose quorum"));
                return Err(rejected(node, 409, codes::WOULD_LOSE_QUORUM));
            }
        }
        world.members.remove(&id);
        world.removed.insert(id);
        Ok(())
    }

    async fn transfer_leader(&self, node: &str, to: u64) -> Result<u64> {
        let mut world = self.world();
        world.via_member(node)?;
        let voter = world.members.get(&to).is_some_and(|m| m.voter);
        if !voter || !world.healthy(to) {
            return Err(rejected(node, 409, "not_a_healthy_voter"));
        }
        world.leader = to;
        Ok(to)
    }

    async fn bootstrap(&self, node: &str) -> Result<Bootstrapped> {
        let mut world = self.world();
        let ordinal = ordinal_of(node);
        let status = world.node_status(ordinal).ok_or_else(|| unreachable(node))?;
        if status.cluster_id != 0 || status.membership != NodeMembership::None {
            return Err(rejected(node, 409, codes::ALREADY_INITIALIZED));
        }
        if world.cluster_id != 0 {
            world
                .violations
                .push(format!("bootstrapped member {} into a second cluster", status.id));
        }
        world.cluster_id = 7;
        let match_index = world.commit;
        world.members.insert(
            status.id,
            ModelMember {
                ordinal,
                voter: true,
                match_index,
            },
        );
        world.leader = status.id;
        Ok(Bootstrapped {
            cluster_id: 7,
            id: status.id,
        })
    }
}

impl ClusterEffects for Model {
    async fn scale_statefulset(&self, replicas: u32) -> Result<()> {
        let mut world = self.world();
        world.kube_write()?;
        if let Some((id, m)) = world
            .members
            .iter()
            .find(|(_, m)| m.ordinal >= replicas)
            .map(|(id, m)| (*id, m.clone()))
        {
            world.violations.push(format!(
                "shrank the StatefulSet to {replicas} below member {id} at ordinal {}",
                m.ordinal
            ));
        }
        world.statefulset_replicas = replicas;
        Ok(())
    }

    async fn delete_claim(&self, ordinal: u32) -> Result<()> {
        let mut world = self.world();
        world.kube_write()?;
        if let Some(id) = world.claims.get(&ordinal).copied() {
            if world.members.contains_key(&id) {
                world.violations.push(format!("deleted the claim of member {id}"));
            }
        }
        world.claims.remove(&ordinal);
        world.claim_marks.remove(&ordinal);
        Ok(())
    }

    async fn mark_claim_removed(&self, ordinal: u32, member_id: u64) -> Result<()> {
        let mut world = self.world();
        world.kube_write()?;
        if world.claims.contains_key(&ordinal) {
            world.claim_marks.insert(ordinal, member_id);
        }
        Ok(())
    }

    async fn delete_pod(&self, ordinal: u32) -> Result<()> {
        let mut world = self.world();
        world.kube_write()?;
        if let Some(pod) = world.pods.get(&ordinal).cloned() {
            let voters = world.voter_ids();
            // One or two voters tolerate no failure; their rollout restarts are accepted outages.
            if voters.contains(&pod.member_id) && voters.len() > 2 {
                let others = voters.iter().filter(|v| **v != pod.member_id);
                if world.healthy_count(others) < quorum(voters.len()) {
                    world.violations.push(format!(
                        "restarting pod {ordinal} would leave fewer than a quorum of healthy voters"
                    ));
                }
            }
            if pod.member_id == world.leader && voters.len() > 1 {
                world
                    .violations
                    .push(format!("restarted the leader's pod {ordinal} without a transfer"));
            }
        }
        world.pods.remove(&ordinal);
        Ok(())
    }

    async fn record_bootstrap(&self, record: &BootstrapRecord) -> Result<()> {
        let mut world = self.world();
        world.kube_write()?;
        world.bootstrap = Some(record.clone());
        Ok(())
    }

    async fn publish_event(&self, reason: &str, note: &str, _warning: bool) -> Result<()> {
        self.world().events.push(format!("{reason}: {note}"));
        Ok(())
    }
}

/// What the operator would observe of the model and plan towards `replicas`, through the
/// operator's own pipeline; with the node endpoints it used, for the execution.
pub fn plan_once(model: &Model, replicas: u32) -> (BTreeMap<u32, String>, Step) {
    let config = OperatorConfig::default();
    let (names, facts, claims, marks, statefulset_replicas, bootstrap) = {
        let w = model.world();
        (
            w.names.clone(),
            w.pod_facts(),
            w.claim_ordinals(),
            w.claim_marks.clone(),
            w.statefulset_replicas,
            w.bootstrap.clone(),
        )
    };
    let urls = endpoints(&config, &facts);
    let inputs = Inputs {
        names: &names,
        statefulset_replicas,
        pods: &facts,
        endpoints: &urls,
        claims: &claims,
        removed_member_claims: &marks,
        bootstrap: bootstrap.as_ref(),
        previous_members: &[],
    };
    let desired = Desired {
        replicas,
        max_lag: MAX_LAG,
    };
    let planned = block_on(observe_and_plan(inputs, &desired, model));
    (urls, planned.step)
}

/// One reconcile's membership half over the model: observe, plan, execute. An error (an
/// injected Kubernetes failure) ends the reconcile as it would in the operator.
pub fn reconcile_once(model: &Model, replicas: u32) -> Step {
    let (urls, step) = plan_once(model, replicas);
    let _ = block_on(execute(&step, &urls, model, model));
    step
}

/// Ticks and reconciles until the planner reports convergence; returns the rounds used.
pub fn converge(model: &Model, replicas: u32, budget: usize) -> std::result::Result<usize, String> {
    for round in 0..budget {
        model.world().tick();
        if reconcile_once(model, replicas) == Step::Converged {
            return Ok(round);
        }
    }
    let w = model.world();
    Err(format!("no convergence to {replicas} within {budget} rounds: {w:#?}"))
}

/// A model of a converged cluster of `replicas` voters named like the API tests' cluster.
pub fn converged(names: ClusterNames, replicas: u32) -> Model {
    let model = Model::new(names);
    model.world().statefulset_replicas = replicas;
    if let Err(report) = converge(&model, replicas, 100) {
        panic!("{report}");
    }
    model.world().events.clear();
    model
}
