//! The containerd gRPC types and the Snapshots server trait, generated from
//! `proto/` by the build script.

#![allow(clippy::all, missing_docs)]

pub mod containerd {
    pub mod types {
        tonic::include_proto!("containerd.types");
    }
    pub mod services {
        pub mod snapshots {
            pub mod v1 {
                tonic::include_proto!("containerd.services.snapshots.v1");
            }
        }
    }
}

pub use containerd::services::snapshots::v1 as snapshots;
pub use containerd::types::Mount;
