//! Fetching what a program being loaded will load next, before the loader
//! or the interpreter asks: the modules a Python module imports as soon as
//! its `.pyc` is opened (see [`crate::python`] for why), the libraries an
//! ELF object needs as soon as it is opened (see [`crate::elf`]), and
//! theirs in turn as they arrive.
//!
//! The first open (or, without opens, the first read) of a `.pyc`, of a
//! file named as a shared library, or of a file that starts as an ELF
//! object starts it. Names are resolved in this layer and in the layers
//! below it in the image (set by whoever stacks them:
//! [`super::LayerSlot::set_lowers`]), the upper one first, as overlayfs
//! shows them (whiteouts are not looked at: a module an upper layer deletes
//! costs a useless fetch, not a wrong read). Every file is followed or
//! fetched once per mount. Compiled modules are fetched whole. ELF objects
//! (extension modules, the libraries they need, found as the dynamic loader
//! finds them, symbolic links followed) get their head first, then what the
//! loader reads to link them (symbol tables, relocations) and their
//! writable segments, which its relocations touch first but which lie at
//! their end, and the rest alongside, in pieces, if at most
//! [`OBJECT_WHOLE_MAX`] compressed bytes are missing (a command's program:
//! [`super::MAPPED_FETCH_MAX`]); their libraries are followed as soon as
//! their dynamic section is local. Nothing is followed from a file that a
//! prefetch profile holds, nor fetched if the profile holds it, even once
//! the profile's work is done: the recorded start read it, and read what it
//! needed next, which the profile holds too; what its imports name beyond
//! that are guesses (numpy-pandas with a profile: 3.8 MB of them beside the
//! start's last reads, 27.4 -> 23.6 MB). A start that reads what its
//! profile does not hold (another command of the image) has that followed.
//!
//! numpy-pandas at 100 Mbit/s + 20 ms without a profile: 5.3 s before, 3.96 s
//! with all of it (see docs/puller.md, "Following imports").

mod command;

use std::collections::HashSet;
use std::sync::{Arc, Mutex, OnceLock, Weak};

use sluice_format::chunked::NodeKind;
use tokio::sync::Semaphore;

use super::tree::Tree;
use super::Ready;
use crate::elf;
use crate::layer::RemoteLayer;
use crate::python::{self, ModuleFile};

/// A file fetched ahead, by what is followed once it is local.
#[derive(Debug, Clone, Copy)]
enum Kind {
    /// A compiled Python module: its imports.
    Module,
    /// An ELF object (extension module, library): its libraries.
    Object,
    /// The program a command runs: an object too, whose start runs much of
    /// its code (fetched whole up to [`super::MAPPED_FETCH_MAX`]).
    Program,
    /// Any other file read whole (a script): nothing.
    Data,
    /// A file the container runtime reads before the program runs (see
    /// `command::RUNTIME_FILES`): fetched even beside a profile, whose
    /// work has not begun by the time it is read.
    Runtime,
}

/// Files fetched ahead at once, per layer: most are small, and on a slow
/// link each is mostly a round trip. numpy-pandas at 100 Mbit/s + 20 ms
/// (medians of 3): 4.25 s with 8, 3.96 s with 16, 3.95 s with 32.
const IN_FLIGHT: usize = 16;

/// Compiled modules larger than this are not read for their imports.
const PYC_MAX: u64 = 16 << 20;

/// The first bytes of an ELF object: its header and program headers.
const ELF_HEAD: u64 = 4096;
/// How far before a faulting page the kernel reads a mapped file (half of
/// its read-around window, with room to spare).
const READ_AROUND: u64 = 128 << 10;

/// An object fetched whole is asked for in requests of about this many
/// compressed bytes, all at once.
const WHOLE_PIECE: u64 = 512 << 10;

/// An ELF object followed ahead of the loader is fetched whole when at most
/// this many compressed bytes of it are missing; a bigger one gets what the
/// loader reads to link it, and its code's pages as they fault (a start
/// touches little of a big library: numpy-pandas read 0.4 of LAPACK's
/// 3.9 MB, and fetched 0.6 of it with this limit instead of 8 MiB).
const OBJECT_WHOLE_MAX: u64 = 1 << 20;

/// One layer as imports are resolved in it.
pub(super) struct LayerView {
    layer: Arc<RemoteLayer>,
    tree: Arc<Tree>,
    /// Where top-level modules are found in this layer (found on first use).
    roots: OnceLock<Vec<String>>,
}

