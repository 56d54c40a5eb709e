//! Watches with real `raftkv-node` processes: replay then live, linearizable start on any member,
//! `410 compacted` and reads at a revision, history across restart and snapshot install, the
//! final event on shutdown and resumption on another member, h2c.

mod support;

use std::time::Duration;

use anyhow::{bail, Context, Result};
use futures::StreamExt;
use raftkv_api::{codes, WatchEvent};
use support::{wait_until, Cluster, DEADLINE};
use tokio::sync::mpsc;

/// One open watch stream: its events, line by line, as they arrive.
struct Stream {
    events: mpsc::UnboundedReceiver<Result<WatchEvent>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Stream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Opens `GET /v1/watch?{query}` on `url`; fails on a non-200 answer, returning its status and body.
async fn open(
    http: &reqwest::Client,
    url: &str,
    query: &str,
) -> Result<std::result::Result<Stream, (u16, serde_json::Value)>> {
    let resp = http.get(format!("{url}/v1/watch?{query}")).send().await?;
    if resp.status() != 200 {
        let status = resp.status().as_u16();
        return Ok(Err((status, resp.json().await?)));
    }
    let (tx, events) = mpsc::unbounded_channel();
    let mut body = resp.bytes_stream();
    let task = tokio::spawn(async move {
        let mut buf = Vec::new();
        while let Some(chunk) = body.next().await {
            let Ok(chunk) = chunk else { return };
            buf.extend_from_slice(&chunk);
            while let Some(end) = buf.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = buf.drain(..=end).collect();
                let event =
                    serde_json::from_slice(&line[..end]).with_context(|| String::from_utf8_lossy(&line).into_owned());
                if tx.send(event).is_err() {
                    return;
                }
            }
        }
    });
    Ok(Ok(Stream { events, task }))
}

impl Stream {
    /// The next event, or `None` once the stream ended.
    async fn next(&mut self) -> Result<Option<WatchEvent>> {
        match tokio::time::timeout(DEADLINE, self.events.recv()).await {
            Err(_) => bail!("no watch event within {DEADLINE:?}"),
            Ok(None) => Ok(None),
            Ok(Some(e)) => e.map(Some),
        }
    }

    /// The next `n` put and delete events as (type, key, revision), skipping progress events.
    async fn changes(&mut self, n: usize) -> Result<Vec<(String, String, u64)>> {
        let mut out = Vec::new();
        while out.len() < n {
            match self.next().await? {
                Some(WatchEvent::Put(c)) => out.push(("put".into(), c.key.unwrap_or_default(), c.revision)),
                Some(WatchEvent::Delete(c)) => out.push(("delete".into(), c.key.unwrap_or_default(), c.revision)),
                Some(WatchEvent::Progress(_)) => {}
                other => bail!("expected a change, got {other:?} after {out:?}"),
            }
        }
        Ok(out)
    }
}

/// A client without an overall timeout: watch streams outlive any request deadline.
fn streaming_client() -> reqwest::Client {
    reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(5))
        .build()
        .unwrap()
}

