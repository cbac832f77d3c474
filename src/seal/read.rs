//! `sealfs verify` and `sealfs unseal`: read every chunk through the same open path as the
//! mount. Verify releases nothing; unseal writes to a hidden temporary file (0600, under
//! DEST only: [`super::dest`]) that is renamed into place only after the last chunk
//! authenticated, and removed on any failure.

use std::io::Write;
use std::path::{Path, PathBuf};

use futures::StreamExt;

use super::dest::{self, Dest, Target};
use super::Cancel;
use crate::error::{Error, Result};
use crate::format::naming;
use crate::keys::Keyring;
use crate::manifest::{self, Model, ModelError, Origin};
use crate::object::{find, read_key_object, OpenFile, SealedEntry};
use crate::store::Location;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;

/// Chunks fetched per ranged GET by verify/unseal (≈ 8 MiB at the default chunk size).
const BATCH_BYTES: u64 = 8 << 20;
/// Ranged GETs in flight.
const IN_FLIGHT: usize = 4;
/// At most this many bad chunks are named per file.
const MAX_NAMED: usize = 16;

/// The sealed files at `loc` and, apart, the manifests of the models among them (by root).
async fn split(loc: &Location) -> Result<(Vec<SealedEntry>, HashMap<String, SealedEntry>)> {
    let l = find(&loc.store, &loc.prefix).await?;
    let (manifests, files): (Vec<_>, Vec<_>) = l
        .sealed
        .into_iter()
        .partition(|e| manifest::manifest_root(&e.logical).is_some());
    if files.is_empty() {
        return Err(Error::NothingSealed(loc.describe(&loc.prefix)));
    }
    let manifests = manifests
        .into_iter()
        .filter_map(|e| Some((manifest::manifest_root(&e.logical)?.to_string(), e)))
        .collect();
    Ok((files, manifests))
}

fn batches(f: &OpenFile) -> impl Iterator<Item = (u64, u64)> {
    let per = (BATCH_BYTES >> f.layout.chunk_log2()).max(1);
    let n = f.layout.chunk_count();
    (0..n.div_ceil(per)).map(move |b| (b * per, ((b + 1) * per).min(n) - 1))
}

/// Streams every chunk of `f` in order, authenticated, to `sink` (which sees plaintext only
/// of chunks that verified). With `keep_going`, bad chunks are collected instead of ending
/// the read; store failures always end it.
async fn read_all(
    loc: &Location,
    f: &OpenFile,
    digests: Option<&[[u8; 32]]>,
    keep_going: bool,
    cancel: &Cancel,
    mut sink: impl FnMut(&[u8]) -> Result<()>,
) -> Result<Vec<u64>> {
    let mut bad = Vec::new();
    let mut fetches = futures::stream::iter(batches(f))
        .map(|(first, last)| async move {
            f.fetch(&loc.store, first, last)
                .await
                .map(|b| (first, last, b))
        })
        .buffered(IN_FLIGHT);
    loop {
        let next = tokio::select! {
            n = fetches.next() => n,
            _ = cancel.cancelled() => return Err(Error::Interrupted),
        };
        let Some(batch) = next else { break };
        let (first, last, bytes) = batch?;
        // Chunks are decrypted in place: wipe the buffer when done, verify or not.
        let mut buf = zeroize::Zeroizing::new(bytes.to_vec());
        let mut at = 0;
        for i in first..=last {
            let len = f.layout.chunk_cipher_len(i) as usize;
            let chunk = &mut buf[at..at + len];
            at += len;
            // The manifest's digest of this sealed chunk first: a key holder can make a
            // chunk that authenticates, not one with the digest the manifest lists.
            let listed = match digests.and_then(|d| d.get(i as usize)) {
                Some(d) if crate::crypto::chunk_digest(chunk) != *d => Err(Error::integrity(
                    &f.key,
                    format!("chunk {i} differs from the model manifest"),
                )),
                _ => Ok(()),
            };
            match listed.and_then(|()| f.open_chunk(i, chunk)) {
                Ok(n) => sink(&chunk[..n])?,
                Err(e) if keep_going => {
                    tracing::warn!(file = %f.key, chunk = i, error = %e, "chunk failed authentication");
                    bad.push(i);
                }
                Err(e) => return Err(e),
            }
        }
    }
    Ok(bad)
}

