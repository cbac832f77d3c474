//! The open path: confirm the listed version (a GET pinned to its ETag, or a re-list),
//! unwrap its DEK once per version (single flight, revocation epoch), and the model's
//! verdict on the file (manifest, signers, pin) before any key provider call.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::*;

/// Bounds of the LIST an open sends for one object's current version.
/// (One object's generations share their directory's `.sealfs-gN/` listings with its
/// neighbours' and its model's manifest: room for a few thousand resealed files.)
const RELIST_LIMITS: ListLimits = ListLimits {
    max_objects: 10_000,
    max_pages: 12,
    timeout: Duration::from_secs(30),
};

/// Why [`SealFs::open_listed`] could not open the version the tree lists.
enum Listed {
    /// Not confirmed: changed or gone since listed, no ETag to pin it by, or the GET
    /// failed. The LIST path takes over (and reports a failure of its own).
    Stale,
    Failed(FsError),
}

impl Listed {
    fn stale(file: &str, e: StoreError) -> Self {
        tracing::debug!(file, error = %e, "listed version not confirmed; re-listing");
        Listed::Stale
    }
}

impl SealFs {
    /// Opens a file for reading; `who` names the requester (uid, pid) for the audit line.
    ///
    /// An inode is one version: an open that finds another version than the inode's (the
    /// object was replaced) moves the path to a new inode and fails with ESTALE, on which
    /// the kernel looks the name up again and opens the new inode. So the kernel's cached
    /// pages of the old version can never be served to a reader of the new one.
    pub async fn open(self: &Arc<Self>, ino: u64, who: (u32, u32)) -> Result<u64, FsError> {
        // Boxed: the open's state machine is large, and callers' stacks (a test thread,
        // a runtime worker) need not hold it.
        Box::pin(self.open_as(ino, who, None)).await
    }

    /// A file handle the kernel holds from a predecessor daemon (fuse/handover.rs), met at
    /// its first request: opened again under the same number, with every check and audit
    /// line of an open. The inode may be retired by now; only the version it stands for is
    /// served (another is ESTALE).
    pub async fn reopen(
        self: &Arc<Self>,
        fh: u64,
        ino: u64,
        who: (u32, u32),
    ) -> Result<(), FsError> {
        if !self.resumed {
            return Err(FsError::BadHandle);
        }
        Box::pin(self.open_as(ino, who, Some(fh))).await.map(|_| ())
    }

