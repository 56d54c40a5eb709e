//! The faults, one per run, and the run itself: a cluster under client traffic, one fault injected
//! and healed, proof that it fired, then the checks (health, convergence, lossless acknowledged
//! writes, membership, linearizability of the history, monotonic stale reads, and every
//! watcher's stream against the committed history).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use nix::sys::signal::Signal;
use serde_json::json;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::checker;
use super::cluster::{FaultCluster, RECOVERY_DEADLINE, SNAPSHOT_CATCHUP};
use super::damage;
use super::history::{Op, Outcome, Recorder, Request};
use super::proxy::LinkRule;
use super::watchers::{self, WatchLog};
use super::workload::{self, Targets, APPEND_PREFIX, REGISTER_KEYS};
use crate::support::wait_until;

/// One fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// SIGKILL the leader, restart it on its data.
    KillLeader,
    /// SIGSTOP the leader for a few seconds, then SIGCONT.
    PauseLeader,
    /// Cut the leader off from every other member.
    IsolateLeader,
    /// Cut a minority of followers off from the rest.
    PartitionMinority,
    /// Put the leader in a minority: the majority side must elect another.
    PartitionLeaderInMinority,
    /// Every link 75 ms ± 50 ms late.
    SlowLinks,
    /// Every link resets its connection on 5% of its chunks.
    LossyLinks,
    /// Isolate a follower until the leader compacted past it, so it catches up from a snapshot.
    SnapshotCatchUp,
    /// Restart a member with a fail point armed to panic; it must crash there and recover.
    Crash(&'static str),
    /// Restart a member with a WAL fail point that returns a full-disk error.
    DiskError(&'static str),
    /// Add a learner, promote it and remove an old follower, all while every link is slow.
    MembershipWhileSlow,
    /// Add a learner, then promote it while the leader is cut off from every other member: the
    /// change is in flight across an election.
    PartitionDuringMembership,
    /// Remove a follower and SIGKILL it while the removal is in flight; restarted on its data, it
    /// must learn that it was removed and never serve again.
    KillDuringRemoval,
    /// Restart a member whose snapshot writes fail three times as on a full disk, then succeed:
    /// it serves throughout, keeps its log, gives back the partial files and snapshots again.
    SnapshotDiskFull,
    /// Add a learner and SIGKILL the leader while the learner is receiving its snapshot: a new
    /// leader must bring it up to date.
    KillLeaderDuringSnapshot,
    /// Flip one bit of a stopped follower's closed WAL segment (`wal`) or snapshot files
    /// (`snapshot`): it must refuse to start and name the damaged file; it is replaced by a new
    /// member while the cluster serves.
    BitFlip(&'static str),
    /// Restart a follower with its wall clock under libfaketime, make it the leader, and move
    /// its clock an hour forward, an hour back, then right again: nothing may depend on it.
    ClockJump,
}

/// Every fault, as the smoke matrix and the campaign run them.
pub const ALL: &[Fault] = &[
    Fault::KillLeader,
    Fault::PauseLeader,
    Fault::IsolateLeader,
    Fault::PartitionMinority,
    Fault::PartitionLeaderInMinority,
    Fault::SlowLinks,
    Fault::LossyLinks,
    Fault::SnapshotCatchUp,
    Fault::Crash("wal::before_write"),
    Fault::Crash("wal::before_sync"),
    Fault::Crash("wal::after_sync"),
    Fault::Crash("snapshot::before_save"),
    Fault::Crash("snapshot::after_save"),
    Fault::Crash("snapshot::before_apply"),
    Fault::Crash("snapshot::after_apply"),
    Fault::Crash("apply::before_entry"),
    Fault::DiskError("wal::before_write"),
    Fault::DiskError("wal::before_sync"),
    Fault::MembershipWhileSlow,
    Fault::PartitionDuringMembership,
    Fault::KillDuringRemoval,
    Fault::SnapshotDiskFull,
    Fault::KillLeaderDuringSnapshot,
    Fault::BitFlip("wal"),
    Fault::BitFlip("snapshot"),
    Fault::ClockJump,
];

impl fmt::Display for Fault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Fault::Crash(fp) => write!(f, "crash@{fp}"),
            Fault::DiskError(fp) => write!(f, "disk-error@{fp}"),
            Fault::BitFlip(what) => write!(f, "bitflip@{what}"),
            other => write!(f, "{}", format!("{other:?}").to_lowercase()),
        }
    }
}

