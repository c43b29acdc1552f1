//! Lazy layers on real FUSE mounts, served from a real registry: every file of
//! the test image read through the mount equals the original; random and
//! concurrent reads; a registry that goes away or returns corrupt bytes makes
//! reads fail with EIO, never hang, never serve or cache wrong bytes.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{
    fixture, getxattr, mount_default, mount_fresh, mount_layer, walk, Fixture, InProcessRegistry,
    Mounted,
};
use sluice_format::chunked::ChunkingOptions;
use sluice_format::layout::Compression;
use sluice_puller::fs::FsOptions;
use sluice_puller::registry::{HostConfig, RetryPolicy};
use sluice_puller::{ChunkCache, ImageRef, LayerOptions, RegistryClient, RemoteLayer};

#[test]
fn every_file_through_the_mount_equals_the_original() {
    let f = fixture();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let cache = Arc::new(ChunkCache::open(f.dir.path().join("cache"), 1 << 30).unwrap());
    let client = Arc::new(RegistryClient::new(RetryPolicy::default()));
    let metrics = sluice_puller::metrics::PullerMetrics::new(cache.clone());
    for (which, root) in f.roots.iter().enumerate() {
        let opts = LayerOptions {
            fetch_latency: Some(metrics.fetch_latency.clone()),
            ..LayerOptions::default()
        };
        let m = mount_layer(
            &rt,
            &f,
            which,
            client.clone(),
            cache.clone(),
            opts,
            &FsOptions::default(),
        );
        metrics.track(&m.layer);
        // Mounting fetched only the TOC: no file bytes yet.
        assert_eq!(m.layer.stats.fetched_bytes.load(Ordering::Relaxed), 0);
        let mut paths = Vec::new();
        walk(root, Path::new(""), &mut paths);
        let mut listed = Vec::new();
        walk(&m.path, Path::new(""), &mut listed);
        paths.sort();
        listed.sort();
        assert_eq!(paths, listed, "directory listings differ");
        for rel in &paths {
            let orig = std::fs::symlink_metadata(root.join(rel)).unwrap();
            let lazy = std::fs::symlink_metadata(m.path.join(rel)).unwrap();
            let name = rel.display();
            assert_eq!(orig.file_type(), lazy.file_type(), "{name}: type");
            assert_eq!(orig.mode() & 0o7777, lazy.mode() & 0o7777, "{name}: mode");
            assert_eq!(
                (orig.uid(), orig.gid()),
                (lazy.uid(), lazy.gid()),
                "{name}: owner"
            );
            assert_eq!(orig.mtime(), lazy.mtime(), "{name}: mtime");
            if orig.is_file() {
                assert_eq!(orig.len(), lazy.len(), "{name}: size");
                assert_eq!(
                    std::fs::read(root.join(rel)).unwrap(),
                    std::fs::read(m.path.join(rel)).unwrap(),
                    "{name}: content"
                );
            }
            if orig.file_type().is_symlink() {
                assert_eq!(
                    std::fs::read_link(root.join(rel)).unwrap(),
                    std::fs::read_link(m.path.join(rel)).unwrap()
                );
            }
        }
        if which == 1 {
            // Hard links are one inode.
            let a = std::fs::metadata(m.path.join("app/data/small.txt")).unwrap();
            let b = std::fs::metadata(m.path.join("app/data/small-link.txt")).unwrap();
            assert_eq!(a.ino(), b.ino());
            assert_eq!(a.nlink(), 2);
        }
        let blob = f.manifest.layers.as_ref().unwrap()[which].size;
        let fetched = m.layer.stats.fetched_bytes.load(Ordering::Relaxed);
        assert!(
            fetched <= blob,
            "fetched {fetched} bytes of a {blob}-byte layer: something was fetched twice"
        );
    }
}

/// Every read served by the daemon (as on a kernel without passthrough).
fn no_passthrough() -> FsOptions {
    FsOptions {
        passthrough: false,
        ..FsOptions::default()
    }
}

#[test]
fn random_and_concurrent_reads() {
    let f = fixture();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (m, _) = mount_fresh(&rt, &f, 1, &f.dir.path().join("cache"), &no_passthrough());
    let original = Arc::new(std::fs::read(f.roots[1].join("app/data/blob.bin")).unwrap());
    let path = m.path.join("app/data/blob.bin");
    let mut threads = Vec::new();
    for t in 0..8u64 {
        let (original, path) = (original.clone(), path.clone());
        threads.push(std::thread::spawn(move || {
            let file = std::fs::File::open(&path).unwrap();
            let mut seed = 0x1234_5678_9abc_def1u64 ^ (t << 7);
            for _ in 0..200 {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                let off = (seed % original.len() as u64) as usize;
                let len = ((seed >> 20) % 300_000) as usize + 1;
                let mut buf = vec![0u8; len];
                let n = file.read_at(&mut buf, off as u64).unwrap();
                let want = &original[off..(off + len).min(original.len())];
                assert_eq!(&buf[..n], want, "read of {len} at {off}");
            }
        }));
    }
    for t in threads {
        t.join().unwrap();
    }
    // Concurrent readers of the same chunks shared fetches.
    let blob = f.manifest.layers.as_ref().unwrap()[1].size;
    let fetched = m.layer.stats.fetched_bytes.load(Ordering::Relaxed);
    assert!(
        fetched <= blob,
        "fetched {fetched} of {blob}: duplicate fetches"
    );
}

