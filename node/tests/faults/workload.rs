//! Client traffic during a run: concurrent clients, each with a per-request deadline, doing
//! linearizable and stale reads, writes and compare-and-swaps on a few register keys, and
//! write-once appends whose every acknowledgement is checked after healing.

use std::sync::Arc;
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio_util::sync::CancellationToken;

use super::history::{Outcome, Recorder, Request};

/// Keys every client contends on.
pub const REGISTER_KEYS: usize = 3;
/// Prefix of the write-once keys.
pub const APPEND_PREFIX: &str = "append/";
/// Concurrent clients.
pub const CLIENTS: usize = 8;
/// Each request's client-side deadline; longer than the node's own request deadline, so a write
/// usually ends with the node's `504 unknown_outcome` rather than a client timeout.
pub const CLIENT_TIMEOUT: Duration = Duration::from_secs(4);

pub fn register_key(i: usize) -> String {
    format!("reg{i}")
}

/// Where the clients send requests: one client URL per member index (members may come and go;
/// the URL of one that left is empty).
pub type Targets = Arc<parking_lot::RwLock<Vec<String>>>;

/// A write refused before it reached Raft: nothing was proposed.
fn definitely_not_proposed(status: u16, code: &str) -> bool {
    matches!(status, 400 | 404 | 405 | 413) || (status == 503 && matches!(code, "no_leader" | "not_member"))
}

struct Answer {
    status: u16,
    body: Vec<u8>,
    etag: Option<u64>,
}

enum Reply {
    Answered(Answer),
    /// The connection was refused: the request never left this process.
    Refused(String),
    /// Sent, then lost or timed out.
    Lost(String),
}

async fn send(req: reqwest::RequestBuilder) -> Reply {
    match req.timeout(CLIENT_TIMEOUT).send().await {
        Ok(resp) => {
            let status = resp.status().as_u16();
            let etag = resp
                .headers()
                .get("etag")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.trim_matches('"').parse().ok());
            match resp.bytes().await {
                Ok(body) => Reply::Answered(Answer {
                    status,
                    body: body.to_vec(),
                    etag,
                }),
                Err(e) => Reply::Lost(format!("reading the answer: {e}")),
            }
        }
        Err(e) if e.is_connect() => Reply::Refused(e.to_string()),
        Err(e) => Reply::Lost(e.to_string()),
    }
}

fn error_code(body: &[u8]) -> String {
    serde_json::from_slice::<serde_json::Value>(body)
        .ok()
        .and_then(|v| v["error"].as_str().map(str::to_string))
        .unwrap_or_default()
}

/// One linearizable or stale read; returns the outcome.
pub async fn read(http: &reqwest::Client, base: &str, key: &str, stale: bool) -> Outcome {
    let url = format!("{base}/v1/kv/{key}{}", if stale { "?stale=true" } else { "" });
    match send(http.get(url)).await {
        Reply::Answered(a) if a.status == 200 => match std::str::from_utf8(&a.body).ok().and_then(|s| s.parse().ok()) {
            Some(v) => Outcome::Read {
                value: Some(v),
                revision: a.etag.unwrap_or(0),
            },
            None => Outcome::Fail {
                reason: format!("unparseable value {:?}", String::from_utf8_lossy(&a.body)),
            },
        },
        Reply::Answered(a) if a.status == 404 && error_code(&a.body) == "not_found" => Outcome::Read {
            value: None,
            revision: 0,
        },
        Reply::Answered(a) => Outcome::Fail {
            reason: format!("{} {}", a.status, error_code(&a.body)),
        },
        Reply::Refused(e) | Reply::Lost(e) => Outcome::Fail { reason: e },
    }
}

/// One write, conditional on `if_match` when given.
pub async fn write(http: &reqwest::Client, base: &str, key: &str, value: u64, if_match: Option<u64>) -> Outcome {
    let mut req = http.put(format!("{base}/v1/kv/{key}")).body(value.to_string());
    if let Some(rev) = if_match {
        req = req.header("if-match", format!("\"{rev}\""));
    }
    match send(req).await {
        Reply::Answered(a) if a.status == 200 => {
            let v: serde_json::Value = serde_json::from_slice(&a.body).unwrap_or_default();
            match v["revision"].as_u64() {
                Some(revision) => Outcome::Written { revision },
                None => Outcome::Unknown {
                    reason: "200 without a revision".into(),
                },
            }
        }
        Reply::Answered(a) if a.status == 412 && if_match.is_some() => {
            let v: serde_json::Value = serde_json::from_slice(&a.body).unwrap_or_default();
            Outcome::CasFailed {
                current_revision: v["current_revision"].as_u64(),
            }
        }
        Reply::Answered(a) => {
            let code = error_code(&a.body);
            let reason = format!("{} {code}", a.status);
            if definitely_not_proposed(a.status, &code) {
                Outcome::Fail { reason }
            } else {
                Outcome::Unknown { reason }
            }
        }
        Reply::Refused(reason) => Outcome::Fail { reason },
        Reply::Lost(reason) => Outcome::Unknown { reason },
    }
}

