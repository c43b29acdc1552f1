//! containerd's Snapshots gRPC service over [`Snapshotter`], with the remote
//! path: a `Prepare` labelled with a target and a lazy-capable layer mounts
//! the layer, commits it under the target and answers `AlreadyExists`, which
//! tells containerd to skip fetching and unpacking it.

use std::collections::BTreeMap;
use std::pin::Pin;
use std::sync::Arc;

use tokio_stream::Stream;
use tonic::{Request, Response, Status};

use crate::api::snapshots::snapshots_server::Snapshots;
use crate::api::snapshots::{self as pb, *};
use crate::error::SnapshotError;
use crate::filters::Filter;
use crate::metadata::Kind;
use crate::metrics::SnapshotterMetrics;
use crate::remote::{LayerRequest, Lookup, MountStart, RemoteLayers, LABEL_REMOTE, LABEL_TARGET};
use crate::snapshots::{Info as SnapInfo, Snapshotter};

/// The service: shared by every connection.
#[derive(Clone)]
pub struct SnapshotService {
    core: Arc<Snapshotter>,
    remote: Option<Arc<RemoteLayers>>,
    metrics: Arc<SnapshotterMetrics>,
}

/// Runs blocking metadata and filesystem work off the async workers.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, SnapshotError> + Send + 'static,
) -> Result<T, SnapshotError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| SnapshotError::Store(format!("worker task failed: {e}")))?
}

fn timestamp(nanos: u64) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: (nanos / 1_000_000_000) as i64,
        nanos: (nanos % 1_000_000_000) as i32,
    }
}

fn to_info(i: SnapInfo) -> Info {
    let kind = match i.record.kind {
        Kind::View => pb::Kind::View,
        Kind::Active => pb::Kind::Active,
        Kind::Committed => pb::Kind::Committed,
    };
    Info {
        name: i.name,
        parent: i.record.parent.unwrap_or_default(),
        kind: kind as i32,
        created_at: Some(timestamp(i.record.created)),
        updated_at: Some(timestamp(i.record.updated)),
        labels: i.record.labels.into_iter().collect(),
    }
}

fn labels(l: std::collections::HashMap<String, String>) -> BTreeMap<String, String> {
    l.into_iter().collect()
}

impl SnapshotService {
    pub fn new(
        core: Arc<Snapshotter>,
        remote: Option<Arc<RemoteLayers>>,
        metrics: Arc<SnapshotterMetrics>,
    ) -> Self {
        SnapshotService {
            core,
            remote,
            metrics,
        }
    }