#[test]
fn registry_gone_gives_eio_within_the_deadline_then_recovers() {
    let mut f = fixture();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let cache = Arc::new(ChunkCache::open(f.dir.path().join("cache"), 1 << 30).unwrap());
    let client = Arc::new(RegistryClient::new(RetryPolicy {
        attempts: 2,
        base_delay: Duration::from_millis(50),
        attempt_timeout: Duration::from_secs(2),
    }));
    let opts = LayerOptions {
        read_deadline: Duration::from_secs(5),
        ..LayerOptions::default()
    };
    let m = mount_layer(&rt, &f, 1, client, cache, opts, &no_passthrough());
    let addr = f.registry.addr;
    f.registry.stop();
    let started = Instant::now();
    let err = std::fs::read(m.path.join("app/data/blob.bin")).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(5), "expected EIO, got {err}");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "read hung for {:?}",
        started.elapsed()
    );
    // Metadata needs no registry.
    assert!(std::fs::metadata(m.path.join("app/start.sh")).is_ok());
    // The registry comes back on the same address: reads work again.
    f.registry = InProcessRegistry::start(&f.dir.path().join("registry"), &addr.to_string());
    let content = std::fs::read(m.path.join("app/data/blob.bin")).unwrap();
    assert_eq!(
        content,
        std::fs::read(f.roots[1].join("app/data/blob.bin")).unwrap()
    );
}

/// Has `client` try `mirrors` in order before the fixture's registry.
fn mirrors_first(client: &RegistryClient, f: &Fixture, mirrors: Vec<String>) {
    client
        .configure_host(
            &f.image.host,
            HostConfig {
                mirrors,
                ..HostConfig::default()
            },
        )
        .unwrap();
}

/// A TCP proxy in front of `upstream`: requests go through verbatim, and
/// `respond(server, client)` passes each connection's responses on.
fn proxy(upstream: SocketAddr, respond: fn(TcpStream, TcpStream)) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for client in listener.incoming() {
            let Ok(client) = client else { continue };
            std::thread::spawn(move || {
                let Ok(server) = TcpStream::connect(upstream) else {
                    return;
                };
                let mut to_server = client.try_clone().unwrap();
                let mut from_client = server.try_clone().unwrap();
                std::thread::spawn(move || {
                    let _ = std::io::copy(&mut to_server, &mut from_client);
                });
                respond(server, client);
            });
        }
    });
    addr
}

/// A TCP proxy that flips the first byte of every HTTP response body.
fn corrupting_proxy(upstream: SocketAddr) -> SocketAddr {
    proxy(upstream, |mut server, mut client| {
        // Responses: headers verbatim, first body byte flipped.
        let mut buf = Vec::new();
        let mut chunk = [0u8; 65536];
        loop {
            let n = match server.read(&mut chunk) {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            buf.extend_from_slice(&chunk[..n]);
            while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
                let len: usize = head
                    .lines()
                    .find_map(|l| {
                        l.strip_prefix("content-length:")
                            .map(|v| v.trim().parse().unwrap_or(0))
                    })
                    .unwrap_or(0);
                if buf.len() < end + 4 + len {
                    break;
                }
                let mut response: Vec<u8> = buf.drain(..end + 4 + len).collect();
                if len > 0 && head.starts_with("http/1.1 206") {
                    response[end + 4] ^= 0xff;
                }
                if client.write_all(&response).is_err() {
                    return;
                }
            }
        }
    })
}

/// Bytes of each connection's responses [`breaking_proxy`] passes on.
const BREAK_AFTER: usize = 1 << 20;

/// A TCP proxy that passes [`BREAK_AFTER`] bytes of each connection's
/// responses on, then closes it: a registry that dies in the middle of a body.
fn breaking_proxy(upstream: SocketAddr) -> SocketAddr {
    proxy(upstream, |mut server, mut client| {
        let mut left = BREAK_AFTER;
        let mut buf = [0u8; 65536];
        while left > 0 {
            let n = match server.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => n.min(left),
            };
            if client.write_all(&buf[..n]).is_err() {
                break;
            }
            left -= n;
        }
        let _ = client.shutdown(std::net::Shutdown::Both);
        let _ = server.shutdown(std::net::Shutdown::Both);
    })
}

/// A body that breaks off mid-range: the chunks that arrived before the break
/// are kept (cached as they came), and only the rest is fetched again, from
/// the next source.
#[test]
fn a_range_that_breaks_off_is_resumed_where_it_stopped() {
    let f = fixture();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let cache_dir = f.dir.path().join("cache");
    let (m, client) = mount_fresh(&rt, &f, 1, &cache_dir, &FsOptions::default());
    // One mirror that breaks every response off after 1 MiB, then the
    // registry itself.
    let proxy = breaking_proxy(f.registry.addr);
    mirrors_first(&client, &f, vec![proxy.to_string()]);
    let index = m.layer.index();
    let blob = index.lookup("app/data/blob.bin").unwrap();
    let chunks = index.file_chunks_of(blob);
    let first = chunks.first().unwrap();
    let last = chunks.last().unwrap();
    let range = last.blob_offset + last.blob_len - first.blob_offset;
    assert!(
        range > 2 * BREAK_AFTER as u64 && range < 4 << 20,
        "the file should come in one range, longer than the cut: {range}"
    );
    rt.block_on(m.layer.ensure(chunks)).unwrap();
    assert!(m.layer.is_local(blob));
    let requests = m.layer.stats.fetch_requests.load(Ordering::Relaxed);
    let fetched = m.layer.stats.fetched_bytes.load(Ordering::Relaxed);
    assert_eq!(requests, 2, "one broken request, one for the rest");
    let biggest = chunks.iter().map(|c| c.blob_len).max().unwrap();
    assert!(
        fetched <= range + biggest + 16 * 1024,
        "fetched {fetched} bytes for a range of {range}: the rest was not resumed where it stopped"
    );
    assert_eq!(
        std::fs::read(m.path.join("app/data/blob.bin")).unwrap(),
        std::fs::read(f.roots[1].join("app/data/blob.bin")).unwrap()
    );
    assert_cache_is_clean(&m.layer);
}

