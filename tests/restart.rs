//! Issue 23: a daemon that crashes, restarts or stops, around a live mount. A holder that
//! speaks systemd's protocol (a `NOTIFY_SOCKET` that keeps `FDSTORE=1` descriptors, and
//! starts the next daemon with `LISTEN_FDS`/`LISTEN_FDNAMES`/`LISTEN_PID`) runs the real
//! binary; readers (`pread` at random offsets, sequential, and `mmap`) check every byte
//! against the plaintext while the daemon is killed under them.

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
            .arg(bin())
            .args(["mount", "--foreground", &self.site.p("store")])
            .arg(&self.mnt)
            .args(["--key", &self.site.key()])
            .args(&self.extra)
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("NOTIFY_SOCKET", &self.sock_path)
            .env("FDSTORE", "8")
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
        while self.got.lock().unwrap().ready == ready_before {
            if let Some(st) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("daemon exited ({st}) before READY=1:\n{}", self.logs());
            }
            assert!(
                t.elapsed() < Duration::from_secs(60),
                "not ready in 60 s:\n{}",
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        t.elapsed()
    }

    fn kill(&mut self, sig: i32) {
        let mut c = self.child.take().expect("running");
        unsafe { libc::kill(c.id() as i32, sig) };
        let _ = c.wait();
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
    longest_ms: f64,
    first_error: Option<String>,
}

impl Readers {
    fn start(h: &Holder, name: &str) -> Self {
        let stopfile = h.site.path("readers.stop");
        let _ = std::fs::remove_file(&stopfile);
        let script =
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/python/restart_readers.py");
        let child = Command::new("python3")
            .arg(script)
            .arg(h.mnt.join(name))
            .arg(h.site.path(&format!("src/{name}")))
            .arg(&stopfile)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        Self { child, stopfile }
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
        serde_json::from_slice(&out).unwrap()
    }
}

impl Drop for Readers {
    fn drop(&mut self) {
        let _ = std::fs::write(&self.stopfile, b"");
    }
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
    assert_eq!(
        (r.errors, r.wrong),
        (0, 0),
        "reader errors / wrong reads (first: {:?}): {r:?}\n{}",
        r.first_error,
        h.logs()
    );
    assert!(r.reads > 100, "{r:?}");
    gaps.sort();
    eprintln!(
        "restart: {kills} SIGKILLs, {} reads, 0 errors, 0 wrong; kill to READY median {:?} worst {:?}; longest read {:.0} ms",
        r.reads,
        gaps[gaps.len() / 2],
        gaps[gaps.len() - 1],
        r.longest_ms
    );
    let logs = h.logs();
    assert_eq!(
        logs.matches("connection taken over").count(),
        kills,
        "{logs}"
    );
    assert!(
        logs.contains("handle taken over from the predecessor"),
        "{logs}"
    );
}

/// SIGTERM is a stop: unmounted, the store emptied, and a start after it mounts afresh.
#[test]
fn sigterm_unmounts_and_leaves_nothing_to_resume() {
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
