//! Converting a tar stream into a zstd:chunked blob.
//!
//! Streaming and bounded: the tar is read once; file payloads pass through in
//! chunks of at most `max_chunk` bytes; only metadata (headers, TOC, tar-split)
//! is held in memory. The output is deterministic for a given input and options.
//! The uncompressed stream is the input tar byte for byte, so the layer's diff
//! ID does not change.
//!
//! Chunk boundaries are content-defined (FastCDC): an edit inside a large file
//! moves only the chunks around it, so the next version of an image shares
//! most chunks, and therefore cache entries, with the last one.

use std::collections::BTreeMap;
use std::io::{self, Read, Write};

use base64::Engine as _;

use super::footer::{Footer, MetadataLocation, SKIPPABLE_MAGIC};
use super::tar_stream::{EntryHeader, RawTarReader, TarError};
use super::tarsplit::{TarSplitWriter, CRC64_ISO};
use super::toc::{self, Toc, TocEntry};
use crate::digest::Hasher;
use crate::{Algorithm, Digest};

/// Metadata frames are cut at this size so that no frame is huge.
const MAX_META_FRAME: usize = 1 << 20;

/// How file contents are cut into chunks and compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkingOptions {
    /// FastCDC minimum, average and maximum chunk sizes in bytes.
    pub min_chunk: u32,
    pub avg_chunk: u32,
    pub max_chunk: u32,
    /// zstd level of every frame but the TOC's.
    pub level: i32,
    /// zstd level of the TOC: every node fetches it whole before a layer
    /// opens, so bytes saved there are saved on every pull's path.
    pub toc_level: i32,
}

/// The TOC's zstd level unless set otherwise. Its digests and names
/// compress better at high levels: python3-large's upper layer (39,000
/// files, 14.9 MB of TOC JSON) is 3.49 MB at level 3, 2.99 MB at 16 (1.8 s
/// to compress on this machine), 2.85 MB at 19 (5.4 s).
pub const DEFAULT_TOC_LEVEL: i32 = 16;

impl Default for ChunkingOptions {
    /// 32 KiB average and zstd 3 (fast enough to convert on push): chosen by
    /// measurement, see docs/format.md for the trade-off between chunk size,
    /// compression and read amplification.
    fn default() -> Self {
        ChunkingOptions::with_average(32 * 1024, 3)
    }
}

