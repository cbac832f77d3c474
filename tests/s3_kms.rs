//! The sealing CLI against moto_server (S3 + KMS) through the counting, fault-injecting proxy.

mod common;

use common::*;
use serde_json::json;

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap()
}

struct Fixture {
    stack: Stack,
    dir: tempfile::TempDir,
    env: Vec<(String, String)>,
}

/// moto + proxy, bucket `models`, a source tree with chunk-edge sizes (chunk = 16 KiB).
fn fixture() -> Fixture {
    let stack = Stack::start();
    rt().block_on(stack.create_bucket("models"));
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    std::fs::create_dir_all(src.join("sub")).unwrap();
    for (name, len) in [
        ("empty", 0),
        ("one", 1),
        ("edge-", 16383),
        ("edge", 16384),
        ("edge+", 16385),
    ] {
        std::fs::write(src.join(name), pattern(len, len as u64)).unwrap();
    }
    std::fs::write(src.join("sub/model.bin"), pattern(300_000, 7)).unwrap();
    let env = stack.env();
    Fixture { stack, dir, env }
}

impl Fixture {
    fn run(&self, args: &[&str]) -> std::process::Output {
        sealfs(args, &self.env)
    }
    fn path(&self, p: &str) -> String {
        self.dir.path().join(p).display().to_string()
    }
}

#[test]
fn seal_verify_unseal_rewrap_verify_with_two_kms_keys_and_a_file_key() {
    let f = fixture();
    let (a, b) = rt().block_on(async {
        (
            f.stack.create_key(Some("alias/models-a")).await,
            f.stack.create_key(None).await,
        )
    });
    let kek = f.path("escrow.key");
    expect_code(&f.run(&["keygen", &kek]), 0);
    let file_key = format!("file:{kek}");
    let src = f.path("src");

    f.stack.reset();
    let out = f.run(&[
        "seal",
        &src,
        "s3://models/llama",
        "--key",
        "kms:alias/models-a",
        "--key",
        &format!("kms:{b}"),
        "--key",
        &file_key,
        "--context",
        "env=test",
        "--chunk-size",
        "16KiB",
    ]);
    let text = expect_code(&out, 0);
    assert_eq!(
        text.matches("sealed s3://models/llama/").count(),
        6,
        "{text}"
    );
    // One data key per file and one for the model's manifest; the second KMS key wraps
    // that same DEK with Encrypt.
    assert_eq!(f.stack.count("kms:GenerateDataKey"), 7);
    assert_eq!(f.stack.count("kms:Encrypt"), 7);
    assert_eq!(f.stack.count("kms:Decrypt"), 0);

    // LIST alone gives plaintext sizes: data objects are prelude + plaintext + tags.
    let objects = rt().block_on(f.stack.keys_in("models"));
    let size_of = |k: &str| objects.iter().find(|(n, _)| n == k).map(|x| x.1).unwrap();
    assert_eq!(size_of("llama/edge+"), 32 + 16385 + 2 * 16);
    assert_eq!(size_of("llama/empty"), 32 + 16);
    assert!(objects
        .iter()
        .any(|(n, _)| n == "llama/sub/model.bin.sealfs-c14"));

    let insp = f.run(&["inspect", "s3://models/llama/sub/model.bin", "--json"]);
    let v: serde_json::Value = serde_json::from_str(&stdout(&insp)).unwrap();
    let file = &v["files"][0];
    assert_eq!(file["plaintext_size"], 300_000);
    assert_eq!(file["encryption_context"]["env"], "test");
    assert_eq!(
        file["encryption_context"]["sealfs:path"],
        "llama/sub/model.bin"
    );
    assert_eq!(file["wrapped_keys"].as_array().unwrap().len(), 3);
    assert!(
        file["wrapped_keys"][0]["key_id"]
            .as_str()
            .unwrap()
            .ends_with(&a),
        "slot records the ARN"
    );

    // Each key alone opens every file.
    for key in [format!("kms:{a}"), format!("kms:{b}"), file_key.clone()] {
        let t = expect_code(&f.run(&["verify", "s3://models/llama", "--key", &key]), 0);
        assert_eq!(t.matches("ok ").count(), 6, "{key}: {t}");
    }

    let out_dir = f.path("out");
    expect_code(
        &f.run(&[
            "unseal",
            "s3://models/llama",
            &out_dir,
            "--key",
            "kms:alias/models-a",
        ]),
        0,
    );
    for name in ["empty", "one", "edge-", "edge", "edge+", "sub/model.bin"] {
        let want = std::fs::read(f.dir.path().join("src").join(name)).unwrap();
        let got = std::fs::read(f.dir.path().join("out").join(name)).unwrap();
        assert_eq!(sha256(&got), sha256(&want), "{name}");
    }

    // Rotate to b only: between KMS keys this is ReEncrypt, and the DEK is never decrypted here.
    f.stack.reset();
    expect_code(
        &f.run(&[
            "rewrap",
            "s3://models/llama",
            "--key",
            &format!("kms:{a}"),
            "--to-key",
            &format!("kms:{b}"),
        ]),
        0,
    );
    // Six files and the model's manifest.
    assert_eq!(f.stack.count("kms:ReEncrypt"), 7);
    assert_eq!(f.stack.count("kms:Decrypt"), 0);
    expect_code(
        &f.run(&["verify", "s3://models/llama", "--key", &format!("kms:{b}")]),
        0,
    );
    // a and the escrow file key no longer open anything, and a is never asked.
    f.stack.reset();
    let t = expect_code(
        &f.run(&["verify", "s3://models/llama", "--key", &format!("kms:{a}")]),
        4,
    );
    assert!(t.contains("no trusted key can open it"), "{t}");
    assert_eq!(
        f.stack.count("kms:Decrypt"),
        0,
        "untrusted slots are never sent to KMS"
    );
    expect_code(
        &f.run(&["verify", "s3://models/llama", "--key", &file_key]),
        4,
    );
}

