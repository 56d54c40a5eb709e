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
const FAULT_HOLD: Duration = Duration::from_secs(3);
const AFTER_HEAL: Duration = Duration::from_millis(1500);
/// Steps the linearizability search may take per key before giving up.
const CHECK_BUDGET: u64 = 20_000_000;

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
                    workload::write(&http, &url, "recovery-probe", 1, None).await,
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
            wait_until(
                "the leader to compact past the isolated follower",
                RECOVERY_DEADLINE,
                || async {
                    let snap = status_u64(c, leader, "snapshot_index").await?;
                    (snap > isolated_at + SNAPSHOT_CATCHUP + 5).then_some(())
                },
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
                wait_until(
                    "the cluster to compact past the stopped member",
                    RECOVERY_DEADLINE,
                    || async {
                        let snap = c.status_min(&rest, "snapshot_index").await;
                        (snap > floor + SNAPSHOT_CATCHUP + 5).then_some(())
                    },
                )
                .await?;
            }
            c.members[target].env = vec![("FAILPOINTS".into(), format!("{fp}={action}"))];
            recorder.event(format!(
                "restart member {} with FAILPOINTS={fp}={action}",
                c.members[target].id
            ));
            let _ = c.members[target].restart().await;
            let status = c.wait_exit(target, "the fail point to fire").await?;
            c.members[target].env.clear();
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
                wait_until("the removed member to know", RECOVERY_DEADLINE, || async {
                    (c.status(victim).await?["membership"] == "removed").then_some(())
                })
                .await?;
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
            let path = format!("/v1/members/{id}");
            let (removed, ()) = tokio::join!(
                view.admin_settled(
                    "remove",
                    &via,
                    &path,
                    reqwest::Method::DELETE,
                    None,
                    &["not_member", "id_removed"],
                ),
                async { view.members[victim].sigkill() }
            );
            removed?;
            c.wait_exit(victim, "the killed member to exit").await?;
            recorder.event(format!("member {id} removed while killed"));
            removed_member_knows(c, victim).await
        }
        Fault::SnapshotDiskFull => snapshot_disk_full(c, leader).await,
        Fault::KillLeaderDuringSnapshot => kill_leader_during_snapshot(c, leader, &others, recorder).await,
        Fault::BitFlip(what) => bit_flip(c, others[0], what, recorder).await,
        Fault::ClockJump => clock_jump(c, others[0], recorder).await,
    }
}

/// Seconds between the timestamp opening a member's log line and the host's clock now.
fn log_skew(line: &str) -> Option<i64> {
    // The timestamp is the first word once the colour codes are gone.
    let mut plain = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(ch) = chars.next() {
        if ch == '\x1b' {
            chars.by_ref().find(|&c| c == 'm');
        } else {
            plain.push(ch);
        }
    }
    let theirs = humantime::parse_rfc3339(plain.split_whitespace().next()?).ok()?;
    let now = std::time::SystemTime::now();
    Some(match theirs.duration_since(now) {
        Ok(ahead) => ahead.as_secs() as i64,
        Err(behind) => -(behind.duration().as_secs() as i64),
    })
}

/// Where libfaketime is: `RAFTKV_LIBFAKETIME`, or Debian's and other common places.
fn libfaketime() -> Result<std::path::PathBuf> {
    if let Some(p) = std::env::var_os("RAFTKV_LIBFAKETIME") {
        return Ok(p.into());
    }
    [
        "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1",
        "/usr/lib/aarch64-linux-gnu/faketime/libfaketime.so.1",
        "/usr/lib/faketime/libfaketime.so.1",
        "/usr/local/lib/faketime/libfaketime.so.1",
    ]
    .iter()
    .map(std::path::PathBuf::from)
    .find(|p| p.exists())
    .context("the clockjump fault needs libfaketime: apt-get install libfaketime, or set RAFTKV_LIBFAKETIME")
}

