//! TLS for both ports: building rustls configurations from PEM files, reloading them when the
//! files change on disk, the peer port's cluster check, and the one client every outgoing peer
//! connection goes through (the Raft transport, admin forwarding, the bootstrap probe).
//!
//! The client port serves TLS with its own certificate; with `--client-ca-file` it asks clients
//! for a certificate and verifies any presented one against that CA, but a client without one may
//! still authenticate with a token (see `api::auth`). The peer port is mutual TLS both ways: the
//! server requires a certificate chaining to the peer CA, the outgoing client presents the same
//! peer certificate and verifies the server's; with `--peer-cluster-name` both sides also require
//! the URI SAN `urn:raftkv:cluster:NAME`, so a certificate from the same CA issued to another
//! cluster is refused during the handshake.
//!
//! Rotation: a [`Reloading`] value re-reads its files every poll interval and swaps in a new
//! configuration when their content changed and it builds (a half-written pair, a key that does
//! not match its certificate, is refused and the previous configuration kept). Each new handshake
//! takes the configuration current at that moment; established connections keep the one they
//! were made with, so rotation closes nothing.

use std::fmt::Debug;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::TokioIo;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, DigitallySignedStruct, DistinguishedName, RootCertStore, ServerConfig, SignatureScheme};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use crate::error::{Error, Result};

/// The URI SAN prefix naming the cluster a peer certificate was issued to.
pub const CLUSTER_URI_PREFIX: &str = "urn:raftkv:cluster:";
/// How long a TLS handshake may take on accept before the connection is dropped: a client that
/// opens a socket and sends nothing must not hold a connection slot.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long connecting to a peer (TCP and TLS) may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// The PEM files of one TLS identity.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    /// Certificate chain, leaf first.
    pub cert: PathBuf,
    /// The leaf's private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// CA bundle that the other side's certificate must chain to.
    pub ca: Option<PathBuf>,
}

impl TlsFiles {
    fn paths(&self) -> Vec<PathBuf> {
        let mut paths = vec![self.cert.clone(), self.key.clone()];
        paths.extend(self.ca.clone());
        paths
    }
}

/// The ring provider: it builds without cmake or nasm, which keeps CI simple.
fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn tls_error(what: &str, path: &Path, e: impl std::fmt::Display) -> Error {
    Error::Config(format!("{what} {}: {e}", path.display()))
}

fn parse_certs(pem: &[u8], path: &Path) -> Result<Vec<CertificateDer<'static>>> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| tls_error("certificate file", path, e))?;
    if certs.is_empty() {
        return Err(tls_error("certificate file", path, "holds no certificate"));
    }
    Ok(certs)
}

fn parse_key(pem: &[u8], path: &Path) -> Result<PrivateKeyDer<'static>> {
    PrivateKeyDer::from_pem_slice(pem).map_err(|e| tls_error("key file", path, e))
}

fn parse_roots(pem: &[u8], path: &Path) -> Result<Arc<RootCertStore>> {
    let mut roots = RootCertStore::empty();
    for cert in parse_certs(pem, path)? {
        roots.add(cert).map_err(|e| tls_error("CA file", path, e))?;
    }
    Ok(Arc::new(roots))
}

/// What a verified certificate says about its holder.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CertSubject {
    /// The subject's common names (CN): a client certificate's user name.
    pub common_names: Vec<String>,
    /// The subject's organizations (O): a client certificate's role.
    pub organizations: Vec<String>,
    /// The URI subject alternative names: a peer certificate's cluster.
    pub uris: Vec<String>,
}

/// Reads the subject and URI SANs of a DER certificate; `None` when it does not parse.
pub fn cert_subject(der: &[u8]) -> Option<CertSubject> {
    use x509_parser::extensions::GeneralName;
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let text = |attrs: Vec<&x509_parser::x509::AttributeTypeAndValue<'_>>| -> Vec<String> {
        attrs
            .into_iter()
            .filter_map(|a| a.as_str().ok().map(str::to_string))
            .collect()
    };
    let uris = match cert.subject_alternative_name() {
        Ok(Some(san)) => san
            .value
            .general_names
            .iter()
            .filter_map(|n| match n {
                GeneralName::URI(uri) => Some(uri.to_string()),
                _ => None,
            })
            .collect(),
        _ => Vec::new(),
    };
    Some(CertSubject {
        common_names: text(cert.subject().iter_common_name().collect()),
        organizations: text(cert.subject().iter_organization().collect()),
        uris,
    })
}

