//! `raftkv-node`: run one member, or (`raftkv-node local`) a local cluster of members.

use std::path::Path;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use raftkv_node::config::NodeConfig;
use raftkv_node::local::{self, LocalArgs};
use raftkv_node::restore::{self, RestoreArgs};
use tracing_subscriber::EnvFilter;

/// mimalloc rather than glibc's malloc: a write allocates and frees many small buffers across
/// threads (HTTP bodies, Raft entries and messages, postcard and protobuf encodings), and glibc's
/// arenas spent about 13% of the members' CPU at 64 connections on it.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser, Debug)]
#[command(
    name = "raftkv-node",
    version,
    about = "One member of a raftkv cluster",
    args_conflicts_with_subcommands = true
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    node: NodeConfig,
    /// Log format: text or json.
    #[arg(long, env = "RAFTKV_LOG_FORMAT", default_value = "text", global = true)]
    log_format: String,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run a local cluster of real member processes on 127.0.0.1.
    Local(LocalArgs),
    /// Seed an empty data directory from a backup (`GET /v1/snapshot`) as the single member of
    /// a new cluster. `--from` also takes an object URL (`s3://`, `gs://`, `az://`, `file://`),
    /// reached with the `AWS_*`, `GOOGLE_*` or `AZURE_*` settings of the environment.
    Restore(RestoreCommand),
}

/// `restore`, plus where an object URL's download goes.
#[derive(clap::Args, Debug)]
struct RestoreCommand {
    #[command(flatten)]
    args: RestoreArgs,
    /// Where a backup named by an object URL is downloaded to before it is restored (default:
    /// the data directory's parent). The download is checked, restored from, then deleted.
    #[arg(long, env = "RAFTKV_RESTORE_SCRATCH_DIR")]
    scratch_dir: Option<std::path::PathBuf>,
    /// Restore only in the pod of this name (compared with `POD_NAME`) and do nothing in any
    /// other: a StatefulSet gives every pod the same init container, and only the first pod of
    /// a restoring cluster is seeded; the others join it.
    #[arg(long, env = "RAFTKV_RESTORE_ONLY_POD")]
    only_pod: Option<String>,
}

/// Downloads the backup an object URL names into `scratch_dir` (checking its trailer as it
/// streams), so that the restore reads a local file as for any other backup.
async fn download_backup(url: &str, scratch_dir: &std::path::Path) -> anyhow::Result<tempfile::TempPath> {
    use anyhow::Context;
    let (dir, name) = raftkv_backup::destination::split_object_url(url)?;
    let dest = raftkv_backup::Destination::open_from_env(dir)?;
    let file = tempfile::Builder::new()
        .prefix(".raftkv-restore-")
        .tempfile_in(scratch_dir)
        .with_context(|| format!("creating a download file in {}", scratch_dir.display()))?
        .into_temp_path();
    // The download creates the file itself (and removes it on failure).
    std::fs::remove_file(&file).with_context(|| format!("preparing {}", file.display()))?;
    let size = raftkv_backup::transfer::download_snapshot(&dest, name, &file).await?;
    tracing::info!(from = url, size, file = %file.display(), "backup downloaded");
    Ok(file)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let termination_log = cli.node.termination_message_path.clone();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(error) => return fatal(&anyhow::Error::new(error).context("starting the async runtime"), None),
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => fatal(&error, termination_log.as_deref()),
    }
}

