//! A volume's secrets on their way from the node plugin to the one mount that needs them: a
//! sealed memfd (never argv, never an environment, never a file on disk, never a log line).
//!
//! The memfd holds one JSON object, at most [`MAX_SECRETS`] bytes: `keyFile` (a key file's
//! exact text, as `kubectl create secret --from-file` stores it), `pkcs11Pin`,
//! `transitToken`. The mount (`--secrets-fd N`) reads it once at start, checks the seals
//! (no writer can change it after the check), and keeps each value in this process only:
//! `--key secret:keyFile` opens under the key file; `transitToken` is the Transit token.

use std::io::{Read, Seek, Write};
use std::os::fd::OwnedFd;

use nix::fcntl::{fcntl, FcntlArg, SealFlag};
use nix::sys::memfd::{memfd_create, MFdFlags};
use zeroize::Zeroizing;

/// The most a secrets memfd may hold.
pub const MAX_SECRETS: usize = 64 * 1024;

/// The seals a secrets memfd must carry: nobody can write, grow, shrink or unseal it.
fn required() -> SealFlag {
    SealFlag::F_SEAL_WRITE | SealFlag::F_SEAL_GROW | SealFlag::F_SEAL_SHRINK | SealFlag::F_SEAL_SEAL
}

#[derive(Debug, thiserror::Error)]
pub enum SecretsError {
    #[error("--secrets-fd: {0}")]
    Fd(String),
    #[error("--secrets-fd: not a sealed memfd (seals missing: write, grow, shrink and seal are required)")]
    NotSealed,
    #[error("--secrets-fd: longer than {MAX_SECRETS} bytes")]
    TooLong,
    #[error("--secrets-fd: not the secrets object: {0}")]
    Malformed(String),
}

/// The secrets a volume may carry (the CSI `nodePublishSecretRef` keys sealfs knows).
#[derive(serde::Deserialize, serde::Serialize, Default)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Secrets {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_file: Option<Zeroizing<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pkcs11_pin: Option<Zeroizing<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub transit_token: Option<Zeroizing<String>>,
}

/// Never the values: which ones are there.
impl std::fmt::Debug for Secrets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Secrets")
            .field("key_file", &self.key_file.is_some())
            .field("pkcs11_pin", &self.pkcs11_pin.is_some())
            .field("transit_token", &self.transit_token.is_some())
            .finish()
    }
}

/// A sealed memfd holding `s` (the node plugin's side).
pub fn seal(s: &Secrets) -> std::io::Result<OwnedFd> {
    let json = Zeroizing::new(serde_json::to_vec(s).map_err(std::io::Error::other)?);
    if json.len() > MAX_SECRETS {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("secrets longer than {MAX_SECRETS} bytes"),
        ));
    }
    let fd = memfd_create(
        "sealfs-secrets",
        MFdFlags::MFD_CLOEXEC | MFdFlags::MFD_ALLOW_SEALING,
    )
    .map_err(std::io::Error::from)?;
    let mut f = std::fs::File::from(fd);
    f.write_all(&json)?;
    fcntl(&f, FcntlArg::F_ADD_SEALS(required())).map_err(std::io::Error::from)?;
    Ok(OwnedFd::from(f))
}

/// Reads and checks a secrets memfd (the mount's side); the descriptor is closed after.
pub fn open(fd: OwnedFd) -> Result<Secrets, SecretsError> {
    let seals = fcntl(&fd, FcntlArg::F_GET_SEALS)
        .map_err(|e| SecretsError::Fd(format!("not a memfd ({e})")))?;
    if !SealFlag::from_bits_truncate(seals).contains(required()) {
        return Err(SecretsError::NotSealed);
    }
    let mut f = std::fs::File::from(fd);
    f.rewind().map_err(|e| SecretsError::Fd(e.to_string()))?;
    let mut buf = Zeroizing::new(Vec::with_capacity(4096));
    (&mut f)
        .take(MAX_SECRETS as u64 + 1)
        .read_to_end(&mut buf)
        .map_err(|e| SecretsError::Fd(e.to_string()))?;
    if buf.len() > MAX_SECRETS {
        return Err(SecretsError::TooLong);
    }
    serde_json::from_slice(&buf).map_err(|e| SecretsError::Malformed(crate::keys::json_error(&e)))
}

/// Keeps the secrets in this process: the key file where `--key secret:keyFile` finds it,
/// the Transit token where `transit:` reads its token. A PIN is refused until `pkcs11:`
/// can take one from here (give `pin-source=file:` on a node-local path meanwhile).
pub fn keep(s: Secrets) -> Result<(), SecretsError> {
    if s.pkcs11_pin.is_some() {
        return Err(SecretsError::Malformed(
            "pkcs11Pin is not supported yet: use pin-source=file: on the node".into(),
        ));
    }
    if let Some(t) = s.transit_token {
        crate::process::set_token_var("BAO_TOKEN", t);
    }
    if let Some(k) = s.key_file {
        crate::keys::file::keep_secret_key_file(k);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sealed_memfd_round_trips_and_anything_else_is_refused() {
        let s = Secrets {
            key_file: Some(Zeroizing::new("sealfs-kek-v1:00\n".into())),
            ..Default::default()
        };
        let back = open(seal(&s).unwrap()).unwrap();
        assert_eq!(
            back.key_file.as_deref().map(|s| s.as_str()),
            Some("sealfs-kek-v1:00\n")
        );
        assert!(!format!("{back:?}").contains("kek"), "Debug shows no value");
        // Not sealed.
        let fd = memfd_create("x", MFdFlags::MFD_CLOEXEC | MFdFlags::MFD_ALLOW_SEALING).unwrap();
        std::fs::File::from(fd.try_clone().unwrap())
            .write_all(b"{}")
            .unwrap();
        assert!(matches!(open(fd), Err(SecretsError::NotSealed)));
        // Not a memfd.
        let f: OwnedFd = std::fs::File::open("/dev/null").unwrap().into();
        assert!(matches!(open(f), Err(SecretsError::Fd(_))));
        // An unknown member.
        let fd = memfd_create("x", MFdFlags::MFD_CLOEXEC | MFdFlags::MFD_ALLOW_SEALING).unwrap();
        let mut w = std::fs::File::from(fd);
        w.write_all(br#"{"awsSecretKey":"x"}"#).unwrap();
        fcntl(&w, FcntlArg::F_ADD_SEALS(required())).unwrap();
        assert!(matches!(
            open(OwnedFd::from(w)),
            Err(SecretsError::Malformed(_))
        ));
    }
}
