//! The reconciler: one `RaftCluster` through the pipeline validate, read, build, apply,
//! observe, plan, execute, update status.
//!
//! A cluster being deleted is left alone; one whose spec is invalid, or whose names are taken
//! by another owner's objects, gets a status that says so and no other write. The status is
//! written only when it changed, and a Warning Event marks each new reason to be degraded.
//!
//! Only this module (and the [`KubeEffects`] it hands to the executor) talks to the API server;
//! every decision is made by the pure functions of [`crate::build`], [`crate::plan`] and
//! [`crate::status`], and the observation goes through [`crate::observe::observe_and_plan`].

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{PersistentVolumeClaim, Pod, Secret, Service};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::controller::{Action, Config as ControllerConfig, Controller};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::watcher;
use kube::{Client, Resource, ResourceExt};
use serde_json::json;
use tracing::{debug, info, instrument, warn, Span};

use crate::backup::{backup_failing, parse_schedule, restore_status, seeding, BackupInputs, BackupRuns, RunResult};
use crate::build::{
    add_restore_init_container, build, keep_claim_templates, name_conflict, validate, ClusterObjects, NameConflict,
    ValidCluster,
};
use crate::certs::{
    issue_client, issue_client_server, issue_peer, new_cluster_cas, peer_domain, pod_dns_name, APPLICATION_ROLE,
    OPERATOR_ROLE,
};
use crate::config::{OperatorConfig, PeerAddressing, FIELD_MANAGER};
use crate::crd::{
    BackupStatus, BootstrapRecord, BootstrapState, MemberStatus, RaftCluster, RaftClusterStatus, RestoreState,
    RestoreStatus,
};
use crate::execute::{execute, ClusterEffects, Execution, Outcome};
use crate::metrics::Metrics;
use crate::names::{
    ClusterNames, APP_NAME, INSTANCE_LABEL, MANAGED_BY, MANAGED_BY_LABEL, NAME_LABEL, REMOVED_MEMBER_ANNOTATION,
};
use crate::node_client::{HttpNodeClient, NodeApi};
use crate::observe::{claim_ordinals, endpoints, observe_and_plan, pod_facts, removed_member_claims, Inputs, Planned};
use crate::plan::{recreated_statefulset_replicas, Desired, Step, WaitReason};
use crate::status::{cluster_status, degraded_warning, refused_status, Refusal, SpecIssue};
use crate::tls::{
    application_secret_name, build_ca_secret, build_issued_secret, ca_secret_name, issued_secret_names, node_tls,
    plan_generation, read_ca_secret, IssuedSecret, NodeTls, SecretRecord, TlsSecretNames, CERTIFICATE_LABEL,
    ROTATE_ANNOTATION,
};
use crate::{Error, Result};

/// How soon to look again after each kind of outcome (see [`requeue_after`]).
const REQUEUE_AFTER_STEP: Duration = Duration::from_secs(2);
const REQUEUE_WAITING: Duration = Duration::from_secs(5);
const REQUEUE_BLOCKED: Duration = Duration::from_secs(15);
const REQUEUE_CONVERGED: Duration = Duration::from_secs(60);
/// How long the controller waits for a burst of events about one cluster to end.
const DEBOUNCE: Duration = Duration::from_secs(1);
/// Bounds of the error backoff.
const BACKOFF_MIN: Duration = Duration::from_secs(1);
const BACKOFF_MAX: Duration = Duration::from_secs(300);

/// Per-object exponential backoff for failing reconciles, reset by a successful one.
#[derive(Default)]
pub struct Backoff {
    /// Consecutive failed reconciles of each object since its last success.
    failures: Mutex<HashMap<ObjectRef<RaftCluster>, u32>>,
}

impl Backoff {
    /// Records a failure and returns how long to wait: 1 s, doubling, at most 5 minutes.
    pub fn failed(&self, key: ObjectRef<RaftCluster>) -> Duration {
        let mut failures = self.failures.lock().unwrap_or_else(|e| e.into_inner());
        let count = failures.entry(key).or_insert(0);
        let delay = BACKOFF_MIN.saturating_mul(1u32 << (*count).min(16)).min(BACKOFF_MAX);
        *count = count.saturating_add(1);
        delay
    }

    /// Forgets the failures of a reconcile that succeeded.
    pub fn succeeded(&self, key: &ObjectRef<RaftCluster>) {
        self.failures.lock().unwrap_or_else(|e| e.into_inner()).remove(key);
    }
}

/// What every reconcile shares.
pub struct Context<N: NodeApi = HttpNodeClient> {
    /// The Kubernetes client.
    pub client: Client,
    /// The nodes' admin API.
    pub nodes: N,
    /// Operator-wide settings.
    pub config: OperatorConfig,
    /// Prometheus metrics.
    pub metrics: Arc<Metrics>,
    /// Who publishes Events.
    pub reporter: Reporter,
    /// Error backoff per object.
    pub backoff: Backoff,
    /// Backups running in the background.
    pub backups: BackupRuns,
}

