//! Handing a live FUSE connection to a successor, so that a crash, a restart or an upgrade
//! of the daemon pauses readers instead of failing them (issue 23).
//!
//! The standard holder is systemd's file descriptor store: after the mount the daemon sends
//! `FDSTORE=1` with `FDNAME=fuse` (the `/dev/fuse` descriptor) and its state in a sealed
//! memfd (`FDNAME=state-a` or `state-b`, alternately, the older one removed after the newer
//! is stored: a kill between the two leaves both, and the successor takes the newer).
//! While the store holds the descriptor the kernel keeps the connection, queueing requests;
//! the successor gets both back as `LISTEN_FDS`/`LISTEN_FDNAMES` (with `LISTEN_PID` its
//! own), serves the connection without a new INIT, and asks the kernel to send again the
//! requests its predecessor had read but not answered (`FUSE_NOTIFY_RESEND`, Linux 6.9+).
//!
//! A planned upgrade needs no holder: on SIGHUP the daemon re-executes the binary at the
//! path it was started from, in place (same PID), with the connection and a state memfd
//! left open across the exec and named in [`REEXEC_VAR`]; the new image resumes as above.
//!
//! The store is used only when systemd says it has one: `$FDSTORE` (systemd 254+, the
//! unit's `FileDescriptorStoreMax=`) of at least [`NEEDED`], beside `$NOTIFY_SOCKET`.
//! Older systemd keeps a store too but does not say so: the unit says it for it in
//! [`OPT_IN_VAR`] (`Environment=SEALFS_FDSTORE=8`, equal to `FileDescriptorStoreMax=`).
//!
//! The state is the tree (fs/inode.rs [`TreeState`]: names, sizes, ETags, header MACs) and
//! the successor count that keeps file handles apart: never a key, a DEK or plaintext.

use std::ffi::OsString;
use std::io::{Read, Seek, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::path::Path;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use nix::fcntl::{fcntl, FcntlArg, FdFlag, SealFlag};
use nix::sys::memfd::{memfd_create, MFdFlags};

use crate::fs::inode::TreeState;

/// The name of the stored `/dev/fuse` descriptor.
pub const FUSE_NAME: &str = "fuse";
/// The two names the state alternates between.
pub const STATE_NAMES: [&str; 2] = ["state-a", "state-b"];
/// Descriptors the store must take: the connection and two states.
pub const NEEDED: usize = 3;
/// The largest state read back (a tree of millions of files fits).
pub const MAX_STATE: usize = 512 << 20;
/// Descriptors taken from `LISTEN_FDS` at most; more is not a handover of ours.
const MAX_PASSED: usize = 16;
/// The first passed descriptor (`SD_LISTEN_FDS_START`).
const LISTEN_FDS_START: RawFd = 3;
/// `$FDSTORE` for systemd before 254, which keeps a descriptor store (since 219; names
/// since 233, removal since 236) without setting `$FDSTORE`: the unit's own opt-in.
pub const OPT_IN_VAR: &str = "SEALFS_FDSTORE";
/// Where a re-executed daemon finds what its former image passed: `PID:NAME=FD,NAME=FD`.
/// Not `LISTEN_FDS`, which wants them at 3..: moving a live descriptor onto a number that
/// another thread of the running daemon may be using is not safe.
pub const REEXEC_VAR: &str = "SEALFS_HANDOVER_FDS";
/// Where a child of the CSI mounter finds the states the mounter kept for it when its
/// predecessor crashed: `PPID:NAME=FD,...`, taken only when PPID is this process's parent
/// (the mounter, which passes the connection itself as `--fuse-fd`).
pub const HOLDER_VAR: &str = "SEALFS_HELD_FDS";
const MAGIC: &[u8] = b"sealfs-state v1\n";
/// `FUSE_NOTIFY_RESEND` (include/uapi/linux/fuse.h, protocol 7.40).
const FUSE_NOTIFY_RESEND: i32 = 7;

/// What a daemon hands its successor besides the connection.
#[derive(serde::Serialize, serde::Deserialize)]
#[cfg_attr(test, derive(Debug))]
pub struct State {
    /// Raised at every write: of two stored states the successor takes the higher.
    pub seq: u64,
    /// The mount's URI: a successor configured for another refuses the handover.
    pub uri: String,
    /// How many daemons served this connection before: file handles are
    /// `generation << 40 | n`, so a successor never gives out a number the kernel holds.
    pub generation: u32,
    pub tree: TreeState,
}

/// What the predecessor (through systemd) passed: the connection and its states.
#[derive(Default)]
pub struct Passed {
    pub fuse: Option<OwnedFd>,
    pub states: Vec<OwnedFd>,
    /// Passed by this process's former image (a SIGHUP upgrade), not by systemd: the
    /// process is already the daemon.
    pub reexec: bool,
}

impl Passed {
    pub fn is_empty(&self) -> bool {
        self.fuse.is_none() && self.states.is_empty()
    }

    /// The newest readable state, if any; an unreadable one is logged and skipped.
    pub fn newest_state(&mut self) -> Option<State> {
        let mut best: Option<State> = None;
        for fd in self.states.drain(..) {
            match read_state(fd) {
                Ok(s) if best.as_ref().is_none_or(|b| s.seq > b.seq) => best = Some(s),
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "a stored state is unreadable; skipped"),
            }
        }
        best
    }
}

