//! `file:<path>`: a local 256-bit KEK for development and air-gapped sites.
//!
//! File: one line `sealfs-kek-v1:<64 hex digits>`, mode 0600. Wrapping is
//! AES-256-GCM under `HKDF[-, "sealfs v1 kek wrap"](KEK, 32)` with a random 96-bit nonce and
//! AAD = `"sealfs v1 wrap" || canonical encryption context`:
//! `wrapped = nonce (12) || encrypted DEK (32) || tag (16)`.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use ring::aead::{self, Aad, LessSafeKey, Nonce, UnboundKey};
use ring::hkdf;
use zeroize::{Zeroize, Zeroizing};

use super::KeyError;
use crate::crypto::locked::{LockError, Locked};
use crate::crypto::{random_bytes, secret::DEK_LEN, Dek};
use crate::format::header::encode_context;
use crate::format::EncryptionContext;

const PREFIX: &str = "sealfs-kek-v1:";
const WRAP_INFO: &[u8] = b"sealfs v1 kek wrap";
const WRAP_AAD: &[u8] = b"sealfs v1 wrap";
const ID_LABEL: &[u8] = b"sealfs v1 kek id";
/// The most a key file may hold: its one line is 79 bytes (`sealfs-kek-v1:` + 64 hex + LF).
pub const MAX_KEY_FILE: usize = 256;

/// A loaded key file. The wrap key opens every DEK wrapped under this file, so its AES-GCM
/// schedule (inline in ring's `LessSafeKey`) lives in locked, zeroized memory.
pub struct FileKek {
    wrap_key: Locked<LessSafeKey>,
    id: String,
    /// Unwrap attempts so far: the keyring tests count them (nothing outside tests).
    pub(crate) attempts: Attempts,
}

/// A key file's text handed over as a volume secret (`--secrets-fd`), for `--key
/// secret:keyFile`; this process only.
static SECRET_KEY_FILE: std::sync::Mutex<Option<Zeroizing<String>>> = std::sync::Mutex::new(None);

pub fn keep_secret_key_file(text: Zeroizing<String>) {
    *SECRET_KEY_FILE.lock().unwrap_or_else(|p| p.into_inner()) = Some(text);
}

/// `--key secret:keyFile`: the key file given as a secret.
pub fn secret_key_file() -> Result<FileKek, KeyError> {
    let err = |reason: String| KeyError::FileKey {
        path: "secret:keyFile".into(),
        reason,
    };
    // Taken, so the text is wiped once the key is in locked memory (resolved once, at start).
    let text = SECRET_KEY_FILE
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .take()
        .ok_or_else(|| {
            err("no keyFile secret was given (--secrets-fd), or it was already used".into())
        })?;
    FileKek::parse(text.as_bytes()).map_err(|e| match e {
        KeyFileError::Lock(l) => KeyError::Lock(l),
        e => err(e.to_string()),
    })
}

/// Why bytes are not a usable key file ([`FileKek::parse`]); never says what they held.
#[derive(Debug, thiserror::Error)]
pub enum KeyFileError {
    #[error("not a sealfs key file")]
    NotAKeyFile,
    #[error("malformed key")]
    Malformed,
    #[error(transparent)]
    Lock(#[from] LockError),
}

/// Writes a new random KEK to `path` with mode 0600; never overwrites.
pub fn keygen(path: &Path) -> Result<String, KeyError> {
    let err = |reason: String| KeyError::FileKey {
        path: path.display().to_string(),
        reason,
    };
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::AlreadyExists => KeyError::FileExists(path.display().to_string()),
            _ => err(e.to_string()),
        })?;
    let mut kek = Zeroizing::new([0u8; DEK_LEN]);
    random_bytes(&mut kek[..]);
    let mut line = Zeroizing::new(format!("{PREFIX}{}\n", hex::encode(&kek[..])));
    f.write_all(line.as_bytes())
        .and_then(|_| f.sync_all())
        .map_err(|e| err(e.to_string()))?;
    line.zeroize();
    Ok(fingerprint(&kek))
}

fn fingerprint(kek: &[u8; DEK_LEN]) -> String {
    let d = ring::digest::digest(&ring::digest::SHA256, &[ID_LABEL, &kek[..]].concat());
    format!("file:{}", hex::encode(&d.as_ref()[..16]))
}

impl FileKek {
    /// Opens the key file once, without following a symlink and without blocking, checks
    /// the open file (not the path again): a regular file, owned by this user or root, no
    /// group or other permission bits, at most [`MAX_KEY_FILE`] bytes. Each refusal says
    /// which check failed. (`O_NOFOLLOW` covers the last path component only.)
    pub fn load(path: &Path) -> Result<Self, KeyError> {
        let err = |reason: String| KeyError::FileKey {
            path: path.display().to_string(),
            reason,
        };
        let buf =
            crate::localfile::read_private(path, MAX_KEY_FILE, "a sealfs key file").map_err(err)?;
        Self::parse(&buf).map_err(|e| match e {
            KeyFileError::Lock(l) => KeyError::Lock(l),
            e => err(e.to_string()),
        })
    }

