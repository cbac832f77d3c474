//! The chunk AES-256-GCM backend: `ring` or `aws-lc-rs`, whichever is faster on this CPU.
//!
//! Neither wins everywhere (benches/aead.rs: aws-lc-rs 1.6× ring with AVX-512, ring 2×
//! aws-lc-rs on AVX2-only EPYC), so the process measures both once, on first use, over a
//! 256 KiB buffer (well under 1 ms), and keeps the winner. `SEALFS_AEAD=ring|aws-lc` overrides.
//! Both are the same algorithm with the same bytes on the wire; the vectors pin that.

use std::sync::OnceLock;
use std::time::Instant;

use super::locked::{LockError, Locked};

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
        let Ok(key) = ChunkCipher::with_backend(b, &[7; 32]) else {
            // No locked memory: the first file open reports it; either backend will do.
            return std::time::Duration::MAX;
        };
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

/// An AES-256-GCM key in the chosen backend, its key schedule in locked memory (see
/// `locked.rs`): as powerful as the DEK, so kept like it.
///
/// ring's `LessSafeKey` holds its schedule inline (no heap), so it is placed in a
/// [`Locked`] whole. aws-lc-rs's `LessSafeKey` keeps an `EVP_AEAD_CTX` on the C heap, out of
/// our reach, so for aws-lc the `EVP_AEAD_CTX` itself (AES-GCM state inline, no allocation)
/// is built in place in locked memory through aws-lc-sys, the library aws-lc-rs wraps.
pub struct ChunkCipher(Key);

enum Key {
    Ring(Locked<ring::aead::LessSafeKey>),
    AwsLc(Locked<AwsLcGcm>),
}

/// An aws-lc AES-256-GCM context, initialized in place (it must not move once keyed).
struct AwsLcGcm(aws_lc_sys::EVP_AEAD_CTX);

// SAFETY: after init the context is only read; aws-lc's seal/open take it by const pointer
// and may run concurrently on one context (aws-lc-rs's own AEAD keys are Send + Sync too).
unsafe impl Send for AwsLcGcm {}
// SAFETY: as above.
unsafe impl Sync for AwsLcGcm {}

impl AwsLcGcm {
    /// An unkeyed context (what `EVP_AEAD_CTX_zero` makes).
    fn zeroed() -> Self {
        // SAFETY: EVP_AEAD_CTX is a C struct of a raw pointer, bytes and a byte union; all
        // zero is its documented "zero" state, safe to clean up.
        Self(unsafe { std::mem::zeroed() })
    }

    /// Keys the context where it lies.
    fn init(&mut self, key: &[u8; 32]) {
        aws_lc_rs::init();
        // SAFETY: `self.0` is a zeroed context that stays put (it is inside a Locked);
        // key/len are valid; a null engine is the documented default.
        let ok = unsafe {
            aws_lc_sys::EVP_AEAD_CTX_init(
                &mut self.0,
                aws_lc_sys::EVP_aead_aes_256_gcm(),
                key.as_ptr(),
                key.len(),
                TAG_LEN,
                std::ptr::null_mut(),
            )
        };
        assert_eq!(ok, 1, "BUG: AES-256-GCM init with a 32-byte key failed");
    }
}

impl Drop for AwsLcGcm {
    fn drop(&mut self) {
        // SAFETY: a zeroed or initialized context; cleanup of either is defined (AES-GCM
        // owns nothing outside the struct; Locked zeroizes the bytes after this).
        unsafe { aws_lc_sys::EVP_AEAD_CTX_cleanup(&mut self.0) };
    }
}

const TAG_LEN: usize = 16;

/// The tag did not verify.
#[derive(Debug)]
pub struct Unauthentic;

impl ChunkCipher {
    pub fn new(key: &[u8; 32]) -> Result<Self, LockError> {
        Self::with_backend(backend(), key)
    }

    pub fn with_backend(b: Backend, key: &[u8; 32]) -> Result<Self, LockError> {
        Ok(Self(match b {
            Backend::Ring => {
                let k = ring::aead::UnboundKey::new(&ring::aead::AES_256_GCM, key)
                    .expect("32-byte key");
                Key::Ring(Locked::new(ring::aead::LessSafeKey::new(k))?)
            }
            Backend::AwsLc => {
                let mut ctx = Locked::new(AwsLcGcm::zeroed())?;
                ctx.init(key);
                Key::AwsLc(ctx)
            }
        }))
    }

    /// The address of the key schedule (for tests that check where secrets live).
    pub fn schedule_addr(&self) -> usize {
        match &self.0 {
            Key::Ring(k) => k.addr(),
            Key::AwsLc(k) => k.addr(),
        }
    }

