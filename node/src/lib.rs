//! raftkv-node: one member of a raftkv cluster.
//!
//! # Layout
//! The node keeps the shape of etcd's raftexample: a consensus side and a state-machine side
//! joined by channels.
//!
//! - [`consensus`]: the thread that owns the Raft `RawNode`; runs the `Ready` loop in raft-rs's
//!   order, persists to the WAL before anything depends on it, applies membership changes.
//! - [`admission`]: who may be added, promoted or removed without losing quorum (pure).
//! - [`inbox`]: what the other tasks send the consensus thread (proposals, reads, peer
//!   messages, admin commands and their refusals) and the status it publishes.
//! - [`wal`]: the write-ahead log: segmented, checksummed, torn-tail recovery; the writer in
//!   `wal/mod.rs`, its record format, segment-file I/O and replay in modules beside it.
//! - [`read_index`]: contexts for ReadIndex rounds, and why none may be sent twice.
//! - [`storage`]: the Raft log as raft-rs reads it (the in-memory tail after the last snapshot).
//! - [`snapshot`]: snapshot files: atomic creation, streaming reception, retention.
//! - [`state_machine`]: applies committed batches to the key-value state and answers waiting clients.
//! - [`kv`]: the replicated state itself (ordered map, revisions, membership) and its snapshot format.
//! - [`command`]: how client writes and membership contexts are encoded in log entries.
//! - [`transport`]: peer-to-peer streams of Raft messages and snapshots over HTTP.
//! - [`api`]: the client and admin HTTP API (key-value and admin handlers, forwarding to the
//!   leader, request decoding, error answers); its bodies are the `raftkv-api` crate's types.
//! - [`identity`]: the member id and tombstone on the data directory.
//! - [`restore`]: `raftkv-node restore`, a new single-member cluster seeded from a backup.
//! - [`node`]: recovery, start-up and shutdown of one member.
//! - [`local`]: a local cluster of member processes in one command.
//! - [`config`], [`metrics`], [`error`]: flags, Prometheus metrics, the error type.
//!
//! The load generator behind `raftkv-bench` is not part of the node: it is a crate of its own,
//! `node/bench/`, that talks to members over HTTP only.

// raft's protobuf messages are built field by field, as raft-rs's own examples build them.
#![allow(clippy::field_reassign_with_default)]

pub mod admission;
pub mod api;
pub mod command;
pub mod config;
pub mod consensus;
pub mod error;
pub mod identity;
pub mod inbox;
pub mod kv;
pub mod local;
pub mod metrics;
pub mod node;
pub mod read_index;
pub mod restore;
pub mod snapshot;
pub mod state_machine;
pub mod storage;
pub mod transport;
pub mod wal;

pub use error::{Error, Result};
