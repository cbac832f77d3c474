//! Prometheus text exposition of a mount's counters (`--metrics-addr`; docs/OPERATIONS.md).

use std::fmt::Write;
use std::sync::atomic::Ordering::Relaxed;

use super::{Op, OpStats, SealFs};

/// Reads one per-operation counter.
type OpField = fn(&OpStats) -> u64;

/// The metrics page, in the Prometheus text format 0.0.4.
pub fn render(fs: &SealFs) -> String {
    let s = &fs.stats;
    let c = fs.cache.stats();
    let per_op: [(&str, &str, OpField); 3] = [
        ("sealfs_fuse_ops_total", "FUSE operations handled.", |o| {
            o.calls.load(Relaxed)
        }),
        (
            "sealfs_fuse_op_errors_total",
            "FUSE operations answered with an error.",
            |o| o.errors.load(Relaxed),
        ),
        (
            "sealfs_fuse_op_microseconds_total",
            "Time spent in FUSE operations (sum).",
            |o| o.micros.load(Relaxed),
        ),
    ];
    let single: [(&str, &str, &str, u64); 12] = [
        (
            "sealfs_bytes_served_total",
            "counter",
            "Plaintext bytes returned to readers.",
            s.bytes_served.load(Relaxed),
        ),
        (
            "sealfs_cache_hits_total",
            "counter",
            "Chunk lookups served from the locked cache.",
            c.hits,
        ),
        (
            "sealfs_cache_misses_total",
            "counter",
            "Chunks that had to be fetched.",
            c.misses,
        ),
        (
            "sealfs_cache_evictions_total",
            "counter",
            "Chunks evicted (and zeroized).",
            c.evictions,
        ),
        (
            "sealfs_cache_chunks",
            "gauge",
            "Decrypted chunks held now.",
            c.ready as u64,
        ),
        (
            "sealfs_cache_locked_bytes",
            "gauge",
            "Locked memory of the chunk cache.",
            (fs.cache.slots() * fs.cache.slot_size()) as u64,
        ),
        (
            "sealfs_chunk_fetches_total",
            "counter",
            "Ranged GETs of chunks.",
            s.fetches.load(Relaxed),
        ),
        (
            "sealfs_fetched_bytes_total",
            "counter",
            "Ciphertext bytes received.",
            s.fetched_bytes.load(Relaxed),
        ),
        (
            "sealfs_auth_failures_total",
            "counter",
            "Chunks that failed authentication.",
            s.auth_failures.load(Relaxed),
        ),
        (
            "sealfs_dek_unwraps_total",
            "counter",
            "DEKs unwrapped (KMS Decrypt or key file).",
            s.dek_unwraps.load(Relaxed),
        ),
        (
            "sealfs_deks_held",
            "gauge",
            "Unwrapped DEKs held now.",
            fs.deks_held() as u64,
        ),
        (
            "sealfs_files",
            "gauge",
            "Inodes in the listed tree.",
            fs.file_count() as u64,
        ),
    ];
    let mut out = String::new();
    for (name, help, value) in per_op {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
        for op in Op::ALL {
            let _ = writeln!(
                out,
                "{name}{{op=\"{}\"}} {}",
                op.name(),
                value(&s.ops[op as usize])
            );
        }
    }
    for (name, kind, help, value) in single {
        let _ = writeln!(
            out,
            "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}"
        );
    }
    out
}
