//! Cluster behaviour with real `raftkv-node` processes: replication, crash safety, restarts,
//! snapshot catch-up, membership changes and bad input.

mod support;

use std::collections::HashMap;
use std::sync::Arc;

use parking_lot::Mutex;
use reqwest::Method;
use serde_json::json;
use support::{wait_until, Cluster, DEADLINE};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicated_put_get_delete_and_cas_work_through_any_member() {
    let mut c = Cluster::start(3, &[]).await.unwrap();
    let leader = c.leader().await.unwrap();
    let follower = (leader + 1) % 3;

    let put = c.put(follower, "fruit", "apple").await.unwrap();
    assert_eq!(put.status, 200, "{}", put.text());
    let rev = put.json()["revision"].as_u64().unwrap();
    for i in 0..3 {
        let got = c.get(i, "/v1/kv/fruit").await.unwrap();
        assert_eq!((got.status, got.text()), (200, "apple".to_string()), "member {i}");
        assert_eq!(got.etag.as_deref(), Some(format!("\"{rev}\"").as_str()));
    }

    // Compare-and-swap: a stale revision fails and changes nothing; the current one succeeds.
    let stale = c
        .request(
            Method::PUT,
            leader,
            "/v1/kv/fruit",
            &[("if-match", "\"1\"")],
            Some(b"pear".to_vec()),
        )
        .await
        .unwrap();
    assert_eq!(stale.status, 412);
    assert_eq!(stale.json()["current_revision"], json!(rev));
    let tag = format!("\"{rev}\"");
    let cas = c
        .request(
            Method::PUT,
            follower,
            "/v1/kv/fruit",
            &[("if-match", tag.as_str())],
            Some(b"pear".to_vec()),
        )
        .await
        .unwrap();
    assert_eq!(cas.status, 200, "{}", cas.text());
    let create_only = c
        .request(
            Method::PUT,
            follower,
            "/v1/kv/fruit",
            &[("if-none-match", "*")],
            Some(b"fig".to_vec()),
        )
        .await
        .unwrap();
    assert_eq!(create_only.status, 412);
    assert_eq!(c.get((follower + 1) % 3, "/v1/kv/fruit").await.unwrap().text(), "pear");

    // Range listing sees both keys in order, with pagination.
    c.put(leader, "fruit2", "kiwi").await.unwrap();
    let page = c.get(follower, "/v1/kv?prefix=fruit&limit=1").await.unwrap().json();
    assert_eq!(page["items"][0]["key"], "fruit");
    assert_eq!(page["more"], true);
    let rest = c
        .get(follower, "/v1/kv?prefix=fruit&start_after=fruit")
        .await
        .unwrap()
        .json();
    assert_eq!(rest["items"][0]["value"], "kiwi");
    assert_eq!(rest["more"], false);

    // Keys are bytes: a listing by a binary prefix (percent-encoded in the query like the key in
    // the path) finds them, and a malformed escape is an error rather than a prefix of nothing.
    for key in ["bin%FF%00a", "bin%ff%01b", "bio"] {
        let put = c
            .request(Method::PUT, leader, &format!("/v1/kv/{key}"), &[], Some(b"v".to_vec()))
            .await
            .unwrap();
        assert_eq!(put.status, 200, "{}", put.text());
    }
    let binary = c.get(follower, "/v1/kv?prefix=bin%ff").await.unwrap().json();
    let keys: Vec<_> = binary["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["key_base64"].clone())
        .collect();
    assert_eq!(
        keys,
        ["Ymlu/wBh", "Ymlu/wFi"].map(|k| serde_json::json!(k)).to_vec(),
        "{binary}"
    );
    let after = c
        .get(follower, "/v1/kv?prefix=bin%ff&start_after=bin%ff%00a")
        .await
        .unwrap()
        .json();
    assert_eq!(after["items"].as_array().unwrap().len(), 1, "{after}");
    for bad in [
        "/v1/kv?prefix=bin%zz",
        "/v1/kv?prefix=bin%f",
        "/v1/kv?prefix=a&prefix=b",
    ] {
        let r = c.get(follower, bad).await.unwrap();
        assert_eq!(r.status, 400, "{bad}: {}", r.text());
        assert_eq!(r.json()["error"], "invalid_query", "{bad}");
    }

    // Delete through a follower, then the key is gone everywhere.
    let del = c.delete(follower, "/v1/kv/fruit").await.unwrap();
    assert_eq!(del.status, 200);
    assert_eq!(del.json()["deleted"], true);
    assert_eq!(c.delete(leader, "/v1/kv/fruit").await.unwrap().json()["deleted"], false);
    for i in 0..3 {
        assert_eq!(c.get(i, "/v1/kv/fruit").await.unwrap().status, 404);
    }
    // A stale read on each member converges on the same answer.
    for i in 0..3 {
        wait_until("stale read to see the delete", DEADLINE, || async {
            (c.get(i, "/v1/kv/fruit?stale=true").await.ok()?.status == 404).then_some(())
        })
        .await
        .unwrap();
    }
}

/// Acknowledged writes: key -> (value, revision).
type Acked = Arc<Mutex<HashMap<String, (String, u64)>>>;

/// One hostile request and the answer it must get: method, path, headers, body, status, error code.
type BadRequest<'a> = (Method, &'a str, Vec<(&'a str, &'a str)>, Option<Vec<u8>>, u16, &'a str);

/// Writes from `clients` concurrent writers until told to stop; returns every acknowledged
/// write as key -> (value, revision).
fn spawn_writers(
    c: &Arc<Cluster>,
    clients: usize,
    stop: &Arc<std::sync::atomic::AtomicBool>,
) -> (Vec<tokio::task::JoinHandle<()>>, Acked) {
    let acked = Arc::new(Mutex::new(HashMap::new()));
    let mut tasks = Vec::new();
    for client in 0..clients {
        let (c, stop, acked) = (c.clone(), stop.clone(), acked.clone());
        tasks.push(tokio::spawn(async move {
            let mut n = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                n += 1;
                let key = format!("c{client}-{n}");
                let value = format!("v{n}-{}", "x".repeat((n % 7) as usize));
                let member = (client + n as usize) % c.members.len();
                if let Ok(r) = c.put(member, &key, &value).await {
                    if r.status == 200 {
                        acked
                            .lock()
                            .insert(key, (value, r.json()["revision"].as_u64().unwrap()));
                    }
                }
            }
        }));
    }
    (tasks, acked)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_acknowledged_write_survives_kill_9_of_the_leader_under_load() {
    let mut c = Cluster::start(3, &[]).await.unwrap();
    let leader = c.leader().await.unwrap();
    let c = Arc::new(c);
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (tasks, acked) = spawn_writers(&c, 8, &stop);
    wait_until("some writes before the crash", DEADLINE, || async {
        (acked.lock().len() >= 100).then_some(())
    })
    .await
    .unwrap();
    c.members[leader].sigkill();
    let before = acked.lock().len();
    wait_until("writes acknowledged by the new leader", DEADLINE, || async {
        (acked.lock().len() >= before + 100).then_some(())
    })
    .await
    .unwrap();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for t in tasks {
        t.await.unwrap();
    }
    let mut c = Arc::try_unwrap(c).unwrap_or_else(|_| panic!("writers still hold the cluster"));
    c.members[leader].kill();
    c.members[leader].restart().await.unwrap();
    c.wait_healthy().await.unwrap();

    let all = acked.lock().clone();
    assert!(
        before >= 100 && all.len() >= 200,
        "too few acknowledged writes: {}",
        all.len()
    );
    for i in 0..3 {
        let listing = c.get(i, "/v1/kv?prefix=c&limit=10000").await.unwrap().json();
        let items: HashMap<String, (String, u64)> = listing["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|it| {
                (
                    it["key"].as_str().unwrap().to_string(),
                    (
                        it["value"].as_str().unwrap().to_string(),
                        it["revision"].as_u64().unwrap(),
                    ),
                )
            })
            .collect();
        for (key, expected) in &all {
            assert_eq!(
                items.get(key),
                Some(expected),
                "member {i} lost acknowledged write {key}"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_cluster_restart_after_kill_9_keeps_every_key() {
    let mut c = Cluster::start(3, &["--snapshot-count", "150"]).await.unwrap();
    for n in 0..400 {
        let r = c.put(n % 3, &format!("k{n:04}"), &format!("value-{n}")).await.unwrap();
        assert_eq!(r.status, 200, "{}", r.text());
    }
    for m in &mut c.members {
        m.kill();
    }
    for m in &mut c.members {
        m.restart().await.unwrap();
    }
    c.wait_healthy().await.unwrap();
    for i in 0..3 {
        let listing = c.get(i, "/v1/kv?prefix=k&limit=10000").await.unwrap().json();
        let items = listing["items"].as_array().unwrap();
        assert_eq!(items.len(), 400, "member {i}");
        for (n, it) in items.iter().enumerate() {
            assert_eq!(it["key"], format!("k{n:04}"));
            assert_eq!(it["value"], format!("value-{n}"));
        }
        let status = c.status(i).await.unwrap();
        assert!(
            status["snapshot_index"].as_u64().unwrap() > 1,
            "snapshots were taken: {status}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_that_missed_more_than_snapshot_count_entries_catches_up_by_snapshot() {
    let mut c = Cluster::start(3, &["--snapshot-count", "100", "--snapshot-catchup-entries", "10"])
        .await
        .unwrap();
    let leader = c.leader().await.unwrap();
    let lagger = (leader + 1) % 3;
    c.members[lagger].stop().await.unwrap();
    for n in 0..350 {
        let r = c.put(leader, &format!("s{n:04}"), "payload").await.unwrap();
        assert_eq!(r.status, 200, "{}", r.text());
    }
    c.members[lagger].restart().await.unwrap();
    c.wait_healthy().await.unwrap();
    // Ready tolerates a small lag, so wait for the last write to arrive locally.
    wait_until("the lagging follower to hold the last write", DEADLINE, || async {
        (c.get(lagger, "/v1/kv/s0349?stale=true").await.ok()?.status == 200).then_some(())
    })
    .await
    .unwrap();
    let metrics = c.get(lagger, "/metrics").await.unwrap().text();
    let applied: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("raftkv_snapshots_applied_total "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    assert!(applied >= 1, "the follower caught up without a snapshot:\n{metrics}");
    let listing = c
        .get(lagger, "/v1/kv?prefix=s&stale=true&limit=10000")
        .await
        .unwrap()
        .json();
    assert_eq!(listing["items"].as_array().unwrap().len(), 350);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scale_3_to_5_to_3_adds_learners_then_promotes_and_removes_the_leader_last() {
    let mut c = Cluster::start(3, &["--snapshot-count", "50"]).await.unwrap();
    for n in 0..120 {
        c.put(n % 3, &format!("d{n:03}"), "v").await.unwrap();
    }
    // Scale up: new members start empty and catch up through a snapshot as learners.
    for _ in 0..2 {
        let i = c.spawn_member().await.unwrap();
        c.add_and_promote(i).await.unwrap();
    }
    c.wait_healthy().await.unwrap();
    let members = c.membership(0).await.unwrap();
    assert_eq!(members.values().filter(|r| *r == "voter").count(), 5, "{members:?}");
    for i in 3..5 {
        let got = c.get(i, "/v1/kv/d119").await.unwrap();
        assert_eq!(got.status, 200, "new member {i} serves the data");
    }

    // Scale down to three: a follower first, the leader last and only after a transfer.
    let leader = c.leader().await.unwrap();
    let refused = c
        .delete(leader, &format!("/v1/members/{}", c.members[leader].id))
        .await
        .unwrap();
    assert_eq!(
        (refused.status, refused.json()["error"].as_str()),
        (409, Some("is_leader"))
    );
    let follower = (0..5).find(|&i| i != leader).unwrap();
    let to_remove = vec![follower, leader];
    let survivors: Vec<usize> = (0..5).filter(|i| !to_remove.contains(i)).collect();
    for &i in &to_remove {
        let id = c.members[i].id;
        if c.leader().await.unwrap() == i {
            let target = c.members[survivors[0]].id;
            let moved = c
                .retry_admin("transfer", || {
                    c.post(survivors[0], "/v1/leader", Some(json!({"id": target})))
                })
                .await
                .unwrap();
            assert_eq!(moved.status, 200, "{}", moved.text());
        }
        let path = format!("/v1/members/{id}");
        let removed = c.retry_admin("remove", || c.delete(survivors[1], &path)).await.unwrap();
        assert_eq!(removed.status, 200, "removing {id}: {}", removed.text());
    }
    let members = c.membership(survivors[0]).await.unwrap();
    let expected: Vec<u64> = survivors.iter().map(|&i| c.members[i].id).collect();
    assert_eq!(members.keys().copied().collect::<Vec<_>>().len(), 3, "{members:?}");
    for id in &expected {
        assert_eq!(members.get(id).map(String::as_str), Some("voter"), "{members:?}");
    }
    for &i in &to_remove {
        let status = wait_until("the removed member to know", DEADLINE, || async {
            let s = c.status(i).await?;
            (s["membership"] == "removed").then_some(s)
        })
        .await
        .unwrap();
        assert_eq!(status["role"], "removed");
    }
    for &i in &survivors {
        assert_eq!(c.get(i, "/v1/kv/d000").await.unwrap().status, 200);
    }
    assert_eq!(c.put(survivors[2], "after", "scale-down").await.unwrap().status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removed_member_refuses_to_rejoin_on_its_old_volume() {
    let mut c = Cluster::start(3, &[]).await.unwrap();
    let leader = c.leader().await.unwrap();
    let victim = (leader + 1) % 3;
    let id = c.members[victim].id;
    let path = format!("/v1/members/{id}");
    let r = c.retry_admin("remove", || c.delete(leader, &path)).await.unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    wait_until("the removed member to record its removal", DEADLINE, || async {
        (c.status(victim).await?["membership"] == "removed").then_some(())
    })
    .await
    .unwrap();
    c.members[victim].stop().await.unwrap();
    let out = c.members[victim].run_to_exit();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("was removed") && stderr.contains(&id.to_string()),
        "{stderr}"
    );
    // Re-adding the same id is refused too: ids are never reused.
    let readd = c
        .post(
            leader,
            "/v1/members",
            Some(json!({"id": id, "peer_url": c.members[victim].peer_url()})),
        )
        .await
        .unwrap();
    assert_eq!(
        (readd.status, readd.json()["error"].as_str()),
        (409, Some("id_removed"))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_listing_page_ends_at_its_byte_budget_and_continues_from_there() {
    let c = Cluster::start(1, &[]).await.unwrap();
    let value = "v".repeat(1 << 20);
    for i in 0..6 {
        let put = c.put(0, &format!("big/{i}"), &value).await.unwrap();
        assert_eq!(put.status, 200, "{}", put.text());
    }
    // Six values of 1 MiB do not fit the 4 MiB page: it ends after four, and says there is more.
    let page = c.get(0, "/v1/kv?prefix=big/").await.unwrap().json();
    let items = page["items"].as_array().unwrap();
    assert_eq!(items.len(), 4, "page of {} items", items.len());
    assert_eq!(page["more"], true);
    let rest = c.get(0, "/v1/kv?prefix=big/&start_after=big/3").await.unwrap().json();
    let keys: Vec<&str> = rest["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["key"].as_str().unwrap())
        .collect();
    assert_eq!(keys, ["big/4", "big/5"]);
    assert_eq!(rest["more"], false);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_a_clear_4xx_and_the_cluster_stays_healthy() {
    let mut c = Cluster::start(3, &["--max-value-size", "1024"]).await.unwrap();
    let long_key = "k".repeat(4097);
    let long_path = format!("/v1/kv/{long_key}");
    let cases: Vec<BadRequest> = vec![
        (Method::PUT, "/v1/kv/", vec![], Some(b"v".to_vec()), 400, "invalid_key"),
        (
            Method::PUT,
            long_path.as_str(),
            vec![],
            Some(b"v".to_vec()),
            400,
            "invalid_key",
        ),
        (
            Method::PUT,
            "/v1/kv/%zz",
            vec![],
            Some(b"v".to_vec()),
            400,
            "invalid_key",
        ),
        (
            Method::PUT,
            "/v1/kv/big",
            vec![],
            Some(vec![b'x'; 1025]),
            413,
            "too_large",
        ),
        (
            Method::PUT,
            "/v1/kv/cas",
            vec![("if-match", "7")],
            Some(b"v".to_vec()),
            400,
            "invalid_precondition",
        ),
        (
            Method::PUT,
            "/v1/kv/cas",
            vec![("if-none-match", "\"7\"")],
            Some(b"v".to_vec()),
            400,
            "invalid_precondition",
        ),
        (Method::GET, "/v1/nope", vec![], None, 404, "not_found"),
        (Method::GET, "/v1/kv?limit=abc", vec![], None, 400, "invalid_query"),
        (Method::GET, "/v1/kv/x?stale=maybe", vec![], None, 400, "invalid_query"),
        (Method::PATCH, "/v1/kv/x", vec![], None, 405, "method_not_allowed"),
        (
            Method::POST,
            "/v1/members",
            vec![],
            Some(b"{not json".to_vec()),
            400,
            "invalid_json",
        ),
        (
            Method::POST,
            "/v1/members",
            vec![],
            Some(br#"{"id":5,"peer_url":"ftp://x"}"#.to_vec()),
            400,
            "invalid_peer_url",
        ),
        (Method::POST, "/v1/members/abc/promote", vec![], None, 400, "invalid_id"),
        (Method::GET, "/v1/kv?limit=0", vec![], None, 400, "invalid_limit"),
        (Method::POST, "/v1/bootstrap", vec![], None, 409, "already_initialized"),
    ];
    for (method, path, headers, body, status, code) in cases {
        let r = c.request(method.clone(), 1, path, &headers, body).await.unwrap();
        assert_eq!(r.status, status, "{method} {path}: {}", r.text());
        assert_eq!(r.json()["error"], code, "{method} {path}: {}", r.text());
    }
    // A body over the limit without Content-Length (chunked) is refused as well.
    let chunks = futures::stream::iter((0..8).map(|_| Ok::<_, std::io::Error>(vec![b'y'; 256])));
    let r = c
        .http
        .put(format!("{}/v1/kv/chunked", c.members[0].url()))
        .body(reqwest::Body::wrap_stream(chunks))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 413);
    // The rest of the body was never read: the connection must not be reused.
    assert_eq!(
        r.headers().get("connection").and_then(|v| v.to_str().ok()),
        Some("close")
    );
    // Nothing above reached the store, and the cluster still serves.
    for key in ["big", "cas", "chunked"] {
        assert_eq!(c.get(0, &format!("/v1/kv/{key}")).await.unwrap().status, 404, "{key}");
    }
    assert_eq!(c.put(2, "fine", "ok").await.unwrap().status, 200);
    c.wait_healthy().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_of_another_cluster_refuses_its_messages_and_never_joins() {
    let a = Cluster::start(1, &[]).await.unwrap();
    let b = Cluster::start(1, &[]).await.unwrap();
    assert_eq!(b.put(0, "owner", "cluster-b").await.unwrap().status, 200);
    let b_status = b.status(0).await.unwrap();

    // Cluster A is told to add B's member; B must refuse A's leader (other cluster id), so the
    // learner never catches up and can never be promoted.
    let body = json!({"id": b.members[0].id, "peer_url": b.members[0].peer_url()});
    let added = a.post(0, "/v1/members", Some(body)).await.unwrap();
    assert_eq!(added.status, 200, "{}", added.text());
    let promote = a
        .post(0, &format!("/v1/members/{}/promote", b.members[0].id), None)
        .await
        .unwrap();
    assert_eq!(
        (promote.status, promote.json()["error"].as_str()),
        (409, Some("learner_lagging"))
    );
    let log_path = b.members[0].log.clone();
    wait_until("B to refuse A's leader", DEADLINE, || {
        let log = std::fs::read_to_string(&log_path).unwrap_or_default();
        async move { log.contains("refused a peer of another cluster").then_some(()) }
    })
    .await
    .unwrap();

    let after = b.status(0).await.unwrap();
    assert_eq!(after["cluster_id"], b_status["cluster_id"]);
    assert_eq!(after["role"], "leader");
    assert_eq!(b.get(0, "/v1/kv/owner").await.unwrap().text(), "cluster-b");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_reads_right_after_a_crash_never_serve_older_state_than_before() {
    let mut c = Cluster::start(1, &[]).await.unwrap();
    let mut last = 0;
    for i in 1..=30 {
        let r = c.put(0, "counter", &i.to_string()).await.unwrap();
        assert_eq!(r.status, 200, "{}", r.text());
        last = i;
    }
    let before = c.get(0, "/v1/kv/counter?stale=true").await.unwrap();
    assert_eq!(before.text(), last.to_string());
    c.members[0].kill();
    c.members[0].restart().await.unwrap();
    // The very first stale read of the new process: the member recovered a snapshot and a WAL
    // whose replay waits for Raft; it must not answer from the older state meanwhile.
    let after = c.get(0, "/v1/kv/counter?stale=true").await.unwrap();
    assert!(
        after.status == 503 || (after.status == 200 && after.text() == last.to_string()),
        "stale read after restart answered {} {:?} after {last} was acknowledged and read",
        after.status,
        after.text()
    );
    let settled = c.get(0, "/v1/kv/counter?stale=true").await.unwrap();
    assert_eq!((settled.status, settled.text()), (200, last.to_string()));
}
