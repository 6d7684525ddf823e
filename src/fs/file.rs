//! An open file's content as this mount sees it: the published inode plus writes not
//! yet published. Writes fill chunk buffers; a full chunk goes to the ring at once (in
//! the background, a few at a time); flush writes the rest and the caller publishes
//! the new chunk list in one compare-and-swap, so other mounts see the old content or
//! the new, never a mix.

use super::chunk::{self, ChunkCache, ChunkData, ChunkRef};
use crate::crypto::seal::HEADER;
use super::error::{FsError, FsResult};
use super::inode::{Chunk, Inode};
use crate::erasure::client::StripeClient;
use crate::ring::Id;
use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;

/// Files up to this size live inside their inode record (replicated like metadata)
/// rather than in a stripe of their own.
pub const INLINE_MAX: usize = 64 << 10;
/// Chunk writes in flight per file: enough to keep k+m peers busy.
const MAX_INFLIGHT: usize = 4;
/// Chunks a file's writer leaves in the read cache: the first ones only. Past them a
/// write is a stream, whose chunks would only push out what readers use (a 512 MiB write
/// cycled all 16 slots 8 times), and every cached 4 MiB was another buffer to page in.
const WRITE_CACHED_CHUNKS: u64 = 4;
/// Chunks fetched ahead of a sequential reader.
const READ_AHEAD_CHUNKS: u64 = 2;
/// Dirty (unsubmitted) bytes per file before partial chunks are written out anyway.
const MAX_DIRTY_BYTES: usize = 64 << 20;
/// Largest file: chunk indexes stay far from overflow.
pub const MAX_FILE_BYTES: u64 = 1 << 44;

/// What the data path needs: the stripe client, the shared chunk cache, the chunk size.
pub struct DataCtx {
    pub stripes: StripeClient,
    pub cache: Arc<ChunkCache>,
    pub chunk_bytes: usize,
}

/// Attribute changes asked for explicitly (chmod, chown, utimens) while open.
#[derive(Debug, Clone, Default)]
pub struct AttrChanges {
    pub mode: Option<u32>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub atime_ns: Option<i64>,
    pub mtime_ns: Option<i64>,
}

impl AttrChanges {
    pub fn apply(&self, i: &mut Inode) {
        if let Some(m) = self.mode {
            i.mode = m & 0o7777;
        }
        if let Some(u) = self.uid {
            i.uid = u;
        }
        if let Some(g) = self.gid {
            i.gid = g;
        }
        if let Some(t) = self.atime_ns {
            i.atime_ns = t;
        }
        if let Some(t) = self.mtime_ns {
            i.mtime_ns = t;
        }
    }

    pub fn merge(&mut self, o: &AttrChanges) {
        self.mode = o.mode.or(self.mode);
        self.uid = o.uid.or(self.uid);
        self.gid = o.gid.or(self.gid);
        self.atime_ns = o.atime_ns.or(self.atime_ns);
        self.mtime_ns = o.mtime_ns.or(self.mtime_ns);
    }
}

/// A piece of a read, resolved under the file's lock and filled outside it.
enum Piece {
    Bytes(Vec<u8>),
    Shared(ChunkData, usize, usize),
    Stored(ChunkRef, usize, usize),
    Zeros(usize),
}

type Inflight = (u64, ChunkData, tokio::task::JoinHandle<FsResult<Chunk>>);

pub struct FileState {
    /// Bytes per chunk of this file: fixed when it was first cut into chunks, so a
    /// mount with another code reads it right.
    cb: usize,
    /// Version of the record `inode` started from.
    pub version: u64,
    /// The inode with this mount's unpublished changes applied.
    pub inode: Inode,
    /// Content lives in `inode.inline_data` rather than in chunks.
    inline: bool,
    dirty: BTreeMap<u64, Vec<u8>>,
    /// Chunks on their way to the ring, readable until they land.
    pending: BTreeMap<u64, ChunkData>,
    inflight: VecDeque<Inflight>,
    /// Stripes this file no longer refers to once the next publish lands.
    pub garbage: Vec<Id>,
    pub content_changed: bool,
    pub attrs: AttrChanges,
    pub attrs_changed: bool,
    pub handles: u32,
    /// The last name went while open: delete when the last handle closes.
    pub unlinked: bool,
    /// Created under a directory lease and not yet published: (directory, name). The
    /// next publish writes the inode (version 1) and the entry together.
    pub create: Option<(u64, Vec<u8>)>,
    /// Flushed (a close) with no write since: what is here is what the closer wrote.
    pub flushed: bool,
    failed: Option<FsError>,
}

