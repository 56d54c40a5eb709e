//! [`SimCluster`]: the simulated control plane as one value a test starts and stops.
//!
//! Starting a cluster binds the API server on a loopback port, writes a kubeconfig pointing at
//! it, and starts the workload controllers and the kubelet. Dropping the cluster cancels
//! everything (pod processes are killed when their tasks are dropped); [`SimCluster::shutdown`]
//! stops pods gracefully and waits for every task.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::apiserver::{self, ApiServer};
use crate::error::{Error, Result};
use crate::kubeconfig::write_kubeconfig;
use crate::kubelet::{self, ImageMapping, ImageTable, KubeletConfig};
use crate::selector::LabelSelector;
use crate::store::{self, Store};
use crate::{controllers, jsonpath, logs};

/// Configures a [`SimCluster`] before it starts.
#[derive(Debug, Default)]
pub struct SimClusterBuilder {
    /// How the kubelet runs each image.
    images: ImageTable,
    /// The directory for volumes, logs and pods; a temporary one when unset.
    root: Option<PathBuf>,
    /// Where to write the administrator's kubeconfig; inside the root when unset.
    kubeconfig: Option<PathBuf>,
    /// The API server's loopback port; 0 picks a free one.
    port: u16,
    /// How many watch events the store keeps; 10,000 when unset.
    watch_history: Option<usize>,
    /// The second octet of pod addresses; one no other cluster in this process uses when unset.
    ip_octet: Option<u8>,
}

impl SimClusterBuilder {
    /// Runs containers whose image matches `pattern` (exact, or a prefix ending in `*`) with `mapping`.
    pub fn image(mut self, pattern: impl Into<String>, mapping: ImageMapping) -> Self {
        self.images.insert(pattern, mapping);
        self
    }

    /// Keeps volumes, logs and the kubeconfig under `root` instead of a temporary directory
    /// that is removed with the cluster.
    pub fn root_dir(mut self, root: impl Into<PathBuf>) -> Self {
        self.root = Some(root.into());
        self
    }

    /// Writes the kubeconfig to `path` (default: `<root>/kubeconfig`).
    pub fn kubeconfig_path(mut self, path: impl Into<PathBuf>) -> Self {
        self.kubeconfig = Some(path.into());
        self
    }

    /// Listens on this port of 127.0.0.1 (default 0: any free port).
    pub fn port(mut self, port: u16) -> Self {
        self.port = port;
        self
    }

    /// Keeps this many watch events; older resourceVersions answer `410 Gone` (default 10 000).
    pub fn watch_history(mut self, events: usize) -> Self {
        self.watch_history = Some(events);
        self
    }

    /// Pods get addresses 127.`octet`.x.y (default: picked per cluster to avoid clashes).
    pub fn pod_ip_octet(mut self, octet: u8) -> Self {
        self.ip_octet = Some(octet);
        self
    }

    /// Starts the API server, controllers and kubelet.
    pub async fn start(self) -> Result<SimCluster> {
        let (root, tempdir) = match self.root {
            Some(root) => (root, None),
            None => {
                let dir = tempfile::Builder::new()
                    .prefix("raftkv-sim-")
                    .tempdir()
                    .map_err(|e| Error::io("creating the cluster's temporary directory", e))?;
                (dir.path().to_path_buf(), Some(dir))
            }
        };
        std::fs::create_dir_all(&root).map_err(|e| Error::io(format!("creating {}", root.display()), e))?;
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", self.port))
            .await
            .map_err(|e| Error::io("binding the API server", e))?;
        let address = listener
            .local_addr()
            .map_err(|e| Error::io("reading the bound address", e))?;
        let kubeconfig = self.kubeconfig.unwrap_or_else(|| root.join("kubeconfig"));
        write_kubeconfig(&kubeconfig, &format!("http://{address}"), None)?;
        let store = Store::new(self.watch_history.unwrap_or(10_000));
        let shutdown = CancellationToken::new();
        let server = Arc::new(ApiServer {
            store: store.clone(),
            log_root: root.clone(),
            address,
            shutdown: shutdown.clone(),
        });
        let serve_task = tokio::spawn(async move {
            if let Err(e) = apiserver::serve(listener, server).await {
                tracing::error!(error = %e, "API server stopped");
            }
        });
        let controllers_task = controllers::spawn(store.clone(), root.clone(), shutdown.clone());
        let kubelet_task = kubelet::spawn(
            KubeletConfig {
                store: store.clone(),
                images: self.images,
                root: root.clone(),
                server: format!("http://{address}"),
                ip_octet: self.ip_octet.unwrap_or_else(kubelet::next_ip_octet),
            },
            shutdown.clone(),
        );
        tracing::info!(%address, root = %root.display(), "simulated cluster started");
        Ok(SimCluster {
            address,
            store,
            root,
            kubeconfig,
            shutdown,
            tasks: vec![kubelet_task, controllers_task, serve_task],
            _tempdir: tempdir,
        })
    }
}

