//! Lazy layers: from the labels of a `Prepare` to a FUSE mount of the layer.
//!
//! containerd (through CRI, or `sluice pull`) labels the `Prepare` of each
//! layer with the image reference, the manifest digest and the layer digest.
//! The image is resolved once (manifest, lazy twins) and cached for a short
//! while, since its layers arrive one `Prepare` after another; the layer's
//! lazy form is mounted read-only with the puller's FUSE filesystem at the
//! snapshot's `fs` directory once its TOC is fetched and verified, and the
//! TOC is decoded and indexed in the background while the mount's requests
//! wait (see [`RemoteLayers::mount_early`]). Once every chunk of a layer is
//! cached, an EROFS image of it is mounted over the FUSE mount
//! (`sluice_puller::native`): containers created from then on read the layer
//! without the daemon.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sluice_format::oci::Descriptor;
use sluice_format::Digest;
use sluice_puller::fs::{FsOptions, LayerSlot, LazyMount};
use sluice_puller::image::{self, ResolvedImage};
use sluice_puller::metrics::PullerMetrics;
use sluice_puller::native::{NativeImages, NativeUpgrade};
use sluice_puller::prefetch::Prefetcher;
use sluice_puller::profile::{self, Profile};
use sluice_puller::trace::AccessTracer;
use sluice_puller::{ChunkCache, FetchedToc, ImageRef, LayerOptions, RegistryClient, RemoteLayer};

use crate::metadata::RemoteSource;

pub const LABEL_TARGET: &str = "containerd.io/snapshot.ref";
pub const LABEL_IMAGE_REF: &str = "containerd.io/snapshot/cri.image-ref";
pub const LABEL_LAYER_DIGEST: &str = "containerd.io/snapshot/cri.layer-digest";
pub const LABEL_MANIFEST_DIGEST: &str = "containerd.io/snapshot/cri.manifest-digest";
/// Marks a committed snapshot whose content is mounted lazily.
pub const LABEL_REMOTE: &str = "containerd.io/snapshot/remote";

/// How long a resolved image is reused for the Prepares of its layers.
const RESOLVE_TTL: Duration = Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
pub enum RemoteError {
    #[error("image {image}, layer {layer}: {reason}")]
    Layer {
        image: String,
        layer: String,
        reason: String,
    },
    #[error("image {image}: {reason}")]
    Image { image: String, reason: String },
}

/// What the labels of a Prepare ask for.
#[derive(Debug, Clone)]
pub struct LayerRequest {
    pub image: ImageRef,
    pub layer: Digest,
    pub manifest: Option<Digest>,
}

impl LayerRequest {
    /// `Ok(None)` when the labels do not ask for a remote snapshot at all.
    pub fn from_labels(labels: &BTreeMap<String, String>) -> Result<Option<Self>, RemoteError> {
        let (Some(image), Some(layer)) =
            (labels.get(LABEL_IMAGE_REF), labels.get(LABEL_LAYER_DIGEST))
        else {
            return Ok(None);
        };
        let bad = |reason: String| RemoteError::Image {
            image: image.clone(),
            reason,
        };
        let image_ref = ImageRef::parse(image).map_err(|e| bad(e.to_string()))?;
        let layer = layer
            .parse::<Digest>()
            .map_err(|e| bad(format!("layer digest label: {e}")))?;
        let manifest = labels
            .get(LABEL_MANIFEST_DIGEST)
            .map(|m| {
                m.parse::<Digest>()
                    .map_err(|e| bad(format!("manifest digest label: {e}")))
            })
            .transpose()?;
        Ok(Some(LayerRequest {
            image: image_ref,
            layer,
            manifest,
        }))
    }
}

/// Whether a layer can be mounted lazily, and from what.
#[derive(Debug)]
pub enum Lookup {
    Lazy {
        source: Box<RemoteSource>,
        /// For the image's top layer: its configuration, which names the
        /// command its containers run (see [`RemoteLayers::mount_early`]).
        top_of: Option<Descriptor>,
    },
    /// Needs a full pull; the reason is logged and counted.
    Full(String),
}

