//! Evidence providers ("attesters") for KBS attestation, picked by `SEALFS_ATTESTER`:
//!
//! - `tsm`: the kernel's configfs-tsm report interface (Linux 6.7+,
//!   `Documentation/ABI/testing/configfs-tsm-report`, once `configfs-tsm`): `mkdir` a
//!   report instance under `SEALFS_TSM_DIR` (default `/sys/kernel/config/tsm/report`),
//!   read `provider` and
//!   `generation`, write the 64-byte `inblob`, read `outblob` (the quote), read
//!   `generation` again (it must have moved by exactly our one write, the ABI's conflict
//!   check), `rmdir` the instance (always, also on error). Intel TDX (`tdx_guest`: the
//!   quote) and AMD SEV-SNP (`sev_guest`: the report, and `auxblob`'s certificate table,
//!   turned into the attestation agent's evidence by `keys/snp.rs`).
//! - `aa`: the Confidential Containers Attestation Agent over its ttrpc socket
//!   (`SEALFS_AA_SOCKET`, default
//!   `/run/confidential-containers/attestation-agent/attestation-agent.sock`), which holds
//!   every attester guest-components has (TDX with its event log, SEV-SNP, CCA, ...).
//!   `GetTeeType` gives the tee name, `GetEvidence` the TEE's JSON evidence.
//! - `sample`: the `sample` TEE, no hardware at all (tests and demos only; warns every use).
//!
//! Formats, and where each comes from (upstream files read at these commits):
//! - guest-components 8246e5e0977f6322f0a1b0f77e0739cf1c3e1f74 (2026-08-20):
//!   `attestation-agent/attester/src/sample/mod.rs`: sample evidence is
//!   `{"svn":"1","report_data":"<standard base64 of the report data, unpadded>"}`;
//!   `attestation-agent/attester/src/tdx/mod.rs` and `tsm_report/mod.rs`: the report data is
//!   refused over 64 bytes and zero-padded at the end to 64 (`resize(64, 0)`), written as
//!   `inblob`; the evidence is `TdxEvidence {cc_eventlog: Option<String>, quote: String}`,
//!   i.e. `{"cc_eventlog":<base64 or null>,"quote":"<standard base64 of outblob>"}`;
//!   `snp/mod.rs`: `SnpEvidence {attestation_report, cert_chain}` (see below);
//!   `protos/protos/attestation-agent/attestation-agent.proto`: service
//!   `attestation_agent.AttestationAgentService`, `GetEvidence(GetEvidenceRequest {bytes
//!   RuntimeData = 1}) -> GetEvidenceResponse {bytes Evidence = 1}`, `GetTeeType(
//!   GetTeeTypeRequest {}) -> GetTeeTypeResponse {string tee = 1}`;
//!   `attestation-agent/attestation-agent/src/bin/ttrpc_dep/server.rs`: the tee is the
//!   kbs-types `Tee` serde name without its quotes, the evidence the attester's JSON as
//!   bytes (the AA pads the report data itself, so it gets the 48 bytes as they are);
//!   `attestation-agent/kbs_protocol/src/evidence_provider/aa_ttrpc.rs`: the same client
//!   in Rust (`serde_json::from_slice` of `Evidence`).
//! - trustee 78962cd416dcc8a32f9377e0066a28fe21420f69: `deps/verifier/src/tdx/mod.rs`
//!   (the same `TdxEvidence`; the quote's REPORT_DATA must be the 64-byte padded value),
//!   `deps/verifier/src/intel_dcap/quote.rs` (header 48 bytes, version u16 LE at 0, tee
//!   type u32 LE at 4 = 0x81 for TDX; v4 body at 48, v5 body at 54 after a type u16 and a
//!   size u32; REPORT_DATA at body offset 520), used here to check that the quote carries
//!   the report data we wrote.
//! - containerd/ttrpc-rust 36c12f37461286cacf36764ef4147d440c4eebe9: `src/ttrpc.proto`
//!   (`Request {string service = 1; string method = 2; bytes payload = 3; int64
//!   timeout_nano = 4; repeated KeyValue metadata = 5}`, `Response {Status status = 1;
//!   bytes payload = 2}`, `Status {Code code = 1; string message = 2; repeated Any details
//!   = 3}`), `src/proto.rs` (a 10-byte header: u32 BE length, u32 BE stream id, u8 type 1
//!   request / 2 response / 3 data, u8 flags), `src/asynchronous/client.rs` (client stream
//!   ids are odd, from 1; an absent status or code 0 is OK).
//!
//! Not done here (use `SEALFS_ATTESTER=aa` for these):
//! - The TDX event log (`cc_eventlog`: the trimmed ACPI CCEL table plus the AA's own event
//!   log). sealfs sends `null`, which the verifier accepts (it then replays nothing); a
//!   policy that needs event-log claims needs the AA.
//! - Arm CCA (`arm_cca_guest`): its evidence is a CBOR token with its own envelope.

use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::format::naming::printable;

const DEFAULT_TSM_DIR: &str = "/sys/kernel/config/tsm/report";
const DEFAULT_AA_SOCKET: &str =
    "/run/confidential-containers/attestation-agent/attestation-agent.sock";

/// TDX REPORT_DATA (and SNP REPORT_DATA, and the configfs-tsm inblob maximum) is 64 bytes.
const REPORT_DATA_SIZE: usize = 64;
/// A TDX quote is 5 to 10 KiB (the PCK chain dominates); the kernel caps outblob at 32 KiB
/// today. Refusing more bounds what a broken or hostile provider can make us hold.
const OUTBLOB_MAX: usize = 64 << 10;
/// `provider` and `generation` are one short line each.
const SMALL_ATTR_MAX: usize = 64;

/// Where evidence comes from: SEALFS_ATTESTER = tsm | aa | sample.
pub enum Attester {
    Sample,
    Tsm { root: PathBuf },
    Aa { socket: PathBuf },
}

/// Evidence for one attestation: the KBS `tee` name (kbs-types 0.18 `Tee` serde name,
/// e.g. "sample", "tdx", "snp") and the JSON that goes in `tee-evidence.primary_evidence`.
pub struct Evidence {
    pub tee: String,
    pub primary: serde_json::Value,
}

/// Why no evidence came. One line each; none carries evidence bytes (the AA's status
/// message is bounded and made printable).
#[derive(Debug, thiserror::Error)]
pub enum AttestError {
    #[error("set SEALFS_ATTESTER to tsm (configfs-tsm, an Intel TDX or AMD SEV-SNP guest), aa (the Confidential Containers attestation agent) or sample (no hardware evidence: tests and demos only)")]
    Unset,
    #[error("SEALFS_ATTESTER={0:?}: expected tsm, aa or sample")]
    Unknown(String),
    #[error("report data is {0} bytes; a TEE report holds at most 64")]
    ReportDataTooLong(usize),
    /// The configfs-tsm root is absent: no TSM driver, configfs not mounted, or not a guest.
    #[error("configfs-tsm {0}: not found (not a TDX or SEV-SNP guest with Linux 6.7+, or configfs not mounted at /sys/kernel/config)")]
    TsmMissing(String),
    #[error("configfs-tsm {path}: {op}: {source}")]
    TsmIo {
        path: String,
        op: &'static str,
        source: io::Error,
    },
    #[error("configfs-tsm {path}: {attr} is over {max} bytes; refused")]
    TsmOversized {
        path: String,
        attr: &'static str,
        max: usize,
    },
    #[error("configfs-tsm {path}: {attr}: {reason}")]
    TsmBadAttr {
        path: String,
        attr: &'static str,
        reason: String,
    },
    #[error(
        "configfs-tsm provider {0:?}: sealfs reads tdx_guest and sev_guest reports only; use SEALFS_ATTESTER=aa"
    )]
    TsmUnknownProvider(String),
    /// Someone else wrote to our report instance between our write and our read.
    #[error("configfs-tsm {path}: generation {before} before the inblob write, {after} after the outblob read (expected {}): another writer raced on the report; refused", before + 1)]
    TsmGeneration {
        path: String,
        before: u64,
        after: u64,
    },
    #[error("configfs-tsm {path}: {reason}")]
    TsmBadQuote { path: String, reason: String },
    #[error("attestation agent {socket}: {op}: {source}")]
    AaIo {
        socket: String,
        op: &'static str,
        source: io::Error,
    },
    #[error("attestation agent {socket}: no answer within {secs} s")]
    AaTimeout { socket: String, secs: u64 },
    #[error("attestation agent {socket}: the connection closed before a whole answer frame came")]
    AaTruncated { socket: String },
    #[error(
        "attestation agent {socket}: answer frame of {len} bytes, over the {max}-byte cap; refused"
    )]
    AaOversized {
        socket: String,
        len: u32,
        max: usize,
    },
    #[error("attestation agent {socket}: answer on stream {got}, expected {expected}; refused")]
    AaStream {
        socket: String,
        got: u32,
        expected: u32,
    },
    #[error("attestation agent {socket}: frame type {got}, expected a response (2); refused")]
    AaFrameType { socket: String, got: u8 },
    #[error("attestation agent {socket}: malformed protobuf in the answer: {reason}")]
    AaProtobuf {
        socket: String,
        reason: &'static str,
    },
    #[error("attestation agent {socket}: {method} failed: status {code}: {message}")]
    AaStatus {
        socket: String,
        method: &'static str,
        code: u64,
        message: String,
    },
    #[error("attestation agent {socket}: tee {tee:?} is not a kbs-types tee name")]
    AaTee { socket: String, tee: String },
    #[error("attestation agent {socket}: the evidence is not a JSON object: {reason}")]
    AaEvidence { socket: String, reason: String },
    #[error("attester task failed: {0}")]
    Task(String),
}

