//! Plaintext DEKs live only here: in an mlock'ed, MADV_DONTDUMP page, zeroized on drop,
//! with no Clone, Debug or Display.

use super::locked::{LockError, LockedRegion};

/// Length of a data encryption key (AES-256).
pub const DEK_LEN: usize = 32;

/// A data encryption key in locked memory (its own page).
pub struct Dek {
    region: LockedRegion,
}

impl Dek {
    /// Copies `bytes` into a fresh locked page, then zeroizes the caller's copy.
    pub fn from_slice_zeroizing(bytes: &mut [u8]) -> Result<Self, LockError> {
        assert_eq!(bytes.len(), DEK_LEN, "BUG: DEK of wrong length");
        let mut dek = Self {
            region: LockedRegion::new(DEK_LEN)?,
        };
        dek.bytes_mut().copy_from_slice(bytes);
        zeroize::Zeroize::zeroize(bytes);
        Ok(dek)
    }

    /// A fresh random DEK.
    pub fn random() -> Result<Self, LockError> {
        let mut dek = Self {
            region: LockedRegion::new(DEK_LEN)?,
        };
        super::random_bytes(dek.bytes_mut());
        Ok(dek)
    }

    fn bytes_mut(&mut self) -> &mut [u8] {
        // SAFETY: the region is at least DEK_LEN bytes and &mut self makes this exclusive.
        #[allow(unsafe_code)]
        unsafe {
            std::slice::from_raw_parts_mut(self.region.at(0), DEK_LEN)
        }
    }

    /// The key bytes. Do not copy them anywhere that is not zeroized.
    pub fn expose(&self) -> &[u8; DEK_LEN] {
        // SAFETY: DEK_LEN initialized bytes live as long as self; only &mut self writes them.
        #[allow(unsafe_code)]
        unsafe {
            &*(self.region.at(0) as *const [u8; DEK_LEN])
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
