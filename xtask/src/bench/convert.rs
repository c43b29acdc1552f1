//! `cargo xtask bench convert`: conversion to zstd:chunked against gzip, plain
//! zstd and skopeo's own zstd:chunked compressor, on the same tars, and the
//! chunk-size trade-off: compressed size against read amplification.
//!
//! Read amplification is what a lazy node fetches to serve small reads:
//! compressed bytes of the chunks covering a read, divided by the bytes read.
//! Two read patterns: the first 4 KiB of every file (what `exec`, `import` and
//! config parsing touch first) and 4 KiB at random offsets in files over 1 MiB.

use std::fs::File;
use std::io::{self, BufReader, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{bail, Context};
use serde::Serialize;
use sluice_format::chunked::toc::{Toc, MAX_TOC_BYTES};
use sluice_format::chunked::{convert_tar, ChunkingOptions, LayerIndex, NodeKind};

use super::output_dir;
use crate::setup::step;

#[derive(clap::Args)]
pub struct Options {
    /// Average chunk sizes to compare, in KiB.
    #[arg(long, value_delimiter = ',', default_value = "16,32,64,256,1024")]
    chunk_kib: Vec<u32>,
}

#[derive(Serialize)]
struct Row {
    input: String,
    method: String,
    tar_bytes: u64,
    compressed_bytes: u64,
    ratio_to_gzip: f64,
    seconds: f64,
    mb_per_s: f64,
    chunks: Option<u64>,
    first_page_amplification: Option<f64>,
    random_read_amplification: Option<f64>,
}

/// Counts bytes written and drops them.
struct Counter(u64);

impl Write for Counter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0 += buf.len() as u64;
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

fn timed<T>(f: impl FnOnce() -> anyhow::Result<T>) -> anyhow::Result<(T, f64)> {
    let t = Instant::now();
    let v = f()?;
    Ok((v, t.elapsed().as_secs_f64()))
}

fn tar_of(dir: &Path, out: &Path) -> anyhow::Result<u64> {
    let mut f = BufWriter::new(File::create(out)?);
    sluice_format::layout::write_tar(dir, &mut f)?;
    f.flush()?;
    Ok(std::fs::metadata(out)?.len())
}

fn amplification(blob: &[u8], footer_offset: u64, toc_len: u64) -> anyhow::Result<(f64, f64)> {
    let json = Toc::inflate(
        &blob[footer_offset as usize..(footer_offset + toc_len) as usize],
        None,
        MAX_TOC_BYTES,
    )?;
    let toc = Toc::parse(&json)?;
    let index = LayerIndex::from_toc(&toc, footer_offset - 8)?;
    let (mut first_fetch, mut first_need) = (0u64, 0u64);
    let (mut rand_fetch, mut rand_need) = (0u64, 0u64);
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    for (i, node) in index.nodes().iter().enumerate() {
        let NodeKind::File { size, .. } = node.kind else {
            continue;
        };
        let want = size.min(4096);
        first_need += want;
        first_fetch += index
            .chunks_for_range(i, 0, want)
            .iter()
            .map(|c| c.blob_len)
            .sum::<u64>();
        if size > 1 << 20 {
            for _ in 0..16 {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                let off = seed % (size - 4096);
                rand_need += 4096;
                rand_fetch += index
                    .chunks_for_range(i, off, 4096)
                    .iter()
                    .map(|c| c.blob_len)
                    .sum::<u64>();
            }
        }
    }
    let ratio = |a: u64, b: u64| if b == 0 { 0.0 } else { a as f64 / b as f64 };
    Ok((ratio(first_fetch, first_need), ratio(rand_fetch, rand_need)))
}

/// Converts with skopeo from an uncompressed OCI layout; returns (bytes, seconds).
fn skopeo_chunked(work: &Path, dir: &Path, name: &str) -> anyhow::Result<(u64, f64)> {
    let layout = work.join(format!("{name}-layout"));
    sluice_format::layout::build_image(
        &layout,
        &sluice_format::layout::ImageSpec {
            layers: vec![dir.to_owned()],
            compression: sluice_format::layout::Compression::None,
            cmd: vec![],
            env: vec![],
            tag: "v1".into(),
        },
    )?;
    std::fs::write(
        work.join("policy.json"),
        r#"{"default":[{"type":"insecureAcceptAnything"}]}"#,
    )?;
    let out = work.join(format!("{name}-skopeo"));
    let _ = std::fs::remove_dir_all(&out);
    let (status, secs) = timed(|| {
        Ok(Command::new("skopeo")
            .arg("--policy")
            .arg(work.join("policy.json"))
            .args(["copy", "--quiet", "--dest-compress-format", "zstd:chunked"])
            .arg(format!("oci:{}:v1", layout.display()))
            .arg(format!("oci:{}:v1", out.display()))
            .status()?)
    })?;
    if !status.success() {
        bail!("skopeo zstd:chunked conversion failed");
    }
    let index: serde_json::Value = serde_json::from_slice(&std::fs::read(out.join("index.json"))?)?;
    let digest = index["manifests"][0]["digest"]
        .as_str()
        .context("skopeo index")?;
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("blobs/sha256").join(&digest[7..]))?)?;
    let size = manifest["layers"][0]["size"]
        .as_u64()
        .context("layer size")?;
    Ok((size, secs))
}

