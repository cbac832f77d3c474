//! The mount process: checks, daemonizing, readiness, signals, clean unmount.
//!
//! Order matters: everything that can fail for a reason the user should see (bad URI,
//! credentials, keys, mlock, busy mount point) happens before the parent is told "ready",
//! so the parent exits non-zero with that one line. The parent exits 0 only once `stat` of
//! the mount point is answered through FUSE by this daemon.

use std::io::{Read, Write};
use std::os::fd::{AsFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use fuser::{Config, MountOption, SessionACL};

use super::adapter::Adapter;
use super::handover;
use crate::error::Error;
use crate::exit;
use crate::fs::{MountConfig, SealFs};
use crate::keys::{KeySpec, Keyring};
use crate::store::Location;

/// What `sealfs mount` was asked to do.
#[derive(Debug, Clone)]
pub struct MountArgs {
    pub uri: String,
    pub mountpoint: PathBuf,
    pub keys: Vec<String>,
    /// `--trust-signer`: serve only models signed by one of these.
    pub trust_signers: Vec<String>,
    pub config: MountConfig,
    pub foreground: bool,
    pub allow_other: bool,
    pub allow_root: bool,
    /// Serve Prometheus metrics here (`GET /metrics`).
    pub metrics_addr: Option<std::net::SocketAddr>,
    pub noexec: bool,
    /// `--fuse-fd N`: serve a connection someone else opened and mounted; `mountpoint` is
    /// then only a label.
    pub fuse_fd: Option<i32>,
    /// `--secrets-fd N`: a sealed memfd of volume secrets (csi/secrets.rs).
    pub secrets_fd: Option<i32>,
    /// `--check-start`: [`SealFs::check_start`] before serving.
    pub check_start: bool,
}

/// A failure before the mount was live: one line and an exit code.
struct Fatal(i32, String);

impl From<Error> for Fatal {
    fn from(e: Error) -> Self {
        Fatal(exit::code(&e), crate::error_chain(&e))
    }
}

/// Runs `sealfs mount`. Must be called before any thread exists (it may fork).
pub fn run(args: MountArgs) -> i32 {
    // Passed descriptors are checked and owned before anything else opens one.
    if let Some(n) = args.secrets_fd {
        let kept = take_fd(n, "--secrets-fd")
            .and_then(|fd| {
                crate::csi::secrets::open(fd).map_err(|e| Fatal(exit::USAGE, e.to_string()))
            })
            .and_then(|s| {
                crate::csi::secrets::keep(s).map_err(|e| Fatal(exit::USAGE, e.to_string()))
            });
        if let Err(Fatal(code, msg)) = kept {
            eprintln!("sealfs: error: {msg}");
            return code;
        }
    }
    let mut passed = match args.fuse_fd.map(take_fuse_fd).transpose() {
        Ok(p) => p,
        Err(Fatal(code, msg)) => {
            eprintln!("sealfs: error: {msg}");
            return code;
        }
    };
    // A connection a predecessor left in systemd's descriptor store, or the CSI mounter's
    // store of its child's state (fuse/handover.rs, csi/holder.rs).
    let fd_store = handover::FdStore::from_env().map(Arc::new);
    let (reexeced, mut resume) = match handover::take_passed() {
        Ok(mut p) => {
            // The mounter restarting a crashed child: the connection is `--fuse-fd` (held
            // by the mounter, already initialised), the state what the mounter kept.
            let (reexec, held) = (p.reexec, args.fuse_fd.is_some() && !p.states.is_empty());
            if held {
                p.fuse = passed.take();
            }
            let r = takeover(p, &args, fd_store.as_deref());
            if held && r.is_none() {
                eprintln!("sealfs: error: the connection the mounter held cannot be taken over (the log says why)");
                return exit::FAILURE;
            }
            (reexec, r)
        }
        Err(msg) => {
            eprintln!("sealfs: error: {msg}");
            return exit::USAGE;
        }
    };
    // A passed connection: the mount point is the mounter's, maybe not even visible here.
    // A resumed one is ours and live, but nobody serves it yet: never touched (a stat
    // would wait on this very process).
    let checked = match (&args.fuse_fd, &resume) {
        (Some(_), _) => Ok(args.mountpoint.clone()),
        (None, Some(r)) => Ok(r.mountpoint.clone()),
        (None, None) => check_mountpoint(&args.mountpoint),
    };
    let mut mountpoint = match checked {
        Ok(p) => p,
        Err(Fatal(code, msg)) => {
            eprintln!("sealfs: error: {msg}");
            return code;
        }
    };
    let mut ready_pipe = None;
    // A re-executed daemon (a SIGHUP upgrade) already is the daemon: same PID, no terminal.
    if reexeced && !args.foreground {
        detach_stderr();
    }
    if !args.foreground && !reexeced {
        match daemonize() {
            Ok(Some(fd)) => ready_pipe = Some(fd),
            Ok(None) => unreachable!("the parent returns from daemonize() through wait_ready"),
            Err(code) => return code,
        }
    }
    // No core dumps, no ptrace: decrypted chunks and DEKs must not reach a disk through a
    // crash dump. cli::main_with did it before the fork; repeated for other callers.
    crate::process::harden();
    let report = |pipe: &mut Option<std::fs::File>, res: Result<(), Fatal>| match (pipe.take(), res)
    {
        (Some(mut p), Ok(())) => {
            let _ = p.write_all(b"OK\n");
            detach_stderr();
        }
        (Some(mut p), Err(Fatal(code, msg))) => {
            let _ = p.write_all(format!("{code} {msg}\n").as_bytes());
        }
        (None, Err(Fatal(_, msg))) => eprintln!("sealfs: error: {msg}"),
        (None, Ok(())) => {}
    };
    let mut pipe = ready_pipe.map(std::fs::File::from);
    bound_heap();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        // SIGTERM, SIGINT and SIGHUP go to the main thread alone (handover.rs).
        .on_thread_start(handover::block_stop_signals)
        // Local-store reads run here; each thread would keep its own malloc arena.
        .max_blocking_threads(8)
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            report(
                &mut pipe,
                Err(Fatal(
                    exit::FAILURE,
                    format!("cannot start the runtime: {e}"),
                )),
            );
            return exit::FAILURE;
        }
    };
    let fs = match rt.block_on(setup(&args, resume.as_mut().and_then(|r| r.state.take()))) {
        Ok(fs) => fs,
        // (A `--fuse-fd` child cannot mount afresh: the mounter retries or lets go.)
        Err(Fatal(_, why)) if resume.is_some() && args.fuse_fd.is_none() => {
            // Not resumable after all: let the old connection go and mount afresh.
            tracing::warn!(error = %why, "cannot take the connection over; mounting afresh");
            let old = resume.take().expect("checked");
            drop(old.fuse);
            if let Some(s) = &fd_store {
                s.clear();
            }
            detach(&old.mountpoint);
            let fresh = check_mountpoint(&args.mountpoint).and_then(|p| {
                mountpoint = p;
                rt.block_on(setup(&args, None))
            });
            match fresh {
                Ok(fs) => fs,
                Err(f) => {
                    let code = f.0;
                    report(&mut pipe, Err(f));
                    return code;
                }
            }
        }
        Err(f) => {
            let code = f.0;
            report(&mut pipe, Err(f));
            return code;
        }
    };
    if args.check_start {
        if let Err((code, msg)) = rt.block_on(fs.check_start()) {
            report(&mut pipe, Err(Fatal(code, msg)));
            return code;
        }
    }
    let conn = Connection {
        passed,
        resumed: resume.map(|r| (r.fuse, r.generation)),
        store: fd_store,
    };
    let code = match serve(&rt, fs, &args, conn, &mountpoint, &mut pipe, report) {
        Ok(()) => exit::OK,
        Err(f) => {
            let code = f.0;
            report(&mut pipe, Err(f));
            code
        }
    };
    rt.shutdown_timeout(Duration::from_secs(2));
    code
}

