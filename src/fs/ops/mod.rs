//! The filesystem's operations, async and free of FUSE types: what `fuse` calls, and
//! what tests can call directly. Inodes live in ring records (see `meta`); every change
//! to one is a compare-and-swap on its record, retried on conflict, so concurrent
//! mounts never lose each other's directory entries.

use super::chunk::{self, ChunkCache, Reclaimer};
use super::error::{FsError, FsResult};
use super::file::{AttrChanges, DataCtx, FileState, OpenFile, ReadData};
use super::inode::{self, check_name, new_inode, DirEntry, Inode, InodeExt, Kind, ROOT_INO};
use super::lease::{Leases, LEASE_TTL};
use crate::meta::client::{RecordClient, Swap};
use crate::ring::Id;
use parking_lot::Mutex;
use rand::Rng;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

mod leased;

/// How long this mount trusts a cached inode for lookups and stat. Opens always
/// re-read (close-to-open), and a failed lookup re-reads before it says ENOENT.
pub const ATTR_TTL: Duration = Duration::from_secs(1);
/// CAS retries under contention before giving up with EIO.
const MAX_SWAPS: usize = 64;
/// Closed files created under a lease that may wait for the background publisher; past
/// that, a close waits for it to catch up (what a crash can lose stays small, memory
/// bounded, and a listing never waits on thousands).
const MAX_CLOSED_UNPUBLISHED: usize = 512;
/// Inodes prefetched after an opendir.
const PREFETCH_MAX: usize = 4096;

#[derive(Clone)]
struct Cached {
    version: u64,
    inode: Arc<Inode>,
    at: Instant,
}

pub enum Handle {
    File(Arc<OpenFile>),
    Dir(Arc<Vec<DirEntry>>),
}

/// Capacity figures for statfs, in bytes of file data (parity already taken off).
#[derive(Debug, Clone, Copy, Default)]
pub struct Space {
    pub total: u64,
    pub free: u64,
}

pub struct Fs {
    pub records: RecordClient,
    pub data: DataCtx,
    fsid: String,
    inodes: Mutex<HashMap<u64, Cached>>,
    files: Mutex<HashMap<u64, Arc<OpenFile>>>,
    handles: Mutex<HashMap<u64, Handle>>,
    next_fh: AtomicU64,
    reclaimer: Reclaimer,
    /// Per inode, the version whose content the kernel's page cache holds.
    kernel_versions: Mutex<HashMap<u64, u64>>,
    space: Mutex<Option<(Instant, Space)>>,
    leases: Leases,
    pending: Mutex<Pending>,
    closed_ready: tokio::sync::Notify,
    /// Woken whenever a file created under a lease has been published.
    published: tokio::sync::Notify,
    /// Directories whose lease another mount asked for (the keeper lets go).
    release_asked: Mutex<std::collections::HashSet<u64>>,
}

/// Files created under a directory lease and not yet published (each is open here).
#[derive(Default)]
struct Pending {
    by_dir: HashMap<u64, HashMap<Vec<u8>, (u64, Instant)>>,
    inos: HashMap<u64, (u64, Vec<u8>)>,
    /// Of those, the ones closed: to be published in the background.
    closed: std::collections::HashSet<u64>,
    /// Every closed one not yet published (in a batch or not): the backlog.
    unpublished: std::collections::HashSet<u64>,
    /// Of those, directories made under the lease (no open file stands for them), with
    /// their record while it is not written yet.
    dirs: HashMap<u64, Option<Arc<Inode>>>,
    /// Ones the ring refused, tried again from `retry_at`.
    retry: std::collections::HashSet<u64>,
    retry_at: Option<Instant>,
}

impl Fs {
    pub fn new(records: RecordClient, data: DataCtx, fsid: String, reclaimer: Reclaimer) -> Fs {
        Fs {
            records,
            data,
            fsid,
            inodes: Mutex::new(HashMap::new()),
            files: Mutex::new(HashMap::new()),
            handles: Mutex::new(HashMap::new()),
            next_fh: AtomicU64::new(1),
            reclaimer,
            kernel_versions: Mutex::new(HashMap::new()),
            space: Mutex::new(None),
            leases: Leases::new(rand::thread_rng().gen_range(1..u64::MAX)),
            pending: Mutex::new(Pending::default()),
            closed_ready: tokio::sync::Notify::new(),
            published: tokio::sync::Notify::new(),
            release_asked: Mutex::new(std::collections::HashSet::new()),
        }
    }

    pub fn chunk_cache(chunks: usize, key: Arc<crate::crypto::seal::FileKey>) -> Arc<ChunkCache> {
        Arc::new(ChunkCache::new(chunks, key))
    }

    fn key(&self, ino: u64) -> Id {
        inode::record_key(&self.fsid, ino)
    }

    /// Creates the root directory if this filesystem has none yet.
    pub async fn init_root(&self) -> FsResult<()> {
        let rec = self.records.get(self.key(ROOT_INO)).await?;
        if rec.version > 0 {
            return Ok(());
        }
        let mut root = new_inode(Kind::Dir, 0o755, 0, 0);
        root.parent = ROOT_INO;
        match self.records.cas(self.key(ROOT_INO), 0, Some(inode::encode(&root))).await? {
            Swap::Done(_) | Swap::Conflict(_) => Ok(()),
        }
    }

    fn remember(&self, ino: u64, version: u64, inode: Arc<Inode>) {
        let mut m = self.inodes.lock();
        match m.get(&ino) {
            Some(c) if c.version > version => {}
            _ => {
                m.insert(ino, Cached { version, inode, at: Instant::now() });
            }
        }
    }

    fn forget(&self, ino: u64) {
        self.inodes.lock().remove(&ino);
    }

