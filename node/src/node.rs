//! Starting and stopping one member: recovery from the data directory (identity, latest
//! snapshot, write-ahead log replayed on top), static bootstrap, the two listeners, and the tasks
//! joined by channels in etcd raftexample's shape: consensus thread, state machine, servers.

use std::net::SocketAddr;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::routing::post;
use axum::Router;
use raft::prelude::SnapshotMetadata;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use crate::api::{self, ApiContext, Limits};
use crate::config::NodeConfig;
use crate::consensus::{self, Consensus, Recovered, Tuning};
use crate::error::{Error, IoContext, Result};
use crate::identity;
use crate::inbox::{RaftInput, RaftStatus, Role};
use crate::kv::{KvState, MemberRole};
use crate::metrics::Metrics;
use crate::server::{self, ServerLimits};
use crate::snapshot::SnapshotStore;
use crate::state_machine::{Shared, StateMachine};
use crate::tls::{self, PeerClient};
use crate::transport::{self, Transport, TransportContext};
use crate::wal::{Wal, WalOptions};

/// Inputs queued for the consensus thread before senders wait.
const INBOX_CAPACITY: usize = 65_536;

/// A running member.
pub struct RunningNode {
    /// The member id.
    pub id: u64,
    /// The bound client address.
    pub client_addr: SocketAddr,
    /// The bound peer address.
    pub peer_addr: SocketAddr,
    shutdown: CancellationToken,
    inbox: flume::Sender<RaftInput>,
    consensus: tokio::task::JoinHandle<Result<()>>,
    /// The apply loop. It ends on its own only when it cannot go on (a snapshot it cannot
    /// restore): the member would then vote and replicate without ever applying, so that
    /// stops the whole member.
    state_machine: tokio::task::JoinHandle<Result<()>>,
    tasks: Vec<tokio::task::JoinHandle<Result<()>>>,
}

impl RunningNode {
    /// Waits until the consensus thread or the state machine stops on its own (a fatal storage
    /// error) or `stop` fires.
    pub async fn run_until(mut self, stop: impl std::future::Future<Output = ()>) -> Result<()> {
        // The consensus thread ended, or the state machine ended cleanly because the apply
        // channel closed, which means consensus is ending: either way its result says why (a
        // failed WAL write, say).
        let consensus = tokio::select! {
            r = &mut self.consensus => {
                self.shutdown.cancel();
                let _ = self.state_machine.await;
                r
            }
            r = &mut self.state_machine => match r {
                Ok(Ok(())) => {
                    self.shutdown.cancel();
                    self.consensus.await
                }
                Ok(Err(e)) => return self.stop_after_state_machine_failed(e).await,
                Err(e) => {
                    let error = Error::Task(format!("state machine task: {e}"));
                    return self.stop_after_state_machine_failed(error).await;
                }
            },
            _ = stop => return self.shutdown().await,
        };
        for t in self.tasks {
            let _ = t.await;
        }
        consensus.map_err(|e| Error::Task(format!("consensus thread: {e}")))?
    }

    /// The state machine failed while consensus runs on: stops the member and returns `error`.
    async fn stop_after_state_machine_failed(self, error: Error) -> Result<()> {
        tracing::error!(member_id = self.id, %error, "state machine failed; stopping the member");
        self.shutdown.cancel();
        let _ = self.inbox.send_async(RaftInput::Shutdown).await;
        let _ = self.consensus.await;
        for t in self.tasks {
            let _ = t.await;
        }
        Err(error)
    }

    /// Stops accepting requests, stops consensus (syncing the WAL), and waits for every task.
    pub async fn shutdown(self) -> Result<()> {
        tracing::info!(member_id = self.id, "shutting down");
        self.shutdown.cancel();
        let _ = self.inbox.send_async(RaftInput::Shutdown).await;
        let result = self
            .consensus
            .await
            .map_err(|e| Error::Task(format!("consensus thread: {e}")))?;
        match self.state_machine.await {
            Ok(Err(e)) => tracing::warn!(error = %e, "state machine ended with an error"),
            Err(e) => tracing::warn!(error = %e, "state machine panicked"),
            Ok(Ok(())) => {}
        }
        for t in self.tasks {
            match t.await {
                Ok(Err(e)) => tracing::warn!(error = %e, "task ended with an error"),
                Err(e) => tracing::warn!(error = %e, "task panicked"),
                Ok(Ok(())) => {}
            }
        }
        result
    }
}

