//! `transit:[MOUNT/]NAME`: a key in a HashiCorp Vault or OpenBao Transit engine, the
//! company's own key manager ("hold your own key"). The key never leaves the server.
//!
//! Seal: `datakey/plaintext` (one per file) when Transit makes the DEK, `encrypt` when
//! another key made it. Open: `decrypt`. Rewrap to the same key (after `rotate`): `rewrap`,
//! so the DEK never leaves Transit. The file's encryption context, canonically encoded
//! (`"sealfs v1 transit" || context pairs`, as the header encodes them), is bound to every
//! wrapped DEK, so a blob moved to another file fails at Transit:
//!
//! - a **derived** key (`derived=true`, recommended) gets it as `context`: Transit derives a
//!   key per file from it, and its `rewrap` takes it too (native rewrap);
//! - a plain `aes256-gcm96` / `chacha20-poly1305` key gets it as `associated_data` (GCM AAD).
//!   Transit's `rewrap` has no `associated_data` (OpenBao 2.7.2 answers it with "cipher:
//!   message authentication failed"), so rewrapping such a key goes through decrypt and
//!   encrypt, the DEK in locked memory between the two. (`context` alone would be
//!   *silently ignored* by a non-derived key: no binding at all.)
//!
//! Which one a key gets is read once at start (`GET MOUNT/keys/NAME`, like KMS
//! DescribeKey): `derived` is fixed when a Transit key is created, so it never changes
//! under sealed files.
//!
//! Configuration is the standard client environment, each `BAO_X` or `VAULT_X` (the same
//! value if both are set): `ADDR`, `TOKEN` (else `TOKEN_FILE`, else `~/.vault-token`, the
//! file `bao login`/`vault login` write), `CACERT`, `CLIENT_CERT` + `CLIENT_KEY` (mutual
//! TLS), `NAMESPACE`. `http://` only to a loopback address (a local agent); anything else
//! is `https://` verified against `CACERT` or the system roots.
//!
//! One HTTP client per process, its connections reused. Every call has a connect timeout
//! and an overall timeout, and every response is read to a bound before it is parsed. The
//! token is a sensitive header value: never logged, never in an error.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine;
use bytes::Buf;
use http_body_util::Full;
use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::{Method, Request, StatusCode};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use zeroize::{Zeroize, Zeroizing};

use super::KeyError;
use crate::crypto::{secret::DEK_LEN, Dek};
use crate::format::header::encode_context;
use crate::format::EncryptionContext;

/// The mount a URI without one names (`bao secrets enable transit`).
pub const DEFAULT_MOUNT: &str = "transit";
/// TCP connect (and, with it, the wait for a server that is gone).
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// One whole call: connect, TLS, request, response body. A server that accepts and never
/// answers costs at most this, then the open fails (EIO) and the CLI prints one line.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(8);
/// Largest response read (a key's metadata lists every version; a wrap is ~400 bytes).
const MAX_RESPONSE: usize = 1 << 20;
/// Longest `vault:v<N>:<base64>` accepted in a slot or a response: a 32-byte DEK under
/// AES-GCM or ChaCha20-Poly1305 is `vault:vN:` + 80 base64 characters.
pub const MAX_CIPHERTEXT: usize = 256;
/// Longest token accepted (service tokens are ~100 characters, batch tokens a few hundred).
const MAX_TOKEN: usize = 4096;
/// Largest PEM file read (`CACERT` bundles, the client certificate chain and key).
const MAX_PEM: usize = 1 << 20;
const BINDING_LABEL: &[u8] = b"sealfs v1 transit";

/// `[MOUNT/]NAME` of a `transit:` URI: the mount path (default [`DEFAULT_MOUNT`]) and the
/// key name, each checked so that they go into a URL path as they are.
pub fn parse_spec(s: &str) -> Option<(String, String)> {
    let (mount, name) = match s.rsplit_once('/') {
        Some((m, n)) => (m, n),
        None => (DEFAULT_MOUNT, s),
    };
    (valid_name(name) && valid_path(mount)).then(|| (mount.to_string(), name.to_string()))
}

/// A Transit key name: what Transit itself accepts (`\w(([\w-.]+)?\w)?`).
fn valid_name(n: &str) -> bool {
    let word = |c: char| c.is_ascii_alphanumeric() || c == '_';
    n.len() <= 128
        && n.starts_with(word)
        && n.ends_with(word)
        && n.chars().all(|c| word(c) || c == '-' || c == '.')
}

/// A mount or namespace path: `/`-separated segments of `[A-Za-z0-9_.-]`, none empty, `.`
/// or `..`.
fn valid_path(p: &str) -> bool {
    p.len() <= 512
        && p.split('/').all(|seg| {
            !seg.is_empty()
                && seg != "."
                && seg != ".."
                && seg
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
        })
}

