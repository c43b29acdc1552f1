//! Converting layers and whole images to zstd:chunked.
//!
//! Layers of any OCI/Docker compression (tar, tar+gzip, tar+zstd) are
//! decompressed as a stream and re-encoded by [`crate::chunked::convert_tar`].
//! The tar itself is unchanged, so diff IDs and the image config stay valid;
//! conversion checks that they match. Layers that already carry a zstd:chunked
//! TOC are kept as they are.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{self, BufReader, Read};
use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::chunked::{self, convert_tar, ChunkingOptions, ConvertedLayer, WriteError};
use crate::layout::Layout;
use crate::oci::{self, Descriptor, ImageConfig, Manifest};
use crate::Digest;

/// Artifact type of an image manifest the registry derived from another by
/// converting its layers; its `subject` is the original manifest.
pub const LAZY_TWIN_ARTIFACT_TYPE: &str = "application/vnd.sluice.image.lazy.v1";
/// Annotation on a converted layer naming the layer it was converted from.
pub const TWIN_OF_ANNOTATION: &str = "dev.sluice.layer.converted-from";

#[derive(Debug, thiserror::Error)]
pub enum ConvertError {
    #[error("layer {digest}: {source}")]
    Layer { digest: Digest, source: WriteError },
    #[error("layer {digest}: media type {media_type:?} is not a tar layer")]
    MediaType { digest: Digest, media_type: String },
    #[error(
        "layer {digest}: converted tar has diff ID {actual}, the image config says {expected}"
    )]
    DiffId {
        digest: Digest,
        expected: Digest,
        actual: Digest,
    },
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("{0}")]
    Invalid(String),
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> ConvertError + '_ {
    move |source| ConvertError::Io {
        path: path.to_owned(),
        source,
    }
}

/// How a layer's bytes are compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LayerCompression {
    None,
    Gzip,
    Zstd,
}

/// The compression a layer media type declares; `None` if it is not a tar layer.
pub fn layer_compression(media_type: &str) -> Option<LayerCompression> {
    match media_type {
        oci::OCI_LAYER_TAR | "application/vnd.docker.image.rootfs.diff.tar" => {
            Some(LayerCompression::None)
        }
        oci::OCI_LAYER_GZIP | oci::DOCKER_LAYER_GZIP => Some(LayerCompression::Gzip),
        oci::OCI_LAYER_ZSTD | "application/vnd.docker.image.rootfs.diff.tar.zstd" => {
            Some(LayerCompression::Zstd)
        }
        _ => None,
    }
}

/// True if a layer can be mounted lazily as it is.
pub fn is_lazy_capable(layer: &Descriptor) -> bool {
    layer_compression(&layer.media_type) == Some(LayerCompression::Zstd)
        && chunked::is_chunked_layer(&layer.annotations)
}

/// Wraps a compressed layer stream in the matching decompressor.
pub fn decompressor<'a>(
    compression: LayerCompression,
    reader: impl Read + 'a,
) -> io::Result<Box<dyn Read + 'a>> {
    Ok(match compression {
        LayerCompression::None => Box::new(reader),
        LayerCompression::Gzip => Box::new(flate2::read::MultiGzDecoder::new(reader)),
        LayerCompression::Zstd => Box::new(zstd::stream::read::Decoder::new(reader)?),
    })
}

/// Converts one compressed layer stream; returns the descriptor of the new
/// layer (with its zstd:chunked annotations) and the conversion's facts.
pub fn convert_layer(
    original: &Descriptor,
    reader: impl Read,
    out: impl io::Write,
    opts: &ChunkingOptions,
) -> Result<(Descriptor, ConvertedLayer), ConvertError> {
    let compression =
        layer_compression(&original.media_type).ok_or_else(|| ConvertError::MediaType {
            digest: original.digest.clone(),
            media_type: original.media_type.clone(),
        })?;
    let layer_err = |source: WriteError| ConvertError::Layer {
        digest: original.digest.clone(),
        source,
    };
    let tar = decompressor(compression, BufReader::with_capacity(256 * 1024, reader))
        .map_err(|e| layer_err(e.into()))?;
    let converted = convert_tar(tar, out, opts).map_err(layer_err)?;
    let mut desc = Descriptor::new(
        oci::OCI_LAYER_ZSTD,
        converted.digest.clone(),
        converted.size,
    );
    desc.annotations = converted.annotations();
    desc.annotations
        .insert(TWIN_OF_ANNOTATION.to_owned(), original.digest.to_string());
    Ok((desc, converted))
}

/// Result of converting an image.
#[derive(Debug, Clone)]
pub struct ConvertedImage {
    pub manifest: Descriptor,
    /// Per layer: (original, converted or kept).
    pub layers: Vec<(Descriptor, Descriptor)>,
}

/// Builds the lazy twin's manifest: the original with its layers replaced.
pub fn twin_manifest(
    original_manifest: &Value,
    original_digest: &Digest,
    original_size: u64,
    original_media_type: &str,
    layers: &[Descriptor],
) -> Value {
    let mut m = original_manifest.clone();
    m["mediaType"] = Value::from(oci::OCI_MANIFEST);
    m["artifactType"] = Value::from(LAZY_TWIN_ARTIFACT_TYPE);
    m["layers"] = serde_json::to_value(layers).unwrap_or_default();
    m["subject"] = serde_json::json!({
        "mediaType": original_media_type,
        "digest": original_digest,
        "size": original_size,
    });
    m
}

