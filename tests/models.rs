//! Models (issue 10): every seal writes a manifest; `verify` and the mount serve exactly
//! the manifest's files; under `--trust-signer` only a model signed by a trusted publisher
//! is served, and every chunk is checked against the signed manifest first, so even a
//! holder of the DEK cannot change a byte. Real binary, real mounts, local store.

mod common;

use std::io::Read;
use std::path::Path;

use common::*;

const C: usize = 64 * 1024;

impl Site {
    /// A key file `k`, signing keys `pub.key` (the publisher) and `other.key`, and a model
    /// source `src` (three files, one nested).
    fn model() -> Self {
        let s = Self::new();
        for k in ["pub.key", "other.key"] {
            let out = expect_code(&sealfs(&["keygen", "--signing", &s.p(k)], &[]), 0);
            assert!(out.contains("sha256:"), "{out}");
        }
        s.write("src/a.bin", &pattern(3 * C + 17, 1));
        s.write("src/config.json", b"{\"layers\": 2}\n");
        s.write("src/sub/b.bin", &pattern(C, 2));
        s
    }
    fn trust(&self, signer: &str) -> String {
        format!("file:{}", self.p(&format!("{signer}.pub")))
    }
    /// Seals `src` to `dest`; `sign`: a signing key name, or "" for unsigned.
    fn seal(&self, src: &str, dest: &str, sign: &str, extra: &[&str]) -> String {
        let key = self.key();
        let signer = format!("file:{}", self.p(sign));
        let mut args = vec![
            "seal",
            src,
            dest,
            "--key",
            key.as_str(),
            "--chunk-size",
            "64KiB",
        ];
        if !sign.is_empty() {
            args.extend(["--sign", signer.as_str()]);
        }
        args.extend_from_slice(extra);
        expect_code(&sealfs(&args, &[]), 0)
    }
    /// `verify` of `uri` (optionally trusting `signer`): (exit code, stdout + stderr).
    fn verify(&self, uri: &str, signer: Option<&str>) -> (i32, String) {
        let key = self.key();
        let trust = signer.map(|s| self.trust(s));
        let mut args = vec!["verify", uri, "--key", key.as_str()];
        if let Some(t) = &trust {
            args.extend(["--trust-signer", t.as_str()]);
        }
        let out = sealfs(&args, &[]);
        (
            out.status.code().unwrap_or(-1),
            format!("{}{}", stdout(&out), stderr(&out)),
        )
    }
    fn mount(&self, uri: &str, signer: Option<&str>, extra: &[&str]) -> Mount {
        let key = self.key();
        let trust = signer.map(|s| self.trust(s));
        let mut args = vec!["--key", key.as_str()];
        if let Some(t) = &trust {
            args.extend(["--trust-signer", t.as_str()]);
        }
        args.extend_from_slice(extra);
        Mount::start(uri, &args, &[])
    }
}

fn read(p: &Path) -> std::io::Result<Vec<u8>> {
    let mut v = Vec::new();
    std::fs::File::open(p)?.read_to_end(&mut v)?;
    Ok(v)
}

fn errno(r: std::io::Result<Vec<u8>>) -> i32 {
    r.expect_err("the read must fail")
        .raw_os_error()
        .unwrap_or(0)
}

/// The frozen v1 vectors: files sealed before models existed (loose).
fn vectors() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/vectors/v1/objects")
}

/// The v1 vectors' key, copied into the site (0600), as a `--key` URI.
fn vector_kek(s: &Site) -> String {
    let kek = s.path("vector-kek");
    std::fs::copy(vectors().join("../kek"), &kek).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&kek, std::fs::Permissions::from_mode(0o600)).unwrap();
    format!("file:{}", kek.display())
}

/// The manifest digest `seal` printed (`sha256:` and 64 hex digits).
fn printed_digest(out: &str) -> String {
    out.split_whitespace()
        .find(|w| w.starts_with("sha256:") && w.len() == 71)
        .unwrap_or_else(|| panic!("no digest in {out}"))
        .to_string()
}

