//! Locked memory for secrets and plaintext (DEKs, derived key schedules, decrypted chunks):
//! `mmap` + `mlock` + `MADV_DONTDUMP`, zeroized and unmapped on drop. Other `unsafe` in
//! sealfs is confined to calls with no safe wrapper (fork, prctl, pre_exec, descriptors
//! inherited or passed by SCM_RIGHTS, the aws-lc AEAD context), each with its SAFETY note.

use std::marker::PhantomData;
use std::ops::{Deref, DerefMut};

use zeroize::Zeroize;

/// Why locked memory could not be had.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LockError {
    #[error("mmap of locked memory failed: {0}")]
    Map(std::io::Error),
    #[error(
        "mlock refused ({0}): raise the locked-memory limit (`ulimit -l`, or `LimitMEMLOCK=` in the systemd unit)"
    )]
    Lock(std::io::Error),
}

pub struct LockedRegion {
    ptr: std::ptr::NonNull<u8>,
    len: usize,
}

// SAFETY: the region is plain memory owned by this value; its users (Dek, ChunkCache)
// hand out disjoint parts under their own discipline (see their docs).
unsafe impl Send for LockedRegion {}
// SAFETY: as above.
unsafe impl Sync for LockedRegion {}

impl LockedRegion {
    /// Maps and locks `len` bytes. Fails with a message naming the fix when mlock is refused.
    pub fn new(len: usize) -> Result<Self, LockError> {
        let len = len.max(1);
        // SAFETY: anonymous private mapping; arguments valid; result checked.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(LockError::Map(std::io::Error::last_os_error()));
        }
        // Huge pages where the kernel can give them, asked for before mlock faults the pages
        // in: the kernel pins reply buffers page by page on every read, and with 4 KiB pages
        // that pinning was 7 % of the daemon's time on a cold read (issue 22). Best effort.
        // SAFETY: p/len is our fresh mapping.
        unsafe { libc::madvise(p, len, libc::MADV_HUGEPAGE) };
        // SAFETY: p/len is our fresh mapping.
        if unsafe { libc::mlock(p, len) } != 0 {
            let e = std::io::Error::last_os_error();
            // SAFETY: unmapping our own mapping, never used again.
            unsafe { libc::munmap(p, len) };
            return Err(LockError::Lock(e));
        }
        // SAFETY: p/len is our mapping. Best effort (kernels before 3.4 lack it).
        unsafe { libc::madvise(p, len, libc::MADV_DONTDUMP) };
        Ok(Self {
            ptr: std::ptr::NonNull::new(p.cast()).expect("mmap returned non-null"),
            len,
        })
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// A raw pointer to byte `offset`. Callers uphold exclusivity (cache/mod.rs).
    pub fn at(&self, offset: usize) -> *mut u8 {
        assert!(
            offset <= self.len,
            "BUG: offset {offset} outside the locked region"
        );
        // SAFETY: within the mapping, checked above.
        unsafe { self.ptr.as_ptr().add(offset) }
    }
}

impl Drop for LockedRegion {
    fn drop(&mut self) {
        // SAFETY: we own the whole mapping; nothing else refers to it once we are dropped.
        unsafe {
            let bytes = std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len);
            bytes.zeroize();
            #[cfg(test)]
            tests::LAST_UNMAPPED.with(|l| *l.borrow_mut() = Some(bytes.to_vec()));
            libc::munlock(self.ptr.as_ptr().cast(), self.len);
            libc::munmap(self.ptr.as_ptr().cast(), self.len);
        }
    }
}

/// A `T` in its own locked region (mlock'ed, `MADV_DONTDUMP`): never swapped, never in a
/// core dump; dropped in place, then its bytes are zeroized and the page unmapped. It never
/// moves once placed, so a `T` may be initialized in place through `DerefMut` (the aws-lc
/// AEAD context is) and may hold its own address.
///
/// Only worth it for a `T` that keeps its secret inline: a type that points to the heap
/// (`Vec`, `Box`, an FFI handle) would put only the pointer here. `T` passes through the
/// stack on its way in ([`Locked::new`] takes it by value); build large secrets in place.
pub struct Locked<T> {
    region: LockedRegion,
    _owns: PhantomData<T>,
}

// SAFETY: a Locked<T> owns its T exactly as a Box<T> does.
unsafe impl<T: Send> Send for Locked<T> {}
// SAFETY: &Locked<T> only gives out &T.
unsafe impl<T: Sync> Sync for Locked<T> {}

