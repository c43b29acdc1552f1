//! zstd:chunked conversion and reading: exact round trips, cross-checks with the
//! reference reader (containers/zstd-chunked-rs), and hostile inputs.

use std::fs;
use std::io::Read;
use std::os::unix::fs::symlink;
use std::path::Path;

use sluice_format::chunked::toc::{self, Toc, TocEntry, MAX_TOC_BYTES};
use sluice_format::chunked::{
    convert_tar, ChunkingOptions, Footer, IndexError, LayerIndex, NodeKind,
};
use sluice_format::Digest;

fn pseudo_random(len: usize, mut seed: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(len + 8);
    seed |= 1;
    while out.len() < len {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        out.extend_from_slice(&seed.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// A tree with every kind of entry a layer can hold.
fn tree(dir: &Path) {
    fs::create_dir_all(dir.join("usr/bin")).unwrap();
    fs::create_dir_all(dir.join("etc/empty.d")).unwrap();
    fs::write(dir.join("usr/bin/big"), pseudo_random(3 << 20, 1)).unwrap();
    let mut text = Vec::new();
    for i in 0..20_000 {
        text.extend_from_slice(format!("line {i} of a compressible file\n").as_bytes());
    }
    fs::write(dir.join("etc/text.conf"), &text).unwrap();
    fs::write(dir.join("etc/small"), b"small file\n").unwrap();
    fs::write(dir.join("etc/empty"), b"").unwrap();
    fs::write(dir.join("usr/bin/zeros"), vec![0u8; 200_000]).unwrap();
    fs::hard_link(dir.join("etc/small"), dir.join("etc/small-hardlink")).unwrap();
    symlink("../etc/small", dir.join("usr/relative-link")).unwrap();
    symlink("/etc/small", dir.join("usr/absolute-link")).unwrap();
    if sluice_format_test_is_root() {
        let status = std::process::Command::new("mknod")
            .arg(dir.join("etc/null"))
            .args(["c", "1", "3"])
            .status()
            .unwrap();
        assert!(status.success());
        let status = std::process::Command::new("mkfifo")
            .arg(dir.join("etc/fifo"))
            .status()
            .unwrap();
        assert!(status.success());
    }
}

fn sluice_format_test_is_root() -> bool {
    use std::os::unix::fs::MetadataExt;
    fs::metadata("/proc/self")
        .map(|m| m.uid() == 0)
        .unwrap_or(false)
}

/// The tree as a tar, plus a PAX xattr entry and a long name.
fn tar_of(dir: &Path) -> Vec<u8> {
    let mut tar = Vec::new();
    sluice_format::layout::write_tar(dir, &mut tar).unwrap();
    // Strip the two zero blocks and append entries the tree cannot express.
    tar.truncate(tar.len() - 1024);
    let mut b = tar::Builder::new(tar);
    b.append_pax_extensions([
        ("SCHILY.xattr.user.sluice", &b"xattr value"[..]),
        (
            "SCHILY.xattr.security.capability",
            &[1u8, 0, 0, 2, 0, 0x20, 0, 0][..],
        ),
    ])
    .unwrap();
    let data = b"file with xattrs\n";
    let mut h = tar::Header::new_ustar();
    h.set_size(data.len() as u64);
    h.set_mode(0o4755);
    h.set_uid(1000);
    h.set_gid(1001);
    h.set_mtime(1_700_000_000);
    b.append_data(&mut h, "usr/bin/with-xattrs", &data[..])
        .unwrap();
    let long = format!("usr/{}/file", "d".repeat(150));
    let mut h = tar::Header::new_gnu();
    h.set_size(5);
    h.set_mode(0o644);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(1_700_000_000);
    b.append_data(&mut h, &long, &b"long\n"[..]).unwrap();
    b.into_inner().unwrap()
}

fn opts() -> ChunkingOptions {
    ChunkingOptions::with_average(16 * 1024, 3)
}

struct Layer {
    blob: Vec<u8>,
    footer: Footer,
    toc: Toc<'static>,
    index: LayerIndex,
}

fn convert(tar: &[u8]) -> Layer {
    let mut blob = Vec::new();
    let converted = convert_tar(tar, &mut blob, &opts()).unwrap();
    assert_eq!(converted.digest, Digest::sha256(&blob));
    assert_eq!(converted.size, blob.len() as u64);
    assert_eq!(converted.diff_id, Digest::sha256(tar));
    // Footer and annotations agree.
    let mut from_footer = Footer::from_suffix(&blob).unwrap();
    from_footer.toc_digest = converted.footer.toc_digest.clone();
    assert_eq!(from_footer, converted.footer);
    let from_annotations = Footer::from_annotations(&converted.annotations())
        .unwrap()
        .unwrap();
    assert_eq!(from_annotations, converted.footer);
    let loc = converted.footer.toc;
    let json = Toc::inflate(
        &blob[loc.offset as usize..loc.end() as usize],
        converted.footer.toc_digest.as_ref(),
        MAX_TOC_BYTES,
    )
    .unwrap();
    let toc = Toc::parse(&json).unwrap().into_owned();
    let index = LayerIndex::from_toc(&toc, loc.offset - 8).unwrap();
    // Hard links carry no content in the tar and count once in the index.
    assert_eq!(index.file_bytes(), converted.content_bytes);
    Layer {
        blob,
        footer: converted.footer,
        toc,
        index,
    }
}

fn read_file(layer: &Layer, path: &str) -> Vec<u8> {
    let i = layer
        .index
        .lookup(path)
        .unwrap_or_else(|| panic!("{path} not in index"));
    let mut out = Vec::new();
    for c in layer.index.file_chunks_of(i) {
        let mut buf = vec![0u8; c.size as usize];
        let compressed = &layer.blob[c.blob_offset as usize..(c.blob_offset + c.blob_len) as usize];
        LayerIndex::decompress_chunk(path, c, compressed, &mut buf).unwrap();
        out.extend_from_slice(&buf);
    }
    out
}

#[test]
fn conversion_is_exact_deterministic_and_indexable() {
    let dir = tempfile::tempdir().unwrap();
    tree(dir.path());
    let tar = tar_of(dir.path());
    let layer = convert(&tar);

    // Plain zstd decompression gives the input tar byte for byte.
    assert_eq!(zstd::decode_all(&layer.blob[..]).unwrap(), tar);

    // Deterministic.
    let mut again = Vec::new();
    convert_tar(&tar[..], &mut again, &opts()).unwrap();
    assert_eq!(again, layer.blob);

    // Every regular file reads back from its chunks alone.
    let mut archive = tar::Archive::new(&tar[..]);
    let mut files = 0;
    for entry in archive.entries().unwrap() {
        let mut entry = entry.unwrap();
        let path = entry
            .path()
            .unwrap()
            .to_string_lossy()
            .trim_end_matches('/')
            .to_owned();
        let i = layer
            .index
            .lookup(&path)
            .unwrap_or_else(|| panic!("{path} missing"));
        let node = layer.index.node(i);
        let header = entry.header().clone();
        assert_eq!(node.mode, header.mode().unwrap() & 0o7777, "{path}");
        assert_eq!(u64::from(node.uid), header.uid().unwrap(), "{path}");
        assert_eq!(node.mtime.0 as u64, header.mtime().unwrap(), "{path}");
        match header.entry_type() {
            tar::EntryType::Regular => {
                let mut want = Vec::new();
                entry.read_to_end(&mut want).unwrap();
                assert_eq!(read_file(&layer, &path), want, "{path}");
                files += 1;
            }
            tar::EntryType::Link => {
                let target = header
                    .link_name()
                    .unwrap()
                    .unwrap()
                    .to_string_lossy()
                    .into_owned();
                assert_eq!(layer.index.resolve(i), layer.index.lookup(&target).unwrap());
            }
            tar::EntryType::Symlink => {
                let target = header
                    .link_name()
                    .unwrap()
                    .unwrap()
                    .to_string_lossy()
                    .into_owned();
                assert_eq!(node.kind, NodeKind::Symlink(target));
            }
            tar::EntryType::Char => {
                assert_eq!(node.kind, NodeKind::CharDevice { major: 1, minor: 3 });
            }
            _ => {}
        }
    }
    assert!(files >= 7, "only {files} files checked");
    let x = layer
        .index
        .node(layer.index.lookup("usr/bin/with-xattrs").unwrap());
    assert_eq!(x.xattrs["user.sluice"], b"xattr value");
    assert_eq!(
        x.xattrs["security.capability"],
        [1u8, 0, 0, 2, 0, 0x20, 0, 0]
    );
    assert_eq!((x.mode, x.uid, x.gid), (0o4755, 1000, 1001));
    let big = layer.index.lookup("usr/bin/big").unwrap();
    assert!(
        layer.index.file_chunks_of(big).len() > 20,
        "3 MiB at 16 KiB average is many chunks"
    );

    // Reads map to the chunks that hold them.
    let chunks = layer.index.file_chunks_of(big);
    let mid = chunks[5].file_offset + 1;
    let hit = layer
        .index
        .chunks_for_range(big, mid, chunks[6].file_offset + 2 - mid);
    assert_eq!(hit, &chunks[5..7]);
    assert_eq!(layer.index.chunks_for_range(big, 0, 1), &chunks[..1]);
    assert!(layer.index.chunks_for_range(big, 3 << 20, 10).is_empty());
}

#[test]
fn the_toc_level_changes_only_the_toc_bytes() {
    let dir = tempfile::tempdir().unwrap();
    tree(dir.path());
    let tar = tar_of(dir.path());
    let toc_of = |toc_level| {
        let mut blob = Vec::new();
        let opts = ChunkingOptions {
            toc_level,
            ..opts()
        };
        let c = convert_tar(&tar[..], &mut blob, &opts).unwrap();
        let loc = c.footer.toc;
        let compressed = blob[loc.offset as usize..loc.end() as usize].to_vec();
        let json = Toc::inflate(&compressed, c.footer.toc_digest.as_ref(), MAX_TOC_BYTES).unwrap();
        // The files' frames lie before the TOC, the same at any level.
        // (and the 8-byte header of the TOC's skippable frame, its length).
        (blob[..loc.offset as usize - 8].to_vec(), compressed, json)
    };
    let (files_1, toc_1, json_1) = toc_of(1);
    let (files_19, toc_19, json_19) = toc_of(19);
    assert_eq!(files_1, files_19);
    assert_eq!(json_1, json_19);
    assert_ne!(toc_1, toc_19);
}

#[test]
fn reference_reader_rebuilds_the_exact_tar() {
    let dir = tempfile::tempdir().unwrap();
    tree(dir.path());
    let tar = tar_of(dir.path());
    let layer = convert(&tar);
    let refs = zstd_chunked::MetadataReferences::from_footer(&layer.blob)
        .expect("reference reader finds the footer");
    let slice = |r: &std::ops::Range<u64>| &layer.blob[r.start as usize..r.end as usize];
    let stream = zstd_chunked::Stream::new_from_frames(
        slice(&refs.manifest.range),
        slice(&refs.tarsplit.range),
    )
    .unwrap();
    let mut rebuilt = Vec::new();
    stream
        .write_to(&mut rebuilt, |r| Ok(zstd::decode_all(slice(&r.range))?))
        .unwrap();
    assert_eq!(rebuilt, tar);
    assert_eq!(layer.footer.toc.offset, refs.manifest.range.start);
}

/// A TOC with one entry changed, re-validated.
fn mutate(layer: &Layer, f: impl FnOnce(&mut Vec<TocEntry>)) -> Result<LayerIndex, IndexError> {
    let mut toc = layer.toc.clone();
    f(&mut toc.entries);
    LayerIndex::from_toc(&toc, layer.footer.toc.offset - 8)
}

fn find(entries: &[TocEntry], name: &str) -> usize {
    entries.iter().position(|e| e.name == name).unwrap()
}

#[test]
fn lying_tocs_are_rejected() {
    let dir = tempfile::tempdir().unwrap();
    tree(dir.path());
    let layer = convert(&tar_of(dir.path()));
    let err = |r: Result<LayerIndex, IndexError>| r.expect_err("accepted a lying TOC").to_string();

    let e = err(mutate(&layer, |es| {
        let i = find(es, "etc/small");
        es[i].name = "../../etc/shadow".into();
    }));
    assert!(e.contains(".."), "{e}");
    let e = err(mutate(&layer, |es| {
        let dup = es[find(es, "etc/small")].clone();
        es.push(dup);
    }));
    assert!(e.contains("twice"), "{e}");
    let e = err(mutate(&layer, |es| {
        let i = find(es, "etc/small-hardlink");
        es[i].link_name = "../outside".into();
    }));
    assert!(e.contains("hard link"), "{e}");
    let e = err(mutate(&layer, |es| {
        let i = find(es, "etc/small-hardlink");
        es[i].link_name = "etc/nonexistent".into();
    }));
    assert!(e.contains("not an earlier entry"), "{e}");
    let e = err(mutate(&layer, |es| {
        let i = find(es, "etc/small");
        es[i].end_offset = layer.footer.toc.offset as i64 + 1000;
    }));
    assert!(e.contains("out of range"), "{e}");
    let e = err(mutate(&layer, |es| {
        let small = find(es, "etc/small");
        let other = find(es, "etc/text.conf");
        es[small].offset = es[other].offset;
        es[small].end_offset = es[other].end_offset;
    }));
    assert!(e.contains("claim"), "{e}");
    let e = err(mutate(&layer, |es| {
        let i = es.iter().position(|e| e.kind == toc::TYPE_CHUNK).unwrap();
        es[i].chunk_offset += 1;
    }));
    assert!(e.contains("previous chunks end"), "{e}");
    let e = err(mutate(&layer, |es| {
        let i = find(es, "etc/small");
        es[i].size = i64::MAX;
    }));
    assert!(e.contains("out of range"), "{e}");
    let e = err(mutate(&layer, |es| {
        let i = find(es, "etc/small");
        es[i].digest = "sha256:nothex".into();
    }));
    assert!(e.contains("digest"), "{e}");
    let e = err(mutate(&layer, |es| {
        let i = find(es, "etc/small");
        es[i].kind = "socket".into();
    }));
    assert!(e.contains("unknown entry type"), "{e}");
    let e = err(mutate(&layer, |es| {
        es.push(TocEntry {
            kind: toc::TYPE_REG.into(),
            name: "etc/small/inside-a-file".into(),
            ..TocEntry::default()
        })
    }));
    assert!(e.contains("not a directory"), "{e}");
    // The same two levels up, through a directory no entry names.
    let e = err(mutate(&layer, |es| {
        es.push(TocEntry {
            kind: toc::TYPE_REG.into(),
            name: "etc/small/unnamed/deeper".into(),
            ..TocEntry::default()
        })
    }));
    assert!(e.contains("\"etc/small\" is not a directory"), "{e}");
    let e = err(mutate(&layer, |es| {
        es.insert(
            0,
            TocEntry {
                kind: toc::TYPE_CHUNK.into(),
                name: "x".into(),
                ..TocEntry::default()
            },
        )
    }));
    assert!(e.contains("chunk entry"), "{e}");
    // Absolute symlinks are data, resolved inside the container: accepted.
    assert!(mutate(&layer, |_| {}).is_ok());
    // Names in other spellings of the same path are read as that path.
    let index = mutate(&layer, |es| {
        let i = find(es, "etc/text.conf");
        es[i].name = "./etc//text.conf".into();
        es.push(TocEntry {
            kind: toc::TYPE_DIR.into(),
            name: "/new/implicit/parent/".into(),
            ..TocEntry::default()
        })
    })
    .unwrap();
    assert!(index.lookup("etc/text.conf").is_some());
    for path in ["new/implicit/parent", "new/implicit", "new"] {
        let node = index.lookup(path).unwrap_or_else(|| panic!("{path}"));
        assert_eq!(index.node(node).kind, NodeKind::Dir, "{path}")
    }
    assert_parents_match_paths(&index);
}

/// Every node's recorded parent is the directory its path names (the root
/// is its own parent).
fn assert_parents_match_paths(index: &LayerIndex) {
    let root = index.lookup("").expect("a root");
    assert_eq!(index.parent(root), root);
    for (i, n) in index.nodes().iter().enumerate() {
        if i == root {
            continue;
        }
        let dir = n.path.rsplit_once('/').map_or("", |(d, _)| d);
        assert_eq!(
            index.node(index.parent(i)).path,
            dir,
            "parent of {:?}",
            n.path
        );
        assert_eq!(index.node(index.parent(i)).kind, NodeKind::Dir);
    }
}

#[test]
fn parents_are_recorded_for_named_and_implicit_directories() {
    // No root entry, directories named after their files, implicit chains
    // shared by several files, and names in other spellings.
    let entry = |kind: &'static str, name: &'static str| TocEntry {
        kind: kind.into(),
        name: name.into(),
        ..TocEntry::default()
    };
    let toc = Toc {
        version: 1,
        entries: vec![
            entry(toc::TYPE_SYMLINK, "a/b/c/link"),
            entry(toc::TYPE_DIR, "a/b"),
            entry(toc::TYPE_FIFO, "a/b/c/fifo"),
            entry(toc::TYPE_FIFO, "./a/x/y/z/fifo"),
            entry(toc::TYPE_FIFO, "a/x/y/other"),
            entry(toc::TYPE_DIR, "top"),
            entry(toc::TYPE_FIFO, "top/fifo"),
            entry(toc::TYPE_FIFO, "/alone"),
            entry(toc::TYPE_FIFO, "deep/only/child"),
        ],
        tar_split_digest: None,
    };
    let mut toc = toc;
    toc.entries[0].link_name = "target".into();
    let index = LayerIndex::from_toc(&toc, 0).unwrap();
    assert_parents_match_paths(&index);
    for implicit in [
        "",
        "a",
        "a/b/c",
        "a/x",
        "a/x/y",
        "a/x/y/z",
        "deep",
        "deep/only",
    ] {
        let i = index
            .lookup(implicit)
            .unwrap_or_else(|| panic!("{implicit:?}"));
        assert!(index.node(i).implicit, "{implicit:?}");
    }
    assert!(!index.node(index.lookup("a/b").unwrap()).implicit);
}

#[test]
fn corrupt_chunks_and_tocs_are_detected() {
    let dir = tempfile::tempdir().unwrap();
    tree(dir.path());
    let layer = convert(&tar_of(dir.path()));
    let i = layer.index.lookup("usr/bin/big").unwrap();
    let c = &layer.index.file_chunks_of(i)[3];
    let mut compressed =
        layer.blob[c.blob_offset as usize..(c.blob_offset + c.blob_len) as usize].to_vec();
    let mut out = vec![0u8; c.size as usize];
    // Bytes of another chunk: valid zstd, wrong digest.
    let other = &layer.index.file_chunks_of(i)[4];
    let wrong =
        &layer.blob[other.blob_offset as usize..(other.blob_offset + other.blob_len) as usize];
    let mut out_other = vec![0u8; other.size as usize];
    let e = LayerIndex::decompress_chunk("big", c, wrong, &mut out_other).unwrap_err();
    assert!(
        matches!(
            e,
            IndexError::ChunkDigest { .. } | IndexError::ChunkSize { .. }
        ),
        "{e}"
    );
    // Flipped byte: zstd error or wrong digest, never success.
    let mid = compressed.len() / 2;
    compressed[mid] ^= 0x55;
    assert!(LayerIndex::decompress_chunk("big", c, &compressed, &mut out).is_err());
    // Truncated.
    let good = &layer.blob[c.blob_offset as usize..(c.blob_offset + c.blob_len) as usize];
    assert!(LayerIndex::decompress_chunk("big", c, &good[..good.len() - 3], &mut out).is_err());
    assert!(LayerIndex::decompress_chunk("big", c, good, &mut out).is_ok());

    // TOC: wrong digest, and a decompression bomb.
    let loc = layer.footer.toc;
    let toc_bytes = &layer.blob[loc.offset as usize..loc.end() as usize];
    let e = Toc::inflate(toc_bytes, Some(&Digest::sha256(b"other")), MAX_TOC_BYTES).unwrap_err();
    assert!(e.to_string().contains("annotation says"), "{e}");
    let bomb = zstd::encode_all(&vec![b' '; 10 << 20][..], 19).unwrap();
    let e = Toc::inflate(&bomb, None, 1 << 20).unwrap_err();
    assert!(e.to_string().contains("more than"), "{e}");
    assert!(Toc::inflate(b"not zstd", None, MAX_TOC_BYTES).is_err());
}

#[test]
fn tocs_inflate_in_one_frame_or_several_within_the_limit() {
    let json = br#"{"version":1,"entries":[{"type":"dir","name":"a"}]}"#;
    let one = zstd::bulk::compress(json, 3).unwrap();
    assert_eq!(Toc::inflate(&one, None, 1 << 20).unwrap(), json);
    // The first frame says its size, but more frames follow.
    let (head, tail) = json.split_at(20);
    let mut two = zstd::bulk::compress(head, 3).unwrap();
    two.extend(zstd::bulk::compress(tail, 3).unwrap());
    assert_eq!(Toc::inflate(&two, None, 1 << 20).unwrap(), json);
    let e = Toc::inflate(&two, None, 30).unwrap_err();
    assert!(e.to_string().contains("more than 30"), "{e}");
    // A frame that says it is larger than the limit.
    let e = Toc::inflate(&one, None, 10).unwrap_err();
    assert!(e.to_string().contains("more than 10"), "{e}");
    let toc = Toc::parse(&json[..]).unwrap();
    assert_eq!(toc.entries[0].name, "a");
    // Names with escapes are read (owned), not refused.
    let escaped = br#"{"version":1,"entries":[{"type":"dir","name":"a\u0062","modtime":"2024-01-02T03:04:05\u005a"}]}"#;
    let toc = Toc::parse(&escaped[..]).unwrap();
    assert_eq!(toc.entries[0].name, "ab");
    assert_eq!(
        toc.entries[0].mod_time.as_deref(),
        Some("2024-01-02T03:04:05Z")
    );
    assert!(matches!(toc.entries[0].name, std::borrow::Cow::Owned(_)));
    assert!(Toc::parse(br#"{"version":2,"entries":[]}"#).is_err());
}

#[test]
fn hostile_tars_are_rejected_with_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    tree(dir.path());
    let tar = tar_of(dir.path());
    let run = |input: &[u8]| {
        convert_tar(input, std::io::sink(), &opts())
            .map(|_| ())
            .unwrap_err()
            .to_string()
    };

    // Truncated in the middle of a file's data.
    let e = run(&tar[..tar.len() / 2]);
    assert!(e.contains("ends"), "{e}");
    // A header whose checksum does not match.
    let mut bad = tar.clone();
    bad[0] ^= 1;
    let e = run(&bad);
    assert!(e.contains("checksum"), "{e}");
    // A PAX record claiming a giant size.
    let mut b = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_ustar();
    h.set_entry_type(tar::EntryType::XHeader);
    h.set_size(1 << 40);
    h.set_cksum();
    b.append(&h, std::io::empty()).ok();
    let e = run(&b.into_inner().unwrap());
    assert!(e.contains("extension record"), "{e}");
    // A directory that carries data.
    let mut b = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_ustar();
    h.set_entry_type(tar::EntryType::Directory);
    h.set_size(3);
    b.append_data(&mut h, "dir/", &b"abc"[..]).unwrap();
    let e = run(&b.into_inner().unwrap());
    assert!(e.contains("only regular files"), "{e}");
}

#[test]
fn empty_tar_and_tar_without_end_marker() {
    let empty = vec![0u8; 1024];
    let layer = convert(&empty);
    assert_eq!(zstd::decode_all(&layer.blob[..]).unwrap(), empty);
    // Only the root is there.
    assert_eq!(layer.index.nodes().len(), 1);

    let mut b = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_ustar();
    h.set_size(2);
    b.append_data(&mut h, "f", &b"hi"[..]).unwrap();
    let mut tar = b.into_inner().unwrap();
    tar.truncate(tar.len() - 1024);
    let layer = convert(&tar);
    assert_eq!(zstd::decode_all(&layer.blob[..]).unwrap(), tar);
}
