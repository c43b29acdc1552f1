//! The shared objects an ELF object needs, and where the dynamic loader
//! finds them in an image.
//!
//! An extension module that Python is about to load brings its libraries
//! with it (numpy's linear algebra: BLAS, LAPACK, gfortran, quadmath), and
//! the loader maps each one as soon as the previous is mapped: with nothing
//! fetched ahead, every library is a round trip, and then one per page it
//! faults in. Known from the module's dynamic section (`DT_NEEDED`,
//! `DT_RUNPATH` / `DT_RPATH`), they can be fetched while the import is
//! still on its way (see `fs::imports`).

use object::read::elf::{FileHeader, ProgramHeader};
use object::{elf, Endianness};

/// What an ELF object's dynamic section says about the libraries it needs.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Needs {
    /// `DT_NEEDED`: library names (`libblas.so.3`), in the loader's order.
    pub libraries: Vec<String>,
    /// `DT_RUNPATH`, or else `DT_RPATH`: directories searched first
    /// (`$ORIGIN` not yet replaced).
    pub run_paths: Vec<String>,
    /// The multiarch tuple of the object's machine (`x86_64-linux-gnu`), for
    /// Debian's library directories.
    pub multiarch: Option<&'static str>,
}

/// An ELF object (64-bit) as its first bytes describe it: where its
/// segments and its dynamic section are. Read in steps, since a lazy file's
/// parts arrive separately: the head, then the dynamic section (in the
/// writable segment, at the end), then the strings it points at (near the
/// start).
#[derive(Debug)]
pub struct Object {
    little_endian: bool,
    machine: u16,
    /// `PT_LOAD` segments: (virtual address, file offset, file size, flags).
    loads: Vec<(u64, u64, u64, u32)>,
    /// File range of `PT_DYNAMIC`.
    dynamic: Option<(u64, u64)>,
    /// File range of `PT_INTERP` (a program's dynamic loader).
    interpreter: Option<(u64, u64)>,
}

/// A dynamic section is a few hundred bytes; a hostile one is not read
/// past this.
const DYNAMIC_MAX: u64 = 64 << 10;
/// Nor a string table past this.
const STRINGS_MAX: u64 = 4 << 20;

impl Object {
    /// From the object's first bytes (header and program headers; the first
    /// 4 KiB hold them in any object a linker writes). `None`: not a 64-bit
    /// ELF object, or its headers lie beyond `head`.
    pub fn from_head(head: &[u8]) -> Option<Object> {
        let header = elf::FileHeader64::<Endianness>::parse(head).ok()?;
        let endian = header.endian().ok()?;
        let mut out = Object {
            little_endian: endian == Endianness::Little,
            machine: header.e_machine(endian),
            loads: Vec::new(),
            dynamic: None,
            interpreter: None,
        };
        for p in header.program_headers(endian, head).ok()? {
            let range = (p.p_offset(endian), p.p_filesz(endian));
            match p.p_type(endian) {
                elf::PT_LOAD => {
                    out.loads
                        .push((p.p_vaddr(endian), range.0, range.1, p.p_flags(endian)))
                }
                elf::PT_DYNAMIC => out.dynamic = Some((range.0, range.1.min(DYNAMIC_MAX))),
                elf::PT_INTERP => out.interpreter = Some(range),
                _ => {}
            }
        }
        Some(out)
    }

    /// File ranges (offset, length) of the writable segments. The loader's
    /// relocations write there right after it maps the object, and they
    /// lie at its end: fetched front to back, the object's last bytes would
    /// come last but be wanted first.
    pub fn writable_ranges(&self) -> Vec<(u64, u64)> {
        self.loads
            .iter()
            .filter(|l| l.3 & elf::PF_W != 0)
            .map(|&(_, off, size, _)| (off, size))
            .collect()
    }

    /// File ranges of the read-only segments before the first executable
    /// one: where linkers put what the loader reads to link the object
    /// (symbol tables, their hashes and strings, relocations), all of which
    /// it reads before any of the object's code runs.
    pub fn link_ranges(&self) -> Vec<(u64, u64)> {
        self.loads
            .iter()
            .take_while(|l| l.3 & elf::PF_X == 0)
            .filter(|l| l.3 & elf::PF_W == 0)
            .map(|&(_, off, size, _)| (off, size))
            .collect()
    }

    /// File range of the dynamic section (`None`: a static object).
    pub fn dynamic_range(&self) -> Option<(u64, u64)> {
        self.dynamic
    }

