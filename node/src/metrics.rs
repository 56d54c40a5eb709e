//! Prometheus metrics for one node, encoded in the OpenMetrics text format on `GET /metrics`.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

/// Labels of the request latency histogram.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    /// The route pattern, e.g. `/v1/kv/{key}`.
    pub route: String,
    /// The HTTP method.
    pub method: String,
    /// The response status code.
    pub code: u16,
}

/// Labels of the per-port connection figures.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ServerLabels {
    /// `client` or `peer`.
    pub server: &'static str,
}

/// Labels of connections the member closed.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ConnectionCloseLabels {
    /// `client` or `peer`.
    pub server: &'static str,
    /// Which limit closed it: `evicted_idle`, `refused_full`, `header_timeout`,
    /// `idle_timeout`, `header_too_large`, `close_timeout`.
    pub reason: &'static str,
}

/// Labels of requests refused because a queue was full.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RefusalLabels {
    /// The full queue: `proposal_bytes`, `proposal_count`, `reads`, `lists`.
    pub queue: &'static str,
}

/// Labels of the backup stream counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BackupLabels {
    /// How the stream ended: `complete`, `client_gone`, `stalled` or `failed`.
    pub outcome: &'static str,
}

/// Every metric the node exports.
pub struct Metrics {
    registry: Registry,
    /// Current Raft term.
    pub term: Gauge,
    /// Highest committed index known to this member.
    pub commit_index: Gauge,
    /// Highest index applied to the state machine.
    pub applied_index: Gauge,
    /// Index of the latest snapshot.
    pub snapshot_index: Gauge,
    /// 1 when this member is the leader.
    pub is_leader: Gauge,
    /// Number of keys in the state machine.
    pub keys: Gauge,
    /// Leader changes observed by this member.
    pub leader_changes: Counter,
    /// Client proposals handed to Raft.
    pub proposals: Counter,
    /// Client proposals Raft refused (no leader, transfer in progress).
    pub proposals_dropped: Counter,
    /// Snapshots created locally.
    pub snapshots_created: Counter,
    /// Local snapshots that could not be written (a full or failing disk); retried later.
    pub snapshot_failures: Counter,
    /// Snapshots received from a leader and applied.
    pub snapshots_applied: Counter,
    /// Duration of one write-ahead-log fsync (one per batch of entries).
    pub fsync_seconds: Histogram,
    /// Bytes appended to the write-ahead log.
    pub wal_bytes: Counter,
    /// Client and admin request latency by route and status code.
    pub requests: Family<RequestLabels, Histogram>,
    /// Open connections per port.
    pub connections: Family<ServerLabels, Gauge>,
    /// Connections the member closed because of a limit, per port and limit.
    pub connections_closed: Family<ConnectionCloseLabels, Counter>,
    /// Requests refused (`429 overloaded`) because a queue was full, per queue.
    pub requests_refused: Family<RefusalLabels, Counter>,
    /// Client writes admitted and not yet answered.
    pub pending_proposals: Gauge,
    /// Bytes those writes hold (their keys and values).
    pub pending_proposal_bytes: Gauge,
    /// Linearizable reads waiting for their read index or for apply.
    pub pending_reads: Gauge,
    /// Range listings being built.
    pub lists_in_progress: Gauge,
    /// The watch history's compact revision: watches and reads start above it.
    pub history_compact_revision: Gauge,
    /// Changes retained in the watch history.
    pub history_changes: Gauge,
    /// Open watch streams.
    pub watchers: Gauge,
    /// Events sent to watchers (puts and deletes).
    pub watch_events: Counter,
    /// Watch streams ended because their position was compacted.
    pub watch_compacted: Counter,
    /// `GET /v1/snapshot` streams, by how they ended.
    pub backups: Family<BackupLabels, Counter>,
    /// Bytes of `GET /v1/snapshot` streams handed to clients.
    pub backup_bytes: Counter,
}

