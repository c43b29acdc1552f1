//! The eBPF programs. Built for `bpfel-unknown-none` only; on other targets
//! this binary is an empty stub so that workspace builds stay simple.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]

#[cfg(target_arch = "bpf")]
mod programs {
    use aya_ebpf::bindings::bpf_pidns_info;
    use aya_ebpf::bindings::{BPF_RB_AVAIL_DATA, BPF_RB_FORCE_WAKEUP, BPF_RB_NO_WAKEUP};
    use aya_ebpf::helpers::bpf_probe_read_kernel;
    use aya_ebpf::helpers::generated::{bpf_get_ns_current_pid_tgid, bpf_jiffies64};
    use aya_ebpf::helpers::{
        bpf_get_current_cgroup_id, bpf_get_current_pid_tgid, bpf_ktime_get_ns,
    };
    use aya_ebpf::macros::{btf_tracepoint, map, raw_tracepoint, tracepoint};
    use aya_ebpf::maps::{Array, HashMap, LruHashMap, PerCpuArray, RingBuf};
    use aya_ebpf::programs::{BtfTracePointContext, RawTracePointContext, TracePointContext};
    use sluice_puller_ebpf::{config, filter, flags, kind, AccessEvent, BackingKey, SeenKey};

    // Tracepoint field offsets, set by the loader (see `offsets`).
    #[no_mangle]
    static OFF_INO: u32 = 8;
    #[no_mangle]
    static OFF_DEV: u32 = 16;
    #[no_mangle]
    static OFF_INDEX: u32 = 24;
    #[no_mangle]
    static OFF_LAST_INDEX: u32 = 32;
    #[no_mangle]
    static OFF_MAP_START: u32 = 24;
    #[no_mangle]
    static OFF_MAP_END: u32 = 32;
    // Struct member offsets from the kernel's BTF, set by the loader for the
    // raw and BTF tracepoint programs (which get the tracepoint's arguments,
    // not a record with the fields already copied out).
    #[no_mangle]
    static OFF_MAPPING_HOST: u32 = 0;
    #[no_mangle]
    static OFF_INODE_SB: u32 = 0;
    #[no_mangle]
    static OFF_INODE_INO: u32 = 0;
    #[no_mangle]
    static OFF_SB_DEV: u32 = 0;
    // The host's PID namespace, set by the loader (0/0: unknown).
    #[no_mangle]
    static HOST_PIDNS_DEV: u64 = 0;
    #[no_mangle]
    static HOST_PIDNS_INO: u64 = 0;
    // The recording window in jiffies, set by the loader.
    #[no_mangle]
    static WINDOW_JIFFIES: u64 = u64::MAX;

    #[inline(always)]
    fn off(v: &'static u32) -> usize {
        // SAFETY: a read of a global; volatile so that the compiler does not
        // fold in the default the loader replaces.
        unsafe { core::ptr::read_volatile(v) as usize }
    }

    /// Granules a process has already reported.
    #[map]
    static SEEN: LruHashMap<SeenKey, u8> = LruHashMap::with_max_entries(1 << 16, 0);
    /// Userspace is woken once this much is waiting (and polls anyway).
    const WAKEUP_BYTES: u64 = 64 << 10;

    /// Devices of lazy mounts: every inode on them is traced.
    #[map]
    static DEVICES: HashMap<u32, u8> = HashMap::with_max_entries(4096, 0);
    /// Backing files handed to the kernel for passthrough.
    #[map]
    static BACKING: HashMap<BackingKey, u8> = HashMap::with_max_entries(1 << 16, 0);
    /// Bits of the devices in DEVICES (see `filter`).
    #[map]
    static DEVICE_FILTER: Array<u64> = Array::with_max_entries(filter::DEVICE_WORDS, 0);
    /// Counts of the backing files in BACKING per slot (see `filter`).
    #[map]
    static BACKING_FILTER: Array<u32> = Array::with_max_entries(filter::BACKING_SLOTS, 0);
    /// Jiffies of the last exec while lazy layers are mounted (0: none).
    #[map]
    static LAST_EXEC: Array<u64> = Array::with_max_entries(1, 0);
    #[map]
    static CONFIG: Array<u32> = Array::with_max_entries(config::SLOTS, 0);
    #[map]
    static EVENTS: RingBuf = RingBuf::with_byte_size(4 << 20, 0);
    /// Events lost because the ring buffer was full.
    #[map]
    static DROPS: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

