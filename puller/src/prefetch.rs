//! Prefetching: fetching chunks before anyone reads them.
//!
//! Three priorities, highest first: reads that a process is waiting on (they
//! never queue here: they call the layer directly, and share in-flight fetches
//! with prefetch through the layer's single-flight), then the entries of a
//! prefetch profile in the order given, then an optional background fill of a
//! whole layer. Prefetch runs with bounded concurrency and, optionally, a
//! bandwidth cap, so that reads in the foreground keep most of the link. Work
//! for a layer is cancelled when the layer is dropped or [`Prefetcher::cancel`]
//! is called for it.
//!
//! Background fill also stays out of the foreground's way in time: it runs
//! only once no reader has had to fetch (and no layer was mounted) for
//! [`PrefetchOptions::fill_quiet`] (the node's
//! [`ForegroundClock`](crate::cache::ForegroundClock)), with at
//! most [`FILL_IN_FLIGHT`] fetches at once, so that a container starting
//! meanwhile finds the link almost free (as SOCI's background fetcher
//! pauses after on-demand fetches).

use std::collections::{BinaryHeap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use sluice_format::chunked::ChunkRef;
use sluice_format::Digest;
use tokio::sync::Notify;

use crate::layer::RemoteLayer;

/// Priority of queued prefetch work.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Priority {
    /// Background fill of a whole layer.
    Background = 0,
    /// An entry of a prefetch profile.
    Profile = 1,
}

/// One range of one file to prefetch.
#[derive(Debug, Clone)]
pub struct PrefetchEntry {
    /// Path in the layer (normalized, no leading `/`).
    pub path: String,
    pub offset: u64,
    pub len: u64,
    /// When the start first touched it (microseconds into the start): the
    /// profile work of all layers of an image is fetched in this order,
    /// whichever layer was mounted first.
    pub order: u64,
}

struct Job {
    priority: Priority,
    /// Within a priority, lower first (profile work: its first entry's
    /// [`PrefetchEntry::order`]; background fill: 0).
    rank: u64,
    seq: u64,
    layer: Weak<RemoteLayer>,
    layer_digest: Digest,
    /// A batch of chunks (a profile's, or a stretch of a layer to fill),
    /// fetched together.
    chunks: Vec<ChunkRef>,
}

impl Drop for Job {
    /// Profile work is counted on its layer from queued to done or dropped.
    fn drop(&mut self) {
        if self.priority == Priority::Profile {
            if let Some(layer) = self.layer.upgrade() {
                layer.count_profile_batch(false);
            }
        }
    }
}

impl PartialEq for Job {
    fn eq(&self, o: &Self) -> bool {
        (self.priority, self.rank, self.seq) == (o.priority, o.rank, o.seq)
    }
}
impl Eq for Job {}
impl PartialOrd for Job {
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Job {
    /// Higher priority first; within one priority, lower rank first, then
    /// first queued first.
    fn cmp(&self, o: &Self) -> std::cmp::Ordering {
        self.priority
            .cmp(&o.priority)
            .then(o.rank.cmp(&self.rank))
            .then(o.seq.cmp(&self.seq))
    }
}

/// Limits and concurrency of prefetching.
#[derive(Debug, Clone)]
pub struct PrefetchOptions {
    /// Prefetch fetches running at once.
    pub concurrency: usize,
    /// Cap on prefetch bandwidth in bytes per second (compressed); none if 0.
    pub bytes_per_second: u64,
    /// Background fill waits until the node's foreground has not needed the
    /// link for this long (see [`crate::cache::ForegroundClock`]).
    pub fill_quiet: Duration,
}

impl Default for PrefetchOptions {
    fn default() -> Self {
        PrefetchOptions {
            concurrency: 4,
            bytes_per_second: 0,
            fill_quiet: DEFAULT_FILL_QUIET,
        }
    }
}

/// Ten seconds: most starts read what they need within that (a profile's
/// recording window is as long), and an application that reads on after
/// its start keeps fill waiting as long as its reads fetch.
pub const DEFAULT_FILL_QUIET: Duration = Duration::from_secs(10);

/// Background fetches running at once: two batches keep a 100 Mbit/s link
/// with 20 ms of latency busy, and a reader that comes meanwhile shares the
/// link with at most these two.
pub const FILL_IN_FLIGHT: u64 = 2;

struct Shared {
    queue: Mutex<BinaryHeap<Job>>,
    cancelled: Mutex<HashSet<Digest>>,
    notify: Notify,
    idle: Notify,
    seq: AtomicU64,
    running: AtomicU64,
    /// Background jobs running (at most [`FILL_IN_FLIGHT`]).
    background_running: AtomicU64,
    /// Token bucket: when the next byte may be sent.
    next_send: Mutex<Instant>,
    opts: PrefetchOptions,
    pub done_bytes: AtomicU64,
}

impl Shared {
    fn new(opts: PrefetchOptions) -> Self {
        Shared {
            queue: Mutex::new(BinaryHeap::new()),
            cancelled: Mutex::new(HashSet::new()),
            notify: Notify::new(),
            idle: Notify::new(),
            seq: AtomicU64::new(0),
            running: AtomicU64::new(0),
            background_running: AtomicU64::new(0),
            next_send: Mutex::new(Instant::now()),
            opts,
            done_bytes: AtomicU64::new(0),
        }
    }
}

/// The node's prefetch scheduler.
#[derive(Clone)]
pub struct Prefetcher {
    shared: Arc<Shared>,
}

impl Prefetcher {
    /// Starts the workers on the current Tokio runtime.
    pub fn start(runtime: &tokio::runtime::Handle, opts: PrefetchOptions) -> Self {
        let shared = Arc::new(Shared::new(opts.clone()));
        for _ in 0..opts.concurrency.max(1) {
            let shared = shared.clone();
            runtime.spawn(async move { worker(shared).await });
        }
        Prefetcher { shared }
    }

