//! `raftkv-node local`: a static cluster of real `raftkv-node` processes on 127.0.0.1, for trying
//! raftkv without Kubernetes. Each member is this same binary in its own process with its own data
//! directory; Ctrl-C stops them all gracefully. With `--tls` every port is TLS with throwaway
//! certificates made under the data directory, and authentication is on.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{bail, Context};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::signal::unix::{signal, SignalKind};

/// Prints a line for the user; a closed stdout (a pipe whose reader left) is not an error
/// worth stopping the cluster for.
macro_rules! say {
    ($($arg:tt)*) => {{
        use std::io::Write;
        let _ = writeln!(std::io::stdout(), $($arg)*);
    }};
}

/// Like `say!`, on stderr.
macro_rules! warn_user {
    ($($arg:tt)*) => {{
        use std::io::Write;
        let _ = writeln!(std::io::stderr(), $($arg)*);
    }};
}

/// Flags of the `local` subcommand.
#[derive(clap::Args, Debug, Clone)]
pub struct LocalArgs {
    /// Number of members.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u64).range(1..=9))]
    pub nodes: u64,
    /// Member i serves clients on base-port + i and peers on base-port + 100 + i.
    #[arg(long, default_value_t = 8080)]
    pub base_port: u16,
    /// Parent of the members' data directories (`node-1`, `node-2`, ...).
    #[arg(long, default_value = "./raftkv-data")]
    pub data_dir: PathBuf,
    /// Applied entries between snapshots, passed to every member.
    #[arg(long)]
    pub snapshot_count: Option<u64>,
    /// Serve TLS on every port with a throwaway CA made under `<data-dir>/tls` (kept for the
    /// next start), mutual TLS between members, and authentication: an admin client
    /// certificate and an admin token are made there too.
    #[arg(long)]
    pub tls: bool,
}

/// The files of `local --tls`, under `<data-dir>/tls`.
struct LocalPki {
    dir: PathBuf,
}

/// The cluster name in the local members' peer certificates.
const LOCAL_CLUSTER: &str = "local";

impl LocalPki {
    fn path(&self, file: &str) -> PathBuf {
        self.dir.join(file)
    }

    /// Makes the CA, each member's client and peer certificates, an admin client certificate
    /// and an admin token, unless an earlier start made them (the members' data is kept too,
    /// and stays with the CA that started it).
    fn ensure(dir: PathBuf, nodes: u64) -> anyhow::Result<LocalPki> {
        use crate::pki::{CertSpec, ThrowawayCa};
        let pki = LocalPki { dir };
        let wanted: Vec<PathBuf> = (1..=nodes)
            .flat_map(|i| [format!("node-{i}-peer.pem"), format!("node-{i}-client.pem")])
            .chain(["ca.pem".into(), "admin.pem".into(), "tokens".into()])
            .map(|f| pki.path(&f))
            .collect();
        if wanted.iter().all(|p| p.exists()) {
            return Ok(pki);
        }
        std::fs::create_dir_all(&pki.dir).with_context(|| format!("creating {}", pki.dir.display()))?;
        let write = |file: &str, contents: &str| -> anyhow::Result<()> {
            crate::identity::write_atomically(&pki.path(file), contents.as_bytes())?;
            Ok(())
        };
        // One CA for both ports: a client certificate is still no peer certificate, since the
        // peer port requires this cluster's URI SAN, which client certificates do not carry.
        let ca = ThrowawayCa::new("raftkv local CA")?;
        write("ca.pem", ca.cert_pem())?;
        let loopback = [std::net::IpAddr::from([127, 0, 0, 1])];
        for i in 1..=nodes {
            let name = format!("node-{i}");
            let peer = ca.issue(&CertSpec::member(&name, &loopback, Some(LOCAL_CLUSTER)))?;
            write(&format!("{name}-peer.pem"), &peer.cert_pem)?;
            write(&format!("{name}-peer-key.pem"), &peer.key_pem)?;
            let client = ca.issue(&CertSpec::member(&name, &loopback, None))?;
            write(&format!("{name}-client.pem"), &client.cert_pem)?;
            write(&format!("{name}-client-key.pem"), &client.key_pem)?;
        }
        let admin = ca.issue(&CertSpec::client("admin", "admin"))?;
        write("admin.pem", &admin.cert_pem)?;
        write("admin-key.pem", &admin.key_pem)?;
        let token: String = (0..32).map(|_| format!("{:x}", rand::random::<u8>() & 0xf)).collect();
        write("admin.token", &token)?;
        write(
            "tokens",
            &format!("# <token> <role> [<name>]: read, write or admin\n{token} admin local-admin\n"),
        )?;
        Ok(pki)
    }

