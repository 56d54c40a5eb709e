//! The closed-loop load generator behind `raftkv-bench`: a fixed number of keep-alive HTTP/1.1
//! connections, each with exactly one request in flight, issuing a weighted mix of operations on
//! a fixed key space for a fixed time, with every latency recorded in an HDR histogram.
//!
//! The same generator speaks two protocols, so raftkv and etcd are measured with identical
//! connection handling: raftkv's `/v1/kv` API, and etcd's v3 JSON gateway (`POST /v3/kv/put`,
//! `/v3/kv/range`, `/v3/kv/txn`, base64 keys and values). A linearizable read is the default
//! read of each system; a stale read is raftkv's `?stale=true` and etcd's `serializable: true`.
//!
//! Counting rules, the same for both targets:
//! - a request answered as the protocol defines success counts as an op; so do a read of an
//!   absent key (`not_found`) and a compare-and-swap that lost its race (`cas_conflicts`);
//! - a write whose outcome the server declared unknown (raftkv `504`), or whose connection failed
//!   or timed out after the request was sent, counts as `unknown`: it may have been applied;
//! - anything else (other statuses, failed reads, refused connections) counts as an error.
//!
//! Only completions after the warm-up are recorded; a connection that fails is reopened.
//!
//! With [`LoadConfig::tls`] every connection is TLS (rustls), presenting a client certificate
//! when the configuration has one: the handshake is part of opening a connection, not of the
//! measured requests, so the figures show what TLS costs per request on a kept-alive connection.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::str::FromStr;
use std::time::Duration;

use base64::Engine;
use bytes::Bytes;
use hdrhistogram::Histogram;
use http::{header, Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;
use tokio::net::TcpStream;
use tokio::time::Instant;

/// Result of the load generator's set-up.
pub type Result<T, E = BenchError> = std::result::Result<T, E>;

/// Why a load run could not start. Failures during the run are counted, not returned.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// An endpoint is not `http://host:port` with a numeric loopback or other IP address.
    #[error("endpoint {0:?} is not http://ip:port")]
    Endpoint(String),
    /// The `--mix` argument is malformed.
    #[error("mix {0:?}: {1}")]
    Mix(String, String),
    /// A run option is out of range.
    #[error("{0}")]
    Invalid(String),
    /// Preloading the key space failed.
    #[error("preloading key {key} failed: {reason}")]
    Preload {
        /// The key index that could not be written.
        key: u64,
        /// What went wrong.
        reason: String,
    },
}

/// Which protocol the generator speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Target {
    /// raftkv's `/v1/kv` HTTP API.
    Raftkv,
    /// etcd's v3 JSON gateway.
    Etcd,
}

/// One kind of operation in the mix.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum OpKind {
    /// Unconditional write of `value_size` bytes.
    Put,
    /// Linearizable read.
    Get,
    /// Read of the local copy of whichever member the connection reaches.
    StaleGet,
    /// Stale read of the key's revision, then a write conditional on it.
    Cas,
    /// A trivial endpoint (raftkv `/healthz`, etcd `/version`): no consensus, no storage; the
    /// loopback HTTP ceiling. etcd's `/health` is not used: it reads through Raft.
    Health,
}

impl OpKind {
    const ALL: [OpKind; 5] = [OpKind::Put, OpKind::Get, OpKind::StaleGet, OpKind::Cas, OpKind::Health];

    /// The name used in `--mix` and in reports.
    pub fn name(self) -> &'static str {
        match self {
            OpKind::Put => "put",
            OpKind::Get => "get",
            OpKind::StaleGet => "stale_get",
            OpKind::Cas => "cas",
            OpKind::Health => "health",
        }
    }

    fn is_write(self) -> bool {
        matches!(self, OpKind::Put | OpKind::Cas)
    }
}

/// Weighted operation kinds, e.g. `put=90,get=10`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mix(Vec<(OpKind, u32)>);

