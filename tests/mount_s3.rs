//! Real FUSE mounts of S3 (moto) with KMS keys, through the counting, fault-injecting proxy.

mod common;

use std::io::{Read, Seek, SeekFrom};
use std::time::{Duration, Instant};

use common::*;
use serde_json::json;

const C: usize = 64 * 1024;

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap()
}

struct Fx {
    stack: Stack,
    dir: tempfile::TempDir,
    env: Vec<(String, String)>,
    key_a: String,
    key_b: String,
}

impl Fx {
    fn new() -> Self {
        let stack = Stack::start();
        let (key_a, key_b) = rt().block_on(async {
            stack.create_bucket("models").await;
            (
                stack.create_key(Some("alias/models-a")).await,
                stack.create_key(None).await,
            )
        });
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src");
        std::fs::create_dir_all(src.join("sub")).unwrap();
        for (name, len) in [
            ("empty", 0),
            ("edge", C),
            ("edge+", C + 1),
            ("model.bin", 12 * C + 5),
        ] {
            std::fs::write(src.join(name), pattern(len, len as u64)).unwrap();
        }
        std::fs::write(src.join("sub/config.json"), b"{}\n").unwrap();
        let env = stack.env();
        let f = Self {
            stack,
            dir,
            env,
            key_a,
            key_b,
        };
        let out = sealfs(
            &[
                "seal",
                &f.p("src"),
                "s3://models/llama",
                "--key",
                "kms:alias/models-a",
                "--chunk-size",
                "64KiB",
            ],
            &f.env,
        );
        expect_code(&out, 0);
        f
    }
    fn p(&self, rel: &str) -> String {
        self.dir.path().join(rel).display().to_string()
    }
    fn src(&self, rel: &str) -> Vec<u8> {
        std::fs::read(self.dir.path().join("src").join(rel)).unwrap()
    }
    fn mount(&self, extra: &[&str]) -> Mount {
        let a = format!("kms:{}", self.key_a);
        let b = format!("kms:{}", self.key_b);
        let mut args = vec!["--key", &a, "--key", &b];
        args.extend_from_slice(extra);
        Mount::start("s3://models/llama", &args, &self.env)
    }
}

#[test]
fn listing_and_stat_need_no_get_and_no_kms_and_content_matches() {
    let f = Fx::new();
    let m = f.mount(&[]);
    f.stack.reset();
    for (rel, len) in [
        ("empty", 0),
        ("edge", C),
        ("edge+", C + 1),
        ("model.bin", 12 * C + 5),
        ("sub/config.json", 3),
    ] {
        assert_eq!(
            std::fs::metadata(m.path(rel)).unwrap().len(),
            len as u64,
            "{rel}"
        );
    }
    assert_eq!(std::fs::read_dir(m.path("")).unwrap().count(), 5);
    let c = f.stack.counts();
    assert_eq!(
        c["s3:GET"].as_u64().unwrap_or(0) + c["s3:HEAD"].as_u64().unwrap_or(0),
        0,
        "stat/ls used no GET/HEAD: {c}"
    );
    assert_eq!(c["kms:Decrypt"].as_u64().unwrap_or(0), 0);
    for rel in ["empty", "edge", "edge+", "model.bin", "sub/config.json"] {
        assert_eq!(
            sha256(&std::fs::read(m.path(rel)).unwrap()),
            sha256(&f.src(rel)),
            "{rel}"
        );
    }
}

