//! The mounter as its children's descriptor store (issue 23): each child stores its state
//! as it would in systemd's (`FDSTORE=1` with `FDNAME=state-a|state-b` on
//! `$NOTIFY_SOCKET`, fuse/handover.rs), here on one datagram socket per volume in the
//! mounter's 0700 directory. The mounter keeps a dup of the connection itself, so a child
//! that crashes leaves its readers waiting, and a successor started with the connection
//! and the newest state serves them on.
//!
//! Only messages that the kernel (SO_PASSCRED) names as sent by the volume's current child
//! count; another process's are dropped with their descriptors.

use std::collections::BTreeMap;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::seqpacket;
use crate::fuse::handover::STATE_NAMES;

/// A volume's notify socket and what its children stored there.
pub struct Link {
    path: PathBuf,
    inner: Mutex<Inner>,
    changed: Condvar,
    closed: AtomicBool,
}

#[derive(Default)]
struct Inner {
    /// The child whose messages count; none between a crash and its successor's start.
    pid: Option<i32>,
    /// `READY=1` messages so far.
    readies: u64,
    /// This process's own markers handled so far ([`Link::settle`]).
    marks: u64,
    /// The stored states by name (at most the two of [`STATE_NAMES`]).
    states: BTreeMap<&'static str, OwnedFd>,
}

/// [`Link::settle`]'s marker, counted only from this process.
const MARK: &str = "SEALFS_SETTLE=1";

/// How long a message waits for its sender's PID to be known (a child that speaks before
/// `spawn` returned to the mounter).
const PID_WAIT: Duration = Duration::from_secs(1);

