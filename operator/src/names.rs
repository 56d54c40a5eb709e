//! Names and labels of the objects that make up one cluster, in one place so that the builders,
//! the observer and the side effects agree on them.

use std::collections::BTreeMap;

/// Name of the persistent volume claim template; claims are `data-<cluster>-<ordinal>`.
pub const DATA_VOLUME: &str = "data";
/// Where the node keeps its identity, WAL and snapshots inside the container.
pub const DATA_DIR: &str = "/var/lib/raftkv";
/// Name of the node container.
pub const NODE_CONTAINER: &str = "raftkv-node";
/// Label on each pod written by the StatefulSet controller with the pod's template revision.
pub const REVISION_LABEL: &str = "controller-revision-hash";
/// Annotation on a data claim naming the member a scale-down removed from it. It lives and dies
/// with the claim, so a fresh claim under the same name never carries an old member's mark.
pub const REMOVED_MEMBER_ANNOTATION: &str = "raftkv.dev/removed-member";

/// Label key naming the application; on every object of every cluster, and in the pod selector.
pub const NAME_LABEL: &str = "app.kubernetes.io/name";
/// The value of [`NAME_LABEL`]: the application is raftkv.
pub const APP_NAME: &str = "raftkv";
/// Label key naming the `RaftCluster` an object belongs to; in the pod selector.
pub const INSTANCE_LABEL: &str = "app.kubernetes.io/instance";
/// Label key naming who manages an object; the operator watches the objects it manages by it.
pub const MANAGED_BY_LABEL: &str = "app.kubernetes.io/managed-by";
/// The value of [`MANAGED_BY_LABEL`] on the operator's objects.
pub const MANAGED_BY: &str = "raftkv-operator";
/// Label key naming an object's part in the application.
pub const COMPONENT_LABEL: &str = "app.kubernetes.io/component";
/// The value of [`COMPONENT_LABEL`]: every object of a cluster serves its nodes.
pub const NODE_COMPONENT: &str = "node";

/// The names derived from one `RaftCluster`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClusterNames {
    /// The `RaftCluster`'s name; also the name of the StatefulSet, client Service and PDB.
    pub cluster: String,
    /// The namespace everything lives in.
    pub namespace: String,
}

impl ClusterNames {
    /// Names for the cluster `name` in `namespace`.
    pub fn new(name: impl Into<String>, namespace: impl Into<String>) -> Self {
        Self {
            cluster: name.into(),
            namespace: namespace.into(),
        }
    }

    /// The StatefulSet.
    pub fn statefulset(&self) -> &str {
        &self.cluster
    }

    /// The client Service users connect (or port-forward) to.
    pub fn client_service(&self) -> &str {
        &self.cluster
    }

    /// The headless Service that gives every pod a stable DNS name for peer traffic.
    pub fn peer_service(&self) -> String {
        format!("{}-peer", self.cluster)
    }

    /// The PodDisruptionBudget.
    pub fn pdb(&self) -> &str {
        &self.cluster
    }

    /// The NetworkPolicy.
    pub fn network_policy(&self) -> &str {
        &self.cluster
    }

    /// The pod with this ordinal.
    pub fn pod(&self, ordinal: u32) -> String {
        format!("{}-{ordinal}", self.cluster)
    }

    /// The data claim of the pod with this ordinal.
    pub fn pvc(&self, ordinal: u32) -> String {
        format!("{DATA_VOLUME}-{}-{ordinal}", self.cluster)
    }

    /// The ordinal of one of this cluster's pods, from its name.
    pub fn pod_ordinal(&self, pod_name: &str) -> Option<u32> {
        ordinal_suffix(pod_name, &self.cluster)
    }

    /// The ordinal of one of this cluster's data claims, from its name.
    pub fn pvc_ordinal(&self, claim_name: &str) -> Option<u32> {
        let prefix = format!("{DATA_VOLUME}-{}", self.cluster);
        ordinal_suffix(claim_name, &prefix)
    }

    /// The ordinal named by a peer URL in DNS form (`http://<cluster>-<n>.<peer-svc>...`).
    pub fn ordinal_from_peer_url(&self, peer_url: &str) -> Option<u32> {
        let host = peer_url.split("://").nth(1)?.split([':', '/']).next()?;
        let (pod, rest) = host.split_once('.')?;
        if !rest.starts_with(&format!("{}.", self.peer_service())) {
            return None;
        }
        self.pod_ordinal(pod)
    }

    /// Labels every object of the cluster carries.
    pub fn labels(&self) -> BTreeMap<String, String> {
        let mut labels = self.selector_labels();
        labels.insert(MANAGED_BY_LABEL.into(), MANAGED_BY.into());
        labels.insert(COMPONENT_LABEL.into(), NODE_COMPONENT.into());
        labels
    }

    /// The subset of labels that selects the cluster's pods. Kept small and stable because a
    /// StatefulSet's selector can never change.
    pub fn selector_labels(&self) -> BTreeMap<String, String> {
        BTreeMap::from([
            (NAME_LABEL.to_string(), APP_NAME.to_string()),
            (INSTANCE_LABEL.to_string(), self.cluster.clone()),
        ])
    }

    /// The pod selector as a label-selector string, for listing and for the scale subresource.
    pub fn selector_string(&self) -> String {
        self.selector_labels()
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(",")
    }
}

/// `<prefix>-<n>` to `n`, rejecting leading zeros so that one ordinal has exactly one name.
fn ordinal_suffix(name: &str, prefix: &str) -> Option<u32> {
    let digits = name.strip_prefix(prefix)?.strip_prefix('-')?;
    if digits.is_empty() || (digits.len() > 1 && digits.starts_with('0')) {
        return None;
    }
    if !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pod_and_claim_names_round_trip_to_ordinals() {
        let names = ClusterNames::new("demo", "ns");
        assert_eq!(names.pod(4), "demo-4");
        assert_eq!(names.pod_ordinal("demo-4"), Some(4));
        assert_eq!(names.pvc(2), "data-demo-2");
        assert_eq!(names.pvc_ordinal("data-demo-2"), Some(2));
    }

    #[test]
    fn names_of_other_clusters_have_no_ordinal() {
        let names = ClusterNames::new("demo", "ns");
        assert_eq!(names.pod_ordinal("demo-peer-1"), None);
        assert_eq!(names.pod_ordinal("demo2-1"), None);
        assert_eq!(names.pod_ordinal("demo-01"), None);
        assert_eq!(names.pvc_ordinal("data-demo2-1"), None);
    }

    #[test]
    fn peer_urls_in_dns_form_name_their_ordinal() {
        let names = ClusterNames::new("demo", "ns");
        assert_eq!(
            names.ordinal_from_peer_url("http://demo-3.demo-peer.ns.svc:8081"),
            Some(3)
        );
        assert_eq!(names.ordinal_from_peer_url("http://10.0.0.3:8081"), None);
        assert_eq!(
            names.ordinal_from_peer_url("http://demo-3.other-peer.ns.svc:8081"),
            None
        );
    }

    #[test]
    fn selector_string_lists_the_selector_labels() {
        let names = ClusterNames::new("demo", "ns");
        assert_eq!(
            names.selector_string(),
            "app.kubernetes.io/instance=demo,app.kubernetes.io/name=raftkv"
        );
    }
}
