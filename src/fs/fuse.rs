//! The FUSE binding: fuser calls arrive on a few session threads, each runs the async
//! operation to completion on the tokio runtime (bounded by OP_TIMEOUT) and replies.
//! FUSE types stop here; errors become errno here and nowhere else.

use super::error::{FsError, FsResult};
use super::file::AttrChanges;
use super::inode::{self, Inode, InodeExt, Kind};
use super::ops::{Fs, ATTR_TTL};
use fuser::{
    Errno, FileAttr, FileHandle, FileType, FopenFlags, Generation, INodeNo, KernelConfig, LockOwner, OpenFlags, RenameFlags, ReplyAttr, ReplyCreate, ReplyData,
    ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs, ReplyWrite, ReplyXattr, Request, TimeOrNow, WriteFlags,
};
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant, SystemTime};

/// No filesystem call waits longer than this; past it the caller gets EIO.
pub const OP_TIMEOUT: Duration = Duration::from_secs(60);
/// st_blksize: tools size their reads and writes by it, and a bigger request means
/// fewer trips through FUSE.
const BLKSIZE: u32 = 1 << 20;
pub const MAX_WRITE: u32 = 1 << 20;

pub struct FuseFs {
    pub fs: Arc<Fs>,
    pub rt: tokio::runtime::Handle,
    /// Set once the session exists: lets open() drop the kernel's stale attributes.
    pub notifier: Arc<OnceLock<fuser::Notifier>>,
    pub stats: Arc<OpStats>,
}

/// Per operation: calls and time spent, logged at unmount: where a workload's time
/// goes, without a profiler.
#[derive(Default)]
pub struct OpStats(parking_lot::Mutex<std::collections::BTreeMap<&'static str, (u64, Duration)>>);

impl OpStats {
    fn add(&self, op: &'static str, took: Duration) {
        let mut m = self.0.lock();
        let e = m.entry(op).or_default();
        e.0 += 1;
        e.1 += took;
    }

    pub fn report(&self) -> String {
        let mut v: Vec<_> = self.0.lock().iter().map(|(op, (n, t))| (*op, *n, *t)).collect();
        v.sort_by_key(|x| std::cmp::Reverse(x.2));
        v.iter().map(|(op, n, t)| format!("  {op:<12} {n:>9} calls {:>10.1} ms {:>8.0} us/call", t.as_secs_f64() * 1e3, t.as_secs_f64() * 1e6 / *n as f64)).collect::<Vec<_>>().join("\n")
    }
}

struct OpTimer<S: std::ops::Deref<Target = OpStats>> {
    stats: S,
    op: &'static str,
    start: Instant,
}

impl<S: std::ops::Deref<Target = OpStats>> Drop for OpTimer<S> {
    fn drop(&mut self) {
        self.stats.add(self.op, self.start.elapsed());
    }
}

/// "open" for the future of `Fs::open` (`...::Fs::open::{{closure}}`).
fn op_name<F>() -> &'static str {
    let full = std::any::type_name::<F>();
    let full = full.strip_suffix("::{{closure}}").unwrap_or(full);
    full.rsplit("::").next().unwrap_or(full)
}

fn errno(e: &FsError) -> Errno {
    Errno::from_i32(e.errno())
}

pub fn attr(ino: u64, i: &Inode) -> FileAttr {
    let (kind, size) = match i.kind() {
        Kind::File => (FileType::RegularFile, i.size),
        Kind::Dir => (FileType::Directory, 4096),
        Kind::Symlink => (FileType::Symlink, i.symlink.len() as u64),
    };
    FileAttr {
        ino: INodeNo(ino),
        size,
        blocks: size.div_ceil(512),
        atime: inode::from_ns(i.atime_ns),
        mtime: inode::from_ns(i.mtime_ns),
        ctime: inode::from_ns(i.ctime_ns),
        crtime: inode::from_ns(i.crtime_ns),
        kind,
        perm: (i.mode & 0o7777) as u16,
        // Directories say 1: "link count unknown", which find(1) and others respect.
        nlink: if i.is_dir() { 1 } else { i.nlink.max(1) },
        uid: i.uid,
        gid: i.gid,
        rdev: 0,
        blksize: BLKSIZE,
        flags: 0,
    }
}

fn time_ns(t: TimeOrNow) -> i64 {
    match t {
        TimeOrNow::Now => inode::now_ns(),
        TimeOrNow::SpecificTime(t) => inode::to_ns(t),
    }
}

fn log_err(op: &str, e: &FsError) {
    match e {
        FsError::Io(_) | FsError::NoSpace(_) => log::warn!("{op}: {e}"),
        _ => log::debug!("{op}: {e}"),
    }
}

