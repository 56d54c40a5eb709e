//! The README's first command: `raftkv-node local --nodes 3` starts a static cluster of real
//! member processes, serves writes and reads through any of them, and stops them all on Ctrl-C.

mod support;

use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::process::{Command, Stdio};
use std::time::Duration;

use support::{wait_until, BIN, DEADLINE};

/// A base port whose member ports (base+1..=base+3, base+101..=base+103) are free on 127.0.0.1.
fn free_base_port() -> u16 {
    for _ in 0..200 {
        let base: u16 = rand::random_range(20_000..40_000);
        let ports = (1..=3).flat_map(|i| [base + i, base + 100 + i]);
        let listeners: Vec<_> = ports.map(|p| TcpListener::bind(("127.0.0.1", p))).collect();
        if listeners.iter().all(Result::is_ok) {
            return base;
        }
    }
    panic!("no free port range found on 127.0.0.1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_command_runs_a_three_member_cluster_and_stops_it_on_ctrl_c() {
    let data = tempfile::tempdir().unwrap();
    let base = free_base_port();
    let mut launcher = Command::new(BIN)
        .args(["local", "--nodes", "3", "--base-port", &base.to_string()])
        .arg("--data-dir")
        .arg(data.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = launcher.stdout.take().unwrap();
    let banner = tokio::task::spawn_blocking(move || {
        let mut lines = BufReader::new(stdout).lines();
        let mut seen = Vec::new();
        while let Some(Ok(line)) = lines.next() {
            seen.push(line.clone());
            if line.contains("Ctrl-C stops every member") {
                break;
            }
        }
        seen
    });
    let banner = tokio::time::timeout(DEADLINE, banner)
        .await
        .expect("cluster came up")
        .unwrap();
    assert!(banner.iter().any(|l| l.contains("is up")), "{banner:?}");
    for i in 1..=3 {
        let url = format!("http://127.0.0.1:{}", base + i);
        assert!(
            banner.iter().any(|l| l.contains(&url)),
            "member {i} URL missing from {banner:?}"
        );
    }

    let http = reqwest::Client::new();
    let put = http
        .put(format!("http://127.0.0.1:{}/v1/kv/greeting", base + 1))
        .body("hello")
        .send()
        .await
        .unwrap();
    assert_eq!(put.status(), 200);
    let got = http
        .get(format!("http://127.0.0.1:{}/v1/kv/greeting", base + 3))
        .send()
        .await
        .unwrap();
    assert_eq!(got.status(), 200);
    assert_eq!(got.text().await.unwrap(), "hello");

    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(launcher.id() as i32),
        nix::sys::signal::Signal::SIGINT,
    )
    .unwrap();
    let status = wait_until("the launcher to exit", DEADLINE, || {
        let r = launcher.try_wait();
        async move { r.ok().flatten() }
    })
    .await
    .unwrap();
    assert!(status.success(), "{status}");
    // Every member stopped: their ports are free again.
    for i in 1..=3 {
        let port = base + i;
        wait_until(
            "the member's port to be released",
            Duration::from_secs(20),
            || async move { TcpListener::bind(("127.0.0.1", port)).ok().map(|_| ()) },
        )
        .await
        .unwrap();
    }
    assert!(data.path().join("node-1").join("member.json").exists());
}
