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
                &[
                    "seal",
                    &s.p("src"),
                    &s.p("sealed"),
                    "--key",
                    &s.key(),
                    "--chunk-size",
                    "64KiB",
                ],
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

/// A sealed tree and an empty mount point under a temp dir, unmounted and its daemon
/// stopped on drop (fields drop in order: the cleanup before the directories go).
struct Site {
    _cleanup: Cleanup,
    dir: PathBuf,
    tmp: tempfile::TempDir,
    sealed: Sealed,
}

impl Site {
    fn new() -> Self {
        require_root();
        let sealed = Sealed::new();
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("models");
        std::fs::create_dir(&dir).unwrap();
        Self {
            _cleanup: Cleanup(dir.clone()),
            dir,
            tmp,
            sealed,
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
    let site = Site::new();
    let (s, dir) = (&site.sealed, site.dir.clone());

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

fn systemd_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("systemd")
}

/// `Key=` values of a unit file, in order (comments and continuation lines are not used).
fn directives(unit: &str, key: &str) -> Vec<String> {
    let text = std::fs::read_to_string(systemd_dir().join(unit)).unwrap();
    text.lines()
        .filter_map(|l| l.strip_prefix(key)?.strip_prefix('='))
        .map(str::to_owned)
        .collect()
}

fn one(unit: &str, key: &str) -> String {
    let v = directives(unit, key);
    assert_eq!(v.len(), 1, "{unit}: expected one {key}=, found {v:?}");
    v[0].clone()
}

/// A root for `systemd-analyze --root`: the host's system units, our units byte for byte,
/// and the executables they name (so "is not executable" checks are real).
fn analyze_root(units: &[(&str, String)]) -> tempfile::TempDir {
    let root = tempfile::tempdir().unwrap();
    let r = root.path();
    for d in [
        "usr/local/bin",
        "usr/bin",
        "etc/systemd/system",
        "usr/lib/systemd/system",
    ] {
        std::fs::create_dir_all(r.join(d)).unwrap();
    }
    // Regular unit files only: the host's alias links are absolute and would point outside.
    for e in std::fs::read_dir("/usr/lib/systemd/system")
        .unwrap()
        .flatten()
    {
        if e.file_type().unwrap().is_file() {
            std::fs::copy(
                e.path(),
                r.join("usr/lib/systemd/system").join(e.file_name()),
            )
            .unwrap();
        }
    }
    std::fs::copy(bin(), r.join("usr/local/bin/sealfs")).unwrap();
    // ExecReload='s kill (merged /usr: /bin is usr/bin).
    std::fs::copy("/usr/bin/kill", r.join("usr/bin/kill")).expect("kill (procps)");
    std::os::unix::fs::symlink("usr/bin", r.join("bin")).unwrap();
    std::fs::copy("/usr/bin/fusermount3", r.join("usr/bin/fusermount3"))
        .expect("fusermount3 (fuse3) is required");
    for (name, text) in units {
        std::fs::write(r.join("etc/systemd/system").join(name), text).unwrap();
    }
    root
}

fn analyze(root: &Path, args: &[&str]) -> std::process::Output {
    Command::new("systemd-analyze")
        .args(args)
        .arg(format!("--root={}", root.display()))
        .output()
        .expect("systemd-analyze is required (Debian package systemd; .ci/run installs it)")
}

/// The unit's crash, upgrade and stop behaviour (docs/OPERATIONS.md "Restarts"): a crash
/// restarts within 100 ms with the descriptor store kept (room for the connection and two
/// states), a reload is a SIGHUP to the daemon, readiness comes from the daemon, and nothing
/// unmounts at a restart.
#[test]
fn the_unit_restarts_reloads_and_keeps_the_connection() {
    assert_eq!(one("sealfs@.service", "Type"), "notify");
    assert_eq!(one("sealfs@.service", "NotifyAccess"), "main");
    assert_eq!(one("sealfs@.service", "Restart"), "on-failure");
    assert_eq!(one("sealfs@.service", "RestartSec"), "100ms");
    assert_eq!(
        one("sealfs@.service", "ExecReload"),
        "/bin/kill -HUP $MAINPID"
    );
    let store: usize = one("sealfs@.service", "FileDescriptorStoreMax")
        .parse()
        .unwrap();
    assert!(
        store >= 3,
        "the connection and two states need 3, got {store}"
    );
    assert_eq!(
        directives("sealfs@.service", "Environment"),
        [format!("SEALFS_FDSTORE={store}")],
        "the opt-in for systemd before 254 says the store's real size"
    );
    assert!(
        directives("sealfs@.service", "ExecStopPost").is_empty(),
        "an ExecStopPost= would run at every restart and detach the live mount"
    );
}

#[test]
fn units_pass_systemd_analyze_verify_and_security() {
    let units: Vec<(&str, String)> = ["sealfs@.service", "models-llama3.mount"]
        .into_iter()
        .map(|u| (u, std::fs::read_to_string(systemd_dir().join(u)).unwrap()))
        .collect();
    let root = analyze_root(&units);
    let out = analyze(
        root.path(),
        &["verify", "sealfs@llama3.service", "models-llama3.mount"],
    );
    let text = format!("{}{}", stdout(&out), stderr(&out));
    assert!(
        out.status.success() && text.trim().is_empty(),
        "verify:\n{text}"
    );
    // systemd-analyze exits 0 on unknown keys: silence is the pass. Show it would complain.
    let bad: Vec<(&str, String)> = units
        .iter()
        .map(|(n, t)| (*n, t.replace("NoNewPrivileges=", "NoNewPrivilege=")))
        .collect();
    let broken = analyze_root(&bad);
    let out = analyze(broken.path(), &["verify", "sealfs@llama3.service"]);
    assert!(
        stderr(&out).contains("Unknown key 'NoNewPrivilege'"),
        "verify missed a typo: {}",
        stderr(&out)
    );
    // Exposure score (lower is better; 4.0 when written): keep the hardening from eroding.
    let out = analyze(
        root.path(),
        &[
            "security",
            "--offline=yes",
            "--threshold=40",
            "sealfs@llama3.service",
        ],
    );
    assert!(
        out.status.success(),
        "exposure above 4.0:\n{}",
        stdout(&out)
    );
    // Nothing that gives the service its own mount namespace (the mount would be invisible).
    for key in [
        "ProtectSystem",
        "ProtectHome",
        "PrivateTmp",
        "PrivateDevices",
        "ProtectKernelTunables",
        "ProtectKernelModules",
        "ProtectKernelLogs",
        "ProtectControlGroups",
        "ProtectProc",
        "PrivateMounts",
        "MountFlags",
        "ReadOnlyPaths",
        "InaccessiblePaths",
        "TemporaryFileSystem",
        "BindPaths",
        "RootDirectory",
    ] {
        assert!(
            directives("sealfs@.service", key).is_empty(),
            "{key}= hides the mount"
        );
    }
}

/// KEY=value lines of an EnvironmentFile (no quoting is used in ours).
fn env_file(text: &str) -> Vec<(String, String)> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| {
            let (k, v) = l.split_once('=').expect("KEY=value");
            (k.to_owned(), v.to_owned())
        })
        .collect()
}

