//! `raftkv-bench` against a real one-member cluster: a short mixed run completes operations of
//! every kind and counts no errors.

mod support;

use std::process::Command;

use support::Cluster;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_tool_reports_operations_and_no_errors_against_one_member() {
    let c = Cluster::start(1, &[]).await.unwrap();
    let endpoint = c.members[0].url();
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
