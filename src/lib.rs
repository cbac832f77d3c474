//! sealfs: client-side encrypted, chunked model files on S3, served as plaintext.
//!
//! Dependencies run one way: `cli` → {`fuse` → `fs` → `cache`, `seal`} → `object` →
//! {`keys`, `store`} → {`crypto`, `format`}. `format` and `crypto` do no I/O. See docs/ARCHITECTURE.md.

pub mod cache;
pub mod cli;
pub mod crypto;
pub mod error;
pub mod format;
pub mod fs;
pub mod fuse;
pub mod keys;
pub mod object;
pub mod seal;
pub mod store;
pub mod telemetry;

pub use error::{Error, Result};

/// An error and its sources on one line: `outer: inner: root` (multi-line messages, as
/// the AWS credential chain gives, are joined with `; `).
pub fn error_chain(err: &dyn std::error::Error) -> String {
    let s = chain(err);
    s.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join("; ")
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
