//! The `raftkv-operator` binary: flags, logging, leader election, the metrics server and the
//! controller.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use clap::Parser;
use k8s_openapi::api::coordination::v1::Lease;
use kube::{Api, Client};
use tracing::{error, info};

use raftkv_operator::config::{OperatorConfig, PeerAddressing, DEFAULT_CLIENT_PORT, DEFAULT_PEER_PORT};
use raftkv_operator::leader::LeaderElector;
use raftkv_operator::metrics::{self, Metrics};
use raftkv_operator::node_client::{HttpNodeClient, NodeClientTimeouts};
use raftkv_operator::reconcile::{self, Context};

/// Reconciles RaftCluster objects into raftkv clusters.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Flags {
    /// Node image for clusters whose spec names none.
    #[arg(long, env = "RAFTKV_OPERATOR_DEFAULT_IMAGE")]
    default_image: Option<String>,

    /// Address of the `/metrics` and `/healthz` server.
    #[arg(long, env = "RAFTKV_OPERATOR_METRICS_ADDR", default_value = "0.0.0.0:8000")]
    metrics_addr: SocketAddr,

    /// Namespace of the leader-election Lease; the operator's own namespace when omitted.
    #[arg(long, env = "RAFTKV_OPERATOR_LEASE_NAMESPACE")]
    lease_namespace: Option<String>,

    /// Name of the leader-election Lease.
    #[arg(long, env = "RAFTKV_OPERATOR_LEASE_NAME", default_value = "raftkv-operator")]
    lease_name: String,

    /// Seconds a leader holds the Lease without renewing it.
    #[arg(long, env = "RAFTKV_OPERATOR_LEASE_SECONDS", default_value_t = 15)]
    lease_seconds: u64,

    /// This replica's identity in the Lease; the pod name when omitted.
    #[arg(long, env = "POD_NAME")]
    identity: Option<String>,

    /// Port of the nodes' client and admin API, in the pods and when dialling them.
    #[arg(long, env = "RAFTKV_OPERATOR_NODE_PORT", default_value_t = DEFAULT_CLIENT_PORT)]
    node_port: u16,

    /// Port of the nodes' peer transport.
    #[arg(long, env = "RAFTKV_OPERATOR_NODE_PEER_PORT", default_value_t = DEFAULT_PEER_PORT)]
    node_peer_port: u16,

    /// How nodes bind and advertise their peer address: `dns` on real clusters, `pod-ip` only
    /// where cluster DNS is missing and pod IPs are stable (a simulated control plane).
    #[arg(long, env = "RAFTKV_OPERATOR_PEER_ADDRESSING", value_enum, default_value = "dns")]
    peer_addressing: PeerAddressing,

    /// Log format.
    #[arg(long, env = "RAFTKV_OPERATOR_LOG_FORMAT", default_value = "text", value_parser = ["text", "json"])]
    log_format: String,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let flags = Flags::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let subscriber = tracing_subscriber::fmt().with_env_filter(filter);
    if flags.log_format == "json" {
        subscriber.json().init();
    } else {
        subscriber.init();
    }

    let client = Client::try_default()
        .await
        .context("no Kubernetes client configuration (in-cluster or kubeconfig)")?;
    let config = OperatorConfig {
        default_image: flags.default_image,
        client_port: flags.node_port,
        peer_port: flags.node_peer_port,
        peer_addressing: flags.peer_addressing,
    };
    let metrics = Arc::new(Metrics::default());
    let server = tokio::spawn(metrics::serve(flags.metrics_addr, metrics.clone()));

    let lease_namespace = flags
        .lease_namespace
        .unwrap_or_else(|| client.default_namespace().to_string());
    let identity = flags
        .identity
        .unwrap_or_else(|| format!("raftkv-operator-{}", std::process::id()));
    let elector = LeaderElector::new(
        Api::<Lease>::namespaced(client.clone(), &lease_namespace),
        flags.lease_name,
        identity,
        Duration::from_secs(flags.lease_seconds),
    );
    info!(namespace = %lease_namespace, "waiting for the leader-election lease");
    elector.acquire().await;

    let nodes = HttpNodeClient::new(NodeClientTimeouts::default())?;
    let ctx = Arc::new(Context::new(client, nodes, config, metrics));
    let (lost_tx, lost_rx) = tokio::sync::oneshot::channel::<()>();
    let mut controller = tokio::spawn(reconcile::run(ctx, async move {
        let _ = lost_rx.await;
    }));
    tokio::select! {
        () = elector.hold() => {
            // Another replica may act from now on: stop reconciling and exit, so the pod
            // restarts as a follower rather than acting on a lease it no longer holds.
            error!("lost the leader-election lease; stopping");
            let _ = lost_tx.send(());
            let _ = controller.await;
            anyhow::bail!("lost the leader-election lease");
        }
        result = &mut controller => {
            result.context("controller task panicked")?;
            info!("controller stopped");
        }
        result = server => {
            result.context("metrics server task panicked")??;
        }
    }
    Ok(())
}
