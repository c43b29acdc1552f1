//! Shared by the puller's integration tests: an in-process sluice-registry and
//! the busybox test image pushed to it as zstd:chunked.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use sluice_format::chunked::ChunkingOptions;
use sluice_format::layout::Compression;
use sluice_format::oci::Manifest;
use sluice_puller::registry::RetryPolicy;
use std::sync::Arc;

use sluice_puller::fs::FsOptions;
use sluice_puller::{ChunkCache, ImageRef, LayerOptions, RegistryClient, RemoteLayer};
use sluice_registry::storage::FsStorage;
use sluice_registry::{Config, Registry};
use sluice_testkit::images::busybox_image;

/// sluice-registry running in this process on its own runtime.
pub struct InProcessRegistry {
    pub addr: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl InProcessRegistry {
    pub fn start(root: &Path, addr: &str) -> Self {
        Self::start_with(root, addr, false)
    }

    /// With `convert`, pushed plain images get lazy twins (convert-on-push).
    pub fn start_with(root: &Path, addr: &str, convert: bool) -> Self {
        let listener = std::net::TcpListener::bind(addr).unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let root = root.to_owned();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Runtime::new().unwrap();
            rt.block_on(async move {
                let cfg = Config {
                    root: root.clone(),
                    ..Config::default()
                };
                let mut cfg = cfg;
                cfg.convert.on_push = convert;
                let registry = Registry::new(FsStorage::open(&root).unwrap(), None, cfg);
                registry.start_converter();
                let listener = tokio::net::TcpListener::from_std(listener).unwrap();
                sluice_registry::server::serve(registry, listener, async {
                    let _ = rx.await;
                })
                .await
                .unwrap();
            });
        });
        InProcessRegistry {
            addr,
            stop: Some(tx),
            thread: Some(thread),
        }
    }

    pub fn stop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for InProcessRegistry {
    fn drop(&mut self) {
        self.stop();
    }
}

pub struct Fixture {
    pub dir: tempfile::TempDir,
    pub registry: InProcessRegistry,
    pub image: ImageRef,
    pub manifest: Manifest,
    pub roots: Vec<PathBuf>,
}

/// Builds the busybox test image, converts it to zstd:chunked and pushes it.
pub fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let img = busybox_image(&dir.path().join("img"), Compression::Gzip);
    let rootfs = dir.path().join("img/rootfs");
    let roots = vec![rootfs.join("base"), rootfs.join("app")];
    publish(
        dir,
        &img.layout,
        "fuse/busybox",
        &ChunkingOptions::with_average(16 * 1024, 3),
        roots,
    )
}

/// Converts the image tagged `v1` in `layout` to zstd:chunked and pushes it
/// as `repo:v1` to a fresh in-process registry. `roots` are the
/// trees its layers were built from, bottom first.
pub fn publish(
    dir: tempfile::TempDir,
    layout: &Path,
    repo: &str,
    chunking: &ChunkingOptions,
    roots: Vec<PathBuf>,
) -> Fixture {
    assert!(sluice_testkit::is_root(), "FUSE mounts need root");
    let lazy = dir.path().join("lazy");
    sluice_format::convert::convert_layout(layout, "v1", &lazy, "v1", chunking).unwrap();
    let registry = InProcessRegistry::start(&dir.path().join("registry"), "127.0.0.1:0");
    let reference = format!("{}/{repo}:v1", registry.addr);
    push_layout(&lazy, "v1", &reference);
    let image = ImageRef::parse(&reference).unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let client = RegistryClient::new(RetryPolicy::default());
    let (bytes, _, _) = rt.block_on(client.manifest(&image)).unwrap();
    let manifest = Manifest::parse(&bytes).unwrap();
    Fixture {
        registry,
        image,
        manifest,
        roots,
        dir,
    }
}

/// Pushes the image tagged `tag` in an OCI layout to `reference` with
/// sluice's own registry client: these tests also run in `cargo xtask
/// vm-test` guests, which have no skopeo (the registry's tests cover skopeo).
pub fn push_layout(layout: &Path, tag: &str, reference: &str) {
    let image = ImageRef::parse(reference).unwrap();
    let client = RegistryClient::new(RetryPolicy::default());
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(client.push_layout(layout, tag, &image))
        .unwrap_or_else(|e| panic!("pushing {} to {reference}: {e}", layout.display()));
}

/// A layer of a [`Fixture`] mounted over FUSE (unmounted on drop).
pub struct Mounted {
    pub _session: sluice_puller::fs::LazyMount,
    pub layer: Arc<RemoteLayer>,
    pub path: PathBuf,
}

/// Mounts layer `which` of `f` with the given client, cache and options.
pub fn mount_layer(
    rt: &tokio::runtime::Runtime,
    f: &Fixture,
    which: usize,
    client: Arc<RegistryClient>,
    cache: Arc<ChunkCache>,
    opts: LayerOptions,
    fs_opts: &FsOptions,
) -> Mounted {
    let desc = &f.manifest.layers.as_ref().unwrap()[which];
    let layer = Arc::new(
        rt.block_on(RemoteLayer::open(
            client,
            f.image.clone(),
            desc,
            cache,
            opts,
        ))
        .unwrap(),
    );
    let path = f.dir.path().join(format!("mnt-{which}-{}", rand_suffix()));
    std::fs::create_dir_all(&path).unwrap();
    let session =
        sluice_puller::fs::mount(layer.clone(), rt.handle().clone(), &path, fs_opts.clone())
            .unwrap();
    Mounted {
        _session: session,
        layer,
        path,
    }
}

/// Mounts layer `which` of `f` with a client of default retries and a fresh
/// 1 GiB chunk cache in `cache_dir`. The client is returned so that a test
/// can point it at mirrors once the layer's TOC came from the registry.
pub fn mount_fresh(
    rt: &tokio::runtime::Runtime,
    f: &Fixture,
    which: usize,
    cache_dir: &Path,
    fs_opts: &FsOptions,
) -> (Mounted, Arc<RegistryClient>) {
    let cache = Arc::new(ChunkCache::open(cache_dir, 1 << 30).unwrap());
    let client = Arc::new(RegistryClient::new(RetryPolicy::default()));
    let m = mount_layer(
        rt,
        f,
        which,
        client.clone(),
        cache,
        LayerOptions::default(),
        fs_opts,
    );
    (m, client)
}

pub fn rand_suffix() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos()
}

pub fn walk(root: &Path, rel: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(root.join(rel)).unwrap() {
        let e = e.unwrap();
        let r = rel.join(e.file_name());
        out.push(r.clone());
        if e.file_type().unwrap().is_dir() {
            walk(root, &r, out);
        }
    }
}

/// Where the kernel has BTF and the tracepoints, every page-cache hook in
/// `tracepoints` is of the kind `suffix` names.
pub fn assert_hooks_where_btf(tracepoints: &[String], suffix: &str) {
    if std::path::Path::new("/sys/kernel/btf/vmlinux").exists()
        && sluice_testkit::kernel::has_filemap_tracepoints()
    {
        let filemap: Vec<_> = tracepoints
            .iter()
            .filter(|t| t.starts_with("mm_filemap"))
            .collect();
        assert!(
            !filemap.is_empty() && filemap.iter().all(|t| t.ends_with(suffix)),
            "{tracepoints:?}"
        );
    }
}
