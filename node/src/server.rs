//! The HTTP server behind the client and peer ports: accepting connections, serving each one
//! (HTTP/1.1 and h2c) with a router, and every limit that keeps a member serving when clients
//! misbehave. `axum::serve` has none of these, which is why the loop is written out here:
//!
//! - a cap on open connections, where reaching it first closes the connection that has been idle
//!   longest (no request in flight: keep-alive between requests, or never sent one), and only
//!   when every connection is busy refuses the new one with `503 too_many_connections`;
//! - a bound on the time to send a first request ([`ServerLimits::header_timeout`], also
//!   hyper's bound on reading each HTTP/1.1 request head, so a slow-loris is cut off) and on
//!   the time a connection may stay idle after it ([`ServerLimits::idle_timeout`]);
//! - a bound on request head size (`431` from hyper) and on concurrent h2 streams;
//! - a lingering close ([`Lingering`]): after the last response, the write side is shut and
//!   whatever the client still sends is read and discarded for a bounded time, as nginx does,
//!   so that a client that writes its whole body before reading (Python's `http.client`)
//!   reads a refusal instead of a connection reset.
//!
//! One connection goes `accept → admit → (TLS on a TLS port) → serve_connection`:
//! [`serve_connection`] takes any byte stream, so a TLS handshake slots in between.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use parking_lot::Mutex;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio::time::{Instant, Sleep};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::error::Result;
use crate::metrics::{ConnectionCloseLabels, Metrics, ServerLabels};
use crate::tls;

/// How long shutdown waits for open connections to finish their requests.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a connection that was asked to close (evicted, idle, shutting down) may take to
/// finish the request in flight before it is dropped.
const CLOSE_GRACE: Duration = Duration::from_secs(5);
/// During a lingering close: the longest silence from the client before the socket is closed.
const LINGER_GAP: Duration = Duration::from_secs(2);
/// During a lingering close: the most bytes read and discarded.
const LINGER_BYTES: u64 = 16 << 20;
/// Refusals (`503 too_many_connections`) being written at once; beyond it a connection over
/// the cap is closed without an answer, so that refusing costs bounded memory too.
const MAX_CONCURRENT_REFUSALS: usize = 256;
/// How long a refused connection is given to send its request head before the refusal.
const REFUSAL_HEAD_WAIT: Duration = Duration::from_secs(1);
/// File descriptors kept for everything that is not a client connection: the WAL, snapshots,
/// the listeners, peer streams.
const RESERVED_FDS: u64 = 512;

/// Where a TLS port takes the server configuration of each new handshake from (it changes when
/// the certificate files are rotated).
pub type TlsSource = Arc<dyn Fn() -> Arc<rustls::ServerConfig> + Send + Sync>;

/// The limits of one listening port.
#[derive(Debug, Clone)]
pub struct ServerLimits {
    /// Open connections at most.
    pub max_connections: usize,
    /// Time from accept to a complete first request head, and (HTTP/1.1) to each later one.
    pub header_timeout: Duration,
    /// Time a connection that served a request may stay without one in flight.
    pub idle_timeout: Duration,
    /// Largest request head (request line and headers, or an h2 header list), in bytes.
    pub max_header_bytes: usize,
    /// Concurrent h2 streams per connection.
    pub h2_max_streams: u32,
    /// Longest lingering close.
    pub linger: Duration,
}

