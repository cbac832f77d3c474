//! The filesystem core, driven by `fuse::adapter` and by tests without a kernel mount.
//!
//! - Metadata (`lookup`, `getattr`, `readdir`) comes from the tree built by one LIST.
//! - `open` confirms the listed version with a GET pinned to its ETag (the first chunk,
//!   fetched while the DEK is unwrapped; re-lists the object only when that GET says it
//!   changed), then shares one unwrapped DEK per data object version among all handles
//!   (single flight), kept for `dek_grace` after the last close so open/close patterns
//!   cost one KMS call.
//! - `read` is in `read.rs`: chunk cache, coalesced pinned GETs, single flight, prefetch.

pub mod error;
pub mod inode;
pub mod metrics;
mod read;
pub mod revoke;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

pub use error::FsError;
pub use inode::{Node, Tree, ROOT};
pub use read::ReadData;

use crate::cache::{ChunkCache, ChunkKey};
use crate::format::header::MAX_KEY_OBJECT_LEN;
use crate::format::layout::PRELUDE_LEN;
use crate::format::Layout;
use crate::keys::Keyring;
use crate::manifest::{self, Model, ModelError};
use crate::object::{self, OpenFile, SealedEntry};
use crate::store::{ListLimits, Store, StoreError};

/// Mount settings (the `sealfs mount` flags map onto these; docs/CLI.md).
#[derive(Debug, Clone)]
pub struct MountConfig {
    /// Bytes of locked memory for decrypted chunks.
    pub cache_size: usize,
    /// How long an unwrapped DEK outlives the last handle of its file.
    pub dek_grace: Duration,
    /// Upper bound of the sequential read-ahead window, in bytes.
    pub max_prefetch: u64,
    /// Largest ranged GET (adjacent missing chunks are merged up to this).
    pub max_fetch: u64,
    pub uid: u32,
    pub gid: u32,
    pub file_mode: u16,
    pub dir_mode: u16,
    pub direct_io: bool,
    /// Re-list the prefix this often so new, replaced and removed files show (zero: never).
    pub list_ttl: Duration,
    /// Largest chunk size (log2) served; it is the cache slot size. Files sealed with
    /// larger chunks are hidden, so nothing a store lists can size the locked cache.
    pub max_chunk_log2: u8,
    /// Bounds on every LIST of the prefix.
    pub list_limits: ListLimits,
    /// `--model-digest`: serve only the model whose manifest has this SHA-256 (hex).
    pub model_digest: Option<String>,
    /// Ask the key provider again this often whether each held DEK may still be unwrapped;
    /// revoke the file when it refuses (zero: never).
    pub revalidate: Duration,
    /// Revoke a held DEK whose checks have all failed for this long (provider unreachable or
    /// throttling); zero: keep serving through any outage.
    pub revalidate_max_outage: Duration,
    /// At the first open of a file of a model, unwrap the DEKs of up to this many other
    /// files of the model in the background (held like closed files: `dek_grace`); 0: off.
    pub unwrap_ahead: usize,
}

impl Default for MountConfig {
    fn default() -> Self {
        let (uid, gid) = current_ids();
        Self {
            cache_size: 256 << 20,
            dek_grace: Duration::from_secs(30),
            max_prefetch: 64 << 20,
            max_fetch: 8 << 20,
            uid,
            gid,
            file_mode: 0o444,
            dir_mode: 0o555,
            direct_io: false,
            list_ttl: Duration::from_secs(60),
            max_chunk_log2: crate::format::DEFAULT_CHUNK_LOG2,
            list_limits: ListLimits::default(),
            model_digest: None,
            revalidate: Duration::from_secs(300),
            revalidate_max_outage: Duration::from_secs(3600),
            unwrap_ahead: 0,
        }
    }
}

/// The effective (uid, gid) of this process: the owner of `/proc/self`.
fn current_ids() -> (u32, u32) {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self")
        .map(|m| (m.uid(), m.gid()))
        .unwrap_or((0, 0))
}

/// Counters for metrics and tests.
#[derive(Debug, Default)]
pub struct Stats {
    pub dek_unwraps: AtomicU64,
    pub fetches: AtomicU64,
    pub fetched_bytes: AtomicU64,
    pub auth_failures: AtomicU64,
    pub bytes_served: AtomicU64,
    /// Held DEKs revoked (revalidation or `sealfs revoke`).
    pub revocations: AtomicU64,
    /// Ranged GET runs, from the request to the last chunk authenticated.
    pub fetch_latency: crate::calls::Histogram,
    /// Per FUSE operation ([`Op`]): calls, errors, latency.
    pub ops: [OpStats; Op::ALL.len()],
}

