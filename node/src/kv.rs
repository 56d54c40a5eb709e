//! The replicated state: an ordered map of key to (value, create revision, mod revision), the
//! applied membership, and the snapshot encoding of both.
//!
//! Everything here is pure and deterministic: the same entries applied to the same state give the
//! same state on every member. The revision of a change is the Raft index of the entry that made it.
//!
//! # Snapshot format (version 2)
//! ```text
//! magic "RKVSNAP\x02" (8 bytes)
//! frame: u32 LE length | postcard(SnapshotHeader)
//! frame × key_count: u32 LE length | postcard(SnapshotRecord)
//! frame × history_count: u32 LE length | postcard(HistoryRecord)
//! trailer: u32 LE crc32c of every preceding byte
//! ```
//! Version 2 carries the watch history ([`crate::history`]) retained at the snapshot index, so a
//! restarted member or one that installs the snapshot can still replay the changes before it.
//! Version 1 (magic `RKVSNAP\x01`, a header without `compact_revision` and `history_count`, no
//! history frames) is still read: its state has lost every change up to its applied index.
//! The map is a persistent `imbl::OrdMap`, so taking a snapshot clones it in O(1) and the file is
//! written from that clone while apply continues.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};

use bytes::Bytes;
use imbl::OrdMap;
use raft::prelude::{ConfChangeType, ConfChangeV2, ConfState};
use serde::{Deserialize, Serialize};

use crate::command::{self, ConfChangeContext, Op, Proposal};
use crate::history::{Change, Compacted, History};

/// Identifies snapshot files of this format (version 2, with history).
pub const SNAPSHOT_MAGIC: &[u8; 8] = b"RKVSNAP\x02";
/// Identifies snapshot files of version 1 (no history), still read.
pub const SNAPSHOT_MAGIC_V1: &[u8; 8] = b"RKVSNAP\x01";
/// The snapshot format version this node writes (`X-Raftkv-Snapshot-Format`); it also reads
/// version 1.
pub const SNAPSHOT_FORMAT_VERSION: u8 = SNAPSHOT_MAGIC[7];
/// Largest frame a snapshot reader accepts; larger lengths mean corruption, not data.
const MAX_FRAME: u32 = 64 << 20;

/// A stored value and its revisions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KvValue {
    /// The value bytes.
    pub value: Bytes,
    /// Raft index of the entry that created the key.
    pub create_revision: u64,
    /// Raft index of the entry that last changed the key (the ETag).
    pub mod_revision: u64,
}

/// The applied cluster membership.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Membership {
    /// Voting members.
    pub voters: BTreeSet<u64>,
    /// Non-voting members.
    pub learners: BTreeSet<u64>,
    /// Outgoing voters while in a joint configuration.
    pub voters_outgoing: BTreeSet<u64>,
    /// Learners that become learners once a joint configuration is left.
    pub learners_next: BTreeSet<u64>,
    /// Whether a joint configuration is left automatically.
    pub auto_leave: bool,
    /// How to reach each member's peer transport.
    pub peer_urls: BTreeMap<u64, String>,
    /// Ids that were removed and may never be reused.
    pub removed: BTreeSet<u64>,
}

/// How a member takes part in the cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MemberRole {
    /// Votes in elections and commits.
    Voter,
    /// Receives the log but does not vote.
    Learner,
    /// Not part of the cluster (yet).
    None,
    /// Was part of the cluster and was removed.
    Removed,
}

impl Membership {
    /// The Raft configuration.
    pub fn conf_state(&self) -> ConfState {
        let mut cs = ConfState::default();
        cs.set_voters(self.voters.iter().copied().collect());
        cs.set_learners(self.learners.iter().copied().collect());
        cs.set_voters_outgoing(self.voters_outgoing.iter().copied().collect());
        cs.set_learners_next(self.learners_next.iter().copied().collect());
        cs.auto_leave = self.auto_leave;
        cs
    }

    /// Replaces the Raft configuration, keeping URLs and removals.
    pub fn set_conf_state(&mut self, cs: &ConfState) {
        self.voters = cs.get_voters().iter().copied().collect();
        self.learners = cs.get_learners().iter().copied().collect();
        self.voters_outgoing = cs.get_voters_outgoing().iter().copied().collect();
        self.learners_next = cs.get_learners_next().iter().copied().collect();
        self.auto_leave = cs.auto_leave;
    }

    /// The role of member `id`.
    pub fn role_of(&self, id: u64) -> MemberRole {
        if self.voters.contains(&id) || self.voters_outgoing.contains(&id) {
            MemberRole::Voter
        } else if self.learners.contains(&id) || self.learners_next.contains(&id) {
            MemberRole::Learner
        } else if self.removed.contains(&id) {
            MemberRole::Removed
        } else {
            MemberRole::None
        }
    }

    /// Whether the configuration is joint (a leftover that must be left explicitly).
    pub fn is_joint(&self) -> bool {
        !self.voters_outgoing.is_empty()
    }

    /// Applies a membership change whose resulting configuration Raft computed as `cs`.
    pub fn apply_change(&mut self, cc: &ConfChangeV2, ctx: &ConfChangeContext, cs: &ConfState) {
        for change in cc.get_changes() {
            let id = change.node_id;
            match change.get_change_type() {
                ConfChangeType::AddNode | ConfChangeType::AddLearnerNode => {
                    if let Some(url) = &ctx.peer_url {
                        self.peer_urls.insert(id, url.clone());
                    }
                }
                ConfChangeType::RemoveNode => {
                    self.peer_urls.remove(&id);
                    self.removed.insert(id);
                }
            }
        }
        self.set_conf_state(cs);
    }

