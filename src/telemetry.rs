//! Logging setup. Never log a key, a plaintext DEK or plaintext bytes: log events name
//! files, chunks, key ids and reasons only.

use tracing_subscriber::filter::{filter_fn, FilterExt, LevelFilter};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{fmt, EnvFilter, Layer};

/// Crates whose trace-level events carry HTTP request or response bodies or wire bytes: the
/// signer's canonical request and signable body, the SDK orchestrator's request and response
/// dumps. A KMS body holds a DEK, so these are never logged at trace, whatever `RUST_LOG`
/// says (a more specific `RUST_LOG` directive cannot re-enable them: this is a second filter).
const BODY_TARGETS: [&str; 7] = [
    "aws_sigv4",
    "aws_smithy_runtime",
    "aws_smithy_http",
    "aws_smithy_http_client",
    "hyper",
    "hyper_util",
    "h2",
];

fn carries_bodies(target: &str, level: &tracing::Level) -> bool {
    *level == tracing::Level::TRACE
        && BODY_TARGETS.iter().any(|t| {
            target
                .strip_prefix(t)
                .is_some_and(|rest| rest.is_empty() || rest.starts_with("::"))
        })
}

/// Logs to stderr at `default_level` unless `RUST_LOG` says otherwise: human lines, or
/// one JSON object per line with `json` (for log shippers; audit events carry the target
/// `sealfs::audit`). Audit events are on whatever `--log-level` says: an audit trail that a
/// quieter log level switches off is no trail. Events that may carry HTTP bodies are
/// dropped ([`BODY_TARGETS`]).
pub fn init(default_level: &str, json: bool) {
    let env = EnvFilter::try_from_env("RUST_LOG").unwrap_or_else(|_| {
        EnvFilter::new(format!(
            "sealfs={default_level},sealfs::audit=info,fuser=error,warn"
        ))
    });
    let no_bodies = filter_fn(|m| !carries_bodies(m.target(), m.level()))
        .with_max_level_hint(LevelFilter::TRACE);
    let filter = env.and(no_bodies);
    let registry = tracing_subscriber::registry();
    let _ = if json {
        registry
            .with(
                fmt::layer()
                    .json()
                    .flatten_event(true)
                    .with_current_span(false)
                    .with_writer(std::io::stderr)
                    .with_filter(filter),
            )
            .try_init()
    } else {
        // Colour only on a terminal: journald and log files get plain lines.
        registry
            .with(
                fmt::layer()
                    .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
                    .with_writer(std::io::stderr)
                    .with_filter(filter),
            )
            .try_init()
    };
}

/// This host's name, for audit events (so that a central log answers "which host opened
/// what"): read once from the kernel, escaped.
pub fn hostname() -> &'static str {
    static HOST: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    HOST.get_or_init(|| {
        let h = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
        crate::format::naming::printable(h.trim(), 255)
    })
}

/// Sends one sd_notify(3) message (`READY=1`, `STOPPING=1`) when run by systemd with
/// `Type=notify`; does nothing otherwise.
pub fn sd_notify(msg: &str) {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let sock = match std::os::unix::net::UnixDatagram::unbound() {
        Ok(s) => s,
        Err(e) => return tracing::warn!(error = %e, "sd_notify socket"),
    };
    let bytes = path.as_encoded_bytes();
    let res = if let Some(abstract_name) = bytes.strip_prefix(b"@") {
        use std::os::linux::net::SocketAddrExt;
        std::os::unix::net::SocketAddr::from_abstract_name(abstract_name)
            .and_then(|a| sock.send_to_addr(msg.as_bytes(), &a))
    } else {
        sock.send_to(msg.as_bytes(), std::path::Path::new(&path))
    };
    if let Err(e) = res {
        tracing::warn!(error = %e, message = msg, "sd_notify failed");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tracing::Level;

    #[test]
    fn only_trace_events_of_the_body_carrying_crates_are_dropped() {
        assert!(carries_bodies(
            "aws_sigv4::http_request::sign",
            &Level::TRACE
        ));
        assert!(carries_bodies(
            "aws_smithy_runtime::client::orchestrator",
            &Level::TRACE
        ));
        assert!(carries_bodies("hyper", &Level::TRACE));
        assert!(!carries_bodies(
            "aws_smithy_runtime::client::orchestrator",
            &Level::DEBUG
        ));
        assert!(!carries_bodies("aws_sigv4_extra", &Level::TRACE));
        assert!(!carries_bodies("sealfs::seal", &Level::TRACE));
    }
}
