//! `pkcs11:` keys and signers against a real SoftHSM2 token (one token directory per test,
//! through `SOFTHSM2_CONF`), driven by the real binary and a real mount. A missing SoftHSM2,
//! pkcs11-tool or model_signing is a failure, never a skip.

mod common;

use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;

const MODULE: &str = "/usr/lib/softhsm/libsofthsm2.so";
const TOKEN: &str = "sealfs-test";
const C: usize = 1 << 20;

/// A SoftHSM2 token of its own with an AES-256 KEK (`kek1`), a second one (`kek2`), an RSA
/// pair (`rsa1`) and an EC P-256 pair (`signer1`), a PIN file, a key file and a model.
struct Hsm {
    dir: tempfile::TempDir,
    pin: String,
}

fn run(cmd: &mut Command) -> String {
    let o = cmd
        .output()
        .unwrap_or_else(|e| panic!("{cmd:?}: {e} (run scripts/install-test-deps.sh)"));
    let all = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(o.status.success(), "{cmd:?} failed:\n{all}");
    all
}

impl Hsm {
    fn new() -> Self {
        assert!(
            Path::new(MODULE).exists(),
            "{MODULE} missing: install softhsm2 (scripts/install-test-deps.sh)"
        );
        let dir = tempfile::tempdir().unwrap();
        // A PIN no other string in the run contains, to scan logs for.
        let pin = format!("pin{:016x}", rand_u64());
        let h = Self { dir, pin };
        std::fs::create_dir(h.path("tokens")).unwrap();
        std::fs::write(
            h.path("softhsm2.conf"),
            format!(
                "directories.tokendir = {}\nobjectstore.backend = file\nlog.level = ERROR\n",
                h.p("tokens")
            ),
        )
        .unwrap();
        h.write_private("pin", h.pin.as_bytes());
        run(h.cmd("softhsm2-util").args([
            "--init-token",
            "--free",
            "--label",
            TOKEN,
            "--so-pin",
            "0000",
            "--pin",
            &h.pin,
        ]));
        for (args, label, id) in [
            (
                &["--keygen", "--key-type", "AES:32", "--private"][..],
                "kek1",
                "01",
            ),
            (
                &["--keygen", "--key-type", "AES:32", "--private"][..],
                "kek2",
                "04",
            ),
            (
                &["--keypairgen", "--key-type", "rsa:2048"][..],
                "rsa1",
                "03",
            ),
            (
                &["--keypairgen", "--key-type", "EC:prime256v1"][..],
                "signer1",
                "02",
            ),
        ] {
            run(h
                .tool()
                .args(["--login", "--pin", &h.pin])
                .args(args)
                .args(["--label", label, "--id", id]));
        }
        expect_code(&sealfs(&["keygen", &h.p("file.key")], &[]), 0);
        h.write("src/a.bin", &pattern(2 * C + 333, 1));
        h.write("src/config.json", b"{\"layers\": 2}\n");
        h.write("src/sub/b.bin", &pattern(C / 2, 2));
        h
    }
    fn p(&self, rel: &str) -> String {
        self.path(rel).display().to_string()
    }
    fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }
    fn write(&self, rel: &str, data: &[u8]) {
        let p = self.path(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, data).unwrap();
    }
    fn write_private(&self, rel: &str, data: &[u8]) {
        self.write(rel, data);
        std::fs::set_permissions(self.path(rel), std::fs::Permissions::from_mode(0o600)).unwrap();
    }
    fn env(&self) -> Vec<(String, String)> {
        vec![(s("SOFTHSM2_CONF"), self.p("softhsm2.conf"))]
    }
    fn cmd(&self, prog: &str) -> Command {
        let mut c = Command::new(prog);
        c.env("SOFTHSM2_CONF", self.p("softhsm2.conf"));
        c
    }
    fn tool(&self) -> Command {
        let mut c = self.cmd("pkcs11-tool");
        c.args(["--module", MODULE, "--token-label", TOKEN]);
        c
    }
    /// The URI of `object`, logged in with the PIN file when `login`.
    fn uri(&self, object: &str, login: bool) -> String {
        let mut u = format!("pkcs11:token={TOKEN};object={object}?module-path={MODULE}");
        if login {
            u += &format!("&pin-source=file:{}", self.p("pin"));
        }
        u
    }
    fn file_key(&self) -> String {
        format!("file:{}", self.p("file.key"))
    }
    /// `sealfs seal SRC DEST --key KEY` (paths under the fixture), expecting `code`.
    #[track_caller]
    fn seal(&self, src: &str, dest: &str, key: &str, code: i32) -> String {
        self.seal_with(src, dest, key, &[], code)
    }
    /// [`Hsm::seal`] with `extra` flags (`--sign …`).
    #[track_caller]
    fn seal_with(&self, src: &str, dest: &str, key: &str, extra: &[&str], code: i32) -> String {
        let (src, dest) = (self.p(src), self.p(dest));
        let mut args = vec!["seal", &src, &dest, "--key", key];
        args.extend_from_slice(extra);
        self.expect(&args, code)
    }
    /// `sealfs verify DIR --key KEY` (DIR under the fixture) with `extra` flags, expecting
    /// `code`.
    #[track_caller]
    fn verify(&self, dir: &str, key: &str, extra: &[&str], code: i32) -> String {
        let dir = self.p(dir);
        let mut args = vec!["verify", &dir, "--key", key];
        args.extend_from_slice(extra);
        self.expect(&args, code)
    }
    /// `sealfs unseal SRC DEST --key KEY` (paths under the fixture), expecting `code`.
    #[track_caller]
    fn unseal(&self, src: &str, dest: &str, key: &str, code: i32) -> String {
        self.expect(&["unseal", &self.p(src), &self.p(dest), "--key", key], code)
    }
    fn sealfs(&self, args: &[&str]) -> std::process::Output {
        sealfs(args, &self.env())
    }
    /// Runs sealfs, asserts `code`, and that the PIN appears nowhere in what it printed.
    #[track_caller]
    fn expect(&self, args: &[&str], code: i32) -> String {
        let out = expect_code(&self.sealfs(args), code);
        assert!(!out.contains(&self.pin), "the PIN was printed:\n{out}");
        out
    }
    fn assert_same_tree(&self, dir: &str) {
        for f in ["a.bin", "config.json", "sub/b.bin"] {
            assert_eq!(
                sha256(&std::fs::read(self.path(&format!("{dir}/{f}"))).unwrap()),
                sha256(&std::fs::read(self.path(&format!("src/{f}"))).unwrap()),
                "{dir}/{f}"
            );
        }
    }
}

