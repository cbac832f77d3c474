//! Boot-time mounts: the `mount -t fuse.sealfs` helper path through the real mount(8) and
//! mount.fuse3, and the systemd units in `systemd/` (verified by systemd-analyze and run the
//! way systemd runs them). These need root (mount(8), setpriv): CI runs as root; elsewhere they
//! fail, they do not skip.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;

fn require_root() {
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "tests/ops.rs drives mount(8) and setpriv: run as root (CI does)"
    );
}

/// A sealed local tree (the embedded default) with one key file.
struct Sealed {
    dir: tempfile::TempDir,
}

impl Sealed {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src");
        std::fs::create_dir_all(src.join("sub")).unwrap();
        std::fs::write(src.join("weights.bin"), pattern(3 << 20, 7)).unwrap();
        std::fs::write(src.join("sub/config.json"), b"{\"layers\": 2}\n").unwrap();
        let s = Self { dir };
        expect_code(&sealfs(&["keygen", &s.p("kek")], &[]), 0);
        expect_code(
            &sealfs(
                &["seal", &s.p("src"), &s.p("sealed"), "--key", &s.key()],
                &[],
            ),
            0,
        );
        s
    }
    fn p(&self, rel: &str) -> String {
        self.dir.path().join(rel).display().to_string()
    }
    fn key(&self) -> String {
        format!("file:{}", self.p("kek"))
    }
    fn check_contents(&self, mnt: &Path) {
        for f in ["weights.bin", "sub/config.json"] {
            let want = std::fs::read(self.dir.path().join("src").join(f)).unwrap();
            let got = std::fs::read(mnt.join(f)).unwrap_or_else(|e| panic!("{f}: {e}"));
            assert_eq!(sha256(&got), sha256(&want), "{f}");
        }
    }
}

/// The mountinfo line of `dir`, if mounted.
fn mountinfo(dir: &Path) -> Option<String> {
    let d = dir.display().to_string();
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .find(|l| l.split(' ').nth(4) == Some(d.as_str()))
        .map(str::to_owned)
}

/// Pids of sealfs processes whose command line names `dir` (the daemon mount(8) started).
fn daemons_for(dir: &Path) -> Vec<i32> {
    let d = dir.display().to_string();
    let mut pids = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let cmd = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
        let args: Vec<_> = cmd
            .split(|b| *b == 0)
            .map(String::from_utf8_lossy)
            .collect();
        if args.first().is_some_and(|a| a.ends_with("sealfs")) && args.iter().any(|a| *a == d) {
            pids.push(pid);
        }
    }
    pids
}

/// Unmounts and kills whatever a test left at `dir`, also when it failed.
struct Cleanup(PathBuf);

impl Drop for Cleanup {
    fn drop(&mut self) {
        if mountinfo(&self.0).is_some() {
            let _ = Command::new("umount").arg("-l").arg(&self.0).status();
        }
        for pid in daemons_for(&self.0) {
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
}

fn wait_gone(dir: &Path) {
    let start = Instant::now();
    while !daemons_for(dir).is_empty() || mountinfo(dir).is_some() {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "daemon or mount still there 20 s after umount"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `mount -t fuse.sealfs`: mount(8) → /sbin/mount.fuse → `sh -c 'sealfs SRC DIR -o …'`.
/// In production `sealfs` is found on the default PATH (/usr/local/bin); here the type names
/// the built binary by absolute path (mount.fuse3 runs the type as the program), so the chain
/// is otherwise the real one: libmount's option handling, mount.fuse3's added `rw,dev,suid`.
fn mount8(src: &str, dir: &Path, opts: &str) -> std::process::Output {
    Command::new("mount")
        .arg("-t")
        .arg(format!("fuse.{}", bin().display()))
        .arg(src)
        .arg(dir)
        .arg("-o")
        .arg(opts)
        .env_clear()
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .output()
        .expect("mount(8) is required (util-linux)")
}

#[test]
fn mount_helper_round_trip_through_mount8() {
    require_root();
    assert!(
        Path::new("/sbin/mount.fuse3").exists() || Path::new("/usr/sbin/mount.fuse3").exists(),
        "mount.fuse3 missing: install fuse3"
    );
    let s = Sealed::new();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("models");
    std::fs::create_dir(&dir).unwrap();
    let _cleanup = Cleanup(dir.clone());

    // A typo is one line naming it, and nothing is mounted.
    let out = mount8(
        &s.p("sealed"),
        &dir,
        &format!("key={},cache_sise=64MiB", s.key()),
    );
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains("sealfs: error: unknown mount option \"cache_sise\""),
        "{err}"
    );
    assert!(mountinfo(&dir).is_none());

    // The fstab line's options: mount(8) returns only once the mount is live.
    let opts = format!(
        "_netdev,nofail,key={},cache_size=64MiB,list_ttl=0,allow_other,noexec,file_mode=440",
        s.key()
    );
    let out = mount8(&s.p("sealed"), &dir, &opts);
    assert!(out.status.success(), "mount failed: {}", stderr(&out));
    s.check_contents(&dir);
    let info = mountinfo(&dir).expect("mounted");
    // mountinfo: ... mount options - fstype source super options
    let (before, after) = info.split_once(" - ").unwrap();
    let mnt_opts = before.split(' ').nth(5).unwrap();
    for o in ["ro", "nosuid", "nodev", "noexec"] {
        assert!(mnt_opts.split(',').any(|x| x == o), "{o} missing in {info}");
    }
    let mut sup = after.split(' ');
    // fuser's own mount(2) (root) records "fuse"; through fusermount3 it is "fuse.sealfs".
    assert!(matches!(sup.next(), Some("fuse" | "fuse.sealfs")), "{info}");
    assert_eq!(sup.next(), Some(s.p("sealed").as_str()), "{info}");
    assert!(sup.next().unwrap().contains("allow_other"), "{info}");
    let mode = std::fs::metadata(dir.join("weights.bin")).unwrap();
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&mode.permissions()) & 0o777,
        0o440
    );
    assert_eq!(daemons_for(&dir).len(), 1, "one daemon serves the mount");

    // umount(8) ends the daemon.
    let st = Command::new("umount").arg(&dir).status().unwrap();
    assert!(st.success());
    wait_gone(&dir);
}