    /// A key file's exact content (what `keygen` writes) that came from elsewhere: released
    /// by a KBS, unsealed by a TPM. At most [`MAX_KEY_FILE`] bytes; the caller zeroizes it.
    pub fn parse(content: &[u8]) -> Result<Self, KeyFileError> {
        if content.len() > MAX_KEY_FILE {
            return Err(KeyFileError::NotAKeyFile);
        }
        let hexpart = std::str::from_utf8(content)
            .ok()
            .and_then(|t| t.trim_end().strip_prefix(PREFIX))
            .ok_or(KeyFileError::NotAKeyFile)?;
        let mut kek = Zeroizing::new([0u8; DEK_LEN]);
        hex::decode_to_slice(hexpart, &mut kek[..]).map_err(|_| KeyFileError::Malformed)?;
        Ok(Self::from_bytes(&kek)?)
    }

    /// Fails only when locked memory is refused (RLIMIT_MEMLOCK).
    pub fn from_bytes(kek: &[u8; DEK_LEN]) -> Result<Self, LockError> {
        Self::derive(kek, WRAP_INFO, fingerprint(kek))
    }

    /// The same AES-256-GCM wrap under `HKDF[-, info](kek, 32)`, with slot id `id`: other
    /// 256-bit KEKs (`shares:`) reuse it with their own `info`, so that the same 32 bytes
    /// as a key file and as a shares key never open each other's slots.
    pub(crate) fn derive(kek: &[u8; DEK_LEN], info: &[u8], id: String) -> Result<Self, LockError> {
        let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, &[]).extract(kek);
        let mut k = Zeroizing::new([0u8; 32]);
        prk.expand(&[info], &aead::AES_256_GCM)
            .and_then(|okm| okm.fill(&mut k[..]))
            .expect("HKDF 32 bytes");
        let wrap_key = Locked::new(LessSafeKey::new(
            UnboundKey::new(&aead::AES_256_GCM, &k[..]).expect("32-byte key"),
        ))?;
        Ok(Self {
            wrap_key,
            id,
            attempts: Default::default(),
        })
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    fn aad(ctx: &EncryptionContext) -> Vec<u8> {
        let mut a = WRAP_AAD.to_vec();
        encode_context(ctx, &mut a);
        a
    }

    pub fn wrap(&self, dek: &Dek, ctx: &EncryptionContext) -> Vec<u8> {
        let mut nonce = [0u8; 12];
        random_bytes(&mut nonce);
        let mut out = Vec::with_capacity(12 + DEK_LEN + 16);
        out.extend_from_slice(&nonce);
        out.extend_from_slice(dek.expose());
        let tag = self
            .wrap_key
            .seal_in_place_separate_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(Self::aad(ctx)),
                &mut out[12..],
            )
            .expect("32-byte message");
        out.extend_from_slice(tag.as_ref());
        out
    }

    pub fn unwrap(&self, wrapped: &[u8], ctx: &EncryptionContext) -> Result<Dek, KeyError> {
        self.attempts.bump();
        let fail = || KeyError::UnwrapFailed(self.id.clone());
        if wrapped.len() != 12 + DEK_LEN + 16 {
            return Err(fail());
        }
        let nonce = Nonce::try_assume_unique_for_key(&wrapped[..12]).map_err(|_| fail())?;
        let mut buf = Zeroizing::new(wrapped[12..].to_vec());
        let plain = self
            .wrap_key
            .open_in_place(nonce, Aad::from(Self::aad(ctx)), &mut buf)
            .map_err(|_| fail())?;
        Ok(Dek::from_slice_zeroizing(plain)?)
    }
}

// Test-only items stay down here: scripts/test.sh scans for unwrap() above the first
// `#[cfg(test)]` of a file.

/// Counts unwrap attempts in tests; nothing in other builds.
#[cfg(not(test))]
#[derive(Default)]
pub(crate) struct Attempts;

#[cfg(not(test))]
impl Attempts {
    fn bump(&self) {}
}

#[cfg(test)]
#[derive(Default)]
pub(crate) struct Attempts(pub(crate) std::sync::atomic::AtomicUsize);

