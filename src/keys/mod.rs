//! KEK providers: the one place where key algorithms vary (age's "one joint").
//!
//! `--key` URIs: `kms:<key id | ARN | alias/…>`, `file:<path>`, `pkcs11:<RFC 7512 URI>` (an
//! HSM), `transit:[MOUNT/]NAME` (Vault / OpenBao Transit), `shares:<path>,<path>,…` (a k-of-n
//! key ceremony), `kbs:///REPO/TYPE/TAG` (a key file released by a Confidential Containers
//! key broker after attestation) or `tpm2:<path>` (a key file sealed to this host's TPM
//! under a PCR policy). A [`Keyring`] is the ordered list a command was given; for reads it is also
//! the *trusted* list: a DEK wrapped only under other keys is refused without any provider
//! call (strict mode).

pub mod attester;
pub mod file;
pub mod jwe;
pub mod kbs;
pub mod kms;
pub mod pkcs11;
pub mod shares;
pub(crate) mod snp;
pub mod tls;
pub mod tpm2;
pub mod transit;

use std::collections::BTreeMap;

use crate::crypto::{Dek, FileKeys, LockError};
use crate::format::naming::printable;
use crate::format::{EncryptionContext, KeyObject, KeySlot, SlotKind};

/// Errors from KEKs. Each names the key it concerns; none carries key material.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KeyError {
    #[error("bad key URI {0:?}: expected kms:<key id|ARN|alias/NAME>, file:<path>, pkcs11:<RFC 7512 URI>, transit:[MOUNT/]NAME, shares:<path>,<path>,…, kbs:///REPO/TYPE/TAG or tpm2:<path>")]
    BadUri(String),
    #[error("key file {path}: {reason}")]
    FileKey { path: String, reason: String },
    #[error("key file {0} already exists; refusing to overwrite it")]
    FileExists(String),
    /// One share file of a `shares:` key is unusable (unreadable, loose mode, corrupted).
    #[error("share file {path}: {reason}")]
    ShareFile { path: String, reason: String },
    /// The share files of a `shares:` key do not make a key together.
    #[error("shares key: {0}")]
    Shares(String),
    #[error("KMS denied {op} with key {key}: {message}")]
    KmsDenied {
        op: &'static str,
        key: String,
        message: String,
    },
    #[error("KMS key {key} is disabled or pending deletion ({op}): {message}")]
    KmsDisabled {
        op: &'static str,
        key: String,
        message: String,
    },
    #[error("KMS key {key} not found ({op})")]
    KmsNotFound { op: &'static str, key: String },
    #[error("KMS rejected the wrapped key for {key} ({op}): wrong encryption context or tampered key object")]
    KmsInvalidCiphertext { op: &'static str, key: String },
    #[error("KMS unavailable for {key} ({op}): {message}")]
    KmsUnavailable {
        op: &'static str,
        key: String,
        message: String,
    },
    #[error("bad PKCS#11 URI {uri:?}: {reason}")]
    Pkcs11Uri { uri: String, reason: String },
    #[error("PKCS#11 token refused {op} with key {key}: {message}")]
    Pkcs11Denied {
        op: &'static str,
        key: String,
        message: String,
    },
    #[error("PKCS#11 token unavailable for {key} ({op}): {message}")]
    Pkcs11Unavailable {
        op: &'static str,
        key: String,
        message: String,
    },
    #[error("no AWS region: set AWS_REGION or give a key ARN")]
    NoRegion,
    #[error(
        "wrapped key under {0} did not authenticate: wrong key, tampered key object or context"
    )]
    UnwrapFailed(String),
    #[error(
        "no trusted key can open it: it is wrapped under [{carried}], trusted are [{trusted}]"
    )]
    NoTrustedKey { carried: String, trusted: String },
    // Transit (Vault / OpenBao): keys/transit.rs.
    #[error("Transit configuration: {0}")]
    TransitConfig(String),
    #[error("Transit key {key} cannot wrap DEKs: {reason}")]
    TransitKeyUnsuitable { key: String, reason: String },
    #[error("Transit denied {op} with key {key}: {message}")]
    TransitDenied {
        op: &'static str,
        key: String,
        message: String,
    },
    #[error("Transit key {key} not found ({op}): no such key or mount")]
    TransitNotFound { op: &'static str, key: String },
    #[error("Transit rejected the wrapped key for {key} ({op}): wrong encryption context or tampered key object")]
    TransitInvalidCiphertext { op: &'static str, key: String },
    #[error("Transit unavailable for {key} ({op}): {message}")]
    TransitUnavailable {
        op: &'static str,
        key: String,
        message: String,
    },
    // Key brokers (Trustee KBS, CoCo CDH): keys/kbs.rs.
    #[error("key broker configuration: {0}")]
    KbsConfig(String),
    #[error("key broker {broker} refused {resource}: {message}")]
    KbsDenied {
        broker: String,
        resource: String,
        message: String,
    },
    #[error("key broker {broker} unavailable for {resource}: {message}")]
    KbsUnavailable {
        broker: String,
        resource: String,
        message: String,
    },
    #[error("key broker {broker} answered {resource} with something refused: {reason}")]
    KbsBadAnswer {
        broker: String,
        resource: String,
        reason: String,
    },
    #[error("no evidence for {resource}: {message}")]
    KbsAttester { resource: String, message: String },
    // TPM 2.0 (keys/tpm2.rs). Classes: a PCR mismatch, a blob this TPM does not load and a
    // policy the TPM refuses are refusals (this host is not the one, or not in the state,
    // the key was sealed for: exit 4, EACCES); a TPM that does not answer is an outage
    // (answered like a missing PKCS#11 token: exit 4, never a revocation); a sealed file
    // that is unreadable or malformed is a local file error like a bad key file (exit 1).
    // None is an integrity failure: the TPM's answer to altered blobs cannot be told from
    // its answer to another TPM's.
    #[error("this sealfs was built without TPM support (cargo feature tpm2)")]
    Tpm2NotBuilt,
    #[error("TPM-sealed key file {path}: {reason}")]
    Tpm2File { path: String, reason: String },
    #[error("TPM-sealed key {path}: this host's PCRs differ from those it was sealed against: {pcrs} (another kernel, boot chain or Secure Boot state); the TPM will not release the key")]
    Tpm2PcrMismatch { path: String, pcrs: String },
    #[error("TPM-sealed key {path}: this TPM does not load it (sealed on another TPM, the TPM was cleared, or the file was altered): {message}")]
    Tpm2Foreign { path: String, message: String },
    #[error(
        "TPM-sealed key {path}: the TPM refused to unseal it (PCR policy not satisfied): {message}"
    )]
    Tpm2PolicyFailed { path: String, message: String },
    #[error("TPM unavailable at {tcti} (set SEALFS_TPM2_TCTI): {message}")]
    Tpm2Unavailable { tcti: String, message: String },
    #[error("TPM {op} failed: {message}")]
    Tpm2Failed { op: &'static str, message: String },
    #[error(transparent)]
    Lock(#[from] LockError),
    #[error(transparent)]
    HeaderMac(#[from] crate::crypto::kdf::HeaderMacError),
}

impl KeyError {
    /// True when the key refused us (permissions, disabled, not trusted): EACCES, exit 4.
    pub fn is_access_denied(&self) -> bool {
        // A token that is gone is answered like a key that refuses (EACCES, bounded), but
        // it is an outage, not a refusal: a revalidation does not revoke on it.
        // So is an attester that cannot produce evidence (nothing will be released), and a
        // TPM that does not answer.
        self.is_refusal()
            || matches!(
                self,
                KeyError::Pkcs11Unavailable { .. }
                    | KeyError::KbsAttester { .. }
                    | KeyError::Tpm2Unavailable { .. }
            )
    }

    /// True when the provider itself answered no (key disabled, pending deletion, destroyed,
    /// access denied, no trusted key), as opposed to not answering (unreachable, throttled,
    /// timed out, a token not present). A revalidation revokes on this, never on an outage.
    pub fn is_refusal(&self) -> bool {
        matches!(
            self,
            KeyError::KmsDenied { .. }
                | KeyError::KmsDisabled { .. }
                | KeyError::KmsNotFound { .. }
                | KeyError::TransitDenied { .. }
                | KeyError::TransitNotFound { .. }
                | KeyError::NoTrustedKey { .. }
                | KeyError::Pkcs11Denied { .. }
                // A broker that says no, or answers with what sealfs refuses (a bad JWE, a
                // resource that is not a key file): fail closed.
                | KeyError::KbsDenied { .. }
                | KeyError::KbsBadAnswer { .. }
                | KeyError::Tpm2PcrMismatch { .. }
                | KeyError::Tpm2Foreign { .. }
                | KeyError::Tpm2PolicyFailed { .. }
        )
    }

    /// True when a revalidation of a held DEK must revoke it: the provider refused, or the
    /// stored wrapped key no longer authenticates (not an outage: that is bounded apart).
    pub fn revokes(&self) -> bool {
        self.is_refusal() || self.is_integrity()
    }

    /// True when bytes failed authentication: EIO, exit 3.
    pub fn is_integrity(&self) -> bool {
        matches!(
            self,
            KeyError::KmsInvalidCiphertext { .. }
                | KeyError::TransitInvalidCiphertext { .. }
                | KeyError::UnwrapFailed(_)
                | KeyError::HeaderMac(_)
        )
    }
}

/// A parsed `--key` URI.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeySpec {
    Kms(String),
    File(std::path::PathBuf),
    Pkcs11(Box<pkcs11::Pkcs11Uri>),
    /// At least K of the N share files of one key ceremony (`keys/shares.rs`).
    Shares(Vec<std::path::PathBuf>),
    Transit {
        mount: String,
        name: String,
    },
    /// A KBS resource path `REPO/TYPE/TAG` (`keys/kbs.rs`).
    Kbs(String),
    /// `secret:keyFile`: the key file a CSI volume's secret carried (`--secrets-fd`).
    SecretKeyFile,
    /// A key file sealed to this host's TPM (`keys/tpm2.rs`).
    Tpm2(std::path::PathBuf),
}

impl std::str::FromStr for KeySpec {
    type Err = KeyError;
    fn from_str(s: &str) -> Result<Self, KeyError> {
        match s.split_once(':') {
            Some(("kms", id)) if !id.is_empty() => Ok(KeySpec::Kms(id.to_string())),
            Some(("file", p)) if !p.is_empty() => Ok(KeySpec::File(p.into())),
            Some(("pkcs11", _)) => Ok(KeySpec::Pkcs11(Box::new(s.parse()?))),
            // Paths are comma-separated: a share path cannot hold a comma.
            Some(("shares", ps)) if !ps.split(',').any(str::is_empty) => {
                Ok(KeySpec::Shares(ps.split(',').map(Into::into).collect()))
            }
            Some(("secret", "keyFile")) => Ok(KeySpec::SecretKeyFile),
            Some(("kbs", r)) => kbs::parse_spec(r)
                .map(KeySpec::Kbs)
                .ok_or_else(|| KeyError::BadUri(shown_uri(s))),
            Some(("tpm2", p)) if !p.is_empty() => Ok(KeySpec::Tpm2(p.into())),
            Some(("transit", t)) => match transit::parse_spec(t) {
                Some((mount, name)) => Ok(KeySpec::Transit { mount, name }),
                None => Err(KeyError::BadUri(shown_uri(s))),
            },
            _ => Err(KeyError::BadUri(shown_uri(s))),
        }
    }
}

/// A key or signer URI that is not one sealfs knows, as an error line shows it: one with
/// attributes (`name=value`, a mistyped `pkcs11:` URI that may hold a PIN in any part) with
/// their names only; anything else (a key id, a path) without its query; escaped, bounded.
pub(crate) fn shown_uri(s: &str) -> String {
    if !s.contains('=') {
        return printable(s.split('?').next().unwrap_or(""), 256);
    }
    // Only a real scheme is shown as one: text before a later `:` (a `pkcs11;…` typed for
    // `pkcs11:…`, whose `pin-source=file:` supplies the colon) may hold attribute values.
    let scheme_like = |t: &str| {
        !t.is_empty()
            && t.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"+-.".contains(&b))
    };
    match s.split_once(':').filter(|(scheme, _)| scheme_like(scheme)) {
        Some((scheme, rest)) => format!(
            "{}:{}",
            printable(scheme, 32),
            pkcs11::attribute_names(rest)
        ),
        None => pkcs11::attribute_names(s),
    }
}

