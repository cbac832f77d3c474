//! The k-of-n key ceremony with the real binary: `keygen --shares`, `--key shares:…` for
//! seal, verify, unseal, mount and rewrap (to and from key files and KMS), every refusal's
//! exact line, and no share or key byte in any output or log.

mod common;

use std::path::{Path, PathBuf};

use common::*;

const C: usize = 16 * 1024;

/// A source tree, key ceremonies made by the binary, and a scratch directory.
struct Fx {
    dir: tempfile::TempDir,
    /// stdout + stderr of every sealfs run, for the secret scan.
    seen: std::cell::RefCell<String>,
}

/// One `keygen --shares` run: its ceremony id and share files (share 1 first).
struct Cer {
    id: String,
    key_id: String,
    files: Vec<String>,
}

impl Cer {
    /// `shares:` with the given 1-based share numbers, in that order.
    fn key(&self, which: &[usize]) -> String {
        let paths: Vec<&str> = which.iter().map(|&i| self.files[i - 1].as_str()).collect();
        format!("shares:{}", paths.join(","))
    }
}

impl Fx {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src");
        std::fs::create_dir_all(src.join("sub")).unwrap();
        for (name, len) in [("one", 1), ("edge", C), ("sub/model.bin", 5 * C + 77)] {
            std::fs::write(src.join(name), pattern(len, len as u64)).unwrap();
        }
        Self {
            dir,
            seen: Default::default(),
        }
    }
    fn p(&self, rel: &str) -> String {
        self.dir.path().join(rel).display().to_string()
    }
    /// Runs sealfs at log level trace and keeps what it printed.
    fn run(&self, args: &[&str]) -> std::process::Output {
        self.run_env(args, &[])
    }
    fn run_env(&self, args: &[&str], env: &[(String, String)]) -> std::process::Output {
        let mut all = vec!["--log-level", "trace"];
        all.extend_from_slice(args);
        let o = sealfs(&all, env);
        self.seen.borrow_mut().push_str(&stdout(&o));
        self.seen.borrow_mut().push_str(&stderr(&o));
        o
    }
    fn ceremony(&self, t: &str, rel: &str) -> Cer {
        let out = expect_code(&self.run(&["keygen", "--shares", t, &self.p(rel)]), 0);
        // "wrote N shares of key shares:K-of-N:<check> (ceremony <id>): any K of them open it"
        let key_id = out.split_whitespace().nth(5).unwrap().to_string();
        let id = out
            .split("(ceremony ")
            .nth(1)
            .unwrap()
            .split(')')
            .next()
            .unwrap()
            .to_string();
        let files: Vec<String> = out.lines().skip(1).map(|l| l.trim().to_string()).collect();
        let n: usize = t.split("-of-").nth(1).unwrap().parse().unwrap();
        assert_eq!(files.len(), n, "{out}");
        Cer { id, key_id, files }
    }
    fn seal(&self, keys: &[&str]) {
        let (src, dst) = (self.p("src"), self.p("sealed"));
        let mut args = vec!["seal", &src, &dst, "--chunk-size", "16KiB", "--force"];
        for k in keys {
            args.extend_from_slice(&["--key", k]);
        }
        expect_code(&self.run(&args), 0);
    }
    fn verify(&self, key: &str) -> std::process::Output {
        self.run(&["verify", &self.p("sealed"), "--key", key])
    }
    /// The one error line of a failed run, with the exit code asserted.
    fn error_line(&self, o: &std::process::Output, code: i32) -> String {
        let all = expect_code(o, code);
        let lines: Vec<&str> = all.lines().filter(|l| l.contains("error")).collect();
        assert_eq!(lines.len(), 1, "exactly one error line: {all}");
        lines[0].to_string()
    }
    fn same_tree(&self, out: &str) {
        for name in ["one", "edge", "sub/model.bin"] {
            let want = std::fs::read(self.dir.path().join("src").join(name)).unwrap();
            let got = std::fs::read(Path::new(out).join(name)).unwrap();
            assert_eq!(sha256(&got), sha256(&want), "{name}");
        }
    }
}