/// Recovers the member from its data directory and starts it.
pub async fn start(cfg: NodeConfig) -> Result<RunningNode> {
    let started = Instant::now();
    let client =
        server::bind_listener(cfg.client_addr).io_context(|| format!("bind client address {}", cfg.client_addr))?;
    let peer = server::bind_listener(cfg.peer_addr).io_context(|| format!("bind peer address {}", cfg.peer_addr))?;
    let client_addr = client.local_addr().io_context(|| "client address".into())?;
    let peer_addr = peer.local_addr().io_context(|| "peer address".into())?;
    // Certificates are read before anything else starts: a missing or broken file is a
    // configuration error at start-up, not a port that fails every handshake.
    let tls_cfg = cfg.clone();
    let (client_tls, peer_tls, tokens) = tokio::task::spawn_blocking(move || -> Result<_> {
        let client = tls_cfg.client_tls_files().map(tls::load_client_port).transpose()?;
        let peer = tls_cfg
            .peer_tls_files()
            .map(|files| tls::load_peer(files, tls_cfg.peer_cluster_name.clone()))
            .transpose()?;
        let tokens = tls_cfg.token_file.clone().map(api::auth::load_tokens).transpose()?;
        Ok((client, peer, tokens))
    })
    .await
    .map_err(|e| Error::Task(format!("loading TLS files: {e}")))??;
    let scheme = if peer_tls.is_some() { "https" } else { "http" };
    let advertise_peer_url = cfg
        .advertise_peer_url
        .clone()
        .or_else(|| (!peer_addr.ip().is_unspecified()).then(|| format!("{scheme}://{peer_addr}")));
    let peer_client = PeerClient::new(peer_tls.clone());
    if cfg.auth_enabled() && peer_tls.is_none() {
        tracing::warn!(
            "authentication is on but the peer port is plaintext: anyone who reaches it can send Raft \
             messages; give it --peer-cert-file, --peer-key-file and --peer-ca-file"
        );
    }

    if let (Some(initial), Some(id)) = (&cfg.initial_cluster, cfg.id) {
        let joined = identity::peek(&cfg.data_dir)?.is_some_and(|i| i.cluster_id != 0);
        if !joined {
            refuse_if_bootstrapped_before(initial, id, &peer_client).await?;
        }
    }
    let recover_cfg = cfg.clone();
    let advertise = advertise_peer_url.clone();
    let (recovered, mut state) = tokio::task::spawn_blocking(move || recover(&recover_cfg, advertise))
        .await
        .map_err(|e| Error::Task(format!("recovery task: {e}")))??;
    state.history.set_limits(cfg.history_limits());
    let id = recovered.identity.id;
    tracing::info!(
        member_id = id,
        cluster_id = recovered.identity.cluster_id,
        snapshot_index = recovered.snapshot.index,
        wal_entries = recovered.entries.len(),
        keys = state.data.len(),
        elapsed_ms = started.elapsed().as_millis() as u64,
        "recovered from data directory"
    );

    let metrics = Arc::new(Metrics::new());
    metrics.snapshot_index.set(recovered.snapshot.index as i64);
    let shutdown = CancellationToken::new();
    let cluster_id = Arc::new(AtomicU64::new(recovered.identity.cluster_id));
    let (inbox_tx, inbox_rx) = flume::bounded(INBOX_CAPACITY);
    // Unbounded: the consensus thread must never block on the state machine. It stays small
    // because raft-rs caps the committed entries per ready and apply is an in-memory map update.
    let (apply_tx, apply_rx) = mpsc::unbounded_channel();
    let (status_tx, status_rx) = watch::channel(initial_status(id, &recovered));
    let shared = Shared::new(state);
    let snapshots = recovered.snapshots.clone();

    let transport_ctx = TransportContext {
        self_id: id,
        cluster_id: cluster_id.clone(),
        inbox: inbox_tx.clone(),
        snapshots: snapshots.clone(),
        shutdown: shutdown.clone(),
        removed: Default::default(),
        advertise_url: advertise_peer_url.clone(),
        peer_client: peer_client.clone(),
    };
    // The consensus thread's own runtime: the consensus loop and both sides of the peer
    // transport run on it (see `consensus`), built here so the transport can spawn onto it.
    let consensus_runtime = ConsensusRuntime(Some(
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .io_context(|| "build the consensus runtime".into())?,
    ));
    let transport = Transport::new(transport_ctx.clone(), consensus_runtime.handle());
    let tuning = Tuning {
        tick: std::time::Duration::from_millis(cfg.tick_ms),
        election_ticks: cfg.election_ticks,
        heartbeat_ticks: cfg.heartbeat_ticks,
        snapshot_catchup_entries: cfg.snapshot_catchup_entries,
        max_promote_lag: cfg.max_lag,
    };
    let consensus = Consensus::new(
        recovered,
        transport,
        inbox_rx,
        apply_tx,
        status_tx,
        cluster_id,
        metrics.clone(),
        tuning,
    )?;

    let state_machine = StateMachine {
        shared: shared.clone(),
        snapshots,
        snapshot_count: cfg.snapshot_count,
        raft_inbox: inbox_tx.clone(),
        metrics: metrics.clone(),
        history_limits: cfg.history_limits(),
    };
    let state_machine = tokio::spawn(state_machine.run(apply_rx));
    let mut tasks = Vec::new();

    let api_state = ApiContext::new(
        shared,
        inbox_tx.clone(),
        status_rx,
        metrics.clone(),
        Limits {
            max_value_size: cfg.max_value_size,
            request_timeout: cfg.request_timeout(),
            body_timeout: Duration::from_millis(cfg.body_timeout_ms),
            max_ready_lag: cfg.max_lag,
            max_pending_writes: cfg.max_pending_writes,
            max_pending_write_bytes: cfg.max_pending_write_bytes,
            max_pending_reads: cfg.max_pending_reads,
            max_concurrent_lists: cfg.max_concurrent_lists,
            watch_progress: Duration::from_millis(cfg.watch_progress_ms),
        },
        api::PeerSide {
            advertise_url: advertise_peer_url,
            client: peer_client,
        },
        shutdown.clone(),
    );
    let auth = api::auth::Auth {
        enabled: cfg.auth_enabled(),
        tokens: tokens.clone(),
        protect_probes: cfg.auth_probes,
    };
    let client_router = api::client_router(api_state.clone(), auth.clone());
    let peer_admin = api::admin_routes()
        .layer(axum::middleware::from_fn_with_state(auth, api::auth::authorize_peer))
        .with_state(api_state);
    let peer_router = Router::new()
        .route("/raft/stream", post(transport::receive_stream))
        .route("/raft/snapshot", post(transport::receive_snapshot))
        .with_state(transport_ctx)
        .merge(peer_admin);
    let client_source = client_tls
        .clone()
        .map(|t| -> server::TlsSource { Arc::new(move || (*t.get()).clone()) });
    let peer_source = peer_tls
        .clone()
        .map(|t| -> server::TlsSource { Arc::new(move || t.get().server.clone()) });
    let (client_cap, peer_cap) = fit_caps(cfg.max_connections, cfg.peer_max_connections);
    let limits = |max_connections| ServerLimits {
        max_connections,
        header_timeout: Duration::from_millis(cfg.header_timeout_ms),
        idle_timeout: Duration::from_millis(cfg.idle_timeout_ms),
        max_header_bytes: cfg.max_header_bytes as usize,
        h2_max_streams: cfg.h2_max_streams,
        linger: Duration::from_millis(cfg.linger_ms),
    };
    tasks.push(tokio::spawn(server::serve(
        client,
        client_router,
        limits(client_cap),
        client_source,
        metrics.clone(),
        shutdown.clone(),
        "client",
    )));
    let peer_server = server::serve(
        peer_listener_for(peer, consensus_runtime.get())?,
        peer_router,
        limits(peer_cap),
        peer_source,
        metrics.clone(),
        shutdown.clone(),
        "peer",
    );
    let (consensus, consensus_thread) = spawn_consensus_thread(consensus_runtime, consensus, peer_server)?;
    tasks.push(consensus_thread);
    let mut reloadable: Vec<Arc<dyn tls::Reload>> = Vec::new();
    reloadable.extend(client_tls.map(|t| t as Arc<dyn tls::Reload>));
    reloadable.extend(peer_tls.map(|t| t as Arc<dyn tls::Reload>));
    reloadable.extend(tokens.map(|t| t as Arc<dyn tls::Reload>));
    tasks.push(tokio::spawn(tls::watch(
        reloadable,
        cfg.reload_interval(),
        shutdown.clone(),
    )));
    if let Some(path) = &cfg.addr_file {
        /// What `--addr-file` holds: who listens where, for a launcher that bound port 0.
        #[derive(serde::Serialize)]
        struct Listening {
            id: u64,
            client: std::net::SocketAddr,
            peer: std::net::SocketAddr,
        }
        let body = serde_json::to_vec(&Listening {
            id,
            client: client_addr,
            peer: peer_addr,
        })
        .map_err(|e| Error::Codec(e.to_string()))?;
        identity::write_atomically(path, &body)?;
    }
    tracing::info!(
        member_id = id,
        %client_addr,
        %peer_addr,
        client_tls = cfg.client_tls_files().is_some(),
        peer_tls = cfg.peer_tls_files().is_some(),
        auth = cfg.auth_enabled(),
        "serving"
    );
    Ok(RunningNode {
        id,
        client_addr,
        peer_addr,
        shutdown,
        inbox: inbox_tx,
        consensus,
        state_machine,
        tasks,
    })
}

