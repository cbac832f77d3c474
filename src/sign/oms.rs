//! OpenSSF Model Signing (OMS) signatures, as `model_signing` 1.x writes and reads them
//! (`model_signing sign key` / `verify key`): a Sigstore bundle (v0.3) holding a DSSE
//! envelope over an in-toto Statement v1 that lists the SHA-256 of every plaintext file.
//!
//! A signed seal writes one over the model's plaintext as `model.sig` at the model root (a
//! sealed file like the others, so never in the clear), so `model_signing verify key` run on
//! the mount accepts the model; and a pipeline can require the source directory's own
//! `model.sig` (from training) to verify before sealing. Byte-level notes: docs/FORMAT.md.

use std::path::Path;

use serde_json::{json, Value};

use super::{Signer, TrustedSigners};

/// The name `model_signing` uses for the signature file.
pub const SIGNATURE_FILE: &str = "model.sig";
const MEDIA_TYPE: &str = "application/vnd.dev.sigstore.bundle.v0.3+json";
const PAYLOAD_TYPE: &str = "application/vnd.in-toto+json";
const STATEMENT_TYPE: &str = "https://in-toto.io/Statement/v1";
const PREDICATE_TYPE: &str = "https://model_signing/signature/v1.0";
/// Paths `model_signing` leaves out by default (at the model root), and the signature.
const IGNORED: [&str; 5] = [
    ".git",
    ".gitattributes",
    ".github",
    ".gitignore",
    SIGNATURE_FILE,
];
/// Largest `model.sig` read.
pub const MAX_BUNDLE_LEN: u64 = 64 << 20;

/// Why an OMS signature does not hold.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum OmsError {
    #[error("{0}: malformed OMS signature: {1}")]
    Malformed(String, String),
    #[error("{0}: the OMS signature is not by a trusted signer (trusted: {1})")]
    Untrusted(String, String),
    #[error("{0}: {1} does not match the OMS signature ({2})")]
    Mismatch(String, String, &'static str),
    #[error("{0}: {1}")]
    Io(String, String),
}

/// The DSSE v1 pre-authentication encoding: what is signed.
pub fn pae(payload: &[u8]) -> Vec<u8> {
    let mut out = format!(
        "DSSEv1 {} {PAYLOAD_TYPE} {} ",
        PAYLOAD_TYPE.len(),
        payload.len()
    )
    .into_bytes();
    out.extend_from_slice(payload);
    out
}

/// The bundle's key hint: SHA-256 (hex) of the public key as PEM text (64-column lines,
/// LF), as `model_signing` computes it.
pub fn hint(spki_der: &[u8]) -> String {
    let pem = pem_rfc7468::encode_string("PUBLIC KEY", pem_rfc7468::LineEnding::LF, spki_der)
        .unwrap_or_default();
    hex::encode(crate::crypto::sha256(pem.as_bytes()))
}

/// Orders resources as `model_signing` does (by path components).
fn by_components(a: &str, b: &str) -> std::cmp::Ordering {
    a.split('/').cmp(b.split('/'))
}

/// The in-toto statement over `files` (relative name, SHA-256 of the plaintext).
pub fn statement(name: &str, files: &[(String, [u8; 32])]) -> Vec<u8> {
    let mut files = files.to_vec();
    files.sort_by(|a, b| by_components(&a.0, &b.0));
    let root: Vec<u8> = files.iter().flat_map(|(_, d)| d.to_vec()).collect();
    let v = json!({
        "_type": STATEMENT_TYPE,
        "subject": [{"name": name, "digest": {"sha256": hex::encode(crate::crypto::sha256(&root))}}],
        "predicateType": PREDICATE_TYPE,
        "predicate": {
            "serialization": {
                "method": "files",
                "hash_type": "sha256",
                "allow_symlinks": false,
                "ignore_paths": IGNORED,
            },
            "resources": files.iter().map(|(n, d)| json!({
                "name": n, "algorithm": "sha256", "digest": hex::encode(d)
            })).collect::<Vec<_>>(),
        }
    });
    serde_json::to_vec(&v).expect("a statement always serializes")
}

