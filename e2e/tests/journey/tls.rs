//! The TLS cluster: a RaftCluster with `spec.tls.enabled: true` whose certificates the operator
//! issues. It is scaled 3 to 5 to 3 while an application writes over TLS with the `write` client
//! certificate the operator issued; plaintext and unauthenticated requests are refused, and a
//! `write` client cannot change the membership; then a certificate rotation is rolled out one pod
//! at a time under writes, and no acknowledged write is lost.

use anyhow::{ensure, Context};
use k8s_openapi::api::core::v1::{Pod, Secret};
use kube::api::ListParams;
use kube::Api;
use reqwest::StatusCode;

use crate::kv::{verify_acked, Kv, Writer};
use crate::{Journey, MAX_WRITE_GAP};

/// The TLS cluster's name.
pub const TLS_CLUSTER: &str = "secure";

/// What the user applies: TLS on, certificates issued by the operator.
const TLS_MANIFEST: &str = "\
apiVersion: raftkv.dev/v1alpha1
kind: RaftCluster
metadata:
  name: secure
spec:
  replicas: 3
  tls:
    enabled: true
  networkPolicy:
    enabled: true
";

/// The text of key `key` of a Secret.
fn secret_text(secret: &Secret, key: &str) -> anyhow::Result<String> {
    let bytes = secret
        .data
        .as_ref()
        .and_then(|d| d.get(key))
        .with_context(|| format!("Secret {:?} has no {key}", secret.metadata.name))?;
    Ok(String::from_utf8(bytes.0.clone())?)
}

/// A TLS client from a `kubernetes.io/tls` Secret: trusting its `ca.crt`, presenting its
/// certificate and key.
fn client_of(secret: &Secret) -> anyhow::Result<Kv> {
    let identity = format!("{}{}", secret_text(secret, "tls.crt")?, secret_text(secret, "tls.key")?);
    Kv::tls(&secret_text(secret, "ca.crt")?, Some(&identity))
}