/// The consensus thread's runtime until the thread takes it. Should `start` fail before that, it
/// is dropped inside the async caller, where dropping a runtime panics; it shuts down in the
/// background instead, so the error reaches the user as one line.
struct ConsensusRuntime(Option<tokio::runtime::Runtime>);

impl ConsensusRuntime {
    fn get(&self) -> &tokio::runtime::Runtime {
        self.0.as_ref().expect("taken only by spawn_consensus_thread")
    }

    fn handle(&self) -> tokio::runtime::Handle {
        self.get().handle().clone()
    }
}

impl Drop for ConsensusRuntime {
    fn drop(&mut self) {
        if let Some(runtime) = self.0.take() {
            runtime.shutdown_background();
        }
    }
}

/// A part of the member that ends with a result.
type MemberTask = tokio::task::JoinHandle<Result<()>>;

/// Moves the peer listener, bound on the main runtime, onto the consensus thread's runtime.
fn peer_listener_for(peer: TcpListener, runtime: &tokio::runtime::Runtime) -> Result<TcpListener> {
    let std_listener = peer.into_std().io_context(|| "peer listener".into())?;
    let _entered = runtime.enter();
    TcpListener::from_std(std_listener).io_context(|| "peer listener".into())
}

/// Starts the consensus thread: `runtime` drives the consensus loop and the peer port's server.
/// Returns a handle that ends with the loop's result, and one that ends when the thread is gone
/// (the peer port closed, every peer stream ended), which shutdown waits for.
fn spawn_consensus_thread(
    mut runtime: ConsensusRuntime,
    consensus: Consensus,
    peer_server: impl std::future::Future<Output = Result<()>> + Send + 'static,
) -> Result<(MemberTask, MemberTask)> {
    let (result_tx, result_rx) = tokio::sync::oneshot::channel();
    let (gone_tx, gone_rx) = tokio::sync::oneshot::channel();
    let runtime = runtime.0.take().expect("taken once");
    std::thread::Builder::new()
        .name("raftkv-consensus".into())
        .spawn(move || {
            let served = runtime.block_on(async move {
                let peer_server = tokio::spawn(peer_server);
                let _ = result_tx.send(consensus.run().await);
                // The peer port closes once shutdown is cancelled, which the owner of the
                // member does when it learns that the loop ended.
                match peer_server.await {
                    Ok(served) => served,
                    Err(e) => Err(Error::Task(format!("peer server: {e}"))),
                }
            });
            // Whatever is left on the runtime (a peer stream, a lingering connection) ends here.
            drop(runtime);
            let _ = gone_tx.send(served);
        })
        .io_context(|| "start the consensus thread".into())?;
    let ended = |what: &'static str| Error::Task(format!("{what} ended without a result (it panicked)"));
    let result = tokio::spawn(async move { result_rx.await.unwrap_or_else(|_| Err(ended("the consensus loop"))) });
    let gone = tokio::spawn(async move { gone_rx.await.unwrap_or_else(|_| Err(ended("the consensus thread"))) });
    Ok((result, gone))
}