fn rand_u64() -> u64 {
    let mut b = [0u8; 8];
    std::fs::File::open("/dev/urandom")
        .unwrap()
        .read_exact(&mut b)
        .unwrap();
    u64::from_le_bytes(b)
}

fn errno_of_open(p: &Path) -> Option<i32> {
    std::fs::read(p).err().and_then(|e| e.raw_os_error())
}

/// Seal, inspect, verify, unseal and a mount under an AES key in the token: every byte
/// equal, the slot named by the token and object only (no module path, no PIN), one unwrap
/// per file opened and none for `ls`/`stat`, and no PIN in any output or log line.
#[test]
fn an_hsm_aes_key_seals_verifies_unseals_and_mounts_with_one_unwrap_per_file() {
    let h = Hsm::new();
    let k = h.uri("kek1", true);
    h.seal("src", "sealed", &k, 0);
    let inspect = h.expect(&["inspect", &h.p("sealed/a.bin")], 0);
    assert!(
        inspect.contains(&format!("pkcs11 pkcs11:token={TOKEN};object=kek1\n")),
        "{inspect}"
    );
    assert!(
        !inspect.contains("module-path") && !inspect.contains("pin"),
        "{inspect}"
    );
    let verify = h.verify("sealed", &k, &[], 0);
    assert!(verify.contains("ok    "), "{verify}");
    h.unseal("sealed", "out", &k, 0);
    h.assert_same_tree("out");

    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let mut m = Mount::start(
        &h.p("sealed"),
        &["--key", &k, "--metrics-addr", &addr],
        &h.env(),
    );
    let unwraps = || {
        scrape(port)
            .into_iter()
            .filter(|(k, _)| {
                k.starts_with("sealfs_requests_total{service=\"pkcs11\",op=\"unwrap\"")
            })
            .map(|(_, v)| v)
            .sum::<u64>()
    };
    let names: Vec<_> = std::fs::read_dir(m.path(""))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    for n in ["a.bin", "config.json", "sub"] {
        assert!(names.contains(&n.to_string()), "{names:?}");
        std::fs::metadata(m.path(n)).unwrap();
    }
    std::fs::metadata(m.path("sub/b.bin")).unwrap();
    // The model's manifest, loaded at mount (before READY); ls and stat never ask.
    assert_eq!(unwraps(), 1, "ls and stat never ask the token");
    let mut expected = 1;
    for f in ["a.bin", "config.json", "sub/b.bin"] {
        assert_eq!(
            sha256(&std::fs::read(m.path(f)).unwrap()),
            sha256(&std::fs::read(h.path(&format!("src/{f}"))).unwrap())
        );
        expected += 1;
        assert_eq!(unwraps(), expected, "after reading {f}");
    }
    // A second read of an open-able file reuses the held DEK.
    std::fs::read(m.path("a.bin")).unwrap();
    assert_eq!(
        unwraps(),
        expected,
        "a reopen within the DEK grace asks again"
    );
    m.stop_with_exit_0();
    let logs = m.logs();
    assert!(
        !logs.contains(&h.pin),
        "the PIN is in the mount log:\n{logs}"
    );
    assert!(
        !logs.contains("pin-source"),
        "the PIN path is in the mount log:\n{logs}"
    );
}

