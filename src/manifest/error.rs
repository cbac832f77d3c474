//! Why a model, or a file of it, is refused: a module of its own so that the crate's
//! error type can carry it without depending on how manifests are loaded.

use crate::format::naming::SIGNATURE_NAME;

/// Why a model, or one file of it, is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ModelError {
    #[error("model {model}: manifest malformed: {reason}")]
    Malformed { model: String, reason: String },
    #[error("model {model}: manifest missing (its files name it as their model)")]
    MissingManifest { model: String },
    #[error(
        "model {model}: not signed (no {SIGNATURE_NAME}), and --trust-signer requires a signature"
    )]
    Unsigned { model: String },
    #[error(
        "model {model}: signed by {found}, which is not a trusted signer (trusted: {trusted})"
    )]
    UntrustedSigner {
        model: String,
        found: String,
        trusted: String,
    },
    #[error("model {model}: the signature does not cover this manifest (altered)")]
    Altered { model: String },
    #[error("{file}: {reason}")]
    File { file: String, reason: String },
    #[error("{file}: not part of a model, and --trust-signer or --model-digest requires one")]
    Loose { file: String },
    #[error("model {model}: manifest digest sha256:{found} is not the pinned sha256:{pinned} (--model-digest)")]
    NotPinned {
        model: String,
        found: String,
        pinned: String,
    },
    #[error("model {model}: manifest unreadable: {reason}")]
    Unreadable {
        model: String,
        reason: String,
        class: Unreadable,
    },
    #[error("model {model}: manifest version {found} generation {found_generation} is older than version {served} generation {served_generation} already served (rollback)")]
    Rollback {
        model: String,
        found: u64,
        found_generation: u32,
        served: u64,
        served_generation: u32,
    },
}

/// Why a manifest could not be read, for exit codes and retries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unreadable {
    /// Bytes failed authentication or parsing.
    Tampered,
    /// A key refused.
    Denied,
    /// KMS failed (after bounded retries).
    Unavailable,
    /// The store failed or answered wrongly.
    Store,
}

impl ModelError {
    /// True when bytes were tampered with (exit 3 at the CLI).
    pub fn is_tampering(&self) -> bool {
        match self {
            ModelError::Unreadable { class, .. } => *class == Unreadable::Tampered,
            other => !other.is_untrusted(),
        }
    }

    /// True when the refusal is about trust (no signature, an untrusted signer, a loose
    /// file under --trust-signer): exit 4 at the CLI. Every model refusal is EACCES at the
    /// mount; the others are tampering (exit 3).
    pub fn is_untrusted(&self) -> bool {
        matches!(
            self,
            ModelError::Unsigned { .. }
                | ModelError::NotPinned { .. }
                | ModelError::UntrustedSigner { .. }
                | ModelError::Loose { .. }
                | ModelError::Unreadable {
                    class: Unreadable::Denied,
                    ..
                }
        )
    }
}