/// A connection taken over from a predecessor, checked as far as can be before setup.
struct Resume {
    fuse: OwnedFd,
    /// Taken by setup.
    state: Option<handover::State>,
    generation: u32,
    mountpoint: PathBuf,
}

/// How the FUSE connection comes about, and who keeps it for a successor.
struct Connection {
    /// `--fuse-fd`: opened and mounted by the CSI mounter's caller.
    passed: Option<OwnedFd>,
    /// From the descriptor store: already initialised; this daemon's generation.
    resumed: Option<(OwnedFd, u32)>,
    /// systemd's descriptor store, when the unit has one.
    store: Option<Arc<handover::FdStore>>,
}

/// The resumable connection among `p`, or why not (logged; the store is then emptied and
/// the descriptors closed, so a dead mount is detached and mounted afresh).
fn takeover(
    mut p: handover::Passed,
    args: &MountArgs,
    store: Option<&handover::FdStore>,
) -> Option<Resume> {
    if p.is_empty() {
        return None;
    }
    let state = p.newest_state();
    let fuse = p.fuse.take();
    // Resolving it must not wait on the mount, which nobody serves yet. A `--fuse-fd`
    // target is the mounter's, maybe not visible here: only a label.
    let mountpoint = match args.fuse_fd {
        Some(_) => Some(args.mountpoint.clone()),
        None => outside_path(&args.mountpoint),
    };
    let why = match (&fuse, &state, &mountpoint) {
        (None, _, _) => Some("no connection was stored".to_string()),
        (_, None, _) => Some("no state was stored".to_string()),
        (_, _, None) => Some("the mount point's parent does not resolve".to_string()),
        (Some(fd), Some(st), Some(mp)) => {
            if !handover::is_fuse_device(fd.as_fd()) {
                Some("the stored connection is not /dev/fuse".to_string())
            } else if st.uri != args.uri {
                Some(format!("the stored mount is of {:?}", st.uri))
            } else if !handover::connection_alive(fd.as_fd()) {
                Some("the stored connection is gone (unmounted)".to_string())
            } else if args.fuse_fd.is_none() && !matches!(crate::mountinfo::at(mp), Ok(Some(_))) {
                Some("nothing is mounted at the mount point".to_string())
            } else {
                None
            }
        }
    };
    if let Some(why) = why {
        // (The CSI mounter's store is left as it is: its next successor may manage.)
        if args.fuse_fd.is_some() {
            tracing::warn!(reason = %why, "not resuming the connection the mounter held");
        } else {
            tracing::warn!(reason = %why, "not resuming the stored connection; mounting afresh");
            if let Some(s) = store {
                s.clear();
            }
        }
        return None;
    }
    let (fuse, state, mountpoint) = (fuse?, state?, mountpoint?);
    if let Some(s) = store {
        s.continue_after(state.seq);
    }
    Some(Resume {
        fuse,
        generation: state.generation.saturating_add(1),
        state: Some(state),
        mountpoint,
    })
}

