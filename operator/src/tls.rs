//! The TLS Secrets of a cluster: their names, the Secret objects the operator writes for
//! certificates it issues, which generation of them the pods mount, and what the operator's node
//! client reads from them.
//!
//! Issued server and peer certificates come in numbered generations, each a pair of Secrets
//! (`<name>-client-tls-<n>`, `<name>-peer-tls-<n>`) that is never changed after it is written.
//! A renewal writes generation `n + 1` and points the pod template at it; the template change is
//! then rolled out by the operator's ordinary rollout, one pod at a time and the leader last,
//! so a renewal never takes more than one member down. Generation `n` stays until `n + 2` is
//! written, so a pod that has not been restarted yet keeps a Secret behind its volume.
//!
//! User-provided Secrets (cert-manager `Certificate`s) are mounted under the same paths; they are
//! renewed in place by their issuer, and the nodes reload the files when the kubelet updates them.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::jiff::Timestamp;
use k8s_openapi::ByteString;

use crate::build::ValidCluster;
use crate::certs::{CertifiedKey, ClusterCas, Issued};
use crate::names::ClusterNames;
use crate::{Error, Result};

/// Label on the issued server and peer Secrets: their generation.
pub const GENERATION_LABEL: &str = "raftkv.dev/certificate-generation";
/// Label on every issued Secret: what it holds (`ca`, `client`, `peer`, `operator`, `application`).
pub const CERTIFICATE_LABEL: &str = "raftkv.dev/certificate";
/// Annotation on an issued Secret: its certificate's `notBefore` (RFC 3339).
pub const NOT_BEFORE_ANNOTATION: &str = "raftkv.dev/not-before";
/// Annotation on an issued Secret: its certificate's `notAfter` (RFC 3339).
pub const NOT_AFTER_ANNOTATION: &str = "raftkv.dev/not-after";
/// Annotation on an issued server or peer Secret: the pod IPs its certificate names, comma
/// separated (pod-IP addressing only).
pub const IP_ADDRESSES_ANNOTATION: &str = "raftkv.dev/ip-addresses";
/// Annotation on a `RaftCluster`: changing its value makes the operator issue and roll out new
/// certificates at once (after a key leaked, or to try a rotation). Issued Secrets record the
/// value they were issued under.
pub const ROTATE_ANNOTATION: &str = "raftkv.dev/rotate-certificates";

/// Keys of a `kubernetes.io/tls` Secret, as cert-manager writes them.
pub const TLS_CERT_KEY: &str = "tls.crt";
/// The private key's key.
pub const TLS_KEY_KEY: &str = "tls.key";
/// The CA's key.
pub const CA_CERT_KEY: &str = "ca.crt";
/// Keys of the CA Secret.
const CLIENT_CA_CERT: &str = "client-ca.crt";
const CLIENT_CA_KEY: &str = "client-ca.key";
const PEER_CA_CERT: &str = "peer-ca.crt";
const PEER_CA_KEY: &str = "peer-ca.key";

/// The Secrets a TLS cluster's pods mount, and the one the operator authenticates with.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsSecretNames {
    /// The client port's server certificate and the CA of client certificates.
    pub client: String,
    /// The peer certificate and the peer CA.
    pub peer: String,
    /// The operator's `admin` client certificate; not mounted in pods.
    pub operator: String,
}

/// The CA Secret of a cluster whose certificates the operator issues.
pub fn ca_secret_name(names: &ClusterNames) -> String {
    format!("{}-ca", names.cluster)
}

/// The Secret with a `write` client certificate the operator issues for applications.
pub fn application_secret_name(names: &ClusterNames) -> String {
    format!("{}-client", names.cluster)
}

/// The issued Secrets of `generation`.
pub fn issued_secret_names(names: &ClusterNames, generation: u32) -> TlsSecretNames {
    TlsSecretNames {
        client: format!("{}-client-tls-{generation}", names.cluster),
        peer: format!("{}-peer-tls-{generation}", names.cluster),
        operator: format!("{}-operator-tls", names.cluster),
    }
}

/// What one issued Secret says about itself, read from its labels and annotations.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IssuedSecret {
    /// The Secret's name.
    pub name: String,
    /// `client`, `peer`, `operator`, `application` or `ca`.
    pub certificate: String,
    /// The generation, for `client` and `peer`.
    pub generation: Option<u32>,
    /// The certificate's validity.
    pub not_before: Option<Timestamp>,
    /// The certificate's validity.
    pub not_after: Option<Timestamp>,
    /// The value of [`ROTATE_ANNOTATION`] it was issued under.
    pub rotation: Option<String>,
    /// The pod IPs its certificate names.
    pub ips: BTreeSet<IpAddr>,
}

