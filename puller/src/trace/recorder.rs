//! Turning access events into per-container, per-image recordings.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sluice_format::chunked::NodeKind;
use sluice_format::Digest;
use sluice_puller_ebpf::{flags, kind, AccessEvent};

use super::Source;
use crate::layer::RemoteLayer;
use crate::profile::{Profile, ProfileEntry};
use crate::registry::ImageRef;

const PAGE: u64 = 4096;
/// Pages the kernel reads around a page fault on a file it has not cached
/// (`do_sync_mmap_readahead`: the readahead window centred on the fault;
/// 128 KiB, the default window and FUSE's cap).
const FAULT_AROUND_PAGES: u64 = 32;

/// How long before its exec an access of a process with no exec seen yet
/// still belongs to what that exec starts (see [`State::before_exec`]).
const BEFORE_EXEC_NS: u64 = 2_000_000_000;
/// Accesses kept per such process, and processes kept: a host process that
/// reads a lazy mount and never executes anything costs this much at most.
const BEFORE_EXEC_EVENTS: usize = 256;
const BEFORE_EXEC_PROCESSES: usize = 256;

/// A finished recording: one container's accesses to one image's layers.
#[derive(Debug, Clone)]
pub struct Recording {
    /// host/repository@manifest-digest.
    pub image: ImageRef,
    pub cgroup: u64,
    pub profile: Profile,
}

struct Traced {
    layer: Arc<RemoteLayer>,
    image: ImageRef,
    manifest: Digest,
    dev: u32,
}

/// One container's (cgroup's) first accesses to one image's layers.
struct Session {
    image: ImageRef,
    start_ns: u64,
    entries: Vec<ProfileEntry>,
    seen: HashSet<(Digest, usize, u64)>,
}

/// Sessions are keyed by (cgroup, image manifest) and start at the first
/// access, so that on nodes where containers do not get their own cgroup v2
/// (cgroup v1 hosts: every task is in the root v2 cgroup) a recording is
/// still the first window of accesses to that image.
type Key = (u64, Digest);

#[derive(Default)]
struct State {
    by_dev: HashMap<u32, Arc<Traced>>,
    by_layer: HashMap<Digest, Arc<Traced>>,
    backing: HashMap<(u32, u64), (Arc<Traced>, usize)>,
    sessions: HashMap<Key, Session>,
    /// Recordings already made: later accesses are not recorded again.
    finished: HashSet<Key>,
    /// When each process last executed a program (eBPF), and whether it
    /// runs in a mount namespace other than the host's. Only such processes,
    /// within the window after their exec, are recorded: that is what a
    /// starting container is. It leaves out host processes reading the
    /// mounts (containerd resolving users, the daemon itself), which matters
    /// on cgroup v1 hosts where every task shares the root v2 cgroup.
    execs: HashMap<u32, (u64, bool)>,
    /// Accesses to traced layers by processes with no exec seen, kept until
    /// the process executes a program: if it does so in a container, they
    /// are that start's first reads. A container's first process is forked
    /// by runc from its init, which reads the image's `/etc/passwd` and
    /// `/etc/group` before it executes the entrypoint, and the kernel reads
    /// the program (its `#!` script, its ELF header, the loader's) inside
    /// `execve`, before the exec is reported. Left out, each was a read the
    /// next node waited for with a profile (busybox: four round trips).
    before_exec: HashMap<u32, Vec<AccessEvent>>,
}

pub struct Recorder {
    source: Source,
    window: Duration,
    /// Files up to this size are recorded whole: the FUSE daemon fetches
    /// them whole at open (for passthrough), so the next node needs them so.
    whole_file_max: u64,
    state: Mutex<State>,
    done: tokio::sync::mpsc::UnboundedSender<Recording>,
    self_pid: u32,
    host_mnt_ns: Option<std::path::PathBuf>,
    /// Accesses recorded, by kind (`kind::READ`, `FAULT`, `MAP_PAGES`; the
    /// FUSE fallback's reads count as `READ`): what an operator checks to
    /// see whether this kernel reports page faults at all.
    recorded: [AtomicU64; 3],
}

