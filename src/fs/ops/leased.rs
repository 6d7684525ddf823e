//! Creating files under a directory lease (see `fs::lease` for the lease itself).
//!
//! While this mount holds a directory's lease, a create is decided here without a round
//! trip: the name is checked against our exact copy of the entries and reserved locally.
//! When the file is closed, its inode (with the content: one inode write instead of
//! two) and its entry are written in the background, batched per directory; fsync writes
//! them at once, and so does anything here that needs the file on the ring (another
//! open, rename, link, readdir, ...), or `PENDING_MAX_AGE` of it staying open (then as
//! created, its content following at close). Other mounts wanting the directory's
//! entries — a lookup that finds no such name, a readdir, a change — ask for the lease
//! and wait until the holder has published and let go, so a file closed here is
//! found everywhere (close-to-open), even before it is written to the ring.

use super::{Fs, Handle, MAX_SWAPS};
use crate::fs::error::{FsError, FsResult};
use crate::fs::file::{AttrChanges, FileState, OpenFile};
use crate::fs::inode::{self, check_name, new_inode, DirEntry, Inode, InodeExt, Kind};
use crate::fs::lease::{Renewal, PENDING_MAX_AGE};
use crate::meta::client::Swap;
use futures_util::StreamExt;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How often another mount's lease is looked at again while waiting for it.
const LEASE_POLL: Duration = Duration::from_millis(10);
/// Directories with this many entries are not leased.
const LEASE_MAX_ENTRIES: usize = 2048;
/// The longest a close waits for the publisher's backlog to shrink.
const BACKLOG_WAIT_MAX: Duration = Duration::from_secs(20);
/// How long what the ring refused waits before the next try.
const RETRY_AFTER: Duration = Duration::from_secs(1);
/// Inode writes in flight per batch.
const INODE_WRITES_PARALLEL: usize = 32;
/// Files per batch (the rest wait for the next): bounds how long a batch holds them.
const BATCH_MAX: usize = 256;
/// Directories whose closed files are published at once.
const PUBLISH_DIRS_PARALLEL: usize = 16;

impl Fs {
    pub(super) fn pending_ino(&self, dir: u64, name: &[u8]) -> Option<u64> {
        self.pending.lock().by_dir.get(&dir).and_then(|m| m.get(name)).map(|x| x.0)
    }

    pub(super) fn unpend(&self, dir: u64, name: &[u8]) {
        let mut p = self.pending.lock();
        if let Some(m) = p.by_dir.get_mut(&dir) {
            if let Some((ino, _)) = m.remove(name) {
                p.inos.remove(&ino);
                p.unpublished.remove(&ino);
                self.published.notify_waiters();
            }
            if p.by_dir.get(&dir).is_some_and(|m| m.is_empty()) {
                p.by_dir.remove(&dir);
            }
        }
    }

    /// Waits (bounded) while more closed files wait for the publisher than it should
    /// have to catch up with.
    pub(super) async fn wait_for_backlog(&self) {
        let deadline = Instant::now() + BACKLOG_WAIT_MAX;
        while self.pending.lock().unpublished.len() >= super::MAX_CLOSED_UNPUBLISHED && Instant::now() < deadline {
            let _ = tokio::time::timeout(Duration::from_millis(20), self.published.notified()).await;
        }
    }

    /// Puts a file created under a lease on the ring (inode as created, and entry), so
    /// that what follows can use the ordinary paths. Its content follows at close.
    pub(super) async fn settle_ino(&self, ino: u64) -> FsResult<()> {
        let made_dir_in = {
            let p = self.pending.lock();
            match p.inos.get(&ino) {
                None => return Ok(()),
                Some((parent, _)) => p.dirs.contains_key(&ino).then_some(*parent),
            }
        };
        if let Some(parent) = made_dir_in {
            return self.publish_made_dirs(parent, &[ino]).await;
        }
        let f = self.files.lock().get(&ino).cloned();
        let Some(f) = f else { return Ok(()) };
        let mut st = f.st.lock().await;
        if st.create.is_some() {
            // Closed, or flushed with nothing written since: all of it (what the closer
            // wrote); still being written: as created, its content following at close.
            let closed = st.handles == 0;
            let whole = closed || st.flushed;
            if whole {
                st.settle(&self.data).await?;
            }
            self.publish_create(ino, &mut st, false, whole).await?;
            if closed {
                let mut m = self.files.lock();
                if m.get(&ino).is_some_and(|x| Arc::ptr_eq(x, &f)) {
                    m.remove(&ino);
                }
            }
            let mut p = self.pending.lock();
            p.closed.remove(&ino);
            p.retry.remove(&ino);
        }
        Ok(())
    }