struct Mounted {
    /// The layer's EROFS image over the FUSE mount, once the layer is
    /// complete. Declared first: it is unmounted before the FUSE mount.
    native: Option<NativeUpgrade>,
    // Dropping it unmounts.
    mount: LazyMount,
    /// Which mount of the snapshot this is (a failed one is mounted again).
    seq: u64,
    /// The layer, once opened: a mount answered early has none until its
    /// TOC is decoded and indexed (see [`RemoteLayers::mount_early`]).
    layer: Option<Arc<RemoteLayer>>,
}

/// The usage of a layer mounted early, once its index is built, or why it
/// could not be (see [`RemoteLayers::mount_early`]).
pub type PendingUsage = tokio::sync::oneshot::Receiver<Result<(i64, i64), String>>;

/// Options of the lazy mounts.
#[derive(Debug, Clone)]
pub struct RemoteOptions {
    pub fs: FsOptions,
    pub read_deadline: Duration,
    /// See [`LayerOptions::fetch_ahead`].
    pub fetch_ahead: u64,
    /// Fetch the rest of each layer in the background (lowest priority).
    pub fill: bool,
    /// When an image without a profile is pulled, fetch what its command
    /// loads first (needs `fs.follow_imports`; see `LayerSlot::start_command`);
    /// with or without one, the files the container runtime reads first
    /// (`LayerSlot::start_runtime_files`).
    pub follow_command: bool,
}

/// What a layer's mount starts once the layer is served (see
/// [`RemoteLayers::mount_early`]).
#[derive(Debug, Clone, Default)]
pub struct MountStart {
    /// Look up the image's profile and queue this layer's part of it (for
    /// a pull; not when mounting again after a restart).
    pub prefetch: bool,
    /// For an image's top layer: the image's configuration and the lazy
    /// layers below (their snapshot ids, the nearest first). The files the
    /// container runtime reads first are fetched, and without a profile,
    /// what the image's command loads first.
    pub command: Option<(Descriptor, Vec<u64>)>,
}

/// What the daemon does with prefetch profiles.
pub struct Profiles {
    /// Records accesses of mounted layers (`None`: not recording).
    pub tracer: Option<Arc<AccessTracer>>,
    /// Runs profile prefetches and background fills (`None`: neither).
    pub prefetcher: Option<Prefetcher>,
    /// Whether images' profiles are looked up and prefetched.
    pub prefetch: bool,
}

/// When a profile was looked up, and what was found.
type KnownProfile = (Instant, Option<Arc<Profile>>);

/// A layer being opened ahead of its `Prepare` (see
/// [`RemoteLayers::open_ahead`]): the slot its fetched TOC lands in, locked
/// until then.
type OpeningLayer = Arc<tokio::sync::Mutex<Option<Result<FetchedToc, String>>>>;

/// How long a layer's profile prefetch waits for the TOCs of the layers
/// above it (see [`RemoteLayers::mount`]) before it starts anyway.
const PREFETCH_AFTER_TOCS_MAX: Duration = Duration::from_secs(5);

pub struct RemoteLayers {
    client: Arc<RegistryClient>,
    cache: Arc<ChunkCache>,
    metrics: Arc<PullerMetrics>,
    runtime: tokio::runtime::Handle,
    options: RemoteOptions,
    profiles: Profiles,
    resolved: Mutex<HashMap<String, (Instant, Arc<ResolvedImage>)>>,
    /// Newest profile per image manifest (None: the registry has none).
    known_profiles: tokio::sync::Mutex<HashMap<Digest, KnownProfile>>,
    /// Layers opened ahead, by lazy blob digest; the first mount of the blob
    /// takes it, and one no mount took is dropped after [`RESOLVE_TTL`].
    /// Each with the (pinned) image it was opened for.
    opening: Arc<Mutex<HashMap<Digest, (ImageRef, OpeningLayer)>>>,
    mounts: Mutex<HashMap<u64, Mounted>>,
    mount_seq: std::sync::atomic::AtomicU64,
    /// Where complete layers' EROFS images go (`None`: layers stay on FUSE).
    native: Option<Arc<NativeImages>>,
}

