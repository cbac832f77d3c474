//! Models and their manifests: a directory seal is a model, and its manifest lists every
//! file (path, file id, header digest, sizes) and the SHA-256 of every sealed chunk.
//!
//! The manifest is itself a sealed file at `ROOT/.sealfs-manifest` (same keys, same path
//! binding), so a bucket writer can neither read nor forge it, and it reveals nothing: its
//! chunk digests are of *ciphertext*, which the store holds anyway. Every file of a model
//! names its model root in its encryption context (`sealfs:model`), so deleting the manifest
//! does not turn a model into loose files. A publisher may sign the manifest: the signature
//! object `ROOT/.sealfs-manifest.sig` (clear JSON, no secret) holds an ECDSA P-256
//! signature over the SHA-256 of the manifest's plaintext (docs/FORMAT.md, "Models").

use std::collections::{BTreeMap, HashSet};

use serde::{Deserialize, Serialize};

use crate::format::naming;
// The names of a model's objects live with the other names; kept here for callers.
pub use crate::format::naming::{is_reserved, manifest_root, under, MANIFEST_NAME, SIGNATURE_NAME};
pub use error::{ModelError, Unreadable};

pub mod error;
use crate::sign::TrustedSigners;

/// Largest manifest accepted (about a million chunks: 1 TiB at 1 MiB chunks).
pub const MAX_MANIFEST_LEN: u64 = 64 << 20;
/// Largest signature object accepted.
pub const MAX_SIGNATURE_LEN: usize = 64 << 10;

/// The manifest format this build writes and reads (`sealfs --version` names it).
pub const FORMAT: &str = "sealfs-manifest-v1";
/// The signature format this build writes and reads (`sealfs --version` names it).
pub const SIG_FORMAT: &str = "sealfs-signature-v1";
const ALGORITHM: &str = "ecdsa-p256-sha256";
const CHUNK_DIGEST: &str = "blake3";

/// A model manifest (its plaintext is this, as JSON).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub format: String,
    /// The model root: a key prefix relative to the store root ("" for the root).
    pub model: String,
    /// Set at seal time (`--model-version`, else the sealing time in milliseconds); a
    /// mount never goes back to a lower one.
    pub version: u64,
    /// Unix seconds.
    pub sealed_at: u64,
    /// The user pairs of the encryption context (`--context`).
    pub context: BTreeMap<String, String>,
    /// How `chunks` are computed: `blake3` (BLAKE3-256 of each sealed chunk).
    pub chunk_digest: String,
    pub files: Vec<FileEntry>,
}

/// One file of a model.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileEntry {
    /// Relative to the model root.
    pub path: String,
    /// Hex.
    pub file_id: String,
    /// Hex SHA-256 of the key object's authenticated header bytes (the chunks' AAD digest).
    pub header_sha256: String,
    pub format_version: u16,
    pub chunk_log2: u8,
    pub plaintext_size: u64,
    pub object_size: u64,
    /// Hex BLAKE3-256 of each sealed chunk (ciphertext and tag), in order.
    pub chunks: Vec<Digest>,
}

/// A 32-byte digest, written as 64 hex digits. Held as bytes: a manifest of a million
/// chunks is 32 MB in memory, not the ~90 MB its hex strings would take.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Digest(pub [u8; 32]);

impl Serialize for Digest {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&hex::encode(self.0))
    }
}

impl<'de> Deserialize<'de> for Digest {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = std::borrow::Cow::<str>::deserialize(d)?;
        let mut out = [0u8; 32];
        hex::decode_to_slice(s.as_bytes(), &mut out)
            .map_err(|_| serde::de::Error::custom("a digest is not 64 hex digits"))?;
        Ok(Digest(out))
    }
}

impl ModelError {
    /// Any error of loading model `root`, as a model error.
    pub fn from_load(root: &str, e: crate::Error) -> Self {
        match e {
            crate::Error::Model(m) => m,
            other => ModelError::Unreadable {
                model: root.to_string(),
                reason: crate::error_chain(&other),
                class: if other.is_access_denied() {
                    Unreadable::Denied
                } else if other.is_integrity() {
                    Unreadable::Tampered
                } else if matches!(other, crate::Error::Store(_)) {
                    Unreadable::Store
                } else {
                    Unreadable::Unavailable
                },
            },
        }
    }
}

impl Manifest {
    pub fn new(model: &str, version: u64, context: BTreeMap<String, String>) -> Self {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        Self {
            format: FORMAT.into(),
            model: model.into(),
            version: if version == 0 {
                now.as_millis() as u64
            } else {
                version
            },
            sealed_at: now.as_secs(),
            context,
            chunk_digest: CHUNK_DIGEST.into(),
            files: Vec::new(),
        }
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("a manifest always serializes")
    }

