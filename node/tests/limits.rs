//! Bad clients against live members, each limit with a well-behaved client beside it: an
//! oversized write read back as `413` by clients that send their whole body first (Python's
//! `http.client`, `reqwest`, curl without `Expect`), ten thousand idle connections, the
//! connection cap, five hundred slow-loris connections, waiting reads and listings over their
//! bounds, and a flood of 1 MiB writes beyond what the disk takes. Each prints the
//! well-behaved client's p99 and errors and the member's resident memory before, at peak and
//! after, and asserts them bounded.

mod support;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use support::Cluster;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

fn vm_rss_kib(pid: i32) -> u64 {
    support::vm_rss_kib(pid).unwrap_or(0)
}

/// Samples the resident memory of `pids` (summed) every 100 ms until `stop`; returns the peak.
fn sample_peak_rss(pids: Vec<i32>, stop: Arc<AtomicBool>) -> tokio::task::JoinHandle<u64> {
    tokio::spawn(async move {
        let mut peak = 0;
        while !stop.load(Ordering::Relaxed) {
            peak = peak.max(pids.iter().map(|p| vm_rss_kib(*p)).sum());
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        peak
    })
}

/// Raises this test process's open-file limit to its hard limit (ten thousand connections
/// need as many descriptors) and returns it.
fn raise_fd_limit() -> u64 {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
    setrlimit(Resource::RLIMIT_NOFILE, hard, hard).unwrap();
    hard
}

/// What a well-behaved client saw.
#[derive(Debug, Default)]
struct Behaved {
    latencies: Vec<Duration>,
    errors: Vec<String>,
}

impl Behaved {
    fn p99(&self) -> Duration {
        let mut l = self.latencies.clone();
        l.sort();
        l.get((l.len() * 99 / 100).min(l.len().saturating_sub(1)))
            .copied()
            .unwrap_or_default()
    }

    fn report(&self, what: &str) {
        let mut l = self.latencies.clone();
        l.sort();
        println!(
            "{what}: well-behaved client: {} requests, p50 {:.1} ms, p99 {:.1} ms, {} errors {:?}",
            self.latencies.len(),
            l.get(l.len() / 2).copied().unwrap_or_default().as_secs_f64() * 1000.0,
            self.p99().as_secs_f64() * 1000.0,
            self.errors.len(),
            self.errors.iter().take(5).collect::<Vec<_>>()
        );
    }

    /// No errors, enough requests to judge, and a p99 under `p99` (generous: the machine is
    /// small and shared).
    fn assert_fine(&self, what: &str, p99: Duration, at_least: usize) {
        assert!(
            self.errors.is_empty(),
            "{what}: the well-behaved client saw errors: {:?}",
            self.errors
        );
        assert!(
            self.latencies.len() >= at_least,
            "{what}: only {} requests",
            self.latencies.len()
        );
        assert!(self.p99() < p99, "{what}: p99 {:?} over {p99:?}", self.p99());
    }
}

/// A well-behaved client until `stop`: alternately a small write and a linearizable read of
/// it, on one keep-alive connection, or on a new connection for each request when `fresh`.
fn well_behaved(url: String, stop: Arc<AtomicBool>, fresh: bool) -> tokio::task::JoinHandle<Behaved> {
    tokio::spawn(async move {
        let client = || {
            reqwest::Client::builder()
                .timeout(Duration::from_secs(30))
                .pool_max_idle_per_host(if fresh { 0 } else { 1 })
                .build()
                .unwrap()
        };
        let mut http = client();
        let mut seen = Behaved::default();
        let mut i = 0u64;
        while !stop.load(Ordering::Relaxed) {
            if fresh {
                http = client();
            }
            let key = format!("{url}/v1/kv/behaved-{}", (i / 2) % 50);
            let started = Instant::now();
            let result = if i.is_multiple_of(2) {
                http.put(&key).body(format!("v{i}")).send().await
            } else {
                http.get(&key).send().await
            };
            match result {
                Ok(r) if r.status().is_success() => {
                    let _ = r.bytes().await;
                    seen.latencies.push(started.elapsed());
                }
                Ok(r) => {
                    let status = r.status();
                    seen.errors
                        .push(format!("{status}: {}", r.text().await.unwrap_or_default()));
                }
                Err(e) => seen.errors.push(format!("{e:?}")),
            }
            i += 1;
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        seen
    })
}

/// One figure from the member's `/metrics` (the sum over series whose line starts with `prefix`).
async fn metric(c: &Cluster, i: usize, prefix: &str) -> f64 {
    let text = c.get(i, "/metrics").await.map(|r| r.text()).unwrap_or_default();
    text.lines()
        .filter(|l| l.starts_with(prefix))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Waits until the sum of the metric lines starting with `prefix` reaches `at_least`: a member
/// counts a closed connection after its socket is shut, so a client may see the close first.
async fn wait_metric(c: &Cluster, i: usize, prefix: &str, at_least: f64) {
    support::wait_until(&format!("{prefix} to reach {at_least}"), support::DEADLINE, || async {
        (metric(c, i, prefix).await >= at_least).then_some(())
    })
    .await
    .unwrap();
}

/// Python's `http.client` sends the whole body before it reads anything; prints the status
/// line, then the body.
const PYTHON_PUT: &str = r#"
import http.client, sys
host, port = sys.argv[1].rsplit(":", 1)
c = http.client.HTTPConnection(host, int(port), timeout=30)
c.request("PUT", sys.argv[2], body=b"x" * int(sys.argv[3]))
r = c.getresponse()
print(r.status)
print(r.read().decode())
"#;

fn python_put(addr: &str, path: &str, bytes: usize) -> (u16, String) {
    let out = std::process::Command::new("python3")
        .args(["-c", PYTHON_PUT, addr, path, &bytes.to_string()])
        .output()
        .expect("python3 runs");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "python3 failed: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (status, body) = stdout.split_once('\n').unwrap_or((&stdout, ""));
    (status.trim().parse().unwrap_or(0), body.trim().to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_write_is_read_as_413_by_clients_that_send_the_whole_body_first() {
    let mut c = Cluster::start(1, &[]).await.unwrap();
    c.wait_healthy().await.unwrap();
    let addr = c.members[0].client_addr.clone();
    let two_mib = 2 << 20;

    // On loopback a 2 MiB body mostly fits the socket buffers, so a closed connection loses
    // the answer only sometimes; at 12 MiB it always would without the lingering close.
    for (round, size) in [two_mib, two_mib, two_mib, 12 << 20, 12 << 20, 12 << 20]
        .into_iter()
        .enumerate()
    {
        let (status, body) = python_put(&addr, &format!("/v1/kv/big{round}"), size);
        assert_eq!(status, 413, "round {round}: {body}");
        let body: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(body["error"], raftkv_api::codes::TOO_LARGE);
    }
    // Refused for another reason before the body is read: the answer is readable too.
    let (status, body) = python_put(&addr, "/v1/kv/bad%zz", two_mib);
    assert_eq!(status, 400, "{body}");
    assert!(body.contains(raftkv_api::codes::INVALID_KEY), "{body}");
    // A value at the limit is accepted.
    let (status, body) = python_put(&addr, "/v1/kv/at-limit", 1 << 20);
    assert_eq!(status, 200, "{body}");

    // reqwest sends no `Expect: 100-continue`: it writes the body as the member answers.
    let http = reqwest::Client::new();
    for (round, size) in [two_mib, 12 << 20, 12 << 20].into_iter().enumerate() {
        let r = http
            .put(format!("http://{addr}/v1/kv/big-reqwest{round}"))
            .body(vec![b'y'; size])
            .send()
            .await
            .expect("reqwest reads the refusal instead of a reset");
        assert_eq!(r.status(), 413);
        let body: serde_json::Value = r.json().await.unwrap();
        assert_eq!(body["error"], raftkv_api::codes::TOO_LARGE);
    }

    // curl, with and without waiting for `100 Continue`.
    if std::process::Command::new("curl").arg("--version").output().is_ok() {
        let file = c.root.path().join("two-mib");
        std::fs::write(&file, vec![b'z'; 12 << 20]).unwrap();
        for expect in ["Expect: 100-continue", "Expect:"] {
            let out = std::process::Command::new("curl")
                .args(["-sS", "-X", "PUT", "-H", expect, "--data-binary"])
                .arg(format!("@{}", file.display()))
                .args(["-w", "\n%{http_code}", &format!("http://{addr}/v1/kv/big-curl")])
                .output()
                .unwrap();
            let stdout = String::from_utf8_lossy(&out.stdout);
            assert!(
                out.status.success(),
                "curl ({expect}): {stdout}{}",
                String::from_utf8_lossy(&out.stderr)
            );
            assert!(stdout.trim_end().ends_with("413"), "curl ({expect}): {stdout}");
            assert!(
                stdout.contains(raftkv_api::codes::TOO_LARGE),
                "curl ({expect}): {stdout}"
            );
        }
    }
    let r = c.get(0, "/v1/kv/big0").await.unwrap();
    assert_eq!(r.status, 404, "a refused write changed nothing");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_head_over_the_limit_is_answered_431() {
    let mut c = Cluster::start(1, &["--max-header-bytes", "16384"]).await.unwrap();
    c.wait_healthy().await.unwrap();
    let addr = c.members[0].client_addr.clone();
    for (size, expected) in [(4 << 10, 404), (32 << 10, 431), (1 << 20, 431)] {
        let mut s = TcpStream::connect(&addr).await.unwrap();
        let head = format!(
            "GET /v1/kv/absent HTTP/1.1\r\nhost: x\r\nconnection: close\r\nx-big: {}\r\n\r\n",
            "a".repeat(size)
        );
        let _ = s.write_all(head.as_bytes()).await;
        let mut out = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(20), s.read_to_end(&mut out)).await;
        let text = String::from_utf8_lossy(&out);
        assert!(
            text.starts_with(&format!("HTTP/1.1 {expected}")),
            "a {size}-byte header: {}",
            text.chars().take(200).collect::<String>()
        );
    }
    wait_metric(
        &c,
        0,
        "raftkv_http_connections_closed_total{server=\"client\",reason=\"header_too_large\"}",
        2.0,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_idle_connections_neither_lock_out_nor_slow_down_a_well_behaved_client() {
    let fds = raise_fd_limit();
    assert!(
        fds > 10_500,
        "this test needs more than 10,500 open files, the hard limit is {fds}"
    );
    // The idle connections stay until the test closes them; the cap is the default.
    let mut c = Cluster::start(1, &["--header-timeout-ms", "120000"]).await.unwrap();
    c.wait_healthy().await.unwrap();
    let addr = c.members[0].client_addr.clone();
    let url = c.members[0].url();
    let pid = c.members[0].pid().unwrap();
    let rss_before = vm_rss_kib(pid);
    let stop_rss = Arc::new(AtomicBool::new(false));
    let peak = sample_peak_rss(vec![pid], stop_rss.clone());

    let started = Instant::now();
    let mut idle = Vec::with_capacity(10_000);
    while idle.len() < 10_000 {
        idle.push(TcpStream::connect(&addr).await.expect("connect"));
    }
    support::wait_until("the member to hold 10,000 connections", support::DEADLINE, || async {
        (metric(&c, 0, "raftkv_http_connections{server=\"client\"}").await >= 10_000.0).then_some(())
    })
    .await
    .unwrap();
    println!("10,000 idle connections open in {:?}", started.elapsed());

    // At the cap: a keep-alive client and one that opens a connection per request, each
    // making room by closing the idlest connection.
    let stop = Arc::new(AtomicBool::new(false));
    let kept = well_behaved(url.clone(), stop.clone(), false);
    let fresh = well_behaved(url.clone(), stop.clone(), true);
    tokio::time::sleep(Duration::from_secs(6)).await;
    stop.store(true, Ordering::Relaxed);
    let (kept, fresh) = (kept.await.unwrap(), fresh.await.unwrap());
    kept.report("10,000 idle connections, keep-alive");
    fresh.report("10,000 idle connections, a connection per request");
    let evicted = metric(
        &c,
        0,
        "raftkv_http_connections_closed_total{server=\"client\",reason=\"evicted_idle\"}",
    )
    .await;
    println!("idle connections evicted to make room: {evicted}");
    // A fresh connection evicts one only while the table is full: once it closes, the next
    // one finds its slot free.
    assert!(evicted >= 1.0, "no idle connection made room");

    drop(idle);
    support::wait_until("the idle connections to be gone", support::DEADLINE, || async {
        (metric(&c, 0, "raftkv_http_connections{server=\"client\"}").await < 10.0).then_some(())
    })
    .await
    .unwrap();
    stop_rss.store(true, Ordering::Relaxed);
    let peak = peak.await.unwrap();
    let rss_after = vm_rss_kib(pid);
    println!("member VmRSS: before {rss_before} KiB, peak {peak} KiB, after {rss_after} KiB");
    kept.assert_fine("keep-alive", Duration::from_secs(1), 20);
    fresh.assert_fine("a connection per request", Duration::from_secs(1), 20);
    assert!(
        peak < rss_before + 400 * 1024,
        "10,000 idle connections cost {} KiB",
        peak - rss_before
    );
    assert!(rss_after < rss_before + 300 * 1024, "VmRSS after: {rss_after} KiB");
    assert!(c.members[0].is_running());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_h2_connection_is_told_the_stream_limit_and_its_extra_requests_wait_their_turn() {
    let mut c = Cluster::start(1, &["--h2-max-streams", "8"]).await.unwrap();
    c.wait_healthy().await.unwrap();
    let addr = c.members[0].client_addr.clone();
    let tcp = TcpStream::connect(&addr).await.unwrap();
    let (client, mut conn) = h2::client::handshake(tcp).await.unwrap();
    // One request first, so that the member's settings have arrived (streams opened before
    // they do are refused with REFUSED_STREAM beyond the limit, which clients retry).
    let first = async {
        let mut client = client.clone().ready().await.unwrap();
        let req = http::Request::get(format!("http://{addr}/healthz")).body(()).unwrap();
        client.send_request(req, true).unwrap().0.await.unwrap().status()
    };
    let status = tokio::select! {
        s = first => s,
        r = &mut conn => panic!("the connection ended first: {r:?}"),
    };
    assert_eq!(status, 200);
    assert_eq!(conn.max_concurrent_send_streams(), 8);
    // Then 32 requests at once on the connection: the client keeps at most 8 open, as told.
    let requests = async {
        let mut answers = Vec::new();
        for _ in 0..32 {
            let mut client = client.clone().ready().await.unwrap();
            let req = http::Request::get(format!("http://{addr}/healthz")).body(()).unwrap();
            let (answer, _) = client.send_request(req, true).unwrap();
            answers.push(answer);
        }
        let mut ok = 0;
        for a in answers {
            if a.await.unwrap().status() == 200 {
                ok += 1;
            }
        }
        ok
    };
    let ok = tokio::select! {
        ok = requests => ok,
        r = &mut conn => panic!("the connection ended first: {r:?}"),
    };
    assert_eq!(ok, 32);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_idle_past_their_bounds_are_closed() {
    let mut c = Cluster::start(1, &["--idle-timeout-ms", "1000", "--header-timeout-ms", "2000"])
        .await
        .unwrap();
    c.wait_healthy().await.unwrap();
    let addr = c.members[0].client_addr.clone();

    // An h2 connection that served a request and then stays silent: closed after the idle
    // timeout (hyper's own bound covers only HTTP/1.1 heads).
    let (client, mut conn) = h2::client::handshake(TcpStream::connect(&addr).await.unwrap())
        .await
        .unwrap();
    let request = async {
        let mut client = client.clone().ready().await.unwrap();
        let req = http::Request::get(format!("http://{addr}/healthz")).body(()).unwrap();
        client.send_request(req, true).unwrap().0.await.unwrap().status()
    };
    let status = tokio::select! {
        s = request => s,
        r = &mut conn => panic!("the connection ended first: {r:?}"),
    };
    assert_eq!(status, 200);
    let served = Instant::now();
    tokio::time::timeout(Duration::from_secs(20), &mut conn)
        .await
        .expect("the idle h2 connection was closed")
        .expect("closed cleanly, with GOAWAY");
    let idle_for = served.elapsed();
    println!("an idle h2 connection was closed after {idle_for:?}");
    assert!(idle_for >= Duration::from_millis(900), "closed too early: {idle_for:?}");

    // A connection that never sends a byte: closed after the header timeout, HTTP/1.1 or h2
    // alike (which one it speaks is not known yet).
    let mut silent = TcpStream::connect(&addr).await.unwrap();
    let opened = Instant::now();
    let mut buf = [0u8; 64];
    let n = tokio::time::timeout(Duration::from_secs(20), silent.read(&mut buf))
        .await
        .expect("the silent connection was closed");
    assert!(
        matches!(n, Ok(0) | Err(_)),
        "nothing is answered to a connection that asked nothing"
    );
    println!("a silent connection was closed after {:?}", opened.elapsed());
    assert!(opened.elapsed() >= Duration::from_millis(1900));
    wait_metric(
        &c,
        0,
        "raftkv_http_connections_closed_total{server=\"client\",reason=\"idle_timeout\"}",
        1.0,
    )
    .await;
    wait_metric(
        &c,
        0,
        "raftkv_http_connections_closed_total{server=\"client\",reason=\"header_timeout\"}",
        1.0,
    )
    .await;
}

/// Opens a connection that starts a PUT and then trickles its body: a request in flight.
async fn busy_connection(addr: &str) -> TcpStream {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(b"PUT /v1/kv/slow HTTP/1.1\r\nhost: x\r\ncontent-length: 100\r\n\r\nx")
        .await
        .unwrap();
    s
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_the_connection_cap_idle_connections_make_room_and_busy_ones_get_503_with_retry_after() {
    let mut c = Cluster::start(1, &["--max-connections", "40", "--body-timeout-ms", "60000"])
        .await
        .unwrap();
    c.wait_healthy().await.unwrap();
    let addr = c.members[0].client_addr.clone();
    let url = c.members[0].url();

    // Forty idle connections (one served a request, the others none): new clients get in.
    let mut idle = Vec::new();
    for _ in 0..40 {
        idle.push(TcpStream::connect(&addr).await.unwrap());
    }
    support::wait_until("the member to hold 40 connections", support::DEADLINE, || async {
        let text = reqwest::get(format!("{url}/metrics")).await.ok()?.text().await.ok()?;
        text.contains("raftkv_http_connections{server=\"client\"} 40")
            .then_some(())
    })
    .await
    .unwrap();
    for i in 0..20 {
        let r = reqwest::Client::new()
            .put(format!("{url}/v1/kv/k{i}"))
            .body("v")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    }
    drop(idle);

    // Forty connections each with a request in flight: nothing can make room. One that was
    // accepted while others had not yet sent their heads may have been closed to make room
    // for the next (it was idle then): replace those until forty are busy.
    let mut busy: Vec<TcpStream> = Vec::new();
    let deadline = Instant::now() + support::DEADLINE;
    loop {
        busy.retain_mut(|s| {
            let mut probe = [0u8; 1];
            // Still open and unanswered: reading would block.
            matches!(s.try_read(&mut probe), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
        });
        if busy.len() == 40 {
            break;
        }
        assert!(Instant::now() < deadline, "could not hold forty busy connections");
        while busy.len() < 40 {
            busy.push(busy_connection(&addr).await);
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let refused = support::wait_until("a new connection to be refused", support::DEADLINE, || async {
        let r = reqwest::Client::new().get(format!("{url}/healthz")).send().await;
        let r = r.ok()?;
        (r.status() == 503).then_some(r)
    })
    .await
    .unwrap();
    assert_eq!(refused.headers()["retry-after"], "1");
    let body: serde_json::Value = refused.json().await.unwrap();
    assert_eq!(body["error"], raftkv_api::codes::TOO_MANY_CONNECTIONS);

    // Once they finish, the member serves again.
    drop(busy);
    support::wait_until("the member to serve again", support::DEADLINE, || async {
        let r = reqwest::Client::new()
            .get(format!("{url}/v1/kv/k0"))
            .send()
            .await
            .ok()?;
        (r.status() == 200).then_some(())
    })
    .await
    .unwrap();
    wait_metric(
        &c,
        0,
        "raftkv_http_connections_closed_total{server=\"client\",reason=\"refused_full\"}",
        1.0,
    )
    .await;
    wait_metric(
        &c,
        0,
        "raftkv_http_connections_closed_total{server=\"client\",reason=\"evicted_idle\"}",
        1.0,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_hundred_slow_loris_connections_are_cut_off_while_others_are_served() {
    raise_fd_limit();
    let header_timeout = Duration::from_secs(3);
    let body_timeout = Duration::from_secs(3);
    let mut c = Cluster::start(1, &["--header-timeout-ms", "3000", "--body-timeout-ms", "3000"])
        .await
        .unwrap();
    c.wait_healthy().await.unwrap();
    let addr = c.members[0].client_addr.clone();
    let pid = c.members[0].pid().unwrap();
    let rss_before = vm_rss_kib(pid);
    let stop_rss = Arc::new(AtomicBool::new(false));
    let peak = sample_peak_rss(vec![pid], stop_rss.clone());
    let stop = Arc::new(AtomicBool::new(false));
    let behaved = well_behaved(c.members[0].url(), stop.clone(), false);

    // 400 drip a header line every 500 ms and never finish the head; 100 send a head and
    // then trickle a body. Each records how long the member kept it open.
    let started = Instant::now();
    let cut_off = Arc::new(AtomicU64::new(0));
    let mut lorises = Vec::new();
    for i in 0..500 {
        let (addr, cut_off) = (addr.clone(), cut_off.clone());
        lorises.push(tokio::spawn(async move {
            let mut s = TcpStream::connect(&addr).await.unwrap();
            let opened = Instant::now();
            let head: &[u8] = if i < 400 {
                b"GET /v1/kv/x HTTP/1.1\r\nhost: x\r\n"
            } else {
                b"PUT /v1/kv/x HTTP/1.1\r\nhost: x\r\ncontent-length: 1000\r\n\r\n"
            };
            s.write_all(head).await.unwrap();
            let mut buf = [0u8; 1024];
            let mut answer = Vec::new();
            // How the connection ended, for the report of one cut off early.
            let ended;
            loop {
                let drip: &[u8] = if i < 400 { b"x-drip: 1\r\n" } else { b"y" };
                if let Err(e) = s.write_all(drip).await {
                    ended = format!("write failed: {e}");
                    break;
                }
                match tokio::time::timeout(Duration::from_millis(500), s.read(&mut buf)).await {
                    Ok(Ok(0)) => {
                        ended = "closed".to_string();
                        break;
                    }
                    Ok(Err(e)) => {
                        ended = format!("read failed: {e}");
                        break;
                    }
                    Ok(Ok(n)) => answer.extend_from_slice(&buf[..n]),
                    Err(_) => {}
                }
                if opened.elapsed() > Duration::from_secs(60) {
                    panic!("loris {i} was never cut off");
                }
            }
            cut_off.fetch_add(1, Ordering::Relaxed);
            (opened.elapsed(), String::from_utf8_lossy(&answer).into_owned(), ended)
        }));
    }
    let (mut shortest, mut longest) = (Duration::MAX, Duration::ZERO);
    let mut body_timeouts = 0;
    let mut early = Vec::new();
    for (i, l) in lorises.into_iter().enumerate() {
        let (open_for, answer, ended) = l.await.unwrap();
        longest = longest.max(open_for);
        shortest = shortest.min(open_for);
        if i >= 400 && answer.starts_with("HTTP/1.1 408") {
            body_timeouts += 1;
        }
        if open_for + Duration::from_millis(500) < header_timeout.min(body_timeout) {
            early.push(format!("loris {i} after {open_for:?} ({ended}): {answer:?}"));
        }
    }
    for e in early.iter().take(20) {
        println!("cut off early: {e}");
    }
    println!(
        "500 slow-loris connections cut off after {shortest:?} to {longest:?} (all done {:?} after the first opened); {body_timeouts} of 100 slow bodies answered 408",
        started.elapsed()
    );
    stop.store(true, Ordering::Relaxed);
    let behaved = behaved.await.unwrap();
    behaved.report("500 slow-loris connections");
    stop_rss.store(true, Ordering::Relaxed);
    let peak = peak.await.unwrap();
    let rss_after = vm_rss_kib(pid);
    println!("member VmRSS: before {rss_before} KiB, peak {peak} KiB, after {rss_after} KiB");

    assert_eq!(cut_off.load(Ordering::Relaxed), 500);
    assert!(
        longest < header_timeout.max(body_timeout) + Duration::from_secs(10),
        "a loris was kept {longest:?}"
    );
    assert!(
        shortest + Duration::from_millis(500) >= header_timeout.min(body_timeout),
        "a loris was cut off early, after {shortest:?}: {early:?}"
    );
    assert_eq!(body_timeouts, 100, "every slow body is told 408");
    behaved.assert_fine("500 slow-loris connections", Duration::from_secs(1), 20);
    assert!(peak < rss_before + 200 * 1024, "peak VmRSS {peak} KiB");
    assert!(c.members[0].is_running());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_and_listings_over_their_bounds_are_refused_with_429_and_retry_after() {
    let mut c = Cluster::start(1, &["--max-pending-reads", "2", "--max-concurrent-lists", "1"])
        .await
        .unwrap();
    c.wait_healthy().await.unwrap();
    let url = c.members[0].url();
    for i in 0..20 {
        assert_eq!(c.put(0, &format!("k{i}"), &"v".repeat(1000)).await.unwrap().status, 200);
    }
    for (what, path) in [("reads", "/v1/kv/k1"), ("listings", "/v1/kv?prefix=k")] {
        let mut tasks = Vec::new();
        for _ in 0..64 {
            let url = format!("{url}{path}");
            tasks.push(tokio::spawn(async move {
                let r = reqwest::get(url).await.unwrap();
                let retry = r.headers().get("retry-after").map(|v| v.to_str().unwrap().to_string());
                (r.status().as_u16(), retry, r.text().await.unwrap())
            }));
        }
        let (mut ok, mut refused) = (0, 0);
        for t in tasks {
            match t.await.unwrap() {
                (200, _, _) => ok += 1,
                (429, retry, body) => {
                    assert_eq!(retry.as_deref(), Some("1"));
                    assert!(body.contains(raftkv_api::codes::OVERLOADED), "{body}");
                    refused += 1;
                }
                other => panic!("{what}: {other:?}"),
            }
        }
        println!("{what}: 64 at once, {ok} served, {refused} refused");
        assert!(ok >= 1 && refused >= 1, "{what}: {ok} served, {refused} refused");
    }
    assert!(metric(&c, 0, "raftkv_requests_refused_total{queue=\"reads\"}").await >= 1.0);
    assert!(metric(&c, 0, "raftkv_requests_refused_total{queue=\"lists\"}").await >= 1.0);
    // Nothing stays held once they are answered.
    assert_eq!(metric(&c, 0, "raftkv_pending_reads ").await, 0.0);
    assert_eq!(metric(&c, 0, "raftkv_lists_in_progress ").await, 0.0);
}

/// Each member's (term, leader id).
async fn terms_and_leaders(c: &Cluster) -> Vec<(u64, u64)> {
    let mut seen = Vec::new();
    for i in 0..c.members.len() {
        let status = c.status(i).await.expect("status");
        seen.push((status["term"].as_u64().unwrap(), status["leader_id"].as_u64().unwrap()));
    }
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_large_writes_is_refused_with_429_while_small_writes_go_through() {
    let mut c = Cluster::start(3, &["--max-pending-write-bytes", "2097152"])
        .await
        .unwrap();
    c.wait_healthy().await.unwrap();
    let leader = c.leader().await.unwrap();
    let pids: Vec<i32> = c.members.iter().map(|m| m.pid().unwrap()).collect();
    let rss_before: u64 = pids.iter().map(|p| vm_rss_kib(*p)).sum();
    let stop_rss = Arc::new(AtomicBool::new(false));
    let peak = sample_peak_rss(pids.clone(), stop_rss.clone());
    let stop = Arc::new(AtomicBool::new(false));
    let behaved = well_behaved(c.members[leader].url(), stop.clone(), false);
    let terms_before = terms_and_leaders(&c).await;

    // 24 writers of 1 MiB values to 16 keys, all at the leader, for 6 s: far more than these
    // members (debug builds, one small disk) write. The budget of 2 MiB admits one such
    // write at a time (large writes may hold three quarters of it).
    let flood_until = Instant::now() + Duration::from_secs(6);
    let counts = Arc::new(parking_lot::Mutex::new(std::collections::BTreeMap::<u16, u64>::new()));
    let mut writers = Vec::new();
    for w in 0..24 {
        let (url, counts) = (c.members[leader].url(), counts.clone());
        writers.push(tokio::spawn(async move {
            let http = reqwest::Client::builder()
                .timeout(Duration::from_secs(30))
                .build()
                .unwrap();
            let value = vec![b'f'; 1 << 20];
            while Instant::now() < flood_until {
                let status = match http
                    .put(format!("{url}/v1/kv/flood-{}", w % 16))
                    .body(value.clone())
                    .send()
                    .await
                {
                    Ok(r) => r.status().as_u16(),
                    Err(e) => {
                        println!("flood writer {w}: {e:?}");
                        0
                    }
                };
                *counts.lock().entry(status).or_default() += 1;
                if status == 429 {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }));
    }
    for w in writers {
        w.await.unwrap();
    }
    stop.store(true, Ordering::Relaxed);
    let behaved = behaved.await.unwrap();
    let counts = counts.lock().clone();
    println!("flood of 1 MiB writes, by status: {counts:?}");
    behaved.report("a flood of 1 MiB writes");
    let terms_after = terms_and_leaders(&c).await;
    println!("members' (term, leader) before the flood {terms_before:?}, after {terms_after:?}");
    let settle = Instant::now();
    tokio::time::sleep(Duration::from_secs(3)).await;
    stop_rss.store(true, Ordering::Relaxed);
    let peak = peak.await.unwrap();
    let rss_after: u64 = pids.iter().map(|p| vm_rss_kib(*p)).sum();
    println!(
        "3 members' VmRSS: before {rss_before} KiB, peak {peak} KiB, {:?} after the flood {rss_after} KiB",
        settle.elapsed()
    );

    assert!(
        counts.get(&200).copied().unwrap_or(0) > 0,
        "some large writes went through"
    );
    assert!(
        counts.get(&429).copied().unwrap_or(0) > 0,
        "the flood was refused beyond the budget"
    );
    assert!(
        counts.keys().all(|s| *s == 200 || *s == 429),
        "only 200 and 429: {counts:?}"
    );
    behaved.assert_fine("a flood of 1 MiB writes", Duration::from_secs(3), 5);
    // Heartbeats get through the flood: no follower stopped hearing from the leader.
    assert_eq!(
        terms_before, terms_after,
        "a flood of large writes changed the term or leader"
    );
    // The state holds 16 values of 1 MiB on each member, the log tail what was written since
    // the last snapshot; queues hold at most the budget.
    assert!(
        peak < rss_before + 600 * 1024,
        "3 members' VmRSS peaked at {peak} KiB from {rss_before} KiB"
    );
    c.wait_healthy().await.unwrap();
    for i in 0..3 {
        assert!(c.members[i].is_running());
    }
}
