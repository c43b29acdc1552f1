//! Writing OCI image layouts (`oci-layout`, `index.json`, `blobs/`) from root
//! filesystem trees.
//!
//! This is how sluice builds its test and demo images without a Docker engine:
//! each layer is a directory, archived as a deterministic tar (entries sorted,
//! owners, modes and times taken from the tree, hard links preserved) and
//! compressed. The same inputs always give the same digests. `skopeo copy oci:…`
//! then pushes the layout to any registry.

use std::collections::HashMap;
use std::fs::{self, File};
use std::io::{self, Write};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use serde_json::json;

use crate::digest::{Digest, Hasher};
use crate::oci::{self, Descriptor};

/// How layer tars are compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    None,
    Gzip,
    Zstd,
}

impl Compression {
    fn media_type(self) -> &'static str {
        match self {
            Compression::None => oci::OCI_LAYER_TAR,
            Compression::Gzip => oci::OCI_LAYER_GZIP,
            Compression::Zstd => oci::OCI_LAYER_ZSTD,
        }
    }
}

/// What to put in an image.
#[derive(Debug, Clone)]
pub struct ImageSpec {
    /// One directory per layer, bottom first.
    pub layers: Vec<PathBuf>,
    pub compression: Compression,
    /// The container's command (`config.Cmd`).
    pub cmd: Vec<String>,
    pub env: Vec<String>,
    /// Tag recorded as `org.opencontainers.image.ref.name` in `index.json`.
    pub tag: String,
}

