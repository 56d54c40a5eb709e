//! `GET /v1/snapshot`: a consistent backup of the state machine, streamed in the node's snapshot
//! file format (what `raftkv-node restore` reads).
//!
//! The snapshot is taken at a linearizable revision: a read barrier first (ReadIndex, as a
//! linearizable `GET` does), then an O(1) clone of the persistent map, which is at or past the
//! barrier. The clone is encoded on a blocking thread while apply goes on, so a backup never
//! stalls writes; the bytes reach the client through a bounded channel, so a slow client holds
//! at most [`CHANNEL_CHUNKS`] × [`CHUNK_BYTES`] of encoded snapshot in memory, never the whole of
//! it. Any member serves it, followers included, from its own applied state.

use std::io::Write;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::State;
use axum::http::{header, HeaderName, HeaderValue, StatusCode};
use axum::response::Response;
use bytes::{Bytes, BytesMut};
use raftkv_api::codes;
use raftkv_api::snapshot::{SnapshotMeta, SnapshotQuery, CONTENT_TYPE, MIN_BYTES_PER_SEC};
use tokio::sync::mpsc::error::SendTimeoutError;
use tokio::sync::{mpsc, OwnedSemaphorePermit};
use tokio_stream::wrappers::ReceiverStream;

use super::error::{ApiError, ApiResult};
use super::request::ClientQuery;
use super::ApiState;
use crate::kv::{KvState, SNAPSHOT_FORMAT_VERSION};
use crate::metrics::{BackupLabels, Metrics};

/// Snapshot streams one member serves at once. Each pins the map version it copies, so the
/// memory of every key overwritten meanwhile stays alive until it ends.
pub(crate) const MAX_SNAPSHOT_STREAMS: usize = 2;
/// Bytes of encoded snapshot handed to the HTTP body at a time.
const CHUNK_BYTES: usize = 256 << 10;
/// Chunks queued between the encoder and the client before the encoder waits.
const CHANNEL_CHUNKS: usize = 8;
/// A client that takes no chunk for this long is given up on: its stream would otherwise hold
/// one of the [`MAX_SNAPSHOT_STREAMS`] slots, and the map version it copies, for ever.
const STALL_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

/// `GET /v1/snapshot[?max_bytes_per_sec=N]`.
pub(super) async fn snapshot(
    State(s): State<ApiState>,
    ClientQuery(query): ClientQuery<SnapshotQuery>,
) -> ApiResult<Response> {
    if let Some(rate) = query.max_bytes_per_sec.filter(|r| *r < MIN_BYTES_PER_SEC) {
        return Err(ApiError::bad_request(
            codes::INVALID_QUERY,
            format!("max_bytes_per_sec is {rate}; the smallest accepted is {MIN_BYTES_PER_SEC}"),
        ));
    }
    let permit = s.snapshot_streams.clone().try_acquire_owned().map_err(|_| {
        ApiError::unavailable(
            codes::SNAPSHOT_BUSY,
            format!("this member already streams {MAX_SNAPSHOT_STREAMS} snapshots; retry when one ends"),
        )
    })?;
    s.ensure_member()?;
    // Linearizable: everything acknowledged before this request began is applied here before
    // the state is cloned, so the clone holds it.
    s.read_barrier().await?;
    let state = s.shared.state.read().clone();
    let (state, size) = tokio::task::spawn_blocking(move || {
        let size = state.snapshot_size();
        (state, size)
    })
    .await
    .map_err(|e| {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            codes::INTERNAL,
            format!("sizing the snapshot: {e}"),
        )
    })?;
    let meta = SnapshotMeta {
        revision: state.applied_index,
        format: SNAPSHOT_FORMAT_VERSION,
        cluster_id: state.cluster_id,
        key_count: state.data.len() as u64,
        size,
    };
    tracing::info!(
        revision = meta.revision,
        keys = meta.key_count,
        bytes = meta.size,
        "streaming a snapshot"
    );
    let (tx, rx) = mpsc::channel(CHANNEL_CHUNKS);
    let pace = query.max_bytes_per_sec;
    let metrics = s.metrics.clone();
    tokio::task::spawn_blocking(move || stream_snapshot(state, size, pace, tx, permit, &metrics));
    let mut resp = Response::new(Body::from_stream(ReceiverStream::new(rx)));
    *resp.status_mut() = StatusCode::OK;
    let headers = resp.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(CONTENT_TYPE));
    for (name, value) in meta.headers() {
        headers.insert(
            HeaderName::from_static(name),
            HeaderValue::from_str(&value).expect("decimal digits are a valid header value"),
        );
    }
    Ok(resp)
}

