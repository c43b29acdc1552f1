//! Filesystem storage.
//!
//! ```text
//! ROOT/
//!   blobs/<alg>/<hex[..2]>/<hex>          content, immutable once renamed in
//!   uploads/<id>/data, uploads/<id>/repo  upload sessions in progress
//!   tmp/                                  staging for small atomic writes
//!   repos/<name>/_layers/<alg>/<hex>                   blob link (empty file)
//!   repos/<name>/_manifests/revisions/<alg>/<hex>      manifest link (media type)
//!   repos/<name>/_manifests/tags/<tag>                 tag (digest string)
//!   repos/<name>/_referrers/<alg>/<subject-hex>/<alg>-<hex>   referrer link
//!   repos/<name>/_twins/<alg>/<hex>                    lazy twin of a layer (descriptor JSON)
//!   gc.lock                               shared by writers, exclusive for GC
//! ```
//!
//! Every write goes to a temporary file on the same filesystem, is fsynced, then
//! renamed into place and its directory fsynced: a crash leaves either the old
//! state or the new, never a partial blob under a digest. Repository names are
//! validated before they get here ([`RepoName`]) and cannot contain `..` or begin
//! with `_`, so they cannot escape `repos/` or collide with the link folders.

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use bytes::Bytes;
use sluice_format::oci::Descriptor;
use sluice_format::{Algorithm, Digest, Hasher};
use tokio::io::{AsyncRead, AsyncReadExt};

use super::{
    BlobBody, ManifestReferences, Reference, Result, Storage, StorageError, StoredManifest,
    UploadStatus,
};
use crate::name::RepoName;

/// Upload bytes are copied in pieces of this size.
const COPY_BUF: usize = 256 * 1024;

struct UploadState {
    size: u64,
    /// Running SHA-256 of what was received; `None` after a restart or a failed
    /// write, in which case the data file is hashed again on finish.
    hasher: Option<Hasher>,
}

/// Upload id -> (owning repository, session state).
type UploadSession = (String, Arc<tokio::sync::Mutex<UploadState>>);

/// Registry storage in a local directory.
pub struct FsStorage {
    root: PathBuf,
    uploads: Mutex<HashMap<String, UploadSession>>,
}

fn io_ctx<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> StorageError + 'a {
    move |source| StorageError::Io {
        op,
        path: path.to_owned(),
        source,
    }
}

/// Runs blocking filesystem work off the async workers.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .unwrap_or_else(|e| Err(StorageError::Corrupt(format!("storage task failed: {e}"))))
}

fn not_found(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::NotFound
}

fn fsync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_ctx("fsync", dir))
}

/// Sets a file's mtime to now: marks a blob as recently needed, so that a
/// concurrent garbage collection spares it.
fn touch(path: &Path) -> Result<()> {
    let f = File::options()
        .write(true)
        .open(path)
        .map_err(io_ctx("touch", path))?;
    f.set_modified(SystemTime::now())
        .map_err(io_ctx("touch", path))
}

