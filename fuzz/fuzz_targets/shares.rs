//! Share files (`shares:` keys): up to four files, NUL-separated after a flag byte, loaded
//! as `--key shares:…` loads them (`keys::shares::load`: parse, set checks, combination, key
//! check). Flag bit 0 recomputes each file's `check=` line, so that altered shares get past
//! the per-file check the way a deliberate attacker's would. Never panics; a combined key is
//! named `shares:K-of-N:<key check>`; an error is one line and never quotes a share value.
#![no_main]
use libfuzzer_sys::fuzz_target;

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).rposition(|w| w == needle)
}

fuzz_target!(|data: &[u8]| {
    let Some((&flags, rest)) = data.split_first() else {
        return;
    };
    let files: Vec<Vec<u8>> = rest
        .split(|&b| b == 0)
        .take(4)
        .map(|f| {
            if flags & 1 == 0 {
                return f.to_vec();
            }
            let body = match find(f, b"\ncheck=") {
                Some(i) => &f[..i + 1],
                None => f,
            };
            [body, &sealfs::fuzzing::share_check_line(body)].concat()
        })
        .collect();
    let refs: Vec<&[u8]> = files.iter().map(Vec::as_slice).collect();
    match sealfs::fuzzing::shares_load(&refs) {
        Ok(id) => {
            let rest = id.strip_prefix("shares:").expect("a shares: slot id");
            let (t, check) = rest.rsplit_once(':').expect("K-of-N:check");
            assert!(t.parse::<sealfs::keys::shares::Threshold>().is_ok(), "{id}");
            assert!(
                check.len() == 32 && check.bytes().all(|b| b.is_ascii_hexdigit()),
                "{id}"
            );
        }
        Err(e) => {
            assert!(!e.chars().any(char::is_control), "{e:?}");
            for f in &files {
                let share = f
                    .split(|&b| b == b'\n')
                    .find_map(|l| l.strip_prefix(b"share="))
                    .filter(|v| v.len() == 64);
                if let Some(v) = share {
                    let v = String::from_utf8_lossy(v);
                    assert!(!e.contains(&*v), "a share value in an error: {e}");
                }
            }
        }
    }
});
