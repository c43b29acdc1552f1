//! The whole node path without containerd: a plain gzip image is pushed, the
//! registry converts it on push, the node resolves the lazy twins, mounts each
//! layer over FUSE, stacks them with overlayfs as containerd's overlay
//! snapshotter would, and runs the image's program in it.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::InProcessRegistry;
use sluice_format::layout::Compression;
use sluice_puller::fs::FsOptions;
use sluice_puller::registry::RetryPolicy;
use sluice_puller::{image, ChunkCache, ImageRef, LayerOptions, RegistryClient, RemoteLayer};
use sluice_testkit::images::busybox_image;
use sluice_testkit::run;

#[test]
fn plain_image_runs_from_lazy_layers_under_overlayfs() {
    assert!(sluice_testkit::is_root(), "mounts need root");
    let dir = tempfile::tempdir().unwrap();
    let img = busybox_image(&dir.path().join("img"), Compression::Gzip);
    let registry = InProcessRegistry::start_with(&dir.path().join("registry"), "127.0.0.1:0", true);
    common::push_layout(
        &img.layout,
        &img.tag,
        &format!("{}/plain/busybox:v1", registry.addr),
    );
    let rt = tokio::runtime::Runtime::new().unwrap();
    let client = Arc::new(RegistryClient::new(RetryPolicy::default()));
    let image = ImageRef::parse(&format!("{}/plain/busybox:v1", registry.addr)).unwrap();
    // Conversion runs in the background: wait for every layer's twin.
    let deadline = Instant::now() + Duration::from_secs(60);
    let resolved = loop {
        let r = rt.block_on(image::resolve(&client, &image)).unwrap();
        if r.layers.iter().all(|l| l.lazy.is_some()) {
            break r;
        }
        assert!(Instant::now() < deadline, "no lazy twins after 60 s");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(
        resolved.manifest_digest, img.manifest.digest,
        "the original manifest is what the node resolves"
    );

    let cache = Arc::new(ChunkCache::open(dir.path().join("cache"), 1 << 30).unwrap());
    let mut sessions = Vec::new();
    let mut lowers = Vec::new();
    let mut fetched = Vec::new();
    for (i, l) in resolved.layers.iter().enumerate() {
        let layer = Arc::new(
            rt.block_on(RemoteLayer::open(
                client.clone(),
                image.clone(),
                l.lazy.as_ref().unwrap(),
                cache.clone(),
                LayerOptions::default(),
            ))
            .unwrap(),
        );
        let mnt = dir.path().join(format!("layer-{i}"));
        std::fs::create_dir_all(&mnt).unwrap();
        sessions.push(
            sluice_puller::fs::mount(
                layer.clone(),
                rt.handle().clone(),
                &mnt,
                FsOptions::default(),
            )
            .unwrap(),
        );
        lowers.push(mnt);
        fetched.push(layer);
    }
    // overlayfs lists the top layer first.
    let lowerdir = lowers
        .iter()
        .rev()
        .map(|p| p.display().to_string())
        .collect::<Vec<_>>()
        .join(":");
    let (upper, work, merged) = (
        dir.path().join("upper"),
        dir.path().join("work"),
        dir.path().join("merged"),
    );
    for d in [&upper, &work, &merged] {
        std::fs::create_dir_all(d).unwrap();
    }
    run(std::process::Command::new("mount")
        .args(["-t", "overlay", "overlay", "-o"])
        .arg(format!(
            "lowerdir={lowerdir},upperdir={},workdir={}",
            upper.display(),
            work.display()
        ))
        .arg(&merged));
    struct Unmount(std::path::PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount").arg(&self.0).status();
        }
    }
    let _overlay = Unmount(merged.clone());
    let out = run(std::process::Command::new("chroot")
        .arg(&merged)
        .arg("/app/start.sh"));
    assert_eq!(out.trim(), "sluice test app ready");
    // Writes go to the upper layer; the lazy layers stay untouched.
    std::fs::write(merged.join("app/new-file"), "written").unwrap();
    assert!(upper.join("app/new-file").exists());
    // Starting the program fetched a fraction of the image.
    let total: u64 = resolved
        .layers
        .iter()
        .map(|l| l.lazy.as_ref().unwrap().size)
        .sum();
    let got: u64 = fetched
        .iter()
        .map(|l| {
            l.stats
                .fetched_bytes
                .load(std::sync::atomic::Ordering::Relaxed)
        })
        .sum();
    assert!(got * 2 < total, "fetched {got} of {total} bytes to start");
}
