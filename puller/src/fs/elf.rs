//! What the dynamic loader touches in an ELF object right after reading its
//! header: the writable segments, where it applies relocations (`.data.rel.ro`,
//! `.got`, `.data`).
//!
//! They sit at the end of the file, far from the header, and each one costs
//! its own page faults: on a numpy + pandas start through 100 Mbit/s + 20 ms,
//! 20 of the 40 faults in shared objects that waited for the link fell in or
//! next to a writable segment (python3.11, libc, libcrypto 4×, libstdc++, the
//! numpy and pandas extension modules 1–2× each). Knowing them from the
//! header lets them be fetched while the loader is still mapping the object.

use std::ops::Range;

use object::elf::{FileHeader32, FileHeader64, ELFCLASS64, PF_W, PT_LOAD};
use object::read::elf::{FileHeader, ProgramHeader};
use object::Endianness;

/// Bytes before a writable segment that its faults read too: the kernel
/// reads around a faulting page (up to 128 KiB windows centred on it, and
/// the window before an earlier one), and the segment starts mid-page.
const FAULT_READ_BEFORE: u64 = 192 << 10;
/// Bytes after a writable segment that its faults read too.
const FAULT_READ_AFTER: u64 = 64 << 10;

/// The file ranges an ELF object's loader will fault in first: its writable
/// `PT_LOAD` segments, widened by what the kernel reads around a fault, not
/// clipped to the file. Empty if `header` (the file's first bytes) is not an
/// ELF header with its program headers.
pub fn loader_writes(header: &[u8]) -> Vec<Range<u64>> {
    let segments = if header.get(4) == Some(&ELFCLASS64) {
        writable_segments::<FileHeader64<Endianness>>(header)
    } else {
        writable_segments::<FileHeader32<Endianness>>(header)
    };
    segments
        .unwrap_or_default()
        .into_iter()
        .map(|s| s.start.saturating_sub(FAULT_READ_BEFORE)..s.end.saturating_add(FAULT_READ_AFTER))
        .collect()
}

fn writable_segments<Elf: FileHeader<Endian = Endianness>>(
    header: &[u8],
) -> Option<Vec<Range<u64>>> {
    let elf = Elf::parse(header).ok()?;
    let endian = elf.endian().ok()?;
    let segments = elf.program_headers(endian, header).ok()?;
    Some(
        segments
            .iter()
            .filter(|p| p.p_type(endian) == PT_LOAD && p.p_flags(endian) & PF_W != 0)
            .map(|p| {
                let offset: u64 = p.p_offset(endian).into();
                offset..offset.saturating_add(p.p_filesz(endian).into())
            })
            .filter(|r| !r.is_empty())
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use sluice_testkit::images::{elf_object, pseudo_random};

    const R: u32 = 4;
    const RX: u32 = 5;
    const RW: u32 = 6;
    const PT_DYNAMIC: u32 = 2;

    #[test]
    fn writable_load_segments_are_found_and_widened() {
        let header = elf_object(
            4096,
            1,
            &[
                (PT_LOAD, R, 0, 0x20000),
                (PT_LOAD, RX, 0x20000, 0x300000),
                (PT_LOAD, RW, 0x400000, 0x30000),
                (PT_DYNAMIC, RW, 0x401000, 0x200),
                (PT_LOAD, RW, 0x500000, 0), // only .bss: nothing in the file
            ],
        );
        assert_eq!(
            loader_writes(&header),
            vec![0x400000 - FAULT_READ_BEFORE..0x430000 + FAULT_READ_AFTER]
        );
        // Near the start, the widening stops at 0.
        assert_eq!(
            loader_writes(&elf_object(4096, 2, &[(PT_LOAD, RW, 0x1000, 0x1000)])),
            vec![0..0x2000 + FAULT_READ_AFTER]
        );
    }

    #[test]
    fn not_an_elf_header_gives_nothing() {
        assert!(loader_writes(b"").is_empty());
        assert!(loader_writes(b"\x7fELF and then text").is_empty());
        let header = elf_object(4096, 3, &[(PT_LOAD, RW, 0x400000, 0x30000)]);
        // Program headers cut off: nothing rather than a guess.
        assert!(loader_writes(&header[..80]).is_empty());
        let mut random = pseudo_random(4096, 4);
        random[..4].copy_from_slice(b"\x7fELF");
        assert!(loader_writes(&random).is_empty());
    }
}
