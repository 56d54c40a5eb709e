//! The reconciler against a mocked API server: the exact requests of a first reconcile, a
//! scale-up, a scale-down and an invalid spec.

use std::sync::Arc;

use http::Method;
use kube::runtime::controller::Action;
use serde_json::json;

use super::*;
use crate::crd::{MemberRole, MemberStatus, Phase};
use crate::fixtures::{bootstrapped, context, raft_cluster, ApiServerVerifier, NAME, NS};
use crate::model::{converged, Model};
use crate::names::ClusterNames;
use crate::status::{DEGRADED, PROGRESSING};

fn names() -> ClusterNames {
    ClusterNames::new(NAME, NS)
}

fn condition<'a>(
    status: &'a RaftClusterStatus,
    type_: &str,
) -> &'a k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition {
    status
        .conditions
        .iter()
        .find(|c| c.type_ == type_)
        .unwrap_or_else(|| panic!("no {type_} condition in {status:?}"))
}

/// Runs one reconcile while `server` answers its requests; returns the action and the verifier.
async fn run_reconcile<F, Fut>(
    cluster: RaftCluster,
    ctx: Arc<Context<Model>>,
    api: ApiServerVerifier,
    server: F,
) -> (Action, ApiServerVerifier)
where
    F: FnOnce(ApiServerVerifier) -> Fut,
    Fut: std::future::Future<Output = ApiServerVerifier> + Send + 'static,
{
    let server = tokio::spawn(server(api));
    let reconciling = tokio::spawn(reconcile(Arc::new(cluster), ctx));
    let mut api = server.await.expect("the mocked API server's checks pass");
    // A request beyond the expected ones would never be answered: fail on it instead of
    // waiting forever for the reconcile.
    let action = tokio::select! {
        action = reconciling => action.expect("reconcile does not panic").expect("reconcile succeeds"),
        Some(request) = api.next_request_line() => panic!("unexpected request {request}"),
    };
    api.expect_silence().await;
    (action, api)
}

#[tokio::test]
async fn first_reconcile_applies_services_statefulset_pdb_then_status() {
    let model = Model::new(names());
    let (ctx, api) = context(model);
    let cluster = raft_cluster(3, Some("raftkv/node:test"));
    let (action, _) = run_reconcile(cluster, ctx, api, |mut api| async move {
        api.read_objects(false).await;
        let statefulset = api.apply_objects().await;
        assert_eq!(statefulset["spec"]["replicas"], 3);
        assert_eq!(statefulset["spec"]["podManagementPolicy"], "Parallel");
        assert_eq!(statefulset["metadata"]["ownerReferences"][0]["kind"], "RaftCluster");
        let status = api.status().await;
        assert_eq!(status.phase, Some(Phase::Creating));
        assert_eq!(
            status.selector,
            "app.kubernetes.io/instance=demo,app.kubernetes.io/name=raftkv"
        );
        assert_eq!(status.observed_generation, Some(1));
        assert_eq!(status.bootstrap, None);
        api
    })
    .await;
    assert_eq!(action, Action::requeue(REQUEUE_WAITING));
}

#[tokio::test]
async fn scale_three_to_five_raises_the_statefulset_before_any_member_joins() {
    let model = converged(names(), 3);
    let (ctx, api) = context(model.clone());
    let cluster = bootstrapped(raft_cluster(5, Some("raftkv/node:test")), 101);
    let (action, _) = run_reconcile(cluster, ctx, api, |mut api| async move {
        api.read_objects(true).await;
        let statefulset = api.apply_objects().await;
        // The routine apply keeps the operator's count; only the planned step changes it.
        assert_eq!(statefulset["spec"]["replicas"], 3);
        let scaled = api.apply("/apis/apps/v1", "statefulsets/demo").await;
        assert_eq!(scaled["spec"]["replicas"], 5);
        assert_eq!(
            scaled["spec"]["template"]["spec"]["containers"][0]["image"],
            "raftkv/node:test"
        );
        api.event("ScaleStatefulSet").await;
        let status = api.status().await;
        assert_eq!(status.phase, Some(Phase::Scaling));
        assert_eq!(status.replicas, 3);
        assert_eq!(status.ready_replicas, 3);
        assert_eq!(status.leader.as_deref(), Some("demo-0"));
        assert_eq!(condition(&status, PROGRESSING).reason, "ScaleStatefulSet");
        api
    })
    .await;
    assert_eq!(action, Action::requeue(REQUEUE_AFTER_STEP));
    assert_eq!(model.world().members.len(), 3, "no member joins before its pod exists");
}