/// Serves `router` on `listener` until `shutdown`, within `limits`.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: ServerLimits,
    tls: Option<TlsSource>,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
    name: &'static str,
) -> Result<()> {
    let table = Arc::new(ConnectionTable::new(limits.max_connections));
    let refusals = Arc::new(Semaphore::new(MAX_CONCURRENT_REFUSALS));
    let open_gauge = metrics
        .connections
        .get_or_create(&ServerLabels { server: name })
        .clone();
    let closed = |reason: &'static str| {
        metrics
            .connections_closed
            .get_or_create(&ConnectionCloseLabels { server: name, reason })
            .inc();
    };
    let connections = TaskTracker::new();
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = shutdown.cancelled() => break,
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(e) => {
                // Out of file descriptors, most likely: back off instead of spinning.
                tracing::warn!(server = name, error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let conn = match table.admit() {
            Admission::Admitted { conn, evicted } => {
                if evicted {
                    closed("evicted_idle");
                }
                conn
            }
            Admission::Full => {
                closed("refused_full");
                tracing::debug!(
                    server = name,
                    cap = limits.max_connections,
                    "every connection is busy; refusing a new one"
                );
                if let Ok(permit) = refusals.clone().try_acquire_owned() {
                    let linger = limits.linger;
                    connections.spawn(async move {
                        refuse_connection(Lingering::new(stream, linger)).await;
                        drop(permit);
                    });
                }
                continue;
            }
        };
        open_gauge.set(table.len() as i64);
        let router = router.clone();
        let (table, limits, shutdown, metrics, open_gauge) = (
            table.clone(),
            limits.clone(),
            shutdown.clone(),
            metrics.clone(),
            open_gauge.clone(),
        );
        // The configuration current now: a rotation changes the next handshakes only.
        let tls_config = tls.as_ref().map(|source| source());
        connections.spawn(async move {
            let reason = match tls::accept(stream, tls_config).await {
                Err(error) => {
                    tracing::debug!(server = name, %error, "TLS handshake failed");
                    Some("tls_handshake")
                }
                Ok((stream, cert)) => {
                    // A verified client certificate reaches the handlers as a request extension.
                    let router = match cert.as_deref().and_then(tls::cert_subject) {
                        Some(subject) => router.layer(axum::Extension(tls::VerifiedCert(Arc::new(subject)))),
                        None => router,
                    };
                    let service = TowerToHyperService::new(router);
                    match stream {
                        tls::Accepted::Plain(s) => {
                            serve_connection(Lingering::new(s, limits.linger), service, &conn, &limits, &shutdown).await
                        }
                        tls::Accepted::Tls(s) => {
                            serve_connection(Lingering::new(*s, limits.linger), service, &conn, &limits, &shutdown)
                                .await
                        }
                    }
                }
            };
            if let Some(reason) = reason {
                metrics
                    .connections_closed
                    .get_or_create(&ConnectionCloseLabels { server: name, reason })
                    .inc();
            }
            table.remove(conn.id);
            open_gauge.set(table.len() as i64);
        });
    }
    connections.close();
    if tokio::time::timeout(DRAIN_TIMEOUT, connections.wait()).await.is_err() {
        tracing::warn!(server = name, "connections still open after the drain timeout");
    }
    Ok(())
}

/// Serves one connection until it ends; returns why the member closed it, when the member did
/// (a limit, for the metrics), or `None` when the client did or it ended normally.
pub async fn serve_connection<I, S>(
    io: I,
    service: S,
    conn: &Arc<Connection>,
    limits: &ServerLimits,
    shutdown: &CancellationToken,
) -> Option<&'static str>
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    S: hyper::service::Service<
            http::Request<hyper::body::Incoming>,
            Response = http::Response<axum::body::Body>,
            Error = std::convert::Infallible,
        > + Send
        + 'static,
    S::Future: Send + 'static,
{
    let tracked = conn.clone();
    let service = hyper::service::service_fn(move |req| {
        let in_flight = InFlight::start(tracked.clone());
        let call = service.call(req);
        async move {
            let response = call.await;
            drop(in_flight);
            response
        }
    });
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        // Also the largest read buffer, so it bounds each connection's memory as well; hyper
        // answers a longer head with 431. Its floor is 8 KiB.
        .max_buf_size(limits.max_header_bytes.max(8192));
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(limits.h2_max_streams)
        .max_header_list_size(u32::try_from(limits.max_header_bytes).unwrap_or(u32::MAX));
    let served = builder.serve_connection(TokioIo::new(io), service);
    tokio::pin!(served);

    let mut reason = None;
    // Set once the member asked the connection to close: it may finish what is in flight until then.
    let mut closing_until: Option<Instant> = None;
    let mut check_at = Instant::now() + limits.header_timeout.min(limits.idle_timeout);
    loop {
        tokio::select! {
            result = served.as_mut() => {
                if let Err(e) = result {
                    match e.downcast_ref::<hyper::Error>() {
                        Some(e) if e.is_parse_too_large() => reason = Some("header_too_large"),
                        Some(e) if e.is_timeout() => reason = Some("header_timeout"),
                        _ => {}
                    }
                }
                return reason;
            }
            _ = shutdown.cancelled(), if closing_until.is_none() => {
                served.as_mut().graceful_shutdown();
                closing_until = Some(Instant::now() + CLOSE_GRACE);
            }
            _ = conn.evict.cancelled(), if closing_until.is_none() => {
                served.as_mut().graceful_shutdown();
                closing_until = Some(Instant::now() + CLOSE_GRACE);
            }
            _ = tokio::time::sleep_until(closing_until.unwrap_or(check_at)) => {
                if closing_until.is_some() {
                    // It did not finish within its grace: drop it.
                    return reason.or(Some("close_timeout"));
                }
                let now = Instant::now();
                match conn.idle_since() {
                    // A request in flight: its own deadline bounds it; look again later.
                    None => check_at = now + limits.header_timeout.min(limits.idle_timeout),
                    Some(since) => {
                        let first = conn.requests.load(Ordering::Relaxed) == 0;
                        let bound = if first { limits.header_timeout } else { limits.idle_timeout };
                        if now.duration_since(since) < bound {
                            check_at = since + bound;
                        } else if first {
                            // Never sent a complete request: nothing to answer, and a lingering
                            // close would only give a slow-loris more time.
                            return Some("header_timeout");
                        } else {
                            reason = Some("idle_timeout");
                            served.as_mut().graceful_shutdown();
                            closing_until = Some(now + CLOSE_GRACE);
                        }
                    }
                }
            }
        }
    }
}

