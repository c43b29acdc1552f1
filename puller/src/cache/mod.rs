//! The chunk cache: decompressed chunks on local disk, keyed by their SHA-256,
//! shared by every layer and image of the node (identical chunks are fetched
//! and stored once).
//!
//! ```text
//! CACHE/chunks/<hex[..2]>/<hex>   one verified chunk, immutable
//! CACHE/tocs/<hex>                a layer's TOC as fetched (compressed), by
//!                                 its digest: lets a restarted daemon mount
//!                                 layers again without the registry
//! CACHE/tmp/                      chunks being written
//! ```
//!
//! Writing is zero-copy: a chunk file is created at its final size, mapped,
//! and zstd decompresses straight into the mapping; the bytes are hashed there
//! and only a chunk whose digest matches is renamed into place. A crash leaves
//! at most a file in `tmp/` (removed at startup). Because a power loss can tear
//! a renamed file, every chunk is verified again the first time this process
//! maps it; a torn chunk is deleted and fetched again, never served.
//!
//! The cache is bounded: when it grows past its limit, the least recently used
//! chunks that nothing has mapped are removed.
//!
//! Mappings are not kept for ever: an entry remembers its mapping only while a
//! reader holds it (plus a small set of recently used ones), so idle mounts
//! cost no memory and the page cache stays free to drop cold data. Entries over
//! 1 MiB (whole files made for passthrough) are fsynced before they become
//! visible and recorded in `verified.log`, so a restart does not re-hash them;
//! small ones are re-verified on first use instead.

use std::collections::{HashMap, HashSet, VecDeque};
use std::fs::{self, File, OpenOptions};
use std::io;
use std::io::Write;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};

use memmap2::{Mmap, MmapMut};
use sluice_format::Digest;

use crate::oldest_first::OldestFirst;

#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error("chunk cache {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("filling chunk {digest}: {reason}")]
    Fill { digest: Digest, reason: String },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> CacheError + '_ {
    move |source| CacheError::Io {
        path: path.to_owned(),
        source,
    }
}

struct Entry {
    size: u64,
    last_use: u64,
    map: Weak<Mmap>,
}

/// Recently used mappings kept open, so that a reader moving through a file
/// does not map and unmap the same chunk over and over.
const RECENT_MAPS: usize = 64;
/// Entries at least this large are fsynced and journaled instead of
/// re-verified after a restart.
const JOURNAL_MIN: u64 = 1 << 20;

/// How many files read ahead stay open for their readers: 8 MiB of chunks
/// of the smallest size (the reader is at most that far behind), well under
/// the default limit of 1024 descriptors.
const OPENED_AHEAD_MAX: usize = 256;

/// Files opened ahead of readers, oldest dropped first.
type OpenedAhead = OldestFirst<Digest, File, OPENED_AHEAD_MAX>;

struct State {
    entries: HashMap<Digest, Entry>,
    recent: VecDeque<Arc<Mmap>>,
    total: u64,
    /// Chunks verified since this process started.
    verified: HashSet<Digest>,
}

impl State {
    /// Drops the entry of a chunk found missing or torn on disk.
    fn forget(&mut self, d: &Digest) {
        if let Some(e) = self.entries.remove(d) {
            self.total -= e.size;
        }
    }
}

/// Counters for metrics.
#[derive(Debug, Default)]
pub struct CacheStats {
    pub hits: AtomicU64,
    pub misses: AtomicU64,
    pub inserted_bytes: AtomicU64,
    pub evicted_bytes: AtomicU64,
    pub torn: AtomicU64,
}

pub struct ChunkCache {
    dir: PathBuf,
    max_bytes: u64,
    clock: AtomicU64,
    state: Mutex<State>,
    /// Chunk files opened by [`ChunkCache::read_ahead`], kept for the read
    /// that follows (one open per chunk instead of two).
    opened_ahead: Mutex<OpenedAhead>,
    pub stats: CacheStats,
}

impl std::fmt::Debug for ChunkCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ChunkCache({})", self.dir.display())
    }
}

