//! AES-256-GCM open/seal throughput, one core, per crate and chunk size, with sealfs's
//! exact chunk shape (in-place, 41-byte AAD, derived nonce). Picks the AEAD backend:
//! `cargo bench --bench aead` (SEALFS_BENCH_SECS per cell, default 0.5).
//!
//! Also times the whole sealfs chunk path (`crypto::open_chunk`) with the backend the
//! process picked, to show the choice and that the wrapper costs nothing.

use std::time::{Duration, Instant};

const SIZES: [usize; 3] = [64 << 10, 1 << 20, 4 << 20];
const AAD: [u8; 41] = [7; 41];

use sealfs::crypto::aead::{Backend, ChunkCipher};

fn nonce(i: u64) -> [u8; 12] {
    let mut n = [0u8; 12];
    n[..8].copy_from_slice(&i.to_be_bytes());
    n
}

/// GB/s of `f` over `size`-byte buffers for about `secs` seconds.
fn measure(size: usize, mut f: impl FnMut(u64)) -> f64 {
    let secs: f64 = std::env::var("SEALFS_BENCH_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0.5);
    f(0); // warm up
    let start = Instant::now();
    let mut n = 0u64;
    while start.elapsed() < Duration::from_secs_f64(secs) {
        n += 1;
        f(n);
    }
    (n as f64 * size as f64) / start.elapsed().as_secs_f64() / 1e9
}

/// ring and aws-lc through sealfs's own backend switch (ring's `LessSafeKey`, or aws-lc's
/// `EVP_AEAD_CTX`, each in locked memory), so these rows are exactly what the mount runs.
fn backend_row(b: Backend, size: usize) -> (f64, f64) {
    let key = ChunkCipher::with_backend(b, &[3; 32]).unwrap();
    let mut buf = vec![5u8; size + 16];
    let seal = measure(size, |i| {
        let (d, t) = buf.split_at_mut(size);
        t.copy_from_slice(&key.seal(&nonce(i), &AAD, d));
    });
    let (d, t) = buf.split_at_mut(size);
    t.copy_from_slice(&key.seal(&nonce(0), &AAD, d));
    let sealed = buf.clone();
    // Open is in place, so each pass first restores the ciphertext (the memcpy row shows
    // what that copy costs; it is the same for every crate).
    let mut work = sealed.clone();
    let open = measure(size, |_| {
        work.copy_from_slice(&sealed);
        key.open(&nonce(0), &AAD, &mut work).unwrap();
    });
    (seal, open)
}

fn aesgcm_row(size: usize) -> (f64, f64) {
    use aes_gcm::aead::{AeadInPlace, KeyInit};
    use aes_gcm::{Aes256Gcm, Nonce};
    let key = Aes256Gcm::new_from_slice(&[3; 32]).unwrap();
    let mut buf = vec![5u8; size];
    let seal = measure(size, |i| {
        let n = nonce(i);
        key.encrypt_in_place_detached(Nonce::from_slice(&n), &AAD, &mut buf)
            .unwrap();
    });
    let n = nonce(0);
    let mut data = vec![5u8; size];
    let tag = key
        .encrypt_in_place_detached(Nonce::from_slice(&n), &AAD, &mut data)
        .unwrap();
    let mut work = data.clone();
    let open = measure(size, |_| {
        work.copy_from_slice(&data);
        key.decrypt_in_place_detached(Nonce::from_slice(&n), &AAD, &mut work, &tag)
            .unwrap();
    });
    (seal, open)
}

fn sealfs_open_row(size: usize) -> f64 {
    use sealfs::crypto::{open_chunk, seal_chunk, Dek, FileKeys};
    let keys =
        FileKeys::derive(&Dek::from_slice_zeroizing(&mut [9; 32]).unwrap(), &[1; 16]).unwrap();
    let hd = [2u8; 32];
    let mut sealed = vec![5u8; size + 16];
    seal_chunk(&keys, &hd, 3, false, &mut sealed);
    let mut work = sealed.clone();
    measure(size, |_| {
        work.copy_from_slice(&sealed);
        open_chunk(&keys, &hd, 3, false, size, &mut work).unwrap();
    })
}

fn memcpy_row(size: usize) -> f64 {
    let src = vec![5u8; size];
    let mut dst = vec![0u8; size];
    measure(size, |i| {
        dst.copy_from_slice(&src);
        dst[0] = i as u8;
        std::hint::black_box(&dst);
    })
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    // `cargo test --all-targets` runs this without `--bench`: a short smoke pass only.
    if !std::env::args().any(|a| a == "--bench") {
        std::env::set_var("SEALFS_BENCH_SECS", "0.01");
    }
    println!("AES-256-GCM, one core, GB/s (1e9 B/s); open includes one memcpy of the chunk");
    println!(
        "| crate | op | {} |",
        SIZES.map(|s| format!("{} KiB", s >> 10)).join(" | ")
    );
    println!("|---|---|{}", "---:|".repeat(SIZES.len()));
    let mut rows: Vec<(&str, &str, Vec<f64>)> = Vec::new();
    let cols = |f: &dyn Fn(usize) -> f64| SIZES.iter().map(|&s| f(s)).collect::<Vec<_>>();
    rows.push(("memcpy", "copy", cols(&memcpy_row)));
    let (r, a, g): (Vec<_>, Vec<_>, Vec<_>) = (
        SIZES
            .iter()
            .map(|&s| backend_row(Backend::Ring, s))
            .collect(),
        SIZES
            .iter()
            .map(|&s| backend_row(Backend::AwsLc, s))
            .collect(),
        SIZES.iter().map(|&s| aesgcm_row(s)).collect(),
    );
    for (name, v) in [("ring 0.17", &r), ("aws-lc-rs 1", &a), ("aes-gcm 0.10", &g)] {
        rows.push((name, "seal", v.iter().map(|x| x.0).collect()));
        rows.push((name, "open", v.iter().map(|x| x.1).collect()));
    }
    // What `--trust-signer` adds per chunk: the digest of the sealed chunk, checked against
    // the signed manifest. BLAKE3 was chosen over SHA-256 by these rows.
    let sha = |f: fn(&[u8]) -> [u8; 32]| {
        move |size: usize| {
            let buf = vec![7u8; size + 16];
            measure(size, |_| {
                std::hint::black_box(f(&buf));
            })
        }
    };
    rows.push((
        "sha256 ring (sealfs)",
        "digest",
        cols(&sha(sealfs::crypto::sha256)),
    ));
    rows.push((
        "blake3 (sealfs chunk digest)",
        "digest",
        cols(&sha(sealfs::crypto::chunk_digest)),
    ));
    rows.push((
        "sha256 aws-lc-rs",
        "digest",
        cols(&sha(|b| {
            let d = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, b);
            let mut o = [0u8; 32];
            o.copy_from_slice(d.as_ref());
            o
        })),
    ));
    let chosen = sealfs::crypto::aead::backend().name();
    let label = format!("sealfs open_chunk (auto: {chosen})");
    rows.push((label.leak(), "open", cols(&sealfs_open_row)));
    for (name, op, v) in &rows {
        println!(
            "| {name} | {op} | {} |",
            v.iter()
                .map(|x| format!("{x:.2}"))
                .collect::<Vec<_>>()
                .join(" | ")
        );
    }
}
