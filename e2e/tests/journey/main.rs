//! The user's whole journey, end to end, against a real cluster or the simulated control plane
//! (see `backend`): `helm install` the operator chart, `kubectl apply` a RaftCluster, write and
//! read through its Service, `kubectl scale` it out and back in under writes, lose the leader's
//! pod, roll out a new image under writes, run a second cluster with `spec.tls.enabled` (see
//! `tls`), and delete the cluster.
//!
//! One ordered test, because every step starts from the state the previous one left, as it does
//! for a user; each step is named, timed, and printed. A failing step prints the operator's and
//! the nodes' logs and the objects' YAML.

mod backend;
mod backup;
mod binaries;
mod helm;
mod kv;
mod lifecycle;
mod tls;

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, ensure, Context};
use k8s_openapi::api::core::v1::Pod;
use kube::api::ListParams;
use kube::Api;
use raftkv_api::{MemberKind, Membership, Role};
use reqwest::StatusCode;
use serde_json::Value;
use tokio::time::Instant;

use crate::backend::Backend;
use crate::helm::{Helm, HelmMissing};
use crate::kv::{verify_acked, Kv, Writer};
use crate::lifecycle::Whose;

/// The Helm release; the chart names its objects `raftkv-operator`.
const RELEASE: &str = "raftkv";
/// Where the operator is installed.
const OPERATOR_NAMESPACE: &str = "raftkv-system";
/// The operator's Deployment.
const OPERATOR_DEPLOYMENT: &str = "raftkv-operator";
/// The RaftCluster, and so its StatefulSet, client Service and PDB.
const CLUSTER: &str = "demo";
/// The nodes' client port.
const CLIENT_PORT: u16 = 8080;
/// The longest any step may take to converge; generous, for a loaded two-core machine.
const CONVERGE: Duration = Duration::from_secs(300);
/// The longest a writer may go without an acknowledged write while the cluster keeps quorum:
/// an election or a leadership transfer, plus a pod turning unready, with slack for load.
const MAX_WRITE_GAP: Duration = Duration::from_secs(20);

/// The RaftCluster the user applies: the quick start's manifest.
const CLUSTER_MANIFEST: &str = "\
apiVersion: raftkv.dev/v1alpha1
kind: RaftCluster
metadata:
  name: demo
spec:
  replicas: 3
";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn user_journey_from_helm_install_to_cluster_deletion() -> anyhow::Result<()> {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_test_writer()
        .try_init();
    let helm = match Helm::detect().await? {
        Ok(helm) => helm,
        Err(HelmMissing(why)) if std::env::var_os("CI").is_some() => bail!("CI needs Helm: {why}"),
        Err(HelmMissing(why)) => {
            eprintln!("SKIPPED user journey: {why}");
            return Ok(());
        }
    };
    let backend = Arc::new(Backend::from_env().await?);
    let namespace = if backend.is_simulated() {
        "journey".to_string()
    } else {
        format!("raftkv-journey-{}", std::process::id())
    };
    let journey = Journey {
        client: backend.kube_client().await?,
        backend: backend.clone(),
        kv: Kv::new()?,
        helm,
        namespace,
        chart: PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../charts/raftkv-operator")),
        timings: Mutex::default(),
        tls_admin: tokio::sync::OnceCell::new(),
    };
    eprintln!(
        "user journey on the {} backend, images {:?}",
        backend.name(),
        backend.images()
    );
    let outcome = journey.run().await;
    if let Err(error) = &outcome {
        eprintln!("user journey failed: {error:#}");
        eprintln!(
            "{}",
            backend.diagnostics(&[OPERATOR_NAMESPACE, &journey.namespace]).await
        );
    }
    journey.print_timings();
    let cleanup = journey.clean_up().await;
    drop(journey);
    if let Ok(backend) = Arc::try_unwrap(backend) {
        backend.shutdown().await;
    }
    outcome.and(cleanup)
}

