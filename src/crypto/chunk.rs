//! One chunk: `AES-256-GCM(payload_key, nonce, aad, plaintext) -> ciphertext || tag`.
//!
//! - nonce (12) = `index u64 BE || 0x000000 || last u8`: derived, never stored; unique per
//!   chunk because the index is, and the key is unique per file (random DEK and file id).
//! - aad (41) = `header_digest (32) || index u64 BE || last u8`: binds the chunk to its
//!   header (and so its file, path, size), its position, and whether it ends the file.
//!   Reordering, truncation, extension and splicing between files all fail the tag.

use super::kdf::FileKeys;
use crate::format::TAG_LEN;

/// A chunk failed authentication: nothing of it may be used.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum ChunkError {
    #[error("chunk {0} failed authentication")]
    Auth(u64),
    #[error("chunk {index} has {got} bytes, expected {want}")]
    Length { index: u64, got: usize, want: usize },
}

fn nonce(index: u64, last: bool) -> [u8; 12] {
    let mut n = [0u8; 12];
    n[..8].copy_from_slice(&index.to_be_bytes());
    n[11] = last as u8;
    n
}

fn aad(header_digest: &[u8; 32], index: u64, last: bool) -> [u8; 41] {
    let mut a = [0u8; 41];
    a[..32].copy_from_slice(header_digest);
    a[32..40].copy_from_slice(&index.to_be_bytes());
    a[40] = last as u8;
    a
}

/// Encrypts `buf[..buf.len() - 16]` in place and writes the tag into the last 16 bytes.
pub fn seal_chunk(
    keys: &FileKeys,
    header_digest: &[u8; 32],
    index: u64,
    last: bool,
    buf: &mut [u8],
) {
    let split = buf.len() - TAG_LEN as usize;
    let (data, tag_out) = buf.split_at_mut(split);
    let a = aad(header_digest, index, last);
    let tag = keys.payload.seal(&nonce(index, last), &a, data);
    tag_out.copy_from_slice(&tag);
}

/// Verifies and decrypts `ciphertext || tag` in place. On success the plaintext is
/// `buf[..len - 16]` and the tag's bytes after it are zeroed; on failure `buf` is
/// zeroized, so no unauthenticated byte survives.
pub fn open_chunk(
    keys: &FileKeys,
    header_digest: &[u8; 32],
    index: u64,
    last: bool,
    expected_plain_len: usize,
    buf: &mut [u8],
) -> Result<usize, ChunkError> {
    let want = expected_plain_len + TAG_LEN as usize;
    if buf.len() != want {
        return Err(ChunkError::Length {
            index,
            got: buf.len(),
            want,
        });
    }
    let a = aad(header_digest, index, last);
    let opened = keys.payload.open(&nonce(index, last), &a, buf);
    settle(opened, index, buf)
}

/// [`open_chunk`] of a sealed chunk handed over in pieces (as a GET body arrives), decrypted
/// into `out` (which holds at least the whole sealed chunk); the plaintext is
/// `out[..len]`, and the 16 bytes after it are zeroed. On failure `out` is zeroized.
pub fn open_chunk_pieces(
    keys: &FileKeys,
    header_digest: &[u8; 32],
    index: u64,
    last: bool,
    expected_plain_len: usize,
    pieces: &[&[u8]],
    out: &mut [u8],
) -> Result<usize, ChunkError> {
    let want = expected_plain_len + TAG_LEN as usize;
    let got: usize = pieces.iter().map(|p| p.len()).sum();
    if got != want || out.len() < want {
        return Err(ChunkError::Length { index, got, want });
    }
    let a = aad(header_digest, index, last);
    let out = &mut out[..want];
    let opened = keys
        .payload
        .open_pieces(&nonce(index, last), &a, pieces, out);
    settle(opened, index, out)
}

/// What an open leaves in the sealed chunk's `buf`: on success the plaintext and zeroes
/// after it (the tag is not secret, but a buffer such as a cache slot then holds nothing
/// past the plaintext, whatever the backend); on failure zeroes only.
fn settle(
    opened: Result<usize, super::aead::Unauthentic>,
    index: u64,
    buf: &mut [u8],
) -> Result<usize, ChunkError> {
    match opened {
        Ok(n) => {
            buf[n..].fill(0);
            Ok(n)
        }
        Err(_) => {
            zeroize::Zeroize::zeroize(buf);
            Err(ChunkError::Auth(index))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::Dek;

    fn keys(b: u8) -> FileKeys {
        FileKeys::derive(&Dek::from_slice_zeroizing(&mut [b; 32]).unwrap(), &[1; 16]).unwrap()
    }

    #[test]
    fn round_trip_and_every_binding() {
        let k = keys(1);
        let hd = [3u8; 32];
        let mut buf = b"hello chunk".to_vec();
        buf.extend_from_slice(&[0; 16]);
        seal_chunk(&k, &hd, 5, false, &mut buf);
        let sealed = buf.clone();
        assert_eq!(open_chunk(&k, &hd, 5, false, 11, &mut buf), Ok(11));
        assert_eq!(&buf[..11], b"hello chunk");

        let cases: [(&str, u64, bool, [u8; 32], FileKeys); 4] = [
            ("other index", 6, false, hd, keys(1)),
            ("as last", 5, true, hd, keys(1)),
            ("other header", 5, false, [4; 32], keys(1)),
            ("other key", 5, false, hd, keys(2)),
        ];
        for (why, idx, last, h, key) in cases {
            let mut b = sealed.clone();
            assert_eq!(
                open_chunk(&key, &h, idx, last, 11, &mut b),
                Err(ChunkError::Auth(idx)),
                "{why}"
            );
            assert!(b.iter().all(|&x| x == 0), "{why}: buffer must be wiped");
            let mut out = [0xAAu8; 27];
            let pieces = [&sealed[..4], &sealed[4..20], &sealed[20..]];
            assert_eq!(
                open_chunk_pieces(&key, &h, idx, last, 11, &pieces, &mut out),
                Err(ChunkError::Auth(idx)),
                "{why}, in pieces"
            );
            assert!(out.iter().all(|&x| x == 0), "{why}: out must be wiped");
        }
        let mut out = [0u8; 27];
        let pieces = [&sealed[..4], &sealed[4..20], &sealed[20..]];
        assert_eq!(
            open_chunk_pieces(&k, &hd, 5, false, 11, &pieces, &mut out),
            Ok(11)
        );
        assert_eq!(&out[..11], b"hello chunk");
        assert!(matches!(
            open_chunk_pieces(&k, &hd, 5, false, 11, &pieces[..2], &mut out),
            Err(ChunkError::Length { .. })
        ));
        let mut b = sealed.clone();
        b[0] ^= 1;
        assert_eq!(
            open_chunk(&k, &hd, 5, false, 11, &mut b),
            Err(ChunkError::Auth(5))
        );
        let mut b = sealed[..26].to_vec();
        assert!(matches!(
            open_chunk(&k, &hd, 5, false, 11, &mut b),
            Err(ChunkError::Length { .. })
        ));
    }
}
