//! TOC parsing and validation on arbitrary bytes (`cargo xtask fuzz`).
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| sluice_format::fuzzing::toc(data));
