//! Locked memory for secrets and plaintext (DEKs, decrypted chunks): `mmap` + `mlock` +
//! `MADV_DONTDUMP`, zeroized and unmapped on drop. With `fuse::session` (fork, prctl) the
//! only `unsafe` in sealfs.

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
            std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len).zeroize();
            libc::munlock(self.ptr.as_ptr().cast(), self.len);
            libc::munmap(self.ptr.as_ptr().cast(), self.len);
        }
    }
}
