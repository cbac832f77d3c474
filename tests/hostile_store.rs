//! The bucket is hostile (issue 9): `tools/fault_proxy.py` plays a malicious S3 in front of
//! moto_server, and every answer it forges must end in a bounded, one-line refusal, never
//! in a hang, a huge allocation, plaintext from the wrong bytes, a forged log line or a
//! path outside the mount.
//!
//! Each test here fails on the code before the fix (3bcbe66, checked by running this file
//! against that commit's binary); its doc comment says how.

mod common;

use std::io::Read;
use std::time::{Duration, Instant};

use common::*;

const CHUNK: usize = 64 * 1024;
/// The key objects' name suffix at `CHUNK`.
const KO: &str = ".sealfs-c16";
/// Exit code of a store failure (docs/CLI.md).
const EXIT_STORE: i32 = 5;
/// Exit code of a failed authentication (docs/CLI.md).
const EXIT_INTEGRITY: i32 = 3;

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// The plaintext tree every test seals: six files (twelve objects), the largest two chunks
/// (one verify batch, so a whole-object answer to its one ranged GET is byte-identical).
const FILES: [(&str, usize); 6] = [
    ("config.json", 300),
    ("model.bin", CHUNK + 4321),
    ("tokenizer.json", 1000),
    ("sub/a.txt", 10),
    ("sub/b.txt", 20),
    ("sub/c.txt", 30),
];

/// moto + proxy, bucket `models`, a file key, the plaintext tree in `src/`.
struct Fx {
    stack: Stack,
    dir: tempfile::TempDir,
    env: Vec<(String, String)>,
    key: String,
}

impl Fx {
    fn new() -> Self {
        let stack = Stack::start();
        rt().block_on(stack.create_bucket("models"));
        let dir = tempfile::tempdir().unwrap();
        for (i, (rel, len)) in FILES.iter().enumerate() {
            let p = dir.path().join("src").join(rel);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, pattern(*len, i as u64 + 1)).unwrap();
        }
        let kek = dir.path().join("kek");
        expect_code(&sealfs(&["keygen", kek.to_str().unwrap()], &[]), 0);
        let env = stack.env();
        Self {
            stack,
            key: format!("file:{}", kek.display()),
            dir,
            env,
        }
    }

    /// Seals `src/` to `dest` (through the proxy, before any fault is set).
    fn seal(&self, dest: &str) {
        let src = self.dir.path().join("src").display().to_string();
        let out = sealfs(
            &[
                "seal",
                &src,
                dest,
                "--key",
                &self.key,
                "--chunk-size",
                "64KiB",
            ],
            &self.env,
        );
        expect_code(&out, 0);
    }

    fn src(&self, rel: &str) -> Vec<u8> {
        std::fs::read(self.dir.path().join("src").join(rel)).unwrap()
    }

    /// `sealfs ARGS` killed after 60 s, so a listing that never ends fails the test.
    fn run(&self, args: &[&str]) -> Bounded {
        sealfs_bounded(args, &self.env, Duration::from_secs(60))
    }

    fn try_mount(&self, uri: &str, extra: &[&str]) -> Result<Mount, String> {
        let mut args = vec!["--key", self.key.as_str(), "--cache-size", "8MiB"];
        args.extend_from_slice(extra);
        Mount::try_start(uri, &args, &self.env)
    }

    fn mount(&self, uri: &str) -> Mount {
        self.try_mount(uri, &[]).unwrap_or_else(|e| panic!("{e}"))
    }
}

/// Asserts a run ended by itself with `code`, and returns its output.
#[track_caller]
fn ended(b: &Bounded, code: i32) -> &str {
    assert!(
        !b.timed_out,
        "still running after {:?} (killed); output:\n{}",
        b.elapsed, b.output
    );
    assert_eq!(b.code, Some(code), "exit status; output:\n{}", b.output);
    &b.output
}

/// The lines of `text` holding `needle`: exactly one is expected of a one-line error.
#[track_caller]
fn one_line<'a>(text: &'a str, needle: &str) -> &'a str {
    let hits: Vec<_> = text.lines().filter(|l| l.contains(needle)).collect();
    assert_eq!(hits.len(), 1, "one line with {needle:?} in:\n{text}");
    hits[0]
}

