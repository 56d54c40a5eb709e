//! Leader election over a `coordination.k8s.io/v1` Lease, so that of several operator replicas
//! exactly one reconciles at a time.
//!
//! The rules are client-go's (`tools/leaderelection`), for the same reasons:
//!
//! - A candidate never compares the holder's `renewTime` with its own wall clock: two machines'
//!   clocks may disagree by more than a lease duration. It notes, by its own monotonic clock, when
//!   it last saw the Lease record change (resourceVersion, holder or renewTime), and takes the
//!   Lease over only once the record has not changed for a whole lease duration since then
//!   ([`observe`] and [`decide`], both pure).
//! - The holder renews every retry period and stops leading when no renewal succeeded within the
//!   renew deadline, counted from its last successful renewal. The deadline is shorter than the
//!   lease duration, so the old holder has stopped before any candidate can see the Lease expire.
//! - Every Lease call is bounded by a timeout: kube's client has no read timeout, and a renewal
//!   hung on a dead connection must not keep a replica believing that it leads.
//! - Every write carries the `resourceVersion` that was read, so two candidates racing for an
//!   expired Lease cannot both win: the API server rejects the second write with a conflict.
//!
//! Once the Lease is lost, [`while_leading`] aborts the controller task at once, in the middle of
//! a reconcile if need be: another replica may already be acting.

use std::fmt;
use std::future::Future;
use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, PostParams};
use tokio::task::{JoinError, JoinHandle};
use tokio::time::Instant;
use tracing::{debug, info, warn};

use crate::{Error, Result};

/// How long a Lease lasts and how its holder keeps it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LeaseTimings {
    /// How long candidates wait, after the Lease record last changed, before taking it over.
    pub lease_duration: Duration,
    /// How long the holder keeps leading without a successful renewal. Shorter than the lease
    /// duration, by a margin that covers the candidates' polling and the holder's last call.
    pub renew_deadline: Duration,
    /// How often the holder renews and candidates look again.
    pub retry_period: Duration,
}

impl LeaseTimings {
    /// Timings with client-go's proportions (15 s, 10 s, 2 s) scaled to `lease_duration`.
    pub fn for_lease_duration(lease_duration: Duration) -> Self {
        Self {
            lease_duration,
            renew_deadline: lease_duration * 2 / 3,
            retry_period: lease_duration * 2 / 15,
        }
    }

    /// Checks that a holder gives up before a candidate may take over, and can retry before it
    /// gives up.
    pub fn validate(self) -> Result<Self> {
        if self.retry_period.is_zero() {
            return Err(Error::Config("the lease retry period must be positive".into()));
        }
        if self.renew_deadline >= self.lease_duration {
            return Err(Error::Config(format!(
                "the lease renew deadline ({:?}) must be shorter than the lease duration ({:?})",
                self.renew_deadline, self.lease_duration
            )));
        }
        if self.retry_period >= self.renew_deadline {
            return Err(Error::Config(format!(
                "the lease retry period ({:?}) must be shorter than the renew deadline ({:?})",
                self.retry_period, self.renew_deadline
            )));
        }
        Ok(self)
    }

    /// The most one attempt (a read and a write) may take: half the renew deadline, so that a
    /// holder whose call hung still has time for another attempt before it must give up.
    pub fn attempt_timeout(&self) -> Duration {
        self.renew_deadline / 2
    }
}

/// The parts of a Lease record whose change shows that its holder is alive.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LeaseRecord {
    /// Changes with every write, whoever makes it.
    pub resource_version: Option<String>,
    /// Who holds the Lease; `None` or empty when nobody does.
    pub holder: Option<String>,
    /// The holder's own clock at its last renewal: compared for change only, never with ours.
    pub renew_time: Option<MicroTime>,
    /// How long the holder asked candidates to wait.
    pub lease_duration: Duration,
}

impl LeaseRecord {
    /// The record of `lease`; `default_duration` when the Lease names no duration.
    pub fn of(lease: &Lease, default_duration: Duration) -> Self {
        let spec = lease.spec.as_ref();
        Self {
            resource_version: lease.metadata.resource_version.clone(),
            holder: spec.and_then(|s| s.holder_identity.clone()),
            renew_time: spec.and_then(|s| s.renew_time.clone()),
            lease_duration: spec
                .and_then(|s| s.lease_duration_seconds)
                .and_then(|s| u64::try_from(s).ok())
                .map_or(default_duration, Duration::from_secs),
        }
    }
}

/// The Lease record as this replica last saw it, and when, by this replica's clock, it last saw
/// it change.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Observation {
    /// The record last read or written.
    pub record: LeaseRecord,
    /// The local time at which `record` was first seen.
    pub changed_at: Instant,
}

