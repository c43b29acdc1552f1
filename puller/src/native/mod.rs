//! Native layers: once every chunk of a layer is cached, the layer is written
//! as an EROFS image ([`erofs`]) and mounted by the kernel itself, on top of
//! its FUSE mount (from the file on Linux 6.12 and later, through a loop
//! device before). Containers created from then on read it as they would a
//! local filesystem; those already running keep the FUSE mount beneath.
//!
//! Why: with every byte local, what is left of FUSE's cost is a round trip
//! through the daemon for each lookup, open and release (about 20 µs a file
//! on a 2-core VM): a program that opens thousands of small files pays it
//! thousands of times (`cargo xtask bench read`'s small files: 0.61× native
//! through FUSE with passthrough). An EROFS image has no such trips.
//!
//! The cost is disk: an image holds the layer's bytes a second time (the
//! chunks stay cached for the FUSE mount beneath and for other layers).
//!
//! Images outlive the daemon: a restart (an upgrade of the DaemonSet) would
//! otherwise copy every complete layer again. The kernel reads an image
//! without asking us, so one left by an earlier process is verified before
//! its first mount, as cached chunks are before their first read: each image
//! has a seal beside it (`<layer hex>.seal`: the writer's
//! [`erofs::FORMAT_VERSION`], the image's size and SHA-256), written after
//! the image is synced. An image without a seal, of another format version,
//! or whose bytes do not hash to its seal is removed and written anew.

pub mod erofs;
mod loop_device;

use std::collections::HashSet;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sluice_format::{Algorithm, Digest};

use crate::cache::ChunkCache;
use crate::fs::tree::Tree;
use crate::layer::RemoteLayer;
use crate::metrics::PullerMetrics;

pub use erofs::{ErofsError, ImageStats};

#[derive(Debug, thiserror::Error)]
pub enum NativeError {
    #[error("layer {layer}: {source}")]
    Build {
        layer: Digest,
        #[source]
        source: ErofsError,
    },
    #[error("layer {layer}: {what}: {source}")]
    Io {
        layer: Digest,
        what: String,
        #[source]
        source: io::Error,
    },
    #[error("mounting {image} at {mountpoint}: {source}")]
    Mount {
        image: PathBuf,
        mountpoint: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("this kernel cannot mount an EROFS image: {0}")]
    Unsupported(io::Error),
}

/// What a seal says about the image beside it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Seal {
    version: u32,
    size: u64,
    digest: Digest,
}

const SEAL_MAGIC: &str = "sluice-erofs-image";
const SEAL_SUFFIX: &str = ".seal";

impl Seal {
    /// `sluice-erofs-image <version> <size> <digest>`, one line.
    fn to_line(&self) -> String {
        format!(
            "{SEAL_MAGIC} {} {} {}\n",
            self.version, self.size, self.digest
        )
    }

    fn parse(line: &str) -> Option<Seal> {
        let mut words = line.split_whitespace();
        if words.next()? != SEAL_MAGIC {
            return None;
        }
        let seal = Seal {
            version: words.next()?.parse().ok()?,
            size: words.next()?.parse().ok()?,
            digest: words.next()?.parse().ok()?,
        };
        words.next().is_none().then_some(seal)
    }

    /// The seal of the image at `path`: its size and SHA-256 (read whole).
    fn of(path: &Path) -> io::Result<Seal> {
        let mut file = File::open(path)?;
        let mut hasher = Algorithm::Sha256.hasher();
        let size = io::copy(&mut file, &mut hasher)?;
        Ok(Seal {
            version: erofs::FORMAT_VERSION,
            size,
            digest: hasher.finish(),
        })
    }
}

/// Where a cache keeps its layers' images: `CACHE/erofs/<layer hex>`, each
/// with its seal, `<layer hex>.seal`.
pub struct NativeImages {
    dir: PathBuf,
    /// Held while an image is written or verified: one at a time, so that
    /// layers that complete together do not write gigabytes to the disk at
    /// once, and a layer mounted twice is written once.
    writing: Mutex<()>,
    /// Images this process wrote or verified (by layer hex): trusted from
    /// then on.
    trusted: Mutex<HashSet<String>>,
    metrics: Arc<PullerMetrics>,
}

