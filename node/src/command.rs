//! What a client write becomes in the Raft log: a [`Proposal`] encoded with `postcard`, and the
//! context attached to membership changes.
//!
//! The encoding is deterministic and compact; every member decodes the same bytes into the same
//! operation, which is what makes apply deterministic.

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// A client write, as proposed to Raft.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Proposal {
    /// Lets the proposing member find the waiting client when the entry is applied.
    pub request_id: u64,
    /// The operation itself.
    pub op: Op,
}

/// A state-machine operation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Op {
    /// Set `key` to `value` if `precondition` holds.
    Put {
        /// The key bytes.
        key: Bytes,
        /// The value bytes.
        value: Bytes,
        /// Compare-and-swap condition.
        precondition: Precondition,
    },
    /// Remove `key` if `precondition` holds.
    Delete {
        /// The key bytes.
        key: Bytes,
        /// Compare-and-swap condition.
        precondition: Precondition,
    },
}

/// The condition a write is checked against at apply time (HTTP `If-Match` / `If-None-Match`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Precondition {
    /// Unconditional.
    None,
    /// The key exists with exactly this mod revision (`If-Match: "N"`).
    ModRevision(u64),
    /// The key exists (`If-Match: *`).
    Exists,
    /// The key does not exist (`If-None-Match: *`).
    Absent,
}

impl Precondition {
    /// Whether the condition holds for a key whose current mod revision is `current`.
    pub fn holds(self, current: Option<u64>) -> bool {
        match self {
            Precondition::None => true,
            Precondition::ModRevision(r) => current == Some(r),
            Precondition::Exists => current.is_some(),
            Precondition::Absent => current.is_none(),
        }
    }
}

/// Attached to a membership change entry: what a member needs to reach the new peer, and who waits.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConfChangeContext {
    /// The peer URL of an added member.
    pub peer_url: Option<String>,
    /// Lets the proposing member find the waiting admin request.
    pub request_id: u64,
}

/// Encodes a value with postcard.
pub fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    // Serialising these plain structs into a Vec cannot fail.
    postcard::to_stdvec(value).expect("postcard encoding of an in-memory value")
}

/// Decodes a value with postcard.
pub fn decode<'a, T: Deserialize<'a>>(bytes: &'a [u8]) -> Result<T> {
    postcard::from_bytes(bytes).map_err(|e| Error::Codec(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proposals_round_trip() {
        let p = Proposal {
            request_id: 99,
            op: Op::Put {
                key: Bytes::from_static(b"k"),
                value: Bytes::from_static(b"\x00\xffv"),
                precondition: Precondition::ModRevision(12),
            },
        };
        let back: Proposal = decode(&encode(&p)).unwrap();
        assert_eq!(p, back);
    }

    #[test]
    fn preconditions_compare_against_the_current_revision() {
        assert!(Precondition::None.holds(None));
        assert!(Precondition::Absent.holds(None));
        assert!(!Precondition::Absent.holds(Some(1)));
        assert!(Precondition::Exists.holds(Some(1)));
        assert!(!Precondition::Exists.holds(None));
        assert!(Precondition::ModRevision(4).holds(Some(4)));
        assert!(!Precondition::ModRevision(4).holds(Some(5)));
        assert!(!Precondition::ModRevision(4).holds(None));
    }
}
