//! Stopping a member: SIGTERM is a graceful stop at every point of its life, start-up included.

mod support;

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use support::{wait_until, BIN, DEADLINE};

/// Kills the member if the test ends before it exited.
struct Reaped(Option<Child>);

impl Drop for Reaped {
    fn drop(&mut self) {
        if let Some(mut child) = self.0.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

#[tokio::test]
async fn a_sigterm_while_the_member_starts_stops_it_gracefully() {
    // The other initial member accepts connections and never answers, so the new member's
    // bootstrap probe of it (made while it starts, before it serves) waits for its timeout.
    let silent = TcpListener::bind("127.0.0.1:0").unwrap();
    silent.set_nonblocking(true).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let log_path = dir.path().join("member.log");
    // The log goes to a file, which cannot fill up and block the member as a pipe could.
    let log = std::fs::File::create(&log_path).unwrap();
    let member = Command::new(BIN)
        .args([
            "--id",
            "1",
            "--client-addr",
            "127.0.0.1:0",
            "--peer-addr",
            "127.0.0.1:0",
        ])
        .arg("--initial-cluster")
        // Member 1's own URL is never dialled by itself; member 2 is the silent listener.
        .arg(format!(
            "1=http://127.0.0.1:9,2=http://{}",
            silent.local_addr().unwrap()
        ))
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("running raftkv-node");
    let pid = Pid::from_raw(member.id() as i32);
    let mut member = Reaped(Some(member));
    // The probe's connection: the member is inside its start-up now.
    let _probe = wait_until("the bootstrap probe", DEADLINE, || {
        let accepted = silent.accept().ok();
        async move { accepted }
    })
    .await
    .unwrap();
    kill(pid, Signal::SIGTERM).unwrap();
    let child = member.0.as_mut().unwrap();
    let status = wait_until("the member to exit", DEADLINE, || {
        let exited = child.try_wait().unwrap();
        async move { exited }
    })
    .await
    .unwrap();
    member.0 = None;
    let log = std::fs::read_to_string(&log_path).unwrap();
    assert!(
        status.success(),
        "exited with {status} on a SIGTERM while starting:\n{log}"
    );
    assert!(log.contains("SIGTERM received"), "{log}");
}