/// Takes the descriptors passed by `LISTEN_FDS`/`LISTEN_FDNAMES` when `LISTEN_PID` is this
/// process, or by this process's former image in [`REEXEC_VAR`], and clears the variables
/// (children must not take them). Descriptors of other names are closed. Call before any
/// thread exists.
pub fn take_passed() -> Result<Passed, String> {
    let get = |v: &str| std::env::var(v).ok();
    let (reexec, held, pid, count, names) = (
        get(REEXEC_VAR),
        get(HOLDER_VAR),
        get("LISTEN_PID"),
        get("LISTEN_FDS"),
        get("LISTEN_FDNAMES"),
    );
    for v in [
        REEXEC_VAR,
        HOLDER_VAR,
        "LISTEN_PID",
        "LISTEN_FDS",
        "LISTEN_FDNAMES",
    ] {
        std::env::remove_var(v);
    }
    let me = std::process::id().to_string();
    let parent = std::os::unix::process::parent_id().to_string();
    let mut passed = Passed::default();
    let mut taken = Vec::new();
    // Ours when the PID is (this process, or the parent for the mounter's list);
    // otherwise systemd's LISTEN_FDS, if any, are still to take.
    for (var, value, owner) in [(REEXEC_VAR, reexec, &me), (HOLDER_VAR, held, &parent)] {
        let Some(v) = value else { continue };
        let (pid, list) = v
            .split_once(':')
            .ok_or_else(|| format!("{var}={v:?}: not PID:NAME=FD,..."))?;
        if pid != owner.as_str() {
            continue;
        }
        passed.reexec = var == REEXEC_VAR;
        for item in list.split(',').take(MAX_PASSED + 1) {
            let raw = item
                .split_once('=')
                .and_then(|(n, fd)| Some((n, fd.parse::<RawFd>().ok()?)));
            let Some((name, raw)) = raw else {
                return Err(format!("{var}: {item:?} is not NAME=FD"));
            };
            take_one(raw, Some(name), &mut taken, &mut passed)?;
        }
        return Ok(passed);
    }
    let (Some(pid), Some(count)) = (pid, count) else {
        return Ok(passed);
    };
    if pid != me {
        return Ok(passed); // meant for another process
    }
    let n: usize = count
        .parse()
        .map_err(|_| format!("LISTEN_FDS={count:?} is not a count"))?;
    if n > MAX_PASSED {
        return Err(format!(
            "LISTEN_FDS={n}: more than {MAX_PASSED} descriptors"
        ));
    }
    let names: Vec<&str> = names.as_deref().unwrap_or("").split(':').collect();
    for i in 0..n {
        let raw = LISTEN_FDS_START + i as RawFd;
        take_one(raw, names.get(i).copied(), &mut taken, &mut passed)?;
    }
    Ok(passed)
}