    /// The dynamic loader a program names (`PT_INTERP`:
    /// `/lib64/ld-linux-x86-64.so.2`), if it lies within `head` (the
    /// bytes [`Self::from_head`] read; linkers put it right after the
    /// program headers). `None` for a library or a static program.
    pub fn interpreter(&self, head: &[u8]) -> Option<String> {
        let (offset, len) = self.interpreter?;
        let end = offset.checked_add(len)?;
        let bytes = head.get(usize::try_from(offset).ok()?..usize::try_from(end).ok()?)?;
        let path = bytes.split(|&b| b == 0).next()?;
        let path = std::str::from_utf8(path).ok()?;
        (!path.is_empty()).then(|| path.to_string())
    }

    /// The multiarch tuple of the object's machine (`x86_64-linux-gnu`).
    pub fn multiarch(&self) -> Option<&'static str> {
        multiarch(self.machine)
    }

    /// The file offset of virtual address `addr`.
    fn file_offset(&self, addr: u64) -> Option<u64> {
        self.loads
            .iter()
            .find(|&&(vaddr, _, size, _)| addr >= vaddr && addr - vaddr < size)
            .map(|&(vaddr, off, _, _)| off + (addr - vaddr))
    }

    /// Reads the dynamic section's bytes (from [`Self::dynamic_range`]).
    pub fn dynamic(&self, bytes: &[u8]) -> Option<Dynamic> {
        let word = |b: &[u8]| {
            let b: [u8; 8] = b.try_into().expect("8 bytes");
            if self.little_endian {
                u64::from_le_bytes(b)
            } else {
                u64::from_be_bytes(b)
            }
        };
        let mut d = Dynamic {
            needed: Vec::new(),
            runpath: Vec::new(),
            rpath: Vec::new(),
            strings: (0, 0),
            multiarch: multiarch(self.machine),
        };
        let (mut strtab, mut strsz) = (None, 0);
        for e in bytes.chunks_exact(16) {
            let (tag, val) = (word(&e[..8]) as i64, word(&e[8..]));
            match tag {
                elf::DT_NULL => break,
                elf::DT_NEEDED => d.needed.push(val),
                elf::DT_RUNPATH => d.runpath.push(val),
                elf::DT_RPATH => d.rpath.push(val),
                elf::DT_STRTAB => strtab = Some(val),
                elf::DT_STRSZ => strsz = val,
                _ => {}
            }
        }
        d.strings = (self.file_offset(strtab?)?, strsz.min(STRINGS_MAX));
        Some(d)
    }
}

/// An object's dynamic section: offsets into its string table, whose file
/// range is [`Dynamic::strings`].
#[derive(Debug)]
pub struct Dynamic {
    needed: Vec<u64>,
    runpath: Vec<u64>,
    rpath: Vec<u64>,
    /// File range (offset, length) of the dynamic string table.
    pub strings: (u64, u64),
    multiarch: Option<&'static str>,
}

impl Dynamic {
    /// What the object needs, given its string table's bytes.
    pub fn needs(&self, strings: &[u8]) -> Needs {
        let text = |at: &u64| -> Option<String> {
            let rest = strings.get(usize::try_from(*at).ok()?..)?;
            let end = rest.iter().position(|&b| b == 0)?;
            Some(String::from_utf8_lossy(&rest[..end]).into_owned())
        };
        // The loader ignores DT_RPATH when DT_RUNPATH is there.
        let paths = if self.runpath.is_empty() {
            &self.rpath
        } else {
            &self.runpath
        };
        Needs {
            libraries: self.needed.iter().filter_map(text).collect(),
            run_paths: paths
                .iter()
                .filter_map(text)
                .flat_map(|p| {
                    p.split(':')
                        .filter(|p| !p.is_empty())
                        .map(str::to_string)
                        .collect::<Vec<_>>()
                })
                .collect(),
            multiarch: self.multiarch,
        }
    }
}

fn multiarch(machine: u16) -> Option<&'static str> {
    Some(match machine {
        elf::EM_X86_64 => "x86_64-linux-gnu",
        elf::EM_AARCH64 => "aarch64-linux-gnu",
        elf::EM_PPC64 => "powerpc64le-linux-gnu",
        elf::EM_S390 => "s390x-linux-gnu",
        elf::EM_RISCV => "riscv64-linux-gnu",
        _ => return None,
    })
}

