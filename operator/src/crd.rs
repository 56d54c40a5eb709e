//! The `RaftCluster` custom resource (`raftkv.dev/v1alpha1`).
//!
//! The spec says what the user wants (how many voters, which image, how much disk); the status
//! reports what the operator observed and did, including the bootstrap record that guarantees a
//! cluster is bootstrapped at most once. The OpenAPI schema, with its validation rules, printer
//! columns and scale subresource, is derived from these types; `crdgen` prints it and CI compares
//! the output with `crds/raftclusters.raftkv.dev.yaml`.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Affinity, ResourceRequirements, Toleration};
use k8s_openapi::api::networking::v1::NetworkPolicyPeer;
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// The API group of the resource.
pub const GROUP: &str = "raftkv.dev";
/// The API version of the resource.
pub const VERSION: &str = "v1alpha1";
/// The largest cluster the operator manages. Beyond nine voters every write waits for five
/// acknowledgements, and failure tolerance no longer grows enough to pay for that.
pub const MAX_REPLICAS: i32 = 9;

/// A replicated raftkv key-value store: a StatefulSet of `raftkv-node` pods whose Raft membership
/// the operator keeps equal to `replicas` voters.
// Printer columns of the same type repeat `type_ = "..."`, which clippy's attribute lint takes
// for a duplicated attribute; they are distinct columns.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "raftkv.dev",
    version = "v1alpha1",
    kind = "RaftCluster",
    namespaced,
    status = "RaftClusterStatus",
    shortname = "rkv",
    category = "raftkv",
    doc = "A replicated raftkv key-value store managed by raftkv-operator",
    // The client Service is named after the cluster and the peer Service after the cluster plus
    // `-peer`, so a cluster named `x-peer` would take over the headless Service of cluster `x`.
    validation = Rule::new("!self.metadata.name.endsWith('-peer')").message(
        "metadata.name must not end with '-peer': the operator names each cluster's headless peer Service <name>-peer, so this name would collide with another cluster's"
    ),
    // A restore seeds the volumes of a new cluster; added to a cluster that exists, it would
    // mean overwriting data. It can be removed (to clear a refusal) but not added or changed.
    validation = Rule::new("!has(self.spec.restore) || (has(oldSelf.spec.restore) && oldSelf.spec.restore == self.spec.restore)").message(
        "spec.restore can only be set when the RaftCluster is created: a restore seeds a new cluster's empty volumes and never overwrites a cluster's data"
    ),
    scale(
        spec_replicas_path = ".spec.replicas",
        status_replicas_path = ".status.replicas",
        label_selector_path = ".status.selector"
    )
)]
#[kube(printcolumn(
    name = "Replicas",
    type_ = "integer",
    json_path = ".spec.replicas",
    description = "Desired number of Raft voters"
))]
#[kube(printcolumn(
    name = "Ready",
    type_ = "integer",
    json_path = ".status.readyReplicas",
    description = "Voters that are ready and caught up"
))]
#[kube(printcolumn(
    name = "Leader",
    type_ = "string",
    json_path = ".status.leader",
    description = "Pod of the current Raft leader"
))]
#[kube(printcolumn(
    name = "Phase",
    type_ = "string",
    json_path = ".status.phase",
    description = "What the operator is doing"
))]
#[kube(printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp"))]
#[serde(rename_all = "camelCase")]
pub struct RaftClusterSpec {
    /// Number of Raft voters, 1 to 9. Odd counts are recommended: an even count tolerates no
    /// more failures than the odd count below it, so it is accepted but flagged in status.
    #[serde(default = "default_replicas")]
    #[schemars(
        range(min = 1, max = 9),
        extend("x-kubernetes-validations" = [{
            "rule": "self >= 1 && self <= 9",
            "message": "replicas must be between 1 and 9 (odd counts recommended: 1, 3, 5, 7 or 9)"
        }])
    )]
    pub replicas: i32,

    /// Container image of `raftkv-node`. When omitted, the operator's `--default-image` is used.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1))]
    pub image: Option<String>,

    /// Image pull policy of the node container (`Always`, `IfNotPresent`, `Never`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("enum" = ["Always", "IfNotPresent", "Never"]))]
    pub image_pull_policy: Option<String>,

    /// Each member's persistent volume, holding its identity, write-ahead log and snapshots.
    /// Fixed once the cluster exists: a StatefulSet's volume claim templates cannot change.
    #[serde(default)]
    #[schemars(extend("x-kubernetes-validations" = [{
        "rule": "self == oldSelf",
        "message": "storage cannot change once the cluster exists: the StatefulSet's volume claim templates are immutable; create a new RaftCluster for another size or storage class"
    }]))]
    pub storage: StorageSpec,

    /// CPU and memory requests and limits of the node container.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,

    /// Pod affinity rules. When omitted, pods of one cluster prefer different nodes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub affinity: Option<Affinity>,

    /// Pod tolerations.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tolerations: Option<Vec<Toleration>>,

    /// Node selector for the pods.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_selector: Option<BTreeMap<String, String>>,

    /// Raft tuning. Every field has a safe default in the node; set one only with a reason.
    #[serde(default)]
    pub raft: RaftTuning,

    /// TLS on the client and peer ports, and client authentication by certificate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<TlsSpec>,

    /// A NetworkPolicy for the cluster's pods: peer traffic only between them, client traffic
    /// only from where this says.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network_policy: Option<NetworkPolicySpec>,

    /// Scheduled backups of the cluster's data to object storage.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backup: Option<BackupSpec>,

    /// Seed a new cluster from a backup: its first member starts from the snapshot, then the
    /// cluster grows to `replicas`. Only at creation: a cluster that holds data is never
    /// restored into.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restore: Option<RestoreSpec>,
}

