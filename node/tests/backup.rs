//! Backups and restores with real `raftkv-node` processes: `GET /v1/snapshot` under writes, from
//! a follower and while the leader dies, and `raftkv-node restore` into a new cluster, with the
//! refusals of damaged, truncated and unknown backups and of non-empty data directories.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use bytes::Bytes;
use parking_lot::Mutex;
use raftkv_api::snapshot::SnapshotMeta;
use raftkv_node::kv::KvState;
use serde_json::{json, Value};
use support::{free_peer_addr, wait_until, Cluster, Member, BIN, DEADLINE, FAST};
use tokio::time::Instant;

/// A whole `GET /v1/snapshot` answer.
struct Backup {
    meta: SnapshotMeta,
    body: Vec<u8>,
}

/// Takes a backup from member `i`; fails on any answer but a complete 200.
async fn backup(c: &Cluster, i: usize) -> Result<Backup> {
    let resp = c
        .http
        .get(format!("{}/v1/snapshot", c.members[i].url()))
        .timeout(Duration::from_secs(60))
        .send()
        .await?;
    let status = resp.status().as_u16();
    if status != 200 {
        bail!(
            "GET /v1/snapshot answered {status}: {}",
            resp.text().await.unwrap_or_default()
        );
    }
    let meta = snapshot_meta(&resp)?;
    let body = resp.bytes().await?.to_vec();
    Ok(Backup { meta, body })
}

fn snapshot_meta(resp: &reqwest::Response) -> Result<SnapshotMeta> {
    SnapshotMeta::from_headers(|name| resp.headers().get(name).and_then(|v| v.to_str().ok()))
        .map_err(anyhow::Error::msg)
}

/// Decodes a backup and checks it against its own headers.
fn decode(b: &Backup) -> KvState {
    assert_eq!(b.body.len() as u64, b.meta.size, "Content-Length is the body's size");
    let state = KvState::read_snapshot(&b.body[..]).expect("a complete backup decodes and verifies");
    assert_eq!(
        state.applied_index, b.meta.revision,
        "the revision header is the snapshot's index"
    );
    assert_eq!(state.cluster_id, b.meta.cluster_id);
    assert_eq!(state.data.len() as u64, b.meta.key_count);
    assert_eq!(b.meta.format, raftkv_node::kv::SNAPSHOT_FORMAT_VERSION);
    state
}

/// Runs `raftkv-node restore` with `args`, without a backtrace so that a refusal is one line.
fn restore(args: &[&str], stdin: Option<&[u8]>) -> Output {
    let mut cmd = Command::new(BIN);
    cmd.arg("restore")
        .args(args)
        .env_remove("RUST_BACKTRACE")
        .env_remove("RAFTKV_DATA_DIR")
        .env_remove("RAFTKV_ID")
        .env_remove("RAFTKV_ADVERTISE_PEER_URL")
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let Some(input) = stdin else {
        return cmd.stdin(Stdio::null()).output().expect("run raftkv-node restore");
    };
    let mut child = cmd.stdin(Stdio::piped()).spawn().expect("run raftkv-node restore");
    {
        use std::io::Write;
        let mut pipe = child.stdin.take().expect("stdin");
        pipe.write_all(input).expect("write stdin");
    }
    child.wait_with_output().expect("wait for raftkv-node restore")
}

fn path_str(p: &Path) -> &str {
    p.to_str().expect("UTF-8 temporary path")
}

/// The one-line refusal of a failed `restore`, checked to be exactly one `fatal` line.
fn fatal_line(out: &Output) -> String {
    assert!(!out.status.success(), "restore should have failed");
    let stderr = String::from_utf8_lossy(&out.stderr);
    let fatal: Vec<&str> = stderr.lines().filter(|l| l.starts_with("raftkv-node: fatal")).collect();
    assert_eq!(fatal.len(), 1, "one fatal line expected in:\n{stderr}");
    fatal[0].to_string()
}

