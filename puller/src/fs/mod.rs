//! A read-only FUSE filesystem of one lazy layer, built from its index alone:
//! the tree is there at once, file bytes are fetched on first read.
//!
//! - Inodes: the layer root is 1; node `i` of the index is `i + 2`; hard links
//!   share their target's inode.
//! - OCI whiteouts become what overlayfs expects of a lower layer: `.wh.NAME`
//!   is shown as a 0:0 character device `NAME`, and `.wh..wh..opq` hides itself
//!   and marks its directory opaque (`trusted.overlay.opaque=y`).
//! - The layer is immutable, so entries and attributes are cached by the kernel
//!   for a long time and file pages are kept across opens. Round trips that a
//!   starting program would wait for are avoided: symlink targets are cached,
//!   directories open without a request, and a layer without extended
//!   attributes tells the kernel so once (overlayfs asks every entry).
//! - Requests are served by several threads; reads block only their thread.
//! - Passthrough (kernel ≥ 6.9): opening a file of 1 MiB or more that is
//!   local hands the kernel the cached file itself, so reads never reach this
//!   daemon again; smaller files are fetched whole at open and served from the
//!   cache's packs (see `cache`). Detected at mount; without it, reads are
//!   served from the chunk cache, and files are opened by the kernel without
//!   asking (an `OPEN` and a `RELEASE` less per file).

use std::collections::{HashMap, HashSet};
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::sync::{Mutex, Weak};
use std::time::{Duration, UNIX_EPOCH};

use fuser::{
    BackingId, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo,
    InitFlags, KernelConfig, LockOwner, MountOption, OpenFlags, ReplyAttr, ReplyData,
    ReplyDirectory, ReplyDirectoryPlus, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs, ReplyXattr,
    Request,
};
use sluice_format::chunked::NodeKind;

use crate::layer::{ReadData, RemoteLayer};
use crate::oldest_first::OldestFirst;

mod imports;
pub(crate) mod tree;
use tree::shown_name;
pub use tree::{Dir, Tree};

/// How long the kernel may cache entries and attributes: the layer never changes.
const TTL: Duration = Duration::from_secs(3600);
const OPAQUE_XATTR: &str = "trusted.overlay.opaque";

/// How a layer is served.
#[derive(Clone)]
pub struct FsOptions {
    /// Use FUSE passthrough when the kernel has it.
    pub passthrough: bool,
    /// With passthrough on, files up to this size are fetched whole when
    /// opened (then passed through if they are 1 MiB or more, else served
    /// by the daemon from the cache's packs); larger ones are fetched by the
    /// ranges that are read.
    pub open_fetch_max: u64,
    /// A local file up to this size that is not yet one whole-file cache
    /// entry is copied into one at open, which then waits (tens of
    /// milliseconds); a larger one is copied in the background while the
    /// daemon serves its opens from the chunks.
    pub whole_at_open_max: u64,
    /// Threads serving requests.
    pub threads: usize,
    /// Fetch what a program being loaded will load next: the modules an
    /// opened Python module imports, the libraries an ELF object needs
    /// (see `fs/imports.rs`).
    pub follow_imports: bool,
    /// Told about reads and passthrough backing files (access recording).
    pub observer: Option<Arc<dyn crate::trace::AccessObserver>>,
}

impl std::fmt::Debug for FsOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FsOptions")
            .field("passthrough", &self.passthrough)
            .field("open_fetch_max", &self.open_fetch_max)
            .field("whole_at_open_max", &self.whole_at_open_max)
            .field("threads", &self.threads)
            .field("follow_imports", &self.follow_imports)
            .field("observer", &self.observer.is_some())
            .finish()
    }
}

impl Default for FsOptions {
    fn default() -> Self {
        FsOptions {
            passthrough: true,
            open_fetch_max: 1 << 20,
            whole_at_open_max: 64 << 20,
            threads: 4,
            follow_imports: true,
            observer: None,
        }
    }
}

/// How far ahead of a sequential reader chunks are fetched.
const READAHEAD: u64 = 8 << 20;
/// Files at least this big read to their end carry readahead on into the
/// next files of the layer.
const STREAM_MIN: u64 = 1 << 20;
/// Whole-file mappings kept between reads through the daemon (see
/// [`Backing::held_maps`]).
const HELD_MAPS_MAX: usize = 8;
/// Largest read the kernel sends us (and its readahead window).
const MAX_READAHEAD: u32 = 1 << 20;

/// A directory whose second file had to be fetched has the rest of its files
/// fetched, when they are at most this many compressed bytes in all (see
/// [`LayerFs::fetch_neighbours`]).
const DIRECTORY_FETCH_MAX: u64 = 4 << 20;

/// At most this many missing compressed bytes of a mapped object are fetched
/// at once (see [`LayerFs::fetch_mapped_object`]).
const MAPPED_FETCH_MAX: u64 = 8 << 20;
/// Local files up to this size have their bytes pushed into the kernel's
/// page cache at open, when they are not passed through.
const STORE_AT_OPEN_MAX: u64 = 128 * 1024;

/// Per-inode sequential-read tracking.
#[derive(Default, Clone, Copy)]
struct Stream {
    /// Where the last read ended.
    last_end: u64,
    /// Up to where readahead has been requested.
    ahead_until: u64,
    /// An ELF object (mapped by the loader): no readahead.
    mapped: bool,
    /// Reads of a mapped object past its start that had to wait.
    faults: u32,
}

/// Backing files handed to the kernel, one per inode while open.
///
/// Open files by how the kernel serves them. The kernel refuses (EIO) a
/// passthrough open of an inode that has opens served through the page
/// cache, and the reverse; so an inode stays in the mode of its first open
/// until its last open is released, and every passthrough open of an inode
/// uses the same backing file.
#[derive(Default)]
struct Backing {
    by_handle: HashMap<u64, Arc<BackingId>>,
    by_ino: HashMap<u64, Weak<BackingId>>,
    /// Daemon-served opens: handle → content node, and counts per node.
    cached_by_handle: HashMap<u64, u64>,
    cached_opens: HashMap<u64, u32>,
    /// Whole-file mappings being read through the daemon, by content node:
    /// mapping a large file again for every read (and tearing it down after)
    /// cost more than copying the data. Dropped when a read reaches the
    /// file's end or its last daemon-served open is released, and at most
    /// [`HELD_MAPS_MAX`] of them, oldest dropped first (without opens, the
    /// kernel never says when a reader is done).
    held_maps: OldestFirst<u64, Arc<memmap2::Mmap>, HELD_MAPS_MAX>,
}

impl Backing {
    /// The passthrough file of an inode with passthrough opens.
    fn live(&self, content: u64) -> Option<Arc<BackingId>> {
        self.by_ino.get(&content).and_then(Weak::upgrade)
    }