impl NativeImages {
    /// The images of `cache`. What an earlier process left half done (a
    /// temporary file, an image without its seal or a seal without its
    /// image) is removed; sealed images stay, to be verified on first use.
    pub fn open(cache: &ChunkCache, metrics: Arc<PullerMetrics>) -> io::Result<Self> {
        let dir = cache.dir().join("erofs");
        fs::create_dir_all(&dir)?;
        let names: HashSet<String> = fs::read_dir(&dir)?
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .collect();
        for name in &names {
            let whole = match name.strip_suffix(SEAL_SUFFIX) {
                _ if name.starts_with('.') => false,
                Some(image) => names.contains(image),
                None => names.contains(&format!("{name}{SEAL_SUFFIX}")),
            };
            if !whole {
                fs::remove_file(dir.join(name))?;
            }
        }
        Ok(NativeImages {
            dir,
            writing: Mutex::default(),
            trusted: Mutex::default(),
            metrics,
        })
    }

    /// Where the image of the layer with lazy blob `layer` is written.
    pub fn path(&self, layer: &Digest) -> PathBuf {
        self.dir.join(layer.hex())
    }

    fn seal_path(&self, layer: &Digest) -> PathBuf {
        self.dir.join(format!("{}{SEAL_SUFFIX}", layer.hex()))
    }

    /// The image of `layer` if it can be trusted: written by this process,
    /// or sealed by an earlier one and matching its seal. An image that does
    /// not is removed, with a warning saying why.
    fn verified(&self, layer: &Digest) -> Option<PathBuf> {
        let hex = layer.hex();
        let path = self.path(layer);
        if self.trusted.lock().expect("trusted images").contains(&hex) {
            return path.exists().then_some(path);
        }
        let seal = match fs::read_to_string(self.seal_path(layer)) {
            Ok(line) => line,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return None,
            Err(e) => {
                return self.reject(layer, &format!("reading its seal: {e}"));
            }
        };
        let Some(seal) = Seal::parse(&seal) else {
            return self.reject(layer, "its seal is not readable");
        };
        if seal.version != erofs::FORMAT_VERSION {
            return self.reject(
                layer,
                &format!(
                    "written in format version {} (this sluice writes {})",
                    seal.version,
                    erofs::FORMAT_VERSION
                ),
            );
        }
        let started = Instant::now();
        match Seal::of(&path) {
            Ok(found) if found == seal => {}
            Ok(found) => {
                return self.reject(
                    layer,
                    &format!(
                        "its bytes changed: {} bytes with {}, sealed as {} bytes with {}",
                        found.size, found.digest, seal.size, seal.digest
                    ),
                );
            }
            Err(e) => return self.reject(layer, &format!("reading it: {e}")),
        }
        self.metrics.native_images_reused.inc();
        tracing::info!(layer = %layer, bytes = seal.size, ms = started.elapsed().as_millis() as u64, "native image of an earlier process verified");
        self.trusted.lock().expect("trusted images").insert(hex);
        Some(path)
    }

    fn reject(&self, layer: &Digest, why: &str) -> Option<PathBuf> {
        tracing::warn!(layer = %layer, "native image left by an earlier process is written anew: {why}");
        let _ = fs::remove_file(self.seal_path(layer));
        let _ = fs::remove_file(self.path(layer));
        None
    }

