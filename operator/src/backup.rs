//! Backups and restores of a cluster: when a backup is due, which member it streams from, the
//! background run that uploads it, and where a restore stands.
//!
//! A backup is taken by the operator itself: it streams `GET /v1/snapshot` from a healthy member
//! (a follower by preference, so the leader's disk and CPU stay on writes) straight into the
//! object store through `raftkv-backup`, which completes the upload only once the whole stream
//! passed its checksum, then prunes by retention. The run happens in a task of its own, not in
//! the reconcile: a large snapshot takes minutes, and membership steps must not wait for it. Its
//! result is picked up by the next reconcile, which writes it into `status.backup` with the
//! rest of the status, so only one writer ever sets the status.
//!
//! On-demand backups use the `raftkv.dev/backup-now` annotation rather than a `RaftBackup`
//! resource: a backup belongs to one cluster and its result is that cluster's
//! `status.backup`, so an annotation (`kubectl annotate --overwrite`) needs no second CRD,
//! controller, RBAC rule or garbage collection, and the same schedule, destination and
//! retention apply. Any new value of the annotation asks for one backup.
//!
//! A restore is planned here too ([`restore_status`]): a new cluster with `spec.restore`
//! starts with one pod whose init container seeds its volume (`crate::build`), the planner
//! adopts the restored member as the first one, and once the bootstrap is recorded the cluster
//! grows to `replicas` like any other.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Mutex;
use std::time::Instant;

use croner::parser::{CronParser, Seconds};
use croner::Cron;
use futures::TryStreamExt;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::Api;
use kube::runtime::reflector::ObjectRef;
use kube::Client;
use raftkv_api::snapshot::SnapshotMeta;
use raftkv_backup::{Destination, Retention, StoreOptions};
use tracing::{info, warn};

use crate::crd::{
    BackupFailure, BackupSpec, BackupStatus, BackupSuccess, BootstrapRecord, BootstrapState, RaftCluster,
    RaftClusterSpec, RestoreState, RestoreStatus, StoreAccess,
};
use crate::node_client::MemberKind;
use crate::plan::Observed;

/// Annotation asking for one backup now; each new value asks again.
pub const BACKUP_NOW_ANNOTATION: &str = "raftkv.dev/backup-now";
/// Consecutive failures from which `Degraded` says `BackupFailing`. One failure may be a
/// member restarting under the stream; two in a row mean backups are not being taken.
pub const FAILING_AFTER: u32 = 2;

/// Parses a cron schedule: five fields, or six with leading seconds; times are UTC.
pub fn parse_schedule(schedule: &str) -> Result<Cron, String> {
    CronParser::builder()
        .seconds(Seconds::Optional)
        .build()
        .parse(schedule)
        .map_err(|e| format!("backup.schedule {schedule:?} is not a cron schedule: {e}"))
}

/// The object-store options of `access`.
pub fn store_options(access: &StoreAccess) -> StoreOptions {
    StoreOptions {
        endpoint: access.endpoint.clone(),
        region: access.region.clone(),
        allow_http: access.allow_http.unwrap_or(false),
    }
}

/// Checks `spec.backup` and `spec.restore` beyond the schema; the message goes to status.
pub fn validate(spec: &RaftClusterSpec) -> Result<(), String> {
    if let Some(backup) = &spec.backup {
        parse_schedule(&backup.schedule)?;
        Destination::open(&backup.destination, &BTreeMap::new(), &store_options(&backup.access))
            .map_err(|e| format!("backup.destination: {e}"))?;
    }
    if spec.restore.is_some() {
        resolve_restore(spec)?;
    }
    Ok(())
}

/// A restore source: the object URL and how to reach it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RestoreSource {
    /// The backup's object URL.
    pub url: String,
    /// Credentials and endpoint options.
    pub access: StoreAccess,
}