/// The unit's ExecStart= with `${VAR}` expanded as one word each, as systemd does, and the
/// installed path replaced by the built binary.
fn exec_start(env: &[(String, String)]) -> Vec<String> {
    one("sealfs@.service", "ExecStart")
        .split_whitespace()
        .map(|w| {
            if w == "/usr/local/bin/sealfs" {
                return bin().display().to_string();
            }
            match w.strip_prefix("${").and_then(|w| w.strip_suffix('}')) {
                Some(var) => env
                    .iter()
                    .find(|(k, _)| k == var)
                    .unwrap_or_else(|| panic!("{var} not in the conf"))
                    .1
                    .clone(),
                None => w.to_owned(),
            }
        })
        .collect()
}

/// The unit's LimitMEMLOCK in bytes.
fn unit_memlock() -> u64 {
    let memlock = one("sealfs@.service", "LimitMEMLOCK");
    sealfs::cli::parse_size(&format!("{memlock}iB")).unwrap()
}

/// The locked-memory limit the tests can apply: the unit's, or lower where this process may
/// not raise its hard limit (no CAP_SYS_RESOURCE in a container); the tests size the cache
/// to fit, and measure what the daemon locks against the unit's margin.
fn memlock_here() -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    unsafe { libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut lim) };
    unit_memlock().min(lim.rlim_max)
}