async fn setup(args: &MountArgs, resume: Option<handover::State>) -> Result<Arc<SealFs>, Fatal> {
    let loc = Location::parse(&args.uri).await.map_err(Error::from)?;
    let specs = args
        .keys
        .iter()
        .map(|k| k.parse::<KeySpec>())
        .collect::<Result<Vec<_>, _>>()
        .map_err(Error::from)?;
    let (every, bound) = (args.config.revalidate, args.config.revalidate_max_outage);
    if !every.is_zero() && !bound.is_zero() && bound <= every {
        // One failed check would already be past the bound: a single transient error would
        // revoke.
        return Err(Error::Usage(format!(
            "--revalidate-max-outage ({}s) must be longer than --revalidate ({}s)",
            bound.as_secs(),
            every.as_secs()
        ))
        .into());
    }
    let keyring = Keyring::resolve(&specs).await.map_err(Error::from)?;
    if !args.config.revalidate.is_zero() {
        keyring.bound_release_outages(args.config.revalidate_max_outage);
    }
    let trusted = crate::sign::TrustedSigners::from_uris(&args.trust_signers)
        .await
        .map_err(Error::from)?;
    if let Some(why) =
        keyring.origin_unproven(!trusted.is_empty(), args.config.model_digest.is_some())
    {
        return Err(Error::Usage(why).into());
    }
    let fs = match resume {
        None => {
            SealFs::with_signers(
                loc.store,
                &loc.prefix,
                keyring,
                trusted,
                args.config.clone(),
            )
            .await?
        }
        Some(st) => {
            SealFs::resumed(
                loc.store,
                &loc.prefix,
                keyring,
                trusted,
                args.config.clone(),
                st.tree,
                st.generation.saturating_add(1),
            )
            .await?
        }
    };
    tracing::info!(uri = %args.uri, files = fs.file_count(), "listed");
    Ok(fs)
}