    /// The inode, from the cache if it is younger than `max_age`.
    async fn load(&self, ino: u64, max_age: Duration) -> FsResult<(u64, Arc<Inode>)> {
        let mut cached = self.inodes.lock().get(&ino).cloned();
        if self.made_dir_unwritten(ino) {
            // Made here and not on the ring yet: nobody else can reach it, so our copy
            // is the directory, however old.
            if let Some(c) = cached {
                return Ok((c.version, c.inode));
            }
            // Boxed: settling writes the parent directory, which loads it.
            Box::pin(self.settle_ino(ino)).await?;
            cached = self.inodes.lock().get(&ino).cloned();
        }
        if let Some(c) = &cached {
            if c.at.elapsed() <= max_age {
                return Ok((c.version, c.inode.clone()));
            }
        }
        let known = cached.as_ref().map(|c| c.version).unwrap_or(0);
        match self.records.get_newer(self.key(ino), known).await? {
            None => match cached {
                Some(c) => {
                    self.remember(ino, c.version, c.inode.clone());
                    Ok((c.version, c.inode))
                }
                None => Err(FsError::NotFound),
            },
            Some(rec) if !rec.exists() => {
                self.forget(ino);
                Err(FsError::NotFound)
            }
            Some(rec) => {
                let i = Arc::new(inode::decode(&rec.data).map_err(|e| FsError::Io(format!("inode {ino}: {e}")))?);
                self.remember(ino, rec.version, i.clone());
                Ok((rec.version, i))
            }
        }
    }

    /// `load` for many inodes: the ones not cached or older than `max_age` are read in
    /// one batched call per peer. Failures are left for the next `load` to report.
    async fn load_many(&self, inos: &[u64], max_age: Duration) {
        let todo: Vec<(u64, Option<Cached>)> = {
            let cache = self.inodes.lock();
            inos.iter().map(|i| (*i, cache.get(i).cloned())).filter(|(_, c)| c.as_ref().is_none_or(|c| c.at.elapsed() > max_age)).collect()
        };
        let keys: Vec<(Id, u64)> = todo.iter().map(|(ino, c)| (self.key(*ino), c.as_ref().map_or(0, |c| c.version))).collect();
        let got = self.records.get_newer_many(&keys).await;
        for ((ino, cached), r) in todo.into_iter().zip(got) {
            match r {
                Ok(None) => {
                    if let Some(c) = cached {
                        self.remember(ino, c.version, c.inode);
                    }
                }
                Ok(Some(rec)) if !rec.exists() => self.forget(ino),
                Ok(Some(rec)) => match inode::decode(&rec.data) {
                    Ok(i) => self.remember(ino, rec.version, Arc::new(i)),
                    Err(e) => log::warn!("inode {ino}: {e}"),
                },
                Err(e) => log::debug!("prefetching inode {ino}: {e}"),
            }
        }
    }

    /// Applies `f` to the inode and writes it back, re-reading and re-applying on
    /// conflict. `f` returns false when there is nothing to write.
    async fn modify<F>(&self, ino: u64, mut f: F) -> FsResult<Arc<Inode>>
    where
        F: FnMut(&mut Inode) -> FsResult<bool>,
    {
        if self.pending.lock().inos.contains_key(&ino) {
            // Boxed: settling writes the parent directory through `modify`.
            Box::pin(self.settle_ino(ino)).await?;
        }
        let (mut version, mut cur) = self.load(ino, ATTR_TTL).await?;
        let deadline = Instant::now() + LEASE_TTL * 2;
        let mut swaps = 0;
        while swaps < MAX_SWAPS {
            let mut new = (*cur).clone();
            if !f(&mut new)? {
                return Ok(cur);
            }
            if cur.lease_holder != 0 && cur.lease_holder != self.leases.me && new.entries != cur.entries {
                // Another mount holds this directory's lease and trusts its copy of the
                // entries: wait for it to let go, or for the lease to lapse.
                if self.leases.foreign_live(ino, cur.lease_holder, cur.lease_epoch, Instant::now()) {
                    (version, cur) = self.wait_for_lease(ino, version, cur, deadline).await?;
                    continue;
                }
                new.lease_holder = 0;
                new.lease_wanted = false;
            }
            swaps += 1;
            match self.records.cas(self.key(ino), version, Some(inode::encode(&new))).await? {
                Swap::Done(v) => {
                    let new = Arc::new(new);
                    self.remember(ino, v, new.clone());
                    return Ok(new);
                }
                Swap::Conflict(rec) => (version, cur) = self.adopt(ino, rec)?,
            }
        }
        Err(FsError::Io(format!("inode {ino}: gave up after {MAX_SWAPS} conflicting updates")))
    }

    /// The record a CAS conflict answered with, taken as this mount's copy (NotFound if
    /// it is deleted).
    fn adopt(&self, ino: u64, rec: crate::meta::Record) -> FsResult<(u64, Arc<Inode>)> {
        if !rec.exists() {
            self.forget(ino);
            return Err(FsError::NotFound);
        }
        let cur = Arc::new(inode::decode(&rec.data).map_err(|e| FsError::Io(format!("inode {ino}: {e}")))?);
        self.remember(ino, rec.version, cur.clone());
        Ok((rec.version, cur))
    }

    /// Deletes the inode's record and reclaims its chunks.
    async fn destroy(&self, ino: u64) -> FsResult<()> {
        if self.destroy_unless(ino, Duration::ZERO, |_| false).await? {
            Ok(())
        } else {
            Err(FsError::Io(format!("inode {ino}: could not delete it")))
        }
    }