impl Mix {
    fn pick(&self, rng: &mut SmallRng) -> OpKind {
        let total: u32 = self.0.iter().map(|(_, w)| w).sum();
        let mut roll = rng.random_range(0..total);
        for &(kind, weight) in &self.0 {
            if roll < weight {
                return kind;
            }
            roll -= weight;
        }
        unreachable!("the roll is below the total weight")
    }

    /// Whether every operation reads or writes keys that a preload would create.
    pub fn reads_keys(&self) -> bool {
        self.0
            .iter()
            .any(|(k, _)| matches!(k, OpKind::Get | OpKind::StaleGet | OpKind::Cas))
    }
}

impl fmt::Display for Mix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let parts: Vec<String> = self.0.iter().map(|(k, w)| format!("{}={w}", k.name())).collect();
        f.write_str(&parts.join(","))
    }
}

impl FromStr for Mix {
    type Err = BenchError;

    fn from_str(s: &str) -> Result<Self> {
        let err = |m: &str| BenchError::Mix(s.to_string(), m.to_string());
        let mut out = Vec::new();
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (name, weight) = part.split_once('=').unwrap_or((part, "1"));
            let kind = OpKind::ALL
                .into_iter()
                .find(|k| k.name() == name.trim())
                .ok_or_else(|| {
                    err(&format!(
                        "unknown operation {name:?} (put, get, stale_get, cas, health)"
                    ))
                })?;
            let weight: u32 = weight
                .trim()
                .parse()
                .map_err(|_| err(&format!("weight {weight:?} is not a whole number")))?;
            if out.iter().any(|(k, _)| *k == kind) {
                return Err(err(&format!("{name} appears twice")));
            }
            if weight > 0 {
                out.push((kind, weight));
            }
        }
        if out.is_empty() {
            return Err(err("no operation has a weight above zero"));
        }
        Ok(Mix(out))
    }
}

/// One run of the generator.
#[derive(Debug, Clone)]
pub struct LoadConfig {
    /// The protocol.
    pub target: Target,
    /// Members to connect to; connection `i` goes to `endpoints[i % len]`.
    pub endpoints: Vec<SocketAddr>,
    /// Concurrent connections, each with one request in flight.
    pub conns: usize,
    /// Measured time, after the warm-up.
    pub duration: Duration,
    /// Time run but not recorded, so connections and caches settle first.
    pub warmup: Duration,
    /// Keys are `bench/{n:08}` for n below this.
    pub key_space: u64,
    /// Bytes of every written value.
    pub value_size: usize,
    /// What to issue.
    pub mix: Mix,
    /// Longest wait for one answer before the connection is given up.
    pub request_timeout: Duration,
    /// Seed of the per-connection generators, so two runs issue the same sequence.
    pub seed: u64,
    /// TLS for every connection (`https://` endpoints); `None`: plain HTTP.
    pub tls: Option<std::sync::Arc<rustls::ClientConfig>>,
}

/// Parses `http://127.0.0.1:2379` or `https://...` (or a bare `127.0.0.1:2379`) into a socket
/// address; whether connections use TLS is [`LoadConfig::tls`]'s to say.
pub fn parse_endpoint(s: &str) -> Result<SocketAddr> {
    let trimmed = s.trim().trim_end_matches('/');
    let hostport = trimmed
        .strip_prefix("http://")
        .or_else(|| trimmed.strip_prefix("https://"))
        .unwrap_or(trimmed);
    hostport.parse().map_err(|_| BenchError::Endpoint(s.to_string()))
}

/// Latency figures of a set of completions, in microseconds.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Latency {
    /// Mean.
    pub mean_us: f64,
    /// Median.
    pub p50_us: u64,
    /// 90th percentile.
    pub p90_us: u64,
    /// 99th percentile.
    pub p99_us: u64,
    /// 99.9th percentile.
    pub p999_us: u64,
    /// Slowest.
    pub max_us: u64,
}