/// Every entry in the layer's cache (files and packs) hashes to its digest.
fn assert_cache_is_clean(layer: &RemoteLayer) {
    let (_, corrupt) = layer.cache().check();
    assert!(corrupt.is_empty(), "corrupt chunks cached: {corrupt:?}");
}

#[test]
fn corrupt_bytes_are_never_served_nor_cached() {
    let f = fixture();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let desc = f.manifest.layers.as_ref().unwrap()[1].clone();
    let proxy = corrupting_proxy(f.registry.addr);
    let original = std::fs::read(f.roots[1].join("app/data/blob.bin")).unwrap();

    // 1. A corrupt mirror in front of a healthy registry: the bad bytes are
    //    rejected, the refetch goes to the registry, the read succeeds.
    let no_passthrough = no_passthrough();
    let cache_dir = f.dir.path().join("cache-mirror");
    // The TOC comes from the registry itself; the mirror is added afterwards.
    let (m, client) = mount_fresh(&rt, &f, 1, &cache_dir, &no_passthrough);
    mirrors_first(&client, &f, vec![proxy.to_string()]);
    assert_eq!(
        std::fs::read(m.path.join("app/data/blob.bin")).unwrap(),
        original
    );
    assert_cache_is_clean(&m.layer);
    drop(m);

    // 2. The only source is corrupt: EIO, and nothing corrupt in the cache.
    let cache_dir = f.dir.path().join("cache-corrupt");
    let (m, client) = mount_fresh(&rt, &f, 1, &cache_dir, &no_passthrough);
    // Three corrupt mirrors for three verification attempts: every attempt
    // gets answered, with bad bytes.
    mirrors_first(&client, &f, vec![proxy.to_string(); 3]);
    let err = std::fs::read(m.path.join("app/data/blob.bin")).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(5), "expected EIO, got {err}");
    assert_cache_is_clean(&m.layer);
    assert!(m.layer.stats.failed_reads.load(Ordering::Relaxed) > 0);

    // 3. A TOC with bad bytes never mounts.
    let bad_image = ImageRef::parse(&format!("{proxy}/fuse/busybox:v1")).unwrap();
    let cache = Arc::new(ChunkCache::open(f.dir.path().join("cache-toc"), 1 << 30).unwrap());
    let client = Arc::new(RegistryClient::new(RetryPolicy::default()));
    let err = rt
        .block_on(RemoteLayer::open(
            client,
            bad_image,
            &desc,
            cache,
            LayerOptions::default(),
        ))
        .expect_err("a corrupt TOC must not open");
    assert!(err.to_string().contains("TOC"), "{err}");
}

/// The app layer mounted with only small files (≤ 64 KiB) fetched at open
/// and files over 1 MiB made whole in the background, its 3 MiB file's path
/// in the mount and that file's original bytes.
fn app_layer_with_a_big_file() -> (Fixture, tokio::runtime::Runtime, Mounted, PathBuf, Vec<u8>) {
    let f = fixture();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let opts = FsOptions {
        open_fetch_max: 64 * 1024,
        whole_at_open_max: 1 << 20,
        ..FsOptions::default()
    };
    let (m, _) = mount_fresh(&rt, &f, 1, &f.dir.path().join("cache"), &opts);
    let big = m.path.join("app/data/blob.bin");
    let original = std::fs::read(f.roots[1].join("app/data/blob.bin")).unwrap();
    (f, rt, m, big, original)
}

