//! `GET /v1/snapshot`: the backup stream of a member's state machine, and the headers that
//! describe it.
//!
//! The body is the node's snapshot file format, byte for byte what `raftkv-node restore
//! --from FILE` reads: the magic `RKVSNAP` and a one-byte format version, a length-framed header
//! holding the key count, one length-framed record per key, and a crc32c of every preceding byte
//! as the last four bytes. A reader detects a truncated or damaged stream without trusting the
//! transport: fewer bytes than `Content-Length`, fewer records than the header's key count, or a
//! trailer that does not match. The headers below are known before the first byte is sent.

/// The linearizable revision the snapshot holds: every write acknowledged before the request
/// began is in it, and nothing with a higher revision is.
pub const REVISION_HEADER: &str = "x-raftkv-revision";
/// The snapshot format version (the byte after `RKVSNAP`).
pub const FORMAT_HEADER: &str = "x-raftkv-snapshot-format";
/// The id of the cluster the snapshot was taken from.
pub const CLUSTER_ID_HEADER: &str = "x-raftkv-cluster-id";
/// How many keys the snapshot holds.
pub const KEY_COUNT_HEADER: &str = "x-raftkv-key-count";
/// The media type of the body.
pub const CONTENT_TYPE: &str = "application/vnd.raftkv.snapshot";

/// What the headers of a `GET /v1/snapshot` answer say about its body.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SnapshotMeta {
    /// [`REVISION_HEADER`].
    pub revision: u64,
    /// [`FORMAT_HEADER`].
    pub format: u8,
    /// [`CLUSTER_ID_HEADER`].
    pub cluster_id: u64,
    /// [`KEY_COUNT_HEADER`].
    pub key_count: u64,
    /// `Content-Length`: the exact size of the body in bytes.
    pub size: u64,
}

impl SnapshotMeta {
    /// The header pairs (lower-case name, value) that describe this snapshot, `Content-Length`
    /// included.
    pub fn headers(&self) -> [(&'static str, String); 5] {
        [
            (REVISION_HEADER, self.revision.to_string()),
            (FORMAT_HEADER, self.format.to_string()),
            (CLUSTER_ID_HEADER, self.cluster_id.to_string()),
            (KEY_COUNT_HEADER, self.key_count.to_string()),
            ("content-length", self.size.to_string()),
        ]
    }

    /// Reads the headers through `get` (a lookup by lower-case name, whatever the HTTP client),
    /// naming the first one that is missing or malformed.
    pub fn from_headers<'a>(get: impl Fn(&str) -> Option<&'a str>) -> Result<Self, String> {
        fn field<'a, T: std::str::FromStr>(get: &impl Fn(&str) -> Option<&'a str>, name: &str) -> Result<T, String> {
            let raw = get(name).ok_or_else(|| format!("missing header {name}"))?;
            raw.trim()
                .parse()
                .map_err(|_| format!("header {name} is malformed: {raw:?}"))
        }
        Ok(SnapshotMeta {
            revision: field(&get, REVISION_HEADER)?,
            format: field(&get, FORMAT_HEADER)?,
            cluster_id: field(&get, CLUSTER_ID_HEADER)?,
            key_count: field(&get, KEY_COUNT_HEADER)?,
            size: field(&get, "content-length")?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshot_headers_read_back_what_was_written_and_name_what_is_missing() {
        let meta = SnapshotMeta {
            revision: 42,
            format: 1,
            cluster_id: 7,
            key_count: 3,
            size: 1234,
        };
        let headers = meta.headers();
        let get = |name: &str| headers.iter().find(|(n, _)| *n == name).map(|(_, v)| v.as_str());
        assert_eq!(SnapshotMeta::from_headers(get).unwrap(), meta);
        let without_revision = |name: &str| if name == REVISION_HEADER { None } else { get(name) };
        let err = SnapshotMeta::from_headers(without_revision).unwrap_err();
        assert!(err.contains(REVISION_HEADER), "{err}");
        let bad_format = |name: &str| if name == FORMAT_HEADER { Some("v1") } else { get(name) };
        assert!(SnapshotMeta::from_headers(bad_format)
            .unwrap_err()
            .contains("malformed"));
    }
}
