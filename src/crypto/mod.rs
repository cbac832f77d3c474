//! Cryptography of the sealed format, no I/O: DEK handling, key derivation, chunk AEAD.
//!
//! Primitives come from `ring`; chunk AES-GCM from ring or aws-lc-rs, whichever this CPU
//! runs faster (`aead.rs`; docs/PERFORMANCE.md).

pub mod aead;
pub mod chunk;
pub mod kdf;
pub mod locked;
pub mod secret;

pub use chunk::{open_chunk, open_chunk_pieces, seal_chunk, ChunkError};
pub use kdf::FileKeys;
pub use locked::LockError;
pub use secret::Dek;

/// SHA-256 of the authenticated header bytes: bound into every chunk's AAD.
pub fn header_digest(authenticated: &[u8]) -> [u8; 32] {
    let d = ring::digest::digest(&ring::digest::SHA256, authenticated);
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

/// SHA-256 of `bytes` (the manifest digest a publisher signs).
pub fn sha256(bytes: &[u8]) -> [u8; 32] {
    header_digest(bytes)
}

/// The digest of one sealed chunk in a model manifest: BLAKE3-256 (3.6x SHA-256 on this
/// path, which every byte read under `--trust-signer` takes; benches/aead.rs).
pub fn chunk_digest(sealed_chunk: &[u8]) -> [u8; 32] {
    chunk_digest_of(&[sealed_chunk])
}

/// [`chunk_digest`] of a sealed chunk handed over in pieces.
pub fn chunk_digest_of(pieces: &[&[u8]]) -> [u8; 32] {
    let mut h = blake3::Hasher::new();
    for p in pieces {
        h.update(p);
    }
    *h.finalize().as_bytes()
}

/// Fills `buf` from the system CSPRNG.
pub fn random_bytes(buf: &mut [u8]) {
    use ring::rand::SecureRandom;
    // The OS RNG failing is unrecoverable: sealing with a weak DEK or file id would be worse.
    ring::rand::SystemRandom::new()
        .fill(buf)
        .expect("system RNG failed");
}