/// Encodes `state` into `tx` on a blocking thread. A client that goes away closes the channel,
/// which ends the encoding at its next chunk. A failure mid-way aborts the response (an error
/// queued when there is room; the sender dropped in any case, which ends the body early): the
/// client gets fewer bytes than `Content-Length`, never a body that looks whole.
fn stream_snapshot(
    state: KvState,
    size: u64,
    pace: Option<u64>,
    tx: mpsc::Sender<Result<Bytes, std::io::Error>>,
    permit: OwnedSemaphorePermit,
    metrics: &Metrics,
) {
    let started = std::time::Instant::now();
    let revision = state.applied_index;
    let writer = ChannelWriter {
        tx: tx.clone(),
        buf: BytesMut::with_capacity(CHUNK_BYTES),
        sent: 0,
        pace,
        started,
        stall_timeout: STALL_TIMEOUT,
        runtime: tokio::runtime::Handle::current(),
        bytes: metrics.backup_bytes.clone(),
    };
    let result = state.write_snapshot(writer).and_then(|mut w| {
        w.flush()?;
        Ok(w.sent)
    });
    let outcome = match &result {
        Ok(sent) if *sent == size => "complete",
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => "client_gone",
        Err(e) if e.kind() == std::io::ErrorKind::TimedOut => "stalled",
        _ => "failed",
    };
    metrics.backups.get_or_create(&BackupLabels { outcome }).inc();
    match result {
        Ok(sent) if sent == size => {
            let secs = started.elapsed().as_secs_f64();
            tracing::info!(
                revision,
                bytes = sent,
                elapsed_ms = (secs * 1000.0) as u64,
                mb_per_s = (sent as f64 / 1e6 / secs.max(1e-9)) as u64,
                "snapshot streamed"
            );
        }
        Ok(sent) => {
            // Content-Length promised `size`: never let a body of another length look complete.
            tracing::error!(
                revision,
                sent,
                size,
                "snapshot encoding differs from its announced size"
            );
            let _ = tx.try_send(Err(std::io::Error::other("snapshot size differs from Content-Length")));
        }
        Err(error) if error.kind() == std::io::ErrorKind::BrokenPipe => {
            tracing::warn!(revision, "snapshot client went away before the end");
        }
        Err(error) if error.kind() == std::io::ErrorKind::TimedOut => {
            // Dropping the sender ends the body short of its Content-Length: the client, should
            // it read again, sees a truncated stream.
            tracing::warn!(revision, %error, "snapshot client stalled; stream abandoned");
        }
        Err(error) => {
            tracing::error!(revision, %error, "snapshot stream failed");
            let _ = tx.try_send(Err(error));
        }
    }
    drop(permit);
}

/// A `Write` that hands the body fixed-size chunks through a bounded channel, waiting while the
/// channel is full: the encoder runs at the client's pace, or slower when paced.
struct ChannelWriter {
    tx: mpsc::Sender<Result<Bytes, std::io::Error>>,
    buf: BytesMut,
    /// Bytes handed to the body so far.
    sent: u64,
    /// At most this many bytes per second, when set.
    pace: Option<u64>,
    /// When the stream began, for pacing.
    started: std::time::Instant,
    /// How long a chunk may wait for the client to take it.
    stall_timeout: std::time::Duration,
    /// The runtime the channel belongs to, to wait on it with a timeout from this blocking thread.
    runtime: tokio::runtime::Handle,
    /// Counts the bytes handed over, for `/metrics`.
    bytes: prometheus_client::metrics::counter::Counter,
}

