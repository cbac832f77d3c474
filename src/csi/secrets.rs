//! A volume's secrets on their way from the node plugin to the one mount that needs them: a
//! sealed memfd (never argv, never an environment, never a file on disk, never a log line).
//!
//! The memfd holds one JSON object, at most [`MAX_SECRETS`] bytes: from the volume's Secret,
//! `keyFile` (a key file's exact text, as `kubectl create secret --from-file` stores it),
//! `pkcs11Pin`, `transitToken`; from the node plugin itself, `awsWebIdentity` (the pod's
//! token and role, `authenticationSource: pod`) and `pod` (who the volume is published for,
//! for the audit lines). The mount (`--secrets-fd N`) reads it once at start, checks the
//! seals (no writer can change it after the check), and keeps each value in this process
//! only: `--key secret:keyFile` opens under the key file; `transitToken` is the Transit
//! token; the web identity becomes the process's only AWS identity (aws_identity.rs).

use std::io::Write;
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
    /// Set by the node plugin, never taken from the volume's Secret.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aws_web_identity: Option<WebIdentity>,
    /// Set by the node plugin from `csi.storage.k8s.io/pod.*`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod: Option<super::volume::Pod>,
}

/// The pod's AWS identity as it travels (aws_identity.rs checks each part again).
#[derive(serde::Deserialize, serde::Serialize, Clone)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct WebIdentity {
    pub role_arn: String,
    pub session_name: String,
    pub token: Zeroizing<String>,
}

/// A refreshed token (a republish of a served target): the whole of a refresh's memfd.
#[derive(serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Refresh {
    pub token: Zeroizing<String>,
}

/// Never the values: which ones are there.
impl std::fmt::Debug for Secrets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Secrets")
            .field("key_file", &self.key_file.is_some())
            .field("pkcs11_pin", &self.pkcs11_pin.is_some())
            .field("transit_token", &self.transit_token.is_some())
            .field("aws_web_identity", &self.aws_web_identity.is_some())
            .field("pod", &self.pod)
            .finish()
    }
}

/// A sealed memfd holding `s` (the node plugin's side).
pub fn seal<T: serde::Serialize>(s: &T) -> std::io::Result<OwnedFd> {
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

/// Reads and checks a secrets memfd (the mount's side; the mounter's for a refresh); the
/// descriptor is closed after.
pub fn open<T: serde::de::DeserializeOwned>(fd: OwnedFd) -> Result<T, SecretsError> {
    let seals = fcntl(&fd, FcntlArg::F_GET_SEALS)
        .map_err(|e| SecretsError::Fd(format!("not a memfd ({e})")))?;
    if !SealFlag::from_bits_truncate(seals).contains(required()) {
        return Err(SecretsError::NotSealed);
    }
    // pread, never the shared offset: the CSI mounter keeps a dup of this memfd for a
    // crashed child's successor, and reads its own copy for a token refresh.
    let f = std::fs::File::from(fd);
    let mut buf = Zeroizing::new(vec![0u8; MAX_SECRETS + 1]);
    let mut n = 0;
    while n < buf.len() {
        match std::os::unix::fs::FileExt::read_at(&f, &mut buf[n..], n as u64) {
            Ok(0) => break,
            Ok(got) => n += got,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(SecretsError::Fd(e.to_string())),
        }
    }
    buf.truncate(n);
    if buf.len() > MAX_SECRETS {
        return Err(SecretsError::TooLong);
    }
    serde_json::from_slice(&buf).map_err(|e| SecretsError::Malformed(crate::keys::json_error(&e)))
}

/// Keeps the secrets in this process: the key file where `--key secret:keyFile` finds it,
/// the PIN where `pin-source=secret:pkcs11Pin` finds it, the Transit token where
/// `transit:` reads its token, the pod's web identity and name.
pub fn keep(s: Secrets) -> Result<(), SecretsError> {
    if let Some(p) = s.pkcs11_pin {
        crate::keys::pkcs11::keep_secret_pin(p);
    }
    if let Some(t) = s.transit_token {
        crate::process::set_token_var("BAO_TOKEN", t);
    }
    if let Some(k) = s.key_file {
        crate::keys::file::keep_secret_key_file(k);
    }
    if let Some(p) = &s.pod {
        p.check().map_err(SecretsError::Malformed)?;
    }
    if let Some(w) = s.aws_web_identity {
        // The token must be the pod's own service account's (kubelet asked for it).
        let subject = s
            .pod
            .as_ref()
            .filter(|p| !p.service_account.is_empty())
            .map(|p| {
                format!(
                    "system:serviceaccount:{}:{}",
                    p.namespace, p.service_account
                )
            });
        crate::aws_identity::install(crate::aws_identity::WebIdentity {
            role_arn: w.role_arn,
            session_name: w.session_name,
            token: w.token,
            subject,
        })
        .map_err(SecretsError::Malformed)?;
    }
    if let Some(p) = s.pod {
        crate::telemetry::set_pod(p);
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
        let back: Secrets = open(seal(&s).unwrap()).unwrap();
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
        assert!(matches!(open::<Secrets>(fd), Err(SecretsError::NotSealed)));
        // Not a memfd.
        let f: OwnedFd = std::fs::File::open("/dev/null").unwrap().into();
        assert!(matches!(open::<Secrets>(f), Err(SecretsError::Fd(_))));
        // An unknown member.
        let fd = memfd_create("x", MFdFlags::MFD_CLOEXEC | MFdFlags::MFD_ALLOW_SEALING).unwrap();
        let mut w = std::fs::File::from(fd);
        w.write_all(br#"{"awsSecretKey":"x"}"#).unwrap();
        fcntl(&w, FcntlArg::F_ADD_SEALS(required())).unwrap();
        assert!(matches!(
            open::<Secrets>(OwnedFd::from(w)),
            Err(SecretsError::Malformed(_))
        ));
    }
}
