//! Mutable, versioned records on the ring: what the filesystem keeps its inodes and
//! directories in. Data stripes are immutable and content-addressed; metadata changes
//! in place, so it needs versions and compare-and-swap.
//!
//! A record lives on the first R = m+1 distinct peers of its key's successor walk, so it
//! survives the same m peer losses as an m-parity stripe. The first of them, the primary,
//! serialises writes: a CAS there reads the newest version among the replicas, checks
//! the writer's expected version, and writes the next one to every replica before it
//! answers. Readers ask every replica and take the newest version. See `store` for the
//! peer side and `client` for the writer's side.

pub mod client;
pub mod store;

/// A record as stored: its version (0 = never written) and, unless it is a tombstone,
/// its bytes.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Record {
    pub version: u64,
    pub deleted: bool,
    pub data: Vec<u8>,
}

impl Record {
    pub fn exists(&self) -> bool {
        self.version > 0 && !self.deleted
    }
}

const META_MAGIC: &[u8; 6] = b"MSREC1";
const META_LEN: usize = 15;

/// The block header of a stored record: magic, version, tombstone flag.
pub fn encode_meta(version: u64, deleted: bool) -> Vec<u8> {
    let mut m = Vec::with_capacity(META_LEN);
    m.extend_from_slice(META_MAGIC);
    m.extend_from_slice(&version.to_be_bytes());
    m.push(deleted as u8);
    m
}

/// `None` if the block is not a record (a shard, say).
pub fn decode_meta(m: &[u8]) -> Option<(u64, bool)> {
    if m.len() != META_LEN || &m[..6] != META_MAGIC || m[14] > 1 {
        return None;
    }
    Some((u64::from_be_bytes(m[6..14].try_into().ok()?), m[14] == 1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn meta_roundtrip_and_rejects_other_headers() {
        assert_eq!(decode_meta(&encode_meta(7, true)), Some((7, true)));
        assert_eq!(decode_meta(&encode_meta(u64::MAX, false)), Some((u64::MAX, false)));
        assert_eq!(decode_meta(b"MSREC1"), None);
        let mut bad = encode_meta(1, false);
        bad[14] = 2;
        assert_eq!(decode_meta(&bad), None);
        assert_eq!(decode_meta(&[0u8; 52]), None);
    }
}

/// What a replica answered to a read that named the version the reader already has.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fetched {
    /// The replica holds exactly the version the reader named.
    Unchanged(u64),
    /// The replica's record (version 0 if it has none).
    Got(Record),
}

impl Fetched {
    pub fn version(&self) -> u64 {
        match self {
            Fetched::Unchanged(v) => *v,
            Fetched::Got(r) => r.version,
        }
    }
}

/// Outcome of a compare-and-swap at the primary.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CasOutcome {
    /// Written everywhere as this version.
    Done(u64),
    /// The record had moved on; here it is.
    Conflict(Record),
    /// Written as `version` on the primary but not on `failed`.
    Partial { version: u64, failed: Vec<crate::rpc::NetAddr> },
}

/// Answers a read waits for from a replica set of `copies`: writes are acknowledged
/// with all copies but one, so any two replicas include one with the newest version
/// (one if the set has only two copies, which writes both).
pub(crate) fn read_quorum(copies: usize) -> usize {
    if copies >= 3 {
        2
    } else {
        1
    }
}
