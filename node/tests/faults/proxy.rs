//! A TCP proxy in front of one member's peer port, through which every other member reaches it.
//!
//! Members learn each other's peer URLs from the replicated membership, so a URL is per
//! destination: the proxy in front of member B carries every link X->B. It tells the links apart
//! by the `x-raftkv-from` header that opens each peer request (one connection carries one
//! sender's stream or snapshot), and applies that link's rule to both directions of the
//! connection. Connections that carry no such header (admin calls forwarded to the leader) are
//! link 0 and only follow the proxy-wide rule.
//!
//! A TCP stream cannot lose bytes in the middle and stay a valid HTTP body, so the faults act on
//! whole connections or on timing: a blackholed link swallows what it carries and its connection
//! is closed once the link heals (the sender reconnects, as after a real outage); a lossy link
//! resets a connection on a share of its chunks; a slow link delivers each chunk late, in order.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use parking_lot::Mutex;
use rand::Rng;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// What a link does to its traffic.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum LinkRule {
    /// Forward as is.
    Pass,
    /// Swallow everything.
    Blackhole,
    /// Deliver every chunk `mean` ± `jitter` late, keeping order.
    Delay { mean: Duration, jitter: Duration },
    /// Reset the connection on this share of chunks, losing what it carried.
    Drop { share: f64 },
}

/// What the proxy did, so a run can prove its fault fired.
#[derive(Debug, Default)]
pub struct ProxyCounters {
    pub forwarded_bytes: AtomicU64,
    pub dropped_bytes: AtomicU64,
    pub delayed_chunks: AtomicU64,
    pub reset_connections: AtomicU64,
}

impl ProxyCounters {
    pub fn snapshot(&self) -> [u64; 4] {
        [
            self.forwarded_bytes.load(Ordering::Relaxed),
            self.dropped_bytes.load(Ordering::Relaxed),
            self.delayed_chunks.load(Ordering::Relaxed),
            self.reset_connections.load(Ordering::Relaxed),
        ]
    }
}

struct ProxyState {
    /// The member's real peer address, known once it listens.
    target: Mutex<Option<SocketAddr>>,
    /// Rules per source member id; a source without one follows `default_rule`.
    rules: Mutex<HashMap<u64, LinkRule>>,
    default_rule: Mutex<LinkRule>,
    counters: ProxyCounters,
    /// Cancelled when the proxy is dropped, closing every open connection.
    generation: Mutex<CancellationToken>,
    shutdown: CancellationToken,
}

impl ProxyState {
    fn rule(&self, source: u64) -> LinkRule {
        self.rules
            .lock()
            .get(&source)
            .copied()
            .unwrap_or(*self.default_rule.lock())
    }
}

/// One proxy; dropping it stops accepting and closes every connection.
pub struct Proxy {
    pub addr: SocketAddr,
    state: Arc<ProxyState>,
}

/// Largest request head read while looking for the sender's id.
const MAX_HEAD: usize = 16 << 10;

impl Proxy {
    /// Listens on a fresh loopback port; forwards nowhere until `set_target`.
    pub async fn start() -> Result<Proxy> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let state = Arc::new(ProxyState {
            target: Mutex::new(None),
            rules: Mutex::new(HashMap::new()),
            default_rule: Mutex::new(LinkRule::Pass),
            counters: ProxyCounters::default(),
            generation: Mutex::new(CancellationToken::new()),
            shutdown: CancellationToken::new(),
        });
        let accept_state = state.clone();
        tokio::spawn(async move {
            loop {
                let accepted = tokio::select! {
                    a = listener.accept() => a,
                    _ = accept_state.shutdown.cancelled() => return,
                };
                if let Ok((stream, _)) = accepted {
                    let _ = stream.set_nodelay(true);
                    tokio::spawn(serve(stream, accept_state.clone()));
                }
            }
        });
        Ok(Proxy { addr, state })
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn set_target(&self, target: SocketAddr) {
        *self.state.target.lock() = Some(target);
    }

    /// Sets the rule of link `source` -> this member.
    pub fn set_link(&self, source: u64, rule: LinkRule) {
        self.state.rules.lock().insert(source, rule);
    }

    /// Sets the rule of every link into this member without a rule of its own.
    pub fn set_default(&self, rule: LinkRule) {
        *self.state.default_rule.lock() = rule;
    }

    /// Every link back to `Pass`; a connection that lost bytes closes at its next chunk, so its
    /// sender reconnects.
    pub fn heal(&self) {
        self.state.rules.lock().clear();
        *self.state.default_rule.lock() = LinkRule::Pass;
    }

    pub fn counters(&self) -> &ProxyCounters {
        &self.state.counters
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.state.shutdown.cancel();
        self.state.generation.lock().cancel();
    }
}

/// Finds `x-raftkv-from: N` in a request head.
fn source_of(head: &[u8]) -> u64 {
    let text = String::from_utf8_lossy(head);
    text.lines()
        .filter_map(|l| l.split_once(':'))
        .find(|(name, _)| name.trim().eq_ignore_ascii_case("x-raftkv-from"))
        .and_then(|(_, v)| v.trim().parse().ok())
        .unwrap_or(0)
}