/// ExecStart under the unit's LimitMEMLOCK (or [`memlock_here`]), CapabilityBoundingSet,
/// NoNewPrivileges and UMask (prlimit, setpriv, umask: what systemd applies before exec),
/// with `prefix` (e.g. strace) in front of the daemon and $NOTIFY_SOCKET set.
fn unit_command(env: &[(String, String)], notify: &Path, prefix: &[&str]) -> Command {
    let bytes = memlock_here();
    let caps: Vec<String> = one("sealfs@.service", "CapabilityBoundingSet")
        .split_whitespace()
        .map(|c| format!("+{}", c.trim_start_matches("CAP_").to_lowercase()))
        .collect();
    assert_eq!(one("sealfs@.service", "NoNewPrivileges"), "yes");
    let umask = u32::from_str_radix(&one("sealfs@.service", "UMask"), 8).unwrap();
    let mut c = Command::new("prlimit");
    c.arg(format!("--memlock={bytes}:{bytes}"))
        .arg("--")
        .arg("setpriv")
        .arg("--no-new-privs")
        .arg(format!("--bounding-set=-all,{}", caps.join(",")))
        .arg("--")
        .args(prefix)
        .args(exec_start(env));
    c.env_clear()
        .env(
            "PATH",
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        )
        .env("NOTIFY_SOCKET", notify);
    for (k, v) in env {
        c.env(k, v);
    }
    // SAFETY: umask is async-signal-safe; runs in the forked child before exec.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(&mut c, move || {
            libc::umask(umask as libc::mode_t);
            Ok(())
        });
    }
    c
}

/// Every syscall in systemd's named groups, nested groups expanded (`systemd-analyze
/// syscall-filter` prints each group with its members and the groups it includes).
fn syscall_groups(filter: &str) -> std::collections::HashSet<String> {
    let out = Command::new("systemd-analyze")
        .arg("syscall-filter")
        .output()
        .expect("systemd-analyze");
    let mut groups: std::collections::HashMap<String, Vec<String>> = Default::default();
    let mut cur = String::new();
    for l in stdout(&out).lines() {
        if l.starts_with('@') {
            cur = l.trim().to_owned();
        } else if let Some(m) = l.strip_prefix("    ") {
            if !m.starts_with('#') && !cur.is_empty() {
                groups
                    .entry(cur.clone())
                    .or_default()
                    .push(m.trim().to_owned());
            }
        }
    }
    let mut todo: Vec<String> = filter.split_whitespace().map(str::to_owned).collect();
    let mut seen = std::collections::HashSet::new();
    let mut calls = std::collections::HashSet::new();
    while let Some(g) = todo.pop() {
        if !seen.insert(g.clone()) {
            continue;
        }
        for m in groups
            .get(&g)
            .unwrap_or_else(|| panic!("unknown group {g}"))
        {
            if m.starts_with('@') {
                todo.push(m.clone());
            } else {
                calls.insert(m.clone());
            }
        }
    }
    calls
}

