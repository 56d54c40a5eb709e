//! A cluster of real member processes whose peer traffic all goes through harness-owned proxies
//! (one in front of each member's peer port), so links can be cut, slowed or made lossy, and whose
//! processes can be killed, paused and restarted with fail points armed.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

use super::proxy::{LinkRule, Proxy};
use crate::support::{wait_until, Member};

/// Snapshots come every this many applied entries, and this many entries stay behind one, so a
/// short isolation is enough to need a snapshot.
pub const SNAPSHOT_COUNT: u64 = 100;
pub const SNAPSHOT_CATCHUP: u64 = 20;
/// The node's own request deadline in the fault runs.
pub const REQUEST_TIMEOUT_MS: u64 = 2000;
/// How long recovery and health may take before a run fails.
pub const RECOVERY_DEADLINE: Duration = Duration::from_secs(45);

pub struct FaultCluster {
    pub members: Vec<Member>,
    /// `proxies[i]` stands in front of `members[i]`'s peer port.
    pub proxies: Vec<Proxy>,
    pub http: reqwest::Client,
    pub root: tempfile::TempDir,
    /// Flags every member gets besides the suite's own.
    extra_args: Vec<String>,
}

impl FaultCluster {
    /// `n` members formed as the operator forms them: bootstrap one, add each other as a learner
    /// and promote it, every peer URL being the member's proxy.
    pub async fn start(n: usize) -> Result<FaultCluster> {
        Self::start_with(n, &[]).await
    }

    /// [`FaultCluster::start`] with `extra_args` for every member, later ones included.
    pub async fn start_with(n: usize, extra_args: &[&str]) -> Result<FaultCluster> {
        let mut c = FaultCluster {
            extra_args: extra_args.iter().map(|a| a.to_string()).collect(),
            members: Vec::new(),
            proxies: Vec::new(),
            http: reqwest::Client::builder().timeout(Duration::from_secs(10)).build()?,
            root: tempfile::tempdir()?,
        };
        let formed = async {
            let first = c.spawn_member().await?;
            let r = c.post(first, "/v1/bootstrap", None).await?;
            if r.0 != 200 {
                bail!("bootstrap failed: {} {}", r.0, r.1);
            }
            for _ in 1..n {
                let i = c.spawn_member().await?;
                c.add_and_promote(i).await?;
            }
            c.wait_healthy().await
        };
        match formed.await {
            Ok(_) => Ok(c),
            Err(e) => {
                c.dump_logs();
                Err(e)
            }
        }
    }

    /// Starts a proxy and an uninitialised member behind it; returns its index.
    pub async fn spawn_member(&mut self) -> Result<usize> {
        let proxy = Proxy::start().await?;
        // The suite's usual fast ticks, a shorter request deadline and frequent snapshots.
        let mut args: Vec<String> = vec!["--tick-ms".into(), "50".into(), "--election-ticks".into(), "10".into()];
        let extra = [
            "--request-timeout-ms".to_string(),
            REQUEST_TIMEOUT_MS.to_string(),
            "--snapshot-count".into(),
            SNAPSHOT_COUNT.to_string(),
            "--snapshot-catchup-entries".into(),
            SNAPSHOT_CATCHUP.to_string(),
            "--advertise-peer-url".into(),
            proxy.url(),
            // Small WAL segments, so the log rotates and releases segments in every run.
            "--wal-segment-bytes".into(),
            "4096".into(),
            // Idle watch streams say they are alive often enough for a watcher to tell a paused
            // or cut-off member from a quiet one (`watchers::STALL`).
            "--watch-progress-ms".into(),
            "300".into(),
        ];
        args.extend(extra);
        args.extend(self.extra_args.iter().cloned());
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let name = format!("m{}", self.members.len());
        let member = Member::spawn(self.root.path(), &name, &args).await?;
        proxy.set_target(member.peer_addr.parse()?);
        self.members.push(member);
        self.proxies.push(proxy);
        Ok(self.members.len() - 1)
    }

    pub fn dump_logs(&self) {
        crate::support::dump_logs(&self.members);
    }

    pub async fn request(
        &self,
        method: reqwest::Method,
        i: usize,
        path: &str,
        body: Option<Value>,
    ) -> Result<(u16, Value)> {
        let mut req = self.http.request(method, format!("{}{path}", self.members[i].url()));
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().await?;
        let status = resp.status().as_u16();
        let text = resp.text().await?;
        Ok((status, serde_json::from_str(&text).unwrap_or(Value::String(text))))
    }

    pub async fn post(&self, i: usize, path: &str, body: Option<Value>) -> Result<(u16, Value)> {
        self.request(reqwest::Method::POST, i, path, body).await
    }