impl Fault {
    /// Whether the fault means anything on a cluster of `n` (a partition needs two sides).
    pub fn applies_to(&self, n: usize) -> bool {
        match self {
            Fault::PartitionMinority
            | Fault::PartitionLeaderInMinority
            | Fault::SnapshotCatchUp
            | Fault::PartitionDuringMembership
            | Fault::KillDuringRemoval
            | Fault::KillLeaderDuringSnapshot
            | Fault::BitFlip(_) => n >= 3,
            Fault::ClockJump => n >= 2,
            Fault::IsolateLeader | Fault::SlowLinks | Fault::LossyLinks => n >= 2,
            Fault::Crash(fp) if fp.contains("_apply") && fp.starts_with("snapshot") => n >= 2,
            _ => true,
        }
    }
}

/// Phases of a run.
const WARM_UP: Duration = Duration::from_millis(1500);
pub const FAULT_HOLD: Duration = Duration::from_secs(3);
const AFTER_HEAL: Duration = Duration::from_millis(1500);
/// Steps the linearizability search may take per key before giving up.
pub const CHECK_BUDGET: u64 = 20_000_000;

/// What one run found.
#[derive(Debug, Clone)]
pub struct RunReport {
    pub ok: usize,
    pub fail: usize,
    pub unknown: usize,
    pub keys_checked: usize,
    /// Changes the watchers received, and the streams they opened (resumptions included).
    pub watched: usize,
    pub watch_sessions: usize,
    pub anomalies: Vec<String>,
    pub proof: String,
    pub recovery: Duration,
    pub history: Option<std::path::PathBuf>,
}

fn count(ops: &[Op]) -> (usize, usize, usize) {
    let mut c = (0, 0, 0);
    for op in ops {
        match op.outcome {
            Outcome::Fail { .. } | Outcome::CasFailed { .. } => c.1 += 1,
            Outcome::Unknown { .. } => c.2 += 1,
            _ => c.0 += 1,
        }
    }
    c
}

/// Runs one fault on a fresh cluster of `size`.
pub async fn run(fault: Fault, size: usize, seed: u64) -> Result<RunReport> {
    let mut c = FaultCluster::start(size).await.context("forming the cluster")?;
    let result = run_on(&mut c, fault, size, seed).await;
    if result.as_ref().map_or(true, |r| !r.anomalies.is_empty()) {
        c.dump_logs();
    }
    if result.is_err() {
        // The members' whole logs, for a run that could not finish (a tail rarely says why).
        let name = run_name(fault, size, seed);
        if save_member_logs(&c, &name).is_ok() {
            eprintln!(
                "members' logs: {}/{name}.member-*.log",
                super::history::histories_dir().display()
            );
        }
    }
    let stopped = c.shutdown().await;
    let report = result?;
    stopped.context("stopping the cluster")?;
    Ok(report)
}

/// What a run's files in the histories directory are named after.
fn run_name(fault: Fault, size: usize, seed: u64) -> String {
    format!("{}-n{size}-seed{seed}", fault.to_string().replace([':', '@'], "_"))
}

/// Copies every member's log to `<histories>/<name>.member-<id>.log`, as many as can be; fails
/// only when there is no directory to copy them to.
fn save_member_logs(c: &FaultCluster, name: &str) -> std::io::Result<()> {
    let dir = super::history::histories_dir();
    std::fs::create_dir_all(&dir)?;
    for m in &c.members {
        let _ = std::fs::copy(&m.log, dir.join(format!("{name}.member-{}.log", m.id)));
    }
    Ok(())
}

