//! Sealed files as pairs of objects, and opening one: the steps both the CLI and the mount
//! take before any plaintext exists.
//!
//! Open = GET the key object → strict parse → check it against the data object (name,
//! size, path binding) → unwrap the DEK under a trusted key → verify the header MAC.

use std::collections::BTreeMap;

use bytes::Bytes;

use crate::crypto::{header_digest, open_chunk, open_chunk_pieces, Dek, FileKeys};
use crate::error::{Error, Result};
use crate::format::header::MAX_KEY_OBJECT_LEN;
use crate::format::layout::PRELUDE_LEN;
use crate::format::{naming, KeyObject, Layout, Prelude};
use crate::keys::Keyring;
use crate::store::{ListLimits, ObjectInfo, Store};

/// A data object and its key object, as a listing shows them.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SealedEntry {
    pub data: ObjectInfo,
    pub key_object: ObjectInfo,
    pub chunk_log2: u8,
    /// The key the file is known by: `data.key` without its generation segment.
    pub logical: String,
    /// 0 for a file sealed in place; N for `dir/.sealfs-gN/name` (written by reseal).
    pub generation: u32,
}

impl SealedEntry {
    /// Plaintext size from the listing alone; `None` if the data object's size is not one
    /// a sealed file can have (truncated or extended).
    pub fn plaintext_size(&self) -> Option<u64> {
        Layout::from_object_size(self.chunk_log2, self.data.size).map(|l| l.plaintext_size())
    }
}

/// What a listing holds: sealed pairs, plus objects that are not (shown by `inspect`).
#[derive(Debug, Default)]
pub struct Listing {
    pub sealed: Vec<SealedEntry>,
    /// Objects with no key object beside them.
    pub unsealed: Vec<ObjectInfo>,
    /// Key objects whose data object is missing.
    pub orphans: Vec<ObjectInfo>,
    /// Names that are not a clean relative path (`..`, `//`, control characters, …), with
    /// the reason: never paired, served, or turned into a local path.
    pub rejected: Vec<(String, naming::NameError)>,
    /// Sealed files of a generation that is not (or not yet) the one served: the previous
    /// versions a reseal or a republish left for readers still holding them (`sealfs gc`
    /// deletes them), and the files of a reseal whose manifest is not in yet.
    pub superseded: Vec<SealedEntry>,
}

impl Listing {
    /// Logs the rejected names, escaped, at most `MAX_LOGGED` of them (a hostile listing
    /// could hold millions).
    pub fn log_rejected(&self) {
        const MAX_LOGGED: usize = 16;
        for (name, why) in self.rejected.iter().take(MAX_LOGGED) {
            tracing::warn!(name = %naming::escaped(name), reason = %why, "object name refused; hidden");
        }
        if self.rejected.len() > MAX_LOGGED {
            tracing::warn!(
                count = self.rejected.len(),
                "more object names refused; only the first {MAX_LOGGED} were logged"
            );
        }
    }
}

/// Pairs objects into sealed files. A data object with several key objects (several chunk
/// sizes) is ambiguous, so it counts as an orphan of each rather than a guess.
pub fn pair(objects: Vec<ObjectInfo>) -> Listing {
    let mut keys: BTreeMap<String, Vec<(ObjectInfo, u8)>> = BTreeMap::new();
    let mut data = Vec::new();
    let mut rejected = Vec::new();
    for o in objects {
        if let Err(why) = naming::check_key(&o.key) {
            rejected.push((o.key, why));
            continue;
        }
        let parsed = naming::parse_key_object_name(&o.key).map(|(d, log2)| (d.to_string(), log2));
        let data_key = parsed.as_ref().map_or(o.key.as_str(), |(d, _)| d.as_str());
        let misplaced = data_key
            .split('/')
            .any(|s| s.starts_with(naming::GEN_PREFIX))
            && naming::split_generation(data_key).1 == 0;
        if misplaced {
            rejected.push((o.key, naming::NameError::Reserved));
            continue;
        }
        match parsed {
            Some((d, log2)) => keys.entry(d).or_default().push((o, log2)),
            None => data.push(o),
        }
    }
    let mut out = Listing {
        rejected,
        ..Listing::default()
    };
    for d in data {
        match keys.remove(&d.key) {
            Some(mut ks) if ks.len() == 1 => {
                let (key_object, chunk_log2) = ks.pop().expect("one element");
                let (logical, generation) = naming::split_generation(&d.key);
                out.sealed.push(SealedEntry {
                    data: d,
                    key_object,
                    chunk_log2,
                    logical,
                    generation,
                });
            }
            Some(ks) => out.orphans.extend(ks.into_iter().map(|(k, _)| k)),
            None => out.unsealed.push(d),
        }
    }
    out.orphans
        .extend(keys.into_values().flatten().map(|(k, _)| k));
    let (served, superseded) = served_generations(std::mem::take(&mut out.sealed));
    out.sealed = served;
    out.superseded = superseded;
    out
}

