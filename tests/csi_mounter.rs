//! `sealfs csi mounter` (issue 21, part 2), driven as the node plugin drives it: this test
//! mounts each target itself (`kernel_mount`, as root) and hands the connection over the
//! mounter's socket. The mounter runs with only CAP_IPC_LOCK in its bounding set, under
//! strace: neither it nor its children open /dev/fuse or call mount(2).

mod common;

use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use sealfs::csi::seqpacket;
use sealfs::csi::wire::Reply;
use sealfs::fuse::kernel_mount::{self, FuseMount};

/// Targets this test mounted; lazily unmounted on drop (also on failure).
struct Targets(Vec<PathBuf>);

impl Drop for Targets {
    fn drop(&mut self) {
        for t in &self.0 {
            let _ = kernel_mount::unmount(t);
        }
    }
}

struct Mounter {
    proc: Proc,
    socket: PathBuf,
    log: PathBuf,
    trace: PathBuf,
}

impl Mounter {
    fn start(dir: &Path) -> Self {
        Self::start_with(dir, &[])
    }

    fn start_with(dir: &Path, extra: &[&str]) -> Self {
        let socket = dir.join("mounter.sock");
        let log = dir.join("mounter.log");
        let trace = dir.join("mounter.strace");
        let child = Command::new("strace")
            .args(["-f", "-e", "trace=open,openat,mount,umount2", "-o"])
            .arg(&trace)
            .args([
                "setpriv",
                "--bounding-set",
                "-all,+ipc_lock",
                "--inh-caps",
                "-all",
                "--",
            ])
            .arg(bin())
            .args(["csi", "mounter", "--socket"])
            .arg(&socket)
            .args(extra)
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("RUST_LOG", "sealfs=info")
            .stdout(Stdio::null())
            .stderr(Stdio::from(std::fs::File::create(&log).unwrap()))
            .spawn()
            .expect("strace and setpriv are needed (scripts/install-test-deps.sh)");
        let mut m = Self {
            proc: Proc(child),
            socket,
            log,
            trace,
        };
        let start = Instant::now();
        while seqpacket::connect(&m.socket).is_err() {
            if let Some(st) = m.proc.0.try_wait().unwrap() {
                panic!("mounter exited ({st}): {}", m.logs());
            }
            assert!(start.elapsed() < Duration::from_secs(20), "{}", m.logs());
            std::thread::sleep(Duration::from_millis(50));
        }
        m
    }

    fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The sealfs mounter itself (strace's child): killing strace alone would leave it.
    fn sealfs_pid(&self) -> Option<i32> {
        children_of(self.proc.0.id())
            .into_iter()
            .find(|p| {
                std::fs::read_to_string(format!("/proc/{p}/comm"))
                    .is_ok_and(|c| c.trim() == "sealfs")
            })
            .map(|p| p as i32)
    }

    fn ask(&self, req: serde_json::Value, fds: &[&OwnedFd]) -> Reply {
        let c = seqpacket::connect(&self.socket).unwrap();
        let raw: Vec<i32> = fds.iter().map(|f| f.as_raw_fd()).collect();
        seqpacket::send(&c, req.to_string().as_bytes(), &raw).unwrap();
        let (b, _) = seqpacket::recv(&c).unwrap();
        serde_json::from_slice(&b).unwrap_or_else(|e| panic!("{e}: {b:?}"))
    }
}

impl Drop for Mounter {
    fn drop(&mut self) {
        if let Some(pid) = self.sealfs_pid() {
            // SAFETY: signalling the mounter this test started; its children end with it.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
}

fn publish_req(target: &Path, store: &str, key: &str) -> serde_json::Value {
    serde_json::json!({"op": "publish", "target": target, "uri": store,
        "args": [format!("--key={key}"), "--allow-other"]})
}

/// The node plugin's half at `t`: /dev/fuse opened and mounted there.
fn mount_at(site: &Site, t: &Path) -> OwnedFd {
    kernel_mount::mount(
        t,
        &FuseMount {
            source: site.p("store"),
            allow_other: true,
        },
    )
    .expect("mount /dev/fuse (the suite runs as root)")
}

fn mount_target(site: &Site, name: &str) -> (PathBuf, OwnedFd) {
    let t = site.path(name);
    std::fs::create_dir(&t).unwrap();
    let fd = mount_at(site, &t);
    (t, fd)
}

fn errno_of(p: &Path) -> Option<i32> {
    std::fs::read_dir(p).err().and_then(|e| e.raw_os_error())
}

/// How many /dev/fuse descriptors `pid` holds.
fn fuse_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| {
            d.filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
                .filter(|l| l == Path::new("/dev/fuse"))
                .count()
        })
        .unwrap_or(0)
}

/// The mounter's child that serves `target` (its argv ends with it).
fn child_serving(mounter: i32, target: &Path) -> Option<u32> {
    children_of(mounter as u32).into_iter().find(|p| {
        std::fs::read(format!("/proc/{p}/cmdline")).is_ok_and(|c| {
            c.split(|&b| b == 0)
                .rfind(|a| !a.is_empty())
                .is_some_and(|a| a == target.as_os_str().as_encoded_bytes())
        })
    })
}

/// The processes whose parent is `pid`.
fn children_of(pid: u32) -> Vec<u32> {
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|p| {
            std::fs::read_to_string(format!("/proc/{p}/status"))
                .is_ok_and(|s| s.contains(&format!("PPid:\t{pid}\n")))
        })
        .collect()
}

