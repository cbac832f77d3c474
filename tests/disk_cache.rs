//! Issue 22: `--cache-dir DIR --cache-dir-size BYTES`, the sealed chunk cache on local disk,
//! through real mounts of local stores: a restart reads the bulk from DIR (proved by a store
//! whose chunks were damaged after the first mount), nothing plaintext lands there, every
//! hostile entry is deleted and read from the store instead, an open or symlinked DIR is
//! refused, two daemons share one DIR while evicting, and a full or deleted DIR costs no
//! reader an error.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::*;

const MIB: usize = 1 << 20;

/// A model of one 6.5-chunk file and a small one, sealed to `store`.
fn site() -> (Site, Vec<u8>) {
    site_of(6 * MIB + MIB / 2 + 77, 22)
}

/// A model of `w.bin` (`len` bytes of pattern `seed`) and a small file.
fn site_of(len: usize, seed: u64) -> (Site, Vec<u8>) {
    let s = Site::new();
    let big = pattern(len, seed);
    s.seal_files(&[
        ("w.bin", big.clone()),
        ("config.json", b"{\"layers\": 2}\n".to_vec()),
    ]);
    (s, big)
}

fn mount(s: &Site, cache: &Path, size: &str, port: u16) -> Mount {
    let addr = format!("127.0.0.1:{port}");
    Mount::start(
        &s.p("store"),
        &[
            "--key",
            &s.key(),
            "--cache-dir",
            &cache.display().to_string(),
            "--cache-dir-size",
            size,
            "--metrics-addr",
            &addr,
        ],
        &[],
    )
}

/// Waits until `metric` reaches `at_least` (the writer is behind the read path, at the
/// lowest CPU and I/O priority: slow on a busy CI machine).
fn wait_metric(port: u16, metric: &str, at_least: u64) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let v = scrape(port).get(metric).copied().unwrap_or(0);
        if v >= at_least || Instant::now() > deadline {
            return v;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Every regular file under `dir` (entries and anything else).
fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let t = e.file_type().unwrap();
            if t.is_dir() {
                stack.push(e.path());
            } else {
                out.push(e.path());
            }
        }
    }
    out
}

/// No 64-byte run of `plain` (taken every 64 KiB) appears in any file under `dir`.
fn assert_no_plaintext(dir: &Path, plain: &[u8]) {
    let needles: Vec<&[u8]> = (0..plain.len() - 64)
        .step_by(64 * 1024)
        .map(|o| &plain[o..o + 64])
        .collect();
    // Each needle's first 8 bytes first: one set lookup per position, not one compare per
    // needle (a debug build scans megabytes here).
    let heads: std::collections::HashSet<[u8; 8]> =
        needles.iter().map(|n| n[..8].try_into().unwrap()).collect();
    for f in files_under(dir) {
        let Ok(data) = std::fs::read(&f) else {
            continue;
        };
        for w in data.windows(64) {
            let head: [u8; 8] = w[..8].try_into().unwrap();
            if heads.contains(&head) {
                assert!(!needles.contains(&w), "plaintext in {}", f.display());
            }
        }
    }
}

fn read_all(m: &Mount, big: &[u8]) {
    let got = std::fs::read(m.path("w.bin")).unwrap();
    assert_eq!(sha256(&got), sha256(big), "w.bin reads back");
    assert_eq!(
        std::fs::read(m.path("config.json")).unwrap(),
        b"{\"layers\": 2}\n"
    );
}

/// Flips one byte of `w.bin`'s sealed data in its last chunk (never chunk 0, which always
/// comes from the store).
fn damage_store(s: &Site) {
    let p = s.path("store/w.bin");
    let mut b = std::fs::read(&p).unwrap();
    let at = b.len() - 5000;
    b[at] ^= 0x40;
    std::fs::write(&p, b).unwrap();
}

/// Where the entries of `w.bin`'s chunks 1..=6 are: the BLAKE3 of each sealed chunk of the
/// data object (a 32-byte prelude, then chunks of 1 MiB + a 16-byte tag).
fn chunk_entries(s: &Site, cache: &Path) -> Vec<PathBuf> {
    let data = std::fs::read(s.path("store/w.bin")).unwrap();
    let body = &data[32..];
    body.chunks(MIB + 16)
        .skip(1)
        .map(|c| {
            let h = hex::encode(blake3::hash(c).as_bytes());
            cache.join("v1").join(&h[..2]).join(&h)
        })
        .collect()
}

