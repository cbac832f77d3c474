//! The read path: plaintext range → chunk spans → locked cache; misses merged into ranged
//! GETs pinned to the opened ETag, several in flight, one fetch per chunk however many
//! readers want it; a growing read-ahead window for sequential readers.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use tokio::sync::watch;

use super::{chunk_key, lock, FsError, Handle, Opened, SealFs};
use crate::cache::{ChunkKey, Pinned};
use crate::format::ChunkSpan;
use crate::store::RangeBody;

const PRELUDE: usize = crate::format::layout::PRELUDE_LEN as usize;

/// The outcome of a fetch run: its chunks, pinned, so that every waiter gets them even if
/// the cache is under pressure.
type Outcome = Option<Result<Arc<Vec<(u64, Pinned)>>, FsError>>;
type Done = watch::Receiver<Outcome>;

/// How long a fetch waits for a free cache slot (all pinned by readers) before EIO.
const SLOT_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

/// Chunks being fetched, each with a channel that says when its run finished.
#[derive(Default)]
pub(crate) struct Inflight(Mutex<HashMap<ChunkKey, Done>>);

impl Inflight {
    /// True while a fetch of chunk `key` is running.
    pub(crate) fn has(&self, key: ChunkKey) -> bool {
        lock(&self.0).contains_key(&key)
    }

    /// True while a fetch of any chunk of version `seq` is running.
    pub(crate) fn has_file(&self, seq: u64) -> bool {
        lock(&self.0).keys().any(|k| k.0 == seq)
    }
}

/// Per-handle read-ahead state.
#[derive(Debug, Default)]
pub(crate) struct Prefetch {
    /// Where the next sequential read would start.
    next: u64,
    /// Current window in chunks (0: not sequential).
    window: u64,
    /// Highest chunk index already scheduled ahead.
    ahead: Option<u64>,
    /// The last read: a handle read within [`ACTIVE`] shares the read-ahead budget.
    last: Option<std::time::Instant>,
}

/// How recently a handle must have read to count as a reader sharing the read-ahead budget.
pub(crate) const ACTIVE: std::time::Duration = std::time::Duration::from_secs(2);

impl Prefetch {
    /// True if the handle read within [`ACTIVE`] of `now`.
    pub(crate) fn active(&self, now: std::time::Instant) -> bool {
        self.last.is_some_and(|t| now.duration_since(t) < ACTIVE)
    }
}

/// The bytes of one read: one pinned chunk slice (no copy), or an assembled buffer.
pub enum ReadData {
    Pinned {
        chunk: Pinned,
        skip: usize,
        len: usize,
    },
    Owned(zeroize::Zeroizing<Vec<u8>>),
}

impl ReadData {
    pub fn bytes(&self) -> &[u8] {
        match self {
            ReadData::Pinned { chunk, skip, len } => &chunk.bytes()[*skip..*skip + *len],
            ReadData::Owned(v) => v,
        }
    }
}

/// Marks chunks `a..=b` of `o` as in flight, all on one channel: its sender says when
/// their run is done.
fn register(
    inflight: &mut HashMap<ChunkKey, Done>,
    o: &Opened,
    a: u64,
    b: u64,
) -> watch::Sender<Outcome> {
    let (tx, rx) = watch::channel(None);
    for i in a..=b {
        inflight.insert(chunk_key(o, i), rx.clone());
    }
    tx
}

/// Logs a failed fetch run with its file and chunks; the error goes to every waiter.
fn run_failed(o: &Opened, a: u64, b: u64, e: crate::Error) -> FsError {
    let err = FsError::from(e);
    tracing::warn!(file = %o.file.key, chunks = %format!("{a}..={b}"), error = %err, "fetch failed");
    err
}

/// Removes a fetch run's chunks from the in-flight map when dropped. Its waiters see the
/// run's sender go (an error) if it never sent an outcome.
struct RunGuard {
    fs: Arc<SealFs>,
    seq: u64,
    chunks: (u64, u64),
}

impl Drop for RunGuard {
    fn drop(&mut self) {
        let mut inflight = lock(&self.fs.inflight.0);
        for i in self.chunks.0..=self.chunks.1 {
            inflight.remove(&(self.seq, i));
        }
    }
}