/// Why an answer did not parse, without serde's text: that can quote a value, and answers
/// of Transit's `datakey` and `decrypt` or a KBS resource hold key material.
pub(crate) fn json_error(e: &serde_json::Error) -> String {
    format!(
        "unexpected answer ({:?} error at line {} column {})",
        e.classify(),
        e.line(),
        e.column()
    )
}

/// One resolved KEK.
pub enum Kek {
    Kms(kms::KmsKey),
    File(Box<file::FileKek>),
    Pkcs11(pkcs11::Pkcs11Key),
    /// The KEK combined from shares: the key-file wrap under its own label (`shares.rs`).
    Shares(Box<file::FileKek>),
    Transit(transit::TransitKey),
    /// A key file released by a key broker: opens what that key file opens.
    Kbs(Box<kbs::KbsKey>),
}

impl Kek {
    /// The id written into slots: the KMS key ARN, or the key file fingerprint.
    pub fn id(&self) -> &str {
        match self {
            Kek::Kms(k) => k.arn(),
            Kek::File(f) | Kek::Shares(f) => f.id(),
            Kek::Pkcs11(k) => k.id(),
            Kek::Transit(t) => t.id(),
            Kek::Kbs(k) => k.id(),
        }
    }

    fn kind(&self) -> SlotKind {
        match self {
            Kek::Kms(_) => SlotKind::Kms,
            Kek::File(_) | Kek::Kbs(_) => SlotKind::File,
            Kek::Pkcs11(_) => SlotKind::Pkcs11,
            Kek::Shares(_) => SlotKind::Shares,
            Kek::Transit(_) => SlotKind::Transit,
        }
    }