    /// Deletes the inode's record (and reclaims its chunks) by a CAS at the version this
    /// mount has (no older than `max_age`), unless `keep` says that version must stay; a
    /// conflict re-reads and asks `keep` again. Returns true once the record is gone.
    async fn destroy_unless(&self, ino: u64, max_age: Duration, keep: impl Fn(&Inode) -> bool) -> FsResult<bool> {
        let (mut version, mut cur) = match self.load(ino, max_age).await {
            Ok(x) => x,
            Err(FsError::NotFound) => return Ok(true),
            Err(e) => return Err(e),
        };
        for _ in 0..MAX_SWAPS {
            if keep(&cur) {
                return Ok(false);
            }
            match self.records.cas(self.key(ino), version, None).await? {
                Swap::Done(_) => {
                    self.forget(ino);
                    self.reclaimer.reclaim(cur.chunks.iter().filter_map(chunk::stripe_id).collect());
                    return Ok(true);
                }
                Swap::Conflict(rec) => match self.adopt(ino, rec) {
                    Ok(x) => (version, cur) = x,
                    Err(FsError::NotFound) => return Ok(true),
                    Err(e) => return Err(e),
                },
            }
        }
        Ok(false)
    }

    /// The inode as this mount sees it, unpublished writes included.
    pub async fn getattr(&self, ino: u64) -> FsResult<Arc<Inode>> {
        let open = self.files.lock().get(&ino).cloned();
        if let Some(f) = open {
            let st = f.st.lock().await;
            return Ok(Arc::new(st.inode.clone()));
        }
        Ok(self.load(ino, ATTR_TTL).await?.1)
    }

    async fn dir(&self, ino: u64, max_age: Duration) -> FsResult<(u64, Arc<Inode>)> {
        let (v, d) = self.load(ino, max_age).await?;
        if !d.is_dir() {
            return Err(FsError::NotDir);
        }
        Ok((v, d))
    }

    /// The entry `name` in directory `parent`, re-reading the directory before saying
    /// it is not there.
    async fn entry(&self, parent: u64, name: &[u8]) -> FsResult<DirEntry> {
        if name.len() > inode::MAX_NAME {
            return Err(FsError::NameTooLong);
        }
        if self.leases.trusts(parent, Instant::now()) {
            // Under our lease nobody else changes the entries: our copy is exact.
            let cached = self.inodes.lock().get(&parent).map(|c| c.inode.clone());
            if let Some(d) = cached {
                if !d.is_dir() {
                    return Err(FsError::NotDir);
                }
                return d.find(name).cloned().ok_or(FsError::NotFound);
            }
        }
        let (_, d) = self.dir(parent, ATTR_TTL).await?;
        if let Some(e) = d.find(name) {
            return Ok(e.clone());
        }
        let (v, d) = self.dir(parent, Duration::ZERO).await?;
        if let Some(e) = d.find(name) {
            return Ok(e.clone());
        }
        // Another mount's lease: it may hold closed files it has not written yet.
        let d = self.after_foreign_lease(parent, v, d).await?;
        d.find(name).cloned().ok_or(FsError::NotFound)
    }

    /// The directory once no other mount's lease is live on it: as given, or re-read
    /// after asking the holder to publish and let go.
    async fn after_foreign_lease(&self, dir: u64, v: u64, d: Arc<Inode>) -> FsResult<Arc<Inode>> {
        if !self.leases.foreign_live(dir, d.lease_holder, d.lease_epoch, Instant::now()) {
            return Ok(d);
        }
        self.wait_for_lease(dir, v, d, Instant::now() + LEASE_TTL * 2).await?;
        Ok(self.dir(dir, Duration::ZERO).await?.1)
    }

    pub async fn lookup(&self, parent: u64, name: &[u8]) -> FsResult<(u64, Arc<Inode>)> {
        if let Some(ino) = self.pending_ino(parent, name) {
            if let Ok(i) = self.getattr(ino).await {
                return Ok((ino, i));
            }
        }
        let e = self.entry(parent, name).await?;
        match self.getattr(e.ino).await {
            Ok(i) => Ok((e.ino, i)),
            Err(FsError::NotFound) => {
                // An entry whose inode is not there: one being created by another mount
                // (`make` writes the entry and the inode at the same time), or what a
                // crash left (between those two writes, or the two steps of an rmdir).
                // Only the latter is dropped, so it does not linger.
                if !inode::being_born(&e) {
                    let _ = self.remove_entry_if(parent, name, e.ino).await;
                }
                Err(FsError::NotFound)
            }
            Err(e) => Err(e),
        }
    }

    /// Adds the entry `name -> ino` to directory `parent`; EEXIST if the name is taken
    /// by another inode (our own entry means an earlier attempt of the CAS landed).
    async fn add_entry(&self, parent: u64, name: &[u8], ino: u64, kind: u32) -> FsResult<Arc<Inode>> {
        self.modify(parent, |d| {
            if !d.is_dir() {
                return Err(FsError::NotDir);
            }
            if let Some(e) = d.find(name) {
                return if e.ino == ino { Ok(false) } else { Err(FsError::Exists) };
            }
            d.insert(DirEntry { name: name.to_vec(), ino, kind, born_ms: inode::now_ns() / 1_000_000 });
            d.touch(true);
            Ok(true)
        })
        .await
    }

    /// Removes `name` from `parent` if it still names `ino` (someone may have replaced it).
    async fn remove_entry_if(&self, parent: u64, name: &[u8], ino: u64) -> FsResult<()> {
        self.modify(parent, |d| {
            if d.find(name).is_some_and(|x| x.ino == ino) {
                d.remove(name);
                d.touch(true);
                return Ok(true);
            }
            Ok(false)
        })
        .await?;
        Ok(())
    }

    fn new_ino() -> u64 {
        loop {
            let i: u64 = rand::thread_rng().gen();
            if i > ROOT_INO && i < u64::MAX {
                return i;
            }
        }
    }

