//! Access recording on real FUSE mounts: the eBPF programs loaded into this
//! kernel, and the FUSE-side fallback, each turning a "container" (a process
//! in its own cgroup that execs and reads files) into a profile.

mod common;

use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use sluice_puller::fs::FsOptions;
use sluice_puller::registry::RetryPolicy;
use sluice_puller::trace::{AccessTracer, Hooks, Recording, Source};
use sluice_puller::{ChunkCache, ImageRef, LayerOptions, RegistryClient, RemoteLayer};

/// The recording window: long enough for both files to be read under qemu's
/// emulation too (`cargo xtask vm-test`), where fetching and verifying the
/// 3 MiB file alone takes over a second.
const WINDOW: Duration = Duration::from_secs(6);

/// What else a recording run counted.
struct Counts {
    /// Ring-buffer events lost.
    dropped_events: u64,
    /// Opens the daemon answered with a backing file.
    passthrough_opens: u64,
    /// Page faults recorded.
    faults: u64,
}

/// The busybox fixture's layers: busybox itself, and the app above it.
const BASE_LAYER: usize = 0;
const APP_LAYER: usize = 1;

/// Opens layer `which` of the busybox fixture, pinned by digest, with a
/// chunk cache in `cache_dir`.
fn open_layer(
    f: &common::Fixture,
    rt: &tokio::runtime::Runtime,
    cache_dir: &Path,
    which: usize,
) -> (Arc<RemoteLayer>, ImageRef) {
    let client = Arc::new(RegistryClient::new(RetryPolicy::default()));
    let cache = Arc::new(ChunkCache::open(cache_dir, 1 << 30).unwrap());
    let (_, _, manifest) = rt.block_on(client.manifest(&f.image)).unwrap();
    let pinned = f.image.with_reference(manifest.to_string());
    let layer = rt
        .block_on(RemoteLayer::open(
            client,
            pinned.clone(),
            &f.manifest.layers.as_ref().unwrap()[which],
            cache,
            LayerOptions::default(),
        ))
        .unwrap();
    (Arc::new(layer), pinned)
}

