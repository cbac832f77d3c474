//! Control-socket requests (`sealfs revoke`): any bytes a local peer sends reach the real
//! daemon side (`fuse::control::serve`, then the key URI parsers), for a mount given a key
//! file and a share set. Never panics; the answer is one line, bounded, without control
//! characters, `revoked N` or `error: …`, and a well-formed request names the mount's keys.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let answer = sealfs::fuzzing::control_request(data);
    let text = std::str::from_utf8(&answer).expect("a UTF-8 answer");
    let line = text.strip_suffix('\n').expect("one answer line");
    assert!(line.len() <= 512, "{line:?}");
    assert!(!line.chars().any(char::is_control), "{line:?}");
    assert!(
        line.starts_with("error: ") || line.starts_with("revoked "),
        "{line:?}"
    );
    // The line the daemon reads: up to the first newline, within its bound.
    let first = &data[..data.len().min(4096)];
    let first = &first[..first
        .iter()
        .position(|&b| b == b'\n')
        .map_or(first.len(), |i| i + 1)];
    if let Ok(req) = std::str::from_utf8(first) {
        let req = req.trim_end();
        let known = req == "revoke all"
            || sealfs::fuzzing::control_key_ids()
                .iter()
                .any(|id| req == format!("revoke key {id}"));
        if known {
            assert_eq!(line, "revoked 0", "{req:?}");
        }
    }
});