    pub(super) async fn settle_name(&self, dir: u64, name: &[u8]) -> FsResult<()> {
        match self.pending_ino(dir, name) {
            Some(ino) => self.settle_ino(ino).await,
            None => Ok(()),
        }
    }

    /// Settles every file created under a lease in `dir`: before anything that lists the
    /// directory or changes its entries the ordinary way.
    pub(super) async fn settle_dir(&self, dir: u64) -> FsResult<()> {
        let inos: Vec<u64> = self.pending.lock().by_dir.get(&dir).map(|m| m.values().map(|x| x.0).collect()).unwrap_or_default();
        if inos.is_empty() {
            return Ok(());
        }
        // One write of the directory for all of them (it may hold thousands of entries).
        self.publish_dir_batch(dir, &inos).await
    }

    /// True if this mount holds the lease on `dir` now, taking it if it may. Any
    /// failure just means "no": the caller takes the ordinary path, which reports it.
    async fn lease(&self, dir: u64) -> bool {
        if self.leases.valid(dir, Instant::now()) {
            return true;
        }
        if !self.leases.may_acquire(dir, Instant::now()) {
            return false;
        }
        let Ok((mut version, mut d)) = self.dir(dir, super::ATTR_TTL).await else { return false };
        if d.entries.len() >= LEASE_MAX_ENTRIES {
            // Every publish rewrites the whole directory record, and many mounts'
            // files meet in big directories: the ordinary path there.
            self.leases.back_off(dir, Instant::now());
            return false;
        }
        for _ in 0..3 {
            let ours_but_wanted = d.lease_holder == self.leases.me && d.lease_wanted;
            if ours_but_wanted || self.leases.foreign_live(dir, d.lease_holder, d.lease_epoch, Instant::now()) {
                // Someone holds it, or waits for ours (which lapsed here): the keeper
                // gives ours back; meanwhile the ordinary path.
                self.leases.back_off(dir, Instant::now());
                return false;
            }
            let mut new = (*d).clone();
            new.lease_holder = self.leases.me;
            new.lease_epoch += 1;
            new.lease_wanted = false;
            let sent = Instant::now();
            match self.records.cas(self.key(dir), version, Some(inode::encode(&new))).await {
                Ok(Swap::Done(v)) => {
                    let epoch = new.lease_epoch;
                    // The CAS matched, so this copy is exactly what the ring holds.
                    self.remember(dir, v, Arc::new(new));
                    self.leases.granted(dir, epoch, sent);
                    return self.leases.valid(dir, Instant::now());
                }
                Ok(Swap::Conflict(rec)) if rec.exists() => {
                    let Ok(i) = inode::decode(&rec.data) else { return false };
                    if !i.is_dir() {
                        return false;
                    }
                    version = rec.version;
                    d = Arc::new(i);
                    self.remember(dir, version, d.clone());
                }
                _ => return false,
            }
        }
        // The directory is busy (our publisher writes it too): no new try for a while.
        self.leases.back_off_for(dir, Instant::now(), crate::fs::lease::IDLE_RELEASE);
        false
    }

    /// create(2) decided locally under `parent`'s lease; None when this mount does not
    /// hold it (or the name exists and the caller should open it the ordinary way).
    pub(super) async fn create_leased(&self, parent: u64, name: &[u8], mode: u32, uid: u32, gid: u32, exclusive: bool) -> FsResult<Option<(u64, Arc<Inode>, u64)>> {
        if !self.lease(parent).await {
            return Ok(None);
        }
        let ino = Self::new_ino();
        let node = new_inode(Kind::File, mode, uid, gid);
        {
            let mut p = self.pending.lock();
            match self.name_under_lease(&p, parent, name)? {
                NameUnderLease::Free => {}
                NameUnderLease::Taken if exclusive => return Err(FsError::Exists),
                NameUnderLease::Taken | NameUnderLease::NotLeased => return Ok(None),
            }
            reserve(&mut p, parent, name, ino);
        }
        let mut st = FileState::new(0, node.clone(), self.data.chunk_bytes);
        st.create = Some((parent, name.to_vec()));
        st.handles = 1;
        let f = Arc::new(OpenFile::new(ino, st));
        self.files.lock().insert(ino, f.clone());
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        self.handles.lock().insert(fh, Handle::File(f));
        self.kernel_versions.lock().insert(ino, 0);
        Ok(Some((ino, Arc::new(node), fh)))
    }