    fn has_cached_opens(&self, content: u64) -> bool {
        self.cached_opens.get(&content).is_some_and(|n| *n > 0)
    }
}

/// The FUSE view of a layer.
pub struct LayerFs {
    layer: Arc<RemoteLayer>,
    runtime: tokio::runtime::Handle,
    tree: Arc<Tree>,
    /// What the kernel agreed to at `INIT`.
    kernel: Arc<Negotiated>,
    options: FsOptions,
    backing: Mutex<Backing>,
    next_fh: AtomicU64,
    streams: Mutex<HashMap<usize, Stream>>,
    /// Chunk position of the end of the last big file read to its end.
    last_streamed: Mutex<Option<usize>>,
    /// Content nodes being made whole in the background.
    making_whole: Arc<Mutex<HashSet<usize>>>,
    /// Files per directory whose first read had to wait for the link.
    directory_misses: Mutex<HashMap<usize, u32>>,
    /// Pushes data into the kernel's page cache (set once mounted).
    notifier: Arc<std::sync::OnceLock<fuser::Notifier>>,
    /// Fetches what programs being loaded load next (if on).
    imports: Option<Arc<imports::ImportLookahead>>,
}

/// What the kernel agreed to at `INIT`, which comes before any other
/// request (and possibly before the layer's index is built).
#[derive(Default)]
struct Negotiated {
    /// The kernel opens directories itself when `opendir` answers ENOSYS
    /// (Linux ≥ 5.1 says so at init); older ones would fail the open.
    opens_dirs: AtomicBool,
    /// The same for files and `open` (Linux ≥ 3.14).
    skips_opens: AtomicBool,
    /// Passthrough negotiated with the kernel and still working.
    passthrough: AtomicBool,
}

fn ino_of(root: usize, node: usize) -> INodeNo {
    if node == root {
        INodeNo::ROOT
    } else {
        INodeNo(node as u64 + 2)
    }
}

/// Linux's new_encode_dev for a 32-bit rdev.
pub(crate) fn rdev(major: u32, minor: u32) -> u32 {
    (minor & 0xff) | ((major & 0xfff) << 8) | ((minor & !0xff) << 12)
}

impl LayerFs {
    fn new(
        layer: Arc<RemoteLayer>,
        runtime: tokio::runtime::Handle,
        options: FsOptions,
        kernel: Arc<Negotiated>,
        notifier: Arc<std::sync::OnceLock<fuser::Notifier>>,
        lowers: imports::Lowers,
    ) -> Self {
        let tree = Arc::new(Tree::build(layer.index()));
        let imports = options.follow_imports.then(|| {
            imports::ImportLookahead::new(layer.clone(), tree.clone(), lowers, runtime.clone())
        });
        LayerFs {
            layer,
            runtime,
            tree,
            kernel,
            options,
            backing: Mutex::new(Backing::default()),
            next_fh: AtomicU64::new(1),
            streams: Mutex::new(HashMap::new()),
            last_streamed: Mutex::new(None),
            making_whole: Arc::new(Mutex::new(HashSet::new())),
            directory_misses: Mutex::new(HashMap::new()),
            notifier,
            imports,
        }
    }

    /// Sequential readers get the next chunks fetched in the background, so
    /// that a cold sequential read streams at link speed instead of paying one
    /// round trip per kernel read.
    fn read_ahead(&self, node: usize, offset: u64, size: u32) {
        let end = offset + u64::from(size);
        let window = {
            let mut streams = self.streams.lock().expect("streams");
            let st = streams.entry(node).or_default();
            let sequential = !st.mapped && (offset == st.last_end || offset == 0);
            st.last_end = end;
            if !sequential || end + READAHEAD / 2 < st.ahead_until {
                None
            } else {
                let from = st.ahead_until.max(end);
                st.ahead_until = end + READAHEAD;
                Some((from, end + READAHEAD - from))
            }
        };
        let Some((from, len)) = window else { return };
        let index = self.layer.index();
        let mut chunks = self
            .layer
            .not_yet_fetched(index.chunks_for_range(node, from, len));
        self.layer.count_fetched_ahead(&chunks);
        let file_end = index
            .file_chunks_of(node)
            .last()
            .map_or(0, |c| c.file_offset + c.size);
        if from + len > file_end {
            chunks.extend(self.stream_on(node, from + len - file_end));
        }
        // Readahead is not profile prefetch: not counted as prefetched.
        self.fetch_in_background(chunks);
    }

    /// Big files read to their ends one after the other in layer order (a
    /// program reading a data set, a checksum over a directory): when file
    /// `node` follows the file streamed last, the stream goes on into the
    /// files after it, `beyond` compressed bytes past its end (chunks neither
    /// cached nor in flight). One big file alone (a library the loader maps)
    /// does not count; small files' neighbours come by `fetch_neighbours`.
    fn stream_on(&self, node: usize, beyond: u64) -> Vec<sluice_format::chunked::ChunkRef> {
        let file_chunks = self.layer.index().file_chunks_of(node);
        let (Some(first), Some(last)) = (file_chunks.first(), file_chunks.last()) else {
            return Vec::new();
        };
        if last.file_offset + last.size < STREAM_MIN {
            return Vec::new();
        }
        let follows = {
            let mut prev = self.last_streamed.lock().expect("last streamed");
            let first_at = self.layer.chunk_position(first);
            let follows = matches!((*prev, first_at), (Some(p), Some(f)) if p + 1 == f);
            *prev = self.layer.chunk_position(last);
            follows
        };
        if !follows {
            return Vec::new();
        }
        self.layer
            .chunks_following(last, last.blob_offset + last.blob_len + beyond)
    }

    /// A passthrough open of file `node` of `size` bytes: its reads will never
    /// reach the daemon, so the open is where a stream through the layer's
    /// files goes on (else it would stall at every file made local ahead of
    /// the reader: measured, a checksum over 48 files of 2 MiB through a
    /// 100 Mbit/s link took 11.2 s instead of 8.8; the link alone, 8.1).
    fn stream_on_at_open(&self, node: usize, size: u64) {
        let beyond = READAHEAD.saturating_sub(size).max(READAHEAD / 2);
        self.fetch_in_background(self.stream_on(node, beyond));
    }

    /// Fetches chunks without anyone waiting (readahead, fetch-ahead); a
    /// failure only means that readers fetch on demand.
    fn fetch_in_background(&self, chunks: Vec<sluice_format::chunked::ChunkRef>) {
        if chunks.is_empty() {
            return;
        }
        let layer = self.layer.clone();
        self.runtime.spawn(async move {
            if let Err(e) = layer.ensure(&chunks).await {
                tracing::debug!(error = %e, "fetch ahead of readers failed; reads fetch on demand");
            }
        });
    }