/// FUSE operations counted in [`Stats::ops`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Lookup,
    Getattr,
    Readdir,
    Open,
    Read,
    Release,
}

impl Op {
    pub const ALL: [Op; 6] = [
        Op::Lookup,
        Op::Getattr,
        Op::Readdir,
        Op::Open,
        Op::Read,
        Op::Release,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Op::Lookup => "lookup",
            Op::Getattr => "getattr",
            Op::Readdir => "readdir",
            Op::Open => "open",
            Op::Read => "read",
            Op::Release => "release",
        }
    }
}

#[derive(Debug, Default)]
pub struct OpStats {
    pub calls: AtomicU64,
    pub errors: AtomicU64,
    pub latency: crate::calls::Histogram,
}

impl Stats {
    /// Records one FUSE operation that took `since.elapsed()`.
    pub fn record(&self, op: Op, since: Instant, ok: bool) {
        let s = &self.ops[op as usize];
        s.calls.fetch_add(1, Ordering::Relaxed);
        s.latency.observe(since.elapsed());
        if !ok {
            s.errors.fetch_add(1, Ordering::Relaxed);
        }
    }
}

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

/// One data object version with its DEK: shared by every handle on it.
pub(crate) struct Opened {
    pub seq: u64,
    pub file: OpenFile,
    /// Under `--trust-signer`: the signed manifest's SHA-256 of every sealed chunk, checked
    /// before a chunk is decrypted (a DEK holder can forge a chunk, not its digest).
    pub digests: Option<Arc<Vec<[u8; 32]>>>,
    /// The key object this version was opened with.
    pub key_object_name: String,
    cache: Arc<ChunkCache>,
    /// Set once by a revocation (`revoke.rs`), before its DEK is wiped: reads check it.
    revoked: std::sync::atomic::AtomicBool,
    /// When the provider last agreed to unwrap this DEK (the open, or a revalidation).
    validated: Mutex<Instant>,
}

impl Opened {
    pub fn is_revoked(&self) -> bool {
        self.revoked.load(Ordering::SeqCst)
    }

    fn revoked_error(&self) -> FsError {
        FsError::from(crate::Error::Revoked {
            file: self.file.key.clone(),
        })
    }
}

impl Drop for Opened {
    /// The last handle and the DEK-cache entry are gone (grace expired, or the object was
    /// replaced): its decrypted chunks go too, wiped, instead of waiting for LRU eviction.
    /// The DEK itself is zeroized when `file` drops.
    fn drop(&mut self) {
        self.cache.remove_file(self.seq);
    }
}

/// The DEK cache entry of one data object (by key), for one ETag.
struct FileSlot {
    etag: String,
    cell: tokio::sync::OnceCell<Arc<Opened>>,
    handles: AtomicUsize,
    idle_since: Mutex<Option<Instant>>,
    /// Unwrapped ahead (`--unwrap-ahead`) and not yet used by an open: the first open that
    /// uses it writes an audit line of its own (the unwrap's names whoever started it).
    ahead: std::sync::atomic::AtomicBool,
}

pub(crate) struct Handle {
    pub opened: Arc<Opened>,
    /// The inode it was opened on (a revocation drops its pages even once the tree no
    /// longer holds a retired inode).
    pub ino: u64,
    slot: Arc<FileSlot>,
    pub prefetch: Mutex<read::Prefetch>,
}

pub struct SealFs {
    pub(crate) store: Arc<Store>,
    keyring: Arc<Keyring>,
    tree: RwLock<Tree>,
    pub(crate) cache: Arc<ChunkCache>,
    files: Mutex<HashMap<String, Arc<FileSlot>>>,
    handles: Mutex<HashMap<u64, Arc<Handle>>>,
    next_fh: AtomicU64,
    next_seq: AtomicU64,
    pub(crate) inflight: read::Inflight,
    pub config: MountConfig,
    pub stats: Stats,
    started: std::time::SystemTime,
    prefix: String,
    listed_at: Mutex<Instant>,
    /// `--trust-signer`: with any, only models signed by one of them are served.
    trusted: crate::sign::TrustedSigners,
    /// Loaded model manifests by root, for the listed manifest ETag.
    models: Mutex<HashMap<String, Arc<ModelSlot>>>,
    /// Models whose files' DEKs were unwrapped ahead (`--unwrap-ahead`): once per mount.
    unwrapped_ahead: Mutex<std::collections::HashSet<String>>,
    /// `sealfs revoke` calls so far (an unwrap ahead that a revoke overtook drops its DEK).
    pub(crate) revoke_requests: AtomicU64,
    /// Handles that read within the last seconds (counted by `sweep`, raised at once by a
    /// reader that starts): they share the read-ahead budget.
    pub(crate) active_readers: AtomicUsize,
    /// Highest manifest (version, generation) served per model root: never go back
    /// (rollback), neither to an older version nor to the generation a reseal replaced.
    served: Mutex<HashMap<String, (u64, u32)>>,
    /// Tells the kernel to drop its pages of an inode (set by the FUSE session).
    invalidate: std::sync::OnceLock<Arc<dyn Fn(u64) + Send + Sync>>,
}