#[test]
fn local_files_are_passed_through_to_the_kernel() {
    let (f, _rt, m, big, original) = app_layer_with_a_big_file();
    let passthrough = sluice_testkit::kernel::has_fuse_passthrough();
    if !passthrough {
        eprintln!("kernel {:?} has no FUSE passthrough (6.9+): checking that the daemon serves every read instead", sluice_testkit::kernel::version());
    }
    let opens = || m.layer.stats.passthrough_opens.load(Ordering::Relaxed);
    // A small file is fetched whole at open and served by the daemon from
    // the cache's packs: it has no file of its own to hand the kernel. Where
    // opens come to the daemon (passthrough kernels), its bytes are put into
    // the page cache before the open is answered, and no READ follows.
    let start = m.layer.index().lookup("app/start.sh").unwrap();
    let start_bytes = std::fs::read(f.roots[1].join("app/start.sh")).unwrap();
    assert!(!m.layer.is_local(start));
    let served = || m.layer.stats.served_bytes.load(Ordering::Relaxed);
    let stored = || m.layer.stats.stored_opens.load(Ordering::Relaxed);
    for (n, pass) in ["cold", "warm"].into_iter().enumerate() {
        std::fs::write("/proc/sys/vm/drop_caches", "3").unwrap();
        let before = served();
        assert_eq!(
            std::fs::read(m.path.join("app/start.sh")).unwrap(),
            start_bytes
        );
        assert!(m.layer.is_local(start), "{pass}");
        // Each byte served once: by the store at open, or by READs.
        assert_eq!(served() - before, start_bytes.len() as u64, "{pass}");
        assert_eq!(opens(), 0, "{pass}: passthrough of a small file");
        let want = if passthrough { n as u64 + 1 } else { 0 };
        assert_eq!(stored(), want, "{pass}: opens stored in the page cache");
    }
    // A large one is served lazily by the daemon until it is complete...
    assert_eq!(std::fs::read(&big).unwrap(), original);
    assert_eq!(opens(), 0);
    // ...and the first open once it is local: the daemon serves it from the
    // chunks while the whole file is assembled in the background (the open
    // does not wait for that copy)...
    let node = m.layer.index().lookup("app/data/blob.bin").unwrap();
    assert!(m.layer.is_local(node) && !m.layer.is_whole(node));
    let before = served();
    std::fs::write("/proc/sys/vm/drop_caches", "3").unwrap();
    assert_eq!(std::fs::read(&big).unwrap(), original);
    assert_eq!(served() - before, original.len() as u64);
    if passthrough {
        wait_for("the whole file was never made", || m.layer.is_whole(node));
    } else {
        assert!(!m.layer.is_whole(node), "a copy made for nothing");
    }
    assert_eq!(opens(), 0);
    // ...then new opens go to the kernel: with the page cache dropped, reading
    // it again does not reach the daemon at all (without passthrough, the
    // daemon serves it again, from the cache).
    let served_before = served();
    std::fs::write("/proc/sys/vm/drop_caches", "3").unwrap();
    assert_eq!(std::fs::read(&big).unwrap(), original);
    let served_again = served() - served_before;
    if passthrough {
        assert_eq!(opens(), 1);
        assert_eq!(served_again, 0, "reads reached the daemon");
    } else {
        assert_eq!(opens(), 0);
        assert_eq!(served_again, original.len() as u64);
    }
    // Where there is no passthrough, the kernel was told to open files
    // itself at the first open; with it, every open is the daemon's.
    assert_eq!(
        m.layer.stats.skipped_opens.load(Ordering::Relaxed),
        u64::from(!passthrough)
    );
}

/// Without passthrough an open has nothing to hand the kernel: the first one
/// is answered ENOSYS and the kernel opens files itself for the rest of the
/// mount, so reading a file costs a lookup and its reads, not an OPEN and a
/// RELEASE as well. Every file still reads back right, cold and warm, and a
/// write open is still refused (by the read-only mount now).
#[test]
fn without_passthrough_the_kernel_opens_files_itself() {
    let f = fixture();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (m, _) = mount_fresh(&rt, &f, 1, &f.dir.path().join("cache"), &no_passthrough());
    let mut paths = Vec::new();
    walk(&f.roots[1], Path::new(""), &mut paths);
    paths.retain(|p| f.roots[1].join(p).symlink_metadata().unwrap().is_file());
    assert!(paths.len() > 3, "{paths:?}");
    let skipped = || m.layer.stats.skipped_opens.load(Ordering::Relaxed);
    for pass in ["cold", "warm"] {
        std::fs::write("/proc/sys/vm/drop_caches", "3").unwrap();
        for rel in &paths {
            assert_eq!(
                std::fs::read(m.path.join(rel)).unwrap(),
                std::fs::read(f.roots[1].join(rel)).unwrap(),
                "{pass}: {}",
                rel.display()
            );
        }
        assert_eq!(skipped(), 1, "{pass}: opens the daemon was asked about");
    }
    assert!(m.layer.stats.served_bytes.load(Ordering::Relaxed) > 0);
    assert_eq!(m.layer.stats.passthrough_opens.load(Ordering::Relaxed), 0);
    let write = std::fs::OpenOptions::new()
        .write(true)
        .open(m.path.join(&paths[0]))
        .unwrap_err();
    assert_eq!(write.raw_os_error(), Some(libc::EROFS), "{write}");
}

/// A layer never changes, so the kernel may keep its answers to lookups:
/// a name that is there and a name that is not each cost one `LOOKUP` per
/// mount (overlayfs looks every path up in each layer above the one that
/// has it, for every new container).
#[test]
fn lookups_found_or_not_are_answered_once() {
    let f = fixture();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let m = mount_default(&rt, &f, 1);
    let lookups = || m.layer.stats.lookups.load(Ordering::Relaxed);
    let before = lookups();
    for _ in 0..3 {
        let missing = m
            .path
            .join("app/no-such-file")
            .symlink_metadata()
            .unwrap_err();
        assert_eq!(missing.raw_os_error(), Some(libc::ENOENT), "{missing}");
        assert!(m.path.join("app").symlink_metadata().unwrap().is_dir());
    }
    // `app` and `app/no-such-file`, once each.
    assert_eq!(lookups() - before, 2);
}

