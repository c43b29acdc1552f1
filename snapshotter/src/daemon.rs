//! The daemon: opens the store and the data plane, mounts lazy layers again
//! after a restart, and serves the Snapshots API on a unix socket and
//! metrics over HTTP until shut down.

use std::future::Future;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::Full;
use hyper::body::Bytes;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::service::TowerToHyperService;
use sluice_puller::fs::FsOptions;
use sluice_puller::metrics::PullerMetrics;
use sluice_puller::native::NativeImages;
use sluice_puller::registry::hosts;
use sluice_puller::registry::RetryPolicy;
use sluice_puller::{ChunkCache, RegistryClient};
use tokio::net::{TcpListener, UnixListener};

use crate::api::snapshots::snapshots_server::SnapshotsServer;
use crate::config::Config;
use crate::cri_proxy::CriProxy;
use crate::metadata::Kind;
use crate::metrics::SnapshotterMetrics;
use crate::remote::{Profiles, RemoteLayers, RemoteOptions};
use crate::service::SnapshotService;
use crate::snapshots::Snapshotter;
use sluice_puller::prefetch::{PrefetchOptions, Prefetcher};
use sluice_puller::trace::{AccessTracer, Hooks, Recording};

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("{0}")]
    Snapshots(#[from] crate::error::SnapshotError),
    #[error("chunk cache: {0}")]
    Cache(#[from] sluice_puller::cache::CacheError),
    #[error("registry configuration: {0}")]
    Hosts(#[from] hosts::HostsError),
    #[error("registry configuration: {0}")]
    Registry(#[from] sluice_puller::registry::FetchError),
    #[error("{context}: {source}")]
    Io {
        context: String,
        source: std::io::Error,
    },
    #[error("{0} is in use by a running snapshotter")]
    SocketInUse(String),
}

fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> StartError {
    let context = context.into();
    move |source| StartError::Io { context, source }
}

pub struct Daemon {
    config: Config,
    core: Arc<Snapshotter>,
    remote: Option<Arc<RemoteLayers>>,
    metrics: Arc<SnapshotterMetrics>,
    /// Runs (on a blocking thread) once containerd can reach the socket.
    after_listening: Option<Box<dyn FnOnce() + Send>>,
}

/// Builds the registry client from the configured hosts dir and docker config.
pub fn registry_client(config: &Config) -> Result<RegistryClient, StartError> {
    let client = RegistryClient::new(RetryPolicy::default());
    let docker_config = &config.registry.docker_config;
    client.configure_hosts(hosts::load(
        &config.registry.hosts_dir,
        (!docker_config.as_os_str().is_empty()).then_some(docker_config.as_path()),
    )?)?;
    Ok(client)
}

impl Daemon {
    pub fn open(config: Config, runtime: tokio::runtime::Handle) -> Result<Self, StartError> {
        std::fs::create_dir_all(&config.root)
            .map_err(io(format!("creating {}", config.root.display())))?;
        let core = Arc::new(Snapshotter::open(&config.root)?);
        let cache = Arc::new(ChunkCache::open(
            config.root.join("cache"),
            config.cache.max_mib << 20,
        )?);
        let puller_metrics = PullerMetrics::new(cache.clone());
        let metrics = SnapshotterMetrics::new(puller_metrics.clone());
        let remote = if config.lazy.enabled {
            let client = Arc::new(registry_client(&config)?);
            let p = &config.profiles;
            let tracer = if p.record {
                let whole_file_max = if config.lazy.passthrough {
                    FsOptions::default().open_fetch_max
                } else {
                    0
                };
                let (tracer, recordings) = AccessTracer::start(
                    &runtime,
                    &config.root.join("cache"),
                    Duration::from_secs(p.window_secs.max(1)),
                    whole_file_max,
                    p.ebpf.then_some(Hooks::Auto),
                );
                let tracer = Arc::new(tracer);
                runtime.spawn(publish_recordings(
                    client.clone(),
                    recordings,
                    p.publish,
                    Arc::downgrade(&tracer),
                    metrics.clone(),
                ));
                Some(tracer)
            } else {
                None
            };
            // The prefetcher also runs a layer's background fill.
            let prefetcher = (p.prefetch || config.lazy.fill).then(|| {
                Prefetcher::start(
                    &runtime,
                    PrefetchOptions {
                        concurrency: p.prefetch_concurrency.max(1),
                        fill_quiet: Duration::from_secs(config.lazy.fill_quiet_secs),
                        ..PrefetchOptions::default()
                    },
                )
            });
            let options = RemoteOptions {
                fs: FsOptions {
                    passthrough: config.lazy.passthrough,
                    threads: config.lazy.fuse_threads.max(1),
                    whole_at_open_max: config.lazy.whole_at_open_mib << 20,
                    follow_imports: config.lazy.follow_imports,
                    ..FsOptions::default()
                },
                read_deadline: Duration::from_secs(config.lazy.read_deadline_secs.max(1)),
                fetch_ahead: config.lazy.fetch_ahead_kib << 10,
                fill: config.lazy.fill,
                follow_command: config.lazy.follow_command,
            };
            let native = if config.lazy.native {
                let at = cache.dir().join("erofs");
                Some(Arc::new(
                    NativeImages::open(&cache, puller_metrics.clone())
                        .map_err(io(format!("preparing {}", at.display())))?,
                ))
            } else {
                None
            };
            Some(Arc::new(RemoteLayers::new(
                client,
                cache,
                puller_metrics,
                runtime,
                options,
                Profiles {
                    tracer,
                    prefetcher,
                    prefetch: p.prefetch,
                },
                native,
            )))
        } else {
            tracing::info!("lazy mounts disabled: every layer is pulled in full");
            None
        };
        Ok(Daemon {
            config,
            core,
            remote,
            metrics,
            after_listening: None,
        })
    }

    /// Mounts the lazy layers recorded in the metadata again (after a restart
    /// or a crash) and removes directories no snapshot owns.
    pub async fn restore(&self) -> Result<(), StartError> {
        let core = self.core.clone();
        let records = tokio::task::spawn_blocking(move || -> Result<_, StartError> {
            let removed = core.cleanup()?;
            if removed > 0 {
                tracing::info!(
                    removed,
                    "removed directories left by interrupted operations"
                );
            }
            Ok(core.store().list()?)
        })
        .await
        .map_err(|e| StartError::Io {
            context: "restore task".into(),
            source: std::io::Error::other(e.to_string()),
        })??;
        let (mut ok, mut failed) = (0, 0);
        for (name, r) in records {
            let Some(src) = r.remote.as_ref().filter(|_| r.kind == Kind::Committed) else {
                continue;
            };
            let Some(remote) = &self.remote else {
                tracing::warn!(snapshot = %name, "lazy snapshot present but lazy mounts are disabled; it stays unmounted");
                failed += 1;
                continue;
            };
            match remote
                .mount(r.id, &self.core.fs_dir(r.id), src, false)
                .await
            {
                Ok(usage) => {
                    ok += 1;
                    // A daemon stopped before a lazy layer's index was built
                    // had not recorded its usage yet.
                    if (r.size, r.inodes) == (0, 0) && usage != (0, 0) {
                        let core = self.core.clone();
                        let name = name.clone();
                        let _ =
                            tokio::task::spawn_blocking(move || core.set_usage(&name, usage)).await;
                    }
                }
                Err(e) => {
                    failed += 1;
                    tracing::error!(snapshot = %name, "mounting a lazy layer again failed: {e}");
                }
            }
        }
        if ok + failed > 0 {
            tracing::info!(mounted = ok, failed, "lazy layers restored from metadata");
        }
        if let Some(remote) = &self.remote {
            self.metrics.lazy_mounts.set(remote.mounted() as i64);
        }
        Ok(())
    }

    fn bind_socket(path: &Path) -> Result<UnixListener, StartError> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(io(format!("creating {}", dir.display())))?;
        }
        if path.exists() {
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                return Err(StartError::SocketInUse(path.display().to_string()));
            }
            std::fs::remove_file(path).map_err(io(format!("removing stale {}", path.display())))?;
        }
        let listener =
            UnixListener::bind(path).map_err(io(format!("binding {}", path.display())))?;
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))
            .map_err(io(format!("setting the mode of {}", path.display())))?;
        Ok(listener)
    }

    /// Runs `hook` on a blocking thread as soon as the snapshots socket
    /// accepts connections (and the metrics and CRI listeners are bound):
    /// how the daemon plugs itself into containerd's config only once
    /// containerd can reach it.
    pub fn after_listening(&mut self, hook: impl FnOnce() + Send + 'static) {
        self.after_listening = Some(Box::new(hook));
    }

    /// Serves until `shutdown` completes, then unmounts the lazy layers.
    pub async fn serve(mut self, shutdown: impl Future<Output = ()>) -> Result<(), StartError> {
        let listener = Self::bind_socket(&self.config.address)?;
        let service = SnapshotsServer::new(SnapshotService::new(
            self.core.clone(),
            self.remote.clone(),
            self.metrics.clone(),
        ));
        let metrics_task = if self.config.metrics_address.is_empty() {
            None
        } else {
            let l = TcpListener::bind(&self.config.metrics_address)
                .await
                .map_err(io(format!("binding {}", self.config.metrics_address)))?;
            let address = l.local_addr().map(|a| a.to_string()).unwrap_or_default();
            tracing::info!(%address, "metrics at /metrics, health at /healthz");
            // On stdout too, for whoever started the daemon on port 0.
            println!("sluice-snapshotter metrics on http://{address}");
            Some(tokio::spawn(serve_metrics(l, self.metrics.clone())))
        };
        let cri_task = if self.config.cri.address.as_os_str().is_empty() {
            None
        } else {
            let l = Self::bind_socket(&self.config.cri.address)?;
            tracing::info!(socket = %self.config.cri.address.display(),
                containerd = %self.config.cri.containerd_address.display(),
                "CRI image-service proxy (kubelet's --image-service-endpoint)");
            // The lazy path's registry client, which the proxy teaches
            // kubelet's credentials.
            let proxy = CriProxy::new(
                self.config.cri.containerd_address.clone(),
                self.remote.as_ref().map(|r| r.client().clone()),
                self.metrics.clone(),
            );
            Some(tokio::spawn(proxy.serve(l)))
        };
        // Every listener is bound: containerd may be pointed here now, and
        // the line below tells a supervisor (or a test) the daemon is up.
        if let Some(hook) = self.after_listening.take() {
            tokio::task::spawn_blocking(hook);
        }
        tracing::info!(socket = %self.config.address.display(), "serving containerd's Snapshots API");
        println!(
            "sluice-snapshotter listening on {}",
            self.config.address.display()
        );
        tokio::pin!(shutdown);
        let mut connections = tokio::task::JoinSet::new();
        loop {
            tokio::select! {
                _ = &mut shutdown => break,
                accepted = listener.accept() => {
                    let stream = match accepted {
                        Ok((s, _)) => s,
                        Err(e) => {
                            tracing::warn!("accept on {}: {e}", self.config.address.display());
                            tokio::time::sleep(Duration::from_millis(50)).await;
                            continue;
                        }
                    };
                    let svc = TowerToHyperService::new(service.clone());
                    while connections.try_join_next().is_some() {}
                    connections.spawn(async move {
                        let conn = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                            .serve_connection(TokioIo::new(stream), svc);
                        if let Err(e) = conn.await {
                            tracing::debug!("gRPC connection ended: {e}");
                        }
                    });
                }
            }
        }
        tracing::info!("shutting down: unmounting lazy layers");
        connections.shutdown().await;
        for t in [metrics_task, cri_task].into_iter().flatten() {
            t.abort();
        }
        if !self.config.cri.address.as_os_str().is_empty() {
            let _ = std::fs::remove_file(&self.config.cri.address);
        }
        let _ = std::fs::remove_file(&self.config.address);
        if let Some(remote) = &self.remote {
            remote.unmount_all();
        }
        Ok(())
    }
}

