//! `sealfs verify` and `sealfs unseal`: read every chunk through the same open path as the
//! mount. Verify releases nothing; unseal writes to a hidden temporary file that is renamed
//! into place only after the last chunk authenticated, and removed on any failure.

use std::io::Write;
use std::path::{Path, PathBuf};

use futures::StreamExt;

use super::Cancel;
use crate::error::{Error, Result};
use crate::keys::Keyring;
use crate::object::{find, OpenFile, SealedEntry};
use crate::store::Location;

/// Chunks fetched per ranged GET by verify/unseal (≈ 8 MiB at the default chunk size).
const BATCH_BYTES: u64 = 8 << 20;
/// Ranged GETs in flight.
const IN_FLIGHT: usize = 4;
/// At most this many bad chunks are named per file.
const MAX_NAMED: usize = 16;

async fn entries(loc: &Location) -> Result<Vec<SealedEntry>> {
    let l = find(&loc.store, &loc.prefix).await?;
    if l.sealed.is_empty() {
        return Err(Error::NothingSealed(loc.describe(&loc.prefix)));
    }
    Ok(l.sealed)
}

fn batches(f: &OpenFile) -> impl Iterator<Item = (u64, u64)> {
    let per = (BATCH_BYTES >> f.layout.chunk_log2()).max(1);
    let n = f.layout.chunk_count();
    (0..n.div_ceil(per)).map(move |b| (b * per, ((b + 1) * per).min(n) - 1))
}

/// Streams every chunk of `f` in order, authenticated, to `sink` (which sees plaintext only
/// of chunks that verified). With `keep_going`, bad chunks are collected instead of ending
/// the read; store failures always end it.
async fn read_all(
    loc: &Location,
    f: &OpenFile,
    keep_going: bool,
    cancel: &Cancel,
    mut sink: impl FnMut(&[u8]) -> Result<()>,
) -> Result<Vec<u64>> {
    let mut bad = Vec::new();
    let mut fetches = futures::stream::iter(batches(f))
        .map(|(first, last)| async move {
            f.fetch(&loc.store, first, last)
                .await
                .map(|b| (first, last, b))
        })
        .buffered(IN_FLIGHT);
    loop {
        let next = tokio::select! {
            n = fetches.next() => n,
            _ = cancel.cancelled() => return Err(Error::Interrupted),
        };
        let Some(batch) = next else { break };
        let (first, last, bytes) = batch?;
        // Chunks are decrypted in place: wipe the buffer when done, verify or not.
        let mut buf = zeroize::Zeroizing::new(bytes.to_vec());
        let mut at = 0;
        for i in first..=last {
            let len = f.layout.chunk_cipher_len(i) as usize;
            let chunk = &mut buf[at..at + len];
            at += len;
            match f.open_chunk(i, chunk) {
                Ok(n) => sink(&chunk[..n])?,
                Err(e) if keep_going => {
                    tracing::warn!(file = %f.key, chunk = i, error = %e, "chunk failed authentication");
                    bad.push(i);
                }
                Err(e) => return Err(e),
            }
        }
    }
    Ok(bad)
}

/// One line per file from `verify`.
#[derive(Debug)]
pub struct VerifyReport {
    pub file: String,
    pub result: Result<u64>,
}

/// Authenticates every chunk of every sealed file at `loc`; writes no plaintext.
pub async fn verify(
    loc: &Location,
    keyring: &Keyring,
    cancel: &Cancel,
) -> Result<Vec<VerifyReport>> {
    let mut out = Vec::new();
    for e in entries(loc).await? {
        let result = verify_one(loc, &e, keyring, cancel).await;
        if matches!(result, Err(Error::Interrupted)) {
            return Err(Error::Interrupted);
        }
        out.push(VerifyReport {
            file: loc.describe(&e.data.key),
            result,
        });
    }
    Ok(out)
}

async fn verify_one(
    loc: &Location,
    e: &SealedEntry,
    keyring: &Keyring,
    cancel: &Cancel,
) -> Result<u64> {
    let f = OpenFile::open(&loc.store, e, keyring).await?;
    let bad = read_all(loc, &f, true, cancel, |_| Ok(())).await?;
    if bad.is_empty() {
        return Ok(f.layout.plaintext_size());
    }
    let mut names: Vec<String> = bad.iter().take(MAX_NAMED).map(u64::to_string).collect();
    if bad.len() > MAX_NAMED {
        names.push(format!("… ({} in all)", bad.len()));
    }
    Err(Error::integrity(
        &f.key,
        format!("chunks failed authentication: {}", names.join(", ")),
    ))
}

/// Decrypts the sealed files at `src` to `dest`. One object: `dest` is the output file (or
/// a directory to put it in). A prefix: `dest` is a directory, files land at relative paths.
pub async fn unseal(
    src: &Location,
    dest: &Path,
    keyring: &Keyring,
    force: bool,
    cancel: &Cancel,
) -> Result<Vec<PathBuf>> {
    let list = entries(src).await?;
    let single = list.len() == 1 && list[0].data.key == src.prefix;
    let mut written = Vec::new();
    for e in &list {
        let out = if single {
            if dest.is_dir() {
                dest.join(e.data.key.rsplit('/').next().unwrap_or(&e.data.key))
            } else {
                dest.to_path_buf()
            }
        } else {
            let rel = e
                .data
                .key
                .strip_prefix(&src.prefix)
                .unwrap_or(&e.data.key)
                .trim_start_matches('/');
            dest.join(rel)
        };
        if out.exists() && !force {
            return Err(Error::Usage(format!(
                "{}: already exists (use --force to replace it)",
                out.display()
            )));
        }
        unseal_one(src, e, keyring, &out, cancel).await?;
        written.push(out);
    }
    Ok(written)
}

async fn unseal_one(
    loc: &Location,
    e: &SealedEntry,
    keyring: &Keyring,
    out: &Path,
    cancel: &Cancel,
) -> Result<()> {
    let f = OpenFile::open(&loc.store, e, keyring).await?;
    let io = |source| Error::Io {
        path: out.display().to_string(),
        source,
    };
    let dir = out
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(io)?;
    let mut rnd = [0u8; 8];
    crate::crypto::random_bytes(&mut rnd);
    let name = out.file_name().and_then(|n| n.to_str()).unwrap_or("out");
    let temp = dir.join(format!(".{name}.sealfs-unseal-{}", hex::encode(rnd)));
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&temp)
        .map_err(io)?;
    let mut w = std::io::BufWriter::with_capacity(1 << 20, file);
    let res = read_all(loc, &f, false, cancel, |b| w.write_all(b).map_err(io)).await;
    let res = res.and_then(|_| {
        w.into_inner()
            .map_err(|e| io(e.into_error()))?
            .sync_all()
            .map_err(io)
    });
    match res {
        Ok(()) => std::fs::rename(&temp, out).map_err(io),
        Err(err) => {
            let _ = std::fs::remove_file(&temp);
            Err(err)
        }
    }
}