impl RemoteLayers {
    pub fn new(
        client: Arc<RegistryClient>,
        cache: Arc<ChunkCache>,
        metrics: Arc<PullerMetrics>,
        runtime: tokio::runtime::Handle,
        mut options: RemoteOptions,
        profiles: Profiles,
        native: Option<Arc<NativeImages>>,
    ) -> Self {
        if let Some(t) = &profiles.tracer {
            options.fs.observer = Some(t.observer());
        }
        RemoteLayers {
            client,
            cache,
            metrics,
            runtime,
            options,
            profiles,
            resolved: Mutex::new(HashMap::new()),
            known_profiles: tokio::sync::Mutex::new(HashMap::new()),
            opening: Arc::default(),
            mounts: Mutex::new(HashMap::new()),
            mount_seq: Default::default(),
            native,
        }
    }

    pub fn client(&self) -> &Arc<RegistryClient> {
        &self.client
    }

    /// The newest profile of the image `image` (pinned by digest), fetched
    /// once a minute at most.
    async fn profile_of(&self, image: &ImageRef) -> Option<Arc<Profile>> {
        if !self.profiles.prefetch {
            return None;
        }
        self.profiles.prefetcher.as_ref()?;
        let manifest = image.reference.parse::<Digest>().ok()?;
        let mut known = self.known_profiles.lock().await;
        if let Some((at, p)) = known.get(&manifest) {
            if at.elapsed() < RESOLVE_TTL {
                return p.clone();
            }
        }
        let p = match profile::fetch_newest(&self.client, image, &manifest).await {
            Ok(p) => p.map(Arc::new),
            Err(e) => {
                tracing::warn!(%image, "no prefetch profile: {e}");
                None
            }
        };
        if let Some(p) = &p {
            tracing::info!(%image, entries = p.entries.len(), bytes = p.bytes(), nodes = p.nodes, "prefetch profile found");
        }
        known.insert(manifest, (Instant::now(), p.clone()));
        p
    }

    /// Waits until queued prefetch work is done (tests, benchmarks).
    pub async fn prefetch_idle(&self) {
        if let Some(p) = &self.profiles.prefetcher {
            p.wait_idle().await;
        }
    }

    async fn resolve(&self, req: &LayerRequest) -> Result<Arc<ResolvedImage>, RemoteError> {
        let image = match &req.manifest {
            Some(m) => req.image.with_reference(m.to_string()),
            None => req.image.clone(),
        };
        let key = image.to_string();
        {
            let mut cached = self.resolved.lock().expect("resolved images");
            cached.retain(|_, (at, _)| at.elapsed() < RESOLVE_TTL);
            if let Some((_, r)) = cached.get(&key) {
                return Ok(r.clone());
            }
        }
        let r = Arc::new(image::resolve(&self.client, &image).await.map_err(|e| {
            RemoteError::Image {
                image: key.clone(),
                reason: e.to_string(),
            }
        })?);
        self.resolved
            .lock()
            .expect("resolved images")
            .insert(key, (Instant::now(), r.clone()));
        Ok(r)
    }

    fn layer_options(&self) -> LayerOptions {
        LayerOptions {
            read_deadline: self.options.read_deadline,
            fetch_ahead: self.options.fetch_ahead,
            fetch_latency: Some(self.metrics.fetch_latency.clone()),
        }
    }

