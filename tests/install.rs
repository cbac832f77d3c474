//! What packaging relies on, through the built binary: `--version` names the formats and the
//! AEAD backend actually chosen, and `sealfs __generate DIR` writes the man pages and
//! completions the .deb ships without any user-facing surface offering it. The package and
//! the wheel themselves are built, installed and removed by scripts/package-test.sh.

mod common;

use common::*;

fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

#[test]
fn version_names_formats_and_the_backend_in_use() {
    let out = expect_code(&sealfs(&["--version"], &[]), 0);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 3, "{out}");
    assert_eq!(lines[0], format!("sealfs {}", env!("CARGO_PKG_VERSION")));
    assert!(lines[1].contains("sealed files v1"), "{out}");
    assert!(lines[1].contains("sealfs-manifest-v1"), "{out}");
    assert!(lines[1].contains("sealfs-signature-v1"), "{out}");
    assert!(
        lines[2].starts_with("aead: ring (") || lines[2].starts_with("aead: aws-lc-rs ("),
        "{out}"
    );
    // The line reports the backend in use, not a constant.
    for (var, name) in [("ring", "ring"), ("aws-lc", "aws-lc-rs")] {
        let out = expect_code(&sealfs(&["--version"], &env(&[("SEALFS_AEAD", var)])), 0);
        assert!(
            out.contains(&format!("aead: {name} (set by SEALFS_AEAD)")),
            "{var}: {out}"
        );
    }
    // -V stays the one line scripts parse.
    let out = expect_code(&sealfs(&["-V"], &[]), 0);
    assert_eq!(
        out.trim_end(),
        format!("sealfs {}", env!("CARGO_PKG_VERSION"))
    );
}

#[test]
fn generate_writes_pages_and_completions_and_is_offered_nowhere() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_str().unwrap();
    let out = expect_code(&sealfs(&["__generate", d], &[]), 0);
    for f in [
        "man/sealfs.1",
        "man/sealfs-mount.1",
        "man/sealfs-seal.1",
        "completions/sealfs.bash",
        "completions/_sealfs",
        "completions/sealfs.fish",
    ] {
        let p = dir.path().join(f);
        assert!(
            std::fs::metadata(&p).map(|m| m.len() > 0).unwrap_or(false),
            "{f} not written; output:\n{out}"
        );
        assert!(out.contains(p.to_str().unwrap()), "{f} not listed:\n{out}");
    }
    let help = expect_code(&sealfs(&["--help"], &[]), 0);
    assert!(!help.contains("generate"), "{help}");
    // Only the exact two-argument form: anything else is an ordinary (bad) command line.
    let out = expect_code(&sealfs(&["__generate"], &[]), 2);
    assert!(out.contains("unrecognized subcommand"), "{out}");
    // An unwritable DIR is one error line and exit 1.
    let file = dir.path().join("a-file");
    std::fs::write(&file, b"x").unwrap();
    let out = expect_code(&sealfs(&["__generate", file.to_str().unwrap()], &[]), 1);
    assert!(out.starts_with("sealfs: error: "), "{out}");
}