    /// The remote path. `Ok(true)`: the target exists now (mounted lazily,
    /// or earlier); `Ok(false)`: not asked for; `Err`: why the layer must be
    /// pulled in full.
    async fn prepare_remote(
        &self,
        key: &str,
        parent: &str,
        labels: &BTreeMap<String, String>,
        target: &str,
    ) -> Result<bool, String> {
        let Some(remote) = &self.remote else {
            return Err("lazy mounts are disabled in the configuration".into());
        };
        let req = match LayerRequest::from_labels(labels) {
            Ok(Some(r)) => r,
            Ok(None) => return Ok(false),
            Err(e) => return Err(e.to_string()),
        };
        // Another namespace (or an earlier pull) may have made it already.
        let core = self.core.clone();
        let t = target.to_owned();
        if let Ok(existing) = blocking(move || core.stat(&t)).await {
            if existing.record.kind == Kind::Committed
                && existing.record.parent.as_deref().unwrap_or("") == parent
            {
                return Ok(true);
            }
            return Err(format!(
                "a different snapshot named {target} exists (parent {:?})",
                existing.record.parent
            ));
        }
        let (source, top_of) = match remote.lookup(&req).await.map_err(|e| e.to_string())? {
            Lookup::Lazy { source, top_of } => (*source, top_of),
            Lookup::Full(reason) => return Err(reason),
        };
        // The top layer of an image starts its command's files (without a
        // profile): they are found in the lazy layers below it too.
        let command = match top_of {
            Some(config) if !parent.is_empty() => {
                let (core, p) = (self.core.clone(), parent.to_owned());
                let chain = blocking(move || core.ancestors(Some(&p)))
                    .await
                    .unwrap_or_default();
                let lowers = chain
                    .iter()
                    .filter(|(_, r)| r.remote.is_some())
                    .map(|(_, r)| r.id)
                    .collect();
                Some((config, lowers))
            }
            Some(config) => Some((config, Vec::new())),
            None => None,
        };

        let core = self.core.clone();
        let (k, p, l) = (key.to_owned(), parent.to_owned(), labels.clone());
        let record = blocking(move || core.create(Kind::Active, &k, &p, l))
            .await
            .map_err(|e| e.to_string())?;
        let undo = |core: Arc<Snapshotter>, remote: Arc<RemoteLayers>, key: String, id: u64| async move {
            remote.unmount(id);
            let _ = blocking(move || {
                let _ = core.remove(&key);
                core.remove_dirs(id)
            })
            .await;
        };
        // Answered once the TOC is verified; the layer's index is built
        // while containerd goes on (see `RemoteLayers::mount_early`), and
        // its usage recorded when known.
        let usage = match remote
            .mount_early(
                record.id,
                &self.core.fs_dir(record.id),
                &source,
                MountStart {
                    prefetch: true,
                    command,
                },
            )
            .await
        {
            Ok(u) => u,
            Err(e) => {
                undo(self.core.clone(), remote.clone(), key.to_owned(), record.id).await;
                return Err(e.to_string());
            }
        };
        let mut committed_labels = labels.clone();
        committed_labels.insert(LABEL_REMOTE.into(), "sluice".into());
        let core = self.core.clone();
        let (k, t) = (key.to_owned(), target.to_owned());
        let src = source.clone();
        match blocking(move || core.commit(&t, &k, committed_labels, Some((src, (0, 0))))).await {
            Ok(_) => {
                let (core, t) = (self.core.clone(), target.to_owned());
                tokio::spawn(async move {
                    if let Ok(Ok(usage)) = usage.await {
                        let name = t.clone();
                        if let Err(e) = blocking(move || core.set_usage(&name, usage)).await {
                            tracing::debug!(snapshot = %t, "recording the lazy layer's usage: {e}");
                        }
                    }
                });
                self.metrics.lazy_mounts.set(remote.mounted() as i64);
                tracing::info!(
                    image = %source.image,
                    layer = %source.layer.digest,
                    lazy_blob = %source.lazy.digest,
                    snapshot = target,
                    "layer mounted lazily"
                );
                Ok(true)
            }
            Err(e) => {
                undo(self.core.clone(), remote.clone(), key.to_owned(), record.id).await;
                // A concurrent Prepare of the same layer won the race: fine.
                let core = self.core.clone();
                let t = target.to_owned();
                if let Ok(existing) = blocking(move || core.stat(&t)).await {
                    if existing.record.kind == Kind::Committed
                        && existing.record.parent.as_deref().unwrap_or("") == parent
                    {
                        return Ok(true);
                    }
                }
                Err(format!("committing the lazy snapshot: {e}"))
            }
        }
    }
}

