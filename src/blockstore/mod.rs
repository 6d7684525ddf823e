//! # Block store: the per-peer disk image
//!
//! **Owns** one preallocated file, `<data dir>/image.msd`, of a capacity
//! declared at creation, and everything in it: blocks (20-byte key -> up to
//! 64 bytes of opaque meta + up to 16 MiB of data), the free-space map and
//! the key index. It is the only place a peer keeps data.
//!
//! **Never** touches the network, knows nothing of rings, peers or
//! replication, keeps no second file (no index or journal that could go
//! stale), and never panics on file content. All calls do blocking I/O;
//! async callers use `spawn_blocking`.
//!
//! ## On-disk format (version 1, little-endian)
//!
//! The file is `capacity` bytes, created sparse (`set_len`), cut into 4 KiB
//! *units*; `total = capacity / 4096` (a tail under one unit is unused).
//!
//! * **Unit 0, superblock** (64 bytes, rest zero): magic `MSIMG001`, format
//!   version u32, unit size u32 (4096), capacity u64, image nonce u64
//!   (random), header size u32 (128), reserved, crc32c of bytes 0..60.
//!   Written once, at creation (into `image.msd.tmp`, fsynced, renamed), and
//!   never rewritten, so it cannot be torn later.
//! * **Units 1..total, records.** Records *tile* this range with no gaps: a
//!   new image holds one FREE record spanning all of it. A record is a
//!   128-byte header at the start of its first unit, then (for a block) its
//!   data, then zero padding to the unit boundary; it occupies
//!   `ceil((128 + data_len) / 4096)` units (a FREE record: any count >= 1).
//! * **Record header** (128 bytes): `0` magic `MSREC001` · `8` version u16 ·
//!   `10` kind u8 (1 block, 2 free) · `11` meta_len u8 (<= 64) · `12`
//!   data_len u32 (<= 16 MiB) · `16` units u64 (record length incl. header) ·
//!   `24` seq u64 · `32` key [20] · `52` crc32c(data) u32 · `56` meta [64] ·
//!   `120` reserved · `124` header crc32c, computed over
//!   `nonce_le ++ bytes[0..124]`. Seeding with the image nonce means a header
//!   forged inside block data, or copied from another image, never verifies.
//!
//! No high-water mark is needed: because records tile the image, open-time
//! recovery simply follows the chain from unit 1 (each header says where the
//! next starts; a large FREE record is one jump). The superblock therefore
//! never changes after creation.
//!
//! ## Recovery at open
//!
//! Walk the chain. A BLOCK header enters the index; for two records with one
//! key the higher `seq` wins and the loser's header is durably overwritten
//! with FREE (so it can never resurrect). A header that fails verification
//! starts an *orphan* run up to the next unit whose start holds a valid
//! header (searched in 1 MiB reads, skipping sparse holes with SEEK_DATA);
//! its content had no verifiable owner, so the run is reused as free space.
//! Adjacent free pieces are coalesced and rewritten as a single FREE record.
//! Data checksums are *not* read at open (that would read the whole image);
//! they are checked by every `get` and by `scrub`.
//!
//! ## Write protocol and crash safety
//!
//! Invariant: the durable chain always tiles the image, and a header is never
//! made to point at a unit whose own header is not already durable.
//!
//! * `put` (1) *reserve* under the allocator lock: take the best-fit free
//!   extent `[a, b)`; if larger than needed (`n` units), write FREE at `a+n`
//!   for the tail, **fdatasync**, then shrink the header at `a` to FREE(n)
//!   (made durable by step 2's sync, which precedes anything that depends on
//!   it). (2) without locks: write data + padding into the extent behind the
//!   still-FREE header, **fdatasync**. (3) overwrite the header at `a` with
//!   the BLOCK header (same unit count, so the chain shape is unchanged),
//!   **fdatasync**: this single header write is the commit point. (4) under
//!   the index lock, publish in memory; the replaced version, if any, is
//!   then freed. A crash before (3) leaves a FREE record (block absent or old
//!   version kept); after (3) the new version is whole because its data was
//!   durable first. Old + new both on disk after a crash: higher seq wins.
//! * `delete`/free: overwrite the record's own header with FREE, and if a
//!   free neighbour precedes it, rewrite that neighbour's header to cover the
//!   merged extent; one fdatasync. Either write alone leaves a valid chain.
//! * A torn 128-byte header fails its crc and becomes an orphan run (see
//!   above); because every byte of a record is written (data + padding)
//!   before its header, the units inside hold only data or zeros.
//!
//! ## Concurrency
//!
//! `DiskImage` is `Send + Sync`. Two short `parking_lot` mutexes: the index
//! (key -> location, used units, corrupt set) and the allocator (free-extent
//! map, next seq). Data I/O uses `pread`/`pwrite` outside both locks. A
//! freed extent is handed back to the allocator only after the key left the
//! index, and `get` re-checks the index when verification fails, so a read
//! that raced with a delete/overwrite retries instead of reporting
//! corruption. The file is `flock`ed: a second `open` of the same image
//! (from any process) fails with `BadImage` until the first is dropped.

