//! `sluice pull`: pulls an image into containerd through the sluice
//! snapshotter, the way `ctr-remote image rpull` does for stargz.
//!
//! containerd's own pull never tells a snapshotter which image a layer comes
//! from, so this drives containerd's services directly, inside a lease (so
//! its garbage collector leaves the half-pulled image alone):
//! 1. the manifest and config go into containerd's content store, labelled
//!    so that the garbage collector sees what they reference;
//! 2. each layer is `Prepare`d on the `sluice` snapshotter with its chain ID
//!    as target and the image, manifest and layer digests as labels. The
//!    snapshotter mounts lazy layers itself and answers `AlreadyExists`;
//!    for any other layer it returns mounts, and this command fetches the
//!    blob into the content store and has containerd's differ unpack it,
//!    then commits the snapshot (the fallback: a normal full pull);
//! 3. the image record is created (or updated), so that
//!    `ctr run --snapshotter sluice IMAGE` starts at once.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use containerd_client::services::v1::snapshots::snapshots_client::SnapshotsClient;
use containerd_client::services::v1::snapshots::{
    CommitSnapshotRequest, PrepareSnapshotRequest, RemoveSnapshotRequest, StatSnapshotRequest,
};
use containerd_client::services::v1::{
    content_client::ContentClient, diff_client::DiffClient, images_client::ImagesClient,
    leases_client::LeasesClient, ApplyRequest, CreateImageRequest, CreateRequest as CreateLease,
    DeleteRequest as DeleteLease, Image, Info as ContentInfo, UpdateImageRequest,
    UpdateRequest as UpdateContent, WriteAction, WriteContentRequest,
};
use containerd_client::tonic::transport::Channel;
use containerd_client::tonic::{Code, Request, Status};
use containerd_client::types::Descriptor as CDescriptor;
use sluice_format::oci::{Descriptor, ImageConfig};
use sluice_format::Digest;

use crate::image::{self, ImageManifest};
use crate::registry::{ImageRef, RegistryClient};

/// Labels the snapshotter reads on `Prepare` (containerd's CRI names).
pub const LABEL_TARGET: &str = "containerd.io/snapshot.ref";
pub const LABEL_IMAGE_REF: &str = "containerd.io/snapshot/cri.image-ref";
pub const LABEL_LAYER_DIGEST: &str = "containerd.io/snapshot/cri.layer-digest";
pub const LABEL_MANIFEST_DIGEST: &str = "containerd.io/snapshot/cri.manifest-digest";

/// Bytes per content-store write message.
const WRITE_PIECE: u64 = 4 << 20;

#[derive(Debug, Clone)]
pub struct PullOptions {
    /// containerd's gRPC socket.
    pub address: PathBuf,
    pub namespace: String,
    pub snapshotter: String,
}

