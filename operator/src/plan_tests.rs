//! Table tests and property tests of the planner.

use proptest::prelude::*;

use super::*;

const MAX_LAG: u64 = 5;

fn desired(replicas: u32) -> Desired {
    Desired {
        replicas,
        max_lag: MAX_LAG,
    }
}

fn id_of(ordinal: u32) -> u64 {
    100 + u64::from(ordinal)
}

fn node(id: u64, membership: NodeMembership, cluster_id: u64) -> NodeObs {
    NodeObs {
        id,
        cluster_id,
        membership,
        commit_index: 50,
        peer_url: format!("http://pod-{id}:8081"),
    }
}

fn member(id: u64, ordinal: u32, kind: MemberKind) -> MemberObs {
    MemberObs {
        id,
        ordinal: Some(ordinal),
        kind,
        match_index: Some(50),
        healthy: Some(true),
    }
}

fn done() -> Option<BootstrapRecord> {
    Some(BootstrapRecord {
        member_id: id_of(0),
        state: BootstrapState::Done,
        cluster_id: Some(7),
    })
}

/// A converged cluster of `n` healthy voters on ordinals `0..n`, led by `leader`.
fn cluster(n: u32, leader: u32) -> Observed {
    Observed {
        statefulset_replicas: n,
        pods: (0..n)
            .map(|o| {
                let pod = PodObs {
                    ordinal: o,
                    ready: true,
                    terminating: false,
                    up_to_date: true,
                    node: Some(node(id_of(o), NodeMembership::Voter, 7)),
                    failure: None,
                    unready_since: None,
                };
                (o, pod)
            })
            .collect(),
        claims: (0..n).collect(),
        removed_member_claims: BTreeMap::new(),
        membership: Some(MembershipObs {
            leader_id: id_of(leader),
            members: (0..n).map(|o| member(id_of(o), o, MemberKind::Voter)).collect(),
        }),
        bootstrap: done(),
    }
}

/// Adds a fresh pod (membership `none`) at `ordinal`.
fn with_fresh_pod(mut obs: Observed, ordinal: u32, id: u64) -> Observed {
    obs.pods.insert(
        ordinal,
        PodObs {
            ordinal,
            ready: false,
            terminating: false,
            up_to_date: true,
            node: Some(node(id, NodeMembership::None, 0)),
            failure: None,
            unready_since: None,
        },
    );
    obs.claims.insert(ordinal);
    obs
}

fn member_mut(obs: &mut Observed, id: u64) -> &mut MemberObs {
    obs.membership
        .as_mut()
        .unwrap()
        .members
        .iter_mut()
        .find(|m| m.id == id)
        .unwrap()
}

fn empty() -> Observed {
    Observed {
        statefulset_replicas: 3,
        pods: BTreeMap::new(),
        claims: BTreeSet::new(),
        removed_member_claims: BTreeMap::new(),
        membership: None,
        bootstrap: None,
    }
}

#[test]
fn a_fresh_cluster_bootstraps_pod_zero_once_every_pod_answers() {
    let obs = with_fresh_pod(with_fresh_pod(with_fresh_pod(empty(), 0, 1), 1, 2), 2, 3);
    assert_eq!(
        plan(&desired(3), &obs),
        Step::Bootstrap {
            ordinal: 0,
            member_id: 1
        }
    );
}

#[test]
fn bootstrap_waits_while_any_pod_is_silent() {
    let mut obs = with_fresh_pod(with_fresh_pod(empty(), 0, 1), 1, 2);
    obs.pods.get_mut(&1).unwrap().node = None;
    assert_eq!(plan(&desired(3), &obs), Step::Wait(WaitReason::PodNotAnswering(1)));
}

#[test]
fn an_interrupted_bootstrap_is_recorded_not_repeated() {
    let mut obs = with_fresh_pod(empty(), 0, 1);
    obs.pods.get_mut(&0).unwrap().node = Some(node(1, NodeMembership::Voter, 7));
    obs.bootstrap = Some(BootstrapRecord {
        member_id: 1,
        state: BootstrapState::Started,
        cluster_id: None,
    });
    assert_eq!(
        plan(&desired(3), &obs),
        Step::RecordBootstrap {
            member_id: 1,
            cluster_id: 7
        }
    );
}

