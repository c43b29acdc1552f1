//! Prefetch profiles: what a starting container read, in order, so that the
//! next node fetches exactly that before the container asks.
//!
//! A profile is JSON (`application/vnd.sluice.prefetch.v1+json`), keyed by
//! the image manifest it was recorded for, and stored in the registry as an
//! OCI artifact whose `subject` is that manifest (found through the
//! referrers API). Version 1:
//!
//! ```json
//! {
//!   "schemaVersion": 1,
//!   "image": "sha256:<manifest digest>",
//!   "nodes": 3,                       // recordings merged into this one
//!   "windowMs": 10000,                // recording window after the first access
//!   "entries": [                      // by first touch
//!     {"layer": "sha256:<lazy blob>", "path": "usr/bin/python3.11",
//!      "offset": 0, "length": 32768, "firstTouchMs": 3.2, "seen": 3}
//!   ]
//! }
//! ```
//! An entry is one chunk's range of one file. Merging recordings from
//! several nodes averages each entry's first-touch time (weighted by how
//! many nodes saw it), counts the nodes that saw it, and orders by time: the
//! fleet converges on one list. Entries seen by fewer than a quarter of the
//! nodes are dropped once four or more recordings were merged, so a one-off
//! access does not stay in everyone's prefetch.

use std::collections::HashMap;

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use sluice_format::oci::{self, Descriptor, Manifest};
use sluice_format::Digest;

use crate::prefetch::PrefetchEntry;
use crate::registry::{FetchError, ImageRef, RegistryClient};