impl ChannelWriter {
    fn send_buffered(&mut self) -> std::io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        // Fault tests: an encoding that fails mid-stream, with the member still running.
        fail::fail_point!("backup::send_chunk", |_| Err(std::io::Error::other(
            "injected failure (fail point backup::send_chunk)"
        )));
        let chunk = self.buf.split().freeze();
        let len = chunk.len() as u64;
        self.sent += len;
        self.buf.reserve(CHUNK_BYTES);
        let sent = self
            .runtime
            .block_on(self.tx.send_timeout(Ok(chunk), self.stall_timeout));
        match sent {
            Ok(()) => {
                self.bytes.inc_by(len);
            }
            Err(SendTimeoutError::Closed(_)) => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::BrokenPipe,
                    "the snapshot client went away",
                ))
            }
            Err(SendTimeoutError::Timeout(_)) => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("the client took nothing for {:?}", self.stall_timeout),
                ))
            }
        }
        if let Some(rate) = self.pace {
            // A blocking-pool thread, so sleeping here holds up no async task.
            let due = std::time::Duration::from_secs_f64(self.sent as f64 / rate as f64);
            if let Some(ahead) = due.checked_sub(self.started.elapsed()) {
                std::thread::sleep(ahead);
            }
        }
        Ok(())
    }
}

impl Write for ChannelWriter {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        self.buf.extend_from_slice(data);
        if self.buf.len() >= CHUNK_BYTES {
            self.send_buffered()?;
        }
        Ok(data.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.send_buffered()
    }
}

/// The semaphore bounding concurrent snapshot streams.
pub(crate) fn stream_limit() -> Arc<tokio::sync::Semaphore> {
    Arc::new(tokio::sync::Semaphore::new(MAX_SNAPSHOT_STREAMS))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn writer(tx: mpsc::Sender<Result<Bytes, std::io::Error>>, stall_timeout: std::time::Duration) -> ChannelWriter {
        ChannelWriter {
            tx,
            buf: BytesMut::new(),
            sent: 0,
            pace: None,
            started: std::time::Instant::now(),
            stall_timeout,
            runtime: tokio::runtime::Handle::current(),
            bytes: Default::default(),
        }
    }

    #[tokio::test]
    async fn a_client_that_stops_reading_is_given_up_on_and_one_that_leaves_ends_the_encoding() {
        let (tx, rx) = mpsc::channel(1);
        let mut w = writer(tx, std::time::Duration::from_millis(100));
        let stalled = tokio::task::spawn_blocking(move || {
            let chunk = vec![0u8; CHUNK_BYTES];
            (0..4).map(|_| w.write_all(&chunk)).find_map(Result::err)
        })
        .await
        .unwrap();
        assert_eq!(stalled.map(|e| e.kind()), Some(std::io::ErrorKind::TimedOut));
        drop(rx);

        let (tx, rx) = mpsc::channel(1);
        drop(rx);
        let mut w = writer(tx, STALL_TIMEOUT);
        let gone = tokio::task::spawn_blocking(move || w.write_all(&vec![0u8; CHUNK_BYTES]))
            .await
            .unwrap();
        assert_eq!(gone.map_err(|e| e.kind()), Err(std::io::ErrorKind::BrokenPipe));
    }

    #[tokio::test]
    async fn the_writer_hands_over_every_byte_in_order() {
        let (tx, mut rx) = mpsc::channel(CHANNEL_CHUNKS);
        let mut w = writer(tx, STALL_TIMEOUT);
        let data: Vec<u8> = (0..3 * CHUNK_BYTES + 17).map(|i| (i % 251) as u8).collect();
        let expected = data.clone();
        let reader = tokio::spawn(async move {
            let mut got = Vec::new();
            while let Some(chunk) = rx.recv().await {
                got.extend_from_slice(&chunk.unwrap());
            }
            got
        });
        let sent = tokio::task::spawn_blocking(move || {
            for piece in data.chunks(1000) {
                w.write_all(piece).unwrap();
            }
            w.flush().unwrap();
            w.sent
        })
        .await
        .unwrap();
        assert_eq!(sent, expected.len() as u64);
        assert_eq!(reader.await.unwrap(), expected);
    }
}
