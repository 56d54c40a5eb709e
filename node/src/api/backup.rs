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
use raftkv_api::snapshot::{SnapshotMeta, CONTENT_TYPE};
use tokio::sync::{mpsc, OwnedSemaphorePermit};
use tokio_stream::wrappers::ReceiverStream;

use super::error::{ApiError, ApiResult};
use super::ApiState;
use crate::kv::{KvState, SNAPSHOT_FORMAT_VERSION};

/// Snapshot streams one member serves at once. Each pins the map version it copies, so the
/// memory of every key overwritten meanwhile stays alive until it ends.
pub(crate) const MAX_SNAPSHOT_STREAMS: usize = 2;
/// Bytes of encoded snapshot handed to the HTTP body at a time.
const CHUNK_BYTES: usize = 256 << 10;
/// Chunks queued between the encoder and the client before the encoder waits.
const CHANNEL_CHUNKS: usize = 8;

/// `GET /v1/snapshot`.
pub(super) async fn snapshot(State(s): State<ApiState>) -> ApiResult<Response> {
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
    tokio::task::spawn_blocking(move || stream_snapshot(state, size, tx, permit));
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
/// which ends the encoding at its next chunk. A failure mid-way is sent as an error, which aborts
/// the response: the client gets fewer bytes than `Content-Length`, never a body that looks whole.
fn stream_snapshot(
    state: KvState,
    size: u64,
    tx: mpsc::Sender<Result<Bytes, std::io::Error>>,
    permit: OwnedSemaphorePermit,
) {
    let started = std::time::Instant::now();
    let revision = state.applied_index;
    let writer = ChannelWriter {
        tx: tx.clone(),
        buf: BytesMut::with_capacity(CHUNK_BYTES),
        sent: 0,
    };
    let result = state.write_snapshot(writer).and_then(|mut w| {
        w.flush()?;
        Ok(w.sent)
    });
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
            let _ = tx.blocking_send(Err(std::io::Error::other("snapshot size differs from Content-Length")));
        }
        Err(error) if error.kind() == std::io::ErrorKind::BrokenPipe => {
            tracing::warn!(revision, "snapshot client went away before the end");
        }
        Err(error) => {
            tracing::error!(revision, %error, "snapshot stream failed");
            let _ = tx.blocking_send(Err(error));
        }
    }
    drop(permit);
}

/// A `Write` that hands the body fixed-size chunks through a bounded channel, waiting while the
/// channel is full: the encoder runs at the client's pace.
struct ChannelWriter {
    tx: mpsc::Sender<Result<Bytes, std::io::Error>>,
    buf: BytesMut,
    sent: u64,
}

impl ChannelWriter {
    fn send_buffered(&mut self) -> std::io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let chunk = self.buf.split().freeze();
        self.sent += chunk.len() as u64;
        self.buf.reserve(CHUNK_BYTES);
        self.tx
            .blocking_send(Ok(chunk))
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::BrokenPipe, "the snapshot client went away"))
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
