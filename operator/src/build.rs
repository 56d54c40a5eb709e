//! Pure builders: a validated `RaftCluster` in, the Kubernetes objects that run it out.
//!
//! Nothing here talks to the API server, so every object can be checked in unit tests. The one
//! input that is not in the spec is the StatefulSet's replica count: the operator, not the user,
//! decides it, because pods may only come and go in step with the Raft membership.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{
    StatefulSet, StatefulSetPersistentVolumeClaimRetentionPolicy, StatefulSetSpec, StatefulSetUpdateStrategy,
};
use k8s_openapi::api::core::v1::{
    Affinity, Capabilities, Container, ContainerPort, EmptyDirVolumeSource, EnvFromSource, EnvVar, EnvVarSource,
    HTTPGetAction, ObjectFieldSelector, PersistentVolumeClaim, PersistentVolumeClaimSpec, PodAffinityTerm,
    PodAntiAffinity, PodSecurityContext, PodSpec, PodTemplateSpec, Probe, SeccompProfile, SecretEnvSource,
    SecretVolumeSource, SecurityContext, Service, ServicePort, ServiceSpec, Volume, VolumeMount,
    VolumeResourceRequirements, WeightedPodAffinityTerm,
};
use k8s_openapi::api::networking::v1::{
    NetworkPolicy, NetworkPolicyIngressRule, NetworkPolicyPeer, NetworkPolicyPort, NetworkPolicySpec,
};
use k8s_openapi::api::policy::v1::{PodDisruptionBudget, PodDisruptionBudgetSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta, OwnerReference};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::{Resource, ResourceExt};

use crate::certs::{peer_cluster_name, DEFAULT_LIFETIME_HOURS};
use crate::config::{OperatorConfig, PeerAddressing};
use crate::crd::{RaftCluster, RaftClusterSpec, DEFAULT_MAX_LAG, MAX_REPLICAS};
use crate::names::{ClusterNames, DATA_DIR, DATA_VOLUME, NODE_CONTAINER};
use crate::quantity::{is_quantity, same_quantity};
use crate::tls::{issued_secret_names, TlsSecretNames, CA_CERT_KEY, TLS_CERT_KEY, TLS_KEY_KEY};
use crate::{Error, Result};

/// Where the client port's certificate Secret is mounted in the node container.
pub const CLIENT_TLS_DIR: &str = "/etc/raftkv/tls/client";
/// Where the peer certificate Secret is mounted in the node container.
pub const PEER_TLS_DIR: &str = "/etc/raftkv/tls/peer";
/// Volume names of the two certificate Secrets.
const CLIENT_TLS_VOLUME: &str = "client-tls";
const PEER_TLS_VOLUME: &str = "peer-tls";
/// Mode of the mounted certificate files: readable by the node's user and its `fsGroup` only,
/// since `tls.key` is a private key.
const TLS_FILE_MODE: i32 = 0o440;

/// The user and group the node runs as: the conventional unprivileged "nonroot" id of
/// distroless images, so the data volume is writable through `fsGroup` without root.
const NODE_UID: i64 = 65532;

/// A `RaftCluster` whose spec was checked and whose defaults were filled in.
#[derive(Clone, Debug, PartialEq)]
pub struct ValidCluster {
    /// Names of the cluster's objects.
    pub names: ClusterNames,
    /// The owner reference every object carries, so deleting the `RaftCluster` deletes them.
    pub owner: OwnerReference,
    /// The node image, from the spec or the operator's default.
    pub image: String,
    /// The spec as written.
    pub spec: RaftClusterSpec,
    /// The `metadata.generation` the spec came from.
    pub generation: Option<i64>,
    /// TLS, when `spec.tls.enabled`.
    pub tls: Option<ValidTls>,
    /// The backup `spec.restore` names, resolved to an object URL.
    pub restore: Option<crate::backup::RestoreSource>,
}

/// A cluster's TLS settings once validated.
#[derive(Clone, Debug, PartialEq)]
pub struct ValidTls {
    /// The Secrets the pods mount and the operator authenticates with. For issued certificates
    /// the reconciler replaces the generation with the one it found or wrote.
    pub secrets: TlsSecretNames,
    /// The lifetime of the certificates the operator issues, in hours; `None` when the user
    /// provides the Secrets.
    pub issued_lifetime_hours: Option<u32>,
}

impl ValidCluster {
    /// Desired number of voters.
    pub fn replicas(&self) -> u32 {
        // validate() guarantees 1..=MAX_REPLICAS.
        self.spec.replicas as u32
    }

    /// How far a learner may lag the leader's commit index and still be promoted.
    pub fn max_lag(&self) -> u64 {
        self.spec.raft.max_lag.unwrap_or(DEFAULT_MAX_LAG)
    }
}