/// Owns the passed descriptor `raw` (open, above stdio, not taken before) as `name`.
#[allow(unsafe_code)]
fn take_one(
    raw: RawFd,
    name: Option<&str>,
    taken: &mut Vec<RawFd>,
    passed: &mut Passed,
) -> Result<(), String> {
    if taken.len() >= MAX_PASSED {
        return Err(format!("more than {MAX_PASSED} descriptors passed"));
    }
    // SAFETY: F_GETFD only asks whether `raw` is open.
    if raw < LISTEN_FDS_START
        || taken.contains(&raw)
        || unsafe { libc::fcntl(raw, libc::F_GETFD) } < 0
    {
        return Err(format!(
            "passed descriptor {raw} is not open, is stdio or is named twice"
        ));
    }
    taken.push(raw);
    // SAFETY: `raw` is open and was passed to this process to own; nothing else in it
    // refers to this number (this runs before any other descriptor is opened).
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    fcntl(&fd, FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC))
        .map_err(|e| format!("descriptor {raw}: {e}"))?;
    match name {
        Some(FUSE_NAME) if passed.fuse.is_none() => passed.fuse = Some(fd),
        Some(n) if STATE_NAMES.contains(&n) => passed.states.push(fd),
        other => tracing::warn!(name = ?other, "passed descriptor of an unknown name closed"),
    }
    Ok(())
}

/// Re-executes `exe` in this process (same PID: what systemd and every reader know
/// stays), with `argv` and the environment, passing it the connection and `state`.
/// Returns only on failure, and then the caller serves on. The caller blocks the stop
/// signals first ([`block_stop_signals`]; unblocked on failure): the exec keeps them so.
pub fn reexec(
    exe: &Path,
    argv: &[OsString],
    fuse: BorrowedFd<'_>,
    state: &State,
) -> std::io::Error {
    use std::os::unix::process::CommandExt;
    let attempt = || -> std::io::Result<std::convert::Infallible> {
        let st = write_state(state)?;
        let conn = fuse.try_clone_to_owned()?;
        // Inherited by the exec alone: cleared last, so that a child another thread spawns
        // meanwhile (a fusermount3) takes them for microseconds at most.
        for fd in [&st, &conn] {
            fcntl(fd, FcntlArg::F_SETFD(FdFlag::empty()))?;
        }
        let var = format!(
            "{}:{FUSE_NAME}={},{}={}",
            std::process::id(),
            conn.as_raw_fd(),
            STATE_NAMES[0],
            st.as_raw_fd()
        );
        let mut cmd = std::process::Command::new(exe);
        if let Some((arg0, rest)) = argv.split_first() {
            cmd.arg0(arg0).args(rest);
        }
        // Key-manager tokens were taken out of the environment at start (process.rs): the
        // new image needs them again, and takes them out again.
        for name in crate::process::TOKEN_VARS {
            if let Some(t) = crate::process::token_var(name) {
                cmd.env(name, t.as_str());
            }
        }
        // Blocked across the exec, a SIGTERM or SIGHUP stays pending for the new image's
        // handlers; otherwise its default action would end the new image before they
        // exist. (std's exec empties the mask before this closure runs.)
        // SAFETY: pthread_sigmask only; no allocation.
        #[allow(unsafe_code)]
        unsafe {
            cmd.pre_exec(|| stop_signals().thread_block().map_err(std::io::Error::from));
        }
        Err(cmd.env(REEXEC_VAR, var).exec())
    };
    match attempt() {
        Err(e) => e,
        Ok(never) => match never {},
    }
}

/// The signals that stop or upgrade a daemon.
fn stop_signals() -> nix::sys::signal::SigSet {
    use nix::sys::signal::{SigSet, Signal};
    let mut s = SigSet::empty();
    for sig in [Signal::SIGTERM, Signal::SIGINT, Signal::SIGHUP] {
        s.add(sig);
    }
    s
}

