//! The README's first command: `raftkv-node local --nodes 3` starts a static cluster of real
//! member processes, serves writes and reads through any of them, and stops them all on Ctrl-C.

mod support;

use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::process::{Command, Stdio};
use std::time::Duration;

use nix::sys::signal::Signal;
use std::os::unix::process::ExitStatusExt;
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

/// The launcher process; a test that fails before stopping it still sends it Ctrl-C, so it
/// stops its members rather than leaving them running.
struct Launcher(std::process::Child);

impl Drop for Launcher {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let pid = nix::unistd::Pid::from_raw(self.0.id() as i32);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT);
        }
    }
}

/// Runs `raftkv-node` with `args` to its exit; killed if it outlives the deadline.
async fn run_to_exit(args: Vec<std::ffi::OsString>) -> std::process::Output {
    let output = tokio::process::Command::new(BIN).args(args).kill_on_drop(true).output();
    tokio::time::timeout(DEADLINE, output)
        .await
        .expect("raftkv-node exits within the deadline")
        .unwrap()
}

/// Starts `raftkv-node local --nodes 3` and waits for its banner.
async fn start_local(base: u16, data: &std::path::Path) -> (Launcher, Vec<String>) {
    start_local_with(base, data, &[]).await
}

/// Starts `raftkv-node local --nodes 3 <extra>` and waits for its banner.
async fn start_local_with(base: u16, data: &std::path::Path, extra: &[&str]) -> (Launcher, Vec<String>) {
    let mut launcher = Command::new(BIN)
        .args(["local", "--nodes", "3", "--base-port", &base.to_string()])
        .arg("--data-dir")
        .arg(data)
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = launcher.stdout.take().unwrap();
    let launcher = Launcher(launcher);
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
    (launcher, banner)
}

/// Sends Ctrl-C to the launcher and waits until it and its members are gone.
async fn stop_local(launcher: Launcher, base: u16) {
    signal_local(launcher, base, Signal::SIGINT).await;
}

/// Sends `signal` to the launcher and waits until it and its members are gone; the launcher
/// exits cleanly unless the signal is SIGKILL.
async fn signal_local(mut launcher: Launcher, base: u16, signal: Signal) {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(launcher.0.id() as i32), signal).unwrap();
    let status = wait_until("the launcher to exit", DEADLINE, || {
        let r = launcher.0.try_wait();
        async move { r.ok().flatten() }
    })
    .await
    .unwrap();
    if signal == Signal::SIGKILL {
        assert_eq!(status.signal(), Some(Signal::SIGKILL as i32), "{status}");
    } else {
        assert!(status.success(), "{status}");
    }
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
}

