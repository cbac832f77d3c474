//! The TEE key of one KBS exchange and the JWE a KBS answers a resource with.
//!
//! A fresh EC P-256 key per attestation (what guest-components' `kbs_protocol` sends by
//! default): its public half goes to the KBS as a JWK and is bound into the evidence; the KBS
//! encrypts the resource to it as a flattened JSON JWE, `ECDH-ES+A256KW` (RFC 7518 §4.6:
//! ECDH, Concat KDF with SHA-256, AES-256 key wrap of the content key) and `A256GCM` (AAD =
//! the protected header as sent). Only that pair is accepted: `none`, `RSA1_5`, `dir`, any
//! other `alg` or `enc`, an extra header member (`crit`, `zip`, `jku`, …), a point not on
//! P-256, a wrong length or a wrong tag is refused before the plaintext exists.
//!
//! The private scalar lives in locked, undumpable memory; aws-lc gets a copy only for the
//! one agreement (its `EVP_PKEY`, freed at once, and aws-lc zeroes what it frees).

use aws_lc_rs::agreement::{self, PrivateKey, UnparsedPublicKey, ECDH_P256};
use aws_lc_rs::key_wrap::{AesKek, KeyWrap, AES_256};
use base64::Engine;
use zeroize::Zeroizing;

use crate::crypto::locked::{LockError, Locked};
use crate::crypto::random_bytes;

/// The only key agreement and content encryption accepted.
pub const ALG: &str = "ECDH-ES+A256KW";
pub const ENC: &str = "A256GCM";
/// A JWE answer is a few hundred bytes for a key file; anything past this is refused unread.
pub const MAX_JWE: usize = 64 * 1024;
/// The most plaintext a resource may hold (a key file is 79 bytes).
pub const MAX_PLAINTEXT: usize = 4096;

