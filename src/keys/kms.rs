//! `kms:<key id | ARN | alias/…>`: AWS KMS with the encryption context on every call.
//!
//! Seal: `GenerateDataKey` (one per file). Open: `Decrypt` with `KeyId` pinned to the
//! trusted key's ARN, so KMS itself refuses a blob under any other key. Rewrap:
//! `ReEncrypt`, so the DEK never reaches this process. The client honours the standard AWS
//! configuration (`AWS_REGION`, profiles, roles, `AWS_ENDPOINT_URL[_KMS]`).

use std::collections::HashMap;

use aws_sdk_kms::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_kms::primitives::Blob;
use aws_sdk_kms::types::DataKeySpec;
use zeroize::Zeroize;

use super::KeyError;
use crate::crypto::Dek;
use crate::format::EncryptionContext;

/// A KMS key resolved to its ARN.
pub struct KmsKey {
    client: aws_sdk_kms::Client,
    arn: String,
}

/// The region named by a key ARN (`arn:aws:kms:REGION:…`), if it is one.
pub fn region_of(spec: &str) -> Option<String> {
    let mut parts = spec.split(':');
    match (parts.next(), parts.next(), parts.next(), parts.next()) {
        (Some("arn"), Some(_), Some("kms"), Some(r)) if !r.is_empty() => Some(r.to_string()),
        _ => None,
    }
}

/// A KMS client from the standard AWS configuration, in `region` if given.
pub async fn client(region: Option<String>) -> Result<aws_sdk_kms::Client, KeyError> {
    let mut loader = crate::aws_identity::apply(crate::aws_defaults()).await;
    if let Some(r) = region {
        loader = loader.region(aws_config::Region::new(r));
    }
    let conf = loader.load().await;
    if conf.region().is_none() {
        return Err(KeyError::NoRegion);
    }
    Ok(aws_sdk_kms::Client::new(&conf))
}