    /// Before a reader waits for the chunks of `len` bytes at `offset` of
    /// `node`: fetches the chunks after them in the layer (neighbouring
    /// files, in tar order) in a request of its own, so that the reader's
    /// fetch stays small and the neighbours arrive meanwhile.
    ///
    /// The second file of a directory to start with a fetch has the rest of
    /// that directory fetched (see [`Self::fetch_directory`]).
    ///
    /// A read past the start of a mapped object that waits counts as one of
    /// its faults (see [`Self::fetch_mapped_object`]).
    ///
    /// None of this for a read whose chunks are all being fetched already.
    fn fetch_neighbours(&self, node: usize, offset: u64, len: u64) {
        let chunks = self.layer.index().chunks_for_range(node, offset, len);
        // Checked once here: every read of a local file passes by.
        if chunks.iter().all(|c| self.layer.has_chunk(&c.digest)) {
            return;
        }
        if self.layer.not_yet_fetched(chunks).is_empty() {
            // Every chunk it waits for is on its way: a rule saw this read
            // coming (a program or library fetched whole, an import), and
            // guessing from it again fetched neighbours nobody read (the
            // programs beside python3 in /usr/bin: numpy-pandas at 100
            // Mbit/s + 20 ms, 3.53 -> 3.45 s and 33.8 -> 32.6 MB).
            return;
        }
        if self.layer.profile_pending() {
            // The start's own list of what it reads is being fetched, in
            // the order it reads: guesses from the layer's order would only
            // take the link from it (numpy-pandas with a profile: 9 MB of
            // 29 fetched that way, most of it never read).
            return;
        }
        if self.imports.is_some() && self.layer.index().node(node).path.ends_with(".pyc") {
            // What a module imports is fetched by `imports`, file by file;
            // its neighbours in the layer and directory would mostly not be
            // read (numpy-pandas at 100 Mbit/s: 40.2 MB and 4.06 s with
            // them, 36.4 MB and 3.95 s without).
            return;
        }
        if offset == 0 {
            let dir = self.layer.index().parent(node);
            let misses = {
                let mut m = self.directory_misses.lock().expect("directory misses");
                let n = m.entry(dir).or_default();
                *n += 1;
                *n
            };
            if misses == 2 {
                self.fetch_directory(dir);
            }
        } else {
            self.fetch_mapped_object(node);
        }
        self.fetch_in_background(self.layer.fetch_ahead_of(chunks));
    }

    /// An ELF object whose pages fault in here and there (the loader mapped
    /// it; the program runs its code): at its second such read that has to
    /// wait, the rest of it is fetched, if at most [`MAPPED_FETCH_MAX`]
    /// compressed bytes are missing. Its faults come one after the other,
    /// each a round trip; the first one alone (a library's relocations) does
    /// not say that its code runs.
    fn fetch_mapped_object(&self, node: usize) {
        let faults = {
            let mut streams = self.streams.lock().expect("streams");
            let st = streams.entry(node).or_default();
            if !st.mapped {
                return;
            }
            st.faults += 1;
            st.faults
        };
        if faults != 2 {
            return;
        }
        let missing = self
            .layer
            .not_yet_fetched(self.layer.index().file_chunks_of(node));
        if missing.iter().map(|c| c.blob_len).sum::<u64>() > MAPPED_FETCH_MAX {
            return;
        }
        self.layer.count_fetched_ahead(&missing);
        self.fetch_in_background(missing);
    }

    /// Fetches the files of directory `dir` (not its subdirectories) that
    /// are neither cached nor being fetched, if the directory holds at most
    /// [`DIRECTORY_FETCH_MAX`] compressed bytes. A program that needed two
    /// files of a directory one after the other tends to go on with more of
    /// them (Python imports a package's modules from one `__pycache__`, a
    /// tool reads its data files), and on a slow link each one is a round
    /// trip; the fetch-ahead after each file (in tar order) does not reach
    /// modules that sort far apart. A big directory (shared libraries) is
    /// left alone: its files are wanted a few at a time.
    fn fetch_directory(&self, dir: usize) {
        let Some(d) = self.tree.dir(dir) else { return };
        let index = self.layer.index();
        let files = d.entries.iter().map(|&n| index.file_chunks_of(n as usize));
        let total: u64 = files.clone().flatten().map(|c| c.blob_len).sum();
        if total > DIRECTORY_FETCH_MAX {
            return;
        }
        let chunks = self.layer.not_yet_fetched(files.flatten());
        self.layer.count_fetched_ahead(&chunks);
        self.fetch_in_background(chunks);
    }

    /// Whether opens are answered with passthrough files.
    pub fn passthrough_active(&self) -> bool {
        self.kernel.passthrough.load(Ordering::Relaxed)
    }

    /// Tries to answer an open with a passthrough file; gives the reply back
    /// if this open should be served by the daemon instead.
    fn open_passthrough(
        &self,
        i: usize,
        size: u64,
        pid: u32,
        reply: ReplyOpen,
    ) -> Option<ReplyOpen> {
        let content = self.layer.index().resolve(i) as u64;
        {
            let backing = self.backing.lock().expect("backing");
            if let Some(id) = backing.live(content) {
                drop(backing);
                if let Some(o) = &self.options.observer {
                    // As below: this open stands for the reads it will do.
                    o.read(&self.layer, i, 0, size, pid);
                }
                self.stream_on_at_open(i, size);
                self.reply_passthrough(content, &id, reply);
                return None;
            }
            if backing.has_cached_opens(content) {
                return Some(reply);
            }
        }
        if !self.passthrough_active()
            || !(size <= self.options.open_fetch_max || self.layer.is_local(i))
        {
            return Some(reply);
        }
        if !crate::cache::ChunkCache::stores_as_file(size) && self.layer.is_local(i) {
            // Small and local: its bytes lie in a pack of the cache, with no
            // file of their own to hand the kernel; the daemon serves it
            // (see `cache`), its bytes pushed into the page cache at once.
            self.store_at_open(i, size, pid);
            return Some(reply);
        }
        if size > self.options.whole_at_open_max && !self.layer.is_whole(i) {
            // Local, but in chunks, and big: copying it into one file now
            // would hold this open (a model file of gigabytes: seconds). The
            // daemon serves this open from the chunks; the copy is made in
            // the background, and the opens after it are passed through.
            self.make_whole_in_background(i);
            return Some(reply);
        }
        self.fetch_neighbours(i, 0, size);
        let file = match self.layer.materialize_blocking(&self.runtime, i) {
            Ok(Some(f)) => f,
            Ok(None) => {
                // Small (fetched whole now) or not made whole after all.
                if !crate::cache::ChunkCache::stores_as_file(size) {
                    self.store_at_open(i, size, pid);
                }
                return Some(reply);
            }
            Err(e) => {
                tracing::error!(error = %e, "open failed");
                reply.error(Errno::EIO);
                return None;
            }
        };
        if let Some(o) = &self.options.observer {
            // Reads of a passthrough file never reach the daemon: the open
            // stands for them, and the backing file is where eBPF sees them.
            o.backing_file(&self.layer, i, &file);
            o.read(&self.layer, i, 0, size, pid);
        }
        let mut backing = self.backing.lock().expect("backing");
        if backing.has_cached_opens(content) {
            // A daemon-served open came in while the file was fetched.
            return Some(reply);
        }
        let id = match backing.live(content) {
            Some(id) => id,
            None => match reply.open_backing(&file) {
                Ok(id) => {
                    let id = Arc::new(id);
                    backing.by_ino.insert(content, Arc::downgrade(&id));
                    id
                }
                Err(e) => {
                    tracing::warn!(error = %e, "FUSE passthrough refused by the kernel; serving reads through the daemon from now on");
                    self.kernel.passthrough.store(false, Ordering::Relaxed);
                    return Some(reply);
                }
            },
        };
        drop(backing);
        self.stream_on_at_open(i, size);
        self.reply_passthrough(content, &id, reply);
        None
    }

