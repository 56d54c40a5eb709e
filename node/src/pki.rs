//! Throwaway certificates: a CA made on the spot and the certificates it issues, for
//! `raftkv-node local --tls` and for tests. Production certificates come from elsewhere
//! (cert-manager, or the operator's own CA); nothing here is meant to last.

use std::net::IpAddr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};

use crate::error::{Error, Result};

fn pki_error(e: rcgen::Error) -> Error {
    Error::Config(format!("making a certificate: {e}"))
}

/// A certificate and its key, both PEM.
#[derive(Debug, Clone)]
pub struct Issued {
    /// The certificate (PEM).
    pub cert_pem: String,
    /// Its private key (PKCS#8 PEM).
    pub key_pem: String,
}

/// What to put in a certificate.
#[derive(Debug, Clone, Default)]
pub struct CertSpec {
    /// Subject CN: a client's user name.
    pub common_name: String,
    /// Subject O: a client's role (`read`, `write`, `admin`).
    pub organization: Option<String>,
    /// DNS names it is valid for.
    pub dns_names: Vec<String>,
    /// IP addresses it is valid for.
    pub ips: Vec<IpAddr>,
    /// URI SANs (`urn:raftkv:cluster:NAME` for a peer certificate).
    pub uris: Vec<String>,
    /// Validity window, seconds since the Unix epoch; `None`: from a day ago to a year ahead.
    pub valid: Option<(u64, u64)>,
}

impl CertSpec {
    /// A certificate for a member: valid for `ips` and `localhost`, usable as server and client.
    pub fn member(name: &str, ips: &[IpAddr], cluster: Option<&str>) -> Self {
        CertSpec {
            common_name: name.to_string(),
            dns_names: vec!["localhost".into()],
            ips: ips.to_vec(),
            uris: cluster
                .map(|c| format!("{}{c}", crate::tls::CLUSTER_URI_PREFIX))
                .into_iter()
                .collect(),
            ..Default::default()
        }
    }

    /// A client certificate for `user` with `role` as its organization.
    pub fn client(user: &str, role: &str) -> Self {
        CertSpec {
            common_name: user.to_string(),
            organization: Some(role.to_string()),
            ..Default::default()
        }
    }
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs()
}

/// Sets a certificate's validity window, in seconds since the Unix epoch.
fn set_validity(params: &mut CertificateParams, from: u64, until: u64) {
    // rcgen takes `time` dates without re-exporting the type: built from its own epoch date.
    let at = |secs: u64| rcgen::date_time_ymd(1970, 1, 1) + Duration::from_secs(secs);
    params.not_before = at(from);
    params.not_after = at(until);
}

/// A CA made on the spot.
pub struct ThrowawayCa {
    issuer: Issuer<'static, KeyPair>,
    cert_pem: String,
}

impl std::fmt::Debug for ThrowawayCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ThrowawayCa").finish_non_exhaustive()
    }
}

impl ThrowawayCa {
    /// A new CA named `name`, valid from a day ago for ten years.
    pub fn new(name: &str) -> Result<Self> {
        let key = KeyPair::generate().map_err(pki_error)?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, name);
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let now = now_secs();
        set_validity(&mut params, now.saturating_sub(86_400), now + 10 * 365 * 86_400);
        let cert = params.self_signed(&key).map_err(pki_error)?;
        Ok(ThrowawayCa {
            cert_pem: cert.pem(),
            issuer: Issuer::new(params, key),
        })
    }

    /// The CA certificate (PEM): what the other side trusts.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// Issues a certificate with a new key.
    pub fn issue(&self, spec: &CertSpec) -> Result<Issued> {
        let key = KeyPair::generate().map_err(pki_error)?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, spec.common_name.as_str());
        if let Some(o) = &spec.organization {
            dn.push(DnType::OrganizationName, o.as_str());
        }
        params.distinguished_name = dn;
        for name in &spec.dns_names {
            params
                .subject_alt_names
                .push(SanType::DnsName(name.as_str().try_into().map_err(pki_error)?));
        }
        params
            .subject_alt_names
            .extend(spec.ips.iter().map(|ip| SanType::IpAddress(*ip)));
        for uri in &spec.uris {
            params
                .subject_alt_names
                .push(SanType::URI(uri.as_str().try_into().map_err(pki_error)?));
        }
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        let now = now_secs();
        let (from, until) = spec.valid.unwrap_or((now.saturating_sub(86_400), now + 365 * 86_400));
        set_validity(&mut params, from, until);
        let cert = params.signed_by(&key, &self.issuer).map_err(pki_error)?;
        Ok(Issued {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_issued_client_certificate_carries_its_role_and_a_member_certificate_its_cluster() {
        let ca = ThrowawayCa::new("test CA").unwrap();
        let client = ca.issue(&CertSpec::client("alice", "write")).unwrap();
        let der = rustls_pki_types::CertificateDer::from_pem_slice(client.cert_pem.as_bytes()).unwrap();
        let subject = crate::tls::cert_subject(&der).unwrap();
        assert_eq!(subject.common_names, vec!["alice".to_string()]);
        assert_eq!(subject.organizations, vec!["write".to_string()]);
        let ip: IpAddr = "127.0.0.1".parse().unwrap();
        let member = ca.issue(&CertSpec::member("m1", &[ip], Some("prod"))).unwrap();
        let der = rustls_pki_types::CertificateDer::from_pem_slice(member.cert_pem.as_bytes()).unwrap();
        let subject = crate::tls::cert_subject(&der).unwrap();
        assert_eq!(subject.uris, vec!["urn:raftkv:cluster:prod".to_string()]);
    }

    use rustls_pki_types::pem::PemObject;
}