    fn push(&self, priority: Priority, rank: u64, layer: &Arc<RemoteLayer>, chunks: Vec<ChunkRef>) {
        if priority == Priority::Profile {
            layer.count_profile_batch(true);
        }
        let job = Job {
            priority,
            rank,
            seq: self.shared.seq.fetch_add(1, Ordering::Relaxed),
            layer: Arc::downgrade(layer),
            layer_digest: layer.digest().clone(),
            chunks,
        };
        self.shared.queue.lock().expect("queue").push(job);
        self.shared.notify.notify_one();
    }

    /// Queues a profile's entries for a layer, in order. Unknown paths are
    /// skipped (profiles may come from another build of the image); returns
    /// how many entries were queued. Consecutive entries are fetched in
    /// batches of [`PROFILE_BATCH`] compressed bytes: within a batch the
    /// chunks are coalesced into ranges in blob order and the ranges fetched
    /// in parallel, so that a profile of thousands of small files costs
    /// tens of round trips one after the other, not thousands (numpy-pandas:
    /// about 50 batches, 4 in flight).
    ///
    /// Batches of the layers of one image interleave by their entries'
    /// [`PrefetchEntry::order`]: a layer mounted later (its `Prepare` comes
    /// after the layers below it) has its early entries fetched before the
    /// late entries of the layers queued before it. (Queued layer after
    /// layer, numpy and pandas in the upper layer waited for all of Python's
    /// own files in the lower one, and the start read them before their turn.)
    pub fn prefetch_profile(&self, layer: &Arc<RemoteLayer>, entries: &[PrefetchEntry]) -> usize {
        self.shared
            .cancelled
            .lock()
            .expect("cancelled")
            .remove(layer.digest());
        let index = layer.index();
        let mut queued = 0;
        let mut seen = HashSet::new();
        // Each chunk with the order of the entry that wants it first.
        let mut wanted = Vec::new();
        for e in entries {
            let Some(node) = index.lookup(e.path.trim_start_matches('/')) else {
                continue;
            };
            queued += 1;
            for c in index.chunks_for_range(node, e.offset, e.len.max(1)) {
                if !c.zeros && seen.insert(c.digest.clone()) {
                    wanted.push((e.order, c.clone()));
                }
            }
        }
        layer.note_profile(wanted.iter().map(|(_, c)| c));
        // A batch ranks by its first entry.
        for batch in pieces(wanted, PROFILE_BATCH, |(_, c)| c.blob_len) {
            let rank = batch[0].0;
            let chunks = batch.into_iter().map(|(_, c)| c).collect();
            self.push(Priority::Profile, rank, layer, chunks);
        }
        queued
    }

