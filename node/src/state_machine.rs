//! The state-machine side of the node: applies committed batches from the consensus side to the
//! [`KvState`], answers the clients waiting on them, restores snapshots received from a leader,
//! and takes a snapshot every `snapshot_count` applied entries.
//!
//! The consensus side never touches the key-value map; the two are joined only by the apply
//! channel (committed batches in order) and the consensus inbox (snapshot created). Apply is in
//! memory; the blocking work, reading and writing snapshot files, runs on the blocking pool.
//! After every batch the changes it made are published on the watch feed ([`crate::watch`]),
//! which never waits for a watcher.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use parking_lot::{Mutex, RwLock};
use raft::prelude::{ConfChangeV2, ConfState, SnapshotMetadata};
use tokio::sync::{mpsc, oneshot, watch};

use crate::command::ConfChangeContext;
use crate::error::{Error, Result};
use crate::history::HistoryLimits;
use crate::inbox::RaftInput;
use crate::kv::{ApplyOutcome, KvState};
use crate::metrics::Metrics;
use crate::snapshot::SnapshotStore;
use crate::watch::{AppliedBatch, Feed, FEED_CAPACITY, MAX_FEED_BATCH_BYTES};

/// One committed entry, as the consensus side hands it over.
#[derive(Debug)]
pub enum Committed {
    /// A client proposal, or an empty entry (`data` empty) that only advances the applied index.
    Normal {
        /// Raft index.
        index: u64,
        /// Raft term.
        term: u64,
        /// The encoded [`crate::command::Proposal`].
        data: Bytes,
    },
    /// A membership change the consensus side has already applied to Raft, with its result.
    /// Boxed: conf changes are rare and would otherwise make every batched entry as large.
    ConfChange(Box<AppliedConfChange>),
}

/// A membership change and the configuration Raft computed from it.
#[derive(Debug)]
pub struct AppliedConfChange {
    /// Raft index.
    pub index: u64,
    /// Raft term.
    pub term: u64,
    /// The change.
    pub cc: ConfChangeV2,
    /// Its context (peer URL, waiting request).
    pub ctx: ConfChangeContext,
    /// The configuration after the change.
    pub cs: ConfState,
}

/// What the consensus side sends to the state machine, in log order.
#[derive(Debug)]
pub enum ApplyMsg {
    /// Entries to apply, ascending and contiguous.
    Entries(Vec<Committed>),
    /// Replace the whole state with the snapshot file at `path` (received from the leader).
    Restore {
        /// The snapshot's metadata.
        meta: SnapshotMetadata,
        /// The durable snapshot file.
        path: PathBuf,
    },
    /// Take a snapshot now (a new learner needs one that includes it).
    CreateSnapshot,
}

/// Clients waiting for their proposal to be applied, by request id.
///
/// Every member applies every entry, so a member completes a waiter whenever an applied entry
/// carries one of its ids: ids must never collide across members or across runs of one member.
/// Each process starts its sequence at a random 63-bit base, drawn once when the node starts
/// (drawing it lazily on the first request raced with concurrent first requests and could fall
/// back to small sequential ids that another member may also be using).
pub struct Waiters {
    waiting: Mutex<HashMap<u64, oneshot::Sender<ApplyOutcome>>>,
    next: AtomicU64,
}

impl Default for Waiters {
    fn default() -> Self {
        Waiters {
            waiting: Mutex::new(HashMap::new()),
            // Odd and below 2^63: a process would need 2^62 requests to wrap into zero.
            next: AtomicU64::new(rand::random::<u64>() >> 1 | 1),
        }
    }
}

impl Waiters {
    /// A waiter with a request id unique to this process run.
    pub fn register(&self) -> (u64, oneshot::Receiver<ApplyOutcome>) {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        self.waiting.lock().insert(id, tx);
        (id, rx)
    }

    /// Forgets a waiter whose client gave up.
    pub fn cancel(&self, id: u64) {
        self.waiting.lock().remove(&id);
    }

    fn complete(&self, id: u64, outcome: ApplyOutcome) {
        if let Some(tx) = self.waiting.lock().remove(&id) {
            let _ = tx.send(outcome);
        }
    }
}

