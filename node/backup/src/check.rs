//! The streaming check of a snapshot: its magic at the start and its crc32c trailer at the end.
//!
//! The node's snapshot format (`node/src/kv.rs`) starts with an 8-byte magic and ends with the
//! little-endian crc32c of every byte before it. A backup is checked while it streams, without
//! holding more than the last four bytes, so that an upload of a truncated or damaged stream is
//! aborted instead of completed, and a download is refused before it is restored.

use crate::{Error, Result};

/// The magic of the snapshot format the node writes now (`SNAPSHOT_MAGIC` in `node/src/kv.rs`;
/// a test in the node checks that the two agree).
pub const SNAPSHOT_MAGIC: &[u8; 8] = b"RKVSNAP\x02";
/// Every magic this crate accepts: the node still reads version 1 snapshots (no watch history).
pub const SNAPSHOT_MAGICS: [&[u8; 8]; 2] = [b"RKVSNAP\x01", SNAPSHOT_MAGIC];

/// The smallest possible snapshot: the magic and the trailer.
const MIN_SIZE: u64 = SNAPSHOT_MAGIC.len() as u64 + 4;

/// A running check over a snapshot's bytes, fed chunk by chunk.
#[derive(Debug, Default)]
pub struct SnapshotCheck {
    /// crc32c of every byte seen except the last four, which may be the trailer.
    crc: u32,
    /// The last (up to) four bytes seen, not yet in `crc`.
    tail: Vec<u8>,
    /// The first bytes, until the magic has been compared.
    head: Vec<u8>,
    /// Bytes seen so far.
    len: u64,
}

impl SnapshotCheck {
    /// A check that has seen nothing.
    pub fn new() -> Self {
        Self::default()
    }

    /// Feeds the next chunk. Fails as soon as the magic is wrong, so a stream that is not a
    /// raftkv snapshot is stopped after eight bytes.
    pub fn update(&mut self, chunk: &[u8]) -> Result<()> {
        if self.head.len() < SNAPSHOT_MAGIC.len() {
            let need = SNAPSHOT_MAGIC.len() - self.head.len();
            self.head.extend_from_slice(&chunk[..need.min(chunk.len())]);
            if self.head.len() == SNAPSHOT_MAGIC.len() && !SNAPSHOT_MAGICS.iter().any(|m| self.head[..] == m[..]) {
                return Err(Error::Damaged(
                    "not a raftkv snapshot of a known format (bad magic)".into(),
                ));
            }
        }
        self.len += chunk.len() as u64;
        if chunk.len() >= 4 {
            self.crc = crc32c::crc32c_append(self.crc, &self.tail);
            let (body, last) = chunk.split_at(chunk.len() - 4);
            self.crc = crc32c::crc32c_append(self.crc, body);
            self.tail.clear();
            self.tail.extend_from_slice(last);
        } else {
            self.tail.extend_from_slice(chunk);
            if self.tail.len() > 4 {
                let spill = self.tail.len() - 4;
                self.crc = crc32c::crc32c_append(self.crc, &self.tail[..spill]);
                self.tail.drain(..spill);
            }
        }
        Ok(())
    }

    /// Bytes seen so far.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether nothing has been seen yet.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Ends the check: the stream is a whole snapshot if it has the magic and its last four
    /// bytes are the checksum of everything before them. Returns the snapshot's size.
    pub fn finish(self) -> Result<u64> {
        if self.len < MIN_SIZE {
            return Err(Error::Damaged(format!(
                "truncated: {} bytes, a snapshot has at least {MIN_SIZE}",
                self.len
            )));
        }
        let trailer = u32::from_le_bytes(self.tail[..].try_into().expect("four bytes are held back"));
        if trailer != self.crc {
            return Err(Error::Damaged(format!(
                "checksum mismatch after {} bytes (trailer {trailer:08x}, computed {:08x}): truncated or damaged",
                self.len, self.crc
            )));
        }
        Ok(self.len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A snapshot-shaped byte string: magic, body, trailer.
    pub(crate) fn snapshot_bytes(body: &[u8]) -> Vec<u8> {
        let mut v = SNAPSHOT_MAGIC.to_vec();
        v.extend_from_slice(body);
        let crc = crc32c::crc32c(&v);
        v.extend_from_slice(&crc.to_le_bytes());
        v
    }

    fn check_in_chunks(bytes: &[u8], chunk: usize) -> Result<u64> {
        let mut c = SnapshotCheck::new();
        for part in bytes.chunks(chunk) {
            c.update(part)?;
        }
        c.finish()
    }

    #[test]
    fn a_whole_snapshot_passes_whatever_the_chunk_sizes() {
        let bytes = snapshot_bytes(&(0..1000u32).map(|i| i as u8).collect::<Vec<_>>());
        for chunk in [1, 2, 3, 4, 5, 7, 64, 1000, 5000] {
            assert_eq!(
                check_in_chunks(&bytes, chunk).unwrap(),
                bytes.len() as u64,
                "chunk {chunk}"
            );
        }
    }

    #[test]
    fn a_truncated_snapshot_is_refused_at_every_length() {
        let bytes = snapshot_bytes(b"some records of a snapshot");
        for cut in 0..bytes.len() {
            let err = check_in_chunks(&bytes[..cut], 3).unwrap_err();
            assert!(matches!(err, Error::Damaged(_)), "cut at {cut}: {err}");
        }
    }

    #[test]
    fn a_flipped_byte_is_refused() {
        let bytes = snapshot_bytes(b"some records of a snapshot");
        for i in 8..bytes.len() {
            let mut bad = bytes.clone();
            bad[i] ^= 0x40;
            assert!(check_in_chunks(&bad, 5).is_err(), "flip at {i}");
        }
    }

    #[test]
    fn an_unknown_format_is_refused_after_its_magic() {
        let mut bytes = snapshot_bytes(b"records");
        bytes[7] = 3;
        let mut c = SnapshotCheck::new();
        c.update(&bytes[..7]).unwrap();
        let err = c.update(&bytes[7..]).unwrap_err();
        assert!(err.to_string().contains("bad magic"), "{err}");
    }
}
