//! `pkcs11:` keys held in an HSM or any PKCS#11 token (RFC 7512 URIs), through `cryptoki`.
//!
//! The token object the URI names decides the slot:
//! - an **AES-256 secret key**: the DEK is encrypted and decrypted *inside* the token with
//!   `CKM_AES_GCM` (random 96-bit IV, 128-bit tag), AAD = `"sealfs v1 pkcs11 wrap"` and the
//!   file's canonical encryption context. GCM rather than AES key wrap with padding (RFC
//!   5649): KWP takes no associated data, so a wrapped DEK could not be bound to its file,
//!   and `C_UnwrapKey` would leave the DEK as a token object that must be made extractable
//!   to be read back. Wrapped: `01 || IV (12) || encrypted DEK (32) || tag (16)`.
//! - an **RSA key pair**: `CKM_RSA_PKCS_OAEP`. Used only logged in, and only when the public
//!   key object's modulus is the private key's: a public object is not a trust anchor (anyone
//!   who reaches the token may replace it without the PIN). A public-key KEK proves nothing
//!   about who sealed a file (anyone with the public key can make a slot), so reading under
//!   one needs `--trust-signer` or `--model-digest` ([`super::Keyring::origin_unproven`]).
//!   Wrapped: `02 || ciphertext` with SHA-256, MGF1-SHA-256 and label =
//!   SHA-256 of the same AAD (the context bound, as for AES); a token that refuses those
//!   parameters (SoftHSM 2.6 accepts only SHA-1 and no label) gets `03 || ciphertext` with
//!   SHA-1, MGF1-SHA-1 and no label, which still hides the DEK (OAEP's security does not
//!   rest on SHA-1's collision resistance) but binds no context: the header MAC still
//!   commits the file to its DEK.
//! - an **EC P-256 key pair**: a publisher signing key (`--sign` / `--trust-signer`, see
//!   `sign/`); its private key signs inside the token, and its public key object is trusted
//!   only after it verified a signature the private key made over a fresh challenge.
//!
//! One session per token per process, logged in once with the PIN from `pin-source`, and
//! reopened once after a session or device error. Every call runs on the blocking pool under
//! [`CALL_TIMEOUT`], so a token that hangs costs the caller a bounded wait, never a hang.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::error::{Error as CkError, RvError};
use cryptoki::mechanism::aead::GcmParams;
use cryptoki::mechanism::rsa::{PkcsMgfType, PkcsOaepParams, PkcsOaepSource};
use cryptoki::mechanism::{Mechanism, MechanismType};
use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::{Session, UserType};
use cryptoki::types::AuthPin;
use zeroize::Zeroizing;

use super::KeyError;
use crate::crypto::{random_bytes, secret::DEK_LEN, Dek};
use crate::format::header::encode_context;
use crate::format::naming::printable;
use crate::format::EncryptionContext;

/// The longest a single token call may take before the caller gets an error.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(10);
const WRAP_AAD: &[u8] = b"sealfs v1 pkcs11 wrap";
const TAG_GCM: u8 = 1;
const TAG_OAEP: u8 = 2;
const TAG_OAEP_SHA1: u8 = 3;
const GCM_WRAPPED: usize = 1 + 12 + DEK_LEN + 16;
/// Longest PIN file read; PKCS#11 PINs are short.
pub const MAX_PIN: usize = 256;

/// Where the user PIN comes from: `pin-source=file:/ABS/PATH` (a 0600 file of this host), or
/// `pin-source=secret:pkcs11Pin` (a CSI volume's Secret, handed to this process in its
/// sealed secrets memfd: csi/secrets.rs).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum PinSource {
    File(PathBuf),
    Secret,
}

/// The `pin-source=` value of a volume's PIN.
pub const SECRET_PIN: &str = "secret:pkcs11Pin";

/// The PIN a CSI volume's Secret gave (`pkcs11Pin`); this process only.
static SECRET_PIN_VALUE: Mutex<Option<Zeroizing<String>>> = Mutex::new(None);

/// Keeps the volume's PIN for `pin-source=secret:pkcs11Pin` (csi/secrets.rs).
pub fn keep_secret_pin(pin: Zeroizing<String>) {
    *SECRET_PIN_VALUE.lock().unwrap_or_else(|p| p.into_inner()) = Some(pin);
}

impl std::fmt::Display for PinSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PinSource::File(p) => write!(f, "the PIN file {}", p.display()),
            PinSource::Secret => f.write_str("the volume's pkcs11Pin secret"),
        }
    }
}

/// A parsed RFC 7512 URI. Path attributes name the token and the object; query attributes
/// say where the module and the PIN are (host-local, so not part of the key's identity).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pkcs11Uri {
    pub token: Option<String>,
    pub serial: Option<String>,
    pub slot_id: Option<u64>,
    pub object: Option<String>,
    pub id: Option<Vec<u8>>,
    pub module_path: PathBuf,
    pub pin_source: Option<PinSource>,
    /// `type=`: which kind of object the URI names (`None`: whichever the token holds,
    /// refused when the label names both a secret key and a key pair).
    pub object_type: Option<ObjectType>,
}

/// An RFC 7512 `type=` a KEK may have.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ObjectType {
    /// `secret-key`: an AES key.
    SecretKey,
    /// `private` or `public`: a key pair (both halves are used either way).
    Pair,
}

fn bad(uri: &str, reason: impl Into<String>) -> KeyError {
    KeyError::Pkcs11Uri {
        uri: redacted(uri),
        reason: reason.into(),
    }
}

/// A URI as error lines show it: the attribute names only, never a value (a PIN typed into
/// any part of it must not reach a terminal or a log).
fn redacted(uri: &str) -> String {
    let Some(rest) = uri.strip_prefix("pkcs11:") else {
        return "(not a pkcs11: URI)".into();
    };
    format!("pkcs11:{}", attribute_names(rest))
}

/// `path?query` of a URI with its attribute values replaced by `…` (names kept, escaped).
pub(crate) fn attribute_names(rest: &str) -> String {
    let (path, query) = rest.split_once('?').unwrap_or((rest, ""));
    let names = |part: &str, sep: char| {
        part.split(sep)
            .filter(|a| !a.is_empty())
            .map(|a| match a.split_once('=') {
                Some((k, _)) => format!("{}=…", printable(k, 32)),
                None => "…".into(),
            })
            .collect::<Vec<_>>()
    };
    let mut out = names(path, ';').join(";");
    if !query.is_empty() {
        out += &format!("?{}", names(query, '&').join("&"));
    }
    out
}

impl std::str::FromStr for Pkcs11Uri {
    type Err = KeyError;

