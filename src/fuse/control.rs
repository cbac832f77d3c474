//! The mount's control socket, so that `sealfs revoke MOUNTPOINT` reaches the daemon that
//! serves it. A Unix socket rather than a signal: a signal carries no argument (which key)
//! and no answer (how many files). Its path is derived from the mount point
//! ([`socket_path`]): mode 0600, in a 0700 directory of the daemon's user, and every peer
//! must be that user or root (SO_PEERCRED). One request line per connection, one answer
//! line; nothing from a request is echoed into a log unescaped.

use std::io::{BufRead, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncWriteExt};

use crate::fs::revoke::Scope;
use crate::fs::SealFs;

/// Longest request line read (a service-account token fits).
const MAX_REQUEST: u64 = 16 * 1024;
/// A client that sends nothing is dropped after this.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

use crate::localfile::euid;

/// Where this user's control sockets live: `/run/sealfs` for root; else
/// `/run/user/UID/sealfs` when the user's runtime directory exists (logind makes it, owned
/// by the user, under a root-owned `/run/user`: nobody else can create it first); else
/// `/tmp/sealfs-UID`. From the uid alone, never from the environment, so that `sealfs
/// revoke` from another session (cron, ssh, sudo -u) finds the daemon's socket. Under
/// `/tmp` another local user can create the directory first: it is then refused by name
/// ([`check_private_dir`]), never used.
fn socket_dir() -> PathBuf {
    socket_dirs().swap_remove(0)
}

/// Every place a daemon of this user may have put its socket, the daemon's choice now
/// first: the runtime directory may have appeared (a login after a daemon started by a
/// unit) or gone (a logout) since the daemon chose. `sealfs revoke` looks in each.
fn socket_dirs() -> Vec<PathBuf> {
    let uid = euid();
    if uid == 0 {
        return vec![PathBuf::from("/run/sealfs")];
    }
    let runtime = PathBuf::from(format!("/run/user/{uid}"));
    let tmp = PathBuf::from(format!("/tmp/sealfs-{uid}"));
    match std::fs::symlink_metadata(&runtime) {
        Ok(m) if m.is_dir() && m.uid() == uid => vec![runtime.join("sealfs"), tmp],
        _ => vec![tmp, runtime.join("sealfs")],
    }
}

/// The name of the control socket of the mount at `mountpoint` (canonicalized by the
/// caller), in whichever socket directory.
fn socket_name(mountpoint: &Path) -> String {
    use std::os::unix::ffi::OsStrExt;
    let d = crate::crypto::sha256(mountpoint.as_os_str().as_bytes());
    format!("{}.sock", hex::encode(&d[..16]))
}

/// The control socket this daemon binds for the mount at `mountpoint`.
pub fn socket_path(mountpoint: &Path) -> PathBuf {
    socket_dir().join(socket_name(mountpoint))
}

/// The socket directory, created 0700 if absent; refused unless it is a directory of this
/// user closed to others (another user's `/tmp/sealfs-UID` must not catch our requests).
fn private_dir() -> std::io::Result<PathBuf> {
    let dir = socket_dir();
    match std::fs::DirBuilder::new().mode(0o700).create(&dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(e),
    }
    check_private_dir(&dir).map_err(std::io::Error::other)?;
    Ok(dir)
}

/// The socket directory must be a directory (not a symlink) of this user, closed to others:
/// checked by the daemon before it binds and by the client before it talks.
fn check_private_dir(dir: &Path) -> Result<(), String> {
    let m = std::fs::symlink_metadata(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    if !m.is_dir() || m.uid() != euid() || m.mode() & 0o077 != 0 {
        return Err(format!(
            "{} is not a directory of uid {} with mode 0700 (it belongs to uid {}: another \
             user may have created it first; remove it, or run under a login session with \
             /run/user/{})",
            dir.display(),
            euid(),
            m.uid(),
            euid()
        ));
    }
    Ok(())
}

/// Binds the control socket for `mountpoint`. A socket left by a daemon that died is
/// replaced; one that still answers means another daemon serves this mount point.
pub fn bind(mountpoint: &Path) -> std::io::Result<(std::os::unix::net::UnixListener, PathBuf)> {
    private_dir()?;
    let path = socket_path(mountpoint);
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(&path).is_ok() {
            return Err(std::io::Error::other(format!(
                "{} is in use by another sealfs daemon",
                path.display()
            )));
        }
        std::fs::remove_file(&path)?;
    }
    let l = std::os::unix::net::UnixListener::bind(&path)?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
    l.set_nonblocking(true)?;
    Ok((l, path))
}