/// The `share=` value of a share file.
fn share_value(path: &str) -> Vec<u8> {
    let text = std::fs::read_to_string(path).unwrap();
    let line = text.lines().find(|l| l.starts_with("share=")).unwrap();
    hex::decode(&line["share=".len()..]).unwrap()
}

fn index_of(path: &str) -> u8 {
    let text = std::fs::read_to_string(path).unwrap();
    let line = text.lines().find(|l| l.starts_with("index=")).unwrap();
    line["index=".len()..].parse().unwrap()
}

/// The whole key, combined here independently of sealfs (vsss-rs, GF(2^8) Lagrange at 0).
fn whole_key(files: &[String]) -> Vec<u8> {
    let shares: Vec<Vec<u8>> = files
        .iter()
        .map(|f| {
            let mut v = vec![index_of(f)];
            v.extend(share_value(f));
            v
        })
        .collect();
    vsss_rs::Gf256::combine_bytes(&shares).unwrap()
}

/// Every spelling of a secret that could end up in a log line or an error.
fn spellings(secret: &[u8]) -> Vec<String> {
    use base64::Engine;
    let e = base64::engine::general_purpose::STANDARD;
    let u = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    vec![
        hex::encode(secret),
        hex::encode_upper(secret),
        hex::encode(&secret[..8]),
        e.encode(secret),
        u.encode(secret),
        format!("{secret:?}"),
        String::from_utf8_lossy(secret).into_owned(),
    ]
}

/// The first spelling of a share value (of `files`) or of the whole key found in `text`.
fn leak(text: &str, files: &[String]) -> Option<String> {
    let lower = text.to_lowercase();
    let mut secrets: Vec<Vec<u8>> = files.iter().map(|f| share_value(f)).collect();
    secrets.push(whole_key(files));
    secrets
        .iter()
        .flat_map(|s| spellings(s))
        .find(|sp| text.contains(sp.as_str()) || lower.contains(&sp.to_lowercase()))
}

/// Fails if `text` holds any share value (of `files`) or the whole key they make.
#[track_caller]
fn assert_no_share_or_key(text: &str, files: &[String], what: &str) {
    if let Some(sp) = leak(text, files) {
        panic!("{what}: a share or the key ({sp}) appears in:\n{text}");
    }
}

fn copy_shares(fx: &Fx, c: &Cer, dir: &str) -> Vec<String> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(fx.p(dir)).unwrap();
    c.files
        .iter()
        .map(|f| {
            let to = fx.p(&format!(
                "{dir}/{}",
                Path::new(f).file_name().unwrap().to_str().unwrap()
            ));
            std::fs::copy(f, &to).unwrap();
            std::fs::set_permissions(&to, std::fs::Permissions::from_mode(0o600)).unwrap();
            to
        })
        .collect()
}

/// Decodes every quoted `\xNN…` string of an `strace -xx` log (paths and written buffers).
fn strace_strings(log: &str) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    for line in log.lines() {
        let mut rest = line;
        while let Some(start) = rest.find("\"\\x") {
            let body = &rest[start + 1..];
            let end = body.find('"').unwrap_or(body.len());
            let bytes: Vec<u8> = body[..end]
                .split("\\x")
                .filter(|h| !h.is_empty())
                .map(|h| u8::from_str_radix(&h[..2], 16).unwrap())
                .collect();
            out.push((line.to_string(), bytes));
            rest = &body[end.min(body.len())..];
            if rest.len() > 1 {
                rest = &rest[1..];
            } else {
                break;
            }
        }
    }
    out
}

