//! A cluster of real `raftkv-node` processes on loopback for integration tests: each member in
//! its own temporary data directory, on its own loopback address, bound to port 0 first and to the
//! same ports on restart, its output in a log file printed when a test fails. Every process is
//! killed when the test ends.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use tokio::time::Instant;

/// The node binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_raftkv-node");

/// Generous: these machines are small and the suite runs tests in parallel.
pub const DEADLINE: Duration = Duration::from_secs(60);

/// Flags every test member runs with: faster ticks than production so elections take about
/// half a second.
pub const FAST: &[&str] = &[
    "--tick-ms",
    "50",
    "--election-ticks",
    "10",
    "--request-timeout-ms",
    "5000",
];

/// Polls `check` until it returns `Some` or the deadline passes.
pub async fn wait_until<T, F, Fut>(what: &str, within: Duration, mut check: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + within;
    loop {
        if let Some(v) = check().await {
            return Ok(v);
        }
        if Instant::now() >= deadline {
            bail!("timed out after {within:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A loopback address of 127.0.0.0/8 other than 127.0.0.1, drawn at random for one member.
///
/// A restarted member binds the ports it had before. On 127.0.0.1 another process's outgoing
/// connection may meanwhile have been given one of them as its source port (connections to any
/// loopback address leave from 127.0.0.1), and the restart fails with "address in use"; no
/// connection leaves from an address of its own.
pub fn member_ip() -> std::net::Ipv4Addr {
    std::net::Ipv4Addr::new(
        127,
        rand::random_range(1..=254),
        rand::random(),
        rand::random_range(1..=254),
    )
}

/// A free port on a loopback address of its own, for a member whose peer URL must be known
/// before it starts (see [`member_ip`] for why the address is its own).
pub fn free_peer_addr() -> String {
    let listener = std::net::TcpListener::bind((member_ip(), 0)).expect("bind a loopback port");
    listener.local_addr().expect("bound address").to_string()
}

fn is_backtrace_frame(line: &str) -> bool {
    let t = line.trim_start();
    let indented = t.len() < line.len();
    indented && (t.starts_with("at ") || t.split_once(": ").is_some_and(|(n, _)| n.parse::<u32>().is_ok()))
}

/// One member process.
pub struct Member {
    pub id: u64,
    pub dir: PathBuf,
    pub client_addr: String,
    pub peer_addr: String,
    pub log: PathBuf,
    /// Extra environment for the next launch (the fault suite arms fail points with `FAILPOINTS`).
    pub env: Vec<(String, String)>,
    /// `https` when the member serves its client port (or peer port) over TLS.
    pub scheme: &'static str,
    pub peer_scheme: &'static str,
    args: Vec<String>,
    child: Option<Child>,
}

impl Member {
    /// Starts a member on fresh ports of its own loopback address and waits until it listens.
    pub async fn spawn(root: &Path, name: &str, args: &[&str]) -> Result<Member> {
        Member::spawn_at(root, name, member_ip(), args).await
    }

    /// Starts a member on fresh ports of `ip` (for certificates issued to that address).
    pub async fn spawn_at(root: &Path, name: &str, ip: std::net::Ipv4Addr, args: &[&str]) -> Result<Member> {
        Member::start(root.join(name), format!("{ip}:0"), format!("{ip}:0"), args).await
    }

    /// Starts a member on `dir` (already seeded, say by `raftkv-node restore`) whose peer
    /// address was chosen in advance with [`free_peer_addr`]: a restored member's membership
    /// records its peer URL before it first starts.
    pub async fn spawn_in(dir: &Path, peer_addr: &str, args: &[&str]) -> Result<Member> {
        let ip = peer_addr.split(':').next().context("peer address has no host")?;
        Member::start(dir.to_path_buf(), format!("{ip}:0"), peer_addr.to_string(), args).await
    }

    /// Starts a member on `dir`, its log beside it, with https URLs for the ports `args` put
    /// under TLS.
    async fn start(dir: PathBuf, client_addr: String, peer_addr: String, args: &[&str]) -> Result<Member> {
        let name = dir
            .file_name()
            .context("data directory has no name")?
            .to_string_lossy()
            .into_owned();
        let has = |flag: &str| args.contains(&flag);
        let mut m = Member {
            id: 0,
            scheme: if has("--client-cert-file") { "https" } else { "http" },
            peer_scheme: if has("--peer-cert-file") { "https" } else { "http" },
            log: dir.with_file_name(format!("{name}.log")),
            dir,
            client_addr,
            peer_addr,
            env: Vec::new(),
            args: args.iter().map(|s| s.to_string()).collect(),
            child: None,
        };
        m.launch().await?;
        Ok(m)
    }

    fn addr_file(&self) -> PathBuf {
        self.dir.with_extension("addr.json")
    }

    async fn launch(&mut self) -> Result<()> {
        let addr_file = self.addr_file();
        let _ = std::fs::remove_file(&addr_file);
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&self.log)?;
        let child = Command::new(BIN)
            .arg("--data-dir")
            .arg(&self.dir)
            .arg("--client-addr")
            .arg(&self.client_addr)
            .arg("--peer-addr")
            .arg(&self.peer_addr)
            .arg("--addr-file")
            .arg(&addr_file)
            .args(&self.args)
            // RAFTKV_MEMBER_LOG sets the members' log filter, to see more of a failing run.
            .env(
                "RUST_LOG",
                std::env::var("RAFTKV_MEMBER_LOG").unwrap_or_else(|_| "info,raft_rs=info".into()),
            )
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdout(Stdio::from(log.try_clone()?))
            .stderr(Stdio::from(log))
            .spawn()
            .context("spawning raftkv-node")?;
        let pid = child.id();
        self.child = Some(child);
        let addrs: Option<Value> = wait_until("the member to listen", DEADLINE, || async {
            // A process that exits before it listens (a refusal, a fail point) ends the wait at once.
            if process_exited(pid) {
                return Some(None);
            }
            let raw = std::fs::read(&addr_file).ok()?;
            serde_json::from_slice(&raw).ok().map(Some)
        })
        .await
        .with_context(|| format!("log:\n{}", self.log_tail()))?;
        let Some(addrs) = addrs else {
            bail!("member exited before listening; log:\n{}", self.log_tail());
        };
        self.id = addrs["id"].as_u64().context("id")?;
        self.client_addr = addrs["client"].as_str().context("client")?.to_string();
        self.peer_addr = addrs["peer"].as_str().context("peer")?.to_string();
        Ok(())
    }

    pub fn url(&self) -> String {
        format!("{}://{}", self.scheme, self.client_addr)
    }

    pub fn peer_url(&self) -> String {
        format!("{}://{}", self.peer_scheme, self.peer_addr)
    }

    pub fn is_running(&mut self) -> bool {
        self.child.as_mut().is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// The process id while a process is attached.
    pub fn pid(&self) -> Option<i32> {
        self.child.as_ref().map(|c| c.id() as i32)
    }

    /// Sends `signal` (SIGSTOP, SIGCONT, ...) to the running process.
    pub fn signal(&self, signal: nix::sys::signal::Signal) -> Result<()> {
        let pid = self.pid().context("no process")?;
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), signal)?;
        Ok(())
    }

    /// The exit status of a process that ended on its own (a crash), reaping it; `None` while it
    /// runs or when no process is attached.
    pub fn reap_exited(&mut self) -> Option<std::process::ExitStatus> {
        let status = self.child.as_mut()?.try_wait().ok()??;
        self.child = None;
        Some(status)
    }

    /// SIGKILL without reaping, usable while other tasks share the cluster; `kill` reaps later.
    pub fn sigkill(&self) {
        if let Some(c) = &self.child {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(c.id() as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }

    /// SIGKILL: no chance to flush anything.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM and wait for a graceful exit.
    pub async fn stop(&mut self) -> Result<()> {
        if let Some(mut c) = self.child.take() {
            nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(c.id() as i32),
                nix::sys::signal::Signal::SIGTERM,
            )?;
            let status = wait_until("graceful exit", DEADLINE, || {
                let r = c.try_wait();
                async move { r.ok().flatten() }
            })
            .await?;
            if !status.success() {
                bail!(
                    "member {} exited with {status} on SIGTERM:\n{}",
                    self.id,
                    self.log_tail()
                );
            }
        }
        Ok(())
    }

    /// Starts again on the same data directory and ports.
    pub async fn restart(&mut self) -> Result<()> {
        assert!(self.child.is_none(), "restart of a running member");
        self.launch().await
    }

    /// [`Member::restart`] with `env` added for this launch only (fail points, a preloaded
    /// library); later restarts are plain again.
    pub async fn restart_with_env(&mut self, env: Vec<(String, String)>) -> Result<()> {
        self.env = env;
        let started = self.restart().await;
        self.env.clear();
        started
    }

    /// Runs the binary to completion on this member's data directory (for start-up refusals).
    pub fn run_to_exit(&self) -> std::process::Output {
        Command::new(BIN)
            .arg("--data-dir")
            .arg(&self.dir)
            .arg("--client-addr")
            .arg("127.0.0.1:0")
            .arg("--peer-addr")
            .arg("127.0.0.1:0")
            .args(&self.args)
            .output()
            .expect("run raftkv-node")
    }

    /// The last 60 lines of the member's output, without backtrace frames, so that an error
    /// printed before its backtrace stays in view.
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().filter(|l| !is_backtrace_frame(l)).collect();
        lines[lines.len().saturating_sub(60)..].join("\n")
    }
}

impl Drop for Member {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Resident set of process `pid` in KiB (`VmRSS`), if it is running.
pub fn vm_rss_kib(pid: i32) -> Option<u64> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// Whether process `pid` has exited (gone, or a zombie not yet reaped).
pub fn process_exited(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the parenthesised command name.
        Ok(stat) => stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')),
        Err(_) => true,
    }
}

/// Prints the tail of each member's log.
pub fn dump_logs(members: &[Member]) {
    for m in members {
        eprintln!(
            "===== member {} ({}) log tail =====\n{}",
            m.id,
            m.client_addr,
            m.log_tail()
        );
    }
}

/// An HTTP response reduced to what tests assert on.
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: u16,
    pub body: Vec<u8>,
    pub etag: Option<String>,
}

impl Reply {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or(Value::Null)
    }
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// Extra flags of one member, from the test root, its name and its address (for TLS tests,
/// which issue each member certificates for its own address).
pub type MemberArgs = Box<dyn Fn(&Path, &str, std::net::Ipv4Addr) -> Vec<String> + Send + Sync>;

/// A cluster of members plus an HTTP client.
pub struct Cluster {
    pub members: Vec<Member>,
    pub http: reqwest::Client,
    pub root: tempfile::TempDir,
    args: Vec<String>,
    member_args: Option<MemberArgs>,
}

impl Cluster {
    /// `n` members formed as the operator forms them: bootstrap the first, then add each other
    /// one as a learner and promote it once caught up.
    pub async fn start(n: usize, extra: &[&str]) -> Result<Cluster> {
        let http = reqwest::Client::builder().timeout(Duration::from_secs(15)).build()?;
        Cluster::start_with(n, extra, tempfile::tempdir()?, http, None).await
    }

    /// Like [`Cluster::start`] in `root`, talking through `http`, each member also given the
    /// flags `member_args` makes for it.
    pub async fn start_with(
        n: usize,
        extra: &[&str],
        root: tempfile::TempDir,
        http: reqwest::Client,
        member_args: Option<MemberArgs>,
    ) -> Result<Cluster> {
        let mut args: Vec<String> = FAST.iter().map(|s| s.to_string()).collect();
        args.extend(extra.iter().map(|s| s.to_string()));
        let mut c = Cluster {
            members: Vec::new(),
            http,
            root,
            args,
            member_args,
        };
        match c.form(n).await {
            Ok(()) => Ok(c),
            Err(e) => {
                c.dump_logs();
                Err(e)
            }
        }
    }

    async fn form(&mut self, n: usize) -> Result<()> {
        let first = self.spawn_member().await?;
        let r = self.post(first, "/v1/bootstrap", None).await?;
        if r.status != 200 {
            bail!("bootstrap failed: {} {}", r.status, r.text());
        }
        for _ in 1..n {
            let i = self.spawn_member().await?;
            self.add_and_promote(i).await?;
        }
        self.wait_healthy().await?;
        Ok(())
    }

    /// Prints the tail of every member's log.
    pub fn dump_logs(&self) {
        dump_logs(&self.members);
    }

    /// Starts one more uninitialised member process; returns its index.
    pub async fn spawn_member(&mut self) -> Result<usize> {
        let name = format!("m{}", self.members.len());
        let ip = member_ip();
        let mut args = self.args.clone();
        if let Some(extra) = &self.member_args {
            args.extend(extra(self.root.path(), &name, ip));
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let m = Member::spawn_at(self.root.path(), &name, ip, &args).await?;
        self.members.push(m);
        Ok(self.members.len() - 1)
    }

    /// Adds member `i` as a learner through any running member, then promotes it.
    pub async fn add_and_promote(&self, i: usize) -> Result<()> {
        let (id, peer_url) = (self.members[i].id, self.members[i].peer_url());
        let via = self.any_running_except(i);
        let body = json!({"id": id, "peer_url": peer_url});
        let added = self
            .retry_admin("add learner", || self.post(via, "/v1/members", Some(body.clone())))
            .await?;
        if added.status != 200 {
            bail!("adding member {id} failed: {} {}", added.status, added.text());
        }
        let promote_path = format!("/v1/members/{id}/promote");
        let promoted = self
            .retry_admin("promote", || self.post(via, &promote_path, None))
            .await?;
        if promoted.status != 200 {
            bail!("promoting member {id} failed: {} {}", promoted.status, promoted.text());
        }
        Ok(())
    }

    /// Retries an admin call while it answers a transient refusal (lagging learner, pending change,
    /// no leader yet).
    pub async fn retry_admin<F, Fut>(&self, what: &str, mut call: F) -> Result<Reply>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<Reply>>,
    {
        wait_until(what, DEADLINE, || {
            let fut = call();
            async move {
                let r = fut.await.ok()?;
                let code = r.json()["error"].as_str().unwrap_or("").to_string();
                let transient =
                    r.status == 503 || (r.status == 409 && (code == "learner_lagging" || code == "change_pending"));
                (!transient).then_some(r)
            }
        })
        .await
    }

    fn any_running_except(&self, i: usize) -> usize {
        (0..self.members.len()).find(|&j| j != i).expect("another member")
    }

    pub async fn request(
        &self,
        method: reqwest::Method,
        i: usize,
        path: &str,
        headers: &[(&str, &str)],
        body: Option<Vec<u8>>,
    ) -> Result<Reply> {
        let mut req = self.http.request(method, format!("{}{path}", self.members[i].url()));
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        if let Some(b) = body {
            req = req.body(b);
        }
        let resp = req.send().await?;
        let status = resp.status().as_u16();
        let etag = resp
            .headers()
            .get("etag")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let body = resp.bytes().await?.to_vec();
        Ok(Reply { status, body, etag })
    }

    pub async fn get(&self, i: usize, path: &str) -> Result<Reply> {
        self.request(reqwest::Method::GET, i, path, &[], None).await
    }

    pub async fn put(&self, i: usize, key: &str, value: &str) -> Result<Reply> {
        self.request(
            reqwest::Method::PUT,
            i,
            &format!("/v1/kv/{key}"),
            &[],
            Some(value.as_bytes().to_vec()),
        )
        .await
    }

    pub async fn post(&self, i: usize, path: &str, body: Option<Value>) -> Result<Reply> {
        let bytes = body.map(|b| serde_json::to_vec(&b).expect("json"));
        self.request(
            reqwest::Method::POST,
            i,
            path,
            &[("content-type", "application/json")],
            bytes,
        )
        .await
    }

    pub async fn delete(&self, i: usize, path: &str) -> Result<Reply> {
        self.request(reqwest::Method::DELETE, i, path, &[], None).await
    }

    pub async fn status(&self, i: usize) -> Option<Value> {
        let r = self.get(i, "/v1/status").await.ok()?;
        (r.status == 200).then(|| r.json())
    }

    /// Indexes of members whose process is running.
    pub fn running(&mut self) -> Vec<usize> {
        (0..self.members.len())
            .filter(|&i| self.members[i].is_running())
            .collect()
    }

    /// Waits until every running member that is part of the cluster is ready and agrees on one leader.
    pub async fn wait_healthy(&mut self) -> Result<u64> {
        let running = self.running();
        let this = &*self;
        wait_until("every running member ready under one leader", DEADLINE, || {
            let running = running.clone();
            async move {
                let mut leaders = Vec::new();
                for i in running {
                    let s = this.status(i).await?;
                    if s["membership"] == "removed" || s["membership"] == "none" {
                        continue;
                    }
                    if s["ready"] != true {
                        return None;
                    }
                    leaders.push(s["leader_id"].as_u64()?);
                }
                leaders.dedup();
                (leaders.len() == 1).then(|| leaders[0])
            }
        })
        .await
    }

    /// Index of the member that is the leader.
    pub async fn leader(&mut self) -> Result<usize> {
        let leader_id = self.wait_healthy().await?;
        self.members
            .iter()
            .position(|m| m.id == leader_id)
            .context("leader is not one of our members")
    }

    /// The applied membership: id -> role.
    pub async fn membership(&self, i: usize) -> Result<BTreeMap<u64, String>> {
        let r = self.get(i, "/v1/members").await?;
        let mut out = BTreeMap::new();
        for m in r.json()["members"].as_array().context("members")? {
            out.insert(
                m["id"].as_u64().context("id")?,
                m["role"].as_str().context("role")?.to_string(),
            );
        }
        Ok(out)
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.dump_logs();
        }
    }
}