#[test]
fn an_existing_cluster_found_on_the_volumes_is_adopted() {
    let mut obs = cluster(3, 0);
    obs.bootstrap = None;
    assert_eq!(
        plan(&desired(3), &obs),
        Step::RecordBootstrap {
            member_id: id_of(0),
            cluster_id: 7
        }
    );
}

#[test]
fn a_started_bootstrap_whose_pod_lost_its_volume_is_refused() {
    let mut obs = with_fresh_pod(empty(), 0, 9);
    obs.bootstrap = Some(BootstrapRecord {
        member_id: 1,
        state: BootstrapState::Started,
        cluster_id: None,
    });
    assert_eq!(
        plan(&desired(1), &obs),
        Step::Blocked(BlockReason::BootstrapInterrupted { member_id: 1 })
    );
}

#[test]
fn a_done_bootstrap_is_never_repeated_even_when_every_volume_is_fresh() {
    let mut obs = with_fresh_pod(empty(), 0, 9);
    obs.bootstrap = done();
    assert_eq!(plan(&desired(1), &obs), Step::Blocked(BlockReason::NoLeader));
}

#[test]
fn scale_up_raises_the_statefulset_first() {
    assert_eq!(
        plan(&desired(5), &cluster(3, 0)),
        Step::ScaleStatefulSet { from: 3, to: 5 }
    );
}

#[test]
fn a_new_pod_joins_as_a_learner_through_the_leader() {
    let mut obs = with_fresh_pod(with_fresh_pod(cluster(3, 1), 3, 200), 4, 201);
    obs.statefulset_replicas = 5;
    assert_eq!(
        plan(&desired(5), &obs),
        Step::AddLearner {
            ordinal: 3,
            member_id: 200,
            peer_url: "http://pod-200:8081".into(),
            via: 1
        }
    );
}

#[test]
fn a_lagging_learner_is_waited_for_and_nothing_else_joins_meanwhile() {
    let mut obs = with_fresh_pod(with_fresh_pod(cluster(3, 0), 3, 200), 4, 201);
    obs.statefulset_replicas = 5;
    let mut learner = member(200, 3, MemberKind::Learner);
    learner.match_index = Some(10);
    obs.membership.as_mut().unwrap().members.push(learner);
    assert_eq!(plan(&desired(5), &obs), Step::Wait(WaitReason::LearnerCatchingUp(200)));
}

#[test]
fn a_caught_up_learner_is_promoted() {
    let mut obs = with_fresh_pod(cluster(3, 0), 3, 200);
    obs.statefulset_replicas = 4;
    obs.membership
        .as_mut()
        .unwrap()
        .members
        .push(member(200, 3, MemberKind::Learner));
    assert_eq!(plan(&desired(4), &obs), Step::Promote { member_id: 200, via: 0 });
}

#[test]
fn scale_down_removes_learners_before_voters() {
    let mut obs = with_fresh_pod(cluster(4, 0), 4, 200);
    obs.statefulset_replicas = 5;
    obs.membership
        .as_mut()
        .unwrap()
        .members
        .push(member(200, 4, MemberKind::Learner));
    assert!(matches!(
        plan(&desired(3), &obs),
        Step::RemoveMember {
            member_id: 200,
            reason: RemovalReason::ScaleDown,
            ..
        }
    ));
}

#[test]
fn scale_down_removes_followers_from_the_highest_ordinal() {
    assert_eq!(
        plan(&desired(3), &cluster(5, 0)),
        Step::RemoveMember {
            member_id: id_of(4),
            ordinal: Some(4),
            reason: RemovalReason::ScaleDown,
            via: 0
        }
    );
}

#[test]
fn scale_down_moves_leadership_before_removing_the_leader() {
    let mut obs = cluster(5, 4);
    obs.membership.as_mut().unwrap().members.retain(|m| m.id != id_of(3));
    let step = plan(&desired(3), &obs);
    let Step::TransferLeadership { from, to, via, .. } = step else {
        panic!("expected a transfer, got {step:?}");
    };
    assert_eq!((from, via), (id_of(4), 4));
    assert!(to < id_of(3), "the new leader stays: {to}");
}

