//! Formats shared by the sluice registry and the node data plane.
//!
//! - [`digest`]: content digests (`sha256:…`, `sha512:…`), parsing and streaming hashing.
//! - [`oci`]: the OCI image types sluice reads (descriptors, manifests, indexes) and
//!   media-type constants for both OCI and Docker v2.
//! - [`layout`]: building images as OCI image layouts from a root filesystem tree,
//!   deterministically (used by fixtures, tests and the demo).
//! - [`chunked`]: the lazy layer format (zstd:chunked): TOC, footer, tar-split,
//!   conversion from any tar, and the validated index nodes mount from.
//! - [`convert`]: converting layers and whole images to zstd:chunked.

pub mod chunked;
pub mod convert;
pub mod digest;
pub mod fuzzing;
pub mod layout;
pub mod oci;

pub use digest::{Algorithm, Digest, DigestError, Hasher};