/// Answers a connection over the cap with `503 too_many_connections` and closes it.
async fn refuse_connection<I: AsyncRead + AsyncWrite + Unpin>(mut io: Lingering<I>) {
    let body = serde_json::to_string(&raftkv_api::ErrorBody::new(
        raftkv_api::codes::TOO_MANY_CONNECTIONS,
        "this member has as many connections open as it accepts, all of them busy; retry later or use another member",
    ))
    .unwrap_or_default();
    let answer = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nretry-after: 1\r\nconnection: close\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    let _ = tokio::time::timeout(CLOSE_GRACE, async {
        // The answer follows the request head (or a short wait for it): an HTTP client that
        // reads an answer before it sent its request takes it for a broken connection.
        let _ = tokio::time::timeout(REFUSAL_HEAD_WAIT, read_head(&mut io)).await;
        io.write_all(answer.as_bytes()).await?;
        io.shutdown().await
    })
    .await;
}

/// Reads until the end of a request head, end of stream, or 16 KiB.
async fn read_head<I: AsyncRead + Unpin>(io: &mut I) {
    use tokio::io::AsyncReadExt;
    let mut head = Vec::with_capacity(1024);
    let mut buf = [0u8; 4096];
    while head.len() < 16 << 10 {
        match io.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => head.extend_from_slice(&buf[..n]),
        }
        if head.windows(4).any(|w| w == b"\r\n\r\n") {
            return;
        }
    }
}

/// One open connection, as the cap sees it.
pub struct Connection {
    id: u64,
    /// Requests (h2 streams) being served now.
    in_flight: AtomicU32,
    /// Requests started since accept.
    requests: AtomicU64,
    /// When the last request ended, or the connection was accepted: in milliseconds since
    /// `epoch`.
    last_active_ms: AtomicU64,
    epoch: Instant,
    /// Cancelled when the connection is closed to make room for a new one.
    evict: CancellationToken,
}

impl Connection {
    fn new(id: u64) -> Self {
        Connection {
            id,
            in_flight: AtomicU32::new(0),
            requests: AtomicU64::new(0),
            last_active_ms: AtomicU64::new(0),
            epoch: Instant::now(),
            evict: CancellationToken::new(),
        }
    }

    /// Since when nothing is in flight; `None` while a request is.
    fn idle_since(&self) -> Option<Instant> {
        (self.in_flight.load(Ordering::Acquire) == 0)
            .then(|| self.epoch + Duration::from_millis(self.last_active_ms.load(Ordering::Relaxed)))
    }

    fn touch(&self) {
        let ms = self.epoch.elapsed().as_millis() as u64;
        self.last_active_ms.store(ms, Ordering::Relaxed);
    }
}

/// Marks a request in flight on its connection for as long as it lives.
struct InFlight(Arc<Connection>);

