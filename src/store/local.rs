//! A local directory as a store: the embedded default for development and air-gapped use.
//!
//! ETags are derived from (inode, size, mtime), so a replaced file is noticed. Uploads
//! go to a hidden temporary file in the target directory and appear by `rename`.

use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};

use bytes::Bytes;

use super::{bounded_key, list_bound, ListLimits, ObjectInfo, StoreError};

const UPLOAD_MARK: &str = ".sealfs-upload-";

/// A regular file of this name marks the root of a local store that holds several
/// models: keys (and so the path each file is sealed for) are relative to it, as keys are
/// relative to the bucket on S3. Without one, the directory a URI names is the root.
pub const ROOT_MARKER: &str = ".sealfs-store";

/// The store root for the local directory `dir` and `dir`'s key prefix within it: the
/// nearest directory at or above `dir` holding a [`ROOT_MARKER`] file, else `dir` itself.
pub fn store_root(dir: &Path) -> (PathBuf, String) {
    let abs = std::path::absolute(dir).unwrap_or_else(|_| dir.to_path_buf());
    let mut rel: Vec<String> = Vec::new();
    let mut at = abs.as_path();
    loop {
        let marker = std::fs::symlink_metadata(at.join(ROOT_MARKER));
        if marker.is_ok_and(|m| m.is_file()) {
            rel.reverse();
            return (at.to_path_buf(), rel.join("/"));
        }
        let (Some(parent), Some(name)) = (at.parent(), at.file_name().and_then(|n| n.to_str()))
        else {
            return (dir.to_path_buf(), String::new());
        };
        rel.push(name.to_string());
        at = parent;
    }
}

/// True if `path` does not exist but a later generation of it does (`DIR/.sealfs-gN/NAME`,
/// as `sealfs reseal` writes them, once `sealfs gc` removed generation 0).
pub fn has_generations(path: &Path) -> bool {
    let (Some(dir), Some(name)) = (path.parent(), path.file_name()) else {
        return false;
    };
    let dir = if dir.as_os_str().is_empty() {
        Path::new(".")
    } else {
        dir
    };
    if path.symlink_metadata().is_ok() {
        return false;
    }
    let Ok(entries) = std::fs::read_dir(dir) else {
        return false;
    };
    entries.flatten().any(|e| {
        let gen = e.file_name();
        let gen = gen.to_string_lossy();
        crate::format::naming::split_generation(&format!("{gen}/x")).1 > 0
            && e.path().join(name).is_file()
    })
}

pub struct LocalStore {
    root: PathBuf,
}

fn io(key: &str) -> impl FnOnce(std::io::Error) -> StoreError + '_ {
    move |e| match e.kind() {
        std::io::ErrorKind::NotFound => StoreError::NotFound(key.to_string()),
        _ => StoreError::Io {
            key: key.to_string(),
            source: e,
        },
    }
}

fn etag(m: &std::fs::Metadata) -> String {
    format!(
        "{:x}-{:x}-{:x}",
        m.ino(),
        m.size(),
        m.mtime() as i128 * 1_000_000_000 + m.mtime_nsec() as i128
    )
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f)
        .await
        .expect("blocking store task panicked")
}

impl LocalStore {
    pub fn new(root: &Path) -> Self {
        Self {
            root: root.to_path_buf(),
        }
    }

    fn path(&self, key: &str) -> PathBuf {
        self.root.join(key)
    }

    pub fn describe(&self, key: &str) -> String {
        self.path(key).display().to_string()
    }

    pub async fn list(
        &self,
        prefix: &str,
        limits: &ListLimits,
    ) -> Result<Vec<ObjectInfo>, StoreError> {
        let root = self.root.clone();
        let prefix = prefix.to_string();
        let limits = *limits;
        blocking(move || {
            let mut out = Vec::new();
            // Walk only the directory that can hold matches.
            let start = match prefix.rfind('/') {
                Some(i) => &prefix[..i],
                None => "",
            };
            let deadline = std::time::Instant::now() + limits.timeout;
            walk(&root, start, &prefix, &limits, deadline, &mut out)?;
            out.sort_by(|a, b| a.key.cmp(&b.key));
            Ok(out)
        })
        .await
    }