    /// Whether `name` is free in `parent` by this mount's exact copy; called under the
    /// pending lock, the same lock a release starts under, so no create slips past one.
    fn name_under_lease(&self, p: &super::Pending, parent: u64, name: &[u8]) -> FsResult<NameUnderLease> {
        if !self.leases.trusts(parent, Instant::now()) {
            return Ok(NameUnderLease::NotLeased);
        }
        let cached = self.inodes.lock().get(&parent).map(|c| c.inode.clone());
        let Some(d) = cached else { return Ok(NameUnderLease::NotLeased) };
        if !d.is_dir() {
            return Err(FsError::NotDir);
        }
        if p.by_dir.get(&parent).is_some_and(|m| m.contains_key(name)) || d.find(name).is_some() {
            return Ok(NameUnderLease::Taken);
        }
        Ok(NameUnderLease::Free)
    }

    /// mkdir(2) under `parent`'s lease, decided locally like a create: the directory's
    /// record (born leased to this mount, so files are created in it locally too) and its
    /// entry in `parent` are written by the publisher, in `parent`'s batch; anything
    /// that needs the directory on the ring first (a write of its record, a load, a
    /// publish of its own files) settles it. Before, each mkdir waited for the CAS that
    /// creates its record (~1 ms) and for its own write of the parent. None when this
    /// mount does not hold the lease.
    pub(super) async fn mkdir_leased(&self, parent: u64, name: &[u8], mode: u32, uid: u32, gid: u32) -> FsResult<Option<(u64, Arc<Inode>)>> {
        check_name(name)?;
        if !self.lease(parent).await {
            return Ok(None);
        }
        let ino = Self::new_ino();
        let mut node = new_inode(Kind::Dir, mode, uid, gid);
        node.parent = parent;
        node.lease_holder = self.leases.me;
        node.lease_epoch = 1;
        let node = Arc::new(node);
        {
            let mut p = self.pending.lock();
            match self.name_under_lease(&p, parent, name)? {
                NameUnderLease::Free => {}
                NameUnderLease::Taken => return Err(FsError::Exists),
                NameUnderLease::NotLeased => return Ok(None),
            }
            reserve(&mut p, parent, name, ino);
            p.dirs.insert(ino, Some(node.clone()));
            p.closed.insert(ino);
            p.unpublished.insert(ino);
        }
        // Version 1 is what the publisher will write. Nobody else can reach the
        // directory before its entry is published, after its record: the lease is safe
        // from now.
        self.remember(ino, 1, node.clone());
        self.leases.granted(ino, node.lease_epoch, Instant::now());
        self.closed_ready.notify_one();
        Ok(Some((ino, node)))
    }

    /// True if `ino` is a directory made under a lease whose record is not written yet.
    pub(super) fn made_dir_unwritten(&self, ino: u64) -> bool {
        self.pending.lock().dirs.get(&ino).is_some_and(|n| n.is_some())
    }

    /// Writes the records of these directories made under `dir`'s lease (those not
    /// written yet); returns the entries of those now on the ring and the first error.
    async fn write_made_dirs(&self, inos: &[u64]) -> (Vec<(Vec<u8>, u64, u32)>, Option<FsError>) {
        let made: Vec<(u64, Vec<u8>, Option<Arc<Inode>>)> = {
            let p = self.pending.lock();
            inos.iter().filter_map(|i| Some((*i, p.inos.get(i)?.1.clone(), p.dirs.get(i)?.clone()))).collect()
        };
        let writes: Vec<_> = made
            .iter()
            .map(|(ino, _, node)| {
                let (ino, rec) = (*ino, node.as_ref().map(|n| inode::encode(n)));
                async move {
                    match rec {
                        Some(rec) => self.write_new_inode(ino, rec, false).await.map(|_| ()),
                        None => Ok(()),
                    }
                }
            })
            .collect();
        let written: Vec<FsResult<()>> = futures_util::stream::iter(writes).buffered(INODE_WRITES_PARALLEL).collect().await;
        let mut entries = Vec::new();
        let mut first_err = None;
        for ((ino, name, _), w) in made.into_iter().zip(written) {
            match w {
                Ok(()) => {
                    if let Some(n) = self.pending.lock().dirs.get_mut(&ino) {
                        *n = None;
                    }
                    entries.push((name, ino, Kind::Dir as u32));
                }
                Err(e) => {
                    first_err.get_or_insert(e);
                }
            }
        }
        (entries, first_err)
    }

