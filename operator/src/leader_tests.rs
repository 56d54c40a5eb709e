//! Leader election: the pure decision over observed Lease records, and the elector against an
//! in-memory Lease API on tokio's paused clock, so timeouts and deadlines are exact and no test
//! waits in real time.

use std::sync::{Arc, Mutex};

use http::{Method, Request, Response, StatusCode};
use http_body_util::BodyExt;
use k8s_openapi::jiff::SignedDuration;
use kube::client::Body;
use kube::Client;
use serde_json::{json, Value};
use tower_test::mock::{self, Handle, SendResponse};

use super::*;

const SECOND: Duration = Duration::from_secs(1);

fn timings() -> LeaseTimings {
    LeaseTimings::for_lease_duration(15 * SECOND)
}

fn record(holder: &str, resource_version: &str, renew_time: Timestamp) -> LeaseRecord {
    LeaseRecord {
        resource_version: Some(resource_version.into()),
        holder: Some(holder.into()),
        renew_time: Some(MicroTime(renew_time)),
        lease_duration: 15 * SECOND,
    }
}

fn seen(record: LeaseRecord, at: Instant) -> Option<Observation> {
    observe(None, Some(record), at)
}

#[test]
fn client_gos_proportions_hold_for_the_default_duration() {
    let timings = timings().validate().unwrap();
    assert_eq!(
        (timings.renew_deadline, timings.retry_period, timings.attempt_timeout()),
        (10 * SECOND, 2 * SECOND, 5 * SECOND)
    );
}

#[test]
fn a_renew_deadline_as_long_as_the_lease_is_refused() {
    let timings = LeaseTimings {
        lease_duration: 15 * SECOND,
        renew_deadline: 15 * SECOND,
        retry_period: 2 * SECOND,
    };
    assert!(matches!(timings.validate(), Err(Error::Config(_))));
}

#[test]
fn a_missing_or_unheld_lease_is_acquired() {
    let now = Instant::now();
    assert_eq!(decide(None, "me", now), LeaseDecision::Acquire);
    let mut unheld = record("", "1", Timestamp::UNIX_EPOCH);
    assert_eq!(
        decide(seen(unheld.clone(), now).as_ref(), "me", now),
        LeaseDecision::Acquire
    );
    unheld.holder = None;
    assert_eq!(decide(seen(unheld, now).as_ref(), "me", now), LeaseDecision::Acquire);
}

#[test]
fn our_own_lease_is_renewed() {
    let now = Instant::now();
    let ours = seen(record("me", "1", Timestamp::UNIX_EPOCH), now);
    assert_eq!(decide(ours.as_ref(), "me", now), LeaseDecision::Renew);
}

#[test]
fn another_replicas_lease_is_respected_for_a_full_duration_after_it_was_first_seen_however_old_its_renew_time() {
    let start = Instant::now();
    // The holder's clock says it renewed an hour ago; only our own clock counts.
    let old = Timestamp::now() - SignedDuration::from_hours(1);
    let observation = seen(record("other", "7", old), start);
    assert_eq!(decide(observation.as_ref(), "me", start), LeaseDecision::Wait);
    assert_eq!(
        decide(observation.as_ref(), "me", start + 14 * SECOND),
        LeaseDecision::Wait
    );
    assert_eq!(
        decide(observation.as_ref(), "me", start + 15 * SECOND),
        LeaseDecision::Acquire
    );
}

#[test]
fn a_lease_whose_record_keeps_changing_is_never_taken_over() {
    let start = Instant::now();
    let mut observation = None;
    for step in 0..20u32 {
        let now = start + step * 5 * SECOND;
        let renewed = record("other", &step.to_string(), Timestamp::UNIX_EPOCH);
        observation = observe(observation, Some(renewed), now);
        assert_eq!(
            decide(observation.as_ref(), "me", now),
            LeaseDecision::Wait,
            "at step {step}"
        );
    }
}

#[test]
fn an_unchanged_record_is_taken_over_a_duration_after_its_last_change_even_with_the_holders_clock_ahead() {
    let start = Instant::now();
    let ahead = Timestamp::now() + SignedDuration::from_hours(1);
    let stale = record("other", "9", ahead);
    let mut observation = seen(stale.clone(), start);
    for step in 1..=3u32 {
        observation = observe(observation, Some(stale.clone()), start + step * 4 * SECOND);
    }
    assert_eq!(
        observation.as_ref().map(|o| o.changed_at),
        Some(start),
        "re-reads keep the time of the change"
    );
    assert_eq!(
        decide(observation.as_ref(), "me", start + 15 * SECOND),
        LeaseDecision::Acquire
    );
}

/// How the in-memory Lease API treats requests once `healthy_writes` writes succeeded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Afterwards {
    /// Keep answering.
    Serve,
    /// Never answer again, like a connection to a dead API server.
    Hang,
    /// Answer 500.
    Fail,
}