#[test]
fn rewrap_of_an_87_mib_object_moves_under_1_mib_and_keeps_the_data_object() {
    let f = fixture();
    let (a, b) = rt().block_on(async {
        (
            f.stack.create_key(None).await,
            f.stack.create_key(None).await,
        )
    });
    let big = f.path("big.bin");
    std::fs::write(&big, pattern(87 << 20, 87)).unwrap();
    expect_code(
        &f.run(&[
            "seal",
            &big,
            "s3://models/big",
            "--key",
            &format!("kms:{a}"),
        ]),
        0,
    );
    let etag = |s: &Stack| {
        rt().block_on(async {
            s.s3()
                .await
                .head_object()
                .bucket("models")
                .key("big/big.bin")
                .send()
                .await
                .unwrap()
                .e_tag()
                .unwrap()
                .to_string()
        })
    };
    let before = etag(&f.stack);
    f.stack.reset();
    expect_code(
        &f.run(&[
            "rewrap",
            "s3://models/big",
            "--key",
            &format!("kms:{a}"),
            "--to-key",
            &format!("kms:{b}"),
        ]),
        0,
    );
    let c = f.stack.counts();
    let moved = c["bytes_up"].as_u64().unwrap() + c["bytes_down"].as_u64().unwrap();
    assert!(moved < 1 << 20, "rewrap moved {moved} bytes");
    eprintln!("rewrap of an 87 MiB object moved {moved} bytes through the client");
    assert_eq!(etag(&f.stack), before, "the data object is untouched");
    // The file's key object, and its model manifest's (rewrapped along: it must open with
    // the keys that open its files).
    assert_eq!(c["s3:PUT"], 2, "only key objects are written: {c}");
}

#[test]
fn disabled_or_denied_kms_key_fails_with_exit_4_and_names_the_key() {
    let f = fixture();
    let a = rt().block_on(f.stack.create_key(None));
    let src = f.path("src/one");
    expect_code(
        &f.run(&["seal", &src, "s3://models/x", "--key", &format!("kms:{a}")]),
        0,
    );
    let out_path = f.path("plain");
    for err in [
        "DisabledException",
        "KMSInvalidStateException",
        "AccessDeniedException",
    ] {
        f.stack.reset();
        f.stack.fault(json!({"match": "kms:Decrypt", "error": err}));
        let t = expect_code(
            &f.run(&[
                "unseal",
                "s3://models/x/one",
                &out_path,
                "--key",
                &format!("kms:{a}"),
            ]),
            4,
        );
        assert!(t.contains(&a), "{err}: names the key: {t}");
        assert!(
            t.lines().filter(|l| l.contains("error")).count() == 1,
            "{err}: one error line: {t}"
        );
        assert_eq!(f.stack.count("kms:Decrypt"), 1, "{err}: no retry storm");
        assert!(!std::path::Path::new(&out_path).exists());
    }
}