/// Checks what the schema cannot (or what an API server without schema validation let through)
/// and fills in defaults. The error message is written to status as is.
pub fn validate(cluster: &RaftCluster, config: &OperatorConfig) -> Result<ValidCluster> {
    let name = cluster
        .metadata
        .name
        .clone()
        .ok_or(Error::MissingObjectKey("metadata.name"))?;
    let namespace = cluster
        .namespace()
        .ok_or(Error::MissingObjectKey("metadata.namespace"))?;
    let owner = cluster
        .controller_owner_ref(&())
        .ok_or(Error::MissingObjectKey("metadata.uid"))?;
    let spec = &cluster.spec;
    if !(1..=MAX_REPLICAS).contains(&spec.replicas) {
        return Err(Error::InvalidSpec(format!(
            "replicas is {}; it must be between 1 and {MAX_REPLICAS}",
            spec.replicas
        )));
    }
    let image = match (&spec.image, &config.default_image) {
        (Some(image), _) if !image.trim().is_empty() => image.clone(),
        (None, Some(default)) => default.clone(),
        _ => {
            return Err(Error::InvalidSpec(
                "image is empty and the operator has no --default-image".into(),
            ))
        }
    };
    if !is_quantity(&spec.storage.size.0) {
        return Err(Error::InvalidSpec(format!(
            "storage.size {:?} is not a Kubernetes quantity such as 1Gi",
            spec.storage.size.0
        )));
    }
    crate::backup::validate(spec).map_err(Error::InvalidSpec)?;
    let restore = match spec.restore {
        Some(_) => Some(crate::backup::resolve_restore(spec).map_err(Error::InvalidSpec)?),
        None => None,
    };
    if let (Some(heartbeat), Some(election)) = (spec.raft.heartbeat_ticks, spec.raft.election_ticks) {
        if heartbeat >= election {
            return Err(Error::InvalidSpec(format!(
                "raft.heartbeatTicks ({heartbeat}) must be smaller than raft.electionTicks ({election})"
            )));
        }
    }
    let names = ClusterNames::new(name, namespace);
    let tls = spec.tls.as_ref().filter(|t| t.enabled).map(|t| match &t.secrets {
        Some(secrets) => ValidTls {
            secrets: TlsSecretNames {
                client: secrets.client.clone(),
                peer: secrets.peer.clone(),
                operator: secrets.operator.clone(),
            },
            issued_lifetime_hours: None,
        },
        None => ValidTls {
            secrets: issued_secret_names(&names, 1),
            issued_lifetime_hours: Some(t.certificate_lifetime_hours.unwrap_or(DEFAULT_LIFETIME_HOURS)),
        },
    });
    if let Some(secrets) = spec.tls.as_ref().and_then(|t| t.secrets.as_ref()) {
        if [&secrets.client, &secrets.peer, &secrets.operator]
            .iter()
            .any(|s| s.trim().is_empty())
        {
            return Err(Error::InvalidSpec(
                "tls.secrets needs the names of the client, peer and operator Secrets".into(),
            ));
        }
    }
    Ok(ValidCluster {
        names,
        owner,
        image,
        spec: spec.clone(),
        generation: cluster.metadata.generation,
        tls,
        restore,
    })
}

/// An object with one of this cluster's names that another owner controls, such as the Service
/// `x-peer` of cluster `x` when this cluster is named `x-peer`. Writing it would take it over.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NameConflict {
    /// The object's kind.
    pub kind: &'static str,
    /// The object's name.
    pub name: String,
    /// Its controller, as `Kind/name`.
    pub controller: String,
}

impl std::fmt::Display for NameConflict {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} {} is controlled by {}, not by this RaftCluster; nothing is written until that object is gone or this cluster is renamed",
            self.kind, self.name, self.controller
        )
    }
}

/// The first of the `existing` objects (kind and metadata) that another owner controls.
///
/// An object with no controller is adopted: applying it adds this cluster's owner reference.
/// One with another controller is refused, since the API server allows one controller only and
/// the object is someone else's.
pub fn name_conflict(cluster: &ValidCluster, existing: &[(&'static str, &ObjectMeta)]) -> Option<NameConflict> {
    existing.iter().find_map(|(kind, meta)| {
        let controller = meta
            .owner_references
            .iter()
            .flatten()
            .find(|r| r.controller == Some(true))?;
        (controller.uid != cluster.owner.uid).then(|| NameConflict {
            kind,
            name: meta.name.clone().unwrap_or_default(),
            controller: format!("{}/{}", controller.kind, controller.name),
        })
    })
}

/// A spec asking for other storage than the StatefulSet's claims were created with.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StorageMismatch {
    /// The storage of the existing claim templates, which the cluster keeps.
    pub kept: String,
    /// The storage the spec asks for.
    pub wanted: String,
}

impl std::fmt::Display for StorageMismatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "spec.storage asks for {} but the StatefulSet's volume claim templates, which cannot change, have {}; the cluster keeps its storage: revert spec.storage, or create a new RaftCluster",
            self.wanted, self.kept
        )
    }
}

/// The data claim template's requested size and storage class.
fn claim_storage(templates: Option<&[PersistentVolumeClaim]>) -> Option<(Option<&str>, Option<&str>)> {
    let claim = templates?
        .iter()
        .find(|c| c.metadata.name.as_deref() == Some(DATA_VOLUME))?;
    let spec = claim.spec.as_ref()?;
    let size = spec
        .resources
        .as_ref()
        .and_then(|r| r.requests.as_ref()?.get("storage"))
        .map(|q| q.0.as_str());
    Some((size, spec.storage_class_name.as_deref()))
}

fn describe_storage(storage: Option<(Option<&str>, Option<&str>)>) -> String {
    match storage {
        None => "no data claim template".into(),
        Some((size, class)) => format!(
            "size {} and {}",
            size.unwrap_or("unset"),
            class.map_or("the default storage class".to_string(), |c| format!(
                "storage class {c}"
            ))
        ),
    }
}

/// Gives `statefulset` the volume claim templates of the `existing` one. The API server rejects
/// any change to them, and such a rejected apply would stop every reconcile, membership steps
/// included; so the existing templates are always sent back as they are, and a spec that asks
/// for other storage is reported instead.
pub fn keep_claim_templates(statefulset: &mut StatefulSet, existing: &StatefulSet) -> Option<StorageMismatch> {
    let kept = existing.spec.volume_claim_templates.clone();
    let wanted_storage = claim_storage(statefulset.spec.volume_claim_templates.as_deref());
    let kept_storage = claim_storage(kept.as_deref());
    let same = match (wanted_storage, kept_storage) {
        (Some((wanted_size, wanted_class)), Some((kept_size, kept_class))) => {
            wanted_class == kept_class
                && match (wanted_size, kept_size) {
                    (Some(a), Some(b)) => same_quantity(a, b),
                    (a, b) => a == b,
                }
        }
        (wanted, kept) => wanted.is_none() && kept.is_none(),
    };
    let mismatch = (!same).then(|| StorageMismatch {
        kept: describe_storage(kept_storage),
        wanted: describe_storage(wanted_storage),
    });
    statefulset.spec.volume_claim_templates = kept;
    mismatch
}

/// Everything `apply` sends for one cluster.
#[derive(Clone, Debug, PartialEq)]
pub struct ClusterObjects {
    /// The headless Service giving pods stable DNS names for peer traffic.
    pub peer_service: Service,
    /// The Service clients use; only ready (caught-up) members are behind it.
    pub client_service: Service,
    /// The StatefulSet running the nodes.
    pub statefulset: StatefulSet,
    /// The disruption budget; `None` for a single replica, where any budget would either block
    /// node drains forever or allow nothing.
    pub pdb: Option<PodDisruptionBudget>,
    /// The NetworkPolicy; `None` unless `spec.networkPolicy.enabled`.
    pub network_policy: Option<NetworkPolicy>,
}

