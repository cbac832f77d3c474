//! Per-file keys derived from the DEK (RFC 5869 HKDF-SHA256, salt = file id):
//! - `HKDF[file_id, "sealfs v1 payload key"](DEK, 32)`: the AES-256-GCM chunk key;
//! - `HKDF[file_id, "sealfs v1 header mac"](DEK, 32)`: the HMAC-SHA256 header key. Since
//!   HMAC-SHA256 is collision resistant, a verified MAC commits to the DEK: no second key
//!   can open the same header (the AWS Encryption SDK's committing suites do the same).

use ring::{hkdf, hmac};

use zeroize::Zeroize;

use super::aead::ChunkCipher;
use super::locked::{LockError, Locked};
use super::secret::Dek;

const PAYLOAD_INFO: &[u8] = b"sealfs v1 payload key";
const MAC_INFO: &[u8] = b"sealfs v1 header mac";

/// The keys of one open file: the chunk cipher's key schedule and the HMAC key (ring keeps
/// its inner and outer SHA-256 states inline), each in locked, zeroized memory like the
/// DEK they come from. Never logged.
pub struct FileKeys {
    pub(crate) payload: ChunkCipher,
    mac: Locked<hmac::Key>,
}

/// The header MAC did not verify: wrong DEK for this header, or a tampered header.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("header authentication failed (tampered header or a key that does not belong to it)")]
pub struct HeaderMacError;

struct Len(usize);
impl hkdf::KeyType for Len {
    fn len(&self) -> usize {
        self.0
    }
}

fn expand(prk: &hkdf::Prk, info: &[u8], out: &mut [u8]) {
    let n = out.len();
    // Only fails for outputs longer than 255 * 32 bytes; ours are 32.
    prk.expand(&[info], Len(n))
        .and_then(|okm| okm.fill(out))
        .expect("HKDF output length");
}

impl FileKeys {
    /// Fails only when locked memory is refused (RLIMIT_MEMLOCK).
    pub fn derive(dek: &Dek, file_id: &[u8; 16]) -> Result<Self, LockError> {
        let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, file_id).extract(dek.expose());
        let mut k = [0u8; 32];
        expand(&prk, PAYLOAD_INFO, &mut k);
        let payload = ChunkCipher::new(&k);
        expand(&prk, MAC_INFO, &mut k);
        let mac = Locked::new(hmac::Key::new(hmac::HMAC_SHA256, &k));
        k.zeroize();
        Ok(Self {
            payload: payload?,
            mac: mac?,
        })
    }

    /// Where the key schedules live (for tests that check they are locked).
    pub fn schedule_addrs(&self) -> [usize; 2] {
        [self.payload.schedule_addr(), self.mac.addr()]
    }

    /// HMAC-SHA256 over the authenticated header bytes.
    pub fn header_mac(&self, authenticated: &[u8]) -> [u8; 32] {
        let tag = hmac::sign(&self.mac, authenticated);
        let mut out = [0u8; 32];
        out.copy_from_slice(tag.as_ref());
        out
    }

    /// Constant-time check of the header MAC.
    pub fn verify_header(
        &self,
        authenticated: &[u8],
        mac: &[u8; 32],
    ) -> Result<(), HeaderMacError> {
        hmac::verify(&self.mac, authenticated, mac).map_err(|_| HeaderMacError)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::locked::is_locked_undumpable;

    #[test]
    fn derived_keys_live_in_locked_memory() {
        let dek = Dek::from_slice_zeroizing(&mut [3; 32]).unwrap();
        let keys = FileKeys::derive(&dek, &[1; 16]).unwrap();
        for a in keys.schedule_addrs() {
            assert!(
                is_locked_undumpable(a),
                "key schedule at {a:#x} is not locked"
            );
        }
        // Same keys as before the move: the MAC of a fixed input is pinned.
        assert_eq!(
            hex::encode(keys.header_mac(b"sealfs")),
            hex::encode(hmac::sign(
                &hmac::Key::new(hmac::HMAC_SHA256, &{
                    let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, &[1; 16]).extract(&[3; 32]);
                    let mut k = [0u8; 32];
                    expand(&prk, MAC_INFO, &mut k);
                    k
                }),
                b"sealfs"
            ))
        );
    }
}
