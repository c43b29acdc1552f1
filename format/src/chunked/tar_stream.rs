//! A tar reader that keeps every raw byte.
//!
//! Conversion must reproduce the input tar exactly (same diff ID), so instead
//! of an extracting reader this one hands out the raw header bytes of each entry
//! (including PAX and GNU long-name extension records), lets the caller stream
//! the payload, and returns padding and the end-of-archive trailer as raw bytes
//! too. Extension records are bounded, so a hostile tar cannot make it allocate
//! without limit.

use std::collections::BTreeMap;
use std::io::{self, Read};

const BLOCK: usize = 512;
/// Largest PAX or GNU long-name record accepted.
pub const MAX_EXTENSION: u64 = 1 << 20;
/// Largest trailer (zero blocks and whatever follows them) kept.
pub const MAX_TRAILER: u64 = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum TarError {
    #[error("tar read failed: {0}")]
    Io(#[from] io::Error),
    #[error("tar header at byte {offset} is corrupt: {reason}")]
    Header { offset: u64, reason: String },
    #[error("tar entry {name:?}: {reason}")]
    Entry { name: String, reason: String },
}

/// One entry's header, parsed, with the raw bytes it came from.
#[derive(Debug, Clone)]
pub struct EntryHeader {
    /// All header blocks of the entry, extension records included.
    pub raw: Vec<u8>,
    pub name: String,
    pub link_name: String,
    pub kind: tar::EntryType,
    /// Payload bytes that follow the header (before padding).
    pub size: u64,
    pub mode: u32,
    pub uid: u64,
    pub gid: u64,
    pub mtime: (i64, u32),
    pub atime: Option<(i64, u32)>,
    pub ctime: Option<(i64, u32)>,
    pub dev_major: u32,
    pub dev_minor: u32,
    /// From PAX `SCHILY.xattr.*` records.
    pub xattrs: BTreeMap<String, Vec<u8>>,
}

/// Reads a tar stream entry by entry.
pub struct RawTarReader<R> {
    inner: R,
    offset: u64,
}

fn utf8(offset: u64, what: &str, bytes: &[u8]) -> Result<String, TarError> {
    String::from_utf8(bytes.to_vec()).map_err(|_| TarError::Header {
        offset,
        reason: format!("{what} is not UTF-8 (zstd:chunked TOCs are JSON)"),
    })
}

/// Parses a PAX time (`seconds[.fraction]`).
fn pax_time(v: &[u8]) -> Option<(i64, u32)> {
    let s = std::str::from_utf8(v).ok()?;
    let (secs, frac) = s.split_once('.').unwrap_or((s, ""));
    let secs: i64 = secs.parse().ok()?;
    let mut nanos = 0u32;
    for (i, c) in frac.bytes().take(9).enumerate() {
        if !c.is_ascii_digit() {
            return None;
        }
        nanos += u32::from(c - b'0') * 10u32.pow(8 - i as u32);
    }
    Some((secs, nanos))
}

impl<R: Read> RawTarReader<R> {
    pub fn new(inner: R) -> Self {
        RawTarReader { inner, offset: 0 }
    }

    pub fn into_inner(self) -> R {
        self.inner
    }

    /// Bytes consumed so far.
    pub fn offset(&self) -> u64 {
        self.offset
    }

    fn read_exact_counted(&mut self, buf: &mut [u8]) -> Result<(), TarError> {
        self.inner.read_exact(buf).map_err(|e| {
            if e.kind() == io::ErrorKind::UnexpectedEof {
                TarError::Header {
                    offset: self.offset,
                    reason: "archive ends in the middle of an entry".into(),
                }
            } else {
                TarError::Io(e)
            }
        })?;
        self.offset += buf.len() as u64;
        Ok(())
    }

    /// Reads an extension record's data (and padding) into `raw`; returns the data.
    fn read_extension(&mut self, size: u64, raw: &mut Vec<u8>) -> Result<Vec<u8>, TarError> {
        if size > MAX_EXTENSION {
            return Err(TarError::Header {
                offset: self.offset,
                reason: format!("extension record of {size} bytes exceeds {MAX_EXTENSION}"),
            });
        }
        let padded = size.div_ceil(BLOCK as u64) as usize * BLOCK;
        let start = raw.len();
        raw.resize(start + padded, 0);
        let (off, buf) = (self.offset, &mut raw[start..]);
        self.inner.read_exact(buf).map_err(|e| {
            if e.kind() == io::ErrorKind::UnexpectedEof {
                TarError::Header {
                    offset: off,
                    reason: "archive ends inside an extension record".into(),
                }
            } else {
                TarError::Io(e)
            }
        })?;
        self.offset += padded as u64;
        Ok(raw[start..start + size as usize].to_vec())
    }

    /// Reads the next entry's header. Returns `None` at the end-of-archive
    /// marker; the marker's bytes are then in `trailer`.
    pub fn next_header(&mut self, trailer: &mut Vec<u8>) -> Result<Option<EntryHeader>, TarError> {
        let mut raw = Vec::with_capacity(BLOCK);
        let mut pax: BTreeMap<String, Vec<u8>> = BTreeMap::new();
        let mut long_name: Option<Vec<u8>> = None;
        let mut long_link: Option<Vec<u8>> = None;
        loop {
            let header_offset = self.offset;
            let mut block = [0u8; BLOCK];
            let n = read_full(&mut self.inner, &mut block)?;
            self.offset += n as u64;
            if n == 0 && raw.is_empty() {
                // A stream that simply stops after an entry: tolerated, like GNU tar.
                return Ok(None);
            }
            if n < BLOCK {
                return Err(TarError::Header {
                    offset: header_offset,
                    reason: "archive ends in the middle of a header".into(),
                });
            }
            if block.iter().all(|&b| b == 0) {
                if !raw.is_empty() {
                    return Err(TarError::Header {
                        offset: header_offset,
                        reason: "end-of-archive marker right after an extension record".into(),
                    });
                }
                trailer.extend_from_slice(&block);
                let mut rest = Vec::new();
                (&mut self.inner)
                    .take(MAX_TRAILER + 1)
                    .read_to_end(&mut rest)?;
                if rest.len() as u64 > MAX_TRAILER {
                    return Err(TarError::Header {
                        offset: self.offset,
                        reason: format!(
                            "more than {MAX_TRAILER} bytes after the end-of-archive marker"
                        ),
                    });
                }
                self.offset += rest.len() as u64;
                trailer.extend_from_slice(&rest);
                return Ok(None);
            }
            raw.extend_from_slice(&block);
            let header = tar::Header::from_byte_slice(&block);
            let bad = |reason: String| TarError::Header {
                offset: header_offset,
                reason,
            };
            let stored = header
                .cksum()
                .map_err(|e| bad(format!("checksum field: {e}")))?;
            let computed: u32 = block
                .iter()
                .enumerate()
                .map(|(i, &b)| {
                    if (148..156).contains(&i) {
                        u32::from(b' ')
                    } else {
                        u32::from(b)
                    }
                })
                .sum();
            if stored != computed {
                return Err(bad(format!("checksum {stored} does not match {computed}")));
            }
            let size = header
                .entry_size()
                .map_err(|e| bad(format!("size field: {e}")))?;
            match header.entry_type() {
                tar::EntryType::XHeader => {
                    let data = self.read_extension(size, &mut raw)?;
                    for ext in tar::PaxExtensions::new(&data) {
                        let ext = ext.map_err(|e| bad(format!("PAX record: {e}")))?;
                        let key = ext.key().map_err(|_| bad("PAX key is not UTF-8".into()))?;
                        pax.insert(key.to_owned(), ext.value_bytes().to_vec());
                    }
                    continue;
                }
                tar::EntryType::XGlobalHeader => {
                    // Global records apply to the rest of the archive in theory;
                    // no container tool writes them. Keep the bytes, ignore them.
                    self.read_extension(size, &mut raw)?;
                    continue;
                }
                tar::EntryType::GNULongName => {
                    let mut d = self.read_extension(size, &mut raw)?;
                    while d.last() == Some(&0) {
                        d.pop();
                    }
                    long_name = Some(d);
                    continue;
                }
                tar::EntryType::GNULongLink => {
                    let mut d = self.read_extension(size, &mut raw)?;
                    while d.last() == Some(&0) {
                        d.pop();
                    }
                    long_link = Some(d);
                    continue;
                }
                tar::EntryType::GNUSparse => {
                    return Err(bad("GNU sparse entries are not supported".into()));
                }
                _ => {}
            }
            let name_bytes = pax
                .remove("path")
                .or(long_name.take())
                .unwrap_or_else(|| header.path_bytes().into_owned());
            let name = utf8(header_offset, "entry name", &name_bytes)?;
            let link_bytes = pax
                .remove("linkpath")
                .or(long_link.take())
                .or_else(|| header.link_name_bytes().map(|c| c.into_owned()))
                .unwrap_or_default();
            let link_name = utf8(header_offset, "link name", &link_bytes)?;
            let entry_err = |reason: String| TarError::Entry {
                name: name.clone(),
                reason,
            };
            let num = |key: &str| -> Result<Option<u64>, TarError> {
                pax.get(key)
                    .map(|v| {
                        std::str::from_utf8(v)
                            .ok()
                            .and_then(|s| s.parse().ok())
                            .ok_or_else(|| entry_err(format!("PAX {key} is not a number")))
                    })
                    .transpose()
            };
            let size = num("size")?.unwrap_or(size);
            let old = header.as_old();
            let uid = match num("uid")? {
                Some(v) => v,
                None => blank_is_zero(&old.uid, header.uid())
                    .map_err(|e| entry_err(format!("uid: {e}")))?,
            };
            let gid = match num("gid")? {
                Some(v) => v,
                None => blank_is_zero(&old.gid, header.gid())
                    .map_err(|e| entry_err(format!("gid: {e}")))?,
            };
            let mtime = match pax.get("mtime").and_then(|v| pax_time(v)) {
                Some(t) => t,
                None => (
                    blank_is_zero(&old.mtime, header.mtime())
                        .map_err(|e| entry_err(format!("mtime: {e}")))? as i64,
                    0,
                ),
            };
            let mut xattrs = BTreeMap::new();
            for (k, v) in &pax {
                if let Some(x) = k.strip_prefix("SCHILY.xattr.") {
                    xattrs.insert(x.to_owned(), v.clone());
                }
            }
            let mode = blank_is_zero(&old.mode, header.mode().map(u64::from))
                .map_err(|e| entry_err(format!("mode: {e}")))? as u32;
            let dev = |v: io::Result<Option<u32>>| v.ok().flatten().unwrap_or(0);
            return Ok(Some(EntryHeader {
                raw,
                name,
                link_name,
                kind: header.entry_type(),
                size,
                mode,
                uid,
                gid,
                mtime,
                atime: pax.get("atime").and_then(|v| pax_time(v)),
                ctime: pax.get("ctime").and_then(|v| pax_time(v)),
                dev_major: dev(header.device_major()),
                dev_minor: dev(header.device_minor()),
                xattrs,
            }));
        }
    }

    /// The payload of the current entry: read exactly its `size` bytes from it.
    pub fn payload(&mut self, size: u64) -> PayloadReader<'_, R> {
        PayloadReader {
            reader: self,
            remaining: size,
        }
    }

    /// Reads the padding after a payload of `size` bytes into `raw`.
    pub fn padding(&mut self, size: u64, raw: &mut Vec<u8>) -> Result<(), TarError> {
        let pad = (BLOCK - (size % BLOCK as u64) as usize) % BLOCK;
        let start = raw.len();
        raw.resize(start + pad, 0);
        let mut buf = std::mem::take(raw);
        let r = self.read_exact_counted(&mut buf[start..]);
        *raw = buf;
        r
    }
}

/// Reads a payload, failing if the archive ends before it does.
pub struct PayloadReader<'a, R> {
    reader: &'a mut RawTarReader<R>,
    remaining: u64,
}

impl<R: Read> Read for PayloadReader<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.remaining == 0 {
            return Ok(0);
        }
        let max = buf
            .len()
            .min(self.remaining.min(usize::MAX as u64) as usize);
        let n = self.reader.inner.read(&mut buf[..max])?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!(
                    "archive ends {} bytes before the end of an entry's data",
                    self.remaining
                ),
            ));
        }
        self.remaining -= n as u64;
        self.reader.offset += n as u64;
        Ok(n)
    }
}

/// A numeric header field left blank (all NUL or spaces) reads as 0, as GNU
/// and Go tar readers treat it; anything else must parse.
fn blank_is_zero(field: &[u8], parsed: io::Result<u64>) -> io::Result<u64> {
    if field.iter().all(|&b| b == 0 || b == b' ') {
        return Ok(0);
    }
    parsed
}

/// Reads until `buf` is full or the stream ends; returns the bytes read.
fn read_full(r: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}
