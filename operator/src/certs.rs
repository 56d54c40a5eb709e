//! The certificates the operator issues for a cluster whose `spec.tls` names no Secrets: two
//! CAs per cluster (one for the client port, one for the peer port), the server and peer
//! certificates every pod mounts, the operator's own `admin` client certificate, and a `write`
//! client certificate for applications. rcgen does the X.509 work; this module decides what
//! each certificate says and when it is due for renewal.
//!
//! Every pod mounts the same server and peer certificate, naming every pod's stable DNS name
//! (ordinals `0..MAX_REPLICAS`), so a scale-up needs no new certificate and a certificate can be
//! mounted through the StatefulSet's one pod template. The CAs live ten years and are never
//! rotated by the operator; leaf certificates are renewed when a third of their lifetime is left.
//!
//! Everything here is pure apart from key generation: the caller passes the time.

use std::net::IpAddr;

use k8s_openapi::jiff::{SignedDuration, Timestamp};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};

use crate::crd::MAX_REPLICAS;
use crate::names::ClusterNames;
use crate::{Error, Result};

/// How long a CA the operator creates is valid: ten years, because the operator does not rotate
/// CAs (a CA rotation needs both CAs trusted during the change, which is left to the user).
pub const CA_LIFETIME: SignedDuration = SignedDuration::from_hours(24 * 365 * 10);
/// How long an issued leaf certificate is valid when the spec does not say: 90 days.
pub const DEFAULT_LIFETIME_HOURS: u32 = 24 * 90;
/// Backdating of `notBefore`, so a node whose clock is slightly behind accepts a new
/// certificate at once.
const CLOCK_SKEW: SignedDuration = SignedDuration::from_mins(5);

/// The role of the operator's own client certificate: the admin API needs it.
pub const OPERATOR_ROLE: &str = "admin";
/// The role of the client certificate the operator issues for applications.
pub const APPLICATION_ROLE: &str = "write";

/// A certificate and its private key, both PEM.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CertifiedKey {
    /// The certificate, PEM.
    pub cert_pem: String,
    /// Its PKCS#8 private key, PEM.
    pub key_pem: String,
}

/// A leaf certificate with the CA that issued it and its validity.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Issued {
    /// The certificate and key.
    pub certified: CertifiedKey,
    /// The issuing CA's certificate, PEM.
    pub ca_pem: String,
    /// Start of validity (already backdated by the allowed clock skew).
    pub not_before: Timestamp,
    /// End of validity.
    pub not_after: Timestamp,
}

/// The two CAs of a cluster.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClusterCas {
    /// Issues the client port's server certificate and every client certificate.
    pub client: CertifiedKey,
    /// Issues the peer certificates.
    pub peer: CertifiedKey,
}

/// What a certificate is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Purpose {
    /// A server certificate on the client port.
    ClientServer,
    /// A peer certificate: server on the peer port and client of the other members.
    Peer,
    /// A client certificate with a role.
    Client,
}

/// The cluster name peers prove in their certificate: the `RaftCluster`'s name and namespace,
/// so two clusters of one name in different namespaces that share a CA still refuse each other.
pub fn peer_cluster_name(names: &ClusterNames) -> String {
    format!("{}.{}", names.cluster, names.namespace)
}

/// The URI SAN every peer certificate of the cluster carries (`--peer-cluster-name`'s form).
pub fn peer_cluster_uri(names: &ClusterNames) -> String {
    format!("urn:raftkv:cluster:{}", peer_cluster_name(names))
}

/// The DNS name the operator verifies a pod's certificate against, and under which every pod
/// is reachable: `<pod>.<peer service>.<namespace>.svc`.
pub fn pod_dns_name(names: &ClusterNames, ordinal: u32) -> String {
    format!("{}.{}", names.pod(ordinal), peer_domain(names))
}

