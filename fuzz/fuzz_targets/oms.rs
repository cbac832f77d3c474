//! OpenSSF Model Signing bundles (`model.sig` of a source directory, checked before a
//! signed seal): `sign::oms::Statement::verify`, then `check` against the model's files.
//! Mode byte bit 0 clear: the
//! rest is the bundle itself, which never verifies (the trusted key is made in this process);
//! set: the rest is a statement the trusted key signs, so that the statement's parsing and
//! the file checks are reached. Never panics.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    if mode & 1 == 0 {
        let r = sealfs::fuzzing::oms_bundle(rest);
        assert!(r.is_err(), "a bundle nobody trusted signed verified");
    } else {
        let _ = sealfs::fuzzing::oms_statement(rest);
    }
});
