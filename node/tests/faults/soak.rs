//! The soak: a three-member cluster under a paced mixed load at about 70% of what the same
//! clients reach unpaced, a leader SIGKILLed every 2 minutes and a member replaced every 5, for
//! `minutes`. Every minute it prints each member's resident memory and open file descriptors and
//! the minute's p99; at the end the whole history is checked as a fault run's is.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::checker;
use super::cluster::{FaultCluster, RECOVERY_DEADLINE};
use super::history::{Op, Outcome, Recorder};
use super::nemesis::{final_checks, CHECK_BUDGET};
use super::workload::{self, Shape, Targets, REGISTER_KEYS};
use crate::support::wait_until;

/// Clients of the soak's load.
const CLIENTS: usize = 16;
/// Share of the measured capacity the soak runs at.
const LOAD_SHARE: f64 = 0.7;
const CAPACITY_PROBE: Duration = Duration::from_secs(10);
const KILL_EVERY_MINUTES: u64 = 2;
const REPLACE_EVERY_MINUTES: u64 = 5;

/// One minute's figures.
#[derive(Debug)]
pub struct Minute {
    pub minute: u64,
    /// (member id, resident kB, open fds) of every running member at the minute's end.
    pub members: Vec<(u64, u64, u64)>,
    pub events: Vec<String>,
}

/// What the soak found.
#[derive(Debug)]
pub struct SoakReport {
    pub capacity: f64,
    pub rate: f64,
    pub minutes: Vec<Minute>,
    pub ops: Vec<Op>,
    pub keys_checked: usize,
    pub anomalies: Vec<String>,
}

/// Changes each member's watch history keeps: reached within the first minute or two, so the
/// history is at its bound for the rest of the soak and memory that still grows is a leak (the
/// default, 100,000, would take a quarter of an hour to fill at this load).
const WATCH_HISTORY: &str = "10000";

pub async fn run(minutes: u64, seed: u64) -> Result<SoakReport> {
    let mut c = FaultCluster::start_with(3, &["--watch-history-changes", WATCH_HISTORY])
        .await
        .context("forming the cluster")?;
    let result = soak_on(&mut c, minutes, seed).await;
    if result.as_ref().map_or(true, |r| !r.anomalies.is_empty()) {
        c.dump_logs();
    }
    let stopped = c.shutdown().await;
    let report = result?;
    stopped.context("stopping the cluster")?;
    Ok(report)
}

async fn soak_on(c: &mut FaultCluster, minutes: u64, seed: u64) -> Result<SoakReport> {
    c.wait_healthy().await?;
    let recorder = Recorder::new();
    let targets: Targets = Arc::new(parking_lot::RwLock::new(c.members.iter().map(|m| m.url()).collect()));
    let epoch = Arc::new(AtomicU64::new(0));
    let mut register_keys = Vec::new();

    // Capacity: what the same clients reach back to back.
    let shape = Shape {
        clients: CLIENTS,
        interval: None,
        epoch: Some(epoch.clone()),
        first_seq: 0,
    };
    register_keys.extend((0..REGISTER_KEYS).map(|i| shape.register_key(i)));
    let stop = CancellationToken::new();
    let probe = tokio::spawn(workload::run_shaped(
        targets.clone(),
        recorder.clone(),
        stop.clone(),
        seed,
        shape.clone(),
    ));
    tokio::time::sleep(CAPACITY_PROBE).await;
    stop.cancel();
    let _ = probe.await;
    let done = recorder.ops().iter().filter(|op| ok(op)).count();
    recorder.event(format!("capacity probe: {done} operations answered"));
    let capacity = done as f64 / CAPACITY_PROBE.as_secs_f64();
    let rate = capacity * LOAD_SHARE;
    if rate < 1.0 {
        bail!("the cluster did {done} operations in {CAPACITY_PROBE:?}");
    }
    eprintln!("capacity {capacity:.0} ops/s with {CLIENTS} clients back to back; the soak runs at {rate:.0} ops/s");

    let stop = CancellationToken::new();
    // Values are unique per register (the checker's rule): the paced clients number theirs
    // after the probe's, and write to registers of their own.
    epoch.store(1, Ordering::Relaxed);
    let paced = Shape {
        interval: Some(Duration::from_secs_f64(CLIENTS as f64 / rate)),
        first_seq: 500_000,
        ..shape.clone()
    };
    register_keys.extend((0..REGISTER_KEYS).map(|i| paced.register_key(i)));
    let clients = tokio::spawn(workload::run_shaped(
        targets.clone(),
        recorder.clone(),
        stop.clone(),
        seed.wrapping_add(1),
        paced.clone(),
    ));
    let started = Instant::now();
    let mut report_minutes = Vec::new();
    let mut failure = None;
    for minute in 1..=minutes {
        tokio::time::sleep_until(started + Duration::from_secs(60 * minute)).await;
        let mut events = Vec::new();
        let acted = async {
            if minute % KILL_EVERY_MINUTES == 0 {
                events.push(kill_leader(c, &recorder).await?);
            }
            if minute % REPLACE_EVERY_MINUTES == 0 {
                events.push(replace_follower(c, &targets, &recorder).await?);
            }
            anyhow::Ok(())
        }
        .await;
        // Fresh registers for the next minute: each register's history stays a minute long.
        epoch.store(minute + 1, Ordering::Relaxed);
        register_keys.extend((0..REGISTER_KEYS).map(|i| paced.register_key(i)));
        let mut members = Vec::new();
        for m in c.members.iter_mut() {
            if let (true, Some(pid)) = (m.is_running(), m.pid()) {
                if let Some((rss, fds)) = process_figures(pid) {
                    members.push((m.id, rss, fds));
                }
            }
        }
        let row = Minute {
            minute,
            members,
            events,
        };
        print_minute(&row, &recorder.ops(), started, &recorder);
        report_minutes.push(row);
        if let Err(e) = acted {
            failure = Some(e);
            break;
        }
    }
    stop.cancel();
    let _ = clients.await;
    if let Some(e) = failure {
        return Err(e);
    }

    let mut anomalies = Vec::new();
    final_checks(c, &recorder, &mut anomalies).await?;
    let ops = recorder.ops();
    let checked = checker::check(&ops, &register_keys, CHECK_BUDGET);
    anomalies.extend(checked.anomalies);
    Ok(SoakReport {
        capacity,
        rate,
        minutes: report_minutes,
        ops,
        keys_checked: checked.keys_checked,
        anomalies,
    })
}