    fn from_str(s: &str) -> Result<Self, KeyError> {
        // Wherever it is (query, path, inside another value), before anything else.
        if s.to_ascii_lowercase().contains("pin-value") {
            return Err(bad(
                s,
                "pin-value is refused: a PIN must not sit in argv or a unit file; \
                 put it in a 0600 file and give pin-source=file:/path",
            ));
        }
        let rest = s
            .strip_prefix("pkcs11:")
            .ok_or_else(|| bad(s, "must start with pkcs11:"))?;
        let (path, query) = rest.split_once('?').unwrap_or((rest, ""));
        let mut u = Pkcs11Uri {
            token: None,
            serial: None,
            slot_id: None,
            object: None,
            id: None,
            module_path: PathBuf::new(),
            pin_source: None,
            object_type: None,
        };
        let text = |k: &str, v: Vec<u8>| {
            String::from_utf8(v).map_err(|_| bad(s, format!("{k} is not UTF-8")))
        };
        let mut seen = std::collections::BTreeSet::new();
        for attr in path.split(';').filter(|a| !a.is_empty()) {
            let (k, v) = attr
                .split_once('=')
                .ok_or_else(|| bad(s, "a path attribute has no '='"))?;
            if !seen.insert(k.to_string()) {
                return Err(bad(s, format!("{} given twice", printable(k, 32))));
            }
            let v: Vec<u8> = percent_encoding::percent_decode_str(v).collect();
            match k {
                "token" => u.token = Some(text(k, v)?),
                "serial" => u.serial = Some(text(k, v)?),
                "object" => u.object = Some(text(k, v)?),
                "id" => u.id = Some(v),
                "slot-id" => {
                    u.slot_id = Some(
                        text(k, v)?
                            .parse()
                            .map_err(|_| bad(s, "slot-id is not a number"))?,
                    )
                }
                // Honoured: only objects of that kind are looked for (a key of another
                // kind under the same label is never adopted).
                "type" if &v[..] == b"secret-key" => u.object_type = Some(ObjectType::SecretKey),
                "type" if matches!(&v[..], b"private" | b"public") => {
                    u.object_type = Some(ObjectType::Pair)
                }
                _ => {
                    return Err(bad(
                        s,
                        format!("unsupported path attribute {:?} (token, serial, slot-id, object, id, type)", printable(k, 32)),
                    ))
                }
            }
        }
        for attr in query.split('&').filter(|a| !a.is_empty()) {
            let (k, v) = attr
                .split_once('=')
                .ok_or_else(|| bad(s, "a query attribute has no '='"))?;
            if !seen.insert(k.to_string()) {
                return Err(bad(s, format!("{} given twice", printable(k, 32))));
            }
            let v: Vec<u8> = percent_encoding::percent_decode_str(v).collect();
            match k {
                "module-path" => u.module_path = PathBuf::from(text(k, v)?),
                "pin-source" => {
                    let v = text(k, v)?;
                    u.pin_source = Some(if v == SECRET_PIN {
                        PinSource::Secret
                    } else {
                        PinSource::File(PathBuf::from(v.strip_prefix("file:").unwrap_or(&v)))
                    });
                }
                _ => {
                    return Err(bad(
                        s,
                        format!(
                            "unsupported query attribute {:?} (module-path, pin-source)",
                            printable(k, 32)
                        ),
                    ))
                }
            }
        }
        if !u.module_path.is_absolute() {
            return Err(bad(
                s,
                "module-path=/absolute/path/to/module.so is required",
            ));
        }
        if u.token.is_none() && u.serial.is_none() && u.slot_id.is_none() {
            return Err(bad(s, "name the token: token=, serial= or slot-id="));
        }
        if u.object.is_none() && u.id.is_none() {
            return Err(bad(s, "name the key: object= or id="));
        }
        if let Some(PinSource::File(p)) = &u.pin_source {
            if !p.is_absolute() {
                return Err(bad(
                    s,
                    format!("pin-source must be an absolute path (or {SECRET_PIN})"),
                ));
            }
        }
        Ok(u)
    }
}

impl Pkcs11Uri {
    /// The key's identity as written into slots: the token and object attributes only
    /// (module path, slot number and PIN differ between hosts holding the same token).
    pub fn key_id(&self) -> String {
        const SET: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
            .remove(b'-')
            .remove(b'.')
            .remove(b'_')
            .remove(b'~');
        let enc = |b: &[u8]| percent_encoding::percent_encode(b, SET).to_string();
        let mut parts = Vec::new();
        if let Some(t) = &self.token {
            parts.push(format!("token={}", enc(t.as_bytes())));
        }
        if let Some(t) = &self.serial {
            parts.push(format!("serial={}", enc(t.as_bytes())));
        }
        if self.token.is_none() && self.serial.is_none() {
            if let Some(n) = self.slot_id {
                parts.push(format!("slot-id={n}"));
            }
        }
        if let Some(o) = &self.object {
            parts.push(format!("object={}", enc(o.as_bytes())));
        }
        if let Some(i) = &self.id {
            // Ids are bytes: always fully percent-encoded, as RFC 7512 writes them.
            let hex: String = i.iter().map(|b| format!("%{b:02X}")).collect();
            parts.push(format!("id={hex}"));
        }
        format!("pkcs11:{}", parts.join(";"))
    }

    fn object_template(&self, class: ObjectClass) -> Vec<Attribute> {
        let mut t = vec![Attribute::Class(class)];
        if let Some(o) = &self.object {
            t.push(Attribute::Label(o.as_bytes().to_vec()));
        }
        if let Some(i) = &self.id {
            t.push(Attribute::Id(i.clone()));
        }
        t
    }
}

/// Why a token call failed, before it is named for a key.
#[derive(Debug)]
enum Fail {
    /// The token or its user refused (PIN, key missing, key not allowed to do this).
    Denied(String),
    /// The token is gone, broken or too slow.
    Unavailable(String),
    /// The wrapped bytes did not authenticate inside the token.
    Rejected,
}

/// One short line for an error: the return value and the call, and what it usually means.
fn describe(e: &CkError) -> String {
    let CkError::Pkcs11(rv, f) = e else {
        return e.to_string();
    };
    let hint = match rv {
        RvError::UserNotLoggedIn => ": not logged in (give pin-source=file:/path to log in)",
        RvError::KeyHandleInvalid => {
            ": the key is not in the token (destroyed, or not visible to this user)"
        }
        RvError::TokenNotPresent => ": no token with that token=/serial=/slot-id= is present",
        RvError::TokenNotRecognized => ": more than one token answers to that token=/serial=",
        RvError::PinIncorrect => ": wrong PIN",
        RvError::PinLocked => ": the PIN is locked",
        _ => "",
    };
    format!("{rv:?} in {f:?}{hint}")
}

