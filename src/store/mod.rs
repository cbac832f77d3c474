//! Object stores: an S3 bucket or a local directory, behind one small interface.
//!
//! Keys are `/`-separated paths relative to the store root (the bucket, or the directory a
//! local URI names). Every read of a data object can be pinned to an ETag (`If-Match`),
//! so a replaced object fails instead of mixing versions.

pub mod local;
pub mod s3;

use bytes::Bytes;

/// One object from a listing.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ObjectInfo {
    pub key: String,
    pub size: u64,
    pub etag: String,
    /// Last modification time, as the store reports it (shown as mtime and ctime).
    pub modified: Option<std::time::SystemTime>,
}

/// Store errors; none carries object bytes.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    #[error("bad location {0:?}: expected s3://BUCKET[/PREFIX], file://PATH or a path")]
    BadUri(String),
    #[error("{0}: no such object")]
    NotFound(String),
    #[error("{0}: object changed since it was opened (ETag mismatch)")]
    Changed(String),
    #[error("{0}: already exists (use --force to replace it)")]
    Exists(String),
    #[error("{key}: access denied by the store ({op}): {message}")]
    Denied {
        op: &'static str,
        key: String,
        message: String,
    },
    #[error("{key}: {op} failed: {message}")]
    Failed {
        op: &'static str,
        key: String,
        message: String,
    },
    #[error("{key}: {source}")]
    Io { key: String, source: std::io::Error },
    /// A store answer past one of sealfs's bounds (a hostile or broken store).
    #[error("{key}: {what} refused: {reason}")]
    Bound {
        what: &'static str,
        key: String,
        reason: String,
    },
}

/// Bounds on one LIST, whatever the store answers: a hostile store cannot make a listing
/// take unbounded memory or time (docs/SECURITY.md, "Resource bounds").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ListLimits {
    /// Objects in one listing at most (data and key objects both count).
    pub max_objects: usize,
    /// Pages (requests) at most.
    pub max_pages: usize,
    /// Wall time of the whole listing at most.
    pub timeout: std::time::Duration,
}

impl Default for ListLimits {
    fn default() -> Self {
        Self {
            max_objects: 200_000,
            max_pages: 2_000,
            timeout: std::time::Duration::from_secs(120),
        }
    }
}

/// Longest continuation token accepted (S3's are a few hundred bytes).
pub const MAX_TOKEN_LEN: usize = 1024;
/// Most objects one LIST page may hold (S3 sends at most 1,000).
pub const MAX_PAGE_OBJECTS: usize = 1000;

/// Object keys longer than this are cut to it: they are refused by name checks anyway
/// (`naming::check_key`), and this bounds what one refused name costs.
pub(crate) fn bounded_key(key: &str) -> String {
    let max = crate::format::naming::MAX_KEY_LEN + 1;
    if key.len() <= max {
        return key.to_string();
    }
    let mut end = max;
    while !key.is_char_boundary(end) {
        end -= 1;
    }
    key[..end].to_string()
}

pub(crate) fn list_bound(prefix: &str, reason: String) -> StoreError {
    StoreError::Bound {
        what: "listing",
        key: prefix.to_string(),
        reason,
    }
}

/// A store and a key prefix within it, parsed from a URI.
pub struct Location {
    pub store: Store,
    /// Key prefix (no leading or trailing `/`; empty for the root).
    pub prefix: String,
}

