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
//!
//! # Files
//! - `images`: [`ImageMapping`] and [`ImageTable`], and how `command`/`args` pick the program.
//! - `environment`: environment variables, the downward API, `$(VAR)` expansion, the service
//!   account's kubeconfig.
//! - `mounts`: volume directories, mount path substitution, termination-message files.
//! - `probes`: startup, readiness and liveness checks.
//! - `status`: container states and the pod status written to the store.
//! - `lifecycle`: the pod worker, container run loop, restarts and back-off, termination.
//!
//! This file holds the kubelet loop that binds pods and starts and stops one worker per pod,
//! and the state those workers share.

mod environment;
mod images;
mod lifecycle;
mod mounts;
mod probes;
mod status;

use std::collections::{BTreeMap, HashMap};
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use serde_json::{json, Value};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub use crate::logs::log_path;
use crate::patch::PatchType;
use crate::store::{self, DeleteOptions, Store, Target};
pub use crate::wellknown::NODE_NAME;
pub use environment::expand;
pub use images::{ImageMapping, ImageTable};
pub use mounts::claim_path;
use status::ContainerState;

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
    /// The second octet of every address (127.X.a.b), distinct per cluster.
    octet: u8,
    /// The address given to each (namespace, pod name), kept for the life of the cluster.
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

/// What every pod worker of one kubelet shares.
struct Shared {
    /// The store, images, root directory and server URL the kubelet was started with.
    config: KubeletConfig,
    /// Pod addresses, shared by every pod worker.
    addresses: Addresses,
}

/// The kubelet's handle on one pod's worker.
struct Worker {
    /// Grace period to stop with; `Some` asks the worker to stop its containers.
    stop: watch::Sender<Option<Duration>>,
    /// The worker running the pod; finished once its processes are gone.
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
                        let task = tokio::spawn(lifecycle::run_pod(shared.clone(), pod.clone(), stop_rx));
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

/// The pod as the worker sees it: identity, address, and its containers' states.
struct PodRuntime {
    /// The kubelet's configuration and address allocator.
    shared: Arc<Shared>,
    /// The pod object as the worker was started with it.
    pod: Value,
    /// The pod's namespace.
    ns: String,
    /// The pod's name.
    name: String,
    /// The pod's loopback address, published as `status.podIP`.
    ip: Ipv4Addr,
    /// When the worker started the pod, published as `status.startTime`.
    start_time: String,
    /// The states of the init containers, in spec order.
    init: Mutex<Vec<ContainerState>>,
    /// The states of the containers, in spec order.
    containers: Mutex<Vec<ContainerState>>,
    /// (Initialized, ContainersReady) last published, with their transition times.
    conditions: Mutex<BTreeMap<&'static str, (bool, String)>>,
    /// Host directory of each volume by name.
    volumes: BTreeMap<String, PathBuf>,
    /// The pod's own directory: `HOME`, default working directory, `emptyDir` volumes and termination-message files.
    scratch: PathBuf,
}