#[test]
fn service_runs_as_systemd_runs_it_within_its_syscall_filter() {
    let site = Site::new();
    let (s, dir, tmp) = (&site.sealed, site.dir.clone(), &site.tmp);
    // The shipped example conf with this test's source, mount point and key.
    let mut env = env_file(&std::fs::read_to_string(systemd_dir().join("llama3.conf")).unwrap());
    for (k, v) in env.iter_mut() {
        match k.as_str() {
            "SEALFS_SOURCE" => *v = s.p("sealed"),
            "SEALFS_MOUNTPOINT" => *v = dir.display().to_string(),
            "SEALFS_OPTIONS" => {
                // Same options, a local key instead of KMS, a cache that fits the memlock
                // limit this test can set (see memlock_here), no metrics port.
                *v = v
                    .split(',')
                    .filter(|o| !o.starts_with("metrics_addr="))
                    .map(|o| match o.split_once('=') {
                        Some(("key", _)) => format!("key={}", s.key()),
                        Some(("cache_size", _)) => "cache_size=4MiB".to_owned(),
                        _ => o.to_owned(),
                    })
                    // Slots of this test's 64 KiB chunks: 8 slots of the default 1 MiB
                    // would not fit that limit.
                    .chain(["max_chunk_size=64KiB".to_owned()])
                    .collect::<Vec<_>>()
                    .join(",")
            }
            _ => {}
        }
    }
    let sock_path = tmp.path().join("notify.sock");
    let sock = std::os::unix::net::UnixDatagram::bind(&sock_path).unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let trace = tmp.path().join("strace.log");
    let trace_s = trace.display().to_string();
    let log = tmp.path().join("journal.log");
    let mut child = Proc(
        unit_command(
            &env,
            &sock_path,
            &["strace", "-f", "-qq", "-o", &trace_s, "--"],
        )
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .expect("prlimit, setpriv (util-linux) and strace are required"),
    );
    let recv = |want: &str, child: &mut Proc| {
        let start = Instant::now();
        let mut buf = [0u8; 256];
        loop {
            if let Ok(n) = sock.recv(&mut buf) {
                if String::from_utf8_lossy(&buf[..n]).contains(want) {
                    return;
                }
            }
            if let Some(st) = child.0.try_wait().unwrap() {
                panic!(
                    "exited ({st}) before {want}: {}",
                    std::fs::read_to_string(&log).unwrap()
                );
            }
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "no {want} in 60 s"
            );
        }
    };
    recv("READY=1", &mut child);
    // READY=1 means live: the mount answers at once.
    assert!(
        mountinfo(&dir).is_some(),
        "READY=1 before the mount existed"
    );
    s.check_contents(&dir);
    let pids = daemons_for(&dir);
    assert_eq!(pids.len(), 1, "{pids:?}");
    // What the daemon locks (cache + DEK pages) stays within the margin the unit's
    // LimitMEMLOCK comment promises: cache_size + 64MiB.
    let status = std::fs::read_to_string(format!("/proc/{}/status", pids[0])).unwrap();
    let vm_lck: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmLck:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmLck");
    assert!(
        vm_lck * 1024 > 0 && vm_lck * 1024 <= (4 << 20) + (64 << 20),
        "VmLck {vm_lck} kB"
    );
    assert!(
        unit_memlock() >= (256 << 20) + (64 << 20),
        "LimitMEMLOCK below the default cache + 64MiB"
    );
    unsafe { libc::kill(pids[0], libc::SIGTERM) };
    recv("STOPPING=1", &mut child);
    let st = child.0.wait().unwrap();
    assert_eq!(
        st.code(),
        Some(0),
        "{}",
        std::fs::read_to_string(&log).unwrap()
    );
    assert!(mountinfo(&dir).is_none(), "still mounted after SIGTERM");
    // JSON logs (log_format=json from the conf) reached the journal's stream.
    let journal = std::fs::read_to_string(&log).unwrap();
    assert!(
        journal
            .lines()
            .any(|l| l.starts_with('{') && l.contains("\"sealfs::audit\"")),
        "no JSON audit event on stderr: {journal}"
    );

    // Every syscall the daemon made is in the unit's SystemCallFilter=, and every socket
    // family in RestrictAddressFamilies=: under systemd anything else would be EPERM.
    let allowed = syscall_groups(&one("sealfs@.service", "SystemCallFilter"));
    let families = one("sealfs@.service", "RestrictAddressFamilies");
    let mut used = std::collections::BTreeSet::new();
    let mut bad_families = std::collections::BTreeSet::new();
    for l in std::fs::read_to_string(&trace).unwrap().lines() {
        let Some((_pid, rest)) = l.split_once(' ') else {
            continue;
        };
        let rest = rest.trim_start();
        let Some((name, args)) = rest.split_once('(') else {
            continue;
        };
        if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            continue;
        }
        if name == "socket" {
            let fam = args.split(',').next().unwrap_or("");
            if !families.split_whitespace().any(|f| f == fam) {
                bad_families.insert(fam.to_owned());
            }
        }
        used.insert(name.to_owned());
    }
    assert!(
        used.contains("mount") && used.contains("mlock"),
        "trace incomplete: {used:?}"
    );
    let outside: Vec<_> = used.iter().filter(|c| !allowed.contains(*c)).collect();
    assert!(
        outside.is_empty(),
        "syscalls outside SystemCallFilter=: {outside:?}"
    );
    assert!(
        bad_families.is_empty(),
        "socket families outside RestrictAddressFamilies=: {bad_families:?}"
    );
}

