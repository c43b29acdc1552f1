//! What an image's command loads first, fetched before its container
//! exists.
//!
//! Following imports starts at the first file a program opens; before that
//! a start without a profile waits for the program itself, its dynamic
//! loader and its libraries one after the other (each known only once the
//! previous is mapped), then for the first module its main code imports.
//! But the image's configuration names the command (see
//! [`crate::image::StartCommand`]), and the pull is done before the
//! container is created and started: so when the image's top layer is
//! mounted, the command's program is found as the container would find it
//! (`PATH`, symbolic links, `#!` lines, `env`), and fetched as an ELF
//! object is when it is opened (head, writable segments, the rest, its
//! libraries) together with its loader (`PT_INTERP`). When the program is
//! a Python interpreter, its main module's imports (`-c CODE`, `-m MODULE`
//! or a script, see [`crate::python::command`]) and the `encodings`
//! package it reads at start are followed as a `.pyc`'s are. Files every
//! such start reads first are fetched with them (see [`start_data`]).

use std::sync::Arc;

use sluice_format::chunked::NodeKind;

use super::{ImportLookahead, Kind, Stack, StackNode, ELF_HEAD};
use crate::elf;
use crate::image::StartCommand;
use crate::python::{self, command::Main, Import, ModuleFile};

/// Files of an image that the container runtime reads before the image's
/// program runs, in every start: containerd reads `/etc/group` as it builds
/// a container's spec (its additional groups, even with no user set), runc
/// `/etc/passwd` and `/etc/group` for the user. containerd's read comes
/// before the container exists, so no recording of a start holds it, and a
/// profile's prefetch has not begun by then: each was a round trip the
/// start waited for (busybox at 100 Mbit/s + 20 ms: 21–30 ms, every run).
const RUNTIME_FILES: [&str; 2] = ["etc/passwd", "etc/group"];

/// `#!` lines (and `env`) followed at most this many times.
const INDIRECTIONS: usize = 4;

/// Modules a Python interpreter imports from files before its main module
/// runs (CPython 3.11 and later have the rest of their start frozen in the
/// interpreter; older ones also read `site`).
fn startup_modules(tag: &str) -> Vec<Import> {
    let minor: u32 = tag
        .strip_prefix("cpython-3")
        .and_then(|m| m.parse().ok())
        .unwrap_or(0);
    // `site` imports `sitecustomize` (Debian has one) and `usercustomize`.
    let mut names = vec![
        "encodings",
        "encodings.utf_8",
        "sitecustomize",
        "usercustomize",
    ];
    if minor < 11 {
        names.push("site");
    }
    names
        .into_iter()
        .map(|n| Import {
            level: 0,
            name: n.to_string(),
            fromlist: Vec::new(),
        })
        .collect()
}

/// Files (paths in the image) that the start of a program reads before
/// its own code does: the dynamic loader's cache (glibc's `ld.so` reads it
/// before any library, for a `dynamic` program), and for a `python`
/// interpreter in the C locale (`locale`: none set, `C` or `POSIX`, which
/// CPython coerces to C.UTF-8, PEP 538) or in C.UTF-8 itself what glibc
/// loads for it. Each was a round trip of its own in a numpy-pandas start,
/// one after the other.
fn start_data(
    dynamic: bool,
    python: bool,
    multiarch: Option<&str>,
    locale: Option<&str>,
) -> Vec<String> {
    let mut out = Vec::new();
    if dynamic {
        out.push("etc/ld.so.cache".to_string());
    }
    let c_utf8 = match locale {
        None | Some("C" | "POSIX") => true,
        Some(l) => l.eq_ignore_ascii_case("C.UTF-8") || l.eq_ignore_ascii_case("C.utf8"),
    };
    if python && c_utf8 {
        out.push("usr/lib/locale/C.utf8/LC_CTYPE".to_string());
        out.push("usr/lib/locale/C.UTF-8/LC_CTYPE".to_string());
        if let Some(m) = multiarch {
            out.push(format!("usr/lib/{m}/gconv/gconv-modules.cache"));
        }
    }
    out
}

/// `dir/name` as the kernel would look it up from the image's root, as a
/// path in the layers (no leading `/`).
fn join_path(dir: &str, name: &str) -> String {
    if name.starts_with('/') {
        name.trim_start_matches('/').to_string()
    } else {
        format!("{}/{name}", dir.trim_matches('/'))
            .trim_start_matches('/')
            .to_string()
    }
}

