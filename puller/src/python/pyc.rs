//! The imports a compiled Python module (`.pyc`) runs at its top level.
//!
//! A `.pyc` is a 16-byte header (the interpreter's magic number first) and
//! the module's code object in CPython's `marshal` format. The module's own
//! bytecode imports with `LOAD_CONST level; LOAD_CONST fromlist;
//! IMPORT_NAME name`. Imports inside functions are in nested code objects and
//! run later, if ever; so are those of class bodies (which do run at import,
//! but rarely import anything): neither is reported. Imports under a
//! condition are (a branch not taken costs a fetch, not a wrong answer).
//!
//! The reader is written for this one question, not taken from a marshal
//! crate: the bytes come from images anyone can push and are parsed by a
//! privileged daemon, so every length is checked against the bytes left
//! before anything is allocated, nesting is bounded, and objects the question
//! does not need (numbers, sets, dicts' contents) are skipped without
//! building them. Formats: CPython 3.8 to 3.13 (the code object's fields
//! changed in 3.11, the opcode numbers in 3.13); other versions are refused.

use std::rc::Rc;

/// An import statement a module runs at its top level.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Import {
    /// Leading dots of a relative import (`from ..x import y`: 2).
    pub level: u32,
    /// The dotted module name after the dots (empty for `from . import y`).
    pub name: String,
    /// The names after `import` in `from x import a, b` (`*` left out).
    pub fromlist: Vec<String>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PycError {
    #[error("not a .pyc of a CPython version this reader knows (magic {0})")]
    UnknownMagic(u16),
    #[error("the .pyc ends inside an object")]
    Truncated,
    #[error("the .pyc is malformed: {0}")]
    Malformed(&'static str),
    #[error("the .pyc nests objects deeper than {MAX_DEPTH}")]
    TooDeep,
}

/// Deeper nesting than any compiler writes (CPython's own limit is 2000, for
/// code no one writes either); a bound for hostile input.
const MAX_DEPTH: usize = 256;
/// More objects than any module has; a bound for hostile input (every object
/// costs at least one byte, so this also bounds the references table).
const MAX_OBJECTS: usize = 4 << 20;

/// CPython minor version (3.x) of a `.pyc`'s magic number: each release owns
/// a range of numbers, from its first alpha to its final.
fn minor_version(magic: u16) -> Option<u8> {
    Some(match magic {
        3400..=3419 => 8,
        3420..=3429 => 9,
        3430..=3449 => 10,
        3450..=3499 => 11,
        3500..=3549 => 12,
        3550..=3599 => 13,
        _ => return None,
    })
}

/// The imports that module `pyc` (a whole `.pyc` file) runs at its top
/// level, in the order it runs them.
pub fn module_imports(pyc: &[u8]) -> Result<Vec<Import>, PycError> {
    if pyc.len() < 16 {
        return Err(PycError::Truncated);
    }
    let magic = u16::from_le_bytes([pyc[0], pyc[1]]);
    if &pyc[2..4] != b"\r\n" {
        return Err(PycError::UnknownMagic(magic));
    }
    let minor = minor_version(magic).ok_or(PycError::UnknownMagic(magic))?;
    let mut r = Reader {
        data: &pyc[16..],
        at: 0,
        minor,
        refs: Vec::new(),
        depth: 0,
        objects: 0,
    };
    match r.object()? {
        Obj::Code(code) => Ok(imports_of(&code, minor)),
        _ => Err(PycError::Malformed("the module is not a code object")),
    }
}

/// A code object: the fields the question needs.
#[derive(Debug)]
struct Code {
    bytecode: Rc<[u8]>,
    consts: Rc<[Obj]>,
    names: Rc<[Obj]>,
}

/// A marshalled object, as far as imports need it.
#[derive(Debug, Clone)]
enum Obj {
    None,
    Int(i64),
    Str(Rc<str>),
    Bytes(Rc<[u8]>),
    Tuple(Rc<[Obj]>),
    Code(Rc<Code>),
    /// Anything else (numbers, sets, dicts, ...): read past, not kept.
    Other,
}

struct Reader<'a> {
    data: &'a [u8],
    at: usize,
    minor: u8,
    /// Objects flagged for reference, by index (`TYPE_REF` points here).
    refs: Vec<Obj>,
    depth: usize,
    objects: usize,
}

