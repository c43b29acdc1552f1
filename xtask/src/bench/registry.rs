//! `cargo xtask bench registry`: sluice-registry and the CNCF distribution
//! registry (Debian's `docker-registry` 2.8) side by side on loopback, with the
//! same data: manifest GETs and 1 MiB blob GETs at several concurrencies, and
//! streaming one 1 GiB blob. Reports throughput, latency percentiles, the
//! sluice/distribution ratio, and the servers' resident memory.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use http_body_util::BodyExt;
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;
use serde::Serialize;
use sluice_format::layout::Compression;
use sluice_format::Digest;
use sluice_registry::body::{self, ReaderBody, ResponseBody};
use sluice_testkit::images::busybox_image;
use sluice_testkit::process::{DistributionRegistry, SluiceRegistry};

use super::load::{self, LoadResult};
use super::{output_dir, rss_kib};
use crate::setup::{build_release, step};

#[derive(clap::Args)]
pub struct Options {
    /// Seconds measured per row (after a 0.5 s warm-up).
    #[arg(long, default_value_t = 3.0)]
    seconds: f64,
    /// Concurrency levels.
    #[arg(long, value_delimiter = ',', default_value = "1,16,64,256")]
    concurrency: Vec<usize>,
    /// Size of the large streamed blob in MiB.
    #[arg(long, default_value_t = 1024)]
    large_mib: u64,
}

#[derive(Serialize)]
struct Row {
    workload: String,
    concurrency: usize,
    sluice: LoadResult,
    distribution: LoadResult,
    throughput_ratio: f64,
}

#[derive(Serialize)]
struct Stream {
    megabytes: f64,
    sluice_mb_per_s: f64,
    distribution_mb_per_s: f64,
    ratio: f64,
}

#[derive(Serialize, Default)]
struct Memory {
    sluice_idle_kib: u64,
    sluice_peak_kib: u64,
    distribution_idle_kib: u64,
    distribution_peak_kib: u64,
}

#[derive(Serialize)]
struct Report {
    machine: String,
    rows: Vec<Row>,
    large_blob: Stream,
    memory: Memory,
}

/// Writes `mib` MiB of deterministic data once and caches it with its digest.
fn large_blob(dir: &Path, mib: u64) -> anyhow::Result<(PathBuf, Digest)> {
    let path = dir.join(format!("blob-{mib}m.bin"));
    let digest_path = path.with_extension("digest");
    if let (true, Ok(d)) = (path.exists(), std::fs::read_to_string(&digest_path)) {
        if let Ok(d) = d.trim().parse() {
            return Ok((path, d));
        }
    }
    println!("    writing a {mib} MiB test blob to {}", path.display());
    let mut f = std::io::BufWriter::new(std::fs::File::create(&path)?);
    let mut h = sluice_format::Algorithm::Sha256.hasher();
    for i in 0..mib {
        let piece = sluice_testkit::images::pseudo_random(1 << 20, i + 1);
        h.update(&piece);
        f.write_all(&piece)?;
    }
    f.flush()?;
    let d = h.finish();
    std::fs::write(&digest_path, d.to_string())?;
    Ok((path, d))
}

/// Repetitions of the large-blob stream; the median is reported.
const STREAM_RUNS: usize = 5;

