//! The peer transport: Raft messages between members over HTTP/1.1 on the peer port (over
//! mutual TLS when peer TLS is on, see [`crate::tls::PeerClient`]).
//!
//! Each peer has one sender task holding one long-lived `POST /raft/stream` request whose body is
//! an endless sequence of frames (`u32 LE length | protobuf Message`). Whatever queued up while the
//! previous chunk was written goes out as the next chunk, so messages batch under load. The
//! consensus thread hands messages over with `try_send`: a slow or dead peer fills its queue and
//! loses messages (Raft retransmits) but never blocks consensus.
//!
//! Snapshots travel separately (`POST /raft/snapshot`): the message frame, then the snapshot file
//! streamed from disk, so the receiver writes it to disk as it arrives and neither side holds it
//! in memory. Every request carries the sender's cluster id; a member of another cluster is refused.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use bytes::{Buf, BufMut, Bytes, BytesMut};
use futures::StreamExt;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use protobuf::Message as _;
use raft::prelude::{Message, MessageType};
use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::io::ReaderStream;
use tokio_util::sync::CancellationToken;

use raftkv_api::codes;

use crate::api::error::json_error;
use crate::inbox::RaftInput;
use crate::kv::KvState;
use crate::snapshot::SnapshotStore;
use crate::tls::PeerClient;

/// Header carrying the sender's cluster id.
pub const CLUSTER_ID_HEADER: &str = "x-raftkv-cluster-id";
/// Header carrying the sender's member id.
pub const FROM_HEADER: &str = "x-raftkv-from";
/// Header carrying the sender's advertised peer URL, so a member that has not yet received the
/// membership (a new learner) can answer the leader.
pub const PEER_URL_HEADER: &str = "x-raftkv-peer-url";
/// Messages queued per peer before new ones are dropped.
const PEER_QUEUE: usize = 8192;
/// Largest frame accepted; a bigger length is a protocol error, not a message.
const MAX_FRAME: usize = 64 << 20;
/// Bytes gathered into one body chunk at most.
const MAX_CHUNK: usize = 4 << 20;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
const MAX_BACKOFF: Duration = Duration::from_secs(1);

/// What both sides of the transport share.
#[derive(Clone)]
pub struct TransportContext {
    /// This member.
    pub self_id: u64,
    /// This member's cluster; 0 while uninitialised.
    pub cluster_id: Arc<AtomicU64>,
    /// The consensus inbox.
    pub inbox: flume::Sender<RaftInput>,
    /// Where snapshots are read from and received into.
    pub snapshots: SnapshotStore,
    /// Cancelled on shutdown.
    pub shutdown: CancellationToken,
    /// This member's advertised peer URL, sent with every stream.
    pub advertise_url: Option<String>,
    /// Members removed from the cluster: their messages are answered `410 member_removed` so a
    /// removed member that missed its own removal learns of it.
    pub removed: Arc<parking_lot::RwLock<std::collections::BTreeSet<u64>>>,
    /// Opens connections to peers: mutual TLS with the peer certificate when peer TLS is on.
    pub peer_client: PeerClient,
}

struct Peer {
    url: String,
    queue: mpsc::Sender<Message>,
    cancel: CancellationToken,
}

/// The send side, owned by the consensus thread.
pub struct Transport {
    ctx: TransportContext,
    runtime: tokio::runtime::Handle,
    peers: HashMap<u64, Peer>,
    /// Peers whose snapshot message was dropped here (full queue): Raft keeps a peer in its
    /// snapshot state until told how the send ended, so the consensus thread reports these.
    failed_snapshots: Vec<u64>,
}

impl Transport {
    /// A transport with no peers yet.
    pub fn new(ctx: TransportContext, runtime: tokio::runtime::Handle) -> Self {
        Transport {
            ctx,
            runtime,
            peers: HashMap::new(),
            failed_snapshots: Vec::new(),
        }
    }

    /// Adds a peer, or moves it to a new URL.
    pub fn set_peer(&mut self, id: u64, url: &str) {
        if self.peers.get(&id).is_some_and(|p| p.url == url) {
            return;
        }
        self.remove_peer(id);
        let (tx, rx) = mpsc::channel(PEER_QUEUE);
        let cancel = self.ctx.shutdown.child_token();
        let sender = PeerSender {
            id,
            url: url.trim_end_matches('/').to_string(),
            ctx: self.ctx.clone(),
            cancel: cancel.clone(),
        };
        self.runtime.spawn(sender.run(rx));
        self.peers.insert(
            id,
            Peer {
                url: url.to_string(),
                queue: tx,
                cancel,
            },
        );
    }

