//! `tpm2:<path>`: a key file sealed to this host's TPM 2.0 under a PCR policy.
//!
//! `sealfs tpm2 seal --key-file KEK --pcrs sha256:0,2,4,7 OUT` asks the TPM to seal the key
//! file's line (what `keygen` writes) as a sealed data object (keyedhash, data supplied by
//! us, `userWithAuth` clear: only its policy opens it) whose policy is `PolicyPCR` over the
//! *current* values of those PCRs. Its parent is the owner hierarchy's storage root key made
//! from the TCG template (ECC P-256, see [`srk_template`]), re-created on each use: it is
//! derived from the TPM's owner seed, so the blobs load only under this TPM (and only until
//! its owner hierarchy is cleared). OUT holds the public and private blobs (marshalled
//! `TPM2B_PUBLIC` / `TPM2B_PRIVATE`, as `tpm2_create -u/-r` writes them), the PCR bank, the
//! selection and the values they were sealed against, in a small strict JSON file
//! ([`SealedFile`]) read back as hostile input.
//!
//! `--key tpm2:OUT` reads the PCRs of that selection first: a host whose values differ is
//! refused with the PCRs named (`sha256:7`), before the TPM is asked to load anything. Then
//! the TPM checks the policy itself and releases the key file's line, which becomes a
//! [`FileKek`]: it opens exactly the slots that key file opens. Every transient object
//! (primary, loaded object, sessions) is flushed on every path, errors included: a TPM
//! without a resource manager (swtpm over TCP) has 3 object slots.
//!
//! The TPM is reached through `SEALFS_TPM2_TCTI` (default `device:/dev/tpmrm0`, the kernel
//! resource manager); the TSS library is only built with the cargo feature `tpm2`.

use std::path::Path;

use zeroize::Zeroizing;

use super::file::{FileKek, MAX_KEY_FILE};
use super::KeyError;

/// The environment variable naming the TCTI (the TSS's "how to reach the TPM").
pub const TCTI_VAR: &str = "SEALFS_TPM2_TCTI";
/// The kernel's resource manager: it flushes what a crashed process left behind.
pub const DEFAULT_TCTI: &str = "device:/dev/tpmrm0";
/// A sealed file is about 1 KiB (two blobs in hex and 24 PCR values at most); anything
/// beyond 8 KiB is not one, and is not read further.
pub const MAX_SEALED_FILE: usize = 8192;
/// The `format` field: the file's version.
const FORMAT: &str = "sealfs-tpm2-v1";
/// The `parent` field: the storage key the blobs were made under ([`srk_template`]).
const PARENT: &str = "owner-srk-ecc-p256";
/// `TPM_CC_PolicyPCR`, for the policy digest computed here ([`policy_digest`]).
const TPM_CC_POLICY_PCR: u32 = 0x0000_017F;
/// Bounds on the blobs: a keyedhash public with a SHA-256 policy is ~80 bytes, its private
/// ~130; these are the TPM's own buffer limits (`TPMT_PUBLIC`, `TPM2B_PRIVATE`), rounded.
const MAX_PUBLIC: usize = 1024;
const MAX_PRIVATE: usize = 1024;
/// The most PCRs a PC client TPM has (0..=23).
const PCR_COUNT: u8 = 24;

/// A PCR bank: the hash whose PCR values are selected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bank {
    Sha1,
    Sha256,
    Sha384,
    Sha512,
}

impl Bank {
    pub fn name(self) -> &'static str {
        match self {
            Bank::Sha1 => "sha1",
            Bank::Sha256 => "sha256",
            Bank::Sha384 => "sha384",
            Bank::Sha512 => "sha512",
        }
    }

    fn from_name(s: &str) -> Option<Self> {
        Some(match s {
            "sha1" => Bank::Sha1,
            "sha256" => Bank::Sha256,
            "sha384" => Bank::Sha384,
            "sha512" => Bank::Sha512,
            _ => return None,
        })
    }

    /// The length of one PCR value in this bank.
    pub fn digest_len(self) -> usize {
        match self {
            Bank::Sha1 => 20,
            Bank::Sha256 => 32,
            Bank::Sha384 => 48,
            Bank::Sha512 => 64,
        }
    }

    /// `TPM_ALG_ID`, as `TPMS_PCR_SELECTION` marshals it.
    fn alg_id(self) -> u16 {
        match self {
            Bank::Sha1 => 0x0004,
            Bank::Sha256 => 0x000B,
            Bank::Sha384 => 0x000C,
            Bank::Sha512 => 0x000D,
        }
    }
}

/// One bank and some of its PCRs: `sha256:0,2,4,7`. The PCRs are kept sorted and unique,
/// the order in which the TPM concatenates their values for `PolicyPCR`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PcrSelection {
    pub bank: Bank,
    pub pcrs: Vec<u8>,
}