    /// Encrypts `data` in place; returns the tag.
    pub fn seal(&self, nonce: &[u8; 12], aad: &[u8], data: &mut [u8]) -> [u8; 16] {
        let mut out = [0u8; TAG_LEN];
        match &self.0 {
            Key::Ring(k) => {
                let n = ring::aead::Nonce::assume_unique_for_key(*nonce);
                let t = k
                    .seal_in_place_separate_tag(n, ring::aead::Aad::from(aad), data)
                    .expect("within GCM limits");
                out.copy_from_slice(t.as_ref());
            }
            Key::AwsLc(k) => {
                let mut tag_len = 0usize;
                let p = data.as_mut_ptr();
                // SAFETY: in place (out == in exactly, which aws-lc allows) over `data`;
                // the tag buffer holds TAG_LEN bytes; no extra input; all lengths match
                // their buffers.
                let ok = unsafe {
                    aws_lc_sys::EVP_AEAD_CTX_seal_scatter(
                        &k.0,
                        p,
                        out.as_mut_ptr(),
                        &mut tag_len,
                        out.len(),
                        nonce.as_ptr(),
                        nonce.len(),
                        p,
                        data.len(),
                        std::ptr::null(),
                        0,
                        aad.as_ptr(),
                        aad.len(),
                    )
                };
                assert!(ok == 1 && tag_len == TAG_LEN, "within GCM limits");
            }
        }
        out
    }

    /// Verifies `ciphertext || tag` and decrypts in place; returns the plaintext length.
    pub fn open(&self, nonce: &[u8; 12], aad: &[u8], buf: &mut [u8]) -> Result<usize, Unauthentic> {
        match &self.0 {
            Key::Ring(k) => {
                let n = ring::aead::Nonce::assume_unique_for_key(*nonce);
                k.open_in_place(n, ring::aead::Aad::from(aad), buf)
                    .map(|p| p.len())
                    .map_err(|_| Unauthentic)
            }
            Key::AwsLc(k) => {
                let len = buf.len().checked_sub(TAG_LEN).ok_or(Unauthentic)?;
                let p = buf.as_mut_ptr();
                // SAFETY: in place over the first `len` bytes of `buf` (out == in exactly);
                // the tag is the TAG_LEN bytes after them, read only.
                let ok = unsafe {
                    aws_lc_sys::EVP_AEAD_CTX_open_gather(
                        &k.0,
                        p,
                        nonce.as_ptr(),
                        nonce.len(),
                        p,
                        len,
                        p.add(len),
                        TAG_LEN,
                        aad.as_ptr(),
                        aad.len(),
                    )
                };
                if ok == 1 {
                    Ok(len)
                } else {
                    Err(Unauthentic)
                }
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
            ChunkCipher::with_backend(Backend::Ring, &[1; 32]).unwrap(),
            ChunkCipher::with_backend(Backend::AwsLc, &[1; 32]).unwrap(),
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

    /// Both backends give the bytes of the crates' own `LessSafeKey`s (the previous
    /// representation), both ways, at several sizes, and refuse any flipped bit.
    #[test]
    fn in_place_backends_match_the_crates_own_keys() {
        let key = [9u8; 32];
        let aad = [4u8; 41];
        let reference = aws_lc_rs::aead::LessSafeKey::new(
            aws_lc_rs::aead::UnboundKey::new(&aws_lc_rs::aead::AES_256_GCM, &key).unwrap(),
        );
        for b in [Backend::Ring, Backend::AwsLc] {
            let c = ChunkCipher::with_backend(b, &key).unwrap();
            for size in [0usize, 1, 15, 16, 17, 4096, 100_003] {
                let plain: Vec<u8> = (0..size).map(|i| (i * 7 + 3) as u8).collect();
                let mut mine = plain.clone();
                let tag = c.seal(&nonce(size as u64), &aad, &mut mine);
                let mut theirs = plain.clone();
                let t = reference
                    .seal_in_place_separate_tag(
                        aws_lc_rs::aead::Nonce::assume_unique_for_key(nonce(size as u64)),
                        aws_lc_rs::aead::Aad::from(&aad),
                        &mut theirs,
                    )
                    .unwrap();
                assert_eq!((&mine, &tag[..]), (&theirs, t.as_ref()), "{b:?} {size}");
                mine.extend_from_slice(&tag);
                let mut flipped = mine.clone();
                assert_eq!(c.open(&nonce(size as u64), &aad, &mut mine).unwrap(), size);
                assert_eq!(mine[..size], plain[..]);
                flipped[size / 2] ^= 0x10;
                assert!(c.open(&nonce(size as u64), &aad, &mut flipped).is_err());
            }
            assert!(
                c.open(&nonce(0), &aad, &mut [0u8; 15]).is_err(),
                "shorter than a tag"
            );
        }
    }

    #[test]
    fn key_schedules_live_in_locked_memory() {
        for b in [Backend::Ring, Backend::AwsLc] {
            let c = ChunkCipher::with_backend(b, &[1; 32]).unwrap();
            assert!(
                crate::crypto::locked::is_locked_undumpable(c.schedule_addr()),
                "{b:?}"
            );
        }
    }
}