    /// Starts opening (fetching the TOCs of) the lazy layers of `layers`,
    /// the layers above the one being prepared: containerd prepares an
    /// image's layers one after the other, each after the one below is
    /// committed, so without this each TOC is a fetch of its own on the
    /// pull's path, and from the second layer on it shares the link with
    /// the lower layers' prefetch (numpy-pandas at 100 Mbit/s: the upper
    /// layer's 430 KB TOC took 0.47 s). Failures are left to the mount,
    /// which opens the layer again.
    fn open_ahead(&self, image: &ImageRef, layers: &[image::ImageLayer]) {
        let mut opening = self.opening.lock().expect("opening layers");
        for lazy in layers.iter().filter_map(|l| l.lazy.as_ref()) {
            if opening.contains_key(&lazy.digest) {
                continue;
            }
            let slot = Arc::new(tokio::sync::Mutex::new(None));
            let Ok(mut result) = slot.clone().try_lock_owned() else {
                continue;
            };
            opening.insert(lazy.digest.clone(), (image.clone(), slot.clone()));
            let (client, cache, opts) = (
                self.client.clone(),
                self.cache.clone(),
                self.layer_options(),
            );
            // Weak: a daemon that stops drops what it opened (and the chunk
            // cache it holds) at once.
            let (all, mine) = (Arc::downgrade(&self.opening), Arc::downgrade(&slot));
            let (image, lazy) = (image.clone(), lazy.clone());
            self.runtime.spawn(async move {
                let opened = RemoteLayer::fetch_toc(client, image, &lazy, cache, opts).await;
                *result = Some(opened.map_err(|e| e.to_string()));
                drop(result);
                // Not taken by a mount (the pull stopped, or fell back to a
                // full pull): its TOC is not kept for nothing.
                tokio::time::sleep(RESOLVE_TTL).await;
                let Some(all) = all.upgrade() else { return };
                let mut all = all.lock().expect("opening layers");
                if all
                    .get(&lazy.digest)
                    .is_some_and(|(_, s)| std::ptr::eq(Arc::as_ptr(s), mine.as_ptr()))
                {
                    all.remove(&lazy.digest);
                }
            });
        }
    }

    /// The verified TOC of the lazy blob `lazy` of `image`: taken from
    /// [`Self::open_ahead`] if it was fetched there, else fetched now.
    async fn fetch_toc(
        &self,
        image: &ImageRef,
        lazy: &sluice_format::oci::Descriptor,
    ) -> Result<FetchedToc, String> {
        // The slot stays listed until its TOC is there: a lower layer's
        // profile prefetch waits for the TOCs still on their way (see
        // `queue_profile_after_tocs`), including the one waited for here.
        let ahead = self
            .opening
            .lock()
            .expect("opening layers")
            .get(&lazy.digest)
            .cloned();
        if let Some((_, slot)) = ahead {
            let taken = slot.lock().await.take();
            {
                let mut opening = self.opening.lock().expect("opening layers");
                if opening
                    .get(&lazy.digest)
                    .is_some_and(|(_, s)| Arc::ptr_eq(s, &slot))
                {
                    opening.remove(&lazy.digest);
                }
            }
            match taken {
                Some(Ok(toc)) if toc.image() == image => {
                    self.metrics.layers_opened_ahead.inc();
                    return Ok(toc);
                }
                Some(Err(e)) => {
                    tracing::debug!(layer = %lazy.digest, "opening ahead failed, opening again: {e}")
                }
                _ => {}
            }
        }
        RemoteLayer::fetch_toc(
            self.client.clone(),
            image.clone(),
            lazy,
            self.cache.clone(),
            self.layer_options(),
        )
        .await
        .map_err(|e| e.to_string())
    }

    /// Finds the lazy form of the requested layer.
    pub async fn lookup(&self, req: &LayerRequest) -> Result<Lookup, RemoteError> {
        let resolved = self.resolve(req).await?;
        let Some(at) = resolved
            .layers
            .iter()
            .position(|l| l.original.digest == req.layer)
        else {
            return Err(RemoteError::Layer {
                image: resolved.image.to_string(),
                layer: req.layer.to_string(),
                reason: format!("not a layer of manifest {}", resolved.manifest_digest),
            });
        };
        let pinned = resolved
            .image
            .with_reference(resolved.manifest_digest.to_string());
        self.open_ahead(&pinned, &resolved.layers[at + 1..]);
        let layer = &resolved.layers[at];
        Ok(match &layer.lazy {
            Some(lazy) => Lookup::Lazy {
                source: Box::new(RemoteSource {
                    image: pinned.to_string(),
                    layer: layer.original.clone(),
                    lazy: lazy.clone(),
                }),
                top_of: (at + 1 == resolved.layers.len()).then(|| resolved.config.clone()),
            },
            None => Lookup::Full(format!(
                "layer {} ({}) is not zstd:chunked and the registry has no lazy twin of it",
                layer.original.digest, layer.original.media_type
            )),
        })
    }

