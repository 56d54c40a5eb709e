//! Where backups live, and the credentials to reach them.
//!
//! A destination is a URL handled by the `object_store` crate: `s3://bucket/prefix` (AWS S3 or
//! any S3-compatible server given an endpoint), `gs://bucket/prefix`, `az://container/prefix`,
//! or `file:///path` for a mounted volume or a local directory. Credentials are object_store's
//! configuration keys under their environment names (`AWS_ACCESS_KEY_ID`,
//! `AWS_SECRET_ACCESS_KEY`, `GOOGLE_SERVICE_ACCOUNT_KEY`, `AZURE_STORAGE_ACCOUNT_KEY`, ...): the
//! operator reads them from a Secret's keys, a restoring node from its environment (the same
//! Secret mounted as env), so one Secret serves both.

use std::collections::BTreeMap;
use std::sync::Arc;

use object_store::path::Path;
use object_store::ObjectStore;

use crate::{Error, Result};

/// Options for S3-compatible servers; they become the `AWS_ENDPOINT`, `AWS_REGION` and
/// `AWS_ALLOW_HTTP` settings and override the same keys from credentials or environment.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StoreOptions {
    /// Endpoint of an S3-compatible server, such as `http://minio.storage:9000`.
    pub endpoint: Option<String>,
    /// Region of the bucket.
    pub region: Option<String>,
    /// Allow plain HTTP to the endpoint (for servers inside the cluster without TLS).
    pub allow_http: bool,
}

impl StoreOptions {
    /// The options as environment variables, for a process (the restoring node) that builds
    /// its destination from its environment.
    pub fn to_env(&self) -> Vec<(String, String)> {
        let mut env = Vec::new();
        if let Some(e) = &self.endpoint {
            env.push(("AWS_ENDPOINT".to_string(), e.clone()));
        }
        if let Some(r) = &self.region {
            env.push(("AWS_REGION".to_string(), r.clone()));
        }
        if self.allow_http {
            env.push(("AWS_ALLOW_HTTP".to_string(), "true".to_string()));
        }
        env
    }
}

/// Prefixes of the environment variables that configure object stores.
const ENV_PREFIXES: [&str; 3] = ["AWS_", "GOOGLE_", "AZURE_"];

/// An opened destination: an object store and the prefix inside it under which backups live.
#[derive(Clone, Debug)]
pub struct Destination {
    /// The URL it was opened from, for messages.
    url: String,
    /// The store itself.
    store: Arc<dyn ObjectStore>,
    /// The folder of the backups inside the store (empty for the bucket's root).
    prefix: Path,
}

impl Destination {
    /// Opens `url` with `credentials` (a Secret's keys) and `options`; nothing from the
    /// process environment is used, so an operator serving many clusters never mixes up one
    /// cluster's credentials with its own.
    pub fn open(url: &str, credentials: &BTreeMap<String, String>, options: &StoreOptions) -> Result<Self> {
        let settings = credentials
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .chain(options.to_env())
            .collect::<Vec<_>>();
        Self::open_with(url, settings)
    }

    /// Opens `url` with the object store settings of this process's environment (`AWS_*`,
    /// `GOOGLE_*`, `AZURE_*`), as a restoring node does.
    pub fn open_from_env(url: &str) -> Result<Self> {
        let settings = std::env::vars()
            .filter(|(k, _)| ENV_PREFIXES.iter().any(|p| k.starts_with(p)))
            .collect::<Vec<_>>();
        Self::open_with(url, settings)
    }