/// Refuses a peer certificate that does not carry `urn:raftkv:cluster:<cluster>`.
fn check_cluster(end_entity: &CertificateDer<'_>, cluster: &Option<String>) -> Result<(), rustls::Error> {
    let Some(cluster) = cluster else { return Ok(()) };
    let wanted = format!("{CLUSTER_URI_PREFIX}{cluster}");
    let subject =
        cert_subject(end_entity).ok_or(rustls::Error::InvalidCertificate(rustls::CertificateError::BadEncoding))?;
    if subject.uris.contains(&wanted) {
        Ok(())
    } else {
        tracing::warn!(
            wanted = %wanted,
            presented = ?subject.uris,
            "refused a peer certificate issued to another cluster"
        );
        Err(rustls::Error::InvalidCertificate(
            rustls::CertificateError::ApplicationVerificationFailure,
        ))
    }
}

/// The peer server's verifier: the CA chain (webpki), then the cluster's URI SAN.
#[derive(Debug)]
struct ClusterClientVerifier {
    inner: Arc<dyn ClientCertVerifier>,
    cluster: Option<String>,
}

impl ClientCertVerifier for ClusterClientVerifier {
    fn offer_client_auth(&self) -> bool {
        self.inner.offer_client_auth()
    }
    fn client_auth_mandatory(&self) -> bool {
        self.inner.client_auth_mandatory()
    }
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }
    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let verified = self.inner.verify_client_cert(end_entity, intermediates, now)?;
        check_cluster(end_entity, &self.cluster)?;
        Ok(verified)
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// The peer client's verifier: the CA chain and host name (webpki), then the cluster's URI SAN.
#[derive(Debug)]
struct ClusterServerVerifier {
    inner: Arc<dyn ServerCertVerifier>,
    cluster: Option<String>,
}

impl ServerCertVerifier for ClusterServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let verified = self
            .inner
            .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)?;
        check_cluster(end_entity, &self.cluster)?;
        Ok(verified)
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// The client port's server configuration from the files' contents: `[cert, key, ca?]`.
fn build_client_port(files: &TlsFiles, contents: &[Vec<u8>]) -> Result<Arc<ServerConfig>> {
    let certs = parse_certs(&contents[0], &files.cert)?;
    let key = parse_key(&contents[1], &files.key)?;
    let builder = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::Config(format!("TLS versions: {e}")))?;
    let builder = match (&files.ca, contents.get(2)) {
        (Some(path), Some(pem)) => {
            // Offered, verified when presented, but not required: a client without a
            // certificate may still authenticate with a token.
            let verifier = WebPkiClientVerifier::builder_with_provider(parse_roots(pem, path)?, provider())
                .allow_unauthenticated()
                .build()
                .map_err(|e| tls_error("client CA", path, e))?;
            builder.with_client_cert_verifier(verifier)
        }
        _ => builder.with_no_client_auth(),
    };
    // with_single_cert refuses a key that does not match the certificate: a rotation caught
    // between writing the certificate and the key keeps the previous pair.
    let mut config = builder
        .with_single_cert(certs, key)
        .map_err(|e| tls_error("certificate and key", &files.cert, e))?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// Both sides of the peer port: what the server accepts and what the outgoing client presents.
#[derive(Debug)]
pub struct PeerTls {
    /// The peer port's server configuration (client certificates required).
    pub server: Arc<ServerConfig>,
    /// The configuration of every outgoing peer connection.
    pub client: Arc<ClientConfig>,
}

fn build_peer(files: &TlsFiles, cluster: &Option<String>, contents: &[Vec<u8>]) -> Result<PeerTls> {
    let ca_path = files
        .ca
        .as_ref()
        .ok_or_else(|| Error::Config("peer TLS needs --peer-ca-file".into()))?;
    let certs = parse_certs(&contents[0], &files.cert)?;
    let key = parse_key(&contents[1], &files.key)?;
    let roots = parse_roots(&contents[2], ca_path)?;
    let verifier = WebPkiClientVerifier::builder_with_provider(roots.clone(), provider())
        .build()
        .map_err(|e| tls_error("peer CA", ca_path, e))?;
    let mut server = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::Config(format!("TLS versions: {e}")))?
        .with_client_cert_verifier(Arc::new(ClusterClientVerifier {
            inner: verifier,
            cluster: cluster.clone(),
        }))
        .with_single_cert(certs.clone(), key.clone_key())
        .map_err(|e| tls_error("peer certificate and key", &files.cert, e))?;
    server.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let server_verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(roots, provider())
        .build()
        .map_err(|e| tls_error("peer CA", ca_path, e))?;
    let mut client = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::Config(format!("TLS versions: {e}")))?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(ClusterServerVerifier {
            inner: server_verifier,
            cluster: cluster.clone(),
        }))
        .with_client_auth_cert(certs, key)
        .map_err(|e| tls_error("peer certificate and key", &files.cert, e))?;
    // The transport speaks HTTP/1.1: one long-lived streaming request per peer.
    client.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(PeerTls {
        server: Arc::new(server),
        client: Arc::new(client),
    })
}

