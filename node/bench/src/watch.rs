//! The watch load: many watchers over a set of prefixes while writers put at a fixed number of
//! connections. Measures write throughput with and without the watchers, the events delivered
//! per second, the delay from a write's acknowledgement to its event at each watcher, and the
//! servers' resident memory per open watcher.
//!
//! raftkv watchers are `GET /v1/watch?prefix=P` streams multiplexed over h2c connections (the
//! node caps HTTP/1.1 connections per listener); etcd watchers are `POST /v3/watch` streams of
//! its JSON gateway, one HTTP/1.1 connection each (the gateway is not reachable over h2c: etcd
//! sends every HTTP/2 connection to its gRPC server). Keys are `bench/{n:08}`; prefix `p` of
//! `prefixes` is `bench/` followed by the leading digits of its slice of the key space, so every
//! write matches exactly one prefix, as the report assumes when it counts expected events.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{header, Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;
use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::{new_histogram, protocol, BenchError, Connection, Latency, LoadConfig, Protocol, Result, Target};

/// A watch load.
#[derive(Debug, Clone)]
pub struct WatchConfig {
    /// The writers: `conns`, `duration`, `warmup`, `key_space`, `value_size` (the mix is puts).
    pub load: LoadConfig,
    /// Open watch streams.
    pub watchers: usize,
    /// Distinct prefixes, the watchers spread evenly over them; a power of ten dividing the key
    /// space, so that each prefix is a run of leading digits.
    pub prefixes: u64,
    /// raftkv: watch streams per h2c connection.
    pub streams_per_conn: usize,
    /// Server processes whose resident memory is read (`/proc/PID/status`).
    pub server_pids: Vec<u32>,
}

/// What a watch load measured.
#[derive(Debug, Clone, Serialize)]
pub struct WatchReport {
    /// The protocol driven.
    pub target: Target,
    /// Watchers opened.
    pub watchers: usize,
    /// Prefixes.
    pub prefixes: u64,
    /// Writer connections.
    pub conns: usize,
    /// Writes per second without any watcher.
    pub writes_per_sec_alone: f64,
    /// Writes per second with every watcher open.
    pub writes_per_sec_watched: f64,
    /// Write latency with the watchers.
    pub write_latency_watched: Latency,
    /// Events received per second by all watchers during the measured run.
    pub events_per_sec: f64,
    /// Events received, and the events the acknowledged writes should have produced.
    pub events: u64,
    /// Acknowledged writes times watchers per prefix: what `events` should reach.
    pub events_expected: u64,
    /// From a write's acknowledgement to its event at a watcher (0 when the event came first).
    pub delay: Latency,
    /// Events that reached a watcher before the writer had its acknowledgement.
    pub events_before_ack: u64,
    /// Servers' resident memory before the watchers, with them idle, in KiB.
    pub rss_kib_before: u64,
    pub rss_kib_idle_watchers: u64,
    /// Resident memory per watcher (idle, after opening), in KiB.
    pub rss_kib_per_watcher: f64,
    /// Watch streams that failed or ended early.
    pub watch_errors: u64,
    /// Write failures.
    pub write_errors: u64,
    /// CPU seconds the servers used over the write phase without watchers (warm-up included).
    pub server_cpu_alone: f64,
    /// CPU seconds the servers used over the write phase with watchers.
    pub server_cpu_watched: f64,
}

impl WatchReport {
    /// The closing note, as a few lines of text.
    pub fn table(&self) -> String {
        format!(
            "watch load on {:?}: {} watchers over {} prefixes, writers at {} connections\n\
             writes/s without watchers  {:>10.0}\n\
             writes/s with watchers     {:>10.0}   (write p50 {:.2} ms, p99 {:.2} ms)\n\
             events delivered/s         {:>10.0}   ({} of {} expected)\n\
             ack -> event delay         p50 {:.2} ms, p99 {:.2} ms, max {:.1} ms ({} events before their ack)\n\
             server memory              {:.1} MiB before, {:.1} MiB with idle watchers: {:.1} KiB per watcher\n\
             server CPU                 {:.1} s without watchers, {:.1} s with them (same phase length)\n\
             errors                     {} watch, {} write\n",
            self.target,
            self.watchers,
            self.prefixes,
            self.conns,
            self.writes_per_sec_alone,
            self.writes_per_sec_watched,
            self.write_latency_watched.p50_us as f64 / 1000.0,
            self.write_latency_watched.p99_us as f64 / 1000.0,
            self.events_per_sec,
            self.events,
            self.events_expected,
            self.delay.p50_us as f64 / 1000.0,
            self.delay.p99_us as f64 / 1000.0,
            self.delay.max_us as f64 / 1000.0,
            self.events_before_ack,
            self.rss_kib_before as f64 / 1024.0,
            self.rss_kib_idle_watchers as f64 / 1024.0,
            self.rss_kib_per_watcher,
            self.server_cpu_alone,
            self.server_cpu_watched,
            self.watch_errors,
            self.write_errors,
        )
    }
}

