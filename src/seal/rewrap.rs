//! `sealfs rewrap`: replace the wrapped DEKs of sealed files. Only key objects move (a few
//! hundred bytes each); the data objects, their ETags and the DEKs stay as they are, so
//! mounts that have the files open keep reading. Each key object is written back only over
//! the version that was read (`If-Match` on its ETag), so a concurrent reseal is never undone.

use bytes::Bytes;

use crate::error::{Error, Result};
use crate::format::KeyObject;
use crate::keys::Keyring;
use crate::object::{find, parse_key_object};
use crate::store::{Location, StoreError};

/// Rewraps every sealed file at `loc` from `from` (trusted, to unwrap) to exactly `to`.
pub async fn rewrap(loc: &Location, from: &Keyring, to: &Keyring) -> Result<Vec<String>> {
    if to.is_empty() {
        return Err(Error::Usage("rewrap needs at least one --to-key".into()));
    }
    let l = find(&loc.store, &loc.prefix).await?;
    if l.sealed.is_empty() {
        return Err(Error::NothingSealed(loc.describe(&loc.prefix)));
    }
    let mut done = Vec::new();
    let mut roots = std::collections::BTreeSet::new();
    // Files first, manifests last (a manifest is only useful once its files open).
    let mut entries: Vec<_> = l.sealed.iter().collect();
    entries.sort_by_key(|e| crate::manifest::manifest_root(&e.logical).is_some());
    for e in entries {
        if let Some(root) = rewrap_one(loc, e, from, to).await? {
            roots.insert(root);
        }
        done.push(e.data.key.clone());
    }
    // A file rewrapped alone takes its model's manifest along: the manifest must open with
    // the keys that open the files.
    for root in roots {
        if let Some(m) = crate::manifest::find_manifest(&loc.store, &root).await? {
            if done.contains(&m.data.key) {
                continue;
            }
            rewrap_one(loc, &m, from, to).await?;
            done.push(m.data.key);
        }
    }
    Ok(done)
}

/// Rewraps one sealed file; returns the model root its header names.
async fn rewrap_one(
    loc: &Location,
    e: &crate::object::SealedEntry,
    from: &Keyring,
    to: &Keyring,
) -> Result<Option<String>> {
    {
        let (bytes, etag) = loc
            .store
            .get(&e.key_object.key, crate::format::header::MAX_KEY_OBJECT_LEN)
            .await?;
        if etag.is_empty() {
            return Err(Error::Usage(format!(
                "{}: the store sent no ETag, so rewrap cannot write it conditionally",
                loc.describe(&e.key_object.key)
            )));
        }
        let mut ko = parse_key_object(&bytes, e)?;
        ko.slots = from
            .rewrap(&ko, to)
            .await
            .map_err(|err| Error::key(&e.data.key, err))?;
        KeyObject::validate_slots(&ko.slots).map_err(|err| Error::Usage(err.to_string()))?;
        // Only over the version read above: a reseal (or another rewrap) that wrote the key
        // object meanwhile is never undone.
        loc.store
            .put_if_match(&e.key_object.key, Bytes::from(ko.to_bytes()), &etag)
            .await
            .map_err(|err| match err {
                StoreError::Changed(_) => StoreError::Failed {
                    op: "rewrap",
                    key: loc.describe(&e.key_object.key),
                    message: "the key object changed since rewrap read it (a concurrent seal or \
                              rewrap?); it was not written: run rewrap again"
                        .into(),
                },
                other => other,
            })?;
        tracing::info!(file = %loc.describe(&e.data.key), to = ?to.ids(), "rewrapped");
        Ok(crate::manifest::model_of(&e.data.key, &ko.header.context)?)
    }
}