/// Checks a Transit ciphertext before it is sent or stored: `vault:v<version>:<base64>`,
/// at most [`MAX_CIPHERTEXT`] bytes.
pub fn valid_ciphertext(c: &[u8]) -> bool {
    if c.len() > MAX_CIPHERTEXT {
        return false;
    }
    let Some(rest) = c.strip_prefix(b"vault:v") else {
        return false;
    };
    let Some(colon) = rest.iter().position(|&b| b == b':') else {
        return false;
    };
    let (version, b64) = (&rest[..colon], &rest[colon + 1..]);
    let version_ok = (1..=10).contains(&version.len())
        && version.iter().all(u8::is_ascii_digit)
        && version[0] != b'0';
    let mut scratch = [0u8; MAX_CIPHERTEXT];
    version_ok
        && !b64.is_empty()
        && base64::engine::general_purpose::STANDARD
            .decode_slice(b64, &mut scratch)
            .is_ok()
}

fn config_err(msg: impl Into<String>) -> KeyError {
    KeyError::TransitConfig(msg.into())
}

/// `BAO_<x>` or `VAULT_<x>`; an empty value counts as unset; both set must agree.
fn env(suffix: &str) -> Result<Option<String>, KeyError> {
    let get = |p: &str| {
        let name = format!("{p}_{suffix}");
        let v = if crate::process::TOKEN_VARS.contains(&name.as_str()) {
            // Taken out of the environment at start (process::scrub_env).
            crate::process::token_var(&name).map(|t| t.to_string())
        } else {
            std::env::var(&name).ok()
        };
        v.filter(|v| !v.is_empty())
    };
    match (get("BAO"), get("VAULT")) {
        (Some(a), Some(b)) if a != b => {
            // Zeroized: one of them may be a token.
            let (mut a, mut b) = (a, b);
            a.zeroize();
            b.zeroize();
            Err(config_err(format!(
                "BAO_{suffix} and VAULT_{suffix} are both set, to different values: unset one"
            )))
        }
        (Some(a), other) => {
            if let Some(mut o) = other {
                o.zeroize();
            }
            Ok(Some(a))
        }
        (None, b) => Ok(b),
    }
}

/// Reads a local file named by the environment: one open without following a symlink, a
/// regular file, at most `max` bytes, and for secrets (token, client key) this user's with
/// mode 0600 as key files are (`localfile`).
fn read_file(
    what: &str,
    path: &Path,
    max: usize,
    private: bool,
) -> Result<Zeroizing<Vec<u8>>, KeyError> {
    crate::localfile::read_bounded(path, max, &format!("a {what}"), private)
        .map_err(|reason| config_err(format!("{what} {}: {reason}", path.display())))
}

/// Where the token came from: a file is read again when Transit refuses the token (an agent
/// rewrites its sink when it renews or re-authenticates).
#[derive(Clone)]
enum TokenSource {
    Env,
    File(PathBuf),
}

struct Token {
    header: HeaderValue,
    source: TokenSource,
}

fn token_header(raw: &[u8], from: &str) -> Result<HeaderValue, KeyError> {
    let t = raw.trim_ascii();
    if t.is_empty() || t.len() > MAX_TOKEN || !t.iter().all(|b| b.is_ascii_graphic()) {
        return Err(config_err(format!(
            "the token in {from} is empty, too long or not printable ASCII"
        )));
    }
    let mut h =
        HeaderValue::from_bytes(t).map_err(|_| config_err(format!("bad token in {from}")))?;
    h.set_sensitive(true);
    Ok(h)
}

fn load_token() -> Result<Token, KeyError> {
    if let Some(t) = env("TOKEN")? {
        let t = Zeroizing::new(t);
        return Ok(Token {
            header: token_header(t.as_bytes(), "BAO_TOKEN/VAULT_TOKEN")?,
            source: TokenSource::Env,
        });
    }
    let path =
        match env("TOKEN_FILE")? {
            Some(p) => PathBuf::from(p),
            None => match std::env::var_os("HOME") {
                Some(h) if Path::new(&h).join(".vault-token").exists() => {
                    Path::new(&h).join(".vault-token")
                }
                _ => return Err(config_err(
                    "no token: set BAO_TOKEN or VAULT_TOKEN, BAO_TOKEN_FILE or VAULT_TOKEN_FILE, \
                     or log in (~/.vault-token)",
                )),
            },
        };
    Ok(Token {
        header: read_token_file(&path)?,
        source: TokenSource::File(path),
    })
}