/// The prefix of slice `p` of the key space (`bench/` + the slice's leading digits).
pub fn prefix_of(p: u64, prefixes: u64, key_space: u64) -> String {
    let per = key_space / prefixes.max(1);
    let key = Protocol::key(p * per);
    // `bench/` + 8 digits: the leading digits that number the slice.
    let digits = 8 - per.max(1).ilog10() as usize;
    key[..6 + digits].to_string()
}

/// CPU seconds (user + system) the processes used so far, from `/proc/PID/stat`.
fn cpu_seconds(pids: &[u32]) -> f64 {
    // Clock ticks per second: 100 on every Linux configuration this runs on (USER_HZ).
    const TICKS: f64 = 100.0;
    pids.iter()
        .filter_map(|pid| std::fs::read_to_string(format!("/proc/{pid}/stat")).ok())
        .filter_map(|s| {
            // Fields after the command name (which may hold spaces) in parentheses.
            let rest = s.rsplit_once(')')?.1;
            let f: Vec<&str> = rest.split_whitespace().collect();
            Some((f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?) / TICKS)
        })
        .sum()
}

fn rss_kib(pids: &[u32]) -> u64 {
    pids.iter()
        .filter_map(|pid| std::fs::read_to_string(format!("/proc/{pid}/status")).ok())
        .filter_map(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .sum()
}

/// When each revision was acknowledged to its writer, and the key it wrote.
type Acks = Arc<std::sync::Mutex<HashMap<u64, (Instant, u64)>>>;
/// When each watcher received each revision.
type Arrivals = Arc<std::sync::Mutex<Vec<(u64, Instant)>>>;

/// Runs puts on `cfg.conns` connections for warm-up plus duration, recording every
/// acknowledged revision in `acks` (when given). Returns (writes in the measured window,
/// failures, latency histogram).
async fn write_load(cfg: &LoadConfig, acks: Option<Acks>) -> (u64, u64, hdrhistogram::Histogram<u64>) {
    let start = Instant::now();
    let record_from = start + cfg.warmup;
    let end = record_from + cfg.duration;
    let mut tasks = Vec::new();
    for c in 0..cfg.conns {
        let endpoint = cfg.endpoints[c % cfg.endpoints.len()];
        let proto = protocol(cfg, endpoint);
        let (key_space, timeout, acks) = (cfg.key_space, cfg.request_timeout, acks.clone());
        let mut rng = SmallRng::seed_from_u64(cfg.seed.wrapping_add(c as u64));
        tasks.push(tokio::spawn(async move {
            let mut hist = new_histogram();
            let mut failures = 0u64;
            let mut conn: Option<Connection> = None;
            while Instant::now() < end {
                let Some(open) = conn.as_mut() else {
                    match Connection::open(endpoint, None).await {
                        Ok(c) => conn = Some(c),
                        Err(_) => {
                            failures += 1;
                            tokio::time::sleep(Duration::from_millis(50)).await;
                        }
                    }
                    continue;
                };
                let key = rng.random_range(0..key_space);
                let req = match proto.target {
                    Target::Raftkv => proto.request(
                        Method::PUT,
                        &format!("/v1/kv/{}", Protocol::key(key)),
                        &[],
                        proto.value.clone(),
                    ),
                    Target::Etcd => proto.etcd_json(
                        "/v3/kv/put",
                        serde_json::json!({"key": Protocol::b64(Protocol::key(key).as_bytes()), "value": proto.value_b64}),
                    ),
                };
                let issued = Instant::now();
                match open.call(req, timeout).await {
                    Ok((StatusCode::OK, body, _)) => {
                        let done = Instant::now();
                        let v: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
                        let revision = match proto.target {
                            Target::Raftkv => v["revision"].as_u64(),
                            Target::Etcd => v["header"]["revision"].as_str().and_then(|r| r.parse().ok()),
                        };
                        if let (Some(acks), Some(r)) = (&acks, revision) {
                            acks.lock().expect("not poisoned").insert(r, (done, key));
                        }
                        if issued >= record_from && done <= end {
                            let _ = hist.record((done - issued).as_micros().max(1) as u64);
                        }
                    }
                    Ok(_) => failures += 1,
                    Err(_) => {
                        failures += 1;
                        conn = None;
                    }
                }
            }
            (hist, failures)
        }));
    }
    let mut all = new_histogram();
    let mut failures = 0;
    for t in tasks {
        if let Ok((h, f)) = t.await {
            all.add(&h).expect("histograms with equal bounds merge");
            failures += f;
        }
    }
    (all.len(), failures, all)
}

/// An open h2c connection to a raftkv member.
async fn h2_connection(
    addr: SocketAddr,
) -> std::result::Result<hyper::client::conn::http2::SendRequest<Full<Bytes>>, String> {
    let stream = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    stream.set_nodelay(true).map_err(|e| e.to_string())?;
    let (sender, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(sender)
}

/// Reads one watch stream until `stop`, recording the revision of every change.
async fn follow(
    body: hyper::body::Incoming,
    target: Target,
    arrivals: Arrivals,
    stop: Instant,
    opened: Arc<tokio::sync::Semaphore>,
) -> bool {
    let mut body = body;
    let mut buf = Vec::new();
    let mut announced = false;
    loop {
        let frame = match tokio::time::timeout_at(stop, body.frame()).await {
            Err(_) => return true,
            Ok(None) => return false,
            Ok(Some(Err(_))) => return false,
            Ok(Some(Ok(f))) => f,
        };
        let Ok(data) = frame.into_data() else { continue };
        let now = Instant::now();
        buf.extend_from_slice(&data);
        while let Some(end) = buf.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = buf.drain(..=end).collect();
            let v: serde_json::Value = serde_json::from_slice(&line[..end]).unwrap_or_default();
            let mut got = arrivals.lock().expect("not poisoned");
            match target {
                Target::Raftkv => match v["type"].as_str() {
                    Some("put" | "delete") => got.push((v["revision"].as_u64().unwrap_or(0), now)),
                    Some("progress") if !announced => {
                        announced = true;
                        opened.add_permits(1);
                    }
                    Some("error") => return false,
                    _ => {}
                },
                Target::Etcd => {
                    let result = &v["result"];
                    if result["created"] == true && !announced {
                        announced = true;
                        opened.add_permits(1);
                    }
                    if let Some(events) = result["events"].as_array() {
                        for e in events {
                            let r = e["kv"]["mod_revision"]
                                .as_str()
                                .and_then(|r| r.parse().ok())
                                .unwrap_or(0);
                            got.push((r, now));
                        }
                    }
                }
            }
        }
    }
}

/// Runs the watch load: writes alone, then the watchers are opened, then writes with them.
pub async fn run(cfg: &WatchConfig) -> Result<WatchReport> {
    let load = &cfg.load;
    if cfg.prefixes == 0
        || !load.key_space.is_multiple_of(cfg.prefixes)
        || !(load.key_space / cfg.prefixes)
            .to_string()
            .trim_start_matches('1')
            .chars()
            .all(|c| c == '0')
    {
        return Err(BenchError::Invalid(
            "--prefixes must divide --key-space into slices of a power of ten".into(),
        ));
    }
    let cpu_start = cpu_seconds(&cfg.server_pids);
    let (alone, _, _) = write_load(load, None).await;
    let cpu_alone = cpu_seconds(&cfg.server_pids) - cpu_start;
    let rss_before = rss_kib(&cfg.server_pids);

    // Streams end when the writers are done (`stop_tx`); this is only a backstop.
    let stop = Instant::now() + Duration::from_secs(3600);
    let opened = Arc::new(tokio::sync::Semaphore::new(0));
    let watch_errors = Arc::new(std::sync::atomic::AtomicU64::new(0));
    // Watcher `w` follows prefix `w % prefixes`: how many follow each.
    let mut per_prefix = vec![0u64; cfg.prefixes as usize];
    for w in 0..cfg.watchers {
        per_prefix[w % cfg.prefixes as usize] += 1;
    }
    let slice = load.key_space / cfg.prefixes;
    let mut logs: Vec<Arrivals> = Vec::new();
    let mut tasks = Vec::new();
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut h2: Option<hyper::client::conn::http2::SendRequest<Full<Bytes>>> = None;
    for w in 0..cfg.watchers {
        let endpoint = load.endpoints[w % load.endpoints.len()];
        let prefix = prefix_of(w as u64 % cfg.prefixes, cfg.prefixes, load.key_space);
        let arrivals: Arrivals = Default::default();
        logs.push(arrivals.clone());
        let proto = protocol(load, endpoint);
        let (opened, errors, mut stop_rx) = (opened.clone(), watch_errors.clone(), stop_rx.clone());
        let response = match load.target {
            Target::Raftkv => {
                if w % cfg.streams_per_conn.max(1) == 0 || h2.is_none() {
                    h2 = Some(h2_connection(endpoint).await.map_err(BenchError::Invalid)?);
                }
                let sender = h2.as_mut().expect("opened above");
                let req = Request::builder()
                    .method(Method::GET)
                    .uri(format!(
                        "http://{endpoint}/v1/watch?prefix={prefix}&progress_notify=true"
                    ))
                    .body(Full::new(Bytes::new()))
                    .expect("a well-formed request");
                sender.ready().await.map_err(|e| BenchError::Invalid(e.to_string()))?;
                let fut = sender.send_request(req);
                tokio::spawn(fut)
            }
            Target::Etcd => {
                let mut conn = Connection::open(endpoint, None).await.map_err(BenchError::Invalid)?;
                let end = prefix_end(prefix.as_bytes());
                let body = serde_json::json!({"create_request": {
                    "key": Protocol::b64(prefix.as_bytes()), "range_end": Protocol::b64(&end)}});
                let req = proto.request(
                    Method::POST,
                    "/v3/watch",
                    &[(header::CONTENT_TYPE, "application/json".into())],
                    Bytes::from(serde_json::to_vec(&body).expect("JSON")),
                );
                tokio::spawn(async move {
                    conn.sender.ready().await?;
                    conn.sender.send_request(req).await
                })
            }
        };
        let target = load.target;
        tasks.push(tokio::spawn(async move {
            let ok = match response.await {
                Ok(Ok(resp)) if resp.status() == StatusCode::OK => {
                    let body = resp.into_body();
                    tokio::select! {
                        ok = follow(body, target, arrivals, stop, opened) => ok,
                        _ = stop_rx.changed() => true,
                    }
                }
                _ => false,
            };
            if !ok {
                errors.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
        }));
    }
    // Every stream is open (its first line arrived) before memory is read and writes start.
    let all_open = tokio::time::timeout(Duration::from_secs(60), opened.acquire_many(cfg.watchers as u32)).await;
    if !matches!(all_open, Ok(Ok(_))) {
        return Err(BenchError::Invalid(format!(
            "only {} of {} watch streams opened",
            opened.available_permits(),
            cfg.watchers
        )));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss_idle = rss_kib(&cfg.server_pids);
    let acks: Acks = Default::default();
    let window_start = Instant::now() + load.warmup;
    let cpu_start = cpu_seconds(&cfg.server_pids);
    let (watched, write_errors, hist) = write_load(load, Some(acks.clone())).await;
    let cpu_watched = cpu_seconds(&cfg.server_pids) - cpu_start;
    let window_end = window_start + load.duration;
    // Events still in flight when the writers stop are given a moment to arrive.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let _ = stop_tx.send(true);
    for t in tasks {
        let _ = t.await;
    }
    let acks = acks.lock().expect("not poisoned");
    let mut delay = new_histogram();
    let (mut events, mut before_ack, mut in_window) = (0u64, 0u64, 0u64);
    for log in &logs {
        for &(revision, at) in log.lock().expect("not poisoned").iter() {
            events += 1;
            if at >= window_start && at <= window_end {
                in_window += 1;
            }
            if let Some(&(acked, _)) = acks.get(&revision) {
                if at < acked {
                    before_ack += 1;
                }
                let _ = delay.record(at.saturating_duration_since(acked).as_micros().max(1) as u64);
            }
        }
    }
    let seconds = load.duration.as_secs_f64();
    Ok(WatchReport {
        target: load.target,
        watchers: cfg.watchers,
        prefixes: cfg.prefixes,
        conns: load.conns,
        writes_per_sec_alone: (alone as f64 / seconds).round(),
        writes_per_sec_watched: (watched as f64 / seconds).round(),
        write_latency_watched: Latency::of(&hist),
        events_per_sec: (in_window as f64 / seconds).round(),
        events,
        events_expected: acks.values().map(|&(_, key)| per_prefix[(key / slice) as usize]).sum(),
        delay: Latency::of(&delay),
        events_before_ack: before_ack,
        rss_kib_before: rss_before,
        rss_kib_idle_watchers: rss_idle,
        rss_kib_per_watcher: ((rss_idle as f64 - rss_before as f64) / cfg.watchers.max(1) as f64 * 10.0).round() / 10.0,
        watch_errors: watch_errors.load(std::sync::atomic::Ordering::Relaxed),
        write_errors,
        server_cpu_alone: (cpu_alone * 100.0).round() / 100.0,
        server_cpu_watched: (cpu_watched * 100.0).round() / 100.0,
    })
}

/// The smallest key above every key with `prefix` (etcd's `range_end` for a prefix).
fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes_split_the_key_space_into_runs_of_leading_digits() {
        assert_eq!(prefix_of(0, 100, 100_000), "bench/00000");
        assert_eq!(prefix_of(37, 100, 100_000), "bench/00037");
        assert!(Protocol::key(37_123).starts_with(&prefix_of(37, 100, 100_000)));
        assert!(!Protocol::key(38_000).starts_with(&prefix_of(37, 100, 100_000)));
        assert_eq!(prefix_of(5, 10, 1000), "bench/000005");
        assert_eq!(prefix_end(b"bench/00037"), b"bench/00038".to_vec());
    }
}