    /// Puts a small local file's bytes into the kernel's page cache before
    /// its open is answered (`FUSE_NOTIFY_STORE`), so that the reads after
    /// the open find them there instead of each coming back as a `READ`.
    /// Up to [`STORE_AT_OPEN_MAX`] bytes; the first open of a mount may come
    /// before the notifier is there, and is served with `READ`s.
    fn store_at_open(&self, i: usize, size: u64, pid: u32) {
        if size == 0 || size > STORE_AT_OPEN_MAX {
            return;
        }
        let Some(notifier) = self.notifier.get() else {
            return;
        };
        let Ok(data) = self.layer.read_blocking(&self.runtime, i, 0, size as u32) else {
            return;
        };
        let ino = ino_of(self.tree.root(), self.layer.index().resolve(i));
        if notifier.store(ino, 0, data.as_slice()).is_ok() {
            self.layer
                .stats
                .stored_opens
                .fetch_add(1, Ordering::Relaxed);
            if let Some(o) = &self.options.observer {
                // As a passthrough open: the reads never reach the daemon.
                o.read(&self.layer, i, 0, size, pid);
            }
        }
    }

    /// Copies a local file's chunks into one whole-file cache entry, off the
    /// request path (see [`RemoteLayer::materialize_blocking`]).
    fn make_whole_in_background(&self, node: usize) {
        let content = self.layer.index().resolve(node);
        if !self
            .making_whole
            .lock()
            .expect("making whole")
            .insert(content)
        {
            return;
        }
        let (layer, runtime, making) = (
            self.layer.clone(),
            self.runtime.clone(),
            self.making_whole.clone(),
        );
        self.runtime.spawn_blocking(move || {
            if let Err(e) = layer.materialize_blocking(&runtime, content) {
                tracing::warn!(error = %e, "making a file whole for passthrough failed; the daemon keeps serving it");
            }
            making.lock().expect("making whole").remove(&content);
        });
    }

    /// Answers an open with the inode's passthrough file.
    fn reply_passthrough(&self, content: u64, id: &Arc<BackingId>, reply: ReplyOpen) {
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        // Count before replying: the reply lets the opener run on.
        self.layer
            .stats
            .passthrough_opens
            .fetch_add(1, Ordering::Relaxed);
        let mut backing = self.backing.lock().expect("backing");
        backing.by_handle.insert(fh, id.clone());
        backing.by_ino.insert(content, Arc::downgrade(id));
        // Not under the lock: the reply wakes the opener, and a thread that
        // holds a lock across a syscall makes the others wait on a futex.
        drop(backing);
        reply.opened_passthrough(FileHandle(fh), FopenFlags::empty(), id);
    }

    /// Answers an open that the daemon serves (through the page cache),
    /// unless the inode has gone passthrough meanwhile.
    fn reply_cached(&self, content: u64, reply: ReplyOpen) {
        let mut backing = self.backing.lock().expect("backing");
        if let Some(id) = backing.live(content) {
            drop(backing);
            return self.reply_passthrough(content, &id, reply);
        }
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        backing.cached_by_handle.insert(fh, content);
        *backing.cached_opens.entry(content).or_default() += 1;
        drop(backing); // as in reply_passthrough
        reply.opened(FileHandle(fh), FopenFlags::FOPEN_KEEP_CACHE);
    }

    fn node_of(&self, ino: INodeNo) -> Option<usize> {
        let n = u64::from(ino);
        if n == 1 {
            return Some(self.tree.root());
        }
        let i = usize::try_from(n.checked_sub(2)?).ok()?;
        (i < self.tree.len()).then_some(i)
    }

    fn attr(&self, i: usize) -> FileAttr {
        let index = self.layer.index();
        let content = index.resolve(i);
        let n = index.node(content);
        let mtime = UNIX_EPOCH
            + Duration::from_secs(n.mtime.0.max(0) as u64)
            + Duration::from_nanos(u64::from(n.mtime.1));
        let (kind, size, rdev_value, nlink) = if self.tree.is_whiteout(i) {
            (FileType::CharDevice, 0, 0, 1)
        } else {
            match &n.kind {
                NodeKind::File { size, .. } => (
                    FileType::RegularFile,
                    *size,
                    0,
                    self.tree.links(content).max(1),
                ),
                NodeKind::Dir => {
                    let subdirs = self.tree.dir(content).map_or(0, |d| d.subdirs);
                    (FileType::Directory, 4096, 0, 2 + subdirs)
                }
                NodeKind::Symlink(t) => (FileType::Symlink, t.len() as u64, 0, 1),
                NodeKind::CharDevice { major, minor } => {
                    (FileType::CharDevice, 0, rdev(*major, *minor), 1)
                }
                NodeKind::BlockDevice { major, minor } => {
                    (FileType::BlockDevice, 0, rdev(*major, *minor), 1)
                }
                NodeKind::Fifo => (FileType::NamedPipe, 0, 0, 1),
                NodeKind::Hardlink { .. } => unreachable!("resolved above"),
            }
        };
        FileAttr {
            ino: ino_of(self.tree.root(), content),
            size,
            blocks: size.div_ceil(512),
            atime: mtime,
            mtime,
            ctime: mtime,
            crtime: mtime,
            kind,
            perm: if self.tree.is_whiteout(i) {
                0
            } else {
                n.mode as u16
            },
            nlink,
            uid: n.uid,
            gid: n.gid,
            rdev: rdev_value,
            flags: 0,
            blksize: 4096,
        }
    }

