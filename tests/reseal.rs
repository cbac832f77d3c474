//! `sealfs reseal` and `sealfs gc` (issue 12, part 2): every file of a model gets a new DEK
//! and file id under the new keys only, decrypted and re-encrypted in memory, as a new
//! generation that the model's new manifest switches to at once. Readers holding the old
//! generation read on; an interrupted or failed reseal leaves the old generation served
//! and nothing of the new one visible; the old KEK opens nothing afterwards. Real binary,
//! real mounts, a local store and moto (S3 + KMS) through the fault proxy.

mod common;

use std::io::{Read, Seek, SeekFrom};
use std::path::Path;
use std::time::{Duration, Instant};

use common::*;
use serde_json::json;

const C: usize = 64 * 1024;

impl Site {
    /// Key files `k` (old) and `k2` (new), a signing key `pub.key`, and a model source.
    fn resealable() -> Self {
        let s = Self::new();
        let out = expect_code(&sealfs(&["keygen", &s.p("k2")], &[]), 0);
        std::fs::write(s.path("k2.id"), out.split(['(', ')']).nth(1).unwrap()).unwrap();
        expect_code(&sealfs(&["keygen", "--signing", &s.p("pub.key")], &[]), 0);
        s.write("src/a.bin", &pattern(5 * C + 17, 1));
        s.write("src/config.json", b"{\"layers\": 2}\n");
        s.write("src/sub/b.bin", &pattern(C, 2));
        s
    }
    fn k2(&self) -> String {
        format!("file:{}", self.p("k2"))
    }
    fn run(&self, args: &[&str]) -> std::process::Output {
        sealfs(args, &[])
    }
    /// Seals `src` to `m` under `key` (64 KiB chunks), with `extra` flags.
    fn seal_m(&self, key: &str, extra: &[&str]) -> String {
        let (src, m) = (self.p("src"), self.p("m"));
        let mut a = vec!["seal", &src, &m, "--key", key, "--chunk-size", "64KiB"];
        a.extend_from_slice(extra);
        expect_code(&self.run(&a), 0)
    }
    fn inspect(&self, uri: &str) -> serde_json::Value {
        let out = expect_code(&self.run(&["inspect", uri, "--json"]), 0);
        serde_json::from_str(&out).unwrap()
    }
}

/// Every object key under `dir`, relative, sorted.
fn objects(dir: &Path) -> Vec<String> {
    fn walk(root: &Path, d: &Path, out: &mut Vec<String>) {
        for e in std::fs::read_dir(d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                walk(root, &p, out);
            } else {
                out.push(p.strip_prefix(root).unwrap().display().to_string());
            }
        }
    }
    let mut out = Vec::new();
    walk(dir, dir, &mut out);
    out.sort();
    out
}

fn code(o: &std::process::Output) -> (i32, String) {
    (
        o.status.code().unwrap_or(-1),
        format!("{}{}", stdout(o), stderr(o)),
    )
}