/// The domain all pod DNS names share: `<peer service>.<namespace>.svc`.
pub fn peer_domain(names: &ClusterNames) -> String {
    format!("{}.{}.svc", names.peer_service(), names.namespace)
}

/// Every DNS name a pod of the cluster may be reached by, for ordinals `0..MAX_REPLICAS`; with
/// the client Service's names when `client_service` is set.
fn dns_names(names: &ClusterNames, client_service: bool) -> Vec<String> {
    let mut out = Vec::new();
    for ordinal in 0..MAX_REPLICAS as u32 {
        let name = pod_dns_name(names, ordinal);
        out.push(format!("{name}.cluster.local"));
        out.push(name);
    }
    if client_service {
        let service = names.client_service();
        let namespace = &names.namespace;
        out.extend([
            service.to_string(),
            format!("{service}.{namespace}"),
            format!("{service}.{namespace}.svc"),
            format!("{service}.{namespace}.svc.cluster.local"),
            // `kubectl port-forward` and the local checks reach the client port on loopback.
            "localhost".to_string(),
        ]);
    }
    out
}

fn offset_date_time(t: Timestamp) -> Result<time::OffsetDateTime> {
    time::OffsetDateTime::from_unix_timestamp(t.as_second())
        .map_err(|e| Error::Certificate(format!("time {t} out of range: {e}")))
}

fn rcgen_error(what: &str) -> impl FnOnce(rcgen::Error) -> Error + '_ {
    move |e| Error::Certificate(format!("{what}: {e}"))
}

/// The CA's parameters. They are rebuilt from the names rather than parsed from the stored
/// certificate: the issuer's distinguished name is all a signature needs from them, and this
/// keeps the X.509 parser out of the operator.
fn ca_params(names: &ClusterNames, which: &str, now: Timestamp) -> Result<CertificateParams> {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "raftkv");
    dn.push(
        DnType::CommonName,
        format!("raftkv {which} CA {}/{}", names.namespace, names.cluster),
    );
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    params.not_before = offset_date_time(now - CLOCK_SKEW)?;
    params.not_after = offset_date_time(now + CA_LIFETIME)?;
    Ok(params)
}

/// Two new CAs for the cluster.
pub fn new_cluster_cas(names: &ClusterNames, now: Timestamp) -> Result<ClusterCas> {
    let ca = |which: &str| -> Result<CertifiedKey> {
        let key = KeyPair::generate().map_err(rcgen_error("generating a CA key"))?;
        let cert = ca_params(names, which, now)?
            .self_signed(&key)
            .map_err(rcgen_error("signing a CA"))?;
        Ok(CertifiedKey {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    };
    Ok(ClusterCas {
        client: ca("client")?,
        peer: ca("peer")?,
    })
}

/// A certificate to issue.
struct Request<'a> {
    purpose: Purpose,
    /// Common name and, for client certificates, the role (subject Organization).
    subject: (&'a str, Option<&'a str>),
    /// Pod IPs to name besides the DNS names (see [`issue_peer`]).
    ips: &'a [IpAddr],
}

fn issue(
    names: &ClusterNames,
    ca: &CertifiedKey,
    ca_which: &str,
    request: Request<'_>,
    now: Timestamp,
    lifetime_hours: u32,
) -> Result<Issued> {
    let Request { purpose, subject, ips } = request;
    let ca_key = KeyPair::from_pem(&ca.key_pem).map_err(rcgen_error("reading the CA key"))?;
    let issuer = Issuer::new(ca_params(names, ca_which, now)?, ca_key);
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    let (common_name, organization) = subject;
    if let Some(organization) = organization {
        dn.push(DnType::OrganizationName, organization);
    }
    dn.push(DnType::CommonName, common_name);
    params.distinguished_name = dn;
    params.use_authority_key_identifier_extension = true;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
    let mut sans = Vec::new();
    match purpose {
        Purpose::ClientServer => {
            params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
            sans.extend(dns_names(names, true));
        }
        Purpose::Peer => {
            // The same certificate serves the peer port and dials the other members.
            params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
            sans.extend(dns_names(names, false));
        }
        Purpose::Client => params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth],
    }
    params.subject_alt_names = sans
        .into_iter()
        .map(|name| {
            name.try_into()
                .map(SanType::DnsName)
                .map_err(|e| Error::Certificate(format!("DNS name: {e}")))
        })
        .collect::<Result<Vec<_>>>()?;
    params
        .subject_alt_names
        .extend(ips.iter().map(|ip| SanType::IpAddress(*ip)));
    if purpose == Purpose::Peer {
        let uri = peer_cluster_uri(names)
            .try_into()
            .map_err(|e| Error::Certificate(format!("cluster URI: {e}")))?;
        params.subject_alt_names.push(SanType::URI(uri));
    }
    let not_before = now - CLOCK_SKEW;
    let not_after = now + SignedDuration::from_hours(i64::from(lifetime_hours));
    params.not_before = offset_date_time(not_before)?;
    params.not_after = offset_date_time(not_after)?;
    let key = KeyPair::generate().map_err(rcgen_error("generating a key"))?;
    let cert = params.signed_by(&key, &issuer).map_err(rcgen_error("signing"))?;
    Ok(Issued {
        certified: CertifiedKey {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        },
        ca_pem: ca.cert_pem.clone(),
        not_before,
        not_after,
    })
}