    /// The flags of member `i`.
    fn member_flags(&self, i: u64) -> Vec<std::ffi::OsString> {
        let mut flags = Vec::new();
        for (flag, file) in [
            ("--client-cert-file", format!("node-{i}-client.pem")),
            ("--client-key-file", format!("node-{i}-client-key.pem")),
            ("--client-ca-file", "ca.pem".into()),
            ("--peer-cert-file", format!("node-{i}-peer.pem")),
            ("--peer-key-file", format!("node-{i}-peer-key.pem")),
            ("--peer-ca-file", "ca.pem".into()),
            ("--token-file", "tokens".into()),
        ] {
            flags.push(flag.into());
            flags.push(self.path(&file).into_os_string());
        }
        flags.push("--peer-cluster-name".into());
        flags.push(LOCAL_CLUSTER.into());
        flags
    }

    /// A client presenting the admin certificate, for the launcher's own status polls.
    fn admin_client(&self) -> anyhow::Result<crate::tls::PeerClient> {
        let read = |f: &str| std::fs::read(self.path(f)).with_context(|| format!("reading {}", self.path(f).display()));
        let config = crate::tls::client_config(&read("ca.pem")?, &read("admin.pem")?, &read("admin-key.pem")?)?;
        Ok(crate::tls::PeerClient::with_config(config))
    }
}

/// Starts the members, prints their URLs, and stops them on Ctrl-C or when one exits.
pub async fn run(args: LocalArgs) -> anyhow::Result<()> {
    let exe = std::env::current_exe().context("locating the raftkv-node binary")?;
    let port = |offset: u64| -> anyhow::Result<u16> {
        u16::try_from(args.base_port as u64 + offset).context("--base-port leaves no room for the members' ports")
    };
    let mut members = Vec::new();
    for i in 1..=args.nodes {
        members.push((i, port(i)?, port(100 + i)?));
    }
    let scheme = if args.tls { "https" } else { "http" };
    let initial: Vec<String> = members
        .iter()
        .map(|(i, _, peer)| format!("{i}={scheme}://127.0.0.1:{peer}"))
        .collect();
    let initial = initial.join(",");
    refuse_partial_data(&args.data_dir, args.nodes)?;
    let pki = if args.tls {
        let (dir, nodes) = (args.data_dir.join("tls"), args.nodes);
        Some(tokio::task::spawn_blocking(move || LocalPki::ensure(dir, nodes)).await??)
    } else {
        None
    };
    let mut children: Vec<(u64, Child)> = Vec::new();
    for &(i, client, peer) in &members {
        let dir = args.data_dir.join(format!("node-{i}"));
        let mut cmd = Command::new(&exe);
        cmd.arg("--id")
            .arg(i.to_string())
            .arg("--data-dir")
            .arg(&dir)
            .arg("--client-addr")
            .arg(format!("127.0.0.1:{client}"))
            .arg("--peer-addr")
            .arg(format!("127.0.0.1:{peer}"))
            .arg("--initial-cluster")
            .arg(&initial)
            .arg("--stop-with-parent")
            .arg(std::process::id().to_string())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        if let Some(n) = args.snapshot_count {
            cmd.arg("--snapshot-count").arg(n.to_string());
        }
        if let Some(pki) = &pki {
            cmd.args(pki.member_flags(i));
        }
        let mut child = cmd.spawn().with_context(|| format!("starting member {i}"))?;
        for stream in [child.stdout.take().map(boxed), child.stderr.take().map(boxed)]
            .into_iter()
            .flatten()
        {
            tokio::spawn(async move {
                let mut lines = BufReader::new(stream).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    warn_user!("[node {i}] {line}");
                }
            });
        }
        children.push((i, child));
    }
    let urls: Vec<String> = members
        .iter()
        .map(|(_, c, _)| format!("{scheme}://127.0.0.1:{c}"))
        .collect();
    let client = match &pki {
        Some(pki) => pki.admin_client()?,
        None => crate::tls::PeerClient::default(),
    };
    match wait_for_leader(&client, &urls, Duration::from_secs(30)).await {
        Ok(leader) => {
            say!(
                "raftkv local cluster of {} members is up (leader: member {leader})",
                args.nodes
            );
            for ((i, _, _), url) in members.iter().zip(&urls) {
                say!(
                    "  member {i}: {url}   data: {}",
                    args.data_dir.join(format!("node-{i}")).display()
                );
            }
            match &pki {
                None => {
                    say!("try:  curl -X PUT {}/v1/kv/greeting -d hello", urls[0]);
                    say!("      curl {}/v1/kv/greeting", urls[urls.len() - 1]);
                }
                Some(pki) => {
                    let ca = pki.path("ca.pem");
                    say!(
                        "TLS and authentication are on; certificates, keys and tokens are in {}",
                        pki.dir.display()
                    );
                    say!(
                        "try:  curl --cacert {} --cert {} --key {} -X PUT {}/v1/kv/greeting -d hello",
                        ca.display(),
                        pki.path("admin.pem").display(),
                        pki.path("admin-key.pem").display(),
                        urls[0]
                    );
                    say!(
                        "      curl --cacert {} -H \"Authorization: Bearer $(cat {})\" {}/v1/kv/greeting",
                        ca.display(),
                        pki.path("admin.token").display(),
                        urls[urls.len() - 1]
                    );
                }
            }
            say!("Ctrl-C stops every member.");
        }
        Err(e) => warn_user!("warning: {e:#}"),
    }
    let exited = wait_any_exit(&mut children);
    // Ctrl-C, `kill`, `timeout` and a closed terminal all stop the members the same way; should
    // this process die without a chance to (SIGKILL), the members notice their parent is gone.
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut hangup = signal(SignalKind::hangup()).context("installing the SIGHUP handler")?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => say!("stopping..."),
        _ = term.recv() => say!("SIGTERM: stopping..."),
        _ = hangup.recv() => say!("SIGHUP: stopping..."),
        (i, status) = exited => warn_user!("member {i} exited ({status}); stopping the others"),
    }
    stop_all(&mut children).await;
    Ok(())
}