/// One generation of each file: a model's manifest is its highest generation (the last
/// object a reseal writes: its switch), and a file under a listed model root is its highest
/// generation not above that manifest's, so a reseal in progress shows nothing of itself.
/// Files under no listed manifest (loose files, or a listing of part of a model) show their
/// highest generation; the open then checks it against the model's current manifest.
fn served_generations(all: Vec<SealedEntry>) -> (Vec<SealedEntry>, Vec<SealedEntry>) {
    use std::collections::HashMap;
    let mut models: HashMap<String, u32> = HashMap::new();
    for e in &all {
        if let Some(root) = crate::format::naming::manifest_root(&e.logical) {
            let g = models.entry(root.to_string()).or_insert(0);
            *g = (*g).max(e.generation);
        }
    }
    // The generation cap of `logical`: its innermost listed model's manifest generation.
    let cap = |logical: &str| -> u32 {
        if crate::format::naming::manifest_root(logical).is_some() {
            return u32::MAX;
        }
        naming::innermost_root(logical, |d| models.contains_key(d)).map_or(u32::MAX, |r| models[r])
    };
    let mut by_file: BTreeMap<String, Vec<SealedEntry>> = BTreeMap::new();
    for e in all {
        by_file.entry(e.logical.clone()).or_default().push(e);
    }
    let (mut served, mut superseded) = (Vec::new(), Vec::new());
    for (logical, mut gens) in by_file {
        let cap = cap(&logical);
        gens.sort_by_key(|e| e.generation);
        let pick = gens.iter().rposition(|e| e.generation <= cap);
        for (i, e) in gens.into_iter().enumerate() {
            if Some(i) == pick {
                served.push(e);
            } else {
                superseded.push(e);
            }
        }
    }
    (served, superseded)
}

/// The sealed files at `prefix`: the one object it names, or everything under it.
pub async fn find(store: &Store, prefix: &str) -> Result<Listing> {
    find_bounded(store, prefix, &ListLimits::default()).await
}

/// [`find`] within `limits` (the mount's `--max-objects`).
pub async fn find_bounded(store: &Store, prefix: &str, limits: &ListLimits) -> Result<Listing> {
    let all = store.list_bounded(prefix, limits).await?;
    let inside = |k: &str| naming::relative_to(k, prefix).is_some();
    let exact = |k: &str| naming::data_key(k) == prefix;
    let (mut one, many): (Vec<_>, Vec<_>) = all.into_iter().partition(|o| exact(&o.key));
    let many: Vec<_> = many.into_iter().filter(|o| inside(&o.key)).collect();
    // One object (or nothing under the prefix as a directory): its later generations live
    // in `.sealfs-gN/` beside it, which the prefix does not cover.
    let is_generation = naming::split_generation(prefix).1 > 0;
    if !prefix.is_empty() && !is_generation && (many.is_empty() || !one.is_empty()) {
        let gens = match prefix.rsplit_once('/') {
            Some((dir, _)) => format!("{dir}/{}", naming::GEN_PREFIX),
            None => naming::GEN_PREFIX.to_string(),
        };
        for o in store.list_bounded(&gens, limits).await? {
            let (logical, g) = naming::split_generation(naming::data_key(&o.key));
            if g > 0 && logical == prefix {
                one.push(o);
            }
        }
    }
    let single = one
        .iter()
        .any(|o| o.key == prefix || naming::split_generation(&o.key).0 == prefix);
    let mut objects = if single { one } else { many };
    // A listing inside a model (a prefix or one object) does not hold the model's manifest,
    // which caps the generation served: with a later generation of a file in it, the
    // manifests of the directories above the prefix join the listing.
    if !prefix.is_empty() && has_uncapped_generation(&objects) {
        for dir in naming::dirs_above(prefix) {
            let manifest = crate::format::naming::under(dir, crate::format::naming::MANIFEST_NAME);
            let near = crate::format::naming::under(dir, ".sealfs-");
            for o in store.list_bounded(&near, limits).await? {
                if naming::split_generation(naming::data_key(&o.key)).0 == manifest {
                    objects.push(o);
                }
            }
        }
    }
    Ok(pair(objects))
}