impl FileState {
    pub fn new(version: u64, inode: Inode, default_chunk_bytes: usize) -> FileState {
        let inline = inode.chunks.is_empty();
        let cb = if inode.chunk_bytes > 0 && !inline { inode.chunk_bytes as usize } else { default_chunk_bytes };
        FileState {
            cb,
            version,
            inode,
            inline,
            dirty: BTreeMap::new(),
            pending: BTreeMap::new(),
            inflight: VecDeque::new(),
            garbage: Vec::new(),
            content_changed: false,
            attrs: AttrChanges::default(),
            attrs_changed: false,
            handles: 0,
            unlinked: false,
            create: None,
            flushed: false,
            failed: None,
        }
    }

    pub fn changed(&self) -> bool {
        self.content_changed || self.attrs_changed
    }

    /// Takes a newer published version when nothing here is unpublished.
    pub fn refresh(&mut self, version: u64, inode: Inode) {
        if !self.changed() && self.create.is_none() && self.dirty.is_empty() && self.inflight.is_empty() && version > self.version {
            let handles = self.handles;
            let unlinked = self.unlinked;
            let cb = self.cb;
            *self = FileState::new(version, inode, cb);
            self.handles = handles;
            self.unlinked = unlinked;
        }
    }

    pub fn size(&self) -> u64 {
        self.inode.size
    }

    fn chunk_extent(&self, cb: usize, idx: u64) -> usize {
        let start = idx * cb as u64;
        self.inode.size.saturating_sub(start).min(cb as u64) as usize
    }

    /// Chunk `idx` as currently visible, as an owned buffer to modify.
    async fn load_chunk(&self, ctx: &DataCtx, idx: u64) -> FsResult<Vec<u8>> {
        let extent = self.chunk_extent(self.cb, idx);
        let mut v = if let Some(d) = self.dirty.get(&idx) {
            d.clone()
        } else if let Some(p) = self.pending.get(&idx) {
            p.as_ref().clone()
        } else if let Some(c) = self.inode.chunks.get(idx as usize) {
            match chunk::chunk_ref(c) {
                Some(r) => ctx.cache.get(&ctx.stripes, r).await?.as_ref().clone(),
                None => Vec::new(),
            }
        } else {
            Vec::new()
        };
        v.truncate(extent);
        Ok(v)
    }