impl<N: NodeApi> Context<N> {
    /// A context with fresh metrics and backoff.
    pub fn new(client: Client, nodes: N, config: OperatorConfig, metrics: Arc<Metrics>) -> Self {
        Self {
            client,
            nodes,
            config,
            metrics,
            reporter: Reporter {
                controller: FIELD_MANAGER.into(),
                instance: std::env::var("POD_NAME").ok(),
            },
            backoff: Backoff::default(),
            backups: BackupRuns::default(),
        }
    }
}

fn apply_params() -> PatchParams {
    PatchParams::apply(FIELD_MANAGER).force()
}

fn now() -> Time {
    Time(Timestamp::now())
}

/// Reconciles one `RaftCluster`: validate it, [`read`] its objects, plan the objects
/// ([`plan_objects`]) and [`apply`] them, plan one membership step ([`plan_step`]) and
/// [`execute_step`] it, then [`update_status`].
///
/// The objects are applied before the nodes are asked: a spec change reaches the StatefulSet
/// however slowly the nodes answer.
#[instrument(skip_all, fields(cluster = %cluster.name_any(), namespace = cluster.namespace().unwrap_or_default(), step))]
pub async fn reconcile<N: NodeApi>(cluster: Arc<RaftCluster>, ctx: Arc<Context<N>>) -> Result<Action> {
    // A cluster being deleted is left to the garbage collector. Reconciling it would recreate
    // the children that foreground deletion is removing (and step the membership of a cluster
    // on its way out); the object's final removal ends the watch.
    if cluster.metadata.deletion_timestamp.is_some() {
        debug!("being deleted; nothing to do");
        ctx.backups.forget(&ObjectRef::from_obj(&*cluster));
        return Ok(Action::await_change());
    }
    let _timer = ctx.metrics.reconcile_started();
    let namespace = cluster
        .namespace()
        .ok_or(Error::MissingObjectKey("metadata.namespace"))?;
    let name = cluster.name_any();
    let clusters: Api<RaftCluster> = Api::namespaced(ctx.client.clone(), &namespace);
    let recorder = Recorder::new(ctx.client.clone(), ctx.reporter.clone());

    // Validate: an invalid spec is reported once and then waits for the user to change it.
    let mut valid = match validate(&cluster, &ctx.config) {
        Ok(valid) => valid,
        Err(Error::InvalidSpec(message)) => {
            warn!(%message, "invalid spec");
            let names = ClusterNames::new(&name, &namespace);
            refuse(&clusters, &recorder, &cluster, &names, Refusal::InvalidSpec, &message).await?;
            ctx.backoff.succeeded(&ObjectRef::from_obj(&*cluster));
            return Ok(Action::await_change());
        }
        Err(error) => return Err(error),
    };

    // Read.
    let found = match read(&ctx.client, &valid).await? {
        Ok(found) => found,
        Err(conflict) => {
            warn!(%conflict, "name conflict");
            refuse(
                &clusters,
                &recorder,
                &cluster,
                &valid.names,
                Refusal::NameConflict,
                &conflict.to_string(),
            )
            .await?;
            ctx.backoff.succeeded(&ObjectRef::from_obj(&*cluster));
            // The other object is not ours to watch: look again later.
            return Ok(Action::requeue(REQUEUE_BLOCKED));
        }
    };

    // Certificates first: the pod template names the Secrets it mounts, and the operator needs
    // its own certificate to talk to the nodes.
    let node_tls = match ensure_tls(&ctx, &cluster, &mut valid, &found).await {
        Ok(node_tls) => node_tls,
        // Nothing is applied without the certificates the pods would mount; the status says
        // which Secret is missing until it appears.
        Err(Error::Certificate(message)) => {
            warn!(%message, "certificates unavailable");
            refuse(
                &clusters,
                &recorder,
                &cluster,
                &valid.names,
                Refusal::CertificatesUnavailable,
                &message,
            )
            .await?;
            ctx.backoff.succeeded(&ObjectRef::from_obj(&*cluster));
            return Ok(Action::requeue(REQUEUE_BLOCKED));
        }
        Err(error) => return Err(error),
    };

    // Plan and apply the objects, then plan and execute one membership step.
    let planned_objects = plan_objects(&cluster, &valid, &ctx.config, &found);
    // The restore's decision is recorded before the StatefulSet it shapes exists: a reconcile
    // that stopped after creating it must find the cluster seeding, not holding data.
    let previous_restore = cluster.status.as_ref().and_then(|s| s.restore.as_ref());
    if planned_objects.restore.is_some() && planned_objects.restore.as_ref() != previous_restore {
        let patch = json!({ "status": { "restore": planned_objects.restore } });
        clusters
            .patch_status(&name, &PatchParams::default(), &Patch::Merge(&patch))
            .await?;
    }
    apply(&ctx.client, &valid, &planned_objects.objects, found.pdb_exists).await?;
    let (node_urls, Planned { observed, mut step }) =
        plan_step(&ctx, &cluster, &valid, &found, &planned_objects, node_tls.as_ref()).await?;
    // While seeding, the first member is made by the restore, never by a bootstrap of an
    // empty volume (which would start a second, empty cluster under this name).
    if seeding(planned_objects.restore.as_ref()) && matches!(step, Step::Bootstrap { .. }) {
        step = Step::Wait(WaitReason::PodNotReady(0));
    }
    Span::current().record("step", step.kind());
    let effects = KubeEffects {
        client: ctx.client.clone(),
        cluster: &cluster,
        valid: &valid,
        statefulset: &planned_objects.objects.statefulset,
        recorder: recorder.clone(),
    };
    let execution = execute_step(&ctx, &step, &node_urls, &effects).await?;

    // Backups: collect a finished run, or start a due one.
    let at = now();
    let backups = ctx.backups.advance(BackupInputs {
        cluster: &cluster,
        client: &ctx.client,
        observed: &observed,
        endpoints: &node_urls,
        http_for: &|url: &str| ctx.nodes.http_for(url),
        now: at.0,
    });
    if let Some(result) = &backups.finished {
        report_backup(&ctx, &effects, result).await;
    }

    // Status.
    let bootstrap = execution.bootstrap.as_ref().or(observed.bootstrap.as_ref());
    let restore = restore_status(
        valid.restore.as_ref(),
        planned_objects.restore.as_ref(),
        found.statefulset.is_some(),
        &planned_objects.claims,
        bootstrap,
    );
    let restore_issue = restore
        .as_ref()
        .filter(|r| r.state == RestoreState::Refused)
        .map(|r| SpecIssue {
            reason: "RestoreRefused",
            message: r.message.clone().unwrap_or_default(),
        });
    let backup_issue = backup_failing(backups.status.as_ref()).map(|(reason, message)| SpecIssue { reason, message });
    let issue = planned_objects
        .storage_issue
        .as_ref()
        .or(restore_issue.as_ref())
        .or(backup_issue.as_ref());
    let mut status = cluster_status(
        &valid,
        &observed,
        &step,
        &execution,
        issue,
        cluster.status.as_ref(),
        &at,
    );
    status.backup = backups.status;
    status.restore = restore;
    update_status(&clusters, &recorder, &cluster, &status).await?;
    ctx.backoff.succeeded(&ObjectRef::from_obj(&*cluster));
    let mut requeue = requeue_after(&step, &execution.outcome);
    if backups.running {
        requeue = requeue.min(REQUEUE_WAITING);
    }
    if let Some(next) = next_backup_in(&cluster, status.backup.as_ref(), at.0) {
        requeue = requeue.min(next);
    }
    Ok(Action::requeue(requeue))
}

