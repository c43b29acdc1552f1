//! A lazily fetched layer: its validated index, and reads that fetch, verify
//! and cache exactly the chunks they need.
//!
//! Fetching is deduplicated and coalesced: concurrent reads of one chunk share
//! one fetch (single-flight per chunk digest), and the chunks one read needs
//! that sit next to each other in the blob come in one Range request. Every
//! chunk is decompressed straight into the cache and verified there; a chunk
//! that does not match its digest is fetched again, and after the retries the
//! read fails with an error, never with wrong bytes. Reads have a deadline.

use std::collections::{HashMap, VecDeque};
use std::ops::Range;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use memmap2::Mmap;
use sluice_format::chunked::toc::{Toc, MAX_TOC_BYTES};
use sluice_format::chunked::{ChunkRef, Footer, LayerIndex};
use sluice_format::oci::Descriptor;
use sluice_format::Digest;
use tokio::sync::watch;

use crate::cache::ChunkCache;
use crate::registry::{FetchError, ImageRef, RegistryClient};

/// Requests for adjacent chunks are merged up to this many bytes.
const MAX_COALESCED: u64 = 4 << 20;
/// Chunks closer than this in the blob are fetched together (the gap is
/// downloaded and dropped: cheaper than another round trip).
const MAX_GAP: u64 = 16 << 10;
/// Range requests one fetch of several chunk groups keeps in flight.
const PARALLEL_RANGES: usize = 4;
/// Default of [`LayerOptions::fetch_ahead`].
pub const DEFAULT_FETCH_AHEAD: u64 = 512 << 10;
/// Fetches of a chunk (its bytes failing verification, or the body that
/// carried it breaking off) before giving up.
const VERIFY_ATTEMPTS: u32 = 3;

#[derive(Debug, Clone, thiserror::Error)]
pub enum LayerError {
    #[error("layer {layer} of {image}: not lazy-capable: {reason}")]
    NotLazy {
        image: String,
        layer: Digest,
        reason: String,
    },
    #[error("layer {layer} of {image}: {reason}")]
    Fetch {
        image: String,
        layer: Digest,
        reason: String,
    },
    #[error("layer {layer} of {image}, file {file}: read did not finish within {deadline:?}")]
    Deadline {
        image: String,
        layer: Digest,
        file: String,
        deadline: Duration,
    },
    #[error("layer {layer} of {image}, file {file}: {reason}")]
    Read {
        image: String,
        layer: Digest,
        file: String,
        reason: String,
    },
}

/// Options of a mounted layer.
#[derive(Debug, Clone)]
pub struct LayerOptions {
    /// How long a read may wait for its chunks.
    pub read_deadline: Duration,
    /// A read that must fetch also has the chunks that follow in the blob
    /// (other files of the same directory, in tar order) fetched, up to this
    /// many compressed bytes from its first chunk, in a parallel request
    /// (see [`RemoteLayer::fetch_ahead_of`]): starting programs read
    /// neighbouring files, and on a slow link a round trip costs more than
    /// the extra bytes. 0 = only what the read needs.
    pub fetch_ahead: u64,
    /// Where fetch latencies are recorded (see [`crate::metrics`]).
    pub fetch_latency: Option<prometheus_client::metrics::histogram::Histogram>,
}

impl Default for LayerOptions {
    fn default() -> Self {
        LayerOptions {
            read_deadline: Duration::from_secs(60),
            fetch_ahead: DEFAULT_FETCH_AHEAD,
            fetch_latency: None,
        }
    }
}

/// Per-layer counters.
#[derive(Debug, Default)]
pub struct LayerStats {
    pub fetched_bytes: AtomicU64,
    pub fetch_requests: AtomicU64,
    pub served_bytes: AtomicU64,
    pub failed_reads: AtomicU64,
    /// Opens answered with a kernel passthrough file.
    pub passthrough_opens: AtomicU64,
    /// Opens answered "the kernel opens files itself" (without passthrough:
    /// the first one; the kernel sends no more).
    pub skipped_opens: AtomicU64,
    /// Opens of small local files whose bytes were put into the kernel's
    /// page cache before the open was answered (`FUSE_NOTIFY_STORE`): their
    /// reads do not come to the daemon.
    pub stored_opens: AtomicU64,
    /// `LOOKUP`s answered: a round trip each, for names present and missing
    /// alike (the kernel caches both, so a name costs one per mount).
    pub lookups: AtomicU64,
    /// Compressed bytes fetched by prefetch.
    pub prefetched_bytes: AtomicU64,
    /// Compressed bytes fetched ahead of a read (neighbouring chunks, and
    /// sequential readahead).
    pub fetched_ahead_bytes: AtomicU64,
    /// Compressed bytes of prefetched chunks that a reader then used.
    pub prefetch_hit_bytes: AtomicU64,
    /// Compressed bytes of the distinct chunks readers needed (the base of
    /// the prefetch hit share).
    pub demanded_bytes: AtomicU64,
    /// Files fetched ahead because a Python module being loaded imports
    /// them or an ELF object being loaded needs them (see `fs/imports.rs`;
    /// their bytes count as fetched ahead).
    pub followed_files: AtomicU64,
}

type Outcome = Option<Result<(), String>>;
/// The senders of the chunks one [`RemoteLayer::ensure`] fetches, by digest.
type Claims = HashMap<Digest, watch::Sender<Outcome>>;