    /// Puts directories made under `dir`'s lease on the ring: records, then entries.
    async fn publish_made_dirs(&self, dir: u64, inos: &[u64]) -> FsResult<()> {
        let (entries, err) = self.write_made_dirs(inos).await;
        if !entries.is_empty() {
            self.publish_entries(dir, &entries).await?;
            self.unpend_made_dirs(dir, &entries);
        }
        err.map_or(Ok(()), Err)
    }

    fn unpend_made_dirs(&self, dir: u64, entries: &[(Vec<u8>, u64, u32)]) {
        for (name, ino, _) in entries {
            {
                let mut p = self.pending.lock();
                p.dirs.remove(ino);
                p.closed.remove(ino);
                p.retry.remove(ino);
            }
            self.unpend(dir, name);
        }
    }

    /// Writes a lease-created file's inode (version 1; with its content if
    /// `with_content`, else as created) and its entry, at the same time. The file stays
    /// pending until all of it is on the ring, so a failure is retried, never lost.
    pub(super) async fn publish_create(&self, ino: u64, st: &mut FileState, durable: bool, with_content: bool) -> FsResult<()> {
        let Some((parent, name)) = st.create.clone() else { return Ok(()) };
        let one = [(name.clone(), ino, Kind::File as u32)];
        let written_before = st.version > 0;
        if written_before {
            // An earlier attempt wrote the inode: the entry, then any change as usual.
            self.publish_entries(parent, &one).await?;
        } else {
            let (node, rec) = creation_record(st, with_content);
            let (written, linked) = tokio::join!(self.write_new_inode(ino, rec, durable), self.publish_entries(parent, &one));
            self.note_inode_written(ino, st, node, written, with_content)?;
            linked?;
        }
        if with_content && st.changed() {
            self.publish_changes(ino, st, durable).await?;
        } else if durable && written_before {
            self.sync_record(ino).await?;
        }
        if durable {
            self.sync_record(parent).await?;
        }
        st.create = None;
        self.unpend(parent, &name);
        Ok(())
    }

    /// The CAS that creates a lease-made file's record, unless an earlier attempt did.
    async fn write_new_inode(&self, ino: u64, rec: Vec<u8>, durable: bool) -> FsResult<(u64, bool)> {
        match self.records.cas_with(self.key(ino), 0, Some(rec), durable).await {
            Ok(Swap::Done(v)) => Ok((v, true)),
            // Our own random number: an earlier attempt landed; its content is not known
            // to be ours, so the next publish writes it again.
            Ok(Swap::Conflict(rec)) if rec.exists() => Ok((rec.version, false)),
            Ok(Swap::Conflict(_)) => Err(FsError::Io(format!("inode {ino}: deleted while being created"))),
            Err(e) => Err(FsError::from(e)),
        }
    }

    fn note_inode_written(&self, ino: u64, st: &mut FileState, node: Inode, written: FsResult<(u64, bool)>, with_content: bool) -> FsResult<()> {
        let (v, fresh) = written?;
        st.version = v;
        if fresh && with_content {
            st.content_changed = false;
            st.attrs_changed = false;
            st.attrs = AttrChanges::default();
            self.reclaimer.reclaim(std::mem::take(&mut st.garbage));
            self.kernel_versions.lock().insert(ino, v);
        }
        if fresh {
            self.remember(ino, v, Arc::new(node));
        }
        Ok(())
    }

