//! `cargo xtask bench start`: time from the pull command to a container's
//! "ready" line, side by side, every system fetching through the same
//! throttling proxy in front of the bundled registry.
//!
//! Systems, each from a cold node (fresh containerd and snapshotter roots, so
//! no content, snapshots or chunks; page cache dropped):
//! - `overlay-gzip`: `ctr image pull` of the plain gzip image + overlayfs;
//! - `overlay-zstd`: the same image compressed with zstd;
//! - `sluice`: `sluice pull` (lazy, through the registry's convert-on-push
//!   twin) + the sluice snapshotter, profiles off;
//! - `sluice-profile`: the same with the prefetch profile that a recording
//!   node published to the registry before the timed runs;
//! - `warm`: the image already unpacked (overlayfs), only `ctr run`: the floor.
//!
//! Fixtures come from `cargo xtask fixtures` (Debian packages, built locally).
//! Repetitions rotate the order of systems; the table reports medians and
//! spread. The machine's CPU must be otherwise idle or the run is refused.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde::Serialize;
use sluice_format::layout::{build_image, Compression, ImageSpec};
use sluice_testkit::process::{Containerd, SluiceRegistry, SluiceSnapshotter};
use sluice_testkit::proxy::{Link, ThrottlingProxy};

use super::{drop_caches, median, output_dir};
use crate::fixtures;
use crate::setup::{build_release, step};

#[derive(clap::Args)]
pub struct Options {
    /// Bandwidth of the link to the registry, in Mbit/s.
    #[arg(long, default_value_t = 100)]
    link_mbit: u64,
    /// Latency added to every request on that link, in ms.
    #[arg(long, default_value_t = 20)]
    link_ms: u64,
    /// Timed runs per image and system.
    #[arg(long, default_value_t = 3)]
    repetitions: usize,
    /// Images to run (default: all): busybox, numpy-pandas, python3-large, worst-case.
    #[arg(long, value_delimiter = ',')]
    images: Vec<String>,
    /// Systems to run (default: all): overlay-gzip, overlay-zstd, sluice,
    /// sluice-profile, sluice-warm, sluice-native, warm.
    #[arg(long, value_delimiter = ',')]
    systems: Vec<String>,
    /// Refuse to measure while other processes keep more than this share of
    /// the machine's CPU busy (0–1).
    #[arg(long, default_value_t = 0.25)]
    max_busy: f64,
    /// The daemon's `[lazy] fetch_ahead_kib` (default: the daemon's default).
    #[arg(long)]
    fetch_ahead_kib: Option<u64>,
    /// The daemon's `[lazy] passthrough = false`: what a node on a kernel
    /// without FUSE passthrough (Linux < 6.9) gets.
    #[arg(long)]
    no_passthrough: bool,
    /// The daemon's `[lazy] follow_imports = false`: no fetching of what a
    /// Python module imports or an ELF object needs ahead of the loader.
    #[arg(long)]
    no_follow_imports: bool,
    /// The daemon's `[lazy] follow_command = false`: nothing of the image's
    /// command fetched at pull (without a profile).
    #[arg(long)]
    no_follow_command: bool,
    /// The prefetching daemons' `[profiles] prefetch_concurrency` (default:
    /// the daemon's default).
    #[arg(long)]
    prefetch_concurrency: Option<usize>,
}

