//! Inodes as stored in ring records (proto/fsmeta.proto) and the helpers the
//! operations use on them: kinds, times, sorted directory entries.

use crate::ring::Id;
use prost::Message;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

pub mod pb {
    include!(concat!(env!("OUT_DIR"), "/mutualstore.fs.v1.rs"));
}

pub use pb::{Chunk, DirEntry, Inode, Xattr};

pub const ROOT_INO: u64 = 1;
pub const MAX_NAME: usize = 255;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    File = 1,
    Dir = 2,
    Symlink = 3,
}

impl Kind {
    pub fn from_u32(k: u32) -> Option<Kind> {
        match k {
            1 => Some(Kind::File),
            2 => Some(Kind::Dir),
            3 => Some(Kind::Symlink),
            _ => None,
        }
    }
}

/// The record key of inode `ino` in filesystem `fsid`.
pub fn record_key(fsid: &str, ino: u64) -> Id {
    let mut b = Vec::with_capacity(16 + fsid.len());
    b.extend_from_slice(b"MSINODE1");
    b.extend_from_slice(&(fsid.len() as u32).to_be_bytes());
    b.extend_from_slice(fsid.as_bytes());
    b.extend_from_slice(&ino.to_be_bytes());
    Id::sha1(&b)
}

pub fn now_ns() -> i64 {
    to_ns(SystemTime::now())
}

/// How long an entry may wait for its inode before it counts as crash residue: far
/// beyond any record write (each filesystem call is bounded at 60 s), with room for
/// clocks of two machines that disagree by minutes.
pub const BIRTH_GRACE_MS: i64 = 15 * 60 * 1000;

/// Whether an entry whose inode is missing may still be one being created.
pub fn being_born(e: &DirEntry) -> bool {
    e.born_ms != 0 && now_ns() / 1_000_000 - e.born_ms < BIRTH_GRACE_MS
}

pub fn to_ns(t: SystemTime) -> i64 {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => d.as_nanos().min(i64::MAX as u128) as i64,
        Err(e) => -(e.duration().as_nanos().min(i64::MAX as u128) as i64),
    }
}

pub fn from_ns(ns: i64) -> SystemTime {
    if ns >= 0 {
        UNIX_EPOCH + Duration::from_nanos(ns as u64)
    } else {
        UNIX_EPOCH - Duration::from_nanos(ns.unsigned_abs())
    }
}

pub fn new_inode(kind: Kind, mode: u32, uid: u32, gid: u32) -> Inode {
    let now = now_ns();
    Inode {
        kind: kind as u32,
        mode: mode & 0o7777,
        uid,
        gid,
        nlink: 1,
        atime_ns: now,
        mtime_ns: now,
        ctime_ns: now,
        crtime_ns: now,
        ..Default::default()
    }
}

pub fn encode(i: &Inode) -> Vec<u8> {
    i.encode_to_vec()
}

pub fn decode(b: &[u8]) -> Result<Inode, String> {
    let i = Inode::decode(b).map_err(|e| format!("undecodable inode: {e}"))?;
    if Kind::from_u32(i.kind).is_none() {
        return Err(format!("inode of unknown kind {}", i.kind));
    }
    Ok(i)
}

pub trait InodeExt {
    fn kind(&self) -> Kind;
    fn is_dir(&self) -> bool {
        self.kind() == Kind::Dir
    }
    fn find(&self, name: &[u8]) -> Option<&DirEntry>;
    /// Adds or replaces the entry for `e.name`; returns the one it replaced.
    fn insert(&mut self, e: DirEntry) -> Option<DirEntry>;
    fn remove(&mut self, name: &[u8]) -> Option<DirEntry>;
    /// Marks a change of metadata (ctime) or of content too (mtime).
    fn touch(&mut self, content: bool);
}

impl InodeExt for Inode {
    fn kind(&self) -> Kind {
        Kind::from_u32(self.kind).unwrap_or(Kind::File)
    }

    fn find(&self, name: &[u8]) -> Option<&DirEntry> {
        self.entries.binary_search_by(|e| e.name.as_slice().cmp(name)).ok().map(|i| &self.entries[i])
    }

    fn insert(&mut self, e: DirEntry) -> Option<DirEntry> {
        match self.entries.binary_search_by(|x| x.name.as_slice().cmp(&e.name)) {
            Ok(i) => Some(std::mem::replace(&mut self.entries[i], e)),
            Err(i) => {
                self.entries.insert(i, e);
                None
            }
        }
    }

    fn remove(&mut self, name: &[u8]) -> Option<DirEntry> {
        self.entries.binary_search_by(|x| x.name.as_slice().cmp(name)).ok().map(|i| self.entries.remove(i))
    }

    fn touch(&mut self, content: bool) {
        let now = now_ns();
        self.ctime_ns = now;
        if content {
            self.mtime_ns = now;
        }
    }
}

pub fn check_name(name: &[u8]) -> Result<(), super::error::FsError> {
    if name.len() > MAX_NAME {
        return Err(super::error::FsError::NameTooLong);
    }
    if name.is_empty() || name == b"." || name == b".." || name.contains(&b'/') || name.contains(&0) {
        return Err(super::error::FsError::Invalid(format!("bad name {:?}", String::from_utf8_lossy(name))));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_young_entry_without_its_inode_counts_as_being_created() {
        let now_ms = now_ns() / 1_000_000;
        let e = |born_ms| DirEntry { name: b"f".to_vec(), ino: 7, kind: 1, born_ms };
        assert!(being_born(&e(now_ms)));
        assert!(being_born(&e(now_ms + 60_000)), "a clock ahead of ours");
        assert!(!being_born(&e(now_ms - BIRTH_GRACE_MS - 1)), "crash residue");
        assert!(!being_born(&e(0)), "made by rename, or before entries had a birth time");
    }

    #[test]
    fn entries_stay_sorted_and_unique() {
        let mut d = new_inode(Kind::Dir, 0o755, 0, 0);
        for n in ["b", "a", "c", "a"] {
            d.insert(DirEntry { name: n.as_bytes().to_vec(), ino: n.len() as u64, kind: 1, born_ms: 0 });
        }
        let names: Vec<&[u8]> = d.entries.iter().map(|e| e.name.as_slice()).collect();
        assert_eq!(names, vec![b"a" as &[u8], b"b", b"c"]);
        assert!(d.find(b"b").is_some());
        assert!(d.remove(b"b").is_some());
        assert!(d.find(b"b").is_none());
        assert!(d.remove(b"zz").is_none());
    }

    #[test]
    fn inode_roundtrip_and_garbage_rejected() {
        let mut f = new_inode(Kind::File, 0o100644, 5, 6);
        f.size = 42;
        f.inline_data = b"hello".to_vec();
        assert_eq!(decode(&encode(&f)).unwrap(), f);
        assert!(decode(&[0xff, 0xff, 0xff]).is_err());
        assert!(decode(&encode(&Inode { kind: 9, ..Default::default() })).is_err());
    }

    #[test]
    fn names_are_checked() {
        assert!(check_name(&[b'x'; 255]).is_ok());
        assert!(matches!(check_name(&[b'x'; 256]), Err(super::super::error::FsError::NameTooLong)));
        assert!(check_name(b"a/b").is_err());
        assert!(check_name(b"..").is_err());
        assert!(check_name("ünï\u{1}".as_bytes()).is_ok());
    }

    #[test]
    fn times_roundtrip_including_before_epoch() {
        for ns in [0i64, 1, 1_700_000_000_123_456_789, -5_000_000_000] {
            assert_eq!(to_ns(from_ns(ns)), ns);
        }
    }
}