impl LayerView {
    fn roots(&self) -> &[String] {
        self.roots.get_or_init(|| {
            python::search_roots(
                self.layer
                    .index()
                    .nodes()
                    .iter()
                    .filter(|n| matches!(n.kind, NodeKind::Dir))
                    .map(|n| n.path.as_str()),
            )
        })
    }
}

/// The layers under the mount that are below it in an image (weak: a
/// lower layer unmounted is skipped).
pub(super) type Lowers = Arc<Mutex<Vec<Weak<Ready>>>>;

/// A file of some layer of a stack.
type StackNode = (usize, usize);

/// Layers, the upper one first, as one tree.
struct Stack(Vec<Arc<LayerView>>);

impl Stack {
    /// Where top-level Python modules are found in any of the layers, in
    /// the order of `sys.path`.
    fn roots(&self) -> Vec<String> {
        let mut roots: Vec<String> = Vec::new();
        for v in &self.0 {
            for r in v.roots() {
                if !roots.contains(r) {
                    roots.push(r.clone());
                }
            }
        }
        roots.sort_by_key(|r| python::search_rank(r));
        roots
    }

    /// The file at `path` with symbolic links followed (in any component,
    /// as the kernel would in the container: absolute ones from the image's
    /// root), `..` included.
    fn resolve(&self, path: &str) -> Option<StackNode> {
        let mut todo: std::collections::VecDeque<String> =
            path.split('/').map(str::to_string).collect();
        let mut parts: Vec<String> = Vec::new();
        let mut hops = 0;
        while let Some(c) = todo.pop_front() {
            match c.as_str() {
                "" | "." => continue,
                ".." => {
                    parts.pop();
                    continue;
                }
                _ => parts.push(c),
            }
            let (k, n) = python::Layout::find(self, &parts.join("/"))?;
            if let NodeKind::Symlink(target) = &self.0[k].layer.index().node(n).kind {
                hops += 1;
                if hops > 16 {
                    return None;
                }
                parts.pop();
                if target.starts_with('/') {
                    parts.clear();
                }
                for t in target.split('/').rev() {
                    todo.push_front(t.to_string());
                }
            }
        }
        let (k, n) = python::Layout::find(self, &parts.join("/"))?;
        let index = self.0[k].layer.index();
        matches!(index.node(index.resolve(n)).kind, NodeKind::File { .. }).then_some((k, n))
    }
}

impl python::Layout for Stack {
    type Node = StackNode;

    fn find(&self, path: &str) -> Option<StackNode> {
        self.0
            .iter()
            .enumerate()
            .find_map(|(k, v)| v.layer.index().lookup(path).map(|n| (k, n)))
    }

    fn entries_starting_with(&self, path: &str, prefix: &str) -> Vec<(String, StackNode)> {
        let mut out: Vec<(String, StackNode)> = Vec::new();
        for (k, v) in self.0.iter().enumerate() {
            let index = v.layer.index();
            let Some(dir) = index.lookup(path).and_then(|d| v.tree.dir(d)) else {
                continue;
            };
            for &n in &dir.entries {
                let node = index.node(n as usize);
                let Some(name) = node.path.rsplit('/').next() else {
                    continue;
                };
                let is_file =
                    matches!(node.kind, NodeKind::File { .. } | NodeKind::Hardlink { .. });
                if is_file && name.starts_with(prefix) && !out.iter().any(|(e, _)| e == name) {
                    out.push((name.to_string(), (k, n as usize)));
                }
            }
        }
        out
    }
}

pub(super) struct ImportLookahead {
    own: Arc<LayerView>,
    lowers: Lowers,
    runtime: tokio::runtime::Handle,
    /// Files whose imports were followed, or fetched for an import: by
    /// layer (its address) and node.
    seen: Mutex<HashSet<(usize, usize)>>,
    permits: Arc<Semaphore>,
}

fn key(view: &LayerView, node: usize) -> (usize, usize) {
    (
        Arc::as_ptr(&view.layer) as usize,
        view.layer.index().resolve(node),
    )
}

impl ImportLookahead {
    pub(super) fn new(
        layer: Arc<RemoteLayer>,
        tree: Arc<Tree>,
        lowers: Lowers,
        runtime: tokio::runtime::Handle,
    ) -> Arc<Self> {
        Arc::new(ImportLookahead {
            own: Arc::new(LayerView {
                layer,
                tree,
                roots: OnceLock::new(),
            }),
            lowers,
            runtime,
            seen: Mutex::new(HashSet::new()),
            permits: Arc::new(Semaphore::new(IN_FLIGHT)),
        })
    }