    /// Opens the layer and mounts it at `mountpoint`; returns the usage the
    /// layer would have unpacked (bytes of regular files, entries), which is
    /// what containerd and kubelet account for it. With `prefetch`, the
    /// image's profile is fetched and this layer's part of it queued (for a
    /// pull; not when mounting again after a restart).
    pub async fn mount(
        self: &Arc<Self>,
        id: u64,
        mountpoint: &Path,
        source: &RemoteSource,
        prefetch: bool,
    ) -> Result<(i64, i64), RemoteError> {
        let start = MountStart {
            prefetch,
            command: None,
        };
        let usage = self.mount_early(id, mountpoint, source, start).await?;
        let reason = match usage.await {
            Ok(Ok(usage)) => return Ok(usage),
            Ok(Err(reason)) => reason,
            Err(_) => "the layer's opening was dropped".into(),
        };
        self.unmount(id);
        Err(RemoteError::Layer {
            image: source.image.clone(),
            layer: source.layer.digest.to_string(),
            reason,
        })
    }

    /// Mounts the layer at `mountpoint` as soon as its TOC is fetched and
    /// verified, and returns: the TOC is decoded and indexed in the
    /// background (python3-large's upper layer: 39,000 files, about 80 ms of
    /// CPU, then its directory tree), while the kernel's requests to the
    /// mount wait for it. A pull is done that much sooner, and containerd
    /// creates the container (100 ms and more before its overlay mount
    /// touches the layer) meanwhile. The receiver gets the layer's usage
    /// (see [`Self::mount`]) once known, or why the layer could not be
    /// opened; then the mount answers every request with EIO, and
    /// [`Self::is_mounted`] says no (so that a container is not stacked on
    /// it: see `ensure_lower_mounted`). A TOC that verified but does not
    /// decode is that case: the pull has taken the layer as lazy by then.
    /// Once served, the layer starts what `start` asks for.
    pub async fn mount_early(
        self: &Arc<Self>,
        id: u64,
        mountpoint: &Path,
        source: &RemoteSource,
        start: MountStart,
    ) -> Result<PendingUsage, RemoteError> {
        let prefetch = start.prefetch;
        let err = |reason: String| RemoteError::Layer {
            image: source.image.clone(),
            layer: source.layer.digest.to_string(),
            reason,
        };
        // A mount left by a previous daemon (killed) is dead: detach it first.
        crate::snapshots::detach_mount(mountpoint);
        let image = ImageRef::parse(&source.image).map_err(|e| err(e.to_string()))?;
        // The profile is looked up while the TOC is fetched: both are round
        // trips on the pull's path.
        let profile = prefetch.then(|| {
            let (this, image) = (self.clone(), image.clone());
            self.runtime
                .spawn(async move { this.profile_of(&image).await })
        });
        let toc = self.fetch_toc(&image, &source.lazy).await.map_err(err)?;
        let (rt, mp, fs, digest) = (
            self.runtime.clone(),
            mountpoint.to_path_buf(),
            self.options.fs.clone(),
            source.lazy.digest.clone(),
        );
        let mount = tokio::task::spawn_blocking(move || {
            sluice_puller::fs::mount_pending(&digest, rt, &mp, fs)
        })
        .await
        .map_err(|e| err(format!("mount task: {e}")))?
        .map_err(|e| err(format!("mounting at {}: {e}", mountpoint.display())))?;
        let slot = mount.slot();
        let seq = self
            .mount_seq
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.mounts.lock().expect("mounts").insert(
            id,
            Mounted {
                native: None,
                mount,
                seq,
                layer: None,
            },
        );
        let (tx, rx) = tokio::sync::oneshot::channel();
        let (this, mountpoint) = (self.clone(), mountpoint.to_path_buf());
        self.runtime.spawn(async move {
            let opened = tokio::task::spawn_blocking(move || toc.open())
                .await
                .map_err(|e| e.to_string())
                .and_then(|r| r.map_err(|e| e.to_string()));
            let layer = match opened {
                Ok(layer) => Arc::new(layer),
                Err(reason) => {
                    tracing::error!(image = %image, lazy_blob = %slot.digest(), "lazy layer cannot be served (its requests fail with EIO): {reason}");
                    slot.serve(Err(reason.clone()));
                    let _ = tx.send(Err(reason));
                    return;
                }
            };
            // Not for a layer unmounted meanwhile.
            {
                let mut mounts = this.mounts.lock().expect("mounts");
                match mounts.get_mut(&id) {
                    Some(m) if m.seq == seq => m.layer = Some(layer.clone()),
                    _ => {
                        let _ = tx.send(Err("unmounted before the layer was opened".into()));
                        return;
                    }
                }
            }
            this.metrics.track(&layer);
            let served = {
                let (slot, layer) = (slot.clone(), layer.clone());
                tokio::task::spawn_blocking(move || slot.serve(Ok(layer)))
                    .await
                    .unwrap_or(false)
            };
            if !served {
                let _ = tx.send(Err("unmounted before the layer was opened".into()));
                return;
            }
            if let Some(t) = &this.profiles.tracer {
                t.layer_mounted(&mountpoint, layer.clone(), image.clone());
            }
            if let Some(images) = &this.native {
                let upgrade = NativeUpgrade::start(
                    &this.runtime,
                    images.clone(),
                    layer.clone(),
                    mountpoint.clone(),
                );
                // (Dropped, so stopped, if the layer was unmounted meanwhile.)
                if let Some(m) = this.mounts.lock().expect("mounts").get_mut(&id) {
                    if m.seq == seq {
                        m.native = Some(upgrade);
                    }
                }
            }
            let _ = tx.send(Ok(layer_usage(&layer)));
            // An image's top layer, at a pull: it is told its lowers here,
            // for what follows too (the image's command); containerd reads
            // the image's /etc/group as it creates the container, before any
            // profile's prefetch has begun (see
            // `LayerSlot::start_runtime_files`).
            if let (true, Some((_, lowers))) = (this.options.follow_command, &start.command) {
                if this.is_current(id, seq) {
                    let ids: Vec<u64> = std::iter::once(id).chain(lowers.iter().copied()).collect();
                    this.stack(&ids);
                    slot.start_runtime_files();
                }
            }
            let profile = match profile {
                Some(p) => p.await.ok().flatten(),
                None => None,
            };
            let has_profile = profile.is_some();
            // (A profile is only looked up where there is a prefetcher.)
            if let (Some(p), Some(_)) = (profile, &this.profiles.prefetcher) {
                this.queue_profile_after_tocs(p, &layer, &image, (id, seq))
                    .await;
            }
            if let (false, true, Some((config, _))) =
                (has_profile, this.options.follow_command, start.command)
            {
                this.start_command((id, seq), &slot, &image, &config).await;
            }
            // Below the profile's work in the prefetcher's queue.
            if let (true, Some(prefetcher)) = (this.options.fill, &this.profiles.prefetcher) {
                if this.is_current(id, seq) {
                    prefetcher.fill_layer(&layer);
                }
            }
        });
        Ok(rx)
    }

