//! `tpm2:` keys (a key file sealed to a TPM under a PCR policy) against real TPMs: swtpm
//! instances over TCP (no resource manager in between, so a leaked transient object would
//! fill the TPM's 3 object slots), driven by the real binary and a real FUSE mount. PCRs are
//! changed with tpm2-tools' `tpm2_pcrextend`. A missing swtpm or tpm2-tools is a failure,
//! never a skip. Built without the cargo feature `tpm2`, the one test here checks the
//! one-line refusal instead.

mod common;

#[cfg(not(feature = "tpm2"))]
#[test]
fn without_the_feature_tpm2_keys_and_seal_are_one_line_refusals() {
    use common::*;
    let site = Site::new();
    site.write("src/a.bin", b"x");
    let want = "this sealfs was built without TPM support (cargo feature tpm2)";
    let o = sealfs(
        &[
            "tpm2",
            "seal",
            "--key-file",
            &site.p("k"),
            "--pcrs",
            "sha256:7",
            &site.p("out"),
        ],
        &[],
    );
    let err = expect_code(&o, 2);
    assert_eq!(stderr(&o).lines().count(), 1, "{err}");
    assert!(err.contains(want), "{err}");
    assert!(!site.path("out").exists());
    let o = sealfs(
        &[
            "verify",
            &site.p("src"),
            "--key",
            &format!("tpm2:{}", site.p("x")),
        ],
        &[],
    );
    let err = expect_code(&o, 2);
    assert!(err.contains(want), "{err}");
}

#[cfg(feature = "tpm2")]
mod with_tpm {
    use super::common::*;
    use std::os::unix::fs::PermissionsExt;
    use std::path::{Path, PathBuf};
    use std::process::{Command, Stdio};
    use std::time::{Duration, Instant};

    const C: usize = 1 << 20;
    const PCRS: &str = "sha256:0,2,4,7";

    /// One swtpm (TPM 2.0) over TCP on free loopback ports, its state in a directory of its
    /// own; killed in `Drop`, also when a test fails.
    struct Swtpm {
        _proc: Proc,
        port: u16,
        _dir: tempfile::TempDir,
    }

    impl Swtpm {
        fn start() -> Self {
            let dir = tempfile::tempdir().unwrap();
            // free_port: `port` and `port + 1` (the control channel) are both free.
            let port = free_port();
            let log = std::fs::File::create(dir.path().join("swtpm.log")).unwrap();
            let child = Command::new("swtpm")
                .args(["socket", "--tpm2", "--tpmstate"])
                .arg(format!("dir={}", dir.path().display()))
                .arg("--server")
                .arg(format!("type=tcp,port={port},bindaddr=127.0.0.1"))
                .arg("--ctrl")
                .arg(format!("type=tcp,port={},bindaddr=127.0.0.1", port + 1))
                .args(["--flags", "not-need-init,startup-clear"])
                .stdout(Stdio::from(log.try_clone().unwrap()))
                .stderr(Stdio::from(log))
                .spawn()
                .unwrap_or_else(|e| {
                    panic!("swtpm not runnable ({e}): run scripts/install-test-deps.sh")
                });
            let mut p = Proc(child);
            let start = Instant::now();
            while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
                if let Ok(Some(st)) = p.0.try_wait() {
                    panic!(
                        "swtpm exited ({st}): {}",
                        std::fs::read_to_string(dir.path().join("swtpm.log")).unwrap_or_default()
                    );
                }
                assert!(
                    start.elapsed() < Duration::from_secs(30),
                    "swtpm not listening after 30 s"
                );
                std::thread::sleep(Duration::from_millis(20));
            }
            Self {
                _proc: p,
                port,
                _dir: dir,
            }
        }

        fn tcti(&self) -> String {
            format!("swtpm:host=127.0.0.1,port={}", self.port)
        }

        fn env(&self) -> Vec<(String, String)> {
            vec![(s("SEALFS_TPM2_TCTI"), self.tcti())]
        }

