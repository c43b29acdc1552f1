//! The chunk cache: decompressed chunks on local disk, keyed by their SHA-256,
//! shared by every layer and image of the node (identical chunks are fetched
//! and stored once).
//!
//! ```text
//! CACHE/packs/<id>, <id>.log      entries under 1 MiB, appended one after
//!                                 the other (see `pack`)
//! CACHE/chunks/<hex[..2]>/<hex>   an entry of 1 MiB or more (a whole file
//!                                 made for FUSE passthrough), immutable
//! CACHE/tocs/<hex>                a layer's TOC as fetched (compressed), by
//!                                 its digest: lets a restarted daemon mount
//!                                 layers again without the registry
//! CACHE/tmp/                      large entries being written
//! CACHE/lock                      locked by the process that has the cache
//! ```
//!
//! Small entries (chunks, small files) go to packs: reading one after the
//! page cache was dropped costs no open and no inode read, and neighbours on
//! disk come in with the same readahead. Large ones are files of their own,
//! because passthrough hands the kernel a file that must hold exactly the
//! layer file's bytes. (Caches written before packs keep their small chunk
//! files; they are read the same way as large ones.)
//!
//! Writing is zero-copy: the entry's room is mapped, and zstd decompresses
//! straight into the mapping; the bytes are hashed there and only an entry
//! whose digest matches becomes visible (a pack entry by its log line, a
//! file by its rename out of `tmp/`). A crash leaves at most a file in `tmp/`
//! (removed at startup) or a pack slot nobody logged. Because a power loss
//! can tear what was written, every entry is verified again the first time
//! this process reads it; a torn entry is dropped and fetched again, never
//! served. Entries of 1 MiB or more are fsynced before they become visible
//! and recorded in `verified.log`, so a restart does not re-hash them.
//!
//! The cache is bounded: when it grows past its limit, the least recently used
//! entries that nothing has mapped are removed.
//!
//! Mappings are not kept for ever: an entry remembers its mapping only while a
//! reader holds it (plus a small set of recently used ones), so idle mounts
//! cost no memory and the page cache stays free to drop cold data.

mod pack;

use std::collections::{HashMap, HashSet, VecDeque};
use std::fs::{self, File, OpenOptions};
use std::io;
use std::io::Write;
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use memmap2::{Mmap, MmapMut, MmapOptions};
use sluice_format::Digest;

use crate::oldest_first::OldestFirst;
use pack::{Pack, Packs, Slot};

#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error("chunk cache {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("filling chunk {digest}: {reason}")]
    Fill { digest: Digest, reason: String },
    #[error("chunk cache {path} is in use by another process (or another cache in this one); each daemon needs a cache directory of its own")]
    InUse { path: PathBuf },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> CacheError + '_ {
    move |source| CacheError::Io {
        path: path.to_owned(),
        source,
    }
}

fn pack_err((path, source): pack::PackError) -> CacheError {
    CacheError::Io { path, source }
}

struct Entry {
    size: u64,
    last_use: u64,
    map: Weak<Mmap>,
    /// In a pack; `None`: a file of its own.
    slot: Option<Slot>,
}

/// Recently used mappings kept open, so that a reader moving through a file
/// does not map and unmap the same chunk over and over.
const RECENT_MAPS: usize = 64;
/// Entries at least this large are files of their own (fsynced, journaled
/// instead of re-verified after a restart, and fit for passthrough); smaller
/// ones go to packs.
pub const FILE_MIN: u64 = 1 << 20;

/// Takes a write lock on the whole file without waiting (`F_SETLK`); false
/// with the error in `errno` if another process holds it.
fn lock_whole_file(file: &File) -> bool {
    use std::os::fd::AsRawFd;
    // SAFETY: zeroed is a valid `flock` (all integers); then filled in.
    let mut l: libc::flock = unsafe { std::mem::zeroed() };
    l.l_type = libc::F_WRLCK as _;
    l.l_whence = libc::SEEK_SET as _;
    // SAFETY: a valid descriptor and a valid, initialized `flock`.
    unsafe { libc::fcntl(file.as_raw_fd(), libc::F_SETLK, &l) == 0 }
}

/// How long opening a cache waits for another one to let go of it.
pub const LOCK_WAIT: Duration = Duration::from_secs(10);

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
    /// Entries verified since this process started.
    verified: HashSet<Digest>,
    packs: Packs,
}

/// What is left to do on disk for an entry that left the index; done after
/// the state lock is released (a hole waits for readers of its pack, who
/// take the state lock while they hold the pack's).
#[must_use]
enum Leftover {
    Nothing,
    File(PathBuf),
    Hole(Arc<Pack>, u64, u64),
}