/// State shared between the state machine (the only writer) and the HTTP handlers (readers).
pub struct Shared {
    /// The replicated state.
    pub state: RwLock<KvState>,
    /// The applied index; linearizable reads wait on it.
    pub applied: watch::Sender<u64>,
    /// Clients waiting for their entries.
    pub waiters: Waiters,
    /// The changes of every applied batch, for watchers.
    pub feed: Feed,
}

impl Shared {
    /// Wraps a recovered state.
    pub fn new(state: KvState) -> Arc<Self> {
        let applied = state.applied_index;
        Arc::new(Shared {
            state: RwLock::new(state),
            applied: watch::Sender::new(applied),
            waiters: Waiters::default(),
            feed: Feed::new(FEED_CAPACITY),
        })
    }
}

/// A snapshot also waits until the log applied since the previous one holds at least
/// 1/`SNAPSHOT_LOG_RATIO` of that snapshot's bytes. Writing a snapshot costs the whole state, so
/// with a fixed entry count the cost per write grew with the number of keys (a 270 MB snapshot
/// every 10,000 writes with 1M keys); with this bound each logged byte costs at most this many
/// snapshot bytes, and the log tail kept in memory stays below a quarter of the state.
pub const SNAPSHOT_LOG_RATIO: u64 = 4;

/// Bytes of entry data applied since the last snapshot after which the next one is due
/// however few entries they are (still subject to [`SNAPSHOT_LOG_RATIO`]).
pub const SNAPSHOT_LOG_BYTES: u64 = 128 << 20;

/// How long after a failed snapshot the next is tried: a full disk is not rewritten in a loop.
pub const SNAPSHOT_RETRY: std::time::Duration = std::time::Duration::from_secs(1);

/// Whether a snapshot is due after `entries` entries holding `log_bytes` were applied since
/// the last one of `snapshot_bytes`. Due after `snapshot_count` entries, or sooner once they
/// hold [`SNAPSHOT_LOG_BYTES`] (the log tail since the last snapshot stays in memory, and ten
/// thousand 1 MiB values would be ten gigabytes of it); either way only once the log is worth
/// a quarter of the snapshot ([`SNAPSHOT_LOG_RATIO`]).
pub fn snapshot_due(entries: u64, snapshot_count: u64, log_bytes: u64, snapshot_bytes: u64) -> bool {
    (entries >= snapshot_count || log_bytes >= SNAPSHOT_LOG_BYTES) && log_bytes * SNAPSHOT_LOG_RATIO >= snapshot_bytes
}

/// The apply loop.
pub struct StateMachine {
    /// The state it applies to.
    pub shared: Arc<Shared>,
    /// Where snapshots are written.
    pub snapshots: SnapshotStore,
    /// Applied entries between snapshots, at least (see [`SNAPSHOT_LOG_RATIO`]).
    pub snapshot_count: u64,
    /// Reports snapshots to the consensus side.
    pub raft_inbox: flume::Sender<RaftInput>,
    /// Exported figures.
    pub metrics: Arc<Metrics>,
    /// How much watch history to retain; set again on every state restored from a snapshot.
    pub history_limits: HistoryLimits,
}

