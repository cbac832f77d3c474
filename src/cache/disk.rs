//! `--cache-dir DIR`: sealed chunks on local disk, exactly as the store holds them
//! (ciphertext and tag), so that a restarted daemon, another mount or another pod on the
//! node reads a model's bulk from disk instead of the store. Never plaintext, a key or a
//! DEK: a stolen disk yields ciphertext the store already holds.
//!
//! - **Content-addressed** by the BLAKE3 of the sealed chunk that the model's manifest lists
//!   (`DIR/v1/AB/ABCD…`, 64 hex digits): the same chunk of two models or generations is
//!   stored once, an entry never changes once written, and any number of daemons can share
//!   `DIR` (each writes to a temporary name and renames; a missing entry is a miss).
//! - **Hostile on the way back**, like the store: an entry is read only if it is a regular
//!   file of exactly the chunk's length, and used only if its BLAKE3 is its name; then the
//!   chunk is authenticated (AEAD) as any other. Anything else (flipped, truncated, another
//!   chunk's bytes, a symlink, a FIFO) is deleted, counted and fetched from the store.
//! - **Off the read path**: a miss is served from the store and offered here; a bounded
//!   queue feeds [`WRITERS`] writer threads, and a full queue skips (never blocks a
//!   reader). They write whole blocks `O_DIRECT` from a page-aligned copy, so the reads do
//!   not pay for dirty page cache and its writeback. A disk error (ENOSPC, EIO) stops writing
//!   for [`PAUSE`] with one log line; never an error to a reader.
//! - **Bounded**: `--cache-dir-size` bytes; past it, the writer deletes the least recently
//!   used entries (by mtime, which a hit renews) down to 90 %. Another daemon's eviction of
//!   an entry is a miss here, nothing more.