fn entries(cache: &Path) -> Vec<PathBuf> {
    files_under(&cache.join("v1"))
        .into_iter()
        .filter(|p| p.file_name().unwrap().len() == 64)
        .collect()
}

/// One daemon reads the model through `cache` and is gone once its writes are in: chunks
/// 1..=6 of w.bin (chunk 0 always comes from the store, and is not kept).
fn fill(s: &Site, cache: &Path, big: &[u8]) {
    let port = free_port();
    let m = mount(s, cache, "64MiB", port);
    read_all(&m, big);
    assert_eq!(wait_metric(port, "sealfs_disk_cache_writes_total", 6), 6);
}

#[test]
fn a_restart_reads_the_bulk_from_the_cache_directory_and_no_plaintext_lands_there() {
    let (s, big) = site();
    let cache = s.path("cache");
    fill(&s, &cache, &big);
    let mode = std::fs::metadata(&cache).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o700, "DIR is created 0700");
    let n = entries(&cache).len();
    assert_eq!(n, 6, "{:?}", entries(&cache));
    assert_no_plaintext(&cache, &big);
    let out = expect_code(
        &sealfs(&["cache", "stat", &cache.display().to_string()], &[]),
        0,
    );
    assert!(out.contains(&format!(": {n} entries, ")), "{out}");

    // The store's copy of the last chunk is now wrong: only the cache directory has it right.
    damage_store(&s);
    let port2 = free_port();
    let m = mount(&s, &cache, "64MiB", port2);
    read_all(&m, &big);
    let metrics = scrape(port2);
    assert!(
        metrics["sealfs_disk_cache_hits_total"] >= 6,
        "chunks 1..=6 came from the cache directory: {metrics:?}"
    );
    assert_eq!(metrics["sealfs_auth_failures_total"], 0);
    drop(m);
    // Without the cache directory the same store fails the read: the bytes above were the
    // cache's.
    let m = Mount::start(&s.p("store"), &["--key", &s.key()], &[]);
    assert!(std::fs::read(m.path("w.bin")).is_err());
}

#[test]
fn a_chunk_that_fails_authentication_is_never_written_to_the_cache_directory() {
    let (s, big) = site();
    let cache = s.path("cache");
    // The manifest's addresses of chunks 1..=6, before the store's last chunk is damaged;
    // then the address of the damaged bytes.
    let good = chunk_entries(&s, &cache);
    damage_store(&s);
    let bad = chunk_entries(&s, &cache);
    let port = free_port();
    let m = mount(&s, &cache, "64MiB", port);
    // The read path copies each fetched chunk into the entry's buffer before it checks it:
    // the damaged one fails, and its buffer must go back unwritten.
    assert!(
        std::fs::read(m.path("w.bin")).is_err(),
        "the damaged chunk fails the read"
    );
    let mut f = std::fs::File::open(m.path("w.bin")).unwrap();
    let mut head = vec![0u8; 6 * MIB];
    std::io::Read::read_exact(&mut f, &mut head).unwrap();
    assert!(head == big[..6 * MIB], "chunks 0..=5 read back");
    drop(f);
    assert_eq!(wait_metric(port, "sealfs_disk_cache_writes_total", 5), 5);
    let metrics = scrape(port);
    assert!(metrics["sealfs_auth_failures_total"] >= 1, "{metrics:?}");
    drop(m);
    for p in &good[..5] {
        assert!(p.exists(), "{} was written", p.display());
    }
    assert!(
        !good[5].exists() && !bad[5].exists(),
        "no entry for the damaged chunk"
    );
    assert_eq!(entries(&cache).len(), 5);
}

