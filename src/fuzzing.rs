//! Fixtures of the cargo-fuzz targets (`fuzz/fuzz_targets`); not an API, nothing else calls
//! it. Each target feeds hostile bytes to a real parser through the crate's public API; what
//! that parser needs around it is made here, once per process: a scratch directory, a
//! runtime, keys, a [`SealFs`] behind its control socket, a loopback Transit server, a
//! model and a trusted signer. Every key is made here: bytes from the fuzzer reach
//! only the parsers.

use std::ffi::OsString;
use std::io::{Read, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};

use base64::Engine;

use crate::crypto::Dek;
use crate::format::EncryptionContext;
use crate::fs::{MountConfig, SealFs};
use crate::keys::shares::Threshold;
use crate::keys::transit::TransitKey;
use crate::keys::{KeySpec, Keyring};
use crate::manifest::{ModelError, SignatureObject};
use crate::sign::{oms, Signer, SignerSpec, TrustedSigners};
use crate::store::{local::LocalStore, Store};

static SCRATCH: OnceLock<PathBuf> = OnceLock::new();

/// This process's scratch directory (mode 0700 in the temp directory), removed at exit.
fn scratch() -> &'static Path {
    SCRATCH.get_or_init(|| {
        extern "C" fn remove() {
            if let Some(d) = SCRATCH.get() {
                let _ = std::fs::remove_dir_all(d);
            }
        }
        let d = std::env::temp_dir().join(format!("sealfs-fuzz-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        mkdir(&d);
        // SAFETY: registers a function that only removes a directory (libFuzzer ends the
        // process with exit()).
        #[allow(unsafe_code)]
        unsafe {
            libc::atexit(remove);
        }
        d
    })
}

fn mkdir(d: &Path) {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(d)
        .unwrap_or_else(|e| panic!("{}: {e}", d.display()));
}

/// Writes `bytes` to `path`, created with mode 0600 (as key and share files are).
fn write_private(path: &Path, bytes: &[u8]) {
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .and_then(|mut f| f.write_all(bytes))
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
}

fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a tokio runtime")
    })
}

fn context() -> EncryptionContext {
    [("sealfs:path", "models/m.safetensors"), ("team", "fuzz")]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// Serializes as the crate does (serde_json), for round-trip checks.
pub fn to_json<T: serde::Serialize>(v: &T) -> Vec<u8> {
    serde_json::to_vec(v).expect("serializes")
}

// ---- mount options --------------------------------------------------------------------

fn cli() -> &'static clap::Command {
    crate::cli::command()
}

/// A command line through [`crate::cli::mount_opts::rewrite`] (fstab `-o` lists, the
/// mount-helper form), then, when it is accepted, through clap and every value parser.
pub struct MountArgs {
    pub rewritten: Result<Vec<OsString>, String>,
    /// clap's verdict on the rewritten line (`None`: the rewrite refused it).
    pub parsed: Option<Result<(), String>>,
}

pub fn mount_rewrite(args: Vec<OsString>) -> Result<Vec<OsString>, String> {
    crate::cli::mount_opts::rewrite(args, cli())
}

pub fn mount_args(args: Vec<OsString>) -> MountArgs {
    use clap::FromArgMatches;
    let rewritten = mount_rewrite(args);
    let parsed = rewritten.as_ref().ok().map(|a| {
        cli()
            .clone()
            .try_get_matches_from(a.clone())
            .and_then(|mut m| crate::cli::Cli::from_arg_matches_mut(&mut m))
            .map(drop)
            .map_err(|e| e.to_string())
    });
    MountArgs { rewritten, parsed }
}

// ---- share files ----------------------------------------------------------------------

/// The `check=` line keygen writes under a share file's `body` (every line above it):
/// SHA-256("sealfs v1 share check" || body), 16 bytes, as `keys/shares.rs` computes it. With
/// it a target alters a share *and* recomputes its check, the attack the key check stops.
pub fn share_check_line(body: &[u8]) -> Vec<u8> {
    let d = crate::crypto::sha256(&[b"sealfs v1 share check".as_slice(), body].concat());
    format!("check={}\n", hex::encode(&d[..16])).into_bytes()
}

/// [`crate::keys::shares::load`] over share files holding `files` (written mode 0600, as
/// keygen writes them): the combined key's slot id, or the error line.
pub fn shares_load(files: &[&[u8]]) -> Result<String, String> {
    let dir = scratch().join("shares");
    mkdir(&dir);
    let paths: Vec<PathBuf> = files
        .iter()
        .enumerate()
        .map(|(i, bytes)| {
            let p = dir.join(format!("share-{i}"));
            write_private(&p, bytes);
            p
        })
        .collect();
    crate::keys::shares::load(&paths)
        .map(|k| k.id().to_string())
        .map_err(|e| e.to_string())
}

