//! `sealfs seal`: encrypt files and upload them as sealed objects.
//!
//! Per file: a fresh DEK (one KMS GenerateDataKey), then the data object as a multipart
//! upload of parts read with `pread` and sealed in parallel, at most `jobs` parts in memory.
//! Only when every part is in: PUT the key object, complete the upload at once, then delete
//! key objects of another chunk size. On any error or cancellation before that the upload is
//! aborted and nothing else was touched, so no partial file becomes visible and a file
//! resealed with `--force` keeps its previous version (docs/FORMAT.md).

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};

use super::Cancel;
use crate::crypto::{header_digest, random_bytes, seal_chunk, FileKeys};
use crate::error::{Error, Result};
use crate::format::header::{CTX_FILE_ID, CTX_MODEL, CTX_PATH, CTX_VERSION};
use crate::format::layout::PRELUDE_LEN;
use crate::format::{
    naming, EncryptionContext, Header, KeyObject, Layout, Prelude, TAG_LEN, VERSION,
};
use crate::keys::Keyring;
use crate::manifest::{self, FileEntry, Manifest, SignatureObject};
use crate::sign::{oms, Signer};
use crate::store::{Location, Store, StoreError};

/// Options of `sealfs seal`.
#[derive(Debug, Clone)]
pub struct SealOptions {
    pub chunk_log2: u8,
    /// User pairs added to the encryption context (`--context k=v`).
    pub context: Vec<(String, String)>,
    /// Replace existing sealed objects.
    pub force: bool,
    /// Target part size of the multipart upload (S3 needs ≥ 5 MiB for all but the last).
    pub part_size: u64,
    /// Parts sealed and uploaded concurrently (memory ≈ jobs × part size).
    pub jobs: usize,
    pub progress: bool,
    /// The model version written into the manifest (0: the sealing time in milliseconds).
    pub model_version: u64,
}

impl Default for SealOptions {
    fn default() -> Self {
        Self {
            chunk_log2: crate::format::DEFAULT_CHUNK_LOG2,
            context: Vec::new(),
            force: false,
            part_size: 16 << 20,
            jobs: 4,
            progress: false,
            model_version: 0,
        }
    }
}

/// S3 allows at most 10,000 parts.
const MAX_PARTS: u64 = 10_000;

/// Files under `src` (or `src` itself) as (path, relative `/`-separated name), sorted.
fn source_files(src: &Path) -> Result<Vec<(PathBuf, String)>> {
    let io = |p: &Path| {
        let p = p.display().to_string();
        move |source| Error::Io { path: p, source }
    };
    let meta = std::fs::metadata(src).map_err(io(src))?;
    if meta.is_file() {
        let name = src
            .file_name()
            .and_then(|n| n.to_str())
            .ok_or_else(|| Error::Usage("bad file name".into()))?;
        return Ok(vec![(src.to_path_buf(), name.to_string())]);
    }
    let mut out = Vec::new();
    let mut stack = vec![(src.to_path_buf(), String::new())];
    while let Some((dir, rel)) = stack.pop() {
        for e in std::fs::read_dir(&dir).map_err(io(&dir))? {
            let e = e.map_err(io(&dir))?;
            let name = e.file_name().to_str().map(str::to_string).ok_or_else(|| {
                Error::Usage(format!("{}: file name is not UTF-8", e.path().display()))
            })?;
            let r = if rel.is_empty() {
                name
            } else {
                format!("{rel}/{name}")
            };
            let ft = e.file_type().map_err(io(&e.path()))?;
            if ft.is_dir() {
                stack.push((e.path(), r));
            } else if ft.is_file() {
                out.push((e.path(), r));
            }
        }
    }
    out.sort_by(|a, b| a.1.cmp(&b.1));
    Ok(out)
}

/// Seals `src` (a file or a directory) to `dest` as an unsigned model. Returns the data
/// object keys of its files.
pub async fn seal(
    src: &Path,
    dest: &Location,
    keyring: &Keyring,
    opts: &SealOptions,
    cancel: &Cancel,
) -> Result<Vec<String>> {
    Ok(
        seal_model(src, dest, keyring, opts, None, &Default::default(), cancel)
            .await?
            .files,
    )
}