async fn serve(mut inbound: TcpStream, state: Arc<ProxyState>) {
    let cut = state.generation.lock().clone();
    // Read the request head to learn which member is sending.
    let mut head = Vec::new();
    let mut buf = vec![0u8; 8192];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < MAX_HEAD {
        let n = tokio::select! {
            r = inbound.read(&mut buf) => match r { Ok(0) | Err(_) => return, Ok(n) => n },
            _ = cut.cancelled() => return,
        };
        head.extend_from_slice(&buf[..n]);
    }
    let source = source_of(&head);
    let Some(target) = *state.target.lock() else { return };
    let outbound = if state.rule(source) == LinkRule::Blackhole {
        // The destination is unreachable on this link: swallow until the link heals.
        state
            .counters
            .dropped_bytes
            .fetch_add(head.len() as u64, Ordering::Relaxed);
        None
    } else {
        TcpStream::connect(target).await.ok()
    };
    let Some(outbound) = outbound else {
        swallow(inbound, source, &state, &cut).await;
        return;
    };
    let _ = outbound.set_nodelay(true);
    let (in_read, in_write) = inbound.into_split();
    let (out_read, mut out_write) = outbound.into_split();
    if out_write.write_all(&head).await.is_err() {
        return;
    }
    state
        .counters
        .forwarded_bytes
        .fetch_add(head.len() as u64, Ordering::Relaxed);
    let conn = cut.child_token();
    let up = tokio::spawn(pump(in_read, out_write, source, state.clone(), conn.clone()));
    let down = tokio::spawn(pump(out_read, in_write, source, state.clone(), conn.clone()));
    let _ = up.await;
    conn.cancel();
    let _ = down.await;
}

/// Reads and discards until the connection closes or the link heals (then closes it).
async fn swallow(mut inbound: TcpStream, source: u64, state: &ProxyState, cut: &CancellationToken) {
    let mut buf = vec![0u8; 64 << 10];
    loop {
        tokio::select! {
            r = inbound.read(&mut buf) => match r {
                Ok(0) | Err(_) => return,
                Ok(n) => { state.counters.dropped_bytes.fetch_add(n as u64, Ordering::Relaxed); }
            },
            _ = cut.cancelled() => return,
        }
        if state.rule(source) != LinkRule::Blackhole {
            return;
        }
    }
}

/// Copies one direction of a connection under the link's current rule.
async fn pump<R, W>(mut from: R, to: W, source: u64, state: Arc<ProxyState>, conn: CancellationToken)
where
    R: tokio::io::AsyncRead + Unpin,
    W: tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    // A writer task delivers chunks at their due time, so a delay never reorders them.
    let (tx, mut rx) = mpsc::unbounded_channel::<(Instant, Vec<u8>)>();
    let writer_conn = conn.clone();
    let writer_state = state.clone();
    let writer = tokio::spawn(async move {
        let mut to = to;
        while let Some((due, chunk)) = rx.recv().await {
            tokio::select! {
                _ = tokio::time::sleep_until(due) => {}
                _ = writer_conn.cancelled() => break,
            }
            if to.write_all(&chunk).await.is_err() {
                break;
            }
            writer_state
                .counters
                .forwarded_bytes
                .fetch_add(chunk.len() as u64, Ordering::Relaxed);
        }
        let _ = to.shutdown().await;
        writer_conn.cancel();
    });
    let mut buf = vec![0u8; 64 << 10];
    let mut last_due = Instant::now();
    let mut lost_bytes = false;
    loop {
        let n = tokio::select! {
            r = from.read(&mut buf) => match r { Ok(0) | Err(_) => break, Ok(n) => n },
            _ = conn.cancelled() => break,
        };
        let rule = state.rule(source);
        if lost_bytes && rule != LinkRule::Blackhole {
            // The stream lost bytes while blackholed; it cannot carry valid frames any more.
            break;
        }
        let now = Instant::now();
        let due = match rule {
            LinkRule::Pass => now,
            LinkRule::Blackhole => {
                lost_bytes = true;
                state.counters.dropped_bytes.fetch_add(n as u64, Ordering::Relaxed);
                continue;
            }
            LinkRule::Delay { mean, jitter } => {
                let j = jitter.as_secs_f64();
                let d = (mean.as_secs_f64() + rand::rng().random_range(-j..=j)).max(0.0);
                state.counters.delayed_chunks.fetch_add(1, Ordering::Relaxed);
                now + Duration::from_secs_f64(d)
            }
            LinkRule::Drop { share } => {
                if rand::rng().random_bool(share) {
                    state.counters.dropped_bytes.fetch_add(n as u64, Ordering::Relaxed);
                    state.counters.reset_connections.fetch_add(1, Ordering::Relaxed);
                    break;
                }
                now
            }
        };
        last_due = last_due.max(due);
        if tx.send((last_due, buf[..n].to_vec())).is_err() {
            break;
        }
    }
    drop(tx);
    conn.cancel();
    let _ = writer.await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_sender_is_read_from_the_request_head() {
        let head = b"POST /raft/stream HTTP/1.1\r\nhost: x\r\nX-Raftkv-From: 42\r\n\r\n";
        assert_eq!(source_of(head), 42);
        assert_eq!(source_of(b"POST /v1/members HTTP/1.1\r\n\r\n"), 0);
    }
}
