//! Mount options in the fstab form, `-o name[=value],…`, mapped onto `sealfs mount` flags, and
//! the mount-helper calling convention. `mount -t fuse.sealfs SRC DIR -o OPTS` (fstab, `.mount`
//! units) runs `/sbin/mount.fuse3`, which runs `sealfs SRC DIR -o OPTS` through `/bin/sh`
//! (so `sealfs` must be on the default PATH). Both forms become `sealfs mount …` before clap
//! sees them, so every flag has exactly one meaning (docs/CLI.md "Mount options").

use std::ffi::OsString;

/// Generic options that mount(8) and mount.fuse3 add or that fstab lines carry. They are
/// accepted and ignored: sealfs always mounts read-only, nodev, nosuid and noatime (a `rw`
/// or `dev`/`suid` cannot weaken that), and `_netdev`/`nofail`/`auto` are for mount(8) and
/// systemd, which consume them before us or not at all.
const IGNORED: &[&str] = &[
    "rw", "ro", "dev", "nodev", "suid", "nosuid", "exec", "atime", "noatime", "relatime",
    "defaults", "auto", "noauto", "user", "users", "nouser", "_netdev", "nofail",
];

/// Rewrites the command line: the helper form gains the `mount` subcommand and every `-o`
/// list becomes long flags. An unknown or malformed option is an error naming it.
pub fn rewrite(args: Vec<OsString>, cli: &clap::Command) -> Result<Vec<OsString>, String> {
    let mut args = args;
    let first = args.get(1).and_then(|a| a.to_str());
    let is_sub = |name: &str| {
        name == "help"
            || cli
                .get_subcommands()
                .any(|s| s.get_name() == name || s.get_all_aliases().any(|a| a == name))
    };
    if let Some(f) = first {
        if !f.starts_with('-') && !is_sub(f) && args.len() >= 3 {
            args.insert(1, "mount".into());
        }
    }
    if args.get(1).and_then(|a| a.to_str()) != Some("mount") {
        return Ok(args);
    }
    let mount = cli
        .find_subcommand("mount")
        .expect("the mount subcommand exists");
    let mut out: Vec<OsString> = args[..2].to_vec();
    let mut it = args.into_iter().skip(2);
    while let Some(a) = it.next() {
        // After `--` everything is a positional (the CSI mounter's URI and target): never
        // an option list, whatever it starts with.
        if a == "--" {
            out.push(a);
            out.extend(it);
            break;
        }
        let list = match a.to_str() {
            Some("-o") => Some(
                it.next()
                    .ok_or("-o needs a list of options (name[=value],…)")?,
            ),
            Some(s) if s.starts_with("-o") => Some(OsString::from(&s[2..])),
            _ => None,
        };
        match list {
            Some(list) => {
                let list = list.to_str().ok_or("-o: options must be UTF-8")?.to_owned();
                for opt in list.split(',').filter(|o| !o.is_empty()) {
                    if let Some(flag) = to_flag(opt, cli, mount)? {
                        out.push(flag.into());
                    }
                }
            }
            None => out.push(a),
        }
    }
    Ok(out)
}