/// How long until the next scheduled backup (at least a second), when backups are scheduled.
fn next_backup_in(cluster: &RaftCluster, status: Option<&BackupStatus>, now: Timestamp) -> Option<Duration> {
    let schedule = parse_schedule(&cluster.spec.backup.as_ref()?.schedule).ok()?;
    let since = status
        .and_then(|s| s.last_attempt.as_ref())
        .or(cluster.metadata.creation_timestamp.as_ref())
        .map_or(now, |t| t.0)
        .to_zoned(k8s_openapi::jiff::tz::TimeZone::UTC);
    let next = schedule.find_next_occurrence(&since, false).ok()?.timestamp();
    let wait = next
        .duration_since(now)
        .max(k8s_openapi::jiff::SignedDuration::from_secs(1));
    Duration::try_from(wait).ok()
}

/// Counts a finished backup and publishes its Event.
async fn report_backup<N: NodeApi>(ctx: &Context<N>, effects: &KubeEffects<'_>, result: &RunResult) {
    ctx.metrics.backup(result);
    let (reason, note, warning) = match result {
        Ok(b) => (
            "BackupTaken",
            format!("backup {} at revision {} ({} bytes)", b.object, b.revision, b.size),
            false,
        ),
        Err(reason) => ("BackupFailed", format!("backup failed: {reason}"), true),
    };
    // The status carries the outcome; an Event that cannot be written must not fail the reconcile.
    if let Err(error) = effects.publish_event(reason, &note, warning).await {
        warn!(%reason, %error, "could not publish the backup event");
    }
}

/// A cluster's objects as one reconcile found them, before it writes anything.
struct Found {
    /// The StatefulSet, unless it is missing.
    statefulset: Option<StatefulSet>,
    /// Whether the PodDisruptionBudget exists (and is ours: another owner's is a name conflict).
    pdb_exists: bool,
    /// The cluster's pods, by its selector.
    pods: Vec<Pod>,
    /// The cluster's data claims, by its selector.
    claims: Vec<PersistentVolumeClaim>,
}