    /// Queues the chunks of a layer that are not cached, in blob order and
    /// in batches of [`PIECE`], below profile work; they run once the
    /// foreground is quiet (see the module's documentation). Not for a
    /// layer larger than half the cache: filling it would evict what other
    /// layers' readers use. Returns how many batches were queued.
    pub fn fill_layer(&self, layer: &Arc<RemoteLayer>) -> usize {
        self.shared
            .cancelled
            .lock()
            .expect("cancelled")
            .remove(layer.digest());
        // A layer was just mounted: a container is about to start.
        layer.cache().stats.foreground.touch();
        let chunks = layer.index().chunks();
        let content: u64 = chunks.iter().filter(|c| !c.zeros).map(|c| c.size).sum();
        let room = layer.cache().max_bytes();
        if content > room / 2 {
            tracing::info!(layer = %layer.digest(), content, cache_bytes = room, "layer not filled in the background: it holds more than half of the cache");
            return 0;
        }
        let mut order: Vec<&ChunkRef> = chunks
            .iter()
            .filter(|c| !c.zeros && !layer.has_chunk(&c.digest))
            .collect();
        order.sort_by_key(|c| c.blob_offset);
        // Content that occurs twice is fetched once.
        let mut seen = HashSet::new();
        order.retain(|c| seen.insert(&c.digest));
        let mut queued = 0;
        for batch in pieces(order.into_iter().cloned(), PIECE, |c| c.blob_len) {
            self.push(Priority::Background, 0, layer, batch);
            queued += 1;
        }
        queued
    }

    /// Drops queued work of a layer; fetches already running finish.
    pub fn cancel(&self, layer: &Digest) {
        self.shared
            .cancelled
            .lock()
            .expect("cancelled")
            .insert(layer.clone());
        self.shared
            .queue
            .lock()
            .expect("queue")
            .retain(|j| &j.layer_digest != layer);
    }

    /// Queued jobs.
    pub fn pending(&self) -> usize {
        self.shared.queue.lock().expect("queue").len()
    }

    /// Waits until the queue is empty and no prefetch is running.
    pub async fn wait_idle(&self) {
        loop {
            let idle = self.shared.idle.notified();
            if self.pending() == 0 && self.shared.running.load(Ordering::SeqCst) == 0 {
                return;
            }
            let _ = tokio::time::timeout(Duration::from_millis(50), idle).await;
        }
    }

