//! The CLI against a hostile bucket and a hostile local disk: `unseal` never writes outside
//! DEST (no symlink under DEST is followed), its outputs are private (0600 files, 0700
//! directories), and every command runs non-dumpable with a zero core-size limit.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;

use common::*;

/// A sealed local tree (`sub/file`, `top`) and its key file, under one temp dir.
struct Tree {
    dir: tempfile::TempDir,
}

impl Tree {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src");
        std::fs::create_dir_all(src.join("sub")).unwrap();
        std::fs::write(src.join("sub/file"), pattern(100_000, 1)).unwrap();
        std::fs::write(src.join("top"), pattern(1000, 2)).unwrap();
        let t = Self { dir };
        expect_code(&sealfs(&["keygen", &t.p("kek")], &[]), 0);
        expect_code(
            &sealfs(
                &[
                    "seal",
                    &t.p("src"),
                    &t.p("sealed"),
                    "--key",
                    &t.key(),
                    "--chunk-size",
                    "16KiB",
                ],
                &[],
            ),
            0,
        );
        t
    }
    fn p(&self, rel: &str) -> String {
        self.dir.path().join(rel).display().to_string()
    }
    fn key(&self) -> String {
        format!("file:{}", self.p("kek"))
    }
    fn unseal(&self, src: &str, dest: &str, force: bool) -> std::process::Output {
        let key = self.key();
        let mut args = vec!["unseal", src, dest, "--key", &key];
        if force {
            args.push("--force");
        }
        sealfs(&args, &[])
    }
}

