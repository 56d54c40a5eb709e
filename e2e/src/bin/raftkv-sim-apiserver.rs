//! `raftkv-sim-apiserver`: the simulated Kubernetes control plane as a standalone process.
//!
//! Serves the API on 127.0.0.1, writes a kubeconfig for kubectl, Helm or an operator under
//! development, runs the controllers and the kubelet, and stops every pod on Ctrl-C or SIGTERM.

use std::path::PathBuf;

use anyhow::{bail, Context};
use clap::Parser;
use raftkv_e2e::{ImageMapping, SimCluster};

/// A simulated Kubernetes control plane on localhost.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// Port of 127.0.0.1 to serve on (0 picks a free one).
    #[arg(long, default_value_t = 0)]
    port: u16,
    /// Where to write the kubeconfig.
    #[arg(long, default_value = "raftkv-sim.kubeconfig")]
    kubeconfig: PathBuf,
    /// Directory for volumes, logs and pod scratch space (default: a temporary directory).
    #[arg(long)]
    root: Option<PathBuf>,
    /// Image to host program, as PATTERN=PROGRAM (PATTERN may end in `*`); repeatable.
    #[arg(long = "image", value_name = "PATTERN=PROGRAM")]
    images: Vec<String>,
    /// Number of watch events kept for resuming watches.
    #[arg(long, default_value_t = 10_000)]
    watch_history: usize,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let args = Args::parse();
    let mut builder = SimCluster::builder()
        .port(args.port)
        .kubeconfig_path(&args.kubeconfig)
        .watch_history(args.watch_history);
    if let Some(root) = &args.root {
        builder = builder.root_dir(root);
    }
    for image in &args.images {
        let Some((pattern, program)) = image.split_once('=') else {
            bail!("--image expects PATTERN=PROGRAM, got {image:?}");
        };
        builder = builder.image(pattern, ImageMapping::new(program));
    }
    let cluster = builder.start().await.context("starting the simulated cluster")?;
    println!("serving {} ; kubeconfig {}", cluster.url(), args.kubeconfig.display());
    let mut terminate =
        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).context("listening for SIGTERM")?;
    tokio::select! {
        signal = tokio::signal::ctrl_c() => signal.context("waiting for Ctrl-C")?,
        _ = terminate.recv() => {}
    }
    cluster.shutdown().await;
    Ok(())
}
