//! Where the journey runs: a real cluster named by `KUBECONFIG` (`RAFTKV_E2E_BACKEND=kubeconfig`),
//! or the simulated control plane, started here with the node and operator binaries standing for
//! their images.
//!
//! Scenarios see one interface: kubectl, a kube-rs client, Helm's kubeconfig, and HTTP base URLs
//! for a Service or a pod. On a real cluster those URLs come from `kubectl port-forward`, as a
//! user would reach the store; the simulation has no Service networking, so there they are the
//! ready pod addresses the Service selects.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context};
use k8s_openapi::api::core::v1::Pod;
use kube::Api;
use raftkv_e2e::{ImageMapping, SimCluster};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

use crate::binaries::binaries;

/// Selects the backend; `kubeconfig` means the cluster `KUBECONFIG` points at.
pub const BACKEND_ENV: &str = "RAFTKV_E2E_BACKEND";

/// A container image split into repository and tag, as the chart's values take it.
#[derive(Debug, Clone)]
pub struct Image {
    /// `raftkv/node`, `registry:5000/raftkv/node`.
    pub repository: String,
    /// `0.1.0`.
    pub tag: String,
}

impl Image {
    fn parse(reference: &str) -> anyhow::Result<Image> {
        let slash = reference.rfind('/').map_or(0, |i| i + 1);
        let Some(colon) = reference[slash..].rfind(':').map(|i| i + slash) else {
            bail!("image {reference:?} has no tag");
        };
        Ok(Image {
            repository: reference[..colon].to_string(),
            tag: reference[colon + 1..].to_string(),
        })
    }

    /// `repository:tag`.
    pub fn reference(&self) -> String {
        format!("{}:{}", self.repository, self.tag)
    }
}

/// The images a journey installs and rolls out to.
#[derive(Debug, Clone)]
pub struct Images {
    /// The operator's image.
    pub operator: Image,
    /// The node image the operator gives new clusters.
    pub node: Image,
    /// A second tag of the node image, for the rollout scenario.
    pub node_rollout: Image,
}

enum Kind {
    Simulated(Box<SimCluster>),
    Kubeconfig,
}

/// A running `kubectl port-forward`, and the local URL it serves.
struct PortForward {
    child: Child,
    url: String,
}

/// One backend, for the length of a journey.
pub struct Backend {
    kind: Kind,
    kubeconfig: PathBuf,
    /// kubectl's discovery cache, private to this run.
    scratch: tempfile::TempDir,
    images: Images,
    /// Port-forwards by `namespace/target:port`, restarted when kubectl exits.
    forwards: tokio::sync::Mutex<HashMap<String, PortForward>>,
}

impl Backend {
    /// The backend the environment asks for.
    pub async fn from_env() -> anyhow::Result<Backend> {
        let scratch = tempfile::Builder::new().prefix("raftkv-journey-").tempdir()?;
        match std::env::var(BACKEND_ENV).as_deref() {
            Ok("kubeconfig") => {
                let kubeconfig = std::env::var_os("KUBECONFIG")
                    .map(PathBuf::from)
                    .context("RAFTKV_E2E_BACKEND=kubeconfig needs KUBECONFIG")?;
                let image = |name: &str| -> anyhow::Result<Image> {
                    Image::parse(&std::env::var(name).with_context(|| format!("{name} names the image to test"))?)
                };
                let node = image("RAFTKV_NODE_IMAGE")?;
                let node_rollout = match std::env::var("RAFTKV_NODE_ROLLOUT_IMAGE") {
                    Ok(reference) => Image::parse(&reference)?,
                    Err(_) => Image {
                        repository: node.repository.clone(),
                        tag: format!("{}-rollout", node.tag),
                    },
                };
                Ok(Backend {
                    kind: Kind::Kubeconfig,
                    kubeconfig,
                    scratch,
                    images: Images {
                        operator: image("RAFTKV_OPERATOR_IMAGE")?,
                        node,
                        node_rollout,
                    },
                    forwards: Default::default(),
                })
            }
            Ok("sim") | Err(_) => {
                // Building may take minutes on a fresh clone: off the async workers.
                let binaries = tokio::task::spawn_blocking(binaries).await??;
                let cluster = SimCluster::builder()
                    .image("raftkv/node:*", ImageMapping::new(&binaries.node))
                    .image("raftkv/operator:*", ImageMapping::new(&binaries.operator))
                    .start()
                    .await?;
                let kubeconfig = cluster.kubeconfig().to_path_buf();
                let tag = |tag: &str| tag.to_string();
                Ok(Backend {
                    kind: Kind::Simulated(Box::new(cluster)),
                    kubeconfig,
                    scratch,
                    images: Images {
                        operator: Image {
                            repository: "raftkv/operator".into(),
                            tag: tag("e2e"),
                        },
                        node: Image {
                            repository: "raftkv/node".into(),
                            tag: tag("e2e"),
                        },
                        node_rollout: Image {
                            repository: "raftkv/node".into(),
                            tag: tag("e2e-rollout"),
                        },
                    },
                    forwards: Default::default(),
                })
            }
            Ok(other) => bail!("{BACKEND_ENV}={other:?}: expected `kubeconfig` or `sim`"),
        }
    }