#[test]
fn the_statefulset_shrinks_only_after_its_members_are_removed() {
    let mut obs = cluster(5, 0);
    assert!(matches!(plan(&desired(3), &obs), Step::RemoveMember { .. }));
    obs.membership.as_mut().unwrap().members.retain(|m| m.id < id_of(3));
    for o in [3, 4] {
        obs.pods.get_mut(&o).unwrap().node = Some(node(id_of(o), NodeMembership::Removed, 7));
    }
    assert_eq!(plan(&desired(3), &obs), Step::ScaleStatefulSet { from: 5, to: 3 });
}

#[test]
fn the_claims_of_removed_members_are_deleted_after_the_shrink() {
    let mut obs = cluster(3, 0);
    obs.claims.extend([3, 4]);
    assert_eq!(plan(&desired(3), &obs), Step::DeleteClaim { ordinal: 4 });
}

#[test]
fn scale_up_first_deletes_the_claim_a_removed_member_left_where_the_statefulset_grows() {
    // 3 -> 2 removed ordinal 2's member and shrank the StatefulSet; its claim was not deleted
    // yet when the user scaled back to 3.
    let mut obs = cluster(2, 0);
    obs.claims.insert(2);
    assert_eq!(plan(&desired(3), &obs), Step::DeleteClaim { ordinal: 2 });
    obs.claims.remove(&2);
    assert_eq!(plan(&desired(3), &obs), Step::ScaleStatefulSet { from: 2, to: 3 });
}

#[test]
fn scale_up_waits_for_a_retired_pod_to_go_before_deleting_its_claim() {
    let mut obs = cluster(2, 0);
    obs.claims.insert(2);
    obs.pods.insert(
        2,
        PodObs {
            ordinal: 2,
            ready: false,
            terminating: true,
            up_to_date: true,
            node: None,
            failure: None,
            unready_since: None,
        },
    );
    assert_eq!(plan(&desired(3), &obs), Step::Wait(WaitReason::PodTerminating(2)));
    obs.pods.get_mut(&2).unwrap().terminating = false;
    assert_eq!(plan(&desired(3), &obs), Step::Wait(WaitReason::PodAboveStatefulSet(2)));
}

#[test]
fn scale_up_keeps_the_claims_above_the_statefulset_that_members_or_unknown_pods_may_own() {
    let mut obs = cluster(3, 0);
    obs.statefulset_replicas = 2;
    assert_eq!(
        plan(&desired(3), &obs),
        Step::ScaleStatefulSet { from: 2, to: 3 },
        "ordinal 2's member still lives on its claim"
    );
    let mut obs = cluster(2, 0);
    obs.claims.insert(2);
    let mut unplaced = member(300, 0, MemberKind::Learner);
    unplaced.ordinal = None;
    obs.membership.as_mut().unwrap().members.push(unplaced);
    assert_eq!(
        plan(&desired(3), &obs),
        Step::ScaleStatefulSet { from: 2, to: 3 },
        "a member whose pod is unknown may own the claim"
    );
}

#[test]
fn a_silent_pod_on_a_claim_marked_with_its_removed_member_gets_a_fresh_volume() {
    // Ordinal 2's member was removed by a scale-down that was undone before the StatefulSet
    // shrank; its pod restarted and the node refuses the tombstoned volume, so it never answers.
    let mut obs = cluster(3, 0);
    obs.membership.as_mut().unwrap().members.retain(|m| m.id != id_of(2));
    obs.pods.get_mut(&2).unwrap().node = None;
    obs.pods.get_mut(&2).unwrap().ready = false;
    assert_eq!(
        plan(&desired(3), &obs),
        Step::Wait(WaitReason::PodNotReady(2)),
        "without a mark, a silent pod may just be starting"
    );
    obs.removed_member_claims.insert(2, id_of(2));
    assert_eq!(plan(&desired(3), &obs), Step::ResetVolume { ordinal: 2 });
}

#[test]
fn a_claims_mark_is_ignored_once_its_volume_holds_another_member() {
    let mut obs = cluster(3, 0);
    obs.removed_member_claims.insert(2, 999);
    obs.pods.get_mut(&2).unwrap().node = None;
    assert_ne!(
        plan(&desired(3), &obs),
        Step::ResetVolume { ordinal: 2 },
        "a member lives on ordinal 2"
    );
    obs.membership.as_mut().unwrap().members.retain(|m| m.id != id_of(2));
    obs.pods.get_mut(&2).unwrap().node = Some(node(300, NodeMembership::None, 0));
    assert!(
        matches!(plan(&desired(3), &obs), Step::AddLearner { member_id: 300, .. }),
        "the pod answers with a newer volume's id"
    );
}