impl std::str::FromStr for PcrSelection {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let shown = crate::format::naming::printable(s, 64);
        let (bank, list) = s
            .split_once(':')
            .ok_or_else(|| format!("{shown:?}: expected BANK:PCR,PCR,… (e.g. sha256:0,2,4,7)"))?;
        let bank = Bank::from_name(bank)
            .ok_or_else(|| format!("{shown:?}: the bank is sha1, sha256, sha384 or sha512"))?;
        let mut pcrs = Vec::new();
        for p in list.split(',') {
            let n: u8 = p
                .parse()
                .ok()
                .filter(|n| *n < PCR_COUNT)
                .ok_or_else(|| format!("{shown:?}: a PCR is a number from 0 to 23"))?;
            if pcrs.contains(&n) {
                return Err(format!("{shown:?}: PCR {n} given twice"));
            }
            pcrs.push(n);
        }
        pcrs.sort_unstable();
        Ok(Self { bank, pcrs })
    }
}

impl std::fmt::Display for PcrSelection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let list: Vec<String> = self.pcrs.iter().map(u8::to_string).collect();
        write!(f, "{}:{}", self.bank.name(), list.join(","))
    }
}

impl PcrSelection {
    /// `TPML_PCR_SELECTION` with this one bank, a 3-octet bitmap (PCRs 0..=23), as the TPM
    /// hashes it into a `PolicyPCR` digest.
    fn marshal(&self) -> Vec<u8> {
        let mut bitmap = [0u8; 3];
        for p in &self.pcrs {
            bitmap[usize::from(p / 8)] |= 1 << (p % 8);
        }
        let mut out = Vec::with_capacity(10);
        out.extend_from_slice(&1u32.to_be_bytes());
        out.extend_from_slice(&self.bank.alg_id().to_be_bytes());
        out.push(3);
        out.extend_from_slice(&bitmap);
        out
    }
}

/// The `PolicyPCR` digest for `values` (one per PCR of `sel`, in order), in a SHA-256
/// policy session started from the empty policy: what the sealed object's `authPolicy`
/// must be. Computed here to check a sealed file without a TPM (its recorded values must
/// be those its policy names) and, at seal, to check the TPM's trial session against.
pub fn policy_digest(sel: &PcrSelection, values: &[Vec<u8>]) -> [u8; 32] {
    let sha256 = |b: &[u8]| ring::digest::digest(&ring::digest::SHA256, b);
    let pcr_digest = sha256(&values.concat());
    let mut m = vec![0u8; 32];
    m.extend_from_slice(&TPM_CC_POLICY_PCR.to_be_bytes());
    m.extend_from_slice(&sel.marshal());
    m.extend_from_slice(pcr_digest.as_ref());
    let mut out = [0u8; 32];
    out.copy_from_slice(sha256(&m).as_ref());
    out
}

/// The sealed file as stored (JSON): every field required, no other field accepted.
#[derive(serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct SealedFile {
    format: String,
    parent: String,
    pcr_bank: String,
    pcrs: Vec<u8>,
    /// Hex, one per PCR of `pcrs`, in that order.
    pcr_values: Vec<String>,
    /// Hex of a marshalled `TPM2B_PUBLIC`.
    public: String,
    /// Hex of a marshalled `TPM2B_PRIVATE`.
    private: String,
}

/// A sealed file, parsed and checked (everything that can be checked without a TPM).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sealed {
    pub selection: PcrSelection,
    /// The PCR values sealed against, one per PCR of the selection.
    pub values: Vec<Vec<u8>>,
    /// `TPMT_PUBLIC` (the `TPM2B_PUBLIC` without its size).
    pub public: Vec<u8>,
    /// The private blob (the `TPM2B_PRIVATE` without its size).
    pub private: Vec<u8>,
}

/// The content of a `TPM2B`: a big-endian u16 size, then exactly that many bytes.
fn tpm2b(b: &[u8], max: usize) -> Option<&[u8]> {
    let (size, rest) = b.split_first_chunk::<2>()?;
    let n = usize::from(u16::from_be_bytes(*size));
    (n == rest.len() && n > 0 && n <= max).then_some(rest)
}

fn with_size(b: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(b.len() + 2);
    // The blobs come from the TPM, whose buffers are far below 64 KiB.
    out.extend_from_slice(&(b.len() as u16).to_be_bytes());
    out.extend_from_slice(b);
    out
}