/// Blocks [`stop_signals`] on the calling thread. Every thread of a mount but the main one
/// calls it first thing, so that only the main thread takes them; an upgrade blocks them
/// there too, and then no handler of the old image can take one that the exec would lose:
/// it stays pending for the new image.
pub fn block_stop_signals() {
    let _ = stop_signals().thread_block();
}

/// Unblocks [`stop_signals`] on the calling thread: a re-executed image starts with them
/// blocked (below) and calls this once its handlers are installed.
pub fn unblock_stop_signals() {
    if let Err(e) = stop_signals().thread_unblock() {
        tracing::warn!(error = %e, "could not unblock SIGTERM/SIGINT/SIGHUP");
    }
}

/// True if `fd` is open on /dev/fuse (character device 10:229): a descriptor passed under
/// the connection's name may be anything.
pub fn is_fuse_device(fd: BorrowedFd<'_>) -> bool {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    let Ok(f) = fd.try_clone_to_owned().map(std::fs::File::from) else {
        return false;
    };
    f.metadata().is_ok_and(|m| {
        let dev = m.rdev();
        m.file_type().is_char_device() && (libc::major(dev), libc::minor(dev)) == (10, 229)
    })
}

/// True if the connection behind `fd` is still up: the kernel reports POLLERR on a
/// `/dev/fuse` descriptor whose connection was aborted (unmounted, or every holder gone).
pub fn connection_alive(fd: BorrowedFd<'_>) -> bool {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    let mut fds = [PollFd::new(fd, PollFlags::POLLIN)];
    match poll(&mut fds, PollTimeout::ZERO) {
        Ok(_) => !fds[0]
            .revents()
            .is_some_and(|r| r.intersects(PollFlags::POLLERR | PollFlags::POLLHUP)),
        Err(_) => false,
    }
}

/// True if this kernel resends interrupted requests (`FUSE_NOTIFY_RESEND`, Linux 6.9+). A
/// planned upgrade needs it: without it, the requests the old image had read are never
/// answered and their readers wait forever.
pub fn kernel_resends() -> bool {
    release_resends(&std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default())
}

/// [`kernel_resends`] for a kernel release string (`6.1.0-18-amd64`).
fn release_resends(release: &str) -> bool {
    let mut parts = release
        .trim()
        .split(['.', '-'])
        .map(|p| p.parse::<u32>().unwrap_or(0));
    let (major, minor) = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
    (major, minor) >= (6, 9)
}

/// Asks the kernel to send again every request the predecessor read and never answered.
/// `Err` with EINVAL: the kernel predates `FUSE_NOTIFY_RESEND` (Linux 6.9).
pub fn notify_resend(fd: BorrowedFd<'_>) -> std::io::Result<()> {
    // struct fuse_out_header { u32 len; i32 error (the notify code); u64 unique (0) }.
    let mut msg = [0u8; 16];
    msg[0..4].copy_from_slice(&16u32.to_ne_bytes());
    msg[4..8].copy_from_slice(&FUSE_NOTIFY_RESEND.to_ne_bytes());
    let n = nix::unistd::write(fd, &msg)?;
    if n != msg.len() {
        return Err(std::io::Error::other("short write of FUSE_NOTIFY_RESEND"));
    }
    Ok(())
}

/// The seals a state memfd carries: nobody can change it once stored.
fn seals() -> SealFlag {
    SealFlag::F_SEAL_WRITE | SealFlag::F_SEAL_GROW | SealFlag::F_SEAL_SHRINK | SealFlag::F_SEAL_SEAL
}

/// A sealed memfd holding `s`.
pub fn write_state(s: &State) -> std::io::Result<OwnedFd> {
    let json = serde_json::to_vec(s).map_err(std::io::Error::other)?;
    if MAGIC.len() + json.len() > MAX_STATE {
        return Err(std::io::Error::other(format!(
            "state of {} bytes is over {MAX_STATE}",
            json.len()
        )));
    }
    let fd = memfd_create(
        "sealfs-state",
        MFdFlags::MFD_CLOEXEC | MFdFlags::MFD_ALLOW_SEALING,
    )?;
    let mut f = std::fs::File::from(fd);
    f.write_all(MAGIC)?;
    f.write_all(&json)?;
    fcntl(&f, FcntlArg::F_ADD_SEALS(seals()))?;
    Ok(OwnedFd::from(f))
}