    /// Writes the image of `layer`, whose every chunk must be cached.
    /// Written beside and renamed into place, so that an image is whole or
    /// absent. CPU and disk work (the layer's bytes are copied): run it off
    /// any request's path.
    pub fn build(&self, layer: &RemoteLayer) -> Result<(PathBuf, ImageStats), NativeError> {
        let started = Instant::now();
        let digest = layer.digest();
        let io_err = |what: &str| {
            let what = what.to_owned();
            move |source| NativeError::Io {
                layer: digest.clone(),
                what,
                source,
            }
        };
        let path = self.path(digest);
        let tmp = self.dir.join(format!(".{}.tmp", digest.hex()));
        let out = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)
            .map_err(io_err("creating the image"))?;
        let tree = Tree::build(layer.index());
        let written = erofs::write_image(layer.index(), &tree, layer.cache(), &out)
            .map_err(|source| NativeError::Build {
                layer: digest.clone(),
                source,
            })
            .and_then(|stats| {
                out.sync_all().map_err(io_err("syncing the image"))?;
                // Sealed once it is on disk: a seal vouches for synced bytes.
                let seal = Seal::of(&tmp).map_err(io_err("hashing the image"))?;
                let _ = fs::remove_file(self.seal_path(digest));
                fs::rename(&tmp, &path).map_err(io_err("renaming the image"))?;
                self.write_seal(digest, &seal)
                    .map_err(io_err("writing the image's seal"))?;
                Ok(stats)
            });
        match written {
            Ok(stats) => {
                self.trusted
                    .lock()
                    .expect("trusted images")
                    .insert(digest.hex());
                self.metrics.native_images_written.inc();
                tracing::info!(layer = %digest, inodes = stats.inodes, bytes = stats.bytes, ms = started.elapsed().as_millis() as u64, "native image written");
                Ok((path, stats))
            }
            Err(e) => {
                let _ = fs::remove_file(&tmp);
                Err(e)
            }
        }
    }

    /// The image of `layer`, written unless it exists (after the image
    /// being written, if any). An image left by an earlier process is used
    /// if it matches its seal.
    pub fn get_or_build(&self, layer: &RemoteLayer) -> Result<PathBuf, NativeError> {
        let _writing = self.writing.lock().expect("image writer");
        match self.verified(layer.digest()) {
            Some(p) => Ok(p),
            None => self.build(layer).map(|(p, _)| p),
        }
    }

    /// Writes `seal` beside `layer`'s image: beside, synced, renamed, and
    /// the directory synced, so that a seal is whole or absent after a
    /// power loss.
    fn write_seal(&self, layer: &Digest, seal: &Seal) -> io::Result<()> {
        let tmp = self.dir.join(format!(".{}{SEAL_SUFFIX}.tmp", layer.hex()));
        let mut f = File::create(&tmp)?;
        f.write_all(seal.to_line().as_bytes())?;
        f.sync_all()?;
        fs::rename(&tmp, self.seal_path(layer))?;
        File::open(&self.dir)?.sync_all()
    }

    /// Removes the images of layers that `keep` does not want. Mounted
    /// images stay readable: the mount holds the file.
    pub fn retain(&self, keep: impl Fn(&str) -> bool) {
        let Ok(entries) = fs::read_dir(&self.dir) else {
            return;
        };
        for e in entries.flatten() {
            let name = e.file_name();
            let name = name.to_string_lossy();
            let layer = name.strip_suffix(SEAL_SUFFIX).unwrap_or(&name);
            if !name.starts_with('.') && !keep(layer) {
                self.trusted.lock().expect("trusted images").remove(layer);
                let _ = fs::remove_file(e.path());
            }
        }
    }
}

/// An EROFS image mounted by the kernel; dropping it detaches the mount if it
/// is still the topmost one at its path.
#[derive(Debug)]
pub struct NativeMount {
    path: PathBuf,
    /// What the mount table shows as its source: the image, or the loop
    /// device it sits on.
    source: PathBuf,
}