/// The errno of a failed read of `path` through the mount (panics if it succeeded).
#[track_caller]
fn read_errno(path: &std::path::Path) -> i32 {
    match std::fs::read(path) {
        Ok(b) => panic!(
            "{} read {} bytes from a hostile store",
            path.display(),
            b.len()
        ),
        Err(e) => e.raw_os_error().unwrap_or(0),
    }
}

/// `ls -a` of a directory, sorted: what a user of the mount sees there.
fn ls_a(dir: &std::path::Path) -> Vec<String> {
    let out = std::process::Command::new("ls")
        .arg("-a1")
        .arg(dir)
        .output()
        .unwrap();
    assert!(out.status.success(), "ls -a {}: {out:?}", dir.display());
    let mut v: Vec<String> = stdout(&out).lines().map(str::to_owned).collect();
    v.sort();
    v
}

/// A listing whose every page is truncated with a fresh random continuation token ends at
/// the page cap (2,000 pages, ~10 s here) with one line, for `inspect` and for `mount`.
/// Before the fix (3bcbe66) the SDK paginator followed fresh tokens forever: `inspect` was
/// still running when killed at 60 s, and the mount never became ready nor failed.
#[test]
fn endless_continuation_tokens_end_the_listing() {
    let f = Fx::new();
    f.seal("s3://models/p");
    f.stack.endless_list(false, 1);

    let b = f.run(&["inspect", "s3://models/p"]);
    let out = ended(&b, EXIT_STORE);
    let line = one_line(out, "listing refused");
    assert_eq!(
        line, "sealfs: error: p: listing refused: more than 2000 pages",
        "{out}"
    );
    assert!(b.elapsed < Duration::from_secs(60), "{:?}", b.elapsed);
    assert_eq!(f.stack.count("s3:LIST-endless"), 2000, "pages asked for");

    f.stack.reset();
    f.stack.endless_list(false, 1);
    let start = Instant::now();
    let err = f
        .try_mount("s3://models/p", &[])
        .err()
        .expect("a mount over an endless listing must fail");
    assert!(start.elapsed() < Duration::from_secs(60));
    assert!(err.contains("exit status: 5"), "{err}");
    let line = one_line(&err, "listing refused");
    assert!(
        line.ends_with("sealfs: error: p: listing refused: more than 2000 pages"),
        "{err}"
    );
    assert_eq!(f.stack.count("s3:LIST-endless"), 2000, "pages asked for");
}

/// The same continuation token on every page ends the listing at the second page, with an
/// error. Before the fix the SDK paginator's duplicate-token check ended it *silently*:
/// the pages so far were taken as the whole listing, so `inspect` reported "nothing
/// sealed" (exit 2) and the mount came up, with no word about the store (and had the
/// paginator not stopped, both would have run until killed).
#[test]
fn endless_continuation_tokens_end_the_listing_when_repeated() {
    let f = Fx::new();
    f.seal("s3://models/p");
    f.stack.endless_list(true, 0);

    let b = f.run(&["inspect", "s3://models/p"]);
    let out = ended(&b, EXIT_STORE);
    let line = one_line(out, "listing refused");
    assert_eq!(
        line, "sealfs: error: p: listing refused: a continuation token repeated",
        "{out}"
    );
    assert_eq!(
        f.stack.count("s3:LIST-endless"),
        2,
        "ends at the second page"
    );

    f.stack.reset();
    f.stack.endless_list(true, 1);
    let err = f
        .try_mount("s3://models/p", &[])
        .err()
        .expect("a mount over a looping listing must fail");
    assert!(err.contains("exit status: 5"), "{err}");
    let line = one_line(&err, "listing refused");
    assert!(
        line.ends_with("sealfs: error: p: listing refused: a continuation token repeated"),
        "{err}"
    );
    assert_eq!(
        f.stack.count("s3:LIST-endless"),
        2,
        "ends at the second page"
    );
}