#[test]
fn a_signed_model_verifies_and_mounts_under_its_signer() {
    let s = Site::model();
    let out = s.seal(&s.p("src"), &s.p("m"), "pub.key", &[]);
    assert!(out.contains("signed by sha256:"), "{out}");
    assert!(s.path("m/.sealfs-manifest.sig").exists());
    let (code, text) = s.verify(&s.p("m"), Some("pub.key"));
    assert_eq!(code, 0, "{text}");
    // The three files and the model's OMS signature (model.sig).
    assert_eq!(text.matches("ok ").count(), 4, "{text}");
    // Without --trust-signer the same model verifies too (its manifest still binds it).
    assert_eq!(s.verify(&s.p("m"), None).0, 0);
    let m = s.mount(&s.p("m"), Some("pub.key"), &[]);
    for f in ["a.bin", "config.json", "sub/b.bin"] {
        assert_eq!(
            read(&m.path(f)).unwrap(),
            std::fs::read(s.path(&format!("src/{f}"))).unwrap(),
            "{f}"
        );
    }
    assert!(
        !m.path(".sealfs-manifest").exists(),
        "the manifest is not a model file"
    );
    assert!(m.logs().contains("model manifest loaded"), "{}", m.logs());
}

/// Unsigned, signed by someone else, or a signature moved from another model: refused as a
/// whole by verify (exit 4 or 3, naming the model and the signer) and by the mount (EACCES
/// on every file, a log line).
#[test]
fn unsigned_foreign_and_moved_signatures_are_refused() {
    let s = Site::model();
    s.seal(&s.p("src"), &s.p("unsigned"), "", &[]);
    s.seal(&s.p("src"), &s.p("foreign"), "other.key", &[]);
    s.seal(&s.p("src"), &s.p("moved"), "pub.key", &[]);
    s.seal(&s.p("src"), &s.p("donor"), "pub.key", &[]);
    std::fs::copy(
        s.path("donor/.sealfs-manifest.sig"),
        s.path("moved/.sealfs-manifest.sig"),
    )
    .unwrap();
    for (dir, code, want) in [
        ("unsigned", 4, "not signed"),
        ("foreign", 4, "which is not a trusted signer"),
        (
            "moved",
            3,
            "the signature does not cover this manifest (altered)",
        ),
    ] {
        let (c, text) = s.verify(&s.p(dir), Some("pub.key"));
        assert_eq!(c, code, "{dir}: {text}");
        assert!(text.contains(want), "{dir}: {text}");
        assert!(!text.contains("ok "), "{dir}: nothing verifies: {text}");
        let m = s.mount(&s.p(dir), Some("pub.key"), &[]);
        assert_eq!(errno(read(&m.path("config.json"))), libc::EACCES, "{dir}");
        assert!(m.logs().contains(want), "{dir}: {}", m.logs());
    }
    // Files sealed before models existed (the frozen v1 vectors) are loose: served without
    // --trust-signer, refused with it.
    let out = sealfs(
        &[
            "verify",
            &vectors().join("ok-one-byte").display().to_string(),
            "--key",
            &vector_kek(&s),
            "--trust-signer",
            &s.trust("pub.key"),
        ],
        &[],
    );
    let text = format!("{}{}", stdout(&out), stderr(&out));
    assert!(
        text.contains("not part of a model, and --trust-signer or --model-digest requires one"),
        "{text}"
    );
}