        /// A tpm2-tools command against this TPM, asserting success; its output.
        fn tool(&self, prog: &str, args: &[&str]) -> String {
            let o = Command::new(prog)
                .args(args)
                .env("TPM2TOOLS_TCTI", self.tcti())
                .output()
                .unwrap_or_else(|e| panic!("{prog}: {e} (run scripts/install-test-deps.sh)"));
            let all = format!(
                "{}{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            );
            assert!(o.status.success(), "{prog} {args:?} failed:\n{all}");
            all
        }

        /// Extends PCR `pcr` of the SHA-256 bank (as a new boot component's measurement).
        fn extend(&self, pcr: u8) {
            let spec = format!("{pcr}:sha256={}", "a5".repeat(32));
            self.tool("tpm2_pcrextend", &[&spec]);
        }

        /// The transient objects and sessions the TPM holds now (tpm2_getcap's lists).
        fn held(&self) -> String {
            [
                "handles-transient",
                "handles-loaded-session",
                "handles-saved-session",
            ]
            .iter()
            .map(|c| self.tool("tpm2_getcap", &[c]))
            .collect()
        }
    }

    /// A key file, a model sealed under it to a local store, and the key file sealed to
    /// `tpm` as `out.json`.
    struct Fixture {
        site: Site,
        tpm: Swtpm,
        /// The key file's hex: it must appear in no output or log.
        key_hex: String,
    }

    impl Fixture {
        fn new() -> Self {
            let site = Site::new();
            site.write("src/a.bin", &pattern(2 * C + 333, 1));
            site.write("src/config.json", b"{\"layers\": 2}\n");
            site.write("src/sub/b.bin", &pattern(C / 2, 2));
            expect_code(
                &sealfs(
                    &[
                        "seal",
                        &site.p("src"),
                        &site.p("sealed"),
                        "--key",
                        &site.key(),
                    ],
                    &[],
                ),
                0,
            );
            let line = std::fs::read_to_string(site.path("k")).unwrap();
            let key_hex = line
                .trim()
                .strip_prefix("sealfs-kek-v1:")
                .unwrap()
                .to_string();
            assert_eq!(key_hex.len(), 64);
            let f = Self {
                site,
                tpm: Swtpm::start(),
                key_hex,
            };
            let out = f.seal(&f.tpm, "out.json", 0);
            assert!(
                out.contains("sealed to this TPM under sha256:0,2,4,7"),
                "{out}"
            );
            f
        }

        fn p(&self, rel: &str) -> String {
            self.site.p(rel)
        }

        fn path(&self, rel: &str) -> PathBuf {
            self.site.path(rel)
        }

        fn tpm_key(&self, rel: &str) -> String {
            format!("tpm2:{}", self.p(rel))
        }

        /// Runs sealfs against `tpm`; asserts `code` and that the key's hex is nowhere in
        /// what it printed.
        #[track_caller]
        fn run_on(&self, tpm: &Swtpm, args: &[&str], code: i32) -> std::process::Output {
            let o = sealfs(args, &tpm.env());
            let all = expect_code(&o, code);
            self.assert_no_key(&all);
            o
        }

        #[track_caller]
        fn assert_no_key(&self, text: &str) {
            assert!(
                !text.to_ascii_lowercase().contains(&self.key_hex),
                "the key's bytes were printed:\n{text}"
            );
        }

        /// `sealfs tpm2 seal --key-file k --pcrs PCRS <out>` on `tpm`.
        #[track_caller]
        fn seal(&self, tpm: &Swtpm, out: &str, code: i32) -> String {
            let o = self.run_on(
                tpm,
                &[
                    "tpm2",
                    "seal",
                    "--key-file",
                    &self.p("k"),
                    "--pcrs",
                    PCRS,
                    &self.p(out),
                ],
                code,
            );
            format!("{}{}", stdout(&o), stderr(&o))
        }