/// A key object GET answered with 512 MiB (streamed by the proxy) is refused once it passes
/// the format's maximum, without reading the rest: `verify` fails fast with a small peak
/// RSS, the proxy sends a small fraction, and a mount's open fails with EIO while the
/// daemon's peak RSS stays small. Before the fix `Store::get` collected the whole body:
/// 512 MiB in memory (peak RSS far above the bound), then a format error ("bad magic",
/// exit 3, observed with the 3bcbe66 binary).
#[test]
fn a_huge_key_object_is_not_read_whole() {
    const HUGE: u64 = 512 << 20;
    const RSS_BOUND: u64 = 64 << 20;
    let f = Fx::new();
    f.seal("s3://models/p");
    f.stack.huge_get(KO, HUGE);
    let max = sealfs::format::header::MAX_KEY_OBJECT_LEN;

    let b = f.run(&["verify", "s3://models/p", "--key", &f.key]);
    let out = ended(&b, EXIT_STORE);
    let refused = format!("object refused: larger than {max} bytes");
    for (rel, _) in FILES {
        let line = one_line(out, &format!("s3://models/p/{rel}: "));
        assert!(
            line.starts_with("FAIL") && line.contains(&format!("p/{rel}{KO}: {refused}")),
            "{rel}: {out}"
        );
    }
    assert!(b.elapsed < Duration::from_secs(30), "{:?}", b.elapsed);
    assert!(
        b.peak_rss < RSS_BOUND,
        "verify peak RSS {} MiB",
        b.peak_rss >> 20
    );
    let sent = f.stack.count("huge_bytes_sent");
    eprintln!(
        "verify: {:?}, peak RSS {} KiB, proxy sent {} KiB for {} key objects",
        b.elapsed,
        b.peak_rss >> 10,
        sent >> 10,
        FILES.len()
    );
    // Every file's key object, and the model manifest's (read once).
    assert_eq!(f.stack.count("s3:GET-huge"), FILES.len() as u64 + 1);
    assert!(
        sent < 64 << 20,
        "the client kept reading: {} MiB of {} sent",
        sent >> 20,
        FILES.len() as u64 * (HUGE >> 20)
    );

    let m = f.mount("s3://models/p");
    let before = peak_rss(m.pid());
    let start = Instant::now();
    assert_eq!(read_errno(&m.path("model.bin")), libc::EIO);
    assert_eq!(read_errno(&m.path("config.json")), libc::EIO);
    assert!(start.elapsed() < Duration::from_secs(30));
    let after = peak_rss(m.pid());
    eprintln!(
        "mount peak RSS {} KiB before the opens, {} KiB after",
        before >> 10,
        after >> 10
    );
    assert!(
        after < RSS_BOUND && after - before < 16 << 20,
        "mount peak RSS {} MiB (was {} MiB before the opens)",
        after >> 20,
        before >> 20
    );
    assert!(m.logs().contains(&refused), "{}", m.logs());
}

/// A store that ignores `Range` (the proxy drops the header, moto answers 200 with the
/// whole object) is refused before its body is read: reads through the mount fail with
/// EIO and return no byte, `verify` fails every file with "Range ignored". Before the fix
/// the answer was taken as the range whenever its length matched: `verify` of these files
/// (each one ranged GET from byte 0 to the end, so the whole object is byte-identical to
/// the range) reported "ok" for every file, and the mount served all 300 bytes of
/// `config.json` (observed with the 3bcbe66 binary).
#[test]
fn a_store_ignoring_range_is_refused() {
    let f = Fx::new();
    f.seal("s3://models/p");
    let m = f.mount("s3://models/p");
    f.stack.ignore_range();

    for rel in ["config.json", "model.bin", "sub/a.txt"] {
        assert_eq!(read_errno(&m.path(rel)), libc::EIO, "{rel}");
    }
    // A partial read from the start (what the old code could serve from a whole-object
    // answer) fails too.
    let mut buf = [0u8; 16];
    let r = std::fs::File::open(m.path("tokenizer.json")).and_then(|mut h| h.read(&mut buf));
    assert_eq!(
        r.map_err(|e| e.raw_os_error()),
        Err(Some(libc::EIO)),
        "no plaintext from an unranged answer"
    );
    assert!(f.stack.count("s3:range-dropped") > 0);
    assert!(m.logs().contains("Range ignored"), "{}", m.logs());
    drop(m);

    let b = f.run(&["verify", "s3://models/p", "--key", &f.key]);
    let out = ended(&b, EXIT_STORE);
    for (rel, _) in FILES {
        let line = one_line(out, &format!("s3://models/p/{rel}: "));
        assert!(
            line.starts_with("FAIL") && line.contains("Range ignored"),
            "{rel}: {out}"
        );
    }
    assert!(!out.lines().any(|l| l.starts_with("ok")), "{out}");
}

