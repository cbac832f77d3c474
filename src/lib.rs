//! sealfs: client-side encrypted, chunked model files on S3, served as plaintext.
//!
//! Dependencies run one way: `cli` → {`fuse` → `fs` → `cache`, `seal`} → `object` →
//! {`keys`, `store`} → {`crypto`, `format`}. `format` and `crypto` do no I/O. See docs/ARCHITECTURE.md.

pub mod aws_identity;
pub mod cache;
pub mod calls;
pub mod cli;
pub mod crypto;
pub mod csi;
pub mod error;
pub mod exit;
pub mod format;
pub mod fs;
pub mod fuse;
#[doc(hidden)]
pub mod fuzzing;
pub mod keys;
pub mod localfile;
pub mod manifest;
pub mod metrics_http;
pub mod mountinfo;
pub mod object;
pub mod process;
pub mod seal;
pub mod sign;
pub mod store;
pub mod telemetry;

pub use error::{Error, Result};

/// An error and its sources on one line: `outer: inner: root` (multi-line messages, as
/// the AWS credential chain gives, are joined with `; `).
pub fn error_chain(err: &dyn std::error::Error) -> String {
    let s = chain(err);
    let joined = s
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join("; ");
    // Messages carry store and KMS text: no control character reaches a terminal or log.
    format::naming::printable(&joined, 4096)
}

fn chain(err: &dyn std::error::Error) -> String {
    let mut s = err.to_string();
    let mut cur = err.source();
    while let Some(e) = cur {
        let t = e.to_string();
        if !s.contains(&t) {
            s.push_str(": ");
            s.push_str(&t);
        }
        cur = e.source();
    }
    s
}

/// The AWS configuration loader with sealfs's time bounds: a hung endpoint costs at most
/// `OPERATION_TIMEOUT` per call (3 attempts with backoff, each ≤ `ATTEMPT_TIMEOUT`).
pub fn aws_defaults() -> aws_config::ConfigLoader {
    aws_config::defaults(aws_config::BehaviorVersion::latest()).timeout_config(aws_timeouts())
}

/// sealfs's time bounds of every AWS call (S3, KMS, and STS for a pod's web identity).
pub fn aws_timeouts() -> aws_config::timeout::TimeoutConfig {
    aws_config::timeout::TimeoutConfig::builder()
        .connect_timeout(std::time::Duration::from_secs(5))
        .operation_attempt_timeout(ATTEMPT_TIMEOUT)
        .operation_timeout(OPERATION_TIMEOUT)
        .build()
}

/// Longest single attempt of an S3 or KMS call (a 16 MiB part needs ≥ 0.6 MB/s).
pub const ATTEMPT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);
/// Longest S3 or KMS call including retries.
pub const OPERATION_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(75);
