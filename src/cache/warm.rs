//! `sealfs cache warm URI --cache-dir DIR --cache-dir-size BYTES [--jobs N]`: pre-pulls a
//! model's sealed chunks into a cache directory with no key at all, so a node can be warmed
//! before it may decrypt anything (ahead of a rollout, in a DaemonSet, in an image bake).
//!
//! Without a key the manifest cannot be read, so each chunk is stored under the BLAKE3 of
//! the bytes fetched: an entry only counts once a mount's (authenticated) manifest lists that
//! digest, and is then authenticated by AEAD like any chunk. What the store lists is hostile
//! input: sizes must be ones a sealed file can have, chunk sizes at most `--max-chunk-size`,
//! the listing bounded, each chunk buffered alone. Chunk 0 is skipped (a mount always reads
//! it from the store, with the file's header).

use std::sync::atomic::{AtomicU64, Ordering};

use futures::StreamExt;

use super::disk::DiskCache;
use crate::format::layout::PRELUDE_LEN;
use crate::format::Layout;
use crate::object::SealedEntry;
use crate::store::{ListLimits, Store};

/// What a warm did.
#[derive(Debug, Default)]
pub struct Warmed {
    pub files: usize,
    pub chunks: u64,
    pub bytes: u64,
    /// Files skipped: a size no sealed file has, or chunks above `--max-chunk-size`.
    pub skipped: usize,
    /// Files whose fetch failed, with the reason.
    pub failed: Vec<(String, String)>,
}

/// Pre-pulls every sealed file under `prefix` (the generation served, not superseded
/// ones) into `disk`, `jobs` files at a time.
pub async fn warm(
    store: &Store,
    prefix: &str,
    disk: &DiskCache,
    jobs: usize,
    max_chunk_log2: u8,
    limits: &ListLimits,
) -> crate::Result<Warmed> {
    let listing = crate::object::find_bounded(store, prefix, limits).await?;
    listing.log_rejected();
    let chunks = AtomicU64::new(0);
    let bytes = AtomicU64::new(0);
    let mut out = Warmed::default();
    let mut todo = Vec::new();
    for e in listing.sealed {
        let layout = (e.chunk_log2 <= max_chunk_log2)
            .then(|| Layout::from_object_size(e.chunk_log2, e.data.size))
            .flatten();
        match layout {
            Some(l) => todo.push((e, l)),
            None => {
                tracing::warn!(file = %crate::format::naming::escaped(&e.data.key), "not warmed: a size no sealed file has, or chunks above --max-chunk-size");
                out.skipped += 1;
            }
        }
    }
    let results: Vec<(String, Result<(), String>)> = futures::stream::iter(todo)
        .map(|(e, l)| {
            let (chunks, bytes) = (&chunks, &bytes);
            async move {
                let r = warm_file(store, disk, &e, &l, chunks, bytes).await;
                (e.data.key.clone(), r)
            }
        })
        .buffer_unordered(jobs.max(1))
        .collect()
        .await;
    for (key, r) in results {
        match r {
            Ok(()) => out.files += 1,
            Err(e) => out.failed.push((key, e)),
        }
    }
    out.chunks = chunks.load(Ordering::Relaxed);
    out.bytes = bytes.load(Ordering::Relaxed);
    Ok(out)
}

/// One data object, streamed: the prelude skipped, each chunk hashed and written.
async fn warm_file(
    store: &Store,
    disk: &DiskCache,
    e: &SealedEntry,
    l: &Layout,
    chunks: &AtomicU64,
    bytes: &AtomicU64,
) -> Result<(), String> {
    let pin = (!e.data.etag.is_empty()).then_some(e.data.etag.as_str());
    let mut body = store
        .get_range_stream(&e.data.key, 0, e.data.size, pin)
        .await
        .map_err(|err| err.to_string())?;
    let mut skip = PRELUDE_LEN as usize;
    let (mut index, mut buf) = (0u64, Vec::new());
    let last = l.last_index();
    while let Some(piece) = body.next().await {
        let piece = piece.map_err(|err| err.to_string())?;
        let mut data = &piece[..];
        let s = skip.min(data.len());
        skip -= s;
        data = &data[s..];
        while !data.is_empty() {
            if index > last {
                return Err("the store sent more bytes than the object's size".into());
            }
            let need = l.chunk_cipher_len(index) as usize;
            let take = (need - buf.len()).min(data.len());
            buf.extend_from_slice(&data[..take]);
            data = &data[take..];
            if buf.len() == need {
                if index > 0 {
                    let addr = *blake3::hash(&buf).as_bytes();
                    disk.submit_wait(&addr, &buf)
                        .await
                        .map_err(|err| format!("writing the cache directory: {err}"))?;
                    chunks.fetch_add(1, Ordering::Relaxed);
                    bytes.fetch_add(need as u64, Ordering::Relaxed);
                }
                buf.clear();
                index += 1;
            }
        }
    }
    if index != last + 1 || skip > 0 {
        return Err("the object ended early".into());
    }
    Ok(())
}
