//! Garbage collection: remove blobs no manifest references.
//!
//! Safe to run while the registry serves traffic:
//! - GC holds `gc.lock` exclusively while it marks and sweeps; every operation
//!   that makes a blob reachable (finishing an upload, a mount, a manifest push)
//!   holds it shared and sets the blob's mtime to now, so GC either sees the
//!   manifest that references the blob or a fresh mtime;
//! - blobs younger than the grace period are never removed, which protects blobs
//!   pushed ahead of the manifest that will reference them;
//! - upload sessions are never touched unless abandoned for longer than
//!   `upload_max_age`.
//!
//! Reachable: every manifest linked in any repository (tagged or not), and the
//! config, layers and child manifests it names.

use std::collections::HashSet;
use std::fs;
use std::path::Path;
use std::time::{Duration, SystemTime};

use sluice_format::oci::Manifest;
use sluice_format::Digest;

use crate::storage::fs::{list_names, read_blob_sync, FsStorage};
use crate::storage::StorageError;

#[derive(Debug, Clone)]
pub struct GcOptions {
    /// Report what would be removed without removing it.
    pub dry_run: bool,
    /// Blobs modified more recently than this are kept.
    pub grace: Duration,
    /// Upload sessions idle for longer than this are removed.
    pub upload_max_age: Duration,
}

impl Default for GcOptions {
    fn default() -> Self {
        GcOptions {
            dry_run: false,
            grace: Duration::from_secs(3600),
            upload_max_age: Duration::from_secs(24 * 3600),
        }
    }
}

#[derive(Debug, Default)]
pub struct GcReport {
    pub manifests: usize,
    pub blobs_kept: usize,
    pub blobs_removed: Vec<Digest>,
    pub bytes_removed: u64,
    pub kept_by_grace: usize,
    pub uploads_removed: usize,
}

fn age(meta: &fs::Metadata, now: SystemTime) -> Duration {
    meta.modified()
        .ok()
        .and_then(|m| now.duration_since(m).ok())
        .unwrap_or_default()
}

/// Runs one collection over the storage at `root`.
pub fn collect(root: &Path, opts: &GcOptions) -> Result<GcReport, StorageError> {
    // Not `FsStorage::open`: that clears staged writes, which belong to a
    // registry that may be serving right now.
    let blobs_dir = root.join("blobs");
    if !blobs_dir.is_dir() {
        return Err(StorageError::Io {
            op: "open storage root",
            path: root.to_owned(),
            source: std::io::Error::new(
                std::io::ErrorKind::NotFound,
                "no blobs/ folder: not a sluice-registry root",
            ),
        });
    }
    let lock_path = root.join("gc.lock");
    let lock = fs::File::open(&lock_path).map_err(|source| StorageError::Io {
        op: "open",
        path: lock_path.clone(),
        source,
    })?;
    lock.lock().map_err(|source| StorageError::Io {
        op: "lock",
        path: lock_path,
        source,
    })?;

    let mut report = GcReport::default();
    let (reachable, repos) = mark(root, &mut report)?;
    let now = SystemTime::now();
    let blobs = root.join("blobs");
    for alg in list_names(&blobs)? {
        for prefix in list_names(&blobs.join(&alg))? {
            let dir = blobs.join(&alg).join(&prefix);
            for hex in list_names(&dir)? {
                let Ok(digest) = format!("{alg}:{hex}").parse::<Digest>() else {
                    continue;
                };
                if reachable.contains(&digest) {
                    report.blobs_kept += 1;
                    continue;
                }
                let path = dir.join(&hex);
                let Ok(meta) = fs::metadata(&path) else {
                    continue;
                };
                if age(&meta, now) < opts.grace {
                    report.kept_by_grace += 1;
                    continue;
                }
                report.bytes_removed += meta.len();
                if !opts.dry_run {
                    fs::remove_file(&path).map_err(|source| StorageError::Io {
                        op: "remove",
                        path: path.clone(),
                        source,
                    })?;
                    for repo in &repos {
                        let link = FsStorage::repo_dir(root, repo)
                            .join("_layers")
                            .join(&alg)
                            .join(&hex);
                        let _ = fs::remove_file(link);
                    }
                }
                report.blobs_removed.push(digest);
            }
        }
    }

    let uploads = root.join("uploads");
    for id in list_names(&uploads)? {
        let data = uploads.join(&id).join("data");
        let idle = fs::metadata(&data)
            .map(|m| age(&m, now))
            .unwrap_or(opts.upload_max_age);
        if idle >= opts.upload_max_age {
            report.uploads_removed += 1;
            if !opts.dry_run {
                let _ = fs::remove_dir_all(uploads.join(&id));
            }
        }
    }
    drop(lock);
    Ok(report)
}

/// Every digest reachable from a linked manifest, and the repository names.
fn mark(
    root: &Path,
    report: &mut GcReport,
) -> Result<(HashSet<Digest>, Vec<String>), StorageError> {
    let mut repos = Vec::new();
    FsStorage::walk_repos(&root.join("repos"), "", &mut repos)?;
    let mut reachable = HashSet::new();
    for repo in &repos {
        let revisions = FsStorage::repo_dir(root, repo).join("_manifests/revisions");
        for alg in list_names(&revisions)? {
            for hex in list_names(&revisions.join(&alg))? {
                let Ok(d) = format!("{alg}:{hex}").parse::<Digest>() else {
                    continue;
                };
                report.manifests += 1;
                if let Some(bytes) = read_blob_sync(root, &d, 64 << 20)? {
                    if let Ok(m) = Manifest::parse(&bytes) {
                        for r in m.blob_references().chain(m.manifest_references()) {
                            reachable.insert(r.digest.clone());
                        }
                    }
                }
                reachable.insert(d);
            }
        }
    }
    Ok((reachable, repos))
}