/// Where backups go and how often.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BackupSpec {
    /// When to take a backup, in cron syntax (`minute hour day-of-month month day-of-week`,
    /// UTC; an optional leading seconds field is accepted), such as `0 */6 * * *`.
    #[schemars(length(min = 1))]
    pub schedule: String,

    /// The folder backups are written to: `s3://bucket/prefix`, `gs://bucket/prefix`,
    /// `az://container/prefix`, or `file:///path` (a volume mounted into the operator).
    #[schemars(length(min = 1))]
    pub destination: String,

    /// How to reach the store: credentials and S3-compatible endpoint options.
    #[serde(flatten)]
    pub access: StoreAccess,

    /// Which backups to keep; without it every backup is kept.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retention: Option<RetentionSpec>,
}

/// How to reach an object store.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct StoreAccess {
    /// A Secret in the cluster's namespace whose keys are object-store settings by their
    /// environment names: `AWS_ACCESS_KEY_ID` and `AWS_SECRET_ACCESS_KEY`,
    /// `GOOGLE_SERVICE_ACCOUNT_KEY`, `AZURE_STORAGE_ACCOUNT_NAME` and
    /// `AZURE_STORAGE_ACCOUNT_KEY`, ... Not needed for `file://` destinations.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credentials_secret: Option<String>,

    /// Endpoint of an S3-compatible server, such as `http://minio.storage:9000`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,

    /// Region of the bucket.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub region: Option<String>,

    /// Allow plain HTTP to `endpoint`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allow_http: Option<bool>,
}

/// Which backups to keep. A backup is kept when either rule keeps it, and the newest is
/// always kept.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RetentionSpec {
    /// Keep the newest N backups.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub keep_last: Option<u32>,

    /// Keep backups younger than D days.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub keep_days: Option<u32>,
}

/// The backup a new cluster starts from.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RestoreSpec {
    /// An object URL (`s3://bucket/prefix/demo-20261202T061500Z-r1234.rkvsnap`), or the name
    /// of a backup object in `spec.backup.destination`.
    #[schemars(length(min = 1))]
    pub from: String,

    /// How to reach the store of an object URL; `spec.backup`'s settings when left out.
    #[serde(flatten)]
    pub access: StoreAccess,
}

fn default_replicas() -> i32 {
    3
}

/// The persistent volume claim template of every member.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct StorageSpec {
    /// Requested size, a Kubernetes quantity such as `1Gi` or `500Mi`.
    #[serde(default = "default_storage_size")]
    #[schemars(schema_with = "quantity_schema")]
    pub size: Quantity,

    /// Storage class of the claims; the cluster's default class when omitted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage_class_name: Option<String>,
}

impl Default for StorageSpec {
    fn default() -> Self {
        Self {
            size: default_storage_size(),
            storage_class_name: None,
        }
    }
}

fn default_storage_size() -> Quantity {
    Quantity("1Gi".into())
}

