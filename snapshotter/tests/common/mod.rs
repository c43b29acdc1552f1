//! Shared by the snapshotter's integration tests: a node (the daemon plus a
//! containerd that uses it) and helpers around it.
#![allow(dead_code)]

use std::path::Path;
use std::process::Command;

use sluice_format::Digest;
use sluice_testkit::process::{Containerd, SluiceSnapshotter};
use sluice_testkit::{is_root, run, workspace_binary};

pub struct Node {
    pub snapshotter: SluiceSnapshotter,
    pub containerd: Containerd,
}

pub fn node(dir: &Path) -> Node {
    node_with(dir, &[])
}

/// A node whose daemon gets extra flags (`--config`, `--hosts-dir`, …).
pub fn node_with(dir: &Path, args: &[&str]) -> Node {
    let binary = workspace_binary("sluice-snapshotter");
    let snapshotter = if args.is_empty() {
        SluiceSnapshotter::start(&binary, &dir.join("sluice"))
    } else {
        SluiceSnapshotter::start_with_args(&binary, &dir.join("sluice"), args)
    };
    let containerd = Containerd::start(&dir.join("containerd"), &snapshotter.containerd_config());
    Node {
        snapshotter,
        containerd,
    }
}

impl Node {
    /// Runs `sluice pull [args…] --address <containerd> <reference>` and
    /// returns its output, whatever the outcome.
    pub fn pull_output(&self, args: &[&std::ffi::OsStr], reference: &str) -> std::process::Output {
        Command::new(workspace_binary("sluice"))
            .arg("pull")
            .args(args)
            .arg("--address")
            .arg(&self.containerd.socket)
            .arg(reference)
            .output()
            .expect("running sluice pull")
    }

    /// `sluice pull`, which must succeed; returns its stdout.
    pub fn pull_with(&self, args: &[&std::ffi::OsStr], reference: &str) -> String {
        let out = self.pull_output(args, reference);
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "sluice pull {reference} failed\nstdout:\n{stdout}\nstderr:\n{}\nsnapshotter log:\n{}\ncontainerd log:\n{}",
            String::from_utf8_lossy(&out.stderr),
            self.snapshotter.log(),
            self.containerd.log()
        );
        print!("{stdout}");
        stdout
    }

    pub fn pull(&self, reference: &str) -> String {
        self.pull_with(&[], reference)
    }

    /// `kill -9` of the daemon, restarted on the same root; returns once
    /// containerd has reconnected to it (it redials a proxy plugin with
    /// backoff, at most 3 s apart).
    pub fn restart_daemon_kill9(self) -> Node {
        let Node {
            snapshotter,
            containerd,
        } = self;
        let node = Node {
            snapshotter: snapshotter.kill9_and_restart(),
            containerd,
        };
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
        while !node
            .containerd
            .ctr()
            .args(["snapshot", "--snapshotter", "sluice", "ls"])
            .output()
            .expect("running ctr")
            .status
            .success()
        {
            assert!(
                std::time::Instant::now() < deadline,
                "containerd did not reconnect to the restarted daemon"
            );
            std::thread::sleep(std::time::Duration::from_millis(200));
        }
        node
    }

    pub fn run(&self, reference: &str, id: &str, args: &[&str]) -> String {
        let out = self
            .containerd
            .ctr()
            .args(["run", "--rm", "--snapshotter", "sluice", reference, id])
            .args(args)
            .output()
            .expect("running ctr run");
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "ctr run {reference} failed\nstdout:\n{stdout}\nstderr:\n{}\nsnapshotter log:\n{}\ncontainerd log:\n{}",
            String::from_utf8_lossy(&out.stderr),
            self.snapshotter.log(),
            self.containerd.log()
        );
        stdout
    }

    pub fn sluice_snapshots(&self) -> Vec<String> {
        run(self
            .containerd
            .ctr()
            .args(["snapshot", "--snapshotter", "sluice", "ls"]))
        .lines()
        .skip(1)
        .filter_map(|l| l.split_whitespace().next().map(str::to_owned))
        .collect()
    }
}

pub fn needs_root() -> bool {
    if !is_root() {
        eprintln!("SKIP: containerd, mounts and FUSE need root");
        return false;
    }
    true
}

