//! The record format: how a segment's bytes are laid out, and the pure functions that encode
//! and decode them. Nothing here touches a file.
//!
//! ```text
//! segment  := file_header record*
//! file_header (12 bytes) := FILE_MAGIC (8 bytes) | FORMAT_VERSION (u32 LE)
//! record   := payload_len (u32 LE)
//!           | body_crc    (u32 LE, CRC32C of kind + payload)
//!           | header_crc  (u32 LE, CRC32C of the 8 bytes before it)
//!           | kind        (u8: 1 entry, 2 hard state, 3 snapshot marker)
//!           | payload     (payload_len bytes)
//! entry payload      := raft `Entry` protobuf
//! hard state payload := raft `HardState` protobuf
//! marker payload     := index (u64 LE) | term (u64 LE) | disposition (u8: 0 discard, 1 retain)
//! ```
//!
//! The header has its own checksum so that a damaged length is caught before it is trusted to
//! find the next record. Every segment begins with a preamble: the snapshot marker and hard
//! state in force when it was created (empty for the first segment of a new log), so older
//! segments can be deleted without losing either.

use protobuf::Message;
use raft::prelude::{Entry, HardState};

use super::{invalid, Checkpoint, Result};

/// Identifies a raftkv WAL segment; checked before any record is trusted.
pub const FILE_MAGIC: [u8; 8] = *b"RAFTKVWL";
/// Version of the segment layout described in the module docs; bumped on any incompatible change.
pub const FORMAT_VERSION: u32 = 1;
/// Bytes before the first record of a segment: magic, then version.
pub const FILE_HEADER_LEN: usize = FILE_MAGIC.len() + 4;
/// Bytes of a record header: payload length, body checksum, header checksum.
pub const RECORD_HEADER_LEN: usize = 12;
/// Record kind: a raft `Entry`, protobuf-encoded.
pub const RECORD_ENTRY: u8 = 1;
/// Record kind: a raft `HardState`, protobuf-encoded.
pub const RECORD_HARD_STATE: u8 = 2;
/// Record kind: a snapshot marker, [`MARKER_PAYLOAD_LEN`] bytes.
pub const RECORD_SNAPSHOT_MARKER: u8 = 3;
/// Snapshot marker payload: index (u64 LE), term (u64 LE), disposition (u8).
pub const MARKER_PAYLOAD_LEN: usize = 17;
/// Marker disposition: the log did not hold the marker's (index, term), so every entry goes.
pub const MARKER_DISCARDS_LOG: u8 = 0;
/// Marker disposition: the log held the marker's (index, term), so entries after it stay.
pub const MARKER_RETAINS_LATER_ENTRIES: u8 = 1;

/// What a snapshot marker does to the entries already in the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum MarkerDisposition {
    /// The log did not hold the marker's (index, term): nothing in it is trustworthy.
    DiscardLog,
    /// The log held the marker's (index, term): entries after it remain valid.
    RetainLaterEntries,
}

pub(super) fn file_header() -> Vec<u8> {
    let mut header = Vec::with_capacity(FILE_HEADER_LEN);
    header.extend_from_slice(&FILE_MAGIC);
    header.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    header
}

/// Appends one framed record to `out`.
pub(super) fn encode_record(out: &mut Vec<u8>, kind: u8, payload: &[u8]) -> Result<()> {
    let len =
        u32::try_from(payload.len()).map_err(|_| invalid(format!("record of {} bytes is too large", payload.len())))?;
    let body_crc = crc32c::crc32c_append(crc32c::crc32c(&[kind]), payload);
    let mut header = [0u8; RECORD_HEADER_LEN];
    header[0..4].copy_from_slice(&len.to_le_bytes());
    header[4..8].copy_from_slice(&body_crc.to_le_bytes());
    let header_crc = crc32c::crc32c(&header[0..8]);
    header[8..12].copy_from_slice(&header_crc.to_le_bytes());
    out.reserve(RECORD_HEADER_LEN + 1 + payload.len());
    out.extend_from_slice(&header);
    out.push(kind);
    out.extend_from_slice(payload);
    Ok(())
}