/// Reads everything a reconcile needs before it writes: the objects it will write over, and the
/// pods and claims that size a StatefulSet that has to be recreated. Stops at the first of
/// those objects that another owner controls, before the pods and claims are listed.
async fn read(client: &Client, valid: &ValidCluster) -> Result<std::result::Result<Found, NameConflict>> {
    let namespace = &valid.names.namespace;
    let statefulsets: Api<StatefulSet> = Api::namespaced(client.clone(), namespace);
    let services: Api<Service> = Api::namespaced(client.clone(), namespace);
    let pdbs: Api<PodDisruptionBudget> = Api::namespaced(client.clone(), namespace);
    let existing = statefulsets.get_opt(valid.names.statefulset()).await?;
    let peer_service = services.get_opt(&valid.names.peer_service()).await?;
    let client_service = services.get_opt(valid.names.client_service()).await?;
    let pdb = pdbs.get_opt(valid.names.pdb()).await?;

    // Refuse to write over another owner's objects: a cluster named `x-peer` would otherwise take
    // over cluster `x`'s headless Service (the CRD forbids such names; older objects or a
    // missing validation may still let one through).
    let existing_metas: Vec<(&'static str, &ObjectMeta)> = [
        ("StatefulSet", existing.as_ref().map(|o| &o.metadata)),
        ("Service", peer_service.as_ref().map(|o| &o.metadata)),
        ("Service", client_service.as_ref().map(|o| &o.metadata)),
        ("PodDisruptionBudget", pdb.as_ref().map(|o| &o.metadata)),
    ]
    .into_iter()
    .filter_map(|(kind, meta)| Some((kind, meta?)))
    .collect();
    if let Some(conflict) = name_conflict(valid, &existing_metas) {
        return Ok(Err(conflict));
    }

    let selector = valid.names.selector_string();
    let list = ListParams::default().labels(&selector);
    let pods: Api<Pod> = Api::namespaced(client.clone(), namespace);
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), namespace);
    let pod_list = pods.list(&list).await?;
    let claim_list = claims.list(&list).await?;
    Ok(Ok(Found {
        statefulset: existing,
        pdb_exists: pdb.is_some(),
        pods: pod_list.items,
        claims: claim_list.items,
    }))
}

/// The objects a reconcile applies, and what it decided on the way.
struct PlannedObjects {
    /// Where the restore stands, decided before anything is applied.
    restore: Option<RestoreStatus>,
    /// The StatefulSet's replica count: the existing one's, or the size a missing one is
    /// recreated with.
    statefulset_replicas: u32,
    /// Ordinals of the cluster's live data claims.
    claims: BTreeSet<u32>,
    /// Everything to apply.
    objects: ClusterObjects,
    /// A storage change the existing claim templates refuse, for the status.
    storage_issue: Option<SpecIssue>,
}

/// Decides the replica count and builds the objects to apply.
///
/// The StatefulSet's replica count is the operator's own record of how many pods the membership
/// has been prepared for; a missing StatefulSet comes back at a size that keeps every member's
/// pod (see [`recreated_statefulset_replicas`]). An existing StatefulSet keeps its claim
/// templates whatever the spec says.
fn plan_objects(cluster: &RaftCluster, valid: &ValidCluster, config: &OperatorConfig, found: &Found) -> PlannedObjects {
    let claims = claim_ordinals(&valid.names, &found.claims);
    let previous_restore = cluster.status.as_ref().and_then(|s| s.restore.as_ref());
    let restore = restore_status(
        valid.restore.as_ref(),
        previous_restore,
        // A StatefulSet this cluster's restore created does not mean the cluster holds data.
        found.statefulset.is_some() && !seeding(previous_restore),
        &if seeding(previous_restore) {
            BTreeSet::new()
        } else {
            claims.clone()
        },
        cluster.status.as_ref().and_then(|s| s.bootstrap.as_ref()),
    );
    let seeding_now = seeding(restore.as_ref());
    let statefulset_replicas = match found.statefulset.as_ref() {
        Some(statefulset) => statefulset.spec.replicas.map_or(valid.replicas(), |r| r.max(0) as u32),
        // A restoring cluster starts with its first pod only: it is seeded from the backup and
        // becomes the first member; the others join it once its bootstrap is recorded.
        None if seeding_now => 1,
        None => {
            let bootstrapped = cluster
                .status
                .as_ref()
                .and_then(|s| s.bootstrap.as_ref())
                .is_some_and(|b| b.state == BootstrapState::Done);
            let member_ordinals = previous_members(cluster)
                .iter()
                .filter_map(|m| valid.names.pod_ordinal(m.pod.as_deref()?));
            let replicas = recreated_statefulset_replicas(valid.replicas(), bootstrapped, member_ordinals, &claims);
            if bootstrapped {
                warn!(replicas, "the StatefulSet is missing; recreating it");
            }
            replicas
        }
    };
    let mut objects = build(valid, config, statefulset_replicas);
    if let (true, Some(source)) = (seeding_now, valid.restore.as_ref()) {
        add_restore_init_container(&mut objects.statefulset, valid, config, source);
    }
    let storage_issue = found
        .statefulset
        .as_ref()
        .and_then(|existing| keep_claim_templates(&mut objects.statefulset, existing))
        .map(|mismatch| SpecIssue {
            reason: "StorageImmutable",
            message: mismatch.to_string(),
        });
    if let Some(issue) = &storage_issue {
        warn!(message = %issue.message, "storage change refused");
    }
    PlannedObjects {
        restore,
        statefulset_replicas,
        claims,
        objects,
        storage_issue,
    }
}

/// The members the last written status recorded.
fn previous_members(cluster: &RaftCluster) -> &[MemberStatus] {
    cluster.status.as_ref().map_or(&[][..], |s| &s.members[..])
}