impl SnapshotService {
    /// Makes sure every lazy layer below `parent` is mounted before mounts
    /// that stack on it are handed out: an unmounted layer would show up as
    /// an empty directory, i.e. silently missing files. A layer that could
    /// not be mounted at start (say, the registry was down and its TOC was
    /// not cached) is mounted now, or the request fails.
    async fn ensure_lower_mounted(&self, parent: &str) -> Result<(), Status> {
        let Some(remote) = &self.remote else {
            return Ok(());
        };
        if parent.is_empty() {
            return Ok(());
        }
        let core = self.core.clone();
        let p = parent.to_owned();
        let chain = blocking(move || core.ancestors(Some(&p))).await?;
        // The lazy layers of the chain, the top one first: each is told the
        // ones below it (a Python module's imports are looked for there).
        let lazy: Vec<u64> = chain
            .iter()
            .filter(|(_, r)| r.remote.is_some())
            .map(|(_, r)| r.id)
            .collect();
        for (name, record) in chain {
            let Some(src) = &record.remote else { continue };
            if remote.is_mounted(record.id) {
                continue;
            }
            remote
                .mount(record.id, &self.core.fs_dir(record.id), src, false)
                .await
                .map_err(|e| {
                    Status::unavailable(format!(
                        "lazy layer {name} is not mounted and mounting it failed: {e}"
                    ))
                })?;
            self.metrics.lazy_mounts.set(remote.mounted() as i64);
            tracing::info!(snapshot = %name, "lazy layer mounted on demand");
        }
        remote.stack(&lazy);
        Ok(())
    }
}

type ListStream = Pin<Box<dyn Stream<Item = Result<ListSnapshotsResponse, Status>> + Send>>;

#[tonic::async_trait]
impl Snapshots for SnapshotService {
    async fn prepare(
        &self,
        request: Request<PrepareSnapshotRequest>,
    ) -> Result<Response<PrepareSnapshotResponse>, Status> {
        let r = request.into_inner();
        let labels = labels(r.labels);
        if let Some(target) = labels.get(LABEL_TARGET).cloned() {
            let t0 = std::time::Instant::now();
            let remote = self
                .prepare_remote(&r.key, &r.parent, &labels, &target)
                .await;
            tracing::debug!(key = %r.key, snapshot = %target, ms = t0.elapsed().as_millis() as u64, lazy = ?remote, "prepare of a layer");
            match remote {
                Ok(true) => {
                    self.metrics.count_layer("lazy");
                    return Err(Status::already_exists(format!(
                        "target snapshot {target}: already exists (mounted lazily)"
                    )));
                }
                Ok(false) => {}
                Err(reason) => {
                    self.metrics.count_layer("full");
                    tracing::warn!(
                        key = %r.key,
                        snapshot = %target,
                        image = labels.get(crate::remote::LABEL_IMAGE_REF).map(String::as_str).unwrap_or(""),
                        layer = labels.get(crate::remote::LABEL_LAYER_DIGEST).map(String::as_str).unwrap_or(""),
                        "layer will be pulled in full: {reason}"
                    );
                }
            }
        }
        self.ensure_lower_mounted(&r.parent).await?;
        let core = self.core.clone();
        let mounts = blocking(move || {
            let rec = core.create(Kind::Active, &r.key, &r.parent, labels)?;
            core.mounts_of(&rec)
        })
        .await?;
        Ok(Response::new(PrepareSnapshotResponse { mounts }))
    }

    async fn view(
        &self,
        request: Request<ViewSnapshotRequest>,
    ) -> Result<Response<ViewSnapshotResponse>, Status> {
        let r = request.into_inner();
        self.ensure_lower_mounted(&r.parent).await?;
        let core = self.core.clone();
        let mounts = blocking(move || {
            let rec = core.create(Kind::View, &r.key, &r.parent, labels(r.labels))?;
            core.mounts_of(&rec)
        })
        .await?;
        Ok(Response::new(ViewSnapshotResponse { mounts }))
    }

    async fn mounts(
        &self,
        request: Request<MountsRequest>,
    ) -> Result<Response<MountsResponse>, Status> {
        let key = request.into_inner().key;
        let core = self.core.clone();
        let k = key.clone();
        let parent = blocking(move || core.stat(&k))
            .await?
            .record
            .parent
            .unwrap_or_default();
        self.ensure_lower_mounted(&parent).await?;
        let core = self.core.clone();
        let mounts = blocking(move || core.mounts(&key)).await?;
        Ok(Response::new(MountsResponse { mounts }))
    }