/// Folds a fresh read into what was seen before: the local time moves only when the record
/// changed, so a holder that stopped renewing is noticed whatever its clock says.
pub fn observe(previous: Option<Observation>, record: Option<LeaseRecord>, now: Instant) -> Option<Observation> {
    let record = record?;
    match previous {
        Some(previous) if previous.record == record => Some(previous),
        _ => Some(Observation {
            record,
            changed_at: now,
        }),
    }
}

/// What a candidate should do with the Lease it read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LeaseDecision {
    /// We hold it: renew.
    Renew,
    /// Nobody holds it, or the holder stopped renewing: take it over.
    Acquire,
    /// Someone else holds it and renews it: keep waiting.
    Wait,
}

/// Decides from what was observed of the Lease (`None`: there is no Lease), our identity and the
/// local time.
pub fn decide(observation: Option<&Observation>, identity: &str, now: Instant) -> LeaseDecision {
    let Some(observation) = observation else {
        return LeaseDecision::Acquire;
    };
    match observation.record.holder.as_deref() {
        Some(holder) if holder == identity => LeaseDecision::Renew,
        None | Some("") => LeaseDecision::Acquire,
        Some(_) if now.saturating_duration_since(observation.changed_at) >= observation.record.lease_duration => {
            LeaseDecision::Acquire
        }
        Some(_) => LeaseDecision::Wait,
    }
}

/// Why this replica stopped leading.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LeaseLost {
    /// A renewal found another holder.
    TakenOver,
    /// No renewal succeeded within the renew deadline.
    RenewDeadlinePassed {
        /// Time since the last successful renewal.
        since_renewal: Duration,
    },
}

impl fmt::Display for LeaseLost {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LeaseLost::TakenOver => write!(f, "another replica holds the lease"),
            LeaseLost::RenewDeadlinePassed { since_renewal } => {
                write!(f, "no renewal succeeded for {since_renewal:?}, past the renew deadline")
            }
        }
    }
}

/// A Lease-based lock.
pub struct LeaderElector {
    /// The Lease API, in the namespace the Lease lives in.
    api: Api<Lease>,
    /// The Lease's name, shared by every operator replica.
    name: String,
    /// This replica's holder identity in the Lease.
    identity: String,
    /// How long the Lease lasts and how often it is renewed.
    timings: LeaseTimings,
    /// The Lease as last read or written; a candidate's only evidence of the holder's liveness.
    observed: Option<Observation>,
}

/// Runs `call` unless `deadline` passes first.
async fn bounded<T>(deadline: Instant, call: impl Future<Output = kube::Result<T>>) -> Result<T> {
    match tokio::time::timeout_at(deadline, call).await {
        Ok(result) => Ok(result?),
        Err(_) => Err(Error::Timeout("a lease call")),
    }
}

impl LeaderElector {
    /// A lock on the Lease `name` (in the namespace of `api`).
    pub fn new(api: Api<Lease>, name: impl Into<String>, identity: impl Into<String>, timings: LeaseTimings) -> Self {
        Self {
            api,
            name: name.into(),
            identity: identity.into(),
            timings,
            observed: None,
        }
    }

    /// Tries once to acquire or renew, giving up at `deadline`; `true` when we hold the Lease
    /// afterwards.
    pub async fn try_acquire_or_renew(&mut self, deadline: Instant) -> Result<bool> {
        let existing = bounded(deadline, self.api.get_opt(&self.name)).await?;
        let now = Instant::now();
        let duration = self.timings.lease_duration;
        let record = existing.as_ref().map(|lease| LeaseRecord::of(lease, duration));
        self.observed = observe(self.observed.take(), record, now);
        let decision = decide(self.observed.as_ref(), &self.identity, now);
        // The wall clock only goes into the record, for people and tools reading it; no replica
        // compares it with its own.
        let wall_clock = MicroTime(Timestamp::now());
        let seconds = i32::try_from(duration.as_secs()).unwrap_or(i32::MAX);
        let written = match (decision, existing) {
            (LeaseDecision::Wait, _) => return Ok(false),
            (_, None) => {
                let lease = Lease {
                    metadata: ObjectMeta {
                        name: Some(self.name.clone()),
                        ..ObjectMeta::default()
                    },
                    spec: Some(LeaseSpec {
                        holder_identity: Some(self.identity.clone()),
                        lease_duration_seconds: Some(seconds),
                        acquire_time: Some(wall_clock.clone()),
                        renew_time: Some(wall_clock),
                        lease_transitions: Some(0),
                        ..LeaseSpec::default()
                    }),
                };
                bounded(deadline, self.api.create(&PostParams::default(), &lease)).await
            }
            (decision, Some(mut lease)) => {
                let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
                if decision == LeaseDecision::Acquire {
                    info!(lease = %self.name, previous = ?spec.holder_identity, "taking over the lease");
                    spec.holder_identity = Some(self.identity.clone());
                    spec.acquire_time = Some(wall_clock.clone());
                    spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
                }
                spec.lease_duration_seconds = Some(seconds);
                spec.renew_time = Some(wall_clock);
                // `replace` sends the resourceVersion we read: a concurrent writer makes it fail.
                bounded(deadline, self.api.replace(&self.name, &PostParams::default(), &lease)).await
            }
        };
        match written {
            Ok(lease) => {
                let record = LeaseRecord::of(&lease, duration);
                self.observed = observe(self.observed.take(), Some(record), Instant::now());
                Ok(true)
            }
            Err(Error::Kube(kube::Error::Api(status))) if status.code == 409 => {
                debug!(lease = %self.name, "lost a race for the lease");
                Ok(false)
            }
            Err(error) => Err(error),
        }
    }

