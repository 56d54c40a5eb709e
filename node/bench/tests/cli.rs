//! `raftkv-bench` against a real one-member cluster: a short mixed run completes operations of
//! every kind and counts no errors.
//!
//! The member runs in this test process (the node's library starts it as its binary does), so
//! the test needs no other package's binary; the load generator runs as the built binary.

use std::process::Command;
use std::time::Duration;

use clap::Parser;
use raftkv_node::config::NodeConfig;
use tokio::time::Instant;

/// The node's flags, parsed as `raftkv-node` parses them.
#[derive(Parser)]
struct NodeFlags {
    #[command(flatten)]
    node: NodeConfig,
}

/// Generous: these machines are small and tests run in parallel.
const DEADLINE: Duration = Duration::from_secs(60);

/// Starts a member on loopback with faster ticks than production (elections take about half a
/// second), bootstraps it as a cluster of one and waits until it is ready.
async fn start_one_member(data_dir: &std::path::Path) -> raftkv_node::node::RunningNode {
    let data_dir = data_dir.to_str().expect("UTF-8 temporary path");
    let flags = NodeFlags::parse_from([
        "raftkv-node",
        "--data-dir",
        data_dir,
        "--client-addr",
        "127.0.0.1:0",
        "--peer-addr",
        "127.0.0.1:0",
        "--tick-ms",
        "50",
        "--election-ticks",
        "10",
        "--request-timeout-ms",
        "5000",
    ]);
    let node = raftkv_node::node::start(flags.node).await.expect("start the member");
    let url = format!("http://{}", node.client_addr);
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(15))
        .build()
        .unwrap();
    let bootstrap = http
        .post(format!("{url}/v1/bootstrap"))
        .send()
        .await
        .expect("bootstrap");
    assert_eq!(
        bootstrap.status(),
        200,
        "bootstrap failed: {}",
        bootstrap.text().await.unwrap_or_default()
    );
    let deadline = Instant::now() + DEADLINE;
    loop {
        let status = match http.get(format!("{url}/v1/status")).send().await {
            Ok(r) if r.status() == 200 => r.json::<serde_json::Value>().await.ok(),
            _ => None,
        };
        if status.is_some_and(|s| s["ready"] == true && s["leader_id"].as_u64().is_some()) {
            return node;
        }
        assert!(
            Instant::now() < deadline,
            "the member was not ready within {DEADLINE:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_tool_reports_operations_and_no_errors_against_one_member() {
    let root = tempfile::tempdir().unwrap();
    let node = start_one_member(&root.path().join("m0")).await;
    let endpoint = format!("http://{}", node.client_addr);
    let out = tokio::task::spawn_blocking(move || {
        Command::new(env!("CARGO_BIN_EXE_raftkv-bench"))
            .args([
                "--endpoints",
                &endpoint,
                "--conns",
                "4",
                "--duration",
                "1",
                "--warmup",
                "0.2",
            ])
            .args(["--key-space", "200", "--value-size", "64", "--preload", "--json"])
            .args(["--mix", "put=40,get=30,stale_get=20,cas=10"])
            .output()
            .expect("run raftkv-bench")
    })
    .await
    .unwrap();
    node.shutdown().await.expect("shut the member down");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "raftkv-bench failed: {stderr}");
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON report");
    assert!(report["ops"].as_u64().unwrap() > 0, "{report}");
    assert_eq!(report["errors"], 0, "{report}");
    assert_eq!(report["unknown"], 0, "{report}");
    for op in ["put", "get", "stale_get", "cas"] {
        assert!(
            report["per_op"][op]["ops"].as_u64().unwrap() > 0,
            "no {op} completed: {report}"
        );
    }
    // Every key was preloaded, so no read misses.
    assert_eq!(report["not_found"], 0, "{report}");
    assert!(report["latency"]["p99_us"].as_u64().unwrap() >= report["latency"]["p50_us"].as_u64().unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_watch_load_delivers_every_event_of_every_acknowledged_write() {
    let root = tempfile::tempdir().unwrap();
    let node = start_one_member(&root.path().join("m0")).await;
    let endpoint = format!("http://{}", node.client_addr);
    let out = tokio::task::spawn_blocking(move || {
        Command::new(env!("CARGO_BIN_EXE_raftkv-bench"))
            .args([
                "--endpoints",
                &endpoint,
                "--conns",
                "4",
                "--duration",
                "1",
                "--warmup",
                "0.2",
            ])
            .args([
                "--key-space",
                "1000",
                "--watchers",
                "30",
                "--prefixes",
                "10",
                "--streams-per-conn",
                "8",
            ])
            .args(["--server-pids", &std::process::id().to_string(), "--json"])
            .output()
            .expect("run raftkv-bench")
    })
    .await
    .unwrap();
    node.shutdown().await.expect("shut the member down");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "raftkv-bench failed: {stderr}");
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON report");
    assert!(report["writes_per_sec_watched"].as_f64().unwrap() > 0.0, "{report}");
    let expected = report["events_expected"].as_u64().unwrap();
    assert!(expected > 0, "{report}");
    assert_eq!(report["events"].as_u64().unwrap(), expected, "{report}");
    assert_eq!(
        (report["watch_errors"].as_u64(), report["write_errors"].as_u64()),
        (Some(0), Some(0)),
        "{report}"
    );
    assert!(report["rss_kib_before"].as_u64().unwrap() > 0, "{report}");
}
