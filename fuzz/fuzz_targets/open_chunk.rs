//! Chunk opener on arbitrary ciphertext: never panics, never authenticates a forgery, and
//! leaves nothing of a failed chunk in the buffer.
#![no_main]
use libfuzzer_sys::fuzz_target;
use sealfs::crypto::{open_chunk, ChunkError, Dek, FileKeys};

fuzz_target!(|data: &[u8]| {
    if data.len() < 2 {
        return;
    }
    let keys = FileKeys::derive(
        &Dek::from_slice_zeroizing(&mut [0x42; 32]).unwrap(),
        &[7; 16],
    )
    .unwrap();
    let (index, last) = (data[0] as u64, data[1] & 1 == 1);
    let mut buf = data[2..].to_vec();
    let want = buf.len().saturating_sub(16);
    match open_chunk(&keys, &[9; 32], index, last, want, &mut buf) {
        Ok(_) => panic!("forged chunk authenticated"),
        Err(ChunkError::Auth(_)) => assert!(buf.iter().all(|&b| b == 0), "failed chunk not wiped"),
        Err(_) => {}
    }
});