    async fn open_as(
        self: &Arc<Self>,
        ino: u64,
        who: (u32, u32),
        adopt: Option<u64>,
    ) -> Result<u64, FsError> {
        let entry = {
            let t = self.tree();
            if t.is_retired(ino) && adopt.is_none() {
                return Err(FsError::Stale);
            }
            match t.get(ino) {
                Some(Node::File { entry, .. }) => entry.clone(),
                Some(Node::Dir { .. }) => return Err(FsError::IsDir),
                None => return Err(FsError::NotFound),
            }
        };
        // A revoke issued from here on may miss this version (being unwrapped, or replaced
        // in `files`) until its handle is in `handles`: checked once it is.
        let epoch = self.revoke_epoch();
        let (opened, slot) = match self.open_listed(&entry, who).await {
            Ok(o) => o,
            Err(Listed::Failed(e)) => return Err(e),
            Err(Listed::Stale) => self.open_relisted(&entry, who).await?,
        };
        // The version this inode stands for: the listed ETag, and (whatever ETags the
        // store sends, or none) the header MAC its first open authenticated, checked and
        // set under the tree lock so that two first opens cannot give it two versions.
        let listed_other = !entry.data.etag.is_empty() && entry.data.etag != opened.file.etag;
        let same = !listed_other
            && self
                .tree
                .write()
                .unwrap_or_else(|p| p.into_inner())
                .same_version(ino, &opened.file.key_object.mac);
        if !same {
            self.close_slot(&slot);
            let mut fresh = entry.clone();
            // Possibly another generation of the path (the listed one was deleted by gc).
            fresh.data.key = opened.file.key.clone();
            fresh.generation = crate::format::naming::split_generation(&fresh.data.key).1;
            fresh.data.etag = opened.file.etag.clone();
            fresh.data.size = opened.file.layout.object_size();
            fresh.key_object.key = opened.key_object_name.clone();
            fresh.chunk_log2 = opened.file.layout.chunk_log2();
            fresh.data.modified = Some(std::time::SystemTime::now());
            let size = opened.file.layout.plaintext_size();
            let mut t = self.tree.write().unwrap_or_else(|p| p.into_inner());
            if !t.is_retired(ino) {
                let new = t.replace(ino, fresh, size);
                t.same_version(new, &opened.file.key_object.mac);
                // Before the guard goes: the new number is in the successor's state.
                self.persist(&t);
            }
            tracing::info!(file = %entry.data.key, "object replaced since listed; the new version gets a new inode");
            return Err(FsError::Stale);
        }
        // Every open, not only a version's first: the model's current manifest must still
        // list this version (a new manifest is adopted for new opens as a whole).
        if let Err(e) = self
            .admit(&entry.data.key, &opened.file.key_object, false)
            .await
        {
            self.close_slot(&slot);
            tracing::warn!(file = %entry.data.key, uid = who.0, pid = who.1, error = %e, "open refused");
            return Err(e);
        }
        // Revoked between its unwrap and here: refused like any later open of it.
        if opened.is_revoked() {
            self.close_slot(&slot);
            return Err(opened.revoked_error());
        }
        if slot.ahead.swap(false, Ordering::SeqCst) {
            let h = &opened.file.key_object.header;
            tracing::info!(
                target: "sealfs::audit",
                file = %self.store.describe(&opened.file.key),
                file_id = %hex::encode(h.file_id),
                keys = ?opened.file.key_object.key_ids(),
                uid = who.0,
                pid = who.1,
                host = crate::telemetry::hostname(),
                "dek adopted (unwrapped ahead)"
            );
        }
        if self.config.unwrap_ahead > 0 && !self.config.dek_grace.is_zero() {
            let ctx = &opened.file.key_object.header.context;
            if let Some(root) = ctx.get(crate::format::header::CTX_MODEL) {
                if lock(&self.unwrapped_ahead).insert(root.clone()) {
                    let (fs, root) = (self.clone(), root.clone());
                    tokio::spawn(async move { fs.unwrap_ahead(&root, who).await });
                }
            }
        }
        *lock(&slot.idle_since) = None;
        let fh = match adopt {
            Some(fh) => {
                tracing::info!(
                    target: "sealfs::audit",
                    file = %self.store.describe(&opened.file.key),
                    file_id = %hex::encode(opened.file.key_object.header.file_id),
                    fh,
                    uid = who.0,
                    pid = who.1,
                    host = crate::telemetry::hostname(),
                    "handle taken over from the predecessor"
                );
                fh
            }
            None => self.next_fh.fetch_add(1, Ordering::Relaxed),
        };
        let h = Handle {
            opened,
            ino,
            slot,
            prefetch: Mutex::new(read::Prefetch::default()),
        };
        let h = Arc::new(h);
        {
            let mut handles = lock(&self.handles);
            if adopt.is_some() && handles.contains_key(&fh) {
                // Another request on the same handle took it over first.
                drop(handles);
                self.close_slot(&h.slot);
                return Ok(fh);
            }
            handles.insert(fh, h.clone());
        }
        if let Some(why) = self.missed_revoke(epoch, &h.opened) {
            Box::pin(self.revoke_one(&h.opened, &why)).await;
            self.release(fh);
            return Err(h.opened.revoked_error());
        }
        Ok(fh)
    }