    fn open_with(url: &str, settings: Vec<(String, String)>) -> Result<Self> {
        let invalid = |reason: String| Error::InvalidLocation {
            url: url.to_string(),
            reason,
        };
        let parsed = url::Url::parse(url).map_err(|e| invalid(e.to_string()))?;
        match parsed.scheme() {
            "s3" | "s3a" | "gs" | "az" | "azure" | "abfs" | "abfss" | "file" => {}
            other => {
                return Err(invalid(format!(
                    "unsupported scheme {other:?}: use s3://, gs://, az:// or file://"
                )))
            }
        }
        if parsed.scheme() != "file" && parsed.host_str().is_none_or(str::is_empty) {
            return Err(invalid("no bucket or container named".into()));
        }
        // object_store's keys are lower case; environment names are upper case.
        let settings = settings.into_iter().map(|(k, v)| (k.to_ascii_lowercase(), v));
        let (store, prefix) = object_store::parse_url_opts(&parsed, settings).map_err(|e| invalid(e.to_string()))?;
        Ok(Self {
            url: url.trim_end_matches('/').to_string(),
            store: Arc::from(store),
            prefix,
        })
    }

    /// The URL this destination was opened from, without a trailing slash.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The full URL of the object `name` in this destination.
    pub fn object_url(&self, name: &str) -> String {
        format!("{}/{name}", self.url)
    }

    /// The store's path of the object `name`.
    pub(crate) fn path_of(&self, name: &str) -> Path {
        self.prefix.clone().join(name)
    }

    /// The folder of the backups.
    pub(crate) fn prefix(&self) -> &Path {
        &self.prefix
    }

    /// The store.
    pub(crate) fn store(&self) -> &Arc<dyn ObjectStore> {
        &self.store
    }
}

/// Splits an object URL into its destination's URL and the object's name:
/// `s3://b/backups/x.rkvsnap` into `s3://b/backups` and `x.rkvsnap`.
pub fn split_object_url(url: &str) -> Result<(&str, &str)> {
    let invalid = |reason: &str| Error::InvalidLocation {
        url: url.to_string(),
        reason: reason.to_string(),
    };
    let (scheme_end, rest) = url.split_once("://").ok_or_else(|| invalid("not a URL"))?;
    let (dir, name) = rest
        .rsplit_once('/')
        .ok_or_else(|| invalid("no object name after the bucket"))?;
    if name.is_empty() || dir.is_empty() {
        return Err(invalid("no object name after the bucket"));
    }
    Ok((&url[..scheme_end.len() + 3 + dir.len()], name))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn supported_urls_open_with_their_prefix() {
        let none = BTreeMap::new();
        let opts = StoreOptions {
            endpoint: Some("http://127.0.0.1:9".into()),
            region: Some("eu-1".into()),
            allow_http: true,
        };
        let d = Destination::open("s3://bucket/backups/prod/", &none, &opts).unwrap();
        assert_eq!(d.prefix().as_ref(), "backups/prod");
        assert_eq!(d.object_url("x.rkvsnap"), "s3://bucket/backups/prod/x.rkvsnap");
        let d = Destination::open("file:///var/backups/raftkv", &none, &opts).unwrap();
        assert_eq!(d.path_of("x").as_ref(), "var/backups/raftkv/x");
        Destination::open("s3://bucket", &none, &opts).unwrap();
    }

    #[test]
    fn unsupported_or_incomplete_urls_are_refused_with_the_reason() {
        let none = BTreeMap::new();
        for (url, why) in [
            ("ftp://host/dir", "unsupported scheme"),
            ("s3:///no-bucket", "no bucket"),
            ("not a url", "relative URL"),
        ] {
            let err = Destination::open(url, &none, &StoreOptions::default()).unwrap_err();
            assert!(err.to_string().contains(why), "{url}: {err}");
        }
    }

    #[test]
    fn an_object_url_splits_into_destination_and_name() {
        assert_eq!(
            split_object_url("s3://b/backups/demo-1.rkvsnap").unwrap(),
            ("s3://b/backups", "demo-1.rkvsnap")
        );
        assert_eq!(split_object_url("file:///d/x").unwrap(), ("file:///d", "x"));
        assert!(split_object_url("s3://b/").is_err());
        assert!(split_object_url("s3://bucket").is_err());
    }
}