impl ChunkCache {
    /// Opens (or creates) a cache directory bounded to `max_bytes`.
    pub fn open(dir: impl Into<PathBuf>, max_bytes: u64) -> Result<Self, CacheError> {
        let dir = dir.into();
        let chunks = dir.join("chunks");
        let tmp = dir.join("tmp");
        fs::create_dir_all(&chunks).map_err(io_err(&chunks))?;
        let _ = fs::remove_dir_all(&tmp);
        fs::create_dir_all(&tmp).map_err(io_err(&tmp))?;
        let mut entries = HashMap::new();
        let mut total = 0;
        for prefix in fs::read_dir(&chunks).map_err(io_err(&chunks))?.flatten() {
            for f in fs::read_dir(prefix.path())
                .map_err(io_err(&prefix.path()))?
                .flatten()
            {
                let name = f.file_name().to_string_lossy().into_owned();
                let (Ok(digest), Ok(meta)) =
                    (format!("sha256:{name}").parse::<Digest>(), f.metadata())
                else {
                    let _ = fs::remove_file(f.path());
                    continue;
                };
                total += meta.len();
                entries.insert(
                    digest,
                    Entry {
                        size: meta.len(),
                        last_use: 0,
                        map: Weak::new(),
                    },
                );
            }
        }
        // Large entries written completely (fsynced) by an earlier run.
        let mut verified = HashSet::new();
        if let Ok(log) = fs::read_to_string(dir.join("verified.log")) {
            for line in log.lines() {
                if let Ok(d) = line.parse::<Digest>() {
                    if entries.contains_key(&d) {
                        verified.insert(d);
                    }
                }
            }
        }
        Ok(ChunkCache {
            dir,
            max_bytes,
            clock: AtomicU64::new(1),
            opened_ahead: Mutex::default(),
            state: Mutex::new(State {
                entries,
                recent: VecDeque::new(),
                total,
                verified,
            }),
            stats: CacheStats::default(),
        })
    }

    fn path(&self, d: &Digest) -> PathBuf {
        self.dir.join("chunks").join(&d.hex()[..2]).join(d.hex())
    }

    fn toc_path(&self, d: &Digest) -> PathBuf {
        self.dir.join("tocs").join(d.hex())
    }

    /// A stored TOC (unverified: the caller checks it against `d`).
    pub fn toc(&self, d: &Digest) -> Option<Vec<u8>> {
        fs::read(self.toc_path(d)).ok()
    }

    /// Stores a TOC that was verified against `d`. Best effort: a TOC that
    /// cannot be stored is fetched again next time.
    pub fn put_toc(&self, d: &Digest, bytes: &[u8]) {
        let path = self.toc_path(d);
        let tmp = self.dir.join("tmp").join(format!("toc-{}", d.hex()));
        let written = fs::create_dir_all(self.dir.join("tocs"))
            .and_then(|_| fs::write(&tmp, bytes))
            .and_then(|_| fs::rename(&tmp, &path));
        if let Err(e) = written {
            let _ = fs::remove_file(&tmp);
            tracing::debug!("storing TOC {d}: {e}");
        }
    }

    /// Removes every chunk and TOC that `keep` does not want and no reader
    /// holds (for a daemon whose images were removed). Returns bytes freed.
    pub fn retain(&self, keep: impl Fn(&Digest) -> bool) -> u64 {
        let mut freed = 0;
        {
            *self.opened_ahead.lock().expect("opened ahead") = OpenedAhead::default();
            let mut st = self.state.lock().expect("cache state");
            st.recent.clear();
            let drop: Vec<(Digest, u64)> = st
                .entries
                .iter()
                .filter(|(d, e)| e.map.strong_count() == 0 && !keep(d))
                .map(|(d, e)| (d.clone(), e.size))
                .collect();
            for (d, size) in drop {
                st.entries.remove(&d);
                st.verified.remove(&d);
                st.total -= size;
                freed += size;
                let _ = fs::remove_file(self.path(&d));
            }
        }
        if let Ok(tocs) = fs::read_dir(self.dir.join("tocs")) {
            for t in tocs.flatten() {
                let name = t.file_name().to_string_lossy().into_owned();
                match format!("sha256:{name}").parse::<Digest>() {
                    Ok(d) if keep(&d) => {}
                    _ => {
                        freed += t.metadata().map(|m| m.len()).unwrap_or(0);
                        let _ = fs::remove_file(t.path());
                    }
                }
            }
        }
        freed
    }