#[test]
fn keygen_writes_exactly_n_private_shares_never_the_key_and_never_overwrites() {
    use std::os::unix::fs::PermissionsExt;
    let fx = Fx::new();
    let dir = fx.p("ceremony/shares");
    let log = fx.p("strace.log");
    let o = std::process::Command::new("strace")
        .args(["-f", "-qq", "-xx", "-s", "65536", "-o", &log])
        .args(["-e", "trace=%file,%desc,%network"])
        .arg(bin())
        .args(["keygen", "--shares", "3-of-5", &dir])
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .output()
        .expect("strace is required (scripts/install-test-deps.sh)");
    assert!(o.status.success(), "{}{}", stdout(&o), stderr(&o));
    let mut names: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(
        names,
        (1..=5)
            .map(|i| format!("share-{i}-of-5"))
            .collect::<Vec<_>>(),
        "DIR holds the N share files and nothing else"
    );
    for d in [fx.p("ceremony"), dir.clone()] {
        assert_eq!(
            std::fs::metadata(&d).unwrap().permissions().mode() & 0o777,
            0o700,
            "{d}"
        );
    }
    let files: Vec<String> = names.iter().map(|n| format!("{dir}/{n}")).collect();
    for f in &files {
        assert_eq!(
            std::fs::metadata(f).unwrap().permissions().mode() & 0o777,
            0o600,
            "{f}"
        );
    }
    // Every file created, renamed or linked is a share file: no temporary, no key file.
    let log = std::fs::read_to_string(&log).unwrap();
    let strings = strace_strings(&log);
    for (line, bytes) in &strings {
        let creates = line.contains("O_CREAT")
            || line.contains("creat(")
            || line.contains("rename")
            || line.contains("link(")
            || line.contains("linkat(");
        if creates {
            let path = String::from_utf8_lossy(bytes).into_owned();
            assert!(files.contains(&path), "keygen created {path}: {line}");
        }
    }
    assert_eq!(
        log.lines().filter(|l| l.contains("O_CREAT")).count(),
        5,
        "five files created"
    );
    // The whole key, in any spelling, was never in any buffer passed to the kernel.
    let key = whole_key(&files[..3]);
    assert_eq!(key, whole_key(&files[2..]), "any 3 give the same key");
    let written: Vec<u8> = strings.iter().flat_map(|(_, b)| b.clone()).collect();
    // (The scan sees what was written: every share value is there, as its file holds it.)
    for f in &files {
        let sp = hex::encode(share_value(f));
        assert!(
            written.windows(sp.len()).any(|w| w == sp.as_bytes()),
            "strace saw no write of {f}"
        );
    }
    for sp in spellings(&key)[..5].iter() {
        assert!(
            !written.windows(sp.len()).any(|w| w == sp.as_bytes()),
            "the key ({sp}) was passed to the kernel"
        );
    }
    assert!(
        !written.windows(key.len()).any(|w| w == &key[..]),
        "the raw key bytes were passed to the kernel"
    );
    assert_no_share_or_key(
        &format!("{}{}", stdout(&o), stderr(&o)),
        &files,
        "keygen output",
    );
    // (And the scan finds a share or the key when they are there.)
    for probe in [
        format!("x{}y", hex::encode_upper(share_value(&files[3]))),
        {
            use base64::Engine;
            base64::engine::general_purpose::STANDARD.encode(whole_key(&files[1..4]))
        },
    ] {
        assert!(leak(&probe, &files).is_some(), "the scan missed {probe}");
    }

    // A second ceremony into the same directory refuses and changes nothing.
    let before: Vec<Vec<u8>> = files.iter().map(|f| std::fs::read(f).unwrap()).collect();
    let e = fx.error_line(&fx.run(&["keygen", "--shares", "3-of-5", &dir]), 1);
    assert_eq!(
        e,
        format!("sealfs: error: share file {dir}/share-1-of-5: already exists; refusing to overwrite it")
    );
    let after: Vec<Vec<u8>> = files.iter().map(|f| std::fs::read(f).unwrap()).collect();
    assert_eq!(before, after);
    // Only share 4 in the way: shares 1 to 3 of the new run are removed again.
    let d2 = fx.p("two");
    std::fs::create_dir(&d2).unwrap();
    std::fs::write(format!("{d2}/share-4-of-5"), "x").unwrap();
    let e = fx.error_line(&fx.run(&["keygen", "--shares", "3-of-5", &d2]), 1);
    assert!(
        e.ends_with("share-4-of-5: already exists; refusing to overwrite it"),
        "{e}"
    );
    assert_eq!(
        std::fs::read_dir(&d2).unwrap().count(),
        1,
        "nothing left behind"
    );
    let e = fx.error_line(&fx.run(&["keygen", "--shares", "4-of-3", &d2]), 2);
    assert!(e.contains("expected K-of-N with 2 <= K <= N <= 255"), "{e}");
}

