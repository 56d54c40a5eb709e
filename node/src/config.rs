//! Command-line flags of `raftkv-node`, each with a `RAFTKV_*` environment fallback so a
//! StatefulSet can configure it through the downward API.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use crate::identity::MAX_MEMBER_ID;
use crate::tls::TlsFiles;

/// How one member runs.
#[derive(clap::Args, Debug, Clone)]
pub struct NodeConfig {
    /// Data directory (the persistent volume): identity, write-ahead log, snapshots.
    #[arg(long, env = "RAFTKV_DATA_DIR", default_value = "./raftkv-data/node")]
    pub data_dir: PathBuf,
    /// Address of the client and admin HTTP API.
    #[arg(long, env = "RAFTKV_CLIENT_ADDR", default_value = "0.0.0.0:8080")]
    pub client_addr: SocketAddr,
    /// Address of the peer transport.
    #[arg(long, env = "RAFTKV_PEER_ADDR", default_value = "0.0.0.0:8081")]
    pub peer_addr: SocketAddr,
    /// URL other members use to reach this member's peer port (default: the bound peer address
    /// when it is not a wildcard, `https://` when peer TLS is on).
    #[arg(long, env = "RAFTKV_ADVERTISE_PEER_URL")]
    pub advertise_peer_url: Option<String>,
    /// This member's id, for a static cluster. Without it a random id is created on first start.
    #[arg(long, env = "RAFTKV_ID", value_parser = clap::value_parser!(u64).range(1..=MAX_MEMBER_ID))]
    pub id: Option<u64>,
    /// Static bootstrap: `1=http://host:port,2=http://host:port,...` (`https://` with peer
    /// TLS). Used only on first start.
    #[arg(long, env = "RAFTKV_INITIAL_CLUSTER", value_parser = parse_initial_cluster)]
    pub initial_cluster: Option<InitialCluster>,
    /// Applied entries between two snapshots.
    #[arg(long, env = "RAFTKV_SNAPSHOT_COUNT", default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(1..))]
    pub snapshot_count: u64,
    /// Entries kept behind a snapshot so slow followers catch up from the log.
    #[arg(long, env = "RAFTKV_SNAPSHOT_CATCHUP_ENTRIES", default_value_t = 5_000)]
    pub snapshot_catchup_entries: u64,
    /// Size at which the write-ahead log starts a new segment, in bytes. Segments wholly behind
    /// a snapshot are deleted, so this is also the granularity of the log's disk use.
    #[arg(long, env = "RAFTKV_WAL_SEGMENT_BYTES", default_value_t = 64 << 20, value_parser = clap::value_parser!(u64).range(4096..))]
    pub wal_segment_bytes: u64,
    /// Largest value accepted, in bytes.
    #[arg(long, env = "RAFTKV_MAX_VALUE_SIZE", default_value_t = 1 << 20)]
    pub max_value_size: usize,
    /// Deadline of every client request, in milliseconds.
    #[arg(long, env = "RAFTKV_REQUEST_TIMEOUT_MS", default_value_t = 5_000)]
    pub request_timeout_ms: u64,
    /// Length of one Raft tick, in milliseconds.
    #[arg(long, env = "RAFTKV_TICK_MS", default_value_t = 100, value_parser = clap::value_parser!(u64).range(1..))]
    pub tick_ms: u64,
    /// Ticks without hearing from a leader before an election.
    #[arg(long, env = "RAFTKV_ELECTION_TICKS", default_value_t = 10)]
    pub election_ticks: usize,
    /// Ticks between leader heartbeats.
    #[arg(long, env = "RAFTKV_HEARTBEAT_TICKS", default_value_t = 1)]
    pub heartbeat_ticks: usize,
    /// Largest lag, in entries, at which a learner may be promoted or a member reports ready.
    #[arg(long, env = "RAFTKV_MAX_LAG", default_value_t = 1_000)]
    pub max_lag: u64,
    /// Open client connections at most. At the cap, the connection idle longest is closed to
    /// make room; when every one is busy, a new one gets `503 too_many_connections`. Lowered
    /// to fit the open-file limit (raised to its hard limit at start) when that is smaller.
    #[arg(long, env = "RAFTKV_MAX_CONNECTIONS", default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(1..))]
    pub max_connections: u64,
    /// Open peer-port connections at most (peers' streams, forwarded admin calls).
    #[arg(long, env = "RAFTKV_PEER_MAX_CONNECTIONS", default_value_t = 1_024, value_parser = clap::value_parser!(u64).range(1..))]
    pub peer_max_connections: u64,
    /// Time a new connection has to send a complete request head, and an HTTP/1.1 connection
    /// each later one, in milliseconds; slower connections are closed.
    #[arg(long, env = "RAFTKV_HEADER_TIMEOUT_MS", default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(1..))]
    pub header_timeout_ms: u64,
    /// Time a connection may stay open with no request in flight after serving one, in
    /// milliseconds (an HTTP/1.1 connection waiting for its next request head is also bound by
    /// `--header-timeout-ms`).
    #[arg(long, env = "RAFTKV_IDLE_TIMEOUT_MS", default_value_t = 60_000, value_parser = clap::value_parser!(u64).range(1..))]
    pub idle_timeout_ms: u64,
    /// Time a request body may take to arrive, in milliseconds (`408 body_timeout` beyond).
    #[arg(long, env = "RAFTKV_BODY_TIMEOUT_MS", default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(1..))]
    pub body_timeout_ms: u64,
    /// Largest request head (request line and headers, or an h2 header list), in bytes;
    /// `431` beyond. At least 8192.
    #[arg(long, env = "RAFTKV_MAX_HEADER_BYTES", default_value_t = 65_536, value_parser = clap::value_parser!(u64).range(8192..=(1 << 24)))]
    pub max_header_bytes: u64,
    /// Concurrent h2 streams per connection (advertised to the client; more are refused with
    /// `REFUSED_STREAM`).
    #[arg(long, env = "RAFTKV_H2_MAX_STREAMS", default_value_t = 256, value_parser = clap::value_parser!(u32).range(1..))]
    pub h2_max_streams: u32,
    /// Longest lingering close, in milliseconds: after its last answer the member reads and
    /// discards what a client still sends, so that the client reads the answer.
    #[arg(long, env = "RAFTKV_LINGER_MS", default_value_t = 5_000)]
    pub linger_ms: u64,
    /// Client writes admitted and not yet answered, at most (`429 overloaded` beyond).
    #[arg(long, env = "RAFTKV_MAX_PENDING_WRITES", default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(1..))]
    pub max_pending_writes: u64,
    /// Key and value bytes of those writes, at most (`429 overloaded` beyond); values over
    /// 64 KiB may hold three quarters of it. Every write waits behind what is admitted before
    /// it, so this bounds latency as well as memory: at about 60 MB/s replicated, 12 MiB of
    /// large values ahead of a small write cost it some 200 ms.
    #[arg(long, env = "RAFTKV_MAX_PENDING_WRITE_BYTES", default_value_t = 16 << 20, value_parser = clap::value_parser!(u64).range(1..))]
    pub max_pending_write_bytes: u64,
    /// Linearizable reads waiting at once, at most (`429 overloaded` beyond).
    #[arg(long, env = "RAFTKV_MAX_PENDING_READS", default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(1..))]
    pub max_pending_reads: u64,
    /// Range listings built at once, at most, each page up to 4 MiB of keys and values
    /// (`429 overloaded` beyond).
    #[arg(long, env = "RAFTKV_MAX_CONCURRENT_LISTS", default_value_t = 16, value_parser = clap::value_parser!(u64).range(1..))]
    pub max_concurrent_lists: u64,
    /// Most changes the watch history retains; older ones are compacted (watches and reads at a
    /// revision start above the compact revision).
    #[arg(long, env = "RAFTKV_WATCH_HISTORY_CHANGES", default_value_t = crate::history::DEFAULT_MAX_CHANGES, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
    pub watch_history_changes: usize,
    /// Most bytes (keys, values and previous values) the watch history retains.
    #[arg(long, env = "RAFTKV_WATCH_HISTORY_BYTES", default_value_t = crate::history::DEFAULT_MAX_BYTES)]
    pub watch_history_bytes: usize,
    /// How often an idle watch stream gets a progress event, in milliseconds.
    #[arg(long, env = "RAFTKV_WATCH_PROGRESS_MS", default_value_t = 5_000, value_parser = clap::value_parser!(u64).range(10..))]
    pub watch_progress_ms: u64,
    /// Write the bound addresses as JSON to this file once listening (for scripts and tests that
    /// bind port 0).
    #[arg(long, env = "RAFTKV_ADDR_FILE")]
    pub addr_file: Option<PathBuf>,
    /// Where a fatal error's line is also written, for the supervisor to read: on Kubernetes
    /// the container's `terminationMessagePath` (`/dev/termination-log`), so that
    /// `kubectl describe pod` and the operator see why the node stopped.
    #[arg(long, env = "RAFTKV_TERMINATION_MESSAGE_PATH")]
    pub termination_message_path: Option<PathBuf>,
    /// Shut down, as on SIGTERM, once the process with this id is no longer the parent: `local`
    /// passes its own id so that its members never outlive it, however it ended.
    #[arg(long, hide = true)]
    pub stop_with_parent: Option<u32>,
    /// Certificate chain (PEM) of the client port: with `--client-key-file`, the client port
    /// serves TLS only (HTTP/2 through ALPN, and HTTP/1.1).
    #[arg(long, env = "RAFTKV_CLIENT_CERT_FILE", requires = "client_key_file")]
    pub client_cert_file: Option<PathBuf>,
    /// Private key (PEM) of `--client-cert-file`.
    #[arg(long, env = "RAFTKV_CLIENT_KEY_FILE", requires = "client_cert_file")]
    pub client_key_file: Option<PathBuf>,
    /// CA bundle (PEM) that client certificates must chain to. Turns authentication on: a
    /// client certificate's subject O is its role (`read`, `write`, `admin`), its CN its name.
    /// A client without a certificate may still present a token.
    #[arg(long, env = "RAFTKV_CLIENT_CA_FILE", requires = "client_cert_file")]
    pub client_ca_file: Option<PathBuf>,
    /// Certificate chain (PEM) of the peer port. With `--peer-key-file` and `--peer-ca-file`
    /// the peer port is mutual TLS both ways: the server and every outgoing peer connection
    /// present this certificate and require one chaining to the peer CA.
    #[arg(long, env = "RAFTKV_PEER_CERT_FILE", requires_all = ["peer_key_file", "peer_ca_file"])]
    pub peer_cert_file: Option<PathBuf>,
    /// Private key (PEM) of `--peer-cert-file`.
    #[arg(long, env = "RAFTKV_PEER_KEY_FILE", requires = "peer_cert_file")]
    pub peer_key_file: Option<PathBuf>,
    /// CA bundle (PEM) that peer certificates must chain to.
    #[arg(long, env = "RAFTKV_PEER_CA_FILE", requires = "peer_cert_file")]
    pub peer_ca_file: Option<PathBuf>,
    /// With peer TLS: a peer certificate must carry the URI SAN `urn:raftkv:cluster:NAME`;
    /// a certificate from the same CA issued to another cluster is refused.
    #[arg(long, env = "RAFTKV_PEER_CLUSTER_NAME", requires = "peer_cert_file", value_parser = parse_cluster_name)]
    pub peer_cluster_name: Option<String>,
    /// Bearer tokens, one per line: `<token> <role> [<name>]` with role `read`, `write` or
    /// `admin`; `#` starts a comment. Turns authentication on.
    #[arg(long, env = "RAFTKV_TOKEN_FILE")]
    pub token_file: Option<PathBuf>,
    /// With authentication on, protect `/healthz`, `/readyz` and `/metrics` too (any role may
    /// read them). Off by default so that kubelet's HTTP probes keep working.
    #[arg(long, env = "RAFTKV_AUTH_PROBES", default_value_t = false)]
    pub auth_probes: bool,
    /// How often certificate, key, CA and token files are checked for changes, in milliseconds.
    #[arg(long, env = "RAFTKV_RELOAD_INTERVAL_MS", default_value_t = 2_000, value_parser = clap::value_parser!(u64).range(10..))]
    pub reload_interval_ms: u64,
}

