//! PKCS#11 URIs (RFC 7512) and the key and signer URIs that carry them (`--key`, `--sign`,
//! `--trust-signer`, unit files, fstab lines). Never panics; anything naming `pin-value` is
//! refused, and no refusal quotes the PIN it names; an error is one line; an accepted URI's
//! key id parses back to the same key id.
#![no_main]
use libfuzzer_sys::fuzz_target;
use sealfs::keys::pkcs11::Pkcs11Uri;
use sealfs::keys::KeySpec;
use sealfs::sign::SignerSpec;

/// The value of a `pin-value=` attribute, when it is distinctive (alphanumeric, 8 or more
/// characters, nowhere else in the URI).
fn pin_in(s: &str) -> Option<&str> {
    let i = s.to_ascii_lowercase().find("pin-value=")? + "pin-value=".len();
    let v = &s[i..];
    let v = &v[..v.find([';', '&', '?']).unwrap_or(v.len())];
    (v.len() >= 8 && v.bytes().all(|b| b.is_ascii_alphanumeric()) && s.matches(v).count() == 1)
        .then_some(v)
}

/// A refusal is one line, and the same whatever PIN the URI names (so it quotes none).
fn check_error<T, E: std::fmt::Display>(s: &str, e: &E, parse: fn(&str) -> Result<T, E>) {
    let e = e.to_string();
    assert!(!e.chars().any(char::is_control), "{e:?}");
    if let Some(pin) = pin_in(s) {
        let other = s.replacen(pin, &"Q".repeat(pin.len()), 1);
        let e2 = parse(&other).err().map(|e| e.to_string());
        assert_eq!(
            Some(&e),
            e2.as_ref(),
            "{s:?}: the refusal depends on the PIN"
        );
    }
}

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    let named_pin = s.to_ascii_lowercase().contains("pin-value");
    let uri = s.parse::<Pkcs11Uri>();
    match &uri {
        Ok(u) => {
            assert!(!named_pin, "{s:?}: pin-value accepted");
            assert!(u.module_path.is_absolute());
            let id = u.key_id();
            // A key id naming pin-value (percent-encoded in the URI) is refused when read
            // back, by design: it is compared, never parsed, in slots.
            if !id.to_ascii_lowercase().contains("pin-value") {
                let back: Pkcs11Uri = format!("{id}?module-path=/m.so")
                    .parse()
                    .unwrap_or_else(|e| panic!("{s:?}: key id {id:?} does not parse: {e}"));
                assert_eq!(back.key_id(), id, "{s:?}");
                assert_eq!((&back.token, &back.serial), (&u.token, &u.serial));
                assert_eq!((&back.object, &back.id), (&u.object, &u.id));
            }
        }
        Err(e) => check_error(s, e, str::parse::<Pkcs11Uri>),
    }
    match s.parse::<KeySpec>() {
        Ok(KeySpec::Pkcs11(k)) => assert_eq!(Some(&*k), uri.as_ref().ok(), "{s:?}"),
        Ok(_) => {}
        Err(e) => check_error(s, &e, str::parse::<KeySpec>),
    }
    match s.parse::<SignerSpec>() {
        Ok(SignerSpec::Pkcs11(k)) => assert_eq!(Some(&*k), uri.as_ref().ok(), "{s:?}"),
        Ok(_) => {}
        Err(e) => check_error(s, &e, str::parse::<SignerSpec>),
    }
});