mod extents;
mod format;
mod scan;
mod small_cache;
#[cfg(test)]
mod tests;

use std::collections::{btree_map, BTreeMap, BTreeSet};
use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

use parking_lot::Mutex;

use extents::FreeMap;
use format::{units_for, Header, Kind, Superblock, HEADER_LEN, SUPERBLOCK_LEN, UNIT};
use scan::Scanned;
use small_cache::SmallCache;

pub type BlockKey = [u8; 20];
/// Largest block.
pub const MAX_DATA_BYTES: usize = 16 << 20;
/// Largest opaque metadata stored with a block.
pub const MAX_META_BYTES: usize = 64;

/// Smallest image accepted by `open`.
const MIN_CAPACITY_BYTES: u64 = 1 << 20;
const IMAGE_FILE: &str = "image.msd";
const IMAGE_TMP_FILE: &str = "image.msd.tmp";

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("disk image full: need {needed_bytes} bytes, {free_bytes} free")]
    Full { needed_bytes: u64, free_bytes: u64 },
    #[error("block {key} is corrupt: {why}")]
    Corrupt { key: String, why: String },
    #[error("invalid argument: {0}")]
    Invalid(String),
    /// Unreadable superblock, version mismatch, capacity mismatch, image in use.
    #[error("disk image {path}: {why}")]
    BadImage { path: String, why: String },
    #[error("i/o error: {0}")]
    Io(#[from] std::io::Error),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Block {
    pub meta: Vec<u8>,
    pub data: Vec<u8>,
}

/// Where a live block lives, as published in the index.
#[derive(Debug, Clone, Copy)]
struct Entry {
    unit: u64,
    units: u64,
    seq: u64,
    data_len: u32,
}

#[derive(Default)]
struct Index {
    live: BTreeMap<BlockKey, Entry>,
    used_units: u64,
    corrupt: BTreeSet<BlockKey>,
}

struct Alloc {
    free: FreeMap,
    next_seq: u64,
}

/// An extent taken out of the free map for one put, not yet published.
struct Reservation {
    unit: u64,
    units: u64,
    seq: u64,
}

/// Result of reading one record back: verified content, or why not.
enum Verified {
    Good(Block),
    Bad(String),
}

/// A run of units that is free after recovery.
struct FreePiece {
    unit: u64,
    units: u64,
    /// Already exactly one valid FREE record on disk.
    clean: bool,
}

pub struct DiskImage {
    path: PathBuf,
    file: File,
    /// The same image opened O_DIRECT, for large reads of data not in the page cache
    /// (None where the filesystem refuses O_DIRECT, e.g. tmpfs).
    direct: Option<File>,
    capacity: u64,
    total_units: u64,
    nonce: u64,
    index: Mutex<Index>,
    alloc: Mutex<Alloc>,
    /// Unreadable headers met by the last open's scan (0 after a clean
    /// shutdown or a kill -9; nonzero means damage or a torn write).
    orphans_at_open: std::sync::atomic::AtomicUsize,
    /// Some `put_unsynced` has not been followed by a sync yet.
    unsynced: std::sync::atomic::AtomicBool,
    /// Small blocks recently read through `get_cached` (records), by key and seq.
    small: Mutex<SmallCache>,
}

impl fmt::Debug for DiskImage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DiskImage")
            .field("path", &self.path)
            .field("capacity", &self.capacity)
            .field("blocks", &self.len())
            .finish()
    }
}

fn hex(key: &BlockKey) -> String {
    key.iter().map(|b| format!("{b:02x}")).collect()
}

fn bad_image(path: &Path, why: impl Into<String>) -> StoreError {
    StoreError::BadImage {
        path: path.display().to_string(),
        why: why.into(),
    }
}

