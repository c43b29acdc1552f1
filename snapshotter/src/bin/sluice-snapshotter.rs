//! `sluice-snapshotter`: the node daemon containerd reaches as the proxy
//! snapshot plugin `sluice`.

use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use sluice_snapshotter::install::{self, Outcome, Restart, Settings};
use sluice_snapshotter::{Config, Daemon};

#[derive(Parser)]
#[command(
    name = "sluice-snapshotter",
    version,
    about = "containerd remote snapshotter that mounts image layers lazily",
    args_conflicts_with_subcommands = true
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Node>,
    #[command(flatten)]
    serve: ServeArgs,
}

/// Without a subcommand the daemon runs.
#[derive(clap::Args)]
struct ServeArgs {
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
    /// Unix socket for the CRI image-service proxy. Overrides `cri.address`.
    #[arg(long)]
    cri_address: Option<PathBuf>,
    /// containerd's socket, where the CRI proxy forwards. Overrides `cri.containerd_address`.
    #[arg(long)]
    containerd_address: Option<PathBuf>,
    /// Once serving, plug this daemon into containerd's config (as
    /// `install-node` does, with the daemon's socket) and restart containerd
    /// if it changed: the DaemonSet's way, so that containerd never names a
    /// snapshotter that is not up yet. A failure stops the daemon.
    #[arg(long)]
    install_node: bool,
    /// With --install-node: leave the CRI plugin's snapshotter alone.
    #[arg(long, requires = "install_node")]
    no_cri: bool,
    #[command(flatten)]
    node: NodeTarget,
}

#[derive(clap::Subcommand)]
enum Node {
    /// Plug sluice into containerd's config (idempotent; keeps a backup) and
    /// restart containerd if the config changed.
    InstallNode {
        #[command(flatten)]
        target: NodeTarget,
        /// The daemon's socket, written as `proxy_plugins.sluice.address`.
        #[arg(long, default_value = "/run/sluice/snapshotter.sock")]
        socket: String,
        /// Leave the CRI plugin's snapshotter alone (nodes without Kubernetes).
        #[arg(long)]
        no_cri: bool,
    },
    /// Take sluice out of containerd's config (the backup back, byte for byte)
    /// and restart containerd if the config changed.
    UninstallNode {
        #[command(flatten)]
        target: NodeTarget,
    },
}

#[derive(clap::Args)]
struct NodeTarget {
    /// containerd's config file.
    #[arg(long, default_value = "/etc/containerd/config.toml")]
    containerd_config: PathBuf,
    /// How to restart containerd when its config changed (split at spaces, no shell).
    #[arg(long, default_value = "systemctl restart containerd")]
    restart_command: String,
    /// Do not restart containerd.
    #[arg(long, conflicts_with = "restart_command")]
    no_restart: bool,
    /// Run the restart command in the mount namespace of the host's PID 1
    /// (from a privileged container with hostPID).
    #[arg(long)]
    host_namespace: bool,
    /// Run the restart command in the mount namespace of this process instead.
    #[arg(long, value_name = "PID", conflicts_with = "host_namespace")]
    namespace_of: Option<u32>,
}

impl NodeTarget {
    fn restart(&self) -> Restart {
        Restart {
            command: if self.no_restart {
                Vec::new()
            } else {
                self.restart_command
                    .split_whitespace()
                    .map(str::to_owned)
                    .collect()
            },
            namespace_of: self.namespace_of.or(self.host_namespace.then_some(1)),
        }
    }
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
    match cli.command {
        None => serve(cli.serve),
        Some(Node::InstallNode {
            target,
            socket,
            no_cri,
        }) => {
            let settings = Settings {
                socket,
                cri: !no_cri,
            };
            let outcome =
                install::install(&target.containerd_config, &settings, &target.restart())?;
            report(&target.containerd_config, outcome, "now uses sluice");
            Ok(())
        }
        Some(Node::UninstallNode { target }) => {
            let outcome = install::uninstall(&target.containerd_config, &target.restart())?;
            report(&target.containerd_config, outcome, "no longer uses sluice");
            Ok(())
        }
    }
}

/// One line for the operator (the details are in the log).
fn report(config: &std::path::Path, outcome: Outcome, changed: &str) {
    match outcome {
        Outcome::Unchanged => println!("{}: unchanged", config.display()),
        Outcome::Changed => println!("{}: {changed}", config.display()),
    }
}

fn serve(cli: ServeArgs) -> anyhow::Result<()> {
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
    if let Some(a) = cli.cri_address {
        config.cri.address = a;
    }
    if let Some(a) = cli.containerd_address {
        config.cri.containerd_address = a;
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let install_socket = config.address.display().to_string();
    let mut daemon = Daemon::open(config, runtime.handle().clone())?;
    let (install_failed, failed) = tokio::sync::oneshot::channel::<anyhow::Error>();
    if cli.install_node {
        let settings = Settings {
            socket: install_socket,
            cri: !cli.no_cri,
        };
        let (path, restart) = (cli.node.containerd_config.clone(), cli.node.restart());
        daemon.after_listening(move || match install::install(&path, &settings, &restart) {
            Ok(outcome) => report(&path, outcome, "now uses sluice"),
            Err(e) => {
                let _ = install_failed.send(anyhow::Error::new(e).context("install-node"));
            }
        });
    }
    let failure = std::sync::Arc::new(std::sync::Mutex::new(None));
    let failure_slot = failure.clone();
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
                Ok(e) = failed => {
                    *failure_slot.lock().expect("failure slot") = Some(e);
                }
            }
        };
        daemon.serve(shutdown).await
    })?;
    let failed = failure.lock().expect("failure slot").take();
    match failed {
        Some(e) => Err(e),
        None => Ok(()),
    }
}
