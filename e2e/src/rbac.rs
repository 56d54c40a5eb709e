//! RBAC for the pods' service accounts, so that the chart's least-privilege roles are exercised:
//! a pod's requests carry its service account's token, and each is checked against the Roles and
//! ClusterRoles bound to that account, as the API server's RBAC authorizer does. The suite's own
//! clients (kubectl, Helm, the tests) use the administrator's kubeconfig and are not checked.
//!
//! Covered: ClusterRoleBindings, RoleBindings (to Roles or ClusterRoles, scoped to their
//! namespace), subjects of kind ServiceAccount and the `system:serviceaccounts[:<ns>]` and
//! `system:authenticated` groups, rules with `apiGroups`, `resources` (with `*` and
//! `<resource>/<subresource>`), `verbs` and `resourceNames`. Not covered: aggregated
//! ClusterRoles, `nonResourceURLs` (discovery is open to every account), users other than
//! service accounts, and the escalation checks on RBAC objects themselves.

use serde_json::Value;

use crate::selector::{FieldSelector, LabelSelector};
use crate::store::Store;

const RBAC_GROUP: &str = "rbac.authorization.k8s.io";
/// The bearer-token prefix of service-account tokens in the simulated cluster.
pub const TOKEN_PREFIX: &str = "serviceaccount:";

/// A pod's identity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceAccount {
    /// Its namespace.
    pub namespace: String,
    /// Its name.
    pub name: String,
}

impl ServiceAccount {
    /// The bearer token the kubelet hands to the account's pods.
    pub fn token(&self) -> String {
        format!("{TOKEN_PREFIX}{}:{}", self.namespace, self.name)
    }

    /// The account named by an `Authorization` header value, if it carries a service-account token.
    pub fn from_authorization(header: &str) -> Option<ServiceAccount> {
        let token = header.strip_prefix("Bearer ")?.strip_prefix(TOKEN_PREFIX)?;
        let (namespace, name) = token.split_once(':')?;
        Some(ServiceAccount {
            namespace: namespace.to_string(),
            name: name.to_string(),
        })
    }

    /// The user name the API server reports for this account.
    pub fn user(&self) -> String {
        format!("system:serviceaccount:{}:{}", self.namespace, self.name)
    }
}

/// What one request asks to do, as RBAC sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attributes {
    /// `get`, `list`, `watch`, `create`, `update`, `patch`, `delete`, `deletecollection`.
    pub verb: String,
    /// API group (`""` for the core group).
    pub group: String,
    /// The plural resource name.
    pub resource: String,
    /// The subresource (`status`, `scale`, `log`), if any.
    pub subresource: Option<String>,
    /// The namespace, for namespaced requests.
    pub namespace: Option<String>,
    /// The object's name, when the request names one.
    pub name: Option<String>,
}

impl Attributes {
    /// The sentence a real API server answers a denied request with.
    pub fn denial(&self, account: &ServiceAccount) -> String {
        let resource = match &self.subresource {
            Some(sub) => format!("{}/{sub}", self.resource),
            None => self.resource.clone(),
        };
        let scope = match &self.namespace {
            Some(ns) => format!("in the namespace \"{ns}\""),
            None => "at the cluster scope".to_string(),
        };
        format!(
            "{} is forbidden: User \"{}\" cannot {} resource \"{resource}\" in API group \"{}\" {scope}",
            self.resource,
            account.user(),
            self.verb,
            self.group
        )
    }
}

/// Whether any Role or ClusterRole bound to `account` allows the request.
pub fn authorize(store: &Store, account: &ServiceAccount, request: &Attributes) -> Result<(), String> {
    let list = |plural: &str, namespace: Option<&str>| {
        store
            .list(
                &store.builtin(RBAC_GROUP, plural),
                namespace,
                &LabelSelector::default(),
                &FieldSelector::default(),
            )
            .0
    };
    let role = |kind: &str, namespace: &str, name: &str| -> Option<Value> {
        let (plural, namespace) = match kind {
            "ClusterRole" => ("clusterroles", ""),
            "Role" => ("roles", namespace),
            _ => return None,
        };
        store.get(&store.builtin(RBAC_GROUP, plural), namespace, name).ok()
    };
    let mut roles = Vec::new();
    for binding in list("clusterrolebindings", None) {
        if binds(&binding, account) {
            roles.extend(role(
                "ClusterRole",
                "",
                binding["roleRef"]["name"].as_str().unwrap_or_default(),
            ));
        }
    }
    // A RoleBinding grants its role's rules only inside its own namespace.
    if let Some(namespace) = &request.namespace {
        for binding in list("rolebindings", Some(namespace)) {
            if binds(&binding, account) {
                let kind = binding["roleRef"]["kind"].as_str().unwrap_or_default();
                let name = binding["roleRef"]["name"].as_str().unwrap_or_default();
                roles.extend(role(kind, namespace, name));
            }
        }
    }
    let allowed = roles
        .iter()
        .flat_map(|r| r["rules"].as_array().into_iter().flatten())
        .any(|rule| rule_allows(rule, request));
    if allowed {
        Ok(())
    } else {
        Err(request.denial(account))
    }
}