impl Latency {
    fn of(h: &Histogram<u64>) -> Latency {
        if h.is_empty() {
            return Latency::default();
        }
        Latency {
            mean_us: (h.mean() * 10.0).round() / 10.0,
            p50_us: h.value_at_quantile(0.50),
            p90_us: h.value_at_quantile(0.90),
            p99_us: h.value_at_quantile(0.99),
            p999_us: h.value_at_quantile(0.999),
            max_us: h.max(),
        }
    }
}

/// Figures of one operation kind.
#[derive(Debug, Clone, Serialize)]
pub struct OpReport {
    /// Completed operations.
    pub ops: u64,
    /// Completed operations per second.
    pub ops_per_sec: f64,
    /// Their latency.
    pub latency: Latency,
}

/// What a run measured.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// The protocol driven.
    pub target: Target,
    /// Connections.
    pub conns: usize,
    /// The mix, as given.
    pub mix: String,
    /// Bytes per written value.
    pub value_size: usize,
    /// Keys addressed.
    pub key_space: u64,
    /// Seconds measured.
    pub seconds: f64,
    /// Completed operations.
    pub ops: u64,
    /// Completed operations per second.
    pub ops_per_sec: f64,
    /// Latency of every completed operation.
    pub latency: Latency,
    /// Requests that failed (see the module docs).
    pub errors: u64,
    /// Writes whose outcome is unknown.
    pub unknown: u64,
    /// Reads of absent keys (counted as ops).
    pub not_found: u64,
    /// Compare-and-swaps that found another revision (counted as ops).
    pub cas_conflicts: u64,
    /// Connections (re)opened during the measured time.
    pub reconnects: u64,
    /// The first few distinct error messages, for diagnosis.
    pub error_samples: Vec<String>,
    /// Figures per operation kind.
    pub per_op: BTreeMap<String, OpReport>,
}

impl Report {
    /// A fixed-width table: one line for the whole run, and one per kind when the mix has several.
    pub fn table(&self) -> String {
        let mut out = String::new();
        out.push_str(&format!(
            "{:<8} {:>5} {:<34} {:>10} {:>8} {:>8} {:>8} {:>8} {:>8} {:>7} {:>7}\n",
            "target", "conns", "op", "ops/s", "p50 ms", "p90 ms", "p99 ms", "p99.9 ms", "max ms", "errors", "unknown"
        ));
        let ms = |us: u64| format!("{:.2}", us as f64 / 1000.0);
        let line = |op: &str, ops_per_sec: f64, l: &Latency, errors: String, unknown: String| {
            format!(
                "{:<8} {:>5} {:<34} {:>10.0} {:>8} {:>8} {:>8} {:>8} {:>8} {:>7} {:>7}\n",
                format!("{:?}", self.target).to_lowercase(),
                self.conns,
                op,
                ops_per_sec,
                ms(l.p50_us),
                ms(l.p90_us),
                ms(l.p99_us),
                ms(l.p999_us),
                ms(l.max_us),
                errors,
                unknown
            )
        };
        out.push_str(&line(
            &self.mix,
            self.ops_per_sec,
            &self.latency,
            self.errors.to_string(),
            self.unknown.to_string(),
        ));
        if self.per_op.len() > 1 {
            for (name, r) in &self.per_op {
                out.push_str(&line(
                    &format!("  {name}"),
                    r.ops_per_sec,
                    &r.latency,
                    "".into(),
                    "".into(),
                ));
            }
        }
        out
    }
}

/// Figures one connection gathered; merged into the [`Report`] at the end.
struct Tally {
    hist: BTreeMap<OpKind, Histogram<u64>>,
    errors: u64,
    unknown: u64,
    not_found: u64,
    cas_conflicts: u64,
    reconnects: u64,
    error_samples: Vec<String>,
}