fn read_token_file(path: &Path) -> Result<HeaderValue, KeyError> {
    let raw = read_file("token file", path, MAX_TOKEN, true)?;
    token_header(&raw, &path.display().to_string())
}

fn pem_certs(
    what: &str,
    path: &Path,
) -> Result<Vec<rustls::pki_types::CertificateDer<'static>>, KeyError> {
    super::tls::pem_certs(what, path).map_err(config_err)
}

fn tls_config() -> Result<rustls::ClientConfig, KeyError> {
    if let Some(v) = env("SKIP_VERIFY")? {
        if !matches!(v.as_str(), "0" | "false" | "f" | "F" | "FALSE" | "False") {
            return Err(config_err(
                "BAO_SKIP_VERIFY/VAULT_SKIP_VERIFY is not honoured: give the server's CA with \
                 BAO_CACERT or VAULT_CACERT",
            ));
        }
    }
    if env("CAPATH")?.is_some() {
        return Err(config_err(
            "BAO_CAPATH/VAULT_CAPATH is not supported: give a PEM bundle with BAO_CACERT or \
             VAULT_CACERT",
        ));
    }
    let ca = env("CACERT")?;
    let roots = super::tls::roots(ca.as_deref().map(Path::new)).map_err(config_err)?;
    let builder = super::tls::client(roots).map_err(config_err)?;
    let config = match (env("CLIENT_CERT")?, env("CLIENT_KEY")?) {
        (Some(cert), Some(key)) => {
            use rustls::pki_types::pem::PemObject;
            let chain = pem_certs("client certificate file", Path::new(&cert))?;
            let pem = read_file("client key file", Path::new(&key), MAX_PEM, true)?;
            let key_der = rustls::pki_types::PrivateKeyDer::from_pem_slice(&pem)
                .map_err(|e| config_err(format!("client key file {key}: {e}")))?;
            builder
                .with_client_auth_cert(chain, key_der)
                .map_err(|e| config_err(format!("client certificate and key: {e}")))?
        }
        (None, None) => builder.with_no_client_auth(),
        _ => {
            return Err(config_err(
                "mutual TLS needs both BAO_CLIENT_CERT/VAULT_CLIENT_CERT and \
                 BAO_CLIENT_KEY/VAULT_CLIENT_KEY",
            ))
        }
    };
    Ok(config)
}

/// `http://` is allowed only to a loopback host (a local agent or a test server): the
/// token and, in `encrypt`/`decrypt`, DEKs travel in these requests.
fn check_addr(addr: &str) -> Result<String, KeyError> {
    if super::tls::has_userinfo(addr) {
        return Err(config_err(
            "BAO_ADDR/VAULT_ADDR: credentials in the URL are refused (they would reach every log line)",
        ));
    }
    let addr = addr.trim_end_matches('/');
    let uri: hyper::Uri = addr
        .parse()
        .map_err(|_| config_err(format!("BAO_ADDR/VAULT_ADDR {addr:?} is not a URL")))?;
    let host = uri.host().unwrap_or("");
    match uri.scheme_str() {
        Some("https") if !host.is_empty() => {}
        Some("http") => {
            let h = host.trim_start_matches('[').trim_end_matches(']');
            let loopback = h == "localhost"
                || h.parse::<std::net::IpAddr>()
                    .is_ok_and(|ip| ip.is_loopback());
            if !loopback {
                return Err(config_err(format!(
                    "BAO_ADDR/VAULT_ADDR {addr:?}: plain http only to a loopback address; \
                     use https://"
                )));
            }
        }
        _ => {
            return Err(config_err(format!(
                "BAO_ADDR/VAULT_ADDR {addr:?}: expected https://HOST[:PORT]"
            )))
        }
    }
    if uri.query().is_some() {
        return Err(config_err(format!(
            "BAO_ADDR/VAULT_ADDR {addr:?} has a query"
        )));
    }
    Ok(addr.to_string())
}

/// A request body zeroized when hyper drops it: an `encrypt` body holds a DEK in base64.
/// (Copies hyper and rustls make on the way out are theirs, as with the AWS SDK.)
struct SecretBuf {
    bytes: Zeroizing<Vec<u8>>,
    pos: usize,
}

impl Buf for SecretBuf {
    fn remaining(&self) -> usize {
        self.bytes.len() - self.pos
    }
    fn chunk(&self) -> &[u8] {
        &self.bytes[self.pos..]
    }
    fn advance(&mut self, cnt: usize) {
        assert!(cnt <= self.remaining(), "BUG: advance past the end");
        self.pos += cnt;
    }
}

type HttpClient = Client<HttpsConnector<HttpConnector>, Full<SecretBuf>>;