#[test]
fn unit_memlock_limit_refuses_a_larger_cache_with_the_fix_named() {
    let site = Site::new();
    let (s, dir, tmp) = (&site.sealed, site.dir.clone(), &site.tmp);
    let env = vec![
        ("SEALFS_SOURCE".to_owned(), s.p("sealed")),
        ("SEALFS_MOUNTPOINT".to_owned(), dir.display().to_string()),
        (
            "SEALFS_OPTIONS".to_owned(),
            format!("key={},cache_size=1GiB", s.key()),
        ),
    ];
    let out = unit_command(&env, &tmp.path().join("none.sock"), &[])
        .output()
        .unwrap();
    let err = expect_code(&out, 1);
    assert!(
        err.contains("mlock refused") && err.contains("LimitMEMLOCK="),
        "{err}"
    );
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(mountinfo(&dir).is_none());
}

/// Datagrams received on `sock` until `want` appears in one (or `limit` passes).
fn syslog_line(sock: &std::os::unix::net::UnixDatagram, want: &str, limit: Duration) -> String {
    let start = Instant::now();
    let mut seen = Vec::new();
    let mut buf = vec![0u8; 65536];
    while start.elapsed() < limit {
        if let Ok(n) = sock.recv(&mut buf) {
            let line = String::from_utf8_lossy(&buf[..n]).into_owned();
            if line.contains(want) {
                return line;
            }
            seen.push(line);
        }
    }
    panic!(
        "no syslog line with {want:?} in {limit:?}; got:\n{}",
        seen.join("\n")
    );
}

/// A daemonized mount started from a pipe (as `$(sealfs mount …)` or a test harness) keeps
/// its log lines, audit events included, off that pipe: they go to syslog (here a receiver
/// of the test's own, through SEALFS_SYSLOG_SOCKET; journald serves /dev/log the same way),
/// or to `--log-file`. SIGUSR2 switches debug logging on and off on the live mount.
#[test]
fn a_daemonized_mount_logs_to_syslog_or_its_log_file_never_to_the_callers_pipe() {
    let site = Site::new();
    let (s, dir) = (&site.sealed, site.dir.clone());
    let sock_path = site.tmp.path().join("log.sock");
    let sock = std::os::unix::net::UnixDatagram::bind(&sock_path).unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let env = [(
        "SEALFS_SYSLOG_SOCKET".to_string(),
        sock_path.display().to_string(),
    )];
    let dir_s = dir.display().to_string();
    let out = sealfs(
        &[
            "mount",
            &s.p("sealed"),
            &dir_s,
            "--key",
            &s.key(),
            "--dek-grace",
            "1s",
            "--log-level",
            "info",
        ],
        &env,
    );
    let said = expect_code(&out, 0);
    s.check_contents(&dir);
    let line = syslog_line(&sock, "dek unwrapped", Duration::from_secs(10));
    // <30>: facility daemon (3), severity info (6).
    assert!(line.starts_with("<30>sealfs["), "{line}");
    assert!(
        !said.contains("dek unwrapped"),
        "the caller's pipe got log lines: {said}"
    );

    let pid = daemons_for(&dir)[0];
    unsafe { libc::kill(pid, libc::SIGUSR2) };
    syslog_line(
        &sock,
        "SIGUSR2: log level switched",
        Duration::from_secs(10),
    );
    // Debug lines now: a DEK released after --dek-grace is one.
    syslog_line(&sock, "DEK released", Duration::from_secs(10));
    let st = Command::new("umount").arg(&dir).status().unwrap();
    assert!(st.success());
    wait_gone(&dir);

    // --log-file: created 0600, the audit events land there.
    let log = site.tmp.path().join("sealfs.log");
    let out = sealfs(
        &[
            "mount",
            &s.p("sealed"),
            &dir_s,
            "--key",
            &s.key(),
            "--log-file",
            &log.display().to_string(),
        ],
        &env,
    );
    expect_code(&out, 0);
    s.check_contents(&dir);
    let st = Command::new("umount").arg(&dir).status().unwrap();
    assert!(st.success());
    wait_gone(&dir);
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("dek unwrapped"), "{text}");
    let mode = std::fs::metadata(&log).unwrap();
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&mode.permissions()) & 0o777,
        0o600
    );
}
