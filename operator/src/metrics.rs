//! Prometheus metrics and the operator's small HTTP server (`/metrics`, `/healthz`).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tracing::info;

use crate::{Error, Result};

/// Labels of the error counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabels {
    /// The error's kind ([`Error::metric_label`]).
    pub error: String,
}

/// Labels of the membership step counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StepLabels {
    /// The step's kind ([`crate::plan::Step::kind`]).
    pub step: String,
    /// `applied`, `deferred` or `none`.
    pub outcome: String,
}

/// Labels of the backup counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BackupLabels {
    /// `success` or `failure`.
    pub outcome: String,
}

/// The operator's metrics.
pub struct Metrics {
    /// Reconciles started.
    pub reconciles: Counter,
    /// Reconciles that ended in an error, by error kind.
    pub errors: Family<ErrorLabels, Counter>,
    /// Planned steps, by kind and outcome.
    pub steps: Family<StepLabels, Counter>,
    /// Time spent in one reconcile.
    pub duration: Histogram,
    /// Backups finished, by outcome.
    pub backups: Family<BackupLabels, Counter>,
    /// Bytes of the backups taken.
    pub backup_bytes: Counter,
    /// Revision of the last backup taken.
    pub backup_revision: prometheus_client::metrics::gauge::Gauge,
    /// Every metric above, for the `/metrics` endpoint to encode.
    registry: Registry,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("raftkv_operator");
        let reconciles = Counter::default();
        let errors = Family::<ErrorLabels, Counter>::default();
        let steps = Family::<StepLabels, Counter>::default();
        let duration = Histogram::new(exponential_buckets(0.01, 2.0, 12));
        registry.register("reconciles", "Reconciles started", reconciles.clone());
        registry.register("reconcile_errors", "Reconciles that failed", errors.clone());
        registry.register(
            "membership_steps",
            "Membership steps planned, by kind and outcome",
            steps.clone(),
        );
        registry.register(
            "reconcile_duration_seconds",
            "Time spent in one reconcile",
            duration.clone(),
        );
        let backups = Family::<BackupLabels, Counter>::default();
        let backup_bytes = Counter::default();
        let backup_revision = prometheus_client::metrics::gauge::Gauge::default();
        registry.register("backups", "Backups finished, by outcome", backups.clone());
        registry.register("backup_bytes", "Bytes of the backups taken", backup_bytes.clone());
        registry.register(
            "last_backup_revision",
            "Revision of the last backup taken",
            backup_revision.clone(),
        );
        Self {
            reconciles,
            errors,
            steps,
            duration,
            backups,
            backup_bytes,
            backup_revision,
            registry,
        }
    }
}

impl Metrics {
    /// Counts a reconcile and returns a guard that records its duration when dropped.
    pub fn reconcile_started(&self) -> ReconcileTimer<'_> {
        self.reconciles.inc();
        ReconcileTimer {
            started: Instant::now(),
            histogram: &self.duration,
        }
    }

    /// Counts a failed reconcile.
    pub fn reconcile_failed(&self, error: &Error) {
        self.errors
            .get_or_create(&ErrorLabels {
                error: error.metric_label().into(),
            })
            .inc();
    }

    /// Counts a planned step.
    pub fn step(&self, step: &str, outcome: &str) {
        self.steps
            .get_or_create(&StepLabels {
                step: step.into(),
                outcome: outcome.into(),
            })
            .inc();
    }

    /// Counts a finished backup.
    pub fn backup(&self, result: &crate::backup::RunResult) {
        let outcome = if result.is_ok() { "success" } else { "failure" };
        self.backups
            .get_or_create(&BackupLabels {
                outcome: outcome.into(),
            })
            .inc();
        if let Ok(b) = result {
            self.backup_bytes.inc_by(b.size);
            self.backup_revision.set(i64::try_from(b.revision).unwrap_or(i64::MAX));
        }
    }

    /// The metrics in Prometheus text format.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

/// Records a reconcile's duration when dropped, so early returns are measured too.
pub struct ReconcileTimer<'a> {
    /// When the reconcile started.
    started: Instant,
    /// Where its duration is recorded.
    histogram: &'a Histogram,
}

impl Drop for ReconcileTimer<'_> {
    fn drop(&mut self) {
        self.histogram.observe(self.started.elapsed().as_secs_f64());
    }
}

async fn metrics_handler(State(metrics): State<Arc<Metrics>>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        metrics.encode(),
    )
}

async fn healthz() -> impl IntoResponse {
    (StatusCode::OK, "ok")
}

/// Serves `/metrics` and `/healthz` on `addr` until the process ends.
pub async fn serve(addr: SocketAddr, metrics: Arc<Metrics>) -> Result<()> {
    let app = Router::new()
        .route("/metrics", get(metrics_handler))
        .route("/healthz", get(healthz))
        .with_state(metrics);
    let listener = TcpListener::bind(addr).await.map_err(Error::Server)?;
    info!(%addr, "serving metrics and health");
    axum::serve(listener, app).await.map_err(Error::Server)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_text_names_reconciles_errors_and_steps() {
        let metrics = Metrics::default();
        drop(metrics.reconcile_started());
        metrics.reconcile_failed(&Error::InvalidSpec("x".into()));
        metrics.step("AddLearner", "applied");
        let text = metrics.encode();
        assert!(text.contains("raftkv_operator_reconciles_total 1"), "{text}");
        assert!(
            text.contains("raftkv_operator_reconcile_errors_total{error=\"invalid_spec\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("raftkv_operator_membership_steps_total{step=\"AddLearner\",outcome=\"applied\"} 1"),
            "{text}"
        );
    }
}
