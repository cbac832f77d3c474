//! The CSI node plugin's work, without gRPC (src/csi/grpc.rs is the adapter): publish mounts
//! `/dev/fuse` at the target and hands the connection to the mounter, which serves it with
//! one unprivileged child; unpublish undoes it. The kernel's mount table is the only state,
//! so a restarted plugin carries on with the live mounts.
//!
//! A target is confined: absolute, no `.`/`..`, its parent (created by kubelet) resolving,
//! symlinks followed, inside `--kubelet-dir`; every operation then uses that resolved path.
//! Publishes and unpublishes of one target are serialised (a second one at the same time
//! is ABORTED, and kubelet retries).

use std::collections::HashSet;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Component, Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use super::volume::{self, Plan, Publish};
use super::wire::{Reply, Request, PUBLISH_TIMEOUT};
use super::{secrets, seqpacket};
use crate::exit;
use crate::fuse::kernel_mount::{self, FuseMount};
use crate::mountinfo;

/// How long a ping or an unpublish may take.
const SHORT_TIMEOUT: Duration = Duration::from_secs(15);

/// Why a node operation failed; each is one gRPC status code (grpc.rs). Never holds a
/// secret's value.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum NodeError {
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{0}")]
    PermissionDenied(String),
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("{0}")]
    AlreadyExists(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Unavailable(String),
    #[error("{0}")]
    Aborted(String),
    #[error("{0}")]
    Internal(String),
}

pub struct NodeConfig {
    pub node_id: String,
    pub kubelet_dir: PathBuf,
    pub mounter_socket: PathBuf,
    /// The PKCS#11 modules volumes' `pkcs11:` keys may load (`--pkcs11-module`).
    pub pkcs11_modules: Vec<PathBuf>,
}

pub struct Node {
    pub config: NodeConfig,
    /// `kubelet_dir`, symlinks resolved.
    kubelet_dir: PathBuf,
    busy: Mutex<HashSet<PathBuf>>,
}

/// The target's operation in flight; dropping it lets the next one in.
struct Busy<'a>(&'a Node, PathBuf);

