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

/// The Debian python3 rootfs fixture as a one-layer image, pushed; with the
/// rootfs it was built from.
pub fn python3_fixture() -> (Fixture, PathBuf) {
    let rootfs = sluice_testkit::fixture("python3").join("rootfs");
    let dir = tempfile::tempdir().unwrap();
    let layout = dir.path().join("py");
    sluice_format::layout::build_image(
        &layout,
        &sluice_format::layout::ImageSpec {
            layers: vec![rootfs.clone()],
            compression: Compression::None,
            cmd: vec![],
            env: vec![],
            tag: "v1".into(),
        },
    )
    .unwrap();
    let f = publish(
        dir,
        &layout,
        "py/python3",
        &ChunkingOptions::default(),
        vec![rootfs.clone()],
    );
    (f, rootfs)
}

/// A two-layer image: a plain base (`etc/hostname`, `gone`), and a top
/// layer written as tar by hand with what overlayfs reads from a layer: a
/// PAX extended attribute (`app/tool`: `user.sluice`), an opaque directory
/// (`etc/`) and a whiteout (`.wh.gone`).
pub fn xattr_fixture() -> Fixture {
    use sluice_format::layout::Layout;
    use sluice_format::oci::OCI_LAYER_TAR;

    let dir = tempfile::tempdir().unwrap();
    let plain = dir.path().join("plain");
    std::fs::create_dir_all(plain.join("etc")).unwrap();
    std::fs::write(plain.join("etc/hostname"), "sluice\n").unwrap();
    std::fs::write(plain.join("gone"), "hidden by the top layer\n").unwrap();
    let mut b = tar::Builder::new(Vec::new());
    let mut dir_header = tar::Header::new_ustar();
    dir_header.set_entry_type(tar::EntryType::Directory);
    dir_header.set_mode(0o755);
    dir_header.set_size(0);
    for d in ["app/", "etc/"] {
        b.append_data(&mut dir_header.clone(), d, std::io::empty())
            .unwrap();
    }
    let mut empty = tar::Header::new_ustar();
    empty.set_mode(0o644);
    empty.set_size(0);
    for marker in ["etc/.wh..wh..opq", ".wh.gone"] {
        b.append_data(&mut empty.clone(), marker, std::io::empty())
            .unwrap();
    }
    b.append_pax_extensions([("SCHILY.xattr.user.sluice", &b"layer value"[..])])
        .unwrap();
    let mut file = tar::Header::new_ustar();
    file.set_mode(0o755);
    file.set_size(5);
    b.append_data(&mut file, "app/tool", &b"tool\n"[..])
        .unwrap();
    let with_xattrs = b.into_inner().unwrap();

    let layout_dir = dir.path().join("layout");
    let layout = Layout::create(&layout_dir).unwrap();
    let (base, base_diff) = layout.put_layer(&plain, Compression::Gzip).unwrap();
    let top = layout.put_blob(OCI_LAYER_TAR, &with_xattrs).unwrap();
    layout
        .put_image(
            &[base, top.clone()],
            &[base_diff, top.digest],
            &[],
            &[],
            "v1",
        )
        .unwrap();
    publish(
        dir,
        &layout_dir,
        "fuse/xattrs",
        &ChunkingOptions::default(),
        vec![],
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

/// Layer `which` of `f`, mounted with the default options over a fresh
/// cache in the fixture's directory.
pub fn mount_default(rt: &tokio::runtime::Runtime, f: &Fixture, which: usize) -> Mounted {
    mount_fresh(
        rt,
        f,
        which,
        &f.dir.path().join("cache"),
        &FsOptions::default(),
    )
    .0
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

/// Asserts that every entry under `orig` is under `copy` with the same type,
/// mode, owner, mtime, content, link target, device number and (for files)
/// link count; returns how many files and devices it compared.
pub fn assert_same_tree(orig: &Path, copy: &Path) -> (usize, usize) {
    use std::os::unix::fs::MetadataExt;
    let mut paths = Vec::new();
    walk(orig, Path::new(""), &mut paths);
    let (mut files, mut devices) = (0, 0);
    for rel in &paths {
        let o = std::fs::symlink_metadata(orig.join(rel)).unwrap();
        let c = std::fs::symlink_metadata(copy.join(rel))
            .unwrap_or_else(|e| panic!("{}: {e}", rel.display()));
        let name = rel.display();
        assert_eq!(o.file_type(), c.file_type(), "{name}: type");
        assert_eq!(o.mode(), c.mode(), "{name}: mode");
        assert_eq!(
            (o.uid(), o.gid(), o.mtime()),
            (c.uid(), c.gid(), c.mtime()),
            "{name}"
        );
        if o.is_file() {
            assert_eq!(o.nlink(), c.nlink(), "{name}: links");
            assert!(
                std::fs::read(orig.join(rel)).unwrap() == std::fs::read(copy.join(rel)).unwrap(),
                "{name}: content"
            );
            files += 1;
        } else if o.file_type().is_symlink() {
            assert_eq!(
                std::fs::read_link(orig.join(rel)).unwrap(),
                std::fs::read_link(copy.join(rel)).unwrap()
            );
        } else if !o.is_dir() {
            assert_eq!(o.rdev(), c.rdev(), "{name}: device");
            devices += 1;
        }
    }
    let mut listed = Vec::new();
    walk(copy, Path::new(""), &mut listed);
    assert_eq!(paths.len(), listed.len(), "entries: {listed:?}");
    (files, devices)
}

/// `getxattr(2)` of `path`: the value, or the errno.
pub fn getxattr(path: &Path, name: &str) -> Result<Vec<u8>, i32> {
    use std::os::unix::ffi::OsStrExt;
    let p = std::ffi::CString::new(path.as_os_str().as_bytes()).unwrap();
    let n = std::ffi::CString::new(name).unwrap();
    let mut buf = vec![0u8; 256];
    // SAFETY: both strings are NUL-terminated and `buf` is as long as we say.
    let len = unsafe { libc::getxattr(p.as_ptr(), n.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    if len < 0 {
        return Err(std::io::Error::last_os_error().raw_os_error().unwrap_or(0));
    }
    buf.truncate(len as usize);
    Ok(buf)
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