/// What the "container" runs: `cat` of these files of the mount.
fn cat<'a>(files: &'a [&'a str]) -> impl FnOnce(&Path) -> String + 'a {
    move |mnt| {
        let paths: Vec<String> = files
            .iter()
            .map(|p| mnt.join(p).display().to_string())
            .collect();
        format!("/bin/busybox cat {} > /dev/null", paths.join(" "))
    }
}

/// Mounts layer `which` of the busybox fixture with a tracer, makes the
/// files `local` complete in the cache, runs
/// `sh -c 'move into a new cgroup; exec sh -c "sleep 1; exec PROGRAM"'`
/// (`program` is given the mountpoint), and returns the recording of that
/// cgroup, and the tracepoints used.
fn record(
    ebpf: Option<Hooks>,
    which: usize,
    local: &[&str],
    program: impl FnOnce(&Path) -> String,
) -> (Source, Recording, Counts, Vec<String>) {
    let f = common::fixture();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let cache_dir = f.dir.path().join("cache");
    let (layer, pinned) = open_layer(&f, &rt, &cache_dir, which);
    let (tracer, mut done) = AccessTracer::start(rt.handle(), &cache_dir, WINDOW, 0, ebpf);
    let mnt = f.dir.path().join("mnt");
    std::fs::create_dir_all(&mnt).unwrap();
    let session = sluice_puller::fs::mount(
        layer.clone(),
        rt.handle().clone(),
        &mnt,
        FsOptions {
            observer: Some(tracer.observer()),
            ..FsOptions::default()
        },
    )
    .unwrap();
    tracer.layer_mounted(&mnt, layer.clone(), pinned);
    for path in local {
        let node = layer.index().lookup(path).unwrap();
        rt.block_on(layer.ensure(layer.index().file_chunks_of(node)))
            .unwrap();
    }

    // The "container" gets its own cgroup where cgroup v2 is mounted (on
    // cgroup v1 hosts every task shares the root v2 cgroup, and recordings
    // are per image there).
    let cgroup = ["/sys/fs/cgroup", "/sys/fs/cgroup/unified"]
        .iter()
        .map(Path::new)
        .find(|r| r.join("cgroup.controllers").exists())
        .map(|r| {
            r.join(format!(
                "sluice-trace-test-{}-{}",
                std::process::id(),
                match ebpf {
                    None => "fuse",
                    Some(Hooks::Auto) => "auto",
                    Some(Hooks::Raw) => "raw",
                    Some(Hooks::Classic) => "classic",
                }
            ))
        });
    let enter = match &cgroup {
        Some(c) => {
            std::fs::create_dir_all(c).unwrap();
            format!("echo $$ > {}/cgroup.procs && ", c.display())
        }
        None => String::new(),
    };
    // Its own mount namespace, as every container has: the recorder only
    // follows freshly executed programs outside the host's namespace. The
    // reader is exec'd by a process that lived long enough to be seen in
    // that namespace (as runc's init execs a container's entrypoint): the
    // program itself may be gone before the recorder could look at it.
    let status = Command::new("unshare")
        .args(["--mount", "sh", "-c"])
        .arg(format!(
            "{enter}exec /bin/busybox sh -c 'sleep 1; exec {}'",
            program(&mnt)
        ))
        .status()
        .unwrap();
    assert!(status.success());
    let recording = rt.block_on(async {
        loop {
            let r = tokio::time::timeout(WINDOW * 4, done.recv())
                .await
                .expect("a recording within the window")
                .expect("recorder alive");
            if !r.profile.entries.is_empty() {
                return r;
            }
        }
    });
    let counts = Counts {
        dropped_events: tracer.dropped_events(),
        passthrough_opens: layer
            .stats
            .passthrough_opens
            .load(std::sync::atomic::Ordering::Relaxed),
        faults: tracer
            .recorder()
            .recorded_events(sluice_puller_ebpf::kind::FAULT),
    };
    tracer.layer_unmounted(&layer);
    drop(session);
    if let Some(c) = &cgroup {
        let _ = std::fs::remove_dir(c);
    }
    (tracer.source(), recording, counts, tracer.tracepoints())
}

fn paths(r: &Recording) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for e in &r.profile.entries {
        if out.last() != Some(&e.path) {
            out.push(e.path.clone());
        }
    }
    out
}

/// Bytes of `path` in the recording.
fn recorded_bytes(r: &Recording, path: &str) -> u64 {
    r.profile
        .entries
        .iter()
        .filter(|e| e.path == path)
        .map(|e| e.length)
        .sum()
}

/// Whether byte `offset` of `path` is in the recording.
fn covers(r: &Recording, path: &str, offset: u64) -> bool {
    r.profile
        .entries
        .iter()
        .any(|e| e.path == path && e.offset <= offset && offset < e.offset + e.length)
}