    /// Opens the version the tree lists, confirmed by a GET pinned to its ETag instead of a
    /// LIST. That GET is the first chunk (the first read finds it in flight or cached):
    /// alone when this version's DEK is held (or being unwrapped), else sent together with
    /// the key-object GET so that it is on its way while KMS unwraps the DEK; only when the
    /// first chunk is cached already is it the 32-byte prelude. `Stale` unless the listed
    /// version is confirmed.
    async fn open_listed(
        self: &Arc<Self>,
        entry: &SealedEntry,
        who: (u32, u32),
    ) -> Result<(Arc<Opened>, Arc<FileSlot>), Listed> {
        let Some(layout) = Layout::from_object_size(entry.chunk_log2, entry.data.size) else {
            return Err(Listed::Stale);
        };
        // Changed, gone, or the GET itself failed: the LIST path decides, and reports.
        let stale = |e| Listed::stale(&entry.data.key, e);
        let key = &entry.data.key;
        let listed = (!entry.data.etag.is_empty()).then_some(entry.data.etag.as_str());
        // Some S3-compatible servers list without ETags: then the version to confirm is
        // the one this mount holds a DEK for, and a first open pins to its GET's ETag.
        let held = lock(&self.files)
            .get(key)
            .map(|s| s.etag.clone())
            .filter(|h| !h.is_empty() && listed.is_none_or(|l| l == h));
        let mut target = None;
        if let Some(held) = held {
            let mut version = entry.clone();
            version.data.etag = held;
            // Chunk 0 not cached: GET it, pinned to the held version, instead of the 32-byte
            // prelude: it confirms the version as well, the first read needs it, and a small
            // answer on a reused connection can wait out a delayed ACK (40 ms) behind a
            // server's Nagle, which a 1-chunk answer does not.
            // (In flight counts as cached: that GET's chunk serves the first read.)
            let cached = lock(&self.files)
                .get(key)
                .and_then(|s| s.cell.get().cloned())
                .is_some_and(|o| {
                    let k = chunk_key(&o, 0);
                    self.cache.contains(k) || self.inflight.has(k)
                });
            if cached {
                return match self
                    .store
                    .get_range(key, 0, PRELUDE_LEN, Some(&version.data.etag))
                    .await
                {
                    Ok(_) => self
                        .attach(&version, None, who)
                        .await
                        .map_err(Listed::Failed),
                    // Replaced (or gone): the LIST path finds its new size and key object.
                    Err(e) => Err(stale(e)),
                };
            }
            target = Some(version);
        }
        // The DEK held: no key-object GET.
        let fetch_key_object = target.is_none();
        let version = target.as_ref().unwrap_or(entry);
        self.open_first(version, layout, None, fetch_key_object, who)
            .await
    }

    /// A version's first open: the key-object GET (unless `key_object` was fetched already,
    /// or `fetch_key_object` is false: its DEK is held) and the chunk-0 GET at once, the latter pinned to the listed ETag, or (a listing
    /// without ETags) pinning the version to the ETag it returns.
    async fn open_first(
        self: &Arc<Self>,
        entry: &SealedEntry,
        layout: Layout,
        key_object: Option<bytes::Bytes>,
        fetch_key_object: bool,
        who: (u32, u32),
    ) -> Result<(Arc<Opened>, Arc<FileSlot>), Listed> {
        let stale = |e| Listed::stale(&entry.data.key, e);
        let listed = (!entry.data.etag.is_empty()).then_some(entry.data.etag.as_str());
        let started = Instant::now();
        let (_, end) = layout.cipher_range(0, 0);
        let key_object = async {
            match key_object {
                Some(bytes) => Ok(Some(bytes)),
                None if !fetch_key_object => Ok(None),
                None => Ok(Some(
                    self.store
                        .get(&entry.key_object.key, MAX_KEY_OBJECT_LEN)
                        .await?
                        .0,
                )),
            }
        };
        let (key_object, first) = tokio::join!(
            key_object,
            self.store.get_range_stream(&entry.data.key, 0, end, listed),
        );
        let first = first.map_err(stale)?;
        let key_object = key_object.map_err(stale)?;
        let mut version = entry.clone();
        if listed.is_none() {
            version.data.etag = first.etag().to_string();
        }
        let (opened, slot) = self
            .attach(&version, key_object, who)
            .await
            .map_err(Listed::Failed)?;
        self.adopt_first_chunk(&opened, first, started);
        Ok((opened, slot))
    }

