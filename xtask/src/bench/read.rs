//! `cargo xtask bench read`: reading through a lazy mount against reading the
//! same files from the local disk, in one run.
//!
//! Workloads: one 1 GiB file read sequentially in 1 MiB reads, and 20,000 small
//! files (1–16 KiB) read whole by 8 threads. Systems: (a) native ext4,
//! (b) sluice cold (empty cache, registry behind a throttling proxy),
//! (c) sluice warm with FUSE passthrough, (d) sluice warm without passthrough
//! (files made whole by the passthrough daemon), (e) sluice warm as a node
//! without passthrough (Linux < 6.9) has it: the cache holds chunks only and
//! every read is assembled from them, (f) sluice warm as it serves a
//! complete layer by default: an EROFS image the kernel mounts itself
//! (`puller/src/native`; the row is left out on a kernel without EROFS).
//! The page cache is dropped before every measurement; native and the warm
//! rows are the median of three. Each warm measurement is paired with a native
//! one taken just before it, and its ratios to native are the median of the
//! pairs' ratios: the virtual disk's speed drifts over a run, and ratios
//! against a native figure taken minutes earlier swung by ±40%. Also: the resident memory of a `sluice
//! mount` daemon with 10 layers mounted and idle.

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde::Serialize;
use sluice_format::chunked::ChunkingOptions;
use sluice_format::layout::{build_image, Compression, ImageSpec};
use sluice_testkit::process::SluiceRegistry;
use sluice_testkit::proxy::{Link, ThrottlingProxy};

use super::{drop_caches, median, output_dir, rss_kib};
use crate::setup::{build_release, step};

#[derive(clap::Args)]
pub struct Options {
    /// Size of the big file in MiB.
    #[arg(long, default_value_t = 1024)]
    big_mib: u64,
    /// Number of small files.
    #[arg(long, default_value_t = 20_000)]
    small_files: usize,
    /// Bandwidth of the link to the registry for the cold runs, in MB/s.
    #[arg(long, default_value_t = 100)]
    link_mbps: u64,
    /// Latency added per request on that link, in ms.
    #[arg(long, default_value_t = 2)]
    link_ms: u64,
    /// Only measure the daemon's memory with 10 idle layers (quick check).
    #[arg(long)]
    memory_only: bool,
    /// Leave target/bench/read-work (registry root, caches) in place, to
    /// profile a mount of the same image afterwards.
    #[arg(long)]
    keep_work: bool,
}

#[derive(Serialize, Clone)]
struct Measure {
    system: String,
    big_mb_per_s: f64,
    small_files_per_s: f64,
    small_mb_per_s: f64,
    /// Median over pairs of (this / native measured just before it).
    big_vs_native: Option<f64>,
    small_files_vs_native: Option<f64>,
}

#[derive(Serialize)]
struct Report {
    link_mb_per_s: f64,
    link_latency_ms: u64,
    rows: Vec<Measure>,
    warm_passthrough_vs_native_big: f64,
    warm_chunks_vs_native_big: f64,
    warm_no_passthrough_vs_native_big: f64,
    warm_passthrough_vs_native_small: f64,
    warm_no_passthrough_vs_native_small: f64,
    /// `None` on a kernel without EROFS.
    warm_erofs_vs_native_big: Option<f64>,
    warm_erofs_vs_native_small: Option<f64>,
    cold_big_vs_link: f64,
    daemon_rss_10_layers_kib: u64,
}

fn pseudo(len: usize, seed: u64) -> Vec<u8> {
    sluice_testkit::images::pseudo_random(len, seed)
}

/// Builds the two data trees (cached between runs).
fn data(dir: &Path, opts: &Options) -> anyhow::Result<(PathBuf, PathBuf)> {
    let big = dir.join("big");
    let small = dir.join("small");
    let marker = dir.join(format!(".complete-{}-{}", opts.big_mib, opts.small_files));
    if marker.exists() {
        return Ok((big, small));
    }
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(&big)?;
    println!(
        "    writing {} MiB and {} small files",
        opts.big_mib, opts.small_files
    );
    {
        use std::io::Write;
        let mut f = std::io::BufWriter::new(std::fs::File::create(big.join("blob.bin"))?);
        for i in 0..opts.big_mib {
            f.write_all(&pseudo(1 << 20, i + 1))?;
        }
        f.flush()?;
    }
    for i in 0..opts.small_files {
        let d = small.join(format!("d{:03}", i % 200));
        std::fs::create_dir_all(&d)?;
        let len = 1024 + (i * 7919) % (15 * 1024);
        std::fs::write(
            d.join(format!("f{i:05}")),
            pseudo(len, i as u64 + 1_000_000),
        )?;
    }
    std::fs::write(&marker, "")?;
    Ok((big, small))
}

