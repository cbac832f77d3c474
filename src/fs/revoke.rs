//! Revocation that reaches files already open. Every `--revalidate` interval the mount asks
//! the key provider again, once per held DEK, whether it may still be unwrapped; when the
//! provider refuses (key disabled, pending deletion, destroyed, access denied), and on
//! `sealfs revoke`, the file's DEK is zeroized, its cached chunks wiped, the kernel's pages
//! of it dropped (so an mmap reader cannot go on reading plaintext from the page cache),
//! and every later read or open answers EACCES. Other files keep working.
//!
//! A provider that is merely unreachable or throttling revokes nothing: the file keeps
//! being served, and is revoked only once no check has succeeded for
//! `--revalidate-max-outage` (fail closed, bounded; 0 keeps serving).

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;

use super::{lock, Opened, SealFs};

/// Which held files a revocation concerns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scope {
    All,
    /// Files whose key object has a slot under this key id (as slots record it).
    Key(String),
}

/// The `sealfs revoke` calls a mount received, the latest [`REVOKE_LOG`] kept: an unwrap
/// in flight when one arrived (an open's, or one ahead) is not yet held, so the revoke
/// cannot reach it; it checks what it unwrapped against those issued since it started.
#[derive(Default)]
pub(crate) struct RevokeLog {
    issued: u64,
    recent: std::collections::VecDeque<(u64, Scope, String)>,
}

/// Revokes remembered for unwraps in flight (older ones: such an unwrap is revoked whole).
const REVOKE_LOG: usize = 64;

/// Whether a revoke of `scope` concerns held version `o`.
fn hits(scope: &Scope, o: &Opened) -> bool {
    match scope {
        Scope::All => true,
        Scope::Key(id) => o.file.key_object.slots.iter().any(|s| s.key_id == *id),
    }
}

/// What one revalidation round found.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Round {
    /// Held DEKs checked with the provider.
    pub checked: usize,
    pub revoked: usize,
    /// Checks the provider could not answer (nothing revoked for them, unless the outage
    /// outlasted the bound).
    pub unreachable: usize,
}

/// Concurrent provider calls in one round.
const PARALLEL_CHECKS: usize = 8;
/// How long a revocation waits for fetches in flight (which may still hold a chunk
/// decrypted before the wipe) before wiping the file's cached chunks once more.
const INFLIGHT_WAIT: Duration = Duration::from_secs(2);

impl SealFs {
    /// Every version whose DEK is held (in the DEK cache, or only by open handles of a
    /// replaced version), once each, not yet revoked.
    fn held(&self) -> Vec<Arc<Opened>> {
        let mut out: HashMap<u64, Arc<Opened>> = HashMap::new();
        for s in lock(&self.files).values() {
            if let Some(o) = s.cell.get() {
                out.insert(o.seq, o.clone());
            }
        }
        for h in lock(&self.handles).values() {
            out.entry(h.opened.seq).or_insert_with(|| h.opened.clone());
        }
        out.into_values().filter(|o| !o.is_revoked()).collect()
    }