/// Whether a binding names the account among its subjects.
fn binds(binding: &Value, account: &ServiceAccount) -> bool {
    binding["subjects"]
        .as_array()
        .into_iter()
        .flatten()
        .any(|s| match s["kind"].as_str().unwrap_or_default() {
            "ServiceAccount" => {
                s["name"].as_str() == Some(account.name.as_str())
                    && s["namespace"].as_str() == Some(account.namespace.as_str())
            }
            "Group" => {
                let group = s["name"].as_str().unwrap_or_default();
                group == "system:serviceaccounts"
                    || group == "system:authenticated"
                    || group == format!("system:serviceaccounts:{}", account.namespace)
            }
            _ => false,
        })
}

/// Whether one policy rule allows the request.
pub fn rule_allows(rule: &Value, request: &Attributes) -> bool {
    let listed = |field: &str, want: &str| {
        rule[field]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .any(|v| v == "*" || v == want)
    };
    let resource_allowed = rule["resources"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .any(|r| match &request.subresource {
            Some(sub) => r == "*" || r == format!("{}/{sub}", request.resource) || r == format!("*/{sub}"),
            None => r == "*" || r == request.resource,
        });
    // `resourceNames` narrows a rule to named objects; a request that names none (list, watch,
    // create by POST) is outside such a rule.
    let names: Vec<&str> = rule["resourceNames"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .collect();
    let name_allowed = names.is_empty() || request.name.as_deref().is_some_and(|n| names.contains(&n));
    listed("verbs", &request.verb) && listed("apiGroups", &request.group) && resource_allowed && name_allowed
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn request(verb: &str, group: &str, resource: &str, sub: Option<&str>, name: Option<&str>) -> Attributes {
        Attributes {
            verb: verb.into(),
            group: group.into(),
            resource: resource.into(),
            subresource: sub.map(Into::into),
            namespace: Some("ns".into()),
            name: name.map(Into::into),
        }
    }

    #[test]
    fn rules_match_verbs_groups_resources_and_subresources() {
        let rule = json!({"apiGroups": ["apps"], "resources": ["statefulsets", "statefulsets/scale"],
                          "verbs": ["get", "patch"]});
        assert!(rule_allows(
            &rule,
            &request("patch", "apps", "statefulsets", None, Some("a"))
        ));
        assert!(rule_allows(
            &rule,
            &request("get", "apps", "statefulsets", Some("scale"), Some("a"))
        ));
        assert!(!rule_allows(
            &rule,
            &request("create", "apps", "statefulsets", None, Some("a"))
        ));
        assert!(!rule_allows(
            &rule,
            &request("get", "", "statefulsets", None, Some("a"))
        ));
        assert!(!rule_allows(
            &rule,
            &request("get", "apps", "statefulsets", Some("status"), Some("a"))
        ));
        let wildcard = json!({"apiGroups": ["*"], "resources": ["*"], "verbs": ["*"]});
        assert!(rule_allows(
            &wildcard,
            &request("delete", "policy", "poddisruptionbudgets", None, None)
        ));
    }

    #[test]
    fn resource_names_narrow_a_rule_to_named_objects() {
        let rule = json!({"apiGroups": ["coordination.k8s.io"], "resources": ["leases"],
                          "resourceNames": ["raftkv-operator"], "verbs": ["get", "update"]});
        assert!(rule_allows(
            &rule,
            &request("get", "coordination.k8s.io", "leases", None, Some("raftkv-operator"))
        ));
        assert!(!rule_allows(
            &rule,
            &request("get", "coordination.k8s.io", "leases", None, Some("other"))
        ));
        assert!(!rule_allows(
            &rule,
            &request("get", "coordination.k8s.io", "leases", None, None)
        ));
    }

    #[test]
    fn service_account_tokens_round_trip_and_other_credentials_are_not_accounts() {
        let account = ServiceAccount {
            namespace: "raftkv-system".into(),
            name: "raftkv-operator".into(),
        };
        let header = format!("Bearer {}", account.token());
        assert_eq!(ServiceAccount::from_authorization(&header), Some(account.clone()));
        assert_eq!(ServiceAccount::from_authorization("Bearer admin"), None);
        assert_eq!(ServiceAccount::from_authorization("Basic eDp5"), None);
        assert_eq!(account.user(), "system:serviceaccount:raftkv-system:raftkv-operator");
    }

    #[test]
    fn bindings_name_accounts_directly_or_through_their_groups() {
        let account = ServiceAccount {
            namespace: "a".into(),
            name: "op".into(),
        };
        let direct = json!({"subjects": [{"kind": "ServiceAccount", "name": "op", "namespace": "a"}]});
        let other_ns = json!({"subjects": [{"kind": "ServiceAccount", "name": "op", "namespace": "b"}]});
        let group = json!({"subjects": [{"kind": "Group", "name": "system:serviceaccounts:a"}]});
        let user = json!({"subjects": [{"kind": "User", "name": "op"}]});
        assert!(binds(&direct, &account));
        assert!(!binds(&other_ns, &account));
        assert!(binds(&group, &account));
        assert!(!binds(&user, &account));
    }
}