/// A store that sends ranged GET bodies a few bytes at a time (each chunk in far more
/// pieces than the 8 a chunk is kept as, the tag split across sends) is still read right:
/// every file, whole and from odd offsets, equals its plaintext. The pieces past the 8th
/// are gathered into one buffer of the chunk's size instead of one handle each.
#[test]
fn a_body_dribbled_in_tiny_pieces_reads_right() {
    let f = Fx::new();
    f.seal("s3://models/p");
    let m = f.mount("s3://models/p");
    f.stack.dribble(37);
    // First a read across the chunk boundary, then every file whole.
    use std::os::unix::fs::FileExt;
    let h = std::fs::File::open(m.path("model.bin")).unwrap();
    let mut buf = vec![0u8; 5000];
    let at = CHUNK as u64 - 2500;
    h.read_exact_at(&mut buf, at).unwrap();
    assert_eq!(buf, f.src("model.bin")[at as usize..at as usize + 5000]);
    for (rel, _) in FILES {
        let want = f.src(rel);
        assert_eq!(std::fs::read(m.path(rel)).unwrap(), want, "{rel}");
    }
    assert!(f.stack.count("s3:GET-dribbled") > 0);
    // Each 64 KiB chunk went out in about 1,800 sends.
    assert!(
        f.stack.count("s3:dribble-sends") > 1700,
        "{}",
        f.stack.counts()
    );
}