/// Observes the pods and nodes and plans one membership step; returns the nodes' endpoints
/// with the plan, for the execution.
async fn plan_step<N: NodeApi>(
    ctx: &Context<N>,
    cluster: &RaftCluster,
    valid: &ValidCluster,
    found: &Found,
    planned_objects: &PlannedObjects,
    node_tls: Option<&NodeTls>,
) -> Result<(BTreeMap<u32, String>, Planned)> {
    let update_revision = found
        .statefulset
        .as_ref()
        .and_then(|s| s.status.as_ref()?.update_revision.as_deref());
    let facts: Vec<_> = found
        .pods
        .iter()
        .filter_map(|p| pod_facts(&valid.names, p, update_revision))
        .collect();
    let node_urls = match node_tls {
        None => endpoints(&ctx.config, &facts),
        Some(tls) => {
            // Over TLS a node is named by its pod's DNS name, the name its certificate carries;
            // the client resolves it to the pod IP it is given here.
            let domain = peer_domain(&valid.names);
            let pods: BTreeMap<u32, (String, std::net::IpAddr)> = facts
                .iter()
                .filter_map(|p| {
                    let ip = p.ip.as_deref()?.parse().ok()?;
                    Some((p.ordinal, (pod_dns_name(&valid.names, p.ordinal), ip)))
                })
                .collect();
            let addresses = pods.values().cloned().collect();
            ctx.nodes.use_tls(&domain, tls, &addresses)?;
            pods.into_iter()
                .map(|(ordinal, (name, _))| (ordinal, ctx.config.tls_node_url(&name)))
                .collect()
        }
    };
    let removed_member_claims = removed_member_claims(&valid.names, &found.claims);
    let inputs = Inputs {
        names: &valid.names,
        statefulset_replicas: planned_objects.statefulset_replicas,
        pods: &facts,
        endpoints: &node_urls,
        claims: &planned_objects.claims,
        removed_member_claims: &removed_member_claims,
        bootstrap: cluster.status.as_ref().and_then(|s| s.bootstrap.as_ref()),
        previous_members: previous_members(cluster),
    };
    let desired = Desired {
        replicas: valid.replicas(),
        max_lag: valid.max_lag(),
    };
    let planned = observe_and_plan(inputs, &desired, &ctx.nodes).await;
    Ok((node_urls, planned))
}

/// Makes sure the certificate Secrets of a TLS cluster exist and points `valid` at the ones
/// the pods are to mount; returns what the node client needs, or `None` without TLS.
///
/// User-provided Secrets are only read. For issued certificates the CA Secret is created once,
/// the server and peer Secrets are issued generation by generation (see
/// [`crate::tls::plan_generation`]), and the operator's and the applications' client
/// certificates are replaced in place when due.
async fn ensure_tls<N: NodeApi>(
    ctx: &Context<N>,
    cluster: &RaftCluster,
    valid: &mut ValidCluster,
    found: &Found,
) -> Result<Option<NodeTls>> {
    let Some(tls) = valid.tls.as_mut() else {
        return Ok(None);
    };
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), &valid.names.namespace);
    if let Some(lifetime_hours) = tls.issued_lifetime_hours {
        let snapshot = ValidCluster {
            tls: None,
            ..valid.clone()
        };
        // Members that advertise their pod IP are verified by their peers against it, so the
        // certificates name those IPs; with DNS addressing they name DNS names only.
        let pod_ips: BTreeSet<std::net::IpAddr> = match ctx.config.peer_addressing {
            PeerAddressing::Dns => BTreeSet::new(),
            PeerAddressing::PodIp => found
                .pods
                .iter()
                .filter_map(|p| p.status.as_ref()?.pod_ip.as_deref()?.parse().ok())
                .collect(),
        };
        let names = ensure_issued(&secrets, cluster, &snapshot, lifetime_hours, &pod_ips).await?;
        if let Some(tls) = valid.tls.as_mut() {
            tls.secrets = names;
        }
    }
    let names = &valid
        .tls
        .as_ref()
        .map(|t| t.secrets.clone())
        .unwrap_or_else(|| issued_secret_names(&valid.names, 1));
    let missing = |name: &str| Error::Certificate(format!("Secret {name} does not exist"));
    let client_secret = secrets
        .get_opt(&names.client)
        .await?
        .ok_or_else(|| missing(&names.client))?;
    let operator_secret = secrets
        .get_opt(&names.operator)
        .await?
        .ok_or_else(|| missing(&names.operator))?;
    Ok(Some(node_tls(&client_secret, &operator_secret)?))
}

