//! Builds the eBPF programs (`puller-ebpf/`) for the bpf target with
//! aya-build, on the stable toolchain (`RUSTC_BOOTSTRAP=1` for
//! `-Z build-std=core`, which needs the `rust-src` component) and bpf-linker.
//!
//! Without the `ebpf` feature (xtask's build, which must work before `cargo
//! xtask setup` has installed bpf-linker), or with `AYA_BUILD_SKIP=1`, the
//! programs are not built: the loader then finds an empty
//! object, says so at run time, and the daemon records accesses from FUSE.

use std::path::{Path, PathBuf};

const OBJECT: &str = "sluice-puller-ebpf";

fn on_path(tool: &str) -> bool {
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
        .unwrap_or(false)
        || std::env::var_os("HOME")
            .map(|h| Path::new(&h).join(".cargo/bin").join(tool).is_file())
            .unwrap_or(false)
}

fn main() {
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("OUT_DIR"));
    let skip =
        std::env::var("AYA_BUILD_SKIP").is_ok_and(|v| v == "1" || v.eq_ignore_ascii_case("true"));
    println!("cargo::rerun-if-env-changed=AYA_BUILD_SKIP");
    if std::env::var_os("CARGO_FEATURE_EBPF").is_none() {
        std::fs::write(out.join(OBJECT), b"").expect("writing the empty eBPF object");
        return;
    }
    if skip {
        std::fs::write(out.join(OBJECT), b"").expect("writing the empty eBPF object");
        println!("cargo::warning=AYA_BUILD_SKIP is set: building without eBPF programs");
        return;
    }
    if !on_path("bpf-linker") {
        panic!(
            "bpf-linker is not installed, so the eBPF programs cannot be built.\n\
             Run `cargo xtask setup` (it runs `cargo install bpf-linker@0.10.4 --locked` and \
             `rustup component add rust-src`), or build without eBPF with AYA_BUILD_SKIP=1."
        );
    }
    // The stable toolchain builds core for the bpf target with this.
    std::env::set_var("RUSTC_BOOTSTRAP", "1");
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../puller-ebpf");
    let root = root.to_str().expect("a UTF-8 source path");
    let package = aya_build::Package {
        name: OBJECT,
        root_dir: root,
        ..Default::default()
    };
    if let Err(e) = aya_build::build_ebpf([package], aya_build::Toolchain::Custom("stable")) {
        panic!(
            "building the eBPF programs failed: {e:#}\n\
             (needs `rustup component add rust-src` and bpf-linker 0.10.4: `cargo xtask setup`)"
        );
    }
}
