//! tar-split metadata (vbatts/tar-split JSON lines), as containers/storage
//! stores it in zstd:chunked layers: enough to rebuild the exact tar stream
//! from the TOC's file contents.
//!
//! Each line is either a segment of raw tar bytes (`"type":2`, base64
//! `payload`: headers, padding, the trailer) or a file entry (`"type":1`,
//! `name`, `size` when non-zero, `payload` = big-endian CRC-64/ISO of the
//! content when non-empty), numbered by `position`.

use std::io::Write;

use base64::Engine as _;
use serde::Serialize;

use crate::digest::Hasher;
use crate::{Algorithm, Digest};

/// CRC-64 with Go's ISO table, as tar-split computes it.
pub const CRC64_ISO: crc::Crc<u64> = crc::Crc::<u64>::new(&crc::CRC_64_GO_ISO);

#[derive(Serialize)]
struct Line<'a> {
    #[serde(rename = "type")]
    kind: u8,
    #[serde(skip_serializing_if = "Option::is_none")]
    name: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    size: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    payload: Option<String>,
    position: u64,
}

/// Writes tar-split lines into a zstd stream held in memory (it is metadata:
/// proportional to the number of entries, not to their size).
pub struct TarSplitWriter {
    encoder: zstd::stream::write::Encoder<'static, HashingVec>,
    position: u64,
    uncompressed: u64,
}

/// A Vec that hashes what is written to it.
pub struct HashingVec {
    pub bytes: Vec<u8>,
    hasher: Hasher,
}

impl Write for HashingVec {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.hasher.update(buf);
        self.bytes.extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Finished tar-split data.
pub struct TarSplit {
    pub compressed: Vec<u8>,
    pub digest: Digest,
    pub uncompressed_len: u64,
}

impl TarSplitWriter {
    pub fn new(level: i32) -> std::io::Result<Self> {
        let sink = HashingVec {
            bytes: Vec::new(),
            hasher: Algorithm::Sha256.hasher(),
        };
        Ok(TarSplitWriter {
            encoder: zstd::stream::write::Encoder::new(sink, level)?,
            position: 0,
            uncompressed: 0,
        })
    }

    fn line(&mut self, line: &Line<'_>) -> std::io::Result<()> {
        let mut json = serde_json::to_vec(line).map_err(std::io::Error::other)?;
        json.push(b'\n');
        self.uncompressed += json.len() as u64;
        self.encoder.write_all(&json)?;
        self.position += 1;
        Ok(())
    }

    /// Raw tar bytes that are not file content. Empty segments are skipped.
    pub fn segment(&mut self, raw: &[u8]) -> std::io::Result<()> {
        if raw.is_empty() {
            return Ok(());
        }
        let payload = base64::engine::general_purpose::STANDARD.encode(raw);
        self.line(&Line {
            kind: 2,
            name: None,
            size: None,
            payload: Some(payload),
            position: self.position,
        })
    }

    /// A tar entry; `crc` is the CRC-64 of its content when it has any.
    pub fn file(&mut self, name: &str, size: u64, crc: Option<u64>) -> std::io::Result<()> {
        let payload =
            crc.map(|c| base64::engine::general_purpose::STANDARD.encode(c.to_be_bytes()));
        self.line(&Line {
            kind: 1,
            name: Some(name),
            size: (size > 0).then_some(size),
            payload,
            position: self.position,
        })
    }

    pub fn finish(self) -> std::io::Result<TarSplit> {
        let uncompressed_len = self.uncompressed;
        let sink = self.encoder.finish()?;
        Ok(TarSplit {
            digest: sink.hasher.finish(),
            compressed: sink.bytes,
            uncompressed_len,
        })
    }
}