impl Options {
    /// The daemons' `[lazy]` section: the settings given on the command line
    /// (empty: the daemon's defaults).
    fn lazy_section(&self) -> String {
        let mut lines = String::new();
        if let Some(k) = self.fetch_ahead_kib {
            lines += &format!("fetch_ahead_kib = {k}\n");
        }
        if self.no_passthrough {
            lines += "passthrough = false\n";
        }
        if self.no_follow_imports {
            lines += "follow_imports = false\n";
        }
        if self.no_follow_command {
            lines += "follow_command = false\n";
        }
        if lines.is_empty() {
            lines
        } else {
            format!("[lazy]\n{lines}")
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
enum System {
    OverlayGzip,
    OverlayZstd,
    Sluice,
    SluiceProfile,
    SluiceWarm,
    SluiceNative,
    Warm,
}

const SYSTEMS: [System; 7] = [
    System::OverlayGzip,
    System::OverlayZstd,
    System::Sluice,
    System::SluiceProfile,
    System::SluiceWarm,
    System::SluiceNative,
    System::Warm,
];

impl System {
    fn name(self) -> &'static str {
        match self {
            System::OverlayGzip => "overlay-gzip",
            System::OverlayZstd => "overlay-zstd",
            System::Sluice => "sluice",
            System::SluiceProfile => "sluice-profile",
            System::SluiceWarm => "sluice-warm",
            System::SluiceNative => "sluice-native",
            System::Warm => "warm",
        }
    }
}

/// A benchmark image: its layer directories, command and ready line.
struct Fixture {
    name: &'static str,
    layers: Vec<PathBuf>,
    cmd: Vec<String>,
    ready: &'static str,
}

pub(super) const IMAGES: [&str; 4] = ["busybox", "numpy-pandas", "python3-large", "worst-case"];

fn fixture(name: &'static str) -> anyhow::Result<Fixture> {
    let dir = fixtures::dir();
    let python = |layer: &str, code: &str| Fixture {
        name,
        layers: vec![dir.join("python3/rootfs"), dir.join(layer).join("layer")],
        cmd: vec!["python3".into(), "-c".into(), code.into()],
        ready: "ready",
    };
    Ok(match name {
        "busybox" => {
            let root = dir.join("busybox");
            if !root.join(".complete").exists() {
                let _ = std::fs::remove_dir_all(&root);
                sluice_testkit::images::busybox_rootfs(&root);
                std::fs::write(root.join(".complete"), "")?;
            }
            Fixture {
                name,
                layers: vec![root.join("base"), root.join("app")],
                cmd: vec!["/app/start.sh".into()],
                ready: "ready",
            }
        }
        "numpy-pandas" => python(
            "numpy-pandas",
            "import numpy, pandas; print('ready', numpy.__version__, pandas.__version__)",
        ),
        // The runtime starts; the data-science stack installed with it stays unread.
        "python3-large" => python(
            "python3-large",
            "import json, sys; print('ready', sys.version.split()[0])",
        ),
        "worst-case" => {
            fixture("busybox")?;
            Fixture {
                name,
                layers: vec![dir.join("busybox/base"), dir.join("worst-case/layer")],
                cmd: vec![
                    "/bin/sh".into(),
                    "-c".into(),
                    "sha256sum /data/* > /tmp/sums && echo ready".into(),
                ],
                ready: "ready",
            }
        }
        other => bail!("unknown image {other:?}; choose from {}", IMAGES.join(", ")),
    })
}

/// The image as an OCI layout in `compression`, built once and cached.
fn layout(f: &Fixture, compression: Compression) -> anyhow::Result<PathBuf> {
    let tag = match compression {
        Compression::Gzip => "gzip",
        Compression::Zstd => "zstd",
        Compression::None => "tar",
    };
    let dir = fixtures::dir()
        .join("images")
        .join(format!("{}-{tag}", f.name));
    if dir.join(".complete").exists() {
        return Ok(dir);
    }
    println!("    building the {tag} image of {}", f.name);
    let _ = std::fs::remove_dir_all(&dir);
    build_image(
        &dir,
        &ImageSpec {
            layers: f.layers.clone(),
            compression,
            cmd: f.cmd.clone(),
            env: vec!["PATH=/usr/local/bin:/usr/bin:/bin".into()],
            tag: "v1".into(),
        },
    )
    .with_context(|| format!("building the {tag} image of {}", f.name))?;
    std::fs::write(dir.join(".complete"), "")?;
    Ok(dir)
}

/// The zstd OCI layout of a benchmark image (one of [`IMAGES`], as
/// [`pick`] returns them; built once, cached), for other benchmarks that
/// measure the same images.
pub(super) fn zstd_layout(image: &'static str) -> anyhow::Result<PathBuf> {
    fixtures::ensure_all()?;
    layout(&fixture(image)?, Compression::Zstd)
}

/// Total compressed size of the layers of the (single) image in a layout.
fn layer_bytes(layout: &Path) -> anyhow::Result<(u64, String)> {
    let read = |p: PathBuf| -> anyhow::Result<serde_json::Value> {
        Ok(serde_json::from_slice(
            &std::fs::read(&p).with_context(|| format!("reading {}", p.display()))?,
        )?)
    };
    let index = read(layout.join("index.json"))?;
    let digest = index["manifests"][0]["digest"]
        .as_str()
        .context("index without a manifest")?
        .to_owned();
    let manifest = read(
        layout
            .join("blobs/sha256")
            .join(digest.trim_start_matches("sha256:")),
    )?;
    let size = manifest["layers"]
        .as_array()
        .context("manifest without layers")?
        .iter()
        .filter_map(|l| l["size"].as_u64())
        .sum();
    Ok((size, digest))
}

/// Share of all CPUs busy over `over`, and the process that used most.
fn cpu_busy(over: Duration) -> (f64, String) {
    fn totals() -> (u64, u64) {
        let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
        let v: Vec<u64> = stat
            .lines()
            .next()
            .unwrap_or_default()
            .split_whitespace()
            .skip(1)
            .filter_map(|x| x.parse().ok())
            .collect();
        let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
        (v.iter().sum(), idle)
    }
    fn per_process() -> BTreeMap<u32, (String, u64)> {
        let mut out = BTreeMap::new();
        for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
            let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
                continue;
            };
            let Ok(stat) = std::fs::read_to_string(e.path().join("stat")) else {
                continue;
            };
            // comm is in parentheses and may contain spaces.
            let Some((head, rest)) = stat.rsplit_once(')') else {
                continue;
            };
            let comm = head.split_once('(').map(|x| x.1).unwrap_or("?").to_owned();
            let f: Vec<&str> = rest.split_whitespace().collect();
            let ticks = f.get(11).and_then(|x| x.parse::<u64>().ok()).unwrap_or(0)
                + f.get(12).and_then(|x| x.parse::<u64>().ok()).unwrap_or(0);
            out.insert(pid, (comm, ticks));
        }
        out
    }
    let (t0, i0, p0) = {
        let (t, i) = totals();
        (t, i, per_process())
    };
    std::thread::sleep(over);
    let (t1, i1) = totals();
    let p1 = per_process();
    let busy = 1.0 - (i1 - i0) as f64 / (t1 - t0).max(1) as f64;
    let top = p1
        .iter()
        .filter_map(|(pid, (comm, ticks))| {
            let before = p0.get(pid).map(|x| x.1).unwrap_or(*ticks);
            Some((ticks.checked_sub(before)?, *pid, comm.clone()))
        })
        .max()
        .map(|(ticks, pid, comm)| format!("{comm} (pid {pid}, {ticks} ticks)"))
        .unwrap_or_default();
    (busy, top)
}