/// An RSA pair: used only logged in with both halves matching (a public key object anyone
/// can replace is no trust anchor), and, since anyone with the public key can make a slot it
/// opens, read only with a trusted signer: `verify` and `mount` without one are refused.
#[test]
fn an_hsm_rsa_key_needs_a_login_and_a_trusted_signer() {
    let h = Hsm::new();
    let out = h.seal("src", "nologin", &h.uri("rsa1", false), 4);
    assert!(out.contains("needs both halves visible"), "{out}");
    assert!(!h.path("nologin").exists(), "nothing sealed");
    let rsa = h.uri("rsa1", true);
    expect_code(&sealfs(&["keygen", "--signing", &h.p("pub.key")], &[]), 0);
    let signer = format!("file:{}", h.p("pub.key"));
    let trust = format!("file:{}", h.p("pub.key.pub"));
    h.seal_with("src", "sealed", &rsa, &["--sign", &signer], 0);
    let out = h.verify("sealed", &rsa, &[], 2);
    assert!(out.contains("wraps DEKs with a public key"), "{out}");
    let err = Mount::try_start(&h.p("sealed"), &["--key", &rsa], &h.env())
        .err()
        .unwrap();
    assert!(err.contains("wraps DEKs with a public key"), "{err}");
    h.verify("sealed", &rsa, &["--trust-signer", &trust], 0);
    h.unseal("sealed", "out", &rsa, 0);
    h.assert_same_tree("out");

    // The public object replaced by another key's (no PIN needed to do that): refused.
    replace_public_object(&h, "rsa1", "03");
    let out = h.unseal("sealed", "out2", &rsa, 4);
    assert!(out.contains("does not match the private key"), "{out}");
}
/// the files (strict trust), and the bytes are unchanged.
#[test]
fn rewrap_moves_files_between_a_key_file_and_the_token_both_ways() {
    let h = Hsm::new();
    let (file, hsm) = (h.file_key(), h.uri("kek1", true));
    h.seal("src", "sealed", &file, 0);
    h.expect(
        &["rewrap", &h.p("sealed"), "--key", &file, "--to-key", &hsm],
        0,
    );
    let out = h.verify("sealed", &file, &[], 4);
    assert!(out.contains("no trusted key can open it"), "{out}");
    h.unseal("sealed", "out1", &hsm, 0);
    h.assert_same_tree("out1");

    // Token to token (AES to RSA), then back to the key file.
    let rsa = h.uri("rsa1", true);
    h.expect(
        &["rewrap", &h.p("sealed"), "--key", &hsm, "--to-key", &rsa],
        0,
    );
    h.verify("sealed", &hsm, &[], 4);
    h.expect(
        &["rewrap", &h.p("sealed"), "--key", &rsa, "--to-key", &file],
        0,
    );
    h.verify("sealed", &hsm, &[], 4);
    h.unseal("sealed", "out2", &file, 0);
    h.assert_same_tree("out2");
}

/// The last `len` bytes of a key object are its only slot's wrapped DEK.
fn key_object(dir: &Path, file: &str) -> PathBuf {
    dir.join(format!("{file}.sealfs-c20"))
}

