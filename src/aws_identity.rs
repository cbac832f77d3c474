//! A mount's own AWS identity, for a CSI volume with `authenticationSource: pod`: the pod's
//! service-account token and a role, which the SDK's standard web-identity provider trades
//! (sts:AssumeRoleWithWebIdentity) for credentials of that pod alone.
//!
//! The token lives in a memfd of this process, which the provider reads through
//! `/proc/self/fd/N` whenever it needs credentials: never a file on disk, never the
//! environment. A republish hands a fresh token over the control socket; it replaces the
//! old one in one `dup2`, so a read sees the old token or the new one, never a mix. Once
//! installed, this is the only credentials provider of every S3, KMS and STS client of the
//! process: no fallback to the environment, a profile or the instance role (the node's).

use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::path::PathBuf;
use std::sync::OnceLock;

use nix::sys::memfd::{memfd_create, MFdFlags};
use zeroize::Zeroizing;

/// The longest token taken (projected service-account tokens are 1 to 2 KiB).
pub const MAX_TOKEN: usize = 8 * 1024;

/// What the node plugin gives a pod's mount.
pub struct WebIdentity {
    pub role_arn: String,
    pub session_name: String,
    pub token: Zeroizing<String>,
    /// The token's `sub` (`system:serviceaccount:NAMESPACE:NAME`), when the pod's service
    /// account is known: a token of any other subject is refused, at start and on refresh.
    pub subject: Option<String>,
}

struct Installed {
    /// The memfd the provider reads; its number never changes (a refresh dup3s onto it).
    fd: RawFd,
    role_arn: String,
    session_name: String,
    subject: Option<String>,
}

/// The `sub` claim of a compact JWS (its signature is STS's business, not ours).
fn subject_of(token: &str) -> Option<String> {
    use base64::Engine;
    let payload = token.split('.').nth(1)?;
    let json = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .ok()?;
    #[derive(serde::Deserialize)]
    struct Claims {
        sub: String,
    }
    serde_json::from_slice::<Claims>(&json).ok().map(|c| c.sub)
}

fn check_subject(token: &str, want: Option<&str>) -> Result<(), String> {
    match want {
        Some(w) if subject_of(token).as_deref() != Some(w) => {
            Err(format!("not a token of the pod's service account ({w})"))
        }
        _ => Ok(()),
    }
}

static INSTALLED: OnceLock<Installed> = OnceLock::new();

/// A compact JWS (three base64url parts), as Kubernetes issues them; bounded.
pub fn check_token(t: &str) -> Result<(), String> {
    let parts: Vec<&str> = t.split('.').collect();
    let b64url = |p: &str| {
        !p.is_empty()
            && p.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    };
    if t.len() > MAX_TOKEN {
        return Err(format!("longer than {MAX_TOKEN} bytes"));
    }
    if parts.len() != 3 || !parts.iter().all(|p| b64url(p)) {
        return Err("not a JWT (three base64url parts)".into());
    }
    Ok(())
}

/// An IAM role ARN: `arn:PARTITION:iam::ACCOUNT:role/PATH/NAME`.
pub fn check_role_arn(a: &str) -> Result<(), String> {
    let bad = || "not an IAM role ARN (arn:aws:iam::123456789012:role/NAME)".to_string();
    let mut p = a.splitn(6, ':');
    let (Some("arn"), Some(partition), Some("iam"), Some(""), Some(account), Some(res)) =
        (p.next(), p.next(), p.next(), p.next(), p.next(), p.next())
    else {
        return Err(bad());
    };
    let name = res.strip_prefix("role/").ok_or_else(bad)?;
    let ok = partition.starts_with("aws")
        && partition
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b == b'-')
        && account.len() == 12
        && account.bytes().all(|b| b.is_ascii_digit())
        && !name.is_empty()
        && a.len() <= 2048
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"+=,.@_-/".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(bad())
    }
}

/// A role session name (2 to 64 of `[A-Za-z0-9+=,.@_-]`), which CloudTrail shows for every
/// call the credentials make.
pub fn check_session_name(s: &str) -> Result<(), String> {
    if (2..=64).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"+=,.@_-".contains(&b))
    {
        Ok(())
    } else {
        Err("a role session name is 2 to 64 characters of A-Z a-z 0-9 + = , . @ _ -".into())
    }
}