/// Every acknowledged write of a writer: key, value, revision, and when the answer came.
type Acks = Arc<Mutex<Vec<(String, String, u64, Instant)>>>;

/// Writers putting fresh keys through every member until `stop`; each key is written once, so
/// a key's presence and value in a snapshot say exactly which writes it holds.
fn start_writers(c: &Cluster, writers: usize, stop: Arc<AtomicBool>) -> (Acks, Vec<tokio::task::JoinHandle<()>>) {
    let acks: Acks = Default::default();
    let urls: Vec<String> = c.members.iter().map(Member::url).collect();
    let tasks = (0..writers)
        .map(|w| {
            let (acks, stop, urls, http) = (acks.clone(), stop.clone(), urls.clone(), c.http.clone());
            tokio::spawn(async move {
                let mut n = 0usize;
                while !stop.load(Ordering::Relaxed) {
                    let key = format!("w{w}-{n:06}");
                    let value = format!("value of {key} {}", "x".repeat(n % 200));
                    let url = &urls[n % urls.len()];
                    n += 1;
                    let Ok(resp) = http.put(format!("{url}/v1/kv/{key}")).body(value.clone()).send().await else {
                        continue;
                    };
                    if resp.status() != 200 {
                        continue;
                    }
                    let Ok(body) = resp.json::<Value>().await else { continue };
                    let revision = body["revision"].as_u64().expect("revision");
                    acks.lock().push((key, value, revision, Instant::now()));
                }
            })
        })
        .collect();
    (acks, tasks)
}

/// The keys of a snapshot as text, with their values and mod revisions.
fn keys_of(state: &KvState) -> BTreeMap<String, (String, u64)> {
    state
        .data
        .iter()
        .map(|(k, v)| {
            (
                String::from_utf8_lossy(k).into_owned(),
                (String::from_utf8_lossy(&v.value).into_owned(), v.mod_revision),
            )
        })
        .collect()
}

