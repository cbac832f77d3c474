//! Issue 23: a daemon that crashes, restarts or stops, around a live mount. A holder that
//! speaks systemd's protocol (a `NOTIFY_SOCKET` that keeps `FDSTORE=1` descriptors, and
//! starts the next daemon with `LISTEN_FDS`/`LISTEN_FDNAMES`/`LISTEN_PID`) runs the real
//! binary; readers (`pread` at random offsets, sequential, and `mmap`) check every byte
//! against the plaintext while the daemon is killed, re-executed (SIGHUP) or lost under
//! them. The tests run one at a time ([`serial`]): a reader waits in the kernel while its
//! daemon is down, and nothing of another test may share those seconds.

mod common;

use std::collections::BTreeMap;
use std::io::IoSliceMut;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags, UnixAddr};

/// What the holder's socket has received.
#[derive(Default)]
struct Received {
    /// The store: descriptors by name (systemd's `FDNAME`).
    store: BTreeMap<String, OwnedFd>,
    ready: usize,
    reloading: usize,
    /// The holder's own markers seen ([`Holder::drain`]).
    marks: usize,
    /// Every state descriptor ever stored, kept to be scanned for secrets.
    states_seen: Vec<Vec<u8>>,
}

/// systemd's side of the protocol, for one service.
struct Holder {
    site: Site,
    mnt: PathBuf,
    sock_path: PathBuf,
    log: PathBuf,
    got: Arc<Mutex<Received>>,
    stop: Arc<AtomicBool>,
    listener: Option<std::thread::JoinHandle<()>>,
    child: Option<Child>,
    extra: Vec<String>,
    /// The binary started (a copy, where a test upgrades it).
    exe: PathBuf,
    /// The variable that tells the daemon the store's size: systemd 254+ sets `FDSTORE`;
    /// the unit sets `SEALFS_FDSTORE` for older systemd.
    store_var: &'static str,
}

