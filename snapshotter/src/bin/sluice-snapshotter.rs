//! `sluice-snapshotter`: the node daemon containerd reaches as the proxy
//! snapshot plugin `sluice`.

use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use sluice_snapshotter::{Config, Daemon};

#[derive(Parser)]
#[command(
    name = "sluice-snapshotter",
    version,
    about = "containerd remote snapshotter that mounts image layers lazily"
)]
struct Cli {
    /// TOML configuration file (defaults are documented in docs/snapshotter.md).
    #[arg(long)]
    config: Option<PathBuf>,
    /// State directory (metadata, snapshots, chunk cache). Overrides `root`.
    #[arg(long)]
    root: Option<PathBuf>,
    /// Unix socket for containerd. Overrides `address`.
    #[arg(long)]
    address: Option<PathBuf>,
    /// host:port for /metrics and /healthz ("" disables). Overrides `metrics_address`.
    #[arg(long)]
    metrics_address: Option<String>,
    /// Directory of <host>/hosts.toml files. Overrides `registry.hosts_dir`.
    #[arg(long)]
    hosts_dir: Option<PathBuf>,
    /// Docker config.json with registry credentials. Overrides `registry.docker_config`.
    #[arg(long)]
    docker_config: Option<PathBuf>,
}

/// Prints an error once, with the causes its message does not already quote
/// (instead of anyhow's "Caused by" list, which repeats them).
fn main() -> std::process::ExitCode {
    match run() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!(
                "sluice-snapshotter: error: {}",
                sluice_puller::error_chain(e.as_ref())
            );
            std::process::ExitCode::FAILURE
        }
    }
}

fn run() -> anyhow::Result<()> {
    // See puller's `sluice` binary: keeps FUSE threads' receive buffers out of
    // the heap so that idle mounts cost little memory.
    // SAFETY: only adjusts an allocator tunable, before any thread starts.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 256 * 1024);
    }
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let mut config = match &cli.config {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading {}", path.display()))?;
            Config::parse(&text).with_context(|| format!("parsing {}", path.display()))?
        }
        None => Config::default(),
    };
    if let Some(r) = cli.root {
        config.root = r;
    }
    if let Some(a) = cli.address {
        config.address = a;
    }
    if let Some(m) = cli.metrics_address {
        config.metrics_address = m;
    }
    if let Some(h) = cli.hosts_dir {
        config.registry.hosts_dir = h;
    }
    if let Some(d) = cli.docker_config {
        config.registry.docker_config = d;
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let daemon = Daemon::open(config, runtime.handle().clone())?;
    runtime.block_on(async {
        daemon.restore().await?;
        // SAFETY: malloc_trim only returns free heap pages to the kernel.
        unsafe {
            libc::malloc_trim(0);
        }
        let shutdown = async {
            let mut term =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                    .expect("installing a SIGTERM handler");
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        };
        daemon.serve(shutdown).await
    })?;
    Ok(())
}
