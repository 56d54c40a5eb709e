//! A container's environment: the variables the kubelet provides, the image's, `envFrom` and
//! `env` (literal values with `$(VAR)` expansion, the downward API, ConfigMap and Secret keys),
//! and the service account's kubeconfig behind `KUBECONFIG`.

use std::path::PathBuf;

use base64::Engine;
use serde_json::Value;

use super::images::ImageMapping;
use super::{uid, PodRuntime, NODE_NAME};

pub(super) fn secret_data(secret: &Value) -> Vec<(String, Vec<u8>)> {
    let engine = base64::engine::general_purpose::STANDARD;
    let mut data: Vec<(String, Vec<u8>)> = secret["data"]
        .as_object()
        .into_iter()
        .flatten()
        .map(|(k, v)| {
            (
                k.clone(),
                engine.decode(v.as_str().unwrap_or_default()).unwrap_or_default(),
            )
        })
        .collect();
    data.extend(
        secret["stringData"]
            .as_object()
            .into_iter()
            .flatten()
            .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().as_bytes().to_vec())),
    );
    data
}

/// Expands `$(VAR)` references; `$$(VAR)` yields a literal `$(VAR)`; unknown variables stay as written.
pub fn expand(input: &str, env: &[(String, String)]) -> String {
    let mut out = String::with_capacity(input.len());
    let mut rest = input;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        if let Some(escaped) = after.strip_prefix('$') {
            out.push('$');
            rest = escaped;
        } else if let Some(body) = after.strip_prefix('(') {
            match body.find(')') {
                Some(end) => {
                    let var = &body[..end];
                    match env.iter().rev().find(|(k, _)| k == var) {
                        Some((_, value)) => out.push_str(value),
                        None => out.push_str(&format!("$({var})")),
                    }
                    rest = &body[end + 1..];
                }
                None => {
                    out.push('$');
                    rest = after;
                }
            }
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    out
}

impl PodRuntime {
    fn field_ref(&self, path: &str) -> String {
        let m = &self.pod["metadata"];
        let keyed = |map: &Value, prefix: &str| {
            path.strip_prefix(prefix)
                .and_then(|r| r.strip_suffix("']"))
                .and_then(|k| map[k].as_str())
                .unwrap_or_default()
                .to_string()
        };
        match path {
            "metadata.name" => self.name.clone(),
            "metadata.namespace" => self.ns.clone(),
            "metadata.uid" => uid(&self.pod),
            "spec.nodeName" => NODE_NAME.to_string(),
            "spec.serviceAccountName" => self.pod["spec"]["serviceAccountName"]
                .as_str()
                .unwrap_or("default")
                .to_string(),
            "status.podIP" | "status.podIPs" => self.ip.to_string(),
            "status.hostIP" | "status.hostIPs" => "127.0.0.1".to_string(),
            p if p.starts_with("metadata.labels['") => keyed(&m["labels"], "metadata.labels['"),
            p if p.starts_with("metadata.annotations['") => keyed(&m["annotations"], "metadata.annotations['"),
            _ => String::new(),
        }
    }

    /// The kubeconfig carrying the token of the pod's service account, as a real kubelet mounts
    /// the account's token; none when the pod opts out with `automountServiceAccountToken: false`.
    fn service_account_kubeconfig(&self) -> Option<PathBuf> {
        if self.pod["spec"]["automountServiceAccountToken"] == Value::Bool(false) {
            return None;
        }
        let account = crate::rbac::ServiceAccount {
            namespace: self.ns.clone(),
            name: self.pod["spec"]["serviceAccountName"]
                .as_str()
                .unwrap_or("default")
                .to_string(),
        };
        let path = self
            .shared
            .config
            .root
            .join("serviceaccounts")
            .join(&account.namespace)
            .join(format!("{}.kubeconfig", account.name));
        match crate::kubeconfig::write_kubeconfig(&path, &self.shared.config.server, Some(&account.token())) {
            Ok(()) => Some(path),
            Err(error) => {
                tracing::warn!(%error, "writing the service account's kubeconfig");
                None
            }
        }
    }

    pub(super) fn environment(&self, container: &Value, mapping: &ImageMapping) -> Vec<(String, String)> {
        let store = &self.shared.config.store;
        let mut env: Vec<(String, String)> = vec![
            (
                "PATH".into(),
                std::env::var("PATH").unwrap_or_else(|_| "/usr/local/bin:/usr/bin:/bin".into()),
            ),
            ("HOME".into(), self.scratch.display().to_string()),
            ("HOSTNAME".into(), self.name.clone()),
        ];
        if let Some(kubeconfig) = self.service_account_kubeconfig() {
            env.push(("KUBECONFIG".into(), kubeconfig.display().to_string()));
        }
        for passthrough in ["RUST_LOG", "RUST_BACKTRACE"] {
            if let Ok(v) = std::env::var(passthrough) {
                env.push((passthrough.into(), v));
            }
        }
        env.extend(mapping.env.iter().cloned());
        let read_object = |plural: &str, name: &str| store.get(&store.builtin("", plural), &self.ns, name).ok();
        for source in container["envFrom"].as_array().into_iter().flatten() {
            let prefix = source["prefix"].as_str().unwrap_or_default();
            if let Some(cm) = source["configMapRef"]["name"]
                .as_str()
                .and_then(|n| read_object("configmaps", n))
            {
                for (k, v) in cm["data"].as_object().into_iter().flatten() {
                    env.push((format!("{prefix}{k}"), v.as_str().unwrap_or_default().to_string()));
                }
            }
            if let Some(secret) = source["secretRef"]["name"]
                .as_str()
                .and_then(|n| read_object("secrets", n))
            {
                for (k, v) in secret_data(&secret) {
                    env.push((format!("{prefix}{k}"), String::from_utf8_lossy(&v).into_owned()));
                }
            }
        }
        for var in container["env"].as_array().into_iter().flatten() {
            let name = var["name"].as_str().unwrap_or_default().to_string();
            let from = &var["valueFrom"];
            let value = if let Some(v) = var["value"].as_str() {
                expand(v, &env)
            } else if let Some(path) = from["fieldRef"]["fieldPath"].as_str() {
                self.field_ref(path)
            } else if let Some(key) = from["configMapKeyRef"]["key"].as_str() {
                from["configMapKeyRef"]["name"]
                    .as_str()
                    .and_then(|n| read_object("configmaps", n))
                    .and_then(|cm| cm["data"][key].as_str().map(str::to_string))
                    .unwrap_or_default()
            } else if let Some(key) = from["secretKeyRef"]["key"].as_str() {
                from["secretKeyRef"]["name"]
                    .as_str()
                    .and_then(|n| read_object("secrets", n))
                    .and_then(|s| secret_data(&s).into_iter().find(|(k, _)| k == key))
                    .map(|(_, v)| String::from_utf8_lossy(&v).into_owned())
                    .unwrap_or_default()
            } else {
                String::new()
            };
            env.push((name, value));
        }
        env
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expands_variables_like_kubernetes() {
        let env = vec![("POD_IP".to_string(), "127.1.0.1".to_string())];
        assert_eq!(expand("--addr=$(POD_IP):8080", &env), "--addr=127.1.0.1:8080");
        assert_eq!(expand("$$(POD_IP) $(MISSING)", &env), "$(POD_IP) $(MISSING)");
    }
}
