//! Per-file keys derived from the DEK (RFC 5869 HKDF-SHA256, salt = file id):
//! - `HKDF[file_id, "sealfs v1 payload key"](DEK, 32)`: the AES-256-GCM chunk key;
//! - `HKDF[file_id, "sealfs v1 header mac"](DEK, 32)`: the HMAC-SHA256 header key. Since
//!   HMAC-SHA256 is collision resistant, a verified MAC commits to the DEK: no second key
//!   can open the same header (the AWS Encryption SDK's committing suites do the same).

use ring::{hkdf, hmac};

use super::aead::ChunkCipher;
use zeroize::Zeroize;

use super::secret::Dek;

const PAYLOAD_INFO: &[u8] = b"sealfs v1 payload key";
const MAC_INFO: &[u8] = b"sealfs v1 header mac";

/// The keys of one open file. Holds ring key schedules (heap); never logged.
pub struct FileKeys {
    pub(crate) payload: ChunkCipher,
    mac: hmac::Key,
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
    pub fn derive(dek: &Dek, file_id: &[u8; 16]) -> Self {
        let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, file_id).extract(dek.expose());
        let mut k = [0u8; 32];
        expand(&prk, PAYLOAD_INFO, &mut k);
        let payload = ChunkCipher::new(&k);
        expand(&prk, MAC_INFO, &mut k);
        let mac = hmac::Key::new(hmac::HMAC_SHA256, &k);
        k.zeroize();
        Self { payload, mac }
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