/// A client configuration trusting the CA in `ca_pem` and presenting `cert_pem`/`key_pem`
/// (HTTP/1.1 through ALPN).
pub fn client_config(ca_pem: &[u8], cert_pem: &[u8], key_pem: &[u8]) -> Result<Arc<ClientConfig>> {
    let unnamed = Path::new("(in memory)");
    let mut config = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::Config(format!("TLS versions: {e}")))?
        .with_root_certificates(parse_roots(ca_pem, unnamed)?)
        .with_client_auth_cert(parse_certs(cert_pem, unnamed)?, parse_key(key_pem, unnamed)?)
        .map_err(|e| tls_error("client certificate", unnamed, e))?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

type Build<T> = Box<dyn Fn(&[Vec<u8>]) -> Result<T> + Send + Sync>;

/// A value built from files and rebuilt when they change.
pub struct Reloading<T> {
    what: &'static str,
    paths: Vec<PathBuf>,
    build: Build<T>,
    current: parking_lot::RwLock<Arc<T>>,
    /// The file contents last tried, built or not: a broken set is reported once, not every poll.
    last_seen: parking_lot::Mutex<Vec<Vec<u8>>>,
}

impl<T> Debug for Reloading<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reloading")
            .field("what", &self.what)
            .field("paths", &self.paths)
            .finish()
    }
}

fn read_all(paths: &[PathBuf]) -> Result<Vec<Vec<u8>>> {
    paths
        .iter()
        .map(|p| std::fs::read(p).map_err(|e| tls_error("read", p, e)))
        .collect()
}

impl<T: Send + Sync + 'static> Reloading<T> {
    /// Reads the files and builds the first value; an error here is a configuration error.
    /// Blocking: call it at start-up, off the async workers.
    pub fn load(
        what: &'static str,
        paths: Vec<PathBuf>,
        build: impl Fn(&[Vec<u8>]) -> Result<T> + Send + Sync + 'static,
    ) -> Result<Arc<Self>> {
        let contents = read_all(&paths)?;
        let value = build(&contents)?;
        Ok(Arc::new(Reloading {
            what,
            paths,
            build: Box::new(build),
            current: parking_lot::RwLock::new(Arc::new(value)),
            last_seen: parking_lot::Mutex::new(contents),
        }))
    }

    /// The value in force.
    pub fn get(&self) -> Arc<T> {
        self.current.read().clone()
    }

    /// Re-reads the files; swaps in a new value when they changed and it builds. Returns whether
    /// it swapped. Blocking file I/O: run it on a blocking thread.
    pub fn reload_if_changed(&self) -> bool {
        let contents = match read_all(&self.paths) {
            Ok(c) => c,
            // Kubernetes swaps a Secret volume's files through a symlink: a read can fall in
            // between. The next poll sees the new files.
            Err(error) => {
                tracing::debug!(what = self.what, %error, "could not read files; keeping the current ones");
                return false;
            }
        };
        let mut last = self.last_seen.lock();
        if *last == contents {
            return false;
        }
        *last = contents.clone();
        match (self.build)(&contents) {
            Ok(value) => {
                *self.current.write() = Arc::new(value);
                tracing::info!(what = self.what, paths = ?self.paths, "reloaded from disk");
                true
            }
            Err(error) => {
                tracing::warn!(what = self.what, %error, "changed files do not load; keeping the previous ones");
                false
            }
        }
    }
}

/// Something [`watch`] polls.
pub trait Reload: Send + Sync {
    /// See [`Reloading::reload_if_changed`].
    fn reload_if_changed(&self) -> bool;
}

impl<T: Send + Sync + 'static> Reload for Reloading<T> {
    fn reload_if_changed(&self) -> bool {
        Reloading::reload_if_changed(self)
    }
}