    fn cfg(slot: u32) -> usize {
        CONFIG.get(slot).copied().unwrap_or(0) as usize
    }

    #[inline(always)]
    fn send(ev: AccessEvent) {
        match EVENTS.reserve::<AccessEvent>(0) {
            Some(mut entry) => {
                entry.write(ev);
                // A wakeup per event would cost a context switch per read.
                let flags = if EVENTS.query(BPF_RB_AVAIL_DATA as u64) >= WAKEUP_BYTES {
                    BPF_RB_FORCE_WAKEUP
                } else {
                    BPF_RB_NO_WAKEUP
                };
                entry.submit(flags as u64);
            }
            None => {
                if let Some(n) = DROPS.get_ptr_mut(0) {
                    // SAFETY: a per-CPU slot, only this CPU writes it.
                    unsafe { *n += 1 };
                }
            }
        }
    }

    /// Whether a recording window is open: some process executed a program
    /// at most a window ago. Userspace records only accesses of processes
    /// within a window after their exec, so nothing it would keep is lost;
    /// outside windows every filemap call ends here. No calls: the verifier
    /// inlines `bpf_jiffies64` and array lookups into loads.
    #[inline(always)]
    fn window_open() -> bool {
        let last = LAST_EXEC.get(0).copied().unwrap_or(0);
        // SAFETY: a helper without arguments; a read of a global the loader
        // set (volatile: not folded).
        let (now, window) = unsafe { (bpf_jiffies64(), core::ptr::read_volatile(&WINDOW_JIFFIES)) };
        last != 0 && now.wrapping_sub(last) <= window
    }

    /// No last-page field (`mm_filemap_fault` reports one page).
    const NONE: usize = usize::MAX;

    /// What every filemap program does once it knows the device: filter by
    /// it (for unrelated I/O, array loads are the whole cost: no calls), or
    /// by backing file on the cache's device; then drop ranges this process
    /// already reported, then send. `ino` and `range` are read only past the
    /// filters.
    /// Inlined: BPF calls take at most five registers of arguments.
    #[inline(always)]
    fn report(
        what: u32,
        dev: u32,
        ino: impl FnOnce() -> Option<u64>,
        range: impl FnOnce() -> (u64, u64),
    ) -> u32 {
        let ino = if dev != 0 && dev as usize == cfg(config::CACHE_DEV) {
            // The cache's device: only its backing files.
            let Some(ino) = ino() else {
                return 0;
            };
            match BACKING_FILTER.get(filter::backing_slot(dev, ino)) {
                Some(&n) if n > 0 => {}
                _ => return 0,
            }
            let key = BackingKey { ino, dev, _pad: 0 };
            // SAFETY: a lookup in a map this program owns.
            if unsafe { BACKING.get(&key) }.is_none() {
                return 0;
            }
            ino
        } else {
            // A lazy mount's device, or (nearly always) unrelated I/O.
            let bit = filter::device_bit(dev);
            match DEVICE_FILTER.get(bit >> 6) {
                Some(word) if word & (1 << (bit & 63)) != 0 => {}
                _ => return 0,
            }
            // SAFETY: as above.
            if unsafe { DEVICES.get(&dev) }.is_none() {
                return 0;
            }
            let Some(ino) = ino() else {
                return 0;
            };
            ino
        };
        let (first, last) = range();
        let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
        // The same process touching the same range again (warm re-reads) is
        // not news; any other range is. Exact, so nothing is lost.
        let seen = SeenKey {
            ino,
            first_page: first,
            last_page: last,
            dev,
            tgid,
        };
        // SAFETY: a lookup in a map this program owns.
        if unsafe { SEEN.get(&seen) }.is_some() {
            return 0;
        }
        let _ = SEEN.insert(&seen, &1, 0);
        send(AccessEvent {
            ino,
            first_page: first,
            last_page: last,
            // SAFETY: helpers without arguments.
            cgroup: unsafe { bpf_get_current_cgroup_id() },
            time_ns: unsafe { bpf_ktime_get_ns() },
            dev,
            tgid,
            kind: what,
            flags: 0,
        });
        0
    }