impl Tally {
    fn new() -> Tally {
        Tally {
            hist: BTreeMap::new(),
            errors: 0,
            unknown: 0,
            not_found: 0,
            cas_conflicts: 0,
            reconnects: 0,
            error_samples: Vec::new(),
        }
    }

    fn record(&mut self, kind: OpKind, elapsed: Duration) {
        let h = self.hist.entry(kind).or_insert_with(new_histogram);
        h.saturating_record(elapsed.as_micros().max(1) as u64);
    }

    fn error(&mut self, message: String) {
        self.errors += 1;
        if self.error_samples.len() < 5 && !self.error_samples.contains(&message) {
            self.error_samples.push(message);
        }
    }
}

fn new_histogram() -> Histogram<u64> {
    // 1 µs to 60 s at three significant digits.
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("valid histogram bounds")
}

/// How one request ended.
enum Outcome {
    Ok,
    NotFound,
    CasConflict,
    /// The server answered with something the protocol does not define as success.
    Failed(String),
    /// The server said the write may or may not have been applied.
    Unknown(String),
}

/// A failure of the connection itself; the connection is reopened.
struct ConnFailure {
    message: String,
    /// Whether a request had been sent when it failed (a write's outcome is then unknown).
    sent: bool,
}

/// Builds requests for one target and reads their answers.
struct Protocol {
    target: Target,
    host: String,
    value: Bytes,
    /// The value, base64-encoded once, for etcd's JSON bodies.
    value_b64: String,
}

impl Protocol {
    fn key(n: u64) -> String {
        format!("bench/{n:08}")
    }

    fn b64(bytes: &[u8]) -> String {
        base64::engine::general_purpose::STANDARD.encode(bytes)
    }

    fn request(
        &self,
        method: Method,
        path: &str,
        headers: &[(header::HeaderName, String)],
        body: Bytes,
    ) -> Request<Full<Bytes>> {
        let mut b = Request::builder()
            .method(method)
            .uri(path)
            .header(header::HOST, &self.host);
        for (k, v) in headers {
            b = b.header(k, v);
        }
        if !body.is_empty() {
            b = b.header(header::CONTENT_LENGTH, body.len());
        }
        b.body(Full::new(body)).expect("a well-formed request")
    }

    fn etcd_json(&self, path: &str, body: serde_json::Value) -> Request<Full<Bytes>> {
        let body = Bytes::from(serde_json::to_vec(&body).expect("JSON"));
        self.request(
            Method::POST,
            path,
            &[(header::CONTENT_TYPE, "application/json".into())],
            body,
        )
    }
}

/// One keep-alive connection with at most one request in flight.
struct Connection {
    sender: SendRequest<Full<Bytes>>,
}

impl Connection {
    async fn open(
        addr: SocketAddr,
        tls: Option<&std::sync::Arc<rustls::ClientConfig>>,
    ) -> std::result::Result<Connection, String> {
        let stream = TcpStream::connect(addr)
            .await
            .map_err(|e| format!("connect {addr}: {e}"))?;
        stream.set_nodelay(true).map_err(|e| format!("nodelay: {e}"))?;
        let sender = match tls {
            None => Self::handshake(TokioIo::new(stream), addr).await?,
            Some(config) => {
                let name = rustls::pki_types::ServerName::IpAddress(addr.ip().into());
                let stream = tokio_rustls::TlsConnector::from(config.clone())
                    .connect(name, stream)
                    .await
                    .map_err(|e| format!("TLS handshake with {addr}: {e}"))?;
                Self::handshake(TokioIo::new(stream), addr).await?
            }
        };
        Ok(Connection { sender })
    }

    async fn handshake<IO>(io: IO, addr: SocketAddr) -> std::result::Result<SendRequest<Full<Bytes>>, String>
    where
        IO: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    {
        let (sender, conn) = hyper::client::conn::http1::handshake(io)
            .await
            .map_err(|e| format!("handshake with {addr}: {e}"))?;
        // The connection task ends when `sender` is dropped or the peer closes.
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(sender)
    }