fn small_list(root: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for d in std::fs::read_dir(root)? {
        for f in std::fs::read_dir(d?.path())? {
            out.push(f?.path().strip_prefix(root)?.to_owned());
        }
    }
    out.sort();
    Ok(out)
}

/// Reads the big file and all small files under `root`; returns the measure.
fn measure(
    system: &str,
    big: &Path,
    small_root: &Path,
    small: &[PathBuf],
) -> anyhow::Result<Measure> {
    drop_caches()?;
    let t = Instant::now();
    let mut f = std::fs::File::open(big).with_context(|| format!("opening {}", big.display()))?;
    let mut buf = vec![0u8; 1 << 20];
    let mut total = 0u64;
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        total += n as u64;
    }
    let big_rate = total as f64 / t.elapsed().as_secs_f64() / 1e6;
    drop(f);

    drop_caches()?;
    let next = Arc::new(AtomicUsize::new(0));
    let bytes = Arc::new(AtomicU64::new(0));
    let list = Arc::new(small.to_vec());
    let root = small_root.to_owned();
    let t = Instant::now();
    let threads: Vec<_> = (0..8)
        .map(|_| {
            let (next, bytes, list, root) =
                (next.clone(), bytes.clone(), list.clone(), root.clone());
            std::thread::spawn(move || -> std::io::Result<()> {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(p) = list.get(i) else { return Ok(()) };
                    let data = std::fs::read(root.join(p))?;
                    bytes.fetch_add(data.len() as u64, Ordering::Relaxed);
                }
            })
        })
        .collect();
    for t in threads {
        t.join().map_err(|_| anyhow::anyhow!("reader panicked"))??;
    }
    let secs = t.elapsed().as_secs_f64();
    let m = Measure {
        system: system.to_owned(),
        big_mb_per_s: big_rate,
        small_files_per_s: small.len() as f64 / secs,
        small_mb_per_s: bytes.load(Ordering::Relaxed) as f64 / secs / 1e6,
        big_vs_native: None,
        small_files_vs_native: None,
    };
    println!(
        "    {:<28} big {:>8.1} MB/s   small {:>8.0} files/s ({:.1} MB/s)",
        m.system, m.big_mb_per_s, m.small_files_per_s, m.small_mb_per_s
    );
    Ok(m)
}

/// Warm measurements are repeated this many times and their median kept: the
/// virtual disk's throughput swings by ±50% from one second to the next.
const WARM_REPETITIONS: usize = 3;

/// Where the native copies of the files are.
struct Native<'a> {
    big: &'a Path,
    small_root: &'a Path,
}

/// [`measure`] `WARM_REPETITIONS` times; the median of each figure. With
/// `native`, each run follows a native run, and the ratios are the median of
/// the pairs' ratios.
fn measure_median(
    system: &str,
    big: &Path,
    small_root: &Path,
    small: &[PathBuf],
    native: Option<&Native>,
) -> anyhow::Result<Measure> {
    let mut runs = Vec::new();
    let mut big_ratios = Vec::new();
    let mut small_ratios = Vec::new();
    for _ in 0..WARM_REPETITIONS {
        let before = native
            .map(|n| measure("  (native, paired)", n.big, n.small_root, small))
            .transpose()?;
        let m = measure(system, big, small_root, small)?;
        if let Some(b) = before {
            big_ratios.push(m.big_mb_per_s / b.big_mb_per_s);
            small_ratios.push(m.small_files_per_s / b.small_files_per_s);
        }
        runs.push(m);
    }
    let of = |f: fn(&Measure) -> f64| median(&mut runs.iter().map(f).collect::<Vec<_>>());
    Ok(Measure {
        system: system.to_owned(),
        big_mb_per_s: of(|m| m.big_mb_per_s),
        small_files_per_s: of(|m| m.small_files_per_s),
        small_mb_per_s: of(|m| m.small_mb_per_s),
        big_vs_native: native.map(|_| median(&mut big_ratios)),
        small_files_vs_native: native.map(|_| median(&mut small_ratios)),
    })
}

