//! Loading and attaching the eBPF programs of `puller-ebpf`, and keeping
//! their maps in step with the mounts.
//!
//! The page-cache tracepoints are hooked, in order of preference, as BTF
//! tracepoints (`tp_btf`: the verifier knows the argument types, so following
//! `mapping->host->i_sb` is plain loads), raw tracepoints (the same arguments
//! read with a helper call per pointer) or classic tracepoints. BTF and raw
//! ones need the kernel's BTF, for the struct offsets and to check the
//! tracepoint's arguments. A classic tracepoint program makes the kernel
//! build the event's record on every call, for every file on the machine,
//! before the program can even check the device; it remains for kernels
//! without BTF (field offsets from tracefs). All offsets are load-time
//! globals, so one object works on every kernel that has the tracepoints. A
//! tracepoint the kernel lacks is skipped (logged); if none attaches, loading
//! fails and the caller falls back to FUSE-side recording.

use std::collections::HashMap as StdHashMap;
use std::sync::{Mutex, Weak};

use aya::maps::{Array, HashMap, MapData, PerCpuArray, RingBuf};
use aya::programs::{BtfTracePoint, RawTracePoint, TracePoint};
use aya::{Ebpf, EbpfLoader};
use sluice_puller_ebpf::{config, filter, offsets, AccessEvent, BackingKey};

use super::btf::{Arg, KernelBtf};
use super::Recorder;

fn drain(ring: &mut RingBuf<MapData>, recorder: &Recorder) {
    while let Some(item) = ring.next() {
        if item.len() >= std::mem::size_of::<AccessEvent>() {
            // SAFETY: the programs write whole AccessEvents; the read is
            // unaligned-safe.
            let ev: AccessEvent = unsafe { std::ptr::read_unaligned(item.as_ptr().cast()) };
            recorder.on_event(&ev);
        }
    }
}

/// The object built by puller's build script (empty with AYA_BUILD_SKIP=1).
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/sluice-puller-ebpf"));

#[derive(Debug, thiserror::Error)]
pub enum TraceError {
    #[error("this build has no eBPF programs (built with AYA_BUILD_SKIP)")]
    NotBuilt,
    #[error("loading the eBPF programs: {0}")]
    Load(String),
    #[error("no tracepoint could be attached: {0}")]
    Attach(String),
    #[error("tracefs: {0}")]
    Tracefs(String),
}

/// How the page-cache tracepoints are hooked: the first kind that loads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hooks {
    /// BTF tracepoints, else raw ones, else classic ones.
    Auto,
    /// Raw tracepoints, else classic ones (for comparisons).
    Raw,
    /// Classic tracepoints only (for comparisons and tests).
    Classic,
}

/// A page-cache tracepoint and its programs.
struct FilemapHook {
    name: &'static str,
    classic: &'static str,
    raw: &'static str,
    btf: &'static str,
    /// `pgoff_t` arguments after the mapping.
    pages: usize,
}

const FILEMAP: [FilemapHook; 3] = [
    FilemapHook {
        name: "mm_filemap_get_pages",
        classic: "sluice_get_pages",
        raw: "sluice_raw_get_pages",
        btf: "sluice_btf_get_pages",
        pages: 2,
    },
    FilemapHook {
        name: "mm_filemap_fault",
        classic: "sluice_fault",
        raw: "sluice_raw_fault",
        btf: "sluice_btf_fault",
        pages: 1,
    },
    FilemapHook {
        name: "mm_filemap_map_pages",
        classic: "sluice_map_pages",
        raw: "sluice_raw_map_pages",
        btf: "sluice_btf_map_pages",
        pages: 2,
    },
];

