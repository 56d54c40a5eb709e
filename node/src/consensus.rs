//! The consensus side of the node: one thread owns the `RawNode`, the write-ahead log and the
//! peer transport. Proposals, reads, peer messages, admin requests and snapshot reports arrive on
//! one inbox; ticks come from the loop's own clock; committed entries leave on the apply channel
//! in log order.
//!
//! The thread runs a current-thread tokio runtime of its own (see [`crate::node`]): this loop is
//! one task on it, and the peer streams (both the sending connections and the peer port's
//! server) are the others. A write therefore crosses threads only where it must: the client's
//! request arrives from the HTTP workers and its answer returns to them; reading a peer's
//! message, stepping it, fsyncing and answering happen on this one thread. The fsync blocks the
//! thread, and so the peer streams, on purpose: the member's Raft work waits for its disk either
//! way, and the async workers serving clients never block on it. Everything drained from the
//! inbox between two `Ready`s is handled by one `Ready`, so concurrent client writes share one
//! fsync.
//!
//! At a little over 900 lines this file is one piece on purpose: it is the one place that owns
//! `RawNode`, and the durability rules (what is fsynced before what is sent or answered) are only
//! checkable when the Ready loop, the conf-change application and the bootstrap that rebuilds the
//! node are read together. What needs no `RawNode` lives elsewhere: the inbox vocabulary in
//! `inbox`, admission rules in `admission`, snapshot files in `snapshot`.