pub(super) fn encode_marker(index: u64, term: u64, disposition: MarkerDisposition) -> [u8; MARKER_PAYLOAD_LEN] {
    let mut payload = [0u8; MARKER_PAYLOAD_LEN];
    payload[0..8].copy_from_slice(&index.to_le_bytes());
    payload[8..16].copy_from_slice(&term.to_le_bytes());
    payload[16] = match disposition {
        MarkerDisposition::DiscardLog => MARKER_DISCARDS_LOG,
        MarkerDisposition::RetainLaterEntries => MARKER_RETAINS_LATER_ENTRIES,
    };
    payload
}

/// The records a new segment starts with, so that every older segment can be released.
pub(super) fn encode_preamble(out: &mut Vec<u8>, carried: &Checkpoint) -> Result<()> {
    if let Some((index, term)) = carried.snapshot {
        // The marker is already in force, so re-applying it must keep whatever follows it.
        let payload = encode_marker(index, term, MarkerDisposition::RetainLaterEntries);
        encode_record(out, RECORD_SNAPSHOT_MARKER, &payload)?;
    }
    if let Some(hs) = &carried.hard_state {
        let payload = hs
            .write_to_bytes()
            .map_err(|e| invalid(format!("hard state cannot be encoded: {e}")))?;
        encode_record(out, RECORD_HARD_STATE, &payload)?;
    }
    Ok(())
}

/// A decoded record.
#[derive(Debug, Clone, PartialEq)]
pub(super) enum Record {
    Entry(Entry),
    HardState(HardState),
    SnapshotMarker {
        index: u64,
        term: u64,
        disposition: MarkerDisposition,
    },
}

pub(super) fn decode_record(kind: u8, payload: &[u8]) -> Result<Record, String> {
    match kind {
        RECORD_ENTRY => Entry::parse_from_bytes(payload)
            .map(Record::Entry)
            .map_err(|e| format!("entry record does not decode: {e}")),
        RECORD_HARD_STATE => HardState::parse_from_bytes(payload)
            .map(Record::HardState)
            .map_err(|e| format!("hard state record does not decode: {e}")),
        RECORD_SNAPSHOT_MARKER => {
            if payload.len() != MARKER_PAYLOAD_LEN {
                return Err(format!(
                    "snapshot marker payload is {} bytes, expected {MARKER_PAYLOAD_LEN}",
                    payload.len()
                ));
            }
            let index = u64::from_le_bytes(payload[0..8].try_into().expect("8 bytes"));
            let term = u64::from_le_bytes(payload[8..16].try_into().expect("8 bytes"));
            let disposition = match payload[16] {
                MARKER_DISCARDS_LOG => MarkerDisposition::DiscardLog,
                MARKER_RETAINS_LATER_ENTRIES => MarkerDisposition::RetainLaterEntries,
                other => return Err(format!("unknown snapshot marker disposition {other}")),
            };
            Ok(Record::SnapshotMarker {
                index,
                term,
                disposition,
            })
        }
        other => Err(format!("unknown record kind {other}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wal::replay::scan_segment;
    use crate::wal::test_support::{entry, hard_state};

    #[test]
    fn record_framing_round_trips_every_kind() {
        let records = [
            Record::Entry(entry(7, 3)),
            Record::HardState(hard_state(3, 2, 6)),
            Record::SnapshotMarker {
                index: 5,
                term: 2,
                disposition: MarkerDisposition::RetainLaterEntries,
            },
            Record::SnapshotMarker {
                index: 9,
                term: 4,
                disposition: MarkerDisposition::DiscardLog,
            },
        ];
        let mut bytes = file_header();
        for record in &records {
            match record {
                Record::Entry(e) => encode_record(&mut bytes, RECORD_ENTRY, &e.write_to_bytes().unwrap()),
                Record::HardState(hs) => encode_record(&mut bytes, RECORD_HARD_STATE, &hs.write_to_bytes().unwrap()),
                Record::SnapshotMarker {
                    index,
                    term,
                    disposition,
                } => encode_record(
                    &mut bytes,
                    RECORD_SNAPSHOT_MARKER,
                    &encode_marker(*index, *term, *disposition),
                ),
            }
            .unwrap();
        }
        let scan = scan_segment(&bytes, false).unwrap();
        let decoded: Vec<_> = scan.records.into_iter().map(|(_, r)| r).collect();
        assert_eq!(decoded, records);
        assert_eq!(scan.torn_at, None);
    }
}