    pub async fn write(&mut self, ctx: &DataCtx, off: u64, data: &[u8]) -> FsResult<()> {
        let end = off.checked_add(data.len() as u64).filter(|e| *e <= MAX_FILE_BYTES).ok_or(FsError::TooBig)?;
        if let Some(e) = &self.failed {
            return Err(e.clone());
        }
        if self.inline && end > INLINE_MAX as u64 {
            let bytes = std::mem::take(&mut self.inode.inline_data);
            self.inline = false;
            if !bytes.is_empty() {
                self.dirty.insert(0, bytes);
            }
        }
        if self.inline {
            let d = &mut self.inode.inline_data;
            if d.len() < end as usize {
                d.resize(end as usize, 0);
            }
            d[off as usize..end as usize].copy_from_slice(data);
        } else {
            let cb = self.cb as u64;
            let mut pos = off;
            while pos < end {
                let idx = pos / cb;
                let in_chunk = (pos - idx * cb) as usize;
                let n = ((cb - in_chunk as u64).min(end - pos)) as usize;
                if !self.dirty.contains_key(&idx) {
                    // A write that starts the chunk and reaches past its old content
                    // needs nothing of the old.
                    let old_extent = self.chunk_extent(self.cb, idx);
                    // A whole-megabyte write is a stream: room for the whole chunk at once.
                    // Judged by the whole write, not by its part in this chunk: chunks are
                    // 64 bytes short of 4 MiB, so a stream's 1 MiB writes straddle them and
                    // each chunk began with a part just short of 1 MiB, got 1 MiB of room,
                    // and was copied again when it grew (a fifth of the chunk copies).
                    let room = if data.len() >= 1 << 20 { self.cb } else { self.cb.min(1 << 20) };
                    let buf = if in_chunk == 0 && n >= old_extent { Vec::with_capacity(room) } else { self.load_chunk(ctx, idx).await? };
                    self.dirty.insert(idx, buf);
                }
                let buf = self.dirty.get_mut(&idx).expect("inserted above");
                let src = &data[(pos - off) as usize..(pos - off) as usize + n];
                if buf.capacity() < in_chunk + n {
                    // Straight to a whole chunk: doubling 1 → 2 → 4 MiB copied 3 MiB per chunk.
                    buf.reserve_exact(self.cb.max(in_chunk + n) - buf.len());
                }
                if in_chunk == buf.len() {
                    // Appending: no zero fill of bytes about to be overwritten.
                    buf.extend_from_slice(src);
                } else {
                    if buf.len() < in_chunk + n {
                        buf.resize(in_chunk + n, 0);
                    }
                    buf[in_chunk..in_chunk + n].copy_from_slice(src);
                }
                if buf.len() == self.cb {
                    let full = self.dirty.remove(&idx).expect("present");
                    self.submit(ctx, idx, full);
                }
                pos += n as u64;
            }
        }
        self.inode.size = self.inode.size.max(end);
        self.inode.mtime_ns = super::inode::now_ns();
        self.inode.ctime_ns = self.inode.mtime_ns;
        self.content_changed = true;
        if self.inflight.len() > MAX_INFLIGHT {
            self.drain(MAX_INFLIGHT).await;
        }
        if self.dirty.values().map(|b| b.len()).sum::<usize>() > MAX_DIRTY_BYTES {
            let all: Vec<u64> = self.dirty.keys().copied().collect();
            for idx in all {
                let b = self.dirty.remove(&idx).expect("present");
                self.submit(ctx, idx, b);
            }
            self.drain(MAX_INFLIGHT).await;
        }
        match &self.failed {
            Some(e) => Err(e.clone()),
            None => Ok(()),
        }
    }

    fn submit(&mut self, ctx: &DataCtx, idx: u64, buf: Vec<u8>) {
        let data: ChunkData = Arc::new(buf);
        self.pending.insert(idx, data.clone());
        let client = ctx.stripes.clone();
        let cache = ctx.cache.clone();
        let d2 = data.clone();
        let task = tokio::spawn(async move {
            // AES-GCM over 4 MiB takes milliseconds: not on an async worker, where it would
            // hold up the connections carrying other chunks' shards.
            let (c2, d3) = (cache.clone(), d2.clone());
            let sealed = tokio::task::spawn_blocking(move || c2.seal(&d3)).await.map_err(|e| FsError::Io(format!("seal task failed: {e}")))?;
            let seal = sealed[..HEADER].to_vec();
            // Lazily: a close promises visibility, not durability; fsync syncs the peers
            // (see `Fs::publish`). Waiting for two fsyncs per shard made every close of a
            // big file cost tens of milliseconds.
            let key = client.write_stripe_lazy(sealed).await?;
            if idx < WRITE_CACHED_CHUNKS {
                cache.insert(key, d2.clone());
            }
            Ok(Chunk { stripe: key.to_bytes().to_vec(), len: d2.len() as u32, seal })
        });
        self.inflight.push_back((idx, data, task));
    }

    /// Waits for chunk writes, oldest first, until at most `keep` are in flight; their
    /// stripes replace the chunks they rewrote.
    async fn drain(&mut self, keep: usize) {
        while self.inflight.len() > keep {
            let (idx, data, task) = self.inflight.pop_front().expect("non-empty");
            let r = match task.await {
                Ok(r) => r,
                Err(e) => Err(FsError::Io(format!("chunk write task: {e}"))),
            };
            match r {
                Ok(c) => {
                    let i = idx as usize;
                    if self.inode.chunks.len() <= i {
                        self.inode.chunks.resize(i + 1, Chunk::default());
                    }
                    let old = std::mem::replace(&mut self.inode.chunks[i], c);
                    if let Some(k) = chunk::stripe_id(&old) {
                        self.garbage.push(k);
                    }
                }
                Err(e) => {
                    log::warn!("chunk {idx} write failed: {e}");
                    // Keep the bytes so a later flush can try again.
                    self.dirty.entry(idx).or_insert_with(|| data.as_ref().clone());
                    self.failed = Some(e);
                }
            }
            if self.pending.get(&idx).is_some_and(|p| Arc::ptr_eq(p, &data)) {
                self.pending.remove(&idx);
            }
        }
    }

