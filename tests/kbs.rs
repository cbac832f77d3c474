//! `kbs:` keys against the real Trustee KBS of `../shared/kbs` (`bin/kbs` with the sample
//! verifier, started by its `start-kbs.sh` on a free loopback port, killed in `Drop`), and
//! against fakes of our own on loopback: a KBS answering each bad JWE, a proxy that tampers
//! with the evidence on its way, and a Confidential Data Hub.

mod common;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine;
use common::*;

const RESOURCE: &str = "sealfs/kek/m1";
const KEY_URI: &str = "kbs:///sealfs/kek/m1";

fn shared_kbs() -> PathBuf {
    let d = std::env::var_os("SEALFS_TEST_KBS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/kbs"));
    assert!(
        d.join("bin/kbs").exists() && d.join("start-kbs.sh").exists(),
        "the Trustee KBS is missing at {} (bin/kbs, start-kbs.sh): the kbs: tests need it \
         (set SEALFS_TEST_KBS_DIR to its directory)",
        d.display()
    );
    d
}

/// A real Trustee KBS on a free loopback port, its state in a tempdir.
struct Kbs {
    pid: i32,
    url: String,
    admin_key: String,
    dir: tempfile::TempDir,
}

impl Kbs {
    fn start() -> Self {
        let here = shared_kbs();
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let out = Command::new("bash")
            .arg(here.join("start-kbs.sh"))
            .arg(dir.path().join("kbs"))
            .arg(port.to_string())
            .output()
            .expect("run start-kbs.sh");
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        assert!(
            out.status.success(),
            "start-kbs.sh failed: {text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let field = |name: &str| {
            text.split_whitespace()
                .find_map(|w| w.strip_prefix(&format!("{name}=")))
                .unwrap_or_else(|| panic!("no {name} in {text:?}"))
                .to_string()
        };
        Self {
            pid: field("KBS_PID").parse().unwrap(),
            url: field("KBS_URL"),
            admin_key: field("KBS_ADMIN_KEY"),
            dir,
        }
    }

    fn admin(&self, args: &[&str]) {
        let o = Command::new("python3")
            .arg(shared_kbs().join("rcar_client.py"))
            .arg(&self.url)
            .arg("--admin")
            .arg(&self.admin_key)
            .args(args)
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "rcar_client {args:?}: {}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
    }

    fn upload(&self, path: &str, file: &str) {
        self.admin(&[path, file]);
    }

    fn policy(&self, rego: &str) {
        let p = self.dir.path().join("policy.rego");
        std::fs::write(&p, rego).unwrap();
        self.admin(&["policy", p.to_str().unwrap()]);
    }

    fn env(&self) -> Vec<(String, String)> {
        vec![
            s2("SEALFS_KBS_URL", &self.url),
            s2("SEALFS_ATTESTER", "sample"),
        ]
    }
}