impl Journey {
    pub(crate) async fn tls_cluster(&self) -> anyhow::Result<()> {
        let node_image = self.backend.images().node.reference();
        let manifest = self.backend.scratch_dir().join("secure.yaml");
        std::fs::write(&manifest, TLS_MANIFEST)?;
        self.kubectl_ns(&["apply", "-f", &manifest.to_string_lossy()]).await?;

        // The operator issues the application's and its own client certificates first.
        let secrets: Api<Secret> = Api::namespaced(self.client.clone(), &self.namespace);
        let application = self
            .wait_for("the application's client certificate", || async {
                Ok(secrets.get_opt(&format!("{TLS_CLUSTER}-client")).await?)
            })
            .await?;
        let operator = self
            .wait_for("the operator's client certificate", || async {
                Ok(secrets.get_opt(&format!("{TLS_CLUSTER}-operator-tls")).await?)
            })
            .await?;
        let writer_kv = client_of(&application)?;
        // The journey checks membership with the operator's admin certificate: `GET /v1/members`
        // needs the admin role.
        let _ = self.tls_admin.set(client_of(&operator)?);
        self.converged_as(TLS_CLUSTER, 3, &node_image).await?;

        self.refuses_what_it_must(&application, &writer_kv).await?;
        self.network_policy_is_written().await?;

        let writer = Writer::start(
            self.backend.clone(),
            writer_kv.clone(),
            &self.namespace,
            TLS_CLUSTER,
            "tls-scale",
        );
        self.kubectl_ns(&["scale", "raftcluster", TLS_CLUSTER, "--replicas=5"])
            .await?;
        self.converged_as(TLS_CLUSTER, 5, &node_image)
            .await
            .context("scaling the TLS cluster out to 5")?;
        self.kubectl_ns(&["scale", "raftcluster", TLS_CLUSTER, "--replicas=3"])
            .await?;
        self.converged_as(TLS_CLUSTER, 3, &node_image)
            .await
            .context("scaling the TLS cluster in to 3")?;
        let report = writer.stop().await?;
        eprintln!("writer over TLS during scaling: {report}");
        ensure!(
            report.ok > 0,
            "no write was acknowledged over TLS while scaling: {report}"
        );
        verify_acked(&self.backend, &writer_kv, &self.namespace, TLS_CLUSTER, &report.acked).await?;

        self.rotate_certificates(&writer_kv, &node_image).await?;

        self.kubectl_ns(&["delete", "raftcluster", TLS_CLUSTER, "--timeout=120s"])
            .await?;
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), &self.namespace);
        self.wait_for("the TLS cluster's pods to be collected", || async {
            let left = pods
                .list(&ListParams::default().labels(&format!("app.kubernetes.io/instance={TLS_CLUSTER}")))
                .await?;
            Ok(left.items.is_empty().then_some(()))
        })
        .await?;
        Ok(())
    }

    /// The cluster's NetworkPolicy admits the peer port from its own pods and the client port
    /// from the operator's pods (the simulation stores it without enforcing it).
    async fn network_policy_is_written(&self) -> anyhow::Result<()> {
        let json = self
            .kubectl_ns(&["get", "networkpolicy", TLS_CLUSTER, "-o", "json"])
            .await?;
        let policy: serde_json::Value = serde_json::from_str(&json)?;
        let rules = policy["spec"]["ingress"].as_array().context("no ingress rules")?;
        ensure!(rules.len() == 2, "expected a peer rule and a client rule: {rules:?}");
        let operator = &rules[1]["from"][0];
        ensure!(
            operator["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"] == crate::OPERATOR_NAMESPACE
                && operator["podSelector"]["matchLabels"]["app.kubernetes.io/name"] == "raftkv-operator",
            "the client rule does not admit the operator: {operator}"
        );
        Ok(())
    }

    /// Plaintext, no certificate, and a `write` certificate asking for a membership change are
    /// each refused, and none of them wrote anything.
    async fn refuses_what_it_must(&self, application: &Secret, writer_kv: &Kv) -> anyhow::Result<()> {
        let urls = self
            .backend
            .service_urls(&self.namespace, TLS_CLUSTER, "client")
            .await?;
        let base = urls.first().context("the TLS cluster's Service has no endpoints")?;

        let plaintext = self.kv.put(base, "tls-plaintext", "x").await;
        ensure!(
            !matches!(plaintext, Ok(StatusCode::OK)),
            "a plaintext write was accepted: {plaintext:?}"
        );

        let anonymous = Kv::tls(&secret_text(application, "ca.crt")?, None)?;
        let status = anonymous.put(base, "tls-anonymous", "x").await?;
        ensure!(
            status == StatusCode::UNAUTHORIZED,
            "a write without credentials got {status}"
        );

        let before = writer_kv.status(base).await?;
        let removal = writer_kv.remove_member(base, before.id).await;
        let refusal = format!(
            "{:#}",
            removal.as_ref().err().context("a write client removed a member")?
        );
        ensure!(refusal.contains("403"), "a write client's removal: {refusal}");

        for key in ["tls-plaintext", "tls-anonymous"] {
            ensure!(
                writer_kv.get(base, key).await?.is_none(),
                "the refused write of {key} is there"
            );
        }
        Ok(())
    }

    /// Asks for a rotation through the annotation and waits until every pod runs on the new
    /// generation of certificates, while an application writes over TLS.
    async fn rotate_certificates(&self, writer_kv: &Kv, node_image: &str) -> anyhow::Result<()> {
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), &self.namespace);
        let selector = format!("app.kubernetes.io/instance={TLS_CLUSTER}");
        let mounted = |pod: &Pod| -> Vec<String> {
            pod.spec
                .iter()
                .flat_map(|s| s.volumes.iter().flatten())
                .filter_map(|v| v.secret.as_ref()?.secret_name.clone())
                .collect()
        };
        let before: Vec<Vec<String>> = pods
            .list(&ListParams::default().labels(&selector))
            .await?
            .items
            .iter()
            .map(mounted)
            .collect();
        ensure!(
            before.iter().all(|s| s.contains(&format!("{TLS_CLUSTER}-peer-tls-1"))),
            "pods mount {before:?} before the rotation"
        );

        let writer = Writer::start(
            self.backend.clone(),
            writer_kv.clone(),
            &self.namespace,
            TLS_CLUSTER,
            "tls-rotate",
        );
        self.kubectl_ns(&[
            "annotate",
            "--overwrite",
            "raftcluster",
            TLS_CLUSTER,
            "raftkv.dev/rotate-certificates=journey",
        ])
        .await?;
        self.wait_for(
            "every TLS pod to mount the second generation of certificates",
            || async {
                let list = pods.list(&ListParams::default().labels(&selector)).await?;
                let renewed = list.items.len() == 3
                    && list
                        .items
                        .iter()
                        .all(|p| mounted(p).contains(&format!("{TLS_CLUSTER}-peer-tls-2")));
                Ok(renewed.then_some(()))
            },
        )
        .await?;
        self.converged_as(TLS_CLUSTER, 3, node_image)
            .await
            .context("converging after the rotation")?;
        let report = writer.stop().await?;
        eprintln!("writer over TLS during the certificate rotation: {report}");
        ensure!(report.ok > 0, "no write was acknowledged during the rotation: {report}");
        ensure!(
            report.longest_gap <= MAX_WRITE_GAP,
            "writes stalled for {:?} during the rotation (quorum lost?): {report}",
            report.longest_gap
        );
        let refused: Vec<_> = report
            .other
            .keys()
            .filter(|k| k.starts_with('4') || k.as_str() == "500")
            .collect();
        ensure!(refused.is_empty(), "writes were refused during the rotation: {report}");
        verify_acked(&self.backend, writer_kv, &self.namespace, TLS_CLUSTER, &report.acked).await?;
        Ok(())
    }
}
