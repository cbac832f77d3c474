//! `sealfs rewrap`: replace the wrapped DEKs of sealed files. Only key objects move (a few
//! hundred bytes each); the data objects, their ETags and the DEKs stay as they are, so
//! mounts that have the files open keep reading.

use bytes::Bytes;

use crate::error::{Error, Result};
use crate::format::KeyObject;
use crate::keys::Keyring;
use crate::object::{find, read_key_object};
use crate::store::Location;

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
    for e in &l.sealed {
        let mut ko = read_key_object(&loc.store, e).await?;
        ko.slots = from
            .rewrap(&ko, to)
            .await
            .map_err(|err| Error::key(&e.data.key, err))?;
        KeyObject::validate_slots(&ko.slots).map_err(|err| Error::Usage(err.to_string()))?;
        loc.store
            .put(&e.key_object.key, Bytes::from(ko.to_bytes()))
            .await?;
        tracing::info!(file = %loc.describe(&e.data.key), to = ?to.ids(), "rewrapped");
        done.push(e.data.key.clone());
    }
    Ok(done)
}
