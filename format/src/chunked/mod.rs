//! The lazy layer format: containers/storage **zstd:chunked**, byte-compatible.
//!
//! A layer blob is a sequence of zstd frames that decompress, concatenated, to
//! the ordinary tar stream, so any client can pull it as a plain `tar+zstd`
//! layer. Each regular file's payload starts a new frame, and large payloads
//! are cut into content-defined chunks of their own frames. At the end, in
//! zstd *skippable* frames (ignored by decompressors):
//!
//! ```text
//! [frames of tar headers | file chunks ...][TOC (zstd JSON)][tar-split (zstd JSON lines)][footer]
//! ```
//!
//! - the TOC ([`toc`]) lists every tar entry with its metadata, and for regular
//!   files the SHA-256 and compressed location of the content and of each chunk;
//! - tar-split ([`tarsplit`]) records the non-payload bytes of the tar stream so
//!   that clients such as podman can rebuild the exact tar;
//! - the footer ([`footer`]) locates both, as do the layer's OCI annotations.
//!
//! [`writer`] converts any tar stream into this format; [`index`] validates a
//! TOC into a [`index::LayerIndex`], the read-side model the node mounts from.

pub mod footer;
pub mod index;
pub mod tar_stream;
pub mod tarsplit;
pub mod toc;
pub mod writer;

pub use footer::{Footer, MetadataLocation};
pub use index::{ChunkRef, IndexError, LayerIndex, Node, NodeKind};
pub use toc::{Toc, TocEntry, TocError};
pub use writer::{convert_tar, ChunkingOptions, ConvertedLayer, WriteError, DEFAULT_TOC_LEVEL};

/// Annotation with the TOC's compressed location: `offset:length:uncompressed:1`.
pub const MANIFEST_POSITION: &str = "io.github.containers.zstd-chunked.manifest-position";
/// Annotation with the digest of the compressed TOC.
pub const MANIFEST_CHECKSUM: &str = "io.github.containers.zstd-chunked.manifest-checksum";
/// Annotation with tar-split's location: `offset:length:uncompressed`.
pub const TARSPLIT_POSITION: &str = "io.github.containers.zstd-chunked.tarsplit-position";
/// Older tools (skopeo 1.9, containers/image < 5.24) wrote the same keys under
/// this prefix instead of `io.github.containers.`.
pub const LEGACY_PREFIX: &str = "io.containers.";
const PREFIX: &str = "io.github.containers.";

/// Looks up a zstd:chunked annotation under its current or its legacy name.
pub fn annotation<'a>(
    annotations: &'a std::collections::BTreeMap<String, String>,
    key: &str,
) -> Option<&'a str> {
    annotations
        .get(key)
        .or_else(|| {
            let legacy = format!("{LEGACY_PREFIX}{}", key.strip_prefix(PREFIX)?);
            annotations.get(&legacy)
        })
        .map(String::as_str)
}

/// True if a layer descriptor announces a zstd:chunked TOC.
pub fn is_chunked_layer(annotations: &std::collections::BTreeMap<String, String>) -> bool {
    annotation(annotations, MANIFEST_POSITION).is_some()
}
