//! Opening a local file that a user or a store names: a key file, a signing key, a local
//! store's object. One rule for all: never through a symlink as the last component, never
//! blocking on a FIFO (`O_NONBLOCK` has no effect on regular files), a regular file only.

use std::fs::{File, Metadata};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::Path;

/// Why [`open_regular`] refused.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("is a symbolic link; name the file itself")]
    Symlink,
    #[error("not a regular file (a FIFO, device or directory)")]
    NotRegular,
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// Opens `path` for reading as described in the module docs.
pub fn open_regular(path: &Path) -> Result<(File, Metadata), OpenError> {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path)
        .map_err(|e| match e.raw_os_error() {
            Some(libc::ELOOP) => OpenError::Symlink,
            _ => OpenError::Io(e),
        })?;
    let m = f.metadata()?;
    if !m.file_type().is_file() {
        return Err(OpenError::NotRegular);
    }
    Ok((f, m))
}

/// Reads a small secret file (a key file, a share, a PIN, a private PEM key):
/// [`read_bounded`] with [`check_private`].
pub fn read_private(
    path: &Path,
    max: usize,
    what: &str,
) -> Result<zeroize::Zeroizing<Vec<u8>>, String> {
    read_bounded(path, max, what, true)
}

/// Reads a small file a user names: [`open_regular`], then (`private`) [`check_private`] on
/// the open file (never the path again), then at most `max` bytes into a buffer sized once
/// (no reallocated copies of a secret left in freed heap) and zeroized on drop. One byte
/// more than allowed tells "too long" from "exactly at the limit"; `what` names the
/// expected file in that refusal.
pub fn read_bounded(
    path: &Path,
    max: usize,
    what: &str,
    private: bool,
) -> Result<zeroize::Zeroizing<Vec<u8>>, String> {
    use std::io::Read;
    let (mut f, meta) = open_regular(path).map_err(|e| e.to_string())?;
    if private {
        check_private(&meta)?;
    }
    let mut buf = zeroize::Zeroizing::new(vec![0u8; max + 1]);
    let mut n = 0;
    while n < buf.len() {
        match f.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.to_string()),
        }
    }
    if n > max {
        return Err(format!("longer than {max} bytes: not {what}"));
    }
    // Shrinking keeps the allocation: nothing is copied out of the zeroized buffer.
    buf.truncate(n);
    Ok(buf)
}

/// The effective uid of this process.
pub fn euid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    #[allow(unsafe_code)]
    unsafe {
        libc::geteuid()
    }
}

/// A private key file must be this user's (or root's) and closed to group and others.
pub fn check_private(m: &Metadata) -> Result<(), String> {
    let euid = euid();
    if m.uid() != euid && m.uid() != 0 {
        return Err(format!(
            "owned by uid {}, not by this user (uid {euid}) or root",
            m.uid()
        ));
    }
    if m.mode() & 0o077 != 0 {
        return Err(format!(
            "mode {:04o} gives group or others access; run `chmod 600` on it",
            m.mode() & 0o7777
        ));
    }
    Ok(())
}
