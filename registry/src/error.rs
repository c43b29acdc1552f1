//! Registry errors and their wire form: the distribution spec's JSON error body
//! (`{"errors":[{"code","message","detail"}]}`) with the matching status code.

use http::StatusCode;
use sluice_format::DigestError;

use crate::storage::StorageError;

/// The error codes of the distribution spec (plus `RANGE_INVALID`, which the
/// spec answers with a bare 416 and we also explain in the body).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    BlobUnknown,
    BlobUploadInvalid,
    BlobUploadUnknown,
    DigestInvalid,
    ManifestBlobUnknown,
    ManifestInvalid,
    ManifestUnknown,
    NameInvalid,
    NameUnknown,
    SizeInvalid,
    Unauthorized,
    Denied,
    Unsupported,
    RangeInvalid,
    Internal,
}

impl ErrorCode {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::BlobUnknown => "BLOB_UNKNOWN",
            ErrorCode::BlobUploadInvalid => "BLOB_UPLOAD_INVALID",
            ErrorCode::BlobUploadUnknown => "BLOB_UPLOAD_UNKNOWN",
            ErrorCode::DigestInvalid => "DIGEST_INVALID",
            ErrorCode::ManifestBlobUnknown => "MANIFEST_BLOB_UNKNOWN",
            ErrorCode::ManifestInvalid => "MANIFEST_INVALID",
            ErrorCode::ManifestUnknown => "MANIFEST_UNKNOWN",
            ErrorCode::NameInvalid => "NAME_INVALID",
            ErrorCode::NameUnknown => "NAME_UNKNOWN",
            ErrorCode::SizeInvalid => "SIZE_INVALID",
            ErrorCode::Unauthorized => "UNAUTHORIZED",
            ErrorCode::Denied => "DENIED",
            ErrorCode::Unsupported => "UNSUPPORTED",
            ErrorCode::RangeInvalid => "RANGE_INVALID",
            // Not a spec code; clients treat unknown codes as opaque.
            ErrorCode::Internal => "INTERNAL_ERROR",
        }
    }

    pub fn status(self) -> StatusCode {
        match self {
            ErrorCode::BlobUnknown
            | ErrorCode::BlobUploadUnknown
            | ErrorCode::ManifestUnknown
            | ErrorCode::NameUnknown => StatusCode::NOT_FOUND,
            ErrorCode::BlobUploadInvalid
            | ErrorCode::DigestInvalid
            | ErrorCode::ManifestBlobUnknown
            | ErrorCode::ManifestInvalid
            | ErrorCode::NameInvalid
            | ErrorCode::SizeInvalid => StatusCode::BAD_REQUEST,
            ErrorCode::Unauthorized => StatusCode::UNAUTHORIZED,
            ErrorCode::Denied => StatusCode::FORBIDDEN,
            ErrorCode::Unsupported => StatusCode::METHOD_NOT_ALLOWED,
            ErrorCode::RangeInvalid => StatusCode::RANGE_NOT_SATISFIABLE,
            ErrorCode::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

/// An error answered to a client.
#[derive(Debug, thiserror::Error)]
#[error("{}: {message}", code.as_str())]
pub struct ApiError {
    pub code: ErrorCode,
    pub message: String,
    /// Overrides the code's default status (e.g. 416 for an out-of-order chunk).
    pub status: Option<StatusCode>,
    /// Extra response headers (e.g. `Content-Range: bytes */size` on a 416).
    pub headers: Vec<(&'static str, String)>,
}

impl ApiError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        ApiError {
            code,
            message: message.into(),
            status: None,
            headers: Vec::new(),
        }
    }

    pub fn with_header(mut self, name: &'static str, value: impl Into<String>) -> Self {
        self.headers.push((name, value.into()));
        self
    }

    pub fn with_status(mut self, status: StatusCode) -> Self {
        self.status = Some(status);
        self
    }

    pub fn status(&self) -> StatusCode {
        self.status.unwrap_or_else(|| self.code.status())
    }

    /// The spec's JSON error body.
    pub fn body(&self) -> Vec<u8> {
        serde_json::to_vec(&serde_json::json!({
            "errors": [{ "code": self.code.as_str(), "message": self.message, "detail": {} }]
        }))
        .unwrap_or_default()
    }
}

impl From<DigestError> for ApiError {
    fn from(e: DigestError) -> Self {
        ApiError::new(ErrorCode::DigestInvalid, e.to_string())
    }
}

impl From<StorageError> for ApiError {
    fn from(e: StorageError) -> Self {
        match e {
            StorageError::BlobUnknown(d) => {
                ApiError::new(ErrorCode::BlobUnknown, format!("blob {d} is not known"))
            }
            StorageError::UploadUnknown(id) => ApiError::new(
                ErrorCode::BlobUploadUnknown,
                format!("upload {id} is not known (finished, cancelled or expired)"),
            ),
            StorageError::DigestMismatch { expected, actual } => ApiError::new(
                ErrorCode::DigestInvalid,
                format!("content has digest {actual}, not the {expected} it was pushed as"),
            ),
            StorageError::SizeMismatch { expected, actual } => ApiError::new(
                ErrorCode::SizeInvalid,
                format!("content is {actual} bytes, not the declared {expected}"),
            ),
            StorageError::UploadOffset { expected, got } => ApiError::new(
                ErrorCode::BlobUploadInvalid,
                format!("chunk starts at byte {got} but the upload has {expected} bytes; chunks must be sent in order"),
            )
            .with_status(StatusCode::RANGE_NOT_SATISFIABLE),
            StorageError::Io { .. } | StorageError::Corrupt(_) => {
                tracing::error!(error = %e, "storage failure");
                ApiError::new(ErrorCode::Internal, format!("storage failure: {e}"))
            }
        }
    }
}
