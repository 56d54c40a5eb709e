//! Property tests that feed hostile bytes to every decoder of outside input: WAL segments,
//! snapshot files, keys and preconditions from HTTP requests. Each must answer with a value or an
//! error, never panic. `cargo fuzz` needs a nightly toolchain; these bounded runs take its place
//! in the normal test run, and `PROPTEST_CASES=100000 cargo test -p raftkv-node --test decoders`
//! runs them longer.

// raft's protobuf messages are built field by field, as the node crate builds them.
#![allow(clippy::field_reassign_with_default)]

use std::io::Write;

use http::{HeaderMap, HeaderValue};
use proptest::prelude::*;
use raft::prelude::{Entry, HardState};
use raftkv_node::api::{parse_key, parse_precondition};
use raftkv_node::kv::KvState;
use raftkv_node::wal::{Wal, WalError, WalOptions};

/// A small valid log: its only segment's name and bytes.
fn valid_segment() -> (String, Vec<u8>) {
    let dir = tempfile::tempdir().unwrap();
    let (mut wal, _) = Wal::open(dir.path(), WalOptions::default()).unwrap();
    wal.append_snapshot_marker(1, 1).unwrap();
    let entries: Vec<Entry> = (2..6)
        .map(|i| {
            let mut e = Entry::default();
            e.index = i;
            e.term = 1;
            e.data = format!("value {i}").into_bytes().into();
            e
        })
        .collect();
    wal.append_entries(&entries).unwrap();
    let mut hs = HardState::default();
    hs.term = 1;
    hs.commit = 5;
    wal.append_hard_state(&hs).unwrap();
    wal.sync().unwrap();
    drop(wal);
    let path = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|x| x == "wal"))
        .unwrap();
    (
        path.file_name().unwrap().to_string_lossy().into_owned(),
        std::fs::read(&path).unwrap(),
    )
}

/// Opens a log whose only segment holds `bytes`; it must recover or refuse, not panic.
fn open_segment(name: &str, bytes: &[u8]) -> Result<(), WalError> {
    let dir = tempfile::tempdir().unwrap();
    let mut f = std::fs::File::create(dir.path().join(name)).unwrap();
    f.write_all(bytes).unwrap();
    drop(f);
    Wal::open(dir.path(), WalOptions::default()).map(|_| ())
}

fn valid_snapshot() -> Vec<u8> {
    let mut state = KvState {
        applied_index: 9,
        applied_term: 2,
        cluster_id: 7,
        ..Default::default()
    };
    for i in 0..5u64 {
        let data = raftkv_node::command::encode(&raftkv_node::command::Proposal {
            request_id: i,
            op: raftkv_node::command::Op::Put {
                key: format!("k{i}").into_bytes().into(),
                value: vec![i as u8; 10].into(),
                precondition: raftkv_node::command::Precondition::None,
            },
        });
        state.apply_proposal(3 + i, 2, &data);
    }
    state.write_snapshot(Vec::new()).unwrap()
}

proptest! {
    #[test]
    fn wal_recovery_of_arbitrary_segment_bytes_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..4096)) {
        let (name, _) = valid_segment();
        let _ = open_segment(&name, &bytes);
    }

    #[test]
    fn wal_recovery_of_a_damaged_valid_segment_never_panics(
        flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8),
        cut in any::<prop::sample::Index>(),
    ) {
        let (name, mut bytes) = valid_segment();
        for (at, byte) in flips {
            let i = at.index(bytes.len());
            bytes[i] ^= byte.max(1);
        }
        let len = cut.index(bytes.len() + 1);
        match open_segment(&name, &bytes[..len]) {
            Ok(()) | Err(WalError::Corrupt { .. }) => {}
            Err(other) => prop_assert!(false, "unexpected error kind: {other}"),
        }
    }

    #[test]
    fn snapshot_decoding_of_arbitrary_or_damaged_bytes_never_panics(
        noise in proptest::collection::vec(any::<u8>(), 0..2048),
        flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..6),
        cut in any::<prop::sample::Index>(),
    ) {
        let _ = KvState::read_snapshot(&noise[..]);
        let _ = KvState::verify_snapshot(&noise[..]);
        let mut bytes = valid_snapshot();
        for (at, byte) in &flips {
            let i = at.index(bytes.len());
            bytes[i] ^= byte.max(&1);
        }
        let len = cut.index(bytes.len() + 1);
        let decoded = KvState::read_snapshot(&bytes[..len]);
        // A damaged snapshot must be refused: the checksum covers every byte.
        if !flips.is_empty() || len < bytes.len() {
            prop_assert!(decoded.is_err() || len == bytes.len(), "a damaged snapshot decoded");
        }
    }

    #[test]
    fn keys_from_arbitrary_paths_parse_or_are_refused(path in "/v1/kv/[\\x00-\\x7f%a-fA-F0-9\u{80}-\u{10ffff}]{0,64}") {
        if let Ok(key) = parse_key(&path) {
            prop_assert!(!key.is_empty() && key.len() <= raftkv_node::api::MAX_KEY_LEN);
        }
    }

    #[test]
    fn preconditions_from_arbitrary_header_bytes_parse_or_are_refused(
        if_match in proptest::option::of(proptest::collection::vec(any::<u8>(), 0..24)),
        if_none in proptest::option::of(proptest::collection::vec(any::<u8>(), 0..24)),
    ) {
        let mut headers = HeaderMap::new();
        if let Some(v) = if_match.and_then(|v| HeaderValue::from_bytes(&v).ok()) {
            headers.insert(http::header::IF_MATCH, v);
        }
        if let Some(v) = if_none.and_then(|v| HeaderValue::from_bytes(&v).ok()) {
            headers.insert(http::header::IF_NONE_MATCH, v);
        }
        let _ = parse_precondition(&headers);
    }
}

#[test]
fn the_fixtures_themselves_decode() {
    let (name, bytes) = valid_segment();
    open_segment(&name, &bytes).unwrap();
    let state = KvState::read_snapshot(&valid_snapshot()[..]).unwrap();
    assert_eq!(state.data.len(), 5);
}