/// A sealed memfd holding `token` (nobody changes a token in place: a refresh replaces the
/// whole descriptor), at 3 or above (never where stdin, stdout or stderr will be reopened).
fn token_memfd(token: &str) -> std::io::Result<OwnedFd> {
    use nix::fcntl::{fcntl, FcntlArg, SealFlag};
    use std::io::Write;
    let fd = memfd_create(
        "sealfs-web-identity",
        MFdFlags::MFD_CLOEXEC | MFdFlags::MFD_ALLOW_SEALING,
    )?;
    let mut f = std::fs::File::from(fd);
    f.write_all(token.as_bytes())?;
    fcntl(
        &f,
        FcntlArg::F_ADD_SEALS(
            SealFlag::F_SEAL_WRITE
                | SealFlag::F_SEAL_GROW
                | SealFlag::F_SEAL_SHRINK
                | SealFlag::F_SEAL_SEAL,
        ),
    )?;
    let high = fcntl(&f, FcntlArg::F_DUPFD_CLOEXEC(3))?;
    // SAFETY: fcntl returned a new descriptor that nothing else owns.
    #[allow(unsafe_code)]
    Ok(unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(high) })
}

/// Makes `w` this process's only AWS identity. Once per process.
pub fn install(w: WebIdentity) -> Result<(), String> {
    check_token(&w.token).map_err(|e| format!("the pod's token: {e}"))?;
    check_subject(&w.token, w.subject.as_deref()).map_err(|e| format!("the pod's token: {e}"))?;
    check_role_arn(&w.role_arn).map_err(|e| format!("awsRoleArn: {e}"))?;
    check_session_name(&w.session_name)?;
    if installed() {
        return Err("a web identity is already installed".into());
    }
    let fd = token_memfd(&w.token).map_err(|e| format!("the pod's token: {e}"))?;
    // Kept open for the life of the process: the provider reads it by number.
    let raw = std::os::fd::IntoRawFd::into_raw_fd(fd);
    INSTALLED
        .set(Installed {
            fd: raw,
            role_arn: w.role_arn,
            session_name: w.session_name,
            subject: w.subject,
        })
        .map_err(|_| "a web identity is already installed".to_string())
}

/// Whether a web identity is installed (the mount then takes a refreshed token).
pub fn installed() -> bool {
    INSTALLED.get().is_some()
}

/// Replaces the token the provider reads next (a republish's fresh one).
pub fn refresh(token: &str) -> Result<(), String> {
    let i = INSTALLED
        .get()
        .ok_or("this mount has no web identity (authenticationSource is not pod)")?;
    check_token(token)?;
    check_subject(token, i.subject.as_deref())?;
    let new = token_memfd(token).map_err(|e| e.to_string())?;
    // SAFETY: dup2 onto a descriptor this module owns for the life of the process; the
    // replacement is atomic for any concurrent open of /proc/self/fd/N.
    #[allow(unsafe_code)]
    let rc = unsafe { libc::dup3(new.as_raw_fd(), i.fd, libc::O_CLOEXEC) };
    if rc < 0 {
        return Err(std::io::Error::last_os_error().to_string());
    }
    Ok(())
}

fn token_path(i: &Installed) -> PathBuf {
    PathBuf::from(format!("/proc/self/fd/{}", i.fd))
}

/// `loader` with the installed web identity as its only credentials provider; unchanged
/// when none is installed (the driver's identity: the standard chain).
pub async fn apply(loader: aws_config::ConfigLoader) -> aws_config::ConfigLoader {
    use aws_config::web_identity_token::{
        StaticConfiguration, WebIdentityTokenCredentialsProvider,
    };
    let Some(i) = INSTALLED.get() else {
        return loader;
    };
    let conf = aws_config::provider_config::ProviderConfig::with_default_region()
        .await
        .with_timeout_config(crate::aws_timeouts());
    let provider = WebIdentityTokenCredentialsProvider::builder()
        .configure(&conf)
        .static_configuration(StaticConfiguration {
            web_identity_token_file: token_path(i),
            role_arn: i.role_arn.clone(),
            session_name: i.session_name.clone(),
        })
        .build();
    loader.credentials_provider(provider)
}