/// A holder of the DEK (any host that can unwrap) re-encrypts a chunk with valid AES-GCM:
/// without --trust-signer it is served (that rung is what signatures are for); with it, the
/// read of that chunk fails and nothing of it is released, and verify names the chunk.
#[test]
fn a_chunk_forged_by_a_dek_holder_is_refused_under_trust_signer() {
    let s = Site::model();
    s.seal(&s.p("src"), &s.p("m"), "pub.key", &[]);
    forge_chunk(&s, "m/a.bin", 1);
    let (code, text) = s.verify(&s.p("m"), Some("pub.key"));
    assert_eq!(code, 3, "{text}");
    assert!(text.contains("chunks failed authentication: 1"), "{text}");
    let original = std::fs::read(s.path("src/a.bin")).unwrap();
    {
        let m = s.mount(&s.p("m"), None, &["--direct-io"]);
        let got = read(&m.path("a.bin")).unwrap();
        assert!(
            got[C..2 * C] != original[C..2 * C],
            "the forgery authenticates under GCM"
        );
    }
    let m = s.mount(&s.p("m"), Some("pub.key"), &["--direct-io"]);
    let mut f = std::fs::File::open(m.path("a.bin")).unwrap();
    let mut first = vec![0u8; C];
    f.read_exact(&mut first).unwrap();
    assert!(first == original[..C], "the untouched chunk is served");
    let mut second = vec![0u8; C];
    let e = f.read_exact(&mut second).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EIO), "{e}");
    assert!(
        m.logs().contains("chunk 1 differs from the model manifest"),
        "{}",
        m.logs()
    );
}

/// Re-encrypts chunk `index` of the sealed file `rel` with its own DEK (as a DEK holder
/// can), so that it authenticates under AES-GCM but holds other plaintext.
fn forge_chunk(s: &Site, rel: &str, index: u64) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        use sealfs::keys::{KeySpec, Keyring};
        let ring = Keyring::resolve(&[KeySpec::File(s.path("k"))])
            .await
            .unwrap();
        let bytes = std::fs::read(s.path(&format!("{rel}.sealfs-c16"))).unwrap();
        let ko = sealfs::format::KeyObject::parse(&bytes).unwrap();
        let (_dek, keys) = ring.unwrap(&ko).await.unwrap();
        let layout = ko.header.layout();
        let digest = sealfs::crypto::header_digest(&ko.authenticated);
        let n = layout.chunk_plain_len(index);
        let mut buf = vec![0xEEu8; n + 16];
        sealfs::crypto::seal_chunk(&keys, &digest, index, layout.is_last(index), &mut buf);
        let (start, _) = layout.cipher_range(index, index);
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(s.path(rel))
            .unwrap();
        f.write_all_at(&buf, start).unwrap();
    });
}

/// The set of files is the manifest's: a shard of an older version put back beside the
/// new ones, a file left over from an older version, and a missing file are each reported
/// by verify (naming the file) and not served by the mount (EACCES), with no option.
#[test]
fn version_mixes_extra_and_missing_files_are_refused_without_any_option() {
    let s = Site::model();
    s.write("src/old-only.bin", b"dropped in v2");
    s.seal(&s.p("src"), &s.p("m"), "", &["--model-version", "1"]);
    std::fs::remove_file(s.path("src/old-only.bin")).unwrap();
    s.write("src/a.bin", &pattern(3 * C + 17, 9));
    s.seal(
        &s.p("src"),
        &s.p("m"),
        "",
        &["--model-version", "2", "--force"],
    );
    assert_eq!(
        s.verify(&s.p("m"), None).0,
        3,
        "old-only.bin is left over from v1"
    );
    // v2 is the model's next generation (beside v1, which a gc would delete): v2's a.bin
    // deleted, so that v1's is the one listed, beside v2's other files; and sub/b.bin gone
    // from both.
    let drop_pair = |rel: &str| {
        for suffix in ["", ".sealfs-c16"] {
            std::fs::remove_file(s.path(&format!("{rel}{suffix}"))).unwrap();
        }
    };
    drop_pair("m/.sealfs-g1/a.bin");
    drop_pair("m/sub/.sealfs-g1/b.bin");
    drop_pair("m/sub/b.bin");
    let (code, text) = s.verify(&s.p("m"), None);
    assert_eq!(code, 3, "{text}");
    for (file, why) in [
        ("a.bin", "generation 0, and the manifest lists generation 1"),
        ("old-only.bin", "not in the model's manifest"),
        ("sub/b.bin", "listed in the manifest (model"),
    ] {
        assert!(
            text.lines().any(|l| l.contains(file) && l.contains(why)),
            "{file}: {why}:\n{text}"
        );
    }
    assert!(
        text.lines()
            .any(|l| l.starts_with("ok ") && l.contains("config.json")),
        "{text}"
    );
    let m = s.mount(&s.p("m"), None, &[]);
    assert_eq!(errno(read(&m.path("a.bin"))), libc::EACCES);
    assert_eq!(errno(read(&m.path("old-only.bin"))), libc::EACCES);
    assert_eq!(read(&m.path("config.json")).unwrap(), b"{\"layers\": 2}\n");
    assert!(
        m.logs()
            .contains("generation 0, and the manifest lists generation 1"),
        "{}",
        m.logs()
    );
}