/// The struct offsets the raw programs follow, from the kernel's BTF.
fn struct_offsets(btf: &KernelBtf) -> Result<[(&'static str, u32); 4], String> {
    let get = |s: &str, m: &str| btf.member_offset(s, m).map_err(|e| e.to_string());
    Ok([
        (offsets::MAPPING_HOST, get("address_space", "host")?),
        (offsets::INODE_SB, get("inode", "i_sb")?),
        (offsets::INODE_INO, get("inode", "i_ino")?),
        (offsets::SB_DEV, get("super_block", "s_dev")?),
    ])
}

/// Whether the raw program fits the tracepoint's arguments on this kernel.
fn raw_fits(btf: &KernelBtf, hook: &FilemapHook) -> Result<(), String> {
    let args = btf.tracepoint_args(hook.name).map_err(|e| e.to_string())?;
    let fits = args.len() == 1 + hook.pages
        && args[0] == Arg::StructPtr("address_space".into())
        && args[1..].iter().all(|a| matches!(a, Arg::Int(_)));
    if fits {
        Ok(())
    } else {
        Err(format!("arguments {args:?}"))
    }
}

/// The program `name` of the object, as the kind `P` it was built as.
fn program<'a, P>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut P, String>
where
    &'a mut P: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    ebpf.program_mut(name)
        .ok_or_else(|| format!("program {name} missing"))?
        .try_into()
        .map_err(|e: aya::programs::ProgramError| e.to_string())
}

fn attach_classic(ebpf: &mut Ebpf, prog: &str, category: &str, name: &str) -> Result<(), String> {
    let p: &mut TracePoint = program(ebpf, prog)?;
    p.load().map_err(|e| e.to_string())?;
    p.attach(category, name).map_err(|e| e.to_string())?;
    Ok(())
}

fn attach_btf(ebpf: &mut Ebpf, prog: &str, name: &str, btf: &aya::Btf) -> Result<(), String> {
    let p: &mut BtfTracePoint = program(ebpf, prog)?;
    p.load(name, btf).map_err(|e| e.to_string())?;
    p.attach().map_err(|e| e.to_string())?;
    Ok(())
}

fn attach_raw(ebpf: &mut Ebpf, prog: &str, name: &str) -> Result<(), String> {
    let p: &mut RawTracePoint = program(ebpf, prog)?;
    p.load().map_err(|e| e.to_string())?;
    p.attach(name).map_err(|e| e.to_string())?;
    Ok(())
}

fn tracefs_root() -> Option<std::path::PathBuf> {
    let mounted = || {
        ["/sys/kernel/tracing", "/sys/kernel/debug/tracing"]
            .iter()
            .map(std::path::PathBuf::from)
            .find(|p| p.join("events").is_dir())
    };
    mounted().or_else(|| {
        // Not mounted: a machine without systemd's sys-kernel-tracing.mount
        // (seen on a fresh Debian VM), or a container given the host's /sys
        // but not tracefs. Mount it where the kernel provides the directory,
        // as perf and bpftrace do; without it the exec tracepoint cannot be
        // attached and no recording knows which processes to follow.
        let dir = std::path::Path::new("/sys/kernel/tracing");
        if dir.is_dir() {
            match mount_tracefs(dir) {
                Ok(()) => tracing::info!(path = %dir.display(), "mounted tracefs"),
                Err(e) => tracing::warn!(path = %dir.display(), "tracefs is not mounted and mounting it failed: {e}"),
            }
        }
        mounted()
    })
}

