//! Writes a layer as an EROFS image: the kernel's own read-only filesystem,
//! uncompressed, so that a layer whose every chunk is cached can be mounted
//! without FUSE and read at the speed of a local
//! filesystem: no daemon round trip for a lookup, an open or a read.
//!
//! The image shows exactly what the layer's FUSE mount shows (`fs/tree.rs`:
//! whiteouts as 0/0 character devices, opaque directories with
//! `trusted.overlay.opaque`), so overlayfs stacks on either alike.
//!
//! Layout (format: the kernel's `fs/erofs/erofs_fs.h`, 4 KiB blocks):
//! the superblock at byte 1024 of block 0; then the metadata area, which
//! starts at block 0 (`meta_blkaddr`), holding every inode (64-byte extended
//! inodes: they carry a 32-bit owner and the mtime) in breadth-first order
//! from the root, each followed by its extended attributes and, where it fits
//! in the same block, the tail of its data (`FLAT_INLINE`); then the data
//! blocks, file after file in the same order. Small files thus lie beside
//! their inode, as they do in a tar.

use std::collections::VecDeque;
use std::fs::File;
use std::os::unix::fs::FileExt;

use sluice_format::chunked::{LayerIndex, NodeKind};

use crate::cache::ChunkCache;
use crate::fs::tree::{shown_name, Tree};

/// Version of what [`write_image`] writes for a layer. An image kept from
/// an earlier process is used only if it was written by this version (see
/// `native/mod.rs`): change it whenever the bytes written for the same layer
/// change, or a daemon would mount images of the old layout after an
/// upgrade. `an_image_has_the_bytes_of_its_format_version` (vm-tests) pins
/// it to a digest.
pub const FORMAT_VERSION: u32 = 1;

const BLOCK: u64 = 4096;
const BLOCK_BITS: u8 = 12;
const SUPERBLOCK_OFFSET: usize = 1024;
const SUPERBLOCK_SIZE: usize = 128;
const MAGIC: u32 = 0xE0F5_E1E2;
/// Inodes are addressed in 32-byte slots (`nid`).
const SLOT: u64 = 32;
const INODE_SIZE: u64 = 64;
const DIRENT_SIZE: usize = 12;
const XATTR_HEADER_SIZE: usize = 12;

/// `i_format` data layouts.
const FLAT_PLAIN: u16 = 0;
const FLAT_INLINE: u16 = 2;
/// `i_format` bit 0: an extended (64-byte) inode.
const EXTENDED: u16 = 1;

/// Directory entry file types (the kernel's `FT_*`).
const FT_REG: u8 = 1;
const FT_DIR: u8 = 2;
const FT_CHR: u8 = 3;
const FT_BLK: u8 = 4;
const FT_FIFO: u8 = 5;
const FT_LNK: u8 = 7;

const S_IFREG: u16 = 0o100000;
const S_IFDIR: u16 = 0o040000;
const S_IFLNK: u16 = 0o120000;
const S_IFCHR: u16 = 0o020000;
const S_IFBLK: u16 = 0o060000;
const S_IFIFO: u16 = 0o010000;

/// The attribute overlayfs reads to see an opaque directory.
const OPAQUE_XATTR: &str = "trusted.overlay.opaque";

#[derive(Debug, thiserror::Error)]
pub enum ErofsError {
    #[error("{path}: extended attribute {name:?} cannot be stored in EROFS ({why})")]
    Xattr {
        path: String,
        name: String,
        why: &'static str,
    },
    #[error("{path}: chunk {digest} is not in the cache (the layer is not complete)")]
    Missing { path: String, digest: String },
    #[error("the layer needs {0} blocks, more than an EROFS image addresses")]
    TooBig(u64),
    #[error("writing the image: {0}")]
    Io(#[from] std::io::Error),
}

/// What an image holds.
#[derive(Debug, Clone, Copy, Default)]
pub struct ImageStats {
    pub inodes: u64,
    pub bytes: u64,
}

/// The content of one inode.
enum Content {
    File { size: u64 },
    Dir,
    Symlink,
    Device { rdev: u32, block: bool },
    Fifo,
    Whiteout,
}

struct Inode {
    /// The index node it stands for (a directory entry's node for a whiteout,
    /// else the content node: hard links resolved).
    node: usize,
    content: Content,
    /// Extended attribute region (header and entries), empty if none.
    xattrs: Vec<u8>,
    /// Data size: file bytes, directory entries, link target.
    size: u64,
    /// Whether the data's last partial block sits after the inode.
    inline: bool,
    nid: u64,
    /// First data block (of the whole blocks).
    blkaddr: u64,
}

impl Inode {
    fn tail(&self) -> u64 {
        if self.inline {
            self.size % BLOCK
        } else {
            0
        }
    }

