//! Filesystem errors and their one mapping to errno.

use crate::erasure::client::StripeError;
use crate::meta::client::MetaError;

#[derive(Debug, Clone, thiserror::Error)]
pub enum FsError {
    #[error("no such file or directory")]
    NotFound,
    #[error("file exists")]
    Exists,
    #[error("not a directory")]
    NotDir,
    #[error("is a directory")]
    IsDir,
    #[error("directory not empty")]
    NotEmpty,
    #[error("name longer than 255 bytes")]
    NameTooLong,
    #[error("invalid argument: {0}")]
    Invalid(String),
    #[error("no such attribute")]
    NoAttr,
    #[error("attribute value larger than the buffer")]
    Range,
    #[error("not supported: {0}")]
    NotSupported(String),
    #[error("file too large")]
    TooBig,
    #[error("the ring is full: {0}")]
    NoSpace(String),
    /// Too many peers down, a timeout, or data that failed its checks.
    #[error("i/o error: {0}")]
    Io(String),
}

pub type FsResult<T> = Result<T, FsError>;

impl FsError {
    pub fn errno(&self) -> i32 {
        match self {
            FsError::NotFound => libc::ENOENT,
            FsError::Exists => libc::EEXIST,
            FsError::NotDir => libc::ENOTDIR,
            FsError::IsDir => libc::EISDIR,
            FsError::NotEmpty => libc::ENOTEMPTY,
            FsError::NameTooLong => libc::ENAMETOOLONG,
            FsError::Invalid(_) => libc::EINVAL,
            FsError::NoAttr => libc::ENODATA,
            FsError::Range => libc::ERANGE,
            FsError::NotSupported(_) => libc::EOPNOTSUPP,
            FsError::TooBig => libc::EFBIG,
            FsError::NoSpace(_) => libc::ENOSPC,
            FsError::Io(_) => libc::EIO,
        }
    }
}

impl From<MetaError> for FsError {
    fn from(e: MetaError) -> Self {
        match e {
            MetaError::Full(m) => FsError::NoSpace(m),
            MetaError::Unavailable { .. } => FsError::Io(e.to_string()),
        }
    }
}

impl From<StripeError> for FsError {
    fn from(e: StripeError) -> Self {
        let s = e.to_string();
        // The disk image's own words for a full peer (see blockstore::StoreError::Full).
        if s.contains("disk image full") {
            FsError::NoSpace(s)
        } else {
            FsError::Io(s)
        }
    }
}