#[test]
fn any_k_shares_in_any_order_open_and_k_minus_one_fail_with_the_exact_error() {
    let fx = Fx::new();
    let c = fx.ceremony("2-of-3", "c23");
    fx.seal(&[&c.key(&[1, 2])]);
    for set in [
        &[1, 2][..],
        &[2, 1],
        &[1, 3],
        &[3, 1],
        &[2, 3],
        &[3, 2],
        &[3, 1, 2],
    ] {
        let t = expect_code(&fx.verify(&c.key(set)), 0);
        assert!(t.contains("ok    "), "{set:?}: {t}");
    }
    for one in 1..=3 {
        let e = fx.error_line(&fx.verify(&c.key(&[one])), 1);
        assert_eq!(
            e,
            format!(
                "sealfs: error: shares key: 1 of the 3 shares of ceremony {} given; 2 are needed (2-of-3)",
                c.id
            )
        );
    }

    let c = fx.ceremony("3-of-5", "c35");
    fx.seal(&[&c.key(&[5, 3, 1])]);
    for set in [
        &[1, 2, 3][..],
        &[5, 4, 3],
        &[2, 5, 4],
        &[4, 1, 2],
        &[3, 5, 1, 2],
        &[5, 4, 3, 2, 1],
    ] {
        expect_code(&fx.verify(&c.key(set)), 0);
    }
    let e = fx.error_line(&fx.verify(&c.key(&[4, 2])), 1);
    assert_eq!(
        e,
        format!(
            "sealfs: error: shares key: 2 of the 5 shares of ceremony {} given; 3 are needed (3-of-5)",
            c.id
        )
    );
    assert_no_share_or_key(&fx.seen.borrow(), &c.files, "verify output");
}

#[test]
fn a_flipped_byte_names_the_file_and_never_gives_a_wrong_key() {
    let fx = Fx::new();
    let c = fx.ceremony("2-of-3", "c");
    fx.seal(&[&c.key(&[1, 3])]);
    let bad = copy_shares(&fx, &c, "bad");
    // One hex digit of share 2's value changed to another hex digit: still well-formed.
    let mut text = std::fs::read(&bad[1]).unwrap();
    let at = String::from_utf8_lossy(&text).find("share=").unwrap() + 10;
    text[at] = if text[at] == b'0' { b'1' } else { b'0' };
    std::fs::write(&bad[1], &text).unwrap();
    let want = format!(
        "sealfs: error: share file {}: corrupted: its check value does not match its contents \
         (a changed byte); use another share or the holder's backup copy",
        bad[1]
    );
    for set in [vec![0, 1], vec![1, 2], vec![2, 1, 0]] {
        let paths: Vec<&str> = set.iter().map(|&i| bad[i].as_str()).collect();
        let key = format!("shares:{}", paths.join(","));
        // More than K with one bad: refused too (sealfs never skips a share it was given).
        assert_eq!(fx.error_line(&fx.verify(&key), 1), want, "{set:?}");
        let out = fx.p("out-bad");
        let e = fx.error_line(
            &fx.run(&["unseal", &fx.p("sealed"), &out, "--key", &key]),
            1,
        );
        assert_eq!(e, want);
        assert!(!Path::new(&out).exists(), "nothing unsealed");
    }
    // The good pair of the same copies still opens.
    expect_code(&fx.verify(&format!("shares:{},{}", bad[0], bad[2])), 0);

    // A share changed on purpose, its own check recomputed: the key check refuses it.
    let forged = copy_shares(&fx, &c, "forged");
    let text = std::fs::read_to_string(&forged[0]).unwrap();
    let mut lines: Vec<String> = text.lines().map(str::to_string).collect();
    let mut y = hex::decode(&lines[6]["share=".len()..]).unwrap();
    y[5] ^= 0x40;
    lines[6] = format!("share={}", hex::encode(&y));
    let body = lines[..7].join("\n") + "\n";
    let d = ring::digest::digest(
        &ring::digest::SHA256,
        &[b"sealfs v1 share check".as_slice(), body.as_bytes()].concat(),
    );
    std::fs::write(
        &forged[0],
        format!("{body}check={}\n", hex::encode(&d.as_ref()[..16])),
    )
    .unwrap();
    let e = fx.error_line(
        &fx.verify(&format!("shares:{},{}", forged[0], forged[1])),
        1,
    );
    assert_eq!(
        e,
        format!(
            "sealfs: error: shares key: the shares {}, {} combine to a key that fails ceremony \
             {}'s key check: one of them was altered (with its own check recomputed); no key \
             was used",
            forged[0], forged[1], c.id
        )
    );
    let mut seen = fx.seen.borrow().clone();
    for f in bad.iter().chain(&forged) {
        seen = seen.replace(f, "");
    }
    assert_no_share_or_key(&seen, &c.files, "error output");
    assert_no_share_or_key(&seen, &bad, "error output (bad share)");
}

