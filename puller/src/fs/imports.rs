//! Fetching the modules a Python module imports as soon as its `.pyc` is
//! opened, and theirs as they arrive (see [`crate::python`] for why).
//!
//! The first open (or, without opens, the first read) of a `.pyc` starts it.
//! Imports are resolved in this layer and in the layers below it in the
//! image (set by whoever stacks them: [`super::LayerSlot::set_lowers`]), the
//! upper one first, as overlayfs shows them (whiteouts are not looked at: a
//! module an upper layer deletes costs a useless fetch, not a wrong read).
//! Every file is followed or fetched once. Compiled modules are fetched
//! whole, extension modules whole when at most [`super::MAPPED_FETCH_MAX`]
//! compressed bytes are missing (the loader maps them and faults their
//! pages in one round trip at a time otherwise). Nothing starts while a
//! layer's prefetch profile is pending: it knows better.

use std::collections::HashSet;
use std::sync::{Arc, Mutex, OnceLock, Weak};

use sluice_format::chunked::NodeKind;
use tokio::sync::Semaphore;

use super::tree::Tree;
use super::Ready;
use crate::layer::RemoteLayer;
use crate::python::{self, ModuleFile};

/// Files fetched for imports at once, per layer: enough to keep a slow
/// link's round trips overlapped, few enough that the file a start needs
/// next does not share the link with dozens of others.
const IN_FLIGHT: usize = 8;

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
    /// Python module, the modules it imports are fetched while it runs.
    pub(super) fn opened(self: &Arc<Self>, node: usize) {
        let layer = &self.own.layer;
        if !layer.index().node(node).path.ends_with(".pyc") || layer.profile_pending() {
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
        let mut roots: Vec<String> = Vec::new();
        for v in &stack.0 {
            for r in v.roots() {
                if !roots.contains(r) {
                    roots.push(r.clone());
                }
            }
        }
        roots.sort_by_key(|r| python::search_rank(r));
        let files = python::files_imported(&stack, &roots, path, &imports);
        let mut seen = self.seen.lock().expect("seen");
        let new: Vec<(Arc<LayerView>, ModuleFile<usize>)> = files
            .into_iter()
            .filter_map(|f| {
                let (k, n) = f.node();
                let v = &stack.0[k];
                let f = match f {
                    ModuleFile::Pyc(_) => ModuleFile::Pyc(n),
                    ModuleFile::Extension(_) => ModuleFile::Extension(n),
                };
                seen.insert(key(v, n)).then(|| (v.clone(), f))
            })
            .collect();
        drop(seen);
        tracing::debug!(file = %path, imports = imports.len(), fetching = new.len(), "following imports");
        for (v, f) in new {
            let this = self.clone();
            self.runtime.spawn(async move { this.fetch(v, f).await });
        }
    }

    /// Fetches one imported file (in the order imports were found, at most
    /// [`IN_FLIGHT`] at once), then follows its own imports.
    async fn fetch(self: Arc<Self>, view: Arc<LayerView>, f: ModuleFile<usize>) {
        let Ok(permit) = self.permits.clone().acquire_owned().await else {
            return;
        };
        let layer = &view.layer;
        if layer.profile_pending() || self.own.layer.profile_pending() {
            return;
        }
        let node = f.node();
        let chunks = layer.index().file_chunks_of(node);
        let missing = layer.not_yet_fetched(chunks);
        if let ModuleFile::Extension(_) = f {
            if missing.iter().map(|c| c.blob_len).sum::<u64>() > super::MAPPED_FETCH_MAX {
                return;
            }
        }
        if !missing.is_empty() {
            layer.count_fetched_ahead(&missing);
            layer
                .stats
                .python_import_files
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        // Waits for chunks others fetch too: a module is followed once local.
        if let Err(e) = layer.ensure(chunks).await {
            tracing::debug!(error = %e, "fetch for an import failed; reads fetch on demand");
            return;
        }
        drop(permit);
        if let ModuleFile::Pyc(_) = f {
            self.follow(&view, node);
        }
    }
}