use std::collections::{BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use protobuf::Message as _;
use raft::prelude::{
    ConfChange, ConfChangeSingle, ConfChangeType, ConfChangeV2, Entry, EntryType, HardState, MessageType, Snapshot,
    SnapshotMetadata,
};
use raft::{RawNode, ReadOnlyOption, SnapshotStatus, StateRole};
use tokio::sync::{mpsc, oneshot, watch};

use crate::admission::{LeaderView, LearnerProgress};
use crate::command::{self, ConfChangeContext};
use crate::error::{Error, Result};
use crate::identity::{self, Identity, Tombstone};
use crate::inbox::{AdminCommand, AdminError, NotProposed, PeerProgress, RaftInput, RaftStatus, Role};
use crate::kv::{KvState, MemberRole, Membership};
use crate::metrics::Metrics;
use crate::read_index::ReadContexts;
use crate::snapshot::SnapshotStore;
use crate::state_machine::{AppliedConfChange, ApplyMsg, Committed};
use crate::storage::LogStore;
use crate::transport::Transport;
use crate::wal::Wal;

/// Raft tuning.
#[derive(Debug, Clone)]
pub struct Tuning {
    /// Length of one tick.
    pub tick: Duration,
    /// Ticks without a leader before campaigning.
    pub election_ticks: usize,
    /// Ticks between heartbeats.
    pub heartbeat_ticks: usize,
    /// Entries kept in the log behind a snapshot so slightly slow followers catch up without one.
    pub snapshot_catchup_entries: u64,
    /// The largest lag (in entries) at which a learner may be promoted.
    pub max_promote_lag: u64,
}

/// Read requests waiting for one read-index round.
struct ReadBatch {
    waiters: Vec<oneshot::Sender<Result<u64, NotProposed>>>,
    issued: Instant,
}

/// How long an unanswered read-index request waits before it is asked again (a new leader
/// silently drops reads until it has committed an entry of its own term).
const READ_RETRY: Duration = Duration::from_millis(300);
/// Data bytes of the entries kept in memory behind a snapshot, at most (see `on_snapshot_created`).
const CATCHUP_BYTES: u64 = 64 << 20;
/// Inbox messages handled before the loop makes progress on Raft again.
const MAX_INPUTS_PER_READY: usize = 4096;
/// Bytes of proposals and appended entries taken from the inbox before the loop makes progress
/// on Raft again (one input may exceed it).
const MAX_BYTES_PER_READY: usize = 8 << 20;

/// The entry bytes an input brings to the next write-ahead-log batch.
fn input_bytes(input: &RaftInput) -> usize {
    match input {
        RaftInput::Propose { data, .. } => data.len(),
        RaftInput::Peer(msg) => msg.get_entries().iter().map(|e| e.get_data().len()).sum(),
        _ => 0,
    }
}

/// The consensus thread's state.
pub struct Consensus {
    /// This member's id and cluster, as stored on its volume; rewritten when the cluster id is
    /// first learned.
    identity: Identity,
    /// The data directory, for the identity and the removal tombstone.
    data_dir: PathBuf,
    /// The URL peers reach this member at; a bootstrap records it as the first member's.
    advertise_peer_url: Option<String>,
    /// The Raft node; only this thread touches it.
    raw: RawNode<LogStore>,
    /// The write-ahead log: entries and hard state are fsynced here before anything depends
    /// on them.
    wal: Wal,
    /// The snapshot files.
    snapshots: SnapshotStore,
    /// The send side of the peer transport.
    transport: Transport,
    /// Everything the other tasks ask of this thread.
    inbox: flume::Receiver<RaftInput>,
    /// Committed entries and snapshots, in log order, to the state machine.
    apply_tx: mpsc::UnboundedSender<ApplyMsg>,
    /// The status published after every loop iteration (role, leader, indexes, membership).
    status_tx: watch::Sender<RaftStatus>,
    /// The cluster id, shared with the transport, which refuses peers of other clusters.
    cluster_id: Arc<AtomicU64>,
    /// Exported figures.
    metrics: Arc<Metrics>,
    /// Tick length, election and heartbeat ticks, catch-up and promotion bounds.
    tuning: Tuning,
    /// raft-rs's logger, bridged to `tracing`; kept to rebuild the node after a bootstrap.
    logger: slog::Logger,
    /// The applied membership, kept here for the transport's peer URLs and the admin checks.
    membership: Membership,
    /// The hard state last handed to the WAL.
    written_hs: HardState,
    /// Linearizable reads waiting for the next read-index round.
    pending_reads: Vec<oneshot::Sender<Result<u64, NotProposed>>>,
    /// Read-index rounds sent and not yet confirmed, by their context.
    inflight_reads: HashMap<Vec<u8>, ReadBatch>,
    /// Contexts for read-index rounds, none ever sent twice (see [`crate::read_index`]).
    read_contexts: ReadContexts,
    /// The leader's commit index as last heard from it, for readiness (caught up or not).
    leader_commit: u64,
    /// The leader seen in the previous iteration, to notice a change of leader.
    last_leader: u64,
    /// This member applied its own removal: it answers nothing more and stops campaigning.
    removed: bool,
    /// When each peer was last heard from. raft-rs's own `recent_active` flag is cleared for every
    /// peer at each check-quorum tick, so right after that tick healthy peers look dead; health
    /// decisions (quorum checks, `/v1/members`) use this instead.
    last_heard: HashMap<u64, Instant>,
}

/// What recovery hands to the consensus thread.
pub struct Recovered {
    /// The member's identity.
    pub identity: Identity,
    /// The data directory.
    pub data_dir: PathBuf,
    /// How peers reach this member.
    pub advertise_peer_url: Option<String>,
    /// The opened WAL.
    pub wal: Wal,
    /// The snapshot directory.
    pub snapshots: SnapshotStore,
    /// The latest snapshot's metadata (index 0 = uninitialised).
    pub snapshot: SnapshotMetadata,
    /// The recovered hard state.
    pub hard_state: HardState,
    /// Entries after the snapshot.
    pub entries: Vec<Entry>,
    /// The membership in the snapshot.
    pub membership: Membership,
}

/// The only place the node builds the `slog::Logger` raft-rs wants: it forwards to `tracing`.
pub fn raft_logger(member_id: u64) -> slog::Logger {
    slog::Logger::root(TracingDrain, slog::o!("member_id" => member_id))
}

struct TracingDrain;

impl slog::Drain for TracingDrain {
    type Ok = ();
    type Err = slog::Never;

    fn log(&self, record: &slog::Record<'_>, values: &slog::OwnedKVList) -> Result<(), slog::Never> {
        use slog::KV;
        let mut kv = KvFormatter(String::new());
        let _ = record.kv().serialize(record, &mut kv);
        let _ = values.serialize(record, &mut kv);
        let msg = record.msg();
        match record.level() {
            slog::Level::Critical | slog::Level::Error => tracing::error!(target: "raft_rs", "{msg}{}", kv.0),
            slog::Level::Warning => tracing::warn!(target: "raft_rs", "{msg}{}", kv.0),
            slog::Level::Info => tracing::info!(target: "raft_rs", "{msg}{}", kv.0),
            slog::Level::Debug => tracing::debug!(target: "raft_rs", "{msg}{}", kv.0),
            slog::Level::Trace => tracing::trace!(target: "raft_rs", "{msg}{}", kv.0),
        }
        Ok(())
    }
}

struct KvFormatter(String);

impl slog::Serializer for KvFormatter {
    fn emit_arguments(&mut self, key: slog::Key, val: &std::fmt::Arguments<'_>) -> slog::Result {
        use std::fmt::Write;
        let _ = write!(self.0, " {key}={val}");
        Ok(())
    }
}

fn raft_config(id: u64, applied: u64, tuning: &Tuning) -> raft::Config {
    raft::Config {
        id,
        applied,
        election_tick: tuning.election_ticks,
        heartbeat_tick: tuning.heartbeat_ticks,
        max_size_per_msg: 1 << 20,
        max_inflight_msgs: 256,
        check_quorum: true,
        pre_vote: true,
        read_only_option: ReadOnlyOption::Safe,
        // Bounds the memory a leader without quorum can accumulate in uncommitted proposals.
        max_uncommitted_size: 256 << 20,
        ..Default::default()
    }
}

impl Consensus {
    /// Builds the consensus side over recovered state.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        recovered: Recovered,
        transport: Transport,
        inbox: flume::Receiver<RaftInput>,
        apply_tx: mpsc::UnboundedSender<ApplyMsg>,
        status_tx: watch::Sender<RaftStatus>,
        cluster_id: Arc<AtomicU64>,
        metrics: Arc<Metrics>,
        tuning: Tuning,
    ) -> Result<Self> {
        let Recovered {
            identity,
            data_dir,
            advertise_peer_url,
            wal,
            snapshots,
            snapshot,
            hard_state,
            entries,
            membership,
        } = recovered;
        let logger = raft_logger(identity.id);
        let applied = snapshot.index;
        let log_changes_membership = entries.iter().any(|e| e.get_entry_type() != EntryType::EntryNormal);
        let store = LogStore::new(snapshot, hard_state.clone(), entries);
        let raw = RawNode::new(&raft_config(identity.id, applied, &tuning), store, &logger)?;
        let mut consensus = Consensus {
            identity,
            data_dir,
            advertise_peer_url,
            raw,
            wal,
            snapshots,
            transport,
            inbox,
            apply_tx,
            status_tx,
            cluster_id,
            metrics,
            tuning,
            logger,
            membership: Membership::default(),
            written_hs: hard_state,
            pending_reads: Vec::new(),
            inflight_reads: HashMap::new(),
            read_contexts: ReadContexts::new(),
            leader_commit: 0,
            last_leader: 0,
            removed: false,
            last_heard: HashMap::new(),
        };
        consensus.set_membership(membership);
        // The only voter of its configuration has nobody to wait for: waiting out an election
        // timeout (1 to 2 s by default) would only delay readiness after a restart. Only when no
        // entry after the snapshot changes the membership: otherwise the configuration in force
        // may already include other voters, and this member must not win alone.
        let id = consensus.identity.id;
        if consensus.is_initialized() && !log_changes_membership && consensus.membership.voters.iter().eq([&id]) {
            consensus.raw.campaign()?;
        }
        consensus.publish_status();
        Ok(consensus)
    }

    /// Runs until shutdown or a fatal storage error. A failed WAL write or fsync is fatal: the
    /// member can no longer promise durability, so it stops rather than acknowledge anything.
    ///
    /// Runs on the consensus thread's runtime, which it shares with the peer streams: it yields
    /// after every turn so that they run between two `Ready`s even while the inbox is never empty.
    pub async fn run(mut self) -> Result<()> {
        let mut next_tick = Instant::now() + self.tuning.tick;
        loop {
            let deadline = tokio::time::Instant::from_std(next_tick);
            match tokio::time::timeout_at(deadline, self.inbox.recv_async()).await {
                Ok(Ok(input)) => {
                    let mut bytes = input_bytes(&input);
                    if !self.handle(input)? {
                        break;
                    }
                    for _ in 0..MAX_INPUTS_PER_READY {
                        // A batch of large entries is written and fsynced in one go, during which
                        // this thread neither ticks nor sends heartbeats: bound it in bytes too.
                        if bytes >= MAX_BYTES_PER_READY {
                            break;
                        }
                        match self.inbox.try_recv() {
                            Ok(input) => {
                                bytes += input_bytes(&input);
                                if !self.handle(input)? {
                                    return self.stop();
                                }
                            }
                            Err(_) => break,
                        }
                    }
                }
                Err(_elapsed) => {}
                Ok(Err(flume::RecvError::Disconnected)) => break,
            }
            let now = Instant::now();
            if now >= next_tick {
                self.raw.tick();
                self.on_tick();
                next_tick += self.tuning.tick;
                if next_tick < now {
                    next_tick = now + self.tuning.tick;
                }
            }
            self.issue_reads();
            self.on_ready().await?;
            for to in self.transport.take_failed_snapshots() {
                self.raw.report_snapshot(to, SnapshotStatus::Failure);
            }
            for to in self.transport.take_unreachable() {
                self.raw.report_unreachable(to);
            }
            // Raft asked for a snapshot it could send (a new learner, or a far-behind follower);
            // it may ask while stepping a message that produces no Ready, so check every turn.
            if self.raw.store().take_snapshot_wanted() {
                let _ = self.apply_tx.send(ApplyMsg::CreateSnapshot);
            }
            self.publish_status();
            // The peer streams write what this turn sent and read what arrived.
            tokio::task::yield_now().await;
        }
        self.stop()
    }

    fn stop(mut self) -> Result<()> {
        self.wal.sync()?;
        self.transport.close();
        tracing::info!(member_id = self.identity.id, "consensus loop stopped");
        Ok(())
    }

    fn is_initialized(&self) -> bool {
        self.raw.store().snapshot_metadata().index > 0
    }

    /// Handles one input; false means stop.
    fn handle(&mut self, input: RaftInput) -> Result<bool> {
        match input {
            RaftInput::Propose { data, reply } => {
                let result = self.propose(data);
                let _ = reply.send(result);
            }
            RaftInput::ReadIndex { reply } => self.pending_reads.push(reply),
            RaftInput::Peer(msg) => {
                self.last_heard.insert(msg.from, Instant::now());
                if msg.get_msg_type() == MessageType::MsgAppend && msg.from == self.raw.raft.leader_id {
                    self.leader_commit = self.leader_commit.max(msg.commit);
                }
                if let Err(e) = self.raw.step(msg) {
                    tracing::debug!(error = %e, "peer message not stepped");
                }
            }
            RaftInput::Admin(cmd) => self.handle_admin(cmd)?,
            RaftInput::SnapshotCreated { meta } => self.on_snapshot_created(meta)?,
            RaftInput::Unreachable(id) => self.raw.report_unreachable(id),
            RaftInput::SnapshotSent { to, ok } => {
                let status = if ok {
                    SnapshotStatus::Finish
                } else {
                    SnapshotStatus::Failure
                };
                self.raw.report_snapshot(to, status);
            }
            RaftInput::PeerUrl { id, url } => {
                // The applied membership is authoritative; an announced URL only fills a gap.
                if id != self.identity.id && !self.membership.peer_urls.contains_key(&id) {
                    self.transport.set_peer(id, &url);
                }
            }
            RaftInput::RemovedByPeer { peer } => {
                // Only a member of our own cluster (the transport checked the cluster id) that has
                // applied our removal says this; the leader stops replicating to a removed member,
                // so this may be the only way it learns.
                if !self.removed && self.is_initialized() {
                    tracing::warn!(
                        member_id = self.identity.id,
                        peer,
                        "a peer reports this member was removed"
                    );
                    let index = self.raw.raft.raft_log.committed;
                    self.on_self_removed(index)?;
                }
            }
            RaftInput::Shutdown => return Ok(false),
        }
        Ok(true)
    }

    fn propose(&mut self, data: Vec<u8>) -> Result<(), NotProposed> {
        if self.removed || !self.is_initialized() {
            return Err(NotProposed::NotMember);
        }
        if self.raw.raft.leader_id == raft::INVALID_ID {
            return Err(NotProposed::NoLeader);
        }
        self.metrics.proposals.inc();
        self.raw.propose(vec![], data).map_err(|_| {
            self.metrics.proposals_dropped.inc();
            NotProposed::Dropped
        })
    }

    fn on_tick(&mut self) {
        // A leader that inherited a joint configuration (its predecessor crashed between entering
        // and leaving) must leave it explicitly: raft-rs only auto-leaves on the leader that
        // proposed the change.
        if self.raw.raft.state == StateRole::Leader && self.membership.is_joint() && !self.raw.raft.has_pending_conf() {
            tracing::info!(member_id = self.identity.id, "leaving leftover joint configuration");
            let ctx = command::encode(&ConfChangeContext::default());
            if let Err(e) = self.raw.propose_conf_change(ctx, ConfChangeV2::default()) {
                tracing::warn!(error = %e, "could not propose leaving the joint configuration");
            }
        }
        // Forget read batches whose clients all gave up.
        self.inflight_reads
            .retain(|_, b| b.waiters.iter().any(|w| !w.is_closed()));
    }

    fn issue_reads(&mut self) {
        if !self.pending_reads.is_empty() {
            let waiters = std::mem::take(&mut self.pending_reads);
            if self.removed || !self.is_initialized() {
                for w in waiters {
                    let _ = w.send(Err(NotProposed::NotMember));
                }
            } else if self.raw.raft.leader_id == raft::INVALID_ID {
                for w in waiters {
                    let _ = w.send(Err(NotProposed::NoLeader));
                }
            } else {
                // One read-index round serves every read that arrived since the last one.
                self.send_read_index(ReadBatch {
                    waiters,
                    issued: Instant::now(),
                });
            }
        }
        let now = Instant::now();
        if self.raw.raft.leader_id != raft::INVALID_ID {
            let stale: Vec<Vec<u8>> = self
                .inflight_reads
                .iter()
                .filter(|(_, b)| now.duration_since(b.issued) >= READ_RETRY)
                .map(|(ctx, _)| ctx.clone())
                .collect();
            for ctx in stale {
                if let Some(mut batch) = self.inflight_reads.remove(&ctx) {
                    tracing::debug!(member_id = self.identity.id, old_ctx = ?ctx, term = self.raw.raft.term, "read index asked again");
                    batch.issued = now;
                    self.send_read_index(batch);
                }
            }
        }
    }

    /// Asks Raft for a read index on behalf of `batch`.
    ///
    /// SAFETY OF READS: every round, a retry included, takes a context never sent before; a
    /// context sent twice can let a deposed leader confirm a read (see [`crate::read_index`]).
    fn send_read_index(&mut self, batch: ReadBatch) {
        let ctx = self.read_contexts.next_context();
        tracing::debug!(
            member_id = self.identity.id,
            ctx = ?ctx,
            reads = batch.waiters.len(),
            term = self.raw.raft.term,
            state = ?self.raw.raft.state,
            commit = self.raw.raft.raft_log.committed,
            "read index issued"
        );
        self.raw.read_index(ctx.clone());
        self.inflight_reads.insert(ctx, batch);
    }

    async fn on_ready(&mut self) -> Result<()> {
        if !self.raw.has_ready() {
            return Ok(());
        }
        let mut ready = self.raw.ready();

        // 1. A leader sends its appends before persisting them: replication and the local fsync
        //    overlap (Raft thesis 10.2.1). Its own entries count toward commit only once persisted.
        //    The streams' connections run on this thread: yield once so that they can write the
        //    appends to the sockets before the fsync below blocks it. That they run before this
        //    task resumes is tokio's current scheduling, not a promise, and only speed depends on
        //    it: the appends may as well leave after the fsync.
        if !ready.messages().is_empty() {
            self.transport.send(ready.take_messages());
            if !ready.entries().is_empty() {
                tokio::task::yield_now().await;
            }
        }

        // 2. A snapshot from the leader replaces the log and the state machine.
        if !ready.snapshot().is_empty() {
            self.apply_received_snapshot(ready.snapshot().clone())?;
        }

        // 3. Committed entries: raft-rs hands out only entries already persisted here.
        self.handle_committed(ready.take_committed_entries())?;

        // 4. Append new entries and the hard state to the WAL; one fsync covers the whole batch.
        let entries = ready.take_entries();
        if !entries.is_empty() {
            self.wal.append_entries(&entries)?;
        }
        let mut hs = self.raw.store().hard_state().clone();
        if let Some(new_hs) = ready.hs() {
            hs = new_hs.clone();
        }
        if hs != self.written_hs {
            self.wal.append_hard_state(&hs)?;
            self.written_hs = hs.clone();
        }
        if !entries.is_empty() || ready.must_sync() {
            let started = Instant::now();
            let bytes = self.wal.sync()?;
            self.metrics.fsync_seconds.observe(started.elapsed().as_secs_f64());
            self.metrics.wal_bytes.inc_by(bytes);
        }
        // DURABILITY: from here on the entries and the vote are on disk. Only now may Raft see
        // them as stable, and only now may votes and append acknowledgements leave this member.
        self.raw.mut_store().append(&entries);
        self.raw.mut_store().set_hard_state(hs);

        // 5. Messages that promise persisted state (votes, append responses).
        if !ready.persisted_messages().is_empty() {
            self.transport.send(ready.take_persisted_messages());
        }
        self.resolve_reads(ready.take_read_states());

        // 6. Advance; the light ready carries what became possible after this persist.
        let mut light = self.raw.advance(ready);
        if let Some(commit) = light.commit_index() {
            self.raw.mut_store().set_commit(commit);
        }
        self.transport.send(light.take_messages());
        self.handle_committed(light.take_committed_entries())?;
        self.raw.advance_apply();
        Ok(())
    }

    fn resolve_reads(&mut self, states: Vec<raft::ReadState>) {
        for rs in states {
            tracing::debug!(
                member_id = self.identity.id,
                ctx = ?rs.request_ctx,
                index = rs.index,
                term = self.raw.raft.term,
                state = ?self.raw.raft.state,
                known = self.inflight_reads.contains_key(&rs.request_ctx),
                "read index resolved"
            );
            if let Some(batch) = self.inflight_reads.remove(&rs.request_ctx) {
                for w in batch.waiters {
                    let _ = w.send(Ok(rs.index));
                }
            }
        }
    }

    fn handle_committed(&mut self, entries: Vec<Entry>) -> Result<()> {
        if entries.is_empty() {
            return Ok(());
        }
        let mut batch = Vec::with_capacity(entries.len());
        for mut e in entries {
            let (index, term) = (e.index, e.term);
            let cc = match e.get_entry_type() {
                EntryType::EntryNormal => {
                    batch.push(Committed::Normal {
                        index,
                        term,
                        data: e.take_data(),
                    });
                    continue;
                }
                EntryType::EntryConfChange => {
                    let cc = ConfChange::parse_from_bytes(e.get_data())
                        .map_err(|err| Error::Codec(format!("conf change at {index}: {err}")))?;
                    raft_proto::ConfChangeI::into_v2(cc)
                }
                EntryType::EntryConfChangeV2 => ConfChangeV2::parse_from_bytes(e.get_data())
                    .map_err(|err| Error::Codec(format!("conf change at {index}: {err}")))?,
            };
            let ctx: ConfChangeContext = if e.get_context().is_empty() {
                ConfChangeContext::default()
            } else {
                command::decode(e.get_context()).unwrap_or_default()
            };
            let cs = self.raw.apply_conf_change(&cc)?;
            let mut membership = self.membership.clone();
            membership.apply_change(&cc, &ctx, &cs);
            tracing::info!(member_id = self.identity.id, index, term, change = ?cc.get_changes(), voters = ?cs.get_voters(), learners = ?cs.get_learners(), "membership change applied");
            self.set_membership(membership);
            if self.membership.removed.contains(&self.identity.id) && !self.removed {
                self.on_self_removed(index)?;
            }
            batch.push(Committed::ConfChange(Box::new(AppliedConfChange {
                index,
                term,
                cc,
                ctx,
                cs,
            })));
        }
        // The state machine lives as long as this loop; a send error means shutdown is under way.
        let _ = self.apply_tx.send(ApplyMsg::Entries(batch));
        Ok(())
    }

    fn on_self_removed(&mut self, index: u64) -> Result<()> {
        self.removed = true;
        let cluster_id = self.cluster_id.load(Ordering::Relaxed);
        tracing::warn!(
            member_id = self.identity.id,
            cluster_id,
            index,
            "this member was removed from the cluster"
        );
        identity::store_tombstone(
            &self.data_dir,
            &Tombstone {
                id: self.identity.id,
                cluster_id,
                index,
            },
        )
    }

    fn set_membership(&mut self, membership: Membership) {
        for (&id, url) in &membership.peer_urls {
            if id != self.identity.id {
                self.transport.set_peer(id, url);
            }
        }
        for id in self.membership.peer_urls.keys() {
            if !membership.peer_urls.contains_key(id) {
                self.transport.remove_peer(*id);
            }
        }
        *self.transport.removed_ids().write() = membership.removed.clone();
        self.membership = membership;
    }

    fn apply_received_snapshot(&mut self, snap: Snapshot) -> Result<()> {
        let meta = snap.get_metadata().clone();
        let path = self.snapshots.path(meta.index, meta.term);
        let header = self.snapshots.load_header(meta.index, meta.term)?;
        // The snapshot file is already durable (the transport fsynced it before stepping the
        // message); the marker makes it this member's current snapshot and discards the old log.
        self.wal.append_snapshot_marker(meta.index, meta.term)?;
        self.wal.sync()?;
        self.raw.mut_store().apply_snapshot(meta.clone());
        self.adopt_cluster_id(header.cluster_id)?;
        self.set_membership(header.membership);
        self.metrics.snapshot_index.set(meta.index as i64);
        tracing::info!(
            member_id = self.identity.id,
            index = meta.index,
            term = meta.term,
            "applying snapshot from leader"
        );
        let _ = self.apply_tx.send(ApplyMsg::Restore { meta, path });
        Ok(())
    }

    fn adopt_cluster_id(&mut self, cluster_id: u64) -> Result<()> {
        if self.identity.cluster_id != cluster_id {
            self.identity.cluster_id = cluster_id;
            identity::store(&self.data_dir, &self.identity)?;
            self.cluster_id.store(cluster_id, Ordering::Relaxed);
        }
        Ok(())
    }

    fn on_snapshot_created(&mut self, meta: SnapshotMetadata) -> Result<()> {
        if meta.index <= self.raw.store().snapshot_metadata().index {
            return Ok(());
        }
        // The file is durable; the marker makes it the snapshot recovery starts from.
        self.wal.append_snapshot_marker(meta.index, meta.term)?;
        self.wal.sync()?;
        let (index, term) = (meta.index, meta.term);
        self.raw.mut_store().set_snapshot(meta);
        // Entries kept behind the snapshot for followers that lag a little: at most
        // `snapshot_catchup_entries` of them, and at most `CATCHUP_BYTES` of data, or large
        // values would keep gigabytes of log in memory.
        let by_count = index.saturating_sub(self.tuning.snapshot_catchup_entries);
        let by_bytes = self.raw.store().compact_index_within(index, CATCHUP_BYTES);
        self.raw.mut_store().compact(by_count.max(by_bytes));
        self.wal.release_to(index)?;
        self.snapshots.retain(3, (index, term))?;
        self.metrics.snapshot_index.set(index as i64);
        tracing::info!(
            member_id = self.identity.id,
            index,
            term,
            log_entries = self.raw.store().len(),
            "log compacted after snapshot"
        );
        Ok(())
    }

    fn handle_admin(&mut self, cmd: AdminCommand) -> Result<()> {
        match cmd {
            AdminCommand::AddMember {
                id,
                peer_url,
                learner,
                request_id,
                reply,
            } => {
                let result = self
                    .check_leader()
                    .and_then(|_| self.propose_add(id, peer_url, learner, request_id));
                let _ = reply.send(result);
            }
            AdminCommand::Promote { id, request_id, reply } => {
                let result = self.check_leader().and_then(|_| self.propose_promote(id, request_id));
                let _ = reply.send(result);
            }
            AdminCommand::Remove { id, request_id, reply } => {
                let result = self.check_leader().and_then(|_| self.propose_remove(id, request_id));
                let _ = reply.send(result);
            }
            AdminCommand::TransferLeader { id, reply } => {
                let result = self.check_leader().and_then(|_| {
                    if self.membership.role_of(id) != MemberRole::Voter {
                        return Err(AdminError::Invalid(format!(
                            "member {id} is not a voter and cannot lead"
                        )));
                    }
                    if id != self.identity.id {
                        self.raw.transfer_leader(id);
                    }
                    Ok(())
                });
                let _ = reply.send(result);
            }
            AdminCommand::Bootstrap { reply } => {
                let result = self.bootstrap();
                let _ = reply.send(result);
            }
        }
        Ok(())
    }

    fn check_leader(&self) -> Result<(), AdminError> {
        if self.raw.raft.state != StateRole::Leader {
            return Err(AdminError::NotLeader {
                leader_id: self.raw.raft.leader_id,
            });
        }
        if self.raw.raft.has_pending_conf() || self.membership.is_joint() {
            return Err(AdminError::ChangePending);
        }
        Ok(())
    }

    fn propose_change(&mut self, id: u64, ty: ConfChangeType, ctx: ConfChangeContext) -> Result<(), AdminError> {
        let mut single = ConfChangeSingle::default();
        single.node_id = id;
        single.set_change_type(ty);
        let mut cc = ConfChangeV2::default();
        cc.mut_changes().push(single);
        self.raw
            .propose_conf_change(command::encode(&ctx), cc)
            .map_err(|e| AdminError::Internal(format!("raft refused the change: {e}")))
    }

    /// The facts admission decides on: the applied membership and who was heard from lately.
    fn admit<T>(&self, decide: impl FnOnce(&LeaderView<'_>) -> Result<T, AdminError>) -> Result<T, AdminError> {
        let healthy: BTreeSet<u64> = self
            .membership
            .member_ids()
            .into_iter()
            .filter(|id| self.is_healthy(*id))
            .collect();
        decide(&LeaderView {
            membership: &self.membership,
            leader_id: self.identity.id,
            healthy: &healthy,
            max_promote_lag: self.tuning.max_promote_lag,
        })
    }

    fn propose_add(&mut self, id: u64, peer_url: String, learner: bool, request_id: u64) -> Result<(), AdminError> {
        self.admit(|view| view.admit_add(id, learner))?;
        let ty = if learner {
            ConfChangeType::AddLearnerNode
        } else {
            ConfChangeType::AddNode
        };
        self.propose_change(
            id,
            ty,
            ConfChangeContext {
                peer_url: Some(peer_url),
                request_id,
            },
        )
    }

    fn propose_promote(&mut self, id: u64, request_id: u64) -> Result<(), AdminError> {
        let progress = LearnerProgress {
            matched: self.raw.raft.prs().get(id).map(|p| p.matched),
            last_index: self.raw.raft.raft_log.last_index(),
        };
        self.admit(|view| view.admit_promote(id, progress))?;
        self.propose_change(
            id,
            ConfChangeType::AddNode,
            ConfChangeContext {
                peer_url: None,
                request_id,
            },
        )
    }

    fn propose_remove(&mut self, id: u64, request_id: u64) -> Result<(), AdminError> {
        self.admit(|view| view.admit_remove(id))?;
        self.propose_change(
            id,
            ConfChangeType::RemoveNode,
            ConfChangeContext {
                peer_url: None,
                request_id,
            },
        )
    }

    /// Heard from within two election timeouts.
    fn is_healthy(&self, id: u64) -> bool {
        let window = self.tuning.tick * (2 * self.tuning.election_ticks as u32);
        self.last_heard.get(&id).is_some_and(|at| at.elapsed() <= window)
    }

    fn bootstrap(&mut self) -> Result<u64, AdminError> {
        // A member that a cluster has already contacted (the transport adopted its cluster id,
        // or Raft recorded a term) is on its way into that cluster, waiting for its snapshot:
        // bootstrapping it would start a second cluster.
        let contacted = self.cluster_id.load(Ordering::Relaxed) != 0 || self.written_hs.term > 0;
        if self.is_initialized() || self.removed || contacted {
            return Err(AdminError::AlreadyInitialized {
                cluster_id: self.cluster_id.load(Ordering::Relaxed),
            });
        }
        let url = self.advertise_peer_url.clone().ok_or(AdminError::NoPeerUrl)?;
        let cluster_id = identity::random_id();
        let members = vec![(self.identity.id, url)];
        let (meta, membership) = write_initial_snapshot(&self.snapshots, &mut self.wal, cluster_id, &members)
            .map_err(|e| AdminError::Internal(e.to_string()))?;
        self.adopt_cluster_id(cluster_id)
            .map_err(|e| AdminError::Internal(e.to_string()))?;
        // Rebuild Raft over the initialised log: the uninitialised RawNode has no configuration to extend.
        let mut hs = HardState::default();
        hs.term = 1;
        hs.commit = 1;
        let store = LogStore::new(meta.clone(), hs.clone(), Vec::new());
        self.written_hs = hs;
        self.raw = RawNode::new(&raft_config(self.identity.id, 1, &self.tuning), store, &self.logger)
            .map_err(|e| AdminError::Internal(e.to_string()))?;
        self.set_membership(membership);
        let _ = self.apply_tx.send(ApplyMsg::Restore {
            path: self.snapshots.path(meta.index, meta.term),
            meta,
        });
        // A single voter elects itself at once rather than after an election timeout.
        let _ = self.raw.campaign();
        tracing::info!(member_id = self.identity.id, cluster_id, "bootstrapped a new cluster");
        Ok(cluster_id)
    }

    fn publish_status(&mut self) {
        let raft = &self.raw.raft;
        let membership = if self.removed {
            MemberRole::Removed
        } else {
            self.membership.role_of(self.identity.id)
        };
        let role = if self.removed {
            Role::Removed
        } else if !self.is_initialized() {
            Role::Uninitialized
        } else if membership == MemberRole::Learner {
            Role::Learner
        } else {
            match raft.state {
                StateRole::Leader => Role::Leader,
                StateRole::Follower => Role::Follower,
                StateRole::Candidate => Role::Candidate,
                StateRole::PreCandidate => Role::PreCandidate,
            }
        };
        if raft.leader_id != self.last_leader {
            if raft.leader_id != raft::INVALID_ID {
                self.metrics.leader_changes.inc();
                tracing::info!(
                    member_id = self.identity.id,
                    leader_id = raft.leader_id,
                    term = raft.term,
                    "leader changed"
                );
            }
            self.last_leader = raft.leader_id;
            self.leader_commit = 0;
        }
        let commit = raft.raft_log.committed;
        let is_leader = raft.state == StateRole::Leader;
        let progress = if is_leader {
            raft.prs()
                .iter()
                .map(|(&id, p)| {
                    (
                        id,
                        PeerProgress {
                            match_index: p.matched,
                            recent_active: id == self.identity.id || self.is_healthy(id),
                        },
                    )
                })
                .collect()
        } else {
            HashMap::new()
        };
        let status = RaftStatus {
            id: self.identity.id,
            cluster_id: self.cluster_id.load(Ordering::Relaxed),
            role,
            membership,
            term: raft.term,
            leader_id: raft.leader_id,
            commit_index: commit,
            leader_commit: if is_leader {
                commit
            } else {
                self.leader_commit.max(commit)
            },
            last_index: raft.raft_log.last_index(),
            snapshot_index: self.raw.store().snapshot_metadata().index,
            progress,
            members: self.membership.clone(),
        };
        self.metrics.term.set(status.term as i64);
        self.metrics.commit_index.set(commit as i64);
        self.metrics.is_leader.set(is_leader as i64);
        self.status_tx.send_if_modified(|current| {
            if *current == status {
                false
            } else {
                *current = status;
                true
            }
        });
    }
}

/// Writes the state a new cluster starts from: an empty key space at index 1, term 1, whose
/// configuration makes `members` its voters. Used once per cluster, by bootstrap or by a static
/// `--initial-cluster`; every initial member writes the identical state.
pub fn write_initial_snapshot(
    snapshots: &SnapshotStore,
    wal: &mut Wal,
    cluster_id: u64,
    members: &[(u64, String)],
) -> Result<(SnapshotMetadata, Membership)> {
    let mut state = KvState {
        applied_index: 1,
        applied_term: 1,
        cluster_id,
        ..Default::default()
    };
    for (id, url) in members {
        state.membership.voters.insert(*id);
        state.membership.peer_urls.insert(*id, url.clone());
    }
    let meta = seed_log(snapshots, wal, &state)?;
    Ok((meta, state.membership))
}

/// Makes `state` the starting point of an empty log: its snapshot file, then the WAL's marker
/// naming it current and a hard state that commits it. Shared by a new cluster's initial state
/// and by `raftkv-node restore`, whose state is a backup at a later index: the log continues
/// after that index, so new writes get higher revisions.
pub fn seed_log(snapshots: &SnapshotStore, wal: &mut Wal, state: &KvState) -> Result<SnapshotMetadata> {
    let meta = snapshots.write(state)?;
    let mut hs = HardState::default();
    hs.term = state.applied_term;
    hs.commit = state.applied_index;
    wal.append_snapshot_marker(state.applied_index, state.applied_term)?;
    wal.append_hard_state(&hs)?;
    // DURABILITY: the cluster exists for this member only once this fsync returns.
    wal.sync()?;
    Ok(meta)
}
