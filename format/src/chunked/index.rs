//! The validated read-side model of a layer: every path with its metadata, and
//! for regular files the ordered chunks that hold their bytes.
//!
//! A TOC comes from the network and may lie. [`LayerIndex::from_toc`] accepts
//! it only if it is internally consistent: normalized relative names without
//! `..`, no duplicate paths, hard links to earlier entries of the same layer,
//! chunks that tile each file exactly and lie inside the blob's data section
//! without overlapping each other. Symlink targets are kept verbatim, absolute
//! ones included: sluice never resolves them on the host; the kernel resolves
//! them inside the container's root, exactly as for an unpacked layer.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};

use base64::Engine as _;

use super::toc::{self, Toc, TocEntry};
use crate::Digest;

/// Maps keyed by the TOC's paths: tens of thousands of lookups while a layer
/// is mounted, where SipHash was a tenth of the time. foldhash is seeded per
/// process, so a TOC cannot be written to collide on every node.
type FastMap<K, V> = HashMap<K, V, foldhash::fast::RandomState>;

/// Largest file size accepted (16 TiB); anything larger is a lie.
pub const MAX_FILE_SIZE: u64 = 1 << 44;
const MAX_LINK_TARGET: usize = 4096;
const MAX_XATTR_VALUE: usize = 64 * 1024;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IndexError {
    #[error("TOC entry {name:?}: {reason}")]
    Entry { name: String, reason: String },
    #[error("TOC entries {first:?} and {second:?} both claim bytes {start}..{end} of the blob")]
    Overlap {
        first: String,
        second: String,
        start: u64,
        end: u64,
    },
    #[error("chunk of {name:?} decompresses to {actual} bytes, expected {expected}")]
    ChunkSize {
        name: String,
        expected: u64,
        actual: u64,
    },
    #[error("chunk of {name:?} at file offset {offset} has digest {actual}, expected {expected}")]
    ChunkDigest {
        name: String,
        offset: u64,
        expected: Digest,
        actual: Digest,
    },
    #[error("chunk of {name:?} at file offset {offset} is not valid zstd: {reason}")]
    ChunkZstd {
        name: String,
        offset: u64,
        reason: String,
    },
}

fn entry_err(name: &str, reason: impl Into<String>) -> IndexError {
    IndexError::Entry {
        name: name.to_owned(),
        reason: reason.into(),
    }
}

/// One chunk of a regular file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChunkRef {
    /// Offset of the chunk in the file.
    pub file_offset: u64,
    /// Uncompressed length.
    pub size: u64,
    /// Where its zstd frame(s) lie in the blob.
    pub blob_offset: u64,
    pub blob_len: u64,
    /// SHA-256 of the uncompressed chunk: the cache key.
    pub digest: Digest,
    /// A hole: all zeros.
    pub zeros: bool,
}

/// What a path is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NodeKind {
    File {
        size: u64,
        /// Digest of the whole content; `None` for empty files.
        digest: Option<Digest>,
        /// Indexes into [`LayerIndex::chunks`].
        chunks: std::ops::Range<usize>,
    },
    Dir,
    Symlink(String),
    /// A hard link: shares the node (inode) of `target`.
    Hardlink {
        target: usize,
    },
    CharDevice {
        major: u32,
        minor: u32,
    },
    BlockDevice {
        major: u32,
        minor: u32,
    },
    Fifo,
}

/// One path of the layer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Node {
    /// Normalized path relative to the layer root, without leading or trailing
    /// `/`; the root itself is `""`.
    pub path: String,
    pub kind: NodeKind,
    /// Permission bits (incl. setuid/setgid/sticky).
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    /// Modification time: seconds and nanoseconds since the epoch.
    pub mtime: (i64, u32),
    pub xattrs: BTreeMap<String, Vec<u8>>,
    /// Directories that no entry names, created because something lives in them.
    pub implicit: bool,
}

/// A validated layer.
#[derive(Debug, Clone)]
pub struct LayerIndex {
    nodes: Vec<Node>,
    /// Node numbers sorted by path, for [`LayerIndex::lookup`]: a hash map
    /// would hold every path a second time.
    by_path: Vec<u32>,
    /// Each node's directory (the root's is the root).
    parents: Vec<u32>,
    chunks: Vec<ChunkRef>,
}