/// Builds every object of the cluster, with the StatefulSet at `statefulset_replicas` pods.
pub fn build(cluster: &ValidCluster, config: &OperatorConfig, statefulset_replicas: u32) -> ClusterObjects {
    ClusterObjects {
        peer_service: build_peer_service(cluster, config),
        client_service: build_client_service(cluster, config),
        statefulset: build_statefulset(cluster, config, statefulset_replicas),
        pdb: build_pdb(cluster),
        network_policy: build_network_policy(cluster, config),
    }
}

fn metadata(cluster: &ValidCluster, name: &str) -> ObjectMeta {
    ObjectMeta {
        name: Some(name.to_string()),
        namespace: Some(cluster.names.namespace.clone()),
        labels: Some(cluster.names.labels()),
        owner_references: Some(vec![cluster.owner.clone()]),
        ..ObjectMeta::default()
    }
}

fn named_port(name: &str, port: u16) -> ServicePort {
    ServicePort {
        name: Some(name.into()),
        port: i32::from(port),
        target_port: Some(IntOrString::String(name.into())),
        protocol: Some("TCP".into()),
        ..ServicePort::default()
    }
}

/// The headless Service behind the pods' DNS names.
pub fn build_peer_service(cluster: &ValidCluster, config: &OperatorConfig) -> Service {
    Service {
        metadata: metadata(cluster, &cluster.names.peer_service()),
        spec: Some(ServiceSpec {
            cluster_ip: Some("None".into()),
            // A learner is not ready until it has caught up, yet it must be reachable by name
            // to catch up at all.
            publish_not_ready_addresses: Some(true),
            selector: Some(cluster.names.selector_labels()),
            ports: Some(vec![
                named_port("peer", config.peer_port),
                named_port("client", config.client_port),
            ]),
            ..ServiceSpec::default()
        }),
        ..Service::default()
    }
}

/// The ClusterIP Service clients connect to.
pub fn build_client_service(cluster: &ValidCluster, config: &OperatorConfig) -> Service {
    Service {
        metadata: metadata(cluster, cluster.names.client_service()),
        spec: Some(ServiceSpec {
            type_: Some("ClusterIP".into()),
            selector: Some(cluster.names.selector_labels()),
            ports: Some(vec![named_port("client", config.client_port)]),
            ..ServiceSpec::default()
        }),
        ..Service::default()
    }
}

fn field_env(name: &str, path: &str) -> EnvVar {
    EnvVar {
        name: name.into(),
        value_from: Some(EnvVarSource {
            field_ref: Some(ObjectFieldSelector {
                field_path: path.into(),
                ..ObjectFieldSelector::default()
            }),
            ..EnvVarSource::default()
        }),
        ..EnvVar::default()
    }
}

fn value_env(name: &str, value: impl ToString) -> EnvVar {
    EnvVar {
        name: name.into(),
        value: Some(value.to_string()),
        ..EnvVar::default()
    }
}

/// A probe of the client port. Over TLS the kubelet speaks HTTPS without checking the
/// certificate (as it always does), and the probe paths stay open on the node without a client
/// certificate.
fn http_probe(path: &str, period: i32, failures: i32, tls: bool) -> Probe {
    Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.into()),
            port: IntOrString::String("client".into()),
            scheme: tls.then(|| "HTTPS".into()),
            ..HTTPGetAction::default()
        }),
        period_seconds: Some(period),
        timeout_seconds: Some(2),
        failure_threshold: Some(failures),
        ..Probe::default()
    }
}

/// Where the node container writes why it stopped (Kubernetes' default path).
pub const TERMINATION_MESSAGE_PATH: &str = "/dev/termination-log";

/// The peer URL a member advertises (with `$(VAR)` references the kubelet expands).
fn advertise_peer_url(cluster: &ValidCluster, config: &OperatorConfig) -> String {
    let host = match config.peer_addressing {
        PeerAddressing::Dns => format!("$(POD_NAME).{}.$(POD_NAMESPACE).svc", cluster.names.peer_service()),
        PeerAddressing::PodIp => "$(POD_IP)".to_string(),
    };
    // Peers dial each other over mutual TLS when the cluster has TLS, so they advertise https.
    let scheme = if cluster.tls.is_some() { "https" } else { "http" };
    format!("{scheme}://{host}:{}", config.peer_port)
}

/// The node's command line. Flags rather than environment, so the pod spec shows the whole
/// configuration; `$(VAR)` is expanded by the kubelet from the downward-API variables.
fn node_args(cluster: &ValidCluster, config: &OperatorConfig) -> Vec<String> {
    let bind_host = match config.peer_addressing {
        PeerAddressing::Dns => "0.0.0.0",
        PeerAddressing::PodIp => "$(POD_IP)",
    };
    let mut args: Vec<String> = vec![
        "--data-dir".into(),
        DATA_DIR.into(),
        "--client-addr".into(),
        format!("{bind_host}:{}", config.client_port),
        "--peer-addr".into(),
        format!("{bind_host}:{}", config.peer_port),
        "--advertise-peer-url".into(),
        advertise_peer_url(cluster, config),
    ];
    if cluster.tls.is_some() {
        let file = |dir: &str, key: &str| format!("{dir}/{key}");
        args.extend([
            "--client-cert-file".into(),
            file(CLIENT_TLS_DIR, TLS_CERT_KEY),
            "--client-key-file".into(),
            file(CLIENT_TLS_DIR, TLS_KEY_KEY),
            // Client certificates chain to the CA of the client port's own certificate: one CA
            // per port, whoever issues it.
            "--client-ca-file".into(),
            file(CLIENT_TLS_DIR, CA_CERT_KEY),
            "--peer-cert-file".into(),
            file(PEER_TLS_DIR, TLS_CERT_KEY),
            "--peer-key-file".into(),
            file(PEER_TLS_DIR, TLS_KEY_KEY),
            "--peer-ca-file".into(),
            file(PEER_TLS_DIR, CA_CERT_KEY),
            "--peer-cluster-name".into(),
            peer_cluster_name(&cluster.names),
        ]);
    }
    args
}