    /// Everything written so far is on the ring and in `inode`, ready to publish.
    pub async fn settle(&mut self, ctx: &DataCtx) -> FsResult<()> {
        self.failed = None;
        if !self.inline && self.inode.size <= INLINE_MAX as u64 && self.content_changed {
            // Small again (or never grew): back into the inode.
            let bytes = self.load_chunk(ctx, 0).await?;
            self.drain(0).await;
            for c in self.inode.chunks.drain(..) {
                if let Some(k) = chunk::stripe_id(&c) {
                    self.garbage.push(k);
                }
            }
            self.dirty.clear();
            self.pending.clear();
            self.inline = true;
            let mut bytes = bytes;
            bytes.resize(self.inode.size as usize, 0);
            self.inode.inline_data = bytes;
            self.failed = None;
            return Ok(());
        }
        let idxs: Vec<u64> = self.dirty.keys().copied().collect();
        for idx in idxs {
            let b = self.dirty.remove(&idx).expect("present");
            self.submit(ctx, idx, b);
        }
        self.drain(0).await;
        if let Some(e) = self.failed.take() {
            return Err(e);
        }
        if !self.inline {
            let n = self.inode.size.div_ceil(self.cb as u64) as usize;
            if self.inode.chunks.len() > n {
                for c in self.inode.chunks.drain(n..) {
                    if let Some(k) = chunk::stripe_id(&c) {
                        self.garbage.push(k);
                    }
                }
            }
            self.inode.chunk_bytes = self.cb as u32;
        }
        Ok(())
    }

    pub async fn truncate(&mut self, ctx: &DataCtx, size: u64) -> FsResult<()> {
        if size > MAX_FILE_BYTES {
            return Err(FsError::TooBig);
        }
        if size == self.inode.size {
            return Ok(());
        }
        self.drain(0).await;
        if self.inline {
            if size > INLINE_MAX as u64 {
                let bytes = std::mem::take(&mut self.inode.inline_data);
                self.inline = false;
                if !bytes.is_empty() {
                    self.dirty.insert(0, bytes);
                }
            } else {
                self.inode.inline_data.resize(size as usize, 0);
            }
        }
        if !self.inline && size < self.inode.size {
            let cb = self.cb as u64;
            let keep = size.div_ceil(cb);
            self.dirty.retain(|i, _| *i < keep);
            if !size.is_multiple_of(cb) {
                let idx = size / cb;
                let mut buf = self.load_chunk(ctx, idx).await?;
                buf.truncate((size - idx * cb) as usize);
                self.dirty.insert(idx, buf);
            }
            if self.inode.chunks.len() as u64 > keep {
                for c in self.inode.chunks.drain(keep as usize..) {
                    if let Some(k) = chunk::stripe_id(&c) {
                        self.garbage.push(k);
                    }
                }
            }
        }
        self.inode.size = size;
        self.inode.mtime_ns = super::inode::now_ns();
        self.inode.ctime_ns = self.inode.mtime_ns;
        self.content_changed = true;
        Ok(())
    }

    fn plan_read(&self, cb: usize, off: u64, len: usize) -> Vec<Piece> {
        let end = (off + len as u64).min(self.inode.size);
        let mut out = Vec::new();
        if off >= end {
            return out;
        }
        if self.inline {
            let d = &self.inode.inline_data;
            let have = (d.len() as u64).min(end);
            if off < have {
                out.push(Piece::Bytes(d[off as usize..have as usize].to_vec()));
            }
            let zeros = end - have.max(off);
            if zeros > 0 {
                out.push(Piece::Zeros(zeros as usize));
            }
            return out;
        }
        let cb64 = cb as u64;
        let mut pos = off;
        while pos < end {
            let idx = pos / cb64;
            let s = (pos - idx * cb64) as usize;
            let e = ((end - idx * cb64).min(cb64)) as usize;
            if let Some(d) = self.dirty.get(&idx) {
                out.push(Piece::Shared(Arc::new(d.clone()), s, e));
            } else if let Some(p) = self.pending.get(&idx) {
                out.push(Piece::Shared(p.clone(), s, e));
            } else if let Some(r) = self.inode.chunks.get(idx as usize).and_then(chunk::chunk_ref) {
                out.push(Piece::Stored(r, s, e));
            } else {
                out.push(Piece::Zeros(e - s));
            }
            pos = idx * cb64 + e as u64;
        }
        out
    }