    async fn call(
        &mut self,
        req: Request<Full<Bytes>>,
        timeout: Duration,
    ) -> Result<(StatusCode, Bytes, Option<String>), ConnFailure> {
        let exchange = async {
            self.sender.ready().await.map_err(|e| ConnFailure {
                message: format!("connection not ready: {e}"),
                sent: false,
            })?;
            let resp = self.sender.send_request(req).await.map_err(|e| ConnFailure {
                message: format!("request failed: {e}"),
                sent: true,
            })?;
            let status = resp.status();
            let etag = resp
                .headers()
                .get(header::ETAG)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string);
            let body = resp.into_body().collect().await.map_err(|e| ConnFailure {
                message: format!("reading the answer failed: {e}"),
                sent: true,
            })?;
            Ok((status, body.to_bytes(), etag))
        };
        tokio::time::timeout(timeout, exchange).await.unwrap_or_else(|_| {
            Err(ConnFailure {
                message: format!("no answer within {timeout:?}"),
                sent: true,
            })
        })
    }
}

fn describe(status: StatusCode, body: &[u8]) -> String {
    let text = String::from_utf8_lossy(&body[..body.len().min(160)]);
    format!("{status}: {text}")
}

impl Protocol {
    /// Issues one operation on `key`; a multi-request operation (cas) is one op.
    async fn execute(
        &self,
        conn: &mut Connection,
        kind: OpKind,
        key: u64,
        timeout: Duration,
    ) -> Result<Outcome, ConnFailure> {
        match self.target {
            Target::Raftkv => self.execute_raftkv(conn, kind, key, timeout).await,
            Target::Etcd => self.execute_etcd(conn, kind, key, timeout).await,
        }
    }

    async fn execute_raftkv(
        &self,
        conn: &mut Connection,
        kind: OpKind,
        key: u64,
        timeout: Duration,
    ) -> Result<Outcome, ConnFailure> {
        let path = format!("/v1/kv/{}", Self::key(key));
        let put_outcome = |status: StatusCode, body: &[u8]| match status {
            StatusCode::OK => Outcome::Ok,
            StatusCode::PRECONDITION_FAILED => Outcome::CasConflict,
            StatusCode::GATEWAY_TIMEOUT => Outcome::Unknown(describe(status, body)),
            _ => Outcome::Failed(describe(status, body)),
        };
        let read_outcome = |status: StatusCode, body: &[u8]| match status {
            StatusCode::OK => Outcome::Ok,
            StatusCode::NOT_FOUND => Outcome::NotFound,
            _ => Outcome::Failed(describe(status, body)),
        };
        match kind {
            OpKind::Put => {
                let (status, body, _) = conn
                    .call(self.request(Method::PUT, &path, &[], self.value.clone()), timeout)
                    .await?;
                Ok(put_outcome(status, &body))
            }
            OpKind::Get | OpKind::StaleGet => {
                let path = if kind == OpKind::StaleGet {
                    format!("{path}?stale=true")
                } else {
                    path
                };
                let (status, body, _) = conn
                    .call(self.request(Method::GET, &path, &[], Bytes::new()), timeout)
                    .await?;
                Ok(read_outcome(status, &body))
            }
            OpKind::Cas => {
                let stale = format!("{path}?stale=true");
                let (status, body, etag) = conn
                    .call(self.request(Method::GET, &stale, &[], Bytes::new()), timeout)
                    .await?;
                let condition = match (status, etag) {
                    (StatusCode::OK, Some(etag)) => (header::IF_MATCH, etag),
                    (StatusCode::NOT_FOUND, _) => (header::IF_NONE_MATCH, "*".to_string()),
                    _ => return Ok(Outcome::Failed(describe(status, &body))),
                };
                let (status, body, _) = conn
                    .call(
                        self.request(Method::PUT, &path, &[condition], self.value.clone()),
                        timeout,
                    )
                    .await?;
                Ok(put_outcome(status, &body))
            }
            OpKind::Health => {
                let (status, body, _) = conn
                    .call(self.request(Method::GET, "/healthz", &[], Bytes::new()), timeout)
                    .await?;
                Ok(read_outcome(status, &body))
            }
        }
    }