impl Drop for Kbs {
    fn drop(&mut self) {
        // SAFETY: signalling the KBS this test started (by its PID).
        unsafe { libc::kill(self.pid, libc::SIGKILL) };
        let start = Instant::now();
        while Path::new(&format!("/proc/{}", self.pid)).exists()
            && start.elapsed() < Duration::from_secs(5)
        {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// `python3 -c SCRIPT ARGS…`: its stdout; fails the test if it fails.
fn python_c(script: &str, args: &[&str]) -> String {
    let o = Command::new("python3")
        .arg("-c")
        .arg(script)
        .args(args)
        .output()
        .expect("python3");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn s2(k: &str, v: &str) -> (String, String) {
    (k.to_string(), v.to_string())
}

const DENY_ALL: &str = "package policy\n\ndefault allow = false\n";

/// A sealed model under a key file, and that key file's hex (to look for in logs).
struct Model {
    site: Site,
    files: Vec<(&'static str, Vec<u8>)>,
}

impl Model {
    fn new() -> Self {
        let site = Site::new();
        let files = vec![
            ("a.bin", pattern(300_000, 1)),
            ("sub/b.txt", b"hello\n".to_vec()),
            ("empty", vec![]),
        ];
        site.seal_files(&files);
        Self { site, files }
    }

    fn store(&self) -> String {
        self.site.p("store")
    }

    fn key_file(&self) -> String {
        self.site.p("k")
    }

    /// The 64 hex digits of the KEK.
    fn key_hex(&self) -> String {
        let t = std::fs::read_to_string(self.key_file()).unwrap();
        t.trim().trim_start_matches("sealfs-kek-v1:").to_string()
    }

    fn verify(&self, env: &[(String, String)]) -> std::process::Output {
        sealfs(&["verify", &self.store(), "--key", KEY_URI], env)
    }

    /// `verify` under two `kbs:` keys of one command (one KBS, two resources).
    fn verify_two_keys(&self, env: &[(String, String)]) -> std::process::Output {
        sealfs(
            &[
                "verify",
                &self.store(),
                "--key",
                KEY_URI,
                "--key",
                "kbs:///sealfs/kek/m2",
            ],
            env,
        )
    }
}

#[track_caller]
fn refused_with(o: &std::process::Output, code: i32, what: &str, key_hex: &str) {
    let all = expect_code(o, code);
    let err = stderr(o);
    let last = err.lines().last().unwrap_or("");
    assert!(
        last.contains(what),
        "expected {what:?} in the error line: {err}"
    );
    assert!(!all.contains(key_hex), "the KEK leaked: {all}");
    assert!(!stdout(o).contains("ok "), "nothing verified: {all}");
}

#[test]
fn a_released_key_verifies_unseals_and_mounts_with_a_transcript() {
    let kbs = Kbs::start();
    let m = Model::new();
    kbs.upload(RESOURCE, &m.key_file());
    let log = tempfile::tempdir().unwrap();
    let logdir = log.path().join("att");
    std::fs::create_dir(&logdir).unwrap();
    std::fs::set_permissions(&logdir, std::os::unix::fs::PermissionsExt::from_mode(0o700)).unwrap();
    let logarg = logdir.to_str().unwrap();

    let o = sealfs(
        &[
            "--attestation-log",
            logarg,
            "verify",
            &m.store(),
            "--key",
            KEY_URI,
        ],
        &kbs.env(),
    );
    let all = expect_code(&o, 0);
    for (n, _) in &m.files {
        assert!(
            stdout(&o).contains(&format!("ok    {}/{n}", m.store())),
            "{all}"
        );
    }
    // The transcript: one audit event, with what the KBS's token said.
    let err = stderr(&o);
    let event = err
        .lines()
        .find(|l| l.contains("kek released by the key broker"))
        .unwrap_or_else(|| panic!("no release event: {err}"));
    for part in [
        &format!("broker={}", kbs.url),
        "resource=sealfs/kek/m1",
        "tee=sample",
        "issuer=CoCo-Attestation-Service",
        "status=cpu0=contraindicated",
        "token_expires=",
        "evidence_sha256=",
    ] {
        assert!(event.contains(part), "{part} missing: {event}");
    }
    assert!(
        err.contains("sample evidence"),
        "a warning for sample: {err}"
    );
    // --attestation-log: the token and the evidence, 0600, named by the token's digest.
    let kept: Vec<_> = std::fs::read_dir(&logdir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(kept.len(), 2, "{kept:?}");
    let token_file = kept
        .iter()
        .find(|p| p.extension().is_some_and(|e| e == "token"))
        .unwrap();
    let token = std::fs::read(token_file).unwrap();
    assert!(
        event.contains(&format!("token_sha256={}", sha256(&token))),
        "{event}"
    );
    let evidence = std::fs::read(kept.iter().find(|p| *p != token_file).unwrap()).unwrap();
    assert!(event.contains(&format!("evidence_sha256={}", sha256(&evidence))));
    let ev: serde_json::Value = serde_json::from_slice(&evidence).unwrap();
    assert_eq!(ev["tee-evidence"]["primary_evidence"]["svn"], "1", "{ev}");
    // An auditor recomputes the binding from the record alone (independently, in Python):
    // report_data = SHA-384 of the RFC 8785 JSON of the nonce and the TEE public key.
    let check = python_c(
        "import json,sys,hashlib,base64\n\
         ev=json.load(open(sys.argv[1]))\n\
         rd=ev['runtime-data']\n\
         prd={'tee-pubkey':rd['tee-pubkey'],'nonce':rd['nonce'],'additional-evidence':''}\n\
         d=hashlib.sha384(json.dumps(prd,sort_keys=True,separators=(',',':')).encode()).digest()\n\
         got=base64.b64decode(ev['tee-evidence']['primary_evidence']['report_data'])\n\
         print('bound' if d==got else 'NOT BOUND')\n",
        &[kept
            .iter()
            .find(|p| *p != token_file)
            .unwrap()
            .to_str()
            .unwrap()],
    );
    assert_eq!(check.trim(), "bound");
    for p in &kept {
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(p).unwrap().permissions().mode() & 0o777,
            0o600
        );
    }
    let token = String::from_utf8(token).unwrap();
    assert!(token.split('.').count() == 3 && !all.contains(&token));
    // The claims and the signature (the header is the same for every token of that KBS).
    let secrets: Vec<String> = token
        .split('.')
        .skip(1)
        .map(|p| p[..24].to_string())
        .collect();
    assert!(!all.contains(&m.key_hex()));

    // unseal writes every file back.
    let out = m.site.p("out");
    expect_code(
        &sealfs(&["unseal", &m.store(), &out, "--key", KEY_URI], &kbs.env()),
        0,
    );
    for (n, d) in &m.files {
        assert_eq!(
            &std::fs::read(m.site.path(&format!("out/{n}"))).unwrap(),
            d,
            "{n}"
        );
    }

    // A mount reads every file; its argv and environment hold no key and no token.
    let mnt = Mount::start(&m.store(), &["--key", KEY_URI], &kbs.env());
    for (n, d) in &m.files {
        assert_eq!(&std::fs::read(mnt.path(n)).unwrap(), d, "{n}");
    }
    let environ = std::fs::read(format!("/proc/{}/environ", mnt.pid())).unwrap();
    let cmdline = std::fs::read(format!("/proc/{}/cmdline", mnt.pid())).unwrap();
    for blob in [&environ, &cmdline] {
        let t = String::from_utf8_lossy(blob);
        assert!(!t.contains(&m.key_hex()));
        assert!(secrets.iter().all(|x| !t.contains(x.as_str())));
    }
    let logs = mnt.logs();
    assert!(logs.contains("kek released by the key broker"), "{logs}");
    assert!(!logs.contains(&m.key_hex()));
    assert!(secrets.iter().all(|x| !logs.contains(x.as_str())));
    assert!(secrets.iter().all(|x| !all.contains(x.as_str())));

    // The time of one release (auth + attest + resource), for docs/PERFORMANCE.md: the
    // best of 5 `verify` runs with kbs: against the same with file:.
    let best = |key: &str, env: &[(String, String)]| {
        (0..5)
            .map(|_| {
                let t = Instant::now();
                expect_code(&sealfs(&["verify", &m.store(), "--key", key], env), 0);
                t.elapsed()
            })
            .min()
            .unwrap()
    };
    let with_kbs = best(KEY_URI, &kbs.env());
    let with_file = best(&m.site.key(), &[]);
    eprintln!("kbs release: verify with kbs: {with_kbs:?}, with file: {with_file:?}");
}

#[test]
fn a_denied_path_or_a_missing_resource_is_refused_with_exit_4_and_no_plaintext() {
    let kbs = Kbs::start();
    let m = Model::new();
    // The sample policy releases sealfs/kek/* only.
    kbs.upload("other/kek/m1", &m.key_file());
    let o = sealfs(
        &["verify", &m.store(), "--key", "kbs:///other/kek/m1"],
        &kbs.env(),
    );
    refused_with(&o, 4, "PolicyDeny", &m.key_hex());
    // Never uploaded (or deleted from the KBS).
    let o = m.verify(&kbs.env());
    refused_with(&o, 4, "key broker", &m.key_hex());
    assert!(
        stderr(&o).contains("refused sealfs/kek/m1"),
        "{}",
        stderr(&o)
    );
    // The mount does not come up.
    let err = Mount::try_start(&m.store(), &["--key", KEY_URI], &kbs.env())
        .err()
        .expect("a mount with a refused key must fail");
    assert!(err.contains("refused sealfs/kek/m1"), "{err}");
    let out = m.site.p("out");
    expect_code(
        &sealfs(&["unseal", &m.store(), &out, "--key", KEY_URI], &kbs.env()),
        4,
    );
    assert!(!m.site.path("out/a.bin").exists(), "no plaintext written");
}

#[test]
fn revalidation_after_the_policy_turns_to_deny_revokes_open_handles_and_new_opens() {
    use std::os::unix::fs::FileExt;
    let kbs = Kbs::start();
    let m = Model::new();
    kbs.upload(RESOURCE, &m.key_file());
    let mnt = Mount::start(
        &m.store(),
        &["--key", KEY_URI, "--revalidate", "1s", "--dek-grace", "1h"],
        &kbs.env(),
    );
    let f = std::fs::File::open(mnt.path("a.bin")).unwrap();
    let mut buf = vec![0u8; 4096];
    f.read_exact_at(&mut buf, 0).unwrap();
    assert_eq!(&buf[..], &m.files[0].1[..4096]);
    // Still allowed: a few rounds pass and the handle still reads.
    std::thread::sleep(Duration::from_millis(2500));
    f.read_exact_at(&mut buf, 8192).unwrap();
    kbs.policy(DENY_ALL);
    let start = Instant::now();
    loop {
        match f.read_at(&mut buf, 0) {
            Err(e) if e.raw_os_error() == Some(libc::EACCES) => break,
            Err(e) => panic!("unexpected error {e}"),
            Ok(_) => {}
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "still serving 20 s after the policy denied: {}",
            mnt.logs()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // A file not opened before is refused too: the held KEK is not used any more.
    let e = std::fs::read(mnt.path("sub/b.txt")).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EACCES), "{e}");
    let logs = mnt.logs();
    assert!(logs.contains("PolicyDeny"), "{logs}");
    assert!(!logs.contains(&m.key_hex()));
}

// ---- Fakes of our own on loopback ----------------------------------------------------------

/// One HTTP request as the fakes see it.
struct Req {
    method: String,
    path: String,
    head: String,
    body: Vec<u8>,
}

/// A reply: status, extra header lines, body.
type Reply = (u16, Vec<String>, Vec<u8>);

/// A one-request-per-connection HTTP/1.1 server on a free loopback port, stopped on drop.
struct Fake {
    port: u16,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

fn read_request(c: &mut TcpStream) -> Option<Req> {
    c.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    let mut buf = Vec::new();
    let mut b = [0u8; 4096];
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let n = c.read(&mut b).ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&b[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
    let len = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse::<usize>().ok())?
        })
        .unwrap_or(0);
    let mut body = buf[head_end..].to_vec();
    while body.len() < len {
        let n = c.read(&mut b).ok()?;
        if n == 0 {
            break;
        }
        body.extend_from_slice(&b[..n]);
    }
    let mut first = head.lines().next()?.split(' ');
    Some(Req {
        method: first.next()?.to_string(),
        path: first.next()?.to_string(),
        head,
        body,
    })
}

impl Fake {
    fn start(handler: impl Fn(&Req) -> Reply + Send + Sync + 'static) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let port = listener.local_addr().unwrap().port();
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                let Ok((mut c, _)) = listener.accept() else {
                    std::thread::sleep(Duration::from_millis(10));
                    continue;
                };
                c.set_nonblocking(false).unwrap();
                let Some(req) = read_request(&mut c) else {
                    continue;
                };
                let (status, headers, body) = handler(&req);
                let mut out = format!(
                    "HTTP/1.1 {status} X\r\nContent-Length: {}\r\nConnection: close\r\n",
                    body.len()
                );
                for h in headers {
                    out.push_str(&h);
                    out.push_str("\r\n");
                }
                out.push_str("\r\n");
                let _ = c.write_all(out.as_bytes());
                let _ = c.write_all(&body);
            }
        });
        Self {
            port,
            stop,
            thread: Some(thread),
        }
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}

impl Drop for Fake {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn b64u(b: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b)
}

/// What the fake KBS does to the resource's JWE.
type Mutate = fn(&mut serde_json::Value);

fn header(jwe: &mut serde_json::Value, f: impl FnOnce(&mut serde_json::Value)) {
    let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(jwe["protected"].as_str().unwrap())
        .unwrap();
    let mut h: serde_json::Value = serde_json::from_slice(&raw).unwrap();
    f(&mut h);
    jwe["protected"] = b64u(h.to_string().as_bytes()).into();
}

/// What a fake KBS does beyond the protocol: its calls counted, switched to 503 at will.
#[derive(Default)]
struct FakeState {
    auths: std::sync::atomic::AtomicUsize,
    attests: std::sync::atomic::AtomicUsize,
    resources: std::sync::atomic::AtomicUsize,
    /// Every call answers 503 while set.
    down: AtomicBool,
    /// The challenge's `extra-params` (JSON), else `""`.
    extra_params: Mutex<Option<String>>,
}

/// A fake KBS: a real protocol shape (cookie, nonce, a JWT-shaped token), the resource a
/// JWE to the TEE key the attest request carried, built by sealfs's own sender side
/// (`encrypt_for_tests`) from `content` and then mutated.
fn fake_kbs(content: Vec<u8>, mutate: Mutate, status: u16) -> Fake {
    fake_kbs_with(content, mutate, status, None, Arc::default())
}

fn fake_kbs_with(
    content: Vec<u8>,
    mutate: Mutate,
    status: u16,
    exp: Option<u64>,
    state: Arc<FakeState>,
) -> Fake {
    let jwk = Arc::new(Mutex::new(serde_json::Value::Null));
    Fake::start(move |r| {
        if state.down.load(Ordering::SeqCst) {
            return (503, vec![], b"{}".to_vec());
        }
        match (r.method.as_str(), r.path.as_str()) {
            ("POST", "/kbs/v0/auth") => {
                state.auths.fetch_add(1, Ordering::SeqCst);
                (
                    200,
                    vec!["Set-Cookie: kbs-session-id=fake1234; Path=/".into()],
                    format!(
                        r#"{{"nonce":"bm9uY2U=","extra-params":{}}}"#,
                        state
                            .extra_params
                            .lock()
                            .unwrap()
                            .as_deref()
                            .unwrap_or("\"\"")
                    )
                    .into_bytes(),
                )
            }
            ("POST", "/kbs/v0/attest") => {
                state.attests.fetch_add(1, Ordering::SeqCst);
                assert!(r.head.contains("kbs-session-id=fake1234"), "{}", r.head);
                let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
                *jwk.lock().unwrap() = v["runtime-data"]["tee-pubkey"].clone();
                let exp = exp.unwrap_or_else(|| {
                    std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .unwrap()
                        .as_secs()
                        + 300
                });
                let claims = serde_json::json!({"iss": "fake", "exp": exp,
                    "submods": {"cpu0": {"ear.status": "affirming"}}});
                let token = format!("e30.{}.c2ln", b64u(claims.to_string().as_bytes()));
                (
                    200,
                    vec![],
                    serde_json::json!({ "token": token })
                        .to_string()
                        .into_bytes(),
                )
            }
            ("GET", p) if p.starts_with("/kbs/v0/resource/") => {
                state.resources.fetch_add(1, Ordering::SeqCst);
                assert!(r.head.contains("Bearer e30."), "{}", r.head);
                let mut jwe = sealfs::keys::jwe::encrypt_for_tests(&jwk.lock().unwrap(), &content);
                mutate(&mut jwe);
                let mut body = jwe.to_string().into_bytes();
                if jwe.get("pad").is_some() {
                    body.resize(100 * 1024, b' ');
                }
                let headers = if status == 302 {
                    vec!["Location: http://127.0.0.1:1/".into()]
                } else {
                    vec![]
                };
                (status, headers, body)
            }
            _ => (404, vec![], b"{}".to_vec()),
        }
    })
}

/// sealfs binds evidence with SHA-384 only: a challenge whose hash list lacks it is refused;
/// one that offers it among others is used.
#[test]
fn a_challenge_without_sha384_is_refused() {
    let m = Model::new();
    let key = std::fs::read(m.key_file()).unwrap();
    for (params, refused) in [
        (r#"{"supported-hash-algorithms":["sha256"]}"#, true),
        (r#"{"supported-hash-algorithms":7}"#, true),
        (
            r#"{"supported-hash-algorithms":["sha256","sha384"]}"#,
            false,
        ),
    ] {
        let state = Arc::new(FakeState::default());
        *state.extra_params.lock().unwrap() = Some(params.to_string());
        let f = fake_kbs_with(key.clone(), |_| {}, 200, None, state);
        let env = vec![
            s2("SEALFS_KBS_URL", &f.url()),
            s2("SEALFS_ATTESTER", "sample"),
        ];
        if refused {
            refused_with(&m.verify(&env), 4, "unexpected extra-params", &m.key_hex());
        } else {
            expect_code(&m.verify(&env), 0);
        }
    }
}

/// A hostile `exp` (past what a time can hold) is a bad answer, not a panic.
#[test]
fn a_token_whose_exp_overflows_is_refused_in_one_line() {
    let m = Model::new();
    let key = std::fs::read(m.key_file()).unwrap();
    let f = fake_kbs_with(key, |_| {}, 200, Some(u64::MAX), Arc::default());
    let env = vec![
        s2("SEALFS_KBS_URL", &f.url()),
        s2("SEALFS_ATTESTER", "sample"),
    ];
    refused_with(&m.verify(&env), 4, "exp is out of range", &m.key_hex());
}

/// One attestation serves every `kbs:` key of a command (the token is reused until it
/// expires), and a revalidating mount attests once per key per round, not once per DEK.
#[test]
fn attestations_are_once_per_command_and_once_per_key_per_round() {
    use Ordering::SeqCst;
    let m = Model::new();
    let key = std::fs::read(m.key_file()).unwrap();
    let state: Arc<FakeState> = Arc::default();
    let f = fake_kbs_with(key, |_| {}, 200, None, state.clone());
    let env = vec![
        s2("SEALFS_KBS_URL", &f.url()),
        s2("SEALFS_ATTESTER", "sample"),
    ];
    let o = m.verify_two_keys(&env);
    expect_code(&o, 0);
    assert_eq!(state.auths.load(SeqCst), 1, "one attestation for both keys");
    assert_eq!(state.resources.load(SeqCst), 2, "one release per key");

    let state: Arc<FakeState> = Arc::default();
    let f = fake_kbs_with(
        std::fs::read(m.key_file()).unwrap(),
        |_| {},
        200,
        None,
        state.clone(),
    );
    let env = vec![
        s2("SEALFS_KBS_URL", &f.url()),
        s2("SEALFS_ATTESTER", "sample"),
    ];
    let mnt = Mount::start(
        &m.store(),
        &["--key", KEY_URI, "--revalidate", "1s", "--dek-grace", "1h"],
        &env,
    );
    // Three files and the manifest: four DEKs held.
    for (n, d) in &m.files {
        assert_eq!(&std::fs::read(mnt.path(n)).unwrap(), d);
    }
    let start = Instant::now();
    let before = state.attests.load(SeqCst);
    std::thread::sleep(Duration::from_millis(3500));
    let rounds = state.attests.load(SeqCst) - before;
    let most = start.elapsed().as_secs() as usize + 1;
    assert!(
        (2..=most).contains(&rounds),
        "{rounds} attestations in {:?} with 4 DEKs held: once per round expected",
        start.elapsed()
    );
}

/// A broker kept unreachable (a hostile host drops the traffic, or stalls the quote) is an
/// outage, bounded: past --revalidate-max-outage the held handle, a re-open and a first
/// open are all refused.
#[test]
fn a_broker_outage_past_the_bound_refuses_held_reopened_and_new_files() {
    use std::os::unix::fs::FileExt;
    let m = Model::new();
    let state: Arc<FakeState> = Arc::default();
    let f = fake_kbs_with(
        std::fs::read(m.key_file()).unwrap(),
        |_| {},
        200,
        None,
        state.clone(),
    );
    let env = vec![
        s2("SEALFS_KBS_URL", &f.url()),
        s2("SEALFS_ATTESTER", "sample"),
    ];
    let mnt = Mount::start(
        &m.store(),
        &[
            "--key",
            KEY_URI,
            "--revalidate",
            "1s",
            "--revalidate-max-outage",
            "3s",
            "--dek-grace",
            "1h",
        ],
        &env,
    );
    let h = std::fs::File::open(mnt.path("a.bin")).unwrap();
    let mut buf = [0u8; 16];
    h.read_exact_at(&mut buf, 0).unwrap();
    state.down.store(true, Ordering::SeqCst);
    // Within the bound the outage is ridden out.
    std::thread::sleep(Duration::from_millis(1500));
    h.read_exact_at(&mut buf, 0).unwrap();
    let start = Instant::now();
    while h.read_at(&mut buf, 0).is_ok() {
        assert!(
            start.elapsed() < Duration::from_secs(15),
            "still serving: {}",
            mnt.logs()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let eacces = |p: &str| std::fs::read(mnt.path(p)).unwrap_err().raw_os_error();
    assert_eq!(eacces("a.bin"), Some(libc::EACCES), "a re-open");
    assert_eq!(eacces("sub/b.txt"), Some(libc::EACCES), "a first open");
    assert!(
        mnt.logs().contains("--revalidate-max-outage"),
        "{}",
        mnt.logs()
    );
}

#[test]
fn a_fake_kbs_answering_each_bad_jwe_is_refused_each_time() {
    let m = Model::new();
    let key = std::fs::read(m.key_file()).unwrap();
    let env = |f: &Fake| {
        vec![
            s2("SEALFS_KBS_URL", &f.url()),
            s2("SEALFS_ATTESTER", "sample"),
        ]
    };
    // The control: the fake's good answer is accepted, so each refusal below is the JWE's.
    let good = fake_kbs(key.clone(), |_| {}, 200);
    let o = m.verify(&env(&good));
    expect_code(&o, 0);
    assert!(
        stderr(&o).contains("status=cpu0=affirming"),
        "{}",
        stderr(&o)
    );

    let cases: Vec<(&str, Mutate, &str)> = vec![
        (
            "alg none",
            |j| header(j, |h| h["alg"] = "none".into()),
            "\"none\" refused",
        ),
        (
            "alg RSA1_5",
            |j| header(j, |h| h["alg"] = "RSA1_5".into()),
            "\"RSA1_5\" refused",
        ),
        (
            "unknown alg",
            |j| header(j, |h| h["alg"] = "ECDH-ES+A999KW".into()),
            "\"ECDH-ES+A999KW\" refused",
        ),
        (
            "unknown enc",
            |j| header(j, |h| h["enc"] = "A128CBC-HS256".into()),
            "\"A128CBC-HS256\" refused",
        ),
        (
            "dir",
            |j| header(j, |h| h["alg"] = "dir".into()),
            "\"dir\" refused",
        ),
        (
            "point not on the curve",
            |j| {
                header(j, |h| {
                    let mut y = base64::engine::general_purpose::URL_SAFE_NO_PAD
                        .decode(h["epk"]["y"].as_str().unwrap())
                        .unwrap();
                    y[31] ^= 1;
                    h["epk"]["y"] = b64u(&y).into();
                })
            },
            "not a point on P-256",
        ),
        (
            "wrong tag",
            |j| {
                let mut t = base64::engine::general_purpose::URL_SAFE_NO_PAD
                    .decode(j["tag"].as_str().unwrap())
                    .unwrap();
                t[15] ^= 0x80;
                j["tag"] = b64u(&t).into();
            },
            "did not authenticate",
        ),
        (
            "a crit header",
            |j| header(j, |h| h["crit"] = serde_json::json!(["x"])),
            "not the flattened JSON form",
        ),
        (
            "an extra member",
            |j| j["header"] = serde_json::json!({}),
            "not the flattened JSON form",
        ),
        (
            "oversized",
            |j| j["pad"] = true.into(),
            "longer than 65536 bytes",
        ),
    ];
    for (what, mutate, expect) in cases {
        let f = fake_kbs(key.clone(), mutate, 200);
        let o = m.verify(&env(&f));
        refused_with(&o, 4, expect, &m.key_hex());
        assert!(
            stderr(&o).contains("answered sealfs/kek/m1 with something refused")
                || what == "oversized",
            "{what}: {}",
            stderr(&o)
        );
    }
    // A resource that is not a key file.
    let f = fake_kbs(b"not a key file\n".to_vec(), |_| {}, 200);
    refused_with(
        &m.verify(&env(&f)),
        4,
        "the resource is not a sealfs key file",
        &m.key_hex(),
    );
    // Another key file: it opens nothing here.
    let other = tempfile::tempdir().unwrap();
    let k2 = other.path().join("k2");
    expect_code(&sealfs(&["keygen", k2.to_str().unwrap()], &[]), 0);
    let f = fake_kbs(std::fs::read(&k2).unwrap(), |_| {}, 200);
    let all = expect_code(&m.verify(&env(&f)), 4);
    assert!(all.contains("no trusted key can open it"), "{all}");
    assert!(!all.contains("ok    "), "{all}");
    // A redirect is not followed.
    let f = fake_kbs(key.clone(), |_| {}, 302);
    refused_with(
        &m.verify(&env(&f)),
        4,
        "redirect not followed",
        &m.key_hex(),
    );
    // A server error is an outage (exit 1), not a refusal.
    let f = fake_kbs(key.clone(), |_| {}, 503);
    refused_with(
        &m.verify(&env(&f)),
        1,
        "unavailable for sealfs/kek/m1",
        &m.key_hex(),
    );
}

/// A proxy between sealfs and the real KBS that rewrites the evidence's report data on its
/// way (what a tampering host could do): the KBS refuses the attestation and sealfs says so.
#[test]
fn tampered_evidence_is_refused_by_the_kbs_and_reported() {
    let kbs = Kbs::start();
    let m = Model::new();
    kbs.upload(RESOURCE, &m.key_file());
    let upstream = kbs.url.trim_start_matches("http://").to_string();
    let proxy = Fake::start(move |r| {
        let mut body = r.body.clone();
        if r.path == "/kbs/v0/attest" {
            let mut v: serde_json::Value = serde_json::from_slice(&body).unwrap();
            v["tee-evidence"]["primary_evidence"]["report_data"] =
                base64::engine::general_purpose::STANDARD
                    .encode([7u8; 48])
                    .into();
            body = v.to_string().into_bytes();
        }
        let mut up = TcpStream::connect(&upstream).unwrap();
        let mut head = String::new();
        for (i, l) in r.head.split("\r\n").enumerate() {
            let lower = l.to_ascii_lowercase();
            if l.is_empty()
                || lower.starts_with("content-length")
                || lower.starts_with("connection")
            {
                continue;
            }
            head.push_str(l);
            head.push_str("\r\n");
            if i == 0 {
                head.push_str("Connection: close\r\n");
            }
        }
        head.push_str(&format!("Content-Length: {}\r\n\r\n", body.len()));
        up.write_all(head.as_bytes()).unwrap();
        up.write_all(&body).unwrap();
        let mut resp = Vec::new();
        up.read_to_end(&mut resp).unwrap();
        let end = resp.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
        let text = String::from_utf8_lossy(&resp[..end]).to_string();
        let status: u16 = text.split(' ').nth(1).unwrap().parse().unwrap();
        let headers = text
            .lines()
            .skip(1)
            .filter(|l| l.to_ascii_lowercase().starts_with("set-cookie"))
            .map(str::to_string)
            .collect();
        (status, headers, resp[end + 4..].to_vec())
    });
    let env = vec![
        s2("SEALFS_KBS_URL", &proxy.url()),
        s2("SEALFS_ATTESTER", "sample"),
    ];
    let o = m.verify(&env);
    refused_with(&o, 4, "attest: HTTP 401: AttestationError", &m.key_hex());
    // Without the tampering, the same path releases (the proxy itself is fine).
    drop(proxy);
    expect_code(&m.verify(&kbs.env()), 0);
}

#[test]
fn the_cdh_path_releases_refuses_and_reports_an_outage() {
    let m = Model::new();
    let key = std::fs::read(m.key_file()).unwrap();
    let serve = |status: u16, body: Vec<u8>| {
        Fake::start(move |r| {
            if r.method == "GET" && r.path == "/cdh/resource/sealfs/kek/m1" {
                (status, vec![], body.clone())
            } else {
                (404, vec![], vec![])
            }
        })
    };
    let env = |f: &Fake| vec![s2("SEALFS_CDH_URL", &f.url())];
    let cdh = serve(200, key.clone());
    let o = m.verify(&env(&cdh));
    expect_code(&o, 0);
    assert!(
        stderr(&o).contains(&format!("broker=cdh:{}", cdh.url())),
        "{}",
        stderr(&o)
    );
    // inspect --key: which slots the released key opens (the key file's), nothing unwrapped.
    let o = sealfs(&["inspect", &m.store(), "--key", KEY_URI], &env(&cdh));
    let out = expect_code(&o, 0);
    let file_id = expect_code(&sealfs(&["inspect", &m.store()], &[]), 0);
    let slot = file_id
        .lines()
        .find(|l| l.trim_start().starts_with("file file:"))
        .unwrap()
        .trim()
        .to_string();
    assert!(
        out.contains(&format!("{slot} (opened by {KEY_URI})")),
        "{out}"
    );
    let o = sealfs(
        &["inspect", &m.store(), "--json", "--key", KEY_URI],
        &env(&cdh),
    );
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(
        v["files"][0]["wrapped_keys"][0]["opened_by"],
        serde_json::json!([KEY_URI])
    );
    let mnt = Mount::start(&m.store(), &["--key", KEY_URI], &env(&cdh));
    assert_eq!(std::fs::read(mnt.path("a.bin")).unwrap(), m.files[0].1);
    drop(mnt);
    // A real CDH answers every failure 500 with the KBS client's error text.
    for text in [
        "get resource failed: KBS attest unauthorized, Error Info: UnAuthorized",
        "get resource failed: KBS resource Not Found (Error 404)",
        "rpc error: PolicyDeny",
    ] {
        refused_with(
            &m.verify(&env(&serve(500, text.as_bytes().to_vec()))),
            4,
            "refused sealfs/kek/m1",
            &m.key_hex(),
        );
    }
    refused_with(
        &m.verify(&env(&serve(403, b"denied".to_vec()))),
        4,
        "refused sealfs/kek/m1",
        &m.key_hex(),
    );
    // Outages whose text only looks like a refusal: never a revocation.
    for text in [
        "connect: connection refused",
        "get resource failed: connect AA: Permission denied (os error 13)",
        "get resource failed: dns error: host not found",
    ] {
        refused_with(
            &m.verify(&env(&serve(500, text.as_bytes().to_vec()))),
            1,
            "unavailable",
            &m.key_hex(),
        );
    }
    refused_with(
        &m.verify(&env(&serve(200, vec![b'a'; 1000]))),
        4,
        "longer than 256 bytes",
        &m.key_hex(),
    );
    // Both set, or neither: one line, before any call.
    let both = vec![
        s2("SEALFS_CDH_URL", &cdh.url()),
        s2("SEALFS_KBS_URL", &cdh.url()),
    ];
    refused_with(&m.verify(&both), 1, "both set", &m.key_hex());
    refused_with(&m.verify(&[]), 1, "SEALFS_KBS_URL", &m.key_hex());
    // Plain http beyond loopback is refused.
    let far = vec![s2("SEALFS_CDH_URL", "http://192.0.2.1:8006")];
    refused_with(
        &m.verify(&far),
        1,
        "plain http only to a loopback address",
        &m.key_hex(),
    );
}

#[test]
fn an_attestation_log_that_is_not_a_private_directory_is_refused_before_any_call() {
    use std::os::unix::fs::PermissionsExt;
    let m = Model::new();
    let d = tempfile::tempdir().unwrap();
    let open_dir = d.path().join("open");
    std::fs::create_dir(&open_dir).unwrap();
    std::fs::set_permissions(&open_dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    let private = d.path().join("private");
    std::fs::create_dir(&private).unwrap();
    std::fs::set_permissions(&private, std::fs::Permissions::from_mode(0o700)).unwrap();
    let link = d.path().join("link");
    std::os::unix::fs::symlink(&private, &link).unwrap();
    let file = d.path().join("file");
    std::fs::write(&file, b"x").unwrap();
    let with_slash = format!("{}/", private.display());
    // No broker is reachable: a refusal here happens before any call.
    let env = vec![
        s2("SEALFS_KBS_URL", "http://127.0.0.1:1"),
        s2("SEALFS_ATTESTER", "sample"),
    ];
    for (dir, why) in [
        (
            open_dir.to_str().unwrap(),
            "mode 0755 gives group or others access",
        ),
        (link.to_str().unwrap(), "a symbolic link"),
        (file.to_str().unwrap(), "not a directory"),
        (with_slash.as_str(), "without a trailing /"),
    ] {
        let o = sealfs(
            &[
                "--attestation-log",
                dir,
                "verify",
                &m.store(),
                "--key",
                KEY_URI,
            ],
            &env,
        );
        refused_with(&o, 2, why, &m.key_hex());
        assert!(!stderr(&o).contains("unavailable"), "{}", stderr(&o));
    }
}

/// A TLS front for a fake: rustls's server with `cert`/`key`, each connection's request
/// passed to `upstream` (plain HTTP on loopback) and the answer passed back.
fn tls_front(cert: &Path, key: &Path, upstream: u16) -> (u16, Arc<AtomicBool>) {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    let key = PrivateKeyDer::from_pem_file(key).unwrap();
    let config = Arc::new(
        rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::aws_lc_rs::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .unwrap(),
    );
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let port = listener.local_addr().unwrap().port();
    let stop = Arc::new(AtomicBool::new(false));
    let s = stop.clone();
    std::thread::spawn(move || {
        while !s.load(Ordering::Relaxed) {
            let Ok((c, _)) = listener.accept() else {
                std::thread::sleep(Duration::from_millis(10));
                continue;
            };
            let config = config.clone();
            std::thread::spawn(move || {
                c.set_nonblocking(false).unwrap();
                c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
                let conn = rustls::ServerConnection::new(config).unwrap();
                let mut tls = rustls::StreamOwned::new(conn, c);
                // The request head and body, as the client sends them (one per connection).
                let mut buf = Vec::new();
                let mut b = [0u8; 4096];
                loop {
                    match tls.read(&mut b) {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&b[..n]),
                    }
                    if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                        let head = String::from_utf8_lossy(&buf[..i]).to_ascii_lowercase();
                        let len = head
                            .lines()
                            .find_map(|l| l.strip_prefix("content-length:"))
                            .and_then(|v| v.trim().parse::<usize>().ok())
                            .unwrap_or(0);
                        if buf.len() >= i + 4 + len {
                            break;
                        }
                    }
                }
                let mut up = TcpStream::connect(("127.0.0.1", upstream)).unwrap();
                up.write_all(&buf).unwrap();
                let mut resp = Vec::new();
                let _ = up.read_to_end(&mut resp);
                let _ = tls.write_all(&resp);
                tls.conn.send_close_notify();
                let _ = tls.flush();
            });
        }
    });
    (port, stop)
}

/// `https://` to the KBS with its CA given by SEALFS_KBS_CACERT; without it (system roots)
/// or with another CA, the certificate is refused and nothing is released.
#[test]
fn a_kbs_over_tls_is_trusted_only_through_its_ca() {
    let m = Model::new();
    let d = tempfile::tempdir().unwrap();
    // A CA and a server certificate it signs (for 127.0.0.1), as a KBS deployment has.
    let openssl = |args: &[&str]| {
        let o = Command::new("openssl")
            .args(args)
            .current_dir(d.path())
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    };
    let ca = |name: &str| {
        openssl(&[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            &format!("{name}.key"),
            "-out",
            &format!("{name}.pem"),
            "-days",
            "1",
            "-subj",
            &format!("/CN={name}"),
        ]);
        d.path().join(format!("{name}.pem"))
    };
    let cert_ca = ca("kbs-ca");
    let other = ca("other-ca");
    openssl(&[
        "req",
        "-new",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
        "-keyout",
        "kbs.key",
        "-out",
        "kbs.csr",
        "-subj",
        "/CN=127.0.0.1",
    ]);
    std::fs::write(d.path().join("san.ext"), "subjectAltName=IP:127.0.0.1\n").unwrap();
    openssl(&[
        "x509",
        "-req",
        "-in",
        "kbs.csr",
        "-CA",
        "kbs-ca.pem",
        "-CAkey",
        "kbs-ca.key",
        "-CAcreateserial",
        "-out",
        "kbs.pem",
        "-days",
        "1",
        "-extfile",
        "san.ext",
    ]);
    let (cert, key) = (d.path().join("kbs.pem"), d.path().join("kbs.key"));
    let fake = fake_kbs(std::fs::read(m.key_file()).unwrap(), |_| {}, 200);
    let (port, stop) = tls_front(&cert, &key, fake.port);
    let url = format!("https://127.0.0.1:{port}");
    let env = |ca: Option<&Path>| {
        let mut e = vec![s2("SEALFS_KBS_URL", &url), s2("SEALFS_ATTESTER", "sample")];
        if let Some(ca) = ca {
            e.push(s2("SEALFS_KBS_CACERT", ca.to_str().unwrap()));
        }
        e
    };
    let o = m.verify(&env(Some(&cert_ca)));
    let all = expect_code(&o, 0);
    assert!(all.contains(&format!("broker={url}")), "{all}");
    for ca in [None, Some(other.as_path())] {
        let o = m.verify(&env(ca));
        let all = expect_code(&o, 1);
        assert!(all.to_lowercase().contains("certificate"), "{all}");
        assert!(!stdout(&o).contains("ok    "), "{all}");
    }
    stop.store(true, Ordering::Relaxed);
}

/// A KBS that accepts the connection and never answers: an outage (exit 1) named as a
/// timeout, within the call timeout (15 s) and a margin, never a hang and never a refusal.
#[test]
fn a_kbs_that_never_answers_is_an_outage_within_the_call_timeout() {
    let m = Model::new();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let stop = Arc::new(AtomicBool::new(false));
    let held = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            listener.set_nonblocking(true).unwrap();
            let mut conns = Vec::new(); // read nothing, answer nothing, close nothing
            while !stop.load(Ordering::SeqCst) {
                if let Ok((c, _)) = listener.accept() {
                    conns.push(c);
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            conns.len()
        })
    };
    let env = vec![
        s2("SEALFS_KBS_URL", &format!("http://127.0.0.1:{port}")),
        s2("SEALFS_ATTESTER", "sample"),
    ];
    let t = Instant::now();
    let o = m.verify(&env);
    let took = t.elapsed();
    stop.store(true, Ordering::SeqCst);
    let conns = held.join().unwrap();
    refused_with(&o, 1, "no answer in 15s", &m.key_hex());
    assert!(conns >= 1, "sealfs never connected");
    assert!(
        took >= Duration::from_secs(14) && took < Duration::from_secs(45),
        "ended after {took:?}"
    );
}

/// The token is reused only while it is good for longer than the reuse margin (15 s): one
/// that expires sooner is not reused, so the second `kbs:` key of a command attests again.
#[test]
fn a_token_near_its_expiry_is_not_reused() {
    use Ordering::SeqCst;
    let m = Model::new();
    let key = std::fs::read(m.key_file()).unwrap();
    let soon = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 10;
    let state: Arc<FakeState> = Arc::default();
    let f = fake_kbs_with(key, |_| {}, 200, Some(soon), state.clone());
    let env = vec![
        s2("SEALFS_KBS_URL", &f.url()),
        s2("SEALFS_ATTESTER", "sample"),
    ];
    let o = m.verify_two_keys(&env);
    expect_code(&o, 0);
    assert_eq!(
        state.auths.load(SeqCst),
        2,
        "a token 10 s from its exp was reused"
    );
    assert_eq!(state.resources.load(SeqCst), 2, "one release per key");
}