fn boxed<R: tokio::io::AsyncRead + Send + Unpin + 'static>(r: R) -> Box<dyn tokio::io::AsyncRead + Send + Unpin> {
    Box::new(r)
}

async fn wait_any_exit(children: &mut [(u64, Child)]) -> (u64, String) {
    let waits = children.iter_mut().map(|(i, c)| {
        let i = *i;
        Box::pin(async move {
            let status = c.wait().await.map(|s| s.to_string()).unwrap_or_else(|e| e.to_string());
            (i, status)
        })
    });
    futures::future::select_all(waits).await.0
}

async fn stop_all(children: &mut [(u64, Child)]) {
    for (_, child) in children.iter() {
        if let Some(pid) = child.id() {
            let _ = kill(Pid::from_raw(pid as i32), Signal::SIGTERM);
        }
    }
    for (i, child) in children.iter_mut() {
        if tokio::time::timeout(Duration::from_secs(10), child.wait())
            .await
            .is_err()
        {
            warn_user!("member {i} did not stop within 10 s; killing it");
            let _ = child.kill().await;
        }
    }
}

/// A local cluster starts all its members at once, so a member whose directory was deleted
/// would bootstrap again before the others could tell it that it lost its data (see
/// `node::refuse_if_bootstrapped_before`), and rejoin as a voter with an empty log. Either
/// every member has its data or none has.
fn refuse_partial_data(data_dir: &std::path::Path, nodes: u64) -> anyhow::Result<()> {
    let mut with_data = Vec::new();
    let mut without = Vec::new();
    for i in 1..=nodes {
        let dir = data_dir.join(format!("node-{i}"));
        match crate::identity::peek(&dir)? {
            Some(identity) if identity.cluster_id != 0 => with_data.push(i),
            _ => without.push(i),
        }
    }
    if !with_data.is_empty() && !without.is_empty() {
        bail!(
            "members {with_data:?} have data under {} but members {without:?} have none: a member \
             that lost its data cannot rejoin as the same voter. Restore their directories, or \
             remove {} to start a new cluster",
            data_dir.display(),
            data_dir.display()
        );
    }
    Ok(())
}

async fn wait_for_leader(client: &crate::tls::PeerClient, urls: &[String], within: Duration) -> anyhow::Result<u64> {
    let deadline = tokio::time::Instant::now() + within;
    let mut poll = tokio::time::interval(Duration::from_millis(100));
    loop {
        poll.tick().await;
        for url in urls {
            let Ok(uri) = format!("{url}/v1/status").parse::<hyper::Uri>() else {
                continue;
            };
            let Ok(req) = hyper::Request::get(uri).body(http_body_util::Empty::<bytes::Bytes>::new()) else {
                continue;
            };
            if let Ok(Ok(resp)) = tokio::time::timeout(Duration::from_secs(1), client.request(req)).await {
                use http_body_util::BodyExt;
                if let Ok(body) = resp.into_body().collect().await {
                    let status: serde_json::Value = serde_json::from_slice(&body.to_bytes()).unwrap_or_default();
                    if let Some(leader) = status["leader_id"].as_u64().filter(|l| *l != 0) {
                        return Ok(leader);
                    }
                }
            }
        }
        if tokio::time::Instant::now() >= deadline {
            bail!("no leader was elected within {within:?}; the members' logs above say why");
        }
    }
}
