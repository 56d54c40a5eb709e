//! The operator's membership planner and executor driving real `raftkv-node` processes, with no
//! Kubernetes: pods are processes, the StatefulSet's replica count decides which run, claims are
//! data directories. A client writes throughout 1 -> 3 -> 5 -> 3 -> 1 replicas; every
//! acknowledged write must survive and the final membership must be exactly the desired pods.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use anyhow::{bail, Context};
use parking_lot::Mutex;
use raftkv_operator::crd::BootstrapRecord;
use raftkv_operator::execute::{execute, ClusterEffects};
use raftkv_operator::names::ClusterNames;
use raftkv_operator::node_client::{HttpNodeClient, NodeClientTimeouts};
use raftkv_operator::observe::{observe_and_plan, Inputs, PodFacts};
use raftkv_operator::plan::{Desired, Step};
use tokio::time::Instant;

/// The node binary: the one `cargo test --workspace` built next to this test, or built now when
/// this package's tests run alone.
fn node_binary() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        // Test executables live in <target>/debug/deps; binaries in <target>/debug.
        let exe = std::env::current_exe().expect("test executable path");
        let bin = exe
            .parent()
            .and_then(Path::parent)
            .expect("target dir")
            .join("raftkv-node");
        if !bin.exists() {
            let status = Command::new(env!("CARGO"))
                // With the fail points, as the node's own tests build it: one binary at this path.
                .args(["build", "-q", "-p", "raftkv-node", "--bin", "raftkv-node"])
                .args(["--features", "failpoints"])
                .status()
                .expect("run cargo build");
            assert!(status.success(), "building raftkv-node failed");
        }
        assert!(bin.exists(), "{} is missing", bin.display());
        bin
    })
}

/// One pod: a node process with a data directory that outlives it.
struct PodProcess {
    /// The running node.
    child: Child,
    /// The base URL of its admin API.
    url: String,
}

/// The Kubernetes side of the test: what a StatefulSet, its pods and its claims would do.
struct ProcessCluster {
    /// The directory holding every pod's data directory, address file and log.
    root: PathBuf,
    /// The StatefulSet's replica count: which ordinals run.
    replicas: Mutex<u32>,
    /// The running pods, by ordinal.
    pods: Mutex<BTreeMap<u32, PodProcess>>,
    /// The bootstrap record the `RaftCluster`'s status would hold.
    bootstrap: Mutex<Option<BootstrapRecord>>,
    /// The removed-member marks on claims, by ordinal; they go with their data directory.
    claim_marks: Mutex<BTreeMap<u32, u64>>,
}

impl ProcessCluster {
    fn data_dir(&self, ordinal: u32) -> PathBuf {
        self.root.join(format!("data-demo-{ordinal}"))
    }

