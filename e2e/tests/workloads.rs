//! Workloads whose pods run as real processes: a StatefulSet of `python3 -m http.server`
//! processes bound to their pod addresses, with PVC-backed directories and HTTP readiness probes;
//! and a Deployment through its ReplicaSet.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{ensure, Context};
use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use k8s_openapi::api::core::v1::{PersistentVolumeClaim, Pod, Service};
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
                    .pvc_dir("default", &format!("data-{}", endpoint.pod))
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
        eventually(WAIT, "web-1 to be recreated and ready", || {
            let pods = pods.clone();
            let first_uid = first_uid.clone();
            async move {
                let pod = pods.get("web-1").await.ok()?;
                let ready = pod
                    .status
                    .as_ref()?
                    .conditions
                    .as_ref()?
                    .iter()
                    .any(|c| c.type_ == "Ready" && c.status == "True");
                (pod.metadata.uid != first_uid && ready).then_some(())
            }
        })
        .await?;
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

        std::fs::write(cluster.pvc_dir("default", "data-web-1").join("kept"), "still here")?;
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