#[test]
fn repeated_and_parallel_opens_cost_one_kms_decrypt() {
    let f = Fx::new();
    let m = f.mount(&[]);
    f.stack.reset();
    for _ in 0..20 {
        let mut b = [0u8; 16];
        std::fs::File::open(m.path("model.bin"))
            .unwrap()
            .read_exact(&mut b)
            .unwrap();
    }
    // One Decrypt for the file's DEK: the model's manifest was loaded at mount, before
    // READY (fs::SealFs::preload_models).
    assert_eq!(f.stack.count("kms:Decrypt"), 1, "20 open/close cycles");
    // With the DEK held, an open costs one GET (the 32-byte prelude, pinned to the listed
    // ETag) and no LIST or key-object GET; the data comes from the page cache.
    f.stack.reset();
    drop(std::fs::File::open(m.path("model.bin")).unwrap());
    let c = f.stack.counts();
    assert_eq!(c["s3:GET"].as_u64().unwrap_or(0), 1, "one GET only: {c}");
    assert_eq!(c["kms:Decrypt"].as_u64().unwrap_or(0), 0);
    let path = m.path("edge+").display().to_string();
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/python/readers.py");
    let kids: Vec<_> = (0..8)
        .map(|_| {
            std::process::Command::new("python3")
                .arg(&script)
                .args(["sha256", &path])
                .stdout(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let want = sha256(&f.src("edge+"));
    for k in kids {
        assert_eq!(stdout(&k.wait_with_output().unwrap()).trim(), want);
    }
    assert_eq!(
        f.stack.count("kms:Decrypt"),
        1,
        "8 parallel worker processes on another file: one Decrypt"
    );
}

/// `--unwrap-ahead N`: the first open of a file of a model unwraps the DEKs of the model's
/// other files in the background; their opens then make no KMS call.
#[test]
fn unwrap_ahead_opens_a_models_next_files_with_no_kms_call() {
    let f = Fx::new();
    let m = f.mount(&["--unwrap-ahead", "8"]);
    f.stack.reset();
    assert_eq!(std::fs::read(m.path("edge")).unwrap(), f.src("edge"));
    // edge's own Decrypt, then one for each of the 4 other files, in the background.
    let start = std::time::Instant::now();
    while f.stack.count("kms:Decrypt") < 5 {
        assert!(
            start.elapsed() < Duration::from_secs(15),
            "{}",
            f.stack.counts()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(f.stack.count("kms:Decrypt"), 5, "at most one per file");
    f.stack.reset();
    for rel in ["empty", "edge+", "model.bin", "sub/config.json"] {
        assert_eq!(std::fs::read(m.path(rel)).unwrap(), f.src(rel), "{rel}");
    }
    assert_eq!(
        f.stack.count("kms:Decrypt"),
        0,
        "the next files opened with no KMS call"
    );
    assert_eq!(m.logs().matches("dek unwrapped").count(), 5, "{}", m.logs());
    // Each DEK unwrapped ahead names, at its first use, who opened it.
    assert_eq!(
        m.logs().matches("dek adopted (unwrapped ahead)").count(),
        4,
        "{}",
        m.logs()
    );
}

#[test]
fn dek_is_dropped_after_the_grace_and_unwrapped_again() {
    let f = Fx::new();
    let m = f.mount(&["--dek-grace", "1s"]);
    f.stack.reset();
    drop(std::fs::read(m.path("edge")).unwrap());
    // The file's DEK (the model's manifest was loaded at mount).
    assert_eq!(f.stack.count("kms:Decrypt"), 1);
    // The sweeper runs every second and the grace is 1 s, so the DEK is gone within 2 s of
    // the close; 4 s leaves room for a loaded CI machine. (Time-based expiry: a sleep is
    // the thing under test, not a readiness guess.)
    std::thread::sleep(Duration::from_secs(4));
    drop(std::fs::read(m.path("edge")).unwrap());
    assert_eq!(
        f.stack.count("kms:Decrypt"),
        2,
        "a new unwrap of the file's DEK after the grace (the manifest stays loaded)"
    );
}

#[test]
fn kms_denied_or_disabled_key_gives_eacces_and_names_key_and_file() {
    let f = Fx::new();
    let m = f.mount(&[]);
    f.stack.reset(); // the mount's Decrypt of the manifest
    f.stack
        .fault(json!({"match": "kms:Decrypt", "error": "DisabledException"}));
    let e = std::fs::File::open(m.path("edge")).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EACCES));
    assert_eq!(f.stack.count("kms:Decrypt"), 1, "no retry storm");
    let logs = m.logs();
    assert!(
        logs.contains("open refused") && logs.contains("llama/edge") && logs.contains(&f.key_a),
        "{logs}"
    );
}

#[test]
fn s3_throttling_gives_eio_in_bounded_time_while_cached_chunks_keep_working() {
    let f = Fx::new();
    let m = f.mount(&["--direct-io"]);
    let want = f.src("model.bin");
    let mut file = std::fs::File::open(m.path("model.bin")).unwrap();
    let mut buf = vec![0u8; 4096];
    file.read_exact(&mut buf).unwrap(); // chunk 0 (and a read-ahead window) now cached
    f.stack
        .fault(json!({"match": "s3:GET-range", "error": "503"}));
    let t = Instant::now();
    file.seek(SeekFrom::Start(11 * C as u64)).unwrap();
    let e = file.read(&mut buf).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EIO));
    assert!(
        t.elapsed() < Duration::from_secs(30),
        "bounded: {:?}",
        t.elapsed()
    );
    eprintln!("503 on every GET: EIO after {:?}", t.elapsed());
    let tries = f.stack.count("s3:GET-range");
    assert!(tries >= 2, "retried: {tries}");
    file.seek(SeekFrom::Start(100)).unwrap();
    file.read_exact(&mut buf).unwrap();
    assert_eq!(&buf[..], &want[100..4196], "cached chunk still served");
}

#[test]
fn object_replaced_while_open_fails_the_old_handle_and_a_new_open_sees_the_new_file() {
    replaced_while_open(false);
}

/// The same with a listing that carries no ETags (some S3-compatible servers): a handle
/// pins to the ETag of its first GET instead, and a replacement is still caught.
#[test]
fn without_etags_in_the_listing_a_handle_pins_to_its_first_get() {
    replaced_while_open(true);
}

fn replaced_while_open(strip_list_etags: bool) {
    let f = Fx::new();
    if strip_list_etags {
        f.stack.strip_list_etags();
    }
    let m = f.mount(&["--direct-io", "--max-prefetch", "64KiB"]);
    if strip_list_etags {
        assert!(
            f.stack.count("s3:LIST-etags-stripped") >= 5,
            "the mount listed no ETags"
        );
    }
    let mut old = std::fs::File::open(m.path("model.bin")).unwrap();
    let mut buf = vec![0u8; 1000];
    old.read_exact(&mut buf).unwrap();
    // Replace it in place: same path, other bytes, another size. (A model's republish is
    // its next generation, which old handles never see: tests/models.rs. In place is what
    // happens to a file no manifest covers: its manifest deleted first, as a bucket writer
    // or a file sealed before models.)
    rt().block_on(f.stack.delete_prefix("models", "llama/.sealfs-manifest"));
    let new_src = f.dir.path().join("new/model.bin");
    std::fs::create_dir_all(new_src.parent().unwrap()).unwrap();
    let new_bytes = pattern(11 * C + 7, 4242);
    std::fs::write(&new_src, &new_bytes).unwrap();
    let out = sealfs(
        &[
            "seal",
            &f.p("new"),
            "s3://models/llama",
            "--key",
            "kms:alias/models-a",
            "--chunk-size",
            "64KiB",
            "--force",
        ],
        &f.env,
    );
    expect_code(&out, 0);
    old.seek(SeekFrom::Start(10 * C as u64)).unwrap();
    let e = old.read(&mut buf).unwrap_err();
    assert_eq!(
        e.raw_os_error(),
        Some(libc::EIO),
        "old handle: ETag mismatch is EIO, never mixed versions"
    );
    assert!(
        m.logs().contains("object changed since it was opened"),
        "{}",
        m.logs()
    );
    let mut fresh = std::fs::File::open(m.path("model.bin")).unwrap();
    let mut got = Vec::new();
    fresh.read_to_end(&mut got).unwrap();
    assert!(got == new_bytes, "a new open reads the new file");
}

#[test]
fn rewrap_while_open_does_not_disturb_readers() {
    let f = Fx::new();
    let m = f.mount(&["--direct-io", "--max-prefetch", "64KiB"]);
    let want = f.src("model.bin");
    let mut file = std::fs::File::open(m.path("model.bin")).unwrap();
    let mut head = vec![0u8; C];
    file.read_exact(&mut head).unwrap();
    let out = sealfs(
        &[
            "rewrap",
            "s3://models/llama",
            "--key",
            &format!("kms:{}", f.key_a),
            "--to-key",
            &format!("kms:{}", f.key_b),
        ],
        &f.env,
    );
    expect_code(&out, 0);
    let mut rest = Vec::new();
    file.read_to_end(&mut rest).unwrap();
    head.extend_from_slice(&rest);
    assert!(head == want, "reader kept going through the rewrap");
    // New opens unwrap with key b now (the mount trusts both).
    assert_eq!(std::fs::read(m.path("edge+")).unwrap(), f.src("edge+"));
}

/// S3 and KMS calls on the metrics page, by operation and outcome, against the proxy's own
/// count of what reached the servers.
#[test]
fn metrics_count_s3_and_kms_calls_by_outcome() {
    let f = Fx::new();
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    f.stack.reset();
    let m = f.mount(&["--metrics-addr", &addr, "--direct-io"]);
    assert_eq!(std::fs::read(m.path("edge")).unwrap(), f.src("edge"));
    let calls = |v: &std::collections::HashMap<String, u64>, svc: &str, op: &str, outcome: &str| {
        let k =
            format!("sealfs_requests_total{{service=\"{svc}\",op=\"{op}\",outcome=\"{outcome}\"}}");
        v.get(&k).copied().unwrap_or(0)
    };
    // No faults yet and no read-ahead in flight (edge was read to its end): every S3 call
    // is one GET at the proxy (a LIST page is a GET too).
    let v = scrape(port);
    // The mount lists once; the open confirms the listed ETag with its first chunk's GET
    // instead of a LIST.
    assert_eq!(calls(&v, "s3", "ListObjectsV2", "ok"), 1, "mount: {v:?}");
    assert_eq!(
        calls(&v, "s3", "ListObjectsV2", "ok") + calls(&v, "s3", "GetObject", "ok"),
        f.stack.count("s3:GET"),
        "{v:?}"
    );
    // The model's manifest and the file's DEK.
    assert_eq!(calls(&v, "kms", "Decrypt", "ok"), 2);
    assert_eq!(f.stack.count("kms:Decrypt"), 2);
    assert_eq!(
        v["sealfs_request_seconds_count{service=\"kms\",op=\"Decrypt\"}"],
        2
    );
    let fetches = v["sealfs_chunk_fetches_total"];
    assert!(fetches >= 1, "{v:?}");
    assert_eq!(v["sealfs_chunk_fetch_seconds_count"], fetches);
    assert_eq!(v["sealfs_fuse_op_seconds_count{op=\"open\"}"], 1);

    let mut big = std::fs::File::open(m.path("model.bin")).unwrap();
    let mut buf = vec![0u8; 4096];
    big.read_exact(&mut buf).unwrap();

    // A throttled store and a disabled key show up as their kinds.
    f.stack
        .fault(json!({"match": "s3:GET-range", "error": "503"}));
    big.seek(SeekFrom::Start(11 * C as u64)).unwrap();
    let e = big.read(&mut buf).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EIO));
    f.stack
        .fault(json!({"match": "kms:Decrypt", "error": "DisabledException"}));
    let e = std::fs::File::open(m.path("edge+")).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EACCES));
    let v = scrape(port);
    assert!(calls(&v, "s3", "GetObject", "throttled") >= 1, "{v:?}");
    assert_eq!(calls(&v, "kms", "Decrypt", "key_disabled"), 1, "{v:?}");
    // Two files' DEKs and the model's manifest.
    assert_eq!(calls(&v, "kms", "Decrypt", "ok"), 3);
}
