//! Mounting a FUSE connection that another process serves (`sealfs mount --fuse-fd`): the
//! privileged half of the CSI node plugin. Open `/dev/fuse`, `mount(2)` it read-only at the
//! target as `fuse.sealfs`, return the descriptor to hand over; and the lazy unmount. Needs
//! CAP_SYS_ADMIN; the process that then serves the connection needs neither that nor
//! `/dev/fuse`.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

/// How the connection is mounted. Always `ro,nosuid,nodev,noatime` and
/// `default_permissions` (the kernel checks the modes the daemon shows).
#[derive(Debug, Clone)]
pub struct FuseMount {
    /// The mount's source as mountinfo shows it (a store URI: no comma, no whitespace).
    pub source: String,
    /// Let every user through (pods run as any uid); else only root.
    pub allow_other: bool,
}

/// Opens `/dev/fuse` and mounts it at `target`; the returned descriptor is the connection
/// (close-on-exec: pass it on explicitly). On any failure nothing stays mounted.
pub fn mount(target: &Path, m: &FuseMount) -> io::Result<OwnedFd> {
    use nix::mount::MsFlags;
    if m.source.is_empty()
        || m.source
            .bytes()
            .any(|b| b == b',' || b.is_ascii_whitespace() || b == 0)
    {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "mount source must be non-empty, without commas or whitespace",
        ));
    }
    let dev = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_CLOEXEC)
        .open("/dev/fuse")?;
    let fd = OwnedFd::from(dev);
    // rootmode: a directory; user_id/group_id: the mount's owner (root, the mounter).
    let mut data = format!(
        "fd={},rootmode=40000,user_id=0,group_id=0,default_permissions",
        fd.as_raw_fd()
    );
    if m.allow_other {
        data.push_str(",allow_other");
    }
    nix::mount::mount(
        Some(m.source.as_str()),
        target,
        Some(crate::mountinfo::FS_TYPE),
        MsFlags::MS_RDONLY | MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOATIME,
        Some(data.as_str()),
    )
    .map_err(io::Error::from)?;
    Ok(fd)
}

/// Lazy unmount (`MNT_DETACH`): the path is free at once; files still open drain.
pub fn unmount(target: &Path) -> io::Result<()> {
    nix::mount::umount2(target, nix::mount::MntFlags::MNT_DETACH).map_err(io::Error::from)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_source_that_would_break_the_option_string_is_refused_before_any_open() {
        for bad in ["", "a,b", "a b", "a\nb"] {
            let e = mount(
                Path::new("/nonexistent"),
                &FuseMount {
                    source: bad.into(),
                    allow_other: false,
                },
            )
            .unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::InvalidInput, "{bad:?}");
        }
    }
}
