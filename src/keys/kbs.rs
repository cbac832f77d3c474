//! `kbs:///REPO/TYPE/TAG` keys: a KEK released by a Confidential Containers Key Broker
//! Service (Trustee KBS) only to a workload that attested.
//!
//! The resource holds a key file's exact content (what `sealfs keygen` writes), so the
//! released KEK opens exactly the slots that key file opens ([`FileKek`]); DEKs then unwrap
//! locally, as under `file:`. Two ways to it:
//! - `SEALFS_KBS_URL`: the RCAR exchange itself (trustee `kbs/docs/kbs_attestation_protocol.md`,
//!   protocol 0.4.0): `POST /kbs/v0/auth` (TEE type) → nonce and the `kbs-session-id`
//!   cookie; `POST /kbs/v0/attest` with a fresh TEE key ([`TeeKey`]) and evidence whose
//!   report data is SHA-384 of the RFC 8785 JSON of `{additional-evidence, nonce, tee-pubkey}`
//!   → an attestation token (EAR JWT); `GET /kbs/v0/resource/PATH` with the token as bearer
//!   → a JWE to the TEE key ([`super::jwe`]). Token and TEE key are reused until the token
//!   expires (several `kbs:` keys of one command share one attestation); each
//!   `--revalidate` round attests afresh, once per KEK (not once per DEK: DEKs unwrap
//!   locally under the released key).
//! - `SEALFS_CDH_URL`: the Confidential Data Hub of a CoCo pod, `GET /cdh/resource/PATH`; the
//!   CDH attests itself and answers the plaintext resource (on its loopback).
//!
//! Everything either answers is hostile: bodies bounded, JSON strict, redirects not
//! followed, every call under a timeout. A refusal (401/403/404: policy denied, attestation
//! failed, resource gone) is [`KeyError::KbsDenied`] (EACCES, exit 4; a revalidation revokes
//! on it); no answer (network, 5xx, timeout) is [`KeyError::KbsUnavailable`] (an outage,
//! bounded by `--revalidate-max-outage`). Every release is an audit event with the
//! attestation transcript; `--attestation-log DIR` also keeps each token and evidence.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http_body_util::Full;
use hyper::header::{HeaderValue, AUTHORIZATION, CONTENT_TYPE, COOKIE, SET_COOKIE};
use hyper::{Method, Request, StatusCode};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use zeroize::Zeroizing;

use super::attester::Attester;
use super::file::FileKek;
use super::jwe::{Plaintext, TeeKey};
use super::KeyError;
use crate::format::naming::printable;

/// The KBS protocol version sealfs speaks (kbs-types 0.18 / trustee 0.4.0).
const PROTOCOL_VERSION: &str = "0.4.0";
const CONNECT_TIMEOUT: Duration = super::transit::CONNECT_TIMEOUT;
/// Attesting with real hardware takes a quote from the TEE: more than a Transit call.
const CALL_TIMEOUT: Duration = Duration::from_secs(15);
/// The most any KBS or CDH answer may hold (a token with its certificate chain is ~3 KiB).
const MAX_ANSWER: usize = 64 * 1024;
/// A resource is a key file.
const MAX_RESOURCE: usize = super::file::MAX_KEY_FILE;
/// The most an attestation token may hold (a JWT with its certificate chain: ~3 KiB).
const MAX_TOKEN: usize = 32 * 1024;
/// A token is reused until this long before it expires.
const TOKEN_MARGIN: Duration = Duration::from_secs(15);

/// `kbs:///REPO/TYPE/TAG` (the form CoCo uses; the KBS comes from the environment): the
/// three-part resource path, each part `[A-Za-z0-9._-]`, not `.` or `..`.
pub fn parse_spec(rest: &str) -> Option<String> {
    let path = rest.strip_prefix("///")?;
    let parts: Vec<&str> = path.split('/').collect();
    let ok = |p: &&str| {
        !p.is_empty()
            && p.len() <= 128
            && *p != "."
            && *p != ".."
            && p.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
    };
    (parts.len() == 3 && parts.iter().all(ok)).then(|| path.to_string())
}

fn config_err(msg: impl Into<String>) -> KeyError {
    KeyError::KbsConfig(msg.into())
}

/// `--attestation-log DIR`, opened once (set once, by the CLI): files are created through
/// this descriptor (`/proc/self/fd/N/NAME`), so renaming a parent later redirects nothing.
static ATTESTATION_LOG: OnceLock<std::fs::File> = OnceLock::new();