/// What [`seal_model`] wrote.
#[derive(Debug)]
pub struct SealedModel {
    /// Data object keys of the model's files.
    pub files: Vec<String>,
    /// The manifest's key.
    pub manifest: String,
    pub version: u64,
    /// Hex SHA-256 of the manifest plaintext (what `--model-digest` pins).
    pub digest: String,
    /// The signer id, if signed.
    pub signer: Option<String>,
    /// The generation written (0 in place; N+1 over a model a reseal moved to N).
    pub generation: u32,
}

/// Seals `src` (a file or a directory) to `dest` as a model: every file, then its manifest
/// (a sealed file listing them, with the digest of every sealed chunk), then, with a
/// `signer`, the publisher signature. Returns the data object keys written.
pub async fn seal_model(
    src: &Path,
    dest: &Location,
    keyring: &Keyring,
    opts: &SealOptions,
    signer: Option<&Signer>,
    gate: &crate::sign::TrustedSigners,
    cancel: &Cancel,
) -> Result<SealedModel> {
    if keyring.is_empty() {
        return Err(Error::Usage("seal needs at least one --key".into()));
    }
    for (k, _) in &opts.context {
        if k.starts_with("sealfs:") {
            return Err(Error::Usage(format!(
                "context key {k:?}: the sealfs: prefix is reserved"
            )));
        }
    }
    let files = source_files(src)?;
    if let Some((_, rel)) = files.iter().find(|(_, r)| naming::is_reserved_name(r)) {
        return Err(Error::Usage(format!(
            "{rel}: names containing .sealfs-c are reserved"
        )));
    }
    if let Some((_, rel)) = files
        .iter()
        .find(|(_, r)| manifest::is_reserved(r.rsplit('/').next().unwrap_or(r)))
    {
        return Err(Error::Usage(format!(
            "{rel}: {} and {} are reserved names",
            manifest::MANIFEST_NAME,
            manifest::SIGNATURE_NAME
        )));
    }
    // A pipeline gate: seal only what training signed (DIR/model.sig, OMS). The signature
    // and the names are checked before anything is written; the contents inside the
    // sealing pass, from the bytes sealed, before the manifest is written.
    let refusing = |e: oms::OmsError| {
        Error::integrity(&src.display().to_string(), format!("refusing to seal: {e}"))
    };
    let statement = match gate.is_empty() {
        true => None,
        false => {
            let st = oms::Statement::verify(src, gate).map_err(refusing)?;
            st.check_names(files.iter().map(|(_, rel)| rel.as_str()))
                .map_err(refusing)?;
            Some(st)
        }
    };
    // Under a gate, only what training signed is sealed (its model.sig too): a file the
    // statement does not cover (`.git/…`, its ignore_paths) would otherwise be published
    // unchecked, and signed with --sign.
    let files: Vec<_> = match &statement {
        Some(st) => files
            .into_iter()
            .filter(|(_, rel)| st.covers(rel) || rel == oms::SIGNATURE_FILE)
            .collect(),
        None => files,
    };
    // The SHA-256 of each file's plaintext, for the gate and for the OMS signature.
    let hash = statement.is_some() || signer.is_some();
    // With a signer, the model's own OMS signature replaces any model.sig in SRC.
    let files: Vec<_> = match signer {
        Some(_) => files
            .into_iter()
            .filter(|(_, rel)| rel != oms::SIGNATURE_FILE)
            .collect(),
        None => files,
    };
    let root = dest.prefix.as_str();
    if naming::is_reserved_name(root) {
        return Err(Error::Usage(format!(
            "{}: names containing .sealfs-c or a .sealfs-g segment are reserved",
            dest.describe(root)
        )));
    }
    // A model is replaced whole: without --force an existing one stays as it is. With it,
    // generation N is replaced by generation N+1 beside it, switched to by its manifest, as
    // a reseal does: nothing a reader holds is rewritten in place, an interrupted or
    // refused republish leaves the served model whole, and gc never mistakes a file being
    // written for one the model dropped.
    let current = manifest::find_manifest(&dest.store, root).await?;
    if let Some(m) = current.as_ref().filter(|_| !opts.force) {
        return Err(StoreError::Exists(dest.describe(&m.data.key)).into());
    }
    let generation = match &current {
        Some(m) => next_generation(root, m.generation)?,
        None => 0,
    };
    let manifest_key =
        naming::generation_key(&manifest::under(root, manifest::MANIFEST_NAME), generation);
    // A destination key must be one a mount or an unseal would accept back.
    for (_, rel) in &files {
        let key = dest.key(rel);
        naming::check_key(&key).map_err(|why| {
            Error::Usage(format!(
                "{}: not a clean relative object name: {why}",
                naming::escaped(&key)
            ))
        })?;
    }
    let total: u64 = files
        .iter()
        .map(|(p, _)| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0))
        .sum();
    let pb = super::progress(total, opts.progress);
    let mut written = Vec::with_capacity(files.len() + 1);
    let user_context = opts.context.iter().cloned().collect();
    let mut m = Manifest::new(root, opts.model_version, user_context);
    let file_opts = SealOptions {
        force: opts.force || generation > 0,
        ..opts.clone()
    };
    let mut digests = Vec::with_capacity(files.len());
    for (path, rel) in &files {
        let key = naming::generation_key(&dest.key(rel), generation);
        pb.set_message(rel.clone());
        let source = Source::open(path)?;
        // Boxed, as below: seal_file's future is large, and a debug build's poll frames
        // of seal_model would otherwise hold several copies of it on the stack.
        let (entry, sha256) = Box::pin(seal_file(
            source,
            &dest.store,
            &key,
            root,
            keyring,
            &file_opts,
            cancel,
            &pb,
            hash,
        ))
        .await?;
        m.files.push(FileEntry {
            path: rel.clone(),
            ..entry
        });
        tracing::info!(file = %dest.describe(&key), "sealed");
        written.push(key);
        if let Some(d) = sha256 {
            digests.push((rel.clone(), d));
        }
    }
    if let Some(st) = &statement {
        if let Err(e) = st.check(&digests) {
            // A file changed after the gate's first look: what was written goes, and the
            // model served (if any) stays as it was.
            discard(&dest.store, &written, opts.chunk_log2).await;
            return Err(refusing(e));
        }
    }
    // The publisher's OMS signature over the plaintext sealed (model_signing verifies it
    // on the mount), sealed like the other files and listed in the manifest.
    if let Some(signer) = signer {
        let name = src
            .canonicalize()
            .ok()
            .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
            .unwrap_or_else(|| "model".into());
        let payload = oms::statement(&name, &digests);
        let bundle = oms::bundle(signer, &payload)
            .await
            .map_err(|e| Error::Usage(format!("signing the OMS signature: {e}")))?;
        let key = naming::generation_key(&dest.key(oms::SIGNATURE_FILE), generation);
        let source = Source::Mem(zeroize::Zeroizing::new(bundle));
        let (entry, _) = Box::pin(seal_file(
            source,
            &dest.store,
            &key,
            root,
            keyring,
            &plain_force(opts),
            cancel,
            &pb,
            false,
        ))
        .await?;
        m.files.push(FileEntry {
            path: oms::SIGNATURE_FILE.to_string(),
            ..entry
        });
        written.push(key);
    }
    let (digest, signed_by) = Box::pin(commit_manifest(
        &dest.store,
        &m,
        generation,
        keyring,
        signer,
        opts,
        cancel,
        &pb,
    ))
    .await?;
    pb.finish_and_clear();
    Ok(SealedModel {
        files: written,
        manifest: manifest_key,
        version: m.version,
        digest: hex::encode(digest),
        signer: signed_by,
        generation,
    })
}