/// Streams a URL with curl into /dev/null and returns MB/s. curl is a cheap,
/// common client that keeps up with both servers on loopback.
fn curl_rate(url: &str, expect: u64) -> anyhow::Result<f64> {
    let out = Command::new("curl")
        .args([
            "-sS",
            "-o",
            "/dev/null",
            "-w",
            "%{size_download} %{speed_download}",
        ])
        .arg(url)
        .output()
        .context("running curl")?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let mut parts = text.split_whitespace();
    let size: u64 = parts.next().and_then(|s| s.parse().ok()).unwrap_or(0);
    let speed: f64 = parts.next().and_then(|s| s.parse().ok()).unwrap_or(0.0);
    if !out.status.success() || size != expect {
        bail!(
            "curl {url}: got {size} of {expect} bytes: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(speed / 1e6)
}

type UploadClient = Client<HttpConnector, ResponseBody>;

/// Pushes a blob from a file: POST to open a session, one PUT with the body.
async fn upload(
    client: &UploadClient,
    base: &str,
    repo: &str,
    path: &Path,
    digest: &Digest,
) -> anyhow::Result<()> {
    let post = http::Request::post(format!("{base}/v2/{repo}/blobs/uploads/"))
        .header("content-length", "0")
        .body(body::empty())?;
    let resp = client.request(post).await?;
    if resp.status() != http::StatusCode::ACCEPTED {
        bail!("{base}: starting upload: {}", resp.status());
    }
    let location = resp
        .headers()
        .get("location")
        .and_then(|v| v.to_str().ok())
        .context("no Location")?
        .to_owned();
    let location = if location.starts_with("http") {
        location
    } else {
        format!("{base}{location}")
    };
    let sep = if location.contains('?') { '&' } else { '?' };
    let len = std::fs::metadata(path)?.len();
    let file = tokio::fs::File::open(path).await?;
    let put = http::Request::put(format!("{location}{sep}digest={digest}"))
        .header("content-length", len.to_string())
        .header("content-type", "application/octet-stream")
        .body(ReaderBody::new(file, len, |_| {}).boxed_unsync())?;
    let resp = client.request(put).await?;
    let status = resp.status();
    let text = resp
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    if status != http::StatusCode::CREATED {
        bail!(
            "{base}: finishing upload of {digest}: {status} {}",
            String::from_utf8_lossy(&text)
        );
    }
    Ok(())
}

/// Samples the peak RSS of a process until stopped.
struct RssSampler {
    stop: Arc<AtomicBool>,
    peak: Arc<AtomicU64>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl RssSampler {
    fn start(pid: u32) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let peak = Arc::new(AtomicU64::new(0));
        let (s, p) = (stop.clone(), peak.clone());
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                if let Some(kib) = rss_kib(pid) {
                    p.fetch_max(kib, Ordering::Relaxed);
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        });
        RssSampler {
            stop,
            peak,
            thread: Some(thread),
        }
    }

    fn finish(mut self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        self.peak.load(Ordering::Relaxed)
    }
}

fn machine() -> String {
    let cpus = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let kernel = Command::new("uname")
        .arg("-r")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default();
    format!("{cpus} CPUs, Linux {kernel}")
}

pub fn run(opts: Options) -> anyhow::Result<()> {
    step("building sluice-registry (release)");
    let bin = build_release(&["sluice-registry"])?.join("sluice-registry");
    let out = output_dir();
    let work = out.join("registry-work");
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work)?;

    step("starting sluice-registry and docker-registry (CNCF distribution)");
    let sluice = SluiceRegistry::start(&bin, &work.join("sluice"), &[]);
    let dist = DistributionRegistry::start(&work.join("distribution"));
    let bases = [
        format!("http://{}", sluice.addr),
        format!("http://{}", dist.addr),
    ];
    println!("    sluice at {}, distribution at {}", bases[0], bases[1]);

    step("pushing the same data to both");
    let image = busybox_image(&work.join("image"), Compression::Gzip);
    std::fs::write(work.join("auth.json"), "{}")?;
    std::fs::write(
        work.join("policy.json"),
        r#"{"default":[{"type":"insecureAcceptAnything"}]}"#,
    )?;
    for base in &bases {
        let host = base.trim_start_matches("http://");
        let status = Command::new("skopeo")
            .env("REGISTRY_AUTH_FILE", work.join("auth.json"))
            .arg("--policy")
            .arg(work.join("policy.json"))
            .args([
                "copy",
                "--quiet",
                "--dest-tls-verify=false",
                &image.oci_ref(),
            ])
            .arg(format!("docker://{host}/bench/busybox:v1"))
            .status()?;
        if !status.success() {
            bail!("skopeo push to {host} failed");
        }
    }
    let small = sluice_testkit::images::pseudo_random(1 << 20, 99);
    let small_path = work.join("blob-1m.bin");
    std::fs::write(&small_path, &small)?;
    let small_digest = Digest::sha256(&small);
    let (large_path, large_digest) = large_blob(&out, opts.large_mib)?;

    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let upload_client: UploadClient = Client::builder(TokioExecutor::new()).build_http();
    for base in &bases {
        rt.block_on(upload(
            &upload_client,
            base,
            "bench/busybox",
            &small_path,
            &small_digest,
        ))?;
        rt.block_on(upload(
            &upload_client,
            base,
            "bench/busybox",
            &large_path,
            &large_digest,
        ))?;
    }

    let mut memory = Memory {
        sluice_idle_kib: rss_kib(sluice.service.pid()).unwrap_or(0),
        distribution_idle_kib: rss_kib(dist.service.pid()).unwrap_or(0),
        ..Default::default()
    };
    let samplers = [
        RssSampler::start(sluice.service.pid()),
        RssSampler::start(dist.service.pid()),
    ];

    let warmup = Duration::from_millis(500);
    let measure = Duration::from_secs_f64(opts.seconds);
    let mut rows = Vec::new();
    let workloads = [
        (
            "manifest GET".to_owned(),
            "/v2/bench/busybox/manifests/v1".to_owned(),
        ),
        (
            "1 MiB blob GET".to_owned(),
            format!("/v2/bench/busybox/blobs/{small_digest}"),
        ),
    ];
    step(&format!(
        "load: {} workloads x concurrency {:?}, {:.1}s each per system",
        workloads.len(),
        opts.concurrency,
        opts.seconds
    ));
    for (name, path) in &workloads {
        for &c in &opts.concurrency {
            let s = rt.block_on(load::run(
                &format!("{}{path}", bases[0]),
                c,
                warmup,
                measure,
            ));
            let d = rt.block_on(load::run(
                &format!("{}{path}", bases[1]),
                c,
                warmup,
                measure,
            ));
            if s.errors > 0 || d.errors > 0 {
                println!(
                    "    warning: errors in {name} c={c}: sluice {} distribution {}",
                    s.errors, d.errors
                );
            }
            let ratio = s.requests_per_second / d.requests_per_second;
            println!(
                "    {name:<15} c={c:<4} sluice {:>8.0} req/s p95 {:>7.2} ms | distribution {:>8.0} req/s p95 {:>7.2} ms | x{ratio:.2}",
                s.requests_per_second, s.p95_ms, d.requests_per_second, d.p95_ms
            );
            rows.push(Row {
                workload: name.clone(),
                concurrency: c,
                sluice: s,
                distribution: d,
                throughput_ratio: ratio,
            });
        }
    }

    step(&format!(
        "streaming the {} MiB blob with curl, {STREAM_RUNS} times from each (alternating)",
        opts.large_mib
    ));
    let mut rates = [Vec::new(), Vec::new()];
    for _ in 0..STREAM_RUNS {
        for (i, base) in bases.iter().enumerate() {
            let url = format!("{base}/v2/bench/busybox/blobs/{large_digest}");
            rates[i].push(curl_rate(&url, opts.large_mib << 20)?);
        }
    }
    for r in &mut rates {
        r.sort_by(f64::total_cmp);
    }
    let large_blob = Stream {
        megabytes: (opts.large_mib << 20) as f64 / 1e6,
        sluice_mb_per_s: rates[0][STREAM_RUNS / 2],
        distribution_mb_per_s: rates[1][STREAM_RUNS / 2],
        ratio: rates[0][STREAM_RUNS / 2] / rates[1][STREAM_RUNS / 2],
    };
    let [s_sampler, d_sampler] = samplers;
    memory.sluice_peak_kib = s_sampler.finish();
    memory.distribution_peak_kib = d_sampler.finish();

    let report = Report {
        machine: machine(),
        rows,
        large_blob,
        memory,
    };
    print_table(&report);
    let json = out.join("registry.json");
    std::fs::write(&json, serde_json::to_vec_pretty(&report)?)?;
    println!("wrote {}", json.display());
    sluice.service.stop();
    dist.service.stop();
    let _ = std::fs::remove_dir_all(&work);
    Ok(())
}

