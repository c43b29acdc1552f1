//! Entry points for fuzzing (`fuzz/` with cargo-fuzz) and for the smoke test
//! that runs them on mutated inputs in every `cargo test`.
//!
//! Each takes arbitrary bytes and must return without panicking, hanging or
//! allocating without bound, whatever the bytes are.

use std::io::Read;

use crate::chunked::tar_stream::RawTarReader;
use crate::chunked::toc::Toc;
use crate::chunked::{convert_tar, ChunkingOptions, Footer, LayerIndex};

/// Bytes as a TOC: plain JSON or zstd-compressed, then validated into an index.
pub fn toc(data: &[u8]) {
    let json = Toc::inflate(data, None, 4 << 20).unwrap_or_else(|_| data.to_vec());
    if let Ok(toc) = Toc::parse(&json) {
        if let Ok(index) = LayerIndex::from_toc(&toc, 1 << 30) {
            for i in 0..index.nodes().len() {
                let _ = index.chunks_for_range(i, 0, u64::MAX / 2);
            }
        }
    }
    let _ = Footer::from_suffix(data);
}

/// Bytes as a tar stream: read entry by entry, then converted.
pub fn tar(data: &[u8]) {
    let mut reader = RawTarReader::new(data);
    let mut trailer = Vec::new();
    while let Ok(Some(h)) = reader.next_header(&mut trailer) {
        let mut payload = reader.payload(h.size);
        let mut sink = [0u8; 4096];
        while matches!(payload.read(&mut sink), Ok(n) if n > 0) {}
        let mut pad = Vec::new();
        if reader.padding(h.size, &mut pad).is_err() {
            break;
        }
    }
    let _ = convert_tar(
        data,
        std::io::sink(),
        &ChunkingOptions::with_average(1024, 1),
    );
}