async fn bounded<T>(f: impl std::future::Future<Output = FsResult<T>>) -> FsResult<T> {
    match tokio::time::timeout(OP_TIMEOUT, f).await {
        Ok(r) => r,
        Err(_) => Err(FsError::Io(format!("no answer from the ring within {} s", OP_TIMEOUT.as_secs()))),
    }
}

impl FuseFs {
    fn run<T, F: std::future::Future<Output = FsResult<T>>>(&self, f: F) -> FsResult<T> {
        let _timer = OpTimer { stats: &*self.stats, op: op_name::<F>(), start: Instant::now() };
        self.rt.block_on(bounded(f))
    }

    /// `run` for an operation that often waits on the ring: polled once here, and
    /// answered at once if that is enough (a cache hit); otherwise it goes on as a task
    /// that replies when done, so the session thread returns to the kernel instead of
    /// sleeping until the answer and being woken for it (a thread switch per call: a
    /// fifth of the mount's CPU in cold small-file reads).
    fn dispatch<T: 'static, F>(&self, f: F, reply: impl FnOnce(FsResult<T>) + Send + 'static)
    where
        F: std::future::Future<Output = FsResult<T>> + Send + 'static,
    {
        let timer = OpTimer { stats: self.stats.clone(), op: op_name::<F>(), start: Instant::now() };
        let _in_runtime = self.rt.enter();
        let mut f = Box::pin(bounded(f));
        // A future must only rely on the waker of its latest poll, so polling it once with
        // a waker that does nothing and then handing it to the runtime is sound.
        match std::future::Future::poll(f.as_mut(), &mut std::task::Context::from_waker(std::task::Waker::noop())) {
            std::task::Poll::Ready(r) => reply(r),
            std::task::Poll::Pending => {
                self.rt.spawn(async move {
                    reply(f.await);
                    drop(timer);
                });
            }
        }
    }
}