#[test]
fn a_hostile_entry_is_deleted_and_read_from_the_store_never_served() {
    let (s, big) = site();
    let cache = s.path("cache");
    fill(&s, &cache, &big);
    // The entries of w.bin's chunks 1..=6 (the ones a mount reads from the directory).
    let e = chunk_entries(&s, &cache);
    for p in &e {
        assert!(p.exists(), "{} was written", p.display());
    }
    // Another full-size chunk's bytes: the right length, the wrong BLAKE3.
    let other = std::fs::read(&e[4]).unwrap();
    // Flipped, truncated, another chunk's bytes, a symlink, a FIFO.
    let mut b = std::fs::read(&e[0]).unwrap();
    b[10] ^= 1;
    std::fs::write(&e[0], &b).unwrap();
    let b = std::fs::read(&e[1]).unwrap();
    std::fs::write(&e[1], &b[..b.len() / 2]).unwrap();
    std::fs::write(&e[2], &other).unwrap();
    std::fs::remove_file(&e[3]).unwrap();
    std::os::unix::fs::symlink(&e[5], &e[3]).unwrap();
    std::fs::remove_file(&e[4]).unwrap();
    nix::unistd::mkfifo(&e[4], nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();

    let port2 = free_port();
    let m = mount(&s, &cache, "64MiB", port2);
    read_all(&m, &big);
    let metrics = scrape(port2);
    // Chunk 0's entry may be among them: it is never read from DIR.
    assert_eq!(
        metrics["sealfs_disk_cache_corrupt_total"], 5,
        "each bad entry found and deleted"
    );
    assert_eq!(
        metrics["sealfs_disk_cache_hits_total"], 1,
        "the good one used"
    );
    assert_eq!(metrics["sealfs_auth_failures_total"], 0);
    assert_eq!(metrics["sealfs_fuse_op_errors_total{op=\"read\"}"], 0);
    // Each bad one was replaced by the chunk from the store, checked against its name.
    assert_eq!(wait_metric(port2, "sealfs_disk_cache_writes_total", 5), 5);
    for p in entries(&cache) {
        let meta = std::fs::symlink_metadata(&p).unwrap();
        assert!(
            meta.file_type().is_file(),
            "{} is a plain file",
            p.display()
        );
        let data = std::fs::read(&p).unwrap();
        let name = p.file_name().unwrap().to_string_lossy().into_owned();
        assert_eq!(hex::encode(blake3::hash(&data).as_bytes()), name);
    }
    assert_no_plaintext(&cache, &big);
    drop(m);
    let n = entries(&cache).len();
    let out = expect_code(
        &sealfs(&["cache", "clear", &cache.display().to_string()], &[]),
        0,
    );
    assert!(out.contains(&format!(": {n} entries deleted")), "{out}");
    assert!(entries(&cache).is_empty());
}

#[test]
fn an_open_or_symlinked_cache_directory_is_refused_in_one_line() {
    let (s, _) = site();
    let open = s.path("open");
    std::fs::create_dir(&open).unwrap();
    std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).unwrap();
    let link = s.path("link");
    std::os::unix::fs::symlink(s.path("src"), &link).unwrap();
    for (dir, why) in [(&open, "lets others write it"), (&link, "is a symlink")] {
        let r = Mount::try_start(
            &s.p("store"),
            &[
                "--key",
                &s.key(),
                "--cache-dir",
                &dir.display().to_string(),
                "--cache-dir-size",
                "64MiB",
            ],
            &[],
        );
        let err = r.err().expect("refused");
        assert!(err.contains("--cache-dir") && err.contains(why), "{err}");
    }
    let o = sealfs(
        &[
            "mount",
            &s.p("store"),
            &s.p("m"),
            "--key",
            &s.key(),
            "--cache-dir",
            &s.p("c"),
        ],
        &[],
    );
    assert_eq!(
        o.status.code(),
        Some(2),
        "--cache-dir needs --cache-dir-size"
    );
}

