//! Records shared by the eBPF programs (`src/main.rs`, built for the bpf
//! target) and the userspace loader in `puller/src/trace/`.
//!
//! The programs sit on the page-cache tracepoints (`filemap:mm_filemap_*`)
//! and on `sched:sched_process_exec`, keep only events on the devices (and
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
    pub _pad: u32,
}

/// Key of a backing file (FUSE passthrough): its device and inode.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct BackingKey {
    pub ino: u64,
    pub dev: u32,
    pub _pad: u32,
}

/// Values of the device map.
pub mod device {
    /// Every inode on the device is traced (a lazy FUSE mount).
    pub const ALL: u8 = 1;
    /// Only inodes listed in the backing-file map (the chunk cache's
    /// filesystem, whose passthrough files carry reads after open).
    pub const LISTED: u8 = 2;
}

/// Slots of the configuration array: tracepoint field offsets, read by
/// userspace from tracefs so that the programs need no per-kernel layout.
pub mod config {
    pub const INO: u32 = 0;
    pub const DEV: u32 = 1;
    pub const INDEX: u32 = 2;
    pub const LAST_INDEX: u32 = 3;
    /// Offsets of `mm_filemap_map_pages`'s `start_index`/`end_index` if they
    /// differ (older kernels name them so).
    pub const MAP_START: u32 = 4;
    pub const MAP_END: u32 = 5;
    /// 1 while anything is mounted: exec events are sent only then.
    pub const ENABLED: u32 = 6;
    pub const SLOTS: u32 = 8;
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: plain `repr(C)` integers with explicit padding.
    unsafe impl aya::Pod for super::AccessEvent {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::BackingKey {}
}