#[tokio::test]
async fn a_storage_change_keeps_the_claim_templates_and_is_reported_while_membership_goes_on() {
    let model = converged(names(), 3);
    let (ctx, mut api) = context(model.clone());
    api.stored_storage_size = "1024Mi".into();
    let mut cluster = bootstrapped(raft_cluster(5, Some("raftkv/node:test")), 101);
    cluster.spec.storage.size.0 = "5Gi".into();
    let (action, _) = run_reconcile(cluster, ctx, api, |mut api| async move {
        api.read_objects(true).await;
        let statefulset = api.apply_objects().await;
        let size = |s: &serde_json::Value| {
            s["spec"]["volumeClaimTemplates"][0]["spec"]["resources"]["requests"]["storage"].clone()
        };
        assert_eq!(size(&statefulset), "1024Mi", "the stored templates are sent back");
        let scaled = api.apply("/apis/apps/v1", "statefulsets/demo").await;
        assert_eq!(scaled["spec"]["replicas"], 5, "the scale-up goes on");
        assert_eq!(size(&scaled), "1024Mi");
        api.event("ScaleStatefulSet").await;
        let status = api.status().await;
        let degraded = condition(&status, DEGRADED);
        assert_eq!(
            (degraded.status.as_str(), degraded.reason.as_str()),
            ("True", "StorageImmutable")
        );
        assert!(degraded.message.contains("size 5Gi"), "{}", degraded.message);
        assert_eq!(condition(&status, PROGRESSING).reason, "ScaleStatefulSet");
        api.warning("StorageImmutable").await;
        api
    })
    .await;
    assert_eq!(action, Action::requeue(REQUEUE_AFTER_STEP));
}

#[tokio::test]
async fn a_missing_statefulset_of_a_bootstrapped_cluster_comes_back_with_every_members_pod() {
    // Five members on pods 0..=4 whose StatefulSet was deleted with its pods orphaned, while
    // the spec asks for three.
    let model = converged(names(), 5);
    let (ctx, api) = context(model.clone());
    let mut cluster = bootstrapped(raft_cluster(3, Some("raftkv/node:test")), 101);
    cluster.status.as_mut().unwrap().members = (0..5u64)
        .map(|o| MemberStatus {
            id: 101 + o,
            pod: Some(format!("demo-{o}")),
            role: MemberRole::Voter,
            healthy: Some(true),
        })
        .collect();
    let (action, _) = run_reconcile(cluster, ctx, api, |mut api| async move {
        api.get_statefulset(false).await;
        api.get_children(true).await;
        api.list_pods_and_claims().await;
        let statefulset = api.apply_objects().await;
        assert_eq!(
            statefulset["spec"]["replicas"], 5,
            "no member's pod is deleted behind Raft's back"
        );
        // The scale-down to three goes through the membership, highest ordinal first.
        api.mark_claim(4).await;
        api.event("RemoveMember").await;
        api.status().await;
        api
    })
    .await;
    assert_eq!(action, Action::requeue(REQUEUE_AFTER_STEP));
    assert!(model.world().violations.is_empty(), "{:?}", model.world().violations);
}