impl Sealed {
    /// Parses a sealed file's bytes. The refusal says which rule failed, never more than a
    /// bounded, escaped field name.
    pub fn parse(bytes: &[u8]) -> Result<Self, String> {
        if bytes.len() > MAX_SEALED_FILE {
            return Err(format!("longer than {MAX_SEALED_FILE} bytes"));
        }
        let f: SealedFile = serde_json::from_slice(bytes).map_err(|e| {
            // serde's message may quote a field name from the file: escape and bound it.
            format!(
                "not a sealfs TPM-sealed key file: {}",
                crate::format::naming::printable(&e.to_string(), 160)
            )
        })?;
        if f.format != FORMAT {
            return Err(format!(
                "format {:?} is not {FORMAT}",
                crate::format::naming::printable(&f.format, 32)
            ));
        }
        if f.parent != PARENT {
            return Err(format!(
                "parent {:?} is not {PARENT}",
                crate::format::naming::printable(&f.parent, 32)
            ));
        }
        let bank = Bank::from_name(&f.pcr_bank).ok_or("pcr_bank is not sha1/256/384/512")?;
        let sorted = f.pcrs.windows(2).all(|w| w[0] < w[1]);
        if f.pcrs.is_empty() || !sorted || f.pcrs.iter().any(|p| *p >= PCR_COUNT) {
            return Err("pcrs is not a sorted list of distinct PCRs 0..=23".into());
        }
        if f.pcr_values.len() != f.pcrs.len() {
            return Err("pcr_values does not hold one value per PCR".into());
        }
        let mut values = Vec::with_capacity(f.pcrs.len());
        for v in &f.pcr_values {
            match hex::decode(v) {
                Ok(d) if d.len() == bank.digest_len() => values.push(d),
                _ => {
                    return Err(format!(
                        "a pcr_values entry is not {} hex bytes",
                        bank.digest_len()
                    ))
                }
            }
        }
        let blob = |hex_text: &str, max: usize, what: &str| {
            hex::decode(hex_text)
                .ok()
                .and_then(|b| tpm2b(&b, max).map(<[u8]>::to_vec))
                .ok_or_else(|| format!("{what} is not a marshalled TPM2B of at most {max} bytes"))
        };
        Ok(Self {
            selection: PcrSelection { bank, pcrs: f.pcrs },
            values,
            public: blob(&f.public, MAX_PUBLIC, "public")?,
            private: blob(&f.private, MAX_PRIVATE, "private")?,
        })
    }

    /// The file's bytes: pretty JSON, one field a line, ending in a newline.
    pub fn to_json(&self) -> String {
        let f = SealedFile {
            format: FORMAT.into(),
            parent: PARENT.into(),
            pcr_bank: self.selection.bank.name().into(),
            pcrs: self.selection.pcrs.clone(),
            pcr_values: self.values.iter().map(hex::encode).collect(),
            public: hex::encode(with_size(&self.public)),
            private: hex::encode(with_size(&self.private)),
        };
        let mut s = serde_json::to_string_pretty(&f).expect("strings and numbers only");
        s.push('\n');
        s
    }

    /// The selection's PCRs whose current value differs from the recorded one, as
    /// `sha256:7` (one string, comma-separated), or `None` when all match.
    pub fn differing(&self, current: &[Vec<u8>]) -> Option<String> {
        let bank = self.selection.bank.name();
        let differ: Vec<String> = self
            .selection
            .pcrs
            .iter()
            .zip(&self.values)
            .zip(current)
            .filter(|((_, want), now)| want != now)
            .map(|((p, _), _)| format!("{bank}:{p}"))
            .collect();
        (!differ.is_empty()).then(|| differ.join(", "))
    }
}

/// The key file's line as `keygen` writes it, from the bytes of a key file (checked to be
/// one): trailing whitespace (which `FileKek::parse` allows) dropped, one newline. The
/// sealed object holds at most 128 bytes; this line is 79.
fn key_line(content: &[u8]) -> Result<Zeroizing<Vec<u8>>, String> {
    FileKek::parse(content).map_err(|e| e.to_string())?;
    let text = std::str::from_utf8(content).map_err(|_| "not a sealfs key file".to_string())?;
    let mut line = Zeroizing::new(text.trim_end().as_bytes().to_vec());
    line.push(b'\n');
    Ok(line)
}

/// `sealfs tpm2 seal`: seals the key file at `key_file` to this TPM under `selection`'s
/// current values and writes the sealed file `out` (0600, never over an existing file).
/// Returns the sealed file, for the CLI to report.
pub fn seal(key_file: &Path, selection: &PcrSelection, out: &Path) -> Result<Sealed, KeyError> {
    if !cfg!(feature = "tpm2") {
        return Err(KeyError::Tpm2NotBuilt);
    }
    let key_err = |reason: String| KeyError::FileKey {
        path: key_file.display().to_string(),
        reason,
    };
    let content = crate::localfile::read_private(key_file, MAX_KEY_FILE, "a sealfs key file")
        .map_err(key_err)?;
    let line = key_line(&content).map_err(key_err)?;
    // Checked before asking the TPM (and again, atomically, by create_new when writing).
    if std::fs::symlink_metadata(out).is_ok() {
        return Err(KeyError::FileExists(out.display().to_string()));
    }
    let sealed = imp::seal(&line, selection)?;
    write_new(out, sealed.to_json().as_bytes())?;
    Ok(sealed)
}

/// Writes a new file with mode 0600; never overwrites, and removes what it wrote on a
/// failure.
fn write_new(path: &Path, bytes: &[u8]) -> Result<(), KeyError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let err = |reason: String| KeyError::Tpm2File {
        path: path.display().to_string(),
        reason,
    };
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::AlreadyExists => KeyError::FileExists(path.display().to_string()),
            _ => err(e.to_string()),
        })?;
    if let Err(e) = f.write_all(bytes).and_then(|_| f.sync_all()) {
        let _ = std::fs::remove_file(path);
        return Err(err(e.to_string()));
    }
    Ok(())
}

