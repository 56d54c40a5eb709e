//! `raftkv-node`: run one member, or (`raftkv-node local`) a local cluster of members.

use clap::{Parser, Subcommand};
use raftkv_node::config::NodeConfig;
use raftkv_node::local::{self, LocalArgs};
use tracing_subscriber::EnvFilter;

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
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
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
        None => {
            let parent = cli.node.stop_with_parent;
            let node = raftkv_node::node::start(cli.node).await?;
            node.run_until(shutdown_signal(parent)).await?;
            Ok(())
        }
    }
}

async fn shutdown_signal(parent: Option<u32>) {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("installing the SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT received"),
        _ = term.recv() => tracing::info!("SIGTERM received"),
        _ = parent_gone(parent) => tracing::warn!(parent, "the launching process is gone; shutting down"),
    }
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