/// Normalizes a tar name: strips `./` and leading `/`, drops `.` and empty
/// components; refuses `..` and NUL. A name already in that form (the
/// converter writes them so) is returned as it is, without a copy.
pub fn normalize(name: &str) -> Result<Cow<'_, str>, String> {
    if name.contains('\0') {
        return Err("name contains NUL".into());
    }
    let mut clean = true;
    for c in name.split('/') {
        match c {
            ".." => return Err("name contains a '..' component".into()),
            "" | "." => clean = false,
            _ => {}
        }
    }
    if clean {
        return Ok(Cow::Borrowed(name));
    }
    let parts: Vec<&str> = name
        .split('/')
        .filter(|c| !c.is_empty() && *c != ".")
        .collect();
    Ok(Cow::Owned(parts.join("/")))
}

fn parse_time(name: &str, s: &Option<Cow<str>>) -> Result<(i64, u32), IndexError> {
    let Some(s) = s else { return Ok((0, 0)) };
    let t = time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339)
        .map_err(|e| entry_err(name, format!("modtime {s:?} is not RFC 3339: {e}")))?;
    Ok((t.unix_timestamp(), t.nanosecond()))
}

fn in_range(name: &str, what: &str, v: i64, max: u64) -> Result<u64, IndexError> {
    if v < 0 || v as u64 > max {
        return Err(entry_err(name, format!("{what} {v} is out of range")));
    }
    Ok(v as u64)
}

fn parse_digest(name: &str, what: &str, s: &str) -> Result<Digest, IndexError> {
    s.parse()
        .map_err(|e| entry_err(name, format!("{what} {s:?}: {e}")))
}