/// A quantity written as a string. The pattern is the API server's own quantity grammar, so an
/// invalid size is rejected when the object is written instead of when the claim is created.
fn quantity_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({
        "type": "string",
        "default": "1Gi",
        "pattern": r"^(\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))(([KMGTPE]i)|[numkMGTPE]|([eE](\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))))?$",
        "description": "Requested size, a Kubernetes quantity such as `1Gi` or `500Mi`."
    })
}

/// Raft and node tuning passed to every member as environment variables.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RaftTuning {
    /// Applied entries between snapshots (`RAFTKV_SNAPSHOT_COUNT`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub snapshot_count: Option<u64>,

    /// Milliseconds per Raft tick (`RAFTKV_TICK_MS`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 10000))]
    pub tick_ms: Option<u64>,

    /// Ticks without a heartbeat before a follower campaigns (`RAFTKV_ELECTION_TICKS`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 2, max = 1000))]
    pub election_ticks: Option<u32>,

    /// Ticks between leader heartbeats (`RAFTKV_HEARTBEAT_TICKS`); must stay below
    /// `electionTicks`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 1000))]
    pub heartbeat_ticks: Option<u32>,

    /// How many entries a member may lag the leader and still count as caught up, both for its
    /// readiness and for the operator's decision to promote a learner (`RAFTKV_MAX_LAG`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub max_lag: Option<u64>,
}

/// TLS for a cluster: every connection to the client and peer ports is encrypted, peers
/// authenticate each other, and clients authenticate with a certificate (its Organization is
/// the role: `read`, `write` or `admin`).
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TlsSpec {
    /// Serve both ports over TLS and require client authentication.
    #[serde(default)]
    pub enabled: bool,

    /// Certificates the user provides (cert-manager `Certificate`s, for instance). When omitted
    /// the operator issues every certificate itself from CAs it keeps in the Secret
    /// `<name>-ca`, and renews them well before they expire.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secrets: Option<TlsSecrets>,

    /// Lifetime of the certificates the operator issues, in hours (default 2160, 90 days). They
    /// are renewed when a third of it is left, and rolled out one pod at a time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 87600))]
    pub certificate_lifetime_hours: Option<u32>,
}

/// Secrets of type `kubernetes.io/tls` with `tls.crt`, `tls.key` and `ca.crt`, as cert-manager
/// writes them. Each is mounted in every pod, so a server certificate names every pod.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TlsSecrets {
    /// The client port's server certificate. Its DNS names include the client Service
    /// (`<name>.<namespace>.svc`) and every pod (`<name>-<n>.<name>-peer.<namespace>.svc`,
    /// or `*.<name>-peer.<namespace>.svc`); its `ca.crt` is also the CA client certificates
    /// must chain to.
    #[schemars(length(min = 1))]
    pub client: String,
    /// The peer port's certificate, used as server and as client between members. Its DNS names
    /// include every pod, and it carries the URI SAN `urn:raftkv:cluster:<name>.<namespace>`;
    /// its `ca.crt` is the CA peers must chain to.
    #[schemars(length(min = 1))]
    pub peer: String,
    /// The operator's own client certificate: subject Organization `admin`, issued by the CA
    /// in the client Secret's `ca.crt`.
    #[schemars(length(min = 1))]
    pub operator: String,
}

/// The cluster's NetworkPolicy.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NetworkPolicySpec {
    /// Create the NetworkPolicy; set `false` (rather than removing the field) to delete it.
    #[serde(default)]
    pub enabled: bool,

    /// Who may reach the client port, as NetworkPolicy peers (`podSelector`,
    /// `namespaceSelector`, `ipBlock`). The cluster's own pods and the operator always may.
    /// Empty: nobody else.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub client_from: Vec<NetworkPolicyPeer>,
}

/// The node's default for [`RaftTuning::max_lag`], used by the operator when the spec leaves it
/// out, so both sides judge "caught up" by the same number.
pub const DEFAULT_MAX_LAG: u64 = 1_000;