/// The program `name` as `execvp` finds it: a path (from the working
/// directory if relative), or the first match in `PATH`.
fn find_program(stack: &Stack, name: &str, cmd: &StartCommand) -> Option<StackNode> {
    if name.contains('/') {
        return stack.resolve(&join_path(&cmd.working_dir, name));
    }
    cmd.path
        .iter()
        .filter(|d| d.starts_with('/'))
        .find_map(|d| stack.resolve(&join_path(d, name)))
}

/// A `#!` line: the interpreter and its one optional argument (Linux
/// passes the rest of the line as one argument).
fn shebang(head: &[u8]) -> Option<(String, Option<String>)> {
    let line = head.strip_prefix(b"#!")?;
    let line = &line[..line.iter().position(|&b| b == b'\n')?];
    let line = std::str::from_utf8(line).ok()?.trim();
    let (interp, arg) = match line.split_once([' ', '\t']) {
        Some((i, a)) => (i, Some(a.trim().to_string()).filter(|a| !a.is_empty())),
        None => (line, None),
    };
    interp.starts_with('/').then(|| (interp.to_string(), arg))
}

impl ImportLookahead {
    /// Fetches the [`RUNTIME_FILES`] of the image (this layer and its
    /// lowers), with or without a profile.
    pub(in crate::fs) fn start_runtime_files(self: &Arc<Self>) {
        let stack = self.stack();
        let files = RUNTIME_FILES
            .iter()
            .filter_map(|p| stack.resolve(p))
            .map(|at| (at, Kind::Runtime))
            .collect();
        self.fetch_all(
            &stack,
            files,
            "/",
            "fetching what the container runtime reads",
        );
    }

    /// Starts fetching what `cmd` loads first (see the module's comment).
    pub(in crate::fs) fn start_command(self: &Arc<Self>, cmd: StartCommand) {
        if self.own.layer.profiled() {
            return;
        }
        let this = self.clone();
        self.runtime
            .spawn(async move { this.run_command(cmd).await });
    }

    async fn run_command(self: Arc<Self>, cmd: StartCommand) {
        let stack = self.stack();
        let mut argv = cmd.argv.clone();
        for _ in 0..INDIRECTIONS {
            let Some((k, node)) = find_program(&stack, &argv[0], &cmd) else {
                tracing::debug!(program = %argv[0], "the image's command is not in its layers");
                return;
            };
            let layer = &stack.0[k].layer;
            let index = layer.index();
            if layer
                .ensure(index.chunks_for_range(node, 0, ELF_HEAD))
                .await
                .is_err()
            {
                return;
            }
            let Some(head) = layer.cached_range(node, 0, ELF_HEAD) else {
                return;
            };
            let path = index.node(node).path.clone();
            if let Some((interp, arg)) = shebang(&head) {
                // The script is read by its interpreter: fetched whole.
                self.fetch_all(
                    &stack,
                    vec![((k, node), Kind::Data)],
                    &path,
                    "starting the image's command",
                );
                // The kernel hands the interpreter the path it executed;
                // Python puts the script's real directory first in its path.
                let script = format!("/{path}");
                let mut next = vec![interp.clone()];
                next.extend(arg);
                if interp.rsplit('/').next() == Some("env") {
                    // `env [-S] [VAR=value…] program args`
                    next = next[1..]
                        .iter()
                        .flat_map(|a| a.split_whitespace())
                        .filter(|a| !a.starts_with('-') && !a.contains('='))
                        .map(str::to_string)
                        .collect();
                    if next.is_empty() {
                        return;
                    }
                }
                next.push(script);
                next.extend(argv[1..].iter().cloned());
                argv = next;
                continue;
            }
            let Some(object) = elf::Object::from_head(&head) else {
                tracing::debug!(program = %path, "the image's command is neither ELF nor #!");
                return;
            };
            let mut files = vec![((k, node), Kind::Program)];
            let loader = object.interpreter(&head);
            if let Some(at) = loader
                .as_ref()
                .and_then(|l| stack.resolve(&join_path("/", l)))
            {
                files.push((at, Kind::Object));
            }
            let name = path.rsplit('/').next().unwrap_or(&path);
            let tag = python::command::cache_tag(name);
            let data = start_data(
                loader.is_some(),
                tag.is_some(),
                object.multiarch(),
                cmd.locale.as_deref(),
            );
            files.extend(
                data.iter()
                    .filter_map(|p| stack.resolve(p))
                    .map(|at| (at, Kind::Data)),
            );
            self.fetch_all(&stack, files, &path, "starting the image's command");
            if let Some(tag) = tag {
                self.start_python(&stack, &tag, &argv[1..], &cmd).await;
            }
            return;
        }
    }

