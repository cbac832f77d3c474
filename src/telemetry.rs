//! Logging setup. Never log a key, a plaintext DEK or plaintext bytes: log events name
//! files, chunks, key ids and reasons only.

use std::io::Write;
use std::sync::{Mutex, OnceLock};

use tracing_subscriber::filter::{filter_fn, FilterExt, LevelFilter};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{fmt, reload, EnvFilter, Layer, Registry};

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

/// Where log lines go: stderr until told otherwise; a `--log-file`; or, for a daemon whose
/// stderr was a terminal or a pipe, syslog (`/dev/log`, which journald also serves).
enum Sink {
    Stderr,
    File(std::fs::File),
    Syslog(std::os::unix::net::UnixDatagram),
    Discard,
}

static SINK: Mutex<Sink> = Mutex::new(Sink::Stderr);

/// The target of audit events.
pub const AUDIT: &str = "sealfs::audit";

/// The `MakeWriter` of every log line: one buffer per event, written to the current sink in
/// one call when the event is done (a syslog datagram per event).
struct SinkWriter {
    buf: Vec<u8>,
    severity: u8,
    /// An audit event: it gets the pod's fields ([`set_pod`]).
    audit: bool,
}

/// Whether lines are JSON objects (`--log-format json`), for [`with_pod`].
static JSON: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// The pod this mount serves a volume of (CSI `podInfoOnMount`), as `key=value` pairs.
static POD: OnceLock<[(&'static str, String); 4]> = OnceLock::new();

/// Names the pod on every audit line of this process from now on: `pod_namespace`,
/// `pod_name`, `pod_uid`, `pod_service_account` (the CSI node plugin's volumes). Once.
pub fn set_pod(p: crate::csi::volume::Pod) {
    let _ = POD.set([
        ("pod_namespace", p.namespace),
        ("pod_name", p.name),
        ("pod_uid", p.uid),
        ("pod_service_account", p.service_account),
    ]);
}

/// `line` (one formatted event) with the pod's fields: first members of a JSON object, or
/// trailing `key=value` pairs of a human line. Added here, where every event passes, so
/// that no audit event can leave them out.
fn with_pod(line: &[u8], json: bool) -> Vec<u8> {
    let Some(pod) = POD.get() else {
        return line.to_vec();
    };
    let body = line.strip_suffix(b"\n").unwrap_or(line);
    let mut out = Vec::with_capacity(line.len() + 128);
    if json {
        let Some(rest) = body.strip_prefix(b"{") else {
            return line.to_vec();
        };
        out.push(b'{');
        for (k, v) in pod {
            let v = serde_json::to_string(v).unwrap_or_default();
            out.extend_from_slice(format!("\"{k}\":{v},").as_bytes());
        }
        out.extend_from_slice(rest);
    } else {
        out.extend_from_slice(body);
        for (k, v) in pod {
            out.extend_from_slice(format!(" {k}={v}").as_bytes());
        }
    }
    out.push(b'\n');
    out
}

impl Write for SinkWriter {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.buf.extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Drop for SinkWriter {
    fn drop(&mut self) {
        if self.buf.is_empty() {
            return;
        }
        if self.audit {
            self.buf = with_pod(&self.buf, JSON.load(std::sync::atomic::Ordering::Relaxed));
        }
        let mut sink = SINK.lock().unwrap_or_else(|p| p.into_inner());
        let _ = match &mut *sink {
            Sink::Stderr => std::io::stderr().write_all(&self.buf),
            Sink::File(f) => f.write_all(&self.buf),
            Sink::Syslog(s) => {
                // RFC 3164 framing, facility daemon (3): `<PRI>sealfs[PID]: line`.
                let line = self.buf.strip_suffix(b"\n").unwrap_or(&self.buf);
                let head = format!(
                    "<{}>sealfs[{}]: ",
                    3 * 8 + self.severity,
                    std::process::id()
                );
                s.send(&[head.as_bytes(), line].concat()).map(drop)
            }
            Sink::Discard => Ok(()),
        };
    }
}

struct MakeSink;

impl<'a> fmt::MakeWriter<'a> for MakeSink {
    type Writer = SinkWriter;
    fn make_writer(&'a self) -> SinkWriter {
        SinkWriter {
            buf: Vec::new(),
            severity: 6,
            audit: false,
        }
    }
    fn make_writer_for(&'a self, meta: &tracing::Metadata<'_>) -> SinkWriter {
        let severity = match *meta.level() {
            tracing::Level::ERROR => 3,
            tracing::Level::WARN => 4,
            tracing::Level::INFO => 6,
            _ => 7,
        };
        SinkWriter {
            buf: Vec::new(),
            severity,
            audit: meta.target() == AUDIT,
        }
    }
}

/// The configured filter and the handle that swaps it (SIGUSR2: [`toggle_debug`]).
struct Levels {
    handle: reload::Handle<EnvFilter, Registry>,
    configured: String,
    debug: Mutex<bool>,
}

static LEVELS: OnceLock<Levels> = OnceLock::new();

fn directives(level: &str) -> String {
    // tss_esapi logs each failed TPM command at error level; keys/tpm2.rs reports it in
    // the command's one error line instead.
    format!("sealfs={level},sealfs::audit=info,fuser=error,tss_esapi=off,warn")
}

/// Logs at `default_level` unless `RUST_LOG` says otherwise, to stderr or to `log_file`:
/// human lines, or one JSON object per line with `json` (for log shippers; audit events
/// carry the target `sealfs::audit`). Audit events are on whatever `--log-level` says: an
/// audit trail that a quieter log level switches off is no trail. Events that may carry
/// HTTP bodies are dropped ([`BODY_TARGETS`]).
pub fn init(
    default_level: &str,
    json: bool,
    log_file: Option<&std::path::Path>,
) -> Result<(), String> {
    if let Some(p) = log_file {
        use std::os::unix::fs::OpenOptionsExt;
        let f = std::fs::OpenOptions::new()
            .append(true)
            .create(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(p)
            .map_err(|e| format!("--log-file {}: {e}", p.display()))?;
        *SINK.lock().unwrap_or_else(|p| p.into_inner()) = Sink::File(f);
    }
    JSON.store(json, std::sync::atomic::Ordering::Relaxed);
    let configured = std::env::var("RUST_LOG")
        .ok()
        .filter(|s| EnvFilter::try_new(s).is_ok())
        .unwrap_or_else(|| directives(default_level));
    let (env, handle) = reload::Layer::new(EnvFilter::new(&configured));
    let no_bodies = filter_fn(|m| !carries_bodies(m.target(), m.level()))
        .with_max_level_hint(LevelFilter::TRACE);
    let filter = env.and(no_bodies);
    let registry = tracing_subscriber::registry();
    // Colour only on a terminal: journald and log files get plain lines.
    let ansi = log_file.is_none() && std::io::IsTerminal::is_terminal(&std::io::stderr());
    let _ = if json {
        registry
            .with(
                fmt::layer()
                    .json()
                    .flatten_event(true)
                    .with_current_span(false)
                    .with_writer(MakeSink)
                    .with_filter(filter),
            )
            .try_init()
    } else {
        registry
            .with(
                fmt::layer()
                    .with_ansi(ansi)
                    .with_writer(MakeSink)
                    .with_filter(filter),
            )
            .try_init()
    };
    let _ = LEVELS.set(Levels {
        handle,
        configured,
        debug: Mutex::new(false),
    });
    Ok(())
}

/// A daemon that has left its terminal: if log lines still go to stderr and stderr is a
/// terminal or a pipe (whoever started it), send them to syslog (journald serves
/// `/dev/log` too) or, without one, nowhere. Returns where they go now.
pub fn detach(stderr_kept: bool) -> &'static str {
    let mut sink = SINK.lock().unwrap_or_else(|p| p.into_inner());
    if !matches!(*sink, Sink::Stderr) {
        return "the log file";
    }
    if stderr_kept {
        return "stderr";
    }
    // SEALFS_SYSLOG_SOCKET: another syslog socket (a relay, or a test's own receiver).
    let path = std::env::var_os("SEALFS_SYSLOG_SOCKET").unwrap_or_else(|| "/dev/log".into());
    let syslog =
        std::os::unix::net::UnixDatagram::unbound().and_then(|s| s.connect(&path).map(|_| s));
    match syslog {
        Ok(s) => {
            *sink = Sink::Syslog(s);
            "syslog"
        }
        Err(_) => {
            *sink = Sink::Discard;
            "nowhere (no /dev/log: give --log-file)"
        }
    }
}

/// Switches between the configured levels and debug for sealfs (audit events stay on);
/// returns the directives now in force.
pub fn toggle_debug() -> Option<String> {
    let l = LEVELS.get()?;
    let mut debug = l.debug.lock().unwrap_or_else(|p| p.into_inner());
    *debug = !*debug;
    let now = if *debug {
        directives("debug")
    } else {
        l.configured.clone()
    };
    l.handle.reload(EnvFilter::new(&now)).ok()?;
    Some(now)
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
    if std::env::var_os("NOTIFY_SOCKET").is_none() {
        return;
    }
    if let Err(e) = sd_notify_with_fds(msg, &[]) {
        tracing::warn!(error = %e, message = msg, "sd_notify failed");
    }
}

/// `RELOADING=1` with the `MONOTONIC_USEC=` systemd needs to tell this reload's `READY=1`
/// from an earlier one (sd_notify(3)).
#[allow(unsafe_code)]
pub fn sd_notify_reloading() {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec, which `ts` is.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    let usec = ts.tv_sec as u64 * 1_000_000 + ts.tv_nsec as u64 / 1_000;
    sd_notify(&format!("RELOADING=1\nMONOTONIC_USEC={usec}"));
}

/// One datagram to `$NOTIFY_SOCKET` (a path, or `@` for an abstract name) with `fds`
/// attached (systemd's `FDSTORE=1`; fuse/handover.rs).
pub fn sd_notify_with_fds(msg: &str, fds: &[std::os::fd::RawFd]) -> std::io::Result<()> {
    use nix::sys::socket::{self, ControlMessage, MsgFlags, UnixAddr};
    use std::os::fd::AsRawFd;
    let path = std::env::var_os("NOTIFY_SOCKET")
        .ok_or_else(|| std::io::Error::other("NOTIFY_SOCKET is not set"))?;
    let addr = match path.as_encoded_bytes().strip_prefix(b"@") {
        Some(name) => UnixAddr::new_abstract(name)?,
        None => UnixAddr::new(std::path::Path::new(&path))?,
    };
    let sock = socket::socket(
        socket::AddressFamily::Unix,
        socket::SockType::Datagram,
        socket::SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    let cmsgs: Vec<ControlMessage> = if fds.is_empty() {
        vec![]
    } else {
        vec![ControlMessage::ScmRights(fds)]
    };
    let n = socket::sendmsg(
        sock.as_raw_fd(),
        &[std::io::IoSlice::new(msg.as_bytes())],
        &cmsgs,
        MsgFlags::MSG_NOSIGNAL,
        Some(&addr),
    )?;
    if n != msg.len() {
        return Err(std::io::Error::other("short send to NOTIFY_SOCKET"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tracing::Level;

    #[test]
    fn audit_lines_name_the_pod_in_both_formats() {
        set_pod(crate::csi::volume::Pod {
            namespace: "ml".into(),
            name: "vllm-0".into(),
            uid: "6f1c-aa".into(),
            service_account: "vllm".into(),
        });
        let json = with_pod(
            b"{\"level\":\"INFO\",\"message\":\"dek unwrapped\"}\n",
            true,
        );
        let v: serde_json::Value = serde_json::from_slice(&json).unwrap();
        assert_eq!(v["pod_namespace"], "ml");
        assert_eq!(v["pod_name"], "vllm-0");
        assert_eq!(v["pod_uid"], "6f1c-aa");
        assert_eq!(v["pod_service_account"], "vllm");
        assert_eq!(v["message"], "dek unwrapped");
        assert!(json.ends_with(b"}\n"));
        let human = with_pod(b"INFO sealfs::audit: dek unwrapped file=x\n", false);
        assert_eq!(
            String::from_utf8(human).unwrap(),
            "INFO sealfs::audit: dek unwrapped file=x pod_namespace=ml pod_name=vllm-0 \
             pod_uid=6f1c-aa pod_service_account=vllm\n"
        );
    }

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
