//! A hostile local store, through real mounts and the real binary: whoever can write the
//! directory must not be able to mix versions through the page cache, move a file to another
//! model, forge log lines with names, size the locked cache, or exhaust the daemon.
//! (The S3 side, with a fault proxy playing the store, is tests/hostile_store.rs.)

mod common;

use std::io::Read;
use std::path::Path;
use std::time::{Duration, Instant};

use common::*;

const C: usize = 64 * 1024;

/// Seals `src` into `dest` with 64 KiB chunks under the site's key file.
impl Site {
    fn seal(&self, src: &str, dest: &str, extra: &[&str]) {
        let key = self.key();
        let mut args = vec![
            "seal",
            src,
            dest,
            "--key",
            key.as_str(),
            "--chunk-size",
            "64KiB",
        ];
        args.extend_from_slice(extra);
        expect_code(&sealfs(&args, &[]), 0);
    }
}

fn read_all(p: &Path) -> Vec<u8> {
    let mut v = Vec::new();
    std::fs::File::open(p)
        .and_then(|mut f| f.read_to_end(&mut v))
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    v
}

/// Index of the first 4 KiB page where `got` differs from `want`.
fn first_bad_page(got: &[u8], want: &[u8]) -> Option<usize> {
    assert_eq!(got.len(), want.len(), "sizes differ");
    (0..got.len().div_ceil(4096)).find(|p| {
        let r = p * 4096..((p + 1) * 4096).min(got.len());
        got[r.clone()] != want[r]
    })
}

/// Point 1. A model re-sealed with the same size (retrained weights, same shapes): after
/// the re-list, a new open must see only the new version, never the old version's pages
/// from the kernel page cache (the mount keeps the page cache across opens). On the code
/// before the fix the inode and mtime stayed, so the kernel served the old pages.
#[test]
fn a_same_size_reseal_is_never_served_from_the_old_versions_pages() {
    let s = Site::new();
    let len = 8 * C + 123;
    let v1 = pattern(len, 1);
    s.write("src/model.bin", &v1);
    s.seal(&s.p("src"), &s.p("sealed"), &[]);
    let key = s.key();
    let m = Mount::start(&s.p("sealed"), &["--key", &key, "--list-ttl", "1s"], &[]);
    let path = m.path("model.bin");
    assert!(read_all(&path) == v1, "first version read whole");
    let mtime1 = std::fs::metadata(&path).unwrap().modified().unwrap();

    let v2 = pattern(len, 2);
    s.write("src/model.bin", &v2);
    s.seal(&s.p("src"), &s.p("sealed"), &["--force"]);
    // Wait (bounded) for the re-list to show the new version: its mtime is the object's.
    let start = Instant::now();
    while std::fs::metadata(&path).unwrap().modified().unwrap() == mtime1
        && start.elapsed() < Duration::from_secs(10)
    {
        std::thread::sleep(Duration::from_millis(50));
    }
    let got = read_all(&path);
    assert_eq!(
        first_bad_page(&got, &v2),
        None,
        "after the re-list every page is the new version's"
    );
    drop(m);

    // Without a re-list (--list-ttl 0) the mount serves the version it listed, whole: a
    // republish is the model's next generation, switched to by its manifest, which only a
    // listing sees (the old generation's objects are untouched until gc). A new mount then
    // reads only the new version.
    let m = Mount::start(&s.p("sealed"), &["--key", &key, "--list-ttl", "0"], &[]);
    let path = m.path("model.bin");
    assert!(read_all(&path) == v2);
    let v3 = pattern(len, 3);
    s.write("src/model.bin", &v3);
    s.seal(&s.p("src"), &s.p("sealed"), &["--force"]);
    std::thread::sleep(Duration::from_millis(1100)); // past the kernel's 1 s entry TTL
    assert_eq!(
        first_bad_page(&read_all(&path), &v2),
        None,
        "the listed version, whole, with no page of the new one"
    );
    drop(m);
    let m = Mount::start(&s.p("sealed"), &["--key", &key, "--list-ttl", "0"], &[]);
    assert_eq!(first_bad_page(&read_all(&m.path("model.bin")), &v3), None);
}