    /// Stops sending to a peer.
    pub fn remove_peer(&mut self, id: u64) {
        if let Some(peer) = self.peers.remove(&id) {
            peer.cancel.cancel();
        }
    }

    /// Queues messages without blocking; a full queue drops the message and tells Raft the peer
    /// is unreachable so it stops pipelining to it.
    pub fn send(&mut self, msgs: Vec<Message>) {
        for msg in msgs {
            let to = msg.to;
            let Some(peer) = self.peers.get(&to) else {
                tracing::debug!(to, "message to a peer with no known URL dropped");
                continue;
            };
            if let Err(e) = peer.queue.try_send(msg) {
                let msg = match e {
                    mpsc::error::TrySendError::Full(m) | mpsc::error::TrySendError::Closed(m) => m,
                };
                if msg.get_msg_type() == MessageType::MsgSnapshot {
                    self.failed_snapshots.push(to);
                }
                let _ = self.ctx.inbox.try_send(RaftInput::Unreachable(to));
            }
        }
    }

    /// Peers whose snapshot message was dropped before it left, since the last call.
    pub fn take_failed_snapshots(&mut self) -> Vec<u64> {
        std::mem::take(&mut self.failed_snapshots)
    }

    /// The removed-member set the receiving side checks.
    pub fn removed_ids(&self) -> &parking_lot::RwLock<std::collections::BTreeSet<u64>> {
        &self.ctx.removed
    }

    /// Stops every sender.
    pub fn close(&mut self) {
        for (_, peer) in self.peers.drain() {
            peer.cancel.cancel();
        }
    }
}

struct PeerSender {
    id: u64,
    url: String,
    ctx: TransportContext,
    cancel: CancellationToken,
}

impl PeerSender {
    async fn run(self, mut rx: mpsc::Receiver<Message>) {
        let mut backoff = Duration::from_millis(50);
        loop {
            let first = tokio::select! {
                m = rx.recv() => match m { Some(m) => m, None => return },
                _ = self.cancel.cancelled() => return self.drop_queued(&mut rx).await,
            };
            // A snapshot travels on its own connection and reports its own outcome; it must not
            // be lost with a stream that fails to connect.
            if first.get_msg_type() == MessageType::MsgSnapshot {
                tokio::spawn(send_snapshot(self.url.clone(), self.id, first, self.ctx.clone()));
                continue;
            }
            match self.stream(first, &mut rx).await {
                Ok(()) => return self.drop_queued(&mut rx).await,
                Err(e) => {
                    tracing::debug!(peer = self.id, url = %self.url, error = %e, "peer stream broken");
                    let _ = self.ctx.inbox.try_send(RaftInput::Unreachable(self.id));
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        _ = self.cancel.cancelled() => return self.drop_queued(&mut rx).await,
                    }
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                    // What queued up while the peer was away is stale; Raft resends what matters.
                    self.drop_queued(&mut rx).await;
                }
            }
        }
    }

    /// Drops every queued message. Raft resends appends and heartbeats by itself, but keeps a
    /// peer in its snapshot state until the snapshot's outcome is reported: report each dropped
    /// snapshot as failed so the leader sends a new one.
    async fn drop_queued(&self, rx: &mut mpsc::Receiver<Message>) {
        while let Ok(m) = rx.try_recv() {
            if m.get_msg_type() == MessageType::MsgSnapshot {
                let _ = self
                    .ctx
                    .inbox
                    .send_async(RaftInput::SnapshotSent { to: self.id, ok: false })
                    .await;
            }
        }
    }

    /// Streams messages over one request until it breaks (Err) or the peer is removed (Ok).
    async fn stream(&self, first: Message, rx: &mut mpsc::Receiver<Message>) -> Result<(), String> {
        let mut sender = self.ctx.peer_client.connect::<PeerBody>(&self.url).await?;
        let (body_tx, body_rx) = mpsc::channel::<Result<Frame<Bytes>, std::io::Error>>(4);
        let body = BoxBody::new(StreamBody::new(ReceiverStream::new(body_rx)));
        let req = hyper::Request::post(format!("{}/raft/stream", self.url))
            .header(CLUSTER_ID_HEADER, self.ctx.cluster_id.load(Ordering::Relaxed))
            .header(FROM_HEADER, self.ctx.self_id)
            .header(PEER_URL_HEADER, self.ctx.advertise_url.as_deref().unwrap_or(""))
            .body(body)
            .map_err(|e| e.to_string())?;
        let response = sender.send_request(req);
        tokio::pin!(response);
        let mut next = Some(first);
        loop {
            let mut chunk = BytesMut::new();
            while let Some(msg) = next.take().or_else(|| rx.try_recv().ok()) {
                if msg.get_msg_type() == MessageType::MsgSnapshot {
                    tokio::spawn(send_snapshot(self.url.clone(), self.id, msg, self.ctx.clone()));
                } else {
                    encode_frame(&msg, &mut chunk);
                }
                if chunk.len() >= MAX_CHUNK {
                    break;
                }
            }
            // The peer's answer is checked first and also after a failed write: a peer that
            // refuses this member (410 member_removed) answers and closes, and that answer is
            // how a removed member learns of its removal.
            if !chunk.is_empty() {
                let sent = tokio::select! {
                    biased;
                    r = &mut response => return Err(self.response_error(r)),
                    r = body_tx.send(Ok(Frame::data(chunk.freeze()))) => r,
                };
                if sent.is_err() {
                    return match tokio::time::timeout(CONNECT_TIMEOUT, &mut response).await {
                        Ok(r) => Err(self.response_error(r)),
                        Err(_) => Err("stream body closed".to_string()),
                    };
                }
            }
            tokio::select! {
                biased;
                r = &mut response => return Err(self.response_error(r)),
                _ = self.cancel.cancelled() => return Ok(()),
                m = rx.recv() => match m { Some(m) => next = Some(m), None => return Ok(()) },
            }
        }
    }
}