/// `--key tpm2:PATH`: reads and checks the sealed file, asks this TPM to unseal it, and
/// returns the key file it held. The unsealed line is zeroized once parsed.
pub fn unseal(path: &Path) -> Result<FileKek, KeyError> {
    if !cfg!(feature = "tpm2") {
        return Err(KeyError::Tpm2NotBuilt);
    }
    let file_err = |reason: String| KeyError::Tpm2File {
        path: path.display().to_string(),
        reason,
    };
    let bytes =
        crate::localfile::read_private(path, MAX_SEALED_FILE, "a sealfs TPM-sealed key file")
            .map_err(file_err)?;
    let sealed = Sealed::parse(&bytes).map_err(file_err)?;
    let start = std::time::Instant::now();
    let line = imp::unseal(path, &sealed)?;
    tracing::debug!(
        path = %path.display(),
        pcrs = %sealed.selection,
        ms = start.elapsed().as_millis() as u64,
        "TPM unsealed the key file"
    );
    FileKek::parse(&line).map_err(|e| match e {
        super::file::KeyFileError::Lock(l) => KeyError::Lock(l),
        _ => file_err("the TPM released something that is not a sealfs key file".into()),
    })
}

/// The TCTI this process uses: `SEALFS_TPM2_TCTI` or the kernel resource manager.
pub fn tcti() -> String {
    std::env::var(TCTI_VAR)
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| DEFAULT_TCTI.into())
}

#[cfg(not(feature = "tpm2"))]
mod imp {
    //! Built without the TSS: every TPM operation is the same one-line refusal.
    use super::{KeyError, Path, Sealed, Zeroizing};

    pub fn seal(_line: &[u8], _sel: &super::PcrSelection) -> Result<Sealed, KeyError> {
        Err(KeyError::Tpm2NotBuilt)
    }

    pub fn unseal(_path: &Path, _sealed: &Sealed) -> Result<Zeroizing<Vec<u8>>, KeyError> {
        Err(KeyError::Tpm2NotBuilt)
    }
}

#[cfg(feature = "tpm2")]
mod imp {
    //! The TPM conversation, through tss-esapi (ESAPI over a TCTI).
    use std::convert::TryFrom;
    use std::str::FromStr;

    use tss_esapi::attributes::{ObjectAttributesBuilder, SessionAttributesBuilder};
    use tss_esapi::constants::response_code::{Tss2ResponseCode, Tss2ResponseCodeKind};
    use tss_esapi::constants::SessionType;
    use tss_esapi::handles::{KeyHandle, ObjectHandle};
    use tss_esapi::interface_types::algorithm::{HashingAlgorithm, PublicAlgorithm};
    use tss_esapi::interface_types::ecc::EccCurve;
    use tss_esapi::interface_types::resource_handles::Hierarchy;
    use tss_esapi::interface_types::session_handles::{AuthSession, PolicySession};
    use tss_esapi::structures::{
        Digest, EccPoint, EccScheme, KeyDerivationFunctionScheme, KeyedHashScheme,
        PcrSelectionListBuilder, PcrSlot, Private, Public, PublicBuilder,
        PublicEccParametersBuilder, PublicKeyedHashParameters, SensitiveData, SymmetricDefinition,
        SymmetricDefinitionObject,
    };
    use tss_esapi::tcti_ldr::TctiNameConf;
    use tss_esapi::traits::{Marshall, UnMarshall};
    use tss_esapi::Context;

    use super::{policy_digest, Bank, KeyError, Path, PcrSelection, Sealed, Zeroizing};

    /// A connection to the TPM and the transient handles it holds; `Drop` flushes them,
    /// newest first, on every path (an early `?` included).
    struct Tpm {
        ctx: Context,
        tcti: String,
        transient: Vec<ObjectHandle>,
    }

    impl Drop for Tpm {
        fn drop(&mut self) {
            while let Some(h) = self.transient.pop() {
                if let Err(e) = self.ctx.flush_context(h) {
                    tracing::warn!(tcti = %self.tcti, "TPM flush of a transient handle failed: {e}");
                }
            }
        }
    }

    /// The raw TSS2 response code of an error, if it has one.
    fn raw(e: &tss_esapi::Error) -> Option<u32> {
        match e {
            tss_esapi::Error::Tss2Error(Tss2ResponseCode::FormatOne(rc)) => Some(rc.0),
            tss_esapi::Error::Tss2Error(Tss2ResponseCode::FormatZero(rc)) => Some(rc.0),
            _ => None,
        }
    }

    /// The layer of a TSS2 response code (bits 16..24): 0 is the TPM itself.
    const LAYER_TPM: u32 = 0;
    /// The TCTI layer (`TSS2_TCTI_RC_LAYER`) and the resource manager's: no answer.
    const LAYERS_UNREACHABLE: [u32; 3] = [10, 11, 12];

    /// Whether a TSS error came from the TPM itself (an answer), rather than from the TSS.
    fn from_tpm(e: &tss_esapi::Error) -> bool {
        raw(e).is_some_and(|rc| rc >> 16 == LAYER_TPM)
    }

    /// Whether the TPM could not be reached (the TCTI failed: no device, no server).
    fn unreachable(e: &tss_esapi::Error) -> bool {
        raw(e).is_some_and(|rc| LAYERS_UNREACHABLE.contains(&(rc >> 16)))
    }

    /// An error as a short text with its response code, for the one error line.
    fn text(e: &tss_esapi::Error) -> String {
        match (e, raw(e)) {
            (tss_esapi::Error::Tss2Error(c), Some(rc)) if c.kind().is_some() => {
                format!("{e} (rc {rc:#x})")
            }
            (_, Some(rc)) => format!("TSS rc {rc:#x}"),
            (_, None) => e.to_string(),
        }
    }