/// Runs the recording with `hooks` and checks what the eBPF programs saw.
fn check_ebpf_recording(hooks: Hooks) -> Vec<String> {
    // start.sh is small: served by the daemon, its bytes put into the FUSE
    // file's page cache at open (passthrough kernels) or read with READs;
    // blob.bin (3 MiB) is local before the container starts, so where the
    // kernel has passthrough its open hands over a backing file, and its
    // reads are seen on the cache's file. Both must be seen, in order.
    let (source, rec, counts, tracepoints) = record(
        Some(hooks),
        APP_LAYER,
        &["app/data/blob.bin"],
        cat(&["app/start.sh", "app/data/blob.bin"]),
    );
    if !sluice_testkit::kernel::has_filemap_tracepoints() {
        // The documented fallback: one line in the log, and the FUSE daemon's
        // view recorded instead (only reads that reach the daemon).
        eprintln!(
            "kernel {:?} has no filemap tracepoints: checking the FUSE-side fallback",
            sluice_testkit::kernel::version()
        );
        assert_eq!(source, Source::Fuse);
        assert!(
            paths(&rec).contains(&"app/data/blob.bin".to_owned()),
            "{:?}",
            rec.profile
        );
        return tracepoints;
    }
    assert_eq!(
        source,
        Source::Ebpf,
        "this kernel has the tracepoints: eBPF must load"
    );
    assert_eq!(
        paths(&rec),
        ["app/start.sh", "app/data/blob.bin"],
        "{:?} (tracepoints {tracepoints:?})",
        rec.profile
    );
    assert_eq!(
        recorded_bytes(&rec, "app/data/blob.bin"),
        3 << 20,
        "every chunk of the file read whole"
    );
    assert_eq!(counts.dropped_events, 0);
    // Where the kernel has passthrough, blob.bin's reads were seen on the
    // cache's backing file, not on the FUSE inode.
    assert_eq!(
        counts.passthrough_opens,
        u64::from(sluice_testkit::kernel::has_fuse_passthrough())
    );
    assert_eq!(rec.profile.nodes, 1);
    assert!(rec
        .profile
        .entries
        .windows(2)
        .all(|w| w[0].first_touch_ms <= w[1].first_touch_ms));
    tracepoints
}

#[test]
fn ebpf_programs_record_a_containers_reads_in_order() {
    if !sluice_testkit::is_root() {
        eprintln!("SKIP: loading eBPF programs and FUSE mounts need root");
        return;
    }
    // Where the kernel has BTF, the page-cache hooks are BTF tracepoints:
    // this recording came from them.
    common::assert_hooks_where_btf(&check_ebpf_recording(Hooks::Auto), "(btf)");
}

/// The other programs record the same: raw tracepoints (a verifier that
/// refuses the BTF ones) and classic ones (kernels without BTF; fields from
/// tracefs).
#[test]
fn raw_and_classic_tracepoint_programs_record_the_same() {
    if !sluice_testkit::is_root() {
        eprintln!("SKIP: loading eBPF programs and FUSE mounts need root");
        return;
    }
    common::assert_hooks_where_btf(&check_ebpf_recording(Hooks::Raw), "(raw)");
    let classic = check_ebpf_recording(Hooks::Classic);
    assert!(classic.iter().all(|t| !t.ends_with(')')), "{classic:?}");
}

/// A machine where tracefs is not mounted (no systemd unit mounts it, as on
/// a fresh Debian VM): the tracer mounts it, and its classic tracepoints,
/// which need it, record. Only in a `cargo xtask vm-test` guest: on a host,
/// unmounting tracefs under everything else that traces is not a test's to do.
#[test]
fn a_tracer_mounts_tracefs_where_it_is_missing() {
    if std::env::var_os("SLUICE_VM_GUEST").is_none() {
        eprintln!("SKIP: unmounts tracefs; runs only in `cargo xtask vm-test` guests");
        return;
    }
    let tracefs_mounted = || {
        std::fs::read_to_string("/proc/mounts")
            .unwrap()
            .lines()
            .any(|l| l.split_whitespace().nth(2) == Some("tracefs"))
    };
    let status = Command::new("umount")
        .arg("/sys/kernel/tracing")
        .status()
        .unwrap();
    assert!(
        status.success() && !tracefs_mounted(),
        "tracefs still mounted"
    );
    let classic = check_ebpf_recording(Hooks::Classic);
    assert!(tracefs_mounted(), "the tracer did not mount tracefs");
    assert!(classic.iter().all(|t| !t.ends_with(')')), "{classic:?}");
}