/// Checks that `state` holds exactly the acknowledged writes up to its revision: each with
/// its value and revision, none after it, and every write acknowledged before `asked_at`.
fn assert_consistent(state: &KvState, acks: &[(String, String, u64, Instant)], asked_at: Instant) {
    let keys = keys_of(state);
    let revision = state.applied_index;
    let (mut before, mut after) = (0, 0);
    for (key, value, rev, acked_at) in acks {
        if *acked_at < asked_at {
            assert!(
                *rev <= revision,
                "{key} was acknowledged at revision {rev} before the backup was asked for, yet the backup is at {revision}"
            );
        }
        if *rev <= revision {
            before += 1;
            assert_eq!(
                keys.get(key),
                Some(&(value.clone(), *rev)),
                "{key} acknowledged at revision {rev} <= {revision}"
            );
        } else {
            after += 1;
            assert!(
                !keys.contains_key(key),
                "{key} written at revision {rev} > {revision} is in the backup"
            );
        }
    }
    assert!(before > 0, "no acknowledged write precedes the backup");
    assert!(
        after > 0,
        "no acknowledged write follows the backup: the writers did not overlap it"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_from_a_follower_under_writes_holds_exactly_the_writes_acknowledged_before_its_revision() {
    let mut c = Cluster::start(3, &[]).await.unwrap();
    let leader = c.leader().await.unwrap();
    let follower = (leader + 1) % 3;
    let stop = Arc::new(AtomicBool::new(false));
    let (acks, writers) = start_writers(&c, 4, stop.clone());
    wait_until("writes before the backup", DEADLINE, || async {
        (acks.lock().len() >= 200).then_some(())
    })
    .await
    .unwrap();
    let asked_at = Instant::now();
    let b = backup(&c, follower).await.unwrap();
    // Keep writing past the backup, so that writes with higher revisions exist to be absent.
    let seen = acks.lock().len();
    wait_until("writes after the backup", DEADLINE, || async {
        (acks.lock().len() >= seen + 100).then_some(())
    })
    .await
    .unwrap();
    stop.store(true, Ordering::Relaxed);
    for w in writers {
        w.await.unwrap();
    }
    let state = decode(&b);
    let status = c.status(follower).await.unwrap();
    assert_eq!(Some(b.meta.cluster_id), status["cluster_id"].as_u64());
    assert_consistent(&state, &acks.lock(), asked_at);
    assert_eq!(
        state.membership.voters.len(),
        3,
        "the backup carries the membership it was taken in"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restored_backup_is_a_new_cluster_that_serves_the_keys_continues_revisions_and_grows() {
    let mut c = Cluster::start(3, &[]).await.unwrap();
    let leader = c.leader().await.unwrap();
    let old_cluster = c.status(leader).await.unwrap()["cluster_id"].as_u64().unwrap();
    for i in 0..50 {
        assert_eq!(
            c.put(i % 3, &format!("key{i:02}"), &format!("value {i}"))
                .await
                .unwrap()
                .status,
            200
        );
    }
    c.put(leader, "key07", "overwritten").await.unwrap();
    assert_eq!(c.delete(leader, "/v1/kv/key08").await.unwrap().status, 200);
    let b = backup(&c, leader).await.unwrap();
    let revision = b.meta.revision;
    assert_eq!(
        c.put(leader, "after-backup", "absent once restored")
            .await
            .unwrap()
            .status,
        200
    );
    let expected = keys_of(&decode(&b));
    assert_eq!(expected.len(), 49);

    let file = c.root.path().join("backup.snap");
    std::fs::write(&file, &b.body).unwrap();
    let dir = c.root.path().join("restored");
    let peer_addr = free_peer_addr();
    let peer_url = format!("http://{peer_addr}");
    let out = restore(
        &[
            "--from",
            path_str(&file),
            "--data-dir",
            path_str(&dir),
            "--peer-url",
            &peer_url,
        ],
        None,
    );
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let said: Value = serde_json::from_slice(&out.stdout).expect("one JSON line on stdout");
    assert_eq!(said["result"], "restored");
    assert_eq!(said["revision"], json!(revision));
    assert_eq!(said["keys"], json!(49));
    assert_eq!(said["source_cluster_id"], json!(old_cluster));

    let fast: Vec<&str> = FAST.to_vec();
    c.members.push(Member::spawn_in(&dir, &peer_addr, &fast).await.unwrap());
    let r = c.members.len() - 1;
    let status = wait_until("the restored member to lead", DEADLINE, || async {
        let s = c.status(r).await?;
        (s["role"] == "leader" && s["ready"] == true).then_some(s)
    })
    .await
    .unwrap();
    let new_cluster = status["cluster_id"].as_u64().unwrap();
    assert_ne!(new_cluster, old_cluster, "a restore starts a new cluster");
    assert_eq!(status["id"], said["id"]);
    let members = c.get(r, "/v1/members").await.unwrap().json();
    assert_eq!(members["members"].as_array().unwrap().len(), 1, "{members}");
    assert_eq!(members["members"][0]["peer_url"], json!(peer_url));

    for (key, (value, rev)) in &expected {
        let got = c.get(r, &format!("/v1/kv/{key}")).await.unwrap();
        assert_eq!((got.status, got.text()), (200, value.clone()), "{key}");
        assert_eq!(got.etag, Some(format!("\"{rev}\"")), "{key} keeps its revision");
    }
    assert_eq!(
        c.get(r, "/v1/kv/key08").await.unwrap().status,
        404,
        "deleted before the backup"
    );
    assert_eq!(
        c.get(r, "/v1/kv/after-backup").await.unwrap().status,
        404,
        "written after the backup"
    );
    let put = c.put(r, "after-restore", "new").await.unwrap();
    assert_eq!(put.status, 200, "{}", put.text());
    assert!(
        put.json()["revision"].as_u64().unwrap() > revision,
        "revisions continue after the backup's"
    );
    // Bootstrapped once, by the restore: a second bootstrap is refused.
    let again = c.post(r, "/v1/bootstrap", None).await.unwrap();
    assert_eq!(
        (again.status, again.json()["error"].clone()),
        (409, json!("already_initialized"))
    );
    // The restored member is an ordinary member on its volume: it restarts as itself.
    c.members[r].stop().await.unwrap();
    c.members[r].restart().await.unwrap();
    wait_until("the restored member to lead again", DEADLINE, || async {
        let s = c.status(r).await?;
        (s["role"] == "leader" && s["ready"] == true && s["cluster_id"] == json!(new_cluster)).then_some(())
    })
    .await
    .unwrap();
    assert_eq!(c.get(r, "/v1/kv/after-restore").await.unwrap().text(), "new");
    assert_eq!(c.get(r, "/v1/kv/key00").await.unwrap().text(), "value 0");

    // A member of the old cluster, added to the restored one, is refused by the cluster id: it
    // never replicates, and keeps its own cluster and data.
    let old = (leader + 1) % 3;
    let old_id = c.members[old].id;
    let added = c
        .retry_admin("add an old member", || {
            c.post(
                r,
                "/v1/members",
                Some(json!({"id": old_id, "peer_url": c.members[old].peer_url()})),
            )
        })
        .await
        .unwrap();
    assert_eq!(added.status, 200, "{}", added.text());
    wait_until("the old member to refuse the restored cluster", DEADLINE, || async {
        let log = std::fs::read_to_string(&c.members[old].log).ok()?;
        log.contains("refused a peer of another cluster").then_some(())
    })
    .await
    .unwrap();
    let view = c.get(r, "/v1/members").await.unwrap().json();
    let learner = view["members"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["id"] == json!(old_id))
        .cloned();
    assert_eq!(learner.unwrap()["match_index"], json!(0), "{view}");
    let old_status = c.status(old).await.unwrap();
    assert_eq!(old_status["cluster_id"], json!(old_cluster));
    assert_eq!(
        c.get(old, "/v1/kv/after-backup").await.unwrap().text(),
        "absent once restored"
    );
    assert_eq!(c.get(old, "/v1/kv/after-restore").await.unwrap().status, 404);
    let remove_path = format!("/v1/members/{old_id}");
    let removed = c
        .retry_admin("remove the old member", || c.delete(r, &remove_path))
        .await
        .unwrap();
    assert_eq!(removed.status, 200, "{}", removed.text());

    // A fresh member joins the restored cluster as a learner, as usual, and serves its keys.
    let fresh = c.spawn_member().await.unwrap();
    let body = json!({"id": c.members[fresh].id, "peer_url": c.members[fresh].peer_url()});
    let added = c
        .retry_admin("add a learner", || c.post(r, "/v1/members", Some(body.clone())))
        .await
        .unwrap();
    assert_eq!(added.status, 200, "{}", added.text());
    let promote = format!("/v1/members/{}/promote", c.members[fresh].id);
    let promoted = c.retry_admin("promote", || c.post(r, &promote, None)).await.unwrap();
    assert_eq!(promoted.status, 200, "{}", promoted.text());
    assert_eq!(c.get(fresh, "/v1/kv/key07").await.unwrap().text(), "overwritten");
    assert_eq!(c.get(fresh, "/v1/kv/after-restore").await.unwrap().text(), "new");
    assert_eq!(c.status(fresh).await.unwrap()["cluster_id"], json!(new_cluster));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn damaged_truncated_and_unknown_backups_and_non_empty_directories_are_refused_and_nothing_is_written() {
    let c = Cluster::start(1, &[]).await.unwrap();
    for i in 0..20 {
        c.put(0, &format!("k{i}"), &"v".repeat(i * 10)).await.unwrap();
    }
    let good = backup(&c, 0).await.unwrap().body;
    let root = c.root.path();
    let mut bad: Vec<(String, Vec<u8>, &str)> = Vec::new();
    for len in [0, 4, 8, 12, good.len() / 2, good.len() - 4, good.len() - 1] {
        bad.push((format!("truncated to {len}"), good[..len].to_vec(), "truncated"));
    }
    for at in [20, good.len() / 2, good.len() - 2] {
        let mut flipped = good.clone();
        flipped[at] ^= 0x04;
        bad.push((format!("bit flipped at {at}"), flipped, ""));
    }
    let mut version = good.clone();
    version[7] = 9;
    bad.push(("version 9".into(), version, "unsupported snapshot format version 9"));
    let mut longer = good.clone();
    longer.push(0);
    bad.push(("one byte too many".into(), longer, "trailing bytes"));
    for (n, (what, bytes, says)) in bad.iter().enumerate() {
        let file = root.join(format!("bad-{n}.snap"));
        std::fs::write(&file, bytes).unwrap();
        let dir = root.join(format!("bad-{n}"));
        let out = restore(&["--from", path_str(&file), "--data-dir", path_str(&dir)], None);
        let line = fatal_line(&out);
        assert!(
            line.starts_with("raftkv-node: fatal [bad_backup]: backup "),
            "{what}: {line}"
        );
        assert!(line.contains(says), "{what}: {line}");
        assert!(!dir.exists(), "{what}: the data directory was created");
        // The same bytes through standard input are refused the same way.
        let out = restore(&["--from", "-", "--data-dir", path_str(&dir)], Some(bytes));
        assert!(
            fatal_line(&out).contains("[bad_backup]: backup standard input"),
            "{what}"
        );
        assert!(!dir.exists(), "{what} (stdin): the data directory was created");
    }
    let missing = restore(
        &[
            "--from",
            path_str(&root.join("nope.snap")),
            "--data-dir",
            path_str(&root.join("d")),
        ],
        None,
    );
    assert!(fatal_line(&missing).contains("[bad_backup]"));

    // A directory holding anything is refused, and keeps what it holds.
    let full = root.join("full");
    std::fs::create_dir_all(&full).unwrap();
    std::fs::write(full.join("notes"), b"mine").unwrap();
    let good_file = root.join("good.snap");
    std::fs::write(&good_file, &good).unwrap();
    let out = restore(&["--from", path_str(&good_file), "--data-dir", path_str(&full)], None);
    assert!(fatal_line(&out).contains("[data_dir_not_empty]"));
    let left: Vec<_> = std::fs::read_dir(&full)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(left, vec![std::ffi::OsString::from("notes")]);
    // A member's own data directory is refused too.
    let out = restore(
        &[
            "--from",
            path_str(&good_file),
            "--data-dir",
            path_str(&c.members[0].dir),
        ],
        None,
    );
    assert!(fatal_line(&out).contains("[data_dir_not_empty]"));

    // Through standard input, into a fresh filesystem's root (lost+found is not data); then the
    // same restore again is a no-op, and another backup is refused.
    let dir = root.join("ok");
    std::fs::create_dir_all(dir.join("lost+found")).unwrap();
    let out = restore(&["--from", "-", "--data-dir", path_str(&dir)], Some(&good));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let first: Value = serde_json::from_slice(&out.stdout).unwrap();
    let snapshot_files = |d: &Path| std::fs::read_dir(d.join("snap")).unwrap().count();
    assert_eq!(snapshot_files(&dir), 1);
    let again = restore(&["--from", path_str(&good_file), "--data-dir", path_str(&dir)], None);
    assert!(again.status.success(), "{}", String::from_utf8_lossy(&again.stderr));
    let second: Value = serde_json::from_slice(&again.stdout).unwrap();
    assert_eq!(second["result"], "already restored, nothing written");
    assert_eq!(
        (second["id"].clone(), second["cluster_id"].clone()),
        (first["id"].clone(), first["cluster_id"].clone())
    );
    c.put(0, "one-more", "write").await.unwrap();
    let other = root.join("other.snap");
    std::fs::write(&other, backup(&c, 0).await.unwrap().body).unwrap();
    let refused = restore(&["--from", path_str(&other), "--data-dir", path_str(&dir)], None);
    assert!(fatal_line(&refused).contains("[data_dir_not_empty]"));

    // An interrupted restore: the node refuses the directory, the next restore clears it.
    let cut = root.join("interrupted");
    std::fs::create_dir_all(cut.join("wal")).unwrap();
    std::fs::write(cut.join("restore-in-progress"), b"").unwrap();
    std::fs::write(cut.join("member.json"), b"{").unwrap();
    let node = Command::new(BIN)
        .args([
            "--data-dir",
            path_str(&cut),
            "--client-addr",
            "127.0.0.1:0",
            "--peer-addr",
            "127.0.0.1:0",
        ])
        .env_remove("RUST_BACKTRACE")
        .output()
        .unwrap();
    assert!(fatal_line(&node).contains("[restore_interrupted]"));
    let out = restore(&["--from", path_str(&good_file), "--data-dir", path_str(&cut)], None);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(!cut.join("restore-in-progress").exists());
    assert_eq!(snapshot_files(&cut), 1);
}

/// Keys of `n` values of `size` bytes, written through `conns` connections.
async fn load(c: &Cluster, n: usize, size: usize, conns: usize) -> Result<()> {
    let url = c.members[0].url();
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let tasks: Vec<_> = (0..conns)
        .map(|_| {
            let (http, url, next) = (c.http.clone(), url.clone(), next.clone());
            tokio::spawn(async move {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= n {
                        return Ok::<_, anyhow::Error>(());
                    }
                    let value = Bytes::from(vec![b'a' + (i % 26) as u8; size]);
                    let resp = http.put(format!("{url}/v1/kv/big{i:06}")).body(value).send().await?;
                    if resp.status() != 200 {
                        bail!("load write {i} answered {}", resp.status());
                    }
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.context("load task")??;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_while_the_leader_is_killed_completes_consistently_or_fails_clearly_and_truncation_shows() {
    let mut c = Cluster::start(3, &[]).await.unwrap();
    // About 24 MB: far more than the stream's buffers, so the stream is mid-way when the leader dies.
    load(&c, 6000, 4000, 16).await.unwrap();
    let leader = c.leader().await.unwrap();
    let follower = (leader + 1) % 3;
    let written: BTreeSet<String> = (0..6000).map(|i| format!("big{i:06}")).collect();

    // From the leader: read the first bytes, kill it, read on. The body breaks off short.
    let mut resp = c
        .http
        .get(format!("{}/v1/snapshot", c.members[leader].url()))
        .timeout(Duration::from_secs(60))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let meta = snapshot_meta(&resp).unwrap();
    let mut received = Vec::new();
    let first = resp.chunk().await.unwrap().expect("a first chunk");
    received.extend_from_slice(&first);
    c.members[leader].kill();
    let broke = loop {
        match resp.chunk().await {
            Ok(Some(chunk)) => received.extend_from_slice(&chunk),
            Ok(None) => break false,
            Err(_) => break true,
        }
    };
    assert!(
        (received.len() as u64) < meta.size,
        "a member killed mid-stream delivered all {} bytes",
        meta.size
    );
    assert!(
        broke,
        "the client saw the body end without an error after {} of {} bytes",
        received.len(),
        meta.size
    );
    let err = KvState::read_snapshot(&received[..]).unwrap_err();
    assert!(err.contains("truncated"), "truncation reads as: {err}");

    // From a follower while the leader is gone: either a complete, consistent backup (the read
    // barrier was confirmed) or a clear error answer, never a body that looks whole and is not.
    let answer = c
        .http
        .get(format!("{}/v1/snapshot", c.members[follower].url()))
        .timeout(Duration::from_secs(60))
        .send()
        .await
        .unwrap();
    if answer.status() == 200 {
        let meta = snapshot_meta(&answer).unwrap();
        let body = answer.bytes().await.unwrap().to_vec();
        let state = decode(&Backup { meta, body });
        assert!(written.iter().all(|k| state.data.contains_key(k.as_bytes())));
    } else {
        assert_eq!(answer.status(), 503);
        let err: Value = answer.json().await.unwrap();
        let code = err["error"].as_str().unwrap_or_default();
        assert!(["read_timeout", "no_leader"].contains(&code), "{err}");
    }

    // Once a new leader is elected, a follower's backup holds every acknowledged write.
    c.wait_healthy().await.unwrap();
    let b = wait_until("a backup after the new election", DEADLINE, || async {
        backup(&c, follower).await.ok()
    })
    .await
    .unwrap();
    let state = decode(&b);
    let missing: Vec<&String> = written
        .iter()
        .filter(|k| !state.data.contains_key(k.as_bytes()))
        .collect();
    assert!(
        missing.is_empty(),
        "{} acknowledged keys missing, first {:?}",
        missing.len(),
        missing.first()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_can_be_paced_needs_a_member_and_frees_its_stream_when_the_client_goes_away() {
    let c = Cluster::start(1, &[]).await.unwrap();
    load(&c, 3000, 4000, 8).await.unwrap();
    // Two streams that are not read hold both slots: a third is refused as busy, not queued.
    let url = format!("{}/v1/snapshot", c.members[0].url());
    let held = [
        c.http.get(&url).send().await.unwrap(),
        c.http.get(&url).send().await.unwrap(),
    ];
    assert!(held.iter().all(|r| r.status() == 200));
    let busy = c.get(0, "/v1/snapshot").await.unwrap();
    assert_eq!(
        (busy.status, busy.json()["error"].clone()),
        (503, json!("snapshot_busy"))
    );
    drop(held);
    // Clients that read one chunk and hang up: each stream ends once the member notices, and
    // frees its slot, so backups go on being served rather than refused as busy for good.
    for _ in 0..4 {
        let mut resp = wait_until("a free snapshot slot", DEADLINE, || async {
            let resp = c.http.get(&url).send().await.ok()?;
            (resp.status() == 200).then_some(resp)
        })
        .await
        .unwrap();
        resp.chunk().await.unwrap();
        drop(resp);
    }
    let b = wait_until("a backup once abandoned streams ended", DEADLINE, || async {
        backup(&c, 0).await.ok()
    })
    .await
    .unwrap();
    assert_eq!(decode(&b).data.len(), 3000);

    // Paced: the same backup at 4 MiB/s takes at least its size over that rate.
    let rate = 4u64 << 20;
    let started = Instant::now();
    let paced = c
        .http
        .get(format!("{url}?max_bytes_per_sec={rate}"))
        .timeout(Duration::from_secs(60))
        .send()
        .await
        .unwrap();
    assert_eq!(paced.status(), 200);
    let meta = snapshot_meta(&paced).unwrap();
    let meta_size = meta.size;
    let body = paced.bytes().await.unwrap().to_vec();
    let took = started.elapsed().as_secs_f64();
    let floor = meta.size as f64 / rate as f64;
    assert!(
        took >= floor * 0.9,
        "{} bytes at {rate} B/s took {took:.2} s",
        meta.size
    );
    assert_eq!(decode(&Backup { meta, body }).data.len(), 3000);
    for bad in ["max_bytes_per_sec=5", "max_bytes_per_sec=fast", "rate=1"] {
        let r = c.get(0, &format!("/v1/snapshot?{bad}")).await.unwrap();
        assert_eq!(
            (r.status, r.json()["error"].clone()),
            (400, json!("invalid_query")),
            "{bad}"
        );
    }

    // Every stream is counted by how it ended, and its bytes too.
    let counted = |text: &str, name: &str| -> u64 {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.trim().parse::<f64>().ok())
            .map_or(0, |v| v as u64)
    };
    wait_until("the backup streams in /metrics", DEADLINE, || async {
        let text = c.get(0, "/metrics").await.ok()?.text();
        let complete = counted(&text, "raftkv_backup_streams_total{outcome=\"complete\"}");
        let gone = counted(&text, "raftkv_backup_streams_total{outcome=\"client_gone\"}");
        let bytes = counted(&text, "raftkv_backup_bytes_total");
        (complete >= 2 && gone >= 1 && bytes >= 2 * meta_size).then_some(())
    })
    .await
    .unwrap();

    // A member that belongs to no cluster has nothing to back up.
    let root = tempfile::tempdir().unwrap();
    let fast: Vec<&str> = FAST.to_vec();
    let lone = Member::spawn(root.path(), "lone", &fast).await.unwrap();
    let resp = c.http.get(format!("{}/v1/snapshot", lone.url())).send().await.unwrap();
    assert_eq!(resp.status(), 503);
    let err: Value = resp.json().await.unwrap();
    assert_eq!(err["error"], "not_member", "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_cut_off_from_its_quorum_refuses_a_backup_rather_than_serve_stale_state() {
    use nix::sys::signal::Signal;
    let mut c = Cluster::start(3, &[]).await.unwrap();
    let leader = c.leader().await.unwrap();
    let (follower, other) = ((leader + 1) % 3, (leader + 2) % 3);
    assert_eq!(c.put(leader, "before", "the cut").await.unwrap().status, 200);
    // The follower's peers stop answering: it cannot confirm that its state is current.
    c.members[leader].signal(Signal::SIGSTOP).unwrap();
    c.members[other].signal(Signal::SIGSTOP).unwrap();
    let refused = c.get(follower, "/v1/snapshot").await;
    c.members[leader].signal(Signal::SIGCONT).unwrap();
    c.members[other].signal(Signal::SIGCONT).unwrap();
    let refused = refused.unwrap();
    assert_eq!(refused.status, 503, "{}", refused.text());
    let code = refused.json()["error"].as_str().unwrap_or_default().to_string();
    assert!(
        ["read_timeout", "no_leader"].contains(&code.as_str()),
        "{}",
        refused.text()
    );

    c.wait_healthy().await.unwrap();
    let b = wait_until("a backup once the member is back", DEADLINE, || async {
        backup(&c, follower).await.ok()
    })
    .await
    .unwrap();
    let state = decode(&b);
    assert_eq!(keys_of(&state).get("before").map(|(v, _)| v.as_str()), Some("the cut"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_that_fails_mid_way_ends_short_of_its_length_and_the_member_serves_on() {
    let mut c = Cluster::start(1, &[]).await.unwrap();
    load(&c, 2000, 4000, 8).await.unwrap();
    // The fifth chunk's hand-over fails: a failure inside the member, not a lost connection.
    c.members[0].env = vec![("FAILPOINTS".into(), "backup::send_chunk=4*off->1*return->off".into())];
    c.members[0].stop().await.unwrap();
    c.members[0].restart().await.unwrap();
    c.wait_healthy().await.unwrap();
    let url = format!("{}/v1/snapshot", c.members[0].url());
    let mut resp = c.http.get(&url).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let meta = snapshot_meta(&resp).unwrap();
    let mut received = Vec::new();
    let broke = loop {
        match resp.chunk().await {
            Ok(Some(chunk)) => received.extend_from_slice(&chunk),
            Ok(None) => break false,
            Err(_) => break true,
        }
    };
    assert!(broke, "a failed stream ended like a complete one");
    assert!(
        (received.len() as u64) < meta.size,
        "{} of {} bytes",
        received.len(),
        meta.size
    );
    assert!(KvState::read_snapshot(&received[..]).unwrap_err().contains("truncated"));
    let text = c.get(0, "/metrics").await.unwrap().text();
    assert!(
        text.contains("raftkv_backup_streams_total{outcome=\"failed\"} 1"),
        "{text}"
    );
    // The fail point fired once; the next backup is whole, and writes go on.
    assert_eq!(decode(&backup(&c, 0).await.unwrap()).data.len(), 2000);
    assert_eq!(c.put(0, "after", "failure").await.unwrap().status, 200);
}