/// Polls every reloadable value until shutdown. Polling (content compared, not only mtime)
/// rather than inotify: Kubernetes updates Secret volumes by swapping a symlinked directory,
/// which file watches on the old files do not see.
pub async fn watch(values: Vec<Arc<dyn Reload>>, every: Duration, shutdown: CancellationToken) -> Result<()> {
    if values.is_empty() {
        return Ok(());
    }
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.cancelled() => return Ok(()),
        }
        let values = values.clone();
        let _ = tokio::task::spawn_blocking(move || {
            for v in &values {
                v.reload_if_changed();
            }
        })
        .await;
    }
}

/// The client port's TLS, reloaded from its files.
pub type ClientPortTls = Arc<Reloading<Arc<ServerConfig>>>;
/// The peer port's TLS, both directions, reloaded from its files.
pub type PeerPortTls = Arc<Reloading<PeerTls>>;

/// Loads the client port's TLS. Blocking.
pub fn load_client_port(files: TlsFiles) -> Result<ClientPortTls> {
    let paths = files.paths();
    Reloading::load("client TLS", paths, move |contents| build_client_port(&files, contents))
}

/// Loads the peer port's TLS. Blocking.
pub fn load_peer(files: TlsFiles, cluster: Option<String>) -> Result<PeerPortTls> {
    let paths = files.paths();
    Reloading::load("peer TLS", paths, move |contents| {
        build_peer(&files, &cluster, contents)
    })
}

/// The subject of the certificate a TLS client presented and the port verified (the peer CA
/// and cluster on the peer port, the client CA on the client port): a request extension on
/// every request of that connection.
#[derive(Debug, Clone)]
pub struct VerifiedCert(pub Arc<CertSubject>);

/// A server-side stream: plain TCP or TLS over it.
pub enum Accepted {
    /// No TLS on this port.
    Plain(TcpStream),
    /// A finished TLS handshake.
    Tls(Box<tokio_rustls::server::TlsStream<TcpStream>>),
}

/// Completes the server handshake with the configuration current now, bounded by
/// [`HANDSHAKE_TIMEOUT`]. Returns the stream and the verified client certificate, if any.
pub async fn accept(
    stream: TcpStream,
    config: Option<Arc<ServerConfig>>,
) -> std::io::Result<(Accepted, Option<CertificateDer<'static>>)> {
    let Some(config) = config else {
        return Ok((Accepted::Plain(stream), None));
    };
    let acceptor = tokio_rustls::TlsAcceptor::from(config);
    let tls = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "TLS handshake timed out"))??;
    let leaf = tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .map(|c| c.clone().into_owned());
    Ok((Accepted::Tls(Box::new(tls)), leaf))
}

/// Where a TLS client takes the configuration of each new connection from.
type ClientTlsSource = Arc<dyn Fn() -> Arc<ClientConfig> + Send + Sync>;

/// The client of every outgoing peer connection: TLS with the peer certificate when peer TLS
/// is on (whatever the URL's scheme, so a membership recorded with `http://` URLs still
/// connects once TLS is enabled), plain TCP otherwise. One connection per call: the transport
/// keeps its streams open for long, and forwarding is rare.
#[derive(Clone, Default)]
pub struct PeerClient {
    tls: Option<ClientTlsSource>,
}

impl Debug for PeerClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PeerClient").field("tls", &self.tls.is_some()).finish()
    }
}

/// The sending half of one HTTP/1.1 connection to a peer.
pub type PeerSender<B> = hyper::client::conn::http1::SendRequest<B>;

impl PeerClient {
    /// A client presenting `tls`'s peer certificate (the one in force at each connection), or
    /// a plain one.
    pub fn new(tls: Option<PeerPortTls>) -> Self {
        PeerClient {
            tls: tls.map(|t| -> ClientTlsSource { Arc::new(move || t.get().client.clone()) }),
        }
    }

    /// A client that connects with `config` (for tools talking to a member's TLS port).
    pub fn with_config(config: Arc<ClientConfig>) -> Self {
        PeerClient {
            tls: Some(Arc::new(move || config.clone())),
        }
    }

    /// Whether peer connections use TLS.
    pub fn is_tls(&self) -> bool {
        self.tls.is_some()
    }