    /// Every member id, voters first.
    pub fn member_ids(&self) -> Vec<u64> {
        let mut ids: Vec<u64> = self.voters.union(&self.voters_outgoing).copied().collect();
        ids.extend(
            self.learners
                .union(&self.learners_next)
                .filter(|id| !ids.contains(id))
                .copied()
                .collect::<Vec<_>>(),
        );
        ids
    }
}

/// What applying one entry did, reported to the client that proposed it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ApplyOutcome {
    /// A put took effect at `revision`.
    Put {
        /// The new mod revision.
        revision: u64,
    },
    /// A delete was applied at `revision`; `deleted` says whether the key existed.
    Delete {
        /// The entry's index.
        revision: u64,
        /// Whether a key was removed.
        deleted: bool,
    },
    /// The precondition did not hold; nothing changed.
    PreconditionFailed {
        /// The key's mod revision at apply time, if it exists.
        current: Option<u64>,
    },
    /// A membership change was applied.
    Membership,
    /// The entry could not be decoded; nothing changed. Every member rejects it identically.
    Rejected(String),
}

/// The whole replicated state of one member.
#[derive(Debug, Clone, Default)]
pub struct KvState {
    /// The key-value map.
    pub data: OrdMap<Bytes, KvValue>,
    /// Index of the last applied entry.
    pub applied_index: u64,
    /// Term of the last applied entry.
    pub applied_term: u64,
    /// The applied membership.
    pub membership: Membership,
    /// The cluster this state belongs to.
    pub cluster_id: u64,
    /// The retained changes, for watches and reads at a past revision.
    pub history: History,
}

/// A read at a revision the state cannot answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RevisionError {
    /// The changes since the revision are no longer all retained.
    #[error(transparent)]
    Compacted(#[from] Compacted),
    /// The revision is above the applied index.
    #[error("revision {asked} is in the future; the applied revision is {applied}")]
    Future {
        /// The revision asked for.
        asked: u64,
        /// The applied index.
        applied: u64,
    },
}

impl KvState {
    /// Checks that the state can be seen as it was at `revision`: no later than applied, and
    /// every change since retained.
    fn check_revision(&self, revision: u64) -> Result<(), RevisionError> {
        if revision > self.applied_index {
            return Err(RevisionError::Future {
                asked: revision,
                applied: self.applied_index,
            });
        }
        // Changes above `revision` are undone, so those must all be retained.
        self.history.check_retained(revision.saturating_add(1))?;
        Ok(())
    }

    /// The value of `key` as it was at `revision`.
    pub fn get_at(&self, key: &[u8], revision: u64) -> Result<Option<KvValue>, RevisionError> {
        self.check_revision(revision)?;
        // The first later change to the key says what it was before; without one it has not
        // changed since.
        Ok(match self.history.after(revision).find(|c| c.key.as_ref() == key) {
            Some(c) => c.before.clone(),
            None => self.data.get(key).cloned(),
        })
    }

    /// The map as it was at `revision`, exact for the keys under `prefix` (others are left as
    /// they are now). Undoes the later changes, newest first, on an O(1) clone.
    pub fn data_at(&self, revision: u64, prefix: &[u8]) -> Result<OrdMap<Bytes, KvValue>, RevisionError> {
        self.check_revision(revision)?;
        let mut data = self.data.clone();
        for c in self.history.after(revision).rev().filter(|c| c.key.starts_with(prefix)) {
            match &c.before {
                Some(v) => data.insert(c.key.clone(), v.clone()),
                None => data.remove(&c.key),
            };
        }
        Ok(data)
    }

    /// Applies a client proposal encoded in a normal entry.
    pub fn apply_proposal(&mut self, index: u64, term: u64, data: &[u8]) -> (Option<u64>, ApplyOutcome) {
        self.applied_index = index;
        self.applied_term = term;
        let proposal: Proposal = match command::decode(data) {
            Ok(p) => p,
            Err(e) => return (None, ApplyOutcome::Rejected(e.to_string())),
        };
        let outcome = self.apply_op(index, proposal.op);
        (Some(proposal.request_id), outcome)
    }

    fn apply_op(&mut self, index: u64, op: Op) -> ApplyOutcome {
        match op {
            Op::Put {
                key,
                value,
                precondition,
            } => {
                let current = self.data.get(&key);
                if !precondition.holds(current.map(|v| v.mod_revision)) {
                    return ApplyOutcome::PreconditionFailed {
                        current: current.map(|v| v.mod_revision),
                    };
                }
                let create_revision = current.map_or(index, |v| v.create_revision);
                let after = KvValue {
                    value,
                    create_revision,
                    mod_revision: index,
                };
                let before = self.data.insert(key.clone(), after.clone());
                self.history.record(Change {
                    revision: index,
                    key,
                    after: Some(after),
                    before,
                });
                ApplyOutcome::Put { revision: index }
            }
            Op::Delete { key, precondition } => {
                let current = self.data.get(&key).map(|v| v.mod_revision);
                if !precondition.holds(current) {
                    return ApplyOutcome::PreconditionFailed { current };
                }
                let before = self.data.remove(&key);
                let deleted = before.is_some();
                // Deleting a key that does not exist changes nothing: no change to watch.
                if deleted {
                    self.history.record(Change {
                        revision: index,
                        key,
                        after: None,
                        before,
                    });
                }
                ApplyOutcome::Delete {
                    revision: index,
                    deleted,
                }
            }
        }
    }

