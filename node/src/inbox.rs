//! What the other tasks send the consensus thread, and what it publishes back: proposals,
//! read-index requests, peer messages and admin commands in; its status out. A leaf module:
//! the HTTP layer, the transport and the state machine speak to consensus through these types
//! alone, so none of them depends on the Ready loop, and the loop depends on none of them for
//! its vocabulary.

use std::collections::HashMap;

use raft::prelude::{Message, SnapshotMetadata};
use tokio::sync::oneshot;

use crate::kv::{MemberRole, Membership};

/// Why a proposal or read could not be handed to Raft; in every case nothing was proposed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NotProposed {
    /// No leader is known (election in progress or no quorum).
    NoLeader,
    /// This member is not (or no longer) part of a cluster.
    NotMember,
    /// Raft dropped it (leadership transfer in progress, uncommitted log too large).
    Dropped,
}

/// Why an admin request was refused. Nothing was proposed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AdminError {
    /// This member is not the leader; the request should go to `leader_id` (0 = unknown).
    #[error("this member is not the leader")]
    NotLeader {
        /// The leader, if known.
        leader_id: u64,
    },
    /// Another membership change has not been applied yet.
    #[error("another membership change is still pending; retry once it is applied")]
    ChangePending,
    /// The learner is too far behind the leader to be promoted.
    #[error("member {id} lags the leader by {lag} entries (at most {max} allowed); retry once it caught up")]
    LearnerLagging {
        /// The learner.
        id: u64,
        /// How far behind it is.
        lag: u64,
        /// The allowed lag.
        max: u64,
    },
    /// Removing the member, or making it a voter, would leave fewer healthy voters than a quorum.
    #[error("this change to member {id} would leave {healthy} healthy voters of {voters}, fewer than a quorum")]
    WouldLoseQuorum {
        /// The member to remove or promote.
        id: u64,
        /// Healthy voters after the change.
        healthy: usize,
        /// Voters after the change.
        voters: usize,
    },
    /// The leader cannot remove itself; transfer leadership first.
    #[error("member {id} is the leader; transfer leadership first (POST /v1/leader)")]
    IsLeader {
        /// The leader's id.
        id: u64,
    },
    /// No such member.
    #[error("member {id} is not a member of this cluster")]
    NotMember {
        /// The id asked for.
        id: u64,
    },
    /// Already a member in the requested role.
    #[error("member {id} is already a {role}")]
    AlreadyMember {
        /// The id asked for.
        id: u64,
        /// Its current role.
        role: &'static str,
    },
    /// The id belonged to a removed member; ids are never reused.
    #[error("member id {id} was removed from this cluster and cannot be reused")]
    IdRemoved {
        /// The id asked for.
        id: u64,
    },
    /// Bootstrap was asked of a member that already belongs to a cluster.
    #[error("this member already belongs to cluster {cluster_id}")]
    AlreadyInitialized {
        /// Its cluster.
        cluster_id: u64,
    },
    /// Bootstrap needs to know how peers reach this member.
    #[error("this member has no advertised peer URL; start it with --advertise-peer-url")]
    NoPeerUrl,
    /// The request itself is invalid.
    #[error("{0}")]
    Invalid(String),
    /// Writing the bootstrap state failed.
    #[error("{0}")]
    Internal(String),
}

/// A membership request to the leader.
#[derive(Debug)]
pub enum AdminCommand {
    /// Add a member, as a learner unless `learner` is false.
    AddMember {
        /// New member id.
        id: u64,
        /// Its peer URL.
        peer_url: String,
        /// Add as a learner (the safe default).
        learner: bool,
        /// The waiter to answer when applied.
        request_id: u64,
        /// Whether the change was proposed.
        reply: oneshot::Sender<Result<(), AdminError>>,
    },
    /// Promote a caught-up learner to voter.
    Promote {
        /// The learner.
        id: u64,
        /// The waiter to answer when applied.
        request_id: u64,
        /// Whether the change was proposed.
        reply: oneshot::Sender<Result<(), AdminError>>,
    },
    /// Remove a member.
    Remove {
        /// The member.
        id: u64,
        /// The waiter to answer when applied.
        request_id: u64,
        /// Whether the change was proposed.
        reply: oneshot::Sender<Result<(), AdminError>>,
    },
    /// Start a leadership transfer.
    TransferLeader {
        /// The new leader.
        id: u64,
        /// Whether the transfer started.
        reply: oneshot::Sender<Result<(), AdminError>>,
    },
    /// Make this uninitialised member the first voter of a new cluster.
    Bootstrap {
        /// The new cluster id.
        reply: oneshot::Sender<Result<u64, AdminError>>,
    },
}

/// Everything the consensus thread reacts to.
#[derive(Debug)]
pub enum RaftInput {
    /// A client write.
    Propose {
        /// The encoded proposal.
        data: Vec<u8>,
        /// Whether Raft accepted it (not whether it committed).
        reply: oneshot::Sender<Result<(), NotProposed>>,
    },
    /// A linearizable read: answered with the read index once the leader confirmed it.
    ReadIndex {
        /// The read index, or why none could be had.
        reply: oneshot::Sender<Result<u64, NotProposed>>,
    },
    /// A message from a peer.
    Peer(Message),
    /// A membership or leadership request.
    Admin(AdminCommand),
    /// The state machine wrote a snapshot.
    SnapshotCreated {
        /// Its metadata.
        meta: SnapshotMetadata,
    },
    /// A peer could not be reached.
    Unreachable(u64),
    /// A snapshot send to a peer finished.
    SnapshotSent {
        /// The peer.
        to: u64,
        /// Whether it was delivered.
        ok: bool,
    },
    /// A peer announced its URL on an incoming stream.
    PeerUrl {
        /// The peer.
        id: u64,
        /// Its advertised peer URL.
        url: String,
    },
    /// A peer answered that this member was removed from the cluster.
    RemovedByPeer {
        /// The peer that said so.
        peer: u64,
    },
    /// Stop the loop.
    Shutdown,
}

/// The member's Raft role: the wire type itself, so the status the node publishes and the one
/// it answers with cannot differ.
pub use raftkv_api::Role;

/// A peer's replication progress in the leader's view.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerProgress {
    /// Highest index known replicated on the peer.
    pub match_index: u64,
    /// Whether the peer was heard from within the last election timeout.
    pub recent_active: bool,
}

/// A snapshot of consensus state, published after every loop iteration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RaftStatus {
    /// This member's id.
    pub id: u64,
    /// Its cluster (0 until known).
    pub cluster_id: u64,
    /// Its role.
    pub role: Role,
    /// Its membership in the applied configuration.
    pub membership: MemberRole,
    /// Current term.
    pub term: u64,
    /// The leader (0 = unknown).
    pub leader_id: u64,
    /// Highest committed index known here.
    pub commit_index: u64,
    /// The leader's commit index as last heard from it (the leader's own when leader).
    pub leader_commit: u64,
    /// Last log index.
    pub last_index: u64,
    /// Latest snapshot index.
    pub snapshot_index: u64,
    /// The leader's view of every peer; empty unless leader.
    pub progress: HashMap<u64, PeerProgress>,
    /// Membership as the consensus side applied it.
    pub members: Membership,
}