/// The issued-certificate side of [`ensure_tls`]; returns the Secrets of the generation the pods
/// are to mount.
async fn ensure_issued(
    secrets: &Api<Secret>,
    cluster: &RaftCluster,
    valid: &ValidCluster,
    lifetime_hours: u32,
    pod_ips: &BTreeSet<std::net::IpAddr>,
) -> Result<TlsSecretNames> {
    let names = &valid.names;
    let now = Timestamp::now();
    let rotation = cluster.annotations().get(ROTATE_ANNOTATION).map(String::as_str);
    let ca_name = ca_secret_name(names);
    let cas = match secrets.get_opt(&ca_name).await? {
        Some(secret) => read_ca_secret(&secret)?,
        None => {
            let cas = new_cluster_cas(names, now)?;
            // Created, never applied: another writer's CA (an operator replica that raced this
            // one) must not be replaced, or the certificates it issued would chain to nothing.
            match secrets
                .create(&PostParams::default(), &build_ca_secret(valid, &cas))
                .await
            {
                Ok(_) => {
                    info!(secret = %ca_name, "created the cluster's CAs");
                    cas
                }
                Err(kube::Error::Api(status)) if status.code == 409 => read_ca_secret(&secrets.get(&ca_name).await?)?,
                Err(error) => return Err(error.into()),
            }
        }
    };
    let selector = format!("{},{CERTIFICATE_LABEL}", names.selector_string());
    let found: Vec<IssuedSecret> = secrets
        .list(&ListParams::default().labels(&selector))
        .await?
        .items
        .iter()
        .filter_map(IssuedSecret::read)
        .collect();
    let plan = plan_generation(&found, rotation, now);
    let current = issued_secret_names(names, plan.current);
    // With pod-IP addressing a new pod's IP is known only once it runs; the current generation
    // is then re-issued in place to name it, and the nodes reload the updated files. This is the
    // one change ever made to a written generation, and only in the simulated environments
    // pod-IP addressing is meant for.
    let uncovered = !plan.issue
        && found
            .iter()
            .filter(|s| s.generation == Some(plan.current))
            .any(|s| !s.ips.is_superset(pod_ips));
    if plan.issue || uncovered {
        let ips: Vec<std::net::IpAddr> = pod_ips.iter().copied().collect();
        let server = issue_client_server(names, &cas, now, lifetime_hours, &ips)?;
        let peer = issue_peer(names, &cas, now, lifetime_hours, &ips)?;
        let record = SecretRecord {
            generation: Some(plan.current),
            rotation,
            ips: &ips,
        };
        let built = [
            build_issued_secret(valid, &current.client, "client", &server, record),
            build_issued_secret(valid, &current.peer, "peer", &peer, record),
        ];
        for secret in built {
            if plan.issue {
                // Each generation is written once: pods still on the previous one keep exactly
                // the files they started with while the rollout reaches them.
                secrets.create(&PostParams::default(), &secret).await?;
            } else {
                let name = secret.metadata.name.clone().unwrap_or_default();
                secrets.patch(&name, &apply_params(), &Patch::Apply(&secret)).await?;
            }
        }
        info!(generation = plan.current, not_after = %server.not_after, ips = ?ips, "issued certificates");
    }
    for name in &plan.delete {
        delete_if_present(secrets, name).await?;
        info!(secret = %name, "deleted a superseded certificate");
    }
    let clients = [
        (
            current.operator.clone(),
            "operator",
            "raftkv-operator".to_string(),
            OPERATOR_ROLE,
        ),
        (
            application_secret_name(names),
            "application",
            format!("{}-client", names.cluster),
            APPLICATION_ROLE,
        ),
    ];
    for (name, certificate, user, role) in clients {
        let existing = found.iter().find(|s| s.name == name);
        if existing.is_none_or(|s| s.needs_replacing(rotation, now)) {
            let issued = issue_client(names, &cas, &user, role, now, lifetime_hours)?;
            let record = SecretRecord {
                rotation,
                ..SecretRecord::default()
            };
            let secret = build_issued_secret(valid, &name, certificate, &issued, record);
            secrets.patch(&name, &apply_params(), &Patch::Apply(&secret)).await?;
            info!(secret = %name, role, "issued a client certificate");
        }
    }
    Ok(current)
}

/// Carries out `step` and counts it by its outcome.
async fn execute_step<N: NodeApi>(
    ctx: &Context<N>,
    step: &Step,
    node_urls: &BTreeMap<u32, String>,
    effects: &KubeEffects<'_>,
) -> Result<Execution> {
    if let Step::Blocked(reason) = step {
        warn!(reason = reason.reason(), detail = %reason, "membership step refused");
    }
    let execution = execute(step, node_urls, &ctx.nodes, effects).await?;
    let outcome = match &execution.outcome {
        Outcome::Applied => "applied",
        Outcome::Deferred { .. } => "deferred",
        Outcome::Nothing => "none",
    };
    ctx.metrics.step(step.kind(), outcome);
    Ok(execution)
}

/// How soon to look again after `step` ended with `outcome`.
fn requeue_after(step: &Step, outcome: &Outcome) -> Duration {
    match (step, outcome) {
        (_, Outcome::Applied) => REQUEUE_AFTER_STEP,
        (Step::Converged, _) => REQUEUE_CONVERGED,
        (Step::Blocked(_), _) => REQUEUE_BLOCKED,
        _ => REQUEUE_WAITING,
    }
}

/// Backs off a failing object exponentially and counts the failure.
pub fn error_policy<N: NodeApi>(cluster: Arc<RaftCluster>, error: &Error, ctx: Arc<Context<N>>) -> Action {
    ctx.metrics.reconcile_failed(error);
    let delay = ctx.backoff.failed(ObjectRef::from_obj(&*cluster));
    warn!(cluster = %cluster.name_any(), %error, retry_in = ?delay, "reconcile failed");
    Action::requeue(delay)
}