#[test]
fn reseal_gives_every_file_a_new_dek_and_the_old_key_opens_nothing() {
    let s = Site::resealable();
    let (old, new) = (s.key(), s.k2());
    let (signer, trust) = (
        format!("file:{}", s.p("pub.key")),
        format!("file:{}", s.p("pub.key.pub")),
    );
    let m = s.p("m");
    s.seal_m(&old, &["--sign", &signer]);
    let before = s.inspect(&m);
    let old_a = std::fs::read(s.path("m/a.bin")).unwrap();

    // Not without a proof of origin (the old key proves none after a compromise), not a
    // signed model into an unsigned one, not past a digest pin.
    let (c, t) = code(&s.run(&["reseal", &m, "--key", &old, "--to-key", &new]));
    assert_eq!(c, 2, "{t}");
    assert!(
        t.contains("reseal needs --trust-signer or --model-digest"),
        "{t}"
    );
    let (c, t) = code(&s.run(&[
        "reseal",
        &m,
        "--key",
        &old,
        "--to-key",
        &new,
        "--trust-signer",
        &trust,
    ]));
    assert_eq!(c, 2, "{t}");
    assert!(t.contains("signed; reseal it with --sign"), "{t}");
    let wrong = format!("sha256:{}", "ab".repeat(32));
    let reseal_with = |extra: &[&str]| {
        let mut a = vec![
            "reseal", &m, "--key", &old, "--to-key", &new, "--sign", &signer,
        ];
        a.extend_from_slice(extra);
        code(&s.run(&a))
    };
    let (c, t) = reseal_with(&["--model-digest", &wrong]);
    assert_eq!(c, 4, "{t}");
    assert!(t.contains("is not the pinned"), "{t}");
    // Nor a model signed by someone else than the trusted publisher.
    expect_code(&s.run(&["keygen", "--signing", &s.p("other.key")]), 0);
    let other = format!("file:{}", s.p("other.key.pub"));
    let (c, t) = reseal_with(&["--trust-signer", &other]);
    assert_eq!(c, 4, "{t}");
    assert!(t.contains("not a trusted signer"), "{t}");
    assert_eq!(
        s.inspect(&m)["files"],
        before["files"],
        "refusals wrote nothing"
    );

    let (c, out) = reseal_with(&["--trust-signer", &trust]);
    assert_eq!(c, 0, "{out}");
    assert!(out.contains("generation 0 -> 1 (4 files"), "{out}");
    assert!(out.contains("signed by sha256:"), "{out}");

    // The new generation opens under the new key only, signed, byte for byte the model.
    let (c, t) = code(&s.run(&["verify", &m, "--key", &new, "--trust-signer", &trust]));
    assert_eq!(c, 0, "{t}");
    assert_eq!(t.matches("ok    ").count(), 4, "{t}");
    let (c, t) = code(&s.run(&["verify", &m, "--key", &old]));
    assert_eq!(c, 4, "the old KEK must open nothing: {t}");
    assert!(t.contains("no trusted key can open it"), "{t}");
    expect_code(&s.run(&["unseal", &m, &s.p("out"), "--key", &new]), 0);
    for f in ["a.bin", "config.json", "sub/b.bin"] {
        assert_eq!(
            std::fs::read(s.path(&format!("out/{f}"))).unwrap(),
            std::fs::read(s.path(&format!("src/{f}"))).unwrap(),
            "{f}"
        );
    }
    // New file ids, headers and ciphertext; only the new key's slot; the user's context kept.
    let after = s.inspect(&m);
    let ids = |v: &serde_json::Value| -> Vec<String> {
        v["files"]
            .as_array()
            .unwrap()
            .iter()
            .map(|f| f["file_id"].as_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(after["files"].as_array().unwrap().len(), 4);
    for (a, b) in ids(&before).iter().zip(ids(&after)) {
        assert_ne!(*a, b, "a reseal makes new file ids");
    }
    let new_id = std::fs::read_to_string(s.path("k2.id")).unwrap();
    assert!(new_id.starts_with("file:"), "{new_id}");
    for f in after["files"].as_array().unwrap() {
        assert_eq!(f["generation"], 1, "{f}");
        let slots = f["wrapped_keys"].as_array().unwrap();
        assert_eq!(slots.len(), 1, "{f}");
        assert_eq!(slots[0]["key_id"], new_id.as_str(), "{f}");
        assert_eq!(f["encryption_context"]["sealfs:model"], "", "{f}");
    }
    let new_a = std::fs::read(s.path("m/.sealfs-g1/a.bin")).unwrap();
    assert_eq!(new_a.len(), old_a.len());
    let same = old_a.iter().zip(&new_a).filter(|(x, y)| x == y).count();
    assert!(
        same < old_a.len() / 100,
        "ciphertext must change: {same} equal bytes"
    );
    assert_eq!(after["models"][0]["generation"], 1);
    assert_eq!(after["models"][0]["signed"], true);

    // gc keeps the old generation within the grace, then deletes it; the new one stays.
    let kept = expect_code(&s.run(&["gc", &m, "--key", &new]), 0);
    assert!(
        kept.contains("kept ") && !kept.contains("deleted"),
        "{kept}"
    );
    assert!(s.path("m/a.bin").exists());
    let gone = expect_code(&s.run(&["gc", &m, "--key", &new, "--grace", "0"]), 0);
    assert!(
        gone.contains("deleted") && gone.contains(".sealfs-manifest.sig"),
        "{gone}"
    );
    let left = objects(&s.path("m"));
    assert!(left.iter().all(|k| k.contains(".sealfs-g1/")), "{left:?}");
    let (c, t) = code(&s.run(&["verify", &m, "--key", &new, "--trust-signer", &trust]));
    assert_eq!(c, 0, "{t}");
    assert_eq!(
        t.matches("ok    ").count(),
        4,
        "the model is all there: {t}"
    );

    // Back again (a second rotation), and a republish over a resealed model is a new
    // generation too, switched to by its manifest.
    let out = expect_code(
        &s.run(&[
            "reseal",
            &m,
            "--key",
            &new,
            "--to-key",
            &old,
            "--sign",
            &signer,
            "--trust-signer",
            &trust,
        ]),
        0,
    );
    assert!(out.contains("generation 1 -> 2"), "{out}");
    s.write("src/config.json", b"{\"layers\": 3}\n");
    s.seal_m(&old, &["--force"]);
    assert!(s.path("m/.sealfs-g3/config.json").exists());
    expect_code(
        &s.run(&[
            "unseal",
            &format!("{m}/config.json"),
            &s.p("c.json"),
            "--key",
            &old,
        ]),
        0,
    );
    assert_eq!(
        std::fs::read(s.path("c.json")).unwrap(),
        b"{\"layers\": 3}\n"
    );
}

/// A mount serving the model while it is resealed: a handle opened before keeps reading
/// the old generation; a new open (after the mount re-lists) gets the new one, unwrapped
/// under the new key; a mount trusting only the old key opens nothing afterwards.
#[test]
fn readers_keep_the_old_generation_and_new_opens_get_the_new() {
    let s = Site::resealable();
    let (old, new) = (s.key(), s.k2());
    let m = s.p("m");
    s.seal_m(&old, &[]);
    let want = pattern(5 * C + 17, 1);
    let mnt = Mount::start(&m, &["--key", &old, "--key", &new, "--list-ttl", "1s"], &[]);
    let mut held = std::fs::File::open(mnt.path("a.bin")).unwrap();
    let mut first = vec![0u8; C];
    held.read_exact(&mut first).unwrap();
    assert_eq!(first, want[..C]);

    expect_code(
        &s.run(&[
            "reseal",
            &m,
            "--key",
            &old,
            "--to-key",
            &new,
            "--unverified-origin",
        ]),
        0,
    );
    // The mount re-lists within 1 s; wait for a new open to unwrap generation 1.
    let start = Instant::now();
    loop {
        let got = std::fs::read(mnt.path("a.bin")).unwrap();
        assert_eq!(
            got, want,
            "every open reads the model, old or new generation"
        );
        if mnt.logs().contains(".sealfs-g1/a.bin") {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(15),
            "no switch:\n{}",
            mnt.logs()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let unwrapped = mnt
        .logs()
        .lines()
        .find(|l| l.contains("dek unwrapped") && l.contains(".sealfs-g1/a.bin"))
        .unwrap_or_default()
        .to_string();
    let k2_id = expect_code(&s.run(&["inspect", &m, "--json"]), 0);
    let v: serde_json::Value = serde_json::from_str(&k2_id).unwrap();
    let id = v["files"][0]["wrapped_keys"][0]["key_id"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        unwrapped.contains(&id),
        "unwrapped under the new key {id}: {unwrapped}"
    );

    // The handle opened before the reseal reads on, to the end, from the old generation.
    held.seek(SeekFrom::Start(C as u64)).unwrap();
    let mut rest = Vec::new();
    held.read_to_end(&mut rest).unwrap();
    assert_eq!(rest, want[C..], "the old generation, read on");

    // A mount that trusts only the old key: the model is the new generation, refused.
    let stale = Mount::start(&m, &["--key", &old], &[]);
    let e = std::fs::read(stale.path("a.bin")).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EACCES), "{e}");
    assert!(stale.logs().contains("no trusted key"), "{}", stale.logs());
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// On S3 and KMS: a part upload that keeps failing, and SIGINT in the middle of a slow
/// one, each leave the old generation served (verify under the old key passes, and the
/// file of the new generation already written is not shown) with no new manifest and no
/// open upload; a rerun finishes, and the old KMS key then opens nothing.
#[test]
fn an_interrupted_or_failed_reseal_on_s3_leaves_the_old_generation_served() {
    let stack = Stack::start();
    let rt = rt();
    rt.block_on(stack.create_bucket("models"));
    let (a, b) =
        rt.block_on(async { (stack.create_key(None).await, stack.create_key(None).await) });
    let (ka, kb) = (format!("kms:{a}"), format!("kms:{b}"));
    let env = stack.env();
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    std::fs::create_dir_all(&src).unwrap();
    // "a-small" is resealed (and complete at generation 1) before "z-big"'s parts go up.
    std::fs::write(src.join("a-small"), pattern(1000, 5)).unwrap();
    std::fs::write(src.join("z-big"), pattern(24 << 20, 6)).unwrap();
    let uri = "s3://models/m";
    expect_code(
        &sealfs(
            &["seal", &src.display().to_string(), uri, "--key", &ka],
            &env,
        ),
        0,
    );
    let verify = |key: &str| code(&sealfs(&["verify", uri, "--key", key], &env));
    let generation1 = |keys: &[(String, i64)]| {
        keys.iter()
            .filter(|(k, _)| k.contains(".sealfs-g1/"))
            .map(|(k, _)| k.clone())
            .collect::<Vec<_>>()
    };

    stack.fault(json!({"match": "s3:UploadPart", "error": "500", "path": "z-big"}));
    let reseal = [
        "reseal",
        uri,
        "--key",
        ka.as_str(),
        "--to-key",
        kb.as_str(),
        "--part-size",
        "8MiB",
        "--unverified-origin",
    ];
    let (c, t) = code(&sealfs(&reseal, &env));
    assert_eq!(c, 5, "{t}");
    assert!(t.contains("UploadPart"), "{t}");
    // No switch (no manifest of generation 1), no upload left open, and the old generation
    // served whole.
    let old_generation_served = || {
        let keys = rt.block_on(stack.keys_in("models"));
        let g1 = generation1(&keys);
        assert!(
            !g1.iter().any(|k| k.contains(".sealfs-manifest")),
            "no switch: {g1:?}"
        );
        assert_eq!(
            rt.block_on(stack.open_uploads("models")),
            0,
            "upload aborted"
        );
        let (c, t) = verify(&ka);
        assert_eq!(c, 0, "the old generation is served whole: {t}");
        assert_eq!(t.matches("ok    ").count(), 2, "{t}");
        g1
    };
    let g1 = old_generation_served();
    assert!(
        g1.iter().any(|k| k.ends_with("a-small")),
        "the first file went up: {g1:?}"
    );

    // SIGINT while a part is on its (slow) way.
    stack.reset();
    stack.fault(json!({"match": "s3:UploadPart", "delay": 1.0, "times": 100}));
    let mut cmd = std::process::Command::new(bin());
    cmd.args(reseal)
        .env_clear()
        .envs(env.iter().cloned())
        .env("PATH", std::env::var("PATH").unwrap());
    // Output to files and the child in a Proc: a failed assertion below kills it.
    let (out, err) = (dir.path().join("reseal.out"), dir.path().join("reseal.err"));
    let mut child = Proc(
        cmd.stdout(std::fs::File::create(&out).unwrap())
            .stderr(std::fs::File::create(&err).unwrap())
            .spawn()
            .unwrap(),
    );
    let start = Instant::now();
    while stack.count("s3:UploadPart") == 0 {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "upload never started"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    unsafe { libc::kill(child.0.id() as i32, libc::SIGINT) };
    let (c, t) = code(&std::process::Output {
        status: child.0.wait().unwrap(),
        stdout: std::fs::read(&out).unwrap(),
        stderr: std::fs::read(&err).unwrap(),
    });
    assert_eq!(c, 130, "{t}");
    old_generation_served();

    // The rerun finishes the job.
    stack.reset();
    let out = expect_code(&sealfs(&reseal, &env), 0);
    assert!(out.contains("generation 0 -> 1 (2 files"), "{out}");
    let (c, t) = verify(&kb);
    assert_eq!(c, 0, "{t}");
    let (c, t) = verify(&ka);
    assert_eq!(c, 4, "{t}");
    let o = dir.path().join("out");
    expect_code(
        &sealfs(
            &["unseal", uri, &o.display().to_string(), "--key", &kb],
            &env,
        ),
        0,
    );
    assert_eq!(
        std::fs::read(o.join("z-big")).unwrap(),
        pattern(24 << 20, 6)
    );
    expect_code(&sealfs(&["gc", uri, "--key", &kb, "--grace", "0"], &env), 0);
    let keys = rt.block_on(stack.keys_in("models"));
    assert!(
        keys.iter().all(|(k, _)| k.contains(".sealfs-g1/")),
        "{keys:?}"
    );
    let (c, t) = verify(&kb);
    assert_eq!(c, 0, "{t}");
}

/// Copies `from` (a file or a directory, relative to the site) to `to`, as a bucket
/// writer can.
fn copy(s: &Site, from: &str, to: &str) {
    let st = std::process::Command::new("cp")
        .args(["-a", &s.p(from), &s.p(to)])
        .status()
        .unwrap();
    assert!(st.success());
}

/// What a bucket writer can do with generations (review findings): an interrupted reseal
/// seen through part of a model, gc from part of a model, a file of the next generation
/// removed, planted generations and manifest copies, files an earlier version left.
#[test]
fn a_bucket_writer_cannot_mix_generations_or_make_gc_delete_what_is_served() {
    let s = Site::resealable();
    let (old, new) = (s.key(), s.k2());
    let m = s.p("m");
    let seal = |extra: &[&str]| s.seal_m(&old, extra);
    // The store's root is m (so that m/sub is a prefix of it, not a store of its own).
    s.write("m/.sealfs-store", b"");
    // v1 has old.bin; v2 (a republish) does not.
    s.write("src/old.bin", b"secret-v1");
    seal(&[]);
    std::fs::remove_file(s.path("src/old.bin")).unwrap();
    seal(&["--force"]);
    // (v2 is generation 1: every republish is a switch to the next generation.)
    let reseal = |from: &str, to: &str| {
        expect_code(
            &s.run(&[
                "reseal",
                &m,
                "--key",
                from,
                "--to-key",
                to,
                "--unverified-origin",
            ]),
            0,
        )
    };
    reseal(&old, &new); // generation 2, under the new key
                        // Generation 2, interrupted before its switch: its manifest never landed.
    reseal(&new, &new);
    for e in std::fs::read_dir(s.path("m/.sealfs-g3")).unwrap() {
        let p = e.unwrap().path();
        if p.file_name()
            .unwrap()
            .to_str()
            .unwrap()
            .starts_with(".sealfs-manifest")
        {
            std::fs::remove_file(p).unwrap();
        }
    }
    assert!(s.path("m/sub/.sealfs-g3/b.bin").exists());
    // Generation 1 is served whole, through the model, part of it, or one object (old.bin,
    // left by v1, is an extra file: refused until gc removes it).
    let (c, t) = code(&s.run(&["verify", &m, "--key", &new]));
    assert_eq!(c, 3, "{t}");
    assert_eq!(t.matches("ok    ").count(), 3, "{t}");
    assert!(t.contains("old.bin: not in the model's manifest"), "{t}");
    for uri in [format!("{m}/sub"), format!("{m}/sub/b.bin")] {
        let (c, t) = code(&s.run(&["verify", &uri, "--key", &new]));
        assert_eq!(c, 0, "{uri}: {t}");
        assert!(!t.contains("generation 3"), "{t}");
    }
    expect_code(
        &s.run(&["unseal", &format!("{m}/sub"), &s.p("o1"), "--key", &new]),
        0,
    );
    assert_eq!(std::fs::read(s.path("o1/b.bin")).unwrap(), pattern(C, 2));

    // gc of part of the model deletes that part's older generations only: never the served
    // generation 2, never the unswitched generation 3.
    let out = expect_code(
        &s.run(&["gc", &format!("{m}/sub"), "--key", &new, "--grace", "0"]),
        0,
    );
    assert!(
        out.contains("deleted") && out.contains("sub/b.bin"),
        "{out}"
    );
    assert!(!s.path("m/sub/b.bin").exists(), "generation 0 collected");
    assert!(
        !s.path("m/sub/.sealfs-g1/b.bin").exists(),
        "generation 1 collected"
    );
    assert!(s.path("m/sub/.sealfs-g2/b.bin").exists(), "served: kept");
    assert!(
        s.path("m/sub/.sealfs-g3/b.bin").exists(),
        "above the manifest: kept"
    );
    assert!(s.path("m/a.bin").exists(), "outside the prefix: kept");
    let (c, t) = code(&s.run(&["verify", &format!("{m}/sub"), "--key", &new]));
    assert_eq!(c, 0, "{t}");

    // A file of a later generation removed by the bucket writer after a switch: unseal
    // refuses the model rather than write a mix of two versions.
    reseal(&new, &new); // generation 3, switched
    std::fs::create_dir(s.path("bak")).unwrap();
    for f in ["config.json", "config.json.sealfs-c16"] {
        std::fs::rename(
            s.path(&format!("m/.sealfs-g3/{f}")),
            s.path(&format!("bak/{f}")),
        )
        .unwrap();
    }
    let (c, t) = code(&s.run(&["unseal", &m, &s.p("o2"), "--key", &new]));
    assert_eq!(c, 3, "{t}");
    // (Its generation 2, still there for readers, is what the listing then serves.)
    assert!(
        t.contains("config.json: generation 2, and the manifest lists generation 3"),
        "{t}"
    );
    assert!(!s.path("o2/a.bin").exists(), "nothing written");
    for f in ["config.json", "config.json.sealfs-c16"] {
        std::fs::rename(
            s.path(&format!("bak/{f}")),
            s.path(&format!("m/.sealfs-g3/{f}")),
        )
        .unwrap();
    }

    // A manifest copied to a higher generation (it fails its path binding): gc refuses,
    // deletes nothing; seal refuses to go past the last generation a name can hold.
    copy(&s, "m/.sealfs-g3", "m/.sealfs-g4");
    let before = objects(&s.path("m"));
    let (c, t) = code(&s.run(&["gc", &m, "--key", &new, "--grace", "0"]));
    assert_eq!(c, 3, "{t}");
    assert!(t.contains("sealed for path"), "{t}");
    assert_eq!(objects(&s.path("m")), before, "nothing deleted");
    std::fs::remove_dir_all(s.path("m/.sealfs-g4")).unwrap();
    copy(&s, "m/.sealfs-g3", "m/.sealfs-g999999999");
    let (c, t) = code(&s.run(&["seal", &s.p("src"), &m, "--key", &old, "--force"]));
    assert_eq!(c, 2, "{t}");
    assert!(t.contains("no generation left"), "{t}");
    std::fs::remove_dir_all(s.path("m/.sealfs-g999999999")).unwrap();
    let (c, t) = code(&s.run(&["seal", &s.p("src"), &s.p("m/y/.sealfs-g2"), "--key", &old]));
    assert_eq!(c, 2, "{t}");
    assert!(t.contains("reserved"), "{t}");

    // gc of the whole model: every older generation and the file v1 had are gone; the old
    // key opens nothing that is left.
    reseal(&new, &new); // generation 4
    let out = expect_code(&s.run(&["gc", &m, "--key", &new, "--grace", "0"]), 0);
    assert!(out.contains("old.bin"), "{out}");
    let left = objects(&s.path("m"));
    assert!(
        left.iter().all(|k| k.starts_with(".sealfs-g4/")
            || k.contains("/.sealfs-g4/")
            || k == ".sealfs-store"),
        "{left:?}"
    );
    let id = std::fs::read_to_string(s.path("k2.id")).unwrap();
    let v = s.inspect(&m);
    assert_eq!(v["files"].as_array().unwrap().len(), 3, "{v}");
    for f in v["files"].as_array().unwrap() {
        let slots = f["wrapped_keys"].as_array().unwrap();
        assert!(
            !slots.is_empty() && slots.iter().all(|k| k["key_id"] == id.as_str()),
            "{f}"
        );
    }
    assert!(
        v["superseded_generations"].as_array().unwrap().is_empty(),
        "{v}"
    );
    let (c, t) = code(&s.run(&["verify", &m, "--key", &old]));
    assert_eq!(c, 4, "{t}");
}

/// Issue 19, finding 7: a routine gc while a republish (`seal --force`) is under way
/// deletes nothing the republish wrote. The republish's files are written, its manifest
/// not yet (its PUT keeps failing): gc, run past the old manifest's grace, deletes nothing,
/// the old version is still served whole, and the republish, run again, completes. (A
/// republish is a new generation: nothing is rewritten in place; and a file the served
/// manifest does not list is deleted only once it has itself aged past the grace.)
#[test]
fn gc_during_a_republish_deletes_nothing_it_wrote() {
    let stack = Stack::start();
    let rt = rt();
    rt.block_on(stack.create_bucket("models"));
    let ka = format!("kms:{}", rt.block_on(stack.create_key(None)));
    let env = stack.env();
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    std::fs::create_dir_all(&src).unwrap();
    std::fs::write(src.join("a.bin"), pattern(3 * C, 1)).unwrap();
    std::fs::write(src.join("config.json"), b"{}").unwrap();
    let uri = "s3://models/m";
    let seal = || {
        code(&sealfs(
            &[
                "seal",
                &src.display().to_string(),
                uri,
                "--key",
                &ka,
                "--force",
            ],
            &env,
        ))
    };
    assert_eq!(seal().0, 0);
    std::thread::sleep(Duration::from_millis(3200)); // the old manifest is past the grace
    std::fs::write(src.join("a.bin"), pattern(3 * C, 2)).unwrap();
    std::fs::write(src.join("c.bin"), pattern(C + 1, 3)).unwrap();
    stack.fault(json!({"match": "s3:PUT", "error": "500", "path": ".sealfs-manifest"}));
    let (c, t) = seal();
    assert_eq!(c, 5, "the republish stops at its manifest: {t}");
    stack.reset();
    let before = rt.block_on(stack.keys_in("models"));
    assert!(
        before.iter().any(|(k, _)| k.ends_with("c.bin")),
        "the republish wrote its new file: {before:?}"
    );
    expect_code(
        &sealfs(&["gc", uri, "--key", &ka, "--grace", "3s"], &env),
        0,
    );
    assert_eq!(
        rt.block_on(stack.keys_in("models")),
        before,
        "gc deleted something the republish wrote"
    );
    let verify = || code(&sealfs(&["verify", uri, "--key", &ka], &env));
    let (c, t) = verify();
    assert_eq!(c, 0, "the old version is served whole: {t}");
    assert_eq!(t.matches("ok    ").count(), 2, "{t}");
    assert_eq!(seal().0, 0);
    let (c, t) = verify();
    assert_eq!(c, 0, "{t}");
    assert_eq!(t.matches("ok    ").count(), 3, "{t}");
}