/// Where `spec.restore` reads from: an object URL as given (with the restore's own access
/// settings, else the backup's), or a backup name inside `spec.backup.destination`.
pub fn resolve_restore(spec: &RaftClusterSpec) -> Result<RestoreSource, String> {
    let restore = spec.restore.as_ref().ok_or("no spec.restore")?;
    let from = restore.from.trim();
    let backup_access = spec.backup.as_ref().map(|b| b.access.clone()).unwrap_or_default();
    let source = if from.contains("://") {
        let access = if restore.access == StoreAccess::default() {
            backup_access
        } else {
            restore.access.clone()
        };
        RestoreSource {
            url: from.to_string(),
            access,
        }
    } else {
        let backup = spec.backup.as_ref().ok_or_else(|| {
            format!(
                "restore.from {from:?} is a backup name, which needs backup.destination; give an object URL instead"
            )
        })?;
        if from.contains('/') {
            return Err(format!(
                "restore.from {from:?} is neither an object URL nor a backup name"
            ));
        }
        RestoreSource {
            url: format!("{}/{from}", backup.destination.trim_end_matches('/')),
            access: backup_access,
        }
    };
    raftkv_backup::destination::split_object_url(&source.url).map_err(|e| format!("restore.from: {e}"))?;
    Ok(source)
}

/// Why a backup starts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Trigger {
    /// The schedule came round.
    Schedule,
    /// The `raftkv.dev/backup-now` annotation has a value not acted on yet.
    OnDemand(String),
}

/// Whether a backup is due at `now`: an on-demand request not yet acted on, or a scheduled time
/// passed since the last attempt (or, before any, since the cluster was created). A schedule
/// missed while the operator was down is caught up once, not once per missed slot.
pub fn backup_due(
    schedule: &Cron,
    status: Option<&BackupStatus>,
    created: Timestamp,
    on_demand: Option<&str>,
    now: Timestamp,
) -> Option<Trigger> {
    if let Some(value) = on_demand.filter(|v| !v.is_empty()) {
        if status.and_then(|s| s.on_demand.as_deref()) != Some(value) {
            return Some(Trigger::OnDemand(value.to_string()));
        }
    }
    let since = status.and_then(|s| s.last_attempt.as_ref()).map_or(created, |t| t.0);
    let since = since.to_zoned(k8s_openapi::jiff::tz::TimeZone::UTC);
    let next = schedule.find_next_occurrence(&since, false).ok()?;
    (next.timestamp() <= now).then_some(Trigger::Schedule)
}

/// The member to stream a backup from: a healthy follower whose pod is ready, else the healthy
/// leader; returns its ordinal and admin URL.
pub fn pick_source(observed: &Observed, endpoints: &BTreeMap<u32, String>) -> Option<(u32, String)> {
    let membership = observed.membership.as_ref()?;
    let mut candidates: Vec<(bool, u32)> = membership
        .members
        .iter()
        .filter(|m| m.kind == MemberKind::Voter && m.healthy == Some(true))
        .filter_map(|m| {
            let ordinal = m.ordinal?;
            let pod = observed.pods.get(&ordinal)?;
            (pod.ready && !pod.terminating && endpoints.contains_key(&ordinal))
                .then_some((m.id == membership.leader_id, ordinal))
        })
        .collect();
    candidates.sort();
    let (_, ordinal) = candidates.first()?;
    Some((*ordinal, endpoints[ordinal].clone()))
}