    async fn execute_etcd(
        &self,
        conn: &mut Connection,
        kind: OpKind,
        key: u64,
        timeout: Duration,
    ) -> Result<Outcome, ConnFailure> {
        let key_b64 = Self::b64(Self::key(key).as_bytes());
        let parse = |body: &[u8]| serde_json::from_slice::<serde_json::Value>(body).unwrap_or_default();
        match kind {
            OpKind::Put => {
                let req = self.etcd_json(
                    "/v3/kv/put",
                    serde_json::json!({"key": key_b64, "value": self.value_b64}),
                );
                let (status, body, _) = conn.call(req, timeout).await?;
                Ok(match status {
                    StatusCode::OK => Outcome::Ok,
                    _ => Outcome::Failed(describe(status, &body)),
                })
            }
            OpKind::Get | OpKind::StaleGet => {
                let mut range = serde_json::json!({"key": key_b64});
                if kind == OpKind::StaleGet {
                    range["serializable"] = true.into();
                }
                let (status, body, _) = conn.call(self.etcd_json("/v3/kv/range", range), timeout).await?;
                if status != StatusCode::OK {
                    return Ok(Outcome::Failed(describe(status, &body)));
                }
                // The gateway omits empty fields: no `kvs` means the key is absent.
                Ok(if parse(&body).get("kvs").is_some() {
                    Outcome::Ok
                } else {
                    Outcome::NotFound
                })
            }
            OpKind::Cas => {
                let range = serde_json::json!({"key": key_b64, "serializable": true});
                let (status, body, _) = conn.call(self.etcd_json("/v3/kv/range", range), timeout).await?;
                if status != StatusCode::OK {
                    return Ok(Outcome::Failed(describe(status, &body)));
                }
                // int64 fields are JSON strings in the gateway; an absent key has mod revision 0.
                let revision = parse(&body)["kvs"][0]["mod_revision"]
                    .as_str()
                    .unwrap_or("0")
                    .to_string();
                let txn = serde_json::json!({
                    "compare": [{"key": key_b64, "target": "MOD", "result": "EQUAL", "mod_revision": revision}],
                    "success": [{"request_put": {"key": key_b64, "value": self.value_b64}}],
                });
                let (status, body, _) = conn.call(self.etcd_json("/v3/kv/txn", txn), timeout).await?;
                if status != StatusCode::OK {
                    return Ok(Outcome::Failed(describe(status, &body)));
                }
                Ok(if parse(&body)["succeeded"] == true {
                    Outcome::Ok
                } else {
                    Outcome::CasConflict
                })
            }
            OpKind::Health => {
                let (status, body, _) = conn
                    .call(self.request(Method::GET, "/version", &[], Bytes::new()), timeout)
                    .await?;
                Ok(match status {
                    StatusCode::OK => Outcome::Ok,
                    _ => Outcome::Failed(describe(status, &body)),
                })
            }
        }
    }
}

fn protocol(cfg: &LoadConfig, endpoint: SocketAddr) -> Protocol {
    let value = Bytes::from(vec![b'v'; cfg.value_size]);
    Protocol {
        target: cfg.target,
        host: endpoint.to_string(),
        value_b64: Protocol::b64(&value),
        value,
    }
}

fn validate(cfg: &LoadConfig) -> Result<()> {
    if cfg.endpoints.is_empty() {
        return Err(BenchError::Invalid("at least one endpoint is needed".into()));
    }
    if cfg.conns == 0 || cfg.key_space == 0 {
        return Err(BenchError::Invalid("--conns and --key-space must be at least 1".into()));
    }
    Ok(())
}