/// Bytes of a read: a slice of one mapped chunk (no copy), or assembled.
pub enum ReadData {
    Mapped(Arc<Mmap>, Range<usize>),
    Owned(Vec<u8>),
}

impl ReadData {
    pub fn as_slice(&self) -> &[u8] {
        match self {
            ReadData::Mapped(m, r) => &m[r.clone()],
            ReadData::Owned(v) => v,
        }
    }
}

/// Size of the windows in which a whole-file mapping is read ahead.
const WILLNEED_WINDOW: u64 = 2 << 20;
/// How many windows ahead of the reader: 8 MiB, as deep as the kernel's own
/// readahead on fast disks (`read_ahead_kb` is 8192 on this machine's
/// virtio disk). One window ahead kept too little I/O in flight: a reader of
/// a file not yet in the page cache caught up with it and waited on faults.
const WILLNEED_AHEAD: u64 = 4;

/// The windows (first, last) to read ahead for a read of `offset..end`: a
/// read at the start asks for the first windows, and a read that enters a
/// window asks for the one `WILLNEED_AHEAD` beyond it (asking for the same
/// pages on every read walks the page cache each time, which cost more than
/// the reads themselves). Stateless, so reads handled out of order by the
/// FUSE threads still leave no gap.
fn windows_to_read_ahead(offset: u64, end: u64) -> Vec<(u64, u64)> {
    if offset == 0 {
        return vec![(0, WILLNEED_AHEAD)];
    }
    let entered = offset
        .is_multiple_of(WILLNEED_WINDOW)
        .then_some(offset / WILLNEED_WINDOW);
    let crossed = (offset / WILLNEED_WINDOW != (end.max(1) - 1) / WILLNEED_WINDOW)
        .then_some((end - 1) / WILLNEED_WINDOW);
    [entered, crossed]
        .into_iter()
        .flatten()
        .map(|w| (w + WILLNEED_AHEAD, w + WILLNEED_AHEAD))
        .collect()
}

/// Asks the kernel to read a whole-file mapping ahead of a sequential reader.
fn advise_window_ahead(m: &Mmap, offset: u64, end: u64) {
    let len = m.len() as u64;
    for (first, last) in windows_to_read_ahead(offset, end) {
        let from = first * WILLNEED_WINDOW;
        if from < len {
            let n = ((last + 1) * WILLNEED_WINDOW).min(len) - from;
            let _ = m.advise_range(memmap2::Advice::WillNeed, from as usize, n as usize);
        }
    }
}

/// A layer's TOC, fetched and verified against the digest its descriptor
/// carries ([`RemoteLayer::fetch_toc`]): all a layer needs from the network
/// before it can be opened. What is left, decoding it and building the index
/// ([`FetchedToc::open`]), is CPU work of tens of milliseconds for a layer
/// of 40,000 files, which a caller may do later than the fetch.
pub struct FetchedToc {
    client: Arc<RegistryClient>,
    image: ImageRef,
    layer: Digest,
    toc_digest: Digest,
    compressed: bytes::Bytes,
    /// From the cache (not stored again).
    kept: bool,
    data_end: u64,
    cache: Arc<ChunkCache>,
    opts: LayerOptions,
    started: std::time::Instant,
    fetching: std::time::Duration,
}

impl FetchedToc {
    /// The layer's blob digest.
    pub fn layer(&self) -> &Digest {
        &self.layer
    }

    /// The image the layer was fetched for.
    pub fn image(&self) -> &ImageRef {
        &self.image
    }

    /// Decodes the TOC and builds the layer's index (blocking: tens of
    /// milliseconds for a large layer). A TOC that verified but does not
    /// decode would come the same from any source: an error, not retried.
    pub fn open(self) -> Result<RemoteLayer, LayerError> {
        let not_lazy = |reason: String| LayerError::NotLazy {
            image: self.image.to_string(),
            layer: self.layer.clone(),
            reason,
        };
        let decode_started = std::time::Instant::now();
        // Verified by digest already.
        let json = Toc::inflate(&self.compressed, None, MAX_TOC_BYTES)
            .map_err(|e| not_lazy(format!("TOC: {e}")))?;
        // The TOC's strings borrow from its JSON: decoded and indexed here.
        let toc = Toc::parse(&json).map_err(|e| not_lazy(format!("TOC: {e}")))?;
        let decoded = decode_started.elapsed();
        let index =
            LayerIndex::from_toc(&toc, self.data_end).map_err(|e| not_lazy(e.to_string()))?;
        drop(toc);
        if !self.kept {
            self.cache.put_toc(&self.toc_digest, &self.compressed);
        }
        tracing::info!(
            image = %self.image,
            layer = %self.layer,
            entries = index.nodes().len(),
            chunks = index.chunks().len(),
            toc_bytes = self.compressed.len(),
            fetch_ms = self.fetching.as_millis() as u64,
            decode_ms = decoded.as_millis() as u64,
            index_ms = (decode_started.elapsed() - decoded).as_millis() as u64,
            since_fetch_ms = (self.started.elapsed() - self.fetching).as_millis() as u64,
            "layer index ready"
        );
        Ok(RemoteLayer {
            client: self.client,
            image: self.image,
            digest: self.layer,
            toc_digest: self.toc_digest,
            index,
            cache: self.cache,
            opts: self.opts,
            inflight: Mutex::new(HashMap::new()),
            prefetched: Mutex::new(HashMap::new()),
            demanded: Mutex::new(Default::default()),
            profile_batches: AtomicUsize::new(0),
            profile_chunks: Mutex::new(Default::default()),
            stats: LayerStats::default(),
        })
    }
}