    fn start_pod(&self, ordinal: u32) -> anyhow::Result<()> {
        let dir = self.data_dir(ordinal);
        let addr_file = self.root.join(format!("pod-{ordinal}.addr.json"));
        let _ = std::fs::remove_file(&addr_file);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.root.join(format!("pod-{ordinal}.log")))?;
        let child = Command::new(node_binary())
            .arg("--data-dir")
            .arg(&dir)
            .args(["--client-addr", "127.0.0.1:0", "--peer-addr", "127.0.0.1:0"])
            .args(["--tick-ms", "50", "--snapshot-count", "200"])
            .arg("--addr-file")
            .arg(&addr_file)
            .stdout(Stdio::from(log.try_clone()?))
            .stderr(Stdio::from(log))
            .spawn()?;
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        let client = loop {
            if let Ok(raw) = std::fs::read(&addr_file) {
                let v: serde_json::Value = serde_json::from_slice(&raw)?;
                break v["client"].as_str().context("client address")?.to_string();
            }
            if std::time::Instant::now() > deadline {
                bail!("pod {ordinal} did not start");
            }
            std::thread::yield_now();
        };
        self.pods.lock().insert(
            ordinal,
            PodProcess {
                child,
                url: format!("http://{client}"),
            },
        );
        Ok(())
    }

    fn stop_pod(&self, ordinal: u32) {
        if let Some(mut pod) = self.pods.lock().remove(&ordinal) {
            let pid = nix::unistd::Pid::from_raw(pod.child.id() as i32);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
            let t = std::time::Instant::now();
            let _ = pod.child.wait();
            if std::env::var_os("RAFTKV_TRACE_STEPS").is_some() {
                eprintln!("pod {ordinal} stopped in {:?}", t.elapsed());
            }
        }
    }

    /// The StatefulSet controller: pods 0..replicas run.
    fn sync_pods(&self) -> anyhow::Result<()> {
        let replicas = *self.replicas.lock();
        let running: Vec<u32> = self.pods.lock().keys().copied().collect();
        for ordinal in running.iter().filter(|o| **o >= replicas) {
            self.stop_pod(*ordinal);
        }
        for ordinal in 0..replicas {
            if !self.pods.lock().contains_key(&ordinal) {
                self.start_pod(ordinal)?;
            }
        }
        Ok(())
    }

    fn claims(&self) -> BTreeSet<u32> {
        (0..16).filter(|o| self.data_dir(*o).exists()).collect()
    }

    fn endpoints(&self) -> BTreeMap<u32, String> {
        self.pods.lock().iter().map(|(o, p)| (*o, p.url.clone())).collect()
    }

    fn logs(&self) -> String {
        let mut out = String::new();
        for o in 0..8 {
            if let Ok(text) = std::fs::read_to_string(self.root.join(format!("pod-{o}.log"))) {
                let lines: Vec<&str> = text.lines().collect();
                out += &format!(
                    "===== pod {o} =====\n{}\n",
                    lines[lines.len().saturating_sub(30)..].join("\n")
                );
            }
        }
        out
    }
}

impl Drop for ProcessCluster {
    fn drop(&mut self) {
        for (_, mut pod) in std::mem::take(&mut *self.pods.lock()) {
            let _ = pod.child.kill();
            let _ = pod.child.wait();
        }
    }
}

impl ClusterEffects for ProcessCluster {
    async fn scale_statefulset(&self, replicas: u32) -> raftkv_operator::Result<()> {
        *self.replicas.lock() = replicas;
        Ok(())
    }

    async fn delete_claim(&self, ordinal: u32) -> raftkv_operator::Result<()> {
        assert!(
            !self.pods.lock().contains_key(&ordinal),
            "claim {ordinal} deleted under a running pod"
        );
        let _ = std::fs::remove_dir_all(self.data_dir(ordinal));
        self.claim_marks.lock().remove(&ordinal);
        Ok(())
    }

    async fn mark_claim_removed(&self, ordinal: u32, member_id: u64) -> raftkv_operator::Result<()> {
        if self.data_dir(ordinal).exists() {
            self.claim_marks.lock().insert(ordinal, member_id);
        }
        Ok(())
    }

    async fn delete_pod(&self, ordinal: u32) -> raftkv_operator::Result<()> {
        self.stop_pod(ordinal);
        Ok(())
    }

    async fn record_bootstrap(&self, record: &BootstrapRecord) -> raftkv_operator::Result<()> {
        *self.bootstrap.lock() = Some(record.clone());
        Ok(())
    }

    async fn publish_event(&self, reason: &str, note: &str, _warning: bool) -> raftkv_operator::Result<()> {
        eprintln!("event {reason}: {note}");
        Ok(())
    }
}