async fn run_on(c: &mut FaultCluster, fault: Fault, size: usize, seed: u64) -> Result<RunReport> {
    c.wait_healthy().await.context("health before the fault")?;
    let recorder = Recorder::new();
    let targets: Targets = std::sync::Arc::new(parking_lot::RwLock::new(c.members.iter().map(|m| m.url()).collect()));
    let stop = CancellationToken::new();
    let clients = tokio::spawn(workload::run(targets.clone(), recorder.clone(), stop.clone(), seed));
    // Watchers on every member (see `watchers::specs`).
    let (watch_done, watch_done_rx) = tokio::sync::watch::channel(None);
    let specs = watchers::specs(c.members.len());
    let watch_logs: Vec<std::sync::Arc<parking_lot::Mutex<WatchLog>>> =
        specs.iter().map(|_| Default::default()).collect();
    let watcher_tasks: Vec<_> = specs
        .iter()
        .zip(&watch_logs)
        .map(|(spec, log)| {
            tokio::spawn(watchers::run(
                *spec,
                targets.clone(),
                watch_done_rx.clone(),
                log.clone(),
            ))
        })
        .collect();
    tokio::time::sleep(WARM_UP).await;

    let injected = inject(c, fault, &recorder).await;
    let healed_at = Instant::now();
    recorder.event("healed");
    // Recovery: every live member healthy again and a write acknowledged.
    let recovered = async {
        let leader = c.wait_healthy().await.context("health after healing")?;
        let url = c.members[leader].url();
        let http = c.http.clone();
        wait_until("a write after healing", RECOVERY_DEADLINE, || {
            let (http, url) = (http.clone(), url.clone());
            async move {
                matches!(
                    workload::write(&http, &url, HARNESS_KEY, 1, None).await,
                    Outcome::Written { .. }
                )
                .then_some(())
            }
        })
        .await
    }
    .await;
    let recovery = healed_at.elapsed();
    tokio::time::sleep(AFTER_HEAL).await;
    stop.cancel();
    let _ = clients.await;
    let proof = injected?;
    recovered?;
    recorder.event(format!("recovered after {} ms", recovery.as_millis()));

    let mut anomalies = Vec::new();
    final_checks(c, &recorder, &mut anomalies).await?;
    let ops = recorder.ops();
    // Watchers: each must reach the last revision, then every stream is checked against the
    // history every live member replays.
    let live = c.live();
    let upto = c.status_max(&live, "applied_index").await;
    watch_done.send_replace(Some(upto));
    for task in watcher_tasks {
        let abort = task.abort_handle();
        if tokio::time::timeout(RECOVERY_DEADLINE, task).await.is_err() {
            abort.abort();
        }
    }
    let mut references = Vec::new();
    for &i in &live {
        match watchers::reference(&c.members[i].url(), upto).await {
            Ok(r) => references.push((c.members[i].id, r)),
            Err(e) => anomalies.push(format!("member {} could not replay the history: {e}", c.members[i].id)),
        }
    }
    let watch_logs: Vec<WatchLog> = watch_logs.iter().map(|l| l.lock().clone()).collect();
    anomalies.extend(watchers::check(&references, &watch_logs, &ops, upto));
    let watched = watch_logs.iter().map(|l| l.seen.len()).sum();
    let watch_sessions = watch_logs.iter().map(|l| l.sessions).sum();
    let register_keys: Vec<String> = (0..REGISTER_KEYS).map(workload::register_key).collect();
    let checked = checker::check(&ops, &register_keys, CHECK_BUDGET);
    anomalies.extend(checked.anomalies);
    let (ok, fail, unknown) = count(&ops);
    let history = if !anomalies.is_empty() || std::env::var_os("RAFTKV_FAULT_KEEP_HISTORIES").is_some() {
        let name = run_name(fault, size, seed);
        let run =
            json!({"fault": fault.to_string(), "size": size, "seed": seed, "anomalies": anomalies, "proof": proof});
        let path = recorder.write(&name, run)?;
        // The members' own logs go beside the history: what each member decided, and when.
        let _ = save_member_logs(c, &name);
        Some(path)
    } else {
        None
    };
    Ok(RunReport {
        ok,
        fail,
        unknown,
        keys_checked: checked.keys_checked,
        watched,
        watch_sessions,
        anomalies,
        proof,
        recovery,
        history,
    })
}