    pub async fn status(&self, i: usize) -> Option<Value> {
        let (code, v) = self.request(reqwest::Method::GET, i, "/v1/status", None).await.ok()?;
        (code == 200).then_some(v)
    }

    /// Retries an admin call while it meets a transient refusal.
    pub async fn admin(
        &self,
        what: &str,
        via: &[usize],
        path: &str,
        method: reqwest::Method,
        body: Option<Value>,
    ) -> Result<Value> {
        self.admin_settled(what, via, path, method, body, &[]).await
    }

    /// [`FaultCluster::admin`], retrying until the change is made. A retry after an answer that
    /// left the outcome open (a timeout, a connection lost, a leader lost) may find the change
    /// already made: one of the `settled` error codes then counts as done, as it would for a
    /// client that retries. Never on the first answer, which must be 200.
    pub async fn admin_settled(
        &self,
        what: &str,
        via: &[usize],
        path: &str,
        method: reqwest::Method,
        body: Option<Value>,
        settled: &[&str],
    ) -> Result<Value> {
        let mut attempt = 0usize;
        let last = parking_lot::Mutex::new(String::new());
        let open = std::sync::atomic::AtomicBool::new(false);
        let answered = wait_until(what, RECOVERY_DEADLINE, || {
            attempt += 1;
            let i = via[attempt % via.len()];
            let (method, body, last, open) = (method.clone(), body.clone(), &last, &open);
            async move {
                let answer = self.request(method, i, path, body).await;
                *last.lock() = format!("{answer:?}");
                let Ok((code, v)) = answer else {
                    open.store(true, std::sync::atomic::Ordering::Relaxed);
                    return None;
                };
                let error = v["error"].as_str().unwrap_or("");
                let unknown = code == 503 || code == 504;
                let transient = unknown || (code == 409 && matches!(error, "learner_lagging" | "change_pending"));
                if unknown {
                    open.store(true, std::sync::atomic::Ordering::Relaxed);
                }
                if open.load(std::sync::atomic::Ordering::Relaxed) && settled.contains(&error) {
                    return Some((200, v));
                }
                (!transient).then_some((code, v))
            }
        })
        .await
        .with_context(|| format!("last answer: {}", last.lock()))?;
        match answered {
            (200, v) => Ok(v),
            (code, v) => bail!("{what}: {code} {v}"),
        }
    }

    /// Adds member `i` as a learner, then promotes it once it caught up.
    pub async fn add_and_promote(&self, i: usize) -> Result<()> {
        self.add_learner(i).await?;
        self.promote(i).await
    }

    /// The members other than `i` that membership requests may go to.
    fn admin_targets(&self, i: usize) -> Vec<usize> {
        (0..self.members.len())
            .filter(|&j| j != i && self.is_member(j))
            .collect()
    }

    /// Adds member `i` as a learner.
    pub async fn add_learner(&self, i: usize) -> Result<()> {
        let body = json!({"id": self.members[i].id, "peer_url": self.proxies[i].url()});
        self.admin_settled(
            "add learner",
            &self.admin_targets(i),
            "/v1/members",
            reqwest::Method::POST,
            Some(body),
            &["already_member"],
        )
        .await?;
        Ok(())
    }

    /// Promotes learner `i` once it caught up.
    pub async fn promote(&self, i: usize) -> Result<()> {
        self.admin_settled(
            "promote",
            &self.admin_targets(i),
            &format!("/v1/members/{}/promote", self.members[i].id),
            reqwest::Method::POST,
            None,
            &["already_member"],
        )
        .await?;
        Ok(())
    }

    /// Removes member `i` through the members `via`. A retry after an answer that left the
    /// outcome open accepts `not_member` or `id_removed` as the removal made.
    pub async fn remove_member(&self, i: usize, via: &[usize]) -> Result<()> {
        self.admin_settled(
            "remove",
            via,
            &format!("/v1/members/{}", self.members[i].id),
            reqwest::Method::DELETE,
            None,
            &["not_member", "id_removed"],
        )
        .await?;
        Ok(())
    }

    /// Waits until member `i` itself reports that it was removed.
    pub async fn wait_removed(&self, i: usize) -> Result<()> {
        wait_until("the removed member to know", RECOVERY_DEADLINE, || async {
            (self.status(i).await?["membership"] == "removed").then_some(())
        })
        .await
    }

    /// Whether member `i` is running and has not been removed (the harness's view).
    fn is_member(&self, i: usize) -> bool {
        !self.members[i].dir.join("removed.json").exists()
    }