/// `FLAG_REF` on a type byte: the object goes into the references table.
const FLAG_REF: u8 = 0x80;

impl<'a> Reader<'a> {
    fn bytes(&mut self, n: usize) -> Result<&'a [u8], PycError> {
        let end = self.at.checked_add(n).ok_or(PycError::Truncated)?;
        let s = self.data.get(self.at..end).ok_or(PycError::Truncated)?;
        self.at = end;
        Ok(s)
    }

    fn u8(&mut self) -> Result<u8, PycError> {
        Ok(self.bytes(1)?[0])
    }

    fn i32(&mut self) -> Result<i32, PycError> {
        let b = self.bytes(4)?;
        Ok(i32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    /// A count or length: checked to fit into the bytes left (each element
    /// takes at least `unit` bytes), so that no hostile count allocates.
    fn len(&mut self, unit: usize) -> Result<usize, PycError> {
        let n = self.i32()?;
        let n = usize::try_from(n).map_err(|_| PycError::Malformed("negative length"))?;
        if n.saturating_mul(unit) > self.data.len() - self.at {
            return Err(PycError::Truncated);
        }
        Ok(n)
    }

    fn object(&mut self) -> Result<Obj, PycError> {
        self.depth += 1;
        self.objects += 1;
        if self.depth > MAX_DEPTH {
            return Err(PycError::TooDeep);
        }
        if self.objects > MAX_OBJECTS {
            return Err(PycError::Malformed("too many objects"));
        }
        let r = self.object_inner();
        self.depth -= 1;
        r
    }

    fn object_inner(&mut self) -> Result<Obj, PycError> {
        let byte = self.u8()?;
        let flagged = byte & FLAG_REF != 0;
        // A flagged object's index is taken before its contents are read
        // (containers and code objects reserve it first; leaves have no
        // contents), so the table's order is the order objects start in.
        let slot = flagged.then(|| {
            self.refs.push(Obj::Other);
            self.refs.len() - 1
        });
        let obj = match byte & !FLAG_REF {
            b'0' => return Err(PycError::Malformed("NULL outside a dict")),
            b'N' => Obj::None,
            b'F' | b'T' | b'S' | b'.' => Obj::Other,
            b'i' => Obj::Int(i64::from(self.i32()?)),
            b'l' => {
                // Arbitrary precision: 15-bit digits, sign in the count.
                let n = self.i32()?;
                let digits = n.unsigned_abs() as usize;
                let raw = self.bytes(digits.checked_mul(2).ok_or(PycError::Truncated)?)?;
                let mut v: i64 = 0;
                let mut fits = digits <= 4;
                for d in raw.chunks_exact(2).rev() {
                    let d = i64::from(u16::from_le_bytes([d[0], d[1]]));
                    if d >= 1 << 15 {
                        return Err(PycError::Malformed("long digit out of range"));
                    }
                    v = match v.checked_mul(1 << 15).and_then(|v| v.checked_add(d)) {
                        Some(v) => v,
                        None => {
                            fits = false;
                            0
                        }
                    };
                }
                match (fits, n < 0) {
                    (true, false) => Obj::Int(v),
                    (true, true) => Obj::Int(-v),
                    (false, _) => Obj::Other,
                }
            }
            b'g' => {
                self.bytes(8)?;
                Obj::Other
            }
            b'y' => {
                self.bytes(16)?;
                Obj::Other
            }
            b'f' => {
                let n = usize::from(self.u8()?);
                self.bytes(n)?;
                Obj::Other
            }
            b'x' => {
                for _ in 0..2 {
                    let n = usize::from(self.u8()?);
                    self.bytes(n)?;
                }
                Obj::Other
            }
            b's' => {
                let n = self.len(1)?;
                Obj::Bytes(Rc::from(self.bytes(n)?))
            }
            b'u' | b't' | b'a' | b'A' => {
                let n = self.len(1)?;
                Obj::Str(text(self.bytes(n)?))
            }
            b'z' | b'Z' => {
                let n = usize::from(self.u8()?);
                Obj::Str(text(self.bytes(n)?))
            }
            b'(' => {
                let n = self.len(1)?;
                self.tuple(n)?
            }
            b')' => {
                let n = usize::from(self.u8()?);
                self.tuple(n)?
            }
            b'[' | b'<' | b'>' => {
                let n = self.len(1)?;
                for _ in 0..n {
                    self.object()?;
                }
                Obj::Other
            }
            b'{' => {
                // Key, value, key, value, ... up to a NULL key.
                loop {
                    if self.data.get(self.at) == Some(&b'0') {
                        self.at += 1;
                        break;
                    }
                    self.object()?;
                    self.object()?;
                }
                Obj::Other
            }
            b'r' => {
                let i = usize::try_from(self.i32()?)
                    .map_err(|_| PycError::Malformed("negative reference"))?;
                return self
                    .refs
                    .get(i)
                    .cloned()
                    .ok_or(PycError::Malformed("reference to an object not read yet"));
            }
            b'c' => Obj::Code(Rc::new(self.code()?)),
            _ => return Err(PycError::Malformed("unknown object type")),
        };
        if let Some(i) = slot {
            self.refs[i] = obj.clone();
        }
        Ok(obj)
    }

    fn tuple(&mut self, n: usize) -> Result<Obj, PycError> {
        let mut items = Vec::with_capacity(n);
        for _ in 0..n {
            items.push(self.object()?);
        }
        Ok(Obj::Tuple(items.into()))
    }

    /// A code object's fields, in the order of `marshal.c` for the version.
    fn code(&mut self) -> Result<Code, PycError> {
        // argcount, posonlyargcount, kwonlyargcount, [nlocals before 3.11,]
        // stacksize, flags.
        let ints = if self.minor >= 11 { 5 } else { 6 };
        for _ in 0..ints {
            self.i32()?;
        }
        let bytecode = match self.object()? {
            Obj::Bytes(b) => b,
            _ => return Err(PycError::Malformed("bytecode is not bytes")),
        };
        let consts = match self.object()? {
            Obj::Tuple(t) => t,
            _ => return Err(PycError::Malformed("constants are not a tuple")),
        };
        let names = match self.object()? {
            Obj::Tuple(t) => t,
            _ => return Err(PycError::Malformed("names are not a tuple")),
        };
        // 3.11+: localsplusnames, localspluskinds, filename, name, qualname;
        // before: varnames, freevars, cellvars, filename, name.
        for _ in 0..5 {
            self.object()?;
        }
        self.i32()?; // firstlineno
                     // 3.11+: linetable, exceptiontable; before: lnotab (or linetable).
        let tables = if self.minor >= 11 { 2 } else { 1 };
        for _ in 0..tables {
            self.object()?;
        }
        Ok(Code {
            bytecode,
            consts,
            names,
        })
    }
}

/// A marshalled string: UTF-8 (lone surrogates, which Python allows, are
/// replaced; they never name a module file).
fn text(b: &[u8]) -> Rc<str> {
    Rc::from(String::from_utf8_lossy(b).as_ref())
}

/// Opcode numbers: (LOAD_CONST, IMPORT_NAME, EXTENDED_ARG).
fn opcodes(minor: u8) -> (u8, u8, u8) {
    if minor >= 13 {
        (83, 75, 71)
    } else {
        (100, 108, 144)
    }
}

/// The `IMPORT_NAME` instructions of a module's own bytecode, with the two
/// constants loaded right before each (level, fromlist).
fn imports_of(code: &Code, minor: u8) -> Vec<Import> {
    let (load_const, import_name, extended_arg) = opcodes(minor);
    let mut out = Vec::new();
    // The constants of the last two instructions, if they were LOAD_CONSTs.
    let mut last: [Option<&Obj>; 2] = [None, None];
    let mut ext: u32 = 0;
    for unit in code.bytecode.chunks_exact(2) {
        let (op, arg) = (unit[0], (ext << 8) | u32::from(unit[1]));
        if op == extended_arg {
            ext = arg;
            continue;
        }
        ext = 0;
        if op == import_name {
            let name = match code.names.get(arg as usize) {
                Some(Obj::Str(s)) => s.to_string(),
                _ => {
                    last = [None, None];
                    continue;
                }
            };
            let level = match last[0] {
                Some(Obj::Int(l)) => u32::try_from(*l).unwrap_or(0),
                _ => 0,
            };
            let fromlist = match last[1] {
                Some(Obj::Tuple(t)) => t
                    .iter()
                    .filter_map(|o| match o {
                        Obj::Str(s) if &**s != "*" => Some(s.to_string()),
                        _ => None,
                    })
                    .collect(),
                _ => Vec::new(),
            };
            out.push(Import {
                level,
                name,
                fromlist,
            });
        }
        let loaded = (op == load_const)
            .then(|| code.consts.get(arg as usize))
            .flatten();
        last = [last[1], loaded];
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A `.pyc` of CPython 3.`minor` whose module code is `bytecode` with
    /// `consts` and `names`, marshalled by hand the way `marshal.c` lays a
    /// code object out for that version.
    pub(crate) fn synthetic_pyc(
        minor: u8,
        bytecode: &[u8],
        consts: &[u8],
        names: &[&str],
    ) -> Vec<u8> {
        let magic: u16 = match minor {
            8 => 3413,
            9 => 3425,
            10 => 3439,
            11 => 3495,
            12 => 3531,
            13 => 3571,
            _ => unreachable!(),
        };
        let mut v = magic.to_le_bytes().to_vec();
        v.extend_from_slice(b"\r\n");
        v.extend_from_slice(&[0; 12]);
        v.push(b'c' | FLAG_REF);
        let ints = if minor >= 11 { 5 } else { 6 };
        for _ in 0..ints {
            v.extend_from_slice(&0i32.to_le_bytes());
        }
        v.push(b's');
        v.extend_from_slice(&(bytecode.len() as i32).to_le_bytes());
        v.extend_from_slice(bytecode);
        v.extend_from_slice(consts);
        v.push(b')');
        v.push(names.len() as u8);
        for n in names {
            v.push(b'Z' | FLAG_REF);
            v.push(n.len() as u8);
            v.extend_from_slice(n.as_bytes());
        }
        // Five objects (names, kinds or vars, filename, name, ...).
        for _ in 0..5 {
            v.extend_from_slice(b")\x00");
        }
        v.extend_from_slice(&1i32.to_le_bytes());
        let tables = if minor >= 11 { 2 } else { 1 };
        for _ in 0..tables {
            v.extend_from_slice(b"s\x00\x00\x00\x00");
        }
        v
    }

    /// Constants (0, None, ('a', '*'), 1, ('x',)) as a small tuple.
    fn consts() -> Vec<u8> {
        let mut c = b")\x05".to_vec();
        c.extend_from_slice(b"i\x00\x00\x00\x00N");
        c.extend_from_slice(b")\x02Z\x01aZ\x01*");
        c.extend_from_slice(b"i\x01\x00\x00\x00");
        c.extend_from_slice(b")\x01Z\x01x");
        c
    }

    #[test]
    fn every_known_version_reads_its_own_layout_and_opcodes() {
        for minor in 8..=13 {
            let (lc, imp, ext) = opcodes(minor);
            // import os.path; from pkg import a, *; from . import x
            // (the last one's name index needs EXTENDED_ARG: 0x100 + 2 is
            // out of range, so it is read as index 258 and skipped; then the
            // same without it).
            let bytecode = [
                lc, 0, lc, 1, imp, 0, // import os.path
                lc, 0, lc, 2, imp, 1, // from pkg import a, *
                lc, 3, lc, 4, ext, 1, imp, 2, // bad index: skipped
                lc, 3, lc, 4, imp, 2, // from . import x
            ];
            let pyc = synthetic_pyc(minor, &bytecode, &consts(), &["os.path", "pkg", ""]);
            let got = module_imports(&pyc).unwrap_or_else(|e| panic!("3.{minor}: {e}"));
            assert_eq!(
                got,
                vec![
                    Import {
                        level: 0,
                        name: "os.path".into(),
                        fromlist: vec![]
                    },
                    Import {
                        level: 0,
                        name: "pkg".into(),
                        fromlist: vec!["a".into()]
                    },
                    Import {
                        level: 1,
                        name: "".into(),
                        fromlist: vec!["x".into()]
                    },
                ],
                "3.{minor}"
            );
        }
    }

    #[test]
    fn other_versions_and_non_pyc_files_are_refused() {
        let mut pyc = synthetic_pyc(11, &[], b")\x00", &[]);
        assert!(module_imports(&pyc).unwrap().is_empty());
        pyc[0..2].copy_from_slice(&3600u16.to_le_bytes());
        assert_eq!(module_imports(&pyc), Err(PycError::UnknownMagic(3600)));
        assert_eq!(
            module_imports(b"\x7fELF\x02\x01\x01\0\0\0\0\0\0\0\0\0"),
            Err(PycError::UnknownMagic(0x457f))
        );
        assert_eq!(module_imports(b"short"), Err(PycError::Truncated));
    }

    #[test]
    fn hostile_lengths_and_nesting_are_errors_not_allocations() {
        let header = synthetic_pyc(11, &[], b")\x00", &[])[..16].to_vec();
        let with = |body: &[u8]| {
            let mut v = header.clone();
            v.extend_from_slice(body);
            module_imports(&v)
        };
        // A tuple of two billion items in a few bytes.
        assert_eq!(with(b"(\xff\xff\xff\x7f"), Err(PycError::Truncated));
        assert!(with(b"s\xff\xff\xff\xff").is_err());
        // Nesting beyond the bound.
        assert_eq!(with(&[b')', 1].repeat(10_000)), Err(PycError::TooDeep));
        // A reference to an object that was never read.
        assert!(matches!(
            with(b"r\x05\x00\x00\x00"),
            Err(PycError::Malformed(_))
        ));
        // Every truncation of a valid file is an error, never a panic.
        let pyc = synthetic_pyc(12, &[100, 0, 100, 1, 108, 0], &consts(), &["os"]);
        for n in 0..pyc.len() {
            assert!(module_imports(&pyc[..n]).is_err(), "cut at {n}");
        }
        assert!(module_imports(&pyc).is_ok());
    }
}

/// Against `.pyc` files that the machine's own CPython compiles.
#[cfg(test)]
mod cpython_tests {
    use super::*;

    fn compile(source: &str) -> Vec<u8> {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("m.py");
        let out = dir.path().join("m.pyc");
        std::fs::write(&src, source).unwrap();
        let status = std::process::Command::new("python3")
            .args(["-c", "import py_compile, sys; py_compile.compile(sys.argv[1], cfile=sys.argv[2], doraise=True)"])
            .arg(&src)
            .arg(&out)
            .status()
            .expect("python3 is needed for this test (`cargo xtask setup` installs it)");
        assert!(
            status.success(),
            "python3 failed to compile the test module"
        );
        std::fs::read(out).unwrap()
    }

    fn names(imports: &[Import]) -> Vec<(u32, &str, Vec<&str>)> {
        imports
            .iter()
            .map(|i| {
                (
                    i.level,
                    i.name.as_str(),
                    i.fromlist.iter().map(String::as_str).collect(),
                )
            })
            .collect()
    }

    #[test]
    fn top_level_imports_of_a_real_module_in_the_order_they_run() {
        // Many names first, so that later ones need EXTENDED_ARG; constants
        // and code objects shared through marshal references.
        let mut source = String::new();
        for i in 0..300 {
            source.push_str(&format!("v{i} = {i}.5\n"));
        }
        source.push_str(
            r#"
import os, os.path as osp
from collections import OrderedDict, abc
from . import sibling
from ..parent.mod import thing, other
from .pkg import *
try:
    import ujson as json
except ImportError:
    import json
TYPE_CHECKING = False
if TYPE_CHECKING:
    import typing_only
def later():
    import inside_a_function
class K:
    import in_a_class_body
x = {1: "a", "b": (1.5, 2j, 10**30, -7, frozenset({1}), [None, True, ...])}
import zlib
"#,
        );
        let got = module_imports(&compile(&source)).unwrap();
        assert_eq!(
            names(&got),
            vec![
                (0, "os", vec![]),
                (0, "os.path", vec![]),
                (0, "collections", vec!["OrderedDict", "abc"]),
                (1, "", vec!["sibling"]),
                (2, "parent.mod", vec!["thing", "other"]),
                (1, "pkg", vec![]),
                (0, "ujson", vec![]),
                (0, "json", vec![]),
                (0, "typing_only", vec![]),
                (0, "zlib", vec![]),
            ]
        );
    }

    #[test]
    fn mutated_real_modules_never_panic() {
        let pyc = compile("import a\nfrom b import c\nx = (1, 'two', 3.0, b'4', {5: [6]})\n");
        assert_eq!(module_imports(&pyc).unwrap().len(), 2);
        // Deterministic mutations: every byte, a few values each.
        for at in 16..pyc.len() {
            for v in [0u8, 0x7f, 0x80, 0xff, b'r', b'(', b'c'] {
                let mut m = pyc.clone();
                m[at] = v;
                let _ = module_imports(&m);
            }
        }
    }
}