/// Where the restore of a cluster stands after this reconcile.
///
/// A restore is carried out only for a cluster created with it: the first reconcile that sees
/// `spec.restore` decides, and a cluster that already has a StatefulSet, data claims or a
/// bootstrap record holds data, so the restore is refused (and stays refused). Once the
/// restored member's bootstrap is recorded the restore is done.
pub fn restore_status(
    source: Option<&RestoreSource>,
    previous: Option<&RestoreStatus>,
    statefulset_exists: bool,
    claims: &BTreeSet<u32>,
    bootstrap: Option<&BootstrapRecord>,
) -> Option<RestoreStatus> {
    let Some(source) = source else {
        // Without spec.restore only a completed restore is worth remembering.
        return previous.filter(|p| p.state == RestoreState::Done).cloned();
    };
    match previous {
        Some(p) if p.state == RestoreState::Seeding => {
            let done = bootstrap.is_some_and(|b| b.state == BootstrapState::Done);
            Some(RestoreStatus {
                state: if done {
                    RestoreState::Done
                } else {
                    RestoreState::Seeding
                },
                ..p.clone()
            })
        }
        Some(p) => Some(p.clone()),
        None => {
            let mut held = Vec::new();
            if statefulset_exists {
                held.push("its StatefulSet exists".to_string());
            }
            if !claims.is_empty() {
                held.push(format!("data claims of ordinals {claims:?} exist"));
            }
            if bootstrap.is_some() {
                held.push("it was bootstrapped".to_string());
            }
            if held.is_empty() {
                Some(RestoreStatus {
                    from: source.url.clone(),
                    state: RestoreState::Seeding,
                    message: None,
                })
            } else {
                Some(RestoreStatus {
                    from: source.url.clone(),
                    state: RestoreState::Refused,
                    message: Some(format!(
                        "refusing to restore into a cluster that holds data ({}): a restore only seeds a new cluster's empty volumes; delete the cluster and its claims first, or remove spec.restore",
                        held.join(", ")
                    )),
                })
            }
        }
    }
}

/// Whether the StatefulSet must carry the restore's init container: from the first reconcile
/// of a restoring cluster until its restored member's bootstrap is recorded. Afterwards a pod
/// on an empty volume is a member that lost its disk and must join, not restore.
pub fn seeding(restore: Option<&RestoreStatus>) -> bool {
    restore.is_some_and(|r| r.state == RestoreState::Seeding)
}

/// The result of a backup run.
pub type RunResult = Result<BackupSuccess, String>;

/// A backup running in the background.
struct Run {
    /// When it started.
    started: Timestamp,
    /// Why it started.
    trigger: Trigger,
    /// The upload itself.
    handle: tokio::task::JoinHandle<RunResult>,
}

/// The operator's backups in progress, one at most per cluster.
#[derive(Default)]
pub struct BackupRuns {
    /// Runs by cluster.
    runs: Mutex<HashMap<ObjectRef<RaftCluster>, Run>>,
}

/// What a reconcile learns from [`BackupRuns::advance`].
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Advanced {
    /// The new `status.backup`.
    pub status: Option<BackupStatus>,
    /// A run that ended in this reconcile.
    pub finished: Option<RunResult>,
    /// Whether a run is going on (look again soon).
    pub running: bool,
}

/// Everything [`BackupRuns::advance`] looks at.
pub struct BackupInputs<'a> {
    /// The cluster.
    pub cluster: &'a RaftCluster,
    /// Its Kubernetes client, for the credentials Secret.
    pub client: &'a Client,
    /// What the reconcile observed.
    pub observed: &'a Observed,
    /// The pods' admin URLs.
    pub endpoints: &'a BTreeMap<u32, String>,
    /// The HTTP client for a pod's URL: a TLS cluster's trusts its CA and presents the
    /// operator's certificate, as every other call to its nodes does.
    pub http_for: &'a (dyn Fn(&str) -> reqwest::Client + Sync),
    /// The current time.
    pub now: Timestamp,
}