impl PeerSender {
    fn response_error(&self, r: Result<hyper::Response<hyper::body::Incoming>, hyper::Error>) -> String {
        match r {
            Ok(resp) => {
                if resp.status() == StatusCode::GONE {
                    let _ = self.ctx.inbox.try_send(RaftInput::RemovedByPeer { peer: self.id });
                }
                format!("peer ended the stream with {}", resp.status())
            }
            Err(e) => format!("stream failed: {e}"),
        }
    }
}

type PeerBody = BoxBody<Bytes, std::io::Error>;

fn encode_frame(msg: &Message, out: &mut BytesMut) {
    let len = msg.compute_size() as usize;
    out.reserve(4 + len);
    out.put_u32_le(len as u32);
    let mut w = out.writer();
    // Encoding into memory cannot fail.
    msg.write_to_writer(&mut w).expect("encode raft message");
}

async fn send_snapshot(url: String, to: u64, msg: Message, ctx: TransportContext) {
    let meta = msg.get_snapshot().get_metadata();
    let (index, term) = (meta.index, meta.term);
    let started = std::time::Instant::now();
    let ok = match send_snapshot_inner(&url, &msg, &ctx).await {
        Ok(bytes) => {
            tracing::info!(
                to,
                index,
                term,
                bytes,
                elapsed_ms = started.elapsed().as_millis() as u64,
                "snapshot sent"
            );
            true
        }
        Err(e) => {
            tracing::warn!(to, index, term, error = %e, "snapshot send failed");
            false
        }
    };
    let _ = ctx.inbox.send_async(RaftInput::SnapshotSent { to, ok }).await;
}

async fn send_snapshot_inner(url: &str, msg: &Message, ctx: &TransportContext) -> Result<u64, String> {
    let meta = msg.get_snapshot().get_metadata();
    let path = ctx.snapshots.path(meta.index, meta.term);
    let file = tokio::fs::File::open(&path)
        .await
        .map_err(|e| format!("open {}: {e}", path.display()))?;
    let len = file.metadata().await.map_err(|e| e.to_string())?.len();
    let mut head = BytesMut::new();
    encode_frame(msg, &mut head);
    // The file is streamed from disk in chunks: a large snapshot is never held in memory.
    let body = futures::stream::once(futures::future::ready(Ok(head.freeze())))
        .chain(ReaderStream::with_capacity(file, 256 << 10))
        .map(|chunk| chunk.map(Frame::data));
    let req = hyper::Request::post(format!("{url}/raft/snapshot"))
        .header(CLUSTER_ID_HEADER, ctx.cluster_id.load(Ordering::Relaxed))
        .header(FROM_HEADER, ctx.self_id)
        .body(BoxBody::new(StreamBody::new(body)))
        .map_err(|e| e.to_string())?;
    let mut sender = ctx.peer_client.connect::<PeerBody>(url).await?;
    let resp = sender
        .send_request(req)
        .await
        .map_err(|e| format!("sending snapshot: {e}"))?;
    if !resp.status().is_success() {
        let status = resp.status();
        let body = resp
            .into_body()
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        return Err(format!("peer answered {status}: {}", String::from_utf8_lossy(&body)));
    }
    Ok(len)
}