    fn kind(e: &tss_esapi::Error) -> Option<Tss2ResponseCodeKind> {
        match e {
            tss_esapi::Error::Tss2Error(rc) => rc.kind(),
            tss_esapi::Error::WrapperError(_) => None,
        }
    }

    impl Tpm {
        fn connect() -> Result<Self, KeyError> {
            let tcti = super::tcti();
            let unavailable = |message: String| KeyError::Tpm2Unavailable {
                tcti: crate::format::naming::printable(&tcti, 128),
                message,
            };
            let conf = TctiNameConf::from_str(&tcti).map_err(|_| {
                unavailable(format!(
                    "{} is not a TCTI (device:PATH, swtpm:host=H,port=P, mssim:…, tabrmd:…)",
                    super::TCTI_VAR
                ))
            })?;
            let ctx = Context::new(conf)
                .map_err(|e| unavailable(format!("no TPM answers there ({})", text(&e))))?;
            Ok(Self {
                ctx,
                tcti,
                transient: Vec::new(),
            })
        }

        /// The error for a failed command: an outage when the TPM could not be reached.
        fn failed(&self, op: &'static str, e: tss_esapi::Error) -> KeyError {
            if unreachable(&e) {
                KeyError::Tpm2Unavailable {
                    tcti: crate::format::naming::printable(&self.tcti, 128),
                    message: format!("{op}: {}", text(&e)),
                }
            } else {
                KeyError::Tpm2Failed {
                    op,
                    message: text(&e),
                }
            }
        }

        /// The current values of `sel`'s PCRs, in order. The TPM returns at most 8 values
        /// a call, and nothing for a bank it has not allocated: read in chunks of 8, each
        /// answer checked to be exactly what was asked (tss-esapi's `read_all` would loop
        /// forever on an empty answer).
        fn read_pcrs(&mut self, sel: &PcrSelection) -> Result<Vec<Vec<u8>>, KeyError> {
            let mut values = Vec::with_capacity(sel.pcrs.len());
            for chunk in sel.pcrs.chunks(8) {
                let part = PcrSelection {
                    bank: sel.bank,
                    pcrs: chunk.to_vec(),
                };
                let list = selection_list(&part).map_err(|e| self.failed("PCR_Read", e))?;
                let (_, read, digests) = self
                    .ctx
                    .pcr_read(list.clone())
                    .map_err(|e| self.failed("PCR_Read", e))?;
                if read != list || digests.value().len() != chunk.len() {
                    return Err(KeyError::Tpm2Failed {
                        op: "PCR_Read",
                        message: format!(
                            "this TPM did not return the PCRs {part} (is the {} bank allocated?)",
                            sel.bank.name()
                        ),
                    });
                }
                values.extend(digests.value().iter().map(|d| d.value().to_vec()));
            }
            Ok(values)
        }

        /// The storage root key under the owner hierarchy (transient, tracked).
        fn primary(&mut self) -> Result<KeyHandle, KeyError> {
            let template = srk_template().map_err(|e| self.failed("CreatePrimary", e))?;
            let r = self.ctx.execute_with_nullauth_session(|c| {
                c.create_primary(Hierarchy::Owner, template, None, None, None, None)
            });
            let key = r.map_err(|e| self.failed("CreatePrimary", e))?.key_handle;
            self.transient.push(key.into());
            Ok(key)
        }

        /// A session (tracked), salted with `primary` so that its session key is one only
        /// this TPM can compute, encrypting responses: the key file crosses the TPM bus
        /// (LPC/SPI, sniffable with a logic analyser) encrypted, not in clear. `decrypt`
        /// also encrypts the command's first parameter (the data to seal).
        fn session(
            &mut self,
            primary: KeyHandle,
            kind: SessionType,
            decrypt: bool,
        ) -> Result<AuthSession, KeyError> {
            let s = self
                .ctx
                .start_auth_session(
                    Some(primary),
                    None,
                    None,
                    kind,
                    SymmetricDefinition::AES_128_CFB,
                    HashingAlgorithm::Sha256,
                )
                .map_err(|e| self.failed("StartAuthSession", e))?
                .ok_or_else(|| KeyError::Tpm2Failed {
                    op: "StartAuthSession",
                    message: "no session handle".into(),
                })?;
            self.transient
                .push(ObjectHandle::from(tss_esapi::handles::SessionHandle::from(
                    s,
                )));
            let (attrs, mask) = SessionAttributesBuilder::new()
                .with_continue_session(true)
                .with_encrypt(kind != SessionType::Trial)
                .with_decrypt(decrypt)
                .build();
            self.ctx
                .tr_sess_set_attributes(s, attrs, mask)
                .map_err(|e| self.failed("StartAuthSession", e))?;
            Ok(s)
        }

        /// Flushes the newest tracked handle now (it is no longer needed).
        fn flush_last(&mut self) -> Result<(), KeyError> {
            if let Some(h) = self.transient.pop() {
                self.ctx
                    .flush_context(h)
                    .map_err(|e| self.failed("FlushContext", e))?;
            }
            Ok(())
        }
    }