/// Injects `fault`, holds it, heals it; returns the proof that it fired.
async fn inject(c: &mut FaultCluster, fault: Fault, recorder: &Recorder) -> Result<String> {
    let leader = c.wait_healthy().await?;
    let leader_id = c.members[leader].id;
    let others: Vec<usize> = c.live().into_iter().filter(|&i| i != leader).collect();
    recorder.event(format!("inject {fault} (leader {leader_id})"));
    let before = c.proxy_counters();
    match fault {
        Fault::KillLeader => {
            c.members[leader].sigkill();
            let status = c.wait_exit(leader, "the killed member to exit").await?;
            let moved = hold_and_watch_leader(c, &others, leader_id).await;
            c.members[leader].restart().await?;
            use std::os::unix::process::ExitStatusExt;
            if status.signal() != Some(9) {
                bail!("the member exited with {status}, not SIGKILL");
            }
            Ok(format!("exit by SIGKILL; {}", moved))
        }
        Fault::PauseLeader => {
            c.members[leader].signal(Signal::SIGSTOP)?;
            let pid = c.members[leader].pid().context("pid")?;
            // The signal is delivered asynchronously: wait for the stopped state.
            let stopped = wait_until("the member to stop", Duration::from_secs(5), || async move {
                std::fs::read_to_string(format!("/proc/{pid}/stat"))
                    .ok()
                    .and_then(|s| s.rsplit_once(')').map(|(_, r)| r.trim_start().starts_with('T')))
                    .unwrap_or(false)
                    .then_some(())
            })
            .await
            .is_ok();
            let moved = hold_and_watch_leader(c, &others, leader_id).await;
            c.members[leader].signal(Signal::SIGCONT)?;
            if !stopped {
                bail!("the member was not stopped by SIGSTOP");
            }
            Ok(format!("process state T while paused; {moved}"))
        }
        Fault::IsolateLeader | Fault::PartitionLeaderInMinority | Fault::PartitionMinority => {
            let n = c.live().len();
            let minority_size = (n - 1) / 2;
            let (minority, majority): (Vec<usize>, Vec<usize>) = match fault {
                Fault::IsolateLeader => (vec![leader], others.clone()),
                Fault::PartitionLeaderInMinority => {
                    let mut m = vec![leader];
                    m.extend(others.iter().take(minority_size.saturating_sub(1)));
                    let rest = others.iter().copied().filter(|i| !m.contains(i)).collect();
                    (m, rest)
                }
                _ => {
                    let m: Vec<usize> = others.iter().copied().take(minority_size.max(1)).collect();
                    let rest = c.live().into_iter().filter(|i| !m.contains(i)).collect();
                    (m, rest)
                }
            };
            recorder.event(format!("partition {minority:?} | {majority:?}"));
            c.partition(&[minority.clone(), majority.clone()]);
            let moved = hold_and_watch_leader(c, &majority, leader_id).await;
            c.heal();
            let dropped = c.proxy_counters()[1] - before[1];
            if dropped == 0 {
                bail!("the proxies dropped nothing");
            }
            let leader_in_minority = minority.contains(&leader);
            if leader_in_minority && !moved.starts_with("leader moved") {
                bail!("the majority side never elected a new leader: {moved}");
            }
            Ok(format!("{dropped} bytes dropped; {moved}"))
        }
        Fault::SlowLinks | Fault::LossyLinks => {
            let rule = if fault == Fault::SlowLinks {
                LinkRule::Delay {
                    mean: Duration::from_millis(75),
                    jitter: Duration::from_millis(50),
                }
            } else {
                LinkRule::Drop { share: 0.05 }
            };
            c.set_all_links(rule);
            tokio::time::sleep(FAULT_HOLD).await;
            c.heal();
            let after = c.proxy_counters();
            let (delayed, reset) = (after[2] - before[2], after[3] - before[3]);
            if (fault == Fault::SlowLinks && delayed == 0) || (fault == Fault::LossyLinks && reset == 0) {
                bail!("the proxies did nothing: {delayed} chunks delayed, {reset} connections reset");
            }
            Ok(format!("{delayed} chunks delayed, {reset} connections reset"))
        }
        Fault::SnapshotCatchUp => {
            let follower = others[0];
            let applied_before = c
                .metric(follower, "raftkv_snapshots_applied_total")
                .await
                .unwrap_or(0.0);
            let isolated_at = status_u64(c, follower, "applied_index").await.unwrap_or(0);
            let rest: Vec<usize> = c.live().into_iter().filter(|&i| i != follower).collect();
            c.partition(&[vec![follower], rest]);
            compact_past(
                c,
                &[leader],
                isolated_at,
                "the leader to compact past the isolated follower",
            )
            .await?;
            c.heal();
            wait_until("the follower to install a snapshot", RECOVERY_DEADLINE, || async {
                let n = c.metric(follower, "raftkv_snapshots_applied_total").await?;
                (n > applied_before).then_some(())
            })
            .await?;
            Ok(format!("member {} caught up from a snapshot", c.members[follower].id))
        }
        Fault::Crash(fp) | Fault::DiskError(fp) => {
            // Snapshot reception needs a member that fell behind; anything else fires on the
            // leader as it works.
            let needs_snapshot = fp.starts_with("snapshot::") && fp.ends_with("_apply");
            let target = if needs_snapshot { others[0] } else { leader };
            let action = if matches!(fault, Fault::Crash(_)) {
                "panic"
            } else {
                "return"
            };
            c.stop_member(target).await?;
            if needs_snapshot {
                let rest: Vec<usize> = c.live();
                let floor = c.status_max(&rest, "applied_index").await;
                // Every other member, not just one, must have compacted past it: whichever
                // leads when it returns must send a snapshot rather than entries.
                compact_past(c, &rest, floor, "the cluster to compact past the stopped member").await?;
            }
            recorder.event(format!(
                "restart member {} with FAILPOINTS={fp}={action}",
                c.members[target].id
            ));
            // It may exit before it listens: the exit is what is waited for.
            let _ = c.members[target]
                .restart_with_env(vec![("FAILPOINTS".into(), format!("{fp}={action}"))])
                .await;
            let status = c.wait_exit(target, "the fail point to fire").await?;
            let log = std::fs::read_to_string(&c.members[target].log).unwrap_or_default();
            let fired = if action == "panic" {
                log.contains(&format!("failpoint {fp} panic"))
            } else {
                log.contains("injected by a fail point")
            };
            if !fired {
                bail!("member exited with {status} but the log shows no {fp} fault");
            }
            recorder.event(format!("member {} exited with {status}", c.members[target].id));
            c.members[target].restart().await?;
            Ok(format!("member {} exited with {status} at {fp}", c.members[target].id))
        }
        Fault::MembershipWhileSlow => {
            c.set_all_links(LinkRule::Delay {
                mean: Duration::from_millis(75),
                jitter: Duration::from_millis(50),
            });
            let new = c.spawn_member().await?;
            c.add_and_promote(new).await?;
            recorder.event(format!("member {} added and promoted", c.members[new].id));
            let mut removed = None;
            if let Some(&victim) = others.first() {
                let id = c.members[victim].id;
                let via: Vec<usize> = c.live().into_iter().filter(|&i| i != victim).collect();
                c.admin(
                    "remove",
                    &via,
                    &format!("/v1/members/{id}"),
                    reqwest::Method::DELETE,
                    None,
                )
                .await?;
                recorder.event(format!("member {id} removed"));
                removed = Some(victim);
            }
            c.heal();
            if let Some(victim) = removed {
                // The removed member learns of its removal and stops serving; then it is stopped.
                c.wait_removed(victim).await?;
                c.stop_member(victim).await?;
            }
            Ok(format!(
                "member {} joined as a voter{}",
                c.members[new].id,
                removed.map_or(String::new(), |v| format!(", member {} removed", c.members[v].id))
            ))
        }
        Fault::PartitionDuringMembership => {
            let new = c.spawn_member().await?;
            let id = c.members[new].id;
            let view = &*c;
            view.add_learner(new).await?;
            let mut rest = others.clone();
            rest.push(new);
            recorder.event(format!(
                "member {id} added as a learner; partition [{leader}] | {rest:?}"
            ));
            // The promotion is asked for as the leader is cut off: it lands on the old leader (and
            // times out there) or on the majority once it elected a leader and the learner caught
            // up from it.
            view.partition(&[vec![leader], rest.clone()]);
            let (promoted, moved) = tokio::join!(view.promote(new), hold_and_watch_leader(view, &rest, leader_id));
            view.heal();
            promoted?;
            recorder.event(format!("member {id} promoted"));
            if !moved.starts_with("leader moved") {
                bail!("the majority side never elected a new leader: {moved}");
            }
            Ok(format!("member {id} joined as a voter across the cut; {moved}"))
        }
        Fault::KillDuringRemoval => {
            let victim = others[0];
            let id = c.members[victim].id;
            let via: Vec<usize> = c.live().into_iter().filter(|&i| i != victim).collect();
            let view = &*c;
            recorder.event(format!("remove member {id} and kill it as the removal is proposed"));
            let (removed, ()) = tokio::join!(view.remove_member(victim, &via), async {
                view.members[victim].sigkill()
            });
            removed?;
            c.wait_exit(victim, "the killed member to exit").await?;
            recorder.event(format!("member {id} removed while killed"));
            removed_member_knows(c, victim).await
        }
        Fault::SnapshotDiskFull => damage::snapshot_disk_full(c, leader).await,
        Fault::KillLeaderDuringSnapshot => damage::kill_leader_during_snapshot(c, leader, &others, recorder).await,
        Fault::BitFlip(what) => damage::bit_flip(c, others[0], what, recorder).await,
        Fault::ClockJump => damage::clock_jump(c, others[0], recorder).await,
    }
}