    /// Queues the layer's part of profile `p` once the TOCs of this image's
    /// layers above it are fetched: they are on the pull's path and the
    /// container waits for the pull, so this layer's prefetch goes after them
    /// rather than share the link with them (python3-large at 100 Mbit/s: a
    /// 3.5 MB TOC beside four prefetch ranges).
    async fn queue_profile_after_tocs(
        &self,
        p: Arc<Profile>,
        layer: &Arc<RemoteLayer>,
        image: &ImageRef,
        (id, seq): (u64, u64),
    ) {
        let Some(prefetcher) = &self.profiles.prefetcher else {
            return;
        };
        let pending: Vec<OpeningLayer> = self
            .opening
            .lock()
            .expect("opening layers")
            .values()
            .filter(|(i, _)| i == image)
            .map(|(_, slot)| slot.clone())
            .collect();
        let tocs = async {
            for slot in pending {
                drop(slot.lock().await);
            }
        };
        let _ = tokio::time::timeout(PREFETCH_AFTER_TOCS_MAX, tocs).await;
        // Not for a layer unmounted meanwhile.
        if self.is_current(id, seq) {
            queue_profile(prefetcher, &p, layer);
        }
    }

    /// Fetches what the command of `image` (configuration `config`) loads
    /// first, in its top layer `slot` (snapshot `id`, mount `seq`, told its
    /// lowers already) and the lazy layers below: the pull is done, the
    /// container not created yet (see `LayerSlot::start_command`).
    async fn start_command(
        &self,
        (id, seq): (u64, u64),
        slot: &LayerSlot,
        image: &ImageRef,
        config: &Descriptor,
    ) {
        let cmd = match image::start_command(&self.client, image, config).await {
            Ok(Some(cmd)) => cmd,
            Ok(None) => return,
            Err(e) => {
                tracing::warn!(%image, "image command not fetched ahead: {e}");
                return;
            }
        };
        if !self.is_current(id, seq) {
            return;
        }
        tracing::info!(%image, command = ?cmd.argv, "no profile: fetching what the image's command loads first");
        slot.start_command(cmd);
    }

