//! Exit codes: a stable part of the CLI (docs/CLI.md). A module of its own, under both
//! the CLI and the mount session (whose daemonized child reports its code to the parent
//! over a pipe), so that neither imports the other.

use crate::error::Error;

pub const OK: i32 = 0;
/// Anything not covered below.
pub const FAILURE: i32 = 1;
/// Bad arguments (clap uses 2 as well).
pub const USAGE: i32 = 2;
/// Authentication failed: tampered, truncated, swapped or corrupted data.
pub const INTEGRITY: i32 = 3;
/// A key refused: KMS access denied, key disabled/pending deletion, no trusted key.
pub const KEY_DENIED: i32 = 4;
/// The store failed: not found, access denied, network, throttling after retries.
pub const STORE: i32 = 5;
/// Interrupted by a signal; partial work was cleaned up.
pub const INTERRUPTED: i32 = 130;

pub fn code(err: &Error) -> i32 {
    match err {
        e if e.is_integrity() => INTEGRITY,
        e if e.is_access_denied() => KEY_DENIED,
        Error::Usage(_) | Error::NothingSealed(_) => USAGE,
        Error::KeySetup(
            crate::keys::KeyError::BadUri(_)
            | crate::keys::KeyError::Pkcs11Uri { .. }
            | crate::keys::KeyError::Tpm2NotBuilt,
        ) => USAGE,
        Error::Store(crate::store::StoreError::BadUri(_)) => USAGE,
        Error::Store(_) => STORE,
        Error::Model(crate::manifest::ModelError::Unreadable {
            class: crate::manifest::Unreadable::Store,
            ..
        }) => STORE,
        Error::Interrupted => INTERRUPTED,
        _ => FAILURE,
    }
}
