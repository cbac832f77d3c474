//! SEV-SNP evidence from configfs-tsm (keys/snp.rs), hostile: the kernel's (the host's)
//! report and certificate table bytes. Never panics, never reads past the blob; errors are
//! one line.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Err(e) = sealfs::fuzzing::snp_evidence(data) {
        assert!(!e.contains('\n'), "{e}");
    }
});