    /// This layer, then those below it that are served now.
    fn stack(&self) -> Stack {
        let mut layers = vec![self.own.clone()];
        let lowers: Vec<Weak<Ready>> = self.lowers.lock().expect("lowers").clone();
        for lower in lowers {
            let Some(ready) = lower.upgrade() else {
                continue;
            };
            if let Some(Ok(fs)) = ready.fs.get() {
                if let Some(imports) = &fs.imports {
                    layers.push(imports.own.clone());
                }
            }
        }
        Stack(layers)
    }

    /// File `node` was opened (or read from its start): if it is a compiled
    /// Python module, the modules it imports are fetched while it runs; if
    /// it is named as a shared library, see [`Self::elf_opened`].
    pub(super) fn opened(self: &Arc<Self>, node: usize) {
        let layer = &self.own.layer;
        let path = &layer.index().node(node).path;
        let name = path.rsplit('/').next().unwrap_or(path);
        if name.ends_with(".so") || name.contains(".so.") {
            return self.elf_opened(node);
        }
        if !name.ends_with(".pyc") || layer.in_profile(node) {
            return;
        }
        if !self.seen.lock().expect("seen").insert(key(&self.own, node)) {
            return;
        }
        let this = self.clone();
        self.runtime.spawn(async move {
            // Its opener is fetching it; this waits for the same chunks.
            let own = this.own.clone();
            if own
                .layer
                .ensure(own.layer.index().file_chunks_of(node))
                .await
                .is_ok()
            {
                this.follow(&own, node);
            }
        });
    }

    /// Starts fetching the files that the imports of `.pyc` `node` of
    /// `view` (local by now) will read.
    fn follow(self: &Arc<Self>, view: &Arc<LayerView>, node: usize) {
        let index = view.layer.index();
        let size = match index.node(index.resolve(node)).kind {
            NodeKind::File { size, .. } => size,
            _ => return,
        };
        // Read into memory whole: not a generated module of gigabytes.
        if size > PYC_MAX {
            return;
        }
        let Some(bytes) = view.layer.cached_file(node) else {
            return;
        };
        let path = &index.node(node).path;
        let imports = match python::module_imports(&bytes) {
            Ok(i) => i,
            Err(e) => {
                tracing::debug!(file = %path, error = %e, "imports of a .pyc not followed");
                return;
            }
        };
        let stack = self.stack();
        let roots = stack.roots();
        let files = python::files_imported(&stack, &roots, path, &imports);
        let files = files
            .into_iter()
            .map(|f| match f {
                ModuleFile::Pyc(at) => (at, Kind::Module),
                ModuleFile::Extension(at) => (at, Kind::Object),
            })
            .collect();
        self.fetch_all(&stack, files, path, "following imports");
    }

    /// ELF object `node` was read from its start (a program being started,
    /// a library being loaded): its writable segments are fetched, and the
    /// libraries it needs, while the loader is on its way to them.
    pub(super) fn elf_opened(self: &Arc<Self>, node: usize) {
        if self.own.layer.in_profile(node)
            || !self.seen.lock().expect("seen").insert(key(&self.own, node))
        {
            return;
        }
        let (this, own) = (self.clone(), self.own.clone());
        self.runtime
            .spawn(async move { this.load_object(&own, node, false).await });
    }

    /// Ahead of the loader, for ELF object `node` of `view`: its head, then
    /// its writable segments (with the kernel's read-around before them)
    /// and, if `whole`, the rest alongside; the libraries it needs are
    /// followed as soon as its dynamic section and strings are local.
    /// Returns once everything asked for is local (or failed).
    async fn load_object(self: &Arc<Self>, view: &Arc<LayerView>, node: usize, whole: bool) {
        let layer = &view.layer;
        let index = layer.index();
        let all = index.file_chunks_of(node);
        // In pieces, each its own request: one range of megabytes shares
        // the link with every other request in flight (each import's), so
        // its far end comes last, and the loader faults there early.
        let rest = async {
            if whole {
                let pieces =
                    crate::prefetch::pieces(all.iter().cloned(), WHOLE_PIECE, |c| c.blob_len);
                futures_util::future::join_all(pieces.iter().map(|p| layer.ensure(p))).await;
            }
        };
        let head = index.chunks_for_range(node, 0, ELF_HEAD);
        let object = match layer.ensure(head).await {
            Ok(()) => layer
                .cached_range(node, 0, ELF_HEAD)
                .and_then(|h| elf::Object::from_head(&h)),
            Err(_) => None,
        };
        let Some(object) = object else {
            return rest.await;
        };
        let writable: Vec<_> = object
            .writable_ranges()
            .into_iter()
            .flat_map(|(o, l)| {
                let from = o.saturating_sub(READ_AROUND);
                index.chunks_for_range(node, from, l + (o - from))
            })
            .chain(
                object
                    .link_ranges()
                    .into_iter()
                    .flat_map(|(o, l)| index.chunks_for_range(node, o, l)),
            )
            .cloned()
            .collect();
        let libraries = async {
            let part = |(o, l): (u64, u64)| async move {
                layer
                    .ensure(index.chunks_for_range(node, o, l))
                    .await
                    .ok()?;
                layer.cached_range(node, o, l)
            };
            let dynamic = object.dynamic(&part(object.dynamic_range()?).await?)?;
            let strings = part(dynamic.strings).await?;
            Some(dynamic.needs(&strings))
        };
        // Claimed in this order: the writable segments' chunks are theirs,
        // the rest's request does not take them again.
        let (_, needs, _) = tokio::join!(layer.ensure(&writable), libraries, rest);
        if let Some(needs) = needs {
            self.follow_libraries(view, node, &needs);
        }
    }

