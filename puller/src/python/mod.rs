//! What a starting Python program reads next, known from what it has read.
//!
//! Without a profile, a Python start waits for the link once per package
//! and extension module it imports, one after the other: each import is only
//! asked for when the module above it runs (numpy + pandas at 100 Mbit/s +
//! 20 ms: 73 such waits, 2.0 s of a 5.3 s start). But a module's compiled
//! code names the modules it imports at its top level: once a `.pyc` is
//! local, the files of those modules can be fetched together, and theirs in
//! turn as they arrive, so a start waits about once per level of its import
//! tree instead of once per module.
//!
//! - [`pyc`]: the top-level imports of a `.pyc`;
//! - this module: where those modules' files are in a layer
//!   ([`files_imported`]), the way Python's path-based import finds them;
//! - [`source`] and [`command`]: the imports of the main module a command
//!   line runs (`python3 -c CODE`, `-m MODULE`, a script), which has no
//!   `.pyc`;
//! - `fs` decides when to fetch them (on the open of a `.pyc`, or when an
//!   image's command is known).

pub mod command;
pub mod pyc;
pub mod source;

pub use pyc::{module_imports, Import, PycError};
pub use source::source_imports;

/// Files as the resolver needs them: one layer's, or a stack of layers'.
pub trait Layout {
    /// How a file is named to the caller.
    type Node: Copy + Eq;
    /// The file or directory at `path` (relative to the root, no leading
    /// `/`).
    fn find(&self, path: &str) -> Option<Self::Node>;
    /// The names (last path components) and nodes of the files in
    /// directory `path` whose names start with `prefix`.
    fn entries_starting_with(&self, path: &str, prefix: &str) -> Vec<(String, Self::Node)>;
}

/// A file an import will read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModuleFile<N> {
    /// A module's compiled code (whose own imports can be followed).
    Pyc(N),
    /// An extension module (a shared object the interpreter loads).
    Extension(N),
}

/// Where a directory comes in Python's search for top-level modules, if
/// it is searched: standard libraries (`lib/python3.N`) first, then their
/// `lib-dynload`, then `site-packages` / `dist-packages` (the order of
/// `sys.path`).
pub fn search_rank(dir: &str) -> Option<u8> {
    let (parent, name) = dir.rsplit_once('/').unwrap_or(("", dir));
    let parent_name = parent.rsplit('/').next().unwrap_or("");
    if parent_name == "lib" && is_python_dir(name) {
        Some(0)
    } else if name == "lib-dynload" {
        Some(1)
    } else if name == "site-packages" || name == "dist-packages" {
        Some(2)
    } else {
        None
    }
}

/// The directories among `dirs` that Python searches for top-level modules,
/// in the order it searches them (see [`search_rank`]).
pub fn search_roots<'a>(dirs: impl Iterator<Item = &'a str>) -> Vec<String> {
    let mut roots: Vec<(u8, String)> = dirs
        .filter_map(|d| search_rank(d).map(|r| (r, d.to_string())))
        .collect();
    // Stable: directories of one rank keep their order.
    roots.sort_by_key(|(r, _)| *r);
    roots.into_iter().map(|(_, d)| d).collect()
}

/// `python3.11` and the like.
fn is_python_dir(name: &str) -> bool {
    name.strip_prefix("python3.")
        .is_some_and(|v| !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()))
}

/// A `.pyc` in a `__pycache__` directory, by its path:
/// `DIR/__pycache__/STEM.TAG.pyc` (TAG: `cpython-311`, maybe `.opt-1`).
struct CachedModule<'a> {
    /// The directory of the module's source: its package, for relative
    /// imports, whether it is the package's `__init__` or not.
    dir: &'a str,
    tag: &'a str,
}

impl<'a> CachedModule<'a> {
    fn parse(path: &'a str) -> Option<Self> {
        let (cache_dir, file) = path.rsplit_once('/')?;
        let dir = match cache_dir.rsplit_once('/') {
            Some((dir, "__pycache__")) => dir,
            None if cache_dir == "__pycache__" => "",
            _ => return None,
        };
        let (_stem, tag) = file.strip_suffix(".pyc")?.split_once('.')?;
        Some(CachedModule { dir, tag })
    }

    /// The ABI part of the tag (`cpython-311`), which extension module names
    /// carry too.
    fn abi(&self) -> &'a str {
        self.tag.split('.').next().unwrap_or(self.tag)
    }
}

/// The path [`files_imported`] takes for a main module run from directory
/// `dir` (its `sys.path[0]`) by an interpreter of cache tag `tag`: where
/// its `.pyc` would be if Python cached one.
pub fn main_module_path(dir: &str, tag: &str) -> String {
    join(dir, &format!("__pycache__/__main__.{tag}.pyc"))
}