/// The process's connection to Transit: one client (connection pool), the token, the
/// namespace.
pub struct Transit {
    client: HttpClient,
    addr: String,
    token: Mutex<Token>,
    namespace: Option<String>,
    /// Key id → binding, so a key named twice (`rewrap --key K --to-key K`) is read once.
    bindings: Mutex<std::collections::BTreeMap<String, Binding>>,
}

static SHARED: Mutex<Option<Arc<Transit>>> = Mutex::new(None);

/// The process's one Transit client, made from the environment on first use.
pub fn shared() -> Result<Arc<Transit>, KeyError> {
    let mut s = lock(&SHARED);
    if let Some(t) = s.as_ref() {
        return Ok(t.clone());
    }
    let t = Arc::new(Transit::from_env()?);
    *s = Some(t.clone());
    Ok(t)
}

/// What a call returned, before classification.
enum Failure {
    Status(StatusCode, String),
    Timeout,
    Transport(String),
}

impl Transit {
    fn from_env() -> Result<Self, KeyError> {
        let addr = env("ADDR")?
            .ok_or_else(|| config_err("set BAO_ADDR or VAULT_ADDR to the server's URL"))?;
        let addr = check_addr(&addr)?;
        let namespace = match env("NAMESPACE")? {
            Some(ns) => {
                let ns = ns.trim_matches('/').to_string();
                if !valid_path(&ns) {
                    return Err(config_err(format!(
                        "BAO_NAMESPACE/VAULT_NAMESPACE {ns:?}: expected NAME[/NAME…]"
                    )));
                }
                Some(ns)
            }
            None => None,
        };
        let tls = tls_config()?;
        let token = load_token()?;
        let client = super::tls::https_client(tls, CONNECT_TIMEOUT, Duration::from_secs(60));
        Ok(Self {
            client,
            addr,
            token: Mutex::new(token),
            namespace,
            bindings: Mutex::default(),
        })
    }

    /// The key's path prefix as Transit names it cluster-wide: namespace and mount.
    fn qualified(&self, mount: &str) -> String {
        match &self.namespace {
            Some(ns) => format!("{ns}/{mount}"),
            None => mount.to_string(),
        }
    }

    fn token(&self) -> (HeaderValue, TokenSource) {
        let t = lock(&self.token);
        (t.header.clone(), t.source.clone())
    }

    /// One call to `path` (below `/v1/`), counted as `transit`/`op`; the answer's `data`
    /// member parsed as `T`, from its zeroized buffer (a parse error never quotes it: see
    /// [`super::json_error`]). A refused token that came from a file is read again and, if the
    /// file now holds another, tried once more.
    async fn call<T: serde::de::DeserializeOwned>(
        &self,
        op: &'static str,
        key: &str,
        method: Method,
        path: &str,
        body: Option<Zeroizing<Vec<u8>>>,
    ) -> Result<T, KeyError> {
        let (token, source) = self.token();
        let mut r = self
            .call_once(op, key, &method, path, body.clone(), token.clone())
            .await;
        if let (Err(Failure::Status(StatusCode::FORBIDDEN, _)), TokenSource::File(p)) =
            (&r, &source)
        {
            if let Ok(fresh) = read_token_file(p) {
                if fresh != token {
                    tracing::info!(file = %p.display(), "transit token file changed; retrying with it");
                    lock(&self.token).header = fresh.clone();
                    r = self.call_once(op, key, &method, path, body, fresh).await;
                }
            }
        }
        let out = r.map_err(|f| classify(op, key, f))?;
        serde_json::from_slice::<Envelope<T>>(&out)
            .map(|e| e.data)
            .map_err(|e| KeyError::TransitUnavailable {
                op,
                key: key.to_string(),
                message: super::json_error(&e),
            })
    }

    async fn call_once(
        &self,
        op: &'static str,
        key: &str,
        method: &Method,
        path: &str,
        body: Option<Zeroizing<Vec<u8>>>,
        token: HeaderValue,
    ) -> Result<Zeroizing<Vec<u8>>, Failure> {
        let start = Instant::now();
        let r = tokio::time::timeout(CALL_TIMEOUT, self.exchange(method, path, body, token)).await;
        let r = r.unwrap_or(Err(Failure::Timeout));
        let outcome = match &r {
            Ok(_) => "ok",
            Err(Failure::Timeout) => "timeout",
            Err(Failure::Transport(_)) => "network",
            Err(Failure::Status(s, m)) => status_outcome(*s, m),
        };
        crate::calls::record("transit", op, outcome, start.elapsed());
        tracing::debug!(op, key, outcome, "transit call");
        r
    }