    // Classic tracepoints: the kernel has copied the fields into a record
    // (offsets from tracefs). Used where the kernel has no BTF.

    #[inline(always)]
    fn classic(ctx: &TracePointContext, what: u32, first_off: usize, last_off: usize) -> u32 {
        if !window_open() {
            return 0;
        }
        // SAFETY: offsets come from the tracepoint's format file; reads are
        // checked by the verifier-approved probe helper.
        let dev: u32 = match unsafe { ctx.read_at(off(&OFF_DEV)) } {
            Ok(d) => d,
            Err(_) => return 0,
        };
        report(
            what,
            dev,
            // SAFETY: as above.
            || unsafe { ctx.read_at(off(&OFF_INO)) }.ok(),
            || {
                // SAFETY: as above.
                let first: u64 = unsafe { ctx.read_at(first_off) }.unwrap_or(0);
                let last: u64 = if last_off == NONE {
                    first
                } else {
                    // SAFETY: as above.
                    unsafe { ctx.read_at(last_off) }.unwrap_or(first)
                };
                (first, last)
            },
        )
    }

    #[tracepoint]
    pub fn sluice_get_pages(ctx: TracePointContext) -> u32 {
        classic(&ctx, kind::READ, off(&OFF_INDEX), off(&OFF_LAST_INDEX))
    }

    #[tracepoint]
    pub fn sluice_fault(ctx: TracePointContext) -> u32 {
        classic(&ctx, kind::FAULT, off(&OFF_INDEX), NONE)
    }

    #[tracepoint]
    pub fn sluice_map_pages(ctx: TracePointContext) -> u32 {
        classic(
            &ctx,
            kind::MAP_PAGES,
            off(&OFF_MAP_START),
            off(&OFF_MAP_END),
        )
    }

    // Raw tracepoints: the programs get the tracepoint's arguments
    // (`struct address_space *mapping, pgoff_t index[, pgoff_t last]`, checked
    // against BTF by the loader) and the kernel skips building the record,
    // which is most of a classic tracepoint's cost on unrelated I/O.

    /// Reads kernel memory at `addr`.
    #[inline(always)]
    fn kread<T>(addr: u64) -> Option<T> {
        // SAFETY: the probe helper checks the address; a fault is an error.
        unsafe { bpf_probe_read_kernel(addr as *const T) }.ok()
    }

    /// `mapping->host` and `mapping->host->i_sb->s_dev`.
    #[inline(always)]
    fn host_and_dev(mapping: u64) -> Option<(u64, u32)> {
        let host: u64 = kread(mapping + off(&OFF_MAPPING_HOST) as u64)?;
        let sb: u64 = kread(host + off(&OFF_INODE_SB) as u64)?;
        if sb == 0 {
            return None;
        }
        Some((host, kread(sb + off(&OFF_SB_DEV) as u64)?))
    }

    #[inline(always)]
    fn raw(what: u32, mapping: u64, range: impl FnOnce() -> (u64, u64)) -> u32 {
        if !window_open() {
            return 0;
        }
        let Some((host, dev)) = host_and_dev(mapping) else {
            return 0;
        };
        report(
            what,
            dev,
            || kread(host + off(&OFF_INODE_INO) as u64),
            range,
        )
    }

    #[raw_tracepoint(tracepoint = "mm_filemap_get_pages")]
    pub fn sluice_raw_get_pages(ctx: RawTracePointContext) -> i32 {
        raw(kind::READ, ctx.arg(0), || (ctx.arg(1), ctx.arg(2))) as i32
    }

    #[raw_tracepoint(tracepoint = "mm_filemap_fault")]
    pub fn sluice_raw_fault(ctx: RawTracePointContext) -> i32 {
        // Two arguments only: reading a third is refused at attach time.
        raw(kind::FAULT, ctx.arg(0), || {
            let index: u64 = ctx.arg(1);
            (index, index)
        }) as i32
    }

    #[raw_tracepoint(tracepoint = "mm_filemap_map_pages")]
    pub fn sluice_raw_map_pages(ctx: RawTracePointContext) -> i32 {
        raw(kind::MAP_PAGES, ctx.arg(0), || (ctx.arg(1), ctx.arg(2))) as i32
    }