/// Another key in the same token is refused without a token call (strict trust); a flipped
/// byte in the wrapped DEK, or a wrapped DEK moved from another file, is rejected *inside
/// the token* (the context is GCM's AAD): exit 3 and nothing unsealed.
#[test]
fn another_key_a_flipped_slot_and_a_slot_moved_between_files_are_refused() {
    let h = Hsm::new();
    let k = h.uri("kek1", true);
    h.seal("src", "sealed", &k, 0);
    let out = h.unseal("sealed", "o1", &h.uri("kek2", true), 4);
    assert!(out.contains("no trusted key can open it"), "{out}");
    assert!(!h.path("o1/a.bin").exists());

    const WRAPPED: usize = 1 + 12 + 32 + 16;
    let sealed = h.path("sealed");
    let a = std::fs::read(key_object(&sealed, "a.bin")).unwrap();
    // Move config.json's wrapped DEK into a.bin's key object (same key, other context).
    let c = std::fs::read(key_object(&sealed, "config.json")).unwrap();
    let mut moved = a.clone();
    let n = moved.len();
    moved[n - WRAPPED..].copy_from_slice(&c[c.len() - WRAPPED..]);
    // a.bin's key object holding `bytes` is refused inside the token: exit 3, no output.
    let refused = |bytes: &[u8], out: &str| {
        std::fs::write(key_object(&sealed, "a.bin"), bytes).unwrap();
        let dest = h.p(&format!("{out}/a.bin"));
        let said = h.unseal("sealed/a.bin", &format!("{out}/a.bin"), &k, 3);
        assert!(said.contains("did not authenticate"), "{said}");
        assert!(!Path::new(&dest).exists(), "{dest}");
    };
    refused(&moved, "o2");
    let mut flipped = a.clone();
    flipped[n - 5] ^= 0x01;
    refused(&flipped, "o3");

    // The untouched key object still opens: the refusals were about the bytes.
    std::fs::write(key_object(&sealed, "a.bin"), &a).unwrap();
    h.unseal("sealed/a.bin", "o4/a.bin", &k, 0);
}

/// Crypto-shredding and a missing token: once the KEK is destroyed in the token (by another
/// process, as an operator would), a running mount refuses new opens with EACCES within
/// a bounded time and the CLI says so in one line; a token that is not there at all fails
/// at once. Files opened before keep their held DEKs (revocation of those is the
/// `--revalidate` work).
#[test]
fn a_destroyed_key_or_a_missing_token_is_refused_in_bounded_time() {
    let h = Hsm::new();
    let k = h.uri("kek1", true);
    h.seal("src", "sealed", &k, 0);
    let m = Mount::start(&h.p("sealed"), &["--key", &k], &h.env());
    assert_eq!(
        std::fs::read(m.path("config.json")).unwrap(),
        b"{\"layers\": 2}\n"
    );
    run(h.tool().args([
        "--login",
        "--pin",
        &h.pin,
        "--delete-object",
        "--type",
        "secrkey",
        "--label",
        "kek1",
    ]));
    let start = Instant::now();
    assert_eq!(
        errno_of_open(&m.path("a.bin")),
        Some(libc::EACCES),
        "{}",
        m.logs()
    );
    assert!(
        start.elapsed() < Duration::from_secs(12),
        "took {:?}",
        start.elapsed()
    );
    let logs = m.logs();
    assert!(logs.contains("the key is not in the token"), "{logs}");
    drop(m);

    let start = Instant::now();
    let out = h.verify("sealed", &k, &[], 4);
    assert!(out.contains("the key is not in the token"), "{out}");
    assert!(start.elapsed() < Duration::from_secs(12));

    let gone = format!("pkcs11:token=no-such-token;object=kek1?module-path={MODULE}");
    let start = Instant::now();
    let out = h.verify("sealed", &gone, &[], 4);
    assert!(out.contains("no token with that"), "{out}");
    assert_eq!(out.trim().lines().count(), 1, "one line: {out}");
    assert!(start.elapsed() < Duration::from_secs(12));
}

