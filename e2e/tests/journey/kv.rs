//! The store as a client sees it: the KV and admin HTTP API of `raftkv-node` (its bodies are
//! `raftkv-api`'s types), and a writer that keeps writing while the cluster changes and
//! remembers every write that was acknowledged.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use raftkv_api::{AddMemberRequest, MemberView, Members, Status, TransferRequest};
use reqwest::StatusCode;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::backend::Backend;

/// An HTTP client for the node API, plaintext or TLS.
#[derive(Clone)]
pub struct Kv {
    http: reqwest::Client,
    /// Whether bases given as `http://` are reached over `https://`.
    tls: bool,
}

impl Kv {
    /// A client whose every request has a deadline.
    pub fn new() -> anyhow::Result<Kv> {
        Ok(Kv {
            http: Self::builder().build()?,
            tls: false,
        })
    }

    fn builder() -> reqwest::ClientBuilder {
        reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .connect_timeout(Duration::from_secs(3))
    }

    /// A TLS client trusting only `ca_pem`, presenting `identity_pem` (certificate then key)
    /// when given. Bases are still given as the backend's `http://` URLs and reached over
    /// `https://`; a port-forward's `127.0.0.1` is reached as `localhost`, which the cluster's
    /// certificate names.
    pub fn tls(ca_pem: &str, identity_pem: Option<&str>) -> anyhow::Result<Kv> {
        let mut builder = Self::builder()
            .use_rustls_tls()
            .tls_built_in_root_certs(false)
            .add_root_certificate(reqwest::Certificate::from_pem(ca_pem.as_bytes())?);
        if let Some(identity) = identity_pem {
            builder = builder.identity(reqwest::Identity::from_pem(identity.as_bytes())?);
        }
        Ok(Kv {
            http: builder.build()?,
            tls: true,
        })
    }

    /// `base` as this client reaches it.
    fn base(&self, base: &str) -> String {
        if !self.tls {
            return base.to_string();
        }
        base.replacen("http://", "https://", 1)
            .replacen("https://127.0.0.1:", "https://localhost:", 1)
    }

    /// `PUT /v1/kv/{key}`; the status code.
    pub async fn put(&self, base: &str, key: &str, value: &str) -> reqwest::Result<StatusCode> {
        let response = self
            .http
            .put(format!("{}/v1/kv/{key}", self.base(base)))
            .body(value.to_string())
            .send()
            .await?;
        Ok(response.status())
    }

    /// `PUT /v1/kv/{key}`: the revision of an acknowledged write, or the status code of a
    /// refused or unconfirmed one.
    pub async fn put_revision(&self, base: &str, key: &str, value: &str) -> reqwest::Result<Result<u64, StatusCode>> {
        let response = self
            .http
            .put(format!("{base}/v1/kv/{key}"))
            .body(value.to_string())
            .send()
            .await?;
        if response.status() != StatusCode::OK {
            return Ok(Err(response.status()));
        }
        Ok(Ok(response.json::<raftkv_api::WriteResponse>().await?.revision))
    }

    /// `GET /v1/kv/{key}` (linearizable): `None` when absent.
    pub async fn get(&self, base: &str, key: &str) -> anyhow::Result<Option<String>> {
        let response = self.http.get(format!("{}/v1/kv/{key}", self.base(base))).send().await?;
        match response.status() {
            StatusCode::OK => Ok(Some(response.text().await?)),
            StatusCode::NOT_FOUND => Ok(None),
            status => bail!(
                "GET {key} from {base}: {status}: {}",
                response.text().await.unwrap_or_default()
            ),
        }
    }

    /// `GET /v1/members`.
    pub async fn members(&self, base: &str) -> anyhow::Result<Vec<MemberView>> {
        let response = self.http.get(format!("{}/v1/members", self.base(base))).send().await?;
        let response = response.error_for_status()?;
        Ok(response.json::<Members>().await?.members)
    }

    /// `POST /v1/members`: adds a learner, as the operator does; returns once applied.
    pub async fn add_learner(&self, base: &str, id: u64, peer_url: &str) -> anyhow::Result<()> {
        let body = AddMemberRequest {
            id,
            peer_url: peer_url.to_string(),
            learner: true,
        };
        let response = self
            .http
            .post(format!("{}/v1/members", self.base(base)))
            .json(&body)
            .send()
            .await?;
        ensure_ok(response, "adding a learner").await
    }

    /// `DELETE /v1/members/{id}`: removes a member, as the operator does; returns once applied.
    pub async fn remove_member(&self, base: &str, id: u64) -> anyhow::Result<()> {
        let response = self
            .http
            .delete(format!("{}/v1/members/{id}", self.base(base)))
            .send()
            .await?;
        ensure_ok(response, "removing a member").await
    }

    /// `POST /v1/leader`: moves leadership to `id` and waits until it happened.
    pub async fn transfer_leader(&self, base: &str, id: u64) -> anyhow::Result<()> {
        let body = TransferRequest { id };
        let response = self
            .http
            .post(format!("{}/v1/leader", self.base(base)))
            .json(&body)
            .send()
            .await?;
        ensure_ok(response, "transferring leadership").await
    }

    /// `GET /v1/status`.
    pub async fn status(&self, base: &str) -> anyhow::Result<Status> {
        let response = self.http.get(format!("{}/v1/status", self.base(base))).send().await?;
        Ok(response.error_for_status()?.json().await?)
    }
}

