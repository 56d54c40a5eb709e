//! Watchers during a run, and the watch checker.
//!
//! Each watcher follows a prefix through `GET /v1/watch`, starting on its own member. Whenever
//! its stream ends, fails, stalls (no line, not even a progress event, for [`STALL`]: its member
//! is paused or killed) or, for the moving ones, has simply run for a while, it resumes from the
//! revision after the last one it saw, on the next member. So watchers are killed, paused and
//! partitioned with their members (a partitioned member still sends progress: its sticky
//! watcher stays through the partition and the catch-up after it), and moved between members
//! on purpose.
//!
//! After healing, the reference is the whole committed history as each live member's watch
//! replays it from revision 1; the checks:
//! - every member replays the same history, in strictly increasing revisions;
//! - every change in it is a write the clients attempted, not one known to have failed, at
//!   the revision its acknowledgement named, and no write appears twice; every acknowledged
//!   write is in it;
//! - every watcher saw exactly the reference's changes for its prefix from where it started to
//!   where it ended: in order, none missing, none twice, none that is not in the reference.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use parking_lot::Mutex;
use raftkv_api::{codes, WatchEvent};
use tokio::sync::watch;
use tokio::time::Instant;

use super::history::{Op, Outcome, Request};
use super::workload::Targets;

/// One watcher's part.
#[derive(Debug, Clone, Copy)]
pub struct Spec {
    pub prefix: &'static str,
    /// Replay from revision 1 rather than start at the current revision.
    pub from_start: bool,
    /// Stays on its member until the stream ends or stalls, never moving on a timer: so that
    /// some watcher is on the member that is partitioned, or installs a snapshot, throughout.
    pub sticky: bool,
    /// The member it starts on.
    pub first_member: usize,
}

/// The watchers of a run on `members` members: three that move between members on a timer
/// (every key from revision 1, the registers and the appends from the current revision), and
/// one sticky watcher of every key per member.
pub fn specs(members: usize) -> Vec<Spec> {
    let moving = [("", true), ("reg", false), ("append/", false)];
    let mut specs: Vec<Spec> = moving
        .iter()
        .enumerate()
        .map(|(i, &(prefix, from_start))| Spec {
            prefix,
            from_start,
            sticky: false,
            first_member: i,
        })
        .collect();
    specs.extend((0..members).map(|m| Spec {
        prefix: "",
        from_start: false,
        sticky: true,
        first_member: m,
    }));
    specs
}
/// A stream that sends nothing (members send progress every `--watch-progress-ms`, 300 ms in
/// these runs) for this long is given up for another member.
pub const STALL: Duration = Duration::from_secs(2);
/// A watcher moves to another member after at most this long on one, even if all is well.
const MOVE_AFTER: Duration = Duration::from_millis(1500);
/// How long opening a stream may take (the read barrier waits for a leader).
const OPEN_TIMEOUT: Duration = Duration::from_secs(5);

/// One change as a watcher saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Seen {
    pub revision: u64,
    pub key: String,
    /// `None` for a delete.
    pub value: Option<String>,
}

/// What one watcher saw.
#[derive(Debug, Clone, Default)]
pub struct WatchLog {
    pub prefix: String,
    /// The first revision it covers (known once its first stream said where it starts).
    pub start: Option<u64>,
    /// Every change up to here was delivered.
    pub position: u64,
    pub seen: Vec<Seen>,
    /// Streams opened, one per resumption.
    pub sessions: usize,
    /// Why streams ended (`shutting_down`, stalls, connection errors), by reason.
    pub ends: BTreeMap<String, usize>,
    /// Protocol violations seen live (a progress going backwards, a compacted position).
    pub anomalies: Vec<String>,
}

