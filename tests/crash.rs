//! Crashes (issue 19): `seal --force`, `reseal` and `rewrap` killed with SIGKILL at 20
//! points each, spread over a whole run. After every kill the store holds one version of
//! the model, whole and verifiable (the old or the new, never a mix), and no plaintext byte
//! anywhere. The kill points are spread evenly over a measured run, offset by a fixed
//! pseudo-random jitter, so a failure reproduces. Real binary, local store.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

/// Every source file is this marker, repeated: any of it in the store is plaintext.
const MARKER: &[u8] = b"sealfs-crash-test-plaintext-marker/";
const KILLS: u64 = 20;

struct Fx {
    s: Site,
}

impl Fx {
    fn new() -> Self {
        let s = Site::new();
        expect_code(&sealfs(&["keygen", &s.p("k2")], &[]), 0);
        for v in [1, 2] {
            let files = 4;
            for i in 0..files {
                let mut body = MARKER.repeat((3 << 20) / MARKER.len() + i * 7);
                body.extend_from_slice(format!("v{v} file {i}").as_bytes());
                s.write(&format!("v{v}/f{i}.bin"), &body);
            }
        }
        Self { s }
    }
    fn key(&self, k: &str) -> String {
        format!("file:{}", self.s.p(k))
    }
    /// `seal SRC m` with small parts (many steps to be killed between).
    fn seal_args(&self, v: u32) -> Vec<String> {
        [
            "seal",
            &self.s.p(&format!("v{v}")),
            &self.s.p("m"),
            "--key",
            &self.key("k"),
            "--chunk-size",
            "64KiB",
            "--part-size",
            "5MiB",
            "--jobs",
            "2",
            "--force",
            "--model-version",
            &v.to_string(),
        ]
        .map(String::from)
        .to_vec()
    }

    /// Asserts the invariant: `verify` passes under the keys given (exit 0, every file
    /// `ok`), the model is one of the versions sealed, unsealed it is exactly that
    /// version's files, and no stored object holds a plaintext marker. Returns the version.
    fn assert_whole(&self, keys: &[&str], what: &str) -> u32 {
        let m = self.s.p("m");
        let mut args = vec!["verify", m.as_str()];
        for k in keys {
            args.extend(["--key", k]);
        }
        let out = sealfs(&args, &[]);
        let text = format!("{}{}", stdout(&out), stderr(&out));
        assert_eq!(out.status.code(), Some(0), "{what}: {text}");
        let v: u32 = text
            .split_whitespace()
            .skip_while(|w| *w != "version")
            .nth(1)
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("{what}: no model version in {text}"));
        let dest = self.s.path("out");
        let _ = std::fs::remove_dir_all(&dest);
        let mut args = vec!["unseal", m.as_str(), dest.to_str().unwrap()];
        for k in keys {
            args.extend(["--key", k]);
        }
        expect_code(&sealfs(&args, &[]), 0);
        let src = self.s.path(&format!("v{v}"));
        assert_eq!(tree(&dest), tree(&src), "{what}: version {v}, whole");
        for f in tree(&src) {
            assert!(
                std::fs::read(dest.join(&f)).unwrap() == std::fs::read(src.join(&f)).unwrap(),
                "{what}: {f} of version {v}"
            );
        }
        for f in tree(&self.s.path("m")) {
            let bytes = std::fs::read(self.s.path("m").join(&f)).unwrap();
            assert!(
                !bytes.windows(MARKER.len()).any(|w| w == MARKER),
                "{what}: plaintext in the store: {f}"
            );
        }
        v
    }
}

/// Relative paths of the regular files under `dir`, sorted.
fn tree(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push(p.strip_prefix(dir).unwrap().display().to_string());
            }
        }
    }
    out.sort();
    out
}

/// The generation the model at `dir` serves: that of its newest manifest object.
fn served_generation(dir: &Path) -> u32 {
    tree(dir)
        .iter()
        .filter_map(|f| match f.strip_suffix(".sealfs-manifest")? {
            "" => Some(0),
            g => g.strip_prefix(".sealfs-g")?.strip_suffix('/')?.parse().ok(),
        })
        .max()
        .expect("a manifest")
}

