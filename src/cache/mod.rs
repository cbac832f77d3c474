//! Decrypted chunks live only here: a fixed number of equal slots in one locked region,
//! evicted least-recently-used, zeroized on eviction and on drop.
//!
//! Discipline that makes the raw slot access sound: a slot is either
//! - `Free`: nobody holds it;
//! - `Filling`: exactly one [`Reservation`] holds it and may write it;
//! - `Ready`: read-only; each [`Pinned`] holds a pin, and a slot is only evicted (and so
//!   written again) when it has no pins.
//!
//! All state changes happen under the one mutex.

pub mod disk;
pub mod warm;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use zeroize::Zeroize;

use crate::crypto::locked::{LockError, LockedRegion};

/// Fewest slots a cache has, whatever `--cache-size` says.
pub const MIN_SLOTS: usize = 8;

/// (open-file sequence number, chunk index).
pub type ChunkKey = (u64, u64);

#[derive(Clone, Copy, PartialEq, Eq)]
enum State {
    Free,
    Filling,
    Ready,
}

struct Slot {
    state: State,
    key: ChunkKey,
    len: usize,
    pins: u32,
    tick: u64,
    /// Its file was dropped while a reader still had it pinned: wipe on the last unpin.
    doomed: bool,
}

struct Inner {
    map: HashMap<ChunkKey, usize>,
    slots: Vec<Slot>,
    tick: u64,
    hits: u64,
    misses: u64,
    evictions: u64,
}

/// Counters for metrics and tests.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CacheStats {
    pub hits: u64,
    pub misses: u64,
    pub evictions: u64,
    pub ready: usize,
}

pub struct ChunkCache {
    region: LockedRegion,
    slot_size: usize,
    inner: Mutex<Inner>,
}

impl ChunkCache {
    /// `capacity` bytes of locked memory cut into slots of `slot_size` bytes (at least
    /// [`MIN_SLOTS`], so that concurrent readers and read-ahead always make progress).
    pub fn new(capacity: usize, slot_size: usize) -> Result<Arc<Self>, LockError> {
        let n = (capacity / slot_size).max(MIN_SLOTS);
        let region = LockedRegion::new(n * slot_size)?;
        let slots = (0..n)
            .map(|_| Slot {
                state: State::Free,
                key: (0, 0),
                len: 0,
                pins: 0,
                tick: 0,
                doomed: false,
            })
            .collect();
        let inner = Inner {
            map: HashMap::new(),
            slots,
            tick: 0,
            hits: 0,
            misses: 0,
            evictions: 0,
        };
        Ok(Arc::new(Self {
            region,
            slot_size,
            inner: Mutex::new(inner),
        }))
    }

    pub fn slot_size(&self) -> usize {
        self.slot_size
    }

