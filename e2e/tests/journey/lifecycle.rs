//! The cluster's whole life after the quick start: every scale path, lost disks, damaged and
//! refused volumes, and an operator that stops between the Raft side and the Kubernetes side of
//! a step. Each scenario runs on both backends: it uses kubectl, the nodes' own API, and the
//! backend only to damage a file on a volume.

use std::collections::{BTreeMap, BTreeSet};

use anyhow::{bail, ensure, Context};
use k8s_openapi::api::core::v1::{PersistentVolume, PersistentVolumeClaim, Pod};
use kube::Api;
use raftkv_api::{Membership, Role};
use serde_json::Value;
use tokio::time::Instant;

use crate::kv::{verify_acked, Writer, WriterReport};
use crate::{is_ready, Journey, CLIENT_PORT, CLUSTER, OPERATOR_NAMESPACE};

/// The operator Deployment's pods.
const OPERATOR_SELECTOR: &str = "app.kubernetes.io/name=raftkv-operator,app.kubernetes.io/instance=raftkv";
/// The second cluster, on a StorageClass that retains released volumes.
const RETAINING_CLUSTER: &str = "shop";
/// That StorageClass.
const RETAINING_CLASS: &str = "raftkv-journey-retain";
/// Where the first record of a WAL segment starts (after the 8-byte magic and 4-byte version):
/// damage there is a record the node cannot read, followed by records it could, which no crash
/// explains.
const FIRST_RECORD_OFFSET: u64 = 12;

/// Which member loses its disk.
#[derive(Clone, Copy, Debug)]
pub enum Whose {
    /// A follower.
    Follower,
    /// The leader.
    Leader,
}

/// What one scenario's writers saw, for the closing figures.
#[derive(Default)]
pub struct Tally {
    acked: u64,
    unknown: u64,
}

impl Tally {
    fn add(&mut self, report: &WriterReport) {
        self.acked += report.ok;
        self.unknown += report.unknown();
    }
}

impl std::fmt::Display for Tally {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} writes acknowledged, {} unknown, 0 lost",
            self.acked, self.unknown
        )
    }
}

impl Journey {
    /// `kubectl scale` through 3 → 4 → 2 → 3 → 5 → 1 → 3 under a writer; after each step the
    /// membership is the pods, no claim is left over, and every write acknowledged so far reads
    /// back.
    pub(crate) async fn scale_through_every_size(&self) -> anyhow::Result<()> {
        let image = self.image_of(CLUSTER).await?;
        let mut acked = BTreeMap::new();
        let mut tally = Tally::default();
        for (step, replicas) in [4usize, 2, 3, 5, 1, 3].into_iter().enumerate() {
            let started = Instant::now();
            let writer = self.writer(CLUSTER, &format!("sizes-{step}-to-{replicas}"));
            self.kubectl_ns(&["scale", "raftcluster", CLUSTER, &format!("--replicas={replicas}")])
                .await?;
            self.converged(replicas, &image)
                .await
                .with_context(|| format!("scaling to {replicas}"))?;
            self.claims_are(CLUSTER, replicas).await?;
            let report = writer.stop().await?;
            ensure!(
                report.ok > 0,
                "no write was acknowledged while scaling to {replicas}: {report}"
            );
            tally.add(&report);
            acked.extend(report.acked.clone());
            verify_acked(&self.backend, &self.kv, &self.namespace, CLUSTER, &acked).await?;
            eprintln!(
                "    scaled to {replicas} in {:.1?}: {report}; {} acknowledged so far read back",
                started.elapsed(),
                acked.len()
            );
        }
        eprintln!("    scaling through every size: {tally}");
        Ok(())
    }

