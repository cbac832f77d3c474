//! `sealfs csi mounter --socket PATH`: one per node, unprivileged but for CAP_IPC_LOCK. It
//! receives FUSE connections that the node plugin opened and mounted, and starts one
//! `sealfs mount --fuse-fd 3` child per published volume (per pod: its own identity, audit
//! and failure domain); it answers once the child serves or has failed, reaps children and
//! keeps serving the others when one dies. It never opens /dev/fuse and never mounts.
//!
//! It holds each volume's connection (a dup), secrets and newest state (holder.rs) while
//! the volume is published: a child that crashes (SIGKILL, a panic, the OOM killer) is
//! followed by a successor that takes the connection over, and its readers only wait. No
//! successor within `--resume-timeout`, or a crash loop: the mounter lets the connection go
//! and the target answers ENOTCONN until published again. Children die with the mounter
//! (PR_SET_PDEATHSIG), its copies with it: that is why it is updated OnDelete.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::holder::Link;
use super::seqpacket;
use super::wire::{check_publish, Reply, Request, DRIVER_IDENTITY_ENV, INHERITED_ENV, PUBLISH_ENV};
use crate::exit;

use super::wire::{READY_TIMEOUT, STOP_TIMEOUT};

/// How a volume's child is started, again after a crash.
struct Spec {
    target: String,
    uri: String,
    args: Vec<String>,
    env: BTreeMap<String, String>,
    pod_identity: bool,
}

/// What the mounter keeps for a published volume: its connection (a dup: a crashed child's
/// readers wait in the kernel for a successor instead of failing), its secrets (the newest
/// token in them), and the link its children store their state through.
struct Held {
    fuse: OwnedFd,
    secrets: Option<OwnedFd>,
    link: Arc<Link>,
    /// When earlier successors started: a crash loop is given up.
    restarts: VecDeque<Instant>,
}

impl Drop for Held {
    fn drop(&mut self) {
        self.link.close();
    }
}

struct Served {
    child: Child,
    spec: Spec,
    held: Held,
}

/// A child that crashed this often within [`RESTART_WINDOW`] is not followed again.
const MAX_RESTARTS: usize = 5;
const RESTART_WINDOW: Duration = Duration::from_secs(600);

#[derive(Default)]
struct State {
    children: Mutex<HashMap<String, Served>>,
    /// Targets whose crashed child's successor is starting; set (under the `children`
    /// lock) when an unpublish or a new publish of the target cancels it.
    resuming: Mutex<HashMap<String, Arc<AtomicBool>>>,
    next: std::sync::atomic::AtomicU64,
    /// `--pass-env`: more of the mounter's variables its children inherit.
    pass_env: Vec<String>,
    /// `--resume-timeout`: how long a crashed child's readers wait for a successor.
    resume_timeout: Duration,
    /// `--cache-dir DIR --cache-dir-size N` for every child (the node-wide disk cache).
    child_args: Vec<String>,
}

/// `sealfs csi mounter`'s settings besides its socket.
pub struct Options {
    /// `--pass-env`: more of the mounter's variables its children inherit.
    pub pass_env: Vec<String>,
    /// `--resume-timeout`.
    pub resume_timeout: Duration,
    /// `--cache-dir` and `--cache-dir-size`: the node-wide disk cache of sealed chunks.
    pub cache_dir: Option<(std::path::PathBuf, u64)>,
}