    /// Records an entry that carries nothing for the state machine (an empty entry a new leader
    /// appends, or a conf change Raft dropped).
    pub fn apply_noop(&mut self, index: u64, term: u64) {
        self.applied_index = index;
        self.applied_term = term;
    }

    /// Applies a membership change whose resulting configuration Raft computed as `cs`.
    pub fn apply_conf_change(
        &mut self,
        index: u64,
        term: u64,
        cc: &ConfChangeV2,
        ctx: &ConfChangeContext,
        cs: &ConfState,
    ) -> ApplyOutcome {
        self.applied_index = index;
        self.applied_term = term;
        self.membership.apply_change(cc, ctx, cs);
        ApplyOutcome::Membership
    }

    /// Writes the snapshot encoding of this state (the current version).
    pub fn write_snapshot<W: Write>(&self, w: W) -> std::io::Result<W> {
        let mut w = CrcWriter { inner: w, crc: 0 };
        w.write_all(SNAPSHOT_MAGIC)?;
        let header = SnapshotHeader {
            applied_index: self.applied_index,
            applied_term: self.applied_term,
            cluster_id: self.cluster_id,
            membership: self.membership.clone(),
            key_count: self.data.len() as u64,
            compact_revision: self.history.compact_revision(),
            history_count: self.history.len() as u64,
        };
        write_frame(&mut w, &command::encode(&header))?;
        let mut buf = Vec::with_capacity(512);
        for (key, v) in self.data.iter() {
            buf.clear();
            let record = SnapshotRecord {
                key: key.as_ref(),
                value: v.value.as_ref(),
                create_revision: v.create_revision,
                mod_revision: v.mod_revision,
            };
            buf = postcard::to_extend(&record, buf).map_err(std::io::Error::other)?;
            write_frame(&mut w, &buf)?;
        }
        for c in self.history.iter() {
            buf.clear();
            let record = HistoryRecord {
                revision: c.revision,
                key: c.key.as_ref(),
                after: c.after.as_ref().map(ValueRecord::of),
                before: c.before.as_ref().map(ValueRecord::of),
            };
            buf = postcard::to_extend(&record, buf).map_err(std::io::Error::other)?;
            write_frame(&mut w, &buf)?;
        }
        let crc = w.crc;
        w.inner.write_all(&crc.to_le_bytes())?;
        Ok(w.inner)
    }

    /// The exact size in bytes of [`KvState::write_snapshot`]'s output, found by encoding into a
    /// counter: a backup stream announces it as `Content-Length` before its first byte.
    pub fn snapshot_size(&self) -> u64 {
        let counted = self.write_snapshot(ByteCounter(0)).expect("counting bytes cannot fail");
        counted.0
    }

    /// Reads a snapshot of either version, verifying its checksum; errors describe what is
    /// wrong. The history's limits are the defaults: the state machine sets its own.
    pub fn read_snapshot<R: Read>(r: R) -> Result<KvState, String> {
        let mut r = CrcReader { inner: r, crc: 0 };
        let header = Self::read_snapshot_header(&mut r)?;
        let mut buf = Vec::new();
        let mut data = OrdMap::new();
        for n in 0..header.key_count {
            read_frame(&mut r, &mut buf)
                .map_err(|e| format!("reading record {n} of {}: {}", header.key_count, io_reason(e)))?;
            let rec: SnapshotRecord = postcard::from_bytes(&buf).map_err(|e| format!("decoding record {n}: {e}"))?;
            data.insert(
                Bytes::copy_from_slice(rec.key),
                KvValue {
                    value: Bytes::copy_from_slice(rec.value),
                    create_revision: rec.create_revision,
                    mod_revision: rec.mod_revision,
                },
            );
        }
        let mut changes = Vec::new();
        let mut last = header.compact_revision;
        for n in 0..header.history_count {
            read_frame(&mut r, &mut buf).map_err(|e| format!("reading history record {n}: {}", io_reason(e)))?;
            let rec: HistoryRecord =
                postcard::from_bytes(&buf).map_err(|e| format!("decoding history record {n}: {e}"))?;
            if rec.revision <= last || rec.revision > header.applied_index {
                return Err(format!(
                    "history record {n} has revision {} out of order (after {last}, applied {})",
                    rec.revision, header.applied_index
                ));
            }
            last = rec.revision;
            changes.push(Change {
                revision: rec.revision,
                key: Bytes::copy_from_slice(rec.key),
                after: rec.after.map(ValueRecord::value),
                before: rec.before.map(ValueRecord::value),
            });
        }
        let computed = r.crc;
        let mut trailer = [0u8; 4];
        r.inner
            .read_exact(&mut trailer)
            .map_err(|e| format!("reading checksum: {}", io_reason(e)))?;
        if u32::from_le_bytes(trailer) != computed {
            return Err("checksum mismatch".into());
        }
        let mut extra = [0u8; 1];
        if r.inner.read(&mut extra).map_err(|e| e.to_string())? != 0 {
            return Err("trailing bytes after checksum".into());
        }
        Ok(KvState {
            data,
            applied_index: header.applied_index,
            applied_term: header.applied_term,
            membership: header.membership,
            cluster_id: header.cluster_id,
            history: History::from_parts(header.compact_revision, changes),
        })
    }