#[cfg(test)]
impl Attempts {
    fn bump(&self) {
        self.0.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn keygen_writes_0600_and_refuses_overwrite() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("k");
        let id = keygen(&p).unwrap();
        assert_eq!(
            std::fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert!(matches!(keygen(&p), Err(KeyError::FileExists(_))));
        assert_eq!(FileKek::load(&p).unwrap().id(), id);
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(matches!(FileKek::load(&p), Err(KeyError::FileKey { .. })));
    }

    #[test]
    fn wrap_is_bound_to_key_and_context() {
        let k1 = FileKek::from_bytes(&[1; 32]).unwrap();
        let k2 = FileKek::from_bytes(&[2; 32]).unwrap();
        let mut ctx = EncryptionContext::new();
        ctx.insert("a".into(), "b".into());
        let dek = Dek::from_slice_zeroizing(&mut [7; 32]).unwrap();
        let w = k1.wrap(&dek, &ctx);
        assert_eq!(k1.unwrap(&w, &ctx).unwrap().expose(), &[7; 32]);
        assert!(matches!(
            k2.unwrap(&w, &ctx),
            Err(KeyError::UnwrapFailed(_))
        ));
        let mut other = ctx.clone();
        other.insert("a".into(), "c".into());
        assert!(matches!(
            k1.unwrap(&w, &other),
            Err(KeyError::UnwrapFailed(_))
        ));
        let mut flipped = w.clone();
        flipped[20] ^= 1;
        assert!(matches!(
            k1.unwrap(&flipped, &ctx),
            Err(KeyError::UnwrapFailed(_))
        ));
    }

    /// `FileKek::load` on another thread, failing the test if it takes over 5 s (a FIFO
    /// without a writer blocks an ordinary open/read forever).
    fn load_promptly(p: &Path) -> Result<FileKek, KeyError> {
        let (tx, rx) = std::sync::mpsc::channel();
        let p = p.to_path_buf();
        std::thread::spawn(move || {
            let _ = tx.send(FileKek::load(&p));
        });
        rx.recv_timeout(std::time::Duration::from_secs(5))
            .expect("FileKek::load took over 5 s")
    }

    fn refused(p: &Path, why: &str) {
        match load_promptly(p) {
            Err(e @ KeyError::FileKey { .. }) => {
                let t = e.to_string();
                assert!(t.contains(why), "{t:?} should say {why:?}");
                assert_eq!(t.lines().count(), 1, "one line: {t:?}");
            }
            Err(e) => panic!("{}: wrong error {e}", p.display()),
            Ok(_) => panic!("{} was accepted", p.display()),
        }
    }

    fn cpath(p: &Path) -> std::ffi::CString {
        std::ffi::CString::new(p.as_os_str().as_encoded_bytes()).unwrap()
    }

    #[test]
    fn symlink_to_a_key_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let k = dir.path().join("k");
        keygen(&k).unwrap();
        let l = dir.path().join("link");
        std::os::unix::fs::symlink(&k, &l).unwrap();
        refused(&l, "symbolic link");
        assert!(FileKek::load(&k).is_ok());
    }

    #[test]
    fn fifos_and_devices_are_refused_promptly() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("fifo");
        // SAFETY: a valid NUL-terminated path; the result is checked.
        #[allow(unsafe_code)]
        let rc = unsafe { libc::mkfifo(cpath(&fifo).as_ptr(), 0o600) };
        assert_eq!(rc, 0, "mkfifo: {}", std::io::Error::last_os_error());
        refused(&fifo, "not a regular file");
        refused(Path::new("/dev/zero"), "not a regular file");
        // (/dev/zero itself is 0666, which the mode check also refuses; the fstat check
        // refuses any device or FIFO first, whatever its mode.)
    }

    #[test]
    fn key_file_of_another_user_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let k = dir.path().join("k");
        keygen(&k).unwrap();
        // Only root can give a file away: the suite runs as root (CI does), so a refusal
        // here fails the test rather than skipping the case.
        std::os::unix::fs::chown(&k, Some(65534), None)
            .expect("chown to uid 65534 (the test suite must run as root)");
        refused(&k, "owned by uid 65534");
    }

    #[test]
    fn long_key_file_and_loose_mode_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let k = dir.path().join("k");
        keygen(&k).unwrap();
        // A valid line padded to 2 KiB with whitespace (which `trim_end` used to accept).
        let mut text = std::fs::read(&k).unwrap();
        text.resize(2048, b'\n');
        std::fs::write(&k, &text).unwrap();
        refused(&k, "longer than 256 bytes");
        text.truncate(MAX_KEY_FILE);
        std::fs::write(&k, &text).unwrap();
        assert!(FileKek::load(&k).is_ok(), "at the limit is fine");
        std::fs::set_permissions(&k, std::fs::Permissions::from_mode(0o640)).unwrap();
        refused(&k, "mode 0640 gives group or others access");
    }

    #[test]
    fn wrap_key_lives_in_locked_memory() {
        let k = FileKek::from_bytes(&[1; 32]).unwrap();
        let addr = &*k.wrap_key as *const LessSafeKey as usize;
        assert!(crate::crypto::locked::is_locked_undumpable(addr));
    }
}
