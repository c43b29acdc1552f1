//! The node data plane: range fetches, a verified content-addressed chunk cache,
//! zstd decompression into the cache, FUSE serving of lazy layers, and prefetch.
//!
//! Not built yet: see issue 5 (puller data plane). The crate exists so that the
//! workspace layout matches the architecture in docs/architecture.md.