impl LayerIndex {
    /// Validates a TOC. `data_end` is where the blob's data frames end (the
    /// offset of the first metadata skippable frame); every chunk must lie
    /// before it.
    pub fn from_toc(toc: &Toc, data_end: u64) -> Result<Self, IndexError> {
        let entries = &toc.entries;
        // Room for everything at once: growing the tables (and rehashing
        // the map) copied and hashed them over and over. A `chunk` entry is
        // a chunk, any other entry a node and at most one chunk.
        let further_chunks = entries.iter().filter(|e| e.kind == toc::TYPE_CHUNK).count();
        let named = entries.len() - further_chunks;
        let mut index = LayerIndex {
            nodes: Vec::with_capacity(named),
            by_path: Vec::new(),
            parents: Vec::new(),
            chunks: Vec::with_capacity(entries.len()),
        };
        // Path -> node while building; replaced by the sorted `by_path` at the end.
        // Keyed by the TOC's own names where they are already normal (no copy).
        let mut paths: FastMap<Cow<'_, str>, usize> =
            FastMap::with_capacity_and_hasher(named, Default::default());
        // (blob start, blob end, path) of every chunk, to find overlaps.
        let mut spans: Vec<(u64, u64, usize)> = Vec::with_capacity(entries.len());
        let mut i = 0;
        while i < entries.len() {
            let e = &entries[i];
            i += 1;
            let path = normalize(&e.name).map_err(|r| entry_err(&e.name, r))?;
            if e.kind == toc::TYPE_CHUNK {
                return Err(entry_err(
                    &e.name,
                    "chunk entry without its regular file before it",
                ));
            }
            if paths.contains_key(&*path) {
                return Err(entry_err(&e.name, "path appears twice in the layer"));
            }
            if path.is_empty() && e.kind != toc::TYPE_DIR {
                return Err(entry_err(&e.name, "only a directory can be the layer root"));
            }
            let mode = in_range(&e.name, "mode", e.mode, u64::from(u32::MAX))? as u32 & 0o7777;
            let uid = in_range(&e.name, "uid", e.uid, u64::from(u32::MAX))? as u32;
            let gid = in_range(&e.name, "gid", e.gid, u64::from(u32::MAX))? as u32;
            let mtime = parse_time(&e.name, &e.mod_time)?;
            let mut xattrs = BTreeMap::new();
            for (k, v) in &e.xattrs {
                let value = base64::engine::general_purpose::STANDARD
                    .decode(v)
                    .map_err(|err| {
                        entry_err(&e.name, format!("xattr {k}: value is not base64: {err}"))
                    })?;
                if k.is_empty() || k.len() > 255 || value.len() > MAX_XATTR_VALUE {
                    return Err(entry_err(
                        &e.name,
                        format!("xattr {k:?} is too large or unnamed"),
                    ));
                }
                xattrs.insert(k.clone(), value);
            }
            let dev =
                |v: i64, what| in_range(&e.name, what, v, u64::from(u32::MAX)).map(|v| v as u32);
            let kind = match &*e.kind {
                toc::TYPE_DIR => NodeKind::Dir,
                toc::TYPE_FIFO => NodeKind::Fifo,
                toc::TYPE_CHAR => NodeKind::CharDevice {
                    major: dev(e.dev_major, "devMajor")?,
                    minor: dev(e.dev_minor, "devMinor")?,
                },
                toc::TYPE_BLOCK => NodeKind::BlockDevice {
                    major: dev(e.dev_major, "devMajor")?,
                    minor: dev(e.dev_minor, "devMinor")?,
                },
                toc::TYPE_SYMLINK => {
                    if e.link_name.is_empty()
                        || e.link_name.len() > MAX_LINK_TARGET
                        || e.link_name.contains('\0')
                    {
                        return Err(entry_err(
                            &e.name,
                            "symlink target is empty, too long or contains NUL",
                        ));
                    }
                    NodeKind::Symlink(e.link_name.clone().into_owned())
                }
                toc::TYPE_HARDLINK => {
                    let target = normalize(&e.link_name)
                        .map_err(|r| entry_err(&e.name, format!("hard link target: {r}")))?;
                    let Some(&t) = paths.get(target.as_ref()) else {
                        return Err(entry_err(
                            &e.name,
                            format!(
                                "hard link to {:?}, which is not an earlier entry of this layer",
                                e.link_name
                            ),
                        ));
                    };
                    let t = match index.nodes[t].kind {
                        NodeKind::Hardlink { target } => target,
                        NodeKind::Dir => {
                            return Err(entry_err(&e.name, "hard link to a directory"))
                        }
                        _ => t,
                    };
                    NodeKind::Hardlink { target: t }
                }
                toc::TYPE_REG => {
                    let size = in_range(&e.name, "size", e.size, MAX_FILE_SIZE)?;
                    // The file's chunk entries follow it directly.
                    let mut chunk_entries = vec![e];
                    while i < entries.len() && entries[i].kind == toc::TYPE_CHUNK {
                        if normalize(&entries[i].name).as_deref() != Ok(&*path) {
                            return Err(entry_err(
                                &entries[i].name,
                                format!("chunk entry follows {:?}, a different file", e.name),
                            ));
                        }
                        chunk_entries.push(&entries[i]);
                        i += 1;
                    }
                    let start = index.chunks.len();
                    let digest = if size == 0 {
                        if chunk_entries.len() > 1 {
                            return Err(entry_err(&e.name, "empty file with chunks"));
                        }
                        None
                    } else {
                        let d = parse_digest(&e.name, "digest", &e.digest)?;
                        index.file_chunks(&e.name, size, &d, &chunk_entries, data_end)?;
                        Some(d)
                    };
                    let node_index = index.nodes.len();
                    for c in &index.chunks[start..] {
                        spans.push((c.blob_offset, c.blob_offset + c.blob_len, node_index));
                    }
                    NodeKind::File {
                        size,
                        digest,
                        chunks: start..index.chunks.len(),
                    }
                }
                other => return Err(entry_err(&e.name, format!("unknown entry type {other:?}"))),
            };
            paths.insert(path.clone(), index.nodes.len());
            index.nodes.push(Node {
                path: path.into_owned(),
                kind,
                mode,
                uid,
                gid,
                mtime,
                xattrs,
                implicit: false,
            });
        }

        spans.sort_unstable();
        for w in spans.windows(2) {
            let ((_, e0, n0), (s1, e1, n1)) = (w[0], w[1]);
            if s1 < e0 {
                return Err(IndexError::Overlap {
                    first: index.nodes[n0].path.clone(),
                    second: index.nodes[n1].path.clone(),
                    start: s1,
                    end: e0.min(e1),
                });
            }
        }
        index.add_implicit_dirs(&paths)?;
        drop(paths);
        if index.nodes.len() > u32::MAX as usize {
            return Err(entry_err("", "more than 2^32 entries in one layer"));
        }
        let nodes = &index.nodes;
        let mut by_path: Vec<u32> = (0..nodes.len() as u32).collect();
        by_path.sort_unstable_by(|&a, &b| nodes[a as usize].path.cmp(&nodes[b as usize].path));
        index.by_path = by_path;
        Ok(index)
    }