impl InFlight {
    fn start(conn: Arc<Connection>) -> Self {
        conn.requests.fetch_add(1, Ordering::Relaxed);
        conn.in_flight.fetch_add(1, Ordering::AcqRel);
        InFlight(conn)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.touch();
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The open connections of one port.
struct ConnectionTable {
    cap: usize,
    open: Mutex<HashMap<u64, Arc<Connection>>>,
    next_id: AtomicU64,
}

enum Admission {
    Admitted {
        conn: Arc<Connection>,
        evicted: bool,
    },
    /// At the cap with every connection busy.
    Full,
}

impl ConnectionTable {
    fn new(cap: usize) -> Self {
        ConnectionTable {
            cap: cap.max(1),
            open: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(0),
        }
    }

    fn len(&self) -> usize {
        self.open.lock().len()
    }

    /// Makes room for a new connection: below the cap at once; at it, by closing the connection
    /// idle longest. The evicted connection leaves the table now, so the table never holds more
    /// than the cap; its socket closes as soon as its task sees the signal.
    fn admit(&self) -> Admission {
        let mut open = self.open.lock();
        let mut evicted = false;
        if open.len() >= self.cap {
            // A linear scan, done only at the cap: a few microseconds for ten thousand entries,
            // where an ordered index would cost every request a lock to keep it current.
            let idlest = open
                .values()
                .filter_map(|c| c.idle_since().map(|since| (since, c.id)))
                .min()
                .map(|(_, id)| id);
            let Some(id) = idlest else {
                return Admission::Full;
            };
            if let Some(victim) = open.remove(&id) {
                victim.evict.cancel();
            }
            evicted = true;
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let conn = Arc::new(Connection::new(id));
        open.insert(id, conn.clone());
        Admission::Admitted { conn, evicted }
    }

    fn remove(&self, id: u64) {
        self.open.lock().remove(&id);
    }
}

/// A byte stream whose shutdown is a lingering close: the write side is shut (the client
/// sees the end of the answer), then what the client still sends is read and discarded until
/// it closes too, stays silent for [`LINGER_GAP`], sends [`LINGER_BYTES`], or the linger time
/// is over. Closing a socket with unread bytes makes the kernel send a reset, which destroys
/// an answer the client has not read yet: a client still writing a body the member refused
/// would see `ECONNRESET` instead of the refusal.
pub struct Lingering<I> {
    io: I,
    linger: Duration,
    draining: Option<Drain>,
}

struct Drain {
    until: Instant,
    gap: Pin<Box<Sleep>>,
    left: u64,
}

impl<I> Lingering<I> {
    /// Wraps `io`; its shutdown lingers at most `linger`.
    pub fn new(io: I, linger: Duration) -> Self {
        Lingering {
            io,
            linger,
            draining: None,
        }
    }
}

impl<I: AsyncRead + Unpin> AsyncRead for Lingering<I> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<I: AsyncRead + AsyncWrite + Unpin> AsyncWrite for Lingering<I> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.draining.is_none() {
            if let Err(e) = std::task::ready!(Pin::new(&mut this.io).poll_shutdown(cx)) {
                return Poll::Ready(Err(e));
            }
            this.draining = Some(Drain {
                until: Instant::now() + this.linger,
                gap: Box::pin(tokio::time::sleep(LINGER_GAP.min(this.linger))),
                left: LINGER_BYTES,
            });
        }
        let drain = this.draining.as_mut().expect("set above");
        let mut scratch = [0u8; 8192];
        loop {
            if drain.left == 0 || Instant::now() >= drain.until || drain.gap.as_mut().poll(cx).is_ready() {
                return Poll::Ready(Ok(()));
            }
            let mut buf = ReadBuf::new(&mut scratch);
            match Pin::new(&mut this.io).poll_read(cx, &mut buf) {
                // The client closed its side, or the socket failed: nothing more to wait for.
                Poll::Ready(Ok(())) if buf.filled().is_empty() => return Poll::Ready(Ok(())),
                Poll::Ready(Err(_)) => return Poll::Ready(Ok(())),
                Poll::Ready(Ok(())) => {
                    drain.left = drain.left.saturating_sub(buf.filled().len() as u64);
                    let next_gap = (Instant::now() + LINGER_GAP).min(drain.until);
                    drain.gap.as_mut().reset(next_gap);
                }
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}

/// Connections the kernel holds for a port before the accept loop takes them; the kernel
/// lowers it to `net.core.somaxconn`. The default of `TcpListener::bind` (128) overflows when
/// a few hundred clients connect at once (a fleet reconnecting after a leader change): the
/// kernel then answers with SYN cookies, and a connection whose cookie it cannot take back
/// into the full queue is reset after the client already sent its request. Go's `net.Listen`
/// (etcd) uses `somaxconn` too.
const ACCEPT_BACKLOG: u32 = 4096;

/// Binds a listening TCP socket on `addr` with [`ACCEPT_BACKLOG`] (and `SO_REUSEADDR`, as
/// `TcpListener::bind` sets, so a restarted member rebinds over its closing connections).
pub fn bind_listener(addr: std::net::SocketAddr) -> io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(ACCEPT_BACKLOG)
}

/// Raises this process's soft limit on open files to its hard limit, so that the connection
/// caps can be reached, and returns the connections the limit leaves room for. A cap the
/// limit cannot hold is lowered to fit, with a warning: accepting until `EMFILE` would fail
/// WAL and snapshot files, which is fatal, where a refused connection is not.
pub fn fit_connection_caps(wanted: usize) -> usize {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) else {
        return wanted;
    };
    let mut limit = soft;
    if soft < hard {
        match setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
            Ok(()) => limit = hard,
            Err(e) => tracing::warn!(soft, hard, error = %e, "could not raise the open-file limit"),
        }
    }
    let room = limit.saturating_sub(RESERVED_FDS) as usize;
    if wanted > room {
        tracing::warn!(
            wanted,
            open_file_limit = limit,
            fitted = room,
            "the connection caps exceed what the open-file limit allows; lowered to fit"
        );
        return room.max(1);
    }
    wanted
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn at_the_cap_the_connection_idle_longest_makes_room() {
        let table = ConnectionTable::new(3);
        let conns: Vec<_> = (0..3)
            .map(|_| match table.admit() {
                Admission::Admitted { conn, evicted } => {
                    assert!(!evicted);
                    conn
                }
                Admission::Full => panic!("below the cap"),
            })
            .collect();
        // 0 is busy; 1 went idle before 2.
        let _busy = InFlight::start(conns[0].clone());
        conns[1].last_active_ms.store(10, Ordering::Relaxed);
        conns[2].last_active_ms.store(20, Ordering::Relaxed);
        let Admission::Admitted {
            evicted: true,
            conn: fourth,
        } = table.admit()
        else {
            panic!("an idle connection should have made room");
        };
        assert!(conns[1].evict.is_cancelled());
        assert!(!conns[2].evict.is_cancelled() && !conns[0].evict.is_cancelled());
        assert_eq!(table.len(), 3);
        // 2 goes next; then only busy connections are left and a new one is refused.
        let _busy4 = InFlight::start(fourth);
        assert!(matches!(table.admit(), Admission::Admitted { evicted: true, .. }));
        assert!(conns[2].evict.is_cancelled());
        let newest = table.open.lock().values().max_by_key(|c| c.id).cloned().unwrap();
        let _busy5 = InFlight::start(newest);
        assert!(matches!(table.admit(), Admission::Full));
        assert_eq!(table.len(), 3);
    }

    #[test]
    fn a_connection_is_idle_only_with_nothing_in_flight() {
        let conn = Arc::new(Connection::new(1));
        assert!(
            conn.idle_since().is_some(),
            "a connection that never sent a request is idle"
        );
        let a = InFlight::start(conn.clone());
        let b = InFlight::start(conn.clone());
        drop(a);
        assert!(conn.idle_since().is_none(), "one h2 stream is still in flight");
        drop(b);
        assert!(conn.idle_since().is_some());
        assert_eq!(conn.requests.load(Ordering::Relaxed), 2);
    }

    #[tokio::test]
    async fn a_lingering_close_reads_what_the_client_still_sends_until_it_closes() {
        use tokio::io::AsyncReadExt;
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let client = tokio::spawn(async move {
            let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
            // Writes 4 MiB before reading anything, as Python's http.client does.
            s.write_all(&vec![b'x'; 4 << 20]).await.unwrap();
            let mut answer = String::new();
            s.read_to_string(&mut answer).await.unwrap();
            answer
        });
        let (stream, _) = listener.accept().await.unwrap();
        let mut io = Lingering::new(stream, Duration::from_secs(10));
        io.write_all(b"refused").await.unwrap();
        io.shutdown().await.unwrap();
        drop(io);
        let answer = tokio::time::timeout(Duration::from_secs(20), client)
            .await
            .expect("the client finished")
            .expect("the client neither saw a reset nor a broken pipe");
        assert_eq!(answer, "refused");
    }
}