/// A mount never goes back to an older manifest than one it has served: the whole of an
/// older sealed version put back (a rollback that authenticates) is refused after the
/// re-list; the version it served keeps being refused too until a newer one comes.
#[test]
fn a_mount_refuses_a_rolled_back_model() {
    let s = Site::model();
    s.seal(&s.p("src"), &s.p("m"), "", &["--model-version", "1"]);
    let v1 = s.path("v1-copy");
    let st = std::process::Command::new("cp")
        .args(["-a", &s.p("m"), &v1.display().to_string()])
        .status()
        .unwrap();
    assert!(st.success());
    s.write("src/config.json", b"{\"layers\": 3}\n");
    s.seal(
        &s.p("src"),
        &s.p("m"),
        "",
        &["--model-version", "2", "--force"],
    );
    let m = s.mount(&s.p("m"), None, &["--list-ttl", "1s"]);
    assert_eq!(read(&m.path("config.json")).unwrap(), b"{\"layers\": 3}\n");
    // Put v1 back whole (manifest and files).
    std::fs::remove_dir_all(s.path("m")).unwrap();
    let st = std::process::Command::new("cp")
        .args(["-a", &v1.display().to_string(), &s.p("m")])
        .status()
        .unwrap();
    assert!(st.success());
    let start = std::time::Instant::now();
    loop {
        match read(&m.path("config.json")) {
            Err(e) if e.raw_os_error() == Some(libc::EACCES) => break,
            Ok(b) => assert_ne!(b, b"{\"layers\": 2}\n".to_vec(), "v1 served after v2"),
            Err(_) => {}
        }
        assert!(
            start.elapsed() < std::time::Duration::from_secs(15),
            "no refusal 15 s after the rollback:\n{}",
            m.logs()
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    assert!(m.logs().contains("rollback"), "{}", m.logs());
}

/// Deploy by digest: `--model-digest sha256:…` (as `seal` prints it) serves exactly that
/// manifest; any other version of the model, newer ones included, is refused (EACCES).
#[test]
fn model_digest_pins_one_manifest() {
    let s = Site::model();
    let out = s.seal(&s.p("src"), &s.p("m"), "pub.key", &["--model-version", "1"]);
    let digest = printed_digest(&out);
    let (code, text) = s.verify(&s.p("m"), Some("pub.key"));
    assert_eq!(code, 0, "{text}");
    assert!(
        text.contains(&format!("version 1 digest {digest} signed by sha256:")),
        "verify prints what seal printed: {text}"
    );
    let pinned = ["--model-digest", digest.as_str(), "--list-ttl", "1s"];
    {
        let m = s.mount(&s.p("m"), Some("pub.key"), &pinned);
        assert_eq!(read(&m.path("config.json")).unwrap(), b"{\"layers\": 2}\n");
    }
    let wrong = format!("sha256:{}", "0".repeat(64));
    let m = s.mount(&s.p("m"), None, &["--model-digest", &wrong]);
    assert_eq!(errno(read(&m.path("config.json"))), libc::EACCES);
    assert!(m.logs().contains("is not the pinned"), "{}", m.logs());
    drop(m);
    // A newer version sealed over it is not followed by a pinned mount.
    let m = s.mount(&s.p("m"), None, &pinned);
    assert_eq!(read(&m.path("config.json")).unwrap(), b"{\"layers\": 2}\n");
    s.write("src/config.json", b"{\"layers\": 3}\n");
    s.seal(
        &s.p("src"),
        &s.p("m"),
        "pub.key",
        &["--model-version", "2", "--force"],
    );
    std::thread::sleep(std::time::Duration::from_millis(2500)); // two re-lists
    assert_eq!(errno(read(&m.path("config.json"))), libc::EACCES);
    let bad = sealfs(
        &[
            "mount",
            &s.p("m"),
            &s.p("nowhere"),
            "--key",
            &s.key(),
            "--model-digest",
            "sha256:xyz",
        ],
        &[],
    );
    assert_eq!(bad.status.code(), Some(2), "{}", stderr(&bad));
}

/// A pin is a proof of origin, as a trusted signer is (issue 19, findings 2 and 4): under
/// `--model-digest` a file outside the model (a loose, pre-model file put into its
/// directory) is refused by verify, unseal and the mount, and a chunk re-encrypted by a
/// holder of the DEK (valid AES-GCM, other plaintext) is refused on every path: chunk 0 at
/// open, a later chunk, a file whose DEK was unwrapped ahead, verify and unseal. Without
/// the pin (and without a signer) the same forgery is served: that rung is what pins and
/// signatures are for.
#[test]
fn a_pin_refuses_loose_files_and_chunks_forged_by_a_dek_holder() {
    let s = Site::model();
    let digest = printed_digest(&s.seal(&s.p("src"), &s.p("m"), "", &[]));
    let (key, vkek) = (s.key(), vector_kek(&s));
    let m = s.p("m");
    let keys = ["--key", key.as_str(), "--key", vkek.as_str()];
    let pin = ["--model-digest", digest.as_str()];
    let run = |cmd: &[&str]| {
        let out = sealfs(&[cmd, &keys[..], &pin[..]].concat(), &[]);
        (
            out.status.code().unwrap_or(-1),
            format!("{}{}", stdout(&out), stderr(&out)),
        )
    };
    let (code, text) = run(&["verify", &m]);
    assert_eq!(code, 0, "the pinned model verifies: {text}");

    // A loose file beside the pinned model's files.
    for suffix in ["", ".sealfs-c14"] {
        std::fs::copy(
            vectors().join(format!("ok-one-byte{suffix}")),
            s.path(&format!("m/ok-one-byte{suffix}")),
        )
        .unwrap();
    }
    let loose =
        "ok-one-byte: not part of a model, and --trust-signer or --model-digest requires one";
    let (code, text) = run(&["verify", &m]);
    assert_eq!(code, 4, "{text}");
    assert!(text.contains(loose), "{text}");
    assert!(
        text.contains("ok    ") && text.contains("config.json"),
        "{text}"
    );
    let (code, text) = run(&["unseal", &m, &s.p("out-loose")]);
    assert_eq!(code, 4, "{text}");
    assert!(text.contains(loose), "{text}");
    assert!(!s.path("out-loose").exists(), "nothing unsealed");
    {
        let mnt = s.mount(&m, None, &[&keys[2..], &pin[..]].concat());
        assert_eq!(errno(read(&mnt.path("ok-one-byte"))), libc::EACCES);
        assert!(mnt.logs().contains(loose), "{}", mnt.logs());
        assert_eq!(
            read(&mnt.path("config.json")).unwrap(),
            b"{\"layers\": 2}\n"
        );
    }
    for suffix in ["", ".sealfs-c14"] {
        std::fs::remove_file(s.path(&format!("m/ok-one-byte{suffix}"))).unwrap();
    }

    // Chunks re-encrypted by a DEK holder: chunk 0 of sub/b.bin, chunk 1 of a.bin.
    forge_chunk(&s, "m/sub/b.bin", 0);
    forge_chunk(&s, "m/a.bin", 1);
    let original = std::fs::read(s.path("src/a.bin")).unwrap();
    {
        let mnt = s.mount(&m, None, &["--direct-io"]);
        assert!(read(&mnt.path("a.bin")).unwrap()[C..2 * C] != original[C..2 * C]);
    }
    for ahead in [false, true] {
        let mut args = [&keys[2..], &pin[..], &["--direct-io"][..]].concat();
        if ahead {
            args.extend(["--unwrap-ahead", "8"]);
        }
        let mnt = s.mount(&m, None, &args);
        if ahead {
            // Its first open unwraps the DEKs of the model's other files ahead.
            assert_eq!(
                read(&mnt.path("config.json")).unwrap(),
                b"{\"layers\": 2}\n"
            );
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
            while mnt.logs().matches("dek unwrapped").count() < 3 {
                assert!(std::time::Instant::now() < deadline, "{}", mnt.logs());
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
        }
        assert_eq!(
            errno(read(&mnt.path("sub/b.bin"))),
            libc::EIO,
            "ahead: {ahead}"
        );
        let mut f = std::fs::File::open(mnt.path("a.bin")).unwrap();
        let mut first = vec![0u8; C];
        f.read_exact(&mut first).unwrap();
        assert!(first == original[..C], "the untouched chunk is served");
        let e = f.read_exact(&mut first).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EIO), "ahead: {ahead}: {e}");
        for want in [
            "chunk 0 differs from the model manifest",
            "chunk 1 differs from the model manifest",
        ] {
            assert!(mnt.logs().contains(want), "ahead: {ahead}: {}", mnt.logs());
        }
        assert_eq!(mnt.logs().contains("dek adopted (unwrapped ahead)"), ahead);
    }
    let (code, text) = run(&["verify", &m]);
    assert_eq!(code, 3, "{text}");
    assert!(text.contains("chunks failed authentication: 1"), "{text}");
    assert!(text.contains("chunks failed authentication: 0"), "{text}");
    let (code, text) = run(&["unseal", &m, &s.p("out-forged")]);
    assert_eq!(code, 3, "{text}");
    assert!(!s.path("out-forged").join("a.bin").exists(), "{text}");
}

/// `model_signing` (OpenSSF Model Signing 1.1.1, the reference tool) runs `cmd` with
/// `args`; it must be installed (scripts/install-test-deps.sh): missing is a failure.
fn model_signing(args: &[&str]) -> std::process::Output {
    std::process::Command::new("model_signing")
        .args(args)
        .output()
        .expect("model_signing is required: pip install model-signing==1.1.1 pyopenssl")
}

/// OMS interop both ways, with the real `model_signing`: a model sealed with `--sign`
/// carries an OMS `model.sig` that `model_signing verify key` accepts on the mount (and
/// refuses under another key); and a pipeline gate seals a directory only if its own
/// `model.sig` (made by `model_signing sign key`) verifies under the training key.
#[test]
fn oms_signatures_interoperate_with_model_signing_both_ways() {
    let s = Site::model();
    s.seal(&s.p("src"), &s.p("m"), "pub.key", &[]);
    {
        let m = s.mount(&s.p("m"), Some("pub.key"), &[]);
        let mnt = m.dir.display().to_string();
        let sig = m.path("model.sig").display().to_string();
        let verify_under = |public_key: &str| {
            model_signing(&[
                "verify",
                "key",
                "--signature",
                &sig,
                "--public_key",
                &s.p(public_key),
                &mnt,
            ])
        };
        let ok = verify_under("pub.key.pub");
        assert!(
            ok.status.success(),
            "model_signing refused sealfs's signature on the mount:\n{}{}",
            stdout(&ok),
            stderr(&ok)
        );
        let other = verify_under("other.key.pub");
        assert!(!other.status.success(), "accepted under another key");
    }
    // The other way: training signs SRC with model_signing (an openssl SEC1 key).
    training_signs(&s);
    // A name model_signing leaves out, added after training signed: not sealed under the
    // gate (it would be published, and signed with --sign, unchecked).
    s.write("src/.gitattributes", b"*.bin filter=lfs\n");
    let gate = format!("file:{}", s.p("training.pub"));
    let out = s.seal(
        &s.p("src"),
        &s.p("gated"),
        "pub.key",
        &["--trust-signer", &gate],
    );
    assert!(out.contains("signed by"), "{out}");
    assert_eq!(s.verify(&s.p("gated"), Some("pub.key")).0, 0);
    assert!(
        !s.path("gated/.gitattributes").exists(),
        "an uncovered file was sealed"
    );
    // A file changed after training signed: refused, nothing written.
    s.write("src/config.json", b"{\"layers\": 99}\n");
    let key = s.key();
    let sign = format!("file:{}", s.p("pub.key"));
    let gated_seal = |dest: &str, trust: &str| {
        sealfs(
            &[
                "seal",
                &s.p("src"),
                &s.p(dest),
                "--key",
                &key,
                "--sign",
                &sign,
                "--trust-signer",
                trust,
            ],
            &[],
        )
    };
    let refused = gated_seal("gated2", &gate);
    let err = stderr(&refused);
    assert_eq!(refused.status.code(), Some(3), "{err}");
    assert!(
        err.contains("config.json") && err.contains("content changed"),
        "{err}"
    );
    assert_eq!(
        files_under(&s.path("gated2")),
        Vec::<String>::new(),
        "nothing left"
    );
    // And under a key training did not use.
    let wrong = format!("file:{}", s.p("other.key.pub"));
    let refused = gated_seal("gated3", &wrong);
    assert!(
        stderr(&refused).contains("not by a trusted signer"),
        "{}",
        stderr(&refused)
    );
    assert!(!s.path("gated3").exists());
}

/// Training signs `src` with model_signing (`src/model.sig`, an openssl SEC1 key whose
/// public half is `training.pub`).
fn training_signs(s: &Site) {
    let train = s.p("training.pem");
    let st = std::process::Command::new("openssl")
        .args([
            "ecparam",
            "-name",
            "prime256v1",
            "-genkey",
            "-noout",
            "-out",
            &train,
        ])
        .status()
        .expect("openssl");
    assert!(st.success());
    let st = std::process::Command::new("openssl")
        .args(["ec", "-in", &train, "-pubout", "-out", &s.p("training.pub")])
        .stderr(std::process::Stdio::null())
        .status()
        .unwrap();
    assert!(st.success());
    let signed = model_signing(&[
        "sign",
        "key",
        "--private_key",
        &train,
        "--signature",
        &s.p("src/model.sig"),
        &s.p("src"),
    ]);
    assert!(signed.status.success(), "{}", stderr(&signed));
}

/// Waits for `p` (stdout and stderr piped) and returns what it printed.
fn finish(p: &mut Proc) -> std::process::Output {
    let (mut out, mut err) = (Vec::new(), Vec::new());
    p.0.stdout.take().unwrap().read_to_end(&mut out).unwrap();
    p.0.stderr.take().unwrap().read_to_end(&mut err).unwrap();
    std::process::Output {
        status: p.0.wait().unwrap(),
        stdout: out,
        stderr: err,
    }
}

/// Regular files under `dir` (none if it does not exist), relative.
fn files_under(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push(p.strip_prefix(dir).unwrap().display().to_string());
            }
        }
    }
    out
}