struct Journey {
    backend: Arc<Backend>,
    client: kube::Client,
    kv: Kv,
    helm: Helm,
    /// Where the RaftCluster lives.
    namespace: String,
    chart: PathBuf,
    /// Each finished step and its wall time.
    timings: Mutex<Vec<(&'static str, Duration)>>,
    /// The admin client of the TLS cluster (see `tls`), once its certificates exist.
    tls_admin: tokio::sync::OnceCell<Kv>,
}

impl Journey {
    async fn run(&self) -> anyhow::Result<()> {
        self.step("install the operator with Helm", self.install_operator())
            .await?;
        self.step(
            "apply a 3-replica RaftCluster and wait for Available",
            self.apply_cluster(),
        )
        .await?;
        self.step("write and read through the client Service", self.write_and_read())
            .await?;
        self.step(
            "scale to 5 and back to 3 while a client writes",
            self.scale_under_writes(),
        )
        .await?;
        self.step(
            "delete the leader's pod; it returns with its volume",
            self.lose_the_leader(),
        )
        .await?;
        self.step("roll out a new image tag without losing quorum", self.roll_out_image())
            .await?;
        self.step(
            "scale 3 to 4, 2, 3, 5, 1 and 3 while a client writes",
            self.scale_through_every_size(),
        )
        .await?;
        self.step(
            "lose a follower's disk; a new member replaces it",
            self.lose_a_disk(Whose::Follower),
        )
        .await?;
        self.step(
            "lose the leader's disk; a new member replaces it",
            self.lose_a_disk(Whose::Leader),
        )
        .await?;
        self.step(
            "damage a member's WAL; it is reported and nothing is deleted",
            self.damage_a_wal(),
        )
        .await?;
        self.step(
            "stop the operator between a removal and the shrink; the next one finishes it",
            self.finish_an_interrupted_removal(),
        )
        .await?;
        self.step(
            "stop the operator between adding a learner and promoting it; the next one finishes it",
            self.finish_an_interrupted_addition(),
        )
        .await?;
        self.step(
            "a removed member's retained volume handed back is replaced on scale-up",
            self.replace_a_reused_volume(),
        )
        .await?;
        if self.backend.is_simulated() {
            // The S3 server runs in the test, on loopback: only the simulation's pods (host
            // processes) reach it.
            let s3 = raftkv_e2e::s3::S3Server::start(&["backups"]).await?;
            let (acked, object, revision) = self
                .step(
                    "take a scheduled backup to an S3 server while a client writes",
                    self.back_up_on_a_schedule(&s3),
                )
                .await?;
            self.step(
                "delete the cluster and its claims; a new one restored from the backup has every write up to its revision and none after",
                self.restore_from_backup(&s3, &acked, &object, revision),
            )
            .await?;
        } else {
            eprintln!("SKIPPED backup and restore: the test's S3 server is not reachable from a real cluster's pods");
        }
        self.step(
            "a TLS cluster: scale 3 to 5 to 3 over TLS, plaintext refused, certificates renewed pod by pod",
            self.tls_cluster(),
        )
        .await?;
        self.step(
            "delete the RaftCluster; its objects are collected",
            self.delete_cluster(),
        )
        .await?;
        Ok(())
    }

    async fn step<T>(
        &self,
        name: &'static str,
        work: impl std::future::Future<Output = anyhow::Result<T>>,
    ) -> anyhow::Result<T> {
        eprintln!("--> {name}");
        let started = Instant::now();
        let result = work.await.with_context(|| format!("step `{name}`"));
        let took = started.elapsed();
        eprintln!(
            "<-- {name}: {} in {took:.1?}",
            if result.is_ok() { "ok" } else { "FAILED" }
        );
        if result.is_ok() {
            self.timings.lock().expect("timings lock").push((name, took));
        }
        result
    }

    fn print_timings(&self) {
        eprintln!("user journey steps ({} backend):", self.backend.name());
        for (name, took) in self.timings.lock().expect("timings lock").iter() {
            eprintln!("  {took:>8.1?}  {name}");
        }
    }

    async fn kubectl(&self, args: &[&str]) -> anyhow::Result<String> {
        self.backend.kubectl(args).await
    }