/// The client port's server certificate: every pod's DNS names and the client Service's, and
/// `ips` (see [`issue_peer`]).
pub fn issue_client_server(
    names: &ClusterNames,
    cas: &ClusterCas,
    now: Timestamp,
    lifetime_hours: u32,
    ips: &[IpAddr],
) -> Result<Issued> {
    let common_name = format!("{}.{}.svc", names.client_service(), names.namespace);
    let request = Request {
        purpose: Purpose::ClientServer,
        subject: (&common_name, None),
        ips,
    };
    issue(names, &cas.client, "client", request, now, lifetime_hours)
}

/// The peer certificate: every pod's DNS names and the cluster's URI SAN. `ips` are the pod
/// IPs of a cluster whose members advertise their IP (pod-IP addressing): their peers then
/// verify the certificate against that IP.
pub fn issue_peer(
    names: &ClusterNames,
    cas: &ClusterCas,
    now: Timestamp,
    lifetime_hours: u32,
    ips: &[IpAddr],
) -> Result<Issued> {
    let common_name = peer_domain(names);
    let request = Request {
        purpose: Purpose::Peer,
        subject: (&common_name, None),
        ips,
    };
    issue(names, &cas.peer, "peer", request, now, lifetime_hours)
}

/// A client certificate for `user` with `role` as its subject Organization, which the node
/// reads as the role (`read`, `write` or `admin`).
pub fn issue_client(
    names: &ClusterNames,
    cas: &ClusterCas,
    user: &str,
    role: &str,
    now: Timestamp,
    lifetime_hours: u32,
) -> Result<Issued> {
    let request = Request {
        purpose: Purpose::Client,
        subject: (user, Some(role)),
        ips: &[],
    };
    issue(names, &cas.client, "client", request, now, lifetime_hours)
}