impl Drop for Busy<'_> {
    fn drop(&mut self) {
        lock(&self.0.busy).remove(&self.1);
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn internal(what: &str, target: &Path, e: std::io::Error) -> NodeError {
    NodeError::Internal(format!("{what} {}: {e}", target.display()))
}

impl Node {
    pub fn new(config: NodeConfig) -> std::io::Result<Self> {
        let kubelet_dir = std::fs::canonicalize(&config.kubelet_dir).map_err(|e| {
            std::io::Error::new(
                e.kind(),
                format!("--kubelet-dir {}: {e}", config.kubelet_dir.display()),
            )
        })?;
        Ok(Self {
            config,
            kubelet_dir,
            busy: Mutex::new(HashSet::new()),
        })
    }

    /// The target, resolved and confined; `None` when its parent does not exist.
    fn confine(&self, target: &str) -> Result<Option<PathBuf>, NodeError> {
        let bad = |why: &str| {
            NodeError::InvalidArgument(format!(
                "target path {:?}: {why}",
                crate::format::naming::printable(target, 256)
            ))
        };
        let p = Path::new(target);
        if target.is_empty() || target.len() > 4096 || target.chars().any(char::is_control) {
            return Err(bad("empty, too long or holds a control character"));
        }
        if !p.is_absolute() {
            return Err(bad("must be absolute"));
        }
        // components() drops `.` and repeated slashes: compare with the text, so that any
        // of them is refused, not silently normalised.
        let clean: PathBuf = p.components().collect();
        if p.components().any(|c| matches!(c, Component::ParentDir))
            || clean.as_os_str() != p.as_os_str()
        {
            return Err(bad(
                "must be a clean path (no `.`, `..`, `//` or trailing `/`)",
            ));
        }
        let (Some(parent), Some(name)) = (p.parent(), p.file_name()) else {
            return Err(bad("has no parent"));
        };
        let parent = match std::fs::canonicalize(parent) {
            Ok(r) => r,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(internal("resolving the parent of", p, e)),
        };
        if !parent.starts_with(&self.kubelet_dir) {
            return Err(bad(&format!(
                "not inside the kubelet directory {}",
                self.kubelet_dir.display()
            )));
        }
        Ok(Some(parent.join(name)))
    }

    fn claim(&self, target: &Path) -> Result<Busy<'_>, NodeError> {
        if !lock(&self.busy).insert(target.to_path_buf()) {
            return Err(NodeError::Aborted(format!(
                "an operation on {} is in progress",
                target.display()
            )));
        }
        Ok(Busy(self, target.to_path_buf()))
    }

    /// NodePublishVolume: returns once the mounter's child serves the target, or has failed
    /// (then nothing is left mounted and the target is removed).
    pub fn publish(&self, p: &Publish) -> Result<(), NodeError> {
        let plan = volume::plan(p, &self.config.pkcs11_modules)
            .map_err(|e| NodeError::InvalidArgument(e.0))?;
        let target = self.confine(p.target)?.ok_or_else(|| {
            NodeError::NotFound(format!(
                "the parent of target {} does not exist (kubelet creates it)",
                p.target
            ))
        })?;
        let _busy = self.claim(&target)?;
        match mountinfo::at(&target).map_err(|e| internal("reading mountinfo for", &target, e))? {
            Some(m) if m.fs_type == mountinfo::FS_TYPE => match server_state(&target) {
                // The child died (or the mounter restarted), or hangs: take the mount away
                // and mount again (the mounter ends a hung child when it is republished).
                Server::Gone | Server::Hung => {
                    tracing::warn!(target = %target.display(), "target's server is gone; mounting it again");
                    kernel_mount::unmount(&target)
                        .map_err(|e| internal("unmounting the dead mount at", &target, e))?;
                }
                _ if m.source == plan.uri => {
                    // kubelet republishes (requiresRepublish) to hand a pod's mount its
                    // fresh token.
                    if plan.pod_identity {
                        self.refresh(&target, p.volume_id, &plan)?;
                    }
                    tracing::info!(target = %target.display(), volume = p.volume_id, "already published");
                    return Ok(());
                }
                _ => {
                    return Err(NodeError::AlreadyExists(format!(
                        "target {} already serves another volume",
                        target.display()
                    )))
                }
            },
            Some(m) => {
                return Err(NodeError::FailedPrecondition(format!(
                    "target {} is a {} mount, not sealfs",
                    target.display(),
                    m.fs_type
                )))
            }
            None => {}
        }
        make_target(&target)?;
        let fuse = match kernel_mount::mount(
            &target,
            &FuseMount {
                source: plan.uri.clone(),
                allow_other: true,
            },
        ) {
            Ok(fd) => fd,
            Err(e) => {
                let _ = std::fs::remove_dir(&target);
                return Err(internal("mounting FUSE at", &target, e));
            }
        };
        match self.hand_over(&target, p.volume_id, &plan, fuse) {
            Ok(pid) => {
                let pod = plan.pod.as_ref();
                tracing::info!(
                    target = %target.display(),
                    volume = p.volume_id,
                    uri = %plan.uri,
                    child = pid,
                    pod_namespace = pod.map(|p| p.namespace.as_str()),
                    pod_name = pod.map(|p| p.name.as_str()),
                    pod_uid = pod.map(|p| p.uid.as_str()),
                    "published"
                );
                Ok(())
            }
            Err(e) => {
                let _ = kernel_mount::unmount(&target);
                let _ = std::fs::remove_dir(&target);
                tracing::warn!(target = %target.display(), volume = p.volume_id, error = %e, "publish failed");
                Err(e)
            }
        }
    }

    /// Gives the connection (and the secrets) to the mounter; every copy of the fd here is
    /// closed when this returns.
    fn hand_over(
        &self,
        target: &Path,
        volume_id: &str,
        plan: &Plan,
        fuse: OwnedFd,
    ) -> Result<Option<u32>, NodeError> {
        let sealed =
            match &plan.secrets {
                Some(s) => Some(secrets::seal(s).map_err(|e| {
                    NodeError::Internal(format!("sealing the volume's secrets: {e}"))
                })?),
                None => None,
            };
        let target = target
            .to_str()
            .ok_or_else(|| NodeError::InvalidArgument("target path must be UTF-8".into()))?;
        let req = Request::Publish {
            target: target.to_string(),
            uri: plan.uri.clone(),
            args: plan.args.clone(),
            env: plan.env.clone(),
            secrets: sealed.is_some(),
            pod_identity: plan.pod_identity,
        };
        let mut fds = vec![fuse];
        fds.extend(sealed);
        let reply = self.ask(&req, fds, PUBLISH_TIMEOUT)?;
        if reply.ok {
            return Ok(reply.pid);
        }
        let why = format!(
            "volume {volume_id}: {}",
            reply.error.as_deref().unwrap_or("the mount failed")
        );
        Err(match reply.code {
            Some(exit::USAGE) => NodeError::InvalidArgument(why),
            Some(exit::KEY_DENIED) => NodeError::PermissionDenied(why),
            Some(exit::INTEGRITY) => NodeError::FailedPrecondition(why),
            Some(exit::STORE) => NodeError::Unavailable(why),
            _ => NodeError::Internal(why),
        })
    }

    /// Sends the pod's fresh token to the child serving `target`.
    fn refresh(&self, target: &Path, volume_id: &str, plan: &Plan) -> Result<(), NodeError> {
        let token = plan
            .secrets
            .as_ref()
            .and_then(|s| s.aws_web_identity.as_ref())
            .map(|w| w.token.clone())
            .ok_or_else(|| NodeError::Internal("a pod-identity plan without a token".into()))?;
        let sealed = secrets::seal(&secrets::Refresh { token })
            .map_err(|e| NodeError::Internal(format!("sealing the pod's token: {e}")))?;
        let target = target
            .to_str()
            .ok_or_else(|| NodeError::InvalidArgument("target path must be UTF-8".into()))?;
        let req = Request::Refresh {
            target: target.to_string(),
        };
        let reply = self.ask(&req, vec![sealed], SHORT_TIMEOUT)?;
        if reply.ok {
            return Ok(());
        }
        // The mount serves on with its old token until that expires: say why kubelet
        // should retry, rather than fail the pod.
        Err(NodeError::Unavailable(format!(
            "volume {volume_id}: refreshing the pod's token: {}",
            reply.error.as_deref().unwrap_or("failed")
        )))
    }

    /// One request to the mounter and its reply; `fds` are closed once sent.
    fn ask(&self, req: &Request, fds: Vec<OwnedFd>, timeout: Duration) -> Result<Reply, NodeError> {
        let sock = &self.config.mounter_socket;
        let down = |e: std::io::Error| {
            NodeError::Unavailable(format!("the sealfs mounter at {}: {e}", sock.display()))
        };
        let conn = seqpacket::connect(sock).map_err(down)?;
        let t = nix::sys::time::TimeVal::new(timeout.as_secs() as i64, 0);
        nix::sys::socket::setsockopt(&conn, nix::sys::socket::sockopt::ReceiveTimeout, &t)
            .map_err(|e| down(e.into()))?;
        let bytes = serde_json::to_vec(req).map_err(|e| NodeError::Internal(e.to_string()))?;
        let raw: Vec<_> = fds.iter().map(|f| f.as_raw_fd()).collect();
        seqpacket::send(&conn, &bytes, &raw).map_err(down)?;
        drop(fds);
        let (answer, _) = seqpacket::recv(&conn).map_err(|e| {
            if matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ) {
                NodeError::Unavailable(format!(
                    "the sealfs mounter did not answer within {} s",
                    timeout.as_secs()
                ))
            } else {
                down(e)
            }
        })?;
        if answer.is_empty() {
            return Err(down(std::io::Error::other("closed the connection")));
        }
        serde_json::from_slice(&answer).map_err(|e| {
            NodeError::Internal(format!(
                "the mounter's reply: {}",
                crate::keys::json_error(&e)
            ))
        })
    }

    /// NodeUnpublishVolume: unmounts (lazily: open files drain), ends the child, removes
    /// the target. A target that is missing or not mounted is already unpublished.
    pub fn unpublish(&self, target: &str) -> Result<(), NodeError> {
        let Some(target) = self.confine(target)? else {
            return Ok(());
        };
        let _busy = self.claim(&target)?;
        match mountinfo::at(&target).map_err(|e| internal("reading mountinfo for", &target, e))? {
            Some(m) if m.fs_type == mountinfo::FS_TYPE => {
                kernel_mount::unmount(&target).map_err(|e| internal("unmounting", &target, e))?;
                let req = Request::Unpublish {
                    target: target.to_string_lossy().into_owned(),
                };
                // The child also ends by itself once the kernel drops the connection.
                if let Err(e) = self.ask(&req, Vec::new(), SHORT_TIMEOUT) {
                    tracing::warn!(target = %target.display(), error = %e, "mounter not told of the unpublish");
                }
            }
            Some(m) => {
                return Err(NodeError::FailedPrecondition(format!(
                    "target {} is a {} mount, not sealfs: left alone",
                    target.display(),
                    m.fs_type
                )))
            }
            None => {}
        }
        match std::fs::remove_dir(&target) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(internal("removing", &target, e)),
        }
        tracing::info!(target = %target.display(), "unpublished");
        Ok(())
    }

    /// Probe: whether the mounter answers.
    pub fn ready(&self) -> bool {
        matches!(self.ask(&Request::Ping {}, Vec::new(), SHORT_TIMEOUT), Ok(r) if r.ok)
    }
}

