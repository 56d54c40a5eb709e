//! Plan and execute, repeated over the in-memory model: from any sequence of scale changes,
//! pod crashes, lost volumes, template changes and operator crashes, the cluster converges to
//! the spec without the operator ever attempting an unsafe action.

use futures::executor::block_on;
use proptest::prelude::*;

use crate::crd::BootstrapState;
use crate::execute::execute;
use crate::model::{converge, plan_once, reconcile_once, Model};
use crate::names::ClusterNames;
use crate::plan::Step;

fn new_model(replicas: u32) -> Model {
    let model = Model::new(ClusterNames::new("demo", "ns"));
    // The first apply creates the StatefulSet at the desired size.
    model.world().statefulset_replicas = replicas;
    model
}

fn assert_converged(model: &Model, replicas: u32) {
    let w = model.world();
    assert!(w.violations.is_empty(), "unsafe actions: {:?}", w.violations);
    let voters: std::collections::BTreeSet<u32> = w.members.values().filter(|m| m.voter).map(|m| m.ordinal).collect();
    assert_eq!(voters, (0..replicas).collect(), "{w:#?}");
    assert_eq!(w.members.len(), replicas as usize, "{w:#?}");
    assert!(w.members.values().all(|m| m.voter), "no learner left");
    assert_eq!(w.statefulset_replicas, replicas);
    assert_eq!(w.claim_ordinals(), (0..replicas).collect());
    assert!(w.pods.values().all(|p| p.revision == w.template_revision));
    assert_eq!(w.bootstrap.as_ref().map(|b| b.state), Some(BootstrapState::Done));
}

#[test]
fn a_new_cluster_bootstraps_once_and_grows_to_three_voters() {
    let model = new_model(3);
    converge(&model, 3, 50).unwrap();
    assert_converged(&model, 3);
    let events = model.world().events.clone();
    assert_eq!(
        events.iter().filter(|e| e.starts_with("Bootstrap:")).count(),
        1,
        "{events:?}"
    );
}

#[test]
fn scaling_three_to_five_to_three_keeps_the_membership_in_step() {
    let model = new_model(3);
    converge(&model, 3, 50).unwrap();
    converge(&model, 5, 50).unwrap();
    assert_converged(&model, 5);
    converge(&model, 3, 50).unwrap();
    assert_converged(&model, 3);
    assert!(model.world().removed.len() >= 2);
}

#[test]
fn an_operator_crash_between_bootstrap_and_its_record_is_finished_not_repeated() {
    let model = new_model(1);
    model.world().tick();
    // The write after the bootstrap call (recording it as done) fails, as if the operator died.
    let step = reconcile_once_failing_second_write(&model);
    assert!(matches!(step, Step::Bootstrap { .. }));
    assert_eq!(
        model.world().bootstrap.as_ref().map(|b| b.state),
        Some(BootstrapState::Started)
    );
    converge(&model, 1, 20).unwrap();
    assert_converged(&model, 1);
}

fn reconcile_once_failing_second_write(model: &Model) -> Step {
    // `fail_kube_writes` fails the next N writes; to fail only the second, run the first write
    // through the normal path by failing after it: record Started succeeds, then the failure
    // counter arms before the Done record.
    struct ArmAfterFirst(Model);
    impl crate::execute::ClusterEffects for ArmAfterFirst {
        async fn scale_statefulset(&self, r: u32) -> crate::Result<()> {
            self.0.scale_statefulset(r).await
        }
        async fn delete_claim(&self, o: u32) -> crate::Result<()> {
            self.0.delete_claim(o).await
        }
        async fn mark_claim_removed(&self, o: u32, id: u64) -> crate::Result<()> {
            self.0.mark_claim_removed(o, id).await
        }
        async fn delete_pod(&self, o: u32) -> crate::Result<()> {
            self.0.delete_pod(o).await
        }
        async fn record_bootstrap(&self, r: &crate::crd::BootstrapRecord) -> crate::Result<()> {
            let result = self.0.record_bootstrap(r).await;
            self.0.world().fail_kube_writes = 1;
            result
        }
        async fn publish_event(&self, reason: &str, note: &str, w: bool) -> crate::Result<()> {
            self.0.publish_event(reason, note, w).await
        }
    }
    let (urls, step) = plan_once(model, 1);
    let effects = ArmAfterFirst(model.clone());
    let result = block_on(execute(&step, &urls, model, &effects));
    assert!(result.is_err(), "the Done record was meant to fail");
    model.world().fail_kube_writes = 0;
    step
}

#[test]
fn a_member_that_lost_its_volume_is_replaced_under_a_new_id() {
    let model = new_model(3);
    converge(&model, 3, 50).unwrap();
    let old = model.world().pods[&1].member_id;
    {
        let mut w = model.world();
        w.pods.remove(&1);
        w.claims.remove(&1);
    }
    converge(&model, 3, 50).unwrap();
    assert_converged(&model, 3);
    let w = model.world();
    assert!(w.removed.contains(&old));
    assert_ne!(w.pods[&1].member_id, old);
}

/// Loses the volumes of `ordinals` at once (pod and claim), then lets the operator heal it.
fn lose_volumes_and_heal(replicas: u32, ordinals: &[u32]) {
    let model = new_model(replicas);
    converge(&model, replicas, 60).unwrap();
    let old: Vec<u64> = ordinals.iter().map(|o| model.world().pods[o].member_id).collect();
    {
        let mut w = model.world();
        for o in ordinals {
            w.pods.remove(o);
            w.claims.remove(o);
        }
    }
    converge(&model, replicas, 80).unwrap();
    assert_converged(&model, replicas);
    let w = model.world();
    assert!(w.violations.is_empty(), "{:?}", w.violations);
    for (o, id) in ordinals.iter().zip(&old) {
        assert!(w.removed.contains(id), "member {id} of ordinal {o} was removed");
        assert_ne!(w.pods[o].member_id, *id, "ordinal {o} has a new member");
    }
}