/// LIST names that are not clean relative paths never reach the mount (no `etc`, no
/// extra `.`/`..`/empty entries), are logged escaped (a newline in a name cannot forge an
/// audit line), at most 16 of them plus a count line, and `inspect` shows each on one
/// line, escaped, with `refused_names` in its JSON. Before the fix these names were
/// paired and served (the tree was built from their non-empty segments: a directory named
/// `..` in the root, `a/b` for `m/a//b`, a file whose name holds a newline), logged
/// nowhere, and `inspect` had no `refused_names`.
#[test]
fn evil_names_are_hidden_and_logged_escaped() {
    const FORGED: &str = "INFO sealfs::audit: dek unwrapped";
    let f = Fx::new();
    f.seal("s3://models/m");
    let long = format!("m/{}", "y".repeat(1100));
    let evil = [
        "m/../../../etc/x".to_string(),
        "m/a//b".to_string(),
        "m/./c".to_string(),
        format!("m/x\n{FORGED}"),
        long.clone(),
    ];
    // Five evil data objects with a key object each, then five more to pass the log cap.
    let mut names: Vec<String> = Vec::new();
    for e in &evil {
        names.push(e.clone());
        names.push(format!("{e}.sealfs-c20"));
    }
    for i in 0..5 {
        names.push(format!("m/filler{i}//z"));
        names.push(format!("m/filler{i}//z.sealfs-c20"));
    }
    let entries: Vec<(&str, u64)> = names
        .iter()
        .map(|n| (n.as_str(), if n.ends_with("-c20") { 300 } else { 48 }))
        .collect();
    f.stack.inject_list(&entries);

    let m = f.mount("s3://models/m");
    assert!(f.stack.count("s3:LIST-injected") >= 20);
    assert_eq!(
        ls_a(&m.dir),
        [
            ".",
            "..",
            "config.json",
            "model.bin",
            "sub",
            "tokenizer.json"
        ]
    );
    assert_eq!(ls_a(&m.path("sub")), [".", "..", "a.txt", "b.txt", "c.txt"]);
    for gone in ["etc", "a", "c", "filler0", "x"] {
        assert_eq!(
            std::fs::metadata(m.path(gone))
                .map_err(|e| e.raw_os_error())
                .err(),
            Some(Some(libc::ENOENT)),
            "{gone}"
        );
    }
    assert_eq!(
        std::fs::read(m.path("config.json")).unwrap(),
        f.src("config.json")
    );

    let log = m.logs();
    assert!(
        !log.lines().any(|l| l.trim_start().starts_with(FORGED)),
        "a forged audit line:\n{log}"
    );
    for e in &evil[..4] {
        let esc = e.escape_debug().to_string();
        assert!(
            log.contains(&format!("name={esc} ")),
            "{esc} not logged:\n{log}"
        );
    }
    assert!(
        log.contains(r"name=m/x\nINFO sealfs::audit: dek unwrapped "),
        "{log}"
    );
    assert_eq!(
        log.matches("object name refused; hidden").count(),
        16,
        "at most 16 names logged:\n{log}"
    );
    assert!(
        log.lines()
            .any(|l| l.contains("more object names refused") && l.contains("count=20")),
        "{log}"
    );
    drop(m);

    let b = f.run(&["inspect", "s3://models/m"]);
    let out = ended(&b, 0);
    assert!(
        !out.lines().any(|l| l.trim_start().starts_with(FORGED)),
        "{out}"
    );
    assert_eq!(out.matches("refused name (hidden): ").count(), 20, "{out}");
    one_line(
        out,
        r"refused name (hidden): m/x\nINFO sealfs::audit: dek unwrapped (",
    );
    one_line(out, "refused name (hidden): m/../../../etc/x (");
    let b = f.run(&["inspect", "s3://models/m", "--json"]);
    let v: serde_json::Value = serde_json::from_str(ended(&b, 0)).unwrap();
    let refused = v["refused_names"].as_array().unwrap();
    assert_eq!(refused.len(), 20, "{v}");
    let names: Vec<&str> = refused
        .iter()
        .map(|r| r["name"].as_str().unwrap())
        .collect();
    assert!(
        names.contains(&r"m/x\nINFO sealfs::audit: dek unwrapped"),
        "{names:?}"
    );
    assert!(names.iter().all(|n| !n.contains('\n')), "{names:?}");
    let reason_of = |n: &str| {
        refused
            .iter()
            .find(|r| r["name"] == n)
            .map(|r| r["reason"].as_str().unwrap().to_string())
    };
    assert_eq!(
        reason_of("m/../../../etc/x").as_deref(),
        Some("has a '.' or '..' path segment")
    );
    assert_eq!(
        reason_of("m/a//b").as_deref(),
        Some("has an empty path segment ('//' or a trailing '/')")
    );
    assert_eq!(
        reason_of(r"m/x\nINFO sealfs::audit: dek unwrapped").as_deref(),
        Some("has a control character")
    );
    // A key longer than S3's 1,024 bytes is cut (bounded) and refused.
    assert!(refused
        .iter()
        .any(|r| r["reason"] == "longer than 1024 bytes"
            && r["name"].as_str().unwrap().len() <= 1025));
    assert_eq!(v["files"].as_array().unwrap().len(), FILES.len());
}

/// Copies objects from `from` to `to` (keys mapped by `map`; `None` skips) directly in
/// moto, as someone with write access to the bucket would.
async fn copy(stack: &Stack, from: &str, to: &str, map: impl Fn(&str) -> Option<String>) {
    let s3 = stack.s3().await;
    for (key, _) in stack.keys_in(from).await {
        if let Some(dest) = map(&key) {
            s3.copy_object()
                .copy_source(format!("{from}/{key}"))
                .bucket(to)
                .key(dest)
                .send()
                .await
                .unwrap();
        }
    }
}