fn wait_log(m: &Mounter, what: &str, secs: u64) {
    let start = Instant::now();
    while !m.logs().contains(what) {
        assert!(
            start.elapsed() < Duration::from_secs(secs),
            "no {what:?} in {secs} s: {}",
            m.logs()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Reads a file whole again and again, its page cache dropped before each read so that
/// every read reaches the daemon; counts the reads and keeps every error or wrong read.
struct Reader {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: std::thread::JoinHandle<(usize, Duration, Vec<String>)>,
}

impl Reader {
    fn start(path: PathBuf, want: Vec<u8>) -> Self {
        use std::sync::atomic::Ordering;
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let s = stop.clone();
        let thread = std::thread::spawn(move || {
            let (mut reads, mut longest, mut errors) = (0, Duration::ZERO, Vec::new());
            while !s.load(Ordering::SeqCst) {
                let t = Instant::now();
                let read = std::fs::File::open(&path).and_then(|mut f| {
                    // SAFETY: advice on a descriptor this closure owns.
                    unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
                    let mut b = Vec::new();
                    std::io::Read::read_to_end(&mut f, &mut b).map(|_| b)
                });
                longest = longest.max(t.elapsed());
                match read {
                    Ok(b) if b == want => reads += 1,
                    Ok(b) => errors.push(format!("wrong bytes ({} read)", b.len())),
                    Err(e) => errors.push(e.to_string()),
                }
            }
            (reads, longest, errors)
        });
        Self { stop, thread }
    }

    fn stop(self) -> (usize, Duration, Vec<String>) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        self.thread.join().unwrap()
    }
}

#[test]
fn the_mounter_serves_each_volume_with_its_own_child_and_survives_one_dying() {
    let site = Site::new();
    let files = [("a.bin", pattern(100_000, 5)), ("b.txt", b"hi\n".to_vec())];
    site.seal_files(&files);
    let m = Mounter::start(site.dir.path());
    let mut targets = Targets(vec![]);
    assert_eq!(
        m.ask(serde_json::json!({"op": "ping"}), &[]),
        Reply::ok(None)
    );

    // Two pods, the same volume: two children.
    let started = Instant::now();
    let (t1, fd1) = mount_target(&site, "pod1");
    targets.0.push(t1.clone());
    let r1 = m.ask(publish_req(&t1, &site.p("store"), &site.key()), &[&fd1]);
    assert!(r1.ok, "{r1:?}: {}", m.logs());
    drop(fd1);
    let mut first = [0u8; 1];
    std::io::Read::read_exact(
        &mut std::fs::File::open(t1.join("a.bin")).unwrap(),
        &mut first,
    )
    .unwrap();
    // For docs/PERFORMANCE.md: mount(2) + publish to the mounter + first byte read.
    eprintln!(
        "csi publish to first byte (local store): {:?}",
        started.elapsed()
    );
    let (t2, fd2) = mount_target(&site, "pod2");
    targets.0.push(t2.clone());
    let r2 = m.ask(publish_req(&t2, &site.p("store"), &site.key()), &[&fd2]);
    assert!(r2.ok, "{r2:?}");
    drop(fd2);
    assert_ne!(r1.pid, r2.pid, "one child per volume");
    // The child's argv ends `-- URI TARGET`, and it holds no descriptor but 0-2 and its
    // connection (3): nothing of the mounter's or of another volume.
    let pid = r1.pid.unwrap();
    let argv: Vec<String> = std::fs::read(format!("/proc/{pid}/cmdline"))
        .unwrap()
        .split(|&b| b == 0)
        .filter(|a| !a.is_empty())
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect();
    let n = argv.len();
    assert_eq!(
        argv[n - 3..],
        ["--".to_string(), site.p("store"), t1.display().to_string()],
        "{argv:?}"
    );
    let mut fds: Vec<u32> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    fds.sort();
    // (The child's own runtime adds descriptors above 3: epoll, eventfd, sockets, the
    // control socket; none may be a FUSE connection other than 3.)
    for fd in fds.iter().filter(|&&f| f > 3) {
        let link = std::fs::read_link(format!("/proc/{pid}/fd/{fd}")).unwrap_or_default();
        assert_ne!(
            link,
            Path::new("/dev/fuse"),
            "fd {fd} is another FUSE connection"
        );
    }
    assert_eq!(
        std::fs::read_link(format!("/proc/{pid}/fd/3")).unwrap(),
        Path::new("/dev/fuse")
    );
    for t in [&t1, &t2] {
        for (n, d) in &files {
            assert_eq!(&std::fs::read(t.join(n)).unwrap(), d, "{n}");
        }
    }

    // A refused start: the child's one line and exit code come back; nothing serves.
    let (t3, fd3) = mount_target(&site, "pod3");
    targets.0.push(t3.clone());
    let r3 = m.ask(
        publish_req(
            &t3,
            &site.p("store"),
            &format!("file:{}", site.p("missing")),
        ),
        &[&fd3],
    );
    drop(fd3);
    assert!(!r3.ok, "{r3:?}");
    assert_eq!(r3.code, Some(1), "{r3:?}");
    assert!(
        r3.error.as_deref().unwrap_or("").contains("missing"),
        "{r3:?}"
    );
    assert_eq!(errno_of(&t3), Some(libc::ENOTCONN), "nothing serves pod3");

    // Requests the mounter refuses: its own options, an environment outside the list, a
    // publish without its connection.
    let (t4, fd4) = mount_target(&site, "pod4");
    targets.0.push(t4.clone());
    let mut bad = publish_req(&t4, &site.p("store"), &site.key());
    for args in [
        serde_json::json!(["--fuse-fd=7"]),
        serde_json::json!(["-olog_file=/tmp/x.log,allow_root"]),
        serde_json::json!(["--metrics-addr=0.0.0.0:9464"]),
    ] {
        bad["args"] = args;
        let r = m.ask(bad.clone(), &[&fd4]);
        assert_eq!((r.ok, r.code), (false, Some(2)), "{r:?}");
    }
    let mut bad = publish_req(&t4, "-olog_file=/tmp/x.log", &site.key());
    let r = m.ask(bad.clone(), &[&fd4]);
    assert!(r.error.unwrap().contains("uri must be"));
    bad = publish_req(&t4, &site.p("store"), &site.key());
    bad["env"] = serde_json::json!({"AWS_ENDPOINT_URL": "http://127.0.0.1:9"});
    let r = m.ask(bad, &[&fd4]);
    assert!(r.error.unwrap().contains("AWS_ENDPOINT_URL"));
    let mut bad = publish_req(&t4, &site.p("store"), &site.key());
    bad["env"] = serde_json::json!({"LD_PRELOAD": "/tmp/x.so"});
    let r = m.ask(bad, &[&fd4]);
    assert!(r.error.unwrap().contains("LD_PRELOAD"));
    let r = m.ask(publish_req(&t4, &site.p("store"), &site.key()), &[]);
    assert!(r.error.unwrap().contains("descriptor"));
    drop(fd4);

    // The mounter holds each published volume's connection: one /dev/fuse copy each.
    let mounter = m.sealfs_pid().expect("the mounter process");
    assert_eq!(fuse_fds(mounter as u32), 2, "pod1 and pod2 held");

    // A child killed (SIGKILL) under a reader whose reads reach the daemon, five times: each
    // time a successor takes the connection over; the reader pauses, never fails, never
    // reads a wrong byte. The other pod reads on.
    let reader = Reader::start(t1.join("a.bin"), files[0].1.clone());
    let mut victim = r1.pid.unwrap();
    let mut stalls = Vec::new();
    for i in 1..=5 {
        std::thread::sleep(Duration::from_millis(200));
        // SAFETY: signalling a child of the mounter this test started.
        unsafe { libc::kill(victim as i32, libc::SIGKILL) };
        let killed = Instant::now();
        assert_eq!(std::fs::read(t2.join("b.txt")).unwrap(), b"hi\n");
        let start = Instant::now();
        while m.logs().matches("successor serves the connection").count() < i {
            assert!(start.elapsed() < Duration::from_secs(20), "{}", m.logs());
            std::thread::sleep(Duration::from_millis(1));
        }
        stalls.push(killed.elapsed());
        let successor = child_serving(mounter, &t1).expect("a successor serves pod1");
        assert_ne!(successor, victim);
        assert_eq!(
            std::fs::read_link(format!("/proc/{successor}/fd/3")).unwrap(),
            Path::new("/dev/fuse")
        );
        victim = successor;
    }
    std::thread::sleep(Duration::from_millis(300));
    let (reads, longest, errors) = reader.stop();
    assert!(errors.is_empty(), "{errors:?}: {}", m.logs());
    assert!(reads > 5, "{reads} reads");
    stalls.sort();
    // For docs/PERFORMANCE.md: kill to the mounter's log line (it polls every 100 ms).
    eprintln!(
        "csi child SIGKILL x5: {reads} reads, 0 errors; kill to successor serving median {:?} worst {:?}; longest read {longest:?}",
        stalls[2], stalls[4]
    );
    assert!(
        m.logs()
            .contains("connection taken over; interrupted requests sent again"),
        "{}",
        m.logs()
    );
    // A sixth crash within 10 minutes is a crash loop: not followed, the connection let go.
    // SAFETY: as above.
    unsafe { libc::kill(victim as i32, libc::SIGKILL) };
    wait_log(&m, "not followed: a crash loop", 10);
    let start = Instant::now();
    while errno_of(&t1) != Some(libc::ENOTCONN) {
        assert!(start.elapsed() < Duration::from_secs(5), "{}", m.logs());
        std::thread::sleep(Duration::from_millis(50));
    }
    // The next publish (kubelet's, after the node plugin remounts) replaces it.
    kernel_mount::unmount(&t1).unwrap();
    let fd1 = mount_at(&site, &t1);
    let r = m.ask(publish_req(&t1, &site.p("store"), &site.key()), &[&fd1]);
    drop(fd1);
    assert!(r.ok, "{r:?}");
    assert_eq!(std::fs::read(t1.join("b.txt")).unwrap(), b"hi\n");

    // Unpublish ends that child only, and the mounter's copy of its connection.
    let r = m.ask(serde_json::json!({"op": "unpublish", "target": t2}), &[]);
    assert!(r.ok);
    assert_eq!(errno_of(&t2), Some(libc::ENOTCONN));
    assert_eq!(fuse_fds(mounter as u32), 1, "only pod1 held");
    assert_eq!(std::fs::read(t1.join("b.txt")).unwrap(), b"hi\n");

    // The socket is the node plugin's alone (0600): another user cannot even connect.
    let other = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "python3", "-c"])
        .arg("import socket,sys; s=socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET); s.connect(sys.argv[1])")
        .arg(&m.socket)
        .output()
        .unwrap();
    assert!(!other.status.success());
    assert!(String::from_utf8_lossy(&other.stderr).contains("Permission denied"));

    // The mounter ends (SIGTERM) and its children with it.
    let sealfs_pid = m
        .sealfs_pid()
        .expect("the mounter process (strace's child)");
    // SAFETY: signalling the mounter this test started.
    unsafe { libc::kill(sealfs_pid, libc::SIGTERM) };
    let mut m = m;
    let st = m.proc.0.wait().unwrap();
    assert_eq!(st.code(), Some(0), "{}", m.logs());
    let start = Instant::now();
    while errno_of(&t1) != Some(libc::ENOTCONN) {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "child outlived the mounter"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // The children were traced: they open the site's key file.
    assert_no_fuse_open_or_mount(&m.trace, &site.p("k"));
    drop(targets);
}

/// A volume's key file travels as a sealed memfd in the publish message: the child opens
/// under it (`--key secret:keyFile`), and the key is nowhere in argv, environ or the logs.
#[test]
fn a_key_file_secret_reaches_only_its_child_as_a_sealed_memfd() {
    use sealfs::csi::secrets::{seal, Secrets};
    let site = Site::new();
    site.seal_files(&[("m.bin", pattern(50_000, 9))]);
    let key_text = std::fs::read_to_string(site.path("k")).unwrap();
    let key_hex = key_text
        .trim()
        .trim_start_matches("sealfs-kek-v1:")
        .to_string();
    // The key file is gone from disk: only the secret has it now.
    std::fs::remove_file(site.path("k")).unwrap();
    let m = Mounter::start(site.dir.path());
    let mut targets = Targets(vec![]);
    let (t, fd) = mount_target(&site, "pod");
    targets.0.push(t.clone());
    let secrets = seal(&Secrets {
        key_file: Some(zeroize::Zeroizing::new(key_text.clone())),
        ..Default::default()
    })
    .unwrap();
    let mut req = publish_req(&t, &site.p("store"), "secret:keyFile");
    req["secrets"] = true.into();
    let r = m.ask(req, &[&fd, &secrets]);
    drop((fd, secrets));
    assert!(r.ok, "{r:?}: {}", m.logs());
    assert_eq!(std::fs::read(t.join("m.bin")).unwrap(), pattern(50_000, 9));
    let pid = r.pid.unwrap();
    for f in ["cmdline", "environ"] {
        let b = std::fs::read(format!("/proc/{pid}/{f}")).unwrap();
        assert!(!String::from_utf8_lossy(&b).contains(&key_hex), "{f}");
    }
    assert!(!m.logs().contains(&key_hex));
    // A crashed child's successor opens under the secret the mounter held for it.
    // SAFETY: signalling a child of the mounter this test started.
    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    wait_log(&m, "successor serves the connection", 20);
    let mounter = m.sealfs_pid().expect("the mounter process");
    let successor = child_serving(mounter, &t).expect("a successor");
    assert_ne!(successor, pid);
    assert_eq!(std::fs::read(t.join("m.bin")).unwrap(), pattern(50_000, 9));
    assert!(!m.logs().contains(&key_hex));
    // Without its secret, `secret:keyFile` is one line, exit 1.
    let (t2, fd2) = mount_target(&site, "pod2");
    targets.0.push(t2.clone());
    let r = m.ask(
        publish_req(&t2, &site.p("store"), "secret:keyFile"),
        &[&fd2],
    );
    drop(fd2);
    assert!(!r.ok);
    assert!(
        r.error
            .as_deref()
            .unwrap_or("")
            .contains("no keyFile secret was given"),
        "{r:?}"
    );
    // An unsealed memfd is refused by the child before anything else.
    let (t3, fd3) = mount_target(&site, "pod3");
    targets.0.push(t3.clone());
    let raw = nix::sys::memfd::memfd_create(
        "x",
        nix::sys::memfd::MFdFlags::MFD_CLOEXEC | nix::sys::memfd::MFdFlags::MFD_ALLOW_SEALING,
    )
    .unwrap();
    std::io::Write::write_all(&mut std::fs::File::from(raw.try_clone().unwrap()), b"{}").unwrap();
    let mut req = publish_req(&t3, &site.p("store"), "secret:keyFile");
    req["secrets"] = true.into();
    let r = m.ask(req, &[&fd3, &raw]);
    assert_eq!(r.code, Some(2), "{r:?}");
    assert!(r.error.unwrap().contains("not a sealed memfd"));
    drop(targets);
}

/// A successor that cannot start (its key file is gone): the mounter retries until
/// `--resume-timeout`, then lets the connection go. A reader that was waiting gets an
/// error then, not a hang.
#[test]
fn a_crashed_childs_readers_get_errors_once_the_mounter_gives_up() {
    let site = Site::new();
    let data = pattern(300_000, 3);
    site.seal_files(&[("a.bin", data.clone())]);
    let m = Mounter::start_with(site.dir.path(), &["--resume-timeout", "3"]);
    let mut targets = Targets(vec![]);
    let (t, fd) = mount_target(&site, "pod");
    targets.0.push(t.clone());
    let r = m.ask(publish_req(&t, &site.p("store"), &site.key()), &[&fd]);
    drop(fd);
    assert!(r.ok, "{r:?}: {}", m.logs());
    assert_eq!(std::fs::read(t.join("a.bin")).unwrap(), data);
    let key = std::fs::read(site.path("k")).unwrap();
    std::fs::remove_file(site.path("k")).unwrap();
    let reader = Reader::start(t.join("a.bin"), data.clone());
    std::thread::sleep(Duration::from_millis(200));
    let killed = Instant::now();
    // SAFETY: signalling a child of the mounter this test started.
    unsafe { libc::kill(r.pid.unwrap() as i32, libc::SIGKILL) };
    wait_log(&m, "the successor did not start", 20);
    wait_log(&m, "no successor within --resume-timeout", 20);
    let start = Instant::now();
    while errno_of(&t) != Some(libc::ENOTCONN) {
        assert!(start.elapsed() < Duration::from_secs(5), "{}", m.logs());
        std::thread::sleep(Duration::from_millis(50));
    }
    let (reads, _, errors) = reader.stop();
    let waited = killed.elapsed();
    assert!(reads >= 1, "{reads}");
    assert!(!errors.is_empty(), "the reader saw the connection go");
    assert!(errors.iter().all(|e| !e.starts_with("wrong")), "{errors:?}");
    // Given up after about 3 s, not 30 and not at once.
    assert!(
        waited > Duration::from_secs(2) && waited < Duration::from_secs(15),
        "{waited:?}"
    );
    let mounter = m.sealfs_pid().expect("the mounter process");
    assert_eq!(fuse_fds(mounter as u32), 0, "nothing held");

    // An unpublish while successors are being tried cancels them at once: nothing stays
    // held, and no successor serves a target that is gone.
    let restore = || {
        std::fs::write(site.path("k"), &key).unwrap();
        std::fs::set_permissions(
            site.path("k"),
            std::os::unix::fs::PermissionsExt::from_mode(0o600),
        )
        .unwrap();
    };
    restore();
    kernel_mount::unmount(&t).unwrap();
    let fd = mount_at(&site, &t);
    let r = m.ask(publish_req(&t, &site.p("store"), &site.key()), &[&fd]);
    drop(fd);
    assert!(r.ok, "{r:?}: {}", m.logs());
    assert_eq!(std::fs::read(t.join("a.bin")).unwrap(), data);
    std::fs::remove_file(site.path("k")).unwrap();
    let failed_before = m.logs().matches("the successor did not start").count();
    // SAFETY: signalling a child of the mounter this test started.
    unsafe { libc::kill(r.pid.unwrap() as i32, libc::SIGKILL) };
    let start = Instant::now();
    while m.logs().matches("the successor did not start").count() == failed_before {
        assert!(start.elapsed() < Duration::from_secs(10), "{}", m.logs());
        std::thread::sleep(Duration::from_millis(20));
    }
    let unpublished = Instant::now();
    let r = m.ask(serde_json::json!({"op": "unpublish", "target": t}), &[]);
    assert!(r.ok);
    while fuse_fds(mounter as u32) != 0 {
        assert!(
            unpublished.elapsed() < Duration::from_secs(2),
            "the cancelled resume still holds the connection: {}",
            m.logs()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    restore();
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(
        child_serving(mounter, &t),
        None,
        "a successor for an unpublished target"
    );
    assert_eq!(
        m.logs()
            .matches("no successor within --resume-timeout")
            .count(),
        1,
        "the second resume was cancelled, not timed out: {}",
        m.logs()
    );
    drop(targets);
}

/// `--cache-dir` on the mounter: every volume's child keeps its sealed chunks in the one
/// node-wide directory (ciphertext only); a second pod of the same model reads them from
/// there. A directory others may write stops the mounter at start, in one line.
#[test]
fn a_node_wide_cache_directory_serves_every_volume() {
    let site = Site::new();
    let data = pattern(3 << 20, 11);
    site.seal_files(&[("w.bin", data.clone())]);
    let cache = site.path("node-cache");
    std::fs::create_dir(&cache).unwrap();
    std::fs::set_permissions(&cache, std::os::unix::fs::PermissionsExt::from_mode(0o777)).unwrap();
    let out = Command::new(bin())
        .args(["csi", "mounter", "--socket"])
        .arg(site.path("bad.sock"))
        .arg("--cache-dir")
        .arg(&cache)
        .args(["--cache-dir-size", "64MiB"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.starts_with("sealfs: error: ") && err.lines().count() == 1,
        "{err}"
    );
    assert!(err.contains("node-cache"), "{err}");
    std::fs::set_permissions(&cache, std::os::unix::fs::PermissionsExt::from_mode(0o700)).unwrap();

    let cache_arg = cache.display().to_string();
    let m = Mounter::start_with(
        site.dir.path(),
        &["--cache-dir", &cache_arg, "--cache-dir-size", "64MiB"],
    );
    let mut targets = Targets(vec![]);
    let (t1, fd1) = mount_target(&site, "pod1");
    targets.0.push(t1.clone());
    let r1 = m.ask(publish_req(&t1, &site.p("store"), &site.key()), &[&fd1]);
    drop(fd1);
    assert!(r1.ok, "{r1:?}: {}", m.logs());
    let argv = std::fs::read(format!("/proc/{}/cmdline", r1.pid.unwrap())).unwrap();
    assert!(
        String::from_utf8_lossy(&argv).contains(&format!("--cache-dir\0{cache_arg}\0")),
        "the child runs with the node's cache dir"
    );
    assert_eq!(std::fs::read(t1.join("w.bin")).unwrap(), data);
    // Written behind the reads: every chunk but chunk 0 (always from the store).
    let entries = || {
        walk(&cache.join("v1"))
            .into_iter()
            .filter(|p| !p.file_name().unwrap().to_string_lossy().starts_with('.'))
            .collect::<Vec<_>>()
    };
    let start = Instant::now();
    while entries().len() < 2 {
        assert!(start.elapsed() < Duration::from_secs(10), "{:?}", entries());
        std::thread::sleep(Duration::from_millis(50));
    }
    // Ciphertext only.
    for e in entries() {
        let bytes = std::fs::read(&e).unwrap();
        for at in (0..data.len() - 32).step_by(data.len() / 8) {
            let needle = &data[at..at + 32];
            assert!(
                !bytes.windows(32).any(|w| w == needle),
                "plaintext in {e:?}"
            );
        }
    }
    // A second pod of the same model, its own child: served, with the cache's entries.
    let before = entries().len();
    let (t2, fd2) = mount_target(&site, "pod2");
    targets.0.push(t2.clone());
    let r2 = m.ask(publish_req(&t2, &site.p("store"), &site.key()), &[&fd2]);
    drop(fd2);
    assert!(r2.ok, "{r2:?}");
    assert_eq!(std::fs::read(t2.join("w.bin")).unwrap(), data);
    assert_eq!(entries().len(), before, "the same chunks, stored once");
    drop(targets);
}

fn walk(d: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(d).into_iter().flatten().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}