async fn serve_metrics(listener: TcpListener, metrics: Arc<SnapshotterMetrics>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let svc =
                hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                    let metrics = metrics.clone();
                    async move {
                        let (status, body) = match req.uri().path() {
                            "/metrics" => (200, metrics.render()),
                            "/healthz" => (200, "ok\n".to_owned()),
                            _ => (404, "not found\n".to_owned()),
                        };
                        hyper::Response::builder()
                            .status(status)
                            .header(
                                "content-type",
                                if status == 200 && req.uri().path() == "/metrics" {
                                    "application/openmetrics-text; version=1.0.0; charset=utf-8"
                                } else {
                                    "text/plain"
                                },
                            )
                            .body(Full::new(Bytes::from(body)))
                    }
                });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

/// Publishes finished recordings to the registry (merged with the profile
/// already there), or only logs them when publishing is off.
///
/// Ends when the tracer is dropped: it holds the sending side of
/// `recordings`, so this task must not keep it alive (it did, and with it
/// the metrics and the chunk cache they reach, after the daemon stopped).
async fn publish_recordings(
    client: Arc<RegistryClient>,
    mut recordings: tokio::sync::mpsc::UnboundedReceiver<Recording>,
    publish: bool,
    tracer: std::sync::Weak<AccessTracer>,
    metrics: Arc<SnapshotterMetrics>,
) {
    while let Some(r) = recordings.recv().await {
        if let Some(tracer) = tracer.upgrade() {
            metrics.trace_dropped.set(tracer.dropped_events() as i64);
            for (kind, n) in tracer.recorded_events() {
                metrics
                    .trace_events
                    .get_or_create(&vec![("kind".to_owned(), kind.to_owned())])
                    .set(n as i64);
            }
        }
        metrics.profiles_recorded.inc();
        if !publish {
            continue;
        }
        let subject = match client.manifest(&r.image).await {
            Ok((bytes, media_type, digest)) => sluice_format::oci::Descriptor::new(
                media_type
                    .split(';')
                    .next()
                    .unwrap_or_default()
                    .trim()
                    .to_owned(),
                digest,
                bytes.len() as u64,
            ),
            Err(e) => {
                tracing::warn!(image = %r.image, "not publishing the profile: {e}");
                continue;
            }
        };
        match sluice_puller::profile::publish(&client, &r.image, &subject, &r.profile).await {
            Ok(merged) => {
                metrics.profiles_published.inc();
                tracing::info!(
                    image = %r.image,
                    entries = merged.entries.len(),
                    nodes = merged.nodes,
                    "prefetch profile published"
                );
            }
            Err(e) => tracing::warn!(image = %r.image, "publishing the profile: {e}"),
        }
    }
}
