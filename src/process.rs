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
}