impl Leftover {
    fn clean(self) {
        match self {
            Leftover::Nothing => {}
            Leftover::File(path) => {
                let _ = fs::remove_file(path);
            }
            Leftover::Hole(pack, offset, size) => pack.punch(offset, size),
        }
    }
}

/// Where an entry's bytes are, for reading them without the state lock.
enum Place {
    File(PathBuf),
    Packed(Slot, Arc<Pack>),
}

impl State {
    /// Removes an entry from the index (and from its pack's log).
    fn take(&mut self, d: &Digest, dir: &Path) -> Leftover {
        let Some(e) = self.entries.remove(d) else {
            return Leftover::Nothing;
        };
        self.total -= e.size;
        self.verified.remove(d);
        match e.slot {
            None => Leftover::File(chunk_path(dir, d)),
            Some(slot) => match self.packs.removed(d, slot) {
                // Eviction never takes a mapped entry; an entry dropped as
                // unreadable might still be mapped by a reader: its blocks
                // stay until the pack goes.
                Some(pack) if e.map.strong_count() == 0 => {
                    Leftover::Hole(pack, slot.offset, e.size)
                }
                _ => Leftover::Nothing,
            },
        }
    }

    /// Where an entry is, and its size.
    fn place(&self, d: &Digest, dir: &Path) -> Option<(Place, u64)> {
        let e = self.entries.get(d)?;
        let place = match e.slot {
            None => Place::File(chunk_path(dir, d)),
            Some(slot) => Place::Packed(slot, self.packs.pack(slot.pack)?),
        };
        Some((place, e.size))
    }

    /// Whether `d` is still stored at `slot` (checked by a reader holding
    /// the pack's punching lock: then no hole can open under it).
    fn still_at(&self, d: &Digest, slot: Slot) -> bool {
        self.entries.get(d).is_some_and(|e| e.slot == Some(slot))
    }
}

fn chunk_path(dir: &Path, d: &Digest) -> PathBuf {
    dir.join("chunks").join(&d.hex()[..2]).join(d.hex())
}

/// Counters for metrics, and the node's [`ForegroundClock`].
#[derive(Debug, Default)]
pub struct CacheStats {
    pub hits: AtomicU64,
    pub misses: AtomicU64,
    pub inserted_bytes: AtomicU64,
    pub evicted_bytes: AtomicU64,
    pub torn: AtomicU64,
    /// Kept here because every layer of a node shares its cache, as they
    /// share the node's link.
    pub foreground: ForegroundClock,
}

/// When the node's foreground last needed the link: a reader had to fetch
/// (a read or open that found chunks missing, and what is fetched ahead of
/// it), or a layer was mounted (a container is about to start). Background
/// fill runs only once this has been quiet for a while
/// ([`crate::prefetch::PrefetchOptions::fill_quiet`]).
#[derive(Debug)]
pub struct ForegroundClock {
    origin: Instant,
    /// Milliseconds from `origin` to the last touch, plus one; 0 = never.
    last: AtomicU64,
}

impl Default for ForegroundClock {
    fn default() -> Self {
        ForegroundClock {
            origin: Instant::now(),
            last: AtomicU64::new(0),
        }
    }
}

impl ForegroundClock {
    pub fn touch(&self) {
        let now = self.origin.elapsed().as_millis() as u64 + 1;
        self.last.fetch_max(now, Ordering::Relaxed);
    }

    /// How long since the last touch (since the clock began if never).
    pub fn quiet_for(&self) -> Duration {
        let last = Duration::from_millis(self.last.load(Ordering::Relaxed).saturating_sub(1));
        self.origin.elapsed().saturating_sub(last)
    }
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
    /// Holds a POSIX record lock for the cache's life: two daemons appending
    /// to the same packs would write over each other's entries. The lock is
    /// per process (a daemon restarted within one process, as the tests do,
    /// takes it again); within a process, layers share one cache.
    _lock: File,
}

impl std::fmt::Debug for ChunkCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ChunkCache({})", self.dir.display())
    }
}

/// Runs `fill` on an entry's room and checks the result against the digest.
fn fill_verified(
    d: &Digest,
    room: &mut [u8],
    fill: impl FnOnce(&mut [u8]) -> Result<(), String>,
) -> Result<(), CacheError> {
    fill(room).map_err(|reason| CacheError::Fill {
        digest: d.clone(),
        reason,
    })?;
    if Digest::of(d.algorithm(), room) != *d {
        return Err(CacheError::Fill {
            digest: d.clone(),
            reason: "content does not match the digest".into(),
        });
    }
    Ok(())
}

impl ChunkCache {
    /// The bound given at open.
    pub fn max_bytes(&self) -> u64 {
        self.max_bytes
    }