/// The certificate Secrets as pod volumes and their mounts, for a TLS cluster.
fn tls_volumes(cluster: &ValidCluster) -> (Vec<Volume>, Vec<VolumeMount>) {
    let Some(tls) = &cluster.tls else {
        return (Vec::new(), Vec::new());
    };
    let pairs = [
        (CLIENT_TLS_VOLUME, &tls.secrets.client, CLIENT_TLS_DIR),
        (PEER_TLS_VOLUME, &tls.secrets.peer, PEER_TLS_DIR),
    ];
    let volumes = pairs
        .iter()
        .map(|(volume, secret, _)| Volume {
            name: (*volume).into(),
            secret: Some(SecretVolumeSource {
                secret_name: Some((*secret).clone()),
                default_mode: Some(TLS_FILE_MODE),
                ..SecretVolumeSource::default()
            }),
            ..Volume::default()
        })
        .collect();
    // Mounted whole, never with subPath: the kubelet updates a Secret volume in place only when
    // it is mounted as a directory, and the nodes reload certificates from those updates.
    let mounts = pairs
        .iter()
        .map(|(volume, _, dir)| VolumeMount {
            name: (*volume).into(),
            mount_path: (*dir).into(),
            read_only: Some(true),
            ..VolumeMount::default()
        })
        .collect();
    (volumes, mounts)
}

/// The name of the init container that seeds the first member from a backup.
pub const RESTORE_CONTAINER: &str = "restore";
/// The scratch volume the backup is downloaded to before it is restored: the root filesystem
/// is read-only, and the data directory must stay empty until the restore writes it.
const RESTORE_SCRATCH_VOLUME: &str = "restore-scratch";
const RESTORE_SCRATCH_DIR: &str = "/var/lib/raftkv-restore";

/// Adds to `statefulset` the init container that seeds a member's empty volume from the backup
/// at `source` (`raftkv-node restore --from <url>`), with the store's credentials from their
/// Secret as environment. Used only while the cluster is seeding, when the StatefulSet has
/// its first pod only (see `crate::backup::seeding`).
pub fn add_restore_init_container(
    statefulset: &mut StatefulSet,
    cluster: &ValidCluster,
    config: &OperatorConfig,
    source: &crate::backup::RestoreSource,
) {
    let Some(pod) = statefulset.spec.template.spec.as_mut() else {
        return;
    };
    let node = pod
        .containers
        .iter()
        .find(|c| c.name == NODE_CONTAINER)
        .cloned()
        .unwrap_or_default();
    let mut env = vec![
        field_env("POD_NAME", "metadata.name"),
        field_env("POD_NAMESPACE", "metadata.namespace"),
        field_env("POD_IP", "status.podIP"),
        value_env("RAFTKV_TERMINATION_MESSAGE_PATH", TERMINATION_MESSAGE_PATH),
    ];
    env.extend(
        crate::backup::store_options(&source.access)
            .to_env()
            .into_iter()
            .map(|(k, v)| value_env(&k, v)),
    );
    let env_from = source.access.credentials_secret.as_ref().map(|name| {
        vec![EnvFromSource {
            secret_ref: Some(SecretEnvSource {
                name: name.clone(),
                optional: Some(false),
            }),
            ..EnvFromSource::default()
        }]
    });
    let mut mounts = node.volume_mounts.clone().unwrap_or_default();
    mounts.push(VolumeMount {
        name: RESTORE_SCRATCH_VOLUME.into(),
        mount_path: RESTORE_SCRATCH_DIR.into(),
        ..VolumeMount::default()
    });
    let init = Container {
        name: RESTORE_CONTAINER.into(),
        image: node.image.clone(),
        image_pull_policy: node.image_pull_policy.clone(),
        args: Some(vec![
            "restore".into(),
            "--from".into(),
            source.url.clone(),
            "--data-dir".into(),
            DATA_DIR.into(),
            "--peer-url".into(),
            advertise_peer_url(cluster, config),
            "--scratch-dir".into(),
            RESTORE_SCRATCH_DIR.into(),
            // Every pod gets the template's init container; only the first is seeded.
            "--only-pod".into(),
            cluster.names.pod(0),
        ]),
        env: Some(env),
        env_from,
        volume_mounts: Some(mounts),
        termination_message_path: Some(TERMINATION_MESSAGE_PATH.into()),
        termination_message_policy: Some("FallbackToLogsOnError".into()),
        resources: node.resources.clone(),
        security_context: node.security_context.clone(),
        ..Container::default()
    };
    pod.init_containers = Some(vec![init]);
    pod.volumes.get_or_insert_with(Vec::new).push(Volume {
        name: RESTORE_SCRATCH_VOLUME.into(),
        empty_dir: Some(EmptyDirVolumeSource::default()),
        ..Volume::default()
    });
}

fn node_env(cluster: &ValidCluster) -> Vec<EnvVar> {
    let mut env = vec![
        field_env("POD_NAME", "metadata.name"),
        field_env("POD_NAMESPACE", "metadata.namespace"),
        field_env("POD_IP", "status.podIP"),
        // The node writes its fatal error there, for `kubectl describe pod` and the operator.
        value_env("RAFTKV_TERMINATION_MESSAGE_PATH", TERMINATION_MESSAGE_PATH),
    ];
    let raft = &cluster.spec.raft;
    if let Some(v) = raft.snapshot_count {
        env.push(value_env("RAFTKV_SNAPSHOT_COUNT", v));
    }
    if let Some(v) = raft.tick_ms {
        env.push(value_env("RAFTKV_TICK_MS", v));
    }
    if let Some(v) = raft.election_ticks {
        env.push(value_env("RAFTKV_ELECTION_TICKS", v));
    }
    if let Some(v) = raft.heartbeat_ticks {
        env.push(value_env("RAFTKV_HEARTBEAT_TICKS", v));
    }
    if let Some(v) = raft.max_lag {
        env.push(value_env("RAFTKV_MAX_LAG", v));
    }
    env
}

/// Spread members over nodes when the user did not say otherwise: losing one node should cost
/// at most one vote. Preferred, not required, so a small test cluster still schedules.
fn default_affinity(cluster: &ValidCluster) -> Affinity {
    Affinity {
        pod_anti_affinity: Some(PodAntiAffinity {
            preferred_during_scheduling_ignored_during_execution: Some(vec![WeightedPodAffinityTerm {
                weight: 100,
                pod_affinity_term: PodAffinityTerm {
                    label_selector: Some(LabelSelector {
                        match_labels: Some(cluster.names.selector_labels()),
                        ..LabelSelector::default()
                    }),
                    topology_key: "kubernetes.io/hostname".into(),
                    ..PodAffinityTerm::default()
                },
            }]),
            ..PodAntiAffinity::default()
        }),
        ..Affinity::default()
    }
}

