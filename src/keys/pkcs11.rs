//! `pkcs11:` keys held in an HSM or any PKCS#11 token (RFC 7512 URIs), through `cryptoki`.
//!
//! The token object the URI names decides the slot:
//! - an **AES-256 secret key**: the DEK is encrypted and decrypted *inside* the token with
//!   `CKM_AES_GCM` (random 96-bit IV, 128-bit tag), AAD = `"sealfs v1 pkcs11 wrap"` and the
//!   file's canonical encryption context. GCM rather than AES key wrap with padding (RFC
//!   5649): KWP takes no associated data, so a wrapped DEK could not be bound to its file,
//!   and `C_UnwrapKey` would leave the DEK as a token object that must be made extractable
//!   to be read back. Wrapped: `01 || IV (12) || encrypted DEK (32) || tag (16)`.
//! - an **RSA key pair**: `CKM_RSA_PKCS_OAEP`. Sealing uses the *public* key object and
//!   needs no login, so a publisher seals without the PIN; only hosts that can log in to the
//!   token unwrap. Wrapped: `02 || ciphertext` with SHA-256, MGF1-SHA-256 and label =
//!   SHA-256 of the same AAD (the context bound, as for AES); a token that refuses those
//!   parameters (SoftHSM 2.6 accepts only SHA-1 and no label) gets `03 || ciphertext` with
//!   SHA-1, MGF1-SHA-1 and no label, which still hides the DEK (OAEP's security does not
//!   rest on SHA-1's collision resistance) but binds no context: the header MAC still
//!   commits the file to its DEK.
//! - an **EC P-256 key pair**: a publisher signing key (`--sign` / `--trust-signer`, see
//!   `sign/`); its private key signs inside the token.
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
const MAX_PIN: usize = 256;

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
    pub pin_source: Option<PathBuf>,
}

fn bad(uri: &str, reason: impl Into<String>) -> KeyError {
    KeyError::Pkcs11Uri {
        // Without the query: a pin-value someone put there anyway is not echoed.
        uri: printable(uri.split('?').next().unwrap_or(""), 256),
        reason: reason.into(),
    }
}

impl std::str::FromStr for Pkcs11Uri {
    type Err = KeyError;