/// The member's own verdict after it was removed while down: it either refuses to start (its
/// log already held the removal) or starts, hears from a peer that it was removed, and says so.
async fn removed_member_knows(c: &mut FaultCluster, victim: usize) -> Result<String> {
    let started = c.members[victim].restart().await.is_ok();
    let id = c.members[victim].id;
    let (http, url) = (c.http.clone(), format!("{}/v1/status", c.members[victim].url()));
    let verdict = wait_until("the removed member to know", RECOVERY_DEADLINE, || {
        let exited = c.members[victim].reap_exited();
        let (http, url) = (http.clone(), url.clone());
        async move {
            if let Some(status) = exited {
                return Some(format!("refused to start ({status})"));
            }
            let s: serde_json::Value = http.get(url).send().await.ok()?.json().await.ok()?;
            (s["membership"] == "removed").then(|| "reports removed".to_string())
        }
    })
    .await?;
    let log = std::fs::read_to_string(&c.members[victim].log).unwrap_or_default();
    if verdict.starts_with("refused") && !log.contains("removed") {
        bail!("member {id} exited on restart without saying it was removed");
    }
    if c.members[victim].is_running() {
        c.stop_member(victim).await?;
    }
    Ok(format!(
        "member {id} {verdict}{}",
        if started { "" } else { " at once" }
    ))
}