#[test]
fn kms_throttling_is_retried_a_bounded_number_of_times() {
    let f = fixture();
    let a = rt().block_on(f.stack.create_key(None));
    expect_code(
        &f.run(&[
            "seal",
            &f.path("src/one"),
            "s3://models/x",
            "--key",
            &format!("kms:{a}"),
        ]),
        0,
    );
    // Two throttles, then success: the SDK's backoff absorbs them.
    f.stack.reset();
    f.stack
        .fault(json!({"match": "kms:Decrypt", "error": "ThrottlingException", "times": 2}));
    expect_code(
        &f.run(&["verify", "s3://models/x", "--key", &format!("kms:{a}")]),
        0,
    );
    // The file's DEK and the model manifest's, after two throttles.
    assert_eq!(f.stack.count("kms:Decrypt"), 4);
    // Throttled forever: bounded attempts, then a clear failure.
    f.stack.reset();
    f.stack
        .fault(json!({"match": "kms:Decrypt", "error": "ThrottlingException"}));
    let t = expect_code(
        &f.run(&["verify", "s3://models/x", "--key", &format!("kms:{a}")]),
        1,
    );
    assert!(t.contains("KMS unavailable"), "{t}");
    let n = f.stack.count("kms:Decrypt");
    assert!((2..=5).contains(&n), "bounded retries, got {n}");
}

