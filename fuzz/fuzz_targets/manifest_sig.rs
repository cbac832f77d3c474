//! Publisher signature objects (`ROOT/.sealfs-manifest.sig`, clear JSON anyone with write
//! access to the bucket can replace): `SignatureObject::parse` never panics, what it accepts
//! re-encodes to the same value, and `check` never accepts a signature the trusted key
//! (made in this process, signing nothing) did not make.
#![no_main]
use libfuzzer_sys::fuzz_target;
use sealfs::manifest::SignatureObject;

fuzz_target!(|data: &[u8]| {
    let root = "models/llama3";
    let Ok(s) = SignatureObject::parse(data, root) else {
        return;
    };
    assert_eq!(
        SignatureObject::parse(&sealfs::fuzzing::to_json(&s), root).as_ref(),
        Ok(&s),
        "the re-encoded signature object differs"
    );
    let r = sealfs::fuzzing::signature_check(&s, root);
    assert!(r.is_err(), "a forged signature was accepted: {r:?}");
});
