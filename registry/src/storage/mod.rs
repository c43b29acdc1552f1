//! Where the registry keeps blobs, uploads, manifests, tags and referrers.
//!
//! [`Storage`] is the seam for backends: the filesystem one ([`fs::FsStorage`])
//! is the default; an object-store backend (S3-compatible) implements the same
//! trait. Blobs are global and content-addressed; repositories only hold *links*
//! to them, so one layer pushed to many repositories is stored once and a
//! repository can only read what was pushed or mounted into it.
//!
//! Contract every backend keeps:
//! - nothing becomes visible under a digest until its bytes are complete, durable
//!   and verified to have that digest;
//! - concurrent writers of the same content are safe (content addressing makes
//!   them idempotent);
//! - operations that make a blob reachable hold off garbage collection
//!   (see [`crate::gc`]).

pub mod fs;

use std::future::Future;
use std::io;
use std::path::PathBuf;

use bytes::Bytes;
use sluice_format::oci::Descriptor;
use sluice_format::Digest;
use tokio::io::AsyncRead;

use crate::name::RepoName;

pub use fs::FsStorage;

/// A byte stream of (a range of) a blob, as an HTTP body of data frames.
pub type BlobBody = crate::body::ResponseBody;

#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("blob {0} is not known")]
    BlobUnknown(Digest),
    #[error("upload {0} is not known")]
    UploadUnknown(String),
    #[error("content has digest {actual}, expected {expected}")]
    DigestMismatch { expected: Digest, actual: Digest },
    #[error("content is {actual} bytes, expected {expected}")]
    SizeMismatch { expected: u64, actual: u64 },
    #[error("chunk starts at {got}, upload is at {expected}")]
    UploadOffset { expected: u64, got: u64 },
    #[error("stored data is corrupt: {0}")]
    Corrupt(String),
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        source: io::Error,
    },
}

pub type Result<T, E = StorageError> = std::result::Result<T, E>;

/// A manifest as stored: its digest, the media type it is served with, its bytes.
#[derive(Debug, Clone)]
pub struct StoredManifest {
    pub digest: Digest,
    pub media_type: String,
    pub bytes: Bytes,
}

/// Where a manifest reference points: a tag or a digest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reference {
    Tag(String),
    Digest(Digest),
}

/// State of an upload session.
#[derive(Debug, Clone, Copy)]
pub struct UploadStatus {
    /// Bytes received so far.
    pub size: u64,
}

/// A registry storage backend. All methods are safe to call concurrently.
pub trait Storage: Send + Sync + 'static {
    /// Size of a blob if it exists (in any repository).
    fn blob_size(&self, digest: &Digest) -> impl Future<Output = Result<Option<u64>>> + Send;

    /// Streams `len` bytes of a blob starting at `offset`.
    fn read_blob(
        &self,
        digest: &Digest,
        offset: u64,
        len: u64,
    ) -> impl Future<Output = Result<BlobBody>> + Send;

    /// Whether `repo` may serve the blob (it was pushed or mounted there).
    fn blob_linked(
        &self,
        repo: &RepoName,
        digest: &Digest,
    ) -> impl Future<Output = Result<bool>> + Send;

    /// Links an existing blob into `repo` (cross-repository mount).
    /// Fails with `BlobUnknown` if the blob does not exist.
    fn link_blob(
        &self,
        repo: &RepoName,
        digest: &Digest,
    ) -> impl Future<Output = Result<()>> + Send;

    /// Removes a blob's link from `repo`. Returns false if it was not linked.
    fn unlink_blob(
        &self,
        repo: &RepoName,
        digest: &Digest,
    ) -> impl Future<Output = Result<bool>> + Send;

    /// Starts an upload session in `repo`; returns its id.
    fn start_upload(&self, repo: &RepoName) -> impl Future<Output = Result<String>> + Send;

    /// How much of an upload has arrived.
    fn upload_status(
        &self,
        repo: &RepoName,
        id: &str,
    ) -> impl Future<Output = Result<UploadStatus>> + Send;

    /// Appends `body` to an upload. With `offset`, the chunk must start exactly
    /// where the upload ends (`UploadOffset` otherwise).
    fn append_upload<R: AsyncRead + Send + Unpin>(
        &self,
        repo: &RepoName,
        id: &str,
        offset: Option<u64>,
        body: R,
    ) -> impl Future<Output = Result<UploadStatus>> + Send;

    /// Verifies the upload against `digest` and makes it a blob linked into
    /// `repo`. On a mismatch the upload is discarded and nothing is stored.
    fn finish_upload(
        &self,
        repo: &RepoName,
        id: &str,
        digest: &Digest,
    ) -> impl Future<Output = Result<u64>> + Send;

    /// Discards an upload session.
    fn cancel_upload(&self, repo: &RepoName, id: &str) -> impl Future<Output = Result<()>> + Send;

    /// Stores a manifest whose bytes hash to `digest`, links it into `repo`
    /// (tagging it if `tag` is given) and records it as a referrer of `subject`.
    /// `references` are blobs and manifests it needs; they are kept from garbage
    /// collection in the same step, and the call fails with `BlobUnknown` if one
    /// is missing from the repository.
    fn put_manifest(
        &self,
        repo: &RepoName,
        manifest: &StoredManifest,
        tag: Option<&str>,
        subject: Option<&Digest>,
        references: &ManifestReferences,
    ) -> impl Future<Output = Result<()>> + Send;

    /// Looks up a manifest by tag or digest in `repo`.
    fn get_manifest(
        &self,
        repo: &RepoName,
        reference: &Reference,
    ) -> impl Future<Output = Result<Option<StoredManifest>>> + Send;

    /// Deletes a tag, or a manifest (with every tag pointing at it) by digest.
    /// Returns false if there was nothing to delete.
    fn delete_manifest(
        &self,
        repo: &RepoName,
        reference: &Reference,
    ) -> impl Future<Output = Result<bool>> + Send;

    /// Tags of `repo`, sorted; `None` if the repository does not exist.
    fn list_tags(
        &self,
        repo: &RepoName,
    ) -> impl Future<Output = Result<Option<Vec<String>>>> + Send;

    /// All repositories, sorted.
    fn list_repositories(&self) -> impl Future<Output = Result<Vec<String>>> + Send;

    /// Manifests in `repo` that declare `subject` as their subject.
    fn referrers(
        &self,
        repo: &RepoName,
        subject: &Digest,
    ) -> impl Future<Output = Result<Vec<StoredManifest>>> + Send;

    /// Records that layer `original` of `repo` has the lazy (zstd:chunked) twin
    /// `twin`, a blob already linked into `repo`.
    fn put_twin(
        &self,
        repo: &RepoName,
        original: &Digest,
        twin: &Descriptor,
    ) -> impl Future<Output = Result<()>> + Send;

    /// The lazy twin of a layer, if one was recorded and its blob is still there.
    fn get_twin(
        &self,
        repo: &RepoName,
        original: &Digest,
    ) -> impl Future<Output = Result<Option<Descriptor>>> + Send;

    /// Number of blobs and of manifests stored (for metrics).
    fn counts(&self) -> impl Future<Output = Result<(u64, u64)>> + Send;
}

/// What a manifest refers to, and so what must exist before it is accepted.
#[derive(Debug, Clone, Default)]
pub struct ManifestReferences {
    /// Config and layer blobs of an image manifest.
    pub blobs: Vec<Digest>,
    /// Child manifests of an index.
    pub manifests: Vec<Digest>,
}