#[test]
fn interrupted_or_failed_seal_leaves_nothing_visible() {
    let f = fixture();
    let a = rt().block_on(f.stack.create_key(None));
    let big = f.path("big.bin");
    std::fs::write(&big, pattern(40 << 20, 3)).unwrap();
    // An upload part that keeps failing: the upload is aborted, the key object removed.
    f.stack
        .fault(json!({"match": "s3:UploadPart", "error": "500"}));
    let t = expect_code(
        &f.run(&[
            "seal",
            &big,
            "s3://models/fail",
            "--key",
            &format!("kms:{a}"),
            "--part-size",
            "8MiB",
        ]),
        5,
    );
    assert!(t.contains("UploadPart"), "{t}");
    assert!(
        rt().block_on(f.stack.keys_in("models")).is_empty(),
        "nothing visible after a failed seal"
    );
    assert_eq!(
        rt().block_on(f.stack.open_uploads("models")),
        0,
        "multipart upload aborted"
    );

    // SIGINT in the middle of a slow upload.
    f.stack.reset();
    f.stack
        .fault(json!({"match": "s3:UploadPart", "delay": 1.0, "times": 100}));
    let mut c = std::process::Command::new(bin());
    c.args([
        "seal",
        &big,
        "s3://models/int",
        "--key",
        &format!("kms:{a}"),
        "--part-size",
        "8MiB",
    ]);
    c.env_clear()
        .envs(f.env.iter().cloned())
        .env("PATH", std::env::var("PATH").unwrap());
    let child = c.stderr(std::process::Stdio::piped()).spawn().unwrap();
    let start = std::time::Instant::now();
    while f.stack.count("s3:UploadPart") == 0 {
        assert!(start.elapsed().as_secs() < 30, "upload never started");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let out = child.wait_with_output().unwrap();
    let t = expect_code(&out, 130);
    assert!(t.contains("interrupted"), "{t}");
    assert!(
        rt().block_on(f.stack.keys_in("models")).is_empty(),
        "nothing visible after SIGINT"
    );
    assert_eq!(
        rt().block_on(f.stack.open_uploads("models")),
        0,
        "multipart upload aborted"
    );
}

#[test]
fn file_copied_over_another_path_in_the_bucket_is_refused() {
    let f = fixture();
    let a = rt().block_on(f.stack.create_key(None));
    expect_code(
        &f.run(&[
            "seal",
            &f.path("src"),
            "s3://models/m",
            "--key",
            &format!("kms:{a}"),
            "--chunk-size",
            "16KiB",
        ]),
        0,
    );
    rt().block_on(async {
        let s3 = f.stack.s3().await;
        for (from, to) in [
            ("m/edge-", "m/edge"),
            ("m/edge-.sealfs-c14", "m/edge.sealfs-c14"),
        ] {
            s3.copy_object()
                .bucket("models")
                .copy_source(format!("models/{from}"))
                .key(to)
                .send()
                .await
                .unwrap();
        }
    });
    let out = f.path("o");
    let t = expect_code(
        &f.run(&[
            "unseal",
            "s3://models/m/edge",
            &out,
            "--key",
            &format!("kms:{a}"),
        ]),
        3,
    );
    assert!(t.contains("sealed for path \"m/edge-\""), "{t}");
    assert!(!std::path::Path::new(&out).exists());
}

#[test]
fn bad_uri_and_missing_credentials_give_one_clear_line() {
    let f = fixture();
    let t = expect_code(&f.run(&["inspect", "ftp://x/y"]), 2);
    assert!(t.starts_with("sealfs: error: bad location"), "{t}");
    let t = expect_code(&f.run(&["verify", "s3://models/x", "--key", "nope:1"]), 2);
    assert!(t.contains("bad key URI"), "{t}");
    let env: Vec<_> = f
        .env
        .iter()
        .filter(|(k, _)| !k.starts_with("AWS_SECRET") && !k.starts_with("AWS_ACCESS"))
        .cloned()
        .collect();
    let out = sealfs(&["inspect", "s3://models/x"], &env);
    assert_ne!(out.status.code(), Some(0));
    let e = stderr(&out);
    assert_eq!(e.lines().count(), 1, "one line: {e}");
    assert!(e.starts_with("sealfs: error:"), "{e}");
}

/// Keys in `bucket` under `prefix`, sorted.
fn names_under(f: &Fixture, prefix: &str) -> Vec<String> {
    let mut v: Vec<String> = rt()
        .block_on(f.stack.keys_in("models"))
        .into_iter()
        .map(|(k, _)| k)
        .filter(|k| k.starts_with(prefix))
        .collect();
    v.sort();
    v
}

#[test]
fn failed_reseal_with_force_keeps_the_old_version() {
    let f = fixture();
    let kek = f.path("k.key");
    expect_code(&f.run(&["keygen", &kek]), 0);
    let key = format!("file:{kek}");
    let src = f.path("model.bin");
    let v1 = pattern(12 << 20, 1);
    std::fs::write(&src, &v1).unwrap();
    expect_code(
        &f.run(&[
            "seal",
            &src,
            "s3://models/r",
            "--key",
            &key,
            "--part-size",
            "5MiB",
        ]),
        0,
    );
    let v2 = pattern(11 << 20, 2);
    std::fs::write(&src, &v2).unwrap();
    let old_is_intact = |why: &str| {
        let t = expect_code(&f.run(&["verify", "s3://models/r", "--key", &key]), 0);
        assert!(t.contains(&format!("({} bytes)", v1.len())), "{why}: {t}");
        let out = f.path("out.bin");
        let _ = std::fs::remove_file(&out);
        expect_code(
            &f.run(&["unseal", "s3://models/r/model.bin", &out, "--key", &key]),
            0,
        );
        assert_eq!(sha256(&std::fs::read(&out).unwrap()), sha256(&v1), "{why}");
        assert_eq!(
            names_under(&f, "r/"),
            [
                "r/.sealfs-manifest",
                "r/.sealfs-manifest.sealfs-c20",
                "r/model.bin",
                "r/model.bin.sealfs-c20"
            ],
            "{why}"
        );
        assert_eq!(rt().block_on(f.stack.open_uploads("models")), 0, "{why}");
    };

    // Same chunk size, then a new one: every upload part fails.
    for chunk in ["1MiB", "16KiB"] {
        f.stack.reset();
        f.stack
            .fault(json!({"match": "s3:UploadPart", "error": "500"}));
        let t = expect_code(
            &f.run(&[
                "seal",
                &src,
                "s3://models/r",
                "--key",
                &key,
                "--force",
                "--part-size",
                "5MiB",
                "--chunk-size",
                chunk,
            ]),
            5,
        );
        assert!(t.contains("UploadPart"), "{t}");
        f.stack.reset();
        old_is_intact(&format!("failed reseal at {chunk}"));
    }

    // Interrupted in the middle of a slow upload: the old version stays too.
    f.stack.reset();
    f.stack
        .fault(json!({"match": "s3:UploadPart", "delay": 1.0, "times": 100}));
    let mut c = std::process::Command::new(bin());
    c.args([
        "seal",
        &src,
        "s3://models/r",
        "--key",
        &key,
        "--force",
        "--part-size",
        "5MiB",
    ]);
    c.env_clear()
        .envs(f.env.iter().cloned())
        .env("PATH", std::env::var("PATH").unwrap());
    let child = c.stderr(std::process::Stdio::piped()).spawn().unwrap();
    let start = std::time::Instant::now();
    while f.stack.count("s3:UploadPart") == 0 {
        assert!(start.elapsed().as_secs() < 30, "upload never started");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    expect_code(&child.wait_with_output().unwrap(), 130);
    f.stack.reset();
    old_is_intact("interrupted reseal");

    // A republish that completes is the model's next generation, beside the old one (for
    // its readers) until gc, which leaves only the new one.
    expect_code(
        &f.run(&[
            "seal",
            &src,
            "s3://models/r",
            "--key",
            &key,
            "--force",
            "--chunk-size",
            "16KiB",
        ]),
        0,
    );
    let t = expect_code(&f.run(&["verify", "s3://models/r", "--key", &key]), 0);
    assert!(t.contains(&format!("({} bytes)", v2.len())), "{t}");
    let new = [
        "r/.sealfs-g1/.sealfs-manifest",
        "r/.sealfs-g1/.sealfs-manifest.sealfs-c14",
        "r/.sealfs-g1/model.bin",
        "r/.sealfs-g1/model.bin.sealfs-c14",
    ];
    let old = [
        "r/.sealfs-manifest",
        "r/.sealfs-manifest.sealfs-c20",
        "r/model.bin",
        "r/model.bin.sealfs-c20",
    ];
    assert_eq!(names_under(&f, "r/"), [&new[..], &old[..]].concat());
    expect_code(
        &f.run(&["gc", "s3://models/r", "--key", &key, "--grace", "0"]),
        0,
    );
    assert_eq!(names_under(&f, "r/"), new);
}

#[test]
fn rewrap_never_undoes_a_concurrent_write_of_the_key_object() {
    let f = fixture();
    let (k1, k2) = (f.path("k1.key"), f.path("k2.key"));
    expect_code(&f.run(&["keygen", &k1]), 0);
    expect_code(&f.run(&["keygen", &k2]), 0);
    expect_code(
        &f.run(&[
            "seal",
            &f.path("src/one"),
            "s3://models/w",
            "--key",
            &format!("file:{k1}"),
        ]),
        0,
    );
    // Rewrap's key-object PUT is held 3 s; meanwhile someone else writes the key object.
    f.stack.reset();
    f.stack
        .fault(json!({"match": "s3:PUT", "delay": 3.0, "times": 1}));
    let mut c = std::process::Command::new(bin());
    c.args([
        "rewrap",
        "s3://models/w",
        "--key",
        &format!("file:{k1}"),
        "--to-key",
        &format!("file:{k2}"),
    ]);
    c.env_clear()
        .envs(f.env.iter().cloned())
        .env("PATH", std::env::var("PATH").unwrap());
    let child = c
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let start = std::time::Instant::now();
    while f.stack.count("s3:PUT") == 0 {
        assert!(start.elapsed().as_secs() < 30, "rewrap never wrote");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let concurrent = b"written by a concurrent reseal".to_vec();
    rt().block_on(async {
        f.stack
            .s3()
            .await
            .put_object()
            .bucket("models")
            .key("w/one.sealfs-c20")
            .body(concurrent.clone().into())
            .send()
            .await
            .unwrap();
    });
    let out = child.wait_with_output().unwrap();
    let t = expect_code(&out, 5);
    assert!(t.contains("w/one.sealfs-c20"), "{t}");
    assert!(t.contains("changed"), "{t}");
    assert_eq!(stderr(&out).lines().count(), 1, "{t}");
    let now = rt().block_on(async {
        f.stack
            .s3()
            .await
            .get_object()
            .bucket("models")
            .key("w/one.sealfs-c20")
            .send()
            .await
            .unwrap()
            .body
            .collect()
            .await
            .unwrap()
            .into_bytes()
    });
    assert_eq!(
        now.as_ref(),
        concurrent.as_slice(),
        "the concurrent write is kept"
    );
}

/// With every SDK body-logging switch on (`LOG_SIGNABLE_BODY`, `LOG_SENSITIVE_BODIES`) and
/// trace logs, a seal whose second KMS key wraps the DEK with `Encrypt` (a request body
/// that holds the DEK) logs no body and no DEK.
#[test]
fn trace_logs_with_sdk_body_logging_switched_on_carry_no_dek() {
    use sealfs::format::{KeyObject, SlotKind};
    use sealfs::keys::file::FileKek;
    let f = fixture();
    let (a, b) = rt().block_on(async {
        (
            f.stack.create_key(None).await,
            f.stack.create_key(None).await,
        )
    });
    let kek = f.path("escrow.key");
    expect_code(&f.run(&["keygen", &kek]), 0);
    let mut env = f.env.clone();
    for (k, v) in [
        ("RUST_LOG", "trace"),
        ("LOG_SIGNABLE_BODY", "true"),
        ("LOG_SENSITIVE_BODIES", "true"),
    ] {
        env.push((k.to_string(), v.to_string()));
    }
    let out = sealfs(
        &[
            "--log-level",
            "trace",
            "seal",
            &f.path("src/sub/model.bin"),
            "s3://models/t",
            "--key",
            &format!("kms:{a}"),
            "--key",
            &format!("kms:{b}"),
            "--key",
            &format!("file:{kek}"),
        ],
        &env,
    );
    let logs = expect_code(&out, 0);
    // The file's DEK and its model manifest's.
    assert_eq!(
        f.stack.count("kms:Encrypt"),
        2,
        "the second KMS key used Encrypt"
    );
    assert!(
        logs.contains("DEBUG"),
        "debug logs of the SDK still flow: {logs}"
    );
    let ko = rt().block_on(async {
        f.stack
            .s3()
            .await
            .get_object()
            .bucket("models")
            .key("t/model.bin.sealfs-c20")
            .send()
            .await
            .unwrap()
            .body
            .collect()
            .await
            .unwrap()
            .into_bytes()
    });
    let ko = KeyObject::parse(&ko).unwrap();
    let slot = ko
        .slots
        .iter()
        .find(|s| s.kind == SlotKind::File)
        .expect("file slot");
    let dek = FileKek::load(std::path::Path::new(&kek))
        .unwrap()
        .unwrap(&slot.wrapped, &ko.header.context)
        .unwrap();
    let b64 = aws_smithy_types::base64::encode(dek.expose());
    assert!(!logs.contains(&b64), "base64 DEK in the trace logs");
    assert!(
        !logs.contains(&b64[..16]),
        "base64 DEK prefix in the trace logs"
    );
    assert!(
        !logs.contains(&hex::encode(dek.expose())),
        "hex DEK in the trace logs"
    );
    assert!(!logs.contains("Plaintext"), "a KMS body in the trace logs");
    assert!(
        !logs.contains("EncryptionContext"),
        "a KMS request body in the trace logs"
    );
}

/// A publisher key that never leaves KMS: `seal --sign kms:KEY` signs the manifest with KMS
/// Sign (the SubjectPublicKeyInfo from GetPublicKey names the signer); `verify
/// --trust-signer kms:KEY` checks it offline against GetPublicKey; another KMS key, or the
/// same key's public key given as a file, behave as the signer they are.
#[test]
fn a_model_signed_by_a_kms_key_verifies_under_that_key_only() {
    let f = fixture();
    let (signer, other) = rt().block_on(async {
        (
            f.stack.create_signing_key().await,
            f.stack.create_signing_key().await,
        )
    });
    let k = f.path("k.key");
    expect_code(&f.run(&["keygen", &k]), 0);
    let key = format!("file:{k}");
    f.stack.reset();
    let out = expect_code(
        &f.run(&[
            "seal",
            &f.path("src"),
            "s3://models/signed",
            "--key",
            &key,
            "--sign",
            &format!("kms:{signer}"),
        ]),
        0,
    );
    assert!(out.contains("signed by sha256:"), "{out}");
    assert_eq!(
        f.stack.count("kms:Sign"),
        2,
        "per model: the manifest and the OMS model.sig"
    );
    let ok = expect_code(
        &f.run(&[
            "verify",
            "s3://models/signed",
            "--key",
            &key,
            "--trust-signer",
            &format!("kms:{signer}"),
        ]),
        0,
    );
    // Six files and the OMS model.sig.
    assert_eq!(ok.matches("ok ").count(), 7, "{ok}");
    let refused = f.run(&[
        "verify",
        "s3://models/signed",
        "--key",
        &key,
        "--trust-signer",
        &format!("kms:{other}"),
    ]);
    let text = format!("{}{}", stdout(&refused), stderr(&refused));
    assert_eq!(refused.status.code(), Some(4), "{text}");
    assert!(text.contains("which is not a trusted signer"), "{text}");
    // inspect shows the signature's claims without any key.
    let insp = f.run(&["inspect", "s3://models/signed", "--json"]);
    let v: serde_json::Value = serde_json::from_str(&stdout(&insp)).unwrap();
    let m = &v["models"][0];
    assert_eq!(m["signed"], true, "{v}");
    assert!(m["holder"].as_str().unwrap().starts_with("kms:arn:"), "{m}");
    assert!(
        m["manifest_digest"]
            .as_str()
            .unwrap()
            .starts_with("sha256:"),
        "{m}"
    );
}
