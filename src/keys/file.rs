//! `file:<path>`: a local 256-bit KEK for development and air-gapped sites.
//!
//! File: one line `sealfs-kek-v1:<64 hex digits>`, mode 0600. Wrapping is
//! AES-256-GCM under `HKDF[-, "sealfs v1 kek wrap"](KEK, 32)` with a random 96-bit nonce and
//! AAD = `"sealfs v1 wrap" || canonical encryption context`:
//! `wrapped = nonce (12) || encrypted DEK (32) || tag (16)`.

use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;

use ring::aead::{self, Aad, LessSafeKey, Nonce, UnboundKey};
use ring::hkdf;
use zeroize::{Zeroize, Zeroizing};

use super::KeyError;
use crate::crypto::{random_bytes, secret::DEK_LEN, Dek};
use crate::format::header::encode_context;
use crate::format::EncryptionContext;

const PREFIX: &str = "sealfs-kek-v1:";
const WRAP_INFO: &[u8] = b"sealfs v1 kek wrap";
const WRAP_AAD: &[u8] = b"sealfs v1 wrap";
const ID_LABEL: &[u8] = b"sealfs v1 kek id";

/// A loaded key file.
pub struct FileKek {
    wrap_key: LessSafeKey,
    id: String,
    /// Unwrap attempts so far: the keyring tests count them.
    #[cfg(test)]
    pub(crate) attempts: std::sync::atomic::AtomicUsize,
}

/// Writes a new random KEK to `path` with mode 0600; never overwrites.
pub fn keygen(path: &Path) -> Result<String, KeyError> {
    let err = |reason: String| KeyError::FileKey {
        path: path.display().to_string(),
        reason,
    };
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::AlreadyExists => KeyError::FileExists(path.display().to_string()),
            _ => err(e.to_string()),
        })?;
    let mut kek = Zeroizing::new([0u8; DEK_LEN]);
    random_bytes(&mut kek[..]);
    let mut line = Zeroizing::new(format!("{PREFIX}{}\n", hex::encode(&kek[..])));
    f.write_all(line.as_bytes())
        .and_then(|_| f.sync_all())
        .map_err(|e| err(e.to_string()))?;
    line.zeroize();
    Ok(fingerprint(&kek))
}

fn fingerprint(kek: &[u8; DEK_LEN]) -> String {
    let d = ring::digest::digest(&ring::digest::SHA256, &[ID_LABEL, &kek[..]].concat());
    format!("file:{}", hex::encode(&d.as_ref()[..16]))
}

impl FileKek {
    pub fn load(path: &Path) -> Result<Self, KeyError> {
        let err = |reason: &str| KeyError::FileKey {
            path: path.display().to_string(),
            reason: reason.into(),
        };
        let meta = std::fs::metadata(path).map_err(|e| err(&e.to_string()))?;
        if meta.permissions().mode() & 0o077 != 0 {
            return Err(err("readable by group or others; run `chmod 600` on it"));
        }
        let text = Zeroizing::new(std::fs::read_to_string(path).map_err(|e| err(&e.to_string()))?);
        let hexpart = text
            .trim_end()
            .strip_prefix(PREFIX)
            .ok_or_else(|| err("not a sealfs key file"))?;
        let mut kek = Zeroizing::new([0u8; DEK_LEN]);
        hex::decode_to_slice(hexpart, &mut kek[..]).map_err(|_| err("malformed key"))?;
        Ok(Self::from_bytes(&kek))
    }

    pub fn from_bytes(kek: &[u8; DEK_LEN]) -> Self {
        let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, &[]).extract(kek);
        let mut k = Zeroizing::new([0u8; 32]);
        prk.expand(&[WRAP_INFO], &aead::AES_256_GCM)
            .and_then(|okm| okm.fill(&mut k[..]))
            .expect("HKDF 32 bytes");
        let wrap_key =
            LessSafeKey::new(UnboundKey::new(&aead::AES_256_GCM, &k[..]).expect("32-byte key"));
        Self {
            wrap_key,
            id: fingerprint(kek),
            #[cfg(test)]
            attempts: Default::default(),
        }
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    fn aad(ctx: &EncryptionContext) -> Vec<u8> {
        let mut a = WRAP_AAD.to_vec();
        encode_context(ctx, &mut a);
        a
    }

    pub fn wrap(&self, dek: &Dek, ctx: &EncryptionContext) -> Vec<u8> {
        let mut nonce = [0u8; 12];
        random_bytes(&mut nonce);
        let mut out = Vec::with_capacity(12 + DEK_LEN + 16);
        out.extend_from_slice(&nonce);
        out.extend_from_slice(dek.expose());
        let tag = self
            .wrap_key
            .seal_in_place_separate_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(Self::aad(ctx)),
                &mut out[12..],
            )
            .expect("32-byte message");
        out.extend_from_slice(tag.as_ref());
        out
    }

    pub fn unwrap(&self, wrapped: &[u8], ctx: &EncryptionContext) -> Result<Dek, KeyError> {
        #[cfg(test)]
        self.attempts
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let fail = || KeyError::UnwrapFailed(self.id.clone());
        if wrapped.len() != 12 + DEK_LEN + 16 {
            return Err(fail());
        }
        let nonce = Nonce::try_assume_unique_for_key(&wrapped[..12]).map_err(|_| fail())?;
        let mut buf = Zeroizing::new(wrapped[12..].to_vec());
        let plain = self
            .wrap_key
            .open_in_place(nonce, Aad::from(Self::aad(ctx)), &mut buf)
            .map_err(|_| fail())?;
        Ok(Dek::from_slice_zeroizing(plain)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keygen_writes_0600_and_refuses_overwrite() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("k");
        let id = keygen(&p).unwrap();
        assert_eq!(
            std::fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert!(matches!(keygen(&p), Err(KeyError::FileExists(_))));
        assert_eq!(FileKek::load(&p).unwrap().id(), id);
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(matches!(FileKek::load(&p), Err(KeyError::FileKey { .. })));
    }

    #[test]
    fn wrap_is_bound_to_key_and_context() {
        let k1 = FileKek::from_bytes(&[1; 32]);
        let k2 = FileKek::from_bytes(&[2; 32]);
        let mut ctx = EncryptionContext::new();
        ctx.insert("a".into(), "b".into());
        let dek = Dek::from_slice_zeroizing(&mut [7; 32]).unwrap();
        let w = k1.wrap(&dek, &ctx);
        assert_eq!(k1.unwrap(&w, &ctx).unwrap().expose(), &[7; 32]);
        assert!(matches!(
            k2.unwrap(&w, &ctx),
            Err(KeyError::UnwrapFailed(_))
        ));
        let mut other = ctx.clone();
        other.insert("a".into(), "c".into());
        assert!(matches!(
            k1.unwrap(&w, &other),
            Err(KeyError::UnwrapFailed(_))
        ));
        let mut flipped = w.clone();
        flipped[20] ^= 1;
        assert!(matches!(
            k1.unwrap(&flipped, &ctx),
            Err(KeyError::UnwrapFailed(_))
        ));
    }
}