impl Metrics {
    /// Creates and registers every metric.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("raftkv");
        let m = Metrics {
            term: Gauge::default(),
            commit_index: Gauge::default(),
            applied_index: Gauge::default(),
            snapshot_index: Gauge::default(),
            is_leader: Gauge::default(),
            keys: Gauge::default(),
            leader_changes: Counter::default(),
            proposals: Counter::default(),
            proposals_dropped: Counter::default(),
            snapshots_created: Counter::default(),
            snapshot_failures: Counter::default(),
            snapshots_applied: Counter::default(),
            fsync_seconds: Histogram::new(exponential_buckets(0.0001, 2.0, 16)),
            wal_bytes: Counter::default(),
            requests: Family::new_with_constructor(|| Histogram::new(exponential_buckets(0.0001, 2.0, 18))),
            connections: Family::default(),
            connections_closed: Family::default(),
            requests_refused: Family::default(),
            pending_proposals: Gauge::default(),
            pending_proposal_bytes: Gauge::default(),
            pending_reads: Gauge::default(),
            lists_in_progress: Gauge::default(),
            history_compact_revision: Gauge::default(),
            history_changes: Gauge::default(),
            watchers: Gauge::default(),
            watch_events: Counter::default(),
            watch_compacted: Counter::default(),
            backups: Family::default(),
            backup_bytes: Counter::default(),
            registry: Registry::default(),
        };
        registry.register("raft_term", "Current Raft term", m.term.clone());
        registry.register(
            "raft_commit_index",
            "Highest committed index known to this member",
            m.commit_index.clone(),
        );
        registry.register(
            "raft_applied_index",
            "Highest index applied to the state machine",
            m.applied_index.clone(),
        );
        registry.register(
            "raft_snapshot_index",
            "Index of the latest snapshot",
            m.snapshot_index.clone(),
        );
        registry.register(
            "raft_is_leader",
            "1 when this member is the leader",
            m.is_leader.clone(),
        );
        registry.register("keys", "Number of keys in the state machine", m.keys.clone());
        registry.register(
            "raft_leader_changes",
            "Leader changes observed",
            m.leader_changes.clone(),
        );
        registry.register("raft_proposals", "Client proposals handed to Raft", m.proposals.clone());
        registry.register(
            "raft_proposals_dropped",
            "Client proposals Raft refused",
            m.proposals_dropped.clone(),
        );
        registry.register(
            "snapshots_created",
            "Snapshots created locally",
            m.snapshots_created.clone(),
        );
        registry.register(
            "snapshot_failures",
            "Local snapshots that could not be written, retried later",
            m.snapshot_failures.clone(),
        );
        registry.register(
            "snapshots_applied",
            "Snapshots received and applied",
            m.snapshots_applied.clone(),
        );
        registry.register(
            "wal_fsync_seconds",
            "Duration of one WAL fsync",
            m.fsync_seconds.clone(),
        );
        registry.register("wal_bytes", "Bytes appended to the WAL", m.wal_bytes.clone());
        registry.register(
            "http_request_seconds",
            "Request latency by route and code",
            m.requests.clone(),
        );
        registry.register("http_connections", "Open connections per port", m.connections.clone());
        registry.register(
            "http_connections_closed",
            "Connections closed by a limit, per port and limit",
            m.connections_closed.clone(),
        );
        registry.register(
            "requests_refused",
            "Requests refused because a queue was full",
            m.requests_refused.clone(),
        );
        registry.register(
            "pending_proposals",
            "Client writes admitted and not yet answered",
            m.pending_proposals.clone(),
        );
        registry.register(
            "pending_proposal_bytes",
            "Key and value bytes of client writes admitted and not yet answered",
            m.pending_proposal_bytes.clone(),
        );
        registry.register("pending_reads", "Linearizable reads waiting", m.pending_reads.clone());
        registry.register(
            "lists_in_progress",
            "Range listings being built",
            m.lists_in_progress.clone(),
        );
        registry.register(
            "watch_history_compact_revision",
            "The watch history's compact revision",
            m.history_compact_revision.clone(),
        );
        registry.register(
            "watch_history_changes",
            "Changes retained in the watch history",
            m.history_changes.clone(),
        );
        registry.register("watchers", "Open watch streams", m.watchers.clone());
        registry.register("watch_events", "Events sent to watchers", m.watch_events.clone());
        registry.register(
            "watch_compacted",
            "Watch streams ended because their position was compacted",
            m.watch_compacted.clone(),
        );
        registry.register(
            "backup_streams",
            "GET /v1/snapshot streams by how they ended",
            m.backups.clone(),
        );
        registry.register(
            "backup_bytes",
            "Bytes of GET /v1/snapshot streams handed to clients",
            m.backup_bytes.clone(),
        );
        Metrics { registry, ..m }
    }

    /// The OpenMetrics text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        prometheus_client::encoding::text::encode(&mut out, &self.registry).expect("encode metrics into a String");
        out
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_are_exported_with_their_prefix() {
        let m = Metrics::new();
        m.term.set(3);
        m.requests
            .get_or_create(&RequestLabels {
                route: "/v1/kv/{key}".into(),
                method: "PUT".into(),
                code: 200,
            })
            .observe(0.002);
        let text = m.encode();
        assert!(text.contains("raftkv_raft_term 3"), "{text}");
        assert!(
            text.contains("raftkv_http_request_seconds_count{route=\"/v1/kv/{key}\",method=\"PUT\",code=\"200\"} 1"),
            "{text}"
        );
        assert!(text.ends_with("# EOF\n"));
    }
}
