//! The chunk AES-256-GCM backend: `ring` or `aws-lc-rs`, whichever is faster on this CPU.
//!
//! Neither wins everywhere (benches/aead.rs: aws-lc-rs 1.6× ring with AVX-512, ring 2×
//! aws-lc-rs on AVX2-only EPYC), so the process measures both once, on first use, over a
//! 256 KiB buffer (well under 1 ms), and keeps the winner. `SEALFS_AEAD=ring|aws-lc` overrides.
//! Both are the same algorithm with the same bytes on the wire; the vectors pin that.

use std::sync::OnceLock;
use std::time::Instant;

/// Which implementation seals and opens chunks in this process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Ring,
    AwsLc,
}

impl Backend {
    pub fn name(self) -> &'static str {
        match self {
            Backend::Ring => "ring",
            Backend::AwsLc => "aws-lc-rs",
        }
    }
}

/// The backend of this process (measured once).
pub fn backend() -> Backend {
    static CHOSEN: OnceLock<Backend> = OnceLock::new();
    *CHOSEN.get_or_init(|| match std::env::var("SEALFS_AEAD").as_deref() {
        Ok("ring") => Backend::Ring,
        Ok("aws-lc") => Backend::AwsLc,
        _ => calibrate(),
    })
}

fn calibrate() -> Backend {
    let best = |b: Backend| {
        let key = ChunkCipher::with_backend(b, &[7; 32]);
        let mut buf = vec![0u8; 256 << 10];
        (0..5)
            .map(|i| {
                let t = Instant::now();
                let _ = key.seal(&nonce(i), &[0; 41], &mut buf);
                t.elapsed()
            })
            .min()
            .unwrap_or_default()
    };
    let (r, a) = (best(Backend::Ring), best(Backend::AwsLc));
    let chosen = if a < r { Backend::AwsLc } else { Backend::Ring };
    tracing::debug!(ring = ?r, aws_lc = ?a, chosen = chosen.name(), "AES-GCM backend calibrated");
    chosen
}

fn nonce(i: u64) -> [u8; 12] {
    let mut n = [0u8; 12];
    n[..8].copy_from_slice(&i.to_be_bytes());
    n
}

/// An AES-256-GCM key in the chosen backend. One per open file, so the size difference
/// between the variants (ring's inline key schedule) does not matter.
#[allow(clippy::large_enum_variant)]
pub enum ChunkCipher {
    Ring(ring::aead::LessSafeKey),
    AwsLc(aws_lc_rs::aead::LessSafeKey),
}

/// The tag did not verify.
#[derive(Debug)]
pub struct Unauthentic;

impl ChunkCipher {
    pub fn new(key: &[u8; 32]) -> Self {
        Self::with_backend(backend(), key)
    }

    pub fn with_backend(b: Backend, key: &[u8; 32]) -> Self {
        match b {
            Backend::Ring => {
                let k = ring::aead::UnboundKey::new(&ring::aead::AES_256_GCM, key)
                    .expect("32-byte key");
                ChunkCipher::Ring(ring::aead::LessSafeKey::new(k))
            }
            Backend::AwsLc => {
                let k = aws_lc_rs::aead::UnboundKey::new(&aws_lc_rs::aead::AES_256_GCM, key)
                    .expect("32-byte key");
                ChunkCipher::AwsLc(aws_lc_rs::aead::LessSafeKey::new(k))
            }
        }
    }

    /// Encrypts `data` in place; returns the tag.
    pub fn seal(&self, nonce: &[u8; 12], aad: &[u8], data: &mut [u8]) -> [u8; 16] {
        let mut out = [0u8; 16];
        match self {
            ChunkCipher::Ring(k) => {
                let n = ring::aead::Nonce::assume_unique_for_key(*nonce);
                let t = k
                    .seal_in_place_separate_tag(n, ring::aead::Aad::from(aad), data)
                    .expect("within GCM limits");
                out.copy_from_slice(t.as_ref());
            }
            ChunkCipher::AwsLc(k) => {
                let n = aws_lc_rs::aead::Nonce::assume_unique_for_key(*nonce);
                let t = k
                    .seal_in_place_separate_tag(n, aws_lc_rs::aead::Aad::from(aad), data)
                    .expect("within GCM limits");
                out.copy_from_slice(t.as_ref());
            }
        }
        out
    }

    /// Verifies `ciphertext || tag` and decrypts in place; returns the plaintext length.
    pub fn open(&self, nonce: &[u8; 12], aad: &[u8], buf: &mut [u8]) -> Result<usize, Unauthentic> {
        match self {
            ChunkCipher::Ring(k) => {
                let n = ring::aead::Nonce::assume_unique_for_key(*nonce);
                k.open_in_place(n, ring::aead::Aad::from(aad), buf)
                    .map(|p| p.len())
                    .map_err(|_| Unauthentic)
            }
            ChunkCipher::AwsLc(k) => {
                let n = aws_lc_rs::aead::Nonce::assume_unique_for_key(*nonce);
                k.open_in_place(n, aws_lc_rs::aead::Aad::from(aad), buf)
                    .map(|p| p.len())
                    .map_err(|_| Unauthentic)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backends_are_interchangeable() {
        let (r, a) = (
            ChunkCipher::with_backend(Backend::Ring, &[1; 32]),
            ChunkCipher::with_backend(Backend::AwsLc, &[1; 32]),
        );
        let mut x = b"same bytes on the wire".to_vec();
        let mut y = x.clone();
        let (tr, ta) = (
            r.seal(&nonce(3), b"aad", &mut x),
            a.seal(&nonce(3), b"aad", &mut y),
        );
        assert_eq!((x.clone(), tr), (y, ta));
        x.extend_from_slice(&tr);
        let mut z = x.clone();
        assert_eq!(a.open(&nonce(3), b"aad", &mut x).unwrap(), 22);
        z[0] ^= 1;
        assert!(r.open(&nonce(3), b"aad", &mut z).is_err());
        let _ = backend(); // calibration runs without panicking
    }
}
