//! `sealfs reseal`: re-encrypt models under fresh DEKs and file ids, in memory, as a new
//! generation switched to by its manifest (docs/FORMAT.md, "Generations").
//!
//! After a KEK compromise a rewrap is not enough: whoever held the KEK could unwrap every
//! DEK. A reseal gives every file of the model a new DEK wrapped only under `--to-key`,
//! reading each part of the old data object (one ranged GET, pinned to its ETag), checking
//! each chunk against the manifest's digest, decrypting it and sealing it again in the same
//! buffer, through the seal path's multipart upload. Nothing is written to disk.
//!
//! The new files go to `dir/.sealfs-gN/name` beside the old ones, which stay untouched for
//! readers holding them; the new manifest (and its signature, first) is written last and
//! is the switch. Interrupted or failed, the old generation is what every reader sees, and
//! a rerun writes the same generation again from the start.

use std::collections::BTreeSet;

use super::write::{commit_manifest, next_generation, seal_file, SealOptions, Source};
use super::Cancel;
use crate::error::{Error, Result};
use crate::format::naming;
use crate::keys::Keyring;
use crate::manifest::{self, FileEntry, Manifest, ModelError};
use crate::object::{find, read_key_object, OpenFile};
use crate::sign::{Signer, TrustedSigners};
use crate::store::{Location, Store, StoreError};

/// What one model's reseal wrote.
#[derive(Debug)]
pub struct Resealed {
    pub model: String,
    /// The generation replaced, and the one written.
    pub from_generation: u32,
    pub generation: u32,
    pub files: usize,
    pub bytes: u64,
    pub version: u64,
    /// Hex SHA-256 of the new manifest's plaintext (the new `--model-digest`).
    pub digest: String,
    pub signer: Option<String>,
}

/// A reseal: the keys from and to, what the old generation must prove before it is
/// carried forward, and how the new one is written. After a compromise the old KEK proves
/// nothing: its holder could have sealed other content in the model's place, and a reseal
/// would carry it forward under the new key.
pub struct Job<'a> {
    /// Trusted, to unwrap the old DEKs.
    pub from: &'a Keyring,
    /// Exactly the keys of the new DEKs.
    pub to: &'a Keyring,
    /// With any, the model must be signed by one of them (the publisher's key, not the KEK
    /// that may be compromised).
    pub trusted: &'a TrustedSigners,
    /// The old manifest's digest must be this (hex).
    pub pin: Option<&'a str>,
    /// Neither: the operator accepts whatever the old key opens (`--unverified-origin`).
    pub unverified: bool,
    /// Signs the new manifest (required for a signed model).
    pub signer: Option<&'a Signer>,
    /// Part size, parallelism, progress.
    pub opts: SealOptions,
}

/// Reseals every model that has a file at `loc` (a prefix, a model, or one object: the
/// manifest is the unit of the switch, so a model is always resealed whole).
pub async fn reseal(loc: &Location, job: &Job<'_>, cancel: &Cancel) -> Result<Vec<Resealed>> {
    if job.to.is_empty() {
        return Err(Error::Usage("reseal needs at least one --to-key".into()));
    }
    if job.trusted.is_empty() && job.pin.is_none() && !job.unverified {
        return Err(Error::Usage(
            "reseal needs --trust-signer or --model-digest to know the model it carries \
             forward is the publisher's (a holder of the old key could have replaced it), or \
             --unverified-origin to accept whatever the old key opens"
                .into(),
        ));
    }
    let l = find(&loc.store, &loc.prefix).await?;
    if l.sealed.is_empty() {
        return Err(Error::NothingSealed(loc.describe(&loc.prefix)));
    }
    // The models: listed manifests, and the model each listed file's header names (a
    // prefix inside a model lists no manifest).
    let mut roots = BTreeSet::new();
    for e in &l.sealed {
        if let Some(root) = manifest::manifest_root(&e.logical) {
            roots.insert(root.to_string());
            continue;
        }
        let ko = read_key_object(&loc.store, e).await?;
        match manifest::model_of(&e.data.key, &ko.header.context)? {
            Some(root) => roots.insert(root),
            None => {
                return Err(Error::Usage(format!(
                    "{}: a loose file (sealed before models, no manifest): unseal and seal it \
                     again to give it a model",
                    loc.describe(&e.data.key)
                )))
            }
        };
    }
    let mut out = Vec::new();
    for root in roots {
        out.push(reseal_model(&loc.store, &root, job, cancel).await?);
    }
    Ok(out)
}