    fn xattrs(&self, i: usize) -> Vec<(String, Vec<u8>)> {
        let index = self.layer.index();
        let content = index.resolve(i);
        let mut out: Vec<(String, Vec<u8>)> = index
            .node(content)
            .xattrs
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        if self.tree.dir(content).is_some_and(|d| d.opaque) {
            out.push((OPAQUE_XATTR.to_owned(), b"y".to_vec()));
        }
        out
    }
}

fn xattr_reply(reply: ReplyXattr, size: u32, data: &[u8]) {
    if size == 0 {
        reply.size(data.len() as u32);
    } else if (size as usize) < data.len() {
        reply.error(Errno::ERANGE);
    } else {
        reply.data(data);
    }
}

impl Filesystem for LayerFs {
    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let Some(dir) = self
            .node_of(parent)
            .and_then(|p| self.tree.dir(self.layer.index().resolve(p)))
        else {
            return reply.error(Errno::ENOENT);
        };
        let index = self.layer.index();
        self.layer.stats.lookups.fetch_add(1, Ordering::Relaxed);
        match dir
            .entries
            .binary_search_by(|&n| shown_name(&index.node(n as usize).path).cmp(name))
        {
            Ok(k) => reply.entry(&TTL, &self.attr(dir.entries[k] as usize), Generation(0)),
            // A layer never changes, so a name it lacks stays missing: a
            // node id of 0 is the kernel's "no such entry" with a lifetime
            // (a bare ENOENT is asked again at every lookup). Each new
            // container's overlayfs looks every path up in every layer
            // above the one that has it: those lookups are answered by the
            // kernel from then on.
            Err(_) => {
                let mut missing = self.attr(self.tree.root());
                missing.ino = INodeNo(0);
                reply.entry(&TTL, &missing, Generation(0))
            }
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.node_of(ino) {
            Some(i) => reply.attr(&TTL, &self.attr(i)),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        match self.node_of(ino).map(|i| &self.layer.index().node(i).kind) {
            Some(NodeKind::Symlink(target)) => reply.data(target.as_bytes()),
            _ => reply.error(Errno::EINVAL),
        }
    }

    fn open(&self, req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let Some(i) = self.node_of(ino) else {
            return reply.error(Errno::ENOENT);
        };
        if flags.0 & libc::O_ACCMODE != libc::O_RDONLY {
            return reply.error(Errno::EROFS);
        }
        if self.kernel.skips_opens.load(Ordering::Relaxed) && !self.passthrough_active() {
            // Nothing to hand the kernel: it opens files itself from now on
            // (see `init`).
            self.layer
                .stats
                .skipped_opens
                .fetch_add(1, Ordering::Relaxed);
            return reply.error(Errno::ENOSYS);
        }
        match self.layer.index().node(self.layer.index().resolve(i)).kind {
            NodeKind::File { size, .. } => {
                if let Some(imports) = &self.imports {
                    imports.opened(i);
                }
                if let Some(reply) = self.open_passthrough(i, size, req.pid(), reply) {
                    self.reply_cached(self.layer.index().resolve(i) as u64, reply);
                }
            }
            NodeKind::Dir => reply.error(Errno::EISDIR),
            _ => reply.error(Errno::EINVAL),
        }
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        // Nothing is ever written here; ENOSYS makes the kernel stop sending
        // FLUSH at every close for the rest of the mount (fuser's default
        // answers the same, with a warning in the log of every mount).
        reply.error(Errno::ENOSYS);
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        let fh = u64::from(fh);
        let mut backing = self.backing.lock().expect("backing");
        let mut held = None;
        if backing.by_handle.remove(&fh).is_none() {
            if let Some(content) = backing.cached_by_handle.remove(&fh) {
                if let Some(n) = backing.cached_opens.get_mut(&content) {
                    *n -= 1;
                    if *n == 0 {
                        backing.cached_opens.remove(&content);
                        held = backing.held_maps.take(&content);
                    }
                }
            }
        }
        drop(backing);
        drop(held); // unmapped outside the lock
        reply.ok();
    }

    fn read(
        &self,
        req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let Some(i) = self.node_of(ino) else {
            return reply.error(Errno::ENOENT);
        };
        if offset != 0 {
            self.read_ahead(i, offset, size);
        } else if let Some(imports) = &self.imports {
            // Without opens (no passthrough), a file's first read.
            imports.opened(i);
        }
        self.fetch_neighbours(i, offset, u64::from(size));
        if let Some(o) = &self.options.observer {
            o.read(&self.layer, i, offset, u64::from(size), req.pid());
        }
        match self.layer.read_blocking(&self.runtime, i, offset, size) {
            Ok(data) => {
                if offset == 0 {
                    // A file that starts as an ELF object is, at startup,
                    // a library or program the loader maps: its reads are
                    // page faults here and there, not a sequential reader
                    // (measured on numpy-pandas: readahead from offset 0
                    // fetched megabytes of libraries never touched).
                    if data.as_slice().starts_with(b"\x7fELF") {
                        self.streams
                            .lock()
                            .expect("streams")
                            .entry(i)
                            .or_default()
                            .mapped = true;
                        if let Some(imports) = &self.imports {
                            imports.elf_opened(i);
                        }
                    } else {
                        self.read_ahead(i, offset, size);
                    }
                }
                reply.data(data.as_slice());
                if let ReadData::Mapped(m, range) = data {
                    if m.len() as u64 >= STREAM_MIN {
                        let content = self.layer.index().resolve(i) as u64;
                        let mut backing = self.backing.lock().expect("backing");
                        let dropped = if range.end == m.len() {
                            backing.held_maps.take(&content)
                        } else {
                            backing.held_maps.keep(content, m)
                        };
                        drop(backing);
                        drop(dropped); // unmapped outside the lock
                    }
                }
            }
            Err(_) => reply.error(Errno::EIO),
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let Some(i) = self.node_of(ino) else {
            return reply.error(Errno::ENOENT);
        };
        let Some(dir) = self.tree.dir(self.layer.index().resolve(i)) else {
            return reply.error(Errno::ENOTDIR);
        };
        let parent = self.layer.index().parent(i);
        let fixed = [
            (
                ino_of(self.tree.root(), i),
                FileType::Directory,
                OsStr::new("."),
            ),
            (
                ino_of(self.tree.root(), parent),
                FileType::Directory,
                OsStr::new(".."),
            ),
        ];
        let index = self.layer.index();
        let listed = dir.entries.iter().map(|&n| {
            let attr = self.attr(n as usize);
            (
                attr.ino,
                attr.kind,
                shown_name(&index.node(n as usize).path),
            )
        });
        for (k, (ino, kind, name)) in fixed
            .into_iter()
            .chain(listed)
            .enumerate()
            .skip(offset as usize)
        {
            if reply.add(ino, k as u64 + 1, kind, name) {
                break;
            }
        }
        reply.ok();
    }

    fn readdirplus(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectoryPlus,
    ) {
        let Some(i) = self.node_of(ino) else {
            return reply.error(Errno::ENOENT);
        };
        let Some(dir) = self.tree.dir(self.layer.index().resolve(i)) else {
            return reply.error(Errno::ENOTDIR);
        };
        let fixed = [
            (i, OsStr::new(".")),
            (self.layer.index().parent(i), OsStr::new("..")),
        ];
        let index = self.layer.index();
        let listed = dir
            .entries
            .iter()
            .map(|&n| (n as usize, shown_name(&index.node(n as usize).path)));
        for (k, (node, name)) in fixed
            .into_iter()
            .chain(listed)
            .enumerate()
            .skip(offset as usize)
        {
            let attr = self.attr(node);
            if reply.add(attr.ino, k as u64 + 1, name, &TTL, &attr, Generation(0)) {
                break;
            }
        }
        reply.ok();
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let blocks = self.tree.total_bytes().div_ceil(4096);
        reply.statfs(blocks, 0, 0, self.tree.len() as u64, 0, 4096, 255, 4096);
    }

    fn opendir(&self, _req: &Request, _ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        if self.kernel.opens_dirs.load(Ordering::Relaxed) {
            // The kernel opens directories itself from now on (see `init`).
            return reply.error(Errno::ENOSYS);
        }
        // What the kernel then assumes: listings never change.
        reply.opened(
            FileHandle(0),
            FopenFlags::FOPEN_KEEP_CACHE | FopenFlags::FOPEN_CACHE_DIR,
        );
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        if !self.tree.has_xattrs() {
            // overlayfs asks every lower entry for its trusted.overlay.*
            // attributes (thousands of round trips while a program starts);
            // ENOSYS makes the kernel answer "not supported" itself for the
            // rest of this mount, which overlayfs and exec read as "none".
            return reply.error(Errno::ENOSYS);
        }
        let Some(i) = self.node_of(ino) else {
            return reply.error(Errno::ENOENT);
        };
        match self
            .xattrs(i)
            .into_iter()
            .find(|(k, _)| k.as_bytes() == name.as_bytes())
        {
            Some((_, v)) => xattr_reply(reply, size, &v),
            None => reply.error(Errno::NO_XATTR),
        }
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        let Some(i) = self.node_of(ino) else {
            return reply.error(Errno::ENOENT);
        };
        let mut names = Vec::new();
        for (k, _) in self.xattrs(i) {
            names.extend_from_slice(k.as_bytes());
            names.push(0);
        }
        xattr_reply(reply, size, &names);
    }
}

/// Asks the kernel at `INIT` for what makes a starting container's requests
/// fewer and cheaper; `kernel` records what it agreed to.
fn negotiate(config: &mut KernelConfig, options: &FsOptions, kernel: &Negotiated) {
    let _ = config.set_max_readahead(MAX_READAHEAD);
    // Listings return attributes too: one request instead of one lookup
    // per entry when a runtime walks a directory.
    let _ =
        config.add_capabilities(InitFlags::FUSE_DO_READDIRPLUS | InitFlags::FUSE_READDIRPLUS_AUTO);
    // Every request is a round trip that a starting program waits for:
    // symlink targets stay in the page cache, and directories are opened
    // without asking us (`opendir` answers ENOSYS; the kernel then keeps
    // their listings cached).
    let _ = config.add_capabilities(InitFlags::FUSE_CACHE_SYMLINKS);
    kernel.opens_dirs.store(
        config
            .add_capabilities(InitFlags::FUSE_NO_OPENDIR_SUPPORT)
            .is_ok(),
        Ordering::Relaxed,
    );
    // Without passthrough an open has nothing to hand the kernel, yet
    // costs two round trips per file (OPEN and RELEASE): with `open`
    // answering ENOSYS the kernel opens files itself for the rest of the
    // mount (and keeps their page cache, as FOPEN_KEEP_CACHE would).
    // Measured on 20,000 small files read warm: 0.35–0.38× → 0.40–0.47×
    // native (docs/puller.md).
    kernel.skips_opens.store(
        config
            .add_capabilities(InitFlags::FUSE_NO_OPEN_SUPPORT)
            .is_ok(),
        Ordering::Relaxed,
    );
    if !options.passthrough {
        return;
    }
    match config.add_capabilities(InitFlags::FUSE_PASSTHROUGH) {
        // Backing files live on a plain filesystem (depth 0), and overlayfs
        // stacks on top of this mount: depth 1 keeps both within the
        // kernel's limit of 2.
        Ok(()) if config.set_max_stack_depth(1).is_ok() => {
            kernel.passthrough.store(true, Ordering::Relaxed);
        }
        _ => tracing::info!("kernel has no FUSE passthrough; reads are served by the daemon"),
    }
}

/// The filesystem as mounted: requests wait until the layer is there (see
/// [`mount_pending`]), then go to its [`LayerFs`].
struct MountedFs {
    options: FsOptions,
    kernel: Arc<Negotiated>,
    ready: Arc<Ready>,
}

/// The layer's filesystem once it is built, or why it never will be.
#[derive(Default)]
struct Ready {
    fs: std::sync::OnceLock<Result<LayerFs, String>>,
    lock: Mutex<()>,
    built: std::sync::Condvar,
}

impl Ready {
    /// Sets the outcome once (later calls change nothing) and wakes every
    /// request waiting for it; whether this call set it.
    fn set(&self, fs: Result<LayerFs, String>) -> bool {
        let _guard = self.lock.lock().expect("ready lock");
        let first = self.fs.set(fs).is_ok();
        self.built.notify_all();
        first
    }

    /// The layer's filesystem, waiting for it to be built; EIO if it failed.
    fn wait(&self) -> Result<&LayerFs, Errno> {
        let outcome = match self.fs.get() {
            Some(o) => o,
            None => {
                let mut guard = self.lock.lock().expect("ready lock");
                loop {
                    if let Some(o) = self.fs.get() {
                        break o;
                    }
                    guard = self.built.wait(guard).expect("ready lock");
                }
            }
        };
        outcome.as_ref().map_err(|_| Errno::EIO)
    }
}

impl Filesystem for MountedFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        negotiate(config, &self.options, &self.kernel);
        Ok(())
    }

