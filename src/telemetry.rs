//! Logging setup. Never log a key, a plaintext DEK or plaintext bytes: log events name
//! files, chunks, key ids and reasons only.

use tracing_subscriber::EnvFilter;

/// Logs to stderr at `default_level` unless `RUST_LOG` says otherwise: human lines, or
/// one JSON object per line with `json` (for log shippers; audit events carry the target
/// `sealfs::audit`). Audit events are on whatever `--log-level` says: an audit trail that a
/// quieter log level switches off is no trail.
pub fn init(default_level: &str, json: bool) {
    let filter = EnvFilter::try_from_env("RUST_LOG").unwrap_or_else(|_| {
        EnvFilter::new(format!(
            "sealfs={default_level},sealfs::audit=info,fuser=error,warn"
        ))
    });
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = if json {
        builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .try_init()
    } else {
        // Colour only on a terminal: journald and log files get plain lines.
        builder
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .try_init()
    };
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
