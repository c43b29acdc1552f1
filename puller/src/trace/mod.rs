//! Recording what starting containers read, to make prefetch profiles.
//!
//! Two sources feed one [`Recorder`]:
//! - [`ebpf`]: aya programs on the page-cache tracepoints see every read and
//!   page fault on sluice's lazy mounts, including reads of files served by
//!   FUSE passthrough (on the cache's backing files) and of pages already
//!   cached, each with the task's cgroup (one per container);
//! - the FUSE daemon itself ([`AccessObserver`], wired into [`crate::fs`]):
//!   what it serves. Used when eBPF cannot be loaded (no BTF, BPF refused,
//!   not root); it misses cached pages and passthrough reads after the open.
//!
//! A recording follows programs freshly executed outside the host's mount
//! namespace (a starting container), starts at their first access to an
//! image's layers and lasts a window; then it becomes a
//! [`crate::profile::Profile`] for that image.

pub mod btf;
pub mod ebpf;
mod recorder;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

pub use ebpf::Hooks;
pub use recorder::{Recorder, Recording};

use crate::layer::RemoteLayer;
use crate::registry::ImageRef;

/// Told by the FUSE filesystem about what it serves.
pub trait AccessObserver: Send + Sync {
    /// A file was handed to the kernel as a passthrough backing file.
    fn backing_file(&self, layer: &Arc<RemoteLayer>, node: usize, file: &std::fs::File);
    /// The daemon served (or, for passthrough, opened) `len` bytes at
    /// `offset` of a file, for process `pid`.
    fn read(&self, layer: &Arc<RemoteLayer>, node: usize, offset: u64, len: u64, pid: u32);
}

/// The kernel's dev_t (major << 20 | minor) of a userspace `st_dev`.
pub fn kernel_dev(st_dev: u64) -> u32 {
    let (major, minor) = (libc::major(st_dev), libc::minor(st_dev));
    (major << 20) | (minor & 0xfffff)
}

/// Where recordings come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    Ebpf,
    Fuse,
}

/// The tracer a daemon runs: eBPF if it loads, else FUSE-side recording.
pub struct AccessTracer {
    recorder: Arc<Recorder>,
    ebpf: Option<Arc<ebpf::EbpfTracer>>,
}

impl AccessTracer {
    /// Starts recording with windows of `window`; finished recordings arrive
    /// on the returned channel. `ebpf = None` skips eBPF. Files up to
    /// `whole_file_max` bytes are recorded whole (set it to the FUSE
    /// filesystem's `open_fetch_max` when passthrough is on, else 0).
    pub fn start(
        runtime: &tokio::runtime::Handle,
        cache_dir: &Path,
        window: Duration,
        whole_file_max: u64,
        ebpf: Option<Hooks>,
    ) -> (Self, tokio::sync::mpsc::UnboundedReceiver<Recording>) {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let ebpf = if let Some(hooks) = ebpf {
            match ebpf::EbpfTracer::load(runtime, hooks, window) {
                Ok(t) => Some(Arc::new(t)),
                Err(e) => {
                    tracing::warn!("eBPF access tracing unavailable ({e}); recording prefetch profiles from what the FUSE daemon serves instead");
                    None
                }
            }
        } else {
            None
        };
        let source = if ebpf.is_some() {
            Source::Ebpf
        } else {
            Source::Fuse
        };
        let recorder = Arc::new(Recorder::new(source, window, whole_file_max, tx));
        if let Some(t) = &ebpf {
            if let Ok(md) = std::fs::metadata(cache_dir) {
                use std::os::unix::fs::MetadataExt;
                t.watch_cache_device(kernel_dev(md.dev()));
            }
            t.start_pump(runtime, Arc::downgrade(&recorder));
            tracing::info!(tracepoints = ?t.attached(), "eBPF access tracing on");
        }
        recorder.start_ticker(runtime);
        (AccessTracer { recorder, ebpf }, rx)
    }