/// Waits (up to a minute) for the machine to be idle; refuses otherwise.
fn require_idle(max_busy: f64) -> anyhow::Result<f64> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (busy, top) = cpu_busy(Duration::from_secs(2));
        if busy <= max_busy {
            return Ok(busy);
        }
        if Instant::now() > deadline {
            bail!(
                "refusing to measure: the CPUs are {:.0}% busy without the benchmark (limit {:.0}%); \
                 the busiest process is {top}",
                busy * 100.0,
                max_busy * 100.0
            );
        }
        println!("    waiting: CPUs {:.0}% busy, mostly {top}", busy * 100.0);
    }
}

/// The references of one image in the registry, through the proxy.
struct Pushed {
    gzip: String,
    zstd: String,
    /// The gzip image pushed straight to the registry (for the warm state).
    gzip_direct: String,
}

#[derive(Serialize, Clone)]
struct Sample {
    image: String,
    system: String,
    repetition: usize,
    seconds: f64,
    /// Of `seconds`: until the pull command returned (zero for `warm`); the
    /// rest is `ctr run` until the ready line.
    pull_seconds: f64,
    fetched_bytes: u64,
    /// The lazy daemon's counters (empty for overlayfs systems).
    daemon: BTreeMap<String, u64>,
}

#[derive(Serialize)]
struct Summary {
    image: String,
    system: String,
    median_seconds: f64,
    min_seconds: f64,
    max_seconds: f64,
    median_fetched_bytes: u64,
    ratio_to_warm: Option<f64>,
    ratio_to_overlay_gzip: Option<f64>,
    ratio_to_overlay_zstd: Option<f64>,
}

#[derive(Serialize)]
struct Report {
    link_mbit_per_s: u64,
    link_latency_ms: u64,
    repetitions: usize,
    /// The daemons' `[lazy]` settings given on the command line.
    lazy_config: String,
    /// `--prefetch-concurrency` (none: the daemon's default).
    prefetch_concurrency: Option<usize>,
    cpu_busy_before: f64,
    images: BTreeMap<String, serde_json::Value>,
    summaries: Vec<Summary>,
    samples: Vec<Sample>,
    targets: Vec<Target>,
}

#[derive(Serialize)]
struct Target {
    what: String,
    ratio: f64,
    limit: f64,
    met: bool,
}

/// Counters of the lazy daemon recorded with each sample.
const DAEMON_METRICS: &[&str] = &[
    "layer_fetch_requests",
    "layer_fetched_bytes",
    "layer_demanded_bytes",
    "layer_fetched_ahead_bytes",
    "layer_prefetched_bytes",
    "layer_prefetch_hit_bytes",
];

struct Measured {
    seconds: f64,
    pull_seconds: f64,
    fetched: u64,
    daemon: BTreeMap<String, u64>,
}

struct Bench {
    bin: PathBuf,
    work: PathBuf,
    proxy: ThrottlingProxy,
    node_seq: usize,
    /// See [`Options::lazy_section`].
    lazy_section: String,
    prefetch_concurrency: Option<usize>,
}

/// Daemon configurations: profiles off, prefetch from a profile, recording.
fn snapshotter_config(
    work: &Path,
    mode: &str,
    lazy_section: &str,
    prefetch_concurrency: Option<usize>,
) -> anyhow::Result<PathBuf> {
    let path = work.join(format!("snapshotter-{mode}.toml"));
    let mut profiles = match mode {
        "off" | "fill" => "record = false\nprefetch = false\n",
        "prefetch" => "record = false\nprefetch = true\n",
        "record" => "record = true\npublish = true\nprefetch = false\nwindow_secs = 15\n",
        _ => unreachable!("known modes"),
    }
    .to_owned();
    if let (Some(n), "prefetch") = (prefetch_concurrency, mode) {
        profiles += &format!("prefetch_concurrency = {n}\n");
    }
    // A node that fetches each layer whole after its mount, so that it goes
    // native (EROFS) once complete.
    // The other nodes measure lazy loading alone: no fill, whatever the
    // daemon's default.
    let fill = match mode {
        "fill" => "fill = true\nfill_quiet_secs = 0\n",
        _ => "fill = false\n",
    };
    let lazy = if lazy_section.is_empty() {
        format!("[lazy]\n{fill}")
    } else {
        format!("{lazy_section}{fill}")
    };
    std::fs::write(&path, format!("{lazy}[profiles]\n{profiles}"))?;
    Ok(path)
}