#[derive(Debug, thiserror::Error)]
pub enum LayoutError {
    #[error("I/O on {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("{0}: file type cannot be stored in a layer (sockets are not archivable)")]
    Unsupported(PathBuf),
    #[error("JSON encoding: {0}")]
    Json(#[from] serde_json::Error),
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> LayoutError + '_ {
    move |source| LayoutError::Io {
        path: path.to_owned(),
        source,
    }
}

/// A writer that hashes what passes through it and counts bytes.
struct HashWriter<W> {
    inner: W,
    hasher: Hasher,
    written: u64,
}

impl<W: Write> HashWriter<W> {
    fn new(inner: W) -> Self {
        HashWriter {
            inner,
            hasher: crate::Algorithm::Sha256.hasher(),
            written: 0,
        }
    }
}

impl<W: Write> Write for HashWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.written += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// An OCI image layout directory being written.
pub struct Layout {
    root: PathBuf,
}

impl Layout {
    /// Creates (or reuses) a layout directory.
    pub fn create(root: impl Into<PathBuf>) -> Result<Self, LayoutError> {
        let root = root.into();
        let blobs = root.join("blobs/sha256");
        fs::create_dir_all(&blobs).map_err(io_err(&blobs))?;
        let marker = root.join("oci-layout");
        fs::write(&marker, br#"{"imageLayoutVersion":"1.0.0"}"#).map_err(io_err(&marker))?;
        Ok(Layout { root })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Path of a blob in the layout.
    pub fn blob_path(&self, digest: &Digest) -> PathBuf {
        self.root
            .join("blobs")
            .join(digest.algorithm().as_str())
            .join(digest.hex())
    }

    /// Stores bytes as a blob and returns its descriptor.
    pub fn put_blob(&self, media_type: &str, data: &[u8]) -> Result<Descriptor, LayoutError> {
        let digest = Digest::sha256(data);
        let path = self.blob_path(&digest);
        fs::write(&path, data).map_err(io_err(&path))?;
        Ok(Descriptor::new(media_type, digest, data.len() as u64))
    }

    /// Archives `dir` as one layer. Returns the layer descriptor and its diff ID
    /// (digest of the uncompressed tar).
    pub fn put_layer(
        &self,
        dir: &Path,
        compression: Compression,
    ) -> Result<(Descriptor, Digest), LayoutError> {
        let tmp = self.root.join("blobs/sha256/.layer.tmp");
        let file = File::create(&tmp).map_err(io_err(&tmp))?;
        let compressed = HashWriter::new(io::BufWriter::new(file));
        let (diff_id, compressed) = match compression {
            Compression::None => {
                let mut tar_out = HashWriter::new(compressed);
                write_tar(dir, &mut tar_out)?;
                let diff_id = tar_out.hasher.clone().finish();
                (diff_id, tar_out.inner)
            }
            Compression::Gzip => {
                let gz = flate2::write::GzEncoder::new(compressed, flate2::Compression::new(6));
                let mut tar_out = HashWriter::new(gz);
                write_tar(dir, &mut tar_out)?;
                let diff_id = tar_out.hasher.clone().finish();
                (diff_id, tar_out.inner.finish().map_err(io_err(&tmp))?)
            }
            Compression::Zstd => {
                let zs = zstd::Encoder::new(compressed, 3).map_err(io_err(&tmp))?;
                let mut tar_out = HashWriter::new(zs);
                write_tar(dir, &mut tar_out)?;
                let diff_id = tar_out.hasher.clone().finish();
                (diff_id, tar_out.inner.finish().map_err(io_err(&tmp))?)
            }
        };
        let HashWriter {
            inner,
            hasher,
            written,
        } = compressed;
        inner
            .into_inner()
            .map_err(|e| e.into_error())
            .and_then(|f| f.sync_all())
            .map_err(io_err(&tmp))?;
        let digest = hasher.finish();
        let path = self.blob_path(&digest);
        fs::rename(&tmp, &path).map_err(io_err(&path))?;
        Ok((
            Descriptor::new(compression.media_type(), digest, written),
            diff_id,
        ))
    }

    /// Writes the config and manifest of a single-platform image
    /// (linux/amd64) of `layers` (already stored; `diff_ids` are the digests
    /// of their uncompressed tars) and an `index.json` naming it `tag`.
    /// Returns the manifest descriptor.
    pub fn put_image(
        &self,
        layers: &[Descriptor],
        diff_ids: &[Digest],
        cmd: &[String],
        env: &[String],
        tag: &str,
    ) -> Result<Descriptor, LayoutError> {
        let config = json!({
            "architecture": "amd64",
            "os": "linux",
            "created": "1970-01-01T00:00:00Z",
            "config": { "Cmd": cmd, "Env": env },
            "rootfs": { "type": "layers", "diff_ids": diff_ids },
        });
        let config = self.put_blob(oci::OCI_CONFIG, &serde_json::to_vec(&config)?)?;
        let manifest = json!({
            "schemaVersion": 2,
            "mediaType": oci::OCI_MANIFEST,
            "config": config,
            "layers": layers,
        });
        let mut desc = self.put_blob(oci::OCI_MANIFEST, &serde_json::to_vec(&manifest)?)?;
        desc.annotations
            .insert("org.opencontainers.image.ref.name".into(), tag.to_owned());
        self.write_index(std::slice::from_ref(&desc))?;
        desc.annotations.clear();
        Ok(desc)
    }

    /// Writes `index.json` listing the given manifests.
    pub fn write_index(&self, manifests: &[Descriptor]) -> Result<(), LayoutError> {
        let index = json!({
            "schemaVersion": 2,
            "mediaType": oci::OCI_INDEX,
            "manifests": manifests,
        });
        let path = self.root.join("index.json");
        fs::write(&path, serde_json::to_vec(&index)?).map_err(io_err(&path))
    }
}

/// Builds a single-platform image (linux/amd64) into a fresh layout at `out`,
/// replacing what was there. Returns the manifest descriptor.
pub fn build_image(out: &Path, spec: &ImageSpec) -> Result<Descriptor, LayoutError> {
    if out.exists() {
        fs::remove_dir_all(out).map_err(io_err(out))?;
    }
    let layout = Layout::create(out)?;
    let mut layers = Vec::new();
    let mut diff_ids = Vec::new();
    for dir in &spec.layers {
        let (desc, diff_id) = layout.put_layer(dir, spec.compression)?;
        layers.push(desc);
        diff_ids.push(diff_id);
    }
    layout.put_image(&layers, &diff_ids, &spec.cmd, &spec.env, &spec.tag)
}

/// Writes `dir` as a tar stream: entries in byte order of their paths, parents
/// before children, hard links as link entries to the first path seen.
pub fn write_tar(dir: &Path, out: &mut impl Write) -> Result<(), LayoutError> {
    let mut builder = tar::Builder::new(out);
    builder.follow_symlinks(false);
    let mut seen_inodes: HashMap<(u64, u64), PathBuf> = HashMap::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let abs = dir.join(&rel);
        let mut names: Vec<_> = fs::read_dir(&abs)
            .map_err(io_err(&abs))?
            .map(|e| e.map(|e| e.file_name()))
            .collect::<Result<_, _>>()
            .map_err(io_err(&abs))?;
        names.sort();
        // Directories are pushed in reverse so they pop in order; their entries are
        // written when popped, which keeps every parent before its children.
        let mut subdirs = Vec::new();
        for name in names {
            let rel_child = rel.join(&name);
            let abs_child = dir.join(&rel_child);
            let meta = fs::symlink_metadata(&abs_child).map_err(io_err(&abs_child))?;
            append_entry(
                &mut builder,
                &rel_child,
                &abs_child,
                &meta,
                &mut seen_inodes,
            )?;
            if meta.is_dir() {
                subdirs.push(rel_child);
            }
        }
        stack.extend(subdirs.into_iter().rev());
    }
    builder.finish().map_err(io_err(dir))
}

fn append_entry<W: Write>(
    builder: &mut tar::Builder<W>,
    rel: &Path,
    abs: &Path,
    meta: &fs::Metadata,
    seen_inodes: &mut HashMap<(u64, u64), PathBuf>,
) -> Result<(), LayoutError> {
    let mut header = tar::Header::new_ustar();
    header.set_mode(meta.mode() & 0o7777);
    header.set_uid(meta.uid() as u64);
    header.set_gid(meta.gid() as u64);
    header.set_mtime(meta.mtime().max(0) as u64);
    header.set_size(0);
    let ft = meta.file_type();
    let err = io_err(abs);
    if ft.is_dir() {
        header.set_entry_type(tar::EntryType::Directory);
        let mut name = rel.as_os_str().to_owned();
        name.push("/");
        return builder
            .append_data(&mut header, Path::new(&name), io::empty())
            .map_err(err);
    }
    if ft.is_symlink() {
        header.set_entry_type(tar::EntryType::Symlink);
        let target = fs::read_link(abs).map_err(io_err(abs))?;
        return builder.append_link(&mut header, rel, &target).map_err(err);
    }
    if meta.nlink() > 1 && !ft.is_dir() {
        let key = (meta.dev(), meta.ino());
        if let Some(first) = seen_inodes.get(&key) {
            header.set_entry_type(tar::EntryType::Link);
            return builder.append_link(&mut header, rel, first).map_err(err);
        }
        seen_inodes.insert(key, rel.to_owned());
    }
    if ft.is_file() {
        header.set_entry_type(tar::EntryType::Regular);
        header.set_size(meta.len());
        let file = File::open(abs).map_err(io_err(abs))?;
        return builder.append_data(&mut header, rel, file).map_err(err);
    }
    let kind = if ft.is_char_device() {
        tar::EntryType::Char
    } else if ft.is_block_device() {
        tar::EntryType::Block
    } else if ft.is_fifo() {
        tar::EntryType::Fifo
    } else {
        return Err(LayoutError::Unsupported(abs.to_owned()));
    };
    header.set_entry_type(kind);
    let rdev = meta.rdev();
    // Linux dev_t encoding (glibc's gnu_dev_major/minor).
    let major = ((rdev >> 32) & 0xffff_f000) | ((rdev >> 8) & 0xfff);
    let minor = ((rdev >> 12) & 0xffff_ff00) | (rdev & 0xff);
    header.set_device_major(major as u32).map_err(io_err(abs))?;
    header.set_device_minor(minor as u32).map_err(io_err(abs))?;
    builder
        .append_data(&mut header, rel, io::empty())
        .map_err(err)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tree() -> tempfile::TempDir {
        let t = tempfile::tempdir().unwrap();
        fs::create_dir_all(t.path().join("bin")).unwrap();
        fs::write(t.path().join("bin/tool"), b"#!/bin/sh\necho hi\n").unwrap();
        fs::hard_link(t.path().join("bin/tool"), t.path().join("bin/alias")).unwrap();
        std::os::unix::fs::symlink("tool", t.path().join("bin/sym")).unwrap();
        t
    }

    #[test]
    fn layers_are_deterministic_and_keep_links() {
        let src = tree();
        let out = tempfile::tempdir().unwrap();
        let spec = ImageSpec {
            layers: vec![src.path().to_owned()],
            compression: Compression::Gzip,
            cmd: vec!["/bin/tool".into()],
            env: vec![],
            tag: "t".into(),
        };
        let a = build_image(&out.path().join("a"), &spec).unwrap();
        let b = build_image(&out.path().join("b"), &spec).unwrap();
        assert_eq!(a.digest, b.digest);

        let layout = Layout::create(out.path().join("c")).unwrap();
        let (desc, _) = layout.put_layer(src.path(), Compression::None).unwrap();
        let mut archive = tar::Archive::new(File::open(layout.blob_path(&desc.digest)).unwrap());
        let entries: Vec<(String, tar::EntryType)> = archive
            .entries()
            .unwrap()
            .map(|e| {
                let e = e.unwrap();
                (
                    e.path().unwrap().to_string_lossy().into_owned(),
                    e.header().entry_type(),
                )
            })
            .collect();
        assert_eq!(
            entries,
            vec![
                ("bin/".to_string(), tar::EntryType::Directory),
                ("bin/alias".to_string(), tar::EntryType::Regular),
                ("bin/sym".to_string(), tar::EntryType::Symlink),
                ("bin/tool".to_string(), tar::EntryType::Link),
            ]
        );
    }
}