/// A running simulated cluster.
pub struct SimCluster {
    /// Where the API server listens.
    address: SocketAddr,
    /// The cluster's objects.
    store: Arc<Store>,
    /// The directory holding volumes, logs and pods' scratch directories.
    root: PathBuf,
    /// The administrator's kubeconfig, for kubectl and kube-rs clients.
    kubeconfig: PathBuf,
    /// Stops the API server, controllers and kubelet.
    shutdown: CancellationToken,
    /// The kubelet, controllers and API server tasks, awaited on shutdown.
    tasks: Vec<JoinHandle<()>>,
    /// Removes the root directory on drop when the cluster created it.
    _tempdir: Option<tempfile::TempDir>,
}

/// One ready endpoint of a Service: a pod selected by it, with its address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceEndpoint {
    /// The pod's name.
    pub pod: String,
    /// The pod's address.
    pub ip: IpAddr,
    /// Service port name (or number, when unnamed) to the pod's target port.
    pub ports: BTreeMap<String, u16>,
}

impl ServiceEndpoint {
    /// The socket address serving the Service port `port` (its name, or its number as text).
    pub fn socket_addr(&self, port: &str) -> Option<SocketAddr> {
        self.ports.get(port).map(|p| SocketAddr::new(self.ip, *p))
    }
}

impl SimCluster {
    /// A builder, to map images or choose directories.
    pub fn builder() -> SimClusterBuilder {
        SimClusterBuilder::default()
    }