/// The StatefulSet running `replicas` nodes.
pub fn build_statefulset(cluster: &ValidCluster, config: &OperatorConfig, replicas: u32) -> StatefulSet {
    let names = &cluster.names;
    let spec = &cluster.spec;
    let tls = cluster.tls.is_some();
    let (tls_volumes, tls_mounts) = tls_volumes(cluster);
    let mut volume_mounts = vec![VolumeMount {
        name: DATA_VOLUME.into(),
        mount_path: DATA_DIR.into(),
        ..VolumeMount::default()
    }];
    volume_mounts.extend(tls_mounts);
    let container = Container {
        name: NODE_CONTAINER.into(),
        image: Some(cluster.image.clone()),
        image_pull_policy: spec.image_pull_policy.clone(),
        args: Some(node_args(cluster, config)),
        env: Some(node_env(cluster)),
        ports: Some(vec![
            ContainerPort {
                name: Some("client".into()),
                container_port: i32::from(config.client_port),
                protocol: Some("TCP".into()),
                ..ContainerPort::default()
            },
            ContainerPort {
                name: Some("peer".into()),
                container_port: i32::from(config.peer_port),
                protocol: Some("TCP".into()),
                ..ContainerPort::default()
            },
        ]),
        // Ready means "a member that knows the leader and has caught up": the Service only
        // routes to such pods and the operator waits for it between rollout steps.
        readiness_probe: Some(http_probe("/readyz", 5, 3, tls)),
        // Liveness only asks whether the process serves at all; a lagging member must not be
        // restarted for lagging, or it would never catch up.
        liveness_probe: Some(Probe {
            initial_delay_seconds: Some(10),
            ..http_probe("/healthz", 10, 6, tls)
        }),
        termination_message_path: Some(TERMINATION_MESSAGE_PATH.into()),
        // A crash the node could not report itself (a panic, a signal) still leaves the end of
        // its log as the message.
        termination_message_policy: Some("FallbackToLogsOnError".into()),
        resources: spec.resources.clone(),
        volume_mounts: Some(volume_mounts),
        security_context: Some(SecurityContext {
            allow_privilege_escalation: Some(false),
            read_only_root_filesystem: Some(true),
            run_as_non_root: Some(true),
            capabilities: Some(Capabilities {
                drop: Some(vec!["ALL".into()]),
                ..Capabilities::default()
            }),
            ..SecurityContext::default()
        }),
        ..Container::default()
    };
    let claim = PersistentVolumeClaim {
        metadata: ObjectMeta {
            name: Some(DATA_VOLUME.into()),
            labels: Some(names.selector_labels()),
            ..ObjectMeta::default()
        },
        spec: Some(PersistentVolumeClaimSpec {
            access_modes: Some(vec!["ReadWriteOnce".into()]),
            storage_class_name: spec.storage.storage_class_name.clone(),
            resources: Some(VolumeResourceRequirements {
                requests: Some(BTreeMap::from([("storage".to_string(), spec.storage.size.clone())])),
                ..VolumeResourceRequirements::default()
            }),
            ..PersistentVolumeClaimSpec::default()
        }),
        ..PersistentVolumeClaim::default()
    };
    StatefulSet {
        metadata: metadata(cluster, names.statefulset()),
        spec: StatefulSetSpec {
            replicas: Some(replicas as i32),
            service_name: Some(names.peer_service()),
            selector: LabelSelector {
                match_labels: Some(names.selector_labels()),
                ..LabelSelector::default()
            },
            // OrderedReady deadlocks after a full outage: pod 0 waits for a quorum that the
            // pods it blocks would provide.
            pod_management_policy: Some("Parallel".into()),
            // The operator restarts pods itself, one at a time and the leader last, so the
            // StatefulSet controller must never replace a pod on its own.
            update_strategy: Some(StatefulSetUpdateStrategy {
                type_: Some("OnDelete".into()),
                ..StatefulSetUpdateStrategy::default()
            }),
            // Claims outlive scale-down and deletion: the operator deletes a member's claim only
            // after Raft has removed the member, and a claim deleted too early loses data.
            persistent_volume_claim_retention_policy: Some(StatefulSetPersistentVolumeClaimRetentionPolicy {
                when_deleted: Some("Retain".into()),
                when_scaled: Some("Retain".into()),
            }),
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(names.labels()),
                    ..ObjectMeta::default()
                }),
                spec: Some(PodSpec {
                    containers: vec![container],
                    volumes: (!tls_volumes.is_empty()).then_some(tls_volumes),
                    // A node never talks to the Kubernetes API: it gets no credentials for it.
                    automount_service_account_token: Some(false),
                    security_context: Some(PodSecurityContext {
                        run_as_non_root: Some(true),
                        run_as_user: Some(NODE_UID),
                        run_as_group: Some(NODE_UID),
                        fs_group: Some(NODE_UID),
                        seccomp_profile: Some(SeccompProfile {
                            type_: "RuntimeDefault".into(),
                            ..SeccompProfile::default()
                        }),
                        ..PodSecurityContext::default()
                    }),
                    affinity: Some(spec.affinity.clone().unwrap_or_else(|| default_affinity(cluster))),
                    tolerations: spec.tolerations.clone(),
                    node_selector: spec.node_selector.clone(),
                    // The node flushes its WAL and leaves cleanly on SIGTERM; give it time.
                    termination_grace_period_seconds: Some(30),
                    enable_service_links: Some(false),
                    ..PodSpec::default()
                }),
            },
            volume_claim_templates: Some(vec![claim]),
            ..StatefulSetSpec::default()
        },
        ..StatefulSet::default()
    }
}