pub const PROFILE_MEDIA_TYPE: &str = "application/vnd.sluice.prefetch.v1+json";
/// The artifact type of profile manifests in the referrers API.
pub const PROFILE_ARTIFACT_TYPE: &str = PROFILE_MEDIA_TYPE;
const CREATED: &str = "org.opencontainers.image.created";
/// `{}`: the config of artifacts without one (OCI image spec 1.1).
const EMPTY_JSON: &[u8] = b"{}";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ProfileEntry {
    /// Digest of the lazy (zstd:chunked) blob the file is read from.
    pub layer: Digest,
    /// Path in the layer, without a leading `/`.
    pub path: String,
    pub offset: u64,
    pub length: u64,
    /// Milliseconds after the container's first access to the image.
    pub first_touch_ms: f64,
    /// Recordings that saw it.
    pub seen: u32,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Profile {
    pub schema_version: u32,
    pub image: Digest,
    pub nodes: u32,
    pub window_ms: u64,
    pub entries: Vec<ProfileEntry>,
}

#[derive(Debug, thiserror::Error)]
pub enum ProfileError {
    #[error("prefetch profile: {0}")]
    Invalid(String),
    #[error("prefetch profile: {0}")]
    Registry(#[from] FetchError),
}

/// Profiles larger than this are refused (a profile lists chunks, not data).
const MAX_PROFILE_BYTES: usize = 16 << 20;

impl Profile {
    pub fn new(image: Digest, window_ms: u64, entries: Vec<ProfileEntry>) -> Self {
        Profile {
            schema_version: 1,
            image,
            nodes: 1,
            window_ms,
            entries,
        }
    }

    pub fn parse(bytes: &[u8]) -> Result<Self, ProfileError> {
        if bytes.len() > MAX_PROFILE_BYTES {
            return Err(ProfileError::Invalid(format!(
                "{} bytes is larger than the {MAX_PROFILE_BYTES} allowed",
                bytes.len()
            )));
        }
        let p: Profile =
            serde_json::from_slice(bytes).map_err(|e| ProfileError::Invalid(e.to_string()))?;
        if p.schema_version != 1 {
            return Err(ProfileError::Invalid(format!(
                "schema version {} (this sluice reads 1)",
                p.schema_version
            )));
        }
        Ok(p)
    }

    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("a profile serializes")
    }

    /// Folds another recording of the same image into this one.
    pub fn merge(&mut self, other: &Profile) {
        let mut at: HashMap<(Digest, String, u64), usize> = self
            .entries
            .iter()
            .enumerate()
            .map(|(i, e)| ((e.layer.clone(), e.path.clone(), e.offset), i))
            .collect();
        for e in &other.entries {
            match at.get(&(e.layer.clone(), e.path.clone(), e.offset)) {
                Some(&i) => {
                    let mine = &mut self.entries[i];
                    let (a, b) = (f64::from(mine.seen), f64::from(e.seen));
                    mine.first_touch_ms =
                        (mine.first_touch_ms * a + e.first_touch_ms * b) / (a + b);
                    mine.seen += e.seen;
                    mine.length = mine.length.max(e.length);
                }
                None => {
                    at.insert(
                        (e.layer.clone(), e.path.clone(), e.offset),
                        self.entries.len(),
                    );
                    self.entries.push(e.clone());
                }
            }
        }
        self.nodes += other.nodes;
        self.window_ms = self.window_ms.max(other.window_ms);
        if self.nodes >= 4 {
            let nodes = self.nodes;
            self.entries.retain(|e| e.seen * 4 >= nodes);
        }
        // Earlier first; among equals, the one more nodes saw.
        self.entries.sort_by(|a, b| {
            a.first_touch_ms
                .total_cmp(&b.first_touch_ms)
                .then(b.seen.cmp(&a.seen))
        });
    }

    /// The entries of one layer, as prefetch work.
    pub fn entries_for(&self, layer: &Digest) -> Vec<PrefetchEntry> {
        self.entries
            .iter()
            .filter(|e| &e.layer == layer)
            .map(|e| PrefetchEntry {
                path: e.path.clone(),
                offset: e.offset,
                len: e.length,
                order: (e.first_touch_ms.max(0.0) * 1000.0) as u64,
            })
            .collect()
    }

    /// Total bytes (uncompressed) the profile asks for.
    pub fn bytes(&self) -> u64 {
        self.entries.iter().map(|e| e.length).sum()
    }
}

/// The newest profile of `manifest` in the image's repository, if any.
pub async fn fetch_newest(
    client: &RegistryClient,
    image: &ImageRef,
    manifest: &Digest,
) -> Result<Option<Profile>, ProfileError> {
    let path = format!(
        "referrers/{manifest}?artifactType={}",
        PROFILE_ARTIFACT_TYPE.replace('+', "%2B")
    );
    let list = client.get(image, &path, Some(oci::OCI_INDEX)).await?;
    let index = Manifest::parse(&list.bytes).map_err(|e| ProfileError::Invalid(e.to_string()))?;
    let newest = index
        .manifests
        .iter()
        .flatten()
        .filter(|d| d.artifact_type.as_deref() == Some(PROFILE_ARTIFACT_TYPE))
        .max_by(|a, b| {
            let t = |d: &Descriptor| d.annotations.get(CREATED).cloned().unwrap_or_default();
            t(a).cmp(&t(b))
        });
    let Some(desc) = newest else {
        return Ok(None);
    };
    let (bytes, _, _) = client
        .manifest(&image.with_reference(desc.digest.to_string()))
        .await?;
    let m = Manifest::parse(&bytes).map_err(|e| ProfileError::Invalid(e.to_string()))?;
    let Some(layer) = m
        .layers
        .iter()
        .flatten()
        .find(|l| l.media_type == PROFILE_MEDIA_TYPE)
    else {
        return Err(ProfileError::Invalid(format!(
            "artifact {} has no {PROFILE_MEDIA_TYPE} layer",
            desc.digest
        )));
    };
    if layer.size as usize > MAX_PROFILE_BYTES {
        return Err(ProfileError::Invalid(format!(
            "{} bytes is too large",
            layer.size
        )));
    }
    let blob = client.blob(image, &layer.digest).await?;
    let p = Profile::parse(&blob)?;
    if &p.image != manifest {
        return Err(ProfileError::Invalid(format!(
            "profile is for {}, listed as a referrer of {manifest}",
            p.image
        )));
    }
    Ok(Some(p))
}

/// Merges `profile` into the newest one in the registry (if any) and pushes
/// the result as a new referrer of the image manifest. Returns the merged
/// profile.
pub async fn publish(
    client: &RegistryClient,
    image: &ImageRef,
    subject: &Descriptor,
    profile: &Profile,
) -> Result<Profile, ProfileError> {
    let mut merged = match fetch_newest(client, image, &subject.digest).await {
        Ok(Some(mut existing)) => {
            existing.merge(profile);
            existing
        }
        Ok(None) => profile.clone(),
        Err(e) => {
            tracing::warn!(
                "reading the existing profile of {}: {e}; publishing this one alone",
                subject.digest
            );
            profile.clone()
        }
    };
    merged.image = subject.digest.clone();
    let blob = Bytes::from(merged.to_json());
    let blob_digest = client.push_blob(image, blob.clone()).await?;
    let empty = client
        .push_blob(image, Bytes::from_static(EMPTY_JSON))
        .await?;
    let created = time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default();
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": oci::OCI_MANIFEST,
        "artifactType": PROFILE_ARTIFACT_TYPE,
        "config": {"mediaType": oci::OCI_EMPTY, "digest": empty, "size": EMPTY_JSON.len()},
        "layers": [{"mediaType": PROFILE_MEDIA_TYPE, "digest": blob_digest, "size": blob.len()}],
        "subject": {"mediaType": subject.media_type, "digest": subject.digest, "size": subject.size},
        "annotations": {CREATED: created},
    });
    let bytes = Bytes::from(serde_json::to_vec(&manifest).expect("json"));
    let digest = Digest::sha256(&bytes);
    client
        .push_manifest(image, &digest.to_string(), oci::OCI_MANIFEST, bytes)
        .await?;
    Ok(merged)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(layer: &Digest, path: &str, offset: u64, t: f64) -> ProfileEntry {
        ProfileEntry {
            layer: layer.clone(),
            path: path.into(),
            offset,
            length: 100,
            first_touch_ms: t,
            seen: 1,
        }
    }

    #[test]
    fn merge_orders_by_weighted_first_touch_and_drops_rare_entries() {
        let l = Digest::sha256(b"layer");
        let img = Digest::sha256(b"image");
        let mut a = Profile::new(
            img.clone(),
            1000,
            vec![entry(&l, "a", 0, 10.0), entry(&l, "b", 0, 20.0)],
        );
        let b = Profile::new(
            img.clone(),
            1000,
            vec![entry(&l, "b", 0, 0.0), entry(&l, "c", 0, 5.0)],
        );
        a.merge(&b);
        assert_eq!(a.nodes, 2);
        let order: Vec<(&str, f64, u32)> = a
            .entries
            .iter()
            .map(|e| (e.path.as_str(), e.first_touch_ms, e.seen))
            .collect();
        assert_eq!(order, [("c", 5.0, 1), ("b", 10.0, 2), ("a", 10.0, 1)]);
        // With five recordings, entries seen once (under a quarter) go.
        for _ in 0..3 {
            a.merge(&Profile::new(
                img.clone(),
                1000,
                vec![entry(&l, "b", 0, 10.0)],
            ));
        }
        assert_eq!(a.nodes, 5);
        assert_eq!(
            a.entries
                .iter()
                .map(|e| e.path.as_str())
                .collect::<Vec<_>>(),
            ["b"]
        );
        let back = Profile::parse(&a.to_json()).unwrap();
        assert_eq!(back, a);
        assert_eq!(a.entries_for(&l).len(), 1);
        assert!(a.entries_for(&img).is_empty());
    }

    #[test]
    fn rejects_other_versions_and_garbage() {
        assert!(Profile::parse(b"{").is_err());
        let mut p = Profile::new(Digest::sha256(b"x"), 1, vec![]);
        p.schema_version = 2;
        let err = Profile::parse(&p.to_json()).unwrap_err().to_string();
        assert!(err.contains("schema version 2"), "{err}");
    }
}
