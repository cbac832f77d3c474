//! Mount options: a command line (NUL-separated arguments after `sealfs`) as mount(8),
//! mount.fuse3, fstab and unit files hand it over, through `cli::mount_opts::rewrite` (`-o`
//! lists, the helper form) and then clap with every value parser (sizes, durations, modes,
//! digests, key URIs). Never panics; the rewrite is idempotent and leaves no `-o` before a `--`;
//! its errors are one line.
#![no_main]
use libfuzzer_sys::fuzz_target;
use std::ffi::OsString;
use std::os::unix::ffi::OsStringExt;

fuzz_target!(|data: &[u8]| {
    let mut args = vec![OsString::from("sealfs")];
    args.extend(
        data.split(|&b| b == 0)
            .take(32)
            .map(|a| OsString::from_vec(a.to_vec())),
    );
    let out = sealfs::fuzzing::mount_args(args);
    match &out.rewritten {
        Ok(a) => {
            assert_eq!(
                sealfs::fuzzing::mount_rewrite(a.clone()).as_ref(),
                Ok(a),
                "the rewrite is not idempotent"
            );
            if a.get(1).is_some_and(|s| s == "mount") {
                // After `--` everything is a positional, `-o…` included (the CSI mounter's
                // `-- URI TARGET`).
                for x in a[2..].iter().take_while(|x| *x != "--") {
                    assert!(!x.to_str().is_some_and(|s| s.starts_with("-o")), "{a:?}");
                }
            }
        }
        Err(e) => assert!(!e.chars().any(char::is_control), "{e:?}"),
    }
});