impl FsStorage {
    /// Opens (creating if needed) a storage root.
    pub fn open(root: impl Into<PathBuf>) -> Result<Self> {
        let root = root.into();
        for sub in ["blobs", "uploads", "tmp", "repos"] {
            let p = root.join(sub);
            fs::create_dir_all(&p).map_err(io_ctx("create", &p))?;
        }
        let lock = root.join("gc.lock");
        OpenOptions::new()
            .create(true)
            .append(true)
            .open(&lock)
            .map_err(io_ctx("create", &lock))?;
        // Staged small writes of a crashed process are garbage.
        if let Ok(entries) = fs::read_dir(root.join("tmp")) {
            for e in entries.flatten() {
                let _ = fs::remove_file(e.path());
            }
        }
        Ok(FsStorage {
            root,
            uploads: Mutex::new(HashMap::new()),
        })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub(crate) fn blob_path(root: &Path, d: &Digest) -> PathBuf {
        root.join("blobs")
            .join(d.algorithm().as_str())
            .join(&d.hex()[..2])
            .join(d.hex())
    }

    pub(crate) fn repo_dir(root: &Path, repo: &str) -> PathBuf {
        root.join("repos").join(repo)
    }

    fn layer_link(root: &Path, repo: &str, d: &Digest) -> PathBuf {
        Self::repo_dir(root, repo)
            .join("_layers")
            .join(d.algorithm().as_str())
            .join(d.hex())
    }

    pub(crate) fn revision_link(root: &Path, repo: &str, d: &Digest) -> PathBuf {
        Self::repo_dir(root, repo)
            .join("_manifests/revisions")
            .join(d.algorithm().as_str())
            .join(d.hex())
    }

    fn tags_dir(root: &Path, repo: &str) -> PathBuf {
        Self::repo_dir(root, repo).join("_manifests/tags")
    }

    fn referrers_dir(root: &Path, repo: &str, subject: &Digest) -> PathBuf {
        Self::repo_dir(root, repo)
            .join("_referrers")
            .join(subject.algorithm().as_str())
            .join(subject.hex())
    }

    fn twin_link(root: &Path, repo: &str, original: &Digest) -> PathBuf {
        Self::repo_dir(root, repo)
            .join("_twins")
            .join(original.algorithm().as_str())
            .join(original.hex())
    }

    fn upload_dir(root: &Path, id: &str) -> PathBuf {
        root.join("uploads").join(id)
    }

    /// Takes the GC lock shared: held while making blobs reachable.
    pub(crate) fn lock_shared(root: &Path) -> Result<File> {
        let path = root.join("gc.lock");
        let f = File::open(&path).map_err(io_ctx("open", &path))?;
        f.lock_shared().map_err(io_ctx("lock", &path))?;
        Ok(f)
    }

    /// Writes `data` to `path` atomically and durably.
    pub(crate) fn atomic_write(root: &Path, path: &Path, data: &[u8]) -> Result<()> {
        let tmp = root
            .join("tmp")
            .join(uuid::Uuid::new_v4().simple().to_string());
        let write = || -> io::Result<()> {
            let mut f = File::create(&tmp)?;
            f.write_all(data)?;
            f.sync_all()
        };
        write().map_err(io_ctx("write", &tmp))?;
        let parent = path.parent().expect("storage paths have parents");
        fs::create_dir_all(parent).map_err(io_ctx("create", parent))?;
        fs::rename(&tmp, path).map_err(|e| {
            let _ = fs::remove_file(&tmp);
            StorageError::Io {
                op: "rename",
                path: path.to_owned(),
                source: e,
            }
        })?;
        fsync_dir(parent)
    }

    /// Moves a verified file into the blob store (or drops it if the blob is
    /// already there: same digest, same bytes) and marks the blob as fresh.
    fn install_blob(root: &Path, staged: &Path, d: &Digest) -> Result<()> {
        let dest = Self::blob_path(root, d);
        if dest.exists() {
            let _ = fs::remove_file(staged);
            return touch(&dest);
        }
        let parent = dest.parent().expect("blob paths have parents");
        fs::create_dir_all(parent).map_err(io_ctx("create", parent))?;
        fs::rename(staged, &dest).map_err(io_ctx("rename", &dest))?;
        touch(&dest)?;
        fsync_dir(parent)
    }

    fn read_small(path: &Path) -> Result<Option<Vec<u8>>> {
        match fs::read(path) {
            Ok(b) => Ok(Some(b)),
            Err(e) if not_found(&e) || e.kind() == io::ErrorKind::NotADirectory => Ok(None),
            Err(e) => Err(StorageError::Io {
                op: "read",
                path: path.to_owned(),
                source: e,
            }),
        }
    }

    fn remove_if_exists(path: &Path) -> Result<bool> {
        match fs::remove_file(path) {
            Ok(()) => Ok(true),
            Err(e) if not_found(&e) => Ok(false),
            Err(e) => Err(StorageError::Io {
                op: "remove",
                path: path.to_owned(),
                source: e,
            }),
        }
    }

    fn resolve(root: &Path, repo: &str, reference: &Reference) -> Result<Option<Digest>> {
        match reference {
            Reference::Digest(d) => Ok(Some(d.clone())),
            Reference::Tag(t) => {
                let Some(b) = Self::read_small(&Self::tags_dir(root, repo).join(t))? else {
                    return Ok(None);
                };
                let s = String::from_utf8_lossy(&b);
                s.trim()
                    .parse()
                    .map(Some)
                    .map_err(|e| StorageError::Corrupt(format!("tag {repo}:{t}: {e}")))
            }
        }
    }

    fn load_manifest(root: &Path, repo: &str, d: &Digest) -> Result<Option<StoredManifest>> {
        let Some(media_type) = Self::read_small(&Self::revision_link(root, repo, d))? else {
            return Ok(None);
        };
        let Some(bytes) = Self::read_small(&Self::blob_path(root, d))? else {
            return Err(StorageError::Corrupt(format!(
                "manifest {d} is linked in {repo} but its blob is missing"
            )));
        };
        Ok(Some(StoredManifest {
            digest: d.clone(),
            media_type: String::from_utf8_lossy(&media_type).into_owned(),
            bytes: Bytes::from(bytes),
        }))
    }

    fn upload_state(
        &self,
        repo: &RepoName,
        id: &str,
    ) -> Result<Arc<tokio::sync::Mutex<UploadState>>> {
        // Ids are uuids we made; anything else never names a path.
        if uuid::Uuid::try_parse(id).is_err() {
            return Err(StorageError::UploadUnknown(id.to_owned()));
        }
        let mut map = self.uploads.lock().expect("upload map poisoned");
        if let Some((owner, s)) = map.get(id) {
            // A session is only reachable through the repository it was opened in.
            return if owner == repo.as_str() {
                Ok(s.clone())
            } else {
                Err(StorageError::UploadUnknown(id.to_owned()))
            };
        }
        // Not in memory: a session from before a restart, if its files exist.
        let dir = Self::upload_dir(&self.root, id);
        let owner = fs::read_to_string(dir.join("repo")).ok();
        let size = fs::metadata(dir.join("data")).map(|m| m.len()).ok();
        match (owner, size) {
            (Some(owner), Some(size)) if owner == repo.as_str() => {
                let s = Arc::new(tokio::sync::Mutex::new(UploadState { size, hasher: None }));
                map.insert(id.to_owned(), (owner, s.clone()));
                Ok(s)
            }
            _ => Err(StorageError::UploadUnknown(id.to_owned())),
        }
    }

    fn forget_upload(&self, id: &str) {
        self.uploads.lock().expect("upload map poisoned").remove(id);
        let _ = fs::remove_dir_all(Self::upload_dir(&self.root, id));
    }

    fn hash_file(path: &Path, algorithm: Algorithm) -> Result<Digest> {
        let mut f = File::open(path).map_err(io_ctx("open", path))?;
        let mut h = algorithm.hasher();
        io::copy(&mut f, &mut h).map_err(io_ctx("read", path))?;
        Ok(h.finish())
    }

    pub(crate) fn walk_repos(dir: &Path, prefix: &str, out: &mut Vec<String>) -> Result<()> {
        let entries = match fs::read_dir(dir) {
            Ok(e) => e,
            Err(e) if not_found(&e) => return Ok(()),
            Err(e) => return Err(io_ctx("list", dir)(e)),
        };
        for e in entries {
            let e = e.map_err(io_ctx("list", dir))?;
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with('_') || !e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                continue;
            }
            let full = if prefix.is_empty() {
                name.clone()
            } else {
                format!("{prefix}/{name}")
            };
            if e.path().join("_manifests").is_dir() || e.path().join("_layers").is_dir() {
                out.push(full.clone());
            }
            Self::walk_repos(&e.path(), &full, out)?;
        }
        Ok(())
    }
}