    /// Writes a new inode record under a fresh number and links it into `parent`. The
    /// two writes go out together; if either fails the other is undone, and a lookup
    /// that meets an entry without its inode drops the entry (see `lookup`).
    async fn make(&self, parent: u64, name: &[u8], mut node: Inode) -> FsResult<(u64, Arc<Inode>)> {
        check_name(name)?;
        if self.pending_ino(parent, name).is_some() {
            return Err(FsError::Exists);
        }
        let kind = node.kind;
        let ino = Self::new_ino();
        if node.is_dir() {
            node.parent = parent;
            // Born leased to its maker: nobody else can know it before its entry is
            // written, and the maker usually fills it next (cp -r, tar x, git): one CAS
            // fewer per directory.
            node.lease_holder = self.leases.me;
            node.lease_epoch = 1;
        }
        let sent = Instant::now();
        let write_inode = self.records.cas(self.key(ino), 0, Some(inode::encode(&node)));
        let link = self.add_entry(parent, name, ino, kind);
        let (written, linked) = tokio::join!(write_inode, link);
        let written = match written {
            Ok(Swap::Done(v)) => Ok(v),
            // A 64-bit random number already taken: vanishingly rare, and never ours.
            Ok(Swap::Conflict(_)) => Err(FsError::Io(format!("inode number {ino} collided"))),
            Err(e) => Err(FsError::from(e)),
        };
        match (written, linked) {
            (Ok(v), Ok(_)) => {
                let node = Arc::new(node);
                self.remember(ino, v, node.clone());
                if node.is_dir() {
                    self.leases.granted(ino, node.lease_epoch, sent);
                }
                Ok((ino, node))
            }
            (Ok(_), Err(e)) => {
                let _ = self.destroy(ino).await;
                Err(e)
            }
            (Err(e), linked) => {
                if linked.is_ok() {
                    let _ = self.remove_entry_if(parent, name, ino).await;
                }
                Err(e)
            }
        }
    }

    pub async fn mkdir(&self, parent: u64, name: &[u8], mode: u32, uid: u32, gid: u32) -> FsResult<(u64, Arc<Inode>)> {
        if let Some(made) = self.mkdir_leased(parent, name, mode, uid, gid).await? {
            return Ok(made);
        }
        self.make(parent, name, new_inode(Kind::Dir, mode, uid, gid)).await
    }

    pub async fn symlink(&self, parent: u64, name: &[u8], target: &[u8], uid: u32, gid: u32) -> FsResult<(u64, Arc<Inode>)> {
        if target.is_empty() || target.len() > 4096 {
            return Err(FsError::Invalid("symlink target must be 1..4096 bytes".into()));
        }
        let mut n = new_inode(Kind::Symlink, 0o777, uid, gid);
        n.symlink = target.to_vec();
        n.size = target.len() as u64;
        self.make(parent, name, n).await
    }

    pub async fn readlink(&self, ino: u64) -> FsResult<Vec<u8>> {
        let (_, i) = self.load(ino, ATTR_TTL).await?;
        if i.kind() != Kind::Symlink {
            return Err(FsError::Invalid("not a symlink".into()));
        }
        Ok(i.symlink.clone())
    }

    /// create(2): a new empty file, opened. Without `exclusive`, an existing file of
    /// that name is opened instead.
    pub async fn create(&self, parent: u64, name: &[u8], mode: u32, uid: u32, gid: u32, exclusive: bool) -> FsResult<(u64, Arc<Inode>, u64)> {
        check_name(name)?;
        if let Some(made) = self.create_leased(parent, name, mode, uid, gid, exclusive).await? {
            return Ok(made);
        }
        match self.make(parent, name, new_inode(Kind::File, mode, uid, gid)).await {
            Ok((ino, i)) => {
                let fh = self.open_loaded(ino, 1, (*i).clone()).await;
                Ok((ino, i, fh))
            }
            Err(FsError::Exists) if !exclusive => {
                let ino = match self.pending_ino(parent, name) {
                    Some(ino) => ino,
                    None => self.entry(parent, name).await?.ino,
                };
                let (fh, _) = self.open(ino).await?;
                Ok((ino, self.getattr(ino).await?, fh))
            }
            Err(e) => Err(e),
        }
    }

    async fn open_loaded(&self, ino: u64, version: u64, inode: Inode) -> u64 {
        let f = loop {
            let f = {
                let mut files = self.files.lock();
                files.entry(ino).or_insert_with(|| Arc::new(OpenFile::new(ino, FileState::new(version, inode.clone(), self.data.chunk_bytes)))).clone()
            };
            let mut st = f.st.lock().await;
            // A last close (or the publisher) may have dropped this state from `files`
            // while we waited for it: then take a fresh one, never two for one file.
            if !self.files.lock().get(&ino).is_some_and(|x| Arc::ptr_eq(x, &f)) {
                continue;
            }
            st.refresh(version, inode.clone());
            st.handles += 1;
            drop(st);
            break f;
        };
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        self.handles.lock().insert(fh, Handle::File(f));
        self.kernel_versions.lock().insert(ino, version);
        fh
    }

    /// open(2) on a file: always reads the newest inode (close-to-open), even when a
    /// lookup read it a moment ago: that lookup may have come from an earlier syscall,
    /// before another mount's close. Returns the handle and whether the kernel's cached
    /// pages are still this version's.
    pub async fn open(&self, ino: u64) -> FsResult<(u64, bool)> {
        self.settle_ino(ino).await?;
        let (v, i) = self.load(ino, Duration::ZERO).await?;
        match i.kind() {
            Kind::Dir => return Err(FsError::IsDir),
            Kind::Symlink => return Err(FsError::Invalid("cannot open a symlink".into())),
            Kind::File => {}
        }
        let keep = self.kernel_versions.lock().get(&ino) == Some(&v);
        let fh = self.open_loaded(ino, v, (*i).clone()).await;
        Ok((fh, keep))
    }