/// Writes manifest `m` of generation `generation`, and its signature first (a signature
/// of a manifest not yet written is never consulted; a manifest written before its
/// signature would be refused as unsigned). The manifest is the switch: until it is in, a
/// mount serves the previous version whole (a file of a newer generation is not shown, a
/// file rewritten in place is not in the old manifest), never a mix of two versions.
/// Returns the manifest digest and the signer id.
#[allow(clippy::too_many_arguments)]
pub(super) async fn commit_manifest(
    store: &Store,
    m: &Manifest,
    generation: u32,
    keyring: &Keyring,
    signer: Option<&Signer>,
    opts: &SealOptions,
    cancel: &Cancel,
    pb: &indicatif::ProgressBar,
) -> Result<([u8; 32], Option<String>)> {
    let root = m.model.as_str();
    let bytes = zeroize::Zeroizing::new(m.to_bytes());
    let digest = crate::crypto::sha256(&bytes);
    let sig_key =
        naming::generation_key(&manifest::under(root, manifest::SIGNATURE_NAME), generation);
    let signed_by = match signer {
        Some(signer) => {
            let sig = signer
                .sign(&crate::sign::signed_message(&digest))
                .await
                .map_err(|e| Error::Usage(format!("signing the manifest: {e}")))?;
            let obj = SignatureObject::new(signer, m, &digest, &sig);
            let body = serde_json::to_vec_pretty(&obj).expect("serializes");
            store.put(&sig_key, Bytes::from(body)).await?;
            tracing::info!(model = %store.describe(root), signer = %obj.signer, version = m.version, "manifest signed");
            Some(obj.signer)
        }
        None => None,
    };
    let manifest_key =
        naming::generation_key(&manifest::under(root, manifest::MANIFEST_NAME), generation);
    let source = Source::Mem(bytes);
    let plain = plain_force(opts);
    seal_file(
        source,
        store,
        &manifest_key,
        root,
        keyring,
        &plain,
        cancel,
        pb,
        false,
    )
    .await?;
    if signer.is_none() {
        // A signature of the previous version would only fail: remove it.
        match store.delete(&sig_key).await {
            Ok(()) | Err(StoreError::NotFound(_)) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok((digest, signed_by))
}

/// The generation after `g` of the model at `root`, within the names sealfs writes (a
/// planted manifest name cannot push a seal or reseal past them).
pub(super) fn next_generation(root: &str, g: u32) -> Result<u32> {
    g.checked_add(1)
        .filter(|n| *n <= naming::MAX_GENERATION)
        .ok_or_else(|| Error::Usage(format!("model {root:?}: no generation left after {g}")))
}

async fn existing(store: &Store, key: &str) -> Result<Vec<String>> {
    Ok(store
        .list(key)
        .await?
        .into_iter()
        .map(|o| o.key)
        .filter(|k| k == key || naming::parse_key_object_name(k).is_some_and(|(d, _)| d == key))
        .collect())
}

/// `opts` for objects sealfs writes itself (model.sig, the manifest): always replaced.
fn plain_force(opts: &SealOptions) -> SealOptions {
    SealOptions {
        force: true,
        ..opts.clone()
    }
}

/// What a file is sealed from: a local file, bytes in memory (the manifest), or a sealed
/// file of the same store (reseal), decrypted part by part in memory.
pub(super) enum Source {
    File(std::fs::File, String),
    Mem(zeroize::Zeroizing<Vec<u8>>),
    Sealed {
        file: Box<crate::object::OpenFile>,
        /// Its manifest entry's digest of each sealed chunk, checked before decryption.
        digests: Vec<[u8; 32]>,
    },
}

impl Source {
    /// A regular file, never through a symlink: the one descriptor it is sealed (and
    /// hashed) from.
    fn open(path: &Path) -> Result<Self> {
        let shown = path.display().to_string();
        let (file, _) = crate::localfile::open_regular(path).map_err(|e| match e {
            crate::localfile::OpenError::Io(source) => Error::Io {
                path: shown.clone(),
                source,
            },
            e => Error::Usage(format!("{shown}: {e}")),
        })?;
        Ok(Source::File(file, shown))
    }

    fn len(&self) -> Result<u64> {
        match self {
            Source::File(f, p) => Ok(f
                .metadata()
                .map_err(|source| Error::Io {
                    path: p.clone(),
                    source,
                })?
                .len()),
            Source::Mem(b) => Ok(b.len() as u64),
            Source::Sealed { file, .. } => Ok(file.layout.plaintext_size()),
        }
    }

    fn read_exact_at(&self, buf: &mut [u8], at: u64) -> Result<()> {
        match self {
            Source::File(f, p) => f.read_exact_at(buf, at).map_err(|source| Error::Io {
                path: format!("{p} (changed while sealing?)"),
                source,
            }),
            Source::Mem(b) => {
                let at = at as usize;
                buf.copy_from_slice(&b[at..at + buf.len()]);
                Ok(())
            }
            // Read part by part in PartJob::build, never through here.
            Source::Sealed { file, .. } => Err(Error::integrity(
                &file.key,
                "a sealed source read outside its parts",
            )),
        }
    }
}

/// Seals one file at `key` as part of the model at `root`; returns its manifest entry
/// (with `path` still to be made relative to the root).
#[allow(clippy::too_many_arguments)]
pub(super) async fn seal_file(
    file: Source,
    store: &Store,
    key: &str,
    root: &str,
    keyring: &Keyring,
    opts: &SealOptions,
    cancel: &Cancel,
    pb: &indicatif::ProgressBar,
    hash: bool,
) -> Result<(FileEntry, Option<[u8; 32]>)> {
    let old = existing(store, key).await?;
    if !old.is_empty() && !opts.force {
        return Err(StoreError::Exists(store.describe(key)).into());
    }
    let size = file.len()?;
    let layout = Layout::new(opts.chunk_log2, size).map_err(|e| Error::Usage(e.to_string()))?;

    let mut file_id = [0u8; 16];
    random_bytes(&mut file_id);
    let mut context: EncryptionContext = opts.context.iter().cloned().collect();
    context.insert(CTX_VERSION.into(), VERSION.to_string());
    context.insert(CTX_FILE_ID.into(), hex::encode(file_id));
    context.insert(CTX_PATH.into(), key.to_string());
    context.insert(CTX_MODEL.into(), root.to_string());
    let header = Header {
        chunk_log2: opts.chunk_log2,
        file_id,
        plaintext_size: size,
        context,
    };
    let authenticated = header.encode().map_err(|e| Error::Usage(e.to_string()))?;

    let (dek, slots) = keyring
        .new_dek(&header.context)
        .await
        .map_err(|e| Error::key(key, e))?;
    KeyObject::validate_slots(&slots).map_err(|e| Error::Usage(e.to_string()))?;
    let keys = FileKeys::derive(&dek, &file_id)?;
    drop(dek);
    let ko = KeyObject {
        mac: keys.header_mac(&authenticated),
        header,
        authenticated,
        slots,
    };
    let digest = header_digest(&ko.authenticated);

    // The old pair (if any) stays untouched, and readable, while the new data object is
    // uploaded: a multipart upload is invisible until completed (a local upload is a hidden
    // temporary file). Only once every part is in are the two objects swapped.
    let key_name = naming::key_object_name(key, opts.chunk_log2);
    let upload = store.start_upload(key).await?;
    let job = Arc::new(PartJob {
        file,
        keys,
        digest,
        layout,
        file_id,
        chunks_per_part: chunks_per_part(&layout, opts.part_size),
        chunk_digests: std::sync::Mutex::new(vec![[0u8; 32]; layout.chunk_count() as usize]),
        plain_sha256: hash.then(InOrder::default),
    });
    let staged = async {
        tokio::select! {
            r = upload_parts(store, &upload, &job, opts.jobs.max(1), pb) => r,
            _ = cancel.cancelled() => Err(Error::Interrupted),
        }?;
        // The key object the new one replaces, to put back should the swap fail.
        if old.contains(&key_name) {
            Ok(Some(
                store
                    .get(&key_name, crate::format::header::MAX_KEY_OBJECT_LEN)
                    .await?
                    .0,
            ))
        } else {
            Ok::<_, Error>(None)
        }
    }
    .await;
    let previous = match staged {
        Ok(p) => p,
        Err(e) => {
            if let Some(h) = &job.plain_sha256 {
                h.abandon(&crate::error_chain(&e));
            }
            abort(store, key, upload).await;
            return Err(e);
        }
    };
    // The swap: from the key object PUT to the completion, the old data object pairs with
    // the new key object (an open fails authentication) for one CompleteMultipartUpload
    // round trip; docs/FORMAT.md explains why this order and not the other.
    let swapped = match store.put(&key_name, Bytes::from(ko.to_bytes())).await {
        Ok(()) => upload.complete().await,
        Err(e) => {
            abort(store, key, upload).await;
            Err(e)
        }
    };
    if let Err(e) = swapped {
        // The old data object is still in place: so is its key object again (a failed PUT
        // may still have landed).
        let restored = match previous {
            Some(b) => store.put(&key_name, b).await,
            None => match store.delete(&key_name).await {
                Err(StoreError::NotFound(_)) => Ok(()),
                r => r,
            },
        };
        if let Err(r) = restored {
            tracing::warn!(file = %store.describe(key), error = %r, "could not restore the previous key object");
        }
        return Err(e.into());
    }
    // Key objects of another chunk size make the pair ambiguous (the file is hidden) until
    // they are gone.
    for k in old.iter().filter(|k| **k != key && **k != key_name) {
        store.delete(k).await?;
    }
    let chunks = std::mem::take(&mut *job.chunk_digests.lock().unwrap_or_else(|p| p.into_inner()));
    let sha256 = job.plain_sha256.as_ref().map(InOrder::finish);
    let entry = FileEntry {
        path: key.to_string(),
        file_id: hex::encode(file_id),
        header_sha256: hex::encode(digest),
        format_version: VERSION,
        chunk_log2: layout.chunk_log2(),
        plaintext_size: layout.plaintext_size(),
        object_size: layout.object_size(),
        chunks: chunks.into_iter().map(manifest::Digest).collect(),
    };
    Ok((entry, sha256))
}

/// Deletes sealed files written by a seal that is refused before its manifest (their data
/// and key objects); a delete that fails is only logged (what is left is never served: no
/// manifest lists it).
async fn discard(store: &Store, written: &[String], chunk_log2: u8) {
    for key in written {
        for k in [key.clone(), naming::key_object_name(key, chunk_log2)] {
            match store.delete(&k).await {
                Ok(()) | Err(StoreError::NotFound(_)) => {}
                Err(e) => {
                    tracing::warn!(object = %store.describe(&k), error = %e, "could not delete")
                }
            }
        }
    }
}

async fn abort(store: &Store, key: &str, upload: crate::store::Upload) {
    if let Err(a) = upload.abort().await {
        tracing::warn!(file = %store.describe(key), error = %a, "could not abort the upload");
    }
}

/// Chunks per part: the part size rounded to whole chunks, grown so that the object fits
/// in S3's 10,000 parts.
fn chunks_per_part(layout: &Layout, part_size: u64) -> u64 {
    let c = layout.chunk_size() + TAG_LEN;
    let by_size = part_size.div_ceil(c).max(1);
    let by_count = layout.chunk_count().div_ceil(MAX_PARTS);
    by_size.max(by_count)
}

struct PartJob {
    file: Source,
    keys: FileKeys,
    digest: [u8; 32],
    layout: Layout,
    file_id: [u8; 16],
    chunks_per_part: u64,
    /// SHA-256 of each sealed chunk, for the manifest.
    chunk_digests: std::sync::Mutex<Vec<[u8; 32]>>,
    /// SHA-256 of the plaintext as it was read to be sealed (seal gate, OMS signature).
    plain_sha256: Option<InOrder>,
}

/// SHA-256 of a file's plaintext fed by parts sealed in parallel: part `p` hashes its bytes
/// once parts `0..p` have (each waits its turn), so the digest is of exactly the bytes
/// that were sealed, read once, from the one descriptor.
struct InOrder {
    /// The next part to hash, and the hash (`None` once the file is abandoned).
    state: std::sync::Mutex<(u64, Option<ring::digest::Context>)>,
    turn: std::sync::Condvar,
    /// Why the file was abandoned, for the parts woken by it.
    cause: std::sync::Mutex<String>,
}

impl Default for InOrder {
    fn default() -> Self {
        Self {
            state: std::sync::Mutex::new((
                0,
                Some(ring::digest::Context::new(&ring::digest::SHA256)),
            )),
            turn: std::sync::Condvar::new(),
            cause: Default::default(),
        }
    }
}

impl InOrder {
    /// Hashes part `p`'s `pieces` in its turn. Parts start in order (and each hashes before
    /// it seals or uploads), so the wait is for parts already running; once the file is
    /// abandoned (an error or a panic elsewhere, a cancelled upload), it fails at once,
    /// with the cause.
    fn feed<'a>(&self, p: u64, pieces: impl Iterator<Item = &'a [u8]>) -> Result<()> {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        while st.0 != p && st.1.is_some() {
            st = self.turn.wait(st).unwrap_or_else(|e| e.into_inner());
        }
        let Some(ctx) = st.1.as_mut() else {
            let cause = self.cause.lock().unwrap_or_else(|e| e.into_inner()).clone();
            return Err(Error::Io {
                path: "(the file being sealed)".into(),
                source: std::io::Error::other(format!("an earlier part failed: {cause}")),
            });
        };
        for piece in pieces {
            ctx.update(piece);
        }
        st.0 += 1;
        self.turn.notify_all();
        Ok(())
    }

    /// Wakes every part waiting for its turn, which then fails with `cause`: the file is
    /// not sealed.
    fn abandon(&self, cause: &str) {
        {
            let mut c = self.cause.lock().unwrap_or_else(|e| e.into_inner());
            if c.is_empty() {
                *c = cause.to_string();
            }
        }
        self.state.lock().unwrap_or_else(|e| e.into_inner()).1 = None;
        self.turn.notify_all();
    }

    /// The digest, once every part was fed.
    fn finish(&self) -> [u8; 32] {
        let ctx = self
            .state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .1
            .take();
        let mut out = [0u8; 32];
        if let Some(ctx) = ctx {
            out.copy_from_slice(ctx.finish().as_ref());
        }
        out
    }
}

/// Abandons the file's hash when dropped armed: a part that panics (unwinding through
/// here) must not leave the parts after it waiting for its turn.
struct AbandonOnDrop<'a>(Option<&'a InOrder>);

