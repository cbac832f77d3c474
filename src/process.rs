//! Process-wide settings every command applies at start, before any thread exists: no core
//! dumps and no ptrace attach by same-uid processes (a seal or unseal holds DEKs and
//! plaintext just as the mount daemon does).

/// `PR_SET_DUMPABLE=0` (no core dump, `/proc/PID/mem` and ptrace closed to non-root) and
/// `RLIMIT_CORE=0`. Both survive `fork`, so the mount daemon keeps them. Failures are
/// logged, not fatal.
#[allow(unsafe_code)]
pub fn harden() {
    // SAFETY: prctl/setrlimit with valid arguments; failures are logged, not fatal.
    unsafe {
        if libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0) != 0 {
            tracing::warn!(
                "PR_SET_DUMPABLE failed: {}",
                std::io::Error::last_os_error()
            );
        }
        let zero = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        if libc::setrlimit(libc::RLIMIT_CORE, &zero) != 0 {
            tracing::warn!("RLIMIT_CORE failed: {}", std::io::Error::last_os_error());
        }
    }
}

/// Environment variables that make the AWS SDK log HTTP bodies at trace level: the signer's
/// signable body (`aws-sigv4`) and sensitive responses (`aws-smithy-runtime`). A KMS
/// `Encrypt` request body and a `GenerateDataKey`/`Decrypt` response hold a DEK.
pub const BODY_LOGGING_VARS: [&str; 2] = ["LOG_SIGNABLE_BODY", "LOG_SENSITIVE_BODIES"];

/// Removes [`BODY_LOGGING_VARS`] from the environment. Call first thing, while the process
/// has one thread: changing the environment races with `getenv` in other threads (which is
/// why `remove_var` is `unsafe` from edition 2024; this crate is edition 2021).
pub fn scrub_env() {
    for v in BODY_LOGGING_VARS {
        std::env::remove_var(v);
    }
    // The TSS (keys/tpm2.rs) prints its own WARNING/ERROR lines to stderr: sealfs reports
    // TPM failures in its one error line, so it is silent unless TSS2_LOG asks; and never
    // above debug, since its trace level dumps decrypted responses (an unsealed key file).
    let tss_log = match std::env::var("TSS2_LOG") {
        Ok(v) => v.to_ascii_lowercase().replace("trace", "debug"),
        Err(_) => "all+none".to_string(),
    };
    std::env::set_var("TSS2_LOG", tss_log);
    // Key-manager tokens: kept in this process only, never inherited by a child
    // (fusermount3, mount helpers).
    let mut kept = TOKENS.lock().unwrap_or_else(|p| p.into_inner());
    for v in TOKEN_VARS {
        if let Some(t) = std::env::var_os(v) {
            wipe_env_value(v);
            std::env::remove_var(v);
            match t.into_string() {
                Ok(t) => kept.push((v, zeroize::Zeroizing::new(t))),
                // Not UTF-8: not a token any provider takes, but wiped like one.
                Err(t) => {
                    zeroize::Zeroize::zeroize(&mut std::os::unix::ffi::OsStringExt::into_vec(t))
                }
            }
        }
    }
}

/// Zeroes the bytes of `name`'s value where the kernel put the initial environment (which
/// `remove_var` only unlinks, and `/proc/PID/environ` keeps showing).
#[allow(unsafe_code)]
fn wipe_env_value(name: &str) {
    extern "C" {
        static mut environ: *mut *mut libc::c_char;
    }
    let prefix = format!("{name}=");
    // SAFETY: one thread (see scrub_env); `environ` is a NULL-terminated array of
    // NUL-terminated strings owned by the process, and only bytes before each NUL are
    // written.
    unsafe {
        let mut p = environ;
        while !p.is_null() && !(*p).is_null() {
            let s = std::ffi::CStr::from_ptr(*p).to_bytes();
            if s.starts_with(prefix.as_bytes()) {
                let value = (*p).add(prefix.len()).cast::<u8>();
                std::ptr::write_bytes(value, 0, s.len() - prefix.len());
            }
            p = p.add(1);
        }
    }
}

/// Environment variables that hold a bearer token ([`scrub_env`] takes them out).
pub const TOKEN_VARS: [&str; 2] = ["BAO_TOKEN", "VAULT_TOKEN"];

static TOKENS: std::sync::Mutex<Vec<(&str, zeroize::Zeroizing<String>)>> =
    std::sync::Mutex::new(Vec::new());

/// Sets a token for this process only (a CSI volume's `transitToken` secret, from
/// `--secrets-fd`): read by [`token_var`] as if it had come from the environment.
pub fn set_token_var(name: &'static str, value: zeroize::Zeroizing<String>) {
    let mut kept = TOKENS.lock().unwrap_or_else(|p| p.into_inner());
    kept.retain(|(n, _)| *n != name);
    kept.push((name, value));
}

/// A token variable as it was at start: from the environment [`scrub_env`] took it out
/// of, or (a process that never scrubbed, such as a unit test) the environment itself.
pub fn token_var(name: &str) -> Option<zeroize::Zeroizing<String>> {
    let kept = TOKENS.lock().unwrap_or_else(|p| p.into_inner());
    if let Some((_, t)) = kept.iter().find(|(n, _)| *n == name) {
        return Some(t.clone());
    }
    std::env::var(name).ok().map(zeroize::Zeroizing::new)
}