pub struct RemoteLayer {
    client: Arc<RegistryClient>,
    image: ImageRef,
    digest: Digest,
    toc_digest: Digest,
    index: LayerIndex,
    cache: Arc<ChunkCache>,
    opts: LayerOptions,
    inflight: Mutex<HashMap<Digest, watch::Receiver<Outcome>>>,
    /// Chunks prefetch fetched that no reader has used yet: (compressed size).
    prefetched: Mutex<HashMap<Digest, u64>>,
    /// Chunks readers have needed so far.
    demanded: Mutex<std::collections::HashSet<Digest>>,
    /// Batches of a prefetch profile queued or being fetched for this layer.
    profile_batches: AtomicUsize,
    /// Chunks a prefetch profile queued for this layer (see
    /// [`RemoteLayer::in_profile`]).
    profile_chunks: Mutex<std::collections::HashSet<Digest>>,
    pub stats: LayerStats,
}

impl std::fmt::Debug for RemoteLayer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "RemoteLayer({}@{})", self.image, self.digest)
    }
}

/// Removes a chunk's in-flight entry however the leader ends.
struct InflightGuard<'a> {
    layer: &'a RemoteLayer,
    digests: Vec<Digest>,
}

impl Drop for InflightGuard<'_> {
    fn drop(&mut self) {
        let mut map = self.layer.inflight.lock().expect("inflight");
        for d in &self.digests {
            map.remove(d);
        }
    }
}

impl RemoteLayer {
    /// Opens a layer from its descriptor: fetches and verifies its TOC (the
    /// descriptor must carry the TOC digest) and validates it.
    pub async fn open(
        client: Arc<RegistryClient>,
        image: ImageRef,
        layer: &Descriptor,
        cache: Arc<ChunkCache>,
        opts: LayerOptions,
    ) -> Result<Self, LayerError> {
        let toc = Self::fetch_toc(client, image, layer, cache, opts).await?;
        let (image, digest) = (toc.image.to_string(), toc.layer.clone());
        tokio::task::spawn_blocking(move || toc.open())
            .await
            .map_err(|e| LayerError::NotLazy {
                image,
                layer: digest,
                reason: e.to_string(),
            })?
    }

    /// The first half of [`RemoteLayer::open`]: the layer's TOC, from the
    /// cache or the registry, verified against the digest its descriptor
    /// carries (fetched again, up to three times, while it does not match).
    pub async fn fetch_toc(
        client: Arc<RegistryClient>,
        image: ImageRef,
        layer: &Descriptor,
        cache: Arc<ChunkCache>,
        opts: LayerOptions,
    ) -> Result<FetchedToc, LayerError> {
        let not_lazy = |reason: String| LayerError::NotLazy {
            image: image.to_string(),
            layer: layer.digest.clone(),
            reason,
        };
        let footer = Footer::from_annotations(&layer.annotations)
            .map_err(|e| not_lazy(e.to_string()))?
            .ok_or_else(|| not_lazy("no zstd:chunked annotations".into()))?;
        let toc_digest = footer.toc_digest.clone().ok_or_else(|| {
            not_lazy("no TOC checksum annotation, so the TOC cannot be verified".into())
        })?;
        if footer.toc.end() > layer.size || footer.toc.offset < 8 {
            return Err(not_lazy(format!(
                "TOC position {:?} lies outside the blob",
                footer.toc
            )));
        }
        let range = footer.toc.offset..footer.toc.end();
        let started = std::time::Instant::now();
        let mut fetching = std::time::Duration::ZERO;
        // Hashing megabytes (and reading the cached copy) is blocking work,
        // kept off the runtime's workers that other layers' fetches need.
        let verify = |bytes: Option<bytes::Bytes>| {
            let (digest, cache) = (toc_digest.clone(), cache.clone());
            async move {
                tokio::task::spawn_blocking(move || {
                    // None: a TOC kept from an earlier mount, if it still verifies.
                    let bytes = match bytes {
                        Some(b) => b,
                        None => bytes::Bytes::from(cache.toc(&digest)?),
                    };
                    (Digest::of(digest.algorithm(), &bytes) == digest).then_some(bytes)
                })
                .await
                .ok()
                .flatten()
            }
        };
        let mut kept = true;
        let mut compressed = verify(None).await;
        for attempt in 0..VERIFY_ATTEMPTS {
            if compressed.is_some() {
                break;
            }
            kept = false;
            let fetch_started = std::time::Instant::now();
            let bytes = client
                .blob_range(&image, &layer.digest, range.clone(), attempt as usize)
                .await
                .map_err(|e| LayerError::Fetch {
                    image: image.to_string(),
                    layer: layer.digest.clone(),
                    reason: format!("fetching the TOC: {e}"),
                })?;
            fetching += fetch_started.elapsed();
            compressed = verify(Some(bytes)).await;
        }
        let compressed = compressed.ok_or_else(|| {
            not_lazy(format!(
                "TOC: fetched {VERIFY_ATTEMPTS} times, never with digest {toc_digest}"
            ))
        })?;
        Ok(FetchedToc {
            client,
            image,
            layer: layer.digest.clone(),
            toc_digest,
            compressed,
            kept,
            data_end: footer.toc.offset - 8,
            cache,
            opts,
            started,
            fetching,
        })
    }

    /// The chunk cache this layer reads from.
    pub fn cache(&self) -> &Arc<ChunkCache> {
        &self.cache
    }