/// Lists file names in a directory; empty if it does not exist.
pub(crate) fn list_names(dir: &Path) -> Result<Vec<String>> {
    match fs::read_dir(dir) {
        Ok(entries) => entries
            .map(|e| {
                e.map(|e| e.file_name().to_string_lossy().into_owned())
                    .map_err(io_ctx("list", dir))
            })
            .collect(),
        Err(e) if not_found(&e) => Ok(Vec::new()),
        Err(e) => Err(io_ctx("list", dir)(e)),
    }
}

impl Storage for FsStorage {
    async fn blob_size(&self, digest: &Digest) -> Result<Option<u64>> {
        let path = FsStorage::blob_path(&self.root, digest);
        match tokio::fs::metadata(&path).await {
            Ok(m) => Ok(Some(m.len())),
            Err(e) if not_found(&e) => Ok(None),
            Err(e) => Err(io_ctx("stat", &path)(e)),
        }
    }

    async fn read_blob(&self, digest: &Digest, offset: u64, len: u64) -> Result<BlobBody> {
        let path = FsStorage::blob_path(&self.root, digest);
        let digest = digest.clone();
        blocking(move || {
            let file = match File::open(&path) {
                Ok(f) => f,
                Err(e) if not_found(&e) => return Err(StorageError::BlobUnknown(digest)),
                Err(e) => return Err(io_ctx("open", &path)(e)),
            };
            let size = file.metadata().map_err(io_ctx("stat", &path))?.len();
            if offset.checked_add(len).is_none_or(|end| end > size) {
                return Err(StorageError::Corrupt(format!(
                    "blob {digest} is {size} bytes, cannot read {len} at {offset}"
                )));
            }
            if len == 0 {
                return Ok(crate::body::empty());
            }
            // Map from the page boundary at or below `offset`.
            let page = 4096u64;
            let map_start = offset - offset % page;
            let skip = (offset - map_start) as usize;
            // SAFETY: blob files are immutable once renamed into place: nothing
            // writes or truncates them (GC only unlinks, which leaves mappings
            // valid), and the range was checked against the file size above.
            let map = unsafe {
                memmap2::MmapOptions::new()
                    .offset(map_start)
                    .len(skip + len as usize)
                    .map(&file)
            }
            .map_err(io_ctx("mmap", &path))?;
            let _ = map.advise(memmap2::Advice::Sequential);
            Ok(http_body_util::BodyExt::boxed_unsync(
                crate::body::MappedBody::new(map, skip, len as usize),
            ))
        })
        .await
    }