    fn file(&self, fh: u64) -> FsResult<Arc<OpenFile>> {
        match self.handles.lock().get(&fh) {
            Some(Handle::File(f)) => Ok(f.clone()),
            Some(Handle::Dir(_)) => Err(FsError::IsDir),
            None => Err(FsError::Invalid(format!("no open file handle {fh}"))),
        }
    }

    pub async fn read(&self, fh: u64, off: u64, len: usize) -> FsResult<ReadData> {
        self.file(fh)?.read(&self.data, off, len).await
    }

    pub async fn write(&self, fh: u64, off: u64, data: &[u8]) -> FsResult<usize> {
        let f = self.file(fh)?;
        let mut st = f.st.lock().await;
        st.flushed = false;
        st.write(&self.data, off, data).await?;
        Ok(data.len())
    }

    /// Publishes what was written through any handle of the file: other mounts see it
    /// from now on (close-to-open).
    pub async fn flush(&self, fh: u64) -> FsResult<()> {
        let f = self.file(fh)?;
        let mut st = f.st.lock().await;
        if st.create.is_some() {
            // Created under a lease: written in the background once closed (see `leased`);
            // here only the chunks go out, so a close still reports a failed write.
            self.wait_for_backlog().await;
            st.settle(&self.data).await?;
            st.flushed = true;
            return Ok(());
        }
        self.publish(f.ino, &mut st, false).await
    }

    async fn publish(&self, ino: u64, st: &mut FileState, durable: bool) -> FsResult<()> {
        st.settle(&self.data).await?;
        if durable {
            // Chunks were written lazily: on the peers' disks before the inode naming
            // them is. This syncs every peer given lazy shards lately, so it also covers
            // what earlier handles of this file wrote and closed.
            self.data.stripes.sync_lazy().await?;
        }
        if st.create.is_some() {
            return self.publish_create(ino, st, durable, true).await;
        }
        self.publish_changes(ino, st, durable).await
    }

    /// Writes what changed in `st` (settled) by CAS at the version it started from.
    async fn publish_changes(&self, ino: u64, st: &mut FileState, durable: bool) -> FsResult<()> {
        if !st.changed() {
            if durable {
                // Nothing new, but an earlier lazy publish must reach the disks.
                return self.sync_record(ino).await;
            }
            return Ok(());
        }
        let mut expected = st.version;
        for _ in 0..MAX_SWAPS {
            match self.records.cas_with(self.key(ino), expected, Some(inode::encode(&st.inode)), durable).await? {
                Swap::Done(v) => {
                    st.version = v;
                    st.content_changed = false;
                    st.attrs_changed = false;
                    st.attrs = AttrChanges::default();
                    self.remember(ino, v, Arc::new(st.inode.clone()));
                    self.kernel_versions.lock().insert(ino, v);
                    self.reclaimer.reclaim(std::mem::take(&mut st.garbage));
                    return Ok(());
                }
                Swap::Conflict(rec) => {
                    if !rec.exists() {
                        // Deleted by another mount while open here: what we wrote has
                        // no name left to be found by.
                        let mut mine: Vec<Id> = st.inode.chunks.iter().filter_map(chunk::stripe_id).collect();
                        mine.append(&mut st.garbage);
                        self.reclaimer.reclaim(mine);
                        st.content_changed = false;
                        st.attrs_changed = false;
                        self.forget(ino);
                        return Ok(());
                    }
                    let theirs = inode::decode(&rec.data).map_err(|e| FsError::Io(format!("inode {ino}: {e}")))?;
                    let mut merged = theirs.clone();
                    if st.content_changed {
                        // Whole-file last writer wins: our content replaces theirs, so
                        // no reader ever sees chunks of two writes mixed.
                        merged.size = st.inode.size;
                        merged.chunks = st.inode.chunks.clone();
                        merged.inline_data = st.inode.inline_data.clone();
                        merged.chunk_bytes = st.inode.chunk_bytes;
                        merged.mtime_ns = st.inode.mtime_ns;
                        merged.ctime_ns = merged.ctime_ns.max(st.inode.ctime_ns);
                        let ours: std::collections::HashSet<Id> = merged.chunks.iter().filter_map(chunk::stripe_id).collect();
                        st.garbage.extend(theirs.chunks.iter().filter_map(chunk::stripe_id).filter(|k| !ours.contains(k)));
                    }
                    if st.attrs_changed {
                        st.attrs.apply(&mut merged);
                    }
                    st.inode = merged;
                    expected = rec.version;
                }
            }
        }
        Err(FsError::Io(format!("inode {ino}: gave up publishing after {MAX_SWAPS} conflicts")))
    }

    /// fsync(2): published, and the inode and its chunks on the peers' disks.
    pub async fn fsync(&self, fh: u64) -> FsResult<()> {
        let f = self.file(fh)?;
        let mut st = f.st.lock().await;
        self.publish(f.ino, &mut st, true).await
    }

    /// fsync(2) on a directory: what was created or made in it under a lease is
    /// published, and its record is on the disks of its replicas (entries, like a local
    /// filesystem's fsync of a directory; the inodes they name follow their own fsyncs).
    pub async fn fsyncdir(&self, ino: u64) -> FsResult<()> {
        self.settle_ino(ino).await?;
        self.settle_dir(ino).await?;
        self.sync_record(ino).await
    }

    /// Rewrites the inode's current version durably on its replicas.
    async fn sync_record(&self, ino: u64) -> FsResult<()> {
        let rec = self.records.get(self.key(ino)).await?;
        if rec.version == 0 {
            return Err(FsError::NotFound);
        }
        self.records.put_durable(self.key(ino), &rec).await?;
        Ok(())
    }