fn print_table(r: &Report) {
    println!();
    println!(
        "sluice-registry vs distribution 2.8 on loopback ({})",
        r.machine
    );
    println!(
        "| workload | conc | sluice req/s | p50 ms | p95 ms | p99 ms | distribution req/s | p50 ms | p95 ms | p99 ms | ratio |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for row in &r.rows {
        let (s, d) = (&row.sluice, &row.distribution);
        println!(
            "| {} | {} | {:.0} | {:.2} | {:.2} | {:.2} | {:.0} | {:.2} | {:.2} | {:.2} | {:.2}x |",
            row.workload,
            row.concurrency,
            s.requests_per_second,
            s.p50_ms,
            s.p95_ms,
            s.p99_ms,
            d.requests_per_second,
            d.p50_ms,
            d.p95_ms,
            d.p99_ms,
            row.throughput_ratio
        );
    }
    let b = &r.large_blob;
    println!(
        "| {:.0} MB blob stream | 1 | {:.0} MB/s | | | | {:.0} MB/s | | | | {:.2}x |",
        b.megabytes, b.sluice_mb_per_s, b.distribution_mb_per_s, b.ratio
    );
    let m = &r.memory;
    println!(
        "memory (RSS): sluice {} MiB idle, {} MiB peak; distribution {} MiB idle, {} MiB peak",
        m.sluice_idle_kib / 1024,
        m.sluice_peak_kib / 1024,
        m.distribution_idle_kib / 1024,
        m.distribution_peak_kib / 1024
    );
}