impl Location {
    pub async fn parse(uri: &str) -> Result<Self, StoreError> {
        if let Some(rest) = uri.strip_prefix("s3://") {
            let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
            if bucket.is_empty() {
                return Err(StoreError::BadUri(uri.to_string()));
            }
            let prefix = prefix.trim_matches('/');
            if !prefix.is_empty() && crate::format::naming::check_key(prefix).is_err() {
                return Err(StoreError::BadUri(uri.to_string()));
            }
            let store = Store::S3(s3::S3Store::new(bucket).await?);
            return Ok(Self {
                store,
                prefix: prefix.to_string(),
            });
        }
        if uri.contains("://") && !uri.starts_with("file://") {
            return Err(StoreError::BadUri(uri.to_string()));
        }
        let path = std::path::Path::new(uri.strip_prefix("file://").unwrap_or(uri));
        if path.as_os_str().is_empty() {
            return Err(StoreError::BadUri(uri.to_string()));
        }
        // A path naming an existing regular file is one object in its parent directory; so is
        // one whose only versions are later generations (`.sealfs-gN/NAME` beside it).
        if path.is_file() || local::has_generations(path) {
            let parent = path
                .parent()
                .filter(|p| !p.as_os_str().is_empty())
                .unwrap_or(".".as_ref());
            let name = path
                .file_name()
                .and_then(|n| n.to_str())
                .ok_or_else(|| StoreError::BadUri(uri.into()))?;
            let (root, dir) = local::store_root(parent);
            let prefix = if dir.is_empty() {
                name.to_string()
            } else {
                format!("{dir}/{name}")
            };
            return Ok(Self {
                store: Store::Local(local::LocalStore::new(&root)),
                prefix,
            });
        }
        let (root, prefix) = local::store_root(path);
        Ok(Self {
            store: Store::Local(local::LocalStore::new(&root)),
            prefix,
        })
    }

    /// The key of `rel` under this location's prefix.
    pub fn key(&self, rel: &str) -> String {
        if self.prefix.is_empty() {
            rel.to_string()
        } else {
            format!("{}/{rel}", self.prefix)
        }
    }

    pub fn describe(&self, key: &str) -> String {
        self.store.describe(key)
    }
}

/// The store behind a location.
pub enum Store {
    Local(local::LocalStore),
    S3(s3::S3Store),
}

/// The body of a ranged GET, piece by piece.
pub enum RangeBody {
    S3 {
        body: aws_sdk_s3::primitives::ByteStream,
        /// For error messages.
        key: String,
        /// The ETag the response carried.
        etag: String,
    },
    Local(local::LocalRange),
}

impl RangeBody {
    /// The ETag of the object version this body comes from (empty if the store sent none).
    pub fn etag(&self) -> &str {
        match self {
            RangeBody::S3 { etag, .. } => etag,
            RangeBody::Local(r) => r.etag(),
        }
    }

    /// The next piece, `None` at the end.
    pub async fn next(&mut self) -> Option<Result<Bytes, StoreError>> {
        match self {
            RangeBody::Local(r) => r.next().await,
            RangeBody::S3 { body, key, .. } => body.next().await.map(|r| {
                r.map_err(|e| StoreError::Failed {
                    op: "GetObject",
                    key: key.clone(),
                    message: crate::error_chain(&e),
                })
            }),
        }
    }
}

/// An in-progress upload of one object, invisible until `complete`.
pub enum Upload {
    Local(local::LocalUpload),
    S3(s3::S3Upload),
}

macro_rules! dispatch {
    ($self:ident, $s:ident => $e:expr) => {
        match $self {
            Store::Local($s) => $e,
            Store::S3($s) => $e,
        }
    };
}

impl Store {
    /// Every object whose key starts with `prefix` (a plain string prefix), any depth,
    /// within the default [`ListLimits`].
    pub async fn list(&self, prefix: &str) -> Result<Vec<ObjectInfo>, StoreError> {
        self.list_bounded(prefix, &ListLimits::default()).await
    }

    /// [`Store::list`] within `limits`: past any of them the listing fails.
    pub async fn list_bounded(
        &self,
        prefix: &str,
        limits: &ListLimits,
    ) -> Result<Vec<ObjectInfo>, StoreError> {
        dispatch!(self, s => s.list(prefix, limits).await)
    }

    /// A whole small object and its ETag; fails once more than `max_len` bytes arrive,
    /// whatever size the store claims (nothing is allocated from that claim).
    pub async fn get(&self, key: &str, max_len: usize) -> Result<(Bytes, String), StoreError> {
        dispatch!(self, s => s.get(key, max_len).await)
    }

