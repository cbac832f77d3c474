//! Committed v1 vectors (tests/vectors/v1): sealed objects made by an earlier build, each
//! with the expected outcome and a reason. The `ok` cases are the frozen v1 samples: every
//! future build must keep opening them byte for byte. The `bad` cases must keep failing
//! with the same error. `cargo test --test vectors -- --ignored regenerate` rewrites them
//! (only when the format version changes, never to make a test pass).

mod common;

use std::path::{Path, PathBuf};

use common::*;
use serde_json::{json, Value};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/vectors/v1")
}

/// Git does not keep mode 0600, which key files require: use a private copy.
fn private_key(dir: &Path) -> String {
    let p = dir.join("kek");
    std::fs::copy(root().join("kek"), &p).unwrap();
    std::fs::set_permissions(&p, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    format!("file:{}", p.display())
}

#[test]
fn committed_vectors_open_or_fail_exactly_as_recorded() {
    let manifest: Value =
        serde_json::from_slice(&std::fs::read(root().join("manifest.json")).unwrap()).unwrap();
    let cases = manifest["cases"].as_array().unwrap();
    assert!(cases.len() >= 12, "vector set is incomplete");
    let tmp = tempfile::tempdir().unwrap();
    let key = private_key(tmp.path());
    // Both AES-GCM backends must open the same bytes (docs/PERFORMANCE.md picks per CPU).
    for backend in ["ring", "aws-lc"] {
        let env = [(s("SEALFS_AEAD"), s(backend))];
        check_cases(cases, &key, tmp.path(), &env);
    }
}

fn check_cases(cases: &[Value], key: &str, tmp: &Path, env: &[(String, String)]) {
    for c in cases {
        let name = c["name"].as_str().unwrap();
        let obj = root().join("objects").join(name);
        let out = tmp.join(format!("{name}.{}.out", env[0].1));
        let o = sealfs(
            &[
                "unseal",
                &obj.display().to_string(),
                &out.display().to_string(),
                "--key",
                key,
            ],
            env,
        );
        let code = c["exit"].as_i64().unwrap() as i32;
        let text = expect_code(&o, code);
        if code == 0 {
            let got = std::fs::read(&out).unwrap();
            assert_eq!(
                sha256(&got),
                c["plaintext_sha256"].as_str().unwrap(),
                "{name}"
            );
            assert_eq!(
                got.len() as u64,
                c["plaintext_size"].as_u64().unwrap(),
                "{name}"
            );
        } else {
            assert!(
                text.contains(c["error"].as_str().unwrap()),
                "{name}: {text}"
            );
            assert!(!out.exists(), "{name}: no output on failure");
        }
    }
}

/// Regenerates the vector set. Run by hand only; see the module doc.
#[test]
#[ignore]
fn regenerate() {
    let r = root();
    let _ = std::fs::remove_dir_all(&r);
    std::fs::create_dir_all(r.join("objects")).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let kek = tmp.path().join("kek");
    expect_code(&sealfs(&["keygen", &kek.display().to_string()], &[]), 0);
    std::fs::copy(&kek, r.join("kek")).unwrap();
    let key = format!("file:{}", kek.display());
    const C: usize = 16384;
    let ok: [(&str, usize, &str); 6] = [
        (
            "ok-empty",
            0,
            "empty file: one empty final chunk authenticates the length",
        ),
        ("ok-one-byte", 1, "a single short final chunk"),
        (
            "ok-chunk-minus-1",
            C - 1,
            "final chunk one byte short of full",
        ),
        (
            "ok-chunk",
            C,
            "exactly one full chunk, which is the final one",
        ),
        (
            "ok-chunk-plus-1",
            C + 1,
            "a full chunk then a one-byte final chunk",
        ),
        (
            "ok-multi",
            3 * C + 100,
            "four chunks; encryption context with a user pair",
        ),
    ];
    let dest = r.join("objects").display().to_string();
    let seal_vector = |src: &Path| {
        let args = [
            "seal",
            &src.display().to_string(),
            &dest,
            "--key",
            &key,
            "--context",
            "vector=v1",
            "--chunk-size",
            "16KiB",
        ];
        expect_code(&sealfs(&args, &[]), 0);
    };
    let mut cases = Vec::new();
    for (name, len, reason) in ok {
        let src = tmp.path().join(name);
        let data = pattern(len, len as u64 + 11);
        std::fs::write(&src, &data).unwrap();
        seal_vector(&src);
        cases.push(json!({"name": name, "exit": 0, "plaintext_size": len, "plaintext_sha256": sha256(&data), "reason": reason}));
    }
    // Bad cases: copies of ok-multi under another name (sealed for that name, so the copy
    // first re-seals the same plaintext at the new path) with one defect each.
    let multi = pattern(3 * C + 100, 3 * C as u64 + 111);
    type Mutate = fn(&mut Vec<u8>, &mut Vec<u8>);
    let bad: [(&str, &str, &str, i32, Mutate); 7] = [
        (
            "bad-body-flip",
            "chunk 1 failed authentication",
            "one bit of chunk 1 flipped",
            3,
            |d, _| d[32 + C + 16 + 7] ^= 1,
        ),
        (
            "bad-truncated-chunk",
            "truncated or extended",
            "final chunk removed",
            3,
            |d, _| d.truncate(32 + 3 * (C + 16)),
        ),
        (
            "bad-reordered",
            "chunk 0 failed authentication",
            "chunks 0 and 1 swapped",
            3,
            |d, _| {
                let (a, b) = (
                    d[32..32 + C + 16].to_vec(),
                    d[32 + C + 16..32 + 2 * (C + 16)].to_vec(),
                );
                d[32..32 + C + 16].copy_from_slice(&b);
                d[32 + C + 16..32 + 2 * (C + 16)].copy_from_slice(&a);
            },
        ),
        (
            "bad-version",
            "unsupported format version 2",
            "key object claims version 2",
            3,
            |_, k| k[9] = 2,
        ),
        (
            "bad-suite",
            "unsupported cipher suite 2",
            "key object claims suite 2",
            3,
            |_, k| k[13] = 2,
        ),
        (
            "bad-context",
            "did not authenticate",
            "a context value changed (wrap AAD)",
            3,
            |_, k| {
                let at = k.windows(2).position(|w| w == b"v1").unwrap();
                k[at + 1] = b'2';
            },
        ),
        (
            "bad-trailing",
            "trailing bytes after the key object",
            "a byte appended to the key object",
            3,
            |_, k| k.push(0),
        ),
    ];
    for (name, err, reason, exit, mutate) in bad {
        let src = tmp.path().join(name);
        std::fs::write(&src, &multi).unwrap();
        seal_vector(&src);
        let dp = r.join("objects").join(name);
        let kp = r.join("objects").join(format!("{name}.sealfs-c14"));
        let (mut d, mut k) = (std::fs::read(&dp).unwrap(), std::fs::read(&kp).unwrap());
        mutate(&mut d, &mut k);
        std::fs::write(&dp, d).unwrap();
        std::fs::write(&kp, k).unwrap();
        cases.push(json!({"name": name, "exit": exit, "error": err, "reason": reason}));
    }
    let m = json!({"format": "sealfs v1", "chunk_size": C, "key": "kek (sealfs-kek-v1 file key)", "cases": cases});
    std::fs::write(
        r.join("manifest.json"),
        serde_json::to_string_pretty(&m).unwrap() + "\n",
    )
    .unwrap();
}
