//! `sluice-registry`: serve the registry, or collect its garbage.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use sluice_registry::auth::Authenticator;
use sluice_registry::gc::{self, GcOptions};
use sluice_registry::storage::FsStorage;
use sluice_registry::{server, Config, Registry};

#[derive(Parser)]
#[command(
    name = "sluice-registry",
    version,
    about = "OCI distribution v1.1 registry for lazy container images"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the registry API.
    Serve {
        /// TOML config file (see the `config` module docs for keys and defaults).
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// Listen address [default: 127.0.0.1:5000]; port 0 picks a free port.
        #[arg(long)]
        addr: Option<std::net::SocketAddr>,
        /// Storage root [default: /var/lib/sluice-registry].
        #[arg(long)]
        root: Option<PathBuf>,
        /// htpasswd file (bcrypt) enabling basic auth.
        #[arg(long)]
        htpasswd: Option<PathBuf>,
        /// With --htpasswd: allow anonymous pulls.
        #[arg(long)]
        anonymous_read: bool,
        /// Do not convert pushed images into lazy zstd:chunked twins.
        #[arg(long)]
        no_convert_on_push: bool,
    },
    /// Convert an image in an OCI layout to zstd:chunked layers (lazy-capable).
    Convert {
        /// Source, as LAYOUT_DIR:TAG.
        #[arg(long)]
        from: String,
        /// Destination, as LAYOUT_DIR:TAG (the directory is created).
        #[arg(long)]
        to: String,
        /// Average chunk size in KiB (content-defined; min 1/4, max 4x).
        #[arg(long, default_value_t = 32)]
        chunk_kib: u32,
        /// zstd level.
        #[arg(long, default_value_t = 3)]
        level: i32,
        /// zstd level of the TOC (fetched by every node at every pull).
        #[arg(long, default_value_t = sluice_format::chunked::DEFAULT_TOC_LEVEL)]
        toc_level: i32,
    },
    /// Remove blobs that no manifest references.
    Gc {
        /// Storage root.
        #[arg(long)]
        root: PathBuf,
        /// Only report what would be removed.
        #[arg(long)]
        dry_run: bool,
        /// Keep blobs modified within this many seconds (protects pushes in progress).
        #[arg(long, default_value_t = 3600)]
        grace_seconds: u64,
        /// Remove upload sessions idle for longer than this many seconds.
        #[arg(long, default_value_t = 86400)]
        upload_max_age_seconds: u64,
    },
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    match Cli::parse().command {
        Command::Serve {
            config,
            addr,
            root,
            htpasswd,
            anonymous_read,
            no_convert_on_push,
        } => {
            let mut cfg = match &config {
                Some(p) => Config::load(p)?,
                None => Config::default(),
            };
            if let Some(a) = addr {
                cfg.addr = a;
            }
            if let Some(r) = root {
                cfg.root = r;
            }
            if htpasswd.is_some() {
                cfg.auth.htpasswd = htpasswd;
            }
            cfg.auth.anonymous_read |= anonymous_read;
            if no_convert_on_push {
                cfg.convert.on_push = false;
            }
            serve(cfg)
        }
        Command::Convert {
            from,
            to,
            chunk_kib,
            level,
            toc_level,
        } => {
            let split = |s: &str| -> anyhow::Result<(PathBuf, String)> {
                let (dir, tag) = s
                    .rsplit_once(':')
                    .with_context(|| format!("{s:?} is not LAYOUT_DIR:TAG"))?;
                Ok((PathBuf::from(dir), tag.to_owned()))
            };
            let (from_dir, from_tag) = split(&from)?;
            let (to_dir, to_tag) = split(&to)?;
            let opts = sluice_format::chunked::ChunkingOptions {
                toc_level,
                ..sluice_format::chunked::ChunkingOptions::with_average(chunk_kib * 1024, level)
            };
            let started = std::time::Instant::now();
            let image = sluice_format::convert::convert_layout(
                &from_dir, &from_tag, &to_dir, &to_tag, &opts,
            )
            .with_context(|| format!("converting {from}"))?;
            for (original, converted) in &image.layers {
                println!(
                    "{} ({} bytes) -> {} ({} bytes)",
                    original.digest, original.size, converted.digest, converted.size
                );
            }
            println!(
                "converted {from} -> {to}: manifest {} in {:.2}s",
                image.manifest.digest,
                started.elapsed().as_secs_f64()
            );
            Ok(())
        }
        Command::Gc {
            root,
            dry_run,
            grace_seconds,
            upload_max_age_seconds,
        } => {
            let opts = GcOptions {
                dry_run,
                grace: Duration::from_secs(grace_seconds),
                upload_max_age: Duration::from_secs(upload_max_age_seconds),
            };
            let report = gc::collect(&root, &opts)
                .with_context(|| format!("garbage collection of {}", root.display()))?;
            let verb = if dry_run { "would remove" } else { "removed" };
            for d in &report.blobs_removed {
                println!("{verb} {d}");
            }
            println!(
                "{} manifests, {} blobs kept ({} only for being newer than {}s), {verb} {} blobs ({} bytes) and {} stale uploads",
                report.manifests,
                report.blobs_kept + report.kept_by_grace,
                report.kept_by_grace,
                grace_seconds,
                report.blobs_removed.len(),
                report.bytes_removed,
                report.uploads_removed
            );
            Ok(())
        }
    }
}

fn serve(cfg: Config) -> anyhow::Result<()> {
    let storage = FsStorage::open(&cfg.root)
        .with_context(|| format!("opening storage root {}", cfg.root.display()))?;
    let auth = match &cfg.auth.htpasswd {
        Some(p) => Some(Authenticator::from_htpasswd(
            p,
            cfg.auth.anonymous_read,
            &cfg.auth.realm,
        )?),
        None => None,
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(async move {
        let listener = server::bind(cfg.addr)
            .await
            .with_context(|| format!("binding {}", cfg.addr))?;
        let local = listener.local_addr()?;
        // The first stdout line tells scripts and tests where we listen.
        println!("sluice-registry listening on http://{local}");
        tracing::info!(addr = %local, root = %cfg.root.display(), auth = auth.is_some(), "serving");
        let registry: Arc<Registry<FsStorage>> = Registry::new(storage, auth, cfg);
        registry.start_converter();
        server::serve(registry, listener, server::shutdown_signal()).await?;
        Ok(())
    })
}
