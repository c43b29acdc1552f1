//! Records shared by the eBPF programs (`src/main.rs`, built for the bpf
//! target) and the userspace loader in `puller/src/trace/`.
//!
//! The programs sit on the page-cache tracepoints (`filemap:mm_filemap_*`,
//! as raw tracepoints where the kernel has BTF, else as classic ones) and on
//! `sched:sched_process_exec`, keep only events on the devices (and
//! backing files) of sluice's lazy mounts, and hand them to userspace through
//! a ring buffer as [`AccessEvent`]s.
#![no_std]

/// What an [`AccessEvent`] reports.
pub mod kind {
    /// `filemap:mm_filemap_get_pages`: a buffered read of pages.
    pub const READ: u32 = 0;
    /// `filemap:mm_filemap_fault`: a page fault on a mapped file.
    pub const FAULT: u32 = 1;
    /// `filemap:mm_filemap_map_pages`: fault-around mapping of cached pages.
    pub const MAP_PAGES: u32 = 2;
    /// `sched:sched_process_exec`: a process executed a program.
    pub const EXEC: u32 = 3;
}

/// One event, as the programs write it into the ring buffer.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AccessEvent {
    /// Inode number (0 for exec).
    pub ino: u64,
    /// First and last page index touched (4 KiB pages on x86_64).
    pub first_page: u64,
    pub last_page: u64,
    /// cgroup v2 id of the task: one per container.
    pub cgroup: u64,
    /// `bpf_ktime_get_ns`, monotonic.
    pub time_ns: u64,
    /// The kernel's dev_t (major << 20 | minor).
    pub dev: u32,
    pub tgid: u32,
    /// One of [`kind`].
    pub kind: u32,
    /// [`flags`] bits.
    pub flags: u32,
}

/// Bits of [`AccessEvent::flags`].
pub mod flags {
    /// Exec: the process is not in the host's PID namespace (it runs in a
    /// container). Decided in the kernel at exec time, because a short-lived
    /// process may be gone before userspace could look at it.
    pub const OTHER_PID_NS: u32 = 1;
}

/// Key of a backing file (FUSE passthrough): its device and inode.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct BackingKey {
    pub ino: u64,
    pub dev: u32,
    pub _pad: u32,
}

/// Pre-filters the filemap programs check before any hash lookup: bits and
/// counters in array maps, whose lookups the verifier turns into plain loads.
/// Reads on other devices, and of the cache device's files that are not
/// backing files, stop there: a hash-map lookup is a function call, which
/// costs far more (all the more with return-stack mitigations such as AMD's
/// SRSO "safe RET"), and these programs run on every buffered read on the
/// machine. A hit is confirmed in the exact maps.
pub mod filter {
    /// The device filter: a bitmap of this many 64-bit words.
    pub const DEVICE_WORDS: u32 = 1024;
    /// The backing-file filter: this many counters.
    pub const BACKING_SLOTS: u32 = 1 << 16;

    const GOLDEN: u64 = 0x9e37_79b9_7f4a_7c15;

    /// A device's bit in the device filter (below `DEVICE_WORDS * 64`).
    #[inline(always)]
    pub fn device_bit(dev: u32) -> u32 {
        (u64::from(dev).wrapping_mul(GOLDEN) >> 48) as u32
    }

    /// A backing file's counter in the backing-file filter (below
    /// `BACKING_SLOTS`).
    #[inline(always)]
    pub fn backing_slot(dev: u32, ino: u64) -> u32 {
        ((ino ^ (u64::from(dev) << 40)).wrapping_mul(GOLDEN) >> 48) as u32
    }
}

/// Slots of the configuration array (runtime switches).
pub mod config {
    /// 1 while anything is mounted: exec events are sent only then.
    pub const ENABLED: u32 = 0;
    /// The chunk cache's device (0: none). Of its files only the backing
    /// files (FUSE passthrough) in the backing-file map are traced: once a
    /// file is served with passthrough its pages belong to the backing file.
    pub const CACHE_DEV: u32 = 1;
    pub const SLOTS: u32 = 4;
}

/// Names of the programs' read-only globals that hold offsets: tracepoint
/// record fields (from tracefs, for the classic tracepoint programs) and
/// kernel struct members (from BTF, for the raw tracepoint programs).
/// Userspace sets them at load time, so the programs need no per-kernel
/// layout and no map lookup to find them.
pub mod offsets {
    pub const INO: &str = "OFF_INO";
    pub const DEV: &str = "OFF_DEV";
    pub const INDEX: &str = "OFF_INDEX";
    pub const LAST_INDEX: &str = "OFF_LAST_INDEX";
    /// `mm_filemap_map_pages`'s first/last page (`start_index`/`end_index`
    /// on older kernels).
    pub const MAP_START: &str = "OFF_MAP_START";
    pub const MAP_END: &str = "OFF_MAP_END";
    /// `struct address_space`'s `host` (the file's inode).
    pub const MAPPING_HOST: &str = "OFF_MAPPING_HOST";
    /// `struct inode`'s `i_sb` and `i_ino`.
    pub const INODE_SB: &str = "OFF_INODE_SB";
    pub const INODE_INO: &str = "OFF_INODE_INO";
    /// `struct super_block`'s `s_dev`.
    pub const SB_DEV: &str = "OFF_SB_DEV";
    /// The host's PID namespace (the kernel's dev_t of nsfs and the inode of
    /// `/proc/self/ns/pid` of the loader), for [`super::flags::OTHER_PID_NS`].
    pub const HOST_PIDNS_DEV: &str = "HOST_PIDNS_DEV";
    pub const HOST_PIDNS_INO: &str = "HOST_PIDNS_INO";
    /// How long after an exec page-cache accesses are reported, in jiffies
    /// (u64): the recording window. Userspace records an access only if its
    /// process executed a program at most a window before, so outside that
    /// time the filemap programs return at once: the cost of tracing sluice's
    /// mounts is paid only while a container starts.
    pub const WINDOW_JIFFIES: &str = "WINDOW_JIFFIES";
}

/// Key of the in-kernel "already reported" map: a process touching the same
/// page range of a file again is not reported again (a profile needs first
/// touches only, and warm re-reads then cost one lookup).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SeenKey {
    pub ino: u64,
    pub first_page: u64,
    pub last_page: u64,
    pub dev: u32,
    pub tgid: u32,
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: plain `repr(C)` integers with explicit padding.
    unsafe impl aya::Pod for super::AccessEvent {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::BackingKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::SeenKey {}
}