/// Point 3. A file is served only at the key it was sealed for. A local store holding
/// several models is marked by `.sealfs-store` at its root (like a bucket): mounting the
/// parent serves every model, a file copied into another model is refused, and a copy of
/// the whole store elsewhere (a replicated bucket) still opens. Before the fix any key
/// ending with the sealed path at a `/` was accepted.
#[test]
fn a_file_copied_into_another_model_is_refused() {
    let s = Site::new();
    s.write("src1/config.json", b"{\"model\": 1}\n");
    s.write("src2/config.json", b"{\"model\": 2}\n");
    std::fs::create_dir_all(s.path("store")).unwrap();
    std::fs::write(s.path("store/.sealfs-store"), b"").unwrap();
    s.seal(&s.p("src1"), &s.p("store/m1"), &[]);
    s.seal(&s.p("src2"), &s.p("store/m2"), &[]);
    let key = s.key();
    {
        let m = Mount::start(&s.p("store"), &["--key", &key], &[]);
        assert_eq!(read_all(&m.path("m1/config.json")), b"{\"model\": 1}\n");
        assert_eq!(read_all(&m.path("m2/config.json")), b"{\"model\": 2}\n");
        let names: Vec<_> = std::fs::read_dir(&m.dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert!(!names.contains(&".sealfs-store".to_string()), "{names:?}");
    }
    // A model directory mounted by itself still opens (its keys are under the marked root).
    {
        let m = Mount::start(&s.p("store/m1"), &["--key", &key], &[]);
        assert_eq!(read_all(&m.path("config.json")), b"{\"model\": 1}\n");
    }
    // The whole store copied elsewhere: same keys, still opens.
    let copy = s.path("replica");
    let st = std::process::Command::new("cp")
        .args(["-a", &s.p("store"), &copy.display().to_string()])
        .status()
        .unwrap();
    assert!(st.success());
    let out = sealfs(&["verify", &s.p("replica"), "--key", &key], &[]);
    expect_code(&out, 0);

    // m1's config copied over m2's (same name, same key): refused everywhere.
    for f in ["config.json", "config.json.sealfs-c16"] {
        std::fs::copy(
            s.path(&format!("store/m1/{f}")),
            s.path(&format!("store/m2/{f}")),
        )
        .unwrap();
    }
    let out = sealfs(&["verify", &s.p("store/m2"), "--key", &key], &[]);
    let err = expect_code(&out, 3);
    assert!(
        err.contains("sealed for path \"m1/config.json\": file swapped or copied"),
        "{err}"
    );
    let m = Mount::start(&s.p("store"), &["--key", &key], &[]);
    let e = std::fs::read(m.path("m2/config.json")).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EIO), "{e}");
    assert_eq!(read_all(&m.path("m1/config.json")), b"{\"model\": 1}\n");
}

/// Point 8 (and the mount side of point 2). Names that are not a clean relative path are
/// hidden, and logged escaped: a newline in a name cannot forge a log line (here a fake
/// audit event). Before the fix such a name was listed and logged raw.
#[test]
fn names_with_control_characters_are_hidden_and_logged_escaped() {
    let s = Site::new();
    s.write("src/f", &pattern(100, 5));
    s.seal(&s.p("src"), &s.p("sealed"), &[]);
    let forged = "x\nINFO sealfs::audit: dek unwrapped file=forged";
    for (from, to) in [("f", forged.to_string()), ("f", "tab\there".to_string())] {
        std::fs::copy(
            s.path(&format!("sealed/{from}")),
            s.path(&format!("sealed/{to}")),
        )
        .unwrap();
        std::fs::copy(
            s.path(&format!("sealed/{from}.sealfs-c16")),
            s.path(&format!("sealed/{to}.sealfs-c16")),
        )
        .unwrap();
    }
    let key = s.key();
    let m = Mount::start(&s.p("sealed"), &["--key", &key], &[]);
    let names: Vec<_> = std::fs::read_dir(&m.dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(names, ["f"], "only the clean name is listed");
    let logs = m.logs();
    assert!(
        logs.contains("x\\nINFO sealfs::audit: dek unwrapped file=forged"),
        "the name is logged escaped:\n{logs}"
    );
    assert!(logs.contains("tab\\there"), "{logs}");
    assert!(
        !logs.lines().any(|l| l.starts_with("INFO sealfs::audit")),
        "no forged line:\n{logs}"
    );
    // inspect shows the refused names escaped, one line each.
    let out = sealfs(&["inspect", &s.p("sealed")], &[]);
    let text = stdout(&out);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        text.contains("refused name (hidden): x\\nINFO sealfs::audit: dek unwrapped file=forged (has a control character)"),
        "{text}"
    );
    assert!(
        !text.lines().any(|l| l.starts_with("INFO sealfs::audit")),
        "{text}"
    );
}