    fn lookup(&self, req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        match self.ready.wait() {
            Ok(fs) => fs.lookup(req, parent, name, reply),
            Err(e) => reply.error(e),
        }
    }

    fn getattr(&self, req: &Request, ino: INodeNo, fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.ready.wait() {
            Ok(fs) => fs.getattr(req, ino, fh, reply),
            Err(e) => reply.error(e),
        }
    }

    fn readlink(&self, req: &Request, ino: INodeNo, reply: ReplyData) {
        match self.ready.wait() {
            Ok(fs) => fs.readlink(req, ino, reply),
            Err(e) => reply.error(e),
        }
    }

    fn open(&self, req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        match self.ready.wait() {
            Ok(fs) => fs.open(req, ino, flags, reply),
            Err(e) => reply.error(e),
        }
    }

    fn flush(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        match self.ready.wait() {
            Ok(fs) => fs.flush(req, ino, fh, lock_owner, reply),
            Err(e) => reply.error(e),
        }
    }

    fn release(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        flags: OpenFlags,
        lock_owner: Option<LockOwner>,
        flush: bool,
        reply: ReplyEmpty,
    ) {
        match self.ready.wait() {
            Ok(fs) => fs.release(req, ino, fh, flags, lock_owner, flush, reply),
            Err(e) => reply.error(e),
        }
    }