/// Writes every key of the key space once (so reads find them), spread over the connections.
/// Returns how long it took.
pub async fn preload(cfg: &LoadConfig) -> Result<Duration> {
    validate(cfg)?;
    let started = Instant::now();
    let conns = cfg.conns.min(cfg.key_space as usize);
    let mut tasks = Vec::new();
    for c in 0..conns {
        let endpoint = cfg.endpoints[c % cfg.endpoints.len()];
        let proto = protocol(cfg, endpoint);
        let (key_space, timeout, tls) = (cfg.key_space, cfg.request_timeout, cfg.tls.clone());
        tasks.push(tokio::spawn(async move {
            let mut conn: Option<Connection> = None;
            let mut key = c as u64;
            let mut attempts = 0;
            while key < key_space {
                let result = match conn.as_mut() {
                    Some(open) => proto.execute(open, OpKind::Put, key, timeout).await,
                    None => match Connection::open(endpoint, tls.as_ref()).await {
                        Ok(open) => {
                            conn = Some(open);
                            continue;
                        }
                        Err(message) => Err(ConnFailure { message, sent: false }),
                    },
                };
                // A put is idempotent, so anything but success is retried a few times.
                let failure = match result {
                    Ok(Outcome::Ok) => {
                        key += conns as u64;
                        attempts = 0;
                        continue;
                    }
                    Ok(Outcome::Failed(m) | Outcome::Unknown(m)) => m,
                    Ok(_) => "unexpected answer to a put".to_string(),
                    Err(f) => {
                        conn = None;
                        f.message
                    }
                };
                attempts += 1;
                if attempts > 20 {
                    return Err(BenchError::Preload { key, reason: failure });
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Ok(())
        }));
    }
    for t in tasks {
        t.await
            .map_err(|e| BenchError::Invalid(format!("preload task: {e}")))??;
    }
    Ok(started.elapsed())
}

/// Runs the load and reports what it measured.
pub async fn run(cfg: &LoadConfig) -> Result<Report> {
    validate(cfg)?;
    let start = Instant::now();
    let record_from = start + cfg.warmup;
    let end = record_from + cfg.duration;
    let mut tasks = Vec::new();
    for c in 0..cfg.conns {
        let endpoint = cfg.endpoints[c % cfg.endpoints.len()];
        let proto = protocol(cfg, endpoint);
        let (mix, key_space, timeout) = (cfg.mix.clone(), cfg.key_space, cfg.request_timeout);
        let tls = cfg.tls.clone();
        let mut rng = SmallRng::seed_from_u64(cfg.seed.wrapping_add(c as u64));
        tasks.push(tokio::spawn(async move {
            let mut tally = Tally::new();
            let mut conn: Option<Connection> = None;
            while Instant::now() < end {
                let Some(open) = conn.as_mut() else {
                    match Connection::open(endpoint, tls.as_ref()).await {
                        Ok(open) => {
                            if Instant::now() >= record_from {
                                tally.reconnects += 1;
                            }
                            conn = Some(open);
                        }
                        Err(message) => {
                            if Instant::now() >= record_from {
                                tally.error(message);
                            }
                            tokio::time::sleep(Duration::from_millis(50)).await;
                        }
                    }
                    continue;
                };
                let kind = mix.pick(&mut rng);
                let key = rng.random_range(0..key_space);
                let issued = Instant::now();
                let result = proto.execute(open, kind, key, timeout).await;
                let done = Instant::now();
                let recorded = issued >= record_from && done <= end;
                match result {
                    Ok(outcome) if recorded => match outcome {
                        Outcome::Ok => tally.record(kind, done - issued),
                        Outcome::NotFound => {
                            tally.not_found += 1;
                            tally.record(kind, done - issued);
                        }
                        Outcome::CasConflict => {
                            tally.cas_conflicts += 1;
                            tally.record(kind, done - issued);
                        }
                        Outcome::Failed(m) => tally.error(m),
                        Outcome::Unknown(m) => {
                            tally.unknown += 1;
                            if tally.error_samples.len() < 5 {
                                tally.error_samples.push(m);
                            }
                        }
                    },
                    Ok(_) => {}
                    Err(failure) => {
                        conn = None;
                        if recorded {
                            if failure.sent && kind.is_write() {
                                tally.unknown += 1;
                            } else {
                                tally.error(failure.message);
                            }
                        }
                    }
                }
            }
            tally
        }));
    }
    let mut total = Tally::new();
    for t in tasks {
        let tally = t.await.map_err(|e| BenchError::Invalid(format!("load task: {e}")))?;
        for (kind, h) in tally.hist {
            total
                .hist
                .entry(kind)
                .or_insert_with(new_histogram)
                .add(&h)
                .expect("histograms with equal bounds merge");
        }
        total.errors += tally.errors;
        total.unknown += tally.unknown;
        total.not_found += tally.not_found;
        total.cas_conflicts += tally.cas_conflicts;
        total.reconnects += tally.reconnects;
        for m in tally.error_samples {
            if total.error_samples.len() < 5 && !total.error_samples.contains(&m) {
                total.error_samples.push(m);
            }
        }
    }
    let seconds = cfg.duration.as_secs_f64();
    let mut all = new_histogram();
    let mut per_op = BTreeMap::new();
    for (kind, h) in &total.hist {
        all.add(h).expect("histograms with equal bounds merge");
        per_op.insert(
            kind.name().to_string(),
            OpReport {
                ops: h.len(),
                ops_per_sec: h.len() as f64 / seconds,
                latency: Latency::of(h),
            },
        );
    }
    Ok(Report {
        target: cfg.target,
        conns: cfg.conns,
        mix: cfg.mix.to_string(),
        value_size: cfg.value_size,
        key_space: cfg.key_space,
        seconds,
        ops: all.len(),
        ops_per_sec: (all.len() as f64 / seconds * 10.0).round() / 10.0,
        latency: Latency::of(&all),
        errors: total.errors,
        unknown: total.unknown,
        not_found: total.not_found,
        cas_conflicts: total.cas_conflicts,
        reconnects: total.reconnects,
        error_samples: total.error_samples,
        per_op,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mix_parses_weights_and_rejects_nonsense() {
        let mix: Mix = "put=90, get=10".parse().unwrap();
        assert_eq!(mix.to_string(), "put=90,get=10");
        assert!(mix.reads_keys());
        let mix: Mix = "put".parse().unwrap();
        assert_eq!(mix, Mix(vec![(OpKind::Put, 1)]));
        assert!(!mix.reads_keys());
        assert_eq!("stale_get=1,cas=0".parse::<Mix>().unwrap().to_string(), "stale_get=1");
        for bad in ["", "put=0", "write=1", "put=x", "put=1,put=2"] {
            assert!(bad.parse::<Mix>().is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn mix_picks_in_proportion_to_weights() {
        let mix: Mix = "put=3,get=1".parse().unwrap();
        let mut rng = SmallRng::seed_from_u64(7);
        let puts = (0..10_000).filter(|_| mix.pick(&mut rng) == OpKind::Put).count();
        assert!((7_000..8_000).contains(&puts), "{puts} puts of 10000");
    }

    #[test]
    fn endpoints_parse_with_or_without_scheme() {
        assert_eq!(
            parse_endpoint("http://127.0.0.1:2379/").unwrap(),
            "127.0.0.1:2379".parse().unwrap()
        );
        assert_eq!(parse_endpoint("127.0.0.1:8081").unwrap().port(), 8081);
        assert!(parse_endpoint("http://localhost").is_err());
    }
}
