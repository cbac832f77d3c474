//! Key object and prelude parsers: never panic, and the encoding is canonical (whatever
//! parses re-serializes to the same bytes, so no two encodings mean one header).
#![no_main]
use libfuzzer_sys::fuzz_target;
use sealfs::format::{KeyObject, Prelude};

fuzz_target!(|data: &[u8]| {
    if let Ok(ko) = KeyObject::parse(data) {
        assert_eq!(ko.to_bytes(), data, "non-canonical key object accepted");
        assert_eq!(ko.header.encode().unwrap(), ko.authenticated);
    }
    if let Ok(p) = Prelude::parse(data) {
        assert_eq!(&p.to_bytes()[..], &data[..32]);
    }
});
