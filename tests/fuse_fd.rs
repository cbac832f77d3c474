//! `sealfs mount --fuse-fd N` (issue 21, part 1): a connection this test opens and mounts
//! (as the CSI node plugin will, with `sealfs::fuse::kernel_mount`), served by a child that
//! holds only CAP_IPC_LOCK and, under strace, never opens /dev/fuse nor calls mount(2).

mod common;

use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use sealfs::fuse::kernel_mount::{self, FuseMount};

/// A target mounted by this test; lazily unmounted when dropped (also on failure).
struct Target(PathBuf);

impl Drop for Target {
    fn drop(&mut self) {
        let _ = kernel_mount::unmount(&self.0);
    }
}

fn model(site: &Site) -> Vec<(&'static str, Vec<u8>)> {
    let files = vec![
        ("a.bin", pattern(200_000, 3)),
        ("sub/b.txt", b"hello\n".to_vec()),
    ];
    site.seal_files(&files);
    files
}

/// Spawns `prefix… sealfs mount --foreground --fuse-fd 3 …` with `fd` as its fd 3 and waits
/// for READY=1; returns the child (killed on drop) or its log on failure.
fn serve(prefix: &[&str], fd: &OwnedFd, args: &[&str], dir: &Path) -> Result<Proc, String> {
    let sock_path = dir.join("notify.sock");
    let _ = std::fs::remove_file(&sock_path);
    let sock = std::os::unix::net::UnixDatagram::bind(&sock_path).unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let log = dir.join("serve.log");
    let mut c = Command::new(prefix.first().copied().unwrap_or(bin().to_str().unwrap()));
    if !prefix.is_empty() {
        c.args(&prefix[1..]).arg(bin());
    }
    c.args(["mount", "--foreground", "--fuse-fd", "3"])
        .args(args)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("NOTIFY_SOCKET", &sock_path)
        .env("RUST_LOG", "sealfs=info")
        .stdout(Stdio::null())
        .stderr(Stdio::from(std::fs::File::create(&log).unwrap()));
    // Out of the way of 3 first (dup2 onto itself would keep close-on-exec).
    let high = nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_DUPFD_CLOEXEC(64)).unwrap();
    // SAFETY: fcntl returned a new descriptor that nothing else owns.
    let high = unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(high) };
    let raw = high.as_raw_fd();
    // SAFETY: between fork and exec only async-signal-safe calls: dup2 onto fd 3 (which
    // clears close-on-exec on the copy).
    unsafe {
        c.pre_exec(move || {
            if libc::dup2(raw, 3) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = Proc(c.spawn().expect("spawn sealfs"));
    let start = Instant::now();
    let mut buf = [0u8; 256];
    loop {
        if let Ok(n) = sock.recv(&mut buf) {
            if String::from_utf8_lossy(&buf[..n]).contains("READY=1") {
                return Ok(child);
            }
        }
        if let Some(st) = child.0.try_wait().unwrap() {
            return Err(format!(
                "exited ({st}): {}",
                std::fs::read_to_string(&log).unwrap_or_default()
            ));
        }
        if start.elapsed() > Duration::from_secs(30) {
            return Err(format!(
                "not ready in 30 s: {}",
                std::fs::read_to_string(&log).unwrap_or_default()
            ));
        }
    }
}

#[test]
fn a_passed_connection_is_served_with_only_cap_ipc_lock_and_no_dev_fuse_or_mount() {
    assert!(Path::new("/dev/fuse").exists(), "/dev/fuse missing");
    let site = Site::new();
    let files = model(&site);
    let target = site.path("target");
    std::fs::create_dir(&target).unwrap();
    let fd = kernel_mount::mount(
        &target,
        &FuseMount {
            source: site.p("store"),
            allow_other: true,
        },
    )
    .expect("mount /dev/fuse (the suite runs as root)");
    let t = Target(target.clone());
    let trace = site.path("strace.log");
    let trace_s = trace.to_str().unwrap().to_string();
    let label = "csi-volume-label";
    let child = serve(
        &[
            "strace",
            "-f",
            "-e",
            "trace=open,openat,mount,umount2",
            "-o",
            &trace_s,
            "setpriv",
            "--bounding-set",
            "-all,+ipc_lock",
            "--inh-caps",
            "-all",
            "--",
        ],
        &fd,
        &[
            &site.p("store"),
            label,
            "--key",
            &site.key(),
            "--allow-other",
        ],
        site.dir.path(),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    // The mounter keeps no copy once the child has it.
    drop(fd);
    for (n, d) in &files {
        assert_eq!(&std::fs::read(target.join(n)).unwrap(), d, "{n}");
    }
    let mi = mountinfo(&target).expect("mounted");
    assert!(mi.contains("fuse.sealfs"), "{mi}");
    // Capabilities as the kernel sees them: no CAP_SYS_ADMIN (bit 21) anywhere in the
    // serving process (strace's child is setpriv's exec: the sealfs process itself).
    let pid = std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .find(|p| {
            std::fs::read(format!("/proc/{p}/cmdline"))
                .is_ok_and(|c| String::from_utf8_lossy(&c).contains(label))
                && std::fs::read_to_string(format!("/proc/{p}/comm"))
                    .is_ok_and(|c| c.trim() == "sealfs")
        })
        .expect("the serving process");
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let bnd = status
        .lines()
        .find_map(|l| l.strip_prefix("CapBnd:"))
        .unwrap()
        .trim()
        .to_string();
    let bnd = u64::from_str_radix(&bnd, 16).unwrap();
    assert_eq!(bnd, 1 << 14, "only CAP_IPC_LOCK (bit 14): {bnd:x}");
    // SIGTERM ends it with exit 0 (strace exits with its tracee's status); the mount stays
    // (it is the mounter's), dead: ENOTCONN.
    let mut child = child;
    // SAFETY: signalling the sealfs process this test started.
    unsafe { libc::kill(pid as i32, libc::SIGTERM) };
    let st = child.0.wait().unwrap();
    assert_eq!(st.code(), Some(0), "{st}");
    let e = std::fs::read_dir(&target).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::ENOTCONN), "{e}");
    drop(t);
    assert!(mountinfo(&target).is_none(), "unmounted by the mounter");
    // The trace covers the serving process: it shows sealfs opening its key file.
    assert_no_fuse_open_or_mount(&trace, &site.p("k"));
}

#[test]
fn a_fuse_fd_that_is_not_a_fuse_connection_is_refused_in_one_line() {
    let site = Site::new();
    model(&site);
    let null: OwnedFd = std::fs::File::open("/dev/null").unwrap().into();
    let err = serve(
        &[],
        &null,
        &[&site.p("store"), "label", "--key", &site.key()],
        site.dir.path(),
    )
    .err()
    .expect("refused");
    assert!(err.contains("exited (exit status: 2)"), "{err}");
    assert!(
        err.contains("--fuse-fd 3: not a /dev/fuse connection"),
        "{err}"
    );
    let o = sealfs(
        &[
            "mount",
            "--foreground",
            "--fuse-fd",
            "9",
            &site.p("store"),
            "label",
            "--key",
            &site.key(),
        ],
        &[],
    );
    let all = expect_code(&o, 2);
    assert!(
        all.contains("--fuse-fd 9: not an open file descriptor"),
        "{all}"
    );
    let o = sealfs(
        &[
            "mount",
            "--fuse-fd",
            "1",
            &site.p("store"),
            "label",
            "--key",
            &site.key(),
        ],
        &[],
    );
    expect_code(&o, 2);
}