    /// Checks a snapshot's magic (either version) and checksum without building the map.
    pub fn verify_snapshot<R: Read>(mut r: R) -> Result<(), String> {
        let mut crc = 0u32;
        let mut tail: Vec<u8> = Vec::with_capacity(4);
        let mut buf = vec![0u8; 1 << 16];
        let mut first = true;
        loop {
            let n = r.read(&mut buf).map_err(|e| e.to_string())?;
            if n == 0 {
                break;
            }
            if first {
                check_magic(&buf[..n.min(8)])?;
            }
            first = false;
            // Keep the last four bytes (the trailer) out of the running checksum.
            tail.extend_from_slice(&buf[..n]);
            let keep = tail.len().saturating_sub(4);
            crc = crc32c::crc32c_append(crc, &tail[..keep]);
            tail.drain(..keep);
        }
        if tail.len() < 4 || u32::from_le_bytes(tail[..4].try_into().expect("4 bytes")) != crc {
            return Err("checksum mismatch".into());
        }
        Ok(())
    }

    /// Reads only the header of a snapshot (either version): enough to learn the membership
    /// without loading data. A version 1 header reads as one whose history is compacted up to
    /// its applied index.
    pub fn read_snapshot_header<R: Read>(mut r: R) -> Result<SnapshotHeader, String> {
        let mut magic = [0u8; 8];
        r.read_exact(&mut magic)
            .map_err(|e| format!("reading magic: {}", io_reason(e)))?;
        let v1 = check_magic(&magic)?;
        let mut buf = Vec::new();
        read_frame(&mut r, &mut buf).map_err(|e| format!("reading header: {}", io_reason(e)))?;
        if v1 {
            let h: SnapshotHeaderV1 = command::decode(&buf).map_err(|e| format!("decoding header: {e}"))?;
            return Ok(SnapshotHeader {
                applied_index: h.applied_index,
                applied_term: h.applied_term,
                cluster_id: h.cluster_id,
                membership: h.membership,
                key_count: h.key_count,
                compact_revision: h.applied_index,
                history_count: 0,
            });
        }
        command::decode(&buf).map_err(|e| format!("decoding header: {e}"))
    }
}

/// The first frame of a snapshot.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SnapshotHeader {
    /// Index of the last entry the snapshot includes.
    pub applied_index: u64,
    /// Term of that entry.
    pub applied_term: u64,
    /// The cluster the snapshot belongs to.
    pub cluster_id: u64,
    /// The membership as of `applied_index`.
    pub membership: Membership,
    /// How many records follow.
    pub key_count: u64,
    /// The history's compact revision: every change above it follows the records.
    pub compact_revision: u64,
    /// How many history records follow the key records.
    pub history_count: u64,
}

/// The header of a version 1 snapshot (postcard is not self-describing: each version is a type).
#[derive(Deserialize)]
struct SnapshotHeaderV1 {
    applied_index: u64,
    applied_term: u64,
    cluster_id: u64,
    membership: Membership,
    key_count: u64,
}

/// One retained change in a snapshot.
#[derive(Serialize, Deserialize)]
struct HistoryRecord<'a> {
    revision: u64,
    #[serde(with = "serde_bytes_slice")]
    key: &'a [u8],
    #[serde(borrow)]
    after: Option<ValueRecord<'a>>,
    #[serde(borrow)]
    before: Option<ValueRecord<'a>>,
}

#[derive(Serialize, Deserialize)]
struct ValueRecord<'a> {
    #[serde(with = "serde_bytes_slice")]
    value: &'a [u8],
    create_revision: u64,
    mod_revision: u64,
}

impl<'a> ValueRecord<'a> {
    fn of(v: &'a KvValue) -> Self {
        ValueRecord {
            value: v.value.as_ref(),
            create_revision: v.create_revision,
            mod_revision: v.mod_revision,
        }
    }

    fn value(self) -> KvValue {
        KvValue {
            value: Bytes::copy_from_slice(self.value),
            create_revision: self.create_revision,
            mod_revision: self.mod_revision,
        }
    }
}

#[derive(Serialize, Deserialize)]
struct SnapshotRecord<'a> {
    #[serde(with = "serde_bytes_slice")]
    key: &'a [u8],
    #[serde(with = "serde_bytes_slice")]
    value: &'a [u8],
    create_revision: u64,
    mod_revision: u64,
}

/// Byte slices as one length-prefixed blob rather than a sequence of u8.
mod serde_bytes_slice {
    use serde::{Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(v)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<&'de [u8], D::Error> {
        <&'de [u8] as serde::Deserialize>::deserialize(d)
    }
}

/// Checks the 8-byte magic, telling a snapshot of another format version from something that
/// is not a snapshot at all.
/// Checks a snapshot's magic; `Ok(true)` for a version 1 snapshot (no history), `Ok(false)` for
/// the current version.
fn check_magic(magic: &[u8]) -> Result<bool, String> {
    let prefix = &SNAPSHOT_MAGIC[..7];
    if magic.len() < 8 || &magic[..7] != prefix {
        return Err("not a raftkv snapshot (bad magic)".into());
    }
    match magic[7] {
        v if v == SNAPSHOT_FORMAT_VERSION => Ok(false),
        v if v == SNAPSHOT_MAGIC_V1[7] => Ok(true),
        v => Err(format!(
            "unsupported snapshot format version {v} (this node reads versions 1 and {SNAPSHOT_FORMAT_VERSION})"
        )),
    }
}