impl Attester {
    /// From SEALFS_ATTESTER (unset: an error saying to set it; names the 3 choices), with
    /// SEALFS_TSM_DIR (default /sys/kernel/config/tsm/report) and SEALFS_AA_SOCKET (default the
    /// CoCo AA socket path /run/confidential-containers/attestation-agent/attestation-agent.sock).
    pub fn from_env() -> Result<Self, AttestError> {
        Self::from_vars(|name| std::env::var_os(name).map(PathBuf::from))
    }

    /// `from_env` over any variable source (tests do not touch the process environment).
    fn from_vars(var: impl Fn(&str) -> Option<PathBuf>) -> Result<Self, AttestError> {
        let non_empty = |name: &str| var(name).filter(|v| !v.as_os_str().is_empty());
        let choice = non_empty("SEALFS_ATTESTER").ok_or(AttestError::Unset)?;
        match choice.to_str() {
            Some("sample") => {
                tracing::warn!(
                    "SEALFS_ATTESTER=sample: no hardware evidence: tests and demos only"
                );
                Ok(Attester::Sample)
            }
            Some("tsm") => Ok(Attester::Tsm {
                root: non_empty("SEALFS_TSM_DIR").unwrap_or_else(|| DEFAULT_TSM_DIR.into()),
            }),
            Some("aa") => Ok(Attester::Aa {
                socket: non_empty("SEALFS_AA_SOCKET").unwrap_or_else(|| DEFAULT_AA_SOCKET.into()),
            }),
            _ => Err(AttestError::Unknown(printable(
                &choice.to_string_lossy(),
                32,
            ))),
        }
    }

    /// The tee name this attester will report, known before the nonce (the `auth` request needs it).
    pub async fn tee(&self) -> Result<String, AttestError> {
        match self {
            Attester::Sample => Ok("sample".into()),
            Attester::Tsm { root } => {
                let root = root.clone();
                blocking(move || tsm_tee(&root, &Kernel)).await
            }
            Attester::Aa { socket } => aa_tee(socket, AA_TIMEOUT).await,
        }
    }

    /// Evidence whose report data is `report_data` (the 48-byte SHA-384 the KBS protocol computes;
    /// pad to the TEE's report-data size the way guest-components attesters do).
    pub async fn evidence(&self, report_data: &[u8]) -> Result<Evidence, AttestError> {
        if report_data.len() > REPORT_DATA_SIZE {
            return Err(AttestError::ReportDataTooLong(report_data.len()));
        }
        match self {
            Attester::Sample => {
                tracing::warn!(
                    "SEALFS_ATTESTER=sample: no hardware evidence: tests and demos only"
                );
                Ok(sample_evidence(report_data))
            }
            Attester::Tsm { root } => {
                tsm_evidence(root.clone(), report_data, Arc::new(Kernel)).await
            }
            Attester::Aa { socket } => aa_evidence(socket, report_data, AA_TIMEOUT).await,
        }
    }
}

/// The sample attester's `SampleQuote`: the report data as given (not padded).
fn sample_evidence(report_data: &[u8]) -> Evidence {
    Evidence {
        tee: "sample".into(),
        primary: serde_json::json!({
            "svn": "1",
            "report_data": base64::engine::general_purpose::STANDARD.encode(report_data),
        }),
    }
}

/// configfs work blocks (a quote takes the host's quoting service a while): off the runtime.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, AttestError> + Send + 'static,
) -> Result<T, AttestError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| AttestError::Task(e.to_string()))?
}

// ---------------------------------------------------------------------------------------
// configfs-tsm

/// What the kernel does on its own between our file operations. The real kernel needs no
/// help ([`Kernel`]); tests play the kernel in a plain directory with these hooks.
trait Configfs: Send + Sync {
    /// After `mkdir`: the kernel has made the attributes (`provider`, `generation`, ...).
    fn made(&self, _dir: &Path) -> io::Result<()> {
        Ok(())
    }
    /// After the `inblob` write: the kernel makes `outblob` on read and bumps `generation`.
    fn wrote(&self, _dir: &Path) -> io::Result<()> {
        Ok(())
    }
    /// Before `rmdir`: configfs drops the attributes with the directory.
    fn removing(&self, _dir: &Path) {}
}

/// The real configfs.
struct Kernel;
impl Configfs for Kernel {}

/// One report instance; `rmdir` on drop, whatever happened (configfs instances are kernel
/// objects: a leaked one stays until reboot).
struct ReportDir<'a> {
    path: PathBuf,
    fs: &'a dyn Configfs,
}

impl Drop for ReportDir<'_> {
    fn drop(&mut self) {
        self.fs.removing(&self.path);
        if let Err(e) = std::fs::remove_dir(&self.path) {
            tracing::warn!("configfs-tsm {}: rmdir failed: {e}", self.path.display());
        }
    }
}

impl<'a> ReportDir<'a> {
    /// A fresh instance of our own: the ABI's way to avoid other writers.
    fn create(root: &Path, fs: &'a dyn Configfs) -> Result<Self, AttestError> {
        static SEQ: AtomicU64 = AtomicU64::new(0);
        if !root.is_dir() {
            return Err(AttestError::TsmMissing(root.display().to_string()));
        }
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let name = format!(
            "sealfs-{}-{}-{nanos:x}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        );
        let path = root.join(name);
        std::fs::create_dir(&path).map_err(|source| AttestError::TsmIo {
            path: path.display().to_string(),
            op: "mkdir",
            source,
        })?;
        let dir = ReportDir { path, fs };
        fs.made(&dir.path).map_err(|e| dir.io("mkdir", e))?;
        Ok(dir)
    }

    fn io(&self, op: &'static str, source: io::Error) -> AttestError {
        AttestError::TsmIo {
            path: self.path.display().to_string(),
            op,
            source,
        }
    }

    fn bad(&self, attr: &'static str, reason: impl Into<String>) -> AttestError {
        AttestError::TsmBadAttr {
            path: self.path.display().to_string(),
            attr,
            reason: reason.into(),
        }
    }

    /// An attribute, refused past `max` bytes (read at most `max + 1`).
    fn read(&self, attr: &'static str, max: usize) -> Result<Vec<u8>, AttestError> {
        let file = std::fs::File::open(self.path.join(attr)).map_err(|e| self.io(attr, e))?;
        let mut out = Vec::new();
        file.take(max as u64 + 1)
            .read_to_end(&mut out)
            .map_err(|e| self.io(attr, e))?;
        if out.len() > max {
            return Err(AttestError::TsmOversized {
                path: self.path.display().to_string(),
                attr,
                max,
            });
        }
        Ok(out)
    }

    fn read_line(&self, attr: &'static str) -> Result<String, AttestError> {
        let raw = self.read(attr, SMALL_ATTR_MAX)?;
        let text = std::str::from_utf8(&raw).map_err(|_| self.bad(attr, "not UTF-8"))?;
        Ok(text.trim_end_matches('\n').to_string())
    }

    fn generation(&self) -> Result<u64, AttestError> {
        let text = self.read_line("generation")?;
        text.parse().map_err(|_| {
            self.bad(
                "generation",
                format!("{:?} is not a number", printable(&text, 32)),
            )
        })
    }

    fn provider(&self) -> Result<Provider, AttestError> {
        match self.read_line("provider")?.as_str() {
            "tdx_guest" => Ok(Provider::Tdx),
            "sev_guest" => Ok(Provider::Snp),
            other => Err(AttestError::TsmUnknownProvider(printable(other, 32))),
        }
    }
}

/// The configfs-tsm providers sealfs reads.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Provider {
    /// `tdx_guest`: `outblob` is a TDX quote.
    Tdx,
    /// `sev_guest`: `outblob` is an SEV-SNP report, `auxblob` the host's certificates.
    Snp,
}