impl fuser::Filesystem for FuseFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        let _ = config.set_max_write(MAX_WRITE);
        let _ = config.set_max_readahead(MAX_WRITE);
        Ok(())
    }

    fn destroy(&mut self) {
        let fs = self.fs.clone();
        self.rt.block_on(async move { fs.flush_all().await });
        log::info!("time spent per operation since the mount:\n{}", self.stats.report());
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let fs = self.fs.clone();
        let name = name.as_bytes().to_vec();
        self.dispatch(async move { fs.lookup(parent.0, &name).await }, move |r| match r {
            Ok((ino, i)) => reply.entry(&ATTR_TTL, &attr(ino, &i), Generation(0)),
            Err(e) => {
                log_err("lookup", &e);
                reply.error(errno(&e))
            }
        });
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        let fs = self.fs.clone();
        self.dispatch(async move { fs.getattr(ino.0).await }, move |r| match r {
            Ok(i) => reply.attr(&ATTR_TTL, &attr(ino.0, &i)),
            Err(e) => {
                log_err("getattr", &e);
                reply.error(errno(&e))
            }
        });
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let changes = AttrChanges { mode, uid, gid, atime_ns: atime.map(time_ns), mtime_ns: mtime.map(time_ns) };
        match self.run(self.fs.setattr(ino.0, size, changes)) {
            Ok(i) => reply.attr(&ATTR_TTL, &attr(ino.0, &i)),
            Err(e) => {
                log_err("setattr", &e);
                reply.error(errno(&e))
            }
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        match self.run(self.fs.readlink(ino.0)) {
            Ok(t) => reply.data(&t),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn mknod(&self, _req: &Request, _parent: INodeNo, _name: &OsStr, mode: u32, _umask: u32, _rdev: u32, reply: ReplyEntry) {
        // Regular files come through create(); devices, fifos and sockets are not kept.
        let _ = mode;
        reply.error(Errno::from_i32(libc::EPERM));
    }

    fn mkdir(&self, req: &Request, parent: INodeNo, name: &OsStr, mode: u32, umask: u32, reply: ReplyEntry) {
        match self.run(self.fs.mkdir(parent.0, name.as_bytes(), mode & !umask, req.uid(), req.gid())) {
            Ok((ino, i)) => reply.entry(&ATTR_TTL, &attr(ino, &i), Generation(0)),
            Err(e) => {
                log_err("mkdir", &e);
                reply.error(errno(&e))
            }
        }
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        match self.run(self.fs.unlink(parent.0, name.as_bytes())) {
            Ok(()) => reply.ok(),
            Err(e) => {
                log_err("unlink", &e);
                reply.error(errno(&e))
            }
        }
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        match self.run(self.fs.rmdir(parent.0, name.as_bytes())) {
            Ok(()) => reply.ok(),
            Err(e) => {
                log_err("rmdir", &e);
                reply.error(errno(&e))
            }
        }
    }

    fn symlink(&self, req: &Request, parent: INodeNo, link_name: &OsStr, target: &std::path::Path, reply: ReplyEntry) {
        match self.run(self.fs.symlink(parent.0, link_name.as_bytes(), target.as_os_str().as_bytes(), req.uid(), req.gid())) {
            Ok((ino, i)) => reply.entry(&ATTR_TTL, &attr(ino, &i), Generation(0)),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn rename(&self, _req: &Request, parent: INodeNo, name: &OsStr, newparent: INodeNo, newname: &OsStr, flags: RenameFlags, reply: ReplyEmpty) {
        if flags.contains(RenameFlags::RENAME_EXCHANGE) || flags.contains(RenameFlags::RENAME_WHITEOUT) {
            reply.error(Errno::from_i32(libc::EINVAL));
            return;
        }
        let noreplace = flags.contains(RenameFlags::RENAME_NOREPLACE);
        match self.run(self.fs.rename(parent.0, name.as_bytes(), newparent.0, newname.as_bytes(), noreplace)) {
            Ok(()) => reply.ok(),
            Err(e) => {
                log_err("rename", &e);
                reply.error(errno(&e))
            }
        }
    }

    fn link(&self, _req: &Request, ino: INodeNo, newparent: INodeNo, newname: &OsStr, reply: ReplyEntry) {
        match self.run(self.fs.link(ino.0, newparent.0, newname.as_bytes())) {
            Ok(i) => reply.entry(&ATTR_TTL, &attr(ino.0, &i), Generation(0)),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let fs = self.fs.clone();
        let notifier = self.notifier.clone();
        let read_only = flags.0 & libc::O_ACCMODE == libc::O_RDONLY;
        self.dispatch(async move { fs.open(ino.0).await }, move |r| match r {
            Ok((fh, keep)) => {
                let mut fopen = if keep { FopenFlags::FOPEN_KEEP_CACHE } else { FopenFlags::empty() };
                if read_only {
                    // Nothing is written through this handle, so its close has nothing to
                    // publish: spare the kernel the FLUSH round trip (one per small file read).
                    fopen |= FopenFlags::FOPEN_NOFLUSH;
                }
                if !keep {
                    // Another mount changed the file: the size the kernel holds may be
                    // stale, so make it ask again.
                    if let Some(n) = notifier.get() {
                        let _ = n.inval_inode(ino, 0, 0);
                    }
                }
                reply.opened(FileHandle(fh), fopen)
            }
            Err(e) => {
                log_err("open", &e);
                reply.error(errno(&e))
            }
        });
    }

    fn read(&self, _req: &Request, _ino: INodeNo, fh: FileHandle, offset: u64, size: u32, _flags: OpenFlags, _lock: Option<LockOwner>, reply: ReplyData) {
        match self.run(self.fs.read(fh.0, offset, size as usize)) {
            Ok(d) => reply.data(&d),
            Err(e) => {
                log_err("read", &e);
                reply.error(errno(&e))
            }
        }
    }

    fn write(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        match self.run(self.fs.write(fh.0, offset, data)) {
            Ok(n) => reply.written(n as u32),
            Err(e) => {
                log_err("write", &e);
                reply.error(errno(&e))
            }
        }
    }

    fn flush(&self, _req: &Request, _ino: INodeNo, fh: FileHandle, _lock: LockOwner, reply: ReplyEmpty) {
        match self.run(self.fs.flush(fh.0)) {
            Ok(()) => reply.ok(),
            Err(e) => {
                log_err("flush", &e);
                reply.error(errno(&e))
            }
        }
    }

    fn release(&self, _req: &Request, _ino: INodeNo, fh: FileHandle, _flags: OpenFlags, _lock: Option<LockOwner>, _flush: bool, reply: ReplyEmpty) {
        match self.run(self.fs.release(fh.0)) {
            Ok(()) => reply.ok(),
            Err(e) => {
                log_err("release", &e);
                reply.error(errno(&e))
            }
        }
    }

    fn fsync(&self, _req: &Request, _ino: INodeNo, fh: FileHandle, _datasync: bool, reply: ReplyEmpty) {
        match self.run(self.fs.fsync(fh.0)) {
            Ok(()) => reply.ok(),
            Err(e) => {
                log_err("fsync", &e);
                reply.error(errno(&e))
            }
        }
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        let fs = self.fs.clone();
        let rt = self.rt.clone();
        self.dispatch(async move { fs.opendir(ino.0).await.map(|fh| (fh, fs)) }, move |r| match r {
            Ok((fh, fs)) => {
                reply.opened(FileHandle(fh), FopenFlags::empty());
                rt.spawn(async move { fs.prefetch_children(fh).await });
            }
            Err(e) => {
                log_err("opendir", &e);
                reply.error(errno(&e))
            }
        });
    }

    fn readdir(&self, _req: &Request, _ino: INodeNo, fh: FileHandle, offset: u64, mut reply: ReplyDirectory) {
        let entries = match self.fs.dir_entries(fh.0) {
            Ok(e) => e,
            Err(e) => {
                reply.error(errno(&e));
                return;
            }
        };
        for (i, e) in entries.iter().enumerate().skip(offset as usize) {
            let kind = match Kind::from_u32(e.kind) {
                Some(Kind::Dir) => FileType::Directory,
                Some(Kind::Symlink) => FileType::Symlink,
                _ => FileType::RegularFile,
            };
            if reply.add(INodeNo(e.ino), (i + 1) as u64, kind, OsStr::from_bytes(&e.name)) {
                break;
            }
        }
        reply.ok();
    }

    fn releasedir(&self, _req: &Request, _ino: INodeNo, fh: FileHandle, _flags: OpenFlags, reply: ReplyEmpty) {
        self.fs.releasedir(fh.0);
        reply.ok();
    }

    fn fsyncdir(&self, _req: &Request, ino: INodeNo, _fh: FileHandle, _datasync: bool, reply: ReplyEmpty) {
        match self.run(self.fs.fsyncdir(ino.0)) {
            Ok(()) => reply.ok(),
            Err(e) => {
                log_err("fsyncdir", &e);
                reply.error(errno(&e))
            }
        }
    }

    /// No ioctls: a regular file is no terminal (ENOTTY, which is what programs probing
    /// with TCGETS expect). fuser's default logs a warning for each one: one per file
    /// that Python or a shell opens.
    #[allow(clippy::too_many_arguments)]
    fn ioctl(&self, _req: &Request, _ino: INodeNo, _fh: FileHandle, _flags: fuser::IoctlFlags, _cmd: u32, _in_data: &[u8], _out_size: u32, reply: fuser::ReplyIoctl) {
        reply.error(Errno::from_i32(libc::ENOTTY));
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let s = self.rt.block_on(self.fs.space());
        let bsize: u64 = 4096;
        let blocks = s.total / bsize;
        let free = s.free / bsize;
        reply.statfs(blocks, free, free, u32::MAX as u64, u32::MAX as u64, bsize as u32, inode::MAX_NAME as u32, bsize as u32);
    }

    fn setxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, value: &[u8], flags: i32, _position: u32, reply: ReplyEmpty) {
        let create = flags & libc::XATTR_CREATE != 0;
        let replace = flags & libc::XATTR_REPLACE != 0;
        match self.run(self.fs.setxattr(ino.0, name.as_bytes(), value, create, replace)) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        match self.run(self.fs.getxattr(ino.0, name.as_bytes())) {
            Ok(v) => xattr_reply(reply, size, &v),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        match self.run(self.fs.listxattr(ino.0)) {
            Ok(v) => xattr_reply(reply, size, &v),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn removexattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        match self.run(self.fs.removexattr(ino.0, name.as_bytes())) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn access(&self, _req: &Request, _ino: INodeNo, _mask: fuser::AccessFlags, reply: ReplyEmpty) {
        // Permissions are checked by the kernel (default_permissions).
        reply.ok();
    }

    fn create(&self, req: &Request, parent: INodeNo, name: &OsStr, mode: u32, umask: u32, flags: i32, reply: ReplyCreate) {
        let excl = flags & libc::O_EXCL != 0;
        match self.run(self.fs.create(parent.0, name.as_bytes(), mode & !umask, req.uid(), req.gid(), excl)) {
            Ok((ino, i, fh)) => reply.created(&ATTR_TTL, &attr(ino, &i), Generation(0), FileHandle(fh), FopenFlags::empty()),
            Err(e) => {
                log_err("create", &e);
                reply.error(errno(&e))
            }
        }
    }
}

fn xattr_reply(reply: ReplyXattr, size: u32, v: &[u8]) {
    if size == 0 {
        reply.size(v.len() as u32);
    } else if v.len() > size as usize {
        reply.error(Errno::from_i32(libc::ERANGE));
    } else {
        reply.data(v);
    }
}