    /// Indexes of running members that belong to the cluster.
    pub fn live(&mut self) -> Vec<usize> {
        (0..self.members.len())
            .filter(|&i| self.members[i].is_running() && self.is_member(i))
            .collect()
    }

    pub fn index_of(&self, id: u64) -> Option<usize> {
        self.members.iter().position(|m| m.id == id)
    }

    /// Waits until every live member is ready under one leader and no configuration is joint;
    /// returns the leader's index.
    pub async fn wait_healthy(&mut self) -> Result<usize> {
        let live = self.live();
        let this = &*self;
        let leader = wait_until("every live member ready under one leader", RECOVERY_DEADLINE, || {
            let live = live.clone();
            async move {
                let mut leaders = Vec::new();
                for i in live {
                    let s = this.status(i).await?;
                    if s["membership"] == "removed" {
                        continue;
                    }
                    if s["ready"] != true || s["joint"] != false {
                        return None;
                    }
                    leaders.push(s["leader_id"].as_u64()?);
                }
                leaders.dedup();
                (leaders.len() == 1).then(|| leaders[0])
            }
        })
        .await?;
        self.index_of(leader)
            .context("the leader is not a member the harness started")
    }

    /// The leader as `members` in `group` see it, if they agree on one (none during an election).
    pub async fn leader_seen_by(&self, group: &[usize]) -> Option<u64> {
        let mut seen = Vec::new();
        for &i in group {
            let s = self.status(i).await?;
            seen.push(s["leader_id"].as_u64()?);
        }
        seen.dedup();
        (seen.len() == 1 && seen[0] != 0).then(|| seen[0])
    }

    /// Cuts every link between the groups, both ways.
    pub fn partition(&self, groups: &[Vec<usize>]) {
        for (g, group) in groups.iter().enumerate() {
            for (h, other) in groups.iter().enumerate() {
                if g == h {
                    continue;
                }
                for &a in group {
                    for &b in other {
                        self.proxies[b].set_link(self.members[a].id, LinkRule::Blackhole);
                    }
                }
            }
        }
    }

    /// Applies `rule` to every link.
    pub fn set_all_links(&self, rule: LinkRule) {
        for p in &self.proxies {
            p.set_default(rule);
        }
    }

    pub fn heal(&self) {
        for p in &self.proxies {
            p.heal();
        }
    }

    /// Sum of every proxy's counters: forwarded, dropped bytes, delayed chunks, reset connections.
    pub fn proxy_counters(&self) -> [u64; 4] {
        let mut sum = [0u64; 4];
        for p in &self.proxies {
            for (s, v) in sum.iter_mut().zip(p.counters().snapshot()) {
                *s += v;
            }
        }
        sum
    }

    /// Waits for member `i`'s process to end on its own (a kill, a crash) and reaps it.
    pub async fn wait_exit(&mut self, i: usize, what: &str) -> Result<std::process::ExitStatus> {
        wait_until(what, RECOVERY_DEADLINE, || {
            let s = self.members[i].reap_exited();
            async move { s }
        })
        .await
    }

    /// Stops member `i` gracefully (SIGTERM), keeping its data.
    pub async fn stop_member(&mut self, i: usize) -> Result<()> {
        self.members[i].stop().await
    }

    /// The applied membership as member `i` reports it: id -> role.
    pub async fn membership(&self, i: usize) -> Result<BTreeMap<u64, String>> {
        let (_, v) = self.request(reqwest::Method::GET, i, "/v1/members", None).await?;
        let mut out = BTreeMap::new();
        for m in v["members"].as_array().context("members")? {
            out.insert(
                m["id"].as_u64().context("id")?,
                m["role"].as_str().context("role")?.to_string(),
            );
        }
        Ok(out)
    }

    /// `name=value` of one metric on member `i`.
    pub async fn metric(&self, i: usize, name: &str) -> Option<f64> {
        let text = self
            .http
            .get(format!("{}/metrics", self.members[i].url()))
            .send()
            .await
            .ok()?
            .text()
            .await
            .ok()?;
        text.lines()
            .find(|l| l.split_whitespace().next() == Some(name))
            .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
    }

    /// SIGTERM to every running member; each must exit cleanly.
    pub async fn shutdown(&mut self) -> Result<()> {
        let mut failures = Vec::new();
        for m in &mut self.members {
            if m.is_running() {
                if let Err(e) = m.stop().await {
                    failures.push(e.to_string());
                }
            } else {
                m.kill();
            }
        }
        if !failures.is_empty() {
            bail!("members did not stop cleanly: {failures:?}");
        }
        Ok(())
    }
}