    fn read(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        flags: OpenFlags,
        lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        match self.ready.wait() {
            Ok(fs) => fs.read(req, ino, fh, offset, size, flags, lock_owner, reply),
            Err(e) => reply.error(e),
        }
    }

    fn readdir(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        reply: ReplyDirectory,
    ) {
        match self.ready.wait() {
            Ok(fs) => fs.readdir(req, ino, fh, offset, reply),
            Err(e) => reply.error(e),
        }
    }

    fn readdirplus(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        reply: ReplyDirectoryPlus,
    ) {
        match self.ready.wait() {
            Ok(fs) => fs.readdirplus(req, ino, fh, offset, reply),
            Err(e) => reply.error(e),
        }
    }

    fn statfs(&self, req: &Request, ino: INodeNo, reply: ReplyStatfs) {
        match self.ready.wait() {
            Ok(fs) => fs.statfs(req, ino, reply),
            Err(e) => reply.error(e),
        }
    }

    fn opendir(&self, req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        match self.ready.wait() {
            Ok(fs) => fs.opendir(req, ino, flags, reply),
            Err(e) => reply.error(e),
        }
    }

    fn getxattr(&self, req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        match self.ready.wait() {
            Ok(fs) => fs.getxattr(req, ino, name, size, reply),
            Err(e) => reply.error(e),
        }
    }

    fn listxattr(&self, req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        match self.ready.wait() {
            Ok(fs) => fs.listxattr(req, ino, size, reply),
            Err(e) => reply.error(e),
        }
    }
}

/// A mounted layer; unmounted when dropped. Mounted before its index may
/// be built ([`mount_pending`]): until its [`LayerSlot::serve`], requests
/// wait.
pub struct LazyMount {
    // Dropped after `drop` below has woken any waiting request (the
    // session's threads are joined when it goes).
    session: Option<fuser::BackgroundSession>,
    mountpoint: std::path::PathBuf,
    slot: LayerSlot,
}

impl LazyMount {
    /// Where the layer is handed over; holding it does not keep the mount.
    pub fn slot(&self) -> LayerSlot {
        self.slot.clone()
    }

    /// Why the layer is not served, once that is known (requests get EIO).
    pub fn failed(&self) -> Option<&str> {
        self.slot.failed()
    }
}

/// Hands a mounted layer's filesystem to the mount ([`LazyMount::slot`]).
#[derive(Clone)]
pub struct LayerSlot {
    digest: sluice_format::Digest,
    ready: Arc<Ready>,
    runtime: tokio::runtime::Handle,
    options: FsOptions,
    kernel: Arc<Negotiated>,
    notifier: Arc<std::sync::OnceLock<fuser::Notifier>>,
    lowers: imports::Lowers,
}

impl LayerSlot {
    /// The blob digest the mount was made for.
    pub fn digest(&self) -> &sluice_format::Digest {
        &self.digest
    }

    /// Serves `layer` from now on (builds its directory tree first: a few
    /// milliseconds for 40,000 entries, blocking), or answers every request
    /// with EIO when the layer could not be opened (`Err`: why, logged by
    /// the caller). Only the first call counts; whether it was this one.
    pub fn serve(&self, layer: Result<Arc<RemoteLayer>, String>) -> bool {
        if self.ready.fs.get().is_some() {
            return false;
        }
        let fs = layer.map(|l| {
            LayerFs::new(
                l,
                self.runtime.clone(),
                self.options.clone(),
                self.kernel.clone(),
                self.notifier.clone(),
                self.lowers.clone(),
            )
        });
        self.ready.set(fs)
    }

    /// The layers below this one in an image, the nearest first: a Python
    /// module of this layer may import modules of theirs, an ELF object
    /// need their libraries (see `imports`). Replaces what an earlier call
    /// said (a layer's lowers are the same in every image that has it: its
    /// snapshot is keyed by its chain of parents).
    pub fn set_lowers(&self, lowers: &[LayerSlot]) {
        *self.lowers.lock().expect("lowers") =
            lowers.iter().map(|l| Arc::downgrade(&l.ready)).collect();
    }

    /// Fetches what the image's command `cmd` loads first, found in this
    /// layer and its lowers (set them first: [`Self::set_lowers`]), once
    /// they are served: the program, its loader and libraries, and the
    /// modules a Python main module imports (see `imports/command.rs`). For
    /// an image's top layer, while the container is still being created.
    /// Nothing if the mount does not follow imports.
    pub fn start_command(&self, cmd: crate::image::StartCommand) {
        self.once_stack_served(move |imports| imports.start_command(cmd));
    }

    /// Fetches the files of the image that the container runtime reads
    /// before the program runs (`/etc/passwd`, `/etc/group`), found in this
    /// layer and its lowers (set them first): for an image's top layer,
    /// with or without a profile. Nothing if the mount does not follow
    /// imports.
    pub fn start_runtime_files(&self) {
        self.once_stack_served(|imports| imports.start_runtime_files());
    }

    /// Runs `f` with this layer's import lookahead (if it has one) once the
    /// layer and its lowers are served.
    fn once_stack_served(&self, f: impl FnOnce(&Arc<imports::ImportLookahead>) + Send + 'static) {
        let (ready, lowers) = (self.ready.clone(), self.lowers.clone());
        self.runtime.spawn_blocking(move || {
            // Lowers mounted before this layer are usually served by now;
            // a failed one is skipped, as it is when imports are followed.
            let lowers: Vec<Weak<Ready>> = lowers.lock().expect("lowers").clone();
            for lower in lowers.iter().filter_map(Weak::upgrade) {
                let _ = lower.wait();
            }
            if let Ok(fs) = ready.wait() {
                if let Some(imports) = &fs.imports {
                    f(imports);
                }
            }
        });
    }