    async fn commit(
        &self,
        request: Request<CommitSnapshotRequest>,
    ) -> Result<Response<()>, Status> {
        let r = request.into_inner();
        let core = self.core.clone();
        blocking(move || core.commit(&r.name, &r.key, labels(r.labels), None)).await?;
        Ok(Response::new(()))
    }

    async fn remove(
        &self,
        request: Request<RemoveSnapshotRequest>,
    ) -> Result<Response<()>, Status> {
        let key = request.into_inner().key;
        let core = self.core.clone();
        let k = key.clone();
        let record = blocking(move || core.remove(&k)).await?;
        if let (Some(remote), Some(src)) = (&self.remote, &record.remote) {
            remote.unmount(record.id);
            self.metrics.lazy_mounts.set(remote.mounted() as i64);
            tracing::info!(snapshot = %key, layer = %src.layer.digest, "lazy layer unmounted");
        }
        let core = self.core.clone();
        blocking(move || core.remove_dirs(record.id)).await?;
        Ok(Response::new(()))
    }

    async fn stat(
        &self,
        request: Request<StatSnapshotRequest>,
    ) -> Result<Response<StatSnapshotResponse>, Status> {
        let key = request.into_inner().key;
        let core = self.core.clone();
        let info = blocking(move || core.stat(&key)).await?;
        Ok(Response::new(StatSnapshotResponse {
            info: Some(to_info(info)),
        }))
    }

    async fn update(
        &self,
        request: Request<UpdateSnapshotRequest>,
    ) -> Result<Response<UpdateSnapshotResponse>, Status> {
        let r = request.into_inner();
        let info = r
            .info
            .ok_or_else(|| Status::invalid_argument("update without snapshot info"))?;
        let paths = r.update_mask.map(|m| m.paths).unwrap_or_default();
        let core = self.core.clone();
        let updated =
            blocking(move || core.update(&info.name, labels(info.labels), &paths)).await?;
        Ok(Response::new(UpdateSnapshotResponse {
            info: Some(to_info(updated)),
        }))
    }

    type ListStream = ListStream;

    async fn list(
        &self,
        request: Request<ListSnapshotsRequest>,
    ) -> Result<Response<Self::ListStream>, Status> {
        let filter = Filter::parse_all(&request.into_inner().filters)?;
        let core = self.core.clone();
        let infos = blocking(move || core.list(&filter)).await?;
        // Batches keep each message small, as containerd's own server does.
        let batches: Vec<Result<ListSnapshotsResponse, Status>> = infos
            .chunks(100)
            .map(|c| {
                Ok(ListSnapshotsResponse {
                    info: c.iter().cloned().map(to_info).collect(),
                })
            })
            .collect();
        Ok(Response::new(Box::pin(tokio_stream::iter(batches))))
    }

    async fn usage(
        &self,
        request: Request<UsageRequest>,
    ) -> Result<Response<UsageResponse>, Status> {
        let key = request.into_inner().key;
        let core = self.core.clone();
        let (size, inodes) = blocking(move || core.usage(&key)).await?;
        Ok(Response::new(UsageResponse { size, inodes }))
    }

    async fn cleanup(&self, _request: Request<CleanupRequest>) -> Result<Response<()>, Status> {
        let core = self.core.clone();
        let removed = blocking(move || core.cleanup()).await?;
        if removed > 0 {
            tracing::info!(removed, "cleanup removed unreferenced snapshot directories");
        }
        if let Some(remote) = self.remote.clone() {
            let freed = tokio::task::spawn_blocking(move || remote.clean_cache())
                .await
                .unwrap_or(0);
            if freed > 0 {
                tracing::info!(
                    freed_bytes = freed,
                    "cleanup dropped cached chunks no mounted layer uses"
                );
            }
        }
        Ok(Response::new(()))
    }
}