// ---- Transit answers ------------------------------------------------------------------

/// Statuses a fuzzed answer comes with (`transit_answer`'s `status` picks one); 1xx, 204 and
/// 304 carry no body.
pub const TRANSIT_STATUSES: [u16; 12] =
    [200, 200, 200, 200, 400, 401, 403, 404, 412, 429, 500, 503];
/// A well-formed slot (`vault:v<N>:<base64>`).
pub const TRANSIT_SLOT: &[u8] = b"vault:v1:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA";

const SERVER_THREAD: &str = "fuzz-transit";

static ANSWER: Mutex<(u16, Vec<u8>)> = Mutex::new((200, Vec::new()));
static TRANSIT_CALLS: AtomicU64 = AtomicU64::new(0);

fn set_answer(status: u16, body: &[u8]) {
    *ANSWER.lock().unwrap_or_else(|p| p.into_inner()) = (status, body.to_vec());
}

/// One keep-alive HTTP/1.1 connection of the loopback server: every request is answered
/// with [`ANSWER`].
fn serve_http(mut s: std::net::TcpStream) {
    let mut buf = Vec::new();
    let mut tmp = vec![0u8; 16 << 10];
    // libFuzzer's SIGALRM (every `-timeout`/2 + 1 s, no SA_RESTART) interrupts this read:
    // an EINTR that closed the connection failed the next call with no request (CI, 2026-12-06).
    let mut fill = |s: &mut std::net::TcpStream, buf: &mut Vec<u8>| loop {
        match s.read(&mut tmp) {
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Ok(0) | Err(_) => return false,
            Ok(n) => {
                buf.extend_from_slice(&tmp[..n]);
                return true;
            }
        }
    };
    loop {
        let head = loop {
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            if !fill(&mut s, &mut buf) {
                return;
            }
        };
        let len = String::from_utf8_lossy(&buf[..head])
            .to_ascii_lowercase()
            .lines()
            .find_map(|l| l.strip_prefix("content-length:")?.trim().parse().ok())
            .unwrap_or(0usize);
        while buf.len() < head + len {
            if !fill(&mut s, &mut buf) {
                return;
            }
        }
        buf.drain(..head + len);
        TRANSIT_CALLS.fetch_add(1, Ordering::SeqCst);
        let (status, body) = ANSWER.lock().unwrap_or_else(|p| p.into_inner()).clone();
        // One write: a second small one would wait for the client's delayed ACK (Nagle).
        let mut answer = format!(
            "HTTP/1.1 {status} Fuzz\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
            body.len()
        )
        .into_bytes();
        answer.extend_from_slice(&body);
        if s.write_all(&answer).is_err() {
            return;
        }
    }
}

struct TransitFixture {
    /// A derived key (the binding with native rewrap).
    key: TransitKey,
    /// Numbers the key names `resolve` reads, so that each is read from an answer.
    names: AtomicU64,
}

fn transit_fixture() -> &'static TransitFixture {
    static F: OnceLock<TransitFixture> = OnceLock::new();
    F.get_or_init(|| {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("a loopback port");
        let port = l.local_addr().expect("its address").port();
        std::thread::spawn(move || {
            for s in l.incoming().flatten() {
                let _ = s.set_nodelay(true);
                // Named so that a test can signal these threads alone.
                let _ = std::thread::Builder::new()
                    .name(SERVER_THREAD.into())
                    .spawn(move || serve_http(s));
            }
        });
        for p in ["BAO", "VAULT"] {
            for v in [
                "ADDR",
                "TOKEN",
                "TOKEN_FILE",
                "NAMESPACE",
                "CACERT",
                "CAPATH",
                "CLIENT_CERT",
                "CLIENT_KEY",
                "SKIP_VERIFY",
            ] {
                std::env::remove_var(format!("{p}_{v}"));
            }
        }
        std::env::set_var("BAO_ADDR", format!("http://127.0.0.1:{port}"));
        std::env::set_var("BAO_TOKEN", "fuzz-token");
        set_answer(
            200,
            br#"{"data":{"type":"aes256-gcm96","derived":true,"supports_encryption":true,"supports_decryption":true}}"#,
        );
        let transit = crate::keys::transit::shared().expect("a Transit client");
        let key = runtime()
            .block_on(TransitKey::resolve(transit, "transit", "fz-k.1"))
            .expect("the fixture's Transit key");
        TransitFixture {
            key,
            names: AtomicU64::new(0),
        }
    })
}

