//! The `raftkv-operator` binary: flags, logging, leader election, the metrics server and the
//! controller.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use clap::Parser;
use k8s_openapi::api::coordination::v1::Lease;
use kube::{Api, Client};
use tracing::{error, info, warn};

use raftkv_operator::config::{operator_peer, OperatorConfig, PeerAddressing, DEFAULT_CLIENT_PORT, DEFAULT_PEER_PORT};
use raftkv_operator::leader::{fallback_identity, while_leading, LeaderElector, LeaseTimings};
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

    /// Seconds candidates wait, after the Lease last changed, before taking it over.
    #[arg(long, env = "RAFTKV_OPERATOR_LEASE_SECONDS", default_value_t = 15)]
    lease_seconds: u64,

    /// Seconds the leader keeps leading without a successful renewal; shorter than the lease.
    /// Two thirds of the lease when omitted.
    #[arg(long, env = "RAFTKV_OPERATOR_LEASE_RENEW_DEADLINE_SECONDS")]
    lease_renew_deadline_seconds: Option<u64>,

    /// Seconds between renewals, and between a candidate's looks at the Lease. Two fifteenths
    /// of the lease when omitted.
    #[arg(long, env = "RAFTKV_OPERATOR_LEASE_RETRY_SECONDS")]
    lease_retry_seconds: Option<u64>,

    /// This replica's identity in the Lease: the pod name; when omitted, the host name and a
    /// random suffix, unique per process.
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

    /// The operator's own namespace, for the NetworkPolicies that let it reach the nodes.
    #[arg(long, env = "POD_NAMESPACE")]
    namespace: Option<String>,

    /// Labels selecting the operator's own pods, `key=value,key=value`: clusters' NetworkPolicies
    /// admit them to the client port.
    #[arg(long, env = "RAFTKV_OPERATOR_POD_LABELS", value_parser = parse_labels)]
    pod_labels: Option<BTreeMap<String, String>>,

    /// Log format.
    #[arg(long, env = "RAFTKV_OPERATOR_LOG_FORMAT", default_value = "text", value_parser = ["text", "json"])]
    log_format: String,
}

fn parse_labels(text: &str) -> Result<BTreeMap<String, String>, String> {
    text.split(',')
        .filter(|pair| !pair.trim().is_empty())
        .map(|pair| {
            let (key, value) = pair
                .split_once('=')
                .ok_or_else(|| format!("{pair:?} is not key=value"))?;
            Ok((key.trim().to_string(), value.trim().to_string()))
        })
        .collect()
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
        operator_peer: operator_peer(
            flags.namespace.as_deref().unwrap_or_default(),
            flags.pod_labels.unwrap_or_default(),
        ),
    };
    let metrics = Arc::new(Metrics::default());
    let server = tokio::spawn(metrics::serve(flags.metrics_addr, metrics.clone()));

    let lease_namespace = flags
        .lease_namespace
        .unwrap_or_else(|| client.default_namespace().to_string());
    // An empty identity would read as "nobody holds the Lease" to every other replica.
    let identity = flags
        .identity
        .filter(|identity| !identity.trim().is_empty())
        .unwrap_or_else(fallback_identity);
    let mut timings = LeaseTimings::for_lease_duration(Duration::from_secs(flags.lease_seconds));
    if let Some(seconds) = flags.lease_renew_deadline_seconds {
        timings.renew_deadline = Duration::from_secs(seconds);
    }
    if let Some(seconds) = flags.lease_retry_seconds {
        timings.retry_period = Duration::from_secs(seconds);
    }
    let timings = timings.validate()?;
    let mut elector = LeaderElector::new(
        Api::<Lease>::namespaced(client.clone(), &lease_namespace),
        flags.lease_name,
        identity.clone(),
        timings,
    );
    info!(namespace = %lease_namespace, %identity, "waiting for the leader-election lease");
    let acquired_at = elector.acquire().await;

    let nodes = HttpNodeClient::new(NodeClientTimeouts::default())?;
    let ctx = Arc::new(Context::new(client, nodes, config, metrics));
    let controller = tokio::spawn(reconcile::run(ctx));
    tokio::select! {
        led = while_leading(elector.hold(acquired_at), controller) => match led {
            Err(lost) => {
                // The controller task is already aborted: another replica may act from now on.
                // Exiting non-zero restarts the pod as a candidate.
                error!(%lost, "lost the leader-election lease; stopping");
                anyhow::bail!("lost the leader-election lease: {lost}");
            }
            Ok(ended) => {
                ended.context("controller task panicked")?;
                info!("controller stopped");
                // Best effort: a replica that cannot release the Lease leaves it to expire.
                if let Err(error) = elector.release().await {
                    warn!(%error, "could not release the leader-election lease");
                }
            }
        },
        result = server => {
            result.context("metrics server task panicked")??;
        }
    }
    Ok(())
}