use std::io::{Read, Write};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::fs::{DirBuilderExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use nix::fcntl::{openat, renameat, AtFlags, OFlag};
use nix::sys::stat::{fstat, futimens, mkdirat, Mode, SFlag};
use nix::sys::time::TimeSpec;
use nix::unistd::{unlinkat, UnlinkatFlags};

/// The layout version: entries live under `DIR/v1/`.
const LAYOUT: &str = "v1";
/// Most bytes waiting for the writer; past it, offers are skipped.
const MAX_QUEUED: u64 = 64 << 20;
/// How long writing stops after a disk error.
pub const PAUSE: Duration = Duration::from_secs(30);
/// Writer threads: each has one (blocking) `O_DIRECT` write in flight. One covered a
/// fifth of a cold 1 GiB read here, four a third to a half (docs/PERFORMANCE.md).
const WRITERS: usize = 4;
/// Smallest `--cache-dir-size` (a few chunks).
pub const MIN_SIZE: u64 = 16 << 20;

/// Counters, for the metrics endpoint and tests.
#[derive(Default)]
pub struct DiskStats {
    pub hits: AtomicU64,
    pub misses: AtomicU64,
    pub read_bytes: AtomicU64,
    pub written: AtomicU64,
    pub written_bytes: AtomicU64,
    pub evictions: AtomicU64,
    pub corrupt: AtomicU64,
    pub write_skips: AtomicU64,
    pub write_errors: AtomicU64,
    /// Chunks offered whose entry was already there.
    pub present: AtomicU64,
}

/// What a lookup found.
#[derive(Debug, PartialEq, Eq)]
pub enum Lookup {
    /// The entry's bytes are in the buffer, and their BLAKE3 is the address.
    Hit,
    Miss,
    /// There was an entry, but not the chunk: deleted.
    Corrupt,
}

pub struct DiskCache {
    dir: PathBuf,
    /// `DIR/v1`, opened once (O_NOFOLLOW): every entry is opened relative to it.
    root: Arc<OwnedFd>,
    queue: Mutex<mpsc::SyncSender<([u8; 32], Aligned)>>,
    queued: Arc<AtomicU64>,
    pool: Arc<Pool>,
    paused_until: Arc<Mutex<Option<Instant>>>,
    pub stats: Arc<DiskStats>,
}

#[derive(Debug, thiserror::Error)]
#[error("--cache-dir {dir}: {reason}")]
pub struct DiskCacheError {
    dir: String,
    reason: String,
}

/// `(AB, ABCD…)`: the subdirectory of `DIR/v1` and the name of the entry of `addr`.
fn entry_parts(addr: &[u8; 32]) -> (String, String) {
    let h = hex::encode(addr);
    (h[..2].to_string(), h)
}

/// An opened directory must be a directory of this user that no one else may write.
fn check_owned(fd: &OwnedFd) -> Result<(), String> {
    let st = fstat(fd).map_err(|e| e.to_string())?;
    if SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT != SFlag::S_IFDIR {
        return Err("is not a directory".into());
    }
    let euid = crate::localfile::euid();
    if st.st_uid != euid {
        return Err(format!(
            "belongs to uid {}, not this daemon's uid {euid}",
            st.st_uid
        ));
    }
    if st.st_mode & 0o022 != 0 {
        return Err(format!(
            "mode {:o} lets others write it (chmod 700)",
            st.st_mode & 0o7777
        ));
    }
    Ok(())
}

/// Opens `DIR` itself (created 0700 when absent and `create`): never through a symlink,
/// never blocking on a FIFO, checked on the descriptor it opened (no window between a
/// check and the open).
fn open_top(dir: &Path, create: bool) -> Result<OwnedFd, String> {
    if create {
        match std::fs::DirBuilder::new().mode(0o700).create(dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(e.to_string()),
        }
    }
    let fd = nix::fcntl::open(
        dir,
        OFlag::O_DIRECTORY
            | OFlag::O_NOFOLLOW
            | OFlag::O_NONBLOCK
            | OFlag::O_RDONLY
            | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| match e {
        nix::errno::Errno::ELOOP | nix::errno::Errno::ENOTDIR => {
            match std::fs::symlink_metadata(dir) {
                Ok(m) if m.file_type().is_symlink() => "is a symlink".to_string(),
                _ => "is not a directory".to_string(),
            }
        }
        e => e.to_string(),
    })?;
    check_owned(&fd)?;
    Ok(fd)
}

/// `DIR/v1`, checked like `DIR`.
fn open_root(dir: &Path, create: bool) -> Result<OwnedFd, String> {
    let top = open_top(dir, create)?;
    let root = open_dir_at(&top, LAYOUT, create).map_err(|e| format!("{LAYOUT}: {e}"))?;
    check_owned(&root).map_err(|e| format!("{LAYOUT} {e}"))?;
    Ok(root)
}

/// The subdirectory `sub` of `DIR/v1`, never through a symlink (O_NOFOLLOW covers only the
/// last name of a path, so each level is opened on its own): a symlink or file planted
/// there is removed and, with `create`, a directory made in its place.
fn sub_dir(root: &OwnedFd, sub: &str, create: bool) -> nix::Result<OwnedFd> {
    use nix::errno::Errno;
    match open_dir_at(root, sub, create) {
        Err(Errno::ELOOP | Errno::ENOTDIR) => {
            let _ = unlinkat(root, sub, UnlinkatFlags::NoRemoveDir);
            if create {
                open_dir_at(root, sub, true)
            } else {
                Err(Errno::ENOENT)
            }
        }
        other => other,
    }
}

fn open_dir_at(parent: &impl AsFd, name: &str, create: bool) -> nix::Result<OwnedFd> {
    if create {
        match mkdirat(parent, name, Mode::from_bits_truncate(0o700)) {
            Ok(()) | Err(nix::errno::Errno::EEXIST) => {}
            Err(e) => return Err(e),
        }
    }
    openat(
        parent,
        name,
        OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_RDONLY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
}

/// Checks `dir` as a mount would (this user's, 0700, no symlink) and creates its layout,
/// without starting a writer: the CSI mounter's check of its node-wide directory.
pub fn check(dir: &Path, limit: u64) -> Result<(), DiskCacheError> {
    checked_root(dir, limit).map(drop)
}

/// `DIR/v1` of a cache of `limit` bytes, checked and its layout made.
fn checked_root(dir: &Path, limit: u64) -> Result<OwnedFd, DiskCacheError> {
    let err = |reason: String| DiskCacheError {
        dir: dir.display().to_string(),
        reason,
    };
    if limit < MIN_SIZE {
        return Err(err(format!(
            "--cache-dir-size must be at least {} MiB",
            MIN_SIZE >> 20
        )));
    }
    open_root(dir, true).map_err(err)
}

impl DiskCache {
    /// Checks `dir`, creates its layout, counts what is there and starts the writer.
    pub fn open(dir: &Path, limit: u64) -> Result<Self, DiskCacheError> {
        let err = |reason: String| DiskCacheError {
            dir: dir.display().to_string(),
            reason,
        };
        let root = Arc::new(checked_root(dir, limit)?);
        let (tx, rx) = mpsc::sync_channel(8192);
        let cache = Self {
            dir: dir.to_path_buf(),
            root: root.clone(),
            queue: Mutex::new(tx),
            queued: Arc::new(AtomicU64::new(0)),
            pool: Arc::new(Pool::default()),
            paused_until: Arc::new(Mutex::new(None)),
            stats: Arc::new(DiskStats::default()),
        };
        let used = scan(&cache.root)
            .map(|e| e.iter().map(|x| x.size).sum())
            .unwrap_or(0);
        let shared = Arc::new(Shared {
            root,
            dir: cache.dir.clone(),
            limit,
            acct: Mutex::new((used, 0)),
            queued: cache.queued.clone(),
            paused_until: cache.paused_until.clone(),
            stats: cache.stats.clone(),
            pool: cache.pool.clone(),
            direct: std::sync::atomic::AtomicBool::new(!matches!(
                std::env::var("SEALFS_CACHE_DIR_BUFFERED").as_deref(),
                Ok("1" | "true")
            )),
            rx: Mutex::new(rx),
        });
        for _ in 0..WRITERS {
            let writer = Writer { s: shared.clone() };
            std::thread::Builder::new()
                .name("sealfs-cache-dir".into())
                .spawn(move || {
                    // Only a mount's main thread takes its stop signals (fuse/handover.rs).
                    crate::fuse::handover::block_stop_signals();
                    writer.run()
                })
                .map_err(|e| err(format!("writer thread: {e}")))?;
        }
        Ok(cache)
    }

    /// Whether anything is under the name of `addr`, without reading it: a miss then costs
    /// no cache slot.
    pub fn probe(&self, addr: &[u8; 32]) -> bool {
        let (sub, name) = entry_parts(addr);
        // Anything under that name (of another size or type too) is looked at by a read,
        // which removes what is not the chunk.
        let found = sub_dir(&self.root, &sub, false).ok().is_some_and(|d| {
            nix::sys::stat::fstatat(&d, name.as_str(), AtFlags::AT_SYMLINK_NOFOLLOW).is_ok()
        });
        if !found {
            self.stats.misses.fetch_add(1, Ordering::Relaxed);
        }
        found
    }

    /// Reads the entry of `addr` into `buf` (exactly `buf.len()` bytes) and checks it.
    /// Blocking: call it off the async workers.
    pub fn read_into(&self, addr: &[u8; 32], buf: &mut [u8]) -> Lookup {
        use nix::errno::Errno;
        let (sub, name) = entry_parts(addr);
        let Ok(dir) = sub_dir(&self.root, &sub, false) else {
            return Lookup::Miss;
        };
        let fd = match openat(
            &dir,
            name.as_str(),
            OFlag::O_RDONLY | OFlag::O_NOFOLLOW | OFlag::O_NONBLOCK | OFlag::O_CLOEXEC,
            Mode::empty(),
        ) {
            Ok(fd) => fd,
            // A symlink, a socket: not an entry.
            Err(Errno::ELOOP | Errno::ENXIO | Errno::EISDIR) => return self.corrupt(&dir, &name),
            // Gone, or this process short of descriptors or memory: a miss, and the entry
            // (maybe another daemon's good one) stays.
            Err(_) => return Lookup::Miss,
        };
        let regular = fstat(&fd).is_ok_and(|st| {
            SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT == SFlag::S_IFREG
                && st.st_size == buf.len() as i64
        });
        if !regular {
            return self.corrupt(&dir, &name);
        }
        let mut f = std::fs::File::from(fd);
        match f.read_exact(buf) {
            Ok(()) => {}
            // Shorter than its size said a moment ago: not the chunk.
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                return self.corrupt(&dir, &name)
            }
            // An I/O error is the disk's, not proof the entry is wrong.
            Err(_) => return Lookup::Miss,
        }
        if blake3::hash(buf).as_bytes() != addr {
            return self.corrupt(&dir, &name);
        }
        // Recently used: eviction goes by mtime.
        let now = TimeSpec::UTIME_NOW;
        let _ = futimens(&f, &now, &now);
        self.stats.hits.fetch_add(1, Ordering::Relaxed);
        self.stats
            .read_bytes
            .fetch_add(buf.len() as u64, Ordering::Relaxed);
        Lookup::Hit
    }

    fn corrupt(&self, dir: &OwnedFd, name: &str) -> Lookup {
        let _ = unlinkat(dir, name, UnlinkatFlags::NoRemoveDir);
        self.stats.corrupt.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(entry = %name, dir = %self.dir.display(), "cache entry is not the chunk its name says: deleted, reading from the store");
        Lookup::Corrupt
    }

    /// Offers a sealed chunk (ciphertext, as the store gave it) for writing under `addr`:
    /// [`DiskCache::hold`] of a copy, then [`DiskCache::submit`].
    pub fn offer(&self, addr: &[u8; 32], sealed: &[u8]) {
        if let Some(p) = self.hold(&[sealed]) {
            self.submit(addr, p);
        }
    }

    /// A copy of a sealed chunk, given as `pieces`, to write once it has authenticated: a
    /// page-aligned buffer from the pool (the read path copies the store's body into it,
    /// then decrypts from it while it is in the CPU cache, so the body's buffers go back
    /// to the HTTP client at once); `None` (a skip, counted) when writing is paused or the
    /// queue holds [`MAX_QUEUED`] bytes. Dropping it unsubmitted gives its room back.
    pub fn hold(&self, pieces: &[impl AsRef<[u8]>]) -> Option<Pending> {
        let p = (!self.paused()).then(|| self.reserve(pieces)).flatten();
        if p.is_none() {
            self.stats.write_skips.fetch_add(1, Ordering::Relaxed);
        }
        p
    }

    /// Whether a disk error paused writing.
    fn paused(&self) -> bool {
        self.paused_until
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_some_and(|t| Instant::now() < t)
    }

    /// Room for `pieces` in the queue, and their copy; `None` when the queue is full.
    fn reserve(&self, pieces: &[impl AsRef<[u8]>]) -> Option<Pending> {
        let len: usize = pieces.iter().map(|p| p.as_ref().len()).sum();
        let n = len as u64;
        if !room(self.queued.fetch_add(n, Ordering::AcqRel), n) {
            self.queued.fetch_sub(n, Ordering::AcqRel);
            return None;
        }
        let mut buf = self.pool.take(len);
        let mut at = 0;
        for p in pieces {
            let p = p.as_ref();
            buf.bytes_mut()[at..at + p.len()].copy_from_slice(p);
            at += p.len();
        }
        Some(Pending {
            buf: Some(buf),
            queued: self.queued.clone(),
            pool: self.pool.clone(),
        })
    }

    /// Queues `p` for writing under `addr` (every read checks an entry against its name).
    pub fn submit(&self, addr: &[u8; 32], mut p: Pending) {
        let Some(buf) = p.buf.take() else {
            return;
        };
        let sent = self
            .queue
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .try_send((*addr, buf));
        if let Err(e) = sent {
            let (mpsc::TrySendError::Full((_, buf)) | mpsc::TrySendError::Disconnected((_, buf))) =
                e;
            self.queued.fetch_sub(buf.len as u64, Ordering::AcqRel);
            self.pool.give(buf);
            self.stats.write_skips.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// [`DiskCache::offer`] that waits for room in the queue instead of skipping (`cache
    /// warm`); fails while writing is paused by a disk error.
    pub async fn submit_wait(&self, addr: &[u8; 32], sealed: &[u8]) -> Result<(), String> {
        loop {
            if self.paused() {
                return Err(format!(
                    "writing failed ({} errors); see the log",
                    self.stats.write_errors.load(Ordering::Relaxed)
                ));
            }
            if let Some(p) = self.reserve(&[sealed]) {
                self.submit(addr, p);
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }

    /// Waits until everything offered so far is written or skipped (tests, and `cache warm`).
    pub fn flush(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while self.queued.load(Ordering::Acquire) > 0 {
            if Instant::now() > deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        true
    }
}

/// `DIR/v1`, checked like a mount's, never created.
fn existing_root(dir: &Path) -> Result<OwnedFd, DiskCacheError> {
    open_root(dir, false).map_err(|reason| DiskCacheError {
        dir: dir.display().to_string(),
        reason,
    })
}

/// `sealfs cache stat DIR`: entries and their bytes.
pub fn stat(dir: &Path) -> Result<(usize, u64), DiskCacheError> {
    let root = existing_root(dir)?;
    let e = scan(&root).map_err(|e| DiskCacheError {
        dir: dir.display().to_string(),
        reason: e.to_string(),
    })?;
    Ok((e.len(), e.iter().map(|x| x.size).sum()))
}

/// `sealfs cache clear DIR`: deletes every entry; returns how many.
pub fn clear(dir: &Path) -> Result<usize, DiskCacheError> {
    let root = existing_root(dir)?;
    let e = scan(&root).map_err(|e| DiskCacheError {
        dir: dir.display().to_string(),
        reason: e.to_string(),
    })?;
    let mut dirs = Subdirs::default();
    Ok(e.iter().filter(|x| dirs.unlink(&root, x)).count())
}

/// Sets or clears `O_DIRECT` on `f` (Linux lets `F_SETFL` change it); setting it is EINVAL
/// where the file system has no direct I/O.
fn set_direct(f: &std::fs::File, on: bool) -> nix::Result<()> {
    use nix::fcntl::{fcntl, FcntlArg};
    let mut fl = OFlag::from_bits_truncate(fcntl(f, FcntlArg::F_GETFL)?);
    fl.set(OFlag::O_DIRECT, on);
    fcntl(f, FcntlArg::F_SETFL(fl)).map(drop)
}

/// Alignment of `O_DIRECT` writes: offset, length and memory (the page size covers every
/// logical block size and DMA alignment seen on Linux disks).
const DIRECT_ALIGN: usize = 4096;

/// An entry's sealed bytes in a buffer whose first byte is [`DIRECT_ALIGN`]-aligned
/// (aligned by offset into a plain `Vec`, so no unsafe allocation).
pub struct Aligned {
    v: Vec<u8>,
    off: usize,
    len: usize,
}

impl Aligned {
    fn bytes(&self) -> &[u8] {
        &self.v[self.off..self.off + self.len]
    }

    fn bytes_mut(&mut self) -> &mut [u8] {
        &mut self.v[self.off..self.off + self.len]
    }
}

/// Buffers of entries written, kept for the next ones (each chunk would otherwise cost a
/// fresh allocation and its page faults).
#[derive(Default)]
struct Pool(Mutex<Vec<Vec<u8>>>);

/// Most buffers the pool keeps (those in the queue are bounded by [`MAX_QUEUED`]).
const POOL_KEEP: usize = 16;

impl Pool {
    fn take(&self, len: usize) -> Aligned {
        let cap = len + DIRECT_ALIGN;
        let reuse = {
            let mut free = self.0.lock().unwrap_or_else(|p| p.into_inner());
            // Not a 64 MiB buffer for a 1 MiB entry: within twice the size.
            let at = free
                .iter()
                .position(|v| v.len() >= cap && v.len() <= 2 * cap);
            at.map(|i| free.swap_remove(i))
        };
        let v = reuse.unwrap_or_else(|| vec![0; cap]);
        let off = v.as_ptr().align_offset(DIRECT_ALIGN);
        Aligned { v, off, len }
    }

    fn give(&self, a: Aligned) {
        let mut free = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if free.len() < POOL_KEEP {
            free.push(a.v);
        }
    }
}

/// Whether `n` more bytes fit a queue holding `before`: up to [`MAX_QUEUED`], and always
/// one chunk into an empty queue (a 64 MiB chunk is larger than the bound).
fn room(before: u64, n: u64) -> bool {
    before == 0 || before + n <= MAX_QUEUED
}

/// A sealed chunk's buffer, held until the chunk authenticates ([`DiskCache::submit`]).
pub struct Pending {
    buf: Option<Aligned>,
    queued: Arc<AtomicU64>,
    pool: Arc<Pool>,
}

impl Pending {
    /// The copy: exactly the sealed chunk's bytes.
    pub fn bytes(&self) -> &[u8] {
        self.buf
            .as_ref()
            .expect("a Pending holds its buffer until submitted")
            .bytes()
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        if let Some(a) = self.buf.take() {
            self.queued.fetch_sub(a.len as u64, Ordering::AcqRel);
            self.pool.give(a);
        }
    }
}

/// One entry found by a scan.
struct Entry {
    sub: String,
    name: String,
    size: u64,
    /// Nanoseconds (entries written within one second must still have an order).
    mtime: i128,
}

/// A temporary file older than this was left by a daemon that died while writing.
const STALE_TMP: Duration = Duration::from_secs(600);
/// Most entries one scan collects (a directory of 1 MiB chunks this full holds 4 TiB).
const MAX_SCAN: usize = 4 << 20;

/// Every entry under `DIR/v1` (`AB/` directories of 64-hex names, each opened without
/// following symlinks; anything else is left alone, old temporary files removed).
fn scan(root: &OwnedFd) -> std::io::Result<Vec<Entry>> {
    let proc_path = |fd: &OwnedFd| PathBuf::from(format!("/proc/self/fd/{}", fd.as_raw_fd()));
    let mut out = Vec::new();
    for sub in std::fs::read_dir(proc_path(root))? {
        let sname = sub?.file_name().to_string_lossy().into_owned();
        if sname.len() != 2 || !sname.bytes().all(|b| b.is_ascii_hexdigit()) {
            continue;
        }
        let Ok(dir) = sub_dir(root, &sname, false) else {
            continue;
        };
        let Ok(entries) = std::fs::read_dir(proc_path(&dir)) else {
            continue;
        };
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            // lstat, relative to the directory read.
            let Ok(m) = e.metadata() else {
                continue;
            };
            if name.starts_with(".tmp.") {
                let old = m
                    .modified()
                    .ok()
                    .and_then(|t| t.elapsed().ok())
                    .is_some_and(|age| age > STALE_TMP);
                if old {
                    let _ = unlinkat(&dir, name.as_str(), UnlinkatFlags::NoRemoveDir);
                }
                continue;
            }
            if name.len() != 64 || !name.starts_with(&sname) || out.len() >= MAX_SCAN {
                continue;
            }
            out.push(Entry {
                sub: sname.clone(),
                name,
                size: m.len(),
                mtime: i128::from(m.mtime()) * 1_000_000_000 + i128::from(m.mtime_nsec()),
            });
        }
    }
    Ok(out)
}

/// Subdirectories opened once for a run of deletions.
#[derive(Default)]
struct Subdirs(std::collections::HashMap<String, Option<OwnedFd>>);

impl Subdirs {
    fn unlink(&mut self, root: &OwnedFd, e: &Entry) -> bool {
        let dir = self
            .0
            .entry(e.sub.clone())
            .or_insert_with(|| sub_dir(root, &e.sub, false).ok());
        dir.as_ref()
            .is_some_and(|d| unlinkat(d, e.name.as_str(), UnlinkatFlags::NoRemoveDir).is_ok())
    }
}

/// This thread (a writer) gets only the disk time nothing else wants: the idle I/O class
/// (per thread on Linux). On a host whose readers keep the disk busy, the queue then fills
/// and chunks are skipped (counted), rather than the reads slowing down. Buffered writers
/// (the kernel's copy into the page cache: 0.4 CPU s/GiB) also run at nice 19; `O_DIRECT`
/// ones keep the default: each chunk costs them one copy, and at nice 19 on busy cores
/// their wake-ups after each write came so late that fewer chunks were written and the
/// reads were slower too (docs/PERFORMANCE.md, "O_DIRECT writes").
fn background_priority(direct: bool) {
    // SAFETY: plain syscalls on this thread's own id; failures leave the defaults.
    #[allow(unsafe_code)]
    unsafe {
        let tid = libc::syscall(libc::SYS_gettid) as libc::id_t;
        if !direct {
            libc::setpriority(libc::PRIO_PROCESS, tid, 19);
        }
        const IOPRIO_WHO_PROCESS: libc::c_long = 1;
        const IOPRIO_CLASS_IDLE: libc::c_long = 3;
        libc::syscall(
            libc::SYS_ioprio_set,
            IOPRIO_WHO_PROCESS,
            tid as libc::c_long,
            IOPRIO_CLASS_IDLE << 13,
        );
    }
}

/// What the writer threads share.
struct Shared {
    root: Arc<OwnedFd>,
    dir: PathBuf,
    limit: u64,
    /// (bytes of entries, this daemon's estimate made exact by each scan; bytes written
    /// since the last scan: other daemons write to DIR too, so the count is refreshed
    /// every tenth of the limit)
    acct: Mutex<(u64, u64)>,
    queued: Arc<AtomicU64>,
    paused_until: Arc<Mutex<Option<Instant>>>,
    stats: Arc<DiskStats>,
    pool: Arc<Pool>,
    /// Entries are written `O_DIRECT` (until the file system refuses it).
    direct: std::sync::atomic::AtomicBool,
    rx: Mutex<mpsc::Receiver<([u8; 32], Aligned)>>,
}

/// Gives `n` bytes of queue room back when dropped.
struct Room<'a>(&'a AtomicU64, u64);

impl Drop for Room<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(self.1, Ordering::AcqRel);
    }
}

/// One writer thread.
struct Writer {
    s: Arc<Shared>,
}

impl Writer {
    fn run(self) {
        let mut direct = self.s.direct.load(Ordering::Relaxed);
        background_priority(direct);
        loop {
            // Writing went buffered (the file system refused O_DIRECT): nice 19 from now on.
            if direct && !self.s.direct.load(Ordering::Relaxed) {
                direct = false;
                background_priority(false);
            }
            let next = self.s.rx.lock().unwrap_or_else(|p| p.into_inner()).recv();
            let Ok((addr, buf)) = next else {
                return;
            };
            let n = buf.len as u64;
            // The entry's room in the queue comes back however this ends (a panic too:
            // else `flush` and `cache warm` would wait for it forever).
            let room = Room(&self.s.queued, n);
            // Not hashed again here (0.15 CPU s/GiB, on the read path's second core): the
            // read path offers a chunk that authenticated as the one the manifest lists
            // under `addr`, and `cache warm` names each chunk by the BLAKE3 it computed. A
            // wrong one would only cost its entry: every read checks the name.
            let s = &self.s;
            let written = self.write(&addr, buf.bytes());
            s.pool.give(buf);
            drop(room);
            let mut acct = s.acct.lock().unwrap_or_else(|p| p.into_inner());
            match written {
                Ok(true) => {
                    acct.0 += n;
                    acct.1 += n;
                    s.stats.written.fetch_add(1, Ordering::Relaxed);
                    s.stats.written_bytes.fetch_add(n, Ordering::Relaxed);
                }
                Ok(false) => {
                    s.stats.present.fetch_add(1, Ordering::Relaxed);
                }
                Err(e) => s.pause(&e),
            }
            if acct.0 > s.limit || acct.1 > s.limit / 10 {
                s.evict(&mut acct);
            }
        }
    }

    /// Writes the entry unless it is there; `Ok(false)` when it was.
    fn write(&self, addr: &[u8; 32], sealed: &[u8]) -> std::io::Result<bool> {
        let (sub, name) = entry_parts(addr);
        let dir = sub_dir(&self.s.root, &sub, true)?;
        if nix::sys::stat::fstatat(&dir, name.as_str(), AtFlags::AT_SYMLINK_NOFOLLOW).is_ok() {
            return Ok(false);
        }
        // Unique across daemons sharing DIR, pid namespaces included.
        let mut nonce = [0u8; 12];
        crate::crypto::random_bytes(&mut nonce);
        let tmp = format!(".tmp.{}", hex::encode(nonce));
        let flags =
            OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
        let mode = Mode::from_bits_truncate(0o600);
        let fd = openat(&dir, tmp.as_str(), flags, mode)?;
        let mut f = std::fs::File::from(fd);
        // O_DIRECT set on the open file, not asked of open(2): an open that refuses it
        // (EINVAL: tmpfs before Linux 6.6, some FUSE or 9p mounts) has made the file first.
        let direct = self.s.direct.load(Ordering::Relaxed)
            && match set_direct(&f, true) {
                Ok(()) => true,
                Err(nix::errno::Errno::EINVAL) => {
                    self.no_direct("open");
                    false
                }
                Err(e) => {
                    let _ = unlinkat(&dir, tmp.as_str(), UnlinkatFlags::NoRemoveDir);
                    return Err(e.into());
                }
            };
        let written = if direct {
            self.write_direct(&f, sealed)
        } else {
            f.write_all(sealed)
        };
        drop(f);
        if let Err(e) = written.and_then(|()| {
            renameat(&dir, tmp.as_str(), &dir, name.as_str()).map_err(std::io::Error::from)
        }) {
            let _ = unlinkat(&dir, tmp.as_str(), UnlinkatFlags::NoRemoveDir);
            return Err(e);
        }
        Ok(true)
    }

    /// Writes `sealed` (page-aligned: an [`Aligned`]) to the empty file `f`, opened
    /// `O_DIRECT`: the whole blocks straight to the disk, the last partial block through
    /// the page cache. Why: a buffered write of a cold read's 1 GiB cost this 2-core VM's
    /// daemon 0.4 CPU s/GiB (the kernel's copy into dirty pages, ext4's per-page work)
    /// and another half second of writeback after it, and doubled the page cache the
    /// model's plaintext needs (docs/PERFORMANCE.md, "O_DIRECT writes"). A file system
    /// that refuses the alignment gets this entry and every later one buffered.
    fn write_direct(&self, mut f: &std::fs::File, sealed: &[u8]) -> std::io::Result<()> {
        use std::os::unix::fs::FileExt;
        let whole = sealed.len() / DIRECT_ALIGN * DIRECT_ALIGN;
        if whole > 0 {
            match f.write_all_at(&sealed[..whole], 0) {
                Ok(()) => {}
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                    self.no_direct("write");
                    set_direct(f, false)?;
                    // pwrite left the file offset at 0: the whole entry again, from there.
                    return f.write_all(sealed);
                }
                Err(e) => return Err(e),
            }
        }
        if whole < sealed.len() {
            // The tail is not a whole block: written buffered.
            set_direct(f, false)?;
            f.write_all_at(&sealed[whole..], whole as u64)?;
        }
        Ok(())
    }

    /// Stops `O_DIRECT` writes for this daemon, with one log line.
    fn no_direct(&self, at: &str) {
        if self.s.direct.swap(false, Ordering::Relaxed) {
            tracing::info!(dir = %self.s.dir.display(), at, "cache directory refuses O_DIRECT; writing entries through the page cache");
        }
    }
}

impl Shared {
    fn pause(&self, e: &std::io::Error) {
        self.stats.write_errors.fetch_add(1, Ordering::Relaxed);
        let mut p = self.paused_until.lock().unwrap_or_else(|p| p.into_inner());
        if p.is_none_or(|t| Instant::now() >= t) {
            tracing::warn!(dir = %self.dir.display(), error = %e, pause_s = PAUSE.as_secs(), "cache directory write failed; not writing to it for a while (reads go on)");
        }
        *p = Some(Instant::now() + PAUSE);
    }

    /// Counts what DIR holds (every daemon's entries) and, past the limit, deletes the least
    /// recently used entries down to 90 % of it. A directory that cannot be scanned pauses
    /// writing: unbounded growth is worse than a cold cache.
    fn evict(&self, acct: &mut (u64, u64)) {
        acct.1 = 0;
        let mut entries = match scan(&self.root) {
            Ok(e) => e,
            Err(e) => return self.pause(&e),
        };
        let mut total: u64 = entries.iter().map(|e| e.size).sum();
        if total > self.limit {
            let goal = self.limit / 10 * 9;
            entries.sort_by_key(|e| e.mtime);
            let mut dirs = Subdirs::default();
            for e in entries {
                if total <= goal {
                    break;
                }
                if dirs.unlink(&self.root, &e) {
                    total = total.saturating_sub(e.size);
                    self.stats.evictions.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        acct.0 = total;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn chunk(seed: u8, len: usize) -> (Vec<u8>, [u8; 32]) {
        let b: Vec<u8> = (0..len).map(|i| (i as u8).wrapping_mul(seed)).collect();
        let a = *blake3::hash(&b).as_bytes();
        (b, a)
    }

    #[test]
    fn an_offered_chunk_is_read_back_and_a_bad_entry_is_deleted_never_used() {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path().join("c");
        let c = DiskCache::open(&dir, MIN_SIZE).unwrap();
        assert_eq!(
            std::fs::metadata(&dir).unwrap().permissions().mode() & 0o777,
            0o700
        );
        let (bytes, addr) = chunk(7, 4096);
        let mut buf = vec![0u8; 4096];
        assert_eq!(c.read_into(&addr, &mut buf), Lookup::Miss);
        c.offer(&addr, &bytes);
        assert!(c.flush(Duration::from_secs(10)));
        assert_eq!(c.read_into(&addr, &mut buf), Lookup::Hit);
        assert_eq!(buf, bytes);
        let (sub, name) = entry_parts(&addr);
        let path = dir.join(LAYOUT).join(sub).join(name);
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        // Bytes offered under another chunk's address are written, but never used: the
        // read checks the name and deletes the entry.
        let (other, _) = chunk(9, 4096);
        let (_, addr2) = chunk(11, 4096);
        c.offer(&addr2, &other);
        assert!(c.flush(Duration::from_secs(10)));
        assert_eq!(c.read_into(&addr2, &mut buf), Lookup::Corrupt);
        assert_eq!(c.read_into(&addr2, &mut buf), Lookup::Miss);

        type Damage = fn(&Path, &[u8]);
        let damages: [(&str, Damage); 5] = [
            ("flipped", |p, b| {
                let mut b = b.to_vec();
                b[100] ^= 1;
                std::fs::write(p, b).unwrap()
            }),
            ("truncated", |p, b| std::fs::write(p, &b[..4000]).unwrap()),
            ("another chunk", |p, _| {
                std::fs::write(p, chunk(3, 4096).0).unwrap()
            }),
            ("symlink", |p, _| {
                std::os::unix::fs::symlink("/etc/passwd", p).unwrap()
            }),
            ("fifo", |p, _| {
                nix::unistd::mkfifo(p, Mode::from_bits_truncate(0o600)).unwrap()
            }),
        ];
        for (what, damage) in damages {
            let _ = std::fs::remove_file(&path);
            damage(&path, &bytes);
            buf.fill(0);
            assert_eq!(c.read_into(&addr, &mut buf), Lookup::Corrupt, "{what}");
            assert!(
                std::fs::symlink_metadata(&path).is_err(),
                "{what}: the bad entry is deleted"
            );
        }
        assert_eq!(c.stats.corrupt.load(Ordering::Relaxed), 6);
    }

    /// Pages of `path` in the page cache (mincore over a mapping of it).
    fn resident_pages(path: &Path) -> usize {
        let f = std::fs::File::open(path).unwrap();
        let len = f.metadata().unwrap().len() as usize;
        let page = 4096;
        let mut vec = vec![0u8; len.div_ceil(page)];
        // SAFETY: a read-only shared mapping of a file this test owns, unmapped before
        // return; mincore writes one byte per page into `vec`, which has that many.
        #[allow(unsafe_code)]
        unsafe {
            let p = libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ,
                libc::MAP_SHARED,
                f.as_raw_fd(),
                0,
            );
            assert_ne!(p, libc::MAP_FAILED);
            assert_eq!(libc::mincore(p, len, vec.as_mut_ptr()), 0);
            libc::munmap(p, len);
        }
        vec.iter().filter(|b| **b & 1 == 1).count()
    }

    #[test]
    fn entries_of_any_length_are_written_whole_past_the_page_cache() {
        // On the checkout's disk, not /tmp (a tmpfs keeps everything in memory).
        let base = Path::new(env!("CARGO_MANIFEST_DIR")).join("target");
        std::fs::create_dir_all(&base).unwrap();
        let d = tempfile::tempdir_in(&base).unwrap();
        let dir = d.path().join("c");
        let c = DiskCache::open(&dir, 256 << 20).unwrap();
        let cases = [100, 4096, 3 * 4096, (1 << 20) + 16, 64 * 4096 + 4095, 4097];
        for (seed, len) in cases.iter().enumerate() {
            let (bytes, addr) = chunk(seed as u8 * 2 + 3, *len);
            let p = c.hold(&[&bytes]).unwrap();
            assert_eq!(p.bytes().as_ptr() as usize % DIRECT_ALIGN, 0);
            c.submit(&addr, p);
            assert!(c.flush(Duration::from_secs(10)));
            let (sub, name) = entry_parts(&addr);
            let path = dir.join(LAYOUT).join(sub).join(name);
            // Whole blocks went to the disk directly: at most the tail's page is cached.
            let cached = resident_pages(&path);
            assert!(cached <= 1, "len {len}: {cached} pages in the page cache");
            let mut buf = vec![0u8; *len];
            assert_eq!(c.read_into(&addr, &mut buf), Lookup::Hit, "len {len}");
            assert!(buf == bytes, "len {len}: read back differs");
        }
        assert_eq!(c.stats.written.load(Ordering::Relaxed), cases.len() as u64);
        assert_eq!(c.stats.write_errors.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn a_shared_or_open_directory_is_refused_and_the_size_is_kept() {
        let d = tempfile::tempdir().unwrap();
        let open = d.path().join("open");
        std::fs::create_dir(&open).unwrap();
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).unwrap();
        let e = DiskCache::open(&open, MIN_SIZE).err().unwrap().to_string();
        assert!(e.contains("lets others write it"), "{e}");
        let link = d.path().join("link");
        std::os::unix::fs::symlink(d.path(), &link).unwrap();
        let e = DiskCache::open(&link, MIN_SIZE).err().unwrap().to_string();
        assert!(e.contains("symlink"), "{e}");
        let e = DiskCache::open(&d.path().join("x"), 1 << 20)
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("at least 16 MiB"), "{e}");

        // 24 entries of 1 MiB under a 16 MiB limit: the oldest go, at most the limit stays.
        let dir = d.path().join("small");
        let c = DiskCache::open(&dir, MIN_SIZE).unwrap();
        let mut addrs = Vec::new();
        for i in 0..24u8 {
            let (b, a) = chunk(i.wrapping_mul(2) | 1, 1 << 20);
            c.offer(&a, &b);
            assert!(c.flush(Duration::from_secs(10)));
            addrs.push(a);
        }
        let on_disk: u64 = scan(&c.root).unwrap().iter().map(|e| e.size).sum();
        assert!(on_disk <= MIN_SIZE, "{on_disk} bytes kept");
        assert!(c.stats.evictions.load(Ordering::Relaxed) >= 8);
        let mut buf = vec![0u8; 1 << 20];
        assert_eq!(
            c.read_into(&addrs[23], &mut buf),
            Lookup::Hit,
            "the newest stays"
        );
    }
}