#[test]
fn fuse_side_recording_without_ebpf() {
    if !sluice_testkit::is_root() {
        eprintln!("SKIP: FUSE mounts need root");
        return;
    }
    let (source, rec, _, _) = record(
        None,
        APP_LAYER,
        &[],
        cat(&["app/data/blob.bin", "app/start.sh"]),
    );
    assert_eq!(source, Source::Fuse);
    assert_eq!(
        paths(&rec),
        ["app/data/blob.bin", "app/start.sh"],
        "{:?}",
        rec.profile
    );
}

/// The recording window of [`direct_recorder`].
const DIRECT_WINDOW: Duration = Duration::from_secs(1);

/// A recorder to feed events to directly, as a kernel would report them,
/// with the busybox fixture's app layer (its chunk cache under `cache`)
/// traced on device `dev`; and where its recordings go.
fn direct_recorder(
    f: &common::Fixture,
    rt: &tokio::runtime::Runtime,
    cache: &str,
    dev: u32,
) -> (
    Arc<RemoteLayer>,
    sluice_puller::trace::Recorder,
    tokio::sync::mpsc::UnboundedReceiver<Recording>,
) {
    let (layer, pinned) = open_layer(f, rt, &f.dir.path().join(cache), APP_LAYER);
    let (done, recordings) = tokio::sync::mpsc::unbounded_channel();
    let recorder = sluice_puller::trace::Recorder::new(Source::Ebpf, DIRECT_WINDOW, 0, done);
    recorder.add_layer(dev, layer.clone(), pinned);
    (layer, recorder, recordings)
}

/// An event on page `page` of layer node `node` (whose FUSE inode number is
/// the node's plus 2), as the eBPF programs would report it; for an exec,
/// node and page are unused.
fn page_event(
    dev: u32,
    tgid: u32,
    cgroup: u64,
    kind: u32,
    node: u64,
    page: u64,
    time_ns: u64,
) -> sluice_puller_ebpf::AccessEvent {
    sluice_puller_ebpf::AccessEvent {
        ino: node + 2,
        first_page: page,
        last_page: page,
        cgroup,
        time_ns,
        dev,
        tgid,
        kind,
        flags: 0,
    }
}

/// A page fault on a file the kernel has not cached makes it read the pages
/// around the fault, and that window is what the next node's FUSE mount is
/// asked for: the recording holds the window, not the page. (Events fed to
/// the recorder directly: which pages a real program faults on is up to the
/// kernel and the loader.)
#[test]
fn a_fault_is_recorded_with_the_pages_the_kernel_reads_around_it() {
    use sluice_puller_ebpf::{flags, kind, AccessEvent};

    let f = common::fixture();
    let rt = tokio::runtime::Runtime::new().unwrap();
    const DEV: u32 = (1 << 20) | 77;
    let (layer, recorder, mut recordings) = direct_recorder(&f, &rt, "cache-fault", DEV);
    let node = layer.index().lookup("app/data/blob.bin").unwrap();
    // A process that is not the test's: the recorder ignores its own.
    let tgid = std::process::id() + 1;
    let event = |kind, page, time_ns| page_event(DEV, tgid, 7, kind, node as u64, page, time_ns);
    recorder.on_event(&AccessEvent {
        flags: flags::OTHER_PID_NS,
        ..event(kind::EXEC, 0, 1_000)
    });
    recorder.on_event(&event(kind::FAULT, 100, 2_000));
    // A read is recorded as read: the kernel's window for it is its own.
    recorder.on_event(&event(kind::READ, 400, 3_000));
    assert_eq!(
        recorder.finish_due(2_000 + DIRECT_WINDOW.as_nanos() as u64),
        1
    );
    let rec = recordings.try_recv().unwrap();
    let covers = |offset| covers(&rec, "app/data/blob.bin", offset);
    let page = 4096;
    for p in [84, 100, 115, 400] {
        assert!(covers(p * page), "page {p} missing: {:?}", rec.profile);
    }
    // Chunks are recorded whole; nothing beyond the chunks of the window
    // and the read.
    let chunks = layer
        .index()
        .chunks_for_range(node, 84 * page, 32 * page)
        .len()
        + layer.index().chunks_for_range(node, 400 * page, page).len();
    assert_eq!(rec.profile.entries.len(), chunks, "{:?}", rec.profile);
}

