//! `sluice`: the node-side command line.
//!
//! `sluice mount IMAGE DIR` mounts every layer of an image lazily under DIR
//! (`DIR/layer-0`, `DIR/layer-1`, …) and serves them until interrupted: the
//! data plane without containerd, for inspection, demos and benchmarks.
//! (`sluice pull`, which drives containerd, comes with the snapshotter.)

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use sluice_puller::fs::FsOptions;
use sluice_puller::metrics::PullerMetrics;
use sluice_puller::registry::RetryPolicy;
use sluice_puller::{image, ChunkCache, ImageRef, LayerOptions, RegistryClient, RemoteLayer};

#[derive(Parser)]
#[command(
    name = "sluice",
    version,
    about = "sluice node tools: lazy image mounts"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Mount an image's layers lazily and serve them until SIGINT/SIGTERM.
    Mount {
        /// Image reference, host[:port]/repository[:tag|@digest].
        image: String,
        /// Directory to mount under (created).
        dir: PathBuf,
        /// Chunk cache directory.
        #[arg(long, default_value = "/var/lib/sluice/cache")]
        cache: PathBuf,
        /// Chunk cache size limit in MiB.
        #[arg(long, default_value_t = 10240)]
        cache_mib: u64,
        /// Mount the image this many times (DIR/copy-N/...), e.g. to measure memory.
        #[arg(long, default_value_t = 1)]
        copies: usize,
        /// Serve every read through the daemon (no FUSE passthrough).
        #[arg(long)]
        no_passthrough: bool,
        /// Seconds a read may wait for the registry.
        #[arg(long, default_value_t = 60)]
        read_deadline: u64,
    },
}

/// Keeps large allocations out of the heap. The FUSE library gives each
/// serving thread a 16 MiB receive buffer that is almost never filled; served
/// by mmap, its untouched pages cost nothing, but once glibc's dynamic
/// threshold rises (after any large free) they come from the heap and are
/// zeroed page by page: 16 MiB of RSS per thread.
fn fix_malloc_threshold() {
    // SAFETY: mallopt only adjusts allocator tunables; called before any
    // thread is started.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 256 * 1024);
    }
}

fn main() -> anyhow::Result<()> {
    fix_malloc_threshold();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    match Cli::parse().command {
        Command::Mount {
            image,
            dir,
            cache,
            cache_mib,
            copies,
            no_passthrough,
            read_deadline,
        } => mount(
            image,
            dir,
            cache,
            cache_mib,
            copies,
            !no_passthrough,
            read_deadline,
        ),
    }
}

fn mount(
    image: String,
    dir: PathBuf,
    cache_dir: PathBuf,
    cache_mib: u64,
    copies: usize,
    passthrough: bool,
    read_deadline: u64,
) -> anyhow::Result<()> {
    let image = ImageRef::parse(&image)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let client = Arc::new(RegistryClient::new(RetryPolicy::default()));
    let cache = Arc::new(
        ChunkCache::open(&cache_dir, cache_mib << 20)
            .with_context(|| format!("opening cache {}", cache_dir.display()))?,
    );
    let metrics = PullerMetrics::new(cache.clone());
    let resolved = runtime.block_on(image::resolve(&client, &image))?;
    let mut sessions = Vec::new();
    let mut layers = Vec::new();
    for copy in 0..copies.max(1) {
        for (i, l) in resolved.layers.iter().enumerate() {
            let Some(lazy) = &l.lazy else {
                bail!("layer {} of {image} has no lazy (zstd:chunked) form; it can only be pulled in full", l.original.digest);
            };
            let opts = LayerOptions {
                read_deadline: Duration::from_secs(read_deadline),
                fetch_latency: Some(metrics.fetch_latency.clone()),
            };
            let layer = Arc::new(runtime.block_on(RemoteLayer::open(
                client.clone(),
                image.clone(),
                lazy,
                cache.clone(),
                opts,
            ))?);
            metrics.track(&layer);
            let target = if copies > 1 {
                dir.join(format!("copy-{copy}/layer-{i}"))
            } else {
                dir.join(format!("layer-{i}"))
            };
            std::fs::create_dir_all(&target)
                .with_context(|| format!("creating {}", target.display()))?;
            let fs_opts = FsOptions {
                passthrough,
                ..FsOptions::default()
            };
            sessions.push(
                sluice_puller::fs::mount(layer.clone(), runtime.handle().clone(), &target, fs_opts)
                    .with_context(|| format!("mounting {}", target.display()))?,
            );
            layers.push(layer);
        }
    }
    // Parsing TOCs needed transient memory; give it back before idling.
    // SAFETY: malloc_trim only returns free heap pages to the kernel.
    unsafe {
        libc::malloc_trim(0);
    }
    println!(
        "ready: {} layer(s) of {image} ({}) mounted under {}",
        sessions.len(),
        resolved.manifest_digest,
        dir.display()
    );
    runtime.block_on(async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        Ok::<_, std::io::Error>(())
    })?;
    drop(sessions);
    eprintln!("{}", metrics.render());
    Ok(())
}