    fn whole_blocks(&self) -> u64 {
        if self.inline {
            self.size / BLOCK
        } else {
            self.size.div_ceil(BLOCK)
        }
    }

    /// Bytes in the metadata area: inode, attributes, inline tail.
    fn meta_len(&self) -> u64 {
        INODE_SIZE + self.xattrs.len() as u64 + self.tail()
    }
}

/// The name index and suffix EROFS stores an attribute name as.
fn xattr_prefix(name: &str) -> Option<(u8, &str)> {
    match name {
        "system.posix_acl_access" => Some((2, "")),
        "system.posix_acl_default" => Some((3, "")),
        _ => [("user.", 1), ("trusted.", 4), ("security.", 6)]
            .into_iter()
            .find_map(|(p, i)| name.strip_prefix(p).map(|s| (i, s))),
    }
}

fn xattr_region(path: &str, xattrs: &[(&str, &[u8])]) -> Result<Vec<u8>, ErofsError> {
    if xattrs.is_empty() {
        return Ok(Vec::new());
    }
    let bad = |name: &str, why| ErofsError::Xattr {
        path: path.to_owned(),
        name: name.to_owned(),
        why,
    };
    // Header: no name filter (the superblock does not enable it), no shared
    // attributes.
    let mut out = vec![0u8; XATTR_HEADER_SIZE];
    for (name, value) in xattrs {
        let (index, suffix) = xattr_prefix(name).ok_or_else(|| bad(name, "unknown namespace"))?;
        let name_len = u8::try_from(suffix.len()).map_err(|_| bad(name, "name too long"))?;
        let value_len = u16::try_from(value.len()).map_err(|_| bad(name, "value too long"))?;
        out.push(name_len);
        out.push(index);
        out.extend_from_slice(&value_len.to_le_bytes());
        out.extend_from_slice(suffix.as_bytes());
        out.extend_from_slice(value);
        out.resize(out.len().next_multiple_of(4), 0);
    }
    if (out.len() - XATTR_HEADER_SIZE) / 4 + 1 > usize::from(u16::MAX) {
        return Err(bad(xattrs[0].0, "too many for one inode"));
    }
    Ok(out)
}

/// `i_xattr_icount` of an attribute region.
fn xattr_icount(region: &[u8]) -> u16 {
    if region.is_empty() {
        0
    } else {
        ((region.len() - XATTR_HEADER_SIZE) / 4 + 1) as u16
    }
}

/// One directory's entries: name, inode slot, file type; sorted by name
/// bytes as the kernel's binary search expects (`.` and `..` included).
type Listing<'a> = Vec<(&'a [u8], usize, u8)>;

/// Splits a sorted listing into directory blocks: each block holds its
/// entries' 12-byte records, then their names. Returns the entry count of
/// each block and the directory's size.
fn dir_blocks(listing: &Listing) -> (Vec<usize>, u64) {
    let (mut blocks, mut in_block, mut used) = (Vec::new(), 0usize, 0usize);
    for (name, _, _) in listing {
        let need = DIRENT_SIZE + name.len();
        if in_block > 0 && used + need > BLOCK as usize {
            blocks.push(in_block);
            (in_block, used) = (0, 0);
        }
        in_block += 1;
        used += need;
    }
    blocks.push(in_block);
    let size = (blocks.len() as u64 - 1) * BLOCK + used as u64;
    (blocks, size)
}

/// The bytes of a directory, with its entries' nids.
fn dir_bytes(listing: &Listing, inodes: &[Inode]) -> Vec<u8> {
    let (blocks, size) = dir_blocks(listing);
    let mut out = vec![0u8; size as usize];
    let mut entries = listing.iter();
    for (b, count) in blocks.into_iter().enumerate() {
        let base = b * BLOCK as usize;
        let mut name_at = count * DIRENT_SIZE;
        for k in 0..count {
            let (name, slot, ft) = entries.next().expect("counted above");
            let rec = &mut out[base + k * DIRENT_SIZE..base + (k + 1) * DIRENT_SIZE];
            rec[0..8].copy_from_slice(&inodes[*slot].nid.to_le_bytes());
            rec[8..10].copy_from_slice(&(name_at as u16).to_le_bytes());
            rec[10] = *ft;
            out[base + name_at..base + name_at + name.len()].copy_from_slice(name);
            name_at += name.len();
        }
    }
    out
}

