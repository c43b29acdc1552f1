//! From an image reference to the lazy layers to mount.
//!
//! A layer is mounted lazily if it is zstd:chunked with a TOC checksum as
//! pushed, or if the registry has a lazy twin of it: the image's referrers with
//! artifact type [`LAZY_TWIN_ARTIFACT_TYPE`] (any OCI 1.1 registry that ran a
//! converter), or sluice-registry's per-layer twin endpoint. Otherwise it has
//! to be pulled in full, and the caller is told so.

use std::collections::HashMap;

use sluice_format::chunked::Footer;
use sluice_format::convert::{is_lazy_capable, LAZY_TWIN_ARTIFACT_TYPE};
use sluice_format::oci::{self, Descriptor, Manifest};
use sluice_format::Digest;

use crate::registry::{FetchError, ImageRef, RegistryClient};

/// One layer of an image and how to get it lazily, if at all.
#[derive(Debug, Clone)]
pub struct ImageLayer {
    pub original: Descriptor,
    /// The zstd:chunked layer to mount: the original itself or its twin.
    pub lazy: Option<Descriptor>,
}

/// An image resolved for lazy mounting.
#[derive(Debug, Clone)]
pub struct ResolvedImage {
    pub image: ImageRef,
    pub manifest_digest: Digest,
    /// The manifest as served (for stores that keep it, like containerd's).
    pub manifest_bytes: bytes::Bytes,
    pub manifest_media_type: String,
    pub manifest: Manifest,
    pub config: Descriptor,
    pub layers: Vec<ImageLayer>,
}

#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("{image}: {source}")]
    Fetch {
        image: String,
        source: Box<FetchError>,
    },
    #[error("{image}: {reason}")]
    Invalid { image: String, reason: String },
}

fn has_checksum(d: &Descriptor) -> bool {
    matches!(Footer::from_annotations(&d.annotations), Ok(Some(f)) if f.toc_digest.is_some())
}

/// Fetches the manifest (choosing linux/amd64 in an index) and finds a lazy
/// form of every layer.
pub async fn resolve(
    client: &RegistryClient,
    image: &ImageRef,
) -> Result<ResolvedImage, ImageError> {
    let fetch = |source| ImageError::Fetch {
        image: image.to_string(),
        source: Box::new(source),
    };
    let invalid = |reason: String| ImageError::Invalid {
        image: image.to_string(),
        reason,
    };
    let (mut bytes, mut media_type, mut digest) = client.manifest(image).await.map_err(fetch)?;
    let mut manifest = Manifest::parse(&bytes).map_err(|e| invalid(e.to_string()))?;
    if manifest.is_index() {
        let pick = manifest
            .manifests
            .iter()
            .flatten()
            .find(|m| {
                m.platform.as_ref().is_none_or(|p| {
                    p["os"].as_str().unwrap_or("linux") == "linux"
                        && p["architecture"].as_str().unwrap_or("amd64") == "amd64"
                })
            })
            .ok_or_else(|| invalid("index has no linux/amd64 manifest".into()))?;
        let child = image.with_reference(pick.digest.to_string());
        (bytes, media_type, digest) = client.manifest(&child).await.map_err(fetch)?;
        manifest = Manifest::parse(&bytes).map_err(|e| invalid(e.to_string()))?;
    }
    let config = manifest
        .config
        .clone()
        .ok_or_else(|| invalid("manifest has no config".into()))?;
    let layers = manifest.layers.clone().unwrap_or_default();

    let mut twins: HashMap<Digest, Descriptor> = HashMap::new();
    if layers
        .iter()
        .any(|l| !(is_lazy_capable(l) && has_checksum(l)))
    {
        twins = find_twins(client, image, &digest, &layers).await;
    }
    let layers = layers
        .into_iter()
        .map(|l| {
            let lazy = if is_lazy_capable(&l) && has_checksum(&l) {
                Some(l.clone())
            } else {
                twins.get(&l.digest).cloned()
            };
            ImageLayer { original: l, lazy }
        })
        .collect();
    Ok(ResolvedImage {
        image: image.clone(),
        manifest_digest: digest,
        manifest_bytes: bytes,
        manifest_media_type: media_type,
        manifest,
        config,
        layers,
    })
}

/// Twins of plain layers: from a lazy-twin referrer of the manifest, else
/// from the registry's per-layer endpoint. Failures only mean "no twin".
async fn find_twins(
    client: &RegistryClient,
    image: &ImageRef,
    manifest: &Digest,
    layers: &[Descriptor],
) -> HashMap<Digest, Descriptor> {
    let mut twins = HashMap::new();
    let path = format!(
        "referrers/{manifest}?artifactType={}",
        LAZY_TWIN_ARTIFACT_TYPE.replace('+', "%2B")
    );
    if let Ok(f) = client.get(image, &path, Some(oci::OCI_INDEX)).await {
        if let Ok(index) = Manifest::parse(&f.bytes) {
            for r in index.manifests.iter().flatten() {
                if r.artifact_type.as_deref() != Some(LAZY_TWIN_ARTIFACT_TYPE) {
                    continue;
                }
                let Ok((bytes, _, _)) = client
                    .manifest(&image.with_reference(r.digest.to_string()))
                    .await
                else {
                    continue;
                };
                let Ok(twin) = Manifest::parse(&bytes) else {
                    continue;
                };
                for (orig, lazy) in layers.iter().zip(twin.layers.iter().flatten()) {
                    if has_checksum(lazy) {
                        twins.insert(orig.digest.clone(), lazy.clone());
                    }
                }
                break;
            }
        }
    }
    for l in layers {
        if twins.contains_key(&l.digest) || (is_lazy_capable(l) && has_checksum(l)) {
            continue;
        }
        if let Ok(f) = client
            .get(image, &format!("_sluice/twins/{}", l.digest), None)
            .await
        {
            if let Ok(d) = serde_json::from_slice::<Descriptor>(&f.bytes) {
                if has_checksum(&d) {
                    twins.insert(l.digest.clone(), d);
                }
            }
        }
    }
    twins
}
