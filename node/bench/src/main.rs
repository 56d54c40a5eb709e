//! `raftkv-bench`: a closed-loop load generator for raftkv and, with `--target etcd`, for etcd's
//! v3 JSON gateway, so both are driven by the same connection handling. Prints throughput,
//! latency percentiles and error counts as a table, or as one JSON object with `--json`.

use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use raftkv_bench::{self as bench, LoadConfig, Mix, Target};

#[derive(Parser, Debug)]
#[command(
    name = "raftkv-bench",
    version,
    about = "Closed-loop HTTP load generator for raftkv and etcd"
)]
struct Args {
    /// Protocol to speak: raftkv's /v1/kv API or etcd's v3 JSON gateway.
    #[arg(long, value_enum, default_value = "raftkv")]
    target: Target,
    /// Comma-separated member URLs (http://ip:port, https:// with --cacert); connections are
    /// spread over them.
    #[arg(long, value_delimiter = ',', default_value = "http://127.0.0.1:8081")]
    endpoints: Vec<String>,
    /// Concurrent keep-alive connections, each with one request in flight.
    #[arg(long, default_value_t = 16)]
    conns: usize,
    /// Measured time, in seconds (fractions allowed).
    #[arg(long, default_value_t = 10.0)]
    duration: f64,
    /// Time run before measuring, in seconds.
    #[arg(long, default_value_t = 1.0)]
    warmup: f64,
    /// Number of distinct keys.
    #[arg(long, default_value_t = 100_000)]
    key_space: u64,
    /// Bytes per written value.
    #[arg(long, default_value_t = 256)]
    value_size: usize,
    /// Weighted operations: put, get (linearizable), stale_get, cas, health.
    #[arg(long, default_value = "put=100")]
    mix: String,
    /// Write every key once before the run (reads then find them).
    #[arg(long)]
    preload: bool,
    /// Only preload, then exit.
    #[arg(long, requires = "preload")]
    preload_only: bool,
    /// Seconds to wait for one answer before giving the connection up.
    #[arg(long, default_value_t = 10.0)]
    request_timeout: f64,
    /// Seed of the key and operation sequence.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Print one JSON object instead of the table.
    #[arg(long)]
    json: bool,
    /// Speak TLS, trusting the CA in this PEM file.
    #[arg(long)]
    cacert: Option<std::path::PathBuf>,
    /// Client certificate (PEM) to present over TLS.
    #[arg(long, requires_all = ["cacert", "key"])]
    cert: Option<std::path::PathBuf>,
    /// Key (PEM) of `--cert`.
    #[arg(long, requires = "cert")]
    key: Option<std::path::PathBuf>,
}

/// The TLS client configuration of `--cacert` and `--cert`/`--key` (HTTP/1.1 through ALPN).
fn tls_config(args: &Args) -> anyhow::Result<Option<std::sync::Arc<rustls::ClientConfig>>> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let Some(ca) = &args.cacert else { return Ok(None) };
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca).with_context(|| format!("reading {}", ca.display()))? {
        roots.add(cert?)?;
    }
    let builder =
        rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots);
    let mut config = match (&args.cert, &args.key) {
        (Some(cert), Some(key)) => {
            let chain = CertificateDer::pem_file_iter(cert)
                .with_context(|| format!("reading {}", cert.display()))?
                .collect::<Result<Vec<_>, _>>()?;
            let key = PrivateKeyDer::from_pem_file(key).with_context(|| format!("reading {}", key.display()))?;
            builder.with_client_auth_cert(chain, key)?
        }
        _ => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Some(std::sync::Arc::new(config)))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let endpoints = args
        .endpoints
        .iter()
        .map(|e| bench::parse_endpoint(e))
        .collect::<Result<Vec<_>, _>>()?;
    let seconds = |s: f64, what: &str| {
        Duration::try_from_secs_f64(s).with_context(|| format!("{what} must be a non-negative number of seconds"))
    };
    let cfg = LoadConfig {
        target: args.target,
        endpoints,
        conns: args.conns,
        duration: seconds(args.duration, "--duration")?,
        warmup: seconds(args.warmup, "--warmup")?,
        key_space: args.key_space,
        value_size: args.value_size,
        mix: args.mix.parse::<Mix>()?,
        request_timeout: seconds(args.request_timeout, "--request-timeout")?,
        seed: args.seed,
        tls: tls_config(&args)?,
    };
    if args.preload {
        let took = bench::preload(&cfg).await?;
        eprintln!(
            "preloaded {} keys of {} bytes in {:.1} s",
            cfg.key_space,
            cfg.value_size,
            took.as_secs_f64()
        );
        if args.preload_only {
            return Ok(());
        }
    }
    let report = bench::run(&cfg).await?;
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        print!("{}", report.table());
        if report.not_found + report.cas_conflicts + report.reconnects > 0 {
            println!(
                "not found: {}   cas conflicts: {}   reconnects: {}",
                report.not_found, report.cas_conflicts, report.reconnects
            );
        }
        for sample in &report.error_samples {
            println!("error sample: {sample}");
        }
    }
    Ok(())
}