/// Reports a fatal error as one line, `raftkv-node: fatal [code]: what: why: ...`, on stderr and
/// in the termination message file, and returns the failure exit code. The `[code]` tag is
/// [`raftkv_node::Error::code`] when the error is the node's own (`[error]` otherwise). A
/// backtrace is printed only when `RUST_BACKTRACE` asks for one.
fn fatal(error: &anyhow::Error, termination_log: Option<&Path>) -> ExitCode {
    let code = error
        .chain()
        .find_map(|cause| cause.downcast_ref::<raftkv_node::Error>())
        .map_or_else(|| "error".to_string(), raftkv_node::Error::code);
    // The cause chain, each cause once: an error that shows its source in its own message
    // (thiserror's `{0}` with `#[from]`) would otherwise print it twice.
    let mut chain = String::new();
    for cause in error.chain() {
        let text = cause.to_string();
        if !chain.contains(&text) {
            if !chain.is_empty() {
                chain.push_str(": ");
            }
            chain.push_str(&text);
        }
    }
    let line = format!("raftkv-node: fatal [{code}]: {chain}").replace('\n', " ");
    eprintln!("{line}");
    if std::env::var_os("RUST_BACKTRACE").is_some_and(|v| v != "0") {
        eprintln!("{}", error.backtrace());
    }
    if let Some(path) = termination_log {
        // Kubernetes keeps at most 4096 bytes of a termination message.
        let mut message = line.into_bytes();
        message.truncate(4096);
        if let Err(write_error) = std::fs::write(path, message) {
            eprintln!(
                "raftkv-node: could not write the termination message to {}: {write_error}",
                path.display()
            );
        }
    }
    ExitCode::FAILURE
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if cli.log_format == "json" {
        builder.json().init();
    } else {
        builder.init();
    }
    // Fault tests: `FAILPOINTS=wal::before_sync=panic` (the fail crate's syntax) arms fail points
    // in a binary built with the `failpoints` feature; without the feature this does nothing.
    let _failpoints = fail::FailScenario::setup();
    #[cfg(feature = "failpoints")]
    {
        // A fail point's panic must end the process as a crash would, whichever task it hit.
        let report = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            report(info);
            std::process::abort();
        }));
        tracing::info!("fail points compiled in");
    }
    match cli.command {
        Some(Command::Local(args)) => local::run(args).await,
        Some(Command::Restore(RestoreCommand {
            mut args,
            scratch_dir,
            only_pod,
        })) => {
            let pod = std::env::var("POD_NAME").unwrap_or_default();
            if only_pod.as_ref().is_some_and(|only| *only != pod) {
                println!(
                    "{}",
                    serde_json::json!({"result": "skipped: not the pod to restore", "pod": pod})
                );
                return Ok(());
            }
            // An object URL is downloaded first; the file is deleted when `_download` drops.
            let _download = if args.from.contains("://") {
                let scratch = scratch_dir
                    .or_else(|| args.data_dir.parent().map(|p| p.to_path_buf()))
                    .unwrap_or_else(|| ".".into());
                let file = download_backup(&args.from, &scratch).await?;
                args.from = file.display().to_string();
                Some(file)
            } else {
                None
            };
            let outcome = tokio::task::spawn_blocking(move || restore::restore(&args)).await??;
            // One line on stdout for scripts and init containers; the details went to the log.
            let (done, what) = match outcome {
                restore::Outcome::Written(done) => (done, "restored"),
                restore::Outcome::AlreadyRestored(done) => (done, "already restored, nothing written"),
            };
            println!(
                "{}",
                serde_json::json!({
                    "result": what,
                    "id": done.id,
                    "cluster_id": done.cluster_id,
                    "source_cluster_id": done.source_cluster_id,
                    "revision": done.revision,
                    "keys": done.keys,
                })
            );
            Ok(())
        }
        None => {
            let stop = shutdown_signal(cli.node.stop_with_parent)?;
            let node = raftkv_node::node::start(cli.node).await?;
            node.run_until(stop).await?;
            Ok(())
        }
    }
}

/// Installs the SIGTERM and SIGINT handlers at once, before the member starts: a signal that
/// arrives while it starts (a pod deleted while it starts, a launcher that gave up waiting) then
/// stops it gracefully once it has started, instead of killing it by the default action. The
/// future resolves on the first of them, or when the launching process is gone.
fn shutdown_signal(parent: Option<u32>) -> anyhow::Result<impl std::future::Future<Output = ()>> {
    use anyhow::Context;
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut interrupt = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    Ok(async move {
        tokio::select! {
            _ = interrupt.recv() => tracing::info!("SIGINT received"),
            _ = term.recv() => tracing::info!("SIGTERM received"),
            _ = parent_gone(parent) => tracing::warn!(parent, "the launching process is gone; shutting down"),
        }
    })
}

/// Resolves once `parent` is no longer this process's parent (it exited, even by SIGKILL, and
/// the process was reparented); never without a parent to watch. Polled rather than armed with
/// `PR_SET_PDEATHSIG` so that it works on every Unix and needs no `unsafe` `pre_exec`.
async fn parent_gone(parent: Option<u32>) {
    let Some(parent) = parent else {
        return std::future::pending().await;
    };
    let mut every = tokio::time::interval(std::time::Duration::from_millis(200));
    loop {
        every.tick().await;
        if std::os::unix::process::parent_id() != parent {
            return;
        }
    }
}