async fn put(base: u16, member: u16, key: &str, value: &str) {
    let put = reqwest::Client::new()
        .put(format!("http://127.0.0.1:{}/v1/kv/{key}", base + member))
        .body(value.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(put.status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_command_runs_a_three_member_cluster_and_stops_it_on_ctrl_c() {
    let data = tempfile::tempdir().unwrap();
    let base = free_base_port();
    let (launcher, banner) = start_local(base, data.path()).await;
    for i in 1..=3 {
        let url = format!("http://127.0.0.1:{}", base + i);
        assert!(
            banner.iter().any(|l| l.contains(&url)),
            "member {i} URL missing from {banner:?}"
        );
    }

    put(base, 1, "greeting", "hello").await;
    let got = reqwest::Client::new()
        .get(format!("http://127.0.0.1:{}/v1/kv/greeting", base + 3))
        .send()
        .await
        .unwrap();
    assert_eq!(got.status(), 200);
    assert_eq!(got.text().await.unwrap(), "hello");

    stop_local(launcher, base).await;
    assert!(data.path().join("node-1").join("member.json").exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_that_lost_its_data_is_refused_rather_than_bootstrapped_again() {
    let data = tempfile::tempdir().unwrap();
    let base = free_base_port();
    let (launcher, _) = start_local(base, data.path()).await;
    put(base, 1, "kept", "yes").await;

    // While the cluster runs, member 2 started on an empty directory with the same static
    // configuration: the others report it acknowledged entries, so it refuses to bootstrap.
    let initial: Vec<String> = (1..=3)
        .map(|i| format!("{i}=http://127.0.0.1:{}", base + 100 + i))
        .collect();
    let wiped = data.path().join("wiped-node-2");
    let mut args: Vec<std::ffi::OsString> = [
        "--id",
        "2",
        "--client-addr",
        "127.0.0.1:0",
        "--peer-addr",
        "127.0.0.1:0",
    ]
    .map(Into::into)
    .to_vec();
    args.extend([
        "--initial-cluster".into(),
        initial.join(",").into(),
        "--data-dir".into(),
        wiped.into(),
    ]);
    let output = run_to_exit(args).await;
    let log = String::from_utf8_lossy(&output.stderr).to_string() + &String::from_utf8_lossy(&output.stdout);
    assert!(!output.status.success(), "a member that lost its data started: {log}");
    assert!(log.contains("data was lost"), "{log}");
    assert!(
        !data.path().join("wiped-node-2").join("wal").exists(),
        "nothing was bootstrapped on the empty directory"
    );

    // After a stop, the launcher refuses to restart a cluster one of whose members lost its data.
    stop_local(launcher, base).await;
    std::fs::remove_dir_all(data.path().join("node-2")).unwrap();
    let mut args: Vec<std::ffi::OsString> = ["local", "--nodes", "3", "--base-port"].map(Into::into).to_vec();
    args.extend([base.to_string().into(), "--data-dir".into(), data.path().into()]);
    let output = run_to_exit(args).await;
    let log = String::from_utf8_lossy(&output.stderr).to_string() + &String::from_utf8_lossy(&output.stdout);
    assert!(
        !output.status.success(),
        "the launcher started a cluster with a wiped member: {log}"
    );
    assert!(log.contains("members [2] have none"), "{log}");
    assert!(!data.path().join("node-2").exists(), "no member was started");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_stop_with_the_launcher_on_sigterm_and_even_on_sigkill() {
    for signal in [Signal::SIGTERM, Signal::SIGKILL] {
        let data = tempfile::tempdir().unwrap();
        let base = free_base_port();
        let (launcher, _) = start_local(base, data.path()).await;
        put(base, 2, "before", "stop").await;
        // SIGTERM: the launcher stops its members as on Ctrl-C. SIGKILL: it gets no chance, and
        // each member shuts down on noticing its parent is gone; either way no port stays taken.
        signal_local(launcher, base, signal).await;
        for i in 1..=3 {
            let peer = base + 100 + i;
            wait_until(
                "the member's peer port to be released",
                Duration::from_secs(20),
                || async move { TcpListener::bind(("127.0.0.1", peer)).ok().map(|_| ()) },
            )
            .await
            .unwrap_or_else(|e| panic!("after {signal}: {e:#}"));
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_with_tls_makes_throwaway_certificates_prints_a_working_curl_line_and_keeps_them() {
    let data = tempfile::tempdir().unwrap();
    let base = free_base_port();
    let (launcher, banner) = start_local_with(base, data.path(), &["--tls"]).await;
    let tls = data.path().join("tls");
    let curl = banner
        .iter()
        .find(|l| l.contains("curl --cacert"))
        .expect("a curl line");
    for file in ["ca.pem", "admin.pem", "admin-key.pem"] {
        assert!(curl.contains(&tls.join(file).display().to_string()), "{curl}");
    }
    assert!(curl.contains(&format!("https://127.0.0.1:{}", base + 1)), "{curl}");

    let ca = reqwest::Certificate::from_pem(&std::fs::read(tls.join("ca.pem")).unwrap()).unwrap();
    let pem = [
        std::fs::read(tls.join("admin.pem")).unwrap(),
        std::fs::read(tls.join("admin-key.pem")).unwrap(),
    ]
    .concat();
    let admin = reqwest::Client::builder()
        .use_rustls_tls()
        .tls_built_in_root_certs(false)
        .add_root_certificate(ca.clone())
        .identity(reqwest::Identity::from_pem(&pem).unwrap())
        .build()
        .unwrap();
    let anonymous = reqwest::Client::builder()
        .use_rustls_tls()
        .tls_built_in_root_certs(false)
        .add_root_certificate(ca)
        .build()
        .unwrap();
    let token = std::fs::read_to_string(tls.join("admin.token")).unwrap();
    let put = admin
        .put(format!("https://127.0.0.1:{}/v1/kv/greeting", base + 1))
        .body("hello")
        .send()
        .await
        .unwrap();
    assert_eq!(put.status(), 200);
    let url3 = format!("https://127.0.0.1:{}/v1/kv/greeting", base + 3);
    let got = anonymous.get(&url3).bearer_auth(token.trim()).send().await.unwrap();
    assert_eq!(got.status(), 200);
    assert_eq!(got.text().await.unwrap(), "hello");
    assert_eq!(anonymous.get(&url3).send().await.unwrap().status(), 401);
    assert!(reqwest::get(format!("http://127.0.0.1:{}/v1/kv/greeting", base + 3))
        .await
        .is_err());
    stop_local(launcher, base).await;

    // A second start keeps the CA and certificates its members' data was made with.
    let ca_before = std::fs::read(tls.join("ca.pem")).unwrap();
    let (launcher, _) = start_local_with(base, data.path(), &["--tls"]).await;
    assert_eq!(std::fs::read(tls.join("ca.pem")).unwrap(), ca_before);
    let got = admin.get(&url3).send().await.unwrap();
    assert_eq!(got.status(), 200);
    assert_eq!(got.text().await.unwrap(), "hello");
    stop_local(launcher, base).await;
}
