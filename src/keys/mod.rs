//! KEK providers: the one place where key algorithms vary (age's "one joint").
//!
//! `--key` URIs: `kms:<key id | ARN | alias/…>` or `file:<path>`. A [`Keyring`] is the
//! ordered list a command was given; for reads it is also the *trusted* list: a DEK wrapped
//! only under other keys is refused without any KMS call (strict mode).

pub mod file;
pub mod kms;

use std::collections::BTreeMap;

use crate::crypto::{Dek, FileKeys, LockError};
use crate::format::{EncryptionContext, KeyObject, KeySlot, SlotKind};

/// Errors from KEKs. Each names the key it concerns; none carries key material.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KeyError {
    #[error("bad key URI {0:?}: expected kms:<key id|ARN|alias/NAME> or file:<path>")]
    BadUri(String),
    #[error("key file {path}: {reason}")]
    FileKey { path: String, reason: String },
    #[error("key file {0} already exists; refusing to overwrite it")]
    FileExists(String),
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
    #[error("no AWS region: set AWS_REGION or give a key ARN")]
    NoRegion,
    #[error("wrapped key under {0} did not authenticate: wrong key file, tampered key object or context")]
    UnwrapFailed(String),
    #[error(
        "no trusted key can open it: it is wrapped under [{carried}], trusted are [{trusted}]"
    )]
    NoTrustedKey { carried: String, trusted: String },
    #[error(transparent)]
    Lock(#[from] LockError),
    #[error(transparent)]
    HeaderMac(#[from] crate::crypto::kdf::HeaderMacError),
}

impl KeyError {
    /// True when the key refused us (permissions, disabled, not trusted): EACCES, exit 4.
    pub fn is_access_denied(&self) -> bool {
        matches!(
            self,
            KeyError::KmsDenied { .. }
                | KeyError::KmsDisabled { .. }
                | KeyError::KmsNotFound { .. }
                | KeyError::NoTrustedKey { .. }
        )
    }

    /// True when bytes failed authentication: EIO, exit 3.
    pub fn is_integrity(&self) -> bool {
        matches!(
            self,
            KeyError::KmsInvalidCiphertext { .. }
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
}

impl std::str::FromStr for KeySpec {
    type Err = KeyError;
    fn from_str(s: &str) -> Result<Self, KeyError> {
        match s.split_once(':') {
            Some(("kms", id)) if !id.is_empty() => Ok(KeySpec::Kms(id.to_string())),
            Some(("file", p)) if !p.is_empty() => Ok(KeySpec::File(p.into())),
            _ => Err(KeyError::BadUri(s.to_string())),
        }
    }
}

/// One resolved KEK.
pub enum Kek {
    Kms(kms::KmsKey),
    File(Box<file::FileKek>),
}

impl Kek {
    /// The id written into slots: the KMS key ARN, or the key file fingerprint.
    pub fn id(&self) -> &str {
        match self {
            Kek::Kms(k) => k.arn(),
            Kek::File(f) => f.id(),
        }
    }

    fn kind(&self) -> SlotKind {
        match self {
            Kek::Kms(_) => SlotKind::Kms,
            Kek::File(_) => SlotKind::File,
        }
    }

    async fn wrap(&self, dek: &Dek, ctx: &EncryptionContext) -> Result<KeySlot, KeyError> {
        let wrapped = match self {
            Kek::Kms(k) => k.encrypt(dek, ctx).await?,
            Kek::File(f) => f.wrap(dek, ctx),
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
            Kek::File(f) => f.unwrap(&slot.wrapped, ctx),
        }
    }
}

/// The keys a command was given, in order.
pub struct Keyring {
    keks: Vec<Kek>,
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
            });
        }
        Ok(Self { keks })
    }

    pub fn is_empty(&self) -> bool {
        self.keks.is_empty()
    }

    pub fn ids(&self) -> Vec<String> {
        self.keks.iter().map(|k| k.id().to_string()).collect()
    }

    /// A new DEK for a file and its wrapped copies, one per key. With a KMS key first, the
    /// DEK comes from one `GenerateDataKey`; other KMS keys wrap it with `Encrypt`.
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
            _ => Dek::random()?,
        };
        for kek in &self.keks[slots.len()..] {
            slots.push(kek.wrap(&dek, ctx).await?);
        }
        Ok((dek, slots))
    }

    fn trusted_for<'a>(&'a self, slot: &KeySlot) -> Option<&'a Kek> {
        self.keks
            .iter()
            .find(|k| k.kind() == slot.kind && k.id() == slot.key_id)
    }

    /// Unwraps the DEK with the first slot under a trusted key, then checks that it opens
    /// the header MAC (key commitment). Slots under untrusted keys are never sent to KMS.
    pub async fn unwrap(&self, ko: &KeyObject) -> Result<(Dek, FileKeys), KeyError> {
        let ctx = &ko.header.context;
        let mut last_err = None;
        for slot in &ko.slots {
            let Some(kek) = self.trusted_for(slot) else {
                continue;
            };
            match kek.unwrap(slot, ctx).await {
                Ok(dek) => {
                    let keys = FileKeys::derive(&dek, &ko.header.file_id);
                    keys.verify_header(&ko.authenticated, &ko.mac)?;
                    return Ok((dek, keys));
                }
                Err(e) => last_err = Some(e),
            }
        }
        Err(last_err.unwrap_or_else(|| KeyError::NoTrustedKey {
            carried: ko
                .slots
                .iter()
                .map(|s| s.key_id.as_str())
                .collect::<Vec<_>>()
                .join(", "),
            trusted: self.ids().join(", "),
        }))
    }

    /// New slots, exactly one per key of `to`. Between KMS keys this is `ReEncrypt`, so the
    /// DEK never reaches this process; other pairs unwrap once with `self` and wrap again.
    pub async fn rewrap(&self, ko: &KeyObject, to: &Keyring) -> Result<Vec<KeySlot>, KeyError> {
        let ctx = &ko.header.context;
        let kms_source = ko.slots.iter().find_map(|s| match self.trusted_for(s) {
            Some(Kek::Kms(k)) => Some((s, k)),
            _ => None,
        });
        let mut dek: Option<Dek> = None;
        let mut out = Vec::with_capacity(to.keks.len());
        for target in &to.keks {
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
