//! The Prometheus exposition of a mount's counters (`--metrics-addr`; docs/OPERATIONS.md),
//! encoded by `prometheus-client` (text format 0.0.4). A [`Collector`] reads the mount's own
//! atomics at each scrape, so the read path keeps its plain counters; the metric names are
//! those of 0.1 (counters end in `_total`, which the encoder adds).

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

use super::{Op, SealFs};
use crate::calls::Buckets;

type Fmt = Result<(), std::fmt::Error>;

const NO_LABELS: [(&str, &str); 0] = [];

/// The mount, as a collector.
struct Mount(Arc<SealFs>);

impl std::fmt::Debug for Mount {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Mount")
    }
}

/// One family: `name` (a counter gets `_total` from the encoder) and its rows.
fn family<S: EncodeLabelSet>(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    kind: MetricType,
    rows: &[(S, u64)],
) -> Fmt {
    let mut m = enc.encode_descriptor(name, help, None, kind)?;
    for (labels, v) in rows {
        let mut f = m.encode_family(labels)?;
        match kind {
            MetricType::Counter => f.encode_counter::<NoLabelSet, _, u64>(v, None)?,
            _ => f.encode_gauge(&(*v as i64))?,
        }
    }
    Ok(())
}

fn histograms<S: EncodeLabelSet>(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    rows: &[(S, Buckets)],
) -> Fmt {
    let mut m = enc.encode_descriptor(name, help, None, MetricType::Histogram)?;
    for (labels, b) in rows {
        m.encode_family(labels)?
            .encode_histogram::<NoLabelSet>(b.sum, b.count, &b.counts, None)?;
    }
    Ok(())
}

/// One row per FUSE operation, labelled `op`, with `f` of its stats.
fn per_op<T>(s: &super::Stats, f: impl Fn(&super::OpStats) -> T) -> Vec<([(&str, &str); 1], T)> {
    Op::ALL
        .iter()
        .map(|op| ([("op", op.name())], f(&s.ops[*op as usize])))
        .collect()
}

