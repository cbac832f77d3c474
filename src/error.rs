//! The error of sealfs operations: one line each, naming the file and what failed.

use crate::crypto::LockError;
use crate::format::FormatError;
use crate::keys::KeyError;
use crate::store::StoreError;

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("{file}: {source}")]
    Key { file: String, source: KeyError },
    #[error(transparent)]
    KeySetup(#[from] KeyError),
    #[error("{file}: malformed: {source}")]
    Format { file: String, source: FormatError },
    /// Bytes that failed authentication or do not belong together. No plaintext of the
    /// failing range was released.
    #[error("{file}: {reason}")]
    Integrity { file: String, reason: String },
    #[error(transparent)]
    Lock(#[from] LockError),
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("{0}")]
    Usage(String),
    #[error("nothing sealed found at {0}")]
    NothingSealed(String),
    #[error("interrupted; the partial upload was aborted")]
    Interrupted,
    /// The file's DEK was revoked while it was open (its key refused at revalidation, or
    /// `sealfs revoke`): nothing more of it is served.
    #[error("{file}: revoked: its key no longer opens it")]
    Revoked { file: String },
    /// A model (or a file of it) the manifest or the trusted signers refuse.
    #[error(transparent)]
    Model(#[from] crate::manifest::error::ModelError),
}

impl From<crate::sign::SignError> for Error {
    /// A signer KMS refused is a key refusal (exit 4); anything else about a signer is a
    /// usage error (exit 2).
    fn from(e: crate::sign::SignError) -> Self {
        match e {
            crate::sign::SignError::Kms(k) => Error::KeySetup(k),
            other => Error::Usage(other.to_string()),
        }
    }
}

impl Error {
    pub fn key(file: &str, source: KeyError) -> Self {
        Error::Key {
            file: file.to_string(),
            source,
        }
    }

    pub fn integrity(file: &str, reason: impl Into<String>) -> Self {
        Error::Integrity {
            file: file.to_string(),
            reason: reason.into(),
        }
    }

    /// True when the failure is tampering or corruption (exit code 3, EIO in the mount).
    pub fn is_integrity(&self) -> bool {
        match self {
            Error::Integrity { .. } | Error::Format { .. } => true,
            Error::Model(m) => m.is_tampering(),
            Error::Key { source, .. } | Error::KeySetup(source) => source.is_integrity(),
            _ => false,
        }
    }

    /// True when a key refused us (exit code 4, EACCES in the mount).
    pub fn is_access_denied(&self) -> bool {
        match self {
            Error::Key { source, .. } | Error::KeySetup(source) => source.is_access_denied(),
            Error::Model(m) => m.is_untrusted(),
            Error::Revoked { .. } => true,
            _ => false,
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