    /// Why the layer is not served, once that is known (requests get EIO).
    pub fn failed(&self) -> Option<&str> {
        match self.ready.fs.get() {
            Some(Err(e)) => Some(e),
            _ => None,
        }
    }
}

impl Drop for LazyMount {
    fn drop(&mut self) {
        // Requests still waiting for a layer that will not come now.
        self.slot
            .ready
            .set(Err("unmounted before the layer was opened".into()));
        drop(self.session.take());
        // The session's unmount fails while a request is still on its way
        // out (say, one just answered above): detach the mount then, so
        // that its directory can go (the kernel ends it when the last user
        // lets go). Only this mount: whatever it was stacked on stays.
        let source = fs_name(&self.slot.digest);
        if top_mount_is(&self.mountpoint, &source) {
            detach(&self.mountpoint);
        }
    }
}

/// Detaches the topmost mount at `path` (the kernel ends it when its last
/// user lets go); false if nothing was mounted there (or it failed).
pub fn detach(path: &Path) -> bool {
    let Ok(path) = std::ffi::CString::new(path.as_os_str().as_bytes()) else {
        return false;
    };
    // SAFETY: a valid NUL-terminated path; umount2 has no other inputs.
    unsafe { libc::umount2(path.as_ptr(), libc::MNT_DETACH) == 0 }
}

/// The source a layer's mount shows in the mount table.
fn fs_name(digest: &sluice_format::Digest) -> String {
    format!("sluice:{digest}")
}

/// Whether the topmost mount at `path` (canonical) has `source`, by
/// /proc/self/mountinfo: asking the mount itself would be a request to it.
pub(crate) fn top_mount_is(path: &Path, source: &str) -> bool {
    let Ok(table) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return false;
    };
    // Later lines are mounted later, so on top of earlier ones: the last
    // line at `path` is the top.
    table
        .lines()
        .rev()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split(' ').collect();
            let dash = fields.iter().position(|f| *f == "-")?;
            Some((unescape_mount_field(fields.get(4)?), *fields.get(dash + 2)?))
        })
        .find(|(at, _)| Path::new(at) == path)
        .is_some_and(|(_, s)| unescape_mount_field(s) == source)
}

/// The mount table writes space, tab, newline and backslash as `\ooo`.
fn unescape_mount_field(field: &str) -> String {
    let b = field.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let octal = b
            .get(i + 1..i + 4)
            .filter(|o| o.iter().all(|c| (b'0'..=b'7').contains(c)));
        match (b[i], octal) {
            (b'\\', Some(o)) => {
                out.push(o.iter().fold(0u8, |n, c| n.wrapping_mul(8) + (c - b'0')));
                i += 4;
            }
            (c, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Mounts the layer of blob `digest` read-only at `mountpoint` before the
/// layer itself is there: the kernel's requests wait until
/// [`LayerSlot::serve`] hands it over. A snapshotter can so answer
/// containerd while the layer's TOC is still being decoded and indexed,
/// and the container's creation overlaps that work.
pub fn mount_pending(
    digest: &sluice_format::Digest,
    runtime: tokio::runtime::Handle,
    mountpoint: &Path,
    options: FsOptions,
) -> std::io::Result<LazyMount> {
    let kernel = Arc::new(Negotiated::default());
    let ready = Arc::new(Ready::default());
    let fs = MountedFs {
        options: options.clone(),
        kernel: kernel.clone(),
        ready: ready.clone(),
    };
    let mut config = fuser::Config::default();
    config.mount_options = vec![
        MountOption::RO,
        MountOption::FSName(fs_name(digest)),
        MountOption::Subtype("sluice".into()),
        MountOption::DefaultPermissions,
        MountOption::Dev,
        MountOption::Suid,
        MountOption::Exec,
    ];
    config.acl = fuser::SessionACL::All;
    config.n_threads = Some(options.threads.max(1));
    config.clone_fd = true;
    // As /proc/self/mountinfo will show it (see `LazyMount`'s drop).
    let mountpoint = std::fs::canonicalize(mountpoint)?;
    let session = fuser::spawn_mount(fs, &mountpoint, &config)?;
    let notifier = Arc::new(std::sync::OnceLock::new());
    let _ = notifier.set(session.notifier());
    Ok(LazyMount {
        session: Some(session),
        mountpoint,
        slot: LayerSlot {
            digest: digest.clone(),
            ready,
            runtime,
            options,
            kernel,
            notifier,
            lowers: Arc::default(),
        },
    })
}

/// Mounts `layer` read-only at `mountpoint`; unmounted when the returned
/// mount is dropped.
pub fn mount(
    layer: Arc<RemoteLayer>,
    runtime: tokio::runtime::Handle,
    mountpoint: &Path,
    options: FsOptions,
) -> std::io::Result<LazyMount> {
    let mount = mount_pending(layer.digest(), runtime, mountpoint, options)?;
    mount.slot.serve(Ok(layer));
    Ok(mount)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(len: usize) -> Arc<memmap2::Mmap> {
        Arc::new(
            memmap2::MmapOptions::new()
                .len(len)
                .map_anon()
                .unwrap()
                .make_read_only()
                .unwrap(),
        )
    }

    #[test]
    fn mount_table_fields_are_unescaped() {
        assert_eq!(unescape_mount_field("/a\\040b\\011c"), "/a b\tc");
        assert_eq!(unescape_mount_field("/x\\134y"), "/x\\y");
        // Not an escape: left as it is.
        assert_eq!(unescape_mount_field("/x\\9y\\"), "/x\\9y\\");
        assert!(!top_mount_is(Path::new("/no/such/mount"), "sluice:x"));
        // The root is mounted, and not by sluice.
        assert!(!top_mount_is(Path::new("/"), "sluice:x"));
    }

    /// Held mappings stay bounded (without opens nothing else releases
    /// them), the oldest goes first, and one let go early leaves the order.
    #[test]
    fn held_maps_stay_bounded_oldest_dropped_first() {
        let mut b = Backing::default();
        for content in 0..HELD_MAPS_MAX as u64 {
            assert!(b.held_maps.keep(content, map(4096)).is_none());
        }
        // Held already: nothing drops.
        assert!(b.held_maps.keep(3, map(4096)).is_none());
        assert!(b.held_maps.take(&0).is_some());
        assert!(b.held_maps.take(&0).is_none());
        assert!(b.held_maps.keep(100, map(4096)).is_none());
        // Over the bound: the oldest still held (1) is dropped, not 0 again.
        assert!(b.held_maps.keep(101, map(4096)).is_some());
        assert!(!b.held_maps.contains(&1));
        assert_eq!(b.held_maps.len(), HELD_MAPS_MAX);
        // (That the order holds exactly the held keys: oldest_first's test.)
    }
}