impl StateMachine {
    /// Applies until the consensus side closes the channel.
    pub async fn run(self, mut rx: mpsc::UnboundedReceiver<ApplyMsg>) -> Result<()> {
        let mut last_snapshot = self.shared.state.read().applied_index;
        let mut snapshot_task: Option<tokio::task::JoinHandle<Result<(SnapshotMetadata, u64)>>> = None;
        let mut snapshot_requested = false;
        // Bytes of the last snapshot written or restored (0 until one is), and of the entries
        // applied since it.
        let mut snapshot_bytes = 0u64;
        let mut log_bytes = 0u64;
        // After a failed snapshot (a full disk, usually), none is tried again before this.
        let mut retry_at: Option<std::time::Instant> = None;
        loop {
            tokio::select! {
                msg = rx.recv() => {
                    let Some(msg) = msg else { break };
                    match msg {
                        ApplyMsg::Entries(batch) => log_bytes += self.apply_batch(batch),
                        ApplyMsg::Restore { meta, path } => {
                            snapshot_bytes = std::fs::metadata(&path).map_or(0, |m| m.len());
                            self.restore(meta).await?;
                            last_snapshot = self.shared.state.read().applied_index;
                            log_bytes = 0;
                        }
                        ApplyMsg::CreateSnapshot => snapshot_requested = true,
                    }
                }
                done = async { snapshot_task.as_mut().expect("guarded by the branch condition").await }, if snapshot_task.is_some() => {
                    snapshot_task = None;
                    match done.map_err(|e| Error::Codec(format!("snapshot task: {e}")))? {
                        Ok((meta, bytes)) => {
                            last_snapshot = meta.index;
                            snapshot_bytes = bytes;
                            self.metrics.snapshots_created.inc();
                            let _ = self.raft_inbox.send_async(RaftInput::SnapshotCreated { meta }).await;
                        }
                        Err(e) => {
                            self.metrics.snapshot_failures.inc();
                            retry_at = Some(std::time::Instant::now() + SNAPSHOT_RETRY);
                            tracing::error!(error = %e, retry_in_ms = SNAPSHOT_RETRY.as_millis() as u64, "snapshot failed; the log is kept until one is written");
                        }
                    }
                }
            }
            let applied = self.shared.state.read().applied_index;
            let due = snapshot_due(
                applied - last_snapshot.min(applied),
                self.snapshot_count,
                log_bytes,
                snapshot_bytes,
            );
            let may_retry = retry_at.is_none_or(|at| std::time::Instant::now() >= at);
            if (due || snapshot_requested) && snapshot_task.is_none() && applied > 0 && may_retry {
                retry_at = None;
                snapshot_requested = false;
                log_bytes = 0;
                snapshot_task = Some(self.start_snapshot());
            }
        }
        Ok(())
    }

    /// Applies a batch and returns the bytes of its entries' data.
    fn apply_batch(&self, batch: Vec<Committed>) -> u64 {
        let mut done = Vec::new();
        let mut bytes = 0;
        let (from, applied, keys, batch) = {
            let mut state = self.shared.state.write();
            let from = state.applied_index;
            for c in batch {
                match c {
                    Committed::Normal { index, term, data } if data.is_empty() => state.apply_noop(index, term),
                    Committed::Normal { index, term, data } => {
                        fail::fail_point!("apply::before_entry");
                        bytes += data.len() as u64;
                        let (request_id, outcome) = state.apply_proposal(index, term, &data);
                        if let ApplyOutcome::Rejected(reason) = &outcome {
                            tracing::warn!(index, %reason, "entry rejected by the state machine");
                        }
                        if let Some(id) = request_id {
                            done.push((id, outcome));
                        }
                    }
                    Committed::ConfChange(c) => {
                        let outcome = state.apply_conf_change(c.index, c.term, &c.cc, &c.ctx, &c.cs);
                        done.push((c.ctx.request_id, outcome));
                    }
                }
            }
            self.metrics
                .history_compact_revision
                .set(state.history.compact_revision() as i64);
            self.metrics.history_changes.set(state.history.len() as i64);
            // Without a watcher nobody needs the batch: one subscribing later reads the history
            // after subscribing, which already holds this batch.
            let batch = (self.shared.feed.receiver_count() > 0).then(|| {
                let changes: Vec<_> = state.history.after(from).cloned().collect();
                let bytes: usize = changes.iter().map(|c| c.cost()).sum();
                if bytes > MAX_FEED_BATCH_BYTES {
                    // Too large to keep in the ring: watchers read it from the history.
                    AppliedBatch {
                        from,
                        applied: state.applied_index,
                        changes: Vec::new(),
                        complete: false,
                    }
                } else {
                    AppliedBatch {
                        from,
                        applied: state.applied_index,
                        changes,
                        complete: state.history.compact_revision() <= from,
                    }
                }
            });
            (from, state.applied_index, state.data.len(), batch)
        };
        // Answer clients only after the lock is released, so a woken reader finds the new state.
        for (id, outcome) in done {
            self.shared.waiters.complete(id, outcome);
        }
        self.shared.applied.send_replace(applied);
        if let Some(batch) = batch {
            debug_assert_eq!(batch.from, from);
            // Never waits: a watcher that falls behind the ring catches up from the history.
            let _ = self.shared.feed.send(Arc::new(batch));
        }
        self.metrics.applied_index.set(applied as i64);
        self.metrics.keys.set(keys as i64);
        bytes
    }