/// Applies `status` unless `cluster` already has it. Every status write is a change of the
/// object, which the controller's own watch turns into another reconcile: writing an unchanged
/// status would keep the cluster reconciling for nothing.
async fn write_status(api: &Api<RaftCluster>, cluster: &RaftCluster, status: &RaftClusterStatus) -> Result<()> {
    if cluster.status.as_ref() == Some(status) {
        debug!("status unchanged; not written");
        return Ok(());
    }
    let patch = json!({
        "apiVersion": RaftCluster::api_version(&()),
        "kind": RaftCluster::kind(&()),
        "status": status,
    });
    api.patch_status(&cluster.name_any(), &apply_params(), &Patch::Apply(&patch))
        .await?;
    Ok(())
}

/// Writes the status a refused cluster gets, with a warning when the refusal is new.
async fn refuse(
    clusters: &Api<RaftCluster>,
    recorder: &Recorder,
    cluster: &RaftCluster,
    names: &ClusterNames,
    refusal: Refusal,
    message: &str,
) -> Result<()> {
    let status = refused_status(
        names,
        cluster.metadata.generation,
        refusal,
        message,
        cluster.status.as_ref(),
        &now(),
    );
    update_status(clusters, recorder, cluster, &status).await
}

/// Writes `status` (when it changed) and warns when it is newly degraded.
async fn update_status(
    clusters: &Api<RaftCluster>,
    recorder: &Recorder,
    cluster: &RaftCluster,
    status: &RaftClusterStatus,
) -> Result<()> {
    write_status(clusters, cluster, status).await?;
    warn_when_degraded(recorder, cluster, status).await;
    Ok(())
}

/// Publishes a Warning Event when `status` is newly degraded, or degraded for another reason
/// than the status `cluster` had: people and alerting watch Events, and a refused step or an
/// invalid spec otherwise shows only in a condition. Once per change, not per reconcile, so a
/// cluster that stays blocked does not flood the namespace.
async fn warn_when_degraded(recorder: &Recorder, cluster: &RaftCluster, status: &RaftClusterStatus) {
    let Some(warning) = degraded_warning(cluster.status.as_ref(), status) else {
        return;
    };
    let event = Event {
        type_: EventType::Warning,
        reason: warning.reason.clone(),
        note: Some(warning.note),
        action: "Reconcile".into(),
        secondary: None,
    };
    // The status already says it; an Event that cannot be written must not fail the reconcile.
    if let Err(error) = recorder.publish(&event, &cluster.object_ref(&())).await {
        warn!(reason = %warning.reason, %error, "could not publish the warning");
    }
}

/// Server-side applies every object; removes the PDB (`pdb_exists`, and ours: checked by the
/// caller) when the spec no longer wants one.
async fn apply(client: &Client, cluster: &ValidCluster, objects: &ClusterObjects, pdb_exists: bool) -> Result<()> {
    let ns = &cluster.names.namespace;
    let services: Api<Service> = Api::namespaced(client.clone(), ns);
    let statefulsets: Api<StatefulSet> = Api::namespaced(client.clone(), ns);
    let pdbs: Api<PodDisruptionBudget> = Api::namespaced(client.clone(), ns);
    let params = apply_params();
    services
        .patch(
            &cluster.names.peer_service(),
            &params,
            &Patch::Apply(&objects.peer_service),
        )
        .await?;
    services
        .patch(
            cluster.names.client_service(),
            &params,
            &Patch::Apply(&objects.client_service),
        )
        .await?;
    statefulsets
        .patch(
            cluster.names.statefulset(),
            &params,
            &Patch::Apply(&objects.statefulset),
        )
        .await?;
    match &objects.pdb {
        Some(pdb) => {
            pdbs.patch(cluster.names.pdb(), &params, &Patch::Apply(pdb)).await?;
        }
        None if pdb_exists => delete_if_present(&pdbs, cluster.names.pdb()).await?,
        None => {}
    }
    let policies: Api<NetworkPolicy> = Api::namespaced(client.clone(), ns);
    match (&objects.network_policy, &cluster.spec.network_policy) {
        (Some(policy), _) => {
            policies
                .patch(cluster.names.network_policy(), &params, &Patch::Apply(policy))
                .await?;
        }
        // `enabled: false` removes the policy the operator wrote; with no field at all nothing
        // is asked, so clusters without policies cost no extra call.
        (None, Some(_)) => {
            if let Some(existing) = policies.get_opt(cluster.names.network_policy()).await? {
                if name_conflict(cluster, &[("NetworkPolicy", &existing.metadata)]).is_none() {
                    delete_if_present(&policies, cluster.names.network_policy()).await?;
                }
            }
        }
        (None, None) => {}
    }
    Ok(())
}

async fn delete_if_present<K>(api: &Api<K>, name: &str) -> Result<()>
where
    K: Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    match api.delete(name, &DeleteParams::default()).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(status)) if status.code == 404 => Ok(()),
        Err(error) => Err(error.into()),
    }
}

/// The Kubernetes side of membership steps, for one cluster.
pub struct KubeEffects<'a> {
    /// The Kubernetes client the writes go through.
    client: Client,
    /// The cluster being reconciled; Events are published about it.
    cluster: &'a RaftCluster,
    /// Its validated spec, for the names of the objects a step writes.
    valid: &'a ValidCluster,
    /// The StatefulSet as this reconcile applied it; a scale step changes only its replicas.
    statefulset: &'a StatefulSet,
    /// Publishes the step's Events.
    recorder: Recorder,
}

