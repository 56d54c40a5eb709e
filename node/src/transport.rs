//! The peer transport: Raft messages between members over HTTP/1.1 on the peer port (over
//! mutual TLS when peer TLS is on, see [`crate::tls::PeerClient`]).
//!
//! Each peer has one long-lived `POST /raft/stream` request whose body is an endless sequence of
//! frames (`u32 LE length | protobuf Message`). A sender task per peer opens it, watches it and
//! reopens it when it breaks; the consensus thread writes into it directly: the messages of one
//! `Ready` for one peer become one body chunk (or several of at most `MAX_CHUNK` bytes), handed
//! to the stream's connection without another task in between. The consensus thread never waits
//! on a peer: a peer whose stream is down, or whose stream has `MAX_QUEUED_BYTES` not yet taken
//! by its connection, loses the message (Raft retransmits) and is reported unreachable.
//!
//! Both sides run on the consensus thread's runtime (see [`crate::node`]): the sending
//! connections and the peer port's server. A message from the leader is read, stepped, persisted
//! and answered on the follower's one thread, and the leader's appends reach the socket without a
//! thread hand-off.
//!
//! Snapshots travel separately (`POST /raft/snapshot`): the message frame, then the snapshot file
//! streamed from disk, so the receiver writes it to disk as it arrives and neither side holds it
//! in memory. Every request carries the sender's cluster id; a member of another cluster is refused.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
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
/// Body chunks (about one per `Ready` per peer) queued on a stream before new ones are dropped.
const STREAM_CHUNKS: usize = 4096;
/// Bytes gathered into one body chunk at most (one larger message is a chunk of its own): a
/// lagging follower's catch-up (up to 256 appends of 1 MiB in one `Ready`) leaves in pieces
/// that each fit the stream's bound, rather than as one chunk it never accepts.
const MAX_CHUNK: usize = 4 << 20;
/// Bytes queued on a stream, not yet taken by its connection, before new chunks are dropped: a
/// slow peer costs bounded memory.
const MAX_QUEUED_BYTES: usize = 64 << 20;
/// Largest frame accepted; a bigger length is a protocol error, not a message.
const MAX_FRAME: usize = 64 << 20;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
const MIN_BACKOFF: Duration = Duration::from_millis(50);
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

type BodyTx = mpsc::Sender<Result<Frame<Bytes>, std::io::Error>>;

/// One open stream's body, as the consensus thread writes into it.
struct OpenStream {
    tx: BodyTx,
    /// Bytes written into this stream's body and not yet taken by its connection. Each stream
    /// has its own count: a replaced stream's connection may still take frames after the next
    /// stream opened (a refused stream's body is drained for a while), and must not change the
    /// count of the new one.
    queued: Arc<AtomicUsize>,
}

/// One peer's stream as both its writer (the consensus thread) and its sender task see it.
#[derive(Default)]
struct Link {
    /// The open stream; `None` while it is being (re)opened.
    body: parking_lot::Mutex<Option<OpenStream>>,
}

impl Link {
    /// Queues one chunk on the open stream; false when there is none or it is full. A chunk
    /// larger than the bound is taken when nothing else is queued, so that no message is too
    /// large to ever leave.
    fn offer(&self, chunk: Bytes) -> bool {
        let len = chunk.len();
        let body = self.body.lock();
        let Some(body) = body.as_ref() else {
            return false;
        };
        let queued = body.queued.load(Ordering::Relaxed);
        if queued > 0 && queued.saturating_add(len) > MAX_QUEUED_BYTES {
            return false;
        }
        body.queued.fetch_add(len, Ordering::Relaxed);
        if body.tx.try_send(Ok(Frame::data(chunk))).is_err() {
            body.queued.fetch_sub(len, Ordering::Relaxed);
            return false;
        }
        true
    }

    /// Opens a new stream in place of any other: returns a sender that closes when the stream's
    /// connection ends, and the body the connection takes frames from, which keeps the new
    /// stream's count of queued bytes.
    fn open(
        &self,
    ) -> (
        BodyTx,
        impl futures::Stream<Item = Result<Frame<Bytes>, std::io::Error>> + Send + 'static,
    ) {
        let (tx, rx) = mpsc::channel(STREAM_CHUNKS);
        let queued = Arc::new(AtomicUsize::new(0));
        let taken = queued.clone();
        let frames = ReceiverStream::new(rx).map(move |frame: Result<Frame<Bytes>, std::io::Error>| {
            if let Some(data) = frame.as_ref().ok().and_then(Frame::data_ref) {
                taken.fetch_sub(data.len(), Ordering::Relaxed);
            }
            frame
        });
        *self.body.lock() = Some(OpenStream { tx: tx.clone(), queued });
        (tx, frames)
    }

    /// Bytes queued on the open stream (0 without one).
    #[cfg(test)]
    fn queued(&self) -> usize {
        self.body
            .lock()
            .as_ref()
            .map_or(0, |b| b.queued.load(Ordering::Relaxed))
    }