    /// Parses and checks manifest plaintext sealed at model root `root`.
    pub fn parse(bytes: &[u8], root: &str) -> Result<Self, ModelError> {
        let bad = |reason: String| ModelError::Malformed {
            model: root.to_string(),
            reason,
        };
        let m: Manifest = serde_json::from_slice(bytes).map_err(|e| bad(e.to_string()))?;
        if m.format != FORMAT {
            return Err(bad(format!(
                "unknown format {:?}",
                naming::escaped(&m.format)
            )));
        }
        if m.chunk_digest != CHUNK_DIGEST {
            return Err(bad(format!(
                "unknown chunk digest {:?}",
                naming::escaped(&m.chunk_digest)
            )));
        }
        if m.model != root {
            return Err(bad(format!(
                "made for model {:?}, found at {root:?}",
                naming::escaped(&m.model)
            )));
        }
        let mut seen = HashSet::new();
        for f in &m.files {
            naming::check_key(&f.path)
                .map_err(|why| bad(format!("file {:?}: {why}", naming::escaped(&f.path))))?;
            if !seen.insert(f.path.as_str()) {
                return Err(bad(format!("file {:?} listed twice", f.path)));
            }
            let n = crate::format::Layout::new(f.chunk_log2, f.plaintext_size)
                .map_err(|e| bad(format!("file {:?}: {e}", f.path)))?;
            if n.chunk_count() != f.chunks.len() as u64 || n.object_size() != f.object_size {
                return Err(bad(format!("file {:?}: sizes and chunks disagree", f.path)));
            }
            let hex32 = |s: &str| s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit());
            if !hex32(&f.header_sha256) || f.file_id.len() != 32 {
                return Err(bad(format!("file {:?}: malformed digest or id", f.path)));
            }
        }
        Ok(m)
    }

    pub fn file(&self, rel: &str) -> Option<&FileEntry> {
        self.files.iter().find(|f| f.path == rel)
    }
}

impl FileEntry {
    /// The chunk digests as bytes.
    pub fn chunk_digests(&self) -> Vec<[u8; 32]> {
        self.chunks.iter().map(|c| c.0).collect()
    }
}

/// The publisher signature object, in the clear (it reveals nothing about the plaintext:
/// the manifest it signs is sealed and holds random file ids).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SignatureObject {
    pub format: String,
    pub algorithm: String,
    /// `sha256:` + hex SHA-256 of the signer's SubjectPublicKeyInfo DER.
    pub signer: String,
    /// Where the key was held (`file`, `kms:ARN`): informative only.
    pub holder: String,
    pub model: String,
    pub version: u64,
    pub sealed_at: u64,
    /// Hex SHA-256 of the manifest plaintext.
    pub manifest_sha256: String,
    /// Hex ECDSA signature (ASN.1 DER) over [`crate::sign::signed_message`].
    pub signature: String,
}

impl SignatureObject {
    pub fn new(signer: &crate::sign::Signer, m: &Manifest, digest: &[u8; 32], sig: &[u8]) -> Self {
        Self {
            format: SIG_FORMAT.into(),
            algorithm: ALGORITHM.into(),
            signer: signer.id(),
            holder: signer.holder(),
            model: m.model.clone(),
            version: m.version,
            sealed_at: m.sealed_at,
            manifest_sha256: hex::encode(digest),
            signature: hex::encode(sig),
        }
    }

    pub fn parse(bytes: &[u8], root: &str) -> Result<Self, ModelError> {
        let bad = |reason: String| ModelError::Malformed {
            model: root.to_string(),
            reason: format!("signature object: {reason}"),
        };
        let s: SignatureObject = serde_json::from_slice(bytes).map_err(|e| bad(e.to_string()))?;
        if s.format != SIG_FORMAT || s.algorithm != ALGORITHM {
            return Err(bad("unknown format or algorithm".into()));
        }
        Ok(s)
    }

    /// The trusted signer that signed the manifest whose plaintext SHA-256 is `digest`.
    pub fn check(
        &self,
        trusted: &TrustedSigners,
        digest: &[u8; 32],
        root: &str,
    ) -> Result<String, ModelError> {
        let sig = hex::decode(&self.signature).unwrap_or_default();
        let message = crate::sign::signed_message(digest);
        if let Some(id) = trusted.check(&self.signer, &message, &sig) {
            return Ok(id.to_string());
        }
        let signed_this = self.manifest_sha256 == hex::encode(digest);
        if signed_this && trusted.ids().contains(&self.signer) {
            // A trusted id whose signature does not verify over this manifest.
            return Err(ModelError::Altered {
                model: root.to_string(),
            });
        }
        if !signed_this {
            return Err(ModelError::Altered {
                model: root.to_string(),
            });
        }
        Err(ModelError::UntrustedSigner {
            model: root.to_string(),
            found: naming::escaped(&self.signer),
            trusted: trusted.ids().join(", "),
        })
    }
}