#[test]
fn a_member_whose_pod_came_back_with_a_new_id_is_succeeded_before_it_is_removed() {
    let mut obs = cluster(3, 0);
    obs.pods.get_mut(&2).unwrap().node = Some(node(300, NodeMembership::None, 0));
    member_mut(&mut obs, id_of(2)).healthy = Some(false);
    assert!(
        matches!(
            plan(&desired(3), &obs),
            Step::AddLearner {
                member_id: 300,
                ordinal: 2,
                ..
            }
        ),
        "the new member joins first: {:?}",
        plan(&desired(3), &obs)
    );
    obs.membership
        .as_mut()
        .unwrap()
        .members
        .push(member(300, 2, MemberKind::Learner));
    obs.pods.get_mut(&2).unwrap().node = Some(node(300, NodeMembership::Learner, 7));
    assert_eq!(
        plan(&desired(3), &obs),
        Step::Promote { member_id: 300, via: 0 },
        "promoted with 3 of 4 voters healthy"
    );
    member_mut(&mut obs, 300).kind = MemberKind::Voter;
    assert_eq!(
        plan(&desired(3), &obs),
        Step::RemoveMember {
            member_id: id_of(2),
            ordinal: Some(2),
            reason: RemovalReason::Replaced,
            via: 0
        },
        "then the lost id goes"
    );
}

#[test]
fn a_pod_refusing_a_removed_members_volume_gets_a_fresh_one_only_when_that_member_is_gone() {
    let mut obs = cluster(3, 0);
    let failed = |member: u64, cluster: u64| PodFailure {
        message: format!("raftkv-node: fatal [removed_member member={member} cluster={cluster}]: ..."),
        code: FatalCode::parse(&format!(
            "fatal [removed_member member={member} cluster={cluster}]: ..."
        )),
        restarts: 2,
    };
    obs.membership.as_mut().unwrap().members.retain(|m| m.id != id_of(2));
    let pod = obs.pods.get_mut(&2).unwrap();
    pod.node = None;
    pod.failure = Some(failed(id_of(2), 7));
    assert_eq!(plan(&desired(3), &obs), Step::ResetVolume { ordinal: 2 });

    obs.pods.get_mut(&2).unwrap().failure = Some(failed(id_of(2), 8));
    assert_ne!(
        plan(&desired(3), &obs),
        Step::ResetVolume { ordinal: 2 },
        "another cluster's data is not deleted"
    );
    obs.pods.get_mut(&2).unwrap().failure = Some(failed(id_of(1), 7));
    assert_ne!(
        plan(&desired(3), &obs),
        Step::ResetVolume { ordinal: 2 },
        "member 101 is still a voter: its data may be needed"
    );
}

#[test]
fn fatal_lines_are_read_by_their_tag() {
    assert_eq!(
        FatalCode::parse("raftkv-node: fatal [removed_member member=5 cluster=9]: member 5 was removed"),
        Some(FatalCode::RemovedMember { member: 5, cluster: 9 })
    );
    assert_eq!(
        FatalCode::parse("raftkv-node: fatal [wal_damaged]: write-ahead log: segment x is corrupt"),
        Some(FatalCode::WalDamaged)
    );
    assert_eq!(
        FatalCode::parse("raftkv-node: fatal [io]: bind 0.0.0.0:8080"),
        Some(FatalCode::Other("io".into()))
    );
    assert_eq!(FatalCode::parse("panicked at src/main.rs"), None);
    assert_eq!(FatalCode::parse("fatal [removed_member member=x cluster=9]"), None);
}

#[test]
fn a_removal_that_would_lose_quorum_is_refused_with_a_reason() {
    let mut obs = cluster(3, 0);
    member_mut(&mut obs, id_of(1)).healthy = Some(false);
    let step = plan(&desired(2), &obs);
    let Step::Blocked(BlockReason::WouldLoseQuorum {
        healthy_after,
        voters_after,
        ..
    }) = step
    else {
        panic!("expected a refusal, got {step:?}");
    };
    assert_eq!((healthy_after, voters_after), (1, 2));
}