    /// Opens a cached, verified entry as a file (for FUSE passthrough, which
    /// hands the kernel a file descriptor instead of serving reads).
    pub fn open_file(&self, d: &Digest) -> Option<File> {
        let tick = self.clock.fetch_add(1, Ordering::Relaxed);
        let verified = {
            let mut st = self.state.lock().expect("cache state");
            st.entries.get_mut(d)?.last_use = tick;
            st.verified.contains(d)
        };
        if !verified {
            // `get` verifies the entry on first use by this process.
            self.get(d)?;
        }
        // Verified: opened without mapping it (mapping a small file per open
        // and unmapping it later cost more than the open; measured on `bench
        // read`'s small files). Evicting it later only unlinks the file; the
        // kernel keeps reading through this descriptor.
        match File::open(self.path(d)) {
            Ok(f) => {
                if verified {
                    self.stats.hits.fetch_add(1, Ordering::Relaxed);
                }
                Some(f)
            }
            Err(_) => {
                self.state.lock().expect("cache state").forget(d);
                None
            }
        }
    }

    /// Bytes stored.
    pub fn size(&self) -> u64 {
        self.state.lock().expect("cache state").total
    }

    /// Whether a chunk is stored (without verifying it).
    pub fn contains(&self, d: &Digest) -> bool {
        self.state
            .lock()
            .expect("cache state")
            .entries
            .contains_key(d)
    }