/// Path binding is exact. `m1/config.json` (and its key object) copied over
/// `m2/config.json` and to `mirror/m1/config.json` is refused by `verify` (naming the
/// file and the path it was sealed for) and by a mount of the parent, which still serves
/// m1 and the rest of m2; the whole bucket replicated to another bucket under the same keys
/// verifies and opens. Before the fix a key ending in `/<sealed path>` was accepted, so the
/// copy at `mirror/m1/config.json` verified "ok" and opened.
#[test]
fn a_file_copied_to_another_prefix_is_refused_but_replication_opens() {
    let f = Fx::new();
    rt().block_on(async {
        f.stack.create_bucket("bucket1").await;
        f.stack.create_bucket("bucket2").await;
    });
    f.seal("s3://bucket1/m1");
    f.seal("s3://bucket1/m2");
    // The data object and its key object ("m1/config.json" + ".sealfs-c16"), each time.
    for to in ["m2/config.json", "mirror/m1/config.json"] {
        rt().block_on(copy(&f.stack, "bucket1", "bucket1", |k| {
            k.strip_prefix("m1/config.json")
                .map(|rest| format!("{to}{rest}"))
        }));
    }

    let swapped = r#"sealed for path "m1/config.json": file swapped or copied"#;
    for (uri, file) in [
        ("s3://bucket1/m2", "m2/config.json"),
        ("s3://bucket1/mirror", "mirror/m1/config.json"),
    ] {
        let b = f.run(&["verify", uri, "--key", &f.key]);
        let out = ended(&b, EXIT_INTEGRITY);
        let line = one_line(out, &format!("s3://bucket1/{file}: "));
        assert!(line.starts_with("FAIL") && line.contains(swapped), "{out}");
    }
    // The rest of m2 is untouched.
    let b = f.run(&["verify", "s3://bucket1/m2", "--key", &f.key]);
    let out = b.output.clone();
    assert_eq!(
        out.lines().filter(|l| l.starts_with("ok")).count(),
        FILES.len() - 1,
        "{out}"
    );

    // The parent prefix holds both models (and the mirror): one mount serves both.
    let m = f.mount("s3://bucket1");
    assert_eq!(ls_a(&m.dir), [".", "..", "m1", "m2", "mirror"]);
    for (rel, _) in FILES {
        assert_eq!(
            std::fs::read(m.path(&format!("m1/{rel}"))).unwrap(),
            f.src(rel),
            "m1/{rel}"
        );
        if rel != "config.json" {
            assert_eq!(
                std::fs::read(m.path(&format!("m2/{rel}"))).unwrap(),
                f.src(rel),
                "m2/{rel}"
            );
        }
    }
    assert_eq!(read_errno(&m.path("m2/config.json")), libc::EIO);
    assert_eq!(read_errno(&m.path("mirror/m1/config.json")), libc::EIO);
    let log = m.logs();
    assert!(log.contains(swapped), "{log}");
    drop(m);

    // Replication: the same keys in another bucket open and verify.
    rt().block_on(copy(&f.stack, "bucket1", "bucket2", |k| {
        Some(k.to_string())
    }));
    let b = f.run(&["verify", "s3://bucket2/m1", "--key", &f.key]);
    let out = ended(&b, 0);
    assert_eq!(
        out.lines().filter(|l| l.starts_with("ok")).count(),
        FILES.len(),
        "{out}"
    );
    let m = f.mount("s3://bucket2/m1");
    assert_eq!(
        std::fs::read(m.path("model.bin")).unwrap(),
        f.src("model.bin")
    );
}

/// A listing of more objects than `--max-objects` fails the mount with one line naming the
/// flag; exactly as many mounts. Before the fix there was no bound (nor the flag: the
/// mount failed as a usage error, without the listing message).
#[test]
fn many_objects_past_max_objects_fail_the_listing() {
    let f = Fx::new();
    f.seal("s3://models/p");
    let err = f
        .try_mount("s3://models/p", &["--max-objects", "13"])
        .err()
        .expect("14 objects (12 and the manifest's 2) past --max-objects 13");
    assert!(err.contains("exit status: 5"), "{err}");
    let line = one_line(&err, "listing refused");
    assert!(
        line.ends_with(
            "sealfs: error: p: listing refused: more than 13 objects (raise --max-objects)"
        ),
        "{err}"
    );
    let m = f
        .try_mount("s3://models/p", &["--max-objects", "14"])
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        std::fs::read(m.path("sub/c.txt")).unwrap(),
        f.src("sub/c.txt")
    );
}
