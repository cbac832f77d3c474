//! `sealfs inspect`: what the key objects say, with no key. Nothing here is authenticated
//! (that needs the DEK); sizes and names are checked for consistency only.

use serde_json::{json, Value};

use crate::error::Result;
use crate::format::{naming, SlotKind};
use crate::object::{find, read_key_object};
use crate::store::Location;

/// One JSON value per sealed file (errors included as `"error"`), plus unsealed objects and
/// the names refused as not clean relative paths (escaped: a name never spans two lines).
/// With `keys` (the `--key` URIs and their resolved ring), each wrapped key also lists the
/// given keys that open it (`opened_by`): how a `kbs:` key's release or a token's key maps
/// onto the slots, without unwrapping anything.
pub async fn inspect(
    loc: &Location,
    keys: Option<(&[String], &crate::keys::Keyring)>,
) -> Result<Value> {
    let l = find(&loc.store, &loc.prefix).await?;
    let mut files = Vec::new();
    let mut models = Vec::new();
    for e in &l.sealed {
        if let Some(root) = crate::manifest::manifest_root(&e.logical) {
            models.push(model_facts(loc, root, e).await);
            continue;
        }
        let mut v = json!({
            "file": loc.describe(&e.logical),
            "object": loc.describe(&e.data.key),
            "generation": e.generation,
            "object_size": e.data.size,
            "chunk_size": 1u64 << e.chunk_log2,
            "plaintext_size_from_listing": e.plaintext_size(),
        });
        match read_key_object(&loc.store, e).await {
            Ok(ko) => {
                let h = &ko.header;
                v["version"] = json!(crate::format::VERSION);
                v["suite"] = json!("AES-256-GCM chunks, HKDF-SHA256, HMAC-SHA256 header MAC");
                v["plaintext_size"] = json!(h.plaintext_size);
                v["chunks"] = json!(h.layout().chunk_count());
                v["file_id"] = json!(hex::encode(h.file_id));
                v["encryption_context"] = json!(h.context);
                v["wrapped_keys"] = ko
                    .slots
                    .iter()
                    .map(|s| {
                        let kind = match s.kind {
                            SlotKind::Kms => "kms",
                            SlotKind::File => "file",
                            SlotKind::Pkcs11 => "pkcs11",
                            SlotKind::Shares => "shares",
                            SlotKind::Transit => "transit",
                        };
                        // A k-of-n shares slot is the offline escrow: opened only for
                        // break-glass unseal or rewrap (docs/OPERATIONS.md).
                        let escrow = s.kind == SlotKind::Shares;
                        let mut slot = json!({"kind": kind, "key_id": s.key_id, "wrapped_bytes": s.wrapped.len(), "escrow": escrow});
                        if let Some((uris, ring)) = keys {
                            slot["opened_by"] = ring
                                .opens(s)
                                .into_iter()
                                .filter_map(|i| uris.get(i))
                                .map(|u| json!(u))
                                .collect();
                        }
                        slot
                    })
                    .collect();
            }
            Err(err) => v["error"] = json!(err.to_string()),
        }
        files.push(v);
    }
    Ok(json!({
        "files": files,
        "unsealed_objects": l.unsealed.iter().map(|o| &o.key).collect::<Vec<_>>(),
        "orphan_key_objects": l.orphans.iter().map(|o| &o.key).collect::<Vec<_>>(),
        "superseded_generations": l.superseded.iter().map(|e| loc.describe(&e.data.key)).collect::<Vec<_>>(),
        "models": models,
        "refused_names": l
            .rejected
            .iter()
            .map(|(name, why)| json!({"name": naming::escaped(name), "reason": why.to_string()}))
            .collect::<Vec<_>>(),
    }))
}

/// What can be said of a model without a key: its manifest is sealed, so the facts shown
/// are the signature object's claims (`signed: false` when there is none). They are
/// authenticated only by `verify --trust-signer` or a mount with it.
async fn model_facts(loc: &Location, root: &str, manifest: &crate::object::SealedEntry) -> Value {
    use crate::manifest::{under, SignatureObject, MAX_SIGNATURE_LEN, SIGNATURE_NAME};
    let mut v = json!({
        "model": loc.describe(root),
        "manifest": loc.describe(&manifest.data.key),
        "generation": manifest.generation,
        "signed": false,
    });
    let sig = naming::generation_key(&under(root, SIGNATURE_NAME), manifest.generation);
    match loc.store.get(&sig, MAX_SIGNATURE_LEN).await {
        Ok((bytes, _)) => match SignatureObject::parse(&bytes, root) {
            Ok(s) => {
                v["signed"] = json!(true);
                v["signer"] = json!(naming::escaped(&s.signer));
                v["holder"] = json!(naming::escaped(&s.holder));
                v["version"] = json!(s.version);
                v["sealed_at"] = json!(s.sealed_at);
                v["manifest_digest"] =
                    json!(format!("sha256:{}", naming::escaped(&s.manifest_sha256)));
            }
            Err(e) => v["error"] = json!(e.to_string()),
        },
        Err(crate::store::StoreError::NotFound(_)) => {}
        Err(e) => v["error"] = json!(crate::error_chain(&e)),
    }
    v
}