fn classify(e: &CkError) -> Fail {
    match e {
        // Tokens report a failed GCM tag or OAEP decoding in C_Decrypt as a generic error
        // (SoftHSM: CKR_GENERAL_ERROR): the bytes are rejected.
        CkError::Pkcs11(
            RvError::GeneralError | RvError::DataInvalid | RvError::DataLenRange,
            cryptoki::context::Function::Decrypt,
        ) => Fail::Rejected,
        // Parameters a stored slot chose (an OAEP tag byte) that the token does not take:
        // the stored bytes are wrong, not the token.
        CkError::Pkcs11(
            RvError::ArgumentsBad | RvError::MechanismParamInvalid,
            cryptoki::context::Function::DecryptInit,
        ) => Fail::Rejected,
        CkError::Pkcs11(rv, _) => match rv {
            RvError::EncryptedDataInvalid | RvError::EncryptedDataLenRange => Fail::Rejected,
            RvError::PinIncorrect
            | RvError::PinLocked
            | RvError::PinExpired
            | RvError::PinInvalid
            | RvError::PinLenRange
            | RvError::UserNotLoggedIn
            | RvError::UserPinNotInitialized
            | RvError::KeyFunctionNotPermitted
            | RvError::KeyHandleInvalid
            | RvError::KeyTypeInconsistent
            | RvError::ObjectHandleInvalid
            | RvError::MechanismInvalid
            | RvError::MechanismParamInvalid => Fail::Denied(describe(e)),
            _ => Fail::Unavailable(describe(e)),
        },
        other => Fail::Unavailable(other.to_string()),
    }
}

/// Errors after which the session is dropped and opened (and logged in) again once.
fn reopens(e: &CkError) -> bool {
    matches!(
        e,
        CkError::Pkcs11(
            RvError::SessionHandleInvalid
                | RvError::SessionClosed
                | RvError::DeviceRemoved
                | RvError::DeviceError
                | RvError::TokenNotPresent
                | RvError::UserNotLoggedIn
                | RvError::CryptokiNotInitialized,
            _
        )
    )
}

/// One loaded module per file per process (`C_Initialize` may run once), keyed by its
/// canonical path, so two spellings of one module share it.
fn module(path: &Path) -> Result<Pkcs11, Fail> {
    static MODULES: OnceLock<Mutex<BTreeMap<PathBuf, Pkcs11>>> = OnceLock::new();
    let mut map = MODULES
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|p| p.into_inner());
    if let Some(m) = map.get(path) {
        return Ok(m.clone());
    }
    check_module_file(path).map_err(Fail::Unavailable)?;
    let ctx = Pkcs11::new(path)
        .map_err(|e| Fail::Unavailable(format!("cannot load module {}: {e}", path.display())))?;
    ctx.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK))
        .map_err(|e| Fail::Unavailable(format!("module {} C_Initialize: {e}", path.display())))?;
    map.insert(path.to_path_buf(), ctx.clone());
    Ok(ctx)
}

/// The module is code this process will run: a regular file (the canonical path, so no
/// symlink is followed later) that only root or this user can write, in directories only
/// they can write either.
fn check_module_file(path: &Path) -> Result<(), String> {
    use std::os::unix::fs::MetadataExt;
    let me = crate::localfile::euid();
    let m =
        std::fs::symlink_metadata(path).map_err(|e| format!("module {}: {e}", path.display()))?;
    if !m.is_file() {
        return Err(format!("module {}: not a regular file", path.display()));
    }
    for (p, m) in std::iter::once((path.to_path_buf(), m)).chain(
        path.ancestors()
            .skip(1)
            .filter_map(|d| std::fs::metadata(d).ok().map(|m| (d.to_path_buf(), m))),
    ) {
        if m.uid() != 0 && m.uid() != me {
            return Err(format!(
                "module {}: {} is owned by uid {}, not root or this user",
                path.display(),
                p.display(),
                m.uid()
            ));
        }
        // A sticky directory (/tmp) still lets others replace nothing of ours.
        if m.mode() & 0o022 != 0 && !(m.is_dir() && m.mode() & 0o1000 != 0) {
            return Err(format!(
                "module {}: {} is writable by group or others",
                path.display(),
                p.display()
            ));
        }
    }
    Ok(())
}

/// The PIN in `path` and its SHA-256 (to remember a PIN the token refused).
fn read_pin(path: &Path) -> Result<(AuthPin, [u8; 32]), Fail> {
    let err = |r: String| Fail::Denied(format!("PIN file {}: {r}", path.display()));
    let buf = crate::localfile::read_private(path, MAX_PIN, "a PIN file").map_err(err)?;
    let text = std::str::from_utf8(&buf).map_err(|_| err("not UTF-8".into()))?;
    pin_of(text).ok_or_else(|| err("empty".into()))
}

/// A PIN from its text (trailing newlines dropped, as `echo` and `--from-file` leave them)
/// and its SHA-256 (to remember a refused one); `None` when empty.
fn pin_of(text: &str) -> Option<(AuthPin, [u8; 32])> {
    let pin = text.trim_end_matches(['\n', '\r']);
    (!pin.is_empty()).then(|| (AuthPin::from(pin), crate::crypto::sha256(pin.as_bytes())))
}

/// The volume's PIN ([`keep_secret_pin`]); kept (not taken): a lost session logs in again.
fn secret_pin() -> Result<(AuthPin, [u8; 32]), Fail> {
    let kept = SECRET_PIN_VALUE.lock().unwrap_or_else(|p| p.into_inner());
    kept.as_deref().and_then(|p| pin_of(p)).ok_or_else(|| {
        Fail::Denied(format!(
            "pin-source={SECRET_PIN}, but this mount was given no pkcs11Pin secret"
        ))
    })
}

/// One token: the module, how to find the token, where the PIN is, and the one session.
struct Token {
    ctx: Pkcs11,
    uri: Pkcs11Uri,
    session: Mutex<Option<Session>>,
    /// One token call at a time, taken (asynchronously, bounded) before a blocking thread
    /// is used: a hung token holds one thread, never the whole blocking pool.
    permit: Arc<tokio::sync::Semaphore>,
    /// When the call in progress started (ms since the first call), 0 when idle.
    busy_since: AtomicU64,
    /// SHA-256 of a PIN the token refused: never tried again (a token locks its user after
    /// a few wrong PINs), until the PIN file holds another one.
    refused_pin: Mutex<Option<[u8; 32]>>,
}

/// Milliseconds since the first call (monotonic).
fn now_ms() -> u64 {
    static START: OnceLock<std::time::Instant> = OnceLock::new();
    START
        .get_or_init(std::time::Instant::now)
        .elapsed()
        .as_millis() as u64
}