impl Default for PullOptions {
    fn default() -> Self {
        PullOptions {
            address: "/run/containerd/containerd.sock".into(),
            namespace: "default".into(),
            snapshotter: "sluice".into(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PullError {
    #[error("connecting to containerd at {address}: {reason}")]
    Connect { address: String, reason: String },
    #[error("{image}: {reason}")]
    Image { image: String, reason: String },
    #[error(transparent)]
    Resolve(#[from] crate::image::ImageError),
    #[error("{image}, layer {layer}: {reason}")]
    Layer {
        image: String,
        layer: String,
        reason: String,
    },
    #[error("containerd {call}: {status}")]
    Containerd { call: &'static str, status: Status },
}

fn cd(call: &'static str) -> impl FnOnce(Status) -> PullError {
    move |status| PullError::Containerd { call, status }
}

/// How one layer got into the snapshotter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LayerPath {
    /// Mounted lazily by the snapshotter.
    Lazy,
    /// Fetched in full and unpacked by containerd.
    Full,
    /// The snapshot existed already.
    Present,
}

/// Progress of a pull, one event per layer.
#[derive(Debug, Clone)]
pub struct LayerEvent {
    pub index: usize,
    pub count: usize,
    pub layer: Descriptor,
    pub path: LayerPath,
    pub seconds: f64,
}

#[derive(Debug, Clone, Default)]
pub struct PullReport {
    pub image: String,
    pub manifest: String,
    pub layers: usize,
    pub lazy: usize,
    pub full: usize,
    pub present: usize,
    /// Bytes this command fetched from the registry (manifest, config and
    /// layers pulled in full; lazy layers fetch on demand in the daemon).
    pub fetched_bytes: u64,
    pub seconds: f64,
}

/// The chain IDs of a layer stack (OCI image spec).
pub fn chain_ids(diff_ids: &[Digest]) -> Vec<Digest> {
    let mut out: Vec<Digest> = Vec::with_capacity(diff_ids.len());
    for d in diff_ids {
        let next = match out.last() {
            None => d.clone(),
            Some(prev) => Digest::sha256(format!("{prev} {d}").as_bytes()),
        };
        out.push(next);
    }
    out
}

struct Containerd {
    channel: Channel,
    namespace: String,
    lease: Option<String>,
}

impl Containerd {
    fn req<T>(&self, msg: T) -> Request<T> {
        let mut r = Request::new(msg);
        let md = r.metadata_mut();
        if let Ok(v) = self.namespace.parse() {
            md.insert("containerd-namespace", v);
        }
        if let Some(l) = self.lease.as_ref().and_then(|l| l.parse().ok()) {
            md.insert("containerd-lease", l);
        }
        r
    }

    /// Stores a blob in the content store with `labels`; if it is there
    /// already, only sets the labels. `data` yields the bytes in order.
    async fn put_content(
        &self,
        desc: &Descriptor,
        labels: HashMap<String, String>,
        mut next_piece: impl AsyncPieces,
    ) -> Result<(), PullError> {
        let mut content = ContentClient::new(self.channel.clone());
        let (tx, rx) = tokio::sync::mpsc::channel::<WriteContentRequest>(2);
        let write_ref = format!("sluice-pull-{}", desc.digest);
        let call = content.write(self.req(tokio_stream::wrappers::ReceiverStream::new(rx)));
        let base = WriteContentRequest {
            r#ref: write_ref,
            total: desc.size as i64,
            expected: desc.digest.to_string(),
            ..Default::default()
        };
        let feed = async {
            let mut offset = 0u64;
            loop {
                let piece = next_piece.next(offset).await?;
                let last = piece.is_none();
                let data = piece.unwrap_or_default();
                let msg = WriteContentRequest {
                    action: if last {
                        WriteAction::Commit
                    } else {
                        WriteAction::Write
                    } as i32,
                    offset: offset as i64,
                    data: data.to_vec(),
                    labels: if last { labels.clone() } else { HashMap::new() },
                    ..base.clone()
                };
                offset += data.len() as u64;
                if tx.send(msg).await.is_err() || last {
                    break;
                }
            }
            drop(tx);
            Ok::<_, PullError>(())
        };
        let drain = async {
            let mut responses = call.await?.into_inner();
            while responses.message().await?.is_some() {}
            Ok::<_, Status>(())
        };
        let (fed, drained) = tokio::join!(feed, drain);
        match drained {
            Ok(()) => fed,
            Err(s) if s.code() == Code::AlreadyExists => {
                // Present already: make sure it carries our labels.
                let paths = labels.keys().map(|k| format!("labels.{k}")).collect();
                ContentClient::new(self.channel.clone())
                    .update(self.req(UpdateContent {
                        info: Some(ContentInfo {
                            digest: desc.digest.to_string(),
                            labels,
                            ..Default::default()
                        }),
                        update_mask: Some(prost_types::FieldMask { paths }),
                    }))
                    .await
                    .map_err(cd("content update"))?;
                Ok(())
            }
            Err(s) => {
                fed?;
                Err(PullError::Containerd {
                    call: "content write",
                    status: s,
                })
            }
        }
    }
}

/// A source of a blob's bytes, piece by piece; `None` when done.
trait AsyncPieces {
    async fn next(&mut self, offset: u64) -> Result<Option<bytes::Bytes>, PullError>;
}

/// Bytes already in memory.
struct InMemory(Option<bytes::Bytes>);
impl AsyncPieces for InMemory {
    async fn next(&mut self, _offset: u64) -> Result<Option<bytes::Bytes>, PullError> {
        Ok(self.0.take())
    }
}

/// A blob fetched from the registry by ranges, counted.
struct Ranged<'a> {
    client: &'a RegistryClient,
    image: &'a ImageRef,
    desc: &'a Descriptor,
    fetched: &'a mut u64,
}
impl AsyncPieces for Ranged<'_> {
    async fn next(&mut self, offset: u64) -> Result<Option<bytes::Bytes>, PullError> {
        if offset >= self.desc.size {
            return Ok(None);
        }
        let end = (offset + WRITE_PIECE).min(self.desc.size);
        let b = self
            .client
            .blob_range(self.image, &self.desc.digest, offset..end, 0)
            .await
            .map_err(|e| PullError::Layer {
                image: self.image.to_string(),
                layer: self.desc.digest.to_string(),
                reason: e.to_string(),
            })?;
        *self.fetched += b.len() as u64;
        Ok(Some(b))
    }
}

fn cdesc(d: &Descriptor) -> CDescriptor {
    CDescriptor {
        media_type: d.media_type.clone(),
        digest: d.digest.to_string(),
        size: d.size as i64,
        annotations: d.annotations.clone().into_iter().collect(),
    }
}

fn now_nanos() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0)
}

/// Pulls `image` into containerd; `progress` sees each layer as it is done.
pub async fn pull(
    client: &RegistryClient,
    image: &ImageRef,
    options: &PullOptions,
    mut progress: impl FnMut(&LayerEvent),
) -> Result<PullReport, PullError> {
    let started = Instant::now();
    let channel = containerd_client::connect(&options.address)
        .await
        .map_err(|e| PullError::Connect {
            address: options.address.display().to_string(),
            reason: format!("{e} (is containerd running, and is this its socket?)"),
        })?;
    let mut ctd = Containerd {
        channel,
        namespace: options.namespace.clone(),
        lease: None,
    };
    // A lease with an expiry: if this command dies, containerd still cleans up.
    let expire = time::OffsetDateTime::now_utc() + Duration::from_secs(3600);
    let lease_id = format!("sluice-pull-{}", uuid::Uuid::new_v4());
    LeasesClient::new(ctd.channel.clone())
        .create(
            ctd.req(CreateLease {
                id: lease_id.clone(),
                labels: HashMap::from([(
                    "containerd.io/gc.expire".to_string(),
                    expire
                        .format(&time::format_description::well_known::Rfc3339)
                        .unwrap_or_default(),
                )]),
            }),
        )
        .await
        .map_err(cd("lease create"))?;
    ctd.lease = Some(lease_id.clone());
    tracing::debug!(
        ms = started.elapsed().as_millis() as u64,
        "connected, lease created"
    );
    let result = pull_in_lease(&ctd, client, image, options, &mut progress, started).await;
    ctd.lease = None;
    if let Err(e) = LeasesClient::new(ctd.channel.clone())
        .delete(ctd.req(DeleteLease {
            id: lease_id,
            sync: false,
        }))
        .await
    {
        tracing::warn!("deleting the pull lease: {e}");
    }
    result
}

async fn pull_in_lease(
    ctd: &Containerd,
    client: &RegistryClient,
    image: &ImageRef,
    options: &PullOptions,
    progress: &mut impl FnMut(&LayerEvent),
    started: Instant,
) -> Result<PullReport, PullError> {
    let image_err = |reason: String| PullError::Image {
        image: image.to_string(),
        reason,
    };
    let m: ImageManifest = image::fetch_manifest(client, image).await?;
    tracing::debug!(ms = started.elapsed().as_millis() as u64, digest = %m.digest, "manifest fetched");
    let config_bytes = client
        .blob(image, &m.config.digest)
        .await
        .map_err(|e| image_err(format!("config: {e}")))?;
    tracing::debug!(ms = started.elapsed().as_millis() as u64, "config fetched");
    let mut fetched = m.bytes.len() as u64;
    fetched += config_bytes.len() as u64;
    let config: ImageConfig = serde_json::from_slice(&config_bytes)
        .map_err(|e| image_err(format!("config {}: {e}", m.config.digest)))?;
    let layers: Vec<&Descriptor> = m.layers.iter().collect();
    if config.rootfs.diff_ids.len() != layers.len() {
        return Err(image_err(format!(
            "config lists {} diff IDs for {} layers",
            config.rootfs.diff_ids.len(),
            layers.len()
        )));
    }
    let chains = chain_ids(&config.rootfs.diff_ids);
    let manifest_ref = image.with_reference(m.digest.to_string());

    let mut snapshots = SnapshotsClient::new(ctd.channel.clone());
    let mut report = PullReport {
        image: image.to_string(),
        manifest: m.digest.to_string(),
        layers: layers.len(),
        ..Default::default()
    };
    // The layers are prepared one after the other (each on its parent); the
    // manifest and config go into the content store meanwhile rather than
    // after the last layer, where their writes (each a stream and a commit
    // in containerd) were on the pull's path. A pull that fails leaves them
    // to the garbage collector with its lease.
    let prepare_layers = async {
        for (i, layer) in layers.iter().enumerate() {
            let t0 = Instant::now();
            let chain = chains[i].to_string();
            let parent = if i == 0 {
                String::new()
            } else {
                chains[i - 1].to_string()
            };
            let exists = snapshots
                .stat(ctd.req(StatSnapshotRequest {
                    snapshotter: options.snapshotter.clone(),
                    key: chain.clone(),
                }))
                .await;
            let path = match exists {
                Ok(_) => LayerPath::Present,
                Err(s) if s.code() == Code::NotFound => {
                    let labels = HashMap::from([
                        (LABEL_TARGET.to_string(), chain.clone()),
                        (LABEL_IMAGE_REF.to_string(), image.to_string()),
                        (LABEL_LAYER_DIGEST.to_string(), layer.digest.to_string()),
                        (LABEL_MANIFEST_DIGEST.to_string(), m.digest.to_string()),
                    ]);
                    let key = format!("extract-{}-{chain}", now_nanos());
                    let prepared = snapshots
                        .prepare(ctd.req(PrepareSnapshotRequest {
                            snapshotter: options.snapshotter.clone(),
                            key: key.clone(),
                            parent: parent.clone(),
                            labels: labels.clone(),
                        }))
                        .await;
                    match prepared {
                        Err(s) if s.code() == Code::AlreadyExists => LayerPath::Lazy,
                        Err(s) => {
                            return Err(PullError::Layer {
                                image: image.to_string(),
                                layer: layer.digest.to_string(),
                                reason: format!(
                                    "prepare on snapshotter {}: {s}",
                                    options.snapshotter
                                ),
                            })
                        }
                        Ok(r) => {
                            let mounts = r.into_inner().mounts;
                            let unpacked = unpack_full(
                                ctd,
                                client,
                                &manifest_ref,
                                layer,
                                &config.rootfs.diff_ids[i],
                                mounts,
                                &mut fetched,
                            )
                            .await;
                            let committed = match unpacked {
                                Ok(()) => snapshots
                                    .commit(ctd.req(CommitSnapshotRequest {
                                        snapshotter: options.snapshotter.clone(),
                                        name: chain.clone(),
                                        key: key.clone(),
                                        labels,
                                    }))
                                    .await
                                    .map(|_| ())
                                    .or_else(|s| {
                                        if s.code() == Code::AlreadyExists {
                                            Ok(())
                                        } else {
                                            Err(PullError::Containerd {
                                                call: "snapshot commit",
                                                status: s,
                                            })
                                        }
                                    }),
                                Err(e) => Err(e),
                            };
                            if let Err(e) = committed {
                                let _ = snapshots
                                    .remove(ctd.req(RemoveSnapshotRequest {
                                        snapshotter: options.snapshotter.clone(),
                                        key,
                                    }))
                                    .await;
                                return Err(e);
                            }
                            LayerPath::Full
                        }
                    }
                }
                Err(s) => {
                    return Err(PullError::Containerd {
                        call: "snapshot stat",
                        status: s,
                    })
                }
            };
            tracing::debug!(ms = started.elapsed().as_millis() as u64, layer = %layer.digest, ?path, "layer done");
            match path {
                LayerPath::Lazy => report.lazy += 1,
                LayerPath::Full => report.full += 1,
                LayerPath::Present => report.present += 1,
            }
            progress(&LayerEvent {
                index: i,
                count: layers.len(),
                layer: (*layer).clone(),
                path,
                seconds: t0.elapsed().as_secs_f64(),
            });
        }
        Ok::<_, PullError>(())
    };
    let store_content = store_content(ctd, &m, config_bytes, &chains, &options.snapshotter);
    let (prepared, stored) = tokio::join!(prepare_layers, store_content);
    prepared?;
    let manifest_desc = stored?;
    tracing::debug!(
        ms = started.elapsed().as_millis() as u64,
        "layers and content done"
    );
    let record = Image {
        name: image.to_string(),
        target: Some(cdesc(&manifest_desc)),
        ..Default::default()
    };
    let mut images = ImagesClient::new(ctd.channel.clone());
    match images
        .create(ctd.req(CreateImageRequest {
            image: Some(record.clone()),
            source_date_epoch: None,
        }))
        .await
    {
        Ok(_) => {}
        Err(s) if s.code() == Code::AlreadyExists => {
            images
                .update(ctd.req(UpdateImageRequest {
                    image: Some(record),
                    update_mask: Some(prost_types::FieldMask {
                        paths: vec!["target".into()],
                    }),
                    source_date_epoch: None,
                }))
                .await
                .map_err(cd("image update"))?;
        }
        Err(s) => return Err(cd("image create")(s)),
    }
    tracing::debug!(
        ms = started.elapsed().as_millis() as u64,
        "image record written"
    );
    report.fetched_bytes = fetched;
    report.seconds = started.elapsed().as_secs_f64();
    Ok(report)
}

/// Puts the image's config and manifest into containerd's content store,
/// labelled so that its garbage collector sees what they reference; returns
/// the manifest's descriptor for the image record.
async fn store_content(
    ctd: &Containerd,
    m: &ImageManifest,
    config_bytes: bytes::Bytes,
    chains: &[Digest],
    snapshotter: &str,
) -> Result<Descriptor, PullError> {
    let gc_snapshot = format!("containerd.io/gc.ref.snapshot.{snapshotter}");
    let config_labels = HashMap::from([(
        gc_snapshot,
        chains.last().map(|c| c.to_string()).unwrap_or_default(),
    )]);
    ctd.put_content(&m.config, config_labels, InMemory(Some(config_bytes)))
        .await?;
    let mut manifest_labels = HashMap::from([(
        "containerd.io/gc.ref.content.config".to_string(),
        m.config.digest.to_string(),
    )]);
    for (i, l) in m.layers.iter().enumerate() {
        manifest_labels.insert(
            format!("containerd.io/gc.ref.content.l.{i}"),
            l.digest.to_string(),
        );
    }
    let media_type = m.manifest.media_type.clone().unwrap_or_else(|| {
        m.media_type
            .split(';')
            .next()
            .unwrap_or("")
            .trim()
            .to_owned()
    });
    let manifest_desc = Descriptor::new(media_type, m.digest.clone(), m.bytes.len() as u64);
    ctd.put_content(
        &manifest_desc,
        manifest_labels,
        InMemory(Some(m.bytes.clone())),
    )
    .await?;
    Ok(manifest_desc)
}

/// The fallback for a layer the snapshotter cannot mount lazily: fetch the
/// blob into the content store and let containerd's differ unpack it onto
/// the prepared mounts (containerd verifies digests and handles the tar).
async fn unpack_full(
    ctd: &Containerd,
    client: &RegistryClient,
    image: &ImageRef,
    layer: &Descriptor,
    diff_id: &Digest,
    mounts: Vec<containerd_client::types::Mount>,
    fetched: &mut u64,
) -> Result<(), PullError> {
    let labels = HashMap::from([(
        "containerd.io/uncompressed".to_string(),
        diff_id.to_string(),
    )]);
    ctd.put_content(
        layer,
        labels,
        Ranged {
            client,
            image,
            desc: layer,
            fetched,
        },
    )
    .await?;
    let applied = DiffClient::new(ctd.channel.clone())
        .apply(ctd.req(ApplyRequest {
            diff: Some(cdesc(layer)),
            mounts,
            payloads: HashMap::new(),
            sync_fs: false,
        }))
        .await
        .map_err(|s| PullError::Layer {
            image: image.to_string(),
            layer: layer.digest.to_string(),
            reason: format!("unpacking: {s}"),
        })?
        .into_inner()
        .applied
        .map(|d| d.digest)
        .unwrap_or_default();
    if applied != diff_id.to_string() {
        return Err(PullError::Layer {
            image: image.to_string(),
            layer: layer.digest.to_string(),
            reason: format!("unpacked to {applied}, but the config says {diff_id}"),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chain_ids_follow_the_image_spec() {
        let a = Digest::sha256(b"a");
        let b = Digest::sha256(b"b");
        let c = chain_ids(&[a.clone(), b.clone()]);
        assert_eq!(c[0], a);
        assert_eq!(c[1], Digest::sha256(format!("{a} {b}").as_bytes()));
        assert!(chain_ids(&[]).is_empty());
    }
}
