//! Backup and restore as a user runs them: a scheduled backup of the journey's cluster to an
//! S3-compatible server (with real credentials and SigV4), the cluster and its claims deleted,
//! and a new cluster created from the backup with `spec.restore`.
//!
//! The rule checked is the documented one: every write acknowledged at or below the backup's
//! revision is in the restored cluster, and no write above it is, including writes that were
//! going on while the backup streamed.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, ensure, Context};
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

use crate::backend::Backend;
use crate::kv::Kv;
use crate::{Journey, CLUSTER};

/// The bucket and folder backups go to.
const BUCKET: &str = "backups";
/// The Secret holding the S3 credentials.
const CREDENTIALS: &str = "backup-credentials";

/// One acknowledged write and its revision.
#[derive(Clone, Debug)]
pub struct Acked {
    value: String,
    revision: u64,
}

/// Writes `<prefix>-<n>` through the client Service until `stop`, keeping each acknowledged
/// write's revision. Writes whose outcome is unknown are left out: they may or may not be in.
async fn write_until(
    backend: Arc<Backend>,
    kv: Kv,
    namespace: String,
    prefix: &'static str,
    acked: Arc<Mutex<BTreeMap<String, Acked>>>,
    stop: CancellationToken,
) {
    let mut n = 0u64;
    while !stop.is_cancelled() {
        if let Ok(urls) = backend.service_urls(&namespace, CLUSTER, "client").await {
            if let Some(base) = urls.get(n as usize % urls.len().max(1)) {
                let (key, value) = (format!("{prefix}-{n:06}"), format!("value-{n}"));
                if let Ok(Ok(revision)) = kv.put_revision(base, &key, &value).await {
                    acked.lock().expect("acked lock").insert(key, Acked { value, revision });
                }
            }
        }
        n += 1;
        tokio::select! {
            () = stop.cancelled() => {}
            () = tokio::time::sleep(Duration::from_millis(20)) => {}
        }
    }
}

impl Journey {
    /// The backup step: returns the writes acknowledged around the backup and the backup's
    /// object URL and revision, for [`Journey::restore_from_backup`].
    pub async fn back_up_on_a_schedule(
        &self,
        s3: &raftkv_e2e::s3::S3Server,
    ) -> anyhow::Result<(BTreeMap<String, Acked>, String, u64)> {
        self.kubectl_ns(&[
            "create",
            "secret",
            "generic",
            CREDENTIALS,
            &format!("--from-literal=AWS_ACCESS_KEY_ID={}", raftkv_e2e::s3::ACCESS_KEY),
            &format!("--from-literal=AWS_SECRET_ACCESS_KEY={}", raftkv_e2e::s3::SECRET_KEY),
        ])
        .await?;
        let stop = CancellationToken::new();
        let acked = Arc::new(Mutex::new(BTreeMap::new()));
        let writer = tokio::spawn(write_until(
            self.backend.clone(),
            self.kv.clone(),
            self.namespace.clone(),
            "backup",
            acked.clone(),
            stop.clone(),
        ));
        // A failed step drops the guard and so stops the writer.
        let _stop_writer = stop.clone().drop_guard();
        // Every minute: the first slot after the cluster's creation has long passed, so the
        // first backup starts at once, while the writer writes.
        let backup = json!({"spec": {"backup": {
            "schedule": "* * * * *",
            "destination": format!("s3://{BUCKET}/journey"),
            "endpoint": s3.endpoint(),
            "region": "us-east-1",
            "allowHttp": true,
            "credentialsSecret": CREDENTIALS,
            "retention": {"keepLast": 2},
        }}});
        self.kubectl_ns(&[
            "patch",
            "raftcluster",
            CLUSTER,
            "--type=merge",
            "-p",
            &backup.to_string(),
        ])
        .await?;
        let success = self
            .wait_for("status.backup.lastSuccess", || async {
                let json = self.kubectl_ns(&["get", "raftcluster", CLUSTER, "-o", "json"]).await?;
                let cluster: Value = serde_json::from_str(&json)?;
                let backup = &cluster["status"]["backup"];
                if let Some(failure) = backup["lastFailure"]["reason"].as_str() {
                    bail!("a backup failed: {failure}");
                }
                Ok(backup["lastSuccess"].is_object().then(|| backup["lastSuccess"].clone()))
            })
            .await?;
        let object = success["object"].as_str().context("lastSuccess.object")?.to_string();
        let revision = success["revision"].as_u64().context("lastSuccess.revision")?;
        let size = success["size"].as_u64().context("lastSuccess.size")?;
        eprintln!("backup {object}: revision {revision}, {size} bytes");
        // Writes go on past the backup's revision, so that the restore has some to leave out.
        self.wait_for("writes acknowledged above the backup's revision", || async {
            let above = acked
                .lock()
                .expect("acked lock")
                .values()
                .filter(|a| a.revision > revision)
                .count();
            Ok((above >= 5).then_some(()))
        })
        .await?;
        stop.cancel();
        writer.await.context("writer task")?;
        let acked = std::mem::take(&mut *acked.lock().expect("acked lock"));
        let after = acked.values().filter(|a| a.revision > revision).count();
        let before = acked.values().filter(|a| a.revision <= revision).count();
        eprintln!("{before} writes acknowledged at or below the backup's revision, {after} above");
        ensure!(
            before > 0 && after > 0,
            "the writer did not straddle the backup: {before} before, {after} after"
        );
        // The object is in the bucket under its name, whole.
        let stored = s3
            .root()
            .join(BUCKET)
            .join("journey")
            .join(object.rsplit('/').next().unwrap_or_default());
        let on_disk = std::fs::metadata(&stored).with_context(|| format!("{} in the bucket", stored.display()))?;
        ensure!(
            on_disk.len() == size,
            "stored {} bytes, status says {size}",
            on_disk.len()
        );
        // No more backups: the restore below reads this one.
        self.kubectl_ns(&[
            "patch",
            "raftcluster",
            CLUSTER,
            "--type=merge",
            "-p",
            r#"{"spec":{"backup":null}}"#,
        ])
        .await?;
        Ok((acked, object, revision))
    }

