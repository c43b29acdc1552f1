//! Pack files: small cache entries appended to a few large files instead of
//! one file each.
//!
//! ```text
//! CACHE/packs/<id>       entries at 4 KiB-aligned offsets, holes where
//!                        entries were removed
//! CACHE/packs/<id>.log   one line per change, in order:
//!                        "<digest> <offset> <size>" stored, "-<digest>" removed
//! ```
//!
//! Why: a chunk file of its own costs a directory lookup and an inode read
//! each time it is opened after the page cache was dropped, the same as the
//! file it stands for on a native filesystem; serving it through FUSE on top
//! of that cannot keep up with the native read. In a pack, entries written
//! one after the other lie one after the other on disk, are read without any
//! open, and the kernel's readahead runs across them.
//!
//! Removal punches a hole (`FALLOC_FL_PUNCH_HOLE`): the blocks are freed and
//! offsets never move or get reused, so a pack needs no compaction; a pack
//! whose entries are all gone is deleted. Nothing is fsynced: after a crash a
//! logged entry may hold zeros or a torn write, which the cache's check of
//! every entry on its first use after a start finds (see the parent module).
//! A last log line cut short (no newline) is ignored.

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use sluice_format::Digest;

/// A pack is closed to new entries once it is this large.
const PACK_BYTES: u64 = 256 << 20;
/// Entries start at multiples of this (the filesystem block), so that each
/// owns its blocks and removing it frees them.
const ALIGN: u64 = 4096;

/// Where an entry lies.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Slot {
    pub pack: u32,
    pub offset: u64,
}

/// One pack file, shared with readers.
#[derive(Debug)]
pub(super) struct Pack {
    pub file: File,
    /// Held (shared) by a reader from checking that its entry is still there
    /// until it has read it or registered its mapping; taken exclusively to
    /// punch a hole, so a hole never opens under a reader.
    pub punching: RwLock<()>,
}

struct PackState {
    pack: Arc<Pack>,
    log: File,
    /// Where the next entry goes.
    end: u64,
    /// Entries stored.
    live: u64,
    /// Slots handed out to fills that are neither stored nor abandoned yet.
    pending: u64,
}

impl PackState {
    fn new(file: File, log: File, end: u64, live: u64) -> Self {
        PackState {
            pack: Arc::new(Pack {
                file,
                punching: RwLock::new(()),
            }),
            log,
            end,
            live,
            pending: 0,
        }
    }
}

/// The packs of a cache directory (kept under the cache's state lock).
pub(super) struct Packs {
    dir: PathBuf,
    packs: HashMap<u32, PackState>,
    /// The pack new entries go to.
    current: Option<u32>,
    next_id: u32,
}

/// An I/O error and the file it happened on.
pub(super) type PackError = (PathBuf, io::Error);

/// An entry found in a pack's log: digest, slot, size.
pub(super) type Found = (Digest, Slot, u64);

fn io_at(path: &Path, e: io::Error) -> PackError {
    (path.to_owned(), e)
}