impl Drop for AbandonOnDrop<'_> {
    fn drop(&mut self) {
        if let Some(h) = self.0 {
            h.abandon("a sealing task panicked");
        }
    }
}

impl PartJob {
    fn parts(&self) -> u64 {
        self.layout.chunk_count().div_ceil(self.chunks_per_part)
    }

    /// The chunks of part `p` (0-based).
    fn chunks(&self, p: u64) -> (u64, u64) {
        let first = p * self.chunks_per_part;
        (
            first,
            (first + self.chunks_per_part).min(self.layout.chunk_count()) - 1,
        )
    }

    /// Object offset and ciphertext of part `p` (0-based): chunks read with pread and
    /// sealed in place. The first part starts with the prelude. From a sealed source,
    /// `sealed` holds the part as the old object has it (same chunk size, so the same
    /// offsets): each chunk is checked, decrypted and sealed again where it lies.
    fn build(&self, p: u64, sealed: Option<Vec<u8>>) -> Result<(u64, Bytes, u64)> {
        if let (Source::Sealed { file, digests }, Some(buf)) = (&self.file, sealed) {
            return self.reseal(p, file, digests, buf);
        }
        let mut guard = AbandonOnDrop(self.plain_sha256.as_ref());
        let built = self.seal_part(p);
        guard.0 = None;
        if let (Err(e), Some(h)) = (&built, &self.plain_sha256) {
            // Parts after this one must not wait for its turn.
            h.abandon(&crate::error_chain(e));
        }
        built
    }