        /// `verify sealed --key tpm2:<file>` on this fixture's TPM.
        #[track_caller]
        fn verify(&self, file: &str, code: i32) -> std::process::Output {
            self.run_on(
                &self.tpm,
                &["verify", &self.p("sealed"), "--key", &self.tpm_key(file)],
                code,
            )
        }

        /// `verify` refused with exactly one line on stderr, nothing verified; that line.
        #[track_caller]
        fn refused(&self, file: &str, code: i32) -> String {
            let o = self.verify(file, code);
            let err = stderr(&o);
            assert_eq!(err.lines().count(), 1, "one line:\n{err}");
            assert!(!stdout(&o).contains("ok "), "{}", stdout(&o));
            err
        }
    }

    /// `inspect --key tpm2:OUT` names the slots the unsealed key opens (the key file's),
    /// as for any key, and prints no key byte.
    #[test]
    fn inspect_names_the_slots_a_tpm_sealed_key_opens() {
        let f = Fixture::new();
        let key = f.tpm_key("out.json");
        let o = f.run_on(
            &f.tpm,
            &["inspect", &f.p("sealed"), "--json", "--key", &key],
            0,
        );
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        let listed = v["files"].as_array().unwrap();
        assert!(!listed.is_empty(), "{v}");
        for file in listed {
            assert_eq!(
                file["wrapped_keys"][0]["opened_by"],
                serde_json::json!([key]),
                "{file}"
            );
        }
    }

    fn files() -> [&'static str; 3] {
        ["a.bin", "config.json", "sub/b.bin"]
    }

    /// Seal a key file to the TPM, then `verify` and a real FUSE mount under `tpm2:OUT`
    /// serve every byte; the sealed file is 0600, records the bank, PCRs and values; the
    /// key's bytes are in no output or mount log (even at trace level, with the TSS's own
    /// trace of every TPM command and response: the key crosses the TPM interface in
    /// encrypted sessions only).
    #[test]
    fn a_tpm_sealed_key_verifies_and_mounts_every_byte() {
        let f = Fixture::new();
        let meta = std::fs::symlink_metadata(f.path("out.json")).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        let v: serde_json::Value =
            serde_json::from_slice(&std::fs::read(f.path("out.json")).unwrap()).unwrap();
        assert_eq!(v["format"], "sealfs-tpm2-v1");
        assert_eq!(v["pcr_bank"], "sha256");
        assert_eq!(v["pcrs"], serde_json::json!([0, 2, 4, 7]));
        assert_eq!(v["pcr_values"].as_array().unwrap().len(), 4);

        let o = f.verify("out.json", 0);
        assert_eq!(stdout(&o).matches("ok    ").count(), 3, "{}", stdout(&o));
        assert!(stderr(&o).is_empty(), "{}", stderr(&o));

        let mut m = Mount::start(
            &f.p("sealed"),
            &["--key", &f.tpm_key("out.json")],
            &f.tpm.env(),
        );
        for n in files() {
            assert_eq!(
                sha256(&std::fs::read(m.path(n)).unwrap()),
                sha256(&std::fs::read(f.path(&format!("src/{n}"))).unwrap()),
                "{n}"
            );
        }
        m.stop_with_exit_0();
        f.assert_no_key(&m.logs());

        // Everything logged, sealfs and the TSS (TSS2_LOG asks for trace, which would dump
        // decrypted responses; sealfs caps it at debug): the key shows in no form.
        let mut env = f.tpm.env();
        env.push((s("RUST_LOG"), s("trace")));
        env.push((s("TSS2_LOG"), s("all+trace")));
        let o = sealfs(
            &["verify", &f.p("sealed"), "--key", &f.tpm_key("out.json")],
            &env,
        );
        let all = expect_code(&o, 0);
        assert!(all.contains("debug:tcti:"), "the TSS log is on");
        assert!(
            !all.contains("trace:esys"),
            "the TSS log is capped at debug"
        );
        f.assert_no_key(&all);
        assert_no_key_in(&hex_dumps(&all), &f.key_hex, "the TSS log");

        // What crosses the TPM interface (a relay records every byte of every connection):
        // the key file goes in, and comes back out, in encrypted sessions only.
        let tap = Tap::start(&f.tpm);
        let env = vec![(s("SEALFS_TPM2_TCTI"), tap.tcti())];
        let o = sealfs(
            &[
                "tpm2",
                "seal",
                "--key-file",
                &f.p("k"),
                "--pcrs",
                PCRS,
                &f.p("tapped.json"),
            ],
            &env,
        );
        expect_code(&o, 0);
        let o = sealfs(
            &["verify", &f.p("sealed"), "--key", &f.tpm_key("tapped.json")],
            &env,
        );
        expect_code(&o, 0);
        let wire = tap.bytes();
        // Create's and Unseal's command codes (TPM_CC 0x153, 0x15E) went through the relay.
        for cc in [0x53u8, 0x5e] {
            assert!(
                wire.windows(4).any(|w| w == [0, 0, 1, cc]),
                "no command {cc:#x} recorded"
            );
        }
        assert_no_key_in(&hex::encode(&wire), &f.key_hex, "the TPM interface");
    }

