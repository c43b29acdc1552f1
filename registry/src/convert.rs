//! Convert-on-push: lazy twins of pushed images.
//!
//! When an image manifest with plain layers (tar, tar+gzip, tar+zstd) is
//! pushed, a background worker converts each such layer to zstd:chunked and
//! records it as the layer's *twin*. It then pushes a twin manifest: the same
//! config with the converted layers, `artifactType`
//! [`LAZY_TWIN_ARTIFACT_TYPE`] and the original as `subject`, so the referrers
//! API lists it. The original stays exactly as pushed, signatures included.
//!
//! A node finds a twin either through the referrers of the image manifest, or,
//! knowing only a layer digest, through `GET /v2/<name>/_sluice/twins/<digest>`
//! (see docs/registry.md). Conversion is deterministic, so converting the same
//! layer twice yields the same twin, and a layer shared by many images is
//! converted once.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use sluice_format::chunked::ChunkingOptions;
use sluice_format::convert::{
    convert_layer, is_lazy_capable, layer_compression, twin_manifest, LAZY_TWIN_ARTIFACT_TYPE,
};
use sluice_format::oci::{self, Descriptor, Manifest};
use sluice_format::Digest;
use tokio::sync::mpsc;

use crate::api::Registry;
use crate::name::RepoName;
use crate::storage::{ManifestReferences, Storage, StorageError, StoredManifest};

/// A pushed manifest waiting for conversion.
#[derive(Debug, Clone)]
pub struct Job {
    pub repo: RepoName,
    pub manifest: StoredManifest,
}