/// Opens `dir` without following a symlink, checks the open directory (this user's, mode
/// 0700 or tighter) and keeps it.
pub fn set_attestation_log(dir: &Path) -> Result<(), KeyError> {
    use std::os::unix::fs::MetadataExt;
    let bad = |why: String| config_err(format!("--attestation-log {}: {why}", dir.display()));
    // A trailing `/` would make the kernel follow a final symlink: refuse the form.
    if dir.as_os_str().as_encoded_bytes().ends_with(b"/") && dir != Path::new("/") {
        return Err(bad("give the directory without a trailing /".into()));
    }
    // (For the message only: the open below refuses a link either way, as ENOTDIR.)
    if std::fs::symlink_metadata(dir).is_ok_and(|m| m.file_type().is_symlink()) {
        return Err(bad("a symbolic link".into()));
    }
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(dir)
        .map_err(|e| match e.raw_os_error() {
            Some(libc::ELOOP) => bad("a symbolic link".into()),
            Some(libc::ENOTDIR) => bad("not a directory".into()),
            _ => bad(e.to_string()),
        })?;
    let m = f.metadata().map_err(|e| bad(e.to_string()))?;
    let uid = crate::localfile::euid();
    if m.uid() != uid {
        return Err(bad(format!("owned by uid {}, not this user", m.uid())));
    }
    if m.mode() & 0o077 != 0 {
        return Err(bad(format!(
            "mode {:04o} gives group or others access: chmod 0700",
            m.mode() & 0o7777
        )));
    }
    let _ = ATTESTATION_LOG.set(f);
    Ok(())
}

/// What one release showed, for the audit log (the token only as a digest; `--attestation-log`
/// alone keeps the token itself, a credential until its `exp`, for auditors).
#[derive(Debug, Clone, Default)]
pub struct Transcript {
    /// The KBS URL, or `cdh:URL`.
    pub broker: String,
    pub resource: String,
    pub tee: String,
    /// The token's `iss` and each submodule's EAR appraisal (`cpu0=affirming`), as the KBS
    /// wrote them (its own token: the KBS checks it, sealfs only records it).
    pub issuer: String,
    pub status: String,
    pub expires: u64,
    pub token_sha256: String,
    pub evidence_sha256: String,
}

impl Transcript {
    fn log(&self) {
        tracing::info!(
            target: "sealfs::audit",
            broker = %self.broker,
            resource = %self.resource,
            tee = %self.tee,
            issuer = %self.issuer,
            status = %self.status,
            token_expires = self.expires,
            token_sha256 = %self.token_sha256,
            evidence_sha256 = %self.evidence_sha256,
            host = crate::telemetry::hostname(),
            "kek released by the key broker"
        );
        if self.tee == "sample" {
            tracing::warn!(resource = %self.resource, "released on sample evidence (no hardware): tests and demos only");
        }
    }
}

type HttpClient = Client<HttpsConnector<HttpConnector>, Full<Bytes>>;

/// An attested session: the TEE key the token binds, reused until the token expires.
struct Session {
    key: TeeKey,
    token: Zeroizing<String>,
    valid_until: SystemTime,
    transcript: Transcript,
}

enum Kind {
    Kbs {
        attester: Attester,
        session: Box<tokio::sync::Mutex<Option<Session>>>,
    },
    Cdh,
}

/// The process's one key broker (a KBS, or the pod's CDH), from the environment.
pub struct Broker {
    client: HttpClient,
    base: String,
    kind: Kind,
}

static SHARED: Mutex<Option<Arc<Broker>>> = Mutex::new(None);

pub fn shared() -> Result<Arc<Broker>, KeyError> {
    let mut s = SHARED.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(b) = s.as_ref() {
        return Ok(b.clone());
    }
    let b = Arc::new(Broker::from_env()?);
    *s = Some(b.clone());
    Ok(b)
}

/// `https://`, or plain `http://` to loopback only (a local KBS, the pod's CDH).
fn check_url(var: &str, url: &str) -> Result<String, KeyError> {
    if super::tls::has_userinfo(url) {
        return Err(config_err(format!(
            "{var}: credentials in the URL are refused (they would reach every log line)"
        )));
    }
    let url = url.trim_end_matches('/');
    let uri: hyper::Uri = url
        .parse()
        .map_err(|_| config_err(format!("{var} {:?} is not a URL", printable(url, 128))))?;
    let host = uri.host().unwrap_or("");
    let loopback = {
        let h = host.trim_start_matches('[').trim_end_matches(']');
        // An IP literal only: `localhost` is whatever name resolution says.
        h.parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
    };
    match uri.scheme_str() {
        Some("https") if !host.is_empty() => {}
        Some("http") if loopback => {}
        Some("http") => {
            return Err(config_err(format!(
                "{var} {url:?}: plain http only to a loopback address; use https://"
            )))
        }
        _ => {
            return Err(config_err(format!(
                "{var} {url:?}: expected https://HOST[:PORT]"
            )))
        }
    }
    if uri.query().is_some() || !uri.path().trim_end_matches('/').is_empty() {
        return Err(config_err(format!(
            "{var} {url:?}: give the server's root URL, without a path or query"
        )));
    }
    Ok(url.to_string())
}