    async fn wrap(&self, dek: &Dek, ctx: &EncryptionContext) -> Result<KeySlot, KeyError> {
        let wrapped = match self {
            Kek::Kms(k) => k.encrypt(dek, ctx).await?,
            Kek::File(f) | Kek::Shares(f) => f.wrap(dek, ctx),
            Kek::Pkcs11(k) => k.wrap(dek, ctx).await?,
            Kek::Transit(t) => t.encrypt(dek, ctx).await?,
            Kek::Kbs(k) => k.file().wrap(dek, ctx),
        };
        Ok(KeySlot {
            kind: self.kind(),
            key_id: self.id().to_string(),
            wrapped,
        })
    }

    async fn unwrap(&self, slot: &KeySlot, ctx: &EncryptionContext) -> Result<Dek, KeyError> {
        match self {
            Kek::Kms(k) => k.decrypt(&slot.wrapped, ctx).await,
            Kek::File(f) | Kek::Shares(f) => f.unwrap(&slot.wrapped, ctx),
            Kek::Pkcs11(k) => k.unwrap(&slot.wrapped, ctx).await,
            Kek::Transit(t) => t.decrypt(&slot.wrapped, ctx).await,
            // Refused at the last revalidation: no new DEK either (an outage keeps the
            // held key working; held DEKs are bounded by --revalidate-max-outage).
            Kek::Kbs(k) => match k.refused().filter(KeyError::revokes) {
                Some(e) => Err(e),
                None => k.file().unwrap(&slot.wrapped, ctx),
            },
        }
    }
}