async fn put_rev(c: &Cluster, i: usize, key: &str, value: &str) -> Result<u64> {
    let r = c.put(i, key, value).await?;
    if r.status != 200 {
        bail!("put {key}: {} {}", r.status, r.text());
    }
    r.json()["revision"].as_u64().context("revision")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_replays_from_a_revision_then_streams_live_changes_in_order() {
    let mut c = Cluster::start(3, &["--watch-progress-ms", "200"]).await.unwrap();
    let leader = c.leader().await.unwrap();
    let follower = (leader + 1) % 3;
    let http = streaming_client();
    let first = put_rev(&c, leader, "g/a", "1").await.unwrap();
    put_rev(&c, leader, "other", "x").await.unwrap();
    let second = put_rev(&c, leader, "g/b", "2").await.unwrap();

    let mut w = open(
        &http,
        &c.members[follower].url(),
        &format!("prefix=g/&start_revision={first}&prev_value=true&progress_notify=true"),
    )
    .await
    .unwrap()
    .unwrap();
    assert_eq!(
        w.changes(2).await.unwrap(),
        vec![
            ("put".into(), "g/a".into(), first),
            ("put".into(), "g/b".into(), second)
        ]
    );
    // progress_notify: the replay is done and says where it stands.
    match w.next().await.unwrap() {
        Some(WatchEvent::Progress(p)) => assert!(p.revision >= second, "{p:?}"),
        other => panic!("expected progress after the replay, got {other:?}"),
    }
    let third = put_rev(&c, follower, "g/a", "3").await.unwrap();
    put_rev(&c, leader, "h/x", "no").await.unwrap();
    let del = c.delete(leader, "/v1/kv/g/b").await.unwrap();
    assert_eq!(del.status, 200);
    let del_rev = del.json()["revision"].as_u64().unwrap();
    let mut live = Vec::new();
    while live.len() < 2 {
        match w.next().await.unwrap() {
            Some(WatchEvent::Put(p)) => {
                assert_eq!(p.prev_value.as_deref(), Some("1"), "prev_value of {p:?}");
                assert_eq!(p.create_revision, Some(first));
                live.push(("put", p.key.unwrap(), p.revision));
            }
            Some(WatchEvent::Delete(d)) => {
                assert_eq!(d.prev_value.as_deref(), Some("2"));
                live.push(("delete", d.key.unwrap(), d.revision));
            }
            Some(WatchEvent::Progress(_)) => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(
        live,
        vec![("put", "g/a".into(), third), ("delete", "g/b".into(), del_rev)]
    );
    // Idle: progress events every 200 ms report the position.
    match w.next().await.unwrap() {
        Some(WatchEvent::Progress(p)) => assert!(p.revision >= del_rev),
        other => panic!("expected an idle progress event, got {other:?}"),
    }

    // A key watch sees that key only; bad queries are JSON errors.
    let mut k = open(
        &http,
        &c.members[leader].url(),
        &format!("key=g/a&start_revision={first}"),
    )
    .await
    .unwrap()
    .unwrap();
    assert_eq!(
        k.changes(2).await.unwrap(),
        vec![("put".into(), "g/a".into(), first), ("put".into(), "g/a".into(), third)]
    );
    for bad in [
        "",
        "prefix=a&key=b",
        "key=",
        "start_revision=x&prefix=",
        "prefix=%zz",
        "key=a&key=b",
    ] {
        let (status, body) = open(&http, &c.members[leader].url(), bad).await.unwrap().err().unwrap();
        assert_eq!(status, 400, "{bad}: {body}");
        assert!(body["error"].is_string(), "{body}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_opened_after_an_acknowledged_write_sees_it_on_every_member() {
    let mut c = Cluster::start(3, &[]).await.unwrap();
    let leader = c.leader().await.unwrap();
    let http = streaming_client();
    for round in 0..5 {
        let key = format!("lin/{round}");
        let rev = put_rev(&c, leader, &key, "v").await.unwrap();
        for i in 0..3 {
            // Opened right after the acknowledgement, on a member that may not have applied it.
            let mut w = open(&http, &c.members[i].url(), &format!("prefix=lin/&start_revision={rev}"))
                .await
                .unwrap()
                .unwrap();
            assert_eq!(
                w.changes(1).await.unwrap(),
                vec![("put".into(), key.clone(), rev)],
                "member {i}"
            );
            // Without a start revision the position already includes the write, and the
            // answer says where the stream starts.
            let resp = http
                .get(format!("{}/v1/watch?prefix=lin/", c.members[i].url()))
                .send()
                .await
                .unwrap();
            let after: u64 = resp.headers()["x-raftkv-revision"].to_str().unwrap().parse().unwrap();
            assert!(
                after >= rev,
                "member {i}: the watch starts after {after}, before the write at {rev}"
            );
            drop(resp);
            let mut now = open(&http, &c.members[i].url(), "prefix=lin/&progress_notify=true")
                .await
                .unwrap()
                .unwrap();
            match now.next().await.unwrap() {
                Some(WatchEvent::Progress(p)) => assert!(p.revision >= rev, "member {i}: {p:?} < {rev}"),
                other => panic!("member {i}: expected progress, got {other:?}"),
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_compacted_revision_answers_410_and_reads_at_a_retained_revision_see_the_past() {
    let mut c = Cluster::start(1, &["--watch-history-changes", "10"]).await.unwrap();
    let leader = c.leader().await.unwrap();
    let http = streaming_client();
    let mut revs = Vec::new();
    for i in 0..30 {
        revs.push(
            put_rev(&c, leader, &format!("r/{}", i % 3), &i.to_string())
                .await
                .unwrap(),
        );
    }
    let status = c.status(leader).await.unwrap();
    let compact = status["watch"]["compact_revision"].as_u64().unwrap();
    assert_eq!(compact, revs[19], "ten changes retained: {status}");
    assert_eq!(status["watch"]["history_changes"], 10);

    let (code, body) = open(
        &http,
        &c.members[leader].url(),
        &format!("prefix=&start_revision={compact}"),
    )
    .await
    .unwrap()
    .err()
    .expect("a compacted start is refused");
    assert_eq!((code, body["error"].as_str()), (410, Some(codes::COMPACTED)));
    assert_eq!(body["compact_revision"], compact);
    let mut w = open(
        &http,
        &c.members[leader].url(),
        &format!("prefix=&start_revision={}", compact + 1),
    )
    .await
    .unwrap()
    .unwrap();
    assert_eq!(w.changes(10).await.unwrap().last().unwrap().2, revs[29]);

    // Reads at a revision: the value then, its revision, and 410 / 400 outside the history.
    let at = c
        .get(leader, &format!("/v1/kv/r/0?revision={}", revs[24]))
        .await
        .unwrap();
    assert_eq!((at.status, at.text()), (200, "24".to_string()));
    assert_eq!(at.etag.as_deref(), Some(format!("\"{}\"", revs[24]).as_str()));
    let listed = c
        .get(leader, &format!("/v1/kv?prefix=r/&revision={}", revs[22]))
        .await
        .unwrap()
        .json();
    let values: Vec<_> = listed["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["value"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(values, vec!["21", "22", "20"]);
    assert_eq!(listed["revision"], revs[22]);
    let gone = c
        .get(leader, &format!("/v1/kv/r/0?revision={}", compact - 1))
        .await
        .unwrap();
    assert_eq!(gone.status, 410, "{}", gone.text());
    assert_eq!(gone.json()["compact_revision"], compact);
    let future = c.get(leader, "/v1/kv?prefix=&revision=999999").await.unwrap();
    assert_eq!(
        (future.status, future.json()["error"].as_str().map(str::to_string)),
        (400, Some(codes::FUTURE_REVISION.to_string()))
    );

    let metrics = c.get(leader, "/metrics").await.unwrap().text();
    assert!(metrics.contains("raftkv_watchers 1"), "{metrics}");
    drop(w);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_history_survives_a_restart_and_a_snapshot_install() {
    let mut c = Cluster::start(3, &["--snapshot-count", "20", "--snapshot-catchup-entries", "5"])
        .await
        .unwrap();
    let leader = c.leader().await.unwrap();
    let lagging = (leader + 1) % 3;
    let http = streaming_client();
    let mut expected = Vec::new();
    for i in 0..30 {
        let rev = put_rev(&c, leader, &format!("s/{i}"), "v").await.unwrap();
        expected.push(("put".to_string(), format!("s/{i}"), rev));
    }
    c.members[lagging].stop().await.unwrap();
    for i in 30..120 {
        let rev = put_rev(&c, leader, &format!("s/{i}"), "v").await.unwrap();
        expected.push(("put".to_string(), format!("s/{i}"), rev));
    }
    c.members[lagging].restart().await.unwrap();
    // The restarted member catches up by a snapshot taken well after it stopped, then serves
    // the whole history from the first write on: the history came inside the snapshot.
    wait_until("the lagging member installs a snapshot", DEADLINE, || async {
        let m = c.get(lagging, "/metrics").await.ok()?.text();
        m.lines()
            .find_map(|l| l.strip_prefix("raftkv_snapshots_applied_total "))
            .and_then(|v| v.trim().parse::<u64>().ok())
            .filter(|n| *n >= 1)
    })
    .await
    .unwrap();
    let from = expected[0].2;
    for i in 0..3 {
        let mut w = open(&http, &c.members[i].url(), &format!("prefix=s/&start_revision={from}"))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(w.changes(expected.len()).await.unwrap(), expected, "member {i}");
    }
    // And after every member restarts (the snapshot on disk plus the log after it).
    let restarted = (leader + 2) % 3;
    c.members[restarted].stop().await.unwrap();
    c.members[restarted].restart().await.unwrap();
    c.wait_healthy().await.unwrap();
    let mut w = open(
        &http,
        &c.members[restarted].url(),
        &format!("prefix=s/&start_revision={from}"),
    )
    .await
    .unwrap()
    .unwrap();
    assert_eq!(w.changes(expected.len()).await.unwrap(), expected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_ends_with_a_final_event_on_shutdown_and_resumes_exactly_once_on_another_member() {
    let mut c = Cluster::start(3, &[]).await.unwrap();
    let leader = c.leader().await.unwrap();
    let watched = (leader + 1) % 3;
    let other = (leader + 2) % 3;
    let http = streaming_client();
    let mut w = open(&http, &c.members[watched].url(), "prefix=x/")
        .await
        .unwrap()
        .unwrap();
    let mut expected = Vec::new();
    for i in 0..10 {
        let rev = put_rev(&c, leader, &format!("x/{i}"), "v").await.unwrap();
        expected.push(("put".to_string(), format!("x/{i}"), rev));
    }
    let mut seen = w.changes(10).await.unwrap();
    c.members[watched].stop().await.unwrap();
    let position = loop {
        match w.next().await.unwrap() {
            Some(WatchEvent::Error(end)) => {
                assert_eq!(end.error, codes::SHUTTING_DOWN);
                break end.revision;
            }
            Some(WatchEvent::Progress(_)) => {}
            other => panic!("expected the final event, got {other:?}"),
        }
    };
    assert!(w.next().await.unwrap().is_none(), "nothing after the final event");
    // Writes go on while the watcher moves; it resumes right after its position.
    for i in 10..20 {
        let rev = put_rev(&c, leader, &format!("x/{i}"), "v").await.unwrap();
        expected.push(("put".to_string(), format!("x/{i}"), rev));
    }
    let mut resumed = open(
        &http,
        &c.members[other].url(),
        &format!("prefix=x/&start_revision={}", position + 1),
    )
    .await
    .unwrap()
    .unwrap();
    seen.extend(resumed.changes(10).await.unwrap());
    assert_eq!(seen, expected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_streams_over_h2c_too() {
    let mut c = Cluster::start(1, &[]).await.unwrap();
    let leader = c.leader().await.unwrap();
    let h2 = reqwest::Client::builder().http2_prior_knowledge().build().unwrap();
    let mut watches = Vec::new();
    for _ in 0..20 {
        watches.push(open(&h2, &c.members[leader].url(), "prefix=h/").await.unwrap().unwrap());
    }
    let rev = put_rev(&c, leader, "h/1", "v").await.unwrap();
    for w in &mut watches {
        assert_eq!(w.changes(1).await.unwrap(), vec![("put".into(), "h/1".into(), rev)]);
    }
    let status = c.status(leader).await.unwrap();
    assert_eq!(status["watch"]["watchers"], 20, "{status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watcher_that_stops_reading_is_ended_compacted_and_never_holds_up_writes() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut c = Cluster::start(1, &["--watch-history-changes", "20"]).await.unwrap();
    let leader = c.leader().await.unwrap();
    let addr = c.members[leader].url().trim_start_matches("http://").to_string();
    // A client that reads the answer's head, then nothing more.
    let mut slow = tokio::net::TcpStream::connect(&addr).await.unwrap();
    slow.write_all(
        format!("GET /v1/watch?prefix=big/ HTTP/1.1\r\nhost: {addr}\r\nconnection: close\r\n\r\n").as_bytes(),
    )
    .await
    .unwrap();
    let mut head = Vec::new();
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let mut byte = [0u8; 1];
        slow.read_exact(&mut byte).await.unwrap();
        head.push(byte[0]);
    }
    assert!(head.starts_with(b"HTTP/1.1 200"), "{}", String::from_utf8_lossy(&head));
    // Far more than the socket buffers hold, and 10 times the history: every write is still
    // acknowledged at once.
    let value = "v".repeat(256 << 10);
    let started = std::time::Instant::now();
    for i in 0..200 {
        let r = c.put(leader, &format!("big/{i}"), &value).await.unwrap();
        assert_eq!(r.status, 200, "{}", r.text());
    }
    let writes = started.elapsed();
    // Reading again: whatever was buffered, then the final event saying the position is gone.
    let mut rest = Vec::new();
    let read_all = tokio::time::timeout(DEADLINE, slow.read_to_end(&mut rest)).await;
    let text = String::from_utf8_lossy(&rest);
    let last = text
        .lines()
        .rev()
        .find(|l| l.contains("\"type\""))
        .unwrap_or_default()
        .to_string();
    assert!(
        read_all.is_ok(),
        "the stream did not end: {}",
        &text[text.len().saturating_sub(300)..]
    );
    assert!(
        last.contains("\"error\":\"compacted\"") && last.contains("\"compact_revision\""),
        "last event: {}",
        &last[..last.len().min(300)]
    );
    let status = c.status(leader).await.unwrap();
    assert_eq!(status["watch"]["watchers"], 0, "the ended stream is gone: {status}");
    eprintln!("200 writes of 256 KiB with a stalled watcher took {writes:?}");
}
