//! Round trip of a real distribution tree (Debian 12 minbase + python3, built
//! by `cargo xtask fixtures`) archived by GNU tar: conversion reproduces the tar
//! byte for byte, and the index alone describes every file exactly as it is on
//! disk: type, mode, owner, times, links, devices, xattrs, content.

use std::collections::HashMap;
use std::fs;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use sluice_format::chunked::toc::{Toc, MAX_TOC_BYTES};
use sluice_format::chunked::{convert_tar, ChunkingOptions, LayerIndex, NodeKind};
use sluice_format::Digest;

fn fixture() -> PathBuf {
    let base = std::env::var_os("SLUICE_FIXTURES")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/fixtures"));
    let rootfs = base.join("python3/rootfs");
    assert!(
        base.join("python3/.complete").exists(),
        "fixture {} is missing: run `cargo xtask fixtures` (`cargo xtask test` does)",
        rootfs.display()
    );
    rootfs
}

fn walk(root: &Path, rel: &Path, out: &mut Vec<PathBuf>) {
    for e in fs::read_dir(root.join(rel)).unwrap() {
        let e = e.unwrap();
        let r = rel.join(e.file_name());
        out.push(r.clone());
        if e.file_type().unwrap().is_dir() {
            walk(root, &r, out);
        }
    }
}

#[test]
fn debian_python3_tree_round_trips_exactly() {
    let rootfs = fixture();
    let out = Command::new("tar")
        .args(["--xattrs", "--numeric-owner", "-C"])
        .arg(&rootfs)
        .args(["-cf", "-", "."])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "GNU tar failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let tar = out.stdout;

    let mut blob = Vec::new();
    let converted = convert_tar(&tar[..], &mut blob, &ChunkingOptions::default()).unwrap();
    assert_eq!(converted.diff_id, Digest::sha256(&tar));
    assert_eq!(
        zstd::decode_all(&blob[..]).unwrap(),
        tar,
        "decompressed layer differs from the tar"
    );

    let loc = converted.footer.toc;
    let json = Toc::inflate(
        &blob[loc.offset as usize..loc.end() as usize],
        converted.footer.toc_digest.as_ref(),
        MAX_TOC_BYTES,
    )
    .unwrap();
    let toc = Toc::parse(&json).unwrap();
    let index = LayerIndex::from_toc(&toc, loc.offset - 8).unwrap();

    let mut paths = Vec::new();
    walk(&rootfs, Path::new(""), &mut paths);
    assert!(
        paths.len() > 3000,
        "fixture looks too small: {} paths",
        paths.len()
    );
    let mut inode_nodes: HashMap<(u64, u64), usize> = HashMap::new();
    let (mut files, mut bytes) = (0u64, 0u64);
    for rel in &paths {
        let name = rel.to_str().unwrap();
        let i = index
            .lookup(name)
            .unwrap_or_else(|| panic!("{name} missing from the index"));
        let meta = fs::symlink_metadata(rootfs.join(rel)).unwrap();
        let resolved = index.resolve(i);
        let node = index.node(resolved);
        let link = index.node(i);
        assert_eq!(link.mode, meta.mode() & 0o7777, "{name}: mode");
        assert_eq!(
            (link.uid, link.gid),
            (meta.uid(), meta.gid()),
            "{name}: owner"
        );
        assert_eq!(link.mtime.0, meta.mtime(), "{name}: mtime");
        let ft = meta.file_type();
        if meta.nlink() > 1 && !ft.is_dir() {
            // Every name of one inode resolves to one node.
            let first = *inode_nodes
                .entry((meta.dev(), meta.ino()))
                .or_insert(resolved);
            assert_eq!(first, resolved, "{name}: hard link resolves elsewhere");
        }
        match &node.kind {
            NodeKind::File { size, .. } => {
                assert!(ft.is_file(), "{name}: not a file on disk");
                assert_eq!(*size, meta.len(), "{name}: size");
                let want = fs::read(rootfs.join(rel)).unwrap();
                let mut got = Vec::with_capacity(want.len());
                for c in index.file_chunks_of(i) {
                    let mut buf = vec![0u8; c.size as usize];
                    let compressed =
                        &blob[c.blob_offset as usize..(c.blob_offset + c.blob_len) as usize];
                    LayerIndex::decompress_chunk(name, c, compressed, &mut buf).unwrap();
                    got.extend_from_slice(&buf);
                }
                assert!(got == want, "{name}: content differs");
                files += 1;
                bytes += *size;
            }
            NodeKind::Dir => assert!(ft.is_dir(), "{name}"),
            NodeKind::Symlink(target) => {
                assert_eq!(
                    Path::new(target),
                    fs::read_link(rootfs.join(rel)).unwrap(),
                    "{name}"
                )
            }
            NodeKind::CharDevice { major, minor } | NodeKind::BlockDevice { major, minor } => {
                assert!(ft.is_char_device() || ft.is_block_device(), "{name}");
                let rdev = meta.rdev();
                let want_major = ((rdev >> 32) & 0xffff_f000) | ((rdev >> 8) & 0xfff);
                let want_minor = ((rdev >> 12) & 0xffff_ff00) | (rdev & 0xff);
                assert_eq!(
                    (u64::from(*major), u64::from(*minor)),
                    (want_major, want_minor),
                    "{name}"
                );
            }
            NodeKind::Fifo => assert!(ft.is_fifo(), "{name}"),
            NodeKind::Hardlink { .. } => unreachable!("resolved"),
        }
    }
    assert!(
        files > 1000 && bytes > 100 << 20,
        "{files} files, {bytes} bytes"
    );
}