    /// [`PartJob::build`] from a local source: read, hashed in turn if asked, sealed in
    /// place.
    fn seal_part(&self, p: u64) -> Result<(u64, Bytes, u64)> {
        let (first, last) = self.chunks(p);
        let (mut start, end) = self.layout.cipher_range(first, last);
        let mut buf = Vec::with_capacity((end - start + PRELUDE_LEN) as usize);
        if first == 0 {
            let prelude = Prelude {
                version: VERSION,
                chunk_log2: self.layout.chunk_log2(),
                file_id: self.file_id,
            };
            buf.extend_from_slice(&prelude.to_bytes());
            start = 0;
        }
        let mut plain_bytes = 0;
        let base = buf.len();
        for i in first..=last {
            let n = self.layout.chunk_plain_len(i);
            let at = buf.len();
            buf.resize(at + n + TAG_LEN as usize, 0);
            self.file
                .read_exact_at(&mut buf[at..at + n], i << self.layout.chunk_log2())?;
        }
        if let Some(h) = &self.plain_sha256 {
            let mut at = base;
            let pieces = (first..=last).map(|i| {
                let n = self.layout.chunk_plain_len(i);
                let piece = &buf[at..at + n];
                at += n + TAG_LEN as usize;
                piece
            });
            h.feed(p, pieces)?;
        }
        let mut at = base;
        for i in first..=last {
            let n = self.layout.chunk_plain_len(i);
            let chunk = &mut buf[at..at + n + TAG_LEN as usize];
            seal_chunk(&self.keys, &self.digest, i, self.layout.is_last(i), chunk);
            let d = crate::crypto::chunk_digest(chunk);
            self.chunk_digests.lock().unwrap_or_else(|p| p.into_inner())[i as usize] = d;
            plain_bytes += n as u64;
            at += chunk.len();
        }
        Ok((start, Bytes::from(buf), plain_bytes))
    }

