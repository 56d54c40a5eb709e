//! Workloads whose pods run as real processes: a StatefulSet of `python3 -m http.server`
//! processes bound to their pod addresses, with PVC-backed directories and HTTP readiness probes;
//! and a Deployment through its ReplicaSet.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{ensure, Context};
use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use k8s_openapi::api::core::v1::{ContainerStateTerminated, PersistentVolume, PersistentVolumeClaim, Pod, Service};
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use raftkv_e2e::{eventually, ImageMapping, SimCluster};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const LIMIT: Duration = Duration::from_secs(180);
const WAIT: Duration = Duration::from_secs(60);

async fn scenario<F, Fut>(body: F) -> anyhow::Result<()>
where
    F: FnOnce(std::sync::Arc<SimCluster>, kube::Client) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>>,
{
    let cluster = SimCluster::builder()
        .image(
            "e2e/http-server:*",
            ImageMapping::new("python3").entrypoint_args(["-m", "http.server"]),
        )
        .start()
        .await?;
    let cluster = std::sync::Arc::new(cluster);
    let client = cluster.kube_client().await?;
    let outcome = tokio::time::timeout(LIMIT, body(cluster.clone(), client))
        .await
        .unwrap_or_else(|_| Err(anyhow::anyhow!("scenario exceeded {LIMIT:?}")));
    if outcome.is_err() {
        eprintln!("{}", cluster.report());
    }
    if let Ok(cluster) = std::sync::Arc::try_unwrap(cluster) {
        cluster.shutdown().await;
    }
    outcome
}