    /// Every cache key this layer uses: its chunks, whole files (made for
    /// passthrough) and its TOC.
    pub fn cache_keys(&self) -> impl Iterator<Item = &Digest> {
        let files = self.index.nodes().iter().filter_map(|n| match &n.kind {
            sluice_format::chunked::NodeKind::File {
                digest: Some(d), ..
            } => Some(d),
            _ => None,
        });
        self.index
            .chunks()
            .iter()
            .map(|c| &c.digest)
            .chain(files)
            .chain(std::iter::once(&self.toc_digest))
    }

    pub fn index(&self) -> &LayerIndex {
        &self.index
    }

    pub fn image(&self) -> &ImageRef {
        &self.image
    }

    pub fn digest(&self) -> &Digest {
        &self.digest
    }

    fn fetch_err(&self, reason: String) -> LayerError {
        LayerError::Fetch {
            image: self.image.to_string(),
            layer: self.digest.clone(),
            reason,
        }
    }

    /// Whether a chunk is in the cache.
    pub fn has_chunk(&self, d: &Digest) -> bool {
        self.cache.contains(d)
    }

    /// The chunks of `chunks` that hold data and are neither cached nor
    /// being fetched: what work ahead of readers has left to fetch (and to
    /// count as fetched ahead).
    pub fn not_yet_fetched<'c>(
        &self,
        chunks: impl IntoIterator<Item = &'c ChunkRef>,
    ) -> Vec<ChunkRef> {
        let inflight = self.inflight.lock().expect("inflight");
        chunks
            .into_iter()
            .filter(|c| {
                !c.zeros
                    && c.blob_len > 0
                    && !self.cache.contains(&c.digest)
                    && !inflight.contains_key(&c.digest)
            })
            .cloned()
            .collect()
    }

    /// Has the kernel read the cached chunks ahead of a reader of a file
    /// served chunk by chunk into the page cache, in the background (see
    /// [`ChunkCache::read_ahead`]; chunks not cached are fetched by the
    /// filesystem's own readahead).
    fn read_ahead_chunks(&self, node: usize, offset: u64, end: u64) {
        let digests: Vec<Digest> = windows_to_read_ahead(offset, end)
            .into_iter()
            .flat_map(|(first, last)| {
                let from = first * WILLNEED_WINDOW;
                self.index
                    .chunks_for_range(node, from, (last + 1 - first) * WILLNEED_WINDOW)
                    .iter()
                    // This read's own chunks are being read already; a file
                    // read to its end has nothing left to ask for.
                    .filter(|c| c.file_offset >= end)
                    .map(|c| c.digest.clone())
                    .collect::<Vec<_>>()
            })
            .collect();
        if !digests.is_empty() {
            let cache = self.cache.clone();
            tokio::task::spawn_blocking(move || cache.read_ahead(&digests));
        }
    }

    /// Whether a prefetch profile's work for this layer is queued or
    /// running: the profile then says what comes next, better than the
    /// layer's order does (see `fs`'s fetches ahead of waiting readers).
    pub fn profile_pending(&self) -> bool {
        self.profile_batches.load(Ordering::Relaxed) > 0
    }

    /// Whether a prefetch profile's work was ever queued for this layer.
    pub fn profiled(&self) -> bool {
        !self
            .profile_chunks
            .lock()
            .expect("profile chunks")
            .is_empty()
    }

    /// Whether a prefetch profile queued chunks of file `node`: the start it
    /// was recorded from read that file, and what that start read next is
    /// in the profile too.
    pub fn in_profile(&self, node: usize) -> bool {
        let chunks = self.index.file_chunks_of(node);
        let queued = self.profile_chunks.lock().expect("profile chunks");
        !queued.is_empty() && chunks.iter().any(|c| queued.contains(&c.digest))
    }

    /// A prefetch profile queued `chunks` of this layer.
    pub(crate) fn note_profile<'a>(&self, chunks: impl IntoIterator<Item = &'a ChunkRef>) {
        self.profile_chunks
            .lock()
            .expect("profile chunks")
            .extend(chunks.into_iter().map(|c| c.digest.clone()));
    }

    /// A batch of profile work for this layer was queued (`true`) or is
    /// done or dropped (`false`).
    pub(crate) fn count_profile_batch(&self, queued: bool) {
        if queued {
            self.profile_batches.fetch_add(1, Ordering::Relaxed);
        } else {
            self.profile_batches.fetch_sub(1, Ordering::Relaxed);
        }
    }

    /// Fetches chunks ahead of readers (see [`crate::prefetch`]).
    pub async fn prefetch(&self, chunks: &[ChunkRef]) -> Result<(), LayerError> {
        let missing: Vec<ChunkRef> = chunks
            .iter()
            .filter(|c| !self.cache.contains(&c.digest))
            .cloned()
            .collect();
        self.fetch_missing(&missing, false).await?;
        let mut p = self.prefetched.lock().expect("prefetched");
        for c in &missing {
            p.insert(c.digest.clone(), c.blob_len);
            self.stats
                .prefetched_bytes
                .fetch_add(c.blob_len, Ordering::Relaxed);
        }
        Ok(())
    }

    /// Counts prefetched chunks that a reader now uses.
    fn note_demand(&self, chunks: &[ChunkRef]) {
        {
            let mut d = self.demanded.lock().expect("demanded");
            for c in chunks {
                if d.insert(c.digest.clone()) {
                    self.stats
                        .demanded_bytes
                        .fetch_add(c.blob_len, Ordering::Relaxed);
                }
            }
        }
        let mut p = self.prefetched.lock().expect("prefetched");
        if p.is_empty() {
            return;
        }
        for c in chunks {
            if let Some(bytes) = p.remove(&c.digest) {
                self.stats
                    .prefetch_hit_bytes
                    .fetch_add(bytes, Ordering::Relaxed);
            }
        }
    }

    /// Makes sure `chunks` are in the cache for a reader (or ahead of one),
    /// fetching what is missing. Whoever waits for one of the chunks this
    /// call fetches is told as soon as that chunk is cached, not when the
    /// whole fetch is done.
    pub async fn ensure(&self, chunks: &[ChunkRef]) -> Result<(), LayerError> {
        self.fetch_missing(chunks, true).await
    }

    /// [`RemoteLayer::ensure`]; `foreground`: for a reader (or ahead of one),
    /// so that a missing chunk tells the node's foreground clock (background
    /// fill yields to it); prefetch does not.
    async fn fetch_missing(&self, chunks: &[ChunkRef], foreground: bool) -> Result<(), LayerError> {
        // Chunks whose fetch by another reader failed are tried again here,
        // in a loop. (It was a recursion: with the registry gone, readers
        // kept failing each other's waits, each level a frame more on a FUSE
        // thread's stack, until one overflowed in a `cargo test` run.)
        let mut retry: Vec<ChunkRef>;
        let mut want = chunks;
        while !want.is_empty() {
            let mut mine = Vec::new();
            let mut theirs = Vec::new();
            let mut claims = HashMap::new();
            {
                let mut map = self.inflight.lock().expect("inflight");
                for c in want {
                    if self.cache.contains(&c.digest) {
                        continue;
                    }
                    if let Some(rx) = map.get(&c.digest) {
                        theirs.push((c.clone(), rx.clone()));
                    } else {
                        let (tx, rx) = watch::channel(None);
                        map.insert(c.digest.clone(), rx);
                        claims.insert(c.digest.clone(), tx);
                        mine.push(c.clone());
                    }
                }
            }
            if foreground && !(mine.is_empty() && theirs.is_empty()) {
                self.cache.stats.foreground.touch();
            }
            let guard = InflightGuard {
                layer: self,
                digests: mine.iter().map(|c| c.digest.clone()).collect(),
            };
            let result = self.fetch_chunks(&mine, &claims).await;
            // Chunks not cached by now failed, or their fetch was abandoned.
            let outcome: Outcome = Some(match &result {
                Ok(()) => Ok(()),
                Err(e) => Err(e.to_string()),
            });
            for tx in claims.values() {
                tx.send_if_modified(|v| {
                    v.is_none() && {
                        *v = outcome.clone();
                        true
                    }
                });
            }
            drop(guard);
            result?;
            let mut failed = Vec::new();
            for (c, mut rx) in theirs {
                let waited = rx.wait_for(|v| v.is_some()).await.map(|v| v.clone());
                match waited {
                    Ok(Some(Ok(()))) => {}
                    // The other fetch failed or was abandoned: try ourselves.
                    _ => failed.push(c),
                }
            }
            retry = failed;
            want = &retry;
        }
        Ok(())
    }

    /// For a reader that must wait for `chunks` (a slice of this layer's
    /// index): the chunks that follow them in the blob and are neither cached
    /// nor being fetched, up to [`LayerOptions::fetch_ahead`] compressed
    /// bytes from the first of `chunks`, contiguous. The caller fetches them
    /// alongside (in parallel with) the reader's own fetch. Empty when
    /// `chunks` are all local.
    pub fn fetch_ahead_of(&self, chunks: &[ChunkRef]) -> Vec<ChunkRef> {
        if chunks.iter().all(|c| self.cache.contains(&c.digest)) {
            return Vec::new();
        }
        let (Some(first), Some(last)) = (chunks.first(), chunks.last()) else {
            return Vec::new();
        };
        self.chunks_following(last, first.blob_offset + self.opts.fetch_ahead)
    }

    /// Where a chunk of this layer's index sits in its chunk array (files in
    /// blob order); `None` for a chunk from elsewhere.
    pub fn chunk_position(&self, c: &ChunkRef) -> Option<usize> {
        let all = self.index.chunks();
        let at = (c as *const ChunkRef as usize).wrapping_sub(all.as_ptr() as usize)
            / std::mem::size_of::<ChunkRef>();
        (at < all.len() && std::ptr::eq(&all[at], c)).then_some(at)
    }

    /// The chunks after `last` (a chunk of this layer's index) in the blob,
    /// contiguous, ending before blob offset `limit`, that are neither cached
    /// nor being fetched; counted as fetched ahead.
    pub fn chunks_following(&self, last: &ChunkRef, limit: u64) -> Vec<ChunkRef> {
        let all = self.index.chunks();
        let mut end = last.blob_offset + last.blob_len;
        if end >= limit {
            return Vec::new();
        }
        let Some(at) = self.chunk_position(last) else {
            debug_assert!(false, "chunks come from the index");
            return Vec::new();
        };
        let mut run = Vec::new();
        for c in all.iter().skip(at + 1) {
            if c.zeros || c.blob_len == 0 {
                continue;
            }
            if c.blob_offset < end
                || c.blob_offset - end > MAX_GAP
                || c.blob_offset + c.blob_len > limit
            {
                break;
            }
            end = c.blob_offset + c.blob_len;
            run.push(c);
        }
        let out = self.not_yet_fetched(run);
        self.count_fetched_ahead(&out);
        out
    }

    /// Counts chunks about to be fetched ahead of readers (not profile
    /// prefetch) in the layer's statistics.
    pub fn count_fetched_ahead(&self, chunks: &[ChunkRef]) {
        self.stats.fetched_ahead_bytes.fetch_add(
            chunks.iter().map(|c| c.blob_len).sum::<u64>(),
            Ordering::Relaxed,
        );
    }

    /// Fetches chunks (already claimed by us, with the senders that tell
    /// their waiters), coalescing neighbours.
    async fn fetch_chunks(&self, chunks: &[ChunkRef], claims: &Claims) -> Result<(), LayerError> {
        let mut sorted: Vec<&ChunkRef> = chunks.iter().collect();
        sorted.sort_by_key(|c| c.blob_offset);
        let mut groups: Vec<Vec<&ChunkRef>> = Vec::new();
        for c in sorted {
            match groups.last_mut() {
                Some(g) => {
                    let first = g[0].blob_offset;
                    let last = g[g.len() - 1];
                    let end = last.blob_offset + last.blob_len;
                    if c.blob_offset >= end
                        && c.blob_offset - end <= MAX_GAP
                        && c.blob_offset + c.blob_len - first <= MAX_COALESCED
                    {
                        g.push(c);
                    } else {
                        groups.push(vec![c]);
                    }
                }
                None => groups.push(vec![c]),
            }
        }
        // Several ranges at once: on a link with latency, round trips in
        // parallel (HTTP/1.1 pooled connections or HTTP/2 streams).
        use futures_util::stream::{StreamExt, TryStreamExt};
        let fetches: Vec<_> = groups.iter().map(|g| self.fetch_group(g, claims)).collect();
        futures_util::stream::iter(fetches)
            .buffer_unordered(PARALLEL_RANGES)
            .try_collect::<Vec<()>>()
            .await?;
        Ok(())
    }

    /// Fetches one run of neighbouring chunks in one range request, caching
    /// each chunk as soon as its bytes are in. Chunks whose bytes fail
    /// verification, or that a broken-off body did not bring, are fetched
    /// again (from the next source), up to [`VERIFY_ATTEMPTS`] requests.
    async fn fetch_group(&self, group: &[&ChunkRef], claims: &Claims) -> Result<(), LayerError> {
        let mut pending: VecDeque<&ChunkRef> = group.iter().copied().collect();
        let mut attempt = 0;
        let mut last_error = String::new();
        while let (Some(first), Some(last)) = (pending.front(), pending.back()) {
            if attempt == VERIFY_ATTEMPTS {
                return Err(self.fetch_err(format!(
                    "{} chunk(s) still missing after {attempt} fetches: {last_error}",
                    pending.len()
                )));
            }
            attempt += 1;
            let start = first.blob_offset;
            let end = last.blob_offset + last.blob_len;
            let started = std::time::Instant::now();
            let mut body = self
                .client
                .blob_range_stream(&self.image, &self.digest, start..end, attempt as usize - 1)
                .await
                .map_err(|e: FetchError| self.fetch_err(e.to_string()))?;
            self.stats.fetch_requests.fetch_add(1, Ordering::Relaxed);
            let mut failed = Vec::new();
            // Bytes of the body from blob offset `at` on, not used yet.
            let mut held: Vec<u8> = Vec::new();
            let mut at = start;
            loop {
                let piece = match body.next().await {
                    None => break,
                    Some(Ok(piece)) => piece,
                    Some(Err(e)) => {
                        last_error = e.to_string();
                        tracing::warn!(
                            image = %self.image,
                            layer = %self.digest,
                            attempt,
                            chunks_left = pending.len(),
                            error = %last_error,
                            "range broke off; fetching the rest again"
                        );
                        break;
                    }
                };
                self.stats
                    .fetched_bytes
                    .fetch_add(piece.len() as u64, Ordering::Relaxed);
                // Chunks wholly inside one piece are used from it directly.
                let used = if held.is_empty() {
                    let used = self.cache_arrived(&piece, at, &mut pending, &mut failed, claims);
                    held.extend_from_slice(&piece[used..]);
                    used
                } else {
                    held.extend_from_slice(&piece);
                    let used = self.cache_arrived(&held, at, &mut pending, &mut failed, claims);
                    held.drain(..used);
                    used
                };
                at += used as u64;
            }
            if let Some(h) = &self.opts.fetch_latency {
                h.observe(started.elapsed().as_secs_f64());
            }
            tracing::debug!(
                layer = %self.digest,
                start,
                bytes = end - start,
                chunks = group.len(),
                ms = started.elapsed().as_millis() as u64,
                "fetched range"
            );
            if !failed.is_empty() {
                last_error = failed[0].1.clone();
                tracing::warn!(
                    image = %self.image,
                    layer = %self.digest,
                    attempt,
                    chunks = failed.len(),
                    error = %last_error,
                    "fetched chunks failed verification"
                );
            }
            // Whatever is not cached yet, in blob order, goes again.
            let mut again: Vec<&ChunkRef> = failed.into_iter().map(|(c, _)| c).collect();
            again.extend(pending.drain(..));
            again.sort_by_key(|c| c.blob_offset);
            pending = again.into();
        }
        Ok(())
    }

    /// Caches the chunks at the front of `pending` whose bytes `data` (body
    /// bytes from blob offset `at` on) holds in full, and tells their
    /// waiters; chunks that fail go to `failed`. Returns how many bytes of
    /// `data` are used up (everything before the next chunk still pending).
    fn cache_arrived<'c>(
        &self,
        data: &[u8],
        at: u64,
        pending: &mut VecDeque<&'c ChunkRef>,
        failed: &mut Vec<(&'c ChunkRef, String)>,
        claims: &Claims,
    ) -> usize {
        while let Some(&c) = pending.front() {
            let from = (c.blob_offset - at) as usize;
            let to = from + c.blob_len as usize;
            if to > data.len() {
                return from.min(data.len());
            }
            pending.pop_front();
            let name = self.digest.to_string();
            let cached = self.cache.insert_with(&c.digest, c.size, |out| {
                LayerIndex::decompress_chunk(&name, c, &data[from..to], out)
                    .map_err(|e| e.to_string())
            });
            match cached {
                Ok(_) => {
                    if let Some(tx) = claims.get(&c.digest) {
                        tx.send_replace(Some(Ok(())));
                    }
                }
                Err(e) => failed.push((c, e.to_string())),
            }
        }
        data.len()
    }

    /// Makes a whole file local and returns it as one cached entry (keyed by
    /// the file's digest: for a one-chunk file that is the chunk itself), for
    /// FUSE passthrough. Fetches what is missing, within the read deadline.
    /// `None` for a file too small to be stored as a file of its own
    /// ([`ChunkCache::stores_as_file`]): it is local then, served by the daemon.
    pub fn materialize_blocking(
        &self,
        runtime: &tokio::runtime::Handle,
        node: usize,
    ) -> Result<Option<std::fs::File>, LayerError> {
        let content = self.index.resolve(node);
        let sluice_format::chunked::NodeKind::File {
            size,
            digest: Some(digest),
            ..
        } = &self.index.node(content).kind
        else {
            return Ok(None);
        };
        let chunks = self.index.file_chunks_of(content);
        self.note_demand(chunks);
        if let Some(f) = self.cache.open_file(digest) {
            return Ok(Some(f));
        }
        let started = std::time::Instant::now();
        self.block_within_deadline(runtime, node, Box::pin(self.ensure(chunks)))?;
        self.log_wait(node, 0, *size, started);
        if !ChunkCache::stores_as_file(*size) {
            // Local now, and small: kept in a pack, served by the daemon.
            return Ok(None);
        }
        let mut maps = Vec::with_capacity(chunks.len());
        for c in chunks {
            match self.cache.get(&c.digest) {
                Some(m) => maps.push(m),
                None => return Ok(None),
            }
        }
        let r = self.cache.insert_with(digest, *size, |out| {
            let mut at = 0usize;
            for m in &maps {
                out[at..at + m.len()].copy_from_slice(m);
                at += m.len();
            }
            Ok(())
        });
        match r {
            Ok(_) => Ok(self.cache.open_file(digest)),
            Err(e) => Err(LayerError::Read {
                image: self.image.to_string(),
                layer: self.digest.clone(),
                file: self.index.node(node).path.clone(),
                reason: e.to_string(),
            }),
        }
    }

    /// Runs `work` for file `node` from a non-async thread, giving up with
    /// [`LayerError::Deadline`] after the read deadline.
    /// `work` comes boxed: it runs on a FUSE thread's stack (2 MiB), and
    /// an unoptimized build's fetch futures are big enough that a few copies
    /// of one overflowed it (a `cargo test` run aborted in a READ).
    fn block_within_deadline<T>(
        &self,
        runtime: &tokio::runtime::Handle,
        node: usize,
        work: std::pin::Pin<
            Box<dyn std::future::Future<Output = Result<T, LayerError>> + Send + '_>,
        >,
    ) -> Result<T, LayerError> {
        let deadline = self.opts.read_deadline;
        runtime
            .block_on(async { tokio::time::timeout(deadline, work).await })
            .unwrap_or_else(|_| {
                Err(LayerError::Deadline {
                    image: self.image.to_string(),
                    layer: self.digest.clone(),
                    file: self.index.node(node).path.clone(),
                    deadline,
                })
            })
    }

    /// Whether a file is cached as one whole-file entry (what passthrough
    /// hands the kernel; a one-chunk file is its chunk).
    pub fn is_whole(&self, node: usize) -> bool {
        match &self.index.node(self.index.resolve(node)).kind {
            sluice_format::chunked::NodeKind::File {
                digest: Some(d), ..
            } => self.cache.contains(d),
            _ => false,
        }
    }

    /// A file's bytes, if all of them are cached (nothing is fetched, and
    /// this is not a read: not counted as demanded or served).
    pub fn cached_file(&self, node: usize) -> Option<Vec<u8>> {
        self.cached_range(node, 0, u64::MAX)
    }

    /// Up to `len` bytes at `offset` of a file (fewer at its end), if they
    /// are cached; as [`Self::cached_file`].
    pub fn cached_range(&self, node: usize, offset: u64, len: u64) -> Option<Vec<u8>> {
        let chunks = self.index.chunks_for_range(node, offset, len);
        let end = chunks.last().map_or(offset, |c| {
            (c.file_offset + c.size).min(offset.saturating_add(len))
        });
        let mut out = Vec::with_capacity(end.saturating_sub(offset) as usize);
        for c in chunks {
            let from = offset.max(c.file_offset) - c.file_offset;
            let to = end.min(c.file_offset + c.size) - c.file_offset;
            if !self
                .cache
                .read_into(&c.digest, from as usize..to as usize, &mut out)
            {
                return None;
            }
        }
        Some(out)
    }

    /// Whether every chunk of a file is cached.
    pub fn is_local(&self, node: usize) -> bool {
        self.index
            .file_chunks_of(node)
            .iter()
            .all(|c| self.cache.contains(&c.digest))
    }

    /// Reads `size` bytes at `offset` of node `node` (hard links resolved);
    /// blocks the calling (non-async) thread, within the read deadline.
    pub fn read_blocking(
        &self,
        runtime: &tokio::runtime::Handle,
        node: usize,
        offset: u64,
        size: u32,
    ) -> Result<ReadData, LayerError> {
        let started = std::time::Instant::now();
        let r = self.block_within_deadline(runtime, node, Box::pin(self.read(node, offset, size)));
        self.log_wait(node, offset, u64::from(size), started);
        if let Err(e) = &r {
            self.stats.failed_reads.fetch_add(1, Ordering::Relaxed);
            tracing::error!(error = %e, "read failed");
        }
        r
    }

    /// Logs a read (or open) of `node` that waited 2 ms or more (for the
    /// link, or a slow disk), for tuning what is fetched ahead
    /// (`RUST_LOG=sluice_puller::layer=debug`).
    fn log_wait(&self, node: usize, offset: u64, len: u64, started: std::time::Instant) {
        let waited = started.elapsed();
        if waited >= Duration::from_millis(2) {
            tracing::debug!(
                file = %self.index.node(node).path,
                offset,
                len,
                ms = waited.as_millis() as u64,
                "read waited"
            );
        }
    }

    /// Reads `size` bytes at `offset` of a file.
    pub async fn read(&self, node: usize, offset: u64, size: u32) -> Result<ReadData, LayerError> {
        let chunks = self.index.chunks_for_range(node, offset, u64::from(size));
        if chunks.is_empty() {
            return Ok(ReadData::Owned(Vec::new()));
        }
        let file_size = match self.index.node(self.index.resolve(node)).kind {
            sluice_format::chunked::NodeKind::File { size, .. } => size,
            _ => 0,
        };
        let end = (offset + u64::from(size)).min(file_size);
        self.note_demand(chunks);
        // A file made whole for passthrough is one mapping: read it from there.
        if let sluice_format::chunked::NodeKind::File {
            digest: Some(d), ..
        } = &self.index.node(self.index.resolve(node)).kind
        {
            if chunks.len() > 1 && self.cache.contains(d) {
                if let Some(m) = self.cache.get(d) {
                    advise_window_ahead(&m, offset, end);
                    self.stats
                        .served_bytes
                        .fetch_add(end - offset, Ordering::Relaxed);
                    return Ok(ReadData::Mapped(m, offset as usize..end as usize));
                }
            }
        }
        self.read_ahead_chunks(node, offset, end);
        for attempt in 0..2 {
            self.ensure(chunks).await?;
            let mapped = match chunks {
                [c] => self.cache.mapped(&c.digest).map(|m| (c, m)),
                _ => None,
            };
            let served = if let Some((c, m)) = mapped {
                // Within one chunk that is mapped already: a slice of the
                // mapping, no copy here.
                let from = (offset - c.file_offset) as usize;
                let to = (end - c.file_offset) as usize;
                Some(ReadData::Mapped(m, from..to))
            } else {
                let mut out = Vec::with_capacity((end - offset) as usize);
                chunks
                    .iter()
                    .all(|c| {
                        let from = offset.max(c.file_offset) - c.file_offset;
                        let to = end.min(c.file_offset + c.size) - c.file_offset;
                        self.cache
                            .read_into(&c.digest, from as usize..to as usize, &mut out)
                    })
                    .then_some(ReadData::Owned(out))
            };
            let Some(data) = served else {
                // Evicted (or found torn) between fetch and read: once more.
                if attempt == 0 {
                    continue;
                }
                return Err(LayerError::Read {
                    image: self.image.to_string(),
                    layer: self.digest.clone(),
                    file: self.index.node(node).path.clone(),
                    reason: "chunk vanished from the cache twice; is the cache too small?".into(),
                });
            };
            self.stats
                .served_bytes
                .fetch_add(end - offset, Ordering::Relaxed);
            return Ok(data);
        }
        unreachable!("the loop returns")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    /// A sequential reader in 1 MiB reads is asked ahead for every window
    /// exactly once, whatever order the reads are handled in.
    #[test]
    fn read_ahead_windows_cover_a_sequential_reader_once() {
        let mut asked: Vec<u64> = Vec::new();
        let mut reads: Vec<u64> = (0..64).collect();
        // Out of order, as several FUSE threads may handle them.
        reads.swap(3, 4);
        reads.swap(10, 17);
        for i in reads {
            for (first, last) in windows_to_read_ahead(i * MIB, (i + 1) * MIB) {
                asked.extend(first..=last);
            }
        }
        asked.sort();
        let expected: Vec<u64> = (0..=(63 / 2 + WILLNEED_AHEAD)).collect();
        assert_eq!(asked, expected);
    }

    #[test]
    fn a_read_crossing_into_a_window_asks_beyond_it() {
        let w = WILLNEED_WINDOW;
        assert_eq!(
            windows_to_read_ahead(w - 4096, w + 4096),
            [(1 + WILLNEED_AHEAD, 1 + WILLNEED_AHEAD)]
        );
        assert!(windows_to_read_ahead(4096, 8192).is_empty());
    }
}