/// A `model.sig` bundle: `payload` (a statement) signed by `signer` over its PAE.
pub async fn bundle(signer: &Signer, payload: &[u8]) -> Result<Vec<u8>, super::SignError> {
    use base64::Engine;
    let sig = signer.sign(&pae(payload)).await?;
    let b64 = base64::engine::general_purpose::STANDARD;
    let v = json!({
        "mediaType": MEDIA_TYPE,
        "verificationMaterial": {"publicKey": {"hint": hint(signer.spki())}, "tlogEntries": []},
        "dsseEnvelope": {
            "payload": b64.encode(payload),
            "payloadType": PAYLOAD_TYPE,
            "signatures": [{"sig": b64.encode(&sig), "keyid": ""}],
        }
    });
    Ok(serde_json::to_vec(&v).expect("a bundle always serializes"))
}

/// True for a relative path `model_signing` leaves out.
fn ignored(rel: &str, extra: &[String]) -> bool {
    let first = rel.split('/').next().unwrap_or(rel);
    IGNORED.contains(&first)
        || extra
            .iter()
            .any(|p| rel == p || rel.starts_with(&format!("{p}/")))
}

/// What a `model.sig` that verified says the model's files are: each relative name and the
/// SHA-256 of its content. A seal gate checks it against the digests of the bytes it
/// actually sealed, computed from the one descriptor each file was sealed from, never a
/// reopened path (a file swapped after the check would be sealed, and signed, unchecked).
pub struct Statement {
    shown: String,
    listed: std::collections::BTreeMap<String, Vec<u8>>,
    /// `ignore_paths`: names the statement does not cover.
    ignore: Vec<String>,
}

impl Statement {
    /// Verifies `dir/model.sig` against `trusted`, as `model_signing verify key` does: the
    /// signature and the statement. Reads no other file.
    pub fn verify(dir: &Path, trusted: &TrustedSigners) -> Result<Self, OmsError> {
        use base64::Engine;
        let sig_path = dir.join(SIGNATURE_FILE);
        let shown = sig_path.display().to_string();
        let bad = |why: &str| OmsError::Malformed(shown.clone(), why.to_string());
        // Opened once (no check-then-read race), read no further than the bound.
        let (f, _) = crate::localfile::open_regular(&sig_path)
            .map_err(|e| OmsError::Io(shown.clone(), e.to_string()))?;
        let mut bytes = Vec::new();
        std::io::Read::read_to_end(&mut std::io::Read::take(f, MAX_BUNDLE_LEN + 1), &mut bytes)
            .map_err(|e| OmsError::Io(shown.clone(), e.to_string()))?;
        if bytes.len() as u64 > MAX_BUNDLE_LEN {
            return Err(bad("larger than a model.sig can be"));
        }
        let b: Value = serde_json::from_slice(&bytes).map_err(|e| bad(&e.to_string()))?;
        if b["mediaType"] != MEDIA_TYPE {
            return Err(bad("not a Sigstore bundle v0.3"));
        }
        let env = &b["dsseEnvelope"];
        if env["payloadType"] != PAYLOAD_TYPE {
            return Err(bad("payload is not an in-toto statement"));
        }
        let b64 = base64::engine::general_purpose::STANDARD;
        let payload = b64
            .decode(env["payload"].as_str().unwrap_or(""))
            .map_err(|_| bad("payload is not base64"))?;
        let sig = b64
            .decode(env["signatures"][0]["sig"].as_str().unwrap_or(""))
            .map_err(|_| bad("signature is not base64"))?;
        let signed = pae(&payload);
        if !trusted.verifies(&signed, &sig) {
            return Err(OmsError::Untrusted(shown, trusted.ids().join(", ")));
        }
        let s: Value = serde_json::from_slice(&payload).map_err(|e| bad(&e.to_string()))?;
        if s["_type"] != STATEMENT_TYPE || s["predicateType"] != PREDICATE_TYPE {
            return Err(bad("not a model_signing v1.0 statement"));
        }
        let ser = &s["predicate"]["serialization"];
        if ser["method"] != "files" || ser["hash_type"] != "sha256" {
            return Err(bad("only the \"files\"/sha256 serialization is supported"));
        }
        let ignore: Vec<String> = ser["ignore_paths"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|p| p.as_str().map(str::to_string))
            .collect();
        let mut listed = std::collections::BTreeMap::new();
        let mut root = Vec::new();
        for r in s["predicate"]["resources"].as_array().into_iter().flatten() {
            let (Some(name), Some(d)) = (r["name"].as_str(), r["digest"].as_str()) else {
                return Err(bad("a resource without name or digest"));
            };
            let digest = hex::decode(d).map_err(|_| bad("a digest is not hex"))?;
            if r["algorithm"] != "sha256" || digest.len() != 32 {
                return Err(bad("a resource is not sha256"));
            }
            root.extend_from_slice(&digest);
            listed.insert(name.to_string(), digest);
        }
        let subject = s["subject"][0]["digest"]["sha256"].as_str().unwrap_or("");
        if s["subject"].as_array().map(Vec::len) != Some(1)
            || subject != hex::encode(crate::crypto::sha256(&root))
        {
            return Err(bad("the statement's subject does not match its resources"));
        }
        Ok(Self {
            shown,
            listed,
            ignore,
        })
    }

