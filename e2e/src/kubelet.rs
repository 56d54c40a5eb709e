//! The kubelet: every pod scheduled on the simulated node runs as real host processes.
//!
//! - **Scheduling**: a pod without `spec.nodeName` is bound to [`NODE_NAME`] at once.
//! - **Images**: an [`ImageTable`] maps image references (exact, or a prefix ending in `*`) to an
//!   [`ImageMapping`]: the host program that stands for the image's entrypoint, its default
//!   arguments, and extra host paths for `command` entries that name files inside the image.
//!   `command` replaces the entrypoint and `args` the default arguments, as in Kubernetes.
//! - **Environment**: the process sees only `PATH`, `HOME` (the pod's scratch directory),
//!   `HOSTNAME` (the pod name), `KUBECONFIG` (a kubeconfig for the simulated API server carrying
//!   the pod's service-account token, so kube-rs `Config::infer` reaches the server and RBAC
//!   applies to what the pod does; none with `automountServiceAccountToken: false`), `RUST_LOG`/`RUST_BACKTRACE` when set on the
//!   host, the mapping's extra variables and the container's `envFrom`/`env`. `env` supports
//!   `value` with `$(VAR)` expansion, the downward API (`metadata.name`, `metadata.namespace`,
//!   `metadata.uid`, `metadata.labels['k']`, `metadata.annotations['k']`, `spec.nodeName`,
//!   `spec.serviceAccountName`, `status.podIP`, `status.hostIP`), and ConfigMap/Secret keys.
//!   `$(VAR)` is expanded in `command` and `args` too.
//! - **Network**: each pod gets its own loopback address, stable per pod name for the life of
//!   the cluster, written to `status.podIP`. Processes must bind it themselves (for example
//!   through `$(POD_IP)` from the downward API); nothing is rewritten, and two pods can use the
//!   same port because their addresses differ.
//! - **Volumes**: a PVC is a host directory per claim under the cluster root, surviving pod
//!   deletion; `emptyDir` is per pod UID; `configMap` and `secret` volumes are materialised as
//!   files; `hostPath` is used as is. Processes cannot see mounts, so every argument, working
//!   directory and environment value that equals a `mountPath`, starts with `mountPath/`, or has
//!   such a value after its first `=` (`--data-dir=/var/lib/x`) is rewritten to the host directory.
//! - **Probes**: `httpGet`, `tcpSocket` and `exec` startup, readiness and liveness probes run
//!   against the pod address with their configured delays, periods, timeouts and thresholds;
//!   readiness drives the `Ready` condition; liveness failures restart the container.
//! - **Lifecycle**: a pod being deleted gets SIGTERM (to its process group), then SIGKILL after
//!   its grace period, and is removed from the store once its processes are gone. A process that
//!   exits is restarted with a real kubelet's back-off (10 s doubling to 5 minutes, reset after 10
//!   minutes of running) according to
//!   `restartPolicy`, counting `restartCount`. Init containers run to completion first, in order.
//! - **Logs**: stdout and stderr of each container go to [`log_path`], served by `pods/log`.

use std::collections::{BTreeMap, HashMap};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use parking_lot::Mutex;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::error::{Error, Result};
pub use crate::logs::log_path;
use crate::patch::PatchType;
use crate::store::{self, now_rfc3339, DeleteOptions, Store, Target};
use crate::volumes;
pub use crate::wellknown::NODE_NAME;

/// A crashed container's first restart delay, doubled on every crash (the kubelet's own).
const CRASH_BACKOFF_START: Duration = Duration::from_secs(10);
/// The longest restart delay.
const CRASH_BACKOFF_MAX: Duration = Duration::from_secs(300);
/// Running this long resets the restart delay.
const CRASH_BACKOFF_RESET: Duration = Duration::from_secs(600);

/// How the kubelet runs an image: the host program standing for its entrypoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageMapping {
    program: PathBuf,
    entrypoint_args: Vec<String>,
    default_args: Vec<String>,
    binaries: BTreeMap<String, PathBuf>,
    env: Vec<(String, String)>,
}

impl ImageMapping {
    /// An image whose entrypoint is `program` (a path, or a name looked up in `PATH`).
    pub fn new(program: impl Into<PathBuf>) -> Self {
        ImageMapping {
            program: program.into(),
            entrypoint_args: Vec::new(),
            default_args: Vec::new(),
            binaries: BTreeMap::new(),
            env: Vec::new(),
        }
    }

    /// Arguments that are part of the entrypoint (kept when only `args` is set).
    pub fn entrypoint_args<S: Into<String>>(mut self, args: impl IntoIterator<Item = S>) -> Self {
        self.entrypoint_args = args.into_iter().map(Into::into).collect();
        self
    }

    /// The image's default arguments (its `CMD`), used when the container sets no `args`.
    pub fn default_args<S: Into<String>>(mut self, args: impl IntoIterator<Item = S>) -> Self {
        self.default_args = args.into_iter().map(Into::into).collect();
        self
    }

    /// Maps a path inside the image, as a container `command` may name it, to a host program.
    pub fn binary(mut self, in_image: impl Into<String>, host: impl Into<PathBuf>) -> Self {
        self.binaries.insert(in_image.into(), host.into());
        self
    }

    /// An environment variable the image defines.
    pub fn env(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.env.push((name.into(), value.into()));
        self
    }

    /// The host program for `command[0]`: a mapped binary, the entrypoint when the basenames
    /// match, or the name itself (resolved in the host `PATH`).
    fn resolve_command(&self, command: &str) -> PathBuf {
        if let Some(host) = self.binaries.get(command) {
            return host.clone();
        }
        let base = |p: &Path| p.file_name().map(|f| f.to_os_string());
        if base(Path::new(command)) == base(&self.program) {
            return self.program.clone();
        }
        PathBuf::from(command)
    }
}

/// Image references to [`ImageMapping`]s.
#[derive(Debug, Clone, Default)]
pub struct ImageTable {
    entries: Vec<(String, ImageMapping)>,
}

impl ImageTable {
    /// Maps `pattern` (an exact image reference, or a prefix ending in `*` like `raftkv/node:*`).
    pub fn insert(&mut self, pattern: impl Into<String>, mapping: ImageMapping) {
        let pattern = pattern.into();
        self.entries.retain(|(p, _)| *p != pattern);
        self.entries.push((pattern, mapping));
    }

    /// The mapping of an image: an exact match first, then the longest matching prefix.
    pub fn resolve(&self, image: &str) -> Option<&ImageMapping> {
        if let Some((_, m)) = self.entries.iter().find(|(p, _)| p == image) {
            return Some(m);
        }
        self.entries
            .iter()
            .filter_map(|(p, m)| p.strip_suffix('*').map(|prefix| (prefix, m)))
            .filter(|(prefix, _)| image.starts_with(prefix))
            .max_by_key(|(prefix, _)| prefix.len())
            .map(|(_, m)| m)
    }
}