fn file_type(c: &Content) -> u8 {
    match c {
        Content::File { .. } => FT_REG,
        Content::Dir => FT_DIR,
        Content::Symlink => FT_LNK,
        Content::Device { block: true, .. } => FT_BLK,
        Content::Device { block: false, .. } | Content::Whiteout => FT_CHR,
        Content::Fifo => FT_FIFO,
    }
}

/// Writes layer `index`, whose every chunk is in `cache`, as an EROFS image
/// to `out` (an empty file).
pub fn write_image(
    index: &LayerIndex,
    tree: &Tree,
    cache: &ChunkCache,
    out: &File,
) -> Result<ImageStats, ErofsError> {
    const NONE: u32 = u32::MAX;
    let nodes = index.nodes();
    // Inode slots, breadth first from the root: a directory's entries get
    // neighbouring slots.
    let mut slot_of = vec![NONE; nodes.len()];
    let mut inodes: Vec<Inode> = Vec::new();
    let mut listings: Vec<(usize, Listing)> = Vec::new();
    let root = tree.root();
    let new_inode = |node: usize, whiteout: bool, inodes: &mut Vec<Inode>| {
        let n = &nodes[node];
        let (content, size) = if whiteout {
            (Content::Whiteout, 0)
        } else {
            match &n.kind {
                NodeKind::File { size, .. } => (Content::File { size: *size }, *size),
                NodeKind::Dir => (Content::Dir, 0),
                NodeKind::Symlink(t) => (Content::Symlink, t.len() as u64),
                NodeKind::CharDevice { major, minor } => (
                    Content::Device {
                        rdev: crate::fs::rdev(*major, *minor),
                        block: false,
                    },
                    0,
                ),
                NodeKind::BlockDevice { major, minor } => (
                    Content::Device {
                        rdev: crate::fs::rdev(*major, *minor),
                        block: true,
                    },
                    0,
                ),
                NodeKind::Fifo => (Content::Fifo, 0),
                NodeKind::Hardlink { .. } => unreachable!("resolved by the caller"),
            }
        };
        inodes.push(Inode {
            node,
            content,
            xattrs: Vec::new(),
            size,
            inline: false,
            nid: 0,
            blkaddr: 0,
        });
        inodes.len() - 1
    };
    slot_of[root] = new_inode(root, false, &mut inodes) as u32;
    let mut queue = VecDeque::from([root]);
    while let Some(dir) = queue.pop_front() {
        let listed = tree.dir(dir).expect("queued nodes are directories");
        let me = slot_of[dir] as usize;
        let parent = slot_of[index.parent(dir)] as usize;
        let mut listing: Listing = vec![(&b"."[..], me, FT_DIR), (&b".."[..], parent, FT_DIR)];
        for &e in &listed.entries {
            let e = e as usize;
            let whiteout = tree.is_whiteout(e);
            let key = if whiteout { e } else { index.resolve(e) };
            if slot_of[key] == NONE {
                slot_of[key] = new_inode(key, whiteout, &mut inodes) as u32;
                if !whiteout && nodes[key].kind == NodeKind::Dir {
                    queue.push_back(key);
                }
            }
            let slot = slot_of[key] as usize;
            let name = shown_name(&nodes[e].path).as_encoded_bytes();
            listing.push((name, slot, file_type(&inodes[slot].content)));
        }
        listing.sort_unstable_by(|a, b| a.0.cmp(b.0));
        inodes[me].size = dir_blocks(&listing).1;
        listings.push((me, listing));
    }

    // Attributes, then where each inode and its data go.
    for ino in &mut inodes {
        let n = &nodes[ino.node];
        if matches!(ino.content, Content::Whiteout) {
            continue;
        }
        let opaque = tree.dir(ino.node).is_some_and(|d| d.opaque);
        let mut xattrs: Vec<(&str, &[u8])> = n
            .xattrs
            .iter()
            .filter(|(k, _)| !(opaque && k.as_str() == OPAQUE_XATTR))
            .map(|(k, v)| (k.as_str(), v.as_slice()))
            .collect();
        if opaque {
            xattrs.push((OPAQUE_XATTR, b"y"));
        }
        ino.xattrs = xattr_region(&n.path, &xattrs)?;
    }
    // The superblock ends at byte 1152: the first inode slot after it.
    let mut at = (SUPERBLOCK_OFFSET + SUPERBLOCK_SIZE) as u64;
    for ino in &mut inodes {
        let tail = ino.size % BLOCK;
        let bare = INODE_SIZE + ino.xattrs.len() as u64;
        // Inline data must lie in the block of the inode's end: move to the
        // next block rather than waste most of a data block on a tail.
        ino.inline = tail != 0 && bare + tail <= BLOCK;
        let len = ino.meta_len();
        if len <= BLOCK && at % BLOCK + len > BLOCK {
            at = at.next_multiple_of(BLOCK);
        }
        ino.nid = at / SLOT;
        at = (at + len).next_multiple_of(SLOT);
    }
    let meta_len = at.next_multiple_of(BLOCK);
    let mut next_block = meta_len / BLOCK;
    for ino in &mut inodes {
        let n = ino.whole_blocks();
        if n > 0 {
            ino.blkaddr = next_block;
            next_block += n;
        }
    }
    let blocks = next_block;
    if blocks > u64::from(u32::MAX) {
        return Err(ErofsError::TooBig(blocks));
    }

    // The metadata area in memory (inodes, attributes, tails of data); the
    // data blocks straight to the file.
    let mut meta = vec![0u8; meta_len as usize];
    write_superblock(&mut meta, &inodes, blocks);
    for (slot, ino) in inodes.iter().enumerate() {
        write_inode(&mut meta, ino, slot, index, tree);
    }
    for (me, listing) in &listings {
        let bytes = dir_bytes(listing, &inodes);
        place(out, &mut meta, &inodes[*me], 0, &bytes)?;
    }
    let mut buf = Vec::new();
    let mut bytes = 0;
    for ino in &inodes {
        let n = &nodes[ino.node];
        match (&ino.content, &n.kind) {
            (Content::Symlink, NodeKind::Symlink(target)) => {
                place(out, &mut meta, ino, 0, target.as_bytes())?
            }
            (Content::File { size }, _) if *size > 0 => {
                for c in index.file_chunks_of(ino.node) {
                    if c.zeros {
                        continue; // the image is zeros where nothing is written
                    }
                    buf.clear();
                    if !cache.read_into(&c.digest, 0..c.size as usize, &mut buf) {
                        return Err(ErofsError::Missing {
                            path: n.path.clone(),
                            digest: c.digest.to_string(),
                        });
                    }
                    place(out, &mut meta, ino, c.file_offset, &buf)?;
                }
                bytes += size;
            }
            _ => {}
        }
    }
    out.write_all_at(&meta, 0)?;
    out.set_len(blocks * BLOCK)?;
    Ok(ImageStats {
        inodes: inodes.len() as u64,
        bytes,
    })
}

