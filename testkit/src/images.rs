//! Images built locally, without a Docker engine or network: root filesystems
//! from busybox-static, written as OCI image layouts with
//! [`sluice_format::layout`].

use std::fs;
use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::{Path, PathBuf};

use sluice_format::layout::{build_image, Compression, ImageSpec};
use sluice_format::oci::Descriptor;

/// Where Debian's busybox-static installs its binary.
pub const BUSYBOX: &str = "/bin/busybox";

/// Applets linked in the test rootfs.
const APPLETS: &[&str] = &[
    "sh",
    "echo",
    "cat",
    "ls",
    "sha256sum",
    "find",
    "head",
    "sleep",
    "true",
    "wc",
    "stat",
];

/// An image written as an OCI layout, ready for `skopeo copy oci:<layout>:<tag> …`.
#[derive(Debug, Clone)]
pub struct TestImage {
    pub layout: PathBuf,
    pub tag: String,
    pub manifest: Descriptor,
}

impl TestImage {
    /// The skopeo transport reference of the layout.
    pub fn oci_ref(&self) -> String {
        format!("oci:{}:{}", self.layout.display(), self.tag)
    }
}

/// Deterministic pseudo-random bytes (xorshift), so fixtures compress like data.
pub fn pseudo_random(len: usize, mut seed: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(len + 8);
    seed |= 1;
    while out.len() < len {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        out.extend_from_slice(&seed.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// Writes a busybox base layer into `dir/base` and an application layer into
/// `dir/app`; returns both directories.
pub fn busybox_rootfs(dir: &Path) -> (PathBuf, PathBuf) {
    crate::require_tool("busybox", "busybox-static");
    let base = dir.join("base");
    let app = dir.join("app");
    for d in ["bin", "etc", "tmp", "proc", "sys", "dev"] {
        fs::create_dir_all(base.join(d)).expect("rootfs dir");
    }
    fs::copy(BUSYBOX, base.join("bin/busybox")).expect("copying busybox-static");
    for applet in APPLETS {
        symlink("busybox", base.join("bin").join(applet)).expect("applet link");
    }
    fs::write(base.join("etc/passwd"), "root:x:0:0:root:/root:/bin/sh\n").expect("passwd");
    fs::write(base.join("etc/group"), "root:x:0:\n").expect("group");
    fs::set_permissions(base.join("tmp"), fs::Permissions::from_mode(0o1777)).expect("tmp mode");

    fs::create_dir_all(app.join("app/data")).expect("app dir");
    fs::write(
        app.join("app/start.sh"),
        "#!/bin/sh\necho \"sluice test app ready\"\n",
    )
    .expect("start script");
    fs::set_permissions(app.join("app/start.sh"), fs::Permissions::from_mode(0o755))
        .expect("script mode");
    fs::write(app.join("app/data/blob.bin"), pseudo_random(3 << 20, 7)).expect("data");
    fs::write(app.join("app/data/small.txt"), "hello from a lazy layer\n").expect("data");
    fs::hard_link(
        app.join("app/data/small.txt"),
        app.join("app/data/small-link.txt"),
    )
    .expect("hard link");
    symlink("../data/small.txt", app.join("app/small-sym.txt")).expect("symlink");
    (base, app)
}

/// Builds the two-layer busybox test image under `dir`.
pub fn busybox_image(dir: &Path, compression: Compression) -> TestImage {
    let (base, app) = busybox_rootfs(&dir.join("rootfs"));
    let tag = "v1".to_owned();
    let layout = dir.join("layout");
    let manifest = build_image(
        &layout,
        &ImageSpec {
            layers: vec![base, app],
            compression,
            cmd: vec!["/app/start.sh".into()],
            env: vec!["PATH=/bin".into()],
            tag: tag.clone(),
        },
    )
    .expect("building the busybox test image");
    TestImage {
        layout,
        tag,
        manifest,
    }
}