    // BTF tracepoints: like raw ones, but the verifier knows the arguments'
    // types, so `mapping->host->i_sb->s_dev` are plain loads it checks
    // against BTF (faults read as 0) instead of a helper call each. The
    // offsets are constants to the verifier: globals in frozen .rodata.

    /// A load through a BTF-typed kernel pointer at a load-time offset.
    #[inline(always)]
    fn field<T: Copy>(ptr: u64, offset: &'static u32) -> T {
        // SAFETY: the verifier checks the access against the kernel's type
        // of `ptr` and turns it into a fault-tolerant load.
        unsafe { core::ptr::read_volatile((ptr + off(offset) as u64) as *const T) }
    }

    #[inline(always)]
    fn btf(what: u32, mapping: u64, range: impl FnOnce() -> (u64, u64)) -> u32 {
        if !window_open() {
            return 0;
        }
        let host: u64 = field(mapping, &OFF_MAPPING_HOST);
        let sb: u64 = field(host, &OFF_INODE_SB);
        if sb == 0 {
            return 0;
        }
        let dev: u32 = field(sb, &OFF_SB_DEV);
        report(what, dev, || Some(field(host, &OFF_INODE_INO)), range)
    }

    #[btf_tracepoint(function = "mm_filemap_get_pages")]
    pub fn sluice_btf_get_pages(ctx: BtfTracePointContext) -> i32 {
        btf(kind::READ, ctx.arg(0), || (ctx.arg(1), ctx.arg(2))) as i32
    }

    #[btf_tracepoint(function = "mm_filemap_fault")]
    pub fn sluice_btf_fault(ctx: BtfTracePointContext) -> i32 {
        btf(kind::FAULT, ctx.arg(0), || {
            let index: u64 = ctx.arg(1);
            (index, index)
        }) as i32
    }

    #[btf_tracepoint(function = "mm_filemap_map_pages")]
    pub fn sluice_btf_map_pages(ctx: BtfTracePointContext) -> i32 {
        btf(kind::MAP_PAGES, ctx.arg(0), || (ctx.arg(1), ctx.arg(2))) as i32
    }

    #[tracepoint]
    pub fn sluice_exec(_ctx: TracePointContext) -> u32 {
        if cfg(config::ENABLED) == 0 {
            return 0;
        }
        if let Some(last) = LAST_EXEC.get_ptr_mut(0) {
            // SAFETY: the map's one slot; a plain store (racing execs on
            // other CPUs write nearly the same value).
            unsafe { *last = bpf_jiffies64() };
        }
        // SAFETY: reads of globals the loader set (volatile: not folded).
        let (dev, ino) = unsafe {
            (
                core::ptr::read_volatile(&HOST_PIDNS_DEV),
                core::ptr::read_volatile(&HOST_PIDNS_INO),
            )
        };
        let mut ns = bpf_pidns_info { pid: 0, tgid: 0 };
        // The helper fails (-ENOENT) when the task's PID namespace is not
        // the one named by (dev, ino): the task is in a container.
        let other_ns = ino != 0
            // SAFETY: `ns` is a valid, writable bpf_pidns_info.
            && unsafe {
                bpf_get_ns_current_pid_tgid(
                    dev,
                    ino,
                    &mut ns,
                    core::mem::size_of::<bpf_pidns_info>() as u32,
                )
            } != 0;
        send(AccessEvent {
            // SAFETY: helpers without arguments.
            cgroup: unsafe { bpf_get_current_cgroup_id() },
            time_ns: unsafe { bpf_ktime_get_ns() },
            tgid: (bpf_get_current_pid_tgid() >> 32) as u32,
            kind: kind::EXEC,
            flags: if other_ns { flags::OTHER_PID_NS } else { 0 },
            ..AccessEvent::default()
        });
        0
    }

    #[cfg(not(test))]
    #[panic_handler]
    fn panic(_info: &core::panic::PanicInfo) -> ! {
        loop {}
    }

    #[link_section = "license"]
    #[no_mangle]
    static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
}

#[cfg(not(target_arch = "bpf"))]
fn main() {
    eprintln!("sluice-puller-ebpf holds eBPF programs: build it for bpfel-unknown-none (cargo xtask build-ebpf)");
}
