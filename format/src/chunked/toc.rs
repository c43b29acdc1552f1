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
//!
//! A parsed TOC borrows its strings from the JSON where it can
//! ([`Toc::parse`]): a layer of 40,000 files has 100,000 entries, and
//! allocating and copying their names, digests and times was a large part
//! of the time a node needs before it can mount the layer.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::io::Read;

use serde::{Deserialize, Deserializer, Serialize};

use crate::Digest;

/// Upper bound on a decompressed TOC. A TOC entry is ~200–400 bytes, so this
/// admits layers of about a million files while bounding what a hostile
/// annotation can make a node allocate.
pub const MAX_TOC_BYTES: u64 = 512 << 20;

/// The TOC document.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Toc<'a> {
    pub version: u32,
    #[serde(borrow)]
    pub entries: Vec<TocEntry<'a>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tar_split_digest: Option<String>,
}

/// One TOC entry. Optional fields are omitted when empty, as in Go.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TocEntry<'a> {
    #[serde(rename = "type", borrow)]
    pub kind: Cow<'a, str>,
    #[serde(borrow)]
    pub name: Cow<'a, str>,
    #[serde(default, borrow, skip_serializing_if = "str::is_empty")]
    pub link_name: Cow<'a, str>,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub mode: i64,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub size: i64,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub uid: i64,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub gid: i64,
    #[serde(
        default,
        borrow,
        deserialize_with = "optional_text",
        rename = "modtime",
        skip_serializing_if = "Option::is_none"
    )]
    pub mod_time: Option<Cow<'a, str>>,
    #[serde(
        default,
        borrow,
        deserialize_with = "optional_text",
        rename = "accesstime",
        skip_serializing_if = "Option::is_none"
    )]
    pub access_time: Option<Cow<'a, str>>,
    #[serde(
        default,
        borrow,
        deserialize_with = "optional_text",
        rename = "changetime",
        skip_serializing_if = "Option::is_none"
    )]
    pub change_time: Option<Cow<'a, str>>,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub dev_major: i64,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub dev_minor: i64,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub xattrs: BTreeMap<String, String>,
    #[serde(default, borrow, skip_serializing_if = "str::is_empty")]
    pub digest: Cow<'a, str>,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub offset: i64,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub end_offset: i64,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub chunk_size: i64,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub chunk_offset: i64,
    #[serde(default, borrow, skip_serializing_if = "str::is_empty")]
    pub chunk_digest: Cow<'a, str>,
    #[serde(default, borrow, skip_serializing_if = "str::is_empty")]
    pub chunk_type: Cow<'a, str>,
}

impl TocEntry<'_> {
    /// The same entry owning its strings.
    pub fn into_owned(self) -> TocEntry<'static> {
        let own = |c: Cow<'_, str>| Cow::Owned(c.into_owned());
        TocEntry {
            kind: own(self.kind),
            name: own(self.name),
            link_name: own(self.link_name),
            mode: self.mode,
            size: self.size,
            uid: self.uid,
            gid: self.gid,
            mod_time: self.mod_time.map(own),
            access_time: self.access_time.map(own),
            change_time: self.change_time.map(own),
            dev_major: self.dev_major,
            dev_minor: self.dev_minor,
            xattrs: self.xattrs,
            digest: own(self.digest),
            offset: self.offset,
            end_offset: self.end_offset,
            chunk_size: self.chunk_size,
            chunk_offset: self.chunk_offset,
            chunk_digest: own(self.chunk_digest),
            chunk_type: own(self.chunk_type),
        }
    }
}

fn is_zero(v: &i64) -> bool {
    *v == 0
}

/// An optional string, borrowed from the JSON where it has no escapes
/// (serde borrows a `Cow` field, but not one inside an `Option`).
fn optional_text<'de: 'a, 'a, D: Deserializer<'de>>(
    d: D,
) -> Result<Option<Cow<'a, str>>, D::Error> {
    #[derive(Deserialize)]
    struct Text<'a>(#[serde(borrow)] Cow<'a, str>);
    Ok(Option::<Text<'a>>::deserialize(d)?.map(|t| t.0))
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

impl Toc<'_> {
    /// Decompresses a TOC frame into its JSON, checking it against the
    /// digest of the compressed bytes when one is known, and never inflating
    /// more than `limit` bytes. [`Toc::parse`] reads the JSON.
    pub fn inflate(
        compressed: &[u8],
        expected: Option<&Digest>,
        limit: u64,
    ) -> Result<Vec<u8>, TocError> {
        if let Some(expected) = expected {
            let actual = Digest::of(expected.algorithm(), compressed);
            if actual != *expected {
                return Err(TocError::Digest {
                    expected: expected.clone(),
                    actual,
                });
            }
        }
        // A frame that says its size (the converter's do) is inflated in one
        // call into a buffer of that size: streaming it copied a 15 MB TOC
        // around. Not beyond the limit, nor beyond what a TOC's JSON
        // plausibly expands to: a frame may claim any size.
        let plausible = compressed.len() as u64 * 32;
        if let Ok(Some(size)) = zstd::zstd_safe::get_frame_content_size(compressed) {
            if size > limit {
                return Err(TocError::TooLarge { limit });
            }
            if size <= plausible {
                // More than the frame said (further frames): read as a
                // stream below, up to the limit.
                if let Ok(json) = zstd::bulk::decompress(compressed, size as usize) {
                    return Ok(json);
                }
            }
        }
        let decoder = zstd::stream::Decoder::new(compressed).map_err(TocError::Zstd)?;
        let mut json = Vec::new();
        decoder
            .take(limit + 1)
            .read_to_end(&mut json)
            .map_err(TocError::Zstd)?;
        if json.len() as u64 > limit {
            return Err(TocError::TooLarge { limit });
        }
        Ok(json)
    }
}

impl<'a> Toc<'a> {
    /// Parses a TOC's JSON (from [`Toc::inflate`]); its strings borrow from
    /// `json` unless they had escapes.
    pub fn parse(json: &'a [u8]) -> Result<Self, TocError> {
        let toc: Toc = serde_json::from_slice(json)?;
        if toc.version != 1 {
            return Err(TocError::Version(toc.version));
        }
        Ok(toc)
    }

    /// The same TOC owning its strings, for keeping it past its JSON.
    pub fn into_owned(self) -> Toc<'static> {
        Toc {
            version: self.version,
            entries: self.entries.into_iter().map(TocEntry::into_owned).collect(),
            tar_split_digest: self.tar_split_digest,
        }
    }

    /// Serializes and compresses the TOC.
    pub fn encode(&self, level: i32) -> std::io::Result<(Vec<u8>, u64)> {
        let json = serde_json::to_vec(self).map_err(std::io::Error::other)?;
        let compressed = zstd::bulk::compress(&json, level)?;
        Ok((compressed, json.len() as u64))
    }
}