impl Provider {
    /// The KBS tee name.
    fn tee(self) -> &'static str {
        match self {
            Provider::Tdx => "tdx",
            Provider::Snp => "snp",
        }
    }
}

fn tsm_tee(root: &Path, fs: &dyn Configfs) -> Result<String, AttestError> {
    let dir = ReportDir::create(root, fs)?;
    Ok(dir.provider()?.tee().to_string())
}

async fn tsm_evidence(
    root: PathBuf,
    report_data: &[u8],
    fs: Arc<dyn Configfs>,
) -> Result<Evidence, AttestError> {
    if report_data.len() > REPORT_DATA_SIZE {
        return Err(AttestError::ReportDataTooLong(report_data.len()));
    }
    // guest-components pads with zeros at the end (`resize(64, 0)`); the verifier compares
    // the quote's REPORT_DATA with the 48-byte hash padded the same way.
    let mut inblob = [0u8; REPORT_DATA_SIZE];
    inblob[..report_data.len()].copy_from_slice(report_data);
    blocking(move || tsm_quote(&root, &inblob, fs.as_ref())).await
}

/// The evidence of one report instance: TDX `{cc_eventlog, quote}`, SEV-SNP
/// `{attestation_report, cert_chain}` (keys/snp.rs).
fn tsm_quote(
    root: &Path,
    inblob: &[u8; REPORT_DATA_SIZE],
    fs: &dyn Configfs,
) -> Result<Evidence, AttestError> {
    let dir = ReportDir::create(root, fs)?;
    // Before writing anything: an unknown provider stops here.
    let provider = dir.provider()?;
    let before = dir.generation()?;
    std::fs::write(dir.path.join("inblob"), inblob).map_err(|e| dir.io("inblob", e))?;
    fs.wrote(&dir.path).map_err(|e| dir.io("inblob", e))?;
    let quote = dir.read("outblob", OUTBLOB_MAX)?;
    // SEV-SNP: the certificate table, of the same generation (reads do not move it). The
    // kernel leaves it empty, or gives no file, when the host supplies no certificates.
    let aux = match provider {
        Provider::Snp => match dir.read("auxblob", super::snp::AUXBLOB_MAX) {
            Ok(a) => Some(a),
            Err(AttestError::TsmIo { source, .. }) if source.kind() == io::ErrorKind::NotFound => {
                None
            }
            Err(e) => return Err(e),
        },
        Provider::Tdx => None,
    };
    // The ABI: "checking generation before writing to any attribute and making sure the
    // number of writes matches expectations after reading @outblob". One write: +1.
    let after = dir.generation()?;
    if after != before.wrapping_add(1) {
        return Err(AttestError::TsmGeneration {
            path: dir.path.display().to_string(),
            before,
            after,
        });
    }
    let bad = |reason: String| AttestError::TsmBadQuote {
        path: dir.path.display().to_string(),
        reason,
    };
    let (quoted, what) = match provider {
        Provider::Snp => (super::snp::report_data(&quote).map_err(bad)?, "report"),
        Provider::Tdx => (
            tdx_quote_report_data(&quote).map_err(|r| bad(r.into()))?,
            "quote",
        ),
    };
    // Belt and braces beside the generation check: the quote must carry what we wrote.
    if quoted != inblob {
        return Err(bad(format!(
            "the {what}'s REPORT_DATA is not the report data written"
        )));
    }
    let primary = match provider {
        Provider::Snp => super::snp::evidence(&quote, aux.as_deref()).map_err(bad)?,
        Provider::Tdx => serde_json::json!({
            "cc_eventlog": null,
            "quote": base64::engine::general_purpose::STANDARD.encode(quote),
        }),
    };
    Ok(Evidence {
        tee: provider.tee().into(),
        primary,
    })
}

/// REPORT_DATA of a TDX quote v4 or v5 (trustee `deps/verifier/src/intel_dcap/quote.rs`).
fn tdx_quote_report_data(quote: &[u8]) -> Result<&[u8], &'static str> {
    const HEADER: usize = 48;
    const REPORT_DATA_AT: usize = 520;
    if quote.is_empty() {
        return Err("empty outblob");
    }
    let (Some(version), Some(tee_type)) = (quote.get(0..2), quote.get(4..8)) else {
        return Err("outblob too short for a TDX quote header");
    };
    if tee_type != [0x81, 0, 0, 0] {
        return Err("outblob is not a TDX quote (tee type is not 0x81)");
    }
    let body = match u16::from_le_bytes([version[0], version[1]]) {
        4 => HEADER,
        // v5: a u16 body type and a u32 body size before the body.
        5 => HEADER + 6,
        _ => return Err("outblob is not a TDX quote v4 or v5"),
    };
    let at = body + REPORT_DATA_AT;
    quote
        .get(at..at + REPORT_DATA_SIZE)
        .ok_or("outblob too short for a TDX quote body")
}

// ---------------------------------------------------------------------------------------
// Attestation Agent over ttrpc

/// The AA answers from local state or the TEE's quoting path; ten seconds is generous.
const AA_TIMEOUT: Duration = Duration::from_secs(10);
/// Our cap on one answer frame (ttrpc's own is 4 MiB); evidence is tens of KiB at most.
const FRAME_MAX: usize = 1 << 20;
const HEADER_LEN: usize = 10;
const TYPE_REQUEST: u8 = 1;
const TYPE_RESPONSE: u8 = 2;
/// One call per connection, so always the first client stream id (odd, from 1).
const STREAM_ID: u32 = 1;
const AA_SERVICE: &str = "attestation_agent.AttestationAgentService";

async fn aa_tee(socket: &Path, timeout: Duration) -> Result<String, AttestError> {
    let answer = aa_call(socket, "GetTeeType", &[], timeout).await?;
    let at = || socket.display().to_string();
    let tee = proto::field_bytes(&answer, 1).map_err(|reason| AttestError::AaProtobuf {
        socket: at(),
        reason,
    })?;
    let tee = String::from_utf8_lossy(tee);
    // kbs-types 0.18 `Tee` serde names are lowercase words, some hyphenated ("tdx", "snp",
    // "az-snp-vtpm", "nvidia-dpu", ...).
    if tee.is_empty()
        || tee.len() > 32
        || tee.starts_with('-')
        || !tee
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    {
        return Err(AttestError::AaTee {
            socket: at(),
            tee: printable(&tee, 32),
        });
    }
    Ok(tee.into_owned())
}

async fn aa_evidence(
    socket: &Path,
    report_data: &[u8],
    timeout: Duration,
) -> Result<Evidence, AttestError> {
    let tee = aa_tee(socket, timeout).await?;
    let mut request = Vec::with_capacity(report_data.len() + 2);
    proto::put_bytes(&mut request, 1, report_data);
    let answer = aa_call(socket, "GetEvidence", &request, timeout).await?;
    let at = || socket.display().to_string();
    let evidence = proto::field_bytes(&answer, 1).map_err(|reason| AttestError::AaProtobuf {
        socket: at(),
        reason,
    })?;
    // Bounded by the frame cap; serde_json's messages name a position, never the content.
    let primary: serde_json::Value =
        serde_json::from_slice(evidence).map_err(|e| AttestError::AaEvidence {
            socket: at(),
            reason: super::json_error(&e),
        })?;
    if !primary.is_object() {
        return Err(AttestError::AaEvidence {
            socket: at(),
            reason: "not an object".into(),
        });
    }
    Ok(Evidence { tee, primary })
}

