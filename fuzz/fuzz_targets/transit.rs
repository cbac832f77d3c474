//! Transit (Vault / OpenBao) answers: a loopback server answers each call of a real
//! `TransitKey` (read, datakey, encrypt, decrypt, rewrap) with the fuzzed status and body,
//! and the same bytes go through the slot checks (`valid_ciphertext`, `parse_spec`). Input:
//! op byte, status byte, body. Never panics; only a 2xx answer succeeds, and a ciphertext
//! it returns is a valid one; a slot that is not a Transit ciphertext never reaches the
//! server; an error is one bounded line and never quotes the DEK of a 2xx answer.
#![no_main]
use libfuzzer_sys::fuzz_target;
use sealfs::keys::transit::{parse_spec, valid_ciphertext, MAX_CIPHERTEXT};

fuzz_target!(|data: &[u8]| {
    let [op, status, body @ ..] = data else {
        return;
    };
    let valid = valid_ciphertext(body);
    if valid {
        assert!(body.starts_with(b"vault:v") && body.len() <= MAX_CIPHERTEXT);
    }
    if let Some((mount, name)) = std::str::from_utf8(body).ok().and_then(parse_spec) {
        assert!(!mount.is_empty() && !mount.starts_with('/') && !mount.ends_with('/'));
        assert!(!name.is_empty() && !name.contains('/'));
    }
    let out = sealfs::fuzzing::transit_answer(*op, *status, body);
    let slot_only = op % 6 == 5;
    match &out.result {
        Ok(wrapped) => {
            assert!((200..300).contains(&out.status), "status {}", out.status);
            if let Some(w) = wrapped {
                assert!(valid_ciphertext(w), "an invalid ciphertext was returned");
            }
            if slot_only {
                assert!(valid, "an invalid slot was decrypted");
            }
        }
        Err(e) => {
            assert!(e.len() <= 2048 && !e.chars().any(char::is_control), "{e:?}");
            let dek = (!slot_only && (200..300).contains(&out.status))
                .then(|| sealfs::fuzzing::answer_plaintext(body))
                .flatten()
                .filter(|p| {
                    p.len() >= 16
                        && p.bytes()
                            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'/' | b'='))
                });
            if let Some(dek) = dek {
                assert!(!e.contains(&dek), "the answer's DEK is in the error {e:?}");
            }
        }
    }
    if slot_only && !valid {
        assert_eq!(out.calls, 0, "an invalid slot reached Transit");
    } else {
        assert_eq!(out.calls, 1, "calls per operation");
    }
});