#[cfg(test)]
mod tests {
    use super::*;

    const JWT: &str = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJzeXN0ZW06c2EifQ.c2ln";

    /// A token whose payload is `{"sub":SUB}`.
    fn jwt(sub: &str) -> String {
        use base64::Engine;
        let b = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        format!(
            "{}.{}.c2ln",
            b.encode(br#"{"alg":"RS256"}"#),
            b.encode(format!(r#"{{"sub":"{sub}","aud":["sts.amazonaws.com"]}}"#))
        )
    }

    #[test]
    fn tokens_roles_and_session_names_are_checked() {
        assert!(check_token(JWT).is_ok());
        for bad in [
            "", "a.b", "a.b.c.d", "a..c", "a.b.c\n", "a.b.c d", "a.b+/.c",
        ] {
            assert!(check_token(bad).is_err(), "{bad:?}");
        }
        assert!(check_token(&format!("a.b.{}", "c".repeat(MAX_TOKEN))).is_err());
        assert!(check_role_arn("arn:aws:iam::123456789012:role/models-reader").is_ok());
        assert!(check_role_arn("arn:aws-cn:iam::123456789012:role/team/reader").is_ok());
        for bad in [
            "arn:aws:iam::123456789012:user/alice",
            "arn:aws:iam::12345678901:role/r",
            "arn:aws:sts::123456789012:role/r",
            "arn:aws:iam:us-east-1:123456789012:role/r",
            "arn:aws:iam::123456789012:role/",
            "arn:aws:iam::123456789012:role/r x",
            "role/r",
        ] {
            assert!(check_role_arn(bad).is_err(), "{bad:?}");
        }
        assert!(check_session_name("sealfs.ml.vllm-0").is_ok());
        for bad in ["x", "a b", &"a".repeat(65), "ns/pod"] {
            assert!(check_session_name(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn a_refresh_replaces_what_the_provider_reads_and_only_the_first_install_counts() {
        let sub = "system:serviceaccount:ml:vllm";
        let first = jwt(sub);
        let wrong = install(WebIdentity {
            role_arn: "arn:aws:iam::123456789012:role/r".into(),
            session_name: "sealfs.ml.p1".into(),
            token: Zeroizing::new(jwt("system:serviceaccount:ml:other")),
            subject: Some(sub.into()),
        });
        assert!(wrong
            .unwrap_err()
            .contains("not a token of the pod's service account"));
        install(WebIdentity {
            role_arn: "arn:aws:iam::123456789012:role/r".into(),
            session_name: "sealfs.ml.p1".into(),
            token: Zeroizing::new(first.clone()),
            subject: Some(sub.into()),
        })
        .unwrap();
        let i = INSTALLED.get().unwrap();
        assert!(i.fd >= 3);
        let path = token_path(i);
        assert_eq!(std::fs::read_to_string(&path).unwrap(), first);
        // Sealed: not even this process can change it in place.
        assert!(std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .and_then(|mut f| std::io::Write::write_all(&mut f, b"x"))
            .is_err());
        let fresh = jwt(sub).replace(".c2ln", ".bmV3");
        refresh(&fresh).unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), fresh);
        // A bad token, or another service account's, is refused and the good one stays.
        assert!(refresh("not a token").is_err());
        assert!(refresh(&jwt("system:serviceaccount:ml:other"))
            .unwrap_err()
            .contains("not a token of the pod's service account"));
        assert!(refresh(JWT).is_err());
        assert_eq!(std::fs::read_to_string(&path).unwrap(), fresh);
        let again = install(WebIdentity {
            role_arn: "arn:aws:iam::123456789012:role/other".into(),
            session_name: "sealfs.ml.p2".into(),
            token: Zeroizing::new(first),
            subject: None,
        });
        assert!(again.is_err());
        assert!(installed());
    }
}