/// True if a file of generation ≥ 1 in `objects` has no manifest among them above it.
fn has_uncapped_generation(objects: &[ObjectInfo]) -> bool {
    let logical = |o: &ObjectInfo| naming::split_generation(naming::data_key(&o.key));
    let roots: std::collections::HashSet<String> = objects
        .iter()
        .filter_map(|o| Some(crate::format::naming::manifest_root(&logical(o).0)?.to_string()))
        .collect();
    objects.iter().any(|o| {
        let (key, g) = logical(o);
        if g == 0 || crate::format::naming::manifest_root(&key).is_some() {
            return false;
        }
        naming::innermost_root(&key, |d| roots.contains(d)).is_none()
    })
}

/// True if `key` (relative to the store root: the bucket, or a local store's root) is where
/// a file sealed for `bound` may live: exactly there. A copy to any other key, even one
/// ending with the same path, is refused; a bucket replicated under the same keys opens.
pub fn path_matches(key: &str, bound: &str) -> bool {
    key == bound
}

/// A sealed file ready to read: header authenticated, DEK unwrapped and locked.
pub struct OpenFile {
    pub key: String,
    pub etag: String,
    pub key_object: KeyObject,
    pub layout: Layout,
    pub digest: [u8; 32],
    /// The per-file keys and the DEK, until [`OpenFile::wipe`] (revocation): behind a lock
    /// so that a revocation can zeroize them while handles still hold the file.
    secrets: std::sync::RwLock<Option<(FileKeys, Dek)>>,
}

/// Reads and parses the key object of `entry`, and checks it against the data object,
/// without any key. This is all `inspect` trusts, and only as facts to show.
pub async fn read_key_object(store: &Store, entry: &SealedEntry) -> Result<KeyObject> {
    let (bytes, _) = store.get(&entry.key_object.key, MAX_KEY_OBJECT_LEN).await?;
    parse_key_object(&bytes, entry)
}

/// Parses key object bytes already fetched for `entry` and checks them against it.
pub fn parse_key_object(bytes: &[u8], entry: &SealedEntry) -> Result<KeyObject> {
    let file = &entry.data.key;
    let ko = KeyObject::parse(bytes).map_err(|source| Error::Format {
        file: file.clone(),
        source,
    })?;
    check_against_listing(&ko, entry)?;
    Ok(ko)
}

fn check_against_listing(ko: &KeyObject, entry: &SealedEntry) -> Result<()> {
    let file = &entry.data.key;
    let h = &ko.header;
    if h.chunk_log2 != entry.chunk_log2 {
        return Err(Error::integrity(
            file,
            format!(
                "key object name says chunk size 2^{}, header says 2^{}",
                entry.chunk_log2, h.chunk_log2
            ),
        ));
    }
    if !path_matches(file, h.path()) {
        return Err(Error::integrity(
            file,
            format!("sealed for path {:?}: file swapped or copied", h.path()),
        ));
    }
    let want = h.layout().object_size();
    if entry.data.size != want {
        return Err(Error::integrity(
            file,
            format!(
                "data object is {} bytes, header requires {want}: truncated or extended",
                entry.data.size
            ),
        ));
    }
    Ok(())
}

impl OpenFile {
    /// Opens `entry` with the trusted `keyring`.
    pub async fn open(store: &Store, entry: &SealedEntry, keyring: &Keyring) -> Result<Self> {
        let key_object = read_key_object(store, entry).await?;
        Self::open_parsed(key_object, entry, keyring).await
    }

    /// Opens `entry` whose key object was already fetched and checked.
    pub async fn open_parsed(
        key_object: KeyObject,
        entry: &SealedEntry,
        keyring: &Keyring,
    ) -> Result<Self> {
        let (dek, keys) = keyring
            .unwrap(&key_object)
            .await
            .map_err(|e| Error::key(&entry.data.key, e))?;
        Ok(Self {
            key: entry.data.key.clone(),
            etag: entry.data.etag.clone(),
            layout: key_object.header.layout(),
            digest: header_digest(&key_object.authenticated),
            key_object,
            secrets: std::sync::RwLock::new(Some((keys, dek))),
        })
    }