/// Most body pieces one chunk is kept as. A 1 MiB chunk arrives in 3 to 5 from S3; each
/// kept piece pins the whole read buffer it was cut from (hyper's grow to about 400 KiB),
/// so a store that sends many small pieces could otherwise make a queued chunk pin many
/// times its size.
const MAX_PIECES: usize = 8;

/// Bounded attempts when a fetched chunk is evicted before its reader pins it.
const MAX_ROUNDS: usize = 4;

impl SealFs {
    /// The read, if every chunk it needs is cached: no await, so the FUSE thread can answer
    /// it at once instead of waking a runtime worker (the common case behind read-ahead).
    /// `None` means "go the async way". Must run inside the runtime (it may start fetches).
    pub fn read_cached(
        self: &Arc<Self>,
        fh: u64,
        offset: u64,
        size: u32,
    ) -> Option<Result<ReadData, FsError>> {
        let h = match self.handle(fh) {
            Ok(h) => h,
            Err(e) => return Some(Err(e)),
        };
        if h.opened.is_revoked() {
            return Some(Err(h.opened.revoked_error()));
        }
        let spans = h.opened.file.layout.spans(offset, size as u64);
        let last = spans.last()?.index;
        let mut pins = Vec::with_capacity(spans.len());
        for s in &spans {
            pins.push(self.cache.get(chunk_key(&h.opened, s.index))?);
        }
        self.prefetch(&h, offset, size as u64, last);
        let out = if spans.len() == 1 {
            let ChunkSpan { skip, len, .. } = spans[0];
            ReadData::Pinned {
                chunk: pins.pop().expect("one span, one pin"),
                skip,
                len,
            }
        } else {
            let mut buf = zeroize::Zeroizing::new(Vec::with_capacity(size as usize));
            for (s, p) in spans.iter().zip(&pins) {
                buf.extend_from_slice(&p.bytes()[s.skip..s.skip + s.len]);
            }
            ReadData::Owned(buf)
        };
        self.stats
            .bytes_served
            .fetch_add(out.bytes().len() as u64, Ordering::Relaxed);
        Some(Ok(out))
    }

    /// A read: from the cache when it can ([`SealFs::read_cached`]), else by fetching.
    pub async fn read(
        self: &Arc<Self>,
        fh: u64,
        offset: u64,
        size: u32,
    ) -> Result<ReadData, FsError> {
        match self.read_cached(fh, offset, size) {
            Some(done) => done,
            None => self.read_fetching(fh, offset, size).await,
        }
    }

    /// The read once [`SealFs::read_cached`] said `None`: waits for the chunks it needs.
    /// (The FUSE adapter calls the two halves itself, so a miss is not checked twice.)
    pub async fn read_fetching(
        self: &Arc<Self>,
        fh: u64,
        offset: u64,
        size: u32,
    ) -> Result<ReadData, FsError> {
        let h = self.handle(fh)?;
        if h.opened.is_revoked() {
            return Err(h.opened.revoked_error());
        }
        let layout = h.opened.file.layout;
        let spans = layout.spans(offset, size as u64);
        let Some(last) = spans.last().map(|s| s.index) else {
            return Ok(ReadData::Owned(Default::default()));
        };
        self.start_fetch(&h.opened, spans[0].index, last);
        self.prefetch(&h, offset, size as u64, last);
        let out = if spans.len() == 1 {
            let ChunkSpan { index, skip, len } = spans[0];
            ReadData::Pinned {
                chunk: self.chunk(&h.opened, index).await?,
                skip,
                len,
            }
        } else {
            // One pin at a time (unlike read_cached): waiting for a fetch while holding
            // the other chunks pinned could starve a small cache of slots.
            let mut buf = zeroize::Zeroizing::new(Vec::with_capacity(size as usize));
            for s in &spans {
                let c = self.chunk(&h.opened, s.index).await?;
                buf.extend_from_slice(&c.bytes()[s.skip..s.skip + s.len]);
            }
            ReadData::Owned(buf)
        };
        self.stats
            .bytes_served
            .fetch_add(out.bytes().len() as u64, Ordering::Relaxed);
        Ok(out)
    }

