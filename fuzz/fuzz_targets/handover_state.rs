//! The state a predecessor daemon left in systemd's descriptor store or across a SIGHUP
//! re-exec (fuse/handover.rs): whoever can write the store hands the successor any bytes.
//! Parsed and restored as a successor does; never panics, and a restored tree is bounded.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(nodes) = sealfs::fuzzing::handover_state(data) {
        assert!(nodes >= 1, "a restored tree has its root");
        assert!(nodes <= data.len(), "{nodes} nodes from {} bytes", data.len());
    }
});
