//! Turning access events into per-container, per-image recordings.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sluice_format::chunked::NodeKind;
use sluice_format::Digest;
use sluice_puller_ebpf::{kind, AccessEvent};

use super::Source;
use crate::layer::RemoteLayer;
use crate::profile::{Profile, ProfileEntry};
use crate::registry::ImageRef;

const PAGE: u64 = 4096;

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

struct Session {
    start_ns: u64,
    /// Whether an exec was seen (a container start, not a stray reader).
    exec: bool,
    per_image: HashMap<Digest, (ImageRef, Vec<ProfileEntry>)>,
    seen: HashSet<(Digest, usize, u64)>,
}

#[derive(Default)]
struct State {
    by_dev: HashMap<u32, Arc<Traced>>,
    by_layer: HashMap<Digest, Arc<Traced>>,
    backing: HashMap<(u32, u64), (Arc<Traced>, usize)>,
    sessions: HashMap<u64, Session>,
    /// cgroups whose window is over: later events are ignored.
    finished: HashSet<u64>,
}

pub struct Recorder {
    source: Source,
    window: Duration,
    state: Mutex<State>,
    done: tokio::sync::mpsc::UnboundedSender<Recording>,
    self_pid: u32,
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

/// cgroup v2 id of a process: the inode of its cgroup directory.
fn cgroup_of(pid: u32) -> Option<u64> {
    use std::os::unix::fs::MetadataExt;
    let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
    let path = text.lines().find_map(|l| l.strip_prefix("0::"))?;
    std::fs::metadata(format!("/sys/fs/cgroup{path}"))
        .ok()
        .map(|m| m.ino())
}

impl Recorder {
    pub fn new(
        source: Source,
        window: Duration,
        done: tokio::sync::mpsc::UnboundedSender<Recording>,
    ) -> Self {
        Recorder {
            source,
            window,
            state: Mutex::new(State::default()),
            done,
            self_pid: std::process::id(),
        }
    }

    pub fn source(&self) -> Source {
        self.source
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

    /// Returns the device the layer was traced on.
    pub fn remove_layer(&self, layer: &Digest) -> Option<u32> {
        let mut st = self.state.lock().expect("recorder");
        let t = st.by_layer.remove(layer)?;
        st.by_dev.remove(&t.dev);
        st.backing.retain(|_, (b, _)| b.layer.digest() != layer);
        Some(t.dev)
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
        if st.finished.contains(&ev.cgroup) {
            return;
        }
        if ev.kind == kind::EXEC {
            let s = st
                .sessions
                .entry(ev.cgroup)
                .or_insert_with(|| Session::new(ev.time_ns));
            s.exec = true;
            return;
        }
        let target = if let Some(t) = st.by_dev.get(&ev.dev) {
            // FUSE inode numbers are node + 2; 1 is the root.
            (ev.ino >= 2).then(|| (t.clone(), (ev.ino - 2) as usize))
        } else {
            st.backing.get(&(ev.dev, ev.ino)).cloned()
        };
        let Some((traced, node)) = target else { return };
        let offset = ev.first_page * PAGE;
        let len = (ev.last_page.saturating_sub(ev.first_page) + 1) * PAGE;
        Self::record(&mut st, ev.cgroup, ev.time_ns, &traced, node, offset, len);
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
        let Some(cgroup) = cgroup_of(pid) else { return };
        let now = monotonic_ns();
        let mut st = self.state.lock().expect("recorder");
        if st.finished.contains(&cgroup) {
            return;
        }
        let Some(traced) = st.by_layer.get(layer.digest()).cloned() else {
            return;
        };
        Self::record(&mut st, cgroup, now, &traced, node, offset, len);
    }

    fn record(
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
        let len = len.min(size - offset);
        let path = index.node(node).path.clone();
        let session = st
            .sessions
            .entry(cgroup)
            .or_insert_with(|| Session::new(time_ns));
        let at_ms = time_ns.saturating_sub(session.start_ns) as f64 / 1e6;
        for c in index.chunks_for_range(content, offset, len) {
            let key = (traced.layer.digest().clone(), content, c.file_offset);
            if !session.seen.insert(key) {
                continue;
            }
            let (_, entries) = session
                .per_image
                .entry(traced.manifest.clone())
                .or_insert_with(|| (traced.image.clone(), Vec::new()));
            entries.push(ProfileEntry {
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
        let due: Vec<u64> = st
            .sessions
            .iter()
            .filter(|(_, s)| now_ns.saturating_sub(s.start_ns) >= window_ns)
            .map(|(c, _)| *c)
            .collect();
        let mut produced = 0;
        for cgroup in due {
            let s = st.sessions.remove(&cgroup).expect("due session");
            st.finished.insert(cgroup);
            // With eBPF, only container starts make profiles: a host process
            // poking at a mount (say, containerd resolving a user) does not.
            if self.source == Source::Ebpf && !s.exec {
                continue;
            }
            for (manifest, (image, mut entries)) in s.per_image {
                entries.sort_by(|a, b| a.first_touch_ms.total_cmp(&b.first_touch_ms));
                let profile = Profile::new(manifest, self.window.as_millis() as u64, entries);
                tracing::info!(
                    %image,
                    cgroup,
                    entries = profile.entries.len(),
                    bytes = profile.bytes(),
                    "recorded a startup access profile"
                );
                let _ = self.done.send(Recording {
                    image,
                    cgroup,
                    profile,
                });
                produced += 1;
            }
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

impl Session {
    fn new(start_ns: u64) -> Self {
        Session {
            start_ns,
            exec: false,
            per_image: HashMap::new(),
            seen: HashSet::new(),
        }
    }
}