    pub async fn release(&self, fh: u64) -> FsResult<()> {
        let h = self.handles.lock().remove(&fh);
        let Some(Handle::File(f)) = h else { return Ok(()) };
        let mut st = f.st.lock().await;
        st.handles = st.handles.saturating_sub(1);
        if st.handles == 0 && st.create.is_some() {
            // Created under a lease: published in the background, batched per directory.
            {
                let mut p = self.pending.lock();
                p.closed.insert(f.ino);
                p.unpublished.insert(f.ino);
            }
            self.closed_ready.notify_one();
            return Ok(());
        }
        let r = self.publish(f.ino, &mut st, false).await;
        if st.handles == 0 {
            self.files.lock().remove(&f.ino);
            if st.unlinked {
                let _ = self.destroy(f.ino).await;
            }
        }
        r
    }

    pub async fn setattr(&self, ino: u64, size: Option<u64>, changes: AttrChanges) -> FsResult<Arc<Inode>> {
        let mut open = self.files.lock().get(&ino).cloned();
        if let Some(f) = &open {
            if f.st.lock().await.handles == 0 {
                // Closed, created under a lease and not yet published: publish it now,
                // then change it like any other closed file.
                self.settle_ino(ino).await?;
                open = None;
            }
        }
        if let Some(f) = open {
            let mut st = f.st.lock().await;
            if let Some(s) = size {
                if st.inode.is_dir() {
                    return Err(FsError::IsDir);
                }
                st.truncate(&self.data, s).await?;
            }
            changes.apply(&mut st.inode);
            st.attrs.merge(&changes);
            st.attrs_changed = true;
            st.flushed = false;
            st.inode.ctime_ns = inode::now_ns();
            // A truncate through an open file (O_TRUNC, ftruncate) is published with
            // the writes that follow it, at close: other mounts see the old content or
            // the new, never the empty file in between.
            if size.is_none() {
                self.publish(ino, &mut st, false).await?;
            }
            return Ok(Arc::new(st.inode.clone()));
        }
        if let Some(s) = size {
            // Not open here: open it just for the truncate.
            let (v, i) = self.load(ino, Duration::ZERO).await?;
            if i.is_dir() {
                return Err(FsError::IsDir);
            }
            let mut st = FileState::new(v, (*i).clone(), self.data.chunk_bytes);
            st.truncate(&self.data, s).await?;
            changes.apply(&mut st.inode);
            st.attrs = changes;
            st.attrs_changed = true;
            self.publish(ino, &mut st, false).await?;
            return Ok(Arc::new(st.inode.clone()));
        }
        self.modify(ino, |i| {
            changes.apply(i);
            i.ctime_ns = inode::now_ns();
            Ok(true)
        })
        .await
    }

    /// Removes one name of `ino`; the inode goes when its last name and handle do.
    /// Deletes the inode's record if its last name is going and no handle of this mount
    /// has it open: one CAS at the cached version (a stale cache only makes it conflict
    /// and look again), where decrementing nlink first cost two more round trips. Returns
    /// false, touching nothing, when the file is open here or has other names.
    async fn delete_if_last_link(&self, ino: u64) -> FsResult<bool> {
        if self.files.lock().contains_key(&ino) {
            return Ok(false);
        }
        self.destroy_unless(ino, ATTR_TTL, |i| i.nlink > 1 || i.is_dir()).await
    }

    async fn drop_link(&self, ino: u64) -> FsResult<()> {
        if self.delete_if_last_link(ino).await? {
            return Ok(());
        }
        let after = match self
            .modify(ino, |i| {
                i.nlink = i.nlink.saturating_sub(1);
                i.touch(false);
                Ok(true)
            })
            .await
        {
            Ok(a) => a,
            Err(FsError::NotFound) => return Ok(()),
            Err(e) => return Err(e),
        };
        if after.nlink > 0 {
            return Ok(());
        }
        let open = self.files.lock().get(&ino).cloned();
        if let Some(f) = open {
            let mut st = f.st.lock().await;
            st.unlinked = true;
            st.inode.nlink = 0;
            return Ok(());
        }
        self.destroy(ino).await
    }

    pub async fn unlink(&self, parent: u64, name: &[u8]) -> FsResult<()> {
        self.settle_name(parent, name).await?;
        let mut removed: Option<DirEntry> = None;
        self.modify(parent, |d| {
            if !d.is_dir() {
                return Err(FsError::NotDir);
            }
            let Some(e) = d.find(name) else {
                // Gone: by an earlier attempt of ours that landed, or by someone else.
                return if removed.is_some() { Ok(false) } else { Err(FsError::NotFound) };
            };
            if e.kind == Kind::Dir as u32 {
                return Err(FsError::IsDir);
            }
            removed = d.remove(name);
            d.touch(true);
            Ok(true)
        })
        .await?;
        match removed {
            Some(e) => self.drop_link(e.ino).await,
            None => Ok(()),
        }
    }

    /// Deletes an empty directory's record, refusing if it has entries.
    async fn destroy_empty_dir(&self, ino: u64) -> FsResult<()> {
        self.settle_dir(ino).await?;
        let deadline = Instant::now() + LEASE_TTL * 2;
        for _ in 0..MAX_SWAPS {
            let (v, d) = self.load(ino, Duration::ZERO).await?;
            if !d.is_dir() {
                return Err(FsError::NotDir);
            }
            if !d.entries.is_empty() {
                return Err(FsError::NotEmpty);
            }
            if self.leases.foreign_live(ino, d.lease_holder, d.lease_epoch, Instant::now()) {
                // Its holder may be creating in it: ask, wait, and look again.
                self.wait_for_lease(ino, v, d, deadline).await?;
                continue;
            }
            if let Swap::Done(_) = self.records.cas(self.key(ino), v, None).await? {
                self.forget(ino);
                return Ok(());
            }
        }
        Err(FsError::Io(format!("directory {ino}: could not delete it")))
    }