    fn hash(b: Bank) -> HashingAlgorithm {
        match b {
            Bank::Sha1 => HashingAlgorithm::Sha1,
            Bank::Sha256 => HashingAlgorithm::Sha256,
            Bank::Sha384 => HashingAlgorithm::Sha384,
            Bank::Sha512 => HashingAlgorithm::Sha512,
        }
    }

    fn slot(p: u8) -> PcrSlot {
        // PcrSlot is the bit of the PCR in the 3-octet selection bitmap.
        PcrSlot::try_from(1u32 << p).unwrap_or(PcrSlot::Slot0)
    }

    fn selection_list(
        sel: &PcrSelection,
    ) -> Result<tss_esapi::structures::PcrSelectionList, tss_esapi::Error> {
        let slots: Vec<PcrSlot> = sel.pcrs.iter().map(|p| slot(*p)).collect();
        PcrSelectionListBuilder::new()
            .with_selection(hash(sel.bank), &slots)
            .build()
    }

    /// The TCG storage root key template (TPM v2.0 Provisioning Guidance, "Storage Primary
    /// Key (SRK) Templates"): ECC NIST P-256, AES-128-CFB, restricted decryption, fixedTPM,
    /// fixedParent, sensitiveDataOrigin, userWithAuth, noDA, SHA-256 name, empty policy and
    /// unique. ECC rather than RSA 2048: a hardware TPM derives an ECC primary in tens of
    /// milliseconds against seconds for an RSA one, and this key is re-derived at every
    /// unseal; it is also systemd's SRK algorithm.
    fn srk_template() -> Result<Public, tss_esapi::Error> {
        let attrs = ObjectAttributesBuilder::new()
            .with_fixed_tpm(true)
            .with_fixed_parent(true)
            .with_sensitive_data_origin(true)
            .with_user_with_auth(true)
            .with_no_da(true)
            .with_restricted(true)
            .with_decrypt(true)
            .build()?;
        PublicBuilder::new()
            .with_public_algorithm(PublicAlgorithm::Ecc)
            .with_name_hashing_algorithm(HashingAlgorithm::Sha256)
            .with_object_attributes(attrs)
            .with_ecc_parameters(
                PublicEccParametersBuilder::new()
                    .with_symmetric(SymmetricDefinitionObject::AES_128_CFB)
                    .with_ecc_scheme(EccScheme::Null)
                    .with_curve(EccCurve::NistP256)
                    .with_key_derivation_function_scheme(KeyDerivationFunctionScheme::Null)
                    .with_is_decryption_key(true)
                    .with_restricted(true)
                    .build()?,
            )
            .with_ecc_unique_identifier(EccPoint::default())
            .build()
    }

    /// The sealed data object: keyedhash with a null scheme (data, not a key), the data
    /// ours (no sensitiveDataOrigin), fixedTPM and fixedParent (never duplicated), and no
    /// user auth (userWithAuth clear: only the PCR policy opens it; adminWithPolicy: even
    /// administrative use needs the policy).
    fn sealed_template(policy: &[u8; 32]) -> Result<Public, tss_esapi::Error> {
        let attrs = ObjectAttributesBuilder::new()
            .with_fixed_tpm(true)
            .with_fixed_parent(true)
            .with_sensitive_data_origin(false)
            .with_user_with_auth(false)
            .with_admin_with_policy(true)
            .with_no_da(true)
            .build()?;
        PublicBuilder::new()
            .with_public_algorithm(PublicAlgorithm::KeyedHash)
            .with_name_hashing_algorithm(HashingAlgorithm::Sha256)
            .with_object_attributes(attrs)
            .with_auth_policy(Digest::try_from(policy.to_vec())?)
            .with_keyed_hash_parameters(PublicKeyedHashParameters::new(KeyedHashScheme::Null))
            .with_keyed_hash_unique_identifier(Digest::default())
            .build()
    }

    pub fn seal(line: &[u8], sel: &PcrSelection) -> Result<Sealed, KeyError> {
        let mut tpm = Tpm::connect()?;
        let values = tpm.read_pcrs(sel)?;
        let expected = policy_digest(sel, &values);
        let primary = tpm.primary()?;

        // The policy from a trial session, given the digest of the values just read (not
        // the TPM's values at the time of the call, which could have moved since): it must
        // be the one computed here, or the sealed file could not be checked later.
        let trial = tpm.session(primary, SessionType::Trial, false)?;
        let trial = PolicySession::try_from(trial).map_err(|e| tpm.failed("PolicyPCR", e))?;
        let pcr_digest = ring::digest::digest(&ring::digest::SHA256, &values.concat());
        let list = selection_list(sel).map_err(|e| tpm.failed("PolicyPCR", e))?;
        let digest =
            Digest::try_from(pcr_digest.as_ref()).map_err(|e| tpm.failed("PolicyPCR", e))?;
        tpm.ctx
            .policy_pcr(trial, digest, list)
            .map_err(|e| tpm.failed("PolicyPCR", e))?;
        let policy = tpm
            .ctx
            .policy_get_digest(trial)
            .map_err(|e| tpm.failed("PolicyGetDigest", e))?;
        tpm.flush_last()?;
        if policy.value() != expected {
            return Err(KeyError::Tpm2Failed {
                op: "PolicyGetDigest",
                message: "the TPM's PolicyPCR digest is not the one computed here".into(),
            });
        }

        // Create under an HMAC session salted with the primary: the key file is sent
        // encrypted (decrypt), and the session authorises the use of the primary.
        let hmac = tpm.session(primary, SessionType::Hmac, true)?;
        let data = SensitiveData::try_from(line).map_err(|e| tpm.failed("Create", e))?;
        let template = sealed_template(&expected).map_err(|e| tpm.failed("Create", e))?;
        let created = tpm
            .ctx
            .execute_with_session(Some(hmac), |c| {
                c.create(primary, template, None, Some(data), None, None)
            })
            .map_err(|e| tpm.failed("Create", e))?;
        let public = created
            .out_public
            .marshall()
            .map_err(|e| tpm.failed("Create", e))?;
        Ok(Sealed {
            selection: sel.clone(),
            values,
            public,
            private: created.out_private.value().to_vec(),
        })
        // `tpm` drops here: the HMAC session and the primary are flushed.
    }

