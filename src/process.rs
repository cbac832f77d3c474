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