/// Issue 19, finding 5: the seal gate checks the bytes it seals, not the paths it looked at
/// first. A file of the hand-off directory rewritten after the gate passed, while an
/// earlier file is being sealed (its upload held 2 s by the fault proxy), is refused
/// ("content changed"), no signature is made over it, and nothing of the seal is left in
/// the bucket. A symlink in its place is never followed.
#[test]
fn a_file_swapped_after_the_gate_looked_is_not_sealed() {
    let s = Site::model();
    s.write("src/a-big.bin", &pattern(6 << 20, 7)); // sealed first (names sort)
    training_signs(&s);
    let gate = format!("file:{}", s.p("training.pub"));
    let stack = Stack::start();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(stack.create_bucket("models"));
    let env = stack.env();
    let (key, sign) = (s.key(), format!("file:{}", s.p("pub.key")));
    let seal = |dest: &str| {
        let mut cmd = std::process::Command::new(bin());
        cmd.args([
            "seal",
            &s.p("src"),
            dest,
            "--key",
            &key,
            "--sign",
            &sign,
            "--trust-signer",
            &gate,
        ])
        .env_clear()
        .envs(env.iter().cloned())
        .env("PATH", std::env::var("PATH").unwrap())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
        Proc(cmd.spawn().unwrap())
    };
    stack.fault(serde_json::json!({"match": "s3:PUT", "path": "a-big", "delay": 2, "times": 1}));
    let mut child = seal("s3://models/gated");
    let start = std::time::Instant::now();
    while stack.count("s3:PUT") == 0 {
        assert!(
            start.elapsed() < std::time::Duration::from_secs(30),
            "no upload"
        );
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    s.write("src/config.json", b"{\"layers\": 99}\n");
    let out = finish(&mut child);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(3), "{err}");
    assert!(
        err.contains("config.json") && err.contains("content changed"),
        "{err}"
    );
    assert_eq!(rt.block_on(stack.keys_in("models")), vec![], "nothing left");
    assert_eq!(rt.block_on(stack.open_uploads("models")), 0);

    // A symlink put in a file's place is not followed.
    s.write("src/config.json", b"{\"layers\": 2}\n");
    std::fs::remove_file(s.path("src/sub/b.bin")).unwrap();
    std::os::unix::fs::symlink(s.path("src/a.bin"), s.path("src/sub/b.bin")).unwrap();
    let out = sealfs(
        &[
            "seal",
            &s.p("src"),
            &s.p("linked"),
            "--key",
            &key,
            "--trust-signer",
            &gate,
        ],
        &[],
    );
    assert_ne!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(files_under(&s.path("linked")), Vec::<String>::new());
}