impl Link {
    /// Binds the socket at `path` and listens on it until [`Link::close`].
    pub fn bind(path: PathBuf) -> std::io::Result<Arc<Self>> {
        let sock = std::os::unix::net::UnixDatagram::bind(&path)?;
        // The listener looks at `closed` this often.
        sock.set_read_timeout(Some(Duration::from_millis(200)))?;
        let sock = OwnedFd::from(sock);
        seqpacket::pass_credentials(&sock)?;
        let link = Arc::new(Self {
            path,
            inner: Mutex::new(Inner::default()),
            changed: Condvar::new(),
            closed: AtomicBool::new(false),
        });
        let l = link.clone();
        std::thread::Builder::new()
            .name("notify".into())
            .spawn(move || l.listen(&sock))?;
        Ok(link)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whose messages count from now on (`None`: nobody's, a crashed child's included).
    pub fn expect(&self, pid: Option<i32>) {
        self.lock().pid = pid;
        self.changed.notify_all();
    }

    pub fn readies(&self) -> u64 {
        self.lock().readies
    }

    /// Waits at most `timeout` for a `READY=1` beyond the first `seen`.
    pub fn wait_ready(&self, seen: u64, timeout: Duration) -> bool {
        let g = self.lock();
        let (g, _) = self
            .changed
            .wait_timeout_while(g, timeout, |i| i.readies <= seen)
            .unwrap_or_else(|p| p.into_inner());
        g.readies > seen
    }

    /// Copies of the stored states, with their names, for a successor.
    pub fn states(&self) -> std::io::Result<Vec<(&'static str, OwnedFd)>> {
        self.lock()
            .states
            .iter()
            .map(|(n, fd)| Ok((*n, fd.try_clone()?)))
            .collect()
    }

    pub fn has_state(&self) -> bool {
        !self.lock().states.is_empty()
    }

    /// Waits at most `timeout` until every message queued before this call is handled: a
    /// marker sent now comes after them through the same queue. So a state a crashed child
    /// sent just before it died is taken before its successor starts (systemd, too, reads
    /// a unit's notify socket before it handles the unit's exit).
    pub fn settle(&self, timeout: Duration) -> bool {
        let before = self.lock().marks;
        let sent = std::os::unix::net::UnixDatagram::unbound()
            .and_then(|s| s.send_to(MARK.as_bytes(), &self.path));
        if sent.is_err() {
            return false;
        }
        let g = self.lock();
        let (g, _) = self
            .changed
            .wait_timeout_while(g, timeout, |i| i.marks == before)
            .unwrap_or_else(|p| p.into_inner());
        g.marks > before
    }

    /// Stops listening, drops the states and removes the socket.
    pub fn close(&self) {
        self.closed.store(true, Ordering::SeqCst);
        self.lock().states.clear();
        let _ = std::fs::remove_file(&self.path);
    }

    fn listen(&self, sock: &OwnedFd) {
        while !self.closed.load(Ordering::SeqCst) {
            match seqpacket::recv_from(sock) {
                Ok((bytes, fds, pid)) => self.take(&bytes, fds, pid),
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock
                            | std::io::ErrorKind::TimedOut
                            | std::io::ErrorKind::Interrupted
                    ) => {}
                // (No pause: a flood of bad datagrams must not delay the child's own.)
                Err(e) if e.kind() == std::io::ErrorKind::InvalidData => {
                    tracing::warn!(error = %e, "a notify message was refused");
                }
                Err(e) => {
                    tracing::warn!(error = %e, "the notify socket failed");
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
        }
    }

    /// One sd_notify message: `READY=1`, `FDSTORE=1` + `FDNAME=`, `FDSTOREREMOVE=1` +
    /// `FDNAME=`; everything else is ignored. Descriptors not kept are closed.
    fn take(&self, bytes: &[u8], mut fds: Vec<OwnedFd>, sender: Option<i32>) {
        let mut g = self.lock();
        if sender == Some(std::process::id() as i32) && bytes == MARK.as_bytes() {
            g.marks += 1;
            drop(g);
            self.changed.notify_all();
            return;
        }
        let start = Instant::now();
        while g.pid.is_none() && start.elapsed() < PID_WAIT && !self.closed.load(Ordering::SeqCst) {
            g = self
                .changed
                .wait_timeout(g, Duration::from_millis(20))
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        if sender.is_none() || sender != g.pid {
            tracing::warn!(
                sender = ?sender,
                child = ?g.pid,
                "a notify message not from the volume's child was dropped"
            );
            return;
        }
        let text = String::from_utf8_lossy(bytes);
        let vars: BTreeMap<&str, &str> = text.lines().filter_map(|l| l.split_once('=')).collect();
        let name = vars
            .get("FDNAME")
            .and_then(|n| STATE_NAMES.iter().find(|s| *s == n).copied());
        if vars.get("FDSTORE") == Some(&"1") {
            // One state per message; the connection ("fuse") is not taken: the mounter
            // has its own copy.
            if let (Some(name), 1) = (name, fds.len()) {
                g.states.insert(name, fds.remove(0));
            }
        }
        if vars.get("FDSTOREREMOVE") == Some(&"1") {
            if let Some(name) = name {
                g.states.remove(name);
            }
        }
        if vars.get("READY") == Some(&"1") {
            g.readies += 1;
        }
        drop(g);
        self.changed.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;

    fn send(path: &Path, msg: &str, fds: &[&OwnedFd]) {
        use nix::sys::socket::{self, ControlMessage, MsgFlags, UnixAddr};
        let s = std::os::unix::net::UnixDatagram::unbound().unwrap();
        let raw: Vec<i32> = fds.iter().map(|f| f.as_raw_fd()).collect();
        let c = [ControlMessage::ScmRights(&raw)];
        socket::sendmsg(
            s.as_raw_fd(),
            &[std::io::IoSlice::new(msg.as_bytes())],
            if raw.is_empty() { &[] } else { &c },
            MsgFlags::empty(),
            Some(&UnixAddr::new(path).unwrap()),
        )
        .unwrap();
    }

    fn memfd() -> OwnedFd {
        nix::sys::memfd::memfd_create("t", nix::sys::memfd::MFdFlags::MFD_CLOEXEC).unwrap()
    }

    #[test]
    fn only_the_childs_states_and_ready_are_kept() {
        let dir = tempfile::tempdir().unwrap();
        let link = Link::bind(dir.path().join("n.sock")).unwrap();
        let me = std::process::id() as i32;
        // Another sender (here: a PID that is not this process): dropped.
        link.expect(Some(me + 1));
        send(link.path(), "FDSTORE=1\nFDNAME=state-a", &[&memfd()]);
        send(link.path(), "READY=1", &[]);
        assert!(!link.wait_ready(0, Duration::from_millis(400)));
        assert!(!link.has_state());
        // The child: a state kept, the connection and unknown names not.
        link.expect(Some(me));
        send(link.path(), "FDSTORE=1\nFDNAME=fuse", &[&memfd()]);
        send(link.path(), "FDSTORE=1\nFDNAME=../x", &[&memfd()]);
        send(
            link.path(),
            "FDSTORE=1\nFDNAME=state-a",
            &[&memfd(), &memfd()],
        );
        send(link.path(), "FDSTORE=1\nFDNAME=state-b", &[&memfd()]);
        send(link.path(), "READY=1", &[]);
        assert!(link.wait_ready(0, Duration::from_secs(5)));
        let names: Vec<_> = link.states().unwrap().into_iter().map(|s| s.0).collect();
        assert_eq!(names, ["state-b"]);
        // A state sent just before a settle is taken by the time it returns.
        send(link.path(), "FDSTORE=1\nFDNAME=state-a", &[&memfd()]);
        assert!(link.settle(Duration::from_secs(5)));
        let names: Vec<_> = link.states().unwrap().into_iter().map(|s| s.0).collect();
        assert_eq!(names, ["state-a", "state-b"]);
        send(link.path(), "FDSTOREREMOVE=1\nFDNAME=state-a", &[]);
        send(link.path(), "FDSTOREREMOVE=1\nFDNAME=state-b", &[]);
        send(link.path(), "READY=1", &[]);
        assert!(link.wait_ready(1, Duration::from_secs(5)));
        assert!(!link.has_state());
        link.close();
        assert!(!link.path().exists());
    }
}