#[test]
fn without_a_leader_nothing_changes() {
    let mut obs = cluster(3, 0);
    obs.membership.as_mut().unwrap().leader_id = 0;
    assert_eq!(plan(&desired(5), &obs), Step::Blocked(BlockReason::NoLeader));
    obs.membership = None;
    assert_eq!(plan(&desired(5), &obs), Step::Blocked(BlockReason::NoLeader));
}

#[test]
fn a_rollout_restarts_followers_from_the_top_then_moves_leadership() {
    let mut obs = cluster(3, 2);
    for pod in obs.pods.values_mut() {
        pod.up_to_date = false;
    }
    assert_eq!(plan(&desired(3), &obs), Step::RestartPod { ordinal: 1 });
    obs.pods.get_mut(&1).unwrap().up_to_date = true;
    obs.pods.get_mut(&0).unwrap().up_to_date = true;
    assert_eq!(
        plan(&desired(3), &obs),
        Step::TransferLeadership {
            from: id_of(2),
            to: id_of(0),
            reason: TransferReason::Rollout,
            via: 2
        }
    );
}

#[test]
fn a_rollout_waits_for_the_restarted_pod_to_be_ready() {
    let mut obs = cluster(3, 0);
    obs.pods.get_mut(&0).unwrap().up_to_date = false;
    obs.pods.get_mut(&2).unwrap().ready = false;
    assert_eq!(plan(&desired(3), &obs), Step::Wait(WaitReason::PodNotReady(2)));
}

#[test]
fn a_single_voter_is_restarted_without_a_transfer() {
    let mut obs = cluster(1, 0);
    obs.pods.get_mut(&0).unwrap().up_to_date = false;
    assert_eq!(plan(&desired(1), &obs), Step::RestartPod { ordinal: 0 });
}

#[test]
fn a_removed_volume_below_the_target_gets_a_fresh_one() {
    let mut obs = cluster(3, 0);
    obs.statefulset_replicas = 4;
    obs.pods.insert(
        3,
        PodObs {
            ordinal: 3,
            ready: false,
            terminating: false,
            up_to_date: true,
            node: Some(node(400, NodeMembership::Removed, 7)),
            failure: None,
            unready_since: None,
        },
    );
    assert_eq!(plan(&desired(4), &obs), Step::ResetVolume { ordinal: 3 });
}

#[test]
fn a_matching_cluster_is_converged() {
    assert_eq!(plan(&desired(3), &cluster(3, 1)), Step::Converged);
}

#[test]
fn a_recreated_statefulset_keeps_every_member_and_claim_of_a_bootstrapped_cluster() {
    let claims = BTreeSet::from([0, 1, 2, 3]);
    assert_eq!(
        recreated_statefulset_replicas(3, false, [0, 1, 4], &claims),
        3,
        "a new cluster"
    );
    assert_eq!(
        recreated_statefulset_replicas(3, true, [0, 1, 4], &claims),
        5,
        "member 4"
    );
    assert_eq!(recreated_statefulset_replicas(3, true, [0, 1], &claims), 4, "claim 3");
    assert_eq!(recreated_statefulset_replicas(5, true, [0, 1], &claims), 5, "the spec");
    assert_eq!(recreated_statefulset_replicas(3, true, [], &BTreeSet::new()), 3);
}

// Property tests over arbitrary observations.

fn arb_membership() -> impl Strategy<Value = NodeMembership> {
    prop_oneof![
        Just(NodeMembership::Voter),
        Just(NodeMembership::Learner),
        Just(NodeMembership::None),
        Just(NodeMembership::Removed),
    ]
}

