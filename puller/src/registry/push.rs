//! Pushing an image from an OCI layout directory (blobs, then the manifest):
//! how `cargo xtask image --push` ships the node image and how the VM tests,
//! whose guests have no skopeo, upload their fixtures.

use std::path::{Path, PathBuf};

use bytes::Bytes;
use sluice_format::oci::Manifest;
use sluice_format::Digest;

use super::{FetchError, ImageRef, RegistryClient};

#[derive(Debug, thiserror::Error)]
pub enum PushError {
    #[error("{path}: {reason}")]
    Layout { path: PathBuf, reason: String },
    #[error(transparent)]
    Registry(#[from] FetchError),
}

fn layout_err(path: &Path) -> impl FnOnce(String) -> PushError + '_ {
    move |reason| PushError::Layout {
        path: path.to_owned(),
        reason,
    }
}

impl RegistryClient {
    /// Pushes the manifest tagged `tag` in the layout at `layout` (its
    /// `org.opencontainers.image.ref.name`) and its blobs to `image`, under
    /// `image`'s tag. Returns the manifest digest.
    pub async fn push_layout(
        &self,
        layout: &Path,
        tag: &str,
        image: &ImageRef,
    ) -> Result<Digest, PushError> {
        let index_path = layout.join("index.json");
        let index: serde_json::Value = std::fs::read(&index_path)
            .map_err(|e| e.to_string())
            .and_then(|b| serde_json::from_slice(&b).map_err(|e| e.to_string()))
            .map_err(layout_err(&index_path))?;
        let desc = index["manifests"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|m| m["annotations"]["org.opencontainers.image.ref.name"] == tag)
            .ok_or_else(|| layout_err(&index_path)(format!("no manifest tagged {tag:?}")))?;
        let blob = |d: &Digest| -> Result<Bytes, PushError> {
            let path = layout
                .join("blobs")
                .join(d.algorithm().as_str())
                .join(d.hex());
            let bytes = std::fs::read(&path).map_err(|e| layout_err(&path)(e.to_string()))?;
            if Digest::sha256(&bytes) != *d {
                return Err(layout_err(&path)(
                    "content does not match its digest".into(),
                ));
            }
            Ok(Bytes::from(bytes))
        };
        let digest: Digest = desc["digest"]
            .as_str()
            .unwrap_or_default()
            .parse()
            .map_err(|e| layout_err(&index_path)(format!("manifest digest: {e}")))?;
        let media_type = desc["mediaType"]
            .as_str()
            .unwrap_or(sluice_format::oci::OCI_MANIFEST)
            .to_owned();
        let manifest_bytes = blob(&digest)?;
        let manifest = Manifest::parse(&manifest_bytes)
            .map_err(|e| layout_err(&index_path)(format!("manifest {digest}: {e}")))?;
        for d in manifest
            .config
            .iter()
            .chain(manifest.layers.iter().flatten())
        {
            self.push_blob(image, blob(&d.digest)?).await?;
        }
        Ok(self
            .push_manifest(image, &image.reference, &media_type, manifest_bytes)
            .await?)
    }
}
