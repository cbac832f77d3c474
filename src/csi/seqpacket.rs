//! Unix SOCK_SEQPACKET messages with descriptors (SCM_RIGHTS), through nix: message
//! boundaries kept by the kernel, a truncated message or descriptor list refused (and any
//! descriptors that came with it closed), every received descriptor close-on-exec.

use std::io::{IoSlice, IoSliceMut};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::Path;

use nix::sys::socket::{
    self, AddressFamily, Backlog, ControlMessage, ControlMessageOwned, MsgFlags, SockFlag,
    SockType, UnixAddr,
};

use super::wire::{MAX_FDS, MAX_MESSAGE};

fn io(e: nix::Error) -> std::io::Error {
    std::io::Error::from(e)
}

/// A close-on-exec unix SOCK_SEQPACKET socket.
fn seqpacket_socket() -> std::io::Result<OwnedFd> {
    socket::socket(
        AddressFamily::Unix,
        SockType::SeqPacket,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .map_err(io)
}

/// A listening socket at `path` (an old socket file there is replaced), mode 0600.
pub fn listen(path: &Path) -> std::io::Result<OwnedFd> {
    use std::os::unix::fs::PermissionsExt;
    if path.exists() {
        std::fs::remove_file(path)?;
    }
    let fd = seqpacket_socket()?;
    socket::bind(fd.as_raw_fd(), &UnixAddr::new(path).map_err(io)?).map_err(io)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    socket::listen(&fd, Backlog::new(16).map_err(io)?).map_err(io)?;
    Ok(fd)
}

#[allow(unsafe_code)]
pub fn accept(listener: &OwnedFd) -> std::io::Result<OwnedFd> {
    let fd = socket::accept4(listener.as_raw_fd(), SockFlag::SOCK_CLOEXEC).map_err(io)?;
    // SAFETY: accept4 returned a new descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

pub fn connect(path: &Path) -> std::io::Result<OwnedFd> {
    let fd = seqpacket_socket()?;
    socket::connect(fd.as_raw_fd(), &UnixAddr::new(path).map_err(io)?).map_err(io)?;
    Ok(fd)
}

/// The uid of the process at the other end.
pub fn peer_uid(fd: &OwnedFd) -> std::io::Result<u32> {
    Ok(socket::getsockopt(fd, socket::sockopt::PeerCredentials)
        .map_err(io)?
        .uid())
}

/// Sends one message with `fds` attached.
pub fn send(fd: &OwnedFd, bytes: &[u8], fds: &[RawFd]) -> std::io::Result<()> {
    if bytes.len() > MAX_MESSAGE || fds.len() > MAX_FDS {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "message too large",
        ));
    }
    let cmsgs: Vec<ControlMessage> = if fds.is_empty() {
        vec![]
    } else {
        vec![ControlMessage::ScmRights(fds)]
    };
    let n = socket::sendmsg::<UnixAddr>(
        fd.as_fd().as_raw_fd(),
        &[IoSlice::new(bytes)],
        &cmsgs,
        MsgFlags::MSG_NOSIGNAL,
        None,
    )
    .map_err(io)?;
    if n != bytes.len() {
        return Err(std::io::Error::other("short send"));
    }
    Ok(())
}

/// Receives one message: its bytes (empty at end of stream) and descriptors. A message
/// longer than [`MAX_MESSAGE`] or with more than [`MAX_FDS`] descriptors is refused, and
/// whatever descriptors came with it are closed.
pub fn recv(fd: &OwnedFd) -> std::io::Result<(Vec<u8>, Vec<OwnedFd>)> {
    recv_from(fd).map(|(b, fds, _)| (b, fds))
}

/// Has the kernel attach each sender's credentials to what `fd` receives (SO_PASSCRED),
/// for [`recv_from`] to report whose message it is.
pub fn pass_credentials(fd: &impl AsFd) -> std::io::Result<()> {
    socket::setsockopt(fd, socket::sockopt::PassCred, &true).map_err(io)
}

/// [`recv`], with the sender's PID when the socket has [`pass_credentials`] (the kernel's
/// word, not the sender's).
#[allow(unsafe_code)]
pub fn recv_from(fd: &OwnedFd) -> std::io::Result<(Vec<u8>, Vec<OwnedFd>, Option<i32>)> {
    let mut buf = vec![0u8; MAX_MESSAGE + 1];
    let mut cmsg = nix::cmsg_space!([RawFd; MAX_FDS], libc::ucred);
    let mut iov = [IoSliceMut::new(&mut buf)];
    let msg = socket::recvmsg::<UnixAddr>(
        fd.as_raw_fd(),
        &mut iov,
        Some(&mut cmsg),
        MsgFlags::MSG_CMSG_CLOEXEC,
    )
    .map_err(io)?;
    let bytes = msg.bytes;
    let truncated = msg.flags.contains(MsgFlags::MSG_TRUNC) || bytes > MAX_MESSAGE;
    let (mut fds, mut pid) = (Vec::new(), None);
    let cmsgs = msg.cmsgs();
    if let Ok(cmsgs) = cmsgs {
        for c in cmsgs {
            match c {
                ControlMessageOwned::ScmRights(list) => {
                    for raw in list {
                        // SAFETY: SCM_RIGHTS installed these descriptors in this process
                        // for this message; nothing else owns them.
                        fds.push(unsafe { OwnedFd::from_raw_fd(raw) });
                    }
                }
                ControlMessageOwned::ScmCredentials(c) => pid = Some(c.pid()),
                _ => {}
            }
        }
    }
    let ctrunc = msg.flags.contains(MsgFlags::MSG_CTRUNC);
    if truncated || ctrunc || fds.len() > MAX_FDS {
        drop(fds);
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("message over {MAX_MESSAGE} bytes or {MAX_FDS} descriptors refused"),
        ));
    }
    buf.truncate(bytes);
    Ok((buf, fds, pid))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_message_and_its_descriptors_arrive_whole_and_oversized_ones_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s");
        let l = listen(&path).unwrap();
        let c = connect(&path).unwrap();
        let s = accept(&l).unwrap();
        assert_eq!(peer_uid(&s).unwrap(), crate::localfile::euid());
        let f = std::fs::File::open("/dev/null").unwrap();
        send(&c, b"hello", &[f.as_raw_fd()]).unwrap();
        let (b, fds) = recv(&s).unwrap();
        assert_eq!((b.as_slice(), fds.len()), (&b"hello"[..], 1));
        // Close-on-exec on what arrived.
        let flags = nix::fcntl::fcntl(&fds[0], nix::fcntl::FcntlArg::F_GETFD).unwrap();
        assert_ne!(flags & libc::FD_CLOEXEC, 0);
        // Too large: refused by the sender, and by the receiver if sent raw.
        assert!(send(&c, &vec![0u8; MAX_MESSAGE + 1], &[]).is_err());
        socket::send(
            c.as_raw_fd(),
            &vec![0u8; MAX_MESSAGE + 10],
            MsgFlags::empty(),
        )
        .unwrap();
        assert_eq!(
            recv(&s).unwrap_err().kind(),
            std::io::ErrorKind::InvalidData
        );
        drop(c);
        assert!(recv(&s).unwrap().0.is_empty(), "end of stream");
    }
}