    /// Checks the public blob without a TPM: a sealed data object whose policy is the one
    /// the recorded PCR values make, which no password opens.
    fn check_public(path: &Path, s: &Sealed) -> Result<Public, KeyError> {
        let bad = |reason: &str| KeyError::Tpm2File {
            path: path.display().to_string(),
            reason: reason.into(),
        };
        let public = Public::unmarshall(&s.public)
            .map_err(|_| bad("public is not a marshalled TPM2B_PUBLIC"))?;
        // Exactly the bytes given: no trailing bytes after the structure.
        if public.marshall().ok().as_deref() != Some(&s.public[..]) {
            return Err(bad("public is not a canonical TPM2B_PUBLIC"));
        }
        match &public {
            Public::KeyedHash {
                object_attributes,
                auth_policy,
                ..
            } => {
                if object_attributes.user_with_auth() {
                    return Err(bad(
                        "the sealed object opens with a password (userWithAuth)",
                    ));
                }
                if auth_policy.value() != policy_digest(&s.selection, &s.values) {
                    return Err(bad(
                        "the recorded PCR values are not those of the sealed object's policy",
                    ));
                }
            }
            _ => return Err(bad("public is not a sealed data object (keyedhash)")),
        }
        Ok(public)
    }

    pub fn unseal(path: &Path, s: &Sealed) -> Result<Zeroizing<Vec<u8>>, KeyError> {
        let public = check_public(path, s)?;
        let file = || path.display().to_string();
        let private = Private::try_from(s.private.clone()).map_err(|_| KeyError::Tpm2File {
            path: file(),
            reason: "private is larger than a TPM2B_PRIVATE".into(),
        })?;
        let mut tpm = Tpm::connect()?;
        // Compared here first, to name the PCRs that differ (the TPM only says "no").
        let mismatch = |tpm: &mut Tpm| -> Result<Option<KeyError>, KeyError> {
            let now = tpm.read_pcrs(&s.selection)?;
            Ok(s.differing(&now)
                .map(|pcrs| KeyError::Tpm2PcrMismatch { path: file(), pcrs }))
        };
        if let Some(e) = mismatch(&mut tpm)? {
            return Err(e);
        }
        let primary = tpm.primary()?;
        // The primary's (empty) password authorises the load; nothing secret is sent.
        let loaded = tpm
            .ctx
            .execute_with_nullauth_session(|c| c.load(primary, private, public));
        let sealed = match loaded {
            Ok(h) => h,
            // The TPM answered: the blob is not one of its own (another TPM, a cleared
            // owner hierarchy, altered bytes). Anything else is an outage.
            Err(e) if from_tpm(&e) => {
                return Err(KeyError::Tpm2Foreign {
                    path: file(),
                    message: text(&e),
                })
            }
            Err(e) => return Err(tpm.failed("Load", e)),
        };
        tpm.transient.push(sealed.into());

        let session = tpm.session(primary, SessionType::Policy, false)?;
        let policy = PolicySession::try_from(session).map_err(|e| tpm.failed("PolicyPCR", e))?;
        let pcr_digest = ring::digest::digest(&ring::digest::SHA256, &s.values.concat());
        let digest =
            Digest::try_from(pcr_digest.as_ref()).map_err(|e| tpm.failed("PolicyPCR", e))?;
        let list = selection_list(&s.selection).map_err(|e| tpm.failed("PolicyPCR", e))?;
        if let Err(e) = tpm.ctx.policy_pcr(policy, digest, list) {
            // TPM_RC_VALUE: the PCRs moved since they were read.
            if from_tpm(&e) && kind(&e) == Some(Tss2ResponseCodeKind::Value) {
                if let Some(m) = mismatch(&mut tpm)? {
                    return Err(m);
                }
            }
            return Err(tpm.failed("PolicyPCR", e));
        }
        let out = tpm
            .ctx
            .execute_with_session(Some(session), |c| c.unseal(sealed.into()));
        match out {
            Ok(data) => Ok(Zeroizing::new(data.value().to_vec())),
            Err(e) if from_tpm(&e) => Err(KeyError::Tpm2PolicyFailed {
                path: file(),
                message: text(&e),
            }),
            Err(e) => Err(tpm.failed("Unseal", e)),
        }
        // `tpm` drops here: the policy session, the sealed object and the primary are
        // flushed, whichever way this returned.
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sel(s: &str) -> PcrSelection {
        s.parse().unwrap()
    }

    #[test]
    fn selections_parse_sorted_and_strict() {
        let s = sel("sha256:7,0,4,2");
        assert_eq!(s.pcrs, vec![0, 2, 4, 7]);
        assert_eq!(s.to_string(), "sha256:0,2,4,7");
        for bad in [
            "sha256:",
            "sha256:24",
            "sha256:1,1",
            "md5:1",
            "sha256",
            "sha256:0,,1",
            "sha256:-1",
        ] {
            assert!(bad.parse::<PcrSelection>().is_err(), "{bad}");
        }
    }

    #[test]
    fn policy_digest_matches_tpm2_tools() {
        // `tpm2_createpolicy --policy-pcr -l SEL -f VALUES -L out` against swtpm (a trial
        // session in a real TPM): PCR 0 = 32 zero bytes; PCRs 2 = 32 x 0x01 and 7 = zeros.
        let d = policy_digest(&sel("sha256:0"), &[vec![0u8; 32]]);
        assert_eq!(
            hex::encode(d),
            "093ceb41181d47808862d7946268ee6a17a10e3d1b79b32351bc56e4beaceff0"
        );
        let d = policy_digest(&sel("sha256:7,2"), &[vec![1u8; 32], vec![0u8; 32]]);
        assert_eq!(
            hex::encode(d),
            "f6e855aef2ec8e91649351146c901ee8a47ff2a2b115990ea8fcbf14cf0d332b"
        );
    }

    fn sample() -> Sealed {
        Sealed {
            selection: sel("sha256:0,7"),
            values: vec![vec![1; 32], vec![2; 32]],
            public: vec![0, 8, 0, 11, 1, 2, 3],
            private: vec![9; 40],
        }
    }

    #[test]
    fn the_file_round_trips_and_refuses_anything_else() {
        let s = sample();
        let json = s.to_json();
        assert_eq!(Sealed::parse(json.as_bytes()).unwrap(), s);
        let v: serde_json::Value = serde_json::from_str(&json).unwrap();
        let refused = |v: &serde_json::Value, why: &str| {
            let e = Sealed::parse(v.to_string().as_bytes()).unwrap_err();
            assert!(e.contains(why), "{e:?} should say {why:?}");
        };
        let mut x = v.clone();
        x["extra"] = serde_json::json!(1);
        refused(&x, "unknown field");
        let mut x = v.clone();
        x["format"] = serde_json::json!("sealfs-tpm2-v2");
        refused(&x, "is not sealfs-tpm2-v1");
        let mut x = v.clone();
        x["pcrs"] = serde_json::json!([7, 0]);
        refused(&x, "sorted");
        let mut x = v.clone();
        x["pcr_values"] = serde_json::json!([hex::encode([1u8; 32])]);
        refused(&x, "one value per PCR");
        let mut x = v.clone();
        x["pcr_values"][1] = serde_json::json!(hex::encode([1u8; 20]));
        refused(&x, "32 hex bytes");
        let mut x = v.clone();
        x["private"] = serde_json::json!("0005aabb");
        refused(&x, "private is not a marshalled TPM2B");
        let mut x = v.clone();
        x.as_object_mut().unwrap().remove("public");
        refused(&x, "missing field");
        assert!(Sealed::parse(&json.as_bytes()[..json.len() / 2]).is_err());
        let big = format!("{json}{}", " ".repeat(MAX_SEALED_FILE));
        assert!(Sealed::parse(big.as_bytes())
            .unwrap_err()
            .contains("longer"));
    }

    #[test]
    fn differing_names_each_changed_pcr() {
        let s = sample();
        assert_eq!(s.differing(&s.values), None);
        let now = vec![vec![1; 32], vec![3; 32]];
        assert_eq!(s.differing(&now).as_deref(), Some("sha256:7"));
        let now = vec![vec![0; 32], vec![3; 32]];
        assert_eq!(s.differing(&now).as_deref(), Some("sha256:0, sha256:7"));
    }

    #[test]
    fn tpm2_uris_parse() {
        use super::super::KeySpec;
        assert_eq!(
            "tpm2:/etc/sealfs/k.tpm2".parse::<KeySpec>().unwrap(),
            KeySpec::Tpm2("/etc/sealfs/k.tpm2".into())
        );
        let e = "tpm2:".parse::<KeySpec>().unwrap_err().to_string();
        assert!(e.contains("tpm2:<path>"), "{e}");
    }

    #[test]
    fn only_a_key_file_line_is_sealed() {
        let line = format!("sealfs-kek-v1:{}\n", "ab".repeat(32));
        let padded = format!("{}   \n\n", line.trim_end());
        assert_eq!(&key_line(padded.as_bytes()).unwrap()[..], line.as_bytes());
        assert!(key_line(b"hello").is_err());
        assert!(key_line(b"sealfs-kek-v1:abcd\n").is_err());
    }
}