impl Holder {
    fn new(files: &[(&str, Vec<u8>)], extra: &[&str]) -> Self {
        let site = Site::new();
        site.seal_files(files);
        let mnt = site.path("mnt");
        std::fs::create_dir(&mnt).unwrap();
        let sock_path = site.path("notify.sock");
        let sock = std::os::unix::net::UnixDatagram::bind(&sock_path).unwrap();
        sock.set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        let got = Arc::new(Mutex::new(Received::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let (g, st) = (got.clone(), stop.clone());
        let listener = Some(std::thread::spawn(move || listen(sock, g, st)));
        let log = site.path("sealfs.log");
        Self {
            site,
            mnt,
            sock_path,
            log,
            got,
            stop,
            listener,
            child: None,
            extra: extra.iter().map(|s| s.to_string()).collect(),
            exe: bin(),
            store_var: "FDSTORE",
        }
    }

    /// Starts the daemon with whatever the store holds, and waits for its READY=1.
    fn start(&mut self) -> Duration {
        let t = Instant::now();
        let ready_before = self.got.lock().unwrap().ready;
        let (names, fds): (Vec<String>, Vec<RawFd>) = {
            let g = self.got.lock().unwrap();
            g.store
                .iter()
                .map(|(n, fd)| {
                    // Above any number the child's 3.. could collide with.
                    let high =
                        nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_DUPFD_CLOEXEC(100)).unwrap();
                    (n.clone(), high)
                })
                .unzip()
        };
        let mut c = Command::new("sh");
        // LISTEN_PID is the daemon's own: the shell's, which exec keeps.
        c.arg("-c")
            .arg(r#"LISTEN_PID=$$ exec "$0" "$@""#)
            .arg(&self.exe)
            .args(["mount", "--foreground", &self.site.p("store")])
            .arg(&self.mnt)
            .args(["--key", &self.site.key()])
            .args(&self.extra)
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("NOTIFY_SOCKET", &self.sock_path)
            .env(self.store_var, "8")
            .env("RUST_LOG", "sealfs=info,fuser=error");
        if !fds.is_empty() {
            c.env("LISTEN_FDS", fds.len().to_string())
                .env("LISTEN_FDNAMES", names.join(":"));
        }
        let fds_in_child = fds.clone();
        // SAFETY: dup2 is async-signal-safe; the numbers are ours until exec.
        unsafe {
            c.pre_exec(move || {
                for (i, fd) in fds_in_child.iter().enumerate() {
                    if libc::dup2(*fd, 3 + i as i32) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
        let logf = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        c.stdout(Stdio::null()).stderr(Stdio::from(logf));
        let child = c.spawn().expect("spawn sealfs mount");
        for fd in fds {
            drop(unsafe { OwnedFd::from_raw_fd(fd) });
        }
        self.child = Some(child);
        self.wait_ready(ready_before, t);
        t.elapsed()
    }

    /// Waits for a READY=1 after the `before`th.
    fn wait_ready(&mut self, before: usize, t: Instant) {
        while self.got.lock().unwrap().ready == before {
            if let Some(st) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("daemon exited ({st}) before READY=1:\n{}", self.logs());
            }
            assert!(
                t.elapsed() < Duration::from_secs(60),
                "not ready in 60 s:\n{}",
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// A planned upgrade: SIGHUP, then RELOADING=1 and READY=1 from the same process.
    fn reload(&mut self) -> Duration {
        let t = Instant::now();
        let (ready, reloading) = {
            let g = self.got.lock().unwrap();
            (g.ready, g.reloading)
        };
        let pid = self.child.as_ref().expect("running").id();
        unsafe { libc::kill(pid as i32, libc::SIGHUP) };
        self.wait_ready(ready, t);
        assert_eq!(
            self.got.lock().unwrap().reloading,
            reloading + 1,
            "{}",
            self.logs()
        );
        t.elapsed()
    }

    fn kill(&mut self, sig: i32) {
        let mut c = self.child.take().expect("running");
        unsafe { libc::kill(c.id() as i32, sig) };
        let _ = c.wait();
        self.drain();
    }

    /// Handles every message the dead daemon sent before a successor starts, as systemd
    /// does (its notify socket goes before SIGCHLD): a marker sent now is seen after them.
    fn drain(&self) {
        let before = self.got.lock().unwrap().marks;
        let s = std::os::unix::net::UnixDatagram::unbound().unwrap();
        s.send_to(b"SEALFS_TEST_MARK=1", &self.sock_path).unwrap();
        let t = Instant::now();
        while self.got.lock().unwrap().marks == before {
            assert!(
                t.elapsed() < Duration::from_secs(10),
                "the holder's socket is stuck"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn stored(&self) -> Vec<String> {
        self.got.lock().unwrap().store.keys().cloned().collect()
    }

    /// The holder lets go for good: its socket closed (a descriptor still in flight in it
    /// goes too), its store emptied.
    fn give_up(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(l) = self.listener.take() {
            let _ = l.join();
        }
        self.got.lock().unwrap().store.clear();
    }
}

/// Aborts the FUSE connection mounted at `mnt` (fusectl): whatever waits on it fails at
/// once. The last resort of a failed test, so that no reader is left waiting in the kernel.
fn abort_connection(mnt: &std::path::Path) {
    let Some(line) = mountinfo(mnt) else { return };
    let Some(minor) = line.split(' ').nth(2).and_then(|d| d.split(':').nth(1)) else {
        return;
    };
    let ctl = std::path::Path::new("/sys/fs/fuse/connections");
    let mounted_here = !ctl.join(minor).exists()
        && Command::new("mount")
            .args(["-t", "fusectl", "none"])
            .arg(ctl)
            .status()
            .is_ok_and(|s| s.success());
    let _ = std::fs::write(ctl.join(minor).join("abort"), "1");
    if mounted_here {
        // test.sh fails a run that leaves any FUSE-related mount behind.
        let _ = Command::new("umount").arg(ctl).status();
    }
}

impl Drop for Holder {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
            let t = Instant::now();
            while c.try_wait().ok().flatten().is_none() && t.elapsed() < Duration::from_secs(10) {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
        self.give_up();
        abort_connection(&self.mnt);
        if mountinfo(&self.mnt).is_some() {
            let _ = Command::new("fusermount3")
                .args(["-u", "-z"])
                .arg(&self.mnt)
                .status();
        }
    }
}

/// The holder's receive loop: `FDSTORE=1`/`FDSTOREREMOVE=1` with `FDNAME=`, and READY=1.
fn listen(
    sock: std::os::unix::net::UnixDatagram,
    got: Arc<Mutex<Received>>,
    stop: Arc<AtomicBool>,
) {
    let mut buf = [0u8; 4096];
    while !stop.load(Ordering::SeqCst) {
        let mut cmsg = nix::cmsg_space!([RawFd; 8]);
        let mut iov = [IoSliceMut::new(&mut buf)];
        let Ok(msg) = recvmsg::<UnixAddr>(
            sock.as_raw_fd(),
            &mut iov,
            Some(&mut cmsg),
            MsgFlags::MSG_CMSG_CLOEXEC,
        ) else {
            continue;
        };
        let mut fds = Vec::new();
        for c in msg.cmsgs().unwrap() {
            if let ControlMessageOwned::ScmRights(list) = c {
                fds.extend(list.into_iter().map(|r| unsafe { OwnedFd::from_raw_fd(r) }));
            }
        }
        let n = msg.bytes;
        let text = String::from_utf8_lossy(&buf[..n]).into_owned();
        let vars: BTreeMap<&str, &str> = text.lines().filter_map(|l| l.split_once('=')).collect();
        let mut g = got.lock().unwrap();
        if vars.get("SEALFS_TEST_MARK") == Some(&"1") {
            g.marks += 1;
        }
        if vars.get("RELOADING") == Some(&"1") {
            assert!(
                vars.contains_key("MONOTONIC_USEC"),
                "RELOADING=1 without MONOTONIC_USEC"
            );
            g.reloading += 1;
        }
        if vars.get("READY") == Some(&"1") {
            g.ready += 1;
        }
        let name = vars.get("FDNAME").copied().unwrap_or("stored").to_string();
        if vars.get("FDSTORE") == Some(&"1") {
            if let Some(fd) = fds.into_iter().next() {
                if name.starts_with("state") {
                    let mut bytes = Vec::new();
                    let dup = fd.try_clone().unwrap();
                    let mut f = std::fs::File::from(dup);
                    use std::io::{Read, Seek};
                    f.rewind().unwrap();
                    f.read_to_end(&mut bytes).unwrap();
                    g.states_seen.push(bytes);
                }
                g.store.insert(name, fd);
            }
        } else if vars.get("FDSTOREREMOVE") == Some(&"1") {
            g.store.remove(&name);
        }
    }
}

const FILE_LEN: usize = 6 << 20;

/// tests/python/restart_readers.py in a process of its own: a reader stuck in the kernel
/// must never hold the test's process (its descriptors would keep the connection up).
struct Readers {
    child: Child,
    stopfile: PathBuf,
}

#[derive(serde::Deserialize, Debug)]
struct ReadersReport {
    reads: u64,
    errors: u64,
    wrong: u64,
    /// Reads that returned fewer bytes than asked (all of them right).
    short: u64,
    longest_ms: f64,
    first_error: Option<String>,
}

impl Readers {
    fn start(h: &Holder, name: &str) -> Self {
        Self::start_mode(h, name, "all")
    }

    /// `mode` "nommap": pread readers only (a read that fails in a map is a SIGBUS).
    fn start_mode(h: &Holder, name: &str, mode: &str) -> Self {
        let stopfile = h.site.path("readers.stop");
        let _ = std::fs::remove_file(&stopfile);
        let script =
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/python/restart_readers.py");
        let child = Command::new("python3")
            .arg(script)
            .arg(h.mnt.join(name))
            .arg(h.site.path(&format!("src/{name}")))
            .arg(&stopfile)
            .arg(mode)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let started = h.site.path("readers.stop.started");
        let t = Instant::now();
        let mut me = Self { child, stopfile };
        while !started.exists() {
            if let Some(st) = me.child.try_wait().unwrap() {
                panic!("readers exited ({st}) before they started");
            }
            assert!(
                t.elapsed() < Duration::from_secs(30),
                "readers not started in 30 s"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = std::fs::remove_file(started);
        me
    }

    /// Stops the readers; their report, or a failure naming why they did not end.
    fn finish(mut self, h: &Holder) -> ReadersReport {
        std::fs::write(&self.stopfile, b"").unwrap();
        let t = Instant::now();
        while self.child.try_wait().unwrap().is_none() {
            assert!(
                t.elapsed() < Duration::from_secs(60),
                "readers still running 60 s after the stop:\n{}",
                h.logs()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        let status = self.child.wait().unwrap();
        let (mut out, mut err) = (Vec::new(), String::new());
        use std::io::Read;
        self.child
            .stdout
            .take()
            .unwrap()
            .read_to_end(&mut out)
            .unwrap();
        self.child
            .stderr
            .take()
            .unwrap()
            .read_to_string(&mut err)
            .unwrap();
        assert!(status.success(), "readers: {err}\n{}", h.logs());
        // A reader thread that died (its traceback) is a failure of the test, not a pass.
        assert!(err.trim().is_empty(), "readers: {err}");
        serde_json::from_slice(&out).unwrap()
    }
}

impl Drop for Readers {
    fn drop(&mut self) {
        let _ = std::fs::write(&self.stopfile, b"");
        // A failed test: never wait unbounded on a reader that may be stuck in the kernel.
        let _ = self.child.kill();
        let t = Instant::now();
        while self.child.try_wait().ok().flatten().is_none() && t.elapsed() < Duration::from_secs(5)
        {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// One restart test at a time (see the module's comment); a failed one does not stop the
/// others.
fn serial() -> std::sync::MutexGuard<'static, ()> {
    static ONE: Mutex<()> = Mutex::new(());
    ONE.lock().unwrap_or_else(|p| p.into_inner())
}

/// The readers came through unharmed (no error, wrong or short read, and enough reads to
/// mean it); prints the stall figures of `what` (signal to READY=1, sorted here).
fn assert_unharmed(r: &ReadersReport, h: &Holder, what: &str, stalls: &mut [Duration]) {
    assert_eq!(
        (r.errors, r.wrong, r.short),
        (0, 0, 0),
        "reader errors / wrong / short reads (first: {:?}): {r:?}\n{}",
        r.first_error,
        h.logs()
    );
    assert!(r.reads > 100, "{r:?}");
    stalls.sort();
    eprintln!(
        "{what}: {} of them, {} reads, 0 errors, 0 wrong; signal to READY median {:?} worst {:?}; longest read {:.0} ms",
        stalls.len(),
        r.reads,
        stalls[stalls.len() / 2],
        stalls[stalls.len() - 1],
        r.longest_ms
    );
}

/// `what` appears exactly `times` times in the daemon's log.
#[track_caller]
fn assert_logged(logs: &str, what: &str, times: usize) {
    assert_eq!(logs.matches(what).count(), times, "{what:?}:\n{logs}");
}

fn model() -> Vec<(&'static str, Vec<u8>)> {
    vec![
        ("model.safetensors", pattern(FILE_LEN, 23)),
        ("config.json", b"{\"layers\": 2}".to_vec()),
    ]
}

/// The stall a reader sees across each SIGKILL: every read completes with the right bytes.
#[test]
fn sigkill_under_load_pauses_readers_and_never_fails_them() {
    let _one = serial();
    let mut h = Holder::new(&model(), &["--cache-size", "8MiB"]);
    h.start();
    assert_eq!(h.stored(), ["fuse", "state-a"], "{}", h.logs());
    let readers = Readers::start(&h, "model.safetensors");
    std::thread::sleep(Duration::from_millis(500));
    let kills = std::env::var("SEALFS_RESTART_KILLS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20);
    let mut gaps = Vec::new();
    for _ in 0..kills {
        std::thread::sleep(Duration::from_millis(300));
        let t = Instant::now();
        h.kill(libc::SIGKILL);
        h.start();
        gaps.push(t.elapsed());
    }
    std::thread::sleep(Duration::from_millis(300));
    let r = readers.finish(&h);
    assert_unharmed(&r, &h, "restart (SIGKILL)", &mut gaps);
    let logs = h.logs();
    assert_logged(&logs, "connection taken over", kills);
    assert!(
        logs.contains("handle taken over from the predecessor"),
        "{logs}"
    );
}

/// SIGTERM is a stop: unmounted, the store emptied, and a start after it mounts afresh.
#[test]
fn sigterm_unmounts_and_leaves_nothing_to_resume() {
    let _one = serial();
    let mut h = Holder::new(&model(), &[]);
    h.start();
    let c = h.child.take().unwrap();
    unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
    let mut c = c;
    assert!(c.wait().unwrap().success());
    assert!(mountinfo(&h.mnt).is_none(), "still mounted:\n{}", h.logs());
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(h.stored(), Vec::<String>::new(), "the store was emptied");
    h.start();
    assert_eq!(
        std::fs::read(h.mnt.join("config.json")).unwrap(),
        b"{\"layers\": 2}"
    );
    assert!(!h.logs().contains("connection taken over"), "{}", h.logs());
}

/// What the holder was given holds no key, DEK or plaintext: the key file's bytes (raw and
/// hex) and slices of every file's plaintext are nowhere in any stored state.
#[test]
fn the_stored_state_holds_no_key_and_no_plaintext() {
    let _one = serial();
    let files = model();
    let mut h = Holder::new(&files, &[]);
    h.start();
    let _ = std::fs::read(h.mnt.join("model.safetensors")).unwrap();
    h.kill(libc::SIGKILL);
    h.start();
    let key = std::fs::read(h.site.path("k")).unwrap();
    let states = h.got.lock().unwrap().states_seen.clone();
    assert!(states.len() >= 2, "states stored: {}", states.len());
    let hay: Vec<u8> = states.concat();
    let contains = |needle: &[u8]| hay.windows(needle.len()).any(|w| w == needle);
    assert!(contains(b"model.safetensors"), "the state names the files");
    let key_text = String::from_utf8_lossy(&key).into_owned();
    for line in key_text.lines().filter(|l| l.len() >= 16) {
        assert!(!contains(line.as_bytes()), "a key line is in the state");
    }
    assert!(!contains(&key[..key.len().min(32)]));
    for (_, data) in &files {
        for at in [0, data.len() / 2] {
            let n = 16.min(data.len() - at);
            assert!(!contains(&data[at..at + n]), "plaintext in the state");
        }
    }
}

/// A planned upgrade: SIGHUP re-executes the binary at the path the daemon was started
/// from, in place (same PID), 20 times under load; the binary is replaced on disk halfway,
/// and the daemon runs the new file after the next reload.
#[test]
fn sighup_upgrade_in_place_pauses_readers_and_never_fails_them() {
    let _one = serial();
    let mut h = Holder::new(&model(), &["--cache-size", "8MiB"]);
    let exe = h.site.path("bin/sealfs");
    std::fs::create_dir_all(exe.parent().unwrap()).unwrap();
    std::fs::copy(bin(), &exe).unwrap();
    h.exe = exe.clone();
    h.start();
    let pid = h.child.as_ref().unwrap().id();
    let exe_link = || std::fs::read_link(format!("/proc/{pid}/exe")).unwrap();
    let readers = Readers::start(&h, "model.safetensors");
    std::thread::sleep(Duration::from_millis(500));
    let reloads = std::env::var("SEALFS_RESTART_KILLS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20);
    let mut stalls = Vec::new();
    for i in 0..reloads {
        std::thread::sleep(Duration::from_millis(300));
        if i == reloads / 2 {
            // The package manager's way: a new file renamed over the old path.
            let new = h.site.path("bin/sealfs.new");
            std::fs::copy(bin(), &new).unwrap();
            std::fs::rename(&new, &exe).unwrap();
            let before = exe_link();
            assert!(
                before.to_string_lossy().ends_with(" (deleted)"),
                "{before:?}"
            );
        }
        stalls.push(h.reload());
        assert!(
            h.child.as_mut().unwrap().try_wait().unwrap().is_none(),
            "the daemon exited:\n{}",
            h.logs()
        );
    }
    assert_eq!(exe_link(), exe, "the daemon runs the file now at its path");
    std::thread::sleep(Duration::from_millis(300));
    let r = readers.finish(&h);
    assert_unharmed(&r, &h, "upgrade (SIGHUP)", &mut stalls);
    let logs = h.logs();
    assert_logged(&logs, "SIGHUP: re-executing", reloads);
    assert_logged(&logs, "connection taken over", reloads);
    // Still the one mount, and a SIGTERM still unmounts it.
    let mut c = h.child.take().unwrap();
    unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
    assert!(c.wait().unwrap().success());
    assert!(mountinfo(&h.mnt).is_none(), "still mounted:\n{}", h.logs());
}

/// A holder that keeps the connection while no successor ever comes: the readers wait,
/// and fail (never hang) once the holder gives the descriptor up.
#[test]
fn readers_fail_once_the_holder_gives_up_and_none_hangs() {
    let _one = serial();
    let mut h = Holder::new(&model(), &[]);
    h.start();
    let readers = Readers::start_mode(&h, "model.safetensors", "nommap");
    std::thread::sleep(Duration::from_millis(300));
    h.kill(libc::SIGKILL);
    std::thread::sleep(Duration::from_secs(1));
    let t = Instant::now();
    h.give_up();
    let r = readers.finish(&h);
    let ended = t.elapsed();
    assert!(r.errors > 0, "no reader saw the connection end: {r:?}");
    assert_eq!(r.wrong, 0, "{r:?}");
    let first = r.first_error.clone().unwrap_or_default();
    // A short read is allowed here (the part read before the end); a wrong byte is not.
    // ECONNABORTED for a request the dead daemon held, ENOTCONN for any after it.
    assert!(
        first.contains("(103,") || first.contains("(107,"),
        "{first}"
    );
    assert!(
        ended < Duration::from_secs(10),
        "readers ended {ended:?} after the holder let go"
    );
}

/// A key taken away while the daemon was down (the model rewrapped to another key, the
/// configured key's slot gone): the successor refuses the handles it takes over, as any
/// open, and serves no byte.
#[test]
fn a_key_removed_while_down_is_refused_after_the_resume() {
    let _one = serial();
    let mut h = Holder::new(&model(), &[]);
    h.start();
    let readers = Readers::start_mode(&h, "model.safetensors", "nommap");
    std::thread::sleep(Duration::from_millis(300));
    h.kill(libc::SIGKILL);
    let k2 = h.site.p("k2");
    let o = sealfs(&["keygen", &k2], &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    let key = h.site.key();
    let store = h.site.p("store");
    let to = format!("file:{k2}");
    let o = sealfs(&["rewrap", "--key", &key, "--to-key", &to, &store], &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    h.start();
    std::thread::sleep(Duration::from_millis(500));
    let r = readers.finish(&h);
    assert!(r.errors > 0, "the readers were served: {r:?}\n{}", h.logs());
    assert_eq!(r.wrong, 0, "{r:?}");
    let first = r.first_error.clone().unwrap_or_default();
    assert!(first.contains("(13,"), "{first}\n{}", h.logs());
    let logs = h.logs();
    assert!(logs.contains("connection taken over"), "{logs}");
    assert!(
        !logs.contains("handle taken over from the predecessor"),
        "{logs}"
    );
    // A fresh open is refused too.
    let e = std::fs::read(h.mnt.join("model.safetensors")).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EACCES), "{e}");
}

/// A refresh that lands just before a SIGKILL: the state stored under the refresh's guard
/// already has the file the store lost, so the successor's own listing finds nothing to
/// remove, the file stays gone, and the readers' file is served on.
#[test]
fn a_refresh_that_lands_just_before_the_kill_is_in_the_stored_state() {
    let _one = serial();
    let mut h = Holder::new(&model(), &["--list-ttl", "1s"]);
    h.start();
    let readers = Readers::start(&h, "model.safetensors");
    std::thread::sleep(Duration::from_millis(300));
    // config.json leaves the store (its data and key objects): the next listing drops it.
    let store = h.site.path("store");
    for e in std::fs::read_dir(&store).unwrap().flatten() {
        if e.file_name().to_string_lossy().starts_with("config.json") {
            std::fs::remove_file(e.path()).unwrap();
        }
    }
    let t = Instant::now();
    // Killed as soon as the refresh is logged: its state was sent before, under its guard.
    while !h
        .logs()
        .lines()
        .any(|l| l.contains("listing refreshed") && l.contains("removed=1"))
    {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "no refresh after the removal:\n{}",
            h.logs()
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    h.kill(libc::SIGKILL);
    let before = h.logs().len();
    h.start();
    let after = h.logs()[before..].to_string();
    let line = after
        .lines()
        .find(|l| l.contains("tree taken over from the predecessor"))
        .unwrap_or_else(|| panic!("no take-over:\n{after}"));
    assert!(
        line.contains("added=0") && line.contains("removed=0") && line.contains("changed=0"),
        "the successor's listing found changes the state lacked: {line}"
    );
    let gone = std::fs::metadata(h.mnt.join("config.json"));
    assert_eq!(
        gone.map_err(|e| e.raw_os_error()).err(),
        Some(Some(libc::ENOENT))
    );
    let r = readers.finish(&h);
    assert_eq!(
        (r.errors, r.wrong, r.short),
        (0, 0, 0),
        "{r:?}\n{}",
        h.logs()
    );
}

/// systemd before 254 keeps a store without setting `$FDSTORE`: the unit's
/// `SEALFS_FDSTORE` turns the handover on there.
#[test]
fn the_units_opt_in_turns_the_store_on_without_fdstore() {
    let _one = serial();
    let mut h = Holder::new(&model(), &[]);
    h.store_var = "SEALFS_FDSTORE";
    h.start();
    assert_eq!(h.stored(), ["fuse", "state-a"], "{}", h.logs());
    h.kill(libc::SIGKILL);
    h.start();
    assert_eq!(
        std::fs::read(h.mnt.join("config.json")).unwrap(),
        b"{\"layers\": 2}"
    );
    assert!(h.logs().contains("connection taken over"), "{}", h.logs());
}

/// Waits until `pid` has one thread: the instant after an exec, before the new image starts
/// any (its handlers come later still).
fn wait_exec(pid: i32) {
    let t = Instant::now();
    let dir = format!("/proc/{pid}/task");
    while std::fs::read_dir(&dir).map_or(0, |d| d.count()) != 1 {
        assert!(t.elapsed() < Duration::from_secs(10), "no exec in 10 s");
    }
}

/// A SIGHUP or SIGTERM that lands while the new image starts (after the exec, before its
/// handlers exist) waits for its handlers: the default action of either would end it.
#[test]
fn a_signal_during_an_upgrade_waits_for_the_new_image() {
    let _one = serial();
    if !sealfs::fuse::handover::kernel_resends() {
        panic!("an upgrade in place needs Linux 6.9+; this kernel refuses it");
    }
    let mut h = Holder::new(&model(), &[]);
    h.start();
    let pid = h.child.as_ref().unwrap().id() as i32;
    let counts = |h: &Holder| {
        let g = h.got.lock().unwrap();
        (g.ready, g.reloading)
    };
    let (ready, reloading) = counts(&h);
    // A second SIGHUP: a second upgrade follows the first.
    unsafe { libc::kill(pid, libc::SIGHUP) };
    wait_exec(pid);
    unsafe { libc::kill(pid, libc::SIGHUP) };
    let t = Instant::now();
    while counts(&h) != (ready + 2, reloading + 2) {
        if let Some(st) = h.child.as_mut().unwrap().try_wait().unwrap() {
            panic!("the daemon ended ({st}):\n{}", h.logs());
        }
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "{:?}:\n{}",
            counts(&h),
            h.logs()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_logged(&h.logs(), "SIGHUP: re-executing", 2);
    assert_eq!(
        std::fs::read(h.mnt.join("config.json")).unwrap(),
        b"{\"layers\": 2}"
    );
    // A SIGTERM: the new image stops as any does (unmounts, exit 0).
    unsafe { libc::kill(pid, libc::SIGHUP) };
    wait_exec(pid);
    unsafe { libc::kill(pid, libc::SIGTERM) };
    let mut c = h.child.take().unwrap();
    let st = c.wait().unwrap();
    assert!(st.success(), "{st}:\n{}", h.logs());
    assert!(mountinfo(&h.mnt).is_none(), "still mounted:\n{}", h.logs());
    // A SIGTERM while the old image prepares the exec (after its RELOADING=1): no thread of
    // it takes the signal (the exec would lose it), the new image stops.
    h.start();
    let pid = h.child.as_ref().unwrap().id() as i32;
    let reloading = h.got.lock().unwrap().reloading;
    unsafe { libc::kill(pid, libc::SIGHUP) };
    // RELOADING=1 comes before the state is written and the exec: send it then.
    let t = Instant::now();
    while h.got.lock().unwrap().reloading == reloading {
        assert!(t.elapsed() < Duration::from_secs(10), "{}", h.logs());
    }
    unsafe { libc::kill(pid, libc::SIGTERM) };
    let mut c = h.child.take().unwrap();
    let t = Instant::now();
    let st = loop {
        if let Some(st) = c.try_wait().unwrap() {
            break st;
        }
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "the SIGTERM was lost:\n{}",
            h.logs()
        );
        std::thread::sleep(Duration::from_millis(10));
    };
    assert!(st.success(), "{st}:\n{}", h.logs());
    assert!(mountinfo(&h.mnt).is_none(), "still mounted:\n{}", h.logs());
}