async fn reseal_model(
    store: &Store,
    root: &str,
    job: &Job<'_>,
    cancel: &Cancel,
) -> Result<Resealed> {
    let Job {
        from,
        to,
        signer,
        ref opts,
        ..
    } = *job;
    let listed = manifest::find_manifest(store, root).await?;
    let model = manifest::load(store, listed.as_ref(), root, from, job.trusted).await?;
    manifest::check_pin(job.pin, &model)?;
    // A signed model stays signed: its signature cannot cover the new manifest, so the
    // publisher signs again, or mounts under --trust-signer would refuse it at the switch.
    let old_sig = naming::generation_key(
        &manifest::under(root, manifest::SIGNATURE_NAME),
        model.generation,
    );
    if signer.is_none() {
        match store.get(&old_sig, manifest::MAX_SIGNATURE_LEN).await {
            Ok(_) => {
                return Err(Error::Usage(format!(
                    "model {}: signed; reseal it with --sign (the signature covers the old \
                     manifest only)",
                    store.describe(root)
                )))
            }
            Err(StoreError::NotFound(_)) => {}
            Err(e) => return Err(e.into()),
        }
    }
    let generation = next_generation(root, model.generation)?;
    let files = find(store, root).await?;
    let total: u64 = model.manifest.files.iter().map(|f| f.plaintext_size).sum();
    let pb = super::progress(total, opts.progress);
    let mut m = Manifest::new(root, model.manifest.version, model.manifest.context.clone());
    for f in &model.manifest.files {
        let logical = manifest::under(root, &f.path);
        let entry = files
            .sealed
            .iter()
            .chain(&files.superseded)
            .find(|e| e.logical == logical && e.generation == model.generation)
            .ok_or_else(|| ModelError::File {
                file: logical.clone(),
                reason: format!(
                    "listed in the manifest (model {root:?} generation {}) but missing",
                    model.generation
                ),
            })?;
        pb.set_message(f.path.clone());
        let ko = read_key_object(store, entry).await?;
        let listed = model.check_file(
            &entry.data.key,
            &ko.header.file_id,
            &crate::crypto::header_digest(&ko.authenticated),
            ko.header.chunk_log2,
            ko.header.layout().object_size(),
        )?;
        let digests = listed.chunk_digests();
        // The user's context pairs go along; the sealfs: ones are made anew.
        let context = ko
            .header
            .context
            .iter()
            .filter(|(k, _)| !k.starts_with("sealfs:"))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let chunk_log2 = ko.header.chunk_log2;
        let file = OpenFile::open_parsed(ko, entry, from).await?;
        let source = Source::Sealed {
            file: Box::new(file),
            digests,
        };
        let file_opts = SealOptions {
            chunk_log2,
            context,
            // Only what an interrupted reseal of this generation left, never visible.
            force: true,
            ..opts.clone()
        };
        let key = naming::generation_key(&logical, generation);
        let (new, _) = seal_file(
            source, store, &key, root, to, &file_opts, cancel, &pb, false,
        )
        .await?;
        tracing::info!(file = %store.describe(&logical), generation, "resealed");
        m.files.push(FileEntry {
            path: f.path.clone(),
            ..new
        });
    }
    let (digest, signed_by) =
        commit_manifest(store, &m, generation, to, signer, opts, cancel, &pb).await?;
    pb.finish_and_clear();
    tracing::info!(
        target: "sealfs::audit",
        model = %store.describe(root),
        from_generation = model.generation,
        generation,
        keys = ?to.ids(),
        digest = %hex::encode(digest),
        "model resealed"
    );
    Ok(Resealed {
        model: root.to_string(),
        from_generation: model.generation,
        generation,
        files: m.files.len(),
        bytes: total,
        version: m.version,
        digest: hex::encode(digest),
        signer: signed_by,
    })
}

/// What `sealfs gc` found: deleted (or, dry run, to delete) and kept for their grace.
#[derive(Debug, Default)]
pub struct Collected {
    /// Object keys deleted (data objects, key objects, signature objects).
    pub deleted: Vec<String>,
    /// Data objects to delete once the grace has passed (readers may hold them).
    pub waiting: Vec<String>,
}