/// Reads a stored state: a sealed memfd, at most [`MAX_STATE`] bytes, the magic line, then
/// strict JSON. The tree inside is checked when it is restored.
pub fn read_state(fd: OwnedFd) -> Result<State, String> {
    let got = fcntl(&fd, FcntlArg::F_GET_SEALS).map_err(|e| format!("not a memfd ({e})"))?;
    if !SealFlag::from_bits_truncate(got).contains(seals()) {
        return Err("not a sealed memfd".into());
    }
    let mut f = std::fs::File::from(fd);
    f.rewind().map_err(|e| e.to_string())?;
    let mut buf = Vec::new();
    (&mut f)
        .take(MAX_STATE as u64 + 1)
        .read_to_end(&mut buf)
        .map_err(|e| e.to_string())?;
    parse_state(&buf)
}

/// A state's bytes: at most [`MAX_STATE`], the magic line, then strict JSON.
pub fn parse_state(buf: &[u8]) -> Result<State, String> {
    if buf.len() > MAX_STATE {
        return Err(format!("over {MAX_STATE} bytes"));
    }
    let json = buf
        .strip_prefix(MAGIC)
        .ok_or_else(|| "not a sealfs state (magic line)".to_string())?;
    serde_json::from_slice(json).map_err(|e| format!("malformed: {}", crate::keys::json_error(&e)))
}

/// systemd's descriptor store, when the unit has one.
pub struct FdStore {
    /// The state name written last (index into [`STATE_NAMES`]).
    current: AtomicUsize,
    seq: AtomicU64,
}

impl FdStore {
    /// The store, if `$NOTIFY_SOCKET` is set and `$FDSTORE` (or, before systemd 254,
    /// [`OPT_IN_VAR`]) allows [`NEEDED`] descriptors.
    pub fn from_env() -> Option<Self> {
        std::env::var_os("NOTIFY_SOCKET")?;
        let max: usize = std::env::var("FDSTORE")
            .or_else(|_| std::env::var(OPT_IN_VAR))
            .ok()?
            .parse()
            .ok()?;
        (max >= NEEDED).then(|| Self {
            current: AtomicUsize::new(1),
            seq: AtomicU64::new(0),
        })
    }

    /// Continues after a predecessor whose newest state had `seq`.
    pub fn continue_after(&self, seq: u64) {
        self.seq.store(seq, Ordering::SeqCst);
    }

    /// Stores the connection (systemd keeps one copy of the same open file).
    pub fn store_connection(&self, fd: BorrowedFd<'_>) -> std::io::Result<()> {
        crate::telemetry::sd_notify_with_fds(
            &format!("FDSTORE=1\nFDNAME={FUSE_NAME}"),
            &[fd.as_raw_fd()],
        )
    }

    /// The next state's sequence number.
    pub fn next_seq(&self) -> u64 {
        self.seq.fetch_add(1, Ordering::SeqCst) + 1
    }

    /// Stores `s` under the name not written last, then drops the other one.
    pub fn store_state(&self, s: &State) -> std::io::Result<()> {
        let fd = write_state(s)?;
        let old = self.current.load(Ordering::SeqCst);
        let new = 1 - old;
        crate::telemetry::sd_notify_with_fds(
            &format!("FDSTORE=1\nFDNAME={}", STATE_NAMES[new]),
            &[fd.as_fd().as_raw_fd()],
        )?;
        self.current.store(new, Ordering::SeqCst);
        crate::telemetry::sd_notify_with_fds(
            &format!("FDSTOREREMOVE=1\nFDNAME={}", STATE_NAMES[old]),
            &[],
        )
    }