/// The disruption budget: at most one member down at a time through voluntary disruptions.
pub fn build_pdb(cluster: &ValidCluster) -> Option<PodDisruptionBudget> {
    if cluster.replicas() <= 1 {
        return None;
    }
    Some(PodDisruptionBudget {
        metadata: metadata(cluster, cluster.names.pdb()),
        spec: Some(PodDisruptionBudgetSpec {
            max_unavailable: Some(IntOrString::Int(1)),
            selector: Some(LabelSelector {
                match_labels: Some(cluster.names.selector_labels()),
                ..LabelSelector::default()
            }),
            ..PodDisruptionBudgetSpec::default()
        }),
        ..PodDisruptionBudget::default()
    })
}

fn port_rule(from: Vec<NetworkPolicyPeer>, ports: &[u16]) -> NetworkPolicyIngressRule {
    NetworkPolicyIngressRule {
        from: Some(from),
        ports: Some(
            ports
                .iter()
                .map(|port| NetworkPolicyPort {
                    port: Some(IntOrString::Int(i32::from(*port))),
                    protocol: Some("TCP".into()),
                    ..NetworkPolicyPort::default()
                })
                .collect(),
        ),
    }
}

/// The NetworkPolicy of a cluster that asks for one: the peer port (and the client port, for
/// forwarded requests) between the cluster's own pods only; the client port also from the
/// operator and from every source `spec.networkPolicy.clientFrom` lists.
///
/// A rule with an empty `from` would admit everyone, so the client rule is left out when it
/// lists nobody.
pub fn build_network_policy(cluster: &ValidCluster, config: &OperatorConfig) -> Option<NetworkPolicy> {
    let spec = cluster.spec.network_policy.as_ref().filter(|p| p.enabled)?;
    let own_pods = NetworkPolicyPeer {
        pod_selector: Some(LabelSelector {
            match_labels: Some(cluster.names.selector_labels()),
            ..LabelSelector::default()
        }),
        ..NetworkPolicyPeer::default()
    };
    let mut rules = vec![port_rule(vec![own_pods], &[config.peer_port, config.client_port])];
    let mut clients: Vec<NetworkPolicyPeer> = config.operator_peer.iter().cloned().collect();
    clients.extend(spec.client_from.iter().cloned());
    if !clients.is_empty() {
        rules.push(port_rule(clients, &[config.client_port]));
    }
    Some(NetworkPolicy {
        metadata: metadata(cluster, cluster.names.network_policy()),
        spec: Some(NetworkPolicySpec {
            pod_selector: Some(LabelSelector {
                match_labels: Some(cluster.names.selector_labels()),
                ..LabelSelector::default()
            }),
            policy_types: Some(vec!["Ingress".into()]),
            ingress: Some(rules),
            ..NetworkPolicySpec::default()
        }),
    })
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::core::v1::Container;
    use serde::de::DeserializeOwned;
    use serde_json::Value;

    use super::*;

    fn yaml<T: DeserializeOwned>(text: &str) -> T {
        serde_saphyr::from_str(text).expect("fixture parses")
    }

    fn fixture_cluster() -> RaftCluster {
        yaml(include_str!("../fixtures/raftcluster.yaml"))
    }

    fn valid(cluster: &RaftCluster) -> ValidCluster {
        validate(cluster, &OperatorConfig::default()).expect("valid fixture")
    }

    fn built() -> ClusterObjects {
        build(&valid(&fixture_cluster()), &OperatorConfig::default(), 3)
    }

    /// Compares as JSON values, so the fixtures' key order and YAML style do not matter.
    fn assert_matches_fixture<T: serde::Serialize>(object: &T, fixture: &str) {
        let expected: Value = yaml(fixture);
        let actual = serde_json::to_value(object).expect("serialises");
        assert_eq!(actual, expected);
    }

    fn node_container(statefulset: &StatefulSet) -> &Container {
        &statefulset.spec.template.spec.as_ref().unwrap().containers[0]
    }

    #[test]
    fn objects_match_their_fixtures() {
        let objects = built();
        assert_matches_fixture(&objects.statefulset, include_str!("../fixtures/statefulset.yaml"));
        assert_matches_fixture(&objects.peer_service, include_str!("../fixtures/peer-service.yaml"));
        assert_matches_fixture(&objects.client_service, include_str!("../fixtures/client-service.yaml"));
        assert_matches_fixture(&objects.pdb.unwrap(), include_str!("../fixtures/pdb.yaml"));
    }

    #[test]
    fn every_object_is_owned_by_the_raft_cluster() {
        let objects = built();
        let metas = [
            &objects.statefulset.metadata,
            &objects.peer_service.metadata,
            &objects.client_service.metadata,
            &objects.pdb.as_ref().unwrap().metadata,
        ];
        for meta in metas {
            let owners = meta.owner_references.as_ref().unwrap();
            assert_eq!(owners.len(), 1);
            assert_eq!(owners[0].kind, "RaftCluster");
            assert_eq!(owners[0].controller, Some(true));
            assert_eq!(owners[0].uid, "6c1a2b3d-0000-4000-8000-00000000beef");
        }
    }

    #[test]
    fn the_node_listens_on_named_ports_and_is_probed_on_them() {
        let objects = built();
        let container = node_container(&objects.statefulset);
        let ports: Vec<(Option<&str>, i32)> = container
            .ports
            .as_ref()
            .unwrap()
            .iter()
            .map(|p| (p.name.as_deref(), p.container_port))
            .collect();
        assert_eq!(ports, [(Some("client"), 8080), (Some("peer"), 8081)]);
        let readiness = container.readiness_probe.as_ref().unwrap().http_get.as_ref().unwrap();
        assert_eq!(readiness.path.as_deref(), Some("/readyz"));
        assert_eq!(readiness.port, IntOrString::String("client".into()));
        let liveness = container.liveness_probe.as_ref().unwrap().http_get.as_ref().unwrap();
        assert_eq!(liveness.path.as_deref(), Some("/healthz"));
    }

    #[test]
    fn the_claim_template_requests_the_spec_size_and_class() {
        let objects = built();
        let claim = &objects.statefulset.spec.volume_claim_templates.as_ref().unwrap()[0];
        assert_eq!(claim.metadata.name.as_deref(), Some(DATA_VOLUME));
        let spec = claim.spec.as_ref().unwrap();
        assert_eq!(spec.storage_class_name.as_deref(), Some("fast"));
        let requests = spec.resources.as_ref().unwrap().requests.as_ref().unwrap();
        assert_eq!(requests["storage"].0, "2Gi");
    }

    #[test]
    fn the_statefulset_leaves_pacing_to_the_operator() {
        let spec = built().statefulset.spec;
        assert_eq!(spec.pod_management_policy.as_deref(), Some("Parallel"));
        assert_eq!(spec.update_strategy.unwrap().type_.as_deref(), Some("OnDelete"));
        let retention = spec.persistent_volume_claim_retention_policy.unwrap();
        assert_eq!(retention.when_scaled.as_deref(), Some("Retain"));
    }

    #[test]
    fn the_replica_count_comes_from_the_operator_not_the_spec() {
        let objects = build(&valid(&fixture_cluster()), &OperatorConfig::default(), 5);
        assert_eq!(objects.statefulset.spec.replicas, Some(5));
    }

    #[test]
    fn a_single_replica_gets_no_disruption_budget() {
        let mut cluster = fixture_cluster();
        cluster.spec.replicas = 1;
        assert_eq!(build(&valid(&cluster), &OperatorConfig::default(), 1).pdb, None);
    }

    #[test]
    fn pod_ip_addressing_binds_and_advertises_the_pod_ip() {
        let config = OperatorConfig {
            peer_addressing: PeerAddressing::PodIp,
            ..OperatorConfig::default()
        };
        let objects = build(&valid(&fixture_cluster()), &config, 3);
        let args = node_container(&objects.statefulset).args.clone().unwrap();
        assert!(args.contains(&"$(POD_IP):8080".to_string()), "{args:?}");
        assert!(args.contains(&"http://$(POD_IP):8081".to_string()), "{args:?}");
    }

    #[test]
    fn the_default_image_fills_in_a_missing_one() {
        let mut cluster = fixture_cluster();
        cluster.spec.image = None;
        let config = OperatorConfig {
            default_image: Some("raftkv/node:default".into()),
            ..OperatorConfig::default()
        };
        assert_eq!(validate(&cluster, &config).unwrap().image, "raftkv/node:default");
        let error = validate(&cluster, &OperatorConfig::default()).unwrap_err();
        assert!(matches!(error, Error::InvalidSpec(_)), "{error}");
    }

    #[test]
    fn invalid_specs_are_rejected_with_a_message() {
        type Mutation = fn(&mut RaftCluster);
        let cases: [(&str, Mutation); 3] = [
            ("between 1 and 9", |c| c.spec.replicas = 10),
            ("quantity", |c| c.spec.storage.size.0 = "lots".into()),
            ("heartbeatTicks", |c| {
                c.spec.raft.heartbeat_ticks = Some(10);
                c.spec.raft.election_ticks = Some(10);
            }),
        ];
        for (needle, mutate) in cases {
            let mut cluster = fixture_cluster();
            mutate(&mut cluster);
            match validate(&cluster, &OperatorConfig::default()) {
                Err(Error::InvalidSpec(message)) => assert!(message.contains(needle), "{message}"),
                other => panic!("expected an invalid spec mentioning {needle}, got {other:?}"),
            }
        }
    }

    #[test]
    fn an_object_controlled_by_another_owner_is_a_name_conflict() {
        let cluster = valid(&fixture_cluster());
        let ours = built().peer_service.metadata;
        let adoptable = ObjectMeta {
            name: Some("demo".into()),
            ..ObjectMeta::default()
        };
        let mut foreign = ours.clone();
        foreign.name = Some("demo-peer".into());
        foreign.owner_references = Some(vec![OwnerReference {
            uid: "another-uid".into(),
            name: "demo-peer".into(),
            ..cluster.owner.clone()
        }]);
        assert_eq!(
            name_conflict(&cluster, &[("Service", &ours), ("Service", &adoptable)]),
            None
        );
        let conflict = name_conflict(&cluster, &[("Service", &ours), ("Service", &foreign)]).unwrap();
        assert_eq!(
            conflict,
            NameConflict {
                kind: "Service",
                name: "demo-peer".into(),
                controller: "RaftCluster/demo-peer".into()
            }
        );
        assert!(conflict.to_string().contains("RaftCluster/demo-peer"), "{conflict}");
    }

    fn tls_cluster() -> ValidCluster {
        valid(&yaml(include_str!("../fixtures/raftcluster-tls.yaml")))
    }

    fn flag<'a>(args: &'a [String], name: &str) -> Option<&'a str> {
        let at = args.iter().position(|a| a == name)?;
        args.get(at + 1).map(String::as_str)
    }

    #[test]
    fn a_tls_cluster_mounts_its_certificate_secrets_and_passes_them_to_the_node() {
        let statefulset = build_statefulset(&tls_cluster(), &OperatorConfig::default(), 3);
        let pod = statefulset.spec.template.spec.as_ref().unwrap();
        let secrets: Vec<(&str, Option<&str>, Option<i32>)> = pod
            .volumes
            .as_ref()
            .unwrap()
            .iter()
            .map(|v| {
                let secret = v.secret.as_ref().unwrap();
                (v.name.as_str(), secret.secret_name.as_deref(), secret.default_mode)
            })
            .collect();
        assert_eq!(
            secrets,
            [
                ("client-tls", Some("demo-client-tls-1"), Some(0o440)),
                ("peer-tls", Some("demo-peer-tls-1"), Some(0o440))
            ]
        );
        let container = &pod.containers[0];
        let mounts: Vec<(&str, &str, Option<bool>, Option<&str>)> = container
            .volume_mounts
            .as_ref()
            .unwrap()
            .iter()
            .map(|m| {
                (
                    m.name.as_str(),
                    m.mount_path.as_str(),
                    m.read_only,
                    m.sub_path.as_deref(),
                )
            })
            .collect();
        assert_eq!(
            mounts,
            [
                ("data", DATA_DIR, None, None),
                ("client-tls", CLIENT_TLS_DIR, Some(true), None),
                ("peer-tls", PEER_TLS_DIR, Some(true), None)
            ]
        );
        let args = container.args.as_ref().unwrap();
        let expected = [
            ("--client-cert-file", "/etc/raftkv/tls/client/tls.crt"),
            ("--client-key-file", "/etc/raftkv/tls/client/tls.key"),
            ("--client-ca-file", "/etc/raftkv/tls/client/ca.crt"),
            ("--peer-cert-file", "/etc/raftkv/tls/peer/tls.crt"),
            ("--peer-key-file", "/etc/raftkv/tls/peer/tls.key"),
            ("--peer-ca-file", "/etc/raftkv/tls/peer/ca.crt"),
            ("--peer-cluster-name", "demo.prod"),
            (
                "--advertise-peer-url",
                "https://$(POD_NAME).demo-peer.$(POD_NAMESPACE).svc:8081",
            ),
        ];
        for (name, value) in expected {
            assert_eq!(flag(args, name), Some(value), "{name} in {args:?}");
        }
    }

    #[test]
    fn a_tls_cluster_is_probed_over_https() {
        let statefulset = build_statefulset(&tls_cluster(), &OperatorConfig::default(), 3);
        let container = node_container(&statefulset);
        for probe in [&container.readiness_probe, &container.liveness_probe] {
            let get = probe.as_ref().unwrap().http_get.as_ref().unwrap();
            assert_eq!(get.scheme.as_deref(), Some("HTTPS"));
        }
        let plain = node_container(&built().statefulset).clone();
        let get = plain.readiness_probe.unwrap().http_get.unwrap();
        assert_eq!(get.scheme, None, "plaintext clusters keep the default scheme");
        assert!(plain.args.unwrap().iter().all(|a| !a.contains("tls")));
    }

    #[test]
    fn user_provided_secrets_are_mounted_by_name() {
        let mut cluster: RaftCluster = yaml(include_str!("../fixtures/raftcluster-tls.yaml"));
        cluster.spec.tls.as_mut().unwrap().secrets = Some(crate::crd::TlsSecrets {
            client: "demo-client-cert".into(),
            peer: "demo-peer-cert".into(),
            operator: "demo-operator-cert".into(),
        });
        let valid = valid(&cluster);
        let tls = valid.tls.as_ref().unwrap();
        assert_eq!(tls.issued_lifetime_hours, None);
        assert_eq!(tls.secrets.operator, "demo-operator-cert");
        let statefulset = build_statefulset(&valid, &OperatorConfig::default(), 3);
        let volumes = statefulset.spec.template.spec.unwrap().volumes.unwrap();
        let names: Vec<_> = volumes
            .iter()
            .map(|v| v.secret.as_ref().unwrap().secret_name.clone().unwrap())
            .collect();
        assert_eq!(names, ["demo-client-cert", "demo-peer-cert"]);

        cluster.spec.tls.as_mut().unwrap().secrets.as_mut().unwrap().peer = " ".into();
        let error = validate(&cluster, &OperatorConfig::default()).unwrap_err();
        assert!(matches!(error, Error::InvalidSpec(_)), "{error}");
    }

    #[test]
    fn disabled_tls_builds_a_plaintext_cluster() {
        let mut cluster: RaftCluster = yaml(include_str!("../fixtures/raftcluster-tls.yaml"));
        cluster.spec.tls.as_mut().unwrap().enabled = false;
        let valid = valid(&cluster);
        assert_eq!(valid.tls, None);
        let statefulset = build_statefulset(&valid, &OperatorConfig::default(), 3);
        assert_eq!(statefulset.spec.template.spec.unwrap().volumes, None);
    }

    #[test]
    fn the_network_policy_matches_its_fixture() {
        let config = OperatorConfig {
            operator_peer: crate::config::operator_peer(
                "raftkv-system",
                BTreeMap::from([("app.kubernetes.io/name".to_string(), "raftkv-operator".to_string())]),
            ),
            ..OperatorConfig::default()
        };
        let policy = build(&tls_cluster(), &config, 3).network_policy.expect("a policy");
        assert_matches_fixture(&policy, include_str!("../fixtures/networkpolicy.yaml"));
    }

    #[test]
    fn a_network_policy_with_no_client_sources_admits_only_the_cluster_itself() {
        let mut cluster: RaftCluster = yaml(include_str!("../fixtures/raftcluster-tls.yaml"));
        cluster.spec.network_policy.as_mut().unwrap().client_from.clear();
        let policy = build_network_policy(&valid(&cluster), &OperatorConfig::default()).unwrap();
        let rules = policy.spec.unwrap().ingress.unwrap();
        // A second rule with an empty `from` would admit every source.
        assert_eq!(rules.len(), 1);
        assert!(!rules[0].from.as_ref().unwrap().is_empty());
        assert_eq!(built().network_policy, None, "no policy unless asked for");
    }

    /// The fixture's StatefulSet as the API server stores it: claim templates defaulted, the
    /// size in the server's canonical form.
    fn stored(mut statefulset: StatefulSet, size: &str) -> StatefulSet {
        let mut templates: Value = serde_json::to_value(&statefulset.spec.volume_claim_templates).unwrap();
        templates[0]["spec"]["volumeMode"] = "Filesystem".into();
        templates[0]["spec"]["resources"]["requests"]["storage"] = size.into();
        templates[0]["status"] = serde_json::json!({"phase": "Pending"});
        statefulset.spec.volume_claim_templates = serde_json::from_value(templates).unwrap();
        statefulset
    }

    #[test]
    fn unchanged_storage_keeps_the_stored_claim_templates_without_a_mismatch() {
        let existing = stored(built().statefulset, "2048Mi");
        let mut statefulset = built().statefulset;
        assert_eq!(keep_claim_templates(&mut statefulset, &existing), None);
        assert_eq!(
            statefulset.spec.volume_claim_templates, existing.spec.volume_claim_templates,
            "sent back exactly as stored"
        );
    }

    #[test]
    fn changed_storage_keeps_the_existing_claim_templates_and_reports_the_change() {
        let existing = stored(built().statefulset, "2Gi");
        let mut cluster = fixture_cluster();
        cluster.spec.storage.size.0 = "5Gi".into();
        cluster.spec.storage.storage_class_name = None;
        let mut statefulset = build(&valid(&cluster), &OperatorConfig::default(), 3).statefulset;
        let mismatch = keep_claim_templates(&mut statefulset, &existing).expect("a mismatch");
        assert_eq!(
            statefulset.spec.volume_claim_templates,
            existing.spec.volume_claim_templates
        );
        assert_eq!(mismatch.kept, "size 2Gi and storage class fast");
        assert_eq!(mismatch.wanted, "size 5Gi and the default storage class");
    }
}
