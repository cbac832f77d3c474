//! Errors of filesystem operations, each with the errno the kernel gets.

use crate::error::Error;

#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum FsError {
    #[error("no such file")]
    NotFound,
    #[error("not a directory")]
    NotDir,
    #[error("is a directory")]
    IsDir,
    #[error("read-only file system")]
    ReadOnly,
    #[error("bad file handle")]
    BadHandle,
    /// The inode names a version that was replaced: the kernel looks the name up again.
    #[error("stale file version")]
    Stale,
    /// A key refused: EACCES.
    #[error("{0}")]
    Denied(String),
    /// Tampering, a replaced object, an unreachable store after retries: EIO.
    #[error("{0}")]
    Io(String),
}

impl FsError {
    pub fn errno(&self) -> i32 {
        match self {
            FsError::NotFound => libc::ENOENT,
            FsError::NotDir => libc::ENOTDIR,
            FsError::IsDir => libc::EISDIR,
            FsError::ReadOnly => libc::EROFS,
            FsError::BadHandle => libc::EBADF,
            FsError::Stale => libc::ESTALE,
            FsError::Denied(_) => libc::EACCES,
            FsError::Io(_) => libc::EIO,
        }
    }
}

impl From<Error> for FsError {
    fn from(e: Error) -> Self {
        let msg = crate::error_chain(&e);
        if e.is_access_denied() {
            FsError::Denied(msg)
        } else {
            FsError::Io(msg)
        }
    }
}