    /// [`PartJob::build`] from a sealed source: `buf` is part `p` of the old object.
    fn reseal(
        &self,
        p: u64,
        old: &crate::object::OpenFile,
        digests: &[[u8; 32]],
        mut buf: Vec<u8>,
    ) -> Result<(u64, Bytes, u64)> {
        let (first, last) = self.chunks(p);
        let (mut start, _) = self.layout.cipher_range(first, last);
        let mut at = 0;
        if first == 0 {
            old.check_prelude(&buf[..PRELUDE_LEN as usize])?;
            let prelude = Prelude {
                version: VERSION,
                chunk_log2: self.layout.chunk_log2(),
                file_id: self.file_id,
            };
            buf[..PRELUDE_LEN as usize].copy_from_slice(&prelude.to_bytes());
            at = PRELUDE_LEN as usize;
            start = 0;
        }
        let mut plain_bytes = 0;
        for i in first..=last {
            let n = self.layout.chunk_plain_len(i);
            let chunk = &mut buf[at..at + n + TAG_LEN as usize];
            // The manifest's digest first: a holder of the old KEK can make a chunk that
            // authenticates, not one with the digest the manifest lists.
            if digests.get(i as usize) != Some(&crate::crypto::chunk_digest(chunk)) {
                return Err(Error::integrity(
                    &old.key,
                    format!("chunk {i} differs from the model manifest"),
                ));
            }
            old.open_chunk(i, chunk)?;
            seal_chunk(&self.keys, &self.digest, i, self.layout.is_last(i), chunk);
            let d = crate::crypto::chunk_digest(chunk);
            self.chunk_digests.lock().unwrap_or_else(|p| p.into_inner())[i as usize] = d;
            plain_bytes += n as u64;
            at += chunk.len();
        }
        Ok((start, Bytes::from(buf), plain_bytes))
    }
}