/// One line per file from `verify`.
#[derive(Debug)]
pub struct VerifyReport {
    pub file: String,
    pub result: Result<u64>,
}

/// One line per model from `verify`: what a host would pin (`--model-digest`).
#[derive(Debug)]
pub struct ModelReport {
    pub model: String,
    pub version: u64,
    /// Hex SHA-256 of the manifest plaintext.
    pub digest: String,
    pub signer: Option<String>,
}

/// The models [`verify`] checked and loaded (those that failed are in its file reports).
pub fn loaded_models(
    loc: &Location,
    models: &BTreeMap<String, std::result::Result<Arc<Model>, ModelError>>,
) -> Vec<ModelReport> {
    models
        .values()
        .filter_map(|m| m.as_ref().ok())
        .map(|m| ModelReport {
            model: loc.describe(&m.root),
            version: m.manifest.version,
            digest: m.digest.clone(),
            signer: m.signer.clone(),
        })
        .collect()
}

/// Authenticates every chunk of every sealed file at `loc`; writes no plaintext. Files of
/// a model are checked against its manifest (present, the listed version, every chunk's
/// digest), each model's missing files are reported, and with `origin` signers every
/// model must carry a signature by one of them, with its pin it must be the pinned
/// manifest (under either, loose files are refused).
pub async fn verify(
    loc: &Location,
    keyring: &Keyring,
    origin: &Origin,
    cancel: &Cancel,
) -> Result<(Vec<VerifyReport>, Vec<ModelReport>)> {
    let (files, manifests) = split(loc).await?;
    let listed: HashSet<&str> = files.iter().map(|e| e.logical.as_str()).collect();
    let mut models: BTreeMap<String, std::result::Result<Arc<Model>, ModelError>> = BTreeMap::new();
    let mut out = Vec::new();
    for e in &files {
        let result = verify_one(loc, e, keyring, origin, &manifests, &mut models, cancel).await;
        if matches!(result, Err(Error::Interrupted)) {
            return Err(Error::Interrupted);
        }
        out.push(VerifyReport {
            file: loc.describe(&e.logical),
            result,
        });
    }
    // Every model found (through its files or its manifest): its missing files, and a
    // manifest no file could be checked against.
    let referenced: HashSet<String> = models.keys().cloned().collect();
    for (root, m) in &manifests {
        if !models.contains_key(root) {
            let r = load_model(loc, Some(m), root, keyring, origin).await;
            models.insert(root.clone(), r);
        }
    }
    for (root, m) in &models {
        let key = manifest::under(root, manifest::MANIFEST_NAME);
        let model = match m {
            Ok(m) => m,
            // Already reported on each of its files.
            Err(_) if referenced.contains(root) => continue,
            Err(e) => {
                out.push(VerifyReport {
                    file: loc.describe(&key),
                    result: Err(e.clone().into()),
                });
                continue;
            }
        };
        // Only what this verify covers: a prefix inside a model checks its part.
        for key in missing_files(loc, model, &listed) {
            out.push(VerifyReport {
                file: loc.describe(&key),
                result: Err(missing(model, key).into()),
            });
        }
    }
    let loaded = loaded_models(loc, &models);
    Ok((out, loaded))
}