/// A process's mount namespace (`mnt:[inode]`), if it still exists.
fn mount_namespace(pid: &str) -> Option<std::path::PathBuf> {
    std::fs::read_link(format!("/proc/{pid}/ns/mnt")).ok()
}

/// CLOCK_MONOTONIC in nanoseconds: the clock of `bpf_ktime_get_ns`.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes the struct it is given.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Where the cgroup v2 hierarchy is mounted (unified, or hybrid hosts).
fn cgroup2_root() -> Option<&'static str> {
    ["/sys/fs/cgroup", "/sys/fs/cgroup/unified"]
        .into_iter()
        .find(|r| std::path::Path::new(r).join("cgroup.controllers").exists())
}

/// cgroup v2 id of a process (what `bpf_get_current_cgroup_id` returns):
/// the inode of its cgroup directory.
fn cgroup_of(pid: u32) -> Option<u64> {
    use std::os::unix::fs::MetadataExt;
    let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
    let path = text.lines().find_map(|l| l.strip_prefix("0::"))?;
    std::fs::metadata(format!("{}{path}", cgroup2_root()?))
        .ok()
        .map(|m| m.ino())
}

impl Recorder {
    pub fn new(
        source: Source,
        window: Duration,
        whole_file_max: u64,
        done: tokio::sync::mpsc::UnboundedSender<Recording>,
    ) -> Self {
        Recorder {
            source,
            window,
            whole_file_max,
            state: Mutex::new(State::default()),
            done,
            self_pid: std::process::id(),
            host_mnt_ns: mount_namespace("self"),
            recorded: Default::default(),
        }
    }

    pub fn source(&self) -> Source {
        self.source
    }

    /// Accesses of kind `kind` (`kind::READ`, `FAULT` or `MAP_PAGES`)
    /// recorded for starting containers so far.
    pub fn recorded_events(&self, kind: u32) -> u64 {
        self.recorded
            .get(kind as usize)
            .map_or(0, |c| c.load(Ordering::Relaxed))
    }

    fn count(&self, kind: u32) {
        if let Some(c) = self.recorded.get(kind as usize) {
            c.fetch_add(1, Ordering::Relaxed);
        }
    }

    pub fn add_layer(&self, dev: u32, layer: Arc<RemoteLayer>, image: ImageRef) {
        let Ok(manifest) = image.reference.parse::<Digest>() else {
            tracing::warn!(%image, "not tracing a layer of an image not pinned by digest");
            return;
        };
        let t = Arc::new(Traced {
            layer: layer.clone(),
            image,
            manifest,
            dev,
        });
        let mut st = self.state.lock().expect("recorder");
        st.by_dev.insert(dev, t.clone());
        st.by_layer.insert(layer.digest().clone(), t);
    }

    /// Returns the device the layer was traced on and its backing files.
    pub fn remove_layer(&self, layer: &Digest) -> Option<(u32, Vec<(u32, u64)>)> {
        let mut st = self.state.lock().expect("recorder");
        let t = st.by_layer.remove(layer)?;
        st.by_dev.remove(&t.dev);
        let mut backing = Vec::new();
        st.backing.retain(|k, (b, _)| {
            let mine = b.layer.digest() == layer;
            if mine {
                backing.push(*k);
            }
            !mine
        });
        Some((t.dev, backing))
    }

    pub fn add_backing(&self, dev: u32, ino: u64, layer: &Arc<RemoteLayer>, node: usize) {
        let mut st = self.state.lock().expect("recorder");
        if let Some(t) = st.by_layer.get(layer.digest()).cloned() {
            st.backing.insert((dev, ino), (t, node));
        }
    }

