//! `sluice`: the node-side command line.
//!
//! `sluice mount IMAGE DIR` mounts every layer of an image lazily under DIR
//! (`DIR/layer-0`, `DIR/layer-1`, …) and serves them until interrupted: the
//! data plane without containerd, for inspection, demos and benchmarks.
//!
//! `sluice pull IMAGE` pulls an image into containerd through the sluice
//! snapshotter: lazy layers are mounted by the snapshotter, others are pulled
//! in full; then `ctr run --snapshotter sluice IMAGE` starts at once.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use sluice_puller::fs::FsOptions;
use sluice_puller::metrics::PullerMetrics;
use sluice_puller::native::{NativeImages, NativeUpgrade};
use sluice_puller::pull::{LayerPath, PullOptions};
use sluice_puller::registry::{hosts, RetryPolicy};
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
    /// Pull an image into containerd, mounting its layers lazily through the
    /// sluice snapshotter (like `ctr-remote image rpull`).
    Pull {
        /// Image reference, host[:port]/repository[:tag|@digest].
        image: String,
        /// containerd's gRPC socket.
        #[arg(long, default_value = "/run/containerd/containerd.sock")]
        address: PathBuf,
        /// containerd namespace.
        #[arg(long, short = 'n', default_value = "default")]
        namespace: String,
        /// The snapshotter's name in containerd's proxy_plugins.
        #[arg(long, default_value = "sluice")]
        snapshotter: String,
        /// Reach the registry over plain HTTP (loopback hosts always may).
        #[arg(long)]
        plain_http: bool,
        /// Directory of <host>/hosts.toml files (mirrors, plain HTTP).
        #[arg(long, default_value = "/etc/sluice/certs.d")]
        hosts_dir: PathBuf,
        /// Docker config.json with registry credentials.
        #[arg(long)]
        docker_config: Option<PathBuf>,
    },
    /// Mount an image's layers lazily and serve them until SIGINT/SIGTERM.
    Mount(MountArgs),
}

#[derive(clap::Args)]
struct MountArgs {
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
    /// Keep complete layers on FUSE (by default a layer whose every
    /// chunk is cached is written as an EROFS image and mounted on top).
    #[arg(long)]
    no_native: bool,
    /// Local files up to this size are made into one whole file for
    /// passthrough at open (the open waits); larger ones in the background.
    #[arg(long, default_value_t = FsOptions::default().whole_at_open_max >> 20)]
    whole_at_open_mib: u64,
    /// Seconds a read may wait for the registry.
    #[arg(long, default_value_t = 60)]
    read_deadline: u64,
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

/// Prints an error once, with the causes its message does not already quote
/// (instead of anyhow's "Caused by" list, which repeats them).
fn main() -> std::process::ExitCode {
    match run() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("sluice: error: {}", sluice_puller::error_chain(e.as_ref()));
            std::process::ExitCode::FAILURE
        }
    }
}

fn run() -> anyhow::Result<()> {
    fix_malloc_threshold();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    match Cli::parse().command {
        Command::Pull {
            image,
            address,
            namespace,
            snapshotter,
            plain_http,
            hosts_dir,
            docker_config,
        } => pull(
            image,
            PullOptions {
                address,
                namespace,
                snapshotter,
            },
            plain_http,
            hosts_dir,
            docker_config,
        ),
        Command::Mount(args) => mount(args),
    }
}

fn human(bytes: u64) -> String {
    match bytes {
        b if b >= 1 << 30 => format!("{:.1} GiB", b as f64 / (1u64 << 30) as f64),
        b if b >= 1 << 20 => format!("{:.1} MiB", b as f64 / (1u64 << 20) as f64),
        b if b >= 1 << 10 => format!("{:.1} KiB", b as f64 / 1024.0),
        b => format!("{b} B"),
    }
}

fn pull(
    image: String,
    options: PullOptions,
    plain_http: bool,
    hosts_dir: PathBuf,
    docker_config: Option<PathBuf>,
) -> anyhow::Result<()> {
    let image = ImageRef::parse(&image)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let client = RegistryClient::new(RetryPolicy::default());
    let mut hosts = hosts::load(&hosts_dir, docker_config.as_deref())?;
    if plain_http {
        hosts.entry(image.host.clone()).or_default().plain_http = Some(true);
    }
    client.configure_hosts(hosts)?;
    println!(
        "pulling {image} into containerd ({}) with snapshotter {}",
        options.address.display(),
        options.snapshotter
    );
    let report = runtime.block_on(sluice_puller::pull::pull(&client, &image, &options, |e| {
        let how = match e.path {
            LayerPath::Lazy => "lazy: mounted by the snapshotter, fetched on demand".to_owned(),
            LayerPath::Full => format!(
                "full: fetched {} and unpacked by containerd",
                human(e.layer.size)
            ),
            LayerPath::Present => "present already".to_owned(),
        };
        println!(
            "  layer {}/{} {} ({}): {how} [{:.2} s]",
            e.index + 1,
            e.count,
            e.layer.digest,
            human(e.layer.size),
            e.seconds
        );
    }))?;
    println!(
        "pulled {} ({}): {} layer{} ({} lazy, {} full, {} present), {} fetched, {:.2} s",
        report.image,
        report.manifest,
        report.layers,
        if report.layers == 1 { "" } else { "s" },
        report.lazy,
        report.full,
        report.present,
        human(report.fetched_bytes),
        report.seconds
    );
    Ok(())
}

fn mount(args: MountArgs) -> anyhow::Result<()> {
    let MountArgs {
        image,
        dir,
        cache: cache_dir,
        cache_mib,
        copies,
        no_passthrough,
        no_native,
        whole_at_open_mib,
        read_deadline,
    } = args;
    let fs_opts = FsOptions {
        passthrough: !no_passthrough,
        whole_at_open_max: whole_at_open_mib << 20,
        ..FsOptions::default()
    };
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
    let images = if no_native {
        None
    } else {
        let images = NativeImages::open(&cache, metrics.clone())
            .with_context(|| format!("preparing {}/erofs", cache_dir.display()))?;
        Some(Arc::new(images))
    };
    let resolved = runtime.block_on(image::resolve(&client, &image))?;
    // Each layer's native upgrade before its FUSE mount: it is dropped
    // (unmounted) first.
    let mut sessions = Vec::new();
    let mut layers = Vec::new();
    for copy in 0..copies.max(1) {
        // This copy's mounts so far, the bottom layer first.
        let mut below: Vec<sluice_puller::fs::LayerSlot> = Vec::new();
        for (i, l) in resolved.layers.iter().enumerate() {
            let Some(lazy) = &l.lazy else {
                bail!("layer {} of {image} has no lazy (zstd:chunked) form; it can only be pulled in full", l.original.digest);
            };
            let opts = LayerOptions {
                read_deadline: Duration::from_secs(read_deadline),
                fetch_latency: Some(metrics.fetch_latency.clone()),
                ..LayerOptions::default()
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
            let fuse = sluice_puller::fs::mount(
                layer.clone(),
                runtime.handle().clone(),
                &target,
                fs_opts.clone(),
            )
            .with_context(|| format!("mounting {}", target.display()))?;
            // What its programs load may lie in the layers below it.
            fuse.slot()
                .set_lowers(&below.iter().rev().cloned().collect::<Vec<_>>());
            below.push(fuse.slot());
            let upgrade = images.as_ref().map(|images| {
                NativeUpgrade::start(runtime.handle(), images.clone(), layer.clone(), target)
            });
            sessions.push((upgrade, fuse));
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