    pub fn slots(&self) -> usize {
        self.region.len() / self.slot_size
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic while holding the lock leaves consistent state (no partial updates).
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn stats(&self) -> CacheStats {
        let g = self.lock();
        let ready = g.slots.iter().filter(|s| s.state == State::Ready).count();
        CacheStats {
            hits: g.hits,
            misses: g.misses,
            evictions: g.evictions,
            ready,
        }
    }

    /// True if the chunk is cached (without touching its recency).
    pub fn contains(&self, key: ChunkKey) -> bool {
        self.lock().map.contains_key(&key)
    }

    /// Pins a cached chunk.
    pub fn get(self: &Arc<Self>, key: ChunkKey) -> Option<Pinned> {
        let mut g = self.lock();
        g.tick += 1;
        let tick = g.tick;
        let &i = g.map.get(&key)?;
        g.hits += 1;
        let s = &mut g.slots[i];
        s.pins += 1;
        s.tick = tick;
        Some(Pinned {
            cache: self.clone(),
            slot: i,
            len: s.len,
        })
    }

    /// A slot to fill: a free one, or the least recently used unpinned chunk, whose bytes
    /// past `fills` are zeroized at once. The caller overwrites the first `fills` bytes
    /// (the chunk it decrypts there at once) before it commits; a reservation dropped
    /// uncommitted wipes the whole slot. Zeroing bytes about to be overwritten was a memset
    /// of every evicted chunk, 3–8 % of a cold read's daemon CPU in the profiles of
    /// docs/PERFORMANCE.md. `None` when every slot is pinned or filling.
    pub fn reserve(self: &Arc<Self>, fills: usize) -> Option<Reservation> {
        let (i, stale) = {
            let mut g = self.lock();
            let (i, stale) = match g.slots.iter().position(|s| s.state == State::Free) {
                Some(i) => (i, 0), // wiped when it was freed
                None => {
                    let (i, _) = g
                        .slots
                        .iter()
                        .enumerate()
                        .filter(|(_, s)| s.state == State::Ready && s.pins == 0)
                        .min_by_key(|(_, s)| s.tick)?;
                    g.evictions += 1;
                    let key = g.slots[i].key;
                    g.map.remove(&key);
                    (i, g.slots[i].len)
                }
            };
            g.slots[i].state = State::Filling;
            g.slots[i].doomed = false;
            g.misses += 1; // every reservation is a chunk that had to be fetched
            (i, stale)
        };
        // What the fill will not overwrite is wiped before the slot is handed out, outside
        // the lock. Unpublished and `Filling`, the slot is reachable by no one else.
        self.wipe(i, fills.min(stale), stale);
        Some(Reservation {
            cache: self.clone(),
            slot: i,
            done: false,
        })
    }

    /// Drops every chunk of one open file (when its DEK is released). A chunk a reader
    /// still has pinned goes when that pin does.
    pub fn remove_file(&self, seq: u64) {
        let mut g = self.lock();
        let keys: Vec<_> = g.map.keys().filter(|k| k.0 == seq).copied().collect();
        for k in keys {
            let i = g.map[&k];
            if g.slots[i].pins == 0 {
                self.free(&mut g, i);
            } else {
                g.slots[i].doomed = true;
            }
        }
    }

    /// Unpublishes a ready, unpinned slot and wipes it.
    fn free(&self, g: &mut Inner, i: usize) {
        let key = g.slots[i].key;
        g.map.remove(&key);
        self.wipe(i, 0, g.slots[i].len);
        g.slots[i].state = State::Free;
        g.slots[i].doomed = false;
    }

    /// Zeroizes bytes `from..to` of a slot.
    fn wipe(&self, slot: usize, from: usize, to: usize) {
        let to = to.min(self.slot_size);
        if from >= to {
            return;
        }
        // SAFETY: called for a slot no reference points into: under the mutex for one that
        // is neither pinned nor filling, or by `reserve` for the unpublished slot it owns.
        unsafe {
            std::slice::from_raw_parts_mut(self.region.at(slot * self.slot_size + from), to - from)
        }
        .zeroize();
    }
}

/// Exclusive write access to one slot until committed (becomes `Ready`) or dropped (wiped).
pub struct Reservation {
    cache: Arc<ChunkCache>,
    slot: usize,
    done: bool,
}

impl Reservation {
    pub fn buf(&mut self) -> &mut [u8] {
        let c = &self.cache;
        // SAFETY: the slot is `Filling` and this reservation is its only holder.
        unsafe { std::slice::from_raw_parts_mut(c.region.at(self.slot * c.slot_size), c.slot_size) }
    }