    /// An event from the eBPF programs.
    pub fn on_event(&self, ev: &AccessEvent) {
        if ev.tgid == self.self_pid {
            return; // the daemon itself, filling or serving the cache
        }
        let mut st = self.state.lock().expect("recorder");
        if ev.kind == kind::EXEC {
            // The kernel says whether the process is in another PID
            // namespace; a container sharing the host's PID namespace is
            // still told apart by its mount namespace while it runs.
            // A process gone before its exec is looked at here (a short
            // program, on a busy node) keeps what its previous exec said:
            // runc's init process execs the container's entrypoint, which may
            // exit within milliseconds.
            let contained = ev.flags & flags::OTHER_PID_NS != 0
                || match mount_namespace(&ev.tgid.to_string()) {
                    Some(ns) => Some(&ns) != self.host_mnt_ns.as_ref(),
                    None => st.execs.get(&ev.tgid).is_some_and(|&(_, c)| c),
                };
            st.execs.insert(ev.tgid, (ev.time_ns, contained));
            let before = st.before_exec.remove(&ev.tgid).unwrap_or_default();
            if contained {
                for access in before {
                    if ev.time_ns.saturating_sub(access.time_ns) <= BEFORE_EXEC_NS {
                        self.access(&mut st, &access);
                    }
                }
            }
            return;
        }
        let Some(&(t, contained)) = st.execs.get(&ev.tgid) else {
            if Self::target(&st, ev).is_some() {
                let room = st.before_exec.len() < BEFORE_EXEC_PROCESSES;
                match st.before_exec.get_mut(&ev.tgid) {
                    Some(kept) if kept.len() < BEFORE_EXEC_EVENTS => kept.push(*ev),
                    Some(_) => {}
                    None if room => {
                        st.before_exec.insert(ev.tgid, vec![*ev]);
                    }
                    None => {}
                }
            }
            return;
        };
        let window_ns = self.window.as_nanos() as u64;
        if contained && ev.time_ns >= t && ev.time_ns - t <= window_ns {
            self.access(&mut st, ev);
        }
    }

    /// The traced layer and node an access is to, if any.
    fn target(st: &State, ev: &AccessEvent) -> Option<(Arc<Traced>, usize)> {
        if let Some(t) = st.by_dev.get(&ev.dev) {
            // FUSE inode numbers are node + 2; 1 is the root.
            (ev.ino >= 2).then(|| (t.clone(), (ev.ino - 2) as usize))
        } else {
            st.backing.get(&(ev.dev, ev.ino)).cloned()
        }
    }

    /// Records an access of a starting container's process.
    fn access(&self, st: &mut State, ev: &AccessEvent) {
        let Some((traced, node)) = Self::target(st, ev) else {
            return;
        };
        self.count(ev.kind);
        let (first, last) = if ev.kind == kind::FAULT {
            // A fault on a page that is not cached has the kernel read the
            // pages around it: that window, not the page, is what the next
            // node's FUSE mount will be asked for (numpy-pandas: a third of
            // the reads that waited with a profile were such windows).
            let half = FAULT_AROUND_PAGES / 2;
            (ev.first_page.saturating_sub(half), ev.last_page + half - 1)
        } else {
            (ev.first_page, ev.last_page)
        };
        let offset = first * PAGE;
        let len = (last.saturating_sub(first) + 1) * PAGE;
        self.record(st, ev.cgroup, ev.time_ns, &traced, node, offset, len);
    }

    /// A read the FUSE daemon served (when eBPF is not available).
    pub fn fuse_read(
        &self,
        layer: &Arc<RemoteLayer>,
        node: usize,
        offset: u64,
        len: u64,
        pid: u32,
    ) {
        let cgroup = cgroup_of(pid).unwrap_or(0);
        let now = monotonic_ns();
        let mut st = self.state.lock().expect("recorder");
        let Some(traced) = st.by_layer.get(layer.digest()).cloned() else {
            return;
        };
        self.count(kind::READ);
        self.record(&mut st, cgroup, now, &traced, node, offset, len);
    }