    /// Asks the kernel to read these cached chunks' files into the page
    /// cache in the background (`POSIX_FADV_WILLNEED`), ahead of a reader.
    /// Each chunk is a file of its own, so the kernel's readahead never
    /// crosses from one to the next: without this a sequential reader of
    /// chunks on disk waits for one small read after another. Chunks not
    /// cached are skipped. Blocking (opens files): call off the I/O path.
    pub fn read_ahead(&self, digests: &[Digest]) {
        use std::os::fd::AsRawFd;
        for d in digests {
            if !self.contains(d) {
                continue;
            }
            if let Ok(f) = File::open(self.path(d)) {
                // SAFETY: a valid descriptor; advice only, no memory passed.
                unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_WILLNEED) };
                let dropped = self
                    .opened_ahead
                    .lock()
                    .expect("opened ahead")
                    .keep(d.clone(), f);
                drop(dropped); // closed outside the lock
            }
        }
    }

    /// The mapped chunk, if cached and intact.
    pub fn get(&self, d: &Digest) -> Option<Arc<Mmap>> {
        if let Some(m) = self.mapped(d) {
            return Some(m);
        }
        {
            // A use, whether or not the mapping below works out.
            let tick = self.clock.fetch_add(1, Ordering::Relaxed);
            let mut st = self.state.lock().expect("cache state");
            st.entries.get_mut(d)?.last_use = tick;
        }
        let path = self.path(d);
        let map = File::open(&path).ok().and_then(|f| {
            // SAFETY: chunk files are never modified after being renamed into
            // place; eviction only unlinks them, which keeps mappings valid.
            unsafe { Mmap::map(&f) }.ok()
        });
        let mut st = self.state.lock().expect("cache state");
        let Some(map) = map else {
            st.forget(d);
            return None;
        };
        if !st.verified.contains(d) {
            // First use by this process: a torn write after a crash shows here.
            if Digest::of(d.algorithm(), &map) != *d {
                self.drop_torn(&mut st, d);
                return None;
            }
            st.verified.insert(d.clone());
        }
        let _ = map.advise(memmap2::Advice::Sequential);
        let map = Arc::new(map);
        if let Some(e) = st.entries.get_mut(d) {
            e.map = Arc::downgrade(&map);
        }
        Self::remember(&mut st, &map);
        self.stats.hits.fetch_add(1, Ordering::Relaxed);
        Some(map)
    }

    /// The chunk's mapping if a reader (or the recent set) holds one, so it
    /// was verified when it was mapped; never maps.
    pub fn mapped(&self, d: &Digest) -> Option<Arc<Mmap>> {
        let tick = self.clock.fetch_add(1, Ordering::Relaxed);
        let mut st = self.state.lock().expect("cache state");
        let entry = st.entries.get_mut(d)?;
        let m = entry.map.upgrade()?;
        entry.last_use = tick;
        self.stats.hits.fetch_add(1, Ordering::Relaxed);
        Some(m)
    }

    /// Appends bytes `range` of a cached chunk to `out`; false if the chunk
    /// is not cached (or was found torn). A chunk not mapped already is read
    /// with `pread` instead of being mapped, because mapping and unmapping
    /// one small file per chunk (the unmap flushes every CPU's TLB) cost more
    /// than the copy the assembly makes anyway (measured with perf on `bench
    /// read`'s chunk by chunk row: mmap, munmap and the page faults were a
    /// third of the daemon's time).
    pub fn read_into(&self, d: &Digest, range: Range<usize>, out: &mut Vec<u8>) -> bool {
        let tick = self.clock.fetch_add(1, Ordering::Relaxed);
        let mapped = {
            let mut st = self.state.lock().expect("cache state");
            let Some(entry) = st.entries.get_mut(d) else {
                return false;
            };
            entry.last_use = tick;
            let size = entry.size as usize;
            if range.start > range.end || range.end > size {
                return false;
            }
            let mapped = entry.map.upgrade();
            if mapped.is_none() && st.verified.contains(d) {
                drop(st);
                return match self.pread_into(d, range, out) {
                    true => {
                        self.stats.hits.fetch_add(1, Ordering::Relaxed);
                        true
                    }
                    false => {
                        self.state.lock().expect("cache state").forget(d);
                        false
                    }
                };
            }
            if mapped.is_none() && (size as u64) < JOURNAL_MIN {
                drop(st);
                return self.verify_and_read_into(d, size, range, out);
            }
            mapped
        };
        // Mapped already, or not yet verified by this process: `get` checks
        // the whole chunk against its digest before any byte is served.
        let Some(m) = mapped.or_else(|| self.get(d)) else {
            return false;
        };
        match m.get(range) {
            Some(bytes) => {
                out.extend_from_slice(bytes);
                true
            }
            None => false,
        }
    }

    /// A small chunk not yet verified by this process (after a restart):
    /// read whole with `pread`, checked against its digest, then `range` of
    /// it appended to `out`. Mapping it for the check (as `get` does) and
    /// unmapping it later cost more than the check: a restarted daemon's
    /// first pass over 20,000 small files ran at half the speed of the next.
    fn verify_and_read_into(
        &self,
        d: &Digest,
        size: usize,
        range: Range<usize>,
        out: &mut Vec<u8>,
    ) -> bool {
        let mut whole = Vec::with_capacity(size);
        if !self.pread_into(d, 0..size, &mut whole) {
            self.state.lock().expect("cache state").forget(d);
            return false;
        }
        let mut st = self.state.lock().expect("cache state");
        if Digest::of(d.algorithm(), &whole) != *d {
            self.drop_torn(&mut st, d);
            return false;
        }
        st.verified.insert(d.clone());
        drop(st);
        self.stats.hits.fetch_add(1, Ordering::Relaxed);
        out.extend_from_slice(&whole[range]);
        true
    }

    /// Drops a chunk whose bytes on disk do not match its digest.
    fn drop_torn(&self, st: &mut State, d: &Digest) {
        self.stats.torn.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(chunk = %d, "cached chunk is corrupt (torn write?); dropping it");
        st.forget(d);
        let _ = fs::remove_file(self.path(d));
    }

    /// Reads `range` of a chunk's file into the end of `out` (unchecked: the
    /// caller knows the chunk verified, or checks the bytes).
    fn pread_into(&self, d: &Digest, range: Range<usize>, out: &mut Vec<u8>) -> bool {
        use std::os::unix::fs::FileExt;
        // A file opened ahead is the same immutable chunk (eviction only
        // unlinks), so it is as good as opening it now.
        let ahead = self.opened_ahead.lock().expect("opened ahead").take(d);
        let Some(f) = ahead.or_else(|| File::open(self.path(d)).ok()) else {
            return false;
        };
        let at = out.len();
        out.resize(at + range.len(), 0);
        if f.read_exact_at(&mut out[at..], range.start as u64).is_err() {
            out.truncate(at);
            return false;
        }
        true
    }

    fn remember(st: &mut State, map: &Arc<Mmap>) {
        // Large mappings (whole files) would pin a lot of page cache.
        if map.len() as u64 >= JOURNAL_MIN {
            return;
        }
        st.recent.push_back(map.clone());
        while st.recent.len() > RECENT_MAPS {
            st.recent.pop_front();
        }
    }

    /// Stores a chunk of `size` bytes that `fill` writes in place (e.g. zstd
    /// decompressing into it). `fill` must verify the bytes; the digest is
    /// checked once more here before the chunk becomes visible.
    pub fn insert_with(
        &self,
        d: &Digest,
        size: u64,
        fill: impl FnOnce(&mut [u8]) -> Result<(), String>,
    ) -> Result<Arc<Mmap>, CacheError> {
        if let Some(m) = self.get(d) {
            return Ok(m);
        }
        self.stats.misses.fetch_add(1, Ordering::Relaxed);
        let tmp = self.dir.join("tmp").join(format!(
            "{}.{}",
            d.hex(),
            self.clock.fetch_add(1, Ordering::Relaxed)
        ));
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&tmp)
            .map_err(io_err(&tmp))?;
        let result = (|| {
            file.set_len(size).map_err(io_err(&tmp))?;
            // SAFETY: the file is ours alone (created exclusively in tmp/).
            let mut map = unsafe { MmapMut::map_mut(&file) }.map_err(io_err(&tmp))?;
            fill(&mut map).map_err(|reason| CacheError::Fill {
                digest: d.clone(),
                reason,
            })?;
            if Digest::of(d.algorithm(), &map) != *d {
                return Err(CacheError::Fill {
                    digest: d.clone(),
                    reason: "content does not match the digest".into(),
                });
            }
            if size >= JOURNAL_MIN {
                map.flush().map_err(io_err(&tmp))?;
                file.sync_all().map_err(io_err(&tmp))?;
            }
            let dest = self.path(d);
            let parent = dest.parent().expect("chunk paths have parents");
            fs::create_dir_all(parent).map_err(io_err(parent))?;
            fs::rename(&tmp, &dest).map_err(io_err(&dest))?;
            if size >= JOURNAL_MIN {
                let log = self.dir.join("verified.log");
                let mut f = OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&log)
                    .map_err(io_err(&log))?;
                writeln!(f, "{d}")
                    .and_then(|()| f.sync_data())
                    .map_err(io_err(&log))?;
            }
            map.make_read_only().map_err(io_err(&dest))
        })();
        let map = match result {
            Ok(m) => Arc::new(m),
            Err(e) => {
                let _ = fs::remove_file(&tmp);
                return Err(e);
            }
        };
        self.stats.inserted_bytes.fetch_add(size, Ordering::Relaxed);
        let tick = self.clock.fetch_add(1, Ordering::Relaxed);
        {
            let mut st = self.state.lock().expect("cache state");
            st.verified.insert(d.clone());
            Self::remember(&mut st, &map);
            if st
                .entries
                .insert(
                    d.clone(),
                    Entry {
                        size,
                        last_use: tick,
                        map: Arc::downgrade(&map),
                    },
                )
                .is_none()
            {
                st.total += size;
            }
        }
        self.evict();
        Ok(map)
    }

    /// Removes least recently used chunks that no reader holds until the cache
    /// fits its limit again.
    pub fn evict(&self) {
        let mut st = self.state.lock().expect("cache state");
        if st.total <= self.max_bytes {
            return;
        }
        // Recently used maps do not pin anything once the cache is over its limit.
        st.recent.clear();
        let mut candidates: Vec<(u64, Digest, u64)> = st
            .entries
            .iter()
            .filter(|(_, e)| e.map.strong_count() == 0)
            .map(|(d, e)| (e.last_use, d.clone(), e.size))
            .collect();
        candidates.sort_unstable();
        for (_, d, size) in candidates {
            if st.total <= self.max_bytes {
                break;
            }
            st.entries.remove(&d);
            st.total -= size;
            self.stats.evicted_bytes.fetch_add(size, Ordering::Relaxed);
            let _ = fs::remove_file(self.path(&d));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fill_with(data: &[u8]) -> impl FnOnce(&mut [u8]) -> Result<(), String> + '_ {
        move |out| {
            out.copy_from_slice(data);
            Ok(())
        }
    }

    #[test]
    fn files_opened_ahead_stay_bounded_and_in_order() {
        let null = || File::open("/dev/null").unwrap();
        let digest = |i: usize| Digest::sha256(&i.to_le_bytes());
        let mut ahead = OpenedAhead::default();
        for i in 0..OPENED_AHEAD_MAX + 10 {
            ahead.keep(digest(i), null());
        }
        assert_eq!(ahead.len(), OPENED_AHEAD_MAX);
        assert!(ahead.take(&digest(0)).is_none(), "the oldest were dropped");
        assert!(ahead.take(&digest(20)).is_some());
        assert!(ahead.take(&digest(20)).is_none(), "taken once");
        // Kept twice: one entry. Taken, then kept again: now the newest.
        ahead.keep(digest(30), null());
        assert!(ahead.take(&digest(30)).is_some());
        assert!(ahead.take(&digest(30)).is_none());
        ahead.keep(digest(30), null());
        assert_eq!(ahead.newest(), Some(&digest(30)));
        // (That the order holds exactly the kept keys: oldest_first's test.)
    }

    #[test]
    fn verified_insert_get_evict_and_torn_chunks() {
        let dir = tempfile::tempdir().unwrap();
        let cache = ChunkCache::open(dir.path(), 2500).unwrap();
        let a = vec![1u8; 1000];
        let da = Digest::sha256(&a);
        let m = cache.insert_with(&da, 1000, fill_with(&a)).unwrap();
        assert_eq!(&m[..], &a[..]);
        drop(m);
        // Wrong content never becomes visible.
        let db = Digest::sha256(b"b");
        assert!(cache.insert_with(&db, 1000, fill_with(&a)).is_err());
        assert!(!cache.contains(&db));
        assert_eq!(fs::read_dir(dir.path().join("tmp")).unwrap().count(), 0);
        // Eviction keeps the newest and any chunk in use.
        let b = vec![2u8; 1000];
        let c = vec![3u8; 1000];
        let (d_b, d_c) = (Digest::sha256(&b), Digest::sha256(&c));
        let held = cache.insert_with(&d_b, 1000, fill_with(&b)).unwrap();
        cache.get(&da);
        let _ = cache.insert_with(&d_c, 1000, fill_with(&c)).unwrap();
        assert!(cache.size() <= 2500);
        assert!(cache.contains(&d_b), "a mapped chunk is never evicted");
        drop(held);

        // A torn chunk on disk is detected on first use after a restart.
        let path = cache.path(&d_b);
        drop(cache);
        fs::write(&path, vec![0u8; 1000]).unwrap();
        let cache = ChunkCache::open(dir.path(), 1 << 20).unwrap();
        assert!(cache.contains(&d_b));
        assert!(cache.get(&d_b).is_none());
        assert!(!path.exists());
        assert_eq!(cache.stats.torn.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn read_into_copies_ranges_and_never_serves_a_torn_chunk() {
        let dir = tempfile::tempdir().unwrap();
        let cache = ChunkCache::open(dir.path(), 1 << 20).unwrap();
        let a: Vec<u8> = (0..1000u32).map(|i| (i % 251) as u8).collect();
        let b = vec![7u8; 1000];
        let (da, db) = (Digest::sha256(&a), Digest::sha256(&b));
        drop(cache.insert_with(&da, 1000, fill_with(&a)).unwrap());
        drop(cache.insert_with(&db, 1000, fill_with(&b)).unwrap());
        cache.retain(|_| true); // forgets the recent mappings
        assert!(cache.mapped(&da).is_none());

        // Read with pread: from a file opened ahead, then opened anew.
        cache.read_ahead(std::slice::from_ref(&da));
        let mut out = b"x".to_vec();
        assert!(cache.read_into(&da, 10..20, &mut out));
        assert!(cache.read_into(&da, 990..1000, &mut out));
        assert_eq!(out[0], b'x');
        assert_eq!(&out[1..11], &a[10..20]);
        assert_eq!(&out[11..], &a[990..]);
        assert!(cache.mapped(&da).is_none(), "pread maps nothing");
        // Out of range or not cached: false, nothing appended.
        assert!(!cache.read_into(&da, 995..1001, &mut out));
        assert!(!cache.read_into(&Digest::sha256(b"none"), 0..1, &mut out));
        assert_eq!(out.len(), 21);

        // After a restart, chunks are verified before their first byte is
        // served: a torn one is dropped, an intact one read.
        let path_b = cache.path(&db);
        drop(cache);
        fs::write(&path_b, vec![0u8; 1000]).unwrap();
        let cache = ChunkCache::open(dir.path(), 1 << 20).unwrap();
        let mut out = Vec::new();
        assert!(!cache.read_into(&db, 0..1000, &mut out));
        assert!(out.is_empty());
        assert!(!path_b.exists() && !cache.contains(&db));
        assert!(cache.read_into(&da, 0..1000, &mut out));
        assert_eq!(out, a);
        assert!(cache.mapped(&da).is_none(), "verified without mapping");
        // Verified now: read again (pread) without hashing.
        assert!(cache.read_into(&da, 5..6, &mut out));
        assert_eq!(out[1000], a[5]);
        assert_eq!(cache.stats.torn.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn retain_drops_unwanted_chunks_and_tocs_but_not_held_ones() {
        let dir = tempfile::tempdir().unwrap();
        let cache = ChunkCache::open(dir.path(), 1 << 20).unwrap();
        let (a, b, c) = (vec![1u8; 100], vec![2u8; 100], vec![3u8; 100]);
        let (da, db, dc) = (Digest::sha256(&a), Digest::sha256(&b), Digest::sha256(&c));
        drop(cache.insert_with(&da, 100, fill_with(&a)).unwrap());
        let held = cache.insert_with(&db, 100, fill_with(&b)).unwrap();
        drop(cache.insert_with(&dc, 100, fill_with(&c)).unwrap());
        let (t_keep, t_drop) = (Digest::sha256(b"toc1"), Digest::sha256(b"toc2"));
        cache.put_toc(&t_keep, b"toc1");
        cache.put_toc(&t_drop, b"toc2");
        let freed = cache.retain(|d| *d == dc || *d == t_keep);
        assert_eq!(freed, 100 + 4);
        assert!(!cache.contains(&da));
        assert!(cache.contains(&db), "held by a reader");
        assert!(cache.contains(&dc));
        assert_eq!(cache.toc(&t_keep).as_deref(), Some(&b"toc1"[..]));
        assert!(cache.toc(&t_drop).is_none());
        assert_eq!(cache.size(), 200);
        drop(held);
    }
}