fn tls_config() -> Result<rustls::ClientConfig, KeyError> {
    let ca = std::env::var_os("SEALFS_KBS_CACERT")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from);
    let roots = super::tls::roots(ca.as_deref())
        .map_err(|e| config_err(format!("SEALFS_KBS_CACERT: {e}")))?;
    Ok(super::tls::client(roots)
        .map_err(config_err)?
        .with_no_client_auth())
}

/// What a call returned, before classification.
enum Failure {
    Status(StatusCode, String),
    Timeout,
    Transport(String),
    /// An answer past [`MAX_ANSWER`]: hostile, not an outage.
    TooLong,
}

/// The `{"type", "detail"}` of a KBS error (its last path segment and the detail), escaped
/// and cut: it ends up in one error line.
fn error_text(body: &[u8]) -> String {
    #[derive(serde::Deserialize)]
    struct E {
        #[serde(rename = "type")]
        kind: Option<String>,
        detail: Option<String>,
    }
    match serde_json::from_slice::<E>(body) {
        Ok(E { kind, detail }) => {
            let kind = kind.as_deref().map(|k| k.rsplit('/').next().unwrap_or(k));
            printable(
                &[kind, detail.as_deref()]
                    .into_iter()
                    .flatten()
                    .collect::<Vec<_>>()
                    .join(": "),
                200,
            )
        }
        Err(_) => printable(&String::from_utf8_lossy(&body[..body.len().min(200)]), 200),
    }
}

impl Broker {
    fn from_env() -> Result<Self, KeyError> {
        let var = |n: &str| std::env::var(n).ok().filter(|v| !v.is_empty());
        let (base, kind) =
            match (var("SEALFS_KBS_URL"), var("SEALFS_CDH_URL")) {
                (Some(_), Some(_)) => {
                    return Err(config_err(
                        "SEALFS_KBS_URL and SEALFS_CDH_URL are both set: unset one",
                    ))
                }
                (Some(u), None) => (
                    check_url("SEALFS_KBS_URL", &u)?,
                    Kind::Kbs {
                        attester: Attester::from_env().map_err(|e| config_err(e.to_string()))?,
                        session: Box::new(tokio::sync::Mutex::new(None)),
                    },
                ),
                (None, Some(u)) => (check_url("SEALFS_CDH_URL", &u)?, Kind::Cdh),
                (None, None) => return Err(config_err(
                    "kbs: keys need SEALFS_KBS_URL (a Trustee KBS) or SEALFS_CDH_URL (the pod's \
                     Confidential Data Hub)",
                )),
            };
        let client =
            super::tls::https_client(tls_config()?, CONNECT_TIMEOUT, Duration::from_secs(30));
        Ok(Self { client, base, kind })
    }

    fn name(&self) -> String {
        match self.kind {
            Kind::Kbs { .. } => self.base.clone(),
            Kind::Cdh => format!("cdh:{}", self.base),
        }
    }

    /// One HTTP exchange; the answer's body bounded, its `Set-Cookie` session id if any.
    async fn call(
        &self,
        op: &'static str,
        method: Method,
        path: &str,
        headers: &[(hyper::header::HeaderName, HeaderValue)],
        body: Option<Vec<u8>>,
    ) -> Result<(Zeroizing<Vec<u8>>, Option<String>), Failure> {
        let start = Instant::now();
        let r = tokio::time::timeout(CALL_TIMEOUT, self.exchange(method, path, headers, body))
            .await
            .unwrap_or(Err(Failure::Timeout));
        let outcome = match &r {
            Ok(_) => "ok",
            Err(Failure::Timeout) => "timeout",
            Err(Failure::Transport(_)) => "network",
            Err(Failure::TooLong) => "bad_answer",
            Err(Failure::Status(s, _)) if s.is_server_error() => "error",
            Err(Failure::Status(..)) => "denied",
        };
        crate::calls::record("kbs", op, outcome, start.elapsed());
        tracing::debug!(op, outcome, "key broker call");
        r
    }