fn serve(
    rt: &tokio::runtime::Runtime,
    fs: Arc<SealFs>,
    args: &MountArgs,
    conn: Connection,
    mountpoint: &Path,
    pipe: &mut Option<std::fs::File>,
    report: impl Fn(&mut Option<std::fs::File>, Result<(), Fatal>),
) -> Result<(), Fatal> {
    let mut config = Config::default();
    config.mount_options = vec![
        MountOption::FSName(args.uri.clone()),
        MountOption::Subtype("sealfs".into()),
        MountOption::RO,
        MountOption::NoDev,
        MountOption::NoSuid,
        MountOption::NoAtime,
        MountOption::DefaultPermissions,
    ];
    if args.noexec {
        config.mount_options.push(MountOption::NoExec);
    }
    config.acl = match (args.allow_other, args.allow_root) {
        (true, _) => SessionACL::All,
        (false, true) => SessionACL::RootAndOwner,
        _ => SessionACL::Owner,
    };
    config.n_threads = Some(2);
    // The threads share the one fd, never a cloned fd each: a cloned fd would need
    // /dev/fuse (a passed connection has none), and it is a file of its own, whose read
    // requests fail (ECONNABORTED) when it closes with a crashed or re-executed daemon,
    // where those of the one connection stay queued for the successor.
    config.clone_fd = false;
    // A planned upgrade (SIGHUP) re-executes the binary it was started from, with this argv.
    let exe = std::env::current_exe();
    let argv: Vec<std::ffi::OsString> = std::env::args_os().collect();

    // Bind the metrics port before the mount, so a busy port fails the start.
    let metrics = match args.metrics_addr {
        Some(addr) => {
            let l = std::net::TcpListener::bind(addr)
                .and_then(|l| l.set_nonblocking(true).map(|_| l))
                .map_err(|e| Fatal(exit::USAGE, format!("--metrics-addr {addr}: {e}")))?;
            Some(l)
        }
        None => None,
    };
    // The control socket too: a mount that `sealfs revoke` cannot reach is refused, not
    // started with the panic button silently off (another user may squat its directory).
    let (control_listener, control_path) = crate::fuse::control::bind(mountpoint).map_err(|e| {
        Fatal(
            exit::FAILURE,
            format!("control socket for `sealfs revoke`: {e}"),
        )
    })?;
    // Handlers first: a SIGTERM that arrives right after READY=1 must unmount, not kill.
    let (mut term, mut int, mut hup) = {
        use tokio::signal::unix::{signal, SignalKind};
        let _in_rt = rt.enter();
        let io = |e: std::io::Error| {
            Fatal(
                exit::FAILURE,
                format!("cannot install signal handlers: {e}"),
            )
        };
        (
            signal(SignalKind::terminate()).map_err(io)?,
            signal(SignalKind::interrupt()).map_err(io)?,
            signal(SignalKind::hangup()).map_err(io)?,
        )
    };
    // A re-executed image started with them blocked (handover::reexec): its handlers
    // exist now, so what arrived meanwhile is delivered to them.
    handover::unblock_stop_signals();
    let adapter = Adapter {
        fs: fs.clone(),
        rt: rt.handle().clone(),
    };
    let resumed = conn.resumed.is_some();
    let generation = conn.resumed.as_ref().map_or(0, |r| r.1);
    let mut session = match (conn.passed, conn.resumed) {
        // The kernel's INIT is read here: the mounter mounted before passing the fd.
        (Some(fd), _) => fuser::Session::from_fd(adapter, fd, config.acl, config.clone()).map_err(|e| {
            Fatal(exit::FAILURE, format!("--fuse-fd: the FUSE handshake failed: {e}"))
        })?,
        // The predecessor answered INIT; the kernel sends it once per connection.
        (None, Some((fd, generation))) => {
            let s = fuser::Session::from_initialized_fd(adapter, fd, config.acl, config.clone());
            // What the predecessor read and never answered, queued again for us.
            match handover::notify_resend(s.as_fd()) {
                Ok(()) => tracing::info!(generation, "connection taken over; interrupted requests sent again"),
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => tracing::warn!(
                    generation,
                    "connection taken over; this kernel cannot resend interrupted requests (FUSE_NOTIFY_RESEND needs Linux 6.9): their readers wait until the kernel's own timeout, if any"
                ),
                Err(e) => tracing::warn!(generation, error = %e, "connection taken over; resending interrupted requests failed"),
            }
            s
        }
        (None, None) => fuser::Session::new(adapter, mountpoint, &config).map_err(|e| {
            Fatal(exit::FAILURE, format!("cannot mount {}: {e} (is /dev/fuse there and fusermount3 installed? allow_other needs user_allow_other in /etc/fuse.conf)", mountpoint.display()))
        })?,
    };
    // A successor's way back in: the connection, and the tree (written now, then at every
    // change), before the first request is served.
    if let Some(store) = &conn.store {
        // (The CSI mounter keeps its own copy of a `--fuse-fd` connection.)
        if args.fuse_fd.is_none() {
            if let Err(e) = store.store_connection(session.as_fd()) {
                tracing::warn!(error = %e, "the descriptor store refused the connection; a restart will remount");
            }
        }
        let (store, uri) = (store.clone(), args.uri.clone());
        fs.set_persister(Arc::new(move |tree| {
            let st = handover::State {
                seq: store.next_seq(),
                uri: uri.clone(),
                generation,
                tree,
            };
            if let Err(e) = store.store_state(&st) {
                tracing::warn!(error = %e, "could not store the mount's state for a successor");
            }
        }));
    }
    // What a SIGHUP upgrade hands across the exec (a `--fuse-fd` child is the mounter's).
    let upgrade_fd = match args.fuse_fd {
        Some(_) => None,
        None => session
            .as_fd()
            .try_clone_to_owned()
            .inspect_err(|e| tracing::warn!(error = %e, "no descriptor for an upgrade; SIGHUP will be refused"))
            .ok(),
    };
    let notifier = session.notifier();
    // Offset 0, length 0: every cached page of the inode, mapped ones included.
    fs.set_invalidator(Arc::new(move |ino| {
        if let Err(e) = notifier.inval_inode(fuser::INodeNo(ino), 0, 0) {
            // ENOENT: the kernel holds no such inode (nothing cached to drop).
            if e.raw_os_error() != Some(libc::ENOENT) {
                tracing::warn!(ino, error = %e, "kernel page invalidation failed");
            }
        }
    }));
    let mut unmounter = session.unmount_callable();
    let (done_tx, done_rx) = tokio::sync::oneshot::channel();
    let looper = std::thread::Builder::new()
        .name("fuse-loop".into())
        .spawn(move || {
            handover::block_stop_signals(); // (and the FUSE threads it starts)
            let r = session.run();
            let _ = done_tx.send(r);
        })
        .map_err(|e| Fatal(exit::FAILURE, format!("cannot start the FUSE loop: {e}")))?;

    // Ready only once the kernel routes a stat of the mount point to us (a passed
    // connection is live once its handshake is done: the mount point may not be visible).
    let mp = mountpoint.to_path_buf();
    let live = args.fuse_fd.is_some() || resumed || {
        let stat = rt.block_on(async {
            tokio::time::timeout(
                Duration::from_secs(20),
                tokio::task::spawn_blocking(move || std::fs::metadata(mp)),
            )
            .await
        });
        match stat {
            Ok(Ok(Ok(ref m))) if m.is_dir() => {
                raise_readahead(std::os::unix::fs::MetadataExt::dev(m));
                true
            }
            _ => false,
        }
    };
    if !live {
        let _ = unmounter.unmount();
        let _ = looper.join();
        return Err(Fatal(
            exit::FAILURE,
            format!("mount at {} did not answer stat", mountpoint.display()),
        ));
    }
    // The models' manifests before READY (bounded): a first open then pays one unwrap. One
    // task, waited for at most 5 s and left to finish: never cancelled and started again.
    let preload = fs.clone();
    let loading = rt.spawn(async move { preload.preload_models().await });
    let waited = rt.block_on(async { tokio::time::timeout(Duration::from_secs(5), loading).await });
    if waited.is_err() {
        tracing::warn!("model manifests not loaded within 5 s; loading on in the background");
    }
    report(pipe, Ok(()));
    crate::telemetry::sd_notify("READY=1");
    tracing::info!(mountpoint = %mountpoint.display(), "mounted");

    if let Some(l) = metrics {
        let _in_rt = rt.enter();
        match tokio::net::TcpListener::from_std(l) {
            Ok(l) => drop(rt.spawn(crate::metrics_http::serve(l, fs.clone()))),
            Err(e) => tracing::warn!(error = %e, "metrics listener"),
        }
    }
    // The sweeper has a task of its own: a slow or huge LIST must not hold DEKs and
    // plaintext of closed files past --dek-grace. It runs until the FUSE loop ends, also
    // while a signalled daemon waits for the last open file to close.
    let sweeper_fs = fs.clone();
    let sweeper = rt.spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tick.tick().await;
            sweeper_fs.sweep();
            sweeper_fs.persist_if_changed();
        }
    });
    // Revocation that reaches open files (fs/revoke.rs).
    let revalidator = (!args.config.revalidate.is_zero()).then(|| {
        let fs = fs.clone();
        let every = args.config.revalidate;
        rt.spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.tick().await; // the first tick is now: the opens just checked
            loop {
                tick.tick().await;
                let r = fs.revalidate().await;
                tracing::debug!(
                    checked = r.checked,
                    revoked = r.revoked,
                    unreachable = r.unreachable,
                    "revalidated held DEKs"
                );
            }
        })
    });
    // `sealfs revoke MOUNTPOINT` (fuse/control.rs).
    let control = {
        let _in_rt = rt.enter();
        match tokio::net::UnixListener::from_std(control_listener) {
            Ok(l) => Some((
                rt.spawn(crate::fuse::control::serve(l, fs.clone())),
                control_path,
            )),
            Err(e) => {
                tracing::warn!(error = %e, "control socket; `sealfs revoke` will not reach this mount");
                let _ = std::fs::remove_file(&control_path);
                None
            }
        }
    };
    // SIGUSR2 toggles debug logging on a live mount (as Mountpoint does).
    let usr2 = {
        let _in_rt = rt.enter();
        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::user_defined2())
            .ok()
            .map(|mut s| {
                rt.spawn(async move {
                    while s.recv().await.is_some() {
                        match crate::telemetry::toggle_debug() {
                            Some(now) => {
                                tracing::warn!(filter = %now, "SIGUSR2: log level switched")
                            }
                            None => tracing::warn!("SIGUSR2: log level could not be switched"),
                        }
                    }
                })
            })
    };
    let lister_fs = fs.clone();
    let lister = rt.spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tick.tick().await;
            lister_fs.refresh_if_due().await;
        }
    });
    let mut done_rx = done_rx;
    let ended_by_signal = loop {
        let ended = rt.block_on(async {
            tokio::select! {
                _ = term.recv() => Some(true),
                _ = int.recv() => Some(true),
                _ = &mut done_rx => Some(false),
                _ = hup.recv() => None,
            }
        });
        if let Some(by_signal) = ended {
            break by_signal;
        }
        // Returns only when the upgrade did not happen; this image serves on.
        upgrade(
            &fs,
            args,
            upgrade_fd.as_ref(),
            exe.as_deref().ok(),
            &argv,
            conn.store.as_deref(),
            generation,
        );
    };
    lister.abort();
    if ended_by_signal && args.fuse_fd.is_some() {
        // The unmount is the mounter's: end here. The loop thread is blocked reading the
        // connection; the process exit closes it, and the kernel fails every later access
        // (ENOTCONN) until the mounter unmounts.
        crate::telemetry::sd_notify("STOPPING=1");
        tracing::info!("signal received; ending (the mounter unmounts)");
        sweeper.abort();
        if let Some(r) = revalidator {
            r.abort();
        }
        if let Some((task, path)) = control {
            task.abort();
            let _ = std::fs::remove_file(path);
        }
        drop(looper);
        return Ok(());
    }
    if ended_by_signal {
        crate::telemetry::sd_notify("STOPPING=1");
        // A stop is not a restart: nothing is left for a successor to take over.
        if let Some(store) = &conn.store {
            store.clear();
        }
        tracing::info!("signal received; unmounting");
        // A session taken over owns no mount object (its first daemon made the mount):
        // unmounted by path.
        let unmounted = if resumed {
            umount(mountpoint, false)
        } else {
            unmounter.unmount()
        };
        if let Err(e) = unmounted {
            // Busy: a file is still open (an mmap'd model, a reader mid-file). Detach, as
            // libfuse does: the path is gone at once, open files keep being served, and the
            // loop below ends when the last one closes. Without this the daemon waited for
            // an unmount that nobody would retry.
            tracing::warn!(error = %e, "mount busy; detaching it, files still open are served until closed");
            detach(mountpoint);
        }
    }
    let _ = looper.join();
    sweeper.abort();
    if let Some(r) = revalidator {
        r.abort();
    }
    if let Some(u) = usr2 {
        u.abort();
    }
    if let Some((task, path)) = control {
        task.abort();
        let _ = std::fs::remove_file(path);
    }
    tracing::info!("unmounted; cache wiped");
    Ok(())
}