/// The model at `root` from its listed manifest, or (a verify of part of a model) the one
/// found by name; its signature checked with `origin`'s signers, its digest with the pin.
async fn load_model(
    loc: &Location,
    listed: Option<&SealedEntry>,
    root: &str,
    keyring: &Keyring,
    origin: &Origin,
) -> std::result::Result<Arc<Model>, ModelError> {
    let found = match listed {
        Some(m) => Some(m.clone()),
        None => manifest::find_manifest(&loc.store, root)
            .await
            .map_err(|e| ModelError::from_load(root, e))?,
    };
    let m = manifest::load(&loc.store, found.as_ref(), root, keyring, &origin.signers)
        .await
        .map_err(|e| ModelError::from_load(root, e))?;
    origin.check_pin(&m)?;
    Ok(Arc::new(m))
}

async fn verify_one(
    loc: &Location,
    e: &SealedEntry,
    keyring: &Keyring,
    origin: &Origin,
    manifests: &HashMap<String, SealedEntry>,
    models: &mut BTreeMap<String, std::result::Result<Arc<Model>, ModelError>>,
    cancel: &Cancel,
) -> Result<u64> {
    let ko = read_key_object(&loc.store, e).await?;
    let digests = model_digests(loc, e, &ko, keyring, origin, manifests, models).await?;
    let f = OpenFile::open_parsed(ko, e, keyring).await?;
    let bad = read_all(loc, &f, digests.as_deref(), true, cancel, |_| Ok(())).await?;
    if bad.is_empty() {
        return Ok(f.layout.plaintext_size());
    }
    let mut names: Vec<String> = bad.iter().take(MAX_NAMED).map(u64::to_string).collect();
    if bad.len() > MAX_NAMED {
        names.push(format!("… ({} in all)", bad.len()));
    }
    Err(Error::integrity(
        &f.key,
        format!("chunks failed authentication: {}", names.join(", ")),
    ))
}

/// Decrypts the sealed files at `src` to `dest`. One object: `dest` is the output file (or
/// a directory to put it in). A prefix: `dest` is a directory, files land at relative paths.
/// Every output name is checked before anything is written (names come from the store), and
/// every write goes through [`Dest`]: nothing lands outside `dest` (or, for one object to a
/// file path, outside its directory), no symlink under it is followed, files are 0600 and
/// new directories 0700.
pub async fn unseal(
    src: &Location,
    dest: &Path,
    keyring: &Keyring,
    origin: &Origin,
    force: bool,
    cancel: &Cancel,
) -> Result<Vec<PathBuf>> {
    let (list, manifests) = split(src).await?;
    let single = list.len() == 1 && list[0].logical == src.prefix;
    // (directory, output names relative to it, whether those names came from the store)
    let (root, names, from_store) = if single {
        let key = &list[0].logical;
        if dest.is_dir() {
            let base = key.rsplit('/').next().unwrap_or(key).to_string();
            (dest.to_path_buf(), vec![base], true)
        } else {
            let name = dest::file_name(dest)
                .ok_or_else(|| Error::Usage(format!("{}: not a file name", dest.display())))?;
            let parent = dest.parent().unwrap_or(Path::new(""));
            (parent.to_path_buf(), vec![name.to_string()], false)
        }
    } else {
        let names = list
            .iter()
            .map(|e| {
                e.logical
                    .strip_prefix(&src.prefix)
                    .unwrap_or(&e.logical)
                    .trim_start_matches('/')
                    .to_string()
            })
            .collect();
        (dest.to_path_buf(), names, true)
    };
    if from_store {
        for (e, rel) in list.iter().zip(&names) {
            naming::check_key(rel).map_err(|why| {
                Error::integrity(
                    &naming::escaped(&src.describe(&e.data.key)),
                    format!(
                        "not a clean relative name ({why}): refusing to write it under {}",
                        dest.display()
                    ),
                )
            })?;
        }
    }
    // Every file of a model is checked against its manifest before anything is written (the
    // version and generation it lists, every chunk's digest), and a model with a file
    // missing is refused: an unseal is one version of each model, whole.
    let mut models = BTreeMap::new();
    let mut checked = Vec::with_capacity(list.len());
    for e in &list {
        let ko = read_key_object(&src.store, e).await?;
        let digests = model_digests(src, e, &ko, keyring, origin, &manifests, &mut models).await?;
        checked.push((ko, digests));
    }
    let listed: HashSet<&str> = list.iter().map(|e| e.logical.as_str()).collect();
    for m in models.values() {
        let m = m.as_ref().map_err(|e| Error::from(e.clone()))?;
        if let Some(key) = missing_files(src, m, &listed).into_iter().next() {
            return Err(missing(m, key).into());
        }
    }
    let dir = Dest::open(&root)?;
    let mut written = Vec::new();
    for ((e, rel), (ko, digests)) in list.iter().zip(&names).zip(checked) {
        let out = dir.target(rel)?;
        if out.exists()? && !force {
            return Err(Error::Usage(format!(
                "{}: already exists (use --force to replace it)",
                out.shown.display()
            )));
        }
        let f = OpenFile::open_parsed(ko, e, keyring).await?;
        unseal_one(src, &f, digests.as_deref(), &out, cancel).await?;
        written.push(out.shown);
    }
    Ok(written)
}

