//! sluice's bundled OCI registry (distribution-spec v1.1).
//!
//! - [`api`]: HTTP endpoints; [`server`]: connections and shutdown.
//! - [`storage`]: the backend trait and the filesystem backend.
//! - [`gc`]: offline-safe garbage collection of unreferenced blobs.
//! - [`convert`]: convert-on-push of plain layers into lazy zstd:chunked twins.
//! - [`auth`], [`metrics`], [`config`], [`name`], [`error`]: the rest.

pub mod api;
pub mod auth;
pub mod body;
pub mod config;
pub mod convert;
pub mod error;
pub mod gc;
pub mod metrics;
pub mod name;
pub mod server;
pub mod storage;

pub use api::Registry;
pub use config::Config;