/// The kernel reads a FUSE mount ahead in 128 KiB requests whatever INIT's
/// `max_readahead` says (it takes the smaller of that and the device's `read_ahead_kb`): a
/// 1 MiB chunk then costs eight requests, eight context switches and eight lookups of the
/// chunk. 1 MiB on the mount's backing device (root only: sysfs; once per mount, so a
/// daemon that took the connection over leaves it as it is).
fn raise_readahead(dev: u64) {
    let path = format!(
        "/sys/class/bdi/{}:{}/read_ahead_kb",
        libc::major(dev),
        libc::minor(dev)
    );
    // Never O_CREAT: on a system without that sysfs file nothing may be created.
    let written = std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .and_then(|mut f| f.write_all(READ_AHEAD_KB.as_bytes()));
    match written {
        Ok(()) => tracing::debug!(path, kb = READ_AHEAD_KB, "read-ahead raised"),
        Err(e) => tracing::debug!(path, error = %e, "read-ahead left at the kernel's 128 KiB"),
    }
}

/// The read-ahead a mount's device gets: one default chunk.
pub const READ_AHEAD_KB: &str = "1024";

/// A planned upgrade (SIGHUP, `systemctl reload`): re-executes the binary at the path this
/// daemon was started from, in this process, handing it the connection and the tree
/// (fuse/handover.rs), while the tree is frozen so that no reply outdates the state. Does
/// not return when the exec succeeds; the new image answers `READY=1` once it serves.
fn upgrade(
    fs: &SealFs,
    args: &MountArgs,
    fuse: Option<&OwnedFd>,
    exe: Option<&Path>,
    argv: &[std::ffi::OsString],
    store: Option<&handover::FdStore>,
    generation: u32,
) {
    let (Some(fuse), Some(exe)) = (fuse, exe) else {
        tracing::warn!(
            "SIGHUP ignored: a --fuse-fd mount is upgraded by its mounter restarting it"
        );
        return;
    };
    if args.secrets_fd.is_some() {
        // Its secrets were read once from a descriptor that is gone.
        tracing::warn!("SIGHUP ignored: a mount given --secrets-fd cannot start again");
        return;
    }
    if !handover::kernel_resends() {
        tracing::warn!("SIGHUP ignored: an upgrade in place needs Linux 6.9+ (FUSE_NOTIFY_RESEND); restart the service to run a new binary");
        return;
    }
    // From here a stop or a second SIGHUP waits for the new image (or for this one again,
    // if the exec fails): no thread of this image takes it.
    handover::block_stop_signals();
    crate::telemetry::sd_notify_reloading();
    tracing::info!(exe = %exe.display(), generation, "SIGHUP: re-executing the binary in place; the connection and the tree go across");
    let err = fs.with_tree_frozen(|tree| {
        let st = handover::State {
            seq: store.map_or(1, |s| s.next_seq()),
            uri: args.uri.clone(),
            generation,
            tree,
        };
        handover::reexec(exe, argv, fuse.as_fd(), &st)
    });
    // Rust's exec set SIGPIPE back to its default for the whole process before failing: a
    // peer that hangs up on the control socket must not kill the daemon.
    // SAFETY: restores the disposition std sets at start; no handler is involved.
    #[allow(unsafe_code)]
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_IGN);
    }
    handover::unblock_stop_signals();
    tracing::error!(exe = %exe.display(), error = %err, "upgrade failed: the re-exec did not happen; serving on with this binary");
    crate::telemetry::sd_notify("READY=1");
}