    /// The slow way, when the listed version was not confirmed: one LIST of the object (a
    /// replacement gets its new ETag and size) with the key-object GET at the same time.
    async fn open_relisted(
        self: &Arc<Self>,
        entry: &SealedEntry,
        who: (u32, u32),
    ) -> Result<(Arc<Opened>, Arc<FileSlot>), FsError> {
        let (listing, key_object) = tokio::join!(
            // One object's names: a small bound, so that opens answered "changed" cannot
            // each cost a listing of --max-objects.
            object::find_bounded(&self.store, &entry.logical, &RELIST_LIMITS),
            self.store.get(&entry.key_object.key, MAX_KEY_OBJECT_LEN)
        );
        let listing = listing.map_err(FsError::from)?;
        // The path's served generation: the listed one, or a newer one if that is gone.
        let fresh = listing
            .sealed
            .into_iter()
            .find(|e| e.logical == entry.logical)
            .ok_or(FsError::NotFound)?;
        if fresh.plaintext_size().is_none() || fresh.chunk_log2 > self.config.max_chunk_log2 {
            return Err(FsError::Io(format!(
                "{}: replaced by an object this mount does not serve (size or chunk size)",
                fresh.data.key
            )));
        }
        // Still the key object the listing pairs with this data object?
        let key_object = key_object
            .ok()
            .filter(|_| fresh.key_object.key == entry.key_object.key)
            .map(|(bytes, _)| bytes);
        if fresh.data.etag.is_empty() {
            // A listing without ETags: pin to what this version's first GET returns.
            if let Some(layout) = Layout::from_object_size(fresh.chunk_log2, fresh.data.size) {
                match self
                    .open_first(&fresh, layout, key_object.clone(), true, who)
                    .await
                {
                    Ok(o) => return Ok(o),
                    Err(Listed::Failed(e)) => return Err(e),
                    Err(Listed::Stale) => {} // that GET failed: open as listed
                }
            }
        }
        self.attach(&fresh, key_object, who).await
    }

    /// Joins (or creates) the DEK-cache slot of `entry`'s version and counts one more
    /// handle on it; the first opener unwraps the DEK (single flight), from `key_object`
    /// bytes when already fetched.
    pub(super) async fn attach(
        &self,
        entry: &SealedEntry,
        key_object: Option<bytes::Bytes>,
        who: (u32, u32),
    ) -> Result<(Arc<Opened>, Arc<FileSlot>), FsError> {
        let slot = {
            let mut files = lock(&self.files);
            let s = files
                .entry(entry.data.key.clone())
                .or_insert_with(|| Arc::new(FileSlot::new(&entry.data.etag)));
            if s.etag != entry.data.etag {
                *s = Arc::new(FileSlot::new(&entry.data.etag));
            }
            s.handles.fetch_add(1, Ordering::SeqCst);
            s.clone()
        };
        let opened = slot
            .cell
            .get_or_try_init(|| async {
                let opened = async {
                    let ko = match key_object {
                        Some(bytes) => object::parse_key_object(&bytes, entry),
                        None => object::read_key_object(&self.store, entry).await,
                    }?;
                    // The model's verdict before any KMS call: a refused file costs none.
                    let digests = self.admit(&entry.data.key, &ko, true).await?;
                    let file = OpenFile::open_parsed(ko, entry, &self.keyring).await?;
                    Ok::<_, FsError>((file, digests))
                };
                let (file, digests) = opened.await.map_err(|err| {
                    tracing::warn!(file = %entry.data.key, uid = who.0, pid = who.1, error = %err, "open refused");
                    err
                })?;
                self.stats.dek_unwraps.fetch_add(1, Ordering::Relaxed);
                let h = &file.key_object.header;
                tracing::info!(
                    target: "sealfs::audit",
                    file = %self.store.describe(&file.key),
                    file_id = %hex::encode(h.file_id),
                    keys = ?file.key_object.key_ids(),
                    context = ?h.context,
                    uid = who.0,
                    pid = who.1,
                    host = crate::telemetry::hostname(),
                    "dek unwrapped"
                );
                let seq = self.next_seq.fetch_add(1, Ordering::Relaxed);
                // Checked only under a proof of origin; cache addresses either way (an entry
                // must hash to its address, then authenticate under this file's DEK).
                let addresses = self.disk.as_ref().and(digests.clone());
                let digests = digests.filter(|_| self.origin_proven());
                Ok::<_, FsError>(Arc::new(Opened {
                    seq,
                    file,
                    digests,
                    addresses,
                    key_object_name: entry.key_object.key.clone(),
                    cache: self.cache.clone(),
                    revoked: Default::default(),
                    validated: Mutex::new(Instant::now()),
                }))
            })
            .await;
        match opened {
            Ok(o) => Ok((o.clone(), slot)),
            Err(e) => {
                self.close_slot(&slot);
                Err(e)
            }
        }
    }