    /// Opens (or creates) a cache directory bounded to `max_bytes`. Another
    /// cache holding it (a daemon still shutting down while its successor
    /// starts, as in a rolling update) is waited for up to [`LOCK_WAIT`];
    /// then this fails with [`CacheError::InUse`].
    pub fn open(dir: impl Into<PathBuf>, max_bytes: u64) -> Result<Self, CacheError> {
        Self::open_waiting(dir.into(), max_bytes, LOCK_WAIT)
    }

    fn open_waiting(dir: PathBuf, max_bytes: u64, wait: Duration) -> Result<Self, CacheError> {
        fs::create_dir_all(&dir).map_err(io_err(&dir))?;
        let lock_path = dir.join("lock");
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(io_err(&lock_path))?;
        let deadline = Instant::now() + wait;
        let mut told = false;
        loop {
            if lock_whole_file(&lock) {
                break;
            }
            let e = io::Error::last_os_error();
            if !matches!(e.raw_os_error(), Some(libc::EAGAIN | libc::EACCES)) {
                return Err(CacheError::Io {
                    path: lock_path,
                    source: e,
                });
            }
            if Instant::now() >= deadline {
                return Err(CacheError::InUse { path: dir });
            }
            if !told {
                tracing::info!(cache = %dir.display(), "chunk cache in use by another process; waiting for it to let go");
                told = true;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
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
                        slot: None,
                    },
                );
            }
        }
        let (mut packs, packed) = Packs::open(dir.join("packs")).map_err(pack_err)?;
        let mut twins = Vec::new();
        for (digest, slot, size) in packed {
            if entries.contains_key(&digest) {
                // Also a file of its own (written by an older version).
                twins.extend(packs.removed(&digest, slot).map(|p| (p, slot.offset, size)));
                continue;
            }
            total += size;
            entries.insert(
                digest,
                Entry {
                    size,
                    last_use: 0,
                    map: Weak::new(),
                    slot: Some(slot),
                },
            );
        }
        for (pack, offset, size) in twins {
            pack.punch(offset, size);
        }
        // Large entries written completely (fsynced) by an earlier run.
        let mut verified = HashSet::new();
        if let Ok(log) = fs::read_to_string(dir.join("verified.log")) {
            for line in log.lines() {
                if let Ok(d) = line.parse::<Digest>() {
                    if entries.get(&d).is_some_and(|e| e.slot.is_none()) {
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
            _lock: lock,
            state: Mutex::new(State {
                entries,
                recent: VecDeque::new(),
                total,
                verified,
                packs,
            }),
            stats: CacheStats::default(),
        })
    }

    /// Whether an entry of this size is stored as a file of its own, which
    /// [`ChunkCache::open_file`] can hand to the kernel for passthrough.
    pub fn stores_as_file(size: u64) -> bool {
        size >= FILE_MIN
    }

    fn path(&self, d: &Digest) -> PathBuf {
        chunk_path(&self.dir, d)
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
        let mut leftovers = Vec::new();
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
                leftovers.push(st.take(&d, &self.dir));
                freed += size;
            }
        }
        leftovers.into_iter().for_each(Leftover::clean);
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
    /// hands the kernel a file descriptor instead of serving reads). `None`
    /// for an entry in a pack (see [`ChunkCache::stores_as_file`]).
    pub fn open_file(&self, d: &Digest) -> Option<File> {
        let tick = self.clock.fetch_add(1, Ordering::Relaxed);
        let verified = {
            let mut st = self.state.lock().expect("cache state");
            let e = st.entries.get_mut(d)?;
            if e.slot.is_some() {
                return None;
            }
            e.last_use = tick;
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
                self.forget(d);
                None
            }
        }
    }

    /// Drops the entry of a chunk found missing on disk.
    fn forget(&self, d: &Digest) {
        let leftover = self.state.lock().expect("cache state").take(d, &self.dir);
        leftover.clean();
    }

    /// Reads every entry back and checks it against its digest, dropping
    /// nothing: how many entries were read, and the digests of those that do
    /// not match (or could not be read).
    pub fn check(&self) -> (usize, Vec<Digest>) {
        let digests: Vec<Digest> = {
            let st = self.state.lock().expect("cache state");
            st.entries.keys().cloned().collect()
        };
        let (mut read, mut corrupt) = (0, Vec::new());
        for d in digests {
            let Some((place, size)) = self.state.lock().expect("cache state").place(&d, &self.dir)
            else {
                continue;
            };
            let mut bytes = Vec::with_capacity(size as usize);
            match self.pread_into(&d, &place, 0..size as usize, &mut bytes) {
                None => continue, // removed meanwhile
                Some(true) if Digest::of(d.algorithm(), &bytes) == d => {}
                Some(_) => corrupt.push(d),
            }
            read += 1;
        }
        (read, corrupt)
    }

    /// The cache's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
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

    /// Asks the kernel to read these cached chunks into the page cache in
    /// the background (`POSIX_FADV_WILLNEED`), ahead of a reader. The
    /// kernel's readahead never crosses from one file to the next, nor
    /// from one pack entry to the next when they were written apart: without
    /// this a sequential reader of chunks on disk waits for one small read
    /// after another. Chunks not cached are skipped. Blocking (opens chunk
    /// files): call off the I/O path.
    pub fn read_ahead(&self, digests: &[Digest]) {
        for d in digests {
            let place = self.state.lock().expect("cache state").place(d, &self.dir);
            match place {
                None => {}
                Some((Place::Packed(slot, pack), size)) => pack.will_need(slot.offset, size),
                Some((Place::File(path), _)) => {
                    if let Ok(f) = File::open(path) {
                        pack::will_need(&f, 0, 0);
                        let dropped = self
                            .opened_ahead
                            .lock()
                            .expect("opened ahead")
                            .keep(d.clone(), f);
                        drop(dropped); // closed outside the lock
                    }
                }
            }
        }
    }

    /// The mapped chunk, if cached and intact.
    pub fn get(&self, d: &Digest) -> Option<Arc<Mmap>> {
        if let Some(m) = self.mapped(d) {
            return Some(m);
        }
        let (place, size) = {
            // A use, whether or not the mapping below works out.
            let tick = self.clock.fetch_add(1, Ordering::Relaxed);
            let mut st = self.state.lock().expect("cache state");
            st.entries.get_mut(d)?.last_use = tick;
            st.place(d, &self.dir)?
        };
        let registered = match place {
            Place::File(path) => {
                let map = File::open(&path).ok().and_then(|f| {
                    // SAFETY: chunk files are never modified after being
                    // renamed into place; eviction only unlinks them, which
                    // keeps mappings valid.
                    unsafe { Mmap::map(&f) }.ok()
                });
                let mut st = self.state.lock().expect("cache state");
                self.register_map(&mut st, d, map)
            }
            Place::Packed(slot, pack) => {
                // Held until the mapping is registered: from then on the
                // entry is never evicted (nor its hole punched) under it.
                let _no_hole = pack.punching.read().expect("pack punching lock");
                if !self.state.lock().expect("cache state").still_at(d, slot) {
                    return None;
                }
                // SAFETY: a slot is written once, before it is logged, and
                // is only punched once no reader holds it (above, and the
                // entry's mapping count checked by eviction).
                let map = unsafe {
                    MmapOptions::new()
                        .offset(slot.offset)
                        .len(size as usize)
                        .map(&pack.file)
                }
                .ok();
                let mut st = self.state.lock().expect("cache state");
                self.register_map(&mut st, d, map)
            }
        };
        registered.map_err(Leftover::clean).ok()
    }

    /// Verifies a fresh mapping of `d` on its first use by this process and
    /// makes it the entry's mapping. On failure the entry is dropped; the
    /// caller cleans up once it has released its locks.
    fn register_map(
        &self,
        st: &mut State,
        d: &Digest,
        map: Option<Mmap>,
    ) -> Result<Arc<Mmap>, Leftover> {
        let Some(map) = map else {
            return Err(st.take(d, &self.dir));
        };
        if !st.verified.contains(d) {
            // First use by this process: a torn write after a crash shows here.
            if Digest::of(d.algorithm(), &map) != *d {
                return Err(self.drop_torn(st, d));
            }
            st.verified.insert(d.clone());
        }
        let _ = map.advise(memmap2::Advice::Sequential);
        let map = Arc::new(map);
        if let Some(e) = st.entries.get_mut(d) {
            e.map = Arc::downgrade(&map);
        }
        Self::remember(st, &map);
        self.stats.hits.fetch_add(1, Ordering::Relaxed);
        Ok(map)
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
    /// one small chunk at a time (the unmap flushes every CPU's TLB) cost more
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
            let verified = st.verified.contains(d);
            if mapped.is_none() && (verified || (size as u64) < FILE_MIN) {
                let Some((place, _)) = st.place(d, &self.dir) else {
                    return false;
                };
                drop(st);
                if !verified {
                    return self.verify_and_read_into(d, &place, size, range, out);
                }
                return match self.pread_into(d, &place, range, out) {
                    Some(true) => {
                        self.stats.hits.fetch_add(1, Ordering::Relaxed);
                        true
                    }
                    Some(false) => {
                        self.forget(d);
                        false
                    }
                    // Removed meanwhile.
                    None => false,
                };
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
        place: &Place,
        size: usize,
        range: Range<usize>,
        out: &mut Vec<u8>,
    ) -> bool {
        let mut whole = Vec::with_capacity(size);
        match self.pread_into(d, place, 0..size, &mut whole) {
            Some(true) => {}
            Some(false) => {
                self.forget(d);
                return false;
            }
            None => return false,
        }
        let mut st = self.state.lock().expect("cache state");
        if Digest::of(d.algorithm(), &whole) != *d {
            let leftover = self.drop_torn(&mut st, d);
            drop(st);
            leftover.clean();
            return false;
        }
        st.verified.insert(d.clone());
        drop(st);
        self.stats.hits.fetch_add(1, Ordering::Relaxed);
        out.extend_from_slice(&whole[range]);
        true
    }

    /// Drops a chunk whose bytes on disk do not match its digest; the
    /// caller cleans up once it has released its locks.
    fn drop_torn(&self, st: &mut State, d: &Digest) -> Leftover {
        self.stats.torn.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(chunk = %d, "cached chunk is corrupt (torn write?); dropping it");
        st.take(d, &self.dir)
    }

    /// Reads `range` of an entry into the end of `out` (unchecked: the
    /// caller knows the chunk verified, or checks the bytes). `None` if a
    /// pack entry was removed meanwhile, `Some(false)` if the read failed.
    fn pread_into(
        &self,
        d: &Digest,
        place: &Place,
        range: Range<usize>,
        out: &mut Vec<u8>,
    ) -> Option<bool> {
        let at = out.len();
        out.resize(at + range.len(), 0);
        let read = match place {
            Place::Packed(slot, pack) => {
                let _no_hole = pack.punching.read().expect("pack punching lock");
                if !self.state.lock().expect("cache state").still_at(d, *slot) {
                    out.truncate(at);
                    return None;
                }
                pack.file
                    .read_exact_at(&mut out[at..], slot.offset + range.start as u64)
            }
            Place::File(path) => {
                // A file opened ahead is the same immutable chunk (eviction
                // only unlinks), so it is as good as opening it now.
                let ahead = self.opened_ahead.lock().expect("opened ahead").take(d);
                match ahead.map_or_else(|| File::open(path), Ok) {
                    Ok(f) => f.read_exact_at(&mut out[at..], range.start as u64),
                    Err(e) => Err(e),
                }
            }
        };
        if read.is_err() {
            out.truncate(at);
        }
        Some(read.is_ok())
    }

    fn remember(st: &mut State, map: &Arc<Mmap>) {
        // Large mappings (whole files) would pin a lot of page cache.
        if map.len() as u64 >= FILE_MIN {
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
        let (map, slot) = if Self::stores_as_file(size) {
            (self.insert_file(d, size, fill)?, None)
        } else {
            let (map, slot) = self.insert_packed(d, size, fill)?;
            (map, Some(slot))
        };
        let map = Arc::new(map);
        self.stats.inserted_bytes.fetch_add(size, Ordering::Relaxed);
        let tick = self.clock.fetch_add(1, Ordering::Relaxed);
        let leftover = {
            let mut st = self.state.lock().expect("cache state");
            let mut leftover = Leftover::Nothing;
            if let Some(slot) = slot {
                if let Some(held) = st.entries.get(d).and_then(|e| e.map.upgrade()) {
                    // Stored meanwhile by another fill, and mapped: keep that
                    // one (its slot cannot be punched under its readers).
                    drop(map);
                    st.packs.abandoned(slot, size);
                    return Ok(held);
                }
                // Stored meanwhile but not mapped: replaced (removal logged
                // before the new line, so a restart finds the new one).
                leftover = st.take(d, &self.dir);
                if let Err(e) = st.packs.stored(d, slot, size) {
                    st.packs.abandoned(slot, size);
                    drop(st);
                    leftover.clean();
                    return Err(pack_err(e));
                }
            }
            st.verified.insert(d.clone());
            Self::remember(&mut st, &map);
            if let Some(old) = st.entries.insert(
                d.clone(),
                Entry {
                    size,
                    last_use: tick,
                    map: Arc::downgrade(&map),
                    slot,
                },
            ) {
                st.total -= old.size;
            }
            st.total += size;
            leftover
        };
        leftover.clean();
        self.evict();
        Ok(map)
    }

    /// Writes a small entry into a pack slot; the slot is logged by the
    /// caller.
    fn insert_packed(
        &self,
        d: &Digest,
        size: u64,
        fill: impl FnOnce(&mut [u8]) -> Result<(), String>,
    ) -> Result<(Mmap, Slot), CacheError> {
        let (slot, pack) = self
            .state
            .lock()
            .expect("cache state")
            .packs
            .reserve(size)
            .map_err(pack_err)?;
        let pack_path = self.dir.join("packs").join(slot.pack.to_string());
        let result = (|| {
            pack.extend(slot.offset, size).map_err(io_err(&pack_path))?;
            // SAFETY: the slot is ours alone until it is logged.
            let mut map = unsafe {
                MmapOptions::new()
                    .offset(slot.offset)
                    .len(size as usize)
                    .map_mut(&pack.file)
            }
            .map_err(io_err(&pack_path))?;
            fill_verified(d, &mut map, fill)?;
            map.make_read_only().map_err(io_err(&pack_path))
        })();
        match result {
            Ok(map) => Ok((map, slot)),
            Err(e) => {
                self.state
                    .lock()
                    .expect("cache state")
                    .packs
                    .abandoned(slot, size);
                Err(e)
            }
        }
    }

    /// Writes a large entry as a file of its own, fsynced and journaled.
    fn insert_file(
        &self,
        d: &Digest,
        size: u64,
        fill: impl FnOnce(&mut [u8]) -> Result<(), String>,
    ) -> Result<Mmap, CacheError> {
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
            pack::allocate(&file, 0, size).map_err(io_err(&tmp))?;
            // SAFETY: the file is ours alone (created exclusively in tmp/).
            let mut map = unsafe { MmapMut::map_mut(&file) }.map_err(io_err(&tmp))?;
            fill_verified(d, &mut map, fill)?;
            map.flush().map_err(io_err(&tmp))?;
            file.sync_all().map_err(io_err(&tmp))?;
            let dest = self.path(d);
            let parent = dest.parent().expect("chunk paths have parents");
            fs::create_dir_all(parent).map_err(io_err(parent))?;
            fs::rename(&tmp, &dest).map_err(io_err(&dest))?;
            let log = self.dir.join("verified.log");
            let mut f = OpenOptions::new()
                .create(true)
                .append(true)
                .open(&log)
                .map_err(io_err(&log))?;
            writeln!(f, "{d}")
                .and_then(|()| f.sync_data())
                .map_err(io_err(&log))?;
            map.make_read_only().map_err(io_err(&dest))
        })();
        if result.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        result
    }

    /// Removes least recently used chunks that no reader holds until the cache
    /// fits its limit again.
    pub fn evict(&self) {
        let mut leftovers = Vec::new();
        {
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
                leftovers.push(st.take(&d, &self.dir));
                self.stats.evicted_bytes.fetch_add(size, Ordering::Relaxed);
            }
        }
        leftovers.into_iter().for_each(Leftover::clean);
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

    /// Overwrites an entry's bytes on disk, as a torn write would leave them.
    fn tear(cache: &ChunkCache, d: &Digest) {
        let st = cache.state.lock().unwrap();
        let e = &st.entries[d];
        let (path, offset) = match e.slot {
            Some(slot) => (
                cache.dir.join("packs").join(slot.pack.to_string()),
                slot.offset,
            ),
            None => (cache.path(d), 0),
        };
        let f = OpenOptions::new().write(true).open(path).unwrap();
        f.write_all_at(&vec![0u8; e.size as usize], offset).unwrap();
    }

    /// Disk blocks (of 512 bytes) a file holds.
    fn blocks(path: &Path) -> u64 {
        use std::os::unix::fs::MetadataExt;
        fs::metadata(path).unwrap().blocks()
    }

    fn packs(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(dir.join("packs"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
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
        tear(&cache, &d_b);
        drop(cache);
        let cache = ChunkCache::open(dir.path(), 1 << 20).unwrap();
        assert!(cache.contains(&d_b));
        assert!(cache.get(&d_b).is_none());
        assert!(!cache.contains(&d_b));
        assert_eq!(cache.stats.torn.load(Ordering::Relaxed), 1);
        // ...and stays dropped after the next restart.
        drop(cache);
        let cache = ChunkCache::open(dir.path(), 1 << 20).unwrap();
        assert!(!cache.contains(&d_b));
        assert!(cache.get(&da).is_some() || cache.get(&d_c).is_some());
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
        tear(&cache, &db);
        drop(cache);
        let cache = ChunkCache::open(dir.path(), 1 << 20).unwrap();
        let mut out = Vec::new();
        assert!(!cache.read_into(&db, 0..1000, &mut out));
        assert!(out.is_empty());
        assert!(!cache.contains(&db));
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

    #[test]
    fn small_entries_share_a_pack_and_removing_them_frees_its_blocks() {
        let dir = tempfile::tempdir().unwrap();
        let cache = ChunkCache::open(dir.path(), 1 << 30).unwrap();
        let data = |i: u32| -> Vec<u8> { (0..20_000u32).map(|j| (i * 7 + j) as u8).collect() };
        let digests: Vec<Digest> = (0..50u32)
            .map(|i| {
                let bytes = data(i);
                let d = Digest::sha256(&bytes);
                drop(
                    cache
                        .insert_with(&d, bytes.len() as u64, fill_with(&bytes))
                        .unwrap(),
                );
                d
            })
            .collect();
        assert_eq!(packs(dir.path()), ["0", "0.log"]);
        assert_eq!(walk(&dir.path().join("chunks")), 0, "no file per entry");
        let pack = dir.path().join("packs/0");
        let full = blocks(&pack);
        assert!(full >= 50 * 20_000 / 512, "{full} blocks");

        // Half of them go: their blocks are freed, the others still read.
        cache.retain(|d| digests[..25].contains(d));
        assert!(
            blocks(&pack) <= full / 2 + 16,
            "{} of {full} blocks",
            blocks(&pack)
        );
        let mut out = Vec::new();
        assert!(cache.read_into(&digests[3], 0..20_000, &mut out));
        assert_eq!(out, data(3));
        assert!(!cache.contains(&digests[30]));

        // A restart finds what the log says is there; a last line cut short
        // (a crash while appending) is ignored, even where it parses.
        drop(cache);
        let log = dir.path().join("packs/0.log");
        let mut f = OpenOptions::new().append(true).open(&log).unwrap();
        f.write_all(format!("{} 0 20", digests[30]).as_bytes())
            .unwrap();
        let cache = ChunkCache::open(dir.path(), 1 << 30).unwrap();
        assert_eq!(cache.size(), 25 * 20_000);
        assert!(!cache.contains(&digests[30]));
        for (i, d) in digests[..25].iter().enumerate() {
            let mut out = Vec::new();
            assert!(cache.read_into(d, 0..20_000, &mut out), "entry {i}");
            assert_eq!(out, data(i as u32));
        }
        // New entries go on in the same pack.
        let more = data(99);
        let dm = Digest::sha256(&more);
        assert_eq!(
            &cache.insert_with(&dm, 20_000, fill_with(&more)).unwrap()[..],
            &more[..]
        );
        assert_eq!(packs(dir.path()), ["0", "0.log"]);

        // A pack that nothing is left in is deleted.
        cache.retain(|_| false);
        assert!(packs(dir.path()).is_empty(), "{:?}", packs(dir.path()));
        assert_eq!(cache.size(), 0);
        let _ = cache.insert_with(&dm, 20_000, fill_with(&more)).unwrap();
        assert_eq!(packs(dir.path()), ["1", "1.log"]);
    }

    /// Another process holding the cache (python's `lockf` takes the same
    /// POSIX record lock): refused, or waited for until it lets go.
    #[test]
    fn a_cache_directory_has_one_owner_process_at_a_time() {
        use std::io::BufRead;
        let dir = tempfile::tempdir().unwrap();
        drop(ChunkCache::open(dir.path(), 1 << 20).unwrap());
        let mut owner = std::process::Command::new("python3")
            .arg("-c")
            .arg("import fcntl, sys, time\nf = open(sys.argv[1], 'r+')\nfcntl.lockf(f, fcntl.LOCK_EX)\nprint('locked', flush=True)\ntime.sleep(1)\n")
            .arg(dir.path().join("lock"))
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("python3");
        let mut line = String::new();
        std::io::BufReader::new(owner.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert_eq!(line.trim(), "locked");
        let open = |wait| ChunkCache::open_waiting(dir.path().to_owned(), 1 << 20, wait);
        let err = open(Duration::ZERO).unwrap_err();
        assert!(matches!(err, CacheError::InUse { .. }), "{err}");
        assert!(err.to_string().contains("in use"), "{err}");
        // A successor waits for the owner to let go (it exits after 1 s).
        open(Duration::from_secs(10)).unwrap();
        owner.wait().unwrap();
        // Within one process the lock is taken again (a restarted daemon).
        let first = open(Duration::ZERO).unwrap();
        drop(open(Duration::ZERO).unwrap());
        drop(first);
    }

    #[test]
    fn large_entries_are_files_fit_for_passthrough_small_ones_are_not() {
        let dir = tempfile::tempdir().unwrap();
        let cache = ChunkCache::open(dir.path(), 1 << 30).unwrap();
        let big = vec![5u8; FILE_MIN as usize];
        let small = vec![6u8; FILE_MIN as usize - 1];
        let (db, ds) = (Digest::sha256(&big), Digest::sha256(&small));
        drop(cache.insert_with(&db, FILE_MIN, fill_with(&big)).unwrap());
        drop(
            cache
                .insert_with(&ds, FILE_MIN - 1, fill_with(&small))
                .unwrap(),
        );
        assert!(ChunkCache::stores_as_file(FILE_MIN) && !ChunkCache::stores_as_file(FILE_MIN - 1));
        let mut f = cache.open_file(&db).expect("a file");
        let mut read = Vec::new();
        std::io::Read::read_to_end(&mut f, &mut read).unwrap();
        assert_eq!(read, big);
        assert!(cache.open_file(&ds).is_none(), "packed");
        assert!(cache.path(&db).exists() && !cache.path(&ds).exists());
        // The large one survives a restart without being hashed again.
        drop(cache);
        let cache = ChunkCache::open(dir.path(), 1 << 30).unwrap();
        assert!(cache.state.lock().unwrap().verified.contains(&db));
        assert_eq!(&cache.get(&ds).unwrap()[..], &small[..]);
    }

    /// Readers of packed entries while entries are evicted and removed
    /// (holes punched) under them: every read that succeeds returns the
    /// entry's bytes.
    #[test]
    fn eviction_never_punches_a_hole_under_a_reader() {
        let dir = tempfile::tempdir().unwrap();
        // Room for about 40 of the 8 KiB entries.
        let cache = Arc::new(ChunkCache::open(dir.path(), 40 * 8192).unwrap());
        let data = |i: u32| -> Vec<u8> { vec![(i % 255 + 1) as u8; 8192] };
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let digests: Arc<Vec<Digest>> =
            Arc::new((0..200).map(|i| Digest::sha256(&data(i))).collect());
        let readers: Vec<_> = (0..3)
            .map(|r| {
                let (cache, stop, digests) = (cache.clone(), stop.clone(), digests.clone());
                std::thread::spawn(move || {
                    let mut served = 0;
                    let mut i = r;
                    while !stop.load(Ordering::Relaxed) {
                        i = (i * 31 + 7) % 200;
                        let mut out = Vec::new();
                        if cache.read_into(&digests[i], 0..8192, &mut out) {
                            assert_eq!(out, data(i as u32), "entry {i}");
                            served += 1;
                        }
                    }
                    served
                })
            })
            .collect();
        for round in 0..100u32 {
            for i in 0..200u32 {
                let bytes = data(i);
                let _ = cache.insert_with(&digests[i as usize], 8192, fill_with(&bytes));
            }
            if round % 2 == 0 {
                // Everything not mapped goes, wherever readers are.
                cache.retain(|_| false);
            }
        }
        stop.store(true, Ordering::Relaxed);
        let served: usize = readers.into_iter().map(|r| r.join().unwrap()).sum();
        assert!(served > 0);
        assert!(cache.size() <= 40 * 8192);
    }

    /// A full disk: inserts fail with ENOSPC (the room is allocated before
    /// zstd writes into the mapping, which would otherwise kill the daemon
    /// with SIGBUS), nothing half-written becomes visible, and what was
    /// stored before still reads.
    #[test]
    fn a_full_disk_fails_inserts_cleanly() {
        let dir = tempfile::tempdir().unwrap();
        let mounted = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=2m", "sluice-cache-test"])
            .arg(dir.path())
            .status()
            .is_ok_and(|s| s.success());
        if !mounted {
            eprintln!("SKIP: mounting a small tmpfs needs root");
            return;
        }
        struct Unmount<'a>(&'a Path);
        impl Drop for Unmount<'_> {
            fn drop(&mut self) {
                let _ = std::process::Command::new("umount").arg(self.0).status();
            }
        }
        let _unmount = Unmount(dir.path());
        let cache = ChunkCache::open(dir.path(), 1 << 30).unwrap();
        let data = |i: u32| -> Vec<u8> { vec![i as u8 + 1; 200_000] };
        let mut stored = Vec::new();
        let err = (0..20u32)
            .find_map(|i| {
                let bytes = data(i);
                let d = Digest::sha256(&bytes);
                match cache.insert_with(&d, 200_000, fill_with(&bytes)) {
                    Ok(_) => {
                        stored.push((d, i));
                        None
                    }
                    Err(e) => Some(e),
                }
            })
            .expect("2 MiB cannot hold 4 MB");
        assert!(err.to_string().contains("No space left on device"), "{err}");
        assert!(stored.len() >= 5, "{}", stored.len());
        let big = vec![9u8; FILE_MIN as usize];
        let err = cache
            .insert_with(&Digest::sha256(&big), FILE_MIN, fill_with(&big))
            .unwrap_err();
        assert!(err.to_string().contains("No space left on device"), "{err}");
        assert_eq!(fs::read_dir(dir.path().join("tmp")).unwrap().count(), 0);
        drop(cache);
        let cache = ChunkCache::open(dir.path(), 1 << 30).unwrap();
        for (d, i) in &stored {
            let mut out = Vec::new();
            assert!(cache.read_into(d, 0..200_000, &mut out));
            assert_eq!(out, data(*i));
        }
        assert_eq!(cache.size(), stored.len() as u64 * 200_000);
    }

    fn walk(dir: &Path) -> usize {
        fs::read_dir(dir).map_or(0, |rd| {
            rd.flatten()
                .map(|e| {
                    if e.path().is_dir() {
                        walk(&e.path())
                    } else {
                        1
                    }
                })
                .sum()
        })
    }
}