/// Answers requests until the task is aborted.
pub async fn serve(listener: tokio::net::UnixListener, fs: Arc<SealFs>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            // EMFILE and the like: back off instead of spinning.
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let fs = fs.clone();
        tokio::spawn(async move {
            let peer = stream.peer_cred().map(|c| c.uid()).ok();
            if !peer.is_some_and(|u| u == 0 || u == euid()) {
                tracing::warn!(peer_uid = ?peer, "control request from another user refused");
                return;
            }
            let (r, mut w) = stream.into_split();
            // It may hold a pod's token (`web-identity-token`): wiped when dropped.
            let mut line = zeroize::Zeroizing::new(String::new());
            let mut r = tokio::io::BufReader::new(tokio::io::AsyncReadExt::take(r, MAX_REQUEST));
            let read = tokio::time::timeout(REQUEST_TIMEOUT, r.read_line(&mut line)).await;
            let answer = match read {
                Ok(Ok(_)) => handle(&fs, line.trim_end()).await,
                _ => "error: no request".to_string(),
            };
            let _ = w.write_all(format!("{answer}\n").as_bytes()).await;
        });
    }
}

/// `revoke all`, `revoke key <--key URI or slot id>`, or `web-identity-token TOKEN` (the
/// CSI mounter's refresh of a pod's token: aws_identity.rs; the token is never echoed).
async fn handle(fs: &SealFs, request: &str) -> String {
    if let Some(token) = request.strip_prefix("web-identity-token ") {
        return match crate::aws_identity::refresh(token) {
            Ok(()) => {
                tracing::info!("the pod's web-identity token was refreshed");
                "ok".into()
            }
            Err(e) => format!("error: {e}"),
        };
    }
    let scope = match request.split_once(' ') {
        Some(("revoke", "all")) => Scope::All,
        Some(("revoke", rest)) => match rest.strip_prefix("key ") {
            Some(key) => match fs.key_id_of(key) {
                Some(id) => Scope::Key(id),
                None => {
                    return format!(
                        "error: this mount was not given the key {}",
                        crate::format::naming::printable(key, 256)
                    )
                }
            },
            None => return "error: expected `revoke all` or `revoke key KEY`".into(),
        },
        _ => return "error: expected `revoke all` or `revoke key KEY`".into(),
    };
    let n = fs.revoke(&scope, "revoked by `sealfs revoke`").await;
    tracing::warn!(target: "sealfs::audit", scope = ?scope, files = n, "revoke requested");
    format!("revoked {n}")
}

/// The uid of the process at the other end of `s` (SO_PEERCRED).
fn peer_uid(s: &std::os::unix::net::UnixStream) -> Option<u32> {
    use std::os::fd::AsRawFd;
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `cred`, a plain C struct we own.
    #[allow(unsafe_code)]
    let rc = unsafe {
        libc::getsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    (rc == 0).then_some(cred.uid)
}

/// The client side: sends one request to the daemon serving `mountpoint`, returns its
/// answer line.
pub fn request(mountpoint: &Path, line: &str) -> Result<String, String> {
    let mp =
        std::fs::canonicalize(mountpoint).map_err(|e| format!("{}: {e}", mountpoint.display()))?;
    request_label(&mp, line)
}

/// [`request`] to the daemon that serves a passed connection (`--fuse-fd`) under the label
/// `mp`, exactly as it was given (the mount point may not exist in this namespace).
pub fn request_label(mp: &Path, line: &str) -> Result<String, String> {
    // Only a private directory of ours, and only a daemon of ours (or root) answering: a
    // socket another user planted must neither get the request nor fake the answer. A
    // directory that exists but is not ours is refused by name, never skipped silently.
    let mut tried = Vec::new();
    let mut found = None;
    for dir in socket_dirs() {
        if std::fs::symlink_metadata(&dir).is_err() {
            tried.push(format!("{}: absent", dir.display()));
            continue;
        }
        check_private_dir(&dir).map_err(|e| format!("{e}: not talking to what answers there"))?;
        let path = dir.join(socket_name(mp));
        match std::os::unix::net::UnixStream::connect(&path) {
            Ok(s) => {
                found = Some((s, path));
                break;
            }
            Err(e) => tried.push(format!("{}: {e}", path.display())),
        }
    }
    let Some((mut s, path)) = found else {
        return Err(format!(
            "no sealfs daemon answers for {} ({})",
            mp.display(),
            tried.join("; ")
        ));
    };
    let io = |e: std::io::Error| format!("{}: {e}", path.display());
    match peer_uid(&s) {
        Some(u) if u == 0 || u == euid() => {}
        other => {
            return Err(format!(
                "{} is answered by uid {other:?}, not this user or root",
                path.display()
            ))
        }
    }
    s.set_read_timeout(Some(Duration::from_secs(60)))
        .map_err(io)?;
    let msg = zeroize::Zeroizing::new(format!("{line}\n"));
    s.write_all(msg.as_bytes()).map_err(io)?;
    let mut answer = String::new();
    std::io::BufReader::new(std::io::Read::take(s, MAX_REQUEST))
        .read_line(&mut answer)
        .map_err(io)?;
    Ok(answer.trim_end().to_string())
}