/// Fits both ports' connection caps into the open-file limit, the client port getting what
/// the peer port leaves.
fn fit_caps(client: u64, peer: u64) -> (usize, usize) {
    let (client, peer) = (client as usize, peer as usize);
    let fitted = server::fit_connection_caps(client + peer);
    if fitted >= client + peer {
        return (client, peer);
    }
    let peer = peer.min(fitted / 2).max(1);
    (fitted.saturating_sub(peer).max(1), peer)
}

/// How long each initial member is given to answer before a static bootstrap.
const BOOTSTRAP_PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// Before a static bootstrap writes the cluster's initial state on an empty data directory:
/// asks the other initial members whether this member already took part in their cluster. A
/// member that lost its volume must not come back as a voter that forgot what it acknowledged
/// (it could elect a leader missing acknowledged writes); it must be removed and added again
/// under a new id. As etcd does, the check is best effort: members that do not answer (the
/// usual case when a new cluster starts all at once) do not hold the bootstrap back.
async fn refuse_if_bootstrapped_before(
    initial: &crate::config::InitialCluster,
    id: u64,
    client: &PeerClient,
) -> Result<()> {
    let cluster_id = initial.cluster_id();
    for (peer, url) in initial.0.iter().filter(|(peer, _)| *peer != id) {
        let Ok(uri) = format!("{}/v1/members", url.trim_end_matches('/')).parse::<hyper::Uri>() else {
            continue;
        };
        let answer = tokio::time::timeout(BOOTSTRAP_PROBE_TIMEOUT, async {
            let req = hyper::Request::get(uri)
                .body(http_body_util::Empty::<bytes::Bytes>::new())
                .ok()?;
            let resp = client.request(req).await.ok()?;
            let body = http_body_util::BodyExt::collect(resp.into_body())
                .await
                .ok()?
                .to_bytes();
            serde_json::from_slice::<serde_json::Value>(&body).ok()
        })
        .await;
        let Ok(Some(members)) = answer else { continue };
        if members["cluster_id"].as_u64() != Some(cluster_id) {
            continue;
        }
        // The initial state is index 1: a match beyond it means this member once held entries
        // of this cluster, which its empty data directory no longer has.
        let acknowledged = members["members"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|m| m["id"].as_u64() == Some(id))
            .filter_map(|m| m["match_index"].as_u64())
            .max()
            .unwrap_or(0);
        if acknowledged > 1 {
            return Err(Error::Config(format!(
                "member {id} of cluster {cluster_id} has an empty data directory, but member {peer} reports it \
                 once acknowledged the log up to index {acknowledged}: its data was lost. Remove it \
                 (DELETE /v1/members/{id}) and add it back under a new id with an empty data directory"
            )));
        }
    }
    Ok(())
}