impl BackupRuns {
    /// Collects a finished run into the status, or starts one when it is due.
    pub fn advance(&self, inputs: BackupInputs<'_>) -> Advanced {
        let cluster = inputs.cluster;
        let key = ObjectRef::from_obj(cluster);
        let status = cluster.status.as_ref().and_then(|s| s.backup.clone());
        let mut runs = self.runs.lock().unwrap_or_else(|e| e.into_inner());

        // A run of ours that ended: record it.
        if runs.get(&key).is_some_and(|r| r.handle.is_finished()) {
            let mut run = runs.remove(&key).expect("checked above");
            let result = futures::FutureExt::now_or_never(&mut run.handle)
                .expect("a finished task is ready")
                .unwrap_or_else(|e| Err(format!("the backup task failed: {e}")));
            let mut s = status.unwrap_or_default();
            record(&mut s, run.started, &run.trigger, &result);
            return Advanced {
                status: Some(s),
                finished: Some(result),
                running: false,
            };
        }
        if runs.contains_key(&key) {
            return Advanced {
                status,
                finished: None,
                running: true,
            };
        }
        // A run the status knows of but this process never started: an operator restarted
        // (or another replica lost its lease) in the middle of it.
        if let Some(since) = status.as_ref().and_then(|s| s.in_progress_since.clone()) {
            let mut s = status.unwrap_or_default();
            let result = Err("interrupted: the operator stopped during the backup".to_string());
            record(&mut s, since.0, &Trigger::Schedule, &result);
            return Advanced {
                status: Some(s),
                finished: Some(result),
                running: false,
            };
        }
        let Some(spec) = cluster.spec.backup.as_ref() else {
            return Advanced {
                status,
                finished: None,
                running: false,
            };
        };
        let Ok(schedule) = parse_schedule(&spec.schedule) else {
            return Advanced {
                status,
                finished: None,
                running: false,
            };
        };
        let created = cluster.metadata.creation_timestamp.as_ref().map_or(inputs.now, |t| t.0);
        let on_demand = cluster
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(BACKUP_NOW_ANNOTATION))
            .map(String::as_str);
        let Some(trigger) = backup_due(&schedule, status.as_ref(), created, on_demand, inputs.now) else {
            return Advanced {
                status,
                finished: None,
                running: false,
            };
        };
        let bootstrapped = cluster
            .status
            .as_ref()
            .and_then(|s| s.bootstrap.as_ref())
            .is_some_and(|b| b.state == BootstrapState::Done);
        let source = if bootstrapped {
            pick_source(inputs.observed, inputs.endpoints)
        } else {
            None
        };
        let Some((ordinal, url)) = source else {
            // Nothing healthy to stream from: that is this attempt's failure, reported now
            // rather than retried on every reconcile.
            let mut s = status.unwrap_or_default();
            let result = Err("no healthy member to take the backup from".to_string());
            record(&mut s, inputs.now, &trigger, &result);
            return Advanced {
                status: Some(s),
                finished: Some(result),
                running: false,
            };
        };
        let job = BackupJob {
            client: inputs.client.clone(),
            http: (inputs.http_for)(&url),
            namespace: cluster.metadata.namespace.clone().unwrap_or_default(),
            cluster: cluster.metadata.name.clone().unwrap_or_default(),
            spec: spec.clone(),
            source: url,
            now: inputs.now,
        };
        info!(ordinal, trigger = ?trigger, "starting a backup");
        let handle = tokio::spawn(job.run());
        runs.insert(
            key,
            Run {
                started: inputs.now,
                trigger,
                handle,
            },
        );
        let mut s = status.unwrap_or_default();
        s.in_progress_since = Some(Time(inputs.now));
        Advanced {
            status: Some(s),
            finished: None,
            running: true,
        }
    }

    /// Forgets (and stops) the run of a cluster that is gone.
    pub fn forget(&self, cluster: &ObjectRef<RaftCluster>) {
        if let Some(run) = self.runs.lock().unwrap_or_else(|e| e.into_inner()).remove(cluster) {
            run.handle.abort();
        }
    }
}

/// Writes the outcome of a run that started at `started` into `status`.
pub fn record(status: &mut BackupStatus, started: Timestamp, trigger: &Trigger, result: &RunResult) {
    status.in_progress_since = None;
    status.last_attempt = Some(Time(started));
    if let Trigger::OnDemand(value) = trigger {
        status.on_demand = Some(value.clone());
    }
    match result {
        Ok(success) => {
            status.last_success = Some(success.clone());
            status.consecutive_failures = 0;
        }
        Err(reason) => {
            status.last_failure = Some(BackupFailure {
                time: Time(started),
                reason: reason.clone(),
            });
            status.consecutive_failures = status.consecutive_failures.saturating_add(1);
        }
    }
}

/// The `Degraded` reason and message of failing backups, from [`FAILING_AFTER`] consecutive
/// failures on.
pub fn backup_failing(status: Option<&BackupStatus>) -> Option<(&'static str, String)> {
    let s = status?;
    if s.consecutive_failures < FAILING_AFTER {
        return None;
    }
    let reason = s.last_failure.as_ref().map_or("", |f| f.reason.as_str());
    Some((
        "BackupFailing",
        format!("{} backups in a row failed; the last: {reason}", s.consecutive_failures),
    ))
}

