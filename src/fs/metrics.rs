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
    let per_op: [(&str, &str, OpField); 2] = [
        ("sealfs_fuse_ops_total", "FUSE operations handled.", |o| {
            o.calls.load(Relaxed)
        }),
        (
            "sealfs_fuse_op_errors_total",
            "FUSE operations answered with an error.",
            |o| o.errors.load(Relaxed),
        ),
    ];
    let single: [(&str, &str, &str, u64); 13] = [
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
            "sealfs_revocations_total",
            "counter",
            "Held DEKs revoked (a provider refusal at revalidation, or `sealfs revoke`).",
            s.revocations.load(Relaxed),
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
    histogram_head(
        &mut out,
        "sealfs_fuse_op_seconds",
        "FUSE operation latency.",
    );
    for op in Op::ALL {
        let labels = format!("op=\"{}\"", op.name());
        histogram(
            &mut out,
            "sealfs_fuse_op_seconds",
            &labels,
            &s.ops[op as usize].latency,
        );
    }
    for (name, kind, help, value) in single {
        let _ = writeln!(
            out,
            "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}"
        );
    }
    histogram_head(
        &mut out,
        "sealfs_chunk_fetch_seconds",
        "Ranged GET runs, request to last chunk authenticated.",
    );
    histogram(&mut out, "sealfs_chunk_fetch_seconds", "", &s.fetch_latency);
    render_calls(&mut out);
    out
}

/// S3 and KMS calls by operation and outcome, and their latency ([`crate::calls`]).
fn render_calls(out: &mut String) {
    let rows = crate::calls::snapshot();
    let name = "sealfs_requests_total";
    let _ = writeln!(
        out,
        "# HELP {name} S3, KMS and key-provider calls by operation and outcome (SDK retries inside).\n# TYPE {name} counter"
    );
    for ((service, op), outcomes, _) in &rows {
        for (outcome, n) in outcomes {
            let _ = writeln!(
                out,
                "{name}{{service=\"{service}\",op=\"{op}\",outcome=\"{outcome}\"}} {n}"
            );
        }
    }
    let name = "sealfs_request_seconds";
    histogram_head(
        out,
        name,
        "S3 and KMS call latency (for GETs: to the response headers).",
    );
    for ((service, op), _, (buckets, sum)) in &rows {
        let labels = format!("service=\"{service}\",op=\"{op}\"");
        histogram_lines(out, name, &labels, buckets, *sum);
    }
}

fn histogram_head(out: &mut String, name: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
}

fn histogram(out: &mut String, name: &str, labels: &str, h: &crate::calls::Histogram) {
    let (buckets, sum) = h.snapshot();
    histogram_lines(out, name, labels, &buckets, sum);
}

/// `_bucket{…,le}` lines, then `_sum` and `_count` (the `+Inf` bucket).
fn histogram_lines(
    out: &mut String,
    name: &str,
    labels: &str,
    buckets: &[(String, u64)],
    sum: f64,
) {
    let sep = if labels.is_empty() { "" } else { "," };
    for (le, n) in buckets {
        let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"{le}\"}} {n}");
    }
    let count = buckets.last().map_or(0, |b| b.1);
    let braces = if labels.is_empty() {
        String::new()
    } else {
        format!("{{{labels}}}")
    };
    let _ = writeln!(
        out,
        "{name}_sum{braces} {sum}\n{name}_count{braces} {count}"
    );
}