    /// Publishes the first `len` bytes as chunk `key` and pins it for the caller.
    pub fn commit(mut self, key: ChunkKey, len: usize) -> Pinned {
        let cache = self.cache.clone();
        let mut g = cache.lock();
        g.tick += 1;
        let tick = g.tick;
        if let Some(&old) = g.map.get(&key) {
            // Filled twice (a race between a reader and the prefetcher): keep the first.
            let s = &mut g.slots[old];
            s.pins += 1;
            s.tick = tick;
            let len = s.len;
            drop(g);
            return Pinned {
                cache,
                slot: old,
                len,
            };
        }
        let s = &mut g.slots[self.slot];
        *s = Slot {
            state: State::Ready,
            key,
            len,
            pins: 1,
            tick,
            doomed: false,
        };
        g.map.insert(key, self.slot);
        self.done = true;
        Pinned {
            cache: cache.clone(),
            slot: self.slot,
            len,
        }
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        let size = self.cache.slot_size;
        self.buf()[..size].zeroize();
        let mut g = self.cache.lock();
        g.slots[self.slot].state = State::Free;
    }
}

/// A pinned, authenticated, decrypted chunk.
pub struct Pinned {
    cache: Arc<ChunkCache>,
    slot: usize,
    len: usize,
}

impl Pinned {
    pub fn bytes(&self) -> &[u8] {
        let c = &self.cache;
        // SAFETY: the slot is `Ready` and pinned, so nobody writes it while we live.
        unsafe { std::slice::from_raw_parts(c.region.at(self.slot * c.slot_size), self.len) }
    }
}

impl Clone for Pinned {
    fn clone(&self) -> Self {
        let mut g = self.cache.lock();
        g.slots[self.slot].pins += 1;
        drop(g);
        Self {
            cache: self.cache.clone(),
            slot: self.slot,
            len: self.len,
        }
    }
}

impl Drop for Pinned {
    fn drop(&mut self) {
        let mut g = self.cache.lock();
        let s = &mut g.slots[self.slot];
        s.pins -= 1;
        if s.pins == 0 && s.doomed {
            self.cache.free(&mut g, self.slot);
        }
    }
}

#[cfg(test)]
impl ChunkCache {
    /// Non-zero bytes outside what each slot publishes: a ready chunk's bytes past its
    /// length, or any byte of a free slot (left over from an evicted or dropped chunk).
    pub(crate) fn leftover_bytes(&self) -> usize {
        let g = self.lock();
        g.slots
            .iter()
            .enumerate()
            .filter(|(_, s)| s.state != State::Filling)
            .map(|(i, s)| {
                let from = if s.state == State::Ready { s.len } else { 0 };
                // SAFETY: test only; under the mutex nothing writes a ready or free slot.
                let b = unsafe {
                    std::slice::from_raw_parts(self.region.at(i * self.slot_size), self.slot_size)
                };
                b[from..].iter().filter(|&&x| x != 0).count()
            })
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lru_eviction_skips_pinned_and_wipes() {
        let c = ChunkCache::new(3 * 64, 64).unwrap();
        assert_eq!(c.slots(), MIN_SLOTS);
        let mut pins = Vec::new();
        for i in 0..MIN_SLOTS as u64 {
            let mut r = c.reserve(0).unwrap();
            r.buf()[..4].copy_from_slice(&[i as u8; 4]);
            pins.push(r.commit((1, i), 4));
        }
        assert!(c.reserve(0).is_none(), "all pinned");
        let extra = pins[0].clone();
        drop(pins);
        assert_eq!(c.get((1, 0)).unwrap().bytes(), &[0u8; 4]); // touch 0: 1 is now LRU
        let mut r = c.reserve(2).unwrap();
        assert!(!c.contains((1, 1)), "LRU chunk evicted");
        assert_eq!(
            &r.buf()[..4],
            &[1, 1, 0, 0],
            "past what the fill overwrites, wiped before its slot is handed out"
        );
        assert!(c.contains((1, 0)) && c.contains((1, 2)));
        drop(extra);
        let at = r.slot;
        drop(r); // dropped unfilled: the slot is free again, not published, and wiped whole
                 // SAFETY: test only; the slot is free, nothing references it.
        let bytes = unsafe { std::slice::from_raw_parts(c.region.at(at * 64), 64) };
        assert_eq!(bytes, &[0u8; 64]);
        assert_eq!(c.stats().evictions, 1);
        c.remove_file(1);
        assert!(!c.contains((1, 0)) && !c.contains((1, 2)));
    }

    #[test]
    fn a_chunk_pinned_when_its_file_goes_is_wiped_at_the_last_unpin() {
        let c = ChunkCache::new(8 * 16, 16).unwrap();
        let mut r = c.reserve(0).unwrap();
        r.buf()[..4].copy_from_slice(b"text");
        let pin = r.commit((3, 0), 4);
        let second = pin.clone();
        c.remove_file(3);
        assert!(c.contains((3, 0)), "still readable while pinned");
        assert_eq!(second.bytes(), b"text");
        drop(pin);
        assert!(c.contains((3, 0)), "one pin left");
        drop(second);
        assert!(
            !c.contains((3, 0)),
            "gone with the last pin, not left for LRU eviction"
        );
        assert_eq!(c.stats().ready, 0);
        let slot = &c.region;
        // SAFETY: test only; no pins or reservations remain.
        let bytes = unsafe { std::slice::from_raw_parts(slot.at(0), 16) };
        assert_eq!(bytes, &[0u8; 16], "wiped");
    }

    #[test]
    fn double_fill_keeps_the_first() {
        let c = ChunkCache::new(4 * 16, 16).unwrap();
        let mut a = c.reserve(0).unwrap();
        let mut b = c.reserve(0).unwrap();
        a.buf()[0] = 1;
        b.buf()[0] = 2;
        let pa = a.commit((5, 5), 1);
        let pb = b.commit((5, 5), 1);
        assert_eq!(pa.bytes(), &[1]);
        assert_eq!(pb.bytes(), &[1]);
    }
}