    /// The chunk, pinned: from the cache, or by waiting for (or starting) its fetch.
    async fn chunk(self: &Arc<Self>, o: &Arc<Opened>, index: u64) -> Result<Pinned, FsError> {
        let key = chunk_key(o, index);
        for _ in 0..MAX_ROUNDS {
            if let Some(p) = self.cache.get(key) {
                return Ok(p);
            }
            let waiting = lock(&self.inflight.0).get(&key).cloned();
            let mut rx = match waiting {
                Some(rx) => rx,
                None => {
                    self.start_fetch(o, index, index);
                    match lock(&self.inflight.0).get(&key).cloned() {
                        Some(rx) => rx,
                        None => continue, // finished already: look in the cache again
                    }
                }
            };
            let res = rx
                .wait_for(|v| v.is_some())
                .await
                .map_err(|_| FsError::Io("fetch task vanished".into()))?;
            if let Some(Err(e)) = res.as_ref() {
                return Err(e.clone());
            }
        }
        Err(FsError::Io(format!(
            "chunk {index} evicted before it could be read: --cache-size is too small"
        )))
    }

    /// Starts fetches for the chunks of `first..=last` that are neither cached nor in
    /// flight, merging adjacent ones into ranged GETs of at most `max_fetch` bytes.
    fn start_fetch(self: &Arc<Self>, o: &Arc<Opened>, first: u64, last: u64) {
        // A run pins all its chunks until handed over: keep it well inside the cache.
        let by_cache = (self.cache.slots() as u64 / 4).max(1);
        let per_get = (self.config.max_fetch >> o.file.layout.chunk_log2()).clamp(1, by_cache);
        let mut runs: Vec<(u64, u64, watch::Sender<Outcome>)> = Vec::new();
        {
            let mut inflight = lock(&self.inflight.0);
            let mut open: Option<(u64, u64)> = None;
            let mut close = |run: (u64, u64), inflight: &mut HashMap<ChunkKey, Done>| {
                runs.push((run.0, run.1, register(inflight, o, run.0, run.1)));
            };
            for i in first..=last {
                let key = chunk_key(o, i);
                let missing = !inflight.contains_key(&key) && !self.cache.contains(key);
                open = match (open, missing) {
                    (Some((a, b)), true) if b + 1 == i && i - a < per_get => Some((a, i)),
                    (Some(run), true) => {
                        close(run, &mut inflight);
                        Some((i, i))
                    }
                    (None, true) => Some((i, i)),
                    (Some(run), false) => {
                        close(run, &mut inflight);
                        None
                    }
                    (None, false) => None,
                };
            }
            if let Some(run) = open {
                close(run, &mut inflight);
            }
        }
        for (a, b, tx) in runs {
            self.spawn_run(o, a, b, tx, None);
        }
    }

    /// Takes over the GET of chunk 0 that `open` sent before the DEK was known, as if
    /// [`SealFs::start_fetch`] had started it (dropped if the chunk is already there).
    pub(super) fn adopt_first_chunk(
        self: &Arc<Self>,
        o: &Arc<Opened>,
        body: RangeBody,
        started: Instant,
    ) {
        let key = chunk_key(o, 0);
        let tx = {
            let mut inflight = lock(&self.inflight.0);
            if inflight.contains_key(&key) || self.cache.contains(key) {
                return;
            }
            register(&mut inflight, o, 0, 0)
        };
        self.spawn_run(o, 0, 0, tx, Some((body, started)));
    }

    /// Runs the fetch of chunks `a..=b` (registered in `inflight` under `tx`): its GET,
    /// or `body` when that GET was already sent.
    fn spawn_run(
        self: &Arc<Self>,
        o: &Arc<Opened>,
        a: u64,
        b: u64,
        tx: watch::Sender<Outcome>,
        body: Option<(RangeBody, Instant)>,
    ) {
        let fs = self.clone();
        let o = o.clone();
        tokio::spawn(async move {
            // Clears the run's in-flight entries however the task ends (a panic included),
            // so a failed run never leaves its chunks "in flight" for good.
            let guard = RunGuard {
                fs: fs.clone(),
                seq: o.seq,
                chunks: (a, b),
            };
            let res = match body {
                Some((body, started)) => fs.fill_run(&o, a, b, body, started).await.map(Arc::new),
                None => fs.fetch_run(&o, a, b).await,
            };
            drop(guard);
            let _ = tx.send(Some(res));
        });
    }