pub fn run(opts: Options) -> anyhow::Result<()> {
    let out = output_dir();
    let work = out.join("convert-work");
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work)?;
    let busybox_dir = work.join("busybox");
    let (base, _app) = sluice_testkit::images::busybox_rootfs(&busybox_dir);
    let inputs: Vec<(String, PathBuf)> = vec![
        ("busybox".into(), base),
        (
            "debian-python3".into(),
            sluice_testkit::fixture("python3").join("rootfs"),
        ),
    ];
    let mut rows = Vec::new();
    for (name, dir) in &inputs {
        step(&format!("input {name}"));
        let tar_path = work.join(format!("{name}.tar"));
        let tar_bytes = tar_of(dir, &tar_path)?;
        let read_tar = || -> anyhow::Result<BufReader<File>> {
            Ok(BufReader::with_capacity(1 << 20, File::open(&tar_path)?))
        };
        let mb = tar_bytes as f64 / 1e6;

        let (gz, secs) = timed(|| {
            let mut enc = flate2::write::GzEncoder::new(Counter(0), flate2::Compression::new(6));
            io::copy(&mut read_tar()?, &mut enc)?;
            Ok(enc.finish()?.0)
        })?;
        let push = |rows: &mut Vec<Row>,
                    method: &str,
                    bytes: u64,
                    secs: f64,
                    extra: Option<(u64, f64, f64)>| {
            println!(
                "    {method:<28} {:>10.1} MB  x{:.3} of gzip  {:>7.1} MB/s{}",
                bytes as f64 / 1e6,
                bytes as f64 / gz as f64,
                mb / secs,
                extra
                    .map(|(c, f, r)| format!(
                        "  {c} chunks, first-page amp {f:.2}, random-read amp {r:.2}"
                    ))
                    .unwrap_or_default()
            );
            rows.push(Row {
                input: name.clone(),
                method: method.to_owned(),
                tar_bytes,
                compressed_bytes: bytes,
                ratio_to_gzip: bytes as f64 / gz as f64,
                seconds: secs,
                mb_per_s: mb / secs,
                chunks: extra.map(|e| e.0),
                first_page_amplification: extra.map(|e| e.1),
                random_read_amplification: extra.map(|e| e.2),
            });
        };
        push(&mut rows, "gzip -6", gz, secs, None);
        let (zs, secs) = timed(|| {
            let mut enc = zstd::stream::write::Encoder::new(Counter(0), 3)?;
            io::copy(&mut read_tar()?, &mut enc)?;
            Ok(enc.finish()?.0)
        })?;
        push(&mut rows, "zstd -3", zs, secs, None);
        for &kib in &opts.chunk_kib {
            let copts = ChunkingOptions::with_average(kib * 1024, 3);
            let (blob, secs) = timed(|| {
                let mut blob = Vec::new();
                let c = convert_tar(read_tar()?, &mut blob, &copts)?;
                Ok((blob, c))
            })?;
            let (blob, c) = blob;
            let (first, random) =
                amplification(&blob, c.footer.toc.offset, c.footer.toc.compressed_len)?;
            push(
                &mut rows,
                &format!("sluice zstd:chunked {kib} KiB"),
                c.size,
                secs,
                Some((c.chunks, first, random)),
            );
        }
        let (bytes, secs) = skopeo_chunked(&work, dir, name)?;
        push(&mut rows, "skopeo zstd:chunked", bytes, secs, None);
    }
    let json = out.join("convert.json");
    std::fs::write(&json, serde_json::to_vec_pretty(&rows)?)?;
    println!();
    println!(
        "| input | method | MB | × gzip size | MB/s | chunks | first-page amp. | random 4K amp. |"
    );
    println!("|---|---|---:|---:|---:|---:|---:|---:|");
    for r in &rows {
        let opt = |v: Option<f64>| v.map(|x| format!("{x:.2}")).unwrap_or_default();
        println!(
            "| {} | {} | {:.1} | {:.3} | {:.1} | {} | {} | {} |",
            r.input,
            r.method,
            r.compressed_bytes as f64 / 1e6,
            r.ratio_to_gzip,
            r.mb_per_s,
            r.chunks.map(|c| c.to_string()).unwrap_or_default(),
            opt(r.first_page_amplification),
            opt(r.random_read_amplification)
        );
    }
    println!("wrote {}", json.display());
    let _ = std::fs::remove_dir_all(&work);
    Ok(())
}