    /// A whole object, read until `max_len`: never allocated from the file's size, never
    /// through a symlink, never from a FIFO or device (which could block or never end).
    pub async fn get(&self, key: &str, max_len: usize) -> Result<(Bytes, String), StoreError> {
        let p = self.path(key);
        let k = key.to_string();
        blocking(move || {
            let (f, m) = open_regular(&p, &k)?;
            let mut buf = Vec::new();
            std::io::Read::read_to_end(&mut std::io::Read::take(&f, max_len as u64 + 1), &mut buf)
                .map_err(io(&k))?;
            if buf.len() > max_len {
                return Err(StoreError::Bound {
                    what: "object",
                    key: k,
                    reason: format!("larger than {max_len} bytes"),
                });
            }
            Ok((Bytes::from(buf), etag(&m)))
        })
        .await
    }

    /// An open range, read in [`PIECE`]-sized pieces by [`LocalRange::next`].
    pub async fn get_range_stream(
        &self,
        key: &str,
        start: u64,
        end: u64,
        if_match: Option<&str>,
    ) -> Result<LocalRange, StoreError> {
        let p = self.path(key);
        let k = key.to_string();
        let want = if_match.map(str::to_string);
        let (file, etag) = blocking(move || {
            let (f, m) = open_regular(&p, &k)?;
            let tag = etag(&m);
            if want.is_some_and(|w| w != tag) {
                return Err(StoreError::Changed(k));
            }
            Ok((f, tag))
        })
        .await?;
        Ok(LocalRange {
            file: std::sync::Arc::new(file),
            pos: start,
            end,
            key: key.to_string(),
            etag,
        })
    }

    pub async fn put(&self, key: &str, body: Bytes) -> Result<(), StoreError> {
        let up = self.start_upload(key).await?;
        match up.put_part(0, body).await {
            Ok(()) => up.complete().await,
            Err(e) => {
                let _ = up.abort().await;
                Err(e)
            }
        }
    }

    /// [`LocalStore::put`] only if the object's ETag is still `if_match`; `Changed` (and
    /// nothing written) otherwise. Best effort on a local directory: the new file is written
    /// and synced first, then the ETag is compared and the file renamed at once, so only a
    /// writer that replaces the object in the microseconds between those two calls goes
    /// unnoticed (rename(2) has no compare-and-swap). S3 checks it atomically.
    pub async fn put_if_match(
        &self,
        key: &str,
        body: Bytes,
        if_match: &str,
    ) -> Result<(), StoreError> {
        let up = self.start_upload(key).await?;
        if let Err(e) = up.put_part(0, body).await {
            let _ = up.abort().await;
            return Err(e);
        }
        let want = if_match.to_string();
        blocking(move || {
            let res =
                up.file.sync_all().map_err(io(&up.key)).and_then(|()| {
                    match std::fs::metadata(&up.target) {
                        Ok(m) if etag(&m) == want => {
                            std::fs::rename(&up.temp, &up.target).map_err(io(&up.key))
                        }
                        _ => Err(StoreError::Changed(up.key.clone())),
                    }
                });
            if res.is_err() {
                let _ = std::fs::remove_file(&up.temp);
            }
            res
        })
        .await
    }

    pub async fn delete(&self, key: &str) -> Result<(), StoreError> {
        let p = self.path(key);
        let k = key.to_string();
        blocking(move || std::fs::remove_file(&p).map_err(io(&k))).await
    }

    pub async fn start_upload(&self, key: &str) -> Result<LocalUpload, StoreError> {
        let target = self.path(key);
        let k = key.to_string();
        blocking(move || {
            let dir = target
                .parent()
                .ok_or_else(|| StoreError::BadUri(k.clone()))?;
            std::fs::create_dir_all(dir).map_err(io(&k))?;
            let mut rnd = [0u8; 8];
            crate::crypto::random_bytes(&mut rnd);
            let name = target
                .file_name()
                .and_then(|n| n.to_str())
                .unwrap_or("object");
            let temp = dir.join(format!(".{name}{UPLOAD_MARK}{}", hex::encode(rnd)));
            let file = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&temp)
                .map_err(io(&k))?;
            Ok(LocalUpload {
                key: k,
                file: std::sync::Arc::new(file),
                temp,
                target,
            })
        })
        .await
    }
}

/// Opens an object file for reading ([`crate::localfile::open_regular`]).
fn open_regular(p: &Path, key: &str) -> Result<(std::fs::File, std::fs::Metadata), StoreError> {
    use crate::localfile::OpenError;
    crate::localfile::open_regular(p).map_err(|e| match e {
        OpenError::Io(e) => io(key)(e),
        OpenError::Symlink => io(key)(std::io::Error::from_raw_os_error(libc::ELOOP)),
        other => StoreError::Failed {
            op: "open",
            key: key.to_string(),
            message: other.to_string(),
        },
    })
}