#[test]
fn two_ceremonies_duplicates_too_many_and_loose_modes_are_refused() {
    use std::os::unix::fs::PermissionsExt;
    let fx = Fx::new();
    let a = fx.ceremony("2-of-3", "a");
    let b = fx.ceremony("2-of-3", "b");
    fx.seal(&[&a.key(&[1, 2])]);
    let e = fx.error_line(
        &fx.verify(&format!("shares:{},{}", a.files[0], b.files[1])),
        1,
    );
    assert_eq!(
        e,
        format!(
            "sealfs: error: shares key: {} and {} are shares of two different key ceremonies \
             ({} and {}); shares of different ceremonies never combine",
            a.files[0], b.files[1], a.id, b.id
        )
    );
    // In the other order, with a third share: still refused.
    let e = fx.error_line(
        &fx.verify(&format!(
            "shares:{},{},{}",
            b.files[2], a.files[0], a.files[1]
        )),
        1,
    );
    assert!(e.contains("two different key ceremonies"), "{e}");
    // The same share twice, by the same path or by a copy.
    let e = fx.error_line(&fx.verify(&a.key(&[2, 2])), 1);
    assert_eq!(
        e,
        format!(
            "sealfs: error: shares key: {0} and {0} are both share 2 of ceremony {1}: give each \
             share once",
            a.files[1], a.id
        )
    );
    let copy = fx.p("copy-of-1");
    std::fs::copy(&a.files[0], &copy).unwrap();
    let e = fx.error_line(&fx.verify(&format!("shares:{},{}", a.files[0], copy)), 1);
    assert!(e.contains("are both share 1 of ceremony"), "{e}");
    // More share files than the ceremony made.
    let e = fx.error_line(
        &fx.verify(&format!(
            "shares:{},{}",
            a.key(&[1, 2, 3]).strip_prefix("shares:").unwrap(),
            copy
        )),
        1,
    );
    assert_eq!(
        e,
        format!(
            "sealfs: error: shares key: 4 share files given, but ceremony {} made only 3",
            a.id
        )
    );
    // A share readable by others is refused, as a key file is.
    std::fs::set_permissions(&a.files[2], std::fs::Permissions::from_mode(0o644)).unwrap();
    let e = fx.error_line(&fx.verify(&a.key(&[3, 1])), 1);
    assert_eq!(
        e,
        format!(
            "sealfs: error: share file {}: mode 0644 gives group or others access; run `chmod \
             600` on it",
            a.files[2]
        )
    );
    // Missing, empty list entries, and a key file given as a share.
    let e = fx.error_line(
        &fx.verify(&format!("shares:{},{}", a.files[0], fx.p("nope"))),
        1,
    );
    assert!(e.contains(&format!("share file {}: ", fx.p("nope"))), "{e}");
    let e = fx.error_line(&fx.verify(&format!("shares:{},", a.files[0])), 2);
    assert!(e.contains("bad key URI"), "{e}");
    expect_code(&fx.run(&["keygen", &fx.p("k")]), 0);
    let e = fx.error_line(
        &fx.verify(&format!("shares:{},{}", a.files[0], fx.p("k"))),
        1,
    );
    assert!(
        e.ends_with(&format!(
            "share file {}: not a sealfs share file (the first line is not sealfs-share-v1)",
            fx.p("k")
        )),
        "{e}"
    );
    // None of these touched the sealed file: the good shares still open it.
    expect_code(&fx.verify(&a.key(&[1, 2])), 0);
}