    /// Starts fetching the libraries that ELF object `node` of `view` needs.
    fn follow_libraries(self: &Arc<Self>, view: &Arc<LayerView>, node: usize, needs: &elf::Needs) {
        let path = &view.layer.index().node(node).path;
        let stack = self.stack();
        let dirs = elf::search_dirs(needs, path);
        let files = needs
            .libraries
            .iter()
            .filter_map(|lib| {
                if lib.contains('/') {
                    return None;
                }
                dirs.iter()
                    .find_map(|d| stack.resolve(&format!("{d}/{lib}")))
                    .map(|at| (at, Kind::Object))
            })
            .collect();
        self.fetch_all(&stack, files, path, "following libraries");
    }

    /// Fetches `files` of `stack` (found for `path`) that were not yet.
    fn fetch_all(
        self: &Arc<Self>,
        stack: &Stack,
        files: Vec<(StackNode, Kind)>,
        path: &str,
        what: &'static str,
    ) {
        let found = files.len();
        let mut seen = self.seen.lock().expect("seen");
        let new: Vec<(Arc<LayerView>, usize, Kind)> = files
            .into_iter()
            .filter_map(|((k, n), kind)| {
                let v = &stack.0[k];
                seen.insert(key(v, n)).then(|| (v.clone(), n, kind))
            })
            .collect();
        drop(seen);
        tracing::debug!(file = %path, found, fetching = new.len(), "{what}");
        for (v, node, kind) in new {
            let this = self.clone();
            self.runtime
                .spawn(async move { this.fetch(v, node, kind).await });
        }
    }

    /// Fetches one file (in the order they were found, at most
    /// [`IN_FLIGHT`] at once), then follows its imports or libraries.
    async fn fetch(self: Arc<Self>, view: Arc<LayerView>, node: usize, kind: Kind) {
        let Ok(permit) = self.permits.clone().acquire_owned().await else {
            return;
        };
        let layer = &view.layer;
        if layer.in_profile(node) && !matches!(kind, Kind::Runtime) {
            return;
        }
        let chunks = layer.index().file_chunks_of(node);
        let missing = layer.not_yet_fetched(chunks);
        // An object too big to fetch whole gets its head, link tables,
        // writable segments and libraries only; a module that big
        // (generated code) nothing.
        let limit = match kind {
            Kind::Object => OBJECT_WHOLE_MAX,
            Kind::Program | Kind::Module | Kind::Data | Kind::Runtime => super::MAPPED_FETCH_MAX,
        };
        let whole = missing.iter().map(|c| c.blob_len).sum::<u64>() <= limit;
        if !whole && !matches!(kind, Kind::Object | Kind::Program) {
            return;
        }
        if whole && !missing.is_empty() {
            layer.count_fetched_ahead(&missing);
            layer
                .stats
                .followed_files
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        match kind {
            Kind::Module => {
                // Waits for chunks others fetch too: followed once local.
                if let Err(e) = layer.ensure(chunks).await {
                    tracing::debug!(error = %e, "fetch for an import failed; reads fetch on demand");
                    return;
                }
                drop(permit);
                self.follow(&view, node);
            }
            Kind::Object | Kind::Program => {
                self.load_object(&view, node, whole).await;
                drop(permit);
            }
            Kind::Data | Kind::Runtime => {
                let _ = layer.ensure(chunks).await;
            }
        }
    }
}
