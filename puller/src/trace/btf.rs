//! What the raw-tracepoint programs need from the running kernel's BTF
//! (`/sys/kernel/btf/vmlinux`): byte offsets of a few struct members, and the
//! argument types of a tracepoint (its `btf_trace_<name>` typedef), so that
//! the programs read the tracepoint's own arguments instead of the record the
//! kernel would otherwise build for a classic tracepoint program.
//!
//! The format is the kernel's stable ABI (Documentation/bpf/btf.rst): a
//! header, a type section (records of 12 bytes plus a kind-specific tail,
//! numbered from 1 in order) and a string section. aya parses BTF too but
//! keeps struct members private, hence this reader of the little it needs.

use std::ops::Range;
use std::path::Path;

const MAGIC: u16 = 0xeb9f;
const HEADER_LEN: usize = 24;
const TYPE_LEN: usize = 12;

const KIND_INT: u32 = 1;
const KIND_PTR: u32 = 2;
const KIND_ARRAY: u32 = 3;
const KIND_STRUCT: u32 = 4;
const KIND_UNION: u32 = 5;
const KIND_ENUM: u32 = 6;
const KIND_FWD: u32 = 7;
const KIND_TYPEDEF: u32 = 8;
const KIND_VOLATILE: u32 = 9;
const KIND_CONST: u32 = 10;
const KIND_RESTRICT: u32 = 11;
const KIND_FUNC: u32 = 12;
const KIND_FUNC_PROTO: u32 = 13;
const KIND_VAR: u32 = 14;
const KIND_DATASEC: u32 = 15;
const KIND_FLOAT: u32 = 16;
const KIND_DECL_TAG: u32 = 17;
const KIND_TYPE_TAG: u32 = 18;
const KIND_ENUM64: u32 = 19;

#[derive(Debug, thiserror::Error)]
pub enum BtfError {
    #[error("reading {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("not BTF in this machine's byte order (magic {0:#06x})")]
    Magic(u16),
    #[error("BTF truncated or malformed: {0}")]
    Malformed(String),
    #[error("BTF has no {0}")]
    Missing(String),
}

/// A tracepoint argument, as far as the programs care.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Arg {
    /// A pointer to `struct NAME`.
    StructPtr(String),
    /// An integer (or enum) of this many bytes.
    Int(u32),
    /// Anything else (described for error messages).
    Other(String),
}

/// One type record: where it starts, its kind, its `vlen` and its size/type.
#[derive(Clone, Copy)]
struct Type {
    at: usize,
    name: u32,
    kind: u32,
    vlen: usize,
    kind_flag: bool,
    size_or_type: u32,
}

/// The kernel's type information, parsed once.
pub struct KernelBtf {
    data: Vec<u8>,
    strings: Range<usize>,
    /// Type id `n` is `types[n - 1]`.
    types: Vec<Type>,
}

fn u32_at(data: &[u8], at: usize) -> Result<u32, BtfError> {
    data.get(at..at + 4)
        .map(|b| u32::from_ne_bytes(b.try_into().expect("4 bytes")))
        .ok_or_else(|| BtfError::Malformed(format!("read past the end at {at}")))
}

impl KernelBtf {
    /// The running kernel's BTF.
    pub fn from_sys_fs() -> Result<Self, BtfError> {
        Self::from_file(Path::new("/sys/kernel/btf/vmlinux"))
    }