/// A process that reads the mount before it executes anything (runc's init
/// reads the image's /etc/passwd, the kernel reads the program inside
/// `execve`) has those reads recorded once it executes a program in a
/// container, as that start's first: here a subshell forked by the
/// container's shell (no exec of its own yet) reads start.sh with a builtin,
/// then executes a shell that reads blob.bin, also with a builtin (a program
/// of its own could be gone before the recorder looks at its namespace).
#[test]
fn reads_before_a_containers_exec_are_recorded_first() {
    if !sluice_testkit::is_root() {
        eprintln!("SKIP: loading eBPF programs and FUSE mounts need root");
        return;
    }
    if !sluice_testkit::kernel::has_filemap_tracepoints() {
        eprintln!(
            "SKIP: no filemap tracepoints: the FUSE-side fallback records by cgroup, not by exec"
        );
        return;
    }
    let (source, rec, _, _) = record(
        Some(Hooks::Auto),
        APP_LAYER,
        &["app/data/blob.bin"],
        |mnt| {
            format!(
                "/bin/busybox sh -c \"(read l < {m}/app/start.sh; exec /bin/busybox sh -c \\\"read l < {m}/app/data/blob.bin; sleep 1\\\"); true\"",
                m = mnt.display()
            )
        },
    );
    assert_eq!(source, Source::Ebpf);
    assert_eq!(
        paths(&rec),
        ["app/start.sh", "app/data/blob.bin"],
        "{:?}",
        rec.profile
    );
}

/// What a process read before its exec is kept only for a process that then
/// executes in a container, and only for a while before that exec. (Events
/// fed to the recorder directly, as a kernel would report them.)
#[test]
fn reads_before_an_exec_count_only_for_a_container_and_shortly_before() {
    use sluice_puller_ebpf::{flags, kind, AccessEvent};

    let f = common::fixture();
    let rt = tokio::runtime::Runtime::new().unwrap();
    const DEV: u32 = (1 << 20) | 78;
    let (layer, recorder, mut recordings) = direct_recorder(&f, &rt, "cache-before", DEV);
    let node = |path| layer.index().lookup(path).unwrap() as u64;
    let (script, blob) = (node("app/start.sh"), node("app/data/blob.bin"));
    // Processes that are not the test's (the recorder ignores its own),
    // each in a cgroup of its own; none exists (pid_max is at most 2^22).
    let event = |tgid: u32, kind, node, page, time_ns| {
        page_event(DEV, tgid, u64::from(tgid), kind, node, page, time_ns)
    };
    let exec = |tgid, contained: bool, time_ns| AccessEvent {
        flags: if contained { flags::OTHER_PID_NS } else { 0 },
        ..event(tgid, kind::EXEC, 0, 0, time_ns)
    };
    const S: u64 = 1_000_000_000;
    let (container, host, late) = (u32::MAX - 10, u32::MAX - 11, u32::MAX - 12);
    // A container's first process: reads, then executes its entrypoint,
    // which reads on.
    recorder.on_event(&event(container, kind::READ, script, 0, 10 * S));
    recorder.on_event(&exec(container, true, 11 * S));
    recorder.on_event(&event(container, kind::READ, blob, 5, 11 * S + 1));
    // A host process that reads and then executes on the host.
    recorder.on_event(&event(host, kind::READ, script, 0, 10 * S));
    recorder.on_event(&exec(host, false, 11 * S));
    recorder.on_event(&event(host, kind::READ, blob, 5, 11 * S + 1));
    // Read longer before its exec than a start takes.
    recorder.on_event(&event(late, kind::READ, script, 0, 5 * S));
    recorder.on_event(&exec(late, true, 11 * S));
    recorder.on_event(&event(late, kind::READ, blob, 5, 11 * S + 1));

    recorder.finish_due(20 * S);
    let mut got = std::collections::HashMap::new();
    while let Ok(r) = recordings.try_recv() {
        got.insert(r.cgroup, paths(&r));
    }
    assert_eq!(
        got.remove(&u64::from(container)),
        Some(vec![
            "app/start.sh".to_owned(),
            "app/data/blob.bin".to_owned()
        ])
    );
    assert_eq!(
        got.remove(&u64::from(late)),
        Some(vec!["app/data/blob.bin".to_owned()])
    );
    assert!(got.is_empty(), "the host process was recorded: {got:?}");
}