    /// kubectl in the cluster's namespace.
    async fn kubectl_ns(&self, args: &[&str]) -> anyhow::Result<String> {
        let mut all = vec!["--namespace", &self.namespace];
        all.extend_from_slice(args);
        self.backend.kubectl(&all).await
    }

    async fn install_operator(&self) -> anyhow::Result<()> {
        let lint = self.helm.lint(&self.chart).await?;
        eprintln!("helm lint: {}", lint.trim());
        let images = self.backend.images();
        let mut values = vec![
            ("image.repository", images.operator.repository.clone()),
            ("image.tag", images.operator.tag.clone()),
            ("nodeImage.repository", images.node.repository.clone()),
            ("nodeImage.tag", images.node.tag.clone()),
        ];
        if self.backend.is_simulated() {
            // No cluster DNS in the simulation; pods keep their loopback address for life, and
            // every pod shares the host's ports, so the operator binds only its own address.
            values.push(("operator.peerAddressing", "pod-ip".into()));
            values.push(("operator.metricsBindAddress", "$(POD_IP)".into()));
        }
        let installed = self
            .helm
            .install(
                self.backend.kubeconfig(),
                RELEASE,
                OPERATOR_NAMESPACE,
                &self.chart,
                &values,
            )
            .await?;
        eprintln!("helm install: {}", installed.trim());
        self.kubectl(&["get", "crd", "raftclusters.raftkv.dev"]).await?;
        self.kubectl(&[
            "rollout",
            "status",
            "--namespace",
            OPERATOR_NAMESPACE,
            &format!("deployment/{OPERATOR_DEPLOYMENT}"),
            "--timeout=300s",
        ])
        .await?;
        Ok(())
    }

    async fn apply_cluster(&self) -> anyhow::Result<()> {
        if self
            .kubectl(&["get", "namespace", &self.namespace, "--ignore-not-found", "-o", "name"])
            .await?
            .is_empty()
        {
            self.kubectl(&["create", "namespace", &self.namespace]).await?;
        }
        let manifest = self.backend.scratch_dir().join("demo.yaml");
        std::fs::write(&manifest, CLUSTER_MANIFEST)?;
        let manifest = manifest.to_string_lossy().into_owned();
        self.kubectl_ns(&["apply", "-f", &manifest]).await?;
        self.kubectl_ns(&[
            "wait",
            "raftcluster/demo",
            "--for=condition=Available",
            "--timeout=300s",
        ])
        .await?;
        self.converged(3, &self.backend.images().node.reference()).await?;
        let names = self
            .kubectl_ns(&[
                "get",
                "statefulset/demo",
                "service/demo",
                "service/demo-peer",
                "pdb/demo",
                "-o",
                "name",
            ])
            .await?;
        ensure!(names.lines().count() == 4, "missing objects: {names}");
        Ok(())
    }

    async fn write_and_read(&self) -> anyhow::Result<()> {
        let keys: Vec<(String, String)> = (0..50)
            .map(|i| (format!("greeting-{i}"), format!("hello-{i}")))
            .collect();
        for (i, (key, value)) in keys.iter().enumerate() {
            let status = self
                .retry_unavailable(
                    |base| {
                        let (kv, key, value) = (self.kv.clone(), key.clone(), value.clone());
                        async move { kv.put(&base, &key, &value).await }
                    },
                    i,
                )
                .await?;
            ensure!(status == StatusCode::OK, "PUT {key}: {status}");
        }
        // Every member the Service routes to serves every key.
        let urls = self.backend.service_urls(&self.namespace, CLUSTER, "client").await?;
        ensure!(!urls.is_empty(), "the client Service has no endpoints");
        for base in &urls {
            for (key, value) in &keys {
                let found = self.kv.get(base, key).await?;
                ensure!(
                    found.as_deref() == Some(value.as_str()),
                    "{base}: {key} is {found:?}, expected {value:?}"
                );
            }
        }
        ensure!(
            self.kv.get(&urls[0], "never-written").await?.is_none(),
            "an unwritten key was found"
        );
        Ok(())
    }