    pub fn source(&self) -> Source {
        self.recorder.source()
    }

    /// The tracepoints the eBPF programs are attached to (`NAME (raw)` for
    /// raw ones); empty without eBPF.
    pub fn tracepoints(&self) -> Vec<String> {
        self.ebpf
            .as_ref()
            .map(|t| t.attached().to_vec())
            .unwrap_or_default()
    }

    /// What the FUSE filesystems of traced layers should be given.
    pub fn observer(&self) -> Arc<dyn AccessObserver> {
        Arc::new(Observer {
            recorder: self.recorder.clone(),
            ebpf: self.ebpf.clone(),
        })
    }

    /// Starts tracing a layer mounted at `mountpoint` for `image`
    /// (host/repository@manifest-digest).
    pub fn layer_mounted(&self, mountpoint: &Path, layer: Arc<RemoteLayer>, image: ImageRef) {
        use std::os::unix::fs::MetadataExt;
        let dev = match std::fs::metadata(mountpoint) {
            Ok(md) => kernel_dev(md.dev()),
            Err(e) => {
                tracing::warn!("tracing {}: {e}", mountpoint.display());
                return;
            }
        };
        self.recorder.add_layer(dev, layer, image);
        if let Some(t) = &self.ebpf {
            t.watch_device(dev);
        }
    }

    /// Stops tracing a layer (its mount and its passthrough backing files).
    pub fn layer_unmounted(&self, layer: &RemoteLayer) {
        if let Some((dev, backing)) = self.recorder.remove_layer(layer.digest()) {
            if let Some(t) = &self.ebpf {
                t.unwatch_device(dev);
                // Their inode numbers may be reused by unrelated files.
                for (dev, ino) in backing {
                    t.unwatch_backing(dev, ino);
                }
            }
        }
    }

    /// The eBPF programs' calls and run time (counted only while BPF
    /// run-time statistics are on); empty without eBPF.
    pub fn program_stats(&self) -> Vec<ebpf::ProgramStats> {
        self.ebpf
            .as_ref()
            .map(|t| t.program_stats())
            .unwrap_or_default()
    }

    /// Ring-buffer events lost because userspace fell behind.
    pub fn dropped_events(&self) -> u64 {
        self.ebpf.as_ref().map(|t| t.dropped()).unwrap_or(0)
    }

    /// Accesses recorded for starting containers so far, by kind: `read`,
    /// `fault` and `map_pages` (see [`Recorder::recorded_events`]).
    pub fn recorded_events(&self) -> [(&'static str, u64); 3] {
        use sluice_puller_ebpf::kind;
        [
            ("read", kind::READ),
            ("fault", kind::FAULT),
            ("map_pages", kind::MAP_PAGES),
        ]
        .map(|(name, k)| (name, self.recorder.recorded_events(k)))
    }

    pub fn recorder(&self) -> &Arc<Recorder> {
        &self.recorder
    }
}

struct Observer {
    recorder: Arc<Recorder>,
    ebpf: Option<Arc<ebpf::EbpfTracer>>,
}

impl AccessObserver for Observer {
    fn backing_file(&self, layer: &Arc<RemoteLayer>, node: usize, file: &std::fs::File) {
        use std::os::unix::fs::MetadataExt;
        let Ok(md) = file.metadata() else { return };
        let dev = kernel_dev(md.dev());
        self.recorder.add_backing(dev, md.ino(), layer, node);
        if let Some(t) = &self.ebpf {
            t.watch_backing(dev, md.ino());
        }
    }

    fn read(&self, layer: &Arc<RemoteLayer>, node: usize, offset: u64, len: u64, pid: u32) {
        // With eBPF the kernel reports reads itself, page cache hits included.
        if self.ebpf.is_none() {
            self.recorder.fuse_read(layer, node, offset, len, pid);
        }
    }
}