/// One unary ttrpc call on a fresh connection; the answer's payload.
async fn aa_call(
    socket: &Path,
    method: &'static str,
    payload: &[u8],
    timeout: Duration,
) -> Result<Vec<u8>, AttestError> {
    let at = || socket.display().to_string();
    match tokio::time::timeout(timeout, aa_exchange(socket, method, payload, timeout)).await {
        Ok(r) => r,
        Err(_) => Err(AttestError::AaTimeout {
            socket: at(),
            secs: timeout.as_secs(),
        }),
    }
}

async fn aa_exchange(
    socket: &Path,
    method: &'static str,
    payload: &[u8],
    timeout: Duration,
) -> Result<Vec<u8>, AttestError> {
    let at = || socket.display().to_string();
    let io = |op: &'static str| {
        move |source: io::Error| AttestError::AaIo {
            socket: socket.display().to_string(),
            op,
            source,
        }
    };
    let mut stream = tokio::net::UnixStream::connect(socket)
        .await
        .map_err(io("connect"))?;

    let mut body = Vec::with_capacity(AA_SERVICE.len() + method.len() + payload.len() + 32);
    proto::put_bytes(&mut body, 1, AA_SERVICE.as_bytes());
    proto::put_bytes(&mut body, 2, method.as_bytes());
    if !payload.is_empty() {
        proto::put_bytes(&mut body, 3, payload);
    }
    // The AA gives up when we do (ttrpc servers honour timeout_nano).
    proto::put_varint_field(
        &mut body,
        4,
        timeout.as_nanos().min(i64::MAX as u128) as u64,
    );
    let len = u32::try_from(body.len()).map_err(|_| AttestError::AaOversized {
        socket: at(),
        len: u32::MAX,
        max: FRAME_MAX,
    })?;
    let mut frame = Vec::with_capacity(HEADER_LEN + body.len());
    frame.extend_from_slice(&len.to_be_bytes());
    frame.extend_from_slice(&STREAM_ID.to_be_bytes());
    frame.push(TYPE_REQUEST);
    frame.push(0);
    frame.extend_from_slice(&body);
    stream.write_all(&frame).await.map_err(io("send"))?;

    let truncated = |e: io::Error| {
        if e.kind() == io::ErrorKind::UnexpectedEof {
            AttestError::AaTruncated { socket: at() }
        } else {
            io("receive")(e)
        }
    };
    let mut header = [0u8; HEADER_LEN];
    stream.read_exact(&mut header).await.map_err(truncated)?;
    let len = u32::from_be_bytes([header[0], header[1], header[2], header[3]]);
    let stream_id = u32::from_be_bytes([header[4], header[5], header[6], header[7]]);
    // The length is checked before anything is allocated for it.
    if len as usize > FRAME_MAX {
        return Err(AttestError::AaOversized {
            socket: at(),
            len,
            max: FRAME_MAX,
        });
    }
    if stream_id != STREAM_ID {
        return Err(AttestError::AaStream {
            socket: at(),
            got: stream_id,
            expected: STREAM_ID,
        });
    }
    if header[8] != TYPE_RESPONSE {
        return Err(AttestError::AaFrameType {
            socket: at(),
            got: header[8],
        });
    }
    let mut answer = vec![0u8; len as usize];
    stream.read_exact(&mut answer).await.map_err(truncated)?;

    let response = proto::response(&answer).map_err(|reason| AttestError::AaProtobuf {
        socket: at(),
        reason,
    })?;
    if response.code != 0 {
        return Err(AttestError::AaStatus {
            socket: at(),
            method,
            code: response.code,
            message: printable(&String::from_utf8_lossy(response.message), 200),
        });
    }
    Ok(response.payload.to_vec())
}

/// Just enough protobuf for ttrpc's Request/Response and the AA's one-field messages:
/// varint and length-delimited fields written; any field read, unknown ones skipped.
mod proto {
    pub fn put_varint(out: &mut Vec<u8>, mut v: u64) {
        while v >= 0x80 {
            out.push((v as u8) | 0x80);
            v >>= 7;
        }
        out.push(v as u8);
    }

    pub fn put_varint_field(out: &mut Vec<u8>, field: u32, v: u64) {
        put_varint(out, u64::from(field) << 3);
        put_varint(out, v);
    }

    pub fn put_bytes(out: &mut Vec<u8>, field: u32, bytes: &[u8]) {
        put_varint(out, (u64::from(field) << 3) | 2);
        put_varint(out, bytes.len() as u64);
        out.extend_from_slice(bytes);
    }

    pub enum Wire<'a> {
        Varint(u64),
        Bytes(&'a [u8]),
        /// fixed32 / fixed64: skipped, never read.
        Fixed,
    }