    /// Runs `put` against the Service's endpoints until it answers something other than 503 or
    /// a transport error, or the deadline passes.
    async fn retry_unavailable<F, Fut>(&self, put: F, attempt_seed: usize) -> anyhow::Result<StatusCode>
    where
        F: Fn(String) -> Fut,
        Fut: std::future::Future<Output = reqwest::Result<StatusCode>>,
    {
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut attempt = attempt_seed;
        loop {
            let urls = self.backend.service_urls(&self.namespace, CLUSTER, "client").await?;
            if let Some(base) = urls.get(attempt % urls.len().max(1)) {
                match put(base.clone()).await {
                    Ok(StatusCode::SERVICE_UNAVAILABLE) => {}
                    Ok(status) => return Ok(status),
                    Err(_) => self.backend.reset_forwards(&self.namespace).await,
                }
            }
            ensure!(Instant::now() < deadline, "no answer but 503 or errors for 60 s");
            attempt += 1;
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    async fn scale_under_writes(&self) -> anyhow::Result<()> {
        let writer = Writer::start(self.backend.clone(), self.kv.clone(), &self.namespace, CLUSTER, "scale");
        let node_image = self.backend.images().node.reference();
        self.kubectl_ns(&["scale", "raftcluster", CLUSTER, "--replicas=5"])
            .await?;
        self.converged(5, &node_image).await.context("scaling out to 5")?;
        self.kubectl_ns(&["scale", "raftcluster", CLUSTER, "--replicas=3"])
            .await?;
        self.converged(3, &node_image).await.context("scaling in to 3")?;
        // The removed members' volumes go with them: a later scale-out starts fresh members.
        self.wait_for("the removed members' claims to be deleted", || async {
            let claims = self.kubectl_ns(&["get", "pvc", "-o", "name"]).await?;
            Ok((!claims.contains("data-demo-3") && !claims.contains("data-demo-4")).then_some(()))
        })
        .await?;
        let report = writer.stop().await?;
        eprintln!("writer during scaling: {report}");
        ensure!(report.ok > 0, "no write was acknowledged while scaling: {report}");
        verify_acked(&self.backend, &self.kv, &self.namespace, CLUSTER, &report.acked).await?;
        Ok(())
    }

    async fn lose_the_leader(&self) -> anyhow::Result<()> {
        let leader = self.status_of(CLUSTER).await?["leader"]
            .as_str()
            .context("status.leader is empty")?
            .to_string();
        let before = self.node_status(&leader).await?;
        ensure!(before.role == Role::Leader, "{leader} reports role {:?}", before.role);
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), &self.namespace);
        let old_uid = pods.get(&leader).await?.metadata.uid;
        self.kubectl_ns(&["delete", "pod", &leader, "--wait=false"]).await?;
        self.wait_for("the leader's pod to be recreated and ready", || async {
            let pod = pods.get_opt(&leader).await?;
            Ok(pod.filter(|p| p.metadata.uid != old_uid && is_ready(p)).map(|_| ()))
        })
        .await?;
        self.converged(3, &self.backend.images().node.reference()).await?;
        let after = self.node_status(&leader).await?;
        ensure!(
            after.id == before.id,
            "{leader} came back as member {}, was {}: its volume was not reattached",
            after.id,
            before.id
        );
        ensure!(
            after.membership == Membership::Voter,
            "{leader} rejoined as {:?}",
            after.membership
        );
        // The data written before the failure survived it.
        let urls = self.backend.service_urls(&self.namespace, CLUSTER, "client").await?;
        let base = urls.first().context("no endpoints")?;
        ensure!(
            self.kv.get(base, "greeting-7").await?.as_deref() == Some("hello-7"),
            "greeting-7 lost"
        );
        Ok(())
    }