    /// Deletes the cluster and its claims, creates it again from `object`, and checks the
    /// acknowledged writes against the backup's `revision`.
    pub async fn restore_from_backup(
        &self,
        s3: &raftkv_e2e::s3::S3Server,
        acked: &BTreeMap<String, Acked>,
        object: &str,
        revision: u64,
    ) -> anyhow::Result<()> {
        let old_cluster_id = self.node_status(&format!("{CLUSTER}-0")).await?.cluster_id;
        self.kubectl_ns(&["delete", "raftcluster", CLUSTER, "--timeout=120s"])
            .await?;
        self.wait_for("the old cluster's pods to go", || async {
            let left = self
                .kubectl_ns(&[
                    "get",
                    "pods",
                    "--selector=app.kubernetes.io/instance=demo",
                    "-o",
                    "name",
                ])
                .await?;
            Ok(left.trim().is_empty().then_some(()))
        })
        .await?;
        self.kubectl_ns(&[
            "delete",
            "pvc",
            "--selector=app.kubernetes.io/instance=demo",
            "--timeout=120s",
        ])
        .await?;
        let manifest = json!({
            "apiVersion": "raftkv.dev/v1alpha1",
            "kind": "RaftCluster",
            "metadata": {"name": CLUSTER},
            "spec": {"replicas": 3, "restore": {
                "from": object,
                "endpoint": s3.endpoint(),
                "region": "us-east-1",
                "allowHttp": true,
                "credentialsSecret": CREDENTIALS,
            }},
        });
        let path = self.backend.scratch_dir().join("restored.json");
        std::fs::write(&path, manifest.to_string())?;
        self.kubectl_ns(&["apply", "-f", &path.to_string_lossy()]).await?;
        self.converged(3, &self.backend.images().node.reference()).await?;
        let json = self.kubectl_ns(&["get", "raftcluster", CLUSTER, "-o", "json"]).await?;
        let cluster: Value = serde_json::from_str(&json)?;
        ensure!(
            cluster["status"]["restore"]["state"] == "Done",
            "status.restore: {}",
            cluster["status"]["restore"]
        );
        let new_cluster_id = self.node_status(&format!("{CLUSTER}-0")).await?.cluster_id;
        ensure!(
            new_cluster_id != old_cluster_id,
            "the restored cluster kept the old cluster id"
        );

        let mut wrong = Vec::new();
        let urls = self.backend.service_urls(&self.namespace, CLUSTER, "client").await?;
        ensure!(!urls.is_empty(), "the restored cluster's Service has no endpoints");
        for (i, (key, write)) in acked.iter().enumerate() {
            let found = self.kv.get(&urls[i % urls.len()], key).await?;
            let expected = (write.revision <= revision).then_some(write.value.as_str());
            if found.as_deref() != expected {
                wrong.push(format!(
                    "{key} (revision {}): read {found:?}, expected {expected:?}",
                    write.revision
                ));
            }
        }
        ensure!(
            wrong.is_empty(),
            "{} of {} writes do not match a backup at revision {revision}: {wrong:?}",
            wrong.len(),
            acked.len()
        );
        // The restored cluster takes writes, at revisions above the backup's.
        let status = self
            .kv
            .put_revision(&urls[0], "after-restore", "yes")
            .await?
            .map_err(|s| anyhow::anyhow!("PUT after the restore: {s}"))?;
        ensure!(
            status > revision,
            "a write after the restore got revision {status} <= {revision}"
        );
        Ok(())
    }
}