    #[allow(clippy::too_many_arguments)]
    fn record(
        &self,
        st: &mut State,
        cgroup: u64,
        time_ns: u64,
        traced: &Arc<Traced>,
        node: usize,
        offset: u64,
        len: u64,
    ) {
        let index = traced.layer.index();
        if node >= index.nodes().len() {
            return;
        }
        let content = index.resolve(node);
        let NodeKind::File { size, .. } = index.node(content).kind else {
            return;
        };
        if offset >= size {
            return;
        }
        let (offset, len) = if size <= self.whole_file_max {
            (0, size)
        } else {
            (offset, len.min(size - offset))
        };
        let key = (cgroup, traced.manifest.clone());
        if st.finished.contains(&key) {
            return;
        }
        let path = index.node(node).path.clone();
        let session = st.sessions.entry(key).or_insert_with(|| Session {
            image: traced.image.clone(),
            start_ns: time_ns,
            entries: Vec::new(),
            seen: HashSet::new(),
        });
        let at_ms = time_ns.saturating_sub(session.start_ns) as f64 / 1e6;
        for c in index.chunks_for_range(content, offset, len) {
            let key = (traced.layer.digest().clone(), content, c.file_offset);
            if !session.seen.insert(key) {
                continue;
            }
            session.entries.push(ProfileEntry {
                layer: traced.layer.digest().clone(),
                path: path.clone(),
                offset: c.file_offset,
                length: c.size,
                first_touch_ms: at_ms,
                seen: 1,
            });
        }
    }

    /// Ends the sessions whose window is over; returns how many recordings
    /// were produced.
    pub fn finish_due(&self, now_ns: u64) -> usize {
        let window_ns = self.window.as_nanos() as u64;
        let mut st = self.state.lock().expect("recorder");
        let due: Vec<Key> = st
            .sessions
            .iter()
            .filter(|(_, s)| now_ns.saturating_sub(s.start_ns) >= window_ns)
            .map(|(k, _)| k.clone())
            .collect();
        st.execs
            .retain(|_, (t, _)| now_ns.saturating_sub(*t) <= window_ns);
        st.before_exec.retain(|_, kept| {
            kept.last()
                .is_some_and(|a| now_ns.saturating_sub(a.time_ns) <= BEFORE_EXEC_NS)
        });
        let mut produced = 0;
        for key in due {
            let mut s = st.sessions.remove(&key).expect("due session");
            st.finished.insert(key.clone());
            let (cgroup, manifest) = key;
            s.entries
                .sort_by(|a, b| a.first_touch_ms.total_cmp(&b.first_touch_ms));
            let profile = Profile::new(manifest, self.window.as_millis() as u64, s.entries);
            tracing::info!(
                image = %s.image,
                cgroup,
                entries = profile.entries.len(),
                bytes = profile.bytes(),
                "recorded a startup access profile"
            );
            let _ = self.done.send(Recording {
                image: s.image,
                cgroup,
                profile,
            });
            produced += 1;
        }
        produced
    }

    pub(super) fn start_ticker(self: &Arc<Self>, runtime: &tokio::runtime::Handle) {
        let me = Arc::downgrade(self);
        runtime.spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(250));
            loop {
                tick.tick().await;
                let Some(r) = me.upgrade() else { return };
                r.finish_due(monotonic_ns());
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exec(tgid: u32, flags: u32, time_ns: u64) -> AccessEvent {
        AccessEvent {
            tgid,
            kind: kind::EXEC,
            flags,
            time_ns,
            ..AccessEvent::default()
        }
    }

    /// A process whose exec is looked at after it exited cannot show its
    /// mount namespace: it keeps what its previous exec said.
    #[test]
    fn a_process_gone_before_its_exec_is_seen_keeps_the_earlier_verdict() {
        let (done, _rx) = tokio::sync::mpsc::unbounded_channel();
        let r = Recorder::new(Source::Ebpf, Duration::from_secs(5), 0, done);
        let contained = |tgid| r.state.lock().unwrap().execs.get(&tgid).map(|e| e.1);
        // No such process (pid_max is at most 2^22).
        let (gone, other) = (u32::MAX - 1, u32::MAX - 2);
        r.on_event(&exec(gone, flags::OTHER_PID_NS, 1));
        assert_eq!(contained(gone), Some(true));
        r.on_event(&exec(gone, 0, 2));
        assert_eq!(contained(gone), Some(true), "the entrypoint's exec");
        r.on_event(&exec(other, 0, 3));
        assert_eq!(
            contained(other),
            Some(false),
            "nothing known: not a container"
        );
        // A live process in the host's namespace: not a container.
        let mut host = std::process::Command::new("sleep")
            .arg("5")
            .spawn()
            .unwrap();
        r.on_event(&exec(host.id(), 0, 4));
        assert_eq!(contained(host.id()), Some(false));
        let _ = host.kill();
        let _ = host.wait();
    }
}
