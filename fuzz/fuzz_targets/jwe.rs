//! A KBS resource answer (keys/jwe.rs), hostile: `TeeKey::decrypt` of arbitrary bytes, and
//! of a valid JWE to the key with the input XORed into it. Never panics; errors are one
//! line; whatever opens is exactly the plaintext sealed (GCM and the key wrap leave no
//! other way through).
#![no_main]
use libfuzzer_sys::fuzz_target;
use sealfs::keys::jwe::{encrypt_for_tests, TeeKey};
use std::sync::OnceLock;

const PLAIN: &[u8] = b"sealfs-kek-v1:0000000000000000000000000000000000000000000000000000000000000000\n";

fn key() -> &'static (TeeKey, Vec<u8>) {
    static K: OnceLock<(TeeKey, Vec<u8>)> = OnceLock::new();
    K.get_or_init(|| {
        let k = TeeKey::generate().expect("locked memory");
        let jwe = encrypt_for_tests(&k.jwk(), PLAIN).to_string().into_bytes();
        (k, jwe)
    })
}

fuzz_target!(|data: &[u8]| {
    let (k, good) = key();
    let body = match data.split_first() {
        Some((0, rest)) => rest.to_vec(),
        Some((_, rest)) => {
            let mut b = good.clone();
            for (i, x) in rest.iter().enumerate() {
                let n = b.len();
                b[i % n] ^= x;
            }
            b
        }
        None => good.clone(),
    };
    match k.decrypt(&body) {
        Ok(p) => assert_eq!(p.bytes(), PLAIN, "something other than the sealed plaintext opened"),
        Err(e) => assert!(!e.to_string().contains('\n'), "{e}"),
    }
});