/// A model's manifest, loaded once per manifest version (single flight).
struct ModelSlot {
    etag: String,
    cell: tokio::sync::OnceCell<Arc<Model>>,
    created: Instant,
    /// Made by a fresh reload (a refused check): the next one waits FRESH_RELOAD.
    fresh: bool,
}

/// Models whose manifests a mount loads ahead of their first open, at most.
pub const PRELOAD_MODELS: usize = 64;

/// A refused open reloads its model's manifest at most this often (per model).
const FRESH_RELOAD: Duration = Duration::from_secs(1);

/// What `getattr` and `lookup` return.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Attr {
    pub ino: u64,
    pub size: u64,
    pub is_dir: bool,
    pub mode: u16,
    pub uid: u32,
    pub gid: u32,
    pub mtime: std::time::SystemTime,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // No critical section leaves these maps half-updated, so a poisoned lock is still usable.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl SealFs {
    /// Lists `prefix` once and prepares the locked cache. Fails if mlock is refused.
    pub async fn new(
        store: Store,
        prefix: &str,
        keyring: Keyring,
        config: MountConfig,
    ) -> crate::Result<Arc<Self>> {
        Self::with_signers(store, prefix, keyring, Default::default(), config).await
    }

    /// [`SealFs::new`] serving only models signed by one of `trusted` (when any).
    pub async fn with_signers(
        store: Store,
        prefix: &str,
        keyring: Keyring,
        trusted: crate::sign::TrustedSigners,
        config: MountConfig,
    ) -> crate::Result<Arc<Self>> {
        let listing = object::find_bounded(&store, prefix, &config.list_limits).await?;
        let tree = Tree::build(listing, prefix, config.max_chunk_log2);
        // From the configuration, never from a listing: a store must not size locked memory.
        let slot = (1usize << config.max_chunk_log2) + crate::format::TAG_LEN as usize;
        let cache = ChunkCache::new(config.cache_size, slot)?;
        Ok(Arc::new(Self {
            store: Arc::new(store),
            keyring: Arc::new(keyring),
            tree: RwLock::new(tree),
            cache,
            files: Mutex::new(HashMap::new()),
            handles: Mutex::new(HashMap::new()),
            next_fh: AtomicU64::new(1),
            next_seq: AtomicU64::new(1),
            inflight: Default::default(),
            config,
            stats: Stats::default(),
            started: std::time::SystemTime::now(),
            prefix: prefix.to_string(),
            listed_at: Mutex::new(Instant::now()),
            trusted,
            models: Mutex::new(HashMap::new()),
            served: Mutex::new(HashMap::new()),
            unwrapped_ahead: Mutex::new(Default::default()),
            revoke_requests: Default::default(),
            active_readers: AtomicUsize::new(0),
            invalidate: std::sync::OnceLock::new(),
        }))
    }

    fn tree(&self) -> std::sync::RwLockReadGuard<'_, Tree> {
        self.tree.read().unwrap_or_else(|p| p.into_inner())
    }

    fn attr_of(&self, ino: u64, node: &Node) -> Attr {
        let (size, is_dir, mode, mtime) = match node {
            Node::Dir { .. } => (0, true, self.config.dir_mode, self.started),
            Node::File { size, entry, .. } => (
                *size,
                false,
                self.config.file_mode,
                entry.data.modified.unwrap_or(self.started),
            ),
        };
        Attr {
            ino,
            size,
            is_dir,
            mode,
            uid: self.config.uid,
            gid: self.config.gid,
            mtime,
        }
    }

    pub fn getattr(&self, ino: u64) -> Result<Attr, FsError> {
        let t = self.tree();
        let node = t.get(ino).ok_or(FsError::NotFound)?;
        Ok(self.attr_of(ino, node))
    }

    pub fn lookup(&self, parent: u64, name: &str) -> Result<Attr, FsError> {
        let t = self.tree();
        match t.get(parent) {
            Some(Node::Dir { .. }) => {}
            Some(_) => return Err(FsError::NotDir),
            None => return Err(FsError::NotFound),
        }
        let ino = t.lookup(parent, name).ok_or(FsError::NotFound)?;
        let node = t.get(ino).ok_or(FsError::NotFound)?;
        Ok(self.attr_of(ino, node))
    }

    /// Entries of a directory, `.` and `..` first, as (ino, is_dir, name).
    pub fn readdir(&self, ino: u64) -> Result<Vec<(u64, bool, String)>, FsError> {
        let t = self.tree();
        let Some(Node::Dir {
            children, parent, ..
        }) = t.get(ino)
        else {
            return Err(if t.get(ino).is_some() {
                FsError::NotDir
            } else {
                FsError::NotFound
            });
        };
        let mut out = vec![
            (ino, true, ".".to_string()),
            (*parent, true, "..".to_string()),
        ];
        for (name, &child) in children {
            out.push((
                child,
                matches!(t.get(child), Some(Node::Dir { .. })),
                name.clone(),
            ));
        }
        Ok(out)
    }

    pub fn file_count(&self) -> usize {
        self.tree().len()
    }

    /// Opens a file for reading; `who` names the requester (uid, pid) for the audit line.
    ///
    /// An inode is one version: an open that finds another version than the inode's (the
    /// object was replaced) moves the path to a new inode and fails with ESTALE, on which
    /// the kernel looks the name up again and opens the new inode. So the kernel's cached
    /// pages of the old version can never be served to a reader of the new one.
    pub async fn open(self: &Arc<Self>, ino: u64, who: (u32, u32)) -> Result<u64, FsError> {
        let entry = {
            let t = self.tree();
            if t.is_retired(ino) {
                return Err(FsError::Stale);
            }
            match t.get(ino) {
                Some(Node::File { entry, .. }) => entry.clone(),
                Some(Node::Dir { .. }) => return Err(FsError::IsDir),
                None => return Err(FsError::NotFound),
            }
        };
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
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        let h = Handle {
            opened,
            ino,
            slot,
            prefetch: Mutex::new(read::Prefetch::default()),
        };
        lock(&self.handles).insert(fh, Arc::new(h));
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
    async fn attach(
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
                Ok::<_, FsError>(Arc::new(Opened {
                    seq,
                    file,
                    digests,
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

    fn close_slot(&self, slot: &FileSlot) {
        if slot.handles.fetch_sub(1, Ordering::SeqCst) == 1 {
            *lock(&slot.idle_since) = Some(Instant::now());
        }
    }

    pub fn release(&self, fh: u64) {
        if let Some(h) = lock(&self.handles).remove(&fh) {
            self.close_slot(&h.slot);
        }
    }

    pub(crate) fn handle(&self, fh: u64) -> Result<Arc<Handle>, FsError> {
        lock(&self.handles)
            .get(&fh)
            .cloned()
            .ok_or(FsError::BadHandle)
    }

    /// Drops DEKs (and their cached chunks) idle for longer than the grace. Called every
    /// second by the mount; [`SealFs::deks_held`] says how many remain.
    pub fn sweep(&self) {
        let now = Instant::now();
        let readers = lock(&self.handles)
            .values()
            .filter(|h| lock(&h.prefetch).active(now))
            .count();
        self.active_readers.store(readers, Ordering::Relaxed);
        let mut files = lock(&self.files);
        files.retain(|key, s| {
            let idle = *lock(&s.idle_since);
            let expired = s.handles.load(Ordering::SeqCst) == 0
                && idle.is_none_or(|t| now.duration_since(t) >= self.config.dek_grace);
            if expired {
                // Dropping the slot drops its `Opened` (chunks wiped, DEK zeroized) once no
                // handle holds it.
                tracing::debug!(file = %key, "DEK released");
            }
            !expired
        });
    }

    /// Re-lists the prefix when `list_ttl` has passed since the last listing. Inode numbers
    /// of existing paths stay; errors are logged and retried at the next tick.
    pub async fn refresh_if_due(&self) {
        let ttl = self.config.list_ttl;
        if ttl.is_zero() || lock(&self.listed_at).elapsed() < ttl {
            return;
        }
        *lock(&self.listed_at) = Instant::now();
        match object::find_bounded(&self.store, &self.prefix, &self.config.list_limits).await {
            Ok(listing) => {
                let c = self
                    .tree
                    .write()
                    .unwrap_or_else(|p| p.into_inner())
                    .refresh(listing, &self.prefix);
                if c != Default::default() {
                    tracing::info!(
                        added = c.added,
                        changed = c.changed,
                        removed = c.removed,
                        "listing refreshed"
                    );
                }
            }
            Err(e) => tracing::warn!(error = %e, "re-listing failed; keeping the previous tree"),
        }
    }

    /// Whether the file `key` with key object `ko` may be served: a file of a model must be
    /// the version its model's manifest lists (and, with trusted signers, the model must be
    /// signed by one of them); a loose file (sealed before models) is served only when no
    /// signer is trusted. With `digests`, returns the manifest's chunk digests to check
    /// (only under trusted signers: otherwise whoever can unwrap could forge them too).
    async fn admit(
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
            None if self.trusted.is_empty() => return Ok(None),
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
                .map(|e| (digests && !self.trusted.is_empty()).then(|| Arc::new(e.chunk_digests())))
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
    async fn model(&self, root: &str, fresh: bool) -> Result<Arc<Model>, ModelError> {
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
        if let Some(pin) = &self.config.model_digest {
            if *pin != model.digest {
                return Err(ModelError::NotPinned {
                    model: root.to_string(),
                    found: model.digest.clone(),
                    pinned: pin.clone(),
                });
            }
        }
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

    /// Loads the manifests of the listed models (at most [`PRELOAD_MODELS`], 8 at a time)
    /// ahead of their first open, which then pays only its own file's unwrap: one KMS call
    /// per model at mount, instead of a manifest GET, a KMS call and a second GET in the
    /// first open's way. A failure is only logged: the open tries again, and reports.
    pub async fn preload_models(&self) {
        let roots = self.tree().model_roots();
        // Pinned (`--model-digest`), every other model would be decrypted only to be
        // refused: load ahead only when there is just the one.
        if self.config.model_digest.is_some() && roots.len() > 1 {
            return;
        }
        if roots.len() > PRELOAD_MODELS {
            tracing::info!(
                models = roots.len(),
                "more models than are loaded ahead; the rest load at their first open"
            );
        }
        use futures::StreamExt;
        futures::stream::iter(roots.into_iter().take(PRELOAD_MODELS))
            .for_each_concurrent(8, |root: String| async move {
                if let Err(e) = self.model(&root, false).await {
                    tracing::debug!(model = %self.store.describe(&root), error = %e, "model not loaded ahead");
                }
            })
            .await;
    }

    /// Unwraps the DEKs of up to `--unwrap-ahead` files of the model at `root` that this
    /// mount lists and holds no DEK for, 4 at a time, as their opens would (the same checks,
    /// the same audit line, on behalf of `who`, whose open started it). Each is then held
    /// like a closed file's, for `--dek-grace`: a model loader's next files open with no
    /// provider call. Cost: up to `--unwrap-ahead` provider calls per model per mount.
    async fn unwrap_ahead(self: &Arc<Self>, root: &str, who: (u32, u32)) {
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
        let epoch = self.revoke_requests.load(Ordering::SeqCst);
        futures::stream::iter(entries)
            .for_each_concurrent(4, |mut e| async move {
                if self.revoke_requests.load(Ordering::SeqCst) != epoch
                    || lock(&self.files).contains_key(&e.data.key)
                {
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
                        if self.revoke_requests.load(Ordering::SeqCst) != epoch {
                            self.revoke_one(&opened, "revoked while unwrapped ahead")
                                .await;
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

    /// The kernel forgot inode `ino`: a retired one is freed.
    pub fn forget(&self, ino: u64) {
        self.tree
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .forget(ino);
    }

    pub fn deks_held(&self) -> usize {
        lock(&self.files)
            .values()
            .filter(|s| s.cell.initialized())
            .count()
    }
}

impl ModelSlot {
    fn new(etag: &str, fresh: bool) -> Self {
        Self {
            etag: etag.to_string(),
            cell: tokio::sync::OnceCell::new(),
            created: Instant::now(),
            fresh,
        }
    }
}

impl FileSlot {
    fn new(etag: &str) -> Self {
        Self {
            etag: etag.to_string(),
            cell: tokio::sync::OnceCell::new(),
            handles: AtomicUsize::new(0),
            idle_since: Mutex::new(None),
            ahead: Default::default(),
        }
    }
}

pub(crate) fn chunk_key(o: &Opened, index: u64) -> ChunkKey {
    (o.seq, index)
}
