//! raftkv-node: one member of a raftkv cluster.
pub mod wal;
