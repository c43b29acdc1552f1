//! sluice's node data plane.
//!
//! Where a byte travels, in order:
//! - [`registry`]: fetched from a registry (Range GETs over a pooled client,
//!   token auth, retries, mirrors);
//! - [`layer`]: chosen by a layer's index, deduplicated and coalesced, then
//!   decompressed and verified;
//! - [`cache`]: stored by chunk digest, memory-mapped, bounded, crash-safe;
//! - [`fs`]: served to the kernel through FUSE;
//! - [`native`]: once a layer is wholly cached, written as an EROFS image
//!   that the kernel mounts itself.
//!
//! [`prefetch`] fetches ahead of readers by priority; [`python`] and [`elf`]
//! say what a starting program will read next (see `fs`); [`metrics`]
//! renders all of it for Prometheus.

pub mod cache;
pub mod elf;
pub mod fs;
pub mod image;
pub mod layer;
pub mod metrics;
pub mod native;
mod oldest_first;
pub mod prefetch;
pub mod profile;
pub mod pull;
pub mod python;
pub mod registry;
pub mod trace;

pub use cache::ChunkCache;
pub use layer::{FetchedToc, LayerError, LayerOptions, RemoteLayer};
pub use registry::{error_chain, ImageRef, RegistryClient};