/// The `--fuse-fd` descriptor, owned from here on, if it is an open /dev/fuse (character
/// device 10:229): anything else fails the start in one line.
fn take_fuse_fd(n: i32) -> Result<OwnedFd, Fatal> {
    let fd = take_fd(n, "--fuse-fd")?;
    if !handover::is_fuse_device(fd.as_fd()) {
        return Err(Fatal(
            exit::USAGE,
            format!("--fuse-fd {n}: not a /dev/fuse connection"),
        ));
    }
    Ok(fd)
}

/// An inherited descriptor named by a flag, owned from here on (closed when dropped).
#[allow(unsafe_code)]
fn take_fd(n: i32, flag: &str) -> Result<OwnedFd, Fatal> {
    // SAFETY: F_GETFD only asks whether `n` is an open descriptor.
    if unsafe { libc::fcntl(n, libc::F_GETFD) } < 0 {
        return Err(Fatal(
            exit::USAGE,
            format!("{flag} {n}: not an open file descriptor"),
        ));
    }
    // SAFETY: `n` is open (checked above) and was handed to this process to own: nothing
    // else in sealfs knows of it.
    Ok(unsafe { OwnedFd::from_raw_fd(n) })
}

/// Detaches a dead sealfs mount at `p` (its daemon gone: every access answers ENOTCONN),
/// so that a restarted `sealfs mount` (by hand, or systemd's `Restart=`) takes its place.
/// Only a FUSE mount whose daemon is gone (an opendir answers ENOTCONN) is touched: it
/// cannot serve anything any more, and the caller asked for sealfs there.
fn recover_dead_mount(p: &Path) -> Result<(), Fatal> {
    // A dead mount's path cannot be resolved (that is the failure): its parent can.
    let Some(target) = outside_path(p) else {
        return Ok(());
    };
    let shown = target.to_string_lossy().into_owned();
    let Ok(Some(crate::mountinfo::Mount {
        fs_type: fstype, ..
    })) = crate::mountinfo::at(&target)
    else {
        return Ok(());
    };
    // Dead? An opendir goes to the daemon (a stat may be answered from the kernel's cache).
    match std::fs::read_dir(&target) {
        Err(e) if e.raw_os_error() == Some(libc::ENOTCONN) => {}
        _ => return Ok(()), // alive (or not ours to judge): check_mountpoint says busy
    }
    // fusermount3 records a sealfs mount as `fuse` (or `fuse.sealfs` through mount.fuse3).
    if fstype != "fuse" && !fstype.starts_with("fuse.") {
        return Err(Fatal(
            exit::USAGE,
            format!("mount point {shown}: a dead {fstype} mount (not FUSE): detach it first"),
        ));
    }
    let st = std::process::Command::new("fusermount3")
        .args(["-u", "-z"])
        .arg(&target)
        .status();
    match st {
        Ok(st) if st.success() => {
            tracing::warn!(mountpoint = %shown, fstype, "detached a dead FUSE mount (its daemon had exited) to mount again");
            Ok(())
        }
        _ => Err(Fatal(
            exit::FAILURE,
            format!(
                "mount point {shown}: a dead sealfs mount that fusermount3 -u -z could not detach"
            ),
        )),
    }
}