    async fn blob_linked(&self, repo: &RepoName, digest: &Digest) -> Result<bool> {
        let link = FsStorage::layer_link(&self.root, repo.as_str(), digest);
        Ok(tokio::fs::try_exists(&link).await.unwrap_or(false))
    }

    async fn link_blob(&self, repo: &RepoName, digest: &Digest) -> Result<()> {
        let (root, repo, digest) = (self.root.clone(), repo.clone(), digest.clone());
        blocking(move || {
            let _gc = FsStorage::lock_shared(&root)?;
            let blob = FsStorage::blob_path(&root, &digest);
            if !blob.exists() {
                return Err(StorageError::BlobUnknown(digest));
            }
            touch(&blob)?;
            let link = FsStorage::layer_link(&root, repo.as_str(), &digest);
            if !link.exists() {
                FsStorage::atomic_write(&root, &link, b"")?;
            }
            Ok(())
        })
        .await
    }

    async fn unlink_blob(&self, repo: &RepoName, digest: &Digest) -> Result<bool> {
        let link = FsStorage::layer_link(&self.root, repo.as_str(), digest);
        blocking(move || FsStorage::remove_if_exists(&link)).await
    }

    async fn start_upload(&self, repo: &RepoName) -> Result<String> {
        let id = uuid::Uuid::new_v4().to_string();
        let dir = FsStorage::upload_dir(&self.root, &id);
        let repo_name = repo.as_str().to_owned();
        let d = dir.clone();
        blocking(move || {
            fs::create_dir_all(&d).map_err(io_ctx("create", &d))?;
            fs::write(d.join("repo"), repo_name.as_bytes()).map_err(io_ctx("write", &d))?;
            File::create(d.join("data")).map_err(io_ctx("create", &d))?;
            Ok(())
        })
        .await?;
        let state = UploadState {
            size: 0,
            hasher: Some(Algorithm::Sha256.hasher()),
        };
        self.uploads.lock().expect("upload map poisoned").insert(
            id.clone(),
            (
                repo.as_str().to_owned(),
                Arc::new(tokio::sync::Mutex::new(state)),
            ),
        );
        Ok(id)
    }