    /// Zeroizes the DEK and the keys derived from it (their locked pages are wiped and
    /// unmapped); every later [`OpenFile::open_chunk`] fails with [`Error::Revoked`]. Waits
    /// for chunk decryptions in progress to finish.
    pub fn wipe(&self) {
        self.secrets
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .take();
    }

    /// True once [`OpenFile::wipe`] ran.
    pub fn is_wiped(&self) -> bool {
        self.secrets
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .is_none()
    }

    /// Fetches chunks `first..=last` in one ranged GET pinned to the opened ETag (with the
    /// prelude when `first` is 0, which is then checked against the header).
    pub async fn fetch(&self, store: &Store, first: u64, last: u64) -> Result<Bytes> {
        let (start, end, pin) = self.range_of(first, last);
        let mut bytes = store.get_range(&self.key, start, end, pin).await?;
        if first == 0 {
            self.check_prelude(&bytes[..PRELUDE_LEN as usize])?;
            bytes = bytes.slice(PRELUDE_LEN as usize..);
        }
        Ok(bytes)
    }

    /// Like [`OpenFile::fetch`], as a stream; when `first` is 0 it starts with the 32-byte
    /// prelude, which the caller passes to [`OpenFile::check_prelude`].
    pub async fn fetch_stream(
        &self,
        store: &Store,
        first: u64,
        last: u64,
    ) -> Result<crate::store::RangeBody> {
        let (start, end, pin) = self.range_of(first, last);
        Ok(store.get_range_stream(&self.key, start, end, pin).await?)
    }

    /// Data object bytes of chunks `first..=last` (from 0 when `first` is 0, to take the
    /// prelude too), and the ETag every read is pinned to.
    fn range_of(&self, first: u64, last: u64) -> (u64, u64, Option<&str>) {
        let (start, end) = self.layout.cipher_range(first, last);
        let start = if first == 0 { 0 } else { start };
        (
            start,
            end,
            (!self.etag.is_empty()).then_some(self.etag.as_str()),
        )
    }

    /// Checks the data object's prelude against the authenticated header.
    pub fn check_prelude(&self, b: &[u8]) -> Result<()> {
        let p = Prelude::parse(b).map_err(|source| Error::Format {
            file: self.key.clone(),
            source,
        })?;
        let h = &self.key_object.header;
        if p.file_id != h.file_id || p.chunk_log2 != h.chunk_log2 {
            return Err(Error::integrity(
                &self.key,
                "data object belongs to another file (prelude mismatch)",
            ));
        }
        Ok(())
    }

    /// Authenticates and decrypts chunk `index` from `ct` (its ciphertext and tag) in place;
    /// returns the plaintext length. On failure `ct` is wiped.
    pub fn open_chunk(&self, index: u64, ct: &mut [u8]) -> Result<usize> {
        self.opening(index, ct, |keys, digest, last, want, ct| {
            open_chunk(keys, digest, index, last, want, ct)
        })
    }

    /// [`OpenFile::open_chunk`] of the sealed chunk handed over in `pieces` (a GET body as
    /// it arrived), decrypted into `out` without gathering the pieces first. On failure
    /// `out` is wiped.
    pub fn open_chunk_from(&self, index: u64, pieces: &[&[u8]], out: &mut [u8]) -> Result<usize> {
        self.opening(index, out, |keys, digest, last, want, out| {
            open_chunk_pieces(keys, digest, index, last, want, pieces, out)
        })
    }