    /// Publishes lease-created files that have been closed: per directory, their inodes
    /// in parallel and then all their entries in one write of the directory. What the
    /// ring refuses is retried a second later; a file whose directory is gone is dropped.
    pub(super) async fn publish_closed(&self) {
        let closed: Vec<u64> = {
            let mut p = self.pending.lock();
            let mut v: Vec<u64> = std::mem::take(&mut p.closed).into_iter().collect();
            if p.retry_at.is_some_and(|t| Instant::now() >= t) {
                v.extend(std::mem::take(&mut p.retry));
                p.retry_at = None;
            }
            v
        };
        if closed.is_empty() {
            return;
        }
        let mut by_dir: std::collections::HashMap<u64, Vec<u64>> = std::collections::HashMap::new();
        {
            let p = self.pending.lock();
            for ino in closed {
                if let Some((dir, _)) = p.inos.get(&ino) {
                    by_dir.entry(*dir).or_default().push(ino);
                }
            }
        }
        let mut later = Vec::new();
        for inos in by_dir.values_mut() {
            if inos.len() > BATCH_MAX {
                later.extend(inos.split_off(BATCH_MAX));
            }
        }
        if !later.is_empty() {
            self.pending.lock().closed.extend(later);
            self.closed_ready.notify_one();
        }
        futures_util::stream::iter(by_dir)
            .for_each_concurrent(PUBLISH_DIRS_PARALLEL, |(dir, inos)| async move {
                match self.publish_dir_batch(dir, &inos).await {
                    Ok(()) => {}
                    Err(FsError::NotFound) | Err(FsError::NotDir) => self.drop_orphans(dir, &inos).await,
                    Err(e) => log::warn!("directory {dir}: could not publish files created under its lease (retrying): {e}"),
                }
                let left: Vec<u64> = {
                    let p = self.pending.lock();
                    inos.iter().copied().filter(|i| p.inos.contains_key(i)).collect()
                };
                if !left.is_empty() {
                    self.retry_later(&left);
                }
            })
            .await;
    }

    fn retry_later(&self, inos: &[u64]) {
        let mut p = self.pending.lock();
        p.retry.extend(inos.iter().copied());
        if p.retry_at.is_none() {
            p.retry_at = Some(Instant::now() + RETRY_AFTER);
        }
    }

    /// The directory these files were created in was removed (possible only after this
    /// mount's lease on it lapsed): nothing can name them any more.
    async fn drop_orphans(&self, dir: u64, inos: &[u64]) {
        for ino in inos {
            let made_dir = {
                let mut p = self.pending.lock();
                let made = p.dirs.remove(ino);
                if made.is_some() {
                    p.closed.remove(ino);
                    p.retry.remove(ino);
                }
                made.and_then(|unwritten| p.inos.get(ino).map(|(_, n)| (n.clone(), unwritten.is_none())))
            };
            if let Some((name, written)) = made_dir {
                log::error!("{:?}: its parent directory was removed by another mount before this directory could be linked there; it is lost", String::from_utf8_lossy(&name));
                self.unpend(dir, &name);
                if written {
                    let _ = self.destroy(*ino).await;
                }
                continue;
            }
            let f = self.files.lock().get(ino).cloned();
            let Some(f) = f else { continue };
            let mut st = f.st.lock().await;
            let Some((_, name)) = st.create.take() else { continue };
            log::error!("{:?}: its directory was removed by another mount before this file could be written there; it is lost", String::from_utf8_lossy(&name));
            self.unpend(dir, &name);
            let mut stripes: Vec<crate::ring::Id> = st.inode.chunks.iter().filter_map(crate::fs::chunk::stripe_id).collect();
            stripes.append(&mut st.garbage);
            self.reclaimer.reclaim(stripes);
            let written = st.version > 0;
            drop(st);
            if written {
                let _ = self.destroy(*ino).await;
            }
            let mut m = self.files.lock();
            if m.get(ino).is_some_and(|x| Arc::ptr_eq(x, &f)) {
                m.remove(ino);
            }
        }
    }