    pub fn from_file(path: &Path) -> Result<Self, BtfError> {
        let data = std::fs::read(path).map_err(|source| BtfError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::parse(data)
    }

    pub fn parse(data: Vec<u8>) -> Result<Self, BtfError> {
        let magic = data
            .get(0..2)
            .map(|b| u16::from_ne_bytes([b[0], b[1]]))
            .ok_or_else(|| BtfError::Malformed("no header".into()))?;
        if magic != MAGIC {
            return Err(BtfError::Magic(magic));
        }
        let hdr_len = u32_at(&data, 4)? as usize;
        if hdr_len < HEADER_LEN {
            return Err(BtfError::Malformed(format!("header of {hdr_len} bytes")));
        }
        let section = |off: usize| -> Result<Range<usize>, BtfError> {
            let start = hdr_len + u32_at(&data, off)? as usize;
            let end = start + u32_at(&data, off + 4)? as usize;
            if end > data.len() {
                return Err(BtfError::Malformed(format!(
                    "section {start}..{end} past the end ({} bytes)",
                    data.len()
                )));
            }
            Ok(start..end)
        };
        let type_section = section(8)?;
        let strings = section(16)?;
        let mut types = Vec::new();
        let mut at = type_section.start;
        while at < type_section.end {
            let name = u32_at(&data, at)?;
            let info = u32_at(&data, at + 4)?;
            let size_or_type = u32_at(&data, at + 8)?;
            let kind = (info >> 24) & 0x1f;
            let vlen = (info & 0xffff) as usize;
            let tail = match kind {
                KIND_INT | KIND_VAR | KIND_DECL_TAG => 4,
                KIND_PTR | KIND_FWD | KIND_TYPEDEF | KIND_VOLATILE | KIND_CONST | KIND_RESTRICT
                | KIND_FUNC | KIND_FLOAT | KIND_TYPE_TAG => 0,
                KIND_ARRAY => 12,
                KIND_STRUCT | KIND_UNION | KIND_DATASEC | KIND_ENUM64 => 12 * vlen,
                KIND_ENUM | KIND_FUNC_PROTO => 8 * vlen,
                other => {
                    return Err(BtfError::Malformed(format!(
                        "unknown kind {other} (type {})",
                        types.len() + 1
                    )))
                }
            };
            types.push(Type {
                at,
                name,
                kind,
                vlen,
                kind_flag: info >> 31 == 1,
                size_or_type,
            });
            at += TYPE_LEN + tail;
        }
        if at != type_section.end {
            return Err(BtfError::Malformed(
                "the last type runs past its section".into(),
            ));
        }
        Ok(KernelBtf {
            data,
            strings,
            types,
        })
    }

    /// The raw BTF, for other parsers of the same data (aya's loader).
    pub fn bytes(&self) -> &[u8] {
        &self.data
    }

    fn name(&self, offset: u32) -> &str {
        let start = self.strings.start + offset as usize;
        let bytes = self.data.get(start..self.strings.end).unwrap_or_default();
        let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
        std::str::from_utf8(&bytes[..end]).unwrap_or("")
    }

    fn ty(&self, id: u32) -> Option<&Type> {
        id.checked_sub(1).and_then(|i| self.types.get(i as usize))
    }

    fn find(&self, kind: u32, name: &str) -> Option<u32> {
        self.types
            .iter()
            .position(|t| t.kind == kind && self.name(t.name) == name)
            .map(|i| i as u32 + 1)
    }

    /// Follows typedefs and qualifiers to the type they name.
    fn resolve(&self, mut id: u32) -> Option<&Type> {
        for _ in 0..32 {
            let t = self.ty(id)?;
            match t.kind {
                KIND_TYPEDEF | KIND_VOLATILE | KIND_CONST | KIND_RESTRICT | KIND_TYPE_TAG => {
                    id = t.size_or_type
                }
                _ => return Some(t),
            }
        }
        None
    }

    /// Byte offset of `member` in `struct name`, looking into anonymous
    /// structs and unions (the kernel nests many members in them).
    pub fn member_offset(&self, name: &str, member: &str) -> Result<u32, BtfError> {
        let id = self
            .find(KIND_STRUCT, name)
            .ok_or_else(|| BtfError::Missing(format!("struct {name}")))?;
        let bits = self
            .member_bits(id, member, 0)
            .ok_or_else(|| BtfError::Missing(format!("member {member} of struct {name}")))?;
        if bits % 8 != 0 {
            return Err(BtfError::Malformed(format!(
                "{name}.{member} is a bitfield (bit {bits})"
            )));
        }
        Ok(bits / 8)
    }

    fn member_bits(&self, id: u32, member: &str, depth: u32) -> Option<u32> {
        let t = self.resolve(id)?;
        if !matches!(t.kind, KIND_STRUCT | KIND_UNION) || depth > 8 {
            return None;
        }
        for i in 0..t.vlen {
            let at = t.at + TYPE_LEN + 12 * i;
            let name = u32_at(&self.data, at).ok()?;
            let ty = u32_at(&self.data, at + 4).ok()?;
            let raw = u32_at(&self.data, at + 8).ok()?;
            // With kind_flag the top byte holds a bitfield's width.
            let offset = if t.kind_flag { raw & 0x00ff_ffff } else { raw };
            if name == 0 {
                if let Some(inner) = self.member_bits(ty, member, depth + 1) {
                    return Some(offset + inner);
                }
            } else if self.name(name) == member {
                return Some(offset);
            }
        }
        None
    }

    /// The arguments of tracepoint `name` as a raw tracepoint program sees
    /// them (`TP_PROTO`, from the kernel's `btf_trace_<name>` typedef).
    pub fn tracepoint_args(&self, name: &str) -> Result<Vec<Arg>, BtfError> {
        let typedef = format!("btf_trace_{name}");
        let missing = || BtfError::Missing(format!("typedef {typedef}"));
        let id = self.find(KIND_TYPEDEF, &typedef).ok_or_else(missing)?;
        let ptr = self.resolve(id).ok_or_else(missing)?;
        let proto = (ptr.kind == KIND_PTR)
            .then(|| self.resolve(ptr.size_or_type))
            .flatten()
            .filter(|t| t.kind == KIND_FUNC_PROTO)
            .ok_or_else(|| BtfError::Malformed(format!("{typedef} is not a function pointer")))?;
        // The first parameter is the probe's `void *__data`.
        (1..proto.vlen)
            .map(|i| {
                let ty = u32_at(&self.data, proto.at + TYPE_LEN + 8 * i + 4)?;
                Ok(self.describe(ty))
            })
            .collect()
    }

    fn describe(&self, id: u32) -> Arg {
        let Some(t) = self.resolve(id) else {
            return Arg::Other(format!("type {id}"));
        };
        match t.kind {
            KIND_INT | KIND_ENUM | KIND_ENUM64 => Arg::Int(t.size_or_type),
            KIND_PTR => match self.resolve(t.size_or_type) {
                Some(p) if p.kind == KIND_STRUCT => Arg::StructPtr(self.name(p.name).to_owned()),
                _ => Arg::Other("pointer".into()),
            },
            kind => Arg::Other(format!("kind {kind}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Writes BTF the way the kernel lays it out.
    #[derive(Default)]
    struct Builder {
        types: Vec<u8>,
        strings: Vec<u8>,
        next_id: u32,
    }

    impl Builder {
        fn new() -> Self {
            Builder {
                strings: vec![0],
                next_id: 1,
                ..Default::default()
            }
        }
        fn string(&mut self, s: &str) -> u32 {
            if s.is_empty() {
                return 0;
            }
            let at = self.strings.len() as u32;
            self.strings.extend_from_slice(s.as_bytes());
            self.strings.push(0);
            at
        }
        fn ty(
            &mut self,
            name: &str,
            kind: u32,
            vlen: u32,
            flag: bool,
            size: u32,
            tail: &[u32],
        ) -> u32 {
            let name = self.string(name);
            let info = (u32::from(flag) << 31) | (kind << 24) | vlen;
            for v in [name, info, size].iter().chain(tail) {
                self.types.extend_from_slice(&v.to_ne_bytes());
            }
            self.next_id += 1;
            self.next_id - 1
        }
        fn int(&mut self, name: &str, size: u32) -> u32 {
            self.ty(name, KIND_INT, 0, false, size, &[size * 8])
        }
        fn structure(&mut self, name: &str, flag: bool, members: &[(&str, u32, u32)]) -> u32 {
            let mut tail = Vec::new();
            for (n, ty, off) in members {
                tail.extend([self.string(n), *ty, *off]);
            }
            self.ty(name, KIND_STRUCT, members.len() as u32, flag, 64, &tail)
        }
        fn finish(self) -> Vec<u8> {
            let mut out = Vec::new();
            out.extend_from_slice(&MAGIC.to_ne_bytes());
            out.extend_from_slice(&[1, 0]);
            for v in [
                HEADER_LEN as u32,
                0,
                self.types.len() as u32,
                self.types.len() as u32,
                self.strings.len() as u32,
            ] {
                out.extend_from_slice(&v.to_ne_bytes());
            }
            out.extend(self.types);
            out.extend(self.strings);
            out
        }
    }

    fn sample() -> KernelBtf {
        let mut b = Builder::new();
        let ulong = b.int("long unsigned int", 8);
        let pgoff = b.ty("pgoff_t", KIND_TYPEDEF, 0, false, ulong, &[]);
        let uint = b.int("unsigned int", 4);
        let sb = b.structure(
            "super_block",
            false,
            &[("s_list", ulong, 0), ("s_dev", uint, 128)],
        );
        let sb_ptr = b.ty("", KIND_PTR, 0, false, sb, &[]);
        // An anonymous union holding i_ino; kind_flag set on inode, so the
        // top byte of a member's offset is a bitfield width.
        let ino_name = b.string("i_ino");
        let union = b.ty("", KIND_UNION, 1, false, 8, &[ino_name, ulong, 0]);
        let inode = b.structure(
            "inode",
            true,
            &[
                ("i_mode", uint, 3 << 24),
                ("i_state", uint, (1 << 24) | 5),
                ("i_sb", sb_ptr, 40 * 8),
                ("", union, 64 * 8),
            ],
        );
        let inode_ptr = b.ty("", KIND_PTR, 0, false, inode, &[]);
        let mapping = b.structure("address_space", false, &[("host", inode_ptr, 0)]);
        let mapping_ptr = b.ty("", KIND_PTR, 0, false, mapping, &[]);
        let void_ptr = b.ty("", KIND_PTR, 0, false, 0, &[]);
        let (a, c, d, e) = (
            b.string("__data"),
            b.string("mapping"),
            b.string("index"),
            b.string("last_index"),
        );
        let proto = b.ty(
            "",
            KIND_FUNC_PROTO,
            4,
            false,
            0,
            &[a, void_ptr, c, mapping_ptr, d, pgoff, e, pgoff],
        );
        let proto_ptr = b.ty("", KIND_PTR, 0, false, proto, &[]);
        b.ty(
            "btf_trace_mm_filemap_get_pages",
            KIND_TYPEDEF,
            0,
            false,
            proto_ptr,
            &[],
        );
        KernelBtf::parse(b.finish()).unwrap()
    }

    #[test]
    fn member_offsets_through_anonymous_unions_and_bitfield_flags() {
        let btf = sample();
        assert_eq!(btf.member_offset("inode", "i_sb").unwrap(), 40);
        assert_eq!(btf.member_offset("inode", "i_ino").unwrap(), 64);
        assert_eq!(btf.member_offset("super_block", "s_dev").unwrap(), 16);
        assert_eq!(btf.member_offset("address_space", "host").unwrap(), 0);
        assert_eq!(btf.member_offset("inode", "i_mode").unwrap(), 0);
        assert!(matches!(
            btf.member_offset("inode", "i_state"),
            Err(BtfError::Malformed(_))
        ));
        assert!(matches!(
            btf.member_offset("inode", "i_nope"),
            Err(BtfError::Missing(_))
        ));
        assert!(matches!(
            btf.member_offset("dentry", "d_inode"),
            Err(BtfError::Missing(_))
        ));
    }

    #[test]
    fn tracepoint_arguments_from_the_typedef() {
        let btf = sample();
        assert_eq!(
            btf.tracepoint_args("mm_filemap_get_pages").unwrap(),
            [
                Arg::StructPtr("address_space".into()),
                Arg::Int(8),
                Arg::Int(8)
            ]
        );
        assert!(btf.tracepoint_args("mm_filemap_fault").is_err());
    }

    #[test]
    fn malformed_btf_is_refused() {
        assert!(matches!(
            KernelBtf::parse(vec![0; 30]),
            Err(BtfError::Magic(0))
        ));
        let mut good = Builder::new();
        good.int("int", 4);
        let mut bytes = good.finish();
        bytes.truncate(bytes.len() - 3);
        assert!(matches!(
            KernelBtf::parse(bytes),
            Err(BtfError::Malformed(_))
        ));
    }

    /// The running kernel, where it has BTF: the members the programs read.
    #[test]
    fn this_kernels_btf() {
        let Ok(btf) = KernelBtf::from_sys_fs() else {
            eprintln!("SKIP: no /sys/kernel/btf/vmlinux");
            return;
        };
        for (s, m) in [
            ("address_space", "host"),
            ("inode", "i_sb"),
            ("inode", "i_ino"),
            ("super_block", "s_dev"),
        ] {
            btf.member_offset(s, m).unwrap();
        }
        if let Ok(args) = btf.tracepoint_args("mm_filemap_get_pages") {
            assert_eq!(args[0], Arg::StructPtr("address_space".into()));
        }
    }
}