/// Decodes complete frames from the front of `buf`.
fn decode_frames(buf: &mut BytesMut) -> Result<Vec<Message>, String> {
    let mut out = Vec::new();
    while buf.len() >= 4 {
        let len = u32::from_le_bytes(buf[..4].try_into().expect("4 bytes")) as usize;
        if len > MAX_FRAME {
            return Err(format!("frame of {len} bytes exceeds {MAX_FRAME}"));
        }
        if buf.len() < 4 + len {
            break;
        }
        buf.advance(4);
        let frame = buf.split_to(len);
        out.push(Message::parse_from_bytes(&frame).map_err(|e| format!("bad message: {e}"))?);
    }
    Ok(out)
}

fn check_cluster(ctx: &TransportContext, headers: &HeaderMap) -> Result<(), Box<Response>> {
    let from: u64 = headers
        .get(FROM_HEADER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    if ctx.removed.read().contains(&from) {
        return Err(Box::new(json_error(
            StatusCode::GONE,
            codes::MEMBER_REMOVED,
            format!("member {from} was removed from this cluster"),
        )));
    }
    let theirs: u64 = headers
        .get(CLUSTER_ID_HEADER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let ours = ctx.cluster_id.load(Ordering::Relaxed);
    if ours == 0 && theirs != 0 {
        // An uninitialised member joins the first cluster whose leader contacts it.
        let _ = ctx
            .cluster_id
            .compare_exchange(0, theirs, Ordering::Relaxed, Ordering::Relaxed);
        return Ok(());
    }
    if theirs != 0 && ours != 0 && theirs != ours {
        let from = headers.get(FROM_HEADER).and_then(|v| v.to_str().ok()).unwrap_or("?");
        tracing::warn!(from, theirs, ours, "refused a peer of another cluster");
        return Err(Box::new(json_error(
            StatusCode::FORBIDDEN,
            codes::CLUSTER_ID_MISMATCH,
            format!("this member belongs to cluster {ours}, the peer to cluster {theirs}"),
        )));
    }
    Ok(())
}

/// How long a refused request's body is still read, so that its refusal reaches the sender.
const REFUSAL_DRAIN: Duration = Duration::from_secs(5);

/// Answers a peer request with `refusal` while its body is still arriving. The rest of the body
/// is read and discarded (for a few seconds at most) rather than left unread: a connection
/// closed with unread data is reset, and the reset can destroy the refusal before the sender
/// reads it. A removed member learns of its removal from exactly such a refusal.
fn refuse(
    body: impl futures::Stream<Item = Result<Bytes, axum::Error>> + Send + 'static,
    refusal: Response,
) -> Response {
    tokio::spawn(async move {
        let drained = async {
            futures::pin_mut!(body);
            while let Some(Ok(_)) = body.next().await {}
        };
        let _ = tokio::time::timeout(REFUSAL_DRAIN, drained).await;
    });
    refusal
}

/// `POST /raft/stream`: steps every message of an endless body into consensus.
pub async fn receive_stream(State(ctx): State<TransportContext>, headers: HeaderMap, body: Body) -> Response {
    if let Err(resp) = check_cluster(&ctx, &headers) {
        return refuse(body.into_data_stream(), *resp);
    }
    let from = headers
        .get(FROM_HEADER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let url = headers
        .get(PEER_URL_HEADER)
        .and_then(|v| v.to_str().ok())
        .filter(|u| u.starts_with("http://") || u.starts_with("https://"));
    if let (Some(id), Some(url)) = (from, url) {
        let _ = ctx
            .inbox
            .send_async(RaftInput::PeerUrl {
                id,
                url: url.to_string(),
            })
            .await;
    }
    let mut stream = body.into_data_stream();
    let mut buf = BytesMut::new();
    loop {
        let chunk = tokio::select! {
            c = stream.next() => c,
            _ = ctx.shutdown.cancelled() => return StatusCode::SERVICE_UNAVAILABLE.into_response(),
        };
        let Some(chunk) = chunk else {
            return StatusCode::OK.into_response();
        };
        let Ok(chunk) = chunk else {
            return StatusCode::BAD_REQUEST.into_response();
        };
        buf.extend_from_slice(&chunk);
        let msgs = match decode_frames(&mut buf) {
            Ok(m) => m,
            Err(e) => return refuse(stream, json_error(StatusCode::BAD_REQUEST, codes::BAD_FRAME, e)),
        };
        for msg in msgs {
            // A stream opened before its sender was removed must end as soon as it is.
            if ctx.removed.read().contains(&msg.from) {
                let gone = json_error(
                    StatusCode::GONE,
                    codes::MEMBER_REMOVED,
                    format!("member {} was removed from this cluster", msg.from),
                );
                return refuse(stream, gone);
            }
            if msg.to != ctx.self_id {
                let wrong = json_error(
                    StatusCode::BAD_REQUEST,
                    codes::WRONG_MEMBER,
                    format!("message for member {} reached member {}", msg.to, ctx.self_id),
                );
                return refuse(stream, wrong);
            }
            if ctx.inbox.send_async(RaftInput::Peer(msg)).await.is_err() {
                return StatusCode::SERVICE_UNAVAILABLE.into_response();
            }
        }
    }
}

/// `POST /raft/snapshot`: writes the streamed snapshot to disk, verifies it, then steps the message.
pub async fn receive_snapshot(State(ctx): State<TransportContext>, headers: HeaderMap, body: Body) -> Response {
    if let Err(resp) = check_cluster(&ctx, &headers) {
        return refuse(body.into_data_stream(), *resp);
    }
    match receive_snapshot_inner(&ctx, body).await {
        Ok(()) => StatusCode::OK.into_response(),
        Err(e) => {
            tracing::warn!(error = %e, "snapshot reception failed");
            json_error(StatusCode::BAD_REQUEST, codes::BAD_SNAPSHOT, e)
        }
    }
}

async fn receive_snapshot_inner(ctx: &TransportContext, body: Body) -> Result<(), String> {
    let mut stream = body.into_data_stream();
    let mut buf = BytesMut::new();
    let msg = loop {
        if buf.len() >= 4 {
            let len = u32::from_le_bytes(buf[..4].try_into().expect("4 bytes")) as usize;
            if len > MAX_FRAME {
                return Err(format!("frame of {len} bytes exceeds {MAX_FRAME}"));
            }
            if buf.len() >= 4 + len {
                buf.advance(4);
                let frame = buf.split_to(len);
                break Message::parse_from_bytes(&frame).map_err(|e| format!("bad message: {e}"))?;
            }
        }
        let chunk = stream
            .next()
            .await
            .ok_or("body ended before the snapshot message")?
            .map_err(|e| format!("reading body: {e}"))?;
        buf.extend_from_slice(&chunk);
    };
    if msg.get_msg_type() != MessageType::MsgSnapshot || msg.to != ctx.self_id {
        return Err(format!(
            "expected a snapshot for member {}, got {:?} for {}",
            ctx.self_id,
            msg.get_msg_type(),
            msg.to
        ));
    }
    let meta = msg.get_snapshot().get_metadata();
    let (index, term) = (meta.index, meta.term);
    // Fault tests: `snapshot::receive=return(MS)` holds the reception for MS milliseconds, so a
    // fault can land while a transfer is in flight.
    #[cfg(feature = "failpoints")]
    if let Some(ms) = fail::eval("snapshot::receive", |arg| arg.and_then(|a| a.parse::<u64>().ok())).flatten() {
        tracing::info!(index, term, pause_ms = ms, "snapshot reception held by a fail point");
        tokio::time::sleep(std::time::Duration::from_millis(ms)).await;
    }
    let tmp = ctx.snapshots.temp_path(index, term);
    let written = async {
        let mut file = tokio::fs::File::create(&tmp)
            .await
            .map_err(|e| format!("create {}: {e}", tmp.display()))?;
        file.write_all(&buf).await.map_err(|e| e.to_string())?;
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|e| format!("reading body: {e}"))?;
            file.write_all(&chunk)
                .await
                .map_err(|e| format!("write {}: {e}", tmp.display()))?;
        }
        file.flush().await.map_err(|e| e.to_string())?;
        let snapshots = ctx.snapshots.clone();
        let tmp = tmp.clone();
        // Verify before installing: a snapshot Raft accepts must be loadable, or the member is lost.
        tokio::task::spawn_blocking(move || -> Result<(), String> {
            let f = std::fs::File::open(&tmp).map_err(|e| e.to_string())?;
            KvState::verify_snapshot(std::io::BufReader::with_capacity(1 << 20, f))?;
            snapshots
                .install(&tmp, index, term)
                .map(|_| ())
                .map_err(|e| e.to_string())
        })
        .await
        .map_err(|e| e.to_string())?
    }
    .await;
    if let Err(e) = written {
        let _ = tokio::fs::remove_file(&tmp).await;
        return Err(e);
    }
    ctx.inbox
        .send_async(RaftInput::Peer(msg))
        .await
        .map_err(|_| "shutting down".to_string())
}