    /// Publishes these files created under `dir`'s lease: inodes in parallel, then all
    /// entries in one write of the directory, then content written since an earlier
    /// attempt. Closed (or flushed) files go out whole, files still being written as
    /// created. What fails stays pending; the first error is returned.
    async fn publish_dir_batch(&self, dir: u64, inos: &[u64]) -> FsResult<()> {
        // Locked in one global order (by inode number): a settle and the publisher
        // may batch overlapping sets at the same time.
        let mut inos = inos.to_vec();
        inos.sort_unstable();
        inos.dedup();
        let files: Vec<Arc<OpenFile>> = {
            let m = self.files.lock();
            inos.iter().filter_map(|i| m.get(i).cloned()).collect()
        };
        let mut states = Vec::with_capacity(files.len());
        for f in &files {
            states.push(f.st.lock().await);
        }
        let mut first_err: Option<FsError> = None;
        let mut todo = Vec::new();
        let mut entries = Vec::new();
        let mut done = Vec::new();
        for (i, st) in states.iter_mut().enumerate() {
            let Some((_, name)) = st.create.clone() else { continue };
            let whole = st.handles == 0 || st.flushed;
            if whole {
                if let Err(e) = st.settle(&self.data).await {
                    first_err.get_or_insert(e);
                    continue;
                }
            }
            if st.version > 0 {
                // Written as created before: the entry, then the content, follow.
                entries.push((name, files[i].ino, Kind::File as u32));
                done.push((i, whole));
            } else {
                let (node, rec) = creation_record(st, whole);
                todo.push((i, whole, node, rec, name));
            }
        }
        // A few dozen at a time: thousands of CASes at once only time out.
        let writes: Vec<_> = todo
            .iter()
            .map(|t| {
                let (ino, rec) = (files[t.0].ino, t.3.clone());
                async move { self.write_new_inode(ino, rec, false).await }
            })
            .collect();
        let written: Vec<FsResult<(u64, bool)>> = futures_util::stream::iter(writes)
            .buffered(INODE_WRITES_PARALLEL)
            .collect()
            .await;
        for ((i, whole, node, _, name), w) in todo.into_iter().zip(written) {
            let ino = files[i].ino;
            let st = &mut states[i];
            match self.note_inode_written(ino, st, node, w, whole) {
                Ok(()) => {
                    entries.push((name, ino, Kind::File as u32));
                    done.push((i, whole));
                }
                Err(e) => {
                    first_err.get_or_insert(e);
                }
            }
        }
        // Directories made here: records now, entries in the same write of `dir`.
        let (made_dirs, err) = self.write_made_dirs(&inos).await;
        if let Some(e) = err {
            first_err.get_or_insert(e);
        }
        entries.extend(made_dirs.iter().cloned());
        if !entries.is_empty() {
            self.publish_entries(dir, &entries).await?;
        }
        self.unpend_made_dirs(dir, &made_dirs);
        for (i, whole) in done {
            let st = &mut states[i];
            if whole && st.changed() {
                if let Err(e) = self.publish_changes(files[i].ino, st, false).await {
                    first_err.get_or_insert(e);
                    continue;
                }
            }
            if st.handles == 0 {
                let mut m = self.files.lock();
                if m.get(&files[i].ino).is_some_and(|f| Arc::ptr_eq(f, &files[i])) {
                    m.remove(&files[i].ino);
                }
            }
            if let Some((_, name)) = st.create.take() {
                self.unpend(dir, &name);
            }
            let mut p = self.pending.lock();
            p.closed.remove(&files[i].ino);
            p.retry.remove(&files[i].ino);
        }
        first_err.map_or(Ok(()), Err)
    }

    /// Adds lease-created files' entries to `parent` in one write, renewing the lease on
    /// the way (or giving it back if another mount asked). Should a name have been taken
    /// meanwhile — only possible if this mount went silent for longer than its lease —
    /// that file is linked under a conflict name rather than lost.
    async fn publish_entries(&self, parent: u64, files: &[(Vec<u8>, u64, u32)]) -> FsResult<()> {
        let mut outcome = Renewal::NotOurs;
        let mut wrote_lease = false;
        let mut renamed: Vec<(Vec<u8>, Vec<u8>)> = Vec::new();
        let sent = Instant::now();
        let d = self
            .modify(parent, |d| {
                if !d.is_dir() {
                    return Err(FsError::NotDir);
                }
                outcome = self.leases.renewal(d.lease_holder, d.lease_wanted);
                wrote_lease = false;
                renamed.clear();
                let mut changed = false;
                for (name, ino, kind) in files {
                    let mut final_name = name.clone();
                    if let Some(e) = d.find(name) {
                        if e.ino == *ino {
                            continue;
                        }
                        final_name = conflict_name(name, *ino);
                        if d.find(&final_name).is_some_and(|e| e.ino == *ino) {
                            continue;
                        }
                        renamed.push((name.clone(), final_name.clone()));
                    }
                    d.insert(DirEntry { name: final_name, ino: *ino, kind: *kind, born_ms: inode::now_ns() / 1_000_000 });
                    changed = true;
                }
                if !changed {
                    return Ok(false);
                }
                d.touch(true);
                // Asked to let go: not here, since files still open may hold names
                // under this lease; the keeper publishes them all, then releases.
                if outcome == Renewal::Renew && !self.leases.releasing(parent) {
                    d.lease_epoch += 1;
                    wrote_lease = true;
                }
                Ok(true)
            })
            .await?;
        match outcome {
            Renewal::Renew if wrote_lease => self.leases.granted(parent, d.lease_epoch, sent),
            Renewal::Renew => {}
            Renewal::Release => {
                self.release_asked.lock().insert(parent);
                self.closed_ready.notify_one();
            }
            Renewal::NotOurs => self.leases.dropped(parent),
        }
        for (name, final_name) in renamed {
            log::warn!(
                "{:?} was created here under a directory lease that lapsed, and another mount took the name meanwhile: kept as {:?}",
                String::from_utf8_lossy(&name),
                String::from_utf8_lossy(&final_name)
            );
        }
        Ok(())
    }