    /// One ranged GET of chunks `a..=b`, streamed straight into locked slots: each chunk is
    /// authenticated as soon as its bytes are in, so at most one chunk per GET is buffered.
    /// A chunk that fails is wiped, logged with file, chunk and reason, and fails the run.
    async fn fetch_run(
        &self,
        o: &Opened,
        a: u64,
        b: u64,
    ) -> Result<Arc<Vec<(u64, Pinned)>>, FsError> {
        let started = Instant::now();
        let mut out = Vec::with_capacity((b - a + 1) as usize);
        // Each chunk from the cache directory when it has it; each gap in one ranged GET
        // of the store. Never chunk 0 from the directory: it comes with the prelude, which
        // is checked against the store. Without --cache-dir: one GET of `a..=b`.
        let mut i = a;
        while i <= b {
            if i > 0 {
                if let Some(p) = self.chunk_from_disk(o, i).await? {
                    out.push((i, p));
                    i += 1;
                    continue;
                }
            }
            // The gap runs until the next chunk the directory has (kept for after it).
            let (mut j, mut after) = (i, None);
            while j < b {
                if let Some(p) = self.chunk_from_disk(o, j + 1).await? {
                    after = Some((j + 1, p));
                    break;
                }
                j += 1;
            }
            match o.file.fetch_stream(&self.store, i, j).await {
                Ok(body) => out.extend(self.fill_run(o, i, j, body, started).await?),
                Err(e) => return Err(run_failed(o, i, j, e)),
            }
            i = j + 1;
            if let Some((k, p)) = after {
                out.push((k, p));
                i = k + 1;
            }
        }
        Ok(Arc::new(out))
    }

    /// Chunk `index` from the cache directory, authenticated and pinned; `None` when it is
    /// not there or not right (then the store has the last word).
    async fn chunk_from_disk(&self, o: &Opened, index: u64) -> Result<Option<Pinned>, FsError> {
        use crate::cache::disk::Lookup;
        let (Some(disk), Some(addr)) = (
            self.disk.clone(),
            o.addresses
                .as_ref()
                .and_then(|a| a.get(index as usize))
                .copied(),
        ) else {
            return Ok(None);
        };
        let f = &o.file;
        let need = f.layout.chunk_cipher_len(index) as usize;
        if need > self.cache.slot_size() {
            return Ok(None);
        }
        // A miss costs no cache slot (nor the eviction of a cached chunk to make one).
        {
            let disk = disk.clone();
            let found = tokio::task::spawn_blocking(move || disk.probe(&addr))
                .await
                .unwrap_or(false);
            if !found {
                return Ok(None);
            }
        }
        // Wiped whole at once: the disk read that overwrites it may wait on the disk, and
        // the evicted chunk must not stay there meanwhile.
        let slot = self.reserve_slot(0).await?;
        // A disk read of one chunk, off the async workers (the slot moves there and back).
        let (mut slot, found) = tokio::task::spawn_blocking(move || {
            let mut slot = slot;
            let found = disk.read_into(&addr, &mut slot.buf()[..need]);
            (slot, found)
        })
        .await
        .map_err(|e| FsError::Io(format!("cache directory read: {e}")))?;
        if found != Lookup::Hit {
            return Ok(None);
        }
        // The entry hashes to the manifest's digest of this chunk (under a proof of origin,
        // the checked one); the AEAD decides as for any chunk.
        match f.open_chunk(index, &mut slot.buf()[..need]) {
            Ok(_) if o.is_revoked() => Err(o.revoked_error()),
            Ok(len) => Ok(Some(slot.commit(chunk_key(o, index), len))),
            Err(e @ crate::Error::Revoked { .. }) => Err(FsError::from(e)),
            Err(e) => {
                tracing::warn!(file = %f.key, chunk = index, reason = %e, "a cache directory entry with the manifest's digest failed authentication; reading the store");
                Ok(None)
            }
        }
    }

