//! Writing `unseal` outputs under DEST without ever leaving it.
//!
//! DEST is opened once as a directory fd. Every path below it is reached one component at a
//! time: `mkdirat` (mode 0700) and `openat(O_DIRECTORY | O_NOFOLLOW)` relative to the
//! parent's fd, so a `..`, an empty or a `/`-carrying component is refused, and a symlink
//! anywhere under DEST (a directory component or the final name) is an error, never
//! followed. The output is written to `openat(O_CREAT | O_EXCL | O_NOFOLLOW, 0600)` in the
//! final directory's fd and `renameat`'d into place within that same fd.
//!
//! Why not `openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS)`: it needs Linux 5.6 and is
//! refused (ENOSYS) by the seccomp profiles of older container runtimes, where a fallback
//! would be needed anyway; the per-component walk gives the same guarantee with calls every
//! Linux has, and names the exact component that is a symlink.

use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::format::naming;

/// Mode of directories unseal creates (DEST included): plaintext is for the user only.
pub const DIR_MODE: libc::mode_t = 0o700;
/// Mode of files unseal writes.
pub const FILE_MODE: libc::mode_t = 0o600;

/// An open destination directory; nothing below it is reached by path.
pub struct Dest {
    fd: OwnedFd,
    shown: PathBuf,
}

/// Where one output goes: its directory (an fd under DEST) and its final name.
pub struct Target {
    dir: OwnedFd,
    name: CString,
    /// The output's path, for messages.
    pub shown: PathBuf,
}

fn io_at(path: &Path) -> impl FnOnce(io::Error) -> Error + '_ {
    move |source| Error::Io {
        path: naming::escaped(&path.display().to_string()),
        source,
    }
}

fn symlink_refused() -> io::Error {
    io::Error::other("is a symbolic link: unseal never follows links under DEST")
}

/// A single path component: non-empty, not `.` or `..`, no `/` and no NUL.
fn component(name: &str) -> io::Result<CString> {
    if name.is_empty() || name == "." || name == ".." || name.contains('/') {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "not a plain name (empty, '.', '..' or with '/'): refusing to leave DEST",
        ));
    }
    CString::new(name).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in name"))
}

/// `fstatat(dir, name, AT_SYMLINK_NOFOLLOW)`'s file type, `None` if there is no such entry.
#[allow(unsafe_code)]
fn kind_at(dir: &OwnedFd, name: &CString) -> io::Result<Option<libc::mode_t>> {
    let mut st = std::mem::MaybeUninit::<libc::stat>::uninit();
    // SAFETY: a valid directory fd, a NUL-terminated name and a stat buffer of the right
    // type; the buffer is read only when the call succeeded (and so filled it).
    let rc = unsafe {
        libc::fstatat(
            dir.as_raw_fd(),
            name.as_ptr(),
            st.as_mut_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        )
    };
    if rc != 0 {
        let e = io::Error::last_os_error();
        return match e.kind() {
            io::ErrorKind::NotFound => Ok(None),
            _ => Err(e),
        };
    }
    // SAFETY: fstatat returned 0, so it wrote the whole struct.
    Ok(Some(unsafe { st.assume_init() }.st_mode & libc::S_IFMT))
}

