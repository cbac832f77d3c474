//! The filesystem core, driven by `fuse::adapter` and by tests without a kernel mount.
//!
//! - Metadata (`lookup`, `getattr`, `readdir`) comes from the tree built by one LIST.
//! - `open` confirms the listed version with a GET pinned to its ETag (the first chunk,
//!   fetched while the DEK is unwrapped; re-lists the object only when that GET says it
//!   changed), then shares one unwrapped DEK per data object version among all handles
//!   (single flight), kept for `dek_grace` after the last close so open/close patterns
//!   cost one KMS call.
//! - `open` is in `open.rs`: the version check, the DEK unwrap, the model's verdict.
//! - `read` is in `read.rs`: chunk cache, coalesced pinned GETs, single flight, prefetch.

pub mod error;
pub mod inode;
pub mod metrics;
mod open;
mod read;
pub mod revoke;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

pub use error::FsError;
pub use inode::{Node, Tree, TreeState, ROOT};
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
    /// `--cache-dir DIR` and `--cache-dir-size BYTES`: sealed chunks on local disk
    /// (cache/disk.rs).
    pub cache_dir: Option<(std::path::PathBuf, u64)>,
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
            cache_dir: None,
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

/// One data object version with its DEK: shared by every handle on it.
pub(crate) struct Opened {
    pub seq: u64,
    pub file: OpenFile,
    /// Under `--trust-signer`: the signed manifest's SHA-256 of every sealed chunk, checked
    /// before a chunk is decrypted (a DEK holder can forge a chunk, not its digest).
    pub digests: Option<Arc<Vec<[u8; 32]>>>,
    /// With `--cache-dir`, for a file of a model: the manifest's BLAKE3 of every sealed
    /// chunk, its address in the cache directory.
    pub addresses: Option<Arc<Vec<[u8; 32]>>>,
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
    /// `--cache-dir`: sealed chunks on local disk.
    pub disk: Option<Arc<crate::cache::disk::DiskCache>>,
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
    /// `sealfs revoke` calls so far: an unwrap that one overtook drops its DEK.
    revokes: Mutex<revoke::RevokeLog>,
    /// Handles that read within the last seconds (counted by `sweep`, raised at once by a
    /// reader that starts): they share the read-ahead budget.
    pub(crate) active_readers: AtomicUsize,
    /// Highest manifest (version, generation) served per model root: never go back
    /// (rollback), neither to an older version nor to the generation a reseal replaced.
    served: Mutex<HashMap<String, (u64, u32)>>,
    /// Tells the kernel to drop its pages of an inode (set by the FUSE session).
    invalidate: std::sync::OnceLock<Arc<dyn Fn(u64) + Send + Sync>>,
    /// Hands the tree to a successor's store (fuse/handover.rs; set by the FUSE session).
    persister: std::sync::OnceLock<Arc<dyn Fn(TreeState) + Send + Sync>>,
    /// [`Tree::changes`] at the last write through `persister`.
    persisted: AtomicU64,
    /// Serving a connection taken over from a predecessor: a file handle the kernel holds
    /// from it is opened again at its first request.
    resumed: bool,
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
        Self::build(store, prefix, keyring, trusted, config, None).await
    }

    /// [`SealFs::with_signers`] taking over a predecessor's tree (its inode numbers stay
    /// what the kernel knows), then applying a fresh listing as any refresh does. File
    /// handles are numbered from `generation << 40`.
    pub async fn resumed(
        store: Store,
        prefix: &str,
        keyring: Keyring,
        trusted: crate::sign::TrustedSigners,
        config: MountConfig,
        tree: TreeState,
        generation: u32,
    ) -> crate::Result<Arc<Self>> {
        Self::build(
            store,
            prefix,
            keyring,
            trusted,
            config,
            Some((tree, generation)),
        )
        .await
    }

    async fn build(
        store: Store,
        prefix: &str,
        keyring: Keyring,
        trusted: crate::sign::TrustedSigners,
        config: MountConfig,
        resume: Option<(TreeState, u32)>,
    ) -> crate::Result<Arc<Self>> {
        let listing = object::find_bounded(&store, prefix, &config.list_limits).await?;
        let resumed = resume.is_some();
        let (tree, first_fh) = match resume {
            None => (Tree::build(listing, prefix, config.max_chunk_log2), 1),
            Some((state, generation)) => {
                let mut t = Tree::restore(state, config.max_chunk_log2).map_err(|e| {
                    crate::Error::Usage(format!("the predecessor's state is unusable: {e}"))
                })?;
                let c = t.refresh(listing, prefix);
                tracing::info!(
                    nodes = t.len(),
                    added = c.added,
                    changed = c.changed,
                    removed = c.removed,
                    generation,
                    "tree taken over from the predecessor"
                );
                (t, (u64::from(generation) << 40) | 1)
            }
        };
        // From the configuration, never from a listing: a store must not size locked memory.
        let slot = (1usize << config.max_chunk_log2) + crate::format::TAG_LEN as usize;
        let cache = ChunkCache::new(config.cache_size, slot)?;
        let disk = match &config.cache_dir {
            Some((dir, size)) => Some(Arc::new(
                crate::cache::disk::DiskCache::open(dir, *size)
                    .map_err(|e| crate::Error::Usage(e.to_string()))?,
            )),
            None => None,
        };
        Ok(Arc::new(Self {
            disk,
            store: Arc::new(store),
            keyring: Arc::new(keyring),
            tree: RwLock::new(tree),
            cache,
            files: Mutex::new(HashMap::new()),
            handles: Mutex::new(HashMap::new()),
            next_fh: AtomicU64::new(first_fh),
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
            revokes: Default::default(),
            active_readers: AtomicUsize::new(0),
            invalidate: std::sync::OnceLock::new(),
            persister: std::sync::OnceLock::new(),
            persisted: AtomicU64::new(u64::MAX),
            resumed,
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
                let mut t = self.tree.write().unwrap_or_else(|p| p.into_inner());
                let c = t.refresh(listing, &self.prefix);
                // Before the guard goes: no lookup sees a new number the state lacks.
                self.persist(&t);
                drop(t);
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

    /// `--check-start`: what the first reads would meet, before the mount serves: each
    /// listed model's manifest (key, signature, pin) and one file opened and released (its
    /// key, its admission). A refusal is the start's failure: the exit code and one line
    /// (4 a key refused, 3 a model not signed, not pinned or tampered, 5 the store or KMS
    /// failed), so that a CSI publish fails with the reason instead of serving EACCES.
    pub async fn check_start(self: &Arc<Self>) -> Result<(), (i32, String)> {
        use crate::manifest::{ModelError, Unreadable};
        let model_failure = |e: ModelError| {
            let code = match &e {
                ModelError::Unreadable { class, .. } => match class {
                    Unreadable::Denied => crate::exit::KEY_DENIED,
                    Unreadable::Tampered => crate::exit::INTEGRITY,
                    Unreadable::Unavailable | Unreadable::Store => crate::exit::STORE,
                },
                _ => crate::exit::INTEGRITY,
            };
            (code, crate::error_chain(&e))
        };
        // Pinned (`--model-digest`), the store may hold other models: the one of that digest
        // must load, the others are refused as the mount refuses them. Unpinned, every one.
        let pinned = self.config.model_digest.is_some();
        // The tree's guard ends here, not after the loop's awaits.
        let roots = self.tree().model_roots();
        let (mut sample, mut refused) = (None, None);
        for root in roots.iter().take(PRELOAD_MODELS) {
            match self.model(root, false).await {
                Ok(_) => {
                    sample.get_or_insert(root.as_str());
                }
                Err(e) if pinned => {
                    refused.get_or_insert(e);
                }
                Err(e) => return Err(model_failure(e)),
            }
        }
        if let (None, Some(e)) = (sample, refused) {
            return Err(model_failure(e));
        }
        let first = self.tree().first_file_in(sample);
        if let Some(ino) = first {
            let fh = self.open(ino, (0, 0)).await.map_err(|e| {
                let code = match &e {
                    FsError::Denied(_) => crate::exit::KEY_DENIED,
                    FsError::Io(_) => crate::exit::STORE,
                    _ => crate::exit::FAILURE,
                };
                (code, e.to_string())
            })?;
            self.release(fh);
        }
        Ok(())
    }

    /// Sets where the tree goes for a successor (the FUSE session's descriptor store), and
    /// writes it there now.
    pub fn set_persister(&self, f: Arc<dyn Fn(TreeState) + Send + Sync>) {
        if self.persister.set(f).is_ok() {
            let t = self.tree.write().unwrap_or_else(|p| p.into_inner());
            self.persist(&t);
        }
    }

    /// Writes the tree through the persister if it changed since the last write. Callers
    /// that give out inode numbers call it under the tree's write guard.
    fn persist(&self, t: &Tree) {
        let Some(f) = self.persister.get() else {
            return;
        };
        if self.persisted.swap(t.changes(), Ordering::SeqCst) != t.changes() {
            f(t.snapshot());
        }
    }

    /// [`SealFs::persist`] for changes that need not stop lookups (identities recorded,
    /// retired inodes freed): called by the mount's once-a-second sweeper.
    pub fn persist_if_changed(&self) {
        if self.persister.get().is_some() {
            // A read guard: writers of new numbers persist under their own write guard, so
            // this never needs to hold lookups back.
            self.persist(&self.tree());
        }
    }

    /// Runs `f` with the tree's state while every change to the tree waits: a daemon that
    /// re-executes itself (fuse/handover.rs) hands over a state no request can outdate, as
    /// `f` does not return when the exec succeeds. Requests held here are sent again to the
    /// new image by the kernel (`FUSE_NOTIFY_RESEND`).
    pub fn with_tree_frozen<R>(&self, f: impl FnOnce(TreeState) -> R) -> R {
        let t = self.tree.write().unwrap_or_else(|p| p.into_inner());
        f(t.snapshot())
    }

    /// True if this mount serves a connection taken over from a predecessor.
    pub fn is_resumed(&self) -> bool {
        self.resumed
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