    /// Reads the body of the ranged GET of chunks `a..=b` (with the prelude when `a` is 0)
    /// into locked slots, authenticating each chunk as soon as it is complete.
    async fn fill_run(
        &self,
        o: &Opened,
        a: u64,
        b: u64,
        mut body: RangeBody,
        started: Instant,
    ) -> Result<Vec<(u64, Pinned)>, FsError> {
        let f = &o.file;
        let fail = |e: crate::Error| run_failed(o, a, b, e);
        let mut prelude_left = if a == 0 { PRELUDE } else { 0 };
        self.stats.fetches.fetch_add(1, Ordering::Relaxed);
        let mut prelude = [0u8; PRELUDE];
        let mut out = Vec::with_capacity((b - a + 1) as usize);
        let (mut index, mut filled) = (a, 0usize);
        // The current chunk's sealed bytes as slices of the body's pieces (shared, not
        // copied): decrypted straight from them into a slot once the chunk is whole.
        let mut sealed: Vec<bytes::Bytes> = Vec::new();
        let mut gathered: Option<bytes::BytesMut> = None;
        while let Some(piece) = body.next().await {
            let piece = piece.map_err(|e| fail(e.into()))?;
            self.stats
                .fetched_bytes
                .fetch_add(piece.len() as u64, Ordering::Relaxed);
            let mut data = &piece[..];
            if prelude_left > 0 {
                let take = prelude_left.min(data.len());
                prelude[PRELUDE - prelude_left..PRELUDE - prelude_left + take]
                    .copy_from_slice(&data[..take]);
                prelude_left -= take;
                data = &data[take..];
                if prelude_left == 0 {
                    f.check_prelude(&prelude).map_err(fail)?;
                }
            }
            while !data.is_empty() {
                if index > b {
                    return Err(fail(crate::Error::integrity(
                        &f.key,
                        "ranged GET returned extra bytes",
                    )));
                }
                let need = f.layout.chunk_cipher_len(index) as usize;
                if need > self.cache.slot_size() {
                    return Err(fail(crate::Error::integrity(
                        &f.key,
                        format!(
                            "chunk of {need} bytes does not fit a cache slot of {}",
                            self.cache.slot_size()
                        ),
                    )));
                }
                let take = (need - filled).min(data.len());
                let at = piece.len() - data.len();
                match gathered.as_mut() {
                    Some(g) => g.extend_from_slice(&data[..take]),
                    None => {
                        sealed.push(piece.slice(at..at + take));
                        // A store that dribbles the body in small pieces must not make us keep
                        // a handle per piece: past MAX_PIECES, the rest of the chunk is copied
                        // into one buffer (of the chunk's size, which the manifest bounds).
                        if sealed.len() > MAX_PIECES {
                            let mut g = bytes::BytesMut::with_capacity(need);
                            for p in sealed.drain(..) {
                                g.extend_from_slice(&p);
                            }
                            gathered = Some(g);
                        }
                    }
                }
                filled += take;
                data = &data[take..];
                if filled == need {
                    let parts = match gathered.take() {
                        Some(g) => vec![g.freeze()],
                        None => std::mem::take(&mut sealed),
                    };
                    let (slot, len) = self.open_fetched(o, index, parts).await?;
                    if index == b {
                        // Before the commit: a reader can see the chunk from then on, and
                        // the metrics should already count the run.
                        self.stats.fetch_latency.observe(started.elapsed());
                    }
                    out.push((index, slot.commit(chunk_key(o, index), len)));
                    index += 1;
                    filled = 0;
                }
            }
        }
        if index != b + 1 || prelude_left > 0 {
            return Err(fail(crate::Error::integrity(
                &f.key,
                "ranged GET ended early",
            )));
        }
        Ok(out)
    }