    /// The API server's URL, `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.address)
    }

    /// The API server's socket address.
    pub fn address(&self) -> SocketAddr {
        self.address
    }

    /// The kubeconfig pointing at this cluster.
    pub fn kubeconfig(&self) -> &Path {
        &self.kubeconfig
    }

    /// The directory holding volumes, logs and pod scratch space.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The object store, for direct inspection.
    pub fn store(&self) -> &Arc<Store> {
        &self.store
    }

    /// A `kubectl` command aimed at this cluster, with a private discovery cache.
    pub fn kubectl(&self) -> std::process::Command {
        let mut command = std::process::Command::new("kubectl");
        command
            .env("KUBECONFIG", &self.kubeconfig)
            .arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .arg("--cache-dir")
            .arg(self.root.join("kubectl-cache"));
        command
    }

    /// Runs kubectl against this cluster; returns its stdout, or [`Error::Kubectl`] with its stderr.
    pub async fn kubectl_output<S: AsRef<std::ffi::OsStr>>(&self, args: &[S]) -> Result<String> {
        let mut command = tokio::process::Command::from(self.kubectl());
        command.args(args).kill_on_drop(true);
        let output = command.output().await.map_err(|e| Error::io("running kubectl", e))?;
        if !output.status.success() {
            return Err(Error::Kubectl {
                args: args
                    .iter()
                    .map(|a| a.as_ref().to_string_lossy().into_owned())
                    .collect::<Vec<_>>()
                    .join(" "),
                status: output.status.to_string(),
                stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
            });
        }
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    }

    /// A kube-rs client for this cluster (default namespace `default`).
    pub async fn kube_client(&self) -> Result<kube::Client> {
        let url = self.url().parse().map_err(|e| Error::Kube(format!("{e}")))?;
        let config = kube::Config::new(url);
        kube::Client::try_from(config).map_err(|e| Error::Kube(e.to_string()))
    }

    /// The path of a container's log file.
    pub fn pod_log_path(&self, namespace: &str, pod: &str, container: &str) -> PathBuf {
        logs::log_path(&self.root, namespace, pod, container)
    }

    /// Everything a pod's containers wrote (all containers, all restarts), headed by container name.
    pub fn pod_logs(&self, namespace: &str, pod: &str) -> String {
        let dir = logs::log_path(&self.root, namespace, pod, "x");
        let Some(dir) = dir.parent() else {
            return String::new();
        };
        let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
            .map(|d| d.filter_map(|e| e.ok().map(|e| e.path())).collect())
            .unwrap_or_default();
        entries.sort();
        entries
            .iter()
            .map(|path| {
                let container = path
                    .file_stem()
                    .map(|s| s.to_string_lossy().into_owned())
                    .unwrap_or_default();
                let text = std::fs::read_to_string(path).unwrap_or_default();
                format!("==> {namespace}/{pod} [{container}] <==\n{text}")
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// The host directory of the volume a PersistentVolumeClaim is bound to.
    pub fn pvc_dir(&self, namespace: &str, claim: &str) -> Result<PathBuf> {
        kubelet::claim_path(&self.store, namespace, claim)
    }

    /// The ready endpoints of a Service: the ready pods its selector picks (all of them when
    /// `publishNotReadyAddresses` is set), with target ports resolved (named ports included).
    pub fn service_endpoints(&self, namespace: &str, service: &str) -> Result<Vec<ServiceEndpoint>> {
        let svc = self
            .store
            .get(&self.store.builtin("", "services"), namespace, service)?;
        let Some(selector) = svc["spec"]["selector"].as_object() else {
            return Ok(Vec::new());
        };
        let selector = LabelSelector::from_map(selector);
        let include_unready = svc["spec"]["publishNotReadyAddresses"] == Value::Bool(true);
        let mut endpoints = Vec::new();
        for pod in self.store.objects_of(store::PODS) {
            let m = &pod["metadata"];
            if m["namespace"] != namespace || !m["deletionTimestamp"].is_null() || !selector.matches(&pod) {
                continue;
            }
            let ready = pod["status"]["conditions"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|c| c["type"] == "Ready" && c["status"] == "True");
            let Some(ip) = pod["status"]["podIP"].as_str().and_then(|ip| ip.parse().ok()) else {
                continue;
            };
            if !ready && !include_unready {
                continue;
            }
            let mut ports = BTreeMap::new();
            for port in svc["spec"]["ports"].as_array().into_iter().flatten() {
                let key = port["name"]
                    .as_str()
                    .filter(|n| !n.is_empty())
                    .map(str::to_string)
                    .unwrap_or_else(|| jsonpath::display(&port["port"]));
                let target = match &port["targetPort"] {
                    Value::Number(n) => n.as_u64().map(|n| n as u16),
                    Value::String(name) => pod["spec"]["containers"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .flat_map(|c| c["ports"].as_array().into_iter().flatten())
                        .find(|p| p["name"] == name.as_str())
                        .and_then(|p| p["containerPort"].as_u64())
                        .map(|n| n as u16),
                    _ => port["port"].as_u64().map(|n| n as u16),
                };
                if let Some(target) = target {
                    ports.insert(key, target);
                }
            }
            endpoints.push(ServiceEndpoint {
                pod: m["name"].as_str().unwrap_or_default().to_string(),
                ip,
                ports,
            });
        }
        Ok(endpoints)
    }

    /// Forgets the watch history: watches resuming from any earlier resourceVersion get `410 Gone`.
    pub fn compact_watch_history(&self) {
        self.store.compact();
    }

    /// A failure report: every object (kind, namespace/name, resourceVersion, phase or readiness)
    /// and the last 50 lines of every pod's logs.
    pub fn report(&self) -> String {
        let mut out = String::from("=== objects ===\n");
        let mut pods = Vec::new();
        for object in self.store.all_objects() {
            let m = &object["metadata"];
            let kind = object["kind"].as_str().unwrap_or_default();
            let ns = m["namespace"].as_str().unwrap_or_default();
            let name = m["name"].as_str().unwrap_or_default();
            let status = &object["status"];
            let summary = match (status["phase"].as_str(), status["readyReplicas"].as_i64()) {
                (Some(phase), _) => phase.to_string(),
                (None, Some(ready)) => format!("ready {ready}/{}", object["spec"]["replicas"]),
                _ => String::new(),
            };
            let deleting = if m["deletionTimestamp"].is_null() {
                ""
            } else {
                " (deleting)"
            };
            out.push_str(&format!(
                "{kind} {ns}/{name} rv={} {summary}{deleting}\n",
                jsonpath::display(&m["resourceVersion"])
            ));
            if kind == "Pod" {
                pods.push((ns.to_string(), name.to_string()));
            }
        }
        for (ns, pod) in pods {
            let logs = self.pod_logs(&ns, &pod);
            let lines: Vec<&str> = logs.lines().collect();
            out.push_str(&format!("=== logs of {ns}/{pod} (last 50 lines) ===\n"));
            out.push_str(&lines[lines.len().saturating_sub(50)..].join("\n"));
            out.push('\n');
        }
        out
    }

    /// Stops pods gracefully (2 s grace), the controllers and the server, and waits for them.
    pub async fn shutdown(mut self) {
        self.shutdown.cancel();
        for task in self.tasks.drain(..) {
            let _ = tokio::time::timeout(Duration::from_secs(10), task).await;
        }
    }
}

/// Polls `check` every 100 ms until it yields a value, or fails with [`Error::Timeout`].
pub async fn eventually<T, F, Fut>(timeout: Duration, what: &str, mut check: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(value) = check().await {
            return Ok(value);
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(Error::Timeout(timeout, what.to_string()));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

impl Drop for SimCluster {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}