impl Packs {
    /// Opens the packs under `dir` and returns the entries they hold
    /// (digest, slot, size), the last record of a digest winning. Packs
    /// without entries are deleted.
    pub fn open(dir: PathBuf) -> Result<(Packs, Vec<Found>), PackError> {
        fs::create_dir_all(&dir).map_err(|e| io_at(&dir, e))?;
        let mut packs = Packs {
            dir,
            packs: HashMap::new(),
            current: None,
            next_id: 0,
        };
        let mut found = Vec::new();
        let mut ids: Vec<u32> = fs::read_dir(&packs.dir)
            .map_err(|e| io_at(&packs.dir, e))?
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.parse().ok())
            .collect();
        ids.sort_unstable();
        for id in ids {
            packs.next_id = id + 1;
            let (path, log_path) = (packs.path(id), packs.log_path(id));
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .open(&path)
                .map_err(|e| io_at(&path, e))?;
            let len = file.metadata().map_err(|e| io_at(&path, e))?.len();
            let mut entries: HashMap<Digest, (u64, u64)> = HashMap::new();
            let log = fs::read_to_string(&log_path).unwrap_or_default();
            // A last line without its newline was cut short by a crash.
            for line in log
                .split_inclusive('\n')
                .filter_map(|l| l.strip_suffix('\n'))
            {
                if let Some(d) = line.strip_prefix('-') {
                    if let Ok(d) = d.parse::<Digest>() {
                        entries.remove(&d);
                    }
                    continue;
                }
                let mut fields = line.split(' ');
                let (Some(d), Some(off), Some(size), None) =
                    (fields.next(), fields.next(), fields.next(), fields.next())
                else {
                    continue;
                };
                if let (Ok(d), Ok(off), Ok(size)) =
                    (d.parse::<Digest>(), off.parse::<u64>(), size.parse::<u64>())
                {
                    // Beyond the end: its data never reached the disk.
                    if off.checked_add(size).is_some_and(|end| end <= len) {
                        entries.insert(d, (off, size));
                    }
                }
            }
            if entries.is_empty() {
                drop(file);
                let _ = fs::remove_file(&path);
                let _ = fs::remove_file(&log_path);
                continue;
            }
            let log = OpenOptions::new()
                .append(true)
                .open(&log_path)
                .map_err(|e| io_at(&log_path, e))?;
            let end = len.next_multiple_of(ALIGN);
            packs
                .packs
                .insert(id, PackState::new(file, log, end, entries.len() as u64));
            if end < PACK_BYTES {
                packs.current = Some(id);
            }
            found.extend(
                entries
                    .into_iter()
                    .map(|(d, (offset, size))| (d, Slot { pack: id, offset }, size)),
            );
        }
        Ok((packs, found))
    }

    fn path(&self, id: u32) -> PathBuf {
        self.dir.join(id.to_string())
    }

    fn log_path(&self, id: u32) -> PathBuf {
        self.dir.join(format!("{id}.log"))
    }

    pub fn pack(&self, id: u32) -> Option<Arc<Pack>> {
        self.packs.get(&id).map(|p| p.pack.clone())
    }

    /// Hands out room for an entry of `size` bytes (the file is extended
    /// to cover it by [`Pack::extend`], outside the lock). Finish with
    /// [`Packs::stored`] or [`Packs::abandoned`].
    pub fn reserve(&mut self, size: u64) -> Result<(Slot, Arc<Pack>), PackError> {
        let id = match self.current {
            Some(id) if self.packs[&id].end < PACK_BYTES => id,
            _ => {
                let id = self.next_id;
                let (path, log_path) = (self.path(id), self.log_path(id));
                let file = OpenOptions::new()
                    .read(true)
                    .write(true)
                    .create_new(true)
                    .open(&path)
                    .map_err(|e| io_at(&path, e))?;
                let log = OpenOptions::new()
                    .create(true)
                    .truncate(true)
                    .write(true)
                    .open(&log_path)
                    .map_err(|e| io_at(&log_path, e))?;
                self.next_id += 1;
                self.packs.insert(id, PackState::new(file, log, 0, 0));
                if let Some(old) = self.current.replace(id) {
                    self.delete_if_empty(old);
                }
                id
            }
        };
        let p = self.packs.get_mut(&id).expect("current pack");
        let offset = p.end;
        p.end += size.max(1).next_multiple_of(ALIGN);
        p.pending += 1;
        Ok((Slot { pack: id, offset }, p.pack.clone()))
    }

    /// Logs a filled and verified entry: it is stored from now on. On an
    /// error the reservation is still open (give it back with
    /// [`Packs::abandoned`]).
    pub fn stored(&mut self, d: &Digest, slot: Slot, size: u64) -> Result<(), PackError> {
        let log_path = self.log_path(slot.pack);
        let p = self.packs.get_mut(&slot.pack).expect("reserved pack");
        // One write per line: appends from one process do not interleave.
        let line = format!("{d} {} {size}\n", slot.offset);
        p.log
            .write_all(line.as_bytes())
            .map_err(|e| io_at(&log_path, e))?;
        p.pending -= 1;
        p.live += 1;
        Ok(())
    }

    /// A reservation whose fill failed: its room is given back to the disk.
    pub fn abandoned(&mut self, slot: Slot, size: u64) {
        let Some(p) = self.packs.get_mut(&slot.pack) else {
            return;
        };
        p.pending -= 1;
        let _ = punch(&p.pack.file, slot.offset, size);
        self.delete_if_empty(slot.pack);
    }

    /// Logs the removal of an entry; returns its pack, whose hole the caller
    /// punches with [`Pack::punch`] after releasing the cache's lock (readers
    /// take that lock while holding the pack's). An emptied pack is deleted
    /// (its file stays readable to whoever holds it).
    pub fn removed(&mut self, d: &Digest, slot: Slot) -> Option<Arc<Pack>> {
        let p = self.packs.get_mut(&slot.pack)?;
        let _ = p.log.write_all(format!("-{d}\n").as_bytes());
        p.live = p.live.saturating_sub(1);
        let pack = p.pack.clone();
        if self.delete_if_empty(slot.pack) {
            // The blocks go with the file.
            return None;
        }
        Some(pack)
    }

    /// Deletes a pack that holds nothing and has nothing being filled.
    fn delete_if_empty(&mut self, id: u32) -> bool {
        match self.packs.get(&id) {
            Some(p) if p.live == 0 && p.pending == 0 => {}
            _ => return false,
        }
        self.packs.remove(&id);
        if self.current == Some(id) {
            self.current = None;
        }
        let _ = fs::remove_file(self.path(id));
        let _ = fs::remove_file(self.log_path(id));
        true
    }
}