    /// Chunk `index` of a fetch, whole in `parts` (its sealed bytes as they arrived):
    /// checked against the model manifest's digest when there is one, decrypted from the
    /// parts into a slot, and its sealed bytes handed to the cache directory once they have
    /// authenticated. Returns the filled slot and the plaintext length, for the caller to
    /// commit. A chunk that fails is logged and its slot wiped.
    async fn open_fetched(
        &self,
        o: &Opened,
        index: u64,
        parts: Vec<bytes::Bytes>,
    ) -> Result<(crate::cache::Reservation, usize), FsError> {
        let f = &o.file;
        let need = f.layout.chunk_cipher_len(index) as usize;
        // The decrypt writes the plaintext only (aws-lc's streaming path does not copy the
        // tag in), so that is all the slot's evicted chunk gets overwritten with; it runs
        // at once, with no await between this reservation and it.
        let plain = f.layout.chunk_plain_len(index);
        let mut slot = self.reserve_slot(plain).await?;
        // Bound for the cache directory (never chunk 0: it is always read from the store)
        // and room in its queue: the body is copied into the entry's buffer, the body's
        // buffers go back to the HTTP client, and the chunk is checked and decrypted from
        // that copy while it is in the CPU cache. Else straight from the body's pieces.
        // (A body of the wrong length is copied too, and fails the open below unwritten.)
        let addr = o.addresses.as_ref().and_then(|a| a.get(index as usize));
        let held = match (&self.disk, addr) {
            (Some(d), Some(a)) if index > 0 => d.hold(&parts).map(|p| (d, a, p)),
            _ => None,
        };
        let parts = if held.is_some() { Vec::new() } else { parts };
        let views: Vec<&[u8]> = match &held {
            Some((_, _, p)) => vec![p.bytes()],
            None => parts.iter().map(|p| &p[..]).collect(),
        };
        // Under --trust-signer or --model-digest the manifest's digest of this sealed chunk
        // first: a DEK holder can make a chunk that authenticates, not one with the digest
        // the publisher signed or the operator pinned.
        let listed = match o.digests.as_ref().map(|d| d.get(index as usize)) {
            Some(Some(d)) if crate::crypto::chunk_digest_of(&views) == *d => Ok(()),
            Some(_) => Err(crate::Error::integrity(
                &f.key,
                format!("chunk {index} differs from the model manifest"),
            )),
            None => Ok(()),
        };
        match listed.and_then(|()| f.open_chunk_from(index, &views, &mut slot.buf()[..need])) {
            // Revoked while this chunk was being decrypted: never published (the
            // reservation is wiped as it drops).
            Ok(_) if o.is_revoked() => Err(o.revoked_error()),
            Ok(len) => {
                drop(views);
                if let Some((d, addr, p)) = held {
                    d.submit(addr, p);
                }
                Ok((slot, len))
            }
            Err(e @ crate::Error::Revoked { .. }) => Err(FsError::from(e)),
            Err(e) => {
                self.stats.auth_failures.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(file = %f.key, chunk = index, reason = %e, "chunk failed authentication");
                Err(FsError::Io(e.to_string()))
            }
        }
    }

    /// A cache slot whose first `fills` bytes the caller overwrites
    /// ([`crate::cache::ChunkCache::reserve`]), waiting (bounded) while readers hold every
    /// slot pinned.
    async fn reserve_slot(&self, fills: usize) -> Result<crate::cache::Reservation, FsError> {
        let deadline = tokio::time::Instant::now() + SLOT_WAIT;
        loop {
            if let Some(r) = self.cache.reserve(fills) {
                return Ok(r);
            }
            if tokio::time::Instant::now() > deadline {
                return Err(FsError::Io(
                    "every cache slot stayed in use: raise --cache-size".into(),
                ));
            }
            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
        }
    }

