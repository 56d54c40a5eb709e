//! Security of a live cluster: TLS on both ports, mutual TLS between members, client
//! certificates and tokens mapped to roles. Hostile requests (plaintext to a TLS port, a
//! certificate from another CA, a peer certificate of another cluster, an expired certificate,
//! no token, a wrong token, a role that does not allow the call) are each refused with the right
//! answer and change nothing; certificates and tokens rotated on disk take effect without a
//! restart while a writer runs, and no acknowledged write is lost.

mod support;

use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use raftkv_node::pki::{CertSpec, Issued, ThrowawayCa};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use serde_json::json;
use support::{wait_until, Cluster, MemberArgs, DEADLINE};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const CLUSTER: &str = "alpha";
const ADMIN_TOKEN: &str = "t-admin-6f1c2b";
const WRITE_TOKEN: &str = "t-write-93ad01";
const READ_TOKEN: &str = "t-read-5e77c4";

/// The CAs of one test and where each member's files are.
struct Pki {
    client_ca: ThrowawayCa,
    peer_ca: ThrowawayCa,
    root: PathBuf,
}

/// Writes a file the way Kubernetes updates a Secret volume: whole, by rename.
fn write_atomically(path: &Path, contents: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, contents).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

impl Pki {
    fn new(root: &Path) -> Arc<Pki> {
        let pki = Pki {
            client_ca: ThrowawayCa::new("client CA").unwrap(),
            peer_ca: ThrowawayCa::new("peer CA").unwrap(),
            root: root.to_path_buf(),
        };
        write_atomically(&pki.root.join("client-ca.pem"), pki.client_ca.cert_pem());
        write_atomically(&pki.root.join("peer-ca.pem"), pki.peer_ca.cert_pem());
        write_atomically(
            &pki.root.join("tokens"),
            &format!("# test tokens\n{ADMIN_TOKEN} admin ops\n{WRITE_TOKEN} write app\n{READ_TOKEN} read dashboard\n"),
        );
        Arc::new(pki)
    }

    fn dir(&self, name: &str) -> PathBuf {
        self.root.join(format!("{name}-tls"))
    }

    /// Issues (or reissues: rotation) a member's client-port and peer certificates for `ip`.
    fn issue_member(&self, name: &str, ip: Ipv4Addr) {
        let dir = self.dir(name);
        std::fs::create_dir_all(&dir).unwrap();
        let ips = [IpAddr::V4(ip)];
        let client = self.client_ca.issue(&CertSpec::member(name, &ips, None)).unwrap();
        let peer = self
            .peer_ca
            .issue(&CertSpec::member(name, &ips, Some(CLUSTER)))
            .unwrap();
        // Certificate first, then key: in between, the pair on disk does not match, which the
        // node must ride out by keeping the previous pair.
        write_atomically(&dir.join("client.pem"), &client.cert_pem);
        write_atomically(&dir.join("client.key"), &client.key_pem);
        write_atomically(&dir.join("peer.pem"), &peer.cert_pem);
        write_atomically(&dir.join("peer.key"), &peer.key_pem);
        std::fs::write(dir.join("ip"), ip.to_string()).unwrap();
    }

    fn member_args(self: &Arc<Self>) -> MemberArgs {
        let pki = self.clone();
        Box::new(move |_root, name, ip| {
            pki.issue_member(name, ip);
            let dir = pki.dir(name);
            let path = |f: &str| dir.join(f).display().to_string();
            let shared = |f: &str| pki.root.join(f).display().to_string();
            vec![
                "--client-cert-file".into(),
                path("client.pem"),
                "--client-key-file".into(),
                path("client.key"),
                "--client-ca-file".into(),
                shared("client-ca.pem"),
                "--peer-cert-file".into(),
                path("peer.pem"),
                "--peer-key-file".into(),
                path("peer.key"),
                "--peer-ca-file".into(),
                shared("peer-ca.pem"),
                "--peer-cluster-name".into(),
                CLUSTER.into(),
                "--token-file".into(),
                shared("tokens"),
                "--reload-interval-ms".into(),
                "200".into(),
            ]
        })
    }
}

