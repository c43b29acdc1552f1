//! Kernel-facing tests: FUSE lazy mounts (passthrough where the kernel has
//! it), the eBPF access tracer (or its FUSE-side fallback), overlayfs stacked
//! on lazy layers, prefetch through real mounts.
//!
//! They live in `tests/` and run twice, the way aya tests its eBPF code:
//! natively on this machine by `cargo test`, and inside qemu guests booting
//! other kernels (Debian's 6.1 and 6.12) by `cargo xtask vm-test`, which
//! builds them statically, packs them with busybox and the kernel's modules
//! into an initramfs, and boots `guest/init` as the guest's first process.
//! Each test asserts what *that* kernel should do (see
//! `sluice_testkit::kernel`), never a skip.