/// Answered: read, written, or a compare-and-swap that definitely lost.
fn ok(op: &Op) -> bool {
    !matches!(op.outcome, Outcome::Fail { .. } | Outcome::Unknown { .. })
}

/// SIGKILLs the leader and restarts it on its data once the others elected another.
async fn kill_leader(c: &mut FaultCluster, recorder: &Recorder) -> Result<String> {
    let leader = c.wait_healthy().await?;
    let id = c.members[leader].id;
    recorder.event(format!("kill leader {id}"));
    c.members[leader].sigkill();
    c.wait_exit(leader, "the killed leader to exit").await?;
    let others: Vec<usize> = c.live();
    let view = &*c;
    let new = wait_until("another leader", RECOVERY_DEADLINE, || async {
        view.leader_seen_by(&others).await.filter(|&l| l != id)
    })
    .await?;
    c.members[leader].restart().await?;
    Ok(format!("leader {id} killed, {new} elected, {id} restarted"))
}

/// Adds a member and removes the oldest follower, as a rolling replacement does.
async fn replace_follower(c: &mut FaultCluster, targets: &Targets, recorder: &Recorder) -> Result<String> {
    let leader = c.wait_healthy().await?;
    let victim = c.live().into_iter().find(|&i| i != leader).context("no follower")?;
    let old = c.members[victim].id;
    let new = c.spawn_member().await?;
    targets.write().push(c.members[new].url());
    c.add_and_promote(new).await?;
    let via: Vec<usize> = c.live().into_iter().filter(|&i| i != victim).collect();
    c.remove_member(victim, &via).await?;
    c.wait_removed(victim).await?;
    targets.write()[victim] = String::new();
    c.stop_member(victim).await?;
    let id = c.members[new].id;
    recorder.event(format!("member {id} replaced member {old}"));
    Ok(format!("member {id} added, member {old} removed"))
}

/// Resident set (KiB) and open file descriptors of process `pid`.
fn process_figures(pid: i32) -> Option<(u64, u64)> {
    let rss = crate::support::vm_rss_kib(pid)?;
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?.count() as u64;
    Some((rss, fds))
}

/// The p99 latency, in milliseconds, of the operations answered among `ops`.
pub fn p99_ms(ops: &[&Op]) -> f64 {
    let mut latencies: Vec<u64> = ops
        .iter()
        .filter(|op| ok(op))
        .filter_map(|op| Some(op.complete_ns? - op.invoke_ns))
        .collect();
    if latencies.is_empty() {
        return 0.0;
    }
    latencies.sort_unstable();
    latencies[(latencies.len() * 99 / 100).min(latencies.len() - 1)] as f64 / 1e6
}

fn print_minute(row: &Minute, ops: &[Op], started: Instant, recorder: &Recorder) {
    // The recorder's clock started before the soak's: the minute's window in its terms.
    let offset = started.duration_since(recorder.start).as_nanos() as u64;
    let from = offset + (row.minute - 1) * 60_000_000_000;
    let to = from + 60_000_000_000;
    let in_minute: Vec<&Op> = ops
        .iter()
        .filter(|op| op.invoke_ns >= from && op.invoke_ns < to)
        .collect();
    let answered = in_minute.iter().filter(|op| ok(op)).count();
    let unknown = in_minute
        .iter()
        .filter(|op| matches!(op.outcome, Outcome::Unknown { .. }))
        .count();
    let members: Vec<String> = row
        .members
        .iter()
        .map(|(id, rss, fds)| format!("{id}: {} MB, {fds} fds", rss / 1024))
        .collect();
    eprintln!(
        "minute {:>2}: {answered} ok, {} failed, {unknown} unknown, p99 {:.1} ms | {} | {}",
        row.minute,
        in_minute.len() - answered - unknown,
        p99_ms(&in_minute),
        members.join("; "),
        row.events.join("; ")
    );
}

impl SoakReport {
    /// Sum over the running members of `figure` at each minute.
    pub fn totals(&self, figure: fn(&(u64, u64, u64)) -> u64) -> Vec<u64> {
        self.minutes
            .iter()
            .map(|m| m.members.iter().map(figure).sum())
            .collect()
    }
}

/// Whether `series` (one value a minute) stays flat: the last third's mean within 1.5 times the
/// mean of minutes 2 to 4 plus `slack` (a leak grows for as long as the soak runs).
pub fn flat(series: &[u64], slack: u64) -> bool {
    if series.len() < 6 {
        return true;
    }
    let mean = |s: &[u64]| s.iter().sum::<u64>() as f64 / s.len() as f64;
    let early = mean(&series[1..4]);
    let late = mean(&series[series.len() * 2 / 3..]);
    late <= early * 1.5 + slack as f64
}
