//! What packaging ships beside the binary, generated from the clap definitions in this
//! module's parent so it can never drift from the CLI: man pages (`clap_mangen`, one per
//! command: `sealfs.1`, `sealfs-mount.1`, …) and shell completions (`clap_complete`: bash,
//! zsh, fish). Run as `sealfs __generate DIR` (scripts/package.sh), so the pages describe
//! exactly the binary that is packaged; that verb is not a clap subcommand, so no page, help
//! text or completion offers it. And the long `--version` text.

use std::path::{Path, PathBuf};

use clap::CommandFactory;
use clap_complete::Shell;

use super::Cli;

/// The shells whose completions are packaged, with the file name each one's loader looks
/// for (bash-completion: the command name; zsh: `_sealfs`; fish: `sealfs.fish`).
pub const SHELLS: &[Shell] = &[Shell::Bash, Shell::Zsh, Shell::Fish];

/// The packaging verb: `sealfs __generate DIR`, exactly these two arguments.
pub const VERB: &str = "__generate";

/// `sealfs __generate DIR`: the files written, one a line; the exit code.
pub fn run(dir: &Path) -> i32 {
    match generate(dir) {
        Ok(files) => {
            for f in files {
                println!("{}", f.display());
            }
            crate::exit::OK
        }
        Err(e) => {
            eprintln!("sealfs: error: {}: {e}", dir.display());
            crate::exit::FAILURE
        }
    }
}

/// Writes `DIR/man/*.1` and `DIR/completions/*`; returns the files written.
pub fn generate(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let man = dir.join("man");
    let completions = dir.join("completions");
    std::fs::create_dir_all(&man)?;
    std::fs::create_dir_all(&completions)?;
    // The plain command: the long --version names the build host's AEAD backend, which has
    // no place in a man page read on another machine.
    clap_mangen::generate_to(Cli::command(), &man)?;
    let mut written: Vec<PathBuf> = std::fs::read_dir(&man)?
        .map(|e| e.map(|e| e.path()))
        .collect::<std::io::Result<_>>()?;
    written.sort();
    for shell in SHELLS {
        let mut cmd = Cli::command();
        written.push(clap_complete::generate_to(
            *shell,
            &mut cmd,
            "sealfs",
            &completions,
        )?);
    }
    Ok(written)
}

/// The text after `sealfs ` that `sealfs --version` prints: the crate version, the format
/// versions this build reads and writes, and the AES-GCM backend this process chose (which
/// runs the startup calibration of `crypto::aead::backend`, a few milliseconds).
pub fn long_version() -> String {
    let backend = crate::crypto::aead::backend().name();
    let how = if std::env::var_os("SEALFS_AEAD").is_some() {
        "set by SEALFS_AEAD"
    } else {
        "the faster on this CPU, measured at startup; SEALFS_AEAD=ring|aws-lc overrides"
    };
    format!(
        "{version}\n\
         format: sealed files v{format} (suite {suite}: AES-256-GCM chunks, HKDF-SHA256 keys), \
         manifests {manifest}, signatures {signature}; reads and writes exactly these\n\
         aead: {backend} ({how})",
        version = env!("CARGO_PKG_VERSION"),
        format = crate::format::VERSION,
        suite = crate::format::SUITE_AES256GCM_HKDF_SHA256,
        manifest = crate::manifest::FORMAT,
        signature = crate::manifest::SIG_FORMAT,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn man_pages_and_completions_cover_every_visible_command() {
        let dir = tempfile::tempdir().unwrap();
        let files = generate(dir.path()).unwrap();
        let names: Vec<String> = files
            .iter()
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        let cmd = Cli::command();
        let visible: Vec<&str> = cmd
            .get_subcommands()
            .filter(|s| !s.is_hide_set())
            .map(|s| s.get_name())
            .collect();
        assert!(visible.contains(&"mount") && visible.contains(&"seal"));
        for sub in &visible {
            let page = format!("sealfs-{sub}.1");
            assert!(names.contains(&page), "{page} missing in {names:?}");
            let text = std::fs::read_to_string(dir.path().join("man").join(&page)).unwrap();
            assert!(
                text.starts_with(".ie") || text.contains(".TH"),
                "{page}: {text}"
            );
        }
        let top = std::fs::read_to_string(dir.path().join("man/sealfs.1")).unwrap();
        let bash = std::fs::read_to_string(dir.path().join("completions/sealfs.bash")).unwrap();
        let zsh = std::fs::read_to_string(dir.path().join("completions/_sealfs")).unwrap();
        let fish = std::fs::read_to_string(dir.path().join("completions/sealfs.fish")).unwrap();
        for sub in &visible {
            assert!(
                top.contains(&format!("sealfs\\-{sub}(1)")),
                "sealfs.1 lacks {sub}"
            );
            for (shell, text) in [("bash", &bash), ("zsh", &zsh), ("fish", &fish)] {
                assert!(text.contains(sub), "{shell} completion lacks {sub}");
            }
        }
        // The mount page carries the fstab form, and a flag's help, from the definitions.
        let mount = std::fs::read_to_string(dir.path().join("man/sealfs-mount.1")).unwrap();
        assert!(mount.contains("fuse.sealfs"), "{mount}");
        assert!(mount.contains("cache\\-size"), "{mount}");
        // The packaging verb is offered nowhere.
        assert!(!names.iter().any(|n| n.contains("generate")), "{names:?}");
        for text in [&top, &bash, &zsh, &fish] {
            assert!(!text.contains(VERB));
        }
        // Nothing host-specific (the long version's backend) in a page.
        assert!(!top.contains("aead:"), "{top}");
    }

    #[test]
    fn long_version_names_formats_and_the_chosen_backend() {
        let v = long_version();
        assert!(v.starts_with(env!("CARGO_PKG_VERSION")), "{v}");
        assert!(v.contains("sealed files v1"), "{v}");
        assert!(v.contains("sealfs-manifest-v1"), "{v}");
        assert!(v.contains("sealfs-signature-v1"), "{v}");
        let chosen = crate::crypto::aead::backend().name();
        assert!(v.contains(&format!("aead: {chosen} (")), "{v}");
    }
}
