//! A thin wrapper that implements the `fuser` protocol over [`SealFs`], so that the
//! filesystem itself is tested without FUSE in the loop. Metadata is answered inline from
//! memory; `open` and `read` move their reply into a tokio task, so no FUSE thread ever
//! waits on the network.

use std::ffi::OsStr;
use std::sync::Arc;
use std::time::Duration;

use fuser::{
    Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo,
    KernelConfig, LockOwner, OpenAccMode, OpenFlags, ReplyAttr, ReplyData, ReplyDirectory,
    ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs, ReplyXattr, Request,
};

use std::time::Instant;

use crate::fs::{Attr, FsError, Op, SealFs};

/// Attributes never change under an open mount except on replacement, which `open`
/// re-checks; a short TTL keeps `stat` off the FUSE channel in load loops.
const TTL: Duration = Duration::from_secs(1);

pub struct Adapter {
    pub fs: Arc<SealFs>,
    pub rt: tokio::runtime::Handle,
}

fn errno(e: &FsError) -> Errno {
    Errno::from_i32(e.errno())
}

fn file_attr(a: &Attr) -> FileAttr {
    FileAttr {
        ino: INodeNo(a.ino),
        size: a.size,
        blocks: a.size.div_ceil(512),
        atime: a.mtime,
        mtime: a.mtime,
        ctime: a.mtime,
        crtime: a.mtime,
        kind: if a.is_dir {
            FileType::Directory
        } else {
            FileType::RegularFile
        },
        perm: a.mode,
        nlink: if a.is_dir { 2 } else { 1 },
        uid: a.uid,
        gid: a.gid,
        rdev: 0,
        blksize: 1 << 20,
        flags: 0,
    }
}

impl Filesystem for Adapter {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        // Let the kernel read ahead up to 1 MiB per request (it caps at its own max_pages).
        let _ = config.set_max_readahead(1 << 20);
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let Some(name) = name.to_str() else {
            return reply.error(Errno::ENOENT);
        };
        match self.fs.lookup(parent.0, name) {
            Ok(a) => reply.entry(&TTL, &file_attr(&a), Generation(0)),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn forget(&self, _req: &Request, ino: INodeNo, _nlookup: u64) {
        // Only retired inodes are freed (a listed one stays for the next lookup).
        self.fs.forget(ino.0);
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        let t = Instant::now();
        let r = self.fs.getattr(ino.0);
        self.fs.stats.record(Op::Getattr, t, r.is_ok());
        match r {
            Ok(a) => reply.attr(&TTL, &file_attr(&a)),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn open(&self, req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        if flags.acc_mode() != OpenAccMode::O_RDONLY {
            return reply.error(Errno::from_i32(FsError::ReadOnly.errno()));
        }
        let fs = self.fs.clone();
        let who = (req.uid(), req.pid());
        let t = Instant::now();
        self.rt.spawn(async move {
            let r = fs.open(ino.0, who).await;
            fs.stats.record(Op::Open, t, r.is_ok());
            match r {
                Ok(fh) => {
                    // Immutable objects: keep the page cache across opens (mmap, warm reloads).
                    let f = if fs.config.direct_io {
                        FopenFlags::FOPEN_DIRECT_IO
                    } else {
                        FopenFlags::FOPEN_KEEP_CACHE
                    };
                    reply.opened(FileHandle(fh), f)
                }
                Err(e) => reply.error(errno(&e)),
            }
        });
    }

    fn read(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        // Cached: answer on this thread. Otherwise the reply moves into a task.
        let t = Instant::now();
        let cached = {
            let _rt = self.rt.enter();
            self.fs.read_cached(fh.0, offset, size)
        };
        // A handle from a predecessor daemon (fuse/handover.rs): opened again in the task,
        // which records this read once.
        let adopt = matches!(cached, Some(Err(FsError::BadHandle))) && self.fs.is_resumed();
        if let Some(r) = cached.as_ref().filter(|_| !adopt) {
            self.fs.stats.record(Op::Read, t, r.is_ok());
        }
        match cached {
            Some(Ok(data)) => return reply.data(data.bytes()),
            Some(Err(e)) if !adopt => return reply.error(errno(&e)),
            _ => {}
        }
        let fs = self.fs.clone();
        let who = (req.uid(), req.pid());
        self.rt.spawn(async move {
            if adopt {
                if let Err(e) = fs.reopen(fh.0, ino.0, who).await {
                    fs.stats.record(Op::Read, t, false);
                    return reply.error(errno(&e));
                }
            }
            let r = fs.read_fetching(fh.0, offset, size).await;
            fs.stats.record(Op::Read, t, r.is_ok());
            match r {
                Ok(data) => reply.data(data.bytes()),
                Err(e) => reply.error(errno(&e)),
            }
        });
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        let t = Instant::now();
        self.fs.release(fh.0);
        self.fs.stats.record(Op::Release, t, true);
        reply.ok();
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let t = Instant::now();
        let r = self.fs.readdir(ino.0);
        self.fs.stats.record(Op::Readdir, t, r.is_ok());
        let entries = match r {
            Ok(e) => e,
            Err(e) => return reply.error(errno(&e)),
        };
        for (i, (child, is_dir, name)) in entries.iter().enumerate().skip(offset as usize) {
            let kind = if *is_dir {
                FileType::Directory
            } else {
                FileType::RegularFile
            };
            if reply.add(INodeNo(*child), (i + 1) as u64, kind, name) {
                break;
            }
        }
        reply.ok();
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        reply.ok(); // nothing is ever written
    }

    fn getxattr(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _name: &OsStr,
        _size: u32,
        reply: ReplyXattr,
    ) {
        reply.error(Errno::from_i32(libc::ENODATA)); // no extended attributes
    }

    fn listxattr(&self, _req: &Request, _ino: INodeNo, size: u32, reply: ReplyXattr) {
        if size == 0 {
            reply.size(0)
        } else {
            reply.data(&[])
        }
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        reply.statfs(
            0,
            0,
            0,
            self.fs.file_count() as u64,
            0,
            1 << 20,
            1024,
            1 << 20,
        );
    }
}