/// Point 5. The DEK sweeper runs in a task of its own until the FUSE loop ends: after
/// SIGTERM with one file still open, the daemon keeps serving it, and the DEK of a file
/// already closed is still released after --dek-grace. Before the fix the sweeper was
/// aborted at the signal, so that DEK (and its chunks) stayed for as long as the other
/// file was open.
#[test]
fn deks_of_closed_files_leave_on_time_while_a_signalled_daemon_waits() {
    let s = Site::new();
    s.write("src/a", &pattern(3 * C, 1));
    s.write("src/b", &pattern(3 * C, 2));
    s.seal(&s.p("src"), &s.p("sealed"), &[]);
    let key = s.key();
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let mut m = Mount::start(
        &s.p("sealed"),
        &["--key", &key, "--dek-grace", "1s", "--metrics-addr", &addr],
        &[],
    );
    let mut held = std::fs::File::open(m.path("a")).unwrap();
    let mut first = [0u8; 10];
    held.read_exact(&mut first).unwrap();
    assert_eq!(read_all(&m.path("b")), pattern(3 * C, 2));
    assert_eq!(scrape(port)["sealfs_deks_held"], 2);
    // SAFETY: signalling our own child.
    unsafe { libc::kill(m.pid() as i32, libc::SIGTERM) };
    let start = Instant::now();
    loop {
        let held_now = scrape(port)["sealfs_deks_held"];
        if held_now == 1 {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "{held_now} DEKs held 10 s after b was closed (grace 1 s):\n{}",
            m.logs()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let mut rest = Vec::new();
    held.read_to_end(&mut rest).unwrap();
    assert_eq!(rest.len(), 3 * C - 10, "the open file is still served");
    drop(held);
    m.stop_with_exit_0();
}

/// Point 4. Nothing a store lists sizes the locked cache: two tiny objects named like a
/// 64 MiB-chunk file used to make the cache 8 × 64 MiB whatever --cache-size said. Now the
/// slot size is --max-chunk-size (default 1 MiB) and such files are hidden and logged.
#[test]
fn names_cannot_size_the_locked_cache() {
    let s = Site::new();
    s.write("src/f", &pattern(C, 1));
    s.seal(&s.p("src"), &s.p("sealed"), &[]);
    std::fs::write(s.path("sealed/x"), b"1").unwrap();
    std::fs::write(s.path("sealed/x.sealfs-c26"), b"1").unwrap();
    let key = s.key();
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let m = Mount::start(
        &s.p("sealed"),
        &[
            "--key",
            &key,
            "--cache-size",
            "8MiB",
            "--metrics-addr",
            &addr,
        ],
        &[],
    );
    let locked = scrape(port)["sealfs_cache_locked_bytes"];
    assert!(
        locked <= 8 * ((1 << 20) + 16),
        "{locked} bytes locked for an 8 MiB cache"
    );
    assert_eq!(read_all(&m.path("f")), pattern(C, 1));
    assert!(m.logs().contains("hidden"), "{}", m.logs());
    drop(m);
    // A file sealed with bigger chunks than --max-chunk-size is hidden, and shown when
    // the flag allows it.
    s.write("src2/big", &pattern(3 * C, 2));
    let st = sealfs(
        &[
            "seal",
            &s.p("src2"),
            &s.p("sealed2"),
            "--key",
            &key,
            "--chunk-size",
            "2MiB",
        ],
        &[],
    );
    expect_code(&st, 0);
    let m = Mount::start(&s.p("sealed2"), &["--key", &key], &[]);
    assert!(!m.path("big").exists());
    assert!(m.logs().contains("above --max-chunk-size"), "{}", m.logs());
    drop(m);
    let m = Mount::start(
        &s.p("sealed2"),
        &["--key", &key, "--max-chunk-size", "2MiB"],
        &[],
    );
    assert_eq!(read_all(&m.path("big")), pattern(3 * C, 2));
}

/// Runs the binary with a deadline: (exit code, stdout + stderr), or panics naming the hang.
fn run_bounded(args: &[&str], limit: Duration) -> (i32, String) {
    let mut c = std::process::Command::new(bin())
        .args(args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let start = Instant::now();
    loop {
        if let Some(st) = c.try_wait().unwrap() {
            let mut out = String::new();
            c.stdout.take().unwrap().read_to_string(&mut out).unwrap();
            c.stderr.take().unwrap().read_to_string(&mut out).unwrap();
            return (st.code().unwrap_or(-1), out);
        }
        if start.elapsed() > limit {
            let _ = c.kill();
            let _ = c.wait();
            panic!("sealfs {args:?} still running after {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Point 4. A key object is read only up to the largest one the format allows: before the
/// fix a huge key object was read whole into memory (4 GiB here) before being refused.
/// (FIFOs and symlinks are never listed by a local store; a swap after the listing is
/// covered by the store's unit tests.)
#[test]
fn a_huge_key_object_is_not_read_whole() {
    let s = Site::new();
    s.write("src/huge", &pattern(100, 1));
    s.write("src/fine", &pattern(100, 2));
    s.seal(&s.p("src"), &s.p("sealed"), &[]);
    std::fs::OpenOptions::new()
        .write(true)
        .open(s.path("sealed/huge.sealfs-c16"))
        .unwrap()
        .set_len(4 << 30)
        .unwrap();
    let key = s.key();
    let (code, err) = run_bounded(
        &["verify", &s.p("sealed"), "--key", &key],
        Duration::from_secs(30),
    );
    assert_ne!(code, 0, "{err}");
    assert!(
        err.contains("huge.sealfs-c16: object refused: larger than"),
        "{err}"
    );
    assert!(!err.contains("fine:"), "the other file verified: {err}");
}

/// Point 4. A listing holds at most --max-objects objects: past it the mount fails to
/// start with one line naming the flag (a store could otherwise list without end).
#[test]
fn a_listing_past_max_objects_fails_with_one_line() {
    let s = Site::new();
    for i in 0..6 {
        s.write(&format!("src/f{i}"), b"x");
    }
    s.seal(&s.p("src"), &s.p("sealed"), &[]);
    let key = s.key();
    let r = Mount::try_start(&s.p("sealed"), &["--key", &key, "--max-objects", "10"], &[]);
    let err = r
        .err()
        .expect("12 objects past --max-objects 10 must fail the mount");
    assert!(
        err.contains("listing refused: more than 10 objects (raise --max-objects)"),
        "{err}"
    );
    // 12 objects of 6 files, and the model manifest's two.
    let m = Mount::start(&s.p("sealed"), &["--key", &key, "--max-objects", "14"], &[]);
    assert_eq!(read_all(&m.path("f5")), b"x");
}

/// Point 2 (the seal side): a source file whose name would not come back as a clean
/// relative key (here a newline) is refused with one line before anything is uploaded,
/// and an `s3://` prefix with a `..` segment is a bad URI. Before the fix both were sealed.
#[test]
fn seal_refuses_names_a_mount_or_unseal_would_refuse() {
    let s = Site::new();
    s.write("src/ok", b"fine");
    s.write("src/bad\nname", b"x");
    let key = s.key();
    let out = sealfs(&["seal", &s.p("src"), &s.p("sealed"), "--key", &key], &[]);
    let err = stderr(&out);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("bad\\nname: not a clean relative object name: has a control character"),
        "{err}"
    );
    assert_eq!(err.trim_end().lines().count(), 1, "one line: {err}");
    assert!(
        !s.path("sealed").exists() || std::fs::read_dir(s.path("sealed")).unwrap().count() == 0,
        "nothing written"
    );
    let out = sealfs(
        &["seal", &s.p("src/ok"), "s3://bucket/m/../x", "--key", &key],
        &[],
    );
    let err = stderr(&out);
    assert!(err.contains("bad location \"s3://bucket/m/../x\""), "{err}");
}