    /// Whether the statement covers `rel` (`model_signing` leaves some names out, and a
    /// statement may list more in `ignore_paths`).
    pub fn covers(&self, rel: &str) -> bool {
        !ignored(rel, &self.ignore)
    }

    /// The names, before anything is read: exactly the listed files (`rels`: every regular
    /// file of the directory, relative), none extra, none missing.
    pub fn check_names<'a>(&self, rels: impl Iterator<Item = &'a str>) -> Result<(), OmsError> {
        let mut present = std::collections::BTreeSet::new();
        for rel in rels.filter(|r| !ignored(r, &self.ignore)) {
            if !self.listed.contains_key(rel) {
                return Err(OmsError::Mismatch(
                    self.shown.clone(),
                    rel.to_string(),
                    "not in the signature",
                ));
            }
            present.insert(rel);
        }
        match self.listed.keys().find(|k| !present.contains(k.as_str())) {
            Some(missing) => Err(OmsError::Mismatch(
                self.shown.clone(),
                missing.clone(),
                "listed but missing",
            )),
            None => Ok(()),
        }
    }

    /// The contents: `got` holds each file's relative name and the SHA-256 of the bytes
    /// that were sealed; exactly the listed files with exactly the listed digests.
    pub fn check(&self, got: &[(String, [u8; 32])]) -> Result<(), OmsError> {
        self.check_names(got.iter().map(|(r, _)| r.as_str()))?;
        for (rel, digest) in got.iter().filter(|(r, _)| !ignored(r, &self.ignore)) {
            if self
                .listed
                .get(rel)
                .is_none_or(|want| want[..] != digest[..])
            {
                return Err(OmsError::Mismatch(
                    self.shown.clone(),
                    rel.clone(),
                    "content changed",
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pae_and_order_match_model_signing() {
        assert!(pae(b"{}").starts_with(b"DSSEv1 28 application/vnd.in-toto+json 2 {}"));
        let mut v = ["a.txt", "a/b", "B/x", "a-b"];
        v.sort_by(|a, b| by_components(a, b));
        assert_eq!(
            v,
            ["B/x", "a/b", "a-b", "a.txt"],
            "Python's PurePosixPath order"
        );
    }
}