/// What the operator observed and did.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RaftClusterStatus {
    /// Voters in the Raft membership (the scale subresource's status replicas).
    #[serde(default)]
    pub replicas: i32,

    /// Voters whose pod is ready (a member that knows the leader and has caught up).
    #[serde(default)]
    pub ready_replicas: i32,

    /// Label selector of the cluster's pods, for the scale subresource and autoscalers.
    #[serde(default)]
    pub selector: String,

    /// Pod name of the current Raft leader.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub leader: Option<String>,

    /// The Raft membership as last observed.
    #[serde(default)]
    pub members: Vec<MemberStatus>,

    /// A one-word summary for humans; conditions carry the detail.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<Phase>,

    /// `Available`, `Progressing` and `Degraded`, each with a reason.
    #[serde(default)]
    pub conditions: Vec<Condition>,

    /// Things that work but deserve attention, such as an even replica count.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,

    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,

    /// Backups: the last success, the last failure, and one in progress.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backup: Option<BackupStatus>,

    /// The restore this cluster was created with.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restore: Option<RestoreStatus>,

    /// The record of the one bootstrap this cluster ever gets. Written before the bootstrap call
    /// and again after it, so an operator restarted in between finishes the step instead of
    /// bootstrapping a second cluster.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bootstrap: Option<BootstrapRecord>,
}

/// One member of the Raft membership.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MemberStatus {
    /// The member id, created by the node on its volume.
    pub id: u64,
    /// The pod serving this member, when its peer URL names one of this cluster's pods.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod: Option<String>,
    /// `Voter`, `Learner`, or `Leader` for the voter that currently leads.
    pub role: MemberRole,
    /// The leader's view of the member's health; unknown while no leader answers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub healthy: Option<bool>,
}

/// A member's role as shown in status.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum MemberRole {
    /// The voter that currently leads.
    Leader,
    /// A voter that follows.
    Voter,
    /// A non-voting member that is catching up.
    Learner,
}

/// A one-word summary of the cluster.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum Phase {
    /// Objects are created; the cluster is not bootstrapped yet.
    Creating,
    /// The membership equals the spec and every voter is healthy.
    Running,
    /// Members are being added or removed.
    Scaling,
    /// Pods are being restarted onto a new template.
    Updating,
    /// A step was refused or the cluster has no leader; see the `Degraded` condition.
    Degraded,
    /// The spec cannot be reconciled; see the `Degraded` condition.
    Invalid,
}

/// Progress of the cluster's single bootstrap.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BootstrapRecord {
    /// The member id of the pod the operator bootstraps (or bootstrapped).
    pub member_id: u64,
    /// Where the bootstrap stands.
    pub state: BootstrapState,
    /// The Raft cluster id, once known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster_id: Option<u64>,
}

/// Where the bootstrap stands.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum BootstrapState {
    /// The bootstrap call may have been sent; its outcome is not recorded yet.
    Started,
    /// The cluster exists; it is never bootstrapped again.
    Done,
}

/// What the operator knows of the cluster's backups.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BackupStatus {
    /// The last backup that was uploaded and checked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_success: Option<BackupSuccess>,

    /// The last backup that failed, and why.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_failure: Option<BackupFailure>,

    /// Failures since the last success; `Degraded` says `BackupFailing` from 2 on.
    #[serde(default)]
    pub consecutive_failures: u32,

    /// When the last backup started, successful or not: the schedule's next run follows it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_attempt: Option<Time>,

    /// Since when a backup has been running. An operator that finds this set without a backup
    /// of its own running (it restarted) records the backup as failed. Written as `null` once
    /// the backup ended, so that every kind of status write clears it.
    #[serde(default)]
    pub in_progress_since: Option<Time>,

    /// The value of the `raftkv.dev/backup-now` annotation last acted on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub on_demand: Option<String>,
}

/// A backup that was uploaded and checked.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BackupSuccess {
    /// When it was taken.
    pub time: Time,
    /// The revision of the snapshot: every write acknowledged at or below it is in the backup.
    pub revision: u64,
    /// Its size in bytes.
    pub size: u64,
    /// Its object URL, as `spec.restore.from` takes it.
    pub object: String,
}

/// A backup that failed.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BackupFailure {
    /// When it started.
    pub time: Time,
    /// What went wrong.
    pub reason: String,
}

/// The restore a cluster was created with.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RestoreStatus {
    /// The object URL restored from.
    pub from: String,
    /// Where the restore stands.
    pub state: RestoreState,
    /// Why it was refused, when it was.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// Where a restore stands.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum RestoreState {
    /// The first member is being seeded from the backup.
    Seeding,
    /// The first member started from the backup and leads the new cluster.
    Done,
    /// The cluster already held data; nothing was restored.
    Refused,
}

/// The CustomResourceDefinition as YAML, exactly as committed in
/// `crds/raftclusters.raftkv.dev.yaml`.
pub fn crd_yaml() -> Result<String, serde_saphyr::ser_error::Error> {
    use kube::CustomResourceExt;
    serde_saphyr::to_string(&RaftCluster::crd())
}