async fn ensure_ok(response: reqwest::Response, what: &str) -> anyhow::Result<()> {
    let status = response.status();
    if !status.is_success() {
        bail!("{what}: {status}: {}", response.text().await.unwrap_or_default());
    }
    Ok(())
}

/// What a [`Writer`] saw.
#[derive(Debug, Default)]
pub struct WriterReport {
    /// Every acknowledged write, key to value.
    pub acked: BTreeMap<String, String>,
    /// Writes answered 200.
    pub ok: u64,
    /// Writes answered 503 (no leader for a moment).
    pub unavailable: u64,
    /// Every other outcome (status code or transport error) with its count.
    pub other: BTreeMap<String, u64>,
    /// The longest time between two acknowledged writes.
    pub longest_gap: Duration,
}

impl WriterReport {
    /// Writes whose outcome the writer cannot know: `504 unknown_outcome`, timeouts and broken
    /// connections (the write may or may not have been applied).
    pub fn unknown(&self) -> u64 {
        ["504", "timeout", "transport"]
            .iter()
            .filter_map(|k| self.other.get(*k))
            .sum()
    }
}

impl std::fmt::Display for WriterReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} acknowledged, {} unavailable (503), other {:?}, longest gap between acknowledgements {:?}",
            self.ok, self.unavailable, self.other, self.longest_gap
        )
    }
}

/// A client writing distinct keys through a Service, one at a time, until stopped.
pub struct Writer {
    /// Cancelled by [`Writer::stop`], or when the writer is dropped (a failed step).
    stop: tokio_util::sync::DropGuard,
    task: JoinHandle<WriterReport>,
}

impl Writer {
    /// Starts writing `<prefix>-<n>` through `service` in `namespace`.
    pub fn start(backend: Arc<Backend>, kv: Kv, namespace: &str, service: &str, prefix: &str) -> Writer {
        let stop = CancellationToken::new();
        let (namespace, service, prefix) = (namespace.to_string(), service.to_string(), prefix.to_string());
        let token = stop.clone();
        let task = tokio::spawn(async move {
            let mut report = WriterReport::default();
            let mut last_ok = Instant::now();
            let mut n: u64 = 0;
            while !token.is_cancelled() {
                let outcome = match backend.service_urls(&namespace, &service, "client").await {
                    Ok(urls) if !urls.is_empty() => {
                        let base = &urls[n as usize % urls.len()];
                        let (key, value) = (format!("{prefix}-{n:06}"), format!("value-{n}"));
                        match kv.put(base, &key, &value).await {
                            Ok(StatusCode::OK) => {
                                report.acked.insert(key, value);
                                Ok(())
                            }
                            Ok(status) => Err(status.as_u16().to_string()),
                            Err(e) => {
                                backend.reset_forwards(&namespace).await;
                                Err(if e.is_timeout() { "timeout" } else { "transport" }.to_string())
                            }
                        }
                    }
                    Ok(_) => Err("no ready endpoint".to_string()),
                    Err(e) => Err(format!("endpoints: {e:#}")),
                };
                n += 1;
                match outcome {
                    Ok(()) => {
                        report.ok += 1;
                        report.longest_gap = report.longest_gap.max(last_ok.elapsed());
                        last_ok = Instant::now();
                    }
                    Err(kind) if kind == "503" => report.unavailable += 1,
                    Err(kind) => *report.other.entry(kind).or_default() += 1,
                }
                // Pace the writer: a steady trickle shows availability without starving the
                // machine's two cores that also run every pod.
                tokio::select! {
                    () = token.cancelled() => {}
                    () = tokio::time::sleep(Duration::from_millis(20)) => {}
                }
            }
            report.longest_gap = report.longest_gap.max(last_ok.elapsed());
            report
        });
        Writer {
            stop: stop.drop_guard(),
            task,
        }
    }

    /// Stops writing; what was seen.
    pub async fn stop(self) -> anyhow::Result<WriterReport> {
        drop(self.stop);
        self.task.await.context("writer task panicked")
    }
}

/// Reads every acknowledged write back through `service`, retrying each key until a deadline
/// (a read may meet a moment without a leader); fails on the first lost or wrong value.
pub async fn verify_acked(
    backend: &Backend,
    kv: &Kv,
    namespace: &str,
    service: &str,
    acked: &BTreeMap<String, String>,
) -> anyhow::Result<()> {
    let mut wrong = BTreeSet::new();
    for (i, (key, value)) in acked.iter().enumerate() {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let urls = backend.service_urls(namespace, service, "client").await?;
            let attempt = match urls.get(i % urls.len().max(1)) {
                Some(base) => kv.get(base, key).await,
                None => Err(anyhow::anyhow!("no ready endpoint")),
            };
            match attempt {
                Ok(Some(found)) if &found == value => break,
                Ok(found) => {
                    wrong.insert(format!("{key}: expected {value:?}, read {found:?}"));
                    break;
                }
                Err(e) if Instant::now() >= deadline => return Err(e.context(format!("reading {key}"))),
                Err(_) => {
                    backend.reset_forwards(namespace).await;
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        }
    }
    if !wrong.is_empty() {
        bail!(
            "{} of {} acknowledged writes are lost or wrong: {:?}",
            wrong.len(),
            acked.len(),
            wrong
        );
    }
    Ok(())
}