/// Where a container writes its termination message (Kubernetes' default when unset).
fn termination_message_path(container: &Value) -> String {
    container["terminationMessagePath"]
        .as_str()
        .filter(|p| !p.is_empty())
        .unwrap_or("/dev/termination-log")
        .to_string()
}

/// The host directory of the volume a PersistentVolumeClaim is bound to.
pub fn claim_path(store: &Store, namespace: &str, claim: &str) -> Result<PathBuf> {
    let claims = store.builtin("", "persistentvolumeclaims");
    let bound = store
        .get(&claims, namespace, claim)
        .ok()
        .filter(volumes::is_bound)
        .ok_or_else(|| Error::VolumeNotReady(format!("claim {namespace}/{claim} is not bound")))?;
    let volume_name = bound["spec"]["volumeName"].as_str().unwrap_or_default();
    let volume = store
        .get(&store.builtin("", "persistentvolumes"), "", volume_name)
        .map_err(|_| Error::VolumeNotReady(format!("volume {volume_name} of claim {namespace}/{claim} is missing")))?;
    volume["spec"]["hostPath"]["path"]
        .as_str()
        .map(PathBuf::from)
        .ok_or_else(|| Error::VolumeNotReady(format!("volume {volume_name} has no host path")))
}

/// What the kubelet needs to run pods.
pub struct KubeletConfig {
    /// The cluster's objects.
    pub store: Arc<Store>,
    /// Image to binary table.
    pub images: ImageTable,
    /// Root directory for volumes, logs and pod scratch directories.
    pub root: PathBuf,
    /// The API server's URL, for the kubeconfig each pod's service account gets.
    pub server: String,
    /// Second octet of pod addresses (127.X.a.b), distinct per cluster in one host.
    pub ip_octet: u8,
}

/// The pod-address allocator: stable per (namespace, name).
struct Addresses {
    octet: u8,
    assigned: Mutex<BTreeMap<(String, String), Ipv4Addr>>,
}

impl Addresses {
    fn address_of(&self, ns: &str, name: &str) -> Ipv4Addr {
        let mut assigned = self.assigned.lock();
        let next = assigned.len() as u32;
        *assigned
            .entry((ns.to_string(), name.to_string()))
            .or_insert_with(|| Ipv4Addr::new(127, self.octet, (next / 254) as u8, (next % 254 + 1) as u8))
    }
}

/// Picks a second octet for pod addresses that other clusters in this process do not use.
pub fn next_ip_octet() -> u8 {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    (2 + (std::process::id().wrapping_mul(7).wrapping_add(n * 13)) % 250) as u8
}

struct Shared {
    config: KubeletConfig,
    addresses: Addresses,
}

struct Worker {
    /// Grace period to stop with; `Some` asks the worker to stop its containers.
    stop: watch::Sender<Option<Duration>>,
    task: JoinHandle<()>,
}

/// Starts the kubelet; it stops every pod process when `shutdown` is cancelled and then returns.
pub fn spawn(config: KubeletConfig, shutdown: CancellationToken) -> JoinHandle<()> {
    let shared = Arc::new(Shared {
        addresses: Addresses {
            octet: config.ip_octet,
            assigned: Mutex::new(BTreeMap::new()),
        },
        config,
    });
    tokio::spawn(run(shared, shutdown))
}