/// A loaded, checked model.
#[derive(Debug)]
pub struct Model {
    pub root: String,
    pub manifest: Manifest,
    /// Hex SHA-256 of the manifest plaintext: what `--model-digest` pins.
    pub digest: String,
    /// The trusted signer that signed it (`None`: unsigned, or no signer trusted).
    pub signer: Option<String>,
    /// The generation of the manifest object (0, or N for `ROOT/.sealfs-gN/`): every file
    /// it lists is of the same generation (reseal and republish write a model whole).
    pub generation: u32,
}

/// What proves who published a model, besides the KEK that opens it: trusted signers
/// (`--trust-signer`) and a pinned manifest digest (`--model-digest`). Under either, a file
/// outside a model is refused and every chunk is checked against the manifest.
#[derive(Default)]
pub struct Origin {
    pub signers: TrustedSigners,
    /// Hex SHA-256 of the one manifest accepted.
    pub pin: Option<String>,
}

impl Origin {
    /// True under trusted signers or a pin.
    pub fn proven(&self) -> bool {
        !self.signers.is_empty() || self.pin.is_some()
    }

    /// The pin's refusal of `m`, if it is pinned to another manifest.
    pub fn check_pin(&self, m: &Model) -> Result<(), ModelError> {
        check_pin(self.pin.as_deref(), m)
    }
}

/// `--model-digest`: the refusal of `m` when `pin` (hex SHA-256) names another manifest.
/// The one check the mount, verify, unseal and reseal share.
pub fn check_pin(pin: Option<&str>, m: &Model) -> Result<(), ModelError> {
    match pin {
        Some(pin) if pin != m.digest => Err(ModelError::NotPinned {
            model: m.root.clone(),
            found: m.digest.clone(),
            pinned: pin.to_string(),
        }),
        _ => Ok(()),
    }
}

impl Model {
    /// Checks a file that names this model as its own against the manifest: the same
    /// path, generation, file id, header, sizes. `file` is its object key.
    pub fn check_file(
        &self,
        file: &str,
        file_id: &[u8; 16],
        header_digest: &[u8; 32],
        chunk_log2: u8,
        object_size: u64,
    ) -> Result<&FileEntry, ModelError> {
        let refuse = |reason: &str| ModelError::File {
            file: file.to_string(),
            reason: format!(
                "{reason} (model {:?} version {})",
                self.root, self.manifest.version
            ),
        };
        let (logical, generation) = naming::split_generation(file);
        let e = self
            .manifest
            .file(relative(&logical, &self.root))
            .ok_or_else(|| {
                refuse("not in the model's manifest: an extra file, or one copied in")
            })?;
        if generation != self.generation {
            return Err(refuse(&format!(
                "generation {generation}, and the manifest lists generation {}: an older \
                 version, or a reseal not yet switched",
                self.generation
            )));
        }
        if e.file_id != hex::encode(file_id) || e.header_sha256 != hex::encode(header_digest) {
            return Err(refuse(
                "not the version the manifest lists: a file of another version or model",
            ));
        }
        if e.chunk_log2 != chunk_log2 || e.object_size != object_size {
            return Err(refuse("sizes differ from the manifest's"));
        }
        Ok(e)
    }
}

