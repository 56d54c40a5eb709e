//! The node's error type: every failure a node can report, with the context an operator needs to
//! act on it (which file, which member, which cluster).

use std::path::PathBuf;

use crate::wal::WalError;

/// Result alias used throughout the node crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong inside a node.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A filesystem or socket operation failed; `context` says what was being done.
    #[error("{context}: {source}")]
    Io {
        /// What was being done, including the path or address involved.
        context: String,
        /// The underlying I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The write-ahead log could not be opened, recovered or written (its messages say so).
    #[error(transparent)]
    Wal(#[from] WalError),
    /// The Raft library refused an operation.
    #[error("raft: {0}")]
    Raft(#[from] raft::Error),
    /// A snapshot file is unreadable or fails its checksum.
    #[error("snapshot {path}: {reason}")]
    Snapshot {
        /// The snapshot file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// This data directory belongs to a member that was removed from its cluster.
    #[error(
        "member {id} was removed from cluster {cluster_id} at index {index}; the data directory {dir} \
         cannot rejoin. Start the node with an empty data directory to join as a new member"
    )]
    Removed {
        /// The removed member's id.
        id: u64,
        /// The cluster it was removed from.
        cluster_id: u64,
        /// The Raft index of the removal.
        index: u64,
        /// The data directory that holds the removed member's state.
        dir: PathBuf,
    },
    /// A backup given to `raftkv-node restore` is unreadable, truncated, damaged or of an
    /// unknown format version; nothing was written.
    #[error("backup {from}: {reason}; nothing was written")]
    BadBackup {
        /// The file (or standard input) the backup was read from.
        from: String,
        /// What is wrong with it.
        reason: String,
    },
    /// `raftkv-node restore` refuses a data directory that already holds something.
    #[error("data directory {dir} is not empty (it holds {holds}); a restore writes only into an empty one")]
    NotEmpty {
        /// The data directory.
        dir: PathBuf,
        /// What it holds.
        holds: String,
    },
    /// A restore into this data directory did not finish; a member must not start on it.
    #[error("data directory {dir} holds an interrupted restore; run `raftkv-node restore` again, which clears it")]
    RestoreInterrupted {
        /// The data directory.
        dir: PathBuf,
    },
    /// The command-line configuration is inconsistent with itself or with the data directory.
    #[error("configuration: {0}")]
    Config(String),
    /// A record could not be encoded or decoded.
    #[error("codec: {0}")]
    Codec(String),
    /// A task or thread (the consensus thread, the state machine, file I/O off the async
    /// workers) panicked or was cancelled.
    #[error("background task failed: {0}")]
    Task(String),
}

impl Error {
    /// A short, stable code for the kind of failure, with the facts a supervisor acts on as
    /// `key=value` pairs: the first word of the `[...]` tag on a fatal error's line, which the
    /// operator reads from the pod's termination message to decide what to do with the volume.
    pub fn code(&self) -> String {
        match self {
            Error::Io { .. } => "io".into(),
            Error::Wal(WalError::Corrupt { .. }) => "wal_damaged".into(),
            Error::Wal(_) => "wal".into(),
            Error::Raft(_) => "raft".into(),
            Error::Snapshot { .. } => "snapshot_damaged".into(),
            Error::Removed { id, cluster_id, .. } => format!("removed_member member={id} cluster={cluster_id}"),
            Error::BadBackup { .. } => "bad_backup".into(),
            Error::NotEmpty { .. } => "data_dir_not_empty".into(),
            Error::RestoreInterrupted { .. } => "restore_interrupted".into(),
            Error::Config(_) => "config".into(),
            Error::Codec(_) => "codec".into(),
            Error::Task(_) => "task".into(),
        }
    }
}

/// Attaches a description of the failed operation to an I/O error.
pub trait IoContext<T> {
    /// Wraps the error with `context`, computed only on failure.
    fn io_context<F: FnOnce() -> String>(self, context: F) -> Result<T>;
}

impl<T> IoContext<T> for std::io::Result<T> {
    fn io_context<F: FnOnce() -> String>(self, context: F) -> Result<T> {
        self.map_err(|source| Error::Io {
            context: context(),
            source,
        })
    }
}