impl State {
    /// Takes `target`'s volume out of service: its child (if any) is returned for the
    /// caller to stop, a successor being started is cancelled.
    fn withdraw(&self, target: &str) -> Option<Served> {
        let mut m = lock(&self.children);
        if let Some(c) = lock(&self.resuming).get(target) {
            c.store(true, Ordering::SeqCst);
        }
        m.remove(target)
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Runs the mounter until SIGTERM/SIGINT; an error is why it could not start (one line,
/// for the CLI to print).
pub fn run(socket: &Path, opts: Options) -> Result<(), String> {
    let Options {
        pass_env,
        resume_timeout,
        cache_dir,
    } = opts;
    let mut child_args = Vec::new();
    if let Some((dir, size)) = cache_dir {
        // Checked (and its layout made) here: a bad directory stops the mounter in one
        // line, not every publish.
        crate::cache::disk::check(&dir, size).map_err(|e| e.to_string())?;
        let dir = dir
            .to_str()
            .ok_or("--cache-dir: not a UTF-8 path")?
            .to_string();
        child_args = vec![
            "--cache-dir".into(),
            dir,
            "--cache-dir-size".into(),
            size.to_string(),
        ];
    }
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
        resume_timeout,
        child_args,
        ..State::default()
    });
    {
        let state = state.clone();
        std::thread::spawn(move || reap(state));
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
                if let Some(mut s) = state.withdraw(&target) {
                    stop_child(&mut s.child);
                    tracing::info!(target, volume = %s.spec.uri, "unpublished");
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
/// swaps it in: aws_identity.rs), and keeps it in the volume's secrets for a successor.
/// The token is never logged here.
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
    let r = match crate::fuse::control::request_label(Path::new(target), &line) {
        Ok(a) if a == "ok" => {
            tracing::info!(target, "the pod's token was refreshed");
            Reply::ok(None)
        }
        Ok(a) => Reply::failed(
            exit::FAILURE,
            crate::format::naming::printable(a.strip_prefix("error: ").unwrap_or(&a), 512),
        ),
        Err(e) => Reply::failed(exit::FAILURE, format!("the mount's control socket: {e}")),
    };
    if r.ok {
        if let Some(s) = lock(&state.children).get_mut(target) {
            match s
                .held
                .secrets
                .as_ref()
                .map(|old| with_token(old, &fresh.token))
            {
                Some(Ok(new)) => s.held.secrets = Some(new),
                Some(Err(e)) => {
                    tracing::warn!(target, error = %e, "the refreshed token is not kept for a successor")
                }
                None => {}
            }
        }
    }
    r
}

/// A new sealed secrets memfd: `old`'s, with the pod's token replaced by `token`.
fn with_token(old: &OwnedFd, token: &str) -> std::io::Result<OwnedFd> {
    let mut s: super::secrets::Secrets =
        super::secrets::open(old.try_clone()?).map_err(std::io::Error::other)?;
    if let Some(w) = s.aws_web_identity.as_mut() {
        w.token = zeroize::Zeroizing::new(token.to_string());
    }
    super::secrets::seal(&s)
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
    if let Some(mut old) = state.withdraw(target) {
        stop_child(&mut old.child);
    }
    let n = state
        .next
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let link = match Link::bind(notify_dir.join(format!("{n}.sock"))) {
        Ok(l) => l,
        Err(e) => return Reply::failed(exit::FAILURE, format!("notify socket: {e}")),
    };
    let spec = Spec {
        target: target.to_string(),
        uri: uri.to_string(),
        args: args.to_vec(),
        env: env.clone(),
        pod_identity,
    };
    let held = Held {
        fuse: fuse_fd,
        secrets: secrets_fd,
        link,
        restarts: VecDeque::new(),
    };
    // On failure `held` goes: the connection is let go.
    match start(state, &spec, &held, None) {
        Ok(child) => {
            let pid = child.id();
            tracing::info!(target, pid, "published");
            lock(&state.children).insert(target.to_string(), Served { child, spec, held });
            Reply::ok(Some(pid))
        }
        Err((code, msg)) => Reply::failed(code, msg),
    }
}

/// A successor's start: it may take until `deadline`, and `cancel` ends it early.
struct Resuming<'a> {
    deadline: Instant,
    cancel: &'a AtomicBool,
}

/// Starts `spec`'s child on `held`'s connection (with the stored states when resuming) and
/// waits until it serves; `Err` is its exit code and last error line.
fn start(
    state: &State,
    spec: &Spec,
    held: &Held,
    resume: Option<&Resuming>,
) -> Result<Child, (i32, String)> {
    let failed = |what: &str, e: &dyn std::fmt::Display| (exit::FAILURE, format!("{what}: {e}"));
    let exe = std::env::current_exe().map_err(|e| failed("own executable", &e))?;
    let mut c = Command::new(exe);
    c.args(["mount", "--foreground", "--fuse-fd", "3"]);
    // The descriptors the child gets, from 3 on: the connection, the secrets, the states.
    let mut pass: Vec<OwnedFd> = vec![held.fuse.try_clone().map_err(|e| failed("dup", &e))?];
    if let Some(s) = &held.secrets {
        c.args(["--secrets-fd", "4"]);
        pass.push(s.try_clone().map_err(|e| failed("dup", &e))?);
    }
    // Options (the volume's, then the node's), then `--`: the URI and target are
    // positionals whatever they start with.
    c.args(&spec.args)
        .args(&state.child_args)
        .arg("--")
        .arg(&spec.uri)
        .arg(&spec.target);
    // The child's environment: the operator's (the mounter's own: endpoints, and the
    // driver's identity unless the volume reads as the pod), then the publish's
    // allow-listed ones.
    c.env_clear();
    for (k, v) in std::env::vars() {
        let name = k.as_str();
        if INHERITED_ENV.contains(&name)
            || PUBLISH_ENV.contains(&name)
            || state.pass_env.contains(&k)
            || (!spec.pod_identity && DRIVER_IDENTITY_ENV.contains(&name))
        {
            c.env(k, v);
        }
    }
    c.envs(&spec.env);
    if spec.pod_identity {
        c.env("AWS_EC2_METADATA_DISABLED", "true");
    }
    // The mounter is the child's descriptor store (holder.rs).
    c.env("NOTIFY_SOCKET", held.link.path())
        .env("FDSTORE", crate::fuse::handover::NEEDED.to_string());
    if resume.is_some() {
        let states = held.link.states().map_err(|e| failed("dup", &e))?;
        if states.is_empty() {
            return Err((exit::FAILURE, "no state is held for a successor".into()));
        }
        let mut list = Vec::new();
        for (name, fd) in states {
            list.push(format!("{name}={}", 3 + pass.len()));
            pass.push(fd);
        }
        c.env(
            crate::fuse::handover::HOLDER_VAR,
            format!("{}:{}", std::process::id(), list.join(",")),
        );
    }
    c.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    // Out of the way of 3.. first: a descriptor may itself be 3 or 4, and dup2 onto itself
    // would neither move it nor clear close-on-exec.
    let high: Vec<OwnedFd> = pass
        .iter()
        .map(|f| above(f, 64))
        .collect::<std::io::Result<_>>()
        .map_err(|e| failed("dup", &e))?;
    drop(pass);
    use std::os::fd::AsRawFd;
    let raw: Vec<i32> = high.iter().map(|f| f.as_raw_fd()).collect();
    let first_unused = 3 + raw.len() as libc::c_uint;
    // SAFETY: between fork and exec only async-signal-safe calls: dup2 (which clears
    // close-on-exec on the copy), close_range and prctl; `raw` was built before the fork.
    #[allow(unsafe_code)]
    unsafe {
        c.pre_exec(move || {
            for (i, &fd) in raw.iter().enumerate() {
                if libc::dup2(fd, 3 + i as i32) < 0 {
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
    // No message counts between here and the new child's PID: a READY counted below is its.
    held.link.expect(None);
    let seen = held.link.readies();
    let spawned = spawn(c);
    // No copy stays here but the held ones.
    drop(high);
    let mut child = spawned.map_err(|e| failed("cannot start the mount", &e))?;
    held.link.expect(Some(child.id() as i32));
    let last_error = Arc::new(Mutex::new(String::new()));
    let reader = child.stderr.take().map(|err| {
        let (last, label) = (
            last_error.clone(),
            crate::format::naming::escaped(&spec.target),
        );
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
    let begun = Instant::now();
    let deadline = resume.map_or(begun + READY_TIMEOUT, |r| {
        r.deadline.min(begun + READY_TIMEOUT)
    });
    let outcome = loop {
        if held.link.wait_ready(seen, Duration::from_millis(200)) {
            break Ok(());
        }
        match child.try_wait() {
            Ok(Some(st)) => break Err(st.code().unwrap_or(exit::FAILURE)),
            Ok(None) => {}
            Err(_) => break Err(exit::FAILURE),
        }
        if Instant::now() > deadline || resume.is_some_and(|r| r.cancel.load(Ordering::SeqCst)) {
            stop_child(&mut child);
            break Err(exit::FAILURE);
        }
    };
    match outcome {
        Ok(()) => Ok(child),
        Err(code) => {
            // The child is gone: its stderr reader ends at the pipe's end, last line read.
            // (Bounded: a descendant that kept the pipe open must not hold us here.)
            if let Some(r) = reader {
                let t = Instant::now();
                while !r.is_finished() && t.elapsed() < Duration::from_secs(2) {
                    std::thread::sleep(Duration::from_millis(10));
                }
            }
            let msg = lock(&last_error).clone();
            let msg = if !msg.is_empty() {
                msg
            } else if Instant::now() > deadline {
                format!(
                    "the mount did not serve within {}s",
                    deadline.duration_since(begun).as_secs()
                )
            } else {
                format!("the mount exited with code {code}")
            };
            Err((code, msg))
        }
    }
}

/// A close-on-exec copy of `fd` numbered `min` or above.
fn above(fd: &OwnedFd, min: i32) -> std::io::Result<OwnedFd> {
    let raw = nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_DUPFD_CLOEXEC(min))?;
    // SAFETY: fcntl returned a new descriptor that nothing else owns.
    #[allow(unsafe_code)]
    Ok(unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(raw) })
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

/// Reaps children that died on their own; the others keep serving. A dead child whose
/// connection is up and whose state the mounter holds is followed by a successor.
fn reap(state: Arc<State>) {
    loop {
        // Woken at once by a child's exit (its pidfd turns readable), or after 100 ms to
        // take in children started meanwhile.
        let pidfds: Vec<OwnedFd> = lock(&state.children)
            .values()
            .filter_map(|s| pidfd_open(s.child.id()).ok())
            .collect();
        wait_any(&pidfds, 100);
        // Taken out of the map and marked as resuming under one lock: an unpublish or a
        // publish of the target in between finds one or the other.
        let mut dead: Vec<(Served, std::process::ExitStatus, Arc<AtomicBool>)> = Vec::new();
        {
            let mut m = lock(&state.children);
            let gone: Vec<(String, std::process::ExitStatus)> = m
                .iter_mut()
                .filter_map(|(t, s)| Some((t.clone(), s.child.try_wait().ok()??)))
                .collect();
            for (t, status) in gone {
                let Some(s) = m.remove(&t) else { continue };
                let cancel = Arc::new(AtomicBool::new(false));
                lock(&state.resuming).insert(t, cancel.clone());
                dead.push((s, status, cancel));
            }
        }
        for (mut s, status, cancel) in dead {
            // What the child sent before it died still counts (its last state above all);
            // nothing after.
            s.held.link.settle(Duration::from_secs(1));
            s.held.link.expect(None);
            let t = s.spec.target.clone();
            if let Some(why) = not_followed(&mut s) {
                tracing::warn!(target = %t, volume = %s.spec.uri, %status, "mount child exited; not followed: {why}; its target answers ENOTCONN until published again");
                unmark(&state, &t, &cancel);
                continue; // `s` goes: the connection is let go
            }
            let state = state.clone();
            std::thread::spawn(move || resume(&state, s, status, &cancel));
        }
    }
}

/// Why a dead child gets no successor, if it does not.
fn not_followed(s: &mut Served) -> Option<String> {
    let recent = &mut s.held.restarts;
    while recent
        .front()
        .is_some_and(|at| at.elapsed() > RESTART_WINDOW)
    {
        recent.pop_front();
    }
    if !crate::fuse::handover::connection_alive(s.held.fuse.as_fd()) {
        Some("its connection is gone (unmounted)".into())
    } else if !s.held.link.has_state() {
        Some("it stored no state".into())
    } else if recent.len() >= MAX_RESTARTS {
        Some(format!(
            "a crash loop ({MAX_RESTARTS} successors in {} min)",
            RESTART_WINDOW.as_secs() / 60
        ))
    } else if !crate::fuse::handover::kernel_resends() {
        // Without FUSE_NOTIFY_RESEND (Linux 6.9) the requests it had read would never be
        // answered: their readers would wait for good on a held connection. Letting it go
        // fails them instead, as before.
        Some("this kernel cannot resend interrupted requests (Linux 6.9+)".into())
    } else {
        None
    }
}

/// Removes `target`'s resuming mark if it is still `cancel` (a later crash of the same
/// target may have put its own).
fn unmark(state: &State, target: &str, cancel: &Arc<AtomicBool>) {
    let mut r = lock(&state.resuming);
    if r.get(target).is_some_and(|c| Arc::ptr_eq(c, cancel)) {
        r.remove(target);
    }
}

/// A descriptor that turns readable when process `pid` exits (pidfd_open(2), Linux 5.3).
#[allow(unsafe_code)]
fn pidfd_open(pid: u32) -> std::io::Result<OwnedFd> {
    // SAFETY: pidfd_open takes a PID and flags and returns a new descriptor or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a new descriptor that nothing else owns.
    Ok(unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd as i32) })
}

/// Waits at most `ms` milliseconds for any of `fds` to turn readable.
fn wait_any(fds: &[OwnedFd], ms: u16) {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    if fds.is_empty() {
        std::thread::sleep(Duration::from_millis(ms.into()));
        return;
    }
    let mut p: Vec<PollFd> = fds
        .iter()
        .map(|f| PollFd::new(f.as_fd(), PollFlags::POLLIN))
        .collect();
    let _ = poll(&mut p, PollTimeout::from(ms));
}

/// Starts a successor for `s`'s crashed child, again with backoff, until it serves or
/// `--resume-timeout` has passed since the crash; then the connection is let go.
fn resume(
    state: &State,
    mut s: Served,
    status: std::process::ExitStatus,
    cancel: &Arc<AtomicBool>,
) {
    let crashed = Instant::now();
    let t = s.spec.target.clone();
    tracing::warn!(target = %t, %status, "mount child exited; a successor takes its connection over (readers wait)");
    s.held.restarts.push_back(crashed);
    let within = Resuming {
        deadline: crashed + state.resume_timeout,
        cancel,
    };
    let mut delay = Duration::from_millis(100);
    let child = loop {
        if cancel.load(Ordering::SeqCst) {
            break None;
        }
        if !crate::fuse::handover::connection_alive(s.held.fuse.as_fd()) {
            tracing::warn!(target = %t, "the connection went while its successor started");
            break None;
        }
        match start(state, &s.spec, &s.held, Some(&within)) {
            Ok(child) => break Some(child),
            Err((code, msg)) => {
                tracing::warn!(target = %t, code, error = %msg, "the successor did not start")
            }
        }
        if crashed.elapsed() + delay > state.resume_timeout {
            tracing::error!(target = %t, seconds = state.resume_timeout.as_secs(), "no successor within --resume-timeout: the connection is let go, its readers get ENOTCONN");
            break None;
        }
        std::thread::sleep(delay);
        delay = (delay * 2).min(Duration::from_secs(2));
    };
    let mut m = lock(&state.children);
    unmark(state, &t, cancel);
    match child {
        Some(c) if !cancel.load(Ordering::SeqCst) && !m.contains_key(&t) => {
            tracing::info!(target = %t, pid = c.id(), stall_ms = crashed.elapsed().as_millis() as u64, "successor serves the connection");
            s.child = c;
            m.insert(t, s);
        }
        Some(mut c) => {
            // Unpublished or published again meanwhile: this successor is not wanted.
            drop(m);
            stop_child(&mut c);
        }
        None => {}
    }
}