/// How long a published target's server may take to answer a statfs.
const ALIVE_TIMEOUT: Duration = Duration::from_secs(5);

enum Server {
    Serving,
    Gone,
    Hung,
}

/// Whether a sealfs mount's server still answers. statfs, not stat: the kernel answers a
/// stat of the root from its attribute cache after the server is gone; statfs always asks
/// it. On a thread, bounded: a stopped or stuck server would block the caller (and the
/// target's claim) in the kernel; the thread ends once the mount is taken away.
fn server_state(target: &Path) -> Server {
    let (tx, rx) = std::sync::mpsc::channel();
    let t = target.to_path_buf();
    std::thread::spawn(move || {
        let _ = tx.send(nix::sys::statfs::statfs(&t).map(drop));
    });
    match rx.recv_timeout(ALIVE_TIMEOUT) {
        Ok(Err(nix::errno::Errno::ENOTCONN)) => Server::Gone,
        Ok(_) => Server::Serving,
        Err(_) => Server::Hung,
    }
}

/// The target directory (kubelet creates only its parent): a directory, never a symlink.
fn make_target(target: &Path) -> Result<(), NodeError> {
    use std::os::unix::fs::DirBuilderExt;
    match std::fs::DirBuilder::new().mode(0o750).create(target) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            let m = std::fs::symlink_metadata(target)
                .map_err(|e| internal("checking the target", target, e))?;
            if m.file_type().is_dir() {
                Ok(())
            } else {
                Err(NodeError::FailedPrecondition(format!(
                    "target {} exists and is not a directory",
                    target.display()
                )))
            }
        }
        Err(e) => Err(internal("creating the target", target, e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(dir: &Path) -> Node {
        Node::new(NodeConfig {
            node_id: "n".into(),
            kubelet_dir: dir.to_path_buf(),
            mounter_socket: dir.join("no-mounter.sock"),
            pkcs11_modules: Vec::new(),
        })
        .unwrap()
    }

    #[test]
    fn targets_are_confined_to_the_kubelet_directory() {
        let d = tempfile::tempdir().unwrap();
        let kubelet = d.path().join("kubelet");
        std::fs::create_dir_all(kubelet.join("pods/p/volumes")).unwrap();
        std::fs::create_dir_all(d.path().join("elsewhere")).unwrap();
        std::os::unix::fs::symlink(d.path().join("elsewhere"), kubelet.join("pods/p/escape"))
            .unwrap();
        let n = node(&kubelet);
        let k = kubelet.to_str().unwrap();
        let ok = n
            .confine(&format!("{k}/pods/p/volumes/mount"))
            .unwrap()
            .unwrap();
        assert_eq!(
            ok,
            std::fs::canonicalize(&kubelet)
                .unwrap()
                .join("pods/p/volumes/mount")
        );
        assert_eq!(
            n.confine(&format!("{k}/pods/q/volumes/mount")).unwrap(),
            None
        );
        for bad in [
            "relative/mount".to_string(),
            format!("{k}/pods/p/../p/volumes/mount"),
            format!("{k}/pods/p/./volumes/mount"),
            format!("{k}/pods/p//volumes/mount"),
            format!("{k}/pods/p/volumes/mount/"),
            format!("{k}/pods/p/escape/mount"),
            d.path()
                .join("elsewhere/mount")
                .to_str()
                .unwrap()
                .to_string(),
            format!("{k}/pods/p/volumes/a\nb"),
            String::new(),
        ] {
            match n.confine(&bad) {
                Err(NodeError::InvalidArgument(m)) => assert!(m.starts_with("target path"), "{m}"),
                other => panic!("{bad:?}: {other:?}"),
            }
        }
    }

    #[test]
    fn a_mounter_that_is_down_is_unavailable_and_unpublish_of_nothing_is_ok() {
        let d = tempfile::tempdir().unwrap();
        let n = node(d.path());
        assert!(!n.ready());
        match n.ask(&Request::Ping {}, Vec::new(), SHORT_TIMEOUT) {
            Err(NodeError::Unavailable(m)) => assert!(m.contains("no-mounter.sock"), "{m}"),
            other => panic!("{other:?}"),
        }
        let t = d.path().join("gone");
        n.unpublish(t.to_str().unwrap()).unwrap();
        std::fs::create_dir(&t).unwrap();
        n.unpublish(t.to_str().unwrap()).unwrap();
        assert!(!t.exists());
    }

    #[test]
    fn a_second_operation_on_a_target_in_flight_is_aborted() {
        let d = tempfile::tempdir().unwrap();
        let n = node(d.path());
        let t = d.path().join("t");
        let held = n.claim(&t).unwrap();
        assert!(matches!(n.claim(&t), Err(NodeError::Aborted(_))));
        drop(held);
        n.claim(&t).unwrap();
    }
}