impl ClusterEffects for KubeEffects<'_> {
    async fn scale_statefulset(&self, replicas: u32) -> Result<()> {
        // The whole object is applied, not just `replicas`: an apply that omitted the other
        // fields would drop this manager's ownership of them, and so the fields themselves.
        // It is the object applied at the start of this reconcile, claim templates included.
        let mut statefulset = self.statefulset.clone();
        statefulset.spec.replicas = Some(i32::try_from(replicas).unwrap_or(i32::MAX));
        let api: Api<StatefulSet> = Api::namespaced(self.client.clone(), &self.valid.names.namespace);
        api.patch(
            self.valid.names.statefulset(),
            &apply_params(),
            &Patch::Apply(&statefulset),
        )
        .await?;
        info!(replicas, "statefulset scaled");
        Ok(())
    }

    async fn delete_claim(&self, ordinal: u32) -> Result<()> {
        let api: Api<PersistentVolumeClaim> = Api::namespaced(self.client.clone(), &self.valid.names.namespace);
        delete_if_present(&api, &self.valid.names.pvc(ordinal)).await
    }

    async fn mark_claim_removed(&self, ordinal: u32, member_id: u64) -> Result<()> {
        let api: Api<PersistentVolumeClaim> = Api::namespaced(self.client.clone(), &self.valid.names.namespace);
        let patch = json!({
            "metadata": { "annotations": { REMOVED_MEMBER_ANNOTATION: member_id.to_string() } }
        });
        match api
            .patch(
                &self.valid.names.pvc(ordinal),
                &PatchParams::default(),
                &Patch::Merge(&patch),
            )
            .await
        {
            Ok(_) => Ok(()),
            // No claim, no volume to mark: the member's pod never got one.
            Err(kube::Error::Api(status)) if status.code == 404 => Ok(()),
            Err(error) => Err(error.into()),
        }
    }

    async fn delete_pod(&self, ordinal: u32) -> Result<()> {
        let api: Api<Pod> = Api::namespaced(self.client.clone(), &self.valid.names.namespace);
        delete_if_present(&api, &self.valid.names.pod(ordinal)).await
    }

    async fn record_bootstrap(&self, record: &BootstrapRecord) -> Result<()> {
        // A merge patch touches only `status.bootstrap`: the rest of the status is applied at
        // the end of the reconcile, and this write must not wait for it.
        let api: Api<RaftCluster> = Api::namespaced(self.client.clone(), &self.valid.names.namespace);
        let patch = json!({ "status": { "bootstrap": record } });
        api.patch_status(
            &self.valid.names.cluster,
            &PatchParams::default(),
            &Patch::Merge(&patch),
        )
        .await?;
        Ok(())
    }

    async fn publish_event(&self, reason: &str, note: &str, warning: bool) -> Result<()> {
        let event = Event {
            type_: if warning { EventType::Warning } else { EventType::Normal },
            reason: reason.into(),
            note: Some(note.into()),
            action: "Reconcile".into(),
            secondary: None,
        };
        self.recorder.publish(&event, &self.cluster.object_ref(&())).await?;
        Ok(())
    }
}

/// Runs the controller until a signal arrives; then lets running reconciles finish.
///
/// Losing the leader-election Lease is not a reason to finish them: the caller aborts this task
/// instead (see [`crate::leader::while_leading`]).
pub async fn run<N: NodeApi + 'static>(ctx: Arc<Context<N>>) {
    let client = ctx.client.clone();
    let clusters: Api<RaftCluster> = Api::all(client.clone());
    let owned = watcher::Config::default().labels(&format!("{MANAGED_BY_LABEL}={MANAGED_BY}"));
    // Pods are owned by the StatefulSet, not by the RaftCluster; they are watched so that a pod
    // turning ready (a learner caught up, a restarted member back) triggers the next step.
    let pods = watcher::Config::default().labels(&format!("{NAME_LABEL}={APP_NAME}"));
    Controller::new(clusters, watcher::Config::default().any_semantic())
        // Pods of one cluster change in bursts (a rollout, a scale-up): one reconcile after the
        // burst does what one per event would, without the API and node calls of the rest.
        .with_config(ControllerConfig::default().debounce(DEBOUNCE))
        .owns(Api::<StatefulSet>::all(client.clone()), owned.clone())
        .owns(Api::<Service>::all(client.clone()), owned)
        .watches(Api::<Pod>::all(client), pods, |pod: Pod| {
            let instance = pod.labels().get(INSTANCE_LABEL)?.clone();
            let namespace = pod.namespace()?;
            Some(ObjectRef::<RaftCluster>::new(&instance).within(&namespace))
        })
        .shutdown_on_signal()
        .run(reconcile, error_policy, ctx)
        .for_each(|result| async move {
            if let Err(error) = result {
                warn!(%error, "controller event");
            }
        })
        .await;
}

#[cfg(test)]
#[path = "reconcile_tests.rs"]
mod tests;