/// Part `first..=last` of sealed file `f` as stored (from offset 0 when `first` is 0, so
/// with the prelude), streamed into one buffer of exactly its length: the store cannot
/// make it longer, and a shorter answer fails.
async fn fetch_part(
    store: &Store,
    f: &crate::object::OpenFile,
    first: u64,
    last: u64,
) -> Result<Vec<u8>> {
    let (start, end) = f.layout.cipher_range(first, last);
    let start = if first == 0 { 0 } else { start };
    let want = (end - start) as usize;
    let mut body = f.fetch_stream(store, first, last).await?;
    let mut buf = Vec::with_capacity(want);
    while let Some(piece) = body.next().await {
        let piece = piece?;
        if buf.len() + piece.len() > want {
            return Err(Error::integrity(
                &f.key,
                "the store sent more than the range asked",
            ));
        }
        buf.extend_from_slice(&piece);
    }
    if buf.len() != want {
        return Err(Error::integrity(
            &f.key,
            "the store sent less than the range asked",
        ));
    }
    Ok(buf)
}

async fn upload_parts(
    store: &Store,
    upload: &crate::store::Upload,
    job: &Arc<PartJob>,
    jobs: usize,
    pb: &indicatif::ProgressBar,
) -> Result<()> {
    futures::stream::iter(0..job.parts())
        .map(|p| {
            let job = job.clone();
            async move {
                // A sealed source: the part's ciphertext in one ranged GET, pinned to the
                // ETag it was opened at.
                let sealed = match &job.file {
                    Source::Sealed { file, .. } => {
                        let (first, last) = job.chunks(p);
                        Some(fetch_part(store, file, first, last).await?)
                    }
                    _ => None,
                };
                let (offset, body, plain) =
                    tokio::task::spawn_blocking(move || job.build(p, sealed))
                        .await
                        .expect("sealing task panicked")?;
                upload.put_part(p as u32 + 1, offset, body).await?;
                pb.inc(plain);
                Ok::<_, Error>(())
            }
        })
        .buffer_unordered(jobs)
        .try_collect::<()>()
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn part_sizing() {
        let l = Layout::new(20, 100 << 20).unwrap();
        assert_eq!(chunks_per_part(&l, 16 << 20), 16);
        // 20 TiB at 1 MiB chunks needs bigger parts to stay within 10,000.
        let big = Layout::new(20, 20 << 40).unwrap();
        let k = chunks_per_part(&big, 16 << 20);
        assert!(big.chunk_count().div_ceil(k) <= MAX_PARTS);
    }
}