/// An HTTPS client trusting `ca`, presenting `identity` when given.
fn https(ca: &str, identity: Option<&Issued>) -> reqwest::Client {
    let mut builder = reqwest::Client::builder()
        .use_rustls_tls()
        .tls_built_in_root_certs(false)
        .add_root_certificate(reqwest::Certificate::from_pem(ca.as_bytes()).unwrap())
        .timeout(Duration::from_secs(15));
    if let Some(id) = identity {
        let pem = format!("{}{}", id.cert_pem, id.key_pem);
        builder = builder.identity(reqwest::Identity::from_pem(pem.as_bytes()).unwrap());
    }
    builder.build().unwrap()
}

/// A TLS 1.3 client configuration trusting `ca`, presenting `identity` when given.
fn rustls_client(ca: &str, identity: Option<&Issued>) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_slice(ca.as_bytes()).unwrap())
        .unwrap();
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots);
    let mut config = match identity {
        Some(id) => builder
            .with_client_auth_cert(
                vec![CertificateDer::from_pem_slice(id.cert_pem.as_bytes()).unwrap()],
                PrivateKeyDer::from_pem_slice(id.key_pem.as_bytes()).unwrap(),
            )
            .unwrap(),
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Arc::new(config)
}

/// One HTTP/1.1 request over a TLS connection made with `config`: the answer's text and the
/// certificate the server presented, or why there was no answer. With TLS 1.3 a server refuses
/// a client certificate after the client considers the handshake done, so only an answer (or
/// none) tells whether the connection was accepted.
async fn tls_request(
    addr: &str,
    config: Arc<rustls::ClientConfig>,
    request: &str,
) -> Result<(String, Vec<u8>), String> {
    let ip: IpAddr = addr.rsplit_once(':').unwrap().0.parse().unwrap();
    let tcp = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    let mut tls = tokio_rustls::TlsConnector::from(config)
        .connect(ServerName::IpAddress(ip.into()), tcp)
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    let server_cert = tls.get_ref().1.peer_certificates().unwrap()[0].to_vec();
    tls.write_all(request.as_bytes())
        .await
        .map_err(|e| format!("write: {e}"))?;
    let mut out = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), tls.read_to_end(&mut out)).await;
    let text = String::from_utf8_lossy(&out).into_owned();
    match read {
        _ if text.starts_with("HTTP/1.1 ") => Ok((text, server_cert)),
        Ok(Err(e)) => Err(format!("read: {e}")),
        _ => Err(format!("no answer: {text:?}")),
    }
}