/// `mount -t tracefs nodev DIR`.
fn mount_tracefs(dir: &std::path::Path) -> std::io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let target = std::ffi::CString::new(dir.as_os_str().as_bytes())?;
    // SAFETY: NUL-terminated strings that outlive the call; no data pointer.
    let rc = unsafe {
        libc::mount(
            c"nodev".as_ptr(),
            target.as_ptr(),
            c"tracefs".as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// The kernel's tick rate, from its build configuration where the machine
/// has it; else 1000, the highest in use, so that a window in jiffies is
/// never shorter than meant (only longer, which costs time, not events).
fn kernel_hz() -> u64 {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    std::fs::read_to_string(format!("/boot/config-{}", release.trim()))
        .ok()
        .and_then(|config| {
            config
                .lines()
                .find_map(|l| l.strip_prefix("CONFIG_HZ="))
                .and_then(|v| v.trim().parse().ok())
        })
        .unwrap_or(1000)
}

/// The recording window in jiffies, with a second of slack for the tick.
fn window_jiffies(window: std::time::Duration, hz: u64) -> u64 {
    (window.as_secs_f64() * hz as f64).ceil() as u64 + hz
}

/// Field offsets of a tracepoint, from its `format` file.
fn field_offsets(category: &str, name: &str) -> Result<StdHashMap<String, u32>, TraceError> {
    let root = tracefs_root().ok_or_else(|| {
        TraceError::Tracefs(
            "not mounted at /sys/kernel/tracing or /sys/kernel/debug/tracing".into(),
        )
    })?;
    let path = root.join("events").join(category).join(name).join("format");
    let text = std::fs::read_to_string(&path)
        .map_err(|e| TraceError::Tracefs(format!("{}: {e}", path.display())))?;
    let mut out = StdHashMap::new();
    for line in text.lines() {
        let Some(field) = line.trim().strip_prefix("field:") else {
            continue;
        };
        let mut parts = field.split(';');
        let decl = parts.next().unwrap_or_default();
        let name = decl
            .rsplit(|c: char| c.is_whitespace() || c == '*')
            .next()
            .unwrap_or_default()
            .to_owned();
        let offset = parts
            .find_map(|p| p.trim().strip_prefix("offset:"))
            .and_then(|o| o.parse::<u32>().ok());
        if let Some(o) = offset {
            out.insert(name, o);
        }
    }
    Ok(out)
}

/// The programs' pre-filters (`sluice_puller_ebpf::filter`) and what they
/// hold, so that a change writes only the words and counters it alters.
struct Filters {
    device_map: Array<MapData, u64>,
    device_words: Vec<u64>,
    backing_map: Array<MapData, u32>,
    backing_counts: Vec<u32>,
}

impl Filters {
    fn set_devices(&mut self, devices: impl Iterator<Item = u32>) {
        let mut words = vec![0u64; filter::DEVICE_WORDS as usize];
        for dev in devices {
            let bit = filter::device_bit(dev);
            words[(bit >> 6) as usize] |= 1 << (bit & 63);
        }
        for (i, (&new, old)) in words.iter().zip(&mut self.device_words).enumerate() {
            if new != *old {
                match self.device_map.set(i as u32, new, 0) {
                    Ok(()) => *old = new,
                    Err(e) => tracing::warn!("eBPF device filter: {e}"),
                }
            }
        }
    }

    fn count_backing(&mut self, dev: u32, ino: u64, up: bool) {
        let slot = filter::backing_slot(dev, ino);
        let n = &mut self.backing_counts[slot as usize];
        let new = if up {
            n.saturating_add(1)
        } else {
            n.saturating_sub(1)
        };
        match self.backing_map.set(slot, new, 0) {
            Ok(()) => *n = new,
            Err(e) => tracing::warn!("eBPF backing filter: {e}"),
        }
    }
}

/// What the kernel counted for one program.
#[derive(Debug, Clone)]
pub struct ProgramStats {
    pub name: String,
    pub calls: u64,
    pub run_time: std::time::Duration,
}

pub struct EbpfTracer {
    // Keeps the programs loaded and attached for as long as it lives.
    _ebpf: Mutex<Ebpf>,
    devices: Mutex<HashMap<MapData, u32, u8>>,
    backing: Mutex<HashMap<MapData, BackingKey, u8>>,
    filters: Mutex<Filters>,
    config: Mutex<Array<MapData, u32>>,
    drops: PerCpuArray<MapData, u64>,
    ring: Mutex<Option<RingBuf<MapData>>>,
    attached: Vec<String>,
}

impl EbpfTracer {
    /// Loads and attaches the programs; `window` is the recording window
    /// (events are reported only that long after an exec).
    pub fn load(
        _runtime: &tokio::runtime::Handle,
        hooks: Hooks,
        window: std::time::Duration,
    ) -> Result<Self, TraceError> {
        if OBJECT.is_empty() {
            return Err(TraceError::NotBuilt);
        }
        // BTF and raw tracepoints need the kernel's BTF for the offsets.
        let btf = match hooks {
            Hooks::Auto | Hooks::Raw => match KernelBtf::from_sys_fs()
                .map_err(|e| e.to_string())
                .and_then(|btf| struct_offsets(&btf).map(|o| (btf, o)))
            {
                Ok(found) => Some(found),
                Err(e) => {
                    tracing::info!(
                        "no kernel BTF for raw tracepoints ({e}): using classic tracepoints"
                    );
                    None
                }
            },
            Hooks::Classic => None,
        };
        // Record field offsets, for the classic programs. Without tracefs
        // they cannot attach anyway.
        let pages = field_offsets("filemap", "mm_filemap_get_pages")
            .or_else(|_| field_offsets("filemap", "mm_filemap_fault"));
        let pages = match (pages, &btf) {
            (Ok(p), _) => p,
            (Err(_), Some(_)) => StdHashMap::new(),
            (Err(e), None) => return Err(e),
        };
        let map_pages = field_offsets("filemap", "mm_filemap_map_pages").unwrap_or_default();
        let get = |m: &StdHashMap<String, u32>, names: &[&str]| {
            names.iter().find_map(|n| m.get(*n).copied()).unwrap_or(0)
        };
        let mut globals = vec![
            (offsets::INO, get(&pages, &["i_ino"])),
            (offsets::DEV, get(&pages, &["s_dev"])),
            (offsets::INDEX, get(&pages, &["index"])),
            (offsets::LAST_INDEX, get(&pages, &["last_index"])),
            (
                offsets::MAP_START,
                get(&map_pages, &["start_index", "index"]),
            ),
            (
                offsets::MAP_END,
                get(&map_pages, &["end_index", "last_index"]),
            ),
        ];
        if let Some((_, struct_offsets)) = &btf {
            globals.extend(struct_offsets);
        }
        // The host's PID namespace: exec events say whether a process is
        // outside it (in a container), decided while the process exists.
        let (pidns_dev, pidns_ino) = std::fs::metadata("/proc/self/ns/pid")
            .map(|m| {
                use std::os::unix::fs::MetadataExt;
                (u64::from(super::kernel_dev(m.dev())), m.ino())
            })
            .unwrap_or((0, 0));
        let mut loader = EbpfLoader::new();
        for (name, value) in &globals {
            loader.override_global(name, value, true);
        }
        loader.override_global(offsets::HOST_PIDNS_DEV, &pidns_dev, true);
        loader.override_global(offsets::HOST_PIDNS_INO, &pidns_ino, true);
        let window_jiffies = window_jiffies(window, kernel_hz());
        loader.override_global(offsets::WINDOW_JIFFIES, &window_jiffies, true);
        let mut ebpf = loader
            .load(OBJECT)
            .map_err(|e| TraceError::Load(e.to_string()))?;
        let cfg: Array<MapData, u32> = Array::try_from(
            ebpf.take_map("CONFIG")
                .ok_or_else(|| TraceError::Load("map CONFIG missing".into()))?,
        )
        .map_err(|e| TraceError::Load(e.to_string()))?;
        let mut attached = Vec::new();
        let mut errors = Vec::new();
        // aya's own parse of the same BTF (read once), to load BTF
        // tracepoints with.
        let aya_btf = match (hooks, &btf) {
            (Hooks::Auto, Some((btf, _))) => {
                aya::Btf::parse(btf.bytes(), aya::Endianness::default())
                    .map_err(|e| tracing::info!("BTF tracepoints not used: {e}"))
                    .ok()
            }
            _ => None,
        };
        for hook in &FILEMAP {
            // The cheapest kind that this kernel accepts; BTF and raw ones
            // only where BTF says the program fits the arguments (a verifier
            // on an older kernel may still refuse one: then the next kind).
            let fits = match &btf {
                Some((btf, _)) => raw_fits(btf, hook),
                None => Err("classic requested or no BTF".into()),
            };
            let mut tries: Vec<(&str, Result<(), String>)> = Vec::new();
            if let (Ok(()), Some(aya_btf)) = (&fits, &aya_btf) {
                tries.push(("btf", attach_btf(&mut ebpf, hook.btf, hook.name, aya_btf)));
            }
            if fits.is_ok() && !tries.iter().any(|(_, r)| r.is_ok()) {
                tries.push(("raw", attach_raw(&mut ebpf, hook.raw, hook.name)));
            }
            if let Some((kind, _)) = tries.iter().find(|(_, r)| r.is_ok()) {
                attached.push(format!("{} ({kind})", hook.name));
                continue;
            }
            if btf.is_some() {
                let why: Vec<String> = match &fits {
                    Err(e) => vec![e.clone()],
                    Ok(()) => tries
                        .iter()
                        .filter_map(|(k, r)| r.as_ref().err().map(|e| format!("{k}: {e}")))
                        .collect(),
                };
                tracing::info!(
                    tracepoint = hook.name,
                    "using a classic tracepoint: {}",
                    why.join("; ")
                );
            }
            match attach_classic(&mut ebpf, hook.classic, "filemap", hook.name) {
                Ok(()) => attached.push(hook.name.to_owned()),
                Err(e) => {
                    tracing::warn!(tracepoint = %format!("filemap:{}", hook.name), "not attached: {e}");
                    errors.push(format!("filemap:{}: {e}", hook.name));
                }
            }
        }
        if attached.is_empty() {
            return Err(TraceError::Attach(errors.join("; ")));
        }
        // Exec is rare: a classic tracepoint costs nothing worth avoiding.
        match attach_classic(&mut ebpf, "sluice_exec", "sched", "sched_process_exec") {
            Ok(()) => attached.push("sched_process_exec".to_owned()),
            Err(e) => tracing::warn!(tracepoint = "sched:sched_process_exec", "not attached: {e}"),
        }
        let take = |ebpf: &mut Ebpf, name: &str| {
            ebpf.take_map(name)
                .ok_or_else(|| TraceError::Load(format!("map {name} missing")))
        };
        let devices = HashMap::try_from(take(&mut ebpf, "DEVICES")?)
            .map_err(|e| TraceError::Load(e.to_string()))?;
        let backing = HashMap::try_from(take(&mut ebpf, "BACKING")?)
            .map_err(|e| TraceError::Load(e.to_string()))?;
        let drops = PerCpuArray::try_from(take(&mut ebpf, "DROPS")?)
            .map_err(|e| TraceError::Load(e.to_string()))?;
        let ring = RingBuf::try_from(take(&mut ebpf, "EVENTS")?)
            .map_err(|e| TraceError::Load(e.to_string()))?;
        let filters = Filters {
            device_map: Array::try_from(take(&mut ebpf, "DEVICE_FILTER")?)
                .map_err(|e| TraceError::Load(e.to_string()))?,
            device_words: vec![0; filter::DEVICE_WORDS as usize],
            backing_map: Array::try_from(take(&mut ebpf, "BACKING_FILTER")?)
                .map_err(|e| TraceError::Load(e.to_string()))?,
            backing_counts: vec![0; filter::BACKING_SLOTS as usize],
        };
        Ok(EbpfTracer {
            _ebpf: Mutex::new(ebpf),
            devices: Mutex::new(devices),
            backing: Mutex::new(backing),
            filters: Mutex::new(filters),
            config: Mutex::new(cfg),
            drops,
            ring: Mutex::new(Some(ring)),
            attached,
        })
    }

    /// The tracepoints that are attached (`NAME (btf)` / `NAME (raw)` for BTF
    /// and raw ones).
    pub fn attached(&self) -> &[String] {
        &self.attached
    }

    /// After a change of the device map: the filter, and the exec switch
    /// (on while a lazy layer is mounted).
    fn devices_changed(&self) {
        let devices: Vec<u32> = self
            .devices
            .lock()
            .expect("devices")
            .keys()
            .filter_map(Result::ok)
            .collect();
        self.filters
            .lock()
            .expect("filters")
            .set_devices(devices.iter().copied());
        let any = !devices.is_empty();
        let _ = self
            .config
            .lock()
            .expect("config")
            .set(config::ENABLED, u32::from(any), 0);
    }

    /// Traces every inode of a lazy mount's device.
    pub fn watch_device(&self, dev: u32) {
        if let Err(e) = self.devices.lock().expect("devices").insert(dev, 1, 0) {
            tracing::warn!(dev, "eBPF device map: {e}");
        }
        self.devices_changed();
    }

    pub fn unwatch_device(&self, dev: u32) {
        let _ = self.devices.lock().expect("devices").remove(&dev);
        self.devices_changed();
    }

    /// Traces listed inodes of the cache's device (passthrough backing files).
    pub fn watch_cache_device(&self, dev: u32) {
        if let Err(e) = self
            .config
            .lock()
            .expect("config")
            .set(config::CACHE_DEV, dev, 0)
        {
            tracing::warn!(dev, "eBPF config map: {e}");
        }
    }

    pub fn watch_backing(&self, dev: u32, ino: u64) {
        let key = BackingKey { ino, dev, _pad: 0 };
        let mut backing = self.backing.lock().expect("backing");
        if backing.get(&key, 0).is_ok() {
            return;
        }
        match backing.insert(key, 1, 0) {
            // Counted once per key, so that removal undoes it exactly.
            Ok(()) => self
                .filters
                .lock()
                .expect("filters")
                .count_backing(dev, ino, true),
            Err(e) => tracing::debug!(dev, ino, "eBPF backing map: {e}"),
        }
    }

    pub fn unwatch_backing(&self, dev: u32, ino: u64) {
        let key = BackingKey { ino, dev, _pad: 0 };
        if self.backing.lock().expect("backing").remove(&key).is_ok() {
            self.filters
                .lock()
                .expect("filters")
                .count_backing(dev, ino, false);
        }
    }

    /// Calls and run time of each loaded program, as counted by the kernel
    /// while BPF run-time statistics are on (`aya::sys::enable_stats`);
    /// zero otherwise.
    pub fn program_stats(&self) -> Vec<ProgramStats> {
        let ebpf = self._ebpf.lock().expect("ebpf");
        ebpf.programs()
            .filter_map(|(name, p)| {
                let info = p.info().ok()?;
                Some(ProgramStats {
                    name: name.to_owned(),
                    calls: info.run_count(),
                    run_time: info.run_time(),
                })
            })
            .collect()
    }

    /// Events the programs could not deliver (ring buffer full).
    pub fn dropped(&self) -> u64 {
        self.drops.get(&0, 0).map(|v| v.iter().sum()).unwrap_or(0)
    }

    /// Moves events from the ring buffer to `recorder` on the runtime, until
    /// the recorder is gone (the tracer dropped): holding it would keep its
    /// channel of finished recordings open, and whatever waits on that
    /// channel, for the life of the process.
    pub fn start_pump(&self, runtime: &tokio::runtime::Handle, recorder: Weak<Recorder>) {
        let Some(ring) = self.ring.lock().expect("ring").take() else {
            return;
        };
        runtime.spawn(async move {
            // SAFETY: the ring buffer owns its descriptor, and the AsyncFd
            // owns the ring buffer: the fd stays open while registered.
            let mut fd = match unsafe { tokio::io::unix::AsyncFd::register(ring) } {
                Ok(fd) => fd,
                Err(e) => {
                    tracing::error!("polling the eBPF ring buffer: {e}");
                    return;
                }
            };
            // The programs wake us only when 64 KiB are waiting; a short
            // poll interval collects the rest.
            let mut tick = tokio::time::interval(std::time::Duration::from_millis(50));
            loop {
                let Some(recorder) = recorder.upgrade() else {
                    return;
                };
                tokio::select! {
                    ready = fd.readable_mut() => match ready {
                        Ok(mut guard) => {
                            drain(guard.get_inner_mut(), &recorder);
                            guard.clear_ready();
                        }
                        Err(e) => {
                            tracing::error!("polling the eBPF ring buffer: {e}");
                            return;
                        }
                    },
                    _ = tick.tick() => drain(fd.get_mut(), &recorder),
                }
            }
        });
    }
}