fn initial_status(id: u64, r: &Recovered) -> RaftStatus {
    RaftStatus {
        id,
        cluster_id: r.identity.cluster_id,
        role: if r.snapshot.index == 0 {
            Role::Uninitialized
        } else {
            Role::Follower
        },
        membership: r.membership.role_of(id),
        term: r.hard_state.term,
        leader_id: 0,
        commit_index: r.hard_state.commit,
        leader_commit: 0,
        last_index: r.entries.last().map_or(r.snapshot.index, |e| e.index),
        snapshot_index: r.snapshot.index,
        progress: Default::default(),
        members: r.membership.clone(),
    }
}

/// Reads everything the data directory holds: identity, the WAL, and the snapshot the WAL names
/// as current. Bootstraps a static cluster on first start.
fn recover(cfg: &NodeConfig, advertise_peer_url: Option<String>) -> Result<(Recovered, KvState)> {
    let data_dir = cfg.data_dir.clone();
    let requested_id = cfg.id.or_else(|| cfg.initial_cluster.as_ref().map(|_| 0));
    if requested_id == Some(0) {
        return Err(Error::Config("--initial-cluster needs --id".into()));
    }
    crate::restore::refuse_interrupted(&data_dir)?;
    let mut identity = identity::load_or_create(&data_dir, cfg.id)?;
    let snapshots = SnapshotStore::open(&data_dir.join("snap"))?;
    let wal_options = WalOptions {
        segment_size: cfg.wal_segment_bytes,
    };
    let (mut wal, mut log) = Wal::open(&data_dir.join("wal"), wal_options.clone())?;
    if let Some((path, offset)) = &log.truncated_tail {
        tracing::warn!(path = %path.display(), offset, "truncated a torn write at the end of the write-ahead log");
    }
    if log.snapshots.is_empty() {
        if let Some(initial) = &cfg.initial_cluster {
            if !initial.0.iter().any(|(id, _)| *id == identity.id) {
                return Err(Error::Config(format!(
                    "--id {} is not in --initial-cluster",
                    identity.id
                )));
            }
            let cluster_id = initial.cluster_id();
            consensus::write_initial_snapshot(&snapshots, &mut wal, cluster_id, &initial.0)?;
            identity.cluster_id = cluster_id;
            identity::store(&data_dir, &identity)?;
            tracing::info!(
                member_id = identity.id,
                cluster_id,
                members = initial.0.len(),
                "bootstrapped a static cluster"
            );
            let (reopened, again) = {
                drop(wal);
                Wal::open(&data_dir.join("wal"), wal_options.clone())?
            };
            wal = reopened;
            log = again;
        }
    } else if cfg.initial_cluster.is_some() {
        tracing::info!("data directory already holds a cluster; --initial-cluster is ignored");
    }
    let (snapshot, state) = match log.snapshots.last() {
        None => (SnapshotMetadata::default(), KvState::default()),
        Some(&(index, term)) => {
            let state = snapshots.load(index, term)?;
            (crate::snapshot::metadata_of(&state), state)
        }
    };
    if state.cluster_id != 0 && identity.cluster_id != state.cluster_id {
        if identity.cluster_id != 0 {
            return Err(Error::Config(format!(
                "identity says cluster {} but the snapshot belongs to cluster {}",
                identity.cluster_id, state.cluster_id
            )));
        }
        identity.cluster_id = state.cluster_id;
        identity::store(&data_dir, &identity)?;
    }
    if state.membership.role_of(identity.id) == MemberRole::Removed {
        return Err(Error::Removed {
            id: identity.id,
            cluster_id: identity.cluster_id,
            index: state.applied_index,
            dir: data_dir,
        });
    }
    let entries: Vec<_> = log.entries.into_iter().filter(|e| e.index > snapshot.index).collect();
    let recovered = Recovered {
        identity,
        data_dir,
        advertise_peer_url,
        wal,
        snapshots,
        membership: state.membership.clone(),
        snapshot,
        hard_state: log.hard_state.unwrap_or_default(),
        entries,
    };
    Ok((recovered, state))
}