    /// One revalidation round: one unwrap per held DEK with the trusted keys, as at open.
    pub async fn revalidate(&self) -> Round {
        // Brokers first: an open whose unwrap ran during the refresh is then in `held`.
        self.keyring.refresh_released().await;
        let held = self.held();
        let mut round = Round {
            checked: held.len(),
            ..Round::default()
        };
        let revoked = std::sync::atomic::AtomicUsize::new(0);
        let unreachable = std::sync::atomic::AtomicUsize::new(0);
        // Each result acted on as it arrives: a slow provider call does not hold up the
        // revocation of a file already refused.
        futures::stream::iter(held)
            .for_each_concurrent(PARALLEL_CHECKS, |o| {
                let (revoked, unreachable) = (&revoked, &unreachable);
                async move {
                    match self.keyring.recheck(&o.file.key_object).await {
                        Ok(()) => *lock(&o.validated) = Instant::now(),
                        // Every trusted key refused, or none opens this DEK any more.
                        Err(e) if e.revokes() => {
                            if self.revoke_one(&o, &e.to_string()).await {
                                revoked.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                        Err(e) => {
                            unreachable.fetch_add(1, Ordering::Relaxed);
                            let outage = lock(&o.validated).elapsed();
                            let bound = self.config.revalidate_max_outage;
                            if !bound.is_zero() && outage >= bound {
                                let why = format!(
                                    "no successful key check for {}s (--revalidate-max-outage): {e}",
                                    outage.as_secs()
                                );
                                if self.revoke_one(&o, &why).await {
                                    revoked.fetch_add(1, Ordering::Relaxed);
                                }
                            } else {
                                tracing::warn!(file = %o.file.key, error = %e, "revalidation could not reach the key provider; still serving");
                            }
                        }
                    }
                }
            })
            .await;
        round.revoked = revoked.into_inner();
        round.unreachable = unreachable.into_inner();
        round
    }

    /// Revokes every held file in `scope` at once (`sealfs revoke`); returns how many.
    pub async fn revoke(&self, scope: &Scope, reason: &str) -> usize {
        // Logged before the held DEKs are looked at: an unwrap still in flight finds it
        // when it ends ([`SealFs::missed_revoke`]), so the panic button is not undone by
        // an open or an unwrap ahead that was waiting on the provider.
        {
            let mut log = lock(&self.revokes);
            log.issued += 1;
            let n = log.issued;
            log.recent.push_back((n, scope.clone(), reason.to_string()));
            if log.recent.len() > REVOKE_LOG {
                log.recent.pop_front();
            }
        }
        let mut n = 0;
        for o in self.held() {
            if hits(scope, &o) && self.revoke_one(&o, reason).await {
                n += 1;
            }
        }
        n
    }

    /// How many revokes were issued so far: taken before an unwrap, for
    /// [`SealFs::missed_revoke`] after it.
    pub(super) fn revoke_epoch(&self) -> u64 {
        lock(&self.revokes).issued
    }

    /// The reason of a revoke issued since `epoch` that concerns `o` (unwrapped meanwhile).
    pub(super) fn missed_revoke(&self, epoch: u64, o: &Opened) -> Option<String> {
        let log = lock(&self.revokes);
        if log.issued == epoch {
            return None;
        }
        // More revokes since than are kept: the unwrap is revoked, whatever they were.
        if log.recent.front().is_none_or(|(n, _, _)| *n > epoch + 1) {
            return Some("revoked while its DEK was being unwrapped".into());
        }
        log.recent
            .iter()
            .filter(|(n, scope, _)| *n > epoch && hits(scope, o))
            .map(|(_, _, why)| format!("{why} (issued while its DEK was being unwrapped)"))
            .next()
    }

    /// Revokes one held version; false if it already was.
    pub(super) async fn revoke_one(&self, o: &Arc<Opened>, reason: &str) -> bool {
        // The flag first: from here on no read serves a byte of it, cached or not.
        if o.revoked.swap(true, Ordering::SeqCst) {
            return false;
        }
        o.file.wipe();
        self.cache.remove_file(o.seq);
        // The DEK-cache slot goes, so that a new open unwraps again (and is refused for as
        // long as the provider refuses).
        lock(&self.files).retain(|_, s| !s.cell.get().is_some_and(|x| Arc::ptr_eq(x, o)));
        // A fetch in flight may commit a chunk it decrypted before the wipe: wait for the
        // file's fetches to end, then wipe its chunks once more.
        let start = Instant::now();
        while self.inflight.has_file(o.seq) && start.elapsed() < INFLIGHT_WAIT {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        self.cache.remove_file(o.seq);
        // The tree's inodes of this object, and those of its open handles (a retired inode
        // past the tree's cap is only known to its handles).
        let mut inodes = self.tree().inodes_of(&o.file.key);
        inodes.extend(
            lock(&self.handles)
                .values()
                .filter(|h| Arc::ptr_eq(&h.opened, o))
                .map(|h| h.ino),
        );
        inodes.sort_unstable();
        inodes.dedup();
        if let Some(invalidate) = self.invalidate.get().cloned() {
            // The kernel may wait on pages being read through this very daemon: never from
            // a runtime worker, and bounded.
            let list = inodes.clone();
            let done = tokio::task::spawn_blocking(move || {
                for ino in list {
                    invalidate(ino);
                }
            });
            if tokio::time::timeout(Duration::from_secs(10), done)
                .await
                .is_err()
            {
                tracing::warn!(file = %o.file.key, "kernel page invalidation still running after 10 s");
            }
        }
        self.stats.revocations.fetch_add(1, Ordering::Relaxed);
        let h = &o.file.key_object.header;
        tracing::warn!(
            target: "sealfs::audit",
            file = %self.store.describe(&o.file.key),
            file_id = %hex::encode(h.file_id),
            keys = ?o.file.key_object.key_ids(),
            reason = %crate::format::naming::printable(reason, 512),
            inodes = ?inodes,
            host = crate::telemetry::hostname(),
            "dek revoked"
        );
        true
    }

    /// The slot id of a key this mount was given (`--key` URI or slot id), for `revoke`.
    pub fn key_id_of(&self, key: &str) -> Option<String> {
        self.keyring.id_of(key)
    }

    /// Sets how the kernel is told to drop its cached pages of an inode (the FUSE session's
    /// notifier); without one (tests without a mount) only the daemon's state is revoked.
    pub fn set_invalidator(&self, f: Arc<dyn Fn(u64) + Send + Sync>) {
        let _ = self.invalidate.set(f);
    }
}