/// Moves the wall clock of member `target` (a follower, made leader first) an hour forward,
/// an hour back and right again, each seen in the `Date` it answers with, while it serves.
async fn clock_jump(c: &mut FaultCluster, target: usize, recorder: &Recorder) -> Result<String> {
    let lib = libfaketime()?;
    let id = c.members[target].id;
    // libfaketime re-reads this file at most once a second; only the wall clock is moved
    // (a monotonic clock never jumps on a real machine).
    let clock = c.root.path().join(format!("clock-{id}"));
    std::fs::write(&clock, "+0\n")?;
    c.stop_member(target).await?;
    c.members[target].env = vec![
        ("LD_PRELOAD".into(), lib.display().to_string()),
        ("FAKETIME_TIMESTAMP_FILE".into(), clock.display().to_string()),
        ("FAKETIME_DONT_FAKE_MONOTONIC".into(), "1".into()),
        ("FAKETIME_CACHE_DURATION".into(), "1".into()),
    ];
    let started = c.members[target].restart().await;
    c.members[target].env.clear();
    started?;
    c.wait_healthy().await?;
    let via = c.live();
    c.admin(
        "transfer leadership to the member whose clock will jump",
        &via,
        "/v1/leader",
        reqwest::Method::POST,
        Some(json!({ "id": id })),
    )
    .await?;
    let mut seen = Vec::new();
    for offset in [3600i64, -3600, 0] {
        let log_from = log_len(&c.members[target]);
        std::fs::write(&clock, format!("{offset:+}\n"))?;
        recorder.event(format!("member {id}: wall clock {offset:+} s"));
        // Its log's timestamps are its wall clock (the `Date` it answers with is not: hyper
        // keeps it until the clock passes the last one it sent, an hour after a jump back).
        let view = &*c;
        let skew = wait_until("the member's clock to move", RECOVERY_DEADLINE, || async {
            log_since(&view.members[target], log_from)
                .lines()
                .filter_map(log_skew)
                .find(|skew| (skew - offset).abs() < 60)
        })
        .await?;
        let leading = c.status(target).await.is_some_and(|s| s["leader_id"] == id);
        seen.push(format!("{skew:+} s{}", if leading { " leading" } else { "" }));
        // The jumped clock holds under load for a while before the next jump.
        tokio::time::sleep(FAULT_HOLD / 2).await;
    }
    if !c.members[target].is_running() {
        bail!("member {id} exited after its clock jumped");
    }
    Ok(format!("member {id} served with its wall clock at {}", seen.join(", ")))
}

/// Restarts the leader with `snapshot::write` failing three times; it must keep serving, count
/// each failure, remove each partial file, and write a snapshot once the disk "has room".
async fn snapshot_disk_full(c: &mut FaultCluster, target: usize) -> Result<String> {
    const FAILURES: u64 = 3;
    let id = c.members[target].id;
    c.stop_member(target).await?;
    let log_from = log_len(&c.members[target]);
    c.members[target].env = vec![("FAILPOINTS".into(), format!("snapshot::write={FAILURES}*return"))];
    let started = c.members[target].restart().await;
    c.members[target].env.clear();
    started?;
    let view = &*c;
    wait_until("failed snapshots, then one written", RECOVERY_DEADLINE, || async {
        let failed = view.metric(target, "raftkv_snapshot_failures_total").await?;
        let created = view.metric(target, "raftkv_snapshots_created_total").await?;
        (failed >= FAILURES as f64 && created >= 1.0).then_some(())
    })
    .await?;
    let injected = log_since(&c.members[target], log_from)
        .matches("snapshot failed; the log is kept")
        .count() as u64;
    if injected != FAILURES {
        bail!("member {id} logged {injected} failed snapshots, not {FAILURES}");
    }
    if !c.members[target].is_running() {
        bail!("member {id} stopped after a failed snapshot");
    }
    // A partial file would keep a full disk full: none may stay (one being written may come and go).
    let snap_dir = c.members[target].dir.join("snap");
    wait_until("no partial snapshot file", RECOVERY_DEADLINE, || async {
        let partial = std::fs::read_dir(&snap_dir)
            .ok()?
            .filter_map(|e| e.ok())
            .any(|e| e.file_name().to_string_lossy().ends_with(".tmp"));
        (!partial).then_some(())
    })
    .await?;
    Ok(format!(
        "member {id}: {FAILURES} snapshots failed with ENOSPC, then one was written; it served throughout"
    ))
}