/// Describes a read failure; running out of bytes is what a cut-short file looks like.
fn io_reason(e: std::io::Error) -> String {
    if e.kind() == std::io::ErrorKind::UnexpectedEof {
        "truncated (the data ends early)".into()
    } else {
        e.to_string()
    }
}

/// A writer that only counts.
struct ByteCounter(u64);

impl Write for ByteCounter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0 += buf.len() as u64;
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn write_frame<W: Write>(w: &mut W, payload: &[u8]) -> std::io::Result<()> {
    w.write_all(&(payload.len() as u32).to_le_bytes())?;
    w.write_all(payload)
}

fn read_frame<R: Read>(r: &mut R, buf: &mut Vec<u8>) -> std::io::Result<()> {
    let mut len = [0u8; 4];
    r.read_exact(&mut len)?;
    let len = u32::from_le_bytes(len);
    if len > MAX_FRAME {
        return Err(std::io::Error::other(format!("frame length {len} exceeds {MAX_FRAME}")));
    }
    buf.resize(len as usize, 0);
    r.read_exact(buf)
}

struct CrcWriter<W> {
    inner: W,
    crc: u32,
}

impl<W: Write> Write for CrcWriter<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.crc = crc32c::crc32c_append(self.crc, &buf[..n]);
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

struct CrcReader<R> {
    inner: R,
    crc: u32,
}