/// Converts the image tagged `tag` in the layout at `from` into the layout at
/// `to` (tag `to_tag`): every tar layer becomes zstd:chunked.
pub fn convert_layout(
    from: &Path,
    tag: &str,
    to: &Path,
    to_tag: &str,
    opts: &ChunkingOptions,
) -> Result<ConvertedImage, ConvertError> {
    let index_path = from.join("index.json");
    let index: Value = serde_json::from_slice(&fs::read(&index_path).map_err(io_err(&index_path))?)
        .map_err(|e| ConvertError::Invalid(format!("{}: {e}", index_path.display())))?;
    let entry = index["manifests"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|m| m["annotations"]["org.opencontainers.image.ref.name"] == tag)
        .ok_or_else(|| {
            ConvertError::Invalid(format!("tag {tag:?} not found in {}", index_path.display()))
        })?;
    let digest: Digest = entry["digest"]
        .as_str()
        .unwrap_or_default()
        .parse()
        .map_err(|e| ConvertError::Invalid(format!("index entry digest: {e}")))?;
    let blob = |d: &Digest| {
        from.join("blobs")
            .join(d.algorithm().as_str())
            .join(d.hex())
    };
    let manifest_bytes = fs::read(blob(&digest)).map_err(io_err(&blob(&digest)))?;
    if Digest::of(digest.algorithm(), &manifest_bytes) != digest {
        return Err(ConvertError::Invalid(format!(
            "manifest {digest} in the layout is corrupt"
        )));
    }
    let manifest =
        Manifest::parse(&manifest_bytes).map_err(|e| ConvertError::Invalid(e.to_string()))?;
    if manifest.is_index() {
        return Err(ConvertError::Invalid(
            "tag names an index; convert each platform's manifest".into(),
        ));
    }
    let config_desc = manifest
        .config
        .clone()
        .ok_or_else(|| ConvertError::Invalid("no config".into()))?;
    let config_bytes =
        fs::read(blob(&config_desc.digest)).map_err(io_err(&blob(&config_desc.digest)))?;
    let config: ImageConfig = serde_json::from_slice(&config_bytes)
        .map_err(|e| ConvertError::Invalid(format!("image config: {e}")))?;
    let layers = manifest.layers.clone().unwrap_or_default();
    if config.rootfs.diff_ids.len() != layers.len() {
        return Err(ConvertError::Invalid(format!(
            "config lists {} diff IDs for {} layers",
            config.rootfs.diff_ids.len(),
            layers.len()
        )));
    }

    let out = Layout::create(to).map_err(|e| ConvertError::Invalid(e.to_string()))?;
    let mut pairs = Vec::new();
    for (layer, diff_id) in layers.iter().zip(&config.rootfs.diff_ids) {
        let src = blob(&layer.digest);
        let converted = if is_lazy_capable(layer) {
            fs::copy(&src, out.blob_path(&layer.digest)).map_err(io_err(&src))?;
            layer.clone()
        } else {
            let staged = to.join("blobs/sha256/.converting");
            let file = File::open(&src).map_err(io_err(&src))?;
            let sink = io::BufWriter::new(File::create(&staged).map_err(io_err(&staged))?);
            let (desc, facts) = convert_layer(layer, file, sink, opts)?;
            if facts.diff_id != *diff_id {
                let _ = fs::remove_file(&staged);
                return Err(ConvertError::DiffId {
                    digest: layer.digest.clone(),
                    expected: diff_id.clone(),
                    actual: facts.diff_id,
                });
            }
            let dest = out.blob_path(&desc.digest);
            fs::rename(&staged, &dest).map_err(io_err(&dest))?;
            desc
        };
        pairs.push((layer.clone(), converted));
    }
    let cfg_dest = out.blob_path(&config_desc.digest);
    fs::write(&cfg_dest, &config_bytes).map_err(io_err(&cfg_dest))?;
    let original: Value = serde_json::from_slice(&manifest_bytes)
        .map_err(|e| ConvertError::Invalid(format!("manifest: {e}")))?;
    let mut new_manifest = original.clone();
    new_manifest["mediaType"] = Value::from(oci::OCI_MANIFEST);
    new_manifest["layers"] = serde_json::to_value(pairs.iter().map(|(_, c)| c).collect::<Vec<_>>())
        .map_err(|e| ConvertError::Invalid(e.to_string()))?;
    let bytes =
        serde_json::to_vec(&new_manifest).map_err(|e| ConvertError::Invalid(e.to_string()))?;
    let mut desc = out
        .put_blob(oci::OCI_MANIFEST, &bytes)
        .map_err(|e| ConvertError::Invalid(e.to_string()))?;
    let mut annotations = BTreeMap::new();
    annotations.insert(
        "org.opencontainers.image.ref.name".to_owned(),
        to_tag.to_owned(),
    );
    desc.annotations = annotations;
    out.write_index(std::slice::from_ref(&desc))
        .map_err(|e| ConvertError::Invalid(e.to_string()))?;
    desc.annotations.clear();
    Ok(ConvertedImage {
        manifest: desc,
        layers: pairs,
    })
}