/// `openat(dir, name, flags, mode)` as an owned fd.
#[allow(unsafe_code)]
fn open_at(
    dir: &OwnedFd,
    name: &CString,
    flags: libc::c_int,
    mode: libc::mode_t,
) -> io::Result<OwnedFd> {
    // SAFETY: a valid directory fd and a NUL-terminated name; the mode is passed as the
    // variadic third argument open(2) expects (an unsigned int).
    let fd = unsafe {
        libc::openat(
            dir.as_raw_fd(),
            name.as_ptr(),
            flags | libc::O_CLOEXEC,
            mode as libc::c_uint,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: openat returned a new fd that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Opens the directory `name` under `dir` without following a symlink, creating it (0700)
/// if missing.
#[allow(unsafe_code)]
fn subdir(dir: &OwnedFd, name: &CString) -> io::Result<OwnedFd> {
    // SAFETY: a valid directory fd and a NUL-terminated name.
    if unsafe { libc::mkdirat(dir.as_raw_fd(), name.as_ptr(), DIR_MODE) } != 0 {
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::AlreadyExists {
            return Err(e);
        }
    }
    match open_at(
        dir,
        name,
        libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW,
        0,
    ) {
        Ok(fd) => Ok(fd),
        // O_NOFOLLOW on a symlink gives ELOOP (or ENOTDIR with O_DIRECTORY): say which.
        Err(e) => match kind_at(dir, name) {
            Ok(Some(libc::S_IFLNK)) => Err(symlink_refused()),
            _ => Err(e),
        },
    }
}

impl Dest {
    /// Opens the directory `dir` (the user's own DEST: a symlink *to* it is followed like
    /// any path the user names), creating it and missing parents with mode 0700.
    pub fn open(dir: &Path) -> Result<Self> {
        let path = if dir.as_os_str().is_empty() {
            Path::new(".")
        } else {
            dir
        };
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(DIR_MODE)
            .create(path)
            .map_err(io_at(dir))?;
        let f = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECTORY)
            .open(path)
            .map_err(io_at(dir))?;
        Ok(Self {
            fd: f.into(),
            shown: dir.to_path_buf(),
        })
    }

    /// The target for the `/`-separated relative path `rel`, its directories created (0700)
    /// and opened component by component. Refuses `..`, `.`, empty components and any
    /// symlink on the way, whatever checks ran before.
    pub fn target(&self, rel: &str) -> Result<Target> {
        let shown = self.shown.join(rel);
        let mut parts = rel.split('/').collect::<Vec<_>>();
        let last = parts.pop().unwrap_or_default();
        let mut at = self.shown.clone();
        let mut dir: Option<OwnedFd> = None;
        for p in parts {
            at.push(p);
            let name = component(p).map_err(io_at(&shown))?;
            let parent = dir.as_ref().unwrap_or(&self.fd);
            dir = Some(subdir(parent, &name).map_err(io_at(&at))?);
        }
        let name = component(last).map_err(io_at(&shown))?;
        let dir = match dir {
            Some(d) => d,
            None => self.fd.try_clone().map_err(io_at(&self.shown))?,
        };
        Ok(Target { dir, name, shown })
    }
}

impl Target {
    /// True if the final name exists (as a regular file). A symlink or a directory there
    /// is an error: unseal replaces files only.
    pub fn exists(&self) -> Result<bool> {
        match kind_at(&self.dir, &self.name).map_err(io_at(&self.shown))? {
            None => Ok(false),
            Some(libc::S_IFLNK) => Err(io_at(&self.shown)(symlink_refused())),
            Some(libc::S_IFREG) => Ok(true),
            Some(_) => Err(io_at(&self.shown)(io::Error::other(
                "exists and is not a regular file",
            ))),
        }
    }

    /// A new hidden temporary file (mode 0600) beside the final name, and its name.
    pub fn create_temp(&self) -> Result<(File, CString)> {
        let mut rnd = [0u8; 8];
        crate::crypto::random_bytes(&mut rnd);
        let mut temp = b".".to_vec();
        temp.extend_from_slice(self.name.as_bytes());
        temp.extend_from_slice(format!(".sealfs-unseal-{}", hex::encode(rnd)).as_bytes());
        let temp = CString::new(temp).expect("no NUL: built from a checked name and hex");
        let fd = open_at(
            &self.dir,
            &temp,
            libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL | libc::O_NOFOLLOW,
            FILE_MODE,
        )
        .map_err(io_at(&self.shown))?;
        Ok((File::from(fd), temp))
    }

    /// Moves the temporary file over the final name, in the same directory fd. A symlink
    /// that appeared at the final name since [`Target::exists`] is replaced, not followed.
    #[allow(unsafe_code)]
    pub fn commit(&self, temp: &CString) -> Result<()> {
        let d = self.dir.as_raw_fd();
        // SAFETY: a valid directory fd and two NUL-terminated names.
        if unsafe { libc::renameat(d, temp.as_ptr(), d, self.name.as_ptr()) } != 0 {
            return Err(io_at(&self.shown)(io::Error::last_os_error()));
        }
        Ok(())
    }

    /// Removes the temporary file (after a failure); errors are ignored.
    #[allow(unsafe_code)]
    pub fn discard(&self, temp: &CString) {
        // SAFETY: a valid directory fd and a NUL-terminated name.
        unsafe { libc::unlinkat(self.dir.as_raw_fd(), temp.as_ptr(), 0) };
    }
}

/// The final component of `p` as UTF-8, if it is one (single-object unseal's file name).
pub fn file_name(p: &Path) -> Option<&str> {
    p.file_name()
        .and_then(|n| std::str::from_utf8(n.as_bytes()).ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entries(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn dot_dot_and_other_non_names_are_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let dest = Dest::open(&tmp.path().join("dest")).unwrap();
        for rel in [
            "..",
            "../x",
            "a/../../x",
            "a/../../../../etc/x",
            "./x",
            "a//b",
            "a/",
            "",
            "a/.",
        ] {
            let err = dest.target(rel).err().unwrap_or_else(|| panic!("{rel:?}"));
            assert!(
                err.to_string().contains("refusing to leave DEST"),
                "{rel:?}: {err}"
            );
        }
        assert!(dest.target("a\0b").is_err());
        // Nothing outside DEST; inside, only the directories of refused names' valid prefixes.
        assert_eq!(entries(tmp.path()), ["dest"]);
        assert!(!tmp.path().join("x").exists());
    }

    #[test]
    fn symlinks_under_dest_are_refused_and_outputs_are_private() {
        let tmp = tempfile::tempdir().unwrap();
        let outside = tmp.path().join("outside");
        std::fs::create_dir(&outside).unwrap();
        let d = tmp.path().join("dest");
        let dest = Dest::open(&d).unwrap();
        std::os::unix::fs::symlink(&outside, d.join("link")).unwrap();
        let err = dest.target("link/x").err().expect("symlinked directory");
        assert!(err.to_string().contains("symbolic link"), "{err}");
        std::os::unix::fs::symlink(outside.join("f"), d.join("f")).unwrap();
        let err = dest.target("f").unwrap().exists().unwrap_err();
        assert!(err.to_string().contains("symbolic link"), "{err}");
        assert!(entries(&outside).is_empty());

        let t = dest.target("a/b/c").unwrap();
        assert!(!t.exists().unwrap());
        let (mut f, temp) = t.create_temp().unwrap();
        std::io::Write::write_all(&mut f, b"plain").unwrap();
        t.commit(&temp).unwrap();
        use std::os::unix::fs::PermissionsExt;
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&d.join("a/b/c")), 0o600);
        assert_eq!(mode(&d.join("a/b")), 0o700);
        assert_eq!(mode(&d.join("a")), 0o700);
        assert_eq!(std::fs::read(d.join("a/b/c")).unwrap(), b"plain");
        assert_eq!(entries(&d.join("a/b")), ["c"]);
    }
}