/// What a Transit call made of one answer.
pub struct TransitOutcome {
    /// The answer's status.
    pub status: u16,
    /// Requests the server got during the call.
    pub calls: u64,
    /// The wrapped DEK the call returned (datakey, encrypt, rewrap), or its error line.
    pub result: Result<Option<Vec<u8>>, String>,
}

/// One Transit call (`op % 6`: 0 read a key's metadata, 1 datakey, 2 encrypt, 3 decrypt,
/// 4 rewrap: the server answers `body` with status `TRANSIT_STATUSES[status % 12]`; 5 decrypt
/// of the slot `body`, answered with a good DEK).
pub fn transit_answer(op: u8, status: u8, body: &[u8]) -> TransitOutcome {
    let f = transit_fixture();
    let rt = runtime();
    let ctx = context();
    let mut status = TRANSIT_STATUSES[usize::from(status) % TRANSIT_STATUSES.len()];
    if op % 6 == 5 {
        status = 200;
        let dek = base64::engine::general_purpose::STANDARD.encode([0x42u8; 32]);
        set_answer(
            200,
            format!(r#"{{"data":{{"plaintext":"{dek}"}}}}"#).as_bytes(),
        );
    } else {
        set_answer(status, body);
    }
    let before = TRANSIT_CALLS.load(Ordering::SeqCst);
    let result = match op % 6 {
        0 => {
            let name = format!("fz-r.{}", f.names.fetch_add(1, Ordering::Relaxed));
            let transit = crate::keys::transit::shared().expect("a Transit client");
            rt.block_on(TransitKey::resolve(transit, "transit", &name))
                .map(|_| None)
        }
        1 => rt
            .block_on(f.key.generate_data_key(&ctx))
            .map(|(_, w)| Some(w)),
        2 => {
            let dek = Dek::from_slice_zeroizing(&mut [0x42; 32]).expect("locked memory");
            rt.block_on(f.key.encrypt(&dek, &ctx)).map(Some)
        }
        3 => rt.block_on(f.key.decrypt(TRANSIT_SLOT, &ctx)).map(|_| None),
        4 => rt.block_on(f.key.rewrap(TRANSIT_SLOT, &ctx)).map(Some),
        _ => rt.block_on(f.key.decrypt(body, &ctx)).map(|_| None),
    };
    TransitOutcome {
        status,
        calls: TRANSIT_CALLS.load(Ordering::SeqCst) - before,
        result: result.map_err(|e| e.to_string()),
    }
}

/// `data.plaintext` of a JSON answer, when it is a string (a DEK, in base64).
pub fn answer_plaintext(body: &[u8]) -> Option<String> {
    let v: serde_json::Value = serde_json::from_slice(body).ok()?;
    v.get("data")?
        .get("plaintext")?
        .as_str()
        .map(str::to_string)
}

// ---- control socket -------------------------------------------------------------------

/// The key file of the v1 test vectors (`tests/vectors/v1/kek`): a slot id the corpus can
/// name.
const VECTOR_KEK: &str =
    "sealfs-kek-v1:8197e1c42865f9c4ca91bf5ae056186bb076f14aece4c27cbc452b647e004c0c\n";

struct ControlFixture {
    socket: PathBuf,
    key_ids: Vec<String>,
}

fn control_fixture() -> &'static ControlFixture {
    static F: OnceLock<ControlFixture> = OnceLock::new();
    F.get_or_init(|| {
        // SAFETY: ignoring SIGPIPE (libFuzzer's main leaves it at its default, which would
        // end the process when the daemon hangs up on a long request).
        #[allow(unsafe_code)]
        unsafe {
            libc::signal(libc::SIGPIPE, libc::SIG_IGN);
        }
        let dir = scratch().join("control");
        let store = dir.join("store");
        mkdir(&store);
        let kek = dir.join("kek");
        write_private(&kek, VECTOR_KEK.as_bytes());
        let shares = crate::keys::shares::keygen(Threshold { k: 2, n: 3 }, &dir.join("shares"))
            .expect("a share ceremony");
        let socket = dir.join("control.sock");
        let key_ids = runtime().block_on(async {
            let ring = Keyring::resolve(&[
                KeySpec::File(kek.clone()),
                KeySpec::Shares(shares.files[..2].to_vec()),
            ])
            .await
            .expect("the fixture's keys");
            let ids = ring.ids();
            let config = MountConfig {
                cache_size: 4 * 16400,
                max_chunk_log2: 14,
                ..Default::default()
            };
            let fs = SealFs::new(Store::Local(LocalStore::new(&store)), "", ring, config)
                .await
                .expect("a SealFs over an empty store");
            let l = std::os::unix::net::UnixListener::bind(&socket).expect("the control socket");
            l.set_nonblocking(true).expect("a non-blocking socket");
            let l = tokio::net::UnixListener::from_std(l).expect("a tokio listener");
            tokio::spawn(crate::fuse::control::serve(l, fs));
            ids
        });
        let _ = std::fs::remove_file(&kek);
        let _ = std::fs::remove_dir_all(dir.join("shares"));
        ControlFixture { socket, key_ids }
    })
}