    /// `simulated` or `kubeconfig`.
    pub fn name(&self) -> &'static str {
        match self.kind {
            Kind::Simulated(_) => "simulated",
            Kind::Kubeconfig => "kubeconfig",
        }
    }

    /// Whether this is the simulated control plane.
    pub fn is_simulated(&self) -> bool {
        matches!(self.kind, Kind::Simulated(_))
    }

    /// The images under test.
    pub fn images(&self) -> &Images {
        &self.images
    }

    /// The kubeconfig Helm and kubectl use.
    pub fn kubeconfig(&self) -> &Path {
        &self.kubeconfig
    }

    /// A directory for manifests, removed with the backend.
    pub fn scratch_dir(&self) -> &Path {
        self.scratch.path()
    }

    /// A kube-rs client.
    pub async fn kube_client(&self) -> anyhow::Result<kube::Client> {
        match &self.kind {
            Kind::Simulated(cluster) => Ok(cluster.kube_client().await?),
            Kind::Kubeconfig => {
                let options = kube::config::KubeConfigOptions::default();
                let config = kube::Config::from_custom_kubeconfig(
                    kube::config::Kubeconfig::read_from(&self.kubeconfig)?,
                    &options,
                )
                .await?;
                Ok(kube::Client::try_from(config)?)
            }
        }
    }

    fn kubectl_command(&self) -> Command {
        let mut command = Command::new("kubectl");
        command
            .env("KUBECONFIG", &self.kubeconfig)
            .arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .arg("--cache-dir")
            .arg(self.scratch.path().join("kubectl-cache"))
            .kill_on_drop(true);
        command
    }

    /// Runs kubectl; its stdout, or an error carrying its stderr.
    pub async fn kubectl(&self, args: &[&str]) -> anyhow::Result<String> {
        let output = self
            .kubectl_command()
            .args(args)
            .output()
            .await
            .context("running kubectl")?;
        if !output.status.success() {
            bail!(
                "kubectl {} failed ({}): {}",
                args.join(" "),
                output.status,
                String::from_utf8_lossy(&output.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    }

    /// Base URLs (`http://host:port`) reaching the Service's port `port_name`.
    pub async fn service_urls(&self, namespace: &str, service: &str, port_name: &str) -> anyhow::Result<Vec<String>> {
        match &self.kind {
            Kind::Simulated(cluster) => Ok(cluster
                .service_endpoints(namespace, service)?
                .iter()
                .filter_map(|e| e.socket_addr(port_name))
                .map(|addr| format!("http://{addr}"))
                .collect()),
            Kind::Kubeconfig => Ok(vec![
                self.forward(namespace, &format!("svc/{service}"), port_name).await?,
            ]),
        }
    }

    /// The base URL of one pod's port `port` (a number or a name kubectl resolves).
    pub async fn pod_url(&self, namespace: &str, pod: &str, port: u16) -> anyhow::Result<String> {
        match &self.kind {
            Kind::Simulated(cluster) => {
                let pods: Api<Pod> = Api::namespaced(cluster.kube_client().await?, namespace);
                let ip = pods
                    .get(pod)
                    .await?
                    .status
                    .and_then(|s| s.pod_ip)
                    .with_context(|| format!("pod {pod} has no IP yet"))?;
                Ok(format!("http://{ip}:{port}"))
            }
            Kind::Kubeconfig => self.forward(namespace, &format!("pod/{pod}"), &port.to_string()).await,
        }
    }

    /// Drops the port-forwards to `namespace`, after a connection through one failed: the pod
    /// kubectl picked may be gone, and a new forward picks a live one.
    pub async fn reset_forwards(&self, namespace: &str) {
        self.forwards
            .lock()
            .await
            .retain(|key, _| !key.starts_with(&format!("{namespace}/")));
    }

    async fn forward(&self, namespace: &str, target: &str, port: &str) -> anyhow::Result<String> {
        let key = format!("{namespace}/{target}:{port}");
        let mut forwards = self.forwards.lock().await;
        if let Some(forward) = forwards.get_mut(&key) {
            if forward.child.try_wait()?.is_none() {
                return Ok(forward.url.clone());
            }
        }
        let mut child = self
            .kubectl_command()
            .args([
                "--namespace",
                namespace,
                "port-forward",
                "--address",
                "127.0.0.1",
                target,
            ])
            .arg(format!(":{port}"))
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .context("starting kubectl port-forward")?;
        let mut lines = BufReader::new(child.stdout.take().context("port-forward stdout")?).lines();
        // "Forwarding from 127.0.0.1:43567 -> 8080"
        let local = tokio::time::timeout(Duration::from_secs(60), async {
            while let Some(line) = lines.next_line().await? {
                if let Some(rest) = line.strip_prefix("Forwarding from 127.0.0.1:") {
                    if let Some((port, _)) = rest.split_once(' ') {
                        return Ok(port.to_string());
                    }
                }
            }
            anyhow::Ok(String::new())
        })
        .await
        .with_context(|| format!("kubectl port-forward {target} did not start"))??;
        if local.is_empty() {
            bail!("kubectl port-forward {target} exited before forwarding");
        }
        // kubectl writes a line per connection; keep reading so it never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        let url = format!("http://127.0.0.1:{local}");
        forwards.insert(
            key,
            PortForward {
                child,
                url: url.clone(),
            },
        );
        Ok(url)
    }

    /// Overwrites 4 bytes at `offset` of the first WAL segment on the volume of `claim`, as a
    /// failing disk would: in place, the file's length and every other byte unchanged. Returns
    /// the segment's path inside the volume.
    ///
    /// On the simulation the volume is a host directory; on a real cluster a short-lived pod
    /// (`RAFTKV_E2E_TOOLBOX_IMAGE`, default `busybox:1.36`) mounts the claim and uses `dd`.
    pub async fn damage_first_wal_segment(&self, namespace: &str, claim: &str, offset: u64) -> anyhow::Result<String> {
        match &self.kind {
            Kind::Simulated(cluster) => {
                let wal = cluster.pvc_dir(namespace, claim)?.join("wal");
                let mut segments: Vec<PathBuf> = std::fs::read_dir(&wal)
                    .with_context(|| format!("listing {}", wal.display()))?
                    .filter_map(|e| e.ok().map(|e| e.path()))
                    .filter(|p| p.extension().is_some_and(|x| x == "wal"))
                    .collect();
                segments.sort();
                let first = segments.first().context("the volume holds no WAL segment")?;
                let mut file = std::fs::OpenOptions::new().write(true).open(first)?;
                use std::io::{Seek, SeekFrom, Write};
                file.seek(SeekFrom::Start(offset))?;
                file.write_all(b"XXXX")?;
                file.sync_all()?;
                let name = first.file_name().unwrap_or_default().to_string_lossy();
                Ok(format!("wal/{name}"))
            }
            Kind::Kubeconfig => {
                let image = std::env::var("RAFTKV_E2E_TOOLBOX_IMAGE").unwrap_or_else(|_| "busybox:1.36".into());
                let pod = format!("damage-{claim}");
                let script = format!(
                    "f=$(ls /data/wal/*.wal | sort | head -n 1) && printf XXXX | dd of=\"$f\" bs=1 seek={offset} conv=notrunc 2>/dev/null && sync && echo \"${{f#/data/}}\""
                );
                let overrides = serde_json::json!({
                    "apiVersion": "v1",
                    "spec": {
                        "restartPolicy": "Never",
                        "containers": [{"name": "damage", "image": image, "command": ["sh", "-c", script],
                            "volumeMounts": [{"name": "data", "mountPath": "/data"}]}],
                        "volumes": [{"name": "data", "persistentVolumeClaim": {"claimName": claim}}],
                    },
                });
                let output = self
                    .kubectl(&[
                        "run",
                        &pod,
                        "--namespace",
                        namespace,
                        "--image",
                        &image,
                        "--restart=Never",
                        "--rm",
                        "-i",
                        "--quiet",
                        "--overrides",
                        &overrides.to_string(),
                        "--pod-running-timeout=2m",
                    ])
                    .await?;
                Ok(output.trim().to_string())
            }
        }
    }

    /// The provisioner of the cluster's default StorageClass, for a class of another reclaim
    /// policy that provisions the same way.
    pub async fn default_provisioner(&self) -> anyhow::Result<String> {
        let classes = self.kubectl(&["get", "storageclasses", "-o", "json"]).await?;
        let classes: serde_json::Value = serde_json::from_str(&classes)?;
        classes["items"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|c| c["metadata"]["annotations"]["storageclass.kubernetes.io/is-default-class"] == "true")
            .and_then(|c| c["provisioner"].as_str())
            .map(str::to_string)
            .context("the cluster has no default StorageClass")
    }

    /// Everything that helps explain a failure: the objects' YAML and every pod's logs in the
    /// given namespaces, and on the simulated backend its own report.
    pub async fn diagnostics(&self, namespaces: &[&str]) -> String {
        let mut out = String::new();
        for namespace in namespaces {
            for kinds in [
                "raftclusters,statefulsets,services,poddisruptionbudgets,deployments",
                "pods,pvc",
            ] {
                match self
                    .kubectl(&["get", kinds, "--namespace", namespace, "-o", "yaml"])
                    .await
                {
                    Ok(yaml) => out.push_str(&format!("=== {namespace}: {kinds} ===\n{yaml}\n")),
                    Err(e) => out.push_str(&format!("=== {namespace}: {kinds}: {e:#}\n")),
                }
            }
            let pods = self
                .kubectl(&["get", "pods", "--namespace", namespace, "-o", "name"])
                .await
                .unwrap_or_default();
            for pod in pods.lines() {
                let pod = pod.trim_start_matches("pod/");
                match &self.kind {
                    Kind::Simulated(cluster) => out.push_str(&cluster.pod_logs(namespace, pod)),
                    Kind::Kubeconfig => {
                        let logs = self
                            .kubectl(&["logs", "--namespace", namespace, pod, "--all-containers", "--tail=300"])
                            .await
                            .unwrap_or_else(|e| format!("{e:#}"));
                        out.push_str(&format!("==> {namespace}/{pod} <==\n{logs}"));
                    }
                }
                out.push('\n');
            }
        }
        if let Kind::Simulated(cluster) = &self.kind {
            out.push_str(&cluster.report());
        }
        out
    }

    /// Stops port-forwards and, on the simulated backend, every pod and the control plane.
    pub async fn shutdown(self) {
        self.forwards.lock().await.clear();
        if let Kind::Simulated(cluster) = self.kind {
            cluster.shutdown().await;
        }
    }
}