    /// Compressed bytes prefetch made local.
    pub fn done_bytes(&self) -> u64 {
        self.shared.done_bytes.load(Ordering::Relaxed)
    }
}

/// Background fill is cut into pieces of about this many compressed bytes
/// (one range request each, mostly), so that the bandwidth cap is smooth,
/// cancellation quick, and a reader waits behind little.
const PIECE: u64 = 256 * 1024;

/// Consecutive runs of `items` of at least `bytes` compressed bytes each
/// (the last one less), `len` giving an item's bytes: fill pieces and
/// profile batches, and objects fetched whole ahead of the loader.
pub(crate) fn pieces<T>(
    items: impl IntoIterator<Item = T>,
    bytes: u64,
    len: impl Fn(&T) -> u64,
) -> Vec<Vec<T>> {
    let (mut out, mut piece, mut size) = (Vec::new(), Vec::new(), 0);
    for item in items {
        size += len(&item);
        piece.push(item);
        if size >= bytes {
            out.push(std::mem::take(&mut piece));
            size = 0;
        }
    }
    if !piece.is_empty() {
        out.push(piece);
    }
    out
}

/// How long a background job must still wait before it may run: `None` if
/// it may run now. `quiet_for` is how long the foreground has been quiet.
fn background_wait(quiet_for: Duration, fill_quiet: Duration, running: u64) -> Option<Duration> {
    if running >= FILL_IN_FLIGHT {
        // Until one of them is done (the worker is woken then) or a while.
        Some(Duration::from_millis(200))
    } else {
        fill_quiet.checked_sub(quiet_for).filter(|d| !d.is_zero())
    }
}

/// Compressed bytes of profile chunks fetched as one batch. The batches in
/// flight (`PrefetchOptions::concurrency`) share the link, so the first one
/// is in after all of them: smaller batches keep the profile's order
/// (numpy-pandas at 100 Mbit/s with 4 in flight: 2 MiB 2.64 s, 512 KiB
/// 2.48 s, 256 KiB 2.42 s with a fifth more requests). A link with a large
/// bandwidth-delay product needs more in flight than 4 × 512 KiB: raise the
/// concurrency there.
pub const PROFILE_BATCH: u64 = 512 << 10;

/// Reserves the link for `bytes` at the capped rate and waits until the
/// reservation has elapsed: prefetch never exceeds the cap on average.
async fn throttle(shared: &Shared, bytes: u64) {
    let rate = shared.opts.bytes_per_second;
    if rate == 0 || bytes == 0 {
        return;
    }
    let wait = {
        let mut next = shared.next_send.lock().expect("bucket");
        let now = Instant::now();
        let end = (*next).max(now) + Duration::from_secs_f64(bytes as f64 / rate as f64);
        *next = end;
        end.saturating_duration_since(now)
    };
    if !wait.is_zero() {
        tokio::time::sleep(wait).await;
    }
}

/// Fetches one piece of prefetch work within the bandwidth cap; false if it
/// failed (readers then fetch on demand).
async fn fetch_piece(
    shared: &Shared,
    layer: &RemoteLayer,
    chunks: &[ChunkRef],
    bytes: u64,
) -> bool {
    throttle(shared, bytes).await;
    match layer.prefetch(chunks).await {
        Ok(()) => {
            shared.done_bytes.fetch_add(bytes, Ordering::Relaxed);
            true
        }
        Err(e) => {
            tracing::debug!(error = %e, "prefetch failed; readers will fetch on demand");
            false
        }
    }
}

/// What a worker does next.
enum Next {
    Run(Job),
    /// Background work waits (for quiet or a free slot), or for new work.
    Wait(Duration),
    Idle,
}

/// Takes the queue's first job if it may run now. Background work that
/// must wait stays in the queue, so that [`Prefetcher::cancel`] always
/// finds it (taken out and put back, it could miss a cancel).
fn next_job(shared: &Shared) -> Next {
    let mut q = shared.queue.lock().expect("queue");
    let Some(first) = q.peek() else {
        return Next::Idle;
    };
    let background = first.priority == Priority::Background;
    if background {
        let quiet_for = first
            .layer
            .upgrade()
            .map(|l| l.cache().stats.foreground.quiet_for())
            .unwrap_or(Duration::MAX);
        // Taken before the check, so that two workers never both see the
        // last free slot.
        let running = shared.background_running.fetch_add(1, Ordering::SeqCst);
        if let Some(wait) = background_wait(quiet_for, shared.opts.fill_quiet, running) {
            shared.background_running.fetch_sub(1, Ordering::SeqCst);
            return Next::Wait(wait);
        }
    }
    shared.running.fetch_add(1, Ordering::SeqCst);
    Next::Run(q.pop().expect("peeked"))
}

async fn worker(shared: Arc<Shared>) {
    loop {
        let job = match next_job(&shared) {
            Next::Run(job) => job,
            Next::Wait(wait) => {
                // Work of a higher priority, queued meanwhile, wakes it.
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = shared.notify.notified() => {}
                }
                continue;
            }
            Next::Idle => {
                shared.idle.notify_waiters();
                shared.notify.notified().await;
                continue;
            }
        };
        let background = job.priority == Priority::Background;
        run(&shared, job).await;
        if background {
            shared.background_running.fetch_sub(1, Ordering::SeqCst);
            // A worker may be waiting for a background slot.
            shared.notify.notify_one();
        }
        shared.running.fetch_sub(1, Ordering::SeqCst);
    }
}