    fn close(&self) {
        *self.body.lock() = None;
    }
}

struct Peer {
    url: String,
    link: Arc<Link>,
    cancel: CancellationToken,
}

/// The send side, owned by the consensus thread.
pub struct Transport {
    ctx: TransportContext,
    /// The consensus thread's runtime: the peers' sender tasks and snapshot sends run on it.
    runtime: tokio::runtime::Handle,
    peers: HashMap<u64, Peer>,
    /// Peers whose snapshot message could not be sent: Raft keeps a peer in its snapshot state
    /// until told how the send ended, so the consensus thread reports these.
    failed_snapshots: Vec<u64>,
    /// Peers that lost a message since the last call, reported unreachable by the consensus
    /// thread so Raft stops pipelining to them.
    unreachable: Vec<u64>,
}

impl Transport {
    /// A transport with no peers yet, whose tasks run on `runtime`.
    pub fn new(ctx: TransportContext, runtime: tokio::runtime::Handle) -> Self {
        Transport {
            ctx,
            runtime,
            peers: HashMap::new(),
            failed_snapshots: Vec::new(),
            unreachable: Vec::new(),
        }
    }

    /// Adds a peer, or moves it to a new URL; its stream is opened at once.
    pub fn set_peer(&mut self, id: u64, url: &str) {
        let url = url.trim_end_matches('/');
        if self.peers.get(&id).is_some_and(|p| p.url == url) {
            return;
        }
        self.remove_peer(id);
        let cancel = self.ctx.shutdown.child_token();
        let link = Arc::new(Link::default());
        let sender = PeerSender {
            id,
            url: url.to_string(),
            ctx: self.ctx.clone(),
            cancel: cancel.clone(),
            link: link.clone(),
        };
        self.runtime.spawn(sender.run());
        self.peers.insert(
            id,
            Peer {
                url: url.to_string(),
                link,
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

    /// Writes messages into their peers' streams without waiting: the messages for one peer go
    /// out as one chunk, or several of at most `MAX_CHUNK` bytes, in order; once the stream
    /// refuses one, the rest for that peer are dropped. A snapshot starts its own transfer.
    pub fn send(&mut self, msgs: Vec<Message>) {
        let mut outgoing: Vec<Outgoing> = Vec::new();
        for msg in msgs {
            let to = msg.to;
            if msg.get_msg_type() == MessageType::MsgSnapshot {
                match self.peers.get(&to) {
                    Some(peer) => {
                        self.runtime
                            .spawn(send_snapshot(peer.url.clone(), to, msg, self.ctx.clone()));
                    }
                    None => self.failed_snapshots.push(to),
                }
                continue;
            }
            let out = match outgoing.iter().position(|o| o.to == to) {
                Some(i) => &mut outgoing[i],
                None => {
                    outgoing.push(Outgoing {
                        to,
                        chunk: BytesMut::new(),
                        refused: false,
                    });
                    outgoing.last_mut().expect("just pushed")
                }
            };
            if out.refused {
                continue;
            }
            encode_frame(&msg, &mut out.chunk);
            if out.chunk.len() >= MAX_CHUNK {
                let chunk = out.chunk.split().freeze();
                out.refused = !self.offer(to, chunk);
            }
        }
        for mut out in outgoing {
            if !out.refused && !out.chunk.is_empty() {
                let chunk = out.chunk.split().freeze();
                out.refused = !self.offer(out.to, chunk);
            }
            if out.refused && !self.unreachable.contains(&out.to) {
                self.unreachable.push(out.to);
            }
        }
    }

    fn offer(&self, to: u64, chunk: Bytes) -> bool {
        match self.peers.get(&to) {
            Some(peer) => peer.link.offer(chunk),
            None => {
                tracing::debug!(to, "message to a peer with no known URL dropped");
                false
            }
        }
    }

    /// Peers whose snapshot message could not be sent, since the last call.
    pub fn take_failed_snapshots(&mut self) -> Vec<u64> {
        std::mem::take(&mut self.failed_snapshots)
    }

    /// Peers that lost a message, since the last call.
    pub fn take_unreachable(&mut self) -> Vec<u64> {
        std::mem::take(&mut self.unreachable)
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

/// One peer's share of one `send`: its encoded messages not yet offered, and whether its stream
/// refused a chunk.
struct Outgoing {
    to: u64,
    chunk: BytesMut,
    refused: bool,
}

/// Opens one peer's stream, and reopens it (with backoff) whenever it breaks.
struct PeerSender {
    id: u64,
    url: String,
    ctx: TransportContext,
    cancel: CancellationToken,
    link: Arc<Link>,
}

impl PeerSender {
    async fn run(self) {
        let mut backoff = MIN_BACKOFF;
        loop {
            let mut opened = None;
            let result = self.stream(&mut opened).await;
            self.link.close();
            match result {
                Ok(()) => return,
                Err(e) => {
                    tracing::debug!(peer = self.id, url = %self.url, error = %e, "peer stream broken");
                    let _ = self.ctx.inbox.try_send(RaftInput::Unreachable(self.id));
                    // Only a stream that stayed up a while resets the backoff: a peer that
                    // accepts the connection and refuses the stream (restarting, or refusing a
                    // removed member) is not redialled every 50 ms.
                    if opened.is_some_and(|at: tokio::time::Instant| at.elapsed() >= MAX_BACKOFF) {
                        backoff = MIN_BACKOFF;
                    }
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        _ = self.cancel.cancelled() => return,
                    }
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
            }
        }
    }

    /// Opens the stream (noting when in `opened`) and holds it open until it breaks (Err) or the
    /// peer is removed (Ok).
    async fn stream(&self, opened: &mut Option<tokio::time::Instant>) -> Result<(), String> {
        let mut sender = tokio::select! {
            s = self.ctx.peer_client.connect::<PeerBody>(&self.url) => s?,
            _ = self.cancel.cancelled() => return Ok(()),
        };
        *opened = Some(tokio::time::Instant::now());
        let (body_tx, frames) = self.link.open();
        let req = hyper::Request::post(format!("{}/raft/stream", self.url))
            .header(CLUSTER_ID_HEADER, self.ctx.cluster_id.load(Ordering::Relaxed))
            .header(FROM_HEADER, self.ctx.self_id)
            .header(PEER_URL_HEADER, self.ctx.advertise_url.as_deref().unwrap_or(""))
            .body(BoxBody::new(StreamBody::new(frames)))
            .map_err(|e| e.to_string())?;
        let response = sender.send_request(req);
        tokio::pin!(response);
        // The peer's answer is watched throughout: a peer that refuses this member (410
        // member_removed) answers and closes, and that answer is how a removed member learns of
        // its removal. A connection that ends without one closes the body.
        tokio::select! {
            biased;
            r = &mut response => Err(self.response_error(r)),
            _ = self.cancel.cancelled() => Ok(()),
            _ = body_tx.closed() => match tokio::time::timeout(CONNECT_TIMEOUT, &mut response).await {
                Ok(r) => Err(self.response_error(r)),
                Err(_) => Err("stream body closed".to_string()),
            },
        }
    }

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

#[cfg(test)]
mod tests {
    use futures::FutureExt;

    use super::*;

    /// Takes the next frame off a stream's body as its connection would; its length.
    fn take(frames: &mut (impl futures::Stream<Item = Result<Frame<Bytes>, std::io::Error>> + Unpin)) -> usize {
        let frame = frames
            .next()
            .now_or_never()
            .flatten()
            .expect("a queued chunk")
            .expect("data");
        frame.data_ref().expect("a data frame").len()
    }

    #[test]
    fn a_link_without_an_open_stream_refuses_every_chunk() {
        let link = Link::default();
        assert!(!link.offer(Bytes::from_static(b"frame")));
        let (_tx, frames) = link.open();
        link.close();
        assert!(!link.offer(Bytes::from_static(b"frame")));
        drop(frames);
    }

    #[test]
    fn a_stream_holds_at_most_its_byte_bound_but_always_takes_a_chunk_when_empty() {
        let link = Link::default();
        let (_tx, frames) = link.open();
        let mut frames = Box::pin(frames);
        let big = Bytes::from(vec![1u8; MAX_QUEUED_BYTES + 1]);
        assert!(link.offer(big.clone()), "an oversized chunk on an empty stream leaves");
        assert!(!link.offer(Bytes::from_static(b"x")), "nothing fits behind it");
        assert_eq!(take(&mut frames), MAX_QUEUED_BYTES + 1);
        assert_eq!(link.queued(), 0, "taking a frame gives its bytes back");
        let half = Bytes::from(vec![2u8; MAX_QUEUED_BYTES / 2]);
        assert!(link.offer(half.clone()));
        assert!(link.offer(half.clone()));
        assert!(!link.offer(Bytes::from_static(b"x")), "the bound is reached");
        assert_eq!(link.queued(), MAX_QUEUED_BYTES);
    }

    #[test]
    fn frames_a_replaced_stream_gives_up_late_do_not_change_the_new_streams_count() {
        let link = Link::default();
        let (_old_tx, old_frames) = link.open();
        let mut old_frames = Box::pin(old_frames);
        assert!(link.offer(Bytes::from(vec![0u8; 1000])));
        // The stream is replaced while its frame is still queued; its connection takes it later.
        let (_new_tx, _new_frames) = link.open();
        assert!(link.offer(Bytes::from(vec![0u8; 10])));
        assert_eq!(take(&mut old_frames), 1000);
        assert_eq!(link.queued(), 10);
    }
}