/// URIs that would put a PIN in argv, name a relative or unsafe module, or name nothing,
/// are refused with one line that never echoes the query.
#[test]
fn unsafe_or_incomplete_pkcs11_uris_are_refused() {
    let h = Hsm::new();
    let secret = "pin-value=SECRET1234";
    let with_pin = format!("pkcs11:token={TOKEN};object=kek1?module-path={MODULE}&{secret}");
    let out = h.seal("src", "sealed", &with_pin, 2);
    assert!(out.contains("pin-value is refused"), "{out}");
    assert!(!out.contains("SECRET1234"), "{out}");
    let out = h.seal(
        "src",
        "sealed",
        &format!("pkcs11:token={TOKEN};object=kek1"),
        2,
    );
    assert!(out.contains("module-path"), "{out}");
    let out = h.seal(
        "src",
        "sealed",
        &format!("pkcs11:object=kek1?module-path={MODULE}"),
        2,
    );
    assert!(out.contains("name the token"), "{out}");

    // A module anyone may write is code anyone may run in this process.
    let copy = h.path("open-module.so");
    std::fs::copy(MODULE, &copy).unwrap();
    std::fs::set_permissions(&copy, std::fs::Permissions::from_mode(0o666)).unwrap();
    let uri = format!(
        "pkcs11:token={TOKEN};object=kek1?module-path={}",
        copy.display()
    );
    let out = h.seal("src", "sealed", &uri, 4);
    assert!(out.contains("writable by group or others"), "{out}");
    // A PIN file others can read is refused like a key file.
    h.write("loose-pin", h.pin.as_bytes());
    std::fs::set_permissions(h.path("loose-pin"), std::fs::Permissions::from_mode(0o644)).unwrap();
    let uri = format!(
        "pkcs11:token={TOKEN};object=kek1?module-path={MODULE}&pin-source=file:{}",
        h.p("loose-pin")
    );
    let out = h.seal("src", "sealed", &uri, 4);
    assert!(out.contains("PIN file"), "{out}");
    assert!(!h.path("sealed").exists(), "nothing sealed");
}

fn model_signing(h: &Hsm, args: &[&str]) -> std::process::Output {
    h.cmd("model_signing")
        .args(args)
        .output()
        .expect("model_signing is required: pip install 'model-signing[pkcs11]==1.1.1' pyopenssl")
}

