//! A local directory as a store: the embedded default for development and air-gapped use.
//!
//! ETags are derived from (inode, size, mtime), so a replaced file is noticed. Uploads
//! go to a hidden temporary file in the target directory and appear by `rename`.

use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};

use bytes::Bytes;

use super::{ObjectInfo, StoreError};

const UPLOAD_MARK: &str = ".sealfs-upload-";

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

    pub async fn list(&self, prefix: &str) -> Result<Vec<ObjectInfo>, StoreError> {
        let root = self.root.clone();
        let prefix = prefix.to_string();
        blocking(move || {
            let mut out = Vec::new();
            // Walk only the directory that can hold matches.
            let start = match prefix.rfind('/') {
                Some(i) => &prefix[..i],
                None => "",
            };
            walk(&root, start, &prefix, &mut out)?;
            out.sort_by(|a, b| a.key.cmp(&b.key));
            Ok(out)
        })
        .await
    }

    pub async fn get(&self, key: &str) -> Result<(Bytes, String), StoreError> {
        let p = self.path(key);
        let k = key.to_string();
        blocking(move || {
            let f = std::fs::File::open(&p).map_err(io(&k))?;
            let m = f.metadata().map_err(io(&k))?;
            let mut buf = Vec::with_capacity(m.size() as usize);
            std::io::Read::read_to_end(&mut &f, &mut buf).map_err(io(&k))?;
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
            let f = std::fs::File::open(&p).map_err(io(&k))?;
            let m = f.metadata().map_err(io(&k))?;
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

fn walk(root: &Path, dir: &str, prefix: &str, out: &mut Vec<ObjectInfo>) -> Result<(), StoreError> {
    let rd = match std::fs::read_dir(root.join(dir)) {
        Ok(rd) => rd,
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::NotFound | std::io::ErrorKind::NotADirectory
            ) =>
        {
            return Ok(())
        }
        Err(e) => return Err(io(dir)(e)),
    };
    for entry in rd {
        let entry = entry.map_err(io(dir))?;
        let Some(name) = entry.file_name().to_str().map(str::to_string) else {
            continue;
        };
        if name.contains(UPLOAD_MARK) {
            continue;
        }
        let key = if dir.is_empty() {
            name
        } else {
            format!("{dir}/{name}")
        };
        let ft = entry.file_type().map_err(io(&key))?;
        if ft.is_dir() {
            if key.starts_with(prefix) || prefix.starts_with(&format!("{key}/")) {
                walk(root, &key, prefix, out)?;
            }
        } else if ft.is_file() && key.starts_with(prefix) {
            let m = entry.metadata().map_err(io(&key))?;
            out.push(ObjectInfo {
                size: m.size(),
                etag: etag(&m),
                key,
            });
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

    #[tokio::test]
    async fn put_if_match_writes_only_over_the_version_it_names() {
        let tmp = tempfile::tempdir().unwrap();
        let store = LocalStore::new(tmp.path());
        store.put("d/k", Bytes::from_static(b"v1")).await.unwrap();
        let (_, read) = store.get("d/k").await.unwrap();
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
        let (_, now) = store.get("d/k").await.unwrap();
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