/// The kernel refuses (EIO) a passthrough open of an inode that still has an
/// open served through the page cache. A file still open (or mapped, as a
/// running program is) from before it was complete must open again normally,
/// as the next `exec` of that program does; once all such opens are closed,
/// new opens are passed through.
#[test]
fn a_file_still_open_from_before_it_was_complete_opens_again() {
    use std::io::Read;
    let (_f, _rt, m, big, original) = app_layer_with_a_big_file();
    let mut first = std::fs::File::open(&big).unwrap();
    let mut bytes = Vec::new();
    first.read_to_end(&mut bytes).unwrap();
    assert_eq!(bytes, original);
    assert!(m
        .layer
        .is_local(m.layer.index().lookup("app/data/blob.bin").unwrap()));
    // Complete now, but `first` is still open through the page cache.
    assert_eq!(std::fs::read(&big).unwrap(), original);
    assert_eq!(m.layer.stats.passthrough_opens.load(Ordering::Relaxed), 0);
    drop(first);
    if !sluice_testkit::kernel::has_fuse_passthrough() {
        // Nothing to switch to: every open keeps being served by the daemon.
        assert_eq!(std::fs::read(&big).unwrap(), original);
        assert_eq!(m.layer.stats.passthrough_opens.load(Ordering::Relaxed), 0);
        return;
    }
    // FUSE releases asynchronously: wait for the daemon to see it.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        assert_eq!(std::fs::read(&big).unwrap(), original);
        if m.layer.stats.passthrough_opens.load(Ordering::Relaxed) > 0 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "opens not passed through after the last cached open was closed"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn debian_python3_rootfs_reads_identically_through_the_mount() {
    let (f, rootfs) = common::python3_fixture();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let m = mount_default(&rt, &f, 0);
    let (files, devices) = common::assert_same_tree(&rootfs, &m.path);
    assert!(
        files > 1000 && devices > 0,
        "{files} files, {devices} devices"
    );
    assert!(m.layer.stats.passthrough_opens.load(Ordering::Relaxed) > 0);
}

/// Extended attributes through the mount: a layer that has them serves each
/// one (and an opaque directory's `trusted.overlay.opaque`, as overlayfs
/// expects); in a layer without any, the kernel answers "not supported"
/// itself once the daemon has told it so.
#[test]
fn extended_attributes_through_the_mount() {
    let f = common::xattr_fixture();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let cache = f.dir.path().join("cache");

    let (top, top_client) = mount_fresh(&rt, &f, 1, &cache, &FsOptions::default());
    assert_eq!(
        getxattr(&top.path.join("app/tool"), "user.sluice").as_deref(),
        Ok(&b"layer value"[..])
    );
    assert_eq!(
        getxattr(&top.path.join("etc"), "trusted.overlay.opaque").as_deref(),
        Ok(&b"y"[..])
    );
    assert_eq!(
        getxattr(&top.path.join("app/tool"), "user.other"),
        Err(libc::ENODATA)
    );
    assert_eq!(
        getxattr(&top.path.join("app"), "trusted.overlay.opaque"),
        Err(libc::ENODATA)
    );

    // The same cache, as one daemon's layers share it.
    let base = mount_layer(
        &rt,
        &f,
        0,
        top_client,
        top.layer.cache().clone(),
        LayerOptions::default(),
        &FsOptions::default(),
    );
    // "Not supported" rather than "no such attribute": the kernel answers
    // without asking the daemon (which is the point: no round trip).
    for (path, name) in [
        ("etc/hostname", "user.sluice"),
        ("etc", "trusted.overlay.opaque"),
    ] {
        for _ in 0..2 {
            assert_eq!(
                getxattr(&base.path.join(path), name),
                Err(libc::EOPNOTSUPP),
                "{path} {name}"
            );
        }
    }
    assert_eq!(
        std::fs::read_to_string(base.path.join("etc/hostname")).unwrap(),
        "sluice\n"
    );
}

/// Publishes a one-layer image of directory `root` (under `dir`) as `repo`
/// and mounts that layer with the default options and an empty cache.
fn publish_one_layer_and_mount(
    dir: tempfile::TempDir,
    root: PathBuf,
    repo: &str,
) -> (Fixture, tokio::runtime::Runtime, Mounted) {
    use sluice_format::layout::Layout;

    let layout_dir = dir.path().join("layout");
    let layout = Layout::create(&layout_dir).unwrap();
    let (layer, diff) = layout.put_layer(&root, Compression::Gzip).unwrap();
    layout.put_image(&[layer], &[diff], &[], &[], "v1").unwrap();
    let f = common::publish(
        dir,
        &layout_dir,
        repo,
        &ChunkingOptions::default(),
        vec![root],
    );
    let rt = tokio::runtime::Runtime::new().unwrap();
    let m = mount_default(&rt, &f, 0);
    (f, rt, m)
}

/// A program reading big files one after the other in layer order (a
/// checksum over a data set) gets the files after them fetched ahead; when a
/// file was made local that way, its open is passed through to the kernel
/// and its reads never reach the daemon, so the open must carry the stream
/// on, or every few files the reader would stall on a cold one.
#[test]
fn a_stream_through_big_files_goes_on_past_files_already_local() {
    const PARTS: usize = 8;
    const PART_BYTES: usize = 2 << 20;
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    std::fs::create_dir_all(root.join("data")).unwrap();
    let parts: Vec<Vec<u8>> = (0..PARTS)
        .map(|i| sluice_testkit::images::pseudo_random(PART_BYTES, 71 + 2 * i as u64))
        .collect();
    for (i, p) in parts.iter().enumerate() {
        std::fs::write(root.join(format!("data/part-{i}.bin")), p).unwrap();
    }
    let (_f, _rt, m) = publish_one_layer_and_mount(dir, root, "fuse/stream");
    let node = |i: usize| {
        m.layer
            .index()
            .lookup(&format!("data/part-{i}.bin"))
            .expect("part in the index")
    };
    // Share of a part's chunks in the cache: windows are counted in
    // compressed bytes, so a window "6 MiB past a file" may end a chunk
    // short of the third file after it.
    let local_share = |i: usize| {
        let chunks = m.layer.index().file_chunks_of(node(i));
        let local = chunks
            .iter()
            .filter(|c| m.layer.has_chunk(&c.digest))
            .count();
        local as f64 / chunks.len() as f64
    };
    let local_within = |i: usize, wait: Duration| {
        let until = Instant::now() + wait;
        while local_share(i) < 0.9 {
            if Instant::now() > until {
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        true
    };
    let read = |i: usize| std::fs::read(m.path.join(format!("data/part-{i}.bin"))).unwrap();

    // Parts 0 and 1 are read cold, through the daemon: the stream starts at
    // part 1 (it follows part 0) and reaches 6 MiB past its end.
    assert!(read(0) == parts[0] && read(1) == parts[1]);
    for i in 2..5 {
        assert!(
            local_within(i, Duration::from_secs(20)),
            "part {i} fetched ahead"
        );
    }
    assert!(local_share(5) < 0.5, "the stream went further than asked");
    // Part 2 is local: passed through where the kernel can; either way its
    // open or reads carry the stream on to part 5.
    assert!(read(2) == parts[2]);
    assert!(
        local_within(5, Duration::from_secs(20)),
        "the stream stopped at a file that was local (passthrough: {})",
        m.layer.stats.passthrough_opens.load(Ordering::Relaxed)
    );
    for (i, part) in parts.iter().enumerate().skip(3) {
        assert!(read(i) == *part, "part {i}");
    }
}

/// A file that starts as an ELF object is one the loader maps: its first
/// read (the header) does not start a sequential readahead through it, as
/// it does for other files (measured on numpy-pandas: megabytes of
/// libraries fetched that startup never touched).
#[test]
fn a_library_read_at_its_start_is_not_read_ahead_but_a_data_file_is() {
    const FILE_BYTES: usize = 6 << 20;
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    std::fs::create_dir_all(root.join("lib")).unwrap();
    std::fs::create_dir_all(root.join("data")).unwrap();
    let mut library = sluice_testkit::images::pseudo_random(FILE_BYTES, 91);
    library[..4].copy_from_slice(b"\x7fELF");
    let data = sluice_testkit::images::pseudo_random(FILE_BYTES, 93);
    std::fs::write(root.join("lib/libbig.so"), &library).unwrap();
    std::fs::write(root.join("data/big.bin"), &data).unwrap();
    let (_f, _rt, m) = publish_one_layer_and_mount(dir, root, "fuse/elf");
    // Share of the file's chunks past its first half that are cached.
    let second_half_local = |path: &str| {
        let node = m.layer.index().lookup(path).expect("in the index");
        let chunks = m.layer.index().file_chunks_of(node);
        let half: Vec<_> = chunks
            .iter()
            .filter(|c| c.file_offset >= FILE_BYTES as u64 / 2)
            .collect();
        let local = half.iter().filter(|c| m.layer.has_chunk(&c.digest)).count();
        local as f64 / half.len() as f64
    };
    let header = |path: &str, want: &[u8]| {
        let mut buf = [0u8; 64];
        let f = std::fs::File::open(m.path.join(path)).unwrap();
        f.read_exact_at(&mut buf, 0).unwrap();
        assert_eq!(&buf[..], &want[..64]);
    };

    header("lib/libbig.so", &library);
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(
        second_half_local("lib/libbig.so"),
        0.0,
        "a library's header read fetched it ahead"
    );

    header("data/big.bin", &data);
    wait_for("a data file read at its start was not read ahead", || {
        second_half_local("data/big.bin") == 1.0
    });
}

/// Whether every chunk of `path` in the mounted layer is cached.
fn all_local(m: &Mounted, path: &str) -> bool {
    let index = m.layer.index();
    let node = index.lookup(path).expect("in the index");
    index
        .file_chunks_of(node)
        .iter()
        .all(|c| m.layer.has_chunk(&c.digest))
}

/// Waits up to 20 s for `done`; fails with `what` after that.
fn wait_for(what: &str, done: impl Fn() -> bool) {
    let until = Instant::now() + Duration::from_secs(20);
    while !done() {
        assert!(Instant::now() < until, "{what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A mapped library whose pages fault in here and there (its code runs)
/// is fetched whole at its second fault that waits; its header read and one
/// fault alone (the loader's relocations) do not fetch it.
#[test]
fn a_library_that_faults_twice_is_fetched_whole() {
    const MIB: usize = 1 << 20;
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    std::fs::create_dir_all(root.join("lib")).unwrap();
    let mut library = sluice_testkit::images::pseudo_random(6 * MIB, 95);
    library[..4].copy_from_slice(b"\x7fELF");
    std::fs::write(root.join("lib/libcode.so"), &library).unwrap();
    let (_f, _rt, m) = publish_one_layer_and_mount(dir, root, "fuse/faults");
    let index = m.layer.index();
    let node = index.lookup("lib/libcode.so").unwrap();
    // Share of the last MiB's chunks that are cached.
    let tail_local = || {
        let tail: Vec<_> = index
            .file_chunks_of(node)
            .iter()
            .filter(|c| c.file_offset >= 5 * MIB as u64)
            .collect();
        tail.iter().filter(|c| m.layer.has_chunk(&c.digest)).count() as f64 / tail.len() as f64
    };
    let f = std::fs::File::open(m.path.join("lib/libcode.so")).unwrap();
    let mut buf = vec![0u8; 4096];
    for (at, settle) in [(0, true), (MIB, true), (3 * MIB, false)] {
        f.read_exact_at(&mut buf, at as u64).unwrap();
        assert_eq!(buf, library[at..at + 4096]);
        if settle {
            std::thread::sleep(Duration::from_secs(1));
            assert_eq!(
                tail_local(),
                0.0,
                "a library was fetched whole after a read at {at}"
            );
        }
    }
    wait_for("a library that faulted twice was not fetched whole", || {
        tail_local() == 1.0
    });
    let mut all = Vec::new();
    std::fs::File::open(m.path.join("lib/libcode.so"))
        .unwrap()
        .read_to_end(&mut all)
        .unwrap();
    assert!(all == library, "the library read back differs");
}

/// The second file of a directory that has to be fetched brings the rest of
/// the directory (a program reading its data files one after another); a
/// directory too big for that (shared libraries) is left to its readers.
/// (`.pyc` files are not fetched that way when imports are followed: what a
/// module imports is fetched file by file, see `python.rs`.)
#[test]
fn a_directory_whose_second_file_is_fetched_comes_whole_unless_big() {
    const FILE_BYTES: usize = 64 << 10;
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    let mut files = Vec::new();
    // 40 files (2.5 MiB) in pkg, 96 (6 MiB) in big: incompressible, so the
    // 512 KiB fetched after each file reach about eight files.
    for (sub, n) in [("pkg", 40), ("big", 96)] {
        std::fs::create_dir_all(root.join(sub)).unwrap();
        for i in 0..n {
            let path = format!("{sub}/m{i:03}.dat");
            let data = sluice_testkit::images::pseudo_random(FILE_BYTES, 200 + files.len() as u64);
            std::fs::write(root.join(&path), &data).unwrap();
            files.push((path, data));
        }
    }
    let (_f, _rt, m) = publish_one_layer_and_mount(dir, root, "fuse/directory");
    let read = |path: &str| {
        let want = &files.iter().find(|(p, _)| p == path).unwrap().1;
        assert!(
            std::fs::read(m.path.join(path)).unwrap() == *want,
            "{path} differs"
        );
    };
    let local = |sub: &str, range: std::ops::Range<usize>| {
        range
            .filter(|i| all_local(&m, &format!("{sub}/m{i:03}.dat")))
            .count()
    };

    for sub in ["pkg", "big"] {
        read(&format!("{sub}/m000.dat"));
        std::thread::sleep(Duration::from_secs(1));
        assert_eq!(
            local(sub, 20..30),
            0,
            "{sub}: one file fetched its directory"
        );
    }
    read("pkg/m039.dat");
    wait_for(
        "a small directory's second fetched file did not bring the rest",
        || local("pkg", 0..40) == 40,
    );
    read("big/m095.dat");
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(
        local("big", 30..60),
        0,
        "a directory bigger than the limit was fetched whole"
    );
    for (path, _) in &files {
        read(path);
    }
}

/// While a prefetch profile's work for the layer is queued or running, a
/// reader that waits fetches what it reads and nothing after it: the profile
/// says what comes next, and guesses in layer order would take the link from
/// it. Once the profile's work is gone, waiting readers fetch ahead again.
#[test]
fn a_pending_profile_stops_fetches_ahead_of_waiting_readers() {
    use sluice_puller::prefetch::{PrefetchEntry, PrefetchOptions, Prefetcher};

    const FILE_BYTES: usize = 64 << 10;
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    std::fs::create_dir_all(root.join("pkg")).unwrap();
    let mut files = Vec::new();
    for i in 0..40 {
        let path = format!("pkg/m{i:03}.dat");
        let data = sluice_testkit::images::pseudo_random(FILE_BYTES, 900 + i);
        std::fs::write(root.join(&path), &data).unwrap();
        files.push((path, data));
    }
    let (_f, rt, m) = publish_one_layer_and_mount(dir, root, "fuse/profiled");
    let read = |i: usize| {
        let (path, want) = &files[i];
        assert!(
            std::fs::read(m.path.join(path)).unwrap() == *want,
            "{path} differs"
        );
    };
    let local = |range: std::ops::Range<usize>| {
        range
            .filter(|i| all_local(&m, &format!("pkg/m{i:03}.dat")))
            .count()
    };
    // A profile naming the last file, fetched at a trickle: pending for
    // seconds.
    let prefetcher = Prefetcher::start(
        rt.handle(),
        PrefetchOptions {
            concurrency: 1,
            bytes_per_second: 20_000,
            ..PrefetchOptions::default()
        },
    );
    let entry = PrefetchEntry {
        path: "pkg/m039.dat".into(),
        offset: 0,
        len: FILE_BYTES as u64,
        order: 0,
    };
    assert_eq!(prefetcher.prefetch_profile(&m.layer, &[entry]), 1);
    assert!(m.layer.profile_pending());

    // Two files of one directory, each waiting: neither the files after
    // them in the layer nor the rest of the directory come along.
    read(0);
    read(1);
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(local(2..39), 0, "a waiting reader fetched ahead");
    assert_eq!(m.layer.stats.fetched_ahead_bytes.load(Ordering::Relaxed), 0);

    prefetcher.cancel(m.layer.digest());
    wait_for("the cancelled profile still counts as pending", || {
        !m.layer.profile_pending()
    });
    read(10);
    wait_for(
        "without a profile pending, a waiting reader fetched nothing ahead",
        || local(11..14) == 3,
    );
}

/// Runs `f` on a thread; its result arrives on the receiver.
fn asked<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> std::sync::mpsc::Receiver<T> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx
}

/// A layer mounted before its index is built (the snapshotter answers a
/// pull's `Prepare` once the TOC is verified): requests wait for the layer
/// rather than see an empty tree, then see it whole; a layer that cannot be
/// opened fails them with EIO; a mount dropped before its layer came
/// answers the requests waiting on it and unmounts.
#[test]
fn requests_to_a_layer_mounted_before_its_index_wait_for_it() {
    let f = fixture();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let cache = Arc::new(ChunkCache::open(f.dir.path().join("cache"), 1 << 30).unwrap());
    let client = Arc::new(RegistryClient::new(RetryPolicy::default()));
    let desc = &f.manifest.layers.as_ref().unwrap()[1];
    let fetch = || {
        rt.block_on(RemoteLayer::fetch_toc(
            client.clone(),
            f.image.clone(),
            desc,
            cache.clone(),
            LayerOptions::default(),
        ))
        .unwrap()
    };
    let mount_at = |name: &str| {
        let path = f.dir.path().join(name);
        std::fs::create_dir_all(&path).unwrap();
        let m = sluice_puller::fs::mount_pending(
            &desc.digest,
            rt.handle().clone(),
            &path,
            FsOptions::default(),
        )
        .unwrap();
        (m, path)
    };
    let original = std::fs::read(f.roots[1].join("app/data/small.txt")).unwrap();

    // Served once the index is there.
    let toc = fetch();
    let (mount, path) = mount_at("early");
    let file = path.join("app/data/small.txt");
    let rx = asked(move || std::fs::read(&file));
    assert!(
        rx.recv_timeout(Duration::from_millis(500)).is_err(),
        "a read was answered before the layer was handed to the mount"
    );
    let layer = Arc::new(toc.open().unwrap());
    assert!(mount.slot().serve(Ok(layer)));
    let read = rx
        .recv_timeout(Duration::from_secs(30))
        .expect("the read still waits");
    assert_eq!(read.unwrap(), original);
    assert!(
        !mount.slot().serve(Err("too late".into())),
        "only the first outcome counts"
    );
    assert_eq!(mount.failed(), None);
    let mut listed = Vec::new();
    walk(&path, Path::new(""), &mut listed);
    let mut paths = Vec::new();
    walk(&f.roots[1], Path::new(""), &mut paths);
    listed.sort();
    paths.sort();
    assert_eq!(listed, paths);
    drop(mount);

    // A layer that cannot be opened: EIO, for the waiting request and after.
    let (mount, path) = mount_at("failed");
    let dir = path.join("app");
    let rx = asked(move || std::fs::symlink_metadata(&dir));
    assert!(rx.recv_timeout(Duration::from_millis(500)).is_err());
    assert!(mount.slot().serve(Err("TOC: not valid JSON".into())));
    let waited = rx
        .recv_timeout(Duration::from_secs(30))
        .expect("still waits");
    assert_eq!(waited.unwrap_err().raw_os_error(), Some(libc::EIO));
    assert_eq!(mount.failed(), Some("TOC: not valid JSON"));
    let later = std::fs::read(path.join("app/data/small.txt")).unwrap_err();
    assert_eq!(later.raw_os_error(), Some(libc::EIO));
    drop(mount);

    // Dropped before the layer came: the waiting request is answered, the
    // drop returns, and what the mount was stacked on (a tmpfs here) is
    // there again, untouched.
    let under = f.dir.path().join("dropped");
    std::fs::create_dir_all(&under).unwrap();
    let c = |s: &str| std::ffi::CString::new(s).unwrap();
    let under_c = c(under.to_str().unwrap());
    // SAFETY: valid C strings; a plain tmpfs mount.
    let rc = unsafe {
        libc::mount(
            c("tmpfs").as_ptr(),
            under_c.as_ptr(),
            c("tmpfs").as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    assert_eq!(
        rc,
        0,
        "mounting a tmpfs: {}",
        std::io::Error::last_os_error()
    );
    // Detached however the test ends: a failed assertion below would
    // otherwise leave the tmpfs mounted in the test's temporary directory.
    struct Detach(std::ffi::CString);
    impl Drop for Detach {
        fn drop(&mut self) {
            // SAFETY: a valid C string.
            unsafe { libc::umount2(self.0.as_ptr(), libc::MNT_DETACH) };
        }
    }
    let tmpfs = Detach(under_c);
    std::fs::write(under.join("marker"), b"below").unwrap();
    let (mount, path) = mount_at("dropped");
    let dir = path.join("app");
    let rx = asked(move || std::fs::symlink_metadata(&dir));
    assert!(rx.recv_timeout(Duration::from_millis(500)).is_err());
    asked(move || drop(mount))
        .recv_timeout(Duration::from_secs(30))
        .expect("dropping the mount hangs");
    let waited = rx
        .recv_timeout(Duration::from_secs(30))
        .expect("still waits");
    assert!(waited.is_err(), "{waited:?}");
    assert_eq!(std::fs::read(path.join("marker")).unwrap(), b"below");
    drop(tmpfs);
    assert_eq!(std::fs::read_dir(&path).unwrap().count(), 0);
}