#[test]
fn seal_verify_inspect_unseal_and_mount_with_a_shares_key() {
    let fx = Fx::new();
    let c = fx.ceremony("2-of-3", "c");
    fx.seal(&[&c.key(&[2, 3])]);
    let t = expect_code(&fx.run(&["inspect", &fx.p("sealed")]), 0);
    assert!(
        t.contains(&format!(
            "    shares {} (escrow: break-glass only)",
            c.key_id
        )),
        "{t}"
    );
    let j = expect_code(&fx.run(&["inspect", &fx.p("sealed"), "--json"]), 0);
    let v: serde_json::Value = serde_json::from_str(&j).unwrap();
    let slot = &v["files"][0]["wrapped_keys"][0];
    assert_eq!(slot["kind"], "shares");
    assert_eq!(slot["key_id"], c.key_id.as_str());
    assert_eq!(slot["escrow"], true);
    let t = expect_code(&fx.verify(&c.key(&[1, 3])), 0);
    assert_eq!(
        t.lines().filter(|l| l.starts_with("ok    ")).count(),
        3,
        "{t}"
    );
    let out = fx.p("out");
    expect_code(
        &fx.run(&["unseal", &fx.p("sealed"), &out, "--key", &c.key(&[3, 1])]),
        0,
    );
    fx.same_tree(&out);

    let mut m = Mount::start(
        &fx.p("sealed"),
        &["--key", &c.key(&[1, 2]), "--log-format", "json"],
        &[("RUST_LOG".into(), "sealfs=trace,fuser=error".into())],
    );
    fx.same_tree(m.dir.to_str().unwrap());
    m.stop_with_exit_0();
    let logs = m.logs();
    assert!(
        logs.contains(&c.key_id),
        "the audit events name the key: {logs}"
    );
    assert_no_share_or_key(&logs, &c.files, "mount log");
    assert_no_share_or_key(&fx.seen.borrow(), &c.files, "CLI output");
}

