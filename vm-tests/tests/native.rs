//! Native layers: a layer whose every chunk is cached, written as an EROFS
//! image and mounted by the kernel, shows exactly what its FUSE mount shows
//! (content, modes, owners, times, hard links, devices, extended attributes,
//! whiteouts and opaque directories, which overlayfs reads from it).
//! Kernels that cannot mount an EROFS image from a file (before 6.12) mount
//! it through a loop device; the host's kernel tests both ways.

mod common;

use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;

use common::{
    assert_same_tree, fixture, getxattr, mount_default, mount_fresh, mount_layer, Mounted,
};
use sluice_puller::fs::FsOptions;
use sluice_puller::metrics::PullerMetrics;
use sluice_puller::native::{self, NativeImages, NativeMount};
use sluice_puller::LayerOptions;
use sluice_testkit::kernel;
use sluice_testkit::mounts::top_mount;

fn open_images(cache: &std::sync::Arc<sluice_puller::ChunkCache>) -> NativeImages {
    open_images_counted(cache).0
}

/// The images, and the metrics that count what they write and reuse.
fn open_images_counted(
    cache: &std::sync::Arc<sluice_puller::ChunkCache>,
) -> (NativeImages, std::sync::Arc<PullerMetrics>) {
    let metrics = PullerMetrics::new(cache.clone());
    (NativeImages::open(cache, metrics.clone()).unwrap(), metrics)
}

/// Reads every file of a mounted layer, so that all its chunks are cached.
fn read_everything(m: &Mounted) {
    let mut paths = Vec::new();
    common::walk(&m.path, Path::new(""), &mut paths);
    for p in paths {
        let p = m.path.join(p);
        if std::fs::symlink_metadata(&p).unwrap().is_file() {
            std::fs::read(&p).unwrap();
        }
    }
}

/// Builds layer `m`'s image and mounts it at a new directory beside it.
fn build_and_mount(images: &NativeImages, m: &Mounted) -> NativeMount {
    assert!(native::is_complete(&m.layer), "every file was read");
    let (image, stats) = images.build(&m.layer).unwrap();
    assert!(stats.inodes > 0);
    let at = m.path.with_extension("native");
    std::fs::create_dir_all(&at).unwrap();
    native::mount(&image, &at).unwrap_or_else(|e| {
        let (major, minor) = kernel::version();
        panic!("Linux {major}.{minor}: {e}")
    })
}

#[test]
fn a_complete_layer_mounted_natively_equals_the_original() {
    let f = fixture();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (first, client) = mount_fresh(
        &rt,
        &f,
        0,
        &f.dir.path().join("cache"),
        &FsOptions::default(),
    );
    let images = open_images(first.layer.cache());
    // Nothing read yet: not complete, and no image of it can be written.
    assert!(!native::is_complete(&first.layer));
    let err = images.build(&first.layer).unwrap_err().to_string();
    assert!(err.contains("not complete"), "{err}");
    assert!(!images.path(first.layer.digest()).exists());

    let second = mount_layer(
        &rt,
        &f,
        1,
        client,
        first.layer.cache().clone(),
        LayerOptions::default(),
        &FsOptions::default(),
    );
    let mut mounted = Vec::new();
    for (m, root) in [(&first, &f.roots[0]), (&second, &f.roots[1])] {
        read_everything(m);
        let native = build_and_mount(&images, m);
        let (files, _) = assert_same_tree(root, native.path());
        assert!(files > 0);
        let image = images.path(m.layer.digest());
        assert!(image.exists());
        mounted.push(native);
        // The same image through a loop device, as kernels before 6.12
        // mount it (and as this one does where it is older).
        let on_loop = m.path.with_extension("loop");
        std::fs::create_dir_all(&on_loop).unwrap();
        let looped = native::mount_on_loop_device(&image, &on_loop).unwrap();
        assert_same_tree(root, looped.path());
        let source = top_mount(looped.path())
            .map(|m| m.source)
            .unwrap_or_default();
        assert!(source.starts_with("/dev/loop"), "{source}");
        drop(looped);
        assert_ne!(
            top_mount(&on_loop).map(|m| m.source).unwrap_or_default(),
            source,
            "unmounted when dropped"
        );
    }
    let app = mounted[1].path();
    let a = std::fs::metadata(app.join("app/data/small.txt")).unwrap();
    let b = std::fs::metadata(app.join("app/data/small-link.txt")).unwrap();
    assert_eq!(
        (a.ino(), a.nlink()),
        (b.ino(), 2),
        "hard links are one inode"
    );
}

