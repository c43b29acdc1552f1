//! Lazy layers: from the labels of a `Prepare` to a FUSE mount of the layer.
//!
//! containerd (through CRI, or `sluice pull`) labels the `Prepare` of each
//! layer with the image reference, the manifest digest and the layer digest.
//! The image is resolved once (manifest, lazy twins) and cached for a short
//! while, since its layers arrive one `Prepare` after another; the layer's
//! lazy form is opened (TOC fetched and verified) and mounted read-only with
//! the puller's FUSE filesystem at the snapshot's `fs` directory.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sluice_format::Digest;
use sluice_puller::fs::FsOptions;
use sluice_puller::image::{self, ResolvedImage};
use sluice_puller::metrics::PullerMetrics;
use sluice_puller::prefetch::Prefetcher;
use sluice_puller::profile::{self, Profile};
use sluice_puller::trace::AccessTracer;
use sluice_puller::{ChunkCache, ImageRef, LayerOptions, RegistryClient, RemoteLayer};

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
    Lazy(Box<RemoteSource>),
    /// Needs a full pull; the reason is logged and counted.
    Full(String),
}

struct Mounted {
    // Dropping the session unmounts; keep the layer alive as long.
    _session: fuser::BackgroundSession,
    layer: Arc<RemoteLayer>,
}

/// Options of the lazy mounts.
#[derive(Debug, Clone)]
pub struct RemoteOptions {
    pub fs: FsOptions,
    pub read_deadline: Duration,
    /// See [`LayerOptions::fetch_ahead`].
    pub fetch_ahead: u64,
}

/// What the daemon does with prefetch profiles.
pub struct Profiles {
    /// Records accesses of mounted layers (`None`: not recording).
    pub tracer: Option<Arc<AccessTracer>>,
    /// Prefetches from the newest profile of an image (`None`: off).
    pub prefetcher: Option<Prefetcher>,
}

/// When a profile was looked up, and what was found.
type KnownProfile = (Instant, Option<Arc<Profile>>);

/// A layer being opened ahead of its `Prepare` (see
/// [`RemoteLayers::open_ahead`]): the slot its result lands in, locked until
/// then.
type OpeningLayer = Arc<tokio::sync::Mutex<Option<Result<RemoteLayer, String>>>>;

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
}