    /// Deletes one member's claim and pod together, as when a node and its local disk are lost:
    /// the pod comes back empty under a new member id, which replaces the old one, and no
    /// acknowledged write is lost.
    pub(crate) async fn lose_a_disk(&self, whose: Whose) -> anyhow::Result<()> {
        let image = self.image_of(CLUSTER).await?;
        let pod = self.member_pod(CLUSTER, whose).await?;
        let before = self.node_status(&pod).await?;
        let writer = self.writer(CLUSTER, &format!("lost-disk-{pod}"));
        let claim = format!("data-{pod}");
        self.kubectl_ns(&["delete", "pvc", &claim, "--wait=false"]).await?;
        self.kubectl_ns(&["delete", "pod", &pod, "--wait=false"]).await?;
        let after = self
            .wait_for(&format!("{pod} to come back under a new member id"), || async {
                let status = self.node_status(&pod).await?;
                Ok((status.id != before.id).then_some(status))
            })
            .await?;
        self.converged(3, &image).await?;
        let members = self.members(CLUSTER).await?;
        ensure!(
            !members.contains(&before.id) && members.contains(&after.id),
            "member {} of {pod} was not replaced by {}: {members:?}",
            before.id,
            after.id
        );
        self.claims_are(CLUSTER, 3).await?;
        let report = writer.stop().await?;
        ensure!(
            report.ok > 0,
            "no write was acknowledged while {pod} was replaced: {report}"
        );
        verify_acked(&self.backend, &self.kv, &self.namespace, CLUSTER, &report.acked).await?;
        eprintln!(
            "    {pod} ({whose:?}) lost its disk: member {} replaced by {}; {report}",
            before.id, after.id
        );
        Ok(())
    }

