//! The node daemon: containerd's Snapshots API (a proxy plugin over gRPC)
//! with the semantics of the overlayfs snapshotter, where layers that exist
//! in a lazy form in the registry are mounted through the puller instead of
//! being pulled and unpacked.
//!
//! - [`service`]: the gRPC API and the remote path (Prepare → lazy mount →
//!   commit under the target → `AlreadyExists`);
//! - [`snapshots`]: overlay semantics, directories and mounts;
//! - [`metadata`]: the crash-safe record of every snapshot (redb);
//! - [`remote`]: from Prepare labels to a FUSE mount of the layer;
//! - [`filters`]: containerd's filter language for `List`;
//! - [`daemon`], [`config`], [`metrics`]: running it;
//! - [`cri_proxy`]: kubelet's image service through sluice, for its pull secrets;
//! - [`install`]: plugging it into containerd's config (and taking it out).

pub mod api;
pub mod config;
pub mod cri_proxy;
pub mod daemon;
pub mod error;
pub mod filters;
pub mod install;
pub mod metadata;
pub mod metrics;
pub mod remote;
pub mod service;
pub mod snapshots;

pub use config::Config;
pub use daemon::Daemon;
pub use error::SnapshotError;