/// An in-memory Lease API: one Lease, resourceVersion checks on replace.
struct LeaseServer {
    /// The stored Lease, once created.
    lease: Option<Value>,
    /// The stored Lease's resourceVersion, raised by every write.
    version: u64,
    /// Writes that succeeded.
    writes: u32,
    /// How many writes succeed before `afterwards` applies.
    healthy_writes: u32,
    /// How requests are treated after `healthy_writes` writes.
    afterwards: Afterwards,
    /// The local time of the last successful write.
    last_write: Option<Instant>,
}

impl LeaseServer {
    fn new(healthy_writes: u32, afterwards: Afterwards) -> Arc<Mutex<Self>> {
        Arc::new(Mutex::new(Self {
            lease: None,
            version: 0,
            writes: 0,
            healthy_writes,
            afterwards,
            last_write: None,
        }))
    }

    fn held_by(holder: &str, renew_time: Timestamp) -> Arc<Mutex<Self>> {
        let server = Self::new(u32::MAX, Afterwards::Serve);
        let lease = json!({
            "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
            "metadata": {"name": "raftkv-operator", "namespace": "ns", "resourceVersion": "1"},
            "spec": {"holderIdentity": holder, "leaseDurationSeconds": 15, "renewTime": MicroTime(renew_time)}
        });
        {
            let mut s = server.lock().unwrap();
            s.lease = Some(lease);
            s.version = 1;
        }
        server
    }

    fn store(&mut self, mut lease: Value) -> Value {
        self.version += 1;
        self.writes += 1;
        self.last_write = Some(Instant::now());
        lease["metadata"]["resourceVersion"] = json!(self.version.to_string());
        self.lease = Some(lease.clone());
        lease
    }

    /// The answer to one request; `None` leaves it unanswered.
    fn answer(&mut self, method: &Method, body: Value) -> Option<(StatusCode, Value)> {
        if self.writes >= self.healthy_writes {
            match self.afterwards {
                Afterwards::Serve => {}
                Afterwards::Hang => return None,
                Afterwards::Fail => return Some((StatusCode::INTERNAL_SERVER_ERROR, status(500, "InternalError"))),
            }
        }
        Some(match (method, &self.lease) {
            (&Method::GET, Some(lease)) => (StatusCode::OK, lease.clone()),
            (&Method::GET, None) => (StatusCode::NOT_FOUND, status(404, "NotFound")),
            (&Method::POST, None) => (StatusCode::CREATED, self.store(body)),
            (&Method::PUT, Some(lease))
                if lease["metadata"]["resourceVersion"] == body["metadata"]["resourceVersion"] =>
            {
                (StatusCode::OK, self.store(body))
            }
            _ => (StatusCode::CONFLICT, status(409, "Conflict")),
        })
    }
}

fn status(code: u16, reason: &str) -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "reason": reason, "code": code})
}

/// An elector talking to `server` through a real `kube::Client`.
fn elector(server: Arc<Mutex<LeaseServer>>, identity: &str) -> LeaderElector {
    let (service, handle) = mock::pair::<Request<Body>, Response<Body>>();
    tokio::spawn(serve(handle, server));
    let api = Api::namespaced(Client::new(service, "ns"), "ns");
    LeaderElector::new(api, "raftkv-operator", identity, timings())
}

async fn serve(mut handle: Handle<Request<Body>, Response<Body>>, server: Arc<Mutex<LeaseServer>>) {
    // Unanswered requests stay here: dropping one would fail it at once instead of hanging it.
    let mut unanswered: Vec<SendResponse<Response<Body>>> = Vec::new();
    while let Some((request, send)) = handle.next_request().await {
        let method = request.method().clone();
        let bytes = request.into_body().collect().await.expect("request body").to_bytes();
        let body = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes).expect("json body")
        };
        let answer = server.lock().unwrap().answer(&method, body);
        match answer {
            Some((code, body)) => send.send_response(
                Response::builder()
                    .status(code)
                    .header("content-type", "application/json")
                    .body(Body::from(serde_json::to_vec(&body).expect("json")))
                    .expect("response"),
            ),
            None => unanswered.push(send),
        }
    }
}

/// Bounds a test on the paused clock: a future that never ends fails the test instead of hanging it.
async fn within<T>(limit: Duration, future: impl Future<Output = T>) -> T {
    tokio::time::timeout(limit, future)
        .await
        .unwrap_or_else(|_| panic!("did not finish within {limit:?}"))
}

#[tokio::test(start_paused = true)]
async fn a_holder_whose_renewal_hangs_stops_leading_at_the_renew_deadline() {
    let server = LeaseServer::new(3, Afterwards::Hang);
    let mut elector = elector(server.clone(), "me");
    let acquired = within(SECOND, elector.acquire()).await;
    let lost = within(4 * timings().lease_duration, elector.hold(acquired)).await;
    let last_write = server.lock().unwrap().last_write.expect("renewed before the hang");
    assert!(matches!(lost, LeaseLost::RenewDeadlinePassed { .. }), "{lost}");
    assert!(
        Instant::now() - last_write <= timings().renew_deadline,
        "led for {:?} after the last renewal",
        Instant::now() - last_write
    );
}

