//! raftkv-backup: raftkv snapshots kept in object storage.
//!
//! A backup is one object holding a node's snapshot exactly as `GET /v1/snapshot` streams it
//! (length-framed records ending in a crc32c trailer). The operator uploads and prunes backups;
//! `raftkv-node restore --from <url>` downloads one. Both go through this crate so that they
//! agree on destinations, credentials, object names and what counts as a whole snapshot.
//!
//! # Layout
//! - [`destination`]: where backups live (`s3://`, `gs://`, `az://`, `file://` URLs and S3
//!   options) and the credentials to reach it, through the `object_store` crate.
//! - [`check`]: the streaming check of a snapshot's magic and trailer checksum, run on every
//!   byte uploaded or downloaded.
//! - [`transfer`]: streaming multipart upload that completes only for a checked snapshot, and
//!   download to a file.
//! - [`catalog`]: object names of backups, listing, and retention (a pure function).

pub mod catalog;
pub mod check;
pub mod destination;
pub mod transfer;

pub use catalog::{BackupObject, Retention};
pub use destination::{Destination, StoreOptions};

/// Everything that can go wrong with a backup.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The destination or object URL cannot be used.
    #[error("invalid backup location {url:?}: {reason}")]
    InvalidLocation {
        /// The URL as given.
        url: String,
        /// Why it was refused.
        reason: String,
    },
    /// The bytes are not a whole raftkv snapshot: bad magic, truncated, or a checksum mismatch.
    #[error("not a whole raftkv snapshot: {0}")]
    Damaged(String),
    /// Reading the snapshot stream from its source failed (the member went away, the
    /// connection broke).
    #[error("reading the snapshot from its source: {0}")]
    Source(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// The object store refused or failed a request.
    #[error("object store: {0}")]
    Store(#[from] object_store::Error),
    /// A local file could not be written or read.
    #[error("{context}: {source}")]
    Io {
        /// What was being done, with the path.
        context: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
}

/// The crate's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;