/// Roll forward: a mount under `--trust-signer` adopts a newer signed version at re-list
/// time for new opens, as a whole; a handle opened on the old version never returns a byte
/// of the new one (it keeps its version, or fails once that version is gone).
#[test]
fn a_new_signed_version_is_adopted_whole_and_old_handles_keep_theirs() {
    use std::io::{Seek, SeekFrom};
    let s = Site::model();
    s.seal(&s.p("src"), &s.p("m"), "pub.key", &["--model-version", "1"]);
    let m = s.mount(
        &s.p("m"),
        Some("pub.key"),
        &["--list-ttl", "1s", "--direct-io"],
    );
    let v1 = std::fs::read(s.path("src/a.bin")).unwrap();
    let mut old = std::fs::File::open(m.path("a.bin")).unwrap();
    let mut head = vec![0u8; C];
    old.read_exact(&mut head).unwrap();
    assert!(head == v1[..C]);
    let v2 = pattern(v1.len(), 42);
    s.write("src/a.bin", &v2);
    s.write("src/config.json", b"{\"layers\": 3}\n");
    s.seal(
        &s.p("src"),
        &s.p("m"),
        "pub.key",
        &["--model-version", "2", "--force"],
    );
    let start = std::time::Instant::now();
    while read(&m.path("config.json")).ok().as_deref() != Some(&b"{\"layers\": 3}\n"[..]) {
        assert!(
            start.elapsed() < std::time::Duration::from_secs(15),
            "v2 never adopted:\n{}",
            m.logs()
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert_eq!(
        read(&m.path("a.bin")).unwrap(),
        v2,
        "new opens see v2 whole"
    );
    // The old handle: v1's bytes or an error, never v2's.
    old.seek(SeekFrom::Start(C as u64)).unwrap();
    let mut rest = Vec::new();
    match old.read_to_end(&mut rest) {
        Ok(_) => assert!(rest == v1[C..], "an old handle served other bytes"),
        Err(e) => assert_eq!(e.raw_os_error(), Some(libc::EIO), "{e}"),
    }
}
