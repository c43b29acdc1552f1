//! The node daemon: containerd's Snapshots API (proxy plugin over gRPC) with lazy
//! layers mounted through the puller.
//!
//! Not built yet: see issue 4 (snapshotter daemon).