    /// Empties the store (a stop: nothing is to be resumed).
    pub fn clear(&self) {
        for name in [FUSE_NAME, STATE_NAMES[0], STATE_NAMES[1]] {
            if let Err(e) = crate::telemetry::sd_notify_with_fds(
                &format!("FDSTOREREMOVE=1\nFDNAME={name}"),
                &[],
            ) {
                tracing::warn!(error = %e, name, "could not empty the descriptor store");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fs::inode::Tree;

    fn state(seq: u64) -> State {
        State {
            seq,
            uri: "file:///m".into(),
            generation: 2,
            tree: Tree::build(Default::default(), "", 20).snapshot(),
        }
    }

    #[test]
    fn resend_needs_linux_6_9() {
        for (release, resends) in [
            ("6.1.0-18-amd64", false),
            ("5.15.0", false),
            ("6.8.12\n", false),
            ("6.9.0", true),
            ("6.18.44-fc-v1300", true),
            ("7.0", true),
            ("", false),
            ("x.y", false),
        ] {
            assert_eq!(release_resends(release), resends, "{release:?}");
        }
    }

    /// The fuzz target's seed (fuzz/corpus/handover_state/seed) is what a daemon writes:
    /// `SEALFS_WRITE_FUZZ_SEED=1` rewrites it.
    #[test]
    fn the_fuzz_seed_is_a_state_a_successor_restores() {
        let seed = crate::fuzzing::handover_state_seed();
        assert_eq!(
            crate::fuzzing::handover_state(&seed),
            Ok(4),
            "root, m/ and two files"
        );
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/fuzz/corpus/handover_state/seed"
        );
        if std::env::var_os("SEALFS_WRITE_FUZZ_SEED").is_some() {
            std::fs::create_dir_all(std::path::Path::new(path).parent().unwrap()).unwrap();
            std::fs::write(path, &seed).unwrap();
        }
        assert_eq!(
            std::fs::read(path).unwrap(),
            seed,
            "run with SEALFS_WRITE_FUZZ_SEED=1"
        );
        let mut cut = seed.clone();
        cut.truncate(seed.len() / 2);
        assert!(crate::fuzzing::handover_state(&cut).is_err());
        assert!(crate::fuzzing::handover_state(&seed[1..]).is_err());
    }

    #[test]
    fn a_state_round_trips_and_the_newest_of_two_is_taken() {
        let mut p = Passed {
            fuse: None,
            reexec: false,
            states: vec![
                write_state(&state(4)).unwrap(),
                write_state(&state(9)).unwrap(),
            ],
        };
        let s = p.newest_state().unwrap();
        assert_eq!((s.seq, s.generation, s.uri.as_str()), (9, 2, "file:///m"));
    }

    #[test]
    fn an_unsealed_or_foreign_memfd_is_refused() {
        let fd = memfd_create("x", MFdFlags::MFD_ALLOW_SEALING).unwrap();
        let mut f = std::fs::File::from(fd);
        f.write_all(MAGIC).unwrap();
        f.write_all(b"{}").unwrap();
        let e = read_state(OwnedFd::from(f)).err().unwrap();
        assert_eq!(e, "not a sealed memfd");
        let fd = memfd_create("x", MFdFlags::MFD_ALLOW_SEALING).unwrap();
        let mut f = std::fs::File::from(fd);
        f.write_all(b"{\"seq\":1}").unwrap();
        fcntl(&f, FcntlArg::F_ADD_SEALS(seals())).unwrap();
        let e = read_state(OwnedFd::from(f)).err().unwrap();
        assert_eq!(e, "not a sealfs state (magic line)");
        let fd = memfd_create("x", MFdFlags::MFD_ALLOW_SEALING).unwrap();
        let mut f = std::fs::File::from(fd);
        f.write_all(MAGIC).unwrap();
        f.write_all(b"{\"seq\":1,\"extra\":").unwrap();
        fcntl(&f, FcntlArg::F_ADD_SEALS(seals())).unwrap();
        assert!(read_state(OwnedFd::from(f))
            .unwrap_err()
            .starts_with("malformed"));
    }
}