impl NodeConfig {
    /// How much watch history to retain.
    pub fn history_limits(&self) -> crate::history::HistoryLimits {
        crate::history::HistoryLimits {
            max_changes: self.watch_history_changes,
            max_bytes: self.watch_history_bytes,
        }
    }

    /// The request deadline.
    pub fn request_timeout(&self) -> Duration {
        Duration::from_millis(self.request_timeout_ms)
    }

    /// The client port's TLS files, when it serves TLS.
    pub fn client_tls_files(&self) -> Option<TlsFiles> {
        Some(TlsFiles {
            cert: self.client_cert_file.clone()?,
            key: self.client_key_file.clone()?,
            ca: self.client_ca_file.clone(),
        })
    }

    /// The peer port's TLS files, when peer TLS is on.
    pub fn peer_tls_files(&self) -> Option<TlsFiles> {
        Some(TlsFiles {
            cert: self.peer_cert_file.clone()?,
            key: self.peer_key_file.clone()?,
            ca: Some(self.peer_ca_file.clone()?),
        })
    }

    /// Whether requests must carry credentials (a client certificate or a token).
    pub fn auth_enabled(&self) -> bool {
        self.client_ca_file.is_some() || self.token_file.is_some()
    }

    /// How often reloadable files are checked.
    pub fn reload_interval(&self) -> Duration {
        Duration::from_millis(self.reload_interval_ms)
    }
}