    /// Builds the chunk list of one regular file from its entries.
    fn file_chunks(
        &mut self,
        name: &str,
        size: u64,
        digest: &Digest,
        entries: &[&TocEntry<'_>],
        data_end: u64,
    ) -> Result<(), IndexError> {
        let main = entries[0];
        let end = in_range(name, "endOffset", main.end_offset, data_end)?;
        if entries.len() == 1 && main.chunk_size == 0 {
            let offset = in_range(name, "offset", main.offset, data_end)?;
            if offset >= end {
                return Err(entry_err(
                    name,
                    format!("offset {offset} is not before endOffset {end}"),
                ));
            }
            self.chunks.push(ChunkRef {
                file_offset: 0,
                size,
                blob_offset: offset,
                blob_len: end - offset,
                digest: digest.clone(),
                zeros: false,
            });
            return Ok(());
        }
        let mut file_offset = 0u64;
        let mut previous_blob: Option<u64> = None;
        for (k, c) in entries.iter().enumerate() {
            let chunk_size = in_range(name, "chunkSize", c.chunk_size, MAX_FILE_SIZE)?;
            let chunk_offset = in_range(name, "chunkOffset", c.chunk_offset, MAX_FILE_SIZE)?;
            let blob_offset = in_range(name, "offset", c.offset, data_end)?;
            if chunk_size == 0 || chunk_offset != file_offset {
                return Err(entry_err(
                    name,
                    format!("chunk {k} covers {chunk_offset}+{chunk_size}, but the previous chunks end at {file_offset}"),
                ));
            }
            if previous_blob.is_some_and(|p| blob_offset <= p) {
                return Err(entry_err(
                    name,
                    format!("chunk {k} does not follow the previous one in the blob"),
                ));
            }
            if let (Some(prev), Some(last)) = (previous_blob, self.chunks.last_mut()) {
                last.blob_len = blob_offset - prev;
            }
            self.chunks.push(ChunkRef {
                file_offset,
                size: chunk_size,
                blob_offset,
                blob_len: 0,
                digest: parse_digest(name, "chunkDigest", &c.chunk_digest)?,
                zeros: c.chunk_type == toc::CHUNK_TYPE_ZEROS,
            });
            previous_blob = Some(blob_offset);
            file_offset += chunk_size;
        }
        let last_start = previous_blob.unwrap_or(0);
        if end <= last_start {
            return Err(entry_err(
                name,
                format!("endOffset {end} is not after the last chunk at {last_start}"),
            ));
        }
        if let Some(last) = self.chunks.last_mut() {
            last.blob_len = end - last_start;
        }
        if file_offset != size {
            return Err(entry_err(
                name,
                format!("chunks cover {file_offset} bytes of a {size}-byte file"),
            ));
        }
        Ok(())
    }

    /// Adds the root and any parent directory that no entry names, and
    /// records every node's parent; refuses entries whose parent is not a
    /// directory.
    fn add_implicit_dirs(&mut self, paths: &FastMap<Cow<str>, usize>) -> Result<(), IndexError> {
        let named = self.nodes.len();
        // Directories no entry names: they become nodes `named..` in this
        // order, each with its parent (`u32::MAX` until found).
        let mut missing: Vec<(String, u32)> = Vec::new();
        let root = match paths.get("") {
            Some(&r) => r,
            None => {
                missing.push((String::new(), named as u32));
                named
            }
        };
        let mut parents = vec![root as u32; named];
        let mut added: FastMap<&str, usize> = FastMap::default();
        // Only each entry's own parent is looked up: an entry's grandparent
        // is checked as its parent's parent, whether the layer names that
        // parent or it is added here (a path is looked up once per child,
        // not once per descendant).
        for (i, node) in self.nodes.iter().enumerate() {
            // Whose parent is being found: a named node, or an added one.
            let mut child: Result<usize, usize> = Ok(i);
            let mut p = node.path.as_str();
            loop {
                let Some((parent, _)) = p.rsplit_once('/') else {
                    // A top-level name: in the root (as named nodes are
                    // from the start).
                    if let Err(m) = child {
                        missing[m].1 = root as u32;
                    }
                    break;
                };
                let found = match paths.get(parent) {
                    Some(&j) if self.nodes[j].kind != NodeKind::Dir => {
                        return Err(entry_err(
                            &node.path,
                            format!("parent {parent:?} is not a directory"),
                        ));
                    }
                    Some(&j) => Some(j),
                    None => added.get(parent).copied(),
                };
                let j = found.unwrap_or(named + missing.len());
                match child {
                    Ok(n) => parents[n] = j as u32,
                    Err(m) => missing[m].1 = j as u32,
                }
                if found.is_some() {
                    break;
                }
                added.insert(parent, j);
                missing.push((parent.to_owned(), u32::MAX));
                child = Err(missing.len() - 1);
                p = parent;
            }
        }
        drop(added);
        for (path, parent) in missing {
            parents.push(parent);
            self.nodes.push(Node {
                path,
                kind: NodeKind::Dir,
                mode: 0o755,
                uid: 0,
                gid: 0,
                mtime: (0, 0),
                xattrs: BTreeMap::new(),
                implicit: true,
            });
        }
        self.parents = parents;
        Ok(())
    }

    pub fn nodes(&self) -> &[Node] {
        &self.nodes
    }

    pub fn lookup(&self, path: &str) -> Option<usize> {
        self.by_path
            .binary_search_by(|&i| self.nodes[i as usize].path.as_str().cmp(path))
            .ok()
            .map(|k| self.by_path[k] as usize)
    }

    /// Bytes of all regular files (a hard link's are its target's, counted
    /// once): the layer's size unpacked.
    pub fn file_bytes(&self) -> u64 {
        self.nodes
            .iter()
            .map(|n| match n.kind {
                NodeKind::File { size, .. } => size,
                _ => 0,
            })
            .sum()
    }

    /// The directory node `i` is in; the root is its own parent.
    pub fn parent(&self, i: usize) -> usize {
        self.parents[i] as usize
    }

    pub fn node(&self, i: usize) -> &Node {
        &self.nodes[i]
    }

    /// Follows a hard link to the node that holds the content.
    pub fn resolve(&self, i: usize) -> usize {
        match self.nodes[i].kind {
            NodeKind::Hardlink { target } => target,
            _ => i,
        }
    }

    /// All chunks of the layer, in blob order per file.
    pub fn chunks(&self) -> &[ChunkRef] {
        &self.chunks
    }

    /// The chunks of a file (after hard-link resolution).
    pub fn file_chunks_of(&self, i: usize) -> &[ChunkRef] {
        match &self.nodes[self.resolve(i)].kind {
            NodeKind::File { chunks, .. } => &self.chunks[chunks.clone()],
            _ => &[],
        }
    }

    /// The chunks that hold bytes `offset..offset+len` of a file: the compressed
    /// ranges to fetch to serve that read.
    pub fn chunks_for_range(&self, i: usize, offset: u64, len: u64) -> &[ChunkRef] {
        let chunks = self.file_chunks_of(i);
        if len == 0 {
            return &[];
        }
        let end = offset.saturating_add(len);
        let first = chunks.partition_point(|c| c.file_offset + c.size <= offset);
        let last = chunks.partition_point(|c| c.file_offset < end);
        &chunks[first..last.max(first)]
    }

    /// Decompresses one chunk's frames into `out` (exactly `chunk.size` bytes)
    /// and verifies its digest. On error `out` holds garbage and must not be used.
    pub fn decompress_chunk(
        name: &str,
        chunk: &ChunkRef,
        compressed: &[u8],
        out: &mut [u8],
    ) -> Result<(), IndexError> {
        let zstd_err = |reason: String| IndexError::ChunkZstd {
            name: name.to_owned(),
            offset: chunk.file_offset,
            reason,
        };
        if out.len() as u64 != chunk.size {
            return Err(IndexError::ChunkSize {
                name: name.to_owned(),
                expected: chunk.size,
                actual: out.len() as u64,
            });
        }
        let mut decoder = zstd::stream::read::Decoder::with_buffer(compressed)
            .map_err(|e| zstd_err(e.to_string()))?;
        let mut filled = 0usize;
        loop {
            use std::io::Read;
            if filled == out.len() {
                // Anything beyond the declared size is a lie.
                let mut probe = [0u8; 1];
                match decoder.read(&mut probe) {
                    Ok(0) => break,
                    Ok(_) => {
                        return Err(IndexError::ChunkSize {
                            name: name.to_owned(),
                            expected: chunk.size,
                            actual: chunk.size + 1,
                        })
                    }
                    Err(e) => return Err(zstd_err(e.to_string())),
                }
            }
            match decoder.read(&mut out[filled..]) {
                Ok(0) => {
                    return Err(IndexError::ChunkSize {
                        name: name.to_owned(),
                        expected: chunk.size,
                        actual: filled as u64,
                    })
                }
                Ok(n) => filled += n,
                Err(e) => return Err(zstd_err(e.to_string())),
            }
        }
        let actual = Digest::of(chunk.digest.algorithm(), out);
        if actual != chunk.digest {
            return Err(IndexError::ChunkDigest {
                name: name.to_owned(),
                offset: chunk.file_offset,
                expected: chunk.digest.clone(),
                actual,
            });
        }
        Ok(())
    }
}