/// A pod template serving its `/data` volume over HTTP on `$(POD_IP):8080`, ready when it answers.
fn http_pod_template(app: &str) -> serde_json::Value {
    json!({
        "metadata": {"labels": {"app": app}},
        "spec": {
            "terminationGracePeriodSeconds": 5,
            "containers": [{
                "name": "http",
                "image": "e2e/http-server:1",
                "args": ["--bind", "$(POD_IP)", "--directory", "/data", "8080"],
                "env": [{"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}],
                "ports": [{"name": "http", "containerPort": 8080}],
                "readinessProbe": {"httpGet": {"path": "/", "port": "http"}, "periodSeconds": 1},
                "livenessProbe": {"tcpSocket": {"port": 8080}, "periodSeconds": 2, "initialDelaySeconds": 2},
                "volumeMounts": [{"name": "data", "mountPath": "/data"}],
            }],
        },
    })
}

fn statefulset(replicas: i32) -> anyhow::Result<StatefulSet> {
    Ok(serde_json::from_value(json!({
        "apiVersion": "apps/v1", "kind": "StatefulSet",
        "metadata": {"name": "web"},
        "spec": {
            "replicas": replicas, "serviceName": "web", "podManagementPolicy": "Parallel",
            "selector": {"matchLabels": {"app": "web"}},
            "template": http_pod_template("web"),
            "volumeClaimTemplates": [{"metadata": {"name": "data"},
                "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}}}],
        },
    }))?)
}

async fn http_get(addr: SocketAddr, path: &str) -> anyhow::Result<String> {
    let mut stream = tokio::net::TcpStream::connect(addr).await?;
    stream
        .write_all(format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
        .await?;
    let mut response = String::new();
    stream.read_to_string(&mut response).await?;
    Ok(response)
}

async fn ready_replicas(api: &Api<StatefulSet>, wanted: i32) -> anyhow::Result<()> {
    let api = api.clone();
    eventually(WAIT, &format!("{wanted} ready replicas"), || {
        let api = api.clone();
        async move {
            let sts = api.get("web").await.ok()?;
            let status = sts.status?;
            (status.ready_replicas.unwrap_or(0) == wanted && status.replicas == wanted).then_some(())
        }
    })
    .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn statefulset_pods_run_real_processes_and_become_ready() -> anyhow::Result<()> {
    scenario(|cluster, client| async move {
        let sets: Api<StatefulSet> = Api::namespaced(client.clone(), "default");
        let services: Api<Service> = Api::namespaced(client.clone(), "default");
        sets.create(&PostParams::default(), &statefulset(2)?).await?;
        services
            .create(
                &PostParams::default(),
                &serde_json::from_value(json!({"metadata": {"name": "web"},
                "spec": {"selector": {"app": "web"}, "ports": [{"name": "http", "port": 80, "targetPort": "http"}]}}))?,
            )
            .await?;
        ready_replicas(&sets, 2).await?;

        let endpoints = cluster.service_endpoints("default", "web")?;
        ensure!(endpoints.len() == 2, "{endpoints:?}");
        ensure!(endpoints[0].ip != endpoints[1].ip, "each pod has its own address");
        for endpoint in &endpoints {
            std::fs::write(
                cluster
                    .pvc_dir("default", &format!("data-{}", endpoint.pod))?
                    .join("who"),
                &endpoint.pod,
            )?;
            let addr = endpoint.socket_addr("http").context("the http port resolves")?;
            let body = http_get(addr, "/who").await?;
            ensure!(
                body.starts_with("HTTP/1.0 200") && body.ends_with(&endpoint.pod),
                "{body}"
            );
        }
        let logs = cluster.kubectl_output(&["logs", "web-0"]).await?;
        ensure!(logs.contains("GET / HTTP/1.1"), "probe requests are logged: {logs}");
        let pods = cluster.kubectl_output(&["get", "pods"]).await?;
        ensure!(
            pods.lines()
                .filter(|l| l.contains("1/1") && l.contains("Running"))
                .count()
                == 2,
            "{pods}"
        );
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scaling_down_keeps_volumes_and_deleted_pods_return_with_name_and_address() -> anyhow::Result<()> {
    scenario(|cluster, client| async move {
        let sets: Api<StatefulSet> = Api::namespaced(client.clone(), "default");
        let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
        let claims: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), "default");
        sets.create(&PostParams::default(), &statefulset(2)?).await?;
        ready_replicas(&sets, 2).await?;
        let address_of = |pod: Pod| pod.status.and_then(|s| s.pod_ip).unwrap_or_default();
        let first = pods.get("web-1").await?;
        let first_uid = first.metadata.uid.clone();
        let first_ip = address_of(first);

        pods.delete("web-1", &DeleteParams::default()).await?;
        ready_pod_uid(&pods, "web-1", first_uid.as_deref()).await?;
        ensure!(
            address_of(pods.get("web-1").await?) == first_ip,
            "a recreated pod keeps its address"
        );

        cluster
            .kubectl_output(&["scale", "statefulset", "web", "--replicas=1"])
            .await?;
        ready_replicas(&sets, 1).await?;
        eventually(WAIT, "web-1 to be gone", || {
            let pods = pods.clone();
            async move { pods.get_opt("web-1").await.ok()?.is_none().then_some(()) }
        })
        .await?;
        let mut names: Vec<String> = claims
            .list(&Default::default())
            .await?
            .items
            .into_iter()
            .filter_map(|c| c.metadata.name)
            .collect();
        names.sort();
        ensure!(
            names == ["data-web-0", "data-web-1"],
            "scale-down keeps PVCs: {names:?}"
        );

        std::fs::write(cluster.pvc_dir("default", "data-web-1")?.join("kept"), "still here")?;
        sets.patch(
            "web",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"replicas": 2}})),
        )
        .await?;
        ready_replicas(&sets, 2).await?;
        let endpoint = SocketAddr::new(address_of(pods.get("web-1").await?).parse()?, 8080);
        let body = http_get(endpoint, "/kept").await?;
        ensure!(
            body.ends_with("still here"),
            "web-1 came back on its old volume: {body}"
        );
        Ok(())
    })
    .await
}

/// The uid of the pod, once it exists and is ready.
async fn ready_pod_uid(pods: &Api<Pod>, name: &str, not: Option<&str>) -> anyhow::Result<String> {
    let found = eventually(WAIT, &format!("{name} to be ready"), || {
        let pods = pods.clone();
        let name = name.to_string();
        let not = not.map(str::to_string);
        async move {
            let pod = pods.get(&name).await.ok()?;
            let ready = pod
                .status
                .as_ref()?
                .conditions
                .as_ref()?
                .iter()
                .any(|c| c.type_ == "Ready" && c.status == "True");
            let uid = pod.metadata.uid?;
            (ready && Some(&uid) != not.as_ref()).then_some(uid)
        }
    })
    .await?;
    Ok(found)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_claim_waits_for_its_pod_and_its_successor_gets_a_new_empty_volume() -> anyhow::Result<()> {
    scenario(|cluster, client| async move {
        let sets: Api<StatefulSet> = Api::namespaced(client.clone(), "default");
        let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
        let claims: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), "default");
        let volumes: Api<PersistentVolume> = Api::all(client.clone());
        sets.create(&PostParams::default(), &statefulset(1)?).await?;
        ready_replicas(&sets, 1).await?;
        let first_pod = ready_pod_uid(&pods, "web-0", None).await?;
        let claim = claims.get("data-web-0").await?;
        let first_volume = claim
            .spec
            .as_ref()
            .and_then(|s| s.volume_name.clone())
            .context("bound")?;
        let volume = volumes.get(&first_volume).await?;
        ensure!(
            volume
                .spec
                .as_ref()
                .and_then(|s| s.persistent_volume_reclaim_policy.as_deref())
                == Some("Delete"),
            "the default class deletes released volumes: {volume:?}"
        );
        let dir = cluster.pvc_dir("default", "data-web-0")?;
        std::fs::write(dir.join("old"), "the first volume")?;

        // In use: the claim is only marked for deletion.
        claims.delete("data-web-0", &DeleteParams::default()).await?;
        let held = claims.get("data-web-0").await?;
        ensure!(held.metadata.deletion_timestamp.is_some(), "the claim is terminating");
        ensure!(
            held.metadata
                .finalizers
                .unwrap_or_default()
                .iter()
                .any(|f| f == "kubernetes.io/pvc-protection"),
            "the protection finalizer holds it"
        );
        let still = ready_pod_uid(&pods, "web-0", None).await?;
        ensure!(still == first_pod, "the pod keeps running on its claim");
        ensure!(dir.join("old").exists(), "the data stays while the pod uses it");

        // Once the pod is gone, the claim and the volume's data go, and the StatefulSet's new
        // pod gets a new claim bound to a new, empty volume.
        pods.delete("web-0", &DeleteParams::default()).await?;
        let second_pod = ready_pod_uid(&pods, "web-0", Some(&first_pod)).await?;
        let claim = claims.get("data-web-0").await?;
        let second_volume = claim
            .spec
            .as_ref()
            .and_then(|s| s.volume_name.clone())
            .context("bound")?;
        ensure!(second_volume != first_volume, "a new claim gets a new volume");
        ensure!(!dir.exists(), "the released volume's data is deleted");
        ensure!(
            volumes.get_opt(&first_volume).await?.is_none(),
            "the released volume is deleted"
        );
        let new_dir = cluster.pvc_dir("default", "data-web-0")?;
        ensure!(std::fs::read_dir(&new_dir)?.next().is_none(), "the new volume is empty");
        let endpoint = SocketAddr::new(
            pods.get("web-0")
                .await?
                .status
                .and_then(|s| s.pod_ip)
                .context("an address")?
                .parse()?,
            8080,
        );
        let body = http_get(endpoint, "/old").await?;
        ensure!(
            body.starts_with("HTTP/1.0 404"),
            "the new pod does not see the old data: {body}"
        );
        ensure!(second_pod != first_pod);
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retained_volume_keeps_its_data_and_is_never_handed_to_a_new_claim() -> anyhow::Result<()> {
    scenario(|cluster, client| async move {
        let classes: Api<k8s_openapi::api::storage::v1::StorageClass> = Api::all(client.clone());
        classes
            .create(
                &PostParams::default(),
                &serde_json::from_value(json!({"metadata": {"name": "keep"},
                    "provisioner": "raftkv.dev/host-directory", "reclaimPolicy": "Retain"}))?,
            )
            .await?;
        let claims: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), "default");
        let volumes: Api<PersistentVolume> = Api::all(client.clone());
        let claim = |name: &str| -> anyhow::Result<PersistentVolumeClaim> {
            Ok(serde_json::from_value(json!({"metadata": {"name": name},
                "spec": {"storageClassName": "keep", "accessModes": ["ReadWriteOnce"],
                    "resources": {"requests": {"storage": "1Gi"}}}}))?)
        };
        let bound_volume = |claims: Api<PersistentVolumeClaim>| async move {
            eventually(WAIT, "the claim to be bound", || {
                let claims = claims.clone();
                async move {
                    let c = claims.get("kept").await.ok()?;
                    (c.status?.phase.as_deref() == Some("Bound")).then_some(c.spec?.volume_name?)
                }
            })
            .await
        };
        claims.create(&PostParams::default(), &claim("kept")?).await?;
        let first = bound_volume(claims.clone()).await?;
        let dir = cluster.pvc_dir("default", "kept")?;
        std::fs::write(dir.join("precious"), "yes")?;

        claims.delete("kept", &DeleteParams::default()).await?;
        eventually(WAIT, "the volume to be released", || {
            let volumes = volumes.clone();
            let first = first.clone();
            async move {
                let v = volumes.get(&first).await.ok()?;
                (v.status?.phase.as_deref() == Some("Released")).then_some(())
            }
        })
        .await?;
        ensure!(dir.join("precious").exists(), "a retained volume keeps its data");

        claims.create(&PostParams::default(), &claim("kept")?).await?;
        let second = bound_volume(claims.clone()).await?;
        ensure!(
            second != first,
            "a released volume is not handed to a new claim of the same name"
        );
        ensure!(
            std::fs::read_dir(cluster.pvc_dir("default", "kept")?)?.next().is_none(),
            "the new claim's volume is empty"
        );
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crashed_containers_termination_message_is_in_its_status() -> anyhow::Result<()> {
    scenario(|_cluster, client| async move {
        let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
        let crashing = |name: &str, policy: &str, script: &str| -> anyhow::Result<Pod> {
            Ok(serde_json::from_value(json!({
                "metadata": {"name": name},
                "spec": {"containers": [{
                    "name": "main", "image": "e2e/http-server:1",
                    "command": ["python3", "-c", script, "/dev/termination-log"],
                    "terminationMessagePolicy": policy,
                }]},
            }))?)
        };
        let written = "import sys; open(sys.argv[1], 'w').write('boom: the volume is damaged'); sys.exit(3)";
        let logged = "import sys; print('starting'); print('last words', file=sys.stderr); sys.exit(2)";
        pods.create(&PostParams::default(), &crashing("writes", "File", written)?)
            .await?;
        pods.create(
            &PostParams::default(),
            &crashing("logs", "FallbackToLogsOnError", logged)?,
        )
        .await?;
        async fn terminated(pods: &Api<Pod>, name: &str) -> anyhow::Result<ContainerStateTerminated> {
            let found = eventually(WAIT, &format!("{name} to have crashed"), || {
                let pods = pods.clone();
                let name = name.to_string();
                async move {
                    let status = pods.get(&name).await.ok()?.status?;
                    let container = status.container_statuses?.into_iter().next()?;
                    let state = container.state.and_then(|s| s.terminated);
                    let last = container.last_state.and_then(|s| s.terminated);
                    state.or(last)
                }
            })
            .await?;
            Ok(found)
        }
        let first = terminated(&pods, "writes").await?;
        ensure!(first.exit_code == 3, "{first:?}");
        ensure!(
            first.message.as_deref() == Some("boom: the volume is damaged"),
            "the file's content is the message: {first:?}"
        );
        let second = terminated(&pods, "logs").await?;
        ensure!(second.exit_code == 2, "{second:?}");
        let message = second.message.unwrap_or_default();
        ensure!(
            message.contains("last words") && message.contains("starting"),
            "FallbackToLogsOnError takes the log's tail: {message:?}"
        );
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deployments_run_pods_through_a_replicaset() -> anyhow::Result<()> {
    scenario(|cluster, client| async move {
        let deployments: Api<Deployment> = Api::namespaced(client.clone(), "default");
        let mut template = http_pod_template("op");
        template["spec"]["volumes"] = json!([{"name": "data", "emptyDir": {}}]);
        let deployment: Deployment = serde_json::from_value(json!({
            "metadata": {"name": "op"},
            "spec": {"replicas": 1, "selector": {"matchLabels": {"app": "op"}}, "template": template},
        }))?;
        deployments.create(&PostParams::default(), &deployment).await?;
        let status = cluster
            .kubectl_output(&["rollout", "status", "deployment/op", "--timeout=60s"])
            .await?;
        ensure!(status.contains("successfully rolled out"), "{status}");
        let rs = cluster
            .kubectl_output(&["get", "rs", "-l", "app=op", "-o", "name"])
            .await?;
        ensure!(rs.lines().count() == 1, "{rs}");
        Ok(())
    })
    .await
}