async fn run(shared: Arc<Shared>, shutdown: CancellationToken) {
    let store = shared.config.store.clone();
    let pods_res = store.builtin("", "pods");
    let mut events = store.subscribe();
    let mut workers: HashMap<String, Worker> = HashMap::new();
    loop {
        workers.retain(|_, w| !w.task.is_finished());
        let pods = store.objects_of(store::PODS);
        let live_uids: Vec<String> = pods.iter().map(uid).collect();
        for pod in &pods {
            let (ns, name) = ns_name(pod);
            if pod["spec"]["nodeName"].as_str().is_none_or(str::is_empty) {
                let binding = json!({"spec": {"nodeName": NODE_NAME}});
                if let Err(e) = store.patch(&pods_res, &ns, &name, PatchType::Merge, &binding, Target::Main, false) {
                    tracing::warn!(pod = %name, error = %e, "binding pod");
                }
                continue;
            }
            let deleting = !pod["metadata"]["deletionTimestamp"].is_null();
            match workers.get(&uid(pod)) {
                Some(worker) if deleting => {
                    let grace = pod["metadata"]["deletionGracePeriodSeconds"].as_u64().unwrap_or(30);
                    worker.stop.send_if_modified(|stop| {
                        let changed = stop.is_none();
                        stop.get_or_insert(Duration::from_secs(grace));
                        changed
                    });
                }
                Some(_) => {}
                None if deleting => {
                    let force = DeleteOptions {
                        grace_period_seconds: Some(0),
                        ..Default::default()
                    };
                    let _ = store.delete(&pods_res, &ns, &name, &force, false);
                }
                None => {
                    let phase = pod["status"]["phase"].as_str().unwrap_or_default();
                    if phase != "Succeeded" && phase != "Failed" {
                        let (stop, stop_rx) = watch::channel(None);
                        let task = tokio::spawn(run_pod(shared.clone(), pod.clone(), stop_rx));
                        workers.insert(uid(pod), Worker { stop, task });
                    }
                }
            }
        }
        for (worker_uid, worker) in &workers {
            if !live_uids.contains(worker_uid) {
                worker.stop.send_if_modified(|stop| {
                    let changed = *stop != Some(Duration::ZERO);
                    *stop = Some(Duration::ZERO);
                    changed
                });
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = events.recv() => {
                while events.try_recv().is_ok() {}
            }
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
    for worker in workers.values() {
        let _ = worker.stop.send(Some(Duration::from_secs(2)));
    }
    for (_, worker) in workers {
        let _ = worker.task.await;
    }
}

fn uid(object: &Value) -> String {
    object["metadata"]["uid"].as_str().unwrap_or_default().to_string()
}

fn ns_name(object: &Value) -> (String, String) {
    let m = &object["metadata"];
    (
        m["namespace"].as_str().unwrap_or_default().to_string(),
        m["name"].as_str().unwrap_or_default().to_string(),
    )
}

/// The observed state of one container, published into `status.containerStatuses`.
#[derive(Debug, Clone)]
struct ContainerState {
    name: String,
    image: String,
    /// `state` as Kubernetes writes it (`running`, `waiting` or `terminated`).
    state: Value,
    last_state: Value,
    ready: bool,
    started: bool,
    restart_count: u32,
    pid: Option<u32>,
}

/// The pod as the worker sees it: identity, address, and its containers' states.
struct PodRuntime {
    shared: Arc<Shared>,
    pod: Value,
    ns: String,
    name: String,
    ip: Ipv4Addr,
    start_time: String,
    init: Mutex<Vec<ContainerState>>,
    containers: Mutex<Vec<ContainerState>>,
    /// (Initialized, ContainersReady) last published, with their transition times.
    conditions: Mutex<BTreeMap<&'static str, (bool, String)>>,
    /// Host directory of each volume by name.
    volumes: BTreeMap<String, PathBuf>,
    scratch: PathBuf,
}

fn container_state(container: &Value) -> ContainerState {
    ContainerState {
        name: container["name"].as_str().unwrap_or_default().to_string(),
        image: container["image"].as_str().unwrap_or_default().to_string(),
        state: json!({"waiting": {"reason": "ContainerCreating"}}),
        last_state: json!({}),
        ready: false,
        started: false,
        restart_count: 0,
        pid: None,
    }
}

/// Why the pod's claims cannot be mounted yet (missing, unbound, or being deleted), or `None`
/// once every one can.
fn unmountable_claim(store: &Store, pod: &Value, ns: &str) -> Option<String> {
    let claims = store.builtin("", "persistentvolumeclaims");
    volumes::claims_of(pod)
        .iter()
        .find_map(|claim| volumes::claim_unusable(store.get(&claims, ns, claim).ok().as_ref(), claim))
}

/// Writes the status of a pod whose volumes are not ready: `Pending`, no address yet, every
/// container `ContainerCreating` with the reason, as a real kubelet reports a mount that waits.
fn publish_waiting_for_volumes(store: &Store, pod: &Value, why: &str) {
    let pods = store.builtin("", "pods");
    let (ns, name) = ns_name(pod);
    let Ok(mut current) = store.get(&pods, &ns, &name) else {
        return;
    };
    if uid(&current) != uid(pod) {
        return;
    }
    let waiting = |c: &Value| {
        json!({"name": c["name"], "image": c["image"], "imageID": "", "ready": false, "started": false,
            "restartCount": 0, "state": {"waiting": {"reason": "ContainerCreating", "message": why}},
            "lastState": {}})
    };
    let list = |field: &str| -> Vec<Value> { pod["spec"][field].as_array().cloned().unwrap_or_default() };
    let previous = &current["status"];
    let since = previous["conditions"][0]["lastTransitionTime"]
        .as_str()
        .map(str::to_string)
        .unwrap_or_else(now_rfc3339);
    let condition = |kind: &str, value: bool| {
        json!({"type": kind, "status": if value { "True" } else { "False" }, "lastProbeTime": null,
            "lastTransitionTime": since})
    };
    current["status"] = json!({
        "phase": "Pending",
        "conditions": [condition("PodScheduled", true), condition("Initialized", false),
            condition("ContainersReady", false), condition("Ready", false)],
        "hostIP": "127.0.0.1",
        "hostIPs": [{"ip": "127.0.0.1"}],
        "qosClass": "BestEffort",
        "initContainerStatuses": list("initContainers").iter().map(waiting).collect::<Vec<_>>(),
        "containerStatuses": list("containers").iter().map(waiting).collect::<Vec<_>>(),
    });
    if let Some(m) = current["metadata"].as_object_mut() {
        m.remove("resourceVersion");
    }
    if let Err(e) = store.update(&pods, &ns, &name, current, Target::Status, false) {
        tracing::debug!(pod = %name, error = %e, "publishing a waiting pod's status");
    }
}

/// Waits until every claim of the pod can be mounted; `false` when the pod is stopped first.
async fn wait_for_volumes(
    shared: &Shared,
    pod: &Value,
    ns: &str,
    stop: &mut watch::Receiver<Option<Duration>>,
) -> bool {
    let store = &shared.config.store;
    let mut events = store.subscribe();
    loop {
        if stop.borrow().is_some() {
            return false;
        }
        let Some(why) = unmountable_claim(store, pod, ns) else {
            return true;
        };
        tracing::debug!(pod = name_of_pod(pod), %why, "waiting for volumes");
        publish_waiting_for_volumes(store, pod, &why);
        tokio::select! {
            _ = stopped(stop) => return false,
            _ = events.recv() => {
                while events.try_recv().is_ok() {}
            }
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
}

fn name_of_pod(pod: &Value) -> &str {
    pod["metadata"]["name"].as_str().unwrap_or_default()
}

async fn run_pod(shared: Arc<Shared>, pod: Value, mut stop: watch::Receiver<Option<Duration>>) {
    let (ns, name) = ns_name(&pod);
    if !wait_for_volumes(&shared, &pod, &ns, &mut stop).await {
        remove_if_deleting(&shared.config.store, &pod);
        tracing::info!(pod = %name, namespace = %ns, "pod stopped before its volumes were ready");
        return;
    }
    let ip = shared.addresses.address_of(&ns, &name);
    let root = shared.config.root.clone();
    let scratch = root.join("pods").join(&ns).join(uid(&pod));
    let volumes = match prepare_volumes(&shared, &pod, &ns, &scratch) {
        Ok(v) => v,
        Err(e) => {
            tracing::error!(pod = %name, error = %e, "preparing volumes");
            BTreeMap::new()
        }
    };
    let list = |field: &str| -> Vec<Value> { pod["spec"][field].as_array().cloned().unwrap_or_default() };
    let init_specs = list("initContainers");
    let specs = list("containers");
    let runtime = Arc::new(PodRuntime {
        shared: shared.clone(),
        ns: ns.clone(),
        name: name.clone(),
        ip,
        start_time: now_rfc3339(),
        init: Mutex::new(init_specs.iter().map(container_state).collect()),
        containers: Mutex::new(specs.iter().map(container_state).collect()),
        conditions: Mutex::new(BTreeMap::new()),
        volumes,
        scratch,
        pod,
    });
    tracing::info!(pod = %name, namespace = %ns, %ip, "starting pod");
    runtime.publish();
    let mut initialized = true;
    for (index, spec) in init_specs.iter().enumerate() {
        let outcome = run_container(runtime.clone(), spec.clone(), index, true, stop.clone()).await;
        if outcome != Outcome::Completed {
            initialized = false;
            break;
        }
    }
    if initialized && stop.borrow().is_none() {
        let tasks: Vec<_> = specs
            .iter()
            .enumerate()
            .map(|(i, spec)| tokio::spawn(run_container(runtime.clone(), spec.clone(), i, false, stop.clone())))
            .collect();
        for task in tasks {
            let _ = task.await;
        }
    }
    runtime.publish();
    if stop.borrow().is_none() {
        // Every container finished under restartPolicy Never/OnFailure: the pod stays, completed.
        stopped(&mut stop).await;
    }
    remove_if_deleting(&shared.config.store, &runtime.pod);
    tracing::info!(pod = %name, namespace = %ns, "pod stopped");
}

/// Removes the pod from the store once its processes are gone, if it is being deleted.
fn remove_if_deleting(store: &Store, pod: &Value) {
    let (ns, name) = ns_name(pod);
    let pods_res = store.builtin("", "pods");
    if let Ok(current) = store.get(&pods_res, &ns, &name) {
        if uid(&current) == uid(pod) && !current["metadata"]["deletionTimestamp"].is_null() {
            let force = DeleteOptions {
                grace_period_seconds: Some(0),
                ..Default::default()
            };
            let _ = store.delete(&pods_res, &ns, &name, &force, false);
        }
    }
}

fn prepare_volumes(shared: &Shared, pod: &Value, ns: &str, scratch: &Path) -> Result<BTreeMap<String, PathBuf>> {
    let store = &shared.config.store;
    let mut dirs = BTreeMap::new();
    std::fs::create_dir_all(scratch).map_err(|e| Error::io(format!("creating {}", scratch.display()), e))?;
    for volume in pod["spec"]["volumes"].as_array().into_iter().flatten() {
        let name = volume["name"].as_str().unwrap_or_default().to_string();
        let dir = if let Some(claim) = volume["persistentVolumeClaim"]["claimName"].as_str() {
            claim_path(store, ns, claim)?
        } else if let Some(path) = volume["hostPath"]["path"].as_str() {
            PathBuf::from(path)
        } else {
            scratch.join("volumes").join(&name)
        };
        std::fs::create_dir_all(&dir).map_err(|e| Error::io(format!("creating {}", dir.display()), e))?;
        let files = if let Some(cm) = volume["configMap"]["name"].as_str() {
            store
                .get(&store.builtin("", "configmaps"), ns, cm)
                .map(|o| {
                    o["data"]
                        .as_object()
                        .into_iter()
                        .flatten()
                        .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().as_bytes().to_vec()))
                        .collect::<Vec<_>>()
                })
                .unwrap_or_default()
        } else if let Some(secret) = volume["secret"]["secretName"].as_str() {
            store
                .get(&store.builtin("", "secrets"), ns, secret)
                .map(|o| secret_data(&o))
                .unwrap_or_default()
        } else {
            Vec::new()
        };
        for (file, bytes) in files {
            let path = dir.join(file);
            std::fs::write(&path, bytes).map_err(|e| Error::io(format!("writing {}", path.display()), e))?;
        }
        dirs.insert(name, dir);
    }
    Ok(dirs)
}

fn secret_data(secret: &Value) -> Vec<(String, Vec<u8>)> {
    let engine = base64::engine::general_purpose::STANDARD;
    let mut data: Vec<(String, Vec<u8>)> = secret["data"]
        .as_object()
        .into_iter()
        .flatten()
        .map(|(k, v)| {
            (
                k.clone(),
                engine.decode(v.as_str().unwrap_or_default()).unwrap_or_default(),
            )
        })
        .collect();
    data.extend(
        secret["stringData"]
            .as_object()
            .into_iter()
            .flatten()
            .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().as_bytes().to_vec())),
    );
    data
}

/// Expands `$(VAR)` references; `$$(VAR)` yields a literal `$(VAR)`; unknown variables stay as written.
pub fn expand(input: &str, env: &[(String, String)]) -> String {
    let mut out = String::with_capacity(input.len());
    let mut rest = input;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        if let Some(escaped) = after.strip_prefix('$') {
            out.push('$');
            rest = escaped;
        } else if let Some(body) = after.strip_prefix('(') {
            match body.find(')') {
                Some(end) => {
                    let var = &body[..end];
                    match env.iter().rev().find(|(k, _)| k == var) {
                        Some((_, value)) => out.push_str(value),
                        None => out.push_str(&format!("$({var})")),
                    }
                    rest = &body[end + 1..];
                }
                None => {
                    out.push('$');
                    rest = after;
                }
            }
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    out
}

/// Rewrites a value naming a path under a mount to the host directory behind it.
fn rewrite_mounts(value: &str, mounts: &[(String, PathBuf)]) -> String {
    let rewrite_path = |v: &str| -> Option<String> {
        mounts.iter().find_map(|(mount, host)| {
            let rest = v.strip_prefix(mount.as_str())?;
            (rest.is_empty() || rest.starts_with('/')).then(|| format!("{}{rest}", host.display()))
        })
    };
    if let Some(rewritten) = rewrite_path(value) {
        return rewritten;
    }
    if let Some((flag, v)) = value.split_once('=') {
        if let Some(rewritten) = rewrite_path(v) {
            return format!("{flag}={rewritten}");
        }
    }
    value.to_string()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    /// Exited successfully and is not to be restarted (init containers, restartPolicy Never/OnFailure).
    Completed,
    /// Failed for good (restartPolicy Never).
    Failed,
    /// The pod is being stopped.
    Stopped,
}

impl PodRuntime {
    fn field_ref(&self, path: &str) -> String {
        let m = &self.pod["metadata"];
        let keyed = |map: &Value, prefix: &str| {
            path.strip_prefix(prefix)
                .and_then(|r| r.strip_suffix("']"))
                .and_then(|k| map[k].as_str())
                .unwrap_or_default()
                .to_string()
        };
        match path {
            "metadata.name" => self.name.clone(),
            "metadata.namespace" => self.ns.clone(),
            "metadata.uid" => uid(&self.pod),
            "spec.nodeName" => NODE_NAME.to_string(),
            "spec.serviceAccountName" => self.pod["spec"]["serviceAccountName"]
                .as_str()
                .unwrap_or("default")
                .to_string(),
            "status.podIP" | "status.podIPs" => self.ip.to_string(),
            "status.hostIP" | "status.hostIPs" => "127.0.0.1".to_string(),
            p if p.starts_with("metadata.labels['") => keyed(&m["labels"], "metadata.labels['"),
            p if p.starts_with("metadata.annotations['") => keyed(&m["annotations"], "metadata.annotations['"),
            _ => String::new(),
        }
    }

    /// The kubeconfig carrying the token of the pod's service account, as a real kubelet mounts
    /// the account's token; none when the pod opts out with `automountServiceAccountToken: false`.
    fn service_account_kubeconfig(&self) -> Option<PathBuf> {
        if self.pod["spec"]["automountServiceAccountToken"] == Value::Bool(false) {
            return None;
        }
        let account = crate::rbac::ServiceAccount {
            namespace: self.ns.clone(),
            name: self.pod["spec"]["serviceAccountName"]
                .as_str()
                .unwrap_or("default")
                .to_string(),
        };
        let path = self
            .shared
            .config
            .root
            .join("serviceaccounts")
            .join(&account.namespace)
            .join(format!("{}.kubeconfig", account.name));
        match crate::kubeconfig::write_kubeconfig(&path, &self.shared.config.server, Some(&account.token())) {
            Ok(()) => Some(path),
            Err(error) => {
                tracing::warn!(%error, "writing the service account's kubeconfig");
                None
            }
        }
    }

    fn environment(&self, container: &Value, mapping: &ImageMapping) -> Vec<(String, String)> {
        let store = &self.shared.config.store;
        let mut env: Vec<(String, String)> = vec![
            (
                "PATH".into(),
                std::env::var("PATH").unwrap_or_else(|_| "/usr/local/bin:/usr/bin:/bin".into()),
            ),
            ("HOME".into(), self.scratch.display().to_string()),
            ("HOSTNAME".into(), self.name.clone()),
        ];
        if let Some(kubeconfig) = self.service_account_kubeconfig() {
            env.push(("KUBECONFIG".into(), kubeconfig.display().to_string()));
        }
        for passthrough in ["RUST_LOG", "RUST_BACKTRACE"] {
            if let Ok(v) = std::env::var(passthrough) {
                env.push((passthrough.into(), v));
            }
        }
        env.extend(mapping.env.iter().cloned());
        let read_object = |plural: &str, name: &str| store.get(&store.builtin("", plural), &self.ns, name).ok();
        for source in container["envFrom"].as_array().into_iter().flatten() {
            let prefix = source["prefix"].as_str().unwrap_or_default();
            if let Some(cm) = source["configMapRef"]["name"]
                .as_str()
                .and_then(|n| read_object("configmaps", n))
            {
                for (k, v) in cm["data"].as_object().into_iter().flatten() {
                    env.push((format!("{prefix}{k}"), v.as_str().unwrap_or_default().to_string()));
                }
            }
            if let Some(secret) = source["secretRef"]["name"]
                .as_str()
                .and_then(|n| read_object("secrets", n))
            {
                for (k, v) in secret_data(&secret) {
                    env.push((format!("{prefix}{k}"), String::from_utf8_lossy(&v).into_owned()));
                }
            }
        }
        for var in container["env"].as_array().into_iter().flatten() {
            let name = var["name"].as_str().unwrap_or_default().to_string();
            let from = &var["valueFrom"];
            let value = if let Some(v) = var["value"].as_str() {
                expand(v, &env)
            } else if let Some(path) = from["fieldRef"]["fieldPath"].as_str() {
                self.field_ref(path)
            } else if let Some(key) = from["configMapKeyRef"]["key"].as_str() {
                from["configMapKeyRef"]["name"]
                    .as_str()
                    .and_then(|n| read_object("configmaps", n))
                    .and_then(|cm| cm["data"][key].as_str().map(str::to_string))
                    .unwrap_or_default()
            } else if let Some(key) = from["secretKeyRef"]["key"].as_str() {
                from["secretKeyRef"]["name"]
                    .as_str()
                    .and_then(|n| read_object("secrets", n))
                    .and_then(|s| secret_data(&s).into_iter().find(|(k, _)| k == key))
                    .map(|(_, v)| String::from_utf8_lossy(&v).into_owned())
                    .unwrap_or_default()
            } else {
                String::new()
            };
            env.push((name, value));
        }
        env
    }

    fn mounts(&self, container: &Value) -> Vec<(String, PathBuf)> {
        let mut mounts: Vec<(String, PathBuf)> = container["volumeMounts"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|m| {
                let dir = self.volumes.get(m["name"].as_str()?)?;
                let dir = match m["subPath"].as_str().filter(|s| !s.is_empty()) {
                    Some(sub) => dir.join(sub),
                    None => dir.clone(),
                };
                let _ = std::fs::create_dir_all(&dir);
                Some((m["mountPath"].as_str()?.trim_end_matches('/').to_string(), dir))
            })
            .collect();
        let path = termination_message_path(container);
        mounts.push((path, self.termination_log(container)));
        mounts.sort_by_key(|(m, _)| std::cmp::Reverse(m.len()));
        mounts
    }

    /// The host file behind a container's `terminationMessagePath`.
    fn termination_log(&self, container: &Value) -> PathBuf {
        let name = container["name"].as_str().unwrap_or_default();
        self.scratch.join("termination").join(name)
    }

    /// Empties the container's termination message file before a start, as a real kubelet
    /// gives every container instance a fresh one.
    fn reset_termination_log(&self, container: &Value) {
        let path = self.termination_log(container);
        if let Some(dir) = path.parent() {
            let _ = std::fs::create_dir_all(dir);
        }
        if let Err(e) = std::fs::write(&path, b"") {
            tracing::warn!(pod = %self.name, error = %e, "resetting the termination message file");
        }
    }

    /// The termination message of a container instance that ended with `exit_code`: what it
    /// wrote to its `terminationMessagePath` (at most 4096 bytes), or with
    /// `terminationMessagePolicy: FallbackToLogsOnError` and a failure, the last 80 lines (at
    /// most 2048 bytes) of its log.
    fn termination_message(&self, container: &Value, exit_code: Option<i32>) -> Option<String> {
        let mut written = std::fs::read(self.termination_log(container)).unwrap_or_default();
        written.truncate(4096);
        if !written.is_empty() {
            return Some(String::from_utf8_lossy(&written).into_owned());
        }
        if container["terminationMessagePolicy"] != "FallbackToLogsOnError" || exit_code == Some(0) {
            return None;
        }
        let name = container["name"].as_str().unwrap_or_default();
        let log = std::fs::read(log_path(&self.shared.config.root, &self.ns, &self.name, name)).ok()?;
        let text = String::from_utf8_lossy(&log);
        let lines: Vec<&str> = text.lines().collect();
        let mut tail = lines[lines.len().saturating_sub(80)..].join("\n");
        if tail.len() > 2048 {
            let mut cut = tail.len() - 2048;
            while !tail.is_char_boundary(cut) {
                cut += 1;
            }
            tail = tail[cut..].to_string();
        }
        (!tail.is_empty()).then_some(tail)
    }

    fn spawn_process(&self, container: &Value) -> Result<tokio::process::Child> {
        let image = container["image"].as_str().unwrap_or_default();
        let mapping = self
            .shared
            .config
            .images
            .resolve(image)
            .ok_or_else(|| Error::UnmappedImage(image.to_string()))?;
        let env = self.environment(container, mapping);
        let mounts = self.mounts(container);
        let strings = |v: &Value| -> Option<Vec<String>> {
            v.as_array()
                .map(|a| a.iter().map(|s| s.as_str().unwrap_or_default().to_string()).collect())
        };
        let (program, mut args) = match strings(&container["command"]).filter(|c| !c.is_empty()) {
            Some(command) => (
                mapping.resolve_command(&expand(&command[0], &env)),
                command[1..]
                    .iter()
                    .cloned()
                    .chain(strings(&container["args"]).unwrap_or_default())
                    .collect::<Vec<_>>(),
            ),
            None => (
                mapping.program.clone(),
                mapping
                    .entrypoint_args
                    .iter()
                    .cloned()
                    .chain(strings(&container["args"]).unwrap_or_else(|| mapping.default_args.clone()))
                    .collect(),
            ),
        };
        for arg in &mut args {
            *arg = rewrite_mounts(&expand(arg, &env), &mounts);
        }
        let env: Vec<(String, String)> = env.into_iter().map(|(k, v)| (k, rewrite_mounts(&v, &mounts))).collect();
        let workdir = container["workingDir"]
            .as_str()
            .map(|w| PathBuf::from(rewrite_mounts(w, &mounts)))
            .unwrap_or_else(|| self.scratch.clone());
        let name = container["name"].as_str().unwrap_or_default();
        let log = log_path(&self.shared.config.root, &self.ns, &self.name, name);
        if let Some(dir) = log.parent() {
            std::fs::create_dir_all(dir).map_err(|e| Error::io(format!("creating {}", dir.display()), e))?;
        }
        let stdout = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .map_err(|e| Error::io(format!("opening {}", log.display()), e))?;
        let stderr = stdout
            .try_clone()
            .map_err(|e| Error::io("duplicating the log file", e))?;
        tracing::info!(pod = %self.name, container = name, program = %program.display(), ?args, "starting container");
        let mut command = tokio::process::Command::new(&program);
        command
            .args(&args)
            .env_clear()
            .envs(env)
            .current_dir(&workdir)
            .stdin(Stdio::null())
            .stdout(Stdio::from(stdout))
            .stderr(Stdio::from(stderr))
            .process_group(0)
            .kill_on_drop(true);
        command
            .spawn()
            .map_err(|e| Error::io(format!("starting {} for pod {}", program.display(), self.name), e))
    }

    fn update_container(&self, init: bool, index: usize, change: impl FnOnce(&mut ContainerState)) {
        {
            let mut states = if init { self.init.lock() } else { self.containers.lock() };
            if let Some(state) = states.get_mut(index) {
                change(state);
            }
        }
        self.publish();
    }

    /// Writes the pod status from the containers' states; unchanged status writes are no-ops.
    fn publish(&self) {
        let init = self.init.lock().clone();
        let containers = self.containers.lock().clone();
        let render = |c: &ContainerState| {
            let mut status = json!({"name": c.name, "image": c.image, "imageID": "", "ready": c.ready,
                "started": c.started, "restartCount": c.restart_count, "state": c.state,
                "lastState": c.last_state});
            if let Some(pid) = c.pid {
                status["containerID"] = json!(format!("sim://{pid}"));
            }
            status
        };
        let initialized = init
            .iter()
            .all(|c| c.state.get("terminated").is_some_and(|t| t["exitCode"] == json!(0)));
        let all_ready = !containers.is_empty() && containers.iter().all(|c| c.ready);
        let terminated: Vec<i64> = containers
            .iter()
            .filter_map(|c| c.state["terminated"]["exitCode"].as_i64())
            .collect();
        let phase = if terminated.len() == containers.len() && !containers.is_empty() {
            if terminated.iter().all(|c| *c == 0) {
                "Succeeded"
            } else {
                "Failed"
            }
        } else if initialized
            && containers
                .iter()
                .any(|c| c.state.get("running").is_some() || c.restart_count > 0)
        {
            "Running"
        } else {
            "Pending"
        };
        let condition = |kind: &'static str, value: bool| {
            let mut conditions = self.conditions.lock();
            let entry = conditions.entry(kind).or_insert_with(|| (value, now_rfc3339()));
            if entry.0 != value {
                *entry = (value, now_rfc3339());
            }
            json!({"type": kind, "status": if value { "True" } else { "False" },
                   "lastProbeTime": null, "lastTransitionTime": entry.1})
        };
        let status = json!({
            "phase": phase,
            "conditions": [
                condition("PodScheduled", true),
                condition("Initialized", initialized),
                condition("ContainersReady", all_ready),
                condition("Ready", all_ready),
            ],
            "hostIP": "127.0.0.1",
            "hostIPs": [{"ip": "127.0.0.1"}],
            "podIP": self.ip.to_string(),
            "podIPs": [{"ip": self.ip.to_string()}],
            "startTime": self.start_time,
            "qosClass": "BestEffort",
            "initContainerStatuses": init.iter().map(render).collect::<Vec<_>>(),
            "containerStatuses": containers.iter().map(render).collect::<Vec<_>>(),
        });
        let store = &self.shared.config.store;
        let pods = store.builtin("", "pods");
        let Ok(mut current) = store.get(&pods, &self.ns, &self.name) else {
            return;
        };
        if uid(&current) != uid(&self.pod) {
            return;
        }
        current["status"] = status;
        if let Some(m) = current["metadata"].as_object_mut() {
            m.remove("resourceVersion");
        }
        if let Err(e) = store.update(&pods, &self.ns, &self.name, current, Target::Status, false) {
            tracing::debug!(pod = %self.name, error = %e, "publishing pod status");
        }
    }
}

/// One configured probe and its running counts.
struct Probe {
    spec: Value,
    next_at: Instant,
    successes: u64,
    failures: u64,
}

impl Probe {
    fn new(spec: &Value, started: Instant) -> Option<Self> {
        if !spec.is_object() {
            return None;
        }
        let delay = spec["initialDelaySeconds"].as_u64().unwrap_or(0);
        Some(Probe {
            spec: spec.clone(),
            next_at: started + Duration::from_secs(delay),
            successes: 0,
            failures: 0,
        })
    }

    fn period(&self) -> Duration {
        Duration::from_secs(self.spec["periodSeconds"].as_u64().unwrap_or(10).max(1))
    }

    fn threshold(&self, field: &str, default: u64) -> u64 {
        self.spec[field].as_u64().unwrap_or(default).max(1)
    }

    /// Records a result; returns `Some(true)` once the success threshold is reached, `Some(false)`
    /// once the failure threshold is, `None` while undecided.
    fn record(&mut self, success: bool) -> Option<bool> {
        self.next_at = Instant::now() + self.period();
        if success {
            self.failures = 0;
            self.successes += 1;
            (self.successes >= self.threshold("successThreshold", 1)).then_some(true)
        } else {
            self.successes = 0;
            self.failures += 1;
            (self.failures >= self.threshold("failureThreshold", 3)).then_some(false)
        }
    }
}

async fn check(
    probe: &Value,
    ip: Ipv4Addr,
    container: &Value,
    runtime: &PodRuntime,
    mapping_env: &[(String, String)],
) -> bool {
    let timeout = Duration::from_secs(probe["timeoutSeconds"].as_u64().unwrap_or(1).max(1));
    let port_of = |port: &Value| -> Option<u16> {
        match port {
            Value::Number(n) => n.as_u64().map(|p| p as u16),
            Value::String(name) => container["ports"]
                .as_array()?
                .iter()
                .find(|p| p["name"].as_str() == Some(name))
                .and_then(|p| p["containerPort"].as_u64())
                .map(|p| p as u16)
                .or_else(|| name.parse().ok()),
            _ => None,
        }
    };
    let attempt = async {
        if let Some(http) = probe.get("httpGet") {
            let host = http["host"]
                .as_str()
                .map(str::to_string)
                .unwrap_or_else(|| ip.to_string());
            let port = port_of(&http["port"])?;
            let path = http["path"].as_str().unwrap_or("/");
            let mut stream = tokio::net::TcpStream::connect((host.as_str(), port)).await.ok()?;
            let request = format!("GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUser-Agent: kube-probe/1.32\r\nAccept: */*\r\nConnection: close\r\n\r\n");
            stream.write_all(request.as_bytes()).await.ok()?;
            let mut buffer = [0u8; 64];
            let mut read = 0;
            while read < 12 {
                let n = stream.read(&mut buffer[read..]).await.ok()?;
                if n == 0 {
                    break;
                }
                read += n;
            }
            let line = String::from_utf8_lossy(&buffer[..read]).to_string();
            let code: u16 = line.split_whitespace().nth(1)?.parse().ok()?;
            Some((200..400).contains(&code))
        } else if let Some(tcp) = probe.get("tcpSocket").or_else(|| probe.get("grpc")) {
            let host = tcp["host"]
                .as_str()
                .map(str::to_string)
                .unwrap_or_else(|| ip.to_string());
            let port = port_of(&tcp["port"])?;
            Some(tokio::net::TcpStream::connect((host.as_str(), port)).await.is_ok())
        } else if let Some(exec) = probe.get("exec") {
            let command: Vec<String> = exec["command"]
                .as_array()?
                .iter()
                .map(|s| expand(s.as_str().unwrap_or_default(), mapping_env))
                .collect();
            let (program, args) = command.split_first()?;
            let status = tokio::process::Command::new(program)
                .args(args)
                .env_clear()
                .envs(mapping_env.iter().cloned())
                .current_dir(&runtime.scratch)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .kill_on_drop(true)
                .status()
                .await
                .ok()?;
            Some(status.success())
        } else {
            Some(true)
        }
    };
    matches!(tokio::time::timeout(timeout, attempt).await, Ok(Some(true)))
}

/// Resolves once the pod is asked to stop (or the kubelet is gone).
async fn stopped(stop: &mut watch::Receiver<Option<Duration>>) {
    let _ = stop.wait_for(|s| s.is_some()).await;
}

/// Stops a process group: SIGTERM, then SIGKILL once `grace` has passed.
async fn terminate(child: &mut tokio::process::Child, grace: Duration) -> Option<i32> {
    if let Some(pid) = child.id() {
        let group = Pid::from_raw(pid as i32);
        let _ = killpg(group, Signal::SIGTERM);
        if let Ok(Ok(status)) = tokio::time::timeout(grace, child.wait()).await {
            let _ = killpg(group, Signal::SIGKILL);
            return status.code().or(Some(143));
        }
        let _ = killpg(group, Signal::SIGKILL);
    }
    child.wait().await.ok().map(|s| s.code().unwrap_or(137))
}

async fn run_container(
    runtime: Arc<PodRuntime>,
    container: Value,
    index: usize,
    init: bool,
    mut stop: watch::Receiver<Option<Duration>>,
) -> Outcome {
    let restart_policy = runtime.pod["spec"]["restartPolicy"]
        .as_str()
        .unwrap_or("Always")
        .to_string();
    let termination_grace = Duration::from_secs(
        runtime.pod["spec"]["terminationGracePeriodSeconds"]
            .as_u64()
            .unwrap_or(30),
    );
    let mut backoff = CRASH_BACKOFF_START;
    loop {
        if stop.borrow().is_some() {
            return Outcome::Stopped;
        }
        let mapping_env = runtime
            .shared
            .config
            .images
            .resolve(container["image"].as_str().unwrap_or_default())
            .map(|m| runtime.environment(&container, m))
            .unwrap_or_default();
        runtime.reset_termination_log(&container);
        let (exit_code, reason) = match runtime.spawn_process(&container) {
            Err(e) => {
                tracing::warn!(pod = %runtime.name, error = %e, "container failed to start");
                let reason = if matches!(e, Error::UnmappedImage(_)) {
                    "ErrImagePull"
                } else {
                    "RunContainerError"
                };
                runtime.update_container(init, index, |s| {
                    s.state = json!({"waiting": {"reason": reason, "message": e.to_string()}});
                });
                (None, reason)
            }
            Ok(mut child) => {
                let started_at = now_rfc3339();
                let pid = child.id();
                let started = Instant::now();
                let mut startup = Probe::new(&container["startupProbe"], started);
                let mut readiness = Probe::new(&container["readinessProbe"], started);
                let mut liveness = Probe::new(&container["livenessProbe"], started);
                let has_startup = startup.is_some();
                let has_readiness = readiness.is_some();
                runtime.update_container(init, index, |s| {
                    s.state = json!({"running": {"startedAt": started_at}});
                    s.pid = pid;
                    s.started = !has_startup;
                    s.ready = !init && !has_startup && !has_readiness;
                });
                let mut stop_requested = stop.clone();
                let mut started_ok = !has_startup;
                let mut ready = !has_startup && !has_readiness;
                let outcome = loop {
                    let due = [&startup, &readiness, &liveness]
                        .into_iter()
                        .flatten()
                        .map(|p| p.next_at)
                        .min()
                        .unwrap_or_else(|| Instant::now() + Duration::from_secs(3600));
                    tokio::select! {
                        status = child.wait() => {
                            break (status.ok().and_then(|s| s.code()).or(Some(1)), "Error");
                        }
                        _ = stopped(&mut stop_requested) => {
                            let grace = stop.borrow().unwrap_or(termination_grace);
                            let code = terminate(&mut child, grace).await;
                            runtime.update_container(init, index, |s| {
                                s.ready = false;
                                let code = code.unwrap_or(137);
                                s.state = json!({"terminated": {"exitCode": code,
                                    "reason": if code == 0 { "Completed" } else { "Error" },
                                    "startedAt": started_at, "finishedAt": now_rfc3339()}});
                            });
                            return Outcome::Stopped;
                        }
                        _ = tokio::time::sleep_until(due), if !init => {
                            let now = Instant::now();
                            if !started_ok {
                                if let Some(p) = startup.as_mut().filter(|p| p.next_at <= now) {
                                    let ok = check(&p.spec, runtime.ip, &container, &runtime, &mapping_env).await;
                                    match p.record(ok) {
                                        Some(true) => {
                                            started_ok = true;
                                            startup = None;
                                            let now = Instant::now();
                                            if let Some(r) = readiness.as_mut() { r.next_at = r.next_at.max(now); }
                                            if let Some(l) = liveness.as_mut() { l.next_at = l.next_at.max(now); }
                                            if !has_readiness { ready = true; }
                                            runtime.update_container(init, index, |s| { s.started = true; s.ready = ready; });
                                        }
                                        Some(false) => {
                                            let code = terminate(&mut child, termination_grace).await;
                                            break (code, "StartupProbeFailed");
                                        }
                                        None => {}
                                    }
                                }
                                continue;
                            }
                            if let Some(p) = readiness.as_mut().filter(|p| p.next_at <= now) {
                                let ok = check(&p.spec, runtime.ip, &container, &runtime, &mapping_env).await;
                                if let Some(decided) = p.record(ok) {
                                    if decided != ready {
                                        ready = decided;
                                        tracing::info!(pod = %runtime.name, ready, "readiness changed");
                                        runtime.update_container(init, index, |s| s.ready = ready);
                                    }
                                }
                            }
                            if let Some(p) = liveness.as_mut().filter(|p| p.next_at <= now) {
                                let ok = check(&p.spec, runtime.ip, &container, &runtime, &mapping_env).await;
                                if p.record(ok) == Some(false) {
                                    tracing::info!(pod = %runtime.name, "liveness probe failed; restarting container");
                                    let code = terminate(&mut child, termination_grace).await;
                                    break (code, "LivenessProbeFailed");
                                }
                            }
                        }
                    }
                };
                let (code, reason) = outcome;
                let mut finished = json!({"terminated": {"exitCode": code.unwrap_or(1),
                    "reason": if code == Some(0) { "Completed" } else { reason },
                    "startedAt": started_at, "finishedAt": now_rfc3339()}});
                if let Some(message) = runtime.termination_message(&container, code) {
                    finished["terminated"]["message"] = json!(message);
                }
                runtime.update_container(init, index, |s| {
                    s.ready = false;
                    s.pid = None;
                    s.state = finished.clone();
                });
                if started.elapsed() > CRASH_BACKOFF_RESET {
                    backoff = CRASH_BACKOFF_START;
                }
                (code, reason)
            }
        };
        let succeeded = exit_code == Some(0);
        let restart = match (init, restart_policy.as_str()) {
            (true, _) => !succeeded && restart_policy != "Never",
            (false, "Never") => false,
            (false, "OnFailure") => !succeeded,
            _ => true,
        };
        if !restart {
            return if succeeded { Outcome::Completed } else { Outcome::Failed };
        }
        runtime.update_container(init, index, |s| {
            if s.state.get("terminated").is_some() {
                s.last_state = s.state.clone();
            }
            s.restart_count += 1;
            s.state = json!({"waiting": {"reason": if exit_code.is_some() { "CrashLoopBackOff" } else { reason },
                "message": format!("back-off {}s restarting failed container", backoff.as_secs())}});
        });
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = stopped(&mut stop) => return Outcome::Stopped,
        }
        backoff = (backoff * 2).min(CRASH_BACKOFF_MAX);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expands_variables_like_kubernetes() {
        let env = vec![("POD_IP".to_string(), "127.1.0.1".to_string())];
        assert_eq!(expand("--addr=$(POD_IP):8080", &env), "--addr=127.1.0.1:8080");
        assert_eq!(expand("$$(POD_IP) $(MISSING)", &env), "$(POD_IP) $(MISSING)");
    }

    #[test]
    fn rewrites_paths_under_mounts() {
        let mounts = vec![("/var/lib/raftkv".to_string(), PathBuf::from("/tmp/pvc/data-0"))];
        assert_eq!(rewrite_mounts("/var/lib/raftkv", &mounts), "/tmp/pvc/data-0");
        assert_eq!(rewrite_mounts("/var/lib/raftkv/wal", &mounts), "/tmp/pvc/data-0/wal");
        assert_eq!(
            rewrite_mounts("--data-dir=/var/lib/raftkv", &mounts),
            "--data-dir=/tmp/pvc/data-0"
        );
        assert_eq!(rewrite_mounts("/var/lib/raftkvx", &mounts), "/var/lib/raftkvx");
    }

    #[test]
    fn image_patterns_prefer_exact_then_longest_prefix() {
        let mut table = ImageTable::default();
        table.insert("raftkv/*", ImageMapping::new("/bin/any"));
        table.insert("raftkv/node:*", ImageMapping::new("/bin/node"));
        table.insert("raftkv/node:dev", ImageMapping::new("/bin/dev"));
        assert_eq!(
            table.resolve("raftkv/node:1.0").unwrap().program,
            PathBuf::from("/bin/node")
        );
        assert_eq!(
            table.resolve("raftkv/node:dev").unwrap().program,
            PathBuf::from("/bin/dev")
        );
        assert_eq!(
            table.resolve("raftkv/operator:1").unwrap().program,
            PathBuf::from("/bin/any")
        );
        assert!(table.resolve("nginx").is_none());
    }

    #[test]
    fn commands_naming_the_entrypoint_map_to_the_host_binary() {
        let mapping = ImageMapping::new("/build/raftkv-node").binary("/usr/local/bin/helper", "/build/helper");
        assert_eq!(
            mapping.resolve_command("/usr/bin/raftkv-node"),
            PathBuf::from("/build/raftkv-node")
        );
        assert_eq!(
            mapping.resolve_command("/usr/local/bin/helper"),
            PathBuf::from("/build/helper")
        );
        assert_eq!(mapping.resolve_command("python3"), PathBuf::from("python3"));
    }
}