    /// Renews (`keep`) or gives back this mount's lease on `dir`. A release stops
    /// local decisions first, then publishes what was created under the lease, so no
    /// reserved name outlives it; a renewal that finds another mount waiting releases.
    pub(super) async fn write_lease(&self, dir: u64, keep: bool) {
        if !keep {
            // No local decision, renewal or new lease here while it is given back; under
            // the pending lock, so a create either came before (and is settled below) or
            // sees the lease gone.
            {
                let _p = self.pending.lock();
                self.leases.back_off_for(dir, Instant::now(), crate::fs::lease::IDLE_RELEASE);
                self.leases.start_release(dir);
            }
            let r = self.settle_dir(dir).await;
            if let Err(e) = r {
                log::warn!("directory {dir}: could not publish files created under its lease: {e}");
                self.leases.end_release(dir);
                return;
            }
        }
        let mut outcome = Renewal::NotOurs;
        let sent = Instant::now();
        let r = self
            .modify(dir, |d| {
                outcome = self.leases.renewal(d.lease_holder, d.lease_wanted);
                match outcome {
                    Renewal::Renew if keep => d.lease_epoch += 1,
                    Renewal::Renew | Renewal::Release if !keep => {
                        d.lease_holder = 0;
                        d.lease_wanted = false;
                    }
                    _ => return Ok(false),
                }
                Ok(true)
            })
            .await;
        if !keep {
            self.leases.end_release(dir);
        }
        match (r, outcome) {
            (Ok(d), Renewal::Renew) if keep => self.leases.granted(dir, d.lease_epoch, sent),
            (Ok(_), Renewal::Release) if keep => Box::pin(self.write_lease(dir, false)).await,
            (Ok(_), Renewal::Release) => self.leases.back_off(dir, Instant::now()),
            (Ok(_), Renewal::Renew) => {}
            (Ok(_), Renewal::NotOurs) => self.leases.dropped(dir),
            (Err(e), _) => {
                log::debug!("directory {dir}: lease write failed: {e}");
                self.leases.dropped(dir);
            }
        }
    }

    /// Another mount holds `dir`'s lease: asks it once to let go, then looks again every
    /// few ms until it has or the lease lapsed (by this mount's clock), or `deadline`.
    pub(super) async fn wait_for_lease(&self, dir: u64, mut version: u64, mut cur: Arc<Inode>, deadline: Instant) -> FsResult<(u64, Arc<Inode>)> {
        for _ in 0..MAX_SWAPS * 64 {
            if !self.leases.foreign_live(dir, cur.lease_holder, cur.lease_epoch, Instant::now()) {
                return Ok((version, cur));
            }
            if Instant::now() > deadline {
                break;
            }
            if !cur.lease_wanted {
                let mut w = (*cur).clone();
                w.lease_wanted = true;
                match self.records.cas(self.key(dir), version, Some(inode::encode(&w))).await? {
                    Swap::Done(v) => {
                        version = v;
                        cur = Arc::new(w);
                        self.remember(dir, version, cur.clone());
                    }
                    Swap::Conflict(rec) => {
                        (version, cur) = self.adopt(dir, rec)?;
                        continue;
                    }
                }
            }
            tokio::time::sleep(LEASE_POLL).await;
            (version, cur) = self.load(dir, Duration::ZERO).await?;
        }
        Err(FsError::Io(format!("directory {dir}: another mount holds its lease and did not let go")))
    }