/// Reads, decrypts, parses and (with trusted signers) checks the signature of the model
/// whose manifest is `entry` (`None`: no manifest listed at `root`).
pub async fn load(
    store: &crate::store::Store,
    entry: Option<&crate::object::SealedEntry>,
    root: &str,
    keyring: &crate::keys::Keyring,
    trusted: &TrustedSigners,
) -> crate::Result<Model> {
    let entry = entry.ok_or_else(|| ModelError::MissingManifest {
        model: root.to_string(),
    })?;
    let f = crate::object::OpenFile::open(store, entry, keyring).await?;
    let bad = |reason: String| ModelError::Malformed {
        model: root.to_string(),
        reason,
    };
    if f.key_object
        .header
        .context
        .get(crate::format::header::CTX_MODEL)
        .map(String::as_str)
        != Some(root)
    {
        return Err(bad("its key object names another model".into()).into());
    }
    let size = f.layout.plaintext_size();
    if size > MAX_MANIFEST_LEN {
        return Err(bad(format!("{size} bytes, more than {MAX_MANIFEST_LEN}")).into());
    }
    // One ranged GET (a manifest is small), every chunk authenticated before it is used.
    let last = f.layout.last_index();
    let mut ct = zeroize::Zeroizing::new(f.fetch(store, 0, last).await?.to_vec());
    let mut plain = Vec::with_capacity(size as usize);
    let mut at = 0usize;
    for i in 0..=last {
        let len = f.layout.chunk_cipher_len(i) as usize;
        let chunk = ct
            .get_mut(at..at + len)
            .ok_or_else(|| bad("shorter than its header says".into()))?;
        let n = f.open_chunk(i, chunk)?;
        plain.extend_from_slice(&chunk[..n]);
        at += len;
    }
    let manifest = Manifest::parse(&plain, root)?;
    let digest = crate::crypto::sha256(&plain);
    let signer = if trusted.is_empty() {
        None
    } else {
        let key = naming::generation_key(&under(root, SIGNATURE_NAME), entry.generation);
        let bytes = match store.get(&key, MAX_SIGNATURE_LEN).await {
            Ok((b, _)) => b,
            Err(crate::store::StoreError::NotFound(_)) => {
                return Err(ModelError::Unsigned {
                    model: root.to_string(),
                }
                .into())
            }
            Err(e) => return Err(e.into()),
        };
        let sig = SignatureObject::parse(&bytes, root)?;
        Some(sig.check(trusted, &digest, root)?)
    };
    Ok(Model {
        root: root.to_string(),
        manifest,
        digest: hex::encode(digest),
        signer,
        generation: entry.generation,
    })
}

/// The current manifest entry (its highest generation) of the model at `root`, listed on
/// its own (for a file whose model root lies outside the listed prefix: a mount or verify
/// of part of a model).
pub async fn find_manifest(
    store: &crate::store::Store,
    root: &str,
) -> crate::Result<Option<crate::object::SealedEntry>> {
    let key = under(root, MANIFEST_NAME);
    let l = crate::object::find(store, &key).await?;
    Ok(l.sealed.into_iter().find(|e| e.logical == key))
}

/// The model root a file's context names, if any, checked to enclose the file's key.
pub fn model_of(
    file: &str,
    ctx: &crate::format::EncryptionContext,
) -> Result<Option<String>, ModelError> {
    let Some(root) = ctx.get(crate::format::header::CTX_MODEL) else {
        return Ok(None);
    };
    let inside = root.is_empty() || file.starts_with(&format!("{root}/"));
    if !inside {
        return Err(ModelError::File {
            file: file.to_string(),
            reason: format!(
                "sealed for model {:?}, which does not contain it",
                naming::escaped(root)
            ),
        });
    }
    Ok(Some(root.clone()))
}

/// `rel` of `key` under `root`.
pub fn relative<'a>(key: &'a str, root: &str) -> &'a str {
    naming::relative_to(key, root).unwrap_or(key)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(path: &str) -> FileEntry {
        let l = crate::format::Layout::new(14, 100).unwrap();
        FileEntry {
            path: path.into(),
            file_id: "00".repeat(16),
            header_sha256: "11".repeat(32),
            format_version: 1,
            chunk_log2: 14,
            plaintext_size: 100,
            object_size: l.object_size(),
            chunks: vec![Digest([0x22; 32])],
        }
    }

    #[test]
    fn parse_checks_root_names_sizes_and_digests() {
        let mut m = Manifest::new("m", 3, Default::default());
        m.files.push(entry("a/config.json"));
        let b = m.to_bytes();
        assert_eq!(Manifest::parse(&b, "m").unwrap(), m);
        assert!(matches!(
            Manifest::parse(&b, "other"),
            Err(ModelError::Malformed { .. })
        ));
        for bad in [
            {
                let mut x = m.clone();
                x.files.push(entry("a/config.json"));
                x
            },
            {
                let mut x = m.clone();
                x.files[0].path = "../x".into();
                x
            },
            {
                let mut x = m.clone();
                x.files[0].chunks.push(Digest([0x22; 32]));
                x
            },
            {
                let mut x = m.clone();
                x.files[0].header_sha256 = "zz".into();
                x
            },
        ] {
            assert!(Manifest::parse(&bad.to_bytes(), "m").is_err(), "{bad:?}");
        }
        let mut extra = serde_json::to_value(&m).unwrap();
        extra["unknown"] = serde_json::json!(1);
        assert!(Manifest::parse(extra.to_string().as_bytes(), "m").is_err());
    }

    #[test]
    fn names() {
        assert_eq!(manifest_root(".sealfs-manifest"), Some(""));
        assert_eq!(manifest_root("a/b/.sealfs-manifest"), Some("a/b"));
        assert_eq!(manifest_root("a/b.sealfs-manifest"), None);
        assert_eq!(under("", MANIFEST_NAME), ".sealfs-manifest");
        assert_eq!(relative("m/a/b", "m"), "a/b");
        assert_eq!(relative("a/b", ""), "a/b");
    }
}