async fn run(shared: &Shared, job: Job) {
    if shared
        .cancelled
        .lock()
        .expect("cancelled")
        .contains(&job.layer_digest)
    {
        return;
    }
    let Some(layer) = job.layer.upgrade() else {
        return;
    };
    let missing: Vec<ChunkRef> = job
        .chunks
        .iter()
        .filter(|c| !layer.has_chunk(&c.digest))
        .cloned()
        .collect();
    let bytes = missing.iter().map(|c| c.blob_len).sum();
    fetch_piece(shared, &layer, &missing, bytes).await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use sluice_format::digest::Algorithm;

    fn job(priority: Priority, rank: u64, seq: u64, layer: &str) -> Job {
        Job {
            priority,
            rank,
            seq,
            layer: Weak::new(),
            layer_digest: Digest::of(Algorithm::Sha256, layer.as_bytes()),
            chunks: Vec::new(),
        }
    }

    #[test]
    fn profile_work_of_a_layer_queued_later_goes_by_its_entries_order() {
        let mut q = BinaryHeap::new();
        // The lower layer's batches, queued at its mount: entries first
        // touched at 0, 40 and 90 ms.
        q.push(job(Priority::Profile, 0, 0, "lower"));
        q.push(job(Priority::Profile, 40_000, 1, "lower"));
        q.push(job(Priority::Profile, 90_000, 2, "lower"));
        q.push(job(Priority::Background, 0, 3, "lower"));
        let first = q.pop().unwrap();
        assert_eq!((first.rank, first.seq), (0, 0));
        // The upper layer is mounted now; its first entry was touched at
        // 25 ms, its second at 95 ms.
        q.push(job(Priority::Profile, 25_000, 4, "upper"));
        q.push(job(Priority::Profile, 95_000, 5, "upper"));
        let order: Vec<u64> = std::iter::from_fn(|| q.pop()).map(|j| j.seq).collect();
        assert_eq!(order, [4, 1, 2, 5, 3]);
    }

    #[test]
    fn equal_ranks_go_first_queued_first() {
        let mut q = BinaryHeap::new();
        for seq in 0..5 {
            q.push(job(Priority::Background, 0, seq, "layer"));
        }
        let order: Vec<u64> = std::iter::from_fn(|| q.pop()).map(|j| j.seq).collect();
        assert_eq!(order, [0, 1, 2, 3, 4]);
    }

    /// The fill of a big layer was cancelled while a worker held its job to
    /// wait for a free slot; put back, the job outlived the cancel.
    #[test]
    fn background_work_that_must_wait_stays_where_cancel_finds_it() {
        let p = Prefetcher {
            shared: Arc::new(Shared::new(PrefetchOptions::default())),
        };
        let shared = &p.shared;
        shared
            .background_running
            .store(FILL_IN_FLIGHT, Ordering::SeqCst);
        let fill = job(Priority::Background, 0, 0, "layer");
        let digest = fill.layer_digest.clone();
        shared.queue.lock().unwrap().push(fill);
        assert!(matches!(next_job(shared), Next::Wait(_)));
        assert_eq!(p.pending(), 1);
        assert_eq!(shared.running.load(Ordering::SeqCst), 0);
        assert_eq!(
            shared.background_running.load(Ordering::SeqCst),
            FILL_IN_FLIGHT
        );
        // Profile work goes meanwhile.
        shared
            .queue
            .lock()
            .unwrap()
            .push(job(Priority::Profile, 0, 1, "other"));
        assert!(matches!(next_job(shared), Next::Run(j) if j.seq == 1));
        p.cancel(&digest);
        assert_eq!(p.pending(), 0);
        assert!(matches!(next_job(shared), Next::Idle));
    }

    #[test]
    fn background_work_waits_for_quiet_and_a_free_slot() {
        let quiet = Duration::from_secs(10);
        assert_eq!(
            background_wait(Duration::from_secs(3), quiet, 0),
            Some(Duration::from_secs(7))
        );
        assert_eq!(background_wait(Duration::from_secs(10), quiet, 0), None);
        assert_eq!(background_wait(Duration::from_secs(60), quiet, 1), None);
        assert!(background_wait(Duration::from_secs(60), quiet, FILL_IN_FLIGHT).is_some());
        assert_eq!(background_wait(Duration::ZERO, Duration::ZERO, 0), None);
    }

    #[test]
    fn fill_pieces_are_consecutive_runs_of_at_least_the_piece_size() {
        let chunk = |n: u8, len: u64| ChunkRef {
            file_offset: 0,
            size: len,
            blob_offset: u64::from(n) * 1000,
            blob_len: len,
            digest: Digest::of(Algorithm::Sha256, &[n]),
            zeros: false,
        };
        let runs = pieces([chunk(1, 100), chunk(2, 200), chunk(3, 50)], 250, |c| {
            c.blob_len
        });
        let lens: Vec<Vec<u64>> = runs
            .iter()
            .map(|p| p.iter().map(|c| c.blob_len).collect())
            .collect();
        assert_eq!(lens, vec![vec![100, 200], vec![50]]);
        assert!(pieces(Vec::<ChunkRef>::new(), 250, |c| c.blob_len).is_empty());
    }
}