#[test]
fn two_daemons_share_one_directory_while_evicting() {
    // Two models of 11 chunks each (read from DIR: 10 each) under a 16 MiB limit.
    let (a, big_a) = site_of(10 * MIB + 5, 31);
    let (b, big_b) = site_of(10 * MIB + 5, 32);
    let cache = a.path("shared");
    let (p1, p2, p3) = (free_port(), free_port(), free_port());
    let m1 = mount(&a, &cache, "16MiB", p1);
    read_all(&m1, &big_a);
    assert_eq!(wait_metric(p1, "sealfs_disk_cache_writes_total", 10), 10);
    // Another daemon of the same model reads what the first one wrote.
    let m3 = mount(&a, &cache, "16MiB", p3);
    read_all(&m3, &big_a);
    assert_eq!(
        scrape(p3)["sealfs_disk_cache_hits_total"],
        10,
        "the second daemon read every chunk the first one wrote"
    );
    // A third daemon's model does not fit beside it: entries go, least recently used first.
    let m2 = mount(&b, &cache, "16MiB", p2);
    read_all(&m2, &big_b);
    assert_eq!(wait_metric(p2, "sealfs_disk_cache_writes_total", 10), 10);
    let evicted: u64 = [p1, p2, p3]
        .iter()
        .map(|p| scrape(*p)["sealfs_disk_cache_evictions_total"])
        .sum();
    assert!(evicted >= 2, "{evicted} evictions");
    let total: u64 = entries(&cache)
        .iter()
        .map(|p| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0))
        .sum();
    // Each daemon counts DIR again every tenth of the limit it writes: one daemon writing
    // at a time keeps it within a tenth over the limit (docs/CLI.md).
    assert!(
        total <= (16 << 20) + (16 << 20) / 10,
        "{total} bytes: more than a tenth over the 16 MiB limit"
    );
    // A new daemon of the first model: what was evicted comes from the store, all right.
    drop((m1, m3));
    let p4 = free_port();
    let m4 = mount(&a, &cache, "16MiB", p4);
    read_all(&m4, &big_a);
    for p in [p2, p4] {
        let x = scrape(p);
        assert_eq!(x["sealfs_auth_failures_total"], 0);
        assert_eq!(x["sealfs_fuse_op_errors_total{op=\"read\"}"], 0);
    }
}

/// A tmpfs of 2 MiB mounted at `dir` (root only), unmounted on drop.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(dir: &Path) -> Self {
        std::fs::create_dir_all(dir).unwrap();
        let st = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=2m,mode=0700", "tmpfs"])
            .arg(dir)
            .status()
            .expect("mount(8)");
        assert!(st.success(), "mounting a tmpfs needs root");
        Tmpfs(dir.to_path_buf())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(&self.0).status();
    }
}

#[test]
fn a_full_or_deleted_cache_directory_costs_no_reader_an_error() {
    let (s, big) = site();
    // Full: 2 MiB of room for 6.5 MiB of chunks.
    let cache = s.path("tiny");
    let tmpfs = Tmpfs::mount(&cache);
    let port = free_port();
    {
        let m = mount(&s, &cache, "64MiB", port);
        read_all(&m, &big);
        assert!(
            wait_metric(port, "sealfs_disk_cache_write_errors_total", 1) >= 1,
            "ENOSPC is counted"
        );
        let _ = std::fs::write("/proc/sys/vm/drop_caches", "1");
        read_all(&m, &big);
        let x = scrape(port);
        assert_eq!(x["sealfs_fuse_op_errors_total{op=\"read\"}"], 0);
        assert!(
            m.logs().contains("cache directory write failed"),
            "{}",
            m.logs()
        );
    }
    drop(tmpfs);

    // Deleted while mounted: a file not read before goes through the daemon after it.
    let s = Site::new();
    let (w, x) = (pattern(3 * MIB, 41), pattern(3 * MIB + 9, 42));
    s.seal_files(&[("w.bin", w.clone()), ("x.bin", x.clone())]);
    let cache = s.path("gone");
    let port = free_port();
    let m = mount(&s, &cache, "64MiB", port);
    assert_eq!(std::fs::read(m.path("w.bin")).unwrap(), w);
    wait_metric(port, "sealfs_disk_cache_writes_total", 2);
    std::fs::remove_dir_all(&cache).unwrap();
    assert_eq!(std::fs::read(m.path("x.bin")).unwrap(), x);
    assert!(
        wait_metric(port, "sealfs_disk_cache_write_errors_total", 1) >= 1,
        "writing into the deleted directory failed, and was counted"
    );
    assert_eq!(scrape(port)["sealfs_fuse_op_errors_total{op=\"read\"}"], 0);
}