/// The keys of the files `m` lists under `loc`'s prefix that the listing does not hold.
fn missing_files(loc: &Location, m: &Model, listed: &HashSet<&str>) -> Vec<String> {
    m.manifest
        .files
        .iter()
        .map(|f| manifest::under(&m.root, &f.path))
        .filter(|key| {
            let covered = *key == loc.prefix || naming::relative_to(key, &loc.prefix).is_some();
            covered && !listed.contains(key.as_str())
        })
        .collect()
}

/// The refusal of model `m` whose listed file `key` is missing.
fn missing(m: &Model, key: String) -> ModelError {
    ModelError::File {
        file: key,
        reason: format!(
            "listed in the manifest (model {:?} version {}) but missing",
            m.root, m.manifest.version
        ),
    }
}

/// The manifest's chunk digests of file `e` (whose key object is `ko`) once it is checked
/// against its model's manifest (loaded once per model into `models`, checked against
/// `origin`); `None` for a loose file, which a proof of origin refuses.
async fn model_digests(
    loc: &Location,
    e: &SealedEntry,
    ko: &crate::format::KeyObject,
    keyring: &Keyring,
    origin: &Origin,
    manifests: &HashMap<String, SealedEntry>,
    models: &mut BTreeMap<String, std::result::Result<Arc<Model>, ModelError>>,
) -> Result<Option<Vec<[u8; 32]>>> {
    let Some(root) = manifest::model_of(&e.data.key, &ko.header.context)? else {
        if origin.proven() {
            return Err(ModelError::Loose {
                file: e.data.key.clone(),
            }
            .into());
        }
        return Ok(None);
    };
    if !models.contains_key(&root) {
        let r = load_model(loc, manifests.get(&root), &root, keyring, origin).await;
        models.insert(root.clone(), r);
    }
    let model = models[&root].as_ref().map_err(|e| Error::from(e.clone()))?;
    let entry = model.check_file(
        &e.data.key,
        &ko.header.file_id,
        &crate::crypto::header_digest(&ko.authenticated),
        e.chunk_log2,
        e.data.size,
    )?;
    Ok(Some(entry.chunk_digests()))
}

async fn unseal_one(
    loc: &Location,
    f: &OpenFile,
    digests: Option<&[[u8; 32]]>,
    out: &Target,
    cancel: &Cancel,
) -> Result<()> {
    let io = |source| Error::Io {
        path: out.shown.display().to_string(),
        source,
    };
    let (file, temp) = out.create_temp()?;
    let mut w = std::io::BufWriter::with_capacity(1 << 20, file);
    let res = read_all(loc, f, digests, false, cancel, |b| {
        w.write_all(b).map_err(io)
    })
    .await;
    let res = res.and_then(|_| {
        w.into_inner()
            .map_err(|e| io(e.into_error()))?
            .sync_all()
            .map_err(io)
    });
    match res {
        Ok(()) => out.commit(&temp),
        Err(err) => {
            out.discard(&temp);
            Err(err)
        }
    }
}