/// Lists the files under `root/dir` whose key starts with `prefix`, iteratively (no
/// recursion a deep tree could overflow), within `limits`. Symlinks are never followed.
fn walk(
    root: &Path,
    dir: &str,
    prefix: &str,
    limits: &ListLimits,
    deadline: std::time::Instant,
    out: &mut Vec<ObjectInfo>,
) -> Result<(), StoreError> {
    let mut dirs = vec![dir.to_string()];
    let (mut visited, mut entries) = (0usize, 0usize);
    while let Some(dir) = dirs.pop() {
        visited += 1;
        if visited > limits.max_objects || std::time::Instant::now() > deadline {
            return Err(list_bound(
                prefix,
                format!(
                    "more than {} directories or longer than {:?}",
                    limits.max_objects, limits.timeout
                ),
            ));
        }
        let rd = match std::fs::read_dir(root.join(&dir)) {
            Ok(rd) => rd,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::NotFound | std::io::ErrorKind::NotADirectory
                ) =>
            {
                continue
            }
            Err(e) => return Err(io(&dir)(e)),
        };
        for entry in rd {
            // Per entry, not per directory: one directory can hold millions of names.
            entries += 1;
            if entries > limits.max_objects.saturating_mul(4)
                || std::time::Instant::now() > deadline
            {
                return Err(list_bound(
                    prefix,
                    format!(
                        "more than {} entries or longer than {:?}",
                        limits.max_objects.saturating_mul(4),
                        limits.timeout
                    ),
                ));
            }
            let entry = entry.map_err(io(&dir))?;
            let Some(name) = entry.file_name().to_str().map(str::to_string) else {
                continue;
            };
            if name.contains(UPLOAD_MARK) || name == ROOT_MARKER {
                continue;
            }
            let key = if dir.is_empty() {
                name
            } else {
                format!("{dir}/{name}")
            };
            let ft = entry.file_type().map_err(io(&key))?;
            if ft.is_dir() {
                // Deeper than a key may be long: nothing below could be a valid object.
                let inside = key.starts_with(prefix) || prefix.starts_with(&format!("{key}/"));
                if inside && key.len() <= crate::format::naming::MAX_KEY_LEN {
                    dirs.push(key);
                }
            } else if ft.is_file() && key.starts_with(prefix) {
                if out.len() >= limits.max_objects {
                    return Err(list_bound(
                        prefix,
                        format!(
                            "more than {} objects (raise --max-objects)",
                            limits.max_objects
                        ),
                    ));
                }
                let m = entry.metadata().map_err(io(&key))?;
                out.push(ObjectInfo {
                    size: m.size(),
                    etag: etag(&m),
                    modified: m.modified().ok(),
                    key: bounded_key(&key),
                });
            }
        }
    }
    Ok(())
}

/// A local upload: a hidden temp file renamed into place on `complete`.
pub struct LocalUpload {
    key: String,
    file: std::sync::Arc<std::fs::File>,
    temp: PathBuf,
    target: PathBuf,
}

impl LocalUpload {
    pub async fn put_part(&self, offset: u64, body: Bytes) -> Result<(), StoreError> {
        let f = self.file.clone();
        let k = self.key.clone();
        blocking(move || f.write_all_at(&body, offset).map_err(io(&k))).await
    }

    pub async fn complete(self) -> Result<(), StoreError> {
        blocking(move || {
            self.file.sync_all().map_err(io(&self.key))?;
            std::fs::rename(&self.temp, &self.target).map_err(io(&self.key))
        })
        .await
    }

    pub async fn abort(self) -> Result<(), StoreError> {
        blocking(move || std::fs::remove_file(&self.temp).map_err(io(&self.key))).await
    }
}

/// Read size of [`LocalRange`]: small, so a mount never holds a whole GET-sized buffer.
const PIECE: u64 = 256 * 1024;

/// A byte range of a local file, read piece by piece.
pub struct LocalRange {
    file: std::sync::Arc<std::fs::File>,
    pos: u64,
    end: u64,
    key: String,
    etag: String,
}

impl LocalRange {
    pub fn etag(&self) -> &str {
        &self.etag
    }