#[test]
fn a_keyless_warm_fills_the_directory_that_a_later_mount_reads() {
    let (s, big) = site();
    let cache = s.path("warm");
    let dir = cache.display().to_string();
    // No key anywhere in the warm's arguments or environment.
    let warm = || {
        expect_code(
            &sealfs(
                &[
                    "cache",
                    "warm",
                    &s.p("store"),
                    "--cache-dir",
                    &dir,
                    "--cache-dir-size",
                    "64MiB",
                ],
                &[],
            ),
            0,
        )
    };
    let out = warm();
    // w.bin: chunks 1..=6 (chunk 0 is always read from the store); config.json and the
    // manifest are one chunk each: nothing to warm.
    assert!(out.contains("warmed 3 files: 6 chunks"), "{out}");
    assert_eq!(entries(&cache).len(), 6, "{out}");
    assert_no_plaintext(&cache, &big);
    // Again: everything is there already.
    let out = warm();
    assert!(out.contains("(0 written, 6 already there"), "{out}");
    // The store's last chunk damaged: the mount reads it right from the warmed entries.
    damage_store(&s);
    let port = free_port();
    let m = mount(&s, &cache, "64MiB", port);
    read_all(&m, &big);
    assert!(scrape(port)["sealfs_disk_cache_hits_total"] >= 6);
}

#[test]
fn a_warm_killed_half_way_leaves_only_whole_entries() {
    let s = Site::new();
    // 64 files of 2.5 chunks (128 entries): enough work to stop in the middle.
    let files: Vec<(String, Vec<u8>)> = (0..64)
        .map(|i| (format!("f{i:02}.bin"), pattern(2 * MIB + MIB / 2, 100 + i)))
        .collect();
    let refs: Vec<(&str, Vec<u8>)> = files.iter().map(|(n, d)| (n.as_str(), d.clone())).collect();
    s.seal_files(&refs);
    let cache = s.path("half");
    let mut child = std::process::Command::new(bin())
        .args(["cache", "warm", &s.p("store"), "--cache-dir"])
        .arg(&cache)
        .args(["--cache-dir-size", "1GiB", "--jobs", "1"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while entries(&cache).len() < 5 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let e = entries(&cache);
    assert!(
        !e.is_empty() && e.len() < 128,
        "killed half-way: {} entries",
        e.len()
    );
    for p in e {
        let data = std::fs::read(&p).unwrap();
        let name = p.file_name().unwrap().to_string_lossy().into_owned();
        assert_eq!(
            hex::encode(blake3::hash(&data).as_bytes()),
            name,
            "whole entries only"
        );
    }
}

#[test]
fn a_symlink_planted_inside_the_directory_is_never_followed() {
    let (s, big) = site();
    let cache = s.path("planted");
    let elsewhere = s.path("elsewhere");
    std::fs::create_dir(&elsewhere).unwrap();
    std::fs::create_dir(&cache).unwrap();
    std::fs::set_permissions(&cache, std::fs::Permissions::from_mode(0o700)).unwrap();
    std::fs::create_dir(cache.join("v1")).unwrap();
    std::fs::set_permissions(cache.join("v1"), std::fs::Permissions::from_mode(0o700)).unwrap();
    // The subdirectory chunk 1's entry goes in is a symlink to another directory.
    let target = chunk_entries(&s, &cache)[0].clone();
    let sub = target.parent().unwrap().to_path_buf();
    std::os::unix::fs::symlink(&elsewhere, &sub).unwrap();
    let port = free_port();
    let m = mount(&s, &cache, "64MiB", port);
    read_all(&m, &big);
    assert_eq!(wait_metric(port, "sealfs_disk_cache_writes_total", 6), 6);
    assert_eq!(
        std::fs::read_dir(&elsewhere).unwrap().count(),
        0,
        "nothing was written through the symlink"
    );
    let meta = std::fs::symlink_metadata(&sub).unwrap();
    assert!(meta.is_dir(), "the symlink was replaced by a directory");
    assert!(target.is_file(), "and the entry written there");
}