    /// The hex of the TSS's hex dumps (`0000: 8001…  ascii`), joined.
    fn hex_dumps(log: &str) -> String {
        let mut out = String::new();
        for l in log.lines() {
            let hex = l
                .split_once(": ")
                .filter(|(off, _)| off.len() == 4 && off.bytes().all(|b| b.is_ascii_hexdigit()))
                .map(|(_, rest)| rest.split("  ").next().unwrap_or(""));
            if let Some(h) = hex {
                out.push_str(&h.replace(' ', ""));
            }
        }
        out
    }

    /// `hex` (bytes as hex) holds neither the key file's line nor the key's bytes.
    #[track_caller]
    fn assert_no_key_in(hex: &str, key_hex: &str, what: &str) {
        assert!(hex.len() > 1000, "{what}: nothing recorded");
        let line = hex::encode(format!("sealfs-kek-v1:{}", &key_hex[..8]));
        assert!(
            !hex.contains(&line),
            "{what}: the key file's line, in clear"
        );
        assert!(
            !hex.contains(&key_hex[..32]),
            "{what}: the key's bytes, in clear"
        );
    }

    /// A relay in front of a swtpm (its command port and, at +1, its control port, as the
    /// swtpm TCTI expects) that records every byte both ways.
    struct Tap {
        port: u16,
        bytes: std::sync::Arc<std::sync::Mutex<Vec<u8>>>,
    }

    impl Tap {
        fn start(tpm: &Swtpm) -> Self {
            let port = free_port();
            let bytes = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
            for (from, to) in [(port, tpm.port), (port + 1, tpm.port + 1)] {
                let l = std::net::TcpListener::bind(("127.0.0.1", from)).unwrap();
                let rec = bytes.clone();
                // Lives as long as the test process (blocked in accept): nothing to stop.
                std::thread::spawn(move || {
                    for c in l.incoming().flatten() {
                        if let Ok(u) = std::net::TcpStream::connect(("127.0.0.1", to)) {
                            relay(&c, &u, &rec);
                            relay(&u, &c, &rec);
                        }
                    }
                });
            }
            Self { port, bytes }
        }

        fn tcti(&self) -> String {
            format!("swtpm:host=127.0.0.1,port={}", self.port)
        }

        fn bytes(&self) -> Vec<u8> {
            self.bytes.lock().unwrap().clone()
        }
    }

