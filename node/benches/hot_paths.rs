//! Micro-benchmarks of the node's hot paths: WAL group commit (one fsync per entry against one
//! per 64 entries), applying a proposal to the key-value state, and parsing a request's key and
//! preconditions. The WAL is written under the target directory, on the same disk as a data
//! directory would be, not on a tmpfs.

use std::hint::black_box;

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use http::{header, HeaderMap, HeaderValue};
use raft::prelude::Entry;
use raftkv_node::api::{parse_key, parse_precondition};
use raftkv_node::command::{self, Op, Precondition, Proposal};
use raftkv_node::kv::KvState;
use raftkv_node::wal::{Wal, WalOptions};

fn entry(index: u64, data: &[u8]) -> Entry {
    Entry {
        index,
        term: 1,
        data: Bytes::copy_from_slice(data),
        ..Default::default()
    }
}

fn proposal(key: u64, value: &Bytes) -> Vec<u8> {
    command::encode(&Proposal {
        request_id: key,
        op: Op::Put {
            key: Bytes::from(format!("bench/{key:08}")),
            value: value.clone(),
            precondition: Precondition::None,
        },
    })
}

fn wal_group_commit(c: &mut Criterion) {
    let value = Bytes::from(vec![b'v'; 256]);
    let data = proposal(1, &value);
    let mut group = c.benchmark_group("wal_append_sync");
    group.sample_size(20);
    for batch in [1u64, 64] {
        let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).expect("temporary directory");
        let (mut wal, _) = Wal::open(dir.path(), WalOptions::default()).expect("open WAL");
        let mut next = 1;
        group.throughput(Throughput::Elements(batch));
        group.bench_function(format!("{batch}_entries_per_fsync"), |b| {
            b.iter(|| {
                let entries: Vec<Entry> = (0..batch).map(|i| entry(next + i, &data)).collect();
                next += batch;
                wal.append_entries(&entries).expect("append");
                wal.sync().expect("fsync")
            })
        });
    }
    group.finish();
}

fn state_machine_apply(c: &mut Criterion) {
    let value = Bytes::from(vec![b'v'; 256]);
    let encoded: Vec<Vec<u8>> = (0..100_000).map(|k| proposal(k, &value)).collect();
    let mut group = c.benchmark_group("kv_apply_proposal");
    group.throughput(Throughput::Elements(1));
    group.bench_function("put_256b_into_100k_keys", |b| {
        let mut state = KvState::default();
        let mut index = 1;
        b.iter(|| {
            let data = &encoded[(index as usize) % encoded.len()];
            index += 1;
            black_box(state.apply_proposal(index, 1, data))
        })
    });
    group.bench_function("put_batch_of_64_fresh_state", |b| {
        b.iter_batched(
            KvState::default,
            |mut state| {
                for (i, data) in encoded[..64].iter().enumerate() {
                    black_box(state.apply_proposal(i as u64 + 1, 1, data));
                }
                state
            },
            BatchSize::SmallInput,
        )
    });
    group.finish();
}

fn request_parsing(c: &mut Criterion) {
    let mut group = c.benchmark_group("api_parse");
    group.bench_function("parse_key_plain", |b| {
        b.iter(|| parse_key(black_box("/v1/kv/bench/00012345")).ok())
    });
    group.bench_function("parse_key_percent_encoded", |b| {
        b.iter(|| parse_key(black_box("/v1/kv/users%2F42%2Fprofile%20picture")).ok())
    });
    let mut none = HeaderMap::new();
    none.insert(header::CONTENT_LENGTH, HeaderValue::from_static("256"));
    let mut if_match = none.clone();
    if_match.insert(header::IF_MATCH, HeaderValue::from_static("\"1234567\""));
    group.bench_function("parse_precondition_none", |b| {
        b.iter(|| parse_precondition(black_box(&none)).ok())
    });
    group.bench_function("parse_precondition_if_match", |b| {
        b.iter(|| parse_precondition(black_box(&if_match)).ok())
    });
    group.finish();
}

criterion_group!(benches, wal_group_commit, state_machine_apply, request_parsing);
criterion_main!(benches);