fn get_request(path: &str, token: Option<&str>) -> String {
    let auth = token
        .map(|t| format!("authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    format!("GET {path} HTTP/1.1\r\nhost: raftkv\r\n{auth}connection: close\r\n\r\n")
}

/// A 3-member cluster with TLS and authentication on both ports; `c.http` is an admin client.
async fn tls_cluster(root: tempfile::TempDir, pki: &Arc<Pki>) -> Cluster {
    let admin = pki.client_ca.issue(&CertSpec::client("operator", "admin")).unwrap();
    let http = https(pki.client_ca.cert_pem(), Some(&admin));
    Cluster::start_with(3, &[], root, http, Some(pki.member_args()))
        .await
        .unwrap()
}

/// Sends `method path` with `token` (if any) and returns status, `WWW-Authenticate`, error code.
async fn call(
    client: &reqwest::Client,
    method: reqwest::Method,
    url: &str,
    token: Option<&str>,
    body: Option<&str>,
) -> (u16, Option<String>, String) {
    let mut req = client.request(method, url);
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    if let Some(b) = body {
        req = req.body(b.to_string());
    }
    let resp = req.send().await.unwrap();
    let status = resp.status().as_u16();
    let challenge = resp
        .headers()
        .get("www-authenticate")
        .map(|v| v.to_str().unwrap().to_string());
    let body: serde_json::Value = resp.json().await.unwrap_or_default();
    (status, challenge, body["error"].as_str().unwrap_or("").to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_cluster_serves_its_roles_and_refuses_each_hostile_request_without_changing_anything() {
    let root = tempfile::tempdir().unwrap();
    let pki = Pki::new(root.path());
    let mut c = tls_cluster(root, &pki).await;
    let leader = c.leader().await.unwrap();
    let follower = (0..3).find(|&i| i != leader).unwrap();
    let (url, furl) = (c.members[leader].url(), c.members[follower].url());
    // A client that connects and never starts its handshake: it must not keep its slot.
    let mut silent = TcpStream::connect(c.members[leader].client_addr.as_str())
        .await
        .unwrap();
    let silent_since = std::time::Instant::now();
    let key_url = format!("{furl}/v1/kv/guarded");
    let check_key_unchanged = |c: &Cluster| {
        let key_url = key_url.clone();
        let http = c.http.clone();
        async move {
            let r = http.get(&key_url).send().await.unwrap();
            assert_eq!(r.status(), 200);
            assert_eq!(r.text().await.unwrap(), "original", "a refused request changed the key");
        }
    };

    // The members found each other over mutual TLS, at https:// peer URLs.
    let members: serde_json::Value = c
        .http
        .get(format!("{furl}/v1/members"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let listed = members["members"].as_array().unwrap();
    assert_eq!(listed.len(), 3, "{members}");
    for m in listed {
        assert!(m["peer_url"].as_str().unwrap().starts_with("https://"), "{members}");
        // Progress is known only to the leader: the follower forwarded the call over mutual TLS.
        assert!(
            m["match_index"].as_u64().is_some(),
            "not forwarded to the leader: {members}"
        );
    }

    // A write token writes through a follower; a read token reads; TLS negotiated HTTP/2.
    let tokens = https(pki.client_ca.cert_pem(), None);
    let put = reqwest::Method::PUT;
    let get = reqwest::Method::GET;
    let r = tokens.get(format!("{furl}/healthz")).send().await.unwrap();
    assert_eq!(r.version(), reqwest::Version::HTTP_2, "ALPN did not select h2");
    let (status, _, code) = call(&tokens, put.clone(), &key_url, Some(WRITE_TOKEN), Some("original")).await;
    assert_eq!((status, code.as_str()), (200, ""));
    let r = tokens.get(&key_url).bearer_auth(READ_TOKEN).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.text().await.unwrap(), "original");

    // No credentials: 401 with a Bearer challenge, on reads and writes alike.
    for (method, body) in [(get.clone(), None), (put.clone(), Some("by nobody"))] {
        let (status, challenge, code) = call(&tokens, method, &key_url, None, body).await;
        assert_eq!((status, code.as_str()), (401, "unauthenticated"));
        assert!(challenge.unwrap().starts_with("Bearer"), "no Bearer challenge");
    }
    let (status, _, code) = call(&tokens, get.clone(), &format!("{url}/v1/status"), None, None).await;
    assert_eq!((status, code.as_str()), (401, "unauthenticated"), "status is not open");
    // Probes stay open for kubelet.
    for probe in ["/healthz", "/readyz", "/metrics"] {
        let r = tokens.get(format!("{url}{probe}")).send().await.unwrap();
        assert_eq!(r.status(), 200, "{probe} is not open");
    }
    check_key_unchanged(&c).await;

    // A wrong token, and a header that is not a bearer token: 401 invalid_token.
    let (status, challenge, code) = call(
        &tokens,
        put.clone(),
        &key_url,
        Some("t-write-93ad02"),
        Some("by a guess"),
    )
    .await;
    assert_eq!((status, code.as_str()), (401, "invalid_token"));
    assert!(challenge.unwrap().contains("invalid_token"));
    let r = tokens
        .put(&key_url)
        .header("authorization", format!("Basic {WRITE_TOKEN}"))
        .body("by basic auth")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    check_key_unchanged(&c).await;

    // A read token that writes or deletes: 403.
    let (status, _, code) = call(&tokens, put.clone(), &key_url, Some(READ_TOKEN), Some("by a reader")).await;
    assert_eq!((status, code.as_str()), (403, "forbidden"));
    let (status, _, code) = call(&tokens, reqwest::Method::DELETE, &key_url, Some(READ_TOKEN), None).await;
    assert_eq!((status, code.as_str()), (403, "forbidden"));
    check_key_unchanged(&c).await;

    // A write token that removes a member, adds one or lists members: 403; membership unchanged.
    let victim = c.members[follower].id;
    for (method, path, body) in [
        (reqwest::Method::DELETE, format!("/v1/members/{victim}"), None),
        (
            reqwest::Method::POST,
            "/v1/members".to_string(),
            Some(json!({"id": 99, "peer_url": "https://127.0.0.1:1"}).to_string()),
        ),
        (
            reqwest::Method::POST,
            "/v1/leader".to_string(),
            Some(json!({"id": victim}).to_string()),
        ),
        (get.clone(), "/v1/members".to_string(), None),
    ] {
        for base in [&url, &furl] {
            let (status, _, code) = call(
                &tokens,
                method.clone(),
                &format!("{base}{path}"),
                Some(WRITE_TOKEN),
                body.as_deref(),
            )
            .await;
            assert_eq!((status, code.as_str()), (403, "forbidden"), "{method} {path}");
        }
    }
    let membership = c.membership(leader).await.unwrap();
    assert_eq!(membership.len(), 3);
    assert!(membership.values().all(|r| r == "voter"), "{membership:?}");
    assert!(membership.contains_key(&victim));
    assert_eq!(c.leader().await.unwrap(), leader, "leadership moved");

    // Client certificates: O is the role.
    let reader = pki.client_ca.issue(&CertSpec::client("dashboard", "read")).unwrap();
    let reader = https(pki.client_ca.cert_pem(), Some(&reader));
    let (status, _, code) = call(&reader, put.clone(), &key_url, None, Some("by a read certificate")).await;
    assert_eq!((status, code.as_str()), (403, "forbidden"));
    let (status, _, _) = call(&reader, get.clone(), &key_url, None, None).await;
    assert_eq!(status, 200);
    let no_role = pki
        .client_ca
        .issue(&CertSpec::client("stranger", "accounting"))
        .unwrap();
    let no_role = https(pki.client_ca.cert_pem(), Some(&no_role));
    let (status, _, code) = call(&no_role, get.clone(), &key_url, None, None).await;
    assert_eq!((status, code.as_str()), (403, "forbidden"));
    // A certificate does not save a wrong token.
    let (status, _, code) = call(
        &c.http,
        put.clone(),
        &key_url,
        Some("t-nope"),
        Some("by an admin with a bad token"),
    )
    .await;
    assert_eq!((status, code.as_str()), (401, "invalid_token"));
    check_key_unchanged(&c).await;

    // Plaintext to the TLS ports: no HTTP answer at all.
    for addr in [&c.members[leader].client_addr, &c.members[leader].peer_addr] {
        let mut s = TcpStream::connect(addr.as_str()).await.unwrap();
        let _ = s
            .write_all(b"PUT /v1/kv/guarded HTTP/1.1\r\nhost: x\r\ncontent-length: 5\r\nconnection: close\r\n\r\nplain")
            .await;
        let mut out = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out)).await;
        assert!(
            !String::from_utf8_lossy(&out).contains("HTTP/1.1 200"),
            "plaintext accepted on {addr}"
        );
    }
    let plain = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    let plain_url = format!("http://{}/v1/kv/guarded", c.members[leader].client_addr);
    assert!(plain
        .put(&plain_url)
        .bearer_auth(WRITE_TOKEN)
        .body("plain")
        .send()
        .await
        .is_err());
    check_key_unchanged(&c).await;

    // A client certificate from another CA, even one claiming admin: the handshake fails.
    let rogue_ca = ThrowawayCa::new("rogue CA").unwrap();
    let rogue = rogue_ca.issue(&CertSpec::client("mallory", "admin")).unwrap();
    let rogue_client = https(pki.client_ca.cert_pem(), Some(&rogue));
    assert!(rogue_client.put(&key_url).body("by a rogue CA").send().await.is_err());
    // An expired certificate from the right CA: refused too.
    let long_ago = Some((1_500_000_000, 1_600_000_000));
    let expired = pki
        .client_ca
        .issue(&CertSpec {
            valid: long_ago,
            ..CertSpec::client("retired", "admin")
        })
        .unwrap();
    let expired_client = https(pki.client_ca.cert_pem(), Some(&expired));
    assert!(expired_client
        .put(&key_url)
        .body("by an expired cert")
        .send()
        .await
        .is_err());
    check_key_unchanged(&c).await;

    // The peer port: only this cluster's members, with valid peer certificates.
    let peer_addr = c.members[leader].peer_addr.clone();
    let ip: IpAddr = peer_addr.rsplit_once(':').unwrap().0.parse().unwrap();
    let members_req = get_request("/v1/members", None);
    let good_peer = pki
        .peer_ca
        .issue(&CertSpec::member("m9", &[ip], Some(CLUSTER)))
        .unwrap();
    let accepted = tls_request(
        &peer_addr,
        rustls_client(pki.peer_ca.cert_pem(), Some(&good_peer)),
        &members_req,
    )
    .await;
    assert!(
        accepted
            .as_ref()
            .is_ok_and(|(text, _)| text.starts_with("HTTP/1.1 200")),
        "{accepted:?}"
    );
    let refused: Vec<(&str, Issued, &str)> = vec![
        (
            "another cluster",
            pki.peer_ca.issue(&CertSpec::member("m9", &[ip], Some("beta"))).unwrap(),
            pki.peer_ca.cert_pem(),
        ),
        (
            "no cluster",
            pki.peer_ca.issue(&CertSpec::member("m9", &[ip], None)).unwrap(),
            pki.peer_ca.cert_pem(),
        ),
        (
            "another CA",
            rogue_ca.issue(&CertSpec::member("m9", &[ip], Some(CLUSTER))).unwrap(),
            pki.peer_ca.cert_pem(),
        ),
        (
            "expired",
            pki.peer_ca
                .issue(&CertSpec {
                    valid: long_ago,
                    ..CertSpec::member("m9", &[ip], Some(CLUSTER))
                })
                .unwrap(),
            pki.peer_ca.cert_pem(),
        ),
        // A client certificate is not a peer certificate: other CA.
        (
            "a client certificate",
            pki.client_ca.issue(&CertSpec::client("operator", "admin")).unwrap(),
            pki.peer_ca.cert_pem(),
        ),
    ];
    for (what, cert, ca) in &refused {
        let delete = format!("DELETE /v1/members/{victim} HTTP/1.1\r\nhost: raftkv\r\nconnection: close\r\n\r\n");
        let r = tls_request(&peer_addr, rustls_client(ca, Some(cert)), &delete).await;
        assert!(r.is_err(), "a peer certificate of {what} was accepted: {r:?}");
    }
    let r = tls_request(&peer_addr, rustls_client(pki.peer_ca.cert_pem(), None), &members_req).await;
    assert!(
        r.is_err(),
        "the peer port accepted a connection without a certificate: {r:?}"
    );
    assert_eq!(c.membership(leader).await.unwrap().len(), 3);
    check_key_unchanged(&c).await;

    // The silent connection was closed once the handshake deadline (10 s) passed.
    let mut buf = [0u8; 16];
    let closed = tokio::time::timeout(Duration::from_secs(40), silent.read(&mut buf)).await;
    assert!(
        matches!(closed, Ok(Ok(0)) | Ok(Err(_))),
        "a connection without a handshake stayed open: {closed:?}"
    );
    assert!(
        silent_since.elapsed() >= Duration::from_secs(9),
        "closed before its deadline"
    );

    // Everything refused above left the cluster healthy.
    c.wait_healthy().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotated_certificates_and_tokens_take_effect_without_a_restart_while_a_writer_loses_nothing() {
    let root = tempfile::tempdir().unwrap();
    let pki = Pki::new(root.path());
    let mut c = tls_cluster(root, &pki).await;
    let leader = c.leader().await.unwrap();
    let follower = (0..3).find(|&i| i != leader).unwrap();

    // A writer through a follower, on one client that keeps its connections.
    let writer = https(pki.client_ca.cert_pem(), None);
    let stop = Arc::new(AtomicBool::new(false));
    let failures = Arc::new(AtomicU64::new(0));
    let base = c.members[follower].url();
    let task = {
        let (stop, failures, base) = (stop.clone(), failures.clone(), base.clone());
        tokio::spawn(async move {
            let mut acknowledged = Vec::new();
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let r = writer
                    .put(format!("{base}/v1/kv/rot-{i}"))
                    .bearer_auth(WRITE_TOKEN)
                    .body(format!("v{i}"))
                    .send()
                    .await;
                match r {
                    Ok(r) if r.status() == 200 => acknowledged.push(i),
                    Ok(r) => {
                        eprintln!("write {i}: {} {}", r.status(), r.text().await.unwrap_or_default());
                        failures.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) => {
                        eprintln!("write {i}: {e}");
                        failures.fetch_add(1, Ordering::Relaxed);
                    }
                }
                i += 1;
            }
            acknowledged
        })
    };

    // Rotate every member's certificates (new keys, same CAs) while the writer runs.
    let before: Vec<Vec<u8>> = (0..3)
        .map(|i| std::fs::read(pki.dir(&format!("m{i}")).join("client.pem")).unwrap())
        .collect();
    tokio::time::sleep(Duration::from_millis(500)).await;
    for (i, m) in c.members.iter().enumerate() {
        let ip: Ipv4Addr = m.client_addr.rsplit_once(':').unwrap().0.parse().unwrap();
        pki.issue_member(&format!("m{i}"), ip);
    }
    // New handshakes get the new certificates, on both ports of every member.
    for (i, m) in c.members.iter().enumerate() {
        let dir = pki.dir(&format!("m{i}"));
        let want_client = CertificateDer::from_pem_file(dir.join("client.pem")).unwrap().to_vec();
        let want_peer = CertificateDer::from_pem_file(dir.join("peer.pem")).unwrap().to_vec();
        assert_ne!(
            std::fs::read(dir.join("client.pem")).unwrap(),
            before[i],
            "the certificate was not reissued"
        );
        let admin = pki.client_ca.issue(&CertSpec::client("operator", "admin")).unwrap();
        let client_cfg = rustls_client(pki.client_ca.cert_pem(), Some(&admin));
        let status_req = get_request("/v1/status", None);
        wait_until("the client port to present the new certificate", DEADLINE, || {
            let (cfg, addr, req, want) = (
                client_cfg.clone(),
                m.client_addr.clone(),
                status_req.clone(),
                want_client.clone(),
            );
            async move {
                let (text, cert) = tls_request(&addr, cfg, &req).await.ok()?;
                (cert == want && text.starts_with("HTTP/1.1 200")).then_some(())
            }
        })
        .await
        .unwrap();
        let ip: IpAddr = m.peer_addr.rsplit_once(':').unwrap().0.parse().unwrap();
        let peer = pki
            .peer_ca
            .issue(&CertSpec::member("probe", &[ip], Some(CLUSTER)))
            .unwrap();
        let peer_cfg = rustls_client(pki.peer_ca.cert_pem(), Some(&peer));
        let members_req = get_request("/v1/members", None);
        wait_until("the peer port to present the new certificate", DEADLINE, || {
            let (cfg, addr, req, want) = (
                peer_cfg.clone(),
                m.peer_addr.clone(),
                members_req.clone(),
                want_peer.clone(),
            );
            async move {
                let (text, cert) = tls_request(&addr, cfg, &req).await.ok()?;
                (cert == want && text.starts_with("HTTP/1.1 200")).then_some(())
            }
        })
        .await
        .unwrap();
    }
    // A member restarted now makes every peer connection anew, with the new certificates both
    // ways, and catches up.
    let restarted = (0..3).find(|&i| i != leader && i != follower).unwrap();
    c.members[restarted].stop().await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    c.members[restarted].restart().await.unwrap();
    c.wait_healthy().await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::Relaxed);
    let acknowledged = task.await.unwrap();
    assert!(
        acknowledged.len() >= 20,
        "the writer barely ran: {}",
        acknowledged.len()
    );
    assert_eq!(
        failures.load(Ordering::Relaxed),
        0,
        "writes failed during rotation on connections it did not have to close"
    );
    // None acknowledged is lost, on any member.
    for i in 0..3 {
        let reader = https(pki.client_ca.cert_pem(), None);
        for k in &acknowledged {
            let r = reader
                .get(format!("{}/v1/kv/rot-{k}", c.members[i].url()))
                .bearer_auth(READ_TOKEN)
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 200, "acknowledged write {k} missing on member {i}");
            assert_eq!(r.text().await.unwrap(), format!("v{k}"));
        }
    }

    // Token rotation: the write token is replaced; the old one stops working, the new one works.
    let new_write = "t-write-rotated-1";
    write_atomically(
        &pki.root.join("tokens"),
        &format!("{ADMIN_TOKEN} admin ops\n{new_write} write app\n{READ_TOKEN} read dashboard\n"),
    );
    let tokens = https(pki.client_ca.cert_pem(), None);
    let key = format!("{}/v1/kv/after-rotation", c.members[leader].url());
    wait_until("the old write token to be refused", DEADLINE, || {
        let (tokens, key) = (tokens.clone(), key.clone());
        async move {
            let (status, _, _) = call(&tokens, reqwest::Method::GET, &key, Some(WRITE_TOKEN), None).await;
            (status == 401).then_some(())
        }
    })
    .await
    .unwrap();
    let (status, _, _) = call(&tokens, reqwest::Method::PUT, &key, Some(new_write), Some("new")).await;
    assert_eq!(status, 200);
    // A broken token file is refused and the tokens in force stay.
    write_atomically(&pki.root.join("tokens"), "this line has no role\n");
    tokio::time::sleep(Duration::from_millis(800)).await;
    let (status, _, _) = call(&tokens, reqwest::Method::PUT, &key, Some(new_write), Some("newer")).await;
    assert_eq!(status, 200, "a broken token file replaced the working one");
}

#[test]
fn a_member_with_an_unreadable_or_mismatched_certificate_refuses_to_start() {
    let root = tempfile::tempdir().unwrap();
    let pki = Pki::new(root.path());
    pki.issue_member("m0", Ipv4Addr::LOCALHOST);
    pki.issue_member("m1", Ipv4Addr::LOCALHOST);
    let dir0 = pki.dir("m0");
    let dir1 = pki.dir("m1");
    let run = |cert: &Path, key: &Path| {
        std::process::Command::new(support::BIN)
            .arg("--data-dir")
            .arg(root.path().join("data"))
            .args(["--client-addr", "127.0.0.1:0", "--peer-addr", "127.0.0.1:0"])
            .arg("--client-cert-file")
            .arg(cert)
            .arg("--client-key-file")
            .arg(key)
            .output()
            .unwrap()
    };
    let missing = run(&dir0.join("nothing.pem"), &dir0.join("client.key"));
    assert!(!missing.status.success());
    let err = String::from_utf8_lossy(&missing.stderr);
    assert!(err.contains("[config]") && err.contains("nothing.pem"), "{err}");
    let mismatched = run(&dir0.join("client.pem"), &dir1.join("client.key"));
    assert!(!mismatched.status.success());
    let err = String::from_utf8_lossy(&mismatched.stderr);
    assert!(err.contains("[config]"), "{err}");
    // A CA without a certificate to serve is a usage error.
    let out = std::process::Command::new(support::BIN)
        .args(["--client-ca-file", "ca.pem", "--client-addr", "127.0.0.1:0"])
        .output()
        .unwrap();
    assert!(!out.status.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_without_tls_guard_probes_when_asked_and_the_peer_ports_admin_routes_too() {
    let root = tempfile::tempdir().unwrap();
    let tokens = root.path().join("tokens");
    write_atomically(
        &tokens,
        &format!("{ADMIN_TOKEN} admin ops\n{WRITE_TOKEN} write app\n{READ_TOKEN} read dashboard\n"),
    );
    let mut admin_headers = reqwest::header::HeaderMap::new();
    admin_headers.insert(
        reqwest::header::AUTHORIZATION,
        format!("Bearer {ADMIN_TOKEN}").parse().unwrap(),
    );
    let admin = reqwest::Client::builder()
        .default_headers(admin_headers)
        .timeout(Duration::from_secs(15))
        .build()
        .unwrap();
    let tokens_flag = tokens.display().to_string();
    let mut c = Cluster::start_with(3, &["--token-file", &tokens_flag, "--auth-probes"], root, admin, None)
        .await
        .unwrap();
    let leader = c.leader().await.unwrap();
    let follower = (0..3).find(|&i| i != leader).unwrap();
    let anyone = reqwest::Client::builder()
        .timeout(Duration::from_secs(15))
        .build()
        .unwrap();
    let get = reqwest::Method::GET;

    // --auth-probes: the probes need credentials, any role.
    let healthz = format!("{}/healthz", c.members[follower].url());
    let (status, _, code) = call(&anyone, get.clone(), &healthz, None, None).await;
    assert_eq!((status, code.as_str()), (401, "unauthenticated"));
    let (status, _, _) = call(&anyone, get.clone(), &healthz, Some(READ_TOKEN), None).await;
    assert_eq!(status, 200);

    // An admin call through a follower is forwarded with its token, which the leader checks.
    let members = format!("{}/v1/members", c.members[follower].url());
    let r = anyone.get(&members).bearer_auth(ADMIN_TOKEN).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let body: serde_json::Value = r.json().await.unwrap();
    assert!(
        body["members"]
            .as_array()
            .unwrap()
            .iter()
            .all(|m| m["match_index"].is_u64()),
        "not answered by the leader: {body}"
    );

    // The peer port's admin routes are not a way around the client port's checks.
    let peer = c.members[leader].peer_url();
    let victim = c.members[follower].id;
    let (status, _, code) = call(&anyone, get.clone(), &format!("{peer}/v1/members"), None, None).await;
    assert_eq!((status, code.as_str()), (401, "unauthenticated"));
    let remove = format!("{peer}/v1/members/{victim}");
    let (status, _, code) = call(&anyone, reqwest::Method::DELETE, &remove, Some(WRITE_TOKEN), None).await;
    assert_eq!((status, code.as_str()), (403, "forbidden"));
    let (status, _, code) = call(&anyone, reqwest::Method::DELETE, &remove, None, None).await;
    assert_eq!((status, code.as_str()), (401, "unauthenticated"));
    let membership = c.membership(leader).await.unwrap();
    assert_eq!(membership.len(), 3, "{membership:?}");
    assert!(membership.contains_key(&victim));
    c.wait_healthy().await.unwrap();
}