    async fn exchange(
        &self,
        method: &Method,
        path: &str,
        body: Option<Zeroizing<Vec<u8>>>,
        token: HeaderValue,
    ) -> Result<Zeroizing<Vec<u8>>, Failure> {
        let mut req = Request::builder()
            .method(method.clone())
            .uri(format!("{}/v1/{path}", self.addr))
            .header("X-Vault-Token", token)
            // Vault Agent / OpenBao proxy require it on proxied requests (SSRF guard).
            .header("X-Vault-Request", "true");
        if let Some(ns) = &self.namespace {
            req = req.header("X-Vault-Namespace", ns.as_str());
        }
        if body.is_some() {
            req = req.header(CONTENT_TYPE, "application/json");
        }
        let req = req
            .body(Full::new(SecretBuf {
                bytes: body.unwrap_or_default(),
                pos: 0,
            }))
            .map_err(|e| Failure::Transport(format!("bad request: {e}")))?;
        let (status, _, out) = super::tls::round_trip(&self.client, req, MAX_RESPONSE)
            .await
            .map_err(|e| match e {
                super::tls::BodyError::TooLong => {
                    Failure::Transport(format!("response longer than {MAX_RESPONSE} bytes"))
                }
                super::tls::BodyError::Transport(m) => Failure::Transport(m),
            })?;
        if status.is_success() {
            Ok(out)
        } else {
            Err(Failure::Status(status, error_text(&out)))
        }
    }
}

/// Transit's `{"errors": [...]}`, escaped and cut: it ends up in log lines.
fn error_text(body: &[u8]) -> String {
    #[derive(serde::Deserialize)]
    struct Errors {
        #[serde(default)]
        errors: Vec<String>,
    }
    let text = match serde_json::from_slice::<Errors>(body) {
        Ok(e) if !e.errors.is_empty() => e.errors.join("; "),
        _ => String::from_utf8_lossy(&body[..body.len().min(256)]).into_owned(),
    };
    crate::format::naming::printable(&text, 256)
}

/// The `outcome` metric label of a refused call.
fn status_outcome(s: StatusCode, msg: &str) -> &'static str {
    match s.as_u16() {
        403 => "denied",
        400 if msg.contains("disallowed by policy") => "denied",
        404 => "not_found",
        400 if msg.contains("encryption key not found") => "not_found",
        429 => "throttled",
        _ => "error",
    }
}

/// Maps a failed call onto a key error: 403 (and a version retired by
/// `min_decryption_version`) → denied; no such key or mount → not found (both EACCES,
/// exit 4); a ciphertext that does not authenticate → integrity (EIO, exit 3); everything
/// else (5xx, sealed, rate limits, transport, timeouts) → unavailable (EIO, exit 1).
fn classify(op: &'static str, key: &str, f: Failure) -> KeyError {
    let key = key.to_string();
    match f {
        Failure::Timeout => KeyError::TransitUnavailable {
            op,
            key,
            message: format!("no answer within {} s", CALL_TIMEOUT.as_secs()),
        },
        Failure::Transport(message) => KeyError::TransitUnavailable { op, key, message },
        Failure::Status(s, message) => match status_outcome(s, &message) {
            "denied" => KeyError::TransitDenied { op, key, message },
            "not_found" => KeyError::TransitNotFound { op, key },
            _ if s == StatusCode::BAD_REQUEST
                && (message.contains("message authentication failed")
                    || message.contains("invalid ciphertext")
                    || message.contains("illegal base64")) =>
            {
                KeyError::TransitInvalidCiphertext { op, key }
            }
            _ => KeyError::TransitUnavailable {
                op,
                key,
                message: format!("HTTP {}: {message}", s.as_u16()),
            },
        },
    }
}

/// How the encryption context is bound (module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Binding {
    /// A derived key: `context`.
    Context,
    /// A non-derived AEAD key: `associated_data`.
    AssociatedData,
}

impl Binding {
    /// `,"context":"…"` or `,"associated_data":"…"` for `ctx`.
    fn field(self, ctx: &EncryptionContext) -> Vec<u8> {
        let mut bytes = BINDING_LABEL.to_vec();
        encode_context(ctx, &mut bytes);
        let mut out = match self {
            Binding::Context => b",\"context\":\"".to_vec(),
            Binding::AssociatedData => b",\"associated_data\":\"".to_vec(),
        };
        out.extend_from_slice(b64().encode(&bytes).as_bytes());
        out.push(b'"');
        out
    }

    /// `{<fields><binding>}`, in a zeroized buffer sized up front so that no reallocation
    /// leaves a copy of a DEK behind (`fields` may hold one in base64).
    fn body(self, ctx: &EncryptionContext, fields: &[&[u8]]) -> Zeroizing<Vec<u8>> {
        let binding = self.field(ctx);
        let len = 2 + binding.len() + fields.iter().map(|f| f.len()).sum::<usize>();
        let mut b = Zeroizing::new(Vec::with_capacity(len));
        b.push(b'{');
        for f in fields {
            b.extend_from_slice(f);
        }
        b.extend_from_slice(&binding);
        b.push(b'}');
        b
    }
}