prop_compose! {
    fn arb_observed()(
        statefulset_replicas in 0u32..10,
        pods in proptest::collection::btree_map(0u32..10, (any::<bool>(), any::<bool>(), proptest::option::of((0u64..4, arb_membership(), any::<bool>()))), 0..10),
        claims in proptest::collection::btree_set(0u32..10, 0..10),
        members in proptest::collection::btree_map(0u32..10, (any::<bool>(), proptest::option::of(any::<bool>()), 0u64..60, any::<bool>()), 0..10),
        leader_pick in 0usize..12,
        bootstrap in prop_oneof![Just(None), Just(Some(BootstrapState::Started)), Just(Some(BootstrapState::Done))],
        has_membership in any::<bool>(),
        marks in proptest::collection::btree_map(0u32..10, 0u64..3, 0..4),
        unplaced in proptest::option::weighted(0.1, 0u32..10),
    ) -> Observed {
        // Members live on ordinals; a member's id is its ordinal's default id, or a stale one.
        let members: Vec<MemberObs> = members
            .iter()
            .map(|(o, (voter, healthy, match_index, stale))| MemberObs {
                id: if *stale { 1_000 + u64::from(*o) } else { id_of(*o) },
                // Now and then a member whose pod is unknown (pod-IP addressing, nothing recalled).
                ordinal: Some(*o).filter(|o| Some(*o) != unplaced),
                kind: if *voter { MemberKind::Voter } else { MemberKind::Learner },
                match_index: Some(*match_index),
                healthy: *healthy,
            })
            .collect();
        let leader_id = members
            .iter()
            .filter(|m| m.kind == MemberKind::Voter)
            .nth(leader_pick)
            .map_or(0, |m| m.id);
        let pods = pods
            .into_iter()
            .map(|(o, (ready, up_to_date, node_info))| {
                let node = node_info.map(|(id_variant, membership, in_cluster)| NodeObs {
                    id: if id_variant == 0 { id_of(o) + 500 } else { id_of(o) },
                    cluster_id: if in_cluster { 7 } else { 0 },
                    membership,
                    commit_index: 50,
                    peer_url: format!("http://pod-{o}:8081"),
                });
                (o, PodObs { ordinal: o, ready, terminating: false, up_to_date, node, failure: None, unready_since: None })
            })
            .collect();
        // A mark names the ordinal's pod's other id, its default id, or a stale member's id.
        let removed_member_claims = marks
            .into_iter()
            .filter(|(o, _)| claims.contains(o))
            .map(|(o, variant)| (o, [id_of(o) + 500, id_of(o), 1_000 + u64::from(o)][variant as usize]))
            .collect();
        Observed {
            statefulset_replicas,
            pods,
            claims,
            removed_member_claims,
            membership: has_membership.then_some(MembershipObs { leader_id, members }),
            bootstrap: bootstrap.map(|state| BootstrapRecord { member_id: id_of(0), state, cluster_id: None }),
        }
    }
}

/// The planner's health rule, restated independently.
fn healthy(obs: &Observed, m: &MemberObs) -> bool {
    m.healthy.unwrap_or_else(|| {
        m.ordinal
            .and_then(|o| obs.pods.get(&o))
            .is_some_and(|p| p.ready && !p.terminating)
    })
}

fn voters(obs: &Observed) -> Vec<&MemberObs> {
    obs.membership
        .iter()
        .flat_map(|m| &m.members)
        .filter(|m| m.kind == MemberKind::Voter)
        .collect()
}