/// Runs observe -> plan -> execute until the planner reports convergence.
async fn reconcile_until_converged(
    cluster: &ProcessCluster,
    nodes: &HttpNodeClient,
    replicas: u32,
) -> anyhow::Result<Vec<String>> {
    let names = ClusterNames::new("demo", "default");
    let desired = Desired {
        replicas,
        max_lag: 1000,
    };
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut steps = Vec::new();
    loop {
        cluster.sync_pods()?;
        let endpoints = cluster.endpoints();
        let mut pods = Vec::new();
        for (&ordinal, url) in &endpoints {
            let ready = nodes_ready(url).await;
            pods.push(PodFacts {
                ordinal,
                name: format!("demo-{ordinal}"),
                ready,
                terminating: false,
                up_to_date: true,
                ip: Some(url.clone()),
                failure: None,
                unready_since: None,
            });
        }
        let claims = cluster.claims();
        let marks = cluster.claim_marks.lock().clone();
        let bootstrap = cluster.bootstrap.lock().clone();
        let inputs = Inputs {
            names: &names,
            statefulset_replicas: *cluster.replicas.lock(),
            pods: &pods,
            endpoints: &endpoints,
            claims: &claims,
            removed_member_claims: &marks,
            bootstrap: bootstrap.as_ref(),
            previous_members: &[],
        };
        let step = observe_and_plan(inputs, &desired, nodes).await.step;
        if step == Step::Converged {
            return Ok(steps);
        }
        if step.is_membership_change() || matches!(step, Step::ScaleStatefulSet { .. }) {
            steps.push(step.kind().to_string());
        }
        let t = Instant::now();
        let result = execute(&step, &endpoints, nodes, cluster).await?;
        if std::env::var_os("RAFTKV_TRACE_STEPS").is_some() {
            eprintln!("{:?} -> {:?} in {:?}", step, result.outcome, t.elapsed());
        }
        if Instant::now() > deadline {
            bail!("not converged on {replicas} replicas; last step {step:?}; steps so far {steps:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn nodes_ready(url: &str) -> bool {
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(2))
        .build()
        .expect("client");
    matches!(client.get(format!("{url}/readyz")).send().await, Ok(r) if r.status().is_success())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn planner_and_executor_scale_real_nodes_1_3_5_3_1_without_losing_acknowledged_writes() {
    let root = tempfile::tempdir().unwrap();
    let cluster = Arc::new(ProcessCluster {
        root: root.path().to_path_buf(),
        // The operator creates the StatefulSet at the desired size before planning membership.
        replicas: Mutex::new(1),
        pods: Mutex::new(BTreeMap::new()),
        bootstrap: Mutex::new(None),
        claim_marks: Mutex::new(BTreeMap::new()),
    });
    let nodes = HttpNodeClient::new(NodeClientTimeouts::default()).unwrap();

    // A client writes throughout, to whichever pods run, and remembers what was acknowledged.
    let stop = Arc::new(AtomicBool::new(false));
    let acked: Arc<Mutex<BTreeMap<String, String>>> = Arc::default();
    let writer = {
        let (cluster, stop, acked) = (cluster.clone(), stop.clone(), acked.clone());
        tokio::spawn(async move {
            let http = reqwest::Client::builder()
                .timeout(Duration::from_secs(5))
                .build()
                .unwrap();
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let endpoints: Vec<String> = cluster.endpoints().into_values().collect();
                if endpoints.is_empty() {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                }
                n += 1;
                let (key, value) = (format!("w{n:06}"), format!("value-{n}"));
                let url = &endpoints[n as usize % endpoints.len()];
                if let Ok(r) = http.put(format!("{url}/v1/kv/{key}")).body(value.clone()).send().await {
                    if r.status().is_success() {
                        acked.lock().insert(key, value);
                    }
                }
            }
        })
    };

    let mut journal = Vec::new();
    for replicas in [1, 3, 5, 3, 1] {
        let started = Instant::now();
        let steps = match reconcile_until_converged(&cluster, &nodes, replicas).await {
            Ok(steps) => steps,
            Err(e) => panic!("{e:#}\n{}", cluster.logs()),
        };
        journal.push(format!("{replicas} replicas in {:?}: {steps:?}", started.elapsed()));
    }
    stop.store(true, Ordering::Relaxed);
    writer.await.unwrap();
    for line in &journal {
        eprintln!("{line}");
    }

    // Exactly one member remains, it is pod 0, and it holds every acknowledged write.
    let endpoints = cluster.endpoints();
    assert_eq!(endpoints.keys().copied().collect::<Vec<_>>(), vec![0]);
    let url = &endpoints[&0];
    let http = reqwest::Client::new();
    let members: serde_json::Value = http
        .get(format!("{url}/v1/members"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let members = members["members"].as_array().unwrap();
    assert_eq!(members.len(), 1, "{members:?}");
    assert_eq!(members[0]["role"], "voter");
    assert_eq!(
        cluster.claims(),
        BTreeSet::from([0]),
        "claims of removed members are deleted"
    );
    let acked = acked.lock().clone();
    assert!(acked.len() > 50, "the writer made too little progress: {}", acked.len());
    let listing: serde_json::Value = http
        .get(format!("{url}/v1/kv?prefix=w&limit=10000"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let stored: BTreeMap<String, String> = listing["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| {
            (
                i["key"].as_str().unwrap().to_string(),
                i["value"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    for (key, value) in &acked {
        assert_eq!(stored.get(key), Some(value), "acknowledged write {key} was lost");
    }
}

/// A started 3-member cluster of real nodes, and writes acknowledged on it with their revisions.
async fn three_members_with_writes(
    root: &Path,
    writes: u64,
) -> (Arc<ProcessCluster>, HttpNodeClient, BTreeMap<String, u64>) {
    let cluster = Arc::new(ProcessCluster {
        root: root.to_path_buf(),
        replicas: Mutex::new(1),
        pods: Mutex::new(BTreeMap::new()),
        bootstrap: Mutex::new(None),
        claim_marks: Mutex::new(BTreeMap::new()),
    });
    let nodes = HttpNodeClient::new(NodeClientTimeouts::default()).unwrap();
    if let Err(e) = reconcile_until_converged(&cluster, &nodes, 3).await {
        panic!("{e:#}\n{}", cluster.logs());
    }
    let http = reqwest::Client::new();
    let url = cluster.endpoints()[&0].clone();
    let mut acked = BTreeMap::new();
    for n in 0..writes {
        let key = format!("k{n:06}");
        let r = http
            .put(format!("{url}/v1/kv/{key}"))
            .body(format!("value-{n}"))
            .send()
            .await
            .unwrap();
        assert!(r.status().is_success(), "PUT {key}: {}", r.status());
        let body: raftkv_api::WriteResponse = r.json().await.unwrap();
        acked.insert(key, body.revision);
    }
    (cluster, nodes, acked)
}

/// The ordinal of the pod whose node leads, and of one that follows.
async fn leader_and_follower(cluster: &ProcessCluster, nodes: &HttpNodeClient) -> (u32, u32) {
    use raftkv_operator::node_client::NodeApi;
    let mut leader = None;
    let mut follower = None;
    for (ordinal, url) in cluster.endpoints() {
        let s = nodes.status(&url).await.unwrap();
        if s.id == s.leader_id {
            leader = Some(ordinal);
        } else {
            follower = Some(ordinal);
        }
    }
    (leader.expect("a leader"), follower.expect("a follower"))
}

fn local_destination(dir: &Path) -> raftkv_backup::Destination {
    let url = format!("file://{}/backups", dir.display());
    raftkv_backup::Destination::open(&url, &BTreeMap::new(), &raftkv_backup::StoreOptions::default()).unwrap()
}

fn signal(cluster: &ProcessCluster, ordinal: u32, signal: nix::sys::signal::Signal) {
    let pods = cluster.pods.lock();
    let pid = nix::unistd::Pid::from_raw(pods[&ordinal].child.id() as i32);
    nix::sys::signal::kill(pid, signal).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_backup_while_the_leader_is_killed_is_whole_and_consistent_or_fails_with_a_reason() {
    let root = tempfile::tempdir().unwrap();
    let (cluster, nodes, acked) = three_members_with_writes(root.path(), 3000).await;
    let highest = *acked.values().max().unwrap();
    let (leader, follower) = leader_and_follower(&cluster, &nodes).await;
    let dest = local_destination(root.path());
    let http = reqwest::Client::builder()
        .read_timeout(Duration::from_secs(20))
        .build()
        .unwrap();
    let source = cluster.endpoints()[&follower].clone();
    let now = k8s_openapi::jiff::Timestamp::now();
    let backup = {
        let (http, dest) = (http.clone(), dest.clone());
        tokio::spawn(async move { raftkv_operator::backup::stream_backup(&http, &source, &dest, "demo", now).await })
    };
    signal(&cluster, leader, nix::sys::signal::Signal::SIGKILL);
    let result = tokio::time::timeout(Duration::from_secs(120), backup)
        .await
        .unwrap()
        .unwrap();
    let listed = raftkv_backup::catalog::list_backups(&dest, "demo").await.unwrap();
    match result {
        Ok(b) => {
            eprintln!("the backup completed: revision {}, {} bytes", b.revision, b.size);
            // Linearizable: every write acknowledged before the backup began is in it.
            assert!(
                b.revision >= highest,
                "backup revision {} below acknowledged {highest}",
                b.revision
            );
            assert_eq!(listed.len(), 1, "{listed:?}");
            let file = root.path().join("check.snap");
            let size = raftkv_backup::transfer::download_snapshot(&dest, &listed[0].name, &file)
                .await
                .unwrap();
            assert_eq!(size, b.size);
        }
        Err(reason) => {
            eprintln!("the backup failed: {reason}");
            assert!(!reason.is_empty());
            assert!(listed.is_empty(), "a failed backup left {listed:?}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_backup_from_a_member_cut_off_from_its_peers_fails_with_a_reason_and_stores_nothing() {
    let root = tempfile::tempdir().unwrap();
    let (cluster, _nodes, _acked) = three_members_with_writes(root.path(), 200).await;
    // Freeze the other two members: the source can no longer confirm a linearizable revision.
    for ordinal in [1, 2] {
        signal(&cluster, ordinal, nix::sys::signal::Signal::SIGSTOP);
    }
    let dest = local_destination(root.path());
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap();
    let source = cluster.endpoints()[&0].clone();
    let now = k8s_openapi::jiff::Timestamp::now();
    let result = raftkv_operator::backup::stream_backup(&http, &source, &dest, "demo", now).await;
    for ordinal in [1, 2] {
        signal(&cluster, ordinal, nix::sys::signal::Signal::SIGCONT);
    }
    let reason = result.expect_err("a member without a quorum cannot take a linearizable backup");
    eprintln!("refused as expected: {reason}");
    assert!(reason.contains("/v1/snapshot"), "the reason names the call: {reason}");
    assert!(raftkv_backup::catalog::list_backups(&dest, "demo")
        .await
        .unwrap()
        .is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_backup_restored_from_its_object_url_serves_every_write_up_to_its_revision() {
    let root = tempfile::tempdir().unwrap();
    let (cluster, nodes, acked) = three_members_with_writes(root.path(), 500).await;
    let (_, follower) = leader_and_follower(&cluster, &nodes).await;
    let dest = local_destination(root.path());
    let http = reqwest::Client::new();
    let source = cluster.endpoints()[&follower].clone();
    let now = k8s_openapi::jiff::Timestamp::now();
    let backup = raftkv_operator::backup::stream_backup(&http, &source, &dest, "demo", now)
        .await
        .unwrap();
    // A write after the backup: not in the restored cluster.
    let url = cluster.endpoints()[&0].clone();
    let r = http.put(format!("{url}/v1/kv/after")).body("x").send().await.unwrap();
    assert!(r.status().is_success());
    drop(cluster);

    let data = root.path().join("restored");
    let scratch = root.path().join("scratch");
    std::fs::create_dir(&scratch).unwrap();
    let out = Command::new(node_binary())
        .args(["restore", "--from", &backup.object, "--data-dir"])
        .arg(&data)
        .args(["--peer-url", "http://127.0.0.1:1"])
        .arg("--scratch-dir")
        .arg(&scratch)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "restore failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let line: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(line["revision"].as_u64(), Some(backup.revision), "{line}");
    assert!(
        std::fs::read_dir(&scratch).unwrap().next().is_none(),
        "the download was not deleted"
    );

    let addr_file = root.path().join("restored.addr.json");
    let mut node = Command::new(node_binary())
        .arg("--data-dir")
        .arg(&data)
        .args([
            "--client-addr",
            "127.0.0.1:0",
            "--peer-addr",
            "127.0.0.1:0",
            "--tick-ms",
            "50",
        ])
        .arg("--addr-file")
        .arg(&addr_file)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let result = async {
        let deadline = Instant::now() + Duration::from_secs(60);
        let base = loop {
            if let Ok(raw) = std::fs::read(&addr_file) {
                let v: serde_json::Value = serde_json::from_slice(&raw)?;
                break format!("http://{}", v["client"].as_str().context("client")?);
            }
            if Instant::now() > deadline {
                bail!("the restored node did not start");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        while !nodes_ready(&base).await {
            if Instant::now() > deadline {
                bail!("the restored node did not become ready");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        for (key, revision) in &acked {
            assert!(*revision <= backup.revision);
            let r = http.get(format!("{base}/v1/kv/{key}")).send().await?;
            assert_eq!(r.status(), reqwest::StatusCode::OK, "{key} lost");
        }
        let r = http.get(format!("{base}/v1/kv/after")).send().await?;
        assert_eq!(
            r.status(),
            reqwest::StatusCode::NOT_FOUND,
            "a write after the backup was restored"
        );
        Ok(())
    }
    .await;
    let _ = node.kill();
    let _ = node.wait();
    result.unwrap();
}

/// Figures for the README: a backup of many keys from a follower of 3 members into a local
/// directory, and single-client write latency before and while it runs.
/// `RAFTKV_FIGURE_KEYS=1000000 cargo test --release -p raftkv-operator --test real_nodes -- --ignored backup_figures --nocapture`
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "a measurement, not a check"]
async fn backup_figures() {
    let keys: u64 = std::env::var("RAFTKV_FIGURE_KEYS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200_000);
    let root = tempfile::tempdir().unwrap();
    let (cluster, nodes, _) = three_members_with_writes(root.path(), 1).await;
    let (leader, follower) = leader_and_follower(&cluster, &nodes).await;
    let leader_url = cluster.endpoints()[&leader].clone();
    let http = reqwest::Client::new();
    let value = "v".repeat(256);
    let loaded = Instant::now();
    let per_task = keys / 32;
    let mut tasks = Vec::new();
    for t in 0..32u64 {
        let (http, url, value) = (http.clone(), leader_url.clone(), value.clone());
        tasks.push(tokio::spawn(async move {
            for i in 0..per_task {
                let key = format!("load-{t:02}-{i:08}");
                let r = http
                    .put(format!("{url}/v1/kv/{key}"))
                    .body(value.clone())
                    .send()
                    .await
                    .unwrap();
                assert!(r.status().is_success());
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    eprintln!("loaded {} keys in {:?}", per_task * 32, loaded.elapsed());

    async fn latencies(http: &reqwest::Client, url: &str, until: impl Fn() -> bool) -> Vec<Duration> {
        let mut out = Vec::new();
        let mut n = 0u64;
        while !until() {
            n += 1;
            let t = Instant::now();
            let r = http.put(format!("{url}/v1/kv/lat-{n}")).body("x").send().await.unwrap();
            assert!(r.status().is_success());
            out.push(t.elapsed());
        }
        out.sort();
        out
    }
    fn pct(v: &[Duration], p: f64) -> Duration {
        v[((v.len() as f64 - 1.0) * p) as usize]
    }
    let base_until = Instant::now() + Duration::from_secs(5);
    let base = latencies(&http, &leader_url, || Instant::now() > base_until).await;

    let dest = local_destination(root.path());
    let source = cluster.endpoints()[&follower].clone();
    let done = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    let backup = {
        let (http, dest, done) = (http.clone(), dest.clone(), done.clone());
        tokio::spawn(async move {
            let r = raftkv_operator::backup::stream_backup(
                &http,
                &source,
                &dest,
                "demo",
                k8s_openapi::jiff::Timestamp::now(),
            )
            .await;
            done.store(true, Ordering::Relaxed);
            (r, started.elapsed())
        })
    };
    let during = latencies(&http, &leader_url, || done.load(Ordering::Relaxed)).await;
    let (result, took) = backup.await.unwrap();
    let b = result.unwrap();
    eprintln!(
        "backup of {} MB at revision {} in {took:.2?}: {:.0} MB/s",
        b.size / 1_000_000,
        b.revision,
        b.size as f64 / 1e6 / took.as_secs_f64()
    );
    eprintln!(
        "single-client writes to the leader: before p50 {:?} p99 {:?} ({} writes); during the backup p50 {:?} p99 {:?} ({} writes)",
        pct(&base, 0.5),
        pct(&base, 0.99),
        base.len(),
        pct(&during, 0.5),
        pct(&during, 0.99),
        during.len()
    );
}