/// A Transit key, checked once at start.
pub struct TransitKey {
    transit: Arc<Transit>,
    /// `MOUNT/NAME` below `/v1/` (the namespace travels as a header).
    mount: String,
    name: String,
    /// `transit:[NAMESPACE/]MOUNT/NAME`: what slots record and match on. It names the key,
    /// not the server, so a replica or a failover cluster opens the same files.
    id: String,
    binding: Binding,
}

/// Key types whose `associated_data`/`context` sealfs can bind and that wrap a 256-bit DEK
/// under a 256-bit key.
const KEY_TYPES: [&str; 2] = ["aes256-gcm96", "chacha20-poly1305"];

#[derive(serde::Deserialize)]
struct Envelope<T> {
    data: T,
}

#[derive(serde::Deserialize)]
struct KeyInfo {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    derived: bool,
    #[serde(default)]
    supports_encryption: bool,
    #[serde(default)]
    supports_decryption: bool,
}

#[derive(serde::Deserialize)]
struct CiphertextData {
    ciphertext: String,
}

/// A base64 DEK in a response, zeroized on drop.
struct SecretString(String);

impl Drop for SecretString {
    fn drop(&mut self) {
        self.0.zeroize();
    }
}

impl<'de> serde::Deserialize<'de> for SecretString {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d).map(SecretString)
    }
}

#[derive(serde::Deserialize)]
struct PlaintextData {
    plaintext: SecretString,
    #[serde(default)]
    ciphertext: Option<String>,
}

fn b64() -> base64::engine::GeneralPurpose {
    base64::engine::general_purpose::STANDARD
}