/// Writes `data` at `offset` of inode `ino`'s content: whole blocks to the
/// file, the inline tail into the metadata area.
fn place(
    out: &File,
    meta: &mut [u8],
    ino: &Inode,
    offset: u64,
    data: &[u8],
) -> std::io::Result<()> {
    let in_blocks = ino.whole_blocks() * BLOCK;
    let end = offset + data.len() as u64;
    if offset < in_blocks {
        let n = (end.min(in_blocks) - offset) as usize;
        out.write_all_at(&data[..n], ino.blkaddr * BLOCK + offset)?;
    }
    if end > in_blocks {
        let from = offset.max(in_blocks);
        let tail_at = (ino.nid * SLOT + INODE_SIZE + ino.xattrs.len() as u64) as usize;
        let at = tail_at + (from - in_blocks) as usize;
        let src = &data[(from - offset) as usize..];
        meta[at..at + src.len()].copy_from_slice(src);
    }
    Ok(())
}

fn write_superblock(meta: &mut [u8], inodes: &[Inode], blocks: u64) {
    let sb = &mut meta[SUPERBLOCK_OFFSET..SUPERBLOCK_OFFSET + SUPERBLOCK_SIZE];
    sb[0..4].copy_from_slice(&MAGIC.to_le_bytes());
    // checksum (4..8) and feature_compat (8..12) stay 0: no checksum.
    sb[12] = BLOCK_BITS;
    sb[14..16].copy_from_slice(&(inodes[0].nid as u16).to_le_bytes());
    sb[16..24].copy_from_slice(&(inodes.len() as u64).to_le_bytes());
    // build_time (24..36): 0; every inode has its own mtime.
    sb[36..40].copy_from_slice(&(blocks as u32).to_le_bytes());
    // meta_blkaddr (40..44) and xattr_blkaddr (44..48): 0.
    sb[64..70].copy_from_slice(b"sluice");
    // feature_incompat (80..84): 0, nothing the oldest reader lacks.
}

