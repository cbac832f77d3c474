//! `sealfs csi mounter --socket PATH`: one per node, unprivileged but for CAP_IPC_LOCK. It
//! receives FUSE connections that the node plugin opened and mounted, and starts one
//! `sealfs mount --fuse-fd 3` child per published volume (per pod: its own identity, audit
//! and failure domain); it answers once the child serves or has failed, reaps children and
//! keeps serving the others when one dies. It never opens /dev/fuse, never mounts, and keeps
//! no copy of a connection once its child has it (so a dead child's target answers
//! ENOTCONN). Children die with it (PR_SET_PDEATHSIG): that is why it is updated OnDelete.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::OwnedFd;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::seqpacket;
use super::wire::{check_publish, Reply, Request, DRIVER_IDENTITY_ENV, INHERITED_ENV, PUBLISH_ENV};
use crate::exit;

use super::wire::{READY_TIMEOUT, STOP_TIMEOUT};

struct Served {
    child: Child,
    volume: String,
}

#[derive(Default)]
struct State {
    children: Mutex<HashMap<String, Served>>,
    next: std::sync::atomic::AtomicU64,
    /// `--pass-env`: more of the mounter's variables its children inherit.
    pass_env: Vec<String>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Runs the mounter until SIGTERM/SIGINT; an error is why it could not start (one line,
/// for the CLI to print).
pub fn run(socket: &Path, pass_env: Vec<String>) -> Result<(), String> {
    if let Some(bad) = pass_env.iter().find(|n| !env_name(n)) {
        return Err(format!(
            "--pass-env {:?}: not a variable name",
            crate::format::naming::printable(bad, 64)
        ));
    }
    // AWS settings reach children only through the lists of wire.rs, which keep the
    // driver's identity from pod-identity children.
    if let Some(bad) = pass_env.iter().find(|n| n.starts_with("AWS_")) {
        return Err(format!(
            "--pass-env {bad}: AWS variables are passed by the mounter's own rules, not --pass-env"
        ));
    }
    let notify_dir = socket.with_extension("notify.d");
    let setup = || -> std::io::Result<OwnedFd> {
        use std::os::unix::fs::DirBuilderExt;
        // A live mounter keeps its socket: a second one (an OnDelete replacement started
        // early) refuses to start rather than orphan the first one's children.
        if seqpacket::connect(socket).is_ok() {
            return Err(std::io::Error::other("in use by a running mounter"));
        }
        let _ = std::fs::remove_dir_all(&notify_dir);
        std::fs::DirBuilder::new().mode(0o700).create(&notify_dir)?;
        seqpacket::listen(socket)
    };
    let listener = setup().map_err(|e| format!("mounter socket {}: {e}", socket.display()))?;
    let state = Arc::new(State {
        pass_env,
        ..State::default()
    });
    {
        let state = state.clone();
        std::thread::spawn(move || reap(&state));
    }
    crate::telemetry::sd_notify("READY=1");
    tracing::info!(socket = %socket.display(), "mounter serving");
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    for sig in [libc::SIGTERM, libc::SIGINT] {
        let _ = signal_hook_flag(sig, stop.clone());
    }
    let euid = crate::localfile::euid();
    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
        // A SIGTERM that lands between the flag's check and accept(2) would be lost in a
        // blocking accept: wait for a connection at most a second, then look again.
        if !readable(&listener, 1000) {
            continue;
        }
        let conn = match seqpacket::accept(&listener) {
            Ok(c) => c,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                tracing::warn!(error = %e, "accept");
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
        };
        // Only the node plugin (root, or this user) may hand us connections.
        match seqpacket::peer_uid(&conn) {
            Ok(uid) if uid == 0 || uid == euid => {}
            other => {
                tracing::warn!(peer_uid = ?other.ok(), "mounter request from another user refused");
                continue;
            }
        }
        let (state, dir) = (state.clone(), notify_dir.clone());
        std::thread::spawn(move || serve_conn(&conn, &state, &dir));
    }
    tracing::info!("mounter stopping; its children end with it");
    // All signalled at once, then waited for (not one after another).
    let all: Vec<Served> = lock(&state.children).drain().map(|(_, s)| s).collect();
    for s in &all {
        let pid = nix::unistd::Pid::from_raw(s.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
    }
    for mut s in all {
        stop_child(&mut s.child);
    }
    let _ = std::fs::remove_file(socket);
    let _ = std::fs::remove_dir_all(&notify_dir);
    Ok(())
}

/// Whether `fd` has a connection waiting within `ms` milliseconds (a signal: no).
fn readable(fd: &OwnedFd, ms: u16) -> bool {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    use std::os::fd::AsFd;
    let mut fds = [PollFd::new(fd.as_fd(), PollFlags::POLLIN)];
    matches!(poll(&mut fds, PollTimeout::from(ms)), Ok(n) if n > 0)
}

/// `[A-Za-z_][A-Za-z0-9_]*`.
fn env_name(n: &str) -> bool {
    n.bytes()
        .next()
        .is_some_and(|b| b.is_ascii_alphabetic() || b == b'_')
        && n.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

/// Sets `flag` when `sig` arrives (a plain handler: the accept loop checks it after EINTR).
#[allow(unsafe_code)]
fn signal_hook_flag(sig: i32, flag: Arc<std::sync::atomic::AtomicBool>) -> nix::Result<()> {
    use nix::sys::signal::{sigaction, SaFlags, SigAction, SigHandler, SigSet, Signal};
    static FLAG: std::sync::OnceLock<Arc<std::sync::atomic::AtomicBool>> =
        std::sync::OnceLock::new();
    let _ = FLAG.set(flag);
    extern "C" fn on(_: i32) {
        if let Some(f) = FLAG.get() {
            f.store(true, std::sync::atomic::Ordering::Relaxed);
        }
    }
    let sig = Signal::try_from(sig)?;
    // No SA_RESTART: accept returns EINTR and the loop sees the flag.
    let act = SigAction::new(SigHandler::Handler(on), SaFlags::empty(), SigSet::empty());
    // SAFETY: the handler only stores to an atomic.
    unsafe { sigaction(sig, &act) }.map(drop)
}

fn serve_conn(conn: &OwnedFd, state: &State, notify_dir: &Path) {
    loop {
        let (bytes, fds) = match seqpacket::recv(conn) {
            Ok((b, _)) if b.is_empty() => return,
            Ok(m) => m,
            Err(e) => {
                let _ = reply(conn, &Reply::failed(exit::USAGE, e.to_string()));
                return;
            }
        };
        let r = match serde_json::from_slice::<Request>(&bytes) {
            Err(e) => Reply::failed(
                exit::USAGE,
                format!("bad request: {}", crate::keys::json_error(&e)),
            ),
            Ok(Request::Ping {}) => Reply::ok(None),
            Ok(Request::Unpublish { target }) => {
                let served = lock(&state.children).remove(&target);
                if let Some(mut s) = served {
                    stop_child(&mut s.child);
                    tracing::info!(target, volume = %s.volume, "unpublished");
                }
                Reply::ok(None)
            }
            Ok(Request::Publish {
                target,
                uri,
                args,
                env,
                secrets,
                pod_identity,
            }) => publish(
                state,
                notify_dir,
                &target,
                &uri,
                &args,
                &env,
                Descriptors {
                    secrets,
                    pod_identity,
                    fds,
                },
            ),
            Ok(Request::Refresh { target }) => refresh(state, &target, fds),
        };
        if reply(conn, &r).is_err() {
            return;
        }
    }
}

fn reply(conn: &OwnedFd, r: &Reply) -> std::io::Result<()> {
    let b = serde_json::to_vec(r).map_err(std::io::Error::other)?;
    seqpacket::send(conn, &b, &[])
}

/// What a publish carries besides its options: the descriptors and who the child is.
struct Descriptors {
    secrets: bool,
    pod_identity: bool,
    fds: Vec<OwnedFd>,
}

/// Hands a pod-identity child its fresh token, over the child's control socket (the child
/// swaps it in: aws_identity.rs). The token is never logged here.
fn refresh(state: &State, target: &str, mut fds: Vec<OwnedFd>) -> Reply {
    if fds.len() != 1 {
        return Reply::failed(
            exit::USAGE,
            format!("refresh needs 1 descriptor, got {}", fds.len()),
        );
    }
    if !lock(&state.children).contains_key(target) {
        return Reply::failed(
            exit::USAGE,
            format!(
                "no mount of this mounter serves {}",
                crate::format::naming::escaped(target)
            ),
        );
    }
    let fresh: super::secrets::Refresh = match super::secrets::open(fds.remove(0)) {
        Ok(r) => r,
        Err(e) => return Reply::failed(exit::USAGE, e.to_string()),
    };
    let line = zeroize::Zeroizing::new(format!("web-identity-token {}", fresh.token.as_str()));
    match crate::fuse::control::request_label(Path::new(target), &line) {
        Ok(a) if a == "ok" => {
            tracing::info!(target, "the pod's token was refreshed");
            Reply::ok(None)
        }
        Ok(a) => Reply::failed(
            exit::FAILURE,
            crate::format::naming::printable(a.strip_prefix("error: ").unwrap_or(&a), 512),
        ),
        Err(e) => Reply::failed(exit::FAILURE, format!("the mount's control socket: {e}")),
    }
}

fn publish(
    state: &State,
    notify_dir: &Path,
    target: &str,
    uri: &str,
    args: &[String],
    env: &std::collections::BTreeMap<String, String>,
    d: Descriptors,
) -> Reply {
    let Descriptors {
        secrets,
        pod_identity,
        mut fds,
    } = d;
    if let Err(e) = check_publish(uri, target, args, env) {
        return Reply::failed(exit::USAGE, e);
    }
    if fds.len() != 1 + usize::from(secrets) {
        return Reply::failed(
            exit::USAGE,
            format!(
                "publish needs {} descriptor(s), got {}",
                1 + usize::from(secrets),
                fds.len()
            ),
        );
    }
    let secrets_fd = secrets.then(|| fds.remove(1));
    let fuse_fd = fds.remove(0);
    // A target published again (its pod restarted, kubelet republished): the old child goes
    // (the map is not held while it stops).
    let old = lock(&state.children).remove(target);
    if let Some(mut old) = old {
        stop_child(&mut old.child);
    }
    let n = state
        .next
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let sock_path = notify_dir.join(format!("{n}.sock"));
    let sock = match std::os::unix::net::UnixDatagram::bind(&sock_path) {
        Ok(s) => s,
        Err(e) => return Reply::failed(exit::FAILURE, format!("notify socket: {e}")),
    };
    let _ = sock.set_read_timeout(Some(Duration::from_millis(200)));
    let exe = match std::env::current_exe() {
        Ok(e) => e,
        Err(e) => return Reply::failed(exit::FAILURE, format!("own executable: {e}")),
    };
    let mut c = Command::new(exe);
    c.args(["mount", "--foreground", "--fuse-fd", "3"]);
    if secrets_fd.is_some() {
        c.args(["--secrets-fd", "4"]);
    }
    // Options, then `--`: the URI and target are positionals whatever they start with.
    c.args(args).arg("--").arg(uri).arg(target);
    // The child's environment: the operator's (the mounter's own: endpoints, and the
    // driver's identity unless the volume reads as the pod), then the publish's
    // allow-listed ones.
    c.env_clear();
    for (k, v) in std::env::vars() {
        let name = k.as_str();
        if INHERITED_ENV.contains(&name)
            || PUBLISH_ENV.contains(&name)
            || state.pass_env.contains(&k)
            || (!pod_identity && DRIVER_IDENTITY_ENV.contains(&name))
        {
            c.env(k, v);
        }
    }
    c.envs(env);
    if pod_identity {
        c.env("AWS_EC2_METADATA_DISABLED", "true");
    }
    c.env("NOTIFY_SOCKET", &sock_path);
    c.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    // Out of the way of 3 and 4 first: a received descriptor may itself be 3 or 4, and
    // dup2 onto itself would neither move it nor clear close-on-exec.
    let high = |f: &OwnedFd| {
        nix::fcntl::fcntl(f, nix::fcntl::FcntlArg::F_DUPFD_CLOEXEC(64)).map(|fd| {
            // SAFETY: fcntl returned a new descriptor that nothing else owns.
            #[allow(unsafe_code)]
            unsafe {
                <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd)
            }
        })
    };
    let fuse_high = match high(&fuse_fd) {
        Ok(fd) => fd,
        Err(e) => return Reply::failed(exit::FAILURE, format!("dup: {e}")),
    };
    let secrets_high = match secrets_fd.as_ref().map(high).transpose() {
        Ok(fd) => fd,
        Err(e) => return Reply::failed(exit::FAILURE, format!("dup: {e}")),
    };
    use std::os::fd::AsRawFd;
    let (fuse_raw, secrets_raw) = (
        fuse_high.as_raw_fd(),
        secrets_high.as_ref().map(|f| f.as_raw_fd()),
    );
    let first_unused: libc::c_uint = if secrets_raw.is_some() { 5 } else { 4 };
    // SAFETY: between fork and exec only async-signal-safe calls: dup2 (which clears
    // close-on-exec on the copy) and prctl.
    #[allow(unsafe_code)]
    unsafe {
        c.pre_exec(move || {
            if libc::dup2(fuse_raw, 3) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            if let Some(s) = secrets_raw {
                if libc::dup2(s, 4) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            // Nothing else of the mounter's reaches the child, inherited or not.
            libc::syscall(libc::SYS_close_range, first_unused, libc::c_uint::MAX, 0);
            // The child ends with the mounter.
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let spawned = spawn(c);
    // No copy stays here once the child has them.
    drop((fuse_fd, secrets_fd, fuse_high, secrets_high));
    let mut child = match spawned {
        Ok(ch) => ch,
        Err(e) => {
            let _ = std::fs::remove_file(&sock_path);
            return Reply::failed(exit::FAILURE, format!("cannot start the mount: {e}"));
        }
    };
    let last_error = Arc::new(Mutex::new(String::new()));
    let reader = child.stderr.take().map(|err| {
        let (last, label) = (last_error.clone(), crate::format::naming::escaped(target));
        std::thread::spawn(move || {
            // Always drained (a stalled pipe would block the child), each line bounded and
            // shown escaped, non-UTF-8 included.
            let mut r = BufReader::new(err);
            let mut raw = Vec::new();
            loop {
                raw.clear();
                match (&mut r).take(16 * 1024).read_until(b'\n', &mut raw) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {}
                }
                let line = crate::format::naming::printable(
                    String::from_utf8_lossy(&raw).trim_end_matches('\n'),
                    16 * 1024,
                );
                if let Some(e) = line.strip_prefix("sealfs: error: ") {
                    *lock(&last) = e.to_string();
                }
                // The child's log lines, named by their target, on the mounter's stderr.
                let _ = writeln!(std::io::stderr(), "[{label}] {line}");
            }
        })
    });
    let start = Instant::now();
    let mut buf = [0u8; 256];
    let outcome = loop {
        if let Ok(n) = sock.recv(&mut buf) {
            if String::from_utf8_lossy(&buf[..n]).contains("READY=1") {
                break Ok(());
            }
        }
        match child.try_wait() {
            Ok(Some(st)) => break Err(st.code().unwrap_or(exit::FAILURE)),
            Ok(None) => {}
            Err(_) => break Err(exit::FAILURE),
        }
        if start.elapsed() > READY_TIMEOUT {
            stop_child(&mut child);
            break Err(exit::FAILURE);
        }
    };
    let _ = std::fs::remove_file(&sock_path);
    match outcome {
        Ok(()) => {
            let pid = child.id();
            tracing::info!(target, pid, "published");
            lock(&state.children).insert(
                target.to_string(),
                Served {
                    child,
                    volume: uri.to_string(),
                },
            );
            Reply::ok(Some(pid))
        }
        Err(code) => {
            // The child is gone: its stderr reader ends at the pipe's end, last line read.
            if let Some(r) = reader {
                let _ = r.join();
            }
            let msg = lock(&last_error).clone();
            let msg = if msg.is_empty() {
                if start.elapsed() > READY_TIMEOUT {
                    format!(
                        "the mount did not serve within {}s",
                        READY_TIMEOUT.as_secs()
                    )
                } else {
                    format!("the mount exited with code {code}")
                }
            } else {
                msg
            };
            Reply::failed(code, msg)
        }
    }
}

/// Spawns on one long-lived thread: PR_SET_PDEATHSIG fires when the *thread* that forked
/// the child ends, and connection threads end with their connection.
fn spawn(c: Command) -> std::io::Result<Child> {
    type Job = (Command, std::sync::mpsc::Sender<std::io::Result<Child>>);
    static SPAWNER: std::sync::OnceLock<Mutex<std::sync::mpsc::Sender<Job>>> =
        std::sync::OnceLock::new();
    let tx = SPAWNER.get_or_init(|| {
        let (tx, rx) = std::sync::mpsc::channel::<Job>();
        std::thread::spawn(move || {
            for (mut c, back) in rx {
                let _ = back.send(c.spawn());
            }
        });
        Mutex::new(tx)
    });
    let (back, answer) = std::sync::mpsc::channel();
    lock(tx)
        .send((c, back))
        .map_err(|_| std::io::Error::other("spawner thread gone"))?;
    answer
        .recv()
        .map_err(|_| std::io::Error::other("spawner thread gone"))?
}

/// SIGTERM, then SIGKILL after [`STOP_TIMEOUT`]; always reaped.
fn stop_child(c: &mut Child) {
    let pid = nix::unistd::Pid::from_raw(c.id() as i32);
    let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
    let start = Instant::now();
    while start.elapsed() < STOP_TIMEOUT {
        if let Ok(Some(_)) = c.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = c.kill();
    let _ = c.wait();
}

/// Reaps children that died on their own; the others keep serving.
fn reap(state: &State) {
    loop {
        std::thread::sleep(Duration::from_millis(500));
        let mut m = lock(&state.children);
        let dead: Vec<String> = m
            .iter_mut()
            .filter_map(|(t, s)| match s.child.try_wait() {
                Ok(Some(st)) => {
                    tracing::warn!(target = %t, volume = %s.volume, status = %st, "mount child exited; its target answers ENOTCONN until published again");
                    Some(t.clone())
                }
                _ => None,
            })
            .collect();
        for t in dead {
            m.remove(&t);
        }
    }
}