#[test]
fn escrow_slot_beside_a_file_key_and_rewrap_both_ways() {
    let fx = Fx::new();
    let c = fx.ceremony("2-of-3", "c");
    for k in ["A", "B"] {
        expect_code(&fx.run(&["keygen", &fx.p(k)]), 0);
    }
    let (a, b) = (format!("file:{}", fx.p("A")), format!("file:{}", fx.p("B")));
    fx.seal(&[&a, &c.key(&[1, 2])]);
    expect_code(&fx.verify(&a), 0);
    // The everyday key is gone: the escrow slot still opens every file (break-glass).
    std::fs::remove_file(fx.p("A")).unwrap();
    let out = fx.p("out1");
    expect_code(
        &fx.run(&["unseal", &fx.p("sealed"), &out, "--key", &c.key(&[3, 2])]),
        0,
    );
    fx.same_tree(&out);

    // Break-glass rewrap from the shares to a new file key B (the escrow slot is dropped:
    // the new set is exactly --to-key).
    expect_code(
        &fx.run(&[
            "rewrap",
            &fx.p("sealed"),
            "--key",
            &c.key(&[1, 3]),
            "--to-key",
            &b,
        ]),
        0,
    );
    expect_code(&fx.verify(&b), 0);
    let t = expect_code(&fx.verify(&c.key(&[1, 2])), 4);
    assert!(t.contains("no trusted key can open it"), "{t}");

    // And from the file key back to B + the shares: the escrow slot opens after B is gone.
    expect_code(
        &fx.run(&[
            "rewrap",
            &fx.p("sealed"),
            "--key",
            &b,
            "--to-key",
            &b,
            "--to-key",
            &c.key(&[2, 3]),
        ]),
        0,
    );
    let t = expect_code(&fx.run(&["inspect", &fx.p("sealed")]), 0);
    assert!(t.contains(&format!("shares {}", c.key_id)), "{t}");
    std::fs::remove_file(fx.p("B")).unwrap();
    let out = fx.p("out2");
    expect_code(
        &fx.run(&["unseal", &fx.p("sealed"), &out, "--key", &c.key(&[3, 1])]),
        0,
    );
    fx.same_tree(&out);

    // Re-sharing: a new ceremony (here 3-of-5) takes over by rewrap; the old shares then
    // open nothing that was rewrapped.
    let n = fx.ceremony("3-of-5", "new");
    expect_code(
        &fx.run(&[
            "rewrap",
            &fx.p("sealed"),
            "--key",
            &c.key(&[1, 2]),
            "--to-key",
            &n.key(&[1, 2, 3]),
        ]),
        0,
    );
    expect_code(&fx.verify(&n.key(&[5, 4, 2])), 0);
    let t = expect_code(&fx.verify(&c.key(&[1, 2])), 4);
    assert!(t.contains("no trusted key can open it"), "{t}");
    let seen = fx.seen.borrow().clone();
    assert_no_share_or_key(&seen, &c.files, "CLI output");
    assert_no_share_or_key(&seen, &n.files, "CLI output");
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// The typical escrow: `seal --key kms:… --key shares:…`; the KMS key is disabled, and the
/// shares alone unseal and rewrap to a new KMS key, with no KMS call to open the escrow slot.
#[test]
fn kms_key_beside_an_escrow_slot_break_glass_when_kms_is_disabled() {
    let fx = Fx::new();
    let stack = Stack::start();
    let env = stack.env();
    let b = rt().block_on(async {
        stack.create_bucket("models").await;
        stack.create_key(Some("alias/models")).await;
        stack.create_key(None).await
    });
    let c = fx.ceremony("2-of-3", "c");
    let (src, shares) = (fx.p("src"), c.key(&[1, 2]));
    let seal = [
        "seal",
        &src,
        "s3://models/m",
        "--key",
        "kms:alias/models",
        "--key",
        &shares,
        "--chunk-size",
        "16KiB",
    ];
    expect_code(&fx.run_env(&seal, &env), 0);
    // The KMS key disabled (moto does not enforce DisableKey: the proxy answers for it).
    stack.fault(serde_json::json!({"match": "kms:Decrypt", "error": "DisabledException"}));
    let t = expect_code(
        &fx.run_env(
            &["verify", "s3://models/m", "--key", "kms:alias/models"],
            &env,
        ),
        4,
    );
    assert!(t.contains("disabled"), "{t}");
    stack.reset();
    stack.fault(serde_json::json!({"match": "kms:Decrypt", "error": "DisabledException"}));
    let out = fx.p("out");
    expect_code(
        &fx.run_env(
            &["unseal", "s3://models/m", &out, "--key", &c.key(&[2, 3])],
            &env,
        ),
        0,
    );
    fx.same_tree(&out);
    assert_eq!(
        stack.count("kms:Decrypt"),
        0,
        "the escrow slot opens without KMS"
    );
    // Rewrap to the new KMS key plus the same escrow slot.
    expect_code(
        &fx.run_env(
            &[
                "rewrap",
                "s3://models/m",
                "--key",
                &c.key(&[3, 1]),
                "--to-key",
                &format!("kms:{b}"),
                "--to-key",
                &c.key(&[1, 2]),
            ],
            &env,
        ),
        0,
    );
    assert_eq!(
        stack.count("kms:Decrypt"),
        0,
        "nor does the rewrap need KMS Decrypt"
    );
    stack.reset();
    expect_code(
        &fx.run_env(
            &["verify", "s3://models/m", "--key", &format!("kms:{b}")],
            &env,
        ),
        0,
    );
    expect_code(
        &fx.run_env(&["verify", "s3://models/m", "--key", &c.key(&[2, 1])], &env),
        0,
    );

    // The usual way in: the pipeline seals with KMS only, a ceremony adds the escrow slot by
    // rewrap (the KMS slot ReEncrypted in place, the escrow slot from one Decrypt per file).
    let seal = [
        "seal",
        &src,
        "s3://models/m2",
        "--key",
        "kms:alias/models",
        "--chunk-size",
        "16KiB",
    ];
    expect_code(&fx.run_env(&seal, &env), 0);
    stack.reset();
    let (kms_a, shares) = ("kms:alias/models", c.key(&[2, 3]));
    expect_code(
        &fx.run_env(
            &[
                "rewrap",
                "s3://models/m2",
                "--key",
                kms_a,
                "--to-key",
                kms_a,
                "--to-key",
                &shares,
            ],
            &env,
        ),
        0,
    );
    // Three files and the model manifest.
    assert_eq!(stack.count("kms:ReEncrypt"), 4);
    assert_eq!(stack.count("kms:Decrypt"), 4);
    let t = expect_code(&fx.run_env(&["inspect", "s3://models/m2"], &env), 0);
    assert!(
        t.contains(&format!(
            "    shares {} (escrow: break-glass only)",
            c.key_id
        )),
        "{t}"
    );
    stack.fault(serde_json::json!({"match": "kms:Decrypt", "error": "DisabledException"}));
    expect_code(
        &fx.run_env(
            &["verify", "s3://models/m2", "--key", &c.key(&[3, 1])],
            &env,
        ),
        0,
    );
    assert_no_share_or_key(&fx.seen.borrow(), &c.files, "CLI output");
}

/// Open latency of a `shares:` key: combining K shares happens once per process (keyring
/// resolution); each file open then costs one local AES-GCM unwrap, as a key file does.
#[test]
fn open_latency_of_a_shares_key() {
    use sealfs::keys::shares;
    let dir = tempfile::tempdir().unwrap();
    let mut ctx = sealfs::format::EncryptionContext::new();
    ctx.insert("sealfs:path".into(), "m/model.safetensors".into());
    for (k, n) in [(2u8, 3u8), (3, 5), (5, 9)] {
        let c = shares::keygen(
            shares::Threshold { k, n },
            &dir.path().join(format!("{k}-{n}")),
        )
        .unwrap();
        let paths: Vec<PathBuf> = c.files[..usize::from(k)].to_vec();
        let median = |mut v: Vec<std::time::Duration>| {
            v.sort();
            v[v.len() / 2]
        };
        let combine = median(
            (0..21)
                .map(|_| {
                    let t = std::time::Instant::now();
                    let kek = shares::load(&paths).unwrap();
                    let e = t.elapsed();
                    assert_eq!(kek.id(), c.key_id);
                    e
                })
                .collect(),
        );
        let kek = shares::load(&paths).unwrap();
        let dek = sealfs::crypto::Dek::random().unwrap();
        let w = kek.wrap(&dek, &ctx);
        let unwrap = median(
            (0..201)
                .map(|_| {
                    let t = std::time::Instant::now();
                    let d = kek.unwrap(&w, &ctx).unwrap();
                    let e = t.elapsed();
                    assert_eq!(d.expose(), dek.expose());
                    e
                })
                .collect(),
        );
        eprintln!(
            "shares {k}-of-{n}: read + combine {k} shares + key check {combine:?} (once per \
             process); one unwrap {unwrap:?} (per file open)"
        );
        // Generous bounds for a debug build on a shared 2-core machine.
        assert!(
            combine < std::time::Duration::from_millis(250),
            "{combine:?}"
        );
        assert!(unwrap < std::time::Duration::from_millis(20), "{unwrap:?}");
    }
}