/// One `name[=value]` → `--name[=value]`, or `None` for an ignored generic option.
fn to_flag(
    opt: &str,
    cli: &clap::Command,
    mount: &clap::Command,
) -> Result<Option<String>, String> {
    let (name, value) = match opt.split_once('=') {
        Some((n, v)) => (n, Some(v)),
        None => (opt, None),
    };
    if value.is_none() && IGNORED.contains(&name) {
        return Ok(None);
    }
    let long = name.replace('_', "-");
    let arg = mount
        .get_arguments()
        .chain(cli.get_arguments().filter(|a| a.is_global_set()))
        .find(|a| {
            a.get_long() == Some(long.as_str()) && !matches!(long.as_str(), "help" | "version")
        })
        .ok_or_else(|| format!("unknown mount option {name:?} (see `sealfs mount --help`)"))?;
    let takes_value = arg.get_action().takes_values();
    match (takes_value, value) {
        (true, Some(v)) if !v.is_empty() => Ok(Some(format!("--{long}={v}"))),
        (true, _) => Err(format!("mount option {name:?} needs a value ({name}=…)")),
        (false, None) => Ok(Some(format!("--{long}"))),
        (false, Some(_)) => Err(format!("mount option {name:?} takes no value")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    fn rw(args: &[&str]) -> Result<Vec<String>, String> {
        let cli = crate::cli::Cli::command();
        rewrite(args.iter().map(OsString::from).collect(), &cli)
            .map(|v| v.into_iter().map(|a| a.into_string().unwrap()).collect())
    }

    #[test]
    fn after_a_double_dash_nothing_is_an_option_list() {
        // The CSI mounter's children: `… -- URI TARGET`, whatever the URI starts with.
        let out = rw(&[
            "sealfs",
            "mount",
            "--key=file:/k",
            "--",
            "-olog_file=/x",
            "/t",
        ])
        .unwrap();
        assert_eq!(
            out,
            [
                "sealfs",
                "mount",
                "--key=file:/k",
                "--",
                "-olog_file=/x",
                "/t"
            ]
        );
    }

    #[test]
    fn helper_form_gains_the_mount_subcommand_and_maps_options() {
        // Exactly what mount.fuse3 runs for an fstab line (it adds `rw`, `dev`, `suid`).
        let got = rw(&[
            "sealfs",
            "s3://b/p",
            "/models/x",
            "-o",
            "rw,key=kms:alias/a,key=file:/etc/sealfs/k,cache_size=4GiB,allow_other,list_ttl=0,dev,suid",
        ])
        .unwrap();
        assert_eq!(
            got,
            [
                "sealfs",
                "mount",
                "s3://b/p",
                "/models/x",
                "--key=kms:alias/a",
                "--key=file:/etc/sealfs/k",
                "--cache-size=4GiB",
                "--allow-other",
                "--list-ttl=0",
            ]
        );
    }

    #[test]
    fn subcommands_and_plain_flags_pass_through() {
        let plain = ["sealfs", "verify", "s3://b/p", "--key", "kms:k"];
        assert_eq!(rw(&plain).unwrap(), plain);
        let m = [
            "sealfs",
            "mount",
            "d",
            "/m",
            "--key",
            "file:/k",
            "--foreground",
        ];
        assert_eq!(rw(&m).unwrap(), m);
        assert_eq!(
            rw(&["sealfs", "--version"]).unwrap(),
            ["sealfs", "--version"]
        );
        // Joined `-oX`, globals (log format) and the unit's `--foreground` mixed in.
        assert_eq!(
            rw(&[
                "sealfs",
                "mount",
                "--foreground",
                "d",
                "/m",
                "-okey=file:/k,log_format=json,noexec"
            ])
            .unwrap(),
            [
                "sealfs",
                "mount",
                "--foreground",
                "d",
                "/m",
                "--key=file:/k",
                "--log-format=json",
                "--noexec"
            ]
        );
    }

    #[test]
    fn bad_options_are_named() {
        let e = rw(&["sealfs", "d", "/m", "-o", "key=file:/k,cache_sise=1G"]).unwrap_err();
        assert_eq!(
            e,
            "unknown mount option \"cache_sise\" (see `sealfs mount --help`)"
        );
        let e = rw(&["sealfs", "d", "/m", "-o", "cache_size"]).unwrap_err();
        assert_eq!(
            e,
            "mount option \"cache_size\" needs a value (cache_size=…)"
        );
        let e = rw(&["sealfs", "d", "/m", "-o", "allow_other=1"]).unwrap_err();
        assert_eq!(e, "mount option \"allow_other\" takes no value");
        let e = rw(&["sealfs", "d", "/m", "-o", "help"]).unwrap_err();
        assert!(e.starts_with("unknown mount option \"help\""), "{e}");
        let e = rw(&["sealfs", "mount", "d", "/m", "-o"]).unwrap_err();
        assert!(e.starts_with("-o needs"), "{e}");
        // An ignored generic name with a value is not silently dropped.
        let e = rw(&["sealfs", "d", "/m", "-o", "rw=1"]).unwrap_err();
        assert!(e.starts_with("unknown mount option \"rw\""), "{e}");
    }

    #[test]
    fn shipped_examples_map_cleanly() {
        // systemd/llama3.conf, the .mount unit's Options= and the fstab line: every option in
        // them is one sealfs knows (a renamed flag breaks this test, not a boot).
        let conf = include_str!("../../systemd/llama3.conf");
        let unit = include_str!("../../systemd/models-llama3.mount");
        let fstab = include_str!("../../systemd/fstab.example");
        let mut lists: Vec<&str> = conf
            .lines()
            .filter_map(|l| l.strip_prefix("SEALFS_OPTIONS="))
            .chain(unit.lines().filter_map(|l| l.strip_prefix("Options=")))
            .collect();
        lists.extend(
            fstab
                .lines()
                .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
                .map(|l| l.split_whitespace().nth(3).unwrap()),
        );
        assert_eq!(lists.len(), 3, "{lists:?}");
        for opts in lists {
            let got = rw(&["sealfs", "s3://b/p", "/models/x", "-o", opts]).unwrap();
            assert!(
                got.contains(&"--key=kms:alias/models-prod".to_string()),
                "{got:?}"
            );
        }
    }
}