    async fn roll_out_image(&self) -> anyhow::Result<()> {
        let image = self.backend.images().node_rollout.reference();
        let writer = Writer::start(
            self.backend.clone(),
            self.kv.clone(),
            &self.namespace,
            CLUSTER,
            "rollout",
        );
        let patch = serde_json::json!({"spec": {"image": image}}).to_string();
        self.kubectl_ns(&["patch", "raftcluster", CLUSTER, "--type=merge", "-p", &patch])
            .await?;
        self.converged(3, &image).await?;
        let report = writer.stop().await?;
        eprintln!("writer during the rollout: {report}");
        ensure!(report.ok > 0, "no write was acknowledged during the rollout: {report}");
        ensure!(
            report.longest_gap <= MAX_WRITE_GAP,
            "writes stalled for {:?} during the rollout (quorum lost?): {report}",
            report.longest_gap
        );
        let refused: Vec<_> = report
            .other
            .keys()
            .filter(|k| k.starts_with('4') || k.as_str() == "500")
            .collect();
        ensure!(refused.is_empty(), "writes were refused during the rollout: {report}");
        verify_acked(&self.backend, &self.kv, &self.namespace, CLUSTER, &report.acked).await?;
        Ok(())
    }

    async fn delete_cluster(&self) -> anyhow::Result<()> {
        self.kubectl_ns(&["delete", "raftcluster", CLUSTER, "--timeout=120s"])
            .await?;
        self.wait_for("the StatefulSet, Services, PDB and pods to be collected", || async {
            let left = self
                .kubectl_ns(&[
                    "get",
                    "statefulsets,services,poddisruptionbudgets,pods",
                    "--selector=app.kubernetes.io/instance=demo",
                    "-o",
                    "name",
                ])
                .await?;
            let named = self
                .kubectl_ns(&[
                    "get",
                    "statefulset/demo",
                    "service/demo",
                    "service/demo-peer",
                    "pdb/demo",
                    "--ignore-not-found",
                    "-o",
                    "name",
                ])
                .await?;
            Ok((left.trim().is_empty() && named.trim().is_empty()).then_some(()))
        })
        .await?;
        Ok(())
    }

    /// Uninstalls the chart and, on a real cluster, removes the journey's namespace.
    async fn clean_up(&self) -> anyhow::Result<()> {
        let uninstalled = self
            .helm
            .uninstall(self.backend.kubeconfig(), RELEASE, OPERATOR_NAMESPACE)
            .await;
        if !self.backend.is_simulated() {
            self.kubectl(&[
                "delete",
                "namespace",
                &self.namespace,
                "--ignore-not-found",
                "--wait=false",
            ])
            .await?;
        }
        uninstalled.map(|_| ())
    }

    async fn node_status(&self, pod: &str) -> anyhow::Result<raftkv_api::Status> {
        let base = self.backend.pod_url(&self.namespace, pod, CLIENT_PORT).await?;
        self.kv_of_pod(pod).status(&base).await
    }

    /// The client that can ask `cluster`'s admin API: the TLS cluster's admin client for its
    /// pods, the plaintext one for every other cluster.
    fn kv_of(&self, cluster: &str) -> &Kv {
        match self.tls_admin.get() {
            Some(admin) if cluster == tls::TLS_CLUSTER => admin,
            _ => &self.kv,
        }
    }

    fn kv_of_pod(&self, pod: &str) -> &Kv {
        let cluster = pod.rsplit_once('-').map_or(pod, |(cluster, _)| cluster);
        self.kv_of(cluster)
    }

