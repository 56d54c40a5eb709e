//! Leader election over a `coordination.k8s.io/v1` Lease, so that of several operator replicas
//! exactly one reconciles at a time.
//!
//! The holder renews the Lease well within its duration; a candidate takes it over only once the
//! holder's last renewal is older than the duration. Every write carries the `resourceVersion`
//! that was read, so two candidates racing for an expired Lease cannot both win: the API server
//! rejects the second write with a conflict. The decision itself ([`decide`]) is a pure function.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::api::{Api, PostParams};
use tracing::{debug, info, warn};

use crate::Result;

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

/// Decides from the Lease's spec, our identity and the time.
pub fn decide(spec: Option<&LeaseSpec>, identity: &str, now: Timestamp) -> LeaseDecision {
    let Some(spec) = spec else {
        return LeaseDecision::Acquire;
    };
    match spec.holder_identity.as_deref() {
        Some(holder) if holder == identity => LeaseDecision::Renew,
        None | Some("") => LeaseDecision::Acquire,
        Some(_) => {
            let duration = SignedDuration::from_secs(i64::from(spec.lease_duration_seconds.unwrap_or(15)));
            let renewed = spec.renew_time.as_ref().or(spec.acquire_time.as_ref());
            match renewed {
                Some(MicroTime(at)) if at.saturating_add(duration).is_ok_and(|expiry| expiry > now) => {
                    LeaseDecision::Wait
                }
                _ => LeaseDecision::Acquire,
            }
        }
    }
}

/// A Lease-based lock.
pub struct LeaderElector {
    api: Api<Lease>,
    name: String,
    identity: String,
    duration: Duration,
}

impl LeaderElector {
    /// A lock on the Lease `name` (in the namespace of `api`) held for `duration` per renewal.
    pub fn new(api: Api<Lease>, name: impl Into<String>, identity: impl Into<String>, duration: Duration) -> Self {
        Self {
            api,
            name: name.into(),
            identity: identity.into(),
            duration,
        }
    }

    /// How often the holder renews: a third of the duration, so two renewals may fail before
    /// the Lease expires.
    pub fn renew_interval(&self) -> Duration {
        self.duration / 3
    }

    /// Tries once to acquire or renew; `true` when we hold the Lease afterwards.
    pub async fn try_acquire_or_renew(&self) -> Result<bool> {
        let now = Timestamp::now();
        let existing = self.api.get_opt(&self.name).await?;
        let decision = decide(existing.as_ref().and_then(|l| l.spec.as_ref()), &self.identity, now);
        let seconds = i32::try_from(self.duration.as_secs()).unwrap_or(i32::MAX);
        match (decision, existing) {
            (LeaseDecision::Wait, _) => Ok(false),
            (_, None) => {
                let lease = Lease {
                    metadata: ObjectMeta {
                        name: Some(self.name.clone()),
                        ..ObjectMeta::default()
                    },
                    spec: Some(LeaseSpec {
                        holder_identity: Some(self.identity.clone()),
                        lease_duration_seconds: Some(seconds),
                        acquire_time: Some(MicroTime(now)),
                        renew_time: Some(MicroTime(now)),
                        lease_transitions: Some(0),
                        ..LeaseSpec::default()
                    }),
                };
                self.write(self.api.create(&PostParams::default(), &lease).await)
            }
            (decision, Some(mut lease)) => {
                let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
                if decision == LeaseDecision::Acquire {
                    info!(lease = %self.name, previous = ?spec.holder_identity, "taking over the lease");
                    spec.holder_identity = Some(self.identity.clone());
                    spec.acquire_time = Some(MicroTime(now));
                    spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
                }
                spec.lease_duration_seconds = Some(seconds);
                spec.renew_time = Some(MicroTime(now));
                // `replace` sends the resourceVersion we read: a concurrent writer makes it fail.
                self.write(self.api.replace(&self.name, &PostParams::default(), &lease).await)
            }
        }
    }

    fn write(&self, result: kube::Result<Lease>) -> Result<bool> {
        match result {
            Ok(_) => Ok(true),
            Err(kube::Error::Api(status)) if status.code == 409 => {
                debug!(lease = %self.name, "lost a race for the lease");
                Ok(false)
            }
            Err(error) => Err(error.into()),
        }
    }

    /// Blocks until this replica holds the Lease.
    pub async fn acquire(&self) {
        loop {
            match self.try_acquire_or_renew().await {
                Ok(true) => {
                    info!(lease = %self.name, identity = %self.identity, "became leader");
                    return;
                }
                Ok(false) => {}
                Err(error) => warn!(%error, "leader election attempt failed"),
            }
            tokio::time::sleep(self.renew_interval()).await;
        }
    }

    /// Renews until a renewal fails to keep the Lease, then returns: from that moment another
    /// replica may act, so the caller must stop reconciling at once.
    pub async fn hold(&self) {
        let mut last_renewal = tokio::time::Instant::now();
        loop {
            tokio::time::sleep(self.renew_interval()).await;
            match self.try_acquire_or_renew().await {
                Ok(true) => last_renewal = tokio::time::Instant::now(),
                Ok(false) => {
                    warn!(lease = %self.name, "another replica holds the lease");
                    return;
                }
                Err(error) => {
                    warn!(%error, "renewing the lease failed");
                    // Keep trying while the Lease is surely still ours; give up before it could
                    // have expired in another replica's eyes.
                    if last_renewal.elapsed() + self.renew_interval() >= self.duration {
                        return;
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(holder: &str, renewed_secs_ago: i64) -> LeaseSpec {
        let now = Timestamp::UNIX_EPOCH + SignedDuration::from_secs(1_000);
        LeaseSpec {
            holder_identity: Some(holder.into()),
            lease_duration_seconds: Some(15),
            renew_time: Some(MicroTime(now - SignedDuration::from_secs(renewed_secs_ago))),
            ..LeaseSpec::default()
        }
    }

    fn now() -> Timestamp {
        Timestamp::UNIX_EPOCH + SignedDuration::from_secs(1_000)
    }

    #[test]
    fn a_missing_or_unheld_lease_is_acquired() {
        assert_eq!(decide(None, "me", now()), LeaseDecision::Acquire);
        assert_eq!(decide(Some(&LeaseSpec::default()), "me", now()), LeaseDecision::Acquire);
    }

    #[test]
    fn our_own_lease_is_renewed() {
        assert_eq!(decide(Some(&spec("me", 100)), "me", now()), LeaseDecision::Renew);
    }

    #[test]
    fn a_fresh_lease_of_another_replica_is_respected() {
        assert_eq!(decide(Some(&spec("other", 5)), "me", now()), LeaseDecision::Wait);
    }

    #[test]
    fn an_expired_lease_of_another_replica_is_taken_over() {
        assert_eq!(decide(Some(&spec("other", 16)), "me", now()), LeaseDecision::Acquire);
    }
}