    /// Opens one HTTP/1.1 connection to the peer at `url`; the connection task ends with it.
    pub async fn connect<B>(&self, url: &str) -> Result<PeerSender<B>, String>
    where
        B: hyper::body::Body + Send + 'static,
        B::Data: Send,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let uri: hyper::Uri = url.parse().map_err(|e| format!("bad peer URL {url}: {e}"))?;
        let authority = uri.authority().ok_or_else(|| format!("peer URL {url} has no host"))?;
        let host = authority
            .host()
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string();
        let tls = self.tls.as_ref().map(|source| source());
        let default_port = if tls.is_some() || uri.scheme_str() == Some("https") {
            443
        } else {
            80
        };
        let port = authority.port_u16().unwrap_or(default_port);
        let connected = tokio::time::timeout(CONNECT_TIMEOUT, async {
            let stream = TcpStream::connect((host.as_str(), port))
                .await
                .map_err(|e| format!("connecting to {url}: {e}"))?;
            let _ = stream.set_nodelay(true);
            match tls {
                None => handshake(TokioIo::new(stream), url).await,
                Some(config) => {
                    let name = ServerName::try_from(host.clone()).map_err(|e| format!("peer host {host}: {e}"))?;
                    let stream = tokio_rustls::TlsConnector::from(config)
                        .connect(name, stream)
                        .await
                        .map_err(|e| format!("TLS handshake with {url}: {e}"))?;
                    handshake(TokioIo::new(stream), url).await
                }
            }
        })
        .await;
        connected.map_err(|_| format!("connecting to {url} timed out"))?
    }

    /// Sends one request on a new connection to the request's host.
    pub async fn request<B>(&self, req: hyper::Request<B>) -> Result<hyper::Response<hyper::body::Incoming>, String>
    where
        B: hyper::body::Body + Send + 'static,
        B::Data: Send,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let uri = req.uri();
        let base = format!(
            "{}://{}",
            uri.scheme_str().unwrap_or("http"),
            uri.authority().map(|a| a.as_str()).unwrap_or_default()
        );
        let mut sender = self.connect(&base).await?;
        sender
            .send_request(req)
            .await
            .map_err(|e| format!("request to {base}: {e}"))
    }
}

async fn handshake<IO, B>(io: IO, url: &str) -> Result<PeerSender<B>, String>
where
    IO: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    B: hyper::body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let (sender, conn) = hyper::client::conn::http1::handshake(io)
        .await
        .map_err(|e| format!("HTTP handshake with {url}: {e}"))?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(sender)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pki::{CertSpec, ThrowawayCa};

    fn write(dir: &Path, name: &str, contents: &str) -> PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, contents).unwrap();
        path
    }

    #[test]
    fn a_rotation_caught_between_certificate_and_key_keeps_the_previous_pair_until_both_match() {
        let dir = tempfile::tempdir().unwrap();
        let ca = ThrowawayCa::new("ca").unwrap();
        let ip = [std::net::IpAddr::from([127, 0, 0, 1])];
        let first = ca.issue(&CertSpec::member("m", &ip, None)).unwrap();
        let files = TlsFiles {
            cert: write(dir.path(), "c.pem", &first.cert_pem),
            key: write(dir.path(), "c.key", &first.key_pem),
            ca: None,
        };
        let tls = load_client_port(files.clone()).unwrap();
        let before = tls.get();
        assert!(!tls.reload_if_changed(), "nothing changed");

        let second = ca.issue(&CertSpec::member("m", &ip, None)).unwrap();
        write(dir.path(), "c.pem", &second.cert_pem);
        assert!(!tls.reload_if_changed(), "a certificate without its key was taken");
        assert!(Arc::ptr_eq(&tls.get(), &before), "the previous pair was dropped");
        write(dir.path(), "c.key", &second.key_pem);
        assert!(tls.reload_if_changed(), "the matching pair was not taken");
        assert!(!Arc::ptr_eq(&tls.get(), &before));
        std::fs::remove_file(&files.key).unwrap();
        assert!(!tls.reload_if_changed(), "a missing file must keep the current pair");
    }

    #[test]
    fn the_cluster_check_takes_only_a_certificate_naming_this_cluster() {
        let ca = ThrowawayCa::new("ca").unwrap();
        let ip = [std::net::IpAddr::from([127, 0, 0, 1])];
        let der = |cluster: Option<&str>| {
            let issued = ca.issue(&CertSpec::member("m", &ip, cluster)).unwrap();
            CertificateDer::from_pem_slice(issued.cert_pem.as_bytes()).unwrap()
        };
        let alpha = Some("alpha".to_string());
        assert!(check_cluster(&der(Some("alpha")), &alpha).is_ok());
        assert!(check_cluster(&der(Some("beta")), &alpha).is_err());
        assert!(check_cluster(&der(Some("alphabet")), &alpha).is_err());
        assert!(check_cluster(&der(None), &alpha).is_err());
        assert!(check_cluster(&der(None), &None).is_ok(), "no cluster name: no check");
    }
}