    async fn exchange(
        &self,
        method: Method,
        path: &str,
        headers: &[(hyper::header::HeaderName, HeaderValue)],
        body: Option<Vec<u8>>,
    ) -> Result<(Zeroizing<Vec<u8>>, Option<String>), Failure> {
        let mut req = Request::builder()
            .method(method)
            .uri(format!("{}{path}", self.base));
        for (k, v) in headers {
            req = req.header(k, v.clone());
        }
        if body.is_some() {
            req = req.header(CONTENT_TYPE, "application/json");
        }
        let req = req
            .body(Full::new(Bytes::from(body.unwrap_or_default())))
            .map_err(|e| Failure::Transport(format!("bad request: {e}")))?;
        let (status, headers, out) = super::tls::round_trip(&self.client, req, MAX_ANSWER)
            .await
            .map_err(|e| match e {
                super::tls::BodyError::TooLong => Failure::TooLong,
                super::tls::BodyError::Transport(m) => Failure::Transport(m),
            })?;
        let cookie = headers
            .get_all(SET_COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .find_map(session_cookie);
        if status.is_success() {
            Ok((out, cookie))
        } else {
            Err(Failure::Status(status, error_text(&out)))
        }
    }

    fn classify(&self, resource: &str, step: &'static str, f: Failure) -> KeyError {
        let (broker, resource) = (self.name(), resource.to_string());
        match f {
            // A real CDH answers every failure 500 with the KBS client's error text
            // (guest-components api-server-rest): a refusal is told by that text.
            Failure::Status(s, m)
                if matches!(self.kind, Kind::Cdh) && s.is_server_error() && cdh_refusal(&m) =>
            {
                KeyError::KbsDenied {
                    broker,
                    resource,
                    message: format!("{step}: HTTP {}: {m}", s.as_u16()),
                }
            }
            Failure::Status(s, m)
                if s.is_server_error() || matches!(s.as_u16(), 408 | 425 | 429) =>
            {
                KeyError::KbsUnavailable {
                    broker,
                    resource,
                    message: format!("{step}: HTTP {}: {m}", s.as_u16()),
                }
            }
            Failure::Status(s, _) if s.is_redirection() => KeyError::KbsDenied {
                broker,
                resource,
                message: format!("{step}: HTTP {} redirect not followed", s.as_u16()),
            },
            Failure::Status(s, m) => KeyError::KbsDenied {
                broker,
                resource,
                message: format!("{step}: HTTP {}: {m}", s.as_u16()),
            },
            Failure::Timeout => KeyError::KbsUnavailable {
                broker,
                resource,
                message: format!("{step}: no answer in {}s", CALL_TIMEOUT.as_secs()),
            },
            Failure::TooLong => KeyError::KbsBadAnswer {
                broker,
                resource,
                reason: format!("{step}: answer longer than {MAX_ANSWER} bytes"),
            },
            Failure::Transport(m) => KeyError::KbsUnavailable {
                broker,
                resource,
                message: format!("{step}: {m}"),
            },
        }
    }

    fn bad_answer(&self, resource: &str, why: impl Into<String>) -> KeyError {
        KeyError::KbsBadAnswer {
            broker: self.name(),
            resource: resource.to_string(),
            reason: why.into(),
        }
    }

    /// The resource's content (a key file, checked by the caller) and what the release
    /// showed. Logs the transcript. `fresh`: attest again even if a token is held (each
    /// revalidation: evidence as of now, not as of the token's issue).
    pub async fn release(
        &self,
        resource: &str,
        fresh: bool,
    ) -> Result<(Plaintext, Transcript), KeyError> {
        let out = match &self.kind {
            Kind::Cdh => self.release_cdh(resource).await?,
            Kind::Kbs { attester, session } => {
                let mut s = session.lock().await;
                if fresh {
                    *s = None;
                }
                // A cached token first; one refused (expired early, KBS restarted) is
                // dropped and the exchange done once afresh.
                let cached = match s.as_ref() {
                    Some(sess) if SystemTime::now() < sess.valid_until => {
                        match self.resource(resource, sess).await {
                            Ok(r) => Some(r),
                            Err(KeyError::KbsDenied { .. }) => None,
                            Err(e) => return Err(e),
                        }
                    }
                    _ => None,
                };
                match cached {
                    Some(r) => r,
                    None => {
                        *s = None;
                        let fresh = self.attest(attester, resource).await?;
                        let r = self.resource(resource, &fresh).await;
                        *s = Some(fresh);
                        r?
                    }
                }
            }
        };
        out.1.log();
        Ok(out)
    }

    async fn release_cdh(&self, resource: &str) -> Result<(Plaintext, Transcript), KeyError> {
        let (body, _) = self
            .call(
                "cdh_resource",
                Method::GET,
                &format!("/cdh/resource/{resource}"),
                &[],
                None,
            )
            .await
            .map_err(|f| self.classify(resource, "resource", f))?;
        if body.len() > MAX_RESOURCE {
            return Err(self.bad_answer(
                resource,
                format!("resource longer than {MAX_RESOURCE} bytes"),
            ));
        }
        // Into locked memory at once (hyper's own buffers held it on the way: as for Transit
        // answers, those are the HTTP stack's).
        let body = Plaintext::copy_of(&body)?
            .ok_or_else(|| self.bad_answer(resource, "resource too long"))?;
        Ok((
            body,
            Transcript {
                broker: self.name(),
                resource: resource.to_string(),
                tee: "(attested by the CDH)".into(),
                ..Transcript::default()
            },
        ))
    }

    /// `auth` then `attest`: a fresh TEE key, evidence bound to it and to the nonce.
    async fn attest(&self, attester: &Attester, resource: &str) -> Result<Session, KeyError> {
        let attest_err = |e: super::attester::AttestError| KeyError::KbsAttester {
            resource: resource.to_string(),
            message: e.to_string(),
        };
        let tee = attester.tee().await.map_err(attest_err)?;
        let auth = serde_json::json!({
            "version": PROTOCOL_VERSION,
            "tee": tee,
            "extra-params": {"supported-hash-algorithms": ["sha384"]},
        });
        let (body, cookie) = self
            .call(
                "auth",
                Method::POST,
                "/kbs/v0/auth",
                &[],
                Some(auth.to_string().into_bytes()),
            )
            .await
            .map_err(|f| self.classify(resource, "auth", f))?;
        #[derive(serde::Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Challenge {
            nonce: String,
            #[serde(rename = "extra-params")]
            extra_params: serde_json::Value,
        }
        let ch: Challenge = serde_json::from_slice(&body)
            .map_err(|e| self.bad_answer(resource, format!("auth: {}", super::json_error(&e))))?;
        // The nonce goes into the canonical JSON as is: base64 characters only (so it needs
        // no escaping), bounded.
        if ch.nonce.is_empty()
            || ch.nonce.len() > 256
            || !ch
                .nonce
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"+/=-_".contains(&b))
        {
            return Err(self.bad_answer(resource, "auth: the nonce is not base64"));
        }
        // sealfs hashes with SHA-384 only; a KBS that does not offer it is refused.
        match &ch.extra_params {
            serde_json::Value::String(s) if s.is_empty() => {}
            serde_json::Value::Null => {}
            serde_json::Value::Object(m)
                if m.values().all(|v| match v {
                    serde_json::Value::String(s) => s == "sha384",
                    serde_json::Value::Array(a) => a.iter().any(|x| x == "sha384"),
                    _ => false,
                }) => {}
            _ => return Err(self.bad_answer(resource, "auth: unexpected extra-params")),
        }
        let cookie =
            cookie.ok_or_else(|| self.bad_answer(resource, "auth: no kbs-session-id cookie"))?;
        let key = TeeKey::generate().map_err(|e| match e {
            super::jwe::JweError::Lock(l) => KeyError::Lock(l),
            e => self.bad_answer(resource, e.to_string()),
        })?;
        let runtime = format!(
            r#"{{"additional-evidence":"","nonce":"{}","tee-pubkey":{}}}"#,
            ch.nonce,
            key.jwk_jcs()
        );
        let report_data = ring::digest::digest(&ring::digest::SHA384, runtime.as_bytes());
        let evidence = attester
            .evidence(report_data.as_ref())
            .await
            .map_err(attest_err)?;
        if evidence.tee != tee {
            return Err(KeyError::KbsAttester {
                resource: resource.to_string(),
                message: format!("the attester reported tee {} then {}", tee, evidence.tee),
            });
        }
        let attest = serde_json::json!({
            "runtime-data": {"nonce": ch.nonce, "tee-pubkey": key.jwk()},
            "tee-evidence": {"primary_evidence": evidence.primary, "additional_evidence": ""},
        });
        // What auditors keep (public: nonce, TEE public key, evidence).
        let evidence_json = attest.to_string();
        let cookie_header = sensitive(&format!("kbs-session-id={cookie}")).ok_or_else(|| {
            self.bad_answer(resource, "auth: the session cookie is not a header value")
        })?;
        let (body, _) = self
            .call(
                "attest",
                Method::POST,
                "/kbs/v0/attest",
                &[(COOKIE, cookie_header)],
                Some(evidence_json.clone().into_bytes()),
            )
            .await
            .map_err(|f| self.classify(resource, "attest", f))?;
        #[derive(serde::Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Token {
            token: String,
        }
        let token = serde_json::from_slice::<Token>(&body)
            .map(|t| Zeroizing::new(t.token))
            .map_err(|e| self.bad_answer(resource, format!("attest: {}", super::json_error(&e))))?;
        if token.len() > MAX_TOKEN
            || !token
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
        {
            return Err(self.bad_answer(resource, "attest: the token is not a compact JWT"));
        }
        let claims = read_claims(&token)
            .map_err(|why| self.bad_answer(resource, format!("attest: {why}")))?;
        let sha = |b: &[u8]| hex::encode(ring::digest::digest(&ring::digest::SHA256, b));
        let transcript = Transcript {
            broker: self.name(),
            resource: resource.to_string(),
            tee,
            issuer: claims.issuer,
            status: claims.status,
            expires: claims.expires,
            token_sha256: sha(token.as_bytes()),
            evidence_sha256: sha(evidence_json.as_bytes()),
        };
        keep_for_auditors(&transcript, &token, &evidence_json);
        let valid_until = UNIX_EPOCH
            .checked_add(Duration::from_secs(claims.expires))
            .and_then(|t| t.checked_sub(TOKEN_MARGIN))
            .ok_or_else(|| self.bad_answer(resource, "attest: the token's exp is out of range"))?;
        Ok(Session {
            key,
            token,
            valid_until,
            transcript,
        })
    }

    async fn resource(
        &self,
        resource: &str,
        s: &Session,
    ) -> Result<(Plaintext, Transcript), KeyError> {
        let bearer = sensitive(&Zeroizing::new(format!("Bearer {}", s.token.as_str())))
            .ok_or_else(|| self.bad_answer(resource, "attest: the token is not a header value"))?;
        let (body, _) = self
            .call(
                "resource",
                Method::GET,
                &format!("/kbs/v0/resource/{resource}"),
                &[(AUTHORIZATION, bearer)],
                None,
            )
            .await
            .map_err(|f| self.classify(resource, "resource", f))?;
        let plain = s
            .key
            .decrypt(&body)
            .map_err(|e| self.bad_answer(resource, format!("resource: {e}")))?;
        if plain.bytes().len() > MAX_RESOURCE {
            return Err(self.bad_answer(
                resource,
                format!("resource longer than {MAX_RESOURCE} bytes"),
            ));
        }
        let mut t = s.transcript.clone();
        t.resource = resource.to_string();
        Ok((plain, t))
    }
}