impl Token {
    /// The process-wide token for this module, token and PIN source (keys in one token
    /// share one session and one login).
    fn get(uri: &Pkcs11Uri) -> Result<Arc<Token>, Fail> {
        type Key = (
            PathBuf,
            Option<String>,
            Option<String>,
            Option<u64>,
            Option<PinSource>,
        );
        static TOKENS: OnceLock<Mutex<BTreeMap<Key, Arc<Token>>>> = OnceLock::new();
        let module_path = std::fs::canonicalize(&uri.module_path)
            .map_err(|e| Fail::Unavailable(format!("module {}: {e}", uri.module_path.display())))?;
        let key = (
            module_path.clone(),
            uri.token.clone(),
            uri.serial.clone(),
            uri.slot_id,
            uri.pin_source.clone(),
        );
        let mut map = TOKENS
            .get_or_init(Default::default)
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Some(t) = map.get(&key) {
            return Ok(t.clone());
        }
        let t = Arc::new(Token {
            ctx: module(&module_path)?,
            uri: uri.clone(),
            session: Mutex::new(None),
            permit: Arc::new(tokio::sync::Semaphore::new(1)),
            busy_since: AtomicU64::new(0),
            refused_pin: Mutex::new(None),
        });
        map.insert(key, t.clone());
        Ok(t)
    }

    /// Opens a session on the one token the URI names and logs in (the PIN file is read
    /// again each time, so a changed PIN needs no restart).
    fn open(&self) -> Result<Session, Fail> {
        let ck = |e: CkError| classify(&e);
        let mut found = None;
        for slot in self.ctx.get_slots_with_token().map_err(ck)? {
            let info = self.ctx.get_token_info(slot).map_err(ck)?;
            let matches = self
                .uri
                .token
                .as_deref()
                .is_none_or(|l| info.label().trim_end() == l)
                && self
                    .uri
                    .serial
                    .as_deref()
                    .is_none_or(|s| info.serial_number().trim_end() == s)
                && self.uri.slot_id.is_none_or(|n| slot.id() == n);
            if matches {
                if found.is_some() {
                    return Err(Fail::Unavailable(
                        "more than one token answers to that token=/serial=: refusing to pick one"
                            .into(),
                    ));
                }
                found = Some(slot);
            }
        }
        let slot = found.ok_or_else(|| {
            Fail::Unavailable("no token with that token=/serial=/slot-id= is present".into())
        })?;
        let session = self.ctx.open_ro_session(slot).map_err(ck)?;
        if let Some(src) = &self.uri.pin_source {
            let (pin, digest) = match src {
                PinSource::File(path) => read_pin(path)?,
                PinSource::Secret => secret_pin()?,
            };
            let mut refused = self.refused_pin.lock().unwrap_or_else(|p| p.into_inner());
            if *refused == Some(digest) {
                return Err(Fail::Denied(format!(
                    "the token refused {src} before: not trying it again until it changes"
                )));
            }
            match session.login(UserType::User, Some(&pin)) {
                Ok(()) | Err(CkError::Pkcs11(RvError::UserAlreadyLoggedIn, _)) => *refused = None,
                Err(e) => {
                    if matches!(
                        e,
                        CkError::Pkcs11(
                            RvError::PinIncorrect
                                | RvError::PinLocked
                                | RvError::PinExpired
                                | RvError::PinInvalid
                                | RvError::PinLenRange,
                            _
                        )
                    ) {
                        *refused = Some(digest);
                    }
                    return Err(ck(e));
                }
            }
        }
        Ok(session)
    }

    /// True while a call has been running for longer than [`CALL_TIMEOUT`].
    fn hung(&self) -> bool {
        let since = self.busy_since.load(Ordering::Acquire);
        since != 0 && now_ms().saturating_sub(since) > CALL_TIMEOUT.as_millis() as u64
    }

    /// Runs `f` in the session, opening it first if needed, and once more in a fresh
    /// session after a session or device error. Called on a blocking thread holding
    /// [`Token::permit`] ([`bounded`]).
    fn with<T>(&self, f: impl Fn(&Session) -> Result<T, CkError>) -> Result<T, Fail> {
        let mut guard = self.session.lock().unwrap_or_else(|p| p.into_inner());
        self.busy_since.store(now_ms().max(1), Ordering::Release);
        let out = self.with_session(&mut guard, f);
        self.busy_since.store(0, Ordering::Release);
        out
    }

    fn with_session<T>(
        &self,
        guard: &mut Option<Session>,
        f: impl Fn(&Session) -> Result<T, CkError>,
    ) -> Result<T, Fail> {
        for attempt in 0..2 {
            if guard.is_none() {
                *guard = Some(self.open()?);
            }
            let session = guard.as_ref().expect("opened just above");
            match f(session) {
                Err(e)
                    if attempt == 0
                        && reopens(&e)
                        && (self.uri.pin_source.is_some()
                            || !matches!(e, CkError::Pkcs11(RvError::UserNotLoggedIn, _))) =>
                {
                    tracing::warn!(token = %self.uri.key_id(), error = %describe(&e), "PKCS#11 session lost; reopening");
                    *guard = None;
                }
                other => return other.map_err(|e| classify(&e)),
            }
        }
        Err(Fail::Unavailable(
            "the session was lost twice in a row".into(),
        ))
    }
}

/// The one object of `class` matching the URI that needs the PIN (`CKA_PRIVATE`): a secret
/// or private key, never one planted without the PIN; none is the error `missing` (as the
/// token would answer it).
fn find_required(
    s: &Session,
    uri: &Pkcs11Uri,
    class: ObjectClass,
    missing: RvError,
) -> Result<ObjectHandle, CkError> {
    let mut template = uri.object_template(class);
    template.push(Attribute::Private(true));
    find_unique(s, &template)?.ok_or(CkError::Pkcs11(
        missing,
        cryptoki::context::Function::FindObjects,
    ))
}

/// True if `wrapped` has the shape of a slot of a `kind` key: its mechanism tag, and the
/// AES-GCM length, or an RSA ciphertext of a 1024..=8192-bit modulus.
fn shape_ok(kind: Kind, wrapped: &[u8]) -> bool {
    match (kind, wrapped.first()) {
        (Kind::Aes, Some(&TAG_GCM)) => wrapped.len() == GCM_WRAPPED,
        (Kind::Rsa, Some(&(TAG_OAEP | TAG_OAEP_SHA1))) => (129..=1025).contains(&wrapped.len()),
        _ => false,
    }
}

/// Finds exactly one object of `class` matching the URI (none: `None`).
fn find_one(
    s: &Session,
    uri: &Pkcs11Uri,
    class: ObjectClass,
) -> Result<Option<ObjectHandle>, CkError> {
    find_unique(s, &uri.object_template(class))
}