/// The slot ids of the keys the fixture's mount was given (`revoke key ID` names them).
pub fn control_key_ids() -> &'static [String] {
    &control_fixture().key_ids
}

/// Sends `request` on a connection to [`crate::fuse::control::serve`] (a mount of an empty
/// store, given a key file and a 2-of-3 share set), then half-closes it; returns everything
/// the daemon answered.
pub fn control_request(request: &[u8]) -> Vec<u8> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let f = control_fixture();
    runtime().block_on(async {
        let mut s = tokio::net::UnixStream::connect(&f.socket)
            .await
            .expect("the control socket answers");
        // The daemon reads one bounded line and may hang up before the rest is sent.
        let _ = s.write_all(request).await;
        let _ = s.shutdown().await;
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out).await;
        out
    })
}

// ---- signatures -----------------------------------------------------------------------

/// Files of the fixture's model (relative name, contents); `.gitignore` is one that
/// `model_signing` leaves out.
const MODEL_FILES: [(&str, &[u8]); 3] = [
    ("config.json", br#"{"hidden_size":8}"#),
    ("weights/part-1.bin", b"\x00\x01\x02\x03weights"),
    (".gitignore", b"*.tmp\n"),
];

struct SignFixture {
    signer: Signer,
    trusted: TrustedSigners,
    /// The directory whose `model.sig` is read.
    model: PathBuf,
    /// Each model file's relative name and SHA-256, as a seal gate hands them over.
    files: Vec<(String, [u8; 32])>,
}

fn sign_fixture() -> &'static SignFixture {
    static F: OnceLock<SignFixture> = OnceLock::new();
    F.get_or_init(|| {
        let dir = scratch().join("sign");
        let model = dir.join("model");
        mkdir(&model);
        let key = dir.join("signing.pem");
        crate::sign::keygen(&key).expect("a signing key");
        let public = PathBuf::from(format!("{}.pub", key.display()));
        let (signer, trusted) = runtime().block_on(async {
            let s = Signer::resolve(&SignerSpec::File(key.clone())).await;
            let t = TrustedSigners::resolve(&[SignerSpec::File(public.clone())]).await;
            (s.expect("the signer"), t.expect("its public key"))
        });
        let _ = std::fs::remove_file(&key);
        let files = MODEL_FILES
            .iter()
            .map(|(rel, bytes)| (rel.to_string(), crate::crypto::sha256(bytes)))
            .collect();
        SignFixture {
            signer,
            trusted,
            model,
            files,
        }
    })
}

/// The fixture's trusted signer: a key made in this process, which signs nothing but what
/// [`oms_statement`] is given.
pub fn trusted_signers() -> &'static TrustedSigners {
    &sign_fixture().trusted
}

/// [`SignatureObject::check`] against [`trusted_signers`], for the manifest whose digest
/// the object names (all zeros when it names none).
pub fn signature_check(s: &SignatureObject, root: &str) -> Result<String, ModelError> {
    let mut digest = [0u8; 32];
    let _ = hex::decode_to_slice(&s.manifest_sha256, &mut digest);
    s.check(trusted_signers(), &digest, root)
}

/// A source directory's `model.sig` holding `bundle`, through [`oms::Statement::verify`]
/// (against [`trusted_signers`]) and, when it verifies, [`oms::Statement::check`] of the
/// fixture's model files.
pub fn oms_bundle(bundle: &[u8]) -> Result<(), String> {
    let f = sign_fixture();
    std::fs::write(f.model.join(oms::SIGNATURE_FILE), bundle).expect("model.sig");
    oms::Statement::verify(&f.model, &f.trusted)
        .and_then(|st| st.check(&f.files))
        .map_err(|e| e.to_string())
}

/// [`oms_bundle`] of a bundle the trusted signer made over `statement` (so that the
/// statement's own parsing is reached).
pub fn oms_statement(statement: &[u8]) -> Result<(), String> {
    let f = sign_fixture();
    let bundle = runtime()
        .block_on(oms::bundle(&f.signer, statement))
        .expect("a signed bundle");
    oms_bundle(&bundle)
}