impl IssuedSecret {
    /// Reads a Secret the operator wrote; `None` for any other.
    pub fn read(secret: &Secret) -> Option<Self> {
        let labels = secret.metadata.labels.as_ref()?;
        let annotations = secret.metadata.annotations.clone().unwrap_or_default();
        let time = |key: &str| annotations.get(key).and_then(|t| t.parse::<Timestamp>().ok());
        Some(Self {
            name: secret.metadata.name.clone()?,
            certificate: labels.get(CERTIFICATE_LABEL)?.clone(),
            generation: labels.get(GENERATION_LABEL).and_then(|g| g.parse().ok()),
            not_before: time(NOT_BEFORE_ANNOTATION),
            not_after: time(NOT_AFTER_ANNOTATION),
            rotation: annotations.get(ROTATE_ANNOTATION).cloned(),
            ips: annotations
                .get(IP_ADDRESSES_ANNOTATION)
                .map(|ips| ips.split(',').filter_map(|ip| ip.trim().parse().ok()).collect())
                .unwrap_or_default(),
        })
    }

    /// Whether this certificate should be replaced: due for renewal, unreadable validity, or
    /// issued under another rotation request.
    pub fn needs_replacing(&self, rotation: Option<&str>, now: Timestamp) -> bool {
        let due = match (self.not_before, self.not_after) {
            (Some(from), Some(to)) => crate::certs::due_for_renewal(from, to, now),
            _ => true,
        };
        due || self.rotation.as_deref() != rotation
    }
}

/// What to do with the issued server and peer Secrets.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GenerationPlan {
    /// The generation the pods are to mount.
    pub current: u32,
    /// Whether `current` has to be issued first (it does not exist yet).
    pub issue: bool,
    /// Generations to delete: older than the one before `current`.
    pub delete: Vec<String>,
}

/// Decides the generation the pods mount, from the issued Secrets found. The newest complete
/// generation (both its Secrets exist) is kept while it is valid and was issued under the
/// cluster's current rotation request; otherwise the next one is issued.
pub fn plan_generation(found: &[IssuedSecret], rotation: Option<&str>, now: Timestamp) -> GenerationPlan {
    let mut generations: BTreeMap<u32, Vec<&IssuedSecret>> = BTreeMap::new();
    for secret in found
        .iter()
        .filter(|s| s.certificate == "client" || s.certificate == "peer")
    {
        if let Some(generation) = secret.generation {
            generations.entry(generation).or_default().push(secret);
        }
    }
    let newest_complete = generations
        .iter()
        .rev()
        .find(|(_, secrets)| {
            secrets.iter().any(|s| s.certificate == "client") && secrets.iter().any(|s| s.certificate == "peer")
        })
        .map(|(generation, secrets)| (*generation, secrets));
    let newest = generations.keys().next_back().copied().unwrap_or(0);
    let (current, issue) = match newest_complete {
        Some((generation, secrets)) if !secrets.iter().any(|s| s.needs_replacing(rotation, now)) => (generation, false),
        // A half-written generation (a reconcile stopped between the two writes) is written
        // again under a fresh number: issued Secrets are never changed in place.
        _ => (newest + 1, true),
    };
    let delete = generations
        .iter()
        .filter(|(generation, _)| **generation + 1 < current)
        .flat_map(|(_, secrets)| secrets.iter().map(|s| s.name.clone()))
        .collect();
    GenerationPlan { current, issue, delete }
}

fn secret_metadata(cluster: &ValidCluster, name: &str, certificate: &str) -> ObjectMeta {
    let mut labels = cluster.names.labels();
    labels.insert(CERTIFICATE_LABEL.into(), certificate.into());
    ObjectMeta {
        name: Some(name.into()),
        namespace: Some(cluster.names.namespace.clone()),
        labels: Some(labels),
        owner_references: Some(vec![cluster.owner.clone()]),
        ..ObjectMeta::default()
    }
}

fn bytes(text: &str) -> ByteString {
    ByteString(text.as_bytes().to_vec())
}

/// The Secret keeping the cluster's two CAs. Written once, with create: replacing it would
/// leave every issued certificate without the CA that can renew it.
pub fn build_ca_secret(cluster: &ValidCluster, cas: &ClusterCas) -> Secret {
    Secret {
        metadata: secret_metadata(cluster, &ca_secret_name(&cluster.names), "ca"),
        type_: Some("Opaque".into()),
        data: Some(BTreeMap::from([
            (CLIENT_CA_CERT.into(), bytes(&cas.client.cert_pem)),
            (CLIENT_CA_KEY.into(), bytes(&cas.client.key_pem)),
            (PEER_CA_CERT.into(), bytes(&cas.peer.cert_pem)),
            (PEER_CA_KEY.into(), bytes(&cas.peer.key_pem)),
        ])),
        ..Secret::default()
    }
}

