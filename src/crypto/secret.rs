//! Plaintext DEKs live only here: in an mlock'ed, MADV_DONTDUMP page, zeroized on drop,
//! with no Clone, Debug or Display.

use zeroize::Zeroize;

/// Length of a data encryption key (AES-256).
pub const DEK_LEN: usize = 32;

/// Why locked memory could not be had.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LockError {
    #[error("mmap of a key page failed: {0}")]
    Map(std::io::Error),
    #[error(
        "mlock refused ({0}): raise the locked-memory limit (`ulimit -l`, or `LimitMEMLOCK=` in the systemd unit)"
    )]
    Lock(std::io::Error),
}

/// A data encryption key in locked memory.
pub struct Dek {
    page: std::ptr::NonNull<u8>,
}

// SAFETY: the page is owned exclusively by this value; &Dek only gives shared reads.
unsafe impl Send for Dek {}
// SAFETY: as above; no interior mutability.
unsafe impl Sync for Dek {}

fn page_size() -> usize {
    // SAFETY: sysconf has no memory-safety preconditions.
    let n = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if n > 0 {
        n as usize
    } else {
        4096
    }
}

impl Dek {
    /// Copies `bytes` into a fresh locked page, then zeroizes the caller's copy.
    pub fn from_slice_zeroizing(bytes: &mut [u8]) -> Result<Self, LockError> {
        assert_eq!(bytes.len(), DEK_LEN, "BUG: DEK of wrong length");
        let dek = Self::alloc()?;
        // SAFETY: the page is at least DEK_LEN bytes, writable, and exclusively ours.
        unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), dek.page.as_ptr(), DEK_LEN) };
        bytes.zeroize();
        Ok(dek)
    }

    /// A fresh random DEK.
    pub fn random() -> Result<Self, LockError> {
        let dek = Self::alloc()?;
        // SAFETY: as in from_slice_zeroizing.
        let s = unsafe { std::slice::from_raw_parts_mut(dek.page.as_ptr(), DEK_LEN) };
        super::random_bytes(s);
        Ok(dek)
    }

    fn alloc() -> Result<Self, LockError> {
        let len = page_size();
        // SAFETY: anonymous private mapping; arguments are valid; result checked below.
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
        // SAFETY: p is a live mapping of len bytes that we own.
        let locked = unsafe { libc::mlock(p, len) };
        if locked != 0 {
            let err = std::io::Error::last_os_error();
            // SAFETY: unmapping the mapping made above, never used again.
            unsafe { libc::munmap(p, len) };
            return Err(LockError::Lock(err));
        }
        // Keep the key out of core dumps. Best effort: older kernels lack it, and the
        // daemon also disables dumps as a whole.
        // SAFETY: p/len describe our mapping.
        unsafe { libc::madvise(p, len, libc::MADV_DONTDUMP) };
        Ok(Self {
            page: std::ptr::NonNull::new(p.cast()).expect("mmap returned non-null"),
        })
    }

    /// The key bytes. Do not copy them anywhere that is not zeroized.
    pub fn expose(&self) -> &[u8; DEK_LEN] {
        // SAFETY: the page holds DEK_LEN initialized bytes for the life of self.
        unsafe { &*(self.page.as_ptr() as *const [u8; DEK_LEN]) }
    }
}

impl Drop for Dek {
    fn drop(&mut self) {
        let len = page_size();
        // SAFETY: the page is ours and DEK_LEN bytes long; volatile zeroing via zeroize.
        unsafe { std::slice::from_raw_parts_mut(self.page.as_ptr(), DEK_LEN) }.zeroize();
        // SAFETY: unlock and unmap the mapping made in alloc(); self is not used again.
        unsafe {
            libc::munlock(self.page.as_ptr().cast(), len);
            libc::munmap(self.page.as_ptr().cast(), len);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copies_and_zeroizes_the_source() {
        let mut src = [0xabu8; 32];
        let dek = Dek::from_slice_zeroizing(&mut src).unwrap();
        assert_eq!(src, [0u8; 32]);
        assert_eq!(dek.expose(), &[0xabu8; 32]);
        let r1 = Dek::random().unwrap();
        let r2 = Dek::random().unwrap();
        assert_ne!(r1.expose(), r2.expose());
    }
}