    async fn restore(&self, meta: SnapshotMetadata) -> Result<()> {
        let started = std::time::Instant::now();
        fail::fail_point!("snapshot::before_apply");
        let snapshots = self.snapshots.clone();
        let (index, term) = (meta.index, meta.term);
        let mut state = tokio::task::spawn_blocking(move || snapshots.load(index, term))
            .await
            .map_err(|e| Error::Task(format!("snapshot load: {e}")))??;
        state.history.set_limits(self.history_limits);
        let (applied, keys) = (state.applied_index, state.data.len());
        let from = std::mem::replace(&mut *self.shared.state.write(), state).applied_index;
        fail::fail_point!("snapshot::after_apply");
        self.shared.applied.send_replace(applied);
        // The changes between the old and the new state were never published: live watchers
        // must read them from the restored history (or learn that they are compacted).
        let _ = self.shared.feed.send(Arc::new(AppliedBatch {
            from,
            applied,
            changes: Vec::new(),
            complete: false,
        }));
        self.metrics.applied_index.set(applied as i64);
        self.metrics.keys.set(keys as i64);
        self.metrics.snapshots_applied.inc();
        tracing::info!(
            index = meta.index,
            term = meta.term,
            keys,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "restored snapshot from leader"
        );
        Ok(())
    }

    /// Writes a snapshot in the background; yields its metadata and its size in bytes.
    fn start_snapshot(&self) -> tokio::task::JoinHandle<Result<(SnapshotMetadata, u64)>> {
        // An O(1) clone of the persistent map: apply goes on while the file is written.
        let state = self.shared.state.read().clone();
        let snapshots = self.snapshots.clone();
        tokio::task::spawn_blocking(move || {
            let meta = snapshots.write(&state)?;
            let bytes = std::fs::metadata(snapshots.path(meta.index, meta.term)).map_or(0, |m| m.len());
            Ok((meta, bytes))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_snapshot_is_due_after_enough_entries_or_enough_bytes_of_them() {
        let mib = 1 << 20;
        assert!(
            !snapshot_due(9_999, 10_000, 3 * mib, 0),
            "small entries wait for the count"
        );
        assert!(snapshot_due(10_000, 10_000, 3 * mib, 0));
        assert!(
            snapshot_due(128, 10_000, 128 * mib, 32 * mib),
            "128 large values are enough"
        );
        assert!(
            !snapshot_due(128, 10_000, 128 * mib, 1024 * mib),
            "but not while the log is worth less than a quarter of the snapshot"
        );
        assert!(snapshot_due(256, 10_000, 256 * mib, 1024 * mib));
    }

    #[test]
    fn concurrent_first_requests_draw_ids_from_the_random_base() {
        let waiters = Arc::new(Waiters::default());
        let threads: Vec<_> = (0..8)
            .map(|_| {
                let waiters = waiters.clone();
                std::thread::spawn(move || (0..100).map(|_| waiters.register().0).collect::<Vec<_>>())
            })
            .collect();
        let mut ids: Vec<u64> = threads.into_iter().flat_map(|t| t.join().unwrap()).collect();
        ids.sort_unstable();
        ids.dedup();
        assert_eq!(ids.len(), 800, "every request gets its own id");
        // Small sequential ids are what another member would use too; a random 63-bit base
        // lands below 2^32 with probability 2^-31.
        assert!(
            ids[0] > u64::from(u32::MAX),
            "ids start at a random base, got {}",
            ids[0]
        );
        assert!(ids[799] - ids[0] < 800, "one process's ids are one sequence");
    }

    #[test]
    fn two_processes_draw_different_bases() {
        let (a, _) = Waiters::default().register();
        let (b, _) = Waiters::default().register();
        assert_ne!(a, b);
    }
}
