//! What filling one cache slot from a GET body costs, per way of doing it (issue 22, CPU
//! per byte): the body arrives in pieces (hyper hands out at most ~400 KiB at a time), and
//! the slots and pieces rotate over more memory than the CPU caches hold, as in a cold read.
//! `cargo bench --bench fill` (SEALFS_BENCH_SECS per row, default 1).
//!
//! - wipe + copy + open: zero the evicted slot, copy the pieces in, decrypt in place;
//! - copy + open: the same without zeroing bytes the copy overwrites;
//! - open_pieces (sealfs since session 14): each piece decrypted straight into the slot by
//!   aws-lc's streaming AES-GCM, then the tag checked; no copy and no wipe of bytes about to
//!   be overwritten.

use std::time::{Duration, Instant};

use sealfs::crypto::aead::{Backend, ChunkCipher};

const CHUNK: usize = 1 << 20;
const PIECE: usize = 408 << 10;
const SLOTS: usize = 64;
const BODIES: usize = 48;
const AAD: [u8; 41] = [7; 41];
const KEY: [u8; 32] = [3; 32];

fn nonce(i: u64) -> [u8; 12] {
    let mut n = [0u8; 12];
    n[..8].copy_from_slice(&i.to_be_bytes());
    n
}

/// GB/s of `f` (one chunk per call) for about SEALFS_BENCH_SECS.
fn measure(mut f: impl FnMut(usize)) -> f64 {
    let secs: f64 = std::env::var("SEALFS_BENCH_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1.0);
    for i in 0..SLOTS {
        f(i);
    }
    let start = Instant::now();
    let mut n = 0usize;
    while start.elapsed() < Duration::from_secs_f64(secs) {
        f(n);
        n += 1;
    }
    (n * CHUNK) as f64 / start.elapsed().as_secs_f64() / 1e9
}

/// `BODIES` sealed chunks (each ciphertext || tag), all under nonce 0: only the cost is
/// measured here, not the nonce discipline.
fn bodies(cipher: &ChunkCipher) -> Vec<Vec<u8>> {
    (0..BODIES)
        .map(|i| {
            let mut b = vec![i as u8; CHUNK];
            let tag = cipher.seal(&nonce(0), &AAD, &mut b);
            b.extend_from_slice(&tag);
            b
        })
        .collect()
}

/// The chunk as the body delivers it.
fn pieces(body: &[u8]) -> impl Iterator<Item = &[u8]> {
    body.chunks(PIECE)
}

fn main() {
    let cipher = ChunkCipher::with_backend(Backend::AwsLc, &KEY).unwrap();
    let bodies = bodies(&cipher);
    const STRIDE: usize = CHUNK + 4096;
    let mut slots = vec![0u8; SLOTS * STRIDE];
    fn slot(s: &mut [u8], i: usize) -> &mut [u8] {
        let at = (i % SLOTS) * STRIDE;
        &mut s[at..at + CHUNK + 16]
    }
    let copy_open = |dst: &mut [u8], body: &[u8]| {
        let mut at = 0;
        for p in pieces(body) {
            dst[at..at + p.len()].copy_from_slice(p);
            at += p.len();
        }
        assert_eq!(cipher.open(&nonce(0), &AAD, dst).ok(), Some(CHUNK));
    };
    println!(
        "| fill of a 1 MiB chunk from {} KiB pieces, aws-lc, one core | GB/s |",
        PIECE >> 10
    );
    println!("|---|---:|");
    type Fill<'a> = &'a dyn Fn(&mut [u8], usize);
    let rows: [(&str, Fill); 3] = [
        ("wipe + copy + open in place (sealfs before)", &|s, i| {
            let dst = slot(s, i);
            dst.fill(0);
            std::hint::black_box(&mut *dst);
            copy_open(dst, &bodies[i % BODIES]);
        }),
        ("copy + open in place", &|s, i| {
            copy_open(slot(s, i), &bodies[i % BODIES])
        }),
        (
            "open_pieces: decrypt each piece into the slot (sealfs now)",
            &|s, i| {
                let body = &bodies[i % BODIES];
                let p: Vec<&[u8]> = pieces(body).collect();
                let out = cipher.open_pieces(&nonce(0), &AAD, &p, slot(s, i));
                assert_eq!(out.ok(), Some(CHUNK));
            },
        ),
    ];
    for (name, f) in rows {
        let gbps = measure(|i| f(&mut slots, i));
        println!("| {name} | {gbps:.2} |");
    }
}
