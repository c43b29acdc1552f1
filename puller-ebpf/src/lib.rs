//! eBPF programs (aya-ebpf, tracepoints) that record which lazy-layer pages a
//! starting container touches.
//!
//! Not built yet: see issue 6. Until then this crate only reserves its place in
//! the workspace; it will become a `bpfel-unknown-none` crate built through
//! `aya-build` and `cargo xtask build-ebpf`.
#![no_std]