/// Waits until an EROFS image is mounted at each of `dirs` (a daemon makes
/// complete layers native in the background); `false` on a kernel without
/// EROFS, fails after two minutes otherwise.
fn wait_for_erofs(dirs: &[PathBuf]) -> anyhow::Result<bool> {
    let _ = Command::new("modprobe").arg("erofs").status();
    if !std::fs::read_to_string("/proc/filesystems")?.contains("erofs") {
        return Ok(false);
    }
    let started = Instant::now();
    loop {
        let top_is_erofs =
            |d: &PathBuf| sluice_testkit::mounts::top_mount(d).is_some_and(|m| m.fstype == "erofs");
        if dirs.iter().all(top_is_erofs) {
            println!(
                "    native images mounted after {:.1} s",
                started.elapsed().as_secs_f64()
            );
            return Ok(true);
        }
        if started.elapsed() > Duration::from_secs(120) {
            bail!("the layers were not mounted natively within two minutes");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// A running `sluice mount`.
struct Daemon {
    child: Child,
}

impl Daemon {
    fn start(
        bin: &Path,
        image: &str,
        dir: &Path,
        cache: &Path,
        extra: &[&str],
    ) -> anyhow::Result<Self> {
        let _ = std::fs::remove_dir_all(dir);
        let mut child = Command::new(bin)
            .args(["mount", image])
            .arg(dir)
            .arg("--cache")
            .arg(cache)
            .args(extra)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .context("starting sluice mount")?;
        let mut line = String::new();
        BufReader::new(child.stdout.take().context("stdout")?).read_line(&mut line)?;
        if !line.starts_with("ready") {
            let _ = child.kill();
            bail!("sluice mount failed: {line:?}");
        }
        Ok(Daemon { child })
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let _ = self.child.wait();
    }
}

/// RSS of a `sluice mount` daemon with the image mounted 5 times (10 layers),
/// idle after mounting.
fn idle_rss(sluice: &Path, image: &str, work: &Path, cache: &Path) -> anyhow::Result<u64> {
    step("memory: a sluice mount daemon with 10 layers mounted, idle");
    let d = Daemon::start(
        sluice,
        image,
        &work.join("mnt10"),
        cache,
        &["--copies", "5"],
    )?;
    std::thread::sleep(Duration::from_secs(2));
    let rss = rss_kib(d.pid()).unwrap_or(0);
    println!("    RSS {:.1} MiB", rss as f64 / 1024.0);
    Ok(rss)
}

pub fn run(opts: Options) -> anyhow::Result<()> {
    if !sluice_testkit::is_root() {
        bail!("bench read mounts filesystems and drops caches: run it as root");
    }
    step("building sluice-registry and sluice (release)");
    let bin = build_release(&["sluice-registry", "sluice-puller"])?;
    let out = output_dir();
    let work = out.join("read-work");
    let (big, small) = data(&out.join("read-data"), &opts)?;
    let small_files = small_list(&small)?;

    step("building, converting and pushing the test image (big file layer + small files layer)");
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work)?;
    let plain = work.join("plain");
    build_image(
        &plain,
        &ImageSpec {
            layers: vec![big.clone(), small.clone()],
            compression: Compression::None,
            cmd: vec![],
            env: vec![],
            tag: "v1".into(),
        },
    )?;
    let lazy = work.join("lazy");
    sluice_format::convert::convert_layout(&plain, "v1", &lazy, "v1", &ChunkingOptions::default())?;
    let _ = std::fs::remove_dir_all(&plain);
    let reg = SluiceRegistry::start(
        &bin.join("sluice-registry"),
        &work.join("registry"),
        &["--no-convert-on-push"],
    );
    std::fs::write(work.join("auth.json"), "{}")?;
    std::fs::write(
        work.join("policy.json"),
        r#"{"default":[{"type":"insecureAcceptAnything"}]}"#,
    )?;
    let status = Command::new("skopeo")
        .env("REGISTRY_AUTH_FILE", work.join("auth.json"))
        .arg("--policy")
        .arg(work.join("policy.json"))
        .args(["copy", "--quiet", "--dest-tls-verify=false"])
        .arg(format!("oci:{}:v1", lazy.display()))
        .arg(format!("docker://{}/bench/read:v1", reg.host()))
        .status()?;
    if !status.success() {
        bail!("skopeo push failed");
    }
    let link = Link {
        bytes_per_second: opts.link_mbps * 1_000_000,
        latency: Duration::from_millis(opts.link_ms),
    };
    let proxy = ThrottlingProxy::start(reg.addr, link);
    let image = format!("{}/bench/read:v1", proxy.addr);
    let sluice = bin.join("sluice");
    let cache = work.join("cache");
    let mnt = work.join("mnt");
    let big_in = |m: &Path| m.join("layer-0/blob.bin");
    let small_in = |m: &Path| m.join("layer-1");

    if opts.memory_only {
        idle_rss(&sluice, &image, &work, &cache)?;
        return Ok(());
    }
    step(&format!("reading: native, then sluice cold ({} MB/s + {} ms link), warm with and without passthrough, warm chunk by chunk, warm native (EROFS)", opts.link_mbps, opts.link_ms));
    let native_big = big.join("blob.bin");
    let native = Native {
        big: &native_big,
        small_root: &small,
    };
    let mut rows = vec![measure_median(
        "native ext4",
        &native_big,
        &small,
        &small_files,
        None,
    )?];
    {
        // The open before the passthrough row waits for the big file's
        // whole-file copy (in normal use made in the background).
        let _d = Daemon::start(
            &sluice,
            &image,
            &mnt,
            &cache,
            &["--whole-at-open-mib", "4096", "--no-native"],
        )?;
        rows.push(measure(
            "sluice cold",
            &big_in(&mnt),
            &small_in(&mnt),
            &small_files,
        )?);
        // One open makes the big file a passthrough file before measuring.
        drop(std::fs::File::open(big_in(&mnt))?);
        rows.push(measure_median(
            "sluice warm, passthrough",
            &big_in(&mnt),
            &small_in(&mnt),
            &small_files,
            Some(&native),
        )?);
    }
    {
        let _d = Daemon::start(
            &sluice,
            &image,
            &mnt,
            &cache,
            &["--no-passthrough", "--no-native"],
        )?;
        rows.push(measure_median(
            "sluice warm, no passthrough",
            &big_in(&mnt),
            &small_in(&mnt),
            &small_files,
            Some(&native),
        )?);
    }
    {
        // A cache of chunks only, as a node without passthrough fills it:
        // filled straight from the registry (not measured), then read warm.
        let chunks_only = work.join("cache-chunks");
        let direct = format!("{}/bench/read:v1", reg.host());
        let _d = Daemon::start(
            &sluice,
            &direct,
            &mnt,
            &chunks_only,
            &["--no-passthrough", "--no-native"],
        )?;
        measure(
            "(filling a chunk cache, no link)",
            &big_in(&mnt),
            &small_in(&mnt),
            &small_files,
        )?;
        rows.push(measure_median(
            "sluice warm, chunk by chunk",
            &big_in(&mnt),
            &small_in(&mnt),
            &small_files,
            Some(&native),
        )?);
    }

    let erofs = {
        // Every chunk is cached: the daemon writes each layer's image and
        // mounts it on top of the layer's FUSE mount.
        let _d = Daemon::start(&sluice, &image, &mnt, &cache, &[])?;
        if wait_for_erofs(&[mnt.join("layer-0"), mnt.join("layer-1")])? {
            let row = measure_median(
                "sluice warm, native (EROFS)",
                &big_in(&mnt),
                &small_in(&mnt),
                &small_files,
                Some(&native),
            )?;
            rows.push(row.clone());
            Some(row)
        } else {
            println!("    (no native row: this kernel has no EROFS)");
            None
        }
    };

    let rss = idle_rss(&sluice, &image, &work, &cache)?;

    let native_row = rows[0].clone();
    let big_ratio = |r: &Measure| {
        r.big_vs_native
            .unwrap_or(r.big_mb_per_s / native_row.big_mb_per_s)
    };
    let small_ratio = |r: &Measure| {
        r.small_files_vs_native
            .unwrap_or(r.small_files_per_s / native_row.small_files_per_s)
    };
    let report = Report {
        link_mb_per_s: opts.link_mbps as f64,
        link_latency_ms: opts.link_ms,
        warm_passthrough_vs_native_big: big_ratio(&rows[2]),
        warm_no_passthrough_vs_native_big: big_ratio(&rows[3]),
        warm_chunks_vs_native_big: big_ratio(&rows[4]),
        warm_passthrough_vs_native_small: small_ratio(&rows[2]),
        warm_no_passthrough_vs_native_small: small_ratio(&rows[3]),
        warm_erofs_vs_native_big: erofs.as_ref().map(big_ratio),
        warm_erofs_vs_native_small: erofs.as_ref().map(small_ratio),
        cold_big_vs_link: rows[1].big_mb_per_s / opts.link_mbps as f64,
        daemon_rss_10_layers_kib: rss,
        rows: rows.clone(),
    };
    println!();
    println!("| system | 1 GiB sequential MB/s | × native | 20k small files/s | × native |");
    println!("|---|---:|---:|---:|---:|");
    for r in &rows {
        println!(
            "| {} | {:.0} | {:.2} | {:.0} | {:.2} |",
            r.system,
            r.big_mb_per_s,
            big_ratio(r),
            r.small_files_per_s,
            small_ratio(r)
        );
    }
    println!("(× native of the warm rows: median over runs each paired with a native run just before it)");
    println!(
        "cold sequential: {:.2}× the {} MB/s link; daemon RSS with 10 idle layers: {:.1} MiB",
        report.cold_big_vs_link,
        opts.link_mbps,
        rss as f64 / 1024.0
    );
    let json = out.join("read.json");
    std::fs::write(&json, serde_json::to_vec_pretty(&report)?)?;
    println!("wrote {}", json.display());
    drop(proxy);
    reg.service.stop();
    if !opts.keep_work {
        let _ = std::fs::remove_dir_all(&work);
    }
    Ok(())
}