/// Adds a learner whose snapshot reception is held 3 s by a fail point and SIGKILLs the leader
/// during it; another leader must bring the learner up to date before it is promoted.
async fn kill_leader_during_snapshot(
    c: &mut FaultCluster,
    leader: usize,
    others: &[usize],
    recorder: &Recorder,
) -> Result<String> {
    let leader_id = c.members[leader].id;
    let new = c.spawn_member().await?;
    let id = c.members[new].id;
    // The fail point must be armed from the start: restart the (still empty) member with it.
    c.stop_member(new).await?;
    c.members[new].env = vec![("FAILPOINTS".into(), "snapshot::receive=1*return(3000)".into())];
    let started = c.members[new].restart().await;
    c.members[new].env.clear();
    started?;
    let log_from = log_len(&c.members[new]);
    c.add_learner(new).await?;
    let view = &*c;
    wait_until("the learner to be receiving a snapshot", RECOVERY_DEADLINE, || async {
        log_since(&view.members[new], log_from)
            .contains("snapshot reception held by a fail point")
            .then_some(())
    })
    .await?;
    recorder.event(format!("kill leader {leader_id} while member {id} receives a snapshot"));
    c.members[leader].sigkill();
    c.wait_exit(leader, "the killed leader to exit").await?;
    let moved = hold_and_watch_leader(c, others, leader_id).await;
    c.members[leader].restart().await?;
    let view = &*c;
    wait_until("the learner to install a snapshot", RECOVERY_DEADLINE, || async {
        let n = view.metric(new, "raftkv_snapshots_applied_total").await?;
        (n >= 1.0).then_some(())
    })
    .await?;
    c.promote(new).await?;
    recorder.event(format!("member {id} promoted"));
    if !moved.starts_with("leader moved") {
        bail!("no other leader was elected while the leader was down: {moved}");
    }
    Ok(format!(
        "leader killed during member {id}'s snapshot reception; it installed one and became a voter; {moved}"
    ))
}