    /// Copies `a` to `b` on a thread of its own, recording what passes.
    fn relay(
        a: &std::net::TcpStream,
        b: &std::net::TcpStream,
        rec: &std::sync::Arc<std::sync::Mutex<Vec<u8>>>,
    ) {
        use std::io::{Read, Write};
        let (mut a, mut b, rec) = (a.try_clone().unwrap(), b.try_clone().unwrap(), rec.clone());
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n @ 1..) = a.read(&mut buf) {
                rec.lock().unwrap().extend_from_slice(&buf[..n]);
                if b.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
            let _ = b.shutdown(std::net::Shutdown::Write);
        });
    }

    /// A changed boot measurement (PCR 7: the Secure Boot policy) refuses the key: `verify`
    /// exits 4 with one line naming sha256:7 and no other PCR, and the mount does not start
    /// (a key that cannot be resolved fails the mount before it is live: exit 4, the same
    /// line). Unseal writes nothing.
    #[test]
    fn a_changed_pcr_refuses_the_key_naming_that_pcr() {
        let f = Fixture::new();
        f.verify("out.json", 0);
        f.tpm.extend(7);
        let err = f.refused("out.json", 4);
        assert!(err.contains("PCRs differ"), "{err}");
        assert!(err.contains("sha256:7"), "{err}");
        for other in ["sha256:0", "sha256:2", "sha256:4"] {
            assert!(!err.contains(other), "{other} did not change: {err}");
        }
        let e = Mount::try_start(
            &f.p("sealed"),
            &["--key", &f.tpm_key("out.json")],
            &f.tpm.env(),
        )
        .err()
        .expect("the mount started without its key");
        assert!(e.contains("exit status: 4"), "{e}");
        assert!(e.contains("sha256:7") && e.contains("PCRs differ"), "{e}");
        f.assert_no_key(&e);
        f.run_on(
            &f.tpm,
            &[
                "unseal",
                &f.p("sealed"),
                &f.p("plain"),
                "--key",
                &f.tpm_key("out.json"),
            ],
            4,
        );
        assert!(!f.path("plain/a.bin").exists());

        // Two PCRs changed: both named.
        f.tpm.extend(0);
        let err = f.refused("out.json", 4);
        assert!(err.contains("sha256:0, sha256:7"), "{err}");

        // A file edited to record the new values (to get past the check here) no longer
        // matches its object's policy: refused before the TPM is asked.
        let g = Fixture::new();
        g.tpm.extend(7);
        let now = g
            .tpm
            .tool("tpm2_pcrread", &["sha256:7", "-o", &g.p("pcr7.bin")]);
        assert!(now.contains("7 :"), "{now}");
        let mut v: serde_json::Value =
            serde_json::from_slice(&std::fs::read(g.path("out.json")).unwrap()).unwrap();
        v["pcr_values"][3] = hex::encode(std::fs::read(g.path("pcr7.bin")).unwrap()).into();
        write_private(&g.path("edited.json"), v.to_string().as_bytes());
        let err = g.refused("edited.json", 1);
        assert!(
            err.contains("not those of the sealed object's policy"),
            "{err}"
        );
    }

    /// A sealed file made on another TPM (the same PCR values) is refused on this one:
    /// one line, exit 4.
    #[test]
    fn a_key_sealed_on_another_tpm_is_refused() {
        let f = Fixture::new();
        let other = Swtpm::start();
        f.seal(&other, "other.json", 0);
        f.run_on(
            &other,
            &["verify", &f.p("sealed"), "--key", &f.tpm_key("other.json")],
            0,
        );
        let err = f.refused("other.json", 4);
        assert!(err.contains("this TPM does not load it"), "{err}");
        assert!(err.contains("sealed on another TPM"), "{err}");
    }

    /// More PCRs than one PCR_Read returns (8), and another bank: sealed, verified, and a
    /// change in the second read's part named.
    #[test]
    fn wide_selections_and_other_banks_work() {
        let f = Fixture::new();
        let all: Vec<String> = (0..16).map(|p| p.to_string()).collect();
        let wide = format!("sha256:{}", all.join(","));
        for (pcrs, out) in [(wide.as_str(), "wide.json"), ("sha1:0,7", "sha1.json")] {
            f.run_on(
                &f.tpm,
                &[
                    "tpm2",
                    "seal",
                    "--key-file",
                    &f.p("k"),
                    "--pcrs",
                    pcrs,
                    &f.p(out),
                ],
                0,
            );
            f.verify(out, 0);
        }
        f.tpm.extend(12);
        let err = f.refused("wide.json", 4);
        assert!(
            err.contains("differ from those it was sealed against: sha256:12 ("),
            "{err}"
        );
        // The SHA-1 bank did not move (only sha256:12 was extended).
        f.verify("sha1.json", 0);
    }

    fn write_private(p: &Path, bytes: &[u8]) {
        std::fs::write(p, bytes).unwrap();
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o600)).unwrap();
    }

    /// Altered sealed files: each refused with one line saying what is wrong, no key.
    #[test]
    fn tampered_sealed_files_are_refused() {
        let f = Fixture::new();
        let good = std::fs::read(f.path("out.json")).unwrap();
        let v: serde_json::Value = serde_json::from_slice(&good).unwrap();
        let case = |name: &str, bytes: &[u8], code: i32, why: &str| {
            write_private(&f.path(name), bytes);
            let err = f.refused(name, code);
            assert!(err.contains(why), "{name}: {err} should say {why:?}");
        };
        // One byte of the private blob flipped: the TPM's integrity check refuses it.
        let mut x = v.clone();
        let mut private = hex::decode(x["private"].as_str().unwrap()).unwrap();
        let mid = private.len() / 2;
        private[mid] ^= 0x01;
        x["private"] = hex::encode(&private).into();
        case(
            "flipped-private.json",
            x.to_string().as_bytes(),
            4,
            "this TPM does not load it",
        );
        // One byte of the public blob's policy flipped.
        let mut x = v.clone();
        let mut public = hex::decode(x["public"].as_str().unwrap()).unwrap();
        let n = public.len();
        public[n - 40] ^= 0x01;
        x["public"] = hex::encode(&public).into();
        case(
            "flipped-public.json",
            x.to_string().as_bytes(),
            1,
            "TPM-sealed key file",
        );
        case(
            "truncated.json",
            &good[..good.len() / 2],
            1,
            "not a sealfs TPM-sealed key file",
        );
        let mut x = v.clone();
        x["note"] = "hello".into();
        case("unknown.json", x.to_string().as_bytes(), 1, "unknown field");
        let mut big = good.clone();
        big.resize(9000, b' ');
        case("big.json", &big, 1, "longer than 8192 bytes");
        let mut x = v.clone();
        x["pcr_bank"] = "sha1".into();
        case(
            "bank.json",
            x.to_string().as_bytes(),
            1,
            "pcr_values entry is not 20 hex bytes",
        );

        std::os::unix::fs::symlink(f.path("out.json"), f.path("link.json")).unwrap();
        let err = f.refused("link.json", 1);
        assert!(err.contains("symbolic link"), "{err}");
        write_private(&f.path("loose.json"), &good);
        std::fs::set_permissions(f.path("loose.json"), std::fs::Permissions::from_mode(0o644))
            .unwrap();
        let err = f.refused("loose.json", 1);
        assert!(err.contains("mode 0644"), "{err}");
        // The untouched file still opens: the refusals were about the bytes.
        f.verify("out.json", 0);
    }

    /// swtpm over TCP has no resource manager and 3 transient object slots: 12 unseals in
    /// a row, and 6 that fail after the primary (a foreign blob) or the load (a changed
    /// PCR after a fresh seal), leave nothing loaded. Also the timing of one TPM unseal
    /// against the same `verify` with the key file itself.
    #[test]
    fn many_unseals_in_a_row_leave_no_transient_object() {
        let f = Fixture::new();
        let other = Swtpm::start();
        f.seal(&other, "other.json", 0);
        let timed = |key: &str| {
            let start = Instant::now();
            f.run_on(&f.tpm, &["verify", &f.p("sealed"), "--key", key], 0);
            start.elapsed()
        };
        let (mut tpm, mut file) = (Vec::new(), Vec::new());
        for i in 0..12 {
            tpm.push(timed(&f.tpm_key("out.json")));
            file.push(timed(&f.site.key()));
            if i % 2 == 0 {
                f.refused("other.json", 4);
            }
        }
        assert_eq!(f.tpm.held().trim(), "", "transient handles left in the TPM");
        tpm.sort();
        file.sort();
        eprintln!(
            "verify of 3 files (2.5 MiB): median {:?} with tpm2: (swtpm), {:?} with file:; \
             one TPM unseal ~ {:?}",
            tpm[6],
            file[6],
            tpm[6].saturating_sub(file[6])
        );
    }

    /// `tpm2 seal` never overwrites OUT, seals only a sealfs key file (0600, a key line),
    /// and with no TPM there fails in one line without writing OUT.
    #[test]
    fn seal_refuses_to_overwrite_and_refuses_what_is_not_a_key_file() {
        let f = Fixture::new();
        let before = std::fs::read(f.path("out.json")).unwrap();
        let err = f.seal(&f.tpm, "out.json", 1);
        assert!(
            err.contains("already exists; refusing to overwrite it"),
            "{err}"
        );
        assert_eq!(std::fs::read(f.path("out.json")).unwrap(), before);

        let sealing = |key: &str, out: &str, code: i32| {
            let o = f.run_on(
                &f.tpm,
                &[
                    "tpm2",
                    "seal",
                    "--key-file",
                    &f.p(key),
                    "--pcrs",
                    PCRS,
                    &f.p(out),
                ],
                code,
            );
            assert!(!f.path(out).exists(), "{out} written");
            assert_eq!(stderr(&o).lines().count(), 1, "{}", stderr(&o));
            stderr(&o)
        };
        write_private(&f.path("notakey"), b"just some text, not a key\n");
        let err = sealing("notakey", "x1.json", 1);
        assert!(err.contains("not a sealfs key file"), "{err}");
        f.site
            .write("open.key", &std::fs::read(f.path("k")).unwrap());
        std::fs::set_permissions(f.path("open.key"), std::fs::Permissions::from_mode(0o644))
            .unwrap();
        let err = sealing("open.key", "x2.json", 1);
        assert!(err.contains("mode 0644"), "{err}");
        let err = sealing("src/a.bin", "x3.json", 1);
        assert!(err.contains("key file"), "{err}");

        // No TPM at that address: an outage, one line, nothing written.
        let gone = vec![(s("SEALFS_TPM2_TCTI"), s("swtpm:host=127.0.0.1,port=1"))];
        let o = sealfs(
            &[
                "tpm2",
                "seal",
                "--key-file",
                &f.p("k"),
                "--pcrs",
                PCRS,
                &f.p("x4.json"),
            ],
            &gone,
        );
        let err = expect_code(&o, 4);
        assert!(
            err.contains("TPM unavailable at swtpm:host=127.0.0.1,port=1"),
            "{err}"
        );
        assert!(!f.path("x4.json").exists());
        let o = sealfs(
            &["verify", &f.p("sealed"), "--key", &f.tpm_key("out.json")],
            &gone,
        );
        let err = expect_code(&o, 4);
        assert_eq!(stderr(&o).lines().count(), 1, "{err}");
        assert!(err.contains("TPM unavailable"), "{err}");

        // A bad selection is a usage error.
        let o = sealfs(
            &[
                "tpm2",
                "seal",
                "--key-file",
                &f.p("k"),
                "--pcrs",
                "sha256:24",
                &f.p("x5.json"),
            ],
            &f.tpm.env(),
        );
        expect_code(&o, 2);
    }
}