/// Where the loader looks for the libraries of the object at `object_path`
/// (relative to the image root, no leading `/`), in its order: the run
/// paths (`$ORIGIN` is the object's directory), then the directories of
/// Debian's and Red Hat's `ld.so.conf` and the built-in defaults. (The
/// image's own `ld.so.cache` is not read: it is one more file to fetch
/// first; a library found only through it is fetched when the loader asks.)
pub fn search_dirs(needs: &Needs, object_path: &str) -> Vec<String> {
    let origin = object_path.rsplit_once('/').map_or("", |(d, _)| d);
    let mut dirs: Vec<String> = needs
        .run_paths
        .iter()
        .filter_map(|p| {
            let p = p
                .replace("${ORIGIN}", "$ORIGIN")
                .replace("$ORIGIN", &format!("/{origin}"));
            // Relative run paths are relative to the process's working
            // directory: unknowable here.
            p.strip_prefix('/')
                .map(|p| p.trim_start_matches('/').to_string())
        })
        .collect();
    if let Some(m) = needs.multiarch {
        for d in [
            format!("usr/local/lib/{m}"),
            format!("lib/{m}"),
            format!("usr/lib/{m}"),
        ] {
            dirs.push(d);
        }
    }
    for d in ["usr/local/lib", "lib64", "usr/lib64", "lib", "usr/lib"] {
        dirs.push(d.to_string());
    }
    dirs
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What a whole ELF object in memory needs: the steps of [`Object`]
    /// at once, as the daemon takes them one part of a file at a time.
    fn needs(data: &[u8]) -> Option<Needs> {
        let slice = |(off, len): (u64, u64)| {
            let from = usize::try_from(off).ok()?;
            let to = from.checked_add(usize::try_from(len).ok()?)?;
            data.get(from..to.min(data.len()))
        };
        let object = Object::from_head(data)?;
        let dynamic = object.dynamic(slice(object.dynamic_range()?)?)?;
        Some(dynamic.needs(slice(dynamic.strings)?))
    }

    /// The test binary itself, a dynamic ELF program.
    #[test]
    fn the_libraries_of_a_real_program() {
        let me = std::fs::read(std::env::current_exe().unwrap()).unwrap();
        let n = needs(&me).expect("the test binary is a dynamic ELF object");
        assert!(
            n.libraries.iter().any(|l| l.starts_with("libc.so")),
            "{n:?}"
        );
        assert_eq!(n.multiarch, Some("x86_64-linux-gnu"));
        // The same in steps, from the parts of the file alone.
        let object = Object::from_head(&me[..4096]).unwrap();
        let rw = object.writable_ranges();
        assert!(!rw.is_empty() && rw.iter().all(|&(o, l)| o > 0 && o + l <= me.len() as u64));
        let part = |(o, l): (u64, u64)| &me[o as usize..(o + l) as usize];
        let dynamic = object
            .dynamic(part(object.dynamic_range().unwrap()))
            .unwrap();
        assert_eq!(dynamic.needs(part(dynamic.strings)), n);
        // What the loader reads to link it lies in the read-only segments
        // before its code: the dynamic strings among them.
        let link = object.link_ranges();
        let (so, sl) = dynamic.strings;
        assert!(
            link.iter().any(|&(o, l)| o <= so && so + sl <= o + l),
            "{link:?} {:?}",
            dynamic.strings
        );
        assert!(link
            .iter()
            .all(|&(o, l)| rw.iter().all(|&(w, _)| o + l <= w)));
        // A program names its loader; a head cut before it does not.
        let loader = object.interpreter(&me[..4096]).expect("PT_INTERP");
        assert!(
            loader.starts_with('/') && loader.contains("ld-linux"),
            "{loader}"
        );
        assert_eq!(object.interpreter(&me[..64]), None);
        assert_eq!(object.multiarch(), Some("x86_64-linux-gnu"));
        assert!(Object::from_head(&me[..32]).is_none());
        assert!(needs(b"not an ELF object").is_none());
        // Every prefix of an object is an answer or None, never a panic.
        for cut in (0..me.len().min(1 << 16)).step_by(61) {
            let _ = needs(&me[..cut]);
        }
    }

    #[test]
    fn search_order_is_run_paths_then_the_system_directories() {
        let n = Needs {
            libraries: vec!["libfoo.so.1".into()],
            run_paths: vec!["$ORIGIN/../lib".into(), "/opt/x/lib".into(), "rel".into()],
            multiarch: Some("x86_64-linux-gnu"),
        };
        let dirs = search_dirs(&n, "usr/lib/python3/dist-packages/pkg/_m.so");
        assert_eq!(
            dirs[..5],
            [
                "usr/lib/python3/dist-packages/pkg/../lib",
                "opt/x/lib",
                "usr/local/lib/x86_64-linux-gnu",
                "lib/x86_64-linux-gnu",
                "usr/lib/x86_64-linux-gnu",
            ]
        );
        assert_eq!(dirs.last().map(String::as_str), Some("usr/lib"));
    }
}