    /// Whether the mount has a proof of origin other than the KEK: trusted signers or a
    /// pinned manifest digest. Under one, a loose file is refused and every chunk is
    /// checked against the manifest (the publisher's exact bytes).
    pub(super) fn origin_proven(&self) -> bool {
        !self.trusted.is_empty() || self.config.model_digest.is_some()
    }

    /// Whether the file `key` with key object `ko` may be served: a file of a model must be
    /// the version its model's manifest lists (and, with trusted signers, the model must be
    /// signed by one of them; with a pin, the manifest must be the pinned one); a loose file
    /// (sealed before models) is served only without a proof of origin. With `digests`,
    /// returns the manifest's chunk digests (checked against each chunk only under a proof
    /// of origin: otherwise whoever can unwrap could forge the manifest too; the addresses
    /// of `--cache-dir` entries either way, whose bytes are checked against them).
    pub(super) async fn admit(
        &self,
        key: &str,
        ko: &crate::format::KeyObject,
        digests: bool,
    ) -> Result<Option<Arc<Vec<[u8; 32]>>>, FsError> {
        // A refusal is EACCES; a manifest the store could not deliver intact is EIO, as
        // any read the store fails.
        let denied = |e: ModelError| match &e {
            ModelError::Unreadable {
                class:
                    manifest::Unreadable::Unavailable
                    | manifest::Unreadable::Tampered
                    | manifest::Unreadable::Store,
                ..
            } => FsError::Io(crate::error_chain(&e)),
            _ => FsError::Denied(crate::error_chain(&e)),
        };
        let root = match manifest::model_of(key, &ko.header.context).map_err(denied)? {
            Some(root) => root,
            None if !self.origin_proven() => return Ok(None),
            None => return Err(denied(ModelError::Loose { file: key.into() })),
        };
        let header = crate::crypto::header_digest(&ko.authenticated);
        let check = |model: &Model| {
            model
                .check_file(
                    key,
                    &ko.header.file_id,
                    &header,
                    ko.header.chunk_log2,
                    ko.header.layout().object_size(),
                )
                .map(|e| digests.then(|| Arc::new(e.chunk_digests())))
        };
        // The listing may be older than the file (a reseal writes its files first and its
        // manifest last, and a re-list may fall in between): before refusing, ask the store
        // for the current manifest once, and load it whatever ETag it has.
        match self.model(&root, false).await {
            Ok(m) => {
                if let Ok(d) = check(&m) {
                    return Ok(d);
                }
            }
            // A key or a signer said no: asking again would change nothing but cost a call.
            Err(e) if e.is_untrusted() => return Err(denied(e)),
            Err(_) => {}
        }
        let current = self.model(&root, true).await.map_err(denied)?;
        check(&current).map_err(denied)
    }

