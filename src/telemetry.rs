//! Logging setup. Never log a key, a plaintext DEK or plaintext bytes: log events name
//! files, chunks, key ids and reasons only.

use tracing_subscriber::EnvFilter;

/// Human logs to stderr at `default_level` unless `RUST_LOG` says otherwise.
pub fn init(default_level: &str) {
    let filter = EnvFilter::try_from_env("RUST_LOG")
        .unwrap_or_else(|_| EnvFilter::new(format!("sealfs={default_level},warn")));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}