impl<T> Locked<T> {
    /// Moves `value` into a fresh locked page (or pages, for a `T` over a page).
    pub fn new(value: T) -> Result<Self, LockError> {
        const {
            assert!(
                std::mem::align_of::<T>() <= 4096,
                "mmap gives page alignment only"
            )
        };
        let region = LockedRegion::new(std::mem::size_of::<T>())?;
        // SAFETY: the mapping is page-aligned (so aligned for T, asserted above), at least
        // size_of::<T>() bytes, writable, and not yet referenced by anything.
        unsafe { region.at(0).cast::<T>().write(value) };
        Ok(Self {
            region,
            _owns: PhantomData,
        })
    }

    /// The address of the `T` (for tests that check where secrets live).
    pub fn addr(&self) -> usize {
        self.region.at(0) as usize
    }
}

impl<T> Deref for Locked<T> {
    type Target = T;
    fn deref(&self) -> &T {
        // SAFETY: a T was written at offset 0 in `new` and lives until `drop`; shared
        // access follows &self.
        unsafe { &*self.region.at(0).cast::<T>() }
    }
}

impl<T> DerefMut for Locked<T> {
    fn deref_mut(&mut self) -> &mut T {
        // SAFETY: as in `deref`; &mut self makes this access exclusive.
        unsafe { &mut *self.region.at(0).cast::<T>() }
    }
}

impl<T> Drop for Locked<T> {
    fn drop(&mut self) {
        // SAFETY: the T written in `new` is dropped exactly once, here; the region (dropped
        // after this, zeroizing every byte) is not read as a T again.
        unsafe { std::ptr::drop_in_place(self.region.at(0).cast::<T>()) };
    }
}

/// Whether the page holding `addr` is locked in RAM and excluded from core dumps, as
/// `/proc/self/smaps` reports it (`Locked:` covers the whole mapping, `VmFlags` has `lo`
/// and `dd`). False when `addr` is not mapped.
#[cfg(test)]
pub(crate) fn is_locked_undumpable(addr: usize) -> bool {
    let Ok(smaps) = std::fs::read_to_string("/proc/self/smaps") else {
        return false;
    };
    let mut inside = false;
    let (mut size, mut locked) = (None, None);
    for line in smaps.lines() {
        let head = line.split_whitespace().next().unwrap_or("");
        if let Some((a, b)) = head.split_once('-') {
            if let (Ok(a), Ok(b)) = (usize::from_str_radix(a, 16), usize::from_str_radix(b, 16)) {
                inside = (a..b).contains(&addr);
                continue;
            }
        }
        if !inside {
            continue;
        }
        let kb = |l: &str| -> Option<u64> { l.split_whitespace().nth(1)?.parse().ok() };
        if line.starts_with("Size:") {
            size = kb(line);
        } else if line.starts_with("Locked:") {
            locked = kb(line);
        } else if let Some(flags) = line.strip_prefix("VmFlags:") {
            let f: Vec<&str> = flags.split_whitespace().collect();
            return size.is_some() && size == locked && f.contains(&"lo") && f.contains(&"dd");
        }
    }
    false
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::cell::RefCell;
    use std::sync::Arc;

    thread_local! {
        /// The bytes of the last region this thread dropped, read just before munmap.
        pub(crate) static LAST_UNMAPPED: RefCell<Option<Vec<u8>>> = const { RefCell::new(None) };
    }

    #[test]
    fn locked_value_lives_in_a_locked_page_and_is_dropped_and_zeroized() {
        let witness = Arc::new(());
        let v = Locked::new((Arc::clone(&witness), [0xa5u8; 600])).unwrap();
        assert!(
            is_locked_undumpable(v.addr()),
            "not in a locked, no-dump page"
        );
        assert_eq!(v.1, [0xa5; 600]);
        let on_stack = [0xa5u8; 600];
        assert!(
            !is_locked_undumpable(on_stack.as_ptr() as usize),
            "smaps check can fail"
        );
        assert_eq!(Arc::strong_count(&witness), 2);
        LAST_UNMAPPED.with(|l| l.borrow_mut().take());
        drop(v);
        assert_eq!(Arc::strong_count(&witness), 1, "T was dropped in place");
        let bytes = LAST_UNMAPPED
            .with(|l| l.borrow_mut().take())
            .expect("region dropped on this thread");
        assert!(bytes.len() >= 600 + std::mem::size_of::<Arc<()>>());
        assert!(bytes.iter().all(|&b| b == 0), "bytes left after drop");
    }
}