/// One slot under one trusted key: unwrap the DEK and check that it opens the header MAC
/// (key commitment).
async fn open_slot(kek: &Kek, slot: &KeySlot, ko: &KeyObject) -> Result<(Dek, FileKeys), KeyError> {
    let dek = kek.unwrap(slot, &ko.header.context).await?;
    let keys = FileKeys::derive(&dek, &ko.header.file_id)?;
    keys.verify_header(&ko.authenticated, &ko.mac)?;
    Ok((dek, keys))
}

/// The keys a command was given, in order.
pub struct Keyring {
    keks: Vec<Kek>,
    /// What each key was given as (`--key`), in the same order.
    specs: Vec<KeySpec>,
}

impl Keyring {
    /// Resolves every spec: reads key files, and asks KMS for each key's ARN (DescribeKey),
    /// so that slots are matched to trusted keys locally, before any Decrypt.
    pub async fn resolve(specs: &[KeySpec]) -> Result<Self, KeyError> {
        let mut keks = Vec::with_capacity(specs.len());
        let mut kms_clients: BTreeMap<Option<String>, aws_sdk_kms::Client> = BTreeMap::new();
        for spec in specs {
            keks.push(match spec {
                KeySpec::File(p) => Kek::File(Box::new(file::FileKek::load(p)?)),
                KeySpec::Pkcs11(u) => Kek::Pkcs11(pkcs11::Pkcs11Key::resolve(u).await?),
                KeySpec::Shares(ps) => Kek::Shares(Box::new(shares::load(ps)?)),
                // The TPM releases the key file: it opens what that key file opens.
                KeySpec::Tpm2(p) => {
                    let p = p.clone();
                    let kek = tokio::task::spawn_blocking(move || tpm2::unseal(&p))
                        .await
                        .map_err(|e| KeyError::Tpm2Failed {
                            op: "unseal",
                            message: e.to_string(),
                        })??;
                    Kek::File(Box::new(kek))
                }
                KeySpec::Kms(id) => {
                    let region = kms::region_of(id);
                    let client = match kms_clients.get(&region) {
                        Some(c) => c.clone(),
                        None => {
                            let c = kms::client(region.clone()).await?;
                            kms_clients.insert(region, c.clone());
                            c
                        }
                    };
                    Kek::Kms(kms::KmsKey::resolve(client, id).await?)
                }
                KeySpec::Transit { mount, name } => Kek::Transit(
                    transit::TransitKey::resolve(transit::shared()?, mount, name).await?,
                ),
                KeySpec::SecretKeyFile => Kek::File(Box::new(file::secret_key_file()?)),
                KeySpec::Kbs(r) => Kek::Kbs(Box::new(
                    Box::pin(kbs::KbsKey::resolve(kbs::shared()?, r)).await?,
                )),
            });
        }
        Ok(Self {
            keks,
            specs: specs.to_vec(),
        })
    }