    /// The stored chunks after the one holding `end`, up to READ_AHEAD_CHUNKS of them.
    fn ahead(&self, cb: usize, end: u64) -> Vec<ChunkRef> {
        if self.inline {
            return Vec::new();
        }
        let first = end / cb as u64 + 1;
        (first..first + READ_AHEAD_CHUNKS)
            .take_while(|idx| idx * (cb as u64) < self.inode.size)
            .filter(|idx| !self.pending.contains_key(idx) && !self.dirty.contains_key(idx))
            .filter_map(|idx| {
                chunk::chunk_ref(self.inode.chunks.get(idx as usize)?)
            })
            .collect()
    }
}

/// One open inode in this mount, shared by all its handles.
pub struct OpenFile {
    pub ino: u64,
    pub st: tokio::sync::Mutex<FileState>,
    /// Where the last read ended: a read starting there is sequential and fetches ahead.
    pub last_read_end: std::sync::atomic::AtomicU64,
}

impl OpenFile {
    pub fn new(ino: u64, st: FileState) -> OpenFile {
        OpenFile { ino, st: tokio::sync::Mutex::new(st), last_read_end: std::sync::atomic::AtomicU64::new(0) }
    }
}

impl OpenFile {
    pub async fn read(&self, ctx: &DataCtx, off: u64, len: usize) -> FsResult<ReadData> {
        let sequential = self.last_read_end.swap(off + len as u64, std::sync::atomic::Ordering::Relaxed) == off;
        let (plan, ahead) = {
            let st = self.st.lock().await;
            let ahead = if sequential { st.ahead(st.cb, off + len as u64) } else { Vec::new() };
            (st.plan_read(st.cb, off, len), ahead)
        };
        for r in ahead {
            let (client, cache) = (ctx.stripes.clone(), ctx.cache.clone());
            tokio::spawn(async move {
                let _ = cache.get(&client, r).await;
            });
        }
        // The usual sequential read lies inside one chunk: handed out as a slice of it,
        // not copied (a copy of every byte read was a fifth of the mount's copying).
        if let [p] = plan.as_slice() {
            let whole = match p {
                Piece::Shared(d, s, e) if *e <= d.len() => Some((d.clone(), *s, *e)),
                Piece::Stored(r, s, e) => {
                    let d = ctx.cache.get(&ctx.stripes, r.clone()).await?;
                    if *e <= d.len() {
                        Some((d, *s, *e))
                    } else {
                        let mut out = Vec::with_capacity(len);
                        append_range(&mut out, &d, *s, *e);
                        return Ok(ReadData::Owned(out));
                    }
                }
                _ => None,
            };
            if let Some((d, s, e)) = whole {
                return Ok(ReadData::Slice(d, s, e));
            }
        }
        let mut out = Vec::with_capacity(len);
        for p in plan {
            match p {
                Piece::Bytes(b) => out.extend_from_slice(&b),
                Piece::Shared(d, s, e) => append_range(&mut out, &d, s, e),
                Piece::Zeros(n) => out.resize(out.len() + n, 0),
                Piece::Stored(r, s, e) => {
                    let d = ctx.cache.get(&ctx.stripes, r).await?;
                    append_range(&mut out, &d, s, e);
                }
            }
        }
        Ok(ReadData::Owned(out))
    }
}

/// What a read returns: its own bytes, or a range of a chunk held in memory anyway.
pub enum ReadData {
    Owned(Vec<u8>),
    Slice(ChunkData, usize, usize),
}

impl std::ops::Deref for ReadData {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            ReadData::Owned(v) => v,
            ReadData::Slice(d, s, e) => &d[*s..*e],
        }
    }
}

/// Bytes [s, e) of a chunk whose stored part may be shorter (the rest reads as zeros).
fn append_range(out: &mut Vec<u8>, d: &[u8], s: usize, e: usize) {
    let have = d.len().min(e);
    if s < have {
        out.extend_from_slice(&d[s..have]);
    }
    out.resize(out.len() + (e - have.max(s)), 0);
}
