//! The sealed object byte layout, as pure functions: no I/O, no async.
//!
//! A sealed file is two objects (docs/FORMAT.md):
//! - the **data object** at the file's own path: a 32-byte prelude, then the chunks;
//! - the **key object** beside it (`<path>.sealfs-c<log2 chunk size>`): the authenticated
//!   header (encryption context, sizes, file id), its MAC, and the wrapped DEKs.
//!
//! Rotation rewrites only the key object, so a rewrap moves a few hundred bytes and never
//! changes the data object (or its ETag) that a mount has pinned.

pub mod header;
pub mod layout;
pub mod naming;

pub use header::{EncryptionContext, Header, KeyObject, KeySlot, SlotKind};
pub use layout::{ChunkSpan, Layout, Prelude};

/// The only format version this build writes and reads.
pub const VERSION: u16 = 1;
/// The only cipher suite of v1: AES-256-GCM chunks, HKDF-SHA256, HMAC-SHA256 header MAC.
pub const SUITE_AES256GCM_HKDF_SHA256: u16 = 1;
/// AES-GCM tag length, appended to every chunk.
pub const TAG_LEN: u64 = 16;
/// Smallest and largest chunk size exponents accepted (16 KiB .. 64 MiB).
pub const MIN_CHUNK_LOG2: u8 = 14;
pub const MAX_CHUNK_LOG2: u8 = 26;
/// Default chunk size exponent (1 MiB): see docs/PERFORMANCE.md for the measurement.
pub const DEFAULT_CHUNK_LOG2: u8 = 20;

/// Errors from parsing or validating sealed-object bytes. Never a panic on any input.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum FormatError {
    /// The bytes do not start with the expected magic: not a sealfs object of this kind.
    #[error("not a sealfs {0} (bad magic)")]
    BadMagic(&'static str),
    /// A version this build does not know.
    #[error("unsupported format version {0} (this build reads version {VERSION})")]
    UnsupportedVersion(u16),
    /// A cipher suite this build does not know.
    #[error("unsupported cipher suite {0}")]
    UnsupportedSuite(u16),
    /// The bytes ended before a field did.
    #[error("truncated {0}")]
    Truncated(&'static str),
    /// A field is out of its allowed range.
    #[error("invalid {field}: {reason}")]
    Invalid { field: &'static str, reason: String },
    /// Bytes follow the last field.
    #[error("{0} trailing bytes after the key object")]
    TrailingBytes(usize),
}

pub(crate) fn invalid(field: &'static str, reason: impl Into<String>) -> FormatError {
    FormatError::Invalid {
        field,
        reason: reason.into(),
    }
}