    fn from_str(s: &str) -> Result<Self, KeyError> {
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
        };
        let text = |k: &str, v: Vec<u8>| {
            String::from_utf8(v).map_err(|_| bad(s, format!("{k} is not UTF-8")))
        };
        let mut seen = std::collections::BTreeSet::new();
        for attr in path.split(';').filter(|a| !a.is_empty()) {
            let (k, v) = attr
                .split_once('=')
                .ok_or_else(|| bad(s, format!("path attribute {attr:?} has no '='")))?;
            if !seen.insert(k.to_string()) {
                return Err(bad(s, format!("{k} given twice")));
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
                // The object class is found from the token; a type= is only checked to be
                // one sealfs can use.
                "type" if matches!(&v[..], b"secret-key" | b"private" | b"public") => {}
                _ => {
                    return Err(bad(
                        s,
                        format!("unsupported path attribute {k:?} (token, serial, slot-id, object, id, type)"),
                    ))
                }
            }
        }
        for attr in query.split('&').filter(|a| !a.is_empty()) {
            let (k, v) = attr
                .split_once('=')
                .ok_or_else(|| bad(s, format!("query attribute {attr:?} has no '='")))?;
            if !seen.insert(k.to_string()) {
                return Err(bad(s, format!("{k} given twice")));
            }
            let v: Vec<u8> = percent_encoding::percent_decode_str(v).collect();
            match k {
                "module-path" => u.module_path = PathBuf::from(text(k, v)?),
                "pin-source" => {
                    let v = text(k, v)?;
                    let p = v.strip_prefix("file:").unwrap_or(&v);
                    u.pin_source = Some(PathBuf::from(p));
                }
                "pin-value" => {
                    return Err(bad(
                        s,
                        "pin-value is refused: a PIN must not sit in argv or a unit file; \
                         put it in a 0600 file and give pin-source=file:/path",
                    ))
                }
                _ => {
                    return Err(bad(
                        s,
                        format!("unsupported query attribute {k:?} (module-path, pin-source)"),
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
        if let Some(p) = &u.pin_source {
            if !p.is_absolute() {
                return Err(bad(s, "pin-source must be an absolute path"));
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

/// One loaded module per path per process (`C_Initialize` may run once).
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

/// The module is code this process will run: a regular file that only root or this user
/// can write.
fn check_module_file(path: &Path) -> Result<(), String> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path).map_err(|e| format!("module {}: {e}", path.display()))?;
    if !m.is_file() {
        return Err(format!("module {}: not a regular file", path.display()));
    }
    // SAFETY: geteuid has no preconditions.
    #[allow(unsafe_code)]
    let me = unsafe { libc::geteuid() };
    if m.uid() != 0 && m.uid() != me {
        return Err(format!(
            "module {}: owned by uid {}, not root or this user",
            path.display(),
            m.uid()
        ));
    }
    if m.mode() & 0o022 != 0 {
        return Err(format!(
            "module {}: writable by group or others",
            path.display()
        ));
    }
    Ok(())
}

fn read_pin(path: &Path) -> Result<AuthPin, Fail> {
    let err = |r: String| Fail::Denied(format!("PIN file {}: {r}", path.display()));
    let buf = crate::localfile::read_private(path, MAX_PIN, "a PIN file").map_err(err)?;
    let text = std::str::from_utf8(&buf).map_err(|_| err("not UTF-8".into()))?;
    let pin = text.trim_end_matches(['\n', '\r']);
    if pin.is_empty() {
        return Err(err("empty".into()));
    }
    Ok(AuthPin::from(pin))
}

/// One token: the module, how to find the token, the PIN, and the one session.
struct Token {
    ctx: Pkcs11,
    uri: Pkcs11Uri,
    pin: Option<AuthPin>,
    session: Mutex<Option<Session>>,
    /// When the call in progress started (ms since the first call), 0 when idle.
    busy_since: AtomicU64,
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
            Option<PathBuf>,
        );
        static TOKENS: OnceLock<Mutex<BTreeMap<Key, Arc<Token>>>> = OnceLock::new();
        let key = (
            uri.module_path.clone(),
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
            ctx: module(&uri.module_path)?,
            pin: uri.pin_source.as_deref().map(read_pin).transpose()?,
            uri: uri.clone(),
            session: Mutex::new(None),
            busy_since: AtomicU64::new(0),
        });
        map.insert(key, t.clone());
        Ok(t)
    }

    fn open(&self) -> Result<Session, CkError> {
        let mut found = None;
        for slot in self.ctx.get_slots_with_token()? {
            let info = self.ctx.get_token_info(slot)?;
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
                    // Two tokens answer to the name: refuse rather than pick one.
                    return Err(CkError::Pkcs11(
                        RvError::TokenNotRecognized,
                        cryptoki::context::Function::GetTokenInfo,
                    ));
                }
                found = Some(slot);
            }
        }
        let slot = found.ok_or(CkError::Pkcs11(
            RvError::TokenNotPresent,
            cryptoki::context::Function::GetSlotList,
        ))?;
        let session = self.ctx.open_ro_session(slot)?;
        if let Some(pin) = &self.pin {
            match session.login(UserType::User, Some(pin)) {
                Ok(()) | Err(CkError::Pkcs11(RvError::UserAlreadyLoggedIn, _)) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(session)
    }

    /// Runs `f` in the session, opening it first if needed, and once more in a fresh
    /// session after a session or device error.
    ///
    /// A call still running after [`CALL_TIMEOUT`] holds the session: later calls fail at
    /// once instead of queueing behind it (each would cost its caller the full timeout and
    /// a blocking thread).
    fn with<T>(&self, f: impl Fn(&Session) -> Result<T, CkError>) -> Result<T, Fail> {
        let since = self.busy_since.load(Ordering::Acquire);
        if since != 0 && now_ms().saturating_sub(since) > CALL_TIMEOUT.as_millis() as u64 {
            return Err(Fail::Unavailable(format!(
                "a call to the token has not returned for over {} s",
                CALL_TIMEOUT.as_secs()
            )));
        }
        let mut guard = self.session.lock().unwrap_or_else(|p| p.into_inner());
        self.busy_since.store(now_ms().max(1), Ordering::Release);
        let out = self.with_session(&mut guard, f).map_err(|e| classify(&e));
        self.busy_since.store(0, Ordering::Release);
        out
    }

    fn with_session<T>(
        &self,
        guard: &mut Option<Session>,
        f: impl Fn(&Session) -> Result<T, CkError>,
    ) -> Result<T, CkError> {
        for attempt in 0..2 {
            if guard.is_none() {
                match self.open() {
                    Ok(s) => *guard = Some(s),
                    Err(e) if attempt == 0 && reopens(&e) => continue,
                    Err(e) => return Err(e),
                }
            }
            let session = guard.as_ref().expect("opened just above");
            match f(session) {
                Err(e)
                    if attempt == 0
                        && reopens(&e)
                        && (self.pin.is_some()
                            || !matches!(e, CkError::Pkcs11(RvError::UserNotLoggedIn, _))) =>
                {
                    tracing::warn!(token = %self.uri.key_id(), error = %describe(&e), "PKCS#11 session lost; reopening");
                    *guard = None;
                }
                other => return other,
            }
        }
        Err(CkError::Pkcs11(
            RvError::SessionHandleInvalid,
            cryptoki::context::Function::OpenSession,
        ))
    }
}

/// Finds exactly one object of `class` matching the URI (none: `None`).
fn find_one(
    s: &Session,
    uri: &Pkcs11Uri,
    class: ObjectClass,
) -> Result<Option<ObjectHandle>, CkError> {
    let found = s.find_objects(&uri.object_template(class))?;
    match found.len() {
        0 => Ok(None),
        1 => Ok(found.first().copied()),
        _ => Err(CkError::Pkcs11(
            RvError::KeyHandleInvalid,
            cryptoki::context::Function::FindObjects,
        )),
    }
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
}

fn aad(ctx: &EncryptionContext) -> Vec<u8> {
    let mut a = WRAP_AAD.to_vec();
    encode_context(ctx, &mut a);
    a
}

/// Runs a token call on the blocking pool, bounded by [`CALL_TIMEOUT`].
async fn bounded<T: Send + 'static>(
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
    let out = match tokio::time::timeout(CALL_TIMEOUT, tokio::task::spawn_blocking(f)).await {
        Ok(Ok(r)) => r.map_err(named),
        Ok(Err(_)) => Err(named(Fail::Unavailable("token call panicked".into()))),
        Err(_) => Err(named(Fail::Unavailable(format!(
            "no answer from the token in {} s",
            CALL_TIMEOUT.as_secs()
        )))),
    };
    // Counted beside S3 and KMS on the metrics page (sealfs_requests_total{service="pkcs11"}).
    let outcome = match &out {
        Ok(_) => "ok",
        Err(e) if e.is_access_denied() => "denied",
        Err(e) if e.is_integrity() => "rejected",
        Err(_) => "unavailable",
    };
    crate::calls::record("pkcs11", op, outcome, start.elapsed());
    out
}

impl Pkcs11Key {
    /// Loads the module, opens (and logs in to) the token and finds the key: an AES secret
    /// key, or else an RSA key pair (its public half is enough to seal).
    pub async fn resolve(uri: &Pkcs11Uri) -> Result<Self, KeyError> {
        let id = uri.key_id();
        let u = Arc::new(uri.clone());
        let (token, kind) = bounded(&id, "open", {
            let u = u.clone();
            move || {
                let token = Token::get(&u)?;
                let kind = token
                    .with(|s| {
                        if let Some(h) = find_one(s, &u, ObjectClass::SECRET_KEY)? {
                            let attrs = s.get_attributes(h, &[AttributeType::KeyType, AttributeType::ValueLen])?;
                            let aes = attrs.iter().any(|a| matches!(a, Attribute::KeyType(t) if *t == KeyType::AES));
                            let len32 = attrs.iter().any(|a| matches!(a, Attribute::ValueLen(n) if u64::from(*n) == 32));
                            return Ok(Some(if aes && len32 { Ok(Kind::Aes) } else { Err("a secret key that is not AES-256") }));
                        }
                        let public = find_one(s, &u, ObjectClass::PUBLIC_KEY)?;
                        let private = find_one(s, &u, ObjectClass::PRIVATE_KEY)?;
                        match public.or(private) {
                            None => Ok(None),
                            Some(h) => {
                                let attrs = s.get_attributes(h, &[AttributeType::KeyType])?;
                                let rsa = attrs.iter().any(|a| matches!(a, Attribute::KeyType(t) if *t == KeyType::RSA));
                                Ok(Some(if rsa { Ok(Kind::Rsa) } else { Err("a key pair that is not RSA (EC keys sign: use --sign / --trust-signer)") }))
                            }
                        }
                    })
                    ?;
                match kind {
                    None => Err(Fail::Denied(
                        "the key is not in the token (destroyed, or not visible to this user: \
                         a private key needs pin-source=)"
                            .into(),
                    )),
                    Some(Err(why)) => Err(Fail::Denied(why.into())),
                    Some(Ok(k)) => Ok((token, k)),
                }
            }
        })
        .await?;
        Ok(Self {
            token,
            uri: u,
            id,
            kind,
        })
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    pub fn kind(&self) -> Kind {
        self.kind
    }

    /// Encrypts the DEK inside the token (see the module docs for the bytes).
    pub async fn wrap(&self, dek: &Dek, ctx: &EncryptionContext) -> Result<Vec<u8>, KeyError> {
        let (token, uri, kind) = (self.token.clone(), self.uri.clone(), self.kind);
        let aad = aad(ctx);
        // The DEK crosses to the blocking thread in a zeroized buffer.
        let plain = Zeroizing::new(*dek.expose());
        bounded(&self.id, "wrap", move || {
            let out = token.with(|s| match kind {
                Kind::Aes => {
                    let h = find_one(s, &uri, ObjectClass::SECRET_KEY)?.ok_or(CkError::Pkcs11(
                        RvError::KeyHandleInvalid,
                        cryptoki::context::Function::FindObjects,
                    ))?;
                    let mut iv = [0u8; 12];
                    random_bytes(&mut iv);
                    let params = GcmParams::new(&mut iv, &aad, 128.into())?;
                    let ct = s.encrypt(&Mechanism::AesGcm(params), h, &plain[..])?;
                    Ok([&[TAG_GCM][..], &iv, &ct].concat())
                }
                Kind::Rsa => {
                    let h = find_one(s, &uri, ObjectClass::PUBLIC_KEY)?.ok_or(CkError::Pkcs11(
                        RvError::KeyHandleInvalid,
                        cryptoki::context::Function::FindObjects,
                    ))?;
                    let label = crate::crypto::sha256(&aad);
                    match s.encrypt(
                        &Mechanism::RsaPkcsOaep(oaep(TAG_OAEP, &label)),
                        h,
                        &plain[..],
                    ) {
                        Ok(ct) => Ok([&[TAG_OAEP][..], &ct].concat()),
                        Err(CkError::Pkcs11(
                            RvError::ArgumentsBad | RvError::MechanismParamInvalid,
                            _,
                        )) => {
                            let ct = s.encrypt(
                                &Mechanism::RsaPkcsOaep(oaep(TAG_OAEP_SHA1, &label)),
                                h,
                                &plain[..],
                            )?;
                            Ok([&[TAG_OAEP_SHA1][..], &ct].concat())
                        }
                        Err(e) => Err(e),
                    }
                }
            });
            let out = out?;
            if kind == Kind::Aes && out.len() != GCM_WRAPPED {
                return Err(Fail::Unavailable(format!(
                    "token returned {} bytes for AES-GCM",
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
        let ok_shape = match (self.kind, wrapped.first()) {
            (Kind::Aes, Some(&TAG_GCM)) => wrapped.len() == GCM_WRAPPED,
            // 1024..=8192-bit moduli.
            (Kind::Rsa, Some(&(TAG_OAEP | TAG_OAEP_SHA1))) => (129..=1025).contains(&wrapped.len()),
            _ => false,
        };
        if !ok_shape {
            return Err(fail());
        }
        let (token, uri, kind) = (self.token.clone(), self.uri.clone(), self.kind);
        let aad = aad(ctx);
        let wrapped = wrapped.to_vec();
        let mut plain = bounded(&self.id, "unwrap", move || {
            token.with(|s| {
                let plain = match kind {
                    Kind::Aes => {
                        let h =
                            find_one(s, &uri, ObjectClass::SECRET_KEY)?.ok_or(CkError::Pkcs11(
                                RvError::KeyHandleInvalid,
                                cryptoki::context::Function::FindObjects,
                            ))?;
                        let mut iv = [0u8; 12];
                        iv.copy_from_slice(&wrapped[1..13]);
                        let params = GcmParams::new(&mut iv, &aad, 128.into())?;
                        s.decrypt(&Mechanism::AesGcm(params), h, &wrapped[13..])?
                    }
                    Kind::Rsa => {
                        let h =
                            find_one(s, &uri, ObjectClass::PRIVATE_KEY)?.ok_or(CkError::Pkcs11(
                                RvError::UserNotLoggedIn,
                                cryptoki::context::Function::FindObjects,
                            ))?;
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
    /// Finds the key pair's public half (no login needed) and returns the signer and its
    /// SubjectPublicKeyInfo DER. Signing later needs the private half (and the PIN).
    pub async fn resolve(uri: &Pkcs11Uri) -> Result<(Self, Vec<u8>), KeyError> {
        let id = uri.key_id();
        let u = Arc::new(uri.clone());
        let (token, spki) = bounded(&id, "public key", {
            let u = u.clone();
            move || {
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
                match point {
                    Some(pt) if p256 && pt.len() == 65 && pt[0] == 0x04 => {
                        Ok((token, [&P256_SPKI_PREFIX[..], &pt].concat()))
                    }
                    _ => Err(Fail::Denied("not an EC P-256 public key".into())),
                }
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
        bounded(&self.id, "sign", move || {
            token.with(|s| {
                let h = find_one(s, &uri, ObjectClass::PRIVATE_KEY)?.ok_or(CkError::Pkcs11(
                    RvError::UserNotLoggedIn,
                    cryptoki::context::Function::FindObjects,
                ))?;
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
        assert_eq!(u.pin_source, Some(PathBuf::from("/run/pin")));
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
    }
}