/// How the clients run: how many, how fast, on which registers.
#[derive(Clone, Default)]
pub struct Shape {
    /// Concurrent clients (`CLIENTS` when 0).
    pub clients: usize,
    /// Each client starts a request at most this often (none: back to back).
    pub interval: Option<Duration>,
    /// When set, the registers are `reg<i>@<epoch>`: a long run moves to fresh registers, so
    /// each register's history stays short enough to check (linearizability is per key).
    pub epoch: Option<Arc<std::sync::atomic::AtomicU64>>,
    /// Each client's first sequence number: two loads on one cluster write distinct values.
    pub first_seq: u64,
}

impl Shape {
    /// The register key `i` as the clients use it now.
    pub fn register_key(&self, i: usize) -> String {
        match &self.epoch {
            Some(e) => format!("{}@{}", register_key(i), e.load(std::sync::atomic::Ordering::Relaxed)),
            None => register_key(i),
        }
    }
}

/// Runs `CLIENTS` clients until `stop`; returns once every client finished its last request.
pub async fn run(targets: Targets, recorder: Recorder, stop: CancellationToken, seed: u64) {
    run_shaped(targets, recorder, stop, seed, Shape::default()).await
}

/// [`run`] with the clients, pace and registers of `shape`.
pub async fn run_shaped(targets: Targets, recorder: Recorder, stop: CancellationToken, seed: u64, shape: Shape) {
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(4)
        .build()
        .expect("an HTTP client");
    let mut clients = Vec::new();
    let count = if shape.clients == 0 { CLIENTS } else { shape.clients };
    for client in 0..count {
        let (targets, recorder, stop, http) = (targets.clone(), recorder.clone(), stop.clone(), http.clone());
        let shape = shape.clone();
        clients.push(tokio::spawn(async move {
            let mut rng = StdRng::seed_from_u64(seed ^ (client as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15));
            let mut seq = shape.first_seq;
            let mut next = tokio::time::Instant::now();
            while !stop.is_cancelled() {
                if let Some(interval) = shape.interval {
                    // Paced: a late client does not make up for lost time in a burst.
                    next = (next + interval).max(tokio::time::Instant::now());
                    tokio::select! {
                        _ = tokio::time::sleep_until(next) => {}
                        _ = stop.cancelled() => break,
                    }
                }
                // An empty URL is a member that left the cluster.
                let (member, base) = {
                    let t = targets.read();
                    let open: Vec<usize> = (0..t.len()).filter(|&i| !t[i].is_empty()).collect();
                    let member = open[rng.random_range(0..open.len())];
                    (member, t[member].clone())
                };
                seq += 1;
                // Unique per run: client in the high digits, sequence in the low ones.
                let value = (client as u64 + 1) * 1_000_000 + seq;
                let key = shape.register_key(rng.random_range(0..REGISTER_KEYS));
                let dice = rng.random_range(0..100);
                let t0 = recorder.now_ns();
                let ops_before = recorder.len();
                if dice < 35 {
                    let outcome = read(&http, &base, &key, false).await;
                    recorder.record(client, member, &key, Request::Read, t0, outcome);
                } else if dice < 45 {
                    let outcome = read(&http, &base, &key, true).await;
                    recorder.record(client, member, &key, Request::StaleRead, t0, outcome);
                } else if dice < 70 {
                    let outcome = write(&http, &base, &key, value, None).await;
                    recorder.record(client, member, &key, Request::Write { value }, t0, outcome);
                } else if dice < 88 {
                    // Compare-and-swap from what a linearizable read just saw.
                    let seen = read(&http, &base, &key, false).await;
                    recorder.record(client, member, &key, Request::Read, t0, seen.clone());
                    if let Outcome::Read {
                        value: Some(expect_value),
                        revision,
                    } = seen
                    {
                        let t1 = recorder.now_ns();
                        let outcome = write(&http, &base, &key, value, Some(revision)).await;
                        let request = Request::Cas {
                            expect_value,
                            expect_revision: revision,
                            value,
                        };
                        recorder.record(client, member, &key, request, t1, outcome);
                    }
                } else {
                    let key = format!("{APPEND_PREFIX}{value}");
                    let outcome = write(&http, &base, &key, value, None).await;
                    recorder.record(client, member, &key, Request::Write { value }, t0, outcome);
                }
                // A member that refuses at once (killed, not a member) would otherwise be hammered.
                if recorder.failed_since(client, ops_before) {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }));
    }
    for c in clients {
        let _ = c.await;
    }
}