/// The object `template` matches, if one does; more than one is an error (which of them
/// is meant must never depend on the token's order).
fn find_unique(s: &Session, template: &[Attribute]) -> Result<Option<ObjectHandle>, CkError> {
    match s.find_objects(template)?[..] {
        [] => Ok(None),
        [h] => Ok(Some(h)),
        _ => Err(CkError::Pkcs11(
            RvError::KeyHandleInvalid,
            cryptoki::context::Function::FindObjects,
        )),
    }
}

/// The RSA public key a pair wraps to, captured once at resolve from the checked pair:
/// every wrap uses these bytes, never whatever public object the token holds by then.
#[derive(Clone)]
struct RsaPublic {
    modulus: Vec<u8>,
    exponent: Vec<u8>,
}

/// A KEK found in the token (its kind and, for a pair, its public key), or why none is.
type Found = Result<(Kind, Option<RsaPublic>), &'static str>;

/// The KEK the URI names in the token; `Ok(Err(reason))` when the token holds no usable key
/// under it.
fn find_kek(s: &Session, u: &Pkcs11Uri) -> Result<Found, CkError> {
    let wants = |t: ObjectType| u.object_type.is_none_or(|w| w == t);
    let secret = match wants(ObjectType::SecretKey) {
        true => find_one(s, u, ObjectClass::SECRET_KEY)?,
        false => None,
    };
    let (public, private) = match wants(ObjectType::Pair) {
        true => (
            find_one(s, u, ObjectClass::PUBLIC_KEY)?,
            find_one(s, u, ObjectClass::PRIVATE_KEY)?,
        ),
        false => (None, None),
    };
    let attrs = |h, types: &[AttributeType]| s.get_attributes(h, types);
    let private_attr = |a: &[Attribute]| a.iter().any(|a| matches!(a, Attribute::Private(true)));
    if let Some(h) = secret {
        if public.is_some() || private.is_some() {
            return Ok(Err("the URI names both a secret key and a key pair: one of them was \
                 planted, refusing both (give type=secret-key or type=private, and remove the other)"));
        }
        let a = attrs(
            h,
            &[
                AttributeType::KeyType,
                AttributeType::ValueLen,
                AttributeType::Extractable,
                AttributeType::Private,
            ],
        )?;
        if !private_attr(&a) {
            return Ok(Err(
                "the secret key is readable without login (CKA_PRIVATE=false): \
                 anyone who reaches the token could have planted it; create it with \
                 CKA_PRIVATE=true and give pin-source=",
            ));
        }
        if a.iter().any(|a| matches!(a, Attribute::Extractable(true))) {
            // Not refused (HSM backup schemes may need it), but "never leaves the HSM" is
            // then the HSM policy's promise, not the key's.
            tracing::warn!(key = %u.key_id(), "the token's AES key is extractable (CKA_EXTRACTABLE): create it non-extractable so it can never leave the HSM");
        }
        let aes = a
            .iter()
            .any(|a| matches!(a, Attribute::KeyType(t) if *t == KeyType::AES));
        let len32 = a
            .iter()
            .any(|a| matches!(a, Attribute::ValueLen(n) if u64::from(*n) == 32));
        return Ok(if aes && len32 {
            Ok((Kind::Aes, None))
        } else {
            Err("a secret key that is not AES-256")
        });
    }
    let Some(h) = public.or(private) else {
        return Ok(Err(
            "the key is not in the token (destroyed, or not visible to this user: \
             a key needs pin-source=)",
        ));
    };
    if !attrs(h, &[AttributeType::KeyType])?
        .iter()
        .any(|a| matches!(a, Attribute::KeyType(t) if *t == KeyType::RSA))
    {
        return Ok(Err(
            "a key pair that is not RSA (EC keys sign: use --sign / --trust-signer)",
        ));
    }
    // Public objects can be replaced by anyone who reaches the token, without the PIN: the
    // pair is used only logged in, only when its private half needs the PIN, and only when
    // the public half is the private half's.
    let (Some(public), Some(private)) = (public, private) else {
        return Ok(Err(
            "an RSA key needs both halves visible: give pin-source= (the public key \
             object alone is not a trust anchor: anyone who can reach the token may replace it)",
        ));
    };
    // Each half's modulus and exponent (a private key object usually carries both too),
    // and whether it needs the PIN.
    let half = |h| -> Result<(Option<RsaPublic>, bool), CkError> {
        let a = attrs(
            h,
            &[
                AttributeType::Modulus,
                AttributeType::PublicExponent,
                AttributeType::Private,
            ],
        )?;
        let needs_pin = private_attr(&a);
        let (mut modulus, mut exponent) = (None, None);
        for a in a {
            match a {
                Attribute::Modulus(v) => modulus = Some(v),
                Attribute::PublicExponent(v) => exponent = Some(v),
                _ => {}
            }
        }
        let key = modulus.map(|modulus| RsaPublic {
            modulus,
            exponent: exponent.unwrap_or_default(),
        });
        Ok((key, needs_pin))
    };
    let (public, _) = half(public)?;
    let private_handle = private;
    let (private, needs_pin) = half(private)?;
    if !needs_pin {
        return Ok(Err(
            "the RSA private key is readable without login (CKA_PRIVATE=false): \
             anyone who reaches the token could have planted the pair; refusing it",
        ));
    }
    let p = match (public, private) {
        // The private object's exponent, where the token shows it, must match too.
        (Some(p), Some(k))
            if p.modulus == k.modulus && (k.exponent.is_empty() || k.exponent == p.exponent) =>
        {
            p
        }
        _ => {
            return Ok(Err(
                "the RSA public key object does not match the private key: refusing it",
            ))
        }
    };
    // An exponent is not bound to the modulus: a public object with the right modulus and
    // e = 1 (or any other odd choice) would make every wrap send the padded DEK in the
    // clear. Only a sane exponent, and only one the private key proves it inverts.
    if !sane_exponent(&p.exponent) || !pair_round_trips(s, private_handle, &p)? {
        return Ok(Err(
            "the RSA public key object's exponent is not the private key's: refusing it",
        ));
    }
    Ok(Ok((Kind::Rsa, Some(p))))
}

/// An RSA public exponent sealfs wraps with: odd, at least 3, at most 2^64 - 1.
fn sane_exponent(e: &[u8]) -> bool {
    let e: Vec<u8> = e.iter().copied().skip_while(|&b| b == 0).collect();
    !e.is_empty() && e.len() <= 8 && e[e.len() - 1] & 1 == 1 && (e.len() > 1 || e[0] >= 3)
}