#[tokio::test]
async fn scale_five_to_three_removes_members_then_shrinks_then_deletes_claims() {
    let model = converged(names(), 5);
    let (ctx, mut api) = context(model.clone());
    let cluster = bootstrapped(raft_cluster(3, Some("raftkv/node:test")), 101);

    // Two reconciles remove the members of ordinals 4 and 3 through the leader; Kubernetes only
    // hears about it through an Event and the status.
    for ordinal in [4u32, 3] {
        let (_, returned) = run_reconcile(cluster.clone(), ctx.clone(), api, move |mut api| async move {
            api.read_objects(true).await;
            let statefulset = api.apply_objects().await;
            assert_eq!(statefulset["spec"]["replicas"], 5);
            let marked = api.mark_claim(ordinal).await;
            assert_eq!(marked, 100 + u64::from(ordinal) + 1, "the member on ordinal {ordinal}");
            let event = api.event("RemoveMember").await;
            assert!(event["note"].as_str().unwrap().contains("scale-down"), "{event}");
            let status = api.status().await;
            assert_eq!(status.phase, Some(Phase::Scaling));
            assert_eq!(condition(&status, PROGRESSING).reason, "RemoveMember");
            api
        })
        .await;
        api = returned;
        let w = model.world();
        assert!(w.members.values().all(|m| m.ordinal != ordinal));
        drop(w);
        model.world().tick();
    }

    // Only then does the StatefulSet shrink.
    let (_, returned) = run_reconcile(cluster.clone(), ctx.clone(), api, |mut api| async move {
        api.read_objects(true).await;
        api.apply_objects().await;
        let scaled = api.apply("/apis/apps/v1", "statefulsets/demo").await;
        assert_eq!(scaled["spec"]["replicas"], 3);
        api.event("ScaleStatefulSet").await;
        let status = api.status().await;
        assert_eq!(status.replicas, 3);
        api
    })
    .await;
    api = returned;
    model.world().statefulset_replicas = 3;
    model.world().tick();

    // And the removed members' claims go, highest first, one per reconcile.
    for ordinal in [4u32, 3] {
        let (_, returned) = run_reconcile(cluster.clone(), ctx.clone(), api, |mut api| async move {
            api.read_objects(true).await;
            api.apply_objects().await;
            api.delete(&format!("persistentvolumeclaims/data-demo-{ordinal}")).await;
            api.event("DeleteClaim").await;
            api.status().await;
            api
        })
        .await;
        api = returned;
        model.world().claims.remove(&ordinal);
    }

    let (action, _) = run_reconcile(cluster, ctx, api, |mut api| async move {
        api.read_objects(true).await;
        api.apply_objects().await;
        let status = api.status().await;
        assert_eq!(status.phase, Some(Phase::Running));
        assert_eq!(status.members.len(), 3);
        assert_eq!(condition(&status, PROGRESSING).reason, "Reconciled");
        assert_eq!(condition(&status, DEGRADED).status, "False");
        api
    })
    .await;
    assert_eq!(action, Action::requeue(REQUEUE_CONVERGED));
    assert!(model.world().violations.is_empty());
}

#[tokio::test]
async fn a_service_controlled_by_another_cluster_is_left_alone_and_reported() {
    let (ctx, api) = context(Model::new(names()));
    let cluster = raft_cluster(3, Some("raftkv/node:test"));
    let (action, _) = run_reconcile(cluster, ctx, api, |mut api| async move {
        api.get_statefulset(false).await;
        // `demo-peer` is the client Service of a RaftCluster named `demo-peer`.
        let (_, send) = api
            .expect(Method::GET, "/api/v1/namespaces/testns/services/demo-peer")
            .await;
        let foreign = json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": "demo-peer", "namespace": NS, "ownerReferences": [{
                "apiVersion": "raftkv.dev/v1alpha1", "kind": "RaftCluster", "name": "demo-peer",
                "uid": "99999999-0000-4000-8000-000000000009", "controller": true
            }]},
            "spec": {}
        });
        api.respond(send, &foreign);
        let (_, send) = api.expect(Method::GET, "/api/v1/namespaces/testns/services/demo").await;
        api.respond_not_found(send);
        let (_, send) = api
            .expect(
                Method::GET,
                "/apis/policy/v1/namespaces/testns/poddisruptionbudgets/demo",
            )
            .await;
        api.respond_not_found(send);
        // No apply: the status is the only write.
        let status = api.status().await;
        assert_eq!(status.phase, Some(Phase::Degraded));
        let degraded = condition(&status, DEGRADED);
        assert_eq!(
            (degraded.status.as_str(), degraded.reason.as_str()),
            ("True", "NameConflict")
        );
        assert!(
            degraded.message.contains("RaftCluster/demo-peer"),
            "{}",
            degraded.message
        );
        let warning = api.warning("NameConflict").await;
        assert_eq!(warning["note"], degraded.message.as_str());
        api
    })
    .await;
    assert_eq!(action, Action::requeue(REQUEUE_BLOCKED));
}

#[tokio::test]
async fn a_reconcile_that_changes_nothing_writes_no_status() {
    let model = converged(names(), 3);
    let (ctx, api) = context(model);
    let mut cluster = bootstrapped(raft_cluster(3, Some("raftkv/node:test")), 101);
    let (_, api) = run_reconcile(cluster.clone(), ctx.clone(), api, |mut api| async move {
        api.read_objects(true).await;
        api.apply_objects().await;
        let status = api.status().await;
        assert_eq!(status.phase, Some(Phase::Running));
        api
    })
    .await;
    // The watch hands the next reconcile the object with the status just written.
    cluster.status = api.last_status.clone();
    assert!(cluster.status.is_some());
    let (action, _) = run_reconcile(cluster, ctx, api, |mut api| async move {
        api.read_objects(true).await;
        api.apply_objects().await;
        // No status write: `run_reconcile` checks that nothing else arrives.
        api
    })
    .await;
    assert_eq!(action, Action::requeue(REQUEUE_CONVERGED));
}