/// The token signs: `seal --sign pkcs11:…` (private key never leaves the token) verifies under
/// `--trust-signer pkcs11:…` (public key read without a login) and under model_signing with
/// the exported public key; and `model_signing sign pkcs11-key` signatures pass the seal
/// gate `--trust-signer pkcs11:…` while another trusted signer refuses them.
#[test]
fn a_token_ec_key_signs_models_and_interoperates_with_model_signing() {
    let h = Hsm::new();
    let k = h.uri("kek1", true);
    let signer = h.uri("signer1", true);
    // Trusting a token's public key needs the PIN: the pair is checked first.
    let out = h.verify("src", &k, &["--trust-signer", &h.uri("signer1", false)], 4);
    assert!(out.contains("needs pin-source="), "{out}");
    let trust = h.uri("signer1", true);
    h.seal_with("src", "sealed", &k, &["--sign", &signer], 0);
    let out = h.verify("sealed", &k, &["--trust-signer", &trust], 0);
    assert!(out.contains("signed by sha256:"), "{out}");
    expect_code(&sealfs(&["keygen", "--signing", &h.p("other.key")], &[]), 0);
    let other = format!("file:{}", h.p("other.key.pub"));
    h.verify("sealed", &k, &["--trust-signer", &other], 4);

    // The token's public key, exported as PEM, verifies the OMS model.sig on the mount.
    run(h.tool().args([
        "--read-object",
        "--type",
        "pubkey",
        "--label",
        "signer1",
        "-o",
        &h.p("pub.der"),
    ]));
    run(Command::new("openssl").args([
        "pkey",
        "-pubin",
        "-inform",
        "DER",
        "-in",
        &h.p("pub.der"),
        "-out",
        &h.p("pub.pem"),
    ]));
    let m = Mount::start(
        &h.p("sealed"),
        &["--key", &k, "--trust-signer", &trust],
        &h.env(),
    );
    let o = model_signing(
        &h,
        &[
            "verify",
            "key",
            "--signature",
            &m.path("model.sig").display().to_string(),
            "--public_key",
            &h.p("pub.pem"),
            &m.path("").display().to_string(),
        ],
    );
    assert!(
        o.status.success(),
        "model_signing refused the token's signature:\n{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    drop(m);

    // The other way: training signs with the token through model_signing.
    let ms_uri = format!(
        "pkcs11:token={TOKEN};object=signer1?module-path={MODULE}&pin-value={}",
        h.pin
    );
    let o = model_signing(
        &h,
        &[
            "sign",
            "pkcs11-key",
            "--signature",
            &h.p("src/model.sig"),
            "--pkcs11_uri",
            &ms_uri,
            &h.p("src"),
        ],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    h.seal_with("src", "gated", &k, &["--trust-signer", &trust], 0);
    h.verify("gated", &k, &[], 0);
    let out = h.seal_with("src", "refused", &k, &["--trust-signer", &other], 3);
    assert!(out.contains("not by a trusted signer"), "{out}");
    assert!(!h.path("refused").exists(), "nothing visible at DEST");
}

/// Issue 19, finding 1: an object anyone can create without the PIN is never a key. A
/// public AES key planted under the RSA pair's label (`pkcs11-tool --write-object`, no
/// login) takes over neither `seal` nor `rewrap --to-key`: the label then names a secret key
/// and a pair, and both are refused until `type=` says which; `type=private` picks the pair
/// and ignores it; a public AES key on its own is refused (CKA_PRIVATE=false); and slots the
/// pair made are never opened by an AES key put under the same URI (a change of kind).
#[test]
fn a_secret_key_planted_without_the_pin_takes_over_nothing() {
    let h = Hsm::new();
    let rsa = h.uri("rsa1", true);
    expect_code(&sealfs(&["keygen", "--signing", &h.p("pub.key")], &[]), 0);
    let signer = format!("file:{}", h.p("pub.key"));
    let trust = format!("file:{}", h.p("pub.key.pub"));
    h.seal_with("src", "sealed", &rsa, &["--sign", &signer], 0);
    h.seal("src", "by-file", &h.file_key(), 0);
    h.write("planted.key", &[7u8; 32]);
    let plant = |label: &str, id: &str| {
        run(h.tool().args([
            "--write-object",
            &h.p("planted.key"),
            "--type",
            "secrkey",
            "--key-type",
            "AES:32",
            "--label",
            label,
            "--id",
            id,
        ]))
    };
    plant("rsa1", "03");

    let both = "names both a secret key and a key pair";
    let out = h.seal_with("src", "planted", &rsa, &["--sign", &signer], 4);
    assert!(out.contains(both), "{out}");
    assert!(!h.path("planted").exists(), "nothing sealed");
    let out = h.expect(
        &[
            "rewrap",
            &h.p("by-file"),
            "--key",
            &h.file_key(),
            "--to-key",
            &rsa,
        ],
        4,
    );
    assert!(out.contains(both), "{out}");
    // Still only the key file's slots: nothing was wrapped under the planted key.
    let ko = std::fs::read(key_object(&h.path("by-file"), "a.bin")).unwrap();
    let ko = sealfs::format::KeyObject::parse(&ko).unwrap();
    assert!(
        ko.slots
            .iter()
            .all(|s| s.kind == sealfs::format::SlotKind::File),
        "{:?}",
        ko.slots.iter().map(|s| &s.key_id).collect::<Vec<_>>()
    );

    // type= says which: the pair, whatever else the label names.
    let pair = rsa.replace(";object=rsa1", ";object=rsa1;type=private");
    h.seal_with("src", "typed", &pair, &["--sign", &signer], 0);
    h.verify("typed", &pair, &["--trust-signer", &trust], 0);
    h.unseal("sealed", "out", &pair, 0);
    h.assert_same_tree("out");
    let secret = rsa.replace(";object=rsa1", ";object=rsa1;type=secret-key");
    let out = h.seal("src", "typed-secret", &secret, 4);
    assert!(out.contains("CKA_PRIVATE=false"), "{out}");

    // A public AES key on its own.
    plant("planted", "0a");
    let out = h.seal("src", "public-aes", &h.uri("planted", true), 4);
    assert!(out.contains("CKA_PRIVATE=false"), "{out}");
    assert!(!h.path("public-aes").exists(), "nothing sealed");

    // A real (private) AES key under the pair's URI, made with the PIN: the pair's slots
    // are not opened by it.
    run(h
        .tool()
        .args(["--delete-object", "--type", "secrkey", "--label", "rsa1"]));
    run(h.tool().args([
        "--login",
        "--pin",
        &h.pin,
        "--keygen",
        "--key-type",
        "AES:32",
        "--private",
        "--label",
        "rsa1",
        "--id",
        "03",
    ]));
    let out = h.verify("sealed", &secret, &["--trust-signer", &trust], 4);
    assert!(out.contains("refused (a change of kind"), "{out}");
}

/// Issue 19, finding 3: an RSA wrap encrypts to the public key checked against the private
/// key at resolve, not to whatever public object the token holds when it wraps: the public
/// object replaced (no PIN needed) between resolve and wrap, the DEK still goes to the pair.
#[test]
fn an_rsa_wrap_encrypts_to_the_public_key_checked_at_resolve() {
    use sealfs::keys::pkcs11::{Pkcs11Key, Pkcs11Uri};
    let h = Hsm::new();
    // The only test of this binary that loads the module in its own process.
    std::env::set_var("SOFTHSM2_CONF", h.p("softhsm2.conf"));
    let rt = tokio::runtime::Runtime::new().unwrap();
    let uri: Pkcs11Uri = h.uri("rsa1", true).parse().unwrap();
    let key = rt.block_on(Pkcs11Key::resolve(&uri)).unwrap();
    let ctx: sealfs::format::EncryptionContext = [("k".to_string(), "v".to_string())].into();
    let dek = sealfs::crypto::Dek::random().unwrap();
    let before = rt.block_on(key.wrap(&dek, &ctx)).unwrap();
    replace_public_object(&h, "rsa1", "03");
    let after = rt.block_on(key.wrap(&dek, &ctx)).unwrap();
    for wrapped in [before, after] {
        let back = rt.block_on(key.unwrap(&wrapped, &ctx)).unwrap();
        assert!(
            back.expose() == dek.expose(),
            "the pair's private key opens it"
        );
    }
}

/// Review of the fixes for finding 3: the public exponent is not bound to the modulus. A
/// public object put back with the pair's modulus and another exponent (e = 3 here; e = 1
/// would send the padded DEK in the clear) is refused at resolve (the exponents compared
/// where the token shows both, and a probe round-tripped through the pair in any case), so
/// nothing is wrapped to a key the private key cannot open.
#[test]
fn an_rsa_public_object_with_another_exponent_is_refused() {
    let h = Hsm::new();
    let rsa = h.uri("rsa1", true);
    let (pk, forged) = (h.p("rsa1.der"), h.p("rsa1-e3.der"));
    run(h.tool().args([
        "--read-object",
        "--type",
        "pubkey",
        "--label",
        "rsa1",
        "-o",
        &pk,
    ]));
    let py = "import sys\n\
from cryptography.hazmat.primitives import serialization as s\n\
from cryptography.hazmat.primitives.asymmetric import rsa\n\
n = s.load_der_public_key(open(sys.argv[1], 'rb').read()).public_numbers().n\n\
k = rsa.RSAPublicNumbers(3, n).public_key()\n\
open(sys.argv[2], 'wb').write(k.public_bytes(s.Encoding.DER, s.PublicFormat.SubjectPublicKeyInfo))\n";
    run(Command::new("python3").args(["-c", py, &pk, &forged]));
    run(h
        .tool()
        .args(["--delete-object", "--type", "pubkey", "--label", "rsa1"]));
    run(h.tool().args([
        "--write-object",
        &forged,
        "--type",
        "pubkey",
        "--label",
        "rsa1",
        "--id",
        "03",
    ]));
    let out = h.seal("src", "e3", &rsa, 4);
    // SoftHSM shows the private key's exponent, so the comparison refuses it; a token that
    // does not is refused by the round trip ("exponent is not the private key's").
    assert!(out.contains("does not match the private key"), "{out}");
    assert!(!h.path("e3").exists(), "nothing sealed");
}

/// Replaces the public object `label` (id `id`) with another RSA key's, as anyone who
/// reaches the token can without the PIN.
fn replace_public_object(h: &Hsm, label: &str, id: &str) {
    let other = format!("other-{label}");
    run(h.tool().args([
        "--keypairgen",
        "--key-type",
        "rsa:2048",
        "--label",
        &other,
        "--id",
        "99",
        "--login",
        "--pin",
        &h.pin,
    ]));
    let der = h.p(&format!("{other}.der"));
    run(h.tool().args([
        "--read-object",
        "--type",
        "pubkey",
        "--label",
        &other,
        "-o",
        &der,
    ]));
    run(h
        .tool()
        .args(["--delete-object", "--type", "pubkey", "--label", label]));
    run(h.tool().args([
        "--write-object",
        &der,
        "--type",
        "pubkey",
        "--label",
        label,
        "--id",
        id,
    ]));
}
