//! Process-wide counts and latencies of calls to S3 and KMS, by operation and outcome, for
//! the metrics page. One count per SDK call as the SDK returns it: its own retries are inside
//! (a throttled call that succeeded on retry counts as `ok`, with the retries' time).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Mutex;
use std::time::Duration;

// The S3 and KMS crates re-export the same smithy types.
use aws_sdk_s3::error::{ProvideErrorMetadata, SdkError};

/// Upper bounds (seconds) of the latency histogram buckets; `+Inf` is implied.
pub const BUCKETS: [f64; 12] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0,
];

/// A Prometheus histogram: cumulative counts are computed when rendered.
#[derive(Debug, Default)]
pub struct Histogram {
    counts: [AtomicU64; BUCKETS.len() + 1],
    sum_micros: AtomicU64,
}

impl Histogram {
    pub fn observe(&self, d: Duration) {
        let s = d.as_secs_f64();
        let i = BUCKETS
            .iter()
            .position(|b| s <= *b)
            .unwrap_or(BUCKETS.len());
        self.counts[i].fetch_add(1, Relaxed);
        self.sum_micros.fetch_add(d.as_micros() as u64, Relaxed);
    }

    /// Per bucket `(upper bound, count)` (not cumulative: the exposition accumulates),
    /// ending with `+Inf`; the total count and the sum in seconds.
    pub fn buckets(&self) -> Buckets {
        let counts: Vec<(f64, u64)> = self
            .counts
            .iter()
            .enumerate()
            .map(|(i, c)| {
                (
                    BUCKETS.get(i).copied().unwrap_or(f64::INFINITY),
                    c.load(Relaxed),
                )
            })
            .collect();
        Buckets {
            count: counts.iter().map(|c| c.1).sum(),
            counts,
            sum: self.sum_micros.load(Relaxed) as f64 / 1e6,
        }
    }
}

/// (service, operation) → (outcome → count, latency).
type Table = BTreeMap<(&'static str, &'static str), (BTreeMap<&'static str, u64>, Histogram)>;

static CALLS: Mutex<Table> = Mutex::new(BTreeMap::new());

/// Records one call to `service` (`s3`, `kms`).
pub fn record(service: &'static str, op: &'static str, outcome: &'static str, took: Duration) {
    let mut t = CALLS.lock().unwrap_or_else(|p| p.into_inner());
    let (outcomes, hist) = t.entry((service, op)).or_default();
    *outcomes.entry(outcome).or_default() += 1;
    hist.observe(took);
}

/// One SDK call: timed and counted as `service`/`op` with the outcome of its result, and
/// its error mapped by `classify` under the same `op` name (so the metric and the error
/// message never disagree).
pub async fn call<T, E: ProvideErrorMetadata, R, X>(
    service: &'static str,
    op: &'static str,
    key: &str,
    fut: impl std::future::Future<Output = Result<T, SdkError<E, R>>>,
    classify: impl FnOnce(&'static str, &str, SdkError<E, R>) -> X,
) -> Result<T, X> {
    let start = std::time::Instant::now();
    let r = fut.await;
    let outcome = match &r {
        Ok(_) => "ok",
        Err(e) => outcome(e),
    };
    record(service, op, outcome, start.elapsed());
    r.map_err(|e| classify(op, key, e))
}

/// The kind of a failed SDK call: the `outcome` metric label (a small fixed set, so alerts
/// can match on it) and the one table of AWS error codes that `store::s3` and `keys::kms`
/// map onto their error variants.
pub fn outcome<E: ProvideErrorMetadata, R>(e: &SdkError<E, R>) -> &'static str {
    match e {
        SdkError::TimeoutError(_) => "timeout",
        SdkError::DispatchFailure(_) => "network",
        SdkError::ServiceError(se) => match se.err().code().unwrap_or("") {
            "SlowDown"
            | "Throttling"
            | "ThrottlingException"
            | "RequestLimitExceeded"
            | "TooManyRequestsException"
            | "ServiceUnavailable"
            | "LimitExceededException"
            // AWS: HTTP 500, "you can retry": an outage, never a refusal (a revalidation
            // must not revoke on it).
            | "KeyUnavailableException"
            | "KMSInternalException"
            | "DependencyTimeoutException" => "throttled",
            "AccessDenied"
            | "AccessDeniedException"
            | "IncorrectKeyException"
            | "Forbidden"
            | "InvalidAccessKeyId"
            | "SignatureDoesNotMatch" => "denied",
            "DisabledException" | "KMSInvalidStateException" => "key_disabled",
            "NoSuchKey" | "NotFound" | "NoSuchBucket" | "NotFoundException" => "not_found",
            "PreconditionFailed" => "changed",
            _ => "error",
        },
        _ => "error",
    }
}

/// A copy of the table for rendering: ((service, op), outcome counts, histogram).
pub type Row = (
    (&'static str, &'static str),
    Vec<(&'static str, u64)>,
    Buckets,
);

/// A histogram as an exposition encoder takes it: per-bucket (not cumulative) counts by
/// upper bound (the last one +Inf), the sum in seconds and the count.
#[derive(Debug, Clone, PartialEq)]
pub struct Buckets {
    pub counts: Vec<(f64, u64)>,
    pub sum: f64,
    pub count: u64,
}

pub fn snapshot() -> Vec<Row> {
    let t = CALLS.lock().unwrap_or_else(|p| p.into_inner());
    t.iter()
        .map(|(k, (o, h))| (*k, o.iter().map(|(a, b)| (*a, *b)).collect(), h.buckets()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_hold_each_observation_once() {
        let h = Histogram::default();
        h.observe(Duration::from_micros(500)); // ≤ 0.001
        h.observe(Duration::from_millis(30)); // ≤ 0.05
        h.observe(Duration::from_secs(20)); // +Inf
        let b = h.buckets();
        assert_eq!(b.counts[0], (0.001, 1));
        assert_eq!(b.counts[5], (0.05, 1));
        assert_eq!(b.counts[BUCKETS.len() - 1].1, 0);
        assert_eq!(b.counts[BUCKETS.len()], (f64::INFINITY, 1));
        assert_eq!(b.counts.len(), BUCKETS.len() + 1);
        assert_eq!(b.count, 3);
        assert!((b.sum - 20.0305).abs() < 1e-9, "{}", b.sum);
    }
}