/// `p` with its parent resolved and its last component kept: names a mount point without
/// a request to the filesystem mounted there (dead, or not yet served).
fn outside_path(p: &Path) -> Option<PathBuf> {
    let parent = p
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    Some(parent.canonicalize().ok()?.join(p.file_name()?))
}

/// The canonical mount point, or a clear reason it cannot be used.
fn check_mountpoint(p: &Path) -> Result<PathBuf, Fatal> {
    recover_dead_mount(p)?;
    let canon = p
        .canonicalize()
        .map_err(|e| Fatal(exit::USAGE, format!("mount point {}: {e}", p.display())))?;
    if !canon.is_dir() {
        return Err(Fatal(
            exit::USAGE,
            format!("mount point {} is not a directory", p.display()),
        ));
    }
    if matches!(crate::mountinfo::at(&canon), Ok(Some(_))) {
        return Err(Fatal(
            exit::USAGE,
            format!(
                "mount point {} is busy (already a mount point)",
                p.display()
            ),
        ));
    }
    Ok(canon)
}

/// Forks. The parent waits for the child's report and exits with it (never returns Ok);
/// the child gets the write end of the report pipe.
#[allow(unsafe_code)]
fn daemonize() -> Result<Option<OwnedFd>, i32> {
    let mut fds = [0i32; 2];
    // SAFETY: fds is a valid two-element array.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        eprintln!("sealfs: error: pipe: {}", std::io::Error::last_os_error());
        return Err(exit::FAILURE);
    }
    // SAFETY: both fds were just created and are owned here alone.
    let (r, w) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    // SAFETY: called before any other thread exists (see run()), so the child is consistent.
    match unsafe { libc::fork() } {
        -1 => {
            eprintln!("sealfs: error: fork: {}", std::io::Error::last_os_error());
            Err(exit::FAILURE)
        }
        0 => {
            drop(r);
            // SAFETY: plain syscalls in the single-threaded child.
            unsafe {
                libc::setsid();
                let null = libc::open(c"/dev/null".as_ptr(), libc::O_RDWR);
                if null >= 0 {
                    libc::dup2(null, 0);
                    libc::dup2(null, 1);
                    libc::close(null);
                }
            }
            Ok(Some(w))
        }
        _child => {
            drop(w);
            Err(wait_ready(std::fs::File::from(r)))
        }
    }
}