/// Whether `public` is the private key's: a random value wrapped to it (as a session
/// object, as every wrap does) comes back from the private key unchanged.
fn pair_round_trips(
    s: &Session,
    private: ObjectHandle,
    public: &RsaPublic,
) -> Result<bool, CkError> {
    let mut probe = Zeroizing::new([0u8; DEK_LEN]);
    random_bytes(&mut probe[..]);
    let aad = b"sealfs v1 pkcs11 pair check";
    let h = public_session_object(s, public)?;
    let wrapped = rsa_wrap(s, h, aad, &probe[..]);
    let _ = s.destroy_object(h);
    let wrapped = wrapped?;
    let label = crate::crypto::sha256(aad);
    let back = s.decrypt(
        &Mechanism::RsaPkcsOaep(oaep(wrapped[0], &label)),
        private,
        &wrapped[1..],
    );
    Ok(back.is_ok_and(|b| b[..] == probe[..]))
}

/// A session object (gone with the session) holding `p`, to encrypt to.
fn public_session_object(s: &Session, p: &RsaPublic) -> Result<ObjectHandle, CkError> {
    s.create_object(&[
        Attribute::Class(ObjectClass::PUBLIC_KEY),
        Attribute::KeyType(KeyType::RSA),
        Attribute::Token(false),
        Attribute::Private(false),
        Attribute::Encrypt(true),
        Attribute::Modulus(p.modulus.clone()),
        Attribute::PublicExponent(p.exponent.clone()),
    ])
}

/// What the URI's object is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Aes,
    Rsa,
}

/// A resolved `pkcs11:` KEK.
pub struct Pkcs11Key {
    token: Arc<Token>,
    uri: Arc<Pkcs11Uri>,
    id: String,
    kind: Kind,
    /// A pair's public key, checked at resolve: what every wrap encrypts to.
    public: Option<RsaPublic>,
}

fn aad(ctx: &EncryptionContext) -> Vec<u8> {
    let mut a = WRAP_AAD.to_vec();
    encode_context(ctx, &mut a);
    a
}

/// Runs a token call on the blocking pool, bounded by [`CALL_TIMEOUT`].
///
/// With `token`, the call first takes the token's one permit (waiting asynchronously, inside
/// the same bound), and fails at once while an earlier call has hung past the bound: a
/// token that stops answering holds one blocking thread, not the pool that local-store reads
/// and other keys share.
async fn bounded<T: Send + 'static>(
    token: Option<&Arc<Token>>,
    key: &str,
    op: &'static str,
    f: impl FnOnce() -> Result<T, Fail> + Send + 'static,
) -> Result<T, KeyError> {
    let named = |fail: Fail| match fail {
        Fail::Denied(message) => KeyError::Pkcs11Denied {
            op,
            key: key.to_string(),
            message,
        },
        Fail::Unavailable(message) => KeyError::Pkcs11Unavailable {
            op,
            key: key.to_string(),
            message,
        },
        Fail::Rejected => KeyError::UnwrapFailed(key.to_string()),
    };
    let start = std::time::Instant::now();
    let hung = || {
        Fail::Unavailable(format!(
            "a call to the token has not returned for over {} s",
            CALL_TIMEOUT.as_secs()
        ))
    };
    let call = async {
        let permit = match token {
            Some(t) if t.hung() => return Err(hung()),
            Some(t) => Some(t.permit.clone().acquire_owned().await.map_err(|_| hung())?),
            None => None,
        };
        tokio::task::spawn_blocking(move || {
            let r = f();
            drop(permit);
            r
        })
        .await
        .unwrap_or_else(|_| Err(Fail::Unavailable("token call panicked".into())))
    };
    let out = match tokio::time::timeout(CALL_TIMEOUT, call).await {
        Ok(r) => r.map_err(named),
        Err(_) => Err(named(Fail::Unavailable(format!(
            "no answer from the token in {} s",
            CALL_TIMEOUT.as_secs()
        )))),
    };
    // Counted beside S3 and KMS on the metrics page (sealfs_requests_total{service="pkcs11"}).
    let outcome = match &out {
        Ok(_) => "ok",
        Err(e) if e.is_refusal() => "denied",
        Err(e) if e.is_integrity() => "rejected",
        Err(_) => "unavailable",
    };
    crate::calls::record("pkcs11", op, outcome, start.elapsed());
    out
}