impl ChunkingOptions {
    /// Options for an average chunk size: minimum a quarter of it, maximum four times.
    pub fn with_average(avg: u32, level: i32) -> Self {
        let avg = avg.clamp(1024, 16 << 20);
        ChunkingOptions {
            min_chunk: avg / 4,
            avg_chunk: avg,
            max_chunk: avg * 4,
            level,
            toc_level: DEFAULT_TOC_LEVEL,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    #[error(transparent)]
    Tar(#[from] TarError),
    #[error("writing the chunked layer: {0}")]
    Io(#[from] io::Error),
    #[error("tar entry {name:?}: {reason}")]
    Unsupported { name: String, reason: String },
}

/// What conversion produced.
#[derive(Debug, Clone)]
pub struct ConvertedLayer {
    /// Digest and size of the chunked blob.
    pub digest: Digest,
    pub size: u64,
    /// Digest of the uncompressed tar (unchanged by conversion).
    pub diff_id: Digest,
    /// Locations of TOC and tar-split, and the TOC digest.
    pub footer: Footer,
    pub files: u64,
    pub chunks: u64,
    /// Uncompressed bytes of file content.
    pub content_bytes: u64,
}

impl ConvertedLayer {
    /// Annotations for the layer descriptor.
    pub fn annotations(&self) -> BTreeMap<String, String> {
        self.footer.annotations()
    }
}

/// Counts and hashes what is written.
struct CountingWriter<W> {
    inner: W,
    count: u64,
    hasher: Hasher,
}

impl<W: Write> Write for CountingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.count += n as u64;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Hashes what is read (the diff ID).
struct HashingReader<R> {
    inner: R,
    hasher: Hasher,
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }
}

struct Converter<W: Write> {
    out: CountingWriter<W>,
    compressor: zstd::bulk::Compressor<'static>,
    /// Raw tar bytes waiting for the next metadata frame.
    meta: Vec<u8>,
    /// Raw tar bytes waiting for the next tar-split segment.
    split_pending: Vec<u8>,
    split: TarSplitWriter,
    entries: Vec<TocEntry<'static>>,
    opts: ChunkingOptions,
    files: u64,
    chunks: u64,
    content_bytes: u64,
}

fn rfc3339((secs, nanos): (i64, u32)) -> Option<String> {
    let t = time::OffsetDateTime::from_unix_timestamp(secs)
        .ok()?
        .replace_nanosecond(nanos)
        .ok()?;
    t.format(&time::format_description::well_known::Rfc3339)
        .ok()
}

fn toc_type(kind: tar::EntryType) -> Option<&'static str> {
    use tar::EntryType as T;
    Some(match kind {
        T::Regular | T::Continuous => toc::TYPE_REG,
        T::Directory => toc::TYPE_DIR,
        T::Symlink => toc::TYPE_SYMLINK,
        T::Link => toc::TYPE_HARDLINK,
        T::Char => toc::TYPE_CHAR,
        T::Block => toc::TYPE_BLOCK,
        T::Fifo => toc::TYPE_FIFO,
        _ => return None,
    })
}

impl<W: Write> Converter<W> {
    /// Compresses `data` as one frame and returns where it starts.
    fn frame(&mut self, data: &[u8]) -> io::Result<u64> {
        let start = self.out.count;
        let compressed = self.compressor.compress(data)?;
        self.out.write_all(&compressed)?;
        Ok(start)
    }

    fn flush_meta(&mut self) -> io::Result<()> {
        if !self.meta.is_empty() {
            let meta = std::mem::take(&mut self.meta);
            self.frame(&meta)?;
        }
        Ok(())
    }

    fn push_raw(&mut self, raw: &[u8]) -> io::Result<()> {
        self.meta.extend_from_slice(raw);
        self.split_pending.extend_from_slice(raw);
        if self.meta.len() >= MAX_META_FRAME {
            self.flush_meta()?;
        }
        Ok(())
    }

    fn entry<R: Read>(
        &mut self,
        tar: &mut RawTarReader<R>,
        h: EntryHeader,
    ) -> Result<(), WriteError> {
        let unsupported = |reason: &str| WriteError::Unsupported {
            name: h.name.clone(),
            reason: reason.to_owned(),
        };
        let kind = toc_type(h.kind)
            .ok_or_else(|| unsupported("entry type has no zstd:chunked equivalent"))?;
        if h.size > 0 && kind != toc::TYPE_REG {
            return Err(unsupported("only regular files may carry data"));
        }
        self.push_raw(&h.raw)?;
        let split = std::mem::take(&mut self.split_pending);
        self.split.segment(&split)?;

        let mut entry = TocEntry {
            kind: kind.into(),
            name: h.name.clone().into(),
            link_name: h.link_name.clone().into(),
            mode: i64::from(h.mode & 0o7777),
            size: h.size as i64,
            uid: h.uid as i64,
            gid: h.gid as i64,
            mod_time: rfc3339(h.mtime).map(Into::into),
            access_time: h.atime.and_then(rfc3339).map(Into::into),
            change_time: h.ctime.and_then(rfc3339).map(Into::into),
            dev_major: i64::from(h.dev_major),
            dev_minor: i64::from(h.dev_minor),
            xattrs: h
                .xattrs
                .iter()
                .map(|(k, v)| {
                    (
                        k.clone(),
                        base64::engine::general_purpose::STANDARD.encode(v),
                    )
                })
                .collect(),
            ..TocEntry::default()
        };
        let mut crc = None;
        let mut chunk_entries = Vec::new();
        if h.size > 0 {
            self.files += 1;
            self.flush_meta()?;
            let mut file_hash = Algorithm::Sha256.hasher();
            let mut file_crc = CRC64_ISO.digest();
            let mut chunks: Vec<(u64, u64, u64, Digest)> = Vec::new(); // (file off, size, blob off, digest)
            let payload = tar.payload(h.size);
            let cdc = fastcdc::v2020::StreamCDC::new(
                payload,
                self.opts.min_chunk,
                self.opts.avg_chunk,
                self.opts.max_chunk,
            );
            for chunk in cdc {
                let chunk = chunk.map_err(|e| match e {
                    fastcdc::v2020::Error::IoError(io) => WriteError::Io(io),
                    other => WriteError::Io(io::Error::other(other.to_string())),
                })?;
                file_hash.update(&chunk.data);
                file_crc.update(&chunk.data);
                let blob_offset = self.frame(&chunk.data)?;
                chunks.push((
                    chunk.offset,
                    chunk.length as u64,
                    blob_offset,
                    Digest::sha256(&chunk.data),
                ));
            }
            let covered: u64 = chunks.iter().map(|c| c.1).sum();
            if covered != h.size {
                return Err(unsupported("archive ends inside this file's data"));
            }
            self.chunks += chunks.len() as u64;
            self.content_bytes += h.size;
            entry.digest = file_hash.finish().to_string().into();
            entry.offset = chunks[0].2 as i64;
            entry.end_offset = self.out.count as i64;
            crc = Some(file_crc.finalize());
            if chunks.len() > 1 {
                entry.chunk_size = chunks[0].1 as i64;
                entry.chunk_digest = chunks[0].3.to_string().into();
                for &(file_offset, size, blob_offset, ref digest) in &chunks[1..] {
                    chunk_entries.push(TocEntry {
                        kind: toc::TYPE_CHUNK.into(),
                        name: h.name.clone().into(),
                        offset: blob_offset as i64,
                        chunk_size: size as i64,
                        chunk_offset: file_offset as i64,
                        chunk_digest: digest.to_string().into(),
                        ..TocEntry::default()
                    });
                }
            }
        }
        self.split.file(&h.name, h.size, crc)?;
        self.entries.push(entry);
        self.entries.extend(chunk_entries);
        let mut pad = Vec::new();
        tar.padding(h.size, &mut pad)?;
        self.push_raw(&pad)?;
        Ok(())
    }

    /// Appends `data` as a skippable frame; returns the offset of its content.
    fn skippable(&mut self, data: &[u8]) -> io::Result<u64> {
        self.out.write_all(&SKIPPABLE_MAGIC)?;
        let len =
            u32::try_from(data.len()).map_err(|_| io::Error::other("metadata frame over 4 GiB"))?;
        self.out.write_all(&len.to_le_bytes())?;
        let start = self.out.count;
        self.out.write_all(data)?;
        Ok(start)
    }
}

/// Converts the tar stream `tar` into a zstd:chunked blob written to `out`.
pub fn convert_tar<R: Read, W: Write>(
    tar: R,
    out: W,
    opts: &ChunkingOptions,
) -> Result<ConvertedLayer, WriteError> {
    let mut reader = RawTarReader::new(HashingReader {
        inner: tar,
        hasher: Algorithm::Sha256.hasher(),
    });
    let mut c = Converter {
        out: CountingWriter {
            inner: out,
            count: 0,
            hasher: Algorithm::Sha256.hasher(),
        },
        compressor: zstd::bulk::Compressor::new(opts.level)?,
        meta: Vec::new(),
        split_pending: Vec::new(),
        split: TarSplitWriter::new(opts.level)?,
        entries: Vec::new(),
        opts: *opts,
        files: 0,
        chunks: 0,
        content_bytes: 0,
    };
    let mut trailer = Vec::new();
    while let Some(header) = reader.next_header(&mut trailer)? {
        c.entry(&mut reader, header)?;
    }
    c.push_raw(&trailer)?;
    let split_tail = std::mem::take(&mut c.split_pending);
    c.split.segment(&split_tail)?;
    c.flush_meta()?;

    let split = std::mem::replace(&mut c.split, TarSplitWriter::new(opts.level)?).finish()?;
    let toc = Toc {
        version: 1,
        entries: std::mem::take(&mut c.entries),
        tar_split_digest: Some(split.digest.to_string()),
    };
    let (toc_bytes, toc_len) = toc.encode(opts.toc_level)?;
    let toc_digest = Digest::sha256(&toc_bytes);
    let toc_offset = c.skippable(&toc_bytes)?;
    let split_offset = c.skippable(&split.compressed)?;
    let footer = Footer {
        toc: MetadataLocation {
            offset: toc_offset,
            compressed_len: toc_bytes.len() as u64,
            uncompressed_len: toc_len,
        },
        tarsplit: Some(MetadataLocation {
            offset: split_offset,
            compressed_len: split.compressed.len() as u64,
            uncompressed_len: split.uncompressed_len,
        }),
        toc_digest: Some(toc_digest),
    };
    c.out.write_all(&footer.to_bytes())?;
    c.out.flush()?;
    let diff_id = reader_hasher(reader);
    Ok(ConvertedLayer {
        digest: c.out.hasher.finish(),
        size: c.out.count,
        diff_id,
        footer,
        files: c.files,
        chunks: c.chunks,
        content_bytes: c.content_bytes,
    })
}

fn reader_hasher<R: Read>(reader: RawTarReader<HashingReader<R>>) -> Digest {
    reader.into_inner().hasher.finish()
}