/// The file offset of an ELF executable's entry point: the page a program
/// started from this file faults on first.
fn entry_offset(elf: &[u8]) -> u64 {
    use object::{Object, ObjectSegment};
    let file = object::File::parse(elf).expect("an ELF executable");
    let entry = file.entry();
    file.segments()
        .find_map(|s| {
            let (offset, size) = s.file_range();
            (s.address() <= entry && entry < s.address() + size)
                .then(|| offset + (entry - s.address()))
        })
        .expect("the entry point lies in a segment read from the file")
}

/// A program executed from a lazy mount reads little through `read`: the
/// kernel maps it, and its code arrives by page faults on the FUSE inode.
/// Those faults, seen by the real programs loaded into this kernel, are what
/// puts the code into the profile, each with the window the kernel reads
/// around it (the synthetic events of the test above, here from an `exec`).
#[test]
fn a_program_executed_from_the_mount_is_recorded_by_its_page_faults() {
    if !sluice_testkit::is_root() {
        eprintln!("SKIP: loading eBPF programs and FUSE mounts need root");
        return;
    }
    // busybox (static, ~2 MB) from the base layer, nothing of it local: the
    // exec reads its headers, then the program faults its way in.
    let (source, rec, counts, tracepoints) =
        record(Some(Hooks::Auto), BASE_LAYER, &[], |mnt: &Path| {
            format!("{}/bin/busybox true", mnt.display())
        });
    let busybox = std::fs::read(sluice_testkit::images::BUSYBOX).unwrap();
    let size = busybox.len() as u64;
    let page = 4096;
    let entry_page = entry_offset(&busybox) / page;
    let covers = |offset| covers(&rec, "bin/busybox", offset);
    if !sluice_testkit::kernel::has_filemap_tracepoints() {
        // The fallback (Debian's 6.1): the daemon records the reads the
        // faults sent it.
        assert_eq!(source, Source::Fuse);
        assert!(covers(entry_page * page), "{:?}", rec.profile);
        return;
    }
    if !sluice_testkit::kernel::has_tracepoint("filemap", "mm_filemap_fault") {
        eprintln!(
            "kernel {:?} has filemap tracepoints but not mm_filemap_fault: page faults are not recorded ({tracepoints:?})",
            sluice_testkit::kernel::version()
        );
        return;
    }
    assert_eq!(source, Source::Ebpf, "{tracepoints:?}");
    assert!(
        tracepoints
            .iter()
            .any(|t| t.starts_with("mm_filemap_fault")),
        "{tracepoints:?}"
    );
    assert_eq!(counts.dropped_events, 0);
    assert!(
        counts.faults > 0,
        "no page fault recorded: {:?}",
        rec.profile
    );
    // The window the kernel reads around the first fault (32 pages centred
    // on it, within the file).
    let first = entry_page.saturating_sub(16);
    let last = (entry_page + 15).min((size - 1) / page);
    for p in [first, entry_page, last] {
        assert!(
            covers(p * page),
            "page {p} of bin/busybox (entry point on page {entry_page}) missing: {:?}",
            rec.profile
        );
    }
    // Faults, not reads of the whole file: the program's start touches a
    // part of it.
    let recorded = recorded_bytes(&rec, "bin/busybox");
    assert!(recorded < size, "{recorded} of {size} bytes recorded");
}