/// A cluster name as it goes into `urn:raftkv:cluster:NAME`: Kubernetes-name characters only.
fn parse_cluster_name(s: &str) -> Result<String, String> {
    let ok = !s.is_empty()
        && s.len() <= 253
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.' || b == b'_');
    if ok {
        Ok(s.to_string())
    } else {
        Err(format!("{s:?} is not a cluster name (letters, digits, '-', '.', '_')"))
    }
}

/// A static initial cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InitialCluster(pub Vec<(u64, String)>);

impl InitialCluster {
    /// The cluster id every initial member derives identically from the member list.
    pub fn cluster_id(&self) -> u64 {
        let mut members = self.0.clone();
        members.sort();
        let text: String = members.iter().map(|(id, url)| format!("{id}={url},")).collect();
        // FNV-1a: a stable, dependency-free hash; ids only need to differ between clusters.
        let hash = text.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
            (h ^ b as u64).wrapping_mul(0x0100_0000_01b3)
        });
        (hash & MAX_MEMBER_ID).max(1)
    }
}

/// Parses `1=http://a:1,2=http://b:2` (`https://` with peer TLS).
pub fn parse_initial_cluster(s: &str) -> Result<InitialCluster, String> {
    let mut out: Vec<(u64, String)> = Vec::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (id, url) = part.split_once('=').ok_or_else(|| format!("{part:?} is not id=url"))?;
        let id: u64 = id
            .trim()
            .parse()
            .ok()
            .filter(|id| *id >= 1 && *id <= MAX_MEMBER_ID)
            .ok_or_else(|| format!("{id:?} is not a member id (1 to {MAX_MEMBER_ID})"))?;
        let url = url.trim();
        if !url.starts_with("http://") && !url.starts_with("https://") {
            return Err(format!("peer URL {url:?} must start with http:// or https://"));
        }
        if out.iter().any(|(other, _)| *other == id) {
            return Err(format!("member id {id} appears twice"));
        }
        out.push((id, url.to_string()));
    }
    if out.is_empty() {
        return Err("the initial cluster is empty".into());
    }
    Ok(InitialCluster(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn initial_cluster_parses_and_derives_one_id_regardless_of_order() {
        let a = parse_initial_cluster("1=http://127.0.0.1:9001,2=http://127.0.0.1:9002").unwrap();
        let b = parse_initial_cluster("2=http://127.0.0.1:9002, 1=http://127.0.0.1:9001").unwrap();
        assert_eq!(a.0.len(), 2);
        assert_eq!(a.cluster_id(), b.cluster_id());
        let c = parse_initial_cluster("1=http://127.0.0.1:9001").unwrap();
        assert_ne!(a.cluster_id(), c.cluster_id());
        for bad in [
            "",
            "x=http://a",
            "1=ftp://a",
            "1=http://a,1=http://b",
            "0=http://a",
            "1",
        ] {
            assert!(parse_initial_cluster(bad).is_err(), "{bad:?} accepted");
        }
    }
}