    /// A revalidating mount's `--revalidate-max-outage`: a released key the broker has not
    /// released again for that long opens nothing more.
    pub fn bound_release_outages(&self, bound: std::time::Duration) {
        for k in &self.keks {
            if let Kek::Kbs(k) = k {
                k.bound_outage(bound);
            }
        }
    }

    /// The start of a revalidation round: each key a broker released is asked for again
    /// (attesting again once its token expired): once per key, not once per DEK.
    pub async fn refresh_released(&self) {
        for k in &self.keks {
            if let Kek::Kbs(k) = k {
                k.refresh().await;
            }
        }
    }

    pub fn is_empty(&self) -> bool {
        self.keks.is_empty()
    }

    /// Keys that wrap with a *public* key (`pkcs11:` RSA pairs): anyone who has that public
    /// key can make a slot they open, so they prove nothing about who sealed a file.
    pub fn public_key_ids(&self) -> Vec<String> {
        self.keks
            .iter()
            .filter(|k| matches!(k, Kek::Pkcs11(p) if p.kind() == pkcs11::Kind::Rsa))
            .map(|k| k.id().to_string())
            .collect()
    }

    /// The refusal for reading under a public-key KEK without another proof of origin
    /// (`--trust-signer` or `--model-digest`), if that is the case.
    pub fn origin_unproven(&self, signers: bool, pinned: bool) -> Option<String> {
        let keys = self.public_key_ids();
        (!keys.is_empty() && !signers && !pinned).then(|| {
            format!(
                "{} wraps DEKs with a public key: anyone holding that public key can seal files \
                 it opens, so give --trust-signer (or --model-digest) to know who sealed them",
                keys.join(", ")
            )
        })
    }

    /// The slot id of a key this ring holds, named by its `--key` URI or by its slot id.
    pub fn id_of(&self, key: &str) -> Option<String> {
        if let Some(k) = self.keks.iter().find(|k| k.id() == key) {
            return Some(k.id().to_string());
        }
        let spec: KeySpec = key.parse().ok()?;
        let i = self.specs.iter().position(|s| *s == spec)?;
        self.keks.get(i).map(|k| k.id().to_string())
    }

    /// The positions (in `--key` order) of the keys that would open `slot`: same kind and
    /// id (a `kbs:` key opens the slots of the key file it released).
    pub fn opens(&self, slot: &KeySlot) -> Vec<usize> {
        (0..self.keks.len())
            .filter(|&i| self.keks[i].kind() == slot.kind && self.keks[i].id() == slot.key_id)
            .collect()
    }

    pub fn ids(&self) -> Vec<String> {
        self.keks.iter().map(|k| k.id().to_string()).collect()
    }