#[test]
fn overlayfs_reads_whiteouts_and_opaque_directories_from_a_native_layer() {
    let f = common::xattr_fixture();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (top, client) = mount_fresh(
        &rt,
        &f,
        1,
        &f.dir.path().join("cache"),
        &FsOptions::default(),
    );
    let base = mount_layer(
        &rt,
        &f,
        0,
        client,
        top.layer.cache().clone(),
        LayerOptions::default(),
        &FsOptions::default(),
    );
    read_everything(&top);
    let images = open_images(top.layer.cache());
    let native = build_and_mount(&images, &top);
    let n = native.path();
    assert_eq!(
        getxattr(&n.join("app/tool"), "user.sluice").as_deref(),
        Ok(&b"layer value"[..])
    );
    assert_eq!(
        getxattr(&n.join("etc"), "trusted.overlay.opaque").as_deref(),
        Ok(&b"y"[..])
    );
    assert_eq!(
        getxattr(&n.join("app"), "trusted.overlay.opaque"),
        Err(libc::ENODATA)
    );
    let gone = std::fs::symlink_metadata(n.join("gone")).unwrap();
    assert!(gone.file_type().is_char_device() && gone.rdev() == 0);
    assert_eq!(std::fs::read(n.join("app/tool")).unwrap(), b"tool\n");

    // Stacked as a container's lower layers: the whiteout hides the base's
    // file, the opaque directory the base's `etc/hostname`.
    let merged = f.dir.path().join("merged");
    std::fs::create_dir_all(&merged).unwrap();
    let opts = format!("lowerdir={}:{}", n.display(), base.path.display());
    let status = std::process::Command::new("mount")
        .args(["-t", "overlay", "overlay", "-o", &opts])
        .arg(&merged)
        .status()
        .unwrap();
    assert!(status.success(), "overlay mount: {status}");
    let seen = (
        merged.join("gone").exists(),
        merged.join("etc/hostname").exists(),
        std::fs::read(merged.join("app/tool")).ok(),
    );
    std::process::Command::new("umount")
        .arg(&merged)
        .status()
        .unwrap();
    assert_eq!(seen, (false, false, Some(b"tool\n".to_vec())));
}

/// The python3 rootfs (thousands of files, devices, hard links, long
/// directories) through a native mount; natively only (not packed into
/// guests).
#[test]
fn debian_python3_rootfs_mounted_natively_equals_the_original() {
    let (f, rootfs) = common::python3_fixture();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let m = mount_default(&rt, &f, 0);
    read_everything(&m);
    let images = open_images(m.layer.cache());
    let native = build_and_mount(&images, &m);
    let (files, devices) = assert_same_tree(&rootfs, native.path());
    assert!(
        files > 1000 && devices > 0,
        "{files} files, {devices} devices"
    );
}