    pub async fn rmdir(&self, parent: u64, name: &[u8]) -> FsResult<()> {
        self.settle_name(parent, name).await?;
        let e = self.entry(parent, name).await?;
        if e.kind != Kind::Dir as u32 {
            return Err(FsError::NotDir);
        }
        // The directory goes first, so that a create racing into it from another mount
        // fails rather than landing in a directory nobody can reach.
        match self.destroy_empty_dir(e.ino).await {
            Ok(()) | Err(FsError::NotFound) => {}
            Err(x) => return Err(x),
        }
        self.remove_entry_if(parent, name, e.ino).await
    }

    pub async fn rename(&self, parent: u64, name: &[u8], newparent: u64, newname: &[u8], noreplace: bool) -> FsResult<()> {
        check_name(newname)?;
        self.settle_name(parent, name).await?;
        self.settle_name(newparent, newname).await?;
        let src = self.entry(parent, name).await?;
        // A directory being replaced must be empty; check (and delete) it first.
        let target = match self.entry(newparent, newname).await {
            Ok(t) => Some(t),
            Err(FsError::NotFound) => None,
            Err(e) => return Err(e),
        };
        if let Some(t) = &target {
            if t.ino == src.ino {
                return Ok(());
            }
            if noreplace {
                return Err(FsError::Exists);
            }
            let (sd, td) = (src.kind == Kind::Dir as u32, t.kind == Kind::Dir as u32);
            if sd && !td {
                return Err(FsError::NotDir);
            }
            if !sd && td {
                return Err(FsError::IsDir);
            }
            if td {
                self.settle_dir(t.ino).await?;
                let (v, d) = self.load(t.ino, Duration::ZERO).await?;
                // Another mount may hold files it closed there but has not written yet.
                let d = self.after_foreign_lease(t.ino, v, d).await?;
                if !d.entries.is_empty() {
                    return Err(FsError::NotEmpty);
                }
            }
        }
        let moved = DirEntry { name: newname.to_vec(), ino: src.ino, kind: src.kind, born_ms: 0 };
        let mut replaced: Option<DirEntry> = None;
        let check_target = |d: &Inode, replaced: &Option<DirEntry>| -> FsResult<()> {
            if let Some(t) = d.find(newname) {
                if noreplace {
                    return Err(FsError::Exists);
                }
                if replaced.is_none() && target.as_ref().map(|x| x.ino) != Some(t.ino) {
                    // Someone put another file there since we looked.
                    if (t.kind == Kind::Dir as u32) != (src.kind == Kind::Dir as u32) || t.kind == Kind::Dir as u32 {
                        return Err(FsError::Exists);
                    }
                }
            }
            Ok(())
        };
        if parent == newparent {
            self.modify(parent, |d| {
                if d.find(name).is_none() && d.find(newname).is_some_and(|t| t.ino == src.ino) {
                    // An earlier attempt of ours landed.
                    return Ok(false);
                }
                let cur = d.find(name).ok_or(FsError::NotFound)?;
                if cur.ino != src.ino {
                    return Err(FsError::NotFound);
                }
                check_target(d, &None)?;
                d.remove(name);
                replaced = d.insert(moved.clone());
                d.touch(true);
                Ok(true)
            })
            .await?;
        } else {
            self.modify(newparent, |d| {
                if !d.is_dir() {
                    return Err(FsError::NotDir);
                }
                if d.find(newname).is_some_and(|t| t.ino == src.ino) {
                    return Ok(false);
                }
                check_target(d, &None)?;
                replaced = d.insert(moved.clone());
                d.touch(true);
                Ok(true)
            })
            .await?;
            self.remove_entry_if(parent, name, src.ino).await?;
            if src.kind == Kind::Dir as u32 {
                self.modify(src.ino, |i| {
                    i.parent = newparent;
                    i.touch(false);
                    Ok(true)
                })
                .await?;
            }
        }
        if let Some(r) = replaced {
            if r.ino != src.ino {
                if r.kind == Kind::Dir as u32 {
                    let _ = self.destroy_empty_dir(r.ino).await;
                } else {
                    self.drop_link(r.ino).await?;
                }
            }
        }
        if src.kind != Kind::Dir as u32 {
            // rename(2) changes the inode's ctime.
            let _ = self.modify(src.ino, |i| {
                i.touch(false);
                Ok(true)
            }).await;
        }
        Ok(())
    }

    pub async fn link(&self, ino: u64, newparent: u64, newname: &[u8]) -> FsResult<Arc<Inode>> {
        check_name(newname)?;
        if self.pending_ino(newparent, newname).is_some() {
            return Err(FsError::Exists);
        }
        let i = self
            .modify(ino, |i| {
                if i.is_dir() {
                    return Err(FsError::Invalid("hard links to directories are not allowed".into()));
                }
                i.nlink += 1;
                i.touch(false);
                Ok(true)
            })
            .await?;
        if let Err(e) = self.add_entry(newparent, newname, ino, i.kind).await {
            let _ = self.drop_link(ino).await;
            return Err(e);
        }
        // An open file here keeps its own copy of the inode; keep its link count right.
        let open = self.files.lock().get(&ino).cloned();
        if let Some(f) = open {
            let mut st = f.st.lock().await;
            st.inode.nlink = i.nlink;
            st.inode.ctime_ns = i.ctime_ns;
        }
        self.getattr(ino).await
    }