    async fn upload_status(&self, repo: &RepoName, id: &str) -> Result<UploadStatus> {
        let state = self.upload_state(repo, id)?;
        let s = state.lock().await;
        Ok(UploadStatus { size: s.size })
    }

    async fn append_upload<R: AsyncRead + Send + Unpin>(
        &self,
        repo: &RepoName,
        id: &str,
        offset: Option<u64>,
        mut body: R,
    ) -> Result<UploadStatus> {
        let state = self.upload_state(repo, id)?;
        // One writer per session: chunks of one upload are strictly ordered.
        let mut s = state.lock().await;
        if let Some(off) = offset {
            if off != s.size {
                return Err(StorageError::UploadOffset {
                    expected: s.size,
                    got: off,
                });
            }
        }
        let path = FsStorage::upload_dir(&self.root, id).join("data");
        let mut file = tokio::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .await
            .map_err(|e| {
                if not_found(&e) {
                    StorageError::UploadUnknown(id.to_owned())
                } else {
                    io_ctx("open", &path)(e)
                }
            })?;
        let mut buf = vec![0u8; COPY_BUF];
        let result: io::Result<()> = async {
            loop {
                let n = body.read(&mut buf).await?;
                if n == 0 {
                    break;
                }
                tokio::io::AsyncWriteExt::write_all(&mut file, &buf[..n]).await?;
                if let Some(h) = s.hasher.as_mut() {
                    h.update(&buf[..n]);
                }
                s.size += n as u64;
            }
            tokio::io::AsyncWriteExt::flush(&mut file).await
        }
        .await;
        if let Err(e) = result {
            // The client went away or the disk failed mid-chunk: what reached the
            // file stays, and the session reports exactly that many bytes, so the
            // client can resume from the status it reads back.
            s.hasher = None;
            s.size = tokio::fs::metadata(&path)
                .await
                .map(|m| m.len())
                .unwrap_or(s.size);
            return Err(StorageError::Io {
                op: "receive upload chunk",
                path,
                source: e,
            });
        }
        Ok(UploadStatus { size: s.size })
    }

    async fn finish_upload(&self, repo: &RepoName, id: &str, digest: &Digest) -> Result<u64> {
        let state = self.upload_state(repo, id)?;
        let mut s = state.lock().await;
        let hasher = s.hasher.take();
        let size = s.size;
        let (root, digest_c) = (self.root.clone(), digest.clone());
        let repo_c = repo.clone();
        let dir = FsStorage::upload_dir(&self.root, id);
        let outcome = blocking(move || {
            let data = dir.join("data");
            File::open(&data)
                .and_then(|f| f.sync_all())
                .map_err(io_ctx("fsync", &data))?;
            let actual = match hasher {
                Some(h) if h.algorithm() == digest_c.algorithm() => h.finish(),
                _ => FsStorage::hash_file(&data, digest_c.algorithm())?,
            };
            if actual != digest_c {
                return Err(StorageError::DigestMismatch {
                    expected: digest_c,
                    actual,
                });
            }
            let _gc = FsStorage::lock_shared(&root)?;
            FsStorage::install_blob(&root, &data, &digest_c)?;
            let link = FsStorage::layer_link(&root, repo_c.as_str(), &digest_c);
            if !link.exists() {
                FsStorage::atomic_write(&root, &link, b"")?;
            }
            Ok(())
        })
        .await;
        drop(s);
        match outcome {
            Ok(()) | Err(StorageError::DigestMismatch { .. }) => self.forget_upload(id),
            Err(_) => {}
        }
        outcome.map(|()| size)
    }

    async fn cancel_upload(&self, repo: &RepoName, id: &str) -> Result<()> {
        let state = self.upload_state(repo, id)?;
        let _s = state.lock().await;
        self.forget_upload(id);
        Ok(())
    }