    pub async fn next(&mut self) -> Option<Result<Bytes, StoreError>> {
        if self.pos >= self.end {
            return None;
        }
        let (f, at, n, k) = (
            self.file.clone(),
            self.pos,
            (self.end - self.pos).min(PIECE),
            self.key.clone(),
        );
        let res = blocking(move || {
            let mut buf = vec![0u8; n as usize];
            match f.read_at(&mut buf, at) {
                Ok(0) => Err(StoreError::Failed {
                    op: "read",
                    key: k,
                    message: "short read".into(),
                }),
                Ok(got) => {
                    buf.truncate(got);
                    Ok(Bytes::from(buf))
                }
                Err(e) => Err(io(&k)(e)),
            }
        })
        .await;
        if let Ok(b) = &res {
            self.pos += b.len() as u64;
        }
        Some(res)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An object swapped for a FIFO, a symlink or a huge file after the listing: refused
    /// promptly, never followed, never read whole.
    #[tokio::test]
    async fn gets_refuse_fifos_symlinks_and_oversized_objects() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalStore::new(dir.path());
        let fifo = std::ffi::CString::new(dir.path().join("fifo").display().to_string()).unwrap();
        // SAFETY: a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o600) }, 0);
        std::os::unix::fs::symlink("/dev/zero", dir.path().join("zero")).unwrap();
        std::fs::write(dir.path().join("small"), b"12345").unwrap();
        let bounded = |f| tokio::time::timeout(std::time::Duration::from_secs(5), f);
        let e = bounded(store.get("fifo", 100))
            .await
            .expect("no hang")
            .unwrap_err();
        assert!(e.to_string().contains("not a regular file"), "{e}");
        let e = bounded(store.get("zero", 100))
            .await
            .expect("no hang")
            .unwrap_err();
        assert!(e.to_string().contains("symbolic links"), "{e}");
        let e = store.get("small", 4).await.unwrap_err();
        assert_eq!(e.to_string(), "small: object refused: larger than 4 bytes");
        assert_eq!(&store.get("small", 5).await.unwrap().0[..], b"12345");
        let e = tokio::time::timeout(
            std::time::Duration::from_secs(5),
            store.get_range_stream("fifo", 0, 1, None),
        )
        .await
        .expect("no hang")
        .err()
        .unwrap();
        assert!(e.to_string().contains("not a regular file"), "{e}");
    }

    #[tokio::test]
    async fn listings_stop_at_max_objects() {
        let dir = tempfile::tempdir().unwrap();
        for i in 0..5 {
            std::fs::write(dir.path().join(format!("f{i}")), b"x").unwrap();
        }
        let store = LocalStore::new(dir.path());
        let limits = ListLimits {
            max_objects: 4,
            ..Default::default()
        };
        let e = store.list("", &limits).await.unwrap_err();
        assert!(e.to_string().contains("more than 4 objects"), "{e}");
        let limits = ListLimits {
            max_objects: 5,
            ..Default::default()
        };
        assert_eq!(store.list("", &limits).await.unwrap().len(), 5);
    }

    #[tokio::test]
    async fn put_if_match_writes_only_over_the_version_it_names() {
        let tmp = tempfile::tempdir().unwrap();
        let store = LocalStore::new(tmp.path());
        store.put("d/k", Bytes::from_static(b"v1")).await.unwrap();
        let (_, read) = store.get("d/k", 1024).await.unwrap();
        // Someone else replaces the object between our read and our write.
        std::fs::write(tmp.path().join("d/other"), b"theirs").unwrap();
        std::fs::rename(tmp.path().join("d/other"), tmp.path().join("d/k")).unwrap();
        let err = store
            .put_if_match("d/k", Bytes::from_static(b"ours"), &read)
            .await
            .unwrap_err();
        assert!(
            matches!(err, StoreError::Changed(ref k) if k == "d/k"),
            "{err}"
        );
        assert_eq!(std::fs::read(tmp.path().join("d/k")).unwrap(), b"theirs");
        let names: Vec<_> = std::fs::read_dir(tmp.path().join("d"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["k"], "no temporary file left");
        // With the current ETag it goes through; a removed object is a change too.
        let (_, now) = store.get("d/k", 1024).await.unwrap();
        store
            .put_if_match("d/k", Bytes::from_static(b"ours"), &now)
            .await
            .unwrap();
        assert_eq!(std::fs::read(tmp.path().join("d/k")).unwrap(), b"ours");
        store.delete("d/k").await.unwrap();
        let err = store
            .put_if_match("d/k", Bytes::from_static(b"x"), &now)
            .await
            .unwrap_err();
        assert!(matches!(err, StoreError::Changed(_)), "{err}");
        assert!(!tmp.path().join("d/k").exists());
    }
}