/// Whether a certificate valid from `not_before` to `not_after` is due for renewal at `now`:
/// once less than a third of its lifetime is left. A renewal then has two thirds of a lifetime to
/// roll out before anything expires.
pub fn due_for_renewal(not_before: Timestamp, not_after: Timestamp, now: Timestamp) -> bool {
    let lifetime = not_after.duration_since(not_before);
    let left = not_after.duration_since(now);
    left < lifetime / 3
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names() -> ClusterNames {
        ClusterNames::new("demo", "prod")
    }

    fn now() -> Timestamp {
        "2026-12-01T10:00:00Z".parse().unwrap()
    }

    /// The certificate's DER bytes, from its PEM.
    fn der(pem: &str) -> Vec<u8> {
        use base64::Engine as _;
        let body: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
        base64::engine::general_purpose::STANDARD
            .decode(body)
            .expect("PEM body")
    }

    fn contains(haystack: &[u8], needle: &[u8]) -> bool {
        haystack.windows(needle.len()).any(|w| w == needle)
    }

    #[test]
    fn peer_certificates_name_every_pod_and_the_cluster() {
        let cas = new_cluster_cas(&names(), now()).unwrap();
        let peer = issue_peer(&names(), &cas, now(), 24, &[]).unwrap();
        let der = der(&peer.certified.cert_pem);
        assert!(contains(&der, b"urn:raftkv:cluster:demo.prod"));
        assert!(contains(&der, b"demo-0.demo-peer.prod.svc"));
        assert!(contains(&der, b"demo-8.demo-peer.prod.svc.cluster.local"));
        assert!(
            !contains(&der, b"demo.prod.svc"),
            "no client Service name on a peer certificate"
        );
        assert_eq!(peer.ca_pem, cas.peer.cert_pem);
    }

    #[test]
    fn the_client_port_certificate_names_the_client_service_and_every_pod() {
        let cas = new_cluster_cas(&names(), now()).unwrap();
        let server = issue_client_server(&names(), &cas, now(), 24, &[]).unwrap();
        let der = der(&server.certified.cert_pem);
        assert!(contains(&der, b"demo.prod.svc"));
        assert!(contains(&der, b"demo-2.demo-peer.prod.svc"));
        assert!(!contains(&der, b"urn:raftkv:cluster"));
        assert_eq!(server.ca_pem, cas.client.cert_pem);
    }

    #[test]
    fn pod_ips_are_named_when_given() {
        let cas = new_cluster_cas(&names(), now()).unwrap();
        let ip: IpAddr = "127.9.0.3".parse().unwrap();
        let peer = issue_peer(&names(), &cas, now(), 24, &[ip]).unwrap();
        assert!(contains(&der(&peer.certified.cert_pem), &[127, 9, 0, 3]));
    }

    #[test]
    fn a_client_certificate_carries_its_role_as_organization() {
        let cas = new_cluster_cas(&names(), now()).unwrap();
        let client = issue_client(&names(), &cas, "raftkv-operator", OPERATOR_ROLE, now(), 24).unwrap();
        let der = der(&client.certified.cert_pem);
        assert!(contains(&der, b"raftkv-operator"));
        assert!(contains(&der, b"admin"));
        assert_eq!(client.not_after, now() + SignedDuration::from_hours(24));
        assert!(client.not_before < now(), "backdated for clock skew");
    }

    #[test]
    fn certificates_are_issued_by_the_stored_ca_after_a_restart() {
        // The issuer is rebuilt from the stored key and the names: a certificate issued later
        // names the CA's subject as its issuer, exactly as the CA certificate states it.
        let cas = new_cluster_cas(&names(), now()).unwrap();
        let later = now() + SignedDuration::from_hours(24 * 30);
        let peer = issue_peer(&names(), &cas, later, 24, &[]).unwrap();
        let ca_der = der(&cas.peer.cert_pem);
        let subject = b"raftkv peer CA prod/demo";
        assert!(contains(&ca_der, subject));
        assert!(contains(&der(&peer.certified.cert_pem), subject));
    }

    #[test]
    fn renewal_is_due_once_a_third_of_the_lifetime_is_left() {
        let start = now();
        let end = start + SignedDuration::from_hours(90);
        assert!(!due_for_renewal(start, end, start));
        assert!(!due_for_renewal(start, end, start + SignedDuration::from_hours(59)));
        assert!(due_for_renewal(start, end, start + SignedDuration::from_hours(61)));
        assert!(due_for_renewal(start, end, end + SignedDuration::from_hours(1)));
    }
}