impl Collector for Mount {
    fn encode(&self, mut enc: DescriptorEncoder) -> Fmt {
        let fs = &self.0;
        let s = &fs.stats;
        let c = fs.cache.stats();
        use MetricType::{Counter, Gauge};
        family(
            &mut enc,
            "sealfs_fuse_ops",
            "FUSE operations handled.",
            Counter,
            &per_op(s, |o| o.calls.load(Relaxed)),
        )?;
        family(
            &mut enc,
            "sealfs_fuse_op_errors",
            "FUSE operations answered with an error.",
            Counter,
            &per_op(s, |o| o.errors.load(Relaxed)),
        )?;
        histograms(
            &mut enc,
            "sealfs_fuse_op_seconds",
            "FUSE operation latency.",
            &per_op(s, |o| o.latency.buckets()),
        )?;
        let single: [(&str, MetricType, &str, u64); 13] = [
            (
                "sealfs_bytes_served",
                Counter,
                "Plaintext bytes returned to readers.",
                s.bytes_served.load(Relaxed),
            ),
            (
                "sealfs_cache_hits",
                Counter,
                "Chunk lookups served from the locked cache.",
                c.hits,
            ),
            (
                "sealfs_cache_misses",
                Counter,
                "Chunks that had to be fetched.",
                c.misses,
            ),
            (
                "sealfs_cache_evictions",
                Counter,
                "Chunks evicted (and zeroized).",
                c.evictions,
            ),
            (
                "sealfs_cache_chunks",
                Gauge,
                "Decrypted chunks held now.",
                c.ready as u64,
            ),
            (
                "sealfs_cache_locked_bytes",
                Gauge,
                "Locked memory of the chunk cache.",
                (fs.cache.slots() * fs.cache.slot_size()) as u64,
            ),
            (
                "sealfs_chunk_fetches",
                Counter,
                "Ranged GETs of chunk runs.",
                s.fetches.load(Relaxed),
            ),
            (
                "sealfs_fetched_bytes",
                Counter,
                "Ciphertext bytes received.",
                s.fetched_bytes.load(Relaxed),
            ),
            (
                "sealfs_auth_failures",
                Counter,
                "Chunks that failed authentication.",
                s.auth_failures.load(Relaxed),
            ),
            (
                "sealfs_dek_unwraps",
                Counter,
                "DEKs unwrapped (a key provider call or a local key).",
                s.dek_unwraps.load(Relaxed),
            ),
            (
                "sealfs_revocations",
                Counter,
                "Held DEKs revoked (a provider refusal at revalidation, or `sealfs revoke`).",
                s.revocations.load(Relaxed),
            ),
            (
                "sealfs_deks_held",
                Gauge,
                "Unwrapped DEKs held now.",
                fs.deks_held() as u64,
            ),
            (
                "sealfs_files",
                Gauge,
                "Inodes in the listed tree.",
                fs.file_count() as u64,
            ),
        ];
        for (name, kind, help, v) in single {
            family(&mut enc, name, help, kind, &[(NO_LABELS, v)])?;
        }
        // `--cache-dir` (only when it is on).
        if let Some(d) = &fs.disk {
            let d = &d.stats;
            let disk: [(&str, MetricType, &str, u64); 9] = [
                ("sealfs_disk_cache_hits", Counter, "Chunks read from the cache directory.", d.hits.load(Relaxed)),
                ("sealfs_disk_cache_misses", Counter, "Cache directory lookups that found no entry.", d.misses.load(Relaxed)),
                ("sealfs_disk_cache_read_bytes", Counter, "Sealed bytes read from the cache directory.", d.read_bytes.load(Relaxed)),
                ("sealfs_disk_cache_writes", Counter, "Entries written to the cache directory.", d.written.load(Relaxed)),
                ("sealfs_disk_cache_written_bytes", Counter, "Sealed bytes written to the cache directory.", d.written_bytes.load(Relaxed)),
                ("sealfs_disk_cache_evictions", Counter, "Entries this daemon deleted to keep the directory under its size.", d.evictions.load(Relaxed)),
                ("sealfs_disk_cache_corrupt", Counter, "Entries that were not the chunk their name says (deleted, read from the store).", d.corrupt.load(Relaxed)),
                ("sealfs_disk_cache_write_skips", Counter, "Chunks not written: queue full or writing paused.", d.write_skips.load(Relaxed)),
                ("sealfs_disk_cache_write_errors", Counter, "Writes that failed (each pauses writing).", d.write_errors.load(Relaxed)),
            ];
            for (name, kind, help, v) in disk {
                family(&mut enc, name, help, kind, &[(NO_LABELS, v)])?;
            }
        }
        histograms(
            &mut enc,
            "sealfs_chunk_fetch_seconds",
            "Ranged GET runs, request to last chunk authenticated.",
            &[(NO_LABELS, s.fetch_latency.buckets())],
        )?;
        // S3, KMS and key-provider calls by operation and outcome, and their latency.
        let rows = crate::calls::snapshot();
        let requests: Vec<_> = rows
            .iter()
            .flat_map(|((service, op), outcomes, _)| {
                outcomes.iter().map(move |(outcome, n)| {
                    (
                        [("service", *service), ("op", *op), ("outcome", *outcome)],
                        *n,
                    )
                })
            })
            .collect();
        family(
            &mut enc,
            "sealfs_requests",
            "S3, KMS and key-provider calls by operation and outcome (SDK retries inside).",
            Counter,
            &requests,
        )?;
        let latency: Vec<_> = rows
            .into_iter()
            .map(|((service, op), _, b)| ([("service", service), ("op", op)], b))
            .collect();
        histograms(
            &mut enc,
            "sealfs_request_seconds",
            "S3, KMS and key-provider call latency (for GETs: to the response headers).",
            &latency,
        )
    }
}

/// The metrics page, in the Prometheus text format 0.0.4.
pub fn render(fs: &Arc<SealFs>) -> String {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(Mount(fs.clone())));
    let mut out = String::new();
    // Writing into a String cannot fail.
    let _ = prometheus_client::encoding::prometheus_text::encode(&mut out, &registry);
    out
}