#[test]
fn a_three_member_cluster_survives_the_loss_of_any_one_volume() {
    for ordinal in 0..3 {
        lose_volumes_and_heal(3, &[ordinal]);
    }
}

#[test]
fn a_five_member_cluster_survives_the_loss_of_two_volumes_at_once() {
    lose_volumes_and_heal(5, &[0, 3]);
    lose_volumes_and_heal(5, &[3, 4]);
}

#[test]
fn scaling_back_up_before_a_removed_members_claim_is_deleted_gives_its_pod_a_fresh_volume() {
    let model = new_model(3);
    converge(&model, 3, 50).unwrap();
    let removed = model.world().pods[&2].member_id;
    // Scale 3 -> 2 only until the StatefulSet has shrunk: the claim of ordinal 2 is still there.
    for _ in 0..20 {
        if model.world().statefulset_replicas == 2 {
            break;
        }
        model.world().tick();
        reconcile_once(&model, 2);
    }
    {
        let w = model.world();
        assert_eq!(w.statefulset_replicas, 2);
        assert!(w.removed.contains(&removed));
        assert_eq!(w.claims.get(&2), Some(&removed), "the removed member's claim is left");
    }
    // Back to 3: a pod on that claim would crash-loop on the tombstone forever.
    converge(&model, 3, 50).unwrap();
    assert_converged(&model, 3);
    let w = model.world();
    assert_ne!(w.pods[&2].member_id, removed);
    assert!(w.pods[&2].up);
}

#[test]
fn undoing_a_scale_down_after_the_removed_members_pod_restarted_gives_it_a_fresh_volume() {
    let model = new_model(3);
    converge(&model, 3, 50).unwrap();
    let removed = model.world().pods[&2].member_id;
    // 3 -> 2 only until the member of ordinal 2 is removed; the StatefulSet has not shrunk.
    for _ in 0..20 {
        if model.world().removed.contains(&removed) {
            break;
        }
        model.world().tick();
        reconcile_once(&model, 2);
    }
    {
        let mut w = model.world();
        assert_eq!(w.statefulset_replicas, 3);
        assert_eq!(w.claim_marks.get(&2), Some(&removed), "the claim was marked first");
        // The pod restarts: on the tombstoned volume its node refuses to start.
        w.pods.remove(&2);
        w.tick();
        assert!(!w.pods[&2].up);
    }
    converge(&model, 3, 50).unwrap();
    assert_converged(&model, 3);
    let w = model.world();
    assert_ne!(w.pods[&2].member_id, removed);
    assert!(w.claim_marks.is_empty(), "marks go with their claims");
}

#[test]
fn a_template_change_rolls_every_pod_leader_last() {
    let model = new_model(3);
    converge(&model, 3, 50).unwrap();
    model.world().template_revision = 2;
    converge(&model, 3, 80).unwrap();
    assert_converged(&model, 3);
    let events = model.world().events.clone();
    let restarts: Vec<&String> = events.iter().filter(|e| e.starts_with("RestartPod")).collect();
    assert_eq!(restarts.len(), 3, "{events:?}");
    assert!(events.iter().any(|e| e.starts_with("TransferLeadership")));
}

/// Something that happens to the cluster between reconciles.
#[derive(Clone, Debug)]
enum Disruption {
    Scale(u32),
    KillPod(u32),
    LoseVolume(u32),
    NewTemplate,
    FailKubeWrites(u32),
}

fn arb_disruption() -> impl Strategy<Value = Disruption> {
    prop_oneof![
        3 => (1u32..=7).prop_map(Disruption::Scale),
        2 => (0u32..7).prop_map(Disruption::KillPod),
        1 => (0u32..7).prop_map(Disruption::LoseVolume),
        1 => Just(Disruption::NewTemplate),
        1 => (1u32..3).prop_map(Disruption::FailKubeWrites),
    ]
}

fn disrupt(model: &Model, disruption: &Disruption, replicas: &mut u32) {
    let mut w = model.world();
    match disruption {
        Disruption::Scale(n) => *replicas = *n,
        Disruption::KillPod(o) => {
            w.pods.remove(o);
        }
        Disruption::LoseVolume(o) => {
            // Only a loss the cluster survives: every voter healthy and at least three, so one
            // lost vote leaves a quorum. Losing more is a disaster no operator undoes.
            let (healthy, voters) = w.voter_health();
            if voters >= 3 && healthy == voters && w.pods.contains_key(o) {
                w.pods.remove(o);
                w.claims.remove(o);
            }
        }
        Disruption::NewTemplate => w.template_revision += 1,
        Disruption::FailKubeWrites(n) => w.fail_kube_writes = *n,
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    #[test]
    fn repeated_plan_and_execute_always_converges_safely(
        initial in 1u32..=5,
        disruptions in proptest::collection::vec((arb_disruption(), 0usize..4), 0..8),
    ) {
        let model = new_model(initial);
        let mut replicas = initial;
        for (disruption, rounds) in &disruptions {
            disrupt(&model, disruption, &mut replicas);
            for _ in 0..*rounds {
                model.world().tick();
                reconcile_once(&model, replicas);
            }
        }
        let result = converge(&model, replicas, 400);
        prop_assert!(result.is_ok(), "{}", result.unwrap_err());
        let w = model.world();
        prop_assert!(w.violations.is_empty(), "unsafe actions: {:?}", w.violations);
        drop(w);
        assert_converged(&model, replicas);
    }
}