fn write_inode(meta: &mut [u8], ino: &Inode, slot: usize, index: &LayerIndex, tree: &Tree) {
    let n = index.node(ino.node);
    let at = (ino.nid * SLOT) as usize;
    let layout = if ino.inline { FLAT_INLINE } else { FLAT_PLAIN };
    let links = tree.links(ino.node).max(1);
    let (kind, nlink, u) = match &ino.content {
        Content::File { .. } => (S_IFREG, links, ino.blkaddr as u32),
        Content::Dir => (
            S_IFDIR,
            2 + tree.dir(ino.node).map_or(0, |d| d.subdirs),
            ino.blkaddr as u32,
        ),
        Content::Symlink => (S_IFLNK, links, ino.blkaddr as u32),
        Content::Device { rdev, block: true } => (S_IFBLK, links, *rdev),
        Content::Device { rdev, block: false } => (S_IFCHR, links, *rdev),
        Content::Fifo => (S_IFIFO, links, 0),
        // overlayfs's whiteout: a character device 0/0.
        Content::Whiteout => (S_IFCHR, 1, 0),
    };
    // A whiteout has no permissions or owner of its own.
    let whiteout = matches!(ino.content, Content::Whiteout);
    let (perm, uid, gid) = if whiteout {
        (0, 0, 0)
    } else {
        ((n.mode & 0o7777) as u16, n.uid, n.gid)
    };
    let mode = kind | perm;
    let i = &mut meta[at..at + INODE_SIZE as usize];
    i[0..2].copy_from_slice(&(EXTENDED | layout << 1).to_le_bytes());
    i[2..4].copy_from_slice(&xattr_icount(&ino.xattrs).to_le_bytes());
    i[4..6].copy_from_slice(&mode.to_le_bytes());
    i[8..16].copy_from_slice(&ino.size.to_le_bytes());
    i[16..20].copy_from_slice(&u.to_le_bytes());
    i[20..24].copy_from_slice(&(slot as u32 + 1).to_le_bytes());
    i[24..28].copy_from_slice(&uid.to_le_bytes());
    i[28..32].copy_from_slice(&gid.to_le_bytes());
    let (secs, nanos) = n.mtime;
    i[32..40].copy_from_slice(&(secs.max(0) as u64).to_le_bytes());
    i[40..44].copy_from_slice(&nanos.to_le_bytes());
    i[44..48].copy_from_slice(&nlink.to_le_bytes());
    let x = at + INODE_SIZE as usize;
    meta[x..x + ino.xattrs.len()].copy_from_slice(&ino.xattrs);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attribute_names_map_to_erofs_namespaces() {
        assert_eq!(xattr_prefix("user.sluice"), Some((1, "sluice")));
        assert_eq!(
            xattr_prefix("trusted.overlay.opaque"),
            Some((4, "overlay.opaque"))
        );
        assert_eq!(xattr_prefix("security.capability"), Some((6, "capability")));
        assert_eq!(xattr_prefix("system.posix_acl_access"), Some((2, "")));
        assert_eq!(xattr_prefix("system.nfs4_acl"), None);
        let region = xattr_region("f", &[("user.a", b"xyz")]).unwrap();
        // header, then 4 + 1 + 3 bytes padded to 8
        assert_eq!(region.len(), 12 + 8);
        assert_eq!(xattr_icount(&region), 3);
        assert!(xattr_region("f", &[("system.nfs4_acl", b"")]).is_err());
    }

    #[test]
    fn directory_blocks_never_split_an_entry() {
        let long = [b'x'; 200];
        let names: Vec<Vec<u8>> = (0..40u8)
            .map(|i| {
                let mut n = long.to_vec();
                n.push(i);
                n
            })
            .collect();
        let listing: Listing = names.iter().map(|n| (n.as_slice(), 0, FT_REG)).collect();
        let (blocks, size) = dir_blocks(&listing);
        // 213 bytes an entry: 19 fit in a block.
        assert_eq!(blocks, vec![19, 19, 2]);
        assert_eq!(size, 2 * BLOCK + 2 * 213);
        assert_eq!(blocks.iter().sum::<usize>(), 40);
    }
}
