//! The parts of OCI and Docker v2 image metadata that sluice reads and writes.
//!
//! Manifests are parsed into one tolerant view ([`Manifest`]) that covers image
//! manifests, indexes and Docker's schema-2 equivalents, because a registry must
//! accept all of them and only needs their references. Unknown fields are ignored
//! here; the exact pushed bytes are always what gets stored and served.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::Digest;

pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
pub const OCI_EMPTY: &str = "application/vnd.oci.empty.v1+json";
pub const OCI_LAYER_TAR: &str = "application/vnd.oci.image.layer.v1.tar";
pub const OCI_LAYER_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
pub const OCI_LAYER_ZSTD: &str = "application/vnd.oci.image.layer.v1.tar+zstd";
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
pub const DOCKER_MANIFEST_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
pub const DOCKER_CONFIG: &str = "application/vnd.docker.container.image.v1+json";
pub const DOCKER_LAYER_GZIP: &str = "application/vnd.docker.image.rootfs.diff.tar.gzip";

/// Manifest media types a registry serves, in the order it prefers them.
pub const MANIFEST_MEDIA_TYPES: [&str; 4] = [
    OCI_MANIFEST,
    OCI_INDEX,
    DOCKER_MANIFEST,
    DOCKER_MANIFEST_LIST,
];

/// True for media types that list other manifests (indexes, manifest lists).
pub fn is_index_media_type(media_type: &str) -> bool {
    media_type == OCI_INDEX || media_type == DOCKER_MANIFEST_LIST
}

/// A content descriptor: what a manifest says about a blob or another manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Descriptor {
    pub media_type: String,
    pub digest: Digest,
    pub size: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub artifact_type: Option<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
    /// Non-distributable layers name where they live instead of being pushed.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub urls: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub platform: Option<serde_json::Value>,
}

impl Descriptor {
    pub fn new(media_type: impl Into<String>, digest: Digest, size: u64) -> Self {
        Descriptor {
            media_type: media_type.into(),
            digest,
            size,
            artifact_type: None,
            annotations: BTreeMap::new(),
            urls: Vec::new(),
            platform: None,
        }
    }
}

/// Any image manifest or index, OCI or Docker schema 2.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Manifest {
    pub schema_version: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub media_type: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub artifact_type: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config: Option<Descriptor>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub layers: Option<Vec<Descriptor>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub manifests: Option<Vec<Descriptor>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subject: Option<Descriptor>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

/// Why bytes are not a manifest sluice can accept.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("manifest is not valid JSON for an image manifest or index: {0}")]
    Json(#[from] serde_json::Error),
    #[error("manifest schemaVersion is {0}; only schema version 2 is supported")]
    SchemaVersion(u32),
    #[error("manifest has neither config+layers (image) nor manifests (index)")]
    Shape,
    #[error("manifest mediaType {field:?} does not match Content-Type {header:?}")]
    MediaTypeMismatch { field: String, header: String },
}

impl Manifest {
    /// Parses and checks the structure of a pushed manifest.
    pub fn parse(bytes: &[u8]) -> Result<Self, ManifestError> {
        let m: Manifest = serde_json::from_slice(bytes)?;
        if m.schema_version != 2 {
            return Err(ManifestError::SchemaVersion(m.schema_version));
        }
        let is_image = m.config.is_some() && m.layers.is_some();
        let is_index = m.manifests.is_some() && m.config.is_none();
        if is_image == is_index {
            return Err(ManifestError::Shape);
        }
        Ok(m)
    }

    pub fn is_index(&self) -> bool {
        self.manifests.is_some()
    }

    /// The media type to serve the manifest with: its own `mediaType`, else the
    /// one it was pushed with, else the OCI default for its shape.
    pub fn effective_media_type(&self, pushed_as: Option<&str>) -> Result<String, ManifestError> {
        let header = pushed_as.map(|h| h.split(';').next().unwrap_or("").trim());
        match (&self.media_type, header) {
            (Some(field), Some(h)) if !h.is_empty() && field != h => {
                Err(ManifestError::MediaTypeMismatch {
                    field: field.clone(),
                    header: h.to_owned(),
                })
            }
            (Some(field), _) => Ok(field.clone()),
            (None, Some(h)) if MANIFEST_MEDIA_TYPES.contains(&h) => Ok(h.to_owned()),
            (None, _) if self.is_index() => Ok(OCI_INDEX.to_owned()),
            (None, _) => Ok(OCI_MANIFEST.to_owned()),
        }
    }

    /// The artifact type a referrers listing reports: `artifactType`, else the
    /// config media type (image spec 1.1 rule for manifests).
    pub fn referrer_artifact_type(&self) -> Option<String> {
        self.artifact_type
            .clone()
            .or_else(|| self.config.as_ref().map(|c| c.media_type.clone()))
    }

    /// Blobs an image manifest refers to (config and layers).
    pub fn blob_references(&self) -> impl Iterator<Item = &Descriptor> {
        self.config.iter().chain(self.layers.iter().flatten())
    }

    /// Manifests an index refers to.
    pub fn manifest_references(&self) -> impl Iterator<Item = &Descriptor> {
        self.manifests.iter().flatten()
    }
}

/// An image configuration, reduced to what sluice reads and rewrites.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ImageConfig {
    pub architecture: String,
    pub os: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created: Option<String>,
    #[serde(default)]
    pub config: serde_json::Value,
    pub rootfs: RootFs,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub history: Vec<serde_json::Value>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RootFs {
    #[serde(rename = "type")]
    pub kind: String,
    pub diff_ids: Vec<Digest>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_image_and_index_rejects_other_shapes() {
        let d = Digest::sha256(b"x");
        let image = format!(
            r#"{{"schemaVersion":2,"config":{{"mediaType":"{OCI_CONFIG}","digest":"{d}","size":1}},"layers":[]}}"#
        );
        let m = Manifest::parse(image.as_bytes()).unwrap();
        assert_eq!(m.effective_media_type(None).unwrap(), OCI_MANIFEST);
        assert_eq!(m.blob_references().count(), 1);

        let index = format!(
            r#"{{"schemaVersion":2,"mediaType":"{OCI_INDEX}","manifests":[{{"mediaType":"{OCI_MANIFEST}","digest":"{d}","size":1}}]}}"#
        );
        let m = Manifest::parse(index.as_bytes()).unwrap();
        assert!(m.is_index());
        assert!(m.effective_media_type(Some(OCI_MANIFEST)).is_err());

        assert!(Manifest::parse(br#"{"schemaVersion":1}"#).is_err());
        assert!(Manifest::parse(br#"{"schemaVersion":2}"#).is_err());
        assert!(Manifest::parse(b"not json").is_err());
    }
}