impl NativeMount {
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// `mount -t erofs -o ro SOURCE MOUNTPOINT`.
fn mount_erofs(source: &Path, mountpoint: &Path) -> io::Result<()> {
    let c = |p: &Path| std::ffi::CString::new(p.as_os_str().as_bytes());
    let (Ok(src), Ok(dst)) = (c(source), c(mountpoint)) else {
        return Err(io::Error::from(io::ErrorKind::InvalidInput));
    };
    // SAFETY: NUL-terminated strings that outlive the call; no data.
    let r = unsafe {
        libc::mount(
            src.as_ptr(),
            dst.as_ptr(),
            c"erofs".as_ptr(),
            libc::MS_RDONLY,
            std::ptr::null(),
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

fn mount_failed(image: &Path, mountpoint: &Path, source: io::Error) -> NativeError {
    NativeError::Mount {
        image: image.to_path_buf(),
        mountpoint: mountpoint.to_path_buf(),
        source,
    }
}

/// Mounts `image` read-only at `mountpoint` (on top of whatever is mounted
/// there): from the file itself (Linux 6.12 and later), else through a loop
/// device. [`NativeError::Unsupported`] on a kernel without EROFS, or
/// without loop devices where it needs one.
pub fn mount(image: &Path, mountpoint: &Path) -> Result<NativeMount, NativeError> {
    match mount_erofs(image, mountpoint) {
        Ok(()) => {
            return Ok(NativeMount {
                path: mountpoint.to_path_buf(),
                source: image.to_path_buf(),
            })
        }
        Err(e) if e.raw_os_error() == Some(libc::ENODEV) => {
            return Err(NativeError::Unsupported(e))
        }
        // An EROFS that mounts block devices only.
        Err(e) if e.raw_os_error() == Some(libc::ENOTBLK) => {}
        Err(e) => return Err(mount_failed(image, mountpoint, e)),
    }
    mount_on_loop_device(image, mountpoint)
}

/// Mounts `image` at `mountpoint` through a loop device, as [`mount`] does
/// on kernels before 6.12.
pub fn mount_on_loop_device(image: &Path, mountpoint: &Path) -> Result<NativeMount, NativeError> {
    let device = loop_device::attach(image).map_err(|e| {
        NativeError::Unsupported(io::Error::new(
            e.kind(),
            format!("EROFS needs a block device here, and no loop device could be attached: {e}"),
        ))
    })?;
    // The device clears itself once the mount (which holds it) goes.
    mount_erofs(device.path(), mountpoint).map_err(|e| mount_failed(image, mountpoint, e))?;
    Ok(NativeMount {
        path: mountpoint.to_path_buf(),
        source: device.path().to_path_buf(),
    })
}

impl Drop for NativeMount {
    fn drop(&mut self) {
        if crate::fs::top_mount_is(&self.path, &self.source.to_string_lossy()) {
            crate::fs::detach(&self.path);
        }
    }
}

/// Whether every chunk of `layer` is cached.
pub fn is_complete(layer: &RemoteLayer) -> bool {
    first_missing(layer, 0).is_none()
}

/// The first chunk of `layer`, from the `from`th on, that is not cached.
fn first_missing(layer: &RemoteLayer, from: usize) -> Option<usize> {
    let chunks = layer.index().chunks();
    (from..chunks.len()).find(|&i| !chunks[i].zeros && !layer.cache().contains(&chunks[i].digest))
}

/// How often a mounted layer that is not complete is looked at again (only
/// when the cache took new chunks meanwhile).
const COMPLETE_CHECK_EVERY: Duration = Duration::from_secs(1);

/// A native mount counted in `sluice_puller_native_mounts` while it lives.
struct CountedMount {
    _mount: NativeMount,
    metrics: Arc<PullerMetrics>,
}

impl CountedMount {
    fn new(mount: NativeMount, metrics: Arc<PullerMetrics>) -> Self {
        metrics.native_mounts.inc();
        CountedMount {
            _mount: mount,
            metrics,
        }
    }
}

impl Drop for CountedMount {
    fn drop(&mut self) {
        self.metrics.native_mounts.dec();
    }
}

/// Makes a mounted layer native once it is complete: waits until every
/// chunk is cached, writes the image, and mounts it on top of the layer's
/// mount. Dropping it stops that, and unmounts the image if it was mounted.
pub struct NativeUpgrade {
    task: tokio::task::JoinHandle<()>,
    /// The mount, once made. The task holds it only weakly: a mount made
    /// after this was dropped goes with the task's last reference.
    mounted: Arc<Mutex<Option<CountedMount>>>,
}

impl NativeUpgrade {
    pub fn start(
        runtime: &tokio::runtime::Handle,
        images: Arc<NativeImages>,
        layer: Arc<RemoteLayer>,
        mountpoint: PathBuf,
    ) -> Self {
        let mounted: Arc<Mutex<Option<CountedMount>>> = Arc::default();
        let slot = Arc::downgrade(&mounted);
        let task = runtime.spawn(async move {
            // Chunks are only looked at again once the cache took new ones,
            // and from the first one missing last time.
            let (mut from, mut seen) = (0, u64::MAX);
            loop {
                let inserted = layer.cache().stats.inserted_bytes.load(Ordering::Relaxed);
                if inserted != seen {
                    seen = inserted;
                    match first_missing(&layer, from) {
                        Some(i) => from = i,
                        None if first_missing(&layer, 0).is_none() => break,
                        None => from = 0, // evicted meanwhile
                    }
                }
                tokio::time::sleep(COMPLETE_CHECK_EVERY).await;
            }
            let digest = layer.digest().clone();
            let metrics = images.metrics.clone();
            let made = tokio::task::spawn_blocking(move || {
                let image = images.get_or_build(&layer)?;
                mount(&image, &mountpoint)
            })
            .await;
            match made {
                Ok(Ok(m)) => {
                    tracing::info!(layer = %digest, at = %m.path().display(), "layer complete: mounted natively (EROFS) for the containers created from now on");
                    if let Some(slot) = slot.upgrade() {
                        *slot.lock().expect("native mount") = Some(CountedMount::new(m, metrics));
                    } // else: stopped meanwhile, and `m` unmounts here

                }
                Ok(Err(e @ NativeError::Unsupported(_))) => {
                    tracing::info!(layer = %digest, "layer complete, stays on FUSE: {e}")
                }
                Ok(Err(e)) => tracing::warn!("layer complete, stays on FUSE: {e}"),
                Err(e) => tracing::warn!(layer = %digest, "native image task: {e}"),
            }
        });
        NativeUpgrade { task, mounted }
    }
}

impl Drop for NativeUpgrade {
    fn drop(&mut self) {
        self.task.abort();
        // Unmounted now, not when the task lets go of its reference.
        drop(self.mounted.lock().expect("native mount").take());
    }
}