    /// Damages the WAL on a follower's volume and restarts it: the node refuses the volume and
    /// says where the damage is, the operator reports it by name and deletes nothing, and the
    /// cluster stays available. A person then replaces the disk (claim and pod), and the cluster
    /// heals.
    pub(crate) async fn damage_a_wal(&self) -> anyhow::Result<()> {
        let image = self.image_of(CLUSTER).await?;
        let pod = self.member_pod(CLUSTER, Whose::Follower).await?;
        let claim = format!("data-{pod}");
        let claims: Api<PersistentVolumeClaim> = Api::namespaced(self.client.clone(), &self.namespace);
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), &self.namespace);
        let claim_uid = claims.get(&claim).await?.metadata.uid;
        let writer = self.writer(CLUSTER, "damaged-wal");

        let segment = self
            .backend
            .damage_first_wal_segment(&self.namespace, &claim, FIRST_RECORD_OFFSET)
            .await?;
        let old_pod = pods.get(&pod).await?.metadata.uid;
        self.kubectl_ns(&["delete", "pod", &pod, "--wait=false"]).await?;

        let message = self
            .wait_for("the operator to report the damaged volume", || async {
                let degraded = self.condition(CLUSTER, "Degraded").await?;
                let found = degraded["status"] == "True" && degraded["reason"] == "VolumeDamaged";
                Ok(found.then(|| degraded["message"].as_str().unwrap_or_default().to_string()))
            })
            .await?;
        ensure!(
            message.contains(&pod) && message.contains("corrupt") && message.contains(&segment),
            "the condition names the pod and the node's error: {message}"
        );
        // The pod keeps failing on the same volume: nothing replaced either.
        let failing = self
            .wait_for(&format!("{pod} to have failed twice on its volume"), || async {
                let current = pods.get(&pod).await?;
                let status = current.status.as_ref().and_then(|s| s.container_statuses.as_ref());
                let node = status.and_then(|s| s.first()).cloned();
                let restarts = node.as_ref().map_or(0, |c| c.restart_count);
                Ok((current.metadata.uid != old_pod && restarts >= 2).then_some((current, node)))
            })
            .await?;
        let (current, node) = failing;
        let termination = node.and_then(|c| c.last_state?.terminated?.message).unwrap_or_default();
        ensure!(
            termination.starts_with("raftkv-node: fatal [wal_damaged]") && termination.contains(&segment),
            "the termination message is the node's fatal line: {termination:?}"
        );
        ensure!(
            claims.get(&claim).await?.metadata.uid == claim_uid,
            "the damaged volume's claim was deleted"
        );
        ensure!(
            pods.get(&pod).await?.metadata.uid == current.metadata.uid,
            "the failing pod was deleted"
        );
        let warnings = self.warning_events(CLUSTER).await?;
        ensure!(
            warnings
                .iter()
                .any(|(reason, note)| reason == "VolumeDamaged" && note.contains(&pod)),
            "a Warning Event says so: {warnings:?}"
        );
        let available = self.condition(CLUSTER, "Available").await?;
        ensure!(
            available["status"] == "True",
            "two healthy voters keep it available: {available}"
        );
        let report = writer.stop().await?;
        ensure!(
            report.ok > 0,
            "no write was acknowledged beside the damaged member: {report}"
        );
        ensure!(
            report.longest_gap <= crate::MAX_WRITE_GAP,
            "writes stalled for {:?} beside the damaged member: {report}",
            report.longest_gap
        );
        verify_acked(&self.backend, &self.kv, &self.namespace, CLUSTER, &report.acked).await?;
        eprintln!("    {pod} refused its damaged WAL ({segment}); reported as: {message}; {report}");

        // The person's fix: a new disk.
        self.kubectl_ns(&["delete", "pvc", &claim, "--wait=false"]).await?;
        self.kubectl_ns(&["delete", "pod", &pod, "--wait=false"]).await?;
        self.converged(3, &image).await?;
        Ok(())
    }

    /// Stops the operator after it removed a member and before it shrank the StatefulSet (the
    /// removal is made here, as the operator makes it): the next operator shrinks the
    /// StatefulSet and deletes the claim, and does not remove anything again.
    pub(crate) async fn finish_an_interrupted_removal(&self) -> anyhow::Result<()> {
        let image = self.image_of(CLUSTER).await?;
        self.stop_operator().await?;
        self.kubectl_ns(&["scale", "raftcluster", CLUSTER, "--replicas=2"])
            .await?;
        let pod = format!("{CLUSTER}-2");
        let retiring = self.node_status(&pod).await?;
        let via = self.pod_base(&format!("{CLUSTER}-0")).await?;
        if retiring.role == Role::Leader {
            let successor = self.node_status(&format!("{CLUSTER}-0")).await?;
            self.kv
                .transfer_leader(&self.pod_base(&pod).await?, successor.id)
                .await?;
        }
        // The operator's order: mark the claim, then remove the member.
        self.kubectl_ns(&[
            "annotate",
            "pvc",
            &format!("data-{pod}"),
            &format!("raftkv.dev/removed-member={}", retiring.id),
        ])
        .await?;
        self.kv.remove_member(&via, retiring.id).await?;
        ensure!(
            !self.members(CLUSTER).await?.contains(&retiring.id),
            "member {} is still listed",
            retiring.id
        );
        let events_before = self.event_notes(CLUSTER).await?;

        self.start_operator().await?;
        self.converged(2, &image).await?;
        self.claims_are(CLUSTER, 2).await?;
        self.no_membership_change_since(&events_before).await?;
        eprintln!("    removal of member {} finished by the next operator", retiring.id);
        Ok(())
    }

    /// Stops the operator after it grew the StatefulSet and added the new pod's member as a
    /// learner (made here, as the operator makes them): the next operator promotes that learner
    /// and adds no other member.
    pub(crate) async fn finish_an_interrupted_addition(&self) -> anyhow::Result<()> {
        let image = self.image_of(CLUSTER).await?;
        self.stop_operator().await?;
        self.kubectl_ns(&["scale", "raftcluster", CLUSTER, "--replicas=3"])
            .await?;
        self.kubectl_ns(&["scale", "statefulset", CLUSTER, "--replicas=3"])
            .await?;
        let pod = format!("{CLUSTER}-2");
        let joining = self
            .wait_for(&format!("{pod} to start as a member of nothing"), || async {
                let status = self.node_status(&pod).await?;
                Ok((status.membership == Membership::None).then_some(status))
            })
            .await?;
        let peer_url = joining
            .peer_url
            .clone()
            .context("the new node advertises no peer URL")?;
        let via = self.pod_base(&format!("{CLUSTER}-0")).await?;
        self.kv.add_learner(&via, joining.id, &peer_url).await?;
        let events_before = self.event_notes(CLUSTER).await?;

        self.start_operator().await?;
        self.converged(3, &image).await?;
        ensure!(
            self.node_status(&pod).await?.id == joining.id,
            "{pod} is no longer member {}",
            joining.id
        );
        self.no_membership_change_since(&events_before).await?;
        eprintln!("    addition of member {} finished by the next operator", joining.id);
        Ok(())
    }

    /// A second cluster on a StorageClass that retains volumes. After a scale-down, an
    /// administrator hands the removed member's retained volume to the claim of the same name
    /// again; on the next scale-up the node refuses it, and the operator replaces the claim so
    /// the pod joins on a fresh volume. The retained volume itself is never deleted.
    pub(crate) async fn replace_a_reused_volume(&self) -> anyhow::Result<()> {
        let image = self.backend.images().node.reference(); // the chart's default node image
        let provisioner = self.backend.default_provisioner().await?;
        let class = format!(
            "apiVersion: storage.k8s.io/v1\nkind: StorageClass\nmetadata: {{name: {RETAINING_CLASS}}}\n\
             provisioner: {provisioner}\nreclaimPolicy: Retain\nvolumeBindingMode: WaitForFirstConsumer\n"
        );
        let cluster = format!(
            "apiVersion: raftkv.dev/v1alpha1\nkind: RaftCluster\nmetadata: {{name: {RETAINING_CLUSTER}}}\n\
             spec:\n  replicas: 3\n  storage: {{size: 1Gi, storageClassName: {RETAINING_CLASS}}}\n"
        );
        self.apply_manifest("retain-class.yaml", &class).await?;
        self.apply_manifest("shop.yaml", &cluster).await?;
        self.converged_as(RETAINING_CLUSTER, 3, &image).await?;

        let writer = self.writer(RETAINING_CLUSTER, "retained");
        let pod = format!("{RETAINING_CLUSTER}-2");
        let claim = format!("data-{pod}");
        let removed = self.node_status(&pod).await?;
        let claims: Api<PersistentVolumeClaim> = Api::namespaced(self.client.clone(), &self.namespace);
        let volumes: Api<PersistentVolume> = Api::all(self.client.clone());
        let retained = claims
            .get(&claim)
            .await?
            .spec
            .and_then(|s| s.volume_name)
            .context("the claim is bound")?;

        self.kubectl_ns(&["scale", "raftcluster", RETAINING_CLUSTER, "--replicas=2"])
            .await?;
        self.converged_as(RETAINING_CLUSTER, 2, &image).await?;
        self.claims_are(RETAINING_CLUSTER, 2).await?;
        self.wait_for("the removed member's volume to be released and kept", || async {
            let volume = volumes.get(&retained).await?;
            Ok((volume.status.and_then(|s| s.phase).as_deref() == Some("Released")).then_some(()))
        })
        .await?;
        // What an administrator does to reuse a retained volume: point it at the claim by name.
        self.kubectl(&[
            "patch",
            "pv",
            &retained,
            "--type=merge",
            "-p",
            r#"{"spec":{"claimRef":{"uid":null,"resourceVersion":null}}}"#,
        ])
        .await?;

        self.kubectl_ns(&["scale", "raftcluster", RETAINING_CLUSTER, "--replicas=3"])
            .await?;
        self.wait_for("the operator to replace the refused volume", || async {
            let notes = self.event_notes(RETAINING_CLUSTER).await?;
            Ok(notes
                .iter()
                .any(|n| n.starts_with("give ordinal 2 a fresh volume"))
                .then_some(()))
        })
        .await?;
        self.converged_as(RETAINING_CLUSTER, 3, &image).await?;
        let joined = self.node_status(&pod).await?;
        let bound = claims.get(&claim).await?.spec.and_then(|s| s.volume_name);
        ensure!(
            joined.id != removed.id,
            "{pod} rejoined as the removed member {}",
            removed.id
        );
        ensure!(
            bound.as_deref() != Some(retained.as_str()),
            "{claim} is still on the removed member's volume"
        );
        ensure!(
            volumes.get_opt(&retained).await?.is_some(),
            "the retained volume was deleted"
        );
        let report = writer.stop().await?;
        ensure!(
            report.ok > 0,
            "no write was acknowledged on {RETAINING_CLUSTER}: {report}"
        );
        verify_acked(
            &self.backend,
            &self.kv,
            &self.namespace,
            RETAINING_CLUSTER,
            &report.acked,
        )
        .await?;
        eprintln!(
            "    {pod} refused retained volume {retained} of removed member {}, joined fresh as {}; {report}",
            removed.id, joined.id
        );

        // Leave nothing behind: the cluster, its claims, its retained volumes, the class.
        self.kubectl_ns(&["delete", "raftcluster", RETAINING_CLUSTER, "--timeout=120s"])
            .await?;
        self.wait_for("the second cluster's pods to go", || async {
            let pods = self
                .kubectl_ns(&[
                    "get",
                    "pods",
                    "-l",
                    &format!("app.kubernetes.io/instance={RETAINING_CLUSTER}"),
                    "-o",
                    "name",
                ])
                .await?;
            Ok(pods.trim().is_empty().then_some(()))
        })
        .await?;
        self.kubectl_ns(&[
            "delete",
            "pvc",
            "-l",
            &format!("app.kubernetes.io/instance={RETAINING_CLUSTER}"),
            "--wait=true",
        ])
        .await?;
        let leftover: Vec<String> = volumes
            .list(&Default::default())
            .await?
            .items
            .into_iter()
            .filter(|v| v.spec.as_ref().and_then(|s| s.storage_class_name.as_deref()) == Some(RETAINING_CLASS))
            .filter_map(|v| v.metadata.name)
            .collect();
        for volume in &leftover {
            self.kubectl(&["delete", "pv", volume, "--wait=false"]).await?;
        }
        self.kubectl(&["delete", "storageclass", RETAINING_CLASS]).await?;
        Ok(())
    }

    /// The node image `cluster` runs: its `spec.image`, or the chart's default.
    async fn image_of(&self, cluster: &str) -> anyhow::Result<String> {
        let json = self.kubectl_ns(&["get", "raftcluster", cluster, "-o", "json"]).await?;
        let object: Value = serde_json::from_str(&json)?;
        Ok(object["spec"]["image"]
            .as_str()
            .map_or_else(|| self.backend.images().node.reference(), str::to_string))
    }

    fn writer(&self, cluster: &str, prefix: &str) -> Writer {
        Writer::start(self.backend.clone(), self.kv.clone(), &self.namespace, cluster, prefix)
    }

    async fn apply_manifest(&self, file: &str, manifest: &str) -> anyhow::Result<()> {
        let path = self.backend.scratch_dir().join(file);
        std::fs::write(&path, manifest)?;
        self.kubectl_ns(&["apply", "-f", &path.to_string_lossy()]).await?;
        Ok(())
    }

    async fn pod_base(&self, pod: &str) -> anyhow::Result<String> {
        self.backend.pod_url(&self.namespace, pod, CLIENT_PORT).await
    }

    /// The pod of the cluster's leader, or of its first follower.
    async fn member_pod(&self, cluster: &str, whose: Whose) -> anyhow::Result<String> {
        let status = self.status_of(cluster).await?;
        let members = status["members"].as_array().cloned().unwrap_or_default();
        let role = match whose {
            Whose::Leader => "Leader",
            Whose::Follower => "Voter",
        };
        members
            .iter()
            .filter(|m| m["role"] == role)
            .filter_map(|m| m["pod"].as_str())
            .min()
            .map(str::to_string)
            .with_context(|| format!("no {whose:?} in {members:?}"))
    }

    /// The `status` of the RaftCluster `cluster`.
    pub(crate) async fn status_of(&self, cluster: &str) -> anyhow::Result<Value> {
        let json = self.kubectl_ns(&["get", "raftcluster", cluster, "-o", "json"]).await?;
        let object: Value = serde_json::from_str(&json)?;
        Ok(object["status"].clone())
    }

    /// One condition of the cluster's status, `null` when absent.
    async fn condition(&self, cluster: &str, kind: &str) -> anyhow::Result<Value> {
        let status = self.status_of(cluster).await?;
        Ok(status["conditions"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|c| c["type"] == kind)
            .cloned()
            .unwrap_or(Value::Null))
    }

    /// The member ids of the applied membership, from a member of `cluster`.
    async fn members(&self, cluster: &str) -> anyhow::Result<BTreeSet<u64>> {
        let urls = self.backend.service_urls(&self.namespace, cluster, "client").await?;
        let base = urls.first().context("the client Service has no endpoints")?;
        Ok(self.kv.members(base).await?.into_iter().map(|m| m.id).collect())
    }

    /// Waits until the cluster's data claims are exactly those of ordinals `0..replicas`.
    async fn claims_are(&self, cluster: &str, replicas: usize) -> anyhow::Result<()> {
        let expected: BTreeSet<String> = (0..replicas).map(|o| format!("data-{cluster}-{o}")).collect();
        self.wait_for(&format!("{cluster}'s claims to be {expected:?}"), || async {
            let claims: Api<PersistentVolumeClaim> = Api::namespaced(self.client.clone(), &self.namespace);
            let names: BTreeSet<String> = claims
                .list(&kube::api::ListParams::default().labels(&format!("app.kubernetes.io/instance={cluster}")))
                .await?
                .items
                .into_iter()
                .filter_map(|c| c.metadata.name)
                .collect();
            if names == expected {
                Ok(Some(()))
            } else {
                bail!("claims {names:?}")
            }
        })
        .await
    }

    /// Fails when an Event not in `before` says the membership changed: the operator that
    /// finished an interrupted step must not have made another change.
    async fn no_membership_change_since(&self, before: &[String]) -> anyhow::Result<()> {
        let repeated: Vec<String> = self
            .event_notes(CLUSTER)
            .await?
            .into_iter()
            .filter(|n| !before.contains(n))
            .filter(|n| n.starts_with("add member") || n.starts_with("remove member"))
            .collect();
        ensure!(
            repeated.is_empty(),
            "the next operator changed the membership again: {repeated:?}"
        );
        Ok(())
    }

    /// The notes of the Events about the RaftCluster (events.k8s.io, where kube-rs writes).
    async fn event_notes(&self, cluster: &str) -> anyhow::Result<Vec<String>> {
        Ok(self
            .events(cluster)
            .await?
            .into_iter()
            .map(|(_, _, note)| note)
            .collect())
    }

    /// The Warning Events about the RaftCluster: reason and note.
    async fn warning_events(&self, cluster: &str) -> anyhow::Result<Vec<(String, String)>> {
        Ok(self
            .events(cluster)
            .await?
            .into_iter()
            .filter(|(kind, _, _)| kind == "Warning")
            .map(|(_, reason, note)| (reason, note))
            .collect())
    }

    async fn events(&self, cluster: &str) -> anyhow::Result<Vec<(String, String, String)>> {
        let json = self
            .kubectl_ns(&["get", "events.v1.events.k8s.io", "-o", "json"])
            .await?;
        let list: Value = serde_json::from_str(&json)?;
        Ok(list["items"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|e| e["regarding"]["kind"] == "RaftCluster" && e["regarding"]["name"] == cluster)
            .map(|e| {
                let text = |field: &str| e[field].as_str().unwrap_or_default().to_string();
                (text("type"), text("reason"), text("note"))
            })
            .collect())
    }

    /// Stops the operator at once (`SIGKILL`, no Lease release), as a crash would.
    async fn stop_operator(&self) -> anyhow::Result<()> {
        let deployment = format!("deployment/{}", crate::OPERATOR_DEPLOYMENT);
        self.kubectl(&["scale", "--namespace", OPERATOR_NAMESPACE, &deployment, "--replicas=0"])
            .await?;
        self.kubectl(&[
            "delete",
            "pods",
            "--namespace",
            OPERATOR_NAMESPACE,
            "-l",
            OPERATOR_SELECTOR,
            "--grace-period=0",
            "--force",
            "--wait=false",
        ])
        .await?;
        self.wait_for("the operator's pods to be gone", || async {
            let pods = self
                .kubectl(&[
                    "get",
                    "pods",
                    "--namespace",
                    OPERATOR_NAMESPACE,
                    "-l",
                    OPERATOR_SELECTOR,
                    "-o",
                    "name",
                ])
                .await?;
            Ok(pods.trim().is_empty().then_some(()))
        })
        .await
    }

    /// Starts the operator again and waits until its pod is ready.
    async fn start_operator(&self) -> anyhow::Result<()> {
        let deployment = format!("deployment/{}", crate::OPERATOR_DEPLOYMENT);
        self.kubectl(&["scale", "--namespace", OPERATOR_NAMESPACE, &deployment, "--replicas=1"])
            .await?;
        self.wait_for("the operator's pod to be ready", || async {
            let pods: Api<Pod> = Api::namespaced(self.client.clone(), OPERATOR_NAMESPACE);
            let list = pods
                .list(&kube::api::ListParams::default().labels(OPERATOR_SELECTOR))
                .await?;
            Ok(list.items.iter().any(is_ready).then_some(()))
        })
        .await?;
        Ok(())
    }
}