    /// A new DEK for a file and its wrapped copies, one per key. With a KMS key first, the
    /// DEK comes from one `GenerateDataKey`; other KMS keys wrap it with `Encrypt`. With a
    /// Transit key first, from `datakey/plaintext`; other Transit keys use `encrypt`.
    pub async fn new_dek(&self, ctx: &EncryptionContext) -> Result<(Dek, Vec<KeySlot>), KeyError> {
        let mut slots = Vec::with_capacity(self.keks.len());
        let dek = match self.keks.first() {
            Some(Kek::Kms(k)) => {
                let (dek, blob) = k.generate_data_key(ctx).await?;
                slots.push(KeySlot {
                    kind: SlotKind::Kms,
                    key_id: k.arn().to_string(),
                    wrapped: blob,
                });
                dek
            }
            Some(Kek::Transit(t)) => {
                let (dek, wrapped) = t.generate_data_key(ctx).await?;
                slots.push(KeySlot {
                    kind: SlotKind::Transit,
                    key_id: t.id().to_string(),
                    wrapped,
                });
                dek
            }
            _ => Dek::random()?,
        };
        for kek in &self.keks[slots.len()..] {
            slots.push(kek.wrap(&dek, ctx).await?);
        }
        Ok((dek, slots))
    }

    /// The slots worth trying, best first: for each trusted key in `--key` order, the first
    /// slot of the object naming it. At most one slot per trusted key, whatever the object
    /// holds (a hostile key object with 16 slots under one KMS key costs one Decrypt, not
    /// 16), in the keyring's order, not the object's (the bucket does not choose which key
    /// is asked first); slots under other keys are never tried.
    fn candidates<'a>(&'a self, ko: &'a KeyObject) -> impl Iterator<Item = (&'a Kek, &'a KeySlot)> {
        self.keks.iter().enumerate().filter_map(move |(i, kek)| {
            let named = |k: &Kek, s: &KeySlot| k.kind() == s.kind && k.id() == s.key_id;
            // A key given twice is still tried once.
            if self.keks[..i]
                .iter()
                .any(|k| k.kind() == kek.kind() && k.id() == kek.id())
            {
                return None;
            }
            ko.slots.iter().find(|s| named(kek, s)).map(|s| (kek, s))
        })
    }

    /// Unwraps the DEK, trying at most one slot per trusted key in `--key` order (see
    /// [`Self::candidates`]), and checks that it opens the header MAC (key commitment). A
    /// failure moves on to the next trusted key; the last failure is reported. Slots under
    /// untrusted keys are never sent to KMS.
    pub async fn unwrap(&self, ko: &KeyObject) -> Result<(Dek, FileKeys), KeyError> {
        let mut last_err = None;
        for (kek, slot) in self.candidates(ko) {
            match open_slot(kek, slot, ko).await {
                Ok(found) => return Ok(found),
                Err(e) => last_err = Some(e),
            }
        }
        Err(last_err.unwrap_or_else(|| self.no_trusted_key(ko)))
    }

    /// The refusal for a key object with no slot under any trusted key.
    fn no_trusted_key(&self, ko: &KeyObject) -> KeyError {
        KeyError::NoTrustedKey {
            // Key ids come from the (unauthenticated) key object: escaped, so that one
            // cannot break the log line this error ends up in.
            carried: ko
                .slots
                .iter()
                .map(|s| crate::format::naming::escaped(&s.key_id))
                .collect::<Vec<_>>()
                .join(", "),
            trusted: self.ids().join(", "),
        }
    }

    /// Whether the trusted keys still open this key object (revalidation): `Ok` if any does.
    /// A refusal (or an integrity failure) only when *every* candidate refused: one that did
    /// not answer makes it an outage, whatever the order of `--key` (a file wrapped under a
    /// throttled key A and a disabled key B is not revoked while A may still be fine).
    pub async fn recheck(&self, ko: &KeyObject) -> Result<(), KeyError> {
        let mut refused = None;
        let mut outage = None;
        for (kek, slot) in self.candidates(ko) {
            // A released key answers with what the broker said at this round's start.
            if let Some(e) = match kek {
                Kek::Kbs(k) => k.refused(),
                _ => None,
            } {
                if e.revokes() {
                    refused = Some(e);
                } else {
                    outage = Some(e);
                }
                continue;
            }
            // The DEK and keys it yields are dropped (zeroized) at once.
            match open_slot(kek, slot, ko).await {
                Ok(_) => return Ok(()),
                Err(e) if e.revokes() => refused = Some(e),
                Err(e) => outage = Some(e),
            }
        }
        match (outage, refused) {
            (Some(e), _) | (None, Some(e)) => Err(e),
            (None, None) => Err(self.no_trusted_key(ko)),
        }
    }

    /// New slots, exactly one per key of `to`. Between KMS keys this is `ReEncrypt`, and a
    /// derived Transit key to itself (to its latest version, after `rotate`) is Transit's
    /// `rewrap`: the DEK never reaches this process. Other pairs unwrap once with `self` and
    /// wrap again.
    pub async fn rewrap(&self, ko: &KeyObject, to: &Keyring) -> Result<Vec<KeySlot>, KeyError> {
        let ctx = &ko.header.context;
        // The same rule as `unwrap`: the first trusted KMS key in `--key` order that has a
        // slot, and its first slot.
        let kms_source = self.candidates(ko).find_map(|(kek, s)| match kek {
            Kek::Kms(k) => Some((s, k)),
            Kek::File(_) | Kek::Pkcs11(_) | Kek::Shares(_) | Kek::Transit(_) | Kek::Kbs(_) => None,
        });
        let mut dek: Option<Dek> = None;
        let mut out = Vec::with_capacity(to.keks.len());
        for target in &to.keks {
            // A token key whose kind changed since it made this object's slots is refused.
            if let Kek::Pkcs11(k) = target {
                for s in ko
                    .slots
                    .iter()
                    .filter(|s| s.kind == SlotKind::Pkcs11 && s.key_id == k.id())
                {
                    k.check_kind(&s.wrapped)?;
                }
            }
            if let Kek::Transit(dst) = target {
                // The first slot under this same key, if it is trusted (in `self`).
                let same = self.candidates(ko).find_map(|(kek, s)| match kek {
                    Kek::Transit(src) if src.id() == dst.id() => Some(s),
                    _ => None,
                });
                if let (Some(slot), true) = (same, dst.has_native_rewrap()) {
                    out.push(KeySlot {
                        kind: SlotKind::Transit,
                        key_id: dst.id().to_string(),
                        wrapped: dst.rewrap(&slot.wrapped, ctx).await?,
                    });
                    continue;
                }
            }
            if let (Kek::Kms(dst), Some((slot, src))) = (target, kms_source) {
                let blob = src.re_encrypt(&slot.wrapped, ctx, dst).await?;
                out.push(KeySlot {
                    kind: SlotKind::Kms,
                    key_id: dst.arn().to_string(),
                    wrapped: blob,
                });
                continue;
            }
            if dek.is_none() {
                dek = Some(self.unwrap(ko).await?.0);
            }
            let d = dek.as_ref().expect("set just above");
            out.push(target.wrap(d, ctx).await?);
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::header::{CTX_FILE_ID, CTX_PATH, CTX_VERSION};

    #[test]
    fn a_mistyped_uri_never_echoes_an_attribute_value() {
        let key_err = |s: &str| match s.parse::<KeySpec>() {
            Err(e) => e.to_string(),
            Ok(_) => panic!("{s} accepted"),
        };
        let signer_err = |s: &str| match s.parse::<crate::sign::SignerSpec>() {
            Err(e) => e.to_string(),
            Ok(_) => panic!("{s} accepted"),
        };
        for bad in [
            "PKCS11:token=t;pin-value=9876",
            "pkcs11;token=t;pin-value=9876",
            "pksc11:token=t?pin-value=9876",
            "hsm:object=k;pin=9876",
            // Found by fuzz/fuzz_targets/pkcs11_uri.rs: the `:` of `file:` taken for the
            // scheme's printed the PIN before it.
            "pkcs11;token=t;pin-value=9876?module-path=/m.so&pin-source=file:/run/pin",
        ] {
            let e = key_err(bad);
            assert!(!e.contains("9876"), "{bad}: {e}");
            assert!(e.contains("pin"), "the names stay, to fix the typo: {e}");
            let e = signer_err(bad);
            assert!(!e.contains("9876"), "{bad}: {e}");
        }
        let e = key_err("kms2:alias/x?a");
        assert!(e.contains("kms2:alias/x") && !e.contains('?'), "{e}");
        let e = key_err("fiel:/k\n");
        assert!(!e.contains('\n'), "no control character: {e:?}");
    }
    use crate::format::Header;
    use std::sync::atomic::Ordering;

    fn file_kek(b: u8) -> Kek {
        Kek::File(Box::new(file::FileKek::from_bytes(&[b; 32]).unwrap()))
    }

    fn attempts(k: &Kek) -> usize {
        match k {
            Kek::File(f) => f.attempts.0.load(Ordering::Relaxed),
            _ => unreachable!("file keys only"),
        }
    }

    /// A key object sealed (DEK, MAC) with `slots` built by `make(dek, ctx)`.
    fn key_object(make: impl Fn(&Dek, &EncryptionContext) -> Vec<KeySlot>) -> KeyObject {
        let file_id = [5u8; 16];
        let mut context = EncryptionContext::new();
        context.insert(CTX_VERSION.into(), "1".into());
        context.insert(CTX_FILE_ID.into(), hex::encode(file_id));
        context.insert(CTX_PATH.into(), "m/a".into());
        let header = Header {
            chunk_log2: 14,
            file_id,
            plaintext_size: 1,
            context,
        };
        let authenticated = header.encode().unwrap();
        let dek = Dek::random().unwrap();
        let mac = FileKeys::derive(&dek, &file_id)
            .unwrap()
            .header_mac(&authenticated);
        let slots = make(&dek, &header.context);
        KeyObject {
            header,
            authenticated,
            mac,
            slots,
        }
    }

    fn slot(k: &Kek, wrapped: Vec<u8>) -> KeySlot {
        KeySlot {
            kind: k.kind(),
            key_id: k.id().to_string(),
            wrapped,
        }
    }

    fn wrap(k: &Kek, dek: &Dek, ctx: &EncryptionContext) -> KeySlot {
        match k {
            Kek::File(f) => slot(k, f.wrap(dek, ctx)),
            _ => unreachable!("file keys only"),
        }
    }

    fn run<T>(f: impl std::future::Future<Output = T>) -> T {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
            .block_on(f)
    }

    #[test]
    fn sixteen_garbage_slots_under_one_trusted_key_cost_one_attempt() {
        let ring = Keyring {
            keks: vec![file_kek(1)],
            specs: vec![],
        };
        let untrusted = file_kek(2);
        let ko = key_object(|_, _| {
            let mut s: Vec<_> = (0..15u8)
                .map(|i| slot(&ring.keks[0], vec![i; 60]))
                .collect();
            s.insert(7, slot(&untrusted, vec![9; 60]));
            s
        });
        assert_eq!(ko.slots.len(), 16);
        let e = run(ring.unwrap(&ko)).err().unwrap();
        assert!(matches!(e, KeyError::UnwrapFailed(_)), "{e}");
        assert_eq!(attempts(&ring.keks[0]), 1, "one attempt per trusted key");
        assert_eq!(attempts(&untrusted), 0);
    }

    #[test]
    fn trusted_keys_are_tried_in_keyring_order_once_each() {
        let (a, b) = (file_kek(1), file_kek(2));
        // A's slot comes first in the object; `--key B --key A` must try B first.
        let ko = key_object(|dek, ctx| vec![wrap(&a, dek, ctx), wrap(&b, dek, ctx)]);
        let ring = Keyring {
            keks: vec![b, a],
            specs: vec![],
        };
        run(ring.unwrap(&ko)).unwrap();
        assert_eq!(attempts(&ring.keks[0]), 1, "B tried");
        assert_eq!(attempts(&ring.keks[1]), 0, "A never needed");

        // A failure under the first trusted key moves on to the next one, once.
        let (a, b) = (file_kek(1), file_kek(2));
        let ko = key_object(|dek, ctx| {
            let mut s: Vec<_> = (0..8u8).map(|i| slot(&a, vec![i; 60])).collect();
            s.push(wrap(&b, dek, ctx));
            s.extend((0..7u8).map(|i| slot(&a, vec![i; 60])));
            s
        });
        let ring = Keyring {
            keks: vec![a, b],
            specs: vec![],
        };
        run(ring.unwrap(&ko)).unwrap();
        assert_eq!(attempts(&ring.keks[0]), 1, "A tried once");
        assert_eq!(attempts(&ring.keks[1]), 1, "then B");
    }

    #[test]
    fn a_key_given_twice_is_tried_once() {
        let ring = Keyring {
            keks: vec![file_kek(1), file_kek(1)],
            specs: vec![],
        };
        let ko = key_object(|_, _| (0..4u8).map(|i| slot(&ring.keks[0], vec![i; 60])).collect());
        assert!(run(ring.unwrap(&ko)).is_err());
        assert_eq!(attempts(&ring.keks[0]) + attempts(&ring.keks[1]), 1);
    }
}