    /// Sequential readers get a window that doubles per read up to the budget; any other
    /// access resets it (a seek cancels read-ahead; random readers fetch only what they touch).
    /// The budget is a quarter of the cache for one reader, and half of it shared among the
    /// handles reading now (within [`ACTIVE`]; handles kept open and idle, as an mmap
    /// loader's, do not count): 8 shards read at once must not prefetch 8 quarters of the
    /// cache, each evicting the others' read-ahead before it is read (measured: half the
    /// throughput of reading them one after another).
    fn prefetch(self: &Arc<Self>, h: &Handle, offset: u64, len: u64, last_read: u64) {
        let layout = h.opened.file.layout;
        let chunk = layout.chunk_size();
        let slots = self.cache.slots() as u64;
        let (from, to) = {
            let mut p = lock(&h.prefetch);
            let now = std::time::Instant::now();
            if !p.active(now) {
                // A reader starts: counted at once (`sweep` recounts every second).
                self.active_readers.fetch_add(1, Ordering::Relaxed);
            }
            p.last = Some(now);
            let readers = self.active_readers.load(Ordering::Relaxed).max(1) as u64;
            let budget = (slots / 4).min(slots / 2 / readers).max(2);
            let max_window = (self.config.max_prefetch / chunk).clamp(1, budget);
            let sequential = offset + chunk >= p.next && offset <= p.next + chunk && p.next > 0;
            p.next = offset + len;
            if !sequential {
                p.window = 0;
                p.ahead = None;
                if offset != 0 {
                    return;
                }
            }
            p.window = (p.window * 2).max(2).min(max_window);
            let from = p.ahead.map_or(last_read + 1, |a| a.max(last_read) + 1);
            let to = (last_read + p.window).min(layout.last_index());
            // Top the window up in whole ranged GETs (`max_fetch`), not one chunk per read:
            // a steady reader would otherwise cost one 1-chunk GET per chunk it reads.
            let batch = (self.config.max_fetch / chunk).clamp(1, (p.window / 2).max(1));
            if from > to || (to - from + 1 < batch && to < layout.last_index()) {
                return;
            }
            p.ahead = Some(to);
            (from, to)
        };
        self.start_fetch(&h.opened, from, to);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fs::{MountConfig, ROOT};

    /// A slot keeps nothing of the chunk it held before: reading a file of 20 full chunks
    /// and a short tail through 8 slots, twice, evicts chunks into slots that get shorter
    /// ones, and no byte past any published chunk (nor in a free slot) is left non-zero.
    /// The plaintext has no zero byte, so a leftover shows. (Before the fix, aws-lc's
    /// streaming decrypt left 16 bytes of the evicted chunk past the tail chunk: the slot
    /// had been reserved for the sealed length, tag included, which it does not write.)
    /// Whichever backend the process picks; `SEALFS_AEAD=ring` or `aws-lc` forces one.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_evicted_chunk_leaves_nothing_in_its_slot() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src");
        std::fs::create_dir_all(&src).unwrap();
        let len = 20 * 16384 + 123;
        let data: Vec<u8> = (0..len).map(|i| (i % 251) as u8 | 1).collect();
        std::fs::write(src.join("f"), &data).unwrap();
        let kp = dir.path().join("k");
        crate::keys::file::keygen(&kp).unwrap();
        let ring = crate::keys::Keyring::resolve(&[crate::keys::KeySpec::File(kp)])
            .await
            .unwrap();
        let dest = crate::store::Location::parse(&dir.path().join("sealed").display().to_string())
            .await
            .unwrap();
        let opts = crate::seal::SealOptions {
            chunk_log2: 14,
            ..Default::default()
        };
        crate::seal::seal(&src, &dest, &ring, &opts, &crate::seal::Cancel::never())
            .await
            .unwrap();
        let config = MountConfig {
            cache_size: 8 * 16400,
            max_chunk_log2: 14,
            max_prefetch: 2 * 16384,
            max_fetch: 2 * 16384,
            ..Default::default()
        };
        let fs = SealFs::new(dest.store, &dest.prefix, ring, config)
            .await
            .unwrap();
        let ino = fs.lookup(ROOT, "f").unwrap().ino;
        let fh = fs.open(ino, (0, 0)).await.unwrap();
        for pass in 0..2 {
            let mut off = 0u64;
            while off < len as u64 {
                let r = fs.read(fh, off, 16384).await.unwrap();
                let n = r.bytes().len();
                assert!(
                    r.bytes() == &data[off as usize..off as usize + n],
                    "{pass} at {off}"
                );
                off += n as u64;
            }
        }
        // Fetches started by read-ahead may still be filling: let them land.
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        assert!(fs.cache.stats().evictions > 20, "{:?}", fs.cache.stats());
        assert_eq!(fs.cache.leftover_bytes(), 0);
        fs.release(fh);
    }
}