    /// Follows the imports of the main module of `python3 ARGS`.
    async fn start_python(
        self: &Arc<Self>,
        stack: &Stack,
        tag: &str,
        args: &[String],
        cmd: &StartCommand,
    ) {
        let mut imports = startup_modules(tag);
        let dir = match python::command::main_of(args) {
            Some(Main::Code(code)) => {
                imports.extend(python::source_imports(&code));
                cmd.working_dir.clone()
            }
            Some(Main::Module(m)) => {
                imports.push(Import {
                    level: 0,
                    name: format!("{m}.__main__"),
                    fromlist: Vec::new(),
                });
                imports.push(Import {
                    level: 0,
                    name: m,
                    fromlist: Vec::new(),
                });
                cmd.working_dir.clone()
            }
            Some(Main::Script(script)) => {
                let path = join_path(&cmd.working_dir, &script);
                if let Some(source) = self.script_source(stack, &path).await {
                    imports.extend(python::source_imports(&source));
                }
                match path.rsplit_once('/') {
                    Some((dir, _)) => dir.to_string(),
                    None => String::new(),
                }
            }
            None => String::new(),
        };
        let main = python::main_module_path(dir.trim_matches('/'), tag);
        let roots = stack.roots();
        let files = python::files_imported(stack, &roots, &main, &imports)
            .into_iter()
            .map(|f| match f {
                ModuleFile::Pyc(at) => (at, Kind::Module),
                ModuleFile::Extension(at) => (at, Kind::Object),
            })
            .collect();
        self.fetch_all(stack, files, &main, "following the command's imports");
    }

    /// The source of script `path` (fetched now), if it is one.
    async fn script_source(&self, stack: &Stack, path: &str) -> Option<String> {
        let (k, node) = stack.resolve(path)?;
        let layer = &stack.0[k].layer;
        let index = layer.index();
        let NodeKind::File { size, .. } = index.node(index.resolve(node)).kind else {
            return None;
        };
        if size > python::source::SOURCE_MAX as u64 {
            return None;
        }
        layer.ensure(index.file_chunks_of(node)).await.ok()?;
        let bytes = layer.cached_file(node)?;
        Some(String::from_utf8_lossy(&bytes).into_owned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shebang_lines() {
        assert_eq!(
            shebang(b"#!/usr/bin/env python3 -u\nimport x"),
            Some(("/usr/bin/env".into(), Some("python3 -u".into())))
        );
        assert_eq!(shebang(b"#! /bin/sh\n"), Some(("/bin/sh".into(), None)));
        assert_eq!(
            shebang(b"#!/bin/sh"),
            None,
            "a line past the head is not read"
        );
        assert_eq!(shebang(b"#!sh\n"), None);
        assert_eq!(shebang(b"\x7fELF"), None);
    }

    #[test]
    fn paths_from_the_working_directory() {
        assert_eq!(join_path("/", "/usr/bin/python3"), "usr/bin/python3");
        assert_eq!(join_path("/app", "run.py"), "app/run.py");
        assert_eq!(join_path("/", "run.py"), "run.py");
        assert_eq!(join_path("/app/", "bin/run"), "app/bin/run");
    }

    #[test]
    fn interpreters_before_3_11_also_read_site() {
        let names = |t| {
            startup_modules(t)
                .into_iter()
                .map(|i| i.name)
                .collect::<Vec<_>>()
        };
        let always = [
            "encodings",
            "encodings.utf_8",
            "sitecustomize",
            "usercustomize",
        ];
        assert_eq!(names("cpython-311"), always);
        assert_eq!(names("cpython-39")[..4], always);
        assert_eq!(names("cpython-39")[4], "site");
    }

    #[test]
    fn what_a_start_reads_before_the_program_runs() {
        assert_eq!(start_data(false, false, None, None), Vec::<String>::new());
        assert_eq!(start_data(true, false, None, None), ["etc/ld.so.cache"]);
        let python = start_data(true, true, Some("x86_64-linux-gnu"), Some("POSIX"));
        assert!(python.contains(&"usr/lib/locale/C.utf8/LC_CTYPE".to_string()));
        assert!(python.contains(&"usr/lib/x86_64-linux-gnu/gconv/gconv-modules.cache".to_string()));
        assert_eq!(
            python,
            start_data(true, true, Some("x86_64-linux-gnu"), Some("C.UTF-8"))
        );
        // A locale of its own: not known here.
        assert_eq!(start_data(true, true, None, Some("en_US.UTF-8")).len(), 1);
    }
}
