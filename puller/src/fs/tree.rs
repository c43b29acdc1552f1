//! The layer's tree as the filesystem shows it, built once per mount from
//! the index: each directory's entries sorted by the name they are listed
//! under, link counts, and OCI whiteouts in overlayfs's form (`.wh.NAME` is
//! listed as `NAME`, `.wh..wh..opq` hides itself and marks its directory
//! opaque).
//!
//! It is on the pull's path (a layer is mounted before the container can
//! start), so it takes each node's parent from the index instead of looking
//! paths up: `cargo xtask bench index` times it for the bench images' layers.

use std::ffi::OsStr;

use sluice_format::chunked::{LayerIndex, NodeKind};

pub(super) const WHITEOUT_PREFIX: &str = ".wh.";
pub(super) const OPAQUE_MARKER: &str = ".wh..wh..opq";

/// The slot of a node that is not a directory.
const NOT_A_DIR: u32 = u32::MAX;

/// One directory's listing.
pub struct Dir {
    /// Nodes sorted by the name they are listed under; names are not
    /// copied (a layer can have a million entries).
    pub entries: Vec<u32>,
    /// How many entries are directories (for `nlink`).
    pub subdirs: u32,
    pub opaque: bool,
}

/// The name under which a node is listed in its directory: the last path
/// component, without the `.wh.` prefix of a whiteout.
pub(crate) fn shown_name(path: &str) -> &OsStr {
    let name = path.rsplit_once('/').map_or(path, |(_, n)| n);
    OsStr::new(match name.strip_prefix(WHITEOUT_PREFIX) {
        Some(target) if !target.is_empty() => target,
        _ => name,
    })
}

/// Directories, link counts and whiteouts of one layer.
pub struct Tree {
    root: usize,
    /// Per node: its listing's place in `dirs`, or [`NOT_A_DIR`].
    dir_slots: Vec<u32>,
    dirs: Vec<Dir>,
    /// Names per content node (hard links).
    links: Vec<u32>,
    whiteouts: Vec<bool>,
    /// Whether any entry has an extended attribute (an opaque directory
    /// counts: it is shown as one).
    has_xattrs: bool,
    /// Bytes of all regular files (for `statfs`).
    total_bytes: u64,
}

impl Tree {
    pub fn build(index: &LayerIndex) -> Tree {
        let nodes = index.nodes();
        let root = index.lookup("").expect("the index always has a root");
        let mut dir_slots = vec![NOT_A_DIR; nodes.len()];
        let mut dirs = Vec::new();
        for (i, n) in nodes.iter().enumerate() {
            if n.kind == NodeKind::Dir {
                dir_slots[i] = dirs.len() as u32;
                dirs.push(Dir {
                    entries: Vec::new(),
                    subdirs: 0,
                    opaque: false,
                });
            }
        }
        let mut links = vec![0u32; nodes.len()];
        let mut whiteouts = vec![false; nodes.len()];
        for (i, n) in nodes.iter().enumerate() {
            if i == root {
                continue;
            }
            links[index.resolve(i)] += 1;
            let slot = dir_slots[index.parent(i)];
            let dir = &mut dirs[slot as usize]; // parents are directories (validated)
            let name = n.path.rsplit_once('/').map_or(n.path.as_str(), |(_, n)| n);
            if name == OPAQUE_MARKER {
                dir.opaque = true;
                continue;
            }
            // A whiteout is listed under the name it hides.
            if shown_name(name).len() != name.len() {
                whiteouts[i] = true;
            } else if matches!(index.node(index.resolve(i)).kind, NodeKind::Dir) {
                dir.subdirs += 1;
            }
            dir.entries.push(i as u32);
        }
        for d in &mut dirs {
            d.entries
                .sort_unstable_by_key(|&n| shown_name(&nodes[n as usize].path));
            d.entries.shrink_to_fit();
        }
        let has_xattrs =
            nodes.iter().any(|n| !n.xattrs.is_empty()) || dirs.iter().any(|d| d.opaque);
        Tree {
            root,
            dir_slots,
            dirs,
            links,
            whiteouts,
            has_xattrs,
            total_bytes: index.file_bytes(),
        }
    }

    /// The layer root's node.
    pub fn root(&self) -> usize {
        self.root
    }

    /// How many nodes the layer has (inodes).
    pub fn len(&self) -> usize {
        self.dir_slots.len()
    }

    pub fn is_empty(&self) -> bool {
        self.dir_slots.is_empty()
    }

    /// The listing of directory node `node` (a content node: hard links
    /// resolved); `None` for anything else.
    pub fn dir(&self, node: usize) -> Option<&Dir> {
        match self.dir_slots.get(node) {
            Some(&slot) if slot != NOT_A_DIR => Some(&self.dirs[slot as usize]),
            _ => None,
        }
    }

    /// Names of content node `node`.
    pub fn links(&self, node: usize) -> u32 {
        self.links[node]
    }

    pub fn is_whiteout(&self, node: usize) -> bool {
        self.whiteouts[node]
    }

    pub fn has_xattrs(&self) -> bool {
        self.has_xattrs
    }

    pub fn total_bytes(&self) -> u64 {
        self.total_bytes
    }
}