    /// Blocks until this replica holds the Lease. Returns the local time at which the winning
    /// attempt began: the renew deadline counts from there.
    pub async fn acquire(&mut self) -> Instant {
        loop {
            let started = Instant::now();
            match self
                .try_acquire_or_renew(started + self.timings.attempt_timeout())
                .await
            {
                Ok(true) => {
                    info!(lease = %self.name, identity = %self.identity, "became leader");
                    return started;
                }
                Ok(false) => {}
                Err(error) => warn!(%error, "leader election attempt failed"),
            }
            tokio::time::sleep(self.timings.retry_period).await;
        }
    }

    /// Renews every retry period, from the Lease acquired at `acquired_at`, until this replica
    /// must stop leading; then returns why. From that moment another replica may act, so the
    /// caller must stop reconciling at once.
    pub async fn hold(&mut self, acquired_at: Instant) -> LeaseLost {
        // Counted from the start of the last successful attempt: the renewTime it wrote is no
        // later than that, and candidates count from when they saw it, later still.
        let mut last_renewal = acquired_at;
        loop {
            let deadline = last_renewal + self.timings.renew_deadline;
            tokio::time::sleep_until((Instant::now() + self.timings.retry_period).min(deadline)).await;
            let started = Instant::now();
            if started >= deadline {
                return LeaseLost::RenewDeadlinePassed {
                    since_renewal: started - last_renewal,
                };
            }
            let attempt_deadline = (started + self.timings.attempt_timeout()).min(deadline);
            match self.try_acquire_or_renew(attempt_deadline).await {
                Ok(true) => last_renewal = started,
                Ok(false) => return LeaseLost::TakenOver,
                Err(error) => warn!(%error, lease = %self.name, "renewing the lease failed"),
            }
        }
    }

    /// Gives the Lease up once this replica stopped reconciling (on SIGTERM), so that another
    /// replica takes over at its next attempt rather than a whole lease duration later. Only a
    /// Lease this replica still holds is touched, and the write carries the resourceVersion read.
    pub async fn release(&mut self) -> Result<()> {
        let deadline = Instant::now() + self.timings.attempt_timeout();
        let Some(mut lease) = bounded(deadline, self.api.get_opt(&self.name)).await? else {
            return Ok(());
        };
        let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
        if spec.holder_identity.as_deref() != Some(self.identity.as_str()) {
            return Ok(());
        }
        spec.holder_identity = None;
        spec.renew_time = Some(MicroTime(Timestamp::now()));
        bounded(deadline, self.api.replace(&self.name, &PostParams::default(), &lease)).await?;
        info!(lease = %self.name, identity = %self.identity, "released the lease");
        Ok(())
    }
}

/// Runs the controller task `work` while `hold` keeps the Lease. When the Lease is lost, `work`
/// is aborted at once rather than shut down gracefully: a graceful shutdown would let long
/// reconciles finish while another replica may already act on the same clusters.
pub async fn while_leading<T>(
    hold: impl Future<Output = LeaseLost>,
    mut work: JoinHandle<T>,
) -> std::result::Result<std::result::Result<T, JoinError>, LeaseLost> {
    tokio::select! {
        lost = hold => {
            work.abort();
            Err(lost)
        }
        ended = &mut work => Ok(ended),
    }
}

/// This replica's identity in the Lease when no pod name is given: the host name and a random
/// suffix. The suffix keeps replicas apart whose host names agree (containers with the same
/// host name, or none readable), where a process id would not: it is 1 in every container.
pub fn fallback_identity() -> String {
    let host = std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/proc/sys/kernel/hostname").ok())
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "raftkv-operator".into());
    format!("{host}_{:016x}", rand::random::<u64>())
}

#[cfg(test)]
#[path = "leader_tests.rs"]
mod tests;