/// The CAs kept in `secret`.
pub fn read_ca_secret(secret: &Secret) -> Result<ClusterCas> {
    let data = secret.data.as_ref();
    let text = |key: &str| -> Result<String> {
        data.and_then(|d| d.get(key))
            .and_then(|b| String::from_utf8(b.0.clone()).ok())
            .ok_or_else(|| {
                Error::Certificate(format!(
                    "the CA Secret {} has no {key}",
                    secret.metadata.name.as_deref().unwrap_or_default()
                ))
            })
    };
    Ok(ClusterCas {
        client: CertifiedKey {
            cert_pem: text(CLIENT_CA_CERT)?,
            key_pem: text(CLIENT_CA_KEY)?,
        },
        peer: CertifiedKey {
            cert_pem: text(PEER_CA_CERT)?,
            key_pem: text(PEER_CA_KEY)?,
        },
    })
}

/// What an issued Secret records besides its certificate.
#[derive(Clone, Copy, Debug, Default)]
pub struct SecretRecord<'a> {
    /// The generation, for server and peer Secrets.
    pub generation: Option<u32>,
    /// The [`ROTATE_ANNOTATION`] value it answers.
    pub rotation: Option<&'a str>,
    /// The pod IPs the certificate names.
    pub ips: &'a [IpAddr],
}

/// A `kubernetes.io/tls` Secret holding an issued certificate, its key and its CA, labelled
/// with what it is and annotated with its validity, the rotation request it answers and the
/// pod IPs it names.
pub fn build_issued_secret(
    cluster: &ValidCluster,
    name: &str,
    certificate: &str,
    issued: &Issued,
    record: SecretRecord<'_>,
) -> Secret {
    let SecretRecord {
        generation,
        rotation,
        ips,
    } = record;
    let mut metadata = secret_metadata(cluster, name, certificate);
    if let Some(generation) = generation {
        metadata
            .labels
            .get_or_insert_with(BTreeMap::new)
            .insert(GENERATION_LABEL.into(), generation.to_string());
    }
    let mut annotations = BTreeMap::from([
        (NOT_BEFORE_ANNOTATION.to_string(), issued.not_before.to_string()),
        (NOT_AFTER_ANNOTATION.to_string(), issued.not_after.to_string()),
    ]);
    if let Some(rotation) = rotation {
        annotations.insert(ROTATE_ANNOTATION.into(), rotation.into());
    }
    if !ips.is_empty() {
        let ips: Vec<String> = ips.iter().map(ToString::to_string).collect();
        annotations.insert(IP_ADDRESSES_ANNOTATION.into(), ips.join(","));
    }
    metadata.annotations = Some(annotations);
    Secret {
        metadata,
        type_: Some("kubernetes.io/tls".into()),
        data: Some(BTreeMap::from([
            (TLS_CERT_KEY.into(), bytes(&issued.certified.cert_pem)),
            (TLS_KEY_KEY.into(), bytes(&issued.certified.key_pem)),
            (CA_CERT_KEY.into(), bytes(&issued.ca_pem)),
        ])),
        ..Secret::default()
    }
}

/// What the operator's node client needs to reach a TLS cluster: the CA the nodes' client-port
/// certificates chain to, and the operator's own certificate and key.
#[derive(Clone, PartialEq, Eq)]
pub struct NodeTls {
    /// The CA of the client port's server certificate, PEM.
    pub ca_pem: String,
    /// The operator's client certificate followed by its private key, PEM.
    pub identity_pem: String,
}

impl std::fmt::Debug for NodeTls {
    // The private key stays out of logs.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeTls").finish_non_exhaustive()
    }
}

fn secret_text(secret: &Secret, key: &str) -> Result<String> {
    secret
        .data
        .as_ref()
        .and_then(|d| d.get(key))
        .and_then(|b| String::from_utf8(b.0.clone()).ok())
        .filter(|t| !t.trim().is_empty())
        .ok_or_else(|| {
            Error::Certificate(format!(
                "Secret {} has no {key}",
                secret.metadata.name.as_deref().unwrap_or_default()
            ))
        })
}

/// The node client's TLS material from the client Secret (its `ca.crt`) and the operator's
/// Secret (`tls.crt`, `tls.key`).
pub fn node_tls(client: &Secret, operator: &Secret) -> Result<NodeTls> {
    let ca_pem = secret_text(client, CA_CERT_KEY)?;
    let cert = secret_text(operator, TLS_CERT_KEY)?;
    let key = secret_text(operator, TLS_KEY_KEY)?;
    Ok(NodeTls {
        ca_pem,
        identity_pem: format!("{}\n{}", cert.trim_end(), key),
    })
}