    pub struct Fields<'a>(pub &'a [u8]);

    impl<'a> Fields<'a> {
        fn take(&mut self, n: usize) -> Result<&'a [u8], &'static str> {
            if n > self.0.len() {
                return Err("a field runs past the message");
            }
            let (head, rest) = self.0.split_at(n);
            self.0 = rest;
            Ok(head)
        }

        fn varint(&mut self) -> Result<u64, &'static str> {
            let mut v = 0u64;
            for i in 0..10 {
                let b = *self.0.get(i).ok_or("a varint runs past the message")?;
                if i == 9 && b > 1 {
                    return Err("a varint over 64 bits");
                }
                v |= u64::from(b & 0x7f) << (7 * i);
                if b & 0x80 == 0 {
                    self.0 = &self.0[i + 1..];
                    return Ok(v);
                }
            }
            Err("a varint over 10 bytes")
        }

        /// The next (field number, value), or None at the end.
        pub fn next_field(&mut self) -> Result<Option<(u64, Wire<'a>)>, &'static str> {
            if self.0.is_empty() {
                return Ok(None);
            }
            let key = self.varint()?;
            let field = key >> 3;
            if field == 0 {
                return Err("field number 0");
            }
            let value = match key & 7 {
                0 => Wire::Varint(self.varint()?),
                1 => {
                    self.take(8)?;
                    Wire::Fixed
                }
                2 => {
                    let n = self.varint()?;
                    let n = usize::try_from(n).map_err(|_| "a length over the address space")?;
                    Wire::Bytes(self.take(n)?)
                }
                5 => {
                    self.take(4)?;
                    Wire::Fixed
                }
                _ => return Err("a group or an unknown wire type"),
            };
            Ok(Some((field, value)))
        }
    }

    /// A length-delimited field of a message (last one wins, as protobuf merges; absent is
    /// empty, the proto3 default).
    pub fn field_bytes(msg: &[u8], want: u64) -> Result<&[u8], &'static str> {
        let mut fields = Fields(msg);
        let mut found: &[u8] = &[];
        while let Some((field, value)) = fields.next_field()? {
            if field == want {
                match value {
                    Wire::Bytes(b) => found = b,
                    _ => return Err("a bytes field with another wire type"),
                }
            }
        }
        Ok(found)
    }

    pub struct Response<'a> {
        pub code: u64,
        pub message: &'a [u8],
        pub payload: &'a [u8],
    }

    /// `ttrpc.Response {Status status = 1; bytes payload = 2}`, `Status {code = 1;
    /// message = 2; details = 3}` (details skipped).
    pub fn response(msg: &[u8]) -> Result<Response<'_>, &'static str> {
        let mut out = Response {
            code: 0,
            message: &[],
            payload: &[],
        };
        let mut fields = Fields(msg);
        while let Some((field, value)) = fields.next_field()? {
            match (field, value) {
                (1, Wire::Bytes(status)) => {
                    let mut s = Fields(status);
                    while let Some((f, v)) = s.next_field()? {
                        match (f, v) {
                            (1, Wire::Varint(c)) => out.code = c,
                            (1, _) => return Err("a status code that is not a varint"),
                            (2, Wire::Bytes(m)) => out.message = m,
                            (2, _) => return Err("a status message that is not bytes"),
                            _ => {}
                        }
                    }
                }
                (1, _) => return Err("a status that is not a message"),
                (2, Wire::Bytes(p)) => out.payload = p,
                (2, _) => return Err("a payload that is not bytes"),
                _ => {}
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;
    use tokio::net::UnixListener;

    const RD: [u8; 48] = {
        let mut a = [0u8; 48];
        let mut i = 0;
        while i < 48 {
            a[i] = (i as u8).wrapping_mul(7).wrapping_add(1);
            i += 1;
        }
        a
    };

    fn padded() -> [u8; 64] {
        let mut p = [0u8; 64];
        p[..48].copy_from_slice(&RD);
        p
    }

    // ---- selection and sample

    fn vars(pairs: &'static [(&'static str, &'static str)]) -> impl Fn(&str) -> Option<PathBuf> {
        move |name| {
            pairs
                .iter()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| PathBuf::from(v))
        }
    }

    #[test]
    fn from_vars_choices_and_defaults() {
        let e = Attester::from_vars(vars(&[])).err().expect("unset refused");
        assert!(matches!(e, AttestError::Unset));
        let line = e.to_string();
        for word in ["SEALFS_ATTESTER", "tsm", "aa", "sample"] {
            assert!(line.contains(word), "{line}");
        }
        assert!(matches!(
            Attester::from_vars(vars(&[("SEALFS_ATTESTER", "")])),
            Err(AttestError::Unset)
        ));
        assert!(matches!(
            Attester::from_vars(vars(&[("SEALFS_ATTESTER", "tdx")])),
            Err(AttestError::Unknown(s)) if s == "tdx"
        ));
        assert!(matches!(
            Attester::from_vars(vars(&[("SEALFS_ATTESTER", "sample")])),
            Ok(Attester::Sample)
        ));
        match Attester::from_vars(vars(&[("SEALFS_ATTESTER", "tsm")])) {
            Ok(Attester::Tsm { root }) => assert_eq!(root, Path::new(DEFAULT_TSM_DIR)),
            _ => panic!("tsm"),
        }
        match Attester::from_vars(vars(&[
            ("SEALFS_ATTESTER", "tsm"),
            ("SEALFS_TSM_DIR", "/x"),
        ])) {
            Ok(Attester::Tsm { root }) => assert_eq!(root, Path::new("/x")),
            _ => panic!("tsm dir"),
        }
        match Attester::from_vars(vars(&[("SEALFS_ATTESTER", "aa")])) {
            Ok(Attester::Aa { socket }) => assert_eq!(
                socket,
                Path::new("/run/confidential-containers/attestation-agent/attestation-agent.sock")
            ),
            _ => panic!("aa"),
        }
        match Attester::from_vars(vars(&[
            ("SEALFS_ATTESTER", "aa"),
            ("SEALFS_AA_SOCKET", "/s"),
        ])) {
            Ok(Attester::Aa { socket }) => assert_eq!(socket, Path::new("/s")),
            _ => panic!("aa socket"),
        }
    }

    /// Captures what tracing writes (the sample warning).
    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);
    impl io::Write for Captured {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn sample_evidence_shape_and_warning() {
        let logs = Captured::default();
        let sink = logs.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || sink.clone())
            .with_ansi(false)
            .finish();
        let (tee, ev) = tracing::subscriber::with_default(subscriber, || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .build()
                .unwrap();
            rt.block_on(async {
                let a = Attester::Sample;
                (a.tee().await.unwrap(), a.evidence(&RD).await.unwrap())
            })
        });
        assert_eq!(tee, "sample");
        assert_eq!(ev.tee, "sample");
        let b64 = base64::engine::general_purpose::STANDARD.encode(RD);
        assert_eq!(
            ev.primary,
            serde_json::json!({"svn": "1", "report_data": b64})
        );
        // Exactly two keys, the report data unpadded (48 bytes, 64 base64 characters).
        assert_eq!(ev.primary.as_object().unwrap().len(), 2);
        assert_eq!(b64.len(), 64);
        assert_eq!(
            b64,
            "AQgPFh0kKzI5QEdOVVxjanF4f4aNlJuiqbC3vsXM09rh6O/2/QQLEhkgJy41PENK"
        );
        let text = String::from_utf8(logs.0.lock().unwrap().clone()).unwrap();
        assert!(text.contains("WARN"), "{text}");
        assert!(
            text.contains("no hardware evidence: tests and demos only"),
            "{text}"
        );
    }

    #[tokio::test]
    async fn report_data_over_64_bytes_refused() {
        assert!(matches!(
            Attester::Sample.evidence(&[0; 65]).await,
            Err(AttestError::ReportDataTooLong(65))
        ));
    }

    // ---- configfs-tsm, with a test that plays the kernel in a plain directory

    fn tdx_quote(version: u16, report_data: &[u8; 64]) -> Vec<u8> {
        let mut q = vec![0u8; 5000];
        q[0..2].copy_from_slice(&version.to_le_bytes());
        q[2..4].copy_from_slice(&2u16.to_le_bytes());
        q[4..8].copy_from_slice(&0x81u32.to_le_bytes());
        let at = if version == 5 { 54 + 520 } else { 48 + 520 };
        q[at..at + 64].copy_from_slice(report_data);
        q
    }

    #[derive(Default)]
    struct FakeKernel {
        provider: &'static str,
        /// generation after the inblob write (the kernel's would be 1)
        generation_after: u64,
        /// outblob override (else a v4 TDX quote or an SEV-SNP report of the inblob)
        outblob: Option<Vec<u8>>,
        /// auxblob (SEV-SNP's certificate table), when the host gives one
        auxblob: Option<Vec<u8>>,
        inblob: Mutex<Option<Vec<u8>>>,
        made: Mutex<Vec<PathBuf>>,
    }

    impl Configfs for FakeKernel {
        fn made(&self, dir: &Path) -> io::Result<()> {
            self.made.lock().unwrap().push(dir.to_path_buf());
            std::fs::write(dir.join("provider"), format!("{}\n", self.provider))?;
            std::fs::write(dir.join("generation"), "0\n")
        }
        fn wrote(&self, dir: &Path) -> io::Result<()> {
            let inblob = std::fs::read(dir.join("inblob"))?;
            let rd = inblob.as_slice().try_into().unwrap();
            let q = match &self.outblob {
                Some(o) => o.clone(),
                None if self.provider == "sev_guest" => crate::keys::snp::tests::report(rd, 0),
                None => tdx_quote(4, rd),
            };
            *self.inblob.lock().unwrap() = Some(inblob);
            std::fs::write(dir.join("outblob"), q)?;
            if let Some(a) = &self.auxblob {
                std::fs::write(dir.join("auxblob"), a)?;
            }
            std::fs::write(
                dir.join("generation"),
                format!("{}\n", self.generation_after),
            )
        }
        fn removing(&self, dir: &Path) {
            for e in std::fs::read_dir(dir).unwrap() {
                std::fs::remove_file(e.unwrap().path()).unwrap();
            }
        }
    }

    fn tdx_kernel() -> FakeKernel {
        FakeKernel {
            provider: "tdx_guest",
            generation_after: 1,
            ..FakeKernel::default()
        }
    }

    fn assert_root_empty(root: &Path, kernel: &FakeKernel) {
        assert_eq!(kernel.made.lock().unwrap().len(), 1, "one report dir made");
        let left: Vec<_> = std::fs::read_dir(root).unwrap().collect();
        assert!(left.is_empty(), "report dir left behind: {left:?}");
    }

    async fn run_tsm(
        kernel: FakeKernel,
    ) -> (
        Result<Evidence, AttestError>,
        Arc<FakeKernel>,
        tempfile::TempDir,
    ) {
        let root = tempfile::tempdir().unwrap();
        let kernel = Arc::new(kernel);
        let r = tsm_evidence(root.path().to_path_buf(), &RD, kernel.clone()).await;
        assert_root_empty(root.path(), &kernel);
        (r, kernel, root)
    }

    #[tokio::test]
    async fn tsm_tdx_quote_evidence() {
        let (r, kernel, _root) = run_tsm(tdx_kernel()).await;
        let ev = r.unwrap();
        assert_eq!(ev.tee, "tdx");
        // The inblob is the report data zero-padded at the end to 64 bytes.
        let inblob = kernel.inblob.lock().unwrap().clone().unwrap();
        assert_eq!(inblob, padded());
        let quote = base64::engine::general_purpose::STANDARD.encode(tdx_quote(4, &padded()));
        assert_eq!(
            ev.primary,
            serde_json::json!({"cc_eventlog": null, "quote": quote})
        );
        assert_eq!(ev.primary.as_object().unwrap().len(), 2);
    }

    #[tokio::test]
    async fn tsm_quote_v5_accepted() {
        let (r, _, _root) = run_tsm(FakeKernel {
            outblob: Some(tdx_quote(5, &padded())),
            ..tdx_kernel()
        })
        .await;
        assert_eq!(r.unwrap().tee, "tdx");
    }

    #[tokio::test]
    async fn tsm_unknown_provider_refused() {
        let (r, kernel, _root) = run_tsm(FakeKernel {
            provider: "foo_guest",
            ..tdx_kernel()
        })
        .await;
        assert!(matches!(r, Err(AttestError::TsmUnknownProvider(p)) if p == "foo_guest"));
        // Refused before anything was written.
        assert!(kernel.inblob.lock().unwrap().is_none());
    }

    fn snp_kernel() -> FakeKernel {
        FakeKernel {
            provider: "sev_guest",
            ..tdx_kernel()
        }
    }

    /// The evidence read back as the verifier reads it (serde into the sev crate's types),
    /// written out again as a raw report.
    type Certs = Option<Vec<(String, Vec<u8>)>>;

    fn snp_round_trip(primary: &serde_json::Value) -> (Vec<u8>, Certs) {
        let ev: crate::keys::snp::SnpEvidence = serde_json::from_value(primary.clone()).unwrap();
        let mut raw = Vec::new();
        ev.attestation_report.write_bytes(&mut raw).unwrap();
        let certs = ev.cert_chain.map(|c| {
            c.into_iter()
                .map(|e| (e.cert_type.to_string(), e.data))
                .collect()
        });
        (raw, certs)
    }

    #[tokio::test]
    async fn tsm_snp_report_evidence() {
        use crate::keys::snp::tests::{report, table, ARK, ASK, VCEK};
        // No certificate table: cert_chain null (the verifier fetches the VCEK itself).
        let (r, kernel, _root) = run_tsm(snp_kernel()).await;
        let ev = r.unwrap();
        assert_eq!(ev.tee, "snp");
        assert_eq!(kernel.inblob.lock().unwrap().clone().unwrap(), padded());
        let keys: Vec<_> = ev.primary.as_object().unwrap().keys().cloned().collect();
        assert_eq!(keys, ["attestation_report", "cert_chain"]);
        assert!(ev.primary["cert_chain"].is_null());
        // The report data is the padded hash, as the sev crate's JSON array of numbers.
        let rd: Vec<u8> =
            serde_json::from_value(ev.primary["attestation_report"]["report_data"].clone())
                .unwrap();
        assert_eq!(rd, padded());
        assert_eq!(ev.primary["attestation_report"]["version"], 3);
        assert_eq!(ev.primary["attestation_report"]["vmpl"], 0);
        let (raw, certs) = snp_round_trip(&ev.primary);
        assert_eq!(
            raw,
            report(&padded(), 0),
            "the evidence carries the report whole"
        );
        assert!(certs.is_none());

        // An empty auxblob is no table either.
        let (r, _, _root) = run_tsm(FakeKernel {
            auxblob: Some(Vec::new()),
            ..snp_kernel()
        })
        .await;
        assert!(r.unwrap().primary["cert_chain"].is_null());

        // The host's VCEK, ASK and ARK, in the attestation agent's order.
        let (r, _, _root) = run_tsm(FakeKernel {
            auxblob: Some(table(&[(ARK, b"ark"), (ASK, b"ask"), (VCEK, b"vcek")])),
            ..snp_kernel()
        })
        .await;
        let ev = r.unwrap();
        assert_eq!(ev.primary["cert_chain"][1]["cert_type"], "VCEK");
        let (_, certs) = snp_round_trip(&ev.primary);
        assert_eq!(
            certs.unwrap(),
            [(ARK, &b"ark"[..]), (VCEK, b"vcek"), (ASK, b"ask")]
                .map(|(g, d)| (g.to_string(), d.to_vec()))
        );
    }

    #[tokio::test]
    async fn tsm_hostile_snp_report_refused() {
        use crate::keys::snp::tests::{report, table, VCEK};
        let bad = |r: Result<Evidence, AttestError>, want: &str| match r {
            Err(AttestError::TsmBadQuote { reason, .. }) => {
                assert!(reason.contains(want), "{reason:?} lacks {want:?}")
            }
            other => panic!(
                "expected TsmBadQuote({want}), got {:?}",
                other.map(|e| e.tee)
            ),
        };
        // Another report data (a replayed report).
        let (r, _, _root) = run_tsm(FakeKernel {
            outblob: Some(report(&[9; 64], 0)),
            ..snp_kernel()
        })
        .await;
        bad(r, "REPORT_DATA is not the report data written");
        // Another VMPL, a truncated report, a TDX quote under sev_guest.
        let (r, _, _root) = run_tsm(FakeKernel {
            outblob: Some(report(&padded(), 2)),
            ..snp_kernel()
        })
        .await;
        bad(r, "VMPL 2");
        let mut short = report(&padded(), 0);
        short.truncate(1000);
        let (r, _, _root) = run_tsm(FakeKernel {
            outblob: Some(short),
            ..snp_kernel()
        })
        .await;
        bad(r, "1000 bytes");
        let (r, _, _root) = run_tsm(FakeKernel {
            outblob: Some(tdx_quote(4, &padded())),
            ..snp_kernel()
        })
        .await;
        bad(r, "an SEV-SNP attestation report is 1184");
        // A table whose certificate runs past the blob.
        let mut t = table(&[(VCEK, b"vcek")]);
        t.truncate(t.len() - 1);
        let (r, _, _root) = run_tsm(FakeKernel {
            auxblob: Some(t),
            ..snp_kernel()
        })
        .await;
        bad(r, "past the blob's end");
        // An auxblob over the cap.
        let (r, _, _root) = run_tsm(FakeKernel {
            auxblob: Some(vec![1; crate::keys::snp::AUXBLOB_MAX + 1]),
            ..snp_kernel()
        })
        .await;
        assert!(
            matches!(
                r,
                Err(AttestError::TsmOversized {
                    attr: "auxblob",
                    ..
                })
            ),
            "{:?}",
            r.err()
        );
    }

    #[tokio::test]
    async fn tsm_oversized_outblob_refused() {
        let mut big = tdx_quote(4, &padded());
        big.resize(OUTBLOB_MAX + 1, 0);
        let (r, _, _root) = run_tsm(FakeKernel {
            outblob: Some(big),
            ..tdx_kernel()
        })
        .await;
        assert!(
            matches!(
                r,
                Err(AttestError::TsmOversized {
                    attr: "outblob",
                    max: OUTBLOB_MAX,
                    ..
                })
            ),
            "{:?}",
            r.err()
        );
        // Exactly at the cap is fine.
        let mut edge = tdx_quote(4, &padded());
        edge.resize(OUTBLOB_MAX, 0);
        let (r, _, _root) = run_tsm(FakeKernel {
            outblob: Some(edge),
            ..tdx_kernel()
        })
        .await;
        assert!(r.is_ok());
    }

    #[tokio::test]
    async fn tsm_generation_change_refused() {
        let (r, _, _root) = run_tsm(FakeKernel {
            generation_after: 2,
            ..tdx_kernel()
        })
        .await;
        assert!(
            matches!(
                r,
                Err(AttestError::TsmGeneration {
                    before: 0,
                    after: 2,
                    ..
                })
            ),
            "{:?}",
            r.err()
        );
    }

    #[tokio::test]
    async fn tsm_quote_of_other_report_data_refused() {
        let (r, _, _root) = run_tsm(FakeKernel {
            outblob: Some(tdx_quote(4, &[9; 64])),
            ..tdx_kernel()
        })
        .await;
        assert!(matches!(r, Err(AttestError::TsmBadQuote { .. })));
        let (r, _, _root) = run_tsm(FakeKernel {
            outblob: Some(vec![1, 2, 3]),
            ..tdx_kernel()
        })
        .await;
        assert!(matches!(r, Err(AttestError::TsmBadQuote { .. })));
    }

    #[tokio::test]
    async fn tsm_tee_and_missing_root() {
        let root = tempfile::tempdir().unwrap();
        let kernel = tdx_kernel();
        assert_eq!(tsm_tee(root.path(), &kernel).unwrap(), "tdx");
        assert_root_empty(root.path(), &kernel);

        let gone = root.path().join("absent");
        let a = Attester::Tsm { root: gone };
        assert!(matches!(a.tee().await, Err(AttestError::TsmMissing(_))));
        assert!(matches!(
            a.evidence(&RD).await,
            Err(AttestError::TsmMissing(_))
        ));
    }

    // ---- the AA over ttrpc, against a fake AA on a unix socket

    /// A request as the fake AA sees it.
    struct Call {
        stream_id: u32,
        kind: u8,
        service: String,
        method: String,
        payload: Vec<u8>,
        timeout_nano: u64,
    }

    async fn read_call(s: &mut tokio::net::UnixStream) -> (Call, Vec<u8>) {
        let mut h = [0u8; 10];
        s.read_exact(&mut h).await.unwrap();
        let len = u32::from_be_bytes(h[0..4].try_into().unwrap()) as usize;
        let mut body = vec![0; len];
        s.read_exact(&mut body).await.unwrap();
        let mut call = Call {
            stream_id: u32::from_be_bytes(h[4..8].try_into().unwrap()),
            kind: h[8],
            service: String::new(),
            method: String::new(),
            payload: Vec::new(),
            timeout_nano: 0,
        };
        let mut f = proto::Fields(&body);
        while let Some((n, v)) = f.next_field().unwrap() {
            match (n, v) {
                (1, proto::Wire::Bytes(b)) => call.service = String::from_utf8(b.to_vec()).unwrap(),
                (2, proto::Wire::Bytes(b)) => call.method = String::from_utf8(b.to_vec()).unwrap(),
                (3, proto::Wire::Bytes(b)) => call.payload = b.to_vec(),
                (4, proto::Wire::Varint(t)) => call.timeout_nano = t,
                _ => panic!("unexpected request field {n}"),
            }
        }
        let mut raw = h.to_vec();
        raw.extend_from_slice(&body);
        (call, raw)
    }

    fn frame(stream_id: u32, kind: u8, body: &[u8]) -> Vec<u8> {
        let mut f = (body.len() as u32).to_be_bytes().to_vec();
        f.extend_from_slice(&stream_id.to_be_bytes());
        f.push(kind);
        f.push(0);
        f.extend_from_slice(body);
        f
    }

    /// A Response as ttrpc-rust's server writes it: status {code 0, message ""} then the payload.
    fn ok_response(payload: &[u8]) -> Vec<u8> {
        let mut status = Vec::new();
        proto::put_varint_field(&mut status, 1, 0);
        let mut r = Vec::new();
        proto::put_bytes(&mut r, 1, &status);
        proto::put_bytes(&mut r, 2, payload);
        r
    }

    type Answer = Box<dyn Fn(&Call) -> Vec<u8> + Send + Sync>;

    /// A fake AA: each connection gets one request and `answer`'s bytes, then is closed
    /// (or held open when `hold` is set, so a client reading more would block).
    fn fake_aa(answer: Answer, hold: bool) -> (tempfile::TempDir, PathBuf, Arc<Mutex<Vec<Call>>>) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("aa.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let calls = Arc::new(Mutex::new(Vec::new()));
        let seen = calls.clone();
        tokio::spawn(async move {
            loop {
                let (mut s, _) = listener.accept().await.unwrap();
                let (call, _) = read_call(&mut s).await;
                let out = answer(&call);
                seen.lock().unwrap().push(call);
                s.write_all(&out).await.unwrap();
                if hold {
                    tokio::spawn(async move {
                        tokio::time::sleep(Duration::from_secs(30)).await;
                        drop(s);
                    });
                }
            }
        });
        (dir, path, calls)
    }

    fn good_aa(call: &Call) -> Vec<u8> {
        let mut p = Vec::new();
        match call.method.as_str() {
            "GetTeeType" => proto::put_bytes(&mut p, 1, b"tdx"),
            "GetEvidence" => {
                let rd = proto::field_bytes(&call.payload, 1).unwrap();
                let ev = serde_json::json!({
                    "cc_eventlog": "AAAA",
                    "quote": base64::engine::general_purpose::STANDARD.encode(rd),
                });
                proto::put_bytes(&mut p, 1, ev.to_string().as_bytes());
            }
            _ => panic!("method {}", call.method),
        }
        frame(call.stream_id, TYPE_RESPONSE, &ok_response(&p))
    }

    #[tokio::test]
    async fn aa_tee_and_evidence() {
        let (_dir, socket, calls) = fake_aa(Box::new(good_aa), false);
        let a = Attester::Aa {
            socket: socket.clone(),
        };
        assert_eq!(a.tee().await.unwrap(), "tdx");
        let ev = a.evidence(&RD).await.unwrap();
        assert_eq!(ev.tee, "tdx");
        assert_eq!(
            ev.primary,
            serde_json::json!({
                "cc_eventlog": "AAAA",
                "quote": base64::engine::general_purpose::STANDARD.encode(RD),
            })
        );
        let calls = calls.lock().unwrap();
        assert_eq!(calls.len(), 3);
        for c in calls.iter() {
            assert_eq!(c.stream_id, 1);
            assert_eq!(c.kind, 1);
            assert_eq!(c.service, "attestation_agent.AttestationAgentService");
            assert_eq!(c.timeout_nano, 10_000_000_000);
        }
        assert_eq!(calls[0].method, "GetTeeType");
        assert!(calls[0].payload.is_empty());
        assert_eq!(calls[2].method, "GetEvidence");
        // The AA gets the 48 bytes as they are (its attester pads).
        let mut want = vec![0x0a, 48];
        want.extend_from_slice(&RD);
        assert_eq!(calls[2].payload, want);
    }

    #[tokio::test]
    async fn aa_request_bytes_exact() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("aa.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let server = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let (_, raw) = read_call(&mut s).await;
            let mut p = Vec::new();
            proto::put_bytes(&mut p, 1, b"snp");
            s.write_all(&frame(1, 2, &ok_response(&p))).await.unwrap();
            raw
        });
        assert_eq!(aa_tee(&path, AA_TIMEOUT).await.unwrap(), "snp");
        let raw = server.await.unwrap();
        let mut body = vec![0x0a, 41];
        body.extend_from_slice(b"attestation_agent.AttestationAgentService");
        body.extend_from_slice(&[0x12, 10]);
        body.extend_from_slice(b"GetTeeType");
        // timeout_nano = 10 s: field 4, varint 10_000_000_000
        body.extend_from_slice(&[0x20, 0x80, 0xc8, 0xaf, 0xa0, 0x25]);
        let mut want = vec![0, 0, 0, body.len() as u8, 0, 0, 0, 1, 1, 0];
        want.extend_from_slice(&body);
        assert_eq!(raw, want);
    }

    #[tokio::test]
    async fn aa_answer_without_status_and_with_unknown_fields() {
        // No status (OK by default) and unknown fields of every wire type, skipped.
        let (_dir, socket, _) = fake_aa(
            Box::new(|call| {
                let mut p = Vec::new();
                proto::put_varint_field(&mut p, 7, 300);
                proto::put_bytes(&mut p, 1, b"sample");
                p.extend_from_slice(&[(9 << 3) | 5, 1, 2, 3, 4]);
                p.extend_from_slice(&[(10 << 3) | 1, 1, 2, 3, 4, 5, 6, 7, 8]);
                let mut r = Vec::new();
                proto::put_bytes(&mut r, 5, b"future");
                proto::put_bytes(&mut r, 2, &p);
                frame(call.stream_id, 2, &r)
            }),
            false,
        );
        assert_eq!(aa_tee(&socket, AA_TIMEOUT).await.unwrap(), "sample");
    }

    async fn aa_err(answer: Answer, hold: bool) -> AttestError {
        let (_dir, socket, _) = fake_aa(answer, hold);
        aa_evidence(&socket, &RD, Duration::from_secs(3))
            .await
            .err()
            .expect("refused")
    }

    #[tokio::test]
    async fn aa_error_status() {
        let e = aa_err(
            Box::new(|call| {
                let mut status = Vec::new();
                proto::put_varint_field(&mut status, 1, 13);
                proto::put_bytes(
                    &mut status,
                    2,
                    b"[ERROR:attestation-agent] AA-KBC get tee type failed\n",
                );
                let mut r = Vec::new();
                proto::put_bytes(&mut r, 1, &status);
                frame(call.stream_id, 2, &r)
            }),
            false,
        )
        .await;
        match &e {
            AttestError::AaStatus {
                method,
                code,
                message,
                ..
            } => {
                assert_eq!(*method, "GetTeeType");
                assert_eq!(*code, 13);
                // Printable: the newline is escaped, the line stays one line.
                assert!(message.ends_with("failed\\n"), "{message}");
            }
            other => panic!("{other:?}"),
        }
        assert!(!e.to_string().contains('\n'));
    }

    #[tokio::test]
    async fn aa_wrong_stream_id() {
        let e = aa_err(
            Box::new(|call| frame(call.stream_id + 2, 2, &ok_response(b""))),
            false,
        )
        .await;
        assert!(
            matches!(
                e,
                AttestError::AaStream {
                    got: 3,
                    expected: 1,
                    ..
                }
            ),
            "{e:?}"
        );
    }

    #[tokio::test]
    async fn aa_wrong_frame_type() {
        let e = aa_err(
            Box::new(|call| frame(call.stream_id, 3, &ok_response(b""))),
            false,
        )
        .await;
        assert!(
            matches!(e, AttestError::AaFrameType { got: 3, .. }),
            "{e:?}"
        );
    }

    #[tokio::test]
    async fn aa_oversized_length_refused_without_reading() {
        // A 4 GiB announcement and no body, the connection held open: a client that
        // allocated and read would sit until the timeout instead.
        let started = std::time::Instant::now();
        let e = aa_err(
            Box::new(|call| {
                let mut h = 0xffff_fff0u32.to_be_bytes().to_vec();
                h.extend_from_slice(&call.stream_id.to_be_bytes());
                h.extend_from_slice(&[2, 0]);
                h
            }),
            true,
        )
        .await;
        assert!(
            matches!(
                e,
                AttestError::AaOversized {
                    len: 0xffff_fff0,
                    max: FRAME_MAX,
                    ..
                }
            ),
            "{e:?}"
        );
        assert!(started.elapsed() < Duration::from_secs(2));
        // Just over our cap too.
        let e = aa_err(
            Box::new(|call| {
                let mut h = ((FRAME_MAX + 1) as u32).to_be_bytes().to_vec();
                h.extend_from_slice(&call.stream_id.to_be_bytes());
                h.extend_from_slice(&[2, 0]);
                h
            }),
            true,
        )
        .await;
        assert!(matches!(e, AttestError::AaOversized { .. }), "{e:?}");
    }

    #[tokio::test]
    async fn aa_truncated_frames() {
        // A body shorter than announced, then close.
        let e = aa_err(
            Box::new(|call| {
                let mut f = frame(call.stream_id, 2, &ok_response(b"0123456789"));
                f.truncate(f.len() - 4);
                f
            }),
            false,
        )
        .await;
        assert!(matches!(e, AttestError::AaTruncated { .. }), "{e:?}");
        // Half a header, then close.
        let e = aa_err(Box::new(|_| vec![0, 0, 0]), false).await;
        assert!(matches!(e, AttestError::AaTruncated { .. }), "{e:?}");
        // A protobuf field running past its frame.
        let e = aa_err(
            Box::new(|call| frame(call.stream_id, 2, &[0x12, 50, b'x'])),
            false,
        )
        .await;
        assert!(matches!(e, AttestError::AaProtobuf { .. }), "{e:?}");
    }

    #[tokio::test]
    async fn aa_silence_times_out() {
        let (_dir, socket, _) = fake_aa(Box::new(|_| Vec::new()), true);
        let e = aa_tee(&socket, Duration::from_millis(300))
            .await
            .err()
            .unwrap();
        assert!(matches!(e, AttestError::AaTimeout { .. }), "{e:?}");
    }

    /// What `aa_tee` makes of the AA's `GetTeeType` answer `tee`.
    async fn aa_tee_answer(tee: &'static [u8]) -> Result<String, AttestError> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("aa.sock");
        let listener = UnixListener::bind(&path).unwrap();
        tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            read_call(&mut s).await;
            let mut p = Vec::new();
            proto::put_bytes(&mut p, 1, tee);
            s.write_all(&frame(1, 2, &ok_response(&p))).await.unwrap();
        });
        aa_tee(&path, AA_TIMEOUT).await
    }

    #[tokio::test]
    async fn aa_tee_names_are_kbs_types_names() {
        // kbs-types 0.18's hyphenated names pass; anything else is refused.
        for ok in [
            "az-snp-vtpm",
            "az-tdx-vtpm",
            "nvidia-dpu",
            "snp",
            "hygondcu",
        ] {
            assert_eq!(aa_tee_answer(ok.as_bytes()).await.unwrap(), ok);
        }
        for bad in [
            &b"-snp"[..],
            b"Snp",
            b"snp vtpm",
            b"snp\n",
            b"",
            &[b'a'; 33],
        ] {
            let r = aa_tee_answer(bad).await;
            assert!(
                matches!(r, Err(AttestError::AaTee { .. })),
                "{bad:?}: {r:?}",
                r = r.map_err(|e| e.to_string())
            );
        }
    }

    #[tokio::test]
    async fn aa_bad_tee_and_bad_evidence() {
        let e = aa_err(
            Box::new(|call| {
                let mut p = Vec::new();
                proto::put_bytes(&mut p, 1, b"TDX\n");
                frame(call.stream_id, 2, &ok_response(&p))
            }),
            false,
        )
        .await;
        assert!(matches!(e, AttestError::AaTee { .. }), "{e:?}");

        for evidence in [&b"{\"quote\": \"secret-bytes"[..], b"[1,2]", b""] {
            let evidence = evidence.to_vec();
            let e = aa_err(
                Box::new(move |call| {
                    let mut p = Vec::new();
                    if call.method == "GetTeeType" {
                        proto::put_bytes(&mut p, 1, b"tdx");
                    } else {
                        proto::put_bytes(&mut p, 1, &evidence);
                    }
                    frame(call.stream_id, 2, &ok_response(&p))
                }),
                false,
            )
            .await;
            assert!(matches!(e, AttestError::AaEvidence { .. }), "{e:?}");
            assert!(!e.to_string().contains("secret"), "{e}");
        }
    }

    #[tokio::test]
    async fn aa_no_socket() {
        let dir = tempfile::tempdir().unwrap();
        let a = Attester::Aa {
            socket: dir.path().join("none.sock"),
        };
        assert!(matches!(
            a.tee().await,
            Err(AttestError::AaIo { op: "connect", .. })
        ));
    }

    #[test]
    fn protobuf_reader_is_strict() {
        // Varint over 10 bytes / 64 bits, a group, field 0.
        for bad in [
            &[
                0x08, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x7f,
            ][..],
            &[
                0x08, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x02,
            ],
            &[0x0b],
            &[0x02, 0x00],
            &[0x08],
        ] {
            assert!(proto::response(bad).is_err(), "{bad:?}");
        }
        // Max u64 varint is fine.
        let mut m = Vec::new();
        proto::put_bytes(&mut m, 2, b"p");
        proto::put_varint_field(&mut m, 3, u64::MAX);
        let r = proto::response(&m).unwrap();
        assert_eq!(r.payload, b"p");
        assert_eq!(r.code, 0);
    }
}