/// Flips a bit in a stopped follower's closed WAL segment or snapshot files, expects it to refuse
/// to start naming the file, leaves the damage as found, and replaces the member.
async fn bit_flip(c: &mut FaultCluster, victim: usize, what: &str, recorder: &Recorder) -> Result<String> {
    let id = c.members[victim].id;
    let dir = c.members[victim].dir.clone();
    // A closed segment exists once the log rotated and the next snapshot has not released it:
    // stop the member at such a moment (segments are 4 KiB here).
    let mut damaged = Vec::new();
    for _ in 0..10 {
        if what == "wal" {
            let view = &*c;
            let _ = wait_until("a closed WAL segment", RECOVERY_DEADLINE, || async {
                (files(&view.members[victim].dir.join("wal"), ".wal").len() >= 2).then_some(())
            })
            .await;
        }
        c.stop_member(victim).await?;
        damaged = match what {
            // The newest closed segment: its records are all needed or covered by a snapshot.
            "wal" => {
                let segments = files(&dir.join("wal"), ".wal");
                segments.iter().rev().nth(1).cloned().into_iter().collect()
            }
            // Every snapshot file: whichever the log names as current is damaged.
            _ => files(&dir.join("snap"), ".snap"),
        };
        if !damaged.is_empty() {
            break;
        }
        c.members[victim].restart().await?;
    }
    if damaged.is_empty() {
        bail!("member {id} never had a {what} file to damage");
    }
    let mut flipped = Vec::new();
    for path in &damaged {
        let mut bytes = std::fs::read(path)?;
        let offset = bytes.len() / 2;
        bytes[offset] ^= 0x10;
        std::fs::write(path, &bytes)?;
        flipped.push((path.clone(), offset, bytes[offset]));
    }
    recorder.event(format!(
        "member {id}: flipped a bit in {} {what} file(s)",
        flipped.len()
    ));
    let log_from = log_len(&c.members[victim]);
    let _ = c.members[victim].restart().await;
    let status = c.wait_exit(victim, "the damaged member to refuse to start").await?;
    let said = log_since(&c.members[victim], log_from);
    if status.success() {
        bail!("member {id} exited with success on damaged data");
    }
    let named = flipped
        .iter()
        .find(|(path, _, _)| said.contains(&path.display().to_string()));
    let Some((path, offset, _)) = named else {
        bail!("member {id} exited with {status} without naming a damaged file: {said}");
    };
    if what == "wal" && !said.contains("is corrupt at offset") {
        bail!("member {id} named {} but no offset: {said}", path.display());
    }
    for (path, offset, byte) in &flipped {
        if std::fs::read(path)?.get(*offset) != Some(byte) {
            bail!("{} was changed by the member that refused it", path.display());
        }
    }
    // Replace it as an operator would: remove it, add a fresh member.
    let via: Vec<usize> = c.live();
    c.admin_settled(
        "remove the damaged member",
        &via,
        &format!("/v1/members/{id}"),
        reqwest::Method::DELETE,
        None,
        &["not_member", "id_removed"],
    )
    .await?;
    let new = c.spawn_member().await?;
    c.add_and_promote(new).await?;
    recorder.event(format!("member {id} replaced by member {}", c.members[new].id));
    let name = path
        .file_name()
        .map_or(String::new(), |n| n.to_string_lossy().into_owned());
    Ok(format!(
        "member {id} refused to start ({status}) naming {name} (bit flipped at byte {offset}); replaced by member {}",
        c.members[new].id
    ))
}

/// The files in `dir` whose names end with `suffix`, sorted by name.
fn files(dir: &std::path::Path, suffix: &str) -> Vec<std::path::PathBuf> {
    let mut out: Vec<_> = std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .filter_map(|e| e.ok())
                .map(|e| e.path())
                .filter(|p| p.to_string_lossy().ends_with(suffix))
                .collect()
        })
        .unwrap_or_default();
    out.sort();
    out
}

fn log_len(m: &crate::support::Member) -> u64 {
    std::fs::metadata(&m.log).map_or(0, |md| md.len())
}

/// What member `m` logged after byte `from` of its log.
fn log_since(m: &crate::support::Member, from: u64) -> String {
    let bytes = std::fs::read(&m.log).unwrap_or_default();
    String::from_utf8_lossy(bytes.get(from as usize..).unwrap_or_default()).into_owned()
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
async fn hold_and_watch_leader(c: &FaultCluster, group: &[usize], old: u64) -> String {
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
async fn final_checks(c: &mut FaultCluster, recorder: &Recorder, anomalies: &mut Vec<String>) -> Result<()> {
    let live = c.live();
    // Convergence: every live member's local copy ends identical.
    let listing = |i: usize| {
        let url = format!("{}/v1/kv?stale=true&limit=10000", c.members[i].url());
        let http = c.http.clone();
        async move {
            let v: serde_json::Value = http.get(url).send().await.ok()?.json().await.ok()?;
            let items = v["items"].as_array()?.clone();
            Some(
                items
                    .into_iter()
                    .filter(|it| it["key"] != "recovery-probe")
                    .map(|it| {
                        (
                            it["key"].to_string(),
                            it["value"].to_string(),
                            it["revision"].as_u64().unwrap_or(0),
                        )
                    })
                    .collect::<Vec<_>>(),
            )
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