#[cfg(test)]
mod tests {
    use k8s_openapi::jiff::SignedDuration;

    use super::*;

    fn now() -> Timestamp {
        "2026-12-01T10:00:00Z".parse().unwrap()
    }

    fn issued(name: &str, certificate: &str, generation: u32, age_hours: i64, rotation: Option<&str>) -> IssuedSecret {
        let not_before = now() - SignedDuration::from_hours(age_hours);
        IssuedSecret {
            name: name.into(),
            certificate: certificate.into(),
            generation: Some(generation),
            not_before: Some(not_before),
            not_after: Some(not_before + SignedDuration::from_hours(90)),
            rotation: rotation.map(String::from),
            ips: BTreeSet::new(),
        }
    }

    #[test]
    fn the_first_generation_is_issued_when_there_is_none() {
        let plan = plan_generation(&[], None, now());
        assert_eq!(
            plan,
            GenerationPlan {
                current: 1,
                issue: true,
                delete: vec![]
            }
        );
    }

    #[test]
    fn a_valid_generation_is_kept() {
        let found = [issued("c1", "client", 1, 10, None), issued("p1", "peer", 1, 10, None)];
        let plan = plan_generation(&found, None, now());
        assert_eq!((plan.current, plan.issue), (1, false));
    }

    #[test]
    fn a_generation_due_for_renewal_is_followed_by_the_next_and_the_one_before_is_deleted() {
        let found = [
            issued("c1", "client", 1, 200, None),
            issued("p1", "peer", 1, 200, None),
            issued("c2", "client", 2, 61, None),
            issued("p2", "peer", 2, 61, None),
        ];
        let plan = plan_generation(&found, None, now());
        assert_eq!(plan.current, 3);
        assert!(plan.issue);
        assert_eq!(
            plan.delete,
            ["c1", "p1"],
            "generation 2 stays for the pods not yet restarted"
        );
    }

    #[test]
    fn a_new_rotation_request_issues_a_new_generation() {
        let found = [issued("c1", "client", 1, 1, None), issued("p1", "peer", 1, 1, None)];
        let plan = plan_generation(&found, Some("2026-12-01"), now());
        assert_eq!((plan.current, plan.issue), (2, true));
        let found = [
            issued("c2", "client", 2, 1, Some("2026-12-01")),
            issued("p2", "peer", 2, 1, Some("2026-12-01")),
        ];
        let plan = plan_generation(&found, Some("2026-12-01"), now());
        assert_eq!((plan.current, plan.issue), (2, false));
    }

    #[test]
    fn a_half_written_generation_is_not_mounted_and_gets_a_fresh_number() {
        let found = [
            issued("c1", "client", 1, 1, None),
            issued("p1", "peer", 1, 1, None),
            issued("c2", "client", 2, 1, None),
        ];
        let plan = plan_generation(&found, None, now());
        assert_eq!(
            (plan.current, plan.issue),
            (1, false),
            "generation 1 is complete and valid"
        );
        let found = [issued("c1", "client", 1, 1, None)];
        let plan = plan_generation(&found, None, now());
        assert_eq!((plan.current, plan.issue), (2, true));
    }

    #[test]
    fn an_issued_secret_reads_back_what_it_was_built_with() {
        let cluster = crate::build::validate(
            &crate::fixtures::raft_cluster(3, Some("img")),
            &crate::config::OperatorConfig::default(),
        )
        .unwrap();
        let cas = crate::certs::new_cluster_cas(&cluster.names, now()).unwrap();
        let ip: IpAddr = "127.9.0.3".parse().unwrap();
        let cert = crate::certs::issue_peer(&cluster.names, &cas, now(), 90, &[ip]).unwrap();
        let record = SecretRecord {
            generation: Some(4),
            rotation: Some("x"),
            ips: &[ip],
        };
        let secret = build_issued_secret(&cluster, "demo-peer-tls-4", "peer", &cert, record);
        assert_eq!(secret.type_.as_deref(), Some("kubernetes.io/tls"));
        let read = IssuedSecret::read(&secret).unwrap();
        assert_eq!(read.generation, Some(4));
        assert_eq!(read.not_after, Some(cert.not_after));
        assert_eq!(read.rotation.as_deref(), Some("x"));
        assert_eq!(read.ips, BTreeSet::from([ip]));
        assert!(!read.needs_replacing(Some("x"), now()));
        assert!(read.needs_replacing(None, now()));
        assert_eq!(read_ca_secret(&build_ca_secret(&cluster, &cas)).unwrap(), cas);
    }
}