fn join(dir: &str, rest: &str) -> String {
    if dir.is_empty() {
        rest.to_string()
    } else {
        format!("{dir}/{rest}")
    }
}

/// The files that the imports of the module compiled at `pyc_path` will
/// read, in the order it imports them (each once): for every module an
/// import names (the packages on its way included, and the names after
/// `from x import` that are submodules), its `.pyc` or extension module,
/// found in the module's own package tree or in `roots` (see
/// [`search_roots`]). Modules `layout` does not have are left out: they are
/// fetched when read. Names come from a file anyone can push, but only ever
/// become lookups in `layout` (dots are path separators, empty parts are
/// dropped), never paths on the node.
pub fn files_imported<L: Layout>(
    layout: &L,
    roots: &[String],
    pyc_path: &str,
    imports: &[Import],
) -> Vec<ModuleFile<L::Node>> {
    let Some(this) = CachedModule::parse(pyc_path) else {
        return Vec::new();
    };
    // The package tree the module lives in: up from its directory while
    // directories are packages.
    let mut own_root = this.dir;
    while !own_root.is_empty() && layout.find(&join(own_root, "__init__.py")).is_some() {
        own_root = own_root.rsplit_once('/').map_or("", |(p, _)| p);
    }
    let itself = layout.find(pyc_path);
    let mut out = Vec::new();
    let mut push = |f: ModuleFile<L::Node>| {
        if !out.contains(&f) && Some(f.node()) != itself {
            out.push(f);
        }
    };
    for imp in imports {
        // Module paths (`a/b/c`) and where to look for them.
        let (base, name_path): (Option<String>, String) = if imp.level > 0 {
            // Relative: from the module's package (its directory), up
            // `level - 1` directories.
            let mut base = this.dir;
            for _ in 1..imp.level {
                base = match base.rsplit_once('/') {
                    Some((p, _)) => p,
                    None => "",
                };
            }
            (Some(base.to_string()), imp.name.replace('.', "/"))
        } else {
            (None, imp.name.replace('.', "/"))
        };
        let mut modules: Vec<String> = Vec::new();
        let parts: Vec<&str> = name_path.split('/').filter(|p| !p.is_empty()).collect();
        for k in 1..=parts.len() {
            modules.push(parts[..k].join("/"));
        }
        for f in &imp.fromlist {
            modules.push(if name_path.is_empty() {
                f.clone()
            } else {
                format!("{name_path}/{f}")
            });
        }
        let search: Vec<&str> = match &base {
            Some(b) => vec![b.as_str()],
            None => std::iter::once(own_root)
                .chain(roots.iter().map(String::as_str))
                .collect(),
        };
        for m in &modules {
            // The first root that has the module decides, as for Python
            // (even when it has no file to fetch here).
            if let Some(f) = search
                .iter()
                .find_map(|root| module_file(layout, &this, &join(root, m)))
                .flatten()
            {
                push(f);
            }
        }
    }
    out
}

/// The file Python loads for module path `path` (`root/a/b`): a package's
/// `__init__` `.pyc`, a module's `.pyc` (next to its source, as Python
/// requires), or an extension module of the same ABI (or the stable one).
/// `None`: no such module here; `Some(None)`: the module is here, without a
/// file to fetch ahead (source only).
fn module_file<L: Layout>(
    layout: &L,
    this: &CachedModule,
    path: &str,
) -> Option<Option<ModuleFile<L::Node>>> {
    if layout.find(&join(path, "__init__.py")).is_some() {
        return Some(
            layout
                .find(&join(
                    path,
                    &format!("__pycache__/__init__.{}.pyc", this.tag),
                ))
                .map(ModuleFile::Pyc),
        );
    }
    let (dir, name) = path.rsplit_once('/').unwrap_or(("", path));
    if layout.find(&format!("{path}.py")).is_some() {
        return Some(
            layout
                .find(&join(dir, &format!("__pycache__/{name}.{}.pyc", this.tag)))
                .map(ModuleFile::Pyc),
        );
    }
    let abi = this.abi();
    layout
        .entries_starting_with(dir, &format!("{name}."))
        .into_iter()
        .find(|(entry, _)| {
            let Some(middle) = entry
                .strip_prefix(name)
                .and_then(|e| e.strip_prefix('.'))
                .and_then(|e| e.strip_suffix(".so"))
            else {
                return false;
            };
            middle.is_empty()
                || middle == "abi3"
                || middle
                    .strip_prefix(abi)
                    .is_some_and(|platform| platform.is_empty() || platform.starts_with('-'))
        })
        .map(|(_, n)| Some(ModuleFile::Extension(n)))
}