fn check_sizes(meta: &[u8], data: &[u8]) -> Result<(), StoreError> {
    if meta.len() > MAX_META_BYTES {
        return Err(StoreError::Invalid(format!(
            "meta is {} bytes, limit {MAX_META_BYTES}",
            meta.len()
        )));
    }
    if data.len() > MAX_DATA_BYTES {
        return Err(StoreError::Invalid(format!(
            "data is {} bytes, limit {MAX_DATA_BYTES}",
            data.len()
        )));
    }
    Ok(())
}

impl DiskImage {
    /// Opens `dir/image.msd`, creating it (of exactly capacity_bytes, sparse
    /// via set_len) if absent, and rebuilds the index by scanning the
    /// self-describing records.
    pub fn open(dir: &Path, capacity_bytes: u64) -> Result<DiskImage, StoreError> {
        if capacity_bytes < MIN_CAPACITY_BYTES {
            return Err(StoreError::Invalid(format!(
                "capacity {capacity_bytes} bytes is below the minimum of {MIN_CAPACITY_BYTES}"
            )));
        }
        fs::create_dir_all(dir)?;
        let path = dir.join(IMAGE_FILE);
        match fs::symlink_metadata(&path) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                create_image(dir, &path, capacity_bytes)?
            }
            Err(e) => return Err(e.into()),
            Ok(_) => {}
        }
        let file = OpenOptions::new().read(true).write(true).open(&path)?;
        lock_exclusive(&file, &path)?;
        let sb = read_superblock(&file, &path)?;
        if sb.capacity != capacity_bytes {
            return Err(bad_image(
                &path,
                format!(
                    "image capacity is {} bytes but {capacity_bytes} bytes were requested",
                    sb.capacity
                ),
            ));
        }
        let file_len = file.metadata()?.len();
        if file_len != sb.capacity {
            return Err(bad_image(
                &path,
                format!(
                    "file is {file_len} bytes but its superblock says {}",
                    sb.capacity
                ),
            ));
        }
        let total_units = capacity_bytes / UNIT;
        let scanned = scan::scan(&file, sb.nonce, total_units)?;
        let direct = OpenOptions::new().read(true).custom_flags(libc::O_DIRECT).open(&path).ok();
        let img = DiskImage {
            path,
            file,
            direct,
            capacity: capacity_bytes,
            total_units,
            nonce: sb.nonce,
            index: Mutex::new(Index::default()),
            alloc: Mutex::new(Alloc {
                free: FreeMap::default(),
                next_seq: 1,
            }),
            orphans_at_open: Default::default(),
            unsynced: Default::default(),
            small: Mutex::new(SmallCache::new(small_cache::BUDGET_BYTES)),
        };
        img.recover(scanned)?;
        Ok(img)
    }

    /// Durable on return. Replaces an existing block with the same key.
    pub fn put(&self, key: &BlockKey, meta: &[u8], data: &[u8]) -> Result<(), StoreError> {
        self.put_inner(key, meta, data, None, true)
    }

    /// Like `put`, but without waiting for the disk: the block is in the OS's page
    /// cache on return (it survives this process being killed, not a power loss) and
    /// durable after the next `sync_now`. Same write order as `put`, so a crash still
    /// leaves each block whole or absent, by checksum; what a power loss can undo is
    /// the latest unsynced versions.
    pub fn put_unsynced(&self, key: &BlockKey, meta: &[u8], data: &[u8]) -> Result<(), StoreError> {
        self.put_inner(key, meta, data, None, false)
    }

    /// `put` (`durable`) or `put_unsynced` of data whose CRC-32C the caller already
    /// computed (to check it against what the sender said): the image records that CRC
    /// rather than reading the bytes a second time.
    pub fn put_with_crc(&self, key: &BlockKey, meta: &[u8], data: &[u8], crc: u32, durable: bool) -> Result<(), StoreError> {
        debug_assert_eq!(crc, crc32c::crc32c(data));
        self.put_inner(key, meta, data, Some(crc), durable)
    }

    /// Makes every earlier `put_unsynced` durable.
    pub fn sync_now(&self) -> Result<(), StoreError> {
        if self.unsynced.swap(false, std::sync::atomic::Ordering::AcqRel) {
            if let Err(e) = self.sync() {
                self.unsynced.store(true, std::sync::atomic::Ordering::Release);
                return Err(e.into());
            }
        }
        Ok(())
    }

    fn put_inner(&self, key: &BlockKey, meta: &[u8], data: &[u8], crc: Option<u32>, durable: bool) -> Result<(), StoreError> {
        check_sizes(meta, data)?;
        let r = self.put_writes(key, meta, data, crc.unwrap_or_else(|| crc32c::crc32c(data)), durable);
        if !durable {
            // Raised after the writes, not before: a `sync_now` between raising it and
            // writing would lower it with these writes still to come, and the next one
            // would skip them.
            self.unsynced.store(true, std::sync::atomic::Ordering::Release);
        }
        r
    }

    fn put_writes(&self, key: &BlockKey, meta: &[u8], data: &[u8], crc: u32, durable: bool) -> Result<(), StoreError> {
        let res = self.reserve(units_for(data.len()), durable)?;
        let header = Header::block(key, meta, data.len(), crc, res.seq);
        if let Err(e) = self.write_record_with(&res, &header, data, durable) {
            if let Err(e2) = self.free_extent(res.unit, res.units, durable) {
                log::warn!(
                    "{}: leaking {} units after failed put: {e2}",
                    self.path.display(),
                    res.units
                );
            }
            return Err(e.into());
        }
        self.install(key, &res, data.len(), durable);
        self.small.lock().remove(key);
        Ok(())
    }

    /// Ok(None) if absent; Err(Corrupt) if the header or data checksum
    /// fails. Never returns unverified bytes.
    pub fn get(&self, key: &BlockKey) -> Result<Option<Block>, StoreError> {
        loop {
            let Some(entry) = self.index.lock().live.get(key).copied() else {
                return Ok(None);
            };
            let why = match self.read_record(key, &entry)? {
                Verified::Good(block) => return Ok(Some(block)),
                Verified::Bad(why) => why,
            };
            let mut idx = self.index.lock();
            if idx.live.get(key).map(|e| e.seq) == Some(entry.seq) {
                idx.corrupt.insert(*key);
                return Err(StoreError::Corrupt { key: hex(key), why });
            }
            // Replaced or deleted while we read: the extent may have been
            // reused, so what we saw proves nothing. Look up again.
        }
    }

    /// `get` for small blocks read often (records): served from memory while the block
    /// is the version that was read (see `small_cache`). Scrub and everything that must
    /// see the disk use `get`.
    pub fn get_cached(&self, key: &BlockKey) -> Result<Option<Block>, StoreError> {
        let Some(entry) = self.index.lock().live.get(key).copied() else {
            return Ok(None);
        };
        if let Some(b) = self.small.lock().get(key, entry.seq) {
            return Ok(Some(b));
        }
        match self.read_record(key, &entry)? {
            Verified::Good(block) => {
                if block.data.len() <= small_cache::SMALL_BLOCK_MAX {
                    self.small.lock().insert(*key, entry.seq, &block);
                }
                Ok(Some(block))
            }
            // Damaged, or replaced while we read: the full path decides which.
            Verified::Bad(_) => self.get(key),
        }
    }

    pub fn contains(&self, key: &BlockKey) -> bool {
        self.index.lock().live.contains_key(key)
    }

    /// true if it existed. The space is reusable afterwards and the
    /// deletion survives restart (durable on return).
    pub fn delete(&self, key: &BlockKey) -> Result<bool, StoreError> {
        let removed = {
            let mut idx = self.index.lock();
            let Some(e) = idx.live.remove(key) else {
                return Ok(false);
            };
            idx.used_units -= e.units;
            idx.corrupt.remove(key);
            e
        };
        self.small.lock().remove(key);
        self.free_extent(removed.unit, removed.units, true)?;
        Ok(true)
    }

    /// All stored keys, ascending (lexicographic = big-endian numeric).
    pub fn keys(&self) -> Vec<BlockKey> {
        self.index.lock().live.keys().copied().collect()
    }

    /// Up to `limit` stored keys after `after` (all from the first if None), ascending.
    pub fn keys_after(&self, after: Option<&BlockKey>, limit: usize) -> Vec<BlockKey> {
        use std::ops::Bound;
        let lower = after.map_or(Bound::Unbounded, |k| Bound::Excluded(*k));
        self.index.lock().live.range((lower, Bound::Unbounded)).take(limit).map(|(k, _)| *k).collect()
    }

    /// Stored keys in [from, to] (inclusive), ascending.
    pub fn keys_between(&self, from: &BlockKey, to: &BlockKey) -> Vec<BlockKey> {
        if from > to {
            return Vec::new();
        }
        self.index.lock().live.range(*from..=*to).map(|(k, _)| *k).collect()
    }

    /// The metadata stored with a block, read from its (checksummed) header alone, so a
    /// scan over every block's metadata does not read the data. Ok(None) if absent.
    pub fn meta(&self, key: &BlockKey) -> Result<Option<Vec<u8>>, StoreError> {
        let Some(e) = self.index.lock().live.get(key).copied() else {
            return Ok(None);
        };
        let mut hb = [0u8; HEADER_LEN];
        self.file.read_exact_at(&mut hb, e.unit * UNIT)?;
        match Header::decode(&hb, self.nonce, e.unit, self.total_units) {
            Ok(h) if h.kind == Kind::Block && h.key == *key && h.seq == e.seq => Ok(Some(h.meta)),
            // Replaced meanwhile, or damaged: get() is the authority on which.
            _ => match self.get(key)? {
                Some(b) => Ok(Some(b.meta)),
                None => Ok(None),
            },
        }
    }

    pub fn len(&self) -> usize {
        self.index.lock().live.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn capacity_bytes(&self) -> u64 {
        self.capacity
    }

    /// Bytes consumed by live records (headers + data rounded up to units).
    pub fn used_bytes(&self) -> u64 {
        self.index.lock().used_units * UNIT
    }

    /// Bytes in free extents (excludes the superblock unit, the sub-unit
    /// tail and extents reserved by puts in flight).
    pub fn free_bytes(&self) -> u64 {
        self.alloc.lock().free.total_units() * UNIT
    }

    /// Reads and verifies every block; returns keys that failed.
    pub fn scrub(&self) -> Vec<BlockKey> {
        self.keys()
            .into_iter()
            .filter(|k| match self.get(k) {
                Ok(_) => false,
                Err(e) => {
                    log::warn!("{}: scrub: {e}", self.path.display());
                    true
                }
            })
            .collect()
    }

    /// Live keys whose record was found corrupt (by get or scrub).
    pub fn corrupt_keys(&self) -> Vec<BlockKey> {
        self.index.lock().corrupt.iter().copied().collect()
    }

    /// Path of the image file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    // ---- recovery -------------------------------------------------------

    /// Builds index and free map from the scanned chain, durably retiring
    /// losing duplicates and coalescing free runs on disk.
    fn recover(&self, scanned: Vec<Scanned>) -> Result<(), StoreError> {
        let mut live: BTreeMap<BlockKey, Entry> = BTreeMap::new();
        let mut losers = Vec::new();
        let mut pieces = Vec::new();
        let mut max_seq = 0;
        for s in scanned {
            match s {
                Scanned::Orphan { unit, units, why } => {
                    self.orphans_at_open
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    log::warn!(
                        "{}: unreadable header at unit {unit} ({why}); reusing {units} units",
                        self.path.display()
                    );
                    pieces.push(FreePiece {
                        unit,
                        units,
                        clean: false,
                    });
                }
                Scanned::Record { unit, header } if header.kind == Kind::Free => {
                    pieces.push(FreePiece {
                        unit,
                        units: header.units,
                        clean: true,
                    });
                }
                Scanned::Record { unit, header } => {
                    max_seq = max_seq.max(header.seq);
                    let e = Entry {
                        unit,
                        units: header.units,
                        seq: header.seq,
                        data_len: header.data_len,
                    };
                    match live.entry(header.key) {
                        btree_map::Entry::Vacant(v) => {
                            v.insert(e);
                        }
                        btree_map::Entry::Occupied(mut o) if e.seq > o.get().seq => {
                            losers.push(std::mem::replace(o.get_mut(), e));
                        }
                        btree_map::Entry::Occupied(_) => losers.push(e),
                    }
                }
            }
        }
        self.retire_losers(&losers)?;
        pieces.extend(losers.iter().map(|l| FreePiece {
            unit: l.unit,
            units: l.units,
            clean: true,
        }));
        let free = self.coalesce_free(pieces)?;
        let used_units = live.values().map(|e| e.units).sum();
        *self.index.lock() = Index {
            live,
            used_units,
            corrupt: BTreeSet::new(),
        };
        *self.alloc.lock() = Alloc {
            free,
            next_seq: max_seq.saturating_add(1),
        };
        Ok(())
    }

    /// Overwrites superseded versions with FREE so they can never come back
    /// (e.g. after the winning version is deleted).
    fn retire_losers(&self, losers: &[Entry]) -> io::Result<()> {
        for l in losers {
            log::info!(
                "{}: dropping superseded record at unit {}",
                self.path.display(),
                l.unit
            );
            self.write_header(l.unit, &Header::free(l.units))?;
        }
        if !losers.is_empty() {
            self.sync()?;
        }
        Ok(())
    }

    /// Merges adjacent free pieces into maximal extents, rewriting one FREE
    /// header per extent where the disk does not already say so.
    fn coalesce_free(&self, mut pieces: Vec<FreePiece>) -> io::Result<FreeMap> {
        pieces.sort_by_key(|p| p.unit);
        let mut runs: Vec<FreePiece> = Vec::new();
        for p in pieces {
            match runs.last_mut() {
                Some(r) if r.unit + r.units == p.unit => {
                    r.units += p.units;
                    r.clean = false;
                }
                _ => runs.push(p),
            }
        }
        let mut free = FreeMap::default();
        let mut wrote = false;
        for r in &runs {
            if !r.clean {
                self.write_header(r.unit, &Header::free(r.units))?;
                wrote = true;
            }
            free.add_exact(r.unit, r.units);
        }
        if wrote {
            self.sync()?;
        }
        Ok(free)
    }

    // ---- write path -----------------------------------------------------

    /// Takes a best-fit extent of `units` out of the free map, making the
    /// on-disk chain match (see "Write protocol" in the module doc).
    fn reserve(&self, units: u64, durable: bool) -> Result<Reservation, StoreError> {
        let mut alloc = self.alloc.lock();
        let Some((start, len)) = alloc.free.best_fit(units) else {
            return Err(StoreError::Full {
                needed_bytes: units * UNIT,
                free_bytes: alloc.free.total_units() * UNIT,
            });
        };
        if len > units {
            self.split_free_record(start, units, len, durable)?;
        }
        alloc.free.remove(start);
        if len > units {
            alloc.free.add_exact(start + units, len - units);
        }
        let seq = alloc.next_seq;
        alloc.next_seq = seq.saturating_add(1); // decode caps seqs far below u64::MAX
        Ok(Reservation {
            unit: start,
            units,
            seq,
        })
    }

    /// Splits the FREE record [start, start+len) after `units` units.
    fn split_free_record(&self, start: u64, units: u64, len: u64, durable: bool) -> io::Result<()> {
        // The tail's header must be durable before the head points at it.
        self.write_header(start + units, &Header::free(len - units))?;
        if durable {
            self.sync()?;
        }
        // Left unsynced: the reserving put syncs before publishing, and any
        // later put in the tail syncs after this write too.
        self.write_header(start, &Header::free(units))
    }

    /// Data (+ zero padding) first and synced, then the header that vouches
    /// for it, synced: the header write is the commit point.
    #[cfg(test)]
    fn write_record(&self, res: &Reservation, header: &Header, data: &[u8]) -> io::Result<()> {
        self.write_record_with(res, header, data, true)
    }

    fn write_record_with(&self, res: &Reservation, header: &Header, data: &[u8], durable: bool) -> io::Result<()> {
        static ZEROS: [u8; UNIT as usize] = [0; UNIT as usize];
        let base = res.unit * UNIT;
        let data_at = base + HEADER_LEN as u64;
        self.file.write_all_at(data, data_at)?;
        // Zero the rest of the last unit so no stale header survives at any
        // unit start inside the record (matters only when scanning past a
        // torn header).
        let data_end = data_at + data.len() as u64;
        let pad = (base + res.units * UNIT - data_end) as usize;
        self.file
            .write_all_at(&ZEROS[..pad.min(ZEROS.len())], data_end)?;
        if !durable {
            self.write_header(res.unit, header)?;
            if data.len() >= EARLY_WRITEBACK_BYTES {
                self.start_writeback(base, res.units * UNIT);
            }
            return Ok(());
        }
        self.sync()?;
        self.write_header(res.unit, header)?;
        self.sync()
    }

    /// Asks the kernel to start writing a lazily written record to disk now, without
    /// waiting for it: otherwise the pages sit dirty until the next `sync_now` (a file's
    /// fsync, or the peer's second tick), and that sync then waits for all of them at
    /// once while the CPUs idle — a tenth of a 512 MiB write+fsync through the mount.
    /// Only a head start: durability still comes from `sync_now`.
    fn start_writeback(&self, at: u64, len: u64) {
        use std::os::fd::AsRawFd;
        // SAFETY: a plain syscall on our own open descriptor; no memory is passed.
        let r = unsafe { libc::sync_file_range(self.file.as_raw_fd(), at as i64, len as i64, libc::SYNC_FILE_RANGE_WRITE) };
        if r != 0 {
            log::debug!("sync_file_range: {}", io::Error::last_os_error());
        }
    }

    /// Publishes a durable record in the index and frees whichever version
    /// lost (the replaced one, or ours if a concurrent put of the same key
    /// reserved later and already published).
    fn install(&self, key: &BlockKey, res: &Reservation, data_len: usize, durable: bool) {
        let new = Entry {
            unit: res.unit,
            units: res.units,
            seq: res.seq,
            data_len: data_len as u32,
        };
        let loser = {
            let mut guard = self.index.lock();
            let idx = &mut *guard;
            match idx.live.get(key) {
                Some(cur) if cur.seq > new.seq => new,
                _ => {
                    idx.used_units += new.units;
                    idx.corrupt.remove(key);
                    match idx.live.insert(*key, new) {
                        Some(old) => {
                            idx.used_units -= old.units;
                            old
                        }
                        None => return,
                    }
                }
            }
        };
        // The put itself is already durable; if this fails, the loser is
        // retired at the next open (lower seq), so only log.
        if let Err(e) = self.free_extent(loser.unit, loser.units, durable) {
            log::warn!(
                "{}: could not free superseded record: {e}",
                self.path.display()
            );
        }
    }

    /// Returns a record's extent to the free map, durably: its own header
    /// becomes FREE, then a free left neighbour is widened over it.
    fn free_extent(&self, unit: u64, units: u64, durable: bool) -> io::Result<()> {
        let mut alloc = self.alloc.lock();
        let (left, right) = alloc.free.merged_span(unit, units);
        if left == unit {
            self.write_header(unit, &Header::free(right - unit))?;
        } else {
            self.write_header(unit, &Header::free(units))?;
            self.write_header(left, &Header::free(right - left))?;
        }
        if durable {
            self.sync()?;
        }
        alloc.free.insert(unit, units);
        Ok(())
    }

    // ---- read path ------------------------------------------------------

    /// Reads the record `e` points at; `Bad` if anything fails verification.
    fn read_record(&self, key: &BlockKey, e: &Entry) -> io::Result<Verified> {
        let mut hb = [0u8; HEADER_LEN];
        let at = e.unit * UNIT;
        let len = e.data_len as usize;
        // Header and data in one read, straight from the disk for a large record: a
        // buffered read of the header alone would pull the data into the page cache
        // by readahead anyway.
        let direct = self.direct.as_ref().filter(|_| len >= DIRECT_READ_MIN).and_then(|f| read_direct(f, &mut hb, len, at).ok());
        let data = match direct {
            Some(data) => data,
            None => {
                let mut data = vec![0u8; len];
                self.file.read_exact_at(&mut hb, at)?;
                self.file.read_exact_at(&mut data, at + HEADER_LEN as u64)?;
                data
            }
        };
        let h = match Header::decode(&hb, self.nonce, e.unit, self.total_units) {
            Ok(h) => h,
            Err(why) => return Ok(Verified::Bad(why)),
        };
        if h.kind != Kind::Block
            || h.key != *key
            || h.seq != e.seq
            || h.units != e.units
            || h.data_len != e.data_len
        {
            return Ok(Verified::Bad(
                "header on disk does not match the index".into(),
            ));
        }
        if crc32c::crc32c(&data) != h.data_crc {
            return Ok(Verified::Bad("data checksum mismatch".into()));
        }
        Ok(Verified::Good(Block { meta: h.meta, data }))
    }

    // ---- small I/O helpers ----------------------------------------------

    fn write_header(&self, unit: u64, h: &Header) -> io::Result<()> {
        self.file.write_all_at(&h.encode(self.nonce), unit * UNIT)
    }

    fn sync(&self) -> io::Result<()> {
        self.file.sync_data()
    }
}