/// Images outlive the process that wrote them, sealed: the next one uses an
/// image that matches its seal, and writes anew one whose bytes changed, one
/// of another format version, one whose seal is unreadable, and one without
/// a seal.
#[test]
fn an_image_left_by_an_earlier_process_is_verified_before_use() {
    let f = fixture();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let m = mount_default(&rt, &f, 1);
    read_everything(&m);
    let cache = m.layer.cache();
    let hex = m.layer.digest().hex();
    let dir = cache.dir().join("erofs");
    let image = dir.join(&hex);
    let seal = dir.join(format!("{hex}.seal"));
    let (first, metrics) = open_images_counted(cache);
    assert_eq!(first.get_or_build(&m.layer).unwrap(), image);
    assert_eq!(metrics.native_images_written.get(), 1);
    let sealed = std::fs::read_to_string(&seal).unwrap();
    let original = std::fs::read(&image).unwrap();
    assert_eq!(
        sealed,
        format!(
            "sluice-erofs-image {} {} {}\n",
            sluice_puller::native::erofs::FORMAT_VERSION,
            original.len(),
            sluice_format::Digest::sha256(&original)
        )
    );
    drop(first);

    // What a process leaves half done goes at the next open.
    std::fs::write(dir.join(".half-written.tmp"), b"x").unwrap();
    std::fs::write(dir.join("0123abcd"), b"an image without a seal").unwrap();
    std::fs::write(dir.join("4567cdef.seal"), b"a seal without an image").unwrap();
    // Intact: used, not written.
    let (next, metrics) = open_images_counted(cache);
    let mut left: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    left.sort();
    assert_eq!(left, [hex.clone(), format!("{hex}.seal")]);
    assert_eq!(next.get_or_build(&m.layer).unwrap(), image);
    assert_eq!(
        (
            metrics.native_images_written.get(),
            metrics.native_images_reused.get()
        ),
        (0, 1)
    );
    let at = m.path.with_extension("reused");
    std::fs::create_dir_all(&at).unwrap();
    let mounted = native::mount(&image, &at).unwrap();
    assert_same_tree(&f.roots[1], mounted.path());
    drop((mounted, next));

    // One byte changed (in the data of the last file), an older format
    // version, a seal that is not one, no seal at all: each written anew,
    // byte for byte as before.
    for what in ["flipped", "older", "garbled", "unsealed"] {
        match what {
            "flipped" => {
                let mut bytes = std::fs::read(&image).unwrap();
                let last = bytes.iter().rposition(|&b| b != 0).unwrap();
                bytes[last] ^= 1;
                std::fs::write(&image, bytes).unwrap();
            }
            "older" => {
                let version = sluice_puller::native::erofs::FORMAT_VERSION;
                let line = sealed.replacen(&format!(" {version} "), " 0 ", 1);
                std::fs::write(&seal, line).unwrap();
            }
            "garbled" => std::fs::write(&seal, "not a seal\n").unwrap(),
            _ => std::fs::remove_file(&seal).unwrap(),
        }
        let (images, metrics) = open_images_counted(cache);
        assert_eq!(images.get_or_build(&m.layer).unwrap(), image, "{what}");
        assert_eq!(
            (
                metrics.native_images_written.get(),
                metrics.native_images_reused.get()
            ),
            (1, 0),
            "{what}"
        );
        assert!(std::fs::read(&image).unwrap() == original, "{what}");
        assert_eq!(std::fs::read_to_string(&seal).unwrap(), sealed, "{what}");
    }
}

/// What the writer puts out for a fixed layer (whiteout, opaque directory,
/// extended attributes, a file; fixed times), pinned: a change of the image
/// layout must come with a new `erofs::FORMAT_VERSION` (images kept from
/// an older daemon are then written anew) and a new digest here.
#[test]
fn an_image_has_the_bytes_of_its_format_version() {
    let f = common::xattr_fixture();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let m = mount_default(&rt, &f, 1);
    read_everything(&m);
    let (image, _) = open_images(m.layer.cache()).build(&m.layer).unwrap();
    let digest = sluice_format::Digest::sha256(&std::fs::read(image).unwrap());
    assert_eq!(
        (
            sluice_puller::native::erofs::FORMAT_VERSION,
            digest.to_string()
        ),
        (
            1,
            "sha256:0d03229f90acfb55f8dc8feac8e8fb7f28acfd24f12da45566a85dff92fbdd7c".to_owned()
        )
    );
}