impl Pkcs11Key {
    /// Loads the module, opens (and logs in to) the token and finds the key: an AES secret
    /// key, or an RSA key pair whose two halves match, as `type=` allows. Only objects that
    /// need the PIN (`CKA_PRIVATE`) are keys: anyone who reaches the token can create a
    /// public one, under any label. A label naming both a secret key and a pair is refused:
    /// one of the two was planted, and which one wraps must not depend on lookup order.
    pub async fn resolve(uri: &Pkcs11Uri) -> Result<Self, KeyError> {
        let id = uri.key_id();
        let u = Arc::new(uri.clone());
        let (token, found) = bounded(None, &id, "open", {
            let u = u.clone();
            move || {
                let token = Token::get(&u)?;
                let found = token.with(|s| find_kek(s, &u))?;
                match found {
                    Err(why) => Err(Fail::Denied(why.into())),
                    Ok(found) => Ok((token, found)),
                }
            }
        })
        .await?;
        let (kind, public) = found;
        Ok(Self {
            token,
            uri: u,
            id,
            kind,
            public,
        })
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    pub fn kind(&self) -> Kind {
        self.kind
    }

    /// A slot's first byte is the kind of key that made it (01 AES-GCM, 02/03 RSA-OAEP):
    /// a slot of this key's id made by the other kind means the token's object under the
    /// URI changed kind, which is refused, never adopted.
    pub fn check_kind(&self, wrapped: &[u8]) -> Result<(), KeyError> {
        let made_by = match wrapped.first() {
            Some(&TAG_GCM) => Kind::Aes,
            Some(&(TAG_OAEP | TAG_OAEP_SHA1)) => Kind::Rsa,
            _ => return Ok(()), // not a slot of any kind: refused by its shape
        };
        if made_by == self.kind {
            return Ok(());
        }
        let name = |k| match k {
            Kind::Aes => "an AES key",
            Kind::Rsa => "an RSA pair",
        };
        Err(KeyError::Pkcs11Denied {
            op: "unwrap",
            key: self.id.clone(),
            message: format!(
                "a slot's tag says {} made it, but the token holds {} under this URI: \
                 refused (a change of kind, or a slot tampered with in the store)",
                name(made_by),
                name(self.kind)
            ),
        })
    }

    /// Encrypts the DEK inside the token (see the module docs for the bytes).
    pub async fn wrap(&self, dek: &Dek, ctx: &EncryptionContext) -> Result<Vec<u8>, KeyError> {
        let (token, uri, kind) = (self.token.clone(), self.uri.clone(), self.kind);
        let public = self.public.clone();
        let aad = aad(ctx);
        // The DEK crosses to the blocking thread in a zeroized buffer.
        let plain = Zeroizing::new(*dek.expose());
        bounded(Some(&self.token), &self.id, "wrap", move || {
            let out = token.with(|s| match kind {
                Kind::Aes => {
                    let h =
                        find_required(s, &uri, ObjectClass::SECRET_KEY, RvError::KeyHandleInvalid)?;
                    let mut iv = [0u8; 12];
                    random_bytes(&mut iv);
                    let params = GcmParams::new(&mut iv, &aad, 128.into())?;
                    let ct = s.encrypt(&Mechanism::AesGcm(params), h, &plain[..])?;
                    Ok([&[TAG_GCM][..], &iv, &ct].concat())
                }
                Kind::Rsa => {
                    // A session object from the public key checked at resolve, never the
                    // token's public object now (anyone may have replaced it since).
                    let p = public.as_ref().ok_or(CkError::Pkcs11(
                        RvError::KeyHandleInvalid,
                        cryptoki::context::Function::CreateObject,
                    ))?;
                    let h = public_session_object(s, p)?;
                    let out = rsa_wrap(s, h, &aad, &plain[..]);
                    // Session objects go with the session anyway; a failed destroy is moot.
                    let _ = s.destroy_object(h);
                    out
                }
            });
            let out = out?;
            // What the token returned is checked as a stored slot will be at unwrap: a
            // slot that could never open is not written.
            if !shape_ok(kind, &out) {
                return Err(Fail::Unavailable(format!(
                    "token returned {} bytes: not a wrapped key of this key's kind",
                    out.len()
                )));
            }
            Ok(out)
        })
        .await
    }

    /// Decrypts a wrapped DEK inside the token; the DEK goes straight into locked memory.
    pub async fn unwrap(&self, wrapped: &[u8], ctx: &EncryptionContext) -> Result<Dek, KeyError> {
        let fail = || KeyError::UnwrapFailed(self.id.clone());
        self.check_kind(wrapped)?;
        if !shape_ok(self.kind, wrapped) {
            return Err(fail());
        }
        let (token, uri, kind) = (self.token.clone(), self.uri.clone(), self.kind);
        let aad = aad(ctx);
        let wrapped = wrapped.to_vec();
        let mut plain = bounded(Some(&self.token), &self.id, "unwrap", move || {
            token.with(|s| {
                let plain = match kind {
                    Kind::Aes => {
                        let h = find_required(
                            s,
                            &uri,
                            ObjectClass::SECRET_KEY,
                            RvError::KeyHandleInvalid,
                        )?;
                        let mut iv = [0u8; 12];
                        iv.copy_from_slice(&wrapped[1..13]);
                        let params = GcmParams::new(&mut iv, &aad, 128.into())?;
                        s.decrypt(&Mechanism::AesGcm(params), h, &wrapped[13..])?
                    }
                    Kind::Rsa => {
                        let h = find_required(
                            s,
                            &uri,
                            ObjectClass::PRIVATE_KEY,
                            RvError::UserNotLoggedIn,
                        )?;
                        let label = crate::crypto::sha256(&aad);
                        s.decrypt(
                            &Mechanism::RsaPkcsOaep(oaep(wrapped[0], &label)),
                            h,
                            &wrapped[1..],
                        )?
                    }
                };
                Ok(Zeroizing::new(plain))
            })
        })
        .await?;
        if plain.len() != DEK_LEN {
            return Err(fail());
        }
        Ok(Dek::from_slice_zeroizing(&mut plain[..])?)
    }
}

/// RSA-OAEP of `plain` to public key `h`: SHA-256 with the context label, or, where the
/// token refuses those parameters, SHA-1 and no label (see the module docs).
fn rsa_wrap(s: &Session, h: ObjectHandle, aad: &[u8], plain: &[u8]) -> Result<Vec<u8>, CkError> {
    let label = crate::crypto::sha256(aad);
    match s.encrypt(&Mechanism::RsaPkcsOaep(oaep(TAG_OAEP, &label)), h, plain) {
        Ok(ct) => Ok([&[TAG_OAEP][..], &ct].concat()),
        Err(CkError::Pkcs11(RvError::ArgumentsBad | RvError::MechanismParamInvalid, _)) => {
            let ct = s.encrypt(
                &Mechanism::RsaPkcsOaep(oaep(TAG_OAEP_SHA1, &label)),
                h,
                plain,
            )?;
            Ok([&[TAG_OAEP_SHA1][..], &ct].concat())
        }
        Err(e) => Err(e),
    }
}

/// OAEP parameters for a slot tag: SHA-256 with the context label, or SHA-1 and no label.
fn oaep(tag: u8, label: &[u8; 32]) -> PkcsOaepParams<'_> {
    if tag == TAG_OAEP {
        PkcsOaepParams::new(
            MechanismType::SHA256,
            PkcsMgfType::MGF1_SHA256,
            PkcsOaepSource::data_specified(label),
        )
    } else {
        PkcsOaepParams::new(
            MechanismType::SHA1,
            PkcsMgfType::MGF1_SHA1,
            PkcsOaepSource::empty(),
        )
    }
}

/// An EC P-256 key pair in a token, for publisher signatures (`sign/`).
pub struct Pkcs11Signer {
    token: Arc<Token>,
    uri: Arc<Pkcs11Uri>,
    id: String,
}

/// DER of an EC P-256 SubjectPublicKeyInfo, less the 65-byte uncompressed point.
const P256_SPKI_PREFIX: [u8; 26] = [
    0x30, 0x59, 0x30, 0x13, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01, 0x06, 0x08, 0x2a,
    0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07, 0x03, 0x42, 0x00,
];
/// DER of the P-256 curve OID, as CKA_EC_PARAMS holds it.
const P256_PARAMS: [u8; 10] = [0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];