    /// Background upkeep of this mount's leases, every 100 ms until `shutdown`: files
    /// created under a lease and open for long are settled, idle leases given back,
    /// busy ones renewed.
    pub async fn keep_leases(self: Arc<Self>, mut shutdown: tokio::sync::watch::Receiver<bool>) {
        // Lease upkeep in a task of its own, so a slow batch never keeps a busy lease
        // from being renewed.
        let upkeep = {
            let (fs, mut shutdown) = (self.clone(), shutdown.clone());
            tokio::spawn(async move {
                loop {
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_millis(100)) => {}
                        _ = shutdown.changed() => return,
                    }
                    fs.lease_upkeep().await;
                }
            })
        };
        let _upkeep = AbortOnDrop(upkeep);
        loop {
            tokio::select! {
                _ = self.closed_ready.notified() => {}
                _ = tokio::time::sleep(Duration::from_millis(100)) => {}
                _ = shutdown.changed() => return,
            }
            self.publish_closed().await;
            self.publish_old_open().await;
            let asked: Vec<u64> = std::mem::take(&mut *self.release_asked.lock()).into_iter().collect();
            for dir in asked {
                self.write_lease(dir, false).await;
                self.leases.back_off(dir, Instant::now());
            }
        }
    }

    async fn lease_upkeep(&self) {
        let now = Instant::now();
        let (release, mut renew) = self.leases.upkeep(now);
        // A directory with files still to publish is busy even if no create came for a
        // while (a close may be waiting for the publisher): keep its lease.
        let busy: std::collections::HashSet<u64> = self.pending.lock().by_dir.keys().copied().collect();
        let (keep, release): (Vec<u64>, Vec<u64>) = release.into_iter().partition(|d| busy.contains(d) && self.leases.trusts(*d, now));
        renew.extend(keep);
        for dir in renew {
            self.write_lease(dir, true).await;
        }
        for dir in release {
            self.write_lease(dir, false).await;
        }
    }

    async fn publish_old_open(&self) {
        // Files still open long after their create: out as created, one batch per
        // directory (closed ones are the publisher's).
        let now = Instant::now();
        let old: Vec<(u64, Vec<u64>)> = {
            let p = self.pending.lock();
            p.by_dir
                .iter()
                .map(|(dir, m)| {
                    let inos = m.values().filter(|(ino, t)| now.duration_since(*t) >= PENDING_MAX_AGE && !p.closed.contains(ino) && !p.retry.contains(ino)).map(|(ino, _)| *ino).collect::<Vec<u64>>();
                    (*dir, inos)
                })
                .filter(|(_, v)| !v.is_empty())
                .collect()
        };
        for (dir, inos) in old {
            if let Err(e) = self.publish_dir_batch(dir, &inos).await {
                log::warn!("directory {dir}: could not publish {} open files created under its lease: {e}", inos.len());
            }
        }
    }
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The record that creates a lease-made file: as it is now, or as created (no content).
fn creation_record(st: &FileState, with_content: bool) -> (Inode, Vec<u8>) {
    let mut node = st.inode.clone();
    if !with_content {
        node.size = 0;
        node.inline_data.clear();
        node.chunks.clear();
    }
    let rec = inode::encode(&node);
    (node, rec)
}

/// `name.conflict-<ino>`, cut to fit the name limit.
fn conflict_name(name: &[u8], ino: u64) -> Vec<u8> {
    let suffix = format!(".conflict-{ino:016x}");
    let keep = name.len().min(inode::MAX_NAME - suffix.len());
    let mut n = name[..keep].to_vec();
    n.extend_from_slice(suffix.as_bytes());
    n
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conflict_names_fit_the_limit_and_differ_from_the_original() {
        let long = vec![b'a'; inode::MAX_NAME];
        let c = conflict_name(&long, 42);
        assert!(c.len() <= inode::MAX_NAME);
        assert_ne!(c, long);
        assert!(c.ends_with(b".conflict-000000000000002a"));
        assert_eq!(conflict_name(b"f", 1), b"f.conflict-0000000000000001".to_vec());
    }
}

/// Reserves `name` in `parent` for `ino`, decided under the lease (pending lock held).
fn reserve(p: &mut super::Pending, parent: u64, name: &[u8], ino: u64) {
    p.by_dir.entry(parent).or_default().insert(name.to_vec(), (ino, Instant::now()));
    p.inos.insert(ino, (parent, name.to_vec()));
}

/// What this mount's exact copy of a leased directory says about a name.
enum NameUnderLease {
    Free,
    Taken,
    /// Not leased here now (or not cached): the ordinary path decides.
    NotLeased,
}
