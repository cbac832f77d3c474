//! The filesystem core driven directly (no kernel mount): random reads under several
//! cache and read-ahead settings must return exactly the source bytes.

mod common;

use std::os::unix::fs::MetadataExt;
use std::sync::Arc;

use common::*;
use sealfs::fs::{MountConfig, SealFs, ROOT};
use sealfs::keys::{KeySpec, Keyring};
use sealfs::seal::{seal, Cancel, SealOptions};
use sealfs::store::Location;

async fn sealed(dir: &std::path::Path, len: usize) -> (Location, Keyring, Vec<u8>) {
    let src = dir.join("src");
    std::fs::create_dir_all(&src).unwrap();
    let data = pattern(len, 77);
    std::fs::write(src.join("f"), &data).unwrap();
    let kp = dir.join("k");
    sealfs::keys::file::keygen(&kp).unwrap();
    let ring = Keyring::resolve(&[KeySpec::File(kp)]).await.unwrap();
    let dest = Location::parse(&dir.join("sealed").display().to_string())
        .await
        .unwrap();
    let opts = SealOptions {
        chunk_log2: 14,
        ..Default::default()
    };
    seal(&src, &dest, &ring, &opts, &Cancel::never())
        .await
        .unwrap();
    (dest, ring, data)
}

/// The core (no kernel mount) over one sealed file "f" of `len` bytes: (fs, its inode, plaintext).
async fn core_over(
    dir: &std::path::Path,
    len: usize,
    config: MountConfig,
) -> (Arc<SealFs>, u64, Vec<u8>) {
    let (loc, ring, data) = sealed(dir, len).await;
    let fs = SealFs::new(loc.store, &loc.prefix, ring, config)
        .await
        .unwrap();
    let ino = fs.lookup(ROOT, "f").unwrap().ino;
    (fs, ino, data)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn random_reads_match_under_every_setting() {
    let dir = tempfile::tempdir().unwrap();
    let len = 40 * 16384 + 123;
    for (cache, prefetch, fetch) in [
        (2 * 16400, 16384, 16384),
        (64 * 16400, 1 << 20, 4 * 16384),
        (8 << 20, 64 << 20, 8 << 20),
    ] {
        let config = MountConfig {
            cache_size: cache,
            max_chunk_log2: 14,
            max_prefetch: prefetch,
            max_fetch: fetch,
            ..Default::default()
        };
        let (fs, ino, data) = core_over(&dir.path().join(format!("{cache}")), len, config).await;
        let fh = fs.open(ino, (0, 0)).await.unwrap();
        // Sequential pass (read-ahead on), then random reads (window reset), concurrently.
        let mut off = 0u64;
        while off < len as u64 {
            let r = fs.read(fh, off, 128 * 1024).await.unwrap();
            let n = r.bytes().len();
            assert!(
                r.bytes() == &data[off as usize..off as usize + n],
                "cache {cache}: sequential at {off}"
            );
            off += n as u64;
        }
        let mut tasks = Vec::new();
        for t in 0..8u64 {
            let (fs, data) = (fs.clone(), data.clone());
            tasks.push(tokio::spawn(async move {
                let mut x = t * 7919 + 1;
                for _ in 0..50 {
                    x = x
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    let off = (x >> 17) % (len as u64 + 100);
                    let size = ((x >> 40) % 70_000) as u32;
                    let r = fs.read(fh, off, size).await.unwrap();
                    let end = (off + size as u64).min(len as u64);
                    let want: &[u8] = if off >= len as u64 {
                        &[]
                    } else {
                        &data[off as usize..end as usize]
                    };
                    assert!(r.bytes() == want, "random read {off}+{size}");
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        fs.release(fh);
        assert_eq!(fs.deks_held(), 1, "held during the grace");
    }
}

fn cached_chunks(fs: &Arc<SealFs>) -> u64 {
    let page = sealfs::fs::metrics::render(fs);
    let line = page
        .lines()
        .find(|l| l.starts_with("sealfs_cache_chunks "))
        .unwrap();
    line.rsplit(' ').next().unwrap().parse().unwrap()
}

/// Waits (bounded) until `want` chunks are cached: fetches run in the background.
async fn settles_at(fs: &Arc<SealFs>, want: u64, what: &str) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while cached_chunks(fs) != want {
        assert!(
            std::time::Instant::now() < deadline,
            "{what}: {} cached chunks, want {want}",
            cached_chunks(fs)
        );
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
}

/// The first open of a file sends its first chunk's GET together with the key object's, so
/// the first read finds that chunk without a request of its own; a later open with the DEK
/// held fetches no chunk (it only confirms the ETag).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn first_open_fetches_the_first_chunk_for_the_first_read() {
    use std::sync::atomic::Ordering::Relaxed;
    let dir = tempfile::tempdir().unwrap();
    let len = 6 * 16384;
    let (fs, ino, data) = core_over(dir.path(), len, MountConfig::default()).await;
    let fh = fs.open(ino, (0, 0)).await.unwrap();
    settles_at(&fs, 1, "chunk 0 after open, before any read").await;
    assert_eq!(fs.stats.fetches.load(Relaxed), 1);
    // Prelude + chunk 0 + its tag, nothing more.
    assert_eq!(fs.stats.fetched_bytes.load(Relaxed), 32 + 16384 + 16);
    let first = fs.read_cached(fh, 0, 100).expect("chunk 0 already cached");
    assert!(first.unwrap().bytes() == &data[..100]);
    // That read started the read-ahead of chunks 1 and 2: let it finish before counting.
    settles_at(&fs, 3, "chunk 0 and the read-ahead").await;
    fs.release(fh);
    let before = fs.stats.fetches.load(Relaxed);
    let again = fs.open(ino, (0, 0)).await.unwrap();
    assert_eq!(
        fs.stats.fetches.load(Relaxed),
        before,
        "DEK held: no chunk GET"
    );
    assert_eq!(fs.stats.dek_unwraps.load(Relaxed), 1);
    fs.release(again);
}

/// Decrypted chunks leave the cache with their file: after the grace, and when the object
/// was replaced while open (its old version's chunks go at the first sweep after the last
/// old handle closes).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunks_leave_the_cache_with_their_file() {
    let dir = tempfile::tempdir().unwrap();
    let len = 6 * 16384;
    let config = MountConfig {
        dek_grace: std::time::Duration::ZERO,
        list_ttl: std::time::Duration::from_millis(1),
        ..Default::default()
    };
    let (fs, ino, data) = core_over(dir.path(), len, config).await;
    let old = fs.open(ino, (0, 0)).await.unwrap();
    assert!(fs.read(old, 0, len as u32).await.unwrap().bytes() == &data[..]);
    assert_eq!(cached_chunks(&fs), 6);

    // Replace the object under the open handle, then open the new version.
    let src = dir.path().join("src/f");
    std::fs::write(&src, pattern(len, 99)).unwrap();
    let kp = dir.path().join("k");
    let ring2 = Keyring::resolve(&[KeySpec::File(kp)]).await.unwrap();
    let dest = Location::parse(&dir.path().join("sealed").display().to_string())
        .await
        .unwrap();
    let opts = SealOptions {
        chunk_log2: 14,
        force: true,
        ..Default::default()
    };
    seal(
        &dir.path().join("src"),
        &dest,
        &ring2,
        &opts,
        &Cancel::never(),
    )
    .await
    .unwrap();
    // The republish is the model's next generation: a re-list sees it.
    tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    Box::pin(fs.refresh_if_due()).await; // boxed: a debug build's future is large
                                         // Same path, new version: a new inode, so the kernel's cached pages of the old one
                                         // can never be served for it; the old inode refuses new opens with ESTALE (the
                                         // kernel then looks the name up again).
    let stale = fs.open(ino, (0, 0)).await.unwrap_err();
    assert_eq!(stale.errno(), libc::ESTALE, "{stale}");
    let ino2 = fs.lookup(ROOT, "f").unwrap().ino;
    assert_ne!(ino2, ino, "a replaced object gets a new inode");
    assert_eq!(
        fs.open(ino, (0, 0)).await.unwrap_err().errno(),
        libc::ESTALE
    );
    let new = fs.open(ino2, (0, 0)).await.unwrap();
    let whole = fs.read(new, 0, len as u32).await.unwrap();
    assert!(whole.bytes() == &pattern(len, 99)[..]);
    drop(whole);

    // Background fetches hold their file until they finish, so wait (bounded) for them.
    settles_at(&fs, 12, "both versions read whole").await;
    fs.release(old);
    // The old generation's object is still there (until gc): its DEK and chunks are held
    // like a closed file's, for the grace (zero here), until the sweeper drops them.
    fs.sweep();
    settles_at(&fs, 6, "the old version's chunks left with it").await;
    fs.release(new);
    fs.sweep();
    settles_at(&fs, 0, "nothing left after the grace").await;
    assert_eq!(fs.deks_held(), 0);
}

/// A steady sequential reader tops its read-ahead window up in whole `max_fetch` GETs: one
/// ranged GET per 4 chunks here, not one per chunk read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sequential_read_ahead_fetches_in_whole_ranged_gets() {
    use std::sync::atomic::Ordering::Relaxed;
    let dir = tempfile::tempdir().unwrap();
    let chunks = 64u64;
    let len = (chunks * 16384) as usize;
    let config = MountConfig {
        max_fetch: 4 * 16384,
        max_prefetch: 16 * 16384,
        ..Default::default()
    };
    let (fs, ino, data) = core_over(dir.path(), len, config).await;
    let fh = fs.open(ino, (0, 0)).await.unwrap();
    for i in 0..chunks {
        let off = i * 16384;
        let r = fs.read(fh, off, 16384).await.unwrap();
        assert!(
            r.bytes() == &data[off as usize..off as usize + 16384],
            "chunk {i}"
        );
    }
    let fetches = fs.stats.fetches.load(Relaxed);
    // 64 chunks in GETs of 4, plus the ramp-up (windows 2, 4, 8) and chunk 0 from open.
    assert!(
        fetches <= chunks / 4 + 4,
        "{fetches} ranged GETs for {chunks} chunks"
    );
    assert_eq!(
        fs.stats.fetched_bytes.load(Relaxed),
        32 + chunks * (16384 + 16)
    );
    fs.release(fh);
}

/// A store that keeps the ETag while the bytes change (here: a local writer rewriting both
/// objects in place and restoring the mtime; on S3, a server reusing or omitting ETags)
/// cannot give one inode two versions: the inode is bound to the header MAC its first open
/// authenticated, so the next open after the DEK left fails with ESTALE and the path moves
/// to a new inode (the kernel's cached pages of the old version stay with the old one).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_inode_keeps_its_version_even_when_the_etag_does_not_change() {
    use std::os::unix::fs::FileExt;
    let dir = tempfile::tempdir().unwrap();
    let len = 3 * 16384 + 5;
    let config = MountConfig {
        dek_grace: std::time::Duration::ZERO,
        ..Default::default()
    };
    let (fs, ino, data) = core_over(dir.path(), len, config).await;
    let fh = fs.open(ino, (0, 0)).await.unwrap();
    assert!(fs.read(fh, 0, len as u32).await.unwrap().bytes() == &data[..]);
    fs.release(fh);
    fs.sweep();
    assert_eq!(fs.deks_held(), 0);

    // A second version of the same size, sealed elsewhere, written over the first in place.
    let other = dir.path().join("other");
    std::fs::create_dir_all(other.join("src")).unwrap();
    std::fs::write(other.join("src/f"), pattern(len, 5)).unwrap();
    let ring = Keyring::resolve(&[KeySpec::File(dir.path().join("k"))])
        .await
        .unwrap();
    let dest = Location::parse(&other.join("sealed").display().to_string())
        .await
        .unwrap();
    let opts = SealOptions {
        chunk_log2: 14,
        ..Default::default()
    };
    seal(&other.join("src"), &dest, &ring, &opts, &Cancel::never())
        .await
        .unwrap();
    // The model's manifest too, in place (same size): the store changed every byte and
    // no ETag.
    for name in [
        "f",
        "f.sealfs-c14",
        ".sealfs-manifest",
        ".sealfs-manifest.sealfs-c14",
    ] {
        let target = dir.path().join("sealed").join(name);
        let before = std::fs::metadata(&target).unwrap();
        let bytes = std::fs::read(other.join("sealed").join(name)).unwrap();
        assert_eq!(bytes.len() as u64, before.len(), "same sizes: same ETag");
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&target)
            .unwrap();
        f.write_all_at(&bytes, 0).unwrap();
        drop(f);
        let times = [
            libc::timespec {
                tv_sec: before.atime(),
                tv_nsec: before.atime_nsec(),
            },
            libc::timespec {
                tv_sec: before.mtime(),
                tv_nsec: before.mtime_nsec(),
            },
        ];
        let c = std::ffi::CString::new(target.display().to_string()).unwrap();
        // SAFETY: a valid path and two timespecs.
        assert_eq!(
            unsafe { libc::utimensat(libc::AT_FDCWD, c.as_ptr(), times.as_ptr(), 0) },
            0
        );
    }
    let e = fs.open(ino, (0, 0)).await.unwrap_err();
    assert_eq!(e.errno(), libc::ESTALE, "{e}");
    let ino2 = fs.lookup(ROOT, "f").unwrap().ino;
    assert_ne!(ino2, ino);
    let fh = fs.open(ino2, (0, 0)).await.unwrap();
    assert!(fs.read(fh, 0, len as u32).await.unwrap().bytes() == &pattern(len, 5)[..]);
    fs.release(fh);
}