/// Runs a watcher until `done` names a revision and it has reached it (or the caller gives up
/// on it).
pub async fn run(spec: Spec, targets: Targets, done: watch::Receiver<Option<u64>>, log: Arc<Mutex<WatchLog>>) {
    let Spec {
        prefix,
        from_start,
        sticky,
        first_member,
    } = spec;
    log.lock().prefix = prefix.to_string();
    // No overall timeout: streams outlive any request deadline; opening is bounded below.
    let http = reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(1))
        .build()
        .expect("an HTTP client");
    let mut member = first_member;
    loop {
        let finished = |log: &WatchLog| done.borrow().is_some_and(|r| log.start.is_some() && log.position >= r);
        if finished(&log.lock()) {
            return;
        }
        let base = {
            let t = targets.read();
            t[member % t.len()].clone()
        };
        member += 1;
        let reason = session(&http, &base, prefix, from_start, sticky, &log, &done).await;
        let finished_now = {
            let mut l = log.lock();
            *l.ends.entry(reason).or_default() += 1;
            finished(&l)
        };
        if finished_now {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// One stream on `base`, from the watcher's position on; returns why it ended.
async fn session(
    http: &reqwest::Client,
    base: &str,
    prefix: &str,
    from_start: bool,
    sticky: bool,
    log: &Mutex<WatchLog>,
    done: &watch::Receiver<Option<u64>>,
) -> String {
    let start = {
        let l = log.lock();
        match l.start {
            Some(_) => Some(l.position + 1),
            None if from_start => Some(1),
            // The very first stream starts "now": its X-Raftkv-Revision header says where.
            None => None,
        }
    };
    let mut url = format!("{base}/v1/watch?prefix={prefix}&progress_notify=true");
    if let Some(s) = start {
        url.push_str(&format!("&start_revision={s}"));
    }
    let resp = match tokio::time::timeout(OPEN_TIMEOUT, http.get(&url).send()).await {
        Err(_) => return "open timed out".into(),
        Ok(Err(e)) if e.is_connect() => return "connection refused".into(),
        Ok(Err(_)) => return "open failed".into(),
        Ok(Ok(r)) => r,
    };
    if resp.status() != 200 {
        let status = resp.status().as_u16();
        let body: serde_json::Value = resp.json().await.unwrap_or_default();
        if status == 410 {
            log.lock()
                .anomalies
                .push(format!("watch from {start:?} on {base} answered 410: {body}"));
        }
        return format!("{status} {}", body["error"].as_str().unwrap_or(""));
    }
    let opened_after: Option<u64> = resp
        .headers()
        .get("x-raftkv-revision")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok());
    {
        let mut l = log.lock();
        l.sessions += 1;
        match (opened_after, start) {
            (None, _) => l.anomalies.push(format!("a watch on {base} without X-Raftkv-Revision")),
            (Some(after), Some(s)) if after + 1 != s => l
                .anomalies
                .push(format!("a watch from {s} on {base} says it starts after {after}")),
            (Some(after), None) => {
                // The first stream started "now": the member says where that was.
                l.start = Some(after + 1);
                l.position = after;
            }
            (Some(_), Some(s)) => {
                if l.start.is_none() {
                    l.start = Some(s);
                }
            }
        }
    }
    let moved_at = if sticky {
        Instant::now() + Duration::from_secs(3600)
    } else {
        Instant::now() + MOVE_AFTER.mul_f64(0.3 + rand::random::<f64>() * 0.7)
    };
    let mut body = resp.bytes_stream();
    let mut buf = Vec::new();
    loop {
        // A stream that is done once the run names its last revision ends there, not by timer.
        let final_revision = *done.borrow();
        let deadline = if final_revision.is_some() {
            Instant::now() + STALL
        } else {
            moved_at.min(Instant::now() + STALL)
        };
        let chunk = match tokio::time::timeout_at(deadline, body.next()).await {
            Err(_) if Instant::now() >= moved_at && final_revision.is_none() => return "moved".into(),
            Err(_) => return "stalled".into(),
            Ok(None) => return "stream closed".into(),
            Ok(Some(Err(_))) => return "stream broken".into(),
            Ok(Some(Ok(c))) => c,
        };
        buf.extend_from_slice(&chunk);
        while let Some(end) = buf.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = buf.drain(..=end).collect();
            let event: WatchEvent = match serde_json::from_slice(&line[..end]) {
                Ok(e) => e,
                Err(e) => {
                    log.lock().anomalies.push(format!(
                        "undecodable watch line from {base}: {e}: {}",
                        String::from_utf8_lossy(&line)
                    ));
                    return "bad line".into();
                }
            };
            let mut l = log.lock();
            match event {
                WatchEvent::Put(c) | WatchEvent::Delete(c) => {
                    l.position = l.position.max(c.revision);
                    l.seen.push(Seen {
                        revision: c.revision,
                        key: c.key.unwrap_or_default(),
                        value: c.value,
                    });
                }
                WatchEvent::Progress(p) => {
                    if p.revision < l.position {
                        let msg = format!("progress {} from {base} is behind position {}", p.revision, l.position);
                        l.anomalies.push(msg);
                    }
                    l.position = l.position.max(p.revision);
                }
                WatchEvent::Error(end) => {
                    if end.error == codes::COMPACTED {
                        l.anomalies.push(format!("stream on {base} ended compacted: {end:?}"));
                    }
                    if end.revision < l.position {
                        let msg = format!(
                            "final event from {base} at {} is behind position {}",
                            end.revision, l.position
                        );
                        l.anomalies.push(msg);
                    }
                    return end.error;
                }
            }
            if final_revision.is_some_and(|r| l.start.is_some() && l.position >= r) {
                return "done".into();
            }
        }
    }
}