    async fn put_manifest(
        &self,
        repo: &RepoName,
        manifest: &StoredManifest,
        tag: Option<&str>,
        subject: Option<&Digest>,
        references: &ManifestReferences,
    ) -> Result<()> {
        let root = self.root.clone();
        let repo = repo.as_str().to_owned();
        let m = manifest.clone();
        let tag = tag.map(str::to_owned);
        let subject = subject.cloned();
        let refs = references.clone();
        blocking(move || {
            let _gc = FsStorage::lock_shared(&root)?;
            for b in &refs.blobs {
                let blob = FsStorage::blob_path(&root, b);
                if !FsStorage::layer_link(&root, &repo, b).exists() || !blob.exists() {
                    return Err(StorageError::BlobUnknown(b.clone()));
                }
                touch(&blob)?;
            }
            for child in &refs.manifests {
                let blob = FsStorage::blob_path(&root, child);
                if !FsStorage::revision_link(&root, &repo, child).exists() || !blob.exists() {
                    return Err(StorageError::BlobUnknown(child.clone()));
                }
                touch(&blob)?;
            }
            let blob = FsStorage::blob_path(&root, &m.digest);
            if blob.exists() {
                touch(&blob)?;
            } else {
                let staged = root
                    .join("tmp")
                    .join(uuid::Uuid::new_v4().simple().to_string());
                let write = || -> io::Result<()> {
                    let mut f = File::create(&staged)?;
                    f.write_all(&m.bytes)?;
                    f.sync_all()
                };
                write().map_err(io_ctx("write", &staged))?;
                FsStorage::install_blob(&root, &staged, &m.digest)?;
            }
            FsStorage::atomic_write(
                &root,
                &FsStorage::revision_link(&root, &repo, &m.digest),
                m.media_type.as_bytes(),
            )?;
            if let Some(subject) = &subject {
                let link = FsStorage::referrers_dir(&root, &repo, subject).join(format!(
                    "{}-{}",
                    m.digest.algorithm(),
                    m.digest.hex()
                ));
                FsStorage::atomic_write(&root, &link, b"")?;
            }
            if let Some(tag) = &tag {
                FsStorage::atomic_write(
                    &root,
                    &FsStorage::tags_dir(&root, &repo).join(tag),
                    m.digest.to_string().as_bytes(),
                )?;
            }
            Ok(())
        })
        .await
    }

    async fn get_manifest(
        &self,
        repo: &RepoName,
        reference: &Reference,
    ) -> Result<Option<StoredManifest>> {
        let root = self.root.clone();
        let repo = repo.as_str().to_owned();
        let reference = reference.clone();
        blocking(move || {
            let Some(d) = FsStorage::resolve(&root, &repo, &reference)? else {
                return Ok(None);
            };
            FsStorage::load_manifest(&root, &repo, &d)
        })
        .await
    }

    async fn delete_manifest(&self, repo: &RepoName, reference: &Reference) -> Result<bool> {
        let root = self.root.clone();
        let repo = repo.as_str().to_owned();
        let reference = reference.clone();
        blocking(move || match reference {
            Reference::Tag(t) => {
                FsStorage::remove_if_exists(&FsStorage::tags_dir(&root, &repo).join(t))
            }
            Reference::Digest(d) => {
                let Some(m) = FsStorage::load_manifest(&root, &repo, &d)? else {
                    return Ok(false);
                };
                let tags = FsStorage::tags_dir(&root, &repo);
                for t in list_names(&tags)? {
                    let p = tags.join(&t);
                    if FsStorage::read_small(&p)?
                        .is_some_and(|b| String::from_utf8_lossy(&b).trim() == d.to_string())
                    {
                        FsStorage::remove_if_exists(&p)?;
                    }
                }
                if let Ok(parsed) = sluice_format::oci::Manifest::parse(&m.bytes) {
                    if let Some(subject) = parsed.subject {
                        let link = FsStorage::referrers_dir(&root, &repo, &subject.digest)
                            .join(format!("{}-{}", d.algorithm(), d.hex()));
                        FsStorage::remove_if_exists(&link)?;
                    }
                }
                FsStorage::remove_if_exists(&FsStorage::revision_link(&root, &repo, &d))
            }
        })
        .await
    }