impl RemoteLayers {
    pub fn new(
        client: Arc<RegistryClient>,
        cache: Arc<ChunkCache>,
        metrics: Arc<PullerMetrics>,
        runtime: tokio::runtime::Handle,
        mut options: RemoteOptions,
        profiles: Profiles,
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
        }
    }

    pub fn client(&self) -> &Arc<RegistryClient> {
        &self.client
    }

    /// The newest profile of the image `image` (pinned by digest), fetched
    /// once a minute at most.
    async fn profile_of(&self, image: &ImageRef) -> Option<Arc<Profile>> {
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
                let opened = RemoteLayer::open(client, image, &lazy, cache, opts).await;
                *result = Some(opened.map_err(|e| e.to_string()));
                drop(result);
                // Not taken by a mount (the pull stopped, or fell back to a
                // full pull): its index is not kept for nothing.
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

    /// Opens the lazy blob `lazy` of `image`: takes it from [`Self::open_ahead`]
    /// if it was opened there, else fetches its TOC now.
    async fn open_layer(
        &self,
        image: &ImageRef,
        lazy: &sluice_format::oci::Descriptor,
    ) -> Result<RemoteLayer, String> {
        let ahead = self
            .opening
            .lock()
            .expect("opening layers")
            .remove(&lazy.digest);
        if let Some((_, slot)) = ahead {
            match slot.lock().await.take() {
                Some(Ok(layer)) if layer.image() == image => {
                    self.metrics.layers_opened_ahead.inc();
                    return Ok(layer);
                }
                Some(Err(e)) => {
                    tracing::debug!(layer = %lazy.digest, "opening ahead failed, opening again: {e}")
                }
                _ => {}
            }
        }
        RemoteLayer::open(
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
            Some(lazy) => Lookup::Lazy(Box::new(RemoteSource {
                image: pinned.to_string(),
                layer: layer.original.clone(),
                lazy: lazy.clone(),
            })),
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
        &self,
        id: u64,
        mountpoint: &Path,
        source: &RemoteSource,
        prefetch: bool,
    ) -> Result<(i64, i64), RemoteError> {
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
        let profile = async {
            match prefetch {
                true => self.profile_of(&image).await,
                false => None,
            }
        };
        let (layer, profile) = tokio::join!(self.open_layer(&image, &source.lazy), profile);
        let layer = Arc::new(layer.map_err(err)?);
        self.metrics.track(&layer);
        let usage = layer_usage(&layer);
        let (l, rt, mp, fs) = (
            layer.clone(),
            self.runtime.clone(),
            mountpoint.to_path_buf(),
            self.options.fs.clone(),
        );
        let session = tokio::task::spawn_blocking(move || sluice_puller::fs::mount(l, rt, &mp, fs))
            .await
            .map_err(|e| err(format!("mount task: {e}")))?
            .map_err(|e| err(format!("mounting at {}: {e}", mountpoint.display())))?;
        if let Some(t) = &self.profiles.tracer {
            t.layer_mounted(mountpoint, layer.clone(), image.clone());
        }
        // (A profile is only looked up where there is a prefetcher.)
        if let (Some(p), Some(prefetcher)) = (profile, &self.profiles.prefetcher) {
            // The TOCs of this image's layers above, still being fetched
            // ahead, are on the pull's path and the container waits for the
            // pull: this layer's prefetch goes after them rather than share
            // the link with them (python3-large at 100 Mbit/s: a 3.5 MB TOC
            // beside four prefetch ranges).
            let pending: Vec<OpeningLayer> = self
                .opening
                .lock()
                .expect("opening layers")
                .values()
                .filter(|(i, _)| *i == image)
                .map(|(_, slot)| slot.clone())
                .collect();
            if pending.is_empty() {
                queue_profile(prefetcher, &p, &layer);
            } else {
                let prefetcher = prefetcher.clone();
                let layer = Arc::downgrade(&layer);
                self.runtime.spawn(async move {
                    let tocs = async {
                        for slot in pending {
                            drop(slot.lock().await);
                        }
                    };
                    let _ = tokio::time::timeout(PREFETCH_AFTER_TOCS_MAX, tocs).await;
                    // Not for a layer unmounted meanwhile.
                    if let Some(layer) = layer.upgrade() {
                        queue_profile(&prefetcher, &p, &layer);
                    }
                });
            }
        }
        self.mounts.lock().expect("mounts").insert(
            id,
            Mounted {
                _session: session,
                layer,
            },
        );
        Ok(usage)
    }

    pub fn is_mounted(&self, id: u64) -> bool {
        self.mounts.lock().expect("mounts").contains_key(&id)
    }

    /// Unmounts snapshot `id`'s layer, if mounted.
    pub fn unmount(&self, id: u64) {
        let m = self.mounts.lock().expect("mounts").remove(&id);
        if let Some(m) = &m {
            if let Some(t) = &self.profiles.tracer {
                t.layer_unmounted(&m.layer);
            }
            if let Some(p) = &self.profiles.prefetcher {
                p.cancel(m.layer.digest());
            }
        }
        drop(m);
    }

    /// Unmounts everything (daemon shutdown).
    pub fn unmount_all(&self) {
        let all: Vec<_> = self.mounts.lock().expect("mounts").drain().collect();
        drop(all);
    }

    /// Drops cached chunks and TOCs that no mounted layer uses (after
    /// containerd removed images). Returns the bytes freed.
    pub fn clean_cache(&self) -> u64 {
        let mounts = self.mounts.lock().expect("mounts");
        let keep: std::collections::HashSet<&Digest> =
            mounts.values().flat_map(|m| m.layer.cache_keys()).collect();
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