/// The statement `model_signing` would sign over the fixture's model (a corpus seed).
pub fn oms_model_statement() -> Vec<u8> {
    let files: Vec<(String, [u8; 32])> = sign_fixture()
        .files
        .iter()
        .filter(|(rel, _)| !rel.starts_with('.'))
        .cloned()
        .collect();
    oms::statement("model", &files)
}

/// A state a predecessor daemon left (fuse/handover.rs): parsed, then restored as a tree
/// (64 KiB chunks), as a successor does. `Ok` with the restored tree's node count.
pub fn handover_state(bytes: &[u8]) -> Result<usize, String> {
    let st = crate::fuse::handover::parse_state(bytes)?;
    let tree = crate::fs::inode::Tree::restore(st.tree, 16)?;
    Ok(tree.len())
}

/// A state as a daemon writes it, for the fuzzer's seed: a tree of two files in a model
/// directory.
pub fn handover_state_seed() -> Vec<u8> {
    let info = |key: &str, size: u64| crate::store::ObjectInfo {
        key: key.into(),
        size,
        etag: format!("\"{size:x}\""),
        modified: None,
    };
    let entry = |name: &str| crate::object::SealedEntry {
        data: info(name, 200_000),
        key_object: info(&format!("{name}.sealfs-key"), 300),
        chunk_log2: 16,
        logical: name.into(),
        generation: 0,
    };
    let listing = crate::object::Listing {
        sealed: vec![entry("m/model.safetensors"), entry("m/config.json")],
        ..Default::default()
    };
    let tree = crate::fs::inode::Tree::build(listing, "", 16).snapshot();
    let st = crate::fuse::handover::State {
        seq: 1,
        uri: "file:///m".into(),
        generation: 0,
        tree,
    };
    let mut out = b"sealfs-state v1\n".to_vec();
    out.extend(serde_json::to_vec(&st).expect("a state serializes"));
    out
}

/// SEV-SNP evidence from configfs-tsm's hostile bytes (keys/snp.rs): all of `data` read as
/// a certificate table, then `data` split into a report (its first 1184 bytes) and an
/// `auxblob` (the rest), checked and turned into evidence as the attester does. `Ok` with
/// the evidence JSON's length.
pub fn snp_evidence(data: &[u8]) -> Result<usize, String> {
    use crate::keys::snp;
    if let Err(e) = snp::cert_table(data) {
        assert!(!e.contains('\n'), "{e}");
    }
    let (report, aux) = data.split_at(data.len().min(snp::REPORT_LEN));
    snp::report_data(report)?;
    Ok(snp::evidence(report, Some(aux))?.to_string().len())
}

#[cfg(test)]
mod tests {
    extern "C" fn ignore(_: libc::c_int) {}

    /// libFuzzer's SIGALRM lands on any thread, without SA_RESTART: the loopback server's
    /// read must go on after it, or the next call fails with no request (the CI failure of
    /// 2026-12-06: "connection closed before message completed", `calls` 0).
    #[test]
    fn a_signal_on_the_server_thread_does_not_cost_a_call() {
        use nix::sys::signal::{sigaction, SaFlags, SigAction, SigHandler, SigSet, Signal};
        let act = SigAction::new(
            SigHandler::Handler(ignore),
            SaFlags::empty(),
            SigSet::empty(),
        );
        // SAFETY: the handler does nothing; SIGALRM is used by nothing else in this binary.
        unsafe { sigaction(Signal::SIGALRM, &act) }.expect("a SIGALRM handler");
        let pid = std::process::id() as libc::pid_t;
        for round in 0..20 {
            let out = super::transit_answer(3, 4, br#"{"errors":["no"]}"#);
            assert_eq!(
                (out.calls, out.status),
                (1, 400),
                "round {round}: {:?}",
                out.result
            );
            let mut signalled = 0;
            for t in std::fs::read_dir("/proc/self/task").expect("/proc/self/task") {
                let t = t.expect("a task").path();
                let comm = std::fs::read_to_string(t.join("comm")).unwrap_or_default();
                if comm.trim_end() == super::SERVER_THREAD {
                    let tid: libc::pid_t = t
                        .file_name()
                        .and_then(|n| n.to_str()?.parse().ok())
                        .expect("a tid");
                    // SAFETY: tgkill with this process's pid and one of its thread ids.
                    unsafe { libc::syscall(libc::SYS_tgkill, pid, tid, libc::SIGALRM) };
                    signalled += 1;
                }
            }
            assert!(
                signalled >= 1,
                "no {} thread to signal",
                super::SERVER_THREAD
            );
        }
    }
}
