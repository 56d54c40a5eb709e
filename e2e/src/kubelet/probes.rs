//! Probes: `httpGet` (HTTP or HTTPS, the latter without certificate checks, as a kubelet does), `tcpSocket` (and `grpc`, checked as a connection) and `exec` checks with
//! their delays, periods, timeouts and thresholds.

use std::net::Ipv4Addr;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::time::Instant;

use super::environment::expand;
use super::PodRuntime;

/// One configured probe and its running counts.
pub(super) struct Probe {
    /// The probe as the container spec gives it.
    pub(super) spec: Value,
    /// When the probe is to run next.
    pub(super) next_at: Instant,
    /// Consecutive successes, against `successThreshold`.
    successes: u64,
    /// Consecutive failures, against `failureThreshold`.
    failures: u64,
}

impl Probe {
    pub(super) fn new(spec: &Value, started: Instant) -> Option<Self> {
        if !spec.is_object() {
            return None;
        }
        let delay = spec["initialDelaySeconds"].as_u64().unwrap_or(0);
        Some(Probe {
            spec: spec.clone(),
            next_at: started + Duration::from_secs(delay),
            successes: 0,
            failures: 0,
        })
    }

    fn period(&self) -> Duration {
        Duration::from_secs(self.spec["periodSeconds"].as_u64().unwrap_or(10).max(1))
    }

    fn threshold(&self, field: &str, default: u64) -> u64 {
        self.spec[field].as_u64().unwrap_or(default).max(1)
    }

    /// Records a result; returns `Some(true)` once the success threshold is reached, `Some(false)`
    /// once the failure threshold is, `None` while undecided.
    pub(super) fn record(&mut self, success: bool) -> Option<bool> {
        self.next_at = Instant::now() + self.period();
        if success {
            self.failures = 0;
            self.successes += 1;
            (self.successes >= self.threshold("successThreshold", 1)).then_some(true)
        } else {
            self.successes = 0;
            self.failures += 1;
            (self.failures >= self.threshold("failureThreshold", 3)).then_some(false)
        }
    }
}

/// Sends `request` and reads the status code of the response.
async fn status_code<S: AsyncRead + AsyncWrite + Unpin>(mut stream: S, request: &str) -> Option<u16> {
    stream.write_all(request.as_bytes()).await.ok()?;
    let mut buffer = [0u8; 64];
    let mut read = 0;
    while read < 12 {
        let n = stream.read(&mut buffer[read..]).await.ok()?;
        if n == 0 {
            break;
        }
        read += n;
    }
    let line = String::from_utf8_lossy(&buffer[..read]).to_string();
    line.split_whitespace().nth(1)?.parse().ok()
}

/// The TLS client of HTTPS probes: any certificate is accepted, as a kubelet does, while the
/// handshake signatures are still checked so the connection is real TLS.
fn tls_connector() -> tokio_rustls::TlsConnector {
    static CONNECTOR: std::sync::OnceLock<tokio_rustls::TlsConnector> = std::sync::OnceLock::new();
    CONNECTOR
        .get_or_init(|| {
            let provider = Arc::new(rustls::crypto::ring::default_provider());
            let config = rustls::ClientConfig::builder_with_provider(provider.clone())
                .with_safe_default_protocol_versions()
                .expect("ring supports the default versions")
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(AnyCertificate(provider)))
                .with_no_client_auth();
            tokio_rustls::TlsConnector::from(Arc::new(config))
        })
        .clone()
}

/// Accepts every server certificate (kubelet probes skip verification).
#[derive(Debug)]
struct AnyCertificate(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &rustls_pki_types::CertificateDer<'_>,
        _intermediates: &[rustls_pki_types::CertificateDer<'_>],
        _server_name: &rustls_pki_types::ServerName<'_>,
        _ocsp_response: &[u8],
        _now: rustls_pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls_pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls_pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

pub(super) async fn check(
    probe: &Value,
    ip: Ipv4Addr,
    container: &Value,
    runtime: &PodRuntime,
    mapping_env: &[(String, String)],
) -> bool {
    let timeout = Duration::from_secs(probe["timeoutSeconds"].as_u64().unwrap_or(1).max(1));
    let port_of = |port: &Value| -> Option<u16> {
        match port {
            Value::Number(n) => n.as_u64().map(|p| p as u16),
            Value::String(name) => container["ports"]
                .as_array()?
                .iter()
                .find(|p| p["name"].as_str() == Some(name))
                .and_then(|p| p["containerPort"].as_u64())
                .map(|p| p as u16)
                .or_else(|| name.parse().ok()),
            _ => None,
        }
    };
    let attempt = async {
        if let Some(http) = probe.get("httpGet") {
            let host = http["host"]
                .as_str()
                .map(str::to_string)
                .unwrap_or_else(|| ip.to_string());
            let port = port_of(&http["port"])?;
            let path = http["path"].as_str().unwrap_or("/");
            let stream = tokio::net::TcpStream::connect((host.as_str(), port)).await.ok()?;
            let request = format!("GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUser-Agent: kube-probe/1.32\r\nAccept: */*\r\nConnection: close\r\n\r\n");
            let code = if http["scheme"].as_str() == Some("HTTPS") {
                // A kubelet's HTTPS probe does not verify the certificate and presents none.
                let name = rustls_pki_types::ServerName::try_from(host.clone())
                    .unwrap_or_else(|_| rustls_pki_types::ServerName::try_from("localhost").expect("a valid name"));
                let stream = tls_connector().connect(name.to_owned(), stream).await.ok()?;
                status_code(stream, &request).await?
            } else {
                status_code(stream, &request).await?
            };
            Some((200..400).contains(&code))
        } else if let Some(tcp) = probe.get("tcpSocket").or_else(|| probe.get("grpc")) {
            let host = tcp["host"]
                .as_str()
                .map(str::to_string)
                .unwrap_or_else(|| ip.to_string());
            let port = port_of(&tcp["port"])?;
            Some(tokio::net::TcpStream::connect((host.as_str(), port)).await.is_ok())
        } else if let Some(exec) = probe.get("exec") {
            let command: Vec<String> = exec["command"]
                .as_array()?
                .iter()
                .map(|s| expand(s.as_str().unwrap_or_default(), mapping_env))
                .collect();
            let (program, args) = command.split_first()?;
            let status = tokio::process::Command::new(program)
                .args(args)
                .env_clear()
                .envs(mapping_env.iter().cloned())
                .current_dir(&runtime.scratch)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .kill_on_drop(true)
                .status()
                .await
                .ok()?;
            Some(status.success())
        } else {
            Some(true)
        }
    };
    matches!(tokio::time::timeout(timeout, attempt).await, Ok(Some(true)))
}