/// Once the parent has gone, stderr stays only if it is a file or a socket (journald's
/// stream, e.g. under a `.mount` unit). A pipe or terminal belongs to whoever started us:
/// `$(mount …)` or a test's captured output would otherwise wait for the daemon to exit.
#[allow(unsafe_code)]
fn detach_stderr() {
    // SAFETY: fstat into a zeroed stat buffer; open/dup2/close on fds we own.
    unsafe {
        let mut st: libc::stat = std::mem::zeroed();
        let kind = if libc::fstat(2, &mut st) == 0 {
            st.st_mode & libc::S_IFMT
        } else {
            0
        };
        let kept = kind == libc::S_IFREG || kind == libc::S_IFSOCK;
        // Log lines (audit events among them) must not be lost with the terminal: syslog.
        let to = crate::telemetry::detach(kept);
        tracing::info!(logs = to, "daemon detached");
        if !kept {
            let null = libc::open(c"/dev/null".as_ptr(), libc::O_RDWR);
            if null >= 0 {
                libc::dup2(null, 2);
                libc::close(null);
            }
        }
    }
}

/// The parent side: `OK` → 0; `CODE message` → print, exit CODE; EOF → the child died.
fn wait_ready(mut r: std::fs::File) -> i32 {
    let mut s = String::new();
    let _ = r.read_to_string(&mut s);
    let line = s.lines().next().unwrap_or("");
    if line == "OK" {
        return exit::OK;
    }
    match line.split_once(' ') {
        Some((code, msg)) => {
            eprintln!("sealfs: error: {msg}");
            code.parse().unwrap_or(exit::FAILURE)
        }
        None => {
            eprintln!("sealfs: error: the mount daemon exited before the mount was ready");
            exit::FAILURE
        }
    }
}

/// Unmounts `mountpoint` by path: `umount2` as root, else the setuid `fusermount3 -u`.
/// Not lazily, a busy mount is an error (and only EPERM falls back to fusermount3); lazily
/// (`MNT_DETACH`, `-z`), any failure of `umount2` falls back.
#[allow(unsafe_code)]
fn umount(mountpoint: &Path, lazy: bool) -> std::io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let path =
        std::ffi::CString::new(mountpoint.as_os_str().as_bytes()).map_err(std::io::Error::other)?;
    let flags = if lazy { libc::MNT_DETACH } else { 0 };
    // SAFETY: a NUL-terminated path; umount2 has no other inputs.
    if unsafe { libc::umount2(path.as_ptr(), flags) } == 0 {
        return Ok(());
    }
    let e = std::io::Error::last_os_error();
    if !lazy && e.raw_os_error() != Some(libc::EPERM) {
        return Err(e);
    }
    let mut fallback = std::process::Command::new("fusermount3");
    fallback.arg("-u");
    if lazy {
        fallback.arg("-z");
    }
    let st = fallback.arg(mountpoint).status()?;
    if st.success() {
        Ok(())
    } else {
        Err(std::io::Error::other(format!("fusermount3 -u: {st}")))
    }
}

/// Lazy unmount: the path is gone at once, open files are served until closed.
fn detach(mountpoint: &Path) {
    if umount(mountpoint, true).is_err() {
        tracing::warn!(mountpoint = %mountpoint.display(), "lazy unmount failed too");
    }
}

/// Two malloc arenas instead of glibc's 8 per core: every thread that frees a MiB-sized
/// buffer (GET pieces, local reads) otherwise keeps it in its own arena, which measured
/// +25 MiB of peak RSS reading 512 MiB through a 128 MiB cache, with no gain in speed.
fn bound_heap() {
    #[cfg(target_env = "gnu")]
    // SAFETY: mallopt only sets allocator parameters; called before any other thread exists.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
    }
}