/// The key the harness itself writes (the recovery probe, compaction filler); the checks leave
/// it out, as no client of the recorded history writes it.
pub const HARNESS_KEY: &str = "recovery-probe";

/// Waits until every member of `group` has a snapshot more than the catch-up window past
/// `floor`, writing to [`HARNESS_KEY`] through `group` meanwhile. The clients alone may write
/// too slowly for the deadline: a third of their requests go to the member cut off and wait out
/// their deadline, and a member takes a snapshot only once its log since the last one is worth
/// a quarter of the snapshot (whose watch history grows with every write of the run).
async fn compact_past(c: &FaultCluster, group: &[usize], floor: u64, what: &str) -> Result<()> {
    let stop = CancellationToken::new();
    let filler = {
        let (http, stop) = (c.http.clone(), stop.clone());
        let urls: Vec<String> = group.iter().map(|&i| c.members[i].url()).collect();
        tokio::spawn(async move {
            let mut n = 0u64;
            while !stop.is_cancelled() {
                n += 1;
                let url = &urls[n as usize % urls.len()];
                tokio::select! {
                    _ = workload::write(&http, url, HARNESS_KEY, n, None) => {}
                    _ = stop.cancelled() => {}
                }
            }
        })
    };
    let compacted = wait_until(what, RECOVERY_DEADLINE, || async {
        let snap = c.status_min(group, "snapshot_index").await;
        (snap > floor + SNAPSHOT_CATCHUP + 5).then_some(())
    })
    .await;
    stop.cancel();
    let _ = filler.await;
    compacted
}