    async fn list_tags(&self, repo: &RepoName) -> Result<Option<Vec<String>>> {
        let root = self.root.clone();
        let repo = repo.as_str().to_owned();
        blocking(move || {
            if !FsStorage::repo_dir(&root, &repo)
                .join("_manifests")
                .is_dir()
            {
                return Ok(None);
            }
            let mut tags = list_names(&FsStorage::tags_dir(&root, &repo))?;
            tags.sort();
            Ok(Some(tags))
        })
        .await
    }

    async fn list_repositories(&self) -> Result<Vec<String>> {
        let root = self.root.clone();
        blocking(move || {
            let mut out = Vec::new();
            FsStorage::walk_repos(&root.join("repos"), "", &mut out)?;
            out.sort();
            Ok(out)
        })
        .await
    }

    async fn referrers(&self, repo: &RepoName, subject: &Digest) -> Result<Vec<StoredManifest>> {
        let root = self.root.clone();
        let repo = repo.as_str().to_owned();
        let dir = FsStorage::referrers_dir(&root, &repo, subject);
        blocking(move || {
            let mut out = Vec::new();
            let mut names = list_names(&dir)?;
            names.sort();
            for name in names {
                let Some(d) = name
                    .split_once('-')
                    .and_then(|(a, h)| format!("{a}:{h}").parse::<Digest>().ok())
                else {
                    continue;
                };
                if let Some(m) = FsStorage::load_manifest(&root, &repo, &d)? {
                    out.push(m);
                }
            }
            Ok(out)
        })
        .await
    }

    async fn put_twin(&self, repo: &RepoName, original: &Digest, twin: &Descriptor) -> Result<()> {
        let root = self.root.clone();
        let link = FsStorage::twin_link(&root, repo.as_str(), original);
        let json = serde_json::to_vec(twin).map_err(|e| StorageError::Corrupt(e.to_string()))?;
        blocking(move || FsStorage::atomic_write(&root, &link, &json)).await
    }

    async fn get_twin(&self, repo: &RepoName, original: &Digest) -> Result<Option<Descriptor>> {
        let root = self.root.clone();
        let repo_name = repo.as_str().to_owned();
        let link = FsStorage::twin_link(&root, &repo_name, original);
        blocking(move || {
            let Some(bytes) = FsStorage::read_small(&link)? else {
                return Ok(None);
            };
            let twin: Descriptor = serde_json::from_slice(&bytes).map_err(|e| {
                StorageError::Corrupt(format!("twin record {}: {e}", link.display()))
            })?;
            // A twin whose blob was collected is no twin.
            let linked = FsStorage::layer_link(&root, &repo_name, &twin.digest).exists()
                && FsStorage::blob_path(&root, &twin.digest).exists();
            Ok(linked.then_some(twin))
        })
        .await
    }

    async fn counts(&self) -> Result<(u64, u64)> {
        let root = self.root.clone();
        blocking(move || {
            let mut blobs = 0u64;
            for alg in list_names(&root.join("blobs"))? {
                for prefix in list_names(&root.join("blobs").join(&alg))? {
                    blobs += list_names(&root.join("blobs").join(&alg).join(prefix))?.len() as u64;
                }
            }
            let mut repos = Vec::new();
            FsStorage::walk_repos(&root.join("repos"), "", &mut repos)?;
            let mut manifests = 0u64;
            for r in repos {
                let rev = FsStorage::repo_dir(&root, &r).join("_manifests/revisions");
                for alg in list_names(&rev)? {
                    manifests += list_names(&rev.join(alg))?.len() as u64;
                }
            }
            Ok((blobs, manifests))
        })
        .await
    }
}

/// Reads a whole small blob (manifests, configs) synchronously.
pub(crate) fn read_blob_sync(root: &Path, d: &Digest, limit: u64) -> Result<Option<Vec<u8>>> {
    let path = FsStorage::blob_path(root, d);
    let f = match File::open(&path) {
        Ok(f) => f,
        Err(e) if not_found(&e) => return Ok(None),
        Err(e) => return Err(io_ctx("open", &path)(e)),
    };
    let mut buf = Vec::new();
    f.take(limit)
        .read_to_end(&mut buf)
        .map_err(io_ctx("read", &path))?;
    Ok(Some(buf))
}