/// `GET MOUNT/keys/NAME`: the key must exist and be an AEAD key that encrypts and
/// decrypts; `derived` picks the binding.
async fn read_binding(transit: &Transit, id: &str, path: &str) -> Result<Binding, KeyError> {
    let info: KeyInfo = transit.call("read", id, Method::GET, path, None).await?;
    let unsuitable = |reason: String| KeyError::TransitKeyUnsuitable {
        key: id.to_string(),
        reason,
    };
    if !KEY_TYPES.contains(&info.kind.as_str()) {
        return Err(unsuitable(format!(
            "type {} (sealfs needs {})",
            crate::format::naming::printable(&info.kind, 64),
            KEY_TYPES.join(" or ")
        )));
    }
    if !info.supports_encryption || !info.supports_decryption {
        return Err(unsuitable("it does not both encrypt and decrypt".into()));
    }
    Ok(if info.derived {
        Binding::Context
    } else {
        Binding::AssociatedData
    })
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl TransitKey {
    /// Reads the key's metadata (`GET MOUNT/keys/NAME`): it must exist, be an AEAD key
    /// that encrypts and decrypts; `derived` picks the binding.
    pub async fn resolve(transit: Arc<Transit>, mount: &str, name: &str) -> Result<Self, KeyError> {
        let id = format!("transit:{}/{name}", transit.qualified(mount));
        let known = lock(&transit.bindings).get(&id).copied();
        let binding = match known {
            Some(b) => b,
            None => {
                let b = read_binding(&transit, &id, &format!("{mount}/keys/{name}")).await?;
                lock(&transit.bindings).insert(id.clone(), b);
                b
            }
        };
        Ok(Self {
            transit,
            mount: mount.to_string(),
            name: name.to_string(),
            id,
            binding,
        })
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    /// True when Transit can rewrap this key's ciphertexts itself with the context bound
    /// (derived keys: `rewrap` takes `context`, not `associated_data`).
    pub fn has_native_rewrap(&self) -> bool {
        self.binding == Binding::Context
    }

    /// `{"ciphertext":"…",<binding>}` for a slot, or the slot refused without a call when it
    /// is not a Transit ciphertext ([`valid_ciphertext`]).
    fn ciphertext_body(
        &self,
        op: &'static str,
        wrapped: &[u8],
        ctx: &EncryptionContext,
    ) -> Result<Zeroizing<Vec<u8>>, KeyError> {
        if !valid_ciphertext(wrapped) {
            return Err(self.invalid(op));
        }
        Ok(self
            .binding
            .body(ctx, &[b"\"ciphertext\":\"", wrapped, b"\""]))
    }

    /// `POST MOUNT/<route>/NAME` with `body`; the answer's `data`.
    async fn post<T: serde::de::DeserializeOwned>(
        &self,
        op: &'static str,
        route: &str,
        body: Zeroizing<Vec<u8>>,
    ) -> Result<T, KeyError> {
        let path = format!("{}/{route}/{}", self.mount, self.name);
        self.transit
            .call(op, &self.id, Method::POST, &path, Some(body))
            .await
    }

    fn unavailable(&self, op: &'static str, message: impl Into<String>) -> KeyError {
        KeyError::TransitUnavailable {
            op,
            key: self.id.clone(),
            message: message.into(),
        }
    }

    fn invalid(&self, op: &'static str) -> KeyError {
        KeyError::TransitInvalidCiphertext {
            op,
            key: self.id.clone(),
        }
    }

    /// A ciphertext from a response, checked like one from a slot.
    fn take_ciphertext(&self, op: &'static str, c: String) -> Result<Vec<u8>, KeyError> {
        if valid_ciphertext(c.as_bytes()) {
            Ok(c.into_bytes())
        } else {
            Err(self.unavailable(
                op,
                "the answer holds no valid vault:v<N>:<base64> ciphertext",
            ))
        }
    }

    /// A fresh DEK from Transit (`datakey/plaintext`) and its wrapped copy.
    pub async fn generate_data_key(
        &self,
        ctx: &EncryptionContext,
    ) -> Result<(Dek, Vec<u8>), KeyError> {
        const OP: &str = "datakey";
        let body = self.binding.body(ctx, &[b"\"bits\":256"]);
        let data: PlaintextData = self.post(OP, "datakey/plaintext", body).await?;
        let dek = dek_from_base64(&data.plaintext.0)
            .ok_or_else(|| self.unavailable(OP, "the answer lacks a 32-byte key"))??;
        let wrapped = data.ciphertext.clone().unwrap_or_default();
        Ok((dek, self.take_ciphertext(OP, wrapped)?))
    }

    /// Wraps a DEK made elsewhere (`encrypt`).
    pub async fn encrypt(&self, dek: &Dek, ctx: &EncryptionContext) -> Result<Vec<u8>, KeyError> {
        const OP: &str = "encrypt";
        let mut enc = Zeroizing::new([0u8; 64]);
        let n = b64()
            .encode_slice(dek.expose(), &mut enc[..])
            .expect("44 base64 characters fit in 64 bytes");
        let body = self
            .binding
            .body(ctx, &[b"\"plaintext\":\"", &enc[..n], b"\""]);
        let data: CiphertextData = self.post(OP, "encrypt", body).await?;
        self.take_ciphertext(OP, data.ciphertext)
    }

    /// Unwraps a slot (`decrypt`). A slot that is not a Transit ciphertext is refused here,
    /// without a call.
    pub async fn decrypt(&self, wrapped: &[u8], ctx: &EncryptionContext) -> Result<Dek, KeyError> {
        const OP: &str = "decrypt";
        let body = self.ciphertext_body(OP, wrapped, ctx)?;
        let data: PlaintextData = self.post(OP, "decrypt", body).await?;
        // Something else encrypted under this key and context is not a DEK.
        dek_from_base64(&data.plaintext.0)
            .ok_or_else(|| self.invalid(OP))?
            .map_err(KeyError::from)
    }

    /// Re-encrypts a slot under the key's latest version inside Transit (`rewrap`): the DEK
    /// never leaves it. Derived keys only ([`Self::has_native_rewrap`]).
    pub async fn rewrap(
        &self,
        wrapped: &[u8],
        ctx: &EncryptionContext,
    ) -> Result<Vec<u8>, KeyError> {
        const OP: &str = "rewrap";
        assert!(
            self.has_native_rewrap(),
            "BUG: native rewrap of a non-derived Transit key"
        );
        let body = self.ciphertext_body(OP, wrapped, ctx)?;
        let data: CiphertextData = self.post(OP, "rewrap", body).await?;
        self.take_ciphertext(OP, data.ciphertext)
    }
}

/// Exactly 32 bytes of standard base64, decoded into locked memory.
fn dek_from_base64(s: &str) -> Option<Result<Dek, crate::crypto::LockError>> {
    let mut buf = Zeroizing::new([0u8; 48]);
    let n = b64().decode_slice(s.as_bytes(), &mut buf[..]).ok()?;
    (n == DEK_LEN).then(|| Dek::from_slice_zeroizing(&mut buf[..DEK_LEN]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uri_forms() {
        assert_eq!(
            parse_spec("models"),
            Some(("transit".into(), "models".into()))
        );
        assert_eq!(
            parse_spec("kms/models-prod"),
            Some(("kms".into(), "models-prod".into()))
        );
        assert_eq!(parse_spec("a/b/k.v1"), Some(("a/b".into(), "k.v1".into())));
        for bad in [
            "", "/k", "m/", "m//k", "../k", "m/..", "k?x=1", "k name", "m/-k", "m/k-", "é",
        ] {
            assert_eq!(parse_spec(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn ciphertext_shape() {
        let ok = format!("vault:v12:{}", b64().encode([7u8; 60]));
        assert!(valid_ciphertext(ok.as_bytes()));
        for bad in [
            "vault:v0:AAAA".to_string(),
            "vault:v:AAAA".into(),
            "vault:v1:".into(),
            "vault:v1:AA=A".into(),
            "vault:v1:AAAA\"}".into(),
            "vault:v01:AAAA".into(),
            "vault:v12345678901:AAAA".into(),
            "vault:vx:AAAA".into(),
            "VAULT:v1:AAAA".into(),
            format!("vault:v1:{}", "A".repeat(MAX_CIPHERTEXT)),
        ] {
            assert!(!valid_ciphertext(bad.as_bytes()), "{bad:?}");
        }
    }

    #[test]
    fn plain_http_only_to_loopback() {
        for ok in [
            "http://127.0.0.1:8200",
            "http://localhost:8200/",
            "http://[::1]:8200",
            "https://bao.example:8200",
        ] {
            assert!(check_addr(ok).is_ok(), "{ok}");
        }
        for bad in [
            "http://10.0.0.1:8200",
            "http://bao.example",
            "ftp://x",
            "bao.example:8200",
            "https://",
            "https://user:secret-pass@bao.example:8200",
            "http://user:secret-pass@127.0.0.1:8200",
        ] {
            let e = check_addr(bad).unwrap_err().to_string();
            assert!(!e.contains("secret"), "credentials echoed: {e}");
        }
        assert_eq!(check_addr("https://b:1/").unwrap(), "https://b:1");
    }

    #[test]
    fn errors_are_classified() {
        let c = |s: u16, m: &str| {
            classify(
                "decrypt",
                "transit:t/k",
                Failure::Status(StatusCode::from_u16(s).unwrap(), m.into()),
            )
        };
        assert!(c(403, "permission denied").is_access_denied());
        assert!(c(400, "encryption key not found").is_access_denied());
        assert!(c(404, "no handler for route").is_access_denied());
        assert!(c(
            400,
            "ciphertext or signature version is disallowed by policy (too old)"
        )
        .is_access_denied());
        assert!(c(400, "cipher: message authentication failed").is_integrity());
        assert!(c(400, "invalid ciphertext: version is too new").is_integrity());
        for (s, m) in [
            (500, "internal"),
            (503, "Vault is sealed"),
            (429, "rate limit"),
            (400, "other"),
        ] {
            let e = c(s, m);
            assert!(!e.is_access_denied() && !e.is_integrity(), "{s} {m}: {e}");
        }
        let t = classify("decrypt", "k", Failure::Timeout);
        assert!(!t.is_access_denied() && !t.is_integrity());
    }

    #[test]
    fn request_bodies_are_json_with_the_binding_and_never_reallocate() {
        let ctx = EncryptionContext::from([
            ("sealfs:path".to_string(), "sub/".repeat(300) + "model.bin"),
            ("team".to_string(), "ml \"infra\"".to_string()),
        ]);
        let mut bound = BINDING_LABEL.to_vec();
        encode_context(&ctx, &mut bound);
        let dek = b64().encode([9u8; 32]);
        for (binding, member) in [
            (Binding::Context, "context"),
            (Binding::AssociatedData, "associated_data"),
        ] {
            let body = binding.body(&ctx, &[b"\"plaintext\":\"", dek.as_bytes(), b"\""]);
            assert_eq!(body.capacity(), body.len(), "{member}: the buffer grew");
            let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
            assert_eq!(v["plaintext"], dek.as_str(), "{member}");
            assert_eq!(v[member], b64().encode(&bound), "{member}");
            assert_eq!(v.as_object().unwrap().len(), 2, "{member}: {v}");
            let v: serde_json::Value =
                serde_json::from_slice(&binding.body(&ctx, &[b"\"bits\":256"])).unwrap();
            assert_eq!(v["bits"], 256, "{member}");
            assert!(v[member].is_string(), "{member}");
        }
    }

    #[test]
    fn dek_must_be_32_bytes() {
        assert!(dek_from_base64(&b64().encode([1u8; 32])).is_some());
        assert!(dek_from_base64(&b64().encode([1u8; 31])).is_none());
        assert!(dek_from_base64(&b64().encode([1u8; 33])).is_none());
        assert!(dek_from_base64("not base64!").is_none());
    }
}