    /// Bytes `[start, end)` of `key`; fails with `Changed` if `if_match` no longer holds.
    pub async fn get_range(
        &self,
        key: &str,
        start: u64,
        end: u64,
        if_match: Option<&str>,
    ) -> Result<Bytes, StoreError> {
        if start >= end {
            return Ok(Bytes::new());
        }
        let mut body = self.get_range_stream(key, start, end, if_match).await?;
        let mut out = bytes::BytesMut::with_capacity((end - start) as usize);
        while let Some(piece) = body.next().await {
            let piece = piece?;
            // A store that ignores Range must not make us buffer the whole object.
            if out.len() as u64 + piece.len() as u64 > end - start {
                return Err(StoreError::Failed {
                    op: "GetObject",
                    key: key.to_string(),
                    message: format!("ranged GET answered more than {} bytes", end - start),
                });
            }
            out.extend_from_slice(&piece);
        }
        if out.len() as u64 != end - start {
            return Err(StoreError::Failed {
                op: "GetObject",
                key: key.to_string(),
                message: format!("short read: {} of {} bytes", out.len(), end - start),
            });
        }
        Ok(out.freeze())
    }

    /// Bytes `[start, end)` of `key` as a stream of pieces, so a reader can place them
    /// without holding the whole range; same `If-Match` rule as [`Store::get_range`].
    pub async fn get_range_stream(
        &self,
        key: &str,
        start: u64,
        end: u64,
        if_match: Option<&str>,
    ) -> Result<RangeBody, StoreError> {
        match self {
            Store::S3(s) => {
                let (body, etag) = s.get_range_stream(key, start, end, if_match).await?;
                Ok(RangeBody::S3 {
                    body,
                    key: key.to_string(),
                    etag,
                })
            }
            Store::Local(s) => Ok(RangeBody::Local(
                s.get_range_stream(key, start, end, if_match).await?,
            )),
        }
    }

    /// Replaces `key` atomically with `body` (small objects: key objects).
    pub async fn put(&self, key: &str, body: Bytes) -> Result<(), StoreError> {
        dispatch!(self, s => s.put(key, body).await)
    }

    /// [`Store::put`] only if `key` is still the version whose ETag is `if_match`, else
    /// `Changed` and nothing written (S3: `If-Match` on PutObject; local: best effort,
    /// see [`local::LocalStore::put_if_match`]).
    pub async fn put_if_match(
        &self,
        key: &str,
        body: Bytes,
        if_match: &str,
    ) -> Result<(), StoreError> {
        dispatch!(self, s => s.put_if_match(key, body, if_match).await)
    }

    pub async fn delete(&self, key: &str) -> Result<(), StoreError> {
        dispatch!(self, s => s.delete(key).await)
    }

    pub async fn start_upload(&self, key: &str) -> Result<Upload, StoreError> {
        Ok(match self {
            Store::Local(s) => Upload::Local(s.start_upload(key).await?),
            Store::S3(s) => Upload::S3(s.start_upload(key).await?),
        })
    }

    /// Human name of an object for messages.
    pub fn describe(&self, key: &str) -> String {
        dispatch!(self, s => s.describe(key))
    }
}

impl Upload {
    /// Part numbers start at 1; `offset` is the part's position in the object.
    pub async fn put_part(&self, number: u32, offset: u64, body: Bytes) -> Result<(), StoreError> {
        match self {
            Upload::Local(u) => u.put_part(offset, body).await,
            Upload::S3(u) => u.put_part(number, body).await,
        }
    }

    pub async fn complete(self) -> Result<(), StoreError> {
        match self {
            Upload::Local(u) => u.complete().await,
            Upload::S3(u) => u.complete().await,
        }
    }

    pub async fn abort(self) -> Result<(), StoreError> {
        match self {
            Upload::Local(u) => u.abort().await,
            Upload::S3(u) => u.abort().await,
        }
    }
}
