//! The TOC ("manifest" in containers/storage): JSON, zstd-compressed, in a
//! skippable frame. Field names and conventions follow containers/storage so
//! that layers written by podman/buildah/skopeo and by sluice are the same
//! format:
//!
//! - one entry per tar entry (`reg`, `dir`, `symlink`, `hardlink`, `char`,
//!   `block`, `fifo`), in tar order;
//! - a regular file cut into several chunks is its `reg` entry (which describes
//!   the first chunk) followed by one `chunk` entry per further chunk; a file of
//!   one chunk has no chunk fields and its `digest`/`offset`/`endOffset` are the
//!   chunk's;
//! - `offset`/`endOffset` are compressed offsets in the blob; `chunkOffset` is
//!   the offset in the file; xattr values are base64.

use std::collections::BTreeMap;
use std::io::Read;

use serde::{Deserialize, Serialize};

use crate::Digest;

/// Upper bound on a decompressed TOC. A TOC entry is ~200–400 bytes, so this
/// admits layers of about a million files while bounding what a hostile
/// annotation can make a node allocate.
pub const MAX_TOC_BYTES: u64 = 512 << 20;

/// The TOC document.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Toc {
    pub version: u32,
    pub entries: Vec<TocEntry>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tar_split_digest: Option<String>,
}

/// One TOC entry. Optional fields are omitted when empty, as in Go.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TocEntry {
    #[serde(rename = "type")]
    pub kind: String,
    pub name: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub link_name: String,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub mode: i64,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub size: i64,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub uid: i64,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub gid: i64,
    #[serde(default, rename = "modtime", skip_serializing_if = "Option::is_none")]
    pub mod_time: Option<String>,
    #[serde(
        default,
        rename = "accesstime",
        skip_serializing_if = "Option::is_none"
    )]
    pub access_time: Option<String>,
    #[serde(
        default,
        rename = "changetime",
        skip_serializing_if = "Option::is_none"
    )]
    pub change_time: Option<String>,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub dev_major: i64,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub dev_minor: i64,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub xattrs: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub digest: String,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub offset: i64,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub end_offset: i64,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub chunk_size: i64,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub chunk_offset: i64,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub chunk_digest: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub chunk_type: String,
}

fn is_zero(v: &i64) -> bool {
    *v == 0
}

pub const TYPE_REG: &str = "reg";
pub const TYPE_DIR: &str = "dir";
pub const TYPE_SYMLINK: &str = "symlink";
pub const TYPE_HARDLINK: &str = "hardlink";
pub const TYPE_CHAR: &str = "char";
pub const TYPE_BLOCK: &str = "block";
pub const TYPE_FIFO: &str = "fifo";
pub const TYPE_CHUNK: &str = "chunk";
/// A chunk of zeros (a hole); its frame still holds compressed zeros.
pub const CHUNK_TYPE_ZEROS: &str = "zeros";

#[derive(Debug, thiserror::Error)]
pub enum TocError {
    #[error("TOC frame is not valid zstd: {0}")]
    Zstd(std::io::Error),
    #[error("TOC decompresses to more than {limit} bytes")]
    TooLarge { limit: u64 },
    #[error("TOC has digest {actual}, the layer annotation says {expected}")]
    Digest { expected: Digest, actual: Digest },
    #[error("TOC is not valid JSON: {0}")]
    Json(#[from] serde_json::Error),
    #[error("TOC version {0} is not supported (only 1)")]
    Version(u32),
}

impl Toc {
    /// Decompresses and parses a TOC frame, checking it against the digest of
    /// the compressed bytes when one is known, and never inflating more than
    /// `limit` bytes.
    pub fn decode(
        compressed: &[u8],
        expected: Option<&Digest>,
        limit: u64,
    ) -> Result<Self, TocError> {
        if let Some(expected) = expected {
            let actual = Digest::of(expected.algorithm(), compressed);
            if actual != *expected {
                return Err(TocError::Digest {
                    expected: expected.clone(),
                    actual,
                });
            }
        }
        let decoder = zstd::stream::Decoder::new(compressed).map_err(TocError::Zstd)?;
        // Room for the whole JSON at once where the frame says its size (the
        // converter's do): growing by doubling copied a 15 MB TOC over and
        // over. Not more than the limit, nor more than a TOC's JSON plausibly
        // expands to: a frame may claim any size.
        let mut json = Vec::new();
        if let Ok(Some(size)) = zstd::zstd_safe::get_frame_content_size(compressed) {
            let plausible = compressed.len() as u64 * 32;
            json.reserve_exact(size.min(limit).min(plausible) as usize + 1);
        }
        decoder
            .take(limit + 1)
            .read_to_end(&mut json)
            .map_err(TocError::Zstd)?;
        if json.len() as u64 > limit {
            return Err(TocError::TooLarge { limit });
        }
        let toc: Toc = serde_json::from_slice(&json)?;
        if toc.version != 1 {
            return Err(TocError::Version(toc.version));
        }
        Ok(toc)
    }

    /// Serializes and compresses the TOC.
    pub fn encode(&self, level: i32) -> std::io::Result<(Vec<u8>, u64)> {
        let json = serde_json::to_vec(self).map_err(std::io::Error::other)?;
        let compressed = zstd::bulk::compress(&json, level)?;
        Ok((compressed, json.len() as u64))
    }
}