async fn status_u64(c: &FaultCluster, i: usize, field: &str) -> Option<u64> {
    c.status(i).await?[field].as_u64()
}

impl FaultCluster {
    /// `field` of each member of `group`, 0 for one that does not answer.
    async fn status_values(&self, group: &[usize], field: &str) -> Vec<u64> {
        let mut values = Vec::with_capacity(group.len());
        for &i in group {
            values.push(status_u64(self, i, field).await.unwrap_or(0));
        }
        values
    }

    /// The largest `field` among members `group`.
    async fn status_max(&self, group: &[usize], field: &str) -> u64 {
        self.status_values(group, field).await.into_iter().max().unwrap_or(0)
    }

    /// The smallest `field` among members `group` (0 when one does not answer).
    async fn status_min(&self, group: &[usize], field: &str) -> u64 {
        self.status_values(group, field).await.into_iter().min().unwrap_or(0)
    }
}

/// Holds the fault for `FAULT_HOLD`, watching whether `group` elects a leader other than `old`.
pub async fn hold_and_watch_leader(c: &FaultCluster, group: &[usize], old: u64) -> String {
    let until = Instant::now() + FAULT_HOLD;
    while Instant::now() < until {
        if !group.is_empty() {
            if let Some(new) = c.leader_seen_by(group).await {
                if new != old {
                    tokio::time::sleep_until(until).await;
                    return format!("leader moved from {old} to {new}");
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    format!("leader stayed {old}")
}

/// After healing: members converge, acknowledged appends are all there, membership and
/// configuration are as asked, and final linearizable reads join the history.
pub async fn final_checks(c: &mut FaultCluster, recorder: &Recorder, anomalies: &mut Vec<String>) -> Result<()> {
    let live = c.live();
    // Convergence: every live member's local copy ends identical.
    // Every key, page by page: a long run (the soak) writes more than one page holds.
    let listing = |i: usize| {
        let url = format!("{}/v1/kv", c.members[i].url());
        let http = c.http.clone();
        async move {
            let mut all = Vec::new();
            let mut after: Option<String> = None;
            loop {
                let mut query = vec![("stale", "true".to_string()), ("limit", "10000".to_string())];
                if let Some(k) = &after {
                    query.push(("start_after", k.clone()));
                }
                let v: serde_json::Value = http.get(&url).query(&query).send().await.ok()?.json().await.ok()?;
                let items = v["items"].as_array()?;
                after = items.last().and_then(|it| it["key"].as_str()).map(str::to_string);
                all.extend(items.iter().filter(|it| it["key"] != HARNESS_KEY).map(|it| {
                    (
                        it["key"].to_string(),
                        it["value"].to_string(),
                        it["revision"].as_u64().unwrap_or(0),
                    )
                }));
                if v["more"] != true || after.is_none() {
                    break;
                }
            }
            Some(all)
        }
    };
    let converged = wait_until("every member to converge", RECOVERY_DEADLINE, || async {
        let mut first = None;
        for &i in &live {
            let l = listing(i).await?;
            match &first {
                None => first = Some(l),
                Some(f) if *f == l => {}
                Some(_) => return None,
            }
        }
        first
    })
    .await;
    let state = match converged {
        Ok(s) => s,
        Err(e) => {
            anomalies.push(format!("members did not converge: {e}"));
            listing(live[0]).await.unwrap_or_default()
        }
    };
    // Every acknowledged append is present with its value; nothing appears that was never written.
    let present: BTreeMap<String, String> = state
        .iter()
        .filter(|(k, _, _)| k.trim_matches('"').starts_with(APPEND_PREFIX))
        .map(|(k, v, _)| (k.trim_matches('"').to_string(), v.trim_matches('"').to_string()))
        .collect();
    let mut attempted = BTreeSet::new();
    for op in recorder.ops() {
        if let (true, Request::Write { value }) = (op.key.starts_with(APPEND_PREFIX), &op.request) {
            attempted.insert(op.key.clone());
            let acked = matches!(op.outcome, Outcome::Written { .. });
            if acked && present.get(&op.key) != Some(&value.to_string()) {
                anomalies.push(format!("acknowledged write lost: {} (op {})", op.key, op.id));
            }
            if matches!(op.outcome, Outcome::Fail { .. }) && present.contains_key(&op.key) {
                anomalies.push(format!(
                    "a write refused as never proposed was applied: {} (op {})",
                    op.key, op.id
                ));
            }
        }
    }
    for k in present.keys() {
        if !attempted.contains(k) {
            anomalies.push(format!("key {k} present but never written"));
        }
    }
    // No joint configuration is left, and every member reports the same membership.
    let mut memberships = Vec::new();
    for &i in &live {
        let s = c.status(i).await.context("status")?;
        if s["joint"] != false {
            anomalies.push(format!("member {} still in a joint configuration", c.members[i].id));
        }
        memberships.push(c.membership(i).await?);
    }
    let expected: BTreeMap<u64, String> = live.iter().map(|&i| (c.members[i].id, "voter".to_string())).collect();
    for (m, &i) in memberships.iter().zip(&live) {
        if *m != expected {
            anomalies.push(format!(
                "member {} reports membership {m:?}, expected {expected:?}",
                c.members[i].id
            ));
        }
    }
    // Final linearizable reads of every register through every member.
    let http = c.http.clone();
    for &i in &live {
        for k in 0..REGISTER_KEYS {
            let key = workload::register_key(k);
            let t0 = recorder.now_ns();
            let outcome = workload::read(&http, &c.members[i].url(), &key, false).await;
            if let Outcome::Fail { reason } = &outcome {
                anomalies.push(format!(
                    "final read of {key} on member {} failed: {reason}",
                    c.members[i].id
                ));
            }
            recorder.record(usize::MAX, i, &key, Request::Read, t0, outcome);
        }
    }
    Ok(())
}