#[tokio::test(start_paused = true)]
async fn a_holder_whose_renewals_fail_keeps_retrying_until_the_renew_deadline_from_its_last_success() {
    let server = LeaseServer::new(4, Afterwards::Fail);
    let mut elector = elector(server.clone(), "me");
    let acquired = within(SECOND, elector.acquire()).await;
    let lost = within(4 * timings().lease_duration, elector.hold(acquired)).await;
    let since_success = Instant::now() - server.lock().unwrap().last_write.unwrap();
    assert!(matches!(lost, LeaseLost::RenewDeadlinePassed { .. }), "{lost}");
    assert!(since_success <= timings().renew_deadline, "{since_success:?}");
    assert!(
        since_success > timings().renew_deadline - timings().retry_period,
        "gave up early: {since_success:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn a_candidate_takes_over_a_silent_lease_one_duration_after_first_seeing_it_whatever_the_holders_clock() {
    // The silent holder's clock ran an hour ahead when it last renewed.
    let server = LeaseServer::held_by("other", Timestamp::now() + SignedDuration::from_hours(1));
    let mut elector = elector(server.clone(), "me");
    let start = Instant::now();
    let acquired = within(2 * timings().lease_duration, elector.acquire()).await;
    let waited = acquired - start;
    assert!(waited >= timings().lease_duration, "took over after {waited:?}");
    assert!(waited < timings().lease_duration + timings().retry_period, "{waited:?}");
    let lease = server.lock().unwrap().lease.clone().unwrap();
    assert_eq!(lease["spec"]["holderIdentity"], "me");
    assert_eq!(lease["spec"]["leaseTransitions"], 1);
}

#[tokio::test(start_paused = true)]
async fn a_holder_that_finds_another_holder_stops_leading_at_once() {
    let server = LeaseServer::new(u32::MAX, Afterwards::Serve);
    let mut elector = elector(server.clone(), "me");
    let acquired = within(SECOND, elector.acquire()).await;
    server.lock().unwrap().lease.as_mut().unwrap()["spec"]["holderIdentity"] = json!("other");
    let lost = within(timings().retry_period + SECOND, elector.hold(acquired)).await;
    assert_eq!(lost, LeaseLost::TakenOver);
}

#[tokio::test]
async fn losing_the_lease_aborts_the_controller_in_the_middle_of_its_work() {
    let (alive, gone) = tokio::sync::oneshot::channel::<()>();
    let (started_tx, started) = tokio::sync::oneshot::channel::<()>();
    let controller = tokio::spawn(async move {
        // A reconcile that would run for a long time; it holds `alive` until it is dropped.
        let _alive = alive;
        let _ = started_tx.send(());
        std::future::pending::<()>().await;
    });
    started.await.expect("the controller started");
    let result = while_leading(async { LeaseLost::TakenOver }, controller).await;
    assert_eq!(result.err(), Some(LeaseLost::TakenOver));
    // The task was aborted, not left running: its state, with the sender, is dropped.
    assert!(gone.await.is_err(), "the controller task still runs");
}

#[tokio::test]
async fn a_controller_that_ends_while_leading_reports_how_it_ended() {
    let controller = tokio::spawn(async { 7 });
    let result = while_leading(std::future::pending(), controller).await;
    assert_eq!(result.ok().map(|ended| ended.ok()), Some(Some(7)));
}

#[test]
fn the_fallback_identity_differs_between_replicas_with_the_same_host_name() {
    let first = fallback_identity();
    let second = fallback_identity();
    assert_ne!(first, second);
    let host = |identity: &str| identity.rsplit_once('_').map(|(host, _)| host.to_string());
    assert_eq!(host(&first), host(&second));
    assert!(!first.starts_with('_'), "{first}");
}

#[tokio::test(start_paused = true)]
async fn a_released_lease_is_taken_over_at_the_next_attempt() {
    let server = LeaseServer::new(u32::MAX, Afterwards::Serve);
    let mut holder = elector(server.clone(), "me");
    within(SECOND, holder.acquire()).await;
    let mut candidate = elector(server.clone(), "other");
    assert!(!within(SECOND, candidate.try_acquire_or_renew(Instant::now() + SECOND))
        .await
        .unwrap());
    within(SECOND, holder.release()).await.unwrap();
    let start = Instant::now();
    within(SECOND, candidate.acquire()).await;
    assert!(
        start.elapsed() < timings().lease_duration,
        "waited {:?}",
        start.elapsed()
    );
    assert_eq!(
        server.lock().unwrap().lease.clone().unwrap()["spec"]["holderIdentity"],
        "other"
    );
    // Releasing a Lease another replica holds changes nothing.
    let writes = server.lock().unwrap().writes;
    within(SECOND, holder.release()).await.unwrap();
    assert_eq!(server.lock().unwrap().writes, writes);
}
