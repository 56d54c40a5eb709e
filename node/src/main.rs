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
            let node = raftkv_node::node::start(cli.node).await?;
            node.run_until(shutdown_signal()).await?;
            Ok(())
        }
    }
}

async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("installing the SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT received"),
        _ = term.recv() => tracing::info!("SIGTERM received"),
    }
}
