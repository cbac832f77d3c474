//! The CLI's operations on sealed objects: seal, verify, unseal, inspect, rewrap.

pub mod dest;
pub mod inspect;
pub mod read;
pub mod reseal;
pub mod rewrap;
pub mod write;

pub use inspect::inspect;
pub use read::{unseal, verify, ModelReport, VerifyReport};
pub use reseal::reseal;
pub use rewrap::rewrap;
pub use write::{seal, seal_model, SealOptions, SealedModel};

/// Set once on Ctrl-C/SIGTERM; long operations stop and clean up when they see it.
#[derive(Clone)]
pub struct Cancel(tokio::sync::watch::Receiver<bool>);

impl Cancel {
    /// A token that is never cancelled.
    pub fn never() -> Self {
        let (tx, rx) = tokio::sync::watch::channel(false);
        std::mem::forget(tx);
        Self(rx)
    }

    /// A token and the sender that cancels it.
    pub fn new() -> (tokio::sync::watch::Sender<bool>, Self) {
        let (tx, rx) = tokio::sync::watch::channel(false);
        (tx, Self(rx))
    }

    pub async fn cancelled(&self) {
        let mut rx = self.0.clone();
        // An error means the sender is gone: then cancellation can never come.
        if rx.wait_for(|c| *c).await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

/// Progress on a TTY (bytes, rate, ETA), nothing otherwise.
pub(crate) fn progress(total: u64, enabled: bool) -> indicatif::ProgressBar {
    if !enabled {
        return indicatif::ProgressBar::hidden();
    }
    let pb = indicatif::ProgressBar::new(total);
    pb.set_style(
        indicatif::ProgressStyle::with_template(
            "{msg} [{bar:30}] {bytes}/{total_bytes} {binary_bytes_per_sec} ETA {eta}",
        )
        .expect("static template")
        .progress_chars("=> "),
    );
    pb
}