    /// Tells the mounted lazy layers `ids` (an image's, the top one first)
    /// which layers are below each (see `LayerSlot::set_lowers`).
    pub fn stack(&self, ids: &[u64]) {
        let mounts = self.mounts.lock().expect("mounts");
        let slots: Vec<Option<LayerSlot>> = ids
            .iter()
            .map(|id| mounts.get(id).map(|m| m.mount.slot()))
            .collect();
        drop(mounts);
        for (k, slot) in slots.iter().enumerate() {
            if let Some(slot) = slot {
                let lowers: Vec<LayerSlot> = slots[k + 1..].iter().flatten().cloned().collect();
                slot.set_lowers(&lowers);
            }
        }
    }

    /// Whether snapshot `id` is still mounted by its mount number `seq`.
    fn is_current(&self, id: u64, seq: u64) -> bool {
        self.mounts
            .lock()
            .expect("mounts")
            .get(&id)
            .is_some_and(|m| m.seq == seq)
    }

    /// Whether snapshot `id`'s layer is mounted and served, or still being
    /// opened. A mount whose layer could not be opened (its requests fail)
    /// is unmounted here and counts as not mounted.
    pub fn is_mounted(&self, id: u64) -> bool {
        let failed = match self.mounts.lock().expect("mounts").get(&id) {
            None => return false,
            Some(m) => m.mount.failed().is_some(),
        };
        if failed {
            self.unmount(id);
        }
        !failed
    }

    /// Unmounts snapshot `id`'s layer, if mounted.
    pub fn unmount(&self, id: u64) {
        let m = self.mounts.lock().expect("mounts").remove(&id);
        if let Some(layer) = m.as_ref().and_then(|m| m.layer.as_ref()) {
            if let Some(t) = &self.profiles.tracer {
                t.layer_unmounted(layer);
            }
            if let Some(p) = &self.profiles.prefetcher {
                p.cancel(layer.digest());
            }
        }
        drop(m);
    }

    /// Unmounts everything (daemon shutdown).
    pub fn unmount_all(&self) {
        let all: Vec<_> = self.mounts.lock().expect("mounts").drain().collect();
        drop(all);
    }

    /// Drops cached chunks, TOCs and native images that no mounted layer
    /// uses (after containerd removed images). Returns the bytes freed
    /// from the chunk cache.
    pub fn clean_cache(&self) -> u64 {
        let mounts = self.mounts.lock().expect("mounts");
        let keep: std::collections::HashSet<&Digest> = mounts
            .values()
            .flat_map(|m| m.layer.iter().flat_map(|l| l.cache_keys()))
            .collect();
        if let Some(images) = &self.native {
            let layers: std::collections::HashSet<String> = mounts
                .values()
                .filter_map(|m| m.layer.as_ref().map(|l| l.digest().hex()))
                .collect();
            images.retain(|hex| layers.contains(hex));
        }
        self.cache.retain(|d| keep.contains(d))
    }

    pub fn mounted(&self) -> usize {
        self.mounts.lock().expect("mounts").len()
    }
}

/// Queues the layer's part of profile `p` for a freshly mounted layer.
fn queue_profile(prefetcher: &Prefetcher, p: &Profile, layer: &Arc<RemoteLayer>) {
    let entries = p.entries_for(layer.digest());
    if !entries.is_empty() {
        let queued = prefetcher.prefetch_profile(layer, &entries);
        tracing::info!(layer = %layer.digest(), queued, "prefetching from the profile");
    }
}

fn layer_usage(layer: &RemoteLayer) -> (i64, i64) {
    let index = layer.index();
    (index.file_bytes() as i64, index.nodes().len() as i64)
}
