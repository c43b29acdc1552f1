//! `cargo xtask bench index`: what a node does with a layer's TOC before it
//! can mount the layer, timed step by step on the start benchmark's images.
//!
//! A pull cannot end before every layer is mounted, and for a layer of many
//! files the TOC's fetch is only part of it: the node checks its digest,
//! inflates and parses the JSON (`decode`), validates it into the index
//! (`index`) and builds the tree the filesystem lists (`tree`). All three
//! are CPU work on the pull's path; this benchmark times them in one
//! process, on the layers the registry would serve (each image's zstd
//! layout converted to zstd:chunked as the registry does on push).

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context};
use serde::Serialize;
use sluice_format::chunked::toc::{Toc, MAX_TOC_BYTES};
use sluice_format::chunked::{ChunkingOptions, Footer, LayerIndex};
use sluice_format::oci::Descriptor;
use sluice_format::Digest;

use super::{median, output_dir};
use crate::setup::step;

#[derive(clap::Args)]
pub struct Options {
    /// Images of the start benchmark whose layers are measured.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "numpy-pandas,python3-large"
    )]
    images: Vec<String>,
    /// Timed runs per layer and step (the median is reported).
    #[arg(long, default_value_t = 9)]
    repetitions: usize,
}

#[derive(Serialize)]
struct Row {
    image: String,
    layer: Digest,
    entries: usize,
    chunks: usize,
    toc_bytes: u64,
    json_bytes: u64,
    /// Medians, in milliseconds.
    decode_ms: f64,
    index_ms: f64,
    tree_ms: f64,
    total_ms: f64,
}

pub fn run(opts: Options) -> anyhow::Result<()> {
    if opts.repetitions == 0 {
        bail!("--repetitions must be at least 1");
    }
    let images = super::start::pick(&super::start::IMAGES, &opts.images, "image")?;
    let mut rows = Vec::new();
    for image in images {
        let layers = chunked_layers(image)?;
        step(&format!(
            "{image}: decoding and indexing {} TOCs, {} times each",
            layers.len(),
            opts.repetitions
        ));
        for (blob, layer) in layers {
            rows.push(measure(image, &blob, &layer, opts.repetitions)?);
        }
    }
    println!();
    println!(
        "| image | layer | entries | chunks | TOC KB | JSON KB | decode ms | index ms | tree ms | total ms |"
    );
    println!("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|");
    for r in &rows {
        println!(
            "| {} | {} | {} | {} | {} | {} | {:.1} | {:.1} | {:.1} | {:.1} |",
            r.image,
            &r.layer.hex()[..12],
            r.entries,
            r.chunks,
            r.toc_bytes / 1000,
            r.json_bytes / 1000,
            r.decode_ms,
            r.index_ms,
            r.tree_ms,
            r.total_ms
        );
    }
    let out = output_dir().join("index.json");
    std::fs::create_dir_all(output_dir())?;
    std::fs::write(
        &out,
        serde_json::to_vec_pretty(&serde_json::json!({
            "repetitions": opts.repetitions,
            "layers": rows,
        }))?,
    )?;
    println!("\nwrote {}", out.display());
    Ok(())
}

/// The image's layers as the registry converts them: (blob path,
/// descriptor with the zstd:chunked annotations). Converted once per
/// source image and kept under target/bench/index-work/.
fn chunked_layers(image: &'static str) -> anyhow::Result<Vec<(PathBuf, Descriptor)>> {
    let source = super::start::zstd_layout(image)?;
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(source.join("index.json"))?)?;
    let manifest = index["manifests"][0]["digest"]
        .as_str()
        .context("the image layout has no manifest")?;
    let manifest: Digest = manifest.parse()?;
    let work = output_dir()
        .join("index-work")
        .join(format!("{image}-{}", &manifest.hex()[..12]));
    let saved = work.join("layers.json");
    if !saved.exists() {
        step(&format!("{image}: converting its layers to zstd:chunked"));
        let _ = std::fs::remove_dir_all(&work);
        std::fs::create_dir_all(&work)?;
        let converted = sluice_format::convert::convert_layout(
            &source,
            "v1",
            &work.join("layout"),
            "v1",
            &ChunkingOptions::default(),
        )
        .with_context(|| format!("converting {}", source.display()))?;
        let layers: Vec<Descriptor> = converted.layers.into_iter().map(|(_, c)| c).collect();
        std::fs::write(&saved, serde_json::to_vec(&layers)?)?;
    }
    let layers: Vec<Descriptor> = serde_json::from_slice(&std::fs::read(&saved)?)?;
    Ok(layers
        .into_iter()
        .map(|d| (blob_path(&work.join("layout"), &d.digest), d))
        .collect())
}

fn blob_path(layout: &Path, digest: &Digest) -> PathBuf {
    layout
        .join("blobs")
        .join(digest.algorithm().to_string())
        .join(digest.hex())
}

fn measure(
    image: &str,
    blob: &Path,
    layer: &Descriptor,
    repetitions: usize,
) -> anyhow::Result<Row> {
    let footer = Footer::from_annotations(&layer.annotations)?
        .with_context(|| format!("layer {} is not zstd:chunked", layer.digest))?;
    let toc_digest = footer
        .toc_digest
        .clone()
        .context("no TOC digest annotation")?;
    let bytes = read_range(blob, footer.toc.offset, footer.toc.compressed_len)?;
    let data_end = footer.toc.offset - 8;
    let (mut decode, mut index, mut tree) = (Vec::new(), Vec::new(), Vec::new());
    let mut shape = (0, 0);
    for _ in 0..repetitions {
        let t = Instant::now();
        let json = Toc::inflate(&bytes, Some(&toc_digest), MAX_TOC_BYTES)?;
        let toc = Toc::parse(&json)?;
        decode.push(t.elapsed().as_secs_f64() * 1e3);
        let t = Instant::now();
        let built = LayerIndex::from_toc(&toc, data_end)?;
        // Dropping the TOC and its JSON is part of the step in the daemon too.
        drop(toc);
        drop(json);
        index.push(t.elapsed().as_secs_f64() * 1e3);
        let t = Instant::now();
        let listed = sluice_puller::fs::Tree::build(&built);
        tree.push(t.elapsed().as_secs_f64() * 1e3);
        shape = (listed.len(), built.chunks().len());
    }
    let (decode_ms, index_ms, tree_ms) =
        (median(&mut decode), median(&mut index), median(&mut tree));
    Ok(Row {
        image: image.to_owned(),
        layer: layer.digest.clone(),
        entries: shape.0,
        chunks: shape.1,
        toc_bytes: footer.toc.compressed_len,
        json_bytes: footer.toc.uncompressed_len,
        decode_ms,
        index_ms,
        tree_ms,
        total_ms: decode_ms + index_ms + tree_ms,
    })
}

fn read_range(path: &Path, offset: u64, len: u64) -> anyhow::Result<Vec<u8>> {
    use std::os::unix::fs::FileExt;
    let file = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut buf = vec![0; len as usize];
    file.read_exact_at(&mut buf, offset)
        .with_context(|| format!("reading the TOC of {}", path.display()))?;
    Ok(buf)
}