#[derive(Debug, thiserror::Error)]
pub enum ConvertJobError {
    #[error(transparent)]
    Storage(#[from] StorageError),
    #[error(transparent)]
    Convert(#[from] sluice_format::convert::ConvertError),
    #[error("scratch file {path}: {source}")]
    Scratch {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("conversion task failed: {0}")]
    Task(String),
    #[error("manifest: {0}")]
    Manifest(String),
}

/// Whether a pushed manifest gets a twin: an image (not an index, not a twin
/// itself) with at least one plain tar layer.
pub fn needs_twin(m: &Manifest) -> bool {
    if m.is_index() || m.artifact_type.as_deref() == Some(LAZY_TWIN_ARTIFACT_TYPE) {
        return false;
    }
    m.layers.iter().flatten().any(|l| {
        l.urls.is_empty() && layer_compression(&l.media_type).is_some() && !is_lazy_capable(l)
    })
}

/// Starts `workers` conversion workers; returns the queue feeding them.
pub fn start<S: Storage>(registry: Arc<Registry<S>>, workers: usize) -> mpsc::Sender<Job> {
    let (tx, rx) = mpsc::channel::<Job>(1024);
    let rx = Arc::new(tokio::sync::Mutex::new(rx));
    for _ in 0..workers.max(1) {
        let (registry, rx) = (registry.clone(), rx.clone());
        tokio::spawn(async move {
            loop {
                let job = { rx.lock().await.recv().await };
                let Some(job) = job else { break };
                let started = Instant::now();
                match convert_image(&registry, &job).await {
                    Ok(twin) => {
                        registry
                            .metrics
                            .conversions
                            .get_or_create(&result_label("ok"))
                            .inc();
                        tracing::info!(
                            repo = %job.repo,
                            manifest = %job.manifest.digest,
                            %twin,
                            seconds = started.elapsed().as_secs_f64(),
                            "lazy twin ready"
                        );
                    }
                    Err(e) => {
                        registry
                            .metrics
                            .conversions
                            .get_or_create(&result_label("failed"))
                            .inc();
                        tracing::error!(
                            repo = %job.repo,
                            manifest = %job.manifest.digest,
                            error = %e,
                            "conversion to zstd:chunked failed; nodes will pull this image in full"
                        );
                    }
                }
            }
        });
    }
    tx
}

fn result_label(result: &str) -> crate::metrics::ResultLabels {
    crate::metrics::ResultLabels {
        result: result.to_owned(),
    }
}

/// Converts every plain layer of one image and pushes its twin manifest.
async fn convert_image<S: Storage>(
    registry: &Arc<Registry<S>>,
    job: &Job,
) -> Result<Digest, ConvertJobError> {
    let manifest = Manifest::parse(&job.manifest.bytes)
        .map_err(|e| ConvertJobError::Manifest(e.to_string()))?;
    let mut twins = Vec::new();
    for layer in manifest.layers.iter().flatten() {
        let twin = if is_lazy_capable(layer)
            || layer_compression(&layer.media_type).is_none()
            || !layer.urls.is_empty()
        {
            layer.clone()
        } else if let Some(twin) = registry.storage.get_twin(&job.repo, &layer.digest).await? {
            twin
        } else {
            let twin = convert_one(registry, &job.repo, layer).await?;
            registry
                .storage
                .put_twin(&job.repo, &layer.digest, &twin)
                .await?;
            twin
        };
        twins.push(twin);
    }
    let original: serde_json::Value = serde_json::from_slice(&job.manifest.bytes)
        .map_err(|e| ConvertJobError::Manifest(e.to_string()))?;
    let twin = twin_manifest(
        &original,
        &job.manifest.digest,
        job.manifest.bytes.len() as u64,
        &job.manifest.media_type,
        &twins,
    );
    let bytes = Bytes::from(
        serde_json::to_vec(&twin).map_err(|e| ConvertJobError::Manifest(e.to_string()))?,
    );
    let digest = Digest::sha256(&bytes);
    let references = ManifestReferences {
        blobs: manifest
            .config
            .iter()
            .chain(twins.iter())
            .filter(|d| d.urls.is_empty())
            .map(|d| d.digest.clone())
            .collect(),
        manifests: Vec::new(),
    };
    let stored = StoredManifest {
        digest: digest.clone(),
        media_type: oci::OCI_MANIFEST.to_owned(),
        bytes,
    };
    registry
        .storage
        .put_manifest(
            &job.repo,
            &stored,
            None,
            Some(&job.manifest.digest),
            &references,
        )
        .await?;
    Ok(digest)
}

/// Converts one layer blob into a new blob linked into `repo`.
async fn convert_one<S: Storage>(
    registry: &Arc<Registry<S>>,
    repo: &RepoName,
    layer: &Descriptor,
) -> Result<Descriptor, ConvertJobError> {
    let started = Instant::now();
    let size = registry
        .storage
        .blob_size(&layer.digest)
        .await?
        .ok_or_else(|| StorageError::BlobUnknown(layer.digest.clone()))?;
    let body = registry.storage.read_blob(&layer.digest, 0, size).await?;
    let reader = tokio_util::io::StreamReader::new(http_body_util::BodyDataStream::new(body));
    let source = tokio_util::io::SyncIoBridge::new(reader);
    let work_dir = registry
        .config
        .convert
        .work_dir
        .clone()
        .unwrap_or_else(|| registry.config.root.join("tmp"));
    std::fs::create_dir_all(&work_dir).map_err(|source| ConvertJobError::Scratch {
        path: work_dir.clone(),
        source,
    })?;
    let scratch =
        tempfile::NamedTempFile::new_in(&work_dir).map_err(|source| ConvertJobError::Scratch {
            path: work_dir.clone(),
            source,
        })?;
    let opts = ChunkingOptions {
        toc_level: registry.config.convert.toc_level,
        ..ChunkingOptions::with_average(
            registry.config.convert.chunk_kib * 1024,
            registry.config.convert.level,
        )
    };
    let original = layer.clone();
    let (scratch, (desc, facts)) = tokio::task::spawn_blocking(move || {
        let sink = std::io::BufWriter::with_capacity(1 << 20, scratch.as_file());
        let r = convert_layer(&original, source, sink, &opts);
        r.map(|ok| (scratch, ok))
    })
    .await
    .map_err(|e| ConvertJobError::Task(e.to_string()))??;

    // Store the result through the ordinary upload path, so every backend
    // verifies and commits it the same way as a pushed blob.
    let id = registry.storage.start_upload(repo).await?;
    let file = tokio::fs::File::open(scratch.path())
        .await
        .map_err(|source| ConvertJobError::Scratch {
            path: scratch.path().to_owned(),
            source,
        })?;
    registry
        .storage
        .append_upload(repo, &id, Some(0), file)
        .await?;
    registry
        .storage
        .finish_upload(repo, &id, &desc.digest)
        .await?;
    registry.metrics.converted_bytes.inc_by(facts.size);
    tracing::info!(
        %repo,
        layer = %layer.digest,
        twin = %desc.digest,
        original_bytes = size,
        twin_bytes = facts.size,
        files = facts.files,
        chunks = facts.chunks,
        seconds = started.elapsed().as_secs_f64(),
        "layer converted to zstd:chunked"
    );
    Ok(desc)
}