/// The lazy daemon's [`DAEMON_METRICS`] (empty for nodes without sluice).
fn daemon_counters(node: &Node) -> anyhow::Result<BTreeMap<String, u64>> {
    let mut counters = BTreeMap::new();
    if let Some(s) = &node.snapshotter {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        for name in DAEMON_METRICS {
            let v = rt.block_on(s.metric(&format!("sluice_puller_{name}_total")));
            counters.insert((*name).to_owned(), v as u64);
        }
    }
    Ok(counters)
}

/// Waits until the node's daemon has mounted `layers` layers natively.
fn wait_for_native_mounts(node: &Node, layers: usize) -> anyhow::Result<()> {
    let s = node.snapshotter.as_ref().context("a sluice node")?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let started = Instant::now();
    while rt.block_on(s.metric("sluice_puller_native_mounts")) < layers as f64 {
        if started.elapsed() > Duration::from_secs(300) {
            bail!(
                "{layers} layers were not mounted natively within 5 minutes (fill, then EROFS): see {}",
                log_path(&node.dir, "sluice").display()
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    Ok(())
}

/// A fresh node: containerd, plus the sluice daemon for lazy systems.
struct Node {
    dir: PathBuf,
    snapshotter: Option<SluiceSnapshotter>,
    containerd: Option<Containerd>,
}

/// Where a node's daemon log is kept once the node is gone.
fn log_path(node_dir: &Path, daemon: &str) -> PathBuf {
    node_dir.with_extension(format!("{daemon}.log"))
}

impl Drop for Node {
    fn drop(&mut self) {
        drop(self.containerd.take());
        if let Some(s) = self.snapshotter.take() {
            s.service.stop();
        }
        sluice_testkit::unmount_under(&self.dir);
        // Logs outlive the node, for the error messages that name them.
        let _ = std::fs::rename(self.dir.join("sluice.log"), log_path(&self.dir, "sluice"));
        let _ = std::fs::rename(
            self.dir.join("containerd/containerd.log"),
            log_path(&self.dir, "containerd"),
        );
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Bench {
    fn node(&mut self, profiles: Option<&str>) -> anyhow::Result<Node> {
        self.node_seq += 1;
        let dir = self.work.join(format!("node-{}", self.node_seq));
        let snapshotter = match profiles {
            Some(mode) => {
                let config = snapshotter_config(
                    &self.work,
                    mode,
                    &self.lazy_section,
                    self.prefetch_concurrency,
                )?;
                let hosts = dir.join("no-hosts");
                Some(SluiceSnapshotter::start_with_args(
                    &self.bin.join("sluice-snapshotter"),
                    &dir.join("sluice"),
                    &[
                        "--config",
                        &config.display().to_string(),
                        "--hosts-dir",
                        &hosts.display().to_string(),
                    ],
                ))
            }
            None => None,
        };
        let containerd = Containerd::start(
            &dir.join("containerd"),
            &snapshotter
                .as_ref()
                .map(|s| s.containerd_config())
                .unwrap_or_default(),
        );
        Ok(Node {
            dir,
            snapshotter,
            containerd: Some(containerd),
        })
    }

    /// Runs a command to completion, failing with its output and the logs.
    fn must(&self, node: &Node, cmd: &mut Command, what: &str) -> anyhow::Result<()> {
        let out = cmd.output().with_context(|| format!("running {what}"))?;
        if !out.status.success() {
            bail!(
                "{what} failed: {}{}\ncontainerd log: {}\nsnapshotter log: {}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr),
                log_path(&node.dir, "containerd").display(),
                log_path(&node.dir, "sluice").display()
            );
        }
        Ok(())
    }

    /// `sluice pull` of `reference` into the node's containerd. Its log
    /// (each step's time since the start, each registry request's) goes
    /// next to the daemons' logs, appended: a node pulls more than once.
    fn sluice_pull(&self, node: &Node, reference: &str, what: &str) -> anyhow::Result<()> {
        let containerd = node.containerd.as_ref().expect("running");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log_path(&node.dir, "pull"))
            .context("opening the pull's log")?;
        self.must(
            node,
            Command::new(self.bin.join("sluice"))
                .env(
                    "RUST_LOG",
                    "info,sluice_puller::pull=debug,sluice_puller::registry=debug",
                )
                .env("NO_COLOR", "1")
                .stderr(log)
                .args(["pull", "--address"])
                .arg(&containerd.socket)
                .arg(reference),
            &format!(
                "{what} (its log: {})",
                log_path(&node.dir, "pull").display()
            ),
        )
    }

    /// `ctr run` until the container prints its ready line.
    fn run_until_ready(
        &self,
        node: &Node,
        reference: &str,
        f: &Fixture,
        snapshotter: &str,
    ) -> anyhow::Result<()> {
        let containerd = node.containerd.as_ref().expect("running");
        let mut child = containerd
            .ctr()
            .args(["run", "--rm", "--snapshotter", snapshotter, reference])
            .arg(format!("bench-{}", self.node_seq))
            .args(&f.cmd)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("running ctr run")?;
        let stdout = child.stdout.take().expect("piped");
        let mut ready = false;
        for line in BufReader::new(stdout).lines() {
            if line?.contains(f.ready) {
                ready = true;
                break;
            }
        }
        let out = child.wait_with_output()?;
        if !ready || !out.status.success() {
            bail!(
                "the {} container did not get ready ({}): {}\ncontainerd log: {}\nsnapshotter log: {}",
                f.name,
                out.status,
                String::from_utf8_lossy(&out.stderr),
                log_path(&node.dir, "containerd").display(),
                log_path(&node.dir, "sluice").display()
            );
        }
        Ok(())
    }

    /// One timed cold start: seconds to ready and to the pull's end, bytes
    /// through the proxy and, for lazy systems, the daemon's counters right
    /// after the ready line.
    fn measure(&mut self, system: System, f: &Fixture, p: &Pushed) -> anyhow::Result<Measured> {
        let node = self.node(match system {
            System::Sluice | System::SluiceWarm => Some("off"),
            System::SluiceProfile => Some("prefetch"),
            System::SluiceNative => Some("fill"),
            _ => None,
        })?;
        let containerd = node.containerd.as_ref().expect("running");
        match system {
            System::Warm => self.must(
                &node,
                containerd
                    .ctr()
                    .args(["image", "pull", "--plain-http", &p.gzip_direct]),
                "ctr image pull (warm-up)",
            )?,
            // What the start has read is in the chunk cache; the rest of the
            // image is still remote, as on a node that ran it before.
            System::SluiceWarm => {
                self.sluice_pull(&node, &p.gzip_direct, "sluice pull (warm-up)")?;
                self.run_until_ready(&node, &p.gzip_direct, f, "sluice")?;
            }
            // Every layer fetched whole in the background and mounted
            // natively: a node that has had the image for a while.
            System::SluiceNative => {
                self.sluice_pull(&node, &p.gzip_direct, "sluice pull (warm-up)")?;
                wait_for_native_mounts(&node, f.layers.len())?;
            }
            _ => {}
        }
        let counters_before = daemon_counters(&node)?;
        drop_caches()?;
        let before = self.proxy.bytes.load(Ordering::Relaxed);
        let t = Instant::now();
        let (reference, snapshotter) = match system {
            System::OverlayGzip | System::OverlayZstd => {
                let r = if system == System::OverlayGzip {
                    &p.gzip
                } else {
                    &p.zstd
                };
                self.must(
                    &node,
                    containerd.ctr().args(["image", "pull", "--plain-http", r]),
                    "ctr image pull",
                )?;
                (r.as_str(), "overlayfs")
            }
            System::Sluice | System::SluiceProfile => {
                self.sluice_pull(&node, &p.gzip, "sluice pull")?;
                (p.gzip.as_str(), "sluice")
            }
            System::SluiceWarm | System::SluiceNative => (p.gzip_direct.as_str(), "sluice"),
            System::Warm => (p.gzip_direct.as_str(), "overlayfs"),
        };
        let pull_seconds = t.elapsed().as_secs_f64();
        self.run_until_ready(&node, reference, f, snapshotter)?;
        let seconds = t.elapsed().as_secs_f64();
        let fetched = self.proxy.bytes.load(Ordering::Relaxed) - before;
        // Only what the timed part did (sluice-warm's warm-up is not counted).
        let mut daemon = daemon_counters(&node)?;
        for (name, v) in daemon.iter_mut() {
            *v = v.saturating_sub(counters_before.get(name).copied().unwrap_or(0));
        }
        drop(node);
        Ok(Measured {
            seconds,
            pull_seconds,
            fetched,
            daemon,
        })
    }

    /// A recording node starts the image once and publishes its profile.
    fn record_profile(&mut self, f: &Fixture, p: &Pushed) -> anyhow::Result<()> {
        let node = self.node(Some("record"))?;
        let snapshotter = node.snapshotter.as_ref().expect("lazy node");
        self.sluice_pull(&node, &p.gzip, "sluice pull (recording)")?;
        self.run_until_ready(&node, &p.gzip, f, "sluice")?;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let deadline = Instant::now() + Duration::from_secs(120);
        while rt.block_on(snapshotter.metric("sluice_snapshotter_profiles_published_total")) < 1.0 {
            if Instant::now() > deadline {
                bail!(
                    "no profile of {} published within 120 s; see {}",
                    f.name,
                    log_path(&node.dir, "sluice").display()
                );
            }
            std::thread::sleep(Duration::from_millis(250));
        }
        let dropped = rt.block_on(snapshotter.metric("sluice_snapshotter_trace_dropped_events"));
        println!(
            "    {}: profile recorded and published ({} events dropped)",
            f.name, dropped
        );
        Ok(())
    }
}

/// The names in `chosen` (all of `all` if none), as `all`'s own strings
/// (the static names of images and systems); an unknown one is an error.
pub(super) fn pick<'a>(
    all: &[&'a str],
    chosen: &[String],
    what: &str,
) -> anyhow::Result<Vec<&'a str>> {
    if chosen.is_empty() {
        return Ok(all.to_vec());
    }
    chosen
        .iter()
        .map(|c| {
            all.iter()
                .copied()
                .find(|a| a == c)
                .with_context(|| format!("unknown {what} {c:?}; choose from {}", all.join(", ")))
        })
        .collect()
}

pub fn run(opts: Options) -> anyhow::Result<()> {
    if !sluice_testkit::is_root() {
        bail!("bench start runs containerd, mounts and drops the page cache: run it as root");
    }
    let image_names = pick(&IMAGES, &opts.images, "image")?;
    let system_names: Vec<&str> = SYSTEMS.iter().map(|s| s.name()).collect();
    let chosen = pick(&system_names, &opts.systems, "system")?;
    let systems: Vec<System> = SYSTEMS
        .into_iter()
        .filter(|s| chosen.contains(&s.name()))
        .collect();
    if opts.repetitions == 0 {
        bail!("--repetitions must be at least 1");
    }

    step("building sluice-registry, sluice-snapshotter and sluice (release)");
    let bin = build_release(&["sluice-registry", "sluice-snapshotter", "sluice-puller"])?;
    step("fixtures");
    fixtures::ensure_all()?;
    let fixtures: Vec<Fixture> = image_names
        .into_iter()
        .map(fixture)
        .collect::<anyhow::Result<_>>()?;

    let work = output_dir().join("start-work");
    sluice_testkit::unmount_under(&work);
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work)?;

    step("starting the registry and the link model");
    let registry = SluiceRegistry::start(&bin.join("sluice-registry"), &work.join("registry"), &[]);
    let link = Link {
        bytes_per_second: opts.link_mbit * 1_000_000 / 8,
        latency: Duration::from_millis(opts.link_ms),
    };
    let proxy = ThrottlingProxy::start(registry.addr, link);
    println!(
        "    registry {} behind a {} Mbit/s + {} ms proxy at {}",
        registry.host(),
        opts.link_mbit,
        opts.link_ms,
        proxy.addr
    );

    step("building and pushing the images (gzip and zstd; the registry converts the gzip one)");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let mut pushed = Vec::new();
    let mut image_info = BTreeMap::new();
    for f in &fixtures {
        let gzip = layout(f, Compression::Gzip)?;
        let zstd = layout(f, Compression::Zstd)?;
        let (gzip_bytes, gzip_digest) = layer_bytes(&gzip)?;
        let (zstd_bytes, zstd_digest) = layer_bytes(&zstd)?;
        let repo = format!("bench/{}", f.name);
        for (l, tag) in [(&gzip, "gzip"), (&zstd, "zstd")] {
            sluice_testkit::push_layout(
                &work,
                l,
                "v1",
                &format!("{}/{repo}:{tag}", registry.host()),
            );
        }
        let twin = rt.block_on(registry.wait_for_twin(&repo, &gzip_digest));
        // The registry converts the zstd image too: wait, so that no
        // conversion runs while the systems are measured.
        rt.block_on(registry.wait_for_twin(&repo, &zstd_digest));
        println!(
            "    {}: gzip {:.1} MB, zstd {:.1} MB, lazy twin {}",
            f.name,
            gzip_bytes as f64 / 1e6,
            zstd_bytes as f64 / 1e6,
            twin["digest"].as_str().unwrap_or("?")
        );
        image_info.insert(
            f.name.to_owned(),
            serde_json::json!({"gzip_bytes": gzip_bytes, "zstd_bytes": zstd_bytes, "command": f.cmd}),
        );
        pushed.push(Pushed {
            gzip: format!("{}/{repo}:gzip", proxy.addr),
            zstd: format!("{}/{repo}:zstd", proxy.addr),
            gzip_direct: format!("{}/{repo}:gzip", registry.host()),
        });
    }

    let mut bench = Bench {
        bin,
        work: work.clone(),
        proxy,
        node_seq: 0,
        lazy_section: opts.lazy_section(),
        prefetch_concurrency: opts.prefetch_concurrency,
    };
    if systems.contains(&System::SluiceProfile) {
        step("recording prefetch profiles (one untimed start per image on a recording node)");
        for (f, p) in fixtures.iter().zip(&pushed) {
            bench.record_profile(f, p)?;
        }
    }

    step(&format!(
        "measuring: {} image(s) x {} system(s) x {} repetition(s), cold node each time",
        fixtures.len(),
        systems.len(),
        opts.repetitions
    ));
    let cpu_busy_before = require_idle(opts.max_busy)?;
    let mut samples = Vec::new();
    for rep in 0..opts.repetitions {
        require_idle(opts.max_busy)?;
        for (f, p) in fixtures.iter().zip(&pushed) {
            let mut order = systems.clone();
            let n = order.len();
            order.rotate_left(rep % n);
            for system in order {
                let Measured {
                    seconds,
                    pull_seconds,
                    fetched,
                    daemon,
                } = bench.measure(system, f, p)?;
                let requests = daemon
                    .get("layer_fetch_requests")
                    .map(|n| format!(" in {n} range requests"))
                    .unwrap_or_default();
                println!(
                    "    [{}/{}] {:<14} {:<15} {:>7.2} s (pull {:.2} s)  {:>8.1} MB fetched{requests}",
                    rep + 1,
                    opts.repetitions,
                    f.name,
                    system.name(),
                    seconds,
                    pull_seconds,
                    fetched as f64 / 1e6
                );
                samples.push(Sample {
                    image: f.name.to_owned(),
                    system: system.name().to_owned(),
                    repetition: rep,
                    seconds,
                    pull_seconds,
                    fetched_bytes: fetched,
                    daemon,
                });
            }
        }
    }

    // Medians per (image, system), ratios within the image.
    let mut summaries = Vec::new();
    for f in &fixtures {
        let med = |s: System| -> Option<f64> {
            let mut v: Vec<f64> = samples
                .iter()
                .filter(|x| x.image == f.name && x.system == s.name())
                .map(|x| x.seconds)
                .collect();
            (!v.is_empty()).then(|| median(&mut v))
        };
        for &s in &systems {
            let mut secs: Vec<f64> = samples
                .iter()
                .filter(|x| x.image == f.name && x.system == s.name())
                .map(|x| x.seconds)
                .collect();
            let mut bytes: Vec<f64> = samples
                .iter()
                .filter(|x| x.image == f.name && x.system == s.name())
                .map(|x| x.fetched_bytes as f64)
                .collect();
            let m = median(&mut secs);
            summaries.push(Summary {
                image: f.name.to_owned(),
                system: s.name().to_owned(),
                median_seconds: m,
                min_seconds: secs[0],
                max_seconds: secs[secs.len() - 1],
                median_fetched_bytes: median(&mut bytes) as u64,
                ratio_to_warm: med(System::Warm).map(|w| m / w),
                ratio_to_overlay_gzip: med(System::OverlayGzip).map(|g| m / g),
                ratio_to_overlay_zstd: med(System::OverlayZstd).map(|z| m / z),
            });
        }
    }

    let mut targets = Vec::new();
    let find = |image: &str, system: System| {
        summaries
            .iter()
            .find(|s| s.image == image && s.system == system.name())
    };
    for image in ["numpy-pandas", "python3-large"] {
        if let Some(r) = find(image, System::Sluice).and_then(|s| s.ratio_to_overlay_gzip) {
            targets.push(Target {
                what: format!("{image}: sluice / overlay-gzip"),
                ratio: r,
                limit: 0.3,
                met: r <= 0.3,
            });
        }
        if let Some(r) = find(image, System::SluiceProfile).and_then(|s| s.ratio_to_warm) {
            targets.push(Target {
                what: format!("{image}: sluice-profile / warm"),
                ratio: r,
                limit: 1.5,
                met: r <= 1.5,
            });
        }
    }
    if let Some(r) = find("worst-case", System::Sluice).and_then(|s| s.ratio_to_overlay_zstd) {
        targets.push(Target {
            what: "worst-case: sluice / overlay-zstd".into(),
            ratio: r,
            limit: 1.1,
            met: r <= 1.1,
        });
    }

    // The table.
    println!();
    println!(
        "time from pull to ready, {} Mbit/s + {} ms link, median of {} (min–max){}",
        opts.link_mbit,
        opts.link_ms,
        opts.repetitions,
        {
            let mut set: Vec<String> = opts
                .lazy_section()
                .lines()
                .skip(1)
                .map(str::to_owned)
                .collect();
            set.extend(
                opts.prefetch_concurrency
                    .map(|n| format!("prefetch_concurrency = {n}")),
            );
            match set.is_empty() {
                true => String::new(),
                false => format!(", sluice with {}", set.join(", ")),
            }
        }
    );
    println!(
        "{:<14} {:<15} {:>8} {:>15} {:>10} {:>8} {:>8}",
        "image", "system", "median s", "min–max s", "fetched MB", "x warm", "x gzip"
    );
    for s in &summaries {
        let ratio = |r: Option<f64>| r.map(|r| format!("{r:.2}")).unwrap_or_else(|| "-".into());
        println!(
            "{:<14} {:<15} {:>8.2} {:>15} {:>10.1} {:>8} {:>8}",
            s.image,
            s.system,
            s.median_seconds,
            format!("{:.2}–{:.2}", s.min_seconds, s.max_seconds),
            s.median_fetched_bytes as f64 / 1e6,
            ratio(s.ratio_to_warm),
            ratio(s.ratio_to_overlay_gzip)
        );
    }
    println!();
    for t in &targets {
        println!(
            "target {:<36} {:.2} (limit {:.2}) {}",
            t.what,
            t.ratio,
            t.limit,
            if t.met { "met" } else { "NOT MET" }
        );
    }

    let out = output_dir();
    std::fs::create_dir_all(&out)?;
    let chart = out.join("start.png");
    chart::draw(&chart, &summaries, &opts)?;
    let report = Report {
        link_mbit_per_s: opts.link_mbit,
        link_latency_ms: opts.link_ms,
        repetitions: opts.repetitions,
        lazy_config: opts.lazy_section(),
        prefetch_concurrency: opts.prefetch_concurrency,
        cpu_busy_before,
        images: image_info,
        summaries,
        samples,
        targets,
    };
    let json = out.join("start.json");
    std::fs::write(&json, serde_json::to_vec_pretty(&report)?)?;
    println!("wrote {} and {}", json.display(), chart.display());
    drop(bench);
    registry.service.stop();
    keep_logs(&work, &out.join("start-logs"))?;
    let _ = std::fs::remove_dir_all(&work);
    Ok(())
}

/// Keeps the daemons' logs of the run (`node-N.sluice.log`, ...; node N is
/// the Nth node started) for a look at what was fetched and waited for
/// (`RUST_LOG=info,sluice_puller::layer=debug` logs every range and every
/// read that waited).
fn keep_logs(work: &Path, logs: &Path) -> anyhow::Result<()> {
    let _ = std::fs::remove_dir_all(logs);
    std::fs::create_dir_all(logs)?;
    for e in std::fs::read_dir(work)? {
        let path = e?.path();
        if path.extension().is_some_and(|x| x == "log") {
            std::fs::rename(&path, logs.join(path.file_name().expect("a file")))?;
        }
    }
    println!("daemon logs in {}", logs.display());
    Ok(())
}

/// The PNG chart: time to ready per image (groups) and system (bars), with
/// the min–max spread as whiskers.
mod chart {
    use std::path::Path;

    use plotters::prelude::*;
    use plotters::style::{register_font, FontStyle};

    use super::{Options, Summary, SYSTEMS};

    const FONT: &str = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf";
    const COLORS: [RGBColor; 6] = [
        RGBColor(0x9e, 0x9e, 0x9e),
        RGBColor(0x60, 0x7d, 0x8b),
        RGBColor(0x1e, 0x88, 0xe5),
        RGBColor(0x43, 0xa0, 0x47),
        RGBColor(0x8e, 0x24, 0xaa),
        RGBColor(0xff, 0xb3, 0x00),
    ];

    pub fn draw(path: &Path, summaries: &[Summary], opts: &Options) -> anyhow::Result<()> {
        let font = std::fs::read(FONT).map_err(|e| {
            anyhow::anyhow!("reading {FONT} for the chart ({e}): apt-get install fonts-dejavu-core")
        })?;
        register_font(
            "sans-serif",
            FontStyle::Normal,
            Box::leak(font.into_boxed_slice()),
        )
        .map_err(|_| anyhow::anyhow!("{FONT} is not a usable font"))?;
        let mut images: Vec<&str> = Vec::new();
        for s in summaries {
            if !images.contains(&s.image.as_str()) {
                images.push(&s.image);
            }
        }
        let systems: Vec<&str> = SYSTEMS
            .iter()
            .map(|s| s.name())
            .filter(|n| summaries.iter().any(|s| s.system == *n))
            .collect();
        let top = summaries
            .iter()
            .map(|s| s.max_seconds)
            .fold(0.0f64, f64::max)
            * 1.1;
        let root = BitMapBackend::new(path, (1100, 560)).into_drawing_area();
        root.fill(&WHITE)?;
        let mut chart = ChartBuilder::on(&root)
            .caption(
                format!(
                    "sluice: time from pull to ready ({} Mbit/s + {} ms link, median of {})",
                    opts.link_mbit, opts.link_ms, opts.repetitions
                ),
                ("sans-serif", 22),
            )
            .margin(16)
            .x_label_area_size(40)
            .y_label_area_size(60)
            .build_cartesian_2d(0f64..images.len() as f64, 0f64..top.max(0.1))?;
        chart
            .configure_mesh()
            .disable_x_mesh()
            .x_labels(images.len() * 2 + 1)
            .x_label_formatter(&|x| {
                let i = x.floor() as usize;
                if (x - i as f64 - 0.5).abs() < 0.01 && i < images.len() {
                    images[i].to_owned()
                } else {
                    String::new()
                }
            })
            .y_desc("seconds")
            .label_style(("sans-serif", 15))
            .draw()?;
        let width = 0.8 / systems.len() as f64;
        for (k, system) in systems.iter().enumerate() {
            let color = COLORS[SYSTEMS
                .iter()
                .position(|s| s.name() == *system)
                .unwrap_or(0)
                % COLORS.len()];
            let bars: Vec<(f64, &Summary)> = summaries
                .iter()
                .filter(|s| s.system == *system)
                .filter_map(|s| {
                    let i = images.iter().position(|i| *i == s.image)?;
                    Some((i as f64 + 0.1 + k as f64 * width, s))
                })
                .collect();
            chart
                .draw_series(bars.iter().map(|(x, s)| {
                    Rectangle::new(
                        [(*x, 0.0), (*x + width * 0.9, s.median_seconds)],
                        color.filled(),
                    )
                }))?
                .label(*system)
                .legend(move |(x, y)| {
                    Rectangle::new([(x, y - 6), (x + 12, y + 6)], color.filled())
                });
            chart.draw_series(bars.iter().map(|(x, s)| {
                let mid = *x + width * 0.45;
                PathElement::new(vec![(mid, s.min_seconds), (mid, s.max_seconds)], BLACK)
            }))?;
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperLeft)
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .label_font(("sans-serif", 15))
            .draw()?;
        root.present()?;
        Ok(())
    }
}