/// Deletes, in every model with a file at `loc`, what its current manifest does not serve,
/// once that manifest has been in place for `grace`: the generations below it (left by a
/// reseal or a republish for readers still holding them) and files of the model it no
/// longer lists (left by an earlier version). The manifest is loaded with `keyring` first,
/// so a planted name or manifest copy (which fails authentication) can make gc refuse,
/// never delete what is served; a generation above the manifest's (a reseal interrupted or
/// running) is never touched.
pub async fn gc(
    loc: &Location,
    keyring: &Keyring,
    grace: std::time::Duration,
    dry_run: bool,
) -> Result<Collected> {
    use std::collections::BTreeMap;
    let store = &loc.store;
    let l = find(store, &loc.prefix).await?;
    // The models: those listed, and those above the prefix (a prefix inside a model).
    let mut roots: BTreeMap<String, crate::object::SealedEntry> = l
        .sealed
        .iter()
        .filter_map(|e| Some((manifest::manifest_root(&e.logical)?.to_string(), e.clone())))
        .collect();
    let prefix = loc.prefix.as_str();
    for dir in std::iter::once(prefix).chain(naming::dirs_above(prefix)) {
        if !roots.contains_key(dir) {
            if let Some(m) = manifest::find_manifest(store, dir).await? {
                roots.insert(dir.to_string(), m);
            }
        }
    }
    // Each object belongs to the innermost model above it.
    let owner = |logical: &str| -> Option<String> {
        let root = match manifest::manifest_root(logical) {
            Some(root) => roots.contains_key(root).then_some(root),
            None => naming::innermost_root(logical, |d| roots.contains_key(d)),
        };
        root.map(str::to_string)
    };
    let now = std::time::SystemTime::now();
    let none = TrustedSigners::default();
    let mut out = Collected::default();
    for (root, listed) in &roots {
        let model = manifest::load(store, Some(listed), root, keyring, &none).await?;
        let aged = |e: &crate::object::SealedEntry| {
            e.data
                .modified
                .and_then(|t| now.duration_since(t).ok())
                .is_some_and(|age| age >= grace)
        };
        let paths: std::collections::HashSet<String> = model
            .manifest
            .files
            .iter()
            .map(|f| manifest::under(root, &f.path))
            .collect();
        for e in l.sealed.iter().chain(&l.superseded) {
            if e.generation > model.generation || owner(&e.logical).as_deref() != Some(root) {
                continue;
            }
            let is_manifest = manifest::manifest_root(&e.logical).is_some();
            let listed_now = is_manifest || paths.contains(&e.logical);
            let doomed = if listed_now {
                e.generation < model.generation
            } else {
                // Not in the model now: only a file whose header names this model (a file
                // sealed into its directory on its own is not gc's to delete).
                let ko = read_key_object(store, e).await?;
                manifest::model_of(&e.data.key, &ko.header.context)?.as_deref() == Some(root)
            };
            if !doomed {
                continue;
            }
            // The manifest's age says how long readers may have held what it replaced. A
            // file it does not list may also be one a republish is writing right now, for a
            // manifest not yet in: it must have aged too.
            if !aged(listed) || (!listed_now && !aged(e)) {
                out.waiting.push(e.data.key.clone());
                continue;
            }
            let mut keys = vec![e.data.key.clone(), e.key_object.key.clone()];
            if is_manifest {
                let sig = naming::generation_key(
                    &manifest::under(root, manifest::SIGNATURE_NAME),
                    e.generation,
                );
                match store.get(&sig, manifest::MAX_SIGNATURE_LEN).await {
                    Ok(_) => keys.push(sig),
                    Err(StoreError::NotFound(_)) => {}
                    Err(err) => return Err(err.into()),
                }
            }
            for key in keys {
                if !dry_run {
                    match store.delete(&key).await {
                        Ok(()) | Err(StoreError::NotFound(_)) => {}
                        Err(err) => return Err(err.into()),
                    }
                    tracing::info!(object = %loc.describe(&key), generation = e.generation, "replaced generation deleted");
                }
                out.deleted.push(key);
            }
        }
    }
    Ok(out)
}