impl Pack {
    /// Extends the file to cover a reserved slot, with its blocks allocated
    /// (see [`allocate`]).
    pub fn extend(&self, offset: u64, size: u64) -> io::Result<()> {
        allocate(&self.file, offset, size.max(1).next_multiple_of(ALIGN))
    }

    /// Frees the blocks of a removed entry, once no reader is on it.
    pub fn punch(&self, offset: u64, size: u64) {
        let _no_readers = self.punching.write().expect("pack punching lock");
        let _ = punch(&self.file, offset, size);
    }

    /// Asks the kernel to read an entry into the page cache in the
    /// background.
    pub fn will_need(&self, offset: u64, size: u64) {
        will_need(&self.file, offset, size);
    }
}

/// Asks the kernel to read `len` bytes at `offset` of `file` into the page
/// cache in the background (`POSIX_FADV_WILLNEED`; 0 means to the end).
pub(super) fn will_need(file: &File, offset: u64, len: u64) {
    // SAFETY: a valid descriptor; advice only, no memory passed.
    unsafe {
        libc::posix_fadvise(
            file.as_raw_fd(),
            offset as i64,
            len as i64,
            libc::POSIX_FADV_WILLNEED,
        )
    };
}

/// Allocates blocks for `len` bytes at `offset`, extending the file if
/// needed but never shrinking it (`set_len` would, racing with other fills).
/// Allocated up front, a full disk fails here with ENOSPC instead of killing
/// the process with SIGBUS when zstd writes into the mapping.
pub(super) fn allocate(file: &File, offset: u64, len: u64) -> io::Result<()> {
    if len == 0 {
        return Ok(());
    }
    // SAFETY: a valid descriptor; no memory is passed.
    let r = unsafe { libc::fallocate(file.as_raw_fd(), 0, offset as i64, len as i64) };
    if r == 0 {
        return Ok(());
    }
    let e = io::Error::last_os_error();
    if e.raw_os_error() != Some(libc::EOPNOTSUPP) {
        return Err(e);
    }
    // A filesystem without fallocate: writing the last byte extends it.
    use std::os::unix::fs::FileExt;
    file.write_all_at(&[0], offset + len - 1)
}

fn punch(file: &File, offset: u64, size: u64) -> io::Result<()> {
    let len = size.max(1).next_multiple_of(ALIGN);
    // SAFETY: a valid descriptor; no memory is passed.
    let r = unsafe {
        libc::fallocate(
            file.as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            offset as i64,
            len as i64,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}
