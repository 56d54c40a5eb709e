//! The faults that damage one member's disk or clock, or land during a snapshot transfer: a
//! full disk under snapshot writes, a leader killed while a learner receives its snapshot, bit
//! flips in a closed WAL segment and in snapshot files, and wall-clock jumps.

use anyhow::{bail, Context, Result};
use serde_json::json;

use super::cluster::{FaultCluster, RECOVERY_DEADLINE};
use super::history::Recorder;
use super::nemesis::{hold_and_watch_leader, FAULT_HOLD};
use crate::support::{wait_until, Member};

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
pub async fn clock_jump(c: &mut FaultCluster, target: usize, recorder: &Recorder) -> Result<String> {
    let lib = libfaketime()?;
    let id = c.members[target].id;
    // libfaketime re-reads this file at most once a second; only the wall clock is moved
    // (a monotonic clock never jumps on a real machine).
    let clock = c.root.path().join(format!("clock-{id}"));
    std::fs::write(&clock, "+0\n")?;
    c.stop_member(target).await?;
    c.members[target]
        .restart_with_env(vec![
            ("LD_PRELOAD".into(), lib.display().to_string()),
            ("FAKETIME_TIMESTAMP_FILE".into(), clock.display().to_string()),
            ("FAKETIME_DONT_FAKE_MONOTONIC".into(), "1".into()),
            ("FAKETIME_CACHE_DURATION".into(), "1".into()),
        ])
        .await?;
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
pub async fn snapshot_disk_full(c: &mut FaultCluster, target: usize) -> Result<String> {
    const FAILURES: u64 = 3;
    let id = c.members[target].id;
    c.stop_member(target).await?;
    let log_from = log_len(&c.members[target]);
    c.members[target]
        .restart_with_env(vec![(
            "FAILPOINTS".into(),
            format!("snapshot::write={FAILURES}*return"),
        )])
        .await?;
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
pub async fn kill_leader_during_snapshot(
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
    c.members[new]
        .restart_with_env(vec![("FAILPOINTS".into(), "snapshot::receive=1*return(3000)".into())])
        .await?;
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
pub async fn bit_flip(c: &mut FaultCluster, victim: usize, what: &str, recorder: &Recorder) -> Result<String> {
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
    let via = c.live();
    c.remove_member(victim, &via).await?;
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

fn log_len(m: &Member) -> u64 {
    std::fs::metadata(&m.log).map_or(0, |md| md.len())
}

/// What member `m` logged after byte `from` of its log.
fn log_since(m: &Member, from: u64) -> String {
    let bytes = std::fs::read(&m.log).unwrap_or_default();
    String::from_utf8_lossy(bytes.get(from as usize..).unwrap_or_default()).into_owned()
}
