//! Settings that come from the operator's command line and shape every cluster it manages.
//!
//! They live apart from `main.rs` so that the pure builders and the tests take them as a plain
//! value instead of reading flags or the environment.

use std::collections::BTreeMap;

use k8s_openapi::api::networking::v1::NetworkPolicyPeer;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;

/// The default port of the node's client and admin API.
pub const DEFAULT_CLIENT_PORT: u16 = 8080;
/// The default port of the node's Raft peer transport.
pub const DEFAULT_PEER_PORT: u16 = 8081;
/// The field manager of every server-side apply the operator sends.
pub const FIELD_MANAGER: &str = "raftkv-operator";

/// How nodes bind their listeners and which peer URL they advertise.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum PeerAddressing {
    /// Listen on all interfaces and advertise the pod's stable DNS name under the headless peer
    /// Service. The name survives pod restarts, so the peer URL in the Raft membership stays
    /// valid. This is the right choice on every real cluster.
    Dns,
    /// Listen on the pod IP and advertise it. Only for environments without cluster DNS whose
    /// pods keep their IP across restarts (a simulated control plane running pods as processes
    /// on loopback addresses); on a real cluster a restarted pod's new IP would strand its peers.
    PodIp,
}

/// Operator-wide settings.
#[derive(Clone, Debug)]
pub struct OperatorConfig {
    /// Image used when a `RaftCluster` does not name one.
    pub default_image: Option<String>,
    /// Port of the node's client and admin API, in the pod and when the operator dials a pod.
    pub client_port: u16,
    /// Port of the node's peer transport.
    pub peer_port: u16,
    /// How nodes bind and advertise themselves.
    pub peer_addressing: PeerAddressing,
    /// The operator's own pods as a NetworkPolicy source, so a cluster's NetworkPolicy lets
    /// the operator reach the admin API; `None` when the operator does not know its namespace.
    pub operator_peer: Option<NetworkPolicyPeer>,
}

impl Default for OperatorConfig {
    fn default() -> Self {
        Self {
            default_image: None,
            client_port: DEFAULT_CLIENT_PORT,
            peer_port: DEFAULT_PEER_PORT,
            peer_addressing: PeerAddressing::Dns,
            operator_peer: None,
        }
    }
}

impl OperatorConfig {
    /// The base URL of a node's admin API, from its pod's `status.podIP`.
    ///
    /// Pods are dialled by IP rather than by DNS name so that the operator can reach a pod that is
    /// not ready yet (a fresh learner) regardless of how Services publish it. An IPv6 address is
    /// bracketed as URLs require.
    pub fn node_url(&self, pod_ip: &str) -> String {
        if pod_ip.contains(':') {
            format!("http://[{pod_ip}]:{}", self.client_port)
        } else {
            format!("http://{pod_ip}:{}", self.client_port)
        }
    }
}

/// The operator's pods as a NetworkPolicy source: pods with `labels` in `namespace`. An empty
/// label set would select every pod of the namespace, so it gives `None`.
pub fn operator_peer(namespace: &str, labels: BTreeMap<String, String>) -> Option<NetworkPolicyPeer> {
    if namespace.is_empty() || labels.is_empty() {
        return None;
    }
    Some(NetworkPolicyPeer {
        namespace_selector: Some(LabelSelector {
            match_labels: Some(BTreeMap::from([(
                "kubernetes.io/metadata.name".to_string(),
                namespace.to_string(),
            )])),
            ..LabelSelector::default()
        }),
        pod_selector: Some(LabelSelector {
            match_labels: Some(labels),
            ..LabelSelector::default()
        }),
        ..NetworkPolicyPeer::default()
    })
}

impl OperatorConfig {
    /// The base URL of a TLS node's admin API, by the DNS name its certificate names; the node
    /// client resolves it to the pod IP.
    pub fn tls_node_url(&self, dns_name: &str) -> String {
        format!("https://{dns_name}:{}", self.client_port)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_url_uses_the_pod_ip_and_the_configured_client_port() {
        let config = OperatorConfig {
            client_port: 18080,
            ..OperatorConfig::default()
        };
        assert_eq!(config.node_url("10.1.2.3"), "http://10.1.2.3:18080");
        assert_eq!(config.node_url("fd00::5"), "http://[fd00::5]:18080");
    }
}
