//! `HttpNodeClient` against TLS nodes: a small HTTPS server that, like a raftkv node with TLS,
//! presents a certificate the operator issued and requires a client certificate from the
//! cluster's client CA. The operator names the node by its pod DNS name and reaches it at the
//! address it was given, so the certificate is checked against the name, not the IP.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::IpAddr;
use std::sync::Arc;

use http_body_util::Full;
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use k8s_openapi::jiff::Timestamp;
use raftkv_operator::certs::{
    issue_client, issue_client_server, new_cluster_cas, peer_domain, pod_dns_name, ClusterCas, Issued, OPERATOR_ROLE,
};
use raftkv_operator::names::ClusterNames;
use raftkv_operator::node_client::{HttpNodeClient, NodeApi, NodeClientTimeouts};
use raftkv_operator::tls::NodeTls;
use raftkv_operator::Error;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::TcpListener;

const STATUS: &str = r#"{"id":11,"cluster_id":7,"role":"follower","term":3,"leader_id":10,
"commit_index":5,"applied_index":5,"snapshot_index":0,"membership":"voter","ready":true}"#;

/// Serves `GET /v1/status` over TLS with `server`, requiring client certificates that chain to
/// `client_ca_pem`. Returns the port; the server task stops with the test's runtime.
async fn start(server: &Issued, client_ca_pem: &str) -> anyhow::Result<u16> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    for ca in CertificateDer::pem_slice_iter(client_ca_pem.as_bytes()) {
        roots.add(ca?)?;
    }
    let verifier =
        rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone()).build()?;
    let chain: Vec<CertificateDer<'static>> =
        CertificateDer::pem_slice_iter(server.certified.cert_pem.as_bytes()).collect::<Result<_, _>>()?;
    let key = PrivateKeyDer::from_pem_slice(server.certified.key_pem.as_bytes())?;
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)?;
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let port = listener.local_addr()?.port();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                // A refused handshake (wrong client certificate) ends the connection here.
                let Ok(tls) = acceptor.accept(stream).await else { return };
                let service = hyper::service::service_fn(|_request| async {
                    Ok::<_, Infallible>(
                        hyper::Response::builder()
                            .header("content-type", "application/json")
                            .body(Full::new(Bytes::from_static(STATUS.as_bytes())))
                            .expect("a valid response"),
                    )
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tls), service)
                    .await;
            });
        }
    });
    Ok(port)
}

fn names() -> ClusterNames {
    ClusterNames::new("demo", "prod")
}

fn operator_tls(cas: &ClusterCas) -> anyhow::Result<NodeTls> {
    let now = Timestamp::now();
    let operator = issue_client(&names(), cas, "raftkv-operator", OPERATOR_ROLE, now, 1)?;
    Ok(NodeTls {
        ca_pem: cas.client.cert_pem.clone(),
        identity_pem: format!("{}{}", operator.certified.cert_pem, operator.certified.key_pem),
    })
}

fn loopback() -> BTreeMap<String, IpAddr> {
    BTreeMap::from([(pod_dns_name(&names(), 0), "127.0.0.1".parse().unwrap())])
}

fn client() -> HttpNodeClient {
    HttpNodeClient::new(NodeClientTimeouts::default()).expect("a client")
}

fn url(port: u16) -> String {
    format!("https://{}:{port}", pod_dns_name(&names(), 0))
}

#[tokio::test]
async fn the_operator_reaches_a_tls_node_by_its_pod_name_with_its_admin_certificate() -> anyhow::Result<()> {
    let cas = new_cluster_cas(&names(), Timestamp::now())?;
    let server = issue_client_server(&names(), &cas, Timestamp::now(), 1, &[])?;
    let port = start(&server, &cas.client.cert_pem).await?;
    let client = client();
    client.use_tls(&peer_domain(&names()), &operator_tls(&cas)?, &loopback())?;
    let status = client.status(&url(port)).await?;
    assert_eq!((status.id, status.cluster_id, status.leader_id), (11, 7, 10));
    Ok(())
}

#[tokio::test]
async fn a_node_whose_certificate_another_ca_issued_is_refused() -> anyhow::Result<()> {
    let cas = new_cluster_cas(&names(), Timestamp::now())?;
    let impostor = new_cluster_cas(&names(), Timestamp::now())?;
    let server = issue_client_server(&names(), &impostor, Timestamp::now(), 1, &[])?;
    let port = start(&server, &cas.client.cert_pem).await?;
    let client = client();
    client.use_tls(&peer_domain(&names()), &operator_tls(&cas)?, &loopback())?;
    let error = client.status(&url(port)).await.unwrap_err();
    assert!(matches!(error, Error::NodeTransport { .. }), "{error}");
    Ok(())
}

#[tokio::test]
async fn a_node_with_another_clusters_certificate_is_refused() -> anyhow::Result<()> {
    // Same CA, but the certificate names the pods of cluster `other`, not `demo-0`.
    let cas = new_cluster_cas(&names(), Timestamp::now())?;
    let other = ClusterNames::new("other", "prod");
    let server = issue_client_server(&other, &cas, Timestamp::now(), 1, &[])?;
    let port = start(&server, &cas.client.cert_pem).await?;
    let client = client();
    client.use_tls(&peer_domain(&names()), &operator_tls(&cas)?, &loopback())?;
    let error = client.status(&url(port)).await.unwrap_err();
    assert!(matches!(error, Error::NodeTransport { .. }), "{error}");
    Ok(())
}

#[tokio::test]
async fn an_unknown_pod_name_is_not_dialled() -> anyhow::Result<()> {
    let cas = new_cluster_cas(&names(), Timestamp::now())?;
    let server = issue_client_server(&names(), &cas, Timestamp::now(), 1, &[])?;
    let port = start(&server, &cas.client.cert_pem).await?;
    let client = client();
    client.use_tls(&peer_domain(&names()), &operator_tls(&cas)?, &BTreeMap::new())?;
    let error = client.status(&url(port)).await.unwrap_err();
    assert!(matches!(error, Error::NodeTransport { .. }), "{error}");
    Ok(())
}

#[tokio::test]
async fn streams_such_as_backups_reach_a_tls_node_through_the_same_client() -> anyhow::Result<()> {
    let cas = new_cluster_cas(&names(), Timestamp::now())?;
    let server = issue_client_server(&names(), &cas, Timestamp::now(), 1, &[])?;
    let port = start(&server, &cas.client.cert_pem).await?;
    let client = client();
    client.use_tls(&peer_domain(&names()), &operator_tls(&cas)?, &loopback())?;
    let status_url = format!("{}/v1/status", url(port));
    // What backups stream with: the cluster's CA, the operator's certificate, the pod's address.
    let response = client.http_for(&url(port)).get(&status_url).send().await?;
    assert_eq!(response.status(), 200);
    assert!(response.text().await?.contains("\"cluster_id\":7"));
    // A client without them cannot reach it at all.
    assert!(reqwest::Client::new().get(&status_url).send().await.is_err());
    Ok(())
}