/// Why a JWE was refused. Never carries key material or plaintext.
#[derive(Debug, thiserror::Error)]
pub enum JweError {
    #[error("the JWE is not the flattened JSON form expected: {0}")]
    Malformed(String),
    #[error("JWE algorithm {0:?} refused: only ECDH-ES+A256KW")]
    Alg(String),
    #[error("JWE content encryption {0:?} refused: only A256GCM")]
    Enc(String),
    #[error("the JWE's ephemeral key is not a point on P-256")]
    BadPoint,
    #[error("the JWE's wrapped content key did not unwrap (not for this TEE key, or tampered)")]
    KeyUnwrap,
    #[error("the JWE's ciphertext did not authenticate (wrong tag or tampered)")]
    Tag,
    #[error("JWE longer than {0} bytes")]
    TooLong(usize),
    #[error(transparent)]
    Lock(#[from] LockError),
}

fn b64u() -> base64::engine::GeneralPurpose {
    base64::engine::general_purpose::URL_SAFE_NO_PAD
}

/// Strict base64url (no padding) of exactly `len` bytes, or of at most `max` when `len` is 0.
fn field(name: &str, s: &str, len: usize, max: usize) -> Result<Vec<u8>, JweError> {
    let bound = if len > 0 { len } else { max };
    if s.len() > bound.div_ceil(3) * 4 {
        return Err(JweError::Malformed(format!("{name} is too long")));
    }
    let v = b64u()
        .decode(s)
        .map_err(|_| JweError::Malformed(format!("{name} is not base64url")))?;
    if (len > 0 && v.len() != len) || v.len() > bound {
        return Err(JweError::Malformed(format!(
            "{name} is {} bytes, expected {}",
            v.len(),
            if len > 0 { len } else { max }
        )));
    }
    Ok(v)
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Flattened {
    protected: String,
    encrypted_key: String,
    iv: String,
    ciphertext: String,
    tag: String,
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Protected {
    alg: String,
    enc: String,
    epk: Option<Epk>,
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Epk {
    kty: String,
    crv: String,
    x: String,
    y: String,
}

/// A released resource in locked, undumpable memory (zeroized on drop): the JWE is opened
/// in place here, so the key file it carries never sits in ordinary heap.
pub struct Plaintext(Locked<PlainBuf>);

struct PlainBuf {
    buf: [u8; MAX_PLAINTEXT + 16],
    len: usize,
}

/// Never the bytes: only how many.
impl std::fmt::Debug for Plaintext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Plaintext({} bytes)", self.0.len)
    }
}

impl Plaintext {
    fn empty() -> Result<Self, LockError> {
        Ok(Self(Locked::new(PlainBuf {
            buf: [0u8; MAX_PLAINTEXT + 16],
            len: 0,
        })?))
    }

    /// A copy of `b` (at most [`MAX_PLAINTEXT`] bytes: longer is `None`), e.g. a CDH's answer.
    pub fn copy_of(b: &[u8]) -> Result<Option<Self>, LockError> {
        if b.len() > MAX_PLAINTEXT {
            return Ok(None);
        }
        let mut p = Self::empty()?;
        p.0.buf[..b.len()].copy_from_slice(b);
        p.0.len = b.len();
        Ok(Some(p))
    }

    pub fn bytes(&self) -> &[u8] {
        &self.0.buf[..self.0.len]
    }

    #[cfg(test)]
    fn address(&self) -> usize {
        &*self.0 as *const PlainBuf as usize
    }
}

/// The TEE key of one exchange (reused with its attestation token until that expires).
pub struct TeeKey {
    scalar: Locked<[u8; 32]>,
    /// The public point's coordinates, base64url.
    x: String,
    y: String,
}

impl TeeKey {
    pub fn generate() -> Result<Self, JweError> {
        let mut scalar = Locked::new([0u8; 32])?;
        // A random 32-byte string is a valid scalar but for a 2^-32 chance (>= n or 0).
        loop {
            random_bytes(&mut scalar[..]);
            let Ok(k) = PrivateKey::from_private_key(&ECDH_P256, &scalar[..]) else {
                continue;
            };
            let public = k
                .compute_public_key()
                .map_err(|_| JweError::Malformed("no public key".into()))?;
            let p = public.as_ref();
            // Uncompressed SEC1: 0x04 || x || y.
            if p.len() != 65 || p[0] != 4 {
                return Err(JweError::Malformed("unexpected public key form".into()));
            }
            return Ok(Self {
                scalar,
                x: b64u().encode(&p[1..33]),
                y: b64u().encode(&p[33..]),
            });
        }
    }

    /// The public JWK as guest-components sends it (the KBS encrypts to it; the evidence
    /// binds it). Members in RFC 8785 order, which [`Self::jwk_jcs`] relies on.
    pub fn jwk(&self) -> serde_json::Value {
        serde_json::json!({"alg": ALG, "crv": "P-256", "kty": "EC", "x": self.x, "y": self.y})
    }

    /// The JWK in RFC 8785 canonical form (sorted members, no spaces): base64url and the
    /// fixed strings need no escaping.
    pub fn jwk_jcs(&self) -> String {
        format!(
            r#"{{"alg":"{ALG}","crv":"P-256","kty":"EC","x":"{}","y":"{}"}}"#,
            self.x, self.y
        )
    }

    /// Opens a flattened JSON JWE to this key. Every check happens before the content key
    /// is used; the plaintext exists only in locked memory.
    pub fn decrypt(&self, body: &[u8]) -> Result<Plaintext, JweError> {
        if body.len() > MAX_JWE {
            return Err(JweError::TooLong(MAX_JWE));
        }
        let jwe: Flattened = serde_json::from_slice(body)
            .map_err(|e| JweError::Malformed(crate::keys::json_error(&e)))?;
        let header = field("protected", &jwe.protected, 0, 1024)?;
        let header: Protected = serde_json::from_slice(&header).map_err(|e| {
            JweError::Malformed(format!("protected header: {}", crate::keys::json_error(&e)))
        })?;
        if header.alg != ALG {
            return Err(JweError::Alg(crate::format::naming::printable(
                &header.alg,
                32,
            )));
        }
        if header.enc != ENC {
            return Err(JweError::Enc(crate::format::naming::printable(
                &header.enc,
                32,
            )));
        }
        let epk = header
            .epk
            .ok_or_else(|| JweError::Malformed("no epk in the protected header".into()))?;
        if epk.kty != "EC" || epk.crv != "P-256" {
            return Err(JweError::BadPoint);
        }
        let mut point = Vec::with_capacity(65);
        point.push(4);
        point.extend(field("epk.x", &epk.x, 32, 32)?);
        point.extend(field("epk.y", &epk.y, 32, 32)?);
        let wrapped = field("encrypted_key", &jwe.encrypted_key, 40, 40)?;
        let iv = field("iv", &jwe.iv, 12, 12)?;
        let tag = field("tag", &jwe.tag, 16, 16)?;
        let ciphertext = field("ciphertext", &jwe.ciphertext, 0, MAX_PLAINTEXT)?;

        let private = PrivateKey::from_private_key(&ECDH_P256, &self.scalar[..])
            .map_err(|_| JweError::Malformed("TEE key".into()))?;
        // aws-lc parses the point and refuses one off the curve (or at infinity).
        let kek: Zeroizing<[u8; 32]> = agreement::agree(
            &private,
            UnparsedPublicKey::new(&ECDH_P256, &point),
            JweError::BadPoint,
            |z| Ok(concat_kdf(z)),
        )?;
        drop(private);
        let mut cek = Zeroizing::new([0u8; 40]);
        let cek_len = AesKek::new(&AES_256, &kek[..])
            .and_then(|k| k.unwrap(&wrapped, &mut cek[..]).map(|o| o.len()))
            .map_err(|_| JweError::KeyUnwrap)?;
        if cek_len != 32 {
            return Err(JweError::KeyUnwrap);
        }
        let key = aws_lc_rs::aead::LessSafeKey::new(
            aws_lc_rs::aead::UnboundKey::new(&aws_lc_rs::aead::AES_256_GCM, &cek[..32])
                .map_err(|_| JweError::KeyUnwrap)?,
        );
        let nonce = aws_lc_rs::aead::Nonce::try_assume_unique_for_key(&iv)
            .map_err(|_| JweError::Malformed("iv".into()))?;
        let mut out = Plaintext::empty()?;
        let n = ciphertext.len();
        out.0.buf[..n].copy_from_slice(&ciphertext);
        out.0.buf[n..n + 16].copy_from_slice(&tag);
        let opened = key
            .open_in_place(
                nonce,
                aws_lc_rs::aead::Aad::from(jwe.protected.as_bytes()),
                &mut out.0.buf[..n + 16],
            )
            .map_err(|_| JweError::Tag)?
            .len();
        out.0.len = opened;
        Ok(out)
    }
}

/// RFC 7518 §4.6.2: Concat KDF (NIST SP 800-56A) with SHA-256 for 256 bits, one round:
/// SHA-256(1 || Z || len(alg) || alg || len(apu)=0 || len(apv)=0 || 256).
fn concat_kdf(z: &[u8]) -> Zeroizing<[u8; 32]> {
    let mut ctx = aws_lc_rs::digest::Context::new(&aws_lc_rs::digest::SHA256);
    ctx.update(&1u32.to_be_bytes());
    ctx.update(z);
    ctx.update(&(ALG.len() as u32).to_be_bytes());
    ctx.update(ALG.as_bytes());
    ctx.update(&0u32.to_be_bytes());
    ctx.update(&0u32.to_be_bytes());
    ctx.update(&256u32.to_be_bytes());
    let mut out = Zeroizing::new([0u8; 32]);
    out.copy_from_slice(ctx.finish().as_ref());
    out
}

/// Builds a JWE as a KBS does (for the fake KBS of the tests and the fuzz fixtures): the
/// sender side of the same algorithms.
#[doc(hidden)]
pub fn encrypt_for_tests(jwk: &serde_json::Value, plaintext: &[u8]) -> serde_json::Value {
    let d = |k: &str| {
        b64u()
            .decode(jwk[k].as_str().expect("jwk coordinate"))
            .expect("base64url")
    };
    let mut peer = vec![4u8];
    peer.extend(d("x"));
    peer.extend(d("y"));
    let eph = PrivateKey::generate(&ECDH_P256).expect("key");
    let epub = eph.compute_public_key().expect("public");
    let kek = agreement::agree(&eph, UnparsedPublicKey::new(&ECDH_P256, &peer), (), |z| {
        Ok(concat_kdf(z))
    })
    .expect("agree");
    let mut cek = [0u8; 32];
    random_bytes(&mut cek);
    let mut wrapped = [0u8; 40];
    AesKek::new(&AES_256, &kek[..])
        .expect("kek")
        .wrap(&cek, &mut wrapped)
        .expect("wrap");
    let e = epub.as_ref();
    let header = serde_json::json!({"alg": ALG, "enc": ENC,
        "epk": {"crv": "P-256", "kty": "EC", "x": b64u().encode(&e[1..33]), "y": b64u().encode(&e[33..])}});
    let protected = b64u().encode(header.to_string());
    let mut iv = [0u8; 12];
    random_bytes(&mut iv);
    let key = aws_lc_rs::aead::LessSafeKey::new(
        aws_lc_rs::aead::UnboundKey::new(&aws_lc_rs::aead::AES_256_GCM, &cek).expect("cek"),
    );
    let mut data = plaintext.to_vec();
    let tag = key
        .seal_in_place_separate_tag(
            aws_lc_rs::aead::Nonce::assume_unique_for_key(iv),
            aws_lc_rs::aead::Aad::from(protected.as_bytes()),
            &mut data,
        )
        .expect("seal");
    serde_json::json!({"protected": protected, "encrypted_key": b64u().encode(wrapped),
        "iv": b64u().encode(iv), "ciphertext": b64u().encode(&data), "tag": b64u().encode(tag.as_ref())})
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reencode_header(jwe: &mut serde_json::Value, f: impl FnOnce(&mut serde_json::Value)) {
        let mut h: serde_json::Value =
            serde_json::from_slice(&b64u().decode(jwe["protected"].as_str().unwrap()).unwrap())
                .unwrap();
        f(&mut h);
        jwe["protected"] = b64u().encode(h.to_string()).into();
    }

    #[test]
    fn round_trip_and_each_bad_jwe_is_refused() {
        let k = TeeKey::generate().unwrap();
        let good = encrypt_for_tests(&k.jwk(), b"sealfs-kek-v1:00\n");
        let open = |v: &serde_json::Value| k.decrypt(v.to_string().as_bytes());
        let p = open(&good).unwrap();
        assert_eq!(p.bytes(), b"sealfs-kek-v1:00\n");
        assert!(crate::crypto::locked::is_locked_undumpable(p.address()));

        let mut j = good.clone();
        reencode_header(&mut j, |h| h["alg"] = "none".into());
        assert_eq!(
            open(&j).unwrap_err().to_string(),
            JweError::Alg("none".into()).to_string()
        );
        let mut j = good.clone();
        reencode_header(&mut j, |h| h["alg"] = "RSA1_5".into());
        assert_eq!(
            open(&j).unwrap_err().to_string(),
            JweError::Alg("RSA1_5".into()).to_string()
        );
        let mut j = good.clone();
        reencode_header(&mut j, |h| h["enc"] = "A128CBC-HS256".into());
        assert_eq!(
            open(&j).unwrap_err().to_string(),
            JweError::Enc("A128CBC-HS256".into()).to_string()
        );
        let mut j = good.clone();
        reencode_header(&mut j, |h| h["crit"] = serde_json::json!(["exp"]));
        assert!(matches!(open(&j).unwrap_err(), JweError::Malformed(_)));
        // A point off the curve: y + 1.
        let mut j = good.clone();
        reencode_header(&mut j, |h| {
            let mut y = b64u().decode(h["epk"]["y"].as_str().unwrap()).unwrap();
            y[31] ^= 1;
            h["epk"]["y"] = b64u().encode(y).into();
        });
        assert_eq!(
            open(&j).unwrap_err().to_string(),
            JweError::BadPoint.to_string()
        );
        // A flipped tag, ciphertext byte or wrapped-key byte.
        let mut j = good.clone();
        let mut t = b64u().decode(j["tag"].as_str().unwrap()).unwrap();
        t[0] ^= 1;
        j["tag"] = b64u().encode(t).into();
        assert_eq!(open(&j).unwrap_err().to_string(), JweError::Tag.to_string());
        let mut j = good.clone();
        let mut c = b64u().decode(j["ciphertext"].as_str().unwrap()).unwrap();
        c[0] ^= 1;
        j["ciphertext"] = b64u().encode(c).into();
        assert_eq!(open(&j).unwrap_err().to_string(), JweError::Tag.to_string());
        let mut j = good.clone();
        let mut w = b64u().decode(j["encrypted_key"].as_str().unwrap()).unwrap();
        w[5] ^= 1;
        j["encrypted_key"] = b64u().encode(w).into();
        assert_eq!(
            open(&j).unwrap_err().to_string(),
            JweError::KeyUnwrap.to_string()
        );
        // To another TEE key.
        let other = TeeKey::generate().unwrap();
        let j = encrypt_for_tests(&other.jwk(), b"x");
        assert_eq!(
            open(&j).unwrap_err().to_string(),
            JweError::KeyUnwrap.to_string()
        );
        // Shapes.
        let mut j = good.clone();
        j["iv"] = b64u().encode([0u8; 16]).into();
        assert!(matches!(open(&j).unwrap_err(), JweError::Malformed(m) if m.contains("iv")));
        let mut j = good.clone();
        j["aad"] = "x".into();
        assert!(matches!(open(&j).unwrap_err(), JweError::Malformed(_)));
        assert!(matches!(
            k.decrypt(b"not json"),
            Err(JweError::Malformed(_))
        ));
        assert_eq!(
            k.decrypt(&vec![b' '; MAX_JWE + 1]).unwrap_err().to_string(),
            JweError::TooLong(MAX_JWE).to_string()
        );
    }

    #[test]
    fn the_scalar_is_in_locked_memory_and_the_jwk_is_canonical() {
        let k = TeeKey::generate().unwrap();
        let addr = &*k.scalar as *const [u8; 32] as usize;
        assert!(crate::crypto::locked::is_locked_undumpable(addr));
        let v: serde_json::Value = serde_json::from_str(&k.jwk_jcs()).unwrap();
        assert_eq!(v, k.jwk());
        assert!(!k.jwk_jcs().contains(' '));
    }
}