fn context_map(ctx: &EncryptionContext) -> Option<HashMap<String, String>> {
    Some(ctx.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
}

/// Maps an SDK error to a key error by its AWS error code ([`crate::calls::outcome`] holds
/// the code table); transport failures (after the SDK's bounded retries) are `KmsUnavailable`.
fn classify<E, R>(op: &'static str, key: &str, err: SdkError<E, R>) -> KeyError
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
    R: std::fmt::Debug,
{
    let key = key.to_string();
    match &err {
        SdkError::ServiceError(se) => {
            let e = se.err();
            // KMS's (or a proxy's) own words: escaped and cut, they end up in log lines.
            let message = crate::format::naming::printable(e.message().unwrap_or(""), 256);
            let code = e.code().unwrap_or("");
            match crate::calls::outcome(&err) {
                "denied" => KeyError::KmsDenied { op, key, message },
                "key_disabled" => KeyError::KmsDisabled { op, key, message },
                "not_found" => KeyError::KmsNotFound { op, key },
                _ if code == "InvalidCiphertextException" => {
                    KeyError::KmsInvalidCiphertext { op, key }
                }
                _ => KeyError::KmsUnavailable {
                    op,
                    key,
                    message: format!("{}: {message}", crate::format::naming::printable(code, 64)),
                },
            }
        }
        other => KeyError::KmsUnavailable {
            op,
            key,
            message: crate::error_chain(other),
        },
    }
}

/// One KMS call, counted and classified under `op` ([`crate::calls::call`]).
async fn call<T, E, R>(
    op: &'static str,
    key: &str,
    req: impl std::future::Future<Output = Result<T, SdkError<E, R>>>,
) -> Result<T, KeyError>
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
    R: std::fmt::Debug,
{
    crate::calls::call("kms", op, key, req, classify).await
}

impl KmsKey {
    /// Looks up the key's ARN (DescribeKey), which is what slots record and match on.
    pub async fn resolve(client: aws_sdk_kms::Client, spec: &str) -> Result<Self, KeyError> {
        let out = call(
            "DescribeKey",
            spec,
            client.describe_key().key_id(spec).send(),
        )
        .await?;
        let arn = out
            .key_metadata()
            .and_then(|m| m.arn())
            .ok_or_else(|| KeyError::KmsNotFound {
                op: "DescribeKey",
                key: spec.to_string(),
            })?
            .to_string();
        Ok(Self { client, arn })
    }

    pub fn arn(&self) -> &str {
        &self.arn
    }

    /// The SubjectPublicKeyInfo DER of an asymmetric key (GetPublicKey), for signatures.
    pub async fn signing_public_key(&self) -> Result<Vec<u8>, KeyError> {
        let out = call(
            "GetPublicKey",
            &self.arn,
            self.client.get_public_key().key_id(&self.arn).send(),
        )
        .await?;
        Ok(out.public_key.map(Blob::into_inner).unwrap_or_default())
    }

    /// An ECDSA P-256/SHA-256 signature (DER) of `message`, hashed by KMS (`RAW`).
    pub async fn sign_raw(&self, message: &[u8]) -> Result<Vec<u8>, KeyError> {
        let out = call(
            "Sign",
            &self.arn,
            self.client
                .sign()
                .key_id(&self.arn)
                .message(Blob::new(message))
                .message_type(aws_sdk_kms::types::MessageType::Raw)
                .signing_algorithm(aws_sdk_kms::types::SigningAlgorithmSpec::EcdsaSha256)
                .send(),
        )
        .await?;
        Ok(out.signature.map(Blob::into_inner).unwrap_or_default())
    }

    pub async fn generate_data_key(
        &self,
        ctx: &EncryptionContext,
    ) -> Result<(Dek, Vec<u8>), KeyError> {
        let out = call(
            "GenerateDataKey",
            &self.arn,
            self.client
                .generate_data_key()
                .key_id(&self.arn)
                .key_spec(DataKeySpec::Aes256)
                .set_encryption_context(context_map(ctx))
                .send(),
        )
        .await?;
        let blob = out.ciphertext_blob.map(Blob::into_inner);
        let mut plain = out.plaintext.map(Blob::into_inner).unwrap_or_default();
        let (Some(blob), 32) = (blob, plain.len()) else {
            plain.zeroize();
            return Err(KeyError::KmsUnavailable {
                op: "GenerateDataKey",
                key: self.arn.clone(),
                message: "response lacks a 32-byte key".into(),
            });
        };
        let dek = Dek::from_slice_zeroizing(&mut plain)?;
        Ok((dek, blob))
    }

    pub async fn encrypt(&self, dek: &Dek, ctx: &EncryptionContext) -> Result<Vec<u8>, KeyError> {
        let out = call(
            "Encrypt",
            &self.arn,
            self.client
                .encrypt()
                .key_id(&self.arn)
                .plaintext(Blob::new(dek.expose().to_vec()))
                .set_encryption_context(context_map(ctx))
                .send(),
        )
        .await?;
        out.ciphertext_blob
            .map(Blob::into_inner)
            .ok_or_else(|| KeyError::KmsUnavailable {
                op: "Encrypt",
                key: self.arn.clone(),
                message: "response lacks a ciphertext".into(),
            })
    }

    pub async fn decrypt(&self, wrapped: &[u8], ctx: &EncryptionContext) -> Result<Dek, KeyError> {
        let out = call(
            "Decrypt",
            &self.arn,
            self.client
                .decrypt()
                .key_id(&self.arn)
                .ciphertext_blob(Blob::new(wrapped))
                .set_encryption_context(context_map(ctx))
                .send(),
        )
        .await?;
        let mut plain = out.plaintext.map(Blob::into_inner).unwrap_or_default();
        if plain.len() != 32 {
            plain.zeroize();
            return Err(KeyError::KmsInvalidCiphertext {
                op: "Decrypt",
                key: self.arn.clone(),
            });
        }
        Ok(Dek::from_slice_zeroizing(&mut plain)?)
    }

    pub async fn re_encrypt(
        &self,
        wrapped: &[u8],
        ctx: &EncryptionContext,
        to: &KmsKey,
    ) -> Result<Vec<u8>, KeyError> {
        let out = call(
            "ReEncrypt",
            &self.arn,
            self.client
                .re_encrypt()
                .ciphertext_blob(Blob::new(wrapped))
                .source_key_id(&self.arn)
                .set_source_encryption_context(context_map(ctx))
                .destination_key_id(&to.arn)
                .set_destination_encryption_context(context_map(ctx))
                .send(),
        )
        .await?;
        out.ciphertext_blob
            .map(Blob::into_inner)
            .ok_or_else(|| KeyError::KmsUnavailable {
                op: "ReEncrypt",
                key: to.arn.clone(),
                message: "response lacks a ciphertext".into(),
            })
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn region_from_arn() {
        assert_eq!(
            super::region_of("arn:aws:kms:eu-west-1:111:key/abc").as_deref(),
            Some("eu-west-1")
        );
        assert_eq!(super::region_of("alias/models"), None);
        assert_eq!(super::region_of("1234abcd-12ab"), None);
    }
}
