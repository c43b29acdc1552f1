//! Kernel-facing tests that `cargo xtask vm-test` runs inside qemu guests on
//! several Linux kernels.
//!
//! Not built yet: see issue 8 (vm-tests).