    /// The model at `root`, loaded (and signature-checked) once per manifest version; never
    /// one older than a version already served.
    pub(super) async fn model(&self, root: &str, fresh: bool) -> Result<Arc<Model>, ModelError> {
        let listed = if fresh {
            None
        } else {
            self.tree().manifest(root).cloned()
        };
        // A mount of part of a model lists no manifest: look it up by name.
        let listed = match listed {
            Some(e) => Some(e),
            None => manifest::find_manifest(&self.store, root)
                .await
                .map_err(|e| ModelError::from_load(root, e))?,
        };
        // The manifest object (its generation) and its ETag name the version loaded.
        let etag = listed
            .as_ref()
            .map(|e| format!("{}\0{}", e.data.key, e.data.etag))
            .unwrap_or_default();
        let slot = {
            let mut models = lock(&self.models);
            let s = models
                .entry(root.to_string())
                .or_insert_with(|| Arc::new(ModelSlot::new(&etag, fresh)));
            // Fresh: an ETag proves nothing (a store may keep it across versions). At most
            // once per FRESH_RELOAD, so refused opens cannot each cost a GET and a Decrypt.
            let stale =
                fresh && s.cell.initialized() && (!s.fresh || s.created.elapsed() >= FRESH_RELOAD);
            if s.etag != etag || stale {
                *s = Arc::new(ModelSlot::new(&etag, fresh));
            }
            s.clone()
        };
        let model = slot
            .cell
            .get_or_try_init(|| async {
                let m = manifest::load(
                    &self.store,
                    listed.as_ref(),
                    root,
                    &self.keyring,
                    &self.trusted,
                )
                .await
                .map_err(|e| ModelError::from_load(root, e))?;
                tracing::info!(
                    target: "sealfs::audit",
                    model = %self.store.describe(root),
                    version = m.manifest.version,
                    digest = %m.digest,
                    signer = m.signer.as_deref().unwrap_or("none"),
                    "model manifest loaded"
                );
                Ok::<_, ModelError>(Arc::new(m))
            })
            .await?
            .clone();
        manifest::check_pin(self.config.model_digest.as_deref(), &model)?;
        let mut served = lock(&self.served);
        let high = served.entry(root.to_string()).or_insert((0, 0));
        let this = (model.manifest.version, model.generation);
        if this < *high {
            return Err(ModelError::Rollback {
                model: root.to_string(),
                found: this.0,
                found_generation: this.1,
                served: high.0,
                served_generation: high.1,
            });
        }
        *high = this;
        Ok(model)
    }

    /// Unwraps the DEKs of up to `--unwrap-ahead` files of the model at `root` that this
    /// mount lists and holds no DEK for, 4 at a time, as their opens would (the same checks,
    /// the same audit line, on behalf of `who`, whose open started it). Each is then held
    /// like a closed file's, for `--dek-grace`: a model loader's next files open with no
    /// provider call. Cost: up to `--unwrap-ahead` provider calls per model per mount.
    pub(super) async fn unwrap_ahead(self: &Arc<Self>, root: &str, who: (u32, u32)) {
        use futures::StreamExt;
        let Ok(model) = self.model(root, false).await else {
            return;
        };
        let entries: Vec<SealedEntry> = {
            let t = self.tree();
            let held = lock(&self.files);
            model
                .manifest
                .files
                .iter()
                .filter_map(|f| {
                    let key = manifest::under(root, &f.path);
                    t.file_entry(crate::format::naming::relative_to(&key, &self.prefix)?)
                })
                // A slot of any version (a newer one an open just made) is left alone.
                .filter(|e| !held.contains_key(&e.data.key))
                .take(self.config.unwrap_ahead)
                .collect()
        };
        let n = entries.len();
        // No new unwraps ahead once a revoke came in (attach revokes one it overtook).
        let epoch = self.revoke_epoch();
        futures::stream::iter(entries)
            .for_each_concurrent(4, |mut e| async move {
                if self.revoke_epoch() != epoch || lock(&self.files).contains_key(&e.data.key) {
                    return;
                }
                // A listing without ETags: pin the version as an open would, to the ETag a
                // GET returns (else the open, which pins, would not find this DEK).
                if e.data.etag.is_empty() {
                    match self
                        .store
                        .get_range_stream(&e.data.key, 0, PRELUDE_LEN, None)
                        .await
                    {
                        Ok(b) if !b.etag().is_empty() => e.data.etag = b.etag().to_string(),
                        _ => return,
                    }
                }
                match self.attach(&e, None, who).await {
                    Ok((opened, slot)) => {
                        slot.ahead.store(true, Ordering::SeqCst);
                        self.close_slot(&slot);
                        // A revoke that ran meanwhile saw no such DEK: drop it as it would.
                        if let Some(why) = self.missed_revoke(epoch, &opened) {
                            self.revoke_one(&opened, &why).await;
                        }
                    }
                    Err(err) => {
                        tracing::debug!(file = %e.data.key, error = %err, "not unwrapped ahead")
                    }
                }
            })
            .await;
        tracing::debug!(model = %self.store.describe(root), files = n, "DEKs unwrapped ahead");
    }
}