/// One backup: everything the background task needs, owned.
struct BackupJob {
    client: Client,
    http: reqwest::Client,
    namespace: String,
    cluster: String,
    spec: BackupSpec,
    /// The chosen member's admin URL.
    source: String,
    now: Timestamp,
}

impl BackupJob {
    async fn run(self) -> RunResult {
        let started = Instant::now();
        let result = self.take().await;
        match &result {
            Ok(s) => info!(
                cluster = %self.cluster, object = %s.object, revision = s.revision, size = s.size,
                seconds = started.elapsed().as_secs_f64(), "backup taken"
            ),
            Err(reason) => warn!(cluster = %self.cluster, %reason, "backup failed"),
        }
        result
    }

    async fn take(&self) -> RunResult {
        let credentials = match &self.spec.access.credentials_secret {
            Some(name) => secret_data(&self.client, &self.namespace, name).await?,
            None => BTreeMap::new(),
        };
        let dest = Destination::open(&self.spec.destination, &credentials, &store_options(&self.spec.access))
            .map_err(|e| e.to_string())?;
        let uploaded = stream_backup(&self.http, &self.source, &dest, &self.cluster, self.now).await?;
        if let Some(retention) = &self.spec.retention {
            let retention = Retention {
                keep_last: retention.keep_last,
                keep_days: retention.keep_days,
            };
            // A failed prune keeps too many backups, never too few: the backup itself stands.
            if let Err(error) = raftkv_backup::catalog::prune(&dest, &self.cluster, retention, self.now).await {
                warn!(cluster = %self.cluster, %error, "pruning old backups failed");
            }
        }
        Ok(uploaded)
    }
}

/// Streams `GET /v1/snapshot` from the member at `source` into `dest` as a backup of
/// `cluster` taken at `now`.
pub async fn stream_backup(
    http: &reqwest::Client,
    source: &str,
    dest: &Destination,
    cluster: &str,
    now: Timestamp,
) -> RunResult {
    let url = format!("{}/v1/snapshot", source.trim_end_matches('/'));
    let response = http
        .get(&url)
        .send()
        .await
        .map_err(|e| format!("asking {url} for a snapshot: {e}"))?;
    if !response.status().is_success() {
        let code = response.status();
        let body = response.text().await.unwrap_or_default();
        return Err(format!("{url} answered {code}: {}", body.trim()));
    }
    let meta = SnapshotMeta::from_headers(|name| response.headers().get(name)?.to_str().ok())
        .map_err(|e| format!("{url}: {e}"))?;
    let name = raftkv_backup::catalog::object_name(cluster, now, meta.revision);
    let body = response.bytes_stream().map_err(std::io::Error::other);
    let uploaded = raftkv_backup::transfer::upload_snapshot(dest, &name, body, Some(meta.size))
        .await
        .map_err(|e| format!("uploading {}: {e}", dest.object_url(&name)))?;
    Ok(BackupSuccess {
        time: Time(now),
        revision: meta.revision,
        size: uploaded.size,
        object: dest.object_url(&name),
    })
}

/// The keys of the Secret `name`, as strings.
async fn secret_data(client: &Client, namespace: &str, name: &str) -> Result<BTreeMap<String, String>, String> {
    let secrets: Api<Secret> = Api::namespaced(client.clone(), namespace);
    let secret = secrets
        .get(name)
        .await
        .map_err(|e| format!("reading the credentials Secret {name}: {e}"))?;
    let mut data: BTreeMap<String, String> = secret
        .data
        .unwrap_or_default()
        .into_iter()
        .map(|(k, v)| (k, String::from_utf8_lossy(&v.0).into_owned()))
        .collect();
    data.extend(secret.string_data.unwrap_or_default());
    Ok(data)
}

#[cfg(test)]
#[path = "backup_tests.rs"]
mod tests;
