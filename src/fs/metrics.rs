//! Prometheus text exposition of a mount's counters (`--metrics-addr`; docs/OPERATIONS.md).

use std::fmt::Write;
use std::sync::atomic::Ordering;

use super::{Op, SealFs};

/// The metrics page, in the Prometheus text format 0.0.4.
pub fn render(fs: &SealFs) -> String {
    let mut out = String::new();
    let mut metric = |name: &str, kind: &str, help: &str, samples: &[(String, u64)]| {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for (labels, v) in samples {
            let _ = writeln!(out, "{name}{labels} {v}");
        }
    };
    let one = |v: u64| vec![(String::new(), v)];
    let s = &fs.stats;
    let per_op = |f: &dyn Fn(&super::OpStats) -> u64| {
        Op::ALL
            .iter()
            .map(|op| (format!("{{op=\"{}\"}}", op.name()), f(&s.ops[*op as usize])))
            .collect::<Vec<_>>()
    };
    metric(
        "sealfs_fuse_ops_total",
        "counter",
        "FUSE operations handled.",
        &per_op(&|o| o.calls.load(Ordering::Relaxed)),
    );
    metric(
        "sealfs_fuse_op_errors_total",
        "counter",
        "FUSE operations answered with an error.",
        &per_op(&|o| o.errors.load(Ordering::Relaxed)),
    );
    metric(
        "sealfs_fuse_op_microseconds_total",
        "counter",
        "Time spent in FUSE operations (sum).",
        &per_op(&|o| o.micros.load(Ordering::Relaxed)),
    );
    metric(
        "sealfs_bytes_served_total",
        "counter",
        "Plaintext bytes returned to readers.",
        &one(s.bytes_served.load(Ordering::Relaxed)),
    );
    let c = fs.cache.stats();
    metric(
        "sealfs_cache_hits_total",
        "counter",
        "Chunk lookups served from the locked cache.",
        &one(c.hits),
    );
    metric(
        "sealfs_cache_misses_total",
        "counter",
        "Chunks that had to be fetched.",
        &one(c.misses),
    );
    metric(
        "sealfs_cache_evictions_total",
        "counter",
        "Chunks evicted (and zeroized).",
        &one(c.evictions),
    );
    metric(
        "sealfs_cache_chunks",
        "gauge",
        "Decrypted chunks held now.",
        &one(c.ready as u64),
    );
    metric(
        "sealfs_cache_locked_bytes",
        "gauge",
        "Locked memory of the chunk cache.",
        &one((fs.cache.slots() * fs.cache.slot_size()) as u64),
    );
    metric(
        "sealfs_chunk_fetches_total",
        "counter",
        "Ranged GETs of chunks.",
        &one(s.fetches.load(Ordering::Relaxed)),
    );
    metric(
        "sealfs_fetched_bytes_total",
        "counter",
        "Ciphertext bytes received.",
        &one(s.fetched_bytes.load(Ordering::Relaxed)),
    );
    metric(
        "sealfs_auth_failures_total",
        "counter",
        "Chunks that failed authentication.",
        &one(s.auth_failures.load(Ordering::Relaxed)),
    );
    metric(
        "sealfs_dek_unwraps_total",
        "counter",
        "DEKs unwrapped (KMS Decrypt or key file).",
        &one(s.dek_unwraps.load(Ordering::Relaxed)),
    );
    metric(
        "sealfs_deks_held",
        "gauge",
        "Unwrapped DEKs held now.",
        &one(fs.deks_held() as u64),
    );
    metric(
        "sealfs_files",
        "gauge",
        "Inodes in the listed tree.",
        &one(fs.file_count() as u64),
    );
    out
}