fn leader_ordinal(obs: &Observed) -> Option<u32> {
    let m = obs.membership.as_ref()?;
    m.members.iter().find(|x| x.id == m.leader_id)?.ordinal
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2_000))]

    #[test]
    fn never_proposes_a_step_that_loses_quorum(obs in arb_observed(), replicas in 1u32..10) {
        let step = plan(&desired(replicas), &obs);
        let voters = voters(&obs);
        let healthy_now = voters.iter().filter(|m| healthy(&obs, m)).count();
        let after = |excluded: Option<u64>, down: Option<u64>| {
            let set: Vec<&&MemberObs> = voters.iter().filter(|m| Some(m.id) != excluded).collect();
            let ok = set.iter().filter(|m| Some(m.id) != down && healthy(&obs, m)).count();
            (ok, set.len())
        };
        match &step {
            Step::RemoveMember { member_id, .. } if voters.iter().any(|v| v.id == *member_id) => {
                let (ok, n) = after(Some(*member_id), None);
                prop_assert!(ok >= quorum(n), "{step:?} leaves {ok}/{n}");
                prop_assert!(healthy_now >= quorum(voters.len()));
            }
            // One or two voters tolerate no failure: their restarts are the documented exception.
            Step::RestartPod { ordinal } if voters.len() > 2 => {
                let restarting = voters.iter().find(|m| m.ordinal == Some(*ordinal)).map(|m| m.id);
                let (ok, n) = after(None, restarting);
                prop_assert!(ok >= quorum(n), "{step:?} leaves {ok}/{n}");
            }
            Step::Promote { member_id, .. } => {
                let learner = obs.membership.as_ref().unwrap().members.iter().find(|m| m.id == *member_id).unwrap();
                prop_assert!(healthy(&obs, learner));
                prop_assert!(healthy_now >= quorum(voters.len()));
            }
            _ => {}
        }
    }

    #[test]
    fn never_removes_or_restarts_the_leader_without_a_transfer(obs in arb_observed(), replicas in 1u32..10) {
        let step = plan(&desired(replicas), &obs);
        let leader = obs.membership.as_ref().map_or(0, |m| m.leader_id);
        if let Step::RemoveMember { member_id, .. } = &step {
            prop_assert_ne!(*member_id, leader);
        }
        if let Step::RestartPod { ordinal } = &step {
            if voters(&obs).len() > 1 {
                prop_assert_ne!(Some(*ordinal), leader_ordinal(&obs));
            }
        }
    }

    #[test]
    fn never_starts_a_membership_change_while_another_is_in_flight(obs in arb_observed(), replicas in 1u32..10) {
        let step = plan(&desired(replicas), &obs);
        let learners = obs.membership.iter().flat_map(|m| &m.members).filter(|m| m.kind == MemberKind::Learner).count();
        if let Step::AddLearner { .. } = step {
            prop_assert_eq!(learners, 0, "a learner is still being settled");
        }
        if step.is_membership_change() {
            if let Step::Bootstrap { .. } = step {} else {
                // Changes go to the leader, which applies them one at a time.
                let via = match &step {
                    Step::AddLearner { via, .. } | Step::Promote { via, .. } | Step::RemoveMember { via, .. } => *via,
                    _ => unreachable!(),
                };
                prop_assert_eq!(Some(via), leader_ordinal(&obs));
            }
        }
    }

    #[test]
    fn never_bootstraps_a_second_cluster(obs in arb_observed(), replicas in 1u32..10) {
        let step = plan(&desired(replicas), &obs);
        if let Step::Bootstrap { .. } = step {
            prop_assert!(obs.bootstrap.as_ref().is_none_or(|b| b.state != BootstrapState::Done));
            prop_assert!(obs.pods.values().all(|p| p.node.as_ref().is_some_and(|n| n.cluster_id == 0)));
        }
    }

    #[test]
    fn never_shrinks_below_a_member_nor_deletes_a_members_claim(obs in arb_observed(), replicas in 1u32..10) {
        let step = plan(&desired(replicas), &obs);
        let ordinals: Vec<u32> = obs.membership.iter().flat_map(|m| &m.members).filter_map(|m| m.ordinal).collect();
        match step {
            Step::ScaleStatefulSet { from, to } if to < from => {
                prop_assert!(ordinals.iter().all(|o| *o < to));
            }
            Step::DeleteClaim { ordinal } => {
                prop_assert!(!ordinals.contains(&ordinal));
                prop_assert!(ordinal >= obs.statefulset_replicas);
            }
            _ => {}
        }
    }

    #[test]
    fn never_resets_a_silent_pods_volume_that_a_member_may_own(obs in arb_observed(), replicas in 1u32..10) {
        let step = plan(&desired(replicas), &obs);
        let Step::ResetVolume { ordinal } = step else {
            return Ok(());
        };
        if obs.pods.get(&ordinal).is_some_and(|p| p.node.is_some()) {
            // The node itself said it was removed.
            return Ok(());
        }
        // Without the node's word, only a claim marked with a removed member is reset, and only
        // when every member is placed and none on this ordinal.
        let members: Vec<&MemberObs> = obs.membership.iter().flat_map(|m| &m.members).collect();
        prop_assert!(members.iter().all(|m| m.ordinal.is_some_and(|o| o != ordinal)), "{step:?}");
        let mark = obs.removed_member_claims.get(&ordinal);
        prop_assert!(mark.is_some_and(|id| members.iter().all(|m| m.id != *id)), "{step:?}");
    }
}