/// Polls `ok` every 200 ms until it holds; fails the test after `timeout`.
pub async fn wait_for(what: &str, timeout: std::time::Duration, mut ok: impl AsyncFnMut() -> bool) {
    let deadline = std::time::Instant::now() + timeout;
    while !ok().await {
        assert!(
            std::time::Instant::now() < deadline,
            "{what} within {timeout:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
}

pub fn sha256_file(p: &Path) -> String {
    Digest::sha256(&std::fs::read(p).unwrap()).hex().to_owned()
}

/// FUSE mounts of layers served by the daemon rooted at `root`.
pub fn lazy_mounts_under(root: &Path) -> Vec<String> {
    let root = root.to_string_lossy().into_owned();
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .filter(|l| l.contains(&root) && l.contains(" - fuse sluice:"))
        .map(str::to_owned)
        .collect()
}

pub fn walk_files(dir: &Path) -> usize {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| {
            if e.path().is_dir() {
                walk_files(&e.path())
            } else {
                1
            }
        })
        .sum()
}

/// The Debian + python3 image (the `python3` fixture), converted to
/// zstd:chunked and pushed as `py/python3:lazy`; returns the reference, the
/// fixture's root filesystem and the converted layout.
pub fn push_python3(
    dir: &Path,
    reg: &sluice_testkit::process::SluiceRegistry,
) -> (String, std::path::PathBuf, std::path::PathBuf) {
    let rootfs = sluice_testkit::fixture("python3").join("rootfs");
    let layout = dir.join("python3");
    sluice_format::layout::build_image(
        &layout,
        &sluice_format::layout::ImageSpec {
            layers: vec![rootfs.clone()],
            compression: sluice_format::layout::Compression::Gzip,
            cmd: vec!["python3".into()],
            env: vec!["PATH=/usr/local/bin:/usr/bin:/bin".into()],
            tag: "v1".into(),
        },
    )
    .unwrap();
    let converted = dir.join("python3-lazy");
    run(Command::new(workspace_binary("sluice-registry"))
        .args(["convert", "--from"])
        .arg(format!("{}:v1", layout.display()))
        .arg("--to")
        .arg(format!("{}:v1", converted.display())));
    let reference = format!("{}/py/python3:lazy", reg.host());
    run(sluice_testkit::skopeo(dir)
        .args(["copy", "--quiet", "--dest-tls-verify=false"])
        .arg(format!("oci:{}:v1", converted.display()))
        .arg(format!("docker://{reference}")));
    (reference, rootfs, converted)
}

/// A registry without convert-on-push (the image is pushed converted) with
/// the python3 image in it: [`push_python3`]'s results and the registry.
pub fn python3_registry(
    dir: &Path,
) -> (
    sluice_testkit::process::SluiceRegistry,
    String,
    std::path::PathBuf,
    std::path::PathBuf,
) {
    let reg = sluice_testkit::process::SluiceRegistry::start(
        &workspace_binary("sluice-registry"),
        &dir.join("registry"),
        &["--no-convert-on-push"],
    );
    let (reference, rootfs, converted) = push_python3(dir, &reg);
    (reg, reference, rootfs, converted)
}

/// Total size of the layers of the (single) image in an OCI layout.
pub fn converted_layer_bytes(layout: &Path) -> u64 {
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(layout.join("index.json")).unwrap()).unwrap();
    let digest = index["manifests"][0]["digest"].as_str().unwrap().to_owned();
    let manifest: serde_json::Value = serde_json::from_slice(
        &std::fs::read(
            layout
                .join("blobs/sha256")
                .join(digest.trim_start_matches("sha256:")),
        )
        .unwrap(),
    )
    .unwrap();
    manifest["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["size"].as_u64().unwrap())
        .sum()
}

/// A busybox test image pushed (gzip, by skopeo) to a sluice registry that
/// requires `user`:`password`, converted into its lazy twin. Returns the
/// registry and the image reference.
pub async fn private_busybox(
    dir: &Path,
    user: &str,
    password: &str,
) -> (sluice_testkit::process::SluiceRegistry, String) {
    use sluice_format::layout::Compression;
    let htpasswd = dir.join("htpasswd");
    std::fs::write(
        &htpasswd,
        format!("{user}:{}\n", bcrypt::hash(password, 4).unwrap()),
    )
    .unwrap();
    let reg = sluice_testkit::process::SluiceRegistry::start(
        &workspace_binary("sluice-registry"),
        &dir.join("registry"),
        &["--htpasswd", htpasswd.to_str().unwrap()],
    );
    let image = sluice_testkit::images::busybox_image(&dir.join("image"), Compression::Gzip);
    let reference = format!("{}/private/busybox:v1", reg.host());
    run(sluice_testkit::skopeo(dir)
        .args(["copy", "--quiet", "--dest-tls-verify=false", "--dest-creds"])
        .arg(format!("{user}:{password}"))
        .arg(image.oci_ref())
        .arg(format!("docker://{reference}")));
    reg.wait_for_twin_with_auth(
        "private/busybox",
        &image.manifest.digest.to_string(),
        (user, password),
    )
    .await;
    (reg, reference)
}