/// Runs sealfs with `args` to the end; returns how long it took.
fn timed(args: &[String]) -> Duration {
    let start = Instant::now();
    let out = sealfs(&args.iter().map(String::as_str).collect::<Vec<_>>(), &[]);
    assert!(out.status.success(), "{args:?}: {}", stderr(&out));
    start.elapsed()
}

/// Runs sealfs with `args` and kills it (SIGKILL) after `after`, if still running.
fn killed_after(args: &[String], after: Duration) {
    let mut c = Proc(
        Command::new(bin())
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    std::thread::sleep(after);
    unsafe { libc::kill(c.0.id() as i32, libc::SIGKILL) };
    c.0.wait().unwrap();
}

/// Kill point `i` of `KILLS` over one and a half runs of `span`: evenly spread, with a
/// fixed jitter. (A run under load may take longer than the one measured: the last points
/// then still fall inside it; on an idle machine they fall after it, and check the new
/// version whole.)
fn point(i: u64, span: Duration) -> Duration {
    let jitter = (i.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 40) % 1000; // 0..1000 ‰ of a step
    let step = span.as_micros() as u64 * 3 / 2 / KILLS;
    Duration::from_micros(i * step + step * jitter / 1000)
}

#[test]
fn seal_force_killed_anywhere_leaves_one_whole_version() {
    let f = Fx::new();
    timed(&f.seal_args(1));
    let span = timed(&f.seal_args(2));
    timed(&f.seal_args(1));
    let k = f.key("k");
    for i in 0..KILLS {
        // Alternately v2 over v1 and v1 over v2 (whichever is served, the other is new).
        let to = if i % 2 == 0 { 2 } else { 1 };
        killed_after(&f.seal_args(to), point(i, span));
        let v = f.assert_whole(&[&k], &format!("seal killed at point {i}"));
        eprintln!("kill {i} at {:?}: version {v} served", point(i, span));
    }
}

#[test]
fn reseal_killed_anywhere_leaves_one_whole_generation() {
    let f = Fx::new();
    timed(&f.seal_args(1));
    let (k1, k2) = (f.key("k"), f.key("k2"));
    let reseal = |to: &str| -> Vec<String> {
        [
            "reseal",
            &f.s.p("m"),
            "--key",
            &k1,
            "--key",
            &k2,
            "--to-key",
            to,
            "--unverified-origin",
            "--part-size",
            "5MiB",
            "--jobs",
            "2",
        ]
        .map(String::from)
        .to_vec()
    };
    let span = timed(&reseal(&k2));
    for i in 0..KILLS {
        let to = if i % 2 == 0 { &k1 } else { &k2 };
        killed_after(&reseal(to), point(i, span));
        assert_eq!(
            f.assert_whole(&[&k1, &k2], &format!("reseal killed at point {i}")),
            1
        );
        let g = served_generation(&f.s.path("m"));
        eprintln!("kill {i} at {:?}: generation {g} served", point(i, span));
    }
}

#[test]
fn rewrap_killed_anywhere_leaves_every_file_openable() {
    let f = Fx::new();
    timed(&f.seal_args(1));
    let (k1, k2) = (f.key("k"), f.key("k2"));
    let rewrap = |from: &str, to: &str| -> Vec<String> {
        ["rewrap", &f.s.p("m"), "--key", from, "--to-key", to]
            .map(String::from)
            .to_vec()
    };
    let span = timed(&rewrap(&k1, &k2));
    timed(&rewrap(&k2, &k1));
    for i in 0..KILLS {
        // Both keys open the old slots and the new: each file is whole under one of them.
        let (from, to) = if i % 2 == 0 { (&k1, &k2) } else { (&k2, &k1) };
        let mut args = rewrap(from, to);
        args.splice(4..4, ["--key".to_string(), to.clone()]);
        killed_after(&args, point(i, span));
        assert_eq!(
            f.assert_whole(&[&k1, &k2], &format!("rewrap killed at point {i}")),
            1
        );
    }
}