#[tokio::test]
async fn a_blocked_step_is_warned_about_once_not_on_every_reconcile() {
    // Two of three members down: no leader, so nothing may change.
    let model = converged(names(), 3);
    {
        let mut w = model.world();
        for ordinal in [1, 2] {
            w.pods.get_mut(&ordinal).unwrap().up = false;
        }
        w.tick();
    }
    let (ctx, api) = context(model);
    let cluster = bootstrapped(raft_cluster(3, Some("raftkv/node:test")), 101);
    let (action, api) = run_reconcile(cluster.clone(), ctx.clone(), api, |mut api| async move {
        api.read_objects(true).await;
        api.apply_objects().await;
        let status = api.status().await;
        assert_eq!(condition(&status, DEGRADED).reason, "NoLeader");
        let warning = api.warning("NoLeader").await;
        assert_eq!(warning["note"], "no member reports a leader");
        api
    })
    .await;
    assert_eq!(action, Action::requeue(REQUEUE_BLOCKED));

    let mut again = cluster;
    again.status = api.last_status.clone();
    run_reconcile(again, ctx, api, |mut api| async move {
        api.read_objects(true).await;
        api.apply_objects().await;
        // Still blocked for the same reason: no status write, no second warning.
        api
    })
    .await;
}

#[tokio::test]
async fn a_cluster_being_deleted_is_left_alone() {
    let model = converged(names(), 3);
    let (ctx, api) = context(model.clone());
    let mut cluster = bootstrapped(raft_cluster(1, Some("raftkv/node:test")), 101);
    cluster.metadata.deletion_timestamp = Some(now());
    cluster.metadata.finalizers = Some(vec!["foregroundDeletion".into()]);
    // No request at all: nothing read, nothing applied, no status.
    let (action, _) = run_reconcile(cluster, ctx, api, |api| async move { api }).await;
    assert_eq!(action, Action::await_change());
    assert_eq!(
        model.world().members.len(),
        3,
        "no scale-down of a cluster being deleted"
    );
}

#[tokio::test]
async fn an_invalid_spec_is_reported_in_status_and_waits_for_a_change() {
    let (ctx, api) = context(Model::new(names()));
    // No image in the spec and no --default-image: nothing can be built.
    let cluster = raft_cluster(3, None);
    let (action, api) = run_reconcile(cluster.clone(), ctx.clone(), api, |mut api| async move {
        let status = api.status().await;
        assert_eq!(status.phase, Some(Phase::Invalid));
        let degraded = condition(&status, DEGRADED);
        assert_eq!(
            (degraded.status.as_str(), degraded.reason.as_str()),
            ("True", "InvalidSpec")
        );
        assert!(degraded.message.contains("--default-image"), "{}", degraded.message);
        api.warning("InvalidSpec").await;
        api
    })
    .await;
    assert_eq!(action, Action::await_change());
    assert!(ctx.metrics.encode().contains("raftkv_operator_reconciles_total 1"));

    // Looked at again (a resync), the same refusal is neither written nor warned about again.
    let mut again = cluster;
    again.status = api.last_status.clone();
    let (action, _) = run_reconcile(again, ctx, api, |api| async move { api }).await;
    assert_eq!(action, Action::await_change());
}

#[tokio::test]
async fn an_out_of_range_replica_count_is_invalid_even_without_schema_validation() {
    let (ctx, api) = context(Model::new(names()));
    let cluster = raft_cluster(0, Some("raftkv/node:test"));
    let (action, _) = run_reconcile(cluster, ctx, api, |mut api| async move {
        let status = api.status().await;
        assert_eq!(status.phase, Some(Phase::Invalid));
        assert!(condition(&status, DEGRADED).message.contains("between 1 and 9"));
        api.warning("InvalidSpec").await;
        api
    })
    .await;
    assert_eq!(action, Action::await_change());
}

#[test]
fn failing_reconciles_back_off_exponentially_up_to_five_minutes() {
    let backoff = Backoff::default();
    let key = ObjectRef::<RaftCluster>::new(NAME).within(NS);
    let delays: Vec<u64> = (0..12).map(|_| backoff.failed(key.clone()).as_secs()).collect();
    assert_eq!(&delays[..5], &[1, 2, 4, 8, 16]);
    assert_eq!(*delays.last().unwrap(), 300);
    backoff.succeeded(&key);
    assert_eq!(backoff.failed(key).as_secs(), 1);
}