    /// Runs `open` with the file's keys, or wipes `buf` and fails if they were revoked.
    fn opening(
        &self,
        index: u64,
        buf: &mut [u8],
        open: impl FnOnce(
            &FileKeys,
            &[u8; 32],
            bool,
            usize,
            &mut [u8],
        ) -> std::result::Result<usize, crate::crypto::ChunkError>,
    ) -> Result<usize> {
        let want = self.layout.chunk_plain_len(index);
        let secrets = self.secrets.read().unwrap_or_else(|p| p.into_inner());
        let Some((keys, _)) = secrets.as_ref() else {
            buf.fill(0);
            return Err(Error::Revoked {
                file: self.key.clone(),
            });
        };
        open(keys, &self.digest, self.layout.is_last(index), want, buf)
            .map_err(|e| Error::integrity(&self.key, e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn o(key: &str, size: u64) -> ObjectInfo {
        ObjectInfo {
            key: key.into(),
            size,
            etag: "e".into(),
            modified: None,
        }
    }

    #[test]
    fn pairing() {
        let l = pair(vec![
            o("a.pt", 100),
            o("a.pt.sealfs-c20", 300),
            o("b.txt", 5),
            o("c.sealfs-c20", 300),
            o("d", 1),
            o("d.sealfs-c20", 1),
            o("d.sealfs-c14", 1),
        ]);
        assert_eq!(l.sealed.len(), 1);
        assert_eq!(l.sealed[0].data.key, "a.pt");
        assert_eq!(l.sealed[0].chunk_log2, 20);
        assert_eq!(
            l.unsealed
                .iter()
                .map(|x| x.key.as_str())
                .collect::<Vec<_>>(),
            ["b.txt"]
        );
        let mut orphans: Vec<_> = l.orphans.iter().map(|x| x.key.as_str()).collect();
        orphans.sort();
        assert_eq!(orphans, ["c.sealfs-c20", "d.sealfs-c14", "d.sealfs-c20"]);
    }

    #[test]
    fn unclean_names_are_rejected_not_paired() {
        let l = pair(vec![
            o("m/../x", 48),
            o("m/../x.sealfs-c14", 300),
            o("a//b", 48),
            o("a//b.sealfs-c14", 300),
            o("evil\nINFO sealfs::audit", 48),
            o("ok", 48),
            o("ok.sealfs-c14", 300),
        ]);
        assert_eq!(l.sealed.len(), 1);
        assert_eq!(l.sealed[0].data.key, "ok");
        assert!(l.unsealed.is_empty() && l.orphans.is_empty());
        let why: Vec<_> = l.rejected.iter().map(|(_, w)| *w).collect();
        assert_eq!(
            why,
            [
                naming::NameError::DotSegment,
                naming::NameError::DotSegment,
                naming::NameError::EmptySegment,
                naming::NameError::EmptySegment,
                naming::NameError::Control
            ]
        );
    }

    fn keys(v: &[SealedEntry]) -> Vec<&str> {
        v.iter().map(|e| e.data.key.as_str()).collect()
    }

    #[test]
    fn a_model_serves_the_generation_of_its_newest_manifest() {
        let sealed = |k: &str| [o(k, 48), o(&format!("{k}.sealfs-c14"), 300)];
        let mut objects: Vec<_> = [
            "m/.sealfs-manifest",
            "m/a/x",
            "m/a/.sealfs-g1/x",
            "m/.sealfs-g1/.sealfs-manifest",
            // A reseal to generation 2 in progress: its file is in, its manifest is not.
            "m/a/.sealfs-g2/x",
            // A loose file: its highest generation.
            "l/y",
            "l/.sealfs-g3/y",
        ]
        .iter()
        .flat_map(|k| sealed(k))
        .collect();
        objects.push(o("m/.sealfs-g1/b/x", 48)); // misplaced generation segment
        let l = pair(objects);
        assert_eq!(
            keys(&l.sealed),
            [
                "l/.sealfs-g3/y",
                "m/.sealfs-g1/.sealfs-manifest",
                "m/a/.sealfs-g1/x"
            ]
        );
        assert_eq!(l.sealed[2].logical, "m/a/x");
        assert_eq!(l.sealed[2].generation, 1);
        assert_eq!(
            keys(&l.superseded),
            ["l/y", "m/.sealfs-manifest", "m/a/x", "m/a/.sealfs-g2/x"]
        );
        assert_eq!(
            l.rejected,
            [("m/.sealfs-g1/b/x".to_string(), naming::NameError::Reserved)]
        );
    }

    #[test]
    fn path_binding() {
        assert!(path_matches("models/a/model.pt", "models/a/model.pt"));
        assert!(
            !path_matches("x/model.pt", "model.pt"),
            "a copy under another prefix"
        );
        assert!(!path_matches("xmodel.pt", "model.pt"));
        assert!(!path_matches("models/b/model.pt", "models/a/model.pt"));
    }
}