impl Pkcs11Signer {
    /// Finds the key pair, checks that its public half belongs to its private half (a
    /// signature over a fresh challenge: needs the PIN), and returns the signer and its
    /// SubjectPublicKeyInfo DER.
    pub async fn resolve(uri: &Pkcs11Uri) -> Result<(Self, Vec<u8>), KeyError> {
        let id = uri.key_id();
        let u = Arc::new(uri.clone());
        let (token, spki) = bounded(None, &id, "public key", {
            let u = u.clone();
            move || {
                if u.pin_source.is_none() {
                    return Err(Fail::Denied(
                        "a token signer needs pin-source=, so that its public key object is checked \
                         against the private key (anyone who reaches the token may replace a public \
                         object without the PIN); or trust the exported public key: --trust-signer file:PUB.pem"
                            .into(),
                    ));
                }
                let token = Token::get(&u)?;
                let attrs = token
                    .with(|s| match find_one(s, &u, ObjectClass::PUBLIC_KEY)? {
                        None => Ok(None),
                        Some(h) => Ok(Some(s.get_attributes(
                            h,
                            &[
                                AttributeType::KeyType,
                                AttributeType::EcParams,
                                AttributeType::EcPoint,
                            ],
                        )?)),
                    })?
                    .ok_or_else(|| Fail::Denied("no such public key in the token".into()))?;
                let mut point = None;
                let mut p256 = false;
                for a in attrs {
                    match a {
                        Attribute::EcParams(p) => p256 = p == P256_PARAMS,
                        // CKA_EC_POINT is a DER OCTET STRING around the point.
                        Attribute::EcPoint(p) => {
                            point = p.strip_prefix(&[0x04, 0x41][..]).map(<[u8]>::to_vec)
                        }
                        _ => {}
                    }
                }
                let spki = match point {
                    Some(pt) if p256 && pt.len() == 65 && pt[0] == 0x04 => {
                        [&P256_SPKI_PREFIX[..], &pt].concat()
                    }
                    _ => return Err(Fail::Denied("not an EC P-256 public key".into())),
                };
                // The pair check: the private key signs a fresh challenge, the public key
                // object must verify it.
                let mut challenge = [0u8; 32];
                random_bytes(&mut challenge);
                let digest = crate::crypto::sha256(&challenge);
                let rs = token.with(|s| {
                    let h = find_required(s, &u, ObjectClass::PRIVATE_KEY, RvError::UserNotLoggedIn)?;
                    s.sign(&Mechanism::Ecdsa, h, &digest)
                })?;
                let ok = aws_lc_rs::signature::UnparsedPublicKey::new(
                    &aws_lc_rs::signature::ECDSA_P256_SHA256_FIXED,
                    &spki,
                )
                .verify(&challenge, &rs)
                .is_ok();
                if !ok {
                    return Err(Fail::Denied(
                        "the public key object does not match the private key: refusing it".into(),
                    ));
                }
                Ok((token, spki))
            }
        })
        .await?;
        Ok((Self { token, uri: u, id }, spki))
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    /// An ECDSA P-256 signature over SHA-256(`message`), made inside the token
    /// (`CKM_ECDSA` over the digest), as raw `r || s` (64 bytes).
    pub async fn sign_raw(&self, message: &[u8]) -> Result<Vec<u8>, KeyError> {
        let digest = crate::crypto::sha256(message);
        let (token, uri) = (self.token.clone(), self.uri.clone());
        bounded(Some(&self.token), &self.id, "sign", move || {
            token.with(|s| {
                let h = find_required(s, &uri, ObjectClass::PRIVATE_KEY, RvError::UserNotLoggedIn)?;
                s.sign(&Mechanism::Ecdsa, h, &digest)
            })
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc7512_uris_parse_and_name_the_key_by_token_and_object_only() {
        let u: Pkcs11Uri = "pkcs11:token=My%20HSM;object=kek-1;id=%01%ff?module-path=/usr/lib/m.so&pin-source=file:/run/pin"
            .parse()
            .unwrap();
        assert_eq!(u.token.as_deref(), Some("My HSM"));
        assert_eq!(u.object.as_deref(), Some("kek-1"));
        assert_eq!(u.id.as_deref(), Some(&[0x01, 0xff][..]));
        assert_eq!(u.module_path, PathBuf::from("/usr/lib/m.so"));
        assert_eq!(
            u.pin_source,
            Some(PinSource::File(PathBuf::from("/run/pin")))
        );
        // Host-local parts (module, PIN, slot number) are not the key's identity.
        assert_eq!(u.key_id(), "pkcs11:token=My%20HSM;object=kek-1;id=%01%FF");
        let v: Pkcs11Uri =
            "pkcs11:slot-id=7;token=My%20HSM;id=%01%FF;object=kek-1?module-path=/opt/x.so"
                .parse()
                .unwrap();
        assert_eq!(
            v.key_id(),
            u.key_id(),
            "attribute order and host parts do not matter"
        );
    }

    #[test]
    fn unsafe_or_incomplete_uris_are_refused_without_echoing_the_query() {
        for (uri, why) in [
            (
                "pkcs11:token=t;object=o?module-path=/m.so&pin-value=1234",
                "pin-value is refused",
            ),
            ("pkcs11:token=t;object=o", "module-path"),
            ("pkcs11:token=t;object=o?module-path=m.so", "module-path"),
            ("pkcs11:object=o?module-path=/m.so", "name the token"),
            ("pkcs11:token=t?module-path=/m.so", "name the key"),
            (
                "pkcs11:token=t;token=u;object=o?module-path=/m.so",
                "given twice",
            ),
            (
                "pkcs11:token=t;object=o;pin=1?module-path=/m.so",
                "unsupported path attribute",
            ),
            (
                "pkcs11:token=t;object=o?module-path=/m.so&pin-source=rel",
                "absolute",
            ),
            (
                "pkcs11:token=t;object=o?module-path=/m.so&module-name=x",
                "unsupported query",
            ),
            ("pkcs11:token=%ff;object=o?module-path=/m.so", "not UTF-8"),
        ] {
            let e = uri.parse::<Pkcs11Uri>().unwrap_err().to_string();
            assert!(e.contains(why), "{uri}: {e}");
            assert!(!e.contains("1234"), "{e}");
        }
        // A PIN typed anywhere else is refused too, and never echoed (found in review).
        for uri in [
            "pkcs11:token=t;object=o;pin-value=SECRET1?module-path=/m.so",
            "pkcs11:token=t;object=o?module-path=/m.so&pin-value:SECRET2",
            "pkcs11:token=t;object=kek&pin-value=SECRET6?module-path=/m.so",
            "pkcs11:token=t;object=o?module-path=/m.so;PIN-VALUE=SECRET7",
        ] {
            let e = uri.parse::<Pkcs11Uri>().unwrap_err().to_string();
            assert!(e.contains("pin-value is refused"), "{uri}: {e}");
            assert!(!e.contains("SECRET"), "{e}");
        }
        // Other refusals name attributes, never values.
        let e = "pkcs11:token=t;object=o;secret=SECRET8?module-path=/m.so"
            .parse::<Pkcs11Uri>()
            .unwrap_err()
            .to_string();
        assert!(!e.contains("SECRET8") && e.contains("secret=…"), "{e}");
        let e = "pkcs11:token=t;object=o?module-path=/m.so&SECRET9"
            .parse::<Pkcs11Uri>()
            .unwrap_err()
            .to_string();
        assert!(!e.contains("SECRET9"), "{e}");
    }
}