/// Creates a fresh image atomically: a crash leaves either no image or a
/// complete one (superblock + one FREE record spanning all units).
fn create_image(dir: &Path, path: &Path, capacity: u64) -> Result<(), StoreError> {
    let tmp = dir.join(IMAGE_TMP_FILE);
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&tmp)?;
    file.set_len(capacity)?;
    let sb = Superblock {
        capacity,
        nonce: rand::random(),
    };
    file.write_all_at(&sb.encode(), 0)?;
    let total_units = capacity / UNIT;
    file.write_all_at(&Header::free(total_units - 1).encode(sb.nonce), UNIT)?;
    file.sync_all()?;
    drop(file);
    fs::rename(&tmp, path)?;
    File::open(dir)?.sync_all()?;
    Ok(())
}

fn read_superblock(file: &File, path: &Path) -> Result<Superblock, StoreError> {
    let mut buf = [0u8; SUPERBLOCK_LEN];
    match file.read_exact_at(&mut buf, 0) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
            return Err(bad_image(path, "file too short for a superblock"));
        }
        Err(e) => return Err(e.into()),
    }
    Superblock::decode(&buf).map_err(|why| bad_image(path, why))
}

/// One live DiskImage per image file: two writers would corrupt the chain.
/// A lock just released can still look held for a moment: a process forking at that
/// instant shares the locked open file until its exec closes it. So a busy lock is
/// retried briefly before the image is declared in use.
fn lock_exclusive(file: &File, path: &Path) -> Result<(), StoreError> {
    for _ in 0..20 {
        // SAFETY: flock on a valid fd owned by `file`; released when it closes.
        let r = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if r == 0 {
            return Ok(());
        }
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::WouldBlock {
            return Err(err.into());
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    Err(bad_image(
        path,
        "image is already open (locked by another DiskImage)",
    ))
}

/// Reads at or above this size bypass the page cache.
const DIRECT_READ_MIN: usize = 256 << 10;
/// Lazily written records this large (shards, not metadata records) start their
/// writeback at once (`DiskImage::start_writeback`).
const EARLY_WRITEBACK_BYTES: usize = 256 << 10;

/// O_DIRECT alignment of offsets, lengths and buffers (the largest logical block size
/// in use; 4 KiB is also the image's unit).
const DIRECT_ALIGN: usize = 4096;

/// Reads a record's header into `header` and its `len` bytes of data, from `off` (a
/// unit boundary) on, through the O_DIRECT handle. A cold buffered read costs this
/// machine ~1.4 s of CPU per GiB (page-cache insertion and copying; dd: 1.51 s of
/// system time for 1 GiB, 0.09 s with O_DIRECT), and a sequential read through the mount
/// reads nearly every shard cold: a quarter of the CPU of the whole read. Even a shard
/// still in the page cache costs less CPU read directly (the kernel writes a dirty range
/// back first, so the read is coherent); probing the cache first (RWF_NOWAIT) started
/// readahead and cost more. The aligned buffer the disk reads into becomes the returned
/// data (moved down over the header), and is not zeroed first: the peers keep big
/// buffers in the heap, where zeroing 1 MiB is a real memset (2 % of all CPU in a
/// sequential read, with a second buffer it was copied into).
fn read_direct(file: &File, header: &mut [u8; HEADER_LEN], len: usize, off: u64) -> io::Result<Vec<u8>> {
    if !off.is_multiple_of(DIRECT_ALIGN as u64) {
        return Err(io::Error::other("record not aligned for O_DIRECT"));
    }
    let span = (HEADER_LEN + len).div_ceil(DIRECT_ALIGN) * DIRECT_ALIGN;
    let mut raw: Vec<u8> = Vec::with_capacity(span + DIRECT_ALIGN);
    let skew = raw.as_ptr().align_offset(DIRECT_ALIGN);
    let mut got = 0;
    while got < span {
        // SAFETY: [skew + got, skew + span) lies inside the allocation (capacity
        // span + DIRECT_ALIGN, skew < DIRECT_ALIGN), and the kernel only writes it.
        let n = unsafe { libc::pread(file.as_raw_fd(), raw.as_mut_ptr().add(skew + got).cast(), span - got, (off + got as u64) as libc::off_t) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if n == 0 {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "image ends inside a record"));
        }
        got += n as usize;
        // A short O_DIRECT read ends on a block boundary; anything else is refused.
        if got % DIRECT_ALIGN != 0 && got < span {
            return Err(io::Error::other("unaligned short O_DIRECT read"));
        }
    }
    // SAFETY: the loop filled [skew, skew + span), and the few bytes before `skew` are
    // zeroed here, so every byte up to the new length is initialised.
    unsafe {
        std::ptr::write_bytes(raw.as_mut_ptr(), 0, skew);
        raw.set_len(skew + span);
    }
    header.copy_from_slice(&raw[skew..skew + HEADER_LEN]);
    raw.copy_within(skew + HEADER_LEN..skew + HEADER_LEN + len, 0);
    raw.truncate(len);
    Ok(raw)
}