fn entries(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

/// One `sealfs: error:` line and nothing else on stderr.
#[track_caller]
fn one_error_line(o: &std::process::Output, needle: &str) {
    let e = stderr(o);
    assert_eq!(e.lines().count(), 1, "one line: {e}");
    assert!(e.starts_with("sealfs: error:"), "{e}");
    assert!(e.contains(needle), "{needle:?} not in: {e}");
}

#[test]
fn unseal_never_follows_a_symlink_planted_under_dest() {
    let t = Tree::new();
    let outside = t.dir.path().join("outside");
    std::fs::create_dir(&outside).unwrap();

    // A directory component that is a symlink out of DEST.
    let dest = t.dir.path().join("dest");
    std::fs::create_dir(&dest).unwrap();
    std::os::unix::fs::symlink(&outside, dest.join("sub")).unwrap();
    for force in [false, true] {
        let o = t.unseal(&t.p("sealed"), &dest.display().to_string(), force);
        assert_eq!(o.status.code(), Some(1), "force={force}: {}", stderr(&o));
        one_error_line(&o, "symbolic link");
        assert!(
            entries(&outside).is_empty(),
            "force={force}: wrote outside DEST: {:?}",
            entries(&outside)
        );
        assert!(std::fs::symlink_metadata(dest.join("sub"))
            .unwrap()
            .file_type()
            .is_symlink());
    }

    // The final name is a symlink to a file outside: refused, the target untouched, also
    // with --force, and no temporary file is left behind.
    let victim = outside.join("victim");
    std::fs::write(&victim, b"keep").unwrap();
    let dest2 = t.dir.path().join("dest2");
    std::fs::create_dir(&dest2).unwrap();
    std::os::unix::fs::symlink(&victim, dest2.join("top")).unwrap();
    for force in [false, true] {
        let o = t.unseal(&t.p("sealed/top"), &dest2.display().to_string(), force);
        assert_ne!(o.status.code(), Some(0), "force={force}: {}", stderr(&o));
        one_error_line(&o, "symbolic link");
        assert_eq!(std::fs::read(&victim).unwrap(), b"keep", "force={force}");
        assert!(std::fs::symlink_metadata(dest2.join("top"))
            .unwrap()
            .file_type()
            .is_symlink());
        assert_eq!(entries(&dest2), ["top"], "force={force}");
    }
    assert_eq!(entries(&outside), ["victim"]);
}

#[test]
fn unseal_outputs_are_private_to_the_user() {
    // SAFETY: umask has no failure mode; 022 is what most shells give.
    unsafe { libc::umask(0o022) };
    let t = Tree::new();
    let mode = |p: &str| std::fs::metadata(t.p(p)).unwrap().permissions().mode() & 0o7777;

    expect_code(&t.unseal(&t.p("sealed"), &t.p("out/tree"), false), 0);
    assert_eq!(mode("out"), 0o700, "a new DEST parent");
    assert_eq!(mode("out/tree"), 0o700, "a new DEST");
    assert_eq!(mode("out/tree/sub"), 0o700, "a new directory");
    assert_eq!(mode("out/tree/sub/file"), 0o600);
    assert_eq!(mode("out/tree/top"), 0o600);
    assert_eq!(
        std::fs::read(t.p("out/tree/sub/file")).unwrap(),
        std::fs::read(t.p("src/sub/file")).unwrap()
    );

    // One object to a file path, and --force over a world-readable file.
    expect_code(&t.unseal(&t.p("sealed/top"), &t.p("one"), false), 0);
    assert_eq!(mode("one"), 0o600);
    std::fs::write(t.p("two"), b"old").unwrap();
    std::fs::set_permissions(t.p("two"), std::fs::Permissions::from_mode(0o644)).unwrap();
    expect_code(&t.unseal(&t.p("sealed/top"), &t.p("two"), true), 0);
    assert_eq!(mode("two"), 0o600);
    assert_eq!(
        std::fs::read(t.p("two")).unwrap(),
        std::fs::read(t.p("src/top")).unwrap()
    );
}

/// Runs `sealfs args` under strace and returns the prctl/setrlimit/prlimit64 calls it made.
fn traced(args: &[&str]) -> String {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("strace.log");
    let out = Command::new("strace")
        .args(["-f", "-qq", "-e", "trace=prctl,setrlimit,prlimit64", "-o"])
        .arg(&log)
        .arg(bin())
        .args(args)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("HOME", std::env::temp_dir())
        .output()
        .expect("strace is required (scripts/install-test-deps.sh)");
    assert!(
        out.status.success(),
        "sealfs {args:?} under strace failed: {}{}",
        stdout(&out),
        stderr(&out)
    );
    std::fs::read_to_string(&log).unwrap()
}

#[test]
fn every_command_is_undumpable_with_no_core_file() {
    let t = Tree::new();
    let k2 = t.p("kek2");
    let to_key = format!("file:{k2}");
    let key = t.key();
    let (src, sealed, out) = (t.p("src/top"), t.p("sealed2"), t.p("out"));
    let runs: Vec<Vec<&str>> = vec![
        vec!["keygen", &k2],
        vec!["seal", &src, &sealed, "--key", &key],
        vec!["inspect", &sealed],
        vec!["verify", &sealed, "--key", &key],
        vec!["unseal", &sealed, &out, "--key", &key],
        vec!["rewrap", &sealed, "--key", &key, "--to-key", &to_key],
    ];
    for args in runs {
        let trace = traced(&args);
        assert!(
            trace
                .lines()
                .any(|l| l.contains("prctl(PR_SET_DUMPABLE, SUID_DUMP_DISABLE")
                    && l.ends_with("= 0")),
            "{}: no PR_SET_DUMPABLE=0:\n{trace}",
            args[0]
        );
        assert!(
            trace.lines().any(|l| l.contains("RLIMIT_CORE")
                && l.contains("{rlim_cur=0, rlim_max=0}")
                && l.ends_with("= 0")),
            "{}: no RLIMIT_CORE=0:\n{trace}",
            args[0]
        );
    }
}

#[test]
fn the_mount_daemon_keeps_a_zero_core_limit() {
    let t = Tree::new();
    let mut m = Mount::start(&t.p("sealed"), &["--key", &t.key()], &[]);
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", m.pid())).unwrap();
    let core = limits
        .lines()
        .find(|l| l.starts_with("Max core file size"))
        .unwrap();
    assert_eq!(
        core.split_whitespace().collect::<Vec<_>>()[4..6],
        ["0", "0"],
        "{core}"
    );
    assert_eq!(
        std::fs::read(m.path("top")).unwrap(),
        std::fs::read(t.p("src/top")).unwrap()
    );
    m.stop_with_exit_0();
}

#[test]
fn reseal_with_force_on_a_local_directory_swaps_both_objects() {
    let t = Tree::new();
    std::fs::write(t.p("src/top"), pattern(70_000, 9)).unwrap();
    let (src, dest, key) = (t.p("src/top"), t.p("sealed"), t.key());
    let seal_top = |extra: &[&str]| {
        let mut args = vec!["seal", &src, &dest, "--key", &key, "--force"];
        args.extend_from_slice(extra);
        sealfs(&args, &[])
    };
    // Over a model, --force writes the next generation beside it (nothing in place).
    expect_code(&seal_top(&[]), 0);
    assert_eq!(
        entries(&t.dir.path().join("sealed/.sealfs-g1")),
        [
            ".sealfs-manifest",
            ".sealfs-manifest.sealfs-c20",
            "top",
            "top.sealfs-c20"
        ]
    );
    // Files no manifest covers (sealed before models) are replaced in place, both objects.
    for name in std::fs::read_dir(t.dir.path().join("sealed")).unwrap() {
        let p = name.unwrap().path();
        let n = p.file_name().unwrap().to_string_lossy().into_owned();
        if n.starts_with(".sealfs-") {
            if p.is_dir() {
                std::fs::remove_dir_all(&p).unwrap();
            } else {
                std::fs::remove_file(&p).unwrap();
            }
        }
    }
    let o = seal_top(&["--chunk-size", "32KiB"]);
    expect_code(&o, 0);
    let names = entries(&t.dir.path().join("sealed"));
    // The seal is a (one-file) model now: its manifest replaces the old one.
    assert_eq!(
        names,
        [
            ".sealfs-manifest",
            ".sealfs-manifest.sealfs-c15",
            "sub",
            "top",
            "top.sealfs-c15"
        ],
        "stale key object removed"
    );
    let v = expect_code(
        &sealfs(&["verify", &t.p("sealed/top"), "--key", &t.key()], &[]),
        0,
    );
    assert!(v.contains("top (70000 bytes)"), "{v}");
}
