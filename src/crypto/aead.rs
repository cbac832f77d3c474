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

/// An aws-lc AES-256-GCM context, initialized in place (it must not move once keyed), and
/// the key itself for [`ChunkCipher::open_pieces`]' streaming decrypt.
struct AwsLcGcm(aws_lc_sys::EVP_AEAD_CTX, [u8; 32]);

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
        Self(unsafe { std::mem::zeroed() }, [0; 32])
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
        self.1 = *key;
    }

    /// Decrypts `ciphertext` piece by piece into `out` with aws-lc's streaming AES-GCM and
    /// checks `tag`; true when it verifies. The context is keyed here and cleaned up before
    /// returning: its key schedule lives on aws-lc's heap only for this call (aws-lc's free
    /// zeroizes it), since that context cannot be placed in locked memory.
    fn open_stream(
        &self,
        nonce: &[u8; 12],
        aad: &[u8],
        ciphertext: &[&[u8]],
        tag: &[u8; TAG_LEN],
        out: &mut [u8],
    ) -> bool {
        if ciphertext.iter().map(|p| p.len()).sum::<usize>() != out.len() {
            return false;
        }
        // SAFETY: `ctx` is initialized before use and cleaned up on every path; each pointer
        // and length names a live buffer (lengths checked to fit an int); `out` has room for
        // exactly every ciphertext byte (checked above), and GCM writes exactly one output
        // byte per input byte. aws-lc takes the tag by a mutable pointer but only reads it.
        unsafe {
            let mut ctx: aws_lc_sys::EVP_CIPHER_CTX = std::mem::zeroed();
            aws_lc_sys::EVP_CIPHER_CTX_init(&mut ctx);
            let mut ok = aws_lc_sys::EVP_DecryptInit_ex(
                &mut ctx,
                aws_lc_sys::EVP_aes_256_gcm(),
                std::ptr::null_mut(),
                self.1.as_ptr(),
                nonce.as_ptr(),
            ) == 1;
            let mut n: std::os::raw::c_int = 0;
            ok = ok
                && i32::try_from(aad.len()).is_ok()
                && aws_lc_sys::EVP_DecryptUpdate(
                    &mut ctx,
                    std::ptr::null_mut(),
                    &mut n,
                    aad.as_ptr(),
                    aad.len() as i32,
                ) == 1;
            let mut at = 0usize;
            for p in ciphertext {
                if !ok {
                    break;
                }
                ok = i32::try_from(p.len()).is_ok()
                    && aws_lc_sys::EVP_DecryptUpdate(
                        &mut ctx,
                        out.as_mut_ptr().add(at),
                        &mut n,
                        p.as_ptr(),
                        p.len() as i32,
                    ) == 1
                    && n as usize == p.len();
                at += p.len();
            }
            ok = ok
                && aws_lc_sys::EVP_CIPHER_CTX_ctrl(
                    &mut ctx,
                    aws_lc_sys::EVP_CTRL_GCM_SET_TAG,
                    TAG_LEN as i32,
                    tag.as_ptr() as *mut std::ffi::c_void,
                ) == 1
                && aws_lc_sys::EVP_DecryptFinal_ex(&mut ctx, out.as_mut_ptr().add(at), &mut n) == 1;
            aws_lc_sys::EVP_CIPHER_CTX_cleanup(&mut ctx);
            ok
        }
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

impl ChunkCipher {
    /// [`ChunkCipher::open`] of `ciphertext || tag` handed over in pieces (a GET body as it
    /// arrived), decrypted into `out`, which must hold the whole sealed chunk; returns the
    /// plaintext length, `out[..len]`. With aws-lc the pieces are decrypted straight into
    /// `out` (no copy: a cold read's fill costs half, benches/fill.rs); with ring they are
    /// copied in and opened in place. On failure `out` may hold unauthenticated bytes: the
    /// caller wipes it.
    pub fn open_pieces(
        &self,
        nonce: &[u8; 12],
        aad: &[u8],
        pieces: &[&[u8]],
        out: &mut [u8],
    ) -> Result<usize, Unauthentic> {
        let total: usize = pieces.iter().map(|p| p.len()).sum();
        let len = total.checked_sub(TAG_LEN).ok_or(Unauthentic)?;
        if out.len() < total {
            return Err(Unauthentic);
        }
        match &self.0 {
            Key::AwsLc(k) => {
                // The ciphertext is the pieces less their last 16 bytes, the tag those bytes
                // (which may span pieces).
                let mut ct: Vec<&[u8]> = Vec::with_capacity(pieces.len());
                let mut tag = [0u8; TAG_LEN];
                let mut at = 0usize;
                for p in pieces {
                    let cut = len.saturating_sub(at).min(p.len());
                    if cut > 0 {
                        ct.push(&p[..cut]);
                    }
                    let rest = &p[cut..];
                    let t = (at + cut).saturating_sub(len);
                    tag[t..t + rest.len()].copy_from_slice(rest);
                    at += p.len();
                }
                if k.open_stream(nonce, aad, &ct, &tag, &mut out[..len]) {
                    Ok(len)
                } else {
                    Err(Unauthentic)
                }
            }
            Key::Ring(_) => {
                let mut at = 0;
                for p in pieces {
                    out[at..at + p.len()].copy_from_slice(p);
                    at += p.len();
                }
                self.open(nonce, aad, &mut out[..total])
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

    /// A sealed chunk handed over in pieces, split anywhere (the tag too), opens exactly as
    /// in place on both backends; a flipped bit anywhere, or an `out` too short, is refused.
    #[test]
    fn pieces_open_like_the_whole() {
        let aad = [5u8; 41];
        for b in [Backend::Ring, Backend::AwsLc] {
            let c = ChunkCipher::with_backend(b, &[6; 32]).unwrap();
            let plain: Vec<u8> = (0..5000).map(|i| (i * 13 + 1) as u8).collect();
            let mut sealed = plain.clone();
            let tag = c.seal(&nonce(9), &aad, &mut sealed);
            sealed.extend_from_slice(&tag);
            let n = sealed.len();
            for cuts in [
                vec![],
                vec![1],
                vec![n - 16],
                vec![n - 15, n - 1],
                vec![7, 4096, n - 8],
            ] {
                let mut pieces = Vec::new();
                let mut at = 0;
                for &c in cuts.iter().chain([n].iter()) {
                    pieces.push(&sealed[at..c]);
                    at = c;
                }
                let mut out = vec![0u8; n];
                assert_eq!(
                    c.open_pieces(&nonce(9), &aad, &pieces, &mut out).unwrap(),
                    5000
                );
                assert_eq!(out[..5000], plain[..], "{b:?} {cuts:?}");
                for flip in [0, 4999, n - 16, n - 1] {
                    let mut bad = sealed.clone();
                    bad[flip] ^= 1;
                    let mut at = 0;
                    let mut bad_pieces = Vec::new();
                    for &c in cuts.iter().chain([n].iter()) {
                        bad_pieces.push(&bad[at..c]);
                        at = c;
                    }
                    assert!(c
                        .open_pieces(&nonce(9), &aad, &bad_pieces, &mut out)
                        .is_err());
                }
                assert!(
                    c.open_pieces(&nonce(8), &aad, &pieces, &mut out).is_err(),
                    "nonce"
                );
                assert!(c
                    .open_pieces(&nonce(9), &aad, &pieces, &mut out[..n - 1])
                    .is_err());
            }
            assert!(c
                .open_pieces(&nonce(0), &aad, &[&[0u8; 15][..]], &mut [0u8; 16])
                .is_err());
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
