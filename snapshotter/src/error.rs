//! Errors of snapshot operations, with the gRPC codes containerd maps back to
//! its own error kinds (its unpacker, for one, relies on `AlreadyExists`).

use tonic::{Code, Status};

#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("snapshot {0}: not found")]
    NotFound(String),
    #[error("snapshot {0}: already exists")]
    AlreadyExists(String),
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("{0}")]
    InvalidArgument(String),
    #[error("metadata store: {0}")]
    Store(String),
    #[error("{context}: {source}")]
    Io {
        context: String,
        source: std::io::Error,
    },
}

impl SnapshotError {
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        SnapshotError::Io {
            context: context.into(),
            source,
        }
    }

    pub fn code(&self) -> Code {
        match self {
            SnapshotError::NotFound(_) => Code::NotFound,
            SnapshotError::AlreadyExists(_) => Code::AlreadyExists,
            SnapshotError::FailedPrecondition(_) => Code::FailedPrecondition,
            SnapshotError::InvalidArgument(_) => Code::InvalidArgument,
            SnapshotError::Store(_) | SnapshotError::Io { .. } => Code::Internal,
        }
    }
}

impl From<SnapshotError> for Status {
    fn from(e: SnapshotError) -> Status {
        Status::new(e.code(), e.to_string())
    }
}

macro_rules! store_error {
    ($($t:ty),*) => {$(
        impl From<$t> for SnapshotError {
            fn from(e: $t) -> Self {
                SnapshotError::Store(e.to_string())
            }
        }
    )*};
}
store_error!(
    redb::Error,
    redb::DatabaseError,
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError,
    serde_json::Error
);