/// A header value hyper marks sensitive (never logged, never HPACK-indexed). The cookie and
/// the token were checked to be safe characters when they arrived.
fn sensitive(v: &str) -> Option<HeaderValue> {
    let mut h = HeaderValue::from_str(v).ok()?;
    h.set_sensitive(true);
    Some(h)
}

/// Whether a CDH's 500 text is a refusal passed on from the KBS (policy denied, attestation
/// refused, resource not found) rather than the CDH or the KBS being down. Best effort: the
/// CDH's API has no error codes; what matches none is an outage (bounded by
/// `--revalidate-max-outage`).
///
/// Only phrases the KBS and its client use for a refusal: a bare "denied" or "not found"
/// also ends outage texts ("Permission denied (os error 13)" from the AA socket, a host
/// "not found"), and a refusal revokes every DEK the key opened.
fn cdh_refusal(text: &str) -> bool {
    let t = text.to_ascii_lowercase();
    [
        "unauthorized",
        "policydeny",
        "policy deny",
        "attestationerror",
        "forbidden",
        "resource not found",
        "resourcenotfound",
        "error 401",
        "error 403",
        "error 404",
    ]
    .iter()
    .any(|w| t.contains(w))
}

/// `kbs-session-id=VALUE` of one `Set-Cookie` line: a bounded token of safe characters.
fn session_cookie(line: &str) -> Option<String> {
    let v = line
        .split(';')
        .next()?
        .trim()
        .strip_prefix("kbs-session-id=")?;
    (!v.is_empty()
        && v.len() <= 128
        && v.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_".contains(&b)))
    .then(|| v.to_string())
}

/// A claim as an audit line shows it: only `[A-Za-z0-9._:/-]` (others become `_`), so a
/// KBS cannot write ` token_sha256=…` into the line; cut at `max` characters.
fn plain_field(s: &str, max: usize) -> String {
    s.chars()
        .take(max)
        .map(|c| {
            if c.is_ascii_alphanumeric() || "._:/-".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect()
}

struct Claims {
    issuer: String,
    status: String,
    expires: u64,
}

/// What the audit log records of the EAR token: `iss`, `exp`, and each submodule's
/// `ear.status`. Read, not verified: the token is the KBS's own, checked by the KBS when it
/// comes back; sealfs records what it was told.
fn read_claims(token: &str) -> Result<Claims, String> {
    use base64::Engine;
    let mut parts = token.split('.');
    let (Some(_), Some(payload), Some(_), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err("the token is not a JWT".into());
    };
    let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload)
        .map_err(|_| "the token's claims are not base64url".to_string())?;
    #[derive(serde::Deserialize)]
    struct C {
        iss: Option<String>,
        exp: u64,
        #[serde(default)]
        submods: std::collections::BTreeMap<String, serde_json::Value>,
    }
    let c: C = serde_json::from_slice(&raw)
        .map_err(|e| format!("the token's claims: {}", super::json_error(&e)))?;
    let status = c
        .submods
        .iter()
        .take(16)
        .map(|(k, v)| {
            format!(
                "{}={}",
                plain_field(k, 32),
                plain_field(v["ear.status"].as_str().unwrap_or("?"), 32)
            )
        })
        .collect::<Vec<_>>()
        .join(",");
    Ok(Claims {
        issuer: plain_field(c.iss.as_deref().unwrap_or("?"), 128),
        status: if status.is_empty() {
            "?".into()
        } else {
            status
        },
        expires: c.exp,
    })
}

/// `--attestation-log DIR`: the token and the whole attest request (the nonce, the TEE
/// public key and the evidence: an auditor recomputes report_data from it) of each
/// attestation, 0600, named by time and token digest. A failure to keep them is logged, not fatal (the audit event has
/// their digests).
fn keep_for_auditors(t: &Transcript, token: &str, evidence: &str) {
    use std::os::fd::AsRawFd;
    let Some(dir) = ATTESTATION_LOG.get() else {
        return;
    };
    let dir = PathBuf::from(format!("/proc/self/fd/{}", dir.as_raw_fd()));
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let stem = format!("{secs}-{}", &t.token_sha256[..16]);
    for (suffix, bytes) in [
        ("token", token.as_bytes()),
        ("evidence.json", evidence.as_bytes()),
    ] {
        let path = dir.join(format!("{stem}.{suffix}"));
        let r = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&path)
            .and_then(|mut f| f.write_all(bytes).and_then(|_| f.sync_all()));
        if let Err(e) = r {
            tracing::warn!(path = %path.display(), error = %e, "could not keep the attestation record");
        }
    }
}

/// A `kbs:` KEK: the released key file, and what re-attesting last said.
pub struct KbsKey {
    broker: Arc<Broker>,
    resource: String,
    kek: FileKek,
    /// The last revalidation's answer (`None` before any, or when it released the same key).
    state: Mutex<Option<(bool, String)>>,
    /// When the broker last released this key, and how long an outage may last before the
    /// key is refused (`--revalidate-max-outage` of a revalidating mount; zero: unbounded).
    /// Without it a broker kept unreachable (a hostile host drops the traffic, or stalls
    /// the quote) would let new opens unwrap under the held key for ever.
    last_ok: Mutex<(Instant, Duration)>,
}

impl KbsKey {
    /// Releases the key (attesting if no token is held) and checks it is a key file.
    pub async fn resolve(broker: Arc<Broker>, resource: &str) -> Result<Self, KeyError> {
        let kek = Self::fetch(&broker, resource, false).await?;
        Ok(Self {
            broker,
            resource: resource.to_string(),
            kek,
            state: Mutex::new(None),
            last_ok: Mutex::new((Instant::now(), Duration::ZERO)),
        })
    }

    async fn fetch(broker: &Broker, resource: &str, fresh: bool) -> Result<FileKek, KeyError> {
        let (content, _) = broker.release(resource, fresh).await?;
        FileKek::parse(content.bytes()).map_err(|e| match e {
            super::file::KeyFileError::Lock(l) => KeyError::Lock(l),
            e => broker.bad_answer(resource, format!("the resource is {e}")),
        })
    }

    /// The slot id: the released key file's fingerprint (`file:…`).
    pub fn id(&self) -> &str {
        self.kek.id()
    }

    pub fn file(&self) -> &FileKek {
        &self.kek
    }

    /// Bounds outages: once the broker has not released this key for `bound`, every use
    /// of it is refused (`--revalidate-max-outage`; set only when the mount revalidates).
    pub fn bound_outage(&self, bound: Duration) {
        self.last_ok.lock().unwrap_or_else(|p| p.into_inner()).1 = bound;
    }

    /// Revalidation: attest again and release again (once per key per round, whatever the
    /// number of DEKs it opened). Another key under the same path is a refusal of this one.
    pub async fn refresh(&self) {
        let r = Self::fetch(&self.broker, &self.resource, true).await;
        let state = match r {
            Ok(k) if k.id() == self.kek.id() => {
                self.last_ok.lock().unwrap_or_else(|p| p.into_inner()).0 = Instant::now();
                None
            }
            Ok(k) => Some((
                true,
                format!(
                    "the broker now releases another key ({}) under this path",
                    k.id()
                ),
            )),
            Err(e) => Some((e.revokes(), e.to_string())),
        };
        *self.state.lock().unwrap_or_else(|p| p.into_inner()) = state;
    }

    /// The last refresh's refusal or outage, as an error for every DEK under this key; an
    /// outage past the bound is a refusal.
    pub fn refused(&self) -> Option<KeyError> {
        let (since, bound) = *self.last_ok.lock().unwrap_or_else(|p| p.into_inner());
        if !bound.is_zero() && since.elapsed() >= bound {
            return Some(KeyError::KbsDenied {
                broker: self.broker.name(),
                resource: self.resource.clone(),
                message: format!(
                    "not released for {}s (--revalidate-max-outage)",
                    since.elapsed().as_secs()
                ),
            });
        }
        let s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        s.as_ref().map(|(revokes, message)| {
            let (broker, resource, message) =
                (self.broker.name(), self.resource.clone(), message.clone());
            if *revokes {
                KeyError::KbsDenied {
                    broker,
                    resource,
                    message,
                }
            } else {
                KeyError::KbsUnavailable {
                    broker,
                    resource,
                    message,
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uri_forms() {
        assert_eq!(
            parse_spec("///sealfs/kek/m1").as_deref(),
            Some("sealfs/kek/m1")
        );
        for bad in [
            "//host/sealfs/kek/m1",
            "///sealfs/kek",
            "///sealfs/kek/m1/x",
            "///sealfs/../m1",
            "///sealfs//m1",
            "///sealfs/kek/m 1",
            "sealfs/kek/m1",
            "///sealfs/kek/m1?x=1",
        ] {
            assert_eq!(parse_spec(bad), None, "{bad}");
        }
    }

    #[test]
    fn urls_https_or_loopback_http_only() {
        assert!(check_url("V", "https://kbs.example:8080").is_ok());
        assert!(check_url("V", "http://127.0.0.1:8080/").is_ok());
        assert!(check_url("V", "http://[::1]:8080").is_ok());
        for bad in [
            "http://10.0.0.1:8080",
            "ftp://x",
            "https://kbs/x",
            "https://kbs/?a=b",
            "https://user:secret-pass@kbs.example",
            "http://user:secret-pass@127.0.0.1:8080",
            "https://user:secret pass@kbs",
        ] {
            assert!(
                matches!(check_url("V", bad), Err(KeyError::KbsConfig(_))),
                "{bad}"
            );
            let e = check_url("V", bad).unwrap_err().to_string();
            assert!(!e.contains("secret"), "credentials echoed: {e}");
        }
    }

    #[test]
    fn cookies_and_claims_are_bounded() {
        assert_eq!(
            session_cookie("kbs-session-id=abc123; Expires=x").as_deref(),
            Some("abc123")
        );
        assert_eq!(session_cookie("kbs-session-id=a\"b"), None);
        assert_eq!(session_cookie("other=abc"), None);
        use base64::Engine;
        let b = |v: &serde_json::Value| {
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string())
        };
        let t = format!(
            "h.{}.s",
            b(
                &serde_json::json!({"iss": "as\nx", "exp": 5, "submods": {"cpu0": {"ear.status": "affirming"}}})
            )
        );
        let c = read_claims(&t).unwrap();
        assert_eq!((c.expires, c.status.as_str()), (5, "cpu0=affirming"));
        assert!(!c.issuer.contains('\n'));
        assert!(read_claims("a.b").is_err());
        assert!(read_claims(&format!("h.{}.s", b(&serde_json::json!({"iss": "x"})))).is_err());
    }

    #[test]
    fn kbs_error_bodies_are_named_and_cut() {
        let e = error_text(br#"{"type":"https://github.com/confidential-containers/kbs/errors/PolicyDeny","detail":"Access denied by policy"}"#);
        assert_eq!(e, "PolicyDeny: Access denied by policy");
        assert!(error_text(&[b'a'; 5000]).len() <= 210);
    }
}