impl<N: Copy> ModuleFile<N> {
    pub fn node(self) -> N {
        match self {
            ModuleFile::Pyc(n) | ModuleFile::Extension(n) => n,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    /// A layout from a list of file paths (directories implied).
    struct Paths(BTreeMap<String, usize>);

    impl Paths {
        fn new(files: &[&str]) -> Self {
            Paths(
                files
                    .iter()
                    .enumerate()
                    .map(|(i, p)| (p.to_string(), i))
                    .collect(),
            )
        }
        fn node(&self, path: &str) -> usize {
            self.0[path]
        }
    }

    impl Layout for Paths {
        type Node = usize;
        fn find(&self, path: &str) -> Option<usize> {
            self.0.get(path).copied()
        }
        fn entries_starting_with(&self, dir: &str, prefix: &str) -> Vec<(String, usize)> {
            let full = join(dir, prefix);
            self.0
                .range(full.clone()..)
                .take_while(|(p, _)| p.starts_with(&full))
                .filter(|(p, _)| !p[dir.len()..].trim_start_matches('/').contains('/'))
                .map(|(p, n)| (p.rsplit('/').next().unwrap().to_string(), *n))
                .collect()
        }
    }

    const SITE: &str = "usr/lib/python3/dist-packages";
    const STDLIB: &str = "usr/lib/python3.11";

    fn layer() -> Paths {
        let files = [
            "usr/lib/python3.11/re/__init__.py",
            "usr/lib/python3.11/re/__pycache__/__init__.cpython-311.pyc",
            "usr/lib/python3.11/json/__init__.py",
            "usr/lib/python3.11/lib-dynload/_json.cpython-311-x86_64-linux-gnu.so",
            "usr/lib/python3/dist-packages/pkg/__init__.py",
            "usr/lib/python3/dist-packages/pkg/__pycache__/__init__.cpython-311.pyc",
            "usr/lib/python3/dist-packages/pkg/core/__init__.py",
            "usr/lib/python3/dist-packages/pkg/core/__pycache__/__init__.cpython-311.pyc",
            "usr/lib/python3/dist-packages/pkg/core/frame.py",
            "usr/lib/python3/dist-packages/pkg/core/__pycache__/frame.cpython-311.pyc",
            "usr/lib/python3/dist-packages/pkg/core/_lib.cpython-311-x86_64-linux-gnu.so",
            "usr/lib/python3/dist-packages/pkg/core/_lib.cpython-310-x86_64-linux-gnu.so",
            "usr/lib/python3/dist-packages/pkg/core/_libx.cpython-311-x86_64-linux-gnu.so",
            "usr/lib/python3/dist-packages/pkg/util.py",
            "usr/lib/python3/dist-packages/pkg/__pycache__/util.cpython-311.pyc",
            "usr/lib/python3/dist-packages/pkg/orphan.cpython-311.pyc",
            "usr/lib/python3/dist-packages/pkg/__pycache__/stale.cpython-311.pyc",
            "usr/lib/python3/dist-packages/other/__init__.py",
            "usr/lib/python3/dist-packages/stable.abi3.so",
        ];
        Paths::new(&files)
    }

    fn import(level: u32, name: &str, fromlist: &[&str]) -> Import {
        Import {
            level,
            name: name.into(),
            fromlist: fromlist.iter().map(|s| s.to_string()).collect(),
        }
    }

    #[test]
    fn a_main_module_finds_its_own_directory_first_then_the_roots() {
        let mut files: Vec<String> = layer().0.into_keys().collect();
        files.push("app/helpers.py".into());
        files.push("app/__pycache__/helpers.cpython-311.pyc".into());
        let l = Paths::new(&files.iter().map(String::as_str).collect::<Vec<_>>());
        let roots = vec![STDLIB.to_string(), SITE.to_string()];
        let main = main_module_path("app", "cpython-311");
        assert_eq!(main, "app/__pycache__/__main__.cpython-311.pyc");
        let got = files_imported(
            &l,
            &roots,
            &main,
            &source_imports("import helpers, pkg.util\nfrom re import x"),
        );
        let n = |p: &str| l.node(p);
        assert_eq!(
            got,
            vec![
                ModuleFile::Pyc(n("app/__pycache__/helpers.cpython-311.pyc")),
                ModuleFile::Pyc(n(&format!(
                    "{SITE}/pkg/__pycache__/__init__.cpython-311.pyc"
                ))),
                ModuleFile::Pyc(n(&format!("{SITE}/pkg/__pycache__/util.cpython-311.pyc"))),
                ModuleFile::Pyc(n(&format!(
                    "{STDLIB}/re/__pycache__/__init__.cpython-311.pyc"
                ))),
            ]
        );
        // Run from the root (`python3 -c` with no working directory).
        let got = files_imported(
            &l,
            &roots,
            &main_module_path("", "cpython-311"),
            &source_imports("import re"),
        );
        assert_eq!(got.len(), 1);
    }

    #[test]
    fn roots_are_ordered_like_sys_path() {
        let dirs = [
            "usr/lib/python3/dist-packages",
            "usr/lib/python3.11/lib-dynload",
            "usr/lib/python3.11",
            "usr/lib/python3.11/site-packages",
            "opt/notlib/python3.11",
            "usr/lib/python3.x",
        ];
        assert_eq!(
            search_roots(dirs.into_iter()),
            vec![
                "usr/lib/python3.11",
                "usr/lib/python3.11/lib-dynload",
                "usr/lib/python3/dist-packages",
                "usr/lib/python3.11/site-packages",
            ]
        );
    }

    #[test]
    fn imports_resolve_like_the_path_based_finder() {
        let l = layer();
        let roots = vec![
            STDLIB.to_string(),
            format!("{STDLIB}/lib-dynload"),
            SITE.to_string(),
        ];
        let pkg_init = format!("{SITE}/pkg/__pycache__/__init__.cpython-311.pyc");
        let got = files_imported(
            &l,
            &roots,
            &pkg_init,
            &[
                // import re, json (json has no .pyc: nothing to fetch)
                import(0, "re", &[]),
                import(0, "json", &[]),
                import(0, "_json", &[]),
                // from .core import frame, _lib, DataFrame (not a module)
                import(1, "core", &["frame", "_lib", "DataFrame"]),
                // from . import util, stale (stale has no source: not loaded)
                import(1, "", &["util", "stale", "orphan"]),
                // import pkg.core again: each file once, the module itself never
                import(0, "pkg.core", &[]),
                // absent everywhere
                import(0, "missing.module", &[]),
                import(0, "stable", &[]),
            ],
        );
        let n = |p: &str| l.node(p);
        assert_eq!(
            got,
            vec![
                ModuleFile::Pyc(n(&format!(
                    "{STDLIB}/re/__pycache__/__init__.cpython-311.pyc"
                ))),
                ModuleFile::Extension(n(&format!(
                    "{STDLIB}/lib-dynload/_json.cpython-311-x86_64-linux-gnu.so"
                ))),
                ModuleFile::Pyc(n(&format!(
                    "{SITE}/pkg/core/__pycache__/__init__.cpython-311.pyc"
                ))),
                ModuleFile::Pyc(n(&format!(
                    "{SITE}/pkg/core/__pycache__/frame.cpython-311.pyc"
                ))),
                ModuleFile::Extension(n(&format!(
                    "{SITE}/pkg/core/_lib.cpython-311-x86_64-linux-gnu.so"
                ))),
                ModuleFile::Pyc(n(&format!("{SITE}/pkg/__pycache__/util.cpython-311.pyc"))),
                ModuleFile::Extension(n(&format!("{SITE}/stable.abi3.so"))),
            ]
        );
    }

    #[test]
    fn relative_imports_climb_from_the_module_and_absolute_ones_start_at_its_package_tree() {
        let l = layer();
        let frame = format!("{SITE}/pkg/core/__pycache__/frame.cpython-311.pyc");
        // from .. import util; from ._lib import x; import pkg (no roots
        // given: found through the module's own package tree).
        let got = files_imported(
            &l,
            &[],
            &frame,
            &[
                import(2, "", &["util"]),
                import(1, "_lib", &["x"]),
                import(0, "pkg", &[]),
                import(0, "re", &[]),
            ],
        );
        assert_eq!(
            got,
            vec![
                ModuleFile::Pyc(l.node(&format!("{SITE}/pkg/__pycache__/util.cpython-311.pyc"))),
                ModuleFile::Extension(l.node(&format!(
                    "{SITE}/pkg/core/_lib.cpython-311-x86_64-linux-gnu.so"
                ))),
                ModuleFile::Pyc(
                    l.node(&format!("{SITE}/pkg/__pycache__/__init__.cpython-311.pyc"))
                ),
            ]
        );
        // Not a cached module: nothing.
        assert!(files_imported(
            &l,
            &[],
            &format!("{SITE}/pkg/orphan.cpython-311.pyc"),
            &[import(0, "pkg", &[])]
        )
        .is_empty());
    }
}