    /// Polls `check` every half second until it yields a value; errors from `check` count as
    /// "not yet", and the last one is reported on timeout.
    async fn wait_for<T, F, Fut>(&self, what: &str, check: F) -> anyhow::Result<T>
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = anyhow::Result<Option<T>>>,
    {
        let deadline = Instant::now() + CONVERGE;
        loop {
            let last = match check().await {
                Ok(Some(value)) => return Ok(value),
                Ok(None) => "condition not met".to_string(),
                Err(e) => format!("{e:#}"),
            };
            if Instant::now() >= deadline {
                bail!("timed out after {CONVERGE:?} waiting for {what}; last: {last}");
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    /// Waits until the quick start's cluster has converged on `replicas` (see
    /// [`Journey::converged_as`]).
    async fn converged(&self, replicas: usize, image: &str) -> anyhow::Result<()> {
        self.converged_as(CLUSTER, replicas, image).await
    }

    /// Waits until `cluster` is exactly `replicas` ready pods running `image`, the
    /// RaftCluster reports them all as healthy voters for its current generation, and the Raft
    /// membership (the nodes' own `GET /v1/members`) is exactly those pods' members.
    async fn converged_as(&self, cluster: &str, replicas: usize, image: &str) -> anyhow::Result<()> {
        // A remaining difference is reported as an error, so a timeout names the last one.
        self.wait_for(&format!("{replicas} ready voters of {cluster} on {image}"), || async {
            match self.convergence_gap(cluster, replicas, image).await? {
                None => Ok(Some(())),
                Some(gap) => Err(anyhow::anyhow!(gap)),
            }
        })
        .await
        .with_context(|| format!("converging on {replicas} members"))?;
        Ok(())
    }

    /// What still differs from `replicas` converged members, or `None` when nothing does.
    async fn convergence_gap(
        &self,
        cluster_name: &str,
        replicas: usize,
        image: &str,
    ) -> anyhow::Result<Option<String>> {
        let json = self
            .kubectl_ns(&["get", "raftcluster", cluster_name, "-o", "json"])
            .await?;
        let cluster: Value = serde_json::from_str(&json)?;
        let status = &cluster["status"];
        if status["observedGeneration"] != cluster["metadata"]["generation"] {
            return Ok(Some("status is for an older generation".into()));
        }
        if status["phase"] != "Running" {
            return Ok(Some(format!("phase {}", status["phase"])));
        }
        let degraded = status["conditions"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|c| c["type"] == "Degraded" && c["status"] != "False");
        if let Some(degraded) = degraded {
            return Ok(Some(format!("degraded: {degraded}")));
        }
        let available = status["conditions"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|c| c["type"] == "Available" && c["status"] == "True");
        if !available || status["readyReplicas"].as_u64() != Some(replicas as u64) {
            return Ok(Some(format!(
                "status: available={available}, ready={}",
                status["readyReplicas"]
            )));
        }
        let members = status["members"].as_array().cloned().unwrap_or_default();
        if members.len() != replicas || members.iter().any(|m| m["role"] == "Learner") {
            return Ok(Some(format!("status members: {members:?}")));
        }
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), &self.namespace);
        let pods = pods
            .list(&ListParams::default().labels(&format!(
                "app.kubernetes.io/name=raftkv,app.kubernetes.io/instance={cluster_name}"
            )))
            .await?
            .items;
        let expected: BTreeSet<String> = (0..replicas).map(|i| format!("{cluster_name}-{i}")).collect();
        let names: BTreeSet<String> = pods.iter().filter_map(|p| p.metadata.name.clone()).collect();
        if names != expected {
            return Ok(Some(format!("pods {names:?}")));
        }
        for pod in &pods {
            let name = pod.metadata.name.as_deref().unwrap_or_default();
            let running = pod
                .spec
                .as_ref()
                .map(|s| s.containers[0].image.as_deref() == Some(image));
            if pod.metadata.deletion_timestamp.is_some() || !is_ready(pod) || running != Some(true) {
                return Ok(Some(format!("pod {name} is not a ready pod of {image}")));
            }
        }
        // The Raft side: each pod's member id, against the applied membership.
        let mut pod_members = BTreeSet::new();
        for name in &names {
            let node = self.node_status(name).await?;
            if node.membership != Membership::Voter {
                return Ok(Some(format!("{name} is a {:?}", node.membership)));
            }
            pod_members.insert(node.id);
        }
        let urls = self
            .backend
            .service_urls(&self.namespace, cluster_name, "client")
            .await?;
        let base = urls.first().context("the client Service has no endpoints")?;
        let members = self.kv_of(cluster_name).members(base).await?;
        let voters: BTreeSet<u64> = members
            .iter()
            .filter(|m| m.role == MemberKind::Voter)
            .map(|m| m.id)
            .collect();
        if voters != pod_members || members.len() != voters.len() {
            return Ok(Some(format!(
                "membership {members:?} is not the pods' members {pod_members:?}"
            )));
        }
        Ok(None)
    }
}

fn is_ready(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}