/// Reads the whole history from revision 1 up to `upto` through `base`'s watch.
pub async fn reference(base: &str, upto: u64) -> Result<Vec<Seen>, String> {
    let http = reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(1))
        .build()
        .expect("an HTTP client");
    let log = Mutex::new(WatchLog {
        start: Some(1),
        ..Default::default()
    });
    let (_tx, done) = watch::channel(Some(upto));
    let deadline = Instant::now() + Duration::from_secs(30);
    while log.lock().position < upto {
        if Instant::now() > deadline {
            return Err(format!("{base} replayed only up to {} of {upto}", log.lock().position));
        }
        let reason = session(&http, base, "", true, true, &log, &done).await;
        if reason.starts_with("410") {
            return Err(format!("{base} no longer holds the history from revision 1"));
        }
    }
    let log = log.into_inner();
    if !log.anomalies.is_empty() {
        return Err(log.anomalies.join("; "));
    }
    Ok(log.seen.into_iter().filter(|s| s.revision <= upto).collect())
}

/// The checks of the module doc; `references` are each live member's replay, `ops` the clients'.
pub fn check(references: &[(u64, Vec<Seen>)], logs: &[WatchLog], ops: &[Op], upto: u64) -> Vec<String> {
    let mut anomalies = Vec::new();
    let Some((first_id, reference)) = references.first() else {
        return vec!["no member replayed the history".into()];
    };
    for (id, other) in &references[1..] {
        if other != reference {
            let at = reference
                .iter()
                .zip(other)
                .position(|(a, b)| a != b)
                .unwrap_or(reference.len().min(other.len()));
            anomalies.push(format!(
                "member {id} replays a different history than member {first_id}: {} vs {} changes, first difference at #{at}: {:?} vs {:?}",
                other.len(),
                reference.len(),
                other.get(at),
                reference.get(at)
            ));
        }
    }
    if let Some(w) = reference.windows(2).find(|w| w[0].revision >= w[1].revision) {
        anomalies.push(format!(
            "the history is not in revision order: {:?} then {:?}",
            w[0], w[1]
        ));
    }
    // Against the clients: (key, value) identifies a write, every value being unique per run.
    let mut writes: HashMap<(&str, String), &Op> = HashMap::new();
    for op in ops {
        if let Request::Write { value } | Request::Cas { value, .. } = &op.request {
            writes.insert((op.key.as_str(), value.to_string()), op);
        }
    }
    let mut applied: HashMap<(&str, &str), u64> = HashMap::new();
    for s in reference.iter().filter(|s| s.key != super::nemesis::HARNESS_KEY) {
        let Some(value) = &s.value else {
            anomalies.push(format!("a delete nobody asked for: {s:?}"));
            continue;
        };
        if let Some(earlier) = applied.insert((&s.key, value), s.revision) {
            anomalies.push(format!(
                "write {}={value} applied twice: at {earlier} and {}",
                s.key, s.revision
            ));
        }
        match writes.get(&(s.key.as_str(), value.clone())).map(|op| &op.outcome) {
            None => anomalies.push(format!("change never written by a client: {s:?}")),
            Some(Outcome::Fail { reason }) => {
                anomalies.push(format!("change of a write refused as never proposed ({reason}): {s:?}"))
            }
            Some(Outcome::CasFailed { .. }) => anomalies.push(format!("change of a CAS that failed: {s:?}")),
            Some(Outcome::Written { revision }) if *revision != s.revision => anomalies.push(format!(
                "change at {} but its write was acknowledged at {revision}: {s:?}",
                s.revision
            )),
            _ => {}
        }
    }
    for op in ops {
        if let (Outcome::Written { revision }, Request::Write { value } | Request::Cas { value, .. }) =
            (&op.outcome, &op.request)
        {
            let value = value.to_string();
            if applied.get(&(op.key.as_str(), value.as_str())) != Some(revision) && *revision <= upto {
                anomalies.push(format!(
                    "acknowledged write {}={value} at {revision} (op {}) is not in the watched history",
                    op.key, op.id
                ));
            }
        }
    }
    // Every watcher: exactly the reference's changes for its prefix over the range it covered.
    for (i, log) in logs.iter().enumerate() {
        anomalies.extend(
            log.anomalies
                .iter()
                .map(|a| format!("watcher {i} ({:?}): {a}", log.prefix)),
        );
        let Some(start) = log.start else {
            anomalies.push(format!("watcher {i} ({:?}) never started", log.prefix));
            continue;
        };
        if log.position < upto {
            anomalies.push(format!(
                "watcher {i} ({:?}) reached only revision {} of {upto}",
                log.prefix, log.position
            ));
        }
        let end = log.position.min(upto);
        let expected: Vec<&Seen> = reference
            .iter()
            .filter(|s| s.revision >= start && s.revision <= end && s.key.starts_with(&log.prefix))
            .collect();
        let got: Vec<&Seen> = log.seen.iter().filter(|s| s.revision <= end).collect();
        if got != expected {
            let at = expected
                .iter()
                .zip(&got)
                .position(|(a, b)| a != b)
                .unwrap_or(expected.len().min(got.len()));
            let mut revisions: Vec<u64> = got.iter().map(|s| s.revision).collect();
            let total = revisions.len();
            revisions.dedup();
            anomalies.push(format!(
                "watcher {i} ({:?}) from {start} to {end}: saw {} changes ({} twice), expected {}; first difference at #{at}: saw {:?}, expected {:?}",
                log.prefix,
                got.len(),
                total - revisions.len(),
                expected.len(),
                got.get(at),
                expected.get(at)
            ));
        }
    }
    anomalies
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seen(revision: u64, key: &str, value: &str) -> Seen {
        Seen {
            revision,
            key: key.into(),
            value: Some(value.into()),
        }
    }

    fn write(id: usize, key: &str, value: u64, outcome: Outcome) -> Op {
        Op {
            id,
            client: 0,
            member: 0,
            key: key.into(),
            request: Request::Write { value },
            invoke_ns: 0,
            complete_ns: Some(1),
            outcome,
        }
    }

    fn log(prefix: &str, start: u64, position: u64, seen: Vec<Seen>) -> WatchLog {
        WatchLog {
            prefix: prefix.into(),
            start: Some(start),
            position,
            seen,
            ..Default::default()
        }
    }

    #[test]
    fn the_watch_checker_finds_missing_duplicate_and_uncommitted_changes() {
        let ops = vec![
            write(0, "reg0", 1, Outcome::Written { revision: 5 }),
            write(
                1,
                "reg1",
                2,
                Outcome::Unknown {
                    reason: "timeout".into(),
                },
            ),
            write(2, "reg0", 3, Outcome::Fail { reason: "503".into() }),
            write(3, "append/4", 4, Outcome::Written { revision: 9 }),
        ];
        let reference = vec![seen(5, "reg0", "1"), seen(7, "reg1", "2"), seen(9, "append/4", "4")];
        let good = vec![
            log("reg", 5, 9, reference[..2].to_vec()),
            log("", 6, 9, reference[1..].to_vec()),
        ];
        let refs = vec![(1, reference.clone()), (2, reference.clone())];
        assert!(
            check(&refs, &good, &ops, 9).is_empty(),
            "{:?}",
            check(&refs, &good, &ops, 9)
        );

        let missing = vec![log("reg", 5, 9, vec![reference[1].clone()])];
        assert_eq!(check(&refs, &missing, &ops, 9).len(), 1);
        let twice = vec![log(
            "reg",
            5,
            9,
            vec![reference[0].clone(), reference[1].clone(), reference[1].clone()],
        )];
        assert_eq!(check(&refs, &twice, &ops, 9).len(), 1);
        let short = vec![log("reg", 5, 7, reference[..2].to_vec())];
        assert_eq!(check(&refs, &short, &ops, 9).len(), 1, "stopped before the end");

        // The history itself: a failed write applied, an acknowledged one missing, members differing.
        let bad = vec![seen(5, "reg0", "1"), seen(6, "reg0", "3"), seen(7, "reg1", "2")];
        let found = check(&[(1, bad.clone()), (2, reference.clone())], &[], &ops, 9);
        assert!(found.iter().any(|a| a.contains("different history")), "{found:?}");
        assert!(
            found.iter().any(|a| a.contains("refused as never proposed")),
            "{found:?}"
        );
        assert!(found.iter().any(|a| a.contains("append/4=4 at 9")), "{found:?}");
    }
}