impl<R: Read> Read for CrcReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.crc = crc32c::crc32c_append(self.crc, &buf[..n]);
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::command::Precondition;
    use crate::history::HistoryLimits;
    use raft::prelude::ConfChangeSingle;

    fn put(state: &mut KvState, index: u64, key: &str, value: &str, pre: Precondition) -> ApplyOutcome {
        let p = Proposal {
            request_id: index,
            op: Op::Put {
                key: Bytes::copy_from_slice(key.as_bytes()),
                value: Bytes::copy_from_slice(value.as_bytes()),
                precondition: pre,
            },
        };
        state.apply_proposal(index, 1, &command::encode(&p)).1
    }

    #[test]
    fn revisions_are_raft_indexes_and_create_revision_survives_updates() {
        let mut s = KvState::default();
        assert_eq!(
            put(&mut s, 5, "a", "1", Precondition::None),
            ApplyOutcome::Put { revision: 5 }
        );
        assert_eq!(
            put(&mut s, 9, "a", "2", Precondition::ModRevision(5)),
            ApplyOutcome::Put { revision: 9 }
        );
        let v = s.data.get(&Bytes::from_static(b"a")).unwrap();
        assert_eq!((v.create_revision, v.mod_revision, v.value.as_ref()), (5, 9, &b"2"[..]));
        assert_eq!(
            put(&mut s, 10, "a", "3", Precondition::ModRevision(5)),
            ApplyOutcome::PreconditionFailed { current: Some(9) }
        );
        assert_eq!(
            put(&mut s, 11, "a", "3", Precondition::Absent),
            ApplyOutcome::PreconditionFailed { current: Some(9) }
        );
        assert_eq!(s.applied_index, 11);
        assert_eq!(
            s.data.get(&Bytes::from_static(b"a")).unwrap().mod_revision,
            9,
            "failed CAS changes nothing"
        );
    }

    #[test]
    fn deletes_report_whether_the_key_existed() {
        let mut s = KvState::default();
        put(&mut s, 1, "a", "1", Precondition::None);
        let del = |s: &mut KvState, index, pre| {
            let p = Proposal {
                request_id: 0,
                op: Op::Delete {
                    key: Bytes::from_static(b"a"),
                    precondition: pre,
                },
            };
            s.apply_proposal(index, 1, &command::encode(&p)).1
        };
        assert_eq!(
            del(&mut s, 2, Precondition::ModRevision(7)),
            ApplyOutcome::PreconditionFailed { current: Some(1) }
        );
        assert_eq!(
            del(&mut s, 3, Precondition::None),
            ApplyOutcome::Delete {
                revision: 3,
                deleted: true
            }
        );
        assert_eq!(
            del(&mut s, 4, Precondition::None),
            ApplyOutcome::Delete {
                revision: 4,
                deleted: false
            }
        );
    }

    #[test]
    fn undecodable_entries_are_rejected_identically_and_change_nothing() {
        let mut s = KvState::default();
        let (id, outcome) = s.apply_proposal(3, 1, b"\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff");
        assert_eq!(id, None);
        assert!(matches!(outcome, ApplyOutcome::Rejected(_)));
        assert!(s.data.is_empty());
        assert_eq!(s.applied_index, 3);
    }

    #[test]
    fn conf_changes_track_urls_and_removed_ids() {
        let mut s = KvState::default();
        let mut cc = ConfChangeV2::default();
        let mut single = ConfChangeSingle::default();
        single.set_change_type(ConfChangeType::AddLearnerNode);
        single.node_id = 4;
        cc.mut_changes().push(single.clone());
        let mut cs = ConfState::default();
        cs.set_voters(vec![1]);
        cs.set_learners(vec![4]);
        let ctx = ConfChangeContext {
            peer_url: Some("http://n4:8081".into()),
            request_id: 1,
        };
        s.apply_conf_change(7, 2, &cc, &ctx, &cs);
        assert_eq!(s.membership.role_of(4), MemberRole::Learner);
        assert_eq!(s.membership.peer_urls[&4], "http://n4:8081");
        single.set_change_type(ConfChangeType::RemoveNode);
        cc.mut_changes()[0] = single;
        cs.set_learners(vec![]);
        s.apply_conf_change(8, 2, &cc, &ConfChangeContext::default(), &cs);
        assert_eq!(s.membership.role_of(4), MemberRole::Removed);
        assert!(!s.membership.peer_urls.contains_key(&4));
        assert_eq!(s.membership.conf_state(), cs);
    }

    #[test]
    fn snapshots_round_trip_binary_keys_and_values() {
        let mut s = KvState {
            cluster_id: 77,
            ..Default::default()
        };
        s.membership.voters.insert(1);
        s.membership.peer_urls.insert(1, "http://a".into());
        for i in 0..1000u32 {
            s.data.insert(
                Bytes::from(i.to_be_bytes().to_vec()),
                KvValue {
                    value: Bytes::from(vec![0xff; (i % 17) as usize]),
                    create_revision: i as u64,
                    mod_revision: i as u64 + 1,
                },
            );
        }
        s.applied_index = 1234;
        s.applied_term = 5;
        let bytes = s.write_snapshot(Vec::new()).unwrap();
        let back = KvState::read_snapshot(&bytes[..]).unwrap();
        assert_eq!(back.data, s.data);
        assert_eq!(back.membership, s.membership);
        assert_eq!((back.applied_index, back.applied_term, back.cluster_id), (1234, 5, 77));
        let header = KvState::read_snapshot_header(&bytes[..]).unwrap();
        assert_eq!(header.key_count, 1000);
    }

    #[test]
    fn a_flipped_bit_or_truncation_in_a_snapshot_is_detected() {
        let mut s = KvState::default();
        s.data.insert(
            Bytes::from_static(b"key"),
            KvValue {
                value: Bytes::from_static(b"value"),
                create_revision: 1,
                mod_revision: 1,
            },
        );
        let bytes = s.write_snapshot(Vec::new()).unwrap();
        for i in 8..bytes.len() {
            let mut bad = bytes.clone();
            bad[i] ^= 0x10;
            assert!(
                KvState::read_snapshot(&bad[..]).is_err(),
                "flip at byte {i} went unnoticed"
            );
        }
        for len in 0..bytes.len() {
            assert!(
                KvState::read_snapshot(&bytes[..len]).is_err(),
                "truncation to {len} went unnoticed"
            );
            assert!(
                KvState::verify_snapshot(&bytes[..len]).is_err(),
                "verify missed truncation to {len}"
            );
        }
        KvState::verify_snapshot(&bytes[..]).unwrap();
        let mut bad = bytes.clone();
        bad[12] ^= 1;
        assert!(KvState::verify_snapshot(&bad[..]).is_err());
    }

    fn delete(state: &mut KvState, index: u64, key: &str) -> ApplyOutcome {
        let p = Proposal {
            request_id: index,
            op: Op::Delete {
                key: Bytes::copy_from_slice(key.as_bytes()),
                precondition: Precondition::None,
            },
        };
        state.apply_proposal(index, 1, &command::encode(&p)).1
    }

    fn value_of(v: Option<KvValue>) -> Option<(String, u64, u64)> {
        v.map(|v| {
            (
                String::from_utf8(v.value.to_vec()).unwrap(),
                v.create_revision,
                v.mod_revision,
            )
        })
    }

    #[test]
    fn every_change_is_recorded_with_its_previous_value_and_failed_writes_are_not() {
        let mut s = KvState::default();
        put(&mut s, 2, "a", "1", Precondition::None);
        put(&mut s, 3, "a", "2", Precondition::ModRevision(99));
        put(&mut s, 4, "a", "3", Precondition::None);
        delete(&mut s, 5, "a");
        delete(&mut s, 6, "a");
        s.apply_noop(7, 2);
        let changes: Vec<_> = s
            .history
            .iter()
            .map(|c| (c.revision, value_of(c.after.clone()), value_of(c.before.clone())))
            .collect();
        assert_eq!(
            changes,
            vec![
                (2, Some(("1".into(), 2, 2)), None),
                (4, Some(("3".into(), 2, 4)), Some(("1".into(), 2, 2))),
                (5, None, Some(("3".into(), 2, 4))),
            ],
            "a failed CAS and a delete of a missing key change nothing"
        );
    }

    #[test]
    fn reads_at_a_past_revision_see_the_state_then_or_say_why_not() {
        let mut s = KvState::default();
        put(&mut s, 2, "a", "1", Precondition::None);
        put(&mut s, 3, "b", "1", Precondition::None);
        put(&mut s, 4, "a", "2", Precondition::None);
        delete(&mut s, 5, "b");
        s.apply_noop(6, 1);
        assert_eq!(value_of(s.get_at(b"a", 3).unwrap()), Some(("1".into(), 2, 2)));
        assert_eq!(value_of(s.get_at(b"a", 6).unwrap()), Some(("2".into(), 2, 4)));
        assert_eq!(value_of(s.get_at(b"b", 4).unwrap()), Some(("1".into(), 3, 3)));
        assert_eq!(s.get_at(b"b", 5).unwrap(), None);
        assert_eq!(s.get_at(b"a", 1).unwrap(), None);
        assert_eq!(s.get_at(b"a", 7), Err(RevisionError::Future { asked: 7, applied: 6 }));
        let at3 = s.data_at(3, b"").unwrap();
        assert_eq!(at3.len(), 2);
        assert_eq!(at3.get(&Bytes::from_static(b"a")).unwrap().mod_revision, 2);
        s.history.set_limits(HistoryLimits {
            max_changes: 2,
            max_bytes: usize::MAX,
        });
        assert_eq!(s.history.compact_revision(), 3);
        assert!(matches!(s.get_at(b"a", 2), Err(RevisionError::Compacted(_))));
        assert_eq!(value_of(s.get_at(b"a", 3).unwrap()), Some(("1".into(), 2, 2)));
    }

    #[test]
    fn a_snapshot_carries_the_history_and_its_compact_revision() {
        let mut s = KvState::default();
        s.history.set_limits(HistoryLimits {
            max_changes: 3,
            max_bytes: usize::MAX,
        });
        for i in 1..=6u64 {
            put(
                &mut s,
                i * 2,
                &format!("k{}", i % 2),
                &format!("v{i}"),
                Precondition::None,
            );
        }
        delete(&mut s, 13, "k0");
        let bytes = s.write_snapshot(Vec::new()).unwrap();
        KvState::verify_snapshot(&bytes[..]).unwrap();
        let back = KvState::read_snapshot(&bytes[..]).unwrap();
        assert_eq!(back.history.compact_revision(), s.history.compact_revision());
        assert_eq!(
            back.history.iter().collect::<Vec<_>>(),
            s.history.iter().collect::<Vec<_>>()
        );
        assert_eq!(back.history.bytes(), s.history.bytes());
        let header = KvState::read_snapshot_header(&bytes[..]).unwrap();
        assert_eq!((header.compact_revision, header.history_count), (8, 3));
        for r in 8..=13 {
            assert_eq!(back.get_at(b"k1", r), s.get_at(b"k1", r), "at revision {r}");
        }
    }

    /// Writes `s` as a version 1 snapshot, the format before the history was carried.
    fn write_v1(s: &KvState) -> Vec<u8> {
        #[derive(Serialize)]
        struct HeaderV1 {
            applied_index: u64,
            applied_term: u64,
            cluster_id: u64,
            membership: Membership,
            key_count: u64,
        }
        let mut w = CrcWriter {
            inner: Vec::new(),
            crc: 0,
        };
        w.write_all(SNAPSHOT_MAGIC_V1).unwrap();
        let header = HeaderV1 {
            applied_index: s.applied_index,
            applied_term: s.applied_term,
            cluster_id: s.cluster_id,
            membership: s.membership.clone(),
            key_count: s.data.len() as u64,
        };
        write_frame(&mut w, &command::encode(&header)).unwrap();
        for (key, v) in s.data.iter() {
            let record = SnapshotRecord {
                key: key.as_ref(),
                value: v.value.as_ref(),
                create_revision: v.create_revision,
                mod_revision: v.mod_revision,
            };
            write_frame(&mut w, &postcard::to_stdvec(&record).unwrap()).unwrap();
        }
        let crc = w.crc;
        w.inner.extend_from_slice(&crc.to_le_bytes());
        w.inner
    }

    #[test]
    fn a_version_one_snapshot_still_reads_with_its_history_compacted_at_its_index() {
        let mut s = KvState {
            cluster_id: 3,
            ..Default::default()
        };
        put(&mut s, 4, "a", "1", Precondition::None);
        put(&mut s, 5, "b", "2", Precondition::None);
        let bytes = write_v1(&s);
        KvState::verify_snapshot(&bytes[..]).unwrap();
        let back = KvState::read_snapshot(&bytes[..]).unwrap();
        assert_eq!(back.data, s.data);
        assert_eq!((back.applied_index, back.cluster_id), (5, 3));
        assert!(back.history.is_empty());
        assert_eq!(back.history.compact_revision(), 5);
        assert!(back.history.check_retained(5).is_err());
        assert!(back.history.check_retained(6).is_ok());
        let header = KvState::read_snapshot_header(&bytes[..]).unwrap();
        assert_eq!(
            (header.key_count, header.compact_revision, header.history_count),
            (2, 5, 0)
        );
    }

    mod model {
        use std::collections::BTreeMap;

        use proptest::prelude::*;

        use super::*;

        #[derive(Debug, Clone)]
        enum Step {
            Put(u8, u8),
            Delete(u8),
            Noop,
        }

        fn step() -> impl Strategy<Value = Step> {
            prop_oneof![
                4 => (0u8..6, any::<u8>()).prop_map(|(k, v)| Step::Put(k, v)),
                2 => (0u8..6).prop_map(Step::Delete),
                1 => Just(Step::Noop),
            ]
        }

        type Model = BTreeMap<Vec<u8>, (Vec<u8>, u64, u64)>;

        fn key(k: u8) -> String {
            format!("{}/{k}", if k.is_multiple_of(2) { "even" } else { "odd" })
        }

        fn as_model(data: &OrdMap<Bytes, KvValue>, prefix: &[u8]) -> Model {
            data.iter()
                .filter(|(k, _)| k.starts_with(prefix))
                .map(|(k, v)| (k.to_vec(), (v.value.to_vec(), v.create_revision, v.mod_revision)))
                .collect()
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(64))]

            /// Against a model that keeps the whole state at every revision: every read at a
            /// retained revision sees that state, every page-by-page resumption from any
            /// retained revision yields exactly the model's changes once each in order, the
            /// snapshot keeps all of it, and nothing older than the compact revision is served.
            #[test]
            fn history_reads_and_resumption_match_a_model(
                steps in proptest::collection::vec(step(), 1..80),
                max_changes in 1usize..40,
                page in 1usize..7,
                start in 0u64..90,
            ) {
                let mut s = KvState::default();
                s.history.set_limits(HistoryLimits { max_changes, max_bytes: usize::MAX });
                let mut states: Vec<Model> = vec![Model::new()];
                let mut changes: Vec<(u64, Vec<u8>)> = Vec::new();
                for (i, st) in steps.iter().enumerate() {
                    let index = i as u64 + 1;
                    let mut m = states.last().unwrap().clone();
                    match st {
                        Step::Put(k, v) => {
                            put(&mut s, index, &key(*k), &v.to_string(), Precondition::None);
                            let create = m.get(key(*k).as_bytes()).map_or(index, |e| e.1);
                            m.insert(key(*k).into_bytes(), (v.to_string().into_bytes(), create, index));
                            changes.push((index, key(*k).into_bytes()));
                        }
                        Step::Delete(k) => {
                            delete(&mut s, index, &key(*k));
                            if m.remove(key(*k).as_bytes()).is_some() {
                                changes.push((index, key(*k).into_bytes()));
                            }
                        }
                        Step::Noop => s.apply_noop(index, 1),
                    }
                    states.push(m);
                }
                let applied = s.applied_index;
                let compact = s.history.compact_revision();
                prop_assert!(s.history.len() <= max_changes);
                let s = KvState::read_snapshot(&s.write_snapshot(Vec::new()).unwrap()[..]).unwrap();
                for r in 0..=applied {
                    let at = s.data_at(r, b"even/");
                    if r < compact {
                        prop_assert!(at.is_err(), "revision {} is below compact {}", r, compact);
                        continue;
                    }
                    prop_assert_eq!(as_model(&at.unwrap(), b"even/"), as_model_of(&states[r as usize], b"even/"));
                    for k in 0..6 {
                        let got = s.get_at(key(k).as_bytes(), r).unwrap()
                            .map(|v| (v.value.to_vec(), v.create_revision, v.mod_revision));
                        prop_assert_eq!(got, states[r as usize].get(key(k).as_bytes()).cloned());
                    }
                }
                // Resume page by page from `start`, as a watcher does.
                let from = start.max(1);
                let mut cursor = from;
                let mut seen = Vec::new();
                let outcome = loop {
                    match s.history.read(cursor, applied, |k| k.starts_with(b"odd/"), page) {
                        Err(e) => break Err(e),
                        Ok(p) => {
                            seen.extend(p.changes.iter().map(|c| (c.revision, c.key.to_vec())));
                            prop_assert!(p.through + 1 > cursor || p.changes.is_empty());
                            cursor = p.through + 1;
                            if p.through >= applied { break Ok(()); }
                        }
                    }
                };
                if from <= compact {
                    prop_assert!(outcome.is_err());
                } else {
                    prop_assert!(outcome.is_ok());
                    let expected: Vec<_> = changes.iter()
                        .filter(|(r, k)| *r >= from && k.starts_with(b"odd/"))
                        .cloned()
                        .collect();
                    prop_assert_eq!(seen, expected);
                }
            }
        }

        fn as_model_of(m: &Model, prefix: &[u8]) -> Model {
            m.iter()
                .filter(|(k, _)| k.starts_with(prefix))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect()
        }
    }

    #[test]
    fn a_snapshot_cut_short_in_its_history_is_reported_truncated() {
        let mut s = KvState::default();
        put(&mut s, 2, "a", "1", Precondition::None);
        put(&mut s, 3, "a", "2", Precondition::None);
        let bytes = s.write_snapshot(Vec::new()).unwrap();
        // Drop the trailer and part of the last history record.
        let err = KvState::read_snapshot(&bytes[..bytes.len() - 6]).unwrap_err();
        assert!(err.contains("history record") && err.contains("truncated"), "{err}");
    }

    #[test]
    fn backups_check_the_magic_this_node_writes_and_every_one_it_reads() {
        assert_eq!(raftkv_backup::check::SNAPSHOT_MAGIC, SNAPSHOT_MAGIC);
        assert!(raftkv_backup::check::SNAPSHOT_MAGICS.contains(&SNAPSHOT_MAGIC_V1));
        let bytes = KvState::default().write_snapshot(Vec::new()).unwrap();
        let mut check = raftkv_backup::check::SnapshotCheck::new();
        check.update(&bytes).unwrap();
        assert_eq!(check.finish().unwrap(), bytes.len() as u64);
    }

    #[test]
    fn a_snapshot_of_another_format_version_is_refused_as_such() {
        let mut bytes = KvState::default().write_snapshot(Vec::new()).unwrap();
        bytes[7] = SNAPSHOT_FORMAT_VERSION + 1;
        for err in [
            KvState::read_snapshot(&bytes[..]).unwrap_err(),
            KvState::verify_snapshot(&bytes[..]).unwrap_err(),
            KvState::read_snapshot_header(&bytes[..]).unwrap_err(),
        ] {
            assert!(err.contains("unsupported snapshot format version"), "{err}");
        }
        bytes[0] = b'X';
        assert!(KvState::read_snapshot(&bytes[..]).unwrap_err().contains("bad magic"));
    }

    #[test]
    fn the_announced_snapshot_size_is_the_written_size() {
        let mut s = KvState::default();
        for i in 0..300u32 {
            s.data.insert(
                Bytes::from(format!("key{i}")),
                KvValue {
                    value: Bytes::from(vec![7; (i * 13 % 700) as usize]),
                    create_revision: i as u64,
                    mod_revision: i as u64 * 1000,
                },
            );
        }
        assert_eq!(s.snapshot_size(), s.write_snapshot(Vec::new()).unwrap().len() as u64);
    }
}