    pub async fn opendir(&self, ino: u64) -> FsResult<u64> {
        self.settle_dir(ino).await?;
        let (v, d) = self.dir(ino, Duration::ZERO).await?;
        let d = self.after_foreign_lease(ino, v, d).await?;
        let mut entries = Vec::with_capacity(d.entries.len() + 2);
        entries.push(DirEntry { name: b".".to_vec(), ino, kind: Kind::Dir as u32, born_ms: 0 });
        entries.push(DirEntry { name: b"..".to_vec(), ino: if d.parent == 0 { ino } else { d.parent }, kind: Kind::Dir as u32, born_ms: 0 });
        entries.extend(d.entries.iter().cloned());
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        self.handles.lock().insert(fh, Handle::Dir(Arc::new(entries)));
        Ok(fh)
    }

    /// Loads the inodes of a directory's entries that this mount has not cached, a few
    /// at a time, so that the stat calls that usually follow a listing (ls -l, find,
    /// cp -r) find them cached.
    pub async fn prefetch_children(&self, fh: u64) {
        let Ok(entries) = self.dir_entries(fh) else { return };
        let inos: Vec<u64> = entries.iter().skip(2).map(|e| e.ino).take(PREFETCH_MAX).collect();
        self.load_many(&inos, ATTR_TTL / 2).await;
    }

    /// The directory snapshot taken at opendir; readdir offsets index into it.
    pub fn dir_entries(&self, fh: u64) -> FsResult<Arc<Vec<DirEntry>>> {
        match self.handles.lock().get(&fh) {
            Some(Handle::Dir(d)) => Ok(d.clone()),
            Some(Handle::File(_)) => Err(FsError::NotDir),
            None => Err(FsError::Invalid(format!("no open directory handle {fh}"))),
        }
    }

    pub fn releasedir(&self, fh: u64) {
        self.handles.lock().remove(&fh);
    }

    pub async fn setxattr(&self, ino: u64, name: &[u8], value: &[u8], create_only: bool, replace_only: bool) -> FsResult<()> {
        if name.is_empty() || name.len() > 255 || value.len() > 64 << 10 {
            return Err(FsError::Range);
        }
        self.modify(ino, |i| {
            let pos = i.xattrs.iter().position(|x| x.name == name);
            match (pos, create_only, replace_only) {
                (Some(_), true, _) => return Err(FsError::Exists),
                (None, _, true) => return Err(FsError::NoAttr),
                (Some(p), _, _) => i.xattrs[p].value = value.to_vec(),
                (None, _, _) => i.xattrs.push(inode::Xattr { name: name.to_vec(), value: value.to_vec() }),
            }
            i.touch(false);
            Ok(true)
        })
        .await?;
        Ok(())
    }

    pub async fn getxattr(&self, ino: u64, name: &[u8]) -> FsResult<Vec<u8>> {
        let i = self.getattr(ino).await?;
        i.xattrs.iter().find(|x| x.name == name).map(|x| x.value.clone()).ok_or(FsError::NoAttr)
    }

    pub async fn listxattr(&self, ino: u64) -> FsResult<Vec<u8>> {
        let i = self.getattr(ino).await?;
        let mut out = Vec::new();
        for x in &i.xattrs {
            out.extend_from_slice(&x.name);
            out.push(0);
        }
        Ok(out)
    }

    pub async fn removexattr(&self, ino: u64, name: &[u8]) -> FsResult<()> {
        let mut found = false;
        self.modify(ino, |i| {
            let before = i.xattrs.len();
            i.xattrs.retain(|x| x.name != name);
            found = i.xattrs.len() != before;
            if found {
                i.touch(false);
            }
            Ok(found)
        })
        .await?;
        if found {
            Ok(())
        } else {
            Err(FsError::NoAttr)
        }
    }

    /// Usable capacity of the ring after parity, refreshed every few seconds.
    pub async fn space(&self) -> Space {
        if let Some((at, s)) = *self.space.lock() {
            if at.elapsed() < Duration::from_secs(5) {
                return s;
            }
        }
        let mut fetched = Err(String::new());
        for attempt in 0..3 {
            if attempt > 0 {
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
            fetched = crate::status::collect(&self.data.stripes.net, &self.data.stripes.start[0]).await;
            if fetched.is_ok() {
                break;
            }
        }
        let s = match fetched {
            Ok(st) => {
                let code = self.data.stripes.code;
                let scale = |b: u64| (b as u128 * code.k as u128 / code.total() as u128) as u64;
                let total: u64 = st.peers.iter().filter(|p| p.alive).map(|p| p.capacity_bytes).sum();
                let used: u64 = st.peers.iter().filter(|p| p.alive).map(|p| p.used_bytes).sum();
                Space { total: scale(total), free: scale(total.saturating_sub(used)) }
            }
            Err(e) => {
                // Keep the last good figures, and do not cache the failure.
                log::warn!("statfs: {e}");
                return self.space.lock().map(|(_, s)| s).unwrap_or_default();
            }
        };
        *self.space.lock() = Some((Instant::now(), s));
        s
    }

    /// Publishes every open file (unmount).
    pub async fn flush_all(&self) {
        let files: Vec<Arc<OpenFile>> = self.files.lock().values().cloned().collect();
        for f in files {
            let mut st = f.st.lock().await;
            if let Err(e) = self.publish(f.ino, &mut st, false).await {
                log::error!("inode {}: could not publish at unmount: {e}", f.ino);
            }
        }
        // Directories made under a lease, and files whose publish is being retried.
        let dirs: Vec<u64> = self.pending.lock().by_dir.keys().copied().collect();
        for dir in dirs {
            if let Err(e) = self.settle_dir(dir).await {
                log::error!("directory {dir}: could not publish what was created in it at unmount: {e}");
            }
        }
        // Giving leases back only spares other mounts a wait (a lease lapses by itself):
        // bounded, so an unmount with the ring gone does not hang on it.
        let release = async {
            for dir in self.leases.held() {
                self.write_lease(dir, false).await;
            }
        };
        let _ = tokio::time::timeout(Duration::from_secs(3), release).await;
    }

}
